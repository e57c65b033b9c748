//! Each fault action on a node has the effect the fault tests rely on, and
//! the other nodes are not affected.

mod common;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use ringleader_containers::{Cluster, ClusterOptions};

/// Time a probe may take to notice a dead, frozen or missing node.
const PROBE_SECONDS: u64 = 3;

/// Run `true` on node `index` over ssh, giving up after `PROBE_SECONDS`.
fn ssh_succeeds(cluster: &Cluster, index: usize) -> bool {
    let mut command = cluster.ssh_command(index).unwrap();
    command.args(["-o", &format!("ConnectTimeout={PROBE_SECONDS}"), "true"]);
    let started = Instant::now();
    let output = common::run_echoed(&mut command);
    assert!(
        started.elapsed() < Duration::from_secs(PROBE_SECONDS + 5),
        "ssh probe hung for {:?}",
        started.elapsed()
    );
    output.status.success()
}

/// Returns whether node `from` opens a TCP connection to `to_ip`:22 within `PROBE_SECONDS`.
async fn tcp_reaches(cluster: &Cluster, from: usize, to_ip: &str) -> bool {
    let script = format!("timeout {PROBE_SECONDS} bash -c 'exec 3<>/dev/tcp/{to_ip}/22'");
    let output = cluster.exec(from, &["sh", "-c", &script]).await.unwrap();
    output.exit_code == 0
}

