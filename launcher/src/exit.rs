//! The exit-code rule, in one place.
//!
//! - [`SUCCESS`] only when every rank exited 0;
//! - the launcher's own interruption wins: 128 + the signal number
//!   ([`INTERRUPTED_HUP`], [`INTERRUPTED_INT`], [`INTERRUPTED_TERM`]);
//! - then [`TIMEOUT`] when `--timeout` stopped the job;
//! - then the first failing rank's exit code, or 128 + N when signal N killed
//!   it, or [`LOST_RANK`] when the transport lost the rank;
//! - [`USAGE`] for command-line, hostfile and preflight errors, before any rank starts.

use crate::exec::Termination;

pub const SUCCESS: i32 = 0;
/// A launcher failure that is no rank's fault, such as an output directory that cannot be created.
pub const FAILURE: i32 = 1;
pub const USAGE: i32 = 2;
/// `--timeout` expired, as timeout(1) reports it.
pub const TIMEOUT: i32 = 124;
pub const SIGNAL_BASE: i32 = 128;
/// A rank whose end the transport could not observe, such as a remote rank
/// whose ssh session died; ssh itself exits 255 when a session fails.
pub const LOST_RANK: i32 = 255;
pub const INTERRUPTED_HUP: i32 = SIGNAL_BASE + 1;
pub const INTERRUPTED_INT: i32 = SIGNAL_BASE + 2;
pub const INTERRUPTED_TERM: i32 = SIGNAL_BASE + 15;

/// Signals the launcher itself reacts to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LauncherSignal {
    Interrupt,
    Terminate,
    Hangup,
}

impl LauncherSignal {
    pub fn exit_code(self) -> i32 {
        match self {
            LauncherSignal::Interrupt => INTERRUPTED_INT,
            LauncherSignal::Terminate => INTERRUPTED_TERM,
            LauncherSignal::Hangup => INTERRUPTED_HUP,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            LauncherSignal::Interrupt => "SIGINT",
            LauncherSignal::Terminate => "SIGTERM",
            LauncherSignal::Hangup => "SIGHUP",
        }
    }
}

/// The facts about a finished job that decide its exit code.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Outcome {
    /// The first signal the launcher received, if any.
    pub interrupted: Option<LauncherSignal>,
    pub timed_out: bool,
    /// The first rank that failed on its own, before the launcher stopped anything.
    pub first_failure: Option<(usize, Termination)>,
    /// A rank could not be started (command not found, host unreachable).
    pub spawn_failed: bool,
    /// Some of the ranks' output could not be written to the launcher's
    /// streams or to `--output-dir` (a full disk, an I/O error). A reader
    /// that went away does not count: the ranks get SIGPIPE instead.
    pub output_lost: bool,
}

/// Maps an outcome to the launcher's exit code.
pub fn exit_code(outcome: &Outcome) -> i32 {
    if let Some(signal) = outcome.interrupted {
        return signal.exit_code();
    }
    if outcome.timed_out {
        return TIMEOUT;
    }
    match outcome.first_failure {
        Some((_, termination)) => termination_code(termination),
        None if outcome.spawn_failed => USAGE,
        None if outcome.output_lost => FAILURE,
        None => SUCCESS,
    }
}

/// Returns the code a shell would report for a process that ended this way. Never 0
/// for a failure: a rank that "exited" with a code that wraps to 0 reports 1.
pub fn termination_code(termination: Termination) -> i32 {
    match termination {
        Termination::Exited(0) => SUCCESS,
        Termination::Exited(code) if (1..=255).contains(&code) => code,
        Termination::Exited(_) => FAILURE,
        Termination::Signaled(signal) => SIGNAL_BASE + signal,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_code_table() {
        let failure = |t| Some((3, t));
        let cases = [
            (Outcome::default(), 0),
            (Outcome { first_failure: failure(Termination::Exited(7)), ..Default::default() }, 7),
            (Outcome { first_failure: failure(Termination::Signaled(9)), ..Default::default() }, 137),
            (Outcome { first_failure: failure(Termination::Signaled(11)), ..Default::default() }, 139),
            (Outcome { first_failure: failure(Termination::Exited(-1)), ..Default::default() }, 1),
            (Outcome { spawn_failed: true, ..Default::default() }, 2),
            (Outcome { timed_out: true, first_failure: failure(Termination::Exited(7)), ..Default::default() }, 124),
            (
                Outcome {
                    interrupted: Some(LauncherSignal::Interrupt),
                    timed_out: true,
                    first_failure: failure(Termination::Exited(7)),
                    spawn_failed: false,
                    output_lost: true,
                },
                130,
            ),
            (Outcome { output_lost: true, ..Default::default() }, 1),
            (Outcome { output_lost: true, first_failure: failure(Termination::Exited(7)), ..Default::default() }, 7),
            (Outcome { interrupted: Some(LauncherSignal::Terminate), ..Default::default() }, 143),
            (Outcome { interrupted: Some(LauncherSignal::Hangup), ..Default::default() }, 129),
        ];
        for (outcome, expected) in cases {
            assert_eq!(exit_code(&outcome), expected, "{outcome:?}");
        }
    }
}
