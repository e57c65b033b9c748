//! The rank programs scenarios run, registered by name; a rank's `argv[0]`
//! picks one and the rest are its arguments.
//!
//! | name | arguments | what it does |
//! | --- | --- | --- |
//! | `ring-loop` | `ITERATIONS LEN PAUSE_MS` | joins the ring, then runs `all_sum` (and `all_gather` every other round) with a 3 s operation timeout, checking every value |
//! | `print` | `LINES` | prints numbered lines, exits 0 |
//! | `exit-after` | `MS CODE [RANK]` | exits with `CODE` after `MS`; with `RANK`, only that rank does and the others hang |
//! | `hang` | | waits forever |
//! | `ignore-term` | | catches SIGTERM and SIGINT and keeps running |
//! | `children` | `COUNT` | starts `COUNT` children that hang, then hangs |
//! | `flood` | `LINES` | writes numbered lines as fast as the pipe takes them, then exits 0 |
//! | `cat` | | copies stdin to stdout until end of file, exits 0 |

use std::path::Path;
use std::time::Duration;

use ringleader::ring::{AddressTable, Group, RingOptions};

use crate::log::Event;
use crate::net::SimNet;
use crate::process::{Programs, RankContext};

/// Exit code of a rank whose collective returned an error.
pub const EXIT_COLLECTIVE_FAILED: i32 = 1;
/// Exit code of a rank whose collective returned wrong values.
pub const EXIT_WRONG_VALUES: i32 = 99;

/// The `ring-loop` program's per-operation timeout.
pub const RING_OP_TIMEOUT: Duration = Duration::from_secs(3);

/// Every program of the table above.
pub fn standard() -> Programs {
    let mut programs = Programs::default();
    programs.register("ring-loop", ring_loop);
    programs.register("print", print);
    programs.register("exit-after", exit_after);
    programs.register("hang", |_| std::future::pending::<i32>());
    programs.register("ignore-term", ignore_term);
    programs.register("children", children);
    programs.register("flood", flood);
    programs.register("cat", cat);
    programs
}

/// Argument `index` as a number, or `default` when absent or invalid.
fn arg<T: std::str::FromStr>(context: &RankContext, index: usize, default: T) -> T {
    context
        .argv
        .get(index)
        .and_then(|a| a.parse().ok())
        .unwrap_or(default)
}

async fn print(context: RankContext) -> i32 {
    let lines: usize = arg(&context, 1, 10);
    for line in 0..lines {
        if context
            .stdout
            .line(&format!("rank {} line {line}", context.rank))
            .await
            .is_err()
        {
            return 1;
        }
    }
    0
}

async fn exit_after(context: RankContext) -> i32 {
    let delay: u64 = arg(&context, 1, 100);
    let code: i32 = arg(&context, 2, 1);
    let only: Option<usize> = context.argv.get(3).and_then(|a| a.parse().ok());
    if only.is_some_and(|rank| rank != context.rank) {
        return std::future::pending().await;
    }
    tokio::time::sleep(Duration::from_millis(delay)).await;
    let _ = context
        .stderr
        .line(&format!("rank {} exiting with {code}", context.rank))
        .await;
    code
}

async fn ignore_term(context: RankContext) -> i32 {
    let mut signals = context.catch_signals();
    while let Some(signal) = signals.recv().await {
        let _ = context
            .stderr
            .line(&format!("rank {} ignoring {}", context.rank, signal.name()))
            .await;
    }
    std::future::pending().await
}

async fn children(context: RankContext) -> i32 {
    let count: usize = arg(&context, 1, 2);
    for _ in 0..count {
        if context.spawn_child(vec!["hang".into()]).is_err() {
            return 1;
        }
    }
    std::future::pending().await
}

async fn flood(context: RankContext) -> i32 {
    let lines: usize = arg(&context, 1, 5000);
    for line in 0..lines {
        let text = format!(
            "rank {} flood line {line:06} {}",
            context.rank,
            "x".repeat(60)
        );
        let pipe = if line % 10 == 9 {
            &context.stderr
        } else {
            &context.stdout
        };
        if pipe.line(&text).await.is_err() {
            return 1;
        }
    }
    0
}

