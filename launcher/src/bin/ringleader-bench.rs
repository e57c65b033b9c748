//! `ringleader-bench`: checks and times the ring backend's all_sum and
//! all_gather on every rank of a job, nccl-tests style.
//!
//! Launch it on every rank: `ringleader -n 2 -- ringleader-bench`. Rank 0
//! prints one line per operation and size; every rank checks its results,
//! and any wrong result makes the program exit with status 1.

// Failed writes to stdout or stderr are ignored instead of panicking.
use ringleader::{eprintln, println};
use std::process::ExitCode;
use std::time::Duration;

use clap::{CommandFactory, Parser, ValueEnum};
use half::{bf16, f16};
use ringleader::ring::{Element, Group, RingError};
use tokio::time::Instant;

/// Exit status when a collective returned a wrong result.
const EXIT_WRONG_RESULT: u8 = 1;
/// Exit status when the ring failed (could not form, lost a peer, timed out).
const EXIT_RING_ERROR: u8 = 3;

#[derive(Parser, Debug)]
#[command(
    name = "ringleader-bench",
    version,
    about = "Check and time the ring backend's all_sum and all_gather on every rank of a job",
    long_about = "Check and time the ring backend's all_sum and all_gather on every rank of a job.\n\n\
        Run one copy per rank under a launcher that sets MLX_RANK and MLX_HOSTFILE, for example\n  \
        ringleader -n 2 -- ringleader-bench\n  \
        ringleader -n 4 --connections-per-ip 2 -- ringleader-bench -b 1M -e 256M\n\n\
        For each size, every rank first runs one checked operation on known inputs, then the\n\
        warm-up and timed iterations. Rank 0 prints a line per operation and size:\n  \
        time_us     mean time of one operation, the slowest rank's mean\n  \
        algbw_GBps  size / time (GB = 1e9 bytes)\n  \
        busbw_GBps  algbw * 2(n-1)/n for all_sum and algbw * (n-1)/n for all_gather,\n              \
        the bytes each rank moves per second, comparable across rank counts\n\
        Sizes are bytes of the whole array: the all_sum buffer, or the all_gather output\n\
        (each rank contributes size/n), as in nccl-tests.\n\n\
        Exit status: 0 when every result was right, 1 when a result was wrong, 3 when the ring\n\
        failed (see RINGLEADER_RING_CONNECT_TIMEOUT and RINGLEADER_RING_OP_TIMEOUT)."
)]
struct Args {
    /// Smallest size, in bytes; K, M and G suffixes are powers of 1024.
    #[arg(short = 'b', long, value_name = "BYTES", default_value = "4K", value_parser = parse_size)]
    min_bytes: usize,

    /// Largest size, in bytes; K, M and G suffixes are powers of 1024.
    #[arg(short = 'e', long, value_name = "BYTES", default_value = "64M", value_parser = parse_size)]
    max_bytes: usize,

    /// Factor between two consecutive sizes.
    #[arg(short = 'f', long, value_name = "FACTOR", default_value_t = 4, value_parser = clap::value_parser!(u64).range(2..))]
    step_factor: u64,

    /// Timed iterations per size.
    #[arg(short = 'n', long, value_name = "N", default_value_t = 20, value_parser = clap::value_parser!(u64).range(1..))]
    iters: u64,

    /// Untimed iterations per size before the timed ones.
    #[arg(short = 'w', long, value_name = "N", default_value_t = 3)]
    warmup_iters: u64,

    /// Element type of the arrays.
    #[arg(short = 'd', long, value_enum, default_value_t = Dtype::Float32)]
    dtype: Dtype,

    /// Operations to run, comma-separated.
    #[arg(
        short = 'o',
        long,
        value_enum,
        value_delimiter = ',',
        default_value = "all-sum,all-gather"
    )]
    ops: Vec<Op>,

    /// Output format of rank 0's report.
    #[arg(long, value_enum, default_value_t = Format::Table)]
    format: Format,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Dtype {
    Float32,
    Float16,
    Bfloat16,
    Int32,
    Int64,
    Uint8,
}