fn container_state(name: &str) -> String {
    let output = common::run_echoed(Command::new("docker").args(["inspect", "-f", "{{.State.Status}}", name]));
    String::from_utf8_lossy(&output.stdout).trim().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_stops_node_and_spares_others() {
    require_docker!();
    let _guard = common::exclusive().await;
    let cluster = common::start_cluster(ClusterOptions::new(3)).await;

    // A session that would run for minutes dies with its node.
    let mut session = cluster.ssh_command(1).unwrap().args(["sleep", "300"]).stdout(Stdio::null()).spawn().unwrap();
    common::poll_until("the sleep session on node1", Duration::from_secs(10), || async {
        let ps = cluster.exec(1, &["pgrep", "-x", "sleep"]).await.unwrap();
        (ps.stdout.lines().count() >= 2).then_some(())
    })
    .await;

    let started = Instant::now();
    cluster.kill(1).await.unwrap();
    assert_eq!(container_state(&cluster.nodes[1].container_name), "exited");
    let status = common::poll_until("the ssh session to end", Duration::from_secs(30), || {
        let status = session.try_wait().unwrap();
        async move { status }
    })
    .await;
    assert!(!status.success(), "the session survived its node");
    eprintln!("session ended {:?} after the kill", started.elapsed());

    assert!(!ssh_succeeds(&cluster, 1), "ssh reached a killed node");
    assert!(ssh_succeeds(&cluster, 0));
    assert!(ssh_succeeds(&cluster, 2));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stopped_node_restarts_with_its_host_key() {
    require_docker!();
    let _guard = common::exclusive().await;
    let mut cluster = common::start_cluster(ClusterOptions::new(2)).await;
    let known_hosts_before = std::fs::read_to_string(&cluster.files.known_hosts).unwrap();

    cluster.stop(1, 1).await.unwrap();
    assert_eq!(container_state(&cluster.nodes[1].container_name), "exited");
    assert!(!ssh_succeeds(&cluster, 1), "ssh reached a stopped node");

    cluster.restart(1).await.unwrap();
    assert_eq!(container_state(&cluster.nodes[1].container_name), "running");
    let ready = common::poll_until("sshd on the restarted node", Duration::from_secs(20), || async {
        ssh_succeeds(&cluster, 1).then_some(())
    });
    ready.await;
    assert_eq!(std::fs::read_to_string(&cluster.files.known_hosts).unwrap(), known_hosts_before);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn paused_node_is_silent_until_unpaused() {
    require_docker!();
    let _guard = common::exclusive().await;
    let cluster = common::start_cluster(ClusterOptions::new(2)).await;
    let paused_ip = cluster.nodes[1].ip.to_string();

    cluster.pause(1).await.unwrap();
    assert_eq!(container_state(&cluster.nodes[1].container_name), "paused");
    assert!(!ssh_succeeds(&cluster, 1), "ssh got an answer from a paused node");
    assert!(ssh_succeeds(&cluster, 0));

    // The kernel still accepts TCP connections for the frozen sshd, but
    // sshd sends no banner, so the read times out.
    let script = format!("exec 3<>/dev/tcp/{paused_ip}/22 && timeout {PROBE_SECONDS} head -c 7 <&3");
    let banner = cluster.exec(0, &["bash", "-c", &script]).await.unwrap();
    assert_ne!(banner.stdout, "SSH-2.0", "a paused node sent its banner");

    cluster.unpause(1).await.unwrap();
    assert!(ssh_succeeds(&cluster, 1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disconnected_node_is_unreachable_until_reconnected() {
    require_docker!();
    let _guard = common::exclusive().await;
    let mut cluster = common::start_cluster(ClusterOptions::new(3)).await;
    let ip = cluster.nodes[1].ip;
    assert!(tcp_reaches(&cluster, 0, &ip.to_string()).await);

    cluster.disconnect(1).await.unwrap();
    assert!(!tcp_reaches(&cluster, 0, &ip.to_string()).await, "node0 still reaches node1");
    assert!(!ssh_succeeds(&cluster, 1), "the launcher still reaches node1");
    assert!(tcp_reaches(&cluster, 0, &cluster.nodes[2].ip.to_string()).await, "node0 lost node2 too");

    cluster.reconnect(1).await.unwrap();
    assert_eq!(cluster.nodes[1].ip, ip, "the node came back at another address");
    assert!(tcp_reaches(&cluster, 0, &ip.to_string()).await);
    let ready = common::poll_until("ssh to the reconnected node", Duration::from_secs(20), || async {
        ssh_succeeds(&cluster, 1).then_some(())
    });
    ready.await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stopped_sshd_keeps_open_sessions() {
    require_docker!();
    let _guard = common::exclusive().await;
    let cluster = common::start_cluster(ClusterOptions::new(1)).await;

    let session = cluster
        .ssh_command(0)
        .unwrap()
        .args(["sleep 4; echo survived"])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    common::poll_until("the open session", Duration::from_secs(10), || async {
        let ps = cluster.exec(0, &["pgrep", "-x", "sleep"]).await.unwrap();
        (ps.stdout.lines().count() >= 2).then_some(())
    })
    .await;

    cluster.stop_sshd(0).await.unwrap();
    assert!(!ssh_succeeds(&cluster, 0), "a new session got through");
    assert_eq!(container_state(&cluster.nodes[0].container_name), "running");

    let output = session.wait_with_output().unwrap();
    assert!(output.status.success());
    assert_eq!(String::from_utf8_lossy(&output.stdout).trim(), "survived");

    cluster.start_sshd(0).await.unwrap();
    assert!(ssh_succeeds(&cluster, 0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn isolated_node_loses_peers_but_keeps_ssh() {
    require_docker!();
    let _guard = common::exclusive().await;
    let cluster = common::start_cluster(ClusterOptions::new(3)).await;
    let isolated_ip = cluster.nodes[1].ip.to_string();
    let peer_ip = cluster.nodes[2].ip.to_string();

    cluster.isolate(1).await.unwrap();
    assert!(!tcp_reaches(&cluster, 0, &isolated_ip).await, "node0 still reaches node1");
    assert!(!tcp_reaches(&cluster, 1, &peer_ip).await, "node1 still reaches node2");
    assert!(tcp_reaches(&cluster, 0, &peer_ip).await, "node0 lost node2 too");
    assert!(ssh_succeeds(&cluster, 1), "the launcher lost node1");

    cluster.heal(1).await.unwrap();
    assert!(tcp_reaches(&cluster, 0, &isolated_ip).await);
    assert!(tcp_reaches(&cluster, 1, &peer_ip).await);
}
