"""The Work objects the group returns to torch: ``_PycclWork`` (CPU and point-to-point calls:
torch's face of pyccl's queue Work, ccl/queue.py, which the communicator's progress thread or
the p2p engine thread finishes), ``_CudaWork`` (an async collective on CUDA tensors: its host
part is over, an event marks the GPU part), ``_SYNC_DONE`` (the one shared completed Work of
synchronous CUDA calls) and ``_Outcome`` (what a synchronous CUDA call reports into)."""
import logging
import time
import traceback
from datetime import timedelta

import torch
import torch.distributed as dist

from ..errors import Timeout
from ..queue import Work

log = logging.getLogger("pyccl")


# ---- time ---------------------------------------------------------------------------------------
def _seconds(timeout):
    """timedelta / number / None -> seconds, or None when unset (torch's -1 ms or 0)."""
    if timeout is None:
        return None
    if isinstance(timeout, timedelta):
        s = timeout.total_seconds()
    else:
        s = float(timeout)
    return s if s > 0 else None


# ---- Work --------------------------------------------------------------------------------------------
def _ended(what, error=None):
    """A queue Work that has ended (a synchronous call's, or one refused before it was queued)."""
    w = Work(what)
    w._finish(error)
    return w


_ENDED = _ended("pyccl synchronous call")


class _PycclWork(dist._Work):
    """torch's Work over pyccl's queue Work (`_work`, the one handle of the call: its end, its
    error); this adds what torch asks for: a Future of the outputs, the source rank. A
    point-to-point call makes its queue Work here (the p2p engine thread ends it through
    _finish); a collective's comes from CallQueue.run (``queued=True``), which ends it on the
    communicator's progress thread (or it is `_ENDED`/`_ended` for a synchronous call)."""

    def __init__(self, what, result=None, queued=False):
        super().__init__()
        self.what = what
        self._result = result if result is not None else []
        self._fut = torch.futures.Future()
        self._work = None if queued else Work(what, on_end=self._settle)
        self._src = -1
        self._cuda_ready = None       # (device, torch.cuda.Event): a CUDA receive's copy to the tensor

    def _settle(self, error=None):
        """Complete the Future (the queue Work's on_end: before its waiters wake)."""
        fut = self._fut
        if fut.done():
            return
        try:
            if error is None:
                fut.set_result(self._result)
            else:
                fut.set_exception(error)
        except Exception:  # noqa: BLE001 - a failing user callback must not kill the thread that ends the call
            log.warning("pyccl: a future callback of %s raised:\n%s", self.what, traceback.format_exc())

    def _finish(self, error=None, source=None):
        """End a point-to-point call (the p2p engine thread)."""
        w = self._work
        if w.is_completed():
            return
        if source is not None:
            self._src = int(source)
        w._finish(error)

    # torch.distributed.Work API
    def wait(self, timeout=None):
        w = self._work
        limit = _seconds(timeout)
        if limit is None:
            while not w.ended(5.0):
                pass
        elif not w.ended(limit):
            raise Timeout(f"{self.what}: not completed within work.wait(timeout={limit:g}s)")
        if w.exception() is not None:
            raise w.exception()
        if self._cuda_ready is not None:
            dev, ev = self._cuda_ready
            torch.cuda.current_stream(dev).wait_event(ev)
            if limit is not None:
                ev.synchronize()
        return True

    def is_completed(self):
        return self._work.is_completed()

    def is_success(self):
        return self._work.is_completed() and self._work.exception() is None

    def exception(self):
        return self._work.exception()

    def get_future(self):
        return self._fut

    def result(self):
        self.wait()
        return self._result

    def source_rank(self):
        return self._src

    def _source_rank(self):
        return self._src

    def synchronize(self):
        pass

    def block_current_stream(self):
        self.wait()

    def __repr__(self):
        w = self._work
        state = "done" if w is not None and w.is_completed() else "pending"
        return f"<pyccl Work {self.what} {state}{' FAILED' if w is not None and w.exception() else ''}>"


