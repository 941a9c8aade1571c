"""Hierarchical plans: use the fast links inside a host for most of the bytes and cross
between hosts with few, large messages.

all_reduce (the one that matters): with S = ranks on the smallest host,
  1. intra-host reduce-scatter (ring over the host's ranks): local rank j ends with its
     slice j (1/S of the data) summed over the host (ranks j >= S on bigger hosts own no
     slice; they only add their data on the way);
  2. inter-host all-reduce of slice j among the ranks with local index j, one per host
     (S such groups run at once, each on 1/S of the data): `inter` = "tree" (double
     binary tree, default), "ring" or "halving_doubling";
  3. intra-host all-gather (ring) of the slices.
Every region the intra phases move is exactly a region the inter phase uses (its ring
blocks, tree segments or halving-doubling segments), so the plan stays safe for the
executor's chunking; with inter="halving_doubling" the plan is atomic (see that module).

reduce / broadcast: a two-level pipelined tree: a binary tree among one leader per host
(the root leads its host; elsewhere the host's first rank), and in each host a binary
tree below the leader.

all_gather / reduce_scatter (hosts must all hold the same number of ranks): inter-host
ring among the ranks with the same local index, then intra-host ring (reduce_scatter:
the reverse), staged in "tmp" in slice-major order and copied out; (H-1)+(L-1) messages
per rank instead of the ring's N-1. Atomic plans (a phase reads unions of the regions the
previous one wrote).

`hosts` is the host index of every rank (Topology.hosts); a host's ranks are taken in
ascending order, hosts in index order.
"""
import functools

from . import halving_doubling, tree
from .plan import (Region, RankPlan, block, copy, recv, recv_copy_send, recv_reduce,
                   recv_reduce_send, send)

INTER = ("tree", "ring", "halving_doubling")


def host_members(hosts) -> list:
    """members[h] = ranks of host h, ascending."""
    return _layout(tuple(hosts))[0]


@functools.lru_cache(maxsize=8)
def _layout(hosts: tuple):
    """(members by host, {rank: (host, local index)}), cached: builders run once per rank."""
    out = [[] for _ in range(max(hosts) + 1)]
    for r, h in enumerate(hosts):
        out[h].append(r)
    members = [m for m in out if m]
    where = {r: (h, j) for h, m in enumerate(members) for j, r in enumerate(m)}
    return members, where


# ---- ring phases on explicit blocks (lists of regions), in place --------------------------
def ring_reduce_scatter_stages(members, me, blocks) -> list:
    """Ring reduce-scatter among `members`: blocks[i] (a list of regions, possibly empty)
    ends summed at members[i]. In place (partial sums overwrite the regions). One region
    per stage where a rank forwards, so two forwards never race to one peer."""
    n = len(members)
    if n == 1:
        return []
    pos = members.index(me)
    prev, nxt = members[(pos - 1) % n], members[(pos + 1) % n]
    stages = []
    first = [send(nxt, r) for r in blocks[(pos - 1) % n]]
    if first:
        stages.append(first)
    for k in range(1, n - 1):
        stages += [[recv_reduce_send(prev, nxt, r, r)] for r in blocks[(pos - 1 - k) % n]]
    last = [recv_reduce(prev, r, r) for r in blocks[pos]]
    if last:
        stages.append(last)
    return stages


def ring_all_gather_stages(members, me, blocks) -> list:
    """Ring all-gather among `members`: blocks[i], held by members[i], reaches everyone."""
    n = len(members)
    if n == 1:
        return []
    pos = members.index(me)
    prev, nxt = members[(pos - 1) % n], members[(pos + 1) % n]
    stages = []
    first = [send(nxt, r) for r in blocks[pos]]
    if first:
        stages.append(first)
    for j in range(1, n - 1):
        stages += [[recv_copy_send(prev, nxt, r)] for r in blocks[(pos - j) % n]]
    last = [recv(prev, r) for r in blocks[(pos + 1) % n]]
    if last:
        stages.append(last)
    return stages


