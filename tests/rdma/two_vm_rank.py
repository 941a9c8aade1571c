"""One rank of a two-VM job (twovm.across starts it in both VMs): `two_vm_rank.py CASE [args]`.

Every case ends with one line `RESULT <json>` (what this rank saw) that the test in VM a
checks; failures of correctness are strings in the result's "bad" list, so one launch
(slow under emulation) checks many things.
"""
import json
import os
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [HERE, os.path.dirname(HERE)]

import pyccl  # noqa: E402
from pyccl.errors import PeerFailure, PycclError, Timeout, TransportError  # noqa: E402


def _say(obj) -> None:
    os.write(1, ("RESULT " + json.dumps(obj) + "\n").encode())    # one write: never interleaved


def _conn_kinds(comm) -> dict:
    """The transport class joining every peer (connections open lazily: open them all first)."""
    comm.conns.open_all()
    return {str(p): type(c).__name__ for p, c in comm.conns.items()}


def facts(comm):
    """Where this rank runs and what the ibverbs transport chose."""
    from pyccl.topology.detect import host_id
    out = {"host": host_id(), "boot_id": open("/proc/sys/kernel/random/boot_id").read().strip(),
           "bind": comm._bind_host(), "conns": _conn_kinds(comm), "ib": None, "peer_ib": {},
           "inter": comm.topology.inter}
    for p, c in comm.conns.items():
        if type(c).__name__ == "IbvConnection":
            d = c.dev
            out["ib"] = {"dev": d.name, "gid_index": d.gid_index, "gid": d.gid.hex(), "mtu": d.mtu}
            out["peer_ib"][str(p)] = {"dev": c.remote["dev"], "gid": c.remote["gid"], "mtu": c.remote["mtu"]}
    x = np.full(1001, comm.rank + 1.0)
    comm.all_reduce(x)
    s = comm.size * (comm.size + 1) / 2
    out["bad"] = [] if np.all(x == s) else [f"all_reduce gave {x[0]}, want {s}"]
    return out


def every(comm):
    """Every collective x dtype x odd sizes, point-to-point, uneven all_to_all, async, split,
    and a 16 MiB all_reduce (test_ibverbs's rank functions)."""
    from test_collectives import (rank_all_to_all_uneven, rank_async_mix, rank_big_all_reduce,
                                  rank_send_recv_barrier, rank_split)
    from test_ibverbs import SIZES, rank_every_collective, rank_p2p
    bad = list(rank_p2p(comm, [0, 1, 7, 4099, 70001], 2))
    bad += rank_every_collective(comm, SIZES)
    for n in (0, 5, 17):
        bad += [f"all_to_all uneven n={n}: {b}" for b in rank_all_to_all_uneven(comm, n) or []]
        bad += [f"send_recv_barrier n={n}: {b}" for b in rank_send_recv_barrier(comm, n) or []]
    bad += [f"async: {b}" for b in rank_async_mix(comm) or []]
    bad += [f"split: {b}" for b in rank_split(comm) or []]
    bad += [f"16 MiB all_reduce: {b}" for b in rank_big_all_reduce(comm, 16) or []]
    return {"conns": _conn_kinds(comm), "bad": bad}


