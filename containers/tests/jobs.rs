//! ringleader jobs across a container cluster, through the real OpenSSH
//! transport: results, exit codes, output integrity and teardown under
//! faults.
//!
//! Each test that stops a job checks afterwards, with `docker exec` into every
//! node, that no process of the job is left.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use ringleader_containers::{mounts, Cluster, ClusterOptions};

/// Time the ssh transport needs to notice a silent node: its keepalive
/// (5 s interval, 3 missed replies), plus the 5 s grace period of the
/// teardown, plus a margin for container scheduling on a loaded machine.
const KEEPALIVE_BOUND: Duration = Duration::from_secs(15 + 5 + 10);

/// Maximum time a healthy job in these tests may run.
const JOB_TIMEOUT: Duration = Duration::from_secs(120);

/// A cluster with the workspace binaries mounted, plus the launcher path.
struct Rehearsal {
    cluster: Cluster,
    ringleader: PathBuf,
    /// Scripts and hostfiles written by the test, mounted in every node.
    scratch: tempfile::TempDir,
}

impl Rehearsal {
    async fn start(nodes: usize, python: bool) -> Rehearsal {
        let ringleader = common::workspace_binary("ringleader", "ringleader");
        let scratch = tempfile::Builder::new().prefix("ringleader-jobs-").tempdir().unwrap();
        let mut options = ClusterOptions::new(nodes).mount(common::profile_dir()).mount(scratch.path());
        if python {
            options.mounts.extend(mounts::python_mounts(&common::test_python()).expect("test python found"));
        }
        let cluster = common::start_cluster(options).await;
        Rehearsal { cluster, ringleader, scratch }
    }

    /// `ringleader --hostfile <cluster hostfile> --ssh-config <config>`.
    fn launcher(&self) -> Command {
        self.launcher_with_hostfile(&self.cluster.files.hostfile)
    }

    fn launcher_with_hostfile(&self, hostfile: &Path) -> Command {
        let mut command = Command::new(&self.ringleader);
        command.arg("--hostfile").arg(hostfile).arg("--ssh-config").arg(&self.cluster.files.ssh_config);
        command
    }

    fn write_script(&self, name: &str, text: &str) -> PathBuf {
        let path = self.scratch.path().join(name);
        std::fs::write(&path, text).unwrap();
        path
    }

    /// Process lines (`pid args`) on node `index` whose command line contains `marker`.
    async fn processes_matching(&self, index: usize, marker: &str) -> Vec<String> {
        let output = self.cluster.exec(index, &["ps", "-eo", "pid=,args="]).await.expect("ps runs in the node");
        output
            .stdout
            .lines()
            .filter(|line| line.contains(marker) && !line.contains("ps -eo"))
            .map(str::to_string)
            .collect()
    }

    /// Wait until `marker` runs on every node in `nodes`.
    async fn wait_until_running(&self, nodes: &[usize], marker: &str) {
        for &index in nodes {
            let what = format!("{marker:?} to run on node{index}");
            common::poll_until(&what, JOB_TIMEOUT, || async {
                (!self.processes_matching(index, marker).await.is_empty()).then_some(())
            })
            .await;
        }
    }

    /// Wait until no process matching `marker` is left on any node in `nodes`.
    async fn wait_until_clean(&self, nodes: &[usize], marker: &str, bound: Duration) {
        for &index in nodes {
            let what = format!("node{index} to be free of {marker:?}");
            common::poll_until(&what, bound, || async {
                let left = self.processes_matching(index, marker).await;
                if !left.is_empty() {
                    eprintln!("node{index} still runs: {left:?}");
                }
                left.is_empty().then_some(())
            })
            .await;
        }
    }
}

/// Spawn `command` with captured output, echoing it.
fn spawn_echoed(command: &mut Command) -> Child {
    eprintln!("$ {command:?}");
    command.stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().expect("ringleader starts")
}

