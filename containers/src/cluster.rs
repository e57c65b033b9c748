//! A cluster of sshd nodes in Docker containers on a private network.
//!
//! Each node publishes its sshd on 127.0.0.1 only, so the launcher on the
//! host reaches the nodes through loopback ports while ring traffic between
//! ranks flows over the cluster's own bridge network. Containers and the
//! network carry labels, so `ringleader-cluster down` finds what a killed
//! test process left behind.

use std::collections::HashMap;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use testcontainers::bollard::models::{HostConfig, Ipam, IpamConfig, NetworkCreateRequest, PortBinding};
use futures_util::StreamExt;
use testcontainers::bollard::container::LogOutput;
use testcontainers::bollard::exec::{StartExecOptions, StartExecResults};
use testcontainers::bollard::models::ExecConfig;
use testcontainers::core::{AccessMode, Mount, WaitFor};
use testcontainers::runners::AsyncRunner;
use testcontainers::{ContainerAsync, GenericImage, ImageExt};

use crate::engine::Engine;
use crate::error::{Error, Result};
use crate::files::{ClusterFiles, NodeEntry};
use crate::image::{self, AUTHORIZED_KEY_ENV, MANAGED_LABEL, READY_LINE};

/// Label holding the cluster id on its containers and network.
pub const CLUSTER_LABEL: &str = "org.ringleader.cluster";

/// First two octets of cluster subnets; each cluster takes one /24 inside.
const SUBNET_PREFIX: &str = "10.213";

/// Subnets tried before giving up when others overlap existing networks.
const SUBNET_ATTEMPTS: u8 = 32;

/// Maximum wait for one node's sshd to report ready.
const NODE_START_TIMEOUT: Duration = Duration::from_secs(60);

/// How to start a cluster.
#[derive(Debug, Clone)]
pub struct ClusterOptions {
    /// Number of nodes, at least 1.
    pub nodes: usize,
    /// Host paths bind-mounted read-only at the same path in every node, so
    /// programs and interpreters keep their host paths inside the nodes.
    pub mounts: Vec<PathBuf>,
    /// Directory for the key, ssh config, known_hosts and hostfile. `None`
    /// creates a temporary directory that is removed with the cluster.
    pub files_dir: Option<PathBuf>,
}

impl ClusterOptions {
    pub fn new(nodes: usize) -> ClusterOptions {
        ClusterOptions { nodes, mounts: Vec::new(), files_dir: None }
    }

    /// Add a read-only bind mount of `path` at the same path in every node.
    pub fn mount(mut self, path: impl Into<PathBuf>) -> ClusterOptions {
        self.mounts.push(path.into());
        self
    }
}

/// One node of a running cluster.
pub struct Node {
    pub index: usize,
    /// ssh alias and container hostname: `node<index>`.
    pub alias: String,
    pub container_name: String,
    /// Address on the cluster network; the hostfile lists it for ring traffic.
    pub ip: IpAddr,
    /// sshd port published on 127.0.0.1; changes when the node restarts.
    pub ssh_port: u16,
    host_key: String,
    pub(crate) container: ContainerAsync<GenericImage>,
}

/// A running cluster. Dropping it removes its containers and network; call
/// [`Cluster::remove`] to remove them asynchronously and see errors.
///
/// Dropping blocks the current thread until the engine has removed
/// everything, inside or outside a tokio runtime.
///
/// NOTE: only multi-thread runtimes are tested. testcontainers removes
/// containers from a worker thread when dropped in a current-thread runtime,
/// and its pooled connections may belong to the blocked runtime.
pub struct Cluster {
    pub id: String,
    pub network: String,
    pub nodes: Vec<Node>,
    pub files: ClusterFiles,
    pub image: String,
    pub(crate) engine: Engine,
    /// Temporary directory of `files`, removed on drop; `None` when the
    /// caller chose the directory.
    files_dir: Option<tempfile::TempDir>,
    /// Set once containers and network are gone, so drop does nothing.
    removed: bool,
}

