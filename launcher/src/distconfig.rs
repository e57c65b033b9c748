//! `ringleader config`: checks passwordless ssh to each host, reads each
//! host's IP address over ssh and writes a hostfile, as
//! `mlx.distributed_config --over ethernet` does.
//!
//! The address query runs through the [`Spawner`], so it reaches each host
//! exactly as a rank would, with ssh's BatchMode on (no password prompts).
//!
//! # Limitations
//!
//! - Thunderbolt discovery and RDMA setup need macOS hardware and are not
//!   supported; the hostfile lists Ethernet addresses only.
//! - One address per host. On Linux it is the IPv4 address of the interface
//!   that carries the default route, else the first global IPv4 address of
//!   an interface that is up. On macOS it is `en0`'s, else `en1`'s.

use std::sync::Arc;
use std::time::Duration;

use serde_json::{json, Value};
use tokio::io::AsyncReadExt;

use crate::cli::Backend;
use crate::exec::{RankSpec, Spawned, Spawner, Termination};
use crate::hostfile::Host;

/// The shell script that prints the host's operating system and addresses.
/// Linux hosts print `linux`, then the output of `ip -j addr show` and of
/// `ip -j route show default`, one JSON document per line. macOS hosts print
/// `macos` and one address.
pub const ADDRESS_SCRIPT: &str = "if command -v ip >/dev/null 2>&1; then echo linux; ip -j addr show; \
ip -j route show default; elif command -v ipconfig >/dev/null 2>&1; then echo macos; \
ipconfig getifaddr en0 || ipconfig getifaddr en1 || true; else echo unknown; uname -s; fi";

/// The outcome for one host.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum HostResult {
    /// ssh worked; the host's addresses (possibly none).
    Reached { ips: Vec<String> },
    /// ssh or the address query failed, with the reason.
    Failed { reason: String },
}

/// Queries every host's addresses, all hosts at once, each bounded by `timeout`.
pub async fn query_hosts(hosts: &[Host], spawner: Arc<dyn Spawner>, timeout: Duration) -> Vec<HostResult> {
    let mut tasks = Vec::with_capacity(hosts.len());
    for (index, host) in hosts.iter().enumerate() {
        let spec = RankSpec {
            rank: index,
            host: host.ssh.clone(),
            ssh: host.target.clone(),
            argv: vec!["sh".into(), "-c".into(), ADDRESS_SCRIPT.into()],
            env: Vec::new(),
            files: Vec::new(),
            cwd: None,
            default_cwd: None,
            stdin: false,
        };
        let spawner = spawner.clone();
        tasks.push(tokio::spawn(async move {
            match tokio::time::timeout(timeout, query_host(spawner.as_ref(), &spec)).await {
                Ok(result) => result,
                Err(_) => HostResult::Failed { reason: format!("no answer within {} s", timeout.as_secs_f64()) },
            }
        }));
    }
    let mut results = Vec::with_capacity(tasks.len());
    for task in tasks {
        results.push(task.await.unwrap_or_else(|error| HostResult::Failed { reason: error.to_string() }));
    }
    results
}

async fn query_host(spawner: &dyn Spawner, spec: &RankSpec) -> HostResult {
    let spawned = match spawner.spawn(spec).await {
        Ok(spawned) => spawned,
        Err(error) => {
            // The transport's message names a rank, which means nothing here.
            let text = error.to_string();
            let text = text.strip_prefix(&format!("rank {} on {}: ", spec.rank, spec.host)).unwrap_or(&text);
            return HostResult::Failed { reason: format!("cannot ssh: {text}") };
        }
    };
    let Spawned { mut stdout, mut stderr, wait, .. } = spawned;
    let mut out = String::new();
    let mut err = String::new();
    let (_, _, termination) = tokio::join!(stdout.read_to_string(&mut out), stderr.read_to_string(&mut err), wait);
    match termination {
        Ok(Termination::Exited(0)) => match parse_addresses(&out) {
            Ok(ips) => HostResult::Reached { ips },
            Err(reason) => HostResult::Failed { reason },
        },
        Ok(other) => HostResult::Failed { reason: format!("the address query ended with {other}: {}", err.trim()) },
        Err(error) => HostResult::Failed { reason: error.to_string() },
    }
}

/// Picks the host's address from the output of [`ADDRESS_SCRIPT`].
pub fn parse_addresses(output: &str) -> Result<Vec<String>, String> {
    let mut lines = output.lines();
    match lines.next().map(str::trim) {
        Some("linux") => {
            let interfaces: Value = serde_json::from_str(lines.next().unwrap_or(""))
                .map_err(|error| format!("cannot read the output of ip -j addr: {error}"))?;
            let routes: Value = serde_json::from_str(lines.next().unwrap_or("[]")).unwrap_or(json!([]));
            Ok(pick_linux_address(&interfaces, &routes).into_iter().collect())
        }
        Some("macos") => Ok(lines
            .next()
            .map(str::trim)
            .filter(|ip| ip.parse::<std::net::IpAddr>().is_ok())
            .map(|ip| vec![ip.to_string()])
            .unwrap_or_default()),
        Some("unknown") => Err(format!(
            "neither ip nor ipconfig is installed on this {} host",
            lines.next().unwrap_or("unknown").trim()
        )),
        _ => Err("unexpected output from the address query".into()),
    }
}

