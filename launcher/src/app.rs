//! The `ringleader` command: from parsed arguments to an exit code.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use crate::cli::{Backend, Cli};
use crate::exec::local::LocalSpawner;
use crate::exec::ssh::{SshOptions, SshSpawner};
use crate::exec::{BoxFuture, RankSpec, SpawnError, Spawned, Spawner};
use crate::exit;
use crate::hostfile::{is_local_name, Hostfile, HostfileError};
use crate::plan::{self, LaunchPlan, PlanError, PlanOptions};
use crate::preflight::{self, PreflightError};
use crate::supervisor::{self, LauncherIo, SupervisorOptions};

/// Errors that stop the launch before any rank starts (exit code 2).
#[derive(Debug, thiserror::Error)]
pub enum LaunchError {
    #[error(transparent)]
    Hostfile(#[from] HostfileError),
    #[error(transparent)]
    Plan(#[from] PlanError),
    #[error(transparent)]
    Preflight(#[from] PreflightError),
    #[error("unknown backend {name:?} in the hostfile\nhint: use one of ring, mpi, nccl, jaccl, jaccl-ring")]
    UnknownBackend { name: String },
    #[error("the command is empty\nhint: put the program to run after the options, for example: ringleader -n 2 -- python3 train.py")]
    EmptyCommand,
    #[error("the mpi backend is not supported yet\nhint: run mpirun directly, or use --backend ring")]
    MpiUnsupported,
}

/// Runs the launcher and returns its exit code.
pub fn run(cli: Cli) -> i32 {
    if cli.print_python {
        println!("{}", cli.python.clone().unwrap_or_else(default_python));
        return exit::SUCCESS;
    }
    let plan = match prepare(&cli) {
        Ok(plan) => plan,
        Err(error) => {
            eprintln!("ringleader: error: {error}");
            return exit::USAGE;
        }
    };
    if cli.dry_run {
        if cli.json {
            println!("{}", serde_json::to_string_pretty(&plan::to_json(&plan)).expect("JSON values serialize"));
        } else {
            print!("{}", plan::to_text(&plan));
        }
        return exit::SUCCESS;
    }
    if let Err(error) = preflight::check(&plan, cli.output_dir.as_deref()) {
        eprintln!("ringleader: error: {error}");
        return exit::USAGE;
    }

    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a tokio runtime can be built");
    runtime.block_on(launch(&cli, &plan))
}

async fn launch(cli: &Cli, plan: &LaunchPlan) -> i32 {
    let signals = match crate::signals::os_signals() {
        Ok(signals) => signals,
        Err(error) => {
            eprintln!("ringleader: error: cannot install signal handlers: {error}");
            return exit::FAILURE;
        }
    };
    let io = LauncherIo {
        stdout: Box::new(tokio::io::stdout()),
        stderr: Box::new(tokio::io::stderr()),
        stdin: Some(Box::new(tokio::io::stdin())),
        signals,
    };
    let options = SupervisorOptions {
        grace: Duration::from_secs_f64(cli.grace),
        timeout: cli.timeout.map(Duration::from_secs_f64),
        tag_output: cli.tag_output,
        output_dir: cli.output_dir.clone(),
        kill_confirm: Duration::from_secs(10),
    };
    let remote = if plan.ranks.iter().any(|r| !is_local_name(&r.host)) {
        match SshSpawner::new(ssh_options(cli)) {
            Ok(spawner) => Some(spawner),
            Err(error) => {
                eprintln!("ringleader: error: cannot set up the ssh transport: {error}");
                return exit::FAILURE;
            }
        }
    } else {
        None
    };
    let spawner = Arc::new(HostSpawner { local: LocalSpawner, remote });
    let report = supervisor::supervise(&plan.ranks, spawner.clone(), options, io).await;
    if let Some(remote) = &spawner.remote {
        for rank in remote.unconfirmed_ranks() {
            eprintln!(
                "ringleader: rank {} on {}: its remote process group could not be confirmed dead; check the host for leftover processes",
                rank.rank, rank.host
            );
        }
    }
    report.exit_code
}

/// The ssh transport's settings from the command line.
fn ssh_options(cli: &Cli) -> SshOptions {
    let defaults = SshOptions::default();
    SshOptions {
        config_file: cli.ssh_config.clone(),
        extra_options: cli.ssh_option.clone(),
        accept_new_host_keys: cli.accept_new_host_keys,
        connect_timeout: Duration::from_secs_f64(cli.connect_timeout),
        keepalive_interval: Duration::from_secs_f64(cli.keepalive),
        grace: Duration::from_secs_f64(cli.grace),
        ..defaults
    }
}

/// Parses hosts and options into a plan, without touching any host.
pub fn prepare(cli: &Cli) -> Result<LaunchPlan, LaunchError> {
    let mut hostfile = match &cli.hostfile {
        Some(path) => {
            let mut hostfile = Hostfile::from_path(path)?;
            hostfile.repeat(cli.repeat_hosts as usize);
            hostfile
        }
        None => Hostfile::from_list(&cli.hosts, cli.repeat_hosts as usize)?,
    };
    let backend = match (cli.backend, hostfile.backend.take()) {
        (Some(backend), _) => backend,
        (None, Some(name)) => Backend::parse(&name).ok_or(LaunchError::UnknownBackend { name })?,
        (None, None) => Backend::Ring,
    };
    if backend == Backend::Mpi {
        return Err(LaunchError::MpiUnsupported);
    }
    if cli.command.is_empty() || cli.command[0].is_empty() {
        return Err(LaunchError::EmptyCommand);
    }
    let mut env = std::mem::take(&mut hostfile.envs);
    env.extend(cli.env.iter().cloned());
    let options = PlanOptions {
        backend,
        command: cli.command.clone(),
        python: cli.python.clone(),
        env,
        cwd: cli.cwd.as_ref().map(PathBuf::from),
        default_cwd: std::env::current_dir().ok(),
        starting_port: cli.starting_port,
        connections_per_ip: cli.connections_per_ip,
        nccl_port: cli.nccl_port,
        repeat_hosts: cli.repeat_hosts,
        verbose: cli.verbose,
        stdin: cli.stdin,
        terminal_size: terminal_size(),
    };
    Ok(plan::build(&hostfile, &options, &|key| std::env::var(key).ok())?)
}

/// Sends each rank to the spawner for its host: loopback names run locally,
/// every other host through ssh.
struct HostSpawner {
    local: LocalSpawner,
    /// Present when the job has remote ranks.
    remote: Option<SshSpawner>,
}

impl Spawner for HostSpawner {
    fn spawn<'a>(&'a self, spec: &'a RankSpec) -> BoxFuture<'a, Result<Spawned, SpawnError>> {
        match &self.remote {
            Some(remote) if !is_local_name(&spec.host) => remote.spawn(spec),
            _ => self.local.spawn(spec),
        }
    }
}

/// Columns and lines of the terminal on the launcher's stdout, if it is one.
fn terminal_size() -> Option<(u16, u16)> {
    let mut size = libc::winsize { ws_row: 0, ws_col: 0, ws_xpixel: 0, ws_ypixel: 0 };
    // SAFETY: TIOCGWINSZ writes one winsize into the pointer, which is valid
    // for the duration of the call; fd 1 may be anything, and errors are checked.
    let result = unsafe { libc::ioctl(libc::STDOUT_FILENO, libc::TIOCGWINSZ, &mut size) };
    (result == 0 && size.ws_col > 0).then_some((size.ws_col, size.ws_row))
}

/// The interpreter `--print-python` reports without `--python`: python3 from PATH.
fn default_python() -> String {
    std::env::var_os("PATH")
        .and_then(|path| {
            std::env::split_paths(&path)
                .map(|dir| dir.join("python3"))
                .find(|candidate| candidate.is_file())
        })
        .map(|path| path.display().to_string())
        .unwrap_or_else(|| "python3".to_string())
}
