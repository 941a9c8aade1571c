"""Device memory across hosts: collectives on CUDA buffers staged through pinned host memory.

When a communicator's ranks are on several hosts, the engine choice gives every collective
on CUDA buffers to this engine (StagedEngine). It runs the CPU path of the same communicator — the plan
the tuner picks for host memory, walked by the executor over TCP or ibverbs — on pinned host
copies of the buffers, and pipelines the copies between device and host with the network at
the granularity of the executor's passes (its "for chunk c: for stage: for op" loop):

    d2h stream   D2H of the ranges passes c+1, c+2, ... read first (a few MiB ahead)
    host         executor pass c: sends, receives and reductions of chunk c of every region
    h2d stream   H2D of the ranges whose last write was in pass c-1, c-2, ...

Before the first pass, ``schedule()`` reads the plan once (cached on it): which element ranges
of which buffer each pass reads before anything wrote them on the host (they must come from
the device), and which pass writes each range for the last time (after it the range is
final). The executor calls ``_Stager.before(c)`` and ``after(c)`` around pass c
(``Executor.run(stager=...)``): before waits (bounded) for the D2H group that pass needs and
tops the D2H queue up; after issues the H2D of what pass c finalised. So the staging costs
one chunk of D2H before the first send and one chunk of H2D after the last receive; the
rest hides behind the network. Every collective takes this path: all_reduce, broadcast,
reduce, all_gather, reduce_scatter, all_to_all(v), gather, scatter. A plan whose regions
must each move as one message (``plan.atomic``: halving-doubling, hierarchical all-gather)
has a single pass, so it is staged whole (D2H all, network, H2D all).

Where the reduction runs: on the CPU, inside the network phase (the plan's RECV_REDUCE
steps on the pinned chunks), like the CPU path; reducing on the GPU would need every
received chunk to cross PCIe twice more (H2D, kernel, D2H before it is sent on). What was
measured is in bench/RESULTS.md ("Across hosts, GPU").

Memory: one pinned arena per communicator (cudaHostAlloc), grown to the largest call (input,
output, and for AVG a second copy of the output: the average is taken on the host while
the sum may still be sent on) and reused; it is registered once with every ibverbs device
the communicator's connections use (transports/ibverbs.MRCache), so the RDMA transfers of
the executor find it in the memory-region cache; TCP needs no registration.

GPUDirect RDMA (design only; it cannot be tried on these machines). With a NIC that can read
and write GPU memory (nvidia-peermem, or dmabuf: cuMemGetHandleForAddressRange + ibv_reg_dmabuf_mr),
the copies of this module disappear for the ibverbs transport: ``Staging._arena`` would hand
the executor the device buffers themselves (registered through the same MRCache with a dmabuf
fd instead of a host address), ``_Stager.before`` would become an event wait (the caller's
stream reached the collective) and ``after`` a no-op; the reductions (RECV_REDUCE) then have to
run on the GPU (a kernel per received chunk, launched on pyccl's stream, its completion
polled like the D2H events here) because the CPU cannot read device memory at speed. Between
hosts over TCP the staging stays: sockets need host memory.

Streams (the contract of ccl/engines/cuda/): a collective reads its input only after
the work already queued on the caller's current stream (an event recorded there at the call
gates the copies), and everything queued afterwards on that stream sees its result:

* synchronous: the host runs the network part (it blocks for it, like Gloo on CUDA tensors
  and like every CPU collective: the host is the one that moves the bytes), then makes the
  caller's stream wait for the copies back, without waiting for them itself;
* ``async_op=True``: the whole collective runs on the communicator's progress thread and the
  call returns at once; ``work.wait()`` waits for the network part (bounded) and makes the
  then current stream wait for the copies back; ``work.wait(timeout)`` also blocks the host
  until they are done; ``work.is_completed()`` polls.

Errors are the CPU path's: a dead peer, a timeout, a mismatched call raise PeerFailure,
Timeout or TransportError naming the op, the rank, the peer and the step, on every rank (the
communicator breaks and tells its peers); a copy that does not finish within the
communicator's timeout (the caller's stream never gets there) raises Timeout. They surface
from the synchronous call or from ``work.wait()``.

Several ranks per host: all_reduce, all_gather, reduce_scatter and broadcast run as node-local
phases on the CUDA IPC engine around a staged rail phase (ccl/engines/cuda_composed.py,
``composed_call``); the other collectives (and small messages when ranks of a host share a
GPU) stage whole through the communicator's plan as above.

Environment (defaults):
  PYCCL_STAGING_CHUNK   4194304  largest executor chunk (bytes) of a staged collective: the
                                 unit of copy/network overlap (the tuner's chunk if smaller).
                                 Measured on one H100, 2 ranks as 2 hosts over TCP: 1 MiB chunks
                                 cost 10-15% of busbw at 64-256 MiB against 4 MiB (more executor
                                 passes), 2 MiB 5-10%; the copies hide behind the network either way
  PYCCL_STAGING_AHEAD   16777216 bytes of device-to-host copies queued ahead of the network
"""
import ctypes
import logging
import time

