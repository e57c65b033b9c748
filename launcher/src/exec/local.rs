//! Local ranks: child processes of the launcher, each in its own process group.

use std::io::{self, Write};
use std::os::unix::process::ExitStatusExt;
use std::process::Stdio;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use nix::errno::Errno;
use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;
use tokio::process::Command;
use tokio::time::Instant;

use super::guard::Guard;
use super::job_marker::{self, MarkedProcess, Selector, JOB_ID_VAR};
use super::{BoxFuture, RankControl, RankSignal, RankSpec, SpawnError, Spawned, Spawner, Termination};

/// The variable that points MLX's ring backend at its address table.
const RING_TABLE_VAR: &str = "MLX_HOSTFILE";

/// How often [`RankControl::finish`] checks whether a rank's leftovers are gone.
const LEFTOVER_POLL: Duration = Duration::from_millis(20);

/// Starts ranks as child processes on this machine.
#[derive(Debug)]
pub struct LocalSpawner {
    /// Time leftovers of a rank get between SIGTERM and SIGKILL.
    grace: Duration,
    /// The program to start as the [`Guard`], if the spawner uses one.
    guard_program: Option<PathBuf>,
    /// The guard, started with the first rank; `None` inside when it failed to start.
    guard: OnceLock<Option<Arc<Guard>>>,
    /// The value of [`JOB_ID_VAR`] in every rank's environment.
    job_id: String,
    /// Set once a rank was started, so a job without local ranks skips the
    /// search for escaped processes.
    started: AtomicBool,
}

impl LocalSpawner {
    /// Creates a spawner without a guard: ranks of a launcher killed with
    /// SIGKILL keep running.
    pub fn new(grace: Duration) -> LocalSpawner {
        LocalSpawner {
            grace,
            guard_program: None,
            guard: OnceLock::new(),
            job_id: job_marker::new_job_id(),
            started: AtomicBool::new(false),
        }
    }

    /// Creates a spawner that also starts `program` (the `ringleader`
    /// binary) as a [`Guard`] with its first rank, so ranks are stopped
    /// even when the launcher dies without tearing them down.
    pub fn with_guard(grace: Duration, program: PathBuf) -> LocalSpawner {
        LocalSpawner {
            guard_program: Some(program),
            ..LocalSpawner::new(grace)
        }
    }

    /// Returns the value of [`JOB_ID_VAR`] the spawner gives its ranks.
    pub fn job_id(&self) -> &str {
        &self.job_id
    }

    fn guard(&self) -> Option<Arc<Guard>> {
        let program = self.guard_program.as_deref()?;
        let guard = self.guard.get_or_init(|| match Guard::start(program, self.grace, Some(&self.job_id)) {
            Ok(guard) => Some(Arc::new(guard)),
            Err(error) => {
                tracing::warn!(
                    %error,
                    program = %program.display(),
                    "cannot start the guard process; local ranks will keep running if the launcher is killed with SIGKILL"
                );
                None
            }
        });
        guard.clone()
    }

    /// Stops the processes of this spawner's ranks that left their rank's
    /// process group and are still running after the ranks ended: SIGTERM,
    /// then SIGKILL after the grace period. Call it once every rank was
    /// reaped. Returns the processes found (the launcher reports them).
    pub async fn stop_escaped(&self) -> Vec<MarkedProcess> {
        if !self.started.load(Ordering::Acquire) {
            return Vec::new();
        }
        let escaped = job_marker::stop_job_processes(&Selector::job(&self.job_id), self.grace).await;
        if let Some(Some(guard)) = self.guard.get() {
            guard.done();
        }
        escaped
    }
}

impl Default for LocalSpawner {
    /// Creates a spawner with the launcher's default grace period of 5 seconds.
    fn default() -> LocalSpawner {
        LocalSpawner::new(Duration::from_secs(5))
    }
}

impl Spawner for LocalSpawner {
    fn spawn<'a>(&'a self, spec: &'a RankSpec) -> BoxFuture<'a, Result<Spawned, SpawnError>> {
        Box::pin(async move {
            self.started.store(true, Ordering::Release);
            spawn_local(spec, self.grace, self.guard(), &self.job_id)
        })
    }
}

