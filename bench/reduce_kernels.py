#!/usr/bin/env python3
"""Reduction kernel speed: the C core (pyccl._native) vs its numpy twin, against memcpy.

    python bench/reduce_kernels.py [--sizes 1M,16M,128M] [--dtypes float32,bfloat16] [--json]

For each array size (bytes per array) it times ``dst = a + b`` (out of place) and ``a += b``
(in place) with both implementations, and a memcpy of the same buffer through ``pyccl_copy``
as the ceiling.  Reported: the median time over repeats and the memory traffic rate, GB/s =
bytes read + written / time (3 x size for a reduce, 2 x size for a copy; 1 GB = 1e9 B), so the
reduce and memcpy columns compare directly: a memory-bound kernel runs near memcpy's rate.
(Write-allocate traffic is not counted, and glibc's memcpy switches to non-temporal stores for
large buffers, so "vs memcpy" can exceed 100%.)  Single thread, as the executor calls it.
"""
import argparse
import json
import statistics
import sys
import time

import numpy as np

from pyccl import reduce as R
from pyccl.dtypes import DTYPES, ReduceOp

UNITS = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}


def parse_size(s):
    s = s.strip().upper().removesuffix("IB").removesuffix("B")
    return int(float(s[:-1]) * UNITS[s[-1]]) if s[-1] in UNITS else int(s)


def human(n):
    for unit in ("GiB", "MiB", "KiB"):
        if n >= UNITS[unit[0]]:
            return f"{n / UNITS[unit[0]]:g} {unit}"
    return f"{n} B"


def median_time(fn, budget_s=1.5, min_reps=5, max_reps=200):
    fn()  # warm up: page faults, caches, dispatch
    t0 = time.perf_counter()
    fn()
    one = max(time.perf_counter() - t0, 1e-7)
    reps = int(min(max_reps, max(min_reps, budget_s / one)))
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), reps


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default="1M,16M,128M", help="bytes per array, comma separated")
    p.add_argument("--dtypes", default="float32,bfloat16")
    p.add_argument("--json", action="store_true", help="print one JSON object per row")
    args = p.parse_args(argv)
    if not R.NATIVE_AVAILABLE:
        print("pyccl._native is not built: `pip install -e .` first", file=sys.stderr)
        return 1

    rng = np.random.default_rng(0)
    print("# pyccl reduce kernels, SUM, single thread; GB/s = (bytes read + written) / time")
    hdr = f"{'size':>9} {'dtype':>9} {'kernel':>22} {'time_ms':>9} {'GB/s':>7} {'vs memcpy':>9}"
    if not args.json:
        print(hdr)
    for size in (parse_size(s) for s in args.sizes.split(",")):
        src = np.empty(size, np.uint8)
        dst = np.empty(size, np.uint8)
        src.fill(1)
        dst.fill(0)
        t_copy, reps = median_time(lambda: R.copy_into(dst, src))
        copy_gbs = 2 * size / t_copy / 1e9
        rows = [(human(size), "bytes", "memcpy (pyccl_copy)", t_copy, copy_gbs, reps)]
        del src, dst
        for name in args.dtypes.split(","):
            dt = DTYPES[name]
            n = size // dt.itemsize
            a = rng.standard_normal(n, dtype=np.float32).astype(dt)
            b = rng.standard_normal(n, dtype=np.float32).astype(dt)
            out = np.empty_like(a)
            cases = [
                ("native dst=a+b", lambda: R.reduce_native(out, a, b, ReduceOp.SUM)),
                ("native a+=b", lambda: R.reduce_native(a, a, b, ReduceOp.SUM)),
                ("numpy twin dst=a+b", lambda: R.reduce_numpy(out, a, b, ReduceOp.SUM)),
                ("numpy twin a+=b", lambda: R.reduce_numpy(a, a, b, ReduceOp.SUM)),
            ]
            for label, fn in cases:
                t, reps = median_time(fn)
                rows.append((human(size), name, label, t, 3 * size / t / 1e9, reps))
            del a, b, out
        for hs, name, label, t, gbs, reps in rows:
            if args.json:
                print(json.dumps({"size": hs, "dtype": name, "kernel": label, "time_ms": t * 1e3,
                                  "GB/s": gbs, "vs_memcpy": gbs / copy_gbs, "repeats": reps}))
            else:
                print(f"{hs:>9} {name:>9} {label:>22} {t * 1e3:9.3f} {gbs:7.1f} "
                      f"{gbs / copy_gbs:8.0%}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
