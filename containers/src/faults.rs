//! Fault actions on single nodes of a [`Cluster`].
//!
//! | action | effect seen by the launcher and the other ranks |
//! |---|---|
//! | [`Cluster::kill`] | SIGKILL to every process of the node; its TCP peers see resets or silence |
//! | [`Cluster::stop`] | SIGTERM, then SIGKILL after the engine's grace period |
//! | [`Cluster::pause`] | processes frozen (cgroup freezer); connections stay open but silent |
//! | [`Cluster::disconnect`] | node leaves the network: peers' packets to it vanish, and its published ssh port closes, which ends ssh sessions through it |
//! | [`Cluster::isolate`] | node drops all traffic to the other nodes; the launcher's ssh sessions continue |
//! | [`Cluster::stop_sshd`] | new ssh connections are refused; running sessions continue |

use testcontainers::bollard::models::{EndpointIpamConfig, EndpointSettings, NetworkConnectRequest, NetworkDisconnectRequest};
use testcontainers::bollard::query_parameters::KillContainerOptions;

use crate::cluster::{exec_in, refresh_node_addresses, Cluster};
use crate::error::{Error, Result};

/// sshd forks into the background before it binds its port, and writes its
/// pid file only once the port is bound: the pid file is the ready signal.
/// The wait is bounded so a broken sshd fails the call instead of hanging it.
const START_SSHD_SCRIPT: &str = "/usr/sbin/sshd || exit
tries=0
while [ ! -s /run/sshd.pid ]; do
    tries=$((tries + 1))
    if [ \"$tries\" -gt 200 ]; then echo 'sshd wrote no pid file within 10 s' >&2; exit 1; fi
    sleep 0.05
done";

impl Cluster {
    /// Send SIGKILL to the node's container; the container stops at once.
    pub async fn kill(&self, index: usize) -> Result<()> {
        let node = self.node(index)?;
        let options = KillContainerOptions { signal: "SIGKILL".into() };
        self.engine
            .docker
            .kill_container(&node.container_name, Some(options))
            .await
            .map_err(Error::docker(format!("kill container {}", node.container_name)))
    }

    /// Stop the node's container: SIGTERM, then SIGKILL after `grace_seconds`.
    pub async fn stop(&self, index: usize, grace_seconds: i32) -> Result<()> {
        let node = self.node(index)?;
        node.container
            .stop_with_timeout(Some(grace_seconds))
            .await
            .map_err(|source| Error::Testcontainers { name: node.container_name.clone(), source })
    }

    /// Start a stopped or killed node again and rewrite the cluster files,
    /// because the engine publishes its sshd on a new port.
    pub async fn restart(&mut self, index: usize) -> Result<()> {
        {
            let node = self.node(index)?;
            node.container
                .start()
                .await
                .map_err(|source| Error::Testcontainers { name: node.container_name.clone(), source })?;
        }
        self.refresh_and_rewrite(index).await
    }

    /// Freeze every process of the node.
    pub async fn pause(&self, index: usize) -> Result<()> {
        let node = self.node(index)?;
        node.container
            .pause()
            .await
            .map_err(|source| Error::Testcontainers { name: node.container_name.clone(), source })
    }

    /// Thaw a paused node.
    pub async fn unpause(&self, index: usize) -> Result<()> {
        let node = self.node(index)?;
        node.container
            .unpause()
            .await
            .map_err(|source| Error::Testcontainers { name: node.container_name.clone(), source })
    }

    /// Detach the node from the cluster network. The engine also drops its
    /// published ssh port until [`Cluster::reconnect`].
    pub async fn disconnect(&self, index: usize) -> Result<()> {
        let node = self.node(index)?;
        let request = NetworkDisconnectRequest { container: node.container_name.clone(), force: Some(true) };
        self.engine
            .docker
            .disconnect_network(&self.network, request)
            .await
            .map_err(Error::docker(format!("disconnect {} from {}", node.container_name, self.network)))
    }

    /// Attach the node to the cluster network again at its old address.
    pub async fn reconnect(&mut self, index: usize) -> Result<()> {
        {
            let node = self.node(index)?;
            let endpoint = EndpointSettings {
                ipam_config: Some(EndpointIpamConfig { ipv4_address: Some(node.ip.to_string()), ..Default::default() }),
                ..Default::default()
            };
            let request = NetworkConnectRequest { container: node.container_name.clone(), endpoint_config: Some(endpoint) };
            self.engine
                .docker
                .connect_network(&self.network, request)
                .await
                .map_err(Error::docker(format!("connect {} to {}", node.container_name, self.network)))?;
        }
        self.refresh_and_rewrite(index).await
    }

    /// Cut node `index` off from the other nodes while the launcher keeps
    /// reaching it: a blackhole route per peer address drops every packet
    /// the node sends to its peers. Peers see silence, not resets, as on a
    /// failed link. ssh traffic from the host comes from the bridge gateway
    /// and still flows.
    pub async fn isolate(&self, index: usize) -> Result<()> {
        self.run_checked(index, &["sh", "-c", &self.peer_routes_script(index, "replace")]).await
    }

    /// Undo [`Cluster::isolate`].
    pub async fn heal(&self, index: usize) -> Result<()> {
        self.run_checked(index, &["sh", "-c", &self.peer_routes_script(index, "del")]).await
    }

    fn peer_routes_script(&self, index: usize, action: &str) -> String {
        let commands: Vec<String> = self
            .nodes
            .iter()
            .filter(|node| node.index != index)
            .map(|node| format!("ip route {action} blackhole {}/32", node.ip))
            .collect();
        commands.join(" && ")
    }

    /// Stop the node's listening sshd; sessions already open keep running.
    pub async fn stop_sshd(&self, index: usize) -> Result<()> {
        self.run_checked(index, &["sh", "-c", "kill \"$(cat /run/sshd.pid)\" && rm -f /run/sshd.pid"])
            .await
    }

    /// Start the node's sshd again after [`Cluster::stop_sshd`], and return
    /// once it accepts connections.
    pub async fn start_sshd(&self, index: usize) -> Result<()> {
        self.run_checked(index, &["sh", "-c", START_SSHD_SCRIPT]).await
    }

    async fn run_checked(&self, index: usize, argv: &[&str]) -> Result<()> {
        let node = self.node(index)?;
        let output = exec_in(&self.engine, node, argv).await?;
        if output.exit_code != 0 {
            return Err(Error::CommandFailed {
                command: format!("{argv:?} in {}", node.alias),
                status: format!("exit code {}", output.exit_code),
                output: format!(": {}", output.stderr.trim()),
            });
        }
        Ok(())
    }

    async fn refresh_and_rewrite(&mut self, index: usize) -> Result<()> {
        let engine = self.engine.clone();
        let network = self.network.clone();
        let node = self.node_mut(index)?;
        refresh_node_addresses(&engine, &network, node).await?;
        self.write_files()
    }
}
