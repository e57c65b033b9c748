//! Teardown of remote ranks: signals reach the whole process group, and the
//! remote side stops ranks on its own when the ssh client or the link dies,
//! or when the heartbeat stops. Also the clear, fast failures of bad hosts.

mod common;

use std::time::Duration;

use common::sshd::drive::{eventually, options, run_to_end, spec, watchdog_bound};
use common::sshd::{
    processes, processes_in_group, Process, Sshd, CLOSED_PORT_ALIAS, UNAUTHORIZED_KEY_ALIAS,
    WRONG_HOST_KEY_ALIAS,
};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use ringleader::exec::ssh::{SshSessionError, SshSpawner};
use ringleader::exec::{RankSignal, SpawnError, Spawned, Spawner, Termination};
use tokio::io::AsyncReadExt;

/// How long a rank's group may take to vanish after a signal from the test.
const SIGNAL_TIMEOUT: Duration = Duration::from_secs(10);

/// A rank whose group contains a shell and two `sleep` children.
const SLEEPERS: &[&str] = &["sh", "-c", "sleep 300 & sleep 300 & wait"];

async fn start_sleepers(spawner: &SshSpawner, rank: usize) -> (Spawned, u32) {
    let spawned = spawner
        .spawn(&spec(rank, "host-a", SLEEPERS))
        .await
        .expect("rank starts");
    let pgid = spawned.pid.expect("remote pid reported");
    let full = eventually(SIGNAL_TIMEOUT, || processes_in_group(pgid).len() >= 3).await;
    assert!(
        full,
        "rank {rank}: group {pgid} never had its three processes"
    );
    (spawned, pgid)
}

/// Local ssh clients this test started against `sshd` whose arguments contain `needle`.
fn local_ssh_clients(sshd: &Sshd, needle: &str) -> Vec<Process> {
    let config = sshd.config_file().display().to_string();
    processes()
        .into_iter()
        .filter(|process| process.ppid == std::process::id())
        .filter(|process| process.args.contains(&config) && process.args.contains(needle))
        .collect()
}

fn signal(pid: u32, signal: Signal) {
    kill(Pid::from_raw(pid as i32), signal).expect("signal the local ssh client");
}

#[tokio::test]
async fn terminate_stops_the_whole_remote_group() {
    let sshd = Sshd::start();
    let spawner = SshSpawner::new(options(&sshd)).unwrap();
    let (spawned, pgid) = start_sleepers(&spawner, 0).await;

    spawned
        .control
        .signal(RankSignal::Terminate)
        .await
        .expect("signal sent");
    let finished = run_to_end(spawned).await;

    assert_eq!(finished.termination, Termination::Signaled(15));
    assert!(
        processes_in_group(pgid).is_empty(),
        "group {pgid} survived SIGTERM"
    );
    // The remote shell reports a killed child ("Terminated"); that must not reach the rank's stderr.
    assert_eq!(finished.stderr_text(), "");
}

#[tokio::test]
async fn kill_stops_a_rank_that_ignores_terminate() {
    let sshd = Sshd::start();
    let spawner = SshSpawner::new(options(&sshd)).unwrap();
    let rank = spec(
        0,
        "host-a",
        &["sh", "-c", "trap '' TERM; echo ready; sleep 300 & wait"],
    );
    let mut spawned = spawner.spawn(&rank).await.unwrap();
    let pgid = spawned.pid.unwrap();
    let mut ready = [0u8; 6];
    spawned
        .stdout
        .read_exact(&mut ready)
        .await
        .expect("rank reports ready");
    assert_eq!(&ready, b"ready\n");

    spawned.control.signal(RankSignal::Terminate).await.unwrap();
    spawned.control.signal(RankSignal::Kill).await.unwrap();
    let finished = run_to_end(spawned).await;

    assert_eq!(finished.termination, Termination::Signaled(9));
    assert!(
        processes_in_group(pgid).is_empty(),
        "group {pgid} survived SIGKILL"
    );
}

/// A rank started in the background by a non-interactive shell would ignore
/// SIGINT; the rank must not.
#[tokio::test]
async fn interrupt_reaches_the_rank() {
    let sshd = Sshd::start();
    let spawner = SshSpawner::new(options(&sshd)).unwrap();
    let rank = spec(
        0,
        "host-a",
        &[
            "sh",
            "-c",
            "trap 'exit 42' INT; echo ready; while :; do sleep 1; done",
        ],
    );
    let mut spawned = spawner.spawn(&rank).await.unwrap();
    let mut ready = [0u8; 6];
    spawned
        .stdout
        .read_exact(&mut ready)
        .await
        .expect("rank reports ready");
    assert_eq!(&ready, b"ready\n");

    spawned.control.signal(RankSignal::Interrupt).await.unwrap();
    let finished = run_to_end(spawned).await;

    assert_eq!(finished.termination, Termination::Exited(42));
}

