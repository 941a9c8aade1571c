"""The torch.distributed backend "pyccl": ``init_process_group(backend="pyccl")``.

    import torch.distributed as dist
    import pyccl.torch_backend              # registers "pyccl" (also done by `import pyccl`
                                            # when torch is loaded, and by torch's plugin hook)
    dist.init_process_group("pyccl")        # torchrun, env://, file://, tcp://, mpirun + env
    dist.all_reduce(t)                      # CPU tensors: behaves like Gloo
    dist.init_process_group("pyccl", device_id=torch.device("cuda", local_rank))
    dist.all_reduce(t_cuda)                 # CUDA tensors: stream-ordered like NCCL

How it plugs in
---------------
``register()`` calls ``torch.distributed.Backend.register_backend("pyccl", _create,
devices=["cpu", "cuda"])``. torch calls ``_create(store, rank, size, timeout)`` once per
process group (the default group, every ``new_group``/``new_subgroups``), handing it a
``PrefixStore`` private to that group. We build two ``pyccl.Communicator``s over that store
(keys under ``pyccl/coll`` and ``pyccl/p2p``, so nothing collides with torch's own keys or
with other groups), both with the group's ``timeout``:

* **collectives** run on the first one, in the order they are issued, on one worker thread per
  group (``async_op=True``) or inline on the caller's thread when the group is idle and the
  call is synchronous (no thread hand-off for plain ``dist.all_reduce(t)``);
* **point-to-point** (send/recv/isend/irecv/batch_isend_irecv, recv from any source) runs on
  the second one's connections, driven by ``_P2PEngine``: every message carries a small header
  (tag, byte count), sends never wait for the receiver (unexpected messages are buffered),
  receives match by (source, tag) in order — Gloo's semantics. A ring of ``isend``/``irecv``
  or ``batch_isend_irecv`` therefore never deadlocks, whatever the message size.

The process-group object is a pure-Python ``torch.distributed.ProcessGroup`` subclass; torch
uses it directly as the group (a Python class cannot subclass c10d ``Backend``), including from
C++ (DDP's reducer, functional collectives, DTensor, FSDP1/FSDP2). Works are a
``torch.distributed.Work`` subclass (``_PycclWork``): ``wait(timeout)``, ``is_completed()``,
``is_success()``, ``exception()``, ``get_future()`` (a ``torch.futures.Future`` whose value is
the output tensors, as with Gloo), ``_source_rank()`` for receives from any source.

Behaviour (written down where Gloo/NCCL differ)
-----------------------------------------------
* Tensors: CPU. Non-contiguous tensors are accepted everywhere (copied to a contiguous buffer
  and back, so a strided view reduces its own elements; Gloo ignores the strides of such views
  and reduces the wrong memory). Zero-size tensors are fine. Any dtype moves (broadcast,
  all_gather, all_to_all, gather, scatter, send/recv go as bytes), including int16,
  uint16/32/64, float8 and complex, which Gloo rejects. Sparse COO all_reduce (SUM, as Gloo;
  DDP with ``nn.Embedding(sparse=True)``) gathers every rank's indices and values and writes the
  coalesced sum in place.
* Reductions: SUM, PRODUCT, MIN, MAX, AVG, BAND, BOR, BXOR, PREMUL_SUM.
  - float16/bfloat16/float32/float64, int8/uint8/int32/int64: pyccl reduces them natively
    (float16/bfloat16 add in float32 and round once, so from 3 ranks on they can differ from
    Gloo, which rounds after every addition, in the last bit).
  - int16/uint16 reduce in int32, uint32 in int64, float8 in float32, and uint64 as int64
    (sign bit flipped for MIN/MAX); results are cast back (integers wrap as they would natively).
  - bool: SUM/BOR/MAX = logical or, PRODUCT/BAND/MIN = logical and, BXOR = parity (like Gloo,
    except that Gloo's bool SUM can leave the byte value 2 in a bool; pyccl writes 0/1).
  - BAND/BOR/BXOR on integers: exact, by gathering every rank's data and reducing locally
    (all_gather / gather / all_to_all), so they cost size x the memory of the tensor.
  - AVG on integers truncates toward zero (pyccl's and NCCL's rule; Gloo raises instead).
  - PREMUL_SUM (``dist._make_nccl_premul_sum(f)``; Gloo raises): floating types only,
    ``sum(f * x_i)``; the user's input tensors are not scaled.
  - complex: SUM, AVG and PREMUL_SUM (on the real view); others raise, like torch.
* all_gather/all_to_all lists may have uneven sizes (like NCCL; Gloo raises). ``reduce`` leaves
  non-root tensors unchanged. ``allgather_coalesced(outputs, inputs)``: ``outputs[r][k]`` is
  input ``k`` of rank ``r`` (Gloo's layout); the group methods take mixed dtypes.
* Mismatched sizes across ranks: the transports compare byte counts and raise
  ``TransportError`` ("size mismatch ...") on the rank that notices; the communicator leaves the
  reason in the store and drops its connections, so the other ranks fail at once too
  (``PeerFailure`` naming the first error) instead of waiting for the timeout. The error
  surfaces from ``wait()`` (or the synchronous call). Gloo silently returns garbage in some of
  these cases. (The shared-memory collectives of ccl/shm_collectives.py do not compare counts
  yet; ``PYCCL_CHECK=1`` makes every collective compare its signature across ranks first.)
* After such a failure, or a timeout, the group is *broken*: later collectives raise at once.
  Build a new group (``new_group``) or restart, as with NCCL.
* ``timeout`` of ``init_process_group``/``new_group`` bounds every wait of every operation
  (``opts.timeout`` of a single C++ call is not used); ``work.wait(timeout)`` additionally
  bounds one wait (raising ``pyccl.Timeout``; the operation itself keeps running until it
  finishes or the group timeout hits).
* Point-to-point: tags are honoured; ``recv(src=None)`` receives from any source and returns
  the sender; ``irecv``/``isend`` to this rank itself work. Messages are sent eagerly (no
  rendezvous), so a send completes without a matching receive having been posted; the receiver
  buffers it until one is. A receive of the wrong size fails alone with "size mismatch" (the
  message is drained; the pair stays usable). The connections are TCP (``P2P_TRANSPORT``,
  ``PYCCL_TORCH_P2P_TRANSPORT=auto`` uses shared memory on one host: about twice the bandwidth,
  but a peer that leaves early currently takes this rank's other shm connections down with it).
* ``monitored_barrier``: ``dist.monitored_barrier`` refuses every backend but Gloo (a check in
  torch itself); ``group.monitored_barrier(timeout, wait_all_ranks)`` on a pyccl group does what
  Gloo's does (rank 0 names the ranks that did not arrive).
* ``split_group``: torch only offers it when the default group is bound to an accelerator
  device; on CPU it raises for Gloo and for us alike. ``new_group``/``new_subgroups`` work.
* Object collectives (all_gather_object, gather_object, broadcast_object_list,
  scatter_object_list, send/recv_object_list) work through the calls above.
* A synchronous collective issued from a ``get_future().then(...)`` callback runs at once on the
  group's worker thread (queueing it would wait for itself); asynchronous ones queue as usual.

CUDA tensors (ranks of one host, one GPU each; ccl/cuda_collectives.py does the work)
-------------------------------------------------------------------------------------
* ``init_process_group("pyccl", device_id=torch.device("cuda", i))`` works (torch asks the
  group for its per-device backend: the group answers for every device itself), and so does
  ``new_group(backend="pyccl")`` under a default group bound to a device (NCCL's or ours).
* A collective on CUDA tensors runs on the **caller's thread**, after whatever the group had
  queued before it (it waits for that), and only *enqueues* GPU work: the host never waits
  for the GPU. The stream contract is NCCL's:
  - synchronous (``async_op=False``, what ``dist.all_reduce(t)`` does): ordered after the work
    already queued on the caller's current stream, and everything queued on that stream
    afterwards sees the result. The returned Work is complete.
  - ``async_op=True``: the collective runs on a side stream that first waits for the caller's
    current stream; ``work.wait()`` makes the *then* current stream wait for it (no host
    block), ``work.wait(timeout)`` also blocks the host until it is done (at most `timeout`
    seconds) and raises its error, ``is_completed()`` polls, ``get_future()`` is a CUDA-aware
    future (``torch.futures.Future(devices=[...])``) whose callbacks are stream-ordered. Keep
    the tensors alive and unchanged until then (the Work also holds them).
  - all-reduce of one contiguous tensor up to ``PYCCL_CUDA_ONESHOT_MAX`` bytes (float16,
    bfloat16, float32, float64, int8, uint8, int32, int64; SUM, PRODUCT, MIN, MAX, AVG) takes a
    fast lane: one one-shot kernel launch, synchronised between the GPUs on the device,
    prepared once per (pointer, count, dtype, op) (``CudaCollectives.torch_all_reduce``). No
    flight-recorder entry and no torch Future are made for it; a synchronous one runs on the
    caller's stream itself.
  - Errors of GPU work (a peer that died, a mismatched call, a timeout) are found by the
    kernels, which give up and leave the reason in host memory; they are raised by the next
    call on the group (or by ``work.wait(timeout)``), naming the op and the peer. The group is
    broken from then on.
* Everything else on CUDA goes through the general bodies above with device buffers (every
  temporary lives on the tensors' device): bitwise ops, int16/uint64/float8 reductions,
  uneven all_gather lists, ``all_to_all_single`` with uneven splits (MoE), coalesced calls.
* Point-to-point on CUDA tensors is **staged through pinned host memory** over the same engine
  (and the same semantics: eager sends, tags, any-source receives, across hosts too): a send
  copies the tensor to pinned memory on the caller's stream and the engine sends it once that
  copy is done (the host does not wait for it); a receive lands in pinned memory and is copied
  to the tensor on a pyccl stream that first waits for the caller's stream as it was when the
  receive was posted; ``wait()`` makes the current stream wait for that copy. Why not CUDA
  IPC: the engine's guarantees (sends that never wait for the receiver, unexpected messages
  buffered, any-source, tags, several hosts) would need a rendezvous protocol and a
  device-side buffer pool per peer; the staged path keeps them all and costs two PCIe copies,
  which is small next to a pipeline stage's compute. A one-host IPC path is future work.
* Sparse CUDA tensors are not supported (InvalidArgument).
"""
from __future__ import annotations

