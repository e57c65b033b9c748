//! The launch plan: a pure function from hosts and options to one [`RankSpec`] per rank.
//!
//! The plan decides each rank's command, environment and files as
//! mlx.launch 0.32 does for the same flags, plus the generic variables other
//! frameworks read (`RANK`, `WORLD_SIZE`, `MASTER_ADDR`, ...). It differs
//! where mlx.launch is wrong: one rank gets no empty `MLX_HOSTFILE`, and an
//! nccl rank's `CUDA_VISIBLE_DEVICES` is its index on its host. JSON files
//! such as `MLX_IBV_DEVICES` are written compactly, which JSON readers
//! cannot tell apart from Python's `json.dumps` spacing.

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde_json::{json, Value};

use crate::cli::{Backend, StdinMode};
use crate::exec::{RankFile, RankSpec};
use crate::hostfile::{Host, Hostfile};

/// Options that shape the plan, gathered from the command line and the hostfile.
#[derive(Clone, Debug)]
pub struct PlanOptions {
    pub backend: Backend,
    pub command: Vec<String>,
    pub python: Option<String>,
    /// `KEY=VALUE` or `KEY` entries: the hostfile's `envs` first, then `--env` in order.
    pub env: Vec<String>,
    pub cwd: Option<PathBuf>,
    /// Directory entered when `cwd` is not set and the directory exists on the host.
    pub default_cwd: Option<PathBuf>,
    pub starting_port: u16,
    pub connections_per_ip: u32,
    pub nccl_port: u16,
    /// Ranks per host given with `-n`.
    pub repeat_hosts: u32,
    pub verbose: bool,
    pub stdin: StdinMode,
    /// Columns and lines of the launcher's terminal, if it runs on one.
    pub terminal_size: Option<(u16, u16)>,
}

/// Every rank's launch specification, in rank order.
#[derive(Clone, Debug)]
pub struct LaunchPlan {
    pub backend: Backend,
    pub ranks: Vec<RankSpec>,
    /// Ring addresses of each rank, `[["ip:port", ...], ...]`; empty for other backends.
    pub ring_table: Vec<Vec<String>>,
    /// Variables from `--env` or the hostfile that the launcher sets itself
    /// for every rank, so the user's value has no effect.
    pub overridden_env: Vec<String>,
}

/// Variables the launcher sets for each rank on every backend.
const PER_RANK_VARIABLES: [&str; 8] = [
    "MLX_RANK",
    "MLX_WORLD_SIZE",
    "RANK",
    "WORLD_SIZE",
    "LOCAL_RANK",
    "LOCAL_WORLD_SIZE",
    "MASTER_ADDR",
    "MASTER_PORT",
];

