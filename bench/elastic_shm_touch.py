#!/usr/bin/env python3
"""What PYCCL_SHM_RESERVE=check moves from set-up to the first calls: with the segments made
unallocated, the first collective that reaches a page of the shared-memory segment allocates
it (a page fault), where `full` zeroed every byte at creation.

    python -m pyccl.launch -n 4 bench/elastic_shm_touch.py [--sizes 1,16,64] [--reps 3]
    PYCCL_SHM_RESERVE=full python -m pyccl.launch -n 4 bench/elastic_shm_touch.py

Each rank times a split of the world communicator (a new one: its segments made then), then per
size (MiB of float32) the first all_reduce and the median of the next --reps; rank 0 prints
the slowest rank's times (the span of a collective is its slowest rank's).
"""
import argparse
import os
import statistics
import time

import numpy as np

import pyccl


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--sizes", default="1,16,64", help="MiB per rank, comma-separated")
    p.add_argument("--reps", type=int, default=3)
    a = p.parse_args()
    world = pyccl.init()
    world.barrier()
    t = time.perf_counter()
    comm = world.split(0, world.rank)        # a new communicator: new segments, made now
    comm.barrier()
    rows = [("split + barrier", time.perf_counter() - t, None)]
    for mib in (int(s) for s in a.sizes.split(",")):
        x = np.ones((mib << 20) // 4, np.float32)
        comm.barrier()
        t = time.perf_counter()
        comm.all_reduce(x)
        first = time.perf_counter() - t
        again = []
        for _ in range(a.reps):
            comm.barrier()
            t = time.perf_counter()
            comm.all_reduce(x)
            again.append(time.perf_counter() - t)
        assert x[0] == comm.size ** (a.reps + 1), x[0]
        rows.append((f"all_reduce {mib} MiB", first, statistics.median(again)))
    mine = np.array([[r[1], r[2] or 0.0] for r in rows])
    comm.all_reduce(mine, op=pyccl.MAX)
    if comm.rank == 0:
        mode = os.environ.get("PYCCL_SHM_RESERVE") or "check (default)"
        print(f"# PYCCL_SHM_RESERVE={mode}, {comm.size} ranks, load {os.getloadavg()[0]:.1f}; slowest rank, ms")
        for (name, _, again), (first, rest) in zip(rows, mine):
            print(f"{name:>20}  first {first * 1e3:8.2f}" + (f"  then {rest * 1e3:8.2f}" if again is not None else ""))
    comm.close()
    world.close()


if __name__ == "__main__":
    main()
