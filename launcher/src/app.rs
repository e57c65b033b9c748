//! The `ringleader` command: from parsed arguments to an exit code.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use crate::cli::{Backend, Cli};
use crate::exec::local::LocalSpawner;
use crate::exec::ssh::{SshOptions, SshSpawner};
use crate::exec::{BoxFuture, ByteWriter, RankSpec, SpawnError, Spawned, Spawner};
use crate::exit;
use crate::hostfile::{is_local_name, Hostfile, HostfileError};
use crate::mpi::{self, MpiCommand, MpiError};
use crate::output;
use crate::plan::{self, LaunchPlan, PlanError, PlanOptions};
use crate::preflight::{self, PreflightError};
use crate::slurm::{self, SlurmError};
use crate::supervisor::{self, LauncherIo, SupervisorOptions};

mod subcommands;

pub use subcommands::{run_config, run_doctor};

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
    #[error(transparent)]
    Mpi(#[from] MpiError),
    #[error(transparent)]
    Slurm(#[from] SlurmError),
    #[error("the ring backend needs IP addresses, but the hosts come by name from the Slurm allocation (SLURM_JOB_NODELIST), starting with {host}\nhint: write a hostfile with each node's addresses, ringleader config --hosts \"$SLURM_JOB_NODELIST\" --output-hostfile hosts.json, then launch with --hostfile hosts.json (--backend mpi takes names)")]
    SlurmHostsWithoutIps { host: String },
}

/// Runs the launcher and returns its exit code.
pub fn run(cli: Cli) -> i32 {
    if cli.print_python {
        println!("{}", cli.python.clone().unwrap_or_else(default_python));
        return exit::SUCCESS;
    }
    let prepared = load_hosts(&cli).and_then(|(hostfile, backend)| match backend {
        Backend::Mpi => prepare_mpi(&cli, &hostfile).map(Err),
        _ => prepare_plan(&cli, hostfile, backend).map(Ok),
    });
    let plan = match prepared {
        Ok(Ok(plan)) => plan,
        Ok(Err(mpi_command)) => return run_mpi(&cli, &mpi_command),
        Err(error) => {
            print_error(&error);
            return exit::USAGE;
        }
    };
    for key in &plan.overridden_env {
        eprintln!("ringleader: warning: {key} from --env or the hostfile has no effect: the launcher sets it for every rank");
    }
    if cli.dry_run {
        if cli.json {
            println!("{}", serde_json::to_string_pretty(&plan::to_json(&plan)).expect("JSON values serialize"));
        } else {
            print!("{}", plan::to_text(&plan));
        }
        return exit::SUCCESS;
    }
    if let Err(error) = preflight::check(&plan, cli.output_dir.as_deref()) {
        print_error(&error);
        return exit::USAGE;
    }
    if let Some(warning) = preflight::master_port_warning(&plan) {
        eprintln!("ringleader: warning: {warning}");
    }

    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a tokio runtime can be built");
    let code = runtime.block_on(launch(&cli, &plan));
    // A read of an idle stdin, or a write to a stalled stdout, may still be
    // pending on a blocking thread. Waiting for it would keep the launcher
    // alive, and deaf to signals, after the job ended.
    runtime.shutdown_background();
    code
}

/// Prints an error with its causes on one line, then its hint lines, as
/// "ringleader: error: what failed: cause\nhint: what to do".
pub fn print_error(error: &dyn std::error::Error) {
    print_error_of("ringleader", error);
}

/// Prints an error as [`print_error`] does, after `program` ("ringleader
/// config", say) in place of "ringleader".
pub fn print_error_of(program: &str, error: &dyn std::error::Error) {
    let text = error.to_string();
    let (headline, hint) = match text.split_once("\nhint:") {
        Some((headline, hint)) => (headline.to_string(), Some(hint)),
        None => (text.clone(), None),
    };
    let mut line = format!("{program}: error: {headline}");
    let mut source = error.source();
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !line.contains(&cause_text) {
            line += &format!(": {cause_text}");
        }
        source = cause.source();
    }
    eprintln!("{line}");
    if let Some(hint) = hint {
        eprintln!("hint:{hint}");
    }
}

