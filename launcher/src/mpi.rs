//! The mpi backend: a thin wrapper over Open MPI's `mpirun`.
//!
//! mpirun starts, connects and tears down the ranks itself, so ringleader
//! only translates its options: the hosts become an MPI hostfile with
//! `slots`, `--env` becomes `-x KEY=VALUE`, `--cwd` becomes `--wdir`, and
//! every `--mpi-arg` is split into words as a POSIX shell would split it.
//! mpirun writes straight to the launcher's stdout and stderr, unbuffered.
//! The launcher forwards SIGINT, SIGTERM and SIGHUP to mpirun, kills
//! mpirun's process group when the grace period after a signal runs out,
//! and exits with mpirun's status.
//!
//! mpirun is a local child of the launcher rather than a rank behind the
//! [`Spawner`](crate::exec::Spawner) transport, so this module starts it
//! with `tokio::process` and cannot run under the simulator.
//!
//! # Limitations
//!
//! - Only Open MPI's mpirun is supported; MPICH's hostfile syntax differs.
//! - Open MPI 5 gets `--output :raw`, as mlx.launch 0.32 passes it. Open MPI
//!   4.1 has no such option and forwards output unbuffered by default, so it
//!   gets none.
//! - mpirun reaches remote hosts with its own ssh, which gets the launcher's
//!   ssh options through Open MPI's `plm_rsh_args` parameter. Hostfile
//!   entries with `user`, `port` or `identity` are rejected.
//! - Open MPI puts each local rank in a process group of its own, so the
//!   guard process and the sweep after mpirun ends find local ranks and
//!   their children by `RINGLEADER_JOB_ID`. Ranks on remote hosts depend on
//!   mpirun's own teardown.
//! - `--tag-output`, `--output-dir` and `--stdin 0`/`all` do not apply:
//!   mpirun forwards stdin to rank 0 and tags output with its own
//!   `--tag-output`, which `--mpi-arg` can pass.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use nix::sys::signal::{kill, killpg, Signal};
use nix::unistd::Pid;
use tokio::sync::mpsc;

use crate::exec::guard::Guard;
use crate::exec::job_marker;
use crate::exit::{self, LauncherSignal};
use crate::hostfile::Host;

/// Errors that stop the mpi backend before mpirun starts.
#[derive(Debug, thiserror::Error)]
pub enum MpiError {
    #[error("mpirun not found in PATH\nhint: install Open MPI (Debian and Ubuntu: apt-get install openmpi-bin) or add its bin directory to PATH")]
    NotFound,
    #[error("cannot run {} --version", program.display())]
    Version {
        program: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{} is not Open MPI's mpirun (its --version printed {first_line:?})\nhint: the mpi backend passes Open MPI options; put Open MPI's mpirun first in PATH", program.display())]
    NotOpenMpi { program: PathBuf, first_line: String },
    #[error("--mpi-arg {arg:?}: {reason}")]
    InvalidMpiArg { arg: String, reason: String },
    #[error("Open MPI refuses to run as root\nhint: pass --mpi-arg --allow-run-as-root, or set OMPI_ALLOW_RUN_AS_ROOT=1 and OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 in the launcher's environment")]
    RootNotAllowed,
    #[error("the mpi backend does not support {option}\nhint: {hint}")]
    Unsupported { option: &'static str, hint: &'static str },
    #[error("ssh setting {arg:?} contains whitespace, which mpirun cannot pass to ssh\nhint: use a path or option without spaces, or put the setting in ~/.ssh/config")]
    SshArgWithSpace { arg: String },
}

/// The mpirun found in PATH and the major version of its Open MPI.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Mpirun {
    pub program: PathBuf,
    pub major_version: u32,
}

