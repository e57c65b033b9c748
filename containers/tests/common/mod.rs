//! Helpers shared by the container tests.
//!
//! Every test that needs Docker starts with `require_docker!()`. Without a
//! reachable engine such a test fails with the engine error, unless
//! `RINGLEADER_SKIP_DOCKER=1` is set, in which case it returns early and
//! prints that it was skipped.

#![allow(dead_code)]

use std::future::Future;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;
use std::time::Duration;

use ringleader_containers::{Cluster, ClusterOptions};
use tokio::sync::{Mutex, MutexGuard};

/// Environment variable that turns Docker tests into no-ops.
pub const SKIP_DOCKER_ENV: &str = "RINGLEADER_SKIP_DOCKER";

/// Return early from a test when Docker tests are switched off.
#[macro_export]
macro_rules! require_docker {
    () => {
        if common::docker_tests_skipped() {
            return;
        }
    };
}

/// Returns whether `RINGLEADER_SKIP_DOCKER=1` is set, and says so for the
/// current test (the test harness names each test's thread after the test).
pub fn docker_tests_skipped() -> bool {
    let skipped = std::env::var(SKIP_DOCKER_ENV).is_ok_and(|value| value == "1");
    if skipped {
        let test = std::thread::current().name().unwrap_or("test").to_string();
        eprintln!("{test}: skipped because {SKIP_DOCKER_ENV}=1");
    }
    skipped
}

/// Start a cluster, or panic with the error, its causes and its hint.
pub async fn start_cluster(options: ClusterOptions) -> Cluster {
    match Cluster::start_with(options).await {
        Ok(cluster) => cluster,
        Err(error) => panic!("cluster failed to start: {}", error_chain(&error)),
    }
}

/// Format `error` with its chain of causes, one per line.
pub fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(&format!("\n  caused by: {cause}"));
        source = cause.source();
    }
    text
}

/// Hold this while a test owns a cluster. Clusters of one test binary then
/// run one at a time, so timing bounds are not skewed by a neighbour
/// starting containers on the same two cores.
pub async fn exclusive() -> MutexGuard<'static, ()> {
    static LOCK: OnceLock<Mutex<()>> = OnceLock::new();
    LOCK.get_or_init(|| Mutex::new(())).lock().await
}

/// Poll `check` every 100 ms until it returns `Some`, or panic naming `what`
/// after `timeout`.
pub async fn poll_until<T, F, Fut>(what: &str, timeout: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if let Some(value) = check().await {
            return value;
        }
        if tokio::time::Instant::now() >= deadline {
            panic!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Run `command`, echo it with its output and exit status, and return the output.
pub fn run_echoed(command: &mut Command) -> Output {
    eprintln!("$ {command:?}");
    let output = command.output().unwrap_or_else(|error| panic!("failed to run {command:?}: {error}"));
    eprintln!("exit status: {}", output.status);
    if !output.stdout.is_empty() {
        eprintln!("stdout:\n{}", String::from_utf8_lossy(&output.stdout));
    }
    if !output.stderr.is_empty() {
        eprintln!("stderr:\n{}", String::from_utf8_lossy(&output.stderr));
    }
    output
}

/// Returns the cargo target directory this test binary was built into.
pub fn target_dir() -> PathBuf {
    // <target>/debug/deps/<test binary>
    let exe = std::env::current_exe().expect("the test binary has a path");
    exe.parent()
        .and_then(Path::parent)
        .and_then(Path::parent)
        .expect("test binaries live in <target>/<profile>/deps")
        .to_path_buf()
}

/// Returns the profile directory (`<target>/debug`) that contains the workspace binaries.
pub fn profile_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("the test binary has a path");
    exe.parent().and_then(Path::parent).expect("test binaries live in <target>/<profile>/deps").to_path_buf()
}

/// Build `binary` of `package` into this test's target directory (once per
/// process) and return its path.
pub fn workspace_binary(package: &str, binary: &str) -> PathBuf {
    static BUILT: OnceLock<std::sync::Mutex<Vec<String>>> = OnceLock::new();
    let built = BUILT.get_or_init(Default::default);
    let mut built = built.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    let path = profile_dir().join(binary);
    if built.iter().any(|name| name == binary) {
        return path;
    }

    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR")).join("../Cargo.toml");
    let mut command = Command::new(cargo);
    command
        .args(["build", "--quiet", "-p", package, "--bin", binary, "--manifest-path"])
        .arg(&manifest)
        .env("CARGO_TARGET_DIR", target_dir());
    let output = run_echoed(&mut command);
    assert!(output.status.success(), "building {binary} failed; see the output above");
    built.push(binary.to_string());
    path
}

/// Returns the Python the MLX tests use: `RINGLEADER_TEST_PYTHON`, else
/// `<repo>/.cache/mlx-venv/bin/python`, else `/opt/mlx-venv/bin/python`.
pub fn test_python() -> PathBuf {
    if let Some(python) = std::env::var_os("RINGLEADER_TEST_PYTHON") {
        return PathBuf::from(python);
    }
    // Resolve the repository, not the interpreter: `bin/python` is a symlink
    // to the base interpreter, which would run without the venv's packages.
    if let Ok(repo) = std::fs::canonicalize(Path::new(env!("CARGO_MANIFEST_DIR")).join("..")) {
        let repo_venv = repo.join(".cache/mlx-venv/bin/python");
        if repo_venv.exists() {
            return repo_venv;
        }
    }
    PathBuf::from("/opt/mlx-venv/bin/python")
}