async fn launch(cli: &Cli, plan: &LaunchPlan) -> i32 {
    let signals = match crate::signals::os_signals() {
        Ok(signals) => signals,
        Err(error) => {
            eprintln!("ringleader: error: cannot install signal handlers: {error}");
            return exit::FAILURE;
        }
    };
    // A launcher started in the background (`ringleader ... &`) would be
    // stopped by SIGTTIN at its first read of the terminal, so it leaves the
    // terminal alone, as other background jobs do. With SIGTTIN ignored, a
    // launcher moved to the background later (Ctrl-Z, then `bg`) gets EIO
    // instead and closes the ranks' stdin.
    // SAFETY: SIG_IGN installs no handler code.
    unsafe { libc::signal(libc::SIGTTIN, libc::SIG_IGN) };
    let stdin: Option<crate::exec::ByteReader> = match stdin_is_background_terminal() {
        true => {
            tracing::debug!("stdin is a terminal of another process group; not forwarding it");
            None
        }
        false => Some(Box::new(tokio::io::stdin())),
    };
    let (stdout, stderr, buffered_streams) = launcher_streams();
    let io = LauncherIo {
        merge_streams: same_file(libc::STDOUT_FILENO, libc::STDERR_FILENO),
        stdout,
        stderr,
        buffered_streams,
        stdin,
        signals,
    };
    let options = SupervisorOptions {
        grace: Duration::from_secs_f64(cli.grace),
        timeout: cli.timeout.filter(|seconds| *seconds > 0.0).map(Duration::from_secs_f64),
        tag_output: cli.tag_output,
        output_dir: cli.output_dir.clone(),
        kill_confirm: Duration::from_secs(10),
    };
    let spawner = match HostSpawner::for_hosts(plan.ranks.iter().map(|r| r.host.as_str()), ssh_options(cli)) {
        Ok(spawner) => Arc::new(spawner),
        Err(error) => {
            eprintln!("ringleader: error: cannot set up the ssh transport: {error}");
            return exit::FAILURE;
        }
    };
    if let Err(error) = crate::signals::suspend_with_job(spawner.local.job_id().to_string()) {
        tracing::warn!(%error, "cannot catch SIGTSTP; Ctrl-Z will suspend the launcher without its ranks");
    }
    let report = supervisor::supervise(&plan.ranks, spawner.clone(), options, io).await;
    for process in spawner.local.stop_escaped().await {
        eprintln!(
            "ringleader: process {} ({}) had left its rank's process group and outlived the job; stopped it",
            process.pid, process.command
        );
    }
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

/// Builds the ssh transport's settings from the command line.
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
    let (hostfile, backend) = load_hosts(cli)?;
    if backend == Backend::Mpi {
        return Err(LaunchError::Plan(PlanError::MpiNotPerRank));
    }
    prepare_plan(cli, hostfile, backend)
}

/// Reads the hosts from `--hostfile`, `--hosts` or a Slurm allocation (in
/// that order), and picks the backend: `--backend`, else the hostfile's, else ring.
fn load_hosts(cli: &Cli) -> Result<(Hostfile, Backend), LaunchError> {
    let mut hostfile = read_hosts(cli.hostfile.as_deref(), cli.hosts.as_deref(), cli.repeat_hosts as usize)?;
    let backend = match (cli.backend, hostfile.backend.take()) {
        (Some(backend), _) => backend,
        (None, Some(name)) => Backend::parse(&name).ok_or(LaunchError::UnknownBackend { name })?,
        (None, None) => Backend::Ring,
    };
    if cli.command.is_empty() || cli.command[0].is_empty() {
        return Err(LaunchError::EmptyCommand);
    }
    Ok((hostfile, backend))
}

