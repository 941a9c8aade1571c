"""One-sided windows over ibverbs (ccl/windows/rdma.py) on real verbs: run inside the soft-RoCE VM
(tests/rdma/rxe-vm.sh python -m pytest -q tests/rdma/test_windows_rdma.py). With
PYCCL_TRANSPORT=ibverbs every pair's window goes through RDMA WRITE / WRITE_WITH_IMM, gets
through RDMA READ; the rank-side checks are tests/test_window.py's, and rank_gets_read here. Outside the VM
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


# software RoCE under emulation: a window's set-up takes seconds, importing bfloat16 a minute
SLOW = {"timeout": 600}


def test_windows_over_rdma_2_ranks(groups):
    g = groups(2, **IB, **SLOW)
    for bad in g.run(rank_gets_read):
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
    for bad in g.run(rank_many_puts_one_signal, 100):
        assert bad == []
    for bad in g.run(rank_large, 300_001):
        assert bad == []