impl Dtype {
    fn element_bytes(self) -> usize {
        match self {
            Dtype::Float32 | Dtype::Int32 => 4,
            Dtype::Float16 | Dtype::Bfloat16 => 2,
            Dtype::Int64 => 8,
            Dtype::Uint8 => 1,
        }
    }
}

/// Checks the size range, which clap cannot relate to the element type.
fn check_sizes(args: &Args) -> Result<(), String> {
    let element = args.dtype.element_bytes();
    if args.min_bytes < element {
        let name = args.dtype.to_possible_value().expect("every dtype has a name");
        let unit = if element == 1 { "byte" } else { "bytes" };
        return Err(format!(
            "--min-bytes {} is smaller than one {} element ({element} {unit})",
            args.min_bytes,
            name.get_name()
        ));
    }
    if args.min_bytes > args.max_bytes {
        return Err(format!(
            "--min-bytes {} is larger than --max-bytes {}, so no size would run",
            args.min_bytes, args.max_bytes
        ));
    }
    Ok(())
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Op {
    AllSum,
    AllGather,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Format {
    /// Aligned columns with a commented header.
    Table,
    /// Comma-separated values with a header line.
    Csv,
}

/// Parses `4096`, `4K`, `1M`, `2G` (powers of 1024).
fn parse_size(text: &str) -> Result<usize, String> {
    let text = text.trim();
    let (digits, unit) = match text.char_indices().find(|(_, c)| !c.is_ascii_digit()) {
        Some((i, _)) => text.split_at(i),
        None => (text, ""),
    };
    let value: usize = digits.parse().map_err(|_| {
        format!("invalid size {text:?}; expected a number with an optional K, M or G suffix")
    })?;
    let scale = match unit.to_ascii_uppercase().as_str() {
        "" | "B" => 1,
        "K" | "KB" | "KIB" => 1 << 10,
        "M" | "MB" | "MIB" => 1 << 20,
        "G" | "GB" | "GIB" => 1 << 30,
        _ => {
            return Err(format!(
                "invalid size unit {unit:?} in {text:?}; use K, M or G"
            ))
        }
    };
    value
        .checked_mul(scale)
        .ok_or_else(|| format!("size {text:?} is too large"))
}

/// A benchmark element type: small integers convert exactly.
trait BenchValue: Element + PartialEq + std::fmt::Debug {
    fn from_small(value: u32) -> Self;
}

macro_rules! bench_values {
    ($($t:ty => $conv:expr),* $(,)?) => {$(
        impl BenchValue for $t {
            fn from_small(value: u32) -> Self {
                let convert: fn(u32) -> $t = $conv;
                convert(value)
            }
        }
    )*};
}

bench_values! {
    f32 => |v| v as f32,
    f16 => |v| f16::from_f32(v as f32),
    bf16 => |v| bf16::from_f32(v as f32),
    i32 => |v| v as i32,
    i64 => |v| v as i64,
    u8 => |v| v as u8,
}

/// Input of `rank` at index `i`: small enough that sums over up to 32 ranks
/// stay exact in every benchmark type (bfloat16 represents every integer up
/// to 256).
fn input_value(rank: usize, i: usize) -> u32 {
    (rank % 4) as u32 + (i % 3) as u32
}

fn expected_sum(size: usize, i: usize) -> u32 {
    (0..size).map(|rank| input_value(rank, i)).sum()
}

/// One result line.
struct Measurement {
    op: Op,
    bytes: usize,
    count: usize,
    seconds: f64,
    correct: bool,
}

impl Measurement {
    fn algbw(&self) -> f64 {
        self.bytes as f64 / self.seconds / 1e9
    }

    fn busbw(&self, size: usize) -> f64 {
        let n = size as f64;
        let factor = match self.op {
            Op::AllSum => 2.0 * (n - 1.0) / n,
            Op::AllGather => (n - 1.0) / n,
        };
        self.algbw() * factor
    }
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    let args = Args::parse();
    if let Err(message) = check_sizes(&args) {
        Args::command().error(clap::error::ErrorKind::ValueValidation, message).exit();
    }
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("ringleader=warn")),
        )
        .with_writer(std::io::stderr)
        .init();

    let mut group = match Group::init().await {
        Ok(group) => group,
        Err(err) => return ring_failure(None, &err),
    };
    let rank = group.rank();
    let outcome = match args.dtype {
        Dtype::Float32 => run::<f32>(&mut group, &args).await,
        Dtype::Float16 => run::<f16>(&mut group, &args).await,
        Dtype::Bfloat16 => run::<bf16>(&mut group, &args).await,
        Dtype::Int32 => run::<i32>(&mut group, &args).await,
        Dtype::Int64 => run::<i64>(&mut group, &args).await,
        Dtype::Uint8 => run::<u8>(&mut group, &args).await,
    };
    match outcome {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => {
            eprintln!("ringleader-bench: rank {rank}: wrong results; see the lines marked WRONG");
            ExitCode::from(EXIT_WRONG_RESULT)
        }
        Err(err) => ring_failure(Some(rank), &err),
    }
}

