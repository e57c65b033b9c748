//! [`SimSpawner`]: the launcher's process transport against the simulated
//! sshd agents, over simulated TCP.
//!
//! It keeps the ssh transport's session rules: one connection per rank and
//! a heartbeat every half keepalive interval. A session counts as lost once
//! nothing arrived from the agent for `keepalive_count_max` intervals, or
//! the connection broke before the exit status came. The rank's `wait` then
//! fails, which the supervisor reports with exit code 255.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use ringleader::exec::{
    BoxFuture, ByteReader, ByteWriter, RankControl, RankSignal, RankSpec, SpawnError, Spawned,
    Spawner, Termination,
};
use ringleader::net::Net;
use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::Instant;
use turmoil::net::tcp::{OwnedReadHalf, OwnedWriteHalf};

use crate::log::{Event, EventLog, STDERR, STDOUT};
use crate::net::SimNet;
use crate::wire::{read_frame, write_frame, Frame, StartRequest, AGENT_PORT};

/// Bytes buffered between a session and the supervisor's reader, like a pipe.
const PIPE_BYTES: usize = 64 * 1024;

/// Session settings, the simulated counterparts of the ssh transport's.
#[derive(Clone, Copy, Debug)]
pub struct SessionOptions {
    pub keepalive_interval: Duration,
    pub keepalive_count_max: u32,
}

impl SessionOptions {
    /// Returns how long a session may stay silent before it counts as lost.
    pub fn silence_limit(&self) -> Duration {
        self.keepalive_interval * self.keepalive_count_max.max(1)
    }
}

/// Starts ranks on simulated hosts through their agents.
#[derive(Clone)]
pub struct SimSpawner {
    net: SimNet,
    log: EventLog,
    options: SessionOptions,
    /// Set when the launcher process exits: every session closes, as the
    /// ssh clients of an exiting launcher would.
    shutdown: Arc<watch::Sender<bool>>,
}

impl SimSpawner {
    pub fn new(log: &EventLog, options: SessionOptions) -> SimSpawner {
        SimSpawner {
            net: SimNet::default(),
            log: log.clone(),
            options,
            shutdown: Arc::new(watch::channel(false).0),
        }
    }

    /// Closes every session, as the launcher's exit does.
    pub fn shutdown(&self) {
        self.shutdown.send_replace(true);
    }

