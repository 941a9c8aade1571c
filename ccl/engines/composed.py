"""Collectives across hosts, composed of the node-local engine and the network.

Every multi-host collective here reads as three phases (docs/ARCHITECTURE.md, "A collective
across several hosts"):

  1. node-local phase on my host's engine: the shared-memory C collectives
     (ccl/engines/shm.py) among the ranks of my host;
  2. network phase on my *rail*, the ranks with my local index, one per host: a plan from
     topology/ (ring, double binary tree, halving-doubling, picked by the tuner for the
     rail) run by the communicator's executor over TCP or ibverbs. All L rails run at once,
     each on 1/L of the data, so every rank's links are busy;
  3. node-local phase again.

  all_reduce      local reduce_scatter -> rail all_reduce of my shard -> local all_gather
                  (in place; a count not divisible by L leaves a tail of < L elements that
                  rides on the last rail: local reduce to local rank L-1 -> its rail ->
                  local broadcast)
  reduce_scatter  local reduce_scatter -> rail reduce_scatter (the input is first copied
                  into rail-major order, so local rank j reduces exactly what rail j needs)
  all_gather      rail all_gather of my block -> local all_gather (into rail-major order,
                  then copied out: the shm engine gathers contiguous pieces only)
  broadcast       rail broadcast among the root's rail ("leaders") -> local broadcast
  reduce          local reduce to the leader -> rail reduce among the leaders to the root
  barrier         local barrier -> rail barrier (every rail at once)
In each, the bytes that cross the network are the minimum: (H-1)/H of the data per host
for all_reduce (ring), the local phase first where it shrinks the data (reduce_scatter,
reduce) and last where it grows it (all_gather, broadcast).

gather, scatter and all_to_all(v) are not composed: the flat engine (ccl/engines/flat.py) runs
them as direct plans over the executor (every rank to every peer, shm inside a host, the network
between hosts), which already sends each byte once.

The membership of both groups comes from the topology every rank built from the bootstrap
(Communicator.peer_info): no extra collective, no new communicator, no new connection. The
node-local engine is created on the first composed call (every rank of the host makes that
call in the same order); it needs only the store. Its price (the model's composed time over
COMPOSED_MARGIN) competes with the flat engine's in the engine choice (ccl/engines/choice.py);
PYCCL_ALGO=composed forces it.

Hosts with unequal rank counts are not composed (topology.composed.applicable): the tuner
then picks among the flat and hierarchical plans, which handle them.

Errors: a phase that fails raises the engine's error with the phase named (op, rank, the
peer in the communicator's numbering, phase); the communicator breaks itself and aborts this
object too, so the ranks of my host waiting in a local phase stop at once.
"""
import numpy as np

from pyccl.topology.graph import Topology, applicable

from ..dtypes import AVG
from ..reduce import divide_into
from ..tuner import COMPOSED_MARGIN, algo_names, candidates
from .base import EngineBase
from .plan_engine import PlanEngine

OPS = ("all_reduce", "reduce_scatter", "all_gather", "broadcast", "reduce", "barrier")


def _average(arr, op, size):
    if op is AVG:
        divide_into(arr, size)


def with_host_ranks(e, host_index, host_ranks):
    """`e` again, its message followed by which communicator rank each local rank is (the
    node-local engines number the ranks of a host 0..L-1)."""
    return type(e)(f"{e} [local rank i of host {host_index} is rank {host_ranks}[i]]")


