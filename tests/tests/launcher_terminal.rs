//! The launcher as a job of an interactive shell, on a real pseudo-terminal.

use std::io::Write;
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};

use ringleader_tests::{bin, finish, lines_of, read_until, test_port_base};

/// Starts `script` with bash's job control on, in a new session whose
/// controlling terminal is a fresh pseudo-terminal, also bash's stdin and
/// stderr (bash needs both for job control). Returns bash, with its stdout
/// piped, and the terminal's master end: what is written there is typed on
/// the terminal's keyboard. The terminal exists while the master is open.
fn start_in_terminal(script: &str) -> (std::process::Child, std::fs::File) {
    let pty = nix::pty::openpty(None, None).expect("open a pseudo-terminal");
    let mut command = Command::new("bash");
    command
        .args(["-m", "-c", script])
        .env("RINGLEADER", bin("ringleader"))
        .env("RINGLEADER_STARTING_PORT", test_port_base().to_string())
        .stdin(Stdio::from(pty.slave.try_clone().unwrap()))
        .stdout(Stdio::piped())
        .stderr(Stdio::from(pty.slave.try_clone().unwrap()));
    // SAFETY: setsid and ioctl are async-signal-safe, as pre_exec requires.
    unsafe {
        command.pre_exec(|| {
            nix::unistd::setsid()?;
            if nix::libc::ioctl(nix::libc::STDIN_FILENO, nix::libc::TIOCSCTTY, 0) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    println!("$ {command:?}");
    let child = command.spawn().expect("start bash");
    (child, std::fs::File::from(pty.master))
}

/// Runs `script` as [`start_in_terminal`] does and types `typed` at once.
/// Only stdout is returned.
fn run_in_terminal(script: &str, typed: &[u8]) -> ringleader_tests::Output {
    let (child, mut keyboard) = start_in_terminal(script);
    keyboard.write_all(typed).expect("type on the terminal");
    let output = finish(child);
    drop(keyboard);
    output
}

/// Returns the fields of /proc/PID/stat that follow the command name: the
/// state letter first, then the parent's pid.
fn stat_fields(pid: u32) -> Vec<String> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("the process is alive");
    let after_name = stat.rsplit_once(')').expect("stat has a command name").1;
    after_name.split_whitespace().map(str::to_string).collect()
}

/// Returns the state letter of process `pid` (`T` when stopped by a signal).
fn process_state(pid: u32) -> char {
    stat_fields(pid)[0].chars().next().expect("stat has a state")
}

/// Polls until every process in `pids` is in `state`, or the limit passes.
fn wait_for_state(pids: &[u32], state: char) -> Vec<char> {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let states: Vec<char> = pids.iter().map(|&pid| process_state(pid)).collect();
        if states.iter().all(|&s| s == state) || std::time::Instant::now() >= deadline {
            return states;
        }
        // Polling interval, not synchronisation: the deadline bounds the wait.
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
}

/// Processes that a failed test would leave stopped or waiting, killed
/// when the test ends either way.
struct KillOnDrop(Vec<u32>);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        for &pid in &self.0 {
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), nix::sys::signal::Signal::SIGKILL);
        }
    }
}

/// Returns the parent process id of `pid`.
fn parent_of(pid: u32) -> u32 {
    stat_fields(pid)[1].parse().expect("the parent's pid is a number")
}

/// Ctrl-Z suspends the ranks with the launcher, and `fg` resumes them all.
#[test]
fn ctrl_z_suspends_ranks_until_fg() {
    let dir = tempfile::tempdir().unwrap();
    let go = dir.path().join("go");
    let script = format!(
        r#""$RINGLEADER" -n 2 -- sh -c 'echo "up $$"; while [ ! -e {go} ]; do sleep 0.01; done; echo "rank $MLX_RANK done"'
echo "suspended status=$?"
read -r _
fg
echo "final status=$?""#,
        go = go.display()
    );
    let (mut child, mut keyboard) = start_in_terminal(&script);
    let mut cleanup = KillOnDrop(vec![child.id()]);
    let mut lines = lines_of(child.stdout.take().unwrap());
    let pids: Vec<u32> = read_until(&mut lines, "up ", 2)
        .iter()
        .filter_map(|line| line.strip_prefix("up ")?.parse().ok())
        .collect();
    assert_eq!(pids.len(), 2, "both ranks printed their pid");
    cleanup.0.push(parent_of(pids[0]));
    cleanup.0.extend(&pids);

    keyboard.write_all(b"\x1a").expect("type Ctrl-Z");
    let seen = read_until(&mut lines, "suspended status=", 1);
    assert!(seen.iter().any(|line| line == "suspended status=148"), "{seen:?}");
    assert_eq!(wait_for_state(&pids, 'T'), vec!['T', 'T'], "ranks stopped with the launcher");

    std::fs::write(&go, b"").unwrap();
    keyboard.write_all(b"resume\n").expect("type a line");
    let rest: Vec<String> = lines.collect();
    let output = finish(child);
    drop(keyboard);

    assert_eq!(output.code(), Some(0));
    assert!(rest.iter().any(|line| line == "rank 0 done"), "{rest:?}");
    assert!(rest.iter().any(|line| line == "rank 1 done"), "{rest:?}");
    assert!(rest.iter().any(|line| line == "final status=0"), "{rest:?}");
}

/// `ringleader ... &` from an interactive shell: a background job must not
/// read the terminal, which would stop it with SIGTTIN.
#[test]
fn background_job_runs_to_the_end() {
    let script = r#""$RINGLEADER" -n 2 -- sh -c 'echo "rank $MLX_RANK done"' 2>/dev/null & wait $!; echo "status=$?""#;
    let output = run_in_terminal(script, b"");

    let stdout = output.stdout_text();
    assert!(stdout.contains("rank 0 done"), "{stdout}");
    assert!(stdout.contains("rank 1 done"), "{stdout}");
    assert!(stdout.contains("status=0"), "{stdout}");
}

/// In the foreground the launcher still forwards what is typed.
#[test]
fn foreground_job_reads_the_terminal() {
    let script = r#""$RINGLEADER" --stdin 0 -- sh -c 'read line; echo "got $line"'; echo "status=$?""#;
    let output = run_in_terminal(script, b"typed\n");
    assert_eq!(output.stdout_text(), "got typed\nstatus=0\n");
}
