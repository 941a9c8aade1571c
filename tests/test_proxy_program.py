"""The proxy engine's tables and protocol (ccl/engines/proxy/), without a GPU.

Each rank runs real proxied collectives over real TCP connections between processes (ranks
posing as hosts): two threads play the kernel of proxy.cu with the program's numpy twins
(apply_out / apply_in: ring the doorbell, copy the out-items in order setting FILLED; then
either, as the spinning kernel, wait for DONE before each pass's in-items and for FINISHED, or,
as a stream with waits, reset the call's SITE words before the doorbell and wait for each
group's word before copying that group back), while the proxy's host side
(ProxyHost.drain) walks the plan over the arena. Results must equal the numpy float64
reference. On a GPU the same tables drive the kernel (tests/test_cuda_multihost.py)."""
import os
import re
import threading
import time
import types

import numpy as np
import pytest

from reference import make, mismatch

pytestmark = pytest.mark.timeout(180)


def test_words_match_the_kernel():
    """The word offsets of host.py are the #defines of proxy.cu."""
    import pyccl.engines.proxy.host as H
    import pyccl.engines.proxy.program as P
    src = open(os.path.join(os.path.dirname(H.__file__), "proxy.cu")).read()
    defs = dict(re.findall(r"#define (\w+) (.+)", src))
    env = {}
    for k, v in defs.items():
        env[k] = eval(v, {}, env)       # noqa: S307 - our own constants
    for k in ("ABORT", "ERROR", "ERR_CALL", "ERR_WHERE", "POSTED", "FINISHED", "RING", "RING_SLOTS",
              "RING_WORDS", "FILLED", "MAX_ITEMS", "DONE", "MAX_PASSES", "SITE", "SITES", "GROUPS"):
        assert getattr(H, k) == env[k], k
    assert P.MAX_ITEMS == env["MAX_ITEMS"] and P.MAX_PASSES == env["MAX_PASSES"]
    assert H.WORDS == env["SITE"] + env["SITES"] * env["GROUPS"]
    import pyccl.engines.proxy.state as S
    assert (S._KERNEL, S._STREAM_OUT, S._STREAM_IN) == (env["MODE_KERNEL"], env["MODE_STREAM_OUT"],
                                                        env["MODE_STREAM_IN"])


def _wait(pred, what):
    end = time.monotonic() + 30
    while not pred():
        if time.monotonic() > end:
            raise AssertionError(f"emulated kernel: timed out waiting for {what}")
        time.sleep(1e-4)


def _kernel(words, prog, devs, pid, tag, n, stream_waits):
    """proxy.cu's protocol in two threads (out-blocks, in-blocks or the stream's waits and in
    launches), on numpy."""
    from pyccl.engines.proxy import host as H
    from pyccl.engines.proxy.program import apply_in, apply_out
    site = tag % H.RING_SLOTS
    at = H.SITE + site * H.GROUPS
    if stream_waits:
        words[at:at + H.GROUPS] = 0
    slot = H.RING + H.RING_WORDS * ((n - 1) % H.RING_SLOTS)
    words[slot], words[slot + 1], words[slot + 2] = pid, tag, site
    words[H.POSTED] = n

    def out():
        for i in range(prog.n_out):
            apply_out(prog, devs, i + 1, i)
            words[H.FILLED + i] = n

    def back():
        if stream_waits:
            for g, items in enumerate(prog.in_groups):
                _wait(lambda: words[at + g] >= 1, f"SITE word of group {g}")
                apply_in(prog, devs, items=items)
            return
        for c in range(prog.total):
            _wait(lambda: words[H.DONE + c] >= n, f"DONE[{c}]")
            apply_in(prog, devs, c)
        _wait(lambda: words[H.FINISHED] >= n, "FINISHED")

    threads = [threading.Thread(target=out), threading.Thread(target=back)]
    for t in threads:
        t.start()
    return threads


