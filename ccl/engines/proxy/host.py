"""The proxy's host side: the network phase of every call the device posts, in stream order.

The device (ccl/engines/proxy/proxy.cu) rings a doorbell when a proxied collective starts on
the stream: the program id and, for an eager call, its tag (0: a CUDA-graph replay). The proxy
reads the ring in order and, for each call n, walks the program's plan with the executor over
the arena: before pass c it waits until the out-items pass c reads have landed (``FILLED``
words reach n), after pass c it marks the pass done (``DONE[c] = n`` for a spinning kernel;
the ``SITE`` word of the group pass c ends for a waiting stream; for AVG, the finalised ranges
are divided into the "avg" region first), and at the end it sets ``FINISHED = n`` and every
SITE word of the call, which frees the arena and lets the stream go on. Every wait is bounded by the communicator's timeout
and by the kernel's error word; the words are a numpy view of pinned, device-mapped memory
(or, in tests/test_proxy_program.py, of plain memory written by a thread that plays the
kernel).

Who runs it: ``drain`` is called as one queued job per eager call (ccl/queue.py: in call order
with every other call of the communicator, on its progress thread) and, for graph replays
that no host call announces, by the watcher of ccl/engines/proxy/state.py. Either way a job
first handles the calls posted before its own, so the network phases follow the stream's order.
"""
import time

import numpy as np

from ...errors import PeerFailure, PycclError, Timeout
from ...reduce import divide_into

#: word offsets, as #defined in proxy.cu (tests/test_proxy_program.py compares them)
ABORT, ERROR, ERR_CALL, ERR_WHERE, POSTED, FINISHED = 0, 1, 2, 3, 4, 5
#: host-only words (ccl/engines/proxy/watchdog.py): the last call whose network phase ended, the
#: pulse of Python life, when the watchdog fired (monotonic ns; 0: it has not)
HANDLED, BEAT, FIRED = 6, 7, 8
RING, RING_SLOTS, RING_WORDS = 16, 64, 4
FILLED = RING + RING_WORDS * RING_SLOTS
MAX_ITEMS = 32768
DONE = FILLED + MAX_ITEMS
MAX_PASSES = 8192
SITE = DONE + MAX_PASSES
SITES, GROUPS = 4096, 4
WORDS = SITE + SITES * GROUPS
ERRORS = {1: "timed out", 2: "was aborted"}