    async fn start(&self, spec: &RankSpec) -> Result<Spawned, SpawnError> {
        let ssh_error = |message: String| SpawnError::Ssh {
            rank: spec.rank,
            host: spec.host.clone(),
            message,
        };
        let ip = turmoil::lookup(spec.host.as_str());
        let stream = self
            .net
            .connect(SocketAddr::new(ip, AGENT_PORT))
            .await
            .map_err(|error| {
                ssh_error(format!("connect to {}:{AGENT_PORT}: {error}", spec.host))
            })?;
        let (mut reader, mut writer) = stream.into_split();

        let request = StartRequest {
            rank: spec.rank,
            argv: spec.argv.clone(),
            env: spec.env.clone(),
            files: spec
                .files
                .iter()
                .map(|f| (f.env_var.clone(), f.contents.to_string()))
                .collect(),
            stdin: spec.stdin,
        };
        let json = serde_json::to_vec(&request).expect("a start request serializes");
        write_frame(&mut writer, &Frame::Start(json))
            .await
            .map_err(|error| ssh_error(error.to_string()))?;
        let reply =
            tokio::time::timeout(self.options.silence_limit(), read_frame(&mut reader)).await;
        let pid = match reply {
            Ok(Ok(Some(Frame::Started(pid)))) => pid,
            Ok(Ok(Some(Frame::StartFailed(message))))
                if message.starts_with("command not found") =>
            {
                return Err(SpawnError::CommandNotFound {
                    command: spec.argv.first().cloned().unwrap_or_default(),
                });
            }
            Ok(Ok(Some(Frame::StartFailed(message)))) => {
                return Err(SpawnError::RemoteStart {
                    rank: spec.rank,
                    host: spec.host.clone(),
                    message,
                });
            }
            Ok(Ok(_)) => {
                return Err(ssh_error(
                    "the agent closed the session before the rank started".into(),
                ))
            }
            Ok(Err(error)) => return Err(ssh_error(error.to_string())),
            Err(_) => {
                return Err(ssh_error(
                    "the agent did not answer the start request".into(),
                ))
            }
        };

        let (stdout_ours, stdout_theirs) = tokio::io::duplex(PIPE_BYTES);
        let (stderr_ours, stderr_theirs) = tokio::io::duplex(PIPE_BYTES);
        let (stdin_theirs, stdin_ours) = match spec.stdin {
            true => {
                let (theirs, ours) = tokio::io::duplex(PIPE_BYTES);
                (Some(Box::new(theirs) as ByteWriter), Some(ours))
            }
            false => (None, None),
        };
        let (exit_tx, exit_rx) = oneshot::channel();
        let (signal_tx, signal_rx) = mpsc::unbounded_channel();
        let session = Session {
            rank: spec.rank,
            host: spec.host.clone(),
            log: self.log.clone(),
            options: self.options,
            exit: Some(exit_tx),
        };
        let shutdown = self.shutdown.subscribe();
        let outputs = [stdout_ours, stderr_ours];
        tokio::spawn(session.run(reader, writer, outputs, stdin_ours, signal_rx, shutdown));

        let host = spec.host.clone();
        let wait = Box::pin(async move {
            exit_rx.await.unwrap_or_else(|_| {
                Err(lost_error(&host, "the session task ended without a status"))
            })
        });
        Ok(Spawned {
            pid: Some(pid),
            stdin: stdin_theirs,
            stdout: Box::new(stdout_theirs) as ByteReader,
            stderr: Box::new(stderr_theirs) as ByteReader,
            wait,
            control: Box::new(SimControl {
                rank: spec.rank,
                log: self.log.clone(),
                signals: signal_tx,
            }),
        })
    }
}

impl Spawner for SimSpawner {
    fn spawn<'a>(&'a self, spec: &'a RankSpec) -> BoxFuture<'a, Result<Spawned, SpawnError>> {
        Box::pin(self.start(spec))
    }
}

fn lost_error(host: &str, reason: &str) -> io::Error {
    io::Error::new(
        io::ErrorKind::ConnectionAborted,
        format!("the session to {host} was lost: {reason}"),
    )
}

/// Forwards the supervisor's signals to the session task.
struct SimControl {
    rank: usize,
    log: EventLog,
    signals: mpsc::UnboundedSender<RankSignal>,
}

impl RankControl for SimControl {
    fn signal(&self, signal: RankSignal) -> BoxFuture<'_, io::Result<()>> {
        self.log.record(Event::LauncherSentSignal {
            rank: self.rank,
            signal: signal.as_nix().as_str().to_string(),
        });
        // A session that already ended has nothing left to signal.
        let _ = self.signals.send(signal);
        Box::pin(async { Ok(()) })
    }
}

/// The launcher's side of one rank session.
struct Session {
    rank: usize,
    host: String,
    log: EventLog,
    options: SessionOptions,
    /// Resolves the rank's `wait`; taken when the status or the loss is known.
    exit: Option<oneshot::Sender<io::Result<Termination>>>,
}

