use clap::Parser;

fn main() {
    ringleader::exec::fd_limit::raise();
    // Subcommands are recognised only as the first argument, because the
    // launcher's own command line ends in the program to run.
    let args: Vec<std::ffi::OsString> = std::env::args_os().collect();
    let subcommand = args.get(1).and_then(|arg| arg.to_str());
    let code = match subcommand {
        Some(ringleader::exec::guard::GUARD_SUBCOMMAND) => ringleader::exec::guard::run(&args[2..]),
        Some(name @ ("config" | "doctor")) => {
            let args = std::iter::once(format!("ringleader {name}").into()).chain(args[2..].iter().cloned());
            let _log = init_tracing(false);
            if name == "config" {
                ringleader::app::run_config(ringleader::cli::ConfigCli::parse_from(args))
            } else {
                ringleader::app::run_doctor(ringleader::cli::DoctorCli::parse_from(args))
            }
        }
        _ => {
            let cli = ringleader::cli::Cli::parse_checked(&args);
            let _log = init_tracing(cli.verbose);
            ringleader::app::run(cli)
        }
    };
    std::process::exit(code);
}

/// Log lines that wait for the stderr thread at most.
const LOG_QUEUE_LINES: usize = 4096;

/// Logs go to stderr; `RUST_LOG` overrides the level `--verbose` picks. A
/// thread of their own writes them, so a reader that stopped reading (a
/// paused pager) never stalls the launcher's event loop. Dropping the
/// returned guard writes what is queued, waiting about a second at most.
fn init_tracing(verbose: bool) -> tracing_appender::non_blocking::WorkerGuard {
    // The queue's slots are allocated up front, so the default of 128,000
    // lines costs about 3 ms at every start. The launcher logs far fewer
    // lines, and lines beyond the limit are dropped.
    let (writer, guard) = tracing_appender::non_blocking::NonBlockingBuilder::default()
        .buffered_lines_limit(LOG_QUEUE_LINES)
        .finish(std::io::stderr());
    let default = if verbose { "ringleader=debug" } else { "ringleader=warn" };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(writer)
        .with_ansi(false)
        .event_format(ringleader::logging::Format::new("ringleader", verbose))
        .init();
    guard
}
