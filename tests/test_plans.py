"""Plans proven correct by the in-process simulator, at small and very large rank counts."""
import random

import numpy as np
import pytest

from pyccl.topology import direct, ring
from pyccl.topology.plan import Region, RankPlan, recv, send
from pyccl.topology.simulate import PlanError, simulate

SMALL = [1, 2, 3, 4, 5, 7, 8]
COUNTS = [0, 1, 13, 1031]


def _rng(*key):
    return np.random.default_rng(abs(hash(key)) % 2**32)


def _ring(n, shuffled):
    order = list(range(n))
    if shuffled:
        random.Random(n).shuffle(order)
    return order


@pytest.mark.parametrize("n", SMALL)
@pytest.mark.parametrize("count", COUNTS)
@pytest.mark.parametrize("shuffled", [False, True])
def test_ring_all_reduce(n, count, shuffled):
    order = _ring(n, shuffled)
    data = [_rng(n, count, r).integers(-50, 50, count).astype(np.int64) for r in range(n)]
    bufs = [{"in": d.copy(), "out": None} for d in data]
    for b in bufs:
        b["out"] = b["in"]
    simulate([ring.all_reduce(r, order, count) for r in range(n)], bufs)
    want = np.sum(data, axis=0)
    for b in bufs:
        np.testing.assert_array_equal(b["out"], want)


@pytest.mark.parametrize("n", SMALL)
@pytest.mark.parametrize("count", COUNTS)
def test_ring_reduce_scatter_and_all_gather(n, count):
    order = _ring(n, True)
    data = [_rng(n, count, r).integers(-9, 9, count * n).astype(np.int64) for r in range(n)]
    bufs = [{"in": d.copy(), "out": np.zeros(count, np.int64)} for d in data]
    simulate([ring.reduce_scatter(r, order, count) for r in range(n)], bufs, "sum")
    total = np.sum(data, axis=0)
    for r, b in enumerate(bufs):
        np.testing.assert_array_equal(b["out"], total[r * count:(r + 1) * count])
        np.testing.assert_array_equal(b["in"], data[r])     # input untouched
    bufs = [{"in": data[r][:count].copy(), "out": np.zeros(count * n, np.int64)} for r in range(n)]
    simulate([ring.all_gather(r, order, count) for r in range(n)], bufs)
    want = np.concatenate([d[:count] for d in data])
    for b in bufs:
        np.testing.assert_array_equal(b["out"], want)


@pytest.mark.parametrize("n", SMALL)
@pytest.mark.parametrize("count", [0, 1, 1031])
def test_ring_broadcast_and_reduce_every_root(n, count):
    order = _ring(n, True)
    for root in range(n):
        data = [_rng(n, count, r, root).integers(-9, 9, count).astype(np.int64) for r in range(n)]
        bufs = [{"out": d.copy()} for d in data]
        simulate([ring.broadcast(r, order, count, root) for r in range(n)], bufs)
        for b in bufs:
            np.testing.assert_array_equal(b["out"], data[root])
        bufs = [{"in": d.copy()} for d in data]
        for b in bufs:
            b["out"] = b["in"]
        simulate([ring.reduce(r, order, count, root) for r in range(n)], bufs, "max")
        np.testing.assert_array_equal(bufs[root]["out"], np.max(data, axis=0))
        for r in range(n):
            if r != root:
                np.testing.assert_array_equal(bufs[r]["in"], data[r])


@pytest.mark.parametrize("n", SMALL)
def test_direct_all_to_all_uneven(n):
    rng = _rng(n, "a2a")
    splits = rng.integers(0, 5, (n, n))        # splits[i][j]: i sends to j
    data = [rng.integers(0, 1000, splits[i].sum()) for i in range(n)]
    bufs = [{"in": data[i].copy(), "out": np.full(splits[:, i].sum(), -1)} for i in range(n)]
    plans = [direct.all_to_all(i, n, tuple(splits[i]), tuple(splits[:, i])) for i in range(n)]
    simulate(plans, bufs)
    for j in range(n):
        pieces = []
        for i in range(n):
            start = splits[i][:j].sum()
            pieces.append(data[i][start:start + splits[i][j]])
        np.testing.assert_array_equal(bufs[j]["out"], np.concatenate(pieces))


