"""Reproducible mode (ccl/engines/reproducible.py): float SUM/AVG give the same bytes whatever runs them.

The same adversarial inputs (cancellation, mixed magnitudes, subnormals, inf, nan, -0.0) go
through all_reduce, reduce and reduce_scatter on real processes under every engine that can
run them: the shm C collectives, the executor over shm or TCP with each PYCCL_ALGO, several
PYCCL_CHUNK_BYTES, 1, 2 and 3 emulated hosts (PYCCL_HOST_ID per rank, TCP loopback between
them), on 2, 3 and 4 ranks. Every result must equal, byte for byte, the documented reference
(the wide sum in rank order, rounded once: reproducible.sum_rows_numpy on the stacked inputs),
hence each other. test_default_mode_differs shows these checks bite: without the mode the
same comparison fails. The GPU section checks CUDA results equal the CPU ones, bitwise.
"""
import os
import secrets

import numpy as np
import pytest

import pyccl
from pyccl.engines import reproducible as R
from pyccl.dtypes import DTYPES
from pyccl.store import StoreServer
from ranks import Ranks, _rank_main

FLOATS = ["float16", "bfloat16", "float32", "float64"]
SIZES = [0, 1, 7, 1031, 40009]
OPS = ["sum", "avg"]

pytestmark = pytest.mark.timeout(300)


# ---- inputs and the documented reference --------------------------------------------------------
def adversarial(rank, n, dtype, salt=0):
    """Rank `rank`'s input: values whose sum depends on the order they are added in."""
    rng = np.random.default_rng([rank, n, len(dtype), salt])
    dt = DTYPES[dtype]
    info = np.finfo(np.float32 if dtype == "bfloat16" else dt)
    big = float(info.max) ** 0.5 if dtype != "float16" else 200.0
    kind = np.arange(n) % 8
    x = rng.standard_normal(n)
    x = np.where(kind == 0, x * big * (1 if rank % 2 else -1) + rank, x)     # cancellation
    x = np.where(kind == 1, x * 10.0 ** rng.integers(-6, 7, n), x)           # mixed magnitudes
    x = np.where(kind == 2, x * float(info.tiny) * 2.0 ** -3, x)             # subnormals
    x = np.where(kind == 3, 1.0 + rank * float(info.eps) / 3, x)             # ties / halfway cases
    x = np.where(kind == 4, -0.0, x)                                         # signed zeros
    with np.errstate(over="ignore"):
        out = x.astype(dt)
    special = rng.integers(0, 64, n)
    out[special == 0] = np.inf
    out[special == 1] = -np.inf
    out[special == 2] = np.nan
    return out


def reference(inputs, dtype, op):
    """What the docs promise: rows added in rank order in the wide type, / N for AVG, one rounding."""
    out = np.empty(inputs[0].size, DTYPES[dtype])
    R.sum_rows_numpy(out, np.stack(inputs), len(inputs) if op == "avg" else 1)
    return out


def same_bytes(a, b):
    return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


# ---- rank side -----------------------------------------------------------------------------------
def rank_run_all(comm, sizes):
    """Every (collective, dtype, op, n) on this rank: {key: result bytes}."""
    out = {}
    s = comm.size
    for dtype in FLOATS:
        for op in OPS:
            for n in sizes:
                x = adversarial(comm.rank, n, dtype)
                comm.all_reduce(x, op=op)
                out[("all_reduce", dtype, op, n)] = x.tobytes()
                root = n % s
                x = adversarial(comm.rank, n, dtype, salt=1)
                orig = x.tobytes()
                comm.reduce(x, root=root, op=op)
                out[("reduce", dtype, op, n)] = x.tobytes() if comm.rank == root else (x.tobytes() == orig)
                inp = adversarial(comm.rank, n * s, dtype, salt=2)
                o = np.zeros(n, DTYPES[dtype])
                comm.reduce_scatter(o, inp, op=op)
                out[("reduce_scatter", dtype, op, n)] = o.tobytes()
    # the async path and integers/MIN/MAX (left to the default engines) stay right
    x = adversarial(comm.rank, 1031, "float32")
    comm.all_reduce(x, op="sum", async_op=True).wait()
    out["async"] = x.tobytes()
    i = (np.arange(1031, dtype=np.int64) * (comm.rank + 1)) ** 3
    comm.all_reduce(i)
    out["int64"] = i.tobytes()
    m = adversarial(comm.rank, 1031, "float32")
    comm.all_reduce(m, op="max")
    out["max"] = m.tobytes()
    return out


