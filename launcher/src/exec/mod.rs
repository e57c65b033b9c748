//! The process transport: how one rank's command starts on one host.
//!
//! The supervisor uses only [`Spawner`] and the [`Spawned`] handle it returns,
//! so the same supervision code drives local child processes, ranks behind
//! OpenSSH and simulated ranks. A spawner must give every rank its own process
//! group (or the simulated equivalent) so that a signal reaches everything the
//! rank started.

pub mod fd_limit;
pub mod guard;
pub mod job_marker;
pub mod local;
pub mod ssh;

use std::fmt;
use std::future::Future;
use std::io;
use std::path::PathBuf;
use std::pin::Pin;

use tokio::io::{AsyncRead, AsyncWrite};

/// A boxed, sendable future, the return type of the transport's methods.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// A rank's output stream as the supervisor reads it.
pub type ByteReader = Box<dyn AsyncRead + Send + Unpin>;

/// A rank's input stream as the supervisor writes it.
pub type ByteWriter = Box<dyn AsyncWrite + Send + Unpin>;

/// Everything a spawner needs to start one rank.
#[derive(Clone, Debug)]
pub struct RankSpec {
    pub rank: usize,
    /// The rank's host: the ssh destination, or a loopback name for local ranks.
    pub host: String,
    /// Optional ssh login user, port and identity file from the hostfile.
    pub ssh: SshTarget,
    /// The command and its arguments, passed to the program unchanged.
    pub argv: Vec<String>,
    /// Variables set on top of the environment the rank would inherit.
    pub env: Vec<(String, String)>,
    /// Files the spawner creates (mode 0600) before the rank starts and removes
    /// after it ends; each variable named here is set to its file's path.
    pub files: Vec<RankFile>,
    /// Working directory the rank must start in; a missing directory fails the rank.
    pub cwd: Option<PathBuf>,
    /// Directory entered when `cwd` is `None` and this directory exists on the
    /// host (mlx.launch tries the launcher's directory the same way).
    pub default_cwd: Option<PathBuf>,
    /// Whether the rank's stdin is a pipe from the launcher (else `/dev/null`).
    pub stdin: bool,
}

/// Login details for a remote host; empty for local ranks.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct SshTarget {
    pub user: Option<String>,
    pub port: Option<u16>,
    pub identity: Option<PathBuf>,
}

/// A file written for the rank, such as the ring address table in `MLX_HOSTFILE`.
#[derive(Clone, Debug)]
pub struct RankFile {
    pub env_var: String,
    /// Shared between ranks: a job's ring table is the same for every rank.
    pub contents: std::sync::Arc<str>,
}

/// The way a rank ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Termination {
    Exited(i32),
    Signaled(i32),
}

impl Termination {
    pub fn success(self) -> bool {
        self == Termination::Exited(0)
    }
}

impl fmt::Display for Termination {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Termination::Exited(code) => write!(f, "exit code {code}"),
            Termination::Signaled(sig) => match nix::sys::signal::Signal::try_from(*sig) {
                Ok(name) => write!(f, "killed by {name}"),
                Err(_) => write!(f, "killed by signal {sig}"),
            },
        }
    }
}

/// The signals the supervisor sends to a rank's process group.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RankSignal {
    Interrupt,
    Terminate,
    Kill,
}

impl RankSignal {
    pub fn as_nix(self) -> nix::sys::signal::Signal {
        use nix::sys::signal::Signal;
        match self {
            RankSignal::Interrupt => Signal::SIGINT,
            RankSignal::Terminate => Signal::SIGTERM,
            RankSignal::Kill => Signal::SIGKILL,
        }
    }
}

/// Sends signals to a started rank. Cheap to call from the supervisor loop.
pub trait RankControl: Send + Sync {
    /// Delivers `signal` to the rank's whole process group. Signalling a rank
    /// that already ended is not an error.
    fn signal(&self, signal: RankSignal) -> BoxFuture<'_, io::Result<()>>;

    /// Stops what the rank left in its process group once its leader has
    /// ended: SIGTERM unless the group already got a signal, then SIGKILL
    /// after the grace period. Resolves when the group is gone. The default
    /// does nothing, for transports whose remote side cleans up by itself.
    fn finish(&self) -> BoxFuture<'_, ()> {
        Box::pin(std::future::ready(()))
    }

    /// Stops processes the rank started that left its process group (by
    /// `setsid`, for example) and still run after [`RankControl::finish`]:
    /// SIGTERM, then SIGKILL after the grace period. Returns a description
    /// of each, for the log. The default finds none.
    fn stop_escaped(&self) -> BoxFuture<'_, Vec<String>> {
        Box::pin(std::future::ready(Vec::new()))
    }
}

/// A started rank.
pub struct Spawned {
    /// Process id of the rank's group leader on its host, for the summary.
    pub pid: Option<u32>,
    pub stdin: Option<ByteWriter>,
    pub stdout: ByteReader,
    pub stderr: ByteReader,
    /// Resolves once the rank's process has ended and been reaped, and the
    /// spawner removed the rank's files. Processes the rank left in its group
    /// may still run; [`RankControl::finish`] stops them. Dropping the future
    /// does not stop the rank.
    pub wait: BoxFuture<'static, io::Result<Termination>>,
    pub control: Box<dyn RankControl>,
}

/// Starts ranks on hosts.
pub trait Spawner: Send + Sync {
    /// Starts one rank. Errors mean the rank never ran (command not found,
    /// host unreachable before the command started, and so on).
    fn spawn<'a>(&'a self, spec: &'a RankSpec) -> BoxFuture<'a, Result<Spawned, SpawnError>>;
}

/// Why a rank could not be started.
#[derive(Debug, thiserror::Error)]
pub enum SpawnError {
    #[error("command not found: {command}")]
    CommandNotFound { command: String },
    #[error("cannot start the command of rank {rank} on {host}")]
    Io {
        rank: usize,
        host: String,
        #[source]
        source: io::Error,
    },
    #[error("{0}")]
    Other(String),
    /// ssh could not connect, authenticate or open the session before the
    /// rank started; `message` carries ssh's own error text.
    #[error("rank {rank} on {host}: {message}")]
    Ssh { rank: usize, host: String, message: String },
    /// The remote host rejected the rank before it started (missing working
    /// directory, command not found, no way to make a process group).
    #[error("rank {rank} on {host}: {message}")]
    RemoteStart { rank: usize, host: String, message: String },
    /// A value of the rank's spec cannot be sent (host that looks like an
    /// option, NUL byte, invalid environment variable name).
    #[error("rank {rank} on {host}: {message}")]
    InvalidSpec { rank: usize, host: String, message: String },
}
