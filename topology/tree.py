"""Tree plans: the double binary tree all-reduce (two complementary trees, each carrying
half of the data, as NCCL does) and pipelined binary-tree reduce and broadcast.

Shape. Trees are built over *positions* 0..m-1 of a rank order (the topology's ring
order, hosts contiguous) and labelled in-order, so every subtree is a contiguous run of
positions and exactly one tree edge crosses each boundary between neighbouring positions:
a host boundary is crossed once per tree, and leaf-parent edges join neighbours.

  tree A, m odd:   a full binary tree (every interior node has 2 children) labelled in
                   order; in-order labelling of a full tree alternates leaf, interior,
                   leaf, ... so leaves are the even positions, interior nodes the odd ones.
  tree A, m even:  the full tree on positions 0..m-2 plus position m-1 as the root above
                   it (one child). Interior = odd positions again.
  tree B, m even:  A mirrored (p -> m-1-p): interior = even positions.
  tree B, m odd:   A shifted by one (in-order index i at position i+1 mod m): interior =
                   even positions 2..m-1; position 0 is a leaf in both trees.
So every rank is a leaf in one tree and interior in at most one: the two trees' up and
down traffic never pile onto the same rank. Depth is about log2(m) + 1.

Pipelining. The executor runs "for chunk: for stage", so a plan whose reduce-up and
broadcast-down sit in one stage list would send chunk c+1 up only after chunk c came back
down. Instead each tree's half is cut into K segments in the plan itself (K ~ half /
chunk_elems, at most MAX_SEGMENTS): all segments go up (segment j+1 leaves a rank while
segment j is still climbing), then all come down. A rank's stages are: its leaf sends
(one stage), its interior tree's up and down for every segment, its leaf receives (one
stage), so neither tree ever waits on the other. Every segment is one region, used with
the same bounds by every stage, so the executor may still cut it into chunks safely.

Semantics as in ring.py: all_reduce in place on "out"; reduce leaves non-root inputs
unchanged (partial sums in "tmp"), the root's result in "out"; broadcast in place on "out".
"""
from .plan import (Region, RankPlan, block, copy, recv, recv_copy_send, recv_reduce,
                   recv_reduce_send, send)

#: most segments one tree's half is cut into (bounds the plan at a few thousand stages)
MAX_SEGMENTS = 256


# ---- shapes --------------------------------------------------------------------------------
def _left_len(length: int) -> int:
    """Size of the left subtree of a full in-order tree over `length` (odd) positions."""
    half = (length - 1) // 2
    return half if half % 2 else half - 1


def _root(lo: int, hi: int) -> int:
    """Root position of the full in-order tree over [lo, hi) (odd length)."""
    return lo if hi - lo == 1 else lo + _left_len(hi - lo)


def _full_node(m: int, i: int):
    """(parent, children) of position i in the full in-order tree over m (odd) positions."""
    lo, hi, parent = 0, m, -1
    while True:
        if hi - lo == 1:
            return parent, ()
        root = lo + _left_len(hi - lo)
        if i == root:
            return parent, (_root(lo, root), _root(root + 1, hi))
        parent = root
        if i < root:
            hi = root
        else:
            lo = root + 1


def tree_a(m: int, i: int):
    """(parent, children) of position i (parent -1 at the root) in tree A over m positions."""
    if m % 2:
        return _full_node(m, i)
    if i == m - 1:
        return -1, (_root(0, m - 1),)
    p, ch = _full_node(m - 1, i)
    return (m - 1 if p < 0 else p), ch


def tree_b(m: int, i: int):
    """Tree B: A mirrored (m even) or shifted by one (m odd); complementary to A."""
    if m % 2 == 0:
        p, ch = tree_a(m, m - 1 - i)
        return (-1 if p < 0 else m - 1 - p), tuple(m - 1 - c for c in ch)
    p, ch = tree_a(m, (i - 1) % m)
    return (-1 if p < 0 else (p + 1) % m), tuple((c + 1) % m for c in ch)


def tree_root(m: int) -> int:
    """Position of tree A's root."""
    return _root(0, m) if m % 2 else m - 1


def depth(m: int) -> int:
    """Edges on the longest root-to-leaf path of tree A (and B) over m positions."""
    def full_depth(length):
        d = 0
        while length > 1:
            left = _left_len(length)
            length = max(left, length - 1 - left)
            d += 1
        return d
    if m <= 1:
        return 0
    return full_depth(m) if m % 2 else 1 + full_depth(m - 1)


def rooted(m: int, i: int, root_pos: int):
    """(parent, children) of position i in tree A rotated so that position root_pos is the root."""
    shift = root_pos - tree_root(m)
    p, ch = tree_a(m, (i - shift) % m)
    return (-1 if p < 0 else (p + shift) % m), tuple((c + shift) % m for c in ch)


def _pos(order, rank):
    return order.index(rank)


