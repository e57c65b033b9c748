"""One MLX rank of the ring interop test.

Usage: python ring_interop.py SPEC.json OUT_DIR

Joins the ring from MLX_RANK and MLX_HOSTFILE with MLX's own ring backend,
runs every case of SPEC in order and appends each result's raw bytes to
OUT_DIR/rank<R>.bin. The Rust rank (tests/tests/ring_interop.rs) derives the
same inputs from the same formulas, so Rust and MLX ranks can share one ring
and their outputs can be compared byte for byte.

SPEC is a JSON list of cases: {"op": "sum" | "max" | "min" | "gather" |
"sendrecv", "dtype": an MLX dtype name, "len": element count}.
"""

import json
import os
import sys

import mlx.core as mx

INTEGERS = {
    "int8": mx.int8,
    "int16": mx.int16,
    "int32": mx.int32,
    "int64": mx.int64,
    "uint8": mx.uint8,
    "uint16": mx.uint16,
    "uint32": mx.uint32,
    "uint64": mx.uint64,
}


def make_input(dtype, case, rank, length):
    """The input of `rank` for case number `case`; see `input_of` in the Rust test.

    Built with MLX integer and float64 arithmetic only (the venv has no
    numpy): uint64 products wrap, casts to narrower integers truncate and
    float casts round to nearest even, as in Rust.
    """
    i = mx.arange(length, dtype=mx.uint64)
    k = i * 31 + (rank * 1_000_003 + case * 7919)
    if dtype in INTEGERS:
        return (k * 2_654_435_761).astype(INTEGERS[dtype])
    double = (k % 1000).astype(mx.float64) / 7.0 - 50.0
    if dtype == "float64":
        return double
    single = double.astype(mx.float32)
    if dtype == "float32":
        return single
    if dtype == "float16":
        return single.astype(mx.float16)
    if dtype == "bfloat16":
        # Round to nearest even, as half::bf16::from_f32 does for finite values.
        bits = single.view(mx.uint32).astype(mx.uint64)
        rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        return rounded.astype(mx.uint16).view(mx.bfloat16)
    raise ValueError(f"unknown dtype {dtype}")


def raw_bytes(array):
    if array.dtype == mx.bfloat16:
        array = array.view(mx.uint16)
    return bytes(memoryview(array))


def run_case(group, case, number):
    rank, size = group.rank(), group.size()
    x = make_input(case["dtype"], number, rank, case["len"])
    op = case["op"]
    if op == "sum":
        return mx.distributed.all_sum(x, group=group)
    if op == "max":
        return mx.distributed.all_max(x, group=group)
    if op == "min":
        return mx.distributed.all_min(x, group=group)
    if op == "gather":
        return mx.distributed.all_gather(x, group=group)
    if op == "sendrecv":
        # Every rank sends to the right and receives from the left; even
        # ranks send first so that the ring cannot deadlock.
        right, left = (rank + 1) % size, (rank - 1) % size
        if rank % 2 == 0:
            mx.eval(mx.distributed.send(x, right, group=group))
            return mx.distributed.recv_like(x, left, group=group)
        received = mx.distributed.recv_like(x, left, group=group)
        mx.eval(received)
        mx.eval(mx.distributed.send(x, right, group=group))
        return received
    raise ValueError(f"unknown op {op}")


def main():
    spec_path, out_dir = sys.argv[1], sys.argv[2]
    with open(spec_path) as f:
        cases = json.load(f)

    group = mx.distributed.init(strict=True, backend="ring")
    with open(os.path.join(out_dir, f"rank{group.rank()}.bin"), "wb") as out:
        for number, case in enumerate(cases):
            result = run_case(group, case, number)
            mx.eval(result)
            out.write(raw_bytes(result))
    print(f"mlx rank {group.rank()} of {group.size()}: {len(cases)} cases done", flush=True)


if __name__ == "__main__":
    main()
