//! Command-line interface of the `ringleader` binary, compatible with `mlx.launch` 0.32.

use std::path::PathBuf;

use clap::{CommandFactory, Parser, ValueEnum};

/// Help text printed after the options.
const AFTER_HELP: &str = "\
Examples:
  ringleader -n 4 -- ringleader-bench            4 local ranks of the ring benchmark
  ringleader --hosts 10.0.0.1,10.0.0.2 python3 train.py --epochs 3
  ringleader --hostfile hosts.json --tag-output -- ./job

Every rank gets MLX_RANK, MLX_HOSTFILE (ring backend, 2 or more ranks), MLX_WORLD_SIZE,
RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR and MASTER_PORT.

Exit status:
  0        every rank exited 0
  1-255    the first failing rank's exit code, or 128+N if it was killed by signal N
  2        invalid command line, hostfile or launch environment
  124      --timeout expired
  129/130/143  the launcher received SIGHUP/SIGINT/SIGTERM

Subcommands (when they are the first argument; run a program named config or doctor
with ringleader -- config):
  ringleader config --hosts a,b      check ssh to each host and write a hostfile with its IPs
  ringleader doctor --hostfile H     check ssh, addresses, ring ports, ring edges, the
                                     command and clocks on every host before a long job

Signals: the first Ctrl-C is forwarded to the ranks as SIGINT, SIGTERM and SIGHUP as
SIGTERM; a second signal, or the grace period running out, sends SIGKILL.";

/// Launch a program on many hosts at once, as `mlx.launch` does, and report honestly how it went.
#[derive(Parser, Debug, Clone)]
#[command(name = "ringleader", version, after_help = AFTER_HELP, max_term_width = 100)]
pub struct Cli {
    /// Comma-separated hosts to run on, with ranges such as node[01-04] or n[1-3,7];
    /// 127.0.0.1, localhost and ::1 run locally, any other host (name, IP or
    /// user@host) through ssh [default: the Slurm allocation in SLURM_JOB_NODELIST
    /// with SLURM_TASKS_PER_NODE ranks per node, else 127.0.0.1].
    #[arg(long, value_name = "HOSTS", help_heading = "Hosts")]
    pub hosts: Option<String>,

