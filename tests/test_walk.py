"""The one plan walker (topology/walk.py) and its four users agree.

For plans of every builder (ring, double binary tree, halving-doubling, hierarchical, direct):
  * the walker equals a plain "for chunk: for stage: for op" loop written here (the spec);
  * the executor, run on recording connections, posts exactly the walker's messages in the
    walker's order (pass, stage, chunk, peer, bytes, region) and calls the stager around
    exactly the walker's passes;
  * the staging schedule fetches only what the walk reads and copies back exactly what it writes;
  * per channel (sender, receiver) the executor's sends, its receives, the cost model's
    messages and the simulator (which checks every message's length) carry the same sizes.
"""
import numpy as np
import pytest

from pyccl.dtypes import SUM
from pyccl.engines.executor import Executor
from pyccl.engines.staged_schedule import schedule
from pyccl.topology import cost, direct, walk
from pyccl.topology.graph import Topology, applicable, build_plan
from pyccl.topology.plan import (COPY, RECV, RECV_COPY_SEND, RECV_REDUCE, RECV_REDUCE_SEND, SEND, chunk_of,
                                  max_region, nchunks)
from pyccl.topology.simulate import expand_chunks, simulate

pytestmark = pytest.mark.timeout(300)

ITEM = 4
_FORWARDS = (RECV_REDUCE_SEND, RECV_COPY_SEND)


def _cases():
    """(name, topo, plans of every rank, chunk_elems) for every builder."""
    topos = {"2x1": ["a", "b"], "2x2": ["a", "a", "b", "b"], "3x1": ["a", "b", "c"], "2+1": ["a", "a", "b"]}
    builds = [("all_reduce", "ring", None), ("all_gather", "ring", None), ("reduce_scatter", "ring", None),
              ("broadcast", "ring", None), ("all_reduce", "tree", None), ("reduce", "tree", None),
              ("broadcast", "tree", None), ("all_reduce", "halving_doubling", None),
              ("all_reduce", "hierarchical", "ring"), ("all_reduce", "hierarchical", "tree"),
              ("all_gather", "hierarchical", None), ("reduce_scatter", "hierarchical", None)]
    for tname, ids in topos.items():
        topo = Topology.from_host_ids(ids, intra="shm", inter="tcp")
        for op, algo, inter in builds:
            if not applicable(op, algo, topo):
                continue
            for count in (0, 13, 97):
                for chunk in (3, 1000):
                    plans = [build_plan(op, algo, r, topo, count, root=topo.nranks - 1, chunk_elems=chunk,
                                        inter=inter) for r in range(topo.nranks)]
                    yield f"{tname}-{op}-{algo}-{inter}-{count}-{chunk}", topo, plans, chunk
    for n in (2, 3, 4):
        topo = Topology.from_host_ids([str(r) for r in range(n)], intra="shm", inter="tcp")
        a2a = [direct.all_to_all(r, n, [(r + 1) * (d + 2) for d in range(n)], [(s + 1) * (r + 2) for s in range(n)])
               for r in range(n)]
        for name, plans in (("all_to_all", a2a), ("gather", [direct.gather(r, n, 11, 0) for r in range(n)]),
                            ("scatter", [direct.scatter(r, n, 11, 1) for r in range(n)])):
            for chunk in (2, 100):
                yield f"{n}-direct-{name}-{chunk}", topo, plans, chunk


CASES = list(_cases())
IDS = [c[0] for c in CASES]


def _spec(plan, chunk_elems):
    """The walk as the plan contract states it (topology/plan.py), without the walker."""
    if plan.atomic:
        chunk_elems = max(chunk_elems, max_region(plan))
    chunk_elems = max(1, chunk_elems)
    counts = [[nchunks((o.dst or o.src).length, chunk_elems) for o in st] for st in plan.stages]
    total = max((n for st in counts for n in st), default=0)
    out = []
    for c in range(total):
        for si, st in enumerate(plan.stages):
            for oi, o in enumerate(st):
                n = counts[si][oi]
                if c < n:
                    out.append((c, si, oi, o, n, o.src and chunk_of(o.src, c, n), o.dst and chunk_of(o.dst, c, n)))
    return out


def _flat(passes):
    return [(p.chunk, si, s.index, s.op, s.chunks, s.src, s.dst) for p in passes for si, steps in p.stages
            for s in steps]


