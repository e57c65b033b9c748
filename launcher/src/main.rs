use clap::Parser;

fn main() {
    let cli = ringleader::cli::Cli::parse();
    init_tracing(cli.verbose);
    std::process::exit(ringleader::app::run(cli));
}

/// Logs go to stderr; `RUST_LOG` overrides the level `--verbose` picks.
fn init_tracing(verbose: bool) {
    let default = if verbose { "ringleader=debug" } else { "ringleader=warn" };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false)
        .init();
}
