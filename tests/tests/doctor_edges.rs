//! `ringleader doctor` with a ring edge that really fails: the test runs
//! the doctor in a network namespace of its own whose firewall rejects
//! connections to one rank's ring port, while that rank can still listen.

use ringleader_tests::{bin, run, test_port_base};

/// Returns why the test cannot run here, if it cannot: it needs root for
/// the namespace, plus `unshare` and `iptables`.
fn missing_requirement() -> Option<String> {
    if !nix::unistd::geteuid().is_root() {
        return Some("needs root to create a network namespace".into());
    }
    for tool in ["unshare", "iptables", "ip"] {
        let found = std::process::Command::new("sh")
            .args(["-c", &format!("command -v {tool}")])
            .output()
            .is_ok_and(|output| output.status.success());
        if !found {
            return Some(format!("needs {tool}"));
        }
    }
    None
}

#[test]
fn rejected_connection_names_the_failing_edge() {
    if let Some(reason) = missing_requirement() {
        println!("skipped: {reason}");
        return;
    }
    let port = test_port_base();
    let blocked = port + 1;
    let script = format!(
        "ip link set lo up && iptables -A INPUT -p tcp --dport {blocked} -j REJECT --reject-with tcp-reset && \
         exec \"$0\" doctor --hosts 127.0.0.1 -n 3 -p {port} -- true"
    );
    let mut command = std::process::Command::new("unshare");
    command.args(["--net", "sh", "-c", &script]).arg(bin("ringleader"));
    let output = run(&mut command, b"");

    assert_eq!(output.code(), Some(1), "{}", output.stderr_text());
    let text = output.stdout_text();
    let failed = format!("127.0.0.1:{blocked}: Connection refused");
    let edge_line = text
        .lines()
        .find(|line| line.starts_with("edge") && line.contains("rank 0 (127.0.0.1) -> rank 1 (127.0.0.1)"))
        .expect("a row for the edge from rank 0 to rank 1");
    assert!(edge_line.contains("FAILED"), "{edge_line}");
    assert!(edge_line.contains(&failed), "{edge_line}");
    let port_line = text
        .lines()
        .find(|line| line.starts_with("port") && line.contains("rank 1 (127.0.0.1)"))
        .expect("a row for rank 1's port");
    assert!(port_line.contains(" ok "), "rank 1 could listen: {port_line}");
    let other_edges: Vec<&str> = text.lines().filter(|line| line.starts_with("edge") && !line.contains("rank 0 (127.0.0.1) ->")).collect();
    assert_eq!(other_edges.len(), 2, "{text}");
    for line in other_edges {
        assert!(line.contains(" ok "), "{line}");
    }
    let expected = format!("ringleader doctor: rank 0 (127.0.0.1) cannot reach rank 1 (127.0.0.1) at {failed}");
    assert!(output.stderr_text().contains(&expected), "{}", output.stderr_text());
}
