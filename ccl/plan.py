"""python -m pyccl.plan: build a plan for a simulated cluster, prove it, cost it, draw it.

    python -m pyccl.plan --hosts 128 --ranks-per-host 8 --op all_reduce --algo double_tree \\
        --verify --cost --draw plan.png

--verify builds every rank's plan for a small count, checks the stage contract statically
(plan_hazards on every rank), and runs the simulator on it (the rotation-symmetric
simulator for ring all_reduce/all_gather/reduce_scatter above 2,048 ranks; the per-rank one
otherwise), plus a chunked run (the executor's "for chunk: for stage" order) when the
plan is small. --cost prints the predicted time per size (8 B .. 1 GiB) for every
algorithm that builds the op, and what the tuner would pick. --draw writes a picture of
the plan's structure and its chunk schedule (on a sub-cluster when the cluster is large).
"""
import argparse
import sys
import time

import numpy as np

from .topology.graph import APPLIES, Topology, applicable, build_all, canonical_algo


def _fmt_time(t):
    if t < 1e-3:
        return f"{t * 1e6:8.1f} us"
    if t < 1:
        return f"{t * 1e3:8.2f} ms"
    return f"{t:8.3f} s "


def _fmt_size(n):
    for unit, div in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= div:
            return f"{n / div:g} {unit}"
    return f"{n} B"


def _data(op, n, count, rng):
    if op == "all_gather":
        return [rng.integers(-50, 50, count) for _ in range(n)]
    if op == "reduce_scatter":
        return [rng.integers(-50, 50, count * n) for _ in range(n)]
    return [rng.integers(-50, 50, count) for _ in range(n)]


