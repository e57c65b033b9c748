//! The supervisor: one event loop that starts the ranks, forwards their
//! output and input, notices the first failure, tears the job down and
//! decides the exit code.
//!
//! Each rank has a task that starts it through the [`Spawner`], forwards its
//! signals and reports [`Event`]s. The loop in [`supervise`] owns every piece
//! of user-visible state and talks to rank tasks only through channels.
//! Teardown escalates: SIGINT or SIGTERM to every rank's process group, then
//! SIGKILL when the grace period ends or a second launcher signal arrives.

use std::io;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::AsyncWriteExt;
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;

use crate::exec::{ByteReader, ByteWriter, RankSignal, RankSpec, Spawner, Termination};
use crate::exit::{self, LauncherSignal, Outcome};
use crate::output::{self, StreamWriter};
use crate::stdin;

mod report;

pub use report::{summary, RankReport, RankState, Report, StopCause};

/// Time a rank's output may take to reach end-of-file after its process
/// group is gone, before the rank's escaped processes are looked for.
const ESCAPE_CHECK_DELAY: Duration = Duration::from_millis(100);

/// A signal equal to the previous one and this close to it is the same
/// request delivered twice (GNU timeout signals the launcher, then its whole
/// process group), not a second request to stop at once.
const SIGNAL_REPEAT_WINDOW: Duration = Duration::from_millis(250);

/// Supervision settings from the command line.
#[derive(Clone, Debug)]
pub struct SupervisorOptions {
    /// Time between SIGTERM (or SIGINT) and SIGKILL.
    pub grace: Duration,
    /// Whole-job limit; `None` waits forever.
    pub timeout: Option<Duration>,
    pub tag_output: bool,
    pub output_dir: Option<PathBuf>,
    /// How long to wait for ranks to end after SIGKILL before reporting them
    /// as not confirmed dead (a remote host may be unreachable).
    pub kill_confirm: Duration,
}

/// The launcher's own streams and signals, so tests and the simulator can supply their own.
pub struct LauncherIo {
    pub stdout: ByteWriter,
    pub stderr: ByteWriter,
    /// The launcher's stdin, read only if some rank takes stdin.
    pub stdin: Option<ByteReader>,
    pub signals: mpsc::UnboundedReceiver<LauncherSignal>,
    /// Whether stdout and stderr are the same file (a terminal, or `2>&1`):
    /// then one writer takes both, so lines stay whole across the two.
    pub merge_streams: bool,
    /// Whether stdout and stderr collect small writes themselves, as an
    /// [`output::BlockingSink`] does, so the writers add no buffer of their own.
    pub buffered_streams: bool,
}

/// Messages from rank tasks to the loop.
#[derive(Debug)]
enum Event {
    Started { rank: usize, pid: Option<u32> },
    SpawnFailed { rank: usize, error: String },
    /// Teardown started while the rank was starting; its start was abandoned.
    NotStarted { rank: usize },
    Ended { rank: usize, result: io::Result<Termination> },
    /// Everything the rank wrote has reached the launcher's streams, or the
    /// task stopped waiting for a pipe that a stray process keeps open.
    Finished { rank: usize },
}

/// The loop's state.
struct Supervisor {
    reports: Vec<RankReport>,
    /// Per rank, the sender that forwards signals to its task.
    controls: Vec<mpsc::UnboundedSender<RankSignal>>,
    outcome: Outcome,
    /// The reason for teardown, once it started.
    stopping: Option<StopCause>,
    /// When the grace period ends and SIGKILL goes out.
    kill_at: Option<Instant>,
    /// When to give up waiting for killed ranks, once SIGKILL went out.
    give_up_at: Option<Instant>,
    options: SupervisorOptions,
    /// The rank [`SimulatorHooks::forget_rank`] names, which the planted bug never signals.
    forgotten: Option<usize>,
    /// The launcher's last signal and when it arrived.
    last_signal: Option<(LauncherSignal, Instant)>,
    /// Set to true when teardown starts, so ranks still starting give up.
    stopping_tx: watch::Sender<bool>,
}

