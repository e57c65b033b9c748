//! Checks made before any rank starts, so that mistakes cost an exit code 2
//! and a clear message instead of a half-started job.

use std::ffi::OsStr;
use std::io;
use std::net::{SocketAddr, TcpListener};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use crate::exec::RankSpec;
use crate::hostfile::is_local_name;
use crate::plan::LaunchPlan;

/// A problem found before launch.
#[derive(Debug, thiserror::Error)]
pub enum PreflightError {
    #[error("--cwd {}: {reason}\nhint: pass an existing directory", path.display())]
    Cwd { path: PathBuf, reason: String },
    #[error("command not found: {command:?} is not in PATH\nhint: give the full path or fix PATH")]
    CommandNotFound { command: String },
    #[error("command {} is not executable\nhint: chmod +x it, or run it through its interpreter (for example --python python3)", path.display())]
    NotExecutable { path: PathBuf },
    #[error("command {} does not exist", path.display())]
    CommandMissing { path: PathBuf },
    #[error("command {} is a directory, not a program", path.display())]
    CommandIsDirectory { path: PathBuf },
    #[error("command {}: its interpreter {interpreter} (from its #! line) does not exist\nhint: install it or fix the script's first line", path.display())]
    MissingInterpreter { path: PathBuf, interpreter: String },
    #[error("ring port {port} of rank {rank} ({address}) is already in use\nhint: another job may be running; choose other ports with --starting-port")]
    PortBusy { rank: usize, port: u16, address: String },
    #[error("--output-dir {}: {reason}\nhint: pass a directory you can write to, or one that can be created", path.display())]
    OutputDir {
        path: PathBuf,
        reason: &'static str,
        #[source]
        source: Option<io::Error>,
    },
}

/// Runs every check that applies to ranks on this machine.
pub fn check(plan: &LaunchPlan, output_dir: Option<&Path>) -> Result<(), PreflightError> {
    let local: Vec<&RankSpec> = plan.ranks.iter().filter(|r| is_local_name(&r.host)).collect();
    if let Some(spec) = local.first() {
        check_cwd(spec)?;
        check_command(spec)?;
    }
    if plan.ranks.len() > 1 {
        check_ring_ports(plan)?;
    }
    if let Some(dir) = output_dir {
        check_output_dir(dir)?;
        remove_stale_rank_files(dir, plan.ranks.len());
    }
    Ok(())
}

/// Removes `rank-N.stdout` and `rank-N.stderr` files of ranks this job does
/// not have (N at least `ranks`), left by an earlier, larger job, so DIR
/// contains this job's output only. The files of this job's ranks are
/// replaced when the ranks start.
fn remove_stale_rank_files(dir: &Path, ranks: usize) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(rank) = name
            .to_str()
            .and_then(|name| name.strip_prefix("rank-"))
            .and_then(|rest| rest.strip_suffix(".stdout").or_else(|| rest.strip_suffix(".stderr")))
            .and_then(|number| number.parse::<usize>().ok())
        else {
            continue;
        };
        if rank >= ranks {
            if let Err(error) = std::fs::remove_file(entry.path()) {
                tracing::debug!(file = %entry.path().display(), %error, "cannot remove an earlier job's rank file");
            }
        }
    }
}

/// Creates the output directory if needed and checks that files can be
/// created in it, with a probe file that is removed at once.
fn check_output_dir(dir: &Path) -> Result<(), PreflightError> {
    let error = |reason, source| PreflightError::OutputDir {
        path: dir.to_path_buf(),
        reason,
        source,
    };
    if dir.exists() && !dir.is_dir() {
        return Err(error("exists and is not a directory", None));
    }
    std::fs::create_dir_all(dir).map_err(|source| error("cannot create the directory", Some(source)))?;
    tempfile::Builder::new()
        .prefix(".ringleader-probe-")
        .tempfile_in(dir)
        .map_err(|source| error("cannot create files in the directory", Some(source)))?;
    Ok(())
}

fn check_cwd(spec: &RankSpec) -> Result<(), PreflightError> {
    let Some(cwd) = &spec.cwd else {
        return Ok(());
    };
    let reason = match std::fs::metadata(cwd) {
        Ok(meta) if meta.is_dir() => return Ok(()),
        Ok(_) => "is not a directory".to_string(),
        Err(error) if error.kind() == io::ErrorKind::NotFound => "does not exist".to_string(),
        Err(error) => error.to_string(),
    };
    Err(PreflightError::Cwd { path: cwd.clone(), reason })
}

