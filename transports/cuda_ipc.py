"""CUDA IPC: GPU memory of the other ranks on this host, mapped into this process.

This is the transport layer under the GPU fast paths (ccl/engines/cuda/). It is not
a byte-stream `Connection` for the executor: the executor walks host (numpy) buffers, while
GPU collectives read and write the peers' memory directly, over NVLink or PCIe, with copy
engines (``cudaMemcpyAsync`` between peer-mapped pointers) and with kernels that load and
store peer addresses. What it provides:

* :func:`allocation_of` — the CUDA allocation holding a device pointer (unique buffer id,
  base, size), read with the driver's ``cuPointerGetAttributes`` through ctypes.
* :class:`IpcRegistry` — user buffers and pyccl's own scratch exported as CUDA IPC memory
  handles, *once per allocation* (keyed by the driver's buffer id, which is never reused in
  a process, so a freed-and-reallocated address is never mistaken for the old buffer); the
  handles travel through the communicator's bootstrap store (``cuda/ipc/<rank>/<buffer id>``)
  and each peer opens them once and keeps them in an LRU cache.
* :class:`HostMailbox` — a small /dev/shm segment shared by the ranks of the host, through
  which each collective tells its peers which allocation (and offset, counts) to write into.
  Two slots per rank (the ranks are never more than one exchange apart), a sequence number
  per exchange, bounded waits that also watch the peer processes.
* :class:`HostStatus` — a few words of pinned host memory mapped into the device. Kernels
  write their errors there (timeout, abort, mismatch, with the peer and the epoch); the host
  writes the abort request there, which every spinning kernel polls, so no kernel waits for a
  dead peer longer than it takes the host to notice.
* :class:`PeerWatch` — whether the peer processes are still alive (same host: their pid).

Only ranks of one host use it: :meth:`CudaIpcTransport.can_connect` says so. Requires cupy
(the ``[gpu]`` extra) and a CUDA driver; :meth:`CudaIpcTransport.available` says why not.
"""
import collections
import ctypes
import mmap
import os
import secrets
import struct
import time

import numpy as np

from .. import settings
from ..errors import InvalidArgument, PeerFailure, Timeout, TransportError
from ..process import pid_alive
from .base import Transport

#: CUpointer_attribute values (cuda.h).
_ATTR_BUFFER_ID = 7
_ATTR_RANGE_START = 11
_ATTR_RANGE_SIZE = 12

_libcuda = None
_attr_call = None


def _cupy():
    try:
        import cupy
    except ImportError as e:
        raise InvalidArgument(f"CUDA buffers need cupy (pip install 'pyccl[gpu]'): {e}") from None
    return cupy


def _driver():
    global _libcuda, _attr_call
    if _libcuda is None:
        try:
            lib = ctypes.CDLL("libcuda.so.1")
        except OSError as e:
            raise TransportError(f"cuda_ipc: cannot load the CUDA driver libcuda.so.1: {e}") from None
        fn = lib.cuPointerGetAttributes
        fn.restype = ctypes.c_int
        fn.argtypes = [ctypes.c_uint, ctypes.POINTER(ctypes.c_int), ctypes.POINTER(ctypes.c_void_p),
                       ctypes.c_ulonglong]
        attrs = (ctypes.c_int * 3)(_ATTR_BUFFER_ID, _ATTR_RANGE_START, _ATTR_RANGE_SIZE)
        vals = (ctypes.c_ulonglong * 3)()
        ptrs = (ctypes.c_void_p * 3)(*[ctypes.addressof(vals) + 8 * i for i in range(3)])

        def call(ptr):
            rc = fn(3, attrs, ptrs, ptr)
            return rc, vals[0], vals[1], vals[2]
        _libcuda, _attr_call = lib, call
    return _libcuda


def allocation_of(ptr: int):
    """(buffer id, base address, size) of the CUDA allocation that holds device pointer `ptr`."""
    _driver()
    rc, bufid, base, size = _attr_call(ptr)
    if rc != 0:
        raise InvalidArgument(f"cuda_ipc: pointer 0x{ptr:x} is not device memory the CUDA driver knows "
                              f"(cuPointerGetAttributes error {rc})")
    return bufid, base, size


_launch = None


