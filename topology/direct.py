"""Direct plans: every rank talks to every peer it exchanges data with, all at once.

Used where each pair moves different data (all-to-all, gather, scatter), for
point-to-point, and for the dissemination barrier (log2 N rounds of empty messages).
"""
from itertools import accumulate

from .plan import Region, RankPlan, copy, recv, send


def _offsets(splits):
    starts = [0] + list(accumulate(splits))
    return [(starts[i], starts[i + 1]) for i in range(len(splits))]


def all_to_all(rank, nranks, in_splits, out_splits) -> RankPlan:
    """in_splits[i] elements go to rank i; out_splits[j] elements come from rank j."""
    plan = RankPlan("all_to_all", "direct", rank, nranks)
    ins, outs = _offsets(in_splits), _offsets(out_splits)
    stage = [copy(Region("in", *ins[rank]), Region("out", *outs[rank]))]
    for k in range(1, nranks):
        to, frm = (rank + k) % nranks, (rank - k) % nranks
        stage.append(send(to, Region("in", *ins[to])))
        stage.append(recv(frm, Region("out", *outs[frm])))
    plan.stages.append(stage)
    return plan


def gather(rank, nranks, count, root) -> RankPlan:
    plan = RankPlan("gather", "direct", rank, nranks)
    mine = Region("in", 0, count)
    if rank != root:
        plan.stages.append([send(root, mine)])
        return plan
    stage = [copy(mine, Region("out", rank * count, (rank + 1) * count))]
    stage += [recv(p, Region("out", p * count, (p + 1) * count)) for p in range(nranks) if p != root]
    plan.stages.append(stage)
    return plan


def scatter(rank, nranks, count, root) -> RankPlan:
    plan = RankPlan("scatter", "direct", rank, nranks)
    mine = Region("out", 0, count)
    if rank != root:
        plan.stages.append([recv(root, mine)])
        return plan
    stage = [copy(Region("in", rank * count, (rank + 1) * count), mine)]
    stage += [send(p, Region("in", p * count, (p + 1) * count)) for p in range(nranks) if p != root]
    plan.stages.append(stage)
    return plan


def send_recv(rank, nranks, count, peer, sending: bool) -> RankPlan:
    plan = RankPlan("send" if sending else "recv", "direct", rank, nranks)
    plan.stages.append([send(peer, Region("in", 0, count)) if sending else recv(peer, Region("out", 0, count))])
    return plan


def barrier(rank, nranks) -> RankPlan:
    """Dissemination barrier: round k sends to rank+2^k and hears from rank-2^k."""
    plan = RankPlan("barrier", "dissemination", rank, nranks)
    empty = Region("tmp", 0, 0)
    k = 1
    while k < nranks:
        plan.stages.append([send((rank + k) % nranks, empty), recv((rank - k) % nranks, empty)])
        k *= 2
    return plan
