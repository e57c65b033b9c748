//! One test per fault kind, each a named scenario or a hand-written
//! schedule with a fixed seed, checking the scenario's own promise on top of
//! the invariants every run keeps.

use ringleader::exec::Termination;
use ringleader::supervisor::RankState;
use ringleader_sim::cluster::{self, RunResult, RunSpec};
use ringleader_sim::fault::{Fault, Node, TimedFault};
use ringleader_sim::log::{Event, STDOUT};
use ringleader_sim::scenario;

fn run_scenario(name: &str, seed: u64) -> RunResult {
    let scenario = scenario::find(name).expect("a built-in scenario");
    run_spec(RunSpec::from_seed(scenario, seed))
}

fn run_with_faults(name: &str, seed: u64, faults: Vec<TimedFault>) -> RunResult {
    let scenario = scenario::find(name).expect("a built-in scenario");
    let mut spec = RunSpec::from_seed(scenario, seed);
    spec.faults = faults;
    run_spec(spec)
}

/// Runs `spec` and fails with the violations, the faults and the replay command if any invariant broke.
fn run_spec(spec: RunSpec) -> RunResult {
    let result = cluster::run(&spec);
    assert!(
        result.passed(),
        "invariants broken: {:#?}\nfaults: {:?}\nreplay: ringleader-sim run --scenario {} --seed {}",
        result.violations,
        spec.faults,
        spec.scenario.name,
        spec.seed
    );
    result
}

fn at(at_ms: u64, fault: Fault) -> TimedFault {
    TimedFault { at_ms, fault }
}

fn count(result: &RunResult, matches: impl Fn(&Event) -> bool) -> usize {
    result
        .log
        .records
        .iter()
        .filter(|r| matches(&r.event))
        .count()
}

fn returned_ms(result: &RunResult) -> u64 {
    result.launcher_returned_ms.expect("the launcher returned")
}

#[test]
fn rank_exiting_3_stops_others_and_exits_3() {
    let result = run_scenario("rank-exit", 11);
    let report = result.report.as_ref().unwrap();

    assert_eq!(report.exit_code, 3);
    assert_eq!(
        report.ranks[2].state,
        RankState::Ended(Termination::Exited(3))
    );
    for rank in [0, 1, 3] {
        assert_eq!(
            report.ranks[rank].state,
            RankState::Ended(Termination::Signaled(15)),
            "rank {rank}"
        );
        assert!(
            report.ranks[rank].stopped_by.is_some(),
            "rank {rank} was not stopped by the launcher"
        );
    }
}

#[test]
fn host_crash_mid_all_sum_fails_survivors() {
    let result = run_scenario("host-crash", 5);
    let report = result.report.as_ref().unwrap();

    assert_ne!(report.exit_code, 0);
    let failed = count(
        &result,
        |e| matches!(e, Event::CollectiveFailed { rank, .. } if *rank != 2),
    );
    assert!(failed >= 1, "no survivor's collective returned an error");
    let succeeded = count(&result, |e| matches!(e, Event::CollectiveOk { .. }));
    assert!(
        succeeded >= 4,
        "the crash came before any collective completed ({succeeded} completed)"
    );
    assert!(
        result.log.alive.is_empty(),
        "left running: {:?}",
        result.log.alive
    );
}

#[test]
fn crashed_host_bounced_back_does_not_revive_its_rank() {
    let faults = vec![
        at(300, Fault::CrashHost { host: 1 }),
        at(400, Fault::BounceHost { host: 1 }),
    ];
    let result = run_with_faults("host-crash", 8, faults);

    assert_ne!(result.exit_code(), Some(0));
    let restarted = count(
        &result,
        |e| matches!(e, Event::ProcessStarted { host, .. } if host == "host1"),
    );
    assert_eq!(restarted, 1, "the bounced host started a rank again");
}

