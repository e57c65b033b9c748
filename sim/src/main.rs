//! `ringleader-sim`: run the launcher against a simulated cluster with
//! faults, sweep many seeds, shrink failures and replay them.

// Failed writes to stdout or stderr are ignored instead of panicking.
use ringleader::{eprintln, println};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use clap::{Parser, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};
use ringleader_sim::cluster::{self, RunResult, RunSpec, Timing};
use ringleader_sim::fault::Schedule;
use ringleader_sim::scenario::{self, Scenario};
use ringleader_sim::sweep::{self, SeedOutcome};
use ringleader_sim::{DETERMINISTIC, SEED_VAR};

/// Exit code when a run broke an invariant.
const EXIT_VIOLATION: u8 = 1;
/// Exit code for invalid arguments, unknown scenarios and unreadable files.
const EXIT_USAGE: u8 = 2;

/// Runs the ringleader launcher and ring backend, unchanged, against a
/// deterministic simulated cluster (turmoil) and checks its invariants.
///
/// A run is a scenario (see `list`) plus a seed. The seed decides the
/// network's timing and the scenario's random faults, so the same seed
/// always replays the same run. Failing runs print the command that replays them.
///
/// Exit codes: 0 every run passed, 1 a run broke an invariant, 2 usage error.
#[derive(Parser)]
#[command(name = "ringleader-sim", version, max_term_width = 100)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// List the scenarios with one line each.
    List,
    /// Run one scenario with one seed and check it.
    ///
    /// Example: ringleader-sim run --scenario all-sum --seed 7
    Run {
        /// Scenario name, from `list`.
        #[arg(long, value_name = "NAME")]
        scenario: String,
        /// Seed of the run; a random one (printed) when neither this nor the variable is set.
        #[arg(long, value_name = "S", env = SEED_VAR)]
        seed: Option<u64>,
        /// Print every recorded event.
        #[arg(long)]
        events: bool,
        /// Run the supervisor with its planted test bug (it never signals the last rank).
        #[arg(long, hide = true)]
        planted_bug: bool,
        /// Also run the seed a second time and fail if the event logs differ.
        #[arg(long)]
        check_determinism: bool,
    },
    /// Run many seeds of one scenario, show a summary and shrink the first failure.
    ///
    /// Example: ringleader-sim sweep --scenario all-sum --seeds 1000
    Sweep {
        /// Scenario name, from `list`.
        #[arg(long, value_name = "NAME")]
        scenario: String,
        /// Number of seeds to run.
        #[arg(long, value_name = "N", default_value_t = 100, value_parser = clap::value_parser!(u64).range(1..))]
        seeds: u64,
        /// First seed; the sweep runs FIRST, FIRST+1, ...
        #[arg(long, value_name = "FIRST", env = SEED_VAR, default_value_t = 1)]
        first_seed: u64,
        /// Simulations run at once, one thread each [default: the number of CPUs].
        #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..=1024))]
        jobs: Option<u64>,
        /// File the shrunk schedule of the first failing seed is written to.
        #[arg(
            long,
            value_name = "FILE",
            default_value = "ringleader-sim-failure.json"
        )]
        out: PathBuf,
        /// Do not shrink the first failing seed.
        #[arg(long)]
        no_shrink: bool,
        /// Hide the progress bar.
        #[arg(long)]
        quiet: bool,
        /// Run the supervisor with its planted test bug (it never signals the last rank).
        #[arg(long, hide = true)]
        planted_bug: bool,
    },
    /// Replay a schedule file written by `sweep` (or by hand) and check it.
    ///
    /// The file is JSON: {"scenario": NAME, "seed": S, "faults": [{"at_ms": 300,
    /// "kind": "crash_host", "host": 2}, ...]}. Fault kinds: crash_host,
    /// bounce_host, partition, repair, hold, release (with "a" and "b" each
    /// "launcher" or {"host": N}), latency (plus "ms"), kill_rank, exit_rank
    /// (plus "code", 0 to 255), interrupt_launcher, terminate_launcher. Faults
    /// happen in the order of their times, whatever order the file lists them
    /// in; faults at the same time happen in file order.
    Replay {
        /// The schedule file.
        file: PathBuf,
        /// Print every recorded event.
        #[arg(long)]
        events: bool,
    },
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("RINGLEADER_SIM_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("off")),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::List => {
            list();
            Ok(true)
        }
        Command::Run {
            scenario,
            seed,
            events,
            planted_bug,
            check_determinism,
        } => run(&scenario, seed, events, planted_bug, check_determinism),
        Command::Sweep {
            scenario,
            seeds,
            first_seed,
            jobs,
            out,
            no_shrink,
            quiet,
            planted_bug,
        } => {
            let jobs = jobs.map_or_else(
                || std::thread::available_parallelism().map_or(1, |n| n.get()),
                |jobs| jobs as usize,
            );
            run_sweep(
                &scenario,
                first_seed,
                seeds,
                jobs,
                &out,
                !no_shrink,
                quiet,
                planted_bug,
            )
        }
        Command::Replay { file, events } => replay(&file, events),
    };
    match result {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(EXIT_VIOLATION),
        Err(message) => {
            eprintln!("ringleader-sim: error: {message}");
            ExitCode::from(EXIT_USAGE)
        }
    }
}