def plans(comm):
    """The multi-host plans: each algorithm the tuner can pick (PYCCL_ALGO), on sizes that take
    one chunk and several, checked against the float64 reference."""
    from pyccl.dtypes import DTYPES
    from pyccl.topology.graph import applicable
    from pyccl.tuner import choose
    from reference import make, mismatch
    s, r = comm.size, comm.rank
    bad, picked = [], {}
    for algo in ("", "ring", "tree", "hierarchical", "halving_doubling"):
        os.environ["PYCCL_ALGO"] = algo
        comm.engines.forget()               # plans and choices are cached per shape, not per algorithm
        for n in (1, 1031, 300007):
            for op in ("all_reduce", "reduce_scatter", "all_gather", "reduce", "broadcast"):
                if algo and not applicable(op, algo, comm.topology):
                    continue
                picked[f"{algo or 'tuner'} {op} {n}"] = choose(op, n * 4 * (s if op == "reduce_scatter" else 1),
                                                              comm.topology, comm.costs).algo
                every = [make(q, n, "float32") for q in range(s)]
                if op == "all_reduce":
                    x = every[r].copy()
                    comm.all_reduce(x)
                    err = mismatch(x, every, "sum", "float32")
                elif op == "reduce":
                    x = every[r].copy()
                    comm.reduce(x, root=s - 1)
                    err = mismatch(x, every, "sum", "float32") if r == s - 1 else ""
                elif op == "broadcast":
                    x = every[r].copy()
                    comm.broadcast(x, root=1 % s)
                    err = "" if np.array_equal(x, every[1 % s]) else "differs from the root's"
                elif op == "all_gather":
                    out = np.zeros(n * s, DTYPES["float32"])
                    comm.all_gather(out, every[r])
                    err = "" if np.array_equal(out, np.concatenate(every)) else "differs"
                else:
                    full = [make(q, n * s, "float32", salt=3) for q in range(s)]
                    out = np.zeros(n, np.float32)
                    comm.reduce_scatter(out, full[r])
                    err = mismatch(out, [f[r * n:(r + 1) * n] for f in full], "sum", "float32")
                if err:
                    bad.append(f"{op} n={n} PYCCL_ALGO={algo or '(tuner)'}: {err}")
    os.environ.pop("PYCCL_ALGO", None)
    return {"conns": _conn_kinds(comm), "picked": picked, "local": comm.local is not None, "bad": bad}


def kill(comm, victim):
    """`victim` dies after a warm-up all_reduce; the others report the error they get and
    whether the survivors can shrink and go on."""
    victim = int(victim)
    x = np.ones(1 << 18, np.float32)
    comm.all_reduce(x)
    if comm.rank == victim:
        time.sleep(0.5)
        os._exit(17)
    t0 = time.monotonic()
    err = None
    try:
        for _ in range(2000):
            comm.all_reduce(x)
    except (PeerFailure, TransportError, Timeout) as e:
        err = {"type": type(e).__name__, "text": str(e), "after_s": round(time.monotonic() - t0, 2)}
    out = {"error": err, "shrunk": None}
    if err is not None:
        try:
            new = comm.shrink(timeout=60)
            y = np.full(1001, comm.rank + 1.0)
            new.all_reduce(y)
            out["shrunk"] = {"size": new.size, "value": float(y[0])}
            new.close()
        except PycclError as e:
            out["shrunk"] = {"error": f"{type(e).__name__}: {e}"}
    return out


def mismatch(comm, base, receiver):
    """Rank 0 sends `base` bytes to `receiver`, which expects 1.5x: both sides must fail
    naming each other (never hang)."""
    base, receiver = int(base), int(receiver)
    if comm.rank not in (0, receiver):
        return {"error": "idle"}
    x = np.zeros(base + (base // 2 if comm.rank == receiver else 0), np.uint8)
    t0 = time.monotonic()
    try:
        if comm.rank == 0:
            comm.send(x, receiver)
        else:
            comm.recv(x, 0)
    except (TransportError, PeerFailure, Timeout) as e:
        return {"error": f"{type(e).__name__}: {e}", "after_s": round(time.monotonic() - t0, 2)}
    time.sleep(5)                           # an eager send is done once posted: let it land
    return {"error": "no error"}


CASES = {"facts": facts, "every": every, "plans": plans, "kill": kill, "mismatch": mismatch}

if __name__ == "__main__":
    case, args = sys.argv[1], sys.argv[2:]
    comm = pyccl.init()
    result = CASES[case](comm, *args)
    result["rank"] = comm.rank
    _say(result)
    sys.stdout.flush()
    if case in ("kill", "mismatch"):
        os._exit(0)                         # a broken communicator: no orderly close
    comm.close()