def expected(size, sizes):
    exp = {}
    for dtype in FLOATS:
        for op in OPS:
            for n in sizes:
                exp[("all_reduce", dtype, op, n)] = [reference([adversarial(r, n, dtype) for r in range(size)],
                                                               dtype, op).tobytes()] * size
                root = n % size
                red = reference([adversarial(r, n, dtype, salt=1) for r in range(size)], dtype, op).tobytes()
                exp[("reduce", dtype, op, n)] = [red if r == root else True for r in range(size)]
                full = reference([adversarial(r, n * size, dtype, salt=2) for r in range(size)], dtype, op)
                exp[("reduce_scatter", dtype, op, n)] = [full[r * n:(r + 1) * n].tobytes() for r in range(size)]
    exp["async"] = [reference([adversarial(r, 1031, "float32") for r in range(size)], "float32", "sum").tobytes()] * size
    ints = sum((np.arange(1031, dtype=np.int64) * (r + 1)) ** 3 for r in range(size))
    exp["int64"] = [ints.tobytes()] * size
    with np.errstate(invalid="ignore"):
        mx = np.maximum.reduce([adversarial(r, 1031, "float32") for r in range(size)])
    exp["max"] = [mx.tobytes()] * size
    return exp


def differences(results, exp):
    """Every key where some rank's bytes differ from the reference."""
    bad = []
    for key, want in exp.items():
        got = [res[key] for res in results]
        if got != want:
            ranks = [r for r, (g, w) in enumerate(zip(got, want)) if g != w]
            bad.append(f"{key} differs on ranks {ranks}")
    return bad


# ---- rank groups: one host (shm or TCP) or several emulated hosts -----------------------------------
def _host_rank_main(rank, size, addr, secret, env, comm_kwargs, hosts, conn):
    os.environ["PYCCL_HOST_ID"] = hosts[rank]
    _rank_main(rank, size, addr, secret, env, comm_kwargs, 0, conn)


class HostGroup(Ranks):
    """`size` ranks; rank r poses as host hosts[r] (TCP loopback between hosts)."""

    def __init__(self, size, hosts, env, timeout=240, **comm_kwargs):
        secret = secrets.token_bytes(32)
        self.server = StoreServer("127.0.0.1", 0, secret)
        env = {"PYCCL_TIMEOUT": "60", **env}
        try:
            super().__init__(size, timeout, _host_rank_main,
                             (size, self.server.address, secret, env, comm_kwargs, hosts))
        except BaseException:
            self.server.close()
            raise

    def close(self):
        super().close()
        self.server.close()


def run_config(size, env, nhosts=1, sizes=SIZES, **kw):
    hosts = [f"host{r * nhosts // size}" for r in range(size)]
    g = HostGroup(size, hosts, env, **kw)
    try:
        return g.run(rank_run_all, sizes)
    finally:
        g.close()


ON = {"PYCCL_REPRODUCIBLE": "1"}
# (name, env, emulated hosts): every engine that moves the data underneath
CONFIGS = [
    ("shm-collectives", {}, 1),
    ("shm-executor-ring", {"PYCCL_SHM_COLLECTIVES": "0", "PYCCL_ALGO": "ring"}, 1),
    ("tcp-ring", {"PYCCL_TRANSPORT": "tcp", "PYCCL_ALGO": "ring"}, 1),
    ("tcp-tree-chunk64", {"PYCCL_TRANSPORT": "tcp", "PYCCL_ALGO": "tree", "PYCCL_CHUNK_BYTES": "64"}, 1),
    ("tcp-halving-doubling", {"PYCCL_TRANSPORT": "tcp", "PYCCL_ALGO": "halving_doubling"}, 1),
    ("2hosts-hierarchical-chunk4k", {"PYCCL_ALGO": "hierarchical", "PYCCL_CHUNK_BYTES": "4096"}, 2),
    ("3hosts-ring", {"PYCCL_ALGO": "ring"}, 3),
    ("2hosts-auto", {}, 2),
]


@pytest.mark.parametrize("size", [2, 3, 4])
@pytest.mark.parametrize("name,env,nhosts", CONFIGS, ids=[c[0] for c in CONFIGS])
def test_bitwise_equal_to_reference(size, name, env, nhosts):
    if nhosts > size:
        pytest.skip(f"{nhosts} hosts need {nhosts}+ ranks")
    results = run_config(size, {**ON, **env}, nhosts)
    bad = differences(results, expected(size, SIZES))
    assert not bad, f"{name}, {size} ranks: " + "; ".join(bad[:10])


@pytest.mark.timeout(200)
def test_argument_turns_it_on():
    """Communicator(reproducible=True) without the variable; split() keeps the mode."""
    g = HostGroup(3, ["h0"] * 3, {"PYCCL_TRANSPORT": "tcp", "PYCCL_ALGO": "tree"}, reproducible=True)
    try:
        results = g.run(rank_run_all, [1031])
        assert not differences(results, expected(3, [1031]))
        assert g.run(rank_split_mode) == [True] * 3
    finally:
        g.close()


