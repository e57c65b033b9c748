//! Hosts of a job: `--hosts` lists and the two JSON hostfile forms of mlx.launch.
//!
//! A hostfile is either a list of hosts or an object with `backend`, `envs`
//! and `hosts`. Each host has `ssh` (where to log in), `ips` (addresses for
//! the ring backend) and `rdma` (device table of the jaccl backends), plus the
//! optional ringleader fields `user`, `port` and `identity`.

use std::net::IpAddr;
use std::path::{Path, PathBuf};

use serde_json::Value;

use crate::exec::SshTarget;
use crate::hostlist;

/// One host entry. A host listed `-n` times is one entry per rank.
#[derive(Clone, Debug, PartialEq)]
pub struct Host {
    /// The ssh destination, or a loopback name for local ranks.
    pub ssh: String,
    /// Addresses other ranks use to reach this rank's ring ports.
    pub ips: Vec<String>,
    /// RDMA device per peer rank (`null` for itself), as the jaccl backends expect.
    pub rdma: Vec<Value>,
    pub target: SshTarget,
}

impl Host {
    /// Builds a host given by name only, as in `--hosts`. Its ring address is
    /// the name itself when that is an IP address.
    pub fn named(name: String) -> Host {
        Host {
            ips: default_ips(&name),
            ssh: name,
            rdma: Vec::new(),
            target: SshTarget::default(),
        }
    }

    /// Returns whether the host is this machine, which runs ranks without ssh.
    pub fn is_local(&self) -> bool {
        is_local_name(&self.ssh)
    }
}

/// Returns whether `name` is one of the loopback names that run ranks locally.
pub fn is_local_name(name: &str) -> bool {
    matches!(name, "127.0.0.1" | "localhost" | "::1")
}

/// The parsed hosts with the hostfile's backend and environment, if any.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Hostfile {
    pub hosts: Vec<Host>,
    pub backend: Option<String>,
    pub envs: Vec<String>,
}

/// Largest hostfile read: 100,000 hosts with a few long addresses each fit
/// in a small fraction of it.
const MAX_HOSTFILE_BYTES: u64 = 64 << 20;

/// Errors in `--hosts` or a hostfile. Each names the file, entry and field.
#[derive(Debug, thiserror::Error)]
pub enum HostfileError {
    #[error("invalid --hosts value {list:?}: {reason}")]
    InvalidList { list: String, reason: String },
    #[error("hostfile {} is larger than {limit_mib} MiB\nhint: check the path; a hostfile is a JSON list of hosts, far smaller than that", path.display())]
    TooLarge { path: PathBuf, limit_mib: u64 },
    #[error("cannot read hostfile {}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("hostfile {} is not valid JSON: {source}", path.display())]
    Json {
        path: PathBuf,
        source: serde_json::Error,
    },
    #[error("hostfile {}: {reason}", path.display())]
    Shape { path: PathBuf, reason: String },
    #[error("hostfile {}: host {index}: field {field:?} {reason}", path.display())]
    Field {
        path: PathBuf,
        index: usize,
        field: &'static str,
        reason: String,
    },
}

impl Hostfile {
    /// Parses a comma-separated `--hosts` value, each host repeated `repeats` times.
    pub fn from_list(list: &str, repeats: usize) -> Result<Hostfile, HostfileError> {
        let invalid = |reason: String| HostfileError::InvalidList {
            list: list.to_string(),
            reason,
        };
        let names = hostlist::expand(list).map_err(|error| invalid(error.to_string()))?;
        let mut hosts = Vec::new();
        for name in names {
            check_host_name(&name).map_err(invalid)?;
            hosts.extend(std::iter::repeat_n(Host::named(name), repeats));
        }
        Ok(Hostfile {
            hosts,
            ..Hostfile::default()
        })
    }

    /// Builds the hosts of a Slurm allocation: each node once per task, or
    /// `repeats` times when that is given (`Some`) in place of Slurm's counts.
    pub fn from_allocation(nodes: Vec<(String, u32)>, repeats: Option<usize>) -> Result<Hostfile, HostfileError> {
        let mut hosts = Vec::new();
        for (name, tasks) in nodes {
            check_host_name(&name).map_err(|reason| HostfileError::InvalidList {
                list: format!("{}={name}", crate::slurm::NODELIST_VAR),
                reason,
            })?;
            let count = repeats.unwrap_or(tasks as usize);
            hosts.extend(std::iter::repeat_n(Host::named(name), count));
        }
        Ok(Hostfile {
            hosts,
            ..Hostfile::default()
        })
    }

