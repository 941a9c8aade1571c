"""The staging schedule (ccl/engines/staged_schedule.py) against a brute-force walk, for every plan builder.

The GPU side of staging runs in tests/test_cuda_multihost.py (GPU machines only). What can
be proved without a GPU is the part that decides correctness: for each executor pass, which
element ranges must come from the device first and which are final after it. Here every
element of every buffer is followed one by one through the executor's order of passes,
stages and ops (plain Python, no interval arithmetic), and the schedule must agree exactly:
an element is fetched iff its first access reads it, in the pass of that read; it is copied
back iff it is ever written, once, in the pass of its last write.
"""
import pytest

from pyccl.engines.staged_schedule import _groups, schedule
from pyccl.topology import direct
from pyccl.topology.graph import APPLIES, Topology, applicable, build_plan
from pyccl.topology.plan import COPY, RECV_REDUCE, RECV_REDUCE_SEND, SEND, chunk_of, max_region
from pyccl.topology.walk import layout

pytestmark = pytest.mark.timeout(120)

_READS = (SEND, COPY, RECV_REDUCE, RECV_REDUCE_SEND)


def _brute(plan, counts, total, alias, fetch, flush):
    """(element -> pass of its fetch, element -> pass of its last write) by walking elements."""
    first, last_write = {}, {}
    for c in range(total):
        for si, stage in enumerate(plan.stages):
            wrote = []
            for oi, o in enumerate(stage):
                n = counts[si][oi]
                if c >= n:
                    continue
                if o.kind in _READS:
                    r = chunk_of(o.src, c, n)
                    name = alias.get(r.buf, r.buf)
                    for e in range(r.start, r.stop):
                        first.setdefault((name, e), ("read", c))
                if o.kind != SEND and o.dst is not None:
                    wrote.append(chunk_of(o.dst, c, n))
            for r in wrote:
                name = alias.get(r.buf, r.buf)
                for e in range(r.start, r.stop):
                    first.setdefault((name, e), ("write", c))
                    last_write[(name, e)] = c
    fetched = {k: c for k, (kind, c) in first.items() if kind == "read" and k[0] in fetch}
    written = {k: c for k, c in last_write.items() if k[0] in flush}
    return fetched, written


def _flatten(per_pass):
    out = {}
    for c, ranges in enumerate(per_pass):
        for name, a, b in ranges:
            for e in range(a, b):
                assert (name, e) not in out, f"element {name}[{e}] scheduled twice"
                out[(name, e)] = c
    return out


def _cases():
    topos = {"2x1": ["a", "b"], "2x2": ["a", "a", "b", "b"], "3x2": ["a", "a", "b", "b", "c", "c"],
             "2+1": ["a", "a", "b"]}
    for tname, ids in topos.items():
        topo = Topology.from_host_ids(ids, intra="shm", inter="tcp")
        for op, algos in APPLIES.items():
            for algo in algos:
                if algo in ("direct", "composed") or not applicable(op, algo, topo):  # composed: no one plan
                    continue
                yield f"{tname}-{op}-{algo}", topo, op, algo


@pytest.mark.parametrize("count", [0, 1, 13, 97])
@pytest.mark.parametrize("chunk", [3, 16, 1000])
@pytest.mark.parametrize("name,topo,op,algo", list(_cases()), ids=lambda v: v if isinstance(v, str) else "")
def test_schedule_matches_element_walk(name, topo, op, algo, count, chunk):
    inplace = op in ("all_reduce", "reduce", "broadcast")
    for rank in range(topo.nranks):
        plan = build_plan(op, algo, rank, topo, count, root=topo.nranks - 1, chunk_elems=chunk,
                          inter="ring" if algo == "hierarchical" else None)
        chunk_elems = max(chunk, max_region(plan)) if plan.atomic else chunk
        counts, total = layout(plan, chunk_elems)[1:3]
        alias = {"in": "out"} if inplace else {}
        fetch = ("out",) if inplace else ("in",)
        fetches, flushes = schedule(plan, counts, total, alias, fetch, ("out",))
        want_fetch, want_flush = _brute(plan, counts, total, alias, fetch, ("out",))
        assert _flatten(fetches) == want_fetch, (name, rank)
        assert _flatten(flushes) == want_flush, (name, rank)
        groups = _groups(fetches, 4, 64)
        got = {}
        for first, ranges, nbytes in groups:     # every fetch sits in a group waited for in time
            assert nbytes == 4 * sum(b - a for _, a, b in ranges)
            for nm, a, b in ranges:
                for e in range(a, b):
                    got[(nm, e)] = first
        assert got.keys() == want_fetch.keys()
        assert all(got[k] <= want_fetch[k] for k in got), (name, rank)


@pytest.mark.parametrize("size", [2, 3, 4])
def test_schedule_direct_plans(size):
    for rank in range(size):
        in_splits = [(rank + 1) * (d + 2) for d in range(size)]
        out_splits = [(s + 1) * (rank + 2) for s in range(size)]
        plans = [(direct.all_to_all(rank, size, in_splits, out_splits), ("in",), ("out",)),
                 (direct.gather(rank, size, 11, 0), ("in",), ("out",)),
                 (direct.scatter(rank, size, 11, 1), ("in",), ("out",))]
        for plan, fetch, flush in plans:
            for chunk in (2, 5, 100):
                counts, total = layout(plan, chunk)[1:3]
                fetches, flushes = schedule(plan, counts, total, {}, fetch, flush)
                want_fetch, want_flush = _brute(plan, counts, total, {}, fetch, flush)
                assert _flatten(fetches) == want_fetch
                assert _flatten(flushes) == want_flush
