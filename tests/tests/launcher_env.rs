//! The per-rank environment, argument passing and input errors, through the real binary.

use std::os::unix::fs::PermissionsExt;

use ringleader_tests::{ringleader, run, test_port_base};

/// Runs `ringleader ARGS -- sh -c SCRIPT` and returns its output.
fn launch(args: &[&str], script: &str) -> ringleader_tests::Output {
    let mut command = ringleader(args);
    command.args(["--", "sh", "-c", script]);
    run(&mut command, b"")
}

/// Parses "KEY=VALUE" lines of one rank, prefixed by "<rank>:".
fn env_of(text: &str, rank: usize) -> std::collections::BTreeMap<String, String> {
    text.lines()
        .filter_map(|line| line.strip_prefix(&format!("{rank}:")))
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

#[test]
fn environment_contract_is_set_for_every_rank() {
    let port = test_port_base();
    let script = r#"for k in MLX_RANK MLX_WORLD_SIZE RANK WORLD_SIZE LOCAL_RANK LOCAL_WORLD_SIZE MASTER_ADDR MASTER_PORT MLX_RING_VERBOSE; do eval "echo $MLX_RANK:$k=\$$k"; done
echo "$MLX_RANK:HOSTFILE_CONTENT=$(cat "$MLX_HOSTFILE")"
echo "$MLX_RANK:HOSTFILE_MODE=$(stat -c %a "$MLX_HOSTFILE")"
echo "$MLX_RANK:HOSTFILE_PATH=$MLX_HOSTFILE""#;
    let output = launch(&["-n", "3", "-p", &port.to_string(), "--verbose"], script);
    assert_eq!(output.code(), Some(0));
    let text = output.stdout_text();
    let table = format!(r#"[["127.0.0.1:{}"],["127.0.0.1:{}"],["127.0.0.1:{}"]]"#, port, port + 1, port + 2);
    for rank in 0..3 {
        let env = env_of(&text, rank);
        let expected = [
            ("MLX_RANK", rank.to_string()),
            ("RANK", rank.to_string()),
            ("LOCAL_RANK", rank.to_string()),
            ("MLX_WORLD_SIZE", "3".to_string()),
            ("WORLD_SIZE", "3".to_string()),
            ("LOCAL_WORLD_SIZE", "3".to_string()),
            ("MASTER_ADDR", "127.0.0.1".to_string()),
            ("MASTER_PORT", (port + 3).to_string()),
            ("MLX_RING_VERBOSE", "1".to_string()),
            ("HOSTFILE_CONTENT", table.clone()),
            ("HOSTFILE_MODE", "600".to_string()),
        ];
        for (key, value) in expected {
            assert_eq!(env.get(key), Some(&value), "{key} of rank {rank}");
        }
        let path = &env["HOSTFILE_PATH"];
        assert!(!std::path::Path::new(path).exists(), "rank {rank}'s hostfile {path} was not removed");
    }
}

#[test]
fn one_rank_job_gets_no_hostfile() {
    let output = launch(&[], r#"echo "rank=$MLX_RANK size=$MLX_WORLD_SIZE hostfile=${MLX_HOSTFILE-unset}""#);
    assert_eq!(output.stdout_text(), "rank=0 size=1 hostfile=unset\n");
}

/// A launcher started inside another job's rank inherits its MLX_HOSTFILE.
#[test]
fn inherited_hostfile_never_reaches_ranks() {
    let script = r#"echo "$MLX_RANK:${MLX_HOSTFILE-unset}""#;
    for ranks in ["1", "2"] {
        let mut command = ringleader(["-n", ranks, "--", "sh", "-c", script]);
        command.env("MLX_HOSTFILE", "/outer/job/hostfile");
        let output = run(&mut command, b"");

        assert_eq!(output.code(), Some(0), "{}", output.stderr_text());
        let stdout = output.stdout_text();
        assert!(!stdout.contains("/outer/job/hostfile"), "-n {ranks}: {stdout}");
        if ranks == "1" {
            assert_eq!(stdout, "0:unset\n");
        }
    }
}

#[test]
fn env_flags_set_and_forward_values() {
    let dir = tempfile::tempdir().unwrap();
    let hostfile = dir.path().join("hosts.json");
    std::fs::write(&hostfile, r#"{"envs": ["FROM_FILE=file", "BOTH=file"], "hosts": [{"ssh": "127.0.0.1", "ips": ["127.0.0.1"]}]}"#).unwrap();
    let mut command = ringleader(["--hostfile", hostfile.to_str().unwrap(), "--env", "BOTH=cli", "--env", "FORWARDED"]);
    command
        .env("FORWARDED", "launcher value")
        .args(["--", "sh", "-c", r#"echo "$FROM_FILE|$BOTH|$FORWARDED""#]);
    let output = run(&mut command, b"");
    assert_eq!(output.stdout_text(), "file|cli|launcher value\n");
}

#[test]
fn hostile_arguments_env_and_cwd_arrive_byte_identical() {
    let dir = tempfile::tempdir().unwrap();
    let cwd = dir.path().join("dir with 'quotes' $(touch pwned) `id`\nline");
    std::fs::create_dir(&cwd).unwrap();
    let canary = dir.path().join("pwned");
    let hostile = [
        "plain",
        "two words",
        "it's",
        "\"double\"",
        "$(touch pwned)",
        "`touch pwned`",
        "new\nline",
        "a=b=c",
        "--verbose",
        "$HOME",
        "",
    ];
    let value = "v '$(touch pwned)' `touch pwned` \"\n=x";
    // The records contain newlines, so the launcher may interleave the two
    // ranks' lines on its stdout; each rank's output file keeps its bytes.
    let logs = dir.path().join("logs");
    let mut command = ringleader(["-n", "2", "--cwd", cwd.to_str().unwrap(), "--env", &format!("HOSTILE={value}")]);
    command.args(["--output-dir", logs.to_str().unwrap(), "--"]);
    command.args(["sh", "-c", r#"printf '%s\0' "$(pwd)" "$HOSTILE" "$@""#, "sh"]).args(hostile);
    let output = run(&mut command, b"");
    assert_eq!(output.code(), Some(0));

    let mut expected = Vec::new();
    for field in [cwd.to_str().unwrap(), value].into_iter().chain(hostile) {
        expected.extend_from_slice(field.as_bytes());
        expected.push(0);
    }
    for rank in 0..2 {
        let received = std::fs::read(logs.join(format!("rank-{rank}.stdout"))).unwrap();
        assert_eq!(received, expected, "rank {rank}");
    }
    assert_eq!(output.stdout.len(), 2 * expected.len() + 1, "the launcher's stdout holds both records plus one newline between them");
    assert!(!canary.exists(), "a value was executed by a shell");
    assert!(!cwd.join("pwned").exists(), "a value was executed by a shell");
}

#[test]
fn invalid_input_exits_2_with_a_clear_message() {
    let dir = tempfile::tempdir().unwrap();
    let write = |name: &str, text: &str| {
        let path = dir.path().join(name);
        std::fs::write(&path, text).unwrap();
        path.to_str().unwrap().to_string()
    };
    let empty = write("empty.json", "");
    let broken = write("broken.json", "[{\"ssh\": \"127.0.0.1\"},");
    let no_ssh = write("no_ssh.json", "[{\"ssh\": \"127.0.0.1\"}, {\"ips\": [\"127.0.0.1\"]}]");
    let bad_ip = write("bad_ip.json", "[{\"ssh\": \"127.0.0.1\", \"ips\": [\"not-an-ip\"]}]");
    let no_ips = write("no_ips.json", "[{\"ssh\": \"127.0.0.1\", \"ips\": []}, {\"ssh\": \"127.0.0.1\", \"ips\": []}]");
    let script = write("script.sh", "echo hi\n");
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o644)).unwrap();
    // root may write to a directory with mode 0555, but no user may write to /proc/1.
    let read_only = if nix::unistd::geteuid().is_root() {
        "/proc/1".to_string()
    } else {
        let path = dir.path().join("read-only");
        std::fs::create_dir(&path).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o555)).unwrap();
        path.to_str().unwrap().to_string()
    };

    let cases: Vec<(Vec<&str>, &str)> = vec![
        (vec!["--hosts", "a,,b", "true"], "host 1 is empty"),
        (vec!["--hosts", "-oProxyCommand=x", "true"], "starts with '-'"),
        (vec!["--hostfile", "/nonexistent/hosts.json", "true"], "cannot read hostfile /nonexistent/hosts.json"),
        (vec!["--hostfile", &empty, "true"], "the file is empty"),
        (vec!["--hostfile", &broken, "true"], "is not valid JSON"),
        (vec!["--hostfile", &no_ssh, "true"], "host 1: field \"ssh\" is missing"),
        (vec!["--hostfile", &bad_ip, "true"], "field \"ips\" contains \"not-an-ip\""),
        (vec!["no-such-command-ringleader"], "command not found: \"no-such-command-ringleader\""),
        (vec![&script], "is not executable"),
        (vec!["./missing-program"], "does not exist"),
        (vec!["--cwd", "/nonexistent/dir", "true"], "--cwd /nonexistent/dir: does not exist"),
        (vec!["--env", "1BAD=x", "true"], "invalid environment entry \"1BAD=x\""),
        (vec!["--env", "RINGLEADER_SURELY_UNSET", "true"], "RINGLEADER_SURELY_UNSET (from --env or the hostfile's \"envs\") is not set"),
        (vec!["--hostfile", &no_ips, "true"], "host 0 (127.0.0.1) has none"),
        (vec!["-n", "0", "true"], "0 is not in 1"),
        (vec!["--grace", "soon", "true"], "invalid number of seconds"),
        (vec!["--output-dir", &script, "true"], "exists and is not a directory"),
        (vec!["--output-dir", &read_only, "true"], "cannot create files in the directory"),
        (vec!["-p", "0", "true"], "0 is not in 1..=65535"),
        (vec!["--hostfile", "/dev/zero", "true"], "hostfile /dev/zero is larger than 64 MiB"),
        (vec!["--tag-ouput", "--", "echo", "hi"], "a similar argument exists: '--tag-output'"),
        (vec!["--no-such-option", "echo"], "unexpected argument '--no-such-option'"),
        (vec!["--", "-dash-command"], "command not found: \"-dash-command\""),
        (vec![], "required"),
    ];
    for (args, expected) in cases {
        let output = run(&mut ringleader(&args), b"");
        assert_eq!(output.code(), Some(2), "{args:?}");
        assert!(output.stderr_text().contains(expected), "{args:?}: expected {expected:?} in {}", output.stderr_text());
        assert!(!output.stderr_text().contains("panicked"), "{args:?}");
    }
}

#[test]
fn busy_ring_port_is_reported_before_launch() {
    let port = test_port_base();
    let _listener = std::net::TcpListener::bind(("127.0.0.1", port + 1)).unwrap();
    let output = launch(&["-n", "3", "-p", &port.to_string()], "echo should-not-run");
    assert_eq!(output.code(), Some(2));
    assert!(output.stdout.is_empty(), "a rank ran: {}", output.stdout_text());
    let stderr = output.stderr_text();
    assert!(stderr.contains(&format!("ring port {} of rank 1", port + 1)), "{stderr}");
}

/// Each local rank costs the launcher a few descriptors, so it raises its
/// own soft limit, and the ranks still get the limit it started with.
#[test]
fn low_open_file_limit_still_starts_every_rank() {
    let script = r#"ulimit -Sn 64 && exec "$RINGLEADER" -n 40 -p "$PORT" -- sh -c 'echo "limit $(ulimit -Sn)"'"#;
    let mut command = std::process::Command::new("sh");
    command
        .args(["-c", script])
        .env("RINGLEADER", ringleader_tests::bin("ringleader"))
        .env("PORT", test_port_base().to_string());
    let output = run(&mut command, b"");

    assert_eq!(output.code(), Some(0), "{}", output.stderr_text());
    assert_eq!(output.stdout_text().matches("limit 64\n").count(), 40, "{}", output.stdout_text());
}

/// MASTER_PORT is the port after the ring ports. Only programs other than
/// the ring listen there, so a busy one is a warning, not an error.
#[test]
fn busy_master_port_is_a_warning() {
    let port = test_port_base();
    let _listener = std::net::TcpListener::bind(("127.0.0.1", port + 2)).unwrap();
    let output = launch(&["-n", "2", "-p", &port.to_string()], "echo \"rank $RANK port $MASTER_PORT\"");

    assert_eq!(output.code(), Some(0), "{}", output.stderr_text());
    assert!(output.stdout_text().contains(&format!("rank 0 port {}", port + 2)), "{}", output.stdout_text());
    let stderr = output.stderr_text();
    assert!(stderr.contains(&format!("warning: MASTER_PORT {} is already in use", port + 2)), "{stderr}");
}

#[test]
fn dry_run_prints_the_plan_without_running() {
    let output = run(&mut ringleader(["-n", "2", "--dry-run", "--json", "--", "sh", "-c", "touch ran"]), b"");
    assert_eq!(output.code(), Some(0));
    let plan: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(plan["world_size"], 2);
    assert_eq!(plan["ranks"][1]["env"]["MLX_RANK"], "1");
    assert_eq!(plan["ranks"][1]["command"][2], "touch ran");
    assert!(plan["files"]["MLX_HOSTFILE"].as_str().unwrap().starts_with("[["));
    assert_eq!(plan["ranks"][0]["files"], serde_json::json!(["MLX_HOSTFILE"]));
    assert!(!std::path::Path::new("ran").exists());

    let text = run(&mut ringleader(["-n", "2", "--dry-run", "--", "echo", "a b"]), b"").stdout_text();
    assert!(text.contains("rank 1 on 127.0.0.1: echo 'a b'"), "{text}");
}

#[test]
fn one_rank_bench_runs_without_hostfile() {
    let bench = ringleader_tests::bin("ringleader-bench");
    let output = run(&mut ringleader(["--", bench.to_str().unwrap(), "-e", "16K", "-n", "2"]), b"");
    assert_eq!(output.code(), Some(0), "{}", output.stderr_text());
    assert!(output.stdout_text().contains("all_sum"), "{}", output.stdout_text());
}

#[test]
fn local_names_share_local_ranks() {
    let output = launch(&["--hosts", "127.0.0.1,localhost"], r#"echo "$MLX_RANK:$LOCAL_RANK/$LOCAL_WORLD_SIZE""#);
    let mut lines: Vec<String> = output.stdout_text().lines().map(String::from).collect();
    lines.sort();
    assert_eq!(lines, ["0:0/2", "1:1/2"]);
}
