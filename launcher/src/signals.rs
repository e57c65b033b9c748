//! The launcher's own signals, turned into a channel the supervisor reads.

use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::mpsc;

use crate::exit::LauncherSignal;

/// Installs handlers for SIGINT, SIGTERM and SIGHUP and forwards each
/// delivery into the returned channel. Must be called inside a tokio runtime.
pub fn os_signals() -> std::io::Result<mpsc::UnboundedReceiver<LauncherSignal>> {
    let (tx, rx) = mpsc::unbounded_channel();
    for (kind, launcher_signal) in [
        (SignalKind::interrupt(), LauncherSignal::Interrupt),
        (SignalKind::terminate(), LauncherSignal::Terminate),
        (SignalKind::hangup(), LauncherSignal::Hangup),
    ] {
        let mut stream = signal(kind)?;
        let tx = tx.clone();
        tokio::spawn(async move {
            while stream.recv().await.is_some() {
                if tx.send(launcher_signal).is_err() {
                    return;
                }
            }
        });
    }
    Ok(rx)
}
