//! Simulated processes on one host: rank programs run as tasks, grouped
//! into process groups, with output pipes, stdin and signals.
//!
//! A program is an async Rust function that gets a [`RankContext`] and
//! returns its exit code. SIGTERM and SIGINT end a process unless it called
//! [`RankContext::catch_signals`], after which they arrive as messages and
//! the program decides; SIGKILL always ends it. Children started with
//! [`RankContext::spawn_child`] join the parent's process group, so a
//! signal to the group reaches them too.

use std::collections::BTreeMap;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};

use ringleader::exec::Termination;
use tokio::sync::{mpsc, oneshot};
use tokio::task::AbortHandle;

use crate::log::{Event, EventLog};

/// Chunks an output pipe buffers before a writer waits, like a full pipe buffer.
const PIPE_CHUNKS: usize = 16;

/// The signals a simulated process can get.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SimSignal {
    Interrupt,
    Terminate,
    Kill,
}

impl SimSignal {
    pub fn number(self) -> i32 {
        match self {
            SimSignal::Interrupt => 2,
            SimSignal::Terminate => 15,
            SimSignal::Kill => 9,
        }
    }

    pub fn from_number(number: i32) -> Option<SimSignal> {
        match number {
            2 => Some(SimSignal::Interrupt),
            15 => Some(SimSignal::Terminate),
            9 => Some(SimSignal::Kill),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            SimSignal::Interrupt => "SIGINT",
            SimSignal::Terminate => "SIGTERM",
            SimSignal::Kill => "SIGKILL",
        }
    }
}

/// A rank program: takes its context, returns its exit code.
pub type Program =
    Arc<dyn Fn(RankContext) -> Pin<Box<dyn Future<Output = i32> + Send>> + Send + Sync>;

/// Programs by name; a rank's `argv[0]` picks one.
#[derive(Clone, Default)]
pub struct Programs {
    by_name: BTreeMap<String, Program>,
}

impl Programs {
    pub fn register<F, Fut>(&mut self, name: &str, program: F)
    where
        F: Fn(RankContext) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = i32> + Send + 'static,
    {
        self.by_name.insert(
            name.to_string(),
            Arc::new(move |context| Box::pin(program(context))),
        );
    }

    pub fn get(&self, name: &str) -> Option<Program> {
        self.by_name.get(name).cloned()
    }

    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.by_name.keys().map(String::as_str)
    }
}

/// The write end of a rank's stdout or stderr, shared by its children.
/// The reader sees end of file once every clone is dropped.
#[derive(Clone)]
pub struct OutputPipe {
    tx: mpsc::Sender<Vec<u8>>,
    rank: usize,
    stream: u8,
    log: EventLog,
}

impl OutputPipe {
    /// Writes `bytes`, waiting while the pipe is full. Fails with
    /// [`io::ErrorKind::BrokenPipe`] once the reader is gone.
    pub async fn write_all(&self, bytes: &[u8]) -> io::Result<()> {
        self.tx.send(bytes.to_vec()).await.map_err(|_| {
            io::Error::new(
                io::ErrorKind::BrokenPipe,
                "the rank's output pipe is closed",
            )
        })?;
        self.log.produced(self.rank, self.stream, bytes);
        Ok(())
    }

    /// Writes `text` and a newline in one write.
    pub async fn line(&self, text: &str) -> io::Result<()> {
        self.write_all(format!("{text}\n").as_bytes()).await
    }
}

/// Creates a pipe for `(rank, stream)`.
pub fn output_pipe(
    rank: usize,
    stream: u8,
    log: &EventLog,
) -> (OutputPipe, mpsc::Receiver<Vec<u8>>) {
    let (tx, rx) = mpsc::channel(PIPE_CHUNKS);
    (
        OutputPipe {
            tx,
            rank,
            stream,
            log: log.clone(),
        },
        rx,
    )
}

/// The read end of a rank's stdin.
pub struct InputPipe {
    rx: mpsc::UnboundedReceiver<Vec<u8>>,
}

impl InputPipe {
    pub fn new(rx: mpsc::UnboundedReceiver<Vec<u8>>) -> InputPipe {
        InputPipe { rx }
    }

