"""Ring plans: bandwidth-optimal all-reduce, reduce-scatter, all-gather, and chain
(pipelined) broadcast and reduce. Each rank talks only to its ring neighbours, so
every link carries (N-1)/N of the data once in each phase, and chunking overlaps them.

`ring` is the rank order around the ring (a permutation of range(N)); the topology
chooses it so that ranks on one host sit next to each other.
"""
from .plan import (Region, RankPlan, block, copy, recv, recv_copy_send, recv_reduce,
                   recv_reduce_send, send)


def _neighbours(ring, rank):
    n = len(ring)
    pos = ring.index(rank)
    return pos, ring[(pos - 1) % n], ring[(pos + 1) % n]


def all_reduce(rank, ring, count) -> RankPlan:
    """Reduce-scatter then all-gather, in place on "out" (the executor copies in->out first)."""
    n = len(ring)
    plan = RankPlan("all_reduce", "ring", rank, n, reduces=True)
    if n == 1:
        return plan
    pos, prev, nxt = _neighbours(ring, rank)

    def blk(p):
        return Region("out", *block(count, n, ring[p % n]))

    plan.stages.append([send(nxt, blk(pos))])
    for k in range(1, n):
        b = blk(pos - k)
        plan.stages.append([recv_reduce_send(prev, nxt, b, b)])
    for j in range(n - 2):
        plan.stages.append([recv_copy_send(prev, nxt, blk(pos - j))])
    plan.stages.append([recv(prev, blk(pos - (n - 2)))])
    return plan


def reduce_scatter(rank, ring, count) -> RankPlan:
    """"in" holds N blocks of `count`; rank r ends with the reduced block r in "out"."""
    n = len(ring)
    plan = RankPlan("reduce_scatter", "ring", rank, n, reduces=True)
    mine = Region("in", *_bl(count, ring[ring.index(rank)]))
    if n == 1:
        plan.stages.append([copy(mine, Region("out", 0, count))])
        return plan
    pos, prev, nxt = _neighbours(ring, rank)

    def inblk(p):
        return Region("in", *_bl(count, ring[p % n]))

    plan.tmp_elems = 2 * count
    plan.stages.append([send(nxt, inblk(pos - 1))])
    for k in range(1, n - 1):
        tmp = Region("tmp", (k % 2) * count, (k % 2 + 1) * count)
        plan.stages.append([recv_reduce_send(prev, nxt, inblk(pos - 1 - k), tmp)])
    plan.stages.append([recv_reduce(prev, inblk(pos), Region("out", 0, count))])
    return plan


def _bl(count, i):
    return i * count, (i + 1) * count


def all_gather(rank, ring, count) -> RankPlan:
    """"in" holds `count` elements; "out" gets N blocks, block r from rank r."""
    n = len(ring)
    plan = RankPlan("all_gather", "ring", rank, n)
    plan.stages.append([copy(Region("in", 0, count), Region("out", *_bl(count, rank)))])
    if n == 1:
        return plan
    pos, prev, nxt = _neighbours(ring, rank)

    def blk(p):
        return Region("out", *_bl(count, ring[p % n]))

    plan.stages.append([send(nxt, blk(pos))])
    for j in range(1, n - 1):
        plan.stages.append([recv_copy_send(prev, nxt, blk(pos - j))])
    plan.stages.append([recv(prev, blk(pos - (n - 1)))])
    return plan


def _chain(ring, root, rank):
    """Position along a chain that starts after `root` and ends at it (for reduce),
    or starts at it (for broadcast), plus the neighbours."""
    n = len(ring)
    rpos = ring.index(root)
    pos = ring.index(rank)
    q = (pos - rpos) % n
    return q, ring[(pos - 1) % n], ring[(pos + 1) % n]


def broadcast(rank, ring, count, root) -> RankPlan:
    """Pipelined chain from the root around the ring; in place on "out"."""
    n = len(ring)
    plan = RankPlan("broadcast", "ring", rank, n)
    if n == 1:
        return plan
    q, prev, nxt = _chain(ring, root, rank)
    whole = Region("out", 0, count)
    if q == 0:
        plan.stages.append([send(nxt, whole)])
    elif q < n - 1:
        plan.stages.append([recv_copy_send(prev, nxt, whole)])
    else:
        plan.stages.append([recv(prev, whole)])
    return plan


def reduce(rank, ring, count, root) -> RankPlan:
    """Pipelined chain ending at the root: each rank adds its "in" and passes it on.
    Non-roots keep their input unchanged (partial sums live in "tmp")."""
    n = len(ring)
    plan = RankPlan("reduce", "ring", rank, n, reduces=True)
    whole_in = Region("in", 0, count)
    if n == 1:
        plan.stages.append([copy(whole_in, Region("out", 0, count))])
        return plan
    q, prev, nxt = _chain(ring, root, rank)
    # chain order: root+1 (q=1) starts, ..., root (q=0) ends
    if q == 1:
        plan.stages.append([send(nxt, whole_in)])
    elif q == 0:
        plan.stages.append([recv_reduce(prev, whole_in, Region("out", 0, count))])
    else:
        plan.tmp_elems = count
        plan.stages.append([recv_reduce_send(prev, nxt, whole_in, Region("tmp", 0, count))])
    return plan


