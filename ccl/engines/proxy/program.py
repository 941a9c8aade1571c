"""One collective's shape on the proxy: what the kernel copies and what the proxy waits for.

A program is made once per shape (op, dtype, sizes, root, reduction, splits) and kept: eager
calls of that shape and every replay of a CUDA graph that captured one reuse it, so the host
computes nothing per call and a captured launch stays valid. It holds

* the plan and chunk the communicator's CPU path would use (the staged engine's builders,
  ccl/engines/staged.py), walked by the executor on the arena;
* the arena layout: one region per buffer the plan names ("in", "out"), and "avg" for an
  average, whose division happens on the host while the sum may still be sent on;
* the copy table (``table``): out-items (device -> arena, in the order the passes first read
  them, cut into pieces of at most ``piece`` bytes so that several thread blocks share a
  range) then in-items (arena -> device, each tagged with the pass that finalises it);
* per pass c, ``need[c]``: how many out-items must have landed before pass c runs, and
  ``avg_ranges[c]``: the output ranges pass c finalises (divided into "avg" first);
* ``in_groups``: the in-items cut into at most GROUPS runs of whole passes, each copied back by
  one launch after one stream wait, and ``group_end``: {the last pass of a run: its group}
  for every run but the last, which the end of the network phase releases.

``apply_out`` and ``apply_in`` are the kernel's copies written in numpy: the tests run a whole
proxied collective on host memory with them (tests/test_proxy_program.py), so the tables are
checked without a GPU.
"""
import numpy as np

from pyccl.topology.walk import layout
from ..staged_schedule import _Call, schedule
from .host import GROUPS

_ALIGN = 4096
#: columns of the copy table (uint64): arena offset, device offset, bytes, (buffer << 32) | flag
ITEM = np.dtype([("host_off", "<u8"), ("dev_off", "<u8"), ("nbytes", "<u8"), ("buf_flag", "<u8")])
_BUF = {"in": 0, "out": 1}
#: limits of the words in ccl/engines/proxy/proxy.cu (FILLED, DONE)
MAX_ITEMS = 32768
MAX_PASSES = 8192


def point_to_point(comm, buf, peer: int, sending: bool):
    """The staged description (staged_schedule._Call) of a send or recv of device buffer `buf`
    (a Buffer) with `peer`: the flat engine's direct plan, "in" read from the device or "out"
    written back. `comm`: anything with rank and size."""
    from pyccl.topology import direct
    v = buf.array
    plan = direct.send_recv(comm.rank, comm.size, v.size, peer, sending)
    if sending:
        return _Call(plan, None, {"in": v}, ("in",), ())
    return _Call(plan, None, {"out": v}, (), ("out",))


def program_key(call) -> tuple:
    """What makes two calls one program: everything but the buffers' addresses (and the tag)."""
    inp, out = call.inp, call.out
    return (call.op, call.dtype, call.root, getattr(call, "peer", None), call.redop, call.in_splits,
            call.out_splits, call.even,
            inp.array.size if inp is not None else -1, out.array.size if out is not None else -1,
            inp is not None and out is not None and inp.array.ptr == out.array.ptr)


