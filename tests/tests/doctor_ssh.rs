//! `ringleader doctor` against the loopback sshd: every row of the report,
//! with a planted busy port, a planted unassigned address and an
//! unreachable host each reported on the right row.

mod common;

use std::net::TcpListener;

use common::sshd::{Sshd, CLOSED_PORT_ALIAS};
use ringleader_tests::{ringleader, run, test_port_base, Output};

/// An address from TEST-NET-3 (RFC 5737), assigned to no interface here.
/// The probe only tries to bind it, and doctor never connects to it.
const UNASSIGNED_IP: &str = "203.0.113.77";

/// Runs doctor on `hosts`; `command` is the command to check, or options
/// followed by `--` and the command.
fn doctor(sshd: &Sshd, hosts: serde_json::Value, port: u16, command: &[&str]) -> Output {
    let dir = tempfile::tempdir().unwrap();
    let hostfile = dir.path().join("hosts.json");
    std::fs::write(&hostfile, hosts.to_string()).unwrap();
    let mut args = vec![
        "doctor".to_string(),
        "--hostfile".into(),
        hostfile.to_str().unwrap().into(),
        "--ssh-config".into(),
        sshd.config_file().to_str().unwrap().into(),
        "-p".into(),
        port.to_string(),
    ];
    if !command.contains(&"--") {
        args.push("--".into());
    }
    args.extend(command.iter().map(|a| a.to_string()));
    run(&mut ringleader(args), b"")
}

/// Returns the report rows whose check and subject match, as (result, detail).
fn rows<'a>(output: &'a str, check: &str, subject: &str) -> Vec<(&'a str, &'a str)> {
    output
        .lines()
        .skip(1)
        .filter_map(|line| {
            let rest = line.strip_prefix(check)?.trim_start();
            let rest = rest.strip_prefix(subject)?;
            let rest = rest.trim_start();
            let (result, detail) = rest.split_once(' ').unwrap_or((rest, ""));
            Some((result, detail.trim()))
        })
        .collect()
}

#[test]
fn healthy_cluster_passes_every_check() {
    let sshd = Sshd::start();
    let port = test_port_base();
    let hosts = serde_json::json!([
        {"ssh": "host-a", "ips": ["127.0.0.1"]},
        {"ssh": "host-b", "ips": ["127.0.0.1"]},
    ]);
    let output = doctor(&sshd, hosts, port, &["sh", "-c", "true"]);

    assert_eq!(output.code(), Some(0), "{}", output.stderr_text());
    let text = output.stdout_text();
    assert!(text.starts_with("CHECK"), "{text}");
    for (rank, host) in [(0, "host-a"), (1, "host-b")] {
        let subject = format!("rank {rank} ({host})");
        assert_eq!(rows(&text, "ssh", &subject), [("ok", "")]);
        assert_eq!(rows(&text, "clock", &subject).len(), 1);
        assert_eq!(rows(&text, "clock", &subject)[0].0, "ok");
        assert_eq!(rows(&text, "address", &subject), [("ok", "127.0.0.1")]);
        let address = format!("127.0.0.1:{}", port + rank);
        assert_eq!(rows(&text, "port", &subject), [("ok", address.as_str())]);
        let command = rows(&text, "command", &subject);
        assert_eq!(command.len(), 1);
        assert_eq!(command[0].0, "ok");
        assert!(command[0].1.ends_with("/sh"), "{command:?}");
    }
    let edge_to_1 = format!("127.0.0.1:{}", port + 1);
    let edge_to_0 = format!("127.0.0.1:{port}");
    assert_eq!(rows(&text, "edge", "rank 0 (host-a) -> rank 1 (host-b)"), [("ok", edge_to_1.as_str())]);
    assert_eq!(rows(&text, "edge", "rank 1 (host-b) -> rank 0 (host-a)"), [("ok", edge_to_0.as_str())]);
    assert!(output.stderr.is_empty(), "{}", output.stderr_text());
}

#[test]
fn busy_port_and_unassigned_address_rows() {
    let sshd = Sshd::start();
    let port = test_port_base();
    let busy = TcpListener::bind(("127.0.0.1", port + 1)).expect("plant a listener on rank 1's ring port");
    let hosts = serde_json::json!([
        {"ssh": "host-a", "ips": ["127.0.0.1"]},
        {"ssh": "host-b", "ips": ["127.0.0.1"]},
        {"ssh": "host-c", "ips": ["127.0.0.1", UNASSIGNED_IP]},
    ]);
    let output = doctor(&sshd, hosts, port, &["/bin/sh"]);
    drop(busy);

    assert_eq!(output.code(), Some(1));
    let text = output.stdout_text();
    let busy_detail = format!("127.0.0.1:{} is already in use", port + 1);
    assert_eq!(rows(&text, "port", "rank 1 (host-b)"), [("FAILED", busy_detail.as_str())]);
    assert_eq!(rows(&text, "port", "rank 0 (host-a)")[0].0, "ok");
    let unassigned = format!("{UNASSIGNED_IP} is not assigned to any interface on this host");
    assert_eq!(
        rows(&text, "address", "rank 2 (host-c)"),
        [("ok", "127.0.0.1"), ("FAILED", unassigned.as_str())]
    );
    let ports = rows(&text, "port", "rank 2 (host-c)");
    assert_eq!(ports[0].0, "ok");
    assert_eq!(ports[1].0, "skipped");
    assert_eq!(rows(&text, "edge", "rank 0 (host-a) -> rank 1 (host-b)")[0].0, "skipped");
    let edges_to_2 = rows(&text, "edge", "rank 1 (host-b) -> rank 2 (host-c)");
    assert_eq!(edges_to_2[0], ("ok", format!("127.0.0.1:{}", port + 2).as_str()));
    assert_eq!(edges_to_2[1].0, "skipped");
    assert_eq!(rows(&text, "edge", "rank 2 (host-c) -> rank 0 (host-a)")[0].0, "ok");

    let stderr = output.stderr_text();
    assert!(stderr.contains(&format!("rank 1 (host-b): port check failed: {busy_detail}")), "{stderr}");
    assert!(stderr.contains(&format!("rank 2 (host-c): address check failed: {unassigned}")), "{stderr}");
}

