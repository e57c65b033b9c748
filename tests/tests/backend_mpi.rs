//! The mpi backend against the system's Open MPI: ranks, exit codes,
//! option pass-through and teardown on a launcher signal.

mod common;

use std::time::Duration;

use common::sshd::Sshd;

use ringleader_tests::{finish, lines_of, read_until, ringleader, run, start, survivors_after, unique_marker};

/// Open MPI rejects running as root without this flag. The launcher never
/// adds it on its own, so the tests pass it the way users would.
fn root_args() -> Vec<&'static str> {
    if nix::unistd::geteuid().is_root() {
        vec!["--mpi-arg", "--allow-run-as-root"]
    } else {
        Vec::new()
    }
}

fn mpi_launch(args: &[&str]) -> std::process::Command {
    let mut all = vec!["--backend", "mpi"];
    all.extend(root_args());
    all.extend(args);
    let mut command = ringleader(all);
    command.env_remove("OMPI_ALLOW_RUN_AS_ROOT").env_remove("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM");
    command
}

#[test]
fn ranks_see_their_mpi_rank_env_and_cwd() {
    let dir = tempfile::tempdir().unwrap();
    let cwd = dir.path().to_str().unwrap();
    let script = r#"echo "rank=$OMPI_COMM_WORLD_RANK size=$OMPI_COMM_WORLD_SIZE value=$VALUE dir=$(pwd)""#;
    let output = run(
        &mut mpi_launch(&["-n", "3", "--cwd", cwd, "--env", "VALUE=two words", "--", "sh", "-c", script]),
        b"",
    );

    assert_eq!(output.code(), Some(0), "{}", output.stderr_text());
    let mut lines: Vec<String> = output.stdout_text().lines().map(str::to_string).collect();
    lines.sort();
    let expected: Vec<String> = (0..3)
        .map(|rank| format!("rank={rank} size=3 value=two words dir={cwd}"))
        .collect();
    assert_eq!(lines, expected);
}

#[test]
fn failing_rank_fails_the_launch_with_its_code() {
    let script = r#"if [ "$OMPI_COMM_WORLD_RANK" = 1 ]; then exit 7; fi; exit 0"#;
    let output = run(&mut mpi_launch(&["-n", "2", "--", "sh", "-c", script]), b"");

    assert_eq!(output.code(), Some(7));
    assert!(output.stderr_text().contains("ringleader: mpirun ended with exit code 7"), "{}", output.stderr_text());
}

#[test]
fn mpi_args_are_split_like_a_shell() {
    let output = run(
        &mut mpi_launch(&["--mpi-arg", "-x 'QUOTED=a b' -x \"SECOND=c'd\"", "--", "sh", "-c", "echo \"$QUOTED|$SECOND\""]),
        b"",
    );

    assert_eq!(output.code(), Some(0), "{}", output.stderr_text());
    assert_eq!(output.stdout_text(), "a b|c'd\n");
}

#[test]
fn sigterm_stops_mpirun_and_every_rank() {
    let marker = unique_marker("mpi-sigterm");
    let env = format!("TEST_MARKER={marker}");
    let mut child = start(&mut mpi_launch(&[
        "-n", "3", "--grace", "5", "--env", &env, "--", "sh", "-c", "echo up; exec sleep 60",
    ]));
    let mut lines = lines_of(child.stdout.take().unwrap());
    read_until(&mut lines, "up", 3);

    nix::sys::signal::kill(nix::unistd::Pid::from_raw(child.id() as i32), nix::sys::signal::Signal::SIGTERM).unwrap();
    let output = finish(child);

    assert_eq!(output.code(), Some(143));
    assert!(output.stderr_text().contains("received SIGTERM; forwarding it to mpirun"), "{}", output.stderr_text());
    assert!(output.elapsed < Duration::from_secs(30), "took {:?}", output.elapsed);
    assert_eq!(survivors_after(&marker, Duration::from_secs(10)), Vec::<u32>::new());
}

