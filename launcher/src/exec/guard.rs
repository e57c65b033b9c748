//! The guard: a helper process that stops local ranks when the launcher dies
//! without tearing the job down (SIGKILL, the OOM killer, a crash).
//!
//! The launcher starts the guard before its first local rank and keeps a pipe
//! to its stdin. It writes `+PGID` when a rank's process group starts,
//! `-PGID` once the group is empty, and `done` once it has also stopped the
//! processes that left their groups (see [`super::job_marker`]). The kernel
//! closes the pipe however the launcher ends, so the guard reads end-of-file
//! then. Groups still listed at that point lost their launcher: the guard
//! sends them SIGTERM, and SIGKILL after the grace period, as the launcher's
//! own teardown does. Without `done`, it then stops the job's marked
//! processes the same way.
//!
//! After a normal exit every group was removed and `done` was sent, so the
//! guard exits at once.

use std::collections::BTreeSet;
use std::ffi::OsString;
use std::io::{self, BufRead, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use nix::sys::signal::{killpg, signal, SigHandler, Signal};
use nix::unistd::Pid;

use super::job_marker;
use super::local::group_alive;

/// First argument that makes the `ringleader` binary run as a guard.
pub const GUARD_SUBCOMMAND: &str = "__guard";

/// How often the guard checks whether the groups it stopped are gone.
const POLL: Duration = Duration::from_millis(20);

/// How long the guard waits for SIGKILLed groups to be gone.
const KILL_SETTLE: Duration = Duration::from_secs(2);

/// The launcher's end of a running guard.
#[derive(Debug)]
pub struct Guard {
    stdin: Mutex<ChildStdin>,
    /// The guard's handle, never waited for: the guard ends on its own once
    /// the pipe closes, and outlives a launcher that is killed.
    _child: Child,
}

impl Guard {
    /// Starts `program __guard LAUNCHER_PID GRACE_SECONDS [JOB_ID]` in its own
    /// process group, so the terminal's Ctrl-C and Ctrl-Z reach only the
    /// launcher. `job_id` is the value of the job marker, if the job has one.
    pub fn start(program: &Path, grace: Duration, job_id: Option<&str>) -> io::Result<Guard> {
        let mut command = Command::new(program);
        command
            .arg(GUARD_SUBCOMMAND)
            .arg(std::process::id().to_string())
            .arg(grace.as_secs_f64().to_string())
            .args(job_id)
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit());
        // `ps` shows the guard as `ringleader __guard ...` even when
        // `program` is /proc/self/exe.
        std::os::unix::process::CommandExt::arg0(&mut command, "ringleader");
        std::os::unix::process::CommandExt::process_group(&mut command, 0);
        let mut child = command.spawn()?;
        let stdin = child.stdin.take().expect("stdin is piped");
        Ok(Guard {
            stdin: Mutex::new(stdin),
            _child: child,
        })
    }

    /// Asks the guard to stop `group` if the launcher dies.
    pub fn watch(&self, group: i32) {
        self.send(&format!("+{group}\n"));
    }

    /// Tells the guard that `group` is empty and no longer its concern.
    pub fn release(&self, group: i32) {
        self.send(&format!("-{group}\n"));
    }

    /// Tells the guard that the launcher stopped every process of the job
    /// and removed its temporary files.
    pub fn done(&self) {
        self.send("done\n");
    }

    /// Asks the guard to remove the temporary file at `path` if the launcher
    /// dies before [`Guard::done`]. Paths with a newline cannot be sent and
    /// are skipped.
    pub fn remove_on_failure(&self, path: &Path) {
        match path.to_str() {
            Some(text) if !text.contains('\n') => self.send(&format!("file {text}\n")),
            _ => tracing::debug!(path = %path.display(), "the guard cannot take this path"),
        }
    }

    fn send(&self, line: &str) {
        let mut stdin = self.stdin.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        if let Err(error) = stdin.write_all(line.as_bytes()) {
            tracing::debug!(%error, "the guard process is gone; ranks will not be stopped if the launcher is killed");
        }
    }
}

/// Runs the guard: `args` are the arguments after [`GUARD_SUBCOMMAND`].
/// Returns the process's exit code.
pub fn run(args: &[OsString]) -> i32 {
    let text: Option<Vec<&str>> = args.iter().map(|arg| arg.to_str()).collect();
    let parsed = match text.as_deref() {
        Some([launcher, grace, job_id @ ..]) if job_id.len() <= 1 => launcher
            .parse::<u32>()
            .ok()
            .zip(grace.parse::<f64>().ok())
            .filter(|(_, grace)| grace.is_finite() && *grace >= 0.0)
            .map(|(launcher, grace)| (launcher, grace, job_id.first().copied())),
        _ => None,
    };
    let Some((launcher, grace, job_id)) = parsed else {
        report(&format!(
            "error: {GUARD_SUBCOMMAND} is internal to the launcher and expects LAUNCHER_PID GRACE_SECONDS [JOB_ID]"
        ));
        return crate::exit::USAGE;
    };
    let grace = Duration::from_secs_f64(grace);

    // The guard ends when its stdin does, not on the signals that end a
    // launcher, so it can still clean up after one.
    for signal_kind in [
        Signal::SIGINT,
        Signal::SIGTERM,
        Signal::SIGHUP,
        Signal::SIGQUIT,
        Signal::SIGTSTP,
        Signal::SIGTTIN,
        Signal::SIGTTOU,
        Signal::SIGPIPE,
    ] {
        // SAFETY: SIG_IGN installs no handler code.
        let _ = unsafe { signal(signal_kind, SigHandler::SigIgn) };
    }

    let messages = read_messages(io::stdin().lock());
    stop_orphaned_groups(launcher, &messages.groups, grace);
    if !messages.done {
        // Files of ranks that ended normally are gone already.
        for file in &messages.files {
            let _ = std::fs::remove_file(file);
        }
    }
    if let (Some(job_id), false) = (job_id, messages.done) {
        let escaped = job_marker::stop_job_processes_blocking(&job_marker::Selector::job(job_id), grace);
        if !escaped.is_empty() {
            report(&format!(
                "stopped {} process(es) of the job that had left their rank's process group",
                escaped.len()
            ));
        }
    }
    crate::exit::SUCCESS
}