def launcher():
    """launch(function, grid, block, stream, params_address): cuLaunchKernel.

    cupy's Cython binding ``cupy.cuda.driver.launchKernel`` takes plain integers and costs
    well under a microsecond of Python; ctypes with argtypes (the fallback, or
    PYCCL_CUDA_LAUNCH=ctypes) spends a few more on converting eleven arguments."""
    global _launch
    if _launch is None:
        drv = None
        if settings.get("PYCCL_CUDA_LAUNCH") != "ctypes":
            drv = getattr(getattr(getattr(_cupy(), "cuda", None), "driver", None), "launchKernel", None)
        if drv is not None:
            def launch(fn, grid, block, stream, params):
                drv(fn, grid, 1, 1, block, 1, 1, 0, stream, params, 0)
        else:
            c = _driver().cuLaunchKernel
            c.restype = ctypes.c_int
            c.argtypes = [ctypes.c_void_p] + [ctypes.c_uint] * 7 + [ctypes.c_void_p] * 3

            def launch(fn, grid, block, stream, params):
                rc = c(fn, grid, 1, 1, block, 1, 1, 0, stream, params, None)
                if rc != 0:
                    raise TransportError(f"cuda_ipc: cuLaunchKernel failed with CUDA driver error {rc}")
        _launch = launch
    return _launch


class KernelParams:
    """A kernel's parameter block, built once and kept: ``address`` is the ``void**`` that
    cuLaunchKernel reads (the driver copies the values at launch, so the block can be changed
    for the next launch right away). `types` in letters: u = 64-bit unsigned (pointers too),
    i = 64-bit signed, s = 32-bit signed."""

    _CT = {"u": ctypes.c_uint64, "i": ctypes.c_int64, "s": ctypes.c_int32}
    __slots__ = ("vals", "arr", "address")

    def __init__(self, types: str, args=None):
        self.vals = [self._CT[t]() for t in types]
        self.arr = (ctypes.c_void_p * len(self.vals))(*[ctypes.addressof(v) for v in self.vals])
        self.address = ctypes.addressof(self.arr)
        if args is not None:
            self.set(args)

    def set(self, args):
        for v, a in zip(self.vals, args):
            v.value = a


class KernelLauncher:
    """launcher(grid, block, stream, args): set the whole parameter block, then launch. Not
    thread-safe (one parameter block): the communicator runs one collective at a time."""

    def __init__(self, function_ptr: int, types: str):
        self.fn = function_ptr
        self.params = KernelParams(types)
        self.launch = launcher()

    def __call__(self, grid: int, block: int, stream: int, args):
        self.params.set(args)
        self.launch(self.fn, grid, block, stream, self.params.address)


class IpcRegistry:
    """Export this rank's allocations as IPC handles once; open the peers' once (LRU cache)."""

    def __init__(self, rank: int, store, timeout: float, max_open: int = 512):
        self.rank = rank
        self.store = store
        self.timeout = timeout
        self.max_open = max_open
        self.exported = {}                         # buffer id -> base
        self.opened = collections.OrderedDict()    # (peer, buffer id) -> mapped base
        self.before_close = None                   # called before an evicted mapping closes

    def export(self, ptr: int):
        """(buffer id, offset) naming `ptr` for the peers; publishes the handle on first use."""
        bufid, base, size = allocation_of(ptr)
        if bufid not in self.exported:
            cupy = _cupy()
            try:
                handle = cupy.cuda.runtime.ipcGetMemHandle(base)
            except cupy.cuda.runtime.CUDARuntimeError as e:
                raise InvalidArgument(
                    f"cuda_ipc: cannot export allocation at 0x{base:x} ({size} bytes) as a CUDA IPC "
                    f"handle: {e}. pyccl needs memory from cudaMalloc (torch's caching allocator "
                    f"without expandable_segments, cupy's default pool)") from None
            self.store.set(f"cuda/ipc/{self.rank}/{bufid}", handle + struct.pack("<QQ", base, size))
            self.exported[bufid] = base
        return bufid, ptr - self.exported[bufid]

    def peer_base(self, peer: int, bufid: int) -> int:
        """The base of peer `peer`'s allocation `bufid` mapped here: opened once (its handle from
        the store), then from the cache; the least recently used mappings close past the bound."""
        key = (peer, bufid)
        base = self.opened.get(key)
        if base is not None:
            self.opened.move_to_end(key)
            self._reused(key)
            return base
        raw = bytes(self.store.get(f"cuda/ipc/{peer}/{bufid}", timeout=self.timeout))
        cupy = _cupy()
        try:
            base = cupy.cuda.runtime.ipcOpenMemHandle(raw[:64])
        except cupy.cuda.runtime.CUDARuntimeError as e:
            raise TransportError(f"cuda_ipc: rank {self.rank} cannot open rank {peer}'s memory handle "
                                 f"(allocation {bufid}): {e}") from None
        self.opened[key] = base
        self._added(key, raw)
        self._evict(keep=key)
        return base

    # hooks of subclasses that keep more per mapping (ccl/engines/cuda/ipc_cache.py: sizes, kinds)
    def _reused(self, key):
        """A mapping in the cache is used again."""

    def _added(self, key, raw: bytes):
        """A mapping was just opened; `raw` is what its owner published (handle, base, size)."""

    def _evict(self, keep):
        """Close the least recently used mappings (never `keep`) while more than max_open are open."""
        while len(self.opened) > self.max_open:
            old = next((k for k in self.opened if k != keep), None)
            if old is None:
                return
            if self.before_close is not None:
                self.before_close()
            self.close_mapping(old)

    def peer_ptr(self, peer: int, bufid: int, offset: int) -> int:
        return self.peer_base(peer, bufid) + offset

    def close_mapping(self, key):
        """Unmap one peer allocation (best effort: at teardown the context may be going away)."""
        base = self.opened.pop(key, None)
        if base:
            try:
                _cupy().cuda.runtime.ipcCloseMemHandle(base)
            except Exception:  # noqa: BLE001 - best effort, as said
                pass

    def close(self):
        for key in list(self.opened):
            self.close_mapping(key)


