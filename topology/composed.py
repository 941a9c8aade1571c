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
The phases and their costs are computed in cost.py (`composed_phases`), applicability in
graph.py (`composed_applicable`): both sit below this module, which imports them.
"""
from .cost import RAIL_ALGOS as _RAIL_ALGOS, Phase, composed_phases as phases  # noqa: F401
from .graph import COMPOSED_OPS as OPS, composed_applicable as applicable  # noqa: F401


def _fmt(n):
    for unit, div in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= div:
            return f"{n / div:g} {unit}"
    return f"{n} B"


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
