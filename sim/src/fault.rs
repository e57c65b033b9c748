//! Faults and fault schedules: what the driver loop does to the cluster,
//! and when. A schedule is derived from a seed or read from a JSON file.

use std::fmt;

use serde::{Deserialize, Serialize};

/// One end of a link: the launcher or host `N`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Node {
    Launcher,
    Host(usize),
}

impl Node {
    /// Returns the turmoil host name.
    pub fn name(self) -> String {
        match self {
            Node::Launcher => "launcher".to_string(),
            Node::Host(index) => host_name(index),
        }
    }
}

/// Returns the turmoil host name of host `index`.
pub fn host_name(index: usize) -> String {
    format!("host{index}")
}

/// Something that goes wrong.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum Fault {
    /// Every process on the host dies; the agent stops listening.
    CrashHost {
        host: usize,
    },
    /// The host's software restarts (a crashed host comes back up).
    BounceHost {
        host: usize,
    },
    /// Messages between the two nodes are dropped.
    Partition {
        a: Node,
        b: Node,
    },
    /// Undoes a partition.
    Repair {
        a: Node,
        b: Node,
    },
    /// Messages between the two nodes wait until released.
    Hold {
        a: Node,
        b: Node,
    },
    Release {
        a: Node,
        b: Node,
    },
    /// Fixed message latency on the link, in milliseconds.
    Latency {
        a: Node,
        b: Node,
        ms: u64,
    },
    /// SIGKILL to the rank's process group from outside the launcher.
    KillRank {
        rank: usize,
    },
    /// The rank exits with `code` at once.
    ExitRank {
        rank: usize,
        code: i32,
    },
    /// The launcher receives SIGINT.
    InterruptLauncher,
    /// The launcher receives SIGTERM.
    TerminateLauncher,
}

impl fmt::Display for Fault {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}",
            serde_json::to_string(self).expect("a fault serializes")
        )
    }
}

/// A fault and the simulated time it happens at.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TimedFault {
    pub at_ms: u64,
    #[serde(flatten)]
    pub fault: Fault,
}

/// Everything needed to replay a run: scenario, seed and faults.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Schedule {
    pub scenario: String,
    pub seed: u64,
    /// Set in a schedule that reproduces the planted supervisor bug.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub planted_bug: bool,
    pub faults: Vec<TimedFault>,
}

impl Schedule {
    /// Checks a schedule written by hand against a scenario of `hosts` hosts
    /// (one rank each) and puts its faults in time order, the order they
    /// happen in whatever order the file lists them.
    pub fn validate(&mut self, hosts: usize) -> Result<(), String> {
        for (index, timed) in self.faults.iter().enumerate() {
            check_fault(&timed.fault, hosts).map_err(|problem| format!("fault {index} ({}): {problem}", timed.fault))?;
        }
        self.faults.sort_by_key(|timed| timed.at_ms);
        Ok(())
    }
}

fn check_fault(fault: &Fault, hosts: usize) -> Result<(), String> {
    let host_exists = |node: &Node| match node {
        Node::Host(index) if *index >= hosts => Err(format!(
            "host {index} does not exist; the scenario has hosts 0 to {}",
            hosts - 1
        )),
        _ => Ok(()),
    };
    match fault {
        Fault::CrashHost { host } | Fault::BounceHost { host } => host_exists(&Node::Host(*host)),
        Fault::Partition { a, b }
        | Fault::Repair { a, b }
        | Fault::Hold { a, b }
        | Fault::Release { a, b }
        | Fault::Latency { a, b, .. } => {
            host_exists(a)?;
            host_exists(b)?;
            if a == b {
                return Err("a link needs two different nodes".to_string());
            }
            Ok(())
        }
        Fault::KillRank { rank } | Fault::ExitRank { rank, .. } if *rank >= hosts => Err(format!(
            "rank {rank} does not exist; the scenario has ranks 0 to {}",
            hosts - 1
        )),
        Fault::ExitRank { code, .. } if !(0..=255).contains(code) => {
            Err(format!("exit code {code} is not one a process can have; use 0 to 255"))
        }
        _ => Ok(()),
    }
}

/// The kinds and number of faults a scenario's random schedules may contain.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FaultMix {
    /// At least this many faults per run.
    pub min_faults: usize,
    /// At most this many faults per run.
    pub max_faults: usize,
    /// Faults happen in `[0, horizon_ms)`.
    pub horizon_ms: u64,
    pub hosts: bool,
    pub links: bool,
    pub ranks: bool,
    pub launcher_signals: bool,
}

impl FaultMix {
    pub const NONE: FaultMix = FaultMix {
        min_faults: 0,
        max_faults: 0,
        horizon_ms: 0,
        hosts: false,
        links: false,
        ranks: false,
        launcher_signals: false,
    };
}

/// A small, fast, seedable generator (SplitMix64), so schedules depend on
/// nothing but the seed.
pub struct SplitMix64(u64);