impl Mpirun {
    /// Finds mpirun in `path` and reads its version.
    pub fn find(path: Option<&std::ffi::OsStr>) -> Result<Mpirun, MpiError> {
        let program = path
            .into_iter()
            .flat_map(std::env::split_paths)
            .map(|dir| dir.join("mpirun"))
            .find(|candidate| is_executable(candidate))
            .ok_or(MpiError::NotFound)?;
        let output = std::process::Command::new(&program)
            .arg("--version")
            .stdin(Stdio::null())
            .output()
            .map_err(|source| MpiError::Version { program: program.clone(), source })?;
        let text = String::from_utf8_lossy(&output.stdout);
        let first_line = text.lines().next().unwrap_or_default().to_string();
        match parse_open_mpi_major(&first_line) {
            Some(major_version) => Ok(Mpirun { program, major_version }),
            None => Err(MpiError::NotOpenMpi { program, first_line }),
        }
    }
}

fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path).is_ok_and(|meta| meta.is_file() && meta.permissions().mode() & 0o111 != 0)
}

/// Reads the major version from a line such as `mpirun (Open MPI) 4.1.4`.
pub fn parse_open_mpi_major(line: &str) -> Option<u32> {
    let version = line.split_once("(Open MPI)")?.1.trim();
    version.split('.').next()?.parse().ok()
}

/// One mpirun invocation: the MPI hostfile's contents and the arguments
/// around `--hostfile FILE`, whose path [`MpiCommand::argv`] fills in.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MpiCommand {
    pub program: PathBuf,
    /// Contents of the MPI hostfile: `host slots=N` lines, in first-appearance order.
    pub hostfile: String,
    /// Arguments before `--hostfile FILE`.
    pub leading_args: Vec<String>,
    /// Arguments after `--hostfile FILE`, ending with `--` and the command.
    pub trailing_args: Vec<String>,
}

impl MpiCommand {
    /// Passes `ssh_args` (such as `-F FILE`) to the ssh that mpirun starts
    /// on remote hosts, through Open MPI's `plm_rsh_args` parameter. Open
    /// MPI splits that value at spaces, so an argument must contain none.
    pub fn add_ssh_args(&mut self, ssh_args: &[String]) -> Result<(), MpiError> {
        if ssh_args.is_empty() {
            return Ok(());
        }
        if let Some(arg) = ssh_args.iter().find(|arg| arg.chars().any(char::is_whitespace)) {
            return Err(MpiError::SshArgWithSpace { arg: arg.clone() });
        }
        self.leading_args.extend(["--mca".to_string(), "plm_rsh_args".to_string(), ssh_args.join(" ")]);
        Ok(())
    }

    /// Returns the full argument list, with the hostfile at `hostfile_path`.
    pub fn argv(&self, hostfile_path: &Path) -> Vec<OsString> {
        let mut argv: Vec<OsString> = vec![self.program.clone().into()];
        argv.extend(self.leading_args.iter().map(OsString::from));
        argv.push("--hostfile".into());
        argv.push(hostfile_path.into());
        argv.extend(self.trailing_args.iter().map(OsString::from));
        argv
    }
}

/// Builds the mpirun command line.
pub fn build(
    mpirun: &Mpirun,
    hosts: &[Host],
    env: &[(String, String)],
    cwd: Option<&Path>,
    mpi_args: &[String],
    command: &[String],
) -> Result<MpiCommand, MpiError> {
    let mut leading_args = Vec::new();
    if mpirun.major_version >= 5 {
        leading_args.extend(["--output".to_string(), ":raw".to_string()]);
    }

    let mut trailing_args = Vec::new();
    if let Some(cwd) = cwd {
        trailing_args.push("--wdir".to_string());
        trailing_args.push(cwd.display().to_string());
    }
    for (key, value) in env {
        trailing_args.push("-x".to_string());
        trailing_args.push(format!("{key}={value}"));
    }
    for arg in mpi_args {
        let words = split_words(arg).map_err(|reason| MpiError::InvalidMpiArg { arg: arg.clone(), reason })?;
        trailing_args.extend(words);
    }
    trailing_args.push("--".to_string());
    trailing_args.extend(command.iter().cloned());

    Ok(MpiCommand {
        program: mpirun.program.clone(),
        hostfile: mpi_hostfile(hosts),
        leading_args,
        trailing_args,
    })
}

