"""How a call finds its engine (ccl/engines/choice.py): the lowest price among the engines that
can run it, with links between hosts priced as the transport that carries them, forced by
PYCCL_ENGINE, and the same answer on every rank and in `python -m pyccl.plan`."""
import logging

import numpy as np
import pytest

from pyccl.call import Call
from pyccl.dtypes import SUM
from pyccl.engines.choice import pricing
from pyccl.errors import InvalidArgument
from pyccl.topology.cost import transport_costs
from pyccl.topology.graph import Topology
from pyccl.transports.base import SetupContext
from pyccl.transports.select import Connections

from ranks import RankGroup

pytestmark = pytest.mark.timeout(180)


def _all_reduce(nbytes):
    return Call("all_reduce", kind="cpu", dtype="float32", count=nbytes // 4, redop=SUM, nbytes=nbytes)


def test_links_between_hosts_priced_as_their_transport():
    """The same call on 2 hosts x 2 ranks: over TCP the composed hierarchy is cheapest, over
    ibverbs (cheaper messages, more bandwidth) the flat plan; every price moves with the link."""
    costs = transport_costs(env={})
    call = _all_reduce(64 << 10)
    picked, prices = {}, {}
    for inter in ("tcp", "ibverbs"):
        engines = pricing(Topology.uniform(2, 2, "shm", inter), costs)
        picked[inter] = engines.decide(call).name
        prices[inter] = {e.name: t for e, t in engines.prices(call)}
    assert picked == {"tcp": "composed", "ibverbs": "flat"}, (picked, prices)
    for name in ("composed", "flat"):
        assert prices["ibverbs"][name] < prices["tcp"][name], prices
    assert prices["tcp"]["shm"] is None and prices["ibverbs"]["shm"] is None      # not one host


def test_transport_between_follows_the_bootstrap_records():
    """Which transport the cost model prices between two hosts comes from the ranks' records
    alone (so every rank agrees): ibverbs when both have an ACTIVE RDMA port of one link layer."""
    port = {"state": "4: ACTIVE", "link_layer": "Ethernet"}
    info = {0: {"host": "a"}, 1: {"host": "b", "rdma": [{"ports": [port]}]},
            2: {"host": "c", "rdma": [{"ports": [port]}]}, 3: {"host": "c"}}
    ctx = SetupContext(0, 1, [0], None, b"s" * 32, "t", 1.0, "127.0.0.1", info)
    conns = Connections(ctx, "auto")
    try:
        assert conns.transport_between(1, 2) == "ibverbs"
        assert conns.transport_between(0, 1) == "tcp"        # rank 0 has no RDMA port
        assert conns.transport_between(2, 3) == "shm"        # one host
    finally:
        conns.close()
    forced = Connections(ctx, "tcp")
    try:
        assert forced.transport_between(1, 2) == "tcp"
    finally:
        forced.close()


def rank_engines(comm):
    from pyccl.engines.base import Engine
    return [(e.name, isinstance(e, Engine)) for e in comm.engines.engines]


def test_every_engine_fills_the_one_interface(groups):
    """The registry of a one-host communicator, in tie-break order, every engine an Engine."""
    got = groups(2).run(rank_engines)
    assert got[0] == got[1]
    assert [n for n, _ in got[0]] == ["reproducible", "reproducible_cuda", "cuda", "proxy", "staged", "shm", "composed",
                                     "flat"], got[0]
    assert all(ok for _, ok in got[0]), got[0]


def rank_choice(comm, nbytes):
    call = comm.validate.all_reduce(np.zeros(nbytes // 4, np.float32), SUM, False)
    return {"inter": comm.topology.inter, "engine": comm.engines.choose(call).name,
            "prices": {e.name: t for e, t in comm.engines.prices(call)}}


def test_live_communicator_agrees_with_the_plan_cli():
    """A communicator on 2 (emulated) hosts prices its links as the transport its connections
    use, and picks what the pricing of `python -m pyccl.plan` picks, on every rank alike."""
    g = RankGroup(4, ranks_per_host=2)
    try:
        for nbytes in (8, 64 << 10, 4 << 20):
            got = g.run(rank_choice, nbytes)
            assert all(r == got[0] for r in got), got
            assert got[0]["inter"] == "tcp", got[0]
            cli = pricing(Topology.uniform(2, 2, "shm", "tcp"), transport_costs(env={}))
            assert got[0]["engine"] == cli.decide(_all_reduce(nbytes)).name, (nbytes, got[0])
    finally:
        g.close()


def rank_forced(comm):
    x = np.arange(10, dtype=np.float32)
    comm.all_reduce(x)
    call = comm.validate.all_reduce(x, SUM, False)
    return comm.engines.choose(call).name, x.tolist()


@pytest.mark.parametrize("engine", ["flat", "shm"])
def test_pyccl_engine_forces_where_it_can(engine):
    g = RankGroup(2, env={"PYCCL_ENGINE": engine})
    try:
        for name, x in g.run(rank_forced):
            assert name == engine and x == [2.0 * i for i in range(10)]
    finally:
        g.close()


def test_pyccl_engine_unknown_name_is_refused():
    from pyccl.engines.choice import Engines
    with pytest.raises(InvalidArgument, match="PYCCL_ENGINE='nosuch' names no engine"):
        Engines([], forced="nosuch")


def test_choice_is_logged_with_every_price(caplog):
    engines = pricing(Topology.uniform(2, 2, "shm", "tcp"), transport_costs(env={}))
    with caplog.at_level(logging.INFO, logger="pyccl"):
        engines.decide(_all_reduce(1 << 20))
    line = next(r.getMessage() for r in caplog.records if r.getMessage().startswith("engine:"))
    assert "-> composed" in line and "flat" in line and "shm -" in line, line