    /// Reads and parses a JSON hostfile.
    pub fn from_path(path: &Path) -> Result<Hostfile, HostfileError> {
        use std::io::Read;

        let read_error = |source| HostfileError::Read {
            path: path.to_path_buf(),
            source,
        };
        // Reads at most one byte past the limit, so /dev/zero or a wrong
        // file fails fast instead of filling memory.
        let file = std::fs::File::open(path).map_err(read_error)?;
        let mut bytes = Vec::new();
        file.take(MAX_HOSTFILE_BYTES + 1).read_to_end(&mut bytes).map_err(read_error)?;
        if bytes.len() as u64 > MAX_HOSTFILE_BYTES {
            return Err(HostfileError::TooLarge {
                path: path.to_path_buf(),
                limit_mib: MAX_HOSTFILE_BYTES >> 20,
            });
        }
        let text = String::from_utf8(bytes).map_err(|error| {
            read_error(std::io::Error::new(std::io::ErrorKind::InvalidData, error.utf8_error()))
        })?;
        Hostfile::from_json(path, &text)
    }

    /// Parses hostfile text; `path` only labels errors.
    pub fn from_json(path: &Path, text: &str) -> Result<Hostfile, HostfileError> {
        let shape = |reason: &str| HostfileError::Shape {
            path: path.to_path_buf(),
            reason: reason.to_string(),
        };
        // Editors on some systems start UTF-8 files with a byte order mark.
        let text = text.strip_prefix('\u{feff}').unwrap_or(text);
        if text.trim().is_empty() {
            return Err(shape("the file is empty; it must contain a JSON list of hosts such as [{\"ssh\": \"host1\", \"ips\": [\"10.0.0.1\"]}]"));
        }
        let value: Value = serde_json::from_str(text).map_err(|source| HostfileError::Json {
            path: path.to_path_buf(),
            source,
        })?;

        let mut hostfile = Hostfile::default();
        let entries = match value {
            Value::Array(entries) => entries,
            Value::Object(mut object) => {
                hostfile.backend = parse_backend(path, object.remove("backend"))?;
                hostfile.envs = parse_envs(path, object.remove("envs"))?;
                match object.remove("hosts") {
                    Some(Value::Array(entries)) => entries,
                    Some(_) => return Err(shape("\"hosts\" must be a list of host objects")),
                    None => return Err(shape("the object has no \"hosts\" list")),
                }
            }
            _ => return Err(shape("expected a list of hosts or an object with a \"hosts\" list")),
        };
        if entries.is_empty() {
            return Err(shape("the host list is empty; add at least one host"));
        }
        for (index, entry) in entries.into_iter().enumerate() {
            hostfile.hosts.extend(parse_host(path, index, entry)?);
        }
        Ok(hostfile)
    }

    /// Repeats every host `repeats` times in place, as `-n` does for `--hosts`.
    pub fn repeat(&mut self, repeats: usize) {
        let hosts = std::mem::take(&mut self.hosts);
        for host in hosts {
            self.hosts.extend(std::iter::repeat_n(host, repeats));
        }
    }
}

fn parse_backend(path: &Path, value: Option<Value>) -> Result<Option<String>, HostfileError> {
    match value {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(name)) if name.is_empty() => Ok(None),
        Some(Value::String(name)) => Ok(Some(name)),
        Some(_) => Err(HostfileError::Shape {
            path: path.to_path_buf(),
            reason: "\"backend\" must be a string such as \"ring\"".to_string(),
        }),
    }
}

fn parse_envs(path: &Path, value: Option<Value>) -> Result<Vec<String>, HostfileError> {
    let shape = |reason: String| HostfileError::Shape {
        path: path.to_path_buf(),
        reason,
    };
    match value {
        None | Some(Value::Null) => Ok(Vec::new()),
        Some(Value::Array(items)) => items
            .into_iter()
            .enumerate()
            .map(|(i, item)| match item {
                Value::String(text) => Ok(text),
                other => Err(shape(format!(
                    "\"envs\" entry {i} must be a \"KEY=VALUE\" string, got {other}"
                ))),
            })
            .collect(),
        Some(_) => Err(shape("\"envs\" must be a list of \"KEY=VALUE\" strings".to_string())),
    }
}

