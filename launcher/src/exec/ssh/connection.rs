//! Links: one ssh connection per host and slot, each running the agent
//! script, and (when multiplexing) acting as ControlMaster for rank sessions.

use std::collections::hash_map::{DefaultHasher, HashMap};
use std::ffi::OsString;
use std::hash::{BuildHasher, Hasher};
use std::io;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::process::{Child, ChildStdin, Command};
use tokio::sync::{mpsc, oneshot, OnceCell, OwnedSemaphorePermit, Semaphore};

use super::quote::{validate_host, validate_user};
use super::script::{self, AgentParams, BOOTSTRAP};
use super::{lock, SshOptions, UnconfirmedRank};
use crate::exec::{RankSpec, SpawnError};

/// Maximum bytes of ssh log or stderr text kept for an error message.
const MAX_MESSAGE_BYTES: usize = 8 * 1024;

/// State shared by every rank the spawner starts.
pub(super) struct Pool {
    pub(super) options: SshOptions,
    /// `-F`, `-o` options shared by every ssh invocation.
    pub(super) common_args: Vec<OsString>,
    /// Random prefix of the agent's and the ranks' protocol lines.
    pub(super) token: String,
    /// Private (0700) directory for control sockets and ssh log files.
    pub(super) private_dir: tempfile::TempDir,
    hosts: Mutex<HashMap<String, Arc<HostEntry>>>,
    /// Handshake limits per server (`hostname:port` after ssh config).
    servers: Mutex<HashMap<String, Arc<Semaphore>>>,
    pub(super) unconfirmed: Mutex<Vec<UnconfirmedRank>>,
    next_id: AtomicUsize,
}

impl Pool {
    pub(super) fn new(options: SshOptions) -> io::Result<Pool> {
        let private_dir = tempfile::Builder::new().prefix("rl-ssh-").tempdir()?;
        Ok(Pool {
            common_args: options.common_args(),
            options,
            token: random_token(),
            private_dir,
            hosts: Mutex::new(HashMap::new()),
            servers: Mutex::new(HashMap::new()),
            unconfirmed: Mutex::new(Vec::new()),
            next_id: AtomicUsize::new(0),
        })
    }

    pub(super) fn next_id(&self) -> usize {
        self.next_id.fetch_add(1, Ordering::Relaxed)
    }

    /// Time from starting ssh until the remote command must have started.
    pub(super) fn start_deadline(&self) -> std::time::Duration {
        self.options.connect_timeout + self.options.start_timeout
    }

    /// Returns the entry for the spec's host and login, creating it on first use.
    fn host_entry(&self, spec: &RankSpec) -> Result<Arc<HostEntry>, String> {
        validate_host(&spec.host).map_err(|error| error.to_string())?;
        if let Some(user) = &spec.ssh.user {
            validate_user(user).map_err(|error| error.to_string())?;
        }
        let key = format!(
            "{}\0{:?}\0{:?}\0{:?}",
            spec.host, spec.ssh.user, spec.ssh.port, spec.ssh.identity
        );
        let mut hosts = lock(&self.hosts);
        let entry = hosts.entry(key).or_insert_with(|| {
            Arc::new(HostEntry {
                host: spec.host.clone(),
                target_args: target_args(spec),
                resolved: OnceCell::new(),
                links: Mutex::new(Vec::new()),
            })
        });
        Ok(entry.clone())
    }

    /// Finds or opens a link with room for one more rank session on the spec's host.
    pub(super) async fn acquire(&self, spec: &RankSpec) -> Result<Session, SpawnError> {
        let ssh_error = |message: String| ssh_spawn_error(spec, &self.options, message);
        let entry = self
            .host_entry(spec)
            .map_err(|message| SpawnError::InvalidSpec {
                rank: spec.rank,
                host: spec.host.clone(),
                message,
            })?;
        let resolved = entry
            .resolved
            .get_or_init(|| self.resolve(&entry))
            .await
            .clone()
            .map_err(ssh_error)?;

        let (link, permit) = entry.link_with_room(self, resolved.ours_to_multiplex);
        let agent = link
            .agent
            .get_or_init(|| link.connect(self, &entry, &resolved.handshakes))
            .await
            .clone()
            .map_err(ssh_error)?;

        // Without our ControlMaster every rank session is a handshake of its own.
        let handshake = if link.control_path.is_none() {
            Some(
                resolved
                    .handshakes
                    .clone()
                    .acquire_owned()
                    .await
                    .expect("semaphore never closed"),
            )
        } else {
            None
        };
        Ok(Session {
            host_args: entry.target_args.clone(),
            control_path: link.control_path.clone(),
            agent,
            room: permit,
            handshake,
        })
    }

