"""The proxy's watchdog (ccl/engines/proxy/watchdog.py, native/watchdog.c), without a GPU: the
words are plain memory here, as the device's pinned words are to the host. The C thread must
release the stream waits while this process's GIL is held (ctypes.PyDLL keeps it through a
libc sleep, as a host call that waits for the device does), and only then."""
import ctypes
import random
import time

import numpy as np
import pytest

from pyccl.engines.proxy import host as H
from pyccl.engines.proxy import watchdog as W

pytestmark = pytest.mark.timeout(60)
native = pytest.importorskip("pyccl._native")
if not hasattr(native.lib, "pyccl_watchdog_start"):
    pytest.skip("the C core was built before native/watchdog.c", allow_module_level=True)
ffi, lib = native.ffi, native.lib
_libc = ctypes.PyDLL("libc.so.6")          # PyDLL: the GIL stays held through the call


def _hold_gil(seconds):
    _libc.usleep(int(seconds * 1e6))


def _layout():
    return ffi.new("pyccl_watch_layout *", dict(zip(
        ("posted", "handled", "beat", "abort_word", "fired", "release_lo", "release_n"), W.LAYOUT)))


def test_check_and_fire_match_their_twins():
    """The C decision and its numpy twin, step by step over random word histories."""
    rng = random.Random(7)
    lay = _layout()
    fires = 0
    for trial in range(200):
        words = np.zeros(H.WORDS, np.uint64)
        cstate = ffi.new("pyccl_watch_state *", {"seen_handled": 0, "seen_beat": 0, "progress_ns": 0})
        pstate = [0, 0, 0]
        now, timeout = 0, rng.choice([50, 2000, 20000])
        fired_at = None
        for step in range(60):
            now += rng.choice([1, 5, 20, 200, 2000])
            r = rng.random()
            if r < 0.2:
                words[H.POSTED] += 1
            elif r < 0.35 and words[H.HANDLED] < words[H.POSTED]:
                words[H.HANDLED] += 1
            elif r < 0.5:
                words[H.BEAT] += 1
            c = lib.pyccl_watchdog_check(ffi.cast("uint64_t *", words.ctypes.data), lay, cstate, now, timeout)
            p = W.check(words, pstate, now, timeout)
            assert bool(c) == p, (trial, step)
            assert [cstate.seen_handled, cstate.seen_beat, cstate.progress_ns] == pstate, (trial, step)
            if p and fired_at is None:
                fired_at = step
        fires += fired_at is not None
    assert 20 < fires < 180, fires              # the histories cover both answers
    a, b = np.zeros(H.WORDS, np.uint64), np.zeros(H.WORDS, np.uint64)
    lib.pyccl_watchdog_fire(ffi.cast("uint64_t *", a.ctypes.data), lay, 12345)
    W.fire(b, 12345)
    assert np.array_equal(a, b)
    assert a[H.ABORT] == 1 and a[H.FIRED] == 12345 and (a[H.SITE:H.SITE + H.SITES * H.GROUPS] == 1).all()
    assert a[:H.SITE].sum() == 1 + 12345        # nothing else written


def test_fires_while_the_gil_is_held():
    """A call outstanding (posted > handled) and the GIL held for 3 s: the watchdog (timeout
    0.3 s -> 0.6 s, one look per 0.1 s) releases every stream wait well before the GIL comes
    back; the proxy's next look raises PeerFailure naming the watchdog."""
    words = np.zeros(H.WORDS, np.uint64)
    dog = W.Watchdog(words, words.ctypes.data, 0.3, "test")
    assert dog.armed
    try:
        time.sleep(0.3)                       # the pulse beats; nothing outstanding
        words[H.POSTED] = 1
        t0 = lib.pyccl_monotonic_ns()
        _hold_gil(3.0)
        fired = int(words[H.FIRED])
        assert fired, "the watchdog did not fire while the GIL was held"
        assert 0.4 < (fired - t0) / 1e9 < 2.9, (fired - t0) / 1e9
        assert words[H.ABORT] == 1 and (words[H.SITE:H.SITE + H.SITES * H.GROUPS] == 1).all()
        proxy = H.ProxyHost(words, None, 5.0, 0, "test", 2)
        with pytest.raises(Exception) as e:
            proxy.check_fired("all_reduce #7")
        assert type(e.value).__name__ == "PeerFailure" and "watchdog" in str(e.value) and "all_reduce #7" in str(e.value)
    finally:
        assert dog.stop() is True


def test_quiet_while_python_runs_or_nothing_is_outstanding():
    """No false alarm: a call outstanding for 3 s while Python runs (the pulse beats), and the
    GIL held for 1.5 s with nothing outstanding (timeout 1 s -> 2 s)."""
    words = np.zeros(H.WORDS, np.uint64)
    dog = W.Watchdog(words, words.ctypes.data, 1.0, "test")
    try:
        words[H.POSTED] = 3
        words[H.HANDLED] = 2
        time.sleep(3.0)                       # releases the GIL: the pulse runs
        assert words[H.FIRED] == 0 and words[H.ABORT] == 0
        assert words[H.BEAT] >= 5
        words[H.HANDLED] = 3                  # nothing outstanding
        _hold_gil(1.5)
        assert words[H.FIRED] == 0 and words[H.ABORT] == 0
    finally:
        assert dog.stop() is False


def test_limit():
    assert W.limit(300.0) == 305.0 and W.limit(2.0) == 4.0


def test_exit_stops_what_close_did_not():
    """A communicator left open at exit: the atexit hook stops its watchdog before CUDA would free
    the words (a process that exits with one running ends with status 0)."""
    words = np.zeros(H.WORDS, np.uint64)
    dog = W.Watchdog(words, words.ctypes.data, 1.0, "test")
    assert dog.armed and dog in W._LIVE
    W._stop_all()
    assert not dog.armed and not dog._pulse.is_alive() and dog not in W._LIVE
    import subprocess
    import sys
    code = ("import numpy as np; from pyccl.engines.proxy import host as H, watchdog as W; "
            "w = np.zeros(H.WORDS, np.uint64); d = W.Watchdog(w, w.ctypes.data, 1.0, 'x'); w[H.POSTED] = 1; "
            "print('armed', d.armed)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and "armed True" in out.stdout, (out.returncode, out.stdout, out.stderr[-500:])