impl SplitMix64 {
    pub fn new(seed: u64) -> Self {
        SplitMix64(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Returns a number in `0..bound` (`bound` > 0).
    pub fn below(&mut self, bound: u64) -> u64 {
        self.next_u64() % bound
    }
}

/// Simulated time after which every rank of a fault-free start runs.
const RANK_STARTUP_MS: u64 = 50;

/// Draws a random schedule for a cluster of `hosts` hosts (one rank each).
pub fn random_faults(seed: u64, hosts: usize, mix: FaultMix) -> Vec<TimedFault> {
    // Distinct from the seed turmoil gets, so the two streams are unrelated.
    let mut rng = SplitMix64::new(seed ^ 0x5EED_FA17);
    let spread = mix.max_faults.saturating_sub(mix.min_faults) as u64;
    let count = mix.min_faults + rng.below(spread + 1) as usize;
    let mut kinds: Vec<u8> = Vec::new();
    if mix.hosts {
        kinds.extend([0, 1]);
    }
    if mix.links {
        kinds.extend([2, 3, 4]);
    }
    if mix.ranks {
        kinds.extend([5, 6]);
    }
    if mix.launcher_signals {
        kinds.push(7);
    }
    if kinds.is_empty() {
        return Vec::new();
    }

    let mut faults = Vec::new();
    for _ in 0..count {
        let at_ms = rng.below(mix.horizon_ms.max(1));
        let host = rng.below(hosts as u64) as usize;
        let peer = random_peer(&mut rng, hosts, host);
        let later = at_ms + 100 + rng.below(1500);
        match kinds[rng.below(kinds.len() as u64) as usize] {
            0 => faults.push(TimedFault {
                at_ms,
                fault: Fault::CrashHost { host },
            }),
            1 => {
                faults.push(TimedFault {
                    at_ms,
                    fault: Fault::CrashHost { host },
                });
                faults.push(TimedFault {
                    at_ms: later,
                    fault: Fault::BounceHost { host },
                });
            }
            2 => {
                let (a, b) = (Node::Host(host), peer);
                faults.push(TimedFault {
                    at_ms,
                    fault: Fault::Partition { a, b },
                });
                faults.push(TimedFault {
                    at_ms: later,
                    fault: Fault::Repair { a, b },
                });
            }
            3 => {
                let (a, b) = (Node::Host(host), peer);
                faults.push(TimedFault {
                    at_ms,
                    fault: Fault::Hold { a, b },
                });
                faults.push(TimedFault {
                    at_ms: later,
                    fault: Fault::Release { a, b },
                });
            }
            4 => {
                let ms = 1 + rng.below(200);
                faults.push(TimedFault {
                    at_ms,
                    fault: Fault::Latency {
                        a: Node::Host(host),
                        b: peer,
                        ms,
                    },
                });
            }
            // A rank fault before the rank runs would do nothing, so rank
            // faults come after the ranks have had time to start.
            5 => faults.push(TimedFault {
                at_ms: at_ms + RANK_STARTUP_MS,
                fault: Fault::KillRank { rank: host },
            }),
            6 => {
                let code = 1 + rng.below(120) as i32;
                let at_ms = at_ms + RANK_STARTUP_MS;
                faults.push(TimedFault {
                    at_ms,
                    fault: Fault::ExitRank { rank: host, code },
                });
            }
            _ => {
                let fault = if rng.below(2) == 0 {
                    Fault::InterruptLauncher
                } else {
                    Fault::TerminateLauncher
                };
                faults.push(TimedFault { at_ms, fault });
            }
        }
    }
    faults.sort_by_key(|f| f.at_ms);
    faults
}

/// Picks the launcher or another host, never `host` itself.
fn random_peer(rng: &mut SplitMix64, hosts: usize, host: usize) -> Node {
    let pick = rng.below(hosts as u64) as usize;
    if pick == host {
        Node::Launcher
    } else {
        Node::Host(pick)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn schedule(faults: Vec<TimedFault>) -> Schedule {
        Schedule {
            scenario: "all-sum".into(),
            seed: 1,
            planted_bug: false,
            faults,
        }
    }

    #[test]
    fn validate_sorts_faults_by_time() {
        let mut schedule = schedule(vec![
            TimedFault { at_ms: 300, fault: Fault::TerminateLauncher },
            TimedFault { at_ms: 100, fault: Fault::ExitRank { rank: 1, code: 7 } },
        ]);
        schedule.validate(8).unwrap();
        let times: Vec<u64> = schedule.faults.iter().map(|timed| timed.at_ms).collect();
        assert_eq!(times, [100, 300]);
    }

    #[test]
    fn validate_rejects_missing_hosts_ranks_and_self_links() {
        let cases = [
            (Fault::CrashHost { host: 8 }, "host 8 does not exist"),
            (Fault::KillRank { rank: 99 }, "rank 99 does not exist"),
            (Fault::ExitRank { rank: 8, code: 1 }, "rank 8 does not exist"),
            (Fault::Hold { a: Node::Launcher, b: Node::Host(9) }, "host 9 does not exist"),
            (Fault::Partition { a: Node::Launcher, b: Node::Launcher }, "two different nodes"),
            (Fault::ExitRank { rank: 1, code: 256 }, "exit code 256 is not one a process can have"),
            (Fault::ExitRank { rank: 1, code: -1 }, "exit code -1 is not one a process can have"),
        ];
        for (fault, expected) in cases {
            let mut schedule = schedule(vec![TimedFault { at_ms: 0, fault: fault.clone() }]);
            let error = schedule.validate(8).unwrap_err();
            assert!(error.contains(expected), "{fault}: {error}");
        }
    }

    #[test]
    fn misspelled_fault_field_is_rejected() {
        let text = r#"{"scenario": "all-sum", "seed": 1, "faults": [{"at_ms": 100, "kind": "crash_host", "hots": 1}]}"#;
        let error = serde_json::from_str::<Schedule>(text).unwrap_err().to_string();
        assert!(error.contains("unknown field `hots`"), "{error}");
    }

    #[test]
    fn validate_accepts_faults_inside_the_scenario() {
        let mut schedule = schedule(vec![
            TimedFault { at_ms: 0, fault: Fault::BounceHost { host: 7 } },
            TimedFault { at_ms: 0, fault: Fault::Latency { a: Node::Host(0), b: Node::Host(7), ms: 5 } },
            TimedFault { at_ms: 0, fault: Fault::InterruptLauncher },
        ]);
        assert_eq!(schedule.validate(8), Ok(()));
    }
}
