"""CUDA IPC for the point-to-point engine: CUDA tensors between the ranks of one host go GPU to
GPU, not through pinned host memory and the CPU connection.

Why a file of its own: p2p_engine.py matches messages and drives the connections and stays
free of CUDA; everything the one-host path does on the GPU is here (the sender's staging pool,
exported once per block through transports/cuda_ipc.IpcRegistry; the receive-side copies; the
counters). The engine only learns three more header kinds (IPC, ACK, FOR).

The protocol (sender and receiver on the same ``host`` of ``comm.peer_info``, the sent tensor
on a GPU, unless ``PYCCL_P2P_IPC=0``, see ``enabled``; across hosts, to itself, for CPU tensors and for 0 bytes
nothing changes):

1. send (caller's thread): the tensor is copied into a block of this rank's staging pool
   (device memory from cudaMalloc, exported as a CUDA IPC handle once per block) on the
   caller's current stream, and an event is recorded there. The engine polls that event (the
   host never blocks on it) and only once it has happened sends the header ``IPC(tag, nbytes,
   message id, allocation id, offset)`` on the CPU connection, in order with the other
   messages to that peer. Readiness is therefore "event recorded and completed on the sender
   before the announcement"; not an IPC event, which would need an event exchanged per block
   and a cudaStreamWaitEvent on another process's event, to save the tens of microseconds of
   the poll. The send's Work completes once the header is out: sends stay eager.
2. recv: matching is unchanged (tag, source or any source, in order; an announcement that comes
   before its receive waits in the unexpected list, it has no payload to drain). Once matched,
   the receiver opens the sender's block (once per block; the registry caches it) and enqueues
   ``cudaMemcpyAsync(peer block -> tensor)`` on its receive stream, which first waits for the
   caller's stream as it was when the receive was posted. The Work completes at once; wait()
   makes the current stream wait for the copy (stream-ordered, as the staged receive was).
3. ack: when that copy has finished on the GPU (event polled), the receiver sends
   ``ACK(message id, done)`` and the sender puts the block back into its pool.
4. refusal: a receive that cannot take the bytes over IPC (its tensor is on the CPU; the
   receiving process has no cupy or PYCCL_P2P_IPC=0; opening or copying failed) answers
   ``ACK(message id, send the bytes)``; the sender copies the block to pinned memory and sends
   ``FOR(message id)`` with the payload over the connection; it lands as a staged receive.

Why a staging pool and not the user's tensor itself (zero copy, the send completing on the
ack, as NCCL's): (a) the engine's sends never wait for the receiver, and users rely on it (a
ring of blocking ``send`` then ``recv``, blocking sends received out of tag order, messages
sent before the receive is posted); with the user's buffer the send would have to wait for the
receive. (b) CUDA lets a process open another process's allocation only once (a second
cudaIpcOpenMemHandle fails with "already mapped"); the CUDA collectives' registry
(ccl/engines/cuda/) opens the allocations of the user's tensors, and torch's caching
allocator puts many tensors in one allocation, so a second registry opening them for
point-to-point would break one of the two. The pool's blocks are seen by no other registry.
(c) memory that cannot be exported (torch's expandable segments) still goes over IPC. The cost
is one copy inside the sender's GPU (device memory bandwidth, several times the NVLink rate)
and up to ``POOL_MAX_BYTES`` of device memory per GPU and group, outside torch's allocator;
a send that does not fit goes through host memory as before. Blocks still lent when the group
shuts down, or lent to a rank that died, are never freed (the peer may still read them).
"""
import collections
import logging
import threading

import torch

from .. import settings
from ..errors import PycclError, TransportError
from ..store import PrefixStore
from pyccl.transports import cuda_ipc

from .tensors import _bytes, _nbytes

log = logging.getLogger("pyccl")

POOL_MAX_BYTES = 1 << 30        # staging blocks per GPU and group; beyond it, sends go through host memory
MIN_BLOCK = 1 << 20             # smallest block (one cudaMalloc and one IPC handle each)
_MEMCPY_DEFAULT = 4             # cudaMemcpyDefault (unified addressing)


def enabled() -> bool:
    """On unless ``PYCCL_P2P_IPC=0`` (CUDA tensors then go through host memory on one host too).
    On since tests/test_cuda_p2p.py and the pipeline example ran on an H100 (bench/JOURNAL.md,
    "Run on an H100, 2026-12-07")."""
    return settings.get("PYCCL_P2P_IPC")


def size_class(n: int) -> int:
    """Block size for `n` bytes: MIN_BLOCK, else `n` rounded up to an eighth of its power of two."""
    if n <= MIN_BLOCK:
        return MIN_BLOCK
    step = (1 << (n - 1).bit_length()) // 8
    return (n + step - 1) // step * step


