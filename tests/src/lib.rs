//! Harness for the end-to-end tests: runs the real binaries, echoes what it
//! ran and what came back, and finds processes a test left behind.
//!
//! Every helper waits with one named, generous bound ([`HANG_LIMIT`]) whose
//! only job is to turn a hang into a failure.

use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStderr, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::sync::OnceLock;
use std::thread;
use std::time::{Duration, Instant};

/// Upper bound on anything a test waits for; reaching it means a hang.
pub const HANG_LIMIT: Duration = Duration::from_secs(120);

/// Returns the path of a binary of the `ringleader` package, building the
/// package's binaries once per test process so that tests never run a stale one.
pub fn bin(name: &str) -> PathBuf {
    static BUILT: OnceLock<PathBuf> = OnceLock::new();
    let dir = BUILT.get_or_init(|| {
        let workspace = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf();
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let status = Command::new(cargo)
            .args(["build", "--quiet", "-p", "ringleader", "--bins"])
            .current_dir(&workspace)
            .status()
            .expect("cargo can be started");
        assert!(status.success(), "building the ringleader binaries failed");
        let target = std::env::var_os("CARGO_TARGET_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| workspace.join("target"));
        let target = if target.is_relative() { workspace.join(target) } else { target };
        target.join("debug")
    });
    dir.join(name)
}

/// Builds a `ringleader` command with `args`.
pub fn ringleader<I, S>(args: I) -> Command
where
    I: IntoIterator<Item = S>,
    S: AsRef<std::ffi::OsStr>,
{
    let mut command = Command::new(bin("ringleader"));
    command.args(args).env("RINGLEADER_STARTING_PORT", test_port_base().to_string());
    // Inside a Slurm allocation the launcher would take its hosts from Slurm.
    for variable in ["SLURM_JOB_NODELIST", "SLURM_TASKS_PER_NODE", "SLURM_NTASKS_PER_NODE"] {
        command.env_remove(variable);
    }
    command
}

/// Picks a first ring port for one launch, so that concurrent tests do not find
/// each other's ports busy. Each launch gets a block of 64 ports below 32768,
/// outside Linux's default ephemeral range.
pub fn test_port_base() -> u16 {
    static COUNTER: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let n = COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let block = (std::process::id().wrapping_mul(7919).wrapping_add(n)) % 300;
    (12000 + block * 64) as u16
}

/// A finished command: its status and everything it wrote.
#[derive(Debug)]
pub struct Output {
    pub status: ExitStatus,
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
    pub elapsed: Duration,
}

impl Output {
    pub fn code(&self) -> Option<i32> {
        self.status.code()
    }

    pub fn stdout_text(&self) -> String {
        String::from_utf8_lossy(&self.stdout).into_owned()
    }

    pub fn stderr_text(&self) -> String {
        String::from_utf8_lossy(&self.stderr).into_owned()
    }
}

/// Runs `command` to completion with `stdin` as its input, echoing the
/// command, its output (abbreviated) and its status to the test log.
pub fn run(command: &mut Command, stdin: &[u8]) -> Output {
    let child = start(command);
    let mut child = child;
    let mut input = child.stdin.take().expect("stdin is piped");
    let stdin = stdin.to_vec();
    let feeder = thread::spawn(move || {
        let _ = input.write_all(&stdin);
    });
    let output = finish(child);
    feeder.join().unwrap();
    output
}

/// Starts `command` with piped stdin, stdout and stderr, echoing it to the test log.
pub fn start(command: &mut Command) -> Child {
    println!("$ {:?}", command);
    command
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("the command can be started")
}

/// Waits for a started command, collecting its output; panics after [`HANG_LIMIT`].
pub fn finish(mut child: Child) -> Output {
    let started = Instant::now();
    let stdout = child.stdout.take().map(collect);
    let stderr = child.stderr.take().map(collect);
    let status = wait_with_limit(&mut child, HANG_LIMIT);
    let output = Output {
        status,
        stdout: stdout.map(|t| t.join().unwrap()).unwrap_or_default(),
        stderr: stderr.map(|t| t.join().unwrap()).unwrap_or_default(),
        elapsed: started.elapsed(),
    };
    println!("--- stdout ({} bytes)\n{}", output.stdout.len(), abbreviate(&output.stdout));
    println!("--- stderr ({} bytes)\n{}", output.stderr.len(), abbreviate(&output.stderr));
    println!("--- {:?} after {:?}", output.status, output.elapsed);
    output
}

fn collect<R: Read + Send + 'static>(mut reader: R) -> thread::JoinHandle<Vec<u8>> {
    thread::spawn(move || {
        let mut bytes = Vec::new();
        let _ = reader.read_to_end(&mut bytes);
        bytes
    })
}