import numpy as np

from .. import settings
from ..buffers import Buffer
from ..dtypes import AVG, DTYPES
from ..errors import InvalidArgument, PycclError, Timeout
from ..reduce import divide_into
from ..tuner import choose
from .base import DeviceEngine, EngineBase
from .cuda.submit import cuda_args, device_splits
from .flat import TUNED
from .staged_memory import StagingMemoryMixin
from .staged_schedule import _Call, _groups, schedule

log = logging.getLogger("pyccl")

_D2H, _H2D = 2, 1                  # cudaMemcpyKind
_EVENTS = 64                       # D2H groups in flight at most (event ring)
_ALIGN = 4096




# ---- the engine ----------------------------------------------------------------------------------
class StagedEngine(DeviceEngine):
    """Ranks on several hosts, device memory: every collective staged through pinned host
    memory around the flat engine's plan, or, with several ranks per host, composed of CUDA
    phases around a staged rail (ccl/engines/cuda_composed.py). Made on the first call (it
    needs the device). Priced like the flat plan it stages."""
    name = "staged"
    kinds = ("cuda",)
    ops = frozenset({"all_reduce", "reduce", "broadcast", "all_gather", "reduce_scatter", "all_to_all",
                     "gather", "scatter"})
    stream_ordered = True

    def __init__(self, res, flat, composed):
        self.res, self.flat, self.composed = res, flat, composed
        self.state = None                 # Staging, on the first call

    def takes(self, call) -> bool:
        return self.res.hosts > 1 and EngineBase.takes(self, call) and not device_splits(call)

    def price(self, call):
        """The time of the flat plan it stages (the tuner with flat=True, as flat.tuned() builds
        it: PYCCL_ALGO=composed leaves the plan to the tuner here, the composition to begin())."""
        if call.op not in TUNED:
            return 0.0
        res = self.res
        return choose(call.op, call.nbytes, res.topology, res.costs, chunk_bytes=res.fixed_chunk, flat=True).predicted

    def begin(self, call):
        view = (call.out or call.inp).array
        st = self.state
        if st is None:
            st = self.state = Staging(self.res, self.flat, self.composed, view.device)
        elif st.dev != view.device:
            raise InvalidArgument(f"{call.op}: buffer is on cuda:{view.device} but this communicator's rank "
                                  f"{self.res.rank} works on cuda:{st.dev} (one GPU per rank and communicator)")
        name, args = cuda_args(call)
        caller = view.caller_stream()
        if st.rt.streamIsCapturing(caller):
            raise InvalidArgument(f"{call.op}: CUDA collectives across hosts cannot be captured in a CUDA graph "
                                  f"on the staged engine (the host moves the bytes, so a replay would not); "
                                  f"the proxy engine captures them with one rank per host (PYCCL_PROXY, on by "
                                  f"default: ccl/engines/proxy/)")
        from . import cuda_composed
        if cuda_composed.wanted(self.res, name, view.nbytes, st):   # several ranks per host
            st.composition()
            call.stream = (caller, view, name, args, None, None)
            return
        call.stream = (caller, view, name, args, st.record_ready(caller), st.next_end())

    def run(self, call, what):
        caller, _, name, args, ready, end = call.stream
        if ready is None:
            return self.state.composed_run(name, what, caller, args)
        return self.state.run(what, _OPS[name], ready, end, args)

    def finish(self, call, outcome):
        st = self.state
        caller, view, name, _, ready, end = call.stream
        if ready is None:                 # composed: the run's result is the end of its last phase
            if call.async_op:
                return ComposedWork(outcome, st.composed.local, view)
            st.rt.streamWaitEvent(caller, outcome, 0)
            if st.sync_each:
                st.composed.local.synchronize(name, outcome)
            return None
        if call.async_op:
            return StagedWork(outcome, st, view, end)
        st.rt.streamWaitEvent(caller, end, 0)
        if st.sync_each:
            st.synchronize(name, end)
        return None


