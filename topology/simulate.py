"""Run a whole plan in one process on numpy, to prove it correct without any transport.

Every rank's stages run against FIFO channels (one per ordered pair of ranks) with the
plan's stage contract: sends post at once, a stage ends when its receives are done.
A plan that deadlocks, sends a message of the wrong length, or computes a wrong
result is caught here, at any rank count (tests run 1,024 ranks and more).
"""
from collections import deque

import numpy as np

from .plan import COPY, RECV, RECV_COPY_SEND, RECV_REDUCE, RECV_REDUCE_SEND, SEND

_REDUCE = {"sum": np.add, "prod": np.multiply, "min": np.minimum, "max": np.maximum, "avg": np.add}


class PlanError(AssertionError):
    """The plan is wrong: it deadlocks, mismatches sizes, or reads what was never written."""


def simulate(plans, buffers, op="sum"):
    """Execute `plans` (one RankPlan per rank) on `buffers` ({"in","out"} arrays per rank).

    Returns the buffers after the run. "tmp" is allocated per rank from plan.tmp_elems.
    """
    n = len(plans)
    fn = _REDUCE[getattr(op, "value", op)]
    for r, p in enumerate(plans):
        bufs = buffers[r]
        dtype = next((v.dtype for v in bufs.values() if v is not None), np.float64)
        bufs.setdefault("tmp", np.zeros(p.tmp_elems, dtype=dtype))
    chans = {}
    stage_at = [0] * n
    pending = [None] * n            # receive ops of the current stage not yet done
    ready = deque(range(n))
    queued = [True] * n

    def view(r, reg):
        return buffers[r][reg.buf][reg.start:reg.stop]

    def post(r, peer, data):
        chans.setdefault((r, peer), deque()).append(data.copy())
        if not queued[peer]:
            queued[peer] = True
            ready.append(peer)

    while ready:
        r = ready.popleft()
        queued[r] = False
        stages = plans[r].stages
        while stage_at[r] < len(stages):
            stage = stages[stage_at[r]]
            if pending[r] is None:
                pending[r] = []
                for o in stage:
                    if o.kind == COPY:
                        view(r, o.dst)[...] = view(r, o.src)
                    elif o.kind == SEND:
                        post(r, o.send_peer, view(r, o.src))
                    else:
                        pending[r].append(o)
            still = []
            for o in pending[r]:
                q = chans.get((o.recv_peer, r))
                if not q or any(p.recv_peer == o.recv_peer for p in still):
                    still.append(o)
                    continue
                data = q.popleft()
                dst = view(r, o.dst)
                if data.shape != dst.shape:
                    raise PlanError(f"rank {r} stage {stage_at[r]} {o}: got {data.size} elements "
                                    f"from rank {o.recv_peer}, expected {dst.size}")
                if o.kind in (RECV, RECV_COPY_SEND):
                    dst[...] = data
                else:
                    fn(view(r, o.src), data, out=dst)
                if o.kind in (RECV_REDUCE_SEND, RECV_COPY_SEND):
                    post(r, o.send_peer, dst)
                assert o.kind in (RECV, RECV_COPY_SEND, RECV_REDUCE, RECV_REDUCE_SEND)
            pending[r] = still
            if still:
                break
            pending[r] = None
            stage_at[r] += 1
    stuck = [r for r in range(n) if stage_at[r] < len(plans[r].stages)]
    if stuck:
        r = stuck[0]
        raise PlanError(f"deadlock: {len(stuck)} ranks stuck, e.g. rank {r} at stage {stage_at[r]}: "
                        + "; ".join(str(o) for o in pending[r] or []))
    left = {k: len(v) for k, v in chans.items() if v}
    if left:
        raise PlanError(f"messages never received: {left}")
    return buffers


# ---- additions for the advanced plans (tree, hierarchical, halving-doubling) ------------------
# Everything below is new and used by tests/test_plans_advanced.py and topology/cost.py;
# simulate() above is unchanged.

def expand_chunks(plan, chunk_elems: int):
    """The plan as the executor runs it with `chunk_elems` (topology/walk.py: "for chunk: for
    stage: for op", each op on its chunk, ops with fewer chunks skipped), flattened into one
    stage list.

    Simulating the expanded plans proves a plan correct under chunking too: a plan whose
    stage k reads part of a region written whole by stage j < k reads, at chunk c, data
    written only at a later chunk, and gives wrong results here. Atomic plans are expanded
    with chunk_elems >= their longest region (one chunk per op), as the executor must."""
    from .plan import RankPlan
    from .walk import chunked_stages
    return RankPlan(plan.op, plan.algo, plan.rank, plan.nranks, chunked_stages(plan, chunk_elems),
                    plan.tmp_elems, plan.reduces)