/// Runs the job described by `ranks` to completion and returns its report.
/// The summary of failed and stopped ranks has been written to `io.stderr`.
pub async fn supervise(
    ranks: &[RankSpec],
    spawner: Arc<dyn Spawner>,
    options: SupervisorOptions,
    io: LauncherIo,
) -> Report {
    supervise_with_hooks(ranks, spawner, options, io, SimulatorHooks::default()).await
}

/// Simulator settings for [`supervise`]. The `ringleader` command line
/// never sets them, and the defaults change nothing.
#[doc(hidden)]
#[derive(Default)]
pub struct SimulatorHooks {
    /// A deliberate defect, for the simulator's test that its seed sweep
    /// finds and shrinks a real teardown bug: the supervisor never signals
    /// this rank.
    pub forget_rank: Option<usize>,
    /// Destination of the summary when a rank that was not confirmed dead
    /// still keeps `io.stderr`. `None` means the process's stderr.
    pub summary_fallback: Option<ByteWriter>,
}

/// [`supervise`] with the simulator's hooks.
#[doc(hidden)]
pub async fn supervise_with_hooks(
    ranks: &[RankSpec],
    spawner: Arc<dyn Spawner>,
    options: SupervisorOptions,
    io: LauncherIo,
    hooks: SimulatorHooks,
) -> Report {
    let SimulatorHooks { forget_rank, summary_fallback } = hooks;
    let LauncherIo { stdout, stderr, stdin, mut signals, merge_streams, buffered_streams } = io;
    // Source 2r is rank r's stdout and 2r + 1 its stderr, in either writer.
    let sources = 2 * ranks.len();
    let labels = options.tag_output.then(|| tag_labels(ranks));
    let buffer = if buffered_streams { 0 } else { output::SINK_BUFFER };
    let (stdout_writer, stdout_done) = output::start_writer(stdout, buffer, sources, labels.clone());
    // Two writers on one file would interleave their buffers mid-line.
    let (stderr_writer, stderr_done, mut stderr) = if merge_streams {
        (stdout_writer.clone(), None, Some(stderr))
    } else {
        let (writer, done) = output::start_writer(stderr, buffer, sources, labels);
        (writer, Some(done), None)
    };

    let (events_tx, mut events) = mpsc::unbounded_channel();
    let stdin_registry = stdin::start_broadcast(stdin, ranks.iter().any(|r| r.stdin));
    let mut supervisor = Supervisor::new(ranks, options.clone());
    supervisor.forgotten = forget_rank;
    for spec in ranks {
        let (control_tx, control_rx) = mpsc::unbounded_channel();
        supervisor.controls.push(control_tx);
        let task = RankTask {
            spec: spec.clone(),
            spawner: spawner.clone(),
            controls: control_rx,
            stopping: (forget_rank != Some(spec.rank)).then(|| supervisor.stopping_tx.subscribe()),
            events: events_tx.clone(),
            stdout: stdout_writer.clone(),
            stderr: stderr_writer.clone(),
            stdin: stdin_registry.clone(),
            output_dir: options.output_dir.clone(),
            drain_limit: options.grace.max(Duration::from_secs(1)),
        };
        tokio::spawn(task.run());
    }
    let output_lost = [stdout_writer.lost(), stderr_writer.lost()];
    drop((events_tx, stdin_registry, stdout_writer, stderr_writer));

    let timeout_at = options.timeout.map(|limit| Instant::now() + limit);
    while !supervisor.all_finished() {
        tokio::select! {
            event = events.recv() => match event {
                Some(event) => supervisor.on_event(event),
                // Every rank task is gone, so nothing is left to wait for.
                None => break,
            },
            Some(signal) = signals.recv() => supervisor.on_signal(signal),
            _ = sleep_until(timeout_at), if supervisor.stopping.is_none() => {
                supervisor.outcome.timed_out = true;
                supervisor.stop(StopCause::Timeout);
            }
            _ = sleep_until(supervisor.kill_at), if supervisor.give_up_at.is_none() => supervisor.kill_all(),
            _ = sleep_until(supervisor.give_up_at) => break,
        }
    }

    let mut report = supervisor.into_report();
    // The writers finish once every rank task dropped its clone. Tasks of
    // ranks not confirmed dead may still keep theirs, so the wait is bounded.
    let ended = tokio::time::timeout(Duration::from_secs(1), async {
        let stdout_end = stdout_done.await.ok();
        let stderr_end = match stderr_done {
            Some(done) => done.await.ok(),
            None => None,
        };
        (stdout_end, stderr_end)
    })
    .await;
    if output_lost.iter().any(|lost| lost.load(std::sync::atomic::Ordering::Relaxed)) {
        report.outcome.output_lost = true;
        report.exit_code = exit::exit_code(&report.outcome);
    }
    let mut text = summary(&report);
    if let Ok((stdout_end, stderr_end)) = ended {
        // On a shared file, a rank's unterminated last line must not run into the summary.
        if merge_streams && stdout_end.as_ref().is_some_and(|end| end.mid_line) && !text.is_empty() {
            text.insert(0, '\n');
        }
        if let Some(end) = stderr_end {
            stderr = Some(end.sink);
        }
    } else {
        stderr = None;
    }
    if !text.is_empty() {
        let mut sink = match stderr.or(summary_fallback) {
            Some(sink) => sink,
            None => Box::new(tokio::io::stderr()) as ByteWriter,
        };
        // A reader that stopped reading (a pager, a full pipe) must not keep
        // the launcher from ending: a signal gives up on the summary.
        tokio::select! {
            _ = async {
                let _ = sink.write_all(text.as_bytes()).await;
                let _ = sink.flush().await;
            } => {}
            Some(signal) = signals.recv() => {
                tracing::debug!(signal = signal.name(), "the summary could not be written; ending without it");
            }
        }
    }
    report
}

