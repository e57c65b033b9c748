//! `ringleader-bench` launched by `ringleader`: it checks its results on
//! every rank and reports one line per size; it fails clearly when the ring
//! cannot form.

mod ring_support;

use std::process::Command;

use ring_support::launch::{launcher_bin, port_base, run_with_limit, JOB_LIMIT};

#[test]
fn bench_under_launcher_checks_and_reports_every_size() {
    let finished = run_with_limit(
        Command::new(launcher_bin("ringleader"))
            .args(["-n", "3", "--connections-per-ip", "2", "--starting-port"])
            .arg(port_base().to_string())
            .arg("--")
            .arg(launcher_bin("ringleader-bench"))
            .args([
                "-b", "1K", "-e", "2M", "-f", "8", "-n", "2", "-w", "1", "--format", "csv",
            ]),
        JOB_LIMIT,
    );
    assert!(finished.status.success(), "ringleader-bench failed");

    let lines: Vec<&str> = finished
        .stdout
        .lines()
        .filter(|l| !l.starts_with("ranks,"))
        .collect();
    // 1K, 8K, 64K, 512K for each of all_sum and all_gather.
    assert_eq!(lines.len(), 8, "{lines:?}");
    for line in &lines {
        let fields: Vec<&str> = line.split(',').collect();
        assert_eq!(fields[0], "3", "ranks column: {line}");
        assert_eq!(fields[1], "2", "connections column: {line}");
        assert_eq!(fields.last(), Some(&"ok"), "check column: {line}");
        let busbw: f64 = fields[8].parse().unwrap();
        assert!(busbw > 0.0, "busbw column: {line}");
    }
}