class _CudaWork(dist._Work):
    """The Work of a collective on CUDA tensors (see "CUDA tensors" in the module doc). Its host
    part is over when it is returned; `event` marks the end of the GPU part for async calls:
    a ``torch.cuda.Event``, or a raw cudaEvent_t of pyccl's stream (fast lane). No torch
    Future is made unless asked for."""

    def __init__(self, what, result, dev, cc=None, event=None):
        super().__init__()
        self.what = what
        self._result = result
        self._dev = dev
        self._cc = cc                 # CudaCollectives, for raw events and for errors
        self.event = event
        self._error = None
        self._fut = None
        self._keep = None

    def _finish(self, error=None, source=None):
        self._error = error

    def _join(self, stream):
        ev = self.event
        if isinstance(ev, int):
            self._cc.rt.streamWaitEvent(stream.cuda_stream, ev, 0)
        else:
            stream.wait_event(ev)

    def wait(self, timeout=None):
        if self._error is not None:
            raise self._error
        if self.event is not None:
            self._join(torch.cuda.current_stream(self._dev))
        limit = _seconds(timeout)
        if limit is not None:
            self.synchronize_host(limit)
        return True

    def synchronize_host(self, limit):
        """Block the host until the GPU part is done (at most `limit` s); raise its error."""
        cc = self._cc
        if cc is None:
            deadline = time.monotonic() + limit
            while self.event is not None and not self.event.query():
                if time.monotonic() > deadline:
                    raise Timeout(f"{self.what}: not finished on cuda:{self._dev} within {limit:g}s")
                time.sleep(0.0002)
            return
        ev = self.event
        if ev is not None and not isinstance(ev, int):
            deadline = time.monotonic() + limit
            while not ev.query():
                cc.raise_if_failed(self.what)
                if time.monotonic() > deadline:
                    raise Timeout(f"{self.what}: not finished on cuda:{self._dev} within {limit:g}s")
                time.sleep(0.0002)
            cc.raise_if_failed(self.what)
            return
        cc.synchronize(self.what, ev, limit)     # ev None: the latest collective (at or after this one)

    def is_completed(self):
        if self._error is not None or self.event is None:
            return True
        if isinstance(self.event, int):
            return self._cc.rt.eventQuery(self.event) == 0
        return self.event.query()

    def is_success(self):
        return self._error is None

    def exception(self):
        return self._error

    def get_future(self):
        if self._fut is None:
            fut = torch.futures.Future(devices=[torch.device("cuda", self._dev)])
            if self._error is not None:
                fut.set_exception(self._error)
            else:
                s = torch.cuda.Stream(device=self._dev)
                if self.event is not None:
                    self._join(s)
                else:
                    s.wait_stream(torch.cuda.current_stream(self._dev))
                with torch.cuda.stream(s):
                    fut.set_result(self._result)
            self._fut = fut
        return self._fut

    def result(self):
        self.wait()
        return self._result

    def source_rank(self):
        return -1

    def _source_rank(self):
        return -1

    def synchronize(self):
        if self.event is not None:
            self._join(torch.cuda.current_stream(self._dev))

    def block_current_stream(self):
        self.wait()

    def __repr__(self):
        return f"<pyccl CUDA Work {self.what}{' FAILED' if self._error else ''}>"


class _SyncDone(dist._Work):
    """The Work that synchronous collectives on CUDA tensors return when they succeeded: one
    shared, completed object (making a torch Work costs several microseconds, as much as the
    whole enqueue of a small all-reduce). torch's synchronous calls only ``wait()`` on it; its
    ``result()``/``get_future()`` value is an empty list (the call's tensors are the caller's,
    and stream order already holds for them)."""

    what = "pyccl synchronous CUDA collective"

    def wait(self, timeout=None):
        return True

    def is_completed(self):
        return True

    def is_success(self):
        return True

    def exception(self):
        return None

    def get_future(self):
        fut = torch.futures.Future()
        fut.set_result([])
        return fut

    def result(self):
        return []

    def source_rank(self):
        return -1

    def _source_rank(self):
        return -1

    def synchronize(self):
        pass

    def block_current_stream(self):
        pass

    def __repr__(self):
        return "<pyccl CUDA Work (synchronous, done)>"


_SYNC_DONE = _SyncDone()


class _Outcome:
    """What _run reports into for a synchronous CUDA call (a torch Work is made only if it
    failed)."""
    __slots__ = ("_error", "what")

    def __init__(self, what):
        self.what, self._error = what, None

    def _finish(self, error=None, source=None):
        self._error = error
