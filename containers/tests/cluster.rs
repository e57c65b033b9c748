//! The cluster fixture on its own: image cache, start-up, ssh access,
//! networking between nodes and removal.

mod common;

use std::time::{Duration, Instant};

use ringleader_containers::apt_source::AptSource;
use ringleader_containers::image::{self, ImageRecipe};
use ringleader_containers::{ClusterOptions, Engine};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn image_is_built_once_and_then_reused() {
    require_docker!();
    let _guard = common::exclusive().await;
    let engine = Engine::connect().await.unwrap_or_else(|error| panic!("{}", common::error_chain(&error)));

    let first = image::ensure_image(&engine).await.expect("image builds");
    let started = Instant::now();
    let second = image::ensure_image(&engine).await.expect("image is found");

    assert_eq!(first, second);
    let suite = AptSource::detect().expect("apt source").suite;
    assert_eq!(first, ImageRecipe::for_suite(&suite).tag());
    assert!(image::image_exists(&engine, &first).await.unwrap());
    assert!(started.elapsed() < Duration::from_secs(5), "a cached image took {:?}", started.elapsed());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn four_nodes_accept_ssh_with_strict_host_keys() {
    require_docker!();
    let _guard = common::exclusive().await;
    // Build the image first on a cold machine, so only the start-up is timed.
    let engine = Engine::connect().await.unwrap_or_else(|error| panic!("{}", common::error_chain(&error)));
    image::ensure_image(&engine).await.unwrap_or_else(|error| panic!("{}", common::error_chain(&error)));

    let started = Instant::now();
    let cluster = common::start_cluster(ClusterOptions::new(4)).await;
    let startup = started.elapsed();
    eprintln!("4-node cluster up in {startup:?}");
    assert!(startup < Duration::from_secs(15), "start-up took {startup:?}, the target is 15 s");

    assert_eq!(cluster.nodes.len(), 4);
    let config = std::fs::read_to_string(&cluster.files.ssh_config).unwrap();
    assert!(config.contains("StrictHostKeyChecking yes"), "{config}");

    for node in &cluster.nodes {
        let output = common::run_echoed(cluster.ssh_command(node.index).unwrap().arg("hostname"));
        assert!(output.status.success(), "ssh to {} failed", node.alias);
        assert_eq!(String::from_utf8_lossy(&output.stdout).trim(), node.alias);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_host_key_is_rejected() {
    require_docker!();
    let _guard = common::exclusive().await;
    let cluster = common::start_cluster(ClusterOptions::new(2)).await;

    // Swap the two pinned host keys: each alias now expects the other node's key.
    let known_hosts = std::fs::read_to_string(&cluster.files.known_hosts).unwrap();
    let lines: Vec<&str> = known_hosts.lines().collect();
    let key_of = |line: &str| line.split_once(' ').unwrap().1.to_string();
    let swapped = format!("node0 {}\nnode1 {}\n", key_of(lines[1]), key_of(lines[0]));
    std::fs::write(&cluster.files.known_hosts, swapped).unwrap();

    let output = common::run_echoed(cluster.ssh_command(0).unwrap().arg("true"));
    assert!(!output.status.success(), "ssh accepted a host key that was not pinned");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostfile_lists_network_addresses_that_nodes_reach() {
    require_docker!();
    let _guard = common::exclusive().await;
    let cluster = common::start_cluster(ClusterOptions::new(4)).await;

    let hostfile: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&cluster.files.hostfile).unwrap()).unwrap();
    let hosts = hostfile.as_array().expect("hostfile is a list");
    assert_eq!(hosts.len(), 4);
    for (node, host) in cluster.nodes.iter().zip(hosts) {
        assert_eq!(host["ssh"], node.alias.as_str());
        assert_eq!(host["ips"][0], node.ip.to_string());
        assert!(!node.ip.is_loopback(), "{} has a loopback address", node.alias);
    }

    // Every node opens a TCP connection to every other node's sshd and reads
    // its banner, over the cluster network.
    for from in &cluster.nodes {
        for to in &cluster.nodes {
            if from.index == to.index {
                continue;
            }
            let script = format!("exec 3<>/dev/tcp/{}/22 && head -c 7 <&3", to.ip);
            let output = cluster.exec(from.index, &["bash", "-c", &script]).await.unwrap();
            assert_eq!(output.exit_code, 0, "{} cannot reach {}: {}", from.alias, to.ip, output.stderr);
            assert_eq!(output.stdout, "SSH-2.0", "{} -> {}", from.alias, to.alias);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ssh_port_is_published_on_loopback_only() {
    require_docker!();
    let _guard = common::exclusive().await;
    let cluster = common::start_cluster(ClusterOptions::new(1)).await;
    let container = &cluster.nodes[0].container_name;

    let output = common::run_echoed(std::process::Command::new("docker").args(["port", container, "22/tcp"]));
    let published = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success());
    assert!(!published.trim().is_empty());
    for line in published.lines() {
        assert!(line.starts_with("127.0.0.1:"), "published beyond loopback: {line}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drop_removes_containers_network_and_files() {
    require_docker!();
    let _guard = common::exclusive().await;
    let cluster = common::start_cluster(ClusterOptions::new(2)).await;
    let id = cluster.id.clone();
    let network = cluster.network.clone();
    let files_dir = cluster.files_dir().to_path_buf();
    assert!(files_dir.exists());

    drop(cluster);

    let label = format!("label=org.ringleader.cluster={id}");
    let containers = common::run_echoed(std::process::Command::new("docker").args(["ps", "-aq", "--filter", &label]));
    assert!(containers.status.success());
    assert_eq!(String::from_utf8_lossy(&containers.stdout).trim(), "", "containers left behind");

    let networks = common::run_echoed(std::process::Command::new("docker").args(["network", "ls", "-q", "--filter", &format!("name=^{network}$")]));
    assert!(networks.status.success());
    assert_eq!(String::from_utf8_lossy(&networks.stdout).trim(), "", "network left behind");
    assert!(!files_dir.exists(), "{} left behind", files_dir.display());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn panicking_test_still_removes_its_cluster() {
    require_docker!();
    let _guard = common::exclusive().await;
    let id = std::sync::Arc::new(std::sync::Mutex::new(String::new()));

    let recorded = id.clone();
    let task = tokio::spawn(async move {
        let cluster = common::start_cluster(ClusterOptions::new(1)).await;
        *recorded.lock().unwrap() = cluster.id.clone();
        panic!("simulated test failure with cluster {}", cluster.id);
    });
    assert!(task.await.unwrap_err().is_panic());

    let id = id.lock().unwrap().clone();
    assert!(!id.is_empty(), "the cluster never started");
    let label = format!("label=org.ringleader.cluster={id}");
    let containers = common::run_echoed(std::process::Command::new("docker").args(["ps", "-aq", "--filter", &label]));
    assert_eq!(String::from_utf8_lossy(&containers.stdout).trim(), "", "containers left behind");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mounts_are_read_only_at_same_path() {
    require_docker!();
    let _guard = common::exclusive().await;
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("marker"), "mounted\n").unwrap();
    let options = ClusterOptions::new(1).mount(dir.path());
    let cluster = common::start_cluster(options).await;

    let marker = dir.path().join("marker");
    let read = cluster.exec(0, &["cat", marker.to_str().unwrap()]).await.unwrap();
    assert_eq!(read.stdout, "mounted\n");
    let write = cluster.exec(0, &["touch", dir.path().join("new").to_str().unwrap()]).await.unwrap();
    assert_ne!(write.exit_code, 0, "the mount is writable");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mounted_mlx_virtualenv_runs_inside_a_node() {
    require_docker!();
    let _guard = common::exclusive().await;
    let python = common::test_python();
    let mounts = ringleader_containers::mounts::python_mounts(&python).expect("test python found");
    let mut options = ClusterOptions::new(1);
    options.mounts = mounts;
    let cluster = common::start_cluster(options).await;

    let host_glibc = ringleader_containers::cluster::host_glibc_version().expect("getconf on the host");
    assert_eq!(cluster.node_glibc_version(0).await.unwrap(), host_glibc);

    let code = "import mlx.core as mx; print(mx.__version__, mx.sum(mx.arange(5)).item())";
    let output = cluster.exec(0, &[python.to_str().unwrap(), "-c", code]).await.unwrap();
    assert_eq!(output.exit_code, 0, "python failed in the node: {}", output.stderr);
    assert!(output.stdout.trim().ends_with(" 10"), "unexpected output {:?}", output.stdout);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn image_builds_from_scratch_within_five_minutes() {
    require_docker!();
    let _guard = common::exclusive().await;
    let source = AptSource::detect().expect("apt source");
    let recipe = ImageRecipe::for_suite(&source.suite);
    let tag = format!("ringleader-sshd:build-test-{}", std::process::id());

    let started = Instant::now();
    image::build_image(&source, &recipe, &tag).await.expect("image builds");
    let elapsed = started.elapsed();
    eprintln!("image built in {elapsed:?}");

    let inspect = common::run_echoed(std::process::Command::new("docker").args([
        "image",
        "inspect",
        "-f",
        "{{index .Config.Labels \"org.ringleader.managed\"}} {{json .Config.Cmd}}",
        &tag,
    ]));
    let removed = common::run_echoed(std::process::Command::new("docker").args(["rmi", &tag]));
    assert!(inspect.status.success());
    assert_eq!(
        String::from_utf8_lossy(&inspect.stdout).trim(),
        "true [\"/usr/local/sbin/ringleader-node-start\"]"
    );
    assert!(removed.status.success());
    assert!(elapsed < Duration::from_secs(300), "build took {elapsed:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn system_python_virtualenv_runs_inside_a_node() {
    require_docker!();
    let _guard = common::exclusive().await;
    let scratch = tempfile::tempdir().unwrap();
    let venv = scratch.path().join("venv");
    let created = common::run_echoed(std::process::Command::new("/usr/bin/python3").args(["-m", "venv", "--without-pip"]).arg(&venv));
    assert!(created.status.success(), "the host needs /usr/bin/python3 with venv");

    let mounts = ringleader_containers::mounts::python_mounts(&venv).expect("venv found");
    assert_eq!(mounts, vec![std::fs::canonicalize(&venv).unwrap()], "only the venv itself is mounted");
    let mut options = ClusterOptions::new(1);
    options.mounts = mounts;
    let cluster = common::start_cluster(options).await;

    let python = venv.join("bin/python");
    let code = "import sys; print(sys.prefix)";
    let output = cluster.exec(0, &[python.to_str().unwrap(), "-c", code]).await.unwrap();
    assert_eq!(output.exit_code, 0, "python failed in the node: {}", output.stderr);
    assert_eq!(output.stdout.trim(), venv.to_str().unwrap());
}
