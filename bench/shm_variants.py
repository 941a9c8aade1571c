#!/usr/bin/env python3
"""Variants of pyccl's one-host collectives in the same processes, rounds alternated (issue 33):
one communicator per variant, its environment set only while it is made (rank 0's settings are
agreed through the segment), so a noisy minute hits every variant alike.

    python -m pyccl.launch -n 4 bench/shm_variants.py --op all_reduce --sizes 16,128 \
        --variants 'segment:PYCCL_SHM_CMA_BYTES=0;default:'

Per round and variant the median of --iters calls after a barrier, the slowest rank's; a plain
memcpy of the size (every rank at once) in the same rounds.  "xR" is the median over the rounds
of the first variant's time / this one's (above 1: faster than the first).  Sizes in MiB.
"""
import argparse
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from single_copy import timed  # noqa: E402  (median after a barrier, the slowest rank's, in us)

def call_of(comm, op, bufs):
    x = bufs["x"]
    if op == "all_reduce":
        return lambda: comm.all_reduce(x)
    if op == "all_gather":
        return lambda: comm.all_gather(bufs["big"], x)
    if op == "reduce_scatter":
        return lambda: comm.reduce_scatter(x, bufs["big"])
    if op == "broadcast":
        return lambda: comm.broadcast(x, root=0)
    src = bufs["src"]
    return lambda: np.copyto(x, src)


def load():
    with open("/proc/loadavg") as f:
        return " ".join(f.read().split()[:3])


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--op", default="all_reduce", choices=["all_reduce", "all_gather", "reduce_scatter", "broadcast"])
    p.add_argument("--sizes", default="16,128", help="MiB per rank, comma list")
    p.add_argument("--variants", default="default:", help="name:VAR=value,VAR=value;name2:... (the first is the base)")
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--iters", type=int, default=6)
    a = p.parse_args()
    import pyccl
    vs = []
    for spec in a.variants.split(";"):
        name, _, envs = spec.partition(":")
        saved = dict(os.environ)
        for kv in filter(None, envs.split(",")):
            k, _, v = kv.partition("=")
            os.environ[k] = v
        vs.append((name, pyccl.init()))
        os.environ.clear()
        os.environ.update(saved)
    comm = vs[0][1]
    r, P = comm.rank, comm.size
    if r == 0:
        print(f"# {a.op} {P} ranks, variants {[v for v, _ in vs]}, load {load()}", flush=True)
    for mib in a.sizes.split(","):
        n = int(float(mib) * (1 << 20)) // 4
        bufs = {"x": np.ones(n, np.float32), "src": np.ones(n, np.float32), "big": np.ones(n * P, np.float32)}
        res = {v: [] for v, _ in vs}
        res["memcpy"] = []
        for k in range(a.rounds):
            for v, c in (vs if k % 2 == 0 else vs[::-1]):
                bufs["x"][:] = 1
                res[v].append(timed(c, call_of(c, a.op, bufs), a.iters))
            res["memcpy"].append(timed(comm, call_of(comm, "memcpy", bufs), a.iters))
        if r == 0:
            b0, m = np.array(res[vs[0][0]]), np.array(res["memcpy"])
            line = f"{mib:>5} MiB memcpy {np.median(m):9.0f} [{m.min():.0f}-{m.max():.0f}]"
            for v, _ in vs:
                t = np.array(res[v])
                line += f" | {v} {np.median(t):9.0f} [{t.min():.0f}-{t.max():.0f}] x{np.median(b0 / t):.2f}"
            print(line, flush=True)
    if r == 0:
        print(f"# end load {load()}", flush=True)
    for _, c in vs:
        c.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
