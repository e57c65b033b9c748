//! ringleader: a launcher for distributed programs and an MLX-compatible ring backend.
//!
//! Concept map, in the order a launch flows through it:
//!
//! - [`cli`]: the command line, compatible with `mlx.launch` 0.32.
//! - [`hostfile`]: `--hosts` lists and the two JSON hostfile forms.
//! - [`hostlist`]: host ranges such as `node[01-04]` in lists and hostfiles.
//! - [`slurm`]: the hosts of a Slurm allocation, from its environment.
//! - [`plan`]: a pure function from hosts and options to one `RankSpec` per rank.
//! - [`mpi`]: the mpi backend, a thin wrapper over Open MPI's mpirun.
//! - [`preflight`]: checks before launch (directory, command, busy ring ports).
//! - [`exec`]: the process transport; a `Spawner` starts one rank on one host.
//! - [`supervisor`]: the event loop that runs, watches and tears down a job.
//! - [`output`]: forwards rank output without splicing lines of different ranks.
//! - [`stdin`]: broadcasts the launcher's stdin to the ranks.
//! - [`signals`]: the launcher's own SIGINT, SIGTERM and SIGHUP as a channel.
//! - [`exit`]: the exit-code rule.
//! - [`net`]: the byte-stream transport (`Net`, `Listener`) and `TokioNet` over TCP.
//! - [`ring`]: MLX-compatible ring collectives over [`net`].
//! - [`shell`]: POSIX shell quoting for every value sent to a shell.
//! - [`doctor`]: `ringleader doctor`, per-rank and per-edge checks through the [`exec`] transport.
//! - [`distconfig`]: `ringleader config`, which writes a hostfile from each host's addresses.
//! - [`app`]: ties the pieces together for the `ringleader` binary.

// The launcher writes its messages to streams it does not own: a closed
// pipe (`--dry-run | head -1`) or a full disk (`2>/dev/full`) must not turn
// into a panic with exit code 101 in place of the job's own code. These
// shadow the standard macros in this crate, and in the workspace's binaries
// that import them, and ignore failed writes.

/// Prints a line to stdout like `std::println!`, ignoring a failed write.
#[macro_export]
macro_rules! println {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stdout(), $($arg)*);
    }};
}
/// Prints to stdout like `std::print!`, ignoring a failed write.
#[macro_export]
macro_rules! print {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = write!(std::io::stdout(), $($arg)*);
    }};
}
/// Prints a line to stderr like `std::eprintln!`, ignoring a failed write.
#[macro_export]
macro_rules! eprintln {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stderr(), $($arg)*);
    }};
}

pub mod app;
pub mod cli;
pub mod distconfig;
pub mod doctor;
pub mod exec;
pub mod exit;
pub mod hostfile;
pub mod hostlist;
pub mod logging;
pub mod mpi;
pub mod net;
pub mod output;
pub mod plan;
pub mod preflight;
pub mod ring;
pub mod shell;
pub mod signals;
pub mod slurm;
pub mod stdin;
pub mod supervisor;
