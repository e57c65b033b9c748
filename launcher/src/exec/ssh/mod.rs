//! Remote ranks through the system OpenSSH client.
//!
//! [`SshSpawner`] runs the `ssh` binary (so `~/.ssh/config`, the agent,
//! `ProxyJump`, `ControlMaster` and known_hosts keep working), always from an
//! argv and never through a local shell, without a pty, so stdout and stderr
//! stay separate and bytes arrive unchanged.
//!
//! Per host and login, the spawner keeps *links*: one ssh connection each,
//! running the agent script (see [`script`]) in its first session. When the
//! user's own ssh config does not set a `ControlPath`, each link is also a
//! ControlMaster whose socket lives in a private temporary directory. Up to
//! [`SshOptions::max_sessions_per_connection`] rank sessions share it, and
//! more ranks open more links. At most [`SshOptions::max_startups_per_host`]
//! ssh handshakes run at once per server (host name and port after ssh
//! config, so aliases of one server share the limit), below sshd's
//! `MaxStartups` default of 10.
//!
//! Control never reads the rank's output. The supervisor's signals travel
//! as commands to the link's agent, which signals the rank's process group.
//! The launcher sends the agent a heartbeat every half keepalive interval.
//! The agent stops all of its ranks (SIGTERM, then SIGKILL after the grace
//! period) when its stdin reaches EOF (the launcher or the ssh client died)
//! or when `keepalive_count_max` intervals pass without a heartbeat (the
//! network was cut). When one rank's ssh client dies, the spawner asks the
//! agent to stop that rank and reports whether it could confirm the group
//! dead (see [`SshSessionError`] and [`SshSpawner::unconfirmed_ranks`]).
//!
//! # Limitations
//!
//! - A POSIX shell reports a child killed by signal N as exit status 128+N,
//!   so a remote rank that itself exits with 129..=192 is reported as
//!   [`Termination::Signaled`](crate::exec::Termination::Signaled).
//! - ssh exits 255 both when it fails and when the remote command exits 255.
//!   The spawner reads 255 as the rank's own status only when ssh logged
//!   nothing and the link's agent, still reachable, confirms that the rank
//!   has ended.
//! - A rank's leftover processes in its group are stopped when the rank's
//!   leader exits, as part of the rank's teardown.
//! - Every rank session runs the remote user's login shell, with whatever
//!   startup files it reads, before the rank starts. That cost is paid once
//!   per rank, even over a shared connection.
//! - The default of 8 rank sessions per connection assumes sshd's default
//!   `MaxSessions 10`. Lower [`SshOptions::max_sessions_per_connection`] for
//!   servers with a smaller limit. When the user's own ControlMaster carries
//!   the sessions, its connection is subject to the same limit.
//! - The remote host needs `/bin/sh`, `mktemp`, `dd`, `mv`, `rm`, `sleep`,
//!   and `setsid` or `perl`. Without `ps`, a group whose processes are all
//!   unreaped zombies counts as alive until the grace period ends.
//! - A `RemoteCommand` and port forwardings in the user's ssh config are
//!   ignored (`RemoteCommand=none`, `ClearAllForwardings=yes`), unless an
//!   extra `-o` option sets them again.

mod args;
mod connection;
mod quote;
pub mod script;
mod session;

use std::ffi::OsString;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

pub use args::SshArgs;
pub use quote::{sh_quote, validate_host, InvalidHost};

use super::{BoxFuture, RankSpec, SpawnError, Spawned, Spawner};
use connection::Pool;

/// Settings of the ssh transport. [`Default`] gives the values listed on each field.
#[derive(Clone, Debug)]
pub struct SshOptions {
    /// The `ssh` program to run. Default: `ssh` from `PATH`.
    pub program: PathBuf,
    /// An ssh config file passed as `-F`, replacing `~/.ssh/config` and the
    /// system-wide config. Default: none.
    pub config_file: Option<PathBuf>,
    /// Options passed as `-o VALUE` before the spawner's own defaults, so they
    /// override them (ssh keeps the first value it reads). Default: none.
    pub extra_options: Vec<String>,
    /// Adds `StrictHostKeyChecking=accept-new`: unknown host keys are added
    /// to known_hosts, changed keys are still rejected. Default: off, which
    /// keeps the user's own setting.
    pub accept_new_host_keys: bool,
    /// ssh's `ConnectTimeout`, rounded up to whole seconds. Default: 10 s.
    pub connect_timeout: Duration,
    /// ssh's `ServerAliveInterval` (whole seconds), and the period of the
    /// remote heartbeat check. Default: 5 s.
    pub keepalive_interval: Duration,
    /// ssh's `ServerAliveCountMax`, and how many heartbeat periods the
    /// remote agent waits before it stops the ranks. Default: 3.
    pub keepalive_count_max: u32,
    /// Time between SIGTERM and SIGKILL when the remote side stops a rank
    /// on its own. Default: 5 s.
    pub grace: Duration,
    /// How long a rank may take from `spawn` until its command starts
    /// on the remote host, on top of `connect_timeout`. Default: 20 s.
    pub start_timeout: Duration,
    /// Share one ssh connection among several ranks on a host (our own
    /// ControlMaster). Never used when the user's ssh config sets a
    /// `ControlPath`. Default: on.
    pub multiplex: bool,
    /// Maximum concurrent ssh handshakes per server. Default: 4.
    pub max_startups_per_host: usize,
    /// Maximum rank sessions sharing one connection. sshd's `MaxSessions`
    /// defaults to 10, and the agent takes one. Default: 8.
    pub max_sessions_per_connection: usize,
    /// The job's `RINGLEADER_JOB_ID`. When set, every rank gets it. Once a
    /// rank has ended, the processes on its host that still carry it and the
    /// rank's `MLX_RANK` have left the rank's process group, so they are
    /// stopped. This works on Linux hosts only, because they are found in
    /// /proc. Default: none.
    pub job_id: Option<String>,
}

