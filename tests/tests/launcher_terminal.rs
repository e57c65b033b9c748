//! The launcher as a job of an interactive shell, on a real pseudo-terminal.

use std::io::Write;
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};

use ringleader_tests::{bin, finish, test_port_base};

/// Runs `script` with bash's job control on, in a new session whose
/// controlling terminal is a fresh pseudo-terminal, also bash's stdin and
/// stderr (bash needs both for job control). `typed` is written to the
/// terminal as if typed on its keyboard. Only stdout is returned.
fn run_in_terminal(script: &str, typed: &[u8]) -> ringleader_tests::Output {
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
    let mut keyboard = std::fs::File::from(pty.master);
    keyboard.write_all(typed).expect("type on the terminal");
    // The master end stays open until bash is done, so the terminal exists
    // for the whole run.
    let output = finish(child);
    drop(keyboard);
    output
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