@pytest.mark.parametrize("name,topo,plans,chunk", CASES, ids=IDS)
def test_walker_is_the_spec(name, topo, plans, chunk, monkeypatch):
    for p in plans:
        got = walk.passes(p, chunk)
        assert isinstance(got, list) and walk.passes(p, chunk) is got       # cached on the plan
        assert _flat(got) == _spec(p, chunk)
        assert [q.chunk for q in got] == list(range(walk.layout(p, chunk).total))
        assert all(q.stages for q in got)                                     # no empty pass
        assert expand_chunks(p, chunk).stages == [[s.op._replace(src=s.src, dst=s.dst) for s in steps]
                                                  for q in got for _si, steps in q.stages]
    monkeypatch.setattr(walk, "CACHE_STEPS", 0)                           # long walks: generated
    fresh = build_plan("all_reduce", "ring", 0, topo, 50, chunk_elems=chunk)
    gen = walk.passes(fresh, 3)
    assert not isinstance(gen, list) and list(gen) == list(walk.iter_passes(fresh, *walk.layout(fresh, 3)[1:3]))


# ---- the executor on recording connections ---------------------------------------------------
class _Req:
    __slots__ = ("done", "nbytes")

    def __init__(self, nbytes):
        self.done, self.nbytes = True, nbytes


class _Conn:
    """Completes every message at once and records it with what the executor said it was doing."""

    def __init__(self, peer, log, ex):
        self.peer, self.log, self.ex = peer, log, ex

    def _addr(self, mv):
        return np.frombuffer(mv, dtype=np.uint8).__array_interface__["data"][0] if mv.nbytes else None

    def isend(self, mv, call):
        self.log.append(("send", self.peer, mv.nbytes, self._addr(mv), self.ex.where))
        return _Req(mv.nbytes)

    def irecv(self, mv, call):
        self.log.append(("recv", self.peer, mv.nbytes, self._addr(mv), self.ex.where))
        return _Req(mv.nbytes)

    def progress(self):
        return False

    def wait_handles(self):
        return None


class _Stager:
    def __init__(self, log):
        self.log = log

    def start(self, plan, counts, total, alias, chunk_elems):
        self.log.append(("start", total, chunk_elems))

    def before(self, c):
        self.log.append(("before", c))

    def after(self, c):
        self.log.append(("after", c))


def _buffers(plan):
    """Buffers as long as the plan's regions; "in" is "out" for in-place ops."""
    size = {}
    for st in plan.stages:
        for o in st:
            for r in (o.src, o.dst):
                if r is not None and r.buf != "tmp":
                    size[r.buf] = max(size.get(r.buf, 0), r.stop)
    if plan.op in ("all_reduce", "reduce", "broadcast"):
        out = np.zeros(max(size.values(), default=0), dtype=np.float32)
        return {"in": out, "out": out}, {"in": "out"}
    return {b: np.zeros(size.get(b, 0), dtype=np.float32) for b in ("in", "out")}, {}


def _expected(plan, chunk, alias, what):
    """The executor's log, from the walker: stager calls around each pass; per stage the sends and
    receives in op order, then the forwards of the stage's receives (they complete at once)."""
    def canon(r):
        return r._replace(buf=alias.get(r.buf, r.buf))
    lay = walk.layout(plan, chunk)
    out = [("start", lay.total, lay.chunk_elems)]
    for c, stages in walk.passes(plan, chunk):
        out.append(("before", c))
        for si, steps in stages:
            fwd = []
            for s in steps:
                o, where = s.op, f"{what} stage {si} chunk {c}/{s.chunks}: {s.op.kind}"
                if o.kind == SEND:
                    out.append(("send", o.send_peer, canon(s.src), where))
                elif o.kind in (RECV, RECV_COPY_SEND):
                    out.append(("recv", o.recv_peer, canon(s.dst), where))
                elif o.kind in (RECV_REDUCE, RECV_REDUCE_SEND):
                    out.append(("recv", o.recv_peer, s.dst.length, where))      # into scratch
                if o.kind in _FORWARDS:
                    fwd.append(("send", o.send_peer, canon(s.dst), None))
            out.extend(fwd)
        out.append(("after", c))
    return out


def _run_recorded(plan, chunk):
    log = []
    ex = Executor(plan.rank, {}, 5.0, chunk * ITEM, "t")
    ex.conns = {p: _Conn(p, log, ex) for p in plan.peers()}
    bufs, alias = _buffers(plan)
    ex.run(plan, bufs, SUM, "test", stager=_Stager(log))
    arrays = dict(bufs)
    arrays["tmp"] = next((a for k, a in ex._scratch.items() if k[0] == -1), np.zeros(0, np.float32))
    bases = [(k, a.__array_interface__["data"][0], a.nbytes) for k, a in arrays.items() if a.size]
    if alias:
        bases = [b for b in bases if b[0] != "in"]

    def region(addr, nbytes):
        for k, base, size in bases:
            if base <= addr and addr + nbytes <= base + size:
                return k, (addr - base) // ITEM, (addr - base + nbytes) // ITEM
        return None
    return log, region, alias


