//! The ssh transport against a real sshd: output, exit codes, quoting, files,
//! stdin and many ranks on one host.

mod common;

use std::time::Duration;

use common::sshd::drive::{options, run_to_end, spec};
use common::sshd::{
    processes, Sshd, BUSY_CONFIG_ALIAS, CLOSED_PORT_ALIAS, HOST_ALIASES, UNAUTHORIZED_KEY_ALIAS,
    UNKNOWN_HOST_KEY_ALIAS, USER_MULTIPLEX_ALIAS,
};
use ringleader::exec::ssh::{SshOptions, SshSpawner};
use ringleader::exec::{RankFile, SpawnError, Spawner, SshTarget, Termination};
use tokio::io::AsyncWriteExt;

#[tokio::test]
async fn output_and_exit_code_arrive() {
    let sshd = Sshd::start();
    let spawner = SshSpawner::new(options(&sshd)).unwrap();
    let spawned = spawner
        .spawn(&spec(
            0,
            "host-a",
            &["sh", "-c", "printf out; printf err >&2; exit 7"],
        ))
        .await
        .expect("rank starts");
    assert!(spawned.pid.is_some(), "remote pid reported");

    let finished = run_to_end(spawned).await;

    assert_eq!(finished.stdout, b"out");
    assert_eq!(finished.stderr, b"err");
    assert_eq!(finished.termination, Termination::Exited(7));
}

/// ssh's own failures also exit 255, so this status needs care.
#[tokio::test]
async fn remote_exit_status_255_is_the_rank_status() {
    let sshd = Sshd::start();
    let spawner = SshSpawner::new(options(&sshd)).unwrap();

    let spawned = spawner
        .spawn(&spec(0, "host-a", &["sh", "-c", "exit 255"]))
        .await
        .unwrap();
    let finished = run_to_end(spawned).await;

    assert_eq!(finished.termination, Termination::Exited(255));
}

#[tokio::test]
async fn signal_after_the_rank_ended_is_not_an_error() {
    let sshd = Sshd::start();
    let spawner = SshSpawner::new(options(&sshd)).unwrap();
    let spawned = spawner.spawn(&spec(0, "host-a", &["true"])).await.unwrap();
    let ringleader::exec::Spawned { control, wait, .. } = spawned;
    assert_eq!(wait.await.unwrap(), Termination::Exited(0));

    control
        .signal(ringleader::exec::RankSignal::Terminate)
        .await
        .expect("signalling an ended rank succeeds");
}

#[tokio::test]
async fn user_control_master_is_used_instead_of_ours() {
    let sshd = Sshd::start();
    let spawner = SshSpawner::new(options(&sshd)).unwrap();
    let specs: Vec<_> = (0..3)
        .map(|rank| {
            spec(
                rank,
                USER_MULTIPLEX_ALIAS,
                &["sh", "-c", "sleep 0.5; echo ok"],
            )
        })
        .collect();

    let started = futures_join_all(specs.iter().map(|spec| spawner.spawn(spec))).await;
    let config = sshd.config_file().display().to_string();
    let ours = processes()
        .into_iter()
        .filter(|process| {
            process.args.contains(&config) && process.args.contains("ControlMaster=yes")
        })
        .count();
    let user_sockets = std::fs::read_dir(sshd.dir())
        .unwrap()
        .filter(|entry| {
            entry
                .as_ref()
                .unwrap()
                .file_name()
                .to_string_lossy()
                .starts_with("user-mux-")
        })
        .count();

    assert_eq!(ours, 0, "the spawner started its own ControlMaster");
    assert_eq!(user_sockets, 1, "the user's ControlPath socket is missing");
    for spawned in started {
        let finished = run_to_end(spawned.expect("rank starts")).await;
        assert_eq!(finished.stdout_text(), "ok\n");
    }
}

#[tokio::test]
async fn binary_bytes_arrive_unchanged_on_separate_streams() {
    let sshd = Sshd::start();
    let dir = tempfile::tempdir().unwrap();
    let all_bytes: Vec<u8> = (0..=255u8)
        .chain(b"line\r\nline\n\r\0end".iter().copied())
        .collect();
    let reversed: Vec<u8> = all_bytes.iter().rev().copied().collect();
    let out_path = dir.path().join("out.bin");
    let err_path = dir.path().join("err.bin");
    std::fs::write(&out_path, &all_bytes).unwrap();
    std::fs::write(&err_path, &reversed).unwrap();
    let spawner = SshSpawner::new(options(&sshd)).unwrap();
    let script = format!(
        "cat '{}'; cat '{}' >&2",
        out_path.display(),
        err_path.display()
    );

    let spawned = spawner
        .spawn(&spec(0, "host-a", &["sh", "-c", &script]))
        .await
        .unwrap();
    let finished = run_to_end(spawned).await;

    assert_eq!(finished.stdout, all_bytes, "stdout bytes differ");
    assert_eq!(finished.stderr, reversed, "stderr bytes differ");
    assert_eq!(finished.termination, Termination::Exited(0));
}

