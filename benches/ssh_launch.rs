//! `ssh-launch`: starts N copies of a command on one ssh host through
//! `SshSpawner`, the way the launcher does, for the ssh benchmark and for
//! tests that SIGKILL a launcher process.
//!
//! Usage: `ssh-launch [--config FILE] [--grace SECONDS] [--keepalive SECONDS]
//! HOST N COMMAND [ARG...]`
//!
//! Prints `started RANK PID` for each rank once all have started, forwards
//! the ranks' stdout to stdout, and exits 0 when every rank exited 0, else 1.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use ringleader::exec::ssh::{SshOptions, SshSpawner};
use ringleader::exec::{RankSpec, Spawner, SshTarget};
use tokio::io::AsyncWriteExt;

struct Args {
    options: SshOptions,
    host: String,
    ranks: usize,
    argv: Vec<String>,
}

fn parse_args() -> Result<Args, String> {
    let mut options = SshOptions::default();
    let mut args = std::env::args().skip(1);
    let mut positional = Vec::new();
    while let Some(arg) = args.next() {
        let mut value = |name: &str| args.next().ok_or(format!("{name} needs a value"));
        match arg.as_str() {
            "--config" if positional.is_empty() => {
                options.config_file = Some(PathBuf::from(value("--config")?))
            }
            "--grace" if positional.is_empty() => options.grace = seconds(&value("--grace")?)?,
            "--keepalive" if positional.is_empty() => {
                options.keepalive_interval = seconds(&value("--keepalive")?)?
            }
            _ => positional.push(arg),
        }
    }
    if positional.len() < 3 {
        return Err(
            "usage: ssh-launch [--config FILE] [--grace S] [--keepalive S] HOST N COMMAND [ARG...]"
                .into(),
        );
    }
    let host = positional.remove(0);
    let ranks = positional
        .remove(0)
        .parse()
        .map_err(|_| "N must be a number".to_owned())?;
    Ok(Args {
        options,
        host,
        ranks,
        argv: positional,
    })
}

fn seconds(text: &str) -> Result<Duration, String> {
    text.parse::<f64>()
        .ok()
        .filter(|value| *value > 0.0)
        .map(Duration::from_secs_f64)
        .ok_or_else(|| format!("invalid number of seconds: {text}"))
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = match parse_args() {
        Ok(args) => args,
        Err(message) => {
            eprintln!("ssh-launch: {message}");
            return ExitCode::from(2);
        }
    };
    let spawner = SshSpawner::new(args.options).expect("create the ssh spawner");
    let specs: Vec<RankSpec> = (0..args.ranks)
        .map(|rank| RankSpec {
            rank,
            host: args.host.clone(),
            ssh: SshTarget::default(),
            argv: args.argv.clone(),
            env: vec![("RANK".to_owned(), rank.to_string())],
            files: Vec::new(),
            cwd: None,
            default_cwd: None,
            stdin: false,
        })
        .collect();

    let mut starts = tokio::task::JoinSet::new();
    let spawner = std::sync::Arc::new(spawner);
    for spec in specs {
        let spawner = spawner.clone();
        starts.spawn(async move { (spec.rank, spawner.spawn(&spec).await) });
    }
    let mut started = Vec::new();
    while let Some(joined) = starts.join_next().await {
        let (rank, result) = joined.expect("start task");
        match result {
            Ok(spawned) => started.push((rank, spawned)),
            Err(error) => {
                eprintln!("ssh-launch: {error}");
                return ExitCode::FAILURE;
            }
        }
    }
    started.sort_by_key(|(rank, _)| *rank);

    let mut stdout = tokio::io::stdout();
    for (rank, spawned) in &started {
        let line = format!("started {rank} {}\n", spawned.pid.unwrap_or(0));
        stdout
            .write_all(line.as_bytes())
            .await
            .expect("write stdout");
    }
    stdout.flush().await.expect("flush stdout");

    let mut waits = tokio::task::JoinSet::new();
    for (_, spawned) in started {
        let mut rank_stdout = spawned.stdout;
        let mut rank_stderr = spawned.stderr;
        let wait = spawned.wait;
        waits.spawn(async move {
            let mut out = tokio::io::stdout();
            let mut err = tokio::io::stderr();
            let copy_out = tokio::io::copy(&mut rank_stdout, &mut out);
            let copy_err = tokio::io::copy(&mut rank_stderr, &mut err);
            let (_, _, status) = tokio::join!(copy_out, copy_err, wait);
            status
        });
    }
    let mut success = true;
    while let Some(joined) = waits.join_next().await {
        match joined.expect("wait task") {
            Ok(termination) => success &= termination.success(),
            Err(error) => {
                eprintln!("ssh-launch: {error}");
                success = false;
            }
        }
    }
    if success {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