class ProxyHost:
    """`words`: uint64 view of the shared words; `executor`: the communicator's (walks a plan
    over its connections); `programs`: {id: Program}; `dtype_of(prog)`: numpy dtype of a program."""

    def __init__(self, words: np.ndarray, executor, timeout: float, rank: int, tag: str, size: int):
        self.words = words
        self.executor, self.timeout, self.rank, self.tag, self.size = executor, timeout, rank, tag, size
        self.programs = {}
        self.handled = 0                 # the last call number whose network phase ran
        self.eager_done = 0              # the tag of the last eager call among them

    # -- the jobs --
    def drain(self, tag, what):
        """Run the network phase of every posted call in order, up to and including the eager
        call `tag` (None: those posted now). Raises (and aborts the device side) on failure."""
        try:
            w = self.words
            while True:
                if tag is not None and self.eager_done >= tag:
                    return              # handled already by a job that drained before this one
                posted = int(w[POSTED])
                if self.handled < posted:
                    n = self.handled + 1
                    slot = RING + RING_WORDS * ((n - 1) % RING_SLOTS)
                    pid, t, site = int(w[slot]), int(w[slot + 1]), int(w[slot + 2])
                    prog = self.programs.get(pid)
                    if prog is None:
                        raise PycclError(f"{what}: the device posted an unknown proxy program {pid}")
                    self.check_fired(what)
                    self.network(prog, n, site,
                                 what if t == tag else f"{prog.name} (graph replay, call {n}) on {self.tag}")
                    self.check_fired(what)          # the device went on without this call's results
                    self.handled = n
                    w[HANDLED] = n
                    if t:
                        self.eager_done = t
                    continue
                if tag is None:
                    return
                self._wait(lambda: int(w[POSTED]) > self.handled, what,
                           "the stream to reach the collective (is the stream stuck behind other work?)")
        except BaseException:
            self.abort()
            raise

    def check_fired(self, what):
        if self.words[FIRED]:
            raise PeerFailure(f"{what}: rank {self.rank}'s proxy watchdog released the device's waits: no Python "
                              f"code ran in this process for longer than the timeout while a call was on the "
                              f"device (a host call holding the GIL while it waits for the GPU? "
                              f"ccl/engines/proxy/watchdog.py); the communicator is unusable")

    def abort(self):
        """Stop the device side: the abort word, then every stream wait released (a call whose
        out launch read the abort word clear just before may reset its site's words after
        this: the second release, a moment later, covers it)."""
        w = self.words
        w[ABORT] = 1
        w[SITE:SITE + SITES * GROUPS] = 1
        time.sleep(0.05)
        w[SITE:SITE + SITES * GROUPS] = 1

    def network(self, prog, n, site, what):
        """The network phase of call n of `prog` (at `site`) on the arena."""
        bufs = prog.typed(prog.dtype)
        self.executor.run(prog.plan, {k: v for k, v in bufs.items() if k != "avg"}, prog.op, what,
                          prog.chunk_bytes, stager=_FlagStager(self, prog, n, site, what, bufs.get("avg"),
                                                               bufs.get("out")))
        w = self.words
        w[FINISHED] = n
        at = SITE + site * GROUPS
        w[at:at + GROUPS] = 1           # the last group (and the arena) free

    # -- waiting on the device --
    def _wait(self, ready, what, doing):
        """Poll ready(), sleeping from the first miss with a growing nap (spinning in Python would
        hold the GIL the caller's thread needs to queue the next calls), bounded by the timeout
        and by the kernel's error word."""
        if ready():
            return
        w = self.words
        deadline, nap = time.monotonic() + self.timeout, 1e-5
        while not ready():
            self.check_fired(what)
            if w[ERROR]:
                code = int(w[ERROR])
                raise PycclError(f"{what}: rank {self.rank}'s proxy kernel {ERRORS.get(code, code)} "
                                 f"(call {int(w[ERR_CALL])}, step {int(w[ERR_WHERE])}) while the host waited for {doing}")
            if time.monotonic() > deadline:
                raise Timeout(f"{what}: rank {self.rank} waited {self.timeout:g}s for {doing}")
            time.sleep(nap)
            nap = min(nap * 1.5, 2e-4)


class _FlagStager:
    """The executor's stager (Executor.run) for one proxied call: waits on FILLED words, sets
    DONE words (see the module doc)."""

    def __init__(self, host, prog, n, site, what, avg, out):
        self.host, self.prog, self.n, self.what = host, prog, n, what
        self.site = SITE + site * GROUPS
        self.avg, self.out = avg, out
        self.landed = 0

    def start(self, plan, counts, total, alias, chunk_elems):
        if total != self.prog.total:
            raise PycclError(f"{self.what}: the executor cut the plan into {total} passes, the proxy "
                             f"program into {self.prog.total}")

    def before(self, c):
        need = self.prog.need[c]
        if self.landed >= need:
            return
        w, n, first = self.host.words, self.n, FILLED + self.landed
        last = FILLED + need
        self.host._wait(lambda: bool((w[first:last] >= n).all()), self.what,
                        f"the device-to-host copies before pass {c}")
        self.landed = need

    def after(self, c):
        if self.avg is not None:
            for a, b in self.prog.avg_ranges[c]:
                part = self.avg[a:b]
                part[...] = self.out[a:b]
                divide_into(part, self.host.size)
        w = self.host.words
        w[DONE + c] = self.n
        g = self.prog.group_end.get(c)
        if g is not None:
            w[self.site + g] = 1
