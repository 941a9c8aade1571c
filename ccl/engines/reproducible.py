"""Reproducible mode: SUM/AVG of floating-point data with the same bytes whatever runs it.

Floating-point addition is not associative, so a sum's last bits depend on the order the
ranks' contributions meet, and that order changes with the algorithm (ring, tree,
halving-doubling, hierarchical, the shm one-shot/two-shot, the CUDA kernels), the chunk size
and how the ranks are spread over hosts. With ``PYCCL_REPRODUCIBLE=1`` (or
``Communicator(reproducible=True)`` / ``pyccl.init(reproducible=True)``), all_reduce, reduce
and reduce_scatter with SUM or AVG on float16, bfloat16, float32 and float64 give bytes that
depend only on the ranks' inputs in rank order. Every rank of a communicator must use the
same setting (the mode changes which collectives run underneath).

The result, element by element: ``round(((x_0 + x_1) + x_2) + ... + x_{N-1})`` for SUM and
``round((...) / N)`` for AVG, where the additions (and the division) run left to right in
rank order 0..N-1 in a wider type — float32 for float16/bfloat16, float64 for float32 and
float64 — and ``round`` is one rounding to the dtype, to nearest-even. So float16, bfloat16
and float32 results are the float64-like exact sum rounded once whenever the wide sum is
exact (and very close to it otherwise); float64 is the plain left-to-right float64 sum. A NaN
result is always the canonical quiet NaN (``0x7e00``, ``0x7fc0``, ``0x7fc00000``,
``0x7ff8000000000000``), since which NaN payload survives an addition differs between CPUs
and GPUs. Integers and MIN/MAX/PROD are not touched: integer SUM is exact (wrapping), and
MIN/MAX do not depend on order.

How (chosen because it reuses what every engine already does fast, and needs nothing from
the plans): ``all_reduce = all_to_all + ordered sum + all_gather``. The all_to_all hands rank
r every rank's contribution to shard r (a ``size x shard`` scratch, row i from rank i); rank
r adds the rows in rank order in the wide type and rounds once (native/reduce.c
``pyccl_sum_ptrs``, or :func:`sum_rows_numpy`, its twin); the all_gather spreads the shards.
The two data-movement collectives go through whatever the communicator uses for them
(executor plans over shm/TCP/ibverbs, CUDA copy engines), and moving bytes is exact, so the
result cannot depend on the engine. On one host the shm C collectives already gather every
rank's part of a slice and reduce it in rank order, so there the wide sum runs inside them
(op codes SUM_WIDE/AVG_WIDE of native/shm.c's reduce_in_order): no extra copy, and about the
default mode's speed. reduce_scatter is the first two steps; reduce is an all_reduce (of a
scratch copy on the non-roots; the shm path leaves them alone). The alternative, an
order-independent exact accumulator (Demmel-Nguyen binned sums), would let plans keep their
trees but carries 3-6 words per element through every step and needs its own kernels on every
engine, CUDA included; the canonical order costs at most one extra pass over the data
(bench/RESULTS.md, "Reproducible mode"). The scratch (about twice the largest message) is
kept by the communicator.

On CUDA buffers the same steps run stream-ordered on the caller's stream, the sum as torch ops
(cupy arrays as torch views through DLPack, on cupy's stream), one element-wise add per row in the same wide type, so GPU
results equal CPU results bit for bit (tests/test_reproducible.py, run on an H200).
"""
import numpy as np

from pyccl.topology import direct

from ..buffers import as_buffer
from ..call import Call
from ..dtypes import AVG, SUM
from ..errors import InvalidArgument
from ..reduce import _DTYPE_CODE, USE_NATIVE, _from_buffer, _lib
from .base import EngineBase, Enqueued

FLOATS = frozenset({"float16", "bfloat16", "float32", "float64"})
#: the wide type the rows are added in
WIDE = {"float16": np.float32, "bfloat16": np.float32, "float32": np.float64, "float64": np.float64}
#: the canonical NaN of each dtype, as the unsigned integer of its bytes
NAN_BITS = {"float16": 0x7E00, "bfloat16": 0x7FC0, "float32": 0x7FC00000, "float64": 0x7FF8000000000000}
_UINT = {2: np.uint16, 4: np.uint32, 8: np.uint64}