/// Writes one `host slots=N` line per distinct host, in order of first appearance.
pub fn mpi_hostfile(hosts: &[Host]) -> String {
    let mut counts: Vec<(&str, usize)> = Vec::new();
    let mut index_of: std::collections::HashMap<&str, usize> = std::collections::HashMap::new();
    for host in hosts {
        match index_of.get(host.ssh.as_str()) {
            Some(&index) => counts[index].1 += 1,
            None => {
                index_of.insert(&host.ssh, counts.len());
                counts.push((&host.ssh, 1));
            }
        }
    }
    counts.iter().map(|(name, count)| format!("{name} slots={count}\n")).collect()
}

/// Checks that Open MPI will run: as root it refuses unless a flag or two
/// environment variables permit it.
pub fn check_root(
    is_root: bool,
    mpi_args: &[String],
    lookup_env: &dyn Fn(&str) -> Option<String>,
) -> Result<(), MpiError> {
    if !is_root {
        return Ok(());
    }
    let flag = mpi_args
        .iter()
        .filter_map(|arg| split_words(arg).ok())
        .flatten()
        .any(|word| word == "--allow-run-as-root" || word == "-allow-run-as-root");
    let env = ["OMPI_ALLOW_RUN_AS_ROOT", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM"]
        .iter()
        .all(|key| lookup_env(key).as_deref() == Some("1"));
    if flag || env {
        Ok(())
    } else {
        Err(MpiError::RootNotAllowed)
    }
}

/// Splits `text` into words as a POSIX shell does, without expansions:
/// whitespace separates words, single quotes keep everything literally,
/// double quotes keep everything but `\"`, `\\`, `\$` and `` \` ``, and a
/// backslash outside quotes keeps the next character.
pub fn split_words(text: &str) -> Result<Vec<String>, String> {
    let mut words = Vec::new();
    let mut word: Option<String> = None;
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        match c {
            ' ' | '\t' | '\n' => {
                if let Some(done) = word.take() {
                    words.push(done);
                }
            }
            '\'' => {
                let current = word.get_or_insert_with(String::new);
                loop {
                    match chars.next() {
                        Some('\'') => break,
                        Some(c) => current.push(c),
                        None => return Err("a single quote is never closed".into()),
                    }
                }
            }
            '"' => {
                let current = word.get_or_insert_with(String::new);
                loop {
                    match chars.next() {
                        Some('"') => break,
                        Some('\\') => match chars.next() {
                            Some(c @ ('"' | '\\' | '$' | '`')) => current.push(c),
                            Some('\n') => {}
                            Some(c) => {
                                current.push('\\');
                                current.push(c);
                            }
                            None => return Err("a double quote is never closed".into()),
                        },
                        Some(c) => current.push(c),
                        None => return Err("a double quote is never closed".into()),
                    }
                }
            }
            '\\' => match chars.next() {
                Some('\n') => {}
                Some(c) => word.get_or_insert_with(String::new).push(c),
                None => return Err("it ends with a backslash that escapes nothing".into()),
            },
            c => word.get_or_insert_with(String::new).push(c),
        }
    }
    words.extend(word);
    Ok(words)
}

/// Settings of one mpirun run.
pub struct RunOptions {
    /// Time mpirun gets to stop its ranks after a forwarded signal, before
    /// the launcher kills mpirun's process group.
    pub grace: Duration,
    pub timeout: Option<Duration>,
    /// Whether mpirun reads the launcher's stdin (it forwards it to rank 0).
    pub stdin: bool,
    /// The `ringleader` binary to start as a [`Guard`] of mpirun's process
    /// group, so a killed launcher does not leave mpirun and its ranks running.
    pub guard_program: Option<PathBuf>,
}