    /// Number of ranks to start on each host; inside a Slurm allocation, a value above 1
    /// replaces Slurm's tasks per node.
    #[arg(short = 'n', long = "repeat-hosts", default_value_t = 1, value_name = "N",
          value_parser = clap::value_parser!(u32).range(1..=65535), help_heading = "Hosts")]
    pub repeat_hosts: u32,

    /// JSON hostfile in mlx.launch format: a list of {"ssh", "ips", "rdma"} hosts, or an
    /// object with "backend", "envs" and "hosts". Overrides --hosts.
    #[arg(long, value_name = "FILE", help_heading = "Hosts")]
    pub hostfile: Option<PathBuf>,

    /// Distributed backend [default: the hostfile's "backend", else ring].
    #[arg(long, value_enum, help_heading = "Backend")]
    pub backend: Option<Backend>,

    /// First port of the ring backend; each address of each rank takes the next one.
    #[arg(short = 'p', long, default_value_t = 32323, value_name = "PORT",
          env = "RINGLEADER_STARTING_PORT", help_heading = "Backend",
          value_parser = clap::value_parser!(u16).range(1..))]
    pub starting_port: u16,

    /// Ring backend connections per IP address and rank, used in parallel.
    #[arg(long, default_value_t = 1, value_name = "K",
          value_parser = clap::value_parser!(u32).range(1..=64), help_heading = "Backend")]
    pub connections_per_ip: u32,

    /// Port of the NCCL coordinator on rank 0 (nccl backend only).
    #[arg(long, default_value_t = 12345, value_name = "PORT", help_heading = "Backend",
          value_parser = clap::value_parser!(u16).range(1..))]
    pub nccl_port: u16,

    /// Extra arguments for mpirun, split into words as a shell would split them
    /// (mpi backend only; repeatable), such as --mpi-arg '--mca btl self,tcp'.
    #[arg(long, value_name = "ARGS", allow_hyphen_values = true, help_heading = "Backend")]
    pub mpi_arg: Vec<String>,

    /// Set KEY=VALUE in every rank's environment; KEY alone forwards the launcher's own
    /// value. Repeatable; later values win over earlier ones and over the hostfile's "envs".
    #[arg(long, value_name = "KEY[=VALUE]", help_heading = "Ranks")]
    pub env: Vec<String>,

    /// Working directory of every rank; the launch fails if it does not exist
    /// [default: the launcher's directory when it exists on the host].
    #[arg(long, value_name = "DIR", help_heading = "Ranks")]
    pub cwd: Option<String>,

    /// Run the command with this Python interpreter (prepended to the command).
    #[arg(long, value_name = "PATH", help_heading = "Ranks")]
    pub python: Option<String>,

    /// Print the Python interpreter ranks would use and exit.
    #[arg(long, help_heading = "Ranks")]
    pub print_python: bool,

    /// Ranks that receive the launcher's stdin. With `all`, a rank that never
    /// reads its stdin stalls the others once its pipe is full. A
    /// launcher started in the background (`&`) leaves the terminal alone,
    /// and with --backend mpi, mpirun passes stdin to rank 0 only.
    #[arg(long, value_enum, default_value_t = StdinMode::All, value_name = "WHO", help_heading = "Ranks")]
    pub stdin: StdinMode,

    /// Seconds a rank gets to exit after SIGINT/SIGTERM before it gets SIGKILL.
    #[arg(long, default_value_t = 5.0, value_name = "SECONDS", value_parser = parse_seconds,
          help_heading = "Supervision")]
    pub grace: f64,

    /// Stop the whole job after this many seconds and exit 124; a suffix m, h or d
    /// gives minutes, hours or days, and 0 means no limit, as for timeout(1)
    /// [default: no limit].
    #[arg(long, value_name = "SECONDS", value_parser = parse_seconds, help_heading = "Supervision")]
    pub timeout: Option<f64>,

    /// ssh config file to use instead of ~/.ssh/config (passed to ssh as -F).
    #[arg(long, value_name = "FILE", help_heading = "Remote hosts")]
    pub ssh_config: Option<PathBuf>,

    /// Extra ssh option, as ssh -o takes it (repeatable); overrides ringleader's defaults.
    #[arg(long, value_name = "OPTION", help_heading = "Remote hosts")]
    pub ssh_option: Vec<String>,

    /// Add unknown host keys to known_hosts (StrictHostKeyChecking=accept-new);
    /// changed keys are still rejected. Off by default: your ssh config decides.
    #[arg(long, help_heading = "Remote hosts")]
    pub accept_new_host_keys: bool,

    /// Seconds ssh may take to connect to a host (ssh ConnectTimeout).
    #[arg(long, default_value_t = 10.0, value_name = "SECONDS", value_parser = parse_seconds,
          help_heading = "Remote hosts")]
    pub connect_timeout: f64,

    /// Seconds between ssh keepalives; remote ranks stop by themselves after
    /// 3 missed keepalives, when the launcher or its connection is gone.
    #[arg(long, default_value_t = 5.0, value_name = "SECONDS", value_parser = parse_seconds,
          help_heading = "Remote hosts")]
    pub keepalive: f64,

    /// Prefix every output line with the rank and host, as "[3 node1] ".
    #[arg(long, help_heading = "Output")]
    pub tag_output: bool,

    /// Also write each rank's output to DIR/rank-N.stdout and DIR/rank-N.stderr,
    /// replacing such files of an earlier job in DIR.
    #[arg(long, value_name = "DIR", help_heading = "Output")]
    pub output_dir: Option<PathBuf>,

    /// Print the per-rank plan (host, command, environment) and exit without starting anything.
    #[arg(long, help_heading = "Output")]
    pub dry_run: bool,

    /// With --dry-run, print the plan as JSON.
    #[arg(long, requires = "dry_run", help_heading = "Output")]
    pub json: bool,

    /// Log launcher decisions on stderr and set MLX_RING_VERBOSE=1 in the ranks.
    #[arg(long, help_heading = "Output")]
    pub verbose: bool,

    /// The program to run and its arguments; everything after it belongs to it.
    #[arg(trailing_var_arg = true, allow_hyphen_values = true, value_name = "COMMAND",
          required_unless_present = "print_python")]
    pub command: Vec<String>,
}