def _proxied(comm, name, dtype, count, opname, root, rounds, stream_waits):
    """`rounds` calls of one program on fresh inputs; returns '' or what was wrong."""
    import pyccl
    from pyccl.dtypes import DTYPES
    from pyccl.engines.proxy.host import WORDS, ProxyHost
    from pyccl.engines.proxy.program import Program
    from pyccl.engines.staged import _OPS
    op = getattr(pyccl, opname.upper())
    size, rank = comm.size, comm.rank
    like = types.SimpleNamespace(flat=comm.engines.by_name["flat"], rank=rank, size=size)
    dt = DTYPES[dtype]
    words = np.zeros(WORDS, np.uint64)
    host = ProxyHost(words, comm.executor, 30.0, rank, comm.tag, size)
    problems = []
    prog = None
    for n in range(1, rounds + 1):
        salt = n * 7
        ins = [make(r, count * (size if name in ("reduce_scatter", "all_to_all", "scatter") else 1),
                    dtype, opname, salt) for r in range(size)]
        inp = ins[rank].copy()
        if name in ("all_reduce", "reduce", "broadcast"):
            out = inp
        elif name in ("all_gather", "gather"):
            out = np.zeros(count * size, dt)
        else:
            out = np.zeros(count, dt) if name != "all_to_all" else np.zeros(count * size, dt)
        wrap = lambda a: types.SimpleNamespace(array=a)       # noqa: E731 - a Buffer's face
        args = {"all_reduce": (wrap(out), op), "reduce": (wrap(out), root, op), "broadcast": (wrap(out), root),
                "all_gather": (wrap(out), wrap(inp)), "reduce_scatter": (wrap(out), wrap(inp), op),
                "all_to_all": (wrap(out), wrap(inp), (count,) * size, (count,) * size, True),
                "gather": (wrap(out), wrap(inp), root), "scatter": (wrap(out), wrap(inp), root)}[name]
        if prog is None:
            staged = _OPS[name](like, *args)
            prog = Program(1, name, staged, 96, size, dt, piece=40)
            prog.bind(np.zeros(prog.arena_bytes, np.uint8))
            host.programs[1] = prog
        devs = {"in": inp.view(np.uint8), "out": out.view(np.uint8)}
        threads = _kernel(words, prog, devs, 1, n, n, stream_waits)
        host.drain(n, f"{name} round {n}")
        for t in threads:
            t.join()
        if name in ("all_reduce", "reduce"):
            if name == "all_reduce" or rank == root:
                problems.append(mismatch(out, ins, opname, dtype))
        elif name == "broadcast":
            if not np.array_equal(out.view(np.uint8), ins[root].view(np.uint8)):
                problems.append("broadcast differs")
        elif name in ("all_gather", "gather"):
            if (name == "all_gather" or rank == root) and \
                    not np.array_equal(out.view(np.uint8), np.concatenate(ins).view(np.uint8)):
                problems.append(f"{name} differs")
        elif name == "reduce_scatter":
            parts = [x[rank * count:(rank + 1) * count] for x in ins]
            problems.append(mismatch(out, parts, opname, dtype))
        elif name == "all_to_all":
            want = np.concatenate([x[rank * count:(rank + 1) * count] for x in ins])
            if not np.array_equal(out.view(np.uint8), want.view(np.uint8)):
                problems.append("all_to_all differs")
        elif name == "scatter":
            if not np.array_equal(out.view(np.uint8), ins[root][rank * count:(rank + 1) * count].view(np.uint8)):
                problems.append("scatter differs")
    return "; ".join(p for p in problems if p)


@pytest.mark.parametrize("size", [2, 3])
@pytest.mark.parametrize("name,dtype,opname", [
    ("all_reduce", "float32", "sum"), ("all_reduce", "bfloat16", "avg"), ("all_reduce", "int32", "max"),
    ("reduce", "float64", "sum"), ("broadcast", "int8", "sum"), ("all_gather", "float16", "sum"),
    ("reduce_scatter", "float32", "avg"), ("reduce_scatter", "int64", "prod"), ("all_to_all", "uint8", "sum"),
    ("gather", "float32", "sum"), ("scatter", "int32", "sum")])
@pytest.mark.parametrize("stream_waits", [True, False], ids=["stream", "kernel"])
def test_proxied_collective_on_host(groups, size, name, dtype, opname, stream_waits):
    g = groups(size, ranks_per_host=1)
    for count in (0, 1, 13, 1000):
        out = g.run(_proxied, name, dtype, count, opname, size - 1, 2, stream_waits)
        assert not any(out), f"{name} {dtype} {opname} x{count}: {out}"


