"""Tree, hierarchical and halving-doubling plans proven by the simulator (1..17 ranks,
primes, 64, 1,024 and 16,384 ranks), ring plans at 16,384 ranks through the
rotation-symmetric simulator, the cost model, the tuner and `python -m pyccl.plan`.

Each plan family is checked three ways: plan_hazards (the stage contract, statically, on
every rank), simulate (one legal schedule, exact results), and simulate_chunked (the
executor's "for chunk: for stage" order with tiny chunks, which catches plans whose later
stages read parts of regions written whole before).
"""
import logging
import random

import numpy as np
import pytest

from pyccl import tuner
from pyccl.topology import cost, halving_doubling as hd, hierarchical as hier, ring, tree
from pyccl.topology.graph import Topology, applicable, build_all, build_plan, canonical_algo
from pyccl.topology.plan import Region, RankPlan, recv_reduce_send
from pyccl.plan import main as plan_main, verify
from pyccl.topology.simulate import (PlanError, expand_chunks, plan_hazards, simulate, simulate_chunked,
                                     simulate_rotational)

SMALL = list(range(1, 18)) + [19, 23, 31, 64]
COUNTS = [0, 1, 2, 13, 1031]            # empty, one, fewer than ranks, primes, not divisible


def _rng(*key):
    return np.random.default_rng(abs(hash(key)) % 2**32)


def _order(n, shuffled):
    order = list(range(n))
    if shuffled:
        random.Random(n).shuffle(order)
    return order


def _inplace(data):
    bufs = [{"in": d.copy()} for d in data]
    for b in bufs:
        b["out"] = b["in"]
    return bufs


def _prove_all_reduce(plans, data, chunks=(1, 3)):
    """Plain and chunked simulation; every rank must hold the sum."""
    want = np.sum(data, axis=0)
    for p in plans[:64]:
        assert plan_hazards(p) == [], (p.rank, plan_hazards(p))
    if len(want) > 100:                       # big counts: still several, unaligned chunks per region
        chunks = (97,)
    for ce in (None,) + tuple(chunks):
        bufs = _inplace(data)
        if ce is None:
            simulate(plans, bufs)
        else:
            simulate_chunked(plans, bufs, "sum", ce)
        bad = [r for r, b in enumerate(bufs) if not np.array_equal(b["out"], want)]
        assert not bad, f"wrong sum on ranks {bad[:5]} (chunk {ce})"


def _prove_rooted(op, plans, data, root, chunk=2):
    if len(data[0]) > 100:
        chunk = 97
    for p in plans[:64]:
        assert plan_hazards(p) == [], (p.rank, plan_hazards(p))
    for ce in (None, chunk):
        if op == "reduce":
            bufs = _inplace(data)
        else:
            bufs = [{"out": d.copy()} for d in data]
        if ce is None:
            simulate(plans, bufs)
        else:
            simulate_chunked(plans, bufs, "sum", ce)
        if op == "reduce":
            np.testing.assert_array_equal(bufs[root]["out"], np.sum(data, axis=0))
            for r, b in enumerate(bufs):
                if r != root:
                    np.testing.assert_array_equal(b["in"], data[r])      # inputs untouched
        else:
            assert all(np.array_equal(b["out"], data[root]) for b in bufs)