impl Session {
    async fn run(
        mut self,
        reader: OwnedReadHalf,
        writer: OwnedWriteHalf,
        outputs: [DuplexStream; 2],
        mut stdin: Option<DuplexStream>,
        mut signals: mpsc::UnboundedReceiver<RankSignal>,
        mut shutdown: watch::Receiver<bool>,
    ) {
        let (out_tx, out_rx) = mpsc::unbounded_channel();
        let writer_task = tokio::spawn(write_frames(writer, out_rx));
        let (in_tx, mut incoming) = mpsc::unbounded_channel();
        let (heard_tx, heard) = watch::channel(Instant::now());
        let reader_task = tokio::spawn(read_frames(
            reader,
            outputs,
            in_tx,
            heard_tx,
            self.rank,
            self.log.clone(),
        ));
        let mut heartbeat = tokio::time::interval(self.options.keepalive_interval / 2);
        let mut stdin_buffer = vec![0u8; PIPE_BYTES];

        loop {
            tokio::select! {
                frame = incoming.recv() => match frame {
                    Some(Frame::Exited(code, signal)) => {
                        let termination = if signal >= 0 { Termination::Signaled(signal) } else { Termination::Exited(code) };
                        self.finish(Ok(termination));
                    }
                    Some(_) => {}
                    None => {
                        self.lose("the agent closed the connection before the rank's exit status arrived");
                        break;
                    }
                },
                Some(signal) = signals.recv() => {
                    let _ = out_tx.send(Frame::Signal(signal.as_nix() as i32));
                }
                read = read_stdin(&mut stdin, &mut stdin_buffer) => match read {
                    Some(n) => { let _ = out_tx.send(Frame::Stdin(stdin_buffer[..n].to_vec())); }
                    None => {
                        stdin = None;
                        let _ = out_tx.send(Frame::StdinEof);
                    }
                },
                _ = heartbeat.tick() => {
                    let _ = out_tx.send(Frame::Heartbeat);
                    let limit = self.options.silence_limit();
                    if heard.borrow().elapsed() > limit {
                        self.lose(&format!("no reply from the agent for {} ms", limit.as_millis()));
                        break;
                    }
                }
                _ = shutdown.changed() => {
                    self.lose("the launcher exited");
                    break;
                }
            }
        }
        // Dropping the halves closes the connection, which the agent takes as
        // the launcher being gone.
        reader_task.abort();
        writer_task.abort();
    }

    fn finish(&mut self, result: io::Result<Termination>) {
        if let Some(exit) = self.exit.take() {
            let _ = exit.send(result);
        }
    }

    /// Reports the session lost unless the rank's status already arrived.
    fn lose(&mut self, reason: &str) {
        if self.exit.is_some() {
            self.log.record(Event::SessionLost {
                rank: self.rank,
                reason: reason.to_string(),
            });
            let error = lost_error(&self.host, reason);
            self.finish(Err(error));
        }
    }
}

/// Reads the launcher's stdin for a rank; pending forever once there is none.
async fn read_stdin(stdin: &mut Option<DuplexStream>, buffer: &mut [u8]) -> Option<usize> {
    match stdin {
        Some(stream) => match stream.read(buffer).await {
            Ok(0) | Err(_) => None,
            Ok(n) => Some(n),
        },
        None => std::future::pending().await,
    }
}

async fn write_frames(mut writer: OwnedWriteHalf, mut frames: mpsc::UnboundedReceiver<Frame>) {
    while let Some(frame) = frames.recv().await {
        if write_frame(&mut writer, &frame).await.is_err() {
            return;
        }
    }
}

/// Reads the agent's frames: output goes straight into the rank's pipes (so
/// a slow supervisor slows the agent down), the rest to the session loop.
async fn read_frames(
    mut reader: OwnedReadHalf,
    outputs: [DuplexStream; 2],
    frames: mpsc::UnboundedSender<Frame>,
    heard: watch::Sender<Instant>,
    rank: usize,
    log: EventLog,
) {
    let mut outputs = outputs.map(Some);
    while let Ok(Some(frame)) = read_frame(&mut reader).await {
        heard.send_replace(Instant::now());
        match frame {
            Frame::Output(stream @ (STDOUT | STDERR), bytes) => {
                log.reached(rank, stream, &bytes);
                if let Some(pipe) = outputs[stream as usize - 1].as_mut() {
                    if pipe.write_all(&bytes).await.is_err() {
                        outputs[stream as usize - 1] = None;
                    }
                }
            }
            Frame::OutputEof(stream @ (STDOUT | STDERR)) => outputs[stream as usize - 1] = None,
            frame => {
                if frames.send(frame).is_err() {
                    return;
                }
            }
        }
    }
}
