//! Exit codes and teardown of local jobs, through the real `ringleader` binary.

use std::io::Write;
use std::time::Duration;

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use ringleader_tests::{drain_stderr, finish, lines_of, read_until, ringleader, run, start, survivors_after, unique_marker};

fn sh(script: &str) -> Vec<String> {
    vec!["sh".into(), "-c".into(), script.into()]
}

fn launch(args: &[&str], script: &str) -> ringleader_tests::Output {
    let mut command = ringleader(args);
    command.arg("--").args(sh(script));
    run(&mut command, b"")
}

#[test]
fn exit_code_of_failing_rank_is_returned() {
    let output = launch(&["-n", "3"], r#"if [ "$MLX_RANK" = 1 ]; then exit 7; fi; exec sleep 60"#);
    assert_eq!(output.code(), Some(7));
    let stderr = output.stderr_text();
    assert!(stderr.contains("rank 1 failed with exit code 7"), "{stderr}");
    assert!(stderr.contains("stopped after rank 1 failed"), "{stderr}");
}

#[test]
fn success_when_every_rank_exits_zero() {
    let output = launch(&["-n", "4"], "exit 0");
    assert_eq!(output.code(), Some(0));
    assert!(output.stderr.is_empty(), "{}", output.stderr_text());
}

#[test]
fn rank_killed_by_signal_gives_128_plus_signal() {
    for (signal, code) in [("KILL", 137), ("SEGV", 139), ("INT", 130), ("TERM", 143)] {
        let script = format!(r#"if [ "$MLX_RANK" = 0 ]; then kill -{signal} $$; fi; exec sleep 60"#);
        let output = launch(&["-n", "2"], &script);
        assert_eq!(output.code(), Some(code), "rank killed by SIG{signal}");
    }
}

#[test]
fn all_ranks_failing_at_once_never_exit_zero() {
    for attempt in 0..100 {
        let output = launch(&["-n", "4"], "exit 3");
        assert_eq!(output.code(), Some(3), "attempt {attempt}");
    }
}

#[test]
fn rank_exit_code_wins_over_the_sigterm_of_survivors() {
    let output = launch(&["-n", "2"], r#"if [ "$MLX_RANK" = 0 ]; then exit 5; fi; trap 'exit 9' TERM; sleep 60 & wait"#);
    assert_eq!(output.code(), Some(5));
}

#[test]
fn timeout_stops_the_job_with_124() {
    let marker = unique_marker("timeout");
    let env = format!("TEST_MARKER={marker}");
    let output = launch(&["-n", "2", "--timeout", "0.5", "--env", &env], "exec sleep 60");
    assert_eq!(output.code(), Some(124));
    assert!(output.elapsed < Duration::from_secs(20), "{:?}", output.elapsed);
    assert!(output.stderr_text().contains("--timeout"), "{}", output.stderr_text());
    assert_eq!(survivors_after(&marker, Duration::from_secs(5)), Vec::<u32>::new());
}

/// Starts ranks that each run `rank_script_prefix`, start a grandchild
/// tagged with `marker` and print "ready". Rank 1 exits 3 once it reads a
/// line from stdin.
fn start_job_with_grandchildren(extra: &[&str], marker: &str, rank_script_prefix: &str) -> std::process::Child {
    let script = format!(
        r#"{rank_script_prefix}
sleep 300 &
if [ "$MLX_RANK" = 1 ]; then echo ready; read line; exit 3; fi
echo ready
wait"#
    );
    let mut command = ringleader(["-n", "3", "--env", &format!("TEST_MARKER={marker}")]);
    command.args(extra).arg("--").args(sh(&script));
    start(&mut command)
}

#[test]
fn survivors_and_grandchildren_are_killed_after_failure() {
    let marker = unique_marker("grandchild");
    let mut child = start_job_with_grandchildren(&[], &marker, "");
    let mut lines = lines_of(child.stdout.take().unwrap());
    read_until(&mut lines, "ready", 3);
    assert!(ringleader_tests::processes_with(&marker).len() >= 6, "every rank and its grandchild carry the marker");

    child.stdin.take().unwrap().write_all(b"fail now\n").unwrap();
    let output = finish(child);
    assert_eq!(output.code(), Some(3));
    assert_eq!(survivors_after(&marker, Duration::from_secs(5)), Vec::<u32>::new());
}

#[test]
fn rank_ignoring_sigterm_is_killed_after_grace() {
    let marker = unique_marker("stubborn");
    let mut child = start_job_with_grandchildren(&["--grace", "1"], &marker, "trap '' TERM");
    let mut lines = lines_of(child.stdout.take().unwrap());
    read_until(&mut lines, "ready", 3);

    child.stdin.take().unwrap().write_all(b"fail now\n").unwrap();
    let output = finish(child);
    assert_eq!(output.code(), Some(3));
    assert!(output.elapsed >= Duration::from_millis(900), "SIGKILL came before the grace period ended: {:?}", output.elapsed);
    assert!(output.stderr_text().contains("sent SIGKILL"), "{}", output.stderr_text());
    assert_eq!(survivors_after(&marker, Duration::from_secs(5)), Vec::<u32>::new());
}

#[test]
fn launcher_signals_leave_no_process_behind() {
    for (signal, code) in [(Signal::SIGINT, 130), (Signal::SIGTERM, 143), (Signal::SIGHUP, 129)] {
        let marker = unique_marker("signalled");
        let mut command = ringleader(["-n", "3", "--stdin", "none", "--env", &format!("TEST_MARKER={marker}"), "--"]);
        command.args(sh("sleep 300 & echo ready; wait"));
        let mut child = start(&mut command);
        let mut lines = lines_of(child.stdout.take().unwrap());
        read_until(&mut lines, "ready", 3);

        kill(Pid::from_raw(child.id() as i32), signal).unwrap();
        let stderr = drain_stderr(child.stderr.take().unwrap());
        let status = ringleader_tests::wait_with_limit(&mut child, ringleader_tests::HANG_LIMIT);
        let stderr = String::from_utf8_lossy(&stderr.join().unwrap()).into_owned();
        println!("{signal}: {status:?}\n{stderr}");
        assert_eq!(status.code(), Some(code), "launcher got {signal}");
        assert!(stderr.contains(&format!("interrupted by {}", signal.as_str())), "{stderr}");
        assert_eq!(survivors_after(&marker, Duration::from_secs(5)), Vec::<u32>::new(), "after {signal}");
    }
}

#[test]
fn second_signal_kills_at_once() {
    let marker = unique_marker("second");
    let env = format!("TEST_MARKER={marker}");
    let mut command = ringleader(["-n", "2", "--grace", "100", "--stdin", "none", "--verbose", "--env", &env, "--"]);
    command.args(sh("trap '' INT TERM; sleep 300 & echo ready; wait"));
    let mut child = start(&mut command);
    let mut lines = lines_of(child.stdout.take().unwrap());
    let mut log = lines_of(child.stderr.take().unwrap());
    read_until(&mut lines, "ready", 2);

    // Two signals sent back to back may merge into one delivery, so the
    // second goes out only after the launcher logged the first, and after
    // the 250 ms in which the launcher takes the same signal as a repeat of
    // the first request.
    let pid = Pid::from_raw(child.id() as i32);
    kill(pid, Signal::SIGINT).unwrap();
    read_until(&mut log, "launcher received a signal", 1);
    std::thread::sleep(Duration::from_millis(400));
    kill(pid, Signal::SIGINT).unwrap();
    let output = finish(child);
    assert_eq!(output.code(), Some(130));
    assert!(output.elapsed < Duration::from_secs(30), "the second SIGINT did not kill at once");
    assert_eq!(survivors_after(&marker, Duration::from_secs(5)), Vec::<u32>::new());
}

/// GNU timeout sends SIGTERM to the launcher and then to its whole process
/// group, so the launcher gets the same signal twice at once.
#[test]
fn repeated_signal_keeps_grace_period() {
    let marker = unique_marker("repeat");
    let env = format!("TEST_MARKER={marker}");
    let mut command = ringleader(["-n", "2", "--grace", "30", "--stdin", "none", "--verbose", "--env", &env, "--"]);
    command.args(sh("trap 'sleep 0.5; echo saved; exit 0' TERM; echo ready; while :; do sleep 0.05; done"));
    let mut child = start(&mut command);
    let mut lines = lines_of(child.stdout.take().unwrap());
    let mut log = lines_of(child.stderr.take().unwrap());
    read_until(&mut lines, "ready", 2);

    let pid = Pid::from_raw(child.id() as i32);
    kill(pid, Signal::SIGTERM).unwrap();
    read_until(&mut log, "launcher received a signal", 1);
    kill(pid, Signal::SIGTERM).unwrap();
    let rest: Vec<String> = lines.collect();
    let log: Vec<String> = log.collect();
    let output = finish(child);

    assert_eq!(output.code(), Some(143));
    assert_eq!(rest.iter().filter(|line| *line == "saved").count(), 2, "{rest:?}\n{log:?}");
    assert!(!log.iter().any(|line| line.contains("SIGKILL")), "{log:?}");
    assert_eq!(survivors_after(&marker, Duration::from_secs(5)), Vec::<u32>::new());
}

/// Regression: the launcher used to SIGKILL a rank's whole group as soon as
/// the group leader died, cutting short a child's own SIGTERM handling.
#[test]
fn children_of_a_wrapper_get_the_grace_period() {
    let dir = tempfile::tempdir().unwrap();
    let saved = dir.path().join("saved");
    let inner = dir.path().join("inner.sh");
    std::fs::write(
        &inner,
        "trap 'sleep 0.3; echo saved > \"$OUT\"; exit 0' TERM\necho ready\nsleep 300 &\nwait\n",
    )
    .unwrap();
    let wrapper = format!("sh {}; echo unreachable", inner.display());
    let out = format!("OUT={}", saved.display());
    let mut command = ringleader(["--grace", "10", "--stdin", "none", "--env", &out, "--", "sh", "-c", &wrapper]);
    let mut child = start(&mut command);
    let mut lines = lines_of(child.stdout.take().unwrap());
    read_until(&mut lines, "ready", 1);

    kill(Pid::from_raw(child.id() as i32), Signal::SIGTERM).unwrap();
    let output = finish(child);
    assert_eq!(output.code(), Some(143));
    assert_eq!(std::fs::read_to_string(&saved).unwrap_or_default(), "saved\n", "the child's SIGTERM handler was cut short");
}

#[test]
fn background_leftovers_of_a_finished_rank_are_stopped() {
    let marker = unique_marker("leftover");
    let env = format!("TEST_MARKER={marker}");
    let output = launch(&["-n", "2", "--env", &env], "sleep 300 & echo done");
    assert_eq!(output.code(), Some(0));
    assert!(output.elapsed < Duration::from_secs(20), "{:?}", output.elapsed);
    assert_eq!(survivors_after(&marker, Duration::from_secs(5)), Vec::<u32>::new());
}

#[test]
fn killed_launcher_leaves_no_local_rank() {
    let marker = unique_marker("orphaned");
    let env = format!("TEST_MARKER={marker}");
    let mut command = ringleader(["-n", "3", "--grace", "1", "--stdin", "none", "--env", &env, "--"]);
    // Rank 2 and its child ignore SIGTERM, so only SIGKILL stops them.
    command.args(sh(r#"if [ "$MLX_RANK" = 2 ]; then trap '' TERM; fi; sleep 300 & echo "$MLX_HOSTFILE"; echo ready; wait"#));
    let mut child = start(&mut command);
    let mut lines = lines_of(child.stdout.take().unwrap());
    let printed = read_until(&mut lines, "ready", 3);
    let ring_tables: Vec<&String> = printed.iter().filter(|line| line.starts_with('/')).collect();
    assert_eq!(ring_tables.len(), 3, "{printed:?}");

    kill(Pid::from_raw(child.id() as i32), Signal::SIGKILL).unwrap();
    let output = finish(child);
    assert_eq!(output.code(), None, "the launcher was killed");
    assert_eq!(survivors_after(&marker, Duration::from_secs(10)), Vec::<u32>::new());
    for path in ring_tables {
        assert!(!std::path::Path::new(path).exists(), "{path} outlived its rank");
    }
    let stderr = output.stderr_text();
    assert!(stderr.contains("ended without stopping its ranks; sent SIGTERM to 3"), "{stderr}");
    assert!(stderr.contains("1 rank process group(s) outlived the grace period"), "{stderr}");
    // Rank 2's processes die in their group; none of them escaped it.
    assert!(!stderr.contains("had left their rank's process group"), "{stderr}");
}

#[test]
fn guard_exits_with_the_launcher() {
    let mut command = ringleader(["-n", "2", "--", "true"]);
    let child = start(&mut command);
    let guard_arguments = format!("__guard\0{}\0", child.id());
    let output = finish(child);
    assert_eq!(output.code(), Some(0));
    assert_eq!(survivors_after(&guard_arguments, Duration::from_secs(10)), Vec::<u32>::new());
    assert!(output.stderr.is_empty(), "{}", output.stderr_text());
}

/// A rank script that starts `sleep 300` in a session of its own, and
/// returns once that process has left the rank's process group. `prefix`
/// and `redirect` go before and after the `setsid` command.
fn escape_script(prefix: &str, redirect: &str) -> String {
    format!(
        r#"{prefix} setsid sh -c 'echo $$ > "$DIR/escaped-$MLX_RANK"; exec sleep 300' {redirect} &
while [ ! -s "$DIR/escaped-$MLX_RANK" ]; do sleep 0.01; done"#
    )
}

#[test]
fn escaped_process_is_stopped_after_the_job() {
    let dir = tempfile::tempdir().unwrap();
    let marker = unique_marker("escaped");
    let env = format!("TEST_MARKER={marker}");
    let dir_env = format!("DIR={}", dir.path().display());
    let output = launch(&["-n", "2", "--env", &env, "--env", &dir_env], &escape_script("", ""));

    assert_eq!(output.code(), Some(0), "{}", output.stderr_text());
    assert_eq!(survivors_after(&marker, Duration::from_secs(10)), Vec::<u32>::new());
    let stderr = output.stderr_text();
    assert_eq!(stderr.matches("had left the rank's process group").count(), 2, "{stderr}");
}

#[test]
fn process_without_job_id_may_outlive_the_job() {
    let dir = tempfile::tempdir().unwrap();
    let marker = unique_marker("opted-out");
    let env = format!("TEST_MARKER={marker}");
    let dir_env = format!("DIR={}", dir.path().display());
    let output = launch(&["--env", &env, "--env", &dir_env], &escape_script("env -u RINGLEADER_JOB_ID", ">/dev/null 2>&1"));

    let survivors = ringleader_tests::processes_with(&marker);
    for &pid in &survivors {
        let _ = kill(Pid::from_raw(pid as i32), Signal::SIGKILL);
    }
    assert_eq!(output.code(), Some(0), "{}", output.stderr_text());
    assert_eq!(survivors.len(), 1, "the process without the job id was stopped");
    assert!(output.stderr.is_empty(), "{}", output.stderr_text());
}

#[test]
fn killed_launcher_also_stops_escaped_processes() {
    let dir = tempfile::tempdir().unwrap();
    let marker = unique_marker("escaped-orphan");
    let env = format!("TEST_MARKER={marker}");
    let dir_env = format!("DIR={}", dir.path().display());
    let mut command = ringleader(["--stdin", "none", "--env", &env, "--env", &dir_env, "--"]);
    command.args(sh(&format!("{}\necho ready; exec sleep 300", escape_script("", ""))));
    let mut child = start(&mut command);
    let mut lines = lines_of(child.stdout.take().unwrap());
    read_until(&mut lines, "ready", 1);

    kill(Pid::from_raw(child.id() as i32), Signal::SIGKILL).unwrap();
    let output = finish(child);
    assert_eq!(output.code(), None, "the launcher was killed");
    assert_eq!(survivors_after(&marker, Duration::from_secs(10)), Vec::<u32>::new());
    let stderr = output.stderr_text();
    assert!(stderr.contains("stopped 1 process(es) of the job that had left"), "{stderr}");
}

#[test]
fn detached_process_is_stopped_at_job_end() {
    let dir = tempfile::tempdir().unwrap();
    let marker = unique_marker("detached");
    let env = format!("TEST_MARKER={marker}");
    let dir_env = format!("DIR={}", dir.path().display());
    let output = launch(&["--env", &env, "--env", &dir_env], &escape_script("", ">/dev/null 2>&1"));

    assert_eq!(output.code(), Some(0), "{}", output.stderr_text());
    assert_eq!(survivors_after(&marker, Duration::from_secs(10)), Vec::<u32>::new());
    let stderr = output.stderr_text();
    assert!(stderr.contains("had left its rank's process group and outlived the job"), "{stderr}");
}

/// Shells start background jobs with SIGINT ignored, so after a forwarded
/// SIGINT such leftovers need SIGTERM, not the whole grace period.
#[test]
fn interrupt_sends_sigterm_to_leftovers_ignoring_it() {
    let marker = unique_marker("int-leftover");
    let env = format!("TEST_MARKER={marker}");
    let mut command = ringleader(["--grace", "60", "--stdin", "none", "--env", &env, "--"]);
    command.args(sh("sleep 300 & echo ready; wait"));
    let mut child = start(&mut command);
    let mut lines = lines_of(child.stdout.take().unwrap());
    read_until(&mut lines, "ready", 1);

    kill(Pid::from_raw(child.id() as i32), Signal::SIGINT).unwrap();
    let output = finish(child);

    assert_eq!(output.code(), Some(130));
    assert!(output.elapsed < Duration::from_secs(30), "the leftover waited for the grace period: {:?}", output.elapsed);
    assert_eq!(survivors_after(&marker, Duration::from_secs(5)), Vec::<u32>::new());
}

/// A reader that stops reading (a pager, say) leaves the launcher's output
/// pipe full. Signals must still end the launcher, even though its summary
/// can no longer be written.
#[test]
fn stalled_output_pipe_ends_on_sigterm() {
    let dir = tempfile::tempdir().unwrap();
    let (_unread, pipe) = nix::unistd::pipe().unwrap();
    let script = r#"touch "$DIR/up-$MLX_RANK"; head -c 2000000 /dev/zero; exec sleep 100"#;
    let mut command = ringleader(["-n", "2", "--grace", "1", "--stdin", "none", "--env"]);
    command.arg(format!("DIR={}", dir.path().display())).arg("--").args(sh(script));
    command.stdout(std::fs::File::from(pipe.try_clone().unwrap())).stderr(std::fs::File::from(pipe));
    println!("$ {command:?}");
    let mut child = command.spawn().unwrap();
    let launcher = Pid::from_raw(child.id() as i32);

    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while !(0..2).all(|rank| dir.path().join(format!("up-{rank}")).exists()) && std::time::Instant::now() < deadline {
        // Polling interval, not synchronisation: the deadline bounds the wait.
        std::thread::sleep(Duration::from_millis(10));
    }
    // Each signal past the repeat window is a new request; the launcher
    // must end after a few, whatever it still had to write.
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break Some(status);
        }
        if std::time::Instant::now() >= deadline {
            let _ = kill(launcher, Signal::SIGKILL);
            let _ = child.wait();
            break None;
        }
        let _ = kill(launcher, Signal::SIGTERM);
        std::thread::sleep(Duration::from_millis(300));
    };
    assert_eq!(status.and_then(|status| status.code()), Some(143), "the launcher did not end on SIGTERM");
}