#[tokio::test]
async fn leftover_processes_stop_when_the_leader_exits() {
    let sshd = Sshd::start();
    let spawner = SshSpawner::new(options(&sshd)).unwrap();
    let rank = spec(
        0,
        "host-a",
        &["sh", "-c", "sleep 300 >/dev/null 2>&1 & exit 3"],
    );
    let spawned = spawner.spawn(&rank).await.unwrap();
    let pgid = spawned.pid.unwrap();

    let finished = run_to_end(spawned).await;

    assert_eq!(finished.termination, Termination::Exited(3));
    assert!(
        processes_in_group(pgid).is_empty(),
        "leftover sleep in group {pgid}"
    );
}

#[tokio::test]
async fn killed_ssh_client_stops_its_remote_rank() {
    let sshd = Sshd::start();
    kill_one_ssh_client_and_check(&sshd, SshSpawner::new(options(&sshd)).unwrap()).await;
}

#[tokio::test]
async fn killed_ssh_client_without_multiplexing_stops_its_rank() {
    let sshd = Sshd::start();
    let mut options = options(&sshd);
    options.multiplex = false;
    kill_one_ssh_client_and_check(&sshd, SshSpawner::new(options).unwrap()).await;
}

async fn kill_one_ssh_client_and_check(sshd: &Sshd, spawner: SshSpawner) {
    let (spawned, pgid) = start_sleepers(&spawner, 5).await;
    let clients = local_ssh_clients(sshd, "rank-5-");
    assert_eq!(
        clients.len(),
        1,
        "expected one ssh client for rank 5: {clients:?}"
    );

    signal(clients[0].pid, Signal::SIGKILL);
    let error = tokio::time::timeout(watchdog_bound(), spawned.wait)
        .await
        .expect("wait resolves within the bound")
        .expect_err("a killed ssh client is an ssh failure");

    let session_error = error
        .get_ref()
        .and_then(|inner| inner.downcast_ref::<SshSessionError>())
        .unwrap_or_else(|| panic!("not an SshSessionError: {error}"));
    assert_eq!(session_error.rank, 5);
    assert!(session_error.confirmed_dead, "{session_error}");
    assert!(spawner.unconfirmed_ranks().is_empty());
    assert!(processes_in_group(pgid).is_empty(), "group {pgid} survived");
}

#[tokio::test]
async fn dropped_connection_stops_every_remote_rank() {
    let sshd = Sshd::start();
    let spawner = SshSpawner::new(options(&sshd)).unwrap();
    let (first, first_group) = start_sleepers(&spawner, 0).await;
    let (second, second_group) = start_sleepers(&spawner, 1).await;
    let links = local_ssh_clients(&sshd, "ControlMaster=yes");
    assert_eq!(links.len(), 1, "expected one link: {links:?}");

    signal(links[0].pid, Signal::SIGKILL);

    let gone = eventually(watchdog_bound(), || {
        processes_in_group(first_group).is_empty() && processes_in_group(second_group).is_empty()
    })
    .await;
    assert!(gone, "remote ranks survived the dropped connection");
    for spawned in [first, second] {
        let result = tokio::time::timeout(watchdog_bound(), spawned.wait).await;
        assert!(
            matches!(result, Ok(Err(_))),
            "wait did not report the ssh failure: {result:?}"
        );
    }
}

/// A stopped ssh client sends nothing, as if the network were cut.
#[tokio::test]
async fn missing_heartbeat_stops_remote_ranks() {
    let sshd = Sshd::start();
    let spawner = SshSpawner::new(options(&sshd)).unwrap();
    let (_spawned, pgid) = start_sleepers(&spawner, 0).await;
    let links = local_ssh_clients(&sshd, "ControlMaster=yes");
    assert_eq!(links.len(), 1, "expected one link: {links:?}");

    signal(links[0].pid, Signal::SIGSTOP);
    let gone = eventually(watchdog_bound(), || processes_in_group(pgid).is_empty()).await;
    signal(links[0].pid, Signal::SIGKILL);

    assert!(
        gone,
        "remote rank survived {:?} without heartbeat",
        watchdog_bound()
    );
}

