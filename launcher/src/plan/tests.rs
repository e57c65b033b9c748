use std::path::Path;

use super::*;

fn options(backend: Backend) -> PlanOptions {
    PlanOptions {
        backend,
        command: vec!["prog".into(), "arg".into()],
        python: None,
        env: Vec::new(),
        cwd: None,
        default_cwd: None,
        starting_port: 32323,
        connections_per_ip: 1,
        nccl_port: 12345,
        repeat_hosts: 1,
        verbose: false,
        stdin: StdinMode::All,
        terminal_size: None,
    }
}

fn no_env(_: &str) -> Option<String> {
    None
}

fn env_of(spec: &RankSpec, key: &str) -> Option<String> {
    spec.env.iter().find(|(k, _)| k == key).map(|(_, v)| v.clone())
}

fn hostfile(text: &str) -> Hostfile {
    Hostfile::from_json(Path::new("h.json"), text).unwrap()
}

#[test]
fn ring_table_matches_mlx_launch() {
    let hosts = Hostfile::from_list("127.0.0.1", 3).unwrap();
    let plan = build(&hosts, &options(Backend::Ring), &no_env).unwrap();
    assert_eq!(
        plan.ring_table,
        vec![vec!["127.0.0.1:32323"], vec!["127.0.0.1:32324"], vec!["127.0.0.1:32325"]]
    );
    assert_eq!(
        &*plan.ranks[1].files[0].contents,
        r#"[["127.0.0.1:32323"],["127.0.0.1:32324"],["127.0.0.1:32325"]]"#
    );
    assert_eq!(plan.ranks[1].files[0].env_var, "MLX_HOSTFILE");
}

#[test]
fn ring_table_counts_ports_per_ip_and_connection() {
    let hosts = hostfile(
        r#"[{"ssh": "a", "ips": ["10.0.0.1", "10.1.0.1"]}, {"ssh": "b", "ips": ["10.0.0.2", "10.1.0.2"]}]"#,
    );
    let mut opts = options(Backend::Ring);
    opts.connections_per_ip = 2;
    opts.starting_port = 5000;
    let plan = build(&hosts, &opts, &no_env).unwrap();
    assert_eq!(
        plan.ring_table,
        vec![
            vec!["10.0.0.1:5000", "10.0.0.1:5001", "10.1.0.1:5002", "10.1.0.1:5003"],
            vec!["10.0.0.2:5004", "10.0.0.2:5005", "10.1.0.2:5006", "10.1.0.2:5007"],
        ]
    );
    assert_eq!(env_of(&plan.ranks[0], "MASTER_PORT").unwrap(), "5008");
    assert_eq!(env_of(&plan.ranks[0], "MASTER_ADDR").unwrap(), "10.0.0.1");
}

#[test]
fn ipv6_addresses_get_brackets() {
    let hosts = Hostfile::from_list("::1", 2).unwrap();
    let plan = build(&hosts, &options(Backend::Ring), &no_env).unwrap();
    assert_eq!(plan.ring_table[0], ["[::1]:32323"]);
}

#[test]
fn one_rank_gets_no_hostfile() {
    let hosts = Hostfile::from_list("127.0.0.1", 1).unwrap();
    let plan = build(&hosts, &options(Backend::Ring), &no_env).unwrap();
    assert!(plan.ranks[0].files.is_empty());
    assert_eq!(env_of(&plan.ranks[0], "MLX_RANK").unwrap(), "0");
    assert_eq!(env_of(&plan.ranks[0], "MLX_WORLD_SIZE").unwrap(), "1");
}