/// Values that a shell would expand, split or execute if quoting failed.
fn hostile_values(canary: &str) -> Vec<String> {
    vec![
        String::new(),
        "it's".to_owned(),
        "'; touch CANARY; '".replace("CANARY", canary),
        "$(touch CANARY)".replace("CANARY", canary),
        "`touch CANARY`".replace("CANARY", canary),
        "\"$(touch CANARY)\"".replace("CANARY", canary),
        "line1\nline2\n".to_owned(),
        "a=b".to_owned(),
        "--help".to_owned(),
        "back\\slash \\n \\\\".to_owned(),
        "$HOME ${PATH} $$ $0 $@".to_owned(),
        "* ? [a] ~ ! # & | ; < >".to_owned(),
        "tab\tand\u{1}control\u{7f}".to_owned(),
        "ünïcödé ∑".to_owned(),
    ]
}

#[tokio::test]
async fn hostile_arguments_arrive_byte_identical() {
    let sshd = Sshd::start();
    let dir = tempfile::tempdir().unwrap();
    let canary = dir.path().join("canary");
    let values = hostile_values(&canary.display().to_string());
    let mut argv = vec!["printf".to_owned(), "%s\\0".to_owned()];
    argv.extend(values.iter().cloned());
    let mut rank = spec(0, "host-a", &[]);
    rank.argv = argv;
    let spawner = SshSpawner::new(options(&sshd)).unwrap();

    let finished = run_to_end(spawner.spawn(&rank).await.unwrap()).await;

    let received: Vec<String> = finished
        .stdout_text()
        .split_terminator('\0')
        .map(str::to_owned)
        .collect();
    assert_eq!(received, values);
    assert!(!canary.exists(), "a quoted value was executed");
}

#[tokio::test]
async fn hostile_environment_values_arrive_byte_identical() {
    let sshd = Sshd::start();
    let dir = tempfile::tempdir().unwrap();
    let canary = dir.path().join("canary");
    let values = hostile_values(&canary.display().to_string());
    let mut rank = spec(0, "host-a", &[]);
    let mut script = String::from("printf '%s\\0'");
    for (index, value) in values.iter().enumerate() {
        rank.env.push((format!("HOSTILE_{index}"), value.clone()));
        script.push_str(&format!(" \"$HOSTILE_{index}\""));
    }
    rank.argv = vec!["sh".to_owned(), "-c".to_owned(), script];
    let spawner = SshSpawner::new(options(&sshd)).unwrap();

    let finished = run_to_end(spawner.spawn(&rank).await.unwrap()).await;

    let received: Vec<String> = finished
        .stdout_text()
        .split_terminator('\0')
        .map(str::to_owned)
        .collect();
    assert_eq!(received, values);
    assert!(!canary.exists(), "a quoted value was executed");
}

#[tokio::test]
async fn hostile_working_directory_is_entered_literally() {
    let sshd = Sshd::start();
    let dir = tempfile::tempdir().unwrap();
    // A directory name cannot contain '/', so the injected command uses a relative path.
    let name = "it's $(touch canary) `touch canary` \n=dir";
    let canaries = [dir.path().join("canary"), sshd.dir().join("home/canary")];
    let cwd = dir.path().join(name);
    std::fs::create_dir(&cwd).unwrap();
    let mut rank = spec(0, "host-a", &["sh", "-c", "pwd -P"]);
    rank.cwd = Some(cwd.clone());
    let spawner = SshSpawner::new(options(&sshd)).unwrap();

    let finished = run_to_end(spawner.spawn(&rank).await.unwrap()).await;

    let expected = format!("{}\n", cwd.canonicalize().unwrap().display());
    assert_eq!(finished.stdout_text(), expected);
    for canary in canaries {
        assert!(!canary.exists(), "the working directory was executed");
    }
}