# ---- segments ------------------------------------------------------------------------------
def segments(buf: str, lo: int, hi: int, chunk_elems=None, max_segments: int = MAX_SEGMENTS) -> list:
    """Cut [lo, hi) of `buf` into K near-equal segments of about chunk_elems (K >= 1; no
    empty segment unless the range is empty)."""
    length = hi - lo
    k = 1 if not chunk_elems else -(-length // max(1, chunk_elems))
    k = max(1, min(k, max_segments, length))
    return [Region(buf, lo + a, lo + b) for a, b in (block(length, k, j) for j in range(k))]


# ---- stage generators (also used by hierarchical.py) ---------------------------------------
def up_stages(parent: int, children, src: Region, acc: Region, out: Region = None) -> list:
    """Reduce one segment up a tree: children's partial results are added to `src`
    (accumulating in `acc`) and the sum goes to `parent`; at the root (parent < 0) it
    lands in `out` (default `acc`). In-place all-reduce: src = acc = out."""
    out = acc if out is None else out
    if parent >= 0 and not children:
        return [[send(parent, src)]]
    if parent < 0 and not children:
        return [[copy(src, out)]] if src != out else []
    dst = out if parent < 0 else acc
    stages, cur = [], src
    for c in children[:-1]:
        stages.append([recv_reduce(c, cur, dst)])
        cur = dst
    last = children[-1]
    stages.append([recv_reduce(last, cur, dst) if parent < 0 else recv_reduce_send(last, parent, cur, dst)])
    return stages


def down_stages(parent: int, children, seg: Region) -> list:
    """Broadcast one segment down a tree (in place on `seg`)."""
    if parent < 0:
        return [[send(c, seg) for c in children]] if children else []
    if not children:
        return [[recv(parent, seg)]]
    stages = [[recv_copy_send(parent, children[0], seg)]]
    if len(children) > 1:
        stages.append([send(c, seg) for c in children[1:]])
    return stages


def _merge(a: list, b: list) -> list:
    """Run two stage lists side by side (stage i of both together). Only for lists whose ops
    touch disjoint regions and never send to the same peer twice in one stage."""
    return [(a[i] if i < len(a) else []) + (b[i] if i < len(b) else []) for i in range(max(len(a), len(b)))]


def double_tree_stages(members, me: int, segs0: list, segs1: list) -> list:
    """In-place all-reduce stages of `me` among `members` (positions = list order):
    tree A reduces and broadcasts segs0, tree B segs1 (regions of "out")."""
    m = len(members)
    if m == 1:
        return []
    i = _pos(members, me)
    trees = []
    for shape, segs in ((tree_a, segs0), (tree_b, segs1)):
        p, ch = shape(m, i)
        trees.append((-1 if p < 0 else members[p], tuple(members[c] for c in ch), segs))
    # The two trees must not wait on each other, or every segment would cross the full
    # depth of both trees before the next one moves. So: every leaf send first (they need
    # nothing), then the interior tree's reduce-up and broadcast-down for all segments
    # (it only waits on its own tree), and the leaf receives last. A rank is interior in
    # at most one tree, and two ranks exchange at most one up- and one down-stream, which
    # both ends order alike (up before down).
    nseg = max(len(segs0), len(segs1))
    leaf = [t for t in trees if not t[1]]
    inner = [t for t in trees if t[1]]
    stages = []
    first = [o for j in range(nseg) for p, ch, s in leaf if j < len(s) for st in up_stages(p, ch, s[j], s[j]) for o in st]
    if first:
        stages.append(first)
    for p, ch, s in inner:
        for j in range(len(s)):
            stages += up_stages(p, ch, s[j], s[j])
        for j in range(len(s)):
            stages += down_stages(p, ch, s[j])
    last = [o for j in range(nseg) for p, ch, s in leaf if j < len(s) for st in down_stages(p, ch, s[j]) for o in st]
    if last:
        stages.append(last)
    return stages


def _merge_all(lists: list) -> list:
    out = []
    for lst in lists:
        out = _merge(out, lst)
    return out


# ---- builders ------------------------------------------------------------------------------
def all_reduce(rank, order, count, chunk_elems=None) -> RankPlan:
    """Double binary tree all-reduce, in place on "out": tree A carries the first half,
    tree B the second; each half is cut into segments of about chunk_elems."""
    n = len(order)
    plan = RankPlan("all_reduce", "tree", rank, n, reduces=True)
    if n == 1 or count == 0:
        return plan
    halves = [block(count, 2, t) for t in range(2)]
    segs = [segments("out", lo, hi, chunk_elems) if hi > lo else [] for lo, hi in halves]
    plan.stages = double_tree_stages(order, rank, segs[0], segs[1])
    return plan


def reduce(rank, order, count, root, chunk_elems=None) -> RankPlan:
    """Pipelined binary-tree reduce to `root` (tree A rotated so the root is its root)."""
    n = len(order)
    plan = RankPlan("reduce", "tree", rank, n, reduces=True)
    if count == 0:
        return plan
    p, ch = rooted(n, _pos(order, rank), _pos(order, root))
    parent, children = (-1 if p < 0 else order[p]), tuple(order[c] for c in ch)
    if parent >= 0 and children:
        plan.tmp_elems = count
    for s in segments("in", 0, count, chunk_elems):
        plan.stages += up_stages(parent, children, s, s._replace(buf="tmp"), s._replace(buf="out"))
    return plan


def broadcast(rank, order, count, root, chunk_elems=None) -> RankPlan:
    """Pipelined binary-tree broadcast from `root`, in place on "out"."""
    n = len(order)
    plan = RankPlan("broadcast", "tree", rank, n)
    if n == 1 or count == 0:
        return plan
    p, ch = rooted(n, _pos(order, rank), _pos(order, root))
    parent, children = (-1 if p < 0 else order[p]), tuple(order[c] for c in ch)
    for s in segments("out", 0, count, chunk_elems):
        plan.stages += down_stages(parent, children, s)
    return plan
