//! `--dry-run` snapshots of the nccl, jaccl and jaccl-ring environments,
//! which must match what mlx.launch 0.32 gives each rank, and the errors
//! for hostfiles these backends cannot use.

use ringleader_tests::{ringleader, run};

fn dry_run(args: &[&str]) -> ringleader_tests::Output {
    let mut all = vec!["--dry-run"];
    all.extend(args);
    let mut command = ringleader(all);
    command.env_remove("SLURM_JOB_NODELIST");
    run(&mut command, b"")
}

fn write_hostfile(dir: &tempfile::TempDir, text: &str) -> String {
    let path = dir.path().join("hosts.json");
    std::fs::write(&path, text).unwrap();
    path.to_str().unwrap().to_string()
}

#[test]
fn nccl_text_snapshot() {
    let output = dry_run(&["--backend", "nccl", "--hosts", "10.0.0.[1-2]", "--nccl-port", "4000", "--env", "A=1", "--", "python3", "job.py"]);

    assert_eq!(output.code(), Some(0), "{}", output.stderr_text());
    let expected = "\
backend nccl, 2 ranks
rank 0 on 10.0.0.1: python3 job.py
  A=1
  NCCL_HOST_IP=10.0.0.1
  NCCL_PORT=4000
  CUDA_VISIBLE_DEVICES=0
  MLX_RANK=0
  MLX_WORLD_SIZE=2
  RANK=0
  WORLD_SIZE=2
  LOCAL_RANK=0
  LOCAL_WORLD_SIZE=1
  MASTER_ADDR=10.0.0.1
  MASTER_PORT=4001
rank 1 on 10.0.0.2: python3 job.py
  A=1
  NCCL_HOST_IP=10.0.0.1
  NCCL_PORT=4000
  CUDA_VISIBLE_DEVICES=0
  MLX_RANK=1
  MLX_WORLD_SIZE=2
  RANK=1
  WORLD_SIZE=2
  LOCAL_RANK=0
  LOCAL_WORLD_SIZE=1
  MASTER_ADDR=10.0.0.1
  MASTER_PORT=4001
";
    assert_eq!(output.stdout_text(), expected);
}

#[test]
fn nccl_json_gives_each_local_rank_its_gpu() {
    let output = dry_run(&["--backend", "nccl", "--hosts", "10.0.0.1,10.0.0.2", "-n", "2", "--verbose", "--json", "--", "job"]);

    assert_eq!(output.code(), Some(0), "{}", output.stderr_text());
    let plan: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(plan["backend"], "nccl");
    assert_eq!(plan["ring_table"], serde_json::json!([]));
    assert_eq!(plan["files"], serde_json::json!({}));
    let ranks = plan["ranks"].as_array().unwrap();
    let gpus: Vec<&str> = ranks.iter().map(|r| r["env"]["CUDA_VISIBLE_DEVICES"].as_str().unwrap()).collect();
    assert_eq!(gpus, ["0", "1", "0", "1"]);
    for rank in ranks {
        assert_eq!(rank["env"]["NCCL_DEBUG"], "INFO");
        assert_eq!(rank["env"]["NCCL_HOST_IP"], "10.0.0.1");
        assert_eq!(rank["env"]["NCCL_PORT"], "12345");
        assert_eq!(rank["files"], serde_json::json!([]));
    }
}

#[test]
fn jaccl_text_snapshot() {
    let dir = tempfile::tempdir().unwrap();
    let hostfile = write_hostfile(
        &dir,
        r#"{"backend": "jaccl", "envs": ["MLX_METAL_FAST_SYNCH=1"], "hosts": [
            {"ssh": "m1", "ips": ["10.0.0.1"], "rdma": [null, "rdma_en2"]},
            {"ssh": "m2", "ips": ["10.0.0.2"], "rdma": ["rdma_en3", null]}]}"#,
    );
    let output = dry_run(&["--hostfile", &hostfile, "-p", "40000", "--", "python3", "job.py"]);

    assert_eq!(output.code(), Some(0), "{}", output.stderr_text());
    let expected = r#"backend jaccl, 2 ranks
file MLX_IBV_DEVICES for every rank: [[null,"rdma_en2"],["rdma_en3",null]]
rank 0 on m1: python3 job.py
  MLX_METAL_FAST_SYNCH=1
  MLX_JACCL_COORDINATOR=10.0.0.1:40000
  MLX_RANK=0
  MLX_WORLD_SIZE=2
  RANK=0
  WORLD_SIZE=2
  LOCAL_RANK=0
  LOCAL_WORLD_SIZE=1
  MASTER_ADDR=10.0.0.1
  MASTER_PORT=40001
  MLX_IBV_DEVICES = the file MLX_IBV_DEVICES above
