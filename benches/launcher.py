#!/usr/bin/env python3
"""Launcher benchmarks: ringleader against mlx.launch, side by side in one run.

Usage: benches/launcher.py RINGLEADER MLX_LAUNCH [--runs N] [--quick]

Prints a Markdown table of medians and ratios for:
  wall      `-n 8 -- true` wall time
  kill      failing rank's exit -> launcher exit (every other rank reaped)
  forward   4 ranks x 64 MiB of lines to a file, against the ranks writing
            straight to files without a launcher
  cpu       launcher CPU time over a 10 s job of sleeping ranks
  backpressure  peak RSS while 4 ranks write 256 MiB to a reader draining 20 MB/s
  ranks64   peak RSS with 64 local ranks
"""

import argparse
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time

LINE = "0123456789 abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ 0123456789"


def median_of(runs, measure):
    return statistics.median(measure() for _ in range(runs))


def timed(argv, **kwargs):
    start = time.perf_counter()
    subprocess.run(argv, check=False, **kwargs)
    return time.perf_counter() - start


def launch_wall(launcher, runs):
    argv = [launcher, "-n", "8", "--", "true"]
    timed(argv)  # warm the page cache
    return median_of(runs, lambda: timed(argv, stdin=subprocess.DEVNULL))


def kill_latency(launcher, runs):
    """Seconds from the failing rank's last instruction to the launcher's exit."""

    def once():
        with tempfile.TemporaryDirectory() as tmp:
            stamp = os.path.join(tmp, "stamp")
            script = (
                f'if [ "$MLX_RANK" = 0 ]; then sleep 0.3; '
                f'python3 -c "import time; open(\'{stamp}\', \'w\').write(str(time.time()))"; exit 1; fi; '
                "exec sleep 30"
            )
            subprocess.run([launcher, "-n", "4", "--", "sh", "-c", script],
                           stdin=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            ended = time.time()
            # The stamp is written before python3 exits, so the interpreter's
            # shutdown (about 10 ms) counts against the launcher.
            return ended - float(open(stamp).read())

    return median_of(runs, once)


def forward_throughput(launcher, runs, size):
    """Bytes per second the launcher forwards from 4 ranks into a file."""
    producer = f"yes '{LINE}' | head -c {size}"

    def with_launcher():
        with tempfile.TemporaryFile() as out:
            elapsed = timed([launcher, "-n", "4", "--", "sh", "-c", producer],
                            stdout=out, stdin=subprocess.DEVNULL)
            assert out.tell() >= 4 * size, f"{launcher} lost output: {out.tell()} bytes"
        return 4 * size / elapsed

    def direct():
        with tempfile.TemporaryDirectory() as tmp:
            start = time.perf_counter()
            children = [subprocess.Popen(["sh", "-c", f"{producer} > {tmp}/rank-{i}"]) for i in range(4)]
            for child in children:
                child.wait()
            return 4 * size / (time.perf_counter() - start)

    return median_of(runs, with_launcher), median_of(runs, direct)


def launcher_cpu(launcher, seconds):
    """CPU seconds the launcher and its (sleeping) ranks used over the job."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    subprocess.run([launcher, "-n", "4", "--", "sleep", str(seconds)], stdin=subprocess.DEVNULL)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def peak_rss_mib(argv, stdout=subprocess.DEVNULL, reader=None):
    """Peak resident memory of the launcher process alone, sampled from /proc."""
    process = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=stdout, stderr=subprocess.DEVNULL)
    drain = threading.Thread(target=reader, args=(process.stdout,)) if reader else None
    if drain:
        drain.start()
    peak_kib = 0
    while process.poll() is None:
        try:
            with open(f"/proc/{process.pid}/status") as status:
                for line in status:
                    if line.startswith("VmHWM:"):
                        peak_kib = max(peak_kib, int(line.split()[1]))
        except (FileNotFoundError, ProcessLookupError):
            break
        time.sleep(0.05)
    process.wait()
    if drain:
        drain.join()
    return peak_kib / 1024


def slow_reader(rate):
    def read(stream):
        start = time.perf_counter()
        total = 0
        while True:
            chunk = stream.read1(65536) if hasattr(stream, "read1") else stream.read(65536)
            if not chunk:
                return
            total += len(chunk)
            ahead = total / rate - (time.perf_counter() - start)
            if ahead > 0:
                time.sleep(ahead)
    return read


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("ringleader")
    parser.add_argument("mlx_launch")
    parser.add_argument("--runs", type=int, default=10, help="runs per median (default 10)")
    parser.add_argument("--quick", action="store_true", help="smaller sizes, for a smoke test")
    args = parser.parse_args()
    ours, theirs = args.ringleader, args.mlx_launch
    forward_size = (8 if args.quick else 64) << 20
    flood_size = (16 if args.quick else 64) << 20
    cpu_seconds = 2 if args.quick else 10

    rows = []

    def row(name, ours_value, theirs_value, unit, target):
        ratio = theirs_value / ours_value if ours_value else float("inf")
        rows.append((name, ours_value, theirs_value, unit, ratio, target))
        print(f"{name}: ringleader {ours_value:.4g} {unit}, mlx.launch {theirs_value:.4g} {unit}", file=sys.stderr)

    row("`-n 8 -- true` wall (median)", launch_wall(ours, args.runs), launch_wall(theirs, args.runs), "s",
        ">= 5x faster")
    row("kill-on-failure latency (median)", kill_latency(ours, args.runs), kill_latency(theirs, args.runs), "s",
        "<= 20 ms")
    ours_rate, direct_rate = forward_throughput(ours, args.runs, forward_size)
    theirs_rate, _ = forward_throughput(theirs, max(3, args.runs // 3), forward_size)
    rows.append((f"4 x {forward_size >> 20} MiB lines forwarded (median)", ours_rate / 1e6, theirs_rate / 1e6,
                 "MB/s", ours_rate / theirs_rate, ">= 3x mlx.launch"))
    rows.append(("... same, as a share of ranks writing straight to files", ours_rate / direct_rate,
                 theirs_rate / direct_rate, "of direct", ours_rate / direct_rate, ">= 80%"))
    row(f"launcher CPU over a {cpu_seconds} s job of sleeping ranks", launcher_cpu(ours, cpu_seconds),
        launcher_cpu(theirs, cpu_seconds), "s", "<= 20 ms")
    flood = ["sh", "-c", f"yes '{LINE}' | head -c {flood_size}"]
    row(f"peak RSS, 4 ranks x {flood_size >> 20} MiB to a 20 MB/s reader",
        peak_rss_mib([ours, "-n", "4", "--"] + flood, subprocess.PIPE, slow_reader(20e6)),
        peak_rss_mib([theirs, "-n", "4", "--"] + flood, subprocess.PIPE, slow_reader(20e6)), "MiB", "<= 32 MiB")
    row("peak RSS with 64 local ranks", peak_rss_mib([ours, "-n", "64", "--", "sleep", "1"]),
        peak_rss_mib([theirs, "-n", "64", "--", "sleep", "1"]), "MiB", "<= 64 MiB")

    print("| measure | ringleader | mlx.launch | unit | mlx.launch / ringleader | target |")
    print("| --- | --- | --- | --- | --- | --- |")
    for name, ours_value, theirs_value, unit, ratio, target in rows:
        print(f"| {name} | {ours_value:.4g} | {theirs_value:.4g} | {unit} | {ratio:.2f} | {target} |")


if __name__ == "__main__":
    main()