class ComposedWork:
    """The Work of an async composed collective: the host part runs on the communicator's
    thread; waiting makes the then current stream wait for the end of the last local phase."""

    def __init__(self, work, local, view):
        self._work, self._local, self._view = work, local, view
        self.what = work.what

    def wait(self, timeout=None) -> bool:
        self._work.wait(timeout)
        end = self._work.result
        if end is not None:
            self._local.rt.streamWaitEvent(self._view.caller_stream(), end, 0)
            if timeout is not None:
                self._local.synchronize(self.what, end, timeout)
        self._local.raise_if_failed(self.what)
        return True

    def is_completed(self) -> bool:
        if not self._work.is_completed():
            return False
        end = self._work.result
        return self._work.exception() is not None or end is None or self._local.rt.eventQuery(end) == 0

    def exception(self):
        return self._work.exception()

    @property
    def result(self):
        return None


class StagedWork:
    """The Work of an async staged collective (semantics in the module doc)."""

    def __init__(self, work, st, view, end):
        self._work, self._st, self._view, self._end = work, st, view, end
        self.what = work.what

    def wait(self, timeout=None) -> bool:
        self._work.wait(timeout)                  # the network part; raises its error
        st = self._st
        st.rt.streamWaitEvent(self._view.caller_stream(), self._end, 0)
        if timeout is not None:
            st.wait_event(self._end, self.what, "the copies back to the GPU", timeout)
        return True

    def is_completed(self) -> bool:
        if not self._work.is_completed():
            return False
        return self._work.exception() is not None or self._st.rt.eventQuery(self._end) == 0

    def exception(self):
        return self._work.exception()

    @property
    def result(self):
        return None


# ---- what each collective stages ----------------------------------------------------------------
def _all_reduce(comm, buf, op):
    v = buf.array
    plan, chunk = comm.flat.tuned("all_reduce", v.size, v.itemsize, v.nbytes)
    return _Call(plan, chunk, {"out": v}, ("out",), ("out",), op, op is AVG, True)


def _reduce(comm, buf, root, op):
    v = buf.array
    plan, chunk = comm.flat.tuned("reduce", v.size, v.itemsize, v.nbytes, root)
    mine = comm.rank == root                                 # non-roots keep their buffer
    return _Call(plan, chunk, {"out": v}, ("out",), ("out",) if mine else (), op, mine and op is AVG, True)


def _broadcast(comm, buf, root):
    v = buf.array
    plan, chunk = comm.flat.tuned("broadcast", v.size, v.itemsize, v.nbytes, root)
    return _Call(plan, chunk, {"out": v}, ("out",), ("out",))


def _all_gather(comm, out, inp):
    o, i = out.array, inp.array
    plan, chunk = comm.flat.tuned("all_gather", i.size, i.itemsize, o.nbytes)
    return _Call(plan, chunk, {"in": i, "out": o}, ("in",), ("out",))


def _reduce_scatter(comm, out, inp, op):
    o, i = out.array, inp.array
    plan, chunk = comm.flat.tuned("reduce_scatter", o.size, o.itemsize, i.nbytes)
    return _Call(plan, chunk, {"in": i, "out": o}, ("in",), ("out",), op, op is AVG)


def _all_to_all(comm, out, inp, out_splits, in_splits, even=False):
    """The direct plan moves any splits, equal (`even`: none were given) or not."""
    from pyccl.topology import direct
    plan, _ = comm.flat.plan(("all_to_all", in_splits, out_splits),
                             lambda: direct.all_to_all(comm.rank, comm.size, in_splits, out_splits))
    return _Call(plan, None, {"in": inp.array, "out": out.array}, ("in",), ("out",))


def _gather(comm, out, inp, root):
    from pyccl.topology import direct
    i = inp.array
    plan, _ = comm.flat.plan(("gather", i.size, root), lambda: direct.gather(comm.rank, comm.size, i.size, root))
    return _Call(plan, None, {"in": i, "out": out.array if out is not None else None}, ("in",), ("out",))


def _scatter(comm, out, inp, root):
    from pyccl.topology import direct
    o = out.array
    plan, _ = comm.flat.plan(("scatter", o.size, root), lambda: direct.scatter(comm.rank, comm.size, o.size, root))
    return _Call(plan, None, {"out": o, "in": inp.array if inp is not None else None}, ("in",), ("out",))