/// Runs mpirun to the end and returns the launcher's exit code: mpirun's
/// own status, 128+N if signal N killed it, or the code of the launcher's
/// own signal or timeout, as [`crate::exit`] states.
pub async fn run(
    command: &MpiCommand,
    options: &RunOptions,
    mut signals: mpsc::UnboundedReceiver<LauncherSignal>,
) -> i32 {
    let hostfile = match write_hostfile(&command.hostfile) {
        Ok(file) => file,
        Err(error) => {
            eprintln!("ringleader: error: cannot write the MPI hostfile: {error}");
            return exit::FAILURE;
        }
    };
    // The job id marks every local process of the job, so processes that
    // leave mpirun's process group are found and stopped too.
    let job_id = job_marker::new_job_id();
    let mut argv = command.argv(hostfile.path());
    argv.splice(1..1, [OsString::from("-x"), OsString::from(job_marker::JOB_ID_VAR)]);
    tracing::debug!(?argv, "starting mpirun");
    let mut child = match tokio::process::Command::new(&argv[0])
        .args(&argv[1..])
        .env(job_marker::JOB_ID_VAR, &job_id)
        .stdin(if options.stdin { Stdio::inherit() } else { Stdio::null() })
        .process_group(0)
        .spawn()
    {
        Ok(child) => child,
        Err(error) => {
            eprintln!("ringleader: error: cannot start {}: {error}", command.program.display());
            return exit::USAGE;
        }
    };
    let pid = Pid::from_raw(child.id().expect("a just-started child has a pid") as i32);
    let guard = options.guard_program.as_deref().and_then(|program| match Guard::start(program, options.grace, Some(&job_id)) {
        Ok(guard) => Some(guard),
        Err(error) => {
            tracing::warn!(%error, "cannot start the guard process; mpirun will keep running if the launcher is killed with SIGKILL");
            None
        }
    });
    if let Some(guard) = &guard {
        guard.watch(pid.as_raw());
        guard.remove_on_failure(hostfile.path());
    }

    let mut interrupted: Option<LauncherSignal> = None;
    let mut timed_out = false;
    let mut kill_at: Option<tokio::time::Instant> = None;
    let timeout_at = options.timeout.map(|t| tokio::time::Instant::now() + t);
    let status = loop {
        tokio::select! {
            status = child.wait() => break status,
            Some(signal) = signals.recv() => {
                if interrupted.is_some() || timed_out {
                    // A second signal kills at once, as for the other backends.
                    let _ = killpg(pid, Signal::SIGKILL);
                } else {
                    eprintln!("ringleader: received {}; forwarding it to mpirun", signal.name());
                    interrupted = Some(signal);
                    let _ = kill(pid, nix_signal(signal));
                    kill_at = Some(tokio::time::Instant::now() + options.grace);
                }
            }
            _ = sleep_until(timeout_at), if !timed_out && interrupted.is_none() => {
                eprintln!("ringleader: --timeout expired; stopping mpirun");
                timed_out = true;
                let _ = kill(pid, Signal::SIGTERM);
                kill_at = Some(tokio::time::Instant::now() + options.grace);
            }
            _ = sleep_until(kill_at) => {
                eprintln!("ringleader: mpirun did not stop within the grace period; killing it");
                let _ = killpg(pid, Signal::SIGKILL);
                kill_at = None;
            }
        }
    };
    // Whatever mpirun left in its process group would outlive the job.
    let _ = killpg(pid, Signal::SIGKILL);
    drop(hostfile);
    for process in job_marker::stop_job_processes(&job_marker::Selector::job(&job_id), options.grace).await {
        eprintln!(
            "ringleader: process {} ({}) had left mpirun's process group and outlived the job; stopped it",
            process.pid, process.command
        );
    }
    if let Some(guard) = &guard {
        guard.release(pid.as_raw());
        guard.done();
    }

    if let Some(signal) = interrupted {
        return signal.exit_code();
    }
    if timed_out {
        return exit::TIMEOUT;
    }
    match status {
        Ok(status) => {
            use std::os::unix::process::ExitStatusExt;
            let termination = match (status.code(), status.signal()) {
                (Some(code), _) => crate::exec::Termination::Exited(code),
                (None, Some(signal)) => crate::exec::Termination::Signaled(signal),
                (None, None) => crate::exec::Termination::Exited(-1),
            };
            if !termination.success() {
                eprintln!("ringleader: mpirun ended with {termination}");
            }
            exit::termination_code(termination)
        }
        Err(error) => {
            eprintln!("ringleader: error: cannot wait for mpirun: {error}");
            exit::FAILURE
        }
    }
}