#[test]
fn unreachable_host_fails_ssh_row() {
    let sshd = Sshd::start();
    let port = test_port_base();
    let hosts = serde_json::json!([
        {"ssh": "host-a", "ips": ["127.0.0.1"]},
        {"ssh": CLOSED_PORT_ALIAS, "ips": ["127.0.0.1"]},
    ]);
    let output = doctor(&sshd, hosts, port, &[]);

    assert_eq!(output.code(), Some(1));
    let text = output.stdout_text();
    assert_eq!(rows(&text, "ssh", "rank 0 (host-a)"), [("ok", "")]);
    let failed = rows(&text, "ssh", &format!("rank 1 ({CLOSED_PORT_ALIAS})"));
    assert_eq!(failed.len(), 1);
    assert_eq!(failed[0].0, "FAILED");
    assert!(failed[0].1.contains("Connection refused"), "{failed:?}");
    assert_eq!(rows(&text, "edge", &format!("rank 0 (host-a) -> rank 1 ({CLOSED_PORT_ALIAS})"))[0].0, "skipped");
    assert_eq!(rows(&text, "edge", &format!("rank 1 ({CLOSED_PORT_ALIAS}) -> rank 0 (host-a)"))[0].0, "skipped");
    assert!(output.stderr_text().contains(&format!("rank 1 ({CLOSED_PORT_ALIAS}): ssh check failed")), "{}", output.stderr_text());
}

#[test]
fn missing_command_fails_per_rank() {
    let sshd = Sshd::start();
    let hosts = serde_json::json!([{"ssh": "host-a", "ips": ["127.0.0.1"]}]);
    let output = doctor(&sshd, hosts, test_port_base(), &["/nonexistent/train"]);

    assert_eq!(output.code(), Some(1));
    assert_eq!(
        rows(&output.stdout_text(), "command", "rank 0 (host-a)"),
        [("FAILED", "/nonexistent/train does not exist on this host")]
    );
}

#[test]
fn nccl_ranks_connect_to_the_coordinator() {
    let sshd = Sshd::start();
    let port = test_port_base();
    let hosts = serde_json::json!({"backend": "nccl", "hosts": [
        {"ssh": "host-a", "ips": ["127.0.0.1"]},
        {"ssh": "host-b"},
        {"ssh": "host-c"},
    ]});
    let output = doctor(&sshd, hosts, port, &["--nccl-port", &(port + 7).to_string(), "--", "true"]);

    assert_eq!(output.code(), Some(0), "{}", output.stderr_text());
    let text = output.stdout_text();
    let coordinator = format!("127.0.0.1:{}", port + 7);
    assert_eq!(rows(&text, "port", "rank 0 (host-a)"), [("ok", coordinator.as_str())]);
    assert!(rows(&text, "port", "rank 1 (host-b)").is_empty(), "{text}");
    assert!(rows(&text, "edge", "rank 0 (host-a)").is_empty(), "{text}");
    assert_eq!(rows(&text, "edge", "rank 1 (host-b) -> rank 0 (host-a)"), [("ok", coordinator.as_str())]);
    assert_eq!(rows(&text, "edge", "rank 2 (host-c) -> rank 0 (host-a)"), [("ok", coordinator.as_str())]);
}

#[test]
fn invalid_doctor_input_exits_2() {
    let cases: &[(&[&str], &str)] = &[
        (&["doctor", "--hosts", "n[1-", "--", "true"], "the '[' at byte 1 is never closed"),
        (&["doctor", "--hosts", "node1", "--", "true"], "the ring backend needs IP addresses, but host 0 (node1) has none"),
        (&["doctor", "--", "no-such-command-ringleader"], "command not found: \"no-such-command-ringleader\""),
    ];
    for (args, expected) in cases {
        let output = run(&mut ringleader(*args), b"");
        assert_eq!(output.code(), Some(2), "{args:?}");
        assert!(output.stderr_text().contains(expected), "{args:?}: {}", output.stderr_text());
    }
}

#[test]
fn program_named_doctor_runs_after_double_dash() {
    let dir = tempfile::tempdir().unwrap();
    let program = dir.path().join("doctor");
    std::fs::write(&program, "#!/bin/sh\necho I am a program named doctor\n").unwrap();
    std::fs::set_permissions(&program, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let mut command = ringleader(["--", "doctor"]);
    let path = format!("{}:{}", dir.path().display(), std::env::var("PATH").unwrap_or_default());
    command.env("PATH", path);
    let output = run(&mut command, b"");

    assert_eq!(output.code(), Some(0), "{}", output.stderr_text());
    assert_eq!(output.stdout_text(), "I am a program named doctor\n");
}

#[test]
fn main_help_mentions_the_subcommands() {
    let output = run(&mut ringleader(["--help"]), b"");
    let help = output.stdout_text();
    assert!(help.contains("ringleader config"), "{help}");
    assert!(help.contains("ringleader doctor"), "{help}");
    assert!(help.contains("ringleader -- config"), "{help}");
}
