"""One rank of the composed-collective tests (tests/multihost/test_composed.py).

    COMPOSED_MODE=check|kill|mismatch  COMPOSED_LAYOUT=major|roundrobin|uneven  COMPOSED_HOSTS=H

Without PYCCL_HOST_ID (pyccl.launch on one machine) the rank poses as a host from
COMPOSED_LAYOUT: major = ranks of a host consecutive (rank // L), roundrobin = rank % H,
uneven = host 0 holds one rank more. In namespaces (netns.py) PYCCL_HOST_ID is already set.
Writes {"bad": [...], "engine": [...], "error": "<type>: <message>"} to
$COMPOSED_OUT/rank<r>.json (and prints it) for the test to read.
"""
import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))

rank, size = int(os.environ["PYCCL_RANK"]), int(os.environ["PYCCL_SIZE"])
H = int(os.environ.get("COMPOSED_HOSTS", "2"))
layout = os.environ.get("COMPOSED_LAYOUT", "major")
if "PYCCL_HOST_ID" not in os.environ:
    if layout == "roundrobin":
        host = rank % H
    elif layout == "uneven":                 # host 0: size // H + 1 ranks, the rest after
        first = size // H + 1
        host = 0 if rank < first else 1 + (rank - first) * (H - 1) // (size - first)
    else:
        host = rank // (size // H)
    os.environ["PYCCL_HOST_ID"] = f"emulated-host{host}"

import numpy as np  # noqa: E402

import pyccl  # noqa: E402
from pyccl.errors import PycclError  # noqa: E402
from test_collectives import (rank_all_reduce, rank_all_to_all_uneven, rank_data_movement,  # noqa: E402
                              rank_reduce, rank_reduce_scatter, rank_send_recv_barrier)


def check(comm):
    # sizes: 0, 1, primes, counts not divisible by the local size or the rank count,
    # and one past the shm engine's one-shot limit (pipelined local phases, a tail)
    sizes = [0, 1, 7, 1031, 40009]
    bad = []
    for fn in (rank_all_reduce, rank_reduce, rank_reduce_scatter, rank_data_movement):
        bad += fn(comm, sizes)
    for n in (0, 5, 17):
        bad += rank_all_to_all_uneven(comm, n) + rank_send_recv_barrier(comm, n)
    x = np.full(3 << 20, comm.rank + 1, np.float32)          # 12 MiB: several chunks per rail
    comm.all_reduce(x)
    if not np.all(x == comm.size * (comm.size + 1) / 2):
        bad.append("12 MiB all_reduce")
    w = [comm.all_reduce(np.full(1001, comm.rank, np.int64), async_op=True) for _ in range(3)]
    for work in w:
        work.wait()
    return bad


def main():
    mode = os.environ.get("COMPOSED_MODE", "check")
    comm = pyccl.init()
    bad, error = [], ""
    try:
        if mode == "check":
            bad = check(comm)
        else:
            x = np.ones(1 << 18, np.float32)
            comm.all_reduce(x)                               # everybody up, connections warm
            if mode == "kill" and rank == size - 1:
                os._exit(3)                                  # dies between collectives
            if mode == "mismatch" and rank >= size - size // H:
                x = np.ones((1 << 18) + 4096, np.float32)    # another count on the whole last host
            comm.all_reduce(x)
            bad.append("no error raised")
    except PycclError as e:
        error = f"{type(e).__name__}: {e}"
    hier = comm.engines.by_name["composed"]
    engine = [type(hier).__name__, type(hier._local).__name__] if hier._local is not None else []
    report = json.dumps({"bad": bad[:5], "engine": engine, "error": error})
    print(report, flush=True)
    if os.environ.get("COMPOSED_OUT"):
        with open(os.path.join(os.environ["COMPOSED_OUT"], f"rank{rank}.json"), "w") as f:
            f.write(report)
    comm.close()
    return 1 if bad or (error and mode == "check") else 0


if __name__ == "__main__":
    sys.exit(main())