    /// Reads the effective ssh config for the host (`ssh -G`): whether the
    /// user's config sets a ControlPath, and which server it reaches.
    async fn resolve(&self, entry: &HostEntry) -> Result<Resolved, String> {
        let output = Command::new(&self.options.program)
            .args(&self.common_args)
            .args(&entry.target_args)
            .arg("-G")
            .arg("--")
            .arg(&entry.host)
            .stdin(Stdio::null())
            .process_group(0)
            .kill_on_drop(true)
            .output()
            .await
            .map_err(|error| format!("cannot run {}: {error}", self.options.program.display()))?;
        if !output.status.success() {
            return Err(format!(
                "ssh rejected its configuration: {}",
                clip(&String::from_utf8_lossy(&output.stderr))
            ));
        }

        let config = String::from_utf8_lossy(&output.stdout);
        let value_of = |key: &str| {
            config.lines().find_map(|line| {
                let (name, value) = line.split_once(' ')?;
                (name == key).then(|| value.trim().to_owned())
            })
        };
        let user_control_path = value_of("controlpath").is_some_and(|path| path != "none");
        if user_control_path {
            tracing::debug!(host = %entry.host, "ssh config sets a ControlPath; leaving multiplexing to it");
        }

        // Aliases of one server share its handshake limit, since sshd's MaxStartups counts them together.
        let server = format!(
            "{}:{}",
            value_of("hostname").unwrap_or_else(|| entry.host.clone()),
            value_of("port").unwrap_or_default()
        );
        let handshakes = lock(&self.servers)
            .entry(server)
            .or_insert_with(|| Arc::new(Semaphore::new(self.options.max_startups_per_host.max(1))))
            .clone();
        Ok(Resolved {
            ours_to_multiplex: self.options.multiplex && !user_control_path,
            handshakes,
        })
    }
}

/// The parts of a host's effective ssh config (`ssh -G`) that the spawner uses.
#[derive(Clone)]
struct Resolved {
    /// Whether the links to this host are our ControlMasters.
    ours_to_multiplex: bool,
    /// Limits concurrent ssh handshakes to the server behind the host.
    handshakes: Arc<Semaphore>,
}

/// Connections to one host with one login (user, port, identity).
struct HostEntry {
    host: String,
    /// `-l`, `-p`, `-i` from the hostfile entry.
    target_args: Vec<OsString>,
    /// The host's effective ssh config, read once.
    resolved: OnceCell<Result<Resolved, String>>,
    links: Mutex<Vec<Arc<Link>>>,
}

impl HostEntry {
    /// Takes a slot on an existing link, or adds a new link.
    fn link_with_room(&self, pool: &Pool, multiplex: bool) -> (Arc<Link>, OwnedSemaphorePermit) {
        let mut links = lock(&self.links);
        // A link whose connection has died cannot signal new ranks, so it gets no more.
        links.retain(|link| !matches!(link.agent.get(), Some(Ok(agent)) if !agent.is_alive()));
        for link in links.iter() {
            if let Ok(permit) = link.room.clone().try_acquire_owned() {
                return (link.clone(), permit);
            }
        }
        let id = pool.next_id();
        let (room, control_path) = if multiplex {
            let sessions = pool.options.max_sessions_per_connection.max(1);
            (
                sessions,
                Some(pool.private_dir.path().join(format!("cm-{id}"))),
            )
        } else {
            (Semaphore::MAX_PERMITS, None)
        };
        let link = Arc::new(Link {
            id,
            control_path,
            room: Arc::new(Semaphore::new(room)),
            agent: OnceCell::new(),
        });
        links.push(link.clone());
        let permit = link
            .room
            .clone()
            .try_acquire_owned()
            .expect("new link has room");
        (link, permit)
    }
}

/// A rank's place on a link, held until its ssh session ends.
pub(super) struct Session {
    pub(super) host_args: Vec<OsString>,
    /// Our ControlMaster socket, when multiplexing.
    pub(super) control_path: Option<PathBuf>,
    pub(super) agent: Arc<Agent>,
    /// One of the link's session slots.
    pub(super) room: OwnedSemaphorePermit,
    /// A handshake slot, held until the rank has started (only without multiplexing).
    pub(super) handshake: Option<OwnedSemaphorePermit>,
}

