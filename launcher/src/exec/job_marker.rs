//! The job marker: an environment variable that every local rank and every
//! process it starts inherits. Teardown signals process groups, so a process
//! that left its rank's group (`setsid`, a daemon's double fork) escapes it.
//! The marker finds such processes once the ranks are gone.
//!
//! A process that must outlive the job starts without the variable, for
//! example with `env -u RINGLEADER_JOB_ID`.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use nix::errno::Errno;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

/// The variable local ranks get, set to the job's id.
pub const JOB_ID_VAR: &str = "RINGLEADER_JOB_ID";

/// How often a stop checks whether the processes it signalled are gone.
const POLL: Duration = Duration::from_millis(20);

/// A live process found by its marker.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MarkedProcess {
    pub pid: Pid,
    /// The command line, with arguments separated by spaces.
    pub command: String,
}

/// Returns an id unique on this machine: the launcher's pid, the time and
/// a counter for ids made within one clock tick.
pub fn new_job_id() -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |since| since.as_nanos());
    let count = COUNTER.fetch_add(1, Ordering::Relaxed);
    format!("{}-{nanos:x}-{count}", std::process::id())
}

/// Selects processes by the variables they started with.
#[derive(Clone, Debug)]
pub struct Selector {
    /// Entries (`\0NAME=value\0`) that must all be present.
    entries: Vec<Vec<u8>>,
}

impl Selector {
    /// Selects every process of the job.
    pub fn job(job_id: &str) -> Selector {
        Selector {
            entries: vec![entry(JOB_ID_VAR, job_id)],
        }
    }

    /// Selects the processes of the job that inherited `MLX_RANK=<rank>`.
    pub fn rank(job_id: &str, rank: &str) -> Selector {
        Selector {
            entries: vec![entry(JOB_ID_VAR, job_id), entry("MLX_RANK", rank)],
        }
    }

    fn matches(&self, environ: &[u8]) -> bool {
        self.entries.iter().all(|entry| environ_contains(environ, entry))
    }
}

/// Lists the live processes (zombies excluded) that `selector` matches.
/// Only processes whose environment this process may read (its own user's)
/// are seen. Empty where there is no /proc.
pub fn processes_of_job(selector: &Selector) -> Vec<MarkedProcess> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    let own_pid = std::process::id();
    let mut found = Vec::new();
    for entry in entries.flatten() {
        let Some(pid) = entry.file_name().to_str().and_then(|name| name.parse::<u32>().ok()) else {
            continue;
        };
        if pid == own_pid {
            continue;
        }
        let Ok(environ) = std::fs::read(entry.path().join("environ")) else {
            continue;
        };
        if !selector.matches(&environ) || is_zombie(pid) {
            continue;
        }
        let cmdline = std::fs::read(entry.path().join("cmdline")).unwrap_or_default();
        let command = String::from_utf8_lossy(&cmdline).trim_end_matches('\0').replace('\0', " ");
        found.push(MarkedProcess {
            pid: Pid::from_raw(pid as i32),
            command,
        });
    }
    found
}

/// Formats a variable as a whole entry of /proc/PID/environ, between NUL bytes.
fn entry(name: &str, value: &str) -> Vec<u8> {
    format!("\0{name}={value}\0").into_bytes()
}

/// Checks for `entry` (from [`entry`]) in the NUL-separated `environ`,
/// whose first variable has no NUL before it.
fn environ_contains(environ: &[u8], entry: &[u8]) -> bool {
    environ.starts_with(&entry[1..]) || environ.windows(entry.len()).any(|window| window == entry)
}

fn is_zombie(pid: u32) -> bool {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return true;
    };
    stat.rsplit_once(')')
        .is_some_and(|(_, rest)| rest.trim_start().starts_with('Z'))
}

/// Sends SIGTERM to the processes `selector` matches, and SIGKILL to those
/// still alive after `grace`. Returns the processes that were found first.
/// The polling runs on a blocking thread, off the caller's event loop.
pub async fn stop_job_processes(selector: &Selector, grace: Duration) -> Vec<MarkedProcess> {
    let selector = selector.clone();
    tokio::task::spawn_blocking(move || stop_job_processes_blocking(&selector, grace))
        .await
        .unwrap_or_default()
}

/// Stops processes as [`stop_job_processes`] does, blocking the thread. The
/// guard process calls it directly.
pub fn stop_job_processes_blocking(selector: &Selector, grace: Duration) -> Vec<MarkedProcess> {
    let found = processes_of_job(selector);
    if found.is_empty() {
        return found;
    }
    signal_all(&found, Signal::SIGTERM);
    let deadline = std::time::Instant::now() + grace;
    loop {
        let alive = processes_of_job(selector);
        if alive.is_empty() {
            return found;
        }
        if std::time::Instant::now() >= deadline {
            signal_all(&alive, Signal::SIGKILL);
            return found;
        }
        std::thread::sleep(POLL);
    }
}

/// Sends `signal` to every live process that `selector` matches.
pub fn signal_job_processes(selector: &Selector, signal: Signal) {
    signal_all(&processes_of_job(selector), signal);
}

fn signal_all(processes: &[MarkedProcess], signal: Signal) {
    for process in processes {
        match kill(process.pid, signal) {
            Ok(()) | Err(Errno::ESRCH) => {}
            Err(error) => tracing::debug!(pid = %process.pid, %error, "cannot signal a process of the job"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn job_ids_differ() {
        assert_ne!(new_job_id(), new_job_id());
    }

    #[test]
    fn marker_must_match_a_whole_entry() {
        let entry = entry(JOB_ID_VAR, "42-abc");
        assert!(environ_contains(b"A=1\0RINGLEADER_JOB_ID=42-abc\0B=2\0", &entry));
        assert!(environ_contains(b"RINGLEADER_JOB_ID=42-abc\0B=2\0", &entry));
        assert!(!environ_contains(b"A=1\0RINGLEADER_JOB_ID=42-abcd\0", &entry));
        assert!(!environ_contains(b"A=1\0MY_RINGLEADER_JOB_ID=42-abc\0", &entry));
        assert!(!environ_contains(b"", &entry));
    }

    #[test]
    fn rank_selector_needs_both_variables() {
        let selector = Selector::rank("42-abc", "3");
        assert!(selector.matches(b"MLX_RANK=3\0RINGLEADER_JOB_ID=42-abc\0"));
        assert!(!selector.matches(b"MLX_RANK=31\0RINGLEADER_JOB_ID=42-abc\0"));
        assert!(!selector.matches(b"MLX_RANK=3\0"));
        assert!(Selector::job("42-abc").matches(b"MLX_RANK=31\0RINGLEADER_JOB_ID=42-abc\0"));
    }
}