import collections
import logging
import math
import os
import select
import struct
import threading
import time
import traceback
from datetime import timedelta
from functools import reduce as _fold

import torch
import torch.distributed as dist

from .errors import InvalidArgument, PeerFailure, PycclError, Timeout, TransportError
from .store import PrefixStore, TorchStoreAdapter

log = logging.getLogger("pyccl")

BACKEND_NAME = "pyccl"
DEFAULT_TIMEOUT_S = 1800.0          # torch's default for non-NCCL backends (30 min)
#: Transport of the point-to-point connections (``PYCCL_TORCH_P2P_TRANSPORT`` overrides). TCP,
#: because its connections fail one by one: a peer that finishes and leaves must not take this
#: rank's connections to the other peers down with it (the shm transport fails them together).
P2P_TRANSPORT = "tcp"

_R = dist.ReduceOp.RedOpType
_AllreduceOptions = dist.AllreduceOptions
_HAS_ASYNC_OP = hasattr(_AllreduceOptions(), "asyncOp")
#: torch ops the CUDA fast lane of all_reduce takes (pyccl names)
_LANE_OPS = {_R.SUM: "SUM", _R.PRODUCT: "PROD", _R.MIN: "MIN", _R.MAX: "MAX", _R.AVG: "AVG"}
_MSG_HDR = struct.Struct("<QqQ")      # magic, tag, nbytes
_MSG_MAGIC = 0x5059434350325031       # "PYCCP2P1"
_MONITOR_TAG = -(1 << 40)             # outside torch's int32 tag range: never a user tag

_NATIVE = {torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.int8, torch.uint8,
           torch.int32, torch.int64, torch.bool}
_FLOAT8 = {getattr(torch, n) for n in ("float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz",
                                         "float8_e5m2fnuz", "float8_e8m0fnu") if hasattr(torch, n)}
_UPCAST = {torch.int16: torch.int32, torch.uint16: torch.int32, torch.uint32: torch.int64,
           **{d: torch.float32 for d in _FLOAT8}}
_SIGNED_VIEW = {torch.uint16: torch.int16, torch.uint32: torch.int32, torch.uint64: torch.int64}
_INTEGRAL = {torch.int8, torch.uint8, torch.int16, torch.int32, torch.int64, torch.uint16,
             torch.uint32, torch.uint64}


# ---- time ---------------------------------------------------------------------------------------
def _seconds(timeout):
    """timedelta / number / None -> seconds, or None when unset (torch's -1 ms or 0)."""
    if timeout is None:
        return None
    if isinstance(timeout, timedelta):
        s = timeout.total_seconds()
    else:
        s = float(timeout)
    return s if s > 0 else None


# ---- the store ------------------------------------------------------------------------------------
def _store_host(store):
    """Host of the TCPStore under a chain of torch PrefixStores, if any (to pick the NIC)."""
    seen = 0
    while store is not None and seen < 32:
        host = getattr(store, "host", None)
        if isinstance(host, str) and host:
            return host
        store = getattr(store, "underlying_store", None)
        seen += 1
    return None


def _adapter(torch_store, timeout_s):
    """pyccl's store interface over the torch Store torch hands the backend."""
    a = TorchStoreAdapter(torch_store, timeout_s)
    a.host = _store_host(torch_store)          # where the NIC that reaches the store is
    return a


# ---- Work --------------------------------------------------------------------------------------------
class _PycclWork(dist._Work):
    """A torch Work for one pyccl operation; finished by the worker (or P2P engine) thread."""

    def __init__(self, what, result=None):
        super().__init__()
        self.what = what
        self._result = result if result is not None else []
        self._fut = torch.futures.Future()
        self._done = threading.Event()
        self._error = None
        self._src = -1
        self._cuda_ready = None       # (device, torch.cuda.Event): a CUDA receive's copy to the tensor

    def _finish(self, error=None, source=None):
        if self._done.is_set():
            return
        if source is not None:
            self._src = int(source)
        self._error = error
        try:
            if error is None:
                self._fut.set_result(self._result)
            else:
                self._fut.set_exception(error)
        except Exception:  # noqa: BLE001 - a failing user callback must not kill the worker
            log.warning("pyccl: a future callback of %s raised:\n%s", self.what, traceback.format_exc())
        self._done.set()

    # torch.distributed.Work API
    def wait(self, timeout=None):
        limit = _seconds(timeout)
        if limit is None:
            while not self._done.wait(5.0):
                pass
        elif not self._done.wait(limit):
            raise Timeout(f"{self.what}: not completed within work.wait(timeout={limit:g}s)")
        if self._error is not None:
            raise self._error
        if self._cuda_ready is not None:
            dev, ev = self._cuda_ready
            torch.cuda.current_stream(dev).wait_event(ev)
            if limit is not None:
                ev.synchronize()
        return True

    def is_completed(self):
        return self._done.is_set()

    def is_success(self):
        return self._done.is_set() and self._error is None

    def exception(self):
        return self._error

    def get_future(self):
        return self._fut

    def result(self):
        self.wait()
        return self._result

    def source_rank(self):
        return self._src

    def _source_rank(self):
        return self._src

    def synchronize(self):
        pass

    def block_current_stream(self):
        self.wait()

    def __repr__(self):
        state = "done" if self._done.is_set() else "pending"
        return f"<pyccl Work {self.what} {state}{' FAILED' if self._error else ''}>"


class _CudaWork(dist._Work):
    """The Work of a collective on CUDA tensors (see "CUDA tensors" in the module doc). Its host
    part is over when it is returned; `event` marks the end of the GPU part for async calls:
    a ``torch.cuda.Event``, or a raw cudaEvent_t of pyccl's stream (fast lane). No torch
    Future is made unless asked for."""

    def __init__(self, what, result, dev, cc=None, event=None):
        super().__init__()
        self.what = what
        self._result = result
        self._dev = dev
        self._cc = cc                 # CudaCollectives, for raw events and for errors
        self.event = event
        self._error = None
        self._fut = None
        self._keep = None

    def _finish(self, error=None, source=None):
        self._error = error

    def _join(self, stream):
        ev = self.event
        if isinstance(ev, int):
            self._cc.rt.streamWaitEvent(stream.cuda_stream, ev, 0)
        else:
            stream.wait_event(ev)

    def wait(self, timeout=None):
        if self._error is not None:
            raise self._error
        if self.event is not None:
            self._join(torch.cuda.current_stream(self._dev))
        limit = _seconds(timeout)
        if limit is not None:
            self.synchronize_host(limit)
        return True

    def synchronize_host(self, limit):
        """Block the host until the GPU part is done (at most `limit` s); raise its error."""
        cc = self._cc
        if cc is None:
            deadline = time.monotonic() + limit
            while self.event is not None and not self.event.query():
                if time.monotonic() > deadline:
                    raise Timeout(f"{self.what}: not finished on cuda:{self._dev} within {limit:g}s")
                time.sleep(0.0002)
            return
        ev = self.event
        if ev is not None and not isinstance(ev, int):
            deadline = time.monotonic() + limit
            while not ev.query():
                cc.raise_if_failed(self.what)
                if time.monotonic() > deadline:
                    raise Timeout(f"{self.what}: not finished on cuda:{self._dev} within {limit:g}s")
                time.sleep(0.0002)
            cc.raise_if_failed(self.what)
            return
        cc.synchronize(self.what, ev, limit)     # ev None: the latest collective (at or after this one)

    def is_completed(self):
        if self._error is not None or self.event is None:
            return True
        if isinstance(self.event, int):
            return self._cc.rt.eventQuery(self.event) == 0
        return self.event.query()

    def is_success(self):
        return self._error is None

    def exception(self):
        return self._error

    def get_future(self):
        if self._fut is None:
            fut = torch.futures.Future(devices=[torch.device("cuda", self._dev)])
            if self._error is not None:
                fut.set_exception(self._error)
            else:
                s = torch.cuda.Stream(device=self._dev)
                if self.event is not None:
                    self._join(s)
                else:
                    s.wait_stream(torch.cuda.current_stream(self._dev))
                with torch.cuda.stream(s):
                    fut.set_result(self._result)
            self._fut = fut
        return self._fut

    def result(self):
        self.wait()
        return self._result

    def source_rank(self):
        return -1

    def _source_rank(self):
        return -1

    def synchronize(self):
        if self.event is not None:
            self._join(torch.cuda.current_stream(self._dev))

    def block_current_stream(self):
        self.wait()

    def __repr__(self):
        return f"<pyccl CUDA Work {self.what}{' FAILED' if self._error else ''}>"