    /// Returns the next chunk, or `None` at end of file.
    pub async fn read(&mut self) -> Option<Vec<u8>> {
        self.rx.recv().await
    }
}

/// The view a program has of its process.
pub struct RankContext {
    pub rank: usize,
    pub host: String,
    pub pid: u32,
    pub argv: Vec<String>,
    pub env: BTreeMap<String, String>,
    /// Rank files by the path their variable points to.
    pub files: BTreeMap<String, String>,
    pub stdout: OutputPipe,
    pub stderr: OutputPipe,
    /// `None` when the rank's stdin is `/dev/null`.
    pub stdin: Option<InputPipe>,
    pub log: EventLog,
    table: ProcessTable,
}

impl RankContext {
    pub fn env(&self, key: &str) -> Option<&str> {
        self.env.get(key).map(String::as_str)
    }

    /// Handles SIGTERM and SIGINT from now on: they arrive on the returned
    /// receiver instead of ending the process. SIGKILL still ends it.
    pub fn catch_signals(&self) -> mpsc::UnboundedReceiver<SimSignal> {
        let (tx, rx) = mpsc::unbounded_channel();
        self.table.set_catcher(self.pid, tx);
        rx
    }

    /// Starts `argv` as a child in this process's group, sharing its output
    /// pipes and with no stdin. Returns the child's pid.
    pub fn spawn_child(&self, argv: Vec<String>) -> io::Result<u32> {
        let group = self
            .table
            .group_of(self.pid)
            .ok_or_else(|| io::Error::other("the parent has ended"))?;
        let spec = ProcessSpec {
            rank: self.rank,
            argv,
            env: self.env.clone(),
            files: self.files.clone(),
            group: Some(group),
            stdout: self.stdout.clone(),
            stderr: self.stderr.clone(),
            stdin: None,
        };
        self.table
            .spawn(spec)
            .map(|(pid, _)| pid)
            .map_err(io::Error::other)
    }
}

/// The process [`ProcessTable::spawn`] starts.
pub struct ProcessSpec {
    pub rank: usize,
    pub argv: Vec<String>,
    pub env: BTreeMap<String, String>,
    pub files: BTreeMap<String, String>,
    /// The group to join; `None` makes the process lead a new group.
    pub group: Option<u32>,
    pub stdout: OutputPipe,
    pub stderr: OutputPipe,
    pub stdin: Option<InputPipe>,
}

struct Process {
    group: u32,
    rank: usize,
    abort: Option<AbortHandle>,
    /// The receiver of caught SIGTERM and SIGINT, once the program requested them.
    catcher: Option<mpsc::UnboundedSender<SimSignal>>,
    /// Told how the process ended.
    ended: Option<oneshot::Sender<Termination>>,
}

/// The processes of one host. Clones share the table.
#[derive(Clone)]
pub struct ProcessTable {
    inner: Arc<Mutex<TableInner>>,
    host: String,
    log: EventLog,
    programs: Programs,
}

struct TableInner {
    next_pid: u32,
    processes: BTreeMap<u32, Process>,
}

