//! Many seeds at once, shrinking of a failing fault schedule, and the
//! determinism check.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use crate::check::{Invariant, Violation};
use crate::cluster::{self, RunResult, RunSpec};
use crate::fault::{Schedule, TimedFault};
use crate::scenario::Scenario;

/// The summary of one run that a sweep keeps.
#[derive(Clone, Debug)]
pub struct SeedOutcome {
    pub seed: u64,
    pub exit_code: Option<i32>,
    pub faults: usize,
    pub sim_ms: u64,
    pub violations: Vec<Violation>,
}

impl SeedOutcome {
    pub fn passed(&self) -> bool {
        self.violations.is_empty()
    }
}

/// Runs `seeds` seeds of `scenario` starting at `first_seed` on `jobs`
/// threads (each simulation runs on one thread), calling `progress` after
/// each run. Returns the outcomes ordered by seed.
pub fn sweep(
    scenario: &Scenario,
    first_seed: u64,
    seeds: u64,
    jobs: usize,
    planted_bug: bool,
    progress: &(dyn Fn(&SeedOutcome) + Sync),
) -> Vec<SeedOutcome> {
    let next = AtomicU64::new(0);
    let outcomes = Mutex::new(Vec::new());
    std::thread::scope(|scope| {
        for _ in 0..jobs.max(1) {
            scope.spawn(|| loop {
                let index = next.fetch_add(1, Ordering::Relaxed);
                if index >= seeds {
                    return;
                }
                let seed = first_seed.wrapping_add(index);
                let mut spec = RunSpec::from_seed(scenario.clone(), seed);
                spec.planted_bug = planted_bug;
                let result = cluster::run(&spec);
                let outcome = SeedOutcome {
                    seed,
                    exit_code: result.exit_code(),
                    faults: spec.faults.len(),
                    sim_ms: result.end_ms,
                    violations: result.violations,
                };
                progress(&outcome);
                outcomes
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .push(outcome);
            });
        }
    });
    let mut outcomes = outcomes.into_inner().unwrap_or_else(|p| p.into_inner());
    outcomes.sort_by_key(|o| o.seed);
    outcomes
}

/// Removes faults from a failing run's schedule, one at a time, while the
/// run still breaks one of the invariants it broke at first, and moves
/// each remaining fault to the earliest whole 100 ms at which it still does.
/// Returns the smallest schedule found and its run.
pub fn shrink(spec: &RunSpec) -> (Schedule, RunResult) {
    let first = cluster::run(spec);
    let target: BTreeSet<Invariant> = first.violations.iter().map(|v| v.invariant).collect();
    let mut best = (spec.faults.clone(), first);
    if target.is_empty() {
        return (schedule(spec, best.0), best.1);
    }
    let try_faults = |faults: &[TimedFault]| -> Option<RunResult> {
        let candidate = RunSpec {
            faults: faults.to_vec(),
            ..spec.clone()
        };
        let result = cluster::run(&candidate);
        result
            .violations
            .iter()
            .any(|v| target.contains(&v.invariant))
            .then_some(result)
    };

    // Alternate both passes until neither helps: an earlier fault time can
    // make another fault removable.
    loop {
        let mut progress = false;
        let mut index = 0;
        while index < best.0.len() {
            let mut candidate = best.0.clone();
            candidate.remove(index);
            match try_faults(&candidate) {
                Some(result) => {
                    best = (candidate, result);
                    progress = true;
                }
                None => index += 1,
            }
        }
        for index in 0..best.0.len() {
            let original = best.0[index].at_ms;
            for at_ms in (0..original).step_by(100) {
                let mut candidate = best.0.clone();
                candidate[index].at_ms = at_ms;
                candidate.sort_by_key(|f| f.at_ms);
                if let Some(result) = try_faults(&candidate) {
                    best = (candidate, result);
                    progress = true;
                    break;
                }
            }
        }
        if !progress {
            break;
        }
    }
    (schedule(spec, best.0), best.1)
}

fn schedule(spec: &RunSpec, faults: Vec<TimedFault>) -> Schedule {
    Schedule {
        scenario: spec.scenario.name.to_string(),
        seed: spec.seed,
        planted_bug: spec.planted_bug,
        faults,
    }
}

/// Runs `spec` twice and compares the event logs and outputs. Returns a
/// description of the first difference, if any.
pub fn determinism(spec: &RunSpec) -> Result<RunResult, String> {
    let first = cluster::run(spec);
    let second = cluster::run(spec);
    let (a, b) = (&first.log, &second.log);
    if let Some(index) =
        (0..a.records.len().min(b.records.len())).find(|&i| a.records[i] != b.records[i])
    {
        return Err(format!(
            "event {index} differs: {:?} in the first run, {:?} in the second",
            a.records[index], b.records[index]
        ));
    }
    if a.records.len() != b.records.len() {
        return Err(format!(
            "the first run logged {} events, the second {}",
            a.records.len(),
            b.records.len()
        ));
    }
    if a.launcher_stdout != b.launcher_stdout || a.launcher_stderr != b.launcher_stderr {
        return Err("the launcher's output differs between the runs".to_string());
    }
    if first.exit_code() != second.exit_code() {
        return Err(format!(
            "exit code {:?} in the first run, {:?} in the second",
            first.exit_code(),
            second.exit_code()
        ));
    }
    Ok(first)
}