class _SyncDone(dist._Work):
    """The Work that synchronous collectives on CUDA tensors return when they succeeded: one
    shared, completed object (making a torch Work costs several microseconds, as much as the
    whole enqueue of a small all-reduce). torch's synchronous calls only ``wait()`` on it; its
    ``result()``/``get_future()`` value is an empty list (the call's tensors are the caller's,
    and stream order already holds for them)."""

    what = "pyccl synchronous CUDA collective"

    def wait(self, timeout=None):
        return True

    def is_completed(self):
        return True

    def is_success(self):
        return True

    def exception(self):
        return None

    def get_future(self):
        fut = torch.futures.Future()
        fut.set_result([])
        return fut

    def result(self):
        return []

    def source_rank(self):
        return -1

    def _source_rank(self):
        return -1

    def synchronize(self):
        pass

    def block_current_stream(self):
        pass

    def __repr__(self):
        return "<pyccl CUDA Work (synchronous, done)>"


_SYNC_DONE = _SyncDone()


class _Outcome:
    """What _run reports into for a synchronous CUDA call (a torch Work is made only if it
    failed)."""
    __slots__ = ("_error", "what")

    def __init__(self, what):
        self.what, self._error = what, None

    def _finish(self, error=None, source=None):
        self._error = error


# ---- tensor helpers --------------------------------------------------------------------------------
def _check(t, what):
    if not isinstance(t, torch.Tensor):
        raise InvalidArgument(f"{what}: expected a torch.Tensor, got {type(t).__name__}")
    if t.device.type not in ("cpu", "cuda"):
        raise InvalidArgument(f"{what}: tensor is on {t.device}; the torch backend 'pyccl' takes CPU tensors "
                              f"and CUDA tensors")
    if t.layout != torch.strided:
        raise InvalidArgument(f"{what}: {t.layout} tensors are not supported (dense tensors only)")
    return t


def _cuda_dev(*tensors):
    """Index of the GPU of the first CUDA tensor among `tensors` (nested lists too), or None."""
    for t in tensors:
        if isinstance(t, torch.Tensor):
            if t.is_cuda:
                return t.get_device()
        elif isinstance(t, (list, tuple)):
            d = _cuda_dev(*t)
            if d is not None:
                return d
    return None


def _contig(t):
    """(contiguous 1-D tensor over t's data or a copy of it, write-back function)."""
    if t.is_complex():
        if t.is_conj():
            raise InvalidArgument("complex tensor with the conjugate bit set: call .resolve_conj() first")
        t = torch.view_as_real(t)
    if t.is_contiguous():
        return t.reshape(-1), (lambda: None)
    c = t.contiguous().reshape(-1)
    return c, (lambda: t.copy_(c.view(t.shape)))


def _bytes(t):
    """A contiguous tensor's memory as a flat uint8 tensor (no copy)."""
    t = t.reshape(-1)
    return t if t.dtype == torch.uint8 else t.view(torch.uint8)


def _nbytes(t):
    return t.numel() * t.element_size()


# ---- reductions ------------------------------------------------------------------------------------
def _op_kind(op):
    return getattr(op, "op", op)


_OP_NAMES = {_R.SUM: "SUM", _R.PRODUCT: "PRODUCT", _R.MIN: "MIN", _R.MAX: "MAX", _R.AVG: "AVG",
             _R.BAND: "BAND", _R.BOR: "BOR", _R.BXOR: "BXOR", _R.PREMUL_SUM: "PREMUL_SUM"}
_TO_PYCCL = {_R.SUM: "SUM", _R.PRODUCT: "PROD", _R.MIN: "MIN", _R.MAX: "MAX", _R.AVG: "AVG",
             _R.PREMUL_SUM: "SUM"}
_BITWISE = {_R.BAND: torch.bitwise_and, _R.BOR: torch.bitwise_or, _R.BXOR: torch.bitwise_xor}


class _Reduction:
    """How one (torch op, dtype) pair reduces on pyccl: natively, in a wider type, or by
    gathering everyone's data and folding it locally (bitwise ops)."""

    def __init__(self, op, dtype, what):
        kind = _op_kind(op)
        if kind not in _OP_NAMES:
            raise InvalidArgument(f"{what}: unknown reduce op {op!r}")
        name = _OP_NAMES[kind]
        self.what, self.name = what, name
        self.factor = getattr(op, "factor", None) if kind == _R.PREMUL_SUM else None
        self.gather_fold = None       # callable folding a (size, n) tensor into (n,)
        self.work_dtype = None        # reduce in this dtype (then cast back)
        self.flip = False             # uint64 MIN/MAX: flip the sign bit around the reduction
        self.pyccl_op = _TO_PYCCL.get(kind)
        if dtype.is_complex:
            if kind not in (_R.SUM, _R.AVG, _R.PREMUL_SUM):
                raise InvalidArgument(f"{what}: ReduceOp.{name} is not defined for complex tensors "
                                      f"(only SUM, AVG, PREMUL_SUM)")
            dtype = torch.float32 if dtype == torch.complex64 else (
                torch.float64 if dtype == torch.complex128 else torch.float16)
        if dtype == torch.bool:
            if kind in (_R.SUM, _R.BOR, _R.MAX):
                self.pyccl_op = "MAX"
            elif kind in (_R.PRODUCT, _R.BAND, _R.MIN):
                self.pyccl_op = "MIN"
            elif kind == _R.BXOR:
                self.gather_fold = _fold_with(torch.bitwise_xor, torch.uint8)
            else:
                raise InvalidArgument(f"{what}: ReduceOp.{name} is not defined for bool tensors")
            return
        if kind in _BITWISE:
            if dtype not in _INTEGRAL:
                raise InvalidArgument(f"{what}: Cannot use ReduceOp.{name} with non-integral dtype {dtype}")
            self.gather_fold = _fold_with(_BITWISE[kind], _SIGNED_VIEW.get(dtype))
            return
        if kind == _R.PREMUL_SUM and not dtype.is_floating_point:
            raise InvalidArgument(f"{what}: ReduceOp.PREMUL_SUM needs a floating-point tensor, got {dtype}")
        if dtype in _NATIVE:
            return
        if dtype == torch.uint64:
            self.work_dtype = torch.int64
            self.flip = kind in (_R.MIN, _R.MAX)
            if kind == _R.AVG:
                raise InvalidArgument(f"{what}: ReduceOp.AVG is not supported for uint64")
            return
        if dtype in _UPCAST:
            self.work_dtype = _UPCAST[dtype]
            return
        raise InvalidArgument(f"{what}: dtype {dtype} cannot be reduced by pyccl")

    # Work buffers -------------------------------------------------------------------------------
    def to_work(self, flat, may_modify):
        """The contiguous buffer pyccl reduces for `flat` (a contiguous 1-D tensor).
        `may_modify`: whether `flat` itself may be scaled/overwritten before the reduction."""
        buf = flat
        if self.work_dtype is not None:
            if self.flip:
                buf = flat.view(torch.int64) ^ (-(1 << 63))
            else:
                buf = flat.to(self.work_dtype)
        if self.factor is not None:
            if buf is flat and not may_modify:
                buf = flat.clone()
            f = self.factor
            buf.mul_(f.to(buf.dtype) if isinstance(f, torch.Tensor) else f)
        return buf

    def from_work(self, buf, flat):
        """Write the reduced `buf` back into `flat` (no-op when they are the same memory)."""
        if buf is flat:
            return
        if self.flip:
            buf ^= (-(1 << 63))
            flat.view(torch.int64).copy_(buf)
        else:
            flat.copy_(buf)


def _fold_with(fn, view_dtype):
    def fold(stack):
        rows = stack.view(view_dtype) if view_dtype is not None else stack
        if stack.dtype == torch.bool:
            rows = stack.view(torch.uint8)
        out = _fold(fn, list(rows.unbind(0))) if rows.shape[0] else rows.new_zeros(rows.shape[1:])
        if stack.dtype == torch.bool:
            return out.view(torch.bool)
        return out.view(stack.dtype) if view_dtype is not None else out
    return fold


def _as_list(x):
    return [x] if isinstance(x, torch.Tensor) else list(x)


def _single(tensors, what):
    tensors = _as_list(tensors)
    if len(tensors) != 1:
        raise InvalidArgument(f"{what}: expected exactly one tensor per process (CPU), got {len(tensors)}")
    return _check(tensors[0], what)


# ---- point-to-point engine ---------------------------------------------------------------------
class _SendOp:
    __slots__ = ("peer", "tag", "data", "hdr", "work", "deadline", "req", "failed", "ready")


class _RecvOp:
    __slots__ = ("peer", "tag", "view", "nbytes", "work", "deadline", "writeback", "req", "failed", "src")


class _Msg:
    """A message that arrived before a matching receive was posted (or is being drained)."""
    __slots__ = ("peer", "tag", "nbytes", "buf", "req", "bound")


