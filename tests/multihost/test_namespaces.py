"""2 and 3 "hosts" as network namespaces, 2 ranks each: shared memory inside a host, TCP
between hosts; every collective correct (reusing the rank-side checks of test_collectives)."""
import os
import sys
import textwrap

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from multihost.netns import Hosts, available  # noqa: E402

ok, why = available()
pytestmark = [pytest.mark.timeout(400), pytest.mark.skipif(not ok, reason=why)]

TESTS = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))

SCRIPT = textwrap.dedent(f"""
    import sys
    sys.path.insert(0, {TESTS!r})
    import pyccl
    from test_collectives import (rank_all_reduce, rank_reduce, rank_reduce_scatter, rank_data_movement,
                                  rank_all_to_all_uneven, rank_send_recv_barrier)
    comm = pyccl.init()
    kinds = {{c.peer: type(c).__name__ for c in comm.conns.values()}}
    bad = []
    for fn in (rank_all_reduce, rank_reduce, rank_reduce_scatter, rank_data_movement):
        bad += fn(comm, [0, 1, 7, 1031])
    for n in (0, 5, 17):
        bad += rank_all_to_all_uneven(comm, n) + rank_send_recv_barrier(comm, n)
    print("CONNS", sorted(kinds.items()), flush=True)
    print("BAD", bad[:5], flush=True)
    comm.close()
    sys.exit(1 if bad else 0)
""")


@pytest.mark.parametrize("nhosts", [2, 3])
@pytest.mark.parametrize("algo", ["ring", "tree", "hierarchical", "halving_doubling"])
def test_every_collective_across_namespaces(nhosts, algo):
    with Hosts(nhosts, net=70 + nhosts) as hosts:
        results = hosts.run(SCRIPT, ranks_per_host=2, env={"PYCCL_TIMEOUT": "60", "PYCCL_ALGO": algo})
    for rank, rc, out, err in results:
        assert rc == 0, f"rank {rank} rc={rc}\n{out}\n{err[-3000:]}"
        conns = dict(eval(out.split("CONNS ")[1].splitlines()[0]))
        host = rank // 2
        for peer, kind in conns.items():
            same = peer // 2 == host
            assert ("TCP" in kind) != same, f"rank {rank} -> {peer} uses {kind}"
