//! A real OpenSSH `sshd` on 127.0.0.1 for tests, with its own host key,
//! client key and an ssh config of host aliases that all reach it.
//!
//! sshd runs as the current user in the foreground (`-D`), accepts only the
//! generated client key, and is killed by PID when the fixture is dropped,
//! together with the session processes it started. The client config keeps
//! strict host-key checking on, with the generated host key as the only
//! known host, and never reads `~/.ssh`.

#![allow(dead_code)]

use std::collections::HashMap;
use std::fs;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// How long sshd may take to start listening.
const STARTUP_TIMEOUT: Duration = Duration::from_secs(10);

/// Aliases that reach the fixture's sshd with the right keys.
pub const HOST_ALIASES: [&str; 4] = ["host-a", "host-b", "host-c", "host-d"];
/// An alias whose port has no listener.
pub const CLOSED_PORT_ALIAS: &str = "closed-port";
/// An alias whose known_hosts contains a different host key.
pub const WRONG_HOST_KEY_ALIAS: &str = "wrong-hostkey";
/// An alias that offers a client key the sshd does not accept.
pub const UNAUTHORIZED_KEY_ALIAS: &str = "unauthorized-key";
/// An alias whose config sets a RemoteCommand and a LocalForward that must
/// fail when bound twice, as an interactive-login config might.
pub const BUSY_CONFIG_ALIAS: &str = "busy-config";
/// An alias whose known_hosts file starts empty.
pub const UNKNOWN_HOST_KEY_ALIAS: &str = "unknown-hostkey";
/// An alias whose config sets its own ControlMaster and ControlPath
/// (`user-mux-%C` in the fixture directory).
pub const USER_MULTIPLEX_ALIAS: &str = "user-mux";

pub struct Sshd {
    dir: tempfile::TempDir,
    child: Child,
    port: u16,
}

/// One line of `ps`.
#[derive(Clone, Debug)]
pub struct Process {
    pub pid: u32,
    pub ppid: u32,
    pub pgid: u32,
    pub args: String,
}

impl Sshd {
    /// Generates keys and configs in a temporary directory and starts sshd.
    pub fn start() -> Sshd {
        let dir = tempfile::Builder::new()
            .prefix("ringleader-sshd-")
            .tempdir()
            .expect("create the sshd fixture directory");
        let path = dir.path();
        for key in [
            "host_key",
            "other_host_key",
            "client_key",
            "unauthorized_key",
        ] {
            keygen(&path.join(key));
        }
        fs::copy(path.join("client_key.pub"), path.join("authorized_keys"))
            .expect("write authorized_keys");
        // Remote sessions get this empty HOME, so the login shell reads none
        // of this machine's startup files.
        fs::create_dir(path.join("home")).expect("create the remote HOME");

        let port = free_port();
        let closed_port = free_port();
        write_sshd_config(path, port);
        write_known_hosts(path, "host_key.pub", "known_hosts", port);
        write_known_hosts(path, "other_host_key.pub", "other_known_hosts", port);
        write_client_config(path, port, closed_port);
        fs::write(path.join("empty_known_hosts"), "").expect("write empty_known_hosts");

        if nix::unistd::geteuid().is_root() {
            // sshd running as root needs its privilege separation directory.
            fs::create_dir_all("/run/sshd").expect("create /run/sshd");
        }
        let log = path.join("sshd.log");
        let child = Command::new(sshd_program())
            .arg("-D")
            .arg("-f")
            .arg(path.join("sshd_config"))
            .arg("-E")
            .arg(&log)
            .stdin(Stdio::null())
            .spawn()
            .expect("start sshd (install openssh-server)");
        let sshd = Sshd { dir, child, port };
        sshd.wait_until_listening(&log);
        sshd
    }