class _P2PEngine:
    """Gloo-like point-to-point over one communicator's connections, on its own thread.

    Per peer and direction the connection is a FIFO of messages; each user message is a 24-byte
    header (magic, tag, byte count) then the payload. The engine always has a header receive
    posted on every live connection, so incoming data is always drained: a payload goes straight
    into the matching posted receive, or into a buffer until one is posted."""

    def __init__(self, comm, rank, timeout_s, name):
        self.comm, self.rank, self.timeout = comm, rank, timeout_s
        self.name = name
        # peer -> Connection, all opened now (connections are lazy otherwise); only this thread uses them
        self.conns = comm.conns.open_all() if hasattr(comm.conns, "open_all") else dict(comm.conns)
        self.dead = {}                          # peer -> error text
        self._lock = threading.Lock()
        self._incoming = collections.deque()
        self._closed = False
        self._rfd, self._wfd = os.pipe()
        os.set_blocking(self._rfd, False)
        os.set_blocking(self._wfd, False)
        self.hdr = {}                           # peer -> (bytearray, request)
        self.posted = []                        # _RecvOp not matched yet, in post order
        self.unexpected = []                    # _Msg in arrival order
        self.inflight_recv = []                 # _RecvOp whose payload is landing
        self.draining = []                      # _Msg whose payload is landing
        self.sends = []                         # _SendOp in flight
        self.staged = []                        # _SendOp whose device-to-host copy is not done yet
        for p, conn in self.conns.items():
            self._post_header(p, conn)
        self._thread = threading.Thread(target=self._loop, name=f"pyccl-p2p-{name}-r{rank}", daemon=True)
        self._thread.start()

    # -- API (any thread) --
    def send(self, flat_bytes, peer, tag, work, ready=None):
        """`ready`: a torch.cuda.Event after which `flat_bytes` (pinned host memory, copied from a
        CUDA tensor) holds the data; the send starts once it has happened."""
        op = _SendOp()
        op.peer, op.tag, op.data, op.work, op.ready = peer, int(tag), flat_bytes, work, ready
        op.deadline = time.monotonic() + self.timeout
        op.req, op.failed = None, False
        op.hdr = bytearray(_MSG_HDR.pack(_MSG_MAGIC, op.tag, _nbytes(flat_bytes)))
        self._submit(("send", op))

    def recv(self, flat_bytes, peer, tag, work, writeback):
        op = _RecvOp()
        op.peer, op.tag, op.view, op.work, op.writeback = peer, int(tag), flat_bytes, work, writeback
        op.nbytes = _nbytes(flat_bytes)
        op.deadline = time.monotonic() + self.timeout
        op.req, op.failed, op.src = None, False, None
        self._submit(("recv", op))

    def _submit(self, item):
        with self._lock:
            if self._closed:
                raise PycclError(f"{item[1].work.what}: the process group is shut down")
            self._incoming.append(item)
        self._wake()

    def _wake(self):
        try:
            os.write(self._wfd, b"x")
        except (BlockingIOError, OSError):
            pass

    def close(self):
        with self._lock:
            if self._closed:
                return
            self._closed = True
        self._wake()
        if threading.current_thread() is not self._thread:
            self._thread.join(timeout=10)
        err = PycclError(f"{self.name}: the process group was shut down with this operation pending")
        for op in self.posted + self.inflight_recv + self.sends + self.staged:
            self._fail(op, err)
        for _, op in list(self._incoming):
            self._fail(op, err)
        for fd in (self._rfd, self._wfd):
            try:
                os.close(fd)
            except OSError:
                pass

    # -- engine thread --
    def _post_header(self, peer, conn):
        buf = bytearray(_MSG_HDR.size)
        self.hdr[peer] = (buf, conn.irecv(memoryview(buf)))

    def _loop(self):
        idle = 0
        try:
            while not self._closed:
                moved = self._take()
                if self.staged and self._start_staged():
                    moved = True
                for p, conn in list(self.conns.items()):
                    if p in self.dead:
                        continue
                    try:
                        if conn.progress():
                            moved = True
                    except (PeerFailure, TransportError, OSError) as e:
                        self._peer_failed(p, f"{type(e).__name__}: {e}")
                        moved = True
                if self._advance():
                    moved = True
                self._expire()
                if moved:
                    idle = 0
                    continue
                idle += 1
                self._idle_wait(idle)
        except BaseException:  # noqa: BLE001 - a bug here must not hang users silently
            text = traceback.format_exc()
            log.error("pyccl p2p engine %s died:\n%s", self.name, text)
            err = PycclError(f"{self.name}: point-to-point engine failed:\n{text}")
            for op in self.posted + self.inflight_recv + self.sends + self.staged:
                self._fail(op, err)
            with self._lock:
                self._closed = True
                pending = list(self._incoming)
                self._incoming.clear()
            for _, op in pending:
                self._fail(op, err)

    def _busy(self):
        return bool(self.posted or self.inflight_recv or self.sends or self.draining or self._incoming or
                    self.staged)

    def _start_staged(self):
        """Start the staged sends whose device-to-host copy has finished."""
        ready, still = [], []
        for op in self.staged:
            if op.failed:
                continue
            (ready if op.ready.query() else still).append(op)
        self.staged = still
        for op in ready:
            op.ready = None
            self._start_send(op)
        return bool(ready)

    def _idle_wait(self, idle):
        """Sleep until a socket or the wake-up pipe is ready. Never spin holding the GIL: the
        user's thread needs it to post the next operation. Connections without file handles
        (shared memory) are polled, backing off from 50 us to 2 ms (20 ms when nothing waits)."""
        rd, wr = [self._rfd], []
        poll = bool(self.staged)                # device copies are polled
        for p, conn in self.conns.items():
            if p in self.dead:
                continue
            h = conn.wait_handles()
            if h is None:
                poll = True
                continue
            rd += h[0]
            wr += h[1]
        if poll:
            limit = min(0.00005 * idle, 0.002 if self._busy() else 0.02)
        else:
            limit = 0.05 if self._busy() else 0.5
        try:
            select.select(rd, wr, [], limit)
        except (OSError, ValueError):
            time.sleep(0.001)
        try:
            while os.read(self._rfd, 4096):
                pass
        except (BlockingIOError, OSError):
            pass

    def _take(self):
        with self._lock:
            items = list(self._incoming)
            self._incoming.clear()
        for kind, op in items:
            if kind == "send":
                self._start_send(op)
            else:
                self._start_recv(op)
        return bool(items)

    def _start_send(self, op):
        if op.ready is not None:
            if not op.ready.query():
                self.staged.append(op)
                return
            op.ready = None
        if op.peer == self.rank:                        # to self: deliver locally
            m = _Msg()
            m.peer, m.tag, m.nbytes = self.rank, op.tag, _nbytes(op.data)
            m.buf, m.req, m.bound = op.data.clone(), None, None
            op.work._finish()
            self._arrived(m)
            return
        if op.peer in self.dead:
            self._fail(op, PeerFailure(f"{op.work.what}: rank {op.peer} is gone ({self.dead[op.peer]})"))
            return
        conn = self.conns[op.peer]
        req = conn.isend(memoryview(op.hdr))
        if op.data.numel():
            req = conn.isend(memoryview(op.data.numpy()))
        op.req = req
        self.sends.append(op)

    def _start_recv(self, op):
        for i, m in enumerate(self.unexpected):
            if m.tag == op.tag and (op.peer is None or m.peer == op.peer):
                del self.unexpected[i]
                if m.req is None or m.req.done:
                    self._deliver(m, op)
                else:
                    m.bound = op
                return
        if op.peer is not None and op.peer != self.rank and op.peer in self.dead:
            self._fail(op, PeerFailure(f"{op.work.what}: rank {op.peer} is gone ({self.dead[op.peer]})"))
            return
        self.posted.append(op)

    def _deliver(self, m, op):
        """Complete receive `op` with the fully arrived buffered message `m`."""
        if op.failed:
            return
        if m.nbytes != op.nbytes:
            self._fail(op, self._size_error(op, m.peer, m.nbytes))
            return
        if m.nbytes:
            op.view.copy_(m.buf)
        self._complete_recv(op, m.peer)

    def _complete_recv(self, op, src):
        try:
            op.writeback()
        except Exception as e:  # noqa: BLE001 - reported through the work
            self._fail(op, e)
            return
        op.work._finish(source=src)

    def _size_error(self, op, peer, nbytes):
        return TransportError(f"{op.work.what}: size mismatch with rank {peer} (tag {op.tag}): it sent "
                              f"{nbytes} bytes, this receive expects {op.nbytes} bytes")

    def _arrived(self, m):
        """A header (and, for self-sends, the data) arrived: match it or keep it."""
        for i, op in enumerate(self.posted):
            if op.tag == m.tag and (op.peer is None or op.peer == m.peer):
                del self.posted[i]
                if m.req is None and m.buf is not None:      # local message, data in hand
                    self._deliver(m, op)
                    return
                if m.nbytes != op.nbytes:
                    self._fail(op, self._size_error(op, m.peer, m.nbytes))
                    self._drain(m)
                    return
                if m.nbytes == 0:
                    self._complete_recv(op, m.peer)
                    return
                op.req = self.conns[m.peer].irecv(memoryview(op.view.numpy()))
                op.src = m.peer
                self.inflight_recv.append(op)
                return
        if m.buf is None:
            self._drain(m)
        self.unexpected.append(m)

    def _drain(self, m):
        """Receive a message's payload into a fresh buffer."""
        m.buf = torch.empty(m.nbytes, dtype=torch.uint8)
        m.req = self.conns[m.peer].irecv(memoryview(m.buf.numpy())) if m.nbytes else None
        if m.req is not None:
            self.draining.append(m)

    def _advance(self):
        moved = False
        for p, (buf, req) in list(self.hdr.items()):
            if p in self.dead or not req.done:
                continue
            magic, tag, nbytes = _MSG_HDR.unpack(bytes(buf))
            if magic != _MSG_MAGIC:
                self._peer_failed(p, f"garbage header from rank {p} (magic {magic:#x})")
                continue
            m = _Msg()
            m.peer, m.tag, m.nbytes, m.buf, m.req, m.bound = p, tag, nbytes, None, None, None
            self._arrived(m)
            self._post_header(p, self.conns[p])
            moved = True
        if self.inflight_recv:
            still = []
            for op in self.inflight_recv:
                if op.req.done:
                    if not op.failed:
                        self._complete_recv(op, op.src)
                    moved = True
                else:
                    still.append(op)
            self.inflight_recv = still
        if self.draining:
            still = []
            for m in self.draining:
                if m.req.done:
                    moved = True
                    if m.bound is not None:
                        self._deliver(m, m.bound)
                        m.bound = None
                else:
                    still.append(m)
            self.draining = still
        if self.sends:
            still = []
            for op in self.sends:
                if op.req.done:
                    if not op.failed:
                        op.work._finish()
                    moved = True
                else:
                    still.append(op)
            self.sends = still
        return moved

    def _expire(self):
        if not (self.posted or self.inflight_recv or self.sends or self.staged):
            return
        now = time.monotonic()
        for lst in (self.posted, self.inflight_recv, self.sends, self.staged):
            for op in lst:
                if not op.failed and now > op.deadline:
                    frm = "any rank" if isinstance(op, _RecvOp) and op.peer is None else f"rank {op.peer}"
                    kind = "receive from" if isinstance(op, _RecvOp) else "send to"
                    self._fail(op, Timeout(f"{op.work.what}: {kind} {frm} (tag {op.tag}) did not complete "
                                           f"within the group timeout of {self.timeout:.0f}s"))
        self.posted = [op for op in self.posted if not op.failed]
        self.staged = [op for op in self.staged if not op.failed]

    def _fail(self, op, err):
        if not op.failed:
            op.failed = True
            op.work._finish(err)

    def _peer_failed(self, p, why):
        if p in self.dead:
            return
        self.dead[p] = why
        err = PeerFailure(f"{self.name}: rank {p} is gone ({why})")
        for op in self.posted:
            if op.peer == p:
                self._fail(op, err)
        self.posted = [op for op in self.posted if not op.failed]
        for op in self.inflight_recv:
            if op.src == p:
                self._fail(op, err)
        self.inflight_recv = [op for op in self.inflight_recv if not op.failed]
        for op in self.sends:
            if op.peer == p:
                self._fail(op, err)
        self.sends = [op for op in self.sends if not op.failed]
        for op in self.staged:
            if op.peer == p:
                self._fail(op, err)
        self.staged = [op for op in self.staged if not op.failed]
        self.draining = [m for m in self.draining if m.peer != p]


