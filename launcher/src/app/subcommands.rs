//! The `config` and `doctor` subcommands: from parsed arguments to an exit code.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use super::{read_hosts, HostSpawner, LaunchError};
use crate::cli::{Backend, ConfigCli, DoctorCli, Over};
use crate::distconfig;
use crate::doctor::{self, DoctorOptions, Edges};
use crate::exit;
use crate::hostfile::Hostfile;
use crate::plan::{self, PlanError};
use crate::preflight::PreflightError;

/// Runs `ringleader doctor` and returns its exit code.
pub fn run_doctor(cli: DoctorCli) -> i32 {
    if cli.probe {
        return doctor::probe::run();
    }
    let prepared = read_hosts(cli.hostfile.as_deref(), cli.hosts.as_deref(), cli.repeat_hosts as usize).and_then(|mut hostfile| {
        let edges = doctor_edges(&cli, &mut hostfile)?;
        let command = match cli.command.first() {
            Some(program) => Some(resolve_command(program)?),
            None => None,
        };
        Ok((hostfile, edges, command))
    });
    let (hostfile, edges, command) = match prepared {
        Ok(prepared) => prepared,
        Err(error) => {
            super::print_error_of("ringleader doctor", &error);
            return exit::USAGE;
        }
    };
    let probe_program = match std::env::current_exe() {
        Ok(path) => path,
        Err(error) => {
            eprintln!("ringleader doctor: error: cannot find the ringleader binary to use as the probe: {error}");
            return exit::FAILURE;
        }
    };
    let options = DoctorOptions {
        edges,
        command,
        probe_program,
        stage_timeout: Duration::from_secs_f64(cli.timeout),
    };

    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a tokio runtime can be built");
    let work = async {
        let hosts = hostfile.hosts.iter().map(|host| host.ssh.as_str());
        let spawner = match HostSpawner::for_hosts(hosts, cli.ssh.to_options(Duration::from_secs(1))) {
            Ok(spawner) => Arc::new(spawner),
            Err(error) => {
                eprintln!("ringleader doctor: error: cannot set up the ssh transport: {error}");
                return exit::FAILURE;
            }
        };
        let rows = doctor::diagnose(&hostfile, &options, spawner).await;
        print!("{}", doctor::render(&rows));
        let failures = doctor::failures(&rows);
        for failure in &failures {
            eprintln!("ringleader doctor: {failure}");
        }
        if failures.is_empty() {
            exit::SUCCESS
        } else {
            exit::FAILURE
        }
    };
    match runtime.block_on(until_signal(work)) {
        Ok(code) => code,
        Err(code) => {
            eprintln!("ringleader doctor: interrupted; stopped the probes");
            code
        }
    }
}

/// Runs `work` until it finishes or the process gets SIGINT, SIGTERM or
/// SIGHUP. On a signal, `work` is dropped, which kills the ssh clients it
/// started (they run in process groups of their own, so the terminal's
/// signals do not reach them), and the signal's exit code is returned as
/// the error.
async fn until_signal<T>(work: impl std::future::Future<Output = T>) -> Result<T, i32> {
    let mut signals = match crate::signals::os_signals() {
        Ok(signals) => signals,
        Err(error) => {
            tracing::warn!(%error, "cannot install signal handlers; an interrupt may leave ssh clients running");
            return Ok(work.await);
        }
    };
    tokio::select! {
        result = work => Ok(result),
        Some(signal) = signals.recv() => Err(signal.exit_code()),
    }
}

/// Picks the addresses doctor checks for the job's backend: the ring table,
/// the coordinator of nccl and jaccl on rank 0, or none for mpi, whose
/// ports mpirun chooses.
fn doctor_edges(cli: &DoctorCli, hostfile: &mut Hostfile) -> Result<Edges, LaunchError> {
    let backend = match (cli.backend, hostfile.backend.take()) {
        (Some(backend), _) => backend,
        (None, Some(name)) => Backend::parse(&name).ok_or(LaunchError::UnknownBackend { name })?,
        (None, None) => Backend::Ring,
    };
    let ranks = hostfile.hosts.len();
    let coordinator = |port: u16| -> Result<String, LaunchError> {
        let ip = hostfile.hosts[0].ips.first().ok_or_else(|| PlanError::MissingCoordinatorIp {
            backend: backend.name(),
            host: hostfile.hosts[0].ssh.clone(),
        })?;
        Ok(std::net::SocketAddr::new(ip.parse().expect("hostfile IPs are validated"), port).to_string())
    };
    Ok(match backend {
        Backend::Ring => {
            let table = plan::ring_address_table(&hostfile.hosts, cli.starting_port, cli.connections_per_ip)?;
            Edges::ring(table)
        }
        Backend::Nccl => Edges::coordinator(ranks, coordinator(cli.nccl_port)?),
        Backend::Jaccl | Backend::JacclRing => Edges::coordinator(ranks, coordinator(cli.starting_port)?),
        Backend::Mpi => Edges::none(ranks),
    })
}

/// Resolves the command's path on this machine, as execvp would find it.
fn resolve_command(program: &str) -> Result<PathBuf, LaunchError> {
    if program.contains('/') {
        let path = PathBuf::from(program);
        let current = std::env::current_dir().unwrap_or_default();
        return Ok(if path.is_absolute() { path } else { current.join(path) });
    }
    std::env::var_os("PATH")
        .and_then(|path| std::env::split_paths(&path).map(|dir| dir.join(program)).find(|candidate| candidate.is_file()))
        .ok_or_else(|| PreflightError::CommandNotFound { command: program.to_string() }.into())
}