impl Cli {
    /// Parses the launcher's command line, exiting with a usage error (code
    /// 2) when it is invalid. A mistyped option would otherwise become the
    /// command, since the command may take any argument: the command may
    /// start with `-` only after `--`.
    pub fn parse_checked(args: &[std::ffi::OsString]) -> Cli {
        let cli = Cli::parse_from(args);
        let Some(first) = cli.command.first().filter(|word| word.starts_with('-')) else {
            return cli;
        };
        let start = args.len() - cli.command.len();
        if start > 0 && args[start - 1] == "--" {
            return cli;
        }
        // With --python the command may start with the interpreter's own
        // options (`-c CODE`, `-m MODULE`, `-u`), as with mlx.launch.
        const PYTHON_OPTIONS: [&str; 12] = ["-c", "-m", "-u", "-O", "-OO", "-B", "-E", "-I", "-s", "-S", "-X", "-W"];
        if cli.python.is_some() && PYTHON_OPTIONS.contains(&first.as_str()) {
            return cli;
        }
        // Parsing again without hyphen values reads attached values such
        // as `-n2` (taken for the command above), and otherwise gives
        // clap's own message, with its suggestion of a similar option.
        let strict = Cli::command().mut_arg("command", |arg| arg.allow_hyphen_values(false));
        let parsed = strict
            .try_get_matches_from(args)
            .and_then(|matches| <Cli as clap::FromArgMatches>::from_arg_matches(&matches));
        match parsed {
            Ok(cli) if cli.command.first().is_none_or(|word| !word.starts_with('-')) => cli,
            Ok(_) => Cli::command()
                .error(
                    clap::error::ErrorKind::UnknownArgument,
                    format!("unknown option '{first}'; put -- before a command that starts with '-'"),
                )
                .exit(),
            Err(error) => error.exit(),
        }
    }
}

/// Help text printed after the options of `ringleader doctor`.
const DOCTOR_AFTER_HELP: &str = "\
Checks, one row each:
  ssh/local  the probe starts on the rank's host through the transport the rank would use
  clock      the host's clock is within 1 s of the launcher's
  address    each IP in the rank's ring addresses is assigned on its host
  port       each ring port is free there (the probe keeps it open for the edge check)
  command    COMMAND exists at the path the launcher resolves, on every host
  edge       each rank opens a TCP connection to its right neighbour's ring addresses

With --backend nccl, jaccl or jaccl-ring, rank 0 checks the coordinator's address and port
instead, and every other rank connects to it. With --backend mpi, no port is checked.

The probe is this ringleader binary, run as 'ringleader doctor --probe'; it must exist at
the same path on every remote host. Exit status: 0 when every check passes, 1 when one
fails (each failure is also named on stderr), 2 for invalid hosts or options.";

/// Check a cluster before a long job: ssh, ring addresses and ports, ring
/// edges, the command and clocks, with one row per check.
#[derive(Parser, Debug, Clone)]
#[command(name = "ringleader doctor", version, after_help = DOCTOR_AFTER_HELP, max_term_width = 100)]
pub struct DoctorCli {
    /// Comma-separated hosts, with ranges such as node[01-04] [default: the Slurm
    /// allocation, else 127.0.0.1].
    #[arg(long, value_name = "HOSTS", help_heading = "Hosts")]
    pub hosts: Option<String>,

    /// Number of ranks on each host.
    #[arg(short = 'n', long = "repeat-hosts", default_value_t = 1, value_name = "N",
          value_parser = clap::value_parser!(u32).range(1..=65535), help_heading = "Hosts")]
    pub repeat_hosts: u32,

    /// JSON hostfile in mlx.launch format. Overrides --hosts.
    #[arg(long, value_name = "FILE", help_heading = "Hosts")]
    pub hostfile: Option<PathBuf>,

    /// Backend whose ports to check: ring checks every rank's ring ports and
    /// edges, nccl and jaccl rank 0's coordinator port, mpi none
    /// [default: the hostfile's "backend", else ring].
    #[arg(long, value_enum, help_heading = "Backend")]
    pub backend: Option<Backend>,

    /// First ring port, and the jaccl coordinator's port, as for the launch.
    #[arg(short = 'p', long, default_value_t = 32323, value_name = "PORT",
          env = "RINGLEADER_STARTING_PORT", help_heading = "Backend",
          value_parser = clap::value_parser!(u16).range(1..))]
    pub starting_port: u16,

    /// Ring connections per IP address and rank, as for the launch.
    #[arg(long, default_value_t = 1, value_name = "K",
          value_parser = clap::value_parser!(u32).range(1..=64), help_heading = "Backend")]
    pub connections_per_ip: u32,

    /// Port of the NCCL coordinator on rank 0, as for the launch.
    #[arg(long, default_value_t = 12345, value_name = "PORT", help_heading = "Backend",
          value_parser = clap::value_parser!(u16).range(1..))]
    pub nccl_port: u16,

    /// Seconds each stage of the probes may take (start and report, then connect).
    #[arg(long, default_value_t = 30.0, value_name = "SECONDS", value_parser = parse_positive_seconds)]
    pub timeout: f64,

    #[command(flatten)]
    pub ssh: crate::exec::ssh::SshArgs,

    /// Run as the probe on a rank's host (started by doctor itself).
    #[arg(long, hide = true)]
    pub probe: bool,

    /// The command the job will run, checked to exist at the same path on every host.
    #[arg(trailing_var_arg = true, allow_hyphen_values = true, value_name = "COMMAND")]
    pub command: Vec<String>,
}

