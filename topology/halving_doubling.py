"""Recursive halving/doubling all-reduce (Rabenseifner), for small and medium messages at
scale: 2*log2(N) steps instead of the ring's 2(N-1), with the same bandwidth term.

Any rank count: let p be the largest power of two <= N and r = N - p. The first 2r
positions fold in pairs (the even one sends its whole vector to the odd one, which adds
it, and gets the result back at the end); the p survivors ("new ranks") then run
  reduce-scatter by recursive halving: at step mask = 1, 2, 4, ... partners nr and
  nr ^ mask hold the same block range; each keeps one half (lower if its mask bit is 0),
  sends the other half and adds the partner's copy of its own half;
  all-gather by recursive doubling: the steps in reverse, exchanging the ranges.
Partners at distance 1, 2, 4, ... in the topology's order, so the large early exchanges
stay inside a host when hosts are contiguous and hold a power of two ranks.

Each step reads half of what the step before wrote, so the executor must not cut a
region into chunks (chunk c of a half is not chunk c of the whole): plans are marked
`atomic`. `max_elems` cuts the data into independent segments so that no message exceeds
it (the segments run side by side in the same stages); with max_elems = the executor's
chunk, every region is one chunk even for an executor that ignores `atomic`.
"""
from .plan import Region, RankPlan, block, recv, recv_reduce, send


def _segments(lo, hi, max_elems):
    length = hi - lo
    g = 1 if not max_elems else max(1, -(-length // max(1, max_elems)))
    g = max(1, min(g, length))
    return [(lo + a, lo + b) for a, b in (block(length, g, j) for j in range(g))]


def stages(members, me, lo, hi, max_elems=None, buf="out") -> list:
    """In-place all-reduce of buf[lo:hi] among `members` (positions = list order)."""
    n = len(members)
    if n == 1:
        return []
    pos = members.index(me)
    segs = _segments(lo, hi, max_elems)
    p = 1 << (n.bit_length() - 1)
    r = n - p

    def whole():
        return [Region(buf, a, b) for a, b in segs]

    if pos < 2 * r and pos % 2 == 0:           # folds into its odd neighbour and waits
        partner = members[pos + 1]
        return [[send(partner, reg) for reg in whole()], [recv(partner, reg) for reg in whole()]]

    def member_of(nr):
        return members[2 * nr + 1] if nr < r else members[nr + r]

    nr = pos // 2 if pos < 2 * r else pos - r
    out = []
    if pos < 2 * r:
        out.append([recv_reduce(members[pos - 1], reg, reg) for reg in whole()])

    def span(seg, a, b):                       # block range [a, b) of p blocks of a segment
        s, e = seg
        return Region(buf, s + (e - s) * a // p, s + (e - s) * b // p)

    lo_b, hi_b, mask, history = 0, p, 1, []
    while mask < p:
        partner = member_of(nr ^ mask)
        mid = (lo_b + hi_b) // 2
        keep, give = ((mid, hi_b), (lo_b, mid)) if nr & mask else ((lo_b, mid), (mid, hi_b))
        stage = []
        for seg in segs:
            k = span(seg, *keep)
            stage += [send(partner, span(seg, *give)), recv_reduce(partner, k, k)]
        out.append(stage)
        history.append((partner, keep, give))
        lo_b, hi_b = keep
        mask <<= 1
    for partner, keep, give in reversed(history):
        stage = []
        for seg in segs:
            stage += [send(partner, span(seg, *keep)), recv(partner, span(seg, *give))]
        out.append(stage)
    if pos < 2 * r:
        out.append([send(members[pos - 1], reg) for reg in whole()])
    return out


def all_reduce(rank, order, count, max_elems=None) -> RankPlan:
    """Rabenseifner all-reduce in place on "out" (atomic plan; see the module docstring)."""
    n = len(order)
    plan = RankPlan("all_reduce", "halving_doubling", rank, n, reduces=True, atomic=True)
    if n == 1 or count == 0:
        return plan
    plan.stages = stages(order, rank, 0, count, max_elems)
    return plan


def steps(n: int) -> int:
    """Message steps on the critical path (fold + 2 log2 p + unfold)."""
    p = 1 << (n.bit_length() - 1)
    return 2 * (p.bit_length() - 1) + (2 if n != p else 0)
