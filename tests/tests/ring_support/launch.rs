//! Running real processes for the ring tests: the `ringleader` binary, the
//! Rust interop rank, MLX's Python in a virtualenv.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// MLX version the interop test pins.
pub const MLX_VERSION: &str = "0.32.4";

/// Upper bound on one launched job; reaching it means a hang.
pub const JOB_LIMIT: Duration = Duration::from_secs(180);

pub fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

fn target_dir() -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace().join("target"));
    if target.is_relative() {
        workspace().join(target)
    } else {
        target
    }
}

fn cargo_build(args: &[&str]) {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let status = Command::new(cargo)
        .arg("build")
        .arg("--quiet")
        .args(args)
        .current_dir(workspace())
        .status()
        .expect("cargo can be started");
    assert!(status.success(), "cargo build {args:?} failed");
}

/// Returns the path of a binary of the launcher package (`ringleader`,
/// `ringleader-bench`), building them once per test process.
pub fn launcher_bin(name: &str) -> PathBuf {
    static BUILT: OnceLock<()> = OnceLock::new();
    BUILT.get_or_init(|| cargo_build(&["-p", "ringleader", "--bins"]));
    target_dir().join("debug").join(name)
}

/// Returns the path of the Rust interop rank
/// (tests/examples/ring_interop_rank.rs), built once per test process.
pub fn interop_rank_bin() -> PathBuf {
    static BUILT: OnceLock<()> = OnceLock::new();
    BUILT
        .get_or_init(|| cargo_build(&["-p", "ringleader-tests", "--example", "ring_interop_rank"]));
    target_dir().join("debug/examples/ring_interop_rank")
}

/// Picks a first ring port for one job, so that concurrent tests and test
/// processes rarely share ports. Blocks of 96 ports from 6000 to 11760 stay
/// below the ports the launcher tests use and below the ephemeral range.
pub fn port_base() -> u16 {
    static COUNTER: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let n = COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let block = std::process::id().wrapping_mul(7).wrapping_add(n * 13) % 60;
    (6000 + block * 96) as u16
}

/// A finished job.
#[derive(Debug)]
pub struct Finished {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
    pub elapsed: Duration,
}

/// Runs `command` with output captured, echoing the command, its output and
/// status; kills it (SIGTERM, then SIGKILL) and panics after `limit`.
pub fn run_with_limit(command: &mut Command, limit: Duration) -> Finished {
    println!("$ {command:?}");
    let started = Instant::now();
    let out = tempfile::tempfile().unwrap();
    let err = tempfile::tempfile().unwrap();
    let mut child = command
        .stdin(Stdio::null())
        .stdout(out.try_clone().unwrap())
        .stderr(err.try_clone().unwrap())
        .spawn()
        .expect("the command can be started");

    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if started.elapsed() > limit {
            let pid = nix::unistd::Pid::from_raw(child.id() as i32);
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
            let grace = Instant::now();
            while child.try_wait().unwrap().is_none() && grace.elapsed() < Duration::from_secs(10) {
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = child.kill();
            let _ = child.wait();
            println!("--- output so far:\n{}\n{}", read_all(&out), read_all(&err));
            panic!("command did not finish within {limit:?}");
        }
        // Polling interval; the limit above bounds the wait.
        std::thread::sleep(Duration::from_millis(20));
    };
    let finished = Finished {
        status,
        stdout: read_all(&out),
        stderr: read_all(&err),
        elapsed: started.elapsed(),
    };
    println!("--- stdout\n{}", abbreviate(&finished.stdout));
    println!("--- stderr\n{}", abbreviate(&finished.stderr));
    println!("--- {:?} after {:?}", finished.status, finished.elapsed);
    finished
}

fn read_all(file: &File) -> String {
    use std::io::{Read, Seek};
    let mut file = file.try_clone().unwrap();
    file.rewind().unwrap();
    let mut text = String::new();
    let _ = file.read_to_string(&mut text);
    text
}

fn abbreviate(text: &str) -> String {
    const SHOWN: usize = 6000;
    if text.len() <= SHOWN {
        return text.to_string();
    }
    let cut = text
        .char_indices()
        .nth(SHOWN)
        .map_or(text.len(), |(i, _)| i);
    format!("{}\n[... {} more bytes]", &text[..cut], text.len() - cut)
}

/// Returns the Python interpreter with `mlx[cpu]==0.32.4`:
/// `RINGLEADER_TEST_PYTHON`, else `<repo>/.cache/mlx-venv/bin/python`. The
/// venv is created when missing, once, under a lock that concurrent test
/// processes share.
pub fn mlx_python() -> PathBuf {
    static PYTHON: OnceLock<PathBuf> = OnceLock::new();
    PYTHON
        .get_or_init(|| {
            if let Some(python) = std::env::var_os("RINGLEADER_TEST_PYTHON") {
                return PathBuf::from(python);
            }
            let cache = workspace().join(".cache");
            std::fs::create_dir_all(&cache).unwrap();
            let lock = File::create(cache.join("mlx-venv.lock")).unwrap();
            let _held = nix::fcntl::Flock::lock(lock, nix::fcntl::FlockArg::LockExclusive)
                .map_err(|(_, errno)| errno)
                .expect("the venv lock file can be locked");

            let venv = cache.join("mlx-venv");
            let python = venv.join("bin/python");
            if has_mlx(&python) {
                return python;
            }
            println!("creating {} with mlx[cpu]=={MLX_VERSION}", venv.display());
            let _ = std::fs::remove_dir_all(&venv);
            let created = Command::new("python3")
                .args(["-m", "venv"])
                .arg(&venv)
                .status();
            assert!(
                created.is_ok_and(|s| s.success()),
                "python3 -m venv {} failed",
                venv.display()
            );
            let installed = Command::new(&python)
                .args([
                    "-m",
                    "pip",
                    "install",
                    "--quiet",
                    &format!("mlx[cpu]=={MLX_VERSION}"),
                ])
                .status();
            assert!(
                installed.is_ok_and(|s| s.success()),
                "pip install mlx[cpu]=={MLX_VERSION} failed"
            );
            assert!(
                has_mlx(&python),
                "{} cannot import mlx {MLX_VERSION}",
                python.display()
            );
            python
        })
        .clone()
}

fn has_mlx(python: &Path) -> bool {
    Command::new(python)
        .args(["-c", "import mlx.core as mx; print(mx.__version__)"])
        .output()
        .is_ok_and(|out| {
            out.status.success() && String::from_utf8_lossy(&out.stdout).trim() == MLX_VERSION
        })
}
