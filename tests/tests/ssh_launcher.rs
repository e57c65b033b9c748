//! Jobs on ssh hosts through the real `ringleader` binary, against the
//! loopback sshd fixture: every host alias reaches the same sshd, so the
//! "remote" ranks are processes on this machine that the test can inspect.

mod common;

use std::path::PathBuf;
use std::time::Duration;

use common::sshd::{Sshd, CLOSED_PORT_ALIAS, HOST_ALIASES};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use ringleader_tests::{
    drain_stderr, finish, lines_of, processes_with, read_until, ringleader, run, start,
    survivors_after, unique_marker,
};

/// Grace period the tests pass to the launcher.
const GRACE_SECONDS: &str = "1";

/// Upper bound for remote ranks to disappear after the launcher or a rank
/// failed: the grace period plus a margin for a loaded machine.
const TEARDOWN_BOUND: Duration = Duration::from_secs(8);

/// Writes a JSON hostfile with one entry per alias, all ring addresses on loopback.
fn hostfile(sshd: &Sshd, aliases: &[&str]) -> PathBuf {
    let hosts: Vec<String> = aliases
        .iter()
        .map(|alias| format!(r#"{{"ssh": "{alias}", "ips": ["127.0.0.1"]}}"#))
        .collect();
    let path = sshd
        .dir()
        .join(format!("hostfile-{}.json", unique_marker("hosts")));
    std::fs::write(&path, format!("[{}]", hosts.join(", "))).expect("write the hostfile");
    path
}

/// Builds a `ringleader` command for `aliases` with the fixture's ssh config.
fn remote_job(
    sshd: &Sshd,
    aliases: &[&str],
    extra: &[&str],
    script: &str,
) -> std::process::Command {
    let config = sshd.config_file();
    let hostfile = hostfile(sshd, aliases);
    let mut command = ringleader(["--hostfile"]);
    command
        .arg(&hostfile)
        .arg("--ssh-config")
        .arg(&config)
        .args(["--grace", GRACE_SECONDS, "--keepalive", "1"])
        .args(extra)
        .args(["--", "sh", "-c", script]);
    command
}

#[test]
fn job_runs_on_every_ssh_host() {
    let sshd = Sshd::start();
    let script = r#"test -s "$MLX_HOSTFILE" && echo "rank $MLX_RANK of $MLX_WORLD_SIZE""#;

    let output = run(&mut remote_job(&sshd, &HOST_ALIASES, &[], script), b"");

    assert_eq!(output.code(), Some(0), "{}", output.stderr_text());
    let stdout = output.stdout_text();
    for rank in 0..HOST_ALIASES.len() {
        assert!(
            stdout.contains(&format!("rank {rank} of {}\n", HOST_ALIASES.len())),
            "rank {rank} missing from {stdout:?}"
        );
    }
}

#[test]
fn failing_remote_rank_stops_the_others() {
    let sshd = Sshd::start();
    let marker = unique_marker("ssh-failure");
    let env = format!("TEST_MARKER={marker}");
    let script =
        r#"if [ "$MLX_RANK" = 2 ]; then sleep 1; exit 7; fi; sleep 300 & echo ready; wait"#;

    let output = run(
        &mut remote_job(
            &sshd,
            &HOST_ALIASES,
            &["--stdin", "none", "--env", &env],
            script,
        ),
        b"",
    );

    assert_eq!(output.code(), Some(7), "{}", output.stderr_text());
    assert!(
        output.stderr_text().contains("rank 2"),
        "{}",
        output.stderr_text()
    );
    assert_eq!(survivors_after(&marker, TEARDOWN_BOUND), Vec::<u32>::new());
}

#[test]
fn interrupted_launcher_stops_remote_ranks() {
    let sshd = Sshd::start();
    let marker = unique_marker("ssh-interrupt");
    let env = format!("TEST_MARKER={marker}");
    let mut child = start(&mut remote_job(
        &sshd,
        &HOST_ALIASES[..3],
        &["--stdin", "none", "--env", &env],
        "sleep 300 & echo ready; wait",
    ));
    let mut lines = lines_of(child.stdout.take().unwrap());
    read_until(&mut lines, "ready", 3);
    assert!(
        processes_with(&marker).len() >= 6,
        "every remote rank and its child carry the marker"
    );

    kill(Pid::from_raw(child.id() as i32), Signal::SIGINT).unwrap();
    let output = finish(child);

    assert_eq!(output.code(), Some(130), "{}", output.stderr_text());
    assert_eq!(survivors_after(&marker, TEARDOWN_BOUND), Vec::<u32>::new());
}

/// Ctrl-C on a terminal sends SIGINT to the launcher's whole foreground
/// process group, not only to the launcher.
#[test]
fn ctrl_c_on_the_terminal_interrupts_remote_ranks() {
    use std::os::unix::process::CommandExt;

    let sshd = Sshd::start();
    let marker = unique_marker("ssh-ctrl-c");
    let env = format!("TEST_MARKER={marker}");
    let mut command = remote_job(
        &sshd,
        &HOST_ALIASES[..2],
        &["--stdin", "none", "--env", &env],
        "trap 'echo got INT; exit 5' INT; echo ready; while :; do sleep 0.1; done",
    );
    command.process_group(0);
    let mut child = start(&mut command);
    let mut lines = lines_of(child.stdout.take().unwrap());
    read_until(&mut lines, "ready", 2);

    nix::sys::signal::killpg(Pid::from_raw(child.id() as i32), Signal::SIGINT).unwrap();
    let rest: Vec<String> = lines.collect();
    let output = finish(child);

    assert_eq!(output.code(), Some(130), "{}", output.stderr_text());
    assert_eq!(rest.iter().filter(|line| *line == "got INT").count(), 2, "{rest:?}");
    assert!(!output.stderr_text().contains("exit code 255"), "{}", output.stderr_text());
    assert_eq!(survivors_after(&marker, TEARDOWN_BOUND), Vec::<u32>::new());
}

/// Teardown must not wait for a host that never completes the ssh handshake,
/// nor report a rank that never started as possibly alive.
#[test]
fn teardown_abandons_a_rank_still_connecting() {
    let sshd = Sshd::start();
    // The kernel completes connections into the backlog; nothing ever reads them.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = silent.local_addr().unwrap().port();
    let hostfile = sshd.dir().join(format!("hostfile-{}.json", unique_marker("silent")));
    let hosts = format!(
        r#"[{{"ssh": "host-a", "ips": ["127.0.0.1"]}}, {{"ssh": "host-b", "port": {port}, "ips": ["127.0.0.1"]}}]"#
    );
    std::fs::write(&hostfile, hosts).unwrap();
    let mut command = ringleader(["--hostfile"]);
    command
        .arg(&hostfile)
        .arg("--ssh-config")
        .arg(sshd.config_file())
        .args(["--grace", GRACE_SECONDS, "--connect-timeout", "60", "--timeout", "1"])
        .args(["--", "sh", "-c", "echo up; exec sleep 300"]);

    let output = run(&mut command, b"");

    let stderr = output.stderr_text();
    assert_eq!(output.code(), Some(124), "{stderr}");
    assert!(output.elapsed < Duration::from_secs(10), "teardown took {:?}", output.elapsed);
    assert!(stderr.contains("rank 1 on host-b: never started, stopped by --timeout"), "{stderr}");
    assert!(!stderr.contains("NOT confirmed"), "{stderr}");
}

#[test]
fn killed_launcher_leaves_no_remote_rank() {
    let sshd = Sshd::start();
    let marker = unique_marker("ssh-sigkill");
    let env = format!("TEST_MARKER={marker}");
    let mut child = start(&mut remote_job(
        &sshd,
        &HOST_ALIASES,
        &["--stdin", "none", "--env", &env],
        "sleep 300 & echo ready; wait",
    ));
    let stderr = drain_stderr(child.stderr.take().unwrap());
    let mut lines = lines_of(child.stdout.take().unwrap());
    read_until(&mut lines, "ready", HOST_ALIASES.len());
    assert!(processes_with(&marker).len() >= 2 * HOST_ALIASES.len());

    child.kill().expect("SIGKILL the launcher");
    child.wait().unwrap();
    println!("{}", String::from_utf8_lossy(&stderr.join().unwrap()));

    assert_eq!(survivors_after(&marker, TEARDOWN_BOUND), Vec::<u32>::new());
    let clean = sshd_sessions_end(&sshd, TEARDOWN_BOUND);
    assert!(clean, "sshd sessions left: {:?}", sshd.descendants());
}

#[test]
fn unreachable_host_fails_fast_naming_it() {
    let sshd = Sshd::start();

    let output = run(
        &mut remote_job(
            &sshd,
            &[HOST_ALIASES[0], CLOSED_PORT_ALIAS],
            &["--stdin", "none"],
            "sleep 300",
        ),
        b"",
    );

    let stderr = output.stderr_text();
    assert_ne!(output.code(), Some(0));
    assert!(stderr.contains(CLOSED_PORT_ALIAS), "{stderr}");
    assert!(stderr.contains("Connection refused"), "{stderr}");
    assert!(
        output.elapsed < Duration::from_secs(15),
        "{:?}",
        output.elapsed
    );
}

/// Polls until the fixture's sshd has no session processes left.
fn sshd_sessions_end(sshd: &Sshd, limit: Duration) -> bool {
    let deadline = std::time::Instant::now() + limit;
    loop {
        if sshd.descendants().is_empty() {
            return true;
        }
        if std::time::Instant::now() >= deadline {
            return false;
        }
        // Polling interval, not synchronisation: the deadline above bounds the wait.
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A relative --cwd names the same directory for ssh ranks as for local
/// ones: relative to where the launcher runs, not to the login directory.
#[test]
fn relative_cwd_is_resolved_where_the_launcher_runs() {
    let sshd = Sshd::start();
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("work")).unwrap();
    let mut command = remote_job(&sshd, &HOST_ALIASES[..1], &["--cwd", "work"], "pwd");
    command.current_dir(dir.path());
    let output = run(&mut command, b"");

    assert_eq!(output.code(), Some(0), "{}", output.stderr_text());
    let expected = dir.path().canonicalize().unwrap().join("work");
    assert_eq!(output.stdout_text().trim(), expected.to_str().unwrap());
}

/// A process that left a remote rank's process group keeps the ssh
/// session's output open. Once the rank ends, that process must be stopped,
/// because otherwise the launcher waits for it.
#[test]
fn detached_remote_process_is_stopped_with_its_rank() {
    let sshd = Sshd::start();
    let dir = tempfile::tempdir().unwrap();
    let marker = unique_marker("ssh-detached");
    let env = format!("TEST_MARKER={marker}");
    let dir_env = format!("DIR={}", dir.path().display());
    let script = r#"setsid sh -c 'echo $$ > "$DIR/escaped"; exec sleep 100' &
while [ ! -s "$DIR/escaped" ]; do sleep 0.01; done
echo rank done"#;
    let mut command = remote_job(&sshd, &HOST_ALIASES[..1], &["--stdin", "none", "--env", &env, "--env", &dir_env], script);
    let output = run(&mut command, b"");

    assert_eq!(output.code(), Some(0), "{}", output.stderr_text());
    assert_eq!(output.stdout_text(), "rank done\n");
    assert!(output.elapsed < Duration::from_secs(30), "the launcher waited for the detached process: {:?}", output.elapsed);
    assert_eq!(survivors_after(&marker, TEARDOWN_BOUND), Vec::<u32>::new());
}