def takes(dtype: str, op) -> bool:
    """Whether reproducible mode changes this reduction (float SUM/AVG)."""
    return dtype in FLOATS and (op is SUM or op is AVG)


# ---- the ordered sum: C kernel, numpy/cupy twin, torch twin ---------------------------------------
def sum_rows_numpy(out, rows, divisor=1):
    """out[:] = round(sum of rows[0..N-1] in order, in the wide type, / divisor); NaN canonical.
    rows: (N, n) numpy array of the dtype."""
    name = out.dtype.name
    wide = WIDE[name]
    with np.errstate(all="ignore"):             # overflow and inf - inf are results here
        acc = rows[0].astype(wide)
        for r in range(1, rows.shape[0]):
            np.add(acc, rows[r].astype(wide), out=acc)
        if divisor > 1:
            np.divide(acc, np.asarray(divisor, dtype=wide), out=acc)
        out[...] = acc.astype(out.dtype)
    bad = np.isnan(acc)
    out.view(_UINT[out.itemsize])[bad] = NAN_BITS[name]
    return out


def sum_rows(out, rows, divisor=1):
    """rows: C-contiguous (N, n) numpy array.  sum_rows_numpy with the C core when it is built
    (same bytes; tests check it)."""
    if out.size == 0:
        return out
    if not USE_NATIVE:
        return sum_rows_numpy(out, rows, divisor)
    _lib.pyccl_sum_rows(_from_buffer(out), _from_buffer(rows), rows.shape[0], rows.shape[1], out.size,
                        _DTYPE_CODE[out.dtype], int(divisor))
    return out


def sum_rows_torch(out, rows, divisor=1):
    """The torch twin (CUDA tensors): the same adds in the same wide type, IEEE on the GPU
    (an explicit loop of element-wise adds, never a tree-ordered torch.sum)."""
    import torch
    wide = torch.float32 if out.dtype in (torch.float16, torch.bfloat16) else torch.float64
    acc = rows[0].to(wide)
    for r in range(1, rows.shape[0]):
        acc.add_(rows[r].to(wide))
    if divisor > 1:
        # a device tensor, not a Python scalar: torch turns `x / scalar` into x * (1/scalar)
        acc.div_(torch.full((1,), divisor, dtype=wide, device=acc.device))
    out.copy_(acc.to(out.dtype))
    ints = {2: torch.int16, 4: torch.int32, 8: torch.int64}[out.element_size()]
    bits = NAN_BITS[str(out.dtype).replace("torch.", "")]
    if bits >= 1 << (8 * out.element_size() - 1):
        bits -= 1 << (8 * out.element_size())
    out.view(ints).masked_fill_(torch.isnan(acc), bits)
    return out


# ---- CPU: one call, run on the shm C collectives or the flat engine's plans --------------------
_SUM_WIDE, _AVG_WIDE = 4, 5          # native/reduce.h: op codes of the shm collectives' wide sum
OPS = frozenset({"all_reduce", "reduce", "reduce_scatter"})


