"""One-sided windows between 2 "hosts" (network namespaces), 2 ranks each: cross-memory attach
inside a host, the TCP emulation over the veths between them (ccl/windows/); the rank-side
checks of tests/test_window.py."""
import os
import sys
import textwrap

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from multihost.netns import Hosts, available  # noqa: E402

ok, why = available()
pytestmark = [pytest.mark.timeout(300), pytest.mark.skipif(not ok, reason=why)]

TESTS = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))

SCRIPT = textwrap.dedent(f"""
    import sys
    import numpy as np
    sys.path.insert(0, {TESTS!r})
    import pyccl
    from test_window import rank_every_dtype, rank_large, rank_many_puts_one_signal
    comm = pyccl.init()
    with comm.window(np.zeros(1)) as win:
        links = [win.transport(p) for p in range(comm.size)]
    bad = rank_every_dtype(comm, None) + rank_many_puts_one_signal(comm, 50) + rank_large(comm, 300_001)
    print("LINKS", links, flush=True)
    print("BAD", bad[:5], flush=True)
    comm.close()
    sys.exit(1 if bad else 0)
""")


def test_windows_across_namespaces():
    with Hosts(2, net=79) as hosts:
        results = hosts.run(SCRIPT, ranks_per_host=2, env={"PYCCL_TIMEOUT": "60"})
    for rank, rc, out, err in results:
        assert rc == 0, f"rank {rank} rc={rc}\n{out}\n{err[-3000:]}"
        links = eval(out.split("LINKS ")[1].splitlines()[0])
        assert links == ["local" if p == rank else "cma" if p // 2 == rank // 2 else "tcp" for p in range(4)], links
