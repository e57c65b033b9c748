//! One simulated run: a turmoil world with a launcher client and one agent
//! per host, the real planner and supervisor, the faults of a schedule
//! applied at their times, and the invariants checked on the log afterwards.

use std::collections::BTreeMap;
use std::io::Cursor;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, UNIX_EPOCH};

use ringleader::cli::{Backend, StdinMode};
use ringleader::exec::{ByteReader, SshTarget};
use ringleader::exit::LauncherSignal;
use ringleader::hostfile::{Host, Hostfile};
use ringleader::plan::{self, LaunchPlan, PlanOptions};
use ringleader::supervisor::{
    supervise_with_hooks, LauncherIo, Report, SimulatorHooks, SupervisorOptions,
};
use tokio::io::AsyncWrite;
use tokio::sync::mpsc;
use turmoil::Sim;

use crate::agent::{self, AgentConfig, FaultInbox, HostFault};
use crate::check::{self, Violation};
use crate::fault::{host_name, Fault, Node, TimedFault};
use crate::log::{Event, EventLog, Inner, STDERR, STDOUT};
use crate::programs;
use crate::scenario::Scenario;
use crate::spawner::{SessionOptions, SimSpawner};

/// First ring port, as `mlx.launch` uses by default.
const STARTING_PORT: u16 = 5000;

/// Timing of the simulated cluster, in simulated time.
#[derive(Clone, Copy, Debug)]
pub struct Timing {
    /// How much simulated time one step advances every host.
    pub tick: Duration,
    /// Upper bound of random per-message network latency.
    pub max_latency: Duration,
    /// The supervisor's and agents' time between SIGTERM and SIGKILL.
    pub grace: Duration,
    pub keepalive_interval: Duration,
    pub keepalive_count_max: u32,
    /// The supervisor's wait for ranks after SIGKILL.
    pub kill_confirm: Duration,
}

impl Default for Timing {
    fn default() -> Self {
        Timing {
            tick: Duration::from_millis(1),
            max_latency: Duration::from_millis(5),
            grace: Duration::from_secs(1),
            keepalive_interval: Duration::from_secs(1),
            keepalive_count_max: 3,
            kill_confirm: Duration::from_secs(3),
        }
    }
}

impl Timing {
    /// Returns how long teardown may take once it starts. That is the grace
    /// period plus the time a lost session needs to be noticed, which is one
    /// keepalive interval more than the silence limit because the check runs
    /// periodically, plus a margin for network latency and scheduling.
    pub fn teardown_bound(&self) -> Duration {
        self.grace
            + self.keepalive_interval * (self.keepalive_count_max + 1)
            + Duration::from_millis(500)
    }
}

/// A run to perform: scenario, seed, faults and timing.
#[derive(Clone, Debug)]
pub struct RunSpec {
    pub scenario: Scenario,
    pub seed: u64,
    pub faults: Vec<TimedFault>,
    /// Runs the supervisor with its planted bug: it never signals the last rank.
    pub planted_bug: bool,
    pub timing: Timing,
}

impl RunSpec {
    /// Builds the run of `scenario` with the faults its `seed` draws.
    pub fn from_seed(scenario: Scenario, seed: u64) -> RunSpec {
        let faults = scenario.faults_for_seed(seed);
        RunSpec {
            scenario,
            seed,
            faults,
            planted_bug: false,
            timing: Timing::default(),
        }
    }
}

/// Everything a run produced.
#[derive(Clone, Debug)]
pub struct RunResult {
    pub log: Inner,
    pub report: Option<Report>,
    /// When the supervisor returned, in simulated milliseconds.
    pub launcher_returned_ms: Option<u64>,
    /// Simulated time when the run stopped.
    pub end_ms: u64,
    /// Set when turmoil itself failed (a host's software returned an error).
    pub sim_error: Option<String>,
    pub violations: Vec<Violation>,
}

impl RunResult {
    pub fn passed(&self) -> bool {
        self.violations.is_empty()
    }

    pub fn exit_code(&self) -> Option<i32> {
        self.report.as_ref().map(|r| r.exit_code)
    }
}