def verify(op, algo, topo, count, root=0, chunk_elems=None, inter=None, chunked=None, out=print) -> dict:
    """Build, check and simulate one plan family; raises PlanError/AssertionError if wrong."""
    from .topology.simulate import plan_hazards, simulate, simulate_chunked
    n = topo.nranks
    algo = canonical_algo(algo)
    if algo == "composed":
        return _verify_composed(op, topo, count, root, chunk_elems, chunked, out)
    t0 = time.perf_counter()
    order = topo.ring_order()
    if algo == "ring" and op in ("all_reduce", "all_gather", "reduce_scatter") and n > 2048:
        return _verify_rotational(op, order, n, out)
    plans = build_all(op, algo, topo, count, root=root, chunk_elems=chunk_elems, inter=inter)
    t_build = time.perf_counter() - t0
    nops = sum(len(st) for p in plans for st in p.stages)
    # the stage contract, statically: every rank up to 256 ranks, else a spread of ranks that
    # covers every role (ends, the root, host boundaries) plus random ones
    if n <= 256:
        sample = range(n)
    else:
        step = max(1, n // 128)
        sample = sorted(set(range(0, n, step)) | {1, n - 1, n - 2, root % n, (root + 1) % n}
                        | set(np.random.default_rng(n).integers(0, n, 64).tolist()))
    bad = [(plans[r].rank, h) for r in sample for h in plan_hazards(plans[r])[:1]]
    if bad:
        raise AssertionError(f"stage-contract problems, e.g. rank {bad[0][0]}: {bad[0][1]}")
    rng = np.random.default_rng(n * 7919 + count)
    data = _data(op, n, count, rng)
    runs = [("per-rank", lambda p, b: simulate(p, b, "sum"))]
    if chunked or (chunked is None and nops <= 200_000):
        runs.append(("chunked (2 elements)", lambda p, b: simulate_chunked(p, b, "sum", 2)))
    for name, run in runs:
        t1 = time.perf_counter()
        bufs = _buffers(op, n, count, data)
        run(plans, bufs)
        _check(op, n, count, root, data, bufs)
        out(f"verified {op}/{algo} on {topo.describe()}: count {count}, {nops} ops, "
            f"{name} simulation {time.perf_counter() - t1:.1f}s (build {t_build:.1f}s)")
    return {"ops": nops, "ranks": n}


def _verify_composed(op, topo, count, root, chunk_elems, chunked, out) -> dict:
    """composed = node-local engine calls (the shm C collectives, proven by tests/test_shm.py)
    around one flat plan per rail: verify the rail plans of every algorithm the tuner may
    pick for the rail (H hosts x 1 rank)."""
    from .topology.composed import _RAIL_ALGOS, phases
    rail = Topology.uniform(topo.nhosts, 1, topo.inter, topo.inter)
    done = {}
    for p in phases(op, 1 << 20, topo, {}):
        if p.scope != "rail" or p.op == "barrier":
            continue
        for a in _RAIL_ALGOS[p.op]:
            if applicable(p.op, a, rail):
                done[(p.op, a)] = verify(p.op, a, rail, count, root % topo.nhosts, chunk_elems,
                                         chunked=chunked, out=out)
    out(f"verified composed {op} on {topo.describe()}: the rail plans above; local phases run on "
        f"the node-local engine")
    return {"ops": sum(d.get("ops", 0) for d in done.values()), "ranks": topo.nranks}


def _verify_rotational(op, order, n, out):
    from .topology.simulate import simulate_rotational
    from .topology import ring
    t1 = time.perf_counter()
    rng = np.random.default_rng(n)
    if op == "all_reduce":
        count = n + 3
        data = rng.integers(0, 256, (n, count), dtype=np.uint8)
        buf = data.copy()
        simulate_rotational(lambda r: ring.all_reduce(r, order, count), order,
                            {"out": lambda i: (count * i // n, count * (i + 1) // n)}, {"out": buf})
        ok = (buf == data.sum(axis=0, dtype=np.uint64).astype(np.uint8)).all()
    elif op == "all_gather":
        count = 1
        data = rng.integers(0, 256, (n, count), dtype=np.uint8)
        buf = np.zeros((n, n * count), np.uint8)
        simulate_rotational(lambda r: ring.all_gather(r, order, count), order,
                            {"out": lambda i: (i * count, (i + 1) * count)}, {"in": data, "out": buf})
        ok = (buf == data.reshape(-1)).all()
    else:
        count = 1
        data = rng.integers(0, 256, (n, n * count), dtype=np.uint8)
        buf = np.zeros((n, count), np.uint8)
        simulate_rotational(lambda r: ring.reduce_scatter(r, order, count), order,
                            {"in": lambda i: (i * count, (i + 1) * count)}, {"in": data, "out": buf})
        ok = (buf.reshape(-1) == data.sum(axis=0, dtype=np.uint64).astype(np.uint8)).all()
    if not ok:
        raise AssertionError(f"ring {op} at {n} ranks: wrong result")
    out(f"verified {op}/ring at {n} ranks: count {count} (uint8, wrapping sums), rotation-symmetric "
        f"lockstep simulation {time.perf_counter() - t1:.1f}s")
    return {"ranks": n}


def _buffers(op, n, count, data):
    if op == "all_gather":
        return [{"in": d.copy(), "out": np.zeros(count * n, d.dtype)} for d in data]
    if op == "reduce_scatter":
        return [{"in": d.copy(), "out": np.zeros(count, d.dtype)} for d in data]
    if op == "broadcast":
        return [{"out": d.copy()} for d in data]
    bufs = [{"in": d.copy()} for d in data]
    for b in bufs:
        b["out"] = b["in"]
    return bufs


def _check(op, n, count, root, data, bufs):
    if op == "all_reduce":
        want = np.sum(data, axis=0)
        bad = [r for r in range(n) if not np.array_equal(bufs[r]["out"], want)]
    elif op == "reduce":
        want = np.sum(data, axis=0)
        bad = [r for r in range(n) if (r == root and not np.array_equal(bufs[r]["out"], want))
               or (r != root and not np.array_equal(bufs[r]["in"], data[r]))]
    elif op == "broadcast":
        bad = [r for r in range(n) if not np.array_equal(bufs[r]["out"], data[root])]
    elif op == "all_gather":
        want = np.concatenate(data)
        bad = [r for r in range(n) if not np.array_equal(bufs[r]["out"], want)]
    else:
        want = np.sum(data, axis=0)
        bad = [r for r in range(n) if not np.array_equal(bufs[r]["out"], want[r * count:(r + 1) * count])
               or not np.array_equal(bufs[r]["in"], data[r])]
    if bad:
        raise AssertionError(f"{op}: wrong result on {len(bad)} ranks, e.g. rank {bad[0]}")


def cost_table(op, topo, costs, highlight=None, out=print):
    from .tuner import table
    sizes = [1 << k for k in range(3, 31)]
    rows = table(op, topo, costs, sizes)
    algos = [a for a in ("ring", "tree", "hierarchical", "halving_doubling", "composed") if any(a in r[1] for r in rows)]
    out(f"predicted {op} time on {topo.describe()} (cost model; * = --algo, tuner's pick on the right)")
    head = f"{'size':>10} " + " ".join(f"{('*' if a == highlight else '') + a:>17}" for a in algos) + "   tuner"
    out(head)
    for nb, per, choice in rows:
        cells = " ".join(f"{_fmt_time(per[a]) if a in per else '-':>17}" for a in algos)
        extra = f" ({choice.inter})" if choice.inter else ""
        out(f"{_fmt_size(nb):>10} {cells}   {choice.algo}{extra}, chunk {_fmt_size(choice.chunk_bytes)}")


def engine_table(op, nbytes, topo, costs, chunk_bytes=None, root=0, out=print):
    """Every engine's price for a call on host memory, and the one a communicator picks
    (ccl/engines/choice.py; PYCCL_ENGINE and PYCCL_ALGO apply as in a run)."""
    from . import settings
    from .call import Call
    from .dtypes import SUM
    from .engines.choice import pricing
    engines = pricing(topo, costs, chunk_bytes, settings.get("PYCCL_ALGO") or "")
    engines.forced = (settings.get("PYCCL_ENGINE") or "").strip().lower()
    reducing = op in ("all_reduce", "reduce", "reduce_scatter")
    call = Call(op, kind="cpu", dtype="float32", count=max(1, nbytes // 4), nbytes=nbytes,
                redop=SUM if reducing else None, root=root if op in ("reduce", "broadcast") else -1)
    chosen = engines.decide(call)
    prices = ", ".join(f"{e.name} {'cannot' if t is None else _fmt_time(t)}" for e, t in engines.prices(call))
    out(f"engine for {op} of {_fmt_size(nbytes)} on {topo.describe()}: {chosen.name} ({prices})")
    return chosen.name


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m pyccl.plan", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hosts", type=int, default=1)
    ap.add_argument("--ranks-per-host", type=int, default=8)
    ap.add_argument("--intra", default="shm", help="transport inside a host (cost model): shm, cuda_ipc")
    ap.add_argument("--inter", default="tcp", help="transport between hosts (cost model): tcp, ibverbs")
    ap.add_argument("--op", default="all_reduce", choices=sorted(k for k, v in APPLIES.items() if v != ("direct",)))
    ap.add_argument("--algo", default=None, help="ring, tree/double_tree, hierarchical, halving_doubling, composed "
                                                  "(default: the tuner's pick for --bytes)")
    ap.add_argument("--inter-algo", default=None, help="hierarchical all_reduce between hosts: tree, ring, halving_doubling")
    ap.add_argument("--root", type=int, default=0)
    ap.add_argument("--count", type=int, default=37, help="elements per rank for --verify (default 37, a prime)")
    ap.add_argument("--chunk-bytes", type=int, default=None)
    ap.add_argument("--bytes", type=int, default=1 << 20, help="message size the tuner picks for when --algo is not given")
    ap.add_argument("--verify", action="store_true")
    ap.add_argument("--cost", action="store_true")
    ap.add_argument("--draw", metavar="PNG")
    ap.add_argument("--describe", type=int, metavar="RANK", help="print one rank's plan")
    a = ap.parse_args(argv)

    from .topology import cost
    topo = Topology.uniform(a.hosts, a.ranks_per_host, a.intra, a.inter)
    costs = cost.transport_costs()
    if a.algo is None:
        from .tuner import choose
        ch = choose(a.op, a.bytes, topo, costs, chunk_bytes=a.chunk_bytes)
        algo, inter = ch.algo, a.inter_algo or ch.inter
        engine_table(a.op, a.bytes, topo, costs, a.chunk_bytes, a.root)
        print(f"tuner picks {algo}{f' ({inter})' if inter else ''} for {a.op} of {_fmt_size(a.bytes)} on {topo.describe()}")
    else:
        algo, inter = canonical_algo(a.algo), a.inter_algo
    if not applicable(a.op, algo, topo):
        print(f"{algo} does not build {a.op} on {topo.describe()}", file=sys.stderr)
        return 2
    if algo == "composed":
        from .topology.composed import describe
        print(describe(a.op, a.bytes, topo, costs, a.chunk_bytes))
    if algo == "hierarchical" and a.op == "all_reduce" and inter is None:
        inter = cost.best_inter(a.bytes / topo.ranks_per_host, topo, costs, a.chunk_bytes or cost.DEFAULT_CHUNK_BYTES)
    chunk_elems = (a.chunk_bytes // 8) if a.chunk_bytes else None
    if a.describe is not None and algo != "composed":
        from .topology.graph import build_plan
        print(build_plan(a.op, algo, a.describe, topo, a.count, a.root, chunk_elems, inter).describe())
    if a.verify:
        verify(a.op, algo, topo, a.count, a.root, chunk_elems, inter)
    if a.cost:
        cost_table(a.op, topo, costs, highlight=algo)
    if a.draw and algo == "composed":
        print("--draw: composed has no single plan to draw; draw the rail's plan with --hosts H "
              "--ranks-per-host 1", file=sys.stderr)
    elif a.draw:
        from .topology.draw import draw_plan
        path = draw_plan(a.op, algo, topo, a.draw, costs=costs, inter=inter, root=a.root)
        print(f"wrote {path}")
    if not (a.verify or a.cost or a.draw or a.describe is not None or algo == "composed"):
        ap.print_usage()
    return 0


if __name__ == "__main__":
    sys.exit(main())