def _proxied_p2p(comm, dtype, count, rounds, stream_waits):
    """send/recv through the proxy (program_key per peer): even ranks send to the next rank, then
    receive from the previous one; odd ranks the other way round (no cycle of sends)."""
    from pyccl.dtypes import DTYPES
    from pyccl.engines.proxy.host import WORDS, ProxyHost
    from pyccl.engines.proxy.program import Program, point_to_point
    size, rank = comm.size, comm.rank
    dt = DTYPES[dtype]
    words = np.zeros(WORDS, np.uint64)
    host = ProxyHost(words, comm.executor, 30.0, rank, comm.tag, size)
    nxt, prv = (rank + 1) % size, (rank - 1) % size
    wrap = lambda a: types.SimpleNamespace(array=a)       # noqa: E731 - a Buffer's face
    problems, progs, n = [], {}, 0
    for k in range(1, rounds + 1):
        mine = make(rank, count, dtype, "sum", k)
        theirs = make(prv, count, dtype, "sum", k)
        got = np.zeros(count, dt)
        steps = [("send", nxt, mine), ("recv", prv, got)]
        for op, peer, buf in (steps if rank % 2 == 0 else steps[::-1]):
            pid = 1 if op == "send" else 2
            prog = progs.get(op)
            if prog is None:
                prog = progs[op] = Program(pid, op, point_to_point(comm, wrap(buf), peer, op == "send"), 96, size,
                                           dt, piece=40)
                prog.bind(np.zeros(prog.arena_bytes, np.uint8))
                host.programs[pid] = prog
            n += 1
            devs = {"in": buf.view(np.uint8), "out": buf.view(np.uint8)}
            threads = _kernel(words, prog, devs, pid, n, n, stream_waits)
            host.drain(n, f"{op} round {k}")
            for t in threads:
                t.join()
        if not np.array_equal(got.view(np.uint8), theirs.view(np.uint8)):
            problems.append(f"round {k}: recv from {prv} differs")
    return "; ".join(problems)


@pytest.mark.parametrize("size", [2, 3])
@pytest.mark.parametrize("stream_waits", [True, False], ids=["stream", "kernel"])
def test_proxied_send_recv_on_host(groups, size, stream_waits):
    g = groups(size, ranks_per_host=1)
    for dtype, count in (("float32", 0), ("int8", 1), ("bfloat16", 13), ("float64", 1000)):
        out = g.run(_proxied_p2p, dtype, count, 2, stream_waits)
        assert not any(out), f"send/recv {dtype} x{count}: {out}"


def _proxied_rail(comm, dtype, count, stream_waits):
    """Rail phases of the proxy's composition (ccl/engines/proxy/composed.py: rail_program) on 2
    hosts x 2 ranks: each rank's rail is the ranks with its local index, one per host; the
    programs walk the rail's plans (relabelled to communicator ranks) over real TCP. AVG divides
    by the communicator's size (the local phases summed the host's ranks before)."""
    import pyccl
    from pyccl.dtypes import DTYPES
    from pyccl.engines.proxy.composed import rail_program
    from pyccl.engines.proxy.host import WORDS, ProxyHost
    from pyccl.engines.proxy.program import Program
    hier = comm.engines.by_name["composed"].ready()
    rail, members, h, H = hier.rail, hier.rail_ranks, hier.h, hier.H
    dt = DTYPES[dtype]
    words = np.zeros(WORDS, np.uint64)
    host = ProxyHost(words, comm.executor, 30.0, comm.rank, comm.tag, comm.size)
    problems, n = [], 0
    cases = [("all_reduce", "sum", 0), ("all_reduce", "max", 0), ("all_reduce", "avg", 0), ("all_gather", "sum", 0),
             ("reduce_scatter", "sum", 0), ("reduce_scatter", "avg", 0), ("broadcast", "sum", 1)]
    for pid, (name, opname, root) in enumerate(cases, 1):
        op = getattr(pyccl, opname.upper())
        m = count * (H if name == "reduce_scatter" else 1)
        ins = {r: make(r, m, dtype, "sum" if opname == "avg" else opname, pid) for r in members}
        inp = ins[comm.rank].copy()
        if name == "all_gather":
            out = np.zeros(count * H, dt)
        elif name == "reduce_scatter":
            out = np.zeros(count, dt)
        else:
            out, inp = inp, None
        key, build = rail_program(rail, name, out, dtype, op, root, inp)
        staged, _, _, pdt = build()
        prog = Program(pid, name, staged, 96, comm.size, pdt, piece=40)
        prog.bind(np.zeros(prog.arena_bytes, np.uint8))
        host.programs[pid] = prog
        n += 1
        devs = {"in": (inp if inp is not None else out).view(np.uint8), "out": out.view(np.uint8)}
        threads = _kernel(words, prog, devs, pid, n, n, stream_waits)
        host.drain(n, f"rail {name} {opname}")
        for t in threads:
            t.join()
        xs = [ins[r] for r in members]
        if name == "reduce_scatter":
            xs = [x[h * count:(h + 1) * count] for x in xs]
        if name == "all_gather":
            bad = not np.array_equal(out.view(np.uint8), np.concatenate(xs).view(np.uint8))
        elif name == "broadcast":
            bad = not np.array_equal(out.view(np.uint8), ins[members[root]].view(np.uint8))
        elif opname == "avg":            # the sum over the rail, divided by the communicator's size
            total = np.sum([x.astype(np.float64) for x in xs], axis=0)
            if np.issubdtype(dt, np.integer):
                bad = not np.array_equal(out, np.trunc(total / comm.size).astype(dt))     # truncated, as pyccl's AVG
            else:
                bad = not np.allclose(out.astype(np.float64), total / comm.size,
                                      rtol=1e-2 if dtype == "bfloat16" else 1e-6)
        else:
            bad = mismatch(out, xs, opname, dtype)
        if bad:
            problems.append(f"rail {name} {opname} (rail {members}): {bad}")
    return "; ".join(problems)