impl Cluster {
    /// Start `nodes` nodes with default options.
    pub async fn start(nodes: usize) -> Result<Cluster> {
        Cluster::start_with(ClusterOptions::new(nodes)).await
    }

    /// Build the image if needed, then start the nodes and write the files.
    pub async fn start_with(options: ClusterOptions) -> Result<Cluster> {
        if options.nodes == 0 {
            return Err(Error::NoNodes(options.nodes));
        }
        let engine = Engine::connect().await?;
        let image = image::ensure_image(&engine).await?;

        let id = new_cluster_id();
        let (files_dir, files) = match &options.files_dir {
            Some(dir) => {
                std::fs::create_dir_all(dir).map_err(Error::file("create directory", dir))?;
                (None, ClusterFiles::in_dir(dir))
            }
            None => {
                let dir = tempfile::Builder::new()
                    .prefix(&format!("ringleader-cluster-{id}-"))
                    .tempdir()
                    .map_err(Error::file("create temporary directory in", std::env::temp_dir()))?;
                let files = ClusterFiles::in_dir(dir.path());
                (Some(dir), files)
            }
        };
        let public_key = files.generate_key().await?;

        let network = format!("ringleader-{id}");
        let mut cluster = Cluster {
            id,
            network,
            nodes: Vec::new(),
            files,
            image,
            engine,
            files_dir,
            removed: false,
        };
        cluster.create_network().await?;

        // From here on, dropping `cluster` on an error removes what exists.
        let starts = (0..options.nodes).map(|index| cluster.start_node(index, &public_key, &options.mounts));
        let started = futures_util::future::join_all(starts).await;
        let mut first_error = None;
        for result in started {
            match result {
                Ok(node) => cluster.nodes.push(node),
                Err(error) => {
                    first_error.get_or_insert(error);
                }
            }
        }
        if let Some(error) = first_error {
            return Err(error);
        }
        cluster.nodes.sort_by_key(|node| node.index);
        cluster.write_files()?;
        if !options.mounts.is_empty() {
            cluster.warn_on_glibc_mismatch().await;
        }
        tracing::info!(cluster = %cluster.id, nodes = cluster.nodes.len(), "cluster up");
        Ok(cluster)
    }

    /// Create the bridge network with an explicit subnet. Docker lets a
    /// container rejoin at its old address only on such a network, which
    /// [`Cluster::reconnect`] needs to keep the hostfile valid. Subnets that
    /// overlap an existing network are skipped.
    async fn create_network(&self) -> Result<()> {
        let first = u8::from_str_radix(&self.id[..2], 16).unwrap_or(0);
        let mut last_error = None;
        for attempt in 0..SUBNET_ATTEMPTS {
            let third_octet = first.wrapping_add(attempt);
            let subnet = format!("{SUBNET_PREFIX}.{third_octet}.0/24");
            let request = NetworkCreateRequest {
                name: self.network.clone(),
                driver: Some("bridge".into()),
                labels: Some(self.labels()),
                ipam: Some(Ipam {
                    config: Some(vec![IpamConfig { subnet: Some(subnet.clone()), ..Default::default() }]),
                    ..Default::default()
                }),
                ..Default::default()
            };
            match self.engine.docker.create_network(request).await {
                Ok(_) => {
                    tracing::debug!(network = %self.network, %subnet, "created cluster network");
                    return Ok(());
                }
                Err(error) if is_overlap(&error) => last_error = Some(error),
                Err(source) => return Err(Error::Docker { action: format!("create network {}", self.network), source }),
            }
        }
        let source = last_error.expect("at least one attempt ran");
        Err(Error::Docker {
            action: format!("create network {} (no free {SUBNET_PREFIX}.x.0/24 subnet in {SUBNET_ATTEMPTS} tries)", self.network),
            source,
        })
    }

    fn labels(&self) -> HashMap<String, String> {
        HashMap::from([
            (MANAGED_LABEL.to_string(), "true".to_string()),
            (CLUSTER_LABEL.to_string(), self.id.clone()),
        ])
    }