# ---- the process group -------------------------------------------------------------------------------
class ProcessGroupPyccl(dist.ProcessGroup):
    """A torch.distributed process group whose collectives run on pyccl (see the module doc)."""

    # torch asks a group for its per-device backend (`_get_backend`) and what that supports;
    # this group is its own backend on every device.
    supports_splitting = False
    supports_coalescing = False
    supports_time_estimate = False

    def __init__(self, store, rank, size, timeout=None):
        super().__init__(rank, size)
        from .communicator import Communicator
        self._rank, self._size = int(rank), int(size)
        self._timeout = _seconds(timeout) or DEFAULT_TIMEOUT_S
        self._group_name = ""
        self._group_desc = ""
        self._torch_store = store
        base = _adapter(dist.PrefixStore("pyccl/", store), self._timeout)
        self._store = base
        self._comm = Communicator(self._rank, self._size, store=PrefixStore(base, "coll"), timeout=self._timeout)
        self._p2p_comm = Communicator(self._rank, self._size, store=PrefixStore(base, "p2p"), timeout=self._timeout,
                                      transport=os.environ.get("PYCCL_TORCH_P2P_TRANSPORT") or P2P_TRANSPORT)
        self._p2p = _P2PEngine(self._p2p_comm, self._rank, self._timeout, f"pyccl r{self._rank}/{self._size}")
        self._cv = threading.Condition()
        self._pending = collections.deque()
        self._running = False
        self._worker = None
        self._seq = 0
        self._broken = None
        self._closed = False
        self._lane = None             # fast lane of small CUDA all-reduces (set on first CUDA use)
        self._side = {}               # device -> torch stream of async CUDA collectives
        self._p2p_streams = {}        # device -> torch stream of staged receives (engine thread)

    # -- identity (called by torch through the C++ trampoline) --
    def getBackendName(self):
        return BACKEND_NAME

    def getRank(self):
        return self._rank

    def getSize(self):
        return self._size

    def setGroupName(self, name):
        self._group_name = name

    def getGroupName(self):
        return self._group_name

    def setGroupDesc(self, desc):
        self._group_desc = desc

    def getGroupDesc(self):
        return self._group_desc

    def _get_backend(self, device=None):
        """torch's per-device backend lookup (``init_process_group(..., device_id=...)``,
        ``new_group`` under a bound default group): this group serves CPU and CUDA itself."""
        return self

    @property
    def pyccl_communicator(self):
        """The pyccl Communicator the collectives run on."""
        return self._comm

    @property
    def timeout(self):
        return timedelta(seconds=self._timeout)

    def __repr__(self):
        return f"<ProcessGroupPyccl rank {self._rank}/{self._size} {self._group_name or ''}>"

    # -- execution --
    def _what(self, name):
        self._seq += 1
        return f"pyccl {name} #{self._seq} (group {self._group_name or '?'}, rank {self._rank}/{self._size})"

    def _submit(self, name, fn, result, opts=None, async_op=None, dev=None):
        """Queue `fn()` (run in issue order) and return its Work; synchronous calls on an idle
        group run right here on the caller's thread. `dev`: the GPU of the call's CUDA tensors
        (None: CPU), see _submit_cuda."""
        if async_op is None:
            async_op = bool(getattr(opts, "asyncOp", True)) if opts is not None else True
        if dev is not None:
            return self._submit_cuda(name, fn, result, async_op, dev)
        what = self._what(name)
        work = _PycclWork(what, result)
        if not async_op and threading.current_thread() is self._worker:
            # A synchronous call from a future callback, which runs on the worker right after the
            # operation it follows, at the same point on every rank: run it now (queueing it
            # behind the worker would wait for itself).
            self._run(work, fn)
            return work
        with self._cv:
            if self._closed:
                raise PycclError(f"{what}: the process group is shut down")
            inline = not async_op and not self._pending and not self._running
            if inline:
                self._running = True
            else:
                self._pending.append((work, fn))
                if self._worker is None:
                    self._worker = threading.Thread(target=self._work_loop, daemon=True,
                                                    name=f"pyccl-torch-{self._group_name}-r{self._rank}")
                    self._worker.start()
                self._cv.notify_all()
        if inline:
            try:
                self._run(work, fn)
            finally:
                with self._cv:
                    self._running = False
                    self._cv.notify_all()
        return work

    def _submit_cuda(self, name, fn, result, async_op, dev):
        """A collective on CUDA tensors: run on the caller's thread (whose current stream it is
        ordered after), after whatever the group queued before it; it only enqueues GPU work.
        async_op: the body runs with a side stream as the current stream (which first waits
        for the caller's), and the Work's wait() joins it back."""
        what = self._what(name)
        work = _Outcome(what) if not async_op else _CudaWork(what, result, dev)
        on_worker = threading.current_thread() is self._worker
        if not on_worker:
            self._take_turn(what)
        try:
            if not async_op:
                self._run(work, fn)
                if work._error is not None:
                    failed = _CudaWork(what, result, dev)
                    failed._error = work._error
                    work = failed
            else:
                caller = torch.cuda.current_stream(dev)
                side = self._side.get(dev)
                if side is None:
                    side = self._side[dev] = torch.cuda.Stream(device=dev)
                side.wait_stream(caller)
                with torch.cuda.stream(side):
                    self._run(work, fn)
                if work._error is None:
                    ev = torch.cuda.Event()
                    ev.record(side)
                    work.event = ev
                    work._keep = fn          # its closure holds every tensor the side stream uses
            cc = self._comm.cuda
            if self._lane is None and cc is not None and work._error is None:
                self._lane_dev, self._lane_cc = cc.dev, cc
                self._lane = cc.torch_all_reduce(self._comm)
        finally:
            if not on_worker:
                with self._cv:
                    self._running = False
                    self._cv.notify_all()
        if isinstance(work, _Outcome):
            return _SYNC_DONE
        work._cc = cc
        return work

    def _take_turn(self, what):
        """Wait (bounded by the group timeout) until nothing queued or running is ahead of us,
        then hold the group."""
        with self._cv:
            if self._closed:
                raise PycclError(f"{what}: the process group is shut down")
            deadline = time.monotonic() + self._timeout
            while self._pending or self._running:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise Timeout(f"{what}: the operations queued before it on this group did not finish "
                                  f"within the group timeout of {self._timeout:.0f}s")
                self._cv.wait(min(left, 1.0))
            self._running = True

    def _work_loop(self):
        while True:
            with self._cv:
                while not self._closed and (not self._pending or self._running):
                    self._cv.wait()
                if not self._pending:
                    return
                work, fn = self._pending.popleft()
                self._running = True
            try:
                self._run(work, fn)
            finally:
                with self._cv:
                    self._running = False
                    self._cv.notify_all()

    def _run(self, work, fn):
        if self._broken is not None:
            work._finish(PeerFailure(f"{work.what}: the group is broken by an earlier error "
                                     f"({self._broken}); create a new group"))
            return
        try:
            fn(work)
        except InvalidArgument as e:
            work._finish(e)
            return
        except PycclError as e:
            err = self._break(work, e)
            work._finish(err)
            return
        except Exception as e:  # noqa: BLE001 - torch errors in copies etc.: report, do not break
            work._finish(e)
            return
        work._finish()

    def _break(self, work, e):
        """A collective failed on the wire. The communicator has already left its reason in the
        store and (except after a timeout) dropped its connections so that the peers fail now
        and name the root cause; from here on every call on this group fails at once."""
        self._broken = f"{type(e).__name__}: {e}"
        return e

    # -- teardown --
    def shutdown(self):
        with self._cv:
            if self._closed:
                return
            self._closed = True
            self._cv.notify_all()
        w = self._worker
        if w is not None and w is not threading.current_thread():
            w.join(timeout=min(self._timeout, 10.0))
        for work, _ in list(self._pending):
            work._finish(PycclError(f"{work.what}: the process group was shut down"))
        self._pending.clear()
        self._p2p.close()
        for c in (self._comm, self._p2p_comm):
            try:
                c.close()
            except Exception as e:  # noqa: BLE001 - closing is best effort
                log.debug("pyccl: closing %s: %s", c, e)

    def abort(self):
        self._broken = self._broken or "aborted"
        self.shutdown()

    # -- collective bodies (run on the worker or inline) --
    def _allreduce_flat(self, flat, red, may_modify):
        buf = red.to_work(flat, may_modify)
        if red.gather_fold is not None:
            stack = torch.empty((self._size, buf.numel()), dtype=buf.dtype, device=buf.device)
            self._comm.all_gather(_bytes(stack), _bytes(buf))
            buf.copy_(red.gather_fold(stack))
        else:
            self._comm.all_reduce(buf, op=red.pyccl_op)
        red.from_work(buf, flat)

    # ===== collectives =====================================================================
    def allreduce(self, tensors, opts=None):
        lane = self._lane
        if lane is not None and type(tensors) is list and len(tensors) == 1 and self._broken is None and \
                not self._running and not self._pending:
            # Fast lane: one small contiguous CUDA tensor, nothing queued (see the module doc).
            t = tensors[0]
            if type(opts) is _AllreduceOptions:
                opname = _LANE_OPS.get(opts.reduceOp.op)
                async_op = opts.asyncOp if _HAS_ASYNC_OP else True
            else:
                opname = "SUM" if opts is None else _LANE_OPS.get(getattr(opts, "op", opts))
                async_op = True
            if opname is not None and t.is_cuda:
                try:
                    r = lane(t, opname, async_op)
                except PycclError as e:
                    self._broken = f"{type(e).__name__}: {e}"
                    raise
                if r is not False:
                    if r is None:
                        return _SYNC_DONE
                    return _CudaWork("pyccl allreduce", tensors, self._lane_dev, self._lane_cc, r)
        if isinstance(opts, dist.ReduceOp) or opts is None:
            op, opts = (opts if opts is not None else dist.ReduceOp.SUM), None
        else:
            op = opts.reduceOp
        tensors = _as_list(tensors)
        if len(tensors) == 1 and isinstance(tensors[0], torch.Tensor) and tensors[0].layout == torch.sparse_coo:
            return self._allreduce_sparse(tensors, op, opts)
        t = _single(tensors, "allreduce")
        red = _Reduction(op, t.dtype, "allreduce")

        def run(work):
            flat, wb = _contig(t)
            self._allreduce_flat(flat, red, True)
            wb()
        return self._submit("allreduce", run, tensors, opts, dev=_cuda_dev(t))

    def _allreduce_sparse(self, tensors, op, opts):
        """Sparse COO all_reduce (SUM, like Gloo): gather every rank's indices and values, add them
        up and write the coalesced sum into the tensor in place."""
        t = tensors[0]
        if t.device.type != "cpu":
            raise InvalidArgument(f"allreduce: sparse tensors on {t.device} are not supported (sparse CPU "
                                  f"tensors are)")
        if _op_kind(op) != _R.SUM:
            raise InvalidArgument(f"allreduce: sparse tensors reduce with SUM only, got {_OP_NAMES.get(_op_kind(op))}")

        def run(work):
            idx = t._indices().t().contiguous()               # (nnz, sparse_dim) int64
            val = t._values().contiguous()                     # (nnz, *dense)
            shape = list(t.shape)
            meta = torch.tensor([idx.shape[0], t.sparse_dim(), len(shape)] + shape + [-1] * (8 - len(shape)),
                                dtype=torch.int64)
            table = torch.empty(self._size * meta.numel(), dtype=torch.int64)
            self._comm.all_gather(table, meta)
            table = table.view(self._size, -1)
            if not torch.equal(table[:, 1:], meta[1:].expand(self._size, -1)):
                raise InvalidArgument(f"allreduce: sparse tensors differ in shape across ranks: "
                                      f"{[row[3:3 + int(row[2])].tolist() for row in table]}")
            counts = table[:, 0].tolist()
            row_i = idx.shape[1] * 8
            row_v = math.prod(val.shape[1:]) * val.element_size()
            all_idx = torch.empty((sum(counts), idx.shape[1]), dtype=torch.int64)
            all_val = torch.empty((sum(counts),) + tuple(val.shape[1:]), dtype=val.dtype)
            for mine, out, row in ((idx, all_idx, row_i), (val, all_val, row_v)):
                sizes = [c * row for c in counts]
                flat = _bytes(mine)
                self._comm.all_to_all(_bytes(out), flat.repeat(self._size), out_splits=sizes,
                                      in_splits=[flat.numel()] * self._size)
            summed = torch.sparse_coo_tensor(all_idx.t(), all_val, t.shape).coalesce()
            t.copy_(summed)
        return self._submit("allreduce (sparse)", run, tensors, opts)

    def allreduce_coalesced(self, tensors, opts=None):
        op = opts.reduceOp if opts is not None else dist.ReduceOp.SUM
        tensors = list(tensors)
        for t in tensors:
            _check(t, "allreduce_coalesced")
        reds = [_Reduction(op, t.dtype, "allreduce_coalesced") for t in tensors]

        def run(work):
            # One flat buffer per dtype (same order on every rank), reduced in one call.
            groups = collections.OrderedDict()
            for t, red in zip(tensors, reds):
                groups.setdefault(t.dtype, []).append((t, red))
            for items in groups.values():
                red = items[0][1]
                flats = [_contig(t)[0] for t, _ in items]
                packed = torch.cat(flats)
                self._allreduce_flat(packed, red, True)
                off = 0
                for (t, _), f in zip(items, flats):
                    n = f.numel()
                    src = packed[off:off + n]
                    off += n
                    if t.is_complex():
                        torch.view_as_real(t).copy_(src.view(torch.view_as_real(t).shape))
                    else:
                        t.copy_(src.view(t.shape))
        return self._submit("allreduce_coalesced", run, tensors, opts, dev=_cuda_dev(tensors))

    def reduce(self, tensors, opts=None):
        tensors = _as_list(tensors)
        t = _single(tensors, "reduce")
        root = self._root(opts.rootRank, "reduce")
        red = _Reduction(opts.reduceOp, t.dtype, "reduce")

        def run(work):
            flat, wb = _contig(t)
            is_root = self._rank == root
            if red.gather_fold is not None:
                stack = torch.empty((self._size, flat.numel()), dtype=flat.dtype, device=flat.device) \
                    if is_root else None
                self._comm.gather(_bytes(stack) if is_root else None, _bytes(flat), root=root)
                if is_root:
                    flat.copy_(red.gather_fold(stack))
                    wb()
                return
            buf = red.to_work(flat, False)          # pyccl leaves non-root buffers unchanged
            self._comm.reduce(buf, root=root, op=red.pyccl_op)
            if is_root:
                red.from_work(buf, flat)
                wb()
        return self._submit("reduce", run, tensors, opts, dev=_cuda_dev(t))

    def broadcast(self, tensors, opts=None):
        tensors = _as_list(tensors)
        t = _single(tensors, "broadcast")
        if isinstance(opts, int):                   # pg.broadcast(tensor, root) overload
            opts, root = None, self._root(opts, "broadcast")
        else:
            root = self._root(opts.rootRank if opts is not None else 0, "broadcast")

        def run(work):
            flat, wb = _contig(t)
            self._comm.broadcast(_bytes(flat), root=root)
            if self._rank != root:
                wb()
        return self._submit("broadcast", run, tensors, opts, dev=_cuda_dev(t))

    def allgather(self, output_tensors, input_tensors, opts=None):
        outs = [list(o) for o in output_tensors]
        ins = list(input_tensors)
        t = _single(ins, "allgather")
        if len(outs) != 1 or len(outs[0]) != self._size:
            raise InvalidArgument(f"allgather: expected one list of {self._size} output tensors, got "
                                  f"{[len(o) for o in outs]}")
        for o in outs[0]:
            _check(o, "allgather: output")
            if o.dtype != t.dtype:
                raise InvalidArgument(f"allgather: output dtype {o.dtype} differs from input dtype {t.dtype}")

        def run(work):
            self._gather_into_list(outs[0], t)
        return self._submit("allgather", run, outs, opts, dev=_cuda_dev(t, outs))

    def _gather_into_list(self, out_list, t):
        flat, _ = _contig(t)
        n = _nbytes(flat)
        sizes = [_nbytes(o) for o in out_list]
        if sizes[self._rank] != n:
            raise InvalidArgument(f"allgather: output tensor {self._rank} holds {sizes[self._rank]} bytes "
                                  f"but this rank's input holds {n}")
        if all(s == n for s in sizes):
            packed = torch.empty(n * self._size, dtype=torch.uint8, device=flat.device)
            self._comm.all_gather(packed, _bytes(flat))
        else:
            # Uneven sizes (NCCL allows them): every rank sends its input to everyone.
            packed = torch.empty(sum(sizes), dtype=torch.uint8, device=flat.device)
            mine = _bytes(flat).repeat(self._size)
            self._comm.all_to_all(packed, mine, out_splits=sizes, in_splits=[n] * self._size)
        off = 0
        for o, s in zip(out_list, sizes):
            _copy_bytes_into(o, packed[off:off + s])
            off += s

    def allgather_coalesced(self, output_lists, input_list, opts=None):
        """output_lists[r][k] receives input k of rank r (Gloo's layout)."""
        outs = [list(o) for o in output_lists]
        ins = list(input_list)
        if len(outs) != self._size:
            raise InvalidArgument(f"allgather_coalesced: need one output list per rank ({self._size}), "
                                  f"got {len(outs)}")
        for i in ins:
            _check(i, "allgather_coalesced: input")
        for r, o in enumerate(outs):
            if len(o) != len(ins):
                raise InvalidArgument(f"allgather_coalesced: output list {r} has {len(o)} tensors for "
                                      f"{len(ins)} inputs")
            for x, i in zip(o, ins):
                _check(x, "allgather_coalesced: output")
                if _nbytes(x) != _nbytes(i) or x.dtype != i.dtype:
                    raise InvalidArgument(f"allgather_coalesced: output list {r} does not match the inputs "
                                          f"({x.dtype} {tuple(x.shape)} vs {i.dtype} {tuple(i.shape)})")

        def run(work):
            flats = [_bytes(_contig(i)[0]) for i in ins]
            mine = torch.cat(flats) if flats else torch.empty(0, dtype=torch.uint8)
            per = mine.numel()
            packed = torch.empty(per * self._size, dtype=torch.uint8, device=mine.device)
            self._comm.all_gather(packed, mine)
            for r in range(self._size):
                off = r * per
                for k, f in enumerate(flats):
                    n = f.numel()
                    _copy_bytes_into(outs[r][k], packed[off:off + n])
                    off += n
        return self._submit("allgather_coalesced", run, outs, opts, dev=_cuda_dev(ins, outs))

    def all_gather_single(self, output, input, opts=None):
        _check(output, "all_gather_single: output")
        _check(input, "all_gather_single: input")
        if output.dtype != input.dtype:
            raise InvalidArgument(f"all_gather_into_tensor: output dtype {output.dtype} differs from input "
                                  f"dtype {input.dtype}")
        if output.numel() != input.numel() * self._size:
            raise InvalidArgument(f"all_gather_into_tensor: output holds {output.numel()} elements, expected "
                                  f"size {self._size} x input {input.numel()}")

        def run(work):
            self._all_gather_tensor(output, input)
        return self._submit("all_gather_into_tensor", run, [output], opts, dev=_cuda_dev(output, input))

    _allgather_base = all_gather_single

    def _all_gather_tensor(self, output, input):
        fo, wbo = _contig(output)
        fi, _ = _contig(input)
        self._comm.all_gather(_bytes(fo), _bytes(fi))
        wbo()

    def all_gather_single_coalesced(self, outputs, inputs, opts=None):
        outputs, inputs = list(outputs), list(inputs)
        if len(outputs) != len(inputs):
            raise InvalidArgument("all_gather_into_tensor_coalesced: as many outputs as inputs needed")
        for o, i in zip(outputs, inputs):
            _check(o, "all_gather_into_tensor_coalesced")
            _check(i, "all_gather_into_tensor_coalesced")
            if _nbytes(o) != _nbytes(i) * self._size:
                raise InvalidArgument("all_gather_into_tensor_coalesced: output must hold size x input")

        def run(work):
            flats = [_bytes(_contig(i)[0]) for i in inputs]
            mine = torch.cat(flats) if flats else torch.empty(0, dtype=torch.uint8)
            per = mine.numel()
            packed = torch.empty(per * self._size, dtype=torch.uint8, device=mine.device)
            self._comm.all_gather(packed, mine)
            views = packed.view(self._size, per) if per else None
            off = 0
            for o, f in zip(outputs, flats):
                n = f.numel()
                if views is not None:
                    _copy_bytes_into(o, views[:, off:off + n].reshape(-1))
                off += n
        return self._submit("all_gather_into_tensor_coalesced", run, outputs, opts,
                            dev=_cuda_dev(outputs, inputs))

    allgather_into_tensor_coalesced = all_gather_single_coalesced

    def gather(self, output_tensors, input_tensors, opts=None):
        ins = list(input_tensors)
        t = _single(ins, "gather")
        root = self._root(opts.rootRank, "gather")
        outs = [list(o) for o in output_tensors]
        if self._rank == root:
            if len(outs) != 1 or len(outs[0]) != self._size:
                raise InvalidArgument(f"gather: the root needs one list of {self._size} output tensors")
            for o in outs[0]:
                _check(o, "gather: output")
                if _nbytes(o) != _nbytes(t):
                    raise InvalidArgument(f"gather: output tensors must match the input's size "
                                          f"({_nbytes(o)} vs {_nbytes(t)} bytes)")
        elif any(len(o) for o in outs):
            raise InvalidArgument("gather: only the root passes output tensors")

        def run(work):
            flat, _ = _contig(t)
            n = _nbytes(flat)
            packed = torch.empty(n * self._size, dtype=torch.uint8, device=flat.device) \
                if self._rank == root else None
            self._comm.gather(packed, _bytes(flat), root=root)
            if self._rank == root:
                for r, o in enumerate(outs[0]):
                    _copy_bytes_into(o, packed[r * n:(r + 1) * n])
        return self._submit("gather", run, outs, opts, dev=_cuda_dev(t, outs))

    def scatter(self, output_tensors, input_tensors, opts=None):
        outs = list(output_tensors)
        t = _single(outs, "scatter")
        root = self._root(opts.rootRank, "scatter")
        ins = [list(i) for i in input_tensors]
        if self._rank == root:
            if len(ins) != 1 or len(ins[0]) != self._size:
                raise InvalidArgument(f"scatter: the root needs one list of {self._size} input tensors")
            for i in ins[0]:
                _check(i, "scatter: input")
                if _nbytes(i) != _nbytes(t):
                    raise InvalidArgument("scatter: input tensors must match the output's size")
        elif any(len(i) for i in ins):
            raise InvalidArgument("scatter: only the root passes input tensors")

        def run(work):
            flat, wb = _contig(t)
            packed = None
            if self._rank == root:
                packed = torch.cat([_bytes(_contig(i)[0]) for i in ins[0]])
            self._comm.scatter(_bytes(flat), packed, root=root)
            wb()
        return self._submit("scatter", run, outs, opts, dev=_cuda_dev(t, ins))

    def reduce_scatter(self, output_tensors, input_tensors, opts=None):
        outs = list(output_tensors)
        t = _single(outs, "reduce_scatter")
        ins = [list(i) for i in input_tensors]
        if len(ins) != 1 or len(ins[0]) != self._size:
            raise InvalidArgument(f"reduce_scatter: expected one list of {self._size} input tensors")
        for i in ins[0]:
            _check(i, "reduce_scatter: input")
            if i.dtype != t.dtype or i.numel() != t.numel():
                raise InvalidArgument(f"reduce_scatter: every input must match the output "
                                      f"({t.dtype}, {t.numel()} elements); got {i.dtype}, {i.numel()}")
        red = _Reduction(opts.reduceOp, t.dtype, "reduce_scatter")

        def run(work):
            flat_in = torch.cat([_contig(i)[0] for i in ins[0]])
            self._reduce_scatter_flat(t, flat_in, red, True)
        return self._submit("reduce_scatter", run, outs, opts, dev=_cuda_dev(t, ins))

    def _reduce_scatter_flat(self, output, flat_in, red, may_modify):
        fo, wbo = _contig(output)
        n = fo.numel()
        if red.gather_fold is not None:
            stack = torch.empty((self._size, n), dtype=fo.dtype, device=fo.device)
            self._comm.all_to_all(_bytes(stack), _bytes(flat_in))
            fo.copy_(red.gather_fold(stack))
            wbo()
            return
        bin_ = red.to_work(flat_in, may_modify)
        bout = fo if red.work_dtype is None else torch.empty(n, dtype=red.work_dtype, device=fo.device)
        self._comm.reduce_scatter(bout, bin_, op=red.pyccl_op)
        red.from_work(bout, fo)
        wbo()

    def reduce_scatter_single(self, output, input, opts=None):
        _check(output, "reduce_scatter_tensor: output")
        _check(input, "reduce_scatter_tensor: input")
        if output.dtype != input.dtype:
            raise InvalidArgument(f"reduce_scatter_tensor: output dtype {output.dtype} differs from input "
                                  f"dtype {input.dtype}")
        if input.numel() != output.numel() * self._size:
            raise InvalidArgument(f"reduce_scatter_tensor: input holds {input.numel()} elements, expected "
                                  f"size {self._size} x output {output.numel()}")
        red = _Reduction(opts.reduceOp if opts is not None else dist.ReduceOp.SUM, output.dtype,
                         "reduce_scatter_tensor")

        def run(work):
            fi, _ = _contig(input)
            self._reduce_scatter_flat(output, fi, red, False)
        return self._submit("reduce_scatter_tensor", run, [output], opts, dev=_cuda_dev(output, input))

    _reduce_scatter_base = reduce_scatter_single

    def reduce_scatter_single_coalesced(self, outputs, inputs, opts=None):
        outputs, inputs = list(outputs), list(inputs)
        if len(outputs) != len(inputs):
            raise InvalidArgument("reduce_scatter_tensor_coalesced: as many outputs as inputs needed")
        op = opts.reduceOp if opts is not None else dist.ReduceOp.SUM
        reds = []
        for o, i in zip(outputs, inputs):
            _check(o, "reduce_scatter_tensor_coalesced")
            _check(i, "reduce_scatter_tensor_coalesced")
            if i.numel() != o.numel() * self._size or i.dtype != o.dtype:
                raise InvalidArgument("reduce_scatter_tensor_coalesced: input must hold size x output, same dtype")
            reds.append(_Reduction(op, o.dtype, "reduce_scatter_tensor_coalesced"))

        def run(work):
            for o, i, red in zip(outputs, inputs, reds):
                self._reduce_scatter_flat(o, _contig(i)[0], red, False)
        return self._submit("reduce_scatter_tensor_coalesced", run, outputs, opts,
                            dev=_cuda_dev(outputs, inputs))

    reduce_scatter_tensor_coalesced = reduce_scatter_single_coalesced

    def alltoall(self, output_tensors, input_tensors, opts=None):
        outs, ins = list(output_tensors), list(input_tensors)
        if len(outs) != self._size or len(ins) != self._size:
            raise InvalidArgument(f"alltoall: need {self._size} input and {self._size} output tensors, "
                                  f"got {len(ins)} and {len(outs)}")
        for x in outs + ins:
            _check(x, "alltoall")
        if len({x.dtype for x in outs + ins}) > 1:
            raise InvalidArgument("alltoall: all tensors must have the same dtype")

        def run(work):
            flats = [_bytes(_contig(i)[0]) for i in ins]
            packed_in = torch.cat(flats)
            out_sizes = [_nbytes(o) for o in outs]
            packed_out = torch.empty(sum(out_sizes), dtype=torch.uint8, device=packed_in.device)
            self._comm.all_to_all(packed_out, packed_in, out_splits=out_sizes,
                                  in_splits=[f.numel() for f in flats])
            off = 0
            for o, s in zip(outs, out_sizes):
                _copy_bytes_into(o, packed_out[off:off + s])
                off += s
        return self._submit("alltoall", run, outs, opts, dev=_cuda_dev(outs, ins))

    def all_to_all_single(self, output, input, output_split_sizes, input_split_sizes, opts=None):
        _check(output, "all_to_all_single: output")
        _check(input, "all_to_all_single: input")
        if output.dtype != input.dtype:
            raise InvalidArgument(f"all_to_all_single: output dtype {output.dtype} differs from input "
                                  f"dtype {input.dtype}")
        in_splits = self._splits(input, input_split_sizes, "input")
        out_splits = self._splits(output, output_split_sizes, "output")

        def run(work):
            fo, wbo = _contig(output)
            fi, _ = _contig(input)
            self._comm.all_to_all(_bytes(fo), _bytes(fi), out_splits=out_splits, in_splits=in_splits)
            wbo()
        return self._submit("all_to_all_single", run, [output], opts, dev=_cuda_dev(output, input))

    alltoall_base = all_to_all_single

    def _splits(self, t, splits, name):
        """Split sizes (rows of dim 0) -> byte counts per rank."""
        rows = t.shape[0] if t.dim() else 1
        row_bytes = (_nbytes(t) // rows) if rows else 0
        splits = [int(s) for s in (splits or [])]
        if not splits:
            if rows % self._size:
                raise InvalidArgument(f"all_to_all_single: {name} has {rows} rows, not divisible by "
                                      f"size {self._size}; pass {name}_split_sizes")
            return [rows // self._size * row_bytes] * self._size
        if len(splits) != self._size or any(s < 0 for s in splits) or sum(splits) != rows:
            raise InvalidArgument(f"all_to_all_single: {name}_split_sizes {splits} must be {self._size} "
                                  f"non-negative row counts adding up to {rows}")
        return [s * row_bytes for s in splits]

    def barrier(self, opts=None):
        def run(work):
            self._comm.barrier()
        return self._submit("barrier", run, [], opts)

    def monitored_barrier(self, timeout=None, wait_all_ranks=False):
        """Gloo's monitored barrier: rank 0 hears from every rank within `timeout` (else raises
        naming the missing ranks), then releases them."""
        limit = _seconds(timeout) or self._timeout
        token = torch.zeros(1, dtype=torch.uint8)
        what = self._what("monitored_barrier")
        if self._rank != 0:
            w = self._p2p_send(token, 0, _MONITOR_TAG, "monitored_barrier")
            r = self._p2p_recv(torch.zeros(1, dtype=torch.uint8), 0, _MONITOR_TAG + 1, "monitored_barrier")
            try:
                w.wait(limit)
                r.wait(limit)
            except Timeout:
                raise Timeout(f"{what}: rank 0 did not release rank {self._rank} within {limit:g}s") from None
            return
        recvs = {p: self._p2p_recv(torch.zeros(1, dtype=torch.uint8), p, _MONITOR_TAG, "monitored_barrier")
                 for p in range(1, self._size)}
        deadline = time.monotonic() + limit
        missing = []
        for p, w in recvs.items():
            try:
                w.wait(max(0.001, deadline - time.monotonic()))
            except Timeout:
                missing.append(p)
                if not wait_all_ranks:
                    raise Timeout(f"{what}: Rank {p} failed to pass monitoredBarrier in {limit * 1000:.0f} ms") \
                        from None
            except PycclError as e:
                missing.append(p)
                if not wait_all_ranks:
                    raise PeerFailure(f"{what}: Rank {p} failed to pass monitoredBarrier: {e}") from None
        if missing:
            raise Timeout(f"{what}: Ranks {', '.join(map(str, missing))} failed to pass monitoredBarrier in "
                          f"{limit * 1000:.0f} ms")
        for p in range(1, self._size):
            self._p2p_send(torch.zeros(1, dtype=torch.uint8), p, _MONITOR_TAG + 1, "monitored_barrier")

    # ===== point-to-point ===================================================================
    def _peer_ok(self, peer, what):
        if not isinstance(peer, int) or not 0 <= peer < self._size:
            raise InvalidArgument(f"{what}: rank {peer!r} is outside this group (0..{self._size - 1})")
        return peer

    def _p2p_send(self, t, peer, tag, name):
        work = _PycclWork(self._what(f"{name} to rank {peer}"), [t])
        flat, _ = _contig(t)
        if flat.is_cuda:
            # Staged (module doc): copy to pinned memory on the caller's stream; the engine
            # sends once that copy has happened. t may be changed as soon as this returns.
            host = torch.empty(_nbytes(flat), dtype=torch.uint8, pin_memory=True)
            host.copy_(_bytes(flat), non_blocking=True)
            ready = torch.cuda.Event()
            ready.record()
            self._p2p.send(host, peer, tag, work, ready)
            return work
        self._p2p.send(_bytes(flat), peer, tag, work)   # in place: do not modify t before wait()
        return work

    def _p2p_recv(self, t, peer, tag, name):
        src = "any rank" if peer is None else f"rank {peer}"
        work = _PycclWork(self._what(f"{name} from {src}"), [t])
        flat, wb = _contig(t)
        if flat.is_cuda:
            host, writeback = self._staged_recv(flat, wb, work)
            self._p2p.recv(host, peer, tag, work, writeback)
            return work
        self._p2p.recv(_bytes(flat), peer, tag, work, wb)
        return work

    def _staged_recv(self, flat, wb, work):
        """(pinned landing buffer, write-back) of a receive into CUDA tensor `flat`: the engine
        thread copies the bytes to the GPU on a pyccl stream that waits for the caller's
        stream as it is now, and hands the copy's event to the Work (wait() joins it)."""
        dev = flat.get_device()
        host = torch.empty(_nbytes(flat), dtype=torch.uint8, pin_memory=True)
        posted = torch.cuda.Event()
        posted.record()
        dst = _bytes(flat)

        def writeback():
            with torch.cuda.device(dev):
                s = self._p2p_streams.get(dev)
                if s is None:
                    s = self._p2p_streams[dev] = torch.cuda.Stream(device=dev)
                s.wait_event(posted)
                with torch.cuda.stream(s):
                    dst.copy_(host, non_blocking=True)
                    wb()
                ev = torch.cuda.Event()
                ev.record(s)
            work._cuda_ready = (dev, ev)
        return host, writeback

    def send(self, tensors, dstRank, tag=0):
        t = _single(tensors, "send")
        self._check_usable("send")
        return self._p2p_send(t, self._peer_ok(int(dstRank), "send"), tag, "send")

    def recv(self, tensors, srcRank, tag=0):
        t = _single(tensors, "recv")
        self._check_usable("recv")
        return self._p2p_recv(t, self._peer_ok(int(srcRank), "recv"), tag, "recv")

    def recv_anysource(self, tensors, tag=0):
        t = _single(tensors, "recv_anysource")
        self._check_usable("recv_anysource")
        return self._p2p_recv(t, None, tag, "recv")

    def _check_usable(self, what):
        if self._closed:
            raise PycclError(f"pyccl {what}: the process group is shut down")

    # ===== helpers ===========================================================================
    def _root(self, root, what):
        root = int(root)
        if not 0 <= root < self._size:
            raise InvalidArgument(f"{what}: root {root} is outside this group (0..{self._size - 1})")
        return root


def _copy_bytes_into(dst, src_bytes):
    """Copy flat bytes into tensor `dst` (any layout or dtype)."""
    if dst.is_complex():
        dst = torch.view_as_real(dst)
    if dst.is_contiguous():
        _bytes(dst).copy_(src_bytes)
    elif src_bytes.numel():
        dst.copy_(src_bytes.view(dst.dtype).view(dst.shape))


# ---- registration -----------------------------------------------------------------------------------
def _create(store, rank, size, timeout):
    """torch's creator: (PrefixStore of the group, group rank, group size, timedelta)."""
    return ProcessGroupPyccl(store, rank, size, timeout)


def register():
    """Register the backend "pyccl" with torch.distributed (idempotent)."""
    if BACKEND_NAME.upper() in getattr(dist.Backend, "_plugins", {}):
        return
    dist.Backend.register_backend(BACKEND_NAME, _create, devices=["cpu", "cuda"])


def _autoload():
    """Entry point of the `torch.backends` group, which `import torch` calls. It must never
    make `import torch` fail, so every error becomes a warning."""
    try:
        register()
    except Exception as e:  # noqa: BLE001
        import warnings
        warnings.warn(f"pyccl: could not register the torch.distributed backend 'pyccl': {e}", stacklevel=2)


register()
