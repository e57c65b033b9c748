//! The launcher's own signals, turned into a channel the supervisor reads.

use nix::sys::signal::{raise, sigaction, SaFlags, SigAction, SigHandler, SigSet, Signal};
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::mpsc;

use crate::exec::job_marker::{signal_job_processes, Selector};
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

/// Suspends the job along with the launcher. On each SIGTSTP (Ctrl-Z on a
/// terminal) every local process of the job `job_id` gets SIGTSTP and the
/// launcher stops itself. Once it is continued (`fg`, `bg`, SIGCONT), they
/// get SIGCONT. Remote ranks keep running. Must be called inside a tokio
/// runtime; the returned task runs until the runtime ends.
pub fn suspend_with_job(job_id: String) -> std::io::Result<tokio::task::JoinHandle<()>> {
    let mut suspend = signal(SignalKind::from_raw(libc::SIGTSTP))?;
    Ok(tokio::spawn(async move {
        let selector = Selector::job(&job_id);
        while suspend.recv().await.is_some() {
            tracing::debug!("suspending the job's local processes and the launcher");
            signal_job_processes(&selector, Signal::SIGTSTP);
            if let Err(error) = stop_self() {
                tracing::warn!(%error, "cannot stop the launcher itself");
            }
            tracing::debug!("continuing the job's local processes");
            signal_job_processes(&selector, Signal::SIGCONT);
        }
    }))
}

/// Stops the launcher with SIGTSTP, as the terminal would have without a
/// handler, so the shell reports a stopped job. Returns once the launcher
/// is continued, with the handler back in place.
fn stop_self() -> nix::Result<()> {
    let default = SigAction::new(SigHandler::SigDfl, SaFlags::empty(), SigSet::empty());
    // SAFETY: the default action runs no code of this process, and the
    // previous action is put back unchanged.
    let previous = unsafe { sigaction(Signal::SIGTSTP, &default)? };
    let raised = raise(Signal::SIGTSTP);
    // SAFETY: restores the action that was installed before.
    unsafe { sigaction(Signal::SIGTSTP, &previous)? };
    raised
}
