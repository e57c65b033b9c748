#!/usr/bin/env bash
# Benchmarks of the Docker rehearsal cluster (run as root, Docker engine up):
#
#   1. start-up time of a 4-node cluster with the image already built;
#   2. all_sum bus bandwidth across the containers: ringleader-bench (our ring)
#      next to MLX's ring backend, both launched by ringleader over ssh.
#
# Usage: benches/containers.sh [NODES]
# Environment: CARGO_TARGET_DIR (default <repo>/target), RINGLEADER_TEST_PYTHON
# (default <repo>/.cache/mlx-venv/bin/python, else /opt/mlx-venv/bin/python),
# ITERATIONS (timed all_sum calls per size), STARTS (start-up samples).
set -euo pipefail

repo=$(cd "$(dirname "$0")/.." && pwd)
nodes=${1:-4}
target=${CARGO_TARGET_DIR:-$repo/target}
# The sizes ringleader-bench runs with -b 4K -e 64M -f 4.
sizes=4096,16384,65536,262144,1048576,4194304,16777216,67108864
iterations=${ITERATIONS:-10}
starts=${STARTS:-3}
python=${RINGLEADER_TEST_PYTHON:-}
if [[ -z $python ]]; then
    if [[ -x $repo/.cache/mlx-venv/bin/python ]]; then
        python=$repo/.cache/mlx-venv/bin/python
    else
        python=/opt/mlx-venv/bin/python
    fi
fi

echo "== machine: $(nproc) cores, $(uname -r), $(docker version --format 'Docker engine {{.Server.Version}}'), $(date -u +%Y-%m-%dT%H:%MZ)"
cargo build --quiet --release --manifest-path "$repo/Cargo.toml" -p ringleader-containers -p ringleader --bins
bin=$target/release
"$bin/ringleader-cluster" image

scratch=$(mktemp -d /tmp/ringleader-bench-containers.XXXXXX)
cluster_pid=
cleanup() {
    if [[ -n $cluster_pid ]] && kill -0 "$cluster_pid" 2>/dev/null; then
        kill -INT "$cluster_pid"
        wait "$cluster_pid" || true
    fi
    rm -rf "$scratch"
}
trap cleanup EXIT

# Start a cluster in the background and return once it reports that it is up.
start_cluster() {
    local dir=$1
    shift
    "$bin/ringleader-cluster" up -n "$nodes" --dir "$dir" "$@" >"$dir.log" 2>&1 &
    cluster_pid=$!
    until grep -q "is up" "$dir.log" 2>/dev/null; do
        if ! kill -0 "$cluster_pid" 2>/dev/null; then
            cat "$dir.log" >&2
            echo "ringleader-cluster up failed" >&2
            exit 1
        fi
        sleep 0.05
    done
}

stop_cluster() {
    kill -INT "$cluster_pid"
    wait "$cluster_pid"
    cluster_pid=
}

echo "== start-up of a $nodes-node cluster, image present ($starts runs)"
for run in $(seq 1 "$starts"); do
    started=$(date +%s.%N)
    start_cluster "$scratch/startup-$run"
    ready=$(date +%s.%N)
    echo "cluster up in $(echo "$ready - $started" | bc) s"
    stop_cluster
done

echo "== all_sum bus bandwidth across $nodes containers"
mounts=(--mount "$bin" --mount "$repo/benches" --mount "$scratch" --python "$python")
start_cluster "$scratch/cluster" "${mounts[@]}"
hostfile=$scratch/cluster/hostfile.json
ssh_config=$scratch/cluster/ssh_config

launch=("$bin/ringleader" --hostfile "$hostfile" --ssh-config "$ssh_config" --)
echo "-- ringleader-bench (ringleader's ring backend)"
"${launch[@]}" "$bin/ringleader-bench" -b 4K -e 64M -f 4 -n "$iterations" -o all-sum
echo "-- MLX ring backend (mlx.core.distributed.all_sum)"
"${launch[@]}" "$python" "$repo/benches/containers_mlx_all_sum.py" --sizes "$sizes" --iterations "$iterations"