@pytest.mark.parametrize("n", SMALL)
def test_direct_gather_scatter_barrier(n):
    count = 3
    for root in range(n):
        data = [np.arange(count) + 10 * r for r in range(n)]
        bufs = [{"in": d.copy(), "out": np.zeros(count * n, int) if r == root else None} for r, d in enumerate(data)]
        simulate([direct.gather(r, n, count, root) for r in range(n)], bufs)
        np.testing.assert_array_equal(bufs[root]["out"], np.concatenate(data))
        src = np.arange(count * n)
        bufs = [{"in": src.copy() if r == root else None, "out": np.zeros(count, int)} for r in range(n)]
        simulate([direct.scatter(r, n, count, root) for r in range(n)], bufs)
        for r in range(n):
            np.testing.assert_array_equal(bufs[r]["out"], src[r * count:(r + 1) * count])
    simulate([direct.barrier(r, n) for r in range(n)], [{"in": np.zeros(0)} for _ in range(n)])


@pytest.mark.timeout(600)
@pytest.mark.parametrize("builder", ["all_reduce", "all_gather", "reduce_scatter", "broadcast", "reduce"])
def test_plans_at_1024_ranks(builder):
    n, count = 1024, 1031            # a prime count: blocks of 1 and 2 elements, some empty
    order = _ring(n, True)
    rng = _rng(builder)
    if builder == "all_reduce":
        data = [rng.integers(-3, 4, count) for _ in range(n)]
        bufs = [{"in": d.copy()} for d in data]
        for b in bufs:
            b["out"] = b["in"]
        simulate([ring.all_reduce(r, order, count) for r in range(n)], bufs)
        want = np.sum(data, axis=0)
        assert all(np.array_equal(b["out"], want) for b in bufs)
    elif builder == "all_gather":
        data = [rng.integers(0, 9, 2) for _ in range(n)]
        bufs = [{"in": d.copy(), "out": np.zeros(2 * n, int)} for d in data]
        simulate([ring.all_gather(r, order, 2) for r in range(n)], bufs)
        want = np.concatenate(data)
        assert all(np.array_equal(b["out"], want) for b in bufs)
    elif builder == "reduce_scatter":
        data = [rng.integers(-3, 4, 2 * n) for _ in range(n)]
        bufs = [{"in": d.copy(), "out": np.zeros(2, int)} for d in data]
        simulate([ring.reduce_scatter(r, order, 2) for r in range(n)], bufs)
        want = np.sum(data, axis=0)
        assert all(np.array_equal(b["out"], want[2 * r:2 * r + 2]) for r, b in enumerate(bufs))
    else:
        root = 517
        data = [rng.integers(-3, 4, count) for _ in range(n)]
        bufs = [{"in": d.copy(), "out": d.copy()} for d in data]
        if builder == "reduce":
            for b in bufs:
                b["out"] = b["in"]
        build = ring.broadcast if builder == "broadcast" else ring.reduce
        simulate([build(r, order, count, root) for r in range(n)], bufs, "sum")
        want = data[root] if builder == "broadcast" else np.sum(data, axis=0)
        if builder == "broadcast":
            assert all(np.array_equal(b["out"], want) for b in bufs)
        else:
            np.testing.assert_array_equal(bufs[root]["out"], want)


def test_all_to_all_and_barrier_at_1024_ranks():
    n = 1024
    plans = [direct.all_to_all(i, n, (1,) * n, (1,) * n) for i in range(n)]
    bufs = [{"in": np.full(n, i), "out": np.full(n, -1)} for i in range(n)]
    simulate(plans, bufs)
    assert all(np.array_equal(b["out"], np.arange(n)) for b in bufs)
    simulate([direct.barrier(r, n) for r in range(n)], [{} for _ in range(n)])


def test_simulator_catches_deadlock_and_size_mismatch():
    def plan(r, stages):
        p = RankPlan("x", "test", r, 2)
        p.stages = stages
        return p
    a = Region("out", 0, 4)
    with pytest.raises(PlanError, match="deadlock"):       # both receive first
        simulate([plan(0, [[recv(1, a)], [send(1, a)]]), plan(1, [[recv(0, a)], [send(0, a)]])],
                 [{"out": np.zeros(4)} for _ in range(2)])
    with pytest.raises(PlanError, match="expected"):
        simulate([plan(0, [[send(1, Region("out", 0, 3))]]), plan(1, [[recv(0, a)]])],
                 [{"out": np.zeros(4)} for _ in range(2)])
