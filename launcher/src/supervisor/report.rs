//! The job report and the summary the launcher prints on stderr.

use crate::exec::{RankSpec, Termination};
use crate::exit::{LauncherSignal, Outcome};

/// The reason the launcher stopped ranks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StopCause {
    RankFailed(usize),
    Signal(LauncherSignal),
    Timeout,
}

impl StopCause {
    fn describe(self) -> String {
        match self {
            StopCause::RankFailed(rank) => format!("stopped after rank {rank} failed"),
            StopCause::Signal(signal) => format!("stopped because the launcher received {}", signal.name()),
            StopCause::Timeout => "stopped by --timeout".to_string(),
        }
    }
}

/// The stage a rank has reached.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RankState {
    Starting,
    SpawnFailed(String),
    Running,
    Ended(Termination),
    /// The transport lost the rank; its end was not observed.
    Lost(String),
    /// SIGKILL went out but the rank's end was never confirmed.
    Unconfirmed,
}

/// One rank's line in the report.
#[derive(Clone, Debug)]
pub struct RankReport {
    pub rank: usize,
    pub host: String,
    pub pid: Option<u32>,
    pub state: RankState,
    /// Set when the launcher signalled the rank, with the reason.
    pub stopped_by: Option<StopCause>,
    /// Whether the rank was sent SIGKILL.
    pub killed: bool,
    /// Whether the rank ended and all its output was forwarded.
    pub finished: bool,
}

impl RankReport {
    pub fn new(spec: &RankSpec) -> RankReport {
        RankReport {
            rank: spec.rank,
            host: spec.host.clone(),
            pid: None,
            state: RankState::Starting,
            stopped_by: None,
            killed: false,
            finished: false,
        }
    }

    /// Returns whether the rank may still be running.
    pub fn is_alive(&self) -> bool {
        matches!(self.state, RankState::Starting | RankState::Running)
    }
}

/// Everything the launcher learned about the job.
#[derive(Clone, Debug)]
pub struct Report {
    pub ranks: Vec<RankReport>,
    pub outcome: Outcome,
    pub exit_code: i32,
}

/// Renders one line per rank that failed, was stopped or was not confirmed
/// dead, after a headline. Empty when every rank exited 0 on its own.
pub fn summary(report: &Report) -> String {
    let notable: Vec<&RankReport> = report
        .ranks
        .iter()
        .filter(|r| r.stopped_by.is_some() || !matches!(r.state, RankState::Ended(Termination::Exited(0))))
        .collect();
    let outcome = &report.outcome;
    if notable.is_empty() {
        return match outcome.output_lost {
            true => format!(
                "ringleader: every rank exited 0, but some of their output could not be written (see the warning above); exit code {}\n",
                report.exit_code
            ),
            false => String::new(),
        };
    }

    let headline = if let Some(signal) = outcome.interrupted {
        format!("interrupted by {}", signal.name())
    } else if outcome.timed_out {
        "the job hit --timeout".to_string()
    } else if let Some((rank, termination)) = outcome.first_failure {
        match termination {
            Termination::Exited(_) => format!("rank {rank} failed with {termination}"),
            Termination::Signaled(_) => format!("rank {rank} was {termination}"),
        }
    } else if outcome.spawn_failed {
        "a rank could not be started".to_string()
    } else {
        "the job did not finish cleanly".to_string()
    };
    // "rank 1 failed with exit code 7" already gives the launcher's code.
    let mut text = match outcome.first_failure {
        Some((_, Termination::Exited(code))) if code == report.exit_code && outcome.interrupted.is_none() && !outcome.timed_out => {
            format!("ringleader: {headline}\n")
        }
        _ => format!("ringleader: {headline}; exit code {}\n", report.exit_code),
    };
    for rank in notable {
        let prefix = format!("rank {} on {}", rank.rank, rank.host);
        text += &format!("ringleader:   {prefix}");
        if let Some(pid) = rank.pid {
            text += &format!(" (pid {pid})");
        }
        // A start error may name the rank itself and end in hint lines; the
        // cause goes before the hints, which get lines of their own.
        let mut hints = "";
        text += &match &rank.state {
            RankState::Starting => ": never started".to_string(),
            RankState::SpawnFailed(error) => {
                let error = error.strip_prefix(&format!("{prefix}: ")).unwrap_or(error);
                let (detail, hint) = match error.find("\nhint:") {
                    Some(at) => error.split_at(at),
                    None => (error, ""),
                };
                hints = hint;
                format!(": not started: {detail}")
            }
            RankState::Running | RankState::Unconfirmed => {
                ": NOT confirmed dead after SIGKILL; check the host for leftover processes".to_string()
            }
            RankState::Ended(termination) => format!(": {termination}"),
            RankState::Lost(error) => format!(": lost: {error}"),
        };
        if let Some(cause) = rank.stopped_by {
            text += &format!(", {}", cause.describe());
            if rank.killed {
                text += " and sent SIGKILL";
            }
        }
        for hint in hints.lines().filter(|line| !line.is_empty()) {
            text += &format!("\nringleader:     {hint}");
        }
        text.push('\n');
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rank(rank: usize, state: RankState, stopped_by: Option<StopCause>) -> RankReport {
        RankReport {
            rank,
            host: "node01".into(),
            pid: None,
            state,
            stopped_by,
            killed: false,
            finished: true,
        }
    }

    #[test]
    fn rank_killed_by_a_signal_reads_as_killed() {
        let report = Report {
            ranks: vec![rank(0, RankState::Ended(Termination::Signaled(13)), None)],
            outcome: Outcome {
                first_failure: Some((0, Termination::Signaled(13))),
                ..Outcome::default()
            },
            exit_code: 141,
        };
        let text = summary(&report);
        assert!(text.starts_with("ringleader: rank 0 was killed by SIGPIPE; exit code 141\n"), "{text}");
    }

    #[test]
    fn failed_rank_code_is_not_repeated() {
        let report = Report {
            ranks: vec![rank(1, RankState::Ended(Termination::Exited(7)), None)],
            outcome: Outcome {
                first_failure: Some((1, Termination::Exited(7))),
                ..Outcome::default()
            },
            exit_code: 7,
        };
        let text = summary(&report);
        assert!(text.starts_with("ringleader: rank 1 failed with exit code 7\n"), "{text}");
    }

    #[test]
    fn start_error_hint_on_own_line() {
        let error = "rank 1 on node01: command not found: train.py\nhint: check the command's path and PATH on that host";
        let report = Report {
            ranks: vec![rank(1, RankState::SpawnFailed(error.into()), Some(StopCause::RankFailed(1)))],
            outcome: Outcome {
                spawn_failed: true,
                ..Outcome::default()
            },
            exit_code: 2,
        };
        let text = summary(&report);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(
            lines[1],
            "ringleader:   rank 1 on node01: not started: command not found: train.py, stopped after rank 1 failed"
        );
        assert_eq!(lines[2], "ringleader:     hint: check the command's path and PATH on that host");
        assert_eq!(lines.len(), 3, "{text}");
    }
}