/// Reads the hosts from a hostfile, else a `--hosts` list, else the Slurm
/// allocation, else [`DEFAULT_HOSTS`]; each host is repeated `repeats` times
/// (Slurm's own task counts apply when `repeats` is 1).
pub fn read_hosts(hostfile: Option<&Path>, hosts: Option<&str>, repeats: usize) -> Result<Hostfile, LaunchError> {
    if let Some(path) = hostfile {
        let mut hostfile = Hostfile::from_path(path)?;
        hostfile.repeat(repeats);
        return Ok(hostfile);
    }
    if let Some(list) = hosts {
        return Ok(Hostfile::from_list(list, repeats)?);
    }
    if let Some(nodes) = slurm::allocation(&|key| std::env::var(key).ok())? {
        tracing::debug!(nodes = nodes.len(), "taking the hosts from the Slurm allocation");
        return Ok(Hostfile::from_allocation(nodes, (repeats > 1).then_some(repeats))?);
    }
    Ok(Hostfile::from_list(DEFAULT_HOSTS, repeats)?)
}

/// Hosts of a launch without `--hosts`, `--hostfile` or a Slurm allocation.
const DEFAULT_HOSTS: &str = "127.0.0.1";

fn prepare_plan(cli: &Cli, mut hostfile: Hostfile, backend: Backend) -> Result<LaunchPlan, LaunchError> {
    let mut env = std::mem::take(&mut hostfile.envs);
    env.extend(cli.env.iter().cloned());
    let options = PlanOptions {
        backend,
        command: cli.command.clone(),
        python: cli.python.clone(),
        env,
        // A relative --cwd means the same directory on every host: the one
        // it names from where the launcher runs.
        cwd: cli.cwd.as_ref().map(|cwd| match std::env::current_dir() {
            Ok(current) => current.join(cwd),
            Err(_) => PathBuf::from(cwd),
        }),
        default_cwd: std::env::current_dir().ok(),
        starting_port: cli.starting_port,
        connections_per_ip: cli.connections_per_ip,
        nccl_port: cli.nccl_port,
        repeat_hosts: cli.repeat_hosts,
        verbose: cli.verbose,
        stdin: cli.stdin,
        terminal_size: terminal_size(),
    };
    let from_slurm = cli.hostfile.is_none() && cli.hosts.is_none() && std::env::var_os("SLURM_JOB_NODELIST").is_some();
    plan::build(&hostfile, &options, &|key| std::env::var(key).ok()).map_err(|error| match error {
        PlanError::MissingIps { host, .. } if from_slurm => LaunchError::SlurmHostsWithoutIps { host },
        error => error.into(),
    })
}