def simulate_chunked(plans, buffers, op="sum", chunk_elems: int = 1):
    """simulate() of the plans as the executor cuts them into chunks of `chunk_elems`."""
    return simulate([expand_chunks(p, chunk_elems) for p in plans], buffers, op)


_WRITES = {"RECV", "RECV_REDUCE", "RECV_REDUCE_SEND", "RECV_COPY_SEND", "COPY"}


def plan_hazards(plan, alias_in_out=None, limit: int = 5) -> list:
    """Static checks of the stage contract beyond what one simulated schedule shows.

    1. Chunk safety (skipped for atomic plans): two accesses to overlapping but different
       regions of one buffer, at least one a write, make the result depend on how the
       executor cuts regions into chunks (chunk c of one region is not chunk c of the
       other). Every builder must reuse identical regions across stages.
    2. Ops of one stage that write overlapping memory, or write what another op of the
       stage reads (they run concurrently).
    3. Send order: a stage may forward (RECV_*_SEND) to a peer at most once; two forwards
       to one peer are posted in completion order, which the receiver cannot predict.
    `alias_in_out`: treat "in" and "out" as one buffer (all_reduce/reduce are called in
    place); by default for those ops. Returns human-readable problems (empty = clean)."""
    if alias_in_out is None:
        alias_in_out = plan.op in ("all_reduce", "reduce", "broadcast")
    canon = (lambda b: "out" if b == "in" else b) if alias_in_out else (lambda b: b)
    problems = []
    access = {}                              # (buf, start, stop) -> written?
    for si, stage in enumerate(plan.stages):
        fwd = {}
        mine = []                            # (op index, canon region, write)
        for oi, o in enumerate(stage):
            if o.kind in ("RECV_REDUCE_SEND", "RECV_COPY_SEND"):
                if o.send_peer in fwd:
                    problems.append(f"stage {si}: two forwards to rank {o.send_peer} ({fwd[o.send_peer]}; {o})")
                fwd[o.send_peer] = o
            regs = []
            if o.src is not None:
                regs.append((o.src, False))
            if o.dst is not None:
                regs.append((o.dst, o.kind in _WRITES))
            for reg, w in regs:
                key = (canon(reg.buf), reg.start, reg.stop)
                if reg.stop > reg.start:
                    access[key] = access.get(key, False) or w
                    mine.append((oi, key, w))
        mine.sort(key=lambda t: t[1])
        live = []
        for oi, key, w in mine:              # sweep: accesses still open when this one starts
            live = [x for x in live if x[1][0] == key[0] and x[1][2] > key[1]]
            for ob, kb, wb in live:
                if ob != oi and (w or wb):
                    problems.append(f"stage {si}: ops {ob} and {oi} touch {key[0]}[{max(key[1], kb[1])}:"
                                    f"{min(key[2], kb[2])}] concurrently")
            live.append((oi, key, w))
    if not getattr(plan, "atomic", False):
        regs = sorted(access)
        active = []                          # regions that may still overlap the next start
        for key in regs:
            active = [k for k in active if k[0] == key[0] and k[2] > key[1]]
            for k in active:
                if k != key and (access[k] or access[key]):
                    problems.append(f"chunk hazard: {k[0]}[{k[1]}:{k[2]}] and {key[0]}[{key[1]}:{key[2]}] "
                                    "overlap but differ (the executor cuts them into different chunks)")
            active.append(key)
            if len(problems) >= limit:
                break
    return problems[:limit]


