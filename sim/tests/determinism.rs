//! The same seed gives the same run: equal event logs, outputs and exit codes.

use ringleader_sim::cluster::RunSpec;
use ringleader_sim::scenario;
use ringleader_sim::sweep;

#[test]
fn same_seed_gives_same_event_log() {
    // Seeds whose schedules include host crashes, partitions, holds and
    // launcher signals, so that every fault path takes part.
    for seed in [1, 3, 7, 21, 40] {
        let spec = RunSpec::from_seed(scenario::find("all-sum").unwrap(), seed);
        let run = sweep::determinism(&spec).unwrap_or_else(|difference| {
            panic!("seed {seed}: {difference}\nfaults: {:?}", spec.faults)
        });
        assert!(
            run.log.records.len() > 50,
            "seed {seed} logged only {} events",
            run.log.records.len()
        );
    }
}

#[test]
fn same_seed_gives_same_output_flood() {
    let spec = RunSpec::from_seed(scenario::find("flood-sigterm").unwrap(), 5);

    let run = sweep::determinism(&spec).unwrap_or_else(|difference| panic!("{difference}"));

    assert!(!run.log.launcher_stdout.is_empty());
}

#[test]
fn different_seeds_give_different_runs() {
    let scenario = scenario::find("all-sum").unwrap();
    let first = ringleader_sim::cluster::run(&RunSpec::from_seed(scenario.clone(), 101));
    let second = ringleader_sim::cluster::run(&RunSpec::from_seed(scenario, 102));

    assert_ne!(first.log.records, second.log.records);
}
