"""The flat engine: any call on host memory as one plan for all ranks, walked by the executor.

The tuner (ccl/tuner.py) picks the algorithm and chunk of the reducing and broadcasting
collectives from the cost model (PYCCL_ALGO forces one); all_to_all, gather, scatter,
send/recv and barrier take the direct plans of pyccl.topology.direct. Plans are built once
per shape and cached. Every message carries the call's 64-bit signature (ccl/callsig.py), so
a peer that runs another call says which field differs. It runs anywhere (one host or many,
any transport), so it is the last engine of the registry: the others are chosen when cheaper.

Its price is the tuner's predicted time for the plan it would run; the direct plans are
priced at 0 (they are the only plans for their ops, and any engine that runs one of those
ops whole - shm all_to_all, composed barrier - is listed before this one and wins the tie).
"""
import numpy as np

from pyccl.topology import direct, ring as ring_plans
from pyccl.topology.graph import applicable, build_plan

from .. import callsig
from ..dtypes import AVG
from ..errors import InvalidArgument
from ..reduce import divide_into
from ..tuner import algo_names, choose
from .base import EngineBase

TUNED = frozenset({"all_reduce", "reduce", "broadcast", "all_gather", "reduce_scatter"})
ALL_OPS = TUNED | {"all_to_all", "gather", "scatter", "send", "recv", "barrier"}


def wire(call) -> int:
    """The call's signature on every message (0: not checked, send/recv)."""
    redop = call.redop.name if call.redop is not None else None
    return callsig.pack(call.op, call.dtype, call.count, call.root, redop)