def simulate_rotational(build, ring, blocks: dict, buffers: dict, op="sum", samples: int = 8, seed: int = 0):
    """Prove a rotation-symmetric plan family (the ring plans) at any rank count.

    Per-rank simulation of ring all_reduce at 16,384 ranks runs 2N^2 = 5e8 ops, and the
    per-rank plans alone would take ~100 GB, so instead:
      1. build(rank) gives the plan of one rank; the plan of ring position 0 is the
         *template*. Its regions are classified: a region equal to blocks[buf](i) for the
         rank i at ring position q is "block q"; any other region is fixed.
      2. Equivariance is checked: for `samples` positions p (1, N-1, N/2 and random ones; all
         positions when N <= 64), build(ring[p]) must equal the template with every peer at
         position q replaced by the one at q+p and every block q by block q+p.
      3. The template is executed for all N positions at once on 2-D numpy buffers
         (buffers[name][rank] is that rank's buffer), stage by stage in lockstep: a stage
         first posts its COPYs and SENDs for every rank, then each receive takes the oldest
         message of its channel. Channels are FIFOs per position offset, holding one row per
         sender. Lockstep is one legal schedule of the stage contract; plans are
         deterministic (Kahn-style: blocking receives, FIFO channels), so completing it with
         the right result proves the plan, and an empty channel is reported as a failure.
    blocks: {buf: fn(rank_ids: np.ndarray) -> (starts, stops)} (vectorised block bounds);
    their blocks must be distinct (e.g. count >= N for block(count, N, i)).
    Returns buffers. Cost: O(stages * N) numpy work, ~20 s for all_reduce at N = 16,384."""
    import random as _random
    from .plan import COPY as _COPY, RECV as _RECV, RECV_COPY_SEND as _RCS, RECV_REDUCE_SEND as _RRS, SEND as _SEND
    n = len(ring)
    ring_arr = np.asarray(list(ring), dtype=np.int64)
    pos_of = np.empty(n, dtype=np.int64)
    pos_of[ring_arr] = np.arange(n)
    fn = _REDUCE[getattr(op, "value", op)]
    template = build(int(ring_arr[0]))
    # region classification: (buf, start, stop) -> block position q
    where = {}
    for buf, bfn in blocks.items():
        starts, stops = bfn(ring_arr)
        for q in range(n):
            key = (buf, int(starts[q]), int(stops[q]))
            if key in where:
                raise ValueError(f"simulate_rotational: blocks of {buf!r} for positions {where[key]} and {q} "
                                 "coincide; use a count that makes every block distinct")
            where[key] = q

    def classify(reg):
        if reg is None:
            return None
        q = where.get((reg.buf, reg.start, reg.stop))
        return (reg.buf, q, reg) if q is not None else (reg.buf, None, reg)

    def ppos(peer):
        return -1 if peer < 0 else int(pos_of[peer])

    tops = [[(o.kind, ppos(o.recv_peer), ppos(o.send_peer), classify(o.src), classify(o.dst)) for o in st]
            for st in template.stages]

    table = {}
    for buf, bfn in blocks.items():
        st_, en_ = bfn(np.arange(n))
        table[buf] = (np.asarray(st_).tolist(), np.asarray(en_).tolist())
    ring_list = ring_arr.tolist()

    def expected(p):
        def reg_at(c):
            if c is None:
                return None
            buf, q, reg = c
            if q is None:
                return reg
            i = ring_list[(q + p) % n]
            return type(reg)(buf, table[buf][0][i], table[buf][1][i])
        return [[(k, -1 if rp < 0 else ring_list[(rp + p) % n], -1 if sp < 0 else ring_list[(sp + p) % n],
                  reg_at(s), reg_at(d)) for k, rp, sp, s, d in st] for st in tops]

    check = list(range(1, n)) if n <= 64 else sorted({1, n - 1, n // 2} | set(_random.Random(seed).sample(range(1, n), min(samples, n - 1))))
    for p in check:
        got = build(int(ring_arr[p]))
        want = expected(p)
        have = [[(o.kind, o.recv_peer, o.send_peer, o.src, o.dst) for o in st] for st in got.stages]
        if have != want or got.tmp_elems != template.tmp_elems:
            raise PlanError(f"plan of rank {int(ring_arr[p])} (ring position {p}) is not the rotated plan of "
                            f"position 0; simulate_rotational does not apply")
    if n == 1:
        simulate([template], [{k: v[0] for k, v in buffers.items()}], op)
        return buffers
    dtype = next(iter(buffers.values())).dtype
    bufs = dict(buffers)
    bufs.setdefault("tmp", np.zeros((n, template.tmp_elems), dtype=dtype))
    for st in tops:
        for t in st:
            for c in t[3:]:
                if c is not None and c[0] in blocks and c[1] is None:
                    raise ValueError(f"simulate_rotational: region {c[2]} of block buffer {c[0]!r} is not a block")
    # Block buffers are held skewed: skew[d, p] is, in the buffer of the rank at position p,
    # the block of the rank at position p + d. A template op on "block q" touches skew[q]:
    # one contiguous row for all N ranks at once (cache-friendly at N = 16,384).
    P = np.arange(n)
    skew, lens_of, spans = {}, {}, {}
    for buf, bfn in blocks.items():
        st_, en_ = (np.asarray(x, dtype=np.int64) for x in bfn(ring_arr))   # by position
        lens = en_ - st_
        width = max(1, int(lens.max(initial=0)))
        arr = np.zeros((n, n, width), dtype=bufs[buf].dtype)
        src = bufs[buf][ring_arr]
        for d0, dd, bp, w, ok in _skew_batches(n, width, lens):
            cols = np.where(ok, st_[bp] + w, 0)
            vals = src[np.broadcast_to(P, bp.shape), cols]
            arr[d0:d0 + len(dd), :, w] = np.where(ok, vals, 0)
        skew[buf], lens_of[buf], spans[buf] = arr, lens, (st_, en_)

    def gather(c):
        if c[1] is None:
            return bufs[c[0]][ring_arr, c[2].start:c[2].stop], np.full(n, c[2].length)
        return skew[c[0]][c[1]].copy(), np.roll(lens_of[c[0]], -c[1])

    def scatter(c, vals):
        if c[1] is None:
            bufs[c[0]][ring_arr, c[2].start:c[2].stop] = vals
        else:
            skew[c[0]][c[1]] = vals

    chans = {}                               # send offset -> deque of (vals, lens) by sender position
    for si, st in enumerate(tops):
        recvs = []
        for k, rp, sp, src, dst in st:
            if k == _COPY:
                scatter(dst, gather(src)[0])
            elif k == _SEND:
                chans.setdefault(sp, deque()).append(gather(src))
            else:
                recvs.append((k, rp, sp, src, dst))
        for k, rp, sp, src, dst in recvs:
            q = chans.get((-rp) % n)
            if not q:
                raise PlanError(f"stage {si}: {k} from offset {rp} finds no message in lockstep order")
            mvals, mlens = q.popleft()
            mvals, mlens = np.roll(mvals, -rp, axis=0), np.roll(mlens, -rp)    # row p <- sender p + rp
            dlens = np.roll(lens_of[dst[0]], -dst[1]) if dst[1] is not None else np.full(n, dst[2].length)
            if not np.array_equal(mlens, dlens):
                bad = int(np.nonzero(mlens != dlens)[0][0])
                raise PlanError(f"stage {si}: rank {int(ring_arr[bad])} {k} got {int(mlens[bad])} elements, "
                                f"expected {int(dlens[bad])}")
            if k in (_RECV, _RCS):
                out = mvals
            else:
                svals = gather(src)[0]
                out = fn(svals, mvals) if svals.shape == mvals.shape else _pad_op(fn, svals, mvals)
            scatter(dst, out)
            if k in (_RRS, _RCS):
                chans.setdefault(sp, deque()).append((out, dlens))
    for buf, arr in skew.items():            # back to the caller's layout
        st_, en_ = spans[buf]
        lens = en_ - st_
        res = bufs[buf][ring_arr]
        for d0, dd, bp, w, ok in _skew_batches(n, arr.shape[2], lens):
            rows_ = np.broadcast_to(P, bp.shape)
            res[rows_[ok], (st_[bp] + w)[ok]] = arr[d0:d0 + len(dd), :, w][ok]
        bufs[buf][ring_arr] = res
    left = {k: len(v) for k, v in chans.items() if v}
    if left:
        raise PlanError(f"messages never received (by offset): {left}")
    return bufs


def _pad_op(fn, a, b):
    w = min(a.shape[1], b.shape[1])
    return fn(a[:, :w], b[:, :w])


def _skew_batches(n, width, lens, batch=1 << 22):
    """(first d, ds, block positions [len(ds), n], element w, valid mask) in memory-bounded batches."""
    step = max(1, batch // max(1, n))
    P = np.arange(n)
    for d0 in range(0, n, step):
        dd = np.arange(d0, min(n, d0 + step))
        bp = (P[None, :] + dd[:, None]) % n
        for w in range(width):
            yield d0, dd, bp, w, lens[bp] > w
