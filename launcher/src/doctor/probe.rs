//! The probe: `ringleader doctor --probe`, started on each rank's host
//! through the same transport as a real rank.
//!
//! It speaks a line protocol on stdin and stdout. It prints its clock, tries
//! to listen on each of the rank's ring addresses and keeps the listeners
//! open, checks the command path, then prints `ready`. The launcher then
//! sends `connect ADDRESS` lines for the right neighbour's addresses, and the
//! probe reports each connection. It exits on `done` or at the end of stdin,
//! which the launcher sends once every probe has connected.
//!
//! ```text
//! probe -> launcher            launcher -> probe
//! clock 1733346000.125
//! address 10.0.0.1 ok
//! port 10.0.0.1:32323 busy
//! command /usr/bin/python3 ok
//! ready
//!                              connect 10.0.0.2:32324
//! connect 10.0.0.2:32324 ok
//!                              done
//! ```
//!
//! Results are one word (`ok`, `busy`, `unassigned`, `missing`,
//! `not-executable`, `failed`) and, for `failed`, the error text.

use std::io::{self, BufRead, Write};
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::time::{Duration, SystemTime};

/// Variable with the rank's ring addresses, comma-separated `ip:port`.
pub const ADDRESSES_VAR: &str = "RINGLEADER_PROBE_ADDRESSES";
/// Variable with the absolute command path to check, if any.
pub const COMMAND_VAR: &str = "RINGLEADER_PROBE_COMMAND";
/// How long one connection attempt to a neighbour may take.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);

/// Runs the probe on this host and returns its exit code.
pub fn run() -> i32 {
    match probe(&mut io::stdin().lock(), &mut io::stdout().lock()) {
        Ok(()) => 0,
        Err(error) => {
            eprintln!("ringleader doctor probe: {error}");
            1
        }
    }
}

fn probe(input: &mut impl BufRead, output: &mut impl Write) -> io::Result<()> {
    let now = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default();
    writeln!(output, "clock {:.3}", now.as_secs_f64())?;

    let addresses = std::env::var(ADDRESSES_VAR).unwrap_or_default();
    let mut listeners = Vec::new();
    let mut checked_ips: Vec<IpAddr> = Vec::new();
    for text in addresses.split(',').filter(|a| !a.is_empty()) {
        let Ok(address) = text.parse::<SocketAddr>() else {
            writeln!(output, "port {text} failed not an ip:port address")?;
            continue;
        };
        let assigned = check_assigned(address.ip());
        if !checked_ips.contains(&address.ip()) {
            checked_ips.push(address.ip());
            writeln!(output, "address {} {}", address.ip(), describe(&assigned))?;
        }
        if assigned.is_err() {
            writeln!(output, "port {text} unassigned")?;
            continue;
        }
        match TcpListener::bind(address) {
            Ok(listener) => {
                listeners.push(listener);
                writeln!(output, "port {text} ok")?;
            }
            Err(error) if error.kind() == io::ErrorKind::AddrInUse => writeln!(output, "port {text} busy")?,
            Err(error) => writeln!(output, "port {text} failed {error}")?,
        }
    }

    if let Ok(path) = std::env::var(COMMAND_VAR) {
        let result = match std::fs::metadata(&path) {
            Ok(meta) if meta.is_file() && meta.permissions().mode() & 0o111 != 0 => "ok",
            Ok(_) => "not-executable",
            Err(_) => "missing",
        };
        writeln!(output, "command {path} {result}")?;
    }
    writeln!(output, "ready")?;
    output.flush()?;

    let mut line = String::new();
    loop {
        line.clear();
        if input.read_line(&mut line)? == 0 {
            break;
        }
        let request = line.trim();
        if request == "done" {
            break;
        }
        if let Some(target) = request.strip_prefix("connect ") {
            let result = match target.parse::<SocketAddr>() {
                Ok(address) => TcpStream::connect_timeout(&address, CONNECT_TIMEOUT).map(drop),
                Err(_) => Err(io::Error::new(io::ErrorKind::InvalidInput, "not an ip:port address")),
            };
            writeln!(output, "connect {target} {}", describe(&result))?;
            output.flush()?;
        }
    }
    drop(listeners);
    Ok(())
}

/// Checks that `ip` belongs to this host by binding it with an ephemeral
/// port: the kernel rejects addresses no interface has (EADDRNOTAVAIL).
fn check_assigned(ip: IpAddr) -> io::Result<()> {
    TcpListener::bind(SocketAddr::new(ip, 0)).map(drop)
}

fn describe(result: &io::Result<()>) -> String {
    match result {
        Ok(()) => "ok".to_string(),
        Err(error) if error.kind() == io::ErrorKind::AddrNotAvailable => "unassigned".to_string(),
        Err(error) => format!("failed {error}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn protocol_reports_ports_and_connections() {
        let busy = TcpListener::bind("127.0.0.1:0").unwrap();
        let busy_address = busy.local_addr().unwrap();
        let free = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
        // No other test reads these variables.
        std::env::set_var(ADDRESSES_VAR, format!("{free},{busy_address},203.0.113.77:9"));
        std::env::set_var(COMMAND_VAR, "/nonexistent/ringleader-command");
        let mut input = io::Cursor::new(format!("connect {free}\nconnect {busy_address}\ndone\n"));
        let mut output = Vec::new();

        probe(&mut input, &mut output).unwrap();

        let text = String::from_utf8(output).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert!(lines[0].starts_with("clock "), "{text}");
        assert!(lines.contains(&"address 127.0.0.1 ok"), "{text}");
        assert!(lines.contains(&format!("port {free} ok").as_str()), "{text}");
        assert!(lines.contains(&format!("port {busy_address} busy").as_str()), "{text}");
        assert!(lines.contains(&"port 203.0.113.77:9 unassigned"), "{text}");
        assert!(lines.contains(&"command /nonexistent/ringleader-command missing"), "{text}");
        assert!(lines.contains(&format!("connect {free} ok").as_str()), "{text}");
        assert!(lines.contains(&format!("connect {busy_address} ok").as_str()), "{text}");
    }
}
