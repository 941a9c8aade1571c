"""The per-communicator GPU state: IPC-mapped scratch and flags, the table of peer pointers,
streams and events, the epoch counter, the per-call host mailbox, the watchdog, and the errors
the kernels leave in host memory (raised on the next call)."""
import logging
import struct
import threading
import time

import numpy as np

from ... import settings
from ...errors import InvalidArgument, PeerFailure, PycclError, Timeout
from .kernels import MAXB, MAXR

log = logging.getLogger("pyccl")

MAIL_WORDS = 5 + 3 * MAXR      # sig, 2 x (buffer id, offset), 3 x size integers
_WHERE = {1: "one-shot all-reduce (waiting for the peer's data)", 2: "two-shot (waiting for the peer's segment)",
          3: "two-shot (closing)", 4: "barrier before the copies", 5: "barrier after the copies",
          6: "all-to-all with device splits (exchanging the split sizes)",
          7: "all-to-all with device splits (closing)", 8: "copy through the scratch (waiting for the peer's piece)",
          9: "copy through the scratch (closing)",
          10: "uneven all-to-all through the scratch (waiting for the peer's round)",
          11: "uneven all-to-all through the scratch (waiting for the peer to drain its round)"}

_TWOSHOT_MODES = ("auto", "kernel", "ce", "pull")
_COPY_MODES = ("auto", "ce", "push", "pull", "staged")
_A2AV_MODES = ("mailbox", "staged")


def _env_int(name, default=None):
    """A PYCCL_* number from the registry (pyccl.settings); `default` where it declares none."""
    v = settings.get(name)
    return default if v is None else v


