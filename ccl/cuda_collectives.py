"""GPU fast paths: collectives on CUDA buffers of ranks that share a host.

The communicator sends every collective whose buffers are on a GPU here (``submit``). The
data never leaves the GPUs: each rank maps its peers' memory through CUDA IPC
(transports/cuda_ipc.py) and the bytes move over NVLink/PCIe, either

* by **copy engines** — ``cudaMemcpyAsync`` from this rank's buffer into the peer's, one
  stream per peer so that several engines run at once — for all-gather, broadcast,
  all-to-all, gather, scatter, and the copy-engine variant of the two-shot all-reduce; or
* by **kernels** (ccl/cuda_kernels.cu, compiled once per dtype and op by NVRTC through
  ``cupy.RawModule`` and cached) that store into peer memory and reduce:
  - *one-shot all-reduce* (messages up to ``PYCCL_CUDA_ONESHOT_MAX``): every rank pushes its
    buffer into every peer's scratch and reduces all copies locally. One launch, no barrier.
  - *two-shot all-reduce* (larger): reduce-scatter then all-gather in one kernel: push
    segment r to rank r, reduce the own segment, store the result into every peer's buffer.
  - *reduce-scatter*: the first half of the two-shot.

Ordering between processes uses flags in device memory (epoch + signature words, written
into the peer's flag buffer with release stores, polled with acquire loads); every wait is
bounded by the communicator's timeout and by an abort word in host-mapped memory, which the
host sets when it sees a peer process die. A kernel that gives up writes why into that host
memory and returns; the next pyccl call on this communicator (or ``work.wait(timeout)``)
raises ``PeerFailure``, ``Timeout`` or ``InvalidArgument`` (a mismatched call: other count,
dtype, op or root) naming the op, the peer and the step.

Streams (the contract, like NCCL's): a collective runs on pyccl's own stream of the device,
which first waits for the caller's current stream (so it sees the data the caller produced
there). A synchronous call then makes the caller's stream wait for pyccl's, and returns
without blocking the host: anything the caller queues afterwards on that stream sees the
result. With ``async_op=True`` the caller's stream is not held back; ``work.wait()`` makes
the *then* current stream wait (still no host block); ``work.wait(timeout=s)`` also blocks
the host until done (at most s seconds) and raises the collective's error, if any;
``work.is_completed()`` polls. Keep the buffers alive and unmodified until then (as with
NCCL). The host never waits for the GPU, except in that bounded wait and when
``PYCCL_CUDA_SYNC=1`` (every call blocks until done and raises at once: for debugging).

User buffers: collectives that write into a peer's buffer (all-gather, all-to-all,
broadcast, gather, scatter, two-shot all-reduce) tell their peers which allocation to use
through a small host mailbox (one exchange per call, /dev/shm); each allocation's IPC
handle is exported once and opened once per peer (cached). Buffers must come from cudaMalloc
(torch's caching allocator, cupy's pool) — not from ``expandable_segments``.

Environment (defaults):
  PYCCL_CUDA_ONESHOT_MAX   8388608 on 2 ranks, 4194304 on more: largest all-reduce (bytes) done one-shot
  PYCCL_CUDA_ONESHOT_CAP   8388608  one-shot scratch per rank and slot (bytes; the limit of ONESHOT_MAX)
  PYCCL_CUDA_TWOSHOT       auto     two-shot all-reduce and reduce-scatter: 'kernel' (SM stores into the
                                    peers' scratch), 'ce' (copy engines), 'pull' (every rank reads its segment
                                    from the peers' buffers with SM loads, no scratch) or 'auto' (2 ranks:
                                    all-reduce 'kernel', reduce-scatter 'pull', measured fastest on
                                    2 x H200; more ranks: PYCCL_CUDA_TWOSHOT_WIDE). 'kernel' takes copy
                                    engines for reduce-scatter segments >= RS_CE_MIN.
  PYCCL_CUDA_TWOSHOT_WIDE  kernel   what 'auto' picks on more than 2 ranks (kept at the old path until the
                                    variants are measured on 4+ GPUs: bench/gpu_bench.py --variants 1)
  PYCCL_CUDA_COPY          auto     copy collectives (all-gather, all-to-all, broadcast, gather, scatter):
                                    'ce' (copy engines, one stream per peer), 'push' (one SM kernel stores
                                    into the peers), 'pull' (all-gather and all-to-all: one SM kernel reads
                                    from the peers' buffers; the others push) or 'auto' (2 ranks: 'ce';
                                    more ranks: PYCCL_CUDA_COPY_WIDE). SM copies need 16-byte aligned
                                    pieces; others take the copy engines.
  PYCCL_CUDA_COPY_WIDE     ce       what 'auto' picks on more than 2 ranks (see TWOSHOT_WIDE)
  PYCCL_CUDA_COPY_BLOCKS   0        thread blocks of the SM copy kernel (0: the GPU's SM count)
  PYCCL_CUDA_BLOCKS        0        max thread blocks of a kernel (0: the GPU's SM count, at most 256)
  PYCCL_CUDA_SCRATCH       268435456  largest scratch region per peer (bytes); bigger messages go in rounds
  PYCCL_CUDA_RS_CE_MIN     67108864 reduce-scatter: per-rank segments (bytes) from which copy engines push
  PYCCL_CUDA_SYNC          0        1: block the host after every call and raise its error there
  PYCCL_CUDA_LAUNCH        driver   'driver': cupy's Cython cuLaunchKernel binding; 'ctypes': through ctypes

Fast lane (torch backend): ``torch_all_reduce`` returns the function that
``ProcessGroupPyccl.allreduce`` calls first for small CUDA tensors: one prepared one-shot
launch on the caller's stream per call (see its docstring).
"""
import logging
import os
import struct
import threading
import time
import zlib

import numpy as np

from .buffers import Buffer
from .dtypes import AVG, MAX, MIN, PROD, SUM
from .errors import InvalidArgument, PeerFailure, PycclError, Timeout
from .reproducible import takes

log = logging.getLogger("pyccl")

MAXR = 8                    # ranks per host the kernels take (tab layout, flags)
MAXB = 256                  # thread blocks with their own flags
FLAG_WORDS = (2 * MAXB * MAXR * 2) + 2 * (MAXB * MAXR * 2) + MAXR * 2 + 16 + MAXB * MAXR * 2   # see the .cu
THREADS = 512
MAIL_WORDS = 5 + 3 * MAXR      # sig, 2 x (buffer id, offset), 3 x size integers
_CU = os.path.join(os.path.dirname(__file__), "cuda_kernels.cu")