/// Help text printed after the options of `ringleader config`.
const CONFIG_AFTER_HELP: &str = "\
Linux hosts report their addresses with 'ip -j addr' (the address of the interface that
carries the default route, else the first global IPv4 address); macOS hosts with
'ipconfig getifaddr en0' (then en1). Thunderbolt discovery and RDMA setup
(mlx.distributed_config --over thunderbolt) need macOS hardware and are not supported.

Exit status: 0 when the hostfile was written, 1 when a host failed (each is named on
stderr), 2 for invalid hosts or options.";

/// Check passwordless ssh to every host and write a hostfile with each
/// host's IP address, as mlx.distributed_config --over ethernet does.
#[derive(Parser, Debug, Clone)]
#[command(name = "ringleader config", version, after_help = CONFIG_AFTER_HELP, max_term_width = 100)]
pub struct ConfigCli {
    /// Comma-separated hosts, with ranges such as node[01-04].
    #[arg(long, value_name = "HOSTS", default_value = "127.0.0.1", help_heading = "Hosts")]
    pub hosts: String,

    /// JSON hostfile in mlx.launch format whose hosts to configure. Overrides --hosts.
    #[arg(long, value_name = "FILE", help_heading = "Hosts")]
    pub hostfile: Option<PathBuf>,

    /// Leave out hosts that ssh cannot reach instead of failing.
    #[arg(long, help_heading = "Hosts")]
    pub ignore_unreachable: bool,

    /// Connectivity to configure; only ethernet is supported.
    #[arg(long, value_enum, default_value_t = Over::Ethernet, value_name = "LINK")]
    pub over: Over,

    /// Backend recorded in the hostfile [default: ring].
    #[arg(long, value_enum)]
    pub backend: Option<Backend>,

    /// KEY=VALUE recorded in the hostfile's "envs" (repeatable).
    #[arg(long, value_name = "KEY[=VALUE]")]
    pub env: Vec<String>,

    /// Write the hostfile here instead of printing it.
    #[arg(long, value_name = "FILE")]
    pub output_hostfile: Option<PathBuf>,

    #[command(flatten)]
    pub ssh: crate::exec::ssh::SshArgs,
}

/// Links `ringleader config` can set up hosts for.
#[derive(Copy, Clone, Debug, PartialEq, Eq, ValueEnum)]
pub enum Over {
    Ethernet,
    /// mlx.distributed_config's Thunderbolt discovery; not supported.
    Thunderbolt,
}

/// Distributed backends known to mlx.launch.
#[derive(Copy, Clone, Debug, PartialEq, Eq, ValueEnum, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Backend {
    Ring,
    Mpi,
    Nccl,
    Jaccl,
    JacclRing,
}

impl Backend {
    pub fn parse(name: &str) -> Option<Backend> {
        <Backend as ValueEnum>::from_str(name, false).ok()
    }

    pub fn name(self) -> &'static str {
        match self {
            Backend::Ring => "ring",
            Backend::Mpi => "mpi",
            Backend::Nccl => "nccl",
            Backend::Jaccl => "jaccl",
            Backend::JacclRing => "jaccl-ring",
        }
    }
}

/// The ranks that get the launcher's stdin.
#[derive(Copy, Clone, Debug, PartialEq, Eq, ValueEnum)]
pub enum StdinMode {
    /// Every rank reads a copy of the launcher's stdin.
    All,
    /// Only rank 0 reads the launcher's stdin.
    #[value(name = "0")]
    RankZero,
    /// No rank reads it; ranks get /dev/null.
    None,
}