#[test]
fn launcher_sigterm_during_flood_loses_nothing_that_arrived() {
    let result = run_scenario("flood-sigterm", 3);
    let report = result.report.as_ref().unwrap();

    assert_eq!(report.exit_code, 143);
    let arrived: usize = (0..4)
        .map(|rank| {
            result
                .log
                .reached
                .get(&(rank, STDOUT))
                .map_or(0, |bytes| bytes.len())
        })
        .sum();
    assert!(
        arrived > 100_000,
        "only {arrived} bytes arrived before SIGTERM, too few to test forwarding"
    );
    let forwarded = result
        .log
        .launcher_stdout
        .iter()
        .filter(|&&b| b == b'\n')
        .count();
    assert!(forwarded > 1000, "only {forwarded} lines were forwarded");
}

#[test]
fn partition_from_launcher_kills_ranks_within_bound() {
    let result = run_scenario("partition", 2);
    let report = result.report.as_ref().unwrap();
    let bound = RunSpec::from_seed(scenario::find("partition").unwrap(), 2)
        .timing
        .teardown_bound()
        .as_millis() as u64;

    assert_eq!(report.exit_code, 255);
    assert!(
        matches!(report.ranks[1].state, RankState::Lost(_)),
        "{:?}",
        report.ranks[1].state
    );
    let stopped_alone = count(
        &result,
        |e| matches!(e, Event::AgentStopping { host, reason, .. } if host == "host1" && reason.contains("no heartbeat")),
    );
    assert_eq!(
        stopped_alone, 1,
        "host1's agent did not stop its rank on its own"
    );
    assert!(
        returned_ms(&result) <= 300 + bound,
        "the launcher returned at {} ms",
        returned_ms(&result)
    );
    let host1_gone = result
        .log
        .records
        .iter()
        .find(|r| matches!(&r.event, Event::ProcessGone { host, .. } if host == "host1"));
    assert!(
        host1_gone.is_some_and(|r| r.at_ms <= 300 + bound),
        "host1's rank outlived the bound"
    );
}

#[test]
fn ranks_ignoring_sigterm_are_killed_after_grace() {
    let result = run_scenario("ignore-term", 4);
    let report = result.report.as_ref().unwrap();

    assert_eq!(report.exit_code, 1);
    for rank in [1, 2] {
        assert_eq!(
            report.ranks[rank].state,
            RankState::Ended(Termination::Signaled(9)),
            "rank {rank}"
        );
        assert!(report.ranks[rank].killed);
    }
    let kill_sent = result.log.records.iter().find(
        |r| matches!(&r.event, Event::LauncherSentSignal { signal, .. } if signal == "SIGKILL"),
    );
    assert!(
        kill_sent.is_some_and(|r| r.at_ms >= 1200),
        "SIGKILL went out before the grace period ended"
    );
}

#[test]
fn children_die_with_their_group() {
    let result = run_scenario("children", 6);

    assert_eq!(result.exit_code(), Some(137));
    let started = count(&result, |e| matches!(e, Event::ProcessStarted { .. }));
    let gone = count(&result, |e| matches!(e, Event::ProcessGone { .. }));
    assert_eq!(started, 9, "3 ranks with 2 children each");
    assert_eq!(gone, 9);
}

#[test]
fn stdin_reaches_every_rank_until_eof() {
    let scenario = scenario::find("stdin").unwrap();
    let input = scenario.stdin.clone().unwrap();
    let result = run_scenario("stdin", 9);

    assert_eq!(result.exit_code(), Some(0));
    for rank in 0..2 {
        assert_eq!(
            result.log.reached.get(&(rank, STDOUT)),
            Some(&input),
            "rank {rank}"
        );
    }
}

