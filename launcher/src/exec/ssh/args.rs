//! The command-line flags of the ssh transport, ready to flatten into a clap
//! parser with `#[command(flatten)]`. Flag names match the ones the main
//! `ringleader` command line uses for the same settings.

use std::path::PathBuf;
use std::time::Duration;

use super::SshOptions;

/// Flags for remote hosts, under the "SSH" help heading.
#[derive(Clone, Debug, clap::Args)]
pub struct SshArgs {
    /// ssh config file for remote hosts, passed to ssh as -F. It replaces
    /// ~/.ssh/config and the system-wide config.
    #[arg(long, value_name = "FILE", help_heading = "SSH")]
    pub ssh_config: Option<PathBuf>,

    /// Extra ssh option, passed as `-o OPTION` (repeatable). It overrides
    /// ringleader's ssh defaults (BatchMode, timeouts, keepalives).
    #[arg(long = "ssh-option", value_name = "OPTION", help_heading = "SSH")]
    pub ssh_options: Vec<String>,

    /// Add unknown host keys to known_hosts (StrictHostKeyChecking=accept-new).
    /// Changed host keys are still rejected.
    #[arg(long = "accept-new-host-keys", help_heading = "SSH")]
    pub ssh_accept_new_host_keys: bool,

    /// Seconds ssh may take to connect to a host (ssh's ConnectTimeout).
    #[arg(long = "connect-timeout", default_value_t = 10.0, value_name = "SECONDS",
          value_parser = parse_positive_seconds, help_heading = "SSH")]
    pub ssh_connect_timeout: f64,

    /// Seconds between keepalives, both ssh's own and the launcher's
    /// heartbeat to each host.
    #[arg(long = "keepalive", default_value_t = 5.0, value_name = "SECONDS",
          value_parser = parse_positive_seconds, help_heading = "SSH")]
    pub ssh_keepalive: f64,

    /// Missed keepalives after which ssh drops the connection and the remote
    /// host stops its ranks.
    #[arg(long = "keepalive-count", default_value_t = 3, value_name = "N",
          value_parser = clap::value_parser!(u32).range(1..), help_heading = "SSH")]
    pub ssh_keepalive_count: u32,

    /// Open one ssh connection per rank instead of sharing a connection
    /// (ControlMaster) among the ranks of a host.
    #[arg(long, help_heading = "SSH")]
    pub ssh_no_multiplex: bool,

    /// Maximum rank sessions per shared ssh connection. Keep it below the
    /// server's MaxSessions (10 by default).
    #[arg(long, default_value_t = 8, value_name = "N",
          value_parser = clap::value_parser!(u32).range(1..), help_heading = "SSH")]
    pub ssh_max_sessions: u32,

    /// Maximum concurrent ssh handshakes per server. Keep it below the
    /// server's MaxStartups (10 by default).
    #[arg(long, default_value_t = 4, value_name = "N",
          value_parser = clap::value_parser!(u32).range(1..), help_heading = "SSH")]
    pub ssh_max_startups: u32,

    /// The ssh client program.
    #[arg(long, default_value = "ssh", value_name = "PATH", help_heading = "SSH")]
    pub ssh_program: PathBuf,
}

impl SshArgs {
    /// Builds the transport's options. `grace` is the launcher's `--grace`,
    /// which the remote side also uses when it stops ranks on its own.
    pub fn to_options(&self, grace: Duration) -> SshOptions {
        SshOptions {
            program: self.ssh_program.clone(),
            config_file: self.ssh_config.clone(),
            extra_options: self.ssh_options.clone(),
            accept_new_host_keys: self.ssh_accept_new_host_keys,
            connect_timeout: Duration::from_secs_f64(self.ssh_connect_timeout),
            keepalive_interval: Duration::from_secs_f64(self.ssh_keepalive),
            keepalive_count_max: self.ssh_keepalive_count,
            grace,
            multiplex: !self.ssh_no_multiplex,
            max_sessions_per_connection: self.ssh_max_sessions as usize,
            max_startups_per_host: self.ssh_max_startups as usize,
            ..SshOptions::default()
        }
    }
}

fn parse_positive_seconds(text: &str) -> Result<f64, String> {
    let seconds: f64 = text
        .parse()
        .map_err(|_| format!("invalid number of seconds: {text:?}"))?;
    if !seconds.is_finite() || seconds <= 0.0 || seconds > 1e6 {
        return Err(format!(
            "seconds must be above 0 and at most 1e6, got {text}"
        ));
    }
    Ok(seconds)
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        ssh: SshArgs,
    }

    #[test]
    fn defaults_match_ssh_options() {
        let cli = Cli::try_parse_from(["ringleader"]).unwrap();
        let options = cli.ssh.to_options(Duration::from_secs(5));
        let defaults = SshOptions::default();
        assert_eq!(options.connect_timeout, defaults.connect_timeout);
        assert_eq!(options.keepalive_interval, defaults.keepalive_interval);
        assert_eq!(options.keepalive_count_max, defaults.keepalive_count_max);
        assert_eq!(options.multiplex, defaults.multiplex);
        assert_eq!(
            options.max_sessions_per_connection,
            defaults.max_sessions_per_connection
        );
        assert_eq!(
            options.max_startups_per_host,
            defaults.max_startups_per_host
        );
        assert_eq!(options.program, defaults.program);
    }

    #[test]
    fn flags_reach_the_options() {
        let cli = Cli::try_parse_from([
            "ringleader",
            "--ssh-config",
            "/etc/cluster/ssh_config",
            "--ssh-option",
            "ProxyJump=bastion",
            "--ssh-option",
            "Ciphers=aes128-gcm@openssh.com",
            "--accept-new-host-keys",
            "--connect-timeout",
            "2.5",
            "--keepalive",
            "1",
            "--keepalive-count",
            "7",
            "--ssh-no-multiplex",
            "--ssh-max-sessions",
            "4",
            "--ssh-max-startups",
            "2",
        ])
        .unwrap();
        let options = cli.ssh.to_options(Duration::from_secs(9));
        assert_eq!(
            options.config_file,
            Some(PathBuf::from("/etc/cluster/ssh_config"))
        );
        assert_eq!(
            options.extra_options,
            ["ProxyJump=bastion", "Ciphers=aes128-gcm@openssh.com"]
        );
        assert!(options.accept_new_host_keys);
        assert_eq!(options.connect_timeout, Duration::from_millis(2500));
        assert_eq!(options.keepalive_interval, Duration::from_secs(1));
        assert_eq!(options.keepalive_count_max, 7);
        assert!(!options.multiplex);
        assert_eq!(options.max_sessions_per_connection, 4);
        assert_eq!(options.max_startups_per_host, 2);
        assert_eq!(options.grace, Duration::from_secs(9));
    }

    #[test]
    fn invalid_values_are_rejected() {
        for args in [
            ["--connect-timeout", "0"],
            ["--keepalive", "-1"],
            ["--keepalive-count", "0"],
            ["--ssh-max-sessions", "0"],
        ] {
            let parsed = Cli::try_parse_from(["ringleader", args[0], args[1]]);
            assert!(parsed.is_err(), "{args:?} accepted");
        }
    }
}
