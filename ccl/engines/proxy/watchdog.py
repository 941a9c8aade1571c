"""The proxy's watchdog: the device's waits end even when no Python thread can run.

The stream waits on words that the proxy, a Python thread, sets (ccl/engines/proxy/host.py).
Every timeout of the Python side needs the GIL, so a host call that waits for the device while
holding it (a process's first torch.cuda.Stream(), bench/gpu_block_probe.py) stops the stream,
the proxy and that call for good. Two threads per proxy guard against it:

* the pulse, a Python thread, adds 1 to the BEAT word every PERIOD seconds: proof that Python
  code runs in this process;
* the watchdog, a C thread of the C core (native/watchdog.c) that needs no GIL: while the device
  has posted a call the host has not finished (POSTED > HANDLED) and neither BEAT nor HANDLED
  moves for `timeout` seconds, it sets the abort word, releases every stream wait (the SITE
  words) and writes when it fired (FIRED). The blocked call then returns, and the proxy's next
  look at the words raises: the communicator is broken, as after any failure (results of the
  calls in flight are undefined, as in NCCL).

Its timeout is the communicator's plus min(timeout, 5 s), so the Python side's own errors
(which name the peer and step) come first whenever Python runs. Without the C core (GPU
machines with no cffi) there is no watchdog, only the Python timeouts. `check` and `fire` are
the numpy twins of the C decision (tests/test_proxy_watchdog.py compares them).
"""
import atexit
import logging
import threading
import weakref

from .host import ABORT, BEAT, FIRED, GROUPS, HANDLED, POSTED, SITE, SITES

log = logging.getLogger("pyccl")

PERIOD = 0.1                            # seconds between pulses and between the watchdog's looks
#: the watched words: posted, handled, beat, abort, fired, (first, count) of the release words
LAYOUT = (POSTED, HANDLED, BEAT, ABORT, FIRED, SITE, SITES * GROUPS)


def limit(timeout: float) -> float:
    """The watchdog's timeout for a communicator's `timeout`."""
    return timeout + min(timeout, 5.0)


def check(words, state: list, now_ns: int, timeout_ns: int) -> bool:
    """numpy twin of pyccl_watchdog_check: `state` [seen_handled, seen_beat, progress_ns]."""
    posted, handled, beat = int(words[POSTED]), int(words[HANDLED]), int(words[BEAT])
    if posted <= handled or handled != state[0] or beat != state[1]:
        state[:] = [handled, beat, now_ns]
        return False
    return now_ns - state[2] > timeout_ns


def fire(words, now_ns: int):
    """numpy twin of pyccl_watchdog_fire."""
    words[ABORT] = 1
    words[SITE:SITE + SITES * GROUPS] = 1
    words[FIRED] = now_ns


_LIVE = weakref.WeakSet()


@atexit.register
def _stop_all():
    """At exit, before CUDA frees the pinned words (its teardown comes later: cupy's and torch's
    exit handlers were registered before this one, and run after it), stop every watchdog a
    communicator left running, so that its thread never reads freed memory."""
    for dog in list(_LIVE):
        dog.stop()


class Watchdog:
    """The pulse and (with the C core) the watchdog over `words` (uint64 numpy view of the
    proxy's pinned words at address `ptr`); stop() before the words are freed."""

    def __init__(self, words, ptr: int, timeout: float, name: str):
        self.words, self._stop = words, threading.Event()
        self._dog = None
        try:
            from pyccl._native import ffi, lib
            lay = ffi.new("pyccl_watch_layout *", dict(zip(
                ("posted", "handled", "beat", "abort_word", "fired", "release_lo", "release_n"), LAYOUT)))
            self._dog = lib.pyccl_watchdog_start(ffi.cast("uint64_t *", ptr), lay, limit(timeout), PERIOD)
            self._lib = lib
        except (ImportError, AttributeError) as e:       # no C core, or one built before the watchdog
            log.info("pyccl proxy: no watchdog (%s); a host call holding the GIL while it waits for the GPU "
                     "stops a proxied call in flight for good", e)
        self._pulse = None
        if self._dog is not None:
            _LIVE.add(self)
            self._pulse = threading.Thread(target=self._beat, name=f"pyccl-pulse-{name}", daemon=True)
            self._pulse.start()

    @property
    def armed(self) -> bool:
        return self._dog is not None

    def _beat(self):
        w = self.words
        while not self._stop.wait(PERIOD):
            w[BEAT] += 1

    def stop(self) -> bool:
        """Stop both threads; True if the watchdog had fired."""
        self._stop.set()
        _LIVE.discard(self)
        if self._pulse is not None:
            self._pulse.join()
        fired = False
        if self._dog is not None:
            fired = bool(self._lib.pyccl_watchdog_stop(self._dog))
            self._dog = None
        return fired