/// Resolves once `stopping` is true; never without a receiver.
async fn stop_requested(stopping: Option<&mut watch::Receiver<bool>>) {
    let Some(stopping) = stopping else {
        return std::future::pending().await;
    };
    // An error means the supervisor is gone, and with it anyone waiting for
    // the rank, so giving up the start is right then too.
    let _ = stopping.wait_for(|stopping| *stopping).await;
}

/// Sleeps until `at`, or forever when it is `None`.
async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

fn tag_labels(ranks: &[RankSpec]) -> Vec<String> {
    let width = ranks.len().saturating_sub(1).to_string().len();
    // One label for each rank's stdout and one for its stderr.
    ranks
        .iter()
        .flat_map(|r| {
            let label = format!("[{:>width$} {}] ", r.rank, r.host);
            [label.clone(), label]
        })
        .collect()
}

impl Supervisor {
    fn new(ranks: &[RankSpec], options: SupervisorOptions) -> Supervisor {
        Supervisor {
            reports: ranks.iter().map(RankReport::new).collect(),
            controls: Vec::with_capacity(ranks.len()),
            outcome: Outcome::default(),
            stopping: None,
            kill_at: None,
            give_up_at: None,
            last_signal: None,
            stopping_tx: watch::channel(false).0,
            options,
            forgotten: None,
        }
    }

    fn all_finished(&self) -> bool {
        self.reports.iter().all(|r| r.finished)
    }

    fn on_event(&mut self, event: Event) {
        tracing::debug!(?event, "rank event");
        match event {
            Event::Started { rank, pid } => {
                self.reports[rank].pid = pid;
                self.reports[rank].state = RankState::Running;
                tracing::info!(rank, host = %self.reports[rank].host, pid, "rank started");
            }
            Event::NotStarted { rank } => {
                tracing::info!(rank, "the job stopped before the rank started; not starting it");
                self.reports[rank].finished = true;
            }
            Event::SpawnFailed { rank, error } => {
                self.reports[rank].state = RankState::SpawnFailed(error);
                self.reports[rank].finished = true;
                if self.stopping.is_none() {
                    self.outcome.spawn_failed = true;
                    self.stop(StopCause::RankFailed(rank));
                }
            }
            Event::Ended { rank, result } => self.on_rank_ended(rank, result),
            Event::Finished { rank } => self.reports[rank].finished = true,
        }
    }

