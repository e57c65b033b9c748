//! Clusters of sshd hosts in Docker containers, for rehearsing multi-host
//! ringleader jobs on one machine.
//!
//! - `image`: the node image, built with debootstrap and cached by a recipe hash
//! - `apt_source`: the Debian mirror and suite, read from the apt configuration
//! - `engine`: the connection to the Docker engine and its API version
//! - `api_shim`: lets testcontainers talk to engines older than its bollard
//! - `cluster`: [`Cluster`], N nodes on a private network, removed on drop
//! - `files`: the client key, ssh config, known_hosts and hostfile of a cluster
//! - `faults`: kill, stop, pause, disconnect or isolate a node; stop only its sshd
//! - `cleanup`: removal of labelled leftovers
//! - `mounts`: host paths a node needs to run a Python virtualenv
//!
//! ```no_run
//! # async fn demo() -> ringleader_containers::Result<()> {
//! let cluster = ringleader_containers::Cluster::start(4).await?;
//! let status = cluster.ssh_command(1)?.arg("true").status().expect("ssh runs");
//! assert!(status.success());
//! cluster.disconnect(1).await?;
//! # Ok(()) }
//! ```
//!
//! # Limitations
//!
//! - Building the image needs root, debootstrap and a reachable Debian mirror.
//! - Nodes run as root; programs come from read-only bind mounts of host
//!   paths, so they must be built for the node's glibc (the node runs the
//!   host's Debian suite, so host builds fit).
//! - Dropping a [`Cluster`] blocks while the engine removes the containers.

mod api_shim;
pub mod apt_source;
pub mod cleanup;
pub mod cluster;
pub mod engine;
pub mod error;
mod faults;
pub mod files;
pub mod image;
pub mod mounts;

pub use cluster::{Cluster, ClusterOptions, ExecOutput, Node};
pub use engine::Engine;
pub use error::{Error, Result};
