//! `ringleader config` against the loopback sshd: passwordless ssh checks,
//! addresses read over ssh and the hostfile it writes.

mod common;

use common::sshd::{Sshd, CLOSED_PORT_ALIAS, UNAUTHORIZED_KEY_ALIAS};
use ringleader_tests::{ringleader, run, Output};

fn config(sshd: &Sshd, args: &[&str]) -> Output {
    let config_file = sshd.config_file();
    let mut all = vec!["config", "--ssh-config", config_file.to_str().unwrap()];
    all.extend(args);
    run(&mut ringleader(all), b"")
}

/// Global IPv4 addresses of this machine, read with `ip -j addr` here and
/// not through the launcher.
fn local_global_ipv4() -> Vec<String> {
    let output = std::process::Command::new("ip").args(["-j", "addr", "show"]).output().expect("run ip");
    let interfaces: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    let mut found = Vec::new();
    for interface in interfaces.as_array().unwrap() {
        for address in interface["addr_info"].as_array().into_iter().flatten() {
            if address["family"] == "inet" && address["scope"] == "global" {
                found.push(address["local"].as_str().unwrap().to_string());
            }
        }
    }
    found
}

#[test]
fn writes_a_hostfile_with_each_hosts_address() {
    let sshd = Sshd::start();
    let dir = tempfile::tempdir().unwrap();
    let hostfile = dir.path().join("hosts.json");
    let output = config(
        &sshd,
        &[
            "--hosts", "host-a,host-b", "--backend", "ring", "--env", "MLX_METAL_FAST_SYNCH=1",
            "--output-hostfile", hostfile.to_str().unwrap(),
        ],
    );

    assert_eq!(output.code(), Some(0), "{}", output.stderr_text());
    let written: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&hostfile).unwrap()).unwrap();
    assert_eq!(written["backend"], "ring");
    assert_eq!(written["envs"], serde_json::json!(["MLX_METAL_FAST_SYNCH=1"]));
    let hosts = written["hosts"].as_array().unwrap();
    let names: Vec<&str> = hosts.iter().map(|h| h["ssh"].as_str().unwrap()).collect();
    assert_eq!(names, ["host-a", "host-b"]);
    let local = local_global_ipv4();
    for host in hosts {
        let ips: Vec<String> = serde_json::from_value(host["ips"].clone()).unwrap();
        if local.is_empty() {
            assert!(ips.is_empty(), "{ips:?}");
            assert!(output.stderr_text().contains("no IPv4 address found"), "{}", output.stderr_text());
        } else {
            assert_eq!(ips.len(), 1, "{host}");
            assert!(local.contains(&ips[0]), "{} is not one of this host's addresses {local:?}", ips[0]);
        }
        assert_eq!(host["rdma"], serde_json::json!([]));
    }
    assert_eq!(hosts[0]["ips"], hosts[1]["ips"]);

    let launch = run(&mut ringleader(["--hostfile", hostfile.to_str().unwrap(), "--dry-run", "--", "true"]), b"");
    assert_eq!(launch.code(), Some(0), "the written hostfile launches: {}", launch.stderr_text());
}

#[test]
fn prints_the_hostfile_without_output_file() {
    let sshd = Sshd::start();
    let output = config(&sshd, &["--hosts", "host-a"]);

    assert_eq!(output.code(), Some(0), "{}", output.stderr_text());
    let printed: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(printed["backend"], "ring");
    assert_eq!(printed["hosts"][0]["ssh"], "host-a");
}

#[test]
fn every_unreachable_host_is_reported_and_nothing_written() {
    let sshd = Sshd::start();
    let dir = tempfile::tempdir().unwrap();
    let hostfile = dir.path().join("hosts.json");
    let hosts = format!("host-a,{UNAUTHORIZED_KEY_ALIAS},{CLOSED_PORT_ALIAS}");
    let output = config(&sshd, &["--hosts", &hosts, "--output-hostfile", hostfile.to_str().unwrap()]);

    assert_eq!(output.code(), Some(1));
    let stderr = output.stderr_text();
    assert!(stderr.contains(&format!("ringleader config: {UNAUTHORIZED_KEY_ALIAS}: cannot ssh")), "{stderr}");
    assert!(stderr.contains("Permission denied"), "{stderr}");
    assert!(stderr.contains(&format!("ringleader config: {CLOSED_PORT_ALIAS}: cannot ssh")), "{stderr}");
    assert!(stderr.contains("Connection refused"), "{stderr}");
    assert!(stderr.contains("2 host(s) failed; no hostfile written"), "{stderr}");
    assert!(!stderr.contains("host-a:"), "{stderr}");
    assert!(!hostfile.exists());
}

#[test]
fn ignore_unreachable_leaves_failed_hosts_out() {
    let sshd = Sshd::start();
    let hosts = format!("host-a,{CLOSED_PORT_ALIAS},host-b");
    let output = config(&sshd, &["--hosts", &hosts, "--ignore-unreachable", "--backend", "nccl"]);

    assert_eq!(output.code(), Some(0), "{}", output.stderr_text());
    let printed: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(printed["backend"], "nccl");
    let names: Vec<&str> = printed["hosts"].as_array().unwrap().iter().map(|h| h["ssh"].as_str().unwrap()).collect();
    assert_eq!(names, ["host-a", "host-b"]);
    assert!(output.stderr_text().contains(CLOSED_PORT_ALIAS));
}