/// Invalid combinations of hosts and options, found before anything starts.
#[derive(Debug, thiserror::Error)]
pub enum PlanError {
    #[error("invalid environment entry {entry:?}: {reason}")]
    InvalidEnv { entry: String, reason: String },
    #[error("{key} (from --env or the hostfile's \"envs\") is not set in the launcher's environment, so it cannot be forwarded\nhint: give a value as {key}=VALUE, or set {key} before launching")]
    UnsetEnv { key: String },
    #[error("the ring backend needs IP addresses, but host {index} ({host}) has none\nhint: list hosts by IP address in --hosts, or add \"ips\" to its hostfile entry (ringleader config writes a hostfile with them)")]
    MissingIps { index: usize, host: String },
    #[error("the ring ports do not fit: --starting-port {start} plus {count} addresses goes past 65535\nhint: choose a lower --starting-port")]
    PortOverflow { start: u16, count: usize },
    #[error("MASTER_PORT would be {port}, past 65535: it is the port after {after}\nhint: choose a lower {option}")]
    MasterPortOverflow { port: u32, after: String, option: &'static str },
    #[error("the {backend} backend needs an IP address for rank 0 ({host}) that all ranks can reach\nhint: add \"ips\" to the first hostfile entry")]
    MissingCoordinatorIp { backend: &'static str, host: String },
    #[error("the hostfile is malformed: {0}")]
    Rdma(String),
    #[error("the mpi backend runs through mpirun and cannot be planned per rank")]
    MpiNotPerRank,
}

/// Builds the plan. `lookup_env` reads the launcher's environment, for `--env KEY`.
pub fn build(
    hostfile: &Hostfile,
    options: &PlanOptions,
    lookup_env: &dyn Fn(&str) -> Option<String>,
) -> Result<LaunchPlan, PlanError> {
    let hosts = &hostfile.hosts;
    let world_size = hosts.len();
    let mut user_env = parse_env_entries(&options.env, lookup_env)?;
    if let Some((columns, lines)) = options.terminal_size {
        if !user_env.iter().any(|(key, _)| key == "COLUMNS") {
            user_env.push(("COLUMNS".into(), columns.to_string()));
            user_env.push(("LINES".into(), lines.to_string()));
        }
    }

    let mut shared_env: Vec<(String, String)> = Vec::new();
    let mut shared_files: Vec<RankFile> = Vec::new();
    let mut ring_table = Vec::new();
    let master_addr = hosts[0].ips.first().cloned().unwrap_or_else(|| hosts[0].ssh.clone());
    let mut master_port = options.starting_port as u32;

    match options.backend {
        Backend::Ring => {
            ring_table = ring_address_table(hosts, options.starting_port, options.connections_per_ip)?;
            let addresses: usize = ring_table.iter().map(Vec::len).sum();
            master_port += addresses as u32;
            // mlx.launch writes an empty MLX_HOSTFILE for one rank, which MLX
            // cannot parse; without the variable MLX makes a one-rank group.
            if world_size > 1 {
                shared_files.push(RankFile {
                    env_var: "MLX_HOSTFILE".into(),
                    contents: serde_json::to_string(&ring_table).expect("a list of strings serializes").into(),
                });
            }
            if options.verbose {
                shared_env.push(("MLX_RING_VERBOSE".into(), "1".into()));
            }
        }
        Backend::Nccl => {
            let coordinator = coordinator_ip(hosts, "nccl")?;
            // NCCL's coordinator takes nccl_port, so frameworks get the next one.
            master_port = options.nccl_port as u32 + 1;
            if options.verbose {
                shared_env.push(("NCCL_DEBUG".into(), "INFO".into()));
            }
            shared_env.push(("NCCL_HOST_IP".into(), coordinator));
            shared_env.push(("NCCL_PORT".into(), options.nccl_port.to_string()));
        }
        Backend::Jaccl | Backend::JacclRing => {
            let ring = options.backend == Backend::JacclRing;
            check_rdma_table(hosts, ring)?;
            let coordinator = coordinator_ip(hosts, options.backend.name())?;
            shared_env.push((
                "MLX_JACCL_COORDINATOR".into(),
                format!("{coordinator}:{}", options.starting_port),
            ));
            if ring {
                shared_env.push(("MLX_JACCL_RING".into(), "1".into()));
            }
            let devices: Vec<Value> = hosts.iter().map(|h| Value::Array(h.rdma.clone())).collect();
            shared_files.push(RankFile {
                env_var: "MLX_IBV_DEVICES".into(),
                contents: Value::Array(devices).to_string().into(),
            });
            master_port += 1;
        }
        Backend::Mpi => return Err(PlanError::MpiNotPerRank),
    }

    let mut command = options.command.clone();
    if let Some(python) = &options.python {
        command.insert(0, python.clone());
    }

    let local_positions = local_positions(hosts);
    if master_port > 65535 {
        let (after, option) = match options.backend {
            Backend::Nccl => (format!("--nccl-port {}", options.nccl_port), "--nccl-port"),
            Backend::Jaccl | Backend::JacclRing => {
                (format!("the jaccl coordinator's port {}", options.starting_port), "--starting-port")
            }
            _ => ("the last ring port".to_string(), "--starting-port"),
        };
        return Err(PlanError::MasterPortOverflow { port: master_port, after, option });
    }
    let mut ranks = Vec::with_capacity(world_size);
    for (rank, host) in hosts.iter().enumerate() {
        let (local_rank, local_world_size) = local_positions[rank];
        let mut env = user_env.clone();
        env.extend(shared_env.iter().cloned());
        if options.backend == Backend::Nccl {
            // mlx.launch 0.32 picks `rank % -n`, which gives every rank GPU 0
            // when a hostfile lists one host several times. The rank's index
            // on its host gives the same GPUs for `--hosts ... -n` and
            // distinct GPUs for such hostfiles.
            env.push(("CUDA_VISIBLE_DEVICES".into(), local_rank.to_string()));
        }
        // The same names, in the same order, as PER_RANK_VARIABLES.
        env.extend([
            ("MLX_RANK".to_string(), rank.to_string()),
            ("MLX_WORLD_SIZE".to_string(), world_size.to_string()),
            ("RANK".to_string(), rank.to_string()),
            ("WORLD_SIZE".to_string(), world_size.to_string()),
            ("LOCAL_RANK".to_string(), local_rank.to_string()),
            ("LOCAL_WORLD_SIZE".to_string(), local_world_size.to_string()),
            ("MASTER_ADDR".to_string(), master_addr.clone()),
            ("MASTER_PORT".to_string(), master_port.to_string()),
        ]);
        ranks.push(RankSpec {
            rank,
            host: host.ssh.clone(),
            ssh: host.target.clone(),
            argv: command.clone(),
            env: dedup_last_wins(env),
            files: shared_files.clone(),
            cwd: options.cwd.clone(),
            default_cwd: options.default_cwd.clone(),
            stdin: match options.stdin {
                StdinMode::All => true,
                StdinMode::RankZero => rank == 0,
                StdinMode::None => false,
            },
        });
    }

    let mut launcher_keys: Vec<&str> = PER_RANK_VARIABLES.to_vec();
    launcher_keys.extend(shared_env.iter().map(|(key, _)| key.as_str()));
    launcher_keys.extend(shared_files.iter().map(|file| file.env_var.as_str()));
    if options.backend == Backend::Nccl {
        launcher_keys.push("CUDA_VISIBLE_DEVICES");
    }
    let mut overridden_env: Vec<String> = Vec::new();
    for (key, _) in parse_env_entries(&options.env, lookup_env)? {
        if launcher_keys.contains(&key.as_str()) && !overridden_env.contains(&key) {
            overridden_env.push(key);
        }
    }
    Ok(LaunchPlan {
        backend: options.backend,
        ranks,
        ring_table,
        overridden_env,
    })
}

/// Builds the ring address table as mlx.launch does: for each host, for each
/// of its IPs, `connections_per_ip` addresses, with one port per address
/// counting up from `starting_port` across the whole job.
pub fn ring_address_table(
    hosts: &[Host],
    starting_port: u16,
    connections_per_ip: u32,
) -> Result<Vec<Vec<String>>, PlanError> {
    let mut port = starting_port as u32;
    let mut table = Vec::with_capacity(hosts.len());
    for (index, host) in hosts.iter().enumerate() {
        if host.ips.is_empty() {
            return Err(PlanError::MissingIps {
                index,
                host: host.ssh.clone(),
            });
        }
        let mut addresses = Vec::new();
        for ip in &host.ips {
            for _ in 0..connections_per_ip {
                if port > 65535 {
                    let count = hosts.iter().map(|h| h.ips.len()).sum::<usize>() * connections_per_ip as usize;
                    return Err(PlanError::PortOverflow { start: starting_port, count });
                }
                addresses.push(socket_address(ip, port));
                port += 1;
            }
        }
        table.push(addresses);
    }
    Ok(table)
}

/// Formats `ip:port`, with brackets around IPv6 addresses so the port stays unambiguous.
fn socket_address(ip: &str, port: u32) -> String {
    if ip.contains(':') {
        format!("[{ip}]:{port}")
    } else {
        format!("{ip}:{port}")
    }
}

fn coordinator_ip(hosts: &[Host], backend: &'static str) -> Result<String, PlanError> {
    hosts[0].ips.first().cloned().ok_or_else(|| PlanError::MissingCoordinatorIp {
        backend,
        host: hosts[0].ssh.clone(),
    })
}

/// Checks the jaccl device table: one entry per host, `null` for the host
/// itself, and a device for every peer the backend talks to (ring neighbours
/// only for jaccl-ring).
fn check_rdma_table(hosts: &[Host], ring: bool) -> Result<(), PlanError> {
    let n = hosts.len();
    if let Some((i, host)) = hosts.iter().enumerate().find(|(_, h)| h.rdma.len() != n) {
        return Err(PlanError::Rdma(format!(
            "host {i} ({}) lists {} RDMA devices but the job has {n} hosts; \"rdma\" needs one entry per host",
            host.ssh,
            host.rdma.len()
        )));
    }
    for (i, host) in hosts.iter().enumerate() {
        if let Some((j, entry)) = host.rdma.iter().enumerate().find(|(_, entry)| !is_rdma_entry(entry)) {
            return Err(PlanError::Rdma(format!(
                "host {i} ({}) RDMA entry {j} must be a device name, a list of device names or null, got {entry}",
                host.ssh
            )));
        }
    }
    if let Some((i, host)) = hosts.iter().enumerate().find(|(i, h)| !h.rdma[*i].is_null()) {
        return Err(PlanError::Rdma(format!(
            "host {i} ({}) must list null as its own RDMA device (entry {i})",
            host.ssh
        )));
    }
    let mut missing = Vec::new();
    for (i, host) in hosts.iter().enumerate() {
        let peers: Vec<usize> = if ring {
            vec![(i + n - 1) % n, (i + 1) % n]
        } else {
            (0..n).collect()
        };
        for j in peers {
            if i != j && host.rdma[j].is_null() {
                missing.push(format!("{} to {}", host.ssh, hosts[j].ssh));
            }
        }
    }
    if !missing.is_empty() {
        let shown = missing.len().min(3);
        let mut pairs = missing[..shown].join(", ");
        if missing.len() > shown {
            pairs += &format!(" and {} more", missing.len() - shown);
        }
        return Err(PlanError::Rdma(format!("no RDMA device is listed for {pairs}")));
    }
    Ok(())
}

/// Returns whether `entry` is `null`, a device name, or a non-empty list of
/// device names (one per connection), the forms mlx.distributed_config writes.
fn is_rdma_entry(entry: &Value) -> bool {
    let is_name = |value: &Value| value.as_str().is_some_and(|name| !name.is_empty());
    match entry {
        Value::Null => true,
        Value::Array(names) => !names.is_empty() && names.iter().all(is_name),
        other => is_name(other),
    }
}

/// Returns, per rank, its index among the ranks on its host and how many
/// ranks that host runs. All loopback names are one host: this machine.
fn local_positions(hosts: &[Host]) -> Vec<(usize, usize)> {
    let machine = |host: &Host| -> String {
        if crate::hostfile::is_local_name(&host.ssh) {
            "127.0.0.1".to_string()
        } else {
            host.ssh.clone()
        }
    };
    let mut totals: std::collections::HashMap<String, usize> = std::collections::HashMap::new();
    for host in hosts {
        *totals.entry(machine(host)).or_default() += 1;
    }
    let mut seen: std::collections::HashMap<String, usize> = std::collections::HashMap::new();
    hosts
        .iter()
        .map(|host| {
            let name = machine(host);
            let index = seen.entry(name.clone()).or_default();
            let position = (*index, totals[&name]);
            *index += 1;
            position
        })
        .collect()
}

/// Parses `KEY=VALUE` and `KEY` entries; `KEY` alone takes the launcher's value.
pub fn parse_env_entries(
    entries: &[String],
    lookup_env: &dyn Fn(&str) -> Option<String>,
) -> Result<Vec<(String, String)>, PlanError> {
    let mut env = Vec::with_capacity(entries.len());
    for entry in entries {
        let (key, value) = match entry.split_once('=') {
            Some((key, value)) => (key, Some(value)),
            None => (entry.as_str(), None),
        };
        if !is_valid_env_key(key) {
            return Err(PlanError::InvalidEnv {
                entry: entry.clone(),
                reason: "the name must be letters, digits and underscores, not starting with a digit".into(),
            });
        }
        let value = match value {
            Some(value) => value.to_string(),
            None => lookup_env(key).ok_or_else(|| PlanError::UnsetEnv { key: key.to_string() })?,
        };
        env.push((key.to_string(), value));
    }
    Ok(env)
}

fn is_valid_env_key(key: &str) -> bool {
    let mut chars = key.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

/// Keeps the last value of each variable, in the order of first appearance.
fn dedup_last_wins(env: Vec<(String, String)>) -> Vec<(String, String)> {
    let mut last: BTreeMap<&str, &str> = BTreeMap::new();
    for (key, value) in &env {
        last.insert(key, value);
    }
    let mut seen = std::collections::BTreeSet::new();
    let mut result = Vec::with_capacity(last.len());
    for (key, _) in &env {
        if seen.insert(key.as_str()) {
            result.push((key.clone(), last[key.as_str()].to_string()));
        }
    }
    result
}

/// Renders the plan for `--dry-run --json`.
pub fn to_json(plan: &LaunchPlan) -> Value {
    let ranks: Vec<Value> = plan
        .ranks
        .iter()
        .map(|spec| {
            let env: serde_json::Map<String, Value> =
                spec.env.iter().map(|(k, v)| (k.clone(), Value::String(v.clone()))).collect();
            let files: Vec<&str> = spec.files.iter().map(|file| file.env_var.as_str()).collect();
            json!({
                "rank": spec.rank,
                "host": spec.host,
                "local": crate::hostfile::is_local_name(&spec.host),
                "ssh": spec.ssh,
                "command": spec.argv,
                "cwd": spec.cwd,
                "env": env,
                "files": files,
                "stdin": spec.stdin,
            })
        })
        .collect();
    let files: serde_json::Map<String, Value> = shared_files(plan)
        .map(|file| (file.env_var.clone(), Value::String(file.contents.to_string())))
        .collect();
    json!({
        "backend": plan.backend,
        "world_size": plan.ranks.len(),
        "ring_table": plan.ring_table,
        "files": files,
        "ranks": ranks,
    })
}

/// Returns the files of the plan, each once. Every rank gets the same
/// files, so a rank lists only their variables and the contents appear
/// once: printing them per rank would grow with the square of the rank
/// count.
fn shared_files(plan: &LaunchPlan) -> impl Iterator<Item = &RankFile> {
    plan.ranks.first().into_iter().flat_map(|spec| spec.files.iter())
}

/// Renders the plan for `--dry-run` as text, one block per rank.
pub fn to_text(plan: &LaunchPlan) -> String {
    let mut text = format!("backend {}, {} ranks\n", plan.backend.name(), plan.ranks.len());
    for file in shared_files(plan) {
        text += &format!("file {} for every rank: {}\n", file.env_var, file.contents);
    }
    for spec in &plan.ranks {
        let command: Vec<String> = spec.argv.iter().map(|a| crate::shell::quote(a)).collect();
        text += &format!("rank {} on {}: {}\n", spec.rank, spec.host, command.join(" "));
        if let Some(cwd) = &spec.cwd {
            text += &format!("  cwd {}\n", cwd.display());
        }
        for (key, value) in &spec.env {
            text += &format!("  {key}={}\n", crate::shell::quote(value));
        }
        for file in &spec.files {
            text += &format!("  {} = the file {} above\n", file.env_var, file.env_var);
        }
    }
    text
}

#[cfg(test)]
mod tests;
