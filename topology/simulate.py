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