/// One ssh connection running the agent script.
struct Link {
    id: usize,
    control_path: Option<PathBuf>,
    /// Free rank-session slots on this connection.
    room: Arc<Semaphore>,
    agent: OnceCell<Result<Arc<Agent>, String>>,
}

impl Link {
    /// Starts the link's ssh process and waits for the agent's ready line.
    async fn connect(
        &self,
        pool: &Pool,
        entry: &HostEntry,
        handshakes: &Semaphore,
    ) -> Result<Arc<Agent>, String> {
        let _handshake = handshakes.acquire().await.expect("semaphore never closed");
        let log_path = pool
            .private_dir
            .path()
            .join(format!("link-{}.log", self.id));
        let mut command = Command::new(&pool.options.program);
        if let Some(path) = &self.control_path {
            command
                .args(["-o", "ControlMaster=yes", "-o"])
                .arg(control_path_option(path))
                .args(["-o", "ControlPersist=no"]);
        }
        command
            .args(&pool.common_args)
            .args(&entry.target_args)
            .arg("-E")
            .arg(&log_path)
            .args(["-T", "--"])
            .arg(&entry.host)
            .arg(BOOTSTRAP)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            // Out of the launcher's process group, so Ctrl-C on the terminal
            // reaches the launcher, which forwards it, and not ssh itself.
            .process_group(0)
            .kill_on_drop(true);
        let mut child = command
            .spawn()
            .map_err(|error| format!("cannot run {}: {error}", pool.options.program.display()))?;
        tracing::debug!(host = %entry.host, link = self.id, "opening ssh link");

        let agent_script = script::agent_script(&AgentParams {
            token: &pool.token,
            keepalive_interval: pool.options.keepalive_interval,
            keepalive_count_max: pool.options.keepalive_count_max,
            grace: pool.options.grace,
        });
        let mut stdin = child.stdin.take().expect("stdin is piped");
        let stdout = child.stdout.take().expect("stdout is piped");
        let stderr = child.stderr.take().expect("stderr is piped");
        let mut lines = BufReader::new(stdout).lines();
        let ready_prefix = format!("{} ready ", pool.token);

        let handshake = async {
            stdin.write_all(&script::frame(&agent_script)).await.ok()?;
            while let Ok(Some(line)) = lines.next_line().await {
                if let Some(dir) = line.strip_prefix(&ready_prefix) {
                    return Some(dir.to_owned());
                }
            }
            None
        };
        let dir = match tokio::time::timeout(pool.start_deadline(), handshake).await {
            Ok(Some(dir)) => dir,
            Ok(None) => {
                return Err(collect_exit(&mut child, &log_path, stderr)
                    .await
                    .ssh_message())
            }
            Err(_) => {
                let _ = child.start_kill();
                let _ = child.wait().await;
                return Err(format!(
                    "timed out after {} s waiting for the ssh connection and the remote shell",
                    pool.start_deadline().as_secs()
                ));
            }
        };

        let (commands, receiver) = mpsc::unbounded_channel();
        let state = Arc::new(AgentState {
            alive: AtomicBool::new(true),
            acks: Mutex::new(HashMap::new()),
        });
        let task = LinkTask {
            host: entry.host.clone(),
            token: pool.token.clone(),
            heartbeat_period: pool.options.keepalive_interval / 2,
            state: state.clone(),
            log_path,
        };
        tokio::spawn(log_agent_stderr(entry.host.clone(), stderr));
        tokio::spawn(task.run(child, stdin, lines, receiver));
        tracing::debug!(host = %entry.host, link = self.id, %dir, "ssh link ready");
        Ok(Arc::new(Agent {
            dir,
            commands,
            state,
        }))
    }
}

/// Describes an ssh failure before the rank started, with a hint to try ssh
/// by hand with the same config file.
pub(super) fn ssh_spawn_error(spec: &RankSpec, options: &SshOptions, message: String) -> SpawnError {
    let config = match &options.config_file {
        Some(path) => format!("-F {} ", crate::shell::quote(&path.to_string_lossy())),
        None => String::new(),
    };
    SpawnError::Ssh {
        rank: spec.rank,
        host: spec.host.clone(),
        message: format!(
            "{message}\nhint: check that `ssh {config}{} true` works with the same ssh options",
            crate::shell::quote(&spec.host)
        ),
    }
}

/// `ControlPath=PATH` with `%` doubled, since ssh expands `%` tokens there.
pub(super) fn control_path_option(path: &Path) -> OsString {
    let mut option = OsString::from("ControlPath=");
    option.push(path.to_string_lossy().replace('%', "%%"));
    option
}