class Program:
    """See the module doc. `staged` is the staged engine's description of the call (its
    ``_Call``: plan, chunk, device views by name, fetch, flush, op, avg, inplace)."""

    def __init__(self, pid, name, staged, chunk_bytes, size, dtype, piece=1 << 19):
        self.pid, self.name = pid, name
        self.plan, self.op, self.size, self.dtype = staged.plan, staged.op, size, dtype
        views = {n: v for n, v in staged.views.items() if v is not None}
        ref = next(iter(views.values()))
        self.item = item = ref.itemsize
        self.chunk_bytes = chunk_bytes
        self.inplace = staged.inplace
        self.avg = staged.avg and "out" in staged.flush and "out" in views
        # the arena layout
        self.regions, off = {}, 0
        for n, v in views.items():
            self.regions[n] = (off, v.nbytes)
            off += -(-max(v.nbytes, 1) // _ALIGN) * _ALIGN
        if self.avg:
            self.regions["avg"] = (off, views["out"].nbytes)
            off += -(-max(views["out"].nbytes, 1) // _ALIGN) * _ALIGN
        self.arena_bytes = off
        # the walk the executor will take, and what each pass reads first / writes last
        lay = layout(self.plan, max(1, chunk_bytes // item))
        self.total = lay.total
        alias = {"in": "out"} if self.inplace else {}
        fetch = tuple(n for n in staged.fetch if n in views)
        flush = tuple(n for n in staged.flush if n in views)
        fetches, flushes = schedule(self.plan, lay.counts, lay.total, alias, fetch, flush)
        if lay.total > MAX_PASSES:
            raise ValueError(f"{name}: {lay.total} passes, more than the proxy's {MAX_PASSES}")
        rows, need = [], []
        for c in range(lay.total):
            for n, a, b in fetches[c]:
                self._cut(rows, n, n, a * item, b * item, piece, None)
            need.append(len(rows))
        self.n_out = len(rows)
        self.avg_ranges = [[] for _ in range(lay.total)]
        for c in range(lay.total):
            for n, a, b in flushes[c]:
                src = "avg" if self.avg and n == "out" else n
                if src == "avg":
                    self.avg_ranges[c].append((a, b))
                self._cut(rows, src, n, a * item, b * item, piece, c)
        self.n_in = len(rows) - self.n_out
        if len(rows) > MAX_ITEMS:
            raise ValueError(f"{name}: {len(rows)} copies, more than the proxy's {MAX_ITEMS}")
        self.need = need
        self.in_groups, self.group_end = _groups([r[3] & 0xffffffff for r in rows[self.n_out:]], GROUPS)
        self.table = np.array(rows, dtype=ITEM) if rows else np.zeros(1, dtype=ITEM)
        self.arena = None            # bound by the proxy state (ccl/engines/proxy/state.py)
        self.host = None
        self.dev_table = None

    def _cut(self, rows, region, buf, a, b, piece, flag):
        """Rows for bytes [a, b) of `buf`, staged in arena region `region`, in pieces. Out-items
        (flag None) are flagged by their own index, in-items by their pass."""
        base = self.regions[region][0]
        while a < b:
            n = min(piece, b - a)
            rows.append((base + a, a, n, (_BUF[buf] << 32) | (len(rows) if flag is None else flag)))
            a += n

    def bind(self, arena: np.ndarray):
        """Place the program in `arena` (uint8, at least arena_bytes): the executor's views."""
        self.arena = arena
        self.host = {n: arena[off:off + nbytes] for n, (off, nbytes) in self.regions.items()}

    def typed(self, dtype) -> dict:
        """{"in", "out"(, "avg")} as arrays of `dtype` over the arena, "in" aliased to "out" when
        the call is in place (the executor's convention)."""
        bufs = {n: v.view(dtype) for n, v in self.host.items()}
        if self.inplace:
            bufs["in"] = bufs["out"]
        return bufs


def _groups(passes: list, most: int):
    """Cut in-items (their passes, in order) into at most `most` runs of whole passes of about
    equal item counts: ([(first, end)] item ranges relative to the in-items, {last pass of a
    run: its group} for every run but the last)."""
    if not passes:
        return [(0, 0)], {}
    bounds = [i for i in range(1, len(passes)) if passes[i] != passes[i - 1]]
    cuts = []
    for g in range(1, min(most, len(bounds) + 1)):
        target = len(passes) * g // most
        b = next((x for x in bounds if x >= target and (not cuts or x > cuts[-1])), None)
        if b is None:
            break
        cuts.append(b)
    edges = [0] + cuts + [len(passes)]
    groups = [(edges[i], edges[i + 1]) for i in range(len(edges) - 1)]
    return groups, {passes[e - 1]: g for g, (_, e) in enumerate(groups[:-1])}


def apply_out(prog, devs: dict, upto: int, start: int = 0):
    """The kernel's device -> arena copies of out-items [start, upto), on numpy ("devs": uint8
    arrays standing for the device buffers by name)."""
    for r in prog.table[start:upto]:
        buf = "out" if r["buf_flag"] >> 32 else "in"
        h, d, n = int(r["host_off"]), int(r["dev_off"]), int(r["nbytes"])
        prog.arena[h:h + n] = devs[buf][d:d + n]


def apply_in(prog, devs: dict, pass_index: int = None, items: tuple = None):
    """The kernel's arena -> device copies, on numpy: of the in-items of pass `pass_index`
    (MODE_KERNEL), or of in-items [first, end) (`items`: a group, MODE_STREAM_IN)."""
    lo, hi = items if items is not None else (0, prog.n_in)
    for r in prog.table[prog.n_out + lo:prog.n_out + hi]:
        if pass_index is not None and int(r["buf_flag"]) & 0xffffffff != pass_index:
            continue
        buf = "out" if r["buf_flag"] >> 32 else "in"
        h, d, n = int(r["host_off"]), int(r["dev_off"]), int(r["nbytes"])
        devs[buf][d:d + n] = prog.arena[h:h + n]