fn ring_failure(rank: Option<usize>, err: &RingError) -> ExitCode {
    let mut message = match rank {
        Some(rank) => format!("ringleader-bench: rank {rank}: {err}"),
        None => format!("ringleader-bench: {err}"),
    };
    let mut source = std::error::Error::source(err);
    while let Some(cause) = source {
        message.push_str(&format!("\n  caused by: {cause}"));
        source = cause.source();
    }
    eprintln!("{message}");
    ExitCode::from(EXIT_RING_ERROR)
}

/// Sizes from `min` to `max`, multiplying by `factor`.
fn sizes(args: &Args) -> Vec<usize> {
    let mut sizes = Vec::new();
    let mut bytes = args.min_bytes.max(1);
    while bytes <= args.max_bytes {
        sizes.push(bytes);
        bytes = bytes.saturating_mul(args.step_factor as usize);
    }
    sizes
}

/// Runs every operation and size; returns whether every result was right.
async fn run<T: BenchValue>(group: &mut Group, args: &Args) -> Result<bool, RingError> {
    let elem = std::mem::size_of::<T>();
    let (rank, size) = (group.rank(), group.size());
    let max_count = args.max_bytes / elem;
    let mut buffer: Vec<T> = vec![T::zeroed(); max_count];
    let mut gather_input: Vec<T> = Vec::new();

    // Every rank has joined once the barrier returns, so the header also
    // tells a watching script that the ring is complete.
    group.barrier().await?;
    if rank == 0 {
        print_header(group, args);
    }
    let mut all_correct = true;
    for &op in &args.ops {
        for bytes in sizes(args) {
            let measurement = match op {
                Op::AllSum => bench_all_sum(group, args, &mut buffer, bytes / elem).await?,
                Op::AllGather => {
                    let per_rank = bytes / elem / size;
                    bench_all_gather(group, args, &mut buffer, &mut gather_input, per_rank).await?
                }
            };
            all_correct &= measurement.correct;
            if rank == 0 {
                print_line(args, size, group.connections(), &measurement);
            }
        }
    }
    Ok(all_correct)
}

async fn bench_all_sum<T: BenchValue>(
    group: &mut Group,
    args: &Args,
    buffer: &mut [T],
    count: usize,
) -> Result<Measurement, RingError> {
    let (rank, size) = (group.rank(), group.size());
    let data = &mut buffer[..count];
    for (i, x) in data.iter_mut().enumerate() {
        *x = T::from_small(input_value(rank, i));
    }
    group.all_sum(data).await?;
    let correct = data
        .iter()
        .enumerate()
        .all(|(i, x)| *x == T::from_small(expected_sum(size, i)));

    // The timed iterations keep summing the same buffer: the values stop
    // being meaningful, the traffic does not change.
    let seconds = time_iterations(group, args, async |group: &mut Group| {
        group.all_sum(data).await
    })
    .await?;
    Ok(Measurement {
        op: Op::AllSum,
        bytes: count * std::mem::size_of::<T>(),
        count,
        seconds,
        correct,
    })
}