class Reproducible(EngineBase):
    """Reproducible mode on host memory: the only engine that takes a reproducible call
    (`call.reproducible`: float SUM/AVG in reproducible mode), so its price is nominal. It
    wraps the engine that moves the bytes: the shm C collectives on one host (which do the
    wide sum themselves), else the flat engine's all_to_all and all_gather plans."""
    name = "reproducible"
    ops = OPS
    reproducible = True

    def __init__(self, res, shm, flat):
        self.res, self.shm, self.flat = res, shm, flat
        self._scratches = {}

    def takes(self, call) -> bool:
        return call.reproducible and EngineBase.takes(self, call)

    def price(self, call):
        return 0.0

    def run_all_reduce(self, call, what):
        self._all_reduce(call.out.array, call.redop, what)

    def run_reduce(self, call, what):
        self._all_reduce(call.out.array, call.redop, what, call.root)

    def run_reduce_scatter(self, call, what):
        self._reduce_scatter(call.out.array, call.inp.array, call.redop, what)

    # -- steps --
    def _local(self, opname):
        shm = self.shm
        return shm if shm is not None and shm.enabled and opname in shm.ops else None

    def _shm(self, opname, arr, op, what, call):
        """One host with the shm C collectives: they reduce every rank's part in rank order
        anyway, so the wide sum runs inside them (op code SUM_WIDE/AVG_WIDE): no extra copy.
        True if taken."""
        local = self._local(opname)
        if local is None or not USE_NATIVE:
            return False
        local._check(what)
        if arr.size:
            rc = call(local, _DTYPE_CODE[arr.dtype], _AVG_WIDE if op is AVG else _SUM_WIDE)
            if rc:
                local._fail(rc, what, opname)
        return True

    def _scratch(self, key, nbytes, dtype, like=None):
        """A cached scratch array (page faults of fresh memory would cost more than the
        copies), holding a copy of `like` if given."""
        buf = self._scratches.get(key)
        if buf is None or buf.nbytes < nbytes:
            buf = self._scratches[key] = np.empty(max(nbytes, 64), np.uint8)
        out = buf[:nbytes].view(dtype)
        if like is not None:
            out[:] = like
        return out

    def _all_to_all(self, out, inp, what):
        """Equal-split all_to_all of flat numpy arrays, inside this call."""
        local = self._local("all_to_all")
        if local is not None:
            return local.all_to_all(out, inp, what)
        r = self.res
        splits = (inp.size // r.size,) * r.size
        plan = self.flat.plan(("all_to_all", splits, splits), lambda: direct.all_to_all(r.rank, r.size, splits, splits))
        self.flat.walk(what, plan, {"in": inp, "out": out})

    def _all_gather(self, out, inp, what):
        local = self._local("all_gather")
        if local is not None:
            return local.all_gather(out, inp, what)
        self.flat.walk(what, self.flat.tuned("all_gather", inp.size, inp.itemsize, out.nbytes), {"in": inp, "out": out})

    def _reduce_scatter(self, out, inp, op, what):
        """out = ordered sum of block `rank` of every rank's inp (inp: size x out.size)."""
        n, size = out.size, self.res.size
        if n == 0 or self._shm("reduce_scatter", out, op, what, lambda local, dt, code: _lib.pyccl_coll_reduce_scatter(
                local._c, _from_buffer(out), _from_buffer(inp), n, dt, code, local.timeout)):
            return
        rows = self._scratch("rows", inp.nbytes, inp.dtype)
        if size > 1:
            self._all_to_all(rows, inp, what)
        else:
            rows[:] = inp
        sum_rows(out, rows.reshape(size, n), size if op is AVG else 1)

    def _all_reduce(self, x, op, what, root=-1):
        """In place; with root >= 0 only the root's x changes (reduce)."""
        n, size = x.size, self.res.size
        if n == 0 or self._shm("all_reduce" if root < 0 else "reduce", x, op, what,
                               lambda local, dt, code: _lib.pyccl_coll_all_reduce(
                                   local._c, _from_buffer(x), _from_buffer(x), n, dt, code, root, local.timeout)):
            return
        if root >= 0 and self.res.rank != root:
            x = self._scratch("reduce", x.nbytes, x.dtype, x)
        shard = -(-n // size)
        if n == shard * size:
            src = x
        else:
            src = self._scratch("pad", shard * size * x.itemsize, x.dtype)
            src[:n] = x
            src[n:] = 0
        mine = self._scratch("shard", shard * x.itemsize, x.dtype)
        self._reduce_scatter(mine, src, op, what)
        if size == 1:
            x[:] = mine
            return
        self._all_gather(src, mine, what)
        if src is not x:
            x[:] = src[:n]


# ---- CUDA: a composite of stream-ordered calls on the caller's stream ---------------------------
def _on_callers_stream(fn, *objs):
    """fn(*torch tensors) on the caller's stream. A cupy array is viewed as a torch tensor
    (zero-copy, DLPack) and fn runs with cupy's current stream as torch's current stream, so the
    sum, the scratch and pyccl's own exchanges all see torch tensors on one stream, whatever the
    caller used. (Summing torch views of cupy arrays while the scratch stayed cupy-allocated gave
    float32 results that differed from the CPU's now and then on an H100/H200; cupy's own
    element-wise ops did not give the numpy twin's bytes for float32 AVG.)"""
    if type(objs[0]).__module__.startswith("torch"):
        return fn(*objs)
    import cupy
    try:
        import torch
    except ImportError:
        raise InvalidArgument("reproducible mode on cupy arrays needs torch (its sum runs as torch ops)") from None
    dev = objs[0].device.id
    ptr = cupy.cuda.get_current_stream().ptr
    # cupy's default current stream is the legacy null stream (ptr 0); torch.cuda.ExternalStream(0)
    # is not that stream (seen on an H100, torch 2.11: its cuda_stream was another handle, so a
    # cupy-side synchronize did not wait for the sum). Take torch's own default stream for it.
    if ptr == 0:
        stream = torch.cuda.default_stream(dev)
    else:
        stream = torch.cuda.ExternalStream(ptr, device=torch.device("cuda", dev))
    with torch.cuda.device(dev), torch.cuda.stream(stream):
        return fn(*(torch.from_dlpack(o) for o in objs))


def _zeros(like, n):
    import torch
    return torch.zeros(n, dtype=like.dtype, device=like.device)


class ReproducibleCuda(EngineBase):
    """Reproducible mode on device memory: all_to_all and all_gather as calls of their own
    (each priced, chosen and queued like a user's: `choose` and `queue` are the communicator's
    registry and queue), the ordered wide sum as torch ops between them, all on the caller's
    stream. A composite: it runs on the caller's thread, outside the queue."""
    name = "reproducible_cuda"
    kinds = ("cuda",)
    ops = OPS
    reproducible = True
    composite = True

    def __init__(self, res, choose):
        self.res, self.choose = res, choose

    def takes(self, call) -> bool:
        return call.reproducible and EngineBase.takes(self, call)

    def price(self, call):
        return 0.0

    def _sub(self, op, out, inp):
        """One equal-piece all_to_all or all_gather of torch tensors, through the queue."""
        o, i = as_buffer(out, f"{op}: output", writable=True), as_buffer(inp, f"{op}: input")
        size = self.res.size
        sub = Call(op, i, o, kind="cuda", dtype=i.dtype, count=i.count,
                   nbytes=o.nbytes if op == "all_gather" else i.nbytes)
        if op == "all_to_all":
            sub.in_splits = (i.count // size,) * size
            sub.out_splits = (o.count // size,) * size
        return self.res.queue.submit(sub, self.choose(sub))

    def _reduce_scatter(self, out, inp, op):
        rows, size = inp, self.res.size
        if size > 1:
            rows = _zeros(inp, inp.shape[0])
            self._sub("all_to_all", rows, inp)
        sum_rows_torch(out, rows.view(size, -1), size if op is AVG else 1)

    def _all_reduce(self, t, op):
        flat = t.view(-1)
        n, size = flat.shape[0], self.res.size
        if n == 0:
            return
        shard = -(-n // size)
        src = flat if n == shard * size else _zeros(flat, shard * size)
        if src is not flat:
            src[:n] = flat
        mine = _zeros(flat, shard)
        self._reduce_scatter(mine, src, op)
        if size == 1:
            flat[:] = mine
            return
        self._sub("all_gather", src, mine)
        if src is not flat:
            flat[:] = src[:n]

    def run(self, call, what):
        op, rank = call.redop, self.res.rank
        if call.op == "all_reduce":
            _on_callers_stream(lambda t: self._all_reduce(t, op), call.out.obj)
        elif call.op == "reduce":          # all_reduce at the root; the others reduce a copy
            _on_callers_stream(lambda t: self._all_reduce(t if rank == call.root else t.clone(), op), call.out.obj)
        else:
            def fn(o, i):
                if o.numel():
                    self._reduce_scatter(o.view(-1), i.view(-1), op)
            _on_callers_stream(fn, call.out.obj, call.inp.obj)
        return Enqueued(None, what) if call.async_op else None