fn spawn_local(
    spec: &RankSpec,
    grace: Duration,
    guard: Option<Arc<Guard>>,
    job_id: &str,
) -> Result<Spawned, SpawnError> {
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
        .env(JOB_ID_VAR, job_id)
        .stdin(if spec.stdin { Stdio::piped() } else { Stdio::null() })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0);
    // SAFETY: the closure runs in the child between fork and exec and only
    // calls signal(2) and setrlimit(2), which are async-signal-safe.
    unsafe {
        command.pre_exec(|| {
            // Ranks run in background process groups. Ignoring SIGTTOU and
            // SIGTTIN lets a rank set terminal modes, and turns its reads of
            // the terminal into EIO, instead of stopping it forever.
            libc::signal(libc::SIGTTOU, libc::SIG_IGN);
            libc::signal(libc::SIGTTIN, libc::SIG_IGN);
            super::fd_limit::restore_in_child();
            Ok(())
        });
    }
    match (&spec.cwd, &spec.default_cwd) {
        (Some(cwd), _) => {
            command.current_dir(cwd);
        }
        (None, Some(dir)) if dir.is_dir() => {
            command.current_dir(dir);
        }
        _ => {}
    }

    // A launcher running inside another job's rank inherits that job's ring
    // table. MLX would join it, so a rank gets this job's table or none.
    let sets_hostfile = spec.env.iter().any(|(name, _)| name == RING_TABLE_VAR)
        || spec.files.iter().any(|file| file.env_var == RING_TABLE_VAR);
    if !sets_hostfile {
        command.env_remove(RING_TABLE_VAR);
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
        if let Some(guard) = &guard {
            guard.remove_on_failure(temp.path());
        }
        files.push(temp);
    }

    let mut child = command.spawn().map_err(|source| match source.kind() {
        io::ErrorKind::NotFound => SpawnError::CommandNotFound {
            command: program.clone(),
        },
        _ if source.raw_os_error() == Some(libc::ENOEXEC) => SpawnError::Other(format!(
            "cannot execute {program}: it is neither a binary for this machine nor a script starting with #!"
        )),
        _ => io_error(source),
    })?;
    let pid = child.id().expect("a child that was just spawned has not been reaped");
    let rank_value = spec.env.iter().rev().find(|(name, _)| name == "MLX_RANK").map(|(_, value)| value.as_str());
    if let Some(guard) = &guard {
        guard.watch(pid as i32);
    }
    let state = Arc::new(GroupState::default());

    let stdout = Box::new(child.stdout.take().expect("stdout is piped"));
    let stderr = Box::new(child.stderr.take().expect("stderr is piped"));
    let stdin = child.stdin.take().map(|s| Box::new(s) as super::ByteWriter);
    let wait_state = state.clone();
    let wait = Box::pin(async move {
        let status = child.wait().await;
        wait_state.reaped.store(true, Ordering::Release);
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
            rank: spec.rank,
            group: Pid::from_raw(pid as i32),
            state,
            grace,
            guard,
            escaped: rank_value.map(|rank| Selector::rank(job_id, rank)),
        }),
    })
}

/// State shared by the rank's control and its wait future.
#[derive(Debug, Default)]
struct GroupState {
    /// Set once the group leader has been reaped.
    reaped: AtomicBool,
    /// Set once the supervisor sent the group any signal.
    signalled: AtomicBool,
    /// Set once the supervisor sent the group SIGTERM or SIGKILL.
    terminated: AtomicBool,
}

/// Signals a local rank's process group.
struct LocalControl {
    rank: usize,
    /// Process group id, equal to the rank's pid since it leads its own group.
    group: Pid,
    state: Arc<GroupState>,
    grace: Duration,
    guard: Option<Arc<Guard>>,
    /// Selects the rank's processes by their variables; `None` when the rank
    /// has no `MLX_RANK` to tell its processes from other ranks'.
    escaped: Option<Selector>,
}

