//! The invariants every run must keep, checked on its recorded log.

use std::collections::BTreeMap;
use std::fmt;

use ringleader::exec::Termination;
use ringleader::exit;
use ringleader::supervisor::{RankState, Report};
use serde::Serialize;

use crate::cluster::{RunResult, RunSpec};
use crate::fault::Fault;
use crate::log::{Event, Inner, Record, STDERR, STDOUT};

/// An invariant that every run must keep.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Invariant {
    /// The launcher returned before the scenario's simulated deadline.
    NoHang,
    /// turmoil ran every host's software without an error.
    SimulationRuns,
    /// The exit code follows the rule of `ringleader::exit` and the facts.
    ExitCodeRule,
    /// No rank process outlives the launcher, except on hosts whose session
    /// was lost, and those die within the teardown bound.
    NothingLeftRunning,
    /// Teardown ends within grace period plus keepalive bound.
    TeardownBounded,
    /// Every line that reached the launcher is forwarded whole and in order.
    OutputForwarded,
    /// Collectives return correct values or an error.
    CollectivesCorrect,
}

impl fmt::Display for Invariant {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let name = serde_json::to_value(self).expect("an invariant serializes");
        write!(f, "{}", name.as_str().unwrap_or("invariant"))
    }
}

/// A broken invariant, with what showed it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Violation {
    pub invariant: Invariant,
    pub detail: String,
}

impl fmt::Display for Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.invariant, self.detail)
    }
}

fn violation(invariant: Invariant, detail: String) -> Violation {
    Violation { invariant, detail }
}

/// Checks every invariant; an empty list means the run passed.
pub fn all(spec: &RunSpec, result: &RunResult) -> Vec<Violation> {
    let mut violations = Vec::new();
    if let Some(error) = &result.sim_error {
        violations.push(violation(Invariant::SimulationRuns, error.clone()));
    }
    let (Some(report), Some(returned_ms)) = (&result.report, result.launcher_returned_ms) else {
        violations.push(violation(
            Invariant::NoHang,
            format!(
                "the launcher had not returned after {} ms of simulated time",
                result.end_ms
            ),
        ));
        return violations;
    };
    let log = &result.log;
    violations.extend(exit_code(report, &log.records));
    violations.extend(nothing_left_running(spec, log, returned_ms));
    violations.extend(teardown_bounded(spec, log, returned_ms));
    violations.extend(output_forwarded(report, log));
    violations.extend(log.records.iter().filter_map(|record| match &record.event {
        Event::CollectiveWrong {
            rank,
            iteration,
            detail,
        } => Some(violation(
            Invariant::CollectivesCorrect,
            format!("rank {rank} iteration {iteration}: {detail}"),
        )),
        _ => None,
    }));
    violations
}

fn exit_code(report: &Report, records: &[Record]) -> Vec<Violation> {
    let mut found = Vec::new();
    let mut fail = |detail: String| found.push(violation(Invariant::ExitCodeRule, detail));
    let outcome = &report.outcome;
    let ruled = exit::exit_code(outcome);
    if report.exit_code != ruled {
        fail(format!(
            "exit code {} but the rule gives {ruled} for {outcome:?}",
            report.exit_code
        ));
    }

    let first_signal = records.iter().find_map(|r| match &r.event {
        Event::LauncherSignalled { signal } => Some((r.at_ms, signal.clone())),
        _ => None,
    });
    // The first moment at which something other than the signal could have
    // started the teardown.
    let first_end = records
        .iter()
        .find(|r| match &r.event {
            Event::ProcessEnded { .. } | Event::SessionLost { .. } => true,
            Event::FaultApplied { fault } => !matches!(
                fault,
                Fault::InterruptLauncher | Fault::TerminateLauncher | Fault::Latency { .. }
            ),
            _ => false,
        })
        .map(|r| r.at_ms);
    match (outcome.interrupted, &first_signal) {
        (Some(signal), None) => fail(format!("the outcome says {} but the launcher got no signal", signal.name())),
        (Some(signal), Some((_, name))) if signal.name() != name => {
            fail(format!("the outcome says {} but the first signal was {name}", signal.name()))
        }
        (None, Some((at, name))) if first_end.is_none_or(|end| *at < end) => {
            fail(format!("the launcher got {name} at {at} ms before anything failed, but the outcome has no signal"))
        }
        _ => {}
    }

    if let Some((rank, termination)) = outcome.first_failure {
        let state = &report.ranks[rank].state;
        let pid = report.ranks[rank].pid;
        let observed = records.iter().any(|r| match &r.event {
            Event::ProcessEnded {
                rank: ended,
                pid: ended_pid,
                how,
                ..
            } => *ended == rank && Some(*ended_pid) == pid && *how == termination.to_string(),
            Event::SessionLost { rank: lost, .. } => {
                *lost == rank && matches!(state, RankState::Lost(_))
            }
            _ => false,
        });
        if !observed {
            fail(format!("rank {rank} is reported as the first failure with {termination}, but no host saw that"));
        }
    }

    let clean = report.ranks.iter().all(|rank| {
        records.iter().any(|r| {
            matches!(&r.event, Event::ProcessEnded { rank: ended, pid, how, .. }
                if *ended == rank.rank && Some(*pid) == rank.pid && how == &Termination::Exited(0).to_string())
        })
    });
    let disturbed = records.iter().any(|r| {
        matches!(
            r.event,
            Event::LauncherSignalled { .. } | Event::SessionLost { .. }
        )
    });
    if clean && !disturbed && report.exit_code != exit::SUCCESS {
        fail(format!(
            "every rank exited 0 but the launcher exited {}",
            report.exit_code
        ));
    }
    if report.exit_code == exit::SUCCESS && !clean {
        fail("the launcher exited 0 but not every rank was seen exiting 0".to_string());
    }
    found
}