class Block:
    """One staging allocation: GPU `dev`, `size` bytes at `ptr`, named for the peers by
    (`bufid`, `offset`); `nbytes` of it hold the message it carries now."""
    __slots__ = ("dev", "ptr", "size", "bufid", "offset", "nbytes")


class StagingPool:
    """The sender's blocks, per (GPU, size class); taken by the caller's thread, given back by
    the engine thread when the receiver acknowledged the copy."""

    def __init__(self, registry, max_bytes):
        self.registry = registry
        self.max_bytes = max_bytes
        self._lock = threading.Lock()
        self._free = collections.defaultdict(list)     # (dev, size) -> [Block]
        self.total = collections.Counter()              # dev -> bytes allocated
        self.lent = 0                                   # blocks out (not yet given back)

    def take(self, rt, dev, nbytes):
        """A block of at least `nbytes` on GPU `dev` (the current device), or None if the pool
        is full or the allocation fails."""
        size = size_class(nbytes)
        with self._lock:
            free = self._free.get((dev, size))
            if free:
                b = free.pop()
                b.nbytes = nbytes
                self.lent += 1
                return b
            if self.total[dev] + size > self.max_bytes:
                return None
            self.total[dev] += size
        try:
            ptr = rt.malloc(size)
        except rt.CUDARuntimeError as e:
            log.info("pyccl p2p: no device memory for a %d-byte staging block (%s); staging through host", size, e)
            with self._lock:
                self.total[dev] -= size
            return None
        try:
            bufid, offset = self.registry.export(ptr)
        except BaseException:
            rt.free(ptr)
            with self._lock:
                self.total[dev] -= size
            raise
        b = Block()
        b.dev, b.ptr, b.size, b.bufid, b.offset, b.nbytes = dev, ptr, size, bufid, offset, nbytes
        with self._lock:
            self.lent += 1
        return b

    def give_back(self, b):
        with self._lock:
            self._free[(b.dev, b.size)].append(b)
            self.lent -= 1

    def close(self, rt):
        with self._lock:
            blocks = [b for lst in self._free.values() for b in lst]
            self._free.clear()
        for b in blocks:
            try:
                with _cupy_device(b.dev):
                    rt.free(b.ptr)
            except Exception as e:  # noqa: BLE001 - best effort at teardown (context may be gone)
                log.debug("pyccl p2p: freeing a staging block: %s", e)


def _cupy_device(dev):
    return cuda_ipc._cupy().cuda.Device(dev)


class CudaRecv:
    """A receive into a CUDA tensor: `dst` (its bytes, contiguous) and `wb` (the write-back
    into a non-contiguous original). Either the bytes come GPU to GPU (`pull`), or they land in
    pinned memory (`landing`, made when first needed) and `writeback` copies them up. Both
    copies run on the group's receive stream of the device, which first waits for `posted`:
    the caller's stream when the receive was posted. The Work gets the copy's event."""
    __slots__ = ("dev", "dst", "wb", "posted", "work", "streams", "nbytes", "host")

    def __init__(self, flat, wb, work, streams):
        self.dev = flat.get_device()
        self.dst = _bytes(flat)
        self.nbytes = _nbytes(flat)
        self.wb, self.work, self.streams, self.host = wb, work, streams, None
        self.posted = torch.cuda.Event()
        self.posted.record(torch.cuda.current_stream(self.dev))

    def landing(self):
        if self.host is None:
            with torch.cuda.device(self.dev):
                self.host = torch.empty(self.nbytes, dtype=torch.uint8, pin_memory=True)
        return self.host

    def _stream(self):
        s = self.streams.get(self.dev)
        if s is None:
            s = self.streams[self.dev] = torch.cuda.Stream(device=self.dev)
        s.wait_event(self.posted)
        return s

    def _done(self, s):
        with torch.cuda.stream(s):
            self.wb()
        self.dst.record_stream(s)          # a temporary (non-contiguous target) lives until the copy is over
        ev = torch.cuda.Event()
        ev.record(s)
        self.work._cuda_ready = (self.dev, ev)
        return ev

    def writeback(self):
        """The bytes arrived in pinned memory: copy them to the tensor (engine thread)."""
        with torch.cuda.device(self.dev):
            s = self._stream()
            if self.nbytes:
                with torch.cuda.stream(s):
                    self.dst.copy_(self.landing(), non_blocking=True)
            self._done(s)

    def pull(self, rt, src, nbytes):
        """Copy `nbytes` from device address `src` (a peer's block) to the tensor; the event."""
        with torch.cuda.device(self.dev):
            s = self._stream()
            rt.memcpyAsync(self.dst.data_ptr(), src, nbytes, _MEMCPY_DEFAULT, s.cuda_stream)
            return self._done(s)


