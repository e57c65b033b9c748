//! `ringleader doctor`: checks a cluster before a long job and reports one
//! row per check, per rank and per ring edge.
//!
//! A probe (see [`probe`]) starts for every rank through the [`Spawner`],
//! so it travels exactly as the rank would: locally for loopback hosts, over
//! ssh otherwise. Each probe reports its clock and whether each ring address
//! of its rank is assigned on its host. It listens on each free ring port,
//! reports the busy ones, and checks the command at the path the launcher
//! resolved. Once every probe listens, each rank connects to its right
//! neighbour's ring addresses, the direction in which MLX's ring sends. For
//! the nccl and jaccl backends, rank 0 listens on the coordinator address
//! instead and every other rank connects to it.
//!
//! # Limitations
//!
//! - The probe is this `ringleader` binary, so it must exist at the same path
//!   on every remote host; a row says so when it does not.
//! - Clocks are compared with the launcher's clock when the probe's line
//!   arrives, so the transport's latency adds to the measured offset.

pub mod probe;

use std::fmt::Write as _;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::sync::oneshot;

use crate::exec::{ByteWriter, RankSignal, RankSpec, SpawnError, Spawned, Spawner};
use crate::hostfile::{is_local_name, Hostfile};

/// Largest clock difference from the launcher that still passes.
pub const CLOCK_TOLERANCE: Duration = Duration::from_secs(1);

/// Settings of a doctor run, from the command line.
#[derive(Clone, Debug)]
pub struct DoctorOptions {
    /// Ports to check and connections to make.
    pub edges: Edges,
    /// The command's absolute path, resolved on the launcher's host.
    pub command: Option<PathBuf>,
    /// The program that runs the probe on each host: this binary.
    pub probe_program: PathBuf,
    /// Time each stage (start and report, then connect) may take.
    pub stage_timeout: Duration,
}

/// The result of one check.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Status {
    Ok,
    Failed,
    /// Not run, because an earlier check on which it depends failed.
    Skipped,
}

/// One line of the report.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Row {
    /// The check: `ssh`, `local`, `clock`, `address`, `port`, `command` or `edge`.
    pub check: &'static str,
    /// The rank and host, or for `edge` the two ranks.
    pub subject: String,
    pub status: Status,
    pub detail: String,
}

impl Row {
    fn new(check: &'static str, subject: &str, status: Status, detail: impl Into<String>) -> Row {
        Row { check, subject: subject.to_string(), status, detail: detail.into() }
    }
}

/// A probe's state between the two stages.
struct Started {
    rows: Vec<Row>,
    /// Ring addresses of this rank where the probe listens.
    listening: Vec<String>,
    /// Whether the probe reached `ready` and takes connect requests.
    running: bool,
}