def published_size(raw: bytes) -> int:
    """The allocation size in a record that IpcRegistry.export published (0 when absent)."""
    return struct.unpack_from("<QQ", raw, 64)[1] if len(raw) >= 80 else 0


class HostStatus:
    """Pinned, device-mapped host words: [0] abort request (host -> kernels), [1] error code,
    [2] epoch, [3] peer, [4] where (kernels -> host). Error codes: see ERRORS."""

    WORDS = 8
    ERRORS = {1: "timed out", 2: "aborted", 3: "found a mismatched call"}

    def __init__(self):
        cupy = _cupy()
        # cudaHostAllocPortable | cudaHostAllocMapped: with unified addressing the host
        # pointer is also the device pointer.
        self.ptr = cupy.cuda.runtime.hostAlloc(8 * self.WORDS, 1 | 2)
        self.words = (ctypes.c_int64 * self.WORDS).from_address(self.ptr)
        for i in range(self.WORDS):
            self.words[i] = 0

    @property
    def error(self) -> int:
        return self.words[1]

    def abort(self):
        self.words[0] = 1

    def describe(self) -> tuple:
        """(code, epoch, peer, where) of the first error a kernel reported."""
        return self.words[1], self.words[2], self.words[3], self.words[4]

    def close(self):
        if self.ptr:
            cupy = _cupy()
            self.words = None
            try:
                cupy.cuda.runtime.freeHost(self.ptr)
            except Exception:  # noqa: BLE001 - best effort at teardown
                pass
            self.ptr = 0


class PeerWatch:
    """Is a peer process (same host) still alive? Only trusted for pids visible at set-up."""

    def __init__(self, pids: dict):
        self.pids = {r: p for r, p in pids.items() if p and pid_alive(p)}

    def dead(self):
        """[(rank, pid)] of the watched peers that exited."""
        return [(r, p) for r, p in self.pids.items() if not pid_alive(p)]


