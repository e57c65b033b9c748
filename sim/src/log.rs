//! The recorded event log of one simulated run, which the invariants are
//! checked on and the determinism check compares.
//!
//! Every component of the simulation (agents, rank programs, the spawner,
//! the driver loop) appends to one shared [`EventLog`]. Times are simulated
//! milliseconds, set by the driver loop before each step, so two runs of the
//! same seed produce equal logs.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard};

use serde::Serialize;

use crate::fault::Fault;

/// Stream numbers of a rank's stdout and stderr.
pub const STDOUT: u8 = 1;
pub const STDERR: u8 = 2;

/// One thing that happened, as seen by the component that recorded it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum Event {
    /// The driver loop applied a scheduled fault.
    FaultApplied { fault: Fault },
    /// A simulated process started on a host; `group` is its process group.
    ProcessStarted {
        host: String,
        pid: u32,
        group: u32,
        rank: usize,
    },
    /// The agent observed a process end (`exit code N` or `killed by SIGx`).
    ProcessEnded {
        host: String,
        pid: u32,
        rank: usize,
        how: String,
    },
    /// The process's task was dropped: nothing of it runs any more.
    ProcessGone { host: String, pid: u32, rank: usize },
    /// A signal reached a rank's process group; `source` is `launcher`,
    /// `agent` (its own teardown) or `fault`.
    GroupSignalled {
        host: String,
        rank: usize,
        signal: String,
        source: String,
    },
    /// An agent began stopping a rank on its own, and why.
    AgentStopping {
        host: String,
        rank: usize,
        reason: String,
    },
    /// The spawner asked a rank's agent to deliver a signal.
    LauncherSentSignal { rank: usize, signal: String },
    /// The spawner lost a rank's session.
    SessionLost { rank: usize, reason: String },
    /// The launcher itself received SIGINT or SIGTERM.
    LauncherSignalled { signal: String },
    /// A collective returned the values it should.
    CollectiveOk { rank: usize, iteration: usize },
    /// A collective returned an error.
    CollectiveFailed {
        rank: usize,
        iteration: usize,
        error: String,
    },
    /// A collective returned without error but with wrong values.
    CollectiveWrong {
        rank: usize,
        iteration: usize,
        detail: String,
    },
    /// `supervise` returned.
    LauncherReturned { exit_code: i32 },
}

/// An event with the simulated time it happened at.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Record {
    pub at_ms: u64,
    #[serde(flatten)]
    pub event: Event,
}

/// A shared, append-only log; clones refer to the same log.
#[derive(Clone, Default)]
pub struct EventLog {
    inner: Arc<Mutex<Inner>>,
}

/// Everything one run recorded.
#[derive(Clone, Debug, Default)]
pub struct Inner {
    pub now_ms: u64,
    pub records: Vec<Record>,
    /// Bytes each rank's processes wrote, per `(rank, stream)`.
    pub produced: BTreeMap<(usize, u8), Vec<u8>>,
    /// Bytes of each `(rank, stream)` that reached the launcher's spawner.
    pub reached: BTreeMap<(usize, u8), Vec<u8>>,
    /// The bytes the launcher wrote to its own stdout and stderr.
    pub launcher_stdout: Vec<u8>,
    pub launcher_stderr: Vec<u8>,
    /// Processes whose task still exists, by `(host, pid)`, with their rank.
    pub alive: BTreeMap<(String, u32), usize>,
    /// The host whose tasks are being dropped by a crash, if any.
    crashing: Option<String>,
}

impl EventLog {
    pub fn new() -> EventLog {
        EventLog::default()
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic elsewhere in the simulation must not hide the log.
        self.inner
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    pub fn set_now(&self, now_ms: u64) {
        self.lock().now_ms = now_ms;
    }

    pub fn now_ms(&self) -> u64 {
        self.lock().now_ms
    }

    pub fn record(&self, event: Event) {
        let mut inner = self.lock();
        // A crash drops a host's tasks in an order that depends on tokio's
        // process-wide task ids, so `end_crash` records them instead, by pid.
        if let (Event::ProcessGone { host, .. }, Some(crashing)) = (&event, &inner.crashing) {
            if host == crashing {
                return;
            }
        }
        tracing::debug!(at_ms = inner.now_ms, ?event, "sim event");
        let at_ms = inner.now_ms;
        match &event {
            Event::ProcessStarted {
                host, pid, rank, ..
            } => {
                inner.alive.insert((host.clone(), *pid), *rank);
            }
            Event::ProcessGone { host, pid, .. } => {
                inner.alive.remove(&(host.clone(), *pid));
            }
            _ => {}
        }
        inner.records.push(Record { at_ms, event });
    }

    pub fn produced(&self, rank: usize, stream: u8, bytes: &[u8]) {
        self.lock()
            .produced
            .entry((rank, stream))
            .or_default()
            .extend_from_slice(bytes);
    }

    pub fn reached(&self, rank: usize, stream: u8, bytes: &[u8]) {
        self.lock()
            .reached
            .entry((rank, stream))
            .or_default()
            .extend_from_slice(bytes);
    }

    pub fn launcher_output(&self, stream: u8, bytes: &[u8]) {
        let mut inner = self.lock();
        match stream {
            STDOUT => inner.launcher_stdout.extend_from_slice(bytes),
            _ => inner.launcher_stderr.extend_from_slice(bytes),
        }
    }

    /// Starts ignoring [`Event::ProcessGone`] of `host` while its tasks are dropped.
    pub fn begin_crash(&self, host: &str) {
        self.lock().crashing = Some(host.to_string());
    }

    /// Records every process of `host` as gone, in pid order.
    pub fn end_crash(&self, host: &str) {
        let gone: Vec<(u32, usize)> = {
            let mut inner = self.lock();
            inner.crashing = None;
            inner
                .alive
                .iter()
                .filter(|((h, _), _)| h == host)
                .map(|((_, pid), rank)| (*pid, *rank))
                .collect()
        };
        for (pid, rank) in gone {
            self.record(Event::ProcessGone {
                host: host.to_string(),
                pid,
                rank,
            });
        }
    }

    /// Returns the number of processes whose task still exists.
    pub fn alive_count(&self) -> usize {
        self.lock().alive.len()
    }

    /// Returns a copy of everything recorded so far.
    pub fn snapshot(&self) -> Inner {
        self.lock().clone()
    }
}
