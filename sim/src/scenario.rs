//! Named scenarios: a cluster size, the rank program, fixed faults and the
//! random faults a seed may add.

use std::time::Duration;

use crate::fault::{random_faults, Fault, FaultMix, Node, TimedFault};

/// One named setup to run with many seeds.
#[derive(Clone, Debug)]
pub struct Scenario {
    pub name: &'static str,
    /// One line for `ringleader-sim list`.
    pub about: &'static str,
    /// Simulated hosts, one rank each.
    pub hosts: usize,
    /// The rank command: a program of [`crate::programs`] and its arguments.
    pub argv: Vec<String>,
    /// Bytes on the launcher's stdin; `Some` also gives every rank a stdin pipe.
    pub stdin: Option<Vec<u8>>,
    /// Faults every run of the scenario gets.
    pub fixed: Vec<TimedFault>,
    /// Faults a seed adds.
    pub mix: FaultMix,
    /// Simulated time after which a launcher that has not returned counts as hung.
    pub deadline: Duration,
    /// The launcher's `--timeout`, if any.
    pub timeout: Option<Duration>,
}

impl Scenario {
    /// Returns the faults of a run with `seed`: the fixed ones plus the seed's own.
    pub fn faults_for_seed(&self, seed: u64) -> Vec<TimedFault> {
        let mut faults = self.fixed.clone();
        faults.extend(random_faults(seed, self.hosts, self.mix));
        faults.sort_by_key(|f| f.at_ms);
        faults
    }
}

fn argv(words: &[&str]) -> Vec<String> {
    words.iter().map(|w| w.to_string()).collect()
}

fn at(at_ms: u64, fault: Fault) -> Vec<TimedFault> {
    vec![TimedFault { at_ms, fault }]
}

/// Returns every scenario that `run`, `sweep` and `list` accept.
pub fn all() -> Vec<Scenario> {
    let any_fault = FaultMix {
        min_faults: 0,
        max_faults: 3,
        horizon_ms: 1500,
        hosts: true,
        links: true,
        ranks: true,
        launcher_signals: true,
    };
    let base = Scenario {
        name: "",
        about: "",
        hosts: 4,
        argv: Vec::new(),
        stdin: None,
        fixed: Vec::new(),
        mix: FaultMix::NONE,
        deadline: Duration::from_secs(30),
        timeout: None,
    };
    vec![
        Scenario {
            name: "all-sum",
            about: "8 ranks loop all_sum/all_gather with checked values; seeds add up to 3 random faults",
            hosts: 8,
            argv: argv(&["ring-loop", "30", "256", "20"]),
            mix: any_fault,
            ..base.clone()
        },
        Scenario {
            name: "all-sum-clean",
            about: "4 ranks loop all_sum/all_gather with no faults; must exit 0",
            argv: argv(&["ring-loop", "10", "1024", "10"]),
            ..base.clone()
        },
        Scenario {
            name: "print",
            about: "4 ranks print 200 lines each and exit 0",
            argv: argv(&["print", "200"]),
            ..base.clone()
        },
        Scenario {
            name: "rank-exit",
            about: "rank 2 exits 3 after 300 ms while the others hang; the launcher must stop them and exit 3",
            argv: argv(&["exit-after", "300", "3", "2"]),
            ..base.clone()
        },
        Scenario {
            name: "host-crash",
            about: "host 2 crashes in the middle of a long all_sum loop",
            argv: argv(&["ring-loop", "1000", "256", "5"]),
            fixed: at(400, Fault::CrashHost { host: 2 }),
            ..base.clone()
        },
        Scenario {
            name: "flood-sigterm",
            about: "4 ranks flood their output and the launcher gets SIGTERM at 150 ms",
            argv: argv(&["flood", "20000"]),
            fixed: at(150, Fault::TerminateLauncher),
            ..base.clone()
        },
        Scenario {
            name: "partition",
            about: "the link between the launcher and host 1 is cut while every rank hangs",
            argv: argv(&["hang"]),
            fixed: at(300, Fault::Partition { a: Node::Launcher, b: Node::Host(1) }),
            ..base.clone()
        },
        Scenario {
            name: "ignore-term",
            about: "ranks ignore SIGTERM and rank 0 exits 1; the others need SIGKILL after the grace period",
            hosts: 3,
            argv: argv(&["ignore-term"]),
            fixed: at(200, Fault::ExitRank { rank: 0, code: 1 }),
            ..base.clone()
        },
        Scenario {
            name: "children",
            about: "each rank starts 2 children; rank 1's group is SIGKILLed and everything must go",
            hosts: 3,
            argv: argv(&["children", "2"]),
            fixed: at(200, Fault::KillRank { rank: 1 }),
            ..base.clone()
        },
        Scenario {
            name: "stdin",
            about: "2 ranks copy the launcher's stdin to their stdout until end of file",
            hosts: 2,
            argv: argv(&["cat"]),
            stdin: Some((0..500).map(|i| format!("input line {i}\n")).collect::<String>().into_bytes()),
            ..base.clone()
        },
        Scenario {
            name: "flood-faults",
            about: "4 ranks flood their output while up to 2 random faults hit hosts, links, ranks or the launcher",
            argv: argv(&["flood", "3000"]),
            mix: FaultMix { max_faults: 2, horizon_ms: 300, ..any_fault },
            ..base.clone()
        },
        Scenario {
            name: "ignore-term-faults",
            about: "3 ranks ignore SIGTERM while 1 or 2 random faults end the job; teardown needs SIGKILL",
            hosts: 3,
            argv: argv(&["ignore-term"]),
            mix: FaultMix { min_faults: 1, max_faults: 2, links: false, ..any_fault },
            ..base.clone()
        },
        Scenario {
            name: "timeout",
            about: "4 ranks hang and the launcher's --timeout of 500 ms stops them; must exit 124",
            argv: argv(&["hang"]),
            timeout: Some(Duration::from_millis(500)),
            ..base.clone()
        },
        Scenario {
            name: "hang-faults",
            about: "4 ranks hang until 1 or 2 random faults (host, rank or launcher signal) end the job",
            argv: argv(&["hang"]),
            mix: FaultMix { min_faults: 1, max_faults: 2, links: false, ..any_fault },
            ..base.clone()
        },
    ]
}

/// Finds the scenario called `name`.
pub fn find(name: &str) -> Option<Scenario> {
    all().into_iter().find(|s| s.name == name)
}
