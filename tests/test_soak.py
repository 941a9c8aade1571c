"""Soak: thousands of random collectives on 4 ranks (random op, size, dtype, root, async mix,
two overlapping sub-communicators), every result checked. Prints ops/s."""
import os
import time

import numpy as np
import pytest

from pyccl.dtypes import DTYPES
from reference import REDUCE_DTYPES, make, mismatch

OPS = int(os.environ.get("PYCCL_SOAK_OPS", "5000"))


def rank_soak(comm, nops, seed):
    rng = np.random.default_rng(seed)               # same stream on every rank: same calls
    evens = comm.split(comm.rank % 2)               # {0,2} and {1,3}
    halves = comm.split(comm.rank // 2)             # {0,1} and {2,3}: overlaps the first split
    comms = [comm, evens, halves]
    pending, bad, done = [], [], 0
    t0 = time.perf_counter()
    for i in range(nops):
        which = int(rng.integers(0, 3))
        kind = rng.choice(["all_reduce", "broadcast", "all_gather", "reduce_scatter", "all_to_all", "reduce"])
        dtype = str(rng.choice(REDUCE_DTYPES))
        n = int(rng.choice([0, 1, 3, 17, 1000, 4099]))
        use_async = bool(rng.integers(0, 2))
        c = comms[which]
        # every member of comms[which] takes part; the others skip this op entirely
        size, rank = c.size, c.rank
        root = int(rng.integers(0, size))
        op = str(rng.choice(["sum", "max", "min"]))
        salt = i
        x = make(rank, n, dtype, op, salt)
        inputs = [make(r, n, dtype, op, salt) for r in range(size)]
        if kind == "all_reduce":
            w = c.all_reduce(x, op=op, async_op=use_async)
            check = (lambda x=x, inputs=inputs, op=op, dtype=dtype: mismatch(x, inputs, op, dtype))
        elif kind == "reduce":
            w = c.reduce(x, root=root, op=op, async_op=use_async)
            check = (lambda x=x, inputs=inputs, op=op, dtype=dtype, r=rank, root=root:
                     mismatch(x, inputs, op, dtype) if r == root else "")
        elif kind == "broadcast":
            w = c.broadcast(x, root=root, async_op=use_async)
            check = (lambda x=x, want=inputs[root]: "" if np.array_equal(x.view(np.uint8), want.view(np.uint8))
                     else "broadcast differs")
        elif kind == "all_gather":
            out = np.zeros(n * size, DTYPES[dtype])
            w = c.all_gather(out, x, async_op=use_async)
            check = (lambda out=out, want=np.concatenate(inputs):
                     "" if np.array_equal(out.view(np.uint8), want.view(np.uint8)) else "all_gather differs")
        elif kind == "reduce_scatter":
            big = [make(r, n * size, dtype, op, salt) for r in range(size)]
            out = np.zeros(n, DTYPES[dtype])
            w = c.reduce_scatter(out, big[rank], op=op, async_op=use_async)
            check = (lambda out=out, big=big, op=op, dtype=dtype, r=rank, n=n:
                     mismatch(out, [b[r * n:(r + 1) * n] for b in big], op, dtype))
        else:
            big = [make(r, n * size, dtype, op, salt) for r in range(size)]
            out = np.zeros(n * size, DTYPES[dtype])
            w = c.all_to_all(out, big[rank], async_op=use_async)
            want = np.concatenate([b[rank * n:(rank + 1) * n] for b in big])
            check = (lambda out=out, want=want:
                     "" if np.array_equal(out.view(np.uint8), want.view(np.uint8)) else "all_to_all differs")
        pending.append((i, kind, dtype, n, w if use_async else None, check))
        if len(pending) > 8 or i == nops - 1:
            for j, k, d, m, work, chk in pending:
                if work is not None:
                    work.wait()
                err = chk()
                done += 1
                if err:
                    bad.append(f"op {j} {k} {d} n={m}: {err}")
            pending = []
    elapsed = time.perf_counter() - t0
    evens.close()
    halves.close()
    return {"ops": done, "bad": bad, "seconds": elapsed}


@pytest.mark.timeout(900)
def test_soak_random_collectives(groups):
    g = groups(4)
    results = g.run(rank_soak, OPS, 20261122, timeout=800)
    bad = [b for r in results for b in r["bad"]]
    ops = sum(r["ops"] for r in results)
    secs = max(r["seconds"] for r in results)
    print(f"soak: {ops} rank-ops checked on 4 ranks in {secs:.1f}s ({ops / secs:.0f} rank-ops/s), {len(bad)} wrong")
    assert not bad, bad[:10]
    assert ops == 4 * OPS