#[tokio::test]
async fn dropping_the_spawner_leaves_no_remote_process() {
    let sshd = Sshd::start();
    let spawner = SshSpawner::new(options(&sshd)).unwrap();
    let spawned = spawner.spawn(&spec(0, "host-a", &["true"])).await.unwrap();
    run_to_end(spawned).await;

    drop(spawner);

    let clean = eventually(watchdog_bound(), || sshd.descendants().is_empty()).await;
    assert!(clean, "remote processes left: {:?}", sshd.descendants());
}

async fn expect_ssh_failure(host: &str, expected: &str) {
    let sshd = Sshd::start();
    let spawner = SshSpawner::new(options(&sshd)).unwrap();
    let started = tokio::time::Instant::now();

    let result = spawner.spawn(&spec(2, host, &["true"])).await;

    let elapsed = started.elapsed();
    let Err(error) = result else {
        panic!("{host}: rank started")
    };
    let message = error.to_string();
    assert!(matches!(error, SpawnError::Ssh { .. }), "{host}: {message}");
    assert!(message.contains(&format!("rank 2 on {host}")), "{message}");
    assert!(message.contains(expected), "{host}: {message}");
    let bound = options(&sshd).connect_timeout + Duration::from_secs(3);
    assert!(elapsed < bound, "{host}: failure took {elapsed:?}");
}

#[tokio::test]
async fn closed_port_fails_fast_with_ssh_message() {
    expect_ssh_failure(CLOSED_PORT_ALIAS, "Connection refused").await;
}

#[tokio::test]
async fn changed_host_key_fails_fast_with_ssh_message() {
    expect_ssh_failure(WRONG_HOST_KEY_ALIAS, "Host key verification failed").await;
}

#[tokio::test]
async fn unauthorized_key_fails_fast_with_ssh_message() {
    expect_ssh_failure(UNAUTHORIZED_KEY_ALIAS, "Permission denied").await;
}

/// A host that accepts TCP but never answers, like a hung sshd.
#[tokio::test]
async fn silent_server_fails_within_connect_timeout() {
    let sshd = Sshd::start();
    // The kernel completes connections into the backlog; nothing ever reads them.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let mut options = options(&sshd);
    options.connect_timeout = Duration::from_secs(2);
    options.extra_options = vec![format!("Port={}", silent.local_addr().unwrap().port())];
    let spawner = SshSpawner::new(options).unwrap();
    let started = tokio::time::Instant::now();

    let result = spawner.spawn(&spec(4, "host-a", &["true"])).await;

    let elapsed = started.elapsed();
    let Err(error) = result else {
        panic!("rank started on a silent server")
    };
    let message = error.to_string();
    assert!(matches!(error, SpawnError::Ssh { .. }), "{message}");
    assert!(message.contains("rank 4 on host-a"), "{message}");
    assert!(message.contains("timed out"), "{message}");
    assert!(elapsed < Duration::from_secs(6), "failure took {elapsed:?}");
}

#[tokio::test]
async fn killed_launcher_leaves_no_remote_process() {
    use std::io::BufRead;

    let sshd = Sshd::start();
    let config = sshd.config_file().display().to_string();
    let mut launcher = std::process::Command::new(env!("CARGO_BIN_EXE_ssh-launch"))
        .args([
            "--config",
            &config,
            "--grace",
            "1",
            "--keepalive",
            "1",
            "host-a",
            "3",
        ])
        .args(SLEEPERS)
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("start ssh-launch");
    let stdout = launcher.stdout.take().unwrap();
    let groups: Vec<u32> = std::io::BufReader::new(stdout)
        .lines()
        .take(3)
        .map(|line| {
            let line = line.expect("read a started line");
            line.rsplit(' ')
                .next()
                .and_then(|pid| pid.parse().ok())
                .expect("started RANK PID")
        })
        .collect();
    let populated = eventually(SIGNAL_TIMEOUT, || {
        groups
            .iter()
            .all(|&group| processes_in_group(group).len() >= 3)
    })
    .await;
    assert!(populated, "ranks never started their sleepers: {groups:?}");

    launcher.kill().expect("SIGKILL the launcher");
    launcher.wait().unwrap();

    let clean = eventually(watchdog_bound(), || {
        groups
            .iter()
            .all(|&group| processes_in_group(group).is_empty())
            && sshd.descendants().is_empty()
    })
    .await;
    assert!(clean, "remote processes left: {:?}", sshd.descendants());
    let local_clean = eventually(watchdog_bound(), || {
        processes()
            .iter()
            .all(|process| !(process.args.starts_with("ssh ") && process.args.contains(&config)))
    })
    .await;
    assert!(local_clean, "local ssh clients outlived the launcher");
}
