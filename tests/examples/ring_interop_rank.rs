//! One Rust rank of the MLX interop test (tests/tests/ring_interop.rs).
//!
//! Usage: ring_interop_rank CASES.json OUT_DIR
//!
//! Joins the ring from MLX_RANK and MLX_HOSTFILE, runs every case in order
//! and writes the results' bytes to OUT_DIR/rank<R>.bin, exactly as
//! tests/python/ring_interop.py does for an MLX rank.

#[path = "../tests/ring_support/interop.rs"]
#[allow(dead_code)]
mod interop;

use std::io::Write;
use std::path::Path;
use std::process::ExitCode;

use ringleader::ring::Group;

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().collect();
    let [_, cases_path, out_dir] = args.as_slice() else {
        eprintln!("usage: ring_interop_rank CASES.json OUT_DIR");
        return ExitCode::from(2);
    };
    match run(Path::new(cases_path), Path::new(out_dir)).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("ring_interop_rank: {message}");
            ExitCode::FAILURE
        }
    }
}

async fn run(cases_path: &Path, out_dir: &Path) -> Result<(), String> {
    let text = std::fs::read_to_string(cases_path)
        .map_err(|err| format!("{}: {err}", cases_path.display()))?;
    let cases = interop::cases_from_json(&text);
    let mut group = Group::init().await.map_err(|err| err.to_string())?;
    let (rank, size) = (group.rank(), group.size());

    let out_path = out_dir.join(format!("rank{rank}.bin"));
    let mut out =
        std::fs::File::create(&out_path).map_err(|err| format!("{}: {err}", out_path.display()))?;
    for (number, case) in cases.iter().enumerate() {
        let bytes = interop::run_case(&mut group, case, number)
            .await
            .map_err(|err| format!("rank {rank}: case {number} {case:?}: {err}"))?;
        out.write_all(&bytes)
            .map_err(|err| format!("{}: {err}", out_path.display()))?;
    }
    println!("rust rank {rank} of {size}: {} cases done", cases.len());
    Ok(())
}