def rank_split_mode(comm):
    sub = comm.split(0, comm.rank)
    try:
        return sub.reproducible
    finally:
        sub.close()


@pytest.mark.timeout(200)
def test_default_mode_differs():
    """The checks above bite: with the mode off, the tree and ring orders (and the per-step
    rounding of 16-bit sums) give other bytes than the reference for these inputs."""
    results = run_config(4, {"PYCCL_TRANSPORT": "tcp", "PYCCL_ALGO": "tree"}, 1, sizes=[1031])
    bad = differences(results, expected(4, [1031]))
    assert any(k.startswith("('all_reduce', 'float32'") for k in bad), bad
    assert any(k.startswith("('all_reduce', 'float16'") for k in bad), bad
    assert not any(k.startswith(("'int64'", "'max'")) for k in bad), bad
    for dtype in ("float16", "float32", "float64"):        # not only the NaN payloads: the numbers
        got = np.frombuffer(results[0][("all_reduce", dtype, "sum", 1031)], DTYPES[dtype])
        want = np.frombuffer(expected(4, [1031])[("all_reduce", dtype, "sum", 1031)][0], DTYPES[dtype])
        finite = np.isfinite(want)
        assert not same_bytes(got[finite], want[finite]), dtype


# ---- the ordered sum itself: C kernel, numpy twin, torch twin ---------------------------------------
@pytest.mark.timeout(120)
@pytest.mark.parametrize("dtype", FLOATS)
def test_kernel_twins_agree(dtype):
    torch = pytest.importorskip("torch")
    tdt = getattr(torch, dtype)
    for nrows in (1, 2, 3, 4, 7):
        for n in (1, 5, 1023, 1025, 4099):
            rows = np.stack([adversarial(r, n, dtype, salt=3) for r in range(nrows)])
            for div in (1, nrows):
                a = np.empty(n, DTYPES[dtype])
                b = np.empty(n, DTYPES[dtype])
                R.sum_rows(a, rows, div)
                R.sum_rows_numpy(b, rows, div)
                t = torch.empty(n, dtype=tdt)
                R.sum_rows_torch(t, torch.from_numpy(rows.view(f"i{rows.itemsize}").copy()).view(tdt), div)
                tb = t.view(getattr(torch, f"int{8 * rows.itemsize}")).numpy().tobytes()
                assert a.tobytes() == b.tobytes(), (dtype, nrows, n, div, "C vs numpy")
                assert tb == b.tobytes(), (dtype, nrows, n, div, "torch vs numpy")


def test_documented_semantics():
    """float32 rows are added in float64 and rounded once; NaN comes out canonical."""
    rows = np.array([[1.0, np.nan], [2.0 ** -30, 1.0], [-1.0, np.float32(-np.nan)]], np.float32)
    out = np.empty(2, np.float32)
    R.sum_rows(out, rows)
    assert out[0] == np.float32(2.0 ** -30)            # float32 steps would give 0
    assert out.view(np.uint32)[1] == 0x7FC00000
    h = np.array([[2048.0], [1.0], [1.0]], np.float16)
    o = np.empty(1, np.float16)
    R.sum_rows(o, h)
    assert o[0] == 2050.0                              # float16 steps would give 2048


# ---- GPU: CUDA results equal CPU results, bitwise (2 ranks on one GPU) ------------------------------
def _cuda_available():
    try:
        import torch
        return torch.cuda.is_available()
    except ImportError:
        return False