/// Wait for `child` at most `bound`, then echo and return its output.
async fn wait_within(child: Child, bound: Duration) -> (Output, Duration) {
    let started = Instant::now();
    let pid = child.id();
    let waiter = tokio::task::spawn_blocking(move || child.wait_with_output());
    let output = match tokio::time::timeout(bound, waiter).await {
        Ok(joined) => joined.expect("wait does not panic").expect("wait succeeds"),
        Err(_) => {
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), nix::sys::signal::Signal::SIGKILL);
            panic!("ringleader (pid {pid}) still ran after {bound:?}");
        }
    };
    let elapsed = started.elapsed();
    eprintln!("exit status after {elapsed:?}: {}", output.status);
    eprintln!("stderr:\n{}", tail(&String::from_utf8_lossy(&output.stderr), 40));
    (output, elapsed)
}

fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// Returns a long-running rank command whose `sleep` argument is unique to
/// the test, so `ps` finds exactly this job's processes.
fn sleeper(seconds: u32) -> Vec<String> {
    vec!["sleep".into(), seconds.to_string()]
}

const MLX_ALL_SUM: &str = r#"
import sys
import mlx.core as mx

group = mx.distributed.init(backend="ring", strict=True)
rank, size = group.rank(), group.size()
iterations = int(sys.argv[1]) if len(sys.argv) > 1 else 1
for _ in range(iterations):
    total = mx.distributed.all_sum(mx.full((1024,), float(rank + 1)))
    mx.eval(total)