_OPS = {"all_reduce": _all_reduce, "reduce": _reduce, "broadcast": _broadcast, "all_gather": _all_gather,
        "reduce_scatter": _reduce_scatter, "all_to_all": _all_to_all, "gather": _gather, "scatter": _scatter}


# ---- per-communicator state ---------------------------------------------------------------------
def register_with_verbs(conns, arena) -> list:
    """Register a pinned arena once with each ibverbs device the connections use (their
    memory-region cache then finds every slice of it): [(cache, entry)] to forget at the end."""
    seen, out = set(), []
    for conn in conns.values():
        cache = getattr(getattr(conn, "dev", None), "mrs", None)
        if cache is None or id(cache) in seen:
            continue
        seen.add(id(cache))
        from pyccl.transports.ibverbs import _ACCESS_FULL
        out.append((cache, cache.acquire(memoryview(arena), _ACCESS_FULL)))
    return out


class _OnDevice:
    """The CUDA runtime's current device set to `dev` for a while (restored after: a
    synchronous call runs on the caller's thread)."""
    __slots__ = ("rt", "dev", "prev")

    def __init__(self, rt, dev):
        self.rt, self.dev = rt, dev

    def __enter__(self):
        self.prev = self.rt.getDevice()
        if self.prev != self.dev:
            self.rt.setDevice(self.dev)

    def __exit__(self, *exc):
        if self.prev != self.dev:
            self.rt.setDevice(self.prev)


