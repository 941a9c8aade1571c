"""The API edge: each public call's arguments checked once and described as a `Call`.

Everything a caller can get wrong (dtype, sizes, contiguity, a root or peer out of range,
mixed devices, splits that do not add up) raises `InvalidArgument` here, before any engine
is chosen and before any byte moves. One function per public call, each returning the
`Call` the engines are priced on and run (ccl/call.py).

A repeated all_reduce of the same small host array is checked once: the Calls made for the last
two are remembered (`Validator.all_reduce`) and handed out again while the array has the size,
dtype, contiguity and writability it was checked with (an 8-byte all_reduce is mostly
Python time; bench/small_breakdown.py). The contents are not the Call's business; a changed
array, op or async_op is checked again and raises what it would have raised.
"""
import numpy as np

from .buffers import Buffer, as_buffer, same_dtype
from .call import Call
from .cuda_buffers import is_cuda
from .dtypes import ReduceOp, as_op, check_op_dtype, dtype_name, on_bfloat16
from .engines.reproducible import takes
from .errors import InvalidArgument
from .reduce import _DTYPE_CODE

# numpy dtypes the short form of all_reduce describes without as_buffer (bool: MIN/MAX only);
# bfloat16 joins when ml_dtypes loads
_PLAIN = {dt: dtype_name(dt) for dt in _DTYPE_CODE}
on_bfloat16(lambda dt: _PLAIN.__setitem__(dt, "bfloat16"))
#: the last two all_reduce Calls are remembered for arrays of at most AGAIN_BYTES (they hold the
#: arrays); two, so that a loop on one array that also reduces a new one (a timing, a flag) each
#: time keeps its own
AGAIN_BYTES = 64 << 10
_NOTHING = object()


