//! Removal of leftovers: containers and networks that carry our label but
//! outlived their cluster, for example after a test process was killed.

use std::collections::HashMap;

use testcontainers::bollard::query_parameters::{ListContainersOptions, ListNetworksOptions, RemoveContainerOptions};

use crate::cluster::{remove_network, CLUSTER_LABEL};
use crate::engine::Engine;
use crate::error::{Error, Result};
use crate::image::MANAGED_LABEL;

/// What [`remove_leftovers`] removed.
#[derive(Debug, Default)]
pub struct Removed {
    pub containers: Vec<String>,
    pub networks: Vec<String>,
}

/// Remove every container and network labelled as ours; with `cluster`,
/// only those of that cluster id. Images stay: they are a cache.
pub async fn remove_leftovers(engine: &Engine, cluster: Option<&str>) -> Result<Removed> {
    let label = match cluster {
        Some(id) => format!("{CLUSTER_LABEL}={id}"),
        None => format!("{MANAGED_LABEL}=true"),
    };
    let filters = HashMap::from([("label".to_string(), vec![label])]);
    let mut removed = Removed::default();

    let containers = engine
        .docker
        .list_containers(Some(ListContainersOptions { all: true, filters: Some(filters.clone()), ..Default::default() }))
        .await
        .map_err(Error::docker("list labelled containers"))?;
    for container in containers {
        let Some(id) = container.id else { continue };
        let name = container
            .names
            .and_then(|names| names.first().cloned())
            .map(|name| name.trim_start_matches('/').to_string())
            .unwrap_or_else(|| id.clone());
        let options = RemoveContainerOptions { force: true, v: true, ..Default::default() };
        engine
            .docker
            .remove_container(&id, Some(options))
            .await
            .map_err(Error::docker(format!("remove container {name}")))?;
        removed.containers.push(name);
    }

    let networks = engine
        .docker
        .list_networks(Some(ListNetworksOptions { filters: Some(filters) }))
        .await
        .map_err(Error::docker("list labelled networks"))?;
    for network in networks {
        let Some(name) = network.name.clone() else { continue };
        remove_network(engine, &name).await?;
        removed.networks.push(name);
    }
    Ok(removed)
}