/// The launcher's handle on a link's remote agent.
pub(super) struct Agent {
    /// The agent's registration directory on the remote host.
    pub(super) dir: String,
    /// Command lines for the agent (see [`script::agent_script`]).
    commands: mpsc::UnboundedSender<String>,
    state: Arc<AgentState>,
}

/// State shared by the link task and the agent handles.
struct AgentState {
    /// False once the link's ssh process or the agent has gone.
    alive: AtomicBool,
    /// Waiters for the agent's reply to `x RANK`.
    acks: Mutex<HashMap<usize, oneshot::Sender<bool>>>,
}

impl Agent {
    pub(super) fn is_alive(&self) -> bool {
        self.state.alive.load(Ordering::SeqCst)
    }

    /// Asks the agent to send `signal` (INT, TERM or KILL) to the rank's group.
    pub(super) fn signal(&self, rank: usize, signal: &str) -> bool {
        self.is_alive() && self.commands.send(format!("s {rank} {signal}\n")).is_ok()
    }

    /// Asks the agent to stop the rank's group (TERM, grace, KILL), without
    /// waiting for its reply.
    pub(super) fn request_stop(&self, rank: usize) {
        let _ = self.commands.send(format!("x {rank}\n"));
    }

    /// Asks the agent to stop the rank's group (TERM, grace, KILL) and waits
    /// up to `timeout` for it to confirm that the group is gone.
    pub(super) async fn stop_and_confirm(&self, rank: usize, timeout: std::time::Duration) -> bool {
        let (sender, receiver) = oneshot::channel();
        lock(&self.state.acks).insert(rank, sender);
        if !self.is_alive() || self.commands.send(format!("x {rank}\n")).is_err() {
            lock(&self.state.acks).remove(&rank);
            return false;
        }
        matches!(tokio::time::timeout(timeout, receiver).await, Ok(Ok(true)))
    }
}

/// The task that owns a link's ssh process: forwards commands, sends
/// heartbeats and reads the agent's replies until either side goes away.
struct LinkTask {
    host: String,
    token: String,
    heartbeat_period: std::time::Duration,
    state: Arc<AgentState>,
    /// ssh's own messages (`-E`), shown when the connection closes unexpectedly.
    log_path: PathBuf,
}

impl LinkTask {
    async fn run(
        self,
        mut child: Child,
        mut stdin: ChildStdin,
        mut lines: tokio::io::Lines<BufReader<tokio::process::ChildStdout>>,
        mut commands: mpsc::UnboundedReceiver<String>,
    ) {
        let mut heartbeat = tokio::time::interval(
            self.heartbeat_period
                .max(std::time::Duration::from_millis(100)),
        );
        // True when every handle on the agent is gone, the normal way to close.
        let released = loop {
            tokio::select! {
                command = commands.recv() => {
                    let Some(command) = command else { break true };
                    if stdin.write_all(command.as_bytes()).await.is_err() {
                        break false;
                    }
                }
                _ = heartbeat.tick() => {
                    if stdin.write_all(b"h\n").await.is_err() {
                        break false;
                    }
                }
                line = lines.next_line() => match line {
                    Ok(Some(line)) => self.handle_reply(&line),
                    _ => break false,
                },
            }
        };

        if !released {
            let log = read_log(&self.log_path);
            let detail = if log.trim().is_empty() {
                String::new()
            } else {
                format!(" ({})", clip(&log))
            };
            tracing::warn!(
                host = %self.host,
                "ssh connection to {} closed{detail}; the remote agent stops the ranks it carried",
                self.host
            );
        }
        self.state.alive.store(false, Ordering::SeqCst);
        for (_, waiter) in lock(&self.state.acks).drain() {
            let _ = waiter.send(false);
        }
        drop(stdin);
        let status = child.wait().await;
        tracing::debug!(host = %self.host, ?status, "ssh link closed");
    }

    fn handle_reply(&self, line: &str) {
        let Some(reply) = line.strip_prefix(&self.token) else {
            return;
        };
        let mut words = reply.split_whitespace();
        let confirmed = match words.next() {
            Some("dead") => true,
            Some("undead") => false,
            _ => return,
        };
        if let Some(rank) = words.next().and_then(|word| word.parse::<usize>().ok()) {
            if let Some(waiter) = lock(&self.state.acks).remove(&rank) {
                let _ = waiter.send(confirmed);
            }
        }
    }
}