async fn cat(mut context: RankContext) -> i32 {
    let Some(mut stdin) = context.stdin.take() else {
        return 0;
    };
    while let Some(chunk) = stdin.read().await {
        if context.stdout.write_all(&chunk).await.is_err() {
            return 1;
        }
    }
    0
}

async fn ring_loop(context: RankContext) -> i32 {
    let iterations: usize = arg(&context, 1, 10);
    let len: usize = arg(&context, 2, 256);
    let pause = Duration::from_millis(arg(&context, 3, 20));
    let rank = context.rank;
    let failed = |iteration: usize, error: String| {
        context.log.record(Event::CollectiveFailed {
            rank,
            iteration,
            error,
        });
        EXIT_COLLECTIVE_FAILED
    };

    let table = match address_table(&context) {
        Ok(table) => table,
        Err(error) => return failed(0, error),
    };
    // turmoil's TCP does not retransmit, so a segment dropped by a partition
    // stalls its stream for good; the operation timeout turns that into an
    // error, as `RINGLEADER_RING_OP_TIMEOUT` does on a real cluster.
    let options = RingOptions {
        connect_timeout: Duration::from_secs(5),
        op_timeout: Some(RING_OP_TIMEOUT),
        bind_ip: Some("0.0.0.0".parse().expect("a valid IP")),
    };
    let mut group = match Group::connect(rank, &table, SimNet::default(), options).await {
        Ok(group) => group,
        Err(error) => {
            let _ = context.stderr.line(&format!("rank {rank}: {error}")).await;
            return failed(0, error.to_string());
        }
    };

    let size = group.size();
    for iteration in 0..iterations {
        let round = (iteration + 1) as f32;
        let mut data: Vec<f32> = (0..len)
            .map(|j| (rank + 1) as f32 * round + (j % 7) as f32)
            .collect();
        if let Err(error) = group.all_sum(&mut data).await {
            let _ = context
                .stderr
                .line(&format!("rank {rank}: all_sum {iteration}: {error}"))
                .await;
            return failed(iteration, error.to_string());
        }
        let ranks_sum = (size * (size + 1) / 2) as f32;
        if let Some(j) = (0..len).find(|&j| data[j] != ranks_sum * round + (size * (j % 7)) as f32)
        {
            let detail = format!("all_sum element {j} is {}", data[j]);
            context.log.record(Event::CollectiveWrong {
                rank,
                iteration,
                detail,
            });
            return EXIT_WRONG_VALUES;
        }
        if iteration % 2 == 1 {
            let input = [rank as f32; 4];
            let mut output = vec![0f32; 4 * size];
            if let Err(error) = group.all_gather(&input, &mut output).await {
                let _ = context
                    .stderr
                    .line(&format!("rank {rank}: all_gather {iteration}: {error}"))
                    .await;
                return failed(iteration, error.to_string());
            }
            if let Some(k) = (0..output.len()).find(|&k| output[k] != (k / 4) as f32) {
                let detail = format!("all_gather element {k} is {}", output[k]);
                context.log.record(Event::CollectiveWrong {
                    rank,
                    iteration,
                    detail,
                });
                return EXIT_WRONG_VALUES;
            }
        }
        context.log.record(Event::CollectiveOk { rank, iteration });
        if context
            .stdout
            .line(&format!("rank {rank} iteration {iteration} ok"))
            .await
            .is_err()
        {
            return 1;
        }
        tokio::time::sleep(pause).await;
    }
    0
}

fn address_table(context: &RankContext) -> Result<AddressTable, String> {
    let path = context
        .env("MLX_HOSTFILE")
        .ok_or("MLX_HOSTFILE is not set")?;
    let text = context
        .files
        .get(path)
        .ok_or_else(|| format!("{path} does not exist"))?;
    AddressTable::parse_hostfile(text, Path::new(path)).map_err(|error| error.to_string())
}
