//! The ring's inputs: the address table from `MLX_HOSTFILE`, the rank from
//! `MLX_RANK`, and the timeouts.

use std::net::{IpAddr, SocketAddr};
use std::path::Path;

use tokio::time::Duration;

use super::error::RingError;

/// Environment variable with the rank of this process.
pub const RANK_VAR: &str = "MLX_RANK";
/// Environment variable with the path of the JSON address table.
pub const HOSTFILE_VAR: &str = "MLX_HOSTFILE";
/// Environment variable with the connect and accept deadline, in seconds.
pub const CONNECT_TIMEOUT_VAR: &str = "RINGLEADER_RING_CONNECT_TIMEOUT";
/// Environment variable with the per-operation timeout, in seconds.
pub const OP_TIMEOUT_VAR: &str = "RINGLEADER_RING_OP_TIMEOUT";

/// Default deadline for forming the ring.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(60);

/// The listening addresses of every rank, indexed by rank. Rank `r` accepts
/// one connection from rank `r - 1` on each of its addresses, in order, and
/// connects once to each address of rank `r + 1`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AddressTable {
    ranks: Vec<Vec<SocketAddr>>,
}

impl AddressTable {
    /// Checks that there is at least one rank and that every rank lists the
    /// same, non-zero number of addresses (a connection to the right needs a
    /// matching one from the left).
    pub fn new(ranks: Vec<Vec<SocketAddr>>) -> Result<Self, RingError> {
        let Some(first) = ranks.first() else {
            return Err(RingError::InvalidTable("no ranks".into()));
        };
        let per_rank = first.len();
        if per_rank == 0 {
            return Err(RingError::InvalidTable("rank 0 has no addresses".into()));
        }
        if let Some((rank, addrs)) = ranks.iter().enumerate().find(|(_, a)| a.len() != per_rank) {
            return Err(RingError::InvalidTable(format!(
                "rank {rank} has {} addresses but rank 0 has {per_rank}; every rank needs the same number",
                addrs.len()
            )));
        }
        Ok(AddressTable { ranks })
    }

    /// Parses the JSON text of an `MLX_HOSTFILE`; `path` names it in errors.
    pub fn parse_hostfile(text: &str, path: &Path) -> Result<Self, RingError> {
        let invalid = |reason: String| RingError::HostfileInvalid {
            path: path.to_owned(),
            reason,
        };
        let entries: Vec<Vec<String>> =
            serde_json::from_str(text).map_err(|err| invalid(err.to_string()))?;

        let mut ranks = Vec::with_capacity(entries.len());
        for (rank, entry) in entries.iter().enumerate() {
            let mut addrs = Vec::with_capacity(entry.len());
            for addr in entry {
                let parsed = addr.parse::<SocketAddr>().map_err(|_| {
                    invalid(format!(
                        "rank {rank}: {addr:?} is not an \"ip:port\" address"
                    ))
                })?;
                addrs.push(parsed);
            }
            ranks.push(addrs);
        }
        Self::new(ranks).map_err(|err| invalid(err.to_string()))
    }

    /// Number of ranks.
    pub fn size(&self) -> usize {
        self.ranks.len()
    }

    /// Number of connections between two neighbours.
    pub fn connections(&self) -> usize {
        self.ranks[0].len()
    }

    /// Returns the listening addresses of `rank`.
    pub fn addrs(&self, rank: usize) -> &[SocketAddr] {
        &self.ranks[rank]
    }
}

/// Tuning of a ring beyond its address table.
#[derive(Debug, Clone, PartialEq)]
pub struct RingOptions {
    /// Deadline for forming the ring: for connecting (retried with backoff
    /// while the peer is not listening yet) and for accepting.
    pub connect_timeout: Duration,
    /// Deadline for each collective; `None` waits as long as the peers stay
    /// connected.
    pub op_timeout: Option<Duration>,
    /// Listen on this IP (with the port from the table) instead of the
    /// table's address, such as `0.0.0.0` under a simulator.
    pub bind_ip: Option<IpAddr>,
}

impl Default for RingOptions {
    fn default() -> Self {
        RingOptions {
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
            op_timeout: None,
            bind_ip: None,
        }
    }
}

impl RingOptions {
    /// Reads [`CONNECT_TIMEOUT_VAR`] and [`OP_TIMEOUT_VAR`] (seconds, decimals
    /// allowed) on top of the defaults.
    pub fn from_env() -> Result<Self, RingError> {
        let mut options = RingOptions::default();
        if let Some(timeout) = seconds_from_env(CONNECT_TIMEOUT_VAR)? {
            options.connect_timeout = timeout;
        }
        options.op_timeout = seconds_from_env(OP_TIMEOUT_VAR)?;
        Ok(options)
    }
}