impl ProcessTable {
    pub fn new(host: &str, log: &EventLog, programs: &Programs) -> ProcessTable {
        ProcessTable {
            inner: Arc::new(Mutex::new(TableInner {
                next_pid: 100,
                processes: BTreeMap::new(),
            })),
            host: host.to_string(),
            log: log.clone(),
            programs: programs.clone(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, TableInner> {
        self.inner
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Starts a process and returns its pid and a receiver of how it ended.
    pub fn spawn(
        &self,
        spec: ProcessSpec,
    ) -> Result<(u32, oneshot::Receiver<Termination>), String> {
        let name = spec.argv.first().cloned().unwrap_or_default();
        let program = self
            .programs
            .get(&name)
            .ok_or_else(|| format!("command not found: {name}"))?;
        let (ended_tx, ended_rx) = oneshot::channel();
        let pid = {
            let mut inner = self.lock();
            let pid = inner.next_pid;
            inner.next_pid += 1;
            let group = spec.group.unwrap_or(pid);
            inner.processes.insert(
                pid,
                Process {
                    group,
                    rank: spec.rank,
                    abort: None,
                    catcher: None,
                    ended: Some(ended_tx),
                },
            );
            self.log.record(Event::ProcessStarted {
                host: self.host.clone(),
                pid,
                group,
                rank: spec.rank,
            });
            pid
        };

        let context = RankContext {
            rank: spec.rank,
            host: self.host.clone(),
            pid,
            argv: spec.argv,
            env: spec.env,
            files: spec.files,
            stdout: spec.stdout,
            stderr: spec.stderr,
            stdin: spec.stdin,
            log: self.log.clone(),
            table: self.clone(),
        };
        let table = self.clone();
        let gone = GoneGuard {
            log: self.log.clone(),
            host: self.host.clone(),
            pid,
            rank: spec.rank,
        };
        let task = tokio::spawn(async move {
            let _gone = gone;
            let code = program(context).await;
            table.end(pid, Termination::Exited(code));
        });
        if let Some(process) = self.lock().processes.get_mut(&pid) {
            process.abort = Some(task.abort_handle());
        }
        Ok((pid, ended_rx))
    }

    /// Records that `pid` ended, if it had not already, and stops its task.
    fn end(&self, pid: u32, how: Termination) {
        let Some(mut process) = self.lock().processes.remove(&pid) else {
            return;
        };
        self.log.record(Event::ProcessEnded {
            host: self.host.clone(),
            pid,
            rank: process.rank,
            how: how.to_string(),
        });
        if let Some(abort) = process.abort.take() {
            abort.abort();
        }
        if let Some(ended) = process.ended.take() {
            let _ = ended.send(how);
        }
    }

    fn set_catcher(&self, pid: u32, catcher: mpsc::UnboundedSender<SimSignal>) {
        if let Some(process) = self.lock().processes.get_mut(&pid) {
            process.catcher = Some(catcher);
        }
    }

    fn group_of(&self, pid: u32) -> Option<u32> {
        self.lock().processes.get(&pid).map(|p| p.group)
    }

    /// Delivers `signal` to every process of `group`, as `kill(-group)` does.
    /// `source` names who sent it, for the log.
    pub fn signal_group(&self, group: u32, signal: SimSignal, source: &str) {
        let members: Vec<(u32, usize, Option<mpsc::UnboundedSender<SimSignal>>)> = self
            .lock()
            .processes
            .iter()
            .filter(|(_, p)| p.group == group)
            .map(|(pid, p)| (*pid, p.rank, p.catcher.clone()))
            .collect();
        if let Some((_, rank, _)) = members.first() {
            self.log.record(Event::GroupSignalled {
                host: self.host.clone(),
                rank: *rank,
                signal: signal.name().to_string(),
                source: source.to_string(),
            });
        }
        for (pid, _, catcher) in members {
            let caught =
                signal != SimSignal::Kill && catcher.is_some_and(|c| c.send(signal).is_ok());
            if !caught {
                self.end(pid, Termination::Signaled(signal.number()));
            }
        }
    }

    /// Returns whether any process of `group` is still running.
    pub fn group_alive(&self, group: u32) -> bool {
        self.lock().processes.values().any(|p| p.group == group)
    }

    /// Ends `pid` as if it had called `exit(code)`.
    pub fn force_exit(&self, pid: u32, code: i32) {
        self.end(pid, Termination::Exited(code));
    }

    /// Returns the pid of `rank`'s group leader, if one runs.
    pub fn leader_of_rank(&self, rank: usize) -> Option<u32> {
        self.lock()
            .processes
            .iter()
            .find(|(pid, p)| p.rank == rank && p.group == **pid)
            .map(|(pid, _)| *pid)
    }
}

/// Records [`Event::ProcessGone`] when a process's task is dropped, whether
/// it returned, was killed or its host crashed.
struct GoneGuard {
    log: EventLog,
    host: String,
    pid: u32,
    rank: usize,
}

impl Drop for GoneGuard {
    fn drop(&mut self) {
        self.log.record(Event::ProcessGone {
            host: self.host.clone(),
            pid: self.pid,
            rank: self.rank,
        });
    }
}
