//! The simulated sshd on every host: accepts rank sessions from the
//! launcher's [`SimSpawner`](crate::spawner::SimSpawner), starts the
//! requested program as a process group, streams its output back and
//! delivers the launcher's signals.
//!
//! It keeps the real ssh transport's promise that remote ranks die by
//! themselves: a session whose launcher side closes, or from which no
//! heartbeat arrived for `keepalive_count_max` keepalive intervals, gets its
//! rank stopped (SIGTERM to the group, SIGKILL after the grace period).

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ringleader::exec::Termination;
use tokio::sync::mpsc;
use tokio::time::Instant;
use turmoil::net::{TcpListener, TcpStream};

use crate::log::{Event, EventLog, STDERR, STDOUT};
use crate::process::{output_pipe, InputPipe, ProcessSpec, ProcessTable, Programs, SimSignal};
use crate::wire::{read_frame, write_frame, Frame, StartRequest, AGENT_PORT};

/// Faults the driver loop injects into a host's processes.
#[derive(Clone, Copy, Debug)]
pub enum HostFault {
    /// SIGKILL to the rank's process group, as the OOM killer would.
    KillRank(usize),
    /// The rank's leader exits with this code at once.
    ExitRank(usize, i32),
}

/// The inbox through which the running agent of a host takes [`HostFault`]s.
/// A restart replaces its sender, and it is empty while the host is down.
pub type FaultInbox = Arc<Mutex<Option<mpsc::UnboundedSender<HostFault>>>>;

/// Settings shared by every agent of a cluster.
#[derive(Clone)]
pub struct AgentConfig {
    pub host: String,
    pub log: EventLog,
    pub programs: Programs,
    /// How often the launcher sends heartbeats, times two.
    pub keepalive_interval: Duration,
    /// How many keepalive intervals may pass without a heartbeat.
    pub keepalive_count_max: u32,
    /// Time between SIGTERM and SIGKILL when the agent stops a rank itself.
    pub grace: Duration,
    pub faults: FaultInbox,
}

/// Runs the host's software: listens for sessions until the host crashes.
pub async fn serve(config: AgentConfig) -> turmoil::Result {
    let table = ProcessTable::new(&config.host, &config.log, &config.programs);
    let (fault_tx, mut faults) = mpsc::unbounded_channel();
    *config.faults.lock().unwrap_or_else(|p| p.into_inner()) = Some(fault_tx);
    let listener = TcpListener::bind(("0.0.0.0", AGENT_PORT)).await?;
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let (stream, _peer) = accepted?;
                tokio::spawn(session(stream, table.clone(), config.clone()));
            }
            Some(fault) = faults.recv() => apply_fault(&table, fault),
        }
    }
}

fn apply_fault(table: &ProcessTable, fault: HostFault) {
    match fault {
        HostFault::KillRank(rank) => {
            if let Some(leader) = table.leader_of_rank(rank) {
                table.signal_group(leader, SimSignal::Kill, "fault");
            }
        }
        HostFault::ExitRank(rank, code) => {
            if let Some(leader) = table.leader_of_rank(rank) {
                table.force_exit(leader, code);
            }
        }
    }
}

/// Serves one rank session, from the start request to the rank's exit status.
async fn session(stream: TcpStream, table: ProcessTable, config: AgentConfig) {
    let (mut reader, writer) = stream.into_split();
    let request = match read_frame(&mut reader).await {
        Ok(Some(Frame::Start(json))) => match serde_json::from_slice::<StartRequest>(&json) {
            Ok(request) => request,
            Err(_) => return,
        },
        _ => return,
    };
    let (out_tx, out_rx) = mpsc::channel::<Frame>(64);
    tokio::spawn(write_frames(writer, out_rx));

    let rank = request.rank;
    let (stdout, stdout_rx) = output_pipe(rank, STDOUT, &config.log);
    let (stderr, stderr_rx) = output_pipe(rank, STDERR, &config.log);
    let (stdin_tx, stdin) = match request.stdin {
        true => {
            let (tx, rx) = mpsc::unbounded_channel();
            (Some(tx), Some(InputPipe::new(rx)))
        }
        false => (None, None),
    };
    let (env, files) = rank_environment(&config.host, &request);
    let spec = ProcessSpec {
        rank,
        argv: request.argv,
        env,
        files,
        group: None,
        stdout,
        stderr,
        stdin,
    };
    let (leader, mut ended) = match table.spawn(spec) {
        Ok(started) => started,
        Err(reason) => {
            let _ = out_tx.send(Frame::StartFailed(reason)).await;
            return;
        }
    };
    let _ = out_tx.send(Frame::Started(leader)).await;

    let forward_out = tokio::spawn(forward_output(STDOUT, stdout_rx, out_tx.clone()));
    let forward_err = tokio::spawn(forward_output(STDERR, stderr_rx, out_tx.clone()));
    let (in_tx, mut incoming) = mpsc::unbounded_channel();
    tokio::spawn(read_frames(reader, in_tx));

    let mut rank_session = RankSession {
        config: &config,
        table: &table,
        rank,
        leader,
        stdin: stdin_tx,
        last_heartbeat: Instant::now(),
        kill_at: None,
        launcher_gone: false,
    };
    let mut heartbeat = tokio::time::interval(config.keepalive_interval / 2);
    let termination = loop {
        tokio::select! {
            how = &mut ended => break how.unwrap_or(Termination::Signaled(SimSignal::Kill.number())),
            frame = incoming.recv(), if !rank_session.launcher_gone => rank_session.on_frame(frame),
            _ = heartbeat.tick() => {
                let _ = out_tx.try_send(Frame::Heartbeat);
                rank_session.check_heartbeat();
            }
            _ = sleep_until(rank_session.kill_at) => {
                rank_session.kill_at = None;
                table.signal_group(leader, SimSignal::Kill, "agent");
            }
        }
    };

    // Like the real spawners, the rank's end takes its whole group with it.
    if table.group_alive(leader) {
        table.signal_group(leader, SimSignal::Kill, "agent");
    }
    let _ = forward_out.await;
    let _ = forward_err.await;
    let frame = match termination {
        Termination::Exited(code) => Frame::Exited(code, -1),
        Termination::Signaled(signal) => Frame::Exited(-1, signal),
    };
    let _ = out_tx.send(frame).await;
}