#[test]
fn latency_and_held_links_only_slow_the_job() {
    let faults = vec![
        at(
            20,
            Fault::Latency {
                a: Node::Host(0),
                b: Node::Host(1),
                ms: 150,
            },
        ),
        at(
            60,
            Fault::Hold {
                a: Node::Launcher,
                b: Node::Host(2),
            },
        ),
        at(
            700,
            Fault::Release {
                a: Node::Launcher,
                b: Node::Host(2),
            },
        ),
        at(
            80,
            Fault::Hold {
                a: Node::Host(2),
                b: Node::Host(3),
            },
        ),
        at(
            500,
            Fault::Release {
                a: Node::Host(2),
                b: Node::Host(3),
            },
        ),
    ];
    let mut faults = faults;
    faults.sort_by_key(|f| f.at_ms);
    let result = run_with_faults("all-sum-clean", 12, faults);

    assert_eq!(result.exit_code(), Some(0));
    assert!(
        result.end_ms > 700,
        "the job ended at {} ms, before the hold was released",
        result.end_ms
    );
}

#[test]
fn partition_between_ranks_times_out_collectives() {
    let faults = vec![
        at(
            50,
            Fault::Partition {
                a: Node::Host(0),
                b: Node::Host(1),
            },
        ),
        at(
            2000,
            Fault::Repair {
                a: Node::Host(0),
                b: Node::Host(1),
            },
        ),
    ];
    let result = run_with_faults("all-sum", 13, faults);

    // turmoil's TCP does not retransmit what the partition dropped, so the
    // ring stalls even after the repair until the 3 s operation timeout.
    assert_eq!(result.exit_code(), Some(1));
    let timed_out = count(
        &result,
        |e| matches!(e, Event::CollectiveFailed { error, .. } if error.contains("timed out")),
    );
    assert!(timed_out >= 1, "no collective timed out");
    assert!(
        returned_ms(&result) < 2000 + 3000 + 2000,
        "the launcher returned at {} ms",
        returned_ms(&result)
    );
}

#[test]
fn launcher_sigint_exits_130() {
    let result = run_with_faults("hang-faults", 14, vec![at(100, Fault::InterruptLauncher)]);
    let report = result.report.as_ref().unwrap();

    assert_eq!(report.exit_code, 130);
    let interrupts = count(
        &result,
        |e| matches!(e, Event::GroupSignalled { signal, source, .. } if signal == "SIGINT" && source == "launcher"),
    );
    assert_eq!(interrupts, 4);
}

#[test]
fn killed_rank_reports_128_plus_9() {
    let result = run_with_faults(
        "hang-faults",
        15,
        vec![at(100, Fault::KillRank { rank: 3 })],
    );

    assert_eq!(result.exit_code(), Some(137));
}

#[test]
fn clean_all_sum_exits_0_with_every_round_checked() {
    let result = run_scenario("all-sum-clean", 16);

    assert_eq!(result.exit_code(), Some(0));
    assert_eq!(
        count(&result, |e| matches!(e, Event::CollectiveOk { .. })),
        4 * 10
    );
}

#[test]
fn second_launcher_signal_kills_at_once() {
    let faults = vec![
        at(100, Fault::InterruptLauncher),
        // Past the 250 ms in which the same signal counts as a repeat.
        at(400, Fault::InterruptLauncher),
    ];
    let result = run_with_faults("ignore-term", 17, faults);
    let report = result.report.as_ref().unwrap();

    assert_eq!(report.exit_code, 130);
    let kill_sent = result.log.records.iter().find(
        |r| matches!(&r.event, Event::LauncherSentSignal { signal, .. } if signal == "SIGKILL"),
    );
    let kill_ms = kill_sent.expect("SIGKILL went out").at_ms;
    assert!(
        kill_ms < 100 + 1000,
        "SIGKILL waited for the grace period: {kill_ms} ms"
    );
    assert!(
        kill_ms >= 400,
        "SIGKILL went out before the second signal: {kill_ms} ms"
    );
}

#[test]
fn launcher_timeout_stops_hanging_ranks_with_124() {
    let result = run_scenario("timeout", 18);
    let report = result.report.as_ref().unwrap();

    assert_eq!(report.exit_code, 124);
    assert!(report.outcome.timed_out);
    let first_stop = result
        .log
        .records
        .iter()
        .find(|r| matches!(r.event, Event::LauncherSentSignal { .. }));
    assert!(
        first_stop.is_some_and(|r| r.at_ms >= 500),
        "the launcher stopped the ranks before --timeout"
    );
}