/// Runs every probe and returns the report's rows in rank order.
pub async fn diagnose(hostfile: &Hostfile, options: &DoctorOptions, spawner: Arc<dyn Spawner>) -> Vec<Row> {
    let ranks = hostfile.hosts.len();
    let mut stage_one = Vec::with_capacity(ranks);
    let mut targets_senders = Vec::with_capacity(ranks);
    let mut connected_receivers = Vec::with_capacity(ranks);
    let mut finish_senders = Vec::with_capacity(ranks);
    let mut tasks = Vec::with_capacity(ranks);
    for (rank, host) in hostfile.hosts.iter().enumerate() {
        let mut env = vec![(probe::ADDRESSES_VAR.to_string(), options.edges.listen.get(rank).cloned().unwrap_or_default().join(","))];
        if let Some(command) = &options.command {
            env.push((probe::COMMAND_VAR.to_string(), command.display().to_string()));
        }
        let spec = RankSpec {
            rank,
            host: host.ssh.clone(),
            ssh: host.target.clone(),
            argv: vec![options.probe_program.display().to_string(), "doctor".into(), "--probe".into()],
            env,
            files: Vec::new(),
            cwd: None,
            default_cwd: None,
            stdin: true,
        };
        let (started_tx, started_rx) = oneshot::channel();
        let (targets_tx, targets_rx) = oneshot::channel();
        let (connected_tx, connected_rx) = oneshot::channel();
        let (finish_tx, finish_rx) = oneshot::channel();
        let stages = ProbeStages { started: started_tx, targets: targets_rx, connected: connected_tx, finish: finish_rx };
        let spawner = spawner.clone();
        let timeout = options.stage_timeout;
        tasks.push(tokio::spawn(async move { run_probe(spawner, spec, timeout, stages).await }));
        stage_one.push(started_rx);
        targets_senders.push(targets_tx);
        connected_receivers.push(connected_rx);
        finish_senders.push(finish_tx);
    }

    let mut started = Vec::with_capacity(ranks);
    for receiver in stage_one {
        started.push(receiver.await.unwrap_or(Started { rows: Vec::new(), listening: Vec::new(), running: false }));
    }

    let mut edge_rows: Vec<Vec<Row>> = vec![Vec::new(); ranks];
    for (rank, sender) in targets_senders.into_iter().enumerate() {
        let mut targets = Vec::new();
        let peer = options.edges.peers.get(rank).copied().flatten().filter(|&peer| peer < ranks);
        if let Some(peer) = peer {
            let subject = edge_subject(hostfile, rank, peer);
            if !started[rank].running {
                let detail = format!("rank {rank}'s probe is not running");
                edge_rows[rank].push(Row::new("edge", &subject, Status::Skipped, detail));
            } else {
                for address in options.edges.listen.get(peer).into_iter().flatten() {
                    if started[peer].listening.contains(address) {
                        targets.push(address.clone());
                    } else {
                        let detail = format!("{address}: rank {peer} could not listen there");
                        edge_rows[rank].push(Row::new("edge", &subject, Status::Skipped, detail));
                    }
                }
            }
        }
        let _ = sender.send(targets);
    }

    let mut all_connections = Vec::with_capacity(ranks);
    for receiver in connected_receivers {
        all_connections.push(receiver.await.unwrap_or_default());
    }
    // Every probe keeps its ports open until all connections are made.
    for sender in finish_senders {
        let _ = sender.send(());
    }
    for task in tasks {
        let _ = task.await;
    }

    let mut rows = Vec::new();
    for (rank, connections) in all_connections.into_iter().enumerate() {
        rows.extend(std::mem::take(&mut started[rank].rows));
        let peer = options.edges.peers.get(rank).copied().flatten().unwrap_or(rank);
        let subject = edge_subject(hostfile, rank, peer);
        for (address, result) in connections {
            let row = match result {
                Ok(()) => Row::new("edge", &subject, Status::Ok, address),
                Err(error) => Row::new("edge", &subject, Status::Failed, format!("{address}: {error}")),
            };
            rows.push(row);
        }
        rows.extend(std::mem::take(&mut edge_rows[rank]));
    }
    rows
}

/// The connections a job makes, as doctor checks them.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Edges {
    /// Addresses each rank listens on in the job, `ip:port`: its ring
    /// addresses, or for the nccl and jaccl backends rank 0's coordinator.
    pub listen: Vec<Vec<String>>,
    /// The rank whose `listen` addresses each rank connects to, if any.
    pub peers: Vec<Option<usize>>,
}

impl Edges {
    /// Builds the edges of a ring, where rank i connects to rank i+1.
    pub fn ring(ring_table: Vec<Vec<String>>) -> Edges {
        let ranks = ring_table.len();
        let peers = (0..ranks).map(|rank| (ranks > 1).then_some((rank + 1) % ranks)).collect();
        Edges { listen: ring_table, peers }
    }

    /// Builds the edges of a coordinator backend: rank 0 listens on
    /// `coordinator` and every other rank connects to it.
    pub fn coordinator(ranks: usize, coordinator: String) -> Edges {
        let mut listen = vec![Vec::new(); ranks];
        listen[0].push(coordinator);
        let peers = (0..ranks).map(|rank| (rank > 0).then_some(0)).collect();
        Edges { listen, peers }
    }

