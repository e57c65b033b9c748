//! The POSIX shell scripts that run on the remote host.
//!
//! ssh runs one fixed command, `BOOTSTRAP`, through the user's login shell.
//! It reads a length line and then exactly that many bytes of script from
//! stdin and evaluates them with `/bin/sh`. Sending the script on stdin
//! rather than on ssh's command line means that:
//!
//! - the login shell (bash, zsh, fish, csh) parses only one fixed string
//!   with no backslashes or newlines, which those shells quote differently;
//! - argument and environment values, which may be secrets, do not show up
//!   in the remote host's process list;
//! - large files such as `MLX_HOSTFILE` are not limited by `ARG_MAX`.
//!
//! Every value inside a script goes through [`sh_quote`]. Both scripts wrap
//! their work in a function that is called on the last line, so a script cut
//! short in transit fails to parse instead of running half.
//!
//! Two scripts exist. The *agent* runs once per ssh connection and owns a
//! private directory where each rank registers its process group id. It
//! signals groups on request. It stops every registered group when its stdin
//! reaches EOF (the launcher or the connection died) or when the launcher's
//! heartbeat stops (the network was cut).
//!
//! The *rank* script prepares one rank (files, working directory,
//! environment) and starts it as the leader of a new process group, with
//! `setsid`, or with `perl`'s `setpgrp` where `setsid` is missing (macOS).
//! When the leader exits, the script stops whatever the rank left behind in
//! its group and removes the rank's files.

use crate::exec::job_marker::JOB_ID_VAR;
use std::fmt::Write as _;
use std::time::Duration;

use super::quote::{check_env_name, check_shell_value, sh_quote};
use crate::exec::RankSpec;

/// The command ssh sends to the login shell: read the script from stdin, run it.
pub(super) const BOOTSTRAP: &str = "exec /bin/sh -c 'IFS= read -r n || exit 121; \
     s=$(dd bs=1 count=\"$n\" 2>/dev/null) || exit 121; eval \"$s\"'";

/// Exit status of a rank script that could not set up the rank (temporary file, registration).
pub const EXIT_SETUP_FAILED: i32 = 121;
/// Exit status of a rank script whose working directory is missing or not accessible.
pub const EXIT_CWD_MISSING: i32 = 122;
/// Exit status of a rank script that found neither `setsid` nor `perl` to start a process group.
pub const EXIT_NO_PROCESS_GROUP: i32 = 123;
/// Exit status of a rank script whose command exists but is not executable.
pub const EXIT_NOT_EXECUTABLE: i32 = 126;
/// Exit status of a rank script whose command was not found.
pub const EXIT_COMMAND_NOT_FOUND: i32 = 127;

/// Frames `script` for [`BOOTSTRAP`]: its length in bytes on one line, then the script.
pub(super) fn frame(script: &str) -> Vec<u8> {
    let mut framed = format!("{}\n", script.len()).into_bytes();
    framed.extend_from_slice(script.as_bytes());
    framed
}

/// Formats a duration for `sleep`: whole seconds where possible, else a
/// decimal that GNU, BSD and busybox `sleep` accept.
fn sleep_arg(duration: Duration) -> String {
    let millis = duration.as_millis().max(100);
    if millis % 1000 == 0 {
        (millis / 1000).to_string()
    } else {
        format!("{}.{:03}", millis / 1000, millis % 1000)
    }
}

