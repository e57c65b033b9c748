//! `ringleader-cluster`: start a cluster of sshd containers on this machine
//! and rehearse multi-host ringleader jobs against it.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use ringleader_containers::apt_source::AptSource;
use ringleader_containers::image::{self, ImageRecipe};
use ringleader_containers::{cleanup, mounts, Cluster, ClusterOptions, Engine};

/// Rehearse multi-host ringleader jobs on one machine.
///
/// Each node is a Docker container running sshd, on a private network of its
/// own. ringleader reaches the nodes through ssh ports published on
/// 127.0.0.1; the ranks talk to each other over the containers' network.
///
/// First run (as root; builds the image once, about a minute):
///
///   ringleader-cluster up -n 4 --mount "$PWD/target"
///
/// then run the command it prints in a second terminal, and press Ctrl-C in
/// the first to remove the cluster.
#[derive(Parser)]
#[command(name = "ringleader-cluster", version, verbatim_doc_comment)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Start a cluster, print how to use it, and remove it on Ctrl-C.
    Up {
        /// Number of nodes (containers).
        #[arg(short = 'n', long = "nodes", value_name = "N", default_value_t = 4)]
        nodes: usize,

        /// Host directory to bind-mount read-only at the same path in every
        /// node, e.g. the cargo target directory with your rank programs.
        /// Repeatable.
        #[arg(long, value_name = "DIR")]
        mount: Vec<PathBuf>,

        /// Python virtualenv (or interpreter) to make available in the nodes,
        /// together with the base installation it links to.
        #[arg(long, value_name = "VENV")]
        python: Option<PathBuf>,

        /// Directory for the generated ssh config, key, known_hosts and
        /// hostfile [default: a temporary directory removed on exit].
        #[arg(long, value_name = "DIR")]
        dir: Option<PathBuf>,
    },

    /// Build the node image if it is missing, then show its tag.
    Image,

    /// Remove containers and networks left behind by earlier clusters.
    ///
    /// Without --cluster this removes every cluster on the machine, also
    /// those that another `up` or a running test still uses.
    Down {
        /// Remove only the cluster with this id (printed by `up`).
        #[arg(long, value_name = "ID")]
        cluster: Option<String>,
    },
}

#[tokio::main]
async fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();

    let cli = Cli::parse();
    let outcome = match cli.command {
        Command::Up { nodes, mount, python, dir } => up(nodes, mount, python, dir).await,
        Command::Image => show_image().await,
        Command::Down { cluster } => down(cluster.as_deref()).await,
    };
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("ringleader-cluster: {}", error_chain(&error));
            ExitCode::FAILURE
        }
    }
}

fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(&format!("\n  caused by: {cause}"));
        source = cause.source();
    }
    text
}

async fn up(
    nodes: usize,
    mount: Vec<PathBuf>,
    python: Option<PathBuf>,
    dir: Option<PathBuf>,
) -> ringleader_containers::Result<()> {
    let mut options = ClusterOptions::new(nodes);
    options.files_dir = dir;
    for path in mount {
        let absolute = std::path::absolute(&path)
            .map_err(|source| ringleader_containers::Error::File { action: "resolve", path, source })?;
        options.mounts.push(absolute);
    }
    if let Some(python) = &python {
        options.mounts.extend(mounts::python_mounts(python)?);
    }

    eprintln!("starting {nodes} nodes...");
    let cluster = Cluster::start_with(options.clone()).await?;
    print_usage(&cluster, &options, python.is_some());

    wait_for_shutdown_signal().await;
    eprintln!("\nremoving cluster {}...", cluster.id);
    cluster.remove().await?;
    eprintln!("removed");
    Ok(())
}

fn print_usage(cluster: &Cluster, options: &ClusterOptions, with_python: bool) {
    let files = &cluster.files;
    println!("cluster {} is up ({} nodes, image {})", cluster.id, cluster.nodes.len(), cluster.image);
    println!();
    println!("  node       ssh (127.0.0.1)   network address");
    for node in &cluster.nodes {
        println!("  {:<10} port {:<12} {}", node.alias, node.ssh_port, node.ip);
    }
    println!();
    println!("  hostfile:   {}", files.hostfile.display());
    println!("  ssh config: {}", files.ssh_config.display());
    if options.mounts.is_empty() {
        println!("  mounted:    nothing (use --mount DIR to bring your programs)");
    } else {
        for path in &options.mounts {
            println!("  mounted:    {} (read-only)", path.display());
        }
    }
    println!();
    println!("Run a job across the nodes:");
    println!();
    println!(
        "  ringleader --hostfile {} --ssh-config {} -- hostname",
        files.hostfile.display(),
        files.ssh_config.display()
    );
    if with_python {
        println!();
        println!("Python programs run with the mounted interpreter, e.g. -- <venv>/bin/python script.py");
    }
    println!();
    println!("Log into a node:  ssh -F {} node0", files.ssh_config.display());
    println!("Press Ctrl-C to remove the cluster.");
}

async fn wait_for_shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut terminate = match signal(SignalKind::terminate()) {
        Ok(stream) => stream,
        Err(error) => {
            tracing::warn!(%error, "cannot watch SIGTERM; only Ctrl-C stops the cluster");
            let _ = tokio::signal::ctrl_c().await;
            return;
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = terminate.recv() => {}
    }
}

async fn show_image() -> ringleader_containers::Result<()> {
    let engine = Engine::connect().await?;
    let source = AptSource::detect()?;
    let tag = ImageRecipe::for_suite(&source.suite).tag();
    let existed = image::image_exists(&engine, &tag).await?;
    let tag = image::ensure_image(&engine).await?;
    println!("{tag}");
    eprintln!(
        "{} ({} from the apt configuration's {})",
        if existed { "present" } else { "built" },
        source.suite,
        source.mirror
    );
    Ok(())
}

async fn down(cluster: Option<&str>) -> ringleader_containers::Result<()> {
    let engine = Engine::connect().await?;
    let removed = cleanup::remove_leftovers(&engine, cluster).await?;
    for name in &removed.containers {
        println!("removed container {name}");
    }
    for name in &removed.networks {
        println!("removed network {name}");
    }
    if removed.containers.is_empty() && removed.networks.is_empty() {
        println!("nothing to remove");
    }
    Ok(())
}