/// Forwards what the remote agent writes to stderr (its watchdog notices) to the log.
async fn log_agent_stderr(host: String, stderr: tokio::process::ChildStderr) {
    let mut lines = BufReader::new(stderr).lines();
    while let Ok(Some(line)) = lines.next_line().await {
        tracing::warn!(%host, "{line}");
    }
}

/// How an ssh process that failed to start its command ended.
pub(super) struct SshExit {
    /// Exit status of ssh, which is the remote command's unless it is 255.
    pub(super) code: Option<i32>,
    /// The exit status or signal in words.
    pub(super) status: String,
    /// ssh's log (its own messages, from `-E`) and stderr, trimmed and clipped.
    pub(super) output: String,
}

impl SshExit {
    /// Describes an ssh failure: `ssh failed (STATUS): OUTPUT`.
    pub(super) fn ssh_message(&self) -> String {
        if self.output.is_empty() {
            format!("ssh failed ({})", self.status)
        } else {
            format!("ssh failed ({}): {}", self.status, self.output)
        }
    }
}

/// Waits for a failed ssh process (killing it after 5 s) and collects its
/// exit status, its log file and its stderr.
pub(super) async fn collect_exit(
    child: &mut Child,
    log_path: &Path,
    stderr: tokio::process::ChildStderr,
) -> SshExit {
    let status = match tokio::time::timeout(std::time::Duration::from_secs(5), child.wait()).await {
        Ok(status) => status,
        Err(_) => {
            let _ = child.start_kill();
            child.wait().await
        }
    };
    let stderr_text = read_clipped(stderr).await;
    let log_text = read_log(log_path);
    let texts: Vec<String> = [log_text, stderr_text]
        .iter()
        .map(|text| text.trim())
        .filter(|text| !text.is_empty())
        .map(clip)
        .collect();
    let (code, status) = match status {
        Ok(status) => (status.code(), describe_status(status)),
        Err(error) => (None, format!("cannot wait for ssh: {error}")),
    };
    SshExit {
        code,
        status,
        output: texts.join("\n"),
    }
}

pub(super) fn describe_status(status: std::process::ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (Some(code), _) => format!("exit status {code}"),
        (None, Some(signal)) => format!("ssh killed by signal {signal}"),
        _ => status.to_string(),
    }
}

/// Reads ssh's log file (`-E`), empty if it does not exist.
pub(super) fn read_log(path: &Path) -> String {
    std::fs::read(path)
        .map(|bytes| String::from_utf8_lossy(&bytes).into_owned())
        .unwrap_or_default()
}

pub(super) async fn read_clipped(reader: impl tokio::io::AsyncRead + Unpin) -> String {
    let mut bytes = Vec::new();
    let mut limited = reader.take(MAX_MESSAGE_BYTES as u64 * 4);
    let read = limited.read_to_end(&mut bytes);
    let _ = tokio::time::timeout(std::time::Duration::from_secs(2), read).await;
    String::from_utf8_lossy(&bytes).into_owned()
}

/// Keeps the end of a long message, where ssh puts its conclusion.
pub(super) fn clip(text: &str) -> String {
    let text = text.trim();
    if text.len() <= MAX_MESSAGE_BYTES {
        return text.to_owned();
    }
    let mut start = text.len() - MAX_MESSAGE_BYTES;
    while !text.is_char_boundary(start) {
        start += 1;
    }
    format!("...{}", &text[start..])
}

/// `-l`, `-p` and `-i` for a hostfile entry's login fields.
fn target_args(spec: &RankSpec) -> Vec<OsString> {
    let mut args = Vec::new();
    if let Some(user) = &spec.ssh.user {
        args.push("-l".into());
        args.push(user.into());
    }
    if let Some(port) = spec.ssh.port {
        args.push("-p".into());
        args.push(port.to_string().into());
    }
    if let Some(identity) = &spec.ssh.identity {
        args.push("-i".into());
        args.push(identity.into());
    }
    args
}

/// 128 random bits as hex, from the standard library's randomly seeded hasher.
fn random_token() -> String {
    let state = std::collections::hash_map::RandomState::new();
    let mut token = String::from("rl");
    for salt in 0..2u64 {
        let mut hasher: DefaultHasher = state.build_hasher();
        hasher.write_u64(salt);
        hasher.write_u128(
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap_or_default()
                .as_nanos(),
        );
        token.push_str(&format!("{:016x}", hasher.finish()));
    }
    token
}
