"""The order in which a plan runs, written once: "for chunk c: for stage: for op".

Every region is cut into nchunks(length, chunk_elems) chunks (an atomic plan's regions each
stay one chunk: its later stages read unions of what earlier ones wrote). Pass c runs, stage
by stage, chunk c of every op that has more than c chunks; ops with fewer are skipped, and
both ends of a message cut it alike, so the k-th send still meets the k-th receive
(topology/plan.py). The executor moves bytes in this order, the staging schedule reads it
to learn what each pass reads first and writes last, the simulator and the cost model
replay it. Each keeps its own work; only the order lives here.
"""
from typing import Iterator, NamedTuple, Optional

from .plan import Op, Region, chunk_of, max_region, nchunks

#: Pass lists up to this many steps (~400 bytes a step) are kept on the plan: plans are cached
#: per shape and the executor walks them on every call, 10-20% of its per-call time saved.
#: Longer walks (large buffers in small chunks) are generated each time, ~5% slower per step.
CACHE_STEPS = 1 << 14

_new = tuple.__new__            # a NamedTuple without its keyword-parsing __new__ (5x faster)


class Step(NamedTuple):
    """One op on one chunk."""
    index: int                  # the op's index in its stage
    op: Op                      # the plan's op, whole regions
    chunks: int                 # how many chunks the op's region is cut into
    src: Optional[Region]       # this chunk of op.src
    dst: Optional[Region]       # this chunk of op.dst


class Pass(NamedTuple):
    """Chunk c of every op that has one: the stages that have a step in it, in order."""
    chunk: int
    stages: tuple               # ((stage index, (Step, ...)), ...)


class Layout(NamedTuple):
    chunk_elems: int            # after the atomic rule
    counts: list                # chunks per op: counts[stage][op]
    total: int                  # passes
    peers: list                 # every peer of the plan, sorted
    steps: int                  # ops on chunks, all passes together


def effective_chunk(plan, chunk_elems: int) -> int:
    """The chunk size a plan runs with: at least 1; an atomic plan's longest region at least."""
    chunk_elems = max(1, chunk_elems)
    if getattr(plan, "atomic", False):
        chunk_elems = max(chunk_elems, max_region(plan))
    return chunk_elems


def _counts(plan, chunk_elems: int):
    counts = [[nchunks((o.dst or o.src).length, chunk_elems) for o in st] for st in plan.stages]
    return counts, max((c for st in counts for c in st), default=0)


def iter_passes(plan, counts, total) -> Iterator[Pass]:
    """The walk itself, for a chunk layout (`counts`, `total`) of `plan`."""
    stages = plan.stages
    for c in range(total):
        out = []
        for si, st in enumerate(stages):
            steps = []
            for oi, n in enumerate(counts[si]):
                if c < n:
                    o = st[oi]
                    src, dst = o.src, o.dst
                    steps.append(_new(Step, (oi, o, n, src and chunk_of(src, c, n), dst and chunk_of(dst, c, n))))
            if steps:
                out.append((si, tuple(steps)))
        yield _new(Pass, (c, tuple(out)))


def _cache(plan) -> dict:
    cache = plan.__dict__.get("_walk")
    if cache is None:
        cache = plan.__dict__["_walk"] = {}
    return cache


def layout(plan, chunk_elems: int) -> Layout:
    """Chunks per op, passes and peers of `plan` cut at `chunk_elems`; cached on the plan."""
    cache = _cache(plan)
    hit = cache.get(chunk_elems)
    if hit is None:
        eff = effective_chunk(plan, chunk_elems)
        counts, total = _counts(plan, eff)
        hit = cache[chunk_elems] = Layout(eff, counts, total, sorted(plan.peers()), sum(map(sum, counts)))
    return hit


def passes(plan, chunk_elems: int):
    """The passes of `plan` cut at `chunk_elems`, in the order they run: a list cached on the
    plan (the executor's hot loop then only iterates), or, past CACHE_STEPS, a generator."""
    cache = _cache(plan)
    hit = cache.get(("passes", chunk_elems))
    if hit is not None:
        return hit
    lay = layout(plan, chunk_elems)
    if lay.steps > CACHE_STEPS:
        return iter_passes(plan, lay.counts, lay.total)
    hit = cache[("passes", chunk_elems)] = list(iter_passes(plan, lay.counts, lay.total))
    return hit


def chunked_stages(plan, chunk_elems: int) -> list:
    """The walk flattened: one stage per (pass, stage) that has steps, each op on its chunk.
    What the simulator and the cost model replay (not cached: they run thousands of plans once)."""
    counts, total = _counts(plan, effective_chunk(plan, chunk_elems))
    return [[_new(Op, (s.op[0], s.op[1], s.op[2], s.src, s.dst)) for s in steps]    # op._replace(src, dst)
            for p in iter_passes(plan, counts, total) for _si, steps in p.stages]