/// Parses a duration in seconds, with timeout(1)'s optional unit suffix:
/// `s` (seconds), `m` (minutes), `h` (hours) or `d` (days).
fn parse_seconds(text: &str) -> Result<f64, String> {
    let (number, unit) = match text.char_indices().last() {
        Some((at, 's')) => (&text[..at], 1.0),
        Some((at, 'm')) => (&text[..at], 60.0),
        Some((at, 'h')) => (&text[..at], 3600.0),
        Some((at, 'd')) => (&text[..at], 86400.0),
        _ => (text, 1.0),
    };
    let value: f64 = number
        .parse()
        .map_err(|_| format!("invalid number of seconds: {text:?} (examples: 30, 2.5, 10m, 1h)"))?;
    let seconds = value * unit;
    if !seconds.is_finite() || !(0.0..=1e9).contains(&seconds) {
        return Err(format!("seconds must be between 0 and 1e9, got {text}"));
    }
    Ok(seconds)
}

/// Parses a duration as [`parse_seconds`] does, but rejects 0.
fn parse_positive_seconds(text: &str) -> Result<f64, String> {
    match parse_seconds(text)? {
        seconds if seconds > 0.0 => Ok(seconds),
        _ => Err(format!("must be more than 0 seconds, got {text}")),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn attached_short_values_are_options_not_the_command() {
        for args in [&["-n2", "echo", "hi"][..], &["-n=2", "echo", "hi"], &["-n2", "--", "echo", "hi"]] {
            let argv: Vec<std::ffi::OsString> = std::iter::once("ringleader").chain(args.iter().copied()).map(Into::into).collect();
            let cli = Cli::parse_checked(&argv);
            assert_eq!(cli.repeat_hosts, 2, "{args:?}");
            assert_eq!(cli.command, ["echo", "hi"], "{args:?}");
        }
        let argv: Vec<std::ffi::OsString> = ["ringleader", "-p40000", "true"].into_iter().map(Into::into).collect();
        assert_eq!(Cli::parse_checked(&argv).starting_port, 40000);
    }

    #[test]
    fn python_options_start_the_command_after_python() {
        let argv: Vec<std::ffi::OsString> =
            ["ringleader", "-n", "2", "--python", "python3", "-c", "print(1)"].into_iter().map(Into::into).collect();
        let cli = Cli::parse_checked(&argv);
        assert_eq!(cli.python.as_deref(), Some("python3"));
        assert_eq!(cli.command, ["-c", "print(1)"]);
    }

    #[test]
    fn durations_take_timeouts_unit_suffixes() {
        for (text, seconds) in [("30", 30.0), ("2.5", 2.5), ("45s", 45.0), ("10m", 600.0), ("1.5h", 5400.0), ("1d", 86400.0)] {
            assert_eq!(parse_seconds(text), Ok(seconds), "{text}");
        }
        for text in ["", "m", "10x", "-1", "1e10", "nan", "ten"] {
            assert!(parse_seconds(text).is_err(), "{text}");
        }
        assert!(parse_positive_seconds("0").is_err());
        assert_eq!(parse_positive_seconds("0.5"), Ok(0.5));
    }

    use super::*;

    fn parse(args: &[&str]) -> Cli {
        Cli::try_parse_from(std::iter::once("ringleader").chain(args.iter().copied())).unwrap()
    }

    #[test]
    fn flags_after_command_belong_to_command() {
        let cli = parse(&["-n", "2", "python3", "train.py", "--verbose", "-n", "3"]);
        assert_eq!(cli.repeat_hosts, 2);
        assert!(!cli.verbose);
        assert_eq!(cli.command, ["python3", "train.py", "--verbose", "-n", "3"]);
    }

    #[test]
    fn double_dash_separates_command() {
        let cli = parse(&["--verbose", "--", "--weird-program", "x"]);
        assert!(cli.verbose);
        assert_eq!(cli.command, ["--weird-program", "x"]);
    }

    #[test]
    fn defaults_match_mlx_launch() {
        let cli = parse(&["true"]);
        assert_eq!(cli.hosts, None);
        assert_eq!(cli.repeat_hosts, 1);
        assert_eq!(cli.starting_port, 32323);
        assert_eq!(cli.connections_per_ip, 1);
        assert_eq!(cli.stdin, StdinMode::All);
        assert_eq!(cli.grace, 5.0);
        assert_eq!(cli.backend, None);
    }

    #[test]
    fn zero_repeat_is_rejected() {
        assert!(Cli::try_parse_from(["ringleader", "-n", "0", "true"]).is_err());
    }

    #[test]
    fn negative_grace_is_rejected() {
        assert!(Cli::try_parse_from(["ringleader", "--grace", "-1", "true"]).is_err());
    }
}
