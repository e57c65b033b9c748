//! Host ranges in `--hosts` and hostfiles, and hosts taken from a Slurm
//! allocation, seen through `--dry-run --json`.

use ringleader_tests::{ringleader, run};

fn plan(args: &[&str], slurm: &[(&str, &str)]) -> ringleader_tests::Output {
    let mut command = ringleader(args);
    for var in ["SLURM_JOB_NODELIST", "SLURM_TASKS_PER_NODE", "SLURM_NTASKS_PER_NODE"] {
        command.env_remove(var);
    }
    command.envs(slurm.iter().copied());
    run(&mut command, b"")
}

fn hosts_of(output: &ringleader_tests::Output) -> Vec<String> {
    assert_eq!(output.code(), Some(0), "{}", output.stderr_text());
    let plan: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    plan["ranks"].as_array().unwrap().iter().map(|r| r["host"].as_str().unwrap().to_string()).collect()
}

#[test]
fn hosts_range_expands_to_ranks_and_ring_addresses() {
    let output = plan(&["--hosts", "10.0.0.[1-2],10.0.1.[8-9]", "-p", "5000", "--dry-run", "--json", "--", "job"], &[]);

    assert_eq!(hosts_of(&output), ["10.0.0.1", "10.0.0.2", "10.0.1.8", "10.0.1.9"].map(String::from).to_vec());
    let plan: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(plan["ring_table"][3], serde_json::json!(["10.0.1.9:5003"]));
}

#[test]
fn hostfile_range_entry_expands() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("hosts.json");
    std::fs::write(&path, r#"{"backend": "mpi", "hosts": [{"ssh": "node[01-03]"}, {"ssh": "head"}]}"#).unwrap();
    let output = plan(&["--hostfile", path.to_str().unwrap(), "--dry-run", "--json", "--", "job"], &[]);

    assert_eq!(output.code(), Some(0), "{}", output.stderr_text());
    let plan: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(plan["mpi_hostfile"], "node01 slots=1\nnode02 slots=1\nnode03 slots=1\nhead slots=1\n");
}

#[test]
fn slurm_allocation_gives_hosts_and_tasks_per_node() {
    let slurm = [("SLURM_JOB_NODELIST", "10.0.0.[1-2],10.0.0.5"), ("SLURM_TASKS_PER_NODE", "2(x2),1")];
    let output = plan(&["-p", "5000", "--dry-run", "--json", "--", "job"], &slurm);

    let expected = ["10.0.0.1", "10.0.0.1", "10.0.0.2", "10.0.0.2", "10.0.0.5"];
    assert_eq!(hosts_of(&output), expected.map(String::from).to_vec());
    let plan: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(plan["ring_table"][4], serde_json::json!(["10.0.0.5:5004"]));
    assert_eq!(plan["ranks"][1]["env"]["LOCAL_RANK"], "1");
}

#[test]
fn slurm_node_names_become_the_mpi_hostfile() {
    let slurm = [("SLURM_JOB_NODELIST", "gpu-[01-02],cpu7"), ("SLURM_TASKS_PER_NODE", "4(x2),1")];
    let output = plan(&["--backend", "mpi", "--dry-run", "--json", "--", "job"], &slurm);

    assert_eq!(output.code(), Some(0), "{}", output.stderr_text());
    let plan: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(plan["mpi_hostfile"], "gpu-01 slots=4\ngpu-02 slots=4\ncpu7 slots=1\n");
}

#[test]
fn explicit_hosts_win_over_slurm() {
    let slurm = [("SLURM_JOB_NODELIST", "n[1-4]")];
    let output = plan(&["--hosts", "10.0.0.9", "--dry-run", "--json", "--", "job"], &slurm);

    assert_eq!(hosts_of(&output), ["10.0.0.9".to_string()]);
}

#[test]
fn repeat_above_one_replaces_slurm_task_counts() {
    let slurm = [("SLURM_JOB_NODELIST", "10.0.0.[1-2]"), ("SLURM_TASKS_PER_NODE", "4(x2)")];
    let output = plan(&["-n", "2", "--dry-run", "--json", "--", "job"], &slurm);

    assert_eq!(hosts_of(&output).len(), 4);
}

#[test]
fn malformed_host_lists_exit_2_naming_the_value() {
    let cases: &[(&[&str], &[(&str, &str)], &str)] = &[
        (&["--hosts", "n[1-"], &[], "invalid --hosts value \"n[1-\": \"n[1-\": the '[' at byte 1 is never closed"),
        (&["--hosts", "n[3-1]"], &[], "range element \"3-1\" counts down"),
        (&[], &[("SLURM_JOB_NODELIST", "n[1,,2]")], "SLURM_JOB_NODELIST=\"n[1,,2]\" is invalid: \"n[1,,2]\": range element \"\" is empty"),
        (
            &[],
            &[("SLURM_JOB_NODELIST", "n[1-2]"), ("SLURM_TASKS_PER_NODE", "1(x3)")],
            "SLURM_TASKS_PER_NODE=\"1(x3)\" lists 3 nodes but SLURM_JOB_NODELIST has 2",
        ),
        (&[], &[("SLURM_JOB_NODELIST", "n1"), ("SLURM_TASKS_PER_NODE", "2(x")], "SLURM_TASKS_PER_NODE=\"2(x\" is invalid"),
        (
            &[],
            &[("SLURM_JOB_NODELIST", "node[01-02]")],
            "the hosts come by name from the Slurm allocation (SLURM_JOB_NODELIST), starting with node01",
        ),
        (&["--hosts", "node01"], &[("SLURM_JOB_NODELIST", "node[01-02]")], "list hosts by IP address in --hosts"),
    ];
    for (args, slurm, expected) in cases {
        let mut all = args.to_vec();
        all.extend(["--dry-run", "--", "job"]);
        let output = plan(&all, slurm);
        assert_eq!(output.code(), Some(2), "{args:?} {slurm:?}");
        assert!(output.stderr_text().contains(expected), "{args:?} {slurm:?}: {}", output.stderr_text());
    }
}