#[tokio::test]
async fn rank_files_are_private_and_removed_after_the_rank() {
    let sshd = Sshd::start();
    let dir = tempfile::tempdir().unwrap();
    let canary = dir.path().join("canary");
    let contents = format!(
        "[[\"10.0.0.1:5000\"]]\n$(touch {}) it's\n",
        canary.display()
    );
    let mut rank = spec(
        0,
        "host-a",
        &[
            "sh",
            "-c",
            "stat -c %a \"$MLX_HOSTFILE\"; printf '%s\\n' \"$MLX_HOSTFILE\"; cat \"$MLX_HOSTFILE\"",
        ],
    );
    rank.files = vec![RankFile {
        env_var: "MLX_HOSTFILE".to_owned(),
        contents: contents.as_str().into(),
    }];
    let spawner = SshSpawner::new(options(&sshd)).unwrap();

    let finished = run_to_end(spawner.spawn(&rank).await.unwrap()).await;

    let text = finished.stdout_text();
    let (mode, rest) = text.split_once('\n').expect("mode line");
    let (path, file_contents) = rest.split_once('\n').expect("path line");
    assert_eq!(mode, "600");
    assert_eq!(file_contents, contents);
    assert!(!std::path::Path::new(path).exists(), "{path} left behind");
    assert!(!canary.exists(), "file contents were executed");
}

#[tokio::test]
async fn stdin_reaches_the_rank() {
    let sshd = Sshd::start();
    let mut rank = spec(0, "host-a", &["cat"]);
    rank.stdin = true;
    let spawner = SshSpawner::new(options(&sshd)).unwrap();
    let mut spawned = spawner.spawn(&rank).await.unwrap();
    let input: Vec<u8> = (0..=255u8).cycle().take(200_000).collect();

    let mut stdin = spawned.stdin.take().expect("stdin is piped");
    let writer = {
        let input = input.clone();
        tokio::spawn(async move {
            stdin.write_all(&input).await.unwrap();
            stdin.shutdown().await.unwrap();
        })
    };
    let finished = run_to_end(spawned).await;
    writer.await.unwrap();

    assert_eq!(finished.stdout.len(), input.len());
    assert!(finished.stdout == input, "stdin bytes changed on the way");
    assert_eq!(finished.termination, Termination::Exited(0));
}

#[tokio::test]
async fn rank_without_stdin_reads_eof() {
    let sshd = Sshd::start();
    let spawner = SshSpawner::new(options(&sshd)).unwrap();

    let spawned = spawner
        .spawn(&spec(0, "host-a", &["wc", "-c"]))
        .await
        .unwrap();
    let finished = run_to_end(spawned).await;

    assert_eq!(finished.stdout_text().trim(), "0");
}

#[tokio::test]
async fn thirty_two_ranks_start_on_one_host() {
    let sshd = Sshd::start();
    let spawner = SshSpawner::new(options(&sshd)).unwrap();
    let specs: Vec<_> = (0..32)
        .map(|rank| spec(rank, "host-a", &["sh", "-c", &format!("echo rank {rank}")]))
        .collect();

    let started = futures_join_all(specs.iter().map(|spec| spawner.spawn(spec))).await;
    let mut finished = Vec::new();
    for (rank, spawned) in started.into_iter().enumerate() {
        let spawned =
            spawned.unwrap_or_else(|error| panic!("rank {rank} failed to start: {error}"));
        finished.push(tokio::spawn(run_to_end(spawned)));
    }

    for (rank, task) in finished.into_iter().enumerate() {
        let finished = task.await.unwrap();
        assert_eq!(finished.stdout_text(), format!("rank {rank}\n"));
        assert_eq!(finished.termination, Termination::Exited(0));
    }
}

/// Four aliases of one sshd with 12 ranks each need eight connections, more
/// than sshd accepts in parallel by default unless the aliases share one
/// handshake limit.
#[tokio::test]
async fn forty_eight_ranks_start_across_aliases_of_one_server() {
    let sshd = Sshd::start();
    let spawner = SshSpawner::new(options(&sshd)).unwrap();
    let specs: Vec<_> = (0..48)
        .map(|rank| {
            let host = HOST_ALIASES[rank % HOST_ALIASES.len()];
            spec(rank, host, &["sh", "-c", &format!("echo rank {rank}")])
        })
        .collect();

    let started = futures_join_all(specs.iter().map(|spec| spawner.spawn(spec))).await;
    let mut finished = Vec::new();
    for (rank, spawned) in started.into_iter().enumerate() {
        let spawned =
            spawned.unwrap_or_else(|error| panic!("rank {rank} failed to start: {error}"));
        finished.push(tokio::spawn(run_to_end(spawned)));
    }

    for (rank, task) in finished.into_iter().enumerate() {
        let finished = task.await.unwrap();
        assert_eq!(finished.stdout_text(), format!("rank {rank}\n"));
    }
}

