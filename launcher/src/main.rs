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
            init_tracing(false);
            if name == "config" {
                ringleader::app::run_config(ringleader::cli::ConfigCli::parse_from(args))
            } else {
                ringleader::app::run_doctor(ringleader::cli::DoctorCli::parse_from(args))
            }
        }
        _ => {
            let cli = ringleader::cli::Cli::parse_checked(&args);
            init_tracing(cli.verbose);
            ringleader::app::run(cli)
        }
    };
    std::process::exit(code);
}

/// Logs go to stderr; `RUST_LOG` overrides the level `--verbose` picks.
fn init_tracing(verbose: bool) {
    let default = if verbose { "ringleader=debug" } else { "ringleader=warn" };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .event_format(ringleader::logging::Format::new("ringleader", verbose))
        .init();
}
