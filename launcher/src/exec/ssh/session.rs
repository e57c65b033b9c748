//! One rank's ssh session: start it, find the start line, supervise the end.

use std::io;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::process::{Child, ChildStdout, Command};

use super::connection::{
    clip, collect_exit, control_path_option, describe_status, read_log, ssh_spawn_error, Agent,
    Pool, Session, SshExit,
};
use super::script::{self, RankParams, BOOTSTRAP, EXIT_COMMAND_NOT_FOUND};
use super::{lock, SshSessionError, UnconfirmedRank};
use crate::exec::{BoxFuture, RankControl, RankSignal, RankSpec, SpawnError, Spawned, Termination};

/// Maximum bytes of login-shell output accepted on stdout before the start line.
const MAX_BYTES_BEFORE_START: usize = 1 << 20;

/// Extra time, beyond the grace period, for the agent to confirm a stopped rank.
const CONFIRM_MARGIN: Duration = Duration::from_secs(3);

/// Starts one rank and returns once its command runs on the remote host.
pub(super) async fn start(pool: Arc<Pool>, spec: &RankSpec) -> Result<Spawned, SpawnError> {
    let invalid = |message: String| SpawnError::InvalidSpec {
        rank: spec.rank,
        host: spec.host.clone(),
        message,
    };
    // Checks the values before any connection opens; the real script needs the agent's directory.
    script::rank_script(spec, &placeholder_params(&pool)).map_err(invalid)?;

    let session = pool.acquire(spec).await?;
    let mut abandon_guard = AbandonGuard {
        agent: session.agent.clone(),
        rank: spec.rank,
        armed: true,
    };
    let rank_script = script::rank_script(
        spec,
        &RankParams {
            token: &pool.token,
            agent_dir: &session.agent.dir,
            grace: pool.options.grace,
            job_id: pool.options.job_id.as_deref(),
        },
    )
    .map_err(invalid)?;

    let log_path =
        pool.private_dir
            .path()
            .join(format!("rank-{}-{}.log", spec.rank, pool.next_id()));
    let mut child = ssh_command(&pool, spec, &session, &log_path)
        .spawn()
        .map_err(|source| SpawnError::Io {
            rank: spec.rank,
            host: spec.host.clone(),
            source,
        })?;

    let mut stdin = child.stdin.take().expect("stdin is piped");
    let mut stdout = child.stdout.take().expect("stdout is piped");
    let stderr = child.stderr.take().expect("stderr is piped");

    let started = async {
        stdin.write_all(&script::frame(&rank_script)).await.ok()?;
        read_start_line(&mut stdout, &pool.token).await
    };
    let start = match tokio::time::timeout(pool.start_deadline(), started).await {
        Ok(Some(start)) => start,
        Ok(None) => {
            let exit = collect_exit(&mut child, &log_path, stderr).await;
            return Err(start_error(spec, &pool.options, &exit));
        }
        Err(_) => {
            let _ = child.start_kill();
            let _ = child.wait().await;
            return Err(SpawnError::Ssh {
                rank: spec.rank,
                host: spec.host.clone(),
                message: format!(
                    "timed out after {} s waiting for the rank to start",
                    pool.start_deadline().as_secs()
                ),
            });
        }
    };
    drop(session.handshake);
    abandon_guard.armed = false;
    tracing::debug!(rank = spec.rank, host = %spec.host, pid = ?start.pid, "remote rank started");

    let stdin = if spec.stdin {
        Some(Box::new(stdin) as crate::exec::ByteWriter)
    } else {
        drop(stdin);
        None
    };
    let agent = session.agent.clone();
    let ended = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let ending = Ending {
        pool: pool.clone(),
        rank: spec.rank,
        host: spec.host.clone(),
        log_path,
        agent: agent.clone(),
        ended: ended.clone(),
    };
    let room = session.room;
    let wait = tokio::spawn(async move {
        let result = ending.wait(child).await;
        drop(room);
        result
    });

    Ok(Spawned {
        pid: start.pid,
        stdin,
        stdout: Box::new(std::io::Cursor::new(start.leftover).chain(stdout)),
        stderr: Box::new(stderr),
        wait: Box::pin(async move {
            wait.await.unwrap_or_else(|error| {
                Err(io::Error::other(format!("rank wait task failed: {error}")))
            })
        }),
        control: Box::new(SshRankControl {
            rank: spec.rank,
            host: spec.host.clone(),
            agent,
            ended,
            watchdog_bound: watchdog_bound(&pool),
        }),
    })
}