#[test]
fn bench_without_its_peer_fails_with_ring_error() {
    let dir = tempfile::tempdir().unwrap();
    let base = port_base();
    let hostfile = dir.path().join("hosts.json");
    std::fs::write(
        &hostfile,
        format!(r#"[["127.0.0.1:{base}"], ["127.0.0.1:{}"]]"#, base + 1),
    )
    .unwrap();

    // Rank 0 alone, without a launcher: rank 1 never starts.
    let finished = run_with_limit(
        Command::new(launcher_bin("ringleader-bench"))
            .env("MLX_RANK", "0")
            .env("MLX_HOSTFILE", &hostfile)
            .env("RINGLEADER_RING_CONNECT_TIMEOUT", "1"),
        JOB_LIMIT,
    );
    assert_eq!(
        finished.status.code(),
        Some(3),
        "exit status for a ring failure"
    );
    assert!(finished.stderr.contains("rank 1"), "{}", finished.stderr);
    assert!(
        finished.stderr.contains("RINGLEADER_RING_CONNECT_TIMEOUT"),
        "{}",
        finished.stderr
    );
    assert!(
        finished.elapsed.as_secs_f64() < 10.0,
        "gave up after {:?}",
        finished.elapsed
    );
}

#[test]
fn bench_help_explains_usage_and_units() {
    let finished = run_with_limit(
        Command::new(launcher_bin("ringleader-bench")).arg("--help"),
        JOB_LIMIT,
    );
    assert!(finished.status.success());
    for expected in [
        "ringleader -n 2 -- ringleader-bench",
        "busbw_GBps",
        "--min-bytes",
        "--dtype",
        "Exit status",
    ] {
        assert!(
            finished.stdout.contains(expected),
            "--help lacks {expected:?}"
        );
    }
}

/// Starts rank `rank` of a three-rank `ringleader-bench` job directly (no
/// launcher, so that nothing tears the survivors down on our behalf).
#[test]
fn bench_rejects_size_ranges_that_run_nothing() {
    for (args, expected) in [
        (["-b", "16M", "-e", "1K", "-d", "float32"], "--min-bytes 16777216 is larger than --max-bytes 1024"),
        (["-b", "3", "-e", "7", "-d", "float32"], "--min-bytes 3 is smaller than one float32 element (4 bytes)"),
        (["-b", "0", "-e", "0", "-d", "uint8"], "--min-bytes 0 is smaller than one uint8 element (1 byte)"),
    ] {
        let finished = run_with_limit(Command::new(launcher_bin("ringleader-bench")).args(args), JOB_LIMIT);
        assert_eq!(finished.status.code(), Some(2), "{args:?}");
        assert!(finished.stderr.contains(expected), "{args:?}: {}", finished.stderr);
    }
}

fn start_bench_rank(rank: usize, hostfile: &std::path::Path) -> std::process::Child {
    Command::new(launcher_bin("ringleader-bench"))
        .args(["-b", "64M", "-e", "64M", "-o", "all-sum", "-n", "100000"])
        .env("MLX_RANK", rank.to_string())
        .env("MLX_HOSTFILE", hostfile)
        .env("RINGLEADER_RING_CONNECT_TIMEOUT", "30")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("ringleader-bench starts")
}

#[test]
fn bench_survivors_exit_when_rank_is_killed() {
    use std::io::{BufRead, Read};
    use std::time::{Duration, Instant};

    let dir = tempfile::tempdir().unwrap();
    let base = port_base();
    let hostfile = dir.path().join("hosts.json");
    let table: Vec<String> = (0..3)
        .map(|r| format!(r#"["127.0.0.1:{}"]"#, base + r))
        .collect();
    std::fs::write(&hostfile, format!("[{}]", table.join(","))).unwrap();

    let mut ranks: Vec<_> = (0..3)
        .map(|rank| start_bench_rank(rank, &hostfile))
        .collect();

    // Rank 0 prints its header after a barrier, so every rank has joined the
    // ring; from then on each one spends nearly all its time in all_sum.
    let stdout = ranks[0].stdout.take().unwrap();
    let mut lines = std::io::BufReader::new(stdout).lines();
    let header = lines.next().expect("rank 0 prints a header").unwrap();
    println!("rank 0: {header}");
    assert!(header.contains("3 ranks"), "{header}");

    ranks[1].kill().unwrap();
    let killed_at = Instant::now();
    ranks[1].wait().unwrap();

    // Survivors must fail on their own, promptly, and say which peer went.
    const NOTICE_LIMIT: Duration = Duration::from_secs(20);
    for rank in [0, 2] {
        let status = loop {
            if let Some(status) = ranks[rank].try_wait().unwrap() {
                break status;
            }
            if killed_at.elapsed() > NOTICE_LIMIT {
                for child in &mut ranks {
                    let _ = child.kill();
                }
                panic!("rank {rank} still runs {NOTICE_LIMIT:?} after rank 1 was killed");
            }
            // Polling interval; NOTICE_LIMIT bounds the wait.
            std::thread::sleep(Duration::from_millis(20));
        };
        let mut stderr = String::new();
        ranks[rank]
            .stderr
            .take()
            .unwrap()
            .read_to_string(&mut stderr)
            .unwrap();
        println!(
            "rank {rank} ({status:?}) after {:?}: {stderr}",
            killed_at.elapsed()
        );
        assert_eq!(status.code(), Some(3), "rank {rank} exit status");
        assert!(
            stderr.contains("lost the connection to rank"),
            "rank {rank}: {stderr}"
        );
    }
}

#[test]
fn bench_with_empty_hostfile_runs_one_rank() {
    // mlx.launch writes an empty MLX_HOSTFILE for a single host.
    let dir = tempfile::tempdir().unwrap();
    let hostfile = dir.path().join("hosts.json");
    std::fs::write(&hostfile, "\n").unwrap();

    let finished = run_with_limit(
        Command::new(launcher_bin("ringleader-bench"))
            .args(["-b", "4K", "-e", "4K", "-n", "1", "--format", "csv"])
            .env("MLX_RANK", "0")
            .env("MLX_HOSTFILE", &hostfile),
        JOB_LIMIT,
    );
    assert!(finished.status.success(), "one-rank bench failed");
    assert!(
        finished.stdout.contains("\n1,0,float32,all_sum,4096,"),
        "{}",
        finished.stdout
    );
}

#[test]
fn bench_with_invalid_rank_names_the_variable() {
    let dir = tempfile::tempdir().unwrap();
    let hostfile = dir.path().join("hosts.json");
    std::fs::write(&hostfile, r#"[["127.0.0.1:1"], ["127.0.0.1:2"]]"#).unwrap();

    let finished = run_with_limit(
        Command::new(launcher_bin("ringleader-bench"))
            .env("MLX_RANK", "first")
            .env("MLX_HOSTFILE", &hostfile),
        JOB_LIMIT,
    );
    assert_eq!(
        finished.status.code(),
        Some(3),
        "exit status for a ring failure"
    );
    assert!(
        finished.stderr.contains("invalid MLX_RANK=\"first\""),
        "{}",
        finished.stderr
    );
}