/// When each process's task went away, by `(host, pid)`.
fn gone_times(records: &[Record]) -> BTreeMap<(String, u32), u64> {
    records
        .iter()
        .filter_map(|r| match &r.event {
            Event::ProcessGone { host, pid, .. } => Some(((host.clone(), *pid), r.at_ms)),
            _ => None,
        })
        .collect()
}

fn nothing_left_running(spec: &RunSpec, log: &Inner, returned_ms: u64) -> Vec<Violation> {
    let mut found = Vec::new();
    for ((host, pid), rank) in &log.alive {
        found.push(violation(
            Invariant::NothingLeftRunning,
            format!(
                "rank {rank}'s process {pid} on {host} still ran {} ms after the launcher returned",
                spec.timing.teardown_bound().as_millis()
            ),
        ));
    }

    let gone = gone_times(&log.records);
    // Record order, not time: a session the launcher's exit closes is lost
    // in the same millisecond as the return, but after it.
    let lost_before_return: Vec<usize> = log
        .records
        .iter()
        .take_while(|r| !matches!(r.event, Event::LauncherReturned { .. }))
        .filter_map(|r| match r.event {
            Event::SessionLost { rank, .. } => Some(rank),
            _ => None,
        })
        .collect();
    for record in &log.records {
        let Event::ProcessStarted {
            host, pid, rank, ..
        } = &record.event
        else {
            continue;
        };
        let gone_at = gone.get(&(host.clone(), *pid)).copied().unwrap_or(u64::MAX);
        if gone_at > returned_ms && !lost_before_return.contains(rank) {
            found.push(violation(
                Invariant::NothingLeftRunning,
                format!("rank {rank}'s process {pid} on {host} was still running when the launcher returned at {returned_ms} ms, though its session was not lost"),
            ));
        }
    }
    found
}

fn teardown_bounded(spec: &RunSpec, log: &Inner, returned_ms: u64) -> Vec<Violation> {
    let start = log.records.iter().find(|r| {
        matches!(
            r.event,
            Event::LauncherSentSignal { .. } | Event::SessionLost { .. }
        ) && r.at_ms <= returned_ms
    });
    let Some(start) = start else {
        return Vec::new();
    };
    let bound = spec.timing.teardown_bound().as_millis() as u64;
    let deadline = start.at_ms + bound;
    let mut found = Vec::new();
    let gone = gone_times(&log.records);
    for record in &log.records {
        let Event::ProcessStarted {
            host, pid, rank, ..
        } = &record.event
        else {
            continue;
        };
        let gone_at = gone.get(&(host.clone(), *pid)).copied().unwrap_or(u64::MAX);
        if gone_at > deadline {
            let when = if gone_at == u64::MAX {
                "never ended".to_string()
            } else {
                format!("ended at {gone_at} ms")
            };
            found.push(violation(
                Invariant::TeardownBounded,
                format!("teardown began at {} ms but rank {rank}'s process {pid} on {host} {when}, after the bound of {bound} ms", start.at_ms),
            ));
        }
    }
    let launcher_bound = bound + spec.timing.kill_confirm.as_millis() as u64;
    if returned_ms > start.at_ms + launcher_bound {
        found.push(violation(
            Invariant::TeardownBounded,
            format!("teardown began at {} ms but the launcher returned at {returned_ms} ms, after the bound of {launcher_bound} ms", start.at_ms),
        ));
    }
    found
}

/// Per rank, the lines the launcher wrote with that rank's `--tag-output` label.
fn forwarded_lines(output: &[u8]) -> BTreeMap<usize, Vec<Vec<u8>>> {
    let mut lines: BTreeMap<usize, Vec<Vec<u8>>> = BTreeMap::new();
    for line in output.split_inclusive(|&b| b == b'\n') {
        // Labels look like "[ 3 host3] ".
        let Some(end) = line.windows(2).position(|w| w == b"] ") else {
            continue;
        };
        if line.first() != Some(&b'[') {
            continue;
        }
        let label = String::from_utf8_lossy(&line[1..end]);
        let Some(rank) = label.split_whitespace().next().and_then(|r| r.parse().ok()) else {
            continue;
        };
        lines
            .entry(rank)
            .or_default()
            .push(line[end + 2..].to_vec());
    }
    lines
}

