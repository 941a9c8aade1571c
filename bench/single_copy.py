#!/usr/bin/env python3
"""Single copy (cross-memory attach, native/shm_cma.c) against the segment path, in the same
processes (issue 33): why PYCCL_SHM_CMA_BYTES is off by default.

    python -m pyccl.launch -n 2 bench/single_copy.py [--ops all_reduce,all_gather] [--rounds 3]

First the kernel's copy alone (pyccl_cma_read of this process's own buffers) beside memcpy,
then each op and size on two communicators of the same ranks, one with single copy from 4 KiB
and one without, rounds alternated; per round the median of --iters calls, the slowest rank's.
"""
import argparse
import os
import time

import numpy as np

SIZES = [1 << 20, 4 << 20, 16 << 20, 128 << 20]


def best_of(fn, k=7):
    ts = []
    for _ in range(k):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return min(ts), float(np.median(ts))


def kernel_copy(lib, ffi):
    """GB/s of process_vm_readv and of memcpy, same buffers, this process alone."""
    print("# bytes      process_vm_readv GB/s best (median)   memcpy GB/s best (median)")
    for n in SIZES:
        a, b = np.ones(n, np.uint8), np.zeros(n, np.uint8)
        src, dst = ffi.cast("uint64_t", ffi.from_buffer(a)), ffi.from_buffer(b)
        c = best_of(lambda: lib.pyccl_cma_read(os.getpid(), dst, src, n))
        m = best_of(lambda: np.copyto(b, a))
        print(f"  {n:>10}   {n / c[0] / 1e9:6.2f} ({n / c[1] / 1e9:6.2f})"
              f"                    {n / m[0] / 1e9:6.2f} ({n / m[1] / 1e9:6.2f})", flush=True)


def call_of(comm, op, nbytes):
    P, x = comm.size, np.ones(nbytes // 4, np.float32)
    if op == "all_reduce":
        return lambda: comm.all_reduce(x)
    if op == "all_gather":
        out = np.empty(x.size * P, np.float32)
        return lambda: comm.all_gather(out, x)
    if op == "reduce_scatter":
        inp = np.ones(x.size * P, np.float32)
        return lambda: comm.reduce_scatter(x, inp)
    return lambda: comm.broadcast(x, root=0)


def timed(comm, fn, iters):
    """Median of `iters` calls after a barrier, the slowest rank's (us); one untimed call first
    (bench/shm_variants.py uses it too)."""
    fn()
    ts = []
    for _ in range(iters):
        comm.barrier()
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    t = np.array([np.median(ts)])
    comm.all_reduce(t, op="max")
    return float(t[0]) * 1e6


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ops", default="all_reduce,all_gather,reduce_scatter,broadcast")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--iters", type=int, default=8)
    p.add_argument("--sizes", default="1,4,16,128", help="MiB per rank, comma list")
    args = p.parse_args()
    import pyccl
    from pyccl._native import ffi, lib
    os.environ["PYCCL_SHM_CMA_BYTES"] = "4096"            # every op from 4 KiB
    cma = pyccl.init()
    os.environ["PYCCL_SHM_CMA_BYTES"] = "0"
    seg = pyccl.init()
    if cma.local is None or not cma.local.single_copy_bytes:
        raise SystemExit("single copy did not turn on (PYCCL_DEBUG=INFO says why)")
    if cma.rank == 0:
        kernel_copy(lib, ffi)
        print(f"# {cma.size} ranks: µs per call, median of {args.iters} per round, {args.rounds} rounds "
              f"alternated; single copy / segment")
    for op in args.ops.split(","):
        for n in [int(m) << 20 for m in args.sizes.split(",")]:
            a, b = call_of(cma, op, n), call_of(seg, op, n)
            t = {"single": [], "segment": []}
            for _ in range(args.rounds):
                t["single"].append(timed(cma, a, args.iters))
                t["segment"].append(timed(seg, b, args.iters))
            if cma.rank == 0:
                s, g = np.median(t["single"]), np.median(t["segment"])
                print(f"  {op:>14} {n >> 20:>4} MiB  single {' '.join(f'{v:.0f}' for v in t['single'])}"
                      f"  segment {' '.join(f'{v:.0f}' for v in t['segment'])}  segment/single {g / s:.2f}",
                      flush=True)
    seg.close()
    cma.close()


if __name__ == "__main__":
    main()
