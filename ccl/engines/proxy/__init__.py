"""Device memory across hosts on the stream: the proxy engine (on by default; PYCCL_PROXY=0 leaves
these calls to the staged engine; bench/JOURNAL.md 2026-12-07 for the hang that kept it opt-in
and its two causes).

A collective (or send/recv) on CUDA buffers whose ranks are on several hosts (one rank per host;
with several ranks per host the staged engine composes CUDA IPC phases, ccl/engines/staged.py,
unless PYCCL_ENGINE=proxy asks for the proxy's own composition, ccl/engines/proxy/composed.py,
whose first GPU test did not finish within 60 s on an H100, cause not seen: bench/JOURNAL.md
2026-12-08) is launches on the caller's stream and one job for a host thread, the proxy, as
NCCL's network transport is a kernel and a proxy thread:

    stream   out launch: copy the input to a pinned arena piece by piece, raising a flag per
             piece; then per group of passes a stream wait for the proxy's word and an in
             launch that copies the finalised ranges back (ccl/engines/proxy/proxy.cu; with
             PYCCL_PROXY_WAIT=kernel one launch does all, spinning on the words)
    proxy    the communicator's progress thread: wait for the doorbell the kernel rings, walk
             the plan of the CPU path (the flat engine's, over TCP or ibverbs) on the arena
             with the executor, pass by pass as the flags allow (ccl/engines/proxy/host.py)

A synchronous call therefore returns as soon as the kernel is queued (NCCL's semantics: the
stream sees the result, the host is free); ``async_op=True`` returns a Work whose wait() makes
the current stream wait. The copies, the network and the reductions overlap pass by pass.

CUDA graphs: a launch captured in a graph keeps its program (ccl/engines/proxy/program.py);
each replay rings the doorbell with a new call number taken from a device counter, and a
watcher thread hands it to the proxy (ccl/engines/proxy/state.py), so every replay moves the
new contents. Nothing in a capture blocks the host; what cannot be captured raises
InvalidArgument at capture time.

No hang: the proxy's waits end at the communicator's timeout; after any failure (a dead peer,
a timeout) it sets the abort word and releases every stream wait (a spinning kernel also gives
up at the timeout by itself). The communicator is then broken and every later call raises;
results of the failed call are undefined, as in NCCL. A host call that waits for the device while
holding the GIL (a process's first torch.cuda.Stream()) stops the proxy, a Python thread: the C
core's watchdog, which needs no GIL, releases the device's waits after the timeout
(ccl/engines/proxy/watchdog.py); without the C core such a call hangs (state.py's module doc).

Order: calls of one communicator must be ordered on the device (one stream, or streams that
wait for each other), as NCCL requires; calls on host memory of the same communicator queue
behind the proxied calls issued before them (CallQueue), but a graph replay runs whenever the
stream reaches it, so do not mix replays with host-memory calls of that communicator without
synchronizing the stream first.

GPUDirect RDMA stays a design (ccl/engines/staged.py's module doc): with a NIC that reads GPU
memory, the arena would be the device buffers themselves and the kernel's copies would go.
"""
import types

from ... import settings
from ...dtypes import DTYPES
from ...errors import InvalidArgument
from ..base import DeviceEngine, EngineBase
from ..cuda.submit import cuda_args, device_splits
from ..cuda_composed import OPS as COMPOSED_OPS, wanted
from ..staged import _OPS, StagedEngine, StagedWork, _OnDevice
from .program import point_to_point, program_key


