#!/usr/bin/env python3
"""Where an 8-byte all_reduce's time goes on one host (issue 33): the same call peeled layer
by layer, every layer timed in the same processes, rounds interleaved, beside MPICH when
launched by mpiexec.

    mpiexec -n 2 python bench/small_breakdown.py [--calls 2000] [--rounds 40]
    python -m pyccl.launch -n 2 bench/small_breakdown.py      (no MPI column)

Layers (µs per call, each a tight loop of `--calls` calls; every rank runs the same loop, so
each call also waits for the slowest rank; the layers take turns every round, so on a loaded
machine many short rounds compare them over the same minutes better than a few long ones):
  fresh     comm.all_reduce(x[:]): a new array object every call, so validated and priced
            every time (the path of a call on an array the communicator has not seen)
  api       comm.all_reduce(x): the same array again (the validator's remembered Call, the
            engine choice and pointer kept with it), queue, recorder, engine.short, C
  short     engine.short(call, seq) on a prepared Call: the engine's Python, cffi, C
  c         lib.pyccl_coll_all_reduce straight from a prepared cffi pointer: cffi + C
  barrier   lib.pyccl_coll_barrier: cffi + the signature stores + one flag handshake, no data
  cffi      lib.pyccl_share_hint(): a cffi call that does nothing (the binding alone)
  mpi       mpi4py Allreduce (in place) of the same 8 bytes, for scale
Differences between adjacent layers are the cost of a layer: api - short = the
communicator's Python, short - c = the engine's Python, c - barrier = the data (copy into the
segment, reduce out of it), barrier - cffi = the handshake between cores.
"""
import argparse
import os
import sys
import time

import numpy as np


def loop(fn, n):
    t = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - t) / n * 1e6


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--calls", type=int, default=2000)
    p.add_argument("--rounds", type=int, default=40)
    args = p.parse_args()

    import pyccl
    from pyccl._native import ffi, lib
    comm = pyccl.init()
    eng = comm.local
    if eng is None or not eng.enabled:
        sys.exit("the shm engine is not on (one host, PYCCL_SHM_COLLECTIVES=1 needed)")
    x = np.ones(2, np.float32)
    call = comm.validate.all_reduce(x, pyccl.SUM, False)
    c, ptr, timeout = eng._c, ffi.from_buffer(x), eng.timeout
    layers = {
        "fresh": lambda: comm.all_reduce(x[:]),
        "api": lambda: comm.all_reduce(x),
        "short": lambda: eng.short(call, 0),
        "c": lambda: lib.pyccl_coll_all_reduce(c, ptr, ptr, 2, 2, 0, -1, timeout),
        "barrier": lambda: lib.pyccl_coll_barrier(c, timeout),
        "cffi": lib.pyccl_share_hint,
    }
    from pyccl.reduce import _DTYPE_CODE, _OP_CODE
    assert _DTYPE_CODE[np.dtype(np.float32)] == 2 and _OP_CODE[pyccl.SUM] == 0, "codes changed"
    try:
        from pyccl.env import detect
        if detect().launcher in ("openmpi", "mpich"):
            from mpi4py import MPI
            w = MPI.COMM_WORLD
            layers["mpi"] = lambda: w.Allreduce(MPI.IN_PLACE, x)
    except ImportError:
        pass
    res = {k: [] for k in layers}
    for r in range(args.rounds):
        for name, fn in layers.items():
            comm.barrier()
            loop(fn, args.calls // 10)               # warm
            comm.barrier()
            t = np.array([loop(fn, args.calls)])
            comm.all_reduce(t, op="max")
            res[name].append(float(t[0]))
    if comm.rank == 0:
        print(f"# 8 B float32 all_reduce, {comm.size} ranks, {args.calls} calls x {args.rounds} rounds, "
              f"µs per call (slowest rank): median (min-max), quartiles; load average {os.getloadavg()[0]:.1f}")
        for name, ts in res.items():
            q1, q3 = np.percentile(ts, [25, 75])
            print(f"  {name:>8} {np.median(ts):7.2f} ({min(ts):.2f}-{max(ts):.2f})   quartiles {q1:.2f}-{q3:.2f}")
        if "mpi" in res:
            for name in ("api", "fresh"):
                ratio = np.array(res[name]) / np.array(res["mpi"])
                q1, q3 = np.percentile(ratio, [25, 75])
                print(f"# {name}/mpi per round: median {np.median(ratio):.2f} (quartiles {q1:.2f}-{q3:.2f}, "
                      f"{int((ratio <= 1).sum())} of {len(ratio)} rounds <= 1)")
        med = {k: float(np.median(v)) for k, v in res.items()}
        print(f"# layers: communicator {med['api'] - med['short']:.2f}, engine Python "
              f"{med['short'] - med['c']:.2f}, data {med['c'] - med['barrier']:.2f}, handshake + signature "
              f"{med['barrier'] - med['cffi']:.2f}, cffi {med['cffi']:.2f}")
    comm.close()


if __name__ == "__main__":
    main()
