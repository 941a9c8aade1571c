"""Bad input fails before any byte moves; mismatches across ranks fail on every rank, fast."""
import time

import numpy as np
import pytest

import pyccl
from pyccl.errors import InvalidArgument, PeerFailure, PycclError

pytestmark = pytest.mark.timeout(120)


def _raises(fn, *args, **kw):
    try:
        fn(*args, **kw)
    except InvalidArgument as e:
        return str(e)
    return None


def rank_bad_inputs(comm):
    """Each bad call raises InvalidArgument on this rank; afterwards the communicator still works."""
    x = np.zeros(10, np.float32)
    msgs = {
        "non-contiguous": _raises(comm.all_reduce, np.zeros((4, 4), np.float32)[:, 1]),
        "unsupported dtype": _raises(comm.all_reduce, np.zeros(3, np.complex64)),
        "bool sum": _raises(comm.all_reduce, np.zeros(3, bool)),
        "bad op": _raises(comm.all_reduce, x, op="xor"),
        "gather size": _raises(comm.all_gather, np.zeros(5, np.float32), x),
        "dtype mismatch": _raises(comm.all_gather, np.zeros(10 * comm.size, np.float64), x),
        "rs size": _raises(comm.reduce_scatter, x, np.zeros(7, np.float32)),
        "root": _raises(comm.broadcast, x, root=comm.size),
        "negative root": _raises(comm.reduce, x, root=-1),
        "self peer": _raises(comm.send, x, comm.rank),
        "read-only": _raises(comm.all_reduce, np.frombuffer(b"\0" * 8, np.float32)),
        "splits": _raises(comm.all_to_all, x, x, in_splits=[1] * comm.size),
        "not a buffer": _raises(comm.all_reduce, [1.0, 2.0]),
    }
    missing = [k for k, v in msgs.items() if v is None]
    y = np.ones(3)
    comm.all_reduce(y)
    return missing, float(y[0]), msgs["gather size"]


def test_bad_inputs_raise_invalid_argument(groups):
    g = groups(2)
    for missing, total, msg in g.run(rank_bad_inputs):
        assert missing == []
        assert total == 2.0
        assert "expected size 2 x input 10 = 20" in msg


def rank_mismatched_size(comm):
    x = np.ones(1000 if comm.rank == 0 else 2000, np.float32)
    t = time.monotonic()
    try:
        comm.all_reduce(x)
    except PycclError as e:
        took = time.monotonic() - t
        try:
            comm.all_reduce(np.ones(1))
            later = "no error"
        except PeerFailure as e2:
            later = str(e2)
        return type(e).__name__, str(e), took, later
    return None


TRANSPORTS = ["tcp", "auto"]   # auto on one host = the shared-memory fast path, which checks signatures


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_size_mismatch_raises_on_every_rank_fast(groups, transport):
    g = groups(2, env={"PYCCL_TIMEOUT": "30", "PYCCL_TRANSPORT": transport})
    results = g.run(rank_mismatched_size)
    g.broken = True                        # its communicators are broken by design now
    for r in results:
        assert r is not None, "a rank finished an all_reduce whose sizes differ"
        kind, msg, took, later = r
        assert took < 10, f"took {took:.1f}s"
        assert "all_reduce #" in msg and "rank" in msg
        assert "broken" in later
    assert any("call mismatch" in r[1] and "the count differs" in r[1] for r in results), [r[1] for r in results]


def rank_async_error(comm):
    """An error in async work surfaces from wait(), naming the op."""
    x = np.ones(10 if comm.rank == 0 else 20, np.float32)
    w = comm.all_reduce(x, async_op=True)
    try:
        w.wait()
    except PycclError as e:
        return str(e)
    return None


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_async_error_surfaces_from_wait(groups, transport):
    g = groups(2, env={"PYCCL_TIMEOUT": "30", "PYCCL_TRANSPORT": transport})
    msgs = g.run(rank_async_error)
    g.broken = True
    assert all(m and "all_reduce #" in m for m in msgs), msgs


def test_single_process_init_works():
    with pyccl.init() as comm:
        x = np.arange(5.0)
        comm.all_reduce(x, op=pyccl.AVG)
        assert comm.size == 1 and np.array_equal(x, np.arange(5.0))
        out = np.zeros(5)
        comm.all_gather(out, x)
        assert np.array_equal(out, x)


def rank_silent_peer(comm):
    """Rank 3 (host1) skips the call: the others time out naming ranks with their hosts."""
    x = np.ones(1 << 12, np.float32)
    if comm.rank == 3:
        time.sleep(6)
        return "skipped"
    try:
        comm.all_reduce(x)
    except PycclError as e:
        return str(e)
    return "no error"


def test_errors_across_hosts_name_ranks_with_their_hosts():
    """On 2 (emulated) hosts x 2 ranks, a wait that times out in the flat engine names this rank
    and the peers it waited on with their hosts (issue 28 item 9)."""
    from ranks import RankGroup
    g = RankGroup(4, ranks_per_host=2, env={"PYCCL_TIMEOUT": "3", "PYCCL_ENGINE": "flat"})
    try:
        got = g.run(rank_silent_peer)
    finally:
        g.close()
    assert got[3] == "skipped"
    for r in range(3):
        msg = got[r]
        assert f"rank {r} (host host{r // 2})" in msg, msg
    assert any("(host host1)" in got[r] and "from rank" in got[r] for r in range(3)), got