class P2PIpc:
    """The engine's CUDA IPC side for one group (see the module doc). `counters` is shared with
    the engine (p2p_engine._P2PEngine.stats)."""

    def __init__(self, comm, rank, timeout, counters):
        me = comm.peer_info[rank].get("host")
        self.local = {r for r, i in enumerate(comm.peer_info) if r != rank and i.get("host") == me}
        self.registry = cuda_ipc.IpcRegistry(rank, PrefixStore(comm.store, "p2pipc"), timeout)
        self.registry.before_close = self._quiesce
        self.pool = StagingPool(self.registry, POOL_MAX_BYTES)
        self.counters = counters
        self.off = None                 # why this process cannot use CUDA IPC (then: host staging)
        self._rt = None
        self._last = {}                 # dev -> event of the latest receive copy
        self._side = {}                 # dev -> stream of the copies to host that receivers ask for

    def runtime(self):
        """cupy's CUDA runtime module, or None (and `off` says why)."""
        if self._rt is None and self.off is None:
            try:
                self._rt = cuda_ipc._cupy().cuda.runtime
            except PycclError as e:
                self.off = str(e)
                log.info("pyccl p2p: CUDA IPC off in this process: %s", e)
        return self._rt

    def reaches(self, peer) -> bool:
        """Whether a CUDA send to `peer` goes over IPC (same host, usable here)."""
        return peer in self.local and self.off is None

    # -- sender, caller's thread --
    def stage(self, flat):
        """(Block, event): CUDA tensor `flat` copied into a staging block on the caller's current
        stream, the event recorded after it; None: send it through host memory instead."""
        rt = self.runtime()
        if rt is None:
            return None
        dev, n = flat.get_device(), _nbytes(flat)
        with _cupy_device(dev):
            try:
                b = self.pool.take(rt, dev, n)
            except PycclError as e:             # the allocation cannot be exported: IPC is off here
                self.off = str(e)
                log.warning("pyccl p2p: CUDA IPC off in this process: %s", e)
                return None
            if b is None:
                self.counters["pool_full"] += 1
                return None
            stream = torch.cuda.current_stream(dev)
            try:
                rt.memcpyAsync(b.ptr, flat.data_ptr(), n, _MEMCPY_DEFAULT, stream.cuda_stream)
            except BaseException:
                self.pool.give_back(b)
                raise
            ev = torch.cuda.Event()
            ev.record(stream)
        return b, ev

    # -- sender, engine thread --
    def give_back(self, b):
        self.pool.give_back(b)

    def to_host(self, b):
        """(pinned copy of block `b`'s message, event after the copy): for a receiver that asked
        for the bytes."""
        rt = self.runtime()
        with torch.cuda.device(b.dev), _cupy_device(b.dev):
            host = torch.empty(b.nbytes, dtype=torch.uint8, pin_memory=True)
            s = self._side.get(b.dev)
            if s is None:
                s = self._side[b.dev] = torch.cuda.Stream(device=b.dev)
            rt.memcpyAsync(host.data_ptr(), b.ptr, b.nbytes, _MEMCPY_DEFAULT, s.cuda_stream)
            ev = torch.cuda.Event()
            ev.record(s)
        return host, ev

    # -- receiver, engine thread --
    def pull(self, target, peer, bufid, offset, nbytes):
        """Enqueue the copy of `peer`'s block into CudaRecv `target`; its event. Raises
        (TransportError, CUDA errors) when it cannot: the caller asks for the bytes instead."""
        rt = self.runtime()
        if rt is None:
            raise TransportError(f"CUDA IPC is off in this process ({self.off})")
        with _cupy_device(target.dev):
            src = self.registry.peer_ptr(peer, bufid, offset)
            ev = target.pull(rt, src, nbytes)
        self._last[target.dev] = ev
        self.counters["ipc_received"] += 1
        return ev

    def _quiesce(self):
        """Before a peer mapping is closed (registry LRU, close): our copies from it are over."""
        for ev in list(self._last.values()):
            ev.synchronize()

    def lent(self) -> int:
        return self.pool.lent

    def close(self):
        rt = self._rt
        if rt is None:
            return
        try:
            self._quiesce()
        except RuntimeError as e:
            log.debug("pyccl p2p: waiting for the receive copies at close: %s", e)
        self.registry.close()
        self.pool.close(rt)
