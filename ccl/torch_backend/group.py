"""``ProcessGroupPyccl``: the torch.distributed process group. This file holds its identity,
how calls are ordered and run (on the collectives communicator's one queue, ccl/queue.py:
inline synchronous calls, the communicator's progress thread, CUDA calls on the caller's
thread), and teardown; the calls themselves are in collectives.py and point_to_point.py."""
import logging
import threading
from datetime import timedelta

import torch
import torch.distributed as dist

from .. import settings
from ..errors import InvalidArgument, PycclError
from ..queue import LocalFailure
from ..store import PrefixStore, TorchStoreAdapter
from .collectives import CollectivesMixin
from .p2p_engine import _P2PEngine
from .point_to_point import PointToPointMixin
from .works import _ENDED, _SYNC_DONE, _CudaWork, _Outcome, _PycclWork, _ended, _seconds

log = logging.getLogger("pyccl")

BACKEND_NAME = "pyccl"
DEFAULT_TIMEOUT_S = 1800.0          # torch's default for non-NCCL backends (30 min)
#: Transport of the point-to-point connections (``PYCCL_TORCH_P2P_TRANSPORT`` overrides). TCP,
#: because its connections fail one by one: a peer that finishes and leaves must not take this
#: rank's connections to the other peers down with it (the shm transport fails them together).
P2P_TRANSPORT = "tcp"


def p2p_transport() -> str:
    return settings.get("PYCCL_TORCH_P2P_TRANSPORT") or P2P_TRANSPORT


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


