#!/usr/bin/env bash
# Benchmarks ringleader's ring all_sum against MLX's own ring backend on
# loopback, side by side in one run, next to the loopback TCP ceiling that
# iperf3 measures on 127.0.0.1.
#
# Usage: benches/ring.sh [OUT_DIR]
#
# Environment:
#   MLX_PYTHON   Python with mlx[cpu]==0.32.4 (default /opt/mlx-venv/bin/python,
#                else .cache/mlx-venv/bin/python)
#   RANKS        rank counts to run (default "2 4")
#   CONNECTIONS  --connections-per-ip values (default "1 2")
#   MAX_BYTES    largest all_sum size (default 256M)
#   ITERS        timed iterations per size (default 10)
#
# Writes OUT_DIR/results.csv (every measurement), OUT_DIR/iperf3.txt and
# prints a Markdown report (also in OUT_DIR/report.md) for BENCHMARKS.md.
# Needs iperf3 (apt-get install -y iperf3); it only talks to 127.0.0.1.
set -euo pipefail

repo=$(cd "$(dirname "$0")/.." && pwd)
out=${1:-$repo/target-bench/ring-$(date -u +%Y%m%dT%H%M%SZ)}
mkdir -p "$out"
ranks_list=${RANKS:-"2 4"}
connections_list=${CONNECTIONS:-"1 2"}
max_bytes=${MAX_BYTES:-256M}
iters=${ITERS:-10}
port=${PORT:-24000}

python=${MLX_PYTHON:-/opt/mlx-venv/bin/python}
[ -x "$python" ] || python=$repo/.cache/mlx-venv/bin/python
mlx_launch=$(dirname "$python")/mlx.launch
[ -x "$mlx_launch" ] || { echo "ring.sh: $mlx_launch not found; set MLX_PYTHON to a venv with mlx[cpu]==0.32.4" >&2; exit 2; }
command -v iperf3 >/dev/null || { echo "ring.sh: iperf3 not found; apt-get install -y iperf3" >&2; exit 2; }

export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$repo/target}
cargo build --quiet --release -p ringleader --bins --manifest-path "$repo/Cargo.toml"
bin=$CARGO_TARGET_DIR/release

{
    echo "date: $(date -u '+%Y-%m-%d %H:%M UTC')"
    echo "machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ *//'), $(uname -sr)"
    echo "load average before: $(cut -d' ' -f1-3 /proc/loadavg)"
    echo "mlx: $("$python" -c 'import mlx.core as mx; print(mx.__version__)')"
} | tee "$out/machine.txt"

# Loopback TCP ceiling: one stream one way, and one stream each way at once.
iperf() {
    local name=$1; shift
    iperf3 -s -B 127.0.0.1 -p "$port" -1 >/dev/null 2>&1 &
    local server=$!
    # Retry until the server listens; a failed attempt leaves "error" in the JSON.
    for _ in $(seq 50); do
        iperf3 -c 127.0.0.1 -p "$port" -t 5 -f g -J "$@" >"$out/iperf3-$name.json" 2>/dev/null || true
        grep -q '"error"' "$out/iperf3-$name.json" || break
        sleep 0.1
    done
    wait "$server" || true
    port=$((port + 1))
}
iperf single
iperf bidir --bidir
# The ceiling a ring of N ranks meets: N streams at once, each between its
# own client and server process, as each rank sends to one neighbour while
# it receives from the other.
for n in $ranks_list; do
    for k in $(seq "$n"); do
        iperf "ring$n-$k" &
        port=$((port + 1))
    done
    wait
done
"$python" - "$out" <<'EOF' | tee "$out/iperf3.txt"
import json, sys
out = sys.argv[1]
single = json.load(open(f"{out}/iperf3-single.json"))["end"]["sum_received"]["bits_per_second"] / 8e9
bidir = json.load(open(f"{out}/iperf3-bidir.json"))["end"]
each = min(bidir["sum_received"]["bits_per_second"], bidir["sum_received_bidir_reverse"]["bits_per_second"]) / 8e9
print(f"iperf3 127.0.0.1 one stream one way: {single:.3f} GB/s")
print(f"iperf3 127.0.0.1 one stream each way at once (--bidir), slower direction: {each:.3f} GB/s")
EOF
for n in $ranks_list; do
    "$python" - "$out" "$n" <<'EOF' | tee -a "$out/iperf3.txt"
import json, sys
out, n = sys.argv[1], int(sys.argv[2])
rates = [json.load(open(f"{out}/iperf3-ring{n}-{k}.json"))["end"]["sum_received"]["bits_per_second"] / 8e9 for k in range(1, n + 1)]
print(f"iperf3 127.0.0.1 {n} streams at once, a process pair each, slowest stream: {min(rates):.3f} GB/s")
EOF
done

echo "impl,ranks,connections,dtype,op,size_bytes,count,time_us,algbw_GBps,busbw_GBps,check" >"$out/results.csv"
for n in $ranks_list; do
    for c in $connections_list; do
        echo "== N=$n connections=$c" >&2
        "$bin/ringleader" -n "$n" --connections-per-ip "$c" --starting-port "$port" -- \
            "$bin/ringleader-bench" -o all-sum -b 4K -e "$max_bytes" -f 4 -n "$iters" -w 2 --format csv \
            | grep -v '^ranks,' | sed "s/^/ringleader,/" | tee -a "$out/results.csv"
        port=$((port + 64))
        "$mlx_launch" -n "$n" --connections-per-ip "$c" --starting-port "$port" --python "$python" -- \
            "$repo/benches/ring_mlx.py" -b 4K -e "$max_bytes" -f 4 -n "$iters" -w 2 \
            | grep -v '^ranks,' | sed "s/^\([0-9]*\),-,/mlx,\1,$c,/" | tee -a "$out/results.csv"
        port=$((port + 64))
    done
done
echo "load average after: $(cut -d' ' -f1-3 /proc/loadavg)" | tee -a "$out/machine.txt"

"$python" "$repo/benches/ring_report.py" "$out" | tee "$out/report.md"