/// Without multiplexing every rank is a handshake of its own, and only a
/// few may run at once or sshd's MaxStartups drops the rest.
#[tokio::test]
async fn thirty_two_ranks_start_without_multiplexing() {
    let sshd = Sshd::start();
    let mut options = options(&sshd);
    options.multiplex = false;
    let spawner = SshSpawner::new(options).unwrap();
    let specs: Vec<_> = (0..32)
        .map(|rank| spec(rank, "host-b", &["sh", "-c", &format!("echo rank {rank}")]))
        .collect();

    let started = futures_join_all(specs.iter().map(|spec| spawner.spawn(spec))).await;
    let mut finished = Vec::new();
    for (rank, spawned) in started.into_iter().enumerate() {
        let spawned =
            spawned.unwrap_or_else(|error| panic!("rank {rank} failed to start: {error}"));
        finished.push(tokio::spawn(run_to_end(spawned)));
    }

    for (rank, task) in finished.into_iter().enumerate() {
        let finished = task.await.unwrap();
        assert_eq!(finished.stdout_text(), format!("rank {rank}\n"));
    }
}

#[tokio::test]
async fn ranks_on_several_aliases_run_at_once() {
    let sshd = Sshd::start();
    let spawner = SshSpawner::new(options(&sshd)).unwrap();
    let specs: Vec<_> = HOST_ALIASES
        .iter()
        .enumerate()
        .map(|(rank, host)| spec(rank, host, &["sh", "-c", "sleep 0.3; echo done"]))
        .collect();

    let started = futures_join_all(specs.iter().map(|spec| spawner.spawn(spec))).await;
    for spawned in started {
        let finished = run_to_end(spawned.expect("rank starts")).await;
        assert_eq!(finished.stdout_text(), "done\n");
    }
}

#[tokio::test]
async fn hosts_that_look_like_options_are_rejected_before_ssh_runs() {
    let sshd = Sshd::start();
    let dir = tempfile::tempdir().unwrap();
    let canary = dir.path().join("canary");
    let spawner = SshSpawner::new(options(&sshd)).unwrap();
    let host = format!("-oProxyCommand=touch {}", canary.display());

    for host in [
        host.as_str(),
        "-oProxyCommand=true",
        "host-a extra",
        "host\n-a",
    ] {
        let result = spawner.spawn(&spec(0, host, &["true"])).await;
        assert!(
            matches!(result, Err(SpawnError::InvalidSpec { .. })),
            "{host:?} was not rejected"
        );
    }
    assert!(!canary.exists(), "ssh ran the host value as an option");
}

#[tokio::test]
async fn missing_command_fails_the_spawn_with_its_name() {
    let sshd = Sshd::start();
    let spawner = SshSpawner::new(options(&sshd)).unwrap();

    let started = tokio::time::Instant::now();
    let result = spawner
        .spawn(&spec(3, "host-b", &["no-such-command-ringleader"]))
        .await;

    let Err(error) = result else {
        panic!("missing command started")
    };
    let message = error.to_string();
    assert!(matches!(error, SpawnError::RemoteStart { .. }), "{message}");
    assert!(message.contains("rank 3 on host-b"), "{message}");
    assert!(
        message.contains("command not found: no-such-command-ringleader"),
        "{message}"
    );
    assert!(started.elapsed() < Duration::from_secs(10));
}

#[tokio::test]
async fn missing_working_directory_fails_the_spawn() {
    let sshd = Sshd::start();
    let spawner = SshSpawner::new(options(&sshd)).unwrap();
    let mut rank = spec(1, "host-a", &["true"]);
    rank.cwd = Some("/nonexistent/ringleader-dir".into());

    let Err(error) = spawner.spawn(&rank).await else {
        panic!("rank started")
    };

    let message = error.to_string();
    assert!(matches!(error, SpawnError::RemoteStart { .. }), "{message}");
    assert!(
        message.contains("working directory /nonexistent/ringleader-dir"),
        "{message}"
    );
}