    /// Builds edges that check no port, for `ranks` ranks.
    pub fn none(ranks: usize) -> Edges {
        Edges { listen: vec![Vec::new(); ranks], peers: vec![None; ranks] }
    }
}

fn edge_subject(hostfile: &Hostfile, from: usize, to: usize) -> String {
    let hosts = &hostfile.hosts;
    format!("rank {from} ({}) -> rank {to} ({})", hosts[from].ssh, hosts[to].ssh)
}

type Connections = Vec<(String, Result<(), String>)>;

/// The channels between one probe's task and [`diagnose`], in protocol order.
struct ProbeStages {
    /// Carries the first stage's rows once the probe listens on its ports.
    started: oneshot::Sender<Started>,
    /// Receives the addresses to connect to, once every probe has started.
    targets: oneshot::Receiver<Vec<String>>,
    /// Carries the result of each connection.
    connected: oneshot::Sender<Connections>,
    /// Fires when every probe has connected, so the probe may close its ports.
    finish: oneshot::Receiver<()>,
}

/// Runs one probe through both stages, keeping it alive until `finish`.
async fn run_probe(spawner: Arc<dyn Spawner>, spec: RankSpec, timeout: Duration, stages: ProbeStages) {
    let ProbeStages { started, targets, connected, finish } = stages;
    let subject = format!("rank {} ({})", spec.rank, spec.host);
    let transport = if is_local_name(&spec.host) { "local" } else { "ssh" };
    let spawned = match tokio::time::timeout(timeout, spawner.spawn(&spec)).await {
        Ok(Ok(spawned)) => spawned,
        Ok(Err(error)) => {
            let rows = vec![Row::new(transport, &subject, Status::Failed, spawn_failure(&error, &spec))];
            let _ = started.send(Started { rows, listening: Vec::new(), running: false });
            return;
        }
        Err(_) => {
            let detail = format!("the probe did not start within {} s", timeout.as_secs_f64());
            let _ = started.send(Started { rows: vec![Row::new(transport, &subject, Status::Failed, detail)], listening: Vec::new(), running: false });
            return;
        }
    };
    let Spawned { stdin, stdout, mut stderr, wait, control, .. } = spawned;
    let stderr_text = tokio::spawn(async move {
        let mut text = String::new();
        let _ = stderr.read_to_string(&mut text).await;
        text
    });
    let mut lines = BufReader::new(stdout).lines();

    let mut report = Started { rows: vec![Row::new(transport, &subject, Status::Ok, "")], listening: Vec::new(), running: false };
    let stage_one = tokio::time::timeout(timeout, async {
        while let Ok(Some(line)) = lines.next_line().await {
            if line == "ready" {
                return true;
            }
            read_report_line(&line, &subject, &mut report);
        }
        false
    })
    .await;
    if stage_one != Ok(true) {
        let _ = control.signal(RankSignal::Kill).await;
        let error = stderr_text.await.unwrap_or_default();
        let detail = match stage_one {
            Err(_) => format!("the probe did not report within {} s", timeout.as_secs_f64()),
            Ok(_) => format!("the probe ended early: {}", error.trim()),
        };
        report.rows.push(Row::new("probe", &subject, Status::Failed, detail));
        let _ = started.send(report);
        let _ = tokio::time::timeout(timeout, wait).await;
        return;
    }
    report.running = true;
    let _ = started.send(report);

    let targets = targets.await.unwrap_or_default();
    let mut stdin = stdin;
    let mut results = connect_stage(stdin.as_mut(), &mut lines, &targets, timeout).await;
    let complete = results.len() == targets.len();
    for missing in targets.iter().skip(results.len()) {
        results.push((missing.clone(), Err("the probe did not report this connection".into())));
    }
    let _ = connected.send(results);

    let _ = finish.await;
    if let Some(mut stdin) = stdin {
        let _ = stdin.write_all(b"done\n").await;
    }
    if !complete {
        let _ = control.signal(RankSignal::Kill).await;
    }
    let _ = tokio::time::timeout(timeout, wait).await;
}

