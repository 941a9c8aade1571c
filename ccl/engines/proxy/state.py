"""The proxy engine's device side, per communicator: pinned words and arena, the kernel, the
stream it runs on, the programs, and the watcher that hands graph replays to the proxy.

Memory: the words (ccl/engines/proxy/host.py's layout, ~330 KiB) and the copy tables live in
pinned host memory mapped into the device (cudaHostAllocMapped: with unified addressing the host
pointer is the device pointer), so the host writes a program's table with plain stores and
nothing is allocated on the device but two counter words. The arena (PYCCL_PROXY_ARENA bytes at
first) grows for a larger eager call; an arena a program was bound to is kept until close(),
since a captured graph may still use it. Nothing is allocated, compiled or copied while the
caller's stream is being captured: a program first met inside a capture that does not fit the
arena and table space already made raises InvalidArgument (run the call once before capturing).

Streams (PYCCL_PROXY_LAUNCH): `fork` (the default, the way every GPU run so far went) records an
event on the caller's stream, pyccl's stream waits for it, the launches run on pyccl's stream,
and the caller's stream waits for their end (fork and join, so calls made from different streams
never share the arena at once, as NCCL's internal stream does). `caller` (not yet run on a GPU)
puts the launches and waits on the caller's stream itself, four driver calls fewer per call: a
call made on another stream than the previous eager call first makes its stream wait for an
event after that call; calls on one stream are ordered by it; a synchronous call records no end
event (one is recorded on the last call's stream when something needs it). Under capture the
same calls make the launches and waits nodes of the caller's graph.
With PYCCL_PROXY_WAIT=stream (the default where the driver has cuStreamWaitValue64) a call is an
out launch, then per group of passes a stream wait on its site's word and an in launch; sites
0-63 rotate among eager calls, a captured call keeps a site of its own (proxy.cu's header).

The GIL: the proxy is a Python thread, and the device waits for it. A host call that waits for
the device while holding the GIL (the process's first torch.cuda.Stream() does; cudaFree and
module loads wait but let go of the GIL) stops both until the communicator's timeout (a
spinning kernel's own), or, where the stream waits, until the watchdog of the C core releases
the waits (ccl/engines/proxy/watchdog.py: it needs no GIL); without the C core, for good.
pyccl makes its own streams before its first launch (torch_backend/group.py).
"""
import ctypes
import logging
import os
import threading
import time

import numpy as np

from ... import settings
from ...errors import InvalidArgument, PeerFailure, PycclError
from ..staged_memory import composed_memory, composed_suspend
from .driver import Driver
from .host import ABORT, ERROR, ERRORS, GROUPS, POSTED, RING_SLOTS, SITE, SITES, WORDS, ProxyHost
from .program import ITEM, Program

log = logging.getLogger("pyccl")

_SOURCE = os.path.join(os.path.dirname(__file__), "proxy.cu")
_PARAMS = "ussuuuuuuuusus"      # proxy_call's parameters (cuda_ipc.KernelParams letters)
_KERNEL, _STREAM_OUT, _STREAM_IN = 0, 1, 2      # proxy.cu's MODE_*
_THREADS = 512
_ENDS = 64
_TABLE_ROWS = 1 << 16           # rows of copy table per pinned block


def _pinned(rt, nbytes):
    """(pointer, uint8 numpy view) of pinned, device-mapped host memory (portable | mapped)."""
    ptr = rt.hostAlloc(nbytes, 1 | 2)
    return ptr, np.frombuffer((ctypes.c_char * nbytes).from_address(ptr), dtype=np.uint8)