#[test]
fn thunderbolt_and_bad_input_exit_2() {
    let cases: &[(&[&str], &str)] = &[
        (&["config", "--over", "thunderbolt"], "Thunderbolt discovery needs macOS hardware"),
        (&["config", "--hosts", "a,,b"], "host 1 is empty"),
        (&["config", "--env", "1BAD=x"], "invalid environment entry \"1BAD=x\""),
    ];
    for (args, expected) in cases {
        let output = run(&mut ringleader(*args), b"");
        assert_eq!(output.code(), Some(2), "{args:?}");
        assert!(output.stderr_text().contains(expected), "{args:?}: {}", output.stderr_text());
    }
}

#[test]
fn config_help_states_the_thunderbolt_limit() {
    let output = run(&mut ringleader(["config", "--help"]), b"");
    assert_eq!(output.code(), Some(0));
    assert!(output.stdout_text().contains("Thunderbolt discovery and RDMA setup"), "{}", output.stdout_text());
}

/// ssh clients run in process groups of their own, so config must stop them
/// itself when it is interrupted.
#[test]
fn interrupted_config_leaves_no_ssh_client() {
    let sshd = Sshd::start();
    // The kernel completes connections into the backlog; nothing ever reads them.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = format!("Port={}", silent.local_addr().unwrap().port());
    let config_file = sshd.config_file();
    let config_path = config_file.to_str().unwrap();
    let mut command = ringleader([
        "config", "--ssh-config", config_path, "--hosts", "host-a", "--ssh-option", &port, "--connect-timeout", "60",
    ]);
    let child = ringleader_tests::start(&mut command);
    let config_pid = child.id();
    // The ssh clients name the config file too; config itself does not count.
    let ssh_clients = || -> Vec<u32> {
        ringleader_tests::processes_with(config_path).into_iter().filter(|&pid| pid != config_pid).collect()
    };
    let deadline = std::time::Instant::now() + ringleader_tests::HANG_LIMIT;
    while ssh_clients().is_empty() {
        assert!(std::time::Instant::now() < deadline, "config started no ssh client");
        // Polling interval, not synchronisation: the deadline above bounds the wait.
        std::thread::sleep(std::time::Duration::from_millis(10));
    }

    nix::sys::signal::kill(nix::unistd::Pid::from_raw(child.id() as i32), nix::sys::signal::Signal::SIGTERM).unwrap();
    let output = ringleader_tests::finish(child);

    assert_eq!(output.code(), Some(143), "{}", output.stderr_text());
    assert!(output.stderr_text().contains("interrupted; no hostfile written"), "{}", output.stderr_text());
    assert_eq!(ssh_clients(), Vec::<u32>::new(), "ssh clients outlived config");
}

/// Refreshing the addresses of an existing hostfile keeps everything else.
#[test]
fn input_hostfile_keeps_backend_envs_rdma_and_duplicates() {
    let sshd = Sshd::start();
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("in.json");
    std::fs::write(
        &input,
        r#"{"backend": "jaccl", "envs": ["MLX_METAL_FAST_SYNCH=1"], "hosts": [
            {"ssh": "host-a", "ips": ["10.0.0.1"], "rdma": [null, "rdma_en2", "rdma_en3"]},
            {"ssh": "host-b", "ips": ["10.0.0.2"], "rdma": ["rdma_en2", null, "rdma_en4"]},
            {"ssh": "host-a", "ips": ["10.0.0.1"], "rdma": ["rdma_en3", "rdma_en4", null]}]}"#,
    )
    .unwrap();
    let output = config(&sshd, &["--hostfile", input.to_str().unwrap(), "--env", "EXTRA=2"]);

    assert_eq!(output.code(), Some(0), "{}", output.stderr_text());
    let written: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(written["backend"], "jaccl");
    assert_eq!(written["envs"], serde_json::json!(["MLX_METAL_FAST_SYNCH=1", "EXTRA=2"]));
    let hosts = written["hosts"].as_array().unwrap();
    let names: Vec<&str> = hosts.iter().map(|h| h["ssh"].as_str().unwrap()).collect();
    assert_eq!(names, ["host-a", "host-b", "host-a"]);
    assert_eq!(hosts[1]["rdma"], serde_json::json!(["rdma_en2", null, "rdma_en4"]));
    assert!(!output.stderr_text().contains("rdma"), "{}", output.stderr_text());
}

#[test]
fn jaccl_without_devices_gets_a_warning() {
    let sshd = Sshd::start();
    let output = config(&sshd, &["--hosts", "host-a,host-b", "--backend", "jaccl"]);

    assert_eq!(output.code(), Some(0), "{}", output.stderr_text());
    assert!(output.stderr_text().contains("needs each host's \"rdma\" device list"), "{}", output.stderr_text());
}