#[test]
fn generic_contract_is_set_per_rank() {
    let hosts = Hostfile::from_list("10.0.0.1,10.0.0.2", 2).unwrap();
    let plan = build(&hosts, &options(Backend::Ring), &no_env).unwrap();
    let expected = [
        ("MLX_RANK", ["0", "1", "2", "3"]),
        ("RANK", ["0", "1", "2", "3"]),
        ("WORLD_SIZE", ["4", "4", "4", "4"]),
        ("MLX_WORLD_SIZE", ["4", "4", "4", "4"]),
        ("LOCAL_RANK", ["0", "1", "0", "1"]),
        ("LOCAL_WORLD_SIZE", ["2", "2", "2", "2"]),
        ("MASTER_ADDR", ["10.0.0.1", "10.0.0.1", "10.0.0.1", "10.0.0.1"]),
        ("MASTER_PORT", ["32327", "32327", "32327", "32327"]),
    ];
    for (key, values) in expected {
        for (rank, value) in values.iter().enumerate() {
            assert_eq!(env_of(&plan.ranks[rank], key).as_deref(), Some(*value), "{key} of rank {rank}");
        }
    }
}

#[test]
fn env_order_hostfile_then_cli_later_wins() {
    let hosts = Hostfile::from_list("127.0.0.1", 1).unwrap();
    let mut opts = options(Backend::Ring);
    opts.env = vec!["A=hostfile".into(), "B=1".into(), "A=cli".into(), "FORWARDED".into()];
    let lookup = |key: &str| (key == "FORWARDED").then(|| "from launcher".to_string());
    let plan = build(&hosts, &opts, &lookup).unwrap();
    assert_eq!(env_of(&plan.ranks[0], "A").unwrap(), "cli");
    assert_eq!(env_of(&plan.ranks[0], "B").unwrap(), "1");
    assert_eq!(env_of(&plan.ranks[0], "FORWARDED").unwrap(), "from launcher");
}

#[test]
fn env_errors() {
    let hosts = Hostfile::from_list("127.0.0.1", 1).unwrap();
    for (entry, expected) in [
        ("1A=x", "invalid environment entry"),
        ("A-B=x", "invalid environment entry"),
        ("=x", "invalid environment entry"),
        ("UNSET_VAR", "UNSET_VAR (from --env or the hostfile's \"envs\") is not set"),
    ] {
        let mut opts = options(Backend::Ring);
        opts.env = vec![entry.into()];
        let error = build(&hosts, &opts, &no_env).unwrap_err().to_string();
        assert!(error.contains(expected), "{entry}: {error}");
    }
}

#[test]
fn values_with_equals_signs_keep_them() {
    let env = parse_env_entries(&["A=b=c".into()], &no_env).unwrap();
    assert_eq!(env, [("A".to_string(), "b=c".to_string())]);
}

#[test]
fn terminal_size_is_forwarded_unless_set() {
    let hosts = Hostfile::from_list("127.0.0.1", 1).unwrap();
    let mut opts = options(Backend::Ring);
    opts.terminal_size = Some((120, 40));
    let plan = build(&hosts, &opts, &no_env).unwrap();
    assert_eq!(env_of(&plan.ranks[0], "COLUMNS").unwrap(), "120");
    assert_eq!(env_of(&plan.ranks[0], "LINES").unwrap(), "40");

    opts.env = vec!["COLUMNS=80".into()];
    let plan = build(&hosts, &opts, &no_env).unwrap();
    assert_eq!(env_of(&plan.ranks[0], "COLUMNS").unwrap(), "80");
    assert_eq!(env_of(&plan.ranks[0], "LINES"), None);
}

#[test]
fn verbose_sets_ring_verbose() {
    let hosts = Hostfile::from_list("127.0.0.1", 2).unwrap();
    let mut opts = options(Backend::Ring);
    opts.verbose = true;
    let plan = build(&hosts, &opts, &no_env).unwrap();
    assert_eq!(env_of(&plan.ranks[0], "MLX_RING_VERBOSE").unwrap(), "1");
}

#[test]
fn python_is_prepended() {
    let hosts = Hostfile::from_list("127.0.0.1", 1).unwrap();
    let mut opts = options(Backend::Ring);
    opts.python = Some("/usr/bin/python3".into());
    let plan = build(&hosts, &opts, &no_env).unwrap();
    assert_eq!(plan.ranks[0].argv, ["/usr/bin/python3", "prog", "arg"]);
}