# ---- all_reduce --------------------------------------------------------------------------
def _partition(inter, lo, hi, ngroup, chunk_elems):
    """The regions the inter-host phase works on for slice [lo, hi)."""
    if inter == "ring":
        return [Region("out", lo + a, lo + b) for a, b in (block(hi - lo, ngroup, k) for k in range(ngroup))]
    if inter == "tree":
        halves = [(lo + a, lo + b) for a, b in (block(hi - lo, 2, t) for t in range(2))]
        return [tree.segments("out", a, b, chunk_elems) if b > a else [] for a, b in halves]
    return [Region("out", a, b) for a, b in halving_doubling._segments(lo, hi, chunk_elems)]


def _flat(part):
    return [r for x in part for r in (x if isinstance(x, list) else [x])]


def all_reduce(rank, hosts, count, inter="tree", chunk_elems=None) -> RankPlan:
    """Intra-host reduce-scatter -> inter-host all-reduce per local slice -> intra-host
    all-gather, in place on "out"."""
    if inter not in INTER:
        raise ValueError(f"hierarchical all_reduce: inter must be one of {INTER}, got {inter!r}")
    n = len(hosts)
    plan = RankPlan("all_reduce", "hierarchical", rank, n, reduces=True, atomic=inter == "halving_doubling")
    if n == 1 or count == 0:
        return plan
    members = host_members(hosts)
    h, j = _where(hosts, rank)
    local = members[h]
    nslices = min(len(m) for m in members)
    slices = [block(count, nslices, s) for s in range(nslices)]
    parts = [_partition(inter, lo, hi, len(members), chunk_elems) for lo, hi in slices]
    blocks = [_flat(parts[i]) if i < nslices else [] for i in range(len(local))]
    stages = ring_reduce_scatter_stages(local, rank, blocks)
    if j < nslices:
        peers = [m[j] for m in members]
        lo, hi = slices[j]
        if inter == "ring":
            own = [[r] for r in parts[j]]
            stages += ring_reduce_scatter_stages(peers, rank, own) + ring_all_gather_stages(peers, rank, own)
        elif inter == "tree":
            stages += tree.double_tree_stages(peers, rank, parts[j][0], parts[j][1])
        else:
            stages += halving_doubling.stages(peers, rank, lo, hi, chunk_elems)
    stages += ring_all_gather_stages(local, rank, blocks)
    plan.stages = stages
    return plan


# ---- reduce / broadcast: two-level trees ---------------------------------------------------
def _two_level(rank, hosts, root):
    """(parent, children) of `rank` in the two-level tree rooted at `root`."""
    members, where = _layout(tuple(hosts))
    hidx = {r: hj[0] for r, hj in ((rank, where[rank]), (root, where[root]))}
    leaders = [m[0] for m in members]
    leaders[hidx[root]] = root
    mine = members[hidx[rank]]
    lead = leaders[hidx[rank]]
    p, ch = tree.rooted(len(mine), mine.index(rank), mine.index(lead))
    parent = -1 if p < 0 else mine[p]
    children = [mine[c] for c in ch]
    if rank == lead:
        p, ch = tree.rooted(len(leaders), hidx[rank], hidx[root])  # leaders in host order
        parent = -1 if p < 0 else leaders[p]
        children += [leaders[c] for c in ch]
    return parent, tuple(children)


def reduce(rank, hosts, count, root, chunk_elems=None) -> RankPlan:
    """Pipelined two-level tree reduce; non-root inputs unchanged (partials in "tmp")."""
    n = len(hosts)
    plan = RankPlan("reduce", "hierarchical", rank, n, reduces=True)
    if count == 0:
        return plan
    parent, children = _two_level(rank, hosts, root)
    if parent >= 0 and children:
        plan.tmp_elems = count
    for s in tree.segments("in", 0, count, chunk_elems):
        plan.stages += tree.up_stages(parent, children, s, s._replace(buf="tmp"), s._replace(buf="out"))
    return plan