fn seconds_from_env(var: &'static str) -> Result<Option<Duration>, RingError> {
    let Ok(value) = std::env::var(var) else {
        return Ok(None);
    };
    parse_seconds(&value)
        .map(Some)
        .map_err(|reason| RingError::InvalidEnv { var, value, reason })
}

fn parse_seconds(value: &str) -> Result<Duration, String> {
    let seconds: f64 = value
        .trim()
        .parse()
        .map_err(|_| "expected a number of seconds".to_string())?;
    if seconds.is_nan() || seconds <= 0.0 {
        return Err("expected a positive number of seconds".into());
    }
    Duration::try_from_secs_f64(seconds).map_err(|err| err.to_string())
}

/// Reads `MLX_RANK` and `MLX_HOSTFILE`. Returns `None` when neither is set,
/// or when `MLX_RANK` is 0 without a hostfile (ringleader's one-rank jobs):
/// a one-rank group, as in MLX. Returns a one-rank table when the hostfile
/// is empty, which is what mlx.launch writes for a single host.
pub fn rank_and_table_from_env() -> Result<Option<(usize, Option<AddressTable>)>, RingError> {
    let rank = std::env::var(RANK_VAR).ok();
    let hostfile = std::env::var(HOSTFILE_VAR).ok().filter(|path| !path.is_empty());
    let (rank_text, path) = match (rank, hostfile) {
        (None, None) => return Ok(None),
        (Some(rank), None) if rank.trim() == "0" => return Ok(None),
        (Some(rank), Some(path)) => (rank, path),
        (rank, path) => {
            let (var, value) = if rank.is_none() {
                (RANK_VAR, String::new())
            } else {
                (HOSTFILE_VAR, String::new())
            };
            let other = rank.or(path).unwrap_or_default();
            return Err(RingError::InvalidEnv {
                var,
                value,
                reason: format!(
                    "it must be set together with the other ring variable (got {other:?})"
                ),
            });
        }
    };

    let rank: usize = rank_text
        .trim()
        .parse()
        .map_err(|_| RingError::InvalidEnv {
            var: RANK_VAR,
            value: rank_text.clone(),
            reason: "expected a rank number (0, 1, ...)".into(),
        })?;
    let path = Path::new(&path);
    let text = std::fs::read_to_string(path).map_err(|source| RingError::HostfileRead {
        path: path.to_owned(),
        source,
    })?;
    if text.trim().is_empty() {
        return Ok(Some((rank, None)));
    }
    Ok(Some((
        rank,
        Some(AddressTable::parse_hostfile(&text, path)?),
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<AddressTable, RingError> {
        AddressTable::parse_hostfile(text, Path::new("hosts.json"))
    }

    #[test]
    fn hostfile_as_mlx_launch_writes_it() {
        let table =
            parse(r#"[["127.0.0.1:5000", "127.0.0.1:5001"], ["10.0.0.2:5002", "10.0.0.2:5003"]]"#)
                .unwrap();
        assert_eq!(table.size(), 2);
        assert_eq!(table.connections(), 2);
        assert_eq!(table.addrs(1)[1], "10.0.0.2:5003".parse().unwrap());
    }

    #[test]
    fn hostfile_with_hostname_names_the_entry() {
        let err = parse(r#"[["node1:5000"], ["127.0.0.1:5001"]]"#).unwrap_err();
        let message = err.to_string();
        assert!(message.contains("hosts.json"), "{message}");
        assert!(message.contains("rank 0"), "{message}");
        assert!(message.contains("node1:5000"), "{message}");
    }

    #[test]
    fn hostfile_with_uneven_connection_counts_is_rejected() {
        let err =
            parse(r#"[["127.0.0.1:5000"], ["127.0.0.1:5001", "127.0.0.1:5002"]]"#).unwrap_err();
        assert!(err.to_string().contains("rank 1 has 2 addresses"), "{err}");
    }

    #[test]
    fn hostfile_that_is_not_json_is_rejected() {
        let err = parse("127.0.0.1:5000").unwrap_err();
        assert!(matches!(err, RingError::HostfileInvalid { .. }), "{err}");
    }

    #[test]
    fn seconds_accept_decimals_and_reject_zero() {
        assert_eq!(parse_seconds("2.5"), Ok(Duration::from_millis(2500)));
        assert!(parse_seconds("0").is_err());
        assert!(parse_seconds("soon").is_err());
    }
}
