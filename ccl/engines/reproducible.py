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

from ..dtypes import AVG, SUM
from ..errors import InvalidArgument
from ..reduce import _DTYPE_CODE, USE_NATIVE, _from_buffer, _lib

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


# ---- CPU: one submitted call, the engines the communicator would pick for each step ------------
_SUM_WIDE, _AVG_WIDE = 4, 5          # native/reduce.h: op codes of the shm collectives' wide sum


def _shm(comm, opname, arr, op, what, call):
    """One host with the shm C collectives: they reduce every rank's part in rank order anyway,
    so the wide sum runs inside them (op code SUM_WIDE/AVG_WIDE): no extra copy. True if taken."""
    local = comm._local_for(opname, arr.nbytes)
    if local is None or not USE_NATIVE:
        return False
    local._check(what)
    if arr.size:
        rc = call(local, _DTYPE_CODE[arr.dtype], _AVG_WIDE if op is AVG else _SUM_WIDE)
        if rc:
            local._fail(rc, what, opname)
    return True


def _scratch(comm, key, nbytes, dtype, like=None):
    """A cached scratch array (page faults of fresh memory would cost more than the copies),
    holding a copy of `like` if given."""
    cache = comm.__dict__.setdefault("_repro_scratch", {})
    buf = cache.get(key)
    if buf is None or buf.nbytes < nbytes:
        buf = cache[key] = np.empty(max(nbytes, 64), np.uint8)
    out = buf[:nbytes].view(dtype)
    if like is not None:
        out[:] = like
    return out


def _all_to_all(comm, out, inp, what):
    """Equal-split all_to_all of flat numpy arrays, inside an already submitted call."""
    local = comm._local_for("all_to_all", inp.nbytes)
    if local is not None:
        return local.all_to_all(out, inp, what)
    from pyccl.topology import direct
    splits = (inp.size // comm.size,) * comm.size
    plan = comm._plan(("all_to_all", splits, splits), lambda: direct.all_to_all(comm.rank, comm.size, splits, splits))
    comm._run(what, plan, {"in": inp, "out": out})


def _all_gather(comm, out, inp, what):
    local = comm._local_for("all_gather", out.nbytes)
    if local is not None:
        return local.all_gather(out, inp, what)
    comm._run(what, comm._tuned("all_gather", inp.size, inp.itemsize, out.nbytes), {"in": inp, "out": out})


def _reduce_scatter_cpu(comm, out, inp, op, what):
    """out = ordered sum of block `rank` of every rank's inp (inp: size x out.size)."""
    n = out.size
    if n == 0 or _shm(comm, "reduce_scatter", out, op, what, lambda local, dt, code: _lib.pyccl_coll_reduce_scatter(
            local._c, _from_buffer(out), _from_buffer(inp), n, dt, code, local.timeout)):
        return
    rows = _scratch(comm, "rows", inp.nbytes, inp.dtype)
    if comm.size > 1:
        _all_to_all(comm, rows, inp, what)
    else:
        rows[:] = inp
    sum_rows(out, rows.reshape(comm.size, n), comm.size if op is AVG else 1)


def _all_reduce_cpu(comm, x, op, what, root=-1):
    """In place; with root >= 0 only the root's x changes (reduce)."""
    n, size = x.size, comm.size
    if n == 0 or _shm(comm, "all_reduce" if root < 0 else "reduce", x, op, what,
                      lambda local, dt, code: _lib.pyccl_coll_all_reduce(
                          local._c, _from_buffer(x), _from_buffer(x), n, dt, code, root, local.timeout)):
        return
    if root >= 0 and comm.rank != root:
        x = _scratch(comm, "reduce", x.nbytes, x.dtype, x)
    shard = -(-n // size)
    if n == shard * size:
        src = x
    else:
        src = _scratch(comm, "pad", shard * size * x.itemsize, x.dtype)
        src[:n] = x
        src[n:] = 0
    mine = _scratch(comm, "shard", shard * x.itemsize, x.dtype)
    _reduce_scatter_cpu(comm, mine, src, op, what)
    if size == 1:
        x[:] = mine
        return
    _all_gather(comm, src, mine, what)
    if src is not x:
        x[:] = src[:n]


# ---- CUDA: the public collectives, stream-ordered on the caller's stream ----------------------
def _enqueued(what):
    """The Work of an async_op call: everything is already queued on the caller's stream."""
    from .cuda.submit import Enqueued      # not at the top: that package imports this one
    return Enqueued(None, what)


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


def _reduce_scatter_cuda(comm, out, inp, op):
    rows = inp
    if comm.size > 1:
        rows = _zeros(inp, inp.shape[0])
        comm.all_to_all(rows, inp)
    sum_rows_torch(out, rows.view(comm.size, -1), comm.size if op is AVG else 1)


def _all_reduce_cuda(comm, t, op):
    flat = t.view(-1)
    n, size = flat.shape[0], comm.size
    if n == 0:
        return
    shard = -(-n // size)
    src = flat if n == shard * size else _zeros(flat, shard * size)
    if src is not flat:
        src[:n] = flat
    mine = _zeros(flat, shard)
    _reduce_scatter_cuda(comm, mine, src, op)
    if size == 1:
        flat[:] = mine
        return
    comm.all_gather(src, mine)
    if src is not flat:
        flat[:] = src[:n]


# ---- entry points from the communicator (its buffers already validated) -----------------------
def all_reduce(comm, buf, op, async_op):
    if buf.device != "cpu":
        _on_callers_stream(lambda t: _all_reduce_cuda(comm, t, op), buf.obj)
        return _enqueued("all_reduce") if async_op else None

    def fn(what):
        _all_reduce_cpu(comm, buf.array, op, what)
    return comm._submit("all_reduce", fn, async_op, _sig(buf, -1, op))


def reduce(comm, buf, root, op, async_op):
    """all_reduce at the root; the other ranks reduce a copy and keep their input."""
    if buf.device != "cpu":
        _on_callers_stream(lambda t: _all_reduce_cuda(comm, t if comm.rank == root else t.clone(), op),
                           buf.obj)
        return _enqueued("reduce") if async_op else None

    def fn(what):
        _all_reduce_cpu(comm, buf.array, op, what, root)
    return comm._submit("reduce", fn, async_op, _sig(buf, root, op))


def reduce_scatter(comm, out, inp, op, async_op):
    if out.device != "cpu":
        def fn(o, i):
            if o.numel():
                _reduce_scatter_cuda(comm, o.view(-1), i.view(-1), op)
        _on_callers_stream(fn, out.obj, inp.obj)
        return _enqueued("reduce_scatter") if async_op else None

    def fn(what):
        _reduce_scatter_cpu(comm, out.array, inp.array, op, what)
    return comm._submit("reduce_scatter", fn, async_op, _sig(out, -1, op))


def _sig(buf, root, op):
    return {"dtype": buf.dtype, "count": buf.count, "root": root, "redop": op.name}