    async fn start_node(&self, index: usize, public_key: &str, mounts: &[PathBuf]) -> Result<Node> {
        let alias = format!("node{index}");
        let container_name = format!("ringleader-{}-{alias}", self.id);
        let (repository, tag) = self.image.split_once(':').expect("image tags have the form repository:hash");

        let mut request = GenericImage::new(repository, tag)
            .with_wait_for(WaitFor::message_on_stdout(READY_LINE))
            .with_network(self.network.clone())
            .with_container_name(container_name.clone())
            .with_hostname(alias.clone())
            .with_labels(self.labels())
            .with_env_var(AUTHORIZED_KEY_ENV, public_key)
            .with_startup_timeout(NODE_START_TIMEOUT)
            .with_host_config_modifier(configure_node_host);
        for path in mounts {
            let path = path.to_string_lossy().into_owned();
            request = request.with_mount(Mount::bind_mount(path.clone(), path).with_access_mode(AccessMode::ReadOnly));
        }

        let container = request
            .start()
            .await
            .map_err(|source| Error::Testcontainers { name: container_name.clone(), source })?;

        let mut node = Node {
            index,
            alias,
            container_name,
            ip: IpAddr::from([0, 0, 0, 0]),
            ssh_port: 0,
            host_key: String::new(),
            container,
        };
        refresh_node_addresses(&self.engine, &self.network, &mut node).await?;
        node.host_key = read_host_key(&self.engine, &node).await?;
        Ok(node)
    }

    /// Rewrite ssh config, known_hosts and hostfile from the nodes' state.
    pub(crate) fn write_files(&self) -> Result<()> {
        let entries: Vec<NodeEntry> = self
            .nodes
            .iter()
            .map(|node| NodeEntry {
                alias: node.alias.clone(),
                ssh_port: node.ssh_port,
                ip: node.ip,
                host_key: node.host_key.clone(),
            })
            .collect();
        self.files.write(&entries)
    }

    /// Returns the node at `index`, or an error naming the cluster size.
    pub fn node(&self, index: usize) -> Result<&Node> {
        self.nodes.get(index).ok_or(Error::NoSuchNode { index, count: self.nodes.len() })
    }

    pub(crate) fn node_mut(&mut self, index: usize) -> Result<&mut Node> {
        let count = self.nodes.len();
        self.nodes.get_mut(index).ok_or(Error::NoSuchNode { index, count })
    }

    /// Returns an `ssh -F <config> <alias>` command for node `index`, ready
    /// for arguments. Host keys are checked strictly against the generated file.
    pub fn ssh_command(&self, index: usize) -> Result<std::process::Command> {
        let node = self.node(index)?;
        let mut command = std::process::Command::new("ssh");
        command.arg("-F").arg(&self.files.ssh_config).arg(&node.alias);
        Ok(command)
    }

    /// Run `argv` inside node `index` through the engine (not through ssh).
    pub async fn exec(&self, index: usize, argv: &[&str]) -> Result<ExecOutput> {
        let node = self.node(index)?;
        exec_in(&self.engine, node, argv).await
    }

    /// Returns the glibc version of node `index`, as `getconf GNU_LIBC_VERSION` prints it.
    pub async fn node_glibc_version(&self, index: usize) -> Result<String> {
        let output = self.exec(index, &["getconf", "GNU_LIBC_VERSION"]).await?;
        Ok(output.stdout.trim().to_string())
    }

    /// Warn when host-built programs in the mounts may not run in the nodes
    /// because the nodes' glibc differs from the host's.
    async fn warn_on_glibc_mismatch(&self) {
        let host = host_glibc_version();
        let node = self.node_glibc_version(0).await.ok();
        if host.is_some() && host != node {
            tracing::warn!(
                host = host.as_deref().unwrap_or("unknown"),
                node = node.as_deref().unwrap_or("unknown"),
                "the nodes' glibc differs from the host's; host-built programs in the mounts may fail to load"
            );
        }
    }