fn placeholder_params(pool: &Pool) -> RankParams<'_> {
    RankParams {
        token: &pool.token,
        agent_dir: "/tmp",
        grace: pool.options.grace,
        job_id: pool.options.job_id.as_deref(),
    }
}

/// Upper bound on the time the remote agent takes to stop a rank once the launcher is gone.
fn watchdog_bound(pool: &Pool) -> Duration {
    let options = &pool.options;
    options.keepalive_interval * (options.keepalive_count_max.max(1) + 1) + options.grace
}

fn ssh_command(pool: &Pool, spec: &RankSpec, session: &Session, log_path: &PathBuf) -> Command {
    let mut command = Command::new(&pool.options.program);
    if let Some(path) = &session.control_path {
        command
            .args(["-o", "ControlMaster=no", "-o"])
            .arg(control_path_option(path));
    }
    command
        .args(&pool.common_args)
        .args(&session.host_args)
        .arg("-E")
        .arg(log_path)
        .args(["-T", "--"])
        .arg(&spec.host)
        .arg(BOOTSTRAP)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        // Out of the launcher's process group, so Ctrl-C on the terminal
        // reaches the launcher, which forwards it, and not ssh itself.
        .process_group(0)
        // Only when the runtime shuts down: then the agent stops the remote side.
        .kill_on_drop(true);
    command
}

/// Classifies a rank that ended before its start line: ssh's own failure
/// (exit status 255 or a signal), or the remote setup's (any other status,
/// with the script's message on stderr).
fn start_error(spec: &RankSpec, options: &super::SshOptions, exit: &SshExit) -> SpawnError {
    match exit.code {
        Some(code) if code != 255 => {
            let detail = if exit.output.is_empty() {
                format!("the remote setup failed with exit status {code}")
            } else {
                format!("{} (exit status {code})", exit.output)
            };
            let hint = if code == EXIT_COMMAND_NOT_FOUND {
                "\nhint: check the command's path and PATH on that host"
            } else {
                ""
            };
            SpawnError::RemoteStart {
                rank: spec.rank,
                host: spec.host.clone(),
                message: format!("{detail}{hint}"),
            }
        }
        _ => ssh_spawn_error(spec, options, exit.ssh_message()),
    }
}

/// Stops the remote rank if `start` returns early or is cancelled after the
/// rank may have registered with the agent, for example on a start timeout.
struct AbandonGuard {
    agent: Arc<Agent>,
    rank: usize,
    /// False once the rank has started and the wait task owns its teardown.
    armed: bool,
}

impl Drop for AbandonGuard {
    fn drop(&mut self) {
        if self.armed {
            self.agent.request_stop(self.rank);
        }
    }
}

/// The start line and the bytes around it.
struct StartLine {
    pid: Option<u32>,
    /// Bytes read past the start line, or before it (login-shell output), for the rank's stdout.
    leftover: Vec<u8>,
}

/// Reads stdout up to the rank leader's `TOKEN PID` line. Returns `None` at EOF.
async fn read_start_line(stdout: &mut ChildStdout, token: &str) -> Option<StartLine> {
    let mut buffer = Vec::new();
    let mut chunk = [0u8; 8192];
    loop {
        if let Some(start) = find_start_line(&buffer, token) {
            return Some(start);
        }
        if buffer.len() > MAX_BYTES_BEFORE_START {
            return None;
        }
        let read = stdout.read(&mut chunk).await.ok()?;
        if read == 0 {
            return None;
        }
        buffer.extend_from_slice(&chunk[..read]);
    }
}

fn find_start_line(buffer: &[u8], token: &str) -> Option<StartLine> {
    let prefix = format!("{token} ");
    let mut line_start = 0;
    while let Some(offset) = buffer[line_start..].iter().position(|&byte| byte == b'\n') {
        let line_end = line_start + offset;
        let line = &buffer[line_start..line_end];
        if let Some(pid) = line.strip_prefix(prefix.as_bytes()) {
            let pid = std::str::from_utf8(pid)
                .ok()
                .and_then(|pid| pid.parse().ok());
            let mut leftover = buffer[..line_start].to_vec();
            leftover.extend_from_slice(&buffer[line_end + 1..]);
            return Some(StartLine { pid, leftover });
        }
        line_start = line_end + 1;
    }
    None
}