/// Translates the launch into one mpirun command line.
fn prepare_mpi(cli: &Cli, hostfile: &Hostfile) -> Result<MpiCommand, LaunchError> {
    if cli.tag_output {
        return Err(MpiError::Unsupported { option: "--tag-output", hint: "pass mpirun's own with --mpi-arg --tag-output" }.into());
    }
    if cli.output_dir.is_some() {
        return Err(MpiError::Unsupported { option: "--output-dir", hint: "pass mpirun's own with --mpi-arg '--output-filename DIR'" }.into());
    }
    if let Some(host) = hostfile.hosts.iter().find(|host| host.target != Default::default()) {
        tracing::debug!(host = %host.ssh, "host has its own ssh login");
        return Err(MpiError::Unsupported {
            option: "the hostfile fields \"user\", \"port\" and \"identity\"",
            hint: "mpirun logs in with its own ssh settings; put them in ~/.ssh/config",
        }
        .into());
    }
    let lookup_env = |key: &str| std::env::var(key).ok();
    let mpirun = mpi::Mpirun::find(std::env::var_os("PATH").as_deref())?;
    if !cli.dry_run {
        mpi::check_root(nix::unistd::geteuid().is_root(), &cli.mpi_arg, &lookup_env)?;
    }

    // MLX loads MPI by the library name in MLX_MPI_LIBNAME, as mlx.launch
    // sets it, and on macOS from the lib directory next to mpirun's.
    let mut entries = Vec::new();
    if let Some(name) = mpi::mpi_library_name(&mpirun.program) {
        let prefix = mpirun.program.parent().and_then(Path::parent);
        if let (true, Some(prefix)) = (cfg!(target_os = "macos"), prefix) {
            entries.push(format!("DYLD_LIBRARY_PATH={}", prefix.join("lib").display()));
        }
        entries.push(format!("MLX_MPI_LIBNAME={name}"));
    }
    entries.extend(hostfile.envs.iter().cloned());
    entries.extend(cli.env.iter().cloned());
    let mut env = plan::parse_env_entries(&entries, &lookup_env)?;
    if let Some((columns, lines)) = terminal_size() {
        if !env.iter().any(|(key, _)| key == "COLUMNS") {
            env.push(("COLUMNS".into(), columns.to_string()));
            env.push(("LINES".into(), lines.to_string()));
        }
    }

    let mut command = cli.command.clone();
    if let Some(python) = &cli.python {
        command.insert(0, python.clone());
    }
    let cwd = cli.cwd.as_deref().map(Path::new);
    let mut command = mpi::build(&mpirun, &hostfile.hosts, &env, cwd, &cli.mpi_arg, &command)?;
    command.add_ssh_args(&mpi_ssh_args(cli))?;
    Ok(command)
}

/// Returns the launcher's ssh settings as arguments for mpirun's own ssh:
/// never a hidden password prompt, and --connect-timeout, as for ranks the
/// launcher starts itself.
fn mpi_ssh_args(cli: &Cli) -> Vec<String> {
    let mut args = vec![
        "-o".to_string(),
        "BatchMode=yes".to_string(),
        "-o".to_string(),
        format!("ConnectTimeout={}", cli.connect_timeout.ceil().max(1.0) as u64),
    ];
    if let Some(config) = &cli.ssh_config {
        args.push("-F".to_string());
        args.push(config.display().to_string());
    }
    for option in &cli.ssh_option {
        args.push("-o".to_string());
        args.push(option.clone());
    }
    if cli.accept_new_host_keys {
        args.push("-o".to_string());
        args.push("StrictHostKeyChecking=accept-new".to_string());
    }
    args
}

/// Prints or runs the mpirun command.
fn run_mpi(cli: &Cli, command: &MpiCommand) -> i32 {
    if cli.dry_run {
        let argv: Vec<String> = command
            .argv(Path::new("HOSTFILE"))
            .into_iter()
            .map(|arg| arg.to_string_lossy().into_owned())
            .collect();
        if cli.json {
            let value = serde_json::json!({
                "backend": Backend::Mpi,
                "mpirun": argv,
                "mpi_hostfile": command.hostfile,
            });
            println!("{}", serde_json::to_string_pretty(&value).expect("JSON values serialize"));
        } else {
            let quoted: Vec<String> = argv.iter().map(|arg| crate::shell::quote(arg)).collect();
            print!("backend mpi\n{}\nHOSTFILE:\n{}", quoted.join(" "), command.hostfile);
        }
        return exit::SUCCESS;
    }

    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a tokio runtime can be built");
    runtime.block_on(async {
        let signals = match crate::signals::os_signals() {
            Ok(signals) => signals,
            Err(error) => {
                eprintln!("ringleader: error: cannot install signal handlers: {error}");
                return exit::FAILURE;
            }
        };
        let options = mpi::RunOptions {
            grace: Duration::from_secs_f64(cli.grace),
            timeout: cli.timeout.filter(|seconds| *seconds > 0.0).map(Duration::from_secs_f64),
            stdin: cli.stdin != crate::cli::StdinMode::None,
            guard_program: guard_program(),
        };
        mpi::run(command, &options, signals).await
    })
}