fn abbreviate(bytes: &[u8]) -> String {
    const SHOWN: usize = 4000;
    let text = String::from_utf8_lossy(bytes);
    if text.len() <= SHOWN {
        return text.into_owned();
    }
    let head: String = text.chars().take(SHOWN / 2).collect();
    let tail: String = text.chars().rev().take(SHOWN / 2).collect::<Vec<_>>().into_iter().rev().collect();
    format!("{head}\n[... {} bytes ...]\n{tail}", text.len() - SHOWN)
}

/// Waits for `child`, killing it and panicking if it runs past `limit`.
pub fn wait_with_limit(child: &mut Child, limit: Duration) -> ExitStatus {
    let pid = child.id();
    let (tx, rx) = mpsc::channel();
    let watchdog = thread::spawn(move || {
        if rx.recv_timeout(limit).is_err() {
            // The test is about to fail; make sure the hung command goes too.
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), nix::sys::signal::Signal::SIGKILL);
            return true;
        }
        false
    });
    let status = child.wait().expect("waiting for the child works");
    let _ = tx.send(());
    let hung = watchdog.join().unwrap();
    assert!(!hung, "command (pid {pid}) did not finish within {limit:?}");
    status
}

/// Reads lines from a child's stdout until one equals `expected` or
/// contains it; returns every line read so far.
pub fn read_until(lines: &mut impl Iterator<Item = String>, expected: &str, count: usize) -> Vec<String> {
    let mut seen = Vec::new();
    let mut matches = 0;
    for line in lines.by_ref() {
        if line.contains(expected) {
            matches += 1;
        }
        seen.push(line);
        if matches == count {
            return seen;
        }
    }
    panic!("output ended before {count} lines containing {expected:?}; got {seen:?}");
}

/// Turns a child's stdout or stderr into a line iterator that a test can
/// read while the child runs.
pub fn lines_of<R: Read + Send + 'static>(stdout: R) -> impl Iterator<Item = String> {
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            println!("> {line}");
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    std::iter::from_fn(move || rx.recv_timeout(HANG_LIMIT).ok())
}

/// Drains a child's stderr in the background.
pub fn drain_stderr(stderr: ChildStderr) -> thread::JoinHandle<Vec<u8>> {
    collect(stderr)
}

/// Returns a string unique to this test run, to tag processes a test starts.
pub fn unique_marker(prefix: &str) -> String {
    static COUNTER: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    format!("{prefix}-{}-{n}-{nanos}", std::process::id())
}

/// PIDs of live (not zombie) processes whose command line or environment
/// contains `marker`. Pass the marker to ranks with `--env`, and every
/// process they start carries it.
pub fn processes_with(marker: &str) -> Vec<u32> {
    let mut found = Vec::new();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return found;
    };
    for entry in entries.flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let mut text = std::fs::read(entry.path().join("cmdline")).unwrap_or_default();
        text.extend(std::fs::read(entry.path().join("environ")).unwrap_or_default());
        if !String::from_utf8_lossy(&text).contains(marker) {
            continue;
        }
        let state = std::fs::read_to_string(entry.path().join("stat")).unwrap_or_default();
        let zombie = state.rsplit_once(')').is_some_and(|(_, rest)| rest.trim_start().starts_with('Z'));
        if !zombie && pid != std::process::id() {
            found.push(pid);
        }
    }
    found
}

/// Waits until no live process carries `marker`, polling up to `limit`
/// (a SIGKILLed process takes a moment to disappear). Returns the survivors.
pub fn survivors_after(marker: &str, limit: Duration) -> Vec<u32> {
    let deadline = Instant::now() + limit;
    loop {
        let found = processes_with(marker);
        if found.is_empty() || Instant::now() >= deadline {
            return found;
        }
        // Polling interval, not synchronisation: the deadline above bounds the wait.
        thread::sleep(Duration::from_millis(10));
    }
}