    fn on_rank_ended(&mut self, rank: usize, result: io::Result<Termination>) {
        let termination = match result {
            Ok(termination) => {
                self.reports[rank].state = RankState::Ended(termination);
                termination
            }
            Err(error) => {
                // The transport lost track of the rank (an ssh session that
                // died, say); count it as a failure with ssh's own code.
                tracing::error!(rank, %error, "lost the rank");
                self.reports[rank].state = RankState::Lost(error_chain(&error));
                Termination::Exited(exit::LOST_RANK)
            }
        };
        tracing::info!(rank, %termination, "rank ended");
        if !termination.success() && self.stopping.is_none() {
            self.outcome.first_failure = Some((rank, termination));
            self.stop(StopCause::RankFailed(rank));
        }
    }

    fn on_signal(&mut self, signal: LauncherSignal) {
        tracing::info!(signal = signal.name(), "launcher received a signal");
        let now = Instant::now();
        let repeat = self
            .last_signal
            .is_some_and(|(last, at)| last == signal && now.duration_since(at) < SIGNAL_REPEAT_WINDOW);
        self.last_signal = Some((signal, now));
        if repeat {
            // timeout(1) and a terminal's process-group signals can deliver
            // one request twice within microseconds; only a later one means
            // "stop now".
            tracing::debug!(signal = signal.name(), "the same signal again at once; taken as one request");
            return;
        }
        if self.stopping.is_none() {
            self.outcome.interrupted = Some(signal);
            self.stop(StopCause::Signal(signal));
        } else if self.give_up_at.is_none() {
            // A signal during teardown means "now": skip the rest of the grace period.
            self.kill_all();
        }
    }

    /// Starts teardown: the first signal to every rank that has not ended.
    fn stop(&mut self, cause: StopCause) {
        tracing::info!(?cause, "stopping the job");
        self.stopping = Some(cause);
        self.stopping_tx.send_replace(true);
        let signal = match cause {
            StopCause::Signal(LauncherSignal::Interrupt) => RankSignal::Interrupt,
            _ => RankSignal::Terminate,
        };
        for (rank, report) in self.reports.iter_mut().enumerate() {
            if report.is_alive() && self.forgotten != Some(rank) {
                report.stopped_by = Some(cause);
                let _ = self.controls[rank].send(signal);
            }
        }
        self.kill_at = Some(Instant::now() + self.options.grace);
    }

    fn kill_all(&mut self) {
        for (rank, report) in self.reports.iter_mut().enumerate() {
            // A rank that ended may still be stopping what it left behind.
            if !report.finished && self.forgotten != Some(rank) {
                if report.is_alive() {
                    tracing::info!(rank, "sending SIGKILL");
                    report.killed = true;
                }
                let _ = self.controls[rank].send(RankSignal::Kill);
            }
        }
        self.give_up_at = Some(Instant::now() + self.options.kill_confirm);
    }

    fn into_report(mut self) -> Report {
        for report in &mut self.reports {
            if !report.finished && matches!(report.state, RankState::Running | RankState::Starting) {
                report.state = RankState::Unconfirmed;
            }
        }
        let exit_code = exit::exit_code(&self.outcome);
        Report {
            ranks: self.reports,
            outcome: self.outcome,
            exit_code,
        }
    }
}

/// One rank's task: start it, relay signals, wait for its end and its output.
struct RankTask {
    spec: RankSpec,
    spawner: Arc<dyn Spawner>,
    controls: mpsc::UnboundedReceiver<RankSignal>,
    /// A flag that becomes true when teardown starts. It is `None` for the
    /// rank that the planted simulator bug omits.
    stopping: Option<watch::Receiver<bool>>,
    events: mpsc::UnboundedSender<Event>,
    stdout: StreamWriter,
    stderr: StreamWriter,
    stdin: stdin::Registry,
    output_dir: Option<PathBuf>,
    /// How long to wait for the output pipes to close after the rank ended.
    drain_limit: Duration,
}