fn find_scenario(name: &str) -> Result<Scenario, String> {
    scenario::find(name).ok_or_else(|| {
        let names: Vec<&str> = scenario::all().iter().map(|s| s.name).collect();
        format!(
            "unknown scenario {name:?}\nhint: use one of {}",
            names.join(", ")
        )
    })
}

fn list() {
    for scenario in scenario::all() {
        println!("{:<14} {}", scenario.name, scenario.about);
    }
}

fn warn_if_not_deterministic() {
    if !DETERMINISTIC {
        eprintln!(
            "ringleader-sim: warning: built without --cfg tokio_unstable, so tokio's select! order is not seeded and a replay can differ when two branches are ready at once\nhint: build with RUSTFLAGS=\"--cfg tokio_unstable\" for guaranteed replays"
        );
    }
}

fn replay_command(spec: &RunSpec) -> String {
    let bug = if spec.planted_bug {
        " --planted-bug"
    } else {
        ""
    };
    format!(
        "ringleader-sim run --scenario {} --seed {}{bug}",
        spec.scenario.name, spec.seed
    )
}

fn run(
    name: &str,
    seed: Option<u64>,
    events: bool,
    planted_bug: bool,
    check_determinism: bool,
) -> Result<bool, String> {
    let scenario = find_scenario(name)?;
    warn_if_not_deterministic();
    let seed = seed.unwrap_or_else(random_seed);
    eprintln!("ringleader-sim: scenario {name}, seed {seed}");
    let mut spec = RunSpec::from_seed(scenario, seed);
    spec.planted_bug = planted_bug;
    let result = if check_determinism {
        sweep::determinism(&spec).map_err(|difference| {
            format!(
                "seed {seed} is not deterministic: {difference}\nreplay: {}",
                replay_command(&spec)
            )
        })?
    } else {
        cluster::run(&spec)
    };
    print_result(&spec, &result, events);
    if !result.passed() {
        eprintln!("replay: {}", replay_command(&spec));
    }
    Ok(result.passed())
}

/// Checks that `path` can be created or overwritten, without changing an
/// existing file.
fn check_writable(path: &std::path::Path) -> Result<(), String> {
    let existed = path.exists();
    std::fs::OpenOptions::new()
        .append(true)
        .create(true)
        .open(path)
        .map_err(|error| format!("--out {}: cannot write the file: {error}", path.display()))?;
    if !existed {
        let _ = std::fs::remove_file(path);
    }
    Ok(())
}

fn replay(file: &PathBuf, events: bool) -> Result<bool, String> {
    let text = std::fs::read_to_string(file)
        .map_err(|e| format!("cannot read {}: {e}", file.display()))?;
    let mut schedule: Schedule = serde_json::from_str(&text)
        .map_err(|e| format!("{} is not a valid schedule: {e}", file.display()))?;
    let scenario = find_scenario(&schedule.scenario)?;
    schedule
        .validate(scenario.hosts)
        .map_err(|problem| format!("{}: {problem}", file.display()))?;
    warn_if_not_deterministic();
    eprintln!(
        "ringleader-sim: replaying {} (scenario {}, seed {})",
        file.display(),
        schedule.scenario,
        schedule.seed
    );
    let spec = RunSpec {
        scenario,
        seed: schedule.seed,
        faults: schedule.faults,
        planted_bug: schedule.planted_bug,
        timing: Timing::default(),
    };
    let result = cluster::run(&spec);
    print_result(&spec, &result, events);
    if !result.passed() {
        eprintln!("replay: ringleader-sim replay {}", file.display());
    }
    Ok(result.passed())
}

fn print_result(spec: &RunSpec, result: &RunResult, events: bool) {
    if events {
        for record in &result.log.records {
            println!(
                "{}",
                serde_json::to_string(record).expect("a record serializes")
            );
        }
    }
    for fault in &spec.faults {
        eprintln!("fault at {:>6} ms: {}", fault.at_ms, fault.fault);
    }
    let exit = result
        .exit_code()
        .map_or("none (the launcher did not return)".to_string(), |c| {
            c.to_string()
        });
    eprintln!(
        "launcher exit code: {exit}; simulated time {} ms",
        result.end_ms
    );
    if result.passed() {
        eprintln!("PASS: every invariant held");
    }
    for violation in &result.violations {
        eprintln!("FAIL: {violation}");
    }
}

