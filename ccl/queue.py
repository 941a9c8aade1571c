"""Call order: the one queue of a communicator, and the Work of an asynchronous call.

Collectives run in the order they are called (like a CUDA stream in NCCL). A synchronous
call runs on the caller's thread when nothing is queued, which keeps small-message latency
low; `async_op=True` queues it on the communicator's progress thread and returns a `Work` at
once. After an error the queue is broken: later calls raise at once instead of hanging on a
peer that has given up. The engines and the torch backend order their work through this
object (`seq`, `inflight`, `broken`, `closed` are read by the CUDA fast lanes).

A call may make calls of its own (the torch backend's collectives call the communicator): a
synchronous call made while a call runs on the same thread, or from the progress thread (a
future callback run as a call ends), runs at once inside that turn, since queueing it would
wait for itself. The locks are re-entrant for that reason alone.
"""
import contextlib
import queue
import threading
import time

from .engines.base import Enqueued
from .errors import PeerFailure, PycclError, Timeout


_NO_LOCK = contextlib.nullcontext()
_time = time.time


class LocalFailure(Exception):
    """Raised by a queued function to fail its own call only: the caller gets `error` and the
    queue stays usable. For errors that leave no peer mid-call in a way the queue cannot see
    (the torch backend's InvalidArgument and torch errors, which never broke a group)."""

    def __init__(self, error):
        super().__init__(str(error))
        self.error = error


class Work:
    """Handle of one queued collective, like torch's Work. on_end(error): called as the call
    ends, before any waiter wakes, on the thread that ends it (the torch backend completes its
    Future there, so a value is ready once wait() returns); it must not raise."""

    def __init__(self, what: str, timeout=None, on_end=None):
        self.what = what
        self._timeout = timeout
        self._done = threading.Event()
        self._error = None
        self._on_end = on_end
        self.result = None

    def _finish(self, error=None):
        self._error = error
        end, self._on_end = self._on_end, None      # once; and no cycle through a bound method
        if end is not None:
            end(error)
        self._done.set()

    def ended(self, timeout=None) -> bool:
        """Wait up to `timeout` seconds (None: for good) without raising: whether it ended."""
        return self._done.wait(timeout)

    def is_completed(self) -> bool:
        return self._done.is_set()

    def exception(self):
        return self._error

    def wait(self, timeout=None) -> bool:
        """Block until done (bounded by `timeout` or the communicator's); re-raise its error."""
        limit = timeout if timeout is not None else (self._timeout * 2 + 5 if self._timeout else None)
        if not self._done.wait(limit):
            raise Timeout(f"{self.what} did not finish within {limit:.0f}s")
        if self._error is not None:
            raise self._error
        return True