/// Resolves the command as execvp would: a name with a `/` is a path
/// (relative to the rank's directory), anything else is looked up in PATH.
fn check_command(spec: &RankSpec) -> Result<(), PreflightError> {
    let Some(program) = spec.argv.first() else {
        return Err(PreflightError::CommandNotFound { command: String::new() });
    };
    if program.contains('/') {
        let mut path = PathBuf::from(program);
        if path.is_relative() {
            if let Some(dir) = spec.cwd.as_ref().or(spec.default_cwd.as_ref()) {
                path = dir.join(path);
            }
        }
        return match std::fs::metadata(&path) {
            Ok(meta) if meta.is_dir() => Err(PreflightError::CommandIsDirectory { path }),
            Ok(meta) if meta.is_file() && meta.permissions().mode() & 0o111 != 0 => check_interpreter(&path),
            Ok(_) => Err(PreflightError::NotExecutable { path }),
            Err(_) => Err(PreflightError::CommandMissing { path }),
        };
    }

    let path_var = spec
        .env
        .iter()
        .find(|(key, _)| key == "PATH")
        .map(|(_, value)| value.clone().into())
        .or_else(|| std::env::var_os("PATH"))
        .unwrap_or_default();
    let mut found_not_executable = None;
    for dir in std::env::split_paths(&path_var) {
        let candidate = dir.join(OsStr::new(program));
        if let Ok(meta) = std::fs::metadata(&candidate) {
            if meta.is_file() && meta.permissions().mode() & 0o111 != 0 {
                return check_interpreter(&candidate);
            }
            found_not_executable.get_or_insert(candidate);
        }
    }
    match found_not_executable {
        Some(path) => Err(PreflightError::NotExecutable { path }),
        None => Err(PreflightError::CommandNotFound { command: program.clone() }),
    }
}

/// Checks that a script's `#!` interpreter exists, since exec would report
/// a missing interpreter as if the script itself were missing.
fn check_interpreter(path: &Path) -> Result<(), PreflightError> {
    let mut head = [0u8; 256];
    let Ok(n) = std::fs::File::open(path).and_then(|mut file| std::io::Read::read(&mut file, &mut head)) else {
        return Ok(());
    };
    let Some(line) = head[..n].strip_prefix(b"#!") else {
        return Ok(());
    };
    let line = line.split(|&b| b == b'\n').next().unwrap_or_default();
    let line = String::from_utf8_lossy(line);
    let Some(interpreter) = line.split_whitespace().next() else {
        return Ok(());
    };
    if Path::new(interpreter).is_absolute() && !Path::new(interpreter).exists() {
        return Err(PreflightError::MissingInterpreter {
            path: path.to_path_buf(),
            interpreter: interpreter.to_string(),
        });
    }
    Ok(())
}

/// Tries to bind every ring address of every local rank. Only "address in
/// use" is an error; other bind failures are left for the rank to report.
fn check_ring_ports(plan: &LaunchPlan) -> Result<(), PreflightError> {
    for (rank, addresses) in plan.ring_table.iter().enumerate() {
        if !is_local_name(&plan.ranks[rank].host) {
            continue;
        }
        for address in addresses {
            let Ok(socket) = address.parse::<SocketAddr>() else {
                continue;
            };
            if let Err(error) = TcpListener::bind(socket) {
                if error.kind() == io::ErrorKind::AddrInUse {
                    return Err(PreflightError::PortBusy {
                        rank,
                        port: socket.port(),
                        address: address.clone(),
                    });
                }
                tracing::debug!(%address, %error, "cannot test-bind ring address");
            }
        }
    }
    Ok(())
}

/// Returns a warning when rank 0 runs on this machine and its MASTER_PORT is
/// already in use there. The ring never binds that port, but PyTorch's
/// rendezvous and other programs that read it listen on it, so the launch
/// goes ahead with a warning instead of an error.
pub fn master_port_warning(plan: &LaunchPlan) -> Option<String> {
    let rank0 = plan.ranks.first().filter(|rank| is_local_name(&rank.host))?;
    let value = |name: &str| rank0.env.iter().rev().find(|(key, _)| key == name).map(|(_, value)| value.clone());
    let port: u16 = value("MASTER_PORT")?.parse().ok()?;
    let address = value("MASTER_ADDR")?;
    let ip = address.parse().unwrap_or(std::net::IpAddr::from([127, 0, 0, 1]));
    match TcpListener::bind((ip, port)) {
        Err(error) if error.kind() == io::ErrorKind::AddrInUse => Some(format!(
            "MASTER_PORT {port} is already in use on {address}: a program that listens there \
             (PyTorch's rendezvous, for example) will fail to start\nhint: choose other ports with --starting-port"
        )),
        _ => None,
    }
}