/// Shell functions both scripts use to stop process groups.
///
/// `rl_stop PGID...` sends SIGTERM to each group, polls for up to `grace`,
/// then sends SIGKILL to the groups still alive. `sleep 0.1` falls back to
/// `sleep 1` on a `sleep` without fractions, which makes the poll coarser but
/// keeps the bound.
///
/// `rl_alive PGID` counts a group whose members are all zombies as gone:
/// where PID 1 does not reap orphans (containers without an init), `kill -0`
/// keeps finding such a group. Without a working `ps` it trusts `kill -0`.
fn stop_functions(grace: Duration) -> String {
    let grace_tenths = grace.as_millis().div_ceil(100);
    format!(
        r#"rl_alive() {{
  kill -s 0 -- "-$1" 2>/dev/null || return 1
  rl_ps=$(ps -A -o pgid= -o stat= 2>/dev/null) && [ -n "$rl_ps" ] || return 0
  printf '%s\n' "$rl_ps" | {{
    while read -r rl_pg rl_st; do
      if [ "$rl_pg" = "$1" ]; then case $rl_st in Z*) ;; *) exit 0 ;; esac; fi
    done
    exit 1
  }}
}}
rl_nap() {{ sleep 0.1 2>/dev/null || sleep 1; }}
rl_any_alive() {{
  for rl_g in "$@"; do rl_alive "$rl_g" && return 0; done
  return 1
}}
rl_stop() {{
  for rl_g in "$@"; do kill -s TERM -- "-$rl_g" 2>/dev/null; done
  rl_t=0
  while [ "$rl_t" -lt {grace_tenths} ] && rl_any_alive "$@"; do rl_nap; rl_t=$((rl_t + 1)); done
  for rl_g in "$@"; do kill -s KILL -- "-$rl_g" 2>/dev/null; done
  rl_t=0
  while [ "$rl_t" -lt 20 ] && rl_any_alive "$@"; do rl_nap; rl_t=$((rl_t + 1)); done
  ! rl_any_alive "$@"
}}
"#
    )
}

/// Defines `rl_stop_escaped JOB_ENTRY RANK_ENTRY`: stops the live processes
/// whose initial environment has both entries (`NAME=value`), as SIGTERM,
/// then SIGKILL after the grace period. They left the rank's process group,
/// and may hold the session's output open. /proc and `grep -z` (GNU or
/// BusyBox) find them; without either, nothing is stopped.
fn stop_escaped_function(grace: Duration) -> String {
    let grace_tenths = grace.as_millis().div_ceil(100);
    format!(
        r#"rl_escaped() {{
  [ -r /proc/self/environ ] || return 0
  grep -l -z -x -F -e "$1" /proc/[0-9]*/environ 2>/dev/null | while read -r rl_file; do
    grep -q -z -x -F -e "$2" "$rl_file" 2>/dev/null || continue
    rl_pid=${{rl_file#/proc/}}
    rl_pid=${{rl_pid%/environ}}
    case $(cat "/proc/$rl_pid/stat" 2>/dev/null) in *") Z "*|"") continue ;; esac
    printf '%s
' "$rl_pid"
  done
}}
rl_stop_escaped() {{
  rl_pids=$(rl_escaped "$1" "$2")
  [ -n "$rl_pids" ] || return 0
  kill -s TERM $rl_pids 2>/dev/null
  rl_t=0
  while [ "$rl_t" -lt {grace_tenths} ] && [ -n "$(rl_escaped "$1" "$2")" ]; do rl_nap; rl_t=$((rl_t + 1)); done
  rl_pids=$(rl_escaped "$1" "$2")
  [ -z "$rl_pids" ] || kill -s KILL $rl_pids 2>/dev/null
  return 0
}}
"#
    )
}

/// Settings the agent script needs.
pub(super) struct AgentParams<'a> {
    /// Prefix of every line the agent writes to stdout.
    pub token: &'a str,
    /// How often the launcher sends a heartbeat, and how many may be missed.
    pub keepalive_interval: Duration,
    pub keepalive_count_max: u32,
    pub grace: Duration,
}

