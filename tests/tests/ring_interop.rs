//! Rings that mix ringleader's Rust ranks with MLX 0.32.4 Python ranks,
//! launched by the `ringleader` binary, compute the same bytes as an
//! all-MLX ring.
//!
//! MLX 0.32.4 provides `all_sum`, `all_max`, `all_min`, `all_gather`,
//! `send`, `recv` and `recv_like` in `mx.distributed`; all are exercised.
//! `sum_scatter` is not, because MLX's ring backend rejects it.

mod ring_support;

use std::path::Path;
use std::process::Command;

use ring_support::interop::{cases_to_json, Case};
use ring_support::launch::{
    interop_rank_bin, launcher_bin, mlx_python, port_base, run_with_limit, workspace, JOB_LIMIT,
};

const DTYPES: [&str; 12] = [
    "float32", "float64", "float16", "bfloat16", "int8", "int16", "int32", "int64", "uint8",
    "uint16", "uint32", "uint64",
];

/// Lists the cases every ring of `size` ranks runs: every op and dtype on lengths
/// around the group size, odd lengths, and float32/int32 lengths large
/// enough to be split across connections and directions.
fn cases(size: usize) -> Vec<Case> {
    let mut cases = Vec::new();
    for dtype in DTYPES {
        for op in ["sum", "max", "min"] {
            for len in [1, size - 1, size + 1, 1000] {
                if len > 0 {
                    cases.push(Case::new(op, dtype, len));
                }
            }
        }
        cases.push(Case::new("gather", dtype, 3));
        cases.push(Case::new("sendrecv", dtype, 5));
    }
    for dtype in ["float32", "int32"] {
        for len in [size, 4097, 65_537, 600_001, 1_200_007] {
            cases.push(Case::new("sum", dtype, len));
        }
        cases.push(Case::new("max", dtype, 600_001));
        cases.push(Case::new("min", dtype, 1_200_007));
        for len in [1000, 70_001, 300_001] {
            cases.push(Case::new("gather", dtype, len));
        }
        for len in [1, 255, 256, 257, 100_000] {
            cases.push(Case::new("sendrecv", dtype, len));
        }
    }
    // An empty all_sum: MLX still runs its padded path, with bytes on the wire.
    cases.push(Case::new("sum", "float32", 0));
    cases.push(Case::new("sum", "float32", 3));
    cases
}

/// Runs one job through `ringleader`: rank `r` is a Rust rank when
/// `pattern[r]` is `R` and an MLX rank when it is `M`. Returns each rank's
/// output bytes.
fn run_ring(pattern: &str, connections: usize, cases_path: &Path, dir: &Path) -> Vec<Vec<u8>> {
    let out_dir = dir.join(pattern);
    std::fs::create_dir_all(&out_dir).unwrap();
    let script = r#"role=$(printf %s "$6" | cut -c "$((MLX_RANK + 1))")
if [ "$role" = R ]; then exec "$1" "$4" "$5"; else exec "$2" "$3" "$4" "$5"; fi"#;
    let python_script = workspace().join("tests/python/ring_interop.py");

    let finished = run_with_limit(
        Command::new(launcher_bin("ringleader"))
            .arg("-n")
            .arg(pattern.len().to_string())
            .arg("--starting-port")
            .arg(port_base().to_string())
            .arg("--connections-per-ip")
            .arg(connections.to_string())
            .args(["--", "sh", "-c", script, "rank"])
            .arg(interop_rank_bin())
            .arg(mlx_python())
            .arg(python_script)
            .arg(cases_path)
            .arg(&out_dir)
            .arg(pattern),
        JOB_LIMIT,
    );
    assert!(
        finished.status.success(),
        "ring {pattern} with {connections} connections failed"
    );

    (0..pattern.len())
        .map(|rank| std::fs::read(out_dir.join(format!("rank{rank}.bin"))).unwrap())
        .collect()
}

/// Compares every rank's output of `pattern` with the all-MLX run, case by
/// case, and names the first differing case.
fn assert_same_bytes(pattern: &str, got: &[Vec<u8>], want: &[Vec<u8>], cases: &[Case]) {
    let size = pattern.len();
    for rank in 0..size {
        assert_eq!(
            got[rank].len(),
            want[rank].len(),
            "{pattern}: rank {rank} output length"
        );
        let mut offset = 0;
        for (number, case) in cases.iter().enumerate() {
            let len = case.result_bytes(size);
            let range = offset..offset + len;
            assert!(
                got[rank][range.clone()] == want[rank][range],
                "{pattern}: rank {rank} case {number} {case:?} differs from the all-MLX ring"
            );
            offset += len;
        }
    }
}

fn check_mixed_rings(size: usize, connections: usize, patterns: &[&str]) {
    let dir = tempfile::tempdir().unwrap();
    let cases = cases(size);
    let cases_path = dir.path().join("cases.json");
    std::fs::write(&cases_path, cases_to_json(&cases)).unwrap();

    let all_mlx = "M".repeat(size);
    let want = run_ring(&all_mlx, connections, &cases_path, dir.path());
    for pattern in patterns {
        assert_eq!(pattern.len(), size);
        let got = run_ring(pattern, connections, &cases_path, dir.path());
        assert_same_bytes(pattern, &got, &want, &cases);
    }
}

#[test]
fn two_rank_mixed_rings_match_mlx() {
    check_mixed_rings(2, 2, &["RM", "MR", "RR"]);
}

#[test]
fn three_rank_mixed_rings_match_mlx() {
    check_mixed_rings(3, 1, &["RMM", "MRR", "RRR"]);
}

#[test]
fn four_rank_mixed_rings_match_mlx() {
    check_mixed_rings(4, 2, &["RMRM", "MRRM", "RRRR"]);
}