_CTYPE = {"float16": "__half", "bfloat16": "__nv_bfloat16", "float32": "float", "float64": "double",
          "int8": "signed char", "uint8": "unsigned char", "int32": "int", "int64": "long long",
          "bool": "unsigned char"}
_OPCODE = {SUM: 0, PROD: 1, MIN: 2, MAX: 3, AVG: 0}
_WHERE = {1: "one-shot all-reduce (waiting for the peer's data)", 2: "two-shot (waiting for the peer's segment)",
          3: "two-shot (closing)", 4: "barrier before the copies", 5: "barrier after the copies"}

#: parameter letters of each kernel (see cuda_ipc.KernelLauncher)
_PARAMS = {"oneshot": "uuiuissuuuus", "twoshot": "uiiiuui" + "u" * MAXR + "ssuuuus",
           "reduce_n": "ui" + "u" * MAXR + "ss", "barrier": "ussuuuus",
           "twoshot_pull": "iiiuu" + "u" * MAXR + "sssuuuus", "copy_n": "u" * (3 * MAXR) + "s"}
_TWOSHOT_MODES = ("auto", "kernel", "ce", "pull")
_COPY_MODES = ("auto", "ce", "push", "pull")


def _env_int(name, default):
    try:
        return int(os.environ.get(name, default))
    except ValueError:
        raise InvalidArgument(f"{name}={os.environ[name]!r} is not an integer") from None


# ---- entry from the communicator ---------------------------------------------------------------
def submit(comm, name, async_op, sig, *args):
    """Run collective `name` on CUDA buffers through `comm`'s ordered execution.

    args are the collective's arguments (Buffers, ops, roots, splits) as the communicator
    validated them. Called on the caller's thread, which fixes the caller's stream."""
    bufs = [a for a in args if isinstance(a, Buffer)]
    devs = {b.device for b in bufs}
    if "cpu" in devs:
        raise InvalidArgument(f"{name}: buffers are on {sorted(devs)}; all of one call's buffers must be on "
                              f"the same device")
    if len(devs) != 1:
        raise InvalidArgument(f"{name}: buffers are on several GPUs {sorted(devs)}; one GPU per rank")
    dev = bufs[0].array.device
    cc = getattr(comm, "cuda", None)
    if cc is None:
        comm._check_usable(name)
        cc = comm.cuda = CudaCollectives(comm, dev)
    elif cc.dev != dev:
        raise InvalidArgument(f"{name}: buffer is on cuda:{dev} but this communicator's rank {comm.rank} works "
                              f"on cuda:{cc.dev} (one GPU per rank and communicator)")
    method = getattr(cc, name, None)
    if method is None:
        raise InvalidArgument(f"{name}: not implemented for CUDA buffers yet; use a CPU copy")
    caller = bufs[0].array.caller_stream()
    join = not async_op
    signature = _signature(name, sig)

    def fn(what):
        return method(what, caller, join, signature, *args)
    if async_op and comm._inflight == 0:
        # Nothing queued before it: enqueue right here (it never blocks the host) instead of
        # handing it to the communicator's thread; the caller's stream is not made to wait.
        return CudaWork(_Enqueued(comm._submit(name, fn, False, sig), name), cc, bufs[0].array)
    work = comm._submit(name, fn, async_op, sig)
    if async_op:
        return CudaWork(work, cc, bufs[0].array)
    if cc.sync_each:
        cc.synchronize(name)
    return None


class _Enqueued:
    """The host side of a collective that was enqueued inline: already done (its error, if
    any, was raised by the call itself)."""
    __slots__ = ("result", "what")

    def __init__(self, event, what):
        self.result, self.what = event, what

    def wait(self, timeout=None):
        return True

    def is_completed(self):
        return True

    def exception(self):
        return None


_SIGS = {}


def _signature(name, sig) -> int:
    """63 bits every rank must agree on: op, dtype, root, reduction and count (all_to_all's
    counts may differ per rank; its splits are checked pairwise instead)."""
    count = 0 if name == "all_to_all" else int(sig.get("count", 0))
    key = (name, sig.get("dtype"), sig.get("root"), sig.get("redop"))
    head = _SIGS.get(key)
    if head is None:
        if len(_SIGS) > 4096:
            _SIGS.clear()
        head = _SIGS[key] = (zlib.crc32("|".join(map(str, key)).encode()) & 0x7FFFFFFF) << 32
    return head | (count & 0xFFFFFFFF)


class _Kernel:
    """A compiled kernel and its parameter block (see cuda_ipc.KernelParams)."""
    __slots__ = ("ptr", "types", "block", "params", "launch")

    def __init__(self, ptr, types, block, ipc):
        self.ptr, self.types, self.block = ptr, types, block
        self.params = ipc.KernelParams(types)
        self.launch = ipc.launcher()

    def __call__(self, grid, stream, args):
        self.params.set(args)
        self.launch(self.ptr, grid, self.block, stream, self.params.address)


class _Prepared:
    """One launch of a kernel with fixed arguments except one (the epoch), kept between calls."""
    __slots__ = ("fn", "grid", "params", "epoch", "address", "launch")

    def __init__(self, fn, grid, types, args, epoch_index):
        from pyccl.transports import cuda_ipc
        self.fn, self.grid = fn, grid
        self.params = cuda_ipc.KernelParams(types, args)
        self.epoch = self.params.vals[epoch_index]
        self.address = self.params.address
        self.launch = cuda_ipc.launcher()


class CudaWork:
    """The Work of an async collective on CUDA buffers (see the module doc for the semantics)."""

    def __init__(self, work, cc, view):
        self._work, self._cc, self._view = work, cc, view
        self.what = work.what

    def _event(self):
        self._work.wait()                        # host: the enqueue has happened (raises its errors)
        return self._work.result

    def wait(self, timeout=None) -> bool:
        ev = self._event()
        cc = self._cc
        cc.rt.streamWaitEvent(self._view.caller_stream(), ev, 0)
        if timeout is not None:
            cc.synchronize(self.what, ev, timeout)
        else:
            cc.raise_if_failed(self.what)
        return True

    def is_completed(self) -> bool:
        if not self._work.is_completed():
            return False
        if self._work.exception() is not None:
            return True
        return self._cc.rt.eventQuery(self._work.result) == 0

    def exception(self):
        return self._work.exception()

    @property
    def result(self):
        return None