def broadcast(rank, hosts, count, root, chunk_elems=None) -> RankPlan:
    """Pipelined two-level tree broadcast, in place on "out"."""
    n = len(hosts)
    plan = RankPlan("broadcast", "hierarchical", rank, n)
    if n == 1 or count == 0:
        return plan
    parent, children = _two_level(rank, hosts, root)
    for s in tree.segments("out", 0, count, chunk_elems):
        plan.stages += tree.down_stages(parent, children, s)
    return plan


# ---- all_gather / reduce_scatter -----------------------------------------------------------
def _uniform(hosts, what):
    members = host_members(hosts)
    sizes = {len(m) for m in members}
    if len(sizes) != 1:
        raise ValueError(f"hierarchical {what} needs the same number of ranks on every host, got "
                         f"{sorted(len(m) for m in members)}; use ring")
    return members, len(members), sizes.pop()


def _where(hosts, rank):
    return _layout(tuple(hosts))[1][rank]


def all_gather(rank, hosts, count) -> RankPlan:
    """"in" holds count elements; "out" gets N blocks, block r from rank r. Inter-host ring
    among equal local indices, then intra-host ring, staged in "tmp"."""
    n = len(hosts)
    plan = RankPlan("all_gather", "hierarchical", rank, n, atomic=True)
    if count == 0:
        return plan
    members, H, L = _uniform(hosts, "all_gather")
    h, j = _where(hosts, rank)
    mine = Region("in", 0, count)
    plan.stages.append([copy(mine, Region("out", rank * count, (rank + 1) * count))])
    if n == 1:
        return plan
    plan.tmp_elems = n * count

    def slot(jj, hh):
        return Region("tmp", (jj * H + hh) * count, (jj * H + hh + 1) * count)

    plan.stages[0].append(copy(mine, slot(j, h)))
    plan.stages += ring_all_gather_stages([m[j] for m in members], rank, [[slot(j, hh)] for hh in range(H)])
    plan.stages += ring_all_gather_stages(members[h], rank,
                                          [[Region("tmp", jj * H * count, (jj + 1) * H * count)] for jj in range(L)])
    plan.stages.append([copy(slot(jj, hh), Region("out", members[hh][jj] * count, (members[hh][jj] + 1) * count))
                        for jj in range(L) for hh in range(H) if members[hh][jj] != rank])
    return plan


def reduce_scatter(rank, hosts, count) -> RankPlan:
    """"in" holds N blocks of count; rank r ends with the reduced block r in "out". Intra-host
    ring, then inter-host ring among equal local indices, in "tmp" (input unchanged)."""
    n = len(hosts)
    plan = RankPlan("reduce_scatter", "hierarchical", rank, n, reduces=True, atomic=True)
    if count == 0:
        return plan
    members, H, L = _uniform(hosts, "reduce_scatter")
    h, j = _where(hosts, rank)
    if n == 1:
        plan.stages.append([copy(Region("in", 0, count), Region("out", 0, count))])
        return plan
    plan.tmp_elems = n * count

    def slot(jj, hh):
        return Region("tmp", (jj * H + hh) * count, (jj * H + hh + 1) * count)

    plan.stages.append([copy(Region("in", members[hh][jj] * count, (members[hh][jj] + 1) * count), slot(jj, hh))
                        for jj in range(L) for hh in range(H)])
    plan.stages += ring_reduce_scatter_stages(members[h], rank,
                                              [[Region("tmp", jj * H * count, (jj + 1) * H * count)] for jj in range(L)])
    plan.stages += ring_reduce_scatter_stages([m[j] for m in members], rank, [[slot(j, hh)] for hh in range(H)])
    plan.stages.append([copy(slot(j, h), Region("out", 0, count))])
    return plan