    /// Returns the path of the ssh client config, to pass as `-F`.
    pub fn config_file(&self) -> PathBuf {
        self.dir.path().join("ssh_config")
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Returns the fixture's directory (keys, configs, the user-mux socket).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Returns the path of the client key that sshd accepts.
    pub fn client_key(&self) -> PathBuf {
        self.dir.path().join("client_key")
    }

    /// Reads the sshd log, for failure messages.
    pub fn log(&self) -> String {
        fs::read_to_string(self.dir.path().join("sshd.log")).unwrap_or_default()
    }

    /// Processes started under this sshd (its sessions and everything they run).
    pub fn descendants(&self) -> Vec<Process> {
        descendants_of(self.pid())
    }

    fn wait_until_listening(&self, log: &Path) {
        let deadline = Instant::now() + STARTUP_TIMEOUT;
        loop {
            let text = fs::read_to_string(log).unwrap_or_default();
            if text.contains("Server listening on") {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "sshd did not listen within {STARTUP_TIMEOUT:?}; its log:\n{text}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Sshd {
    fn drop(&mut self) {
        let sessions = self.descendants();
        let _ = self.child.kill();
        let _ = self.child.wait();
        for process in sessions {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(process.pid as i32),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
    }
}

/// Lists all live processes, from `ps`. Zombies count as dead: where PID 1
/// does not reap orphans, they linger after the processes ended.
pub fn processes() -> Vec<Process> {
    let output = Command::new("ps")
        .args(["-eo", "pid=,ppid=,pgid=,stat=,args="])
        .output()
        .expect("run ps");
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .filter_map(|line| {
            let mut fields = line.split_whitespace();
            let pid = fields.next()?.parse().ok()?;
            let ppid = fields.next()?.parse().ok()?;
            let pgid = fields.next()?.parse().ok()?;
            if fields.next()?.starts_with('Z') {
                return None;
            }
            let args = fields.collect::<Vec<_>>().join(" ");
            Some(Process {
                pid,
                ppid,
                pgid,
                args,
            })
        })
        .collect()
}

/// Processes whose process group id is `pgid`.
pub fn processes_in_group(pgid: u32) -> Vec<Process> {
    processes()
        .into_iter()
        .filter(|process| process.pgid == pgid)
        .collect()
}

/// Lists every process below `root` in the process tree.
pub fn descendants_of(root: u32) -> Vec<Process> {
    let all = processes();
    let mut children: HashMap<u32, Vec<&Process>> = HashMap::new();
    for process in &all {
        children.entry(process.ppid).or_default().push(process);
    }
    let mut found = Vec::new();
    let mut stack = vec![root];
    while let Some(pid) = stack.pop() {
        for child in children.get(&pid).into_iter().flatten() {
            found.push((*child).clone());
            stack.push(child.pid);
        }
    }
    found
}

fn sshd_program() -> PathBuf {
    ["/usr/sbin/sshd", "/usr/local/sbin/sshd", "/sbin/sshd"]
        .iter()
        .map(PathBuf::from)
        .find(|path| path.exists())
        .unwrap_or_else(|| PathBuf::from("sshd"))
}

fn keygen(path: &Path) {
    let status = Command::new("ssh-keygen")
        .args([
            "-q",
            "-t",
            "ed25519",
            "-N",
            "",
            "-C",
            "ringleader-test",
            "-f",
        ])
        .arg(path)
        .stdin(Stdio::null())
        .status()
        .expect("run ssh-keygen (install openssh-client)");
    assert!(status.success(), "ssh-keygen failed for {}", path.display());
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .expect("bind a free loopback port")
        .port()
}

/// Returns the name of the user the tests (and sshd) run as.
pub fn user_name() -> String {
    nix::unistd::User::from_uid(nix::unistd::geteuid())
        .ok()
        .flatten()
        .map(|user| user.name)
        .expect("current user has a name")
}

fn write_sshd_config(dir: &Path, port: u16) {
    let dir = dir.display();
    let config = format!(
        "Port {port}
ListenAddress 127.0.0.1
HostKey {dir}/host_key
AuthorizedKeysFile {dir}/authorized_keys
PubkeyAuthentication yes
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
StrictModes no
PidFile none
PrintMotd no
PrintLastLog no
PermitRootLogin prohibit-password
AllowUsers {user}
SetEnv HOME={dir}/home
",
        user = user_name()
    );
    fs::write(format!("{dir}/sshd_config"), config).expect("write sshd_config");
}

fn write_known_hosts(dir: &Path, public_key: &str, file: &str, port: u16) {
    let key = fs::read_to_string(dir.join(public_key)).expect("read public host key");
    let entry = format!("[127.0.0.1]:{port} {}", key.trim());
    fs::write(dir.join(file), entry + "\n").expect("write known_hosts");
}

fn write_client_config(dir: &Path, port: u16, closed_port: u16) {
    // ssh keeps the first value it finds for each option, so the specific
    // blocks come before the shared one.
    let path = dir.display();
    let config = format!(
        "Host {WRONG_HOST_KEY_ALIAS}
  UserKnownHostsFile {path}/other_known_hosts
Host {CLOSED_PORT_ALIAS}
  Port {closed_port}
Host {UNAUTHORIZED_KEY_ALIAS}
  IdentityFile {path}/unauthorized_key
Host {UNKNOWN_HOST_KEY_ALIAS}
  UserKnownHostsFile {path}/empty_known_hosts
Host {BUSY_CONFIG_ALIAS}
  RemoteCommand echo remote-command-ran
  LocalForward 127.0.0.1:{forward_port} 127.0.0.1:9
  ExitOnForwardFailure yes
Host {USER_MULTIPLEX_ALIAS}
  ControlMaster auto
  ControlPath {path}/user-mux-%C
  ControlPersist no
Host host-* {WRONG_HOST_KEY_ALIAS} {CLOSED_PORT_ALIAS} {USER_MULTIPLEX_ALIAS} {UNKNOWN_HOST_KEY_ALIAS} {BUSY_CONFIG_ALIAS}
  IdentityFile {path}/client_key
Host *
  HostName 127.0.0.1
  Port {port}
  User {user}
  IdentitiesOnly yes
  IdentityAgent none
  UserKnownHostsFile {path}/known_hosts
  GlobalKnownHostsFile /dev/null
  StrictHostKeyChecking yes
  CheckHostIP no
",
        user = user_name(),
        forward_port = free_port(),
    );
    fs::write(dir.join("ssh_config"), config).expect("write ssh_config");
}

/// Helpers that drive `ringleader::exec::ssh` against the fixture.
pub mod drive {
    use std::time::Duration;

    use ringleader::exec::ssh::SshOptions;
    use ringleader::exec::{RankSpec, Spawned, SshTarget, Termination};
    use tokio::io::AsyncReadExt;

    use super::Sshd;

    /// Grace period in the tests' options.
    pub const GRACE: Duration = Duration::from_secs(1);
    /// Heartbeat interval and count in the tests' options.
    pub const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(1);
    pub const KEEPALIVE_COUNT_MAX: u32 = 2;

    /// Options pointing at the fixture's config, with short timers.
    pub fn options(sshd: &Sshd) -> SshOptions {
        SshOptions {
            config_file: Some(sshd.config_file()),
            connect_timeout: Duration::from_secs(5),
            keepalive_interval: KEEPALIVE_INTERVAL,
            keepalive_count_max: KEEPALIVE_COUNT_MAX,
            grace: GRACE,
            ..SshOptions::default()
        }
    }

    /// Upper bound on the time the remote agent takes to stop a rank on its
    /// own, plus a margin for a loaded machine.
    pub fn watchdog_bound() -> Duration {
        KEEPALIVE_INTERVAL * (KEEPALIVE_COUNT_MAX + 1) + GRACE + Duration::from_secs(5)
    }

    pub fn spec(rank: usize, host: &str, argv: &[&str]) -> RankSpec {
        RankSpec {
            rank,
            host: host.to_owned(),
            ssh: SshTarget::default(),
            argv: argv.iter().map(|arg| arg.to_string()).collect(),
            env: Vec::new(),
            files: Vec::new(),
            cwd: None,
            default_cwd: None,
            stdin: false,
        }
    }

    /// Everything a finished rank produced.
    #[derive(Debug)]
    pub struct Finished {
        pub stdout: Vec<u8>,
        pub stderr: Vec<u8>,
        pub termination: Termination,
    }

    impl Finished {
        pub fn stdout_text(&self) -> String {
            String::from_utf8_lossy(&self.stdout).into_owned()
        }

        pub fn stderr_text(&self) -> String {
            String::from_utf8_lossy(&self.stderr).into_owned()
        }
    }

    /// Reads both output streams to the end and waits for the rank.
    pub async fn run_to_end(spawned: Spawned) -> Finished {
        let Spawned {
            mut stdout,
            mut stderr,
            wait,
            ..
        } = spawned;
        let mut out = Vec::new();
        let mut err = Vec::new();
        let (read_out, read_err, termination) = tokio::join!(
            stdout.read_to_end(&mut out),
            stderr.read_to_end(&mut err),
            wait
        );
        read_out.expect("read stdout");
        read_err.expect("read stderr");
        Finished {
            stdout: out,
            stderr: err,
            termination: termination.expect("rank ended with a known status"),
        }
    }

    /// Polls `condition` every 50 ms until it is true or `timeout` passes.
    pub async fn eventually(timeout: Duration, mut condition: impl FnMut() -> bool) -> bool {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if condition() {
                return true;
            }
            if tokio::time::Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}