/// Sends the connect requests and reads one result per target.
async fn connect_stage(
    stdin: Option<&mut ByteWriter>,
    lines: &mut tokio::io::Lines<BufReader<crate::exec::ByteReader>>,
    targets: &[String],
    timeout: Duration,
) -> Connections {
    let mut results = Vec::new();
    let Some(stdin) = stdin else {
        return results;
    };
    let mut requests = String::new();
    for target in targets {
        let _ = writeln!(requests, "connect {target}");
    }
    if stdin.write_all(requests.as_bytes()).await.is_err() || stdin.flush().await.is_err() {
        return results;
    }
    let per_target = timeout + probe::CONNECT_TIMEOUT * targets.len() as u32;
    let _ = tokio::time::timeout(per_target, async {
        while results.len() < targets.len() {
            let Ok(Some(line)) = lines.next_line().await else { break };
            let Some(rest) = line.strip_prefix("connect ") else { continue };
            let (address, result) = rest.split_once(' ').unwrap_or((rest, "failed"));
            let outcome = match result {
                "ok" => Ok(()),
                other => Err(other.strip_prefix("failed ").unwrap_or(other).to_string()),
            };
            results.push((address.to_string(), outcome));
        }
    })
    .await;
    results
}

/// Turns one line of the probe's first stage into a row.
fn read_report_line(line: &str, subject: &str, report: &mut Started) {
    let mut words = line.splitn(3, ' ');
    let (Some(kind), Some(what)) = (words.next(), words.next()) else {
        return;
    };
    let result = words.next().unwrap_or("");
    let row = match kind {
        "clock" => clock_row(subject, what),
        "address" => match result {
            "ok" => Row::new("address", subject, Status::Ok, what),
            "unassigned" => Row::new("address", subject, Status::Failed, format!("{what} is not assigned to any interface on this host")),
            other => Row::new("address", subject, Status::Failed, format!("{what}: {}", other.trim_start_matches("failed "))),
        },
        "port" => match result {
            "ok" => {
                report.listening.push(what.to_string());
                Row::new("port", subject, Status::Ok, what)
            }
            "busy" => Row::new("port", subject, Status::Failed, format!("{what} is already in use")),
            "unassigned" => Row::new("port", subject, Status::Skipped, format!("{what}: its address is not assigned")),
            other => Row::new("port", subject, Status::Failed, format!("{what}: {}", other.trim_start_matches("failed "))),
        },
        "command" => match result {
            "ok" => Row::new("command", subject, Status::Ok, what),
            "not-executable" => Row::new("command", subject, Status::Failed, format!("{what} is not executable")),
            _ => Row::new("command", subject, Status::Failed, format!("{what} does not exist on this host")),
        },
        _ => return,
    };
    report.rows.push(row);
}

fn clock_row(subject: &str, remote: &str) -> Row {
    let now = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default().as_secs_f64();
    let Ok(remote) = remote.parse::<f64>() else {
        return Row::new("clock", subject, Status::Failed, format!("unreadable clock {remote:?}"));
    };
    let offset = remote - now;
    let detail = format!("{offset:+.3} s from the launcher");
    if offset.abs() <= CLOCK_TOLERANCE.as_secs_f64() {
        Row::new("clock", subject, Status::Ok, detail)
    } else {
        Row::new("clock", subject, Status::Failed, format!("{detail}, more than {} s", CLOCK_TOLERANCE.as_secs()))
    }
}

fn spawn_failure(error: &SpawnError, spec: &RankSpec) -> String {
    match error {
        SpawnError::RemoteStart { .. } | SpawnError::CommandNotFound { .. } => format!(
            "{error}; the probe is this ringleader binary, install it at {} on the host",
            spec.argv[0]
        ),
        other => other.to_string(),
    }
}