#[test]
fn ring_needs_ips() {
    let hosts = Hostfile::from_list("node1,node2", 1).unwrap();
    let error = build(&hosts, &options(Backend::Ring), &no_env).unwrap_err().to_string();
    assert!(error.contains("host 0 (node1) has none"), "{error}");
}

#[test]
fn port_overflow_is_an_error() {
    let hosts = Hostfile::from_list("127.0.0.1", 3).unwrap();
    let mut opts = options(Backend::Ring);
    opts.starting_port = 65534;
    let error = build(&hosts, &opts, &no_env).unwrap_err().to_string();
    assert!(error.contains("goes past 65535"), "{error}");
}

#[test]
fn master_port_overflow_names_the_option_to_change() {
    let hosts = Hostfile::from_list("127.0.0.1", 2).unwrap();
    let mut opts = options(Backend::Nccl);
    opts.nccl_port = 65535;
    let error = build(&hosts, &opts, &no_env).unwrap_err().to_string();
    assert!(error.contains("MASTER_PORT would be 65536"), "{error}");
    assert!(error.contains("choose a lower --nccl-port"), "{error}");

    let one = Hostfile::from_list("127.0.0.1", 1).unwrap();
    let mut opts = options(Backend::Ring);
    opts.starting_port = 65535;
    let error = build(&one, &opts, &no_env).unwrap_err().to_string();
    assert!(error.contains("the port after the last ring port"), "{error}");
}

#[test]
fn user_values_of_launcher_variables_are_reported() {
    let hosts = Hostfile::from_list("127.0.0.1", 2).unwrap();
    let mut opts = options(Backend::Ring);
    opts.env = vec!["MLX_RANK=7".into(), "FOO=1".into(), "MLX_HOSTFILE=/x".into(), "MLX_RANK=8".into()];
    let plan = build(&hosts, &opts, &no_env).unwrap();
    assert_eq!(plan.overridden_env, ["MLX_RANK", "MLX_HOSTFILE"]);
    assert_eq!(env_of(&plan.ranks[1], "MLX_RANK").unwrap(), "1");
    assert_eq!(env_of(&plan.ranks[1], "FOO").unwrap(), "1");
}

#[test]
fn stdin_modes() {
    let hosts = Hostfile::from_list("127.0.0.1", 2).unwrap();
    let mut opts = options(Backend::Ring);
    opts.stdin = StdinMode::RankZero;
    let plan = build(&hosts, &opts, &no_env).unwrap();
    assert!(plan.ranks[0].stdin);
    assert!(!plan.ranks[1].stdin);
}

#[test]
fn nccl_environment_matches_mlx_launch() {
    let hosts = Hostfile::from_list("10.0.0.1,10.0.0.2", 2).unwrap();
    let mut opts = options(Backend::Nccl);
    opts.repeat_hosts = 2;
    let plan = build(&hosts, &opts, &no_env).unwrap();
    for (rank, spec) in plan.ranks.iter().enumerate() {
        assert_eq!(env_of(spec, "NCCL_HOST_IP").unwrap(), "10.0.0.1");
        assert_eq!(env_of(spec, "NCCL_PORT").unwrap(), "12345");
        assert_eq!(env_of(spec, "MLX_WORLD_SIZE").unwrap(), "4");
        assert_eq!(env_of(spec, "CUDA_VISIBLE_DEVICES").unwrap(), (rank % 2).to_string());
        assert!(spec.files.is_empty());
    }
}