@pytest.mark.parametrize("stream_waits", [True, False], ids=["stream", "kernel"])
def test_proxied_rail_phases_2x2(groups, stream_waits):
    g = groups(4, ranks_per_host=2)
    for dtype, count in (("float32", 0), ("float32", 1), ("bfloat16", 13), ("int32", 1000)):
        out = g.run(_proxied_rail, dtype, count, stream_waits)
        assert not any(out), f"{dtype} x{count}: {out}"


def test_in_groups():
    """In-items cut into runs of whole passes: every item once, in order, ends on pass
    boundaries, at most GROUPS runs; the last run has no group_end (the network's end frees it)."""
    from pyccl.engines.proxy.program import _groups
    for passes in ([], [0], [0, 0, 0], [0, 1], [0, 0, 1, 1, 2, 2, 3, 3], [5] * 3 + [6] * 10 + [7],
                   list(range(40)), [0] * 7 + [1] + [2] * 9):
        groups, ends = _groups(passes, 4)
        assert groups[0][0] == 0 and groups[-1][1] == len(passes) and len(groups) <= 4
        assert all(a[1] == b[0] for a, b in zip(groups, groups[1:]))
        assert all(lo < hi for lo, hi in groups) or passes == []
        for g, (lo, hi) in enumerate(groups[:-1]):
            assert passes[hi - 1] != passes[hi] and ends[passes[hi - 1]] == g
        assert len(ends) == len(groups) - 1
    assert len(_groups(list(range(40)), 4)[0]) == 4


def test_gpudirect_choice():
    """ccl/engines/proxy/gdr.py: dmabuf before peermem, only over ibverbs, and why not."""
    from pyccl.engines.proxy.gdr import choose, probe
    assert choose("ibverbs", True, True, True)[0] == "dmabuf"
    assert choose("ibverbs", True, False, True)[0] == "peermem"
    assert choose("ibverbs", False, True, True)[0] == "peermem"
    way, why = choose("ibverbs", True, False, False)
    assert way is None and "ibv_reg_dmabuf_mr" in why and "nvidia_peermem" in why
    way, why = choose("ibverbs", False, False, False)
    assert way is None and "dma-buf" in why
    way, why = choose("tcp", True, True, True)
    assert way is None and "sockets" in why
    facts = probe(0)                       # this machine: no GPU, no peermem; the call must not fail
    assert set(facts) == {"dmabuf_gpu", "dmabuf_verbs", "peermem"}
    assert choose("ibverbs", **facts)[0] in (None, "dmabuf", "peermem")
