"""``ProcessGroupPyccl``: the torch.distributed process group. This file holds its identity,
how calls are ordered and run (worker thread, inline synchronous calls, CUDA calls on the
caller's thread), and teardown; the calls themselves are in collectives.py and
point_to_point.py."""
import collections
import logging
import threading
import time
from datetime import timedelta

import torch
import torch.distributed as dist

from .. import settings
from ..errors import InvalidArgument, PeerFailure, PycclError, Timeout
from ..store import PrefixStore, TorchStoreAdapter
from .collectives import CollectivesMixin
from .p2p_engine import _P2PEngine
from .point_to_point import PointToPointMixin
from .works import _SYNC_DONE, _CudaWork, _Outcome, _PycclWork, _seconds

log = logging.getLogger("pyccl")

BACKEND_NAME = "pyccl"
DEFAULT_TIMEOUT_S = 1800.0          # torch's default for non-NCCL backends (30 min)
#: Transport of the point-to-point connections (``PYCCL_TORCH_P2P_TRANSPORT`` overrides). TCP,
#: because its connections fail one by one: a peer that finishes and leaves must not take this
#: rank's connections to the other peers down with it (the shm transport fails them together).
P2P_TRANSPORT = "tcp"


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

    def __init__(self, store, rank, size, timeout=None):
        super().__init__(rank, size)
        from ..communicator import Communicator
        self._rank, self._size = int(rank), int(size)
        self._timeout = _seconds(timeout) or DEFAULT_TIMEOUT_S
        self._group_name = ""
        self._group_desc = ""
        self._torch_store = store
        base = _adapter(dist.PrefixStore("pyccl/", store), self._timeout)
        self._store = base
        self._comm = Communicator(self._rank, self._size, store=PrefixStore(base, "coll"), timeout=self._timeout)
        self._p2p_comm = Communicator(self._rank, self._size, store=PrefixStore(base, "p2p"), timeout=self._timeout,
                                      transport=settings.get("PYCCL_TORCH_P2P_TRANSPORT") or P2P_TRANSPORT)
        self._p2p = _P2PEngine(self._p2p_comm, self._rank, self._timeout, f"pyccl r{self._rank}/{self._size}")
        self._cv = threading.Condition()
        self._pending = collections.deque()
        self._running = False
        self._worker = None
        self._seq = 0
        self._broken = None
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
                self._lane = cc.torch_all_reduce()
                self._copy_lane = cc.torch_copies() if hasattr(cc, "torch_copies") else None
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

    # ===== helpers ===========================================================================
    def _root(self, root, what):
        root = int(root)
        if not 0 <= root < self._size:
            raise InvalidArgument(f"{what}: root {root} is outside this group (0..{self._size - 1})")
        return root
