//! Local ranks: child processes of the launcher, each in its own process group.

use std::io::{self, Write};
use std::os::unix::process::ExitStatusExt;
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use nix::sys::signal::killpg;
use nix::unistd::Pid;
use tokio::process::Command;

use super::{BoxFuture, RankControl, RankSignal, RankSpec, SpawnError, Spawned, Spawner, Termination};

/// Starts ranks as child processes on this machine.
#[derive(Debug, Default)]
pub struct LocalSpawner;

impl Spawner for LocalSpawner {
    fn spawn<'a>(&'a self, spec: &'a RankSpec) -> BoxFuture<'a, Result<Spawned, SpawnError>> {
        Box::pin(async move { spawn_local(spec) })
    }
}

fn spawn_local(spec: &RankSpec) -> Result<Spawned, SpawnError> {
    let io_error = |source: io::Error| SpawnError::Io {
        rank: spec.rank,
        host: spec.host.clone(),
        source,
    };
    let (program, args) = spec
        .argv
        .split_first()
        .ok_or_else(|| SpawnError::Other("the command is empty".into()))?;

    let mut command = Command::new(program);
    command
        .args(args)
        .envs(spec.env.iter().map(|(k, v)| (k, v)))
        .stdin(if spec.stdin { Stdio::piped() } else { Stdio::null() })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0);
    match (&spec.cwd, &spec.default_cwd) {
        (Some(cwd), _) => {
            command.current_dir(cwd);
        }
        (None, Some(dir)) if dir.is_dir() => {
            command.current_dir(dir);
        }
        _ => {}
    }

    let mut files = Vec::with_capacity(spec.files.len());
    for file in &spec.files {
        let mut temp = tempfile::Builder::new()
            .prefix(&format!("ringleader-{}-", file.env_var.to_ascii_lowercase()))
            .tempfile()
            .map_err(io_error)?;
        temp.write_all(file.contents.as_bytes()).map_err(io_error)?;
        temp.flush().map_err(io_error)?;
        command.env(&file.env_var, temp.path());
        files.push(temp);
    }

    let mut child = command.spawn().map_err(|source| match source.kind() {
        io::ErrorKind::NotFound => SpawnError::CommandNotFound {
            command: program.clone(),
        },
        _ => io_error(source),
    })?;
    let pid = child.id().expect("a child that was just spawned has not been reaped");
    let reaped = Arc::new(AtomicBool::new(false));

    let stdout = Box::new(child.stdout.take().expect("stdout is piped"));
    let stderr = Box::new(child.stderr.take().expect("stderr is piped"));
    let stdin = child.stdin.take().map(|s| Box::new(s) as super::ByteWriter);
    let wait_reaped = reaped.clone();
    let wait = Box::pin(async move {
        let status = child.wait().await;
        wait_reaped.store(true, Ordering::Release);
        // A rank's process group ends with the rank: whatever it left behind
        // would otherwise keep running and hold its output pipes open.
        let _ = killpg(Pid::from_raw(pid as i32), nix::sys::signal::Signal::SIGKILL);
        // The rank's files live exactly as long as its process.
        drop(files);
        let status = status?;
        Ok(match (status.code(), status.signal()) {
            (Some(code), _) => Termination::Exited(code),
            (None, Some(signal)) => Termination::Signaled(signal),
            (None, None) => Termination::Exited(-1),
        })
    });

    Ok(Spawned {
        pid: Some(pid),
        stdin,
        stdout,
        stderr,
        wait,
        control: Box::new(LocalControl {
            group: Pid::from_raw(pid as i32),
            reaped,
        }),
    })
}

/// Signals a local rank's process group.
struct LocalControl {
    /// Process group id, equal to the rank's pid since it leads its own group.
    group: Pid,
    /// Set once the group leader has been reaped.
    reaped: Arc<AtomicBool>,
}

impl RankControl for LocalControl {
    fn signal(&self, signal: RankSignal) -> BoxFuture<'_, io::Result<()>> {
        // After the leader is reaped only SIGKILL still goes out, to clear the
        // processes it left in its group. The group id cannot be reused while
        // any of them lives, and an empty group gives ESRCH.
        let result = if self.reaped.load(Ordering::Acquire) && signal != RankSignal::Kill {
            Ok(())
        } else {
            match killpg(self.group, signal.as_nix()) {
                Ok(()) | Err(nix::errno::Errno::ESRCH) => Ok(()),
                // macOS reports EPERM for a group whose members are all zombies.
                Err(nix::errno::Errno::EPERM) if self.reaped.load(Ordering::Acquire) => Ok(()),
                Err(errno) => Err(io::Error::from(errno)),
            }
        };
        Box::pin(async move { result })
    }
}