class Validator:
    """The checks of one communicator (its size and rank, its reproducible setting)."""

    def __init__(self, rank: int, size: int, reproducible: bool):
        self.rank, self.size, self.reproducible = rank, size, reproducible
        self._again = self._again2 = (_NOTHING,)   # (array, op, size, dtype, Call): the last, the one before

    # ---- pieces --------------------------------------------------------------------------
    @staticmethod
    def kind(name, *bufs) -> str:
        """"cpu" or "cuda": every buffer of one call on one device."""
        devs = {b.device for b in bufs if b is not None}
        if devs == {"cpu"} or not devs:
            return "cpu"
        if "cpu" in devs:
            raise InvalidArgument(f"{name}: buffers are on {sorted(devs)}; all of one call's buffers must be on "
                                  f"the same device")
        if len(devs) != 1:
            raise InvalidArgument(f"{name}: buffers are on several GPUs {sorted(devs)}; one GPU per rank")
        return "cuda"

    def root(self, root, what) -> int:
        if not isinstance(root, (int, np.integer)) or not 0 <= root < self.size:
            raise InvalidArgument(f"{what}: root {root!r} is outside 0..{self.size - 1}")
        return int(root)

    def peer(self, peer, what) -> int:
        if not isinstance(peer, (int, np.integer)) or not 0 <= peer < self.size or peer == self.rank:
            raise InvalidArgument(f"{what}: peer {peer!r} must be another rank in 0..{self.size - 1} "
                                  f"(this is rank {self.rank})")
        return int(peer)

    @staticmethod
    def reduction(x, op, what):
        buf = as_buffer(x, f"{what}: tensor", writable=True)
        op = as_op(op)
        check_op_dtype(op, buf.dtype, what)
        return buf, op

    def splits(self, splits, count, name, argname):
        if splits is None:
            if count % self.size:
                raise InvalidArgument(f"all_to_all: {name} holds {count} elements, not divisible by "
                                      f"size {self.size}; pass {argname}")
            return (count // self.size,) * self.size
        splits = tuple(int(s) for s in splits)
        if len(splits) != self.size or any(s < 0 for s in splits):
            raise InvalidArgument(f"all_to_all: {argname} must be {self.size} non-negative counts, got {splits}")
        if sum(splits) != count:
            raise InvalidArgument(f"all_to_all: {argname} add up to {sum(splits)} but the {name} "
                                  f"holds {count} elements")
        return splits

    def _in_place(self, name, buf, op, async_op, root=-1) -> Call:
        return Call(name, buf, buf, kind=self.kind(name, buf), dtype=buf.dtype, count=buf.count, root=root,
                    redop=op, nbytes=buf.nbytes, reproducible=self.reproducible and takes(buf.dtype, op),
                    async_op=async_op)

    # ---- the public calls ----------------------------------------------------------------
    def all_reduce(self, x, op, async_op) -> Call:
        again = self._again
        if x is not again[0] and x is self._again2[0]:      # the one before: now the last
            again, self._again2 = self._again2, again
            self._again = again
        # the same array (held, so not another at its address), op, size and dtype object: the
        # same memory in the same order while it is still contiguous (the Call's flat view of it
        # stays right even if its shape was changed) and writable
        if x is again[0] and op is again[1] and x.size == again[2] and x.dtype is again[3] and not async_op:
            flags = x.flags
            if flags.c_contiguous and flags.writeable:
                return again[4]
        if type(x) is np.ndarray:
            xdt = x.dtype
            dt = _PLAIN.get(xdt)
            flags = x.flags
            if dt is not None and flags.c_contiguous and flags.writeable:
                # the common call, described without as_buffer's generality (latency of small calls)
                given = op
                if type(op) is not ReduceOp:
                    op = as_op(op)
                check_op_dtype(op, dt, "all_reduce")
                buf = Buffer(x if x.ndim == 1 else x.reshape(-1), dt, "cpu", x)
                n, nbytes = x.size, x.nbytes
                call = Call("all_reduce", buf, buf, "cpu", dt, n, nbytes, op, -1, self.reproducible and takes(dt, op),
                            async_op)
                if nbytes <= AGAIN_BYTES and n and not async_op:
                    if x is not again[0]:
                        self._again2 = again
                    self._again = (x, given, n, xdt, call)
                return call
        buf, op = self.reduction(x, op, "all_reduce")
        return self._in_place("all_reduce", buf, op, async_op)

    def reduce(self, x, root, op, async_op) -> Call:
        buf, op = self.reduction(x, op, "reduce")
        return self._in_place("reduce", buf, op, async_op, root=self.root(root, "reduce"))

    def broadcast(self, x, root, async_op) -> Call:
        buf = as_buffer(x, "broadcast: tensor", writable=True)
        root = self.root(root, "broadcast")
        return Call("broadcast", buf, buf, kind=self.kind("broadcast", buf), dtype=buf.dtype, count=buf.count,
                    root=root, nbytes=buf.nbytes, async_op=async_op)

    def all_gather(self, out, inp, async_op) -> Call:
        o = as_buffer(out, "all_gather: output", writable=True)
        i = as_buffer(inp, "all_gather: input")
        same_dtype(o, i, "all_gather")
        if o.count != i.count * self.size:
            raise InvalidArgument(f"all_gather: output holds {o.count} elements, expected size "
                                  f"{self.size} x input {i.count} = {i.count * self.size}")
        return Call("all_gather", i, o, kind=self.kind("all_gather", o, i), dtype=i.dtype, count=i.count,
                    nbytes=o.nbytes, async_op=async_op)

    def reduce_scatter(self, out, inp, op, async_op) -> Call:
        o, op = self.reduction(out, op, "reduce_scatter")
        i = as_buffer(inp, "reduce_scatter: input")
        same_dtype(o, i, "reduce_scatter")
        if i.count != o.count * self.size:
            raise InvalidArgument(f"reduce_scatter: input holds {i.count} elements, expected size "
                                  f"{self.size} x output {o.count} = {o.count * self.size}")
        return Call("reduce_scatter", i, o, kind=self.kind("reduce_scatter", o, i), dtype=o.dtype, count=o.count,
                    redop=op, nbytes=i.nbytes, reproducible=self.reproducible and takes(o.dtype, op),
                    async_op=async_op)

    def all_to_all(self, out, inp, out_splits, in_splits, async_op) -> Call:
        """Equal pieces only when no splits are given (MPI's Alltoall vs Alltoallv): a rank sees
        only its own splits, and equal ones on one rank say nothing about its peers', so
        deciding from them could split the ranks between two engines (a hang, found by
        test_uneven_all_to_all_p2p_barrier). CUDA int tensors as splits stay on the device."""
        o = as_buffer(out, "all_to_all: output", writable=True)
        i = as_buffer(inp, "all_to_all: input")
        same_dtype(o, i, "all_to_all")
        even = in_splits is None and out_splits is None
        dev = is_cuda(in_splits) or is_cuda(out_splits)
        if not dev:
            in_splits = self.splits(in_splits, i.count, "input", "in_splits")
            out_splits = self.splits(out_splits, o.count, "output", "out_splits")
        call = Call("all_to_all", i, o, kind=self.kind("all_to_all", o, i), dtype=i.dtype, count=i.count,
                    nbytes=i.nbytes, async_op=async_op)
        if dev and call.kind != "cuda":
            raise InvalidArgument("all_to_all: split sizes in CUDA tensors need CUDA buffers; pass the splits "
                                  "as lists for host memory")
        call.in_splits, call.out_splits, call.even, call.dev_splits = in_splits, out_splits, even, dev
        return call

    def gather(self, out, inp, root, async_op) -> Call:
        root = self.root(root, "gather")
        i = as_buffer(inp, "gather: input")
        o = None
        if self.rank == root:
            o = as_buffer(out, "gather: output", writable=True)
            same_dtype(o, i, "gather")
            if o.count != i.count * self.size:
                raise InvalidArgument(f"gather: output at the root holds {o.count} elements, "
                                      f"expected {self.size} x {i.count}")
        return Call("gather", i, o, kind=self.kind("gather", i, o), dtype=i.dtype, count=i.count, root=root,
                    nbytes=i.nbytes, async_op=async_op)

    def scatter(self, out, inp, root, async_op) -> Call:
        root = self.root(root, "scatter")
        o = as_buffer(out, "scatter: output", writable=True)
        i = None
        if self.rank == root:
            i = as_buffer(inp, "scatter: input")
            same_dtype(o, i, "scatter")
            if i.count != o.count * self.size:
                raise InvalidArgument(f"scatter: input at the root holds {i.count} elements, "
                                      f"expected {self.size} x {o.count}")
        return Call("scatter", i, o, kind=self.kind("scatter", o, i), dtype=o.dtype, count=o.count, root=root,
                    nbytes=o.nbytes, async_op=async_op)

    def send(self, x, peer, async_op) -> Call:
        peer = self.peer(peer, "send")
        b = as_buffer(x, "send: tensor")
        call = Call("send", b, None, kind=self.kind("send", b), dtype=b.dtype, count=b.count, nbytes=b.nbytes,
                    async_op=async_op)
        call.peer = peer
        return call

    def recv(self, x, peer, async_op) -> Call:
        peer = self.peer(peer, "recv")
        b = as_buffer(x, "recv: tensor", writable=True)
        call = Call("recv", None, b, kind=self.kind("recv", b), dtype=b.dtype, count=b.count, nbytes=b.nbytes,
                    async_op=async_op)
        call.peer = peer
        return call

    @staticmethod
    def barrier(async_op) -> Call:
        return Call("barrier", async_op=async_op)
