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
            .args(["-b", "1K", "-e", "2M", "-f", "8", "-n", "2", "-w", "1", "--format", "csv"]),
        JOB_LIMIT,
    );
    assert!(finished.status.success(), "ringleader-bench failed");

    let lines: Vec<&str> = finished.stdout.lines().filter(|l| !l.starts_with("ranks,")).collect();
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
    std::fs::write(&hostfile, format!(r#"[["127.0.0.1:{base}"], ["127.0.0.1:{}"]]"#, base + 1)).unwrap();

    // Rank 0 alone, without a launcher: rank 1 never starts.
    let finished = run_with_limit(
        Command::new(launcher_bin("ringleader-bench"))
            .env("MLX_RANK", "0")
            .env("MLX_HOSTFILE", &hostfile)
            .env("RINGLEADER_RING_CONNECT_TIMEOUT", "1"),
        JOB_LIMIT,
    );
    assert_eq!(finished.status.code(), Some(3), "exit status for a ring failure");
    assert!(finished.stderr.contains("rank 1"), "{}", finished.stderr);
    assert!(finished.stderr.contains("RINGLEADER_RING_CONNECT_TIMEOUT"), "{}", finished.stderr);
    assert!(finished.elapsed.as_secs_f64() < 10.0, "gave up after {:?}", finished.elapsed);
}

#[test]
fn bench_help_explains_usage_and_units() {
    let finished = run_with_limit(Command::new(launcher_bin("ringleader-bench")).arg("--help"), JOB_LIMIT);
    assert!(finished.status.success());
    for expected in ["ringleader -n 2 -- ringleader-bench", "busbw_GBps", "--min-bytes", "--dtype", "Exit status"] {
        assert!(finished.stdout.contains(expected), "--help lacks {expected:?}");
    }
}