impl Default for SshOptions {
    fn default() -> Self {
        SshOptions {
            program: PathBuf::from("ssh"),
            config_file: None,
            extra_options: Vec::new(),
            accept_new_host_keys: false,
            connect_timeout: Duration::from_secs(10),
            keepalive_interval: Duration::from_secs(5),
            keepalive_count_max: 3,
            grace: Duration::from_secs(5),
            start_timeout: Duration::from_secs(20),
            multiplex: true,
            max_startups_per_host: 4,
            max_sessions_per_connection: 8,
            job_id: None,
        }
    }
}

impl SshOptions {
    /// Builds the ssh options every connection and session gets, in the
    /// order that lets the user's `-o` values override the defaults.
    fn common_args(&self) -> Vec<OsString> {
        let mut args: Vec<OsString> = Vec::new();
        if let Some(config) = &self.config_file {
            args.push("-F".into());
            args.push(config.into());
        }
        if self.accept_new_host_keys {
            push_option(&mut args, "StrictHostKeyChecking=accept-new");
        }
        for option in &self.extra_options {
            push_option(&mut args, option);
        }
        push_option(&mut args, "BatchMode=yes");
        // A RemoteCommand or port forwardings from the user's config would
        // replace the rank's command or clash between the many sessions.
        push_option(&mut args, "RemoteCommand=none");
        push_option(&mut args, "ClearAllForwardings=yes");
        push_option(
            &mut args,
            &format!("ConnectTimeout={}", whole_seconds(self.connect_timeout)),
        );
        push_option(
            &mut args,
            &format!(
                "ServerAliveInterval={}",
                whole_seconds(self.keepalive_interval)
            ),
        );
        push_option(
            &mut args,
            &format!("ServerAliveCountMax={}", self.keepalive_count_max.max(1)),
        );
        args
    }
}

fn push_option(args: &mut Vec<OsString>, option: &str) {
    args.push("-o".into());
    args.push(option.into());
}

/// Rounds up to whole seconds, at least 1, as ssh's time options take.
fn whole_seconds(duration: Duration) -> u64 {
    duration.as_millis().div_ceil(1000).max(1) as u64
}

/// A rank whose remote process group the spawner could not confirm dead.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UnconfirmedRank {
    pub rank: usize,
    pub host: String,
}

/// Why a remote rank's end is unknown: its ssh session failed while it ran.
///
/// The rank's [`Spawned::wait`] returns this inside an `io::Error`
/// (`io::Error::get_ref()` and `downcast_ref` recover it).
#[derive(Debug, thiserror::Error)]
#[error(
    "rank {rank} on {host}: ssh session failed ({detail}); {}",
    if *.confirmed_dead {
        "the remote process group was stopped".to_owned()
    } else {
        format!("the remote process group could not be confirmed dead; the remote agent stops it within {} s", .watchdog_bound.as_secs())
    }
)]
pub struct SshSessionError {
    pub rank: usize,
    pub host: String,
    /// ssh's exit status or signal and its own error text.
    pub detail: String,
    /// Whether the remote agent confirmed that the rank's group is gone.
    pub confirmed_dead: bool,
    /// Upper bound for the remote agent to stop the group on its own.
    pub watchdog_bound: Duration,
}

/// Starts ranks on remote hosts through OpenSSH.
///
/// Keep the spawner alive until every rank's `wait` has resolved: dropping it
/// closes the links, and each link's agent then stops its remaining ranks.
pub struct SshSpawner {
    pool: Arc<Pool>,
}

impl SshSpawner {
    /// Creates a spawner; connections open on the first `spawn` for each host.
    pub fn new(options: SshOptions) -> std::io::Result<SshSpawner> {
        Ok(SshSpawner {
            pool: Arc::new(Pool::new(options)?),
        })
    }

    /// Ranks whose ssh session failed and whose remote process group the
    /// spawner could not confirm dead, for the launcher's final report.
    pub fn unconfirmed_ranks(&self) -> Vec<UnconfirmedRank> {
        lock(&self.pool.unconfirmed).clone()
    }
}

impl Spawner for SshSpawner {
    fn spawn<'a>(&'a self, spec: &'a RankSpec) -> BoxFuture<'a, Result<Spawned, SpawnError>> {
        Box::pin(session::start(self.pool.clone(), spec))
    }
}

/// Locks a mutex whose data stays consistent even if a holder panicked.
fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}