/// Picks the IPv4 address of the default route's interface, else the first
/// global IPv4 address of an interface that is up and not loopback.
fn pick_linux_address(interfaces: &Value, routes: &Value) -> Option<String> {
    let interfaces = interfaces.as_array()?;
    let global_ipv4 = |interface: &Value| -> Option<String> {
        interface["addr_info"].as_array()?.iter().find_map(|address| {
            let usable = address["family"] == "inet" && address["scope"] == "global";
            usable.then(|| address["local"].as_str().map(str::to_string)).flatten()
        })
    };
    let default_device = routes.as_array().and_then(|routes| routes.iter().find_map(|route| route["dev"].as_str()));
    if let Some(device) = default_device {
        if let Some(address) = interfaces.iter().filter(|i| i["ifname"] == device).find_map(global_ipv4) {
            return Some(address);
        }
    }
    interfaces
        .iter()
        .filter(|interface| {
            let flags = interface["flags"].as_array();
            let has = |flag: &str| flags.is_some_and(|flags| flags.iter().any(|f| f == flag));
            has("UP") && !has("LOOPBACK")
        })
        .find_map(global_ipv4)
}

/// Builds the hostfile: the object form with `backend`, `envs` and `hosts`.
pub fn hostfile_json(hosts: &[(Host, Vec<String>)], backend: Backend, envs: &[String]) -> Value {
    let hosts: Vec<Value> = hosts
        .iter()
        .map(|(host, ips)| {
            let mut entry = json!({"ssh": host.ssh, "ips": ips, "rdma": host.rdma});
            if let Some(user) = &host.target.user {
                entry["user"] = json!(user);
            }
            if let Some(port) = host.target.port {
                entry["port"] = json!(port);
            }
            if let Some(identity) = &host.target.identity {
                entry["identity"] = json!(identity);
            }
            entry
        })
        .collect();
    json!({"backend": backend.name(), "envs": envs, "hosts": hosts})
}

#[cfg(test)]
mod tests {
    use super::*;

    const ADDR: &str = r#"[{"ifname":"lo","flags":["LOOPBACK","UP"],"addr_info":[{"family":"inet","local":"127.0.0.1","scope":"host"}]},{"ifname":"docker0","flags":["BROADCAST","UP"],"addr_info":[{"family":"inet","local":"172.17.0.1","scope":"global"}]},{"ifname":"eth0","flags":["BROADCAST","UP"],"addr_info":[{"family":"inet6","local":"fd00::2","scope":"global"},{"family":"inet","local":"10.1.2.3","scope":"global"}]},{"ifname":"eth1","flags":["BROADCAST"],"addr_info":[{"family":"inet","local":"10.9.9.9","scope":"global"}]}]"#;

    #[test]
    fn linux_prefers_the_default_route_interface() {
        let output = format!("linux\n{ADDR}\n[{{\"dst\":\"default\",\"gateway\":\"10.1.2.1\",\"dev\":\"eth0\"}}]\n");
        assert_eq!(parse_addresses(&output).unwrap(), ["10.1.2.3"]);
    }

    #[test]
    fn linux_without_default_route_takes_first_up_interface() {
        let output = format!("linux\n{ADDR}\n[]\n");
        assert_eq!(parse_addresses(&output).unwrap(), ["172.17.0.1"]);
    }

    #[test]
    fn linux_with_only_loopback_has_no_address() {
        let output = "linux\n[{\"ifname\":\"lo\",\"flags\":[\"LOOPBACK\",\"UP\"],\"addr_info\":[{\"family\":\"inet\",\"local\":\"127.0.0.1\",\"scope\":\"host\"}]}]\n\n";
        assert_eq!(parse_addresses(output).unwrap(), Vec::<String>::new());
    }

    #[test]
    fn macos_reports_one_address() {
        assert_eq!(parse_addresses("macos\n192.168.1.20\n").unwrap(), ["192.168.1.20"]);
        assert_eq!(parse_addresses("macos\n").unwrap(), Vec::<String>::new());
    }

    #[test]
    fn unusable_output_is_an_error() {
        assert!(parse_addresses("linux\nnot json\n").unwrap_err().contains("ip -j addr"));
        assert!(parse_addresses("unknown\nFreeBSD\n").unwrap_err().contains("FreeBSD"));
        assert!(parse_addresses("").is_err());
    }

    #[test]
    fn hostfile_records_backend_envs_and_login() {
        let mut host = Host::named("n1".into());
        host.target.user = Some("me".into());
        let value = hostfile_json(&[(host, vec!["10.0.0.1".into()])], Backend::Ring, &["A=1".into()]);
        assert_eq!(
            value,
            json!({"backend": "ring", "envs": ["A=1"], "hosts": [{"ssh": "n1", "ips": ["10.0.0.1"], "rdma": [], "user": "me"}]})
        );
    }
}