/// Runs `spec` to the end and checks the invariants.
pub fn run(spec: &RunSpec) -> RunResult {
    let log = EventLog::new();
    let timing = spec.timing;
    let mut sim = turmoil::Builder::new()
        .rng_seed(spec.seed)
        .epoch(UNIX_EPOCH + Duration::from_secs(1_800_000_000))
        .simulation_duration(Duration::from_secs(24 * 3600))
        .tick_duration(timing.tick)
        .max_message_latency(timing.max_latency)
        .build();

    let inboxes = start_hosts(&mut sim, spec, &log);
    let plan = build_plan(&sim, &spec.scenario);
    let (signals, launcher_signals) = mpsc::unbounded_channel();
    let returned: Arc<Mutex<Option<Report>>> = Arc::default();
    start_launcher(
        &mut sim,
        spec,
        &plan,
        &log,
        launcher_signals,
        returned.clone(),
    );

    let mut driver = Driver {
        sim,
        log: log.clone(),
        inboxes,
        signals,
        next_fault: 0,
        links: BTreeMap::new(),
    };
    let outcome = driver.run_until_done(spec, &returned);
    let report = returned.lock().unwrap_or_else(|p| p.into_inner()).take();
    let log = log.snapshot();
    let launcher_returned_ms = log.records.iter().find_map(|r| match r.event {
        Event::LauncherReturned { .. } => Some(r.at_ms),
        _ => None,
    });
    let mut result = RunResult {
        log,
        report,
        launcher_returned_ms,
        end_ms: outcome.end_ms,
        sim_error: outcome.sim_error,
        violations: Vec::new(),
    };
    result.violations = check::all(spec, &result);
    result
}

fn start_hosts(sim: &mut Sim<'_>, spec: &RunSpec, log: &EventLog) -> Vec<FaultInbox> {
    let programs = programs::standard();
    let mut inboxes = Vec::new();
    for index in 0..spec.scenario.hosts {
        let inbox = FaultInbox::default();
        let config = AgentConfig {
            host: host_name(index),
            log: log.clone(),
            programs: programs.clone(),
            keepalive_interval: spec.timing.keepalive_interval,
            keepalive_count_max: spec.timing.keepalive_count_max,
            grace: spec.timing.grace,
            faults: inbox.clone(),
        };
        sim.host(host_name(index), move || agent::serve(config.clone()));
        inboxes.push(inbox);
    }
    inboxes
}

/// Builds the real planner's plan for one rank per simulated host.
fn build_plan(sim: &Sim<'_>, scenario: &Scenario) -> LaunchPlan {
    let hosts = (0..scenario.hosts)
        .map(|index| Host {
            ssh: host_name(index),
            ips: vec![sim.lookup(host_name(index)).to_string()],
            rdma: Vec::new(),
            target: SshTarget::default(),
        })
        .collect();
    let hostfile = Hostfile {
        hosts,
        backend: None,
        envs: Vec::new(),
    };
    let options = PlanOptions {
        backend: Backend::Ring,
        command: scenario.argv.clone(),
        python: None,
        env: Vec::new(),
        cwd: None,
        default_cwd: None,
        starting_port: STARTING_PORT,
        connections_per_ip: 1,
        nccl_port: 12345,
        repeat_hosts: 1,
        verbose: false,
        stdin: if scenario.stdin.is_some() {
            StdinMode::All
        } else {
            StdinMode::None
        },
        terminal_size: None,
    };
    plan::build(&hostfile, &options, &|_| None).expect("every built-in scenario has a valid plan")
}

