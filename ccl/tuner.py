"""Pick the algorithm, chunk size and channels of one collective from the cost model.

    choice = choose("all_reduce", nbytes, topology, transport_costs)
    plan = build_plan("all_reduce", choice.algo, rank, topology, count,
                      chunk_elems=choice.chunk_bytes // itemsize, inter=choice.inter)

Every candidate (algorithm x chunk size, and for hierarchical all_reduce its inter-host
algorithm; across hosts also "composed": the node-local engine around a network plan per
rail, topology/composed.py, run by ccl/engines/composed.py) is costed with pyccl.topology.cost.predict; the cheapest wins, ties going to
the earlier of ALGOS and the smaller chunk. The choice is a pure function of its
arguments (no clocks, no randomness, no platform-dependent maths), so ranks that pass
the same topology, costs and environment choose alike, which they must: every rank has to
run the same plan. Transport costs measured at set-up must therefore be measured once
(e.g. by rank 0) and shared, not measured per rank.

PYCCL_ALGO (declared in pyccl.settings) forces an algorithm or, as a comma list such as
"tree,ring", restricts the candidates (aliases double_tree, hd, ... accepted). An algorithm
that cannot build the op (halving_doubling for broadcast, hierarchical or composed on one
host, composed on hosts with unequal rank counts) is skipped with a warning. On one host the
shm engine runs the collectives whole and PYCCL_ALGO does not apply.
The choice is logged at INFO on logging.getLogger("pyccl") (PYCCL_DEBUG=INFO), once per
distinct (op, size, topology).
"""
import functools
import logging
import os
from typing import NamedTuple, Optional

from pyccl import settings
from pyccl.topology import cost
from pyccl.topology.graph import APPLIES, INTER_ALGOS, Topology, applicable, canonical_algo

log = logging.getLogger("pyccl")

#: tie-break order
ALGOS = ("ring", "tree", "hierarchical", "halving_doubling", "composed")
#: composed (node-local C engine calls around rail plans) is taken when within this factor of
#: the cheapest flat plan: the model prices its local phases like the executor's shm messages,
#: but they are single C calls; measured on 2 and 3 namespace hosts x 2 ranks, composed ran
#: 0-12% (2 hosts) and up to 30% (3 hosts) faster than hierarchical at 1-64 MiB where the
#: model saw a tie (bench/JOURNAL.md, 2026-12-05 "Across hosts, CPU").
COMPOSED_MARGIN = 1.10
#: chunk sizes the tuner tries (bytes)
CHUNK_CANDIDATES = (64 << 10, 256 << 10, 1 << 20, 4 << 20)


class Choice(NamedTuple):
    algo: str                 # ring | tree | hierarchical | halving_doubling | direct | composed
    chunk_bytes: int          # the executor's chunk; also the builders' segment size
    channels: int             # independent pipelines the plan runs side by side (informational:
    #                           2 trees, or one per local slice for hierarchical; 1 otherwise)
    inter: Optional[str] = None   # hierarchical all_reduce: inter-host algorithm
    predicted: float = 0.0        # seconds, from the cost model


def _channels(op, algo, topo):
    if algo == "tree" and op == "all_reduce":
        return 2
    if algo in ("hierarchical", "composed") and op in ("all_reduce", "all_gather", "reduce_scatter"):
        return topo.ranks_per_host
    return 1


def algo_names(value: str) -> list:
    """The algorithms a PYCCL_ALGO value names, canonical, in order (unknown ones warned about
    once and ignored)."""
    names = []
    for part in (value or "").split(","):
        if part.strip():
            try:
                names.append(canonical_algo(part))
            except ValueError as e:
                _warn_once(f"PYCCL_ALGO={value!r}: {e}; ignored")
    return names


def _forced(value: str, op: str, topo: Topology):
    """Candidates allowed by PYCCL_ALGO (None: all)."""
    if not value:
        return None
    names = algo_names(value)
    ok = [a for a in names if applicable(op, a, topo)]
    if names and not ok:
        _warn_once(f"PYCCL_ALGO={value!r} cannot build {op} on {topo.describe()}; "
                   f"using the cost model's choice among {', '.join(a for a in APPLIES.get(op, ()) if applicable(op, a, topo))}")
        return None
    return tuple(ok) if ok else None


