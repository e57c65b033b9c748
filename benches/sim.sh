#!/usr/bin/env bash
# Measures the simulator: a sweep of SEEDS seeds of the 8-rank all_sum
# scenario with random faults (host crashes and bounces, partitions, held
# links, latency, killed and exiting ranks, launcher signals), in release
# mode, on every CPU. Prints the sweep's summary table, whose last line gives
# the simulated seconds per wall second, and the wall time of the sweep.
#
# Builds with --cfg tokio_unstable, which lets turmoil seed tokio's select!
# order, into its own target directory so that it does not rebuild other
# builds' artifacts.
# Usage: benches/sim.sh [SEEDS]   (default 1000)
set -euo pipefail

seeds=${1:-1000}
repo=$(cd "$(dirname "$0")/.." && pwd)
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$repo/target-sim}
RUSTFLAGS="--cfg tokio_unstable" cargo build --release --quiet -p ringleader-sim --manifest-path "$repo/Cargo.toml"
sim=$CARGO_TARGET_DIR/release/ringleader-sim

echo "machine: $(nproc) cores, $(free -g | awk '/^Mem:/ {print $2}') GiB, $(uname -sr); date: $(date -u +%F)"
start=$(date +%s.%N)
"$sim" sweep --scenario all-sum --seeds "$seeds" --quiet --no-shrink
end=$(date +%s.%N)
echo "wall time of the sweep: $(awk -v s="$start" -v e="$end" 'BEGIN { printf "%.1f", e - s }') s for $seeds seeds"