rank 1 on m2: python3 job.py
  MLX_METAL_FAST_SYNCH=1
  MLX_JACCL_COORDINATOR=10.0.0.1:40000
  MLX_RANK=1
  MLX_WORLD_SIZE=2
  RANK=1
  WORLD_SIZE=2
  LOCAL_RANK=0
  LOCAL_WORLD_SIZE=1
  MASTER_ADDR=10.0.0.1
  MASTER_PORT=40001
  MLX_IBV_DEVICES = the file MLX_IBV_DEVICES above
"#;
    assert_eq!(output.stdout_text(), expected);
}

#[test]
fn jaccl_ring_json_needs_devices_only_to_neighbours() {
    let dir = tempfile::tempdir().unwrap();
    let table = r#"[
        [null, "rdma_en2", null, "rdma_en3"],
        ["rdma_en3", null, "rdma_en2", null],
        [null, "rdma_en3", null, ["rdma_en2", "rdma_en4"]],
        ["rdma_en2", null, "rdma_en3", null]]"#;
    let rows: Vec<serde_json::Value> = serde_json::from_str(table).unwrap();
    let hosts: Vec<serde_json::Value> = rows
        .iter()
        .enumerate()
        .map(|(i, rdma)| serde_json::json!({"ssh": format!("m{i}"), "ips": [format!("10.0.0.{}", i + 1)], "rdma": rdma}))
        .collect();
    let hostfile = write_hostfile(&dir, &serde_json::json!({"backend": "jaccl-ring", "hosts": hosts}).to_string());
    let output = dry_run(&["--hostfile", &hostfile, "-p", "40000", "--json", "--", "job"]);

    assert_eq!(output.code(), Some(0), "{}", output.stderr_text());
    let plan: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(plan["backend"], "jaccl-ring");
    assert_eq!(plan["world_size"], 4);
    let devices: serde_json::Value = serde_json::from_str(plan["files"]["MLX_IBV_DEVICES"].as_str().unwrap()).unwrap();
    assert_eq!(devices, serde_json::Value::Array(rows.clone()));
    for rank in plan["ranks"].as_array().unwrap() {
        assert_eq!(rank["env"]["MLX_JACCL_COORDINATOR"], "10.0.0.1:40000");
        assert_eq!(rank["env"]["MLX_JACCL_RING"], "1");
        assert!(rank["env"].get("MLX_HOSTFILE").is_none());
        assert_eq!(rank["files"], serde_json::json!(["MLX_IBV_DEVICES"]));
    }
}

#[test]
fn jaccl_hostfile_errors_exit_2() {
    let cases = [
        (
            "jaccl",
            r#"[{"ssh": "a", "ips": ["10.0.0.1"], "rdma": [null]}, {"ssh": "b", "rdma": ["x", null]}]"#,
            "host 0 (a) lists 1 RDMA devices but the job has 2 hosts",
        ),
        (
            "jaccl",
            r#"[{"ssh": "a", "ips": ["10.0.0.1"], "rdma": ["x", "y"]}, {"ssh": "b", "rdma": ["x", null]}]"#,
            "host 0 (a) must list null as its own RDMA device",
        ),
        (
            "jaccl",
            r#"[{"ssh": "a", "ips": ["10.0.0.1"], "rdma": [null, "y", null]}, {"ssh": "b", "rdma": ["x", null, "z"]}, {"ssh": "c", "rdma": [null, null, null]}]"#,
            "no RDMA device is listed for a to c, c to a, c to b",
        ),
        (
            "jaccl-ring",
            r#"[{"ssh": "a", "ips": ["10.0.0.1"], "rdma": [null, null]}, {"ssh": "b", "rdma": ["x", null]}]"#,
            "no RDMA device is listed for a to b",
        ),
        (
            "jaccl",
            r#"[{"ssh": "a", "ips": ["10.0.0.1"], "rdma": [null, 7]}, {"ssh": "b", "rdma": ["x", null]}]"#,
            "host 0 (a) RDMA entry 1 must be a device name",
        ),
        (
            "jaccl",
            r#"[{"ssh": "a", "rdma": [null, "y"]}, {"ssh": "b", "rdma": ["x", null]}]"#,
            "the jaccl backend needs an IP address for rank 0 (a)",
        ),
        (
            "jaccl",
            r#"[{"ssh": "a", "ips": ["10.0.0.1"]}, {"ssh": "b"}]"#,
            "host 0 (a) lists 0 RDMA devices",
        ),
        ("nccl", r#"[{"ssh": "a"}, {"ssh": "b"}]"#, "the nccl backend needs an IP address for rank 0 (a)"),
    ];
    let dir = tempfile::tempdir().unwrap();
    for (backend, text, expected) in cases {
        let hostfile = write_hostfile(&dir, text);
        let output = dry_run(&["--backend", backend, "--hostfile", &hostfile, "--", "job"]);
        assert_eq!(output.code(), Some(2), "{text}");
        assert!(output.stderr_text().contains(expected), "{text}: {}", output.stderr_text());
        assert!(output.stdout.is_empty(), "{text}: printed a plan");
    }
}