fn start_launcher(
    sim: &mut Sim<'_>,
    spec: &RunSpec,
    plan: &LaunchPlan,
    log: &EventLog,
    signals: mpsc::UnboundedReceiver<LauncherSignal>,
    returned: Arc<Mutex<Option<Report>>>,
) {
    let timing = spec.timing;
    let options = SupervisorOptions {
        grace: timing.grace,
        timeout: spec.scenario.timeout,
        tag_output: true,
        output_dir: None,
        kill_confirm: timing.kill_confirm,
    };
    let session = SessionOptions {
        keepalive_interval: timing.keepalive_interval,
        keepalive_count_max: timing.keepalive_count_max,
    };
    let ranks = plan.ranks.clone();
    let forget = spec.planted_bug.then(|| ranks.len() - 1);
    let stdin = spec
        .scenario
        .stdin
        .clone()
        .map(|bytes| Box::new(Cursor::new(bytes)) as ByteReader);
    let log = log.clone();
    sim.client("launcher", async move {
        let spawner = SimSpawner::new(&log, session);
        let io = LauncherIo {
            stdout: Box::new(Sink {
                log: log.clone(),
                stream: STDOUT,
            }),
            stderr: Box::new(Sink {
                log: log.clone(),
                stream: STDERR,
            }),
            stdin,
            signals,
            merge_streams: false,
            buffered_streams: false,
        };
        // The summary of a job with ranks not confirmed dead goes to the
        // process's stderr, which is the launcher's stderr here too.
        let hooks = SimulatorHooks {
            forget_rank: forget,
            summary_fallback: Some(Box::new(Sink {
                log: log.clone(),
                stream: STDERR,
            })),
        };
        let report =
            supervise_with_hooks(&ranks, Arc::new(spawner.clone()), options, io, hooks).await;
        log.record(Event::LauncherReturned {
            exit_code: report.exit_code,
        });
        *returned.lock().unwrap_or_else(|p| p.into_inner()) = Some(report);
        // The launcher process exits: its sessions close.
        spawner.shutdown();
        tokio::time::sleep(Duration::from_millis(10)).await;
        Ok(())
    });
}

/// The launcher's stdout or stderr, recorded in the log.
struct Sink {
    log: EventLog,
    stream: u8,
}