@pytest.mark.parametrize("name,topo,plans,chunk", CASES, ids=IDS)
def test_executor_runs_the_walk(name, topo, plans, chunk):
    for plan in plans:
        log, region, alias = _run_recorded(plan, chunk)
        want = _expected(plan, chunk, alias, "test")
        assert len(log) == len(want), (plan.rank, log[:5], want[:5])
        for got, exp in zip(log, want):
            if exp[0] in ("start", "before", "after"):
                assert got == exp
                continue
            kind, peer, nbytes, addr, where = got
            assert (kind, peer) == exp[:2] and (exp[3] is None or where == exp[3]), (got, exp)
            if isinstance(exp[2], int):                                   # a receive into scratch
                assert nbytes == exp[2] * ITEM
            else:
                assert nbytes == exp[2].length * ITEM
                if nbytes:
                    assert region(addr, nbytes) == tuple(exp[2]), (got, exp)


def test_executor_runs_a_generated_walk(monkeypatch):
    """Walks longer than CACHE_STEPS are generated, not kept; the executor runs them alike."""
    monkeypatch.setattr(walk, "CACHE_STEPS", 0)
    topo = Topology.from_host_ids(["a", "a", "b"], intra="shm", inter="tcp")
    for algo in ("ring", "tree"):
        plan = build_plan("all_reduce", algo, 1, topo, 97, chunk_elems=5)
        log, _, alias = _run_recorded(plan, 5)
        assert [e[:2] for e in log] == [e[:2] for e in _expected(plan, 5, alias, "test")]
        assert not isinstance(walk.passes(plan, 5), list) and ("passes", 5) not in plan._walk


@pytest.mark.parametrize("name,topo,plans,chunk", CASES, ids=IDS)
def test_channels_agree_executor_cost_simulator(name, topo, plans, chunk):
    """Per channel, message sizes in order: executor sends = executor receives = cost model."""
    sent, got = {}, {}
    for plan in plans:
        log, _, _ = _run_recorded(plan, chunk)
        for e in log:
            if e[0] == "send":
                sent.setdefault((plan.rank, e[1]), []).append(e[2])
            elif e[0] == "recv":
                got.setdefault((e[1], plan.rank), []).append(e[2])
    assert sent == got
    timeline = cost.walk(plans, topo, cost.transport_costs(env={}, measured={}), ITEM, chunk * ITEM)
    costed = {}
    for m in timeline.messages:
        costed.setdefault((m.src, m.dst), []).append(m.nbytes)
    assert costed == sent
    bufs = [_buffers(p)[0] for p in plans]                               # raises on any size mismatch
    simulate([expand_chunks(p, chunk) for p in plans], bufs)


@pytest.mark.parametrize("name,topo,plans,chunk", CASES, ids=IDS)
def test_staging_covers_the_walk(name, topo, plans, chunk):
    """Fetched: read by some step, never before written; flushed: exactly what steps write."""
    for plan in plans:
        for alias, fetch in (({"in": "out"}, ("out",)), ({}, ("in",))):
            lay = walk.layout(plan, chunk)
            fetches, flushes = schedule(plan, lay.counts, lay.total, alias, fetch, ("out",))
            reads, writes, first_write = set(), set(), {}
            for c, stages in walk.passes(plan, chunk):
                for _si, steps in stages:
                    for s in steps:
                        if s.op.kind in (SEND, COPY, RECV_REDUCE, RECV_REDUCE_SEND):
                            reads |= {(alias.get(s.src.buf, s.src.buf), e) for e in range(s.src.start, s.src.stop)}
                        if s.op.kind != SEND and s.dst is not None:
                            for e in range(s.dst.start, s.dst.stop):
                                first_write.setdefault((alias.get(s.dst.buf, s.dst.buf), e), c)
                                writes.add((alias.get(s.dst.buf, s.dst.buf), e))
            fetched = {(n, e) for f in fetches for n, a, b in f for e in range(a, b)}
            flushed = {(n, e) for f in flushes for n, a, b in f for e in range(a, b)}
            assert fetched <= {x for x in reads if x[0] in fetch}
            assert {x for x in reads if x[0] in fetch and x not in writes} <= fetched
            assert flushed == {x for x in writes if x[0] == "out"}
            for c, f in enumerate(fetches):                 # fetched no later than first written
                assert all(first_write.get((n, e), c) >= c for n, a, b in f for e in range(a, b))