fn nix_signal(signal: LauncherSignal) -> Signal {
    match signal {
        LauncherSignal::Interrupt => Signal::SIGINT,
        LauncherSignal::Terminate => Signal::SIGTERM,
        LauncherSignal::Hangup => Signal::SIGHUP,
    }
}

async fn sleep_until(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

fn write_hostfile(contents: &str) -> std::io::Result<tempfile::NamedTempFile> {
    use std::io::Write;
    let mut file = tempfile::Builder::new().prefix("ringleader-mpi-hosts-").tempfile()?;
    file.write_all(contents.as_bytes())?;
    file.flush()?;
    Ok(file)
}

/// Finds the name of the MPI library that mpirun's `ompi_info` links
/// against, such as `libmpi.so.40`. MLX reads it from `MLX_MPI_LIBNAME` to
/// load MPI. Returns `None` when `ompi_info`, `ldd` or `otool` is missing.
pub fn mpi_library_name(mpirun: &Path) -> Option<String> {
    let ompi_info = mpirun.with_file_name("ompi_info");
    let lister = if cfg!(target_os = "macos") { ["otool", "-L"] } else { ["ldd", ""] };
    let mut command = std::process::Command::new(lister[0]);
    if !lister[1].is_empty() {
        command.arg(lister[1]);
    }
    let output = command.arg(&ompi_info).stdin(Stdio::null()).output().ok()?;
    let text = String::from_utf8_lossy(&output.stdout);
    let line = text.lines().find(|line| line.contains("libmpi"))?;
    let name = line.split_whitespace().next()?;
    Some(name.trim_start_matches("@rpath/").to_string())
}

#[cfg(test)]
mod tests {

    #[test]
    fn ssh_args_fill_plm_rsh_args() {
        let mut command = MpiCommand {
            program: "mpirun".into(),
            hostfile: String::new(),
            leading_args: Vec::new(),
            trailing_args: Vec::new(),
        };
        command.add_ssh_args(&["-F".into(), "/etc/cfg".into(), "-o".into(), "Port=2222".into()]).unwrap();
        assert_eq!(command.leading_args, ["--mca", "plm_rsh_args", "-F /etc/cfg -o Port=2222"]);

        let error = command.add_ssh_args(&["-F".into(), "/my configs/ssh".into()]).unwrap_err();
        assert!(error.to_string().contains("\"/my configs/ssh\" contains whitespace"), "{error}");
    }

    use super::*;

    fn hosts(names: &[&str]) -> Vec<Host> {
        names.iter().map(|name| Host::named(name.to_string())).collect()
    }

    #[test]
    fn split_words_table() {
        let cases: &[(&str, &[&str])] = &[
            ("", &[]),
            ("   ", &[]),
            ("--bind-to none", &["--bind-to", "none"]),
            ("-x  A=1\t-x B=2", &["-x", "A=1", "-x", "B=2"]),
            ("'two words'", &["two words"]),
            ("\"two words\"", &["two words"]),
            ("a'b c'd", &["ab cd"]),
            ("\"a\\\"b\" 'c\\d'", &["a\"b", "c\\d"]),
            ("\"\\$HOME \\n\"", &["$HOME \\n"]),
            ("a\\ b c", &["a b", "c"]),
            ("''", &[""]),
            ("\"\" x", &["", "x"]),
            ("$HOME `id` *", &["$HOME", "`id`", "*"]),
            ("line\\\ncontinued", &["linecontinued"]),
        ];
        for (text, expected) in cases {
            assert_eq!(split_words(text).unwrap(), *expected, "{text:?}");
        }
    }

    #[test]
    fn split_words_errors() {
        let cases = [
            ("'open", "single quote is never closed"),
            ("\"open", "double quote is never closed"),
            ("\"open\\", "double quote is never closed"),
            ("end\\", "ends with a backslash"),
        ];
        for (text, expected) in cases {
            let error = split_words(text).unwrap_err();
            assert!(error.contains(expected), "{text:?}: {error}");
        }
    }

    #[test]
    fn hostfile_counts_slots_in_first_appearance_order() {
        let text = mpi_hostfile(&hosts(&["b", "a", "b", "b", "a"]));
        assert_eq!(text, "b slots=3\na slots=2\n");
    }

    #[test]
    fn command_translates_every_option() {
        let mpirun = Mpirun { program: "/usr/bin/mpirun".into(), major_version: 4 };
        let env = [("A".to_string(), "x y".to_string())];
        let command = build(
            &mpirun,
            &hosts(&["n1", "n1"]),
            &env,
            Some(Path::new("/work dir")),
            &["--bind-to none".to_string(), "--mca btl 'self,tcp'".to_string()],
            &["python3".to_string(), "-c".to_string(), "print(1)".to_string()],
        )
        .unwrap();
        let argv: Vec<String> = command
            .argv(Path::new("/tmp/h"))
            .into_iter()
            .map(|a| a.into_string().unwrap())
            .collect();
        let expected = [
            "/usr/bin/mpirun", "--hostfile", "/tmp/h", "--wdir", "/work dir", "-x", "A=x y", "--bind-to",
            "none", "--mca", "btl", "self,tcp", "--", "python3", "-c", "print(1)",
        ];
        assert_eq!(argv, expected);
        assert_eq!(command.hostfile, "n1 slots=2\n");
    }

    #[test]
    fn open_mpi_5_gets_raw_output() {
        let mpirun = Mpirun { program: "mpirun".into(), major_version: 5 };
        let command = build(&mpirun, &hosts(&["n1"]), &[], None, &[], &["true".to_string()]).unwrap();
        assert_eq!(command.leading_args, ["--output", ":raw"]);
    }

    #[test]
    fn unbalanced_mpi_arg_is_rejected() {
        let mpirun = Mpirun { program: "mpirun".into(), major_version: 4 };
        let error = build(&mpirun, &hosts(&["n1"]), &[], None, &["--mca 'x".to_string()], &[]).unwrap_err();
        assert_eq!(error.to_string(), "--mpi-arg \"--mca 'x\": a single quote is never closed");
    }

    #[test]
    fn version_line_table() {
        assert_eq!(parse_open_mpi_major("mpirun (Open MPI) 4.1.4"), Some(4));
        assert_eq!(parse_open_mpi_major("mpirun (Open MPI) 5.0.3"), Some(5));
        assert_eq!(parse_open_mpi_major("HYDRA build details:"), None);
        assert_eq!(parse_open_mpi_major(""), None);
    }

    #[test]
    fn root_needs_explicit_permission() {
        let no_env = |_: &str| None;
        let both = |key: &str| key.starts_with("OMPI_ALLOW_RUN_AS_ROOT").then(|| "1".to_string());
        let only_first = |key: &str| (key == "OMPI_ALLOW_RUN_AS_ROOT").then(|| "1".to_string());
        assert!(check_root(false, &[], &no_env).is_ok());
        assert!(check_root(true, &[], &no_env).is_err());
        assert!(check_root(true, &["--oversubscribe --allow-run-as-root".to_string()], &no_env).is_ok());
        assert!(check_root(true, &[], &both).is_ok());
        assert!(check_root(true, &[], &only_first).is_err());
    }
}