class Staging(StagingMemoryMixin):
    """Pinned arena, copy streams and events of one communicator that spans hosts (answers
    what the torch backend and the communicator ask of comm.cuda)."""

    staged = True
    _device_ctx = _OnDevice               # for StagingMemoryMixin (memory, suspend, resume)

    def __init__(self, comm, flat, hier, device: int, rt=None):
        if rt is None:
            from pyccl.transports import cuda_ipc
            rt = cuda_ipc._cupy().cuda.runtime
        self.rt = rt
        self.comm = comm                  # the communicator's Resources (ccl/engines/base.py)
        self.flat = flat                  # whose plans the staged calls run
        self.hier = hier                  # the CPU composition, whose rails the CUDA one shares
        self.dev = int(device)
        self.rank, self.size, self.tag = comm.rank, comm.size, comm.tag
        self.timeout = comm.timeout
        self.chunk_cap = max(4096, settings.get("PYCCL_STAGING_CHUNK"))
        self.ahead = max(1 << 20, settings.get("PYCCL_STAGING_AHEAD"))
        self.sync_each = settings.get("PYCCL_CUDA_SYNC")
        self._closed = False
        with _OnDevice(self.rt, self.dev):
            self.d2h = rt.streamCreateWithFlags(1)          # non-blocking: no legacy-stream sync
            self.h2d = rt.streamCreateWithFlags(1)
            self._fetched = [rt.eventCreateWithFlags(2) for _ in range(_EVENTS)]   # timing off
            self._ends = [rt.eventCreateWithFlags(2) for _ in range(_EVENTS)]
        self._end_i = 0
        self._last_end = None
        self._arena_ptr, self._arena_cap, self._arena = 0, 0, None
        self._mrs = []                      # (MRCache, entry) of the arena per ibverbs device
        self.composed = None                # several ranks per host: ccl/engines/cuda_composed.CudaComposed
        self.composed_min = None            # smallest composed message (bytes), decided on first use
        log.info("%s rank %d: CUDA buffers across hosts staged through pinned memory on cuda:%d "
                 "(chunk <= %d B, %d B ahead)", self.tag, self.rank, self.dev, self.chunk_cap, self.ahead)

    # -- events --
    def record_ready(self, caller):
        """An event after the work queued so far on the caller's stream (one per call: the
        copies of a queued async call must wait for exactly this point)."""
        with _OnDevice(self.rt, self.dev):
            ev = self.rt.eventCreateWithFlags(2)
            self.rt.eventRecord(ev, caller)
        return ev

    def next_end(self):
        """The event that will mark the end of the next call's copies back. A ring: when one is
        recorded again by a later call, a late waiter waits for that later point of the same
        stream, which is still correct."""
        ev = self._ends[self._end_i % _EVENTS]
        self._end_i += 1
        return ev

    def wait_event(self, ev, what, doing, timeout=None):
        """Block the host until `ev` has happened, at most `timeout` (default: the
        communicator's) seconds."""
        rt = self.rt
        if rt.eventQuery(ev) == 0:
            return
        limit = self.timeout if timeout is None else timeout
        deadline = time.monotonic() + limit
        pause = 0.00002
        while rt.eventQuery(ev) != 0:
            if time.monotonic() > deadline:
                raise Timeout(f"{what}: rank {self.rank} waited {limit:g}s on cuda:{self.dev} for {doing} "
                              f"(is the stream the collective was called on stuck?)")
            time.sleep(pause)
            pause = min(pause * 2, 0.001)

    # -- the pinned arena --
    def _arena_for(self, sizes):
        """{name: uint8 numpy view} of pinned host memory for the byte sizes asked (grown as
        needed; the previous call's copies back are done with it: checked by run())."""
        layout, off = {}, 0
        for name, n in sizes.items():
            layout[name] = (off, n)
            off += -(-max(n, 1) // _ALIGN) * _ALIGN
        if off > self._arena_cap:
            self._free_arena()
            cap = max(1 << 20, -(-off // (1 << 20)) * (1 << 20))
            with _OnDevice(self.rt, self.dev):
                self._arena_ptr = self.rt.hostAlloc(cap, 0)
            self._arena_cap = cap
            self._arena = np.frombuffer((ctypes.c_char * cap).from_address(self._arena_ptr), dtype=np.uint8)
            self._register()
        return {name: self._arena[o:o + n] for name, (o, n) in layout.items()}

    def _register(self):
        self._mrs.extend(register_with_verbs(self.comm.conns, self._arena))

    def _free_arena(self):
        for cache, entry in self._mrs:
            cache.forget(entry)
        self._mrs = []
        if self._arena_ptr:
            self._arena = None
            with _OnDevice(self.rt, self.dev):
                self.rt.freeHost(self._arena_ptr)
            self._arena_ptr, self._arena_cap = 0, 0

    # -- one collective --
    def run(self, what, build, ready, end, args):
        """The body of one staged collective, run in call order (ccl/queue.py)."""
        rt, comm = self.rt, self.comm
        with _OnDevice(rt, self.dev):
            try:
                call = build(self, *args)
                rt.streamWaitEvent(self.d2h, ready, 0)     # read the input after the caller's work,
                rt.streamWaitEvent(self.h2d, ready, 0)     # write the output after it too
            finally:
                rt.eventDestroy(ready)
            self.raise_if_failed(what)
            if self._last_end is not None:      # the arena is free once the last copies back are done
                self.wait_event(self._last_end, what, "the previous collective's copies back to the GPU")
            views = {n: v for n, v in call.views.items() if v is not None}
            dtype = DTYPES[next(a.dtype for a in args if isinstance(a, Buffer))]
            sizes = {n: v.nbytes for n, v in views.items()}
            avg = call.avg and "out" in call.flush
            if avg:
                sizes["avg"] = views["out"].nbytes
            mem = self._arena_for(sizes)
            host = {n: mem[n].view(dtype) for n in views}
            bufs = dict(host)
            if call.inplace:
                bufs["in"] = bufs["out"]
            chunk = call.chunk or comm.chunk_bytes
            if comm.fixed_chunk is None:
                chunk = min(chunk, self.chunk_cap)
            stager = _Stager(self, what, views, host, mem["avg"].view(dtype) if avg else None,
                             next(iter(views.values())).itemsize if views else 1, call.fetch, call.flush)
            comm.executor.run(call.plan, bufs, call.op, what, chunk, stager=stager)
            rt.eventRecord(end, self.h2d)
            self._last_end = end
        return None

    # -- several ranks per host: the composition of ccl/engines/cuda_composed.py --
    def composition(self):
        """The composed collectives on CUDA buffers (ccl/engines/cuda_composed.py), made by
        the first call that takes them, on the caller's thread."""
        if self.composed is None:
            from .cuda_composed import CudaComposed
            self.composed = CudaComposed(self)
        return self.composed

    def composed_run(self, name, what, caller, args):
        """One composed collective (node-local CUDA phases around a staged rail phase), in
        call order; returns the event that ends its last local phase."""
        return self.composition().run(name, what, caller, args)

    # -- what comm.cuda answers (communicator, torch backend, tests) --
    def raise_if_failed(self, what):
        if self._closed:
            raise PycclError(f"{what}: the staging state of {self.tag} is closed")
        if self.composed is not None:
            self.composed.local.raise_if_failed(what)

    def synchronize(self, what, event=None, timeout=None):
        ev = event if event is not None else self._last_end
        if event is None and self.composed is not None:     # the last local phase, too
            self.composed.local.synchronize(what, None, timeout)
        if ev is not None:
            with _OnDevice(self.rt, self.dev):
                self.wait_event(ev, what, "the collective's copies back to the GPU", timeout)
        self.raise_if_failed(what)

    def torch_all_reduce(self):
        """The torch backend's small all-reduce lane does not apply across hosts."""
        return lambda tensor, op, async_op: False

    def abort(self):
        # the executor's connections are dropped by comm.abort(); the local CUDA engine's waits stop here
        if self.composed is not None:
            self.composed.abort()

    def close(self):
        if self._closed:
            return
        self._closed = True
        if self.composed is not None:
            self.composed.close()
        rt = self.rt
        with _OnDevice(self.rt, self.dev):
            for s in (self.d2h, self.h2d):      # copies still queued read or write the arena
                ev = rt.eventCreateWithFlags(2)
                rt.eventRecord(ev, s)
                try:
                    self.wait_event(ev, "close", "queued copies")
                except Timeout as e:
                    log.error("pyccl %s: %s; leaking the pinned arena", self.tag, e)
                    return
                finally:
                    rt.eventDestroy(ev)
            self._free_arena()
            for ev in self._fetched + self._ends:
                rt.eventDestroy(ev)
            for s in (self.d2h, self.h2d):
                rt.streamDestroy(s)


class _Stager:
    """The copies of one staged collective, driven by the executor pass by pass."""

    def __init__(self, st, what, views, host, avg, item, fetch, flush):
        self.st, self.what = st, what
        self.dev = {n: v.ptr for n, v in views.items()}
        self.host = host
        self.hptr = {n: a.__array_interface__["data"][0] for n, a in host.items()}
        self.avg = avg
        self.avg_ptr = avg.__array_interface__["data"][0] if avg is not None else 0
        self.item = item
        self.fetch = tuple(n for n in fetch if n in self.dev)
        self.flush = tuple(n for n in flush if n in self.dev)

    def start(self, plan, counts, total, alias, chunk_elems):
        """Called by the executor with its chunk layout of the plan, before the first pass."""
        cache = plan.__dict__.setdefault("_staging", {})
        key = (chunk_elems, tuple(sorted(alias.items())), self.fetch, self.flush, self.item)
        hit = cache.get(key)
        if hit is None:
            fetches, flushes = schedule(plan, counts, total, alias, self.fetch, self.flush)
            hit = cache[key] = (_groups(fetches, self.item, max(1 << 20, self.st.ahead // 4)), flushes)
        self.groups, self.flushes = hit
        self.issued = self.waited = 0       # D2H groups queued / waited for by the host
        self.queued = 0                     # bytes queued and not yet waited for
        self._top_up(0)

    def _top_up(self, c):
        """Queue D2H groups until `ahead` bytes are in flight (always those pass c needs)."""
        st, rt, item, groups = self.st, self.st.rt, self.item, self.groups
        while self.issued < len(groups) and self.issued - self.waited < _EVENTS - 1:
            first, ranges, nbytes = groups[self.issued]
            if first > c and self.queued >= st.ahead:
                break
            for name, a, b in ranges:
                rt.memcpyAsync(self.hptr[name] + a * item, self.dev[name] + a * item, (b - a) * item, _D2H, st.d2h)
            rt.eventRecord(st._fetched[self.issued % _EVENTS], st.d2h)
            self.issued += 1
            self.queued += nbytes

    def before(self, c):
        """Before pass c: the host waits for the copies to host it reads."""
        groups = self.groups
        while self.waited < len(groups) and groups[self.waited][0] <= c:
            if self.waited == self.issued:
                self._top_up(c)
            self.st.wait_event(self.st._fetched[self.waited % _EVENTS], self.what,
                               f"the device-to-host copy before pass {c}")
            self.queued -= groups[self.waited][2]
            self.waited += 1

    def after(self, c):
        """After pass c: copy back what it finalised, queue more copies to host."""
        st, rt, item = self.st, self.st.rt, self.item
        for name, a, b in self.flushes[c]:
            src = self.hptr[name]
            if self.avg is not None and name == "out":        # AVG: the sum may still be sent on
                part = self.avg[a:b]
                part[...] = self.host["out"][a:b]
                divide_into(part, st.size)
                src = self.avg_ptr
            rt.memcpyAsync(self.dev[name] + a * item, src + a * item, (b - a) * item, _H2D, st.h2d)
        self._top_up(c + 1)