/// Builds the rank's environment, with each rank file at a path of its own.
fn rank_environment(
    host: &str,
    request: &StartRequest,
) -> (BTreeMap<String, String>, BTreeMap<String, String>) {
    let mut env: BTreeMap<String, String> = request.env.iter().cloned().collect();
    let mut files = BTreeMap::new();
    for (variable, contents) in &request.files {
        let path = format!(
            "/sim/{host}/rank-{}/{}",
            request.rank,
            variable.to_ascii_lowercase()
        );
        env.insert(variable.clone(), path.clone());
        files.insert(path, contents.clone());
    }
    (env, files)
}

/// The session state the agent loop changes.
struct RankSession<'a> {
    config: &'a AgentConfig,
    table: &'a ProcessTable,
    rank: usize,
    leader: u32,
    /// Feeds the rank's stdin; dropped at the launcher's end of file.
    stdin: Option<mpsc::UnboundedSender<Vec<u8>>>,
    last_heartbeat: Instant,
    /// When the agent's own teardown sends SIGKILL.
    kill_at: Option<Instant>,
    /// Set once the launcher's side closed or fell silent.
    launcher_gone: bool,
}

impl RankSession<'_> {
    fn on_frame(&mut self, frame: Option<Frame>) {
        self.last_heartbeat = Instant::now();
        match frame {
            Some(Frame::Stdin(bytes)) => {
                if let Some(stdin) = &self.stdin {
                    let _ = stdin.send(bytes);
                }
            }
            Some(Frame::StdinEof) => self.stdin = None,
            Some(Frame::Signal(number)) => {
                if let Some(signal) = SimSignal::from_number(number) {
                    self.table.signal_group(self.leader, signal, "launcher");
                }
            }
            Some(_) => {}
            None => self.stop("the launcher's session closed"),
        }
    }

    fn check_heartbeat(&mut self) {
        let silence = self.config.keepalive_interval * self.config.keepalive_count_max.max(1);
        if !self.launcher_gone && self.last_heartbeat.elapsed() > silence {
            self.stop(&format!(
                "no heartbeat from the launcher for {} ms",
                silence.as_millis()
            ));
        }
    }

    /// Stops the rank because its launcher is gone: SIGTERM now, SIGKILL after the grace period.
    fn stop(&mut self, reason: &str) {
        self.launcher_gone = true;
        self.stdin = None;
        self.config.log.record(Event::AgentStopping {
            host: self.config.host.clone(),
            rank: self.rank,
            reason: reason.to_string(),
        });
        self.table
            .signal_group(self.leader, SimSignal::Terminate, "agent");
        self.kill_at = Some(Instant::now() + self.config.grace);
    }
}

async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

async fn forward_output(stream: u8, mut pipe: mpsc::Receiver<Vec<u8>>, out: mpsc::Sender<Frame>) {
    while let Some(bytes) = pipe.recv().await {
        if out.send(Frame::Output(stream, bytes)).await.is_err() {
            return;
        }
    }
    let _ = out.send(Frame::OutputEof(stream)).await;
}

async fn write_frames(
    mut writer: turmoil::net::tcp::OwnedWriteHalf,
    mut frames: mpsc::Receiver<Frame>,
) {
    while let Some(frame) = frames.recv().await {
        if write_frame(&mut writer, &frame).await.is_err() {
            return;
        }
    }
}

async fn read_frames(
    mut reader: turmoil::net::tcp::OwnedReadHalf,
    frames: mpsc::UnboundedSender<Frame>,
) {
    while let Ok(Some(frame)) = read_frame(&mut reader).await {
        if frames.send(frame).is_err() {
            return;
        }
    }
}