# ---- the per-communicator GPU state ----------------------------------------------------------
class CudaCollectives:
    """IPC-mapped scratch and flags, streams, kernels and the watchdog of one communicator."""

    def __init__(self, comm, device: int):
        from pyccl.transports import cuda_ipc
        self.ipc = cuda_ipc
        self.cupy = cupy = cuda_ipc._cupy()
        self.rt = rt = cupy.cuda.runtime
        self.comm = comm
        self.rank, self.size, self.dev = comm.rank, comm.size, int(device)
        self.timeout = comm.timeout
        self._timeout_ns = int(self.timeout * 1e9)
        self.tag = comm.tag
        if self.size > MAXR:
            raise InvalidArgument(f"CUDA collectives: {self.size} ranks; the GPU path takes at most {MAXR} "
                                  f"ranks of one host")
        hosts = {i.get("host") for i in comm.peer_info}
        if len(hosts) != 1:
            raise InvalidArgument(f"CUDA collectives: the ranks of {comm.tag} are on {len(hosts)} hosts; GPU "
                                  f"buffers across hosts are not supported yet (copy to CPU)")
        # 2 ranks: one-shot to 8 MiB (bench/RESULTS.md: forced one-shot 46 us at 8 MiB against the
        # two-shot's 73 and NCCL's 50); more ranks read (n-1) copies, so 4 MiB
        self.oneshot_max = _env_int("PYCCL_CUDA_ONESHOT_MAX", (8 << 20) if self.size == 2 else (4 << 20))
        self.twoshot_mode = self._mode_env("PYCCL_CUDA_TWOSHOT", "auto", _TWOSHOT_MODES)
        self.twoshot_wide = self._mode_env("PYCCL_CUDA_TWOSHOT_WIDE", "kernel", _TWOSHOT_MODES[1:])
        self.copy_mode = self._mode_env("PYCCL_CUDA_COPY", "auto", _COPY_MODES)
        self.copy_wide = self._mode_env("PYCCL_CUDA_COPY_WIDE", "ce", _COPY_MODES[1:])
        self.copy_blocks = _env_int("PYCCL_CUDA_COPY_BLOCKS", 0)
        self.scratch_max = max(1 << 20, _env_int("PYCCL_CUDA_SCRATCH", 256 << 20)) & ~0xFFFF
        self.sync_each = os.environ.get("PYCCL_CUDA_SYNC", "0") not in ("", "0")
        self.rs_ce_min = _env_int("PYCCL_CUDA_RS_CE_MIN", 64 << 20)
        self._device = cupy.cuda.Device(self.dev)
        self._epoch = 0
        self._names = [None] * 4096          # epoch & 4095 -> what (str, or (name, seq) for fast calls)
        self._prepared = {}                  # (in, out, count, dtype, op, sig) -> _Prepared one-shot launch
        self._lane_caches = []               # the torch fast lanes' caches (forget_prepared clears them)
        self._tail = None          # the stream our latest collective's end is ordered on
        self._last = None          # event at the end of the latest collective on pyccl's stream
        self._mail_seq = 0
        self._abort_reason = None
        self._closed = False
        self._mods = {}
        self._lock = threading.Lock()
        with self._device:
            sms = rt.deviceGetAttribute(16, self.dev)          # cudaDevAttrMultiProcessorCount
            blocks = _env_int("PYCCL_CUDA_BLOCKS", 0)
            self.max_blocks = max(1, min(MAXB, blocks or sms, sms))
            self.stream_obj = cupy.cuda.Stream(non_blocking=True)
            self.stream = self.stream_obj.ptr
            self.side = [cupy.cuda.Stream(non_blocking=True) for _ in range(self.size)]
            self._ev = [rt.eventCreateWithFlags(2) for _ in range(64)]    # cudaEventDisableTiming
            self._ev_i = 0
            self._ready = rt.eventCreateWithFlags(2)
            self._ready2 = rt.eventCreateWithFlags(2)
            self._fork = rt.eventCreateWithFlags(2)
            self._joins = [rt.eventCreateWithFlags(2) for _ in range(self.size)]
            self.status = cuda_ipc.HostStatus()
            self.flags = rt.malloc(FLAG_WORDS * 8)
            rt.memset(self.flags, 0, FLAG_WORDS * 8)
            self.small_cap = max(_env_int("PYCCL_CUDA_ONESHOT_CAP", 8 << 20), self.oneshot_max, 4096)
            self.small_cap = (self.small_cap + 255) & ~255
            self.small = rt.malloc(2 * self.size * self.small_cap)
            self.big = 0
            self.big_cap = 0
            self._big_gen = 0
            self.tab = rt.malloc(3 * MAXR * 8)
            self.tab_host = np.zeros(3 * MAXR, dtype=np.uint64)
            self.registry = cuda_ipc.IpcRegistry(self.rank, comm.store, self.timeout)
            self.registry.before_close = self._drain
            self._payload = np.zeros(MAIL_WORDS, dtype=np.int64)
            self.mailbox = cuda_ipc.HostMailbox(self.rank, self.size, comm.store, comm.tag, self.timeout, MAIL_WORDS)
            self._share("base", [self.flags, self.small], [0, 1])
        self.watch = cuda_ipc.PeerWatch({r: i.get("pid") for r, i in enumerate(comm.peer_info) if r != self.rank})
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watchdog, daemon=True,
                                        name=f"pyccl-cuda-watch-{comm.tag}-r{self.rank}")
        self._thread.start()
        log.info("%s rank %d: CUDA collectives on cuda:%d (%d blocks max, one-shot <= %d B, two-shot %s)",
                 comm.tag, self.rank, self.dev, self.max_blocks, self.oneshot_max, self.twoshot_mode)

    # ---- set-up helpers ----------------------------------------------------------------------
    @staticmethod
    def _mode_env(name, default, allowed):
        v = os.environ.get(name, default).strip().lower()
        if v not in allowed:
            raise InvalidArgument(f"{name}={v!r}: use one of {', '.join(allowed)}")
        return v

    def _ts(self, allreduce=True):
        """The two-shot flavour in force for an all-reduce (else a reduce-scatter): 'kernel', 'ce'
        or 'pull' ('auto' resolved by rank count)."""
        m = self.twoshot_mode
        if m == "auto":
            m = ("kernel" if allreduce else "pull") if self.size <= 2 else self.twoshot_wide
        return m

    def _cm(self):
        """The copy flavour in force: 'ce', 'push' or 'pull'."""
        m = self.copy_mode
        if m == "auto":
            m = "ce" if self.size <= 2 else self.copy_wide
        return m

    def _share(self, name, ptrs, rows):
        """Publish our allocations `ptrs`, map every peer's, and write them into tab rows."""
        ids = [self.registry.export(p) for p in ptrs]
        self.comm.store.set(f"cuda/scratch/{name}/{self.rank}",
                            struct.pack(f"<{2 * len(ids)}Q", *[v for pair in ids for v in pair]))
        for r in range(self.size):
            for k, row in enumerate(rows):
                if r == self.rank:
                    self.tab_host[row * MAXR + r] = ptrs[k]
            if r == self.rank:
                continue
            raw = self.comm.store.get(f"cuda/scratch/{name}/{r}", timeout=self.timeout)
            vals = struct.unpack(f"<{2 * len(ptrs)}Q", raw)
            for k, row in enumerate(rows):
                self.tab_host[row * MAXR + r] = self.registry.peer_ptr(r, vals[2 * k], vals[2 * k + 1])
        self.rt.memcpy(self.tab, self.tab_host.ctypes.data, self.tab_host.nbytes, 1)   # host to device

    def _ensure_big(self, need: int):
        """Two-shot scratch of at least `need` bytes per source region (collective: every rank
        asks for the same size at the same call)."""
        if need <= self.big_cap:
            return
        cap = 1 << 20
        while cap < need:
            cap <<= 1
        cap = min(cap, self.scratch_max)
        rt = self.rt
        rt.streamSynchronize(self.stream)       # our kernels are done with the old one; peers too
        self.raise_if_failed("growing the CUDA scratch")
        if self.big:
            rt.free(self.big)
        self.big = rt.malloc(self.size * cap)
        self.big_cap = cap
        self._big_gen += 1
        self._share(f"big{self._big_gen}", [self.big], [2])

    def _kernel(self, kind, dtype, opcode, n):
        key = (kind, dtype, opcode, n)
        fn = self._mods.get(key)
        if fn is None:
            ctype = _CTYPE[dtype]
            kinds = ("oneshot", "twoshot", "reduce_n", "twoshot_pull")
            names = [f"{k}<{ctype}, {opcode}, {v}>" for k in kinds for v in sorted({1, n})]
            with open(_CU) as f:
                code = f.read()
            options = ["-std=c++17"]
            cuda_path = self.cupy.cuda.get_cuda_path()
            if cuda_path and os.path.isdir(os.path.join(cuda_path, "include")):
                options.append("-I" + os.path.join(cuda_path, "include"))
            with self._device:
                mod = self.cupy.RawModule(code=code, options=tuple(options), name_expressions=names)
                for k in kinds:
                    for v in sorted({1, n}):
                        self._mods[(k, dtype, opcode, v)] = self._launcher(
                            k, mod.get_function(f"{k}<{ctype}, {opcode}, {v}>"))
                if "barrier" not in self._mods:
                    self._mods["barrier"] = self._launcher("barrier", mod.get_function("barrier"))
                    self._mods["copy_n"] = self._launcher("copy_n", mod.get_function("copy_n"))
            fn = self._mods[key]
        return fn

    def _launcher(self, kind, function):
        """A launchable kernel: ``k(grid, stream_ptr, args)``; ``k.ptr`` is its CUfunction."""
        # RawModule.get_function gives a RawKernel; its .kernel is the loaded CUfunction wrapper.
        ptr = getattr(getattr(function, "kernel", function), "ptr", None)
        if not ptr:
            raise PycclError(f"CUDA collectives: cupy {self.cupy.__version__} does not expose the CUfunction of "
                             f"the {kind} kernel (RawKernel.kernel.ptr); pyccl launches it through the driver")
        return _Kernel(int(ptr), _PARAMS[kind], 32 if kind == "barrier" else THREADS, self.ipc)

    def _barrier_fn(self):
        fn = self._mods.get("barrier")
        if fn is None:
            self._kernel("oneshot", "float32", 0, 1)
            fn = self._mods["barrier"]
        return fn

    def _sm_copies(self, copies):
        """Run (lane, dst, src, nbytes) copies with one SM kernel on pyccl's stream; False (nothing
        done) when they do not fit it (more than MAXR pieces, or a piece not 16-byte aligned)."""
        copies = [c for c in copies if c[3] > 0 and c[1] != c[2]]
        if not copies:
            return True
        if len(copies) > MAXR or any(c[3] >= 16 and (c[1] % 16 or c[2] % 16) for c in copies):
            return False
        self._barrier_fn()
        fn = self._mods["copy_n"]
        packs = sum(c[3] // 16 for c in copies)
        grid = int(max(1, min(self.copy_blocks or self.max_blocks, -(-packs // THREADS))))
        pad = [0] * (MAXR - len(copies))
        fn(grid, self.stream, ([c[1] for c in copies] + pad + [c[2] for c in copies] + pad +
                               [c[3] for c in copies] + pad + [len(copies)]))
        return True

    # ---- stream helpers ----------------------------------------------------------------------
    def _begin(self, caller):
        """pyccl's stream waits for the caller's stream (and for our previous collective, when
        that one ran on another caller stream)."""
        rt = self.rt
        rt.eventRecord(self._ready, caller)
        rt.streamWaitEvent(self.stream, self._ready, 0)
        tail = self._tail
        if tail is not None and tail != caller and tail != self.stream:
            rt.eventRecord(self._ready2, tail)
            rt.streamWaitEvent(self.stream, self._ready2, 0)

    def _end(self, caller, join):
        ev = self._ev[self._ev_i % len(self._ev)]
        self._ev_i += 1
        self.rt.eventRecord(ev, self.stream)
        if join:
            self.rt.streamWaitEvent(caller, ev, 0)
        self._last = ev
        self._tail = caller if join else self.stream
        return ev

    def _last_event(self):
        """An event after our latest collective (recorded now if it ran on a caller's stream)."""
        if self._last is None and self._tail is not None:
            ev = self._ev[self._ev_i % len(self._ev)]
            self._ev_i += 1
            self.rt.eventRecord(ev, self._tail)
            self._last = ev
        return self._last

    def _next_epoch(self, what):
        e = self._epoch = self._epoch + 1
        self._names[e & 4095] = what
        return e

    def _what_of(self, epoch):
        w = self._names[epoch & 4095] if epoch > self._epoch - 4096 else None
        if isinstance(w, tuple):
            return f"{w[0]} #{w[1]} on {self.tag} (rank {self.rank}/{self.size})"
        return w or "an earlier collective"

    def _barrier(self, what, sig, where):
        epoch = self._next_epoch(what)
        self._barrier_fn()(1, self.stream, (self.tab, self.rank, self.size, epoch, sig, self.status.ptr,
                                            self._timeout_ns, where))

    def _copies(self, copies):
        """cudaMemcpyAsync each (lane, dst, src, nbytes); lanes run on their own streams at once."""
        rt = self.rt
        copies = [c for c in copies if c[3] > 0 and c[1] != c[2]]
        if not copies:
            return
        if len(copies) == 1:
            _, dst, src, n = copies[0]
            rt.memcpyAsync(dst, src, n, 4, self.stream)            # cudaMemcpyDefault
            return
        rt.eventRecord(self._fork, self.stream)
        lanes = sorted({c[0] for c in copies})
        for lane in lanes:
            rt.streamWaitEvent(self.side[lane].ptr, self._fork, 0)
        for lane, dst, src, n in copies:
            rt.memcpyAsync(dst, src, n, 4, self.side[lane].ptr)
        for lane in lanes:
            rt.eventRecord(self._joins[lane], self.side[lane].ptr)
            rt.streamWaitEvent(self.stream, self._joins[lane], 0)

    def _vec(self, dtype_size, *ptrs_and_counts):
        """Elements per 16-byte pack when every pointer (and stride) allows it, else 1."""
        n = 16 // dtype_size
        for v in ptrs_and_counts:
            if v % 16:
                return 1
        return n

    def _blocks(self, packs, cap=None):
        return int(max(1, min(cap or self.max_blocks, -(-packs // THREADS))))

    # ---- mailbox -----------------------------------------------------------------------------
    def _mail(self, what, sig, ptrs, extra=()):
        """Tell every peer which allocations (and extra integers) this call uses; returns
        ([size] lists of peer pointers per published buffer, [size, len(extra)] extras)."""
        self._mail_seq += 1
        seq = self._mail_seq
        payload = self._payload
        payload[:] = 0
        payload[0] = sig
        for k, p in enumerate(ptrs):
            if p:
                bufid, off = self.registry.export(p)
                payload[1 + 2 * k], payload[2 + 2 * k] = bufid, off
        if len(extra):
            payload[5:5 + len(extra)] = extra
        self.mailbox.post(seq, payload)
        table = self.mailbox.collect(seq, lambda: self._check_peers(what))
        for r in range(self.size):
            if table[r, 0] != sig:
                raise InvalidArgument(f"{what}: rank {r} called a different collective, dtype, count, op or root "
                                      f"than rank {self.rank} (CUDA exchange #{seq}); every rank must make the "
                                      f"same call")
        peers = []
        for k in range(len(ptrs)):
            row = []
            for r in range(self.size):
                bufid, off = int(table[r, 1 + 2 * k]), int(table[r, 2 + 2 * k])
                if r == self.rank:
                    row.append(ptrs[k])
                elif bufid:
                    row.append(self.registry.peer_ptr(r, bufid, off))
                else:
                    row.append(0)
            peers.append(row)
        return peers, table[:, 5:]

    def _drain(self):
        self.rt.streamSynchronize(self.stream)

    # ---- health ------------------------------------------------------------------------------
    def _check_peers(self, what):
        dead = self.watch.dead()
        if dead:
            self._abort_reason = ", ".join(f"rank {r} (pid {p}) exited" for r, p in dead)
            self.status.abort()
            raise PeerFailure(f"{what}: {self._abort_reason}")

    def raise_if_failed(self, what):
        if self._closed:
            raise PycclError(f"{what}: the CUDA state of {self.tag} is closed")
        if self.status.words[1] == 0:
            if self._abort_reason is not None:
                raise PeerFailure(f"{what}: {self._abort_reason}")
            return
        code, epoch, peer, where = self.status.describe()
        op = self._what_of(epoch)
        place = _WHERE.get(where, f"step {where}")
        if code == 3:
            raise InvalidArgument(f"{what}: {op} (rank {self.rank}, cuda:{self.dev}) found rank {peer} making a "
                                  f"different call (other op, dtype, count or root) in the {place}")
        if code == 1:
            raise Timeout(f"{what}: {op} (rank {self.rank}, cuda:{self.dev}) waited {self.timeout:.0f}s for rank "
                          f"{peer} in the {place} (epoch {epoch})")
        reason = self._abort_reason or "aborted"
        raise PeerFailure(f"{what}: {op} (rank {self.rank}, cuda:{self.dev}) stopped waiting for rank {peer} in "
                          f"the {place}: {reason}")

    def synchronize(self, what, event=None, timeout=None):
        """Block the host until `event` (default: the last call) is done, at most `timeout`
        (default: the communicator's) seconds; raise the collective's error if it had one."""
        ev = event if event is not None else self._last_event()
        if ev is None:
            self.raise_if_failed(what)
            return
        limit = self.timeout if timeout is None else timeout
        deadline = time.monotonic() + limit
        pause = 0.00002
        while self.rt.eventQuery(ev) != 0:
            if self.status.words[1] != 0 or self._abort_reason is not None:
                break
            if time.monotonic() > deadline:
                self.raise_if_failed(what)
                raise Timeout(f"{what}: not finished on cuda:{self.dev} within {limit:g}s")
            time.sleep(pause)
            pause = min(pause * 2, 0.002)
        self.raise_if_failed(what)

    def _watchdog(self):
        while not self._stop.wait(0.05):
            if self._abort_reason is None:
                dead = self.watch.dead()
                if dead:
                    self._abort_reason = ", ".join(f"rank {r} (pid {p}) exited" for r, p in dead)
                    log.error("pyccl %s rank %d: %s; aborting pending CUDA collectives", self.tag, self.rank,
                              self._abort_reason)
                    self.status.abort()
            st = self.status
            if st.words is not None and st.words[1] != 0 and st.words[0] == 0:
                st.abort()                        # one failure: let every later kernel give up at once

    def abort(self):
        if self._abort_reason is None:
            self._abort_reason = "the communicator was aborted"
        if self.status.words is not None:
            self.status.abort()

    def close(self):
        if self._closed:
            return
        self._stop.set()
        self._thread.join(timeout=5)
        rt = self.rt
        try:
            with self._device:
                try:
                    self.synchronize("close")
                except PycclError:
                    pass
                self.registry.close()
                for p in (self.flags, self.small, self.big, self.tab):
                    if p:
                        rt.free(p)
                for ev in self._ev + self._joins + [self._ready, self._ready2, self._fork]:
                    rt.eventDestroy(ev)
        finally:
            self.mailbox.close()
            self.status.close()
            self._closed = True

    # ---- collectives -------------------------------------------------------------------------
    # Each takes (what, caller stream, join, signature, *the communicator's arguments) and
    # returns the event that marks its end on pyccl's stream.
    def all_reduce(self, what, caller, join, sig, buf, op):
        self.raise_if_failed(what)
        v = buf.array
        with self._device:
            if v.size == 0:
                return self._empty(caller, join)
            if v.nbytes <= self.oneshot_max:
                return self._oneshot(what, caller, join, sig, v, buf.dtype, op)
            return self._twoshot(what, caller, join, sig, v.ptr, v.ptr, v.size, v.itemsize, buf.dtype, op,
                                 allgather=True)

    def reduce(self, what, caller, join, sig, buf, root, op):
        self.raise_if_failed(what)
        v = buf.array
        with self._device:
            if v.size == 0:
                return self._empty(caller, join)
            if self.rank == root:
                ptr = v.ptr
            else:                               # non-roots keep their buffer: reduce a copy
                ptr = self._tmp(v.nbytes)
            self._begin(caller)
            if ptr != v.ptr:
                self.rt.memcpyAsync(ptr, v.ptr, v.nbytes, 4, self.stream)
            tmp_view = type(v)(ptr, v.size, v.itemsize, v.device, v.kind, None)
            if v.nbytes <= self.oneshot_max:
                self._oneshot_body(what, sig, tmp_view, buf.dtype, op)
            else:
                self._twoshot_body(what, sig, ptr, ptr, v.size, v.itemsize, buf.dtype, op, allgather=True)
            return self._end(caller, join)

    def _tmp(self, nbytes):
        cur = getattr(self, "_tmp_buf", None)
        if cur is None or cur[1] < nbytes:
            if cur is not None:
                self.rt.streamSynchronize(self.stream)
                self.rt.free(cur[0])
            cur = self._tmp_buf = (self.rt.malloc(max(nbytes, 1 << 20)), max(nbytes, 1 << 20))
        return cur[0]

    def _empty(self, caller, join):
        self._begin(caller)
        return self._end(caller, join)

    def _opcode(self, dtype, op):
        code = _OPCODE[op]
        if dtype == "bool" and code in (0, 1):      # bool: sum = or = max, prod = and = min
            code = 3 if code == 0 else 2
        return code

    def _oneshot(self, what, caller, join, sig, v, dtype, op):
        if join and self._tail == caller:
            # A synchronous one-shot whose predecessor already ends on the caller's stream:
            # launch it right there (same order, two events fewer per call).
            self._oneshot_body(what, sig, v, dtype, op, caller)
            self._last = None
            return None
        self._begin(caller)
        self._oneshot_body(what, sig, v, dtype, op)
        return self._end(caller, join)

    def _oneshot_body(self, what, sig, v, dtype, op, stream=None):
        p = self._prepare_oneshot(v.ptr, v.ptr, v.size, v.itemsize, dtype, op, sig)
        e = self._next_epoch(what)
        p.epoch.value = e
        p.launch(p.fn, p.grid, THREADS, self.stream if stream is None else stream, p.address)

    def _prepare_oneshot(self, inp, out, count, itemsize, dtype, op, sig):
        """The one-shot launch of (in, out, count, dtype, op), kernel parameters filled in
        once; a call then only writes the epoch and launches."""
        key = (inp, out, count, dtype, op, sig)
        p = self._prepared.get(key)
        if p is None:
            n = 16 // itemsize if inp % 16 == 0 and out % 16 == 0 else 1
            opcode = self._opcode(dtype, op)
            fn = self._mods.get(("oneshot", dtype, opcode, n)) or self._kernel("oneshot", dtype, opcode, n)
            grid = min(self.max_blocks, -(-(count // n) // THREADS)) or 1
            avg = self.size if op is AVG else 0
            p = _Prepared(fn.ptr, grid, _PARAMS["oneshot"],
                          (inp, out, count, self.tab, self.small_cap, self.rank, self.size, 0, sig,
                           self.status.ptr, self._timeout_ns, avg), 7)
            if len(self._prepared) >= 1024:
                self._prepared.clear()
            self._prepared[key] = p
        return p

    def torch_all_reduce(self, comm):
        """The fast lane of the torch backend: ``lane(tensor, op, async_op)`` enqueues a one-shot
        all-reduce of a contiguous CUDA tensor on this GPU and returns None (synchronous: on
        the caller's current stream, which therefore sees the result) or the end event on
        pyccl's stream (async_op), or returns False when the call does not fit the lane
        (too big, dtype or op without a native kernel, another device, the communicator busy):
        the caller then takes the general path. Everything that does not change between calls
        with the same (pointer, count, dtype, op) is computed once and cached; per call the
        host reads the error word, bumps the epoch and launches one kernel."""
        import torch
        get_stream = getattr(torch._C, "_cuda_getCurrentRawStream", None) or \
            (lambda d: torch.cuda.current_stream(d).cuda_stream)
        get_device = torch._C._cuda_getDevice
        dtypes = {torch.float16: "float16", torch.bfloat16: "bfloat16", torch.float32: "float32",
                  torch.float64: "float64", torch.int8: "int8", torch.uint8: "uint8", torch.int32: "int32",
                  torch.int64: "int64"}
        ops = {"SUM": SUM, "PROD": PROD, "MIN": MIN, "MAX": MAX, "AVG": AVG}
        cache = {}
        self._lane_caches.append(cache)
        words = self.status.words
        dev = self.dev
        names = self._names
        base_sig = {}

        def lane(t, opname, async_op):
            key = (t.data_ptr(), t.numel(), t.dtype, opname)
            p = cache.get(key)
            if p is None:
                p = prepare(t, key, opname)
            if p is False or get_device() != dev or not t.is_contiguous() or comm._inflight:
                return False
            if self._closed or words[1] or self._abort_reason is not None:
                comm._seq += 1
                self.raise_if_failed(f"all_reduce #{comm._seq} on {self.tag} (rank {self.rank}/{self.size})")
            if comm._broken is not None or comm._closed:
                return False                     # the general path raises the right error
            caller = get_stream(dev)
            comm._seq += 1
            e = self._epoch = self._epoch + 1
            names[e & 4095] = ("all_reduce", comm._seq)
            p.epoch.value = e
            if async_op:
                self._begin(caller)
                p.launch(p.fn, p.grid, THREADS, self.stream, p.address)
                return self._end(caller, False)
            tail = self._tail
            if tail != caller:
                if tail is not None:
                    self._after(tail, caller)
                self._tail = caller
            self._last = None
            p.launch(p.fn, p.grid, THREADS, caller, p.address)
            return None

        def prepare(t, key, opname):
            p = False
            dtype = dtypes.get(t.dtype)
            op = ops.get(opname)
            nbytes = t.numel() * t.element_size()
            if comm.reproducible and takes(dtype, op):
                dtype = None                     # reproducible mode: the general path (ccl/reproducible.py)
            if dtype is not None and op is not None and t.is_cuda and t.get_device() == dev and \
                    0 < nbytes <= self.oneshot_max and t.is_contiguous():
                sig = base_sig.get((dtype, op))
                if sig is None:
                    sig = base_sig[(dtype, op)] = _signature("all_reduce", {"dtype": dtype, "root": -1,
                                                                             "redop": op.name, "count": 0})
                with self._device:
                    p = self._prepare_oneshot(key[0], key[0], key[1], t.element_size(), dtype, op,
                                              sig | (key[1] & 0xFFFFFFFF))
            if len(cache) >= 1024:
                cache.clear()
            cache[key] = p
            return p
        return lane

    def forget_prepared(self):
        """Drop every prepared launch and fast-lane decision (after changing a knob such as
        oneshot_max at run time, on every rank alike)."""
        self._prepared.clear()
        for c in self._lane_caches:
            c.clear()

    def _after(self, tail, stream):
        """`stream` waits for everything queued so far on `tail` (our previous collective)."""
        self.rt.eventRecord(self._ready2, tail)
        self.rt.streamWaitEvent(stream, self._ready2, 0)

    def _twoshot(self, what, caller, join, sig, inp, out, count, itemsize, dtype, op, allgather):
        peers = None
        if allgather:
            peers, _ = self._mail(what, sig, [out])
            peers = peers[0]
        self._begin(caller)
        self._twoshot_body(what, sig, inp, out, count, itemsize, dtype, op, allgather, peers)
        return self._end(caller, join)

    def _twoshot_body(self, what, sig, inp, out, count, itemsize, dtype, op, allgather, peers=None):
        """All-reduce (allgather=True: in place, inp == out, `count` elements) or reduce-scatter
        (inp holds size x count, out count), in rounds that fit the scratch."""
        size, rank = self.size, self.rank
        mode = self._ts(allgather)
        if allgather and peers is None:
            peers, _ = self._mail(what, sig, [out])
            peers = peers[0]
        if mode == "pull" and size > 1:
            return self._twoshot_pull(what, sig, inp, out, count, itemsize, dtype, op, allgather, peers)
        n = 16 // itemsize
        avg = size if op is AVG else 0
        opcode = self._opcode(dtype, op)
        if allgather:
            seg = -(-count // size)
            seg = -(-seg // n) * n
        else:
            seg = count
        per_round = max(n, (self.scratch_max // itemsize) // n * n)
        self._ensure_big(min(seg, per_round) * itemsize)
        per_round = min(per_round, self.big_cap // itemsize // n * n)
        start = 0
        while start < seg:
            chunk = min(per_round, seg - start)
            if allgather:
                # Round k takes elements [start, start + chunk) of every segment.
                stride, total = seg, count - start
                base_in = inp + start * itemsize
                my_out = inp + (rank * seg + start) * itemsize
                dst = [(peers[r] + (rank * seg + start) * itemsize) if r != rank else 0 for r in range(size)]
            else:
                stride, total = seg, 1 << 62
                base_in = inp + start * itemsize
                my_out = out + start * itemsize
                dst = [0] * size
            vec = self._vec(itemsize, base_in, my_out, stride * itemsize, *[d for d in dst if d])
            ce = mode == "ce" or (not allgather and chunk * itemsize >= self.rs_ce_min)
            if ce and size > 1:
                self._twoshot_ce(what, sig, base_in, stride, chunk, total, my_out, dst, itemsize, dtype, opcode,
                                 avg, vec)
            else:
                fn = self._kernel("twoshot", dtype, opcode, vec)
                epoch = self._next_epoch(what)
                grid = self._blocks(chunk // vec)
                fn(grid, self.stream, (base_in, stride, chunk, total, my_out, self.tab, self.big_cap,
                                       *dst, *[0] * (MAXR - size), rank, size, epoch, sig, self.status.ptr,
                                       self._timeout_ns, avg))
            start += chunk

    def _twoshot_pull(self, what, sig, inp, out, count, itemsize, dtype, op, allgather, peers):
        """Two-shot by SM loads from the peers' buffers (kernel twoshot_pull): no scratch, no
        rounds, one launch. All-reduce: in place, `peers` = every rank's buffer. Reduce-scatter:
        every rank publishes its input (size x count) through the mailbox."""
        size, rank = self.size, self.rank
        if allgather:
            seg = -(-count // size)
            seg = -(-seg // (16 // itemsize)) * (16 // itemsize)
            bases, total, my_out = list(peers), count, inp + rank * seg * itemsize
        else:
            got, _ = self._mail(what, sig, [inp])
            seg, bases, total, my_out = count, list(got[0]), 1 << 62, out
        if any(b == 0 for b in bases):
            raise PycclError(f"{what}: a peer published no buffer for the pull two-shot")
        vec = self._vec(itemsize, my_out, seg * itemsize, *bases)
        opcode = self._opcode(dtype, op)
        fn = self._kernel("twoshot_pull", dtype, opcode, vec)
        epoch = self._next_epoch(what)
        grid = self._blocks(seg // vec)
        fn(grid, self.stream, (seg, seg, total, my_out, self.tab, *bases, *[0] * (MAXR - size), rank, size,
                               1 if allgather else 0, epoch, sig, self.status.ptr, self._timeout_ns,
                               size if op is AVG else 0))

    def _twoshot_ce(self, what, sig, base_in, stride, chunk, total, my_out, dst, itemsize, dtype, opcode, avg, vec):
        size, rank = self.size, self.rank

        def seg_len(r):
            return max(0, min(total - r * stride, chunk))
        big = [int(self.tab_host[2 * MAXR + r]) for r in range(size)]
        pushes = [(r, big[r] + rank * self.big_cap, base_in + r * stride * itemsize, seg_len(r) * itemsize)
                  for r in range(size) if r != rank]
        self._copies(pushes)
        self._barrier(what, sig, 4)
        mine = seg_len(rank)
        srcs = [(base_in + rank * stride * itemsize) if r == rank else (big[rank] + r * self.big_cap)
                for r in range(size)]
        fn = self._kernel("reduce_n", dtype, opcode, vec)
        grid = self._blocks(mine // vec, cap=4 * self.max_blocks)
        fn(grid, self.stream, (my_out, mine, *srcs, *[0] * (MAXR - size), size, avg))
        if any(dst):
            self._copies([(r, dst[r], my_out, mine * itemsize) for r in range(size) if r != rank and dst[r]])
        self._barrier(what, sig, 5)

    def reduce_scatter(self, what, caller, join, sig, out, inp, op):
        self.raise_if_failed(what)
        o, i = out.array, inp.array
        with self._device:
            if o.size == 0:
                return self._empty(caller, join)
            self._begin(caller)
            self._twoshot_body(what, sig, i.ptr, o.ptr, o.size, o.itemsize, out.dtype, op, allgather=False)
            return self._end(caller, join)

    def _copy_collective(self, what, caller, join, sig, ptrs, extra, plan, pull=None, src=0):
        """Copy collective: exchange buffer names, barrier, copies, barrier. `plan(peers, table)`
        gives the pushes (lane, dst, src, nbytes); `pull(peers, table)`, where given, the same
        data as reads from the peers' buffers (`src`, this rank's input, is published as the
        second buffer). The copies run on copy engines or in one SM kernel (see _cm)."""
        mode = self._cm()
        if mode == "pull" and pull is not None:
            peers, table = self._mail(what, sig, list(ptrs) + [src], extra)
            copies = pull(peers, table)
        else:
            peers, table = self._mail(what, sig, ptrs, extra)
            copies = plan(peers, table)
        self._begin(caller)
        if self.size > 1:
            self._barrier(what, sig, 4)
        if mode == "ce" or not self._sm_copies(copies):
            self._copies(copies)
        if self.size > 1:
            self._barrier(what, sig, 5)
        return self._end(caller, join)

    def all_gather(self, what, caller, join, sig, out, inp):
        self.raise_if_failed(what)
        o, i = out.array, inp.array
        nb = i.nbytes
        me = self.rank
        with self._device:
            if nb == 0:
                return self._empty(caller, join)

            def plan(peers, _):
                return [(r, peers[0][r] + me * nb, i.ptr, nb) for r in range(self.size)]

            def pull(peers, _):
                return [(r, o.ptr + r * nb, peers[1][r], nb) for r in range(self.size)]
            return self._copy_collective(what, caller, join, sig, [o.ptr], (), plan, pull, i.ptr)

    def broadcast(self, what, caller, join, sig, buf, root):
        self.raise_if_failed(what)
        v = buf.array
        with self._device:
            if v.nbytes == 0:
                return self._empty(caller, join)

            def plan(peers, _):
                if self.rank != root:
                    return []
                return [(r, peers[0][r], v.ptr, v.nbytes) for r in range(self.size) if r != root]
            return self._copy_collective(what, caller, join, sig, [v.ptr], (), plan)

    def all_to_all(self, what, caller, join, sig, out, inp, out_splits, in_splits):
        self.raise_if_failed(what)
        o, i = out.array, inp.array
        item = i.itemsize
        size, me = self.size, self.rank
        out_displ = np.concatenate([[0], np.cumsum(out_splits)[:-1]]).astype(np.int64)
        in_displ = np.concatenate([[0], np.cumsum(in_splits)[:-1]]).astype(np.int64)
        with self._device:
            if o.nbytes == 0 and i.nbytes == 0:
                return self._empty(caller, join)
            extra = np.concatenate([out_displ, np.asarray(out_splits, dtype=np.int64),
                                    np.asarray(in_splits, dtype=np.int64)])

            def plan(peers, table):
                # Every rank checks the whole matrix, so a disagreement raises on all of them.
                for src in range(size):
                    for dst in range(size):
                        sent, expected = int(table[src][2 * size + dst]), int(table[dst][size + src])
                        if sent != expected:
                            raise InvalidArgument(
                                f"{what}: rank {src} sends {sent} elements to rank {dst}, which expects "
                                f"{expected} from it (in_splits/out_splits disagree; seen by rank {me})")
                copies = []
                for r in range(size):
                    their_displ = int(table[r][me])
                    copies.append((r, peers[0][r] + their_displ * item, i.ptr + int(in_displ[r]) * item,
                                   in_splits[r] * item))
                return copies

            def pull(peers, table):
                plan(peers, table)                   # the same checks
                copies = []
                for r in range(size):
                    their_in = table[r][2 * size:3 * size]
                    their_displ = int(sum(int(x) for x in their_in[:me]))
                    copies.append((r, o.ptr + int(out_displ[r]) * item, peers[1][r] + their_displ * item,
                                   int(their_in[me]) * item))
                return copies
            return self._copy_collective(what, caller, join, sig, [o.ptr], extra, plan, pull, i.ptr)

    def gather(self, what, caller, join, sig, out, inp, root):
        self.raise_if_failed(what)
        i = inp.array
        nb, me = i.nbytes, self.rank
        with self._device:
            if nb == 0:
                return self._empty(caller, join)
            mine = [out.array.ptr] if (me == root and out is not None) else [0]

            def plan(peers, _):
                return [(root, peers[0][root] + me * nb, i.ptr, nb)]
            return self._copy_collective(what, caller, join, sig, mine, (), plan)

    def scatter(self, what, caller, join, sig, out, inp, root):
        self.raise_if_failed(what)
        o = out.array
        nb, me = o.nbytes, self.rank
        with self._device:
            if nb == 0:
                return self._empty(caller, join)

            def plan(peers, _):
                if me != root:
                    return []
                src = inp.array.ptr
                return [(r, peers[0][r], src + r * nb, nb) for r in range(self.size)]
            return self._copy_collective(what, caller, join, sig, [o.ptr], (), plan)