#[test]
fn jaccl_environment_matches_mlx_launch() {
    let hosts = hostfile(
        r#"[{"ssh": "a", "ips": ["10.0.0.1"], "rdma": [null, "rdma_en2"]},
            {"ssh": "b", "ips": ["10.0.0.2"], "rdma": ["rdma_en3", null]}]"#,
    );
    let plan = build(&hosts, &options(Backend::JacclRing), &no_env).unwrap();
    let spec = &plan.ranks[1];
    assert_eq!(env_of(spec, "MLX_JACCL_COORDINATOR").unwrap(), "10.0.0.1:32323");
    assert_eq!(env_of(spec, "MLX_JACCL_RING").unwrap(), "1");
    assert_eq!(spec.files[0].env_var, "MLX_IBV_DEVICES");
    assert_eq!(&*spec.files[0].contents, r#"[[null,"rdma_en2"],["rdma_en3",null]]"#);
}

#[test]
fn nccl_gpu_is_local_rank() {
    let hosts = hostfile(r#"[{"ssh": "a", "ips": ["10.0.0.1"]}, {"ssh": "b"}, {"ssh": "a"}, {"ssh": "b"}]"#);
    let plan = build(&hosts, &options(Backend::Nccl), &no_env).unwrap();
    let gpus: Vec<String> = plan.ranks.iter().map(|spec| env_of(spec, "CUDA_VISIBLE_DEVICES").unwrap()).collect();
    assert_eq!(gpus, ["0", "0", "1", "1"]);
}

#[test]
fn jaccl_accepts_device_lists_per_peer() {
    let hosts = hostfile(
        r#"[{"ssh": "a", "ips": ["10.0.0.1"], "rdma": [null, ["rdma_en2", "rdma_en3"]]},
            {"ssh": "b", "rdma": [["rdma_en2", "rdma_en3"], null]}]"#,
    );
    let plan = build(&hosts, &options(Backend::Jaccl), &no_env).unwrap();
    assert_eq!(&*plan.ranks[0].files[0].contents, r#"[[null,["rdma_en2","rdma_en3"]],[["rdma_en2","rdma_en3"],null]]"#);
}

#[test]
fn jaccl_table_errors() {
    let cases = [
        (r#"[{"ssh": "a", "ips": ["10.0.0.1"], "rdma": [null]}, {"ssh": "b", "rdma": ["x", null]}]"#, "lists 1 RDMA devices"),
        (r#"[{"ssh": "a", "ips": ["10.0.0.1"], "rdma": ["x", "y"]}, {"ssh": "b", "rdma": ["x", null]}]"#, "must list null as its own"),
        (r#"[{"ssh": "a", "ips": ["10.0.0.1"], "rdma": [null, null]}, {"ssh": "b", "rdma": ["x", null]}]"#, "no RDMA device is listed for a to b"),
        (r#"[{"ssh": "a", "rdma": [null, "y"]}, {"ssh": "b", "rdma": ["x", null]}]"#, "needs an IP address for rank 0"),
        (r#"[{"ssh": "a", "ips": ["10.0.0.1"], "rdma": [null, 5]}, {"ssh": "b", "rdma": ["x", null]}]"#, "host 0 (a) RDMA entry 1 must be a device name, a list of device names or null, got 5"),
        (r#"[{"ssh": "a", "ips": ["10.0.0.1"], "rdma": [null, "y"]}, {"ssh": "b", "rdma": [[], null]}]"#, "host 1 (b) RDMA entry 0 must be a device name"),
        (r#"[{"ssh": "a", "ips": ["10.0.0.1"], "rdma": [null, "y"]}, {"ssh": "b", "rdma": [["x", ""], null]}]"#, "host 1 (b) RDMA entry 0"),
        (r#"[{"ssh": "a", "ips": ["10.0.0.1"], "rdma": [null, ""]}, {"ssh": "b", "rdma": ["x", null]}]"#, "host 0 (a) RDMA entry 1"),
    ];
    for (text, expected) in cases {
        let error = build(&hostfile(text), &options(Backend::Jaccl), &no_env).unwrap_err().to_string();
        assert!(error.contains(expected), "{text}: {error}");
    }
}