@functools.lru_cache(maxsize=None)
def _warn_once(msg):
    log.warning("tuner: %s", msg)


def candidates(op: str, nbytes: int, topo: Topology, costs: dict, chunk_bytes=None, allowed=None) -> list:
    """Every (predicted seconds, algo, chunk_bytes, inter) considered, in tie-break order."""
    chunks = (int(chunk_bytes),) if chunk_bytes else CHUNK_CANDIDATES
    out = []
    for algo in ALGOS:
        if allowed is not None and algo not in allowed:
            continue
        if not applicable(op, algo, topo):
            continue
        inters = INTER_ALGOS if (algo == "hierarchical" and op == "all_reduce") else (None,)
        for inter in inters:
            for ch in chunks:
                out.append((cost.predict(op, algo, nbytes, topo, costs, ch, inter), algo, ch, inter))
    return out


def choose(op: str, nbytes: int, topology: Topology, transport_costs: Optional[dict] = None, *,
           chunk_bytes: Optional[int] = None, env=None, flat: bool = False) -> Choice:
    """The cheapest algorithm for `op` on `nbytes` (see cost.py for how sizes are counted).

    flat: only algorithms that are one plan for the executor (not "composed"; the staged CUDA
    path of ccl/engines/staged.py runs plans only).
    chunk_bytes: fix the chunk (e.g. the user set PYCCL_CHUNK_BYTES) instead of tuning it.
    transport_costs: {transport: LinkCost}; default cost.transport_costs() (defaults + env)."""
    env = os.environ if env is None else env
    costs = transport_costs if transport_costs is not None else cost.transport_costs(env)
    forced = settings.get("PYCCL_ALGO", env) or ""
    return _choose(op, int(nbytes), topology, tuple(sorted(costs.items())),
                   int(chunk_bytes) if chunk_bytes else None, forced.strip().lower(), flat)


@functools.lru_cache(maxsize=4096)
def _choose(op, nbytes, topo, costs_items, chunk_bytes, forced, flat=False) -> Choice:
    costs = dict(costs_items)
    default_chunk = chunk_bytes or cost.DEFAULT_CHUNK_BYTES
    if op not in APPLIES or APPLIES[op] == ("direct",):
        return Choice("direct", default_chunk, 1)
    if topo.nranks == 1 or nbytes == 0:
        return Choice("ring", default_chunk, 1)
    allowed = _forced(forced, op, topo)
    if flat and allowed is not None:
        allowed = tuple(a for a in allowed if a != "composed") or None
    cands = [c for c in candidates(op, nbytes, topo, costs, chunk_bytes, allowed)
             if not (flat and c[1] == "composed")]
    best = min(c[0] for c in cands)
    composed = [c for c in cands if c[1] == "composed"]
    if composed and min(c[0] for c in composed) <= best * COMPOSED_MARGIN:
        best = min(c[0] for c in composed)
        cands = composed
    t, algo, ch, inter = next(c for c in cands if c[0] <= best * (1 + 1e-9))
    choice = Choice(algo, ch, _channels(op, algo, topo), inter, t)
    if log.isEnabledFor(logging.INFO):
        others = {}
        for c in cands:
            if c[1] != algo and (c[1] not in others or c[0] < others[c[1]]):
                others[c[1]] = c[0]
        log.info("tuner: %s of %d B on %s -> %s%s, chunk %d B, %d channel(s), predicted %.1f us%s%s",
                 op, nbytes, topo.describe(), algo, f" (inter-host {inter})" if inter else "", ch,
                 choice.channels, t * 1e6,
                 "; others: " + ", ".join(f"{a} {v * 1e6:.1f} us" for a, v in others.items()) if others else "",
                 f" [PYCCL_ALGO={forced}]" if allowed else "")
    return choice


def table(op: str, topo: Topology, costs: Optional[dict] = None, sizes=None) -> list:
    """[(nbytes, {algo: predicted seconds at its best chunk}, Choice)] for the CLI."""
    costs = costs if costs is not None else cost.transport_costs()
    sizes = sizes or [8 << (2 * i) for i in range(14)]
    rows = []
    for nb in sizes:
        per = {}
        for t, algo, ch, inter in candidates(op, nb, topo, costs):
            if algo not in per or t < per[algo]:
                per[algo] = t
        rows.append((nb, per, choose(op, nb, topo, costs, env={})))
    return rows