async fn run_echo(
    options: SshOptions,
    host: &str,
    target: SshTarget,
) -> Result<String, SpawnError> {
    let spawner = SshSpawner::new(options).unwrap();
    let mut rank = spec(0, host, &["echo", "reached"]);
    rank.ssh = target;
    let spawned = spawner.spawn(&rank).await?;
    Ok(run_to_end(spawned).await.stdout_text())
}

#[tokio::test]
async fn hostfile_port_overrides_the_config() {
    let sshd = Sshd::start();
    let target = SshTarget {
        port: Some(sshd.port()),
        ..SshTarget::default()
    };

    let output = run_echo(options(&sshd), CLOSED_PORT_ALIAS, target).await;

    assert_eq!(output.expect("port from the hostfile used"), "reached\n");
}

/// A RemoteCommand would replace the rank's command, and a LocalForward
/// would fail to bind for every session after the first.
#[tokio::test]
async fn remote_command_and_forwardings_in_config_are_ignored() {
    let sshd = Sshd::start();
    let spawner = SshSpawner::new(options(&sshd)).unwrap();
    let specs: Vec<_> = (0..3)
        .map(|rank| spec(rank, BUSY_CONFIG_ALIAS, &["echo", "reached"]))
        .collect();

    let started = futures_join_all(specs.iter().map(|spec| spawner.spawn(spec))).await;

    for spawned in started {
        let finished = run_to_end(spawned.expect("rank starts")).await;
        assert_eq!(finished.stdout_text(), "reached\n");
    }
}

#[tokio::test]
async fn user_at_host_destination_works() {
    let sshd = Sshd::start();
    let host = format!("{}@host-c", common::sshd::user_name());

    let output = run_echo(options(&sshd), &host, SshTarget::default()).await;

    assert_eq!(output.expect("user@host reaches the host"), "reached\n");
}

#[tokio::test]
async fn hostfile_identity_and_user_are_used() {
    let sshd = Sshd::start();
    let user = common::sshd::user_name();
    let target = SshTarget {
        identity: Some(sshd.client_key()),
        user: Some(user),
        ..SshTarget::default()
    };

    let output = run_echo(options(&sshd), UNAUTHORIZED_KEY_ALIAS, target).await;

    assert_eq!(
        output.expect("identity from the hostfile used"),
        "reached\n"
    );
}

#[tokio::test]
async fn extra_options_override_the_config() {
    let sshd = Sshd::start();
    let mut options = options(&sshd);
    options.extra_options = vec![format!("Port={}", sshd.port())];

    let output = run_echo(options, CLOSED_PORT_ALIAS, SshTarget::default()).await;

    assert_eq!(output.expect("extra option used"), "reached\n");
}

#[tokio::test]
async fn unknown_host_key_is_rejected_unless_accept_new() {
    let sshd = Sshd::start();

    let strict = run_echo(options(&sshd), UNKNOWN_HOST_KEY_ALIAS, SshTarget::default()).await;
    let mut accepting = options(&sshd);
    accepting.accept_new_host_keys = true;
    let accepted = run_echo(accepting, UNKNOWN_HOST_KEY_ALIAS, SshTarget::default()).await;

    let Err(error) = strict else {
        panic!("unknown host key accepted by default")
    };
    assert!(
        error.to_string().contains("Host key verification failed"),
        "{error}"
    );
    assert_eq!(accepted.expect("accept-new adds the key"), "reached\n");
    let known = std::fs::read_to_string(sshd.dir().join("empty_known_hosts")).unwrap();
    assert!(known.contains("ssh-ed25519"), "key not added: {known:?}");
}

/// Awaits all futures concurrently, keeping their order.
async fn futures_join_all<F: std::future::Future>(
    futures: impl IntoIterator<Item = F>,
) -> Vec<F::Output> {
    let mut pinned: Vec<_> = futures.into_iter().map(Box::pin).collect();
    let mut outputs: Vec<Option<F::Output>> = pinned.iter().map(|_| None).collect();
    std::future::poll_fn(|context| {
        let mut pending = false;
        for (future, output) in pinned.iter_mut().zip(outputs.iter_mut()) {
            if output.is_none() {
                match future.as_mut().poll(context) {
                    std::task::Poll::Ready(value) => *output = Some(value),
                    std::task::Poll::Pending => pending = true,
                }
            }
        }
        if pending {
            std::task::Poll::Pending
        } else {
            std::task::Poll::Ready(())
        }
    })
    .await;
    outputs
        .into_iter()
        .map(|output| output.expect("every future finished"))
        .collect()
}
