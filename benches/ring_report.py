"""Turn a benches/ring.sh output directory into a Markdown report.

Usage: python ring_report.py OUT_DIR

Reads OUT_DIR/results.csv, OUT_DIR/iperf3-*.json and OUT_DIR/machine.txt. Prints
one table per rank count and connection count, with ringleader's and MLX's
all_sum side by side. Then lists the targets that were missed (bus bandwidth
below 1.25x MLX's from 1 MiB up, latency above MLX's at 4 KiB) and the
largest buffer's bus bandwidth against the loopback ceilings: one stream one
way, one stream each way in one iperf3 process, and N streams at once in N
process pairs (what a ring of N ranks meets).
"""

import csv
import json
import sys
from collections import defaultdict

MIB = 1 << 20


def human(nbytes):
    for unit, scale in (("GiB", 1 << 30), ("MiB", MIB), ("KiB", 1 << 10)):
        if nbytes >= scale and nbytes % scale == 0:
            return f"{nbytes // scale} {unit}"
    return f"{nbytes} B"


def ceilings(out):
    single = json.load(open(f"{out}/iperf3-single.json"))["end"]["sum_received"]["bits_per_second"] / 8e9
    bidir = json.load(open(f"{out}/iperf3-bidir.json"))["end"]
    each = min(
        bidir["sum_received"]["bits_per_second"],
        bidir["sum_received_bidir_reverse"]["bits_per_second"],
    ) / 8e9
    return single, each


def ring_ceiling(out, ranks):
    """Return the slowest of `ranks` iperf3 streams run at once, or None if not measured."""
    rates = []
    for k in range(1, ranks + 1):
        try:
            end = json.load(open(f"{out}/iperf3-ring{ranks}-{k}.json"))["end"]
        except FileNotFoundError:
            return None
        rates.append(end["sum_received"]["bits_per_second"] / 8e9)
    return min(rates)


def main():
    out = sys.argv[1]
    rows = defaultdict(dict)
    with open(f"{out}/results.csv") as f:
        for row in csv.DictReader(f):
            key = (int(row["ranks"]), int(row["connections"]))
            rows[key].setdefault(int(row["size_bytes"]), {})[row["impl"]] = row
    single, bidir = ceilings(out)

    print("```")
    print(open(f"{out}/machine.txt").read().rstrip())
    print(f"loopback ceiling (iperf3, 127.0.0.1): {single:.3f} GB/s one way, {bidir:.3f} GB/s per direction both ways")
    for ranks in sorted({ranks for ranks, _ in rows}):
        ring = ring_ceiling(out, ranks)
        if ring is not None:
            print(f"loopback ceiling for {ranks} ranks ({ranks} iperf3 streams at once): {ring:.3f} GB/s per stream")
    print("```")
    print()

    verdicts = []
    for (ranks, connections), sizes in sorted(rows.items()):
        print(f"### N={ranks}, --connections-per-ip {connections}")
        print()
        ring = ring_ceiling(out, ranks)
        ring_header = f" ringleader busbw / {ranks}-stream ceiling |" if ring else ""
        print("| size | ringleader time (us) | MLX time (us) | ringleader busbw (GB/s) | MLX busbw (GB/s) | busbw ratio | "
              f"ringleader busbw / one-way ceiling |{ring_header}")
        print("|---:|---:|---:|---:|---:|---:|---:|" + ("---:|" if ring else ""))
        for nbytes, impls in sorted(sizes.items()):
            ours, mlx = impls.get("ringleader"), impls.get("mlx")
            if not ours or not mlx:
                continue
            ours_bw, mlx_bw = float(ours["busbw_GBps"]), float(mlx["busbw_GBps"])
            # Same bytes on both sides, so the bandwidth ratio is the time
            # ratio, which keeps its precision where MLX's busbw rounds to 0.
            ratio = float(mlx["time_us"]) / float(ours["time_us"])
            checks = "" if ours["check"] == mlx["check"] == "ok" else " (WRONG result)"
            print(
                f"| {human(nbytes)} | {float(ours['time_us']):.1f} | {float(mlx['time_us']):.1f} | "
                f"{ours_bw:.3f} | {mlx_bw:.3f} | {ratio:.2f}x{checks} | {ours_bw / single:.0%} |"
                + (f" {ours_bw / ring:.0%} |" if ring else "")
            )
            if nbytes >= MIB and ratio < 1.25:
                verdicts.append(f"N={ranks} c={connections} {human(nbytes)}: busbw ratio {ratio:.2f}x is below 1.25x")
            if nbytes == 4096 and float(ours["time_us"]) > float(mlx["time_us"]):
                verdicts.append(f"N={ranks} c={connections} 4 KiB: latency above MLX's")
        largest = max(sizes)
        ours = sizes[largest].get("ringleader")
        if ours:
            bw = float(ours["busbw_GBps"])
            ring = ring_ceiling(out, ranks)
            versus_ring = f", {bw / ring:.0%} of the {ranks}-stream ceiling" if ring else ""
            verdicts.append(
                f"N={ranks} c={connections} {human(largest)}: busbw {bw:.3f} GB/s = {bw / single:.0%} of the one-way "
                f"ceiling, {bw / bidir:.0%} of the per-direction two-way ceiling{versus_ring}"
            )
        print()

    print("Targets and ceiling:")
    print()
    for verdict in verdicts:
        print(f"- {verdict}")


if __name__ == "__main__":
    main()