class CudaState:
    """IPC-mapped scratch and flags, streams, mailbox and the watchdog of one communicator."""

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
        # 2 ranks: one-shot to 8 MiB (bench/JOURNAL.md, 2026-11-23: forced one-shot 46 us at 8 MiB against the
        # two-shot's 73 and NCCL's 50); more ranks read (n-1) copies, so 4 MiB
        self.oneshot_max = _env_int("PYCCL_CUDA_ONESHOT_MAX", (8 << 20) if self.size == 2 else (4 << 20))
        self.twoshot_mode = self._mode_env("PYCCL_CUDA_TWOSHOT", "auto", _TWOSHOT_MODES)
        self.twoshot_wide = self._mode_env("PYCCL_CUDA_TWOSHOT_WIDE", "kernel", _TWOSHOT_MODES[1:])
        self.copy_mode = self._mode_env("PYCCL_CUDA_COPY", "auto", _COPY_MODES)
        self.copy_wide = self._mode_env("PYCCL_CUDA_COPY_WIDE", "ce", _COPY_MODES[1:])
        self.copy_blocks = _env_int("PYCCL_CUDA_COPY_BLOCKS", 0)
        # uneven all-to-all (host or device splits): the peers' outputs named through the
        # mailbox per call, or rounds through the scratch with no host exchange
        self.a2av_mode = self._mode_env("PYCCL_CUDA_A2AV", "mailbox", _A2AV_MODES)
        # the device memory bound (issue 32): two-shot scratch regions of PYCCL_CUDA_SCRATCH (4 MiB:
        # 2 x size regions), the one-shot scratch of ONESHOT_MAX per slot, a reduce buffer of at
        # most that; pieces staged through the scratch fit one region
        self.scratch_max = max(1 << 20, _env_int("PYCCL_CUDA_SCRATCH", 4 << 20)) & ~0xFFFF
        self.stage_max = min(_env_int("PYCCL_CUDA_STAGE_MAX", 16 << 20), self.scratch_max)
        self.tmp_max = max(self.oneshot_max, 1 << 20)
        self.sync_each = settings.get("PYCCL_CUDA_SYNC")
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
        self.suspended = False               # see memory.py
        self._gen = 0                        # scratch generations published (resume makes a new one)
        self._caller = None                  # the stream of the call being made (set by CudaEngine.run)
        self._tmp_pinned = False             # a captured call names the reduce buffer: suspend keeps it
        self._big_pinned = False             # a captured copy-engine two-shot names the peers' scratch
        self._big_keys = []                  # the peers' two-shot scratch as mapped here (closed on regrowth)
        self.ctrl = 0
        self._library = None
        self._library_paused = False         # suspend(graphs=False) let go of the kernels (memory.py)
        self._saved_epoch = 0                # the device epoch across suspend(graphs=False)
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
            try:
                # flags, the epoch of our latest collective and the running kernel's done-block count
                # (advanced by the kernels themselves: epoch_begin/epoch_end in the .cu) and the peer
                # table, in one allocation that stays through suspend()
                self._alloc_control()
                self.small_cap = max(_env_int("PYCCL_CUDA_ONESHOT_CAP", self.oneshot_max), self.oneshot_max, 4096)
                self.small_cap = (self.small_cap + 255) & ~255
                self.small = rt.malloc(2 * self.size * self.small_cap)
                self.big = 0
                self.big_cap = 0
                self._big_gen = 0
                self._captured_splits = []          # see copies._keep_splits
                self.tab_host = np.zeros(3 * MAXR, dtype=np.uint64)
                from .ipc_cache import PeerMappings
                self.registry = PeerMappings(self.rank, comm.store, self.timeout,
                                             settings.get("PYCCL_CUDA_IPC_CACHE"))
                self.registry.before_close = self._drain
                self._payload = np.zeros(MAIL_WORDS, dtype=np.int64)
                self.mailbox = cuda_ipc.HostMailbox(self.rank, self.size, comm.store, comm.tag, self.timeout, MAIL_WORDS)
                self._share("base", [self.flags, self.small], [0, 1])
                from . import library
                self._library = library.acquire(cupy, self.dev)    # starts the background kernel build
            except BaseException:
                self._release_partial()         # a failed set-up (a peer that never came) leaks nothing
                raise
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
        v = settings.get(name) or default
        if v not in allowed:
            raise InvalidArgument(f"{name}={v!r}: use one of {', '.join(allowed)}")
        return v

    def _ts(self, allreduce=True, seg_bytes=0):
        """The two-shot flavour in force for an all-reduce (else a reduce-scatter of `seg_bytes`
        per rank): 'kernel', 'ce' or 'pull' ('auto' resolved by rank count; a 2-rank
        reduce-scatter up to PYCCL_CUDA_STAGE_MAX takes 'kernel', which pushes into the peers'
        scratch and so needs no host exchange per call, above it 'pull')."""
        m = self.twoshot_mode
        if m == "auto":
            if self.size > 2:
                m = self.twoshot_wide
            else:
                m = "kernel" if allreduce or seg_bytes <= self.stage_max else "pull"
        return m

    def _cm(self):
        """The copy flavour in force where the pieces do not go through the scratch: 'ce',
        'push' or 'pull'."""
        m = self.copy_mode
        if m in ("auto", "staged"):
            m = "ce" if self.size <= 2 else self.copy_wide
        return m

    def _share(self, name, ptrs, rows):
        """Publish our allocations `ptrs`, map every peer's (kind 'scratch': see ipc_cache.py),
        and write them into tab rows; returns the mappings' keys."""
        ids = [self.registry.export(p) for p in ptrs]
        keys = []
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
            self.registry.mode = "scratch"
            try:
                for k, row in enumerate(rows):
                    self.tab_host[row * MAXR + r] = self.registry.peer_ptr(r, vals[2 * k], vals[2 * k + 1])
                    keys.append((r, vals[2 * k]))
            finally:
                self.registry.mode = "kept"
        self.rt.memcpy(self.tab, self.tab_host.ctypes.data, self.tab_host.nbytes, 1)   # host to device
        return keys

    def _ensure_big(self, need: int, what: str = "", caller=None):
        """Two-shot scratch of at least `need` bytes per source region (collective: every rank
        asks for the same size at the same call). Growing frees, allocates and synchronises,
        none of which a CUDA-graph capture allows: a call that needs a larger scratch under
        capture raises, on every rank (they all make the same call), and asks for a warm-up."""
        if need <= self.big_cap:
            return
        if any(self._capturing(s) for s in (caller, self.stream) if s is not None):
            raise InvalidArgument(f"{what}: needs a {need}-byte CUDA scratch region (has {self.big_cap}), which "
                                  f"cannot be allocated while a CUDA graph is captured; run the same call once "
                                  f"before capturing it (a warm-up, as torch.cuda.graph asks)")
        cap = 1 << 20
        while cap < need:
            cap <<= 1
        cap = min(cap, self.scratch_max)
        rt = self.rt
        rt.streamSynchronize(self.stream)       # our kernels are done with the old one; peers too
        self.raise_if_failed("growing the CUDA scratch")
        if self.big:
            rt.free(self.big)                   # the memory goes when the peers unmap it too (below)
            self.big = 0
        # [push half: a region per sender][gather half: a region per sender] (the two-shot kernel)
        self.big = rt.malloc(2 * self.size * cap)
        self.big_cap = cap
        self._big_gen += 1
        old = self._big_keys
        self._big_keys = self._share(f"big{self._big_gen}.g{self._gen}", [self.big], [2])
        self.registry.close_kinds(("scratch",), keys=set(old) - set(self._big_keys))
        self.forget_prepared()                  # prepared two-shot launches name the old scratch

    # ---- stream helpers ----------------------------------------------------------------------
    def _begin(self, caller):
        """pyccl's stream waits for the caller's stream (and for our previous collective, when
        that one ran on another caller stream)."""
        rt = self.rt
        rt.eventRecord(self._ready, caller)
        rt.streamWaitEvent(self.stream, self._ready, 0)
        tail = self._tail
        if tail is not None and tail != caller and tail != self.stream and not self._capturing(caller):
            rt.eventRecord(self._ready2, tail)
            rt.streamWaitEvent(self.stream, self._ready2, 0)

    def _end(self, caller, join):
        ev = self._ev[self._ev_i % len(self._ev)]
        self._ev_i += 1
        self.rt.eventRecord(ev, self.stream)
        if join:
            self.rt.streamWaitEvent(caller, ev, 0)
        # an event recorded into a CUDA graph capture is no host-queryable event afterwards
        self._last = ev if not self._capturing(caller) else None
        self._tail = caller if join else self.stream
        return ev

    def _capturing(self, stream):
        """Whether `stream` is being captured into a CUDA graph. Then its collective must not
        wait for work outside the capture (a capture cannot depend on it; torch.cuda.graph
        synchronises the device before it captures, so that order holds anyway)."""
        try:
            return self.rt.streamIsCapturing(stream) != 0
        except AttributeError:                   # older cupy: ask torch about its current stream
            try:
                import torch
            except ImportError:
                return False
            return torch.cuda.is_current_stream_capturing()

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
        if epoch > self._epoch:          # the device counts replays of captured collectives too
            return "a collective replayed from a CUDA graph (or one after it)"
        w = self._names[epoch & 4095] if epoch > self._epoch - 4096 else None
        if isinstance(w, tuple):
            return f"{w[0]} #{w[1]} on {self.tag} (rank {self.rank}/{self.size})"
        return w or "an earlier collective"

    def _barrier(self, what, sig, where):
        self._next_epoch(what)
        self._barrier_fn()(1, self.stream, (self.tab, self.rank, self.size, self.ectr, sig, self.status.ptr,
                                            self._timeout_ns, where))

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
        # user buffers: LRU within PYCCL_CUDA_IPC_CACHE, or kept till close when a graph is being
        # captured (its replays use these very mappings): ipc_cache.py
        self.registry.mode = "graph" if ptrs and self._capture_now() else "buffer"
        try:
            self._peer_rows(ptrs, table, peers)
        finally:
            self.registry.mode = "kept"
        return peers, table[:, 5:]

    def _peer_rows(self, ptrs, table, peers):
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

    def _drain(self):
        self.rt.streamSynchronize(self.stream)

    # ---- health ------------------------------------------------------------------------------
    def _peers_gone(self):
        """Why peers will not come (exited processes, peers whose communicator gave up), or None."""
        dead = self.watch.dead()
        gave_up = self.mailbox.aborted_peers() if not dead else []
        if not dead and not gave_up:
            return None
        return ", ".join([f"rank {r} (pid {p}) exited" for r, p in dead] +
                         [f"rank {r} gave up (its communicator failed or was aborted)" for r in gave_up])

    def _check_peers(self, what):
        why = self._peers_gone()
        if why:
            self._abort_reason = why
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
        if code == 3 and where == 6:
            raise InvalidArgument(f"{what}: {op} (rank {self.rank}, cuda:{self.dev}): the split sizes "
                                  f"disagree at rank {peer}: it sends more than its input holds, a negative count, "
                                  f"more than a receiver's output holds, or not what out_splits expects")
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
                why = self._peers_gone()
                if why:
                    self._abort_reason = why
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
        self.mailbox.mark_aborted()             # the peers' watchdogs stop waiting for us

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
                tmp = getattr(self, "_tmp_buf", None)
                for p in (self.ctrl, self.small, self.big, tmp[0] if tmp else 0):
                    if p:
                        rt.free(p)
                self.ctrl = self.small = self.big = 0
                self._tmp_buf = None
                for ev in self._ev + self._joins + [self._ready, self._ready2, self._fork]:
                    rt.eventDestroy(ev)
                self._ev, self._joins = [], []
                # the streams go now, not when the communicator object is collected (cupy's Stream
                # destroys its CUDA stream when dropped): close() leaves nothing on the device
                self.stream_obj, self.side = None, []
        finally:
            self.mailbox.close()
            self.status.close()
            self._closed = True
            if self._library is not None:
                from . import library
                library.release(self.dev, paused=self._library_paused)
                self._library = None

    def _release_partial(self):
        """Free what a set-up that raised had made (device memory, mappings, host words)."""
        rt = self.rt
        for name in ("ctrl", "small"):
            p = getattr(self, name, 0)
            if p:
                try:
                    rt.free(p)
                except Exception:  # noqa: BLE001 - best effort, the original error is raised
                    pass
                setattr(self, name, 0)
        for name in ("registry", "mailbox", "status"):
            part = getattr(self, name, None)
            if part is not None:
                try:
                    part.close()
                except Exception:  # noqa: BLE001 - best effort, as above
                    pass

    def _tmp(self, nbytes):
        """pyccl's reduce buffer (non-roots' results): tmp_max bytes, made on first use and not
        regrown while callers keep within it (reductions.reduce goes in rounds of it), so
        launches that name it (prepared ones, captured graphs) stay valid. Only a knob raised at
        run time (oneshot_max) regrows it. A captured call names it: suspend() keeps it."""
        if self._capture_now():
            self._tmp_pinned = True
        cur = getattr(self, "_tmp_buf", None)
        if cur is None or cur[1] < nbytes:
            if cur is not None:
                self.rt.deviceSynchronize()         # lane launches run on the callers' streams
                self.rt.free(cur[0])
                self.forget_prepared()              # prepared reduces name the old buffer
            n = max(nbytes, self.tmp_max)
            cur = self._tmp_buf = (self.rt.malloc(n), n)
        return cur[0]

    def _empty(self, caller, join):
        self._begin(caller)
        return self._end(caller, join)

    def _after(self, tail, stream):
        """`stream` waits for everything queued so far on `tail` (our previous collective)."""
        self.rt.eventRecord(self._ready2, tail)
        self.rt.streamWaitEvent(stream, self._ready2, 0)