# ---- the process group -------------------------------------------------------------------------------
class ProcessGroupPyccl(CollectivesMixin, PointToPointMixin, dist.ProcessGroup):
    """A torch.distributed process group whose collectives run on pyccl (see the module doc)."""

    # torch asks a group for its per-device backend (`_get_backend`) and what that supports;
    # this group is its own backend on every device.
    supports_splitting = False
    supports_coalescing = False
    supports_time_estimate = False

    def __init__(self, store, rank, size, timeout=None, *, comms=None):
        """`comms`: (collectives, point-to-point) Communicators already made (an elastic group,
        torch_backend/elastic.py); `store` is then None."""
        super().__init__(rank, size)
        from ..communicator import Communicator
        self._rank, self._size = int(rank), int(size)
        self._timeout = _seconds(timeout) or DEFAULT_TIMEOUT_S
        self._group_name = ""
        self._group_desc = ""
        self._torch_store = store
        if comms is not None:
            self._comm, self._p2p_comm = comms
        else:
            base = _adapter(dist.PrefixStore("pyccl/", store), self._timeout)
            self._comm = Communicator(self._rank, self._size, store=PrefixStore(base, "coll"), timeout=self._timeout)
            self._p2p_comm = Communicator(self._rank, self._size, store=PrefixStore(base, "p2p"),
                                          timeout=self._timeout, transport=p2p_transport())
        self._p2p = _P2PEngine(self._p2p_comm, self._rank, self._timeout, f"pyccl r{self._rank}/{self._size}")
        self._q = self._comm.queue    # the one order of this group's collectives (ccl/queue.py)
        self._seq = 0                 # numbers point-to-point calls in their names
        self._closed = False
        self._lane = None             # fast lane of small CUDA all-reduces (set on first CUDA use)
        self._copy_lane = None        # fast lane of the other CUDA collectives (set with _lane)
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

    # -- execution: the communicator's queue (ccl/queue.py) orders and runs every collective --
    def _what(self, name):
        self._seq += 1
        return f"pyccl {name} #{self._seq} (group {self._group_name or '?'}, rank {self._rank}/{self._size})"

    def _body(self, work, fn):
        """fn(work) as a queued function: `what` names the call; InvalidArgument and torch's own
        errors fail this call only (LocalFailure), a PycclError breaks the queue (for good)."""
        def body(what):
            work.what = "pyccl " + what
            try:
                fn(work)
            except PycclError as e:
                if isinstance(e, InvalidArgument):
                    raise LocalFailure(e) from None
                raise
            except Exception as e:  # noqa: BLE001 - torch errors in copies etc.: report, do not break
                raise LocalFailure(e) from None
        return body

    def _submit(self, name, fn, result, opts=None, async_op=None, dev=None):
        """Run `fn(work)` on the communicator's queue, in call order, and return its Work: at once
        on the caller's thread when synchronous and nothing is queued (or from a future callback
        on the progress thread), else on the progress thread. `dev`: the GPU of the call's CUDA
        tensors (None: CPU), see _submit_cuda."""
        if async_op is None:
            async_op = bool(getattr(opts, "asyncOp", True)) if opts is not None else True
        if self._closed:
            raise PycclError(f"pyccl {name}: the process group is shut down")
        if dev is not None:
            return self._submit_cuda(name, fn, result, async_op, dev)
        work = _PycclWork(f"pyccl {name}", result, queued=True)
        try:
            if async_op:
                work._work = self._q.run(name, self._body(work, fn), True, on_end=work._settle, counted=False)
                return work
            self._q.run(name, self._body(work, fn), False, on_end=work._settle, counted=False)
        except Exception as e:  # noqa: BLE001 - handed to torch through the Work, as Gloo does
            work._work = _ended(work.what, e)
            work._settle(e)
            return work
        work._work = _ENDED
        work._settle()
        return work

    def _submit_cuda(self, name, fn, result, async_op, dev):
        """A collective on CUDA tensors: run on the caller's thread (whose current stream it is
        ordered after), after whatever the queue holds before it (CallQueue.run_here); it only
        enqueues GPU work. async_op: the body runs with a side stream as the current stream
        (which first waits for the caller's), and the Work's wait() joins it back."""
        work = _Outcome(f"pyccl {name}") if not async_op else _CudaWork(f"pyccl {name}", result, dev)
        if dev not in self._side:
            # made before this group queues any kernel: creating a torch stream holds the GIL while
            # it waits for the device, and a proxied kernel in flight waits for a Python thread
            self._side[dev] = torch.cuda.Stream(device=dev)
        if async_op:
            fn = self._on_side_stream(fn, dev)
        try:
            self._q.run_here(name, self._body(work, fn), counted=False)
        except Exception as e:  # noqa: BLE001 - handed to torch through the Work
            work._error = e
        cc = self._comm.cuda
        if self._lane is None and cc is not None and work._error is None:
            self._lane_dev, self._lane_cc = cc.dev, cc
            self._lane = cc.torch_all_reduce()
            self._copy_lane = cc.torch_copies() if hasattr(cc, "torch_copies") else None
        if isinstance(work, _Outcome):
            if work._error is None:
                return _SYNC_DONE
            failed = _CudaWork(work.what, result, dev)
            failed._error = work._error
            work = failed
        work._cc = cc
        return work

    def _on_side_stream(self, fn, dev):
        """fn on this group's side stream of `dev`, which first waits for the caller's current
        stream; the Work gets the event that ends it (and keeps fn, whose closure holds every
        tensor the side stream uses)."""
        def on_side(work):
            caller = torch.cuda.current_stream(dev)
            side = self._side[dev]
            side.wait_stream(caller)
            with torch.cuda.stream(side):
                fn(work)
            ev = torch.cuda.Event()
            ev.record(side)
            work.event = ev
            work._keep = fn
        return on_side

    def _break(self, e):
        """A fast lane raised a GPU error (the kernels left it in host memory): the queue is
        broken, as after any failed call, so every later call fails at once."""
        if self._q.broken is None:
            self._q.broken = f"{type(e).__name__}: {e}"

    # -- teardown --
    def shutdown(self):
        if self._closed:
            return
        self._closed = True
        if self._q.on_progress_thread():        # from a future callback: that thread cannot join itself
            threading.Thread(target=self._close_all, daemon=True).start()
            return
        if not self._q.wait_idle(min(self._timeout, 10.0)):
            self._comm.abort()                  # what is still queued fails now, not at the timeout
        self._close_all()

    def _close_all(self):
        self._p2p.close()
        for c in (self._comm, self._p2p_comm):
            try:
                c.close()
            except Exception as e:  # noqa: BLE001 - closing is best effort
                log.debug("pyccl: closing %s: %s", c, e)

    def abort(self):
        if not self._closed:
            self._comm.abort()              # drop the connections: the running call fails now
        self.shutdown()

    # ===== helpers ===========================================================================
    def _root(self, root, what):
        root = int(root)
        if not 0 <= root < self._size:
            raise InvalidArgument(f"{what}: root {root} is outside this group (0..{self._size - 1})")
        return root