/// The messages the launcher wrote to the guard before the pipe closed.
#[derive(Debug, Default, PartialEq)]
struct Messages {
    /// Groups added and not removed.
    groups: BTreeSet<i32>,
    /// Whether the launcher reported that it stopped every process of the job.
    done: bool,
    /// Temporary files of the job, removed unless `done` came.
    files: Vec<PathBuf>,
}

/// Reads `+PGID`, `-PGID`, `file PATH` and `done` lines until end-of-file.
/// Malformed lines are skipped.
fn read_messages(input: impl BufRead) -> Messages {
    let mut messages = Messages::default();
    let groups = &mut messages.groups;
    for line in input.lines() {
        let Ok(line) = line else { break };
        if line == "done" {
            messages.done = true;
            continue;
        }
        if let Some(path) = line.strip_prefix("file ").filter(|path| Path::new(path).is_absolute()) {
            messages.files.push(PathBuf::from(path));
            continue;
        }
        let (sign, number) = line.split_at(line.len().min(1));
        let Ok(group) = number.parse::<i32>() else {
            continue;
        };
        if group <= 1 {
            continue;
        }
        match sign {
            "+" => {
                groups.insert(group);
            }
            "-" => {
                groups.remove(&group);
            }
            _ => {}
        }
    }
    messages
}

/// Sends SIGTERM to every live group, then SIGKILL to those still alive
/// after `grace`.
fn stop_orphaned_groups(launcher: u32, groups: &BTreeSet<i32>, grace: Duration) {
    // NOTE: a group that emptied just before the launcher died, and whose
    // id a new process took within that moment, would be signalled too.
    // Group ids are not reused while any member lives, so this needs a
    // group that was already empty and an id reused within milliseconds.
    let mut alive: Vec<Pid> = groups.iter().map(|&group| Pid::from_raw(group)).filter(|&group| group_alive(group)).collect();
    if alive.is_empty() {
        return;
    }
    for &group in &alive {
        let _ = killpg(group, Signal::SIGTERM);
    }
    report(&format!(
        "the launcher (pid {launcher}) ended without stopping its ranks; sent SIGTERM to {} rank process group(s)",
        alive.len()
    ));

    let deadline = Instant::now() + grace;
    loop {
        alive.retain(|&group| group_alive(group));
        if alive.is_empty() {
            return;
        }
        if Instant::now() >= deadline {
            break;
        }
        std::thread::sleep(POLL);
    }
    for &group in &alive {
        let _ = killpg(group, Signal::SIGKILL);
    }
    report(&format!(
        "{} rank process group(s) outlived the grace period of {:?}; sent SIGKILL",
        alive.len(),
        grace
    ));
    // Processes take a moment to die after SIGKILL. The search for escaped
    // processes that follows would otherwise count them.
    let deadline = Instant::now() + KILL_SETTLE;
    while alive.iter().any(|&group| group_alive(group)) && Instant::now() < deadline {
        std::thread::sleep(POLL);
    }
}

/// Writes one line to stderr. A closed stderr must not stop the cleanup, so
/// write errors are ignored (`eprintln!` would panic).
fn report(message: &str) {
    let _ = writeln!(io::stderr(), "ringleader: {message}");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn groups_added_and_not_removed_remain() {
        let messages = read_messages("+100\n+200\n-100\n+300\n".as_bytes());
        assert_eq!(messages.groups, BTreeSet::from([200, 300]));
        assert!(!messages.done);
    }

    #[test]
    fn malformed_and_dangerous_lines_are_skipped() {
        // 0, 1 and negative ids would signal the launcher's own group, init
        // or every process, so they never enter the set.
        let messages = read_messages("+0\n+1\n+-5\nhello\n\n+\n*42\n+77\ndone!\n".as_bytes());
        assert_eq!(messages.groups, BTreeSet::from([77]));
        assert!(!messages.done);
    }

    #[test]
    fn done_is_recorded() {
        let messages = read_messages("+5\n-5\ndone\n".as_bytes());
        assert_eq!(messages, Messages { groups: BTreeSet::new(), done: true, files: Vec::new() });
    }

    #[test]
    fn only_absolute_file_paths_are_kept() {
        let messages = read_messages("file /tmp/ringleader-a\nfile relative\nfile \n".as_bytes());
        assert_eq!(messages.files, [PathBuf::from("/tmp/ringleader-a")]);
    }

    #[test]
    fn unterminated_last_line_counts() {
        assert_eq!(read_messages("+12".as_bytes()).groups, BTreeSet::from([12]));
    }
}