# ---- tree shapes ---------------------------------------------------------------------------
@pytest.mark.parametrize("m", list(range(1, 130)) + [1024, 1025, 16384])
def test_double_tree_shapes(m):
    """One root per tree, consistent parent/child links, every rank a leaf in one tree and
    interior in at most one, depth ~log2(m)."""
    for shape in (tree.tree_a, tree.tree_b):
        nodes = [shape(m, i) for i in range(m)]
        assert sum(p < 0 for p, _ in nodes) == 1
        for i, (p, ch) in enumerate(nodes):
            assert len(ch) <= 2
            for c in ch:
                assert nodes[c][0] == i
            if p >= 0:
                assert i in nodes[p][1]
    interior_a = {i for i in range(m) if tree.tree_a(m, i)[1]}
    interior_b = {i for i in range(m) if tree.tree_b(m, i)[1]}
    assert not interior_a & interior_b
    assert tree.depth(m) <= max(1, m.bit_length()) + 1
    for root in {0, m // 2, m - 1}:
        assert tree.rooted(m, root, root)[0] == -1


# ---- small rank counts, every builder ------------------------------------------------------
@pytest.mark.parametrize("n", SMALL)
def test_tree_all_reduce(n):
    for shuffled in (False, True):
        order = _order(n, shuffled)
        for count in COUNTS:
            data = [_rng(n, count, r).integers(-50, 50, count) for r in range(n)]
            for ce in (None, 5, 400):
                _prove_all_reduce([tree.all_reduce(r, order, count, ce) for r in range(n)], data,
                                  chunks=(1, 3) if n <= 8 else (3,))


@pytest.mark.parametrize("n", SMALL)
def test_tree_reduce_broadcast(n):
    order = _order(n, True)
    roots = range(n) if n <= 8 else sorted({0, 1, n // 2, n - 1})
    for count in COUNTS:
        for root in roots:
            data = [_rng(n, count, r, root).integers(-9, 9, count) for r in range(n)]
            for ce in (None, 4):
                _prove_rooted("reduce", [tree.reduce(r, order, count, root, ce) for r in range(n)], data, root)
                _prove_rooted("broadcast", [tree.broadcast(r, order, count, root, ce) for r in range(n)], data, root)


@pytest.mark.parametrize("n", SMALL)
def test_halving_doubling_all_reduce(n):
    for shuffled in (False, True):
        order = _order(n, shuffled)
        for count in COUNTS:
            data = [_rng(n, count, r).integers(-50, 50, count) for r in range(n)]
            for max_elems in (None, max(1, count // 3)):
                plans = [hd.all_reduce(r, order, count, max_elems) for r in range(n)]
                assert all(p.atomic for p in plans)
                _prove_all_reduce(plans, data)


def _host_layouts():
    yield [0]
    yield [0, 1]
    yield [0, 0, 1, 1]
    yield [0, 1, 0, 1, 2, 2]                    # interleaved ranks, equal hosts
    yield [0, 0, 0, 1, 1, 2]                    # unequal hosts
    yield [1, 0, 1, 0, 1, 0, 2, 2, 2]
    yield [h for h in range(3) for _ in range(5)]
    yield [h for h in range(4) for _ in range(4)]
    yield [r % 3 for r in range(17)]            # 17 ranks, unequal
    yield [r // 7 for r in range(7 * 5)]        # prime local size


@pytest.mark.parametrize("hosts", list(_host_layouts()), ids=lambda h: f"{len(h)}r{max(h) + 1}h")
def test_hierarchical_all_reduce(hosts):
    n = len(hosts)
    for count in COUNTS:
        data = [_rng(n, count, r).integers(-50, 50, count) for r in range(n)]
        for inter in hier.INTER:
            for ce in (None, 3):
                plans = [hier.all_reduce(r, hosts, count, inter, ce) for r in range(n)]
                assert all(p.atomic == (inter == "halving_doubling") for p in plans)
                _prove_all_reduce(plans, data, chunks=(2,))


@pytest.mark.parametrize("hosts", list(_host_layouts()), ids=lambda h: f"{len(h)}r{max(h) + 1}h")
def test_hierarchical_reduce_broadcast(hosts):
    n = len(hosts)
    for count in (0, 1, 13, 1031):
        for root in sorted({0, n // 2, n - 1}):
            data = [_rng(n, count, r, root).integers(-9, 9, count) for r in range(n)]
            _prove_rooted("reduce", [hier.reduce(r, hosts, count, root, 5) for r in range(n)], data, root)
            _prove_rooted("broadcast", [hier.broadcast(r, hosts, count, root, 5) for r in range(n)], data, root)


@pytest.mark.parametrize("hosts", [h for h in _host_layouts() if len({h.count(x) for x in set(h)}) == 1],
                         ids=lambda h: f"{len(h)}r{max(h) + 1}h")
def test_hierarchical_all_gather_reduce_scatter(hosts):
    n = len(hosts)
    for count in (0, 1, 2, 13):
        inp = [_rng(n, count, r).integers(-9, 9, count * n) for r in range(n)]
        plans = [hier.reduce_scatter(r, hosts, count) for r in range(n)]
        for ce in (None, 1):
            bufs = [{"in": d.copy(), "out": np.zeros(count, np.int64)} for d in inp]
            (simulate(plans, bufs) if ce is None else simulate_chunked(plans, bufs, "sum", ce))
            total = np.sum(inp, axis=0)
            for r in range(n):
                np.testing.assert_array_equal(bufs[r]["out"], total[r * count:(r + 1) * count])
                np.testing.assert_array_equal(bufs[r]["in"], inp[r])
        data = [d[:count] for d in inp]
        plans = [hier.all_gather(r, hosts, count) for r in range(n)]
        for p in plans:
            assert plan_hazards(p) == []
        for ce in (None, 1):
            bufs = [{"in": d.copy(), "out": np.zeros(count * n, np.int64)} for d in data]
            (simulate(plans, bufs) if ce is None else simulate_chunked(plans, bufs, "sum", ce))
            assert all(np.array_equal(b["out"], np.concatenate(data)) for b in bufs)


def test_hierarchical_gather_scatter_need_equal_hosts():
    with pytest.raises(ValueError, match="same number of ranks"):
        hier.all_gather(0, [0, 0, 1], 4)
    assert not applicable("all_gather", "hierarchical", Topology((0, 0, 1)))
    assert applicable("all_reduce", "hierarchical", Topology((0, 0, 1)))


# ---- 1,024 ranks ---------------------------------------------------------------------------
TOPO_1024 = Topology.uniform(128, 8)
UNEVEN_1024 = Topology(tuple(sorted(r % 100 for r in range(1024))))      # 24 hosts of 11, 76 of 10


@pytest.mark.timeout(300)
@pytest.mark.parametrize("op,algo,inter", [
    ("all_reduce", "tree", None), ("all_reduce", "halving_doubling", None),
    ("all_reduce", "hierarchical", "tree"), ("all_reduce", "hierarchical", "halving_doubling"),
    ("reduce", "tree", None), ("broadcast", "tree", None),
    ("reduce", "hierarchical", None), ("broadcast", "hierarchical", None),
    ("all_gather", "hierarchical", None), ("reduce_scatter", "hierarchical", None)])
def test_plans_at_1024_ranks(op, algo, inter):
    count = 3 if op in ("all_gather", "reduce_scatter") else 1031
    verify(op, algo, TOPO_1024, count, root=517, inter=inter, chunked=False, out=lambda s: None)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("inter", ["tree", "halving_doubling"])
def test_hierarchical_uneven_hosts_at_1024_ranks(inter):
    verify("all_reduce", "hierarchical", UNEVEN_1024, 37, inter=inter, chunked=False, out=lambda s: None)
    verify("broadcast", "hierarchical", UNEVEN_1024, 37, root=999, chunked=False, out=lambda s: None)


def _blocks_of(count, n):
    return lambda i: (count * i // n, count * (i + 1) // n)


@pytest.mark.parametrize("n", [1, 2, 3, 5, 13, 64, 1024])
def test_rotational_simulator_matches_ring(n):
    order = _order(n, True)
    count = n + 3                                        # blocks of 1-2 elements, all distinct
    rng = _rng("rot", n)
    data = rng.integers(0, 256, (n, count), dtype=np.uint8)
    buf = data.copy()
    simulate_rotational(lambda r: ring.all_reduce(r, order, count), order, {"out": _blocks_of(count, n)},
                        {"out": buf})
    assert (buf == data.sum(axis=0, dtype=np.uint64).astype(np.uint8)).all()
    if n <= 64:                                          # same as the per-rank simulator
        bufs = [{"out": d.astype(np.int64)} for d in data]
        simulate([ring.all_reduce(r, order, count) for r in range(n)], bufs)
        assert all(np.array_equal(b["out"].astype(np.uint8), buf[0]) for b in bufs)


def test_rotational_simulator_catches_bugs():
    n, count = 16, 19
    order = list(range(n))

    def broken(rank):                                    # every rank skips its last all-gather step
        p = ring.all_reduce(rank, order, count)
        p.stages = p.stages[:-1]
        return p
    with pytest.raises(PlanError, match="never received"):
        simulate_rotational(broken, order, {"out": _blocks_of(count, n)}, {"out": np.zeros((n, count), np.uint8)})

    def asymmetric(rank):                                # rank 5 differs: not rotation-symmetric
        return ring.all_reduce(rank, order if rank != 5 else order[::-1], count)
    with pytest.raises(PlanError, match="not the rotated plan"):
        simulate_rotational(asymmetric, order, {"out": _blocks_of(count, n)}, {"out": np.zeros((n, count), np.uint8)})


def test_chunked_simulation_and_hazards_catch_split_regions():
    """Recursive halving reads halves of what it wrote whole: without `atomic` the executor's
    chunking breaks it. plan_hazards says so statically and the chunked simulation
    computes a wrong sum."""
    n, count = 8, 64
    data = [_rng("hz", r).integers(-9, 9, count) for r in range(n)]
    plans = [hd.all_reduce(r, list(range(n)), count) for r in range(n)]
    for p in plans:
        p.atomic = False
    assert any("chunk hazard" in h for h in plan_hazards(plans[0]))
    bufs = _inplace(data)
    simulate_chunked(plans, bufs, "sum", 5)
    assert not all(np.array_equal(b["out"], np.sum(data, axis=0)) for b in bufs)
    # and a stage forwarding twice to one peer is flagged
    bad = RankPlan("x", "test", 0, 3)
    a, b = Region("out", 0, 2), Region("out", 2, 4)
    bad.stages = [[recv_reduce_send(1, 2, a, a), recv_reduce_send(2, 1, b, b), recv_reduce_send(1, 1, b, b)]]
    assert any("two forwards" in h for h in plan_hazards(bad))
    assert expand_chunks(plans[0], 1000).stages[0] == plans[0].stages[0]


# ---- 16,384 ranks --------------------------------------------------------------------------
TOPO_16K = Topology.uniform(2048, 8)


@pytest.mark.timeout(600)
@pytest.mark.parametrize("op,algo,inter", [
    ("all_reduce", "tree", None), ("reduce", "tree", None), ("broadcast", "tree", None),
    ("all_reduce", "halving_doubling", None), ("all_reduce", "hierarchical", "tree"),
    ("reduce", "hierarchical", None), ("broadcast", "hierarchical", None),
    ("reduce", "ring", None), ("broadcast", "ring", None)])
def test_plans_at_16384_ranks(op, algo, inter):
    """O(log N)-per-rank plans (and the O(1) ring chains) through the per-rank simulator."""
    verify(op, algo, TOPO_16K, 37, root=12345, inter=inter, chunked=False, out=lambda s: None)


@pytest.mark.timeout(600)
@pytest.mark.parametrize("op", ["all_reduce", "all_gather", "reduce_scatter"])
def test_ring_at_16384_ranks(op):
    """Ring plans are O(N) per rank (5e8 ops in all at 16,384): proven with the
    rotation-symmetric lockstep simulator instead (see simulate_rotational)."""
    n = TOPO_16K.nranks
    order = TOPO_16K.ring_order()
    rng = _rng("ring16k", op)
    if op == "all_reduce":
        count = n                                        # one element per block, all distinct
        data = rng.integers(0, 256, (n, count), dtype=np.uint8)
        buf = data.copy()
        simulate_rotational(lambda r: ring.all_reduce(r, order, count), order, {"out": _blocks_of(count, n)},
                            {"out": buf}, samples=4)
        assert (buf == data.sum(axis=0, dtype=np.uint64).astype(np.uint8)).all()
    else:
        verify(op, "ring", TOPO_16K, 1, out=lambda s: None)


# ---- topology, dispatch --------------------------------------------------------------------
def test_topology_and_ring_order():
    t = Topology.from_host_ids(["b", "a", "b", "a", "c"])
    assert t.hosts == (0, 1, 0, 1, 2) and t.nhosts == 3 and t.local_sizes() == (2, 2, 1)
    order = list(t.ring_order())
    assert order == [0, 2, 1, 3, 4]                      # a host's ranks are neighbours
    assert t.transport(0, 2) == "shm" and t.transport(0, 1) == "tcp"
    assert Topology.uniform(4, 8).ring_order() == range(32)
    assert canonical_algo("double_tree") == "tree" and canonical_algo("HD") == "halving_doubling"
    with pytest.raises(ValueError):
        canonical_algo("bogus")
    with pytest.raises(ValueError):
        build_plan("broadcast", "halving_doubling", 0, t, 10)
    plans = build_all("all_reduce", "hierarchical", t, 11, inter="ring")
    _prove_all_reduce(plans, [_rng("t", r).integers(-9, 9, 11) for r in range(5)])


# ---- cost model ----------------------------------------------------------------------------
COSTS = cost.transport_costs({})


def _cluster(n, per_host=8):
    return Topology.single_host(n) if n <= per_host else Topology.uniform(n // per_host, per_host)


def test_ring_latency_linear_tree_logarithmic():
    ns = [2 ** k for k in range(4, 15)]
    ring_t = [cost.predict("all_reduce", "ring", 8, _cluster(n), COSTS) for n in ns]
    tree_t = [cost.predict("all_reduce", "tree", 8, _cluster(n), COSTS) for n in ns]
    hd_t = [cost.predict("all_reduce", "halving_doubling", 8, _cluster(n), COSTS) for n in ns]
    for a, b in zip(ring_t, ring_t[1:]):
        assert 1.8 < b / a < 2.2                         # doubling ranks doubles the ring's latency
    steps = [b - a for a, b in zip(tree_t, tree_t[1:])]
    assert max(steps) < 2.5 * min(steps)                 # tree: a constant per doubling (log N)
    assert tree_t[-1] < 2 * tree_t[0] * len(ns)
    assert ring_t[-1] > 100 * tree_t[-1] and ring_t[-1] > 100 * hd_t[-1]


def test_crossovers_exist():
    small, big = 8, 256 << 20
    # one host, big message: ring is the cheapest; at 16,384 ranks and 8 B it is far the worst
    one = Topology.single_host(8)
    assert cost.predict("all_reduce", "ring", big, one, COSTS) < cost.predict("all_reduce", "tree", big, one, COSTS)
    t16k = _cluster(16384)
    assert cost.predict("all_reduce", "ring", small, t16k, COSTS) > 50 * cost.predict("all_reduce", "tree", small, t16k, COSTS)
    # so ring vs tree crosses over as the size grows (at a fixed cluster) ...
    t64 = _cluster(64)
    sizes = [1 << k for k in range(3, 31)]
    winner = [cost.predict("all_reduce", "ring", s, t64, COSTS) < cost.predict("all_reduce", "tree", s, t64, COSTS)
              for s in sizes]
    assert not winner[0] and winner[-1]
    # ... and as the cluster grows (at a fixed medium size)
    ns = [2 ** k for k in range(1, 15)]
    winner = [cost.predict("all_reduce", "ring", 1 << 20, _cluster(n), COSTS) <=
              cost.predict("all_reduce", "tree", 1 << 20, _cluster(n), COSTS) for n in ns]
    assert winner[0] and not winner[-1]


@pytest.mark.parametrize("shape", [(1, 8), (4, 4), (8, 2)])
def test_closed_forms_agree_with_walking_the_plans(shape):
    topo = Topology.uniform(*shape)
    for op, algos in [("all_reduce", ["ring", "tree", "halving_doubling", "hierarchical"]),
                      ("broadcast", ["ring", "tree"]), ("reduce_scatter", ["ring"])]:
        for algo in algos:
            if not applicable(op, algo, topo):
                continue
            for nbytes in (1 << 14, 1 << 20):
                p = cost.predict(op, algo, nbytes, topo, COSTS, 1 << 16)
                w = cost.walk_time(op, algo, nbytes, topo, COSTS, 1 << 16)
                assert 0.3 < p / w < 3.5, (op, algo, nbytes, p, w)


def test_cost_env_overrides():
    c = cost.transport_costs({"PYCCL_ALPHA_TCP": "100", "PYCCL_BW_TCP": "2.5", "PYCCL_REDUCE_BW_SHM": "4"})
    assert c["tcp"].alpha == pytest.approx(100e-6)
    assert c["tcp"].beta == pytest.approx(1 / 2.5e9)
    assert c["shm"].gamma == pytest.approx(1 / 4e9)
    assert c["ibverbs"] == cost.DEFAULTS["ibverbs"]


# ---- tuner ---------------------------------------------------------------------------------
def test_tuner_is_deterministic():
    topo = Topology.uniform(16, 8)
    for op in ("all_reduce", "reduce", "broadcast", "all_gather", "reduce_scatter", "all_to_all"):
        for nbytes in (0, 8, 4096, 1 << 20, 1 << 30):
            tuner._choose.cache_clear()
            a = tuner.choose(op, nbytes, topo, dict(COSTS), env={})
            tuner._choose.cache_clear()
            b = tuner.choose(op, nbytes, Topology.uniform(16, 8), dict(reversed(list(COSTS.items()))), env={})
            assert a == b
            if op != "all_to_all" and nbytes:
                assert applicable(op, a.algo, topo) and a.chunk_bytes in tuner.CHUNK_CANDIDATES


def test_tuner_picks_by_size_and_scale():
    big = Topology.uniform(512, 8)
    assert tuner.choose("all_reduce", 8, big, COSTS, env={}).algo != "ring"
    assert tuner.choose("all_reduce", 256 << 20, Topology.single_host(8), COSTS, env={}).algo == "ring"
    c = tuner.choose("all_reduce", 1 << 20, big, COSTS, env={})
    assert c.predicted <= cost.predict("all_reduce", "ring", 1 << 20, big, COSTS, c.chunk_bytes)


def test_pyccl_algo_forces(caplog):
    topo = Topology.uniform(4, 4)
    for value, want in [("ring", "ring"), ("tree", "tree"), ("double_tree", "tree"), ("HD", "halving_doubling"),
                        ("hierarchical", "hierarchical"), ("composed", "composed"), ("tree,ring", None)]:
        c = tuner.choose("all_reduce", 8, topo, COSTS, env={"PYCCL_ALGO": value})
        if want:
            assert c.algo == want
        else:
            assert c.algo in ("tree", "ring")
    with caplog.at_level(logging.WARNING, logger="pyccl"):
        c = tuner.choose("broadcast", 8, topo, COSTS, env={"PYCCL_ALGO": "halving_doubling"})
    assert c.algo in ("ring", "tree", "hierarchical", "composed")
    assert "cannot build broadcast" in caplog.text


def test_tuner_logs_choice_at_info(caplog):
    tuner._choose.cache_clear()
    with caplog.at_level(logging.INFO, logger="pyccl"):
        c = tuner.choose("all_reduce", 12345, Topology.uniform(2, 4), COSTS, env={})
    assert f"-> {c.algo}" in caplog.text and "12345 B" in caplog.text


def test_tuner_choice_builds_a_correct_plan():
    topo = Topology.uniform(3, 4)
    for op in ("all_reduce", "reduce", "broadcast", "all_gather", "reduce_scatter"):
        for nbytes in (8, 1 << 20):
            c = tuner.choose(op, nbytes, topo, COSTS, env={})
            verify(op, c.algo, topo, 13, root=5, chunk_elems=3, inter=c.inter, out=lambda s: None)


# ---- the command line ----------------------------------------------------------------------
def test_plan_cli(capsys, tmp_path):
    assert plan_main(["--hosts", "4", "--ranks-per-host", "4", "--op", "all_reduce", "--algo", "double_tree",
                      "--verify", "--cost"]) == 0
    out = capsys.readouterr().out
    assert "verified all_reduce/tree" in out and "1 GiB" in out and "8 B" in out
    assert plan_main(["--hosts", "3", "--ranks-per-host", "2", "--op", "reduce_scatter", "--verify"]) == 0
    pytest.importorskip("matplotlib")
    png = tmp_path / "plan.png"
    assert plan_main(["--hosts", "128", "--ranks-per-host", "8", "--algo", "double_tree", "--draw", str(png)]) == 0
    assert png.stat().st_size > 10_000