class HostMailbox:
    """Per-rank slots in one /dev/shm segment: [2 phases][size ranks][1 + WORDS int64], then
    one abort word per rank.

    Word 0 of a slot is the exchange's sequence number, written last; the rest is the payload.
    A rank posts exchange k into phase k % 2 and reads the peers' phase k % 2; no rank can
    post k + 2 before every peer has read k (it needs their k + 1 first), so two phases do.
    A rank whose communicator breaks sets its abort word (``mark_aborted``): its peers'
    watchdogs read them (``aborted_peers``) and stop waiting for it, though its process lives."""

    def __init__(self, rank: int, size: int, store, tag: str, timeout: float, words: int):
        self.rank, self.size, self.timeout, self.words = rank, size, timeout, words
        nbytes = (2 * size * (1 + words) + size) * 8
        if rank == 0:
            name = f"pyccl-cuda-{os.getpid()}-{secrets.token_hex(6)}"
            fd = os.open(f"/dev/shm/{name}", os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
            try:
                os.ftruncate(fd, nbytes)
                self.mm = mmap.mmap(fd, nbytes)
            finally:
                os.close(fd)
            store.set("cuda/mailbox", name.encode())
        else:
            name = store.get("cuda/mailbox", timeout=timeout).decode()
            fd = os.open(f"/dev/shm/{name}", os.O_RDWR)
            try:
                self.mm = mmap.mmap(fd, nbytes)
            finally:
                os.close(fd)
        opened = store.add("cuda/mailbox_opened", 1)
        if rank == 0:
            deadline = time.monotonic() + timeout
            while opened < size:
                if time.monotonic() > deadline:
                    os.unlink(f"/dev/shm/{name}")
                    raise Timeout(f"cuda_ipc: only {opened} of {size} ranks opened the CUDA mailbox "
                                  f"within {timeout:.0f}s")
                time.sleep(0.001)
                opened = store.add("cuda/mailbox_opened", 0)
            os.unlink(f"/dev/shm/{name}")      # nothing left in /dev/shm, even after a crash
        slots = 2 * size * (1 + words)
        self.view = np.frombuffer(self.mm, dtype=np.int64, count=slots).reshape(2, size, 1 + words)
        self.aborts = np.frombuffer(self.mm, dtype=np.int64, count=size, offset=slots * 8)
        self.words_mv = memoryview(self.mm).cast("q")       # cheap scalar reads of the sequence words
        self.stride = 1 + words

    def post(self, seq: int, payload: np.ndarray):
        slot = self.view[seq & 1, self.rank]
        slot[1:1 + payload.size] = payload
        slot[0] = seq                          # x86: stores become visible in program order

    def _arrived(self, seq: int) -> bool:
        mv, base, stride = self.words_mv, (seq & 1) * self.size * self.stride, self.stride
        for r in range(self.size):
            if mv[base + r * stride] != seq:
                return False
        return True

    def collect(self, seq: int, check=None) -> np.ndarray:
        """Every rank's payload of exchange `seq` ([size, words] int64). `check()` is called
        while waiting and raises to give up (peer died, abort)."""
        rows = self.view[seq & 1]
        seqs = rows[:, 0]
        if self._arrived(seq):
            return rows[:, 1:].copy()
        start = time.monotonic()
        spins = 0
        while True:
            if self._arrived(seq):
                return rows[:, 1:].copy()
            spins += 1
            if spins > 200:
                now = time.monotonic()
                if check is not None and spins % 64 == 0:
                    check()
                if now - start > self.timeout:
                    late = [r for r in range(self.size) if seqs[r] != seq]
                    raise Timeout(f"cuda_ipc: rank {self.rank} waited {self.timeout:.0f}s for rank(s) {late} "
                                  f"to reach CUDA exchange #{seq} (they are at #{[int(seqs[r]) for r in late]})")
                if spins > 2000:
                    time.sleep(0.0001 if now - start < 0.1 else 0.001)

    def mark_aborted(self):
        if self.mm is not None:
            self.aborts[self.rank] = 1

    def aborted_peers(self) -> list:
        if self.mm is None:
            return []
        return [r for r in range(self.size) if r != self.rank and self.aborts[r]]

    def close(self):
        if self.mm is not None:
            self.view = None
            self.aborts = None
            self.words_mv.release()
            try:
                self.mm.close()
            except BufferError:       # a caller still holds a view; the mapping goes with it
                pass
            self.mm = None


class CudaIpcTransport(Transport):
    """Selection-side face of the CUDA path: same host and both ranks on a GPU.

    Collectives on CUDA buffers do not go through the executor's connections, so `connect`
    opens none; the peer mappings are made by ccl/engines/cuda/ on first use."""

    name = "cuda_ipc"

    @staticmethod
    def available() -> tuple:
        try:
            import cupy
            n = cupy.cuda.runtime.getDeviceCount()
        except Exception as e:  # noqa: BLE001 - any failure means "not here", with the reason
            return False, f"cupy/CUDA not usable: {type(e).__name__}: {e}"
        if n < 1:
            return False, "no CUDA device"
        return True, ""

    def can_connect(self, me: dict, peer: dict) -> bool:
        return me.get("host") == peer.get("host") and bool(me.get("gpu")) and bool(peer.get("gpu"))

    def connect(self, ctx, peers: list) -> dict:
        raise PeerFailure("cuda_ipc carries CUDA buffers through ccl/engines/cuda/, not executor "
                          "connections")
