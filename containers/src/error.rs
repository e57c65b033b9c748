//! Errors of the container fixture and the `ringleader-cluster` tool.

use std::io;
use std::path::PathBuf;

/// Everything that can go wrong while building the image, starting a cluster
/// or acting on one of its nodes.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(
        "no Docker engine reachable at {socket}\n\
         hint: start the engine, or set DOCKER_HOST to its unix:// socket; \
         tests skip Docker cases when RINGLEADER_SKIP_DOCKER=1"
    )]
    EngineUnreachable {
        socket: PathBuf,
        #[source]
        source: io::Error,
    },

    #[error("unexpected reply from the Docker engine at {socket}: {detail}")]
    EngineReply { socket: PathBuf, detail: String },

    #[error("Docker API request failed: {action}")]
    Docker {
        action: String,
        #[source]
        source: testcontainers::bollard::errors::Error,
    },

    #[error("testcontainers failed to start container {name}")]
    Testcontainers {
        name: String,
        #[source]
        source: testcontainers::TestcontainersError,
    },

    #[error(
        "no Debian mirror found in {searched}\n\
         hint: set RINGLEADER_DEBIAN_MIRROR and RINGLEADER_DEBIAN_SUITE"
    )]
    NoAptSource { searched: String },

    #[error("`{program}` not found on PATH\nhint: {hint}")]
    MissingTool { program: String, hint: String },

    #[error("building the sshd image requires root (debootstrap uses chroot)\nhint: run `sudo ringleader-cluster image` once")]
    NotRoot,

    #[error("`{command}` failed with {status}{output}")]
    CommandFailed {
        command: String,
        status: String,
        output: String,
    },

    #[error("{action} failed for {path}")]
    File {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },

    #[error("failed to run `{command}`")]
    Spawn {
        command: String,
        #[source]
        source: io::Error,
    },

    #[error("node {index} does not exist: the cluster has {count} nodes")]
    NoSuchNode { index: usize, count: usize },

    #[error("container {name} has no {what}")]
    MissingContainerInfo { name: String, what: &'static str },

    #[error("a cluster needs at least one node, got {0}")]
    NoNodes(usize),

    #[error("timed out after {seconds} s waiting for {what}")]
    Timeout { seconds: u64, what: String },
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub(crate) fn docker(action: impl Into<String>) -> impl FnOnce(testcontainers::bollard::errors::Error) -> Error {
        let action = action.into();
        move |source| Error::Docker { action, source }
    }

    pub(crate) fn file(action: &'static str, path: impl Into<PathBuf>) -> impl FnOnce(io::Error) -> Error {
        let path = path.into();
        move |source| Error::File { action, path, source }
    }
}