class ProxyState:
    staged = True

    def __init__(self, res, device: int, describe=None):
        from pyccl.transports import cuda_ipc
        self.cupy = cupy = cuda_ipc._cupy()
        self.rt = rt = cupy.cuda.runtime
        self.res, self.dev = res, int(device)
        self.describe = describe         # the communicator's Validator (the torch copy lane's calls)
        self.timeout = res.timeout
        self.drv = Driver()
        self._params = cuda_ipc.KernelParams
        self._lock = threading.Lock()
        self._closed = False
        self._pinned = []               # every pinned block (words, tables, arenas), freed at close
        self._held = {"pinned.proxy_words": 0, "pinned.proxy_tables": 0, "pinned.proxy_arena": 0}
        self._mrs = []                  # (MRCache, entry) of each arena per ibverbs device
        with cupy.cuda.Device(self.dev):
            self.words_ptr, raw = self._alloc(WORDS * 8, "words")
            self.words = raw.view(np.uint64)
            self.words[:] = 0
            self.stream = rt.streamCreateWithFlags(1)           # non-blocking
            self.ctrl = cupy.empty(2, dtype=cupy.uint64)        # zeroed on the stream the kernels use
            rt.memsetAsync(self.ctrl.data.ptr, 0, 16, self.stream)
            self.fork = rt.eventCreateWithFlags(2)              # timing off
            self.ends = [rt.eventCreateWithFlags(2) for _ in range(_ENDS)]
            with open(_SOURCE) as f:
                mod = cupy.RawModule(code=f.read(), options=("-std=c++17",))
            self._module = mod
            fn = mod.get_function("proxy_call")
            self.fn = int(getattr(getattr(fn, "kernel", fn), "ptr"))
        self.stream_waits = settings.get("PYCCL_PROXY_WAIT") == "stream"
        self.on_caller = settings.get("PYCCL_PROXY_LAUNCH") == "caller"
        if self.stream_waits and not self.drv.can_wait_value(self.stream, self.words_ptr):
            log.warning("%s rank %d: the driver has no stream waits (cuStreamWaitValue64); the proxy kernel "
                        "spins instead (PYCCL_PROXY_WAIT=kernel)", res.tag, res.rank)
            self.stream_waits = False
        rt.streamSynchronize(self.stream)      # the counters are zero before any caller's stream launches
        self._sites = RING_SLOTS           # the next site of a captured launch (0-63: eager calls)
        self._end_i = 0
        self.last_end = self.last_stream = None
        self.host = ProxyHost(self.words, res.executor, res.timeout, res.rank, res.tag, res.size)
        from .watchdog import Watchdog
        self.watchdog = Watchdog(self.words, self.words_ptr, res.timeout, res.tag)
        self.programs = {}              # key -> Program
        self.arena_cap = max(1 << 20, settings.get("PYCCL_PROXY_ARENA"))
        self.arena_ptr, self.arena = self._alloc(self.arena_cap, "arena")
        self._register(self.arena)
        self.table_ptr, raw = self._alloc(_TABLE_ROWS * ITEM.itemsize, "tables")
        self.table = raw.view(ITEM)
        self.table_used = 0
        self.ctas = max(1, min(64, settings.get("PYCCL_PROXY_CTAS")))
        self.eager = 0                  # tags of eager calls (1, 2, ...); 0 marks a captured launch
        self.watcher = None
        self.replay_queued = False
        self.composed = None            # several ranks per host: ccl/engines/proxy/composed.py
        self.composed_min = None        # its smallest message, decided on first use (cuda_composed.wanted)
        log.info("%s rank %d: CUDA buffers across hosts through the proxy on cuda:%d (arena %d B)",
                 res.tag, res.rank, self.dev, self.arena_cap)
        if log.isEnabledFor(logging.INFO):
            from .gdr import choose, probe
            way, why = choose(res.transport_name if res.transport_name != "auto" else
                              ("ibverbs" if any(type(c).__name__ == "IbvConnection" for c in res.conns.values())
                               else "tcp"), **probe(self.dev))
            log.info("%s rank %d: GPUDirect RDMA %s (%s); the proxy stages through its pinned arena either way "
                     "(the GPUDirect data path is not built: no NIC here offers it)", res.tag, res.rank,
                     f"possible by {way}" if way else "not possible", why)

    def _alloc(self, nbytes, purpose):
        ptr, view = _pinned(self.rt, nbytes)
        self._pinned.append(ptr)
        self._held[f"pinned.proxy_{purpose}"] += nbytes
        return ptr, view

    # -- comm.memory() / suspend() / resume() (ccl/suspension.py) --
    def memory(self) -> dict:
        """Bytes held by purpose: two counter words on the device; the rest is pinned host
        memory (words, copy tables, arenas: kept until close, as captured graphs name them);
        with several ranks per host, the composition's (ccl/engines/staged_memory.py)."""
        out = {"device.proxy_counter": 16 if self.ctrl is not None else 0, **self._held}
        if self.composed is not None:
            out.update(composed_memory(self.composed))
        return out

    def suspend(self, graphs=True):
        """The proxy itself keeps its 16 device bytes and its pinned arenas, tables and words
        (captured graphs point at them; they are host memory); a composition's local collectives
        suspend as the one-host engine does, and with graphs=False its stage goes too."""
        if self.composed is not None and not self._closed:
            composed_suspend(self.composed, graphs, not graphs)

    def suspend_all(self):
        self.suspend(graphs=False)

    def resume(self):
        if self.composed is not None and not self._closed:
            self.composed.local.resume()

    def _register(self, arena):
        """Register an arena once with each ibverbs device the connections use."""
        from ..staged import register_with_verbs
        self._mrs.extend(register_with_verbs(self.res.conns, arena))

    def composition(self, hier, chunk_cap, capturing, what):
        """The composed collectives (several ranks per host), made by the first call that takes
        them; not inside a capture (the local engine allocates and maps memory then)."""
        if self.composed is None:
            if capturing:
                raise InvalidArgument(f"{what}: the first composed collective (several ranks per host) "
                                      f"cannot be captured in a CUDA graph: it sets up the local phases; run "
                                      f"one call before capturing")
            from .composed import ProxyComposed
            log.warning("%s rank %d: the proxy's composition of several ranks per host (PYCCL_ENGINE=proxy) is "
                        "experimental: on its first GPU run (2 hosts x 2 ranks on one H100, 2026-12-08) its calls "
                        "did not finish within 60 s; the staged composition is the default", self.res.tag,
                        self.res.rank)
            self.composed = ProxyComposed(self, hier, chunk_cap)
        return self.composed

    # -- programs --
    def program(self, key, build, capturing, what):
        """The program of `key`, made by `build()` (a staged-engine _Call) on first use."""
        prog = self.programs.get(key)
        if prog is not None:
            return prog
        staged, name, chunk, dtype = build()
        prog = Program(len(self.host.programs) + 1, name, staged, chunk, self.res.size, dtype)
        rows = len(prog.table)
        if prog.arena_bytes > self.arena_cap or self.table_used + rows > len(self.table):
            if capturing:
                raise InvalidArgument(f"{what}: cannot be captured in a CUDA graph across hosts: its first "
                                      f"call needs new pinned memory ({prog.arena_bytes} B of arena, {rows} "
                                      f"table rows), which cannot be allocated while a stream captures; run "
                                      f"it once before capturing or raise PYCCL_PROXY_ARENA")
            with self.cupy.cuda.Device(self.dev):
                if prog.arena_bytes > self.arena_cap:
                    self.arena_cap = max(prog.arena_bytes, 2 * self.arena_cap)
                    self.arena_ptr, self.arena = self._alloc(self.arena_cap, "arena")
                    self._register(self.arena)
                if self.table_used + rows > len(self.table):
                    self.table_ptr, raw = self._alloc(max(_TABLE_ROWS, rows) * ITEM.itemsize, "tables")
                    self.table, self.table_used = raw.view(ITEM), 0
        prog.bind(self.arena[:prog.arena_bytes])
        at = self.table_used
        self.table[at:at + rows] = prog.table
        self.table_used += rows
        out_ctas = min(self.ctas, max(1, prog.n_out))
        table = self.table_ptr + at * ITEM.itemsize
        common = (self.arena_ptr, self.words_ptr, self.ctrl.data.ptr, prog.pid, 0, int(self.timeout * 1e9))
        if self.stream_waits:            # out launch; per group: a stream wait, then an in launch
            prog.grid = out_ctas
            prog.params = self._params(_PARAMS, (table, prog.n_out, 0, 0, 0) + common + (out_ctas, 0, _STREAM_OUT))
            prog.in_launches = []
            for lo, hi in prog.in_groups:
                grid = min(self.ctas, hi - lo)
                prog.in_launches.append((self._params(_PARAMS, (table + (prog.n_out + lo) * ITEM.itemsize, 0,
                                                                hi - lo, 0, 0) + common + (0, 0, _STREAM_IN)),
                                         grid))
        else:
            in_ctas = min(self.ctas, max(1, prog.n_in))
            prog.grid = out_ctas + in_ctas
            prog.params = self._params(_PARAMS, (table, prog.n_out, prog.n_in, 0, 0) + common +
                                       (out_ctas, 0, _KERNEL))
            prog.in_launches = ()
        self.host.programs[prog.pid] = prog
        self.programs[key] = prog
        return prog

    # -- one call, on the caller's thread --
    def launch(self, prog, caller, dev_in, dev_out, capturing, need_end=True):
        """Enqueue the launches (and stream waits) of `prog` after the caller's stream's work (see
        Streams in the module doc); returns (tag, end event): tag 0 when captured (each replay
        rings the doorbell itself); end None where the launch made none and `need_end` is false
        (``_last_end()`` records one later where it is needed)."""
        drv = self.drv
        if self.words[ERROR] or self.words[ABORT]:
            self.raise_if_failed(prog.name)
        if capturing:
            tag, site = 0, self._sites
            if site >= SITES:
                raise InvalidArgument(f"{prog.name}: cannot be captured: {SITES - RING_SLOTS} proxied calls were "
                                      f"captured on this communicator already (each keeps a site of words)")
            self._sites += 1
        else:
            self.eager += 1
            tag = self.eager
            site = tag % RING_SLOTS
        vals = prog.params.vals
        vals[3].value, vals[4].value, vals[9].value, vals[12].value = dev_in, dev_out, tag, site
        if self.on_caller:
            stream = caller
            if not capturing and caller != self.last_stream and self.last_stream is not None:
                drv.wait_event(caller, self._last_end())      # the previous call (another stream) is done with the arena
        else:                                                 # fork onto pyccl's stream ...
            stream = self.stream
            drv.record(self.fork, caller)
            drv.wait_event(stream, self.fork)
        drv.launch(self.fn, prog.grid, _THREADS, stream, prog.params.address)
        if prog.in_launches:
            word = self.words_ptr + 8 * (SITE + site * GROUPS)
            for g, (params, grid) in enumerate(prog.in_launches):
                drv.wait_value(stream, word + 8 * g, 1)
                if grid:
                    vals = params.vals
                    vals[3].value, vals[4].value = dev_in, dev_out
                    drv.launch(self.fn, grid, _THREADS, stream, params.address)
        end = None
        if need_end or not self.on_caller:
            end = self._next_end()
            drv.record(end, stream)
            if not self.on_caller:
                drv.wait_event(caller, end)                   # ... and join back
        if not capturing:
            self.last_end, self.last_stream = end, caller
        elif self.watcher is None:
            self._watch()
        return tag, end

    def _next_end(self):
        end = self.ends[self._end_i % _ENDS]
        self._end_i += 1
        return end

    def _last_end(self):
        """An event after the last eager call: its own end event, or one recorded now on its
        stream (after whatever was queued there since, which only makes waiting for it safe)."""
        if self.last_end is None and self.last_stream is not None:
            self.last_end = self._next_end()
            self.drv.record(self.last_end, self.last_stream)
        return self.last_end

    # -- graph replays: nobody on the host announces them --
    def _watch(self):
        """Start the thread that hands posted replays to the proxy (once a launch was captured)."""
        self.watcher = threading.Thread(target=self._watch_loop, name=f"pyccl-proxy-{self.res.tag}", daemon=True)
        self.watcher.start()

    def _watch_loop(self):
        q, host, w = self.res.queue, self.host, self.words
        nap = 5e-5
        while not self._closed and q.broken is None and not q.closed:
            if int(w[POSTED]) > host.handled and not self.replay_queued:
                self.replay_queued = True
                try:
                    q.run("graph replay", self._replays, True, counted=False, detached=True)
                except PycclError:
                    return
                nap = 5e-5
                continue
            time.sleep(nap)
            nap = min(nap * 2, 2e-4)

    def _replays(self, what):
        try:
            self.host.drain(None, what)
        finally:
            self.replay_queued = False

    # -- what comm.cuda answers (communicator, torch backend, tests) --
    def raise_if_failed(self, what):
        if self._closed:
            raise PycclError(f"{what}: the proxy of {self.res.tag} is closed")
        if self.composed is not None:
            self.composed.local.raise_if_failed(what)
        q = self.res.queue
        if (self.words[ERROR] or self.words[ABORT]) and q.broken is None and not q.on_progress_thread():
            q.wait_idle(min(self.timeout, 5.0))      # the proxy's job that failed is still unwinding
        if q.broken is not None:
            raise PeerFailure(f"{what}: communicator {self.res.tag} is broken by an earlier error ({q.broken})")
        self.host.check_fired(what)
        if self.words[ABORT]:
            raise PeerFailure(f"{what}: rank {self.res.rank}'s proxy on {self.res.tag} stopped after an error")
        code = int(self.words[ERROR])
        if code:
            raise PycclError(f"{what}: rank {self.res.rank}'s proxy kernel {ERRORS.get(code, code)} "
                             f"(call {int(self.words[2])}); the communicator is unusable")

    def synchronize(self, what, event=None, timeout=None):
        """Block the host until `event` (default: the last eager call's end) has happened."""
        ev = event if event is not None else self._last_end()
        if ev is not None:
            limit = self.timeout if timeout is None else timeout
            deadline = time.monotonic() + limit
            with self.cupy.cuda.Device(self.dev):
                while self.rt.eventQuery(ev) != 0:
                    if self.words[ERROR] or time.monotonic() > deadline:
                        break
                    time.sleep(2e-5)
        self.raise_if_failed(what)

    def torch_all_reduce(self):
        """The torch backend's fast lane (ccl/engines/cuda/lane.py's contract): ``lane(tensor, op,
        async_op)`` launches the kernel of a program the general path made already and queues its
        host part, without torch Work, validation or engine choice; returns None (synchronous),
        the end event (async_op) or False (anything else: the general path runs it, the same way)."""
        from ..cuda.lane import _torch_maps
        get_stream, get_device, dtypes, ops = _torch_maps()
        if self.describe is None:
            return lambda tensor, op, async_op: False
        cache = {}

        def lane(t, opname, async_op):
            key = (t.data_ptr(), t.numel(), t.dtype, opname)
            hit = cache.get(key)
            if hit is None:
                hit = self._known(lambda: self.describe.all_reduce(t, ops[opname], False))
                if hit is None:             # the general path makes the program first
                    return False
                cache[key] = hit
            if hit is False or get_device() != self.dev or not t.is_contiguous():
                return False
            return self._lane_launch("all_reduce", hit, get_stream(self.dev), async_op)
        return lane

    def torch_copies(self):
        """The torch backend's lane of the other collectives (ccl/engines/cuda/lane.py's contract:
        ``lane(name, out, inp, arg, async_op)``, name all_gather, all_to_all, broadcast,
        reduce_scatter or reduce), for programs the general path made already."""
        from ..cuda.lane import _torch_maps
        get_stream, get_device, dtypes, ops = _torch_maps()
        describe = self.describe
        if describe is None:
            return None
        import torch

        def raw(t):                 # the general path moves these three as bytes (torch_backend/tensors.py)
            return t.reshape(-1).view(torch.uint8)
        calls = {"all_gather": lambda out, inp, arg: describe.all_gather(raw(out), raw(inp), False),
                 "all_to_all": lambda out, inp, arg: describe.all_to_all(raw(out), raw(inp), None, None, False),
                 "broadcast": lambda out, inp, arg: describe.broadcast(raw(out), arg, False),
                 "reduce_scatter": lambda out, inp, arg: describe.reduce_scatter(out, inp, ops[arg], False),
                 "reduce": lambda out, inp, arg: describe.reduce(out, arg[0], ops[arg[1]], False)}
        cache = {}

        def lane(name, out, inp, arg, async_op):
            key = (name, out.data_ptr(), inp.data_ptr(), out.numel(), inp.numel(), out.dtype, arg)
            hit = cache.get(key)
            if hit is None:
                make = calls.get(name)
                hit = self._known(lambda: make(out, inp, arg)) if make is not None else False
                if hit is None:             # the general path makes the program first
                    return False
                cache[key] = hit
            if hit is False or get_device() != self.dev or not out.is_contiguous() or not inp.is_contiguous():
                return False
            return self._lane_launch(name, hit, get_stream(self.dev), async_op)
        return lane

    def _known(self, describe_call):
        """(program, input pointer, output pointer) for a lane call described by the communicator's
        Validator; False where a lane never takes it (bad input, reproducible mode, host memory);
        None while the general path has not made its program."""
        from .program import program_key
        try:
            call = describe_call()
        except (PycclError, KeyError):
            return False
        if call.reproducible or call.kind != "cuda":
            return False
        prog = self.programs.get(program_key(call))
        if prog is None:
            return None
        return prog, call.inp.array.ptr if call.inp is not None else 0, call.out.array.ptr if call.out is not None else 0

    def _lane_launch(self, name, hit, caller, async_op):
        """A lane's call: the kernel on the stream, the host part queued behind the others; False
        when the queue holds other than host parts, the state is closed or the stream captures."""
        q = self.res.queue
        if q.inflight != q.detached or self._closed or self.drv.capturing(caller):
            return False
        prog, dev_in, dev_out = hit
        tag, end = self.launch(prog, caller, dev_in, dev_out, False, async_op)
        host = self.host
        q.post(name, lambda what: host.drain(tag, what))
        return end if async_op else None

    def abort(self):
        self.host.abort()
        if self.composed is not None:
            self.composed.abort()

    def close(self):
        if self._closed:
            return
        self.host.abort()                # kernels and stream waits still waiting stop now
        self._closed = True
        self.watchdog.stop()             # before its words are freed
        if self.composed is not None:
            try:
                self.composed.close()
            except Exception as e:  # noqa: BLE001 - the proxy's own memory is released below either way
                log.debug("pyccl proxy close, composed part: %s", e)
        rt = self.rt
        with self.cupy.cuda.Device(self.dev):
            try:
                ev = self._last_end()            # after the last eager call (calls end in order)
                deadline = time.monotonic() + min(self.timeout, 10.0)
                while ev is not None and rt.eventQuery(ev) != 0 and time.monotonic() < deadline:
                    time.sleep(1e-3)
                done = ev is None or rt.eventQuery(ev) == 0
            except Exception as e:  # noqa: BLE001 - the context may be gone at exit
                log.debug("pyccl proxy close: %s", e)
                return
            if not done:
                log.error("pyccl %s: the proxy's kernels did not end; leaking its pinned memory", self.res.tag)
                return
            for cache, entry in self._mrs:
                cache.forget(entry)
            for ptr in self._pinned:
                rt.freeHost(ptr)
            self._pinned = []
            self._held = dict.fromkeys(self._held, 0)
            for ev in [self.fork] + self.ends:
                rt.eventDestroy(ev)
            rt.streamDestroy(self.stream)
            self.ctrl = None
