"""Collectives among some of a communicator's ranks, run as plans on its executor.

The network phase of a composed multi-host collective (ccl/engines/composed.py) runs on a *rail*:
the ranks with one local index, one per host. A `PlanEngine` is such a group seen as an
engine: the tuner picks the algorithm for the group's own topology, the builders in
topology/ make the plan for positions 0..len(members)-1, and `relabel` renames the
positions to the communicator's ranks, so the communicator's executor and connections run
it. No new communicator, no new connections, no store traffic; errors name the
communicator's ranks. The same class, over the ranks of one host, is the node-local phase
when the shared-memory collectives are off (PYCCL_SHM_COLLECTIVES=0, PYCCL_TRANSPORT=tcp).
"""
import os

from pyccl.topology import direct
from pyccl.topology.graph import build_plan
from pyccl.topology.plan import relabel

from .. import settings
from ..tuner import choose


def _rail_env():
    """The environment for the group's tuner: PYCCL_ALGO without "composed" (which picked
    this composition; a group is one level, where only flat plans apply)."""
    algo = ",".join(a for a in (settings.get("PYCCL_ALGO") or "").split(",") if a.strip().lower() != "composed")
    return dict(os.environ, PYCCL_ALGO=algo)


class PlanEngine:
    """`members`: the communicator's ranks of the group (position = group rank); `topo`:
    the group's Topology (for the tuner and the builders)."""

    def __init__(self, res, members, topo, costs):
        self.res = res
        self.members = list(members)
        self.me = self.members.index(res.rank)
        self.size = len(self.members)
        self.topo = topo
        self.costs = costs
        self._plans = {}

    def _tuned(self, op, count, itemsize, nbytes, root=0):
        key = (op, count, itemsize, root)
        hit = self._plans.get(key)
        if hit is None:
            c = choose(op, nbytes, self.topo, self.costs, chunk_bytes=self.res.fixed_chunk, env=_rail_env())
            plan = build_plan(op, c.algo, self.me, self.topo, count, root,
                              chunk_elems=max(1, c.chunk_bytes // itemsize), inter=c.inter)
            hit = self._plans[key] = (relabel(plan, self.members), c.chunk_bytes)
        return hit

    def _run(self, what, planned, bufs, op=None):
        plan, chunk = planned
        self.res.executor.run(plan, bufs, op, what, chunk)

    # ---- the engine interface (group ranks for roots) ----------------------------------------
    def all_reduce(self, arr, op, what):
        if self.size > 1 and arr.size:
            self._run(what, self._tuned("all_reduce", arr.size, arr.itemsize, arr.nbytes), {"in": arr, "out": arr}, op)

    def reduce_scatter(self, out, inp, op, what):
        if self.size == 1:
            out[...] = inp
        elif out.size:
            self._run(what, self._tuned("reduce_scatter", out.size, out.itemsize, inp.nbytes), {"in": inp, "out": out}, op)

    def all_gather(self, out, inp, what):
        if self.size == 1:
            out[...] = inp
        elif inp.size:
            self._run(what, self._tuned("all_gather", inp.size, inp.itemsize, out.nbytes), {"in": inp, "out": out})

    def broadcast(self, arr, root, what):
        if self.size > 1 and arr.size:
            self._run(what, self._tuned("broadcast", arr.size, arr.itemsize, arr.nbytes, root), {"out": arr})

    def reduce(self, inp, out, root, op, what):
        """Into `out` at group rank `root`; `inp` unchanged everywhere (out may be inp)."""
        if self.size == 1:
            if out is not inp:
                out[...] = inp
        elif inp.size:
            self._run(what, self._tuned("reduce", inp.size, inp.itemsize, inp.nbytes, root), {"in": inp, "out": out}, op)

    def barrier(self, what):
        if self.size > 1:
            key = ("barrier",)
            if key not in self._plans:
                self._plans[key] = (relabel(direct.barrier(self.me, self.size), self.members), None)
            self._run(what, self._plans[key], {})