/// Builds the agent script.
///
/// The agent first writes `TOKEN ready DIR`, where DIR is the directory in
/// which each rank registers as `DIR/rank.N`, a file containing its group id.
/// Then it reads one command a line from stdin:
///
/// - `h`: a heartbeat.
/// - `s RANK SIG`: send SIG (INT, TERM or KILL) to the rank's group.
/// - `x RANK`: stop the group (TERM, grace, KILL), then reply
///   `TOKEN dead RANK`, or `TOKEN undead RANK` if the group is still there.
pub(super) fn agent_script(params: &AgentParams<'_>) -> String {
    let token = sh_quote(params.token);
    let interval = sleep_arg(params.keepalive_interval);
    let count = params.keepalive_count_max.max(1);
    let silence = params.keepalive_interval * count;
    let silence_text = sh_quote(&format!("{:.1}", silence.as_secs_f64()));
    let stop = stop_functions(params.grace);
    format!(
        r#"{stop}
rl_groups() {{
  for rl_f in "$rl_dir"/rank.*; do
    [ -f "$rl_f" ] && read -r rl_g < "$rl_f" && [ -n "$rl_g" ] && printf '%s\n' "$rl_g"
  done
}}
rl_stop_all() {{
  set -- $(rl_groups)
  [ "$#" -eq 0 ] || rl_stop "$@"
}}
rl_group_of() {{
  [ -f "$rl_dir/rank.$1" ] && read -r rl_g < "$rl_dir/rank.$1" && [ -n "$rl_g" ] && printf '%s' "$rl_g"
}}
rl_watch_heartbeat() {{
  trap 'kill "$rl_s" 2>/dev/null; exit 0' TERM
  rl_miss=0
  while :; do
    sleep {interval} & rl_s=$!
    wait "$rl_s"
    if [ -e "$rl_dir/heartbeat" ]; then
      rm -f -- "$rl_dir/heartbeat"
      rl_miss=0
    else
      rl_miss=$((rl_miss + 1))
    fi
    if [ "$rl_miss" -ge {count} ]; then
      printf 'ringleader agent: no heartbeat from the launcher for %s s; stopping its ranks on this host\n' {silence_text} >&2
      kill -s TERM "$rl_main" 2>/dev/null
      rl_stop_all
      rm -rf -- "$rl_dir"
      exit 0
    fi
  done
}}
rl_agent() {{
  rl_main=$$
  rl_dir=$(mktemp -d "${{TMPDIR:-/tmp}}/ringleader.XXXXXX") || {{
    echo 'ringleader agent: cannot create a private directory with mktemp -d' >&2
    exit {setup_failed}
  }}
  : > "$rl_dir/heartbeat"
  rl_watch_heartbeat &
  rl_watcher=$!
  printf '%s ready %s\n' {token} "$rl_dir"
  while IFS=' ' read -r rl_cmd rl_a rl_b; do
    case $rl_cmd in
      h) : > "$rl_dir/heartbeat" ;;
      s) rl_g=$(rl_group_of "$rl_a") && kill -s "$rl_b" -- "-$rl_g" 2>/dev/null ;;
      x) (
           if rl_g=$(rl_group_of "$rl_a") && ! rl_stop "$rl_g"; then
             printf '%s undead %s\n' {token} "$rl_a"
           else
             printf '%s dead %s\n' {token} "$rl_a"
           fi
         ) & ;;
    esac
  done
  kill "$rl_watcher" 2>/dev/null
  rl_stop_all
  rm -rf -- "$rl_dir"
}}
rl_agent
"#,
        setup_failed = EXIT_SETUP_FAILED,
    )
}

/// Settings the rank script needs besides the [`RankSpec`].
pub(super) struct RankParams<'a> {
    /// Prefix of the start line the rank's leader writes to stdout before it
    /// runs the command.
    pub token: &'a str,
    /// The agent's registration directory on the remote host.
    pub agent_dir: &'a str,
    pub grace: Duration,
    /// See [`super::SshOptions::job_id`].
    pub job_id: Option<&'a str>,
}

