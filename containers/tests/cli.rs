//! The `ringleader-cluster` command line: help, `up` until Ctrl-C, `down`.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Duration;

use ringleader_containers::ClusterOptions;

const CLI: &str = env!("CARGO_BIN_EXE_ringleader-cluster");

fn labelled_containers(cluster_id: &str) -> String {
    let label = format!("label=org.ringleader.cluster={cluster_id}");
    let output = common::run_echoed(Command::new("docker").args(["ps", "-aq", "--filter", &label]));
    assert!(output.status.success());
    String::from_utf8_lossy(&output.stdout).trim().to_string()
}

#[test]
fn help_explains_the_subcommands() {
    let output = common::run_echoed(Command::new(CLI).arg("--help"));
    assert!(output.status.success());
    let help = String::from_utf8_lossy(&output.stdout);
    for subcommand in ["up", "image", "down"] {
        assert!(help.contains(&format!("  {subcommand} ")), "{subcommand} missing from:\n{help}");
    }
    assert!(help.contains("ringleader-cluster up -n 4"), "no first-run example in:\n{help}");
}

#[test]
fn zero_nodes_is_rejected_with_a_message() {
    let output = common::run_echoed(Command::new(CLI).args(["up", "-n", "0"]));
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("at least one node"), "{stderr}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn up_prints_the_command_and_cleans_up_on_ctrl_c() {
    require_docker!();
    let _guard = common::exclusive().await;
    let dir = tempfile::tempdir().unwrap();

    let mut child = Command::new(CLI)
        .args(["up", "-n", "2", "--dir"])
        .arg(dir.path())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let banner = tokio::task::spawn_blocking(move || {
        let mut text = String::new();
        for line in BufReader::new(stdout).lines() {
            let line = line.unwrap();
            text.push_str(&line);
            text.push('\n');
            if line.starts_with("Press Ctrl-C") {
                break;
            }
        }
        text
    });
    let banner = tokio::time::timeout(Duration::from_secs(120), banner)
        .await
        .expect("up prints its banner in time")
        .unwrap();
    eprintln!("{banner}");

    let hostfile = dir.path().join("hostfile.json");
    let ssh_config = dir.path().join("ssh_config");
    let expected = format!("ringleader --hostfile {} --ssh-config {} --", hostfile.display(), ssh_config.display());
    assert!(banner.contains(&expected), "no launch command in:\n{banner}");
    assert!(hostfile.exists());
    let id = banner
        .split_whitespace()
        .nth(1)
        .expect("banner starts with `cluster <id> is up`")
        .to_string();
    assert!(!labelled_containers(&id).is_empty());

    let ssh = common::run_echoed(Command::new("ssh").arg("-F").arg(&ssh_config).args(["node1", "true"]));
    assert!(ssh.status.success());

    nix::sys::signal::kill(nix::unistd::Pid::from_raw(child.id() as i32), nix::sys::signal::Signal::SIGINT).unwrap();
    let status = tokio::task::spawn_blocking(move || child.wait()).await.unwrap().unwrap();
    assert!(status.success(), "up exited with {status}");
    assert_eq!(labelled_containers(&id), "", "containers left after Ctrl-C");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn down_removes_a_leaked_cluster() {
    require_docker!();
    let _guard = common::exclusive().await;
    let cluster = common::start_cluster(ClusterOptions::new(2)).await;
    let id = cluster.id.clone();
    let files_dir = cluster.files_dir().to_path_buf();
    // Leak the cluster as a killed test process would.
    std::mem::forget(cluster);
    assert!(!labelled_containers(&id).is_empty());

    let output = common::run_echoed(Command::new(CLI).args(["down", "--cluster", &id]));
    assert!(output.status.success());
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert_eq!(stdout.matches("removed container").count(), 2, "{stdout}");
    assert_eq!(stdout.matches("removed network").count(), 1, "{stdout}");
    assert_eq!(labelled_containers(&id), "");

    let again = common::run_echoed(Command::new(CLI).args(["down", "--cluster", &id]));
    assert!(String::from_utf8_lossy(&again.stdout).contains("nothing to remove"));
    let _ = std::fs::remove_dir_all(files_dir);
}