#[test]
fn sigint_and_sighup_are_forwarded_too() {
    use nix::sys::signal::Signal;
    for (signal, expected) in [(Signal::SIGINT, 130), (Signal::SIGHUP, 129)] {
        let marker = unique_marker("mpi-signal");
        let env = format!("TEST_MARKER={marker}");
        let mut child = start(&mut mpi_launch(&["-n", "2", "--env", &env, "--", "sh", "-c", "echo up; exec sleep 60"]));
        let mut lines = lines_of(child.stdout.take().unwrap());
        read_until(&mut lines, "up", 2);

        nix::sys::signal::kill(nix::unistd::Pid::from_raw(child.id() as i32), signal).unwrap();
        let output = finish(child);

        assert_eq!(output.code(), Some(expected), "{signal}");
        assert_eq!(survivors_after(&marker, Duration::from_secs(10)), Vec::<u32>::new(), "{signal}");
    }
}

#[test]
fn timeout_stops_mpirun_with_124() {
    let marker = unique_marker("mpi-timeout");
    let env = format!("TEST_MARKER={marker}");
    let output = run(&mut mpi_launch(&["-n", "2", "--timeout", "1", "--env", &env, "--", "sleep", "60"]), b"");

    assert_eq!(output.code(), Some(124));
    assert!(output.stderr_text().contains("--timeout expired"), "{}", output.stderr_text());
    assert_eq!(survivors_after(&marker, Duration::from_secs(10)), Vec::<u32>::new());
}

#[test]
fn missing_mpirun_is_a_usage_error() {
    let empty = tempfile::tempdir().unwrap();
    let mut command = mpi_launch(&["--", "true"]);
    command.env("PATH", empty.path());
    let output = run(&mut command, b"");

    assert_eq!(output.code(), Some(2));
    assert!(output.stderr_text().contains("mpirun not found in PATH"), "{}", output.stderr_text());
    assert!(output.stderr_text().contains("apt-get install openmpi-bin"), "{}", output.stderr_text());
}

#[test]
fn root_without_permission_gets_a_hint() {
    if !nix::unistd::geteuid().is_root() {
        println!("skipped: Open MPI's root check applies only to root");
        return;
    }
    let mut command = ringleader(["--backend", "mpi", "--", "true"]);
    command.env_remove("OMPI_ALLOW_RUN_AS_ROOT").env_remove("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM");
    let output = run(&mut command, b"");

    assert_eq!(output.code(), Some(2));
    assert!(output.stderr_text().contains("--mpi-arg --allow-run-as-root"), "{}", output.stderr_text());
}

#[test]
fn dry_run_shows_the_mpirun_command_and_hostfile() {
    let output = run(
        &mut ringleader([
            "--backend", "mpi", "--hosts", "n[1-2],n1", "-n", "2", "--cwd", "/srv", "--env", "A=1",
            "--mpi-arg", "--bind-to none", "--dry-run", "--json", "--", "python3", "train.py",
        ]),
        b"",
    );

    assert_eq!(output.code(), Some(0), "{}", output.stderr_text());
    let plan: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(plan["backend"], "mpi");
    assert_eq!(plan["mpi_hostfile"], "n1 slots=4\nn2 slots=2\n");
    let argv: Vec<&str> = plan["mpirun"].as_array().unwrap().iter().map(|a| a.as_str().unwrap()).collect();
    assert!(argv[0].ends_with("/mpirun"), "{argv:?}");
    let tail = ["-x", "A=1", "--bind-to", "none", "--", "python3", "train.py"];
    assert_eq!(&argv[argv.len() - tail.len()..], tail);
    assert!(argv.windows(2).any(|pair| pair == ["--wdir", "/srv"]), "{argv:?}");
    let hostfile_at = argv.iter().position(|a| *a == "--hostfile").expect("--hostfile is passed");
    assert_eq!(argv[hostfile_at + 1], "HOSTFILE");
    let ssh_args = ["--mca", "plm_rsh_args", "-o BatchMode=yes -o ConnectTimeout=10"];
    assert!(argv.windows(3).any(|triple| triple == ssh_args), "{argv:?}");
}

