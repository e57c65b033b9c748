//! Seed sweeps: many random fault schedules pass, and a planted supervisor
//! bug is found, shrunk to a minimal schedule and replayed from its JSON.

use ringleader_sim::check::Invariant;
use ringleader_sim::cluster::{self, RunSpec, Timing};
use ringleader_sim::fault::Schedule;
use ringleader_sim::scenario;
use ringleader_sim::sweep;

/// Seeds per sweep; `RINGLEADER_SIM_SWEEP_SEEDS` raises it for a longer search.
fn sweep_seeds(default: u64) -> u64 {
    std::env::var("RINGLEADER_SIM_SWEEP_SEEDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn first_seed() -> u64 {
    std::env::var(ringleader_sim::SEED_VAR)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1)
}

#[test]
fn random_fault_sweep_keeps_every_invariant() {
    let scenario = scenario::find("all-sum").unwrap();
    let first = first_seed();
    eprintln!(
        "sweeping all-sum from seed {first} (set {} to change)",
        ringleader_sim::SEED_VAR
    );

    let outcomes = sweep::sweep(&scenario, first, sweep_seeds(200), 2, false, &|_| {});

    let failed: Vec<String> = outcomes
        .iter()
        .filter(|o| !o.passed())
        .map(|o| {
            format!(
                "seed {}: {:?}\n  replay: ringleader-sim run --scenario all-sum --seed {}",
                o.seed, o.violations, o.seed
            )
        })
        .collect();
    assert!(
        failed.is_empty(),
        "{} seeds failed:\n{}",
        failed.len(),
        failed.join("\n")
    );
    let faulted = outcomes.iter().filter(|o| o.faults > 0).count();
    assert!(
        faulted >= outcomes.len() / 2,
        "only {faulted} runs had faults"
    );
    let failed_jobs = outcomes
        .iter()
        .filter(|o| o.exit_code.is_some_and(|c| c != 0))
        .count();
    assert!(
        failed_jobs >= outcomes.len() / 4,
        "only {failed_jobs} jobs failed, so the faults barely bit"
    );
}

#[test]
fn planted_bug_is_found_shrunk_and_replayed() {
    let scenario = scenario::find("hang-faults").unwrap();

    let outcomes = sweep::sweep(&scenario, 1, 40, 2, true, &|_| {});
    let failing = outcomes
        .iter()
        .find(|o| !o.passed())
        .expect("the sweep found the planted bug");
    assert!(
        failing
            .violations
            .iter()
            .any(|v| v.invariant == Invariant::NothingLeftRunning),
        "{:?}",
        failing.violations
    );

    let mut spec = RunSpec::from_seed(scenario.clone(), failing.seed);
    spec.planted_bug = true;
    let (schedule, shrunk_run) = sweep::shrink(&spec);
    assert!(!shrunk_run.passed());
    assert_eq!(
        schedule.faults.len(),
        1,
        "not minimal: {:?}",
        schedule.faults
    );
    assert!(
        schedule.faults[0].at_ms % 100 == 0,
        "the fault time was not simplified: {}",
        schedule.faults[0].at_ms
    );

    let json = serde_json::to_string_pretty(&schedule).unwrap();
    let replayed: Schedule = serde_json::from_str(&json).unwrap();
    let replay = cluster::run(&RunSpec {
        scenario: scenario::find(&replayed.scenario).unwrap(),
        seed: replayed.seed,
        faults: replayed.faults.clone(),
        planted_bug: replayed.planted_bug,
        timing: Timing::default(),
    });
    assert!(
        !replay.passed(),
        "the shrunk schedule did not fail on replay:\n{json}"
    );

    let without_bug = cluster::run(&RunSpec {
        planted_bug: false,
        faults: replayed.faults,
        ..spec
    });
    assert!(
        without_bug.passed(),
        "the schedule fails without the bug too: {:?}",
        without_bug.violations
    );
}