class CallQueue:
    """tag, rank, size: for messages; recorder: the flight recorder; on_failure(e, entry): the
    communicator's reaction to a failed call (tell the peers, break, abort), returning the
    exception to raise; check(call, what): PYCCL_CHECK's agreement, or None."""

    def __init__(self, tag, rank, size, timeout, recorder, on_failure, check=None):
        self.tag, self.rank, self.size, self.timeout = tag, rank, size, timeout
        self.recorder = recorder
        self.on_failure = on_failure
        self.check = check
        self.seq = 0
        self.inflight = 0
        self.detached = 0             # queued host parts of calls already on the device (see run)
        self.broken = None            # the reason, once a call failed
        self.closed = False
        self._lock = threading.RLock()          # serialises execution (re-entrant: calls in a call)
        self._submit_lock = threading.RLock()
        self._idle = threading.Condition(self._submit_lock)     # notified when inflight drops to 0
        self._failure = None                    # the exception _fail returned last
        self._queue = queue.SimpleQueue()      # (C: a put costs ~0.1 us, queue.Queue's ~2)
        self._thread = None

    def what(self, op, seq) -> str:
        number = f" #{seq}" if seq is not None else ""
        return f"{op}{number} on {self.tag} (rank {self.rank}/{self.size})"

    def usable(self, what):
        if self.closed:
            raise PycclError(f"{what}: communicator {self.tag} is closed")
        if self.broken is not None:
            raise PeerFailure(f"{what}: communicator {self.tag} is broken by an earlier error "
                              f"({self.broken}); create a new one")

    # ---- one call on its engine ----------------------------------------------------------
    def submit(self, call, engine):
        """Run `call` on `engine` in call order: now, or queued (async_op). Stream-ordered
        engines bind the caller's stream first and shape what the caller gets back."""
        if not call.async_op and call.op in engine.shortcuts and self.check is None and self.run_now(call, engine):
            return None
        if engine.composite:              # made of other calls, each submitted in order
            self.usable(call.op)
            return engine.run(call, call.op)
        streamed = engine.stream_ordered
        if not streamed:
            return self.run(call.op, lambda what: engine.run(call, what), call.async_op, call.sig, call)
        self.usable(call.op)
        engine.begin(call)
        if call.async_op and engine.enqueue_only and self.inflight == 0:
            # nothing queued before it: enqueue right here (it never blocks the host) instead of
            # handing it to the progress thread; the caller's stream is not made to wait
            done = self.run(call.op, lambda what: engine.run(call, what), False, call.sig, call)
            return engine.finish(call, Enqueued(done, call.op))
        detached = engine.host_async        # the device work is queued already; the host part follows
        return engine.finish(call, self.run(call.op, lambda what: engine.run(call, what),
                                            call.async_op or detached, call.sig, call, detached=detached))

    def run(self, op: str, fn, async_op: bool, sig=None, call=None, on_end=None, counted=True, detached=False,
            beside=False):
        """Run `fn(what)` in call order; sig (dtype, count, root, redop) feeds the flight
        recorder and, with `call`, PYCCL_CHECK; on_end goes to the Work (see Work), made when
        the call is queued (async_op, or behind others). counted=False: a wrapper around calls
        that count themselves (the torch backend's bodies): no sequence number, no recorder
        entry, so every rank numbers the same calls whichever path (wrapper or CUDA fast lane)
        it takes. detached: a queued host part whose device work the caller has enqueued already
        (engines with `host_async`); beside: a synchronous call that only enqueues device work
        (run_here) may run on the caller's thread while only detached parts are queued."""
        self.usable(op)
        if counted:
            what, entry = self._number(op, sig)
        else:
            what, entry = self.what(op, None), None
        if self.check is not None and call is not None and op not in ("send", "recv"):
            fn = self._checked(fn, call)
        with self._submit_lock:
            beside = not async_op and beside and self.inflight == self.detached
            if not beside:
                if not async_op and (self.inflight == 0 or threading.current_thread() is self._thread):
                    return self._execute(what, fn, entry)
                work = self._enqueue(what, fn, entry, on_end, detached)
        if beside:          # outside the submit lock: a queued part must be able to end meanwhile
            return self._execute(what, fn, entry, lock=False)
        if async_op:
            return work
        work.wait()
        return work.result

    def _enqueue(self, what, fn, entry, on_end, detached):
        """A Work for fn, queued for the progress thread (started on first use); under _submit_lock."""
        work = Work(what, self.timeout, on_end)
        self._put(work, what, fn, entry, detached)
        return work

    def _put(self, work, what, fn, entry, detached):
        self.inflight += 1
        self.detached += detached
        self._queue.put((work, what, fn, entry, detached))
        if self._thread is None:
            self._thread = threading.Thread(target=self._worker, name=f"pyccl-{self.tag}-r{self.rank}",
                                            daemon=True)
            self._thread.start()

    def _number(self, op, sig):
        """The next call's sequence number: (its name for messages, its flight-recorder entry)."""
        self.seq += 1
        return self.what(op, self.seq), self.recorder.record(self.seq, op, sig or {})

    def post(self, op: str, fn, sig=None):
        """Queue a detached host part that nobody waits for (the proxy's lanes: the caller holds
        the device's end event instead): run(op, fn, True, detached=True) without making a Work.
        A failure breaks the queue as any call's does, so the next call raises."""
        self.usable(op)
        with self._submit_lock:
            what, entry = self._number(op, sig)
            self._put(None, what, fn, entry, True)

    def run_now(self, call, engine) -> bool:
        """A synchronous call on an engine's short path (`engine.short`, ccl/engines/base.py),
        with none of run()'s generality but the same order, recorder entry and error handling:
        False when anything is queued (unless called from the progress thread, as in run()) or the
        queue is unusable (then submit takes run())."""
        op = call.op
        with self._submit_lock:
            if (self.inflight and threading.current_thread() is not self._thread) or self.closed or \
                    self.broken is not None:
                return False
            # nothing is queued or running on the progress thread (or this is that thread), and
            # every other call runs under _submit_lock too: holding it serialises this one
            self.seq = seq = self.seq + 1
            sig = (call.dtype, call.count, call.root, call.redop._name_)
            started = _time()
            try:
                engine.short(call, seq)
            except Exception as e:  # noqa: BLE001 - re-raised after the bookkeeping
                raise self._fail(e, self.recorder.ran(seq, op, sig, started)) from None
            self.recorder.ran(seq, op, sig, started)      # recorded as it ends (FlightRecorder.ran)
        return True

    def run_here(self, op: str, fn, sig=None, call=None, counted=True):
        """run(op, fn, False) on the caller's thread, after every call queued before it (waiting
        at most the timeout): for calls whose caller's thread matters (the torch backend's CUDA
        collectives run on the caller's current stream)."""
        if threading.current_thread() is self._thread:      # in a call's turn already
            return self.run(op, fn, False, sig, call, counted=counted)
        with self._submit_lock:
            if self.inflight > self.detached and \
                    not self._idle.wait_for(lambda: self.inflight == self.detached, self.timeout):
                raise Timeout(f"{self.what(op, self.seq + 1)}: the calls queued before it did not "
                              f"finish within the timeout of {self.timeout:.0f}s")
        # nothing queued but detached host parts: the body runs beside them holding neither lock.
        # Its own calls order themselves (one that finds parts queued queues behind them), and a
        # part it queues must be able to run while the body goes on: the body may wait for the
        # device (a torch kernel's first load does), and the device for that part.
        return self.run(op, fn, False, sig, call, counted=counted, beside=True)

    def wait_idle(self, timeout) -> bool:
        """Wait until nothing is queued (at most `timeout` s): whether that happened."""
        with self._submit_lock:
            return self._idle.wait_for(lambda: self.inflight == 0, timeout)

    def on_progress_thread(self) -> bool:
        """Whether the caller is this queue's progress thread (where future callbacks of
        queued calls run)."""
        return self._thread is not None and threading.current_thread() is self._thread

    def _checked(self, fn, call):
        def checked(what):
            self.check(call, what)
            return fn(what)
        return checked

    def _execute(self, what, fn, entry, lock=True):
        """fn(what) under the execution lock (lock=False: beside detached host parts, see run);
        entry None: an uncounted wrapper (see run)."""
        rec = self.recorder if entry is not None else None
        with self._lock if lock else _NO_LOCK:
            if self.broken is not None:
                raise PeerFailure(f"{what}: communicator broken by an earlier error ({self.broken})")
            if rec:
                rec.start(entry)
            try:
                result = fn(what)
            except LocalFailure as e:       # the function failed its own call only
                if rec:
                    rec.finish(entry, e.error)
                raise e.error from None
            except Exception as e:
                if e is self._failure:      # a call made inside this one failed and broke the queue
                    if rec:
                        rec.finish(entry, e)
                    raise
                raise self._fail(e, entry) from None
            if rec:
                rec.finish(entry)
            return result

    def _fail(self, e, entry):
        """Anything raised during a call left the peers mid-call (validation came before):
        no later call may pretend the byte streams are in step."""
        e = self.on_failure(e, entry)
        self.broken = f"{type(e).__name__}: {e}"
        self._failure = e
        return e

    def _worker(self):
        while True:
            item = self._queue.get()
            if item is None:
                return
            work, what, fn, entry, detached = item
            try:
                result = self._execute(what, fn, entry)
                if work is not None:
                    work.result = result
                    work._finish()
            except BaseException as e:  # handed to the caller through Work.wait() (post: the next call)
                if work is not None:
                    work._finish(e)
            finally:
                with self._submit_lock:
                    self.inflight -= 1
                    self.detached -= detached
                    if self.inflight == self.detached:
                        self._idle.notify_all()

    def close(self):
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join(timeout=self.timeout)
            self._thread = None
        self.closed = True
