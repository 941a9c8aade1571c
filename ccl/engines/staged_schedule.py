"""The staging schedule (ccl/engines/staged.py): which element ranges each executor pass must
copy from the device first, and which pass finalises each range, read once from the plan's
walk (topology/walk.py, the order the executor runs) and cached by the stager per layout."""
from typing import NamedTuple, Optional

from pyccl.topology.plan import COPY, RECV_REDUCE, RECV_REDUCE_SEND, SEND
from pyccl.topology.walk import iter_passes


class _Call(NamedTuple):
    """One staged collective: the plan and chunk the communicator's CPU path would use for these
    buffers, the device buffers by plan name (None: this rank has none), which of them are read
    from the device and which written back, the reduction, and whether the result is averaged."""
    plan: object
    chunk: Optional[int]
    views: dict
    fetch: tuple
    flush: tuple
    op: object = None
    avg: bool = False
    inplace: bool = False              # "in" is "out" (all_reduce, reduce)


class _Ranges:
    """Disjoint, merged [start, stop) element ranges."""
    __slots__ = ("iv",)

    def __init__(self):
        self.iv = []

    def missing(self, a, b):
        """The parts of [a, b) not covered."""
        out = []
        for s, e in self.iv:
            if e <= a:
                continue
            if s >= b:
                break
            if s > a:
                out.append((a, s))
            a = max(a, e)
            if a >= b:
                return out
        if a < b:
            out.append((a, b))
        return out

    def add(self, a, b):
        iv, merged = self.iv, []
        i = 0
        while i < len(iv) and iv[i][1] < a:
            merged.append(iv[i])
            i += 1
        while i < len(iv) and iv[i][0] <= b:
            a, b = min(a, iv[i][0]), max(b, iv[i][1])
            i += 1
        merged.append((a, b))
        merged.extend(iv[i:])
        self.iv = merged


def schedule(plan, counts, total, alias, fetch, flush):
    """(fetches, flushes): for every executor pass c, the element ranges (name, start, stop) to
    copy device -> host before it (read before anything wrote them, in buffers named in `fetch`)
    and those whose last write happens in it (buffers named in `flush`). `counts` and `total`
    are the executor's chunk layout of `plan` (topology/walk.layout); `alias` maps "in" to
    "out" when they are one buffer. Reads of a stage see the writes of earlier stages; the ops
    of a stage are independent (the plan contract, topology/plan.py)."""
    reads_src = (SEND, COPY, RECV_REDUCE, RECV_REDUCE_SEND)
    seen = {n: _Ranges() for n in fetch}
    fetches = [[] for _ in range(total)]
    writes = []
    for c, stages in iter_passes(plan, counts, total):
        for _si, steps in stages:
            wrote = []
            for s in steps:
                kind = s.op.kind
                if kind in reads_src:
                    r = s.src
                    name = alias.get(r.buf, r.buf)
                    if name in seen and r.stop > r.start:
                        for a, b in seen[name].missing(r.start, r.stop):
                            fetches[c].append((name, a, b))
                            seen[name].add(a, b)
                if kind != SEND and s.dst is not None:
                    wrote.append(s.dst)
            for r in wrote:
                name = alias.get(r.buf, r.buf)
                if r.stop <= r.start:
                    continue
                if name in seen:
                    seen[name].add(r.start, r.stop)
                if name in flush:
                    writes.append((c, name, r.start, r.stop))
    flushes = [[] for _ in range(total)]
    painted = {n: _Ranges() for n in flush}
    for c, name, a, b in reversed(writes):
        for x, y in painted[name].missing(a, b):
            flushes[c].append((name, x, y))
            painted[name].add(x, y)
    return fetches, [_merge(f) for f in flushes]


def _merge(ranges):
    """Adjacent ranges of one buffer as one (fewer, larger copies)."""
    out = []
    for name, a, b in sorted(ranges):
        if out and out[-1][0] == name and out[-1][2] == a:
            out[-1] = (name, out[-1][1], b)
        else:
            out.append((name, a, b))
    return out


def _groups(fetches, itemsize, group_bytes):
    """The fetches cut into copy groups, each followed by one event the host waits for:
    [(first pass that needs it, merged ranges, bytes)]. The first group is the first fetching
    pass alone (the network waits for it); later groups double in size up to `group_bytes`."""
    groups, cur, first, size, target = [], [], None, 0, 0
    for c, f in enumerate(fetches):
        if not f:
            continue
        if not cur:
            first = c
        cur.extend(f)
        size += sum(b - a for _, a, b in f) * itemsize
        if size >= target:
            groups.append((first, _merge(cur), size))
            target = min(group_bytes, 2 * max(size, target))
            cur, size = [], 0
    if cur:
        groups.append((first, _merge(cur), size))
    return groups
