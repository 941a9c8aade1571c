"""One-sided windows over ibverbs (ccl/windows/rdma.py) on real verbs: run inside the soft-RoCE VM
(tests/rdma/rxe-vm.sh python -m pytest -q tests/rdma/test_windows_rdma.py). With
PYCCL_TRANSPORT=ibverbs every pair's window goes through RDMA WRITE / WRITE_WITH_IMM, gets
through RDMA READ; the rank-side checks are tests/test_window.py's, and the two here (READs;
puts through the pair's staging ring and a larger one from the caller's buffer). Outside the VM
(no RDMA device) the tests skip with the transport's reason."""
import os
import sys

import numpy as np
import pytest

from pyccl.transports import ibverbs as ib

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))          # tests/: test_window.py, conftest's groups
from test_window import (rank_bad_input, rank_every_dtype, rank_large,  # noqa: E402
                         rank_many_puts_one_signal, rank_two_windows_split_and_resources)

OK, WHY = ib.available()
pytestmark = [pytest.mark.timeout(600), pytest.mark.skipif(not OK, reason=f"no usable RDMA device here: {WHY}")]

IB = {"transport": "ibverbs"}


def rank_gets_read(comm):
    """Gets by RDMA READ: whole windows, the last element, 0 bytes, while the peer does nothing."""
    me, size = comm.rank, comm.size
    buf = np.arange(1000 + me, dtype=np.float64) * (me + 1)
    bad = []
    with comm.window(buf) as win:
        comm.barrier()
        for p in range(size):
            if p == me:
                continue
            want = np.arange(1000 + p, dtype=np.float64) * (p + 1)
            got = np.zeros(want.size)
            win.get(got, p)
            last = np.zeros(1)
            win.get(last, p, offset=want.size - 1)
            win.get(np.zeros(0), p, offset=want.size)
            link = win.links[p]
            if link.kind != "rdma" or link.reads < 2:
                bad.append(f"rank {p}: link {link.kind}, {getattr(link, 'reads', None)} READs")
            if not np.array_equal(got, want) or last[0] != want[-1]:
                bad.append(f"rank {p}: get gave {got[:4]}... {last}")
        comm.barrier()
    return bad


def rank_staged_and_direct_puts(comm):
    """Puts through the pair's ring (many in flight, the ring wrapping around) and one larger
    than STAGE_MAX, then a signal; flush, then read back. With PYCCL_IB_QPS > 1 (default 4) all
    of them are split over the QPs (from PYCCL_IB_STRIPE_MIN, 256 KiB)."""
    from pyccl.windows.rdma import STAGE_MAX
    me, size = comm.rank, comm.size
    piece = (1 << 20) // 8 + 3                               # float64 elements, not a round size
    pieces = 12
    big = STAGE_MAX // 8 + 5
    buf = np.zeros(size * (pieces * piece + big))
    per = pieces * piece + big
    bad = []
    with comm.window(buf, signals=2) as win:
        for p in range(size):
            if p == me:
                continue
            for k in range(pieces):
                x = np.arange(piece, dtype=np.float64) + 1000 * me + k
                win.put(x, p, offset=me * per + k * piece)
                x[:] = -1                                    # src may be reused once put returns
            win.put(np.full(big, me + 0.5), p, offset=me * per + pieces * piece, signal=1)
            win.flush(p)
            back = np.zeros(piece)
            win.get(back, p, offset=me * per + (pieces - 1) * piece)
            if not np.array_equal(back, np.arange(piece, dtype=np.float64) + 1000 * me + pieces - 1):
                bad.append(f"read back from rank {p}: {back[:3]}")
        win.wait_signal(1, size - 1)
        from pyccl import settings
        striped = {p: win.links[p].striped for p in range(size) if p != me}
        if settings.get("PYCCL_IB_QPS") > 1 and not all(n >= pieces + 1 for n in striped.values()):
            bad.append(f"puts from 256 KiB not split over the QPs: {striped}")
        for q in range(size):
            if q == me:
                continue
            got = buf[q * per:(q + 1) * per]
            want = np.concatenate([np.arange(piece, dtype=np.float64) + 1000 * q + k for k in range(pieces)] +
                                  [np.full(big, q + 0.5)])
            if not np.array_equal(got, want):
                bad.append(f"block of rank {q}: first difference at {np.argmax(got != want)}")
        comm.barrier()
    return bad


# software RoCE under emulation: a window's set-up takes seconds, importing bfloat16 a minute
SLOW = {"timeout": 600}


def test_windows_over_rdma_2_ranks(groups):
    g = groups(2, **IB, **SLOW)
    for bad in g.run(rank_gets_read):
        assert bad == []
    for bad in g.run(rank_staged_and_direct_puts):
        assert bad == []
    for bad in g.run(rank_every_dtype, "rdma"):
        assert bad == []
    for bad in g.run(rank_many_puts_one_signal, 300):
        assert bad == []
    for bad in g.run(rank_large, 600_001):
        assert bad == []
    for bad in g.run(rank_two_windows_split_and_resources):
        assert bad == []
    for untouched, last, msgs in g.run(rank_bad_input):
        assert untouched and last == 1.0, msgs


def test_windows_over_rdma_3_ranks(groups):
    g = groups(3, **IB, **SLOW)
    for bad in g.run(rank_staged_and_direct_puts):
        assert bad == []
    for bad in g.run(rank_many_puts_one_signal, 100):
        assert bad == []
    for bad in g.run(rank_large, 300_001):
        assert bad == []