impl AsyncWrite for Sink {
    fn poll_write(
        self: Pin<&mut Self>,
        _: &mut Context<'_>,
        bytes: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        self.log.launcher_output(self.stream, bytes);
        Poll::Ready(Ok(bytes.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

/// Steps the world and applies faults at their times.
struct Driver<'a> {
    sim: Sim<'a>,
    log: EventLog,
    inboxes: Vec<FaultInbox>,
    signals: mpsc::UnboundedSender<LauncherSignal>,
    next_fault: usize,
    /// Links the schedule cut or held and has not restored yet.
    links: BTreeMap<(String, String), LinkState>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum LinkState {
    Partitioned,
    Held,
}

/// Returns the key of the link between two nodes, the same both ways round.
fn link(a: Node, b: Node) -> (String, String) {
    let (a, b) = (a.name(), b.name());
    if a <= b {
        (a, b)
    } else {
        (b, a)
    }
}

struct DriveOutcome {
    end_ms: u64,
    sim_error: Option<String>,
}

impl Driver<'_> {
    /// Steps until the launcher returned and every rank process is gone (or
    /// the teardown bound after its return passed), or the deadline passed.
    fn run_until_done(&mut self, spec: &RunSpec, returned: &Mutex<Option<Report>>) -> DriveOutcome {
        let deadline_ms = spec.scenario.deadline.as_millis() as u64;
        let linger_ms = spec.timing.teardown_bound().as_millis() as u64;
        let mut launcher_returned_ms = None;
        loop {
            let now_ms = self.sim.elapsed().as_millis() as u64;
            self.log.set_now(now_ms);
            self.apply_due_faults(spec, now_ms);

            if launcher_returned_ms.is_none()
                && returned.lock().unwrap_or_else(|p| p.into_inner()).is_some()
            {
                launcher_returned_ms = Some(now_ms);
            }
            if let Some(at) = launcher_returned_ms {
                // Keep stepping a little after the return so that the closed
                // sessions reach the agents, and for lost ranks to die.
                let settled = now_ms >= at + 50 && self.log.alive_count() == 0;
                if settled || now_ms >= at + linger_ms {
                    return DriveOutcome {
                        end_ms: now_ms,
                        sim_error: None,
                    };
                }
            }
            if now_ms >= deadline_ms {
                return DriveOutcome {
                    end_ms: now_ms,
                    sim_error: None,
                };
            }
            if let Err(error) = self.sim.step() {
                return DriveOutcome {
                    end_ms: now_ms,
                    sim_error: Some(error.to_string()),
                };
            }
        }
    }

    fn apply_due_faults(&mut self, spec: &RunSpec, now_ms: u64) {
        while let Some(timed) = spec
            .faults
            .get(self.next_fault)
            .filter(|f| f.at_ms <= now_ms)
        {
            self.next_fault += 1;
            self.log.record(Event::FaultApplied {
                fault: timed.fault.clone(),
            });
            self.apply(&timed.fault, spec.scenario.hosts);
        }
    }

    fn apply(&mut self, fault: &Fault, hosts: usize) {
        match *fault {
            Fault::CrashHost { host } if host < hosts => self.crash(host, hosts, false),
            Fault::BounceHost { host } if host < hosts => self.crash(host, hosts, true),
            Fault::Partition { a, b } => {
                self.links.insert(link(a, b), LinkState::Partitioned);
                self.sim.partition(a.name(), b.name());
            }
            Fault::Repair { a, b } | Fault::Release { a, b } => {
                self.links.remove(&link(a, b));
                match fault {
                    Fault::Repair { .. } => self.sim.repair(a.name(), b.name()),
                    _ => self.sim.release(a.name(), b.name()),
                }
            }
            Fault::Hold { a, b } => {
                self.links.insert(link(a, b), LinkState::Held);
                self.sim.hold(a.name(), b.name());
            }
            Fault::Latency { a, b, ms } => {
                self.sim
                    .set_link_latency(a.name(), b.name(), Duration::from_millis(ms))
            }
            Fault::KillRank { rank } => self.host_fault(rank, HostFault::KillRank(rank)),
            Fault::ExitRank { rank, code } => {
                self.host_fault(rank, HostFault::ExitRank(rank, code))
            }
            Fault::InterruptLauncher => self.launcher_signal(LauncherSignal::Interrupt),
            Fault::TerminateLauncher => self.launcher_signal(LauncherSignal::Terminate),
            Fault::CrashHost { .. } | Fault::BounceHost { .. } => {}
        }
    }

    /// Crashes (or, with `restart`, bounces) a host without a word to its
    /// peers, as a power loss would.
    ///
    /// turmoil drops the host's tasks, whose sockets send FIN or RST in
    /// an order set by tokio's process-wide task ids, which would make two
    /// runs of a seed in one process differ. Cutting the host's links while
    /// it goes down drops those messages; the links then return to the state
    /// the schedule gave them. Peers learn of the crash as on a real
    /// network: from a timeout, or from the RST their next segment gets.
    fn crash(&mut self, host: usize, hosts: usize, restart: bool) {
        let name = host_name(host);
        let peers: Vec<Node> = std::iter::once(Node::Launcher)
            .chain((0..hosts).filter(|&h| h != host).map(Node::Host))
            .collect();
        for peer in &peers {
            self.sim.partition(name.as_str(), peer.name());
        }
        self.log.begin_crash(&name);
        if restart {
            self.sim.bounce(name.as_str());
        } else {
            self.sim.crash(name.as_str());
        }
        self.log.end_crash(&name);
        for peer in peers {
            match self.links.get(&link(Node::Host(host), peer)) {
                Some(LinkState::Partitioned) => {}
                Some(LinkState::Held) => {
                    self.sim.repair(name.as_str(), peer.name());
                    self.sim.hold(name.as_str(), peer.name());
                }
                None => self.sim.repair(name.as_str(), peer.name()),
            }
        }
    }

    /// Hands a fault to the agent of the rank's host (rank `r` runs on host `r`).
    fn host_fault(&self, rank: usize, fault: HostFault) {
        let Some(inbox) = self.inboxes.get(rank) else {
            return;
        };
        if let Some(agent) = inbox.lock().unwrap_or_else(|p| p.into_inner()).as_ref() {
            let _ = agent.send(fault);
        }
    }

    fn launcher_signal(&self, signal: LauncherSignal) {
        self.log.record(Event::LauncherSignalled {
            signal: signal.name().to_string(),
        });
        let _ = self.signals.send(signal);
    }
}