/// Builds the rank script, or returns which value of `spec` cannot be sent.
pub(super) fn rank_script(spec: &RankSpec, params: &RankParams<'_>) -> Result<String, String> {
    check_values(spec)?;

    let mut script = stop_functions(params.grace);
    if params.job_id.is_some() {
        script.push_str(&stop_escaped_function(params.grace));
    }
    let file_count = spec.files.len();

    script.push_str("rl_cleanup() {\n  :\n");
    for index in 0..file_count {
        let _ = writeln!(
            script,
            "  [ -z \"$rl_f{index}\" ] || rm -f -- \"$rl_f{index}\""
        );
    }
    script.push_str("}\n");
    script.push_str("rl_fail() {\n  printf '%s\\n' \"$2\" >&2\n  rl_cleanup\n  exit \"$1\"\n}\n");

    script.push_str("rl_rank() {\n");
    for index in 0..file_count {
        let _ = writeln!(script, "  rl_f{index}=''");
    }
    script.push_str("  rl_umask=$(umask)\n  umask 077\n");
    for (index, file) in spec.files.iter().enumerate() {
        let var = &file.env_var;
        let contents = sh_quote(&file.contents);
        let message = sh_quote(&format!("cannot create the file for {var} with mktemp"));
        let _ = writeln!(
            script,
            "  rl_f{index}=$(mktemp \"${{TMPDIR:-/tmp}}/ringleader.XXXXXX\") || rl_fail {EXIT_SETUP_FAILED} {message}\n  \
             printf '%s' {contents} > \"$rl_f{index}\" || rl_fail {EXIT_SETUP_FAILED} {message}\n  \
             export {var}=\"$rl_f{index}\""
        );
    }
    script.push_str("  umask \"$rl_umask\"\n");

    if let (None, Some(dir)) = (&spec.cwd, &spec.default_cwd) {
        let dir = sh_quote(
            dir.to_str()
                .ok_or("default working directory is not valid UTF-8")?,
        );
        let _ = writeln!(
            script,
            "  if [ -d {dir} ]; then cd -- {dir} 2>/dev/null || :; fi"
        );
    }
    if let Some(cwd) = &spec.cwd {
        let cwd = cwd.to_str().ok_or("working directory is not valid UTF-8")?;
        let message = sh_quote(&format!(
            "working directory {cwd} does not exist or is not accessible on this host"
        ));
        let _ = writeln!(
            script,
            "  cd -- {} 2>/dev/null || rl_fail {EXIT_CWD_MISSING} {message}",
            sh_quote(cwd)
        );
    }

    for (name, value) in &spec.env {
        let _ = writeln!(script, "  export {name}={}", sh_quote(value));
    }

    script.push_str("  set --");
    for arg in &spec.argv {
        script.push(' ');
        script.push_str(&sh_quote(arg));
    }
    script.push('\n');

    let program = &spec.argv[0];
    let not_found = sh_quote(&format!("command not found: {program}"));
    let not_executable = sh_quote(&format!("command is not executable: {program}"));
    let _ = writeln!(
        script,
        r#"  case $1 in
    */*) [ -e "$1" ] || rl_fail {EXIT_COMMAND_NOT_FOUND} {not_found}
         [ -f "$1" ] && [ -x "$1" ] || rl_fail {EXIT_NOT_EXECUTABLE} {not_executable} ;;
    *) command -v "$1" >/dev/null 2>&1 || rl_fail {EXIT_COMMAND_NOT_FOUND} {not_found} ;;
  esac"#
    );

    let registration = sh_quote(&format!("{}/rank.{}", params.agent_dir, spec.rank));
    let token = sh_quote(params.token);
    let leader = sh_quote(&format!(
        "printf '%s\\n' \"$$\" > \"$0.tmp\" && mv -f \"$0.tmp\" \"$0\" || exit {EXIT_SETUP_FAILED}\n\
         printf '%s %s\\n' {token} \"$$\"\n\
         exec \"$@\""
    ));
    let stdin = if spec.stdin { "" } else { " </dev/null" };
    // The job id reaches only the rank: this script's own commands (such as
    // the grep below) must not carry it, or they would find themselves.
    let rank_value = spec.env.iter().rev().find(|(name, _)| name == "MLX_RANK").map(|(_, value)| value.as_str());
    let (mark, stop_escaped) = match (params.job_id, rank_value) {
        (Some(job_id), Some(rank)) => {
            check_shell_value("the job id", job_id)?;
            let job_entry = sh_quote(&format!("{JOB_ID_VAR}={job_id}"));
            let rank_entry = sh_quote(&format!("MLX_RANK={rank}"));
            (
                format!(" export {JOB_ID_VAR}={};", sh_quote(job_id)),
                format!("  rl_stop_escaped {job_entry} {rank_entry}\n"),
            )
        }
        _ => (String::new(), String::new()),
    };
    let no_group =
        sh_quote("cannot start a process group: neither setsid nor perl is installed on this host");
    let _ = writeln!(
        script,
        r#"  rl_reg={registration}
  rl_leader={leader}
  if command -v setsid >/dev/null 2>&1; then
    rl_group_tool=setsid
  elif command -v perl >/dev/null 2>&1; then
    rl_group_tool=perl
  else
    rl_fail {EXIT_NO_PROCESS_GROUP} {no_group}
  fi
  # The shell reports a foreground child killed by a signal ("Terminated")
  # on its own stderr, and dash applies a command's redirections in the
  # waiting shell. So this shell's stderr goes to /dev/null, and a subshell
  # gives the rank the session's stderr (kept as fd 4) before it execs.
  exec 4>&2 2>/dev/null
  if [ "$rl_group_tool" = setsid ]; then
    ( exec 2>&4 4>&-{stdin};{mark} exec setsid /bin/sh -c "$rl_leader" "$rl_reg" "$@" )
  else
    ( exec 2>&4 4>&-{stdin};{mark} exec perl -e 'setpgrp(0, 0) or die "setpgrp: $!\n"; exec {{ $ARGV[0] }} @ARGV or die "exec: $!\n"' /bin/sh -c "$rl_leader" "$rl_reg" "$@" )
  fi
  rl_status=$?
  exec 4>&-
  if [ -f "$rl_reg" ] && read -r rl_group < "$rl_reg" && [ -n "$rl_group" ]; then
    rl_alive "$rl_group" && rl_stop "$rl_group"
    rm -f -- "$rl_reg"
  fi
{stop_escaped}  rl_cleanup
  exit "$rl_status"
}}
rl_rank"#
    );
    Ok(script)
}

/// Checks every value of `spec` that goes into the script.
fn check_values(spec: &RankSpec) -> Result<(), String> {
    if spec.argv.is_empty() {
        return Err("the command is empty".to_owned());
    }
    for (index, arg) in spec.argv.iter().enumerate() {
        check_shell_value(&format!("argument {index}"), arg)?;
    }
    for (name, value) in &spec.env {
        check_env_name(name)?;
        check_shell_value(&format!("environment variable {name}"), value)?;
    }
    for file in &spec.files {
        check_env_name(&file.env_var)?;
        check_shell_value(&format!("the file for {}", file.env_var), &file.contents)?;
    }
    for (what, dir) in [
        ("working directory", &spec.cwd),
        ("default working directory", &spec.default_cwd),
    ] {
        if let Some(dir) = dir {
            let dir = dir
                .to_str()
                .ok_or_else(|| format!("{what} is not valid UTF-8"))?;
            check_shell_value(what, dir)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::exec::{RankFile, SshTarget};
    use std::io::Write;
    use std::process::{Command, Stdio};

    fn sample_spec() -> RankSpec {
        RankSpec {
            rank: 4,
            host: "node".to_owned(),
            ssh: SshTarget::default(),
            argv: vec![
                "sh".to_owned(),
                "-c".to_owned(),
                "ps -o pgid= -p $$; echo \"$GREETING\"".to_owned(),
            ],
            env: vec![("GREETING".to_owned(), "it's $(here)".to_owned())],
            files: vec![RankFile {
                env_var: "MLX_HOSTFILE".to_owned(),
                contents: "[]".into(),
            }],
            cwd: Some("/".into()),
            default_cwd: None,
            stdin: false,
        }
    }

    fn sample_agent() -> String {
        agent_script(&AgentParams {
            token: "rlTEST",
            keepalive_interval: Duration::from_millis(1500),
            keepalive_count_max: 3,
            grace: Duration::from_secs(2),
        })
    }

    /// Runs [`BOOTSTRAP`] locally the way the remote login shell would, with
    /// `script` framed on stdin and `path` as PATH.
    fn run_bootstrap(script: &str, path: &str) -> std::process::Output {
        let mut child = Command::new("/bin/sh")
            .arg("-c")
            .arg(BOOTSTRAP)
            .env("PATH", path)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("/bin/sh runs");
        child
            .stdin
            .take()
            .unwrap()
            .write_all(&frame(script))
            .unwrap();
        child.wait_with_output().unwrap()
    }

    #[test]
    fn scripts_parse_in_dash_and_bash() {
        let rank = rank_script(
            &sample_spec(),
            &RankParams {
                token: "rlTEST",
                agent_dir: "/tmp/x",
                grace: Duration::from_secs(1),
                job_id: Some("42-abc-0"),
            },
        )
        .unwrap();
        for shell in ["dash", "bash"] {
            let Ok(path) = which(shell) else { continue };
            for (name, script) in [("rank", &rank), ("agent", &sample_agent())] {
                let status = Command::new(&path)
                    .arg("-n")
                    .arg("-c")
                    .arg(script)
                    .status()
                    .unwrap();
                assert!(status.success(), "{shell} rejects the {name} script");
            }
        }
    }

    #[test]
    fn rank_gets_its_own_group_through_perl_without_setsid() {
        let Ok(perl) = which("perl") else { return };
        let tools = tempfile::tempdir().unwrap();
        for tool in ["sh", "mktemp", "mv", "rm", "sleep", "dd", "ps", "cat"] {
            let target = which(tool).unwrap_or_else(|_| panic!("{tool} installed"));
            std::os::unix::fs::symlink(target, tools.path().join(tool)).unwrap();
        }
        std::os::unix::fs::symlink(perl, tools.path().join("perl")).unwrap();
        let agent_dir = tempfile::tempdir().unwrap();
        let script = rank_script(
            &sample_spec(),
            &RankParams {
                token: "rlTEST",
                agent_dir: agent_dir.path().to_str().unwrap(),
                grace: Duration::from_secs(1),
                job_id: None,
            },
        )
        .unwrap();

        let output = run_bootstrap(&script, tools.path().to_str().unwrap());

        let stdout = String::from_utf8_lossy(&output.stdout);
        assert!(
            output.status.success(),
            "stderr: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        let mut lines = stdout.lines();
        let start = lines.next().expect("start line");
        let leader: u32 = start
            .strip_prefix("rlTEST ")
            .expect("token prefix")
            .parse()
            .unwrap();
        let group: u32 = lines.next().expect("pgid line").trim().parse().unwrap();
        assert_eq!(group, leader, "the rank leads its own process group");
        assert_eq!(lines.next(), Some("it's $(here)"));
        assert!(
            std::fs::read_dir(agent_dir.path())
                .unwrap()
                .next()
                .is_none(),
            "registration left behind"
        );
    }

    fn which(program: &str) -> Result<std::path::PathBuf, ()> {
        let path = std::env::var_os("PATH").ok_or(())?;
        std::env::split_paths(&path)
            .map(|dir| dir.join(program))
            .find(|candidate| candidate.is_file())
            .ok_or(())
    }
}