def rank_cuda_vs_cpu(comm, sizes):
    import torch
    torch.cuda.set_device(0)
    bad = []
    s = comm.size
    for dtype in FLOATS:
        tdt = getattr(torch, dtype)
        ints = getattr(torch, f"int{8 * DTYPES[dtype].itemsize}")

        def cuda(a):
            return torch.from_numpy(a.view(f"i{a.itemsize}").copy()).view(tdt).cuda()

        def back(t):
            return t.cpu().view(ints).numpy().tobytes()
        for op in OPS:
            for n in sizes:
                x = adversarial(comm.rank, n, dtype)
                g = cuda(x)
                comm.all_reduce(x, op=op)
                comm.all_reduce(g, op=op)
                if back(g) != x.tobytes():
                    bad.append(f"all_reduce {dtype} {op} n={n}")
                inp = adversarial(comm.rank, n * s, dtype, salt=2)
                o, og = np.zeros(n, DTYPES[dtype]), torch.zeros(n, dtype=tdt, device="cuda")
                comm.reduce_scatter(o, inp, op=op)
                comm.reduce_scatter(og, cuda(inp), op=op)
                if back(og) != o.tobytes():
                    bad.append(f"reduce_scatter {dtype} {op} n={n}")
                x = adversarial(comm.rank, n, dtype, salt=1)
                g = cuda(x)
                comm.reduce(x, root=0, op=op)
                comm.reduce(g, root=0, op=op)
                if back(g) != x.tobytes():
                    bad.append(f"reduce {dtype} {op} n={n}")
    try:
        import cupy
    except ImportError:
        cupy = None
    if cupy is not None:                      # cupy arrays: summed by torch ops on cupy's stream
        for n in sizes:
            x = adversarial(comm.rank, n, "float32")
            c = cupy.asarray(x)
            comm.all_reduce(x, op="avg")
            comm.all_reduce(c, op="avg")
            cupy.cuda.get_current_stream().synchronize()
            if cupy.asnumpy(c).tobytes() != x.tobytes():
                bad.append(f"cupy all_reduce float32 avg n={n}")
    torch.cuda.synchronize()
    return bad


@pytest.mark.skipif(not _cuda_available(), reason="needs a CUDA GPU")
@pytest.mark.timeout(120)
@pytest.mark.parametrize("dtype", FLOATS)
def test_cuda_kernel_equals_numpy(dtype):
    """The ordered wide sum on the GPU (torch ops) gives the numpy twin's bytes."""
    import torch
    for nrows in (1, 2, 3, 4, 7):
        for n in (1, 5, 1031, 65537):
            rows = np.stack([adversarial(r, n, dtype, salt=4) for r in range(nrows)])
            for div in (1, nrows):
                want = np.empty(n, DTYPES[dtype])
                R.sum_rows_numpy(want, rows, div)
                t = torch.empty(n, dtype=getattr(torch, dtype), device="cuda")
                R.sum_rows_torch(t, _to_torch(rows).cuda(), div)
                assert _torch_bytes(t.cpu()) == want.tobytes(), (dtype, nrows, n, div, "torch cuda")


@pytest.mark.skipif(not _cuda_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("cuda_env", [{}, {"PYCCL_CUDA_COPY": "push"}, {"PYCCL_CUDA_COPY": "pull"}],
                         ids=["copy-auto", "copy-push", "copy-pull"])
def test_cuda_equals_cpu(cuda_env):
    g = HostGroup(2, ["h0", "h0"], {**ON, **cuda_env})
    try:
        assert g.run(rank_cuda_vs_cpu, [1, 7, 1031, 1 << 18 | 3]) == [[], []]
    finally:
        g.close()


# ---- torch.distributed: the backend's process group reads PYCCL_REPRODUCIBLE --------------------
def _to_torch(a):
    import torch
    return torch.from_numpy(a.view(f"i{a.itemsize}").copy()).view(getattr(torch, a.dtype.name))


def _torch_bytes(t):
    import torch
    return t.view({2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()]).numpy().tobytes()


def torch_rank_run(ctx, n):
    import torch.distributed as dist
    out = {}
    s = ctx.size
    for dtype in FLOATS:
        for op in OPS:
            rop = dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.AVG
            t = _to_torch(adversarial(ctx.rank, n, dtype))
            dist.all_reduce(t, op=rop, group=ctx.pyccl)
            out[("all_reduce", dtype, op, n)] = _torch_bytes(t)
            t = _to_torch(adversarial(ctx.rank, n, dtype, salt=1))
            dist.reduce(t, dst=n % s, op=rop, group=ctx.pyccl)
            out[("reduce", dtype, op, n)] = _torch_bytes(t) if ctx.rank == n % s else True
            inp = _to_torch(adversarial(ctx.rank, n * s, dtype, salt=2))
            o = _to_torch(np.zeros(n, DTYPES[dtype]))
            dist.reduce_scatter_tensor(o, inp, op=rop, group=ctx.pyccl)
            out[("reduce_scatter", dtype, op, n)] = _torch_bytes(o)
    return out


@pytest.mark.timeout(240)
def test_torch_backend_reads_the_variable():
    pytest.importorskip("torch")
    from torch_ranks import TorchRanks
    tr = TorchRanks(3, "tcp", env={**ON, "PYCCL_TRANSPORT": "tcp", "PYCCL_ALGO": "tree"})
    try:
        results = tr.run(torch_rank_run, 1031)
    finally:
        tr.close()
    exp = {k: v for k, v in expected(3, [1031]).items() if isinstance(k, tuple)}
    # torch's reduce leaves non-roots' tensors as they were too
    assert not differences(results, exp)