/// Parses one entry; an entry whose `ssh` is a host range such as
/// `node[01-04]` gives one host per name.
fn parse_host(path: &Path, index: usize, entry: Value) -> Result<Vec<Host>, HostfileError> {
    let field_error = |field: &'static str, reason: String| HostfileError::Field {
        path: path.to_path_buf(),
        index,
        field,
        reason,
    };
    let Value::Object(mut object) = entry else {
        return Err(HostfileError::Shape {
            path: path.to_path_buf(),
            reason: format!("host {index} must be an object such as {{\"ssh\": \"host1\", \"ips\": [\"10.0.0.1\"]}}, got {entry}"),
        });
    };

    let ssh = match object.remove("ssh") {
        Some(Value::String(name)) if !name.is_empty() => name,
        Some(Value::String(_)) => return Err(field_error("ssh", "is empty".into())),
        Some(other) => return Err(field_error("ssh", format!("must be a host name string, got {other}"))),
        None => return Err(field_error("ssh", "is missing".into())),
    };
    let names = hostlist::expand(&ssh).map_err(|error| field_error("ssh", error.to_string()))?;
    for name in &names {
        check_host_name(name).map_err(|reason| field_error("ssh", reason))?;
    }
    if names.len() > 1 {
        for field in ["ips", "rdma"] {
            if object.get(field).is_some_and(|value| !value.is_null()) {
                return Err(field_error(
                    field,
                    format!("cannot be given for {ssh:?}, which names {} hosts; list each host in its own entry", names.len()),
                ));
            }
        }
    }

    let ips = match object.remove("ips") {
        None | Some(Value::Null) => default_ips(&ssh),
        Some(Value::Array(items)) => {
            let mut ips = Vec::new();
            for item in items {
                match item {
                    Value::String(ip) if ip.parse::<IpAddr>().is_ok() => ips.push(ip),
                    other => {
                        return Err(field_error("ips", format!("contains {other}, which is not an IP address")))
                    }
                }
            }
            ips
        }
        Some(other) => return Err(field_error("ips", format!("must be a list of IP addresses, got {other}"))),
    };

    let rdma = match object.remove("rdma") {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::Array(items)) => items,
        Some(other) => return Err(field_error("rdma", format!("must be a list, got {other}"))),
    };

    let target = parse_target(&mut object, &field_error)?;
    if names.len() == 1 {
        return Ok(vec![Host { ssh, ips, rdma, target }]);
    }
    let hosts = names
        .into_iter()
        .map(|name| Host { target: target.clone(), ..Host::named(name) })
        .collect();
    Ok(hosts)
}

