//! ringleader-sim: a deterministic simulated cluster in which the unchanged
//! launcher supervisor and ring backend run against simulated hosts, so a
//! race found once replays forever from its seed.
//!
//! Concept map, from the bottom up:
//!
//! - [`net`]: [`SimNet`](net::SimNet), the launcher's byte-stream traits over turmoil TCP.
//! - [`wire`]: the frames between the launcher's spawner and a host's agent.
//! - [`process`]: simulated processes: rank programs as tasks, process groups, pipes, signals.
//! - [`programs`]: the rank programs scenarios run (`ring-loop`, `flood`, `hang`, ...).
//! - [`agent`]: the simulated sshd on every host.
//! - [`spawner`]: [`SimSpawner`](spawner::SimSpawner), the launcher's `Spawner` against the agents.
//! - [`fault`]: faults and schedules, random from a seed or from a JSON file.
//! - [`scenario`]: named scenarios.
//! - [`log`]: the recorded event log.
//! - [`cluster`]: one run: the turmoil world, the fault driver loop, the checks.
//! - [`check`]: the invariants checked after every run.
//! - [`sweep`]: many seeds, shrinking and the determinism check.
//!
//! # Determinism
//!
//! Everything in a run depends on the seed alone, except one thing outside
//! this crate: when several `select!` branches are ready at once, tokio
//! picks one with a random generator that turmoil can seed only in
//! `--cfg tokio_unstable` builds. Runs have matched in both kinds of build so
//! far (`tests/determinism.rs` checks it), but only a build with
//! `RUSTFLAGS="--cfg tokio_unstable"`, as `benches/sim.sh` makes, guarantees
//! it. [`DETERMINISTIC`] records which kind this build is.
//!
//! # Limitations
//!
//! - One rank per simulated host.
//! - A host crash is silent, like a power loss: peers get no FIN or RST
//!   and notice it by a timeout or by the RST their next segment gets. A
//!   rank killed on a running host closes its sockets as a process would.
//! - turmoil's TCP does not retransmit: a partition drops the segments in
//!   flight, so a stream that carried data across it stalls for good, even
//!   after the repair, where real TCP would resume. Rank programs that must
//!   survive partitions need an operation timeout.
//! - Rank files exist only as strings in the rank's context, not on a file system.

pub mod agent;
pub mod check;
pub mod cluster;
pub mod fault;
pub mod log;
pub mod net;
pub mod process;
pub mod programs;
pub mod scenario;
pub mod spawner;
pub mod sweep;
pub mod wire;

/// Whether this build seeds tokio's `select!` order, which bit-identical
/// replays need (see the crate documentation).
pub const DETERMINISTIC: bool = cfg!(tokio_unstable);

/// The environment variable `run` and the tests take the seed from.
pub const SEED_VAR: &str = "RINGLEADER_SIM_SEED";