class ProxyEngine(DeviceEngine):
    """See the module doc. Priced like the flat plan it runs (as the staged engine)."""
    name = "proxy"
    kinds = ("cuda",)
    ops = StagedEngine.ops | {"send", "recv"}     # send/recv: ordered with the collectives, as NCCL's
    stream_ordered = True
    host_async = True                 # the host part runs queued even for a synchronous call
    price = StagedEngine.price

    def __init__(self, res, flat, describe=None, hier=None):
        self.res, self.flat, self.describe = res, flat, describe     # describe: the communicator's Validator
        self.hier = hier                  # the CPU Hierarchy, whose rails the composition shares
        self.state = None
        self._on = settings.get("PYCCL_PROXY")
        self._forced = settings.get("PYCCL_ENGINE") == "proxy"
        self._like = types.SimpleNamespace(flat=flat, rank=res.rank, size=res.size)
        self._cap = max(4096, settings.get("PYCCL_STAGING_CHUNK"))

    def takes(self, call) -> bool:
        res = self.res
        # several ranks per host (the composition, ccl/engines/proxy/composed.py): only where
        # PYCCL_ENGINE=proxy asks for it until it has run on a GPU (the staged composition otherwise)
        return (self._on or self._forced) and res.hosts > 1 and (res.hosts == res.size or self._forced) and \
            EngineBase.takes(self, call) and not device_splits(call)

    def _state(self, view, caller):
        st = self.state
        if st is None:
            from .state import ProxyState
            from pyccl.transports import cuda_ipc
            rt = cuda_ipc._cupy().cuda.runtime
            if rt.streamIsCapturing(caller) != 0:
                raise InvalidArgument("the first collective on CUDA buffers across hosts cannot be captured in a "
                                      "CUDA graph: it sets up the proxy (pinned memory, the kernel); run one call "
                                      "before capturing")
            st = self.state = ProxyState(self.res, view.device, self.describe)
        elif st.dev != view.device:
            raise InvalidArgument(f"buffer is on cuda:{view.device} but this communicator's rank {self.res.rank} "
                                  f"works on cuda:{st.dev} (one GPU per rank and communicator)")
        return st

    def begin(self, call):
        view = (call.out or call.inp).array
        caller = view.caller_stream()
        st = self._state(view, caller)
        rt = st.rt
        capturing = st.drv.capturing(caller)
        inp, out = call.inp, call.out
        if self.res.hosts != self.res.size and call.op in COMPOSED_OPS and self.hier is not None and \
                self._composed(call, st, view, caller, capturing):
            return
        key = program_key(call)
        prog = st.programs.get(key)
        if prog is None:
            prog = st.program(key, lambda: self._build(call), capturing, call.op)
        with _OnDevice(rt, st.dev):
            tag, end = st.launch(prog, caller, inp.array.ptr if inp is not None else 0,
                                 out.array.ptr if out is not None else 0, capturing, call.async_op)
        call.stream = (tag, end, view)

    def _composed(self, call, st, view, caller, capturing) -> bool:
        """Several ranks per host: queue the composition (ccl/engines/proxy/composed.py) where
        ccl/engines/cuda_composed.wanted() takes the call (else False: the flat program)."""
        name, args = cuda_args(call)
        if not wanted(self.res, name, view.nbytes, st):
            return False
        comp = st.composition(self.hier, self._cap, capturing, call.op)
        with _OnDevice(st.rt, st.dev):
            tags, end = comp.call(name, call.op, caller, args, capturing)
            st.drv.wait_event(caller, end)
        if not capturing:
            st.last_end, st.last_stream = end, caller
        call.stream = (tags[0] if tags else 0, end, view)
        return True

    def _build(self, call):
        """(staged description, name, chunk bytes, numpy dtype) of a new program."""
        if call.op in ("send", "recv"):
            name, staged = call.op, point_to_point(self.res, call.inp or call.out, call.peer, call.op == "send")
        else:
            name, args = cuda_args(call)
            staged = _OPS[name](self._like, *args)
        res = self.res
        chunk = staged.chunk or res.chunk_bytes
        if res.fixed_chunk is None:
            chunk = min(chunk, self._cap)
        return staged, name, chunk, DTYPES[call.dtype]

    def run(self, call, what):
        tag = call.stream[0]
        if tag:                           # captured launches have no eager job (the watcher's replays)
            self.state.host.drain(tag, what)
        return None

    def finish(self, call, outcome):
        if call.async_op:
            tag, end, view = call.stream
            return ProxyWork(outcome, self.state, view, end)
        return None


class ProxyWork(StagedWork):
    """The Work of an async proxied call: wait() makes the current stream wait for the kernel's
    end (the host does not wait, unless a timeout is given); errors of the proxy re-raise."""

    def wait(self, timeout=None) -> bool:
        if self._work.is_completed() and self._work.exception() is not None:
            raise self._work.exception()
        st = self._st
        st.rt.streamWaitEvent(self._view.caller_stream(), self._end, 0)
        if timeout is not None:
            self._work.wait(timeout)
            st.synchronize(self.what, self._end, timeout)
        return True