#[test]
fn unsupported_output_options_are_rejected() {
    for option in ["--tag-output", "--output-dir=/tmp/x"] {
        let output = run(&mut ringleader(["--backend", "mpi", option, "--", "true"]), b"");
        assert_eq!(output.code(), Some(2), "{option}");
        assert!(output.stderr_text().contains("the mpi backend does not support"), "{option}: {}", output.stderr_text());
    }
}

#[test]
fn killed_launcher_leaves_no_mpi_rank() {
    let marker = unique_marker("mpi-orphaned");
    let env = format!("TEST_MARKER={marker}");
    let mut child = start(&mut mpi_launch(&[
        "-n", "2", "--grace", "5", "--env", &env, "--", "sh", "-c", "echo up; exec sleep 300",
    ]));
    let mut lines = lines_of(child.stdout.take().unwrap());
    read_until(&mut lines, "up", 2);

    nix::sys::signal::kill(nix::unistd::Pid::from_raw(child.id() as i32), nix::sys::signal::Signal::SIGKILL).unwrap();
    let output = finish(child);

    assert_eq!(output.code(), None, "the launcher was killed");
    assert_eq!(survivors_after(&marker, Duration::from_secs(15)), Vec::<u32>::new());
    assert!(output.stderr_text().contains("ended without stopping its ranks"), "{}", output.stderr_text());
}

/// A process that a rank starts in a session of its own leaves mpirun's
/// process group. The job id it inherited still marks it for teardown.
#[test]
fn escaped_process_is_stopped_after_mpirun_ends() {
    let dir = tempfile::tempdir().unwrap();
    let marker = unique_marker("mpi-escaped");
    let env = format!("TEST_MARKER={marker}");
    let dir_env = format!("DIR={}", dir.path().display());
    let script = r#"setsid sh -c 'echo $$ > "$DIR/escaped-$OMPI_COMM_WORLD_RANK"; exec sleep 300' >/dev/null 2>&1 &
while [ ! -s "$DIR/escaped-$OMPI_COMM_WORLD_RANK" ]; do sleep 0.01; done"#;
    let output = run(&mut mpi_launch(&["-n", "2", "--env", &env, "--env", &dir_env, "--", "sh", "-c", script]), b"");

    assert_eq!(output.code(), Some(0), "{}", output.stderr_text());
    assert_eq!(survivors_after(&marker, Duration::from_secs(10)), Vec::<u32>::new());
    let stderr = output.stderr_text();
    assert_eq!(stderr.matches("had left mpirun's process group").count(), 2, "{stderr}");
}

/// mpirun logs in to ssh hosts with its own ssh; the launcher's --ssh-config
/// must reach it, or the fixture's host aliases do not resolve.
#[test]
fn ssh_config_reaches_mpiruns_ssh() {
    let sshd = Sshd::start();
    let config = sshd.config_file();
    let mut command = mpi_launch(&[
        "--hosts", "host-a,host-b", "--ssh-config", config.to_str().unwrap(), "--timeout", "60",
        "--", "sh", "-c", "echo rank=$OMPI_COMM_WORLD_RANK",
    ]);
    // Ranks on the "remote" hosts need the permission to run as root too.
    command.env("OMPI_ALLOW_RUN_AS_ROOT", "1").env("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1");
    let output = run(&mut command, b"");

    assert_eq!(output.code(), Some(0), "{}", output.stderr_text());
    let mut lines: Vec<String> = output.stdout_text().lines().map(str::to_string).collect();
    lines.sort();
    assert_eq!(lines, ["rank=0", "rank=1"]);
}