impl Drop for LocalControl {
    /// Releases the group from the guard once it is empty. A group that
    /// still has members stays with the guard, which stops it when the
    /// launcher exits.
    fn drop(&mut self) {
        if let Some(guard) = &self.guard {
            if self.state.reaped.load(Ordering::Acquire) && !group_alive(self.group) {
                guard.release(self.group.as_raw());
            }
        }
    }
}

impl RankControl for LocalControl {
    fn signal(&self, signal: RankSignal) -> BoxFuture<'_, io::Result<()>> {
        self.state.signalled.store(true, Ordering::Release);
        if signal != RankSignal::Interrupt {
            self.state.terminated.store(true, Ordering::Release);
        }
        // The group id cannot be reused while any member of the group lives,
        // so signalling it after the leader was reaped reaches only leftovers.
        // An empty group gives ESRCH.
        let result = match killpg(self.group, signal.as_nix()) {
            Ok(()) | Err(Errno::ESRCH) => Ok(()),
            // macOS reports EPERM for a group whose members are all zombies.
            Err(Errno::EPERM) if self.state.reaped.load(Ordering::Acquire) => Ok(()),
            Err(errno) => Err(io::Error::from(errno)),
        };
        Box::pin(async move { result })
    }

    fn finish(&self) -> BoxFuture<'_, ()> {
        Box::pin(async move {
            if !group_alive(self.group) {
                return;
            }
            // Leftovers that already got the supervisor's SIGTERM keep the
            // grace period it gave them; a second SIGTERM could interrupt
            // their shutdown. After a SIGINT they get SIGTERM: shells start
            // background jobs with SIGINT ignored.
            if !self.state.signalled.load(Ordering::Acquire) {
                tracing::warn!(
                    rank = self.rank,
                    group = %self.group,
                    "the rank ended but left processes in its process group; sending them SIGTERM (a job ends with its ranks)"
                );
                let _ = killpg(self.group, Signal::SIGTERM);
            } else if !self.state.terminated.load(Ordering::Acquire) {
                tracing::debug!(rank = self.rank, group = %self.group, "leftovers after SIGINT; sending them SIGTERM");
                let _ = killpg(self.group, Signal::SIGTERM);
            }
            let deadline = Instant::now() + self.grace;
            while group_alive(self.group) {
                if Instant::now() >= deadline {
                    tracing::warn!(rank = self.rank, group = %self.group, "the rank's leftover processes outlived the grace period; sending SIGKILL");
                    let _ = killpg(self.group, Signal::SIGKILL);
                    return;
                }
                tokio::time::sleep(LEFTOVER_POLL).await;
            }
        })
    }

    fn stop_escaped(&self) -> BoxFuture<'_, Vec<String>> {
        Box::pin(async move {
            let Some(selector) = &self.escaped else {
                return Vec::new();
            };
            let stopped = job_marker::stop_job_processes(selector, self.grace).await;
            stopped.iter().map(|process| format!("pid {} ({})", process.pid, process.command)).collect()
        })
    }
}

/// Returns whether any process of `group` is alive. Zombies do not count:
/// where nothing reaps orphans (PID 1 in some containers), they linger.
pub(crate) fn group_alive(group: Pid) -> bool {
    match killpg(group, None) {
        Err(_) => false,
        Ok(()) => !cfg!(target_os = "linux") || has_live_member(group),
    }
}

/// Scans /proc for a member of `group` that is not a zombie.
fn has_live_member(group: Pid) -> bool {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return true;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        if !name.to_string_lossy().bytes().all(|b| b.is_ascii_digit()) {
            continue;
        }
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
            continue;
        };
        // Fields after the command name: state, ppid, pgrp, ...
        let Some((_, rest)) = stat.rsplit_once(')') else {
            continue;
        };
        let mut fields = rest.split_whitespace();
        let state = fields.next();
        let pgrp = fields.nth(1).and_then(|f| f.parse::<i32>().ok());
        if pgrp == Some(group.as_raw()) && state != Some("Z") {
            return true;
        }
    }
    false
}