/// Runs `ringleader config` and returns its exit code.
pub fn run_config(cli: ConfigCli) -> i32 {
    if cli.over == Over::Thunderbolt {
        eprintln!("ringleader config: error: --over thunderbolt is not supported: Thunderbolt discovery needs macOS hardware\nhint: use --over ethernet, or mlx.distributed_config on the Macs");
        return exit::USAGE;
    }
    let loaded = match &cli.hostfile {
        Some(path) => Hostfile::from_path(path),
        None => Hostfile::from_list(&cli.hosts, 1),
    };
    let checked_env = loaded
        .map_err(LaunchError::from)
        .and_then(|hostfile| Ok((hostfile, plan::parse_env_entries(&cli.env, &|_| Some(String::new()))?)));
    let mut hostfile = match checked_env {
        Ok((hostfile, _)) => hostfile,
        Err(error) => {
            super::print_error_of("ringleader config", &error);
            return exit::USAGE;
        }
    };
    // A host listed twice (for two ranks) is asked once, and written twice.
    let all_hosts = std::mem::take(&mut hostfile.hosts);
    let mut seen = std::collections::HashSet::new();
    hostfile.hosts = all_hosts.iter().filter(|host| seen.insert(host.ssh.clone())).cloned().collect();

    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a tokio runtime can be built");
    let options = cli.ssh.to_options(Duration::from_secs(1));
    let timeout = options.connect_timeout + options.start_timeout;
    let results = runtime.block_on(until_signal(async {
        let hosts = hostfile.hosts.iter().map(|host| host.ssh.as_str());
        let spawner = HostSpawner::for_hosts(hosts, options)?;
        Ok::<_, std::io::Error>(distconfig::query_hosts(&hostfile.hosts, Arc::new(spawner), timeout).await)
    }));
    drop(runtime);
    let results = match results {
        Err(code) => {
            eprintln!("ringleader config: interrupted; no hostfile written");
            return code;
        }
        Ok(results) => results,
    };
    let results = match results {
        Ok(results) => results,
        Err(error) => {
            eprintln!("ringleader config: error: cannot set up the ssh transport: {error}");
            return exit::FAILURE;
        }
    };

    let mut reached = std::collections::HashMap::new();
    let mut failed = 0;
    for (host, result) in hostfile.hosts.iter().zip(results) {
        match result {
            distconfig::HostResult::Reached { ips } => {
                if ips.is_empty() {
                    eprintln!("ringleader config: warning: {}: no IPv4 address found; the ring backend needs one in \"ips\"", host.ssh);
                }
                reached.insert(host.ssh.clone(), ips);
            }
            distconfig::HostResult::Failed { reason } => {
                eprintln!("ringleader config: {}: {reason}", host.ssh);
                failed += 1;
            }
        }
    }
    let configured: Vec<(crate::hostfile::Host, Vec<String>)> = all_hosts
        .into_iter()
        .filter_map(|host| reached.get(&host.ssh).map(|ips| (host.clone(), ips.clone())))
        .collect();
    if failed > 0 && !cli.ignore_unreachable {
        eprintln!("ringleader config: error: {failed} host(s) failed; no hostfile written\nhint: set up passwordless ssh (ssh-copy-id) or pass --ignore-unreachable to leave them out");
        return exit::FAILURE;
    }
    if configured.is_empty() {
        eprintln!("ringleader config: error: no host could be reached; no hostfile written");
        return exit::FAILURE;
    }

    // An input hostfile's backend and variables carry over; the command
    // line's come on top.
    let backend = match (cli.backend, hostfile.backend.as_deref()) {
        (Some(backend), _) => backend,
        (None, Some(name)) => match Backend::parse(name) {
            Some(backend) => backend,
            None => {
                eprintln!("ringleader config: error: unknown backend {name:?} in the input hostfile\nhint: use one of ring, mpi, nccl, jaccl, jaccl-ring");
                return exit::USAGE;
            }
        },
        (None, None) => Backend::Ring,
    };
    let mut envs = hostfile.envs.clone();
    envs.extend(cli.env.iter().cloned());
    let without_devices: Vec<&str> = configured
        .iter()
        .filter(|(host, _)| host.rdma.is_empty())
        .map(|(host, _)| host.ssh.as_str())
        .collect();
    if matches!(backend, Backend::Jaccl | Backend::JacclRing) && !without_devices.is_empty() {
        eprintln!(
            "ringleader config: warning: the {} backend needs each host's \"rdma\" device list, which config cannot discover (Thunderbolt discovery needs macOS); fill them in before launching for {}",
            backend.name(),
            without_devices.join(", ")
        );
    }
    let value = distconfig::hostfile_json(&configured, backend, &envs);
    let text = serde_json::to_string_pretty(&value).expect("JSON values serialize") + "\n";
    match &cli.output_hostfile {
        Some(path) => {
            if let Err(error) = std::fs::write(path, text) {
                eprintln!("ringleader config: error: cannot write {}: {error}", path.display());
                return exit::FAILURE;
            }
            let count = configured.len();
            let noun = if count == 1 { "host" } else { "hosts" };
            eprintln!("ringleader config: wrote {} with {count} {noun}", path.display());
        }
        None => {
            use std::io::Write as _;
            let mut stdout = std::io::stdout().lock();
            if let Err(error) = stdout.write_all(text.as_bytes()).and_then(|()| stdout.flush()) {
                eprintln!("ringleader config: error: cannot write the hostfile to stdout: {error}\nhint: pass --output-hostfile FILE");
                return exit::FAILURE;
            }
        }
    }
    exit::SUCCESS
}