    /// Remove containers and network, reporting the first error.
    pub async fn remove(mut self) -> Result<()> {
        self.removed = true;
        let mut first_error = None;
        for node in std::mem::take(&mut self.nodes) {
            let name = node.container_name.clone();
            if let Err(source) = node.container.rm().await {
                first_error.get_or_insert(Error::Testcontainers { name, source });
            }
        }
        if let Err(error) = remove_network(&self.engine, &self.network).await {
            first_error.get_or_insert(error);
        }
        match first_error {
            Some(error) => Err(error),
            None => Ok(()),
        }
    }

    /// Directory holding the generated files.
    pub fn files_dir(&self) -> &Path {
        &self.files.dir
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if self.removed {
            return;
        }
        self.removed = true;

        // testcontainers removes each container in its own Drop, which needs
        // a runtime context; outside one, enter a temporary runtime.
        let temporary_runtime = match tokio::runtime::Handle::try_current() {
            Ok(_) => None,
            Err(_) => tokio::runtime::Builder::new_current_thread().enable_all().build().ok(),
        };
        let guard = temporary_runtime.as_ref().map(|runtime| runtime.enter());
        self.nodes.clear();
        drop(guard);

        // The network goes last, once no container uses it. A fresh thread
        // and client avoid blocking on the caller's runtime.
        let network = self.network.clone();
        let removal = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().ok()?;
            runtime.block_on(async {
                let engine = Engine::connect().await.ok()?;
                remove_network(&engine, &network).await.ok()
            })
        });
        if removal.join().ok().flatten().is_none() {
            tracing::warn!(network = %self.network, "failed to remove the cluster network; `ringleader-cluster down` removes it");
        }
        drop(self.files_dir.take());
    }
}

/// Read the node's network address and published port from the engine.
pub(crate) async fn refresh_node_addresses(engine: &Engine, network: &str, node: &mut Node) -> Result<()> {
    let details = engine
        .docker
        .inspect_container(&node.container_name, None)
        .await
        .map_err(Error::docker(format!("inspect container {}", node.container_name)))?;
    let settings = details.network_settings.unwrap_or_default();

    let missing = |what| Error::MissingContainerInfo { name: node.container_name.clone(), what };
    let ip = settings
        .networks
        .as_ref()
        .and_then(|networks| networks.get(network))
        .and_then(|endpoint| endpoint.ip_address.clone())
        .filter(|ip| !ip.is_empty());
    if let Some(ip) = ip {
        node.ip = ip.parse().map_err(|_| missing("valid network address"))?;
    }
    let port = settings
        .ports
        .as_ref()
        .and_then(|ports| ports.get("22/tcp"))
        .and_then(|bindings| bindings.as_ref())
        .and_then(|bindings| bindings.iter().find_map(|binding| binding.host_port.clone()));
    if let Some(port) = port {
        node.ssh_port = port.parse().map_err(|_| missing("valid published ssh port"))?;
    }
    if node.ssh_port == 0 {
        return Err(missing("published ssh port"));
    }
    if node.ip.is_unspecified() {
        return Err(missing("address on the cluster network"));
    }
    Ok(())
}

fn is_overlap(error: &testcontainers::bollard::errors::Error) -> bool {
    matches!(
        error,
        testcontainers::bollard::errors::Error::DockerResponseServerError { message, .. }
            if message.contains("overlap")
    )
}

/// Publish the node's port 22 on an ephemeral port of 127.0.0.1 only, run
/// docker-init as PID 1 so orphaned processes are reaped, and grant
/// NET_ADMIN inside the node's own network namespace for
/// [`Cluster::isolate`]'s routes.
fn configure_node_host(host_config: &mut HostConfig) {
    let binding = PortBinding { host_ip: Some("127.0.0.1".into()), host_port: Some(String::new()) };
    host_config.port_bindings = Some(HashMap::from([("22/tcp".to_string(), Some(vec![binding]))]));
    host_config.publish_all_ports = Some(false);
    host_config.init = Some(true);
    host_config.cap_add = Some(vec!["NET_ADMIN".to_string()]);
}