async fn bench_all_gather<T: BenchValue>(
    group: &mut Group,
    args: &Args,
    buffer: &mut [T],
    input: &mut Vec<T>,
    per_rank: usize,
) -> Result<Measurement, RingError> {
    let (rank, size) = (group.rank(), group.size());
    input.clear();
    input.extend((0..per_rank).map(|i| T::from_small(input_value(rank, i))));
    let output = &mut buffer[..per_rank * size];
    output.fill(T::zeroed());
    group.all_gather(input, output).await?;
    let correct = output
        .iter()
        .enumerate()
        .all(|(j, x)| *x == T::from_small(input_value(j / per_rank.max(1), j % per_rank.max(1))));

    let input = &input[..];
    let seconds = time_iterations(group, args, async |group: &mut Group| {
        group.all_gather(input, output).await
    })
    .await?;
    Ok(Measurement {
        op: Op::AllGather,
        bytes: per_rank * size * std::mem::size_of::<T>(),
        count: per_rank * size,
        seconds,
        correct,
    })
}

/// Runs the warm-up and timed iterations of `op` between barriers and
/// returns the slowest rank's mean seconds per iteration.
async fn time_iterations<F>(group: &mut Group, args: &Args, mut op: F) -> Result<f64, RingError>
where
    F: AsyncFnMut(&mut Group) -> Result<(), RingError>,
{
    for _ in 0..args.warmup_iters {
        op(group).await?;
    }
    group.barrier().await?;
    let started = Instant::now();
    for _ in 0..args.iters {
        op(group).await?;
    }
    let mut seconds = [elapsed_secs(started.elapsed()) / args.iters as f64];
    group.all_max(&mut seconds).await?;
    Ok(seconds[0])
}

fn elapsed_secs(elapsed: Duration) -> f64 {
    elapsed.as_secs_f64()
}

fn dtype_name(dtype: Dtype) -> &'static str {
    match dtype {
        Dtype::Float32 => "float32",
        Dtype::Float16 => "float16",
        Dtype::Bfloat16 => "bfloat16",
        Dtype::Int32 => "int32",
        Dtype::Int64 => "int64",
        Dtype::Uint8 => "uint8",
    }
}

fn op_name(op: Op) -> &'static str {
    match op {
        Op::AllSum => "all_sum",
        Op::AllGather => "all_gather",
    }
}

fn print_header(group: &Group, args: &Args) {
    match args.format {
        Format::Table => {
            println!(
                "# ringleader-bench: {} ranks, {} connection(s) per neighbour, {}, {} iterations after {} warm-up",
                group.size(),
                group.connections(),
                dtype_name(args.dtype),
                args.iters,
                args.warmup_iters
            );
            println!(
                "# {:>12} {:>12} {:>10} {:>12} {:>11} {:>11} {:>6}",
                "size_bytes", "count", "op", "time_us", "algbw_GBps", "busbw_GBps", "check"
            );
        }
        Format::Csv => println!(
            "ranks,connections,dtype,op,size_bytes,count,time_us,algbw_GBps,busbw_GBps,check"
        ),
    }
}

fn print_line(args: &Args, size: usize, connections: usize, m: &Measurement) {
    let check = if m.correct { "ok" } else { "WRONG" };
    let time_us = m.seconds * 1e6;
    match args.format {
        Format::Table => println!(
            "  {:>12} {:>12} {:>10} {:>12.1} {:>11.3} {:>11.3} {:>6}",
            m.bytes,
            m.count,
            op_name(m.op),
            time_us,
            m.algbw(),
            m.busbw(size),
            check
        ),
        Format::Csv => println!(
            "{size},{connections},{},{},{},{},{time_us:.1},{:.4},{:.4},{check}",
            dtype_name(args.dtype),
            op_name(m.op),
            m.bytes,
            m.count,
            m.algbw(),
            m.busbw(size)
        ),
    }
}