impl RankTask {
    async fn run(mut self) {
        let rank = self.spec.rank;
        // A start still under way when teardown begins is abandoned: the
        // spawner's future is dropped, which ends an ssh client still
        // connecting. Signals sent while the rank is starting otherwise wait
        // in `controls` and are delivered as soon as it runs.
        let spawn = self.spawner.spawn(&self.spec);
        let started = tokio::select! {
            biased;
            () = stop_requested(self.stopping.as_mut()) => None,
            result = spawn => Some(result),
        };
        let spawned = match started {
            None => {
                let _ = self.events.send(Event::NotStarted { rank });
                return;
            }
            Some(Ok(spawned)) => spawned,
            Some(Err(error)) => {
                let _ = self.events.send(Event::SpawnFailed { rank, error: error_chain(&error) });
                return;
            }
        };
        let _ = self.events.send(Event::Started { rank, pid: spawned.pid });

        let (stdout_copy, stderr_copy) = self.open_copies().await;
        let stdout = self.stdout.clone();
        let stderr = self.stderr.clone();
        let pump_out = tokio::spawn(async move { stdout.pump(2 * rank, spawned.stdout, stdout_copy).await });
        let pump_err = tokio::spawn(async move { stderr.pump(2 * rank + 1, spawned.stderr, stderr_copy).await });
        if let Some(writer) = spawned.stdin {
            self.stdin.register(rank, writer);
        }
        drop(self.stdin);

        let control = spawned.control;
        let mut wait = spawned.wait;
        let result = loop {
            tokio::select! {
                result = &mut wait => break result,
                Some(signal) = self.controls.recv() => {
                    if let Err(error) = control.signal(signal).await {
                        tracing::warn!(rank, %error, ?signal, "signalling the rank failed");
                    }
                }
            }
        };
        let _ = self.events.send(Event::Ended { rank, result });

        // Stop what the rank left behind and forward the rest of its output,
        // still relaying signals: SIGKILL must reach lingering leftovers.
        let drain_limit = self.drain_limit;
        let cleanup = async {
            control.finish().await;
            let pumps = async {
                let _ = pump_out.await;
                let _ = pump_err.await;
            };
            tokio::pin!(pumps);
            if tokio::time::timeout(ESCAPE_CHECK_DELAY, &mut pumps).await.is_ok() {
                return;
            }
            // Pipes still open after the group is gone are usually held by
            // a process that left the group.
            for process in control.stop_escaped().await {
                tracing::warn!(rank, %process, "a process had left the rank's process group and kept its output open; stopped it");
            }
            if tokio::time::timeout(drain_limit, pumps).await.is_err() {
                tracing::warn!(
                    rank,
                    "the rank ended but its output was not fully forwarded: a process outside its process group holds its pipe open, or nothing reads the launcher's output; not waiting for it"
                );
            }
        };
        tokio::pin!(cleanup);
        loop {
            tokio::select! {
                () = &mut cleanup => break,
                Some(signal) = self.controls.recv() => {
                    if let Err(error) = control.signal(signal).await {
                        tracing::warn!(rank, %error, ?signal, "signalling the rank's leftovers failed");
                    }
                }
            }
        }
        let _ = self.events.send(Event::Finished { rank });
    }

    async fn open_copies(&self) -> (Option<ByteWriter>, Option<ByteWriter>) {
        let Some(dir) = &self.output_dir else {
            return (None, None);
        };
        match output::open_rank_files(dir, self.spec.rank).await {
            Ok((out, err)) => (Some(out), Some(err)),
            Err(error) => {
                tracing::error!(rank = self.spec.rank, dir = %dir.display(), %error, "cannot create the rank's output files");
                (None, None)
            }
        }
    }
}

/// Formats an error with its sources, as "outer: inner: innermost".
fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text += &format!(": {cause}");
        source = cause.source();
    }
    text
}