/// Sends each rank to the spawner for its host: loopback names run locally,
/// every other host through ssh.
struct HostSpawner {
    local: LocalSpawner,
    /// Present when the job has remote ranks.
    remote: Option<SshSpawner>,
}

impl HostSpawner {
    /// Builds the spawner for `hosts`, with an ssh transport only if one of them is remote.
    fn for_hosts<'a>(mut hosts: impl Iterator<Item = &'a str>, mut options: SshOptions) -> std::io::Result<HostSpawner> {
        let local = match guard_program() {
            Some(program) => LocalSpawner::with_guard(options.grace, program),
            None => LocalSpawner::new(options.grace),
        };
        // Local and remote ranks of one job carry the same job id.
        options.job_id = Some(local.job_id().to_string());
        let remote = match hosts.any(|host| !is_local_name(host)) {
            true => Some(SshSpawner::new(options)?),
            false => None,
        };
        Ok(HostSpawner { local, remote })
    }
}

/// Returns the path of the running `ringleader` binary, started again as
/// the guard of local ranks. On Linux, /proc/self/exe works even after the
/// file was replaced.
fn guard_program() -> Option<PathBuf> {
    if cfg!(target_os = "linux") {
        return Some(PathBuf::from("/proc/self/exe"));
    }
    std::env::current_exe().ok()
}

impl Spawner for HostSpawner {
    fn spawn<'a>(&'a self, spec: &'a RankSpec) -> BoxFuture<'a, Result<Spawned, SpawnError>> {
        match &self.remote {
            Some(remote) if !is_local_name(&spec.host) => remote.spawn(spec),
            _ => self.local.spawn(spec),
        }
    }
}

/// Opens the launcher's stdout and stderr for rank output and returns whether
/// they collect writes themselves. If a descriptor cannot be duplicated
/// (because it is closed, say), tokio's writers are used instead, and they
/// report the error on first use.
fn launcher_streams() -> (ByteWriter, ByteWriter, bool) {
    match (output::BlockingSink::stdout(), output::BlockingSink::stderr()) {
        (Ok(stdout), Ok(stderr)) => (Box::new(stdout), Box::new(stderr), true),
        _ => (Box::new(tokio::io::stdout()), Box::new(tokio::io::stderr()), false),
    }
}

/// Returns whether two open file descriptors refer to the same file.
fn same_file(a: i32, b: i32) -> bool {
    match (nix::sys::stat::fstat(a), nix::sys::stat::fstat(b)) {
        (Ok(a), Ok(b)) => a.st_dev == b.st_dev && a.st_ino == b.st_ino,
        _ => false,
    }
}

/// Returns whether stdin is a terminal whose foreground process group is not
/// the launcher's, as for a job started with `&` from an interactive shell.
fn stdin_is_background_terminal() -> bool {
    // SAFETY: both calls only read process state; fd 0 may be anything,
    // and tcgetpgrp reports an error for what is not a terminal.
    let (foreground, own) = unsafe { (libc::tcgetpgrp(libc::STDIN_FILENO), libc::getpgrp()) };
    foreground > 0 && foreground != own
}

/// Columns and lines of the terminal on the launcher's stdout, if it is one.
fn terminal_size() -> Option<(u16, u16)> {
    let mut size = libc::winsize { ws_row: 0, ws_col: 0, ws_xpixel: 0, ws_ypixel: 0 };
    // SAFETY: TIOCGWINSZ writes one winsize into the pointer, which is valid
    // for the duration of the call. fd 1 may be anything, so errors are checked.
    let result = unsafe { libc::ioctl(libc::STDOUT_FILENO, libc::TIOCGWINSZ, &mut size) };
    (result == 0 && size.ws_col > 0).then_some((size.ws_col, size.ws_row))
}

/// Returns the interpreter `--print-python` reports without `--python`: python3 from PATH.
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
