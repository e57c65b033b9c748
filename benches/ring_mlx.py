"""Time MLX's own ring all_sum, for comparison with ringleader-bench.

Usage (one copy per rank, launched by mlx.launch or ringleader):
    python ring_mlx.py [--min-bytes 4K] [--max-bytes 256M] [--step-factor 4]
                       [--iters 20] [--warmup-iters 3]

Times mx.distributed.all_sum of float32 arrays on the CPU the same way
ringleader-bench does: one checked operation, warm-up iterations, a barrier,
the timed iterations, then the slowest rank's mean time per operation. Rank 0
prints CSV lines in ringleader-bench's --format csv layout, with
connections reported as "-" (MLX does not expose it).
"""

import argparse
import time

import mlx.core as mx


def parse_size(text):
    units = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    text = text.strip().upper()
    digits = text.rstrip("KMG")
    return int(digits) * units[text[len(digits):]]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-b", "--min-bytes", default="4K", type=parse_size)
    parser.add_argument("-e", "--max-bytes", default="64M", type=parse_size)
    parser.add_argument("-f", "--step-factor", default=4, type=int)
    parser.add_argument("-n", "--iters", default=20, type=int)
    parser.add_argument("-w", "--warmup-iters", default=3, type=int)
    args = parser.parse_args()

    group = mx.distributed.init(strict=True, backend="ring")
    rank, size = group.rank(), group.size()
    if rank == 0:
        print("ranks,connections,dtype,op,size_bytes,count,time_us,algbw_GBps,busbw_GBps,check", flush=True)

    nbytes = args.min_bytes
    while nbytes <= args.max_bytes:
        count = nbytes // 4
        i = mx.arange(count, dtype=mx.uint32)
        x = ((rank % 4) + (i % 3)).astype(mx.float32)
        expected = sum((r % 4) for r in range(size)) + size * (i % 3).astype(mx.float32)
        result = mx.distributed.all_sum(x, group=group)
        ok = bool(mx.all(result == expected).item())

        for _ in range(args.warmup_iters):
            mx.eval(mx.distributed.all_sum(x, group=group))
        mx.eval(mx.distributed.all_sum(mx.array(1.0), group=group))
        started = time.perf_counter()
        for _ in range(args.iters):
            # Each result depends on the previous one, so MLX cannot skip or
            # merge iterations; eval runs each before the next is built.
            x = mx.distributed.all_sum(x, group=group)
            mx.eval(x)
        seconds = (time.perf_counter() - started) / args.iters
        seconds = mx.distributed.all_max(mx.array(seconds, dtype=mx.float32), group=group).item()

        algbw = nbytes / seconds / 1e9
        busbw = algbw * 2 * (size - 1) / size
        if rank == 0:
            check = "ok" if ok else "WRONG"
            print(f"{size},-,float32,all_sum,{nbytes},{count},{seconds * 1e6:.1f},{algbw:.4f},{busbw:.4f},{check}", flush=True)
        nbytes *= args.step_factor


if __name__ == "__main__":
    main()
