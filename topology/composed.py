"""The composed multi-host collective as data: its phases and their predicted cost.

A composed collective (run by ccl/engines/composed.py; on CUDA buffers by ccl/engines/cuda_composed.py, whose
local phases run on the CUDA IPC engine: --intra cuda_ipc) is a node-local phase on each host's
engine (the shared-memory C collectives: one call, not a plan), a network phase on the
rails (the ranks with one local index, one per host; a flat plan among H ranks), and a
node-local phase again. `phases` lists them with the bytes they move and the cost model's
time, for the tuner (which compares their sum with the flat plans) and for
`python -m pyccl.plan --algo composed`.

Costs: a local phase is one engine call, alpha + the bytes each rank moves x beta (+ gamma
for what it reduces or copies) of the node-local engine (the `shm_engine` entry of the costs,
measured by pyccl.tune: one C call, not the per-message alpha of the slot rings; other intra
transports are costed as themselves); the rail phase is the best
flat plan for a topology of H hosts x 1 rank, with the inter-host bandwidth divided among
the L rails that leave a host at once (broadcast and reduce use one rail: undivided).
"""
from typing import NamedTuple

from .graph import Topology

#: collectives composed (gather, scatter, all_to_all stay flat direct plans)
OPS = ("all_reduce", "reduce_scatter", "all_gather", "broadcast", "reduce", "barrier")
_RAIL_ALGOS = {"all_reduce": ("ring", "tree", "halving_doubling"), "reduce_scatter": ("ring",),
               "all_gather": ("ring",), "broadcast": ("ring", "tree"), "reduce": ("ring", "tree")}


class Phase(NamedTuple):
    scope: str          # "local" (every host at once) | "rail"
    op: str
    nbytes: int         # the phase's buffer, counted as cost.py counts sizes
    algo: str           # local engine, or the rail's flat algorithm
    seconds: float


def applicable(op: str, topo: Topology) -> bool:
    """Composed needs >1 host, the same number of ranks (>1) on every host."""
    return op in OPS and topo.nhosts > 1 and topo.uniform_hosts and topo.ranks_per_host > 1


def _fmt(n):
    for unit, div in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= div:
            return f"{n / div:g} {unit}"
    return f"{n} B"


def phases(op: str, nbytes: int, topo: Topology, costs: dict, chunk_bytes=None) -> list:
    """The phases of composed `op` of nbytes on topo, each with its predicted seconds."""
    from .cost import SHM_ENGINE, _cost_of, predict
    H, L = topo.nhosts, topo.ranks_per_host
    engine = SHM_ENGINE if topo.intra == "shm" and SHM_ENGINE in costs else topo.intra
    label = "CUDA IPC engine" if topo.intra == "cuda_ipc" else "shm engine"
    ci, ce = _cost_of(costs, engine), _cost_of(costs, topo.inter)
    rail_topo = Topology.uniform(H, 1, topo.inter, topo.inter)
    S = int(nbytes)

    def local(name, b, reduces=False, copies=0.0):
        t = ci.alpha + b * (L - 1) / L * (ci.beta + (ci.gamma if reduces else 0.0)) + copies * b * ci.gamma
        return Phase("local", name, b, label, t)

    def rail(name, b, shared=True):
        c = dict(costs)
        c[topo.inter] = ce.scaled(L) if shared else ce
        best = min(((predict(name, a, b, rail_topo, c, chunk_bytes), a) for a in _RAIL_ALGOS[name]),
                   key=lambda x: x[0])
        return Phase("rail", name, b, best[1], best[0])

    if op == "all_reduce":
        return [local("reduce_scatter", S, True), rail("all_reduce", S // L), local("all_gather", S)]
    if op == "reduce_scatter":
        return [local("reduce_scatter", S, True, copies=1.0), rail("reduce_scatter", S // L)]
    if op == "all_gather":
        return [rail("all_gather", S // L), local("all_gather", S, copies=1.0)]
    if op == "broadcast":
        return [rail("broadcast", S, shared=False), local("broadcast", S)]
    if op == "reduce":
        return [local("reduce", S, True), rail("reduce", S, shared=False)]
    if op == "barrier":
        return [local("barrier", 0), Phase("rail", "barrier", 0, "dissemination",
                                           max(1, (H - 1).bit_length()) * ce.alpha)]
    raise ValueError(f"composed does not build {op}")


def predict(op, nbytes, topo, costs, chunk_bytes=None) -> float:
    return sum(p.seconds for p in phases(op, nbytes, topo, costs, chunk_bytes))


def describe(op, nbytes, topo, costs, chunk_bytes=None) -> str:
    """The composed plan in words, phase by phase (python -m pyccl.plan --algo composed)."""
    H, L = topo.nhosts, topo.ranks_per_host
    lines = [f"composed {op} of {_fmt(nbytes)} on {topo.describe()}"]
    for i, p in enumerate(phases(op, nbytes, topo, costs, chunk_bytes), 1):
        if p.scope == "local":
            where = f"on each of the {H} hosts, {L} ranks, {p.algo}"
        else:
            rails = f"{L} rails" if op not in ("broadcast", "reduce") else "the root's rail"
            where = f"on {rails} of {H} ranks (one per host), {p.algo} plan over {topo.inter}"
        lines.append(f"  {i}. {p.scope} {p.op} of {_fmt(p.nbytes)} {where}: {p.seconds * 1e6:.1f} us predicted")
    return "\n".join(lines)
