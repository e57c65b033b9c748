//! Errors of the ring backend.

use std::io;
use std::net::SocketAddr;
use std::path::PathBuf;

use tokio::time::Duration;

/// Everything that can go wrong while forming a ring or running a collective.
#[derive(Debug, thiserror::Error)]
pub enum RingError {
    #[error("invalid {var}={value:?}: {reason}")]
    InvalidEnv {
        var: &'static str,
        value: String,
        reason: String,
    },

    #[error("failed to read the ring hostfile {path}")]
    HostfileRead {
        path: PathBuf,
        #[source]
        source: io::Error,
    },

    #[error("invalid ring hostfile {path}: {reason}\nexpected a JSON list with one list of \"ip:port\" strings per rank, as mlx.launch writes it")]
    HostfileInvalid { path: PathBuf, reason: String },

    #[error("invalid ring address table: {0}")]
    InvalidTable(String),

    #[error("failed to listen on {addr}\nanother process may use port {port}; pick free ports with --starting-port", port = addr.port())]
    Bind {
        addr: SocketAddr,
        #[source]
        source: io::Error,
    },

    #[error("timed out after {after:?} connecting to rank {peer} at {addr}{}\nstart every rank within RINGLEADER_RING_CONNECT_TIMEOUT seconds, or raise it", last_error_suffix(.last_error))]
    ConnectTimeout {
        peer: usize,
        addr: SocketAddr,
        after: Duration,
        last_error: Option<io::Error>,
    },

    #[error("failed to connect to rank {peer} at {addr}")]
    Connect {
        peer: usize,
        addr: SocketAddr,
        #[source]
        source: io::Error,
    },

    #[error("timed out after {after:?} waiting for rank {peer} to connect to {addr}\nrank {peer} may have exited or not started; start every rank within RINGLEADER_RING_CONNECT_TIMEOUT seconds, or raise it")]
    AcceptTimeout {
        peer: usize,
        addr: SocketAddr,
        after: Duration,
    },

    #[error("failed to accept the connection of rank {peer} on {addr}")]
    Accept {
        peer: usize,
        addr: SocketAddr,
        #[source]
        source: io::Error,
    },

    #[error("{op} failed: lost the connection to rank {peer} at {addr}")]
    PeerLost {
        op: &'static str,
        peer: usize,
        addr: SocketAddr,
        #[source]
        source: io::Error,
    },

    #[error("{op} timed out after {after:?} (RINGLEADER_RING_OP_TIMEOUT); a peer stopped sending or receiving")]
    OpTimeout { op: &'static str, after: Duration },

    #[error("{op} rejected: the group is unusable because an earlier operation did not complete ({reason})")]
    Unusable { op: &'static str, reason: String },

    #[error("invalid {op} call: {reason}")]
    InvalidArgument { op: &'static str, reason: String },

    #[error("barrier returned {got} instead of the group size {size}; the ranks disagree on the sequence of operations")]
    BarrierMismatch { got: f32, size: usize },
}

fn last_error_suffix(err: &Option<io::Error>) -> String {
    match err {
        Some(err) => format!(" (last error: {err})"),
        None => String::new(),
    }
}