/// Renders the rows as an aligned table, followed by one line per failure.
pub fn render(rows: &[Row]) -> String {
    let subject_width = rows.iter().map(|r| r.subject.len()).max().unwrap_or(0).max("WHERE".len());
    let mut text = format!("{:<8} {:<subject_width$} {:<7} DETAIL\n", "CHECK", "WHERE", "RESULT");
    for row in rows {
        let status = match row.status {
            Status::Ok => "ok",
            Status::Failed => "FAILED",
            Status::Skipped => "skipped",
        };
        // A multi-line detail (ssh's message and its hint) would break the
        // table; the full text follows the table in the failure list.
        let detail = row.detail.lines().next().unwrap_or_default();
        let line = format!("{:<8} {:<subject_width$} {:<7} {}", row.check, row.subject, status, detail);
        text += line.trim_end();
        text += "\n";
    }
    text
}

/// Lists the failures as sentences, such as "rank 2 (c) cannot reach
/// rank 3 (d) at 10.0.0.4:32326: Connection refused".
pub fn failures(rows: &[Row]) -> Vec<String> {
    rows.iter()
        .filter(|row| row.status == Status::Failed)
        .map(|row| match row.check {
            "edge" => {
                let (from, to) = row.subject.split_once(" -> ").unwrap_or((&row.subject, ""));
                format!("{from} cannot reach {to} at {}", row.detail)
            }
            check => format!("{}: {check} check failed: {}", row.subject, row.detail),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn report_lines_become_rows() {
        let mut report = Started { rows: Vec::new(), listening: Vec::new(), running: false };
        for line in [
            "address 10.0.0.1 ok",
            "address 203.0.113.7 unassigned",
            "port 10.0.0.1:5000 ok",
            "port 10.0.0.1:5001 busy",
            "port 203.0.113.7:5002 unassigned",
            "command /usr/bin/job missing",
            "unknown line",
        ] {
            read_report_line(line, "rank 0 (a)", &mut report);
        }
        let statuses: Vec<(&str, Status)> = report.rows.iter().map(|r| (r.check, r.status)).collect();
        assert_eq!(
            statuses,
            [
                ("address", Status::Ok),
                ("address", Status::Failed),
                ("port", Status::Ok),
                ("port", Status::Failed),
                ("port", Status::Skipped),
                ("command", Status::Failed),
            ]
        );
        assert_eq!(report.listening, ["10.0.0.1:5000"]);
        assert_eq!(report.rows[3].detail, "10.0.0.1:5001 is already in use");
    }

    #[test]
    fn clock_outside_tolerance_fails() {
        let now = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).unwrap().as_secs_f64();
        assert_eq!(clock_row("r", &format!("{:.3}", now)).status, Status::Ok);
        assert_eq!(clock_row("r", &format!("{:.3}", now + 5.0)).status, Status::Failed);
        assert_eq!(clock_row("r", "soon").status, Status::Failed);
    }

    #[test]
    fn edge_failures_name_both_ranks_and_the_address() {
        let rows = [Row::new("edge", "rank 2 (c) -> rank 3 (d)", Status::Failed, "10.0.0.4:32326: Connection refused")];
        assert_eq!(failures(&rows), ["rank 2 (c) cannot reach rank 3 (d) at 10.0.0.4:32326: Connection refused"]);
    }

    #[test]
    fn multi_line_detail_keeps_one_row() {
        let rows = vec![Row {
            check: "ssh",
            subject: "node01".into(),
            status: Status::Failed,
            detail: "Connection refused\nhint: check that `ssh node01 true` works".into(),
        }];
        let table = render(&rows);
        assert_eq!(table.lines().count(), 2, "{table}");
        assert!(table.lines().nth(1).unwrap().ends_with("FAILED  Connection refused"), "{table}");
        assert!(failures(&rows)[0].contains("hint: check that"), "{:?}", failures(&rows));
    }
}