/// State the wait task needs to report how a rank ended.
struct Ending {
    pool: Arc<Pool>,
    rank: usize,
    host: String,
    log_path: PathBuf,
    agent: Arc<Agent>,
    /// Set once the rank's session has ended, so later signals are no-ops.
    ended: Arc<std::sync::atomic::AtomicBool>,
}

impl Ending {
    async fn wait(self, mut child: Child) -> io::Result<Termination> {
        let status = child.wait().await;
        self.ended.store(true, std::sync::atomic::Ordering::SeqCst);
        let status = status?;

        let log = read_log(&self.log_path);
        let _ = std::fs::remove_file(&self.log_path);
        if let Some(code) = status.code().filter(|&code| code != 255) {
            return Ok(termination_from_remote_status(code));
        }

        // Exit status 255 is either the rank's own or ssh's failure, and a
        // mux client whose master died exits 255 without logging. The agent
        // settles it: it confirms at once a rank that already ended, and
        // cannot reply over a connection that is gone.
        let confirmed_dead = self
            .agent
            .stop_and_confirm(self.rank, self.pool.options.grace + CONFIRM_MARGIN)
            .await;
        let quiet_exit = status.code() == Some(255) && log.trim().is_empty();
        if quiet_exit && confirmed_dead && self.agent.is_alive() {
            return Ok(Termination::Exited(255));
        }

        let mut detail = describe_status(status);
        if !log.trim().is_empty() {
            detail.push_str(": ");
            detail.push_str(&clip(&log));
        }
        if !confirmed_dead {
            lock(&self.pool.unconfirmed).push(UnconfirmedRank {
                rank: self.rank,
                host: self.host.clone(),
            });
        }
        let error = SshSessionError {
            rank: self.rank,
            host: self.host,
            detail,
            confirmed_dead,
            watchdog_bound: watchdog_bound(&self.pool),
        };
        tracing::debug!(%error, "rank session failed");
        Err(io::Error::other(error))
    }
}

/// Maps the remote shell's exit status back to how the rank ended: the
/// shell reports a child killed by signal N as 128+N.
fn termination_from_remote_status(code: i32) -> Termination {
    match code {
        129..=192 => Termination::Signaled(code - 128),
        _ => Termination::Exited(code),
    }
}

/// Signals a remote rank through its link's agent.
struct SshRankControl {
    rank: usize,
    host: String,
    agent: Arc<Agent>,
    ended: Arc<std::sync::atomic::AtomicBool>,
    watchdog_bound: Duration,
}

impl RankControl for SshRankControl {
    fn signal(&self, signal: RankSignal) -> BoxFuture<'_, io::Result<()>> {
        Box::pin(async move {
            if self.ended.load(std::sync::atomic::Ordering::SeqCst) {
                return Ok(());
            }
            let name = match signal {
                RankSignal::Interrupt => "INT",
                RankSignal::Terminate => "TERM",
                RankSignal::Kill => "KILL",
            };
            if self.agent.signal(self.rank, name) {
                Ok(())
            } else {
                Err(io::Error::new(
                    io::ErrorKind::NotConnected,
                    format!(
                        "rank {} on {}: cannot send SIG{name}: the ssh link is gone; the remote agent stops the rank within {} s",
                        self.rank,
                        self.host,
                        self.watchdog_bound.as_secs()
                    ),
                ))
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn start_line_is_cut_out_of_stdout() {
        let start = find_start_line(b"motd\nrlTOKEN 42\nrank output", "rlTOKEN").expect("found");
        assert_eq!(start.pid, Some(42));
        assert_eq!(start.leftover, b"motd\nrank output");
    }

    #[test]
    fn partial_start_line_is_not_accepted() {
        assert!(find_start_line(b"rlTOKEN 4", "rlTOKEN").is_none());
    }

    #[test]
    fn remote_status_above_128_means_signal() {
        assert_eq!(termination_from_remote_status(0), Termination::Exited(0));
        assert_eq!(termination_from_remote_status(3), Termination::Exited(3));
        assert_eq!(
            termination_from_remote_status(143),
            Termination::Signaled(15)
        );
        assert_eq!(
            termination_from_remote_status(255),
            Termination::Exited(255)
        );
    }
}