pub(crate) async fn remove_network(engine: &Engine, network: &str) -> Result<()> {
    match engine.docker.remove_network(network).await {
        Ok(()) => Ok(()),
        Err(testcontainers::bollard::errors::Error::DockerResponseServerError { status_code: 404, .. }) => Ok(()),
        Err(source) => Err(Error::Docker { action: format!("remove network {network}"), source }),
    }
}

/// Returns the host's glibc version as `getconf GNU_LIBC_VERSION` prints it.
pub fn host_glibc_version() -> Option<String> {
    let output = std::process::Command::new("getconf").arg("GNU_LIBC_VERSION").output().ok()?;
    output.status.success().then(|| String::from_utf8_lossy(&output.stdout).trim().to_string())
}

/// Output of a command run inside a node.
#[derive(Debug, Clone)]
pub struct ExecOutput {
    pub exit_code: i64,
    pub stdout: String,
    pub stderr: String,
}

pub(crate) async fn exec_in(engine: &Engine, node: &Node, argv: &[&str]) -> Result<ExecOutput> {
    let failed = Error::docker(format!("exec {argv:?} in {}", node.container_name));
    let config = ExecConfig {
        attach_stdout: Some(true),
        attach_stderr: Some(true),
        cmd: Some(argv.iter().map(|word| word.to_string()).collect()),
        ..Default::default()
    };
    let created = match engine.docker.create_exec(&node.container_name, config).await {
        Ok(created) => created,
        Err(source) => return Err(failed(source)),
    };

    let mut stdout = Vec::new();
    let mut stderr = Vec::new();
    let started = engine.docker.start_exec(&created.id, None::<StartExecOptions>).await;
    match started {
        Ok(StartExecResults::Attached { mut output, .. }) => {
            while let Some(chunk) = output.next().await {
                match chunk {
                    Ok(LogOutput::StdOut { message }) => stdout.extend_from_slice(&message),
                    Ok(LogOutput::StdErr { message }) => stderr.extend_from_slice(&message),
                    Ok(_) => {}
                    Err(source) => return Err(failed(source)),
                }
            }
        }
        Ok(StartExecResults::Detached) => {}
        Err(source) => return Err(failed(source)),
    }

    // The exit code appears once the engine has reaped the process, which
    // can trail the end of its output by a moment.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let exit_code = loop {
        let inspected = engine.docker.inspect_exec(&created.id).await;
        match inspected {
            Ok(details) if details.running != Some(true) && details.exit_code.is_some() => {
                break details.exit_code.unwrap_or_default();
            }
            Ok(_) => {}
            Err(source) => return Err(failed(source)),
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(Error::Timeout { seconds: 10, what: format!("the exit code of {argv:?} in {}", node.alias) });
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    Ok(ExecOutput {
        exit_code,
        stdout: String::from_utf8_lossy(&stdout).into_owned(),
        stderr: String::from_utf8_lossy(&stderr).into_owned(),
    })
}

async fn read_host_key(engine: &Engine, node: &Node) -> Result<String> {
    let output = exec_in(engine, node, &["cat", "/etc/ssh/ssh_host_ed25519_key.pub"]).await?;
    let mut words = output.stdout.split_whitespace();
    match (words.next(), words.next()) {
        (Some(kind), Some(key)) if output.exit_code == 0 => Ok(format!("{kind} {key}")),
        _ => Err(Error::MissingContainerInfo { name: node.container_name.clone(), what: "ssh host key" }),
    }
}

/// Returns 8 hex digits from the process id and the clock, so clusters
/// started at the same time on one machine get different ids.
fn new_cluster_id() -> String {
    use sha2::{Digest, Sha256};
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|elapsed| elapsed.as_nanos())
        .unwrap_or_default();
    let seed = format!("{} {} {:?}", std::process::id(), nanos, std::thread::current().id());
    let digest = Sha256::digest(seed.as_bytes());
    digest.iter().take(4).map(|byte| format!("{byte:02x}")).collect()
}