class FlatEngine(EngineBase):
    name = "flat"
    ops = ALL_OPS

    def __init__(self, res, algo_env: str = ""):
        self.res = res
        self.algos = set(algo_names(algo_env))
        self._plans = {}

    # ---- price -------------------------------------------------------------------------
    def price(self, call):
        if call.op not in TUNED:
            return 0.0
        topo = self.res.topology
        if self.algos == {"composed"} and applicable(call.op, "composed", topo) and call.nbytes:
            return None                     # PYCCL_ALGO=composed: the composed engine only
        return choose(call.op, call.nbytes, topo, self.res.costs, chunk_bytes=self.res.fixed_chunk,
                      flat=True).predicted

    # ---- plans -------------------------------------------------------------------------
    def tuned(self, op, count, itemsize, nbytes, root=0):
        """(plan, chunk_bytes), cached per shape."""
        key = (op, count, itemsize, root)
        hit = self._plans.get(key)
        if hit is None:
            res = self.res
            c = choose(op, nbytes, res.topology, res.costs, chunk_bytes=res.fixed_chunk, flat=True)
            plan = build_plan(op, c.algo, res.rank, res.topology, count, root,
                              chunk_elems=max(1, c.chunk_bytes // itemsize), inter=c.inter)
            hit = self._plans[key] = (plan, c.chunk_bytes)
        return hit

    def plan(self, key, build):
        plan = self._plans.get(key)
        if plan is None:
            plan = self._plans[key] = (build(), None)
        return plan

    def forget(self):
        self._plans.clear()

    def walk(self, what, planned, bufs, op=None, call=0):
        plan, chunk = planned
        self.res.executor.run(plan, bufs, op, what, chunk, call)

    def _average(self, arr, op):
        if op is AVG:
            divide_into(arr, self.res.size)

    # ---- the calls ---------------------------------------------------------------------
    def run_all_reduce(self, call, what):
        a = call.out.array
        self.walk(what, self.tuned("all_reduce", a.size, a.itemsize, a.nbytes), {"in": a, "out": a}, call.redop,
                  wire(call))
        self._average(a, call.redop)

    def run_reduce(self, call, what):
        a = call.out.array
        self.walk(what, self.tuned("reduce", a.size, a.itemsize, a.nbytes, call.root), {"in": a, "out": a},
                  call.redop, wire(call))
        if self.res.rank == call.root:
            self._average(a, call.redop)

    def run_broadcast(self, call, what):
        a = call.out.array
        self.walk(what, self.tuned("broadcast", a.size, a.itemsize, a.nbytes, call.root), {"out": a},
                  call=wire(call))

    def run_all_gather(self, call, what):
        i, o = call.inp.array, call.out.array
        self.walk(what, self.tuned("all_gather", i.size, i.itemsize, o.nbytes), {"in": i, "out": o},
                  call=wire(call))

    def run_reduce_scatter(self, call, what):
        i, o = call.inp.array, call.out.array
        self.walk(what, self.tuned("reduce_scatter", o.size, o.itemsize, i.nbytes), {"in": i, "out": o},
                  call.redop, wire(call))
        self._average(o, call.redop)

    def run_all_to_all(self, call, what):
        r = self.res
        ins, outs = call.in_splits, call.out_splits
        plan = self.plan(("all_to_all", ins, outs), lambda: direct.all_to_all(r.rank, r.size, ins, outs))
        self.walk(what, plan, {"in": call.inp.array, "out": call.out.array}, call=wire(call))

    def run_gather(self, call, what):
        r, n = self.res, call.count
        plan = self.plan(("gather", n, call.root), lambda: direct.gather(r.rank, r.size, n, call.root))
        bufs = {"in": call.inp.array}
        if call.out is not None:
            bufs["out"] = call.out.array
        self.walk(what, plan, bufs, call=wire(call))

    def run_scatter(self, call, what):
        r, n = self.res, call.count
        plan = self.plan(("scatter", n, call.root), lambda: direct.scatter(r.rank, r.size, n, call.root))
        bufs = {"out": call.out.array}
        if call.inp is not None:
            bufs["in"] = call.inp.array
        self.walk(what, plan, bufs, call=wire(call))

    def run_send(self, call, what):
        r = self.res
        plan = direct.send_recv(r.rank, r.size, call.count, call.peer, True)
        self.walk(what, (plan, None), {"in": call.inp.array})

    def run_recv(self, call, what):
        r = self.res
        plan = direct.send_recv(r.rank, r.size, call.count, call.peer, False)
        self.walk(what, (plan, None), {"out": call.out.array})

    def run_barrier(self, call, what):
        r = self.res
        self.walk(what, self.plan(("barrier",), lambda: direct.barrier(r.rank, r.size)), {}, call=wire(call))

    # ---- PYCCL_CHECK ---------------------------------------------------------------------
    def agree(self, call, what):
        """Compare (op, dtype, count, root, redop) of every rank before moving data: one
        all_gather of five numbers; raises InvalidArgument naming the rank that differs."""
        import zlib

        def code(text):
            return zlib.crc32(str(text).encode())
        sig = call.sig
        mine = np.array([code(call.op), code(sig.get("dtype")), sig.get("count", -1), sig.get("root", -1),
                         code(sig.get("redop"))], dtype=np.int64)
        r = self.res
        plan = self.plan(("check", mine.size), lambda: ring_plans.all_gather(r.rank, list(r.topology.ring_order()),
                                                                              mine.size))
        table = np.empty(mine.size * r.size, np.int64)
        self.walk(what + " [PYCCL_CHECK]", plan, {"in": mine, "out": table})
        rows = table.reshape(r.size, mine.size)
        fields = ("op", "dtype", "count", "root", "redop")
        for q in range(r.size):
            diff = [f for f, a, b in zip(fields, rows[q], mine) if a != b]
            if diff:
                raise InvalidArgument(
                    f"{what}: PYCCL_CHECK found rank {q} calling with a different {', '.join(diff)} "
                    f"(this rank: {call.op} dtype={sig.get('dtype')} count={sig.get('count')} "
                    f"root={sig.get('root')} op={sig.get('redop')}; rank {q}'s count={rows[q][2]}, "
                    f"root={rows[q][3]})")

