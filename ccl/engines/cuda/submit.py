"""The CUDA engine (collectives on device memory of ranks that share a host) and its async Work."""
from ...errors import InvalidArgument
from ..base import DeviceEngine, EngineBase
from .signature import _signature

#: the collectives of CudaCollectives, by the name of the method that runs them
METHODS = frozenset({"all_reduce", "reduce", "broadcast", "all_gather", "reduce_scatter", "all_to_all",
                     "gather", "scatter"})


def device_splits(call) -> bool:
    """all_to_all with split sizes in CUDA tensors (moved without a device-to-host copy)."""
    return call.dev_splits


def cuda_args(call) -> tuple:
    """(method name, arguments) as the CUDA collectives and the staging take them."""
    op, i, o = call.op, call.inp, call.out
    if op in ("all_reduce",):
        return op, (o, call.redop)
    if op == "reduce":
        return op, (o, call.root, call.redop)
    if op == "broadcast":
        return op, (o, call.root)
    if op == "all_gather":
        return op, (o, i)
    if op == "reduce_scatter":
        return op, (o, i, call.redop)
    if op == "all_to_all":
        if device_splits(call):
            return "all_to_all_dev", (o, i, call.out_splits, call.in_splits)
        return op, (o, i, call.out_splits, call.in_splits, call.even)
    if op in ("gather", "scatter"):
        return op, (o, i, call.root)
    raise InvalidArgument(f"{op}: not implemented for CUDA buffers yet; use a CPU copy")


class CudaEngine(DeviceEngine):
    """Ranks of one host, device memory: the IPC kernels and copy engines of CudaCollectives,
    made on the first call (it needs the device). Stream-ordered: a call binds the caller's
    current stream when it is made, and its host part only enqueues (ccl/engines/base.py)."""
    name = "cuda"
    kinds = ("cuda",)
    ops = METHODS
    stream_ordered = True
    enqueue_only = True

    def __init__(self, res):
        self.res = res
        self.state = None                 # CudaCollectives, on the first call

    def takes(self, call) -> bool:
        return self.res.hosts == 1 and EngineBase.takes(self, call)

    def price(self, call):
        link = self.res.costs.get("cuda_ipc")
        return link.alpha + call.nbytes * link.beta if link is not None else 0.0

    def begin(self, call):
        view = (call.out or call.inp).array
        dev = view.device
        cc = self.state
        if cc is None:
            from .engine import CudaCollectives
            cc = self.state = CudaCollectives(self.res, dev)
        elif cc.dev != dev:
            raise InvalidArgument(f"{call.op}: buffer is on cuda:{dev} but this communicator's rank "
                                  f"{self.res.rank} works on cuda:{cc.dev} (one GPU per rank and communicator)")
        name, args = cuda_args(call)
        call.stream = (view.caller_stream(), _signature(name, call.sig), name, args, view)

    def run(self, call, what):
        caller, signature, name, args, _ = call.stream
        st = self.state
        st._caller = caller                       # whether it is captured, when that matters (memory.py)
        return getattr(st, name)(what, caller, not call.async_op, signature, *args)

    def finish(self, call, outcome):
        if call.async_op:
            return CudaWork(outcome, self.state, call.stream[4])
        if self.state.sync_each:
            self.state.synchronize(call.op)
        return None



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