fn random_seed() -> u64 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    (nanos as u64) ^ u64::from(std::process::id()).rotate_left(32)
}

#[allow(clippy::too_many_arguments)]
fn run_sweep(
    name: &str,
    first_seed: u64,
    seeds: u64,
    jobs: usize,
    out: &PathBuf,
    shrink: bool,
    quiet: bool,
    planted_bug: bool,
) -> Result<bool, String> {
    let scenario = find_scenario(name)?;
    let last_seed = first_seed.checked_add(seeds - 1).ok_or_else(|| {
        format!(
            "--first-seed {first_seed} plus --seeds {seeds} goes past the largest seed, {}",
            u64::MAX
        )
    })?;
    // A typo in --out must not cost the whole sweep: check it can be written now.
    check_writable(out)?;
    warn_if_not_deterministic();
    eprintln!("ringleader-sim: sweeping scenario {name}, seeds {first_seed} to {last_seed}, {jobs} jobs");
    let bar = if quiet {
        ProgressBar::hidden()
    } else {
        ProgressBar::new(seeds)
    };
    bar.set_style(
        ProgressStyle::with_template(
            "{bar:40} {pos}/{len} seeds, {msg} [{elapsed_precise}, eta {eta}]",
        )
        .expect("a valid progress template"),
    );
    let failures = std::sync::atomic::AtomicU64::new(0);
    let started = Instant::now();
    let outcomes = sweep::sweep(
        &scenario,
        first_seed,
        seeds,
        jobs,
        planted_bug,
        &|outcome| {
            if !outcome.passed() {
                failures.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
            bar.set_message(format!(
                "{} failed",
                failures.load(std::sync::atomic::Ordering::Relaxed)
            ));
            bar.inc(1);
        },
    );
    bar.finish_and_clear();
    let wall = started.elapsed();
    print_summary(&outcomes, wall);

    let Some(failed) = outcomes.iter().find(|o| !o.passed()) else {
        return Ok(true);
    };
    let mut spec = RunSpec::from_seed(scenario, failed.seed);
    spec.planted_bug = planted_bug;
    eprintln!(
        "first failing seed {}: replay with\n  {}",
        failed.seed,
        replay_command(&spec)
    );
    if shrink {
        let (schedule, result) = sweep::shrink(&spec);
        let json = serde_json::to_string_pretty(&schedule).expect("a schedule serializes");
        std::fs::write(out, format!("{json}\n"))
            .map_err(|e| format!("cannot write {}: {e}", out.display()))?;
        eprintln!(
            "shrunk from {} to {} faults; it still fails with:",
            spec.faults.len(),
            schedule.faults.len()
        );
        for violation in &result.violations {
            eprintln!("  {violation}");
        }
        println!("{json}");
        eprintln!(
            "replay the shrunk schedule with\n  ringleader-sim replay {}",
            out.display()
        );
    }
    Ok(false)
}

fn print_summary(outcomes: &[SeedOutcome], wall: std::time::Duration) {
    let passed = outcomes.iter().filter(|o| o.passed()).count();
    let sim_ms: u64 = outcomes.iter().map(|o| o.sim_ms).sum();
    // Keyed by number, so codes sort as numbers; `None` (no exit) comes first.
    let mut by_exit: std::collections::BTreeMap<Option<i32>, (usize, usize)> = Default::default();
    for outcome in outcomes {
        let entry = by_exit.entry(outcome.exit_code).or_default();
        entry.0 += 1;
        if !outcome.passed() {
            entry.1 += 1;
        }
    }
    println!("{:<12} {:>6} {:>8}", "exit code", "runs", "failed");
    for (code, (runs, failed)) in &by_exit {
        let code = code.map_or("none".to_string(), |code| code.to_string());
        println!("{code:<12} {runs:>6} {failed:>8}");
    }
    let wall_s = wall.as_secs_f64();
    println!(
        "{} runs, {passed} passed, {} failed; {:.1} simulated s in {:.1} wall s ({:.1} simulated s per wall s)",
        outcomes.len(),
        outcomes.len() - passed,
        sim_ms as f64 / 1000.0,
        wall_s,
        sim_ms as f64 / 1000.0 / wall_s.max(1e-9)
    );
    for outcome in outcomes.iter().filter(|o| !o.passed()).take(10) {
        let first = outcome
            .violations
            .first()
            .map(|v| v.to_string())
            .unwrap_or_default();
        println!("seed {} failed: {first}", outcome.seed);
    }
}