class Hierarchy(EngineBase):
    """The composed collectives of one multi-host communicator (every host: L ranks), made
    on the first call the registry gives it (ccl/engines/choice.py)."""
    name = "composed"
    ops = frozenset(OPS)

    def __init__(self, res, algo_env: str = ""):
        self.res = res
        self.algos = set(algo_names(algo_env))
        self._ready = False
        self._local = None

    def _setup(self):
        res = self.res
        topo = res.topology
        self.members = topo.members()                 # members[h][j]: rank j of host h
        self.H, self.L = len(self.members), len(self.members[0])
        self.h = topo.hosts[res.rank]
        self.j = self.members[self.h].index(res.rank)
        self.host = self.members[self.h]
        self.rail_ranks = [m[self.j] for m in self.members]
        rail_topo = Topology.uniform(self.H, 1, topo.inter, topo.inter)
        shared = dict(res.costs)
        if topo.inter in shared:
            shared[topo.inter] = shared[topo.inter].scaled(self.L)   # L rails share a host's NIC
        self.rail = PlanEngine(res, self.rail_ranks, rail_topo, shared)
        self._scratch = np.empty(0, np.uint8)
        self._ready = True

    # ---- the engine: price and calls -----------------------------------------------------
    def price(self, call):
        """The model's time of the composition, divided by the tuner's COMPOSED_MARGIN (its
        local phases are single C calls where the model prices executor messages: measured
        0-30 % faster than it predicts). None on one host, on unequal hosts, or where
        PYCCL_ALGO names other algorithms only."""
        topo, op = self.res.topology, call.op
        if topo.nhosts < 2 or not applicable(op, "composed", topo) or (self.algos and "composed" not in self.algos):
            return None
        if op == "barrier":
            return 0.0                       # no bytes; one rail barrier between local ones
        if not call.nbytes:
            return None                      # nothing to compose: the flat plan's no-op
        best = min(t for t, *_ in candidates(op, call.nbytes, topo, self.res.costs, self.res.fixed_chunk,
                                             ("composed",)))
        return best / COMPOSED_MARGIN

    def ready(self):
        """Set up on first use (also by the CUDA composition, which shares the rails)."""
        if not self._ready:
            self._setup()
        return self

    def run(self, call, what):
        return getattr(self.ready(), "run_" + call.op)(call, what)

    def run_all_reduce(self, call, what):
        self.all_reduce(call.out.array, call.redop, what)
        _average(call.out.array, call.redop, self.res.size)

    def run_reduce(self, call, what):
        self.reduce(call.out.array, call.root, call.redop, what)
        if self.res.rank == call.root:
            _average(call.out.array, call.redop, self.res.size)

    def run_reduce_scatter(self, call, what):
        self.reduce_scatter(call.out.array, call.inp.array, call.redop, what)
        _average(call.out.array, call.redop, self.res.size)

    def run_all_gather(self, call, what):
        self.all_gather(call.out.array, call.inp.array, what)

    def run_broadcast(self, call, what):
        self.broadcast(call.out.array, call.root, what)

    def run_barrier(self, call, what):
        self.barrier(what)

    # ---- the node-local engine ---------------------------------------------------------------
    @property
    def local(self):
        """My host's engine, made on first use: the shm C collectives, or (off, or a forced
        non-shm transport) the same collectives as plans over the host's connections."""
        if self._local is None:
            c = self.res
            eng = None
            if c.transport_name in ("auto", "shm"):
                try:
                    from .shm import ShmCollectives
                except ImportError:
                    ShmCollectives = None
                if ShmCollectives is not None:
                    tag = f"{c.tag}.host{self.h}"
                    eng = ShmCollectives(self.j, self.L, c.prefixed(f"host{self.h}"), tag, c.timeout,
                                         ranks=self.host, host=c.host_of(c.rank))
                    if not eng.enabled:
                        eng.close()
                        eng = None
            if eng is None:
                eng = PlanEngine(c, self.host, Topology.single_host(self.L, c.topology.intra), c.costs)
            self._local = eng
        return self._local

    def _phase(self, what, n, name, fn, *args):
        """Run one phase, named in its errors (which name the communicator's ranks: the shm
        engine is told them, the plan engine relabels its plans)."""
        return fn(*args, f"{what}, phase {n} ({name})")

    def _tmp(self, n, dtype):
        """Scratch of n elements, reused across calls (grown as needed)."""
        need = n * np.dtype(dtype).itemsize
        if self._scratch.nbytes < need:
            self._scratch = np.empty(need, np.uint8)
        return self._scratch[:need].view(dtype)

    # ---- the collectives (same signatures as ShmCollectives) ------------------------------
    def all_reduce(self, x, op, what):
        L, j = self.L, self.j
        q = x.size // L
        m = q * L
        mine = x[j * q:(j + 1) * q]
        tail = x[m:]
        if q:
            self._phase(what, 1, "local reduce_scatter", self.local.reduce_scatter, mine, x[:m], op)
        if tail.size:
            self._phase(what, 1, "local reduce of the tail", self._local_reduce, tail, L - 1, op)
        if j == L - 1:
            mine = x[j * q:]                      # shard + tail, contiguous
        self._phase(what, 2, "rail all_reduce", self.rail.all_reduce, mine, op)
        if q:
            self._phase(what, 3, "local all_gather", self.local.all_gather, x[:m], x[j * q:(j + 1) * q])
        if tail.size:
            self._phase(what, 3, "local broadcast of the tail", self.local.broadcast, tail, L - 1)

    def _local_reduce(self, arr, root, op, what):
        if isinstance(self.local, PlanEngine):
            self.local.reduce(arr, arr, root, op, what)
        else:
            self.local.reduce(arr, root, op, what)

    def reduce_scatter(self, out, inp, op, what):
        H, L, c = self.H, self.L, out.size
        if c == 0:
            return
        stage = self._tmp(H * L * c, out.dtype)
        np.take(inp.reshape(-1, c), self._rail_major(), axis=0, out=stage.reshape(-1, c))
        shard = stage[self.j * H * c:(self.j + 1) * H * c]     # host sum of rail j's H blocks
        self._phase(what, 1, "local reduce_scatter", self.local.reduce_scatter, shard, stage, op)
        self._phase(what, 2, "rail reduce_scatter", self.rail.reduce_scatter, out, shard, op)

    def all_gather(self, out, inp, what):
        H, c = self.H, inp.size
        if c == 0:
            return
        stage = self._tmp(H * self.L * c, out.dtype)
        piece = stage[self.j * H * c:(self.j + 1) * H * c]     # rail j's H blocks, by host
        self._phase(what, 1, "rail all_gather", self.rail.all_gather, piece, inp)
        self._phase(what, 2, "local all_gather", self.local.all_gather, stage, piece)
        out.reshape(-1, c)[self._rail_major()] = stage.reshape(-1, c)

    def _rail_major(self):
        """Ranks in rail-major order ([j][h] -> rank): the staging layout of
        reduce_scatter's input and all_gather's output."""
        return np.array(self.members).T.reshape(-1)

    def broadcast(self, x, root, what):
        rh = self.res.topology.hosts[root]
        lead = self.members[rh].index(root)                   # the root's local index
        if self.j == lead:
            self._phase(what, 1, "rail broadcast among leaders", self.rail.broadcast, x, rh)
        self._phase(what, 2, "local broadcast", self.local.broadcast, x, lead)

    def reduce(self, x, root, op, what):
        rh = self.res.topology.hosts[root]
        lead = self.members[rh].index(root)
        acc = x
        if self.j == lead and self.res.rank != root:         # a leader's input stays unchanged
            acc = self._tmp(x.size, x.dtype)
            acc[...] = x
        self._phase(what, 1, "local reduce to the leader", self._local_reduce,
                    acc if self.j == lead else x, lead, op)
        if self.j == lead:
            self._phase(what, 2, "rail reduce among leaders", self.rail.reduce, acc, acc, rh, op)

    def barrier(self, what):
        self._phase(what, 1, "local barrier", self.local.barrier)
        self._phase(what, 2, "rail barrier", self.rail.barrier)

    # ---- teardown -------------------------------------------------------------------------
    def abort(self):
        if self._local is not None and hasattr(self._local, "abort"):
            self._local.abort()

    def close(self):
        if self._local is not None and hasattr(self._local, "close"):
            self._local.close()
        self._local = None