expected = size * (size + 1) / 2
assert float(total[0]) == expected, (float(total[0]), expected)
print(f"rank {rank} of {size}: all_sum {float(total[0]):.0f}", flush=True)
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bench_all_sum_verifies_across_four_nodes() {
    require_docker!();
    let _guard = common::exclusive().await;
    let rehearsal = Rehearsal::start(4, false).await;
    let bench = common::workspace_binary("ringleader", "ringleader-bench");

    let mut command = rehearsal.launcher();
    command.arg("--").arg(&bench).args(["-b", "4K", "-e", "4M", "-n", "3", "-o", "all-sum"]);
    let (output, _) = wait_within(spawn_echoed(&mut command), JOB_TIMEOUT).await;

    let stdout = String::from_utf8_lossy(&output.stdout);
    eprintln!("stdout:\n{stdout}");
    assert_eq!(output.status.code(), Some(0));
    assert!(stdout.contains("4 ranks"), "the report is not for 4 ranks:\n{stdout}");
    let rows: Vec<&str> = stdout.lines().filter(|line| !line.starts_with('#') && !line.trim().is_empty()).collect();
    assert_eq!(rows.len(), 6, "one row per size from 4K to 4M:\n{stdout}");
    for row in rows {
        assert!(row.contains("all_sum"), "row of another operation: {row:?}");
        assert!(row.trim_end().ends_with("ok"), "unchecked or wrong result: {row:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mlx_all_sum_gives_world_sum() {
    require_docker!();
    let _guard = common::exclusive().await;
    let rehearsal = Rehearsal::start(4, true).await;
    let script = rehearsal.write_script("all_sum.py", MLX_ALL_SUM);

    let mut command = rehearsal.launcher();
    command.arg("--").arg(common::test_python()).arg(&script);
    let (output, _) = wait_within(spawn_echoed(&mut command), JOB_TIMEOUT).await;

    assert_eq!(output.status.code(), Some(0));
    let stdout = String::from_utf8_lossy(&output.stdout);
    for rank in 0..4 {
        assert!(stdout.contains(&format!("rank {rank} of 4: all_sum 10")), "rank {rank} missing in:\n{stdout}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failing_rank_exit_code_and_cleanup() {
    require_docker!();
    let _guard = common::exclusive().await;
    let rehearsal = Rehearsal::start(4, false).await;
    let marker = "sleep 3101";

    let mut command = rehearsal.launcher();
    command.args(["--", "sh", "-c", &format!("if [ \"$MLX_RANK\" = 2 ]; then sleep 4; exit 3; fi; exec {marker}")]);
    let child = spawn_echoed(&mut command);
    rehearsal.wait_until_running(&[0, 1, 3], marker).await;
    let (output, elapsed) = wait_within(child, JOB_TIMEOUT).await;

    assert_eq!(output.status.code(), Some(3), "exit code of the failing rank");
    assert!(elapsed < Duration::from_secs(30), "teardown took {elapsed:?}");
    rehearsal.wait_until_clean(&[0, 1, 2, 3], marker, Duration::from_secs(10)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_node_fails_job_cleanly() {
    require_docker!();
    let _guard = common::exclusive().await;
    let rehearsal = Rehearsal::start(4, false).await;
    let marker = sleeper(3102).join(" ");

    let mut command = rehearsal.launcher();
    command.arg("--").args(sleeper(3102));
    let child = spawn_echoed(&mut command);
    rehearsal.wait_until_running(&[0, 1, 2, 3], &marker).await;

    let fault_at = Instant::now();
    rehearsal.cluster.kill(2).await.unwrap();
    let (output, _) = wait_within(child, KEEPALIVE_BOUND).await;
    let elapsed = fault_at.elapsed();

    assert_ne!(output.status.code(), Some(0));
    eprintln!("job failed {elapsed:?} after the kill");
    rehearsal.wait_until_clean(&[0, 1, 3], &marker, Duration::from_secs(10)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disconnected_node_fails_all_sum_in_bound() {
    require_docker!();
    let _guard = common::exclusive().await;
    let rehearsal = Rehearsal::start(4, true).await;
    let script = rehearsal.write_script("all_sum_loop.py", MLX_ALL_SUM);

    let mut command = rehearsal.launcher();
    command.arg("--").arg(common::test_python()).arg(&script).arg("100000000");
    let child = spawn_echoed(&mut command);
    let marker = script.to_string_lossy().into_owned();
    rehearsal.wait_until_running(&[0, 1, 2, 3], &marker).await;

    let fault_at = Instant::now();
    rehearsal.cluster.disconnect(1).await.unwrap();
    let (output, _) = wait_within(child, KEEPALIVE_BOUND).await;
    let elapsed = fault_at.elapsed();

    assert_ne!(output.status.code(), Some(0));
    eprintln!("job failed {elapsed:?} after the disconnect");
    rehearsal.wait_until_clean(&[0, 2, 3], &marker, Duration::from_secs(10)).await;
}

/// Per-operation timeout of the ring backend in the isolation test, seconds.
const RING_OP_TIMEOUT_SECS: u64 = 5;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn isolated_node_makes_survivors_fail() {
    require_docker!();
    let _guard = common::exclusive().await;
    let rehearsal = Rehearsal::start(4, false).await;
    let bench = common::workspace_binary("ringleader", "ringleader-bench");

    let mut command = rehearsal.launcher();
    command
        .arg("--env")
        .arg(format!("RINGLEADER_RING_OP_TIMEOUT={RING_OP_TIMEOUT_SECS}"))
        .arg("--")
        .arg(&bench)
        .args(["-b", "1M", "-e", "1M", "-n", "1000000", "-o", "all-sum"]);
    let child = spawn_echoed(&mut command);
    rehearsal.wait_until_running(&[0, 1, 2, 3], "ringleader-bench").await;

    // The ssh sessions stay up, so only the ring can notice the cut.
    let fault_at = Instant::now();
    rehearsal.cluster.isolate(1).await.unwrap();
    let bound = Duration::from_secs(RING_OP_TIMEOUT_SECS + 5 + 10);
    let (output, _) = wait_within(child, bound).await;
    let elapsed = fault_at.elapsed();

    assert_eq!(output.status.code(), Some(3), "exit code of a rank whose ring operation failed");
    eprintln!("job failed {elapsed:?} after the isolation");
    rehearsal.wait_until_clean(&[0, 1, 2, 3], "ringleader-bench", Duration::from_secs(10)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn paused_node_is_detected_by_the_keepalive() {
    require_docker!();
    let _guard = common::exclusive().await;
    let rehearsal = Rehearsal::start(4, false).await;
    let marker = sleeper(3103).join(" ");

    let mut command = rehearsal.launcher();
    command.arg("--").args(sleeper(3103));
    let child = spawn_echoed(&mut command);
    rehearsal.wait_until_running(&[0, 1, 2, 3], &marker).await;

    let fault_at = Instant::now();
    rehearsal.cluster.pause(3).await.unwrap();
    let (output, _) = wait_within(child, KEEPALIVE_BOUND).await;
    let elapsed = fault_at.elapsed();
    assert_ne!(output.status.code(), Some(0));
    eprintln!("job failed {elapsed:?} after the pause");
    rehearsal.wait_until_clean(&[0, 1, 2], &marker, Duration::from_secs(10)).await;

    // Once thawed, the node's agent finds the launcher gone and stops its rank.
    rehearsal.cluster.unpause(3).await.unwrap();
    rehearsal.wait_until_clean(&[3], &marker, KEEPALIVE_BOUND).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rank_output_lines_arrive_whole() {
    require_docker!();
    let _guard = common::exclusive().await;
    let rehearsal = Rehearsal::start(4, false).await;
    const LINES: usize = 100_000;

    let program = format!(
        "seq 1 {LINES} | sed \"s/^/rank $MLX_RANK out /\" & \
         seq 1 {LINES} | sed \"s/^/rank $MLX_RANK err /\" >&2; wait"
    );
    let mut command = rehearsal.launcher();
    command.args(["--", "sh", "-c", &program]);
    let (output, _) = wait_within(spawn_echoed(&mut command), JOB_TIMEOUT).await;
    assert_eq!(output.status.code(), Some(0));

    for (stream, bytes) in [("out", &output.stdout), ("err", &output.stderr)] {
        let text = String::from_utf8_lossy(bytes);
        let mut next = [1usize; 4];
        for line in text.lines() {
            let words: Vec<&str> = line.split(' ').collect();
            if words.len() != 4 || words[0] != "rank" {
                // The launcher's own messages on stderr.
                assert_eq!(stream, "err", "unexpected stdout line {line:?}");
                continue;
            }
            let rank: usize = words[1].parse().unwrap_or_else(|_| panic!("spliced line {line:?}"));
            assert_eq!(words[2], stream, "line on the wrong stream: {line:?}");
            let number: usize = words[3].parse().unwrap_or_else(|_| panic!("spliced line {line:?}"));
            assert_eq!(number, next[rank], "rank {rank} {stream}: lost or reordered line before {line:?}");
            next[rank] += 1;
        }
        assert_eq!(next, [LINES + 1; 4], "line counts per rank on std{stream}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thirty_two_ranks_start_on_one_node() {
    require_docker!();
    let _guard = common::exclusive().await;
    let rehearsal = Rehearsal::start(1, false).await;

    for round in 0..3 {
        let mut command = rehearsal.launcher();
        command.args(["-n", "32", "--", "sh", "-c", "echo \"rank $MLX_RANK up\""]);
        let (output, _) = wait_within(spawn_echoed(&mut command), JOB_TIMEOUT).await;

        assert_eq!(output.status.code(), Some(0), "round {round}");
        let stdout = String::from_utf8_lossy(&output.stdout);
        for rank in 0..32 {
            assert!(stdout.contains(&format!("rank {rank} up\n")), "round {round}: rank {rank} missing");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkilled_launcher_leaves_every_node_clean() {
    require_docker!();
    let _guard = common::exclusive().await;
    let rehearsal = Rehearsal::start(4, false).await;
    let marker = sleeper(3104).join(" ");

    let mut command = rehearsal.launcher();
    command.arg("--").args(sleeper(3104));
    let child = spawn_echoed(&mut command);
    rehearsal.wait_until_running(&[0, 1, 2, 3], &marker).await;

    nix::sys::signal::kill(nix::unistd::Pid::from_raw(child.id() as i32), nix::sys::signal::Signal::SIGKILL).unwrap();
    let (output, _) = wait_within(child, Duration::from_secs(5)).await;
    assert_eq!(output.status.code(), None, "the launcher was not killed by the signal");

    let killed_at = Instant::now();
    rehearsal.wait_until_clean(&[0, 1, 2, 3], &marker, KEEPALIVE_BOUND).await;
    eprintln!("every node clean {:?} after the launcher was killed", killed_at.elapsed());
}