fn output_forwarded(report: &Report, log: &Inner) -> Vec<Violation> {
    let mut found = Vec::new();
    for (stream, output) in [
        (STDOUT, &log.launcher_stdout),
        (STDERR, &log.launcher_stderr),
    ] {
        let forwarded = forwarded_lines(output);
        for rank in &report.ranks {
            let name = if stream == STDOUT { "stdout" } else { "stderr" };
            let reached = log
                .reached
                .get(&(rank.rank, stream))
                .cloned()
                .unwrap_or_default();
            let produced = log
                .produced
                .get(&(rank.rank, stream))
                .cloned()
                .unwrap_or_default();
            if !produced.starts_with(&reached) {
                found.push(violation(
                    Invariant::OutputForwarded,
                    format!("rank {} {name}: the bytes that reached the launcher are not what the rank wrote", rank.rank),
                ));
                continue;
            }
            let complete: Vec<&[u8]> = reached
                .split_inclusive(|&b| b == b'\n')
                .filter(|l| l.ends_with(b"\n"))
                .collect();
            let empty = Vec::new();
            let sent = forwarded.get(&rank.rank).unwrap_or(&empty);
            let matching = complete
                .iter()
                .zip(sent.iter())
                .take_while(|(a, b)| **a == b.as_slice())
                .count();
            let whole = matching == complete.len() && sent.len() <= complete.len() + 1;
            let prefix = matching == sent.len().min(complete.len()) && !rank.finished;
            if !whole && !prefix {
                let expected = complete
                    .get(matching)
                    .map(|l| String::from_utf8_lossy(l).into_owned());
                let got = sent
                    .get(matching)
                    .map(|l| String::from_utf8_lossy(l).into_owned());
                found.push(violation(
                    Invariant::OutputForwarded,
                    format!(
                        "rank {} {name}: {} of {} complete lines forwarded in order; line {matching} should be {expected:?} but is {got:?}",
                        rank.rank,
                        matching,
                        complete.len()
                    ),
                ));
            }
        }
    }
    found
}

#[cfg(test)]
mod tests {
    use ringleader::exit::Outcome;
    use ringleader::supervisor::RankReport;

    use super::*;

    fn report(finished: bool) -> Report {
        let rank = RankReport {
            rank: 0,
            host: "host0".into(),
            pid: Some(100),
            state: RankState::Ended(Termination::Exited(0)),
            stopped_by: None,
            killed: false,
            finished,
        };
        Report {
            ranks: vec![rank],
            outcome: Outcome::default(),
            exit_code: 0,
        }
    }

    fn log_with(reached: &[u8], forwarded: &[u8]) -> Inner {
        let mut log = Inner::default();
        log.produced.insert((0, STDOUT), reached.to_vec());
        log.reached.insert((0, STDOUT), reached.to_vec());
        log.launcher_stdout = forwarded.to_vec();
        log
    }

    #[test]
    fn forwarded_lines_are_split_by_label() {
        let lines =
            forwarded_lines(b"[0 host0] a\n[1 host1] b\nringleader: summary\n[0 host0] c\n");

        assert_eq!(lines[&0], vec![b"a\n".to_vec(), b"c\n".to_vec()]);
        assert_eq!(lines[&1], vec![b"b\n".to_vec()]);
        assert_eq!(lines.len(), 2);
    }

    #[test]
    fn output_check_accepts_every_line_in_order() {
        let log = log_with(b"a\nb\npart", b"[0 host0] a\n[0 host0] b\n[0 host0] part\n");

        assert_eq!(output_forwarded(&report(true), &log), Vec::new());
    }

    #[test]
    fn output_check_rejects_lost_line() {
        let log = log_with(b"a\nb\nc\n", b"[0 host0] a\n[0 host0] c\n");

        let found = output_forwarded(&report(true), &log);

        assert_eq!(found.len(), 1);
        assert_eq!(found[0].invariant, Invariant::OutputForwarded);
    }

    #[test]
    fn output_check_rejects_split_line() {
        let log = log_with(b"abc\n", b"[0 host0] ab\n[0 host0] c\n");

        assert_eq!(output_forwarded(&report(true), &log).len(), 1);
    }

    #[test]
    fn output_check_allows_missing_tail_of_unfinished_rank() {
        let log = log_with(b"a\nb\n", b"[0 host0] a\n");

        assert_eq!(output_forwarded(&report(false), &log), Vec::new());
        assert_eq!(output_forwarded(&report(true), &log).len(), 1);
    }
}