fn parse_target(
    object: &mut serde_json::Map<String, Value>,
    field_error: &dyn Fn(&'static str, String) -> HostfileError,
) -> Result<SshTarget, HostfileError> {
    let mut target = SshTarget::default();
    match object.remove("user") {
        None | Some(Value::Null) => {}
        Some(Value::String(user)) if !user.is_empty() && !user.starts_with('-') && !user.contains(['@', ' ']) => {
            target.user = Some(user)
        }
        Some(other) => return Err(field_error("user", format!("must be a user name, got {other}"))),
    }
    match object.remove("port") {
        None | Some(Value::Null) => {}
        Some(value) => match value.as_u64().filter(|p| (1..=65535).contains(p)) {
            Some(port) => target.port = Some(port as u16),
            None => return Err(field_error("port", format!("must be a port number from 1 to 65535, got {value}"))),
        },
    }
    match object.remove("identity") {
        None | Some(Value::Null) => {}
        Some(Value::String(file)) if !file.is_empty() => target.identity = Some(PathBuf::from(file)),
        Some(other) => return Err(field_error("identity", format!("must be a key file path, got {other}"))),
    }
    Ok(target)
}

/// The ring addresses of a host listed without `ips`: itself when it is an IP
/// address, 127.0.0.1 for `localhost`, else none (the ring backend then reports them missing).
fn default_ips(name: &str) -> Vec<String> {
    if name == "localhost" {
        return vec!["127.0.0.1".to_string()];
    }
    match name.parse::<IpAddr>() {
        Ok(_) => vec![name.to_string()],
        Err(_) => Vec::new(),
    }
}

/// Rejects host names that ssh would read as options or that no host can have.
pub fn check_host_name(name: &str) -> Result<(), String> {
    // The ssh transport's rules, so that a host is rejected at parse time
    // rather than when its rank starts.
    crate::exec::ssh::validate_host(name).map_err(|error| format!("host {name:?}: {}", error.reason))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Hostfile, String> {
        Hostfile::from_json(Path::new("hosts.json"), text).map_err(|e| e.to_string())
    }

    #[test]
    fn list_repeats_each_host_in_place() {
        let hostfile = Hostfile::from_list("10.0.0.1,10.0.0.2", 2).unwrap();
        let names: Vec<_> = hostfile.hosts.iter().map(|h| h.ssh.as_str()).collect();
        assert_eq!(names, ["10.0.0.1", "10.0.0.1", "10.0.0.2", "10.0.0.2"]);
        assert_eq!(hostfile.hosts[0].ips, ["10.0.0.1"]);
    }

    #[test]
    fn list_names_without_ip_get_no_ring_address() {
        let hostfile = Hostfile::from_list("node1,localhost", 1).unwrap();
        assert!(hostfile.hosts[0].ips.is_empty());
        assert_eq!(hostfile.hosts[1].ips, ["127.0.0.1"]);
    }

    #[test]
    fn list_errors() {
        let cases = [
            ("a,,b", "host 1 is empty"),
            ("", "host 0 is empty"),
            ("-oProxyCommand=x", "starts with '-'"),
            ("a b", "whitespace"),
            ("a\nb", "whitespace"),
            ("a\u{7}b", "control character"),
            ("a;b", "a character other than letters"),
        ];
        for (list, expected) in cases {
            let error = Hostfile::from_list(list, 1).unwrap_err().to_string();
            assert!(error.contains(expected), "{list:?}: {error}");
        }
    }

    #[test]
    fn list_expands_ranges() {
        let hostfile = Hostfile::from_list("node[01-02],n[1-3,7],10.0.0.[1-2]", 1).unwrap();
        let names: Vec<_> = hostfile.hosts.iter().map(|h| h.ssh.as_str()).collect();
        assert_eq!(names, ["node01", "node02", "n1", "n2", "n3", "n7", "10.0.0.1", "10.0.0.2"]);
        assert_eq!(hostfile.hosts[6].ips, ["10.0.0.1"]);
    }

    #[test]
    fn list_range_errors_name_the_item() {
        let error = Hostfile::from_list("a,n[1-", 1).unwrap_err().to_string();
        assert!(error.contains("invalid --hosts value \"a,n[1-\""), "{error}");
        assert!(error.contains("\"n[1-\": the '[' at byte 1 is never closed"), "{error}");
    }

    #[test]
    fn hostfile_range_entry_gives_one_host_per_name() {
        let hostfile = parse(r#"[{"ssh": "gpu[1-3]", "user": "me"}, {"ssh": "10.0.0.9"}]"#).unwrap();
        let names: Vec<_> = hostfile.hosts.iter().map(|h| h.ssh.as_str()).collect();
        assert_eq!(names, ["gpu1", "gpu2", "gpu3", "10.0.0.9"]);
        assert_eq!(hostfile.hosts[2].target.user.as_deref(), Some("me"));
        assert!(hostfile.hosts[0].ips.is_empty());
        assert_eq!(hostfile.hosts[3].ips, ["10.0.0.9"]);
    }

    #[test]
    fn allocation_repeats_by_task_count_or_repeats() {
        let nodes = vec![("n1".to_string(), 2), ("n2".to_string(), 1)];
        let names = |hostfile: Hostfile| hostfile.hosts.into_iter().map(|h| h.ssh).collect::<Vec<_>>();
        assert_eq!(names(Hostfile::from_allocation(nodes.clone(), None).unwrap()), ["n1", "n1", "n2"]);
        assert_eq!(names(Hostfile::from_allocation(nodes, Some(1)).unwrap()), ["n1", "n2"]);
    }

    #[test]
    fn list_form_parses() {
        let hostfile = parse(r#"[{"ssh": "h1", "ips": ["10.0.0.1"]}, {"ssh": "h2", "ips": ["10.0.0.2", "10.1.0.2"], "rdma": [null, "rdma_en2"]}]"#).unwrap();
        assert_eq!(hostfile.hosts.len(), 2);
        assert_eq!(hostfile.hosts[1].ips, ["10.0.0.2", "10.1.0.2"]);
        assert_eq!(hostfile.hosts[1].rdma.len(), 2);
        assert_eq!(hostfile.backend, None);
    }

    #[test]
    fn object_form_parses() {
        let hostfile = parse(r#"{"backend": "ring", "envs": ["A=1"], "hosts": [{"ssh": "h1", "ips": ["10.0.0.1"], "user": "me", "port": 2222, "identity": "/k"}]}"#).unwrap();
        assert_eq!(hostfile.backend.as_deref(), Some("ring"));
        assert_eq!(hostfile.envs, ["A=1"]);
        let target = &hostfile.hosts[0].target;
        assert_eq!(target.user.as_deref(), Some("me"));
        assert_eq!(target.port, Some(2222));
        assert_eq!(target.identity.as_deref(), Some(Path::new("/k")));
    }

    #[test]
    fn hostfile_error_table() {
        let cases = [
            ("", "hosts.json: the file is empty"),
            ("  \n", "the file is empty"),
            ("{", "hosts.json is not valid JSON"),
            ("3", "expected a list of hosts"),
            ("[]", "the host list is empty"),
            ("{\"hosts\": []}", "the host list is empty"),
            ("{\"backend\": \"ring\"}", "no \"hosts\" list"),
            ("{\"hosts\": 4}", "\"hosts\" must be a list"),
            ("{\"envs\": \"A=1\", \"hosts\": [{\"ssh\": \"a\"}]}", "\"envs\" must be a list"),
            ("{\"envs\": [1], \"hosts\": [{\"ssh\": \"a\"}]}", "\"envs\" entry 0"),
            ("{\"backend\": 1, \"hosts\": [{\"ssh\": \"a\"}]}", "\"backend\" must be a string"),
            ("[\"h1\"]", "host 0 must be an object"),
            ("[{\"ips\": []}]", "host 0: field \"ssh\" is missing"),
            ("[{\"ssh\": \"\"}]", "host 0: field \"ssh\" is empty"),
            ("[{\"ssh\": 5}]", "field \"ssh\" must be a host name string"),
            ("[{\"ssh\": \"a\"}, {\"ssh\": \"-oProxyCommand=x\"}]", "host 1: field \"ssh\" host \"-oProxyCommand=x\": it starts with '-'"),
            ("[{\"ssh\": \"a\", \"ips\": \"10.0.0.1\"}]", "field \"ips\" must be a list"),
            ("[{\"ssh\": \"a\", \"ips\": [\"node1\"]}]", "field \"ips\" contains \"node1\", which is not an IP address"),
            ("[{\"ssh\": \"a\", \"rdma\": 3}]", "field \"rdma\" must be a list"),
            ("[{\"ssh\": \"a\", \"port\": 0}]", "field \"port\" must be a port number"),
            ("[{\"ssh\": \"a\", \"port\": \"22\"}]", "field \"port\" must be a port number"),
            ("[{\"ssh\": \"a\", \"user\": \"-l\"}]", "field \"user\" must be a user name"),
            ("[{\"ssh\": \"a\", \"identity\": 1}]", "field \"identity\" must be a key file path"),
            ("[{\"ssh\": \"n[1-\"}]", "host 0: field \"ssh\" \"n[1-\": the '[' at byte 1 is never closed"),
            ("[{\"ssh\": \"n[2-1]\"}]", "field \"ssh\" \"n[2-1]\": range element \"2-1\" counts down"),
            ("[{\"ssh\": \"n[1-2]\", \"ips\": [\"10.0.0.1\"]}]", "field \"ips\" cannot be given for \"n[1-2]\", which names 2 hosts"),
            ("[{\"ssh\": \"n[1-2]\", \"rdma\": []}]", "field \"rdma\" cannot be given"),
            ("[{\"ssh\": \"-o[1-2]\"}]", "host \"-o1\": it starts with '-'"),
        ];
        for (text, expected) in cases {
            let error = parse(text).unwrap_err();
            assert!(error.contains(expected), "{text:?} gave {error:?}, expected {expected:?}");
        }
    }

    #[test]
    fn missing_file_names_path() {
        let error = Hostfile::from_path(Path::new("/nonexistent/hosts.json")).unwrap_err();
        assert!(error.to_string().contains("/nonexistent/hosts.json"));
    }
}
