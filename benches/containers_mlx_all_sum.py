"""Measure MLX ring all_sum bandwidth; run one copy per rank.

Each rank reads MLX_RANK and MLX_HOSTFILE as MLX's ring backend expects.
Rank 0 prints one line per message size:

    mlx all_sum bytes=<n> seconds=<slowest rank's mean> algbw_gbs=<x> busbw_gbs=<y>

Bus bandwidth is algorithm bandwidth times 2 (n - 1) / n, the volume each
link of a ring carries per all_sum, so it compares across world sizes.
"""

import argparse
import statistics
import time

import mlx.core as mx


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="4096,65536,1048576,16777216",
                        help="message sizes in bytes, comma-separated")
    parser.add_argument("--iterations", type=int, default=10,
                        help="timed all_sum calls per size")
    parser.add_argument("--warmup", type=int, default=2,
                        help="untimed all_sum calls per size")
    args = parser.parse_args()

    group = mx.distributed.init(backend="ring", strict=True)
    size = group.size()
    for nbytes in (int(text) for text in args.sizes.split(",")):
        data = mx.ones((nbytes // 4,), dtype=mx.float32)
        mx.eval(data)
        for _ in range(args.warmup):
            mx.eval(mx.distributed.all_sum(data))

        durations = []
        for _ in range(args.iterations):
            start = time.perf_counter()
            total = mx.distributed.all_sum(data)
            mx.eval(total)
            durations.append(time.perf_counter() - start)

        if float(total[0]) != size:
            raise SystemExit(f"all_sum returned {float(total[0])}, expected {size}")

        # Report the slowest rank's mean, as ringleader-bench does.
        means = mx.distributed.all_gather(mx.array([statistics.fmean(durations)]))
        seconds = float(mx.max(means))
        if group.rank() == 0:
            algbw = nbytes / seconds / 1e9
            busbw = algbw * 2 * (size - 1) / size
            print(f"mlx all_sum bytes={nbytes} seconds={seconds:.6f} "
                  f"algbw_gbs={algbw:.3f} busbw_gbs={busbw:.3f}", flush=True)


if __name__ == "__main__":
    main()
