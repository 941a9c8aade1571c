"""torch.distributed backend "pyccl" against Gloo, on 2, 3 and 4 real processes.

Every rank runs each call twice on the same inputs: on the default group (pyccl) and on a Gloo
group over the same processes, and compares. Where Gloo refuses (int16, uint16/32/64, float8,
PREMUL_SUM, AVG on integers, uneven all_gather/all_to_all lists) the result is checked against a
numpy/torch reference instead. The 2-rank processes rendezvous through tcp://, the 3-rank ones
through file://, the 4-rank ones through env:// (MASTER_ADDR/PORT); torchrun has its own test.
"""
import os
import re
import subprocess
import sys
import textwrap
import time
from datetime import timedelta

import numpy as np
import pytest

torch = pytest.importorskip("torch")
dist = pytest.importorskip("torch.distributed")
if not dist.is_available() or not dist.is_gloo_available():
    pytest.skip("torch.distributed with Gloo is needed", allow_module_level=True)

from torch_ranks import TorchRanks

RANKS = [2, 3, 4]
INIT = {2: "tcp", 3: "file", 4: "env"}
SIZES = [0, 1, 7, 1031]
R = dist.ReduceOp
OPS = [R.SUM, R.PRODUCT, R.MIN, R.MAX, R.AVG, R.BAND, R.BOR, R.BXOR]
GLOO_DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.int8, torch.uint8,
               torch.int32, torch.int64, torch.bool]
EXTRA_DTYPES = [torch.int16, torch.uint16, torch.uint32, torch.uint64, torch.float8_e4m3fn]
COMPLEX = [torch.complex64, torch.complex128]
ALL_DTYPES = GLOO_DTYPES + EXTRA_DTYPES + COMPLEX

pytestmark = pytest.mark.timeout(120)


# ---- fixtures ------------------------------------------------------------------------------------
class _Live:
    def __init__(self, size):
        self.size = size
        self.ranks = None

    def get(self):
        if self.ranks is not None and self.ranks.broken:
            self.ranks.close()
            self.ranks = None
        if self.ranks is None:
            self.ranks = TorchRanks(self.size, INIT[self.size])
        return self.ranks


@pytest.fixture(scope="module", params=RANKS, ids=lambda n: f"{n}ranks")
def live(request):
    holder = _Live(request.param)
    yield holder
    if holder.ranks is not None:
        holder.ranks.close()


@pytest.fixture
def tr(live):
    return live.get()


def _ok(results):
    bad = [f for per_rank in results for f in per_rank]
    assert not bad, "\n".join(bad[:40]) + (f"\n... {len(bad) - 40} more" if len(bad) > 40 else "")


# ---- rank-side helpers ---------------------------------------------------------------------------
def make(rank, n, dtype, salt=0, positive=False):
    """Deterministic small-integer data, the same for a given (rank, n, dtype, salt) everywhere."""
    g = torch.Generator().manual_seed(7919 * rank + 104729 * salt + n)
    lo, hi = (1, 3) if positive else (-3, 4)
    if dtype == torch.bool:
        return torch.randint(0, 2, (n,), generator=g).bool()
    if dtype.is_complex:
        return torch.view_as_complex(torch.randint(lo, hi, (n, 2), generator=g).to(
            torch.float32 if dtype == torch.complex64 else torch.float64))
    if dtype in (torch.uint8, torch.uint16, torch.uint32, torch.uint64):
        x = torch.randint(max(lo, 0), hi + 3, (n,), generator=g)
        if dtype == torch.uint64 and n:
            big = torch.from_numpy(np.array([2 ** 63 + 11 + rank, 2 ** 64 - 1 - rank], dtype=np.uint64))
            out = x.to(torch.uint64)
            out[: min(2, n)] = big[: min(2, n)]
            return out
        return x.to(dtype)
    return torch.randint(lo, hi, (n,), generator=g).to(dtype)


def same(a, b, dtype, op=None):
    """'' if equal (exact for integers/bool, close for floating AVG/PREMUL), else a description."""
    if a.shape != b.shape:
        return f"shape {tuple(a.shape)} != {tuple(b.shape)}"
    if a.numel() == 0:
        return ""
    if dtype.is_complex:
        a, b = torch.view_as_real(a), torch.view_as_real(b)
        dtype = a.dtype
    if dtype == torch.bool:      # Gloo's bool SUM stores True as byte 2: compare truth values
        a, b = a.contiguous().view(torch.uint8) != 0, b.contiguous().view(torch.uint8) != 0
    if dtype.is_floating_point and op in (R.AVG, R.PREMUL_SUM, "close"):
        try:
            torch.testing.assert_close(a.float(), b.float(), rtol=2e-2 if a.element_size() <= 2 else 1e-5,
                                       atol=1e-2 if a.element_size() <= 2 else 1e-6)
            return ""
        except AssertionError as e:
            return str(e).splitlines()[0]
    if torch.equal(a.contiguous().view(torch.uint8), b.contiguous().view(torch.uint8)):
        return ""
    return f"{a.flatten()[:8].tolist()} != {b.flatten()[:8].tolist()}"


def np_ref(inputs, op, dtype, size):
    """Reference reduction of every rank's input (numpy, wrapping integers like the hardware)."""
    if dtype in (torch.float8_e4m3fn,):
        st = torch.stack([i.float() for i in inputs])
        out = {R.SUM: st.sum(0), R.PRODUCT: st.prod(0), R.MIN: st.min(0).values if st.numel() else st[0],
               R.MAX: st.max(0).values if st.numel() else st[0], R.AVG: st.sum(0) / size}[op]
        return out.to(dtype)
    st = np.stack([i.numpy() for i in inputs])
    npd = st.dtype
    if op == R.SUM:
        out = np.add.reduce(st, axis=0, dtype=npd)
    elif op == R.PRODUCT:
        out = np.multiply.reduce(st, axis=0, dtype=npd)
    elif op == R.MIN:
        out = st.min(0)
    elif op == R.MAX:
        out = st.max(0)
    elif op == R.AVG:
        s = st.astype(np.int64).sum(0)
        out = (np.sign(s) * (np.abs(s) // size)).astype(npd)
    else:
        fn = {R.BAND: np.bitwise_and, R.BOR: np.bitwise_or, R.BXOR: np.bitwise_xor}[op]
        out = fn.reduce(st, axis=0)
    return torch.from_numpy(np.ascontiguousarray(out)).to(dtype) if dtype != torch.uint64 else \
        torch.from_numpy(np.ascontiguousarray(out.astype(np.uint64)))


def gloo_allows(dtype, op):
    if dtype not in GLOO_DTYPES + COMPLEX:
        return False
    if dtype.is_complex:
        return op in (R.SUM, R.AVG)
    if op in (R.BAND, R.BOR, R.BXOR):
        return not dtype.is_floating_point
    if op == R.AVG:
        return dtype.is_floating_point
    return True


def pyccl_allows(dtype, op):
    """What the pyccl backend reduces beyond Gloo (see ccl/torch_backend/)."""
    if dtype.is_complex:
        return op in (R.SUM, R.AVG)
    if dtype == torch.bool:
        return op != R.AVG
    if op in (R.BAND, R.BOR, R.BXOR):
        return not dtype.is_floating_point
    return not (op == R.AVG and dtype == torch.uint64)


def expect_error(fn):
    try:
        fn()
    except (RuntimeError, ValueError, TypeError) as e:
        return e
    return None


# ---- rank-side checks (each returns a list of failure strings) ------------------------------------
def rank_allreduce(ctx):
    bad = []
    for dtype in ALL_DTYPES:
        for op in OPS:
            for n in SIZES:
                x = make(ctx.rank, n, dtype, salt=int(op.value if hasattr(op, "value") else 0),
                         positive=op == R.PRODUCT)
                mine = x.clone()
                tag = f"all_reduce {dtype} {op} n={n}"
                err = expect_error(lambda mine=mine, op=op: dist.all_reduce(mine, op=op, group=ctx.pyccl))
                if gloo_allows(dtype, op):
                    theirs = x.clone()
                    dist.all_reduce(theirs, op=op, group=ctx.gloo)
                    if err is not None:
                        bad.append(f"{tag}: pyccl raised {err!r} where Gloo works")
                    elif same(mine, theirs, dtype, op):
                        bad.append(f"{tag}: {same(mine, theirs, dtype, op)}")
                    continue
                allowed = pyccl_allows(dtype, op)
                if not allowed:
                    if err is None:
                        bad.append(f"{tag}: expected an error, pyccl accepted it")
                    continue
                if err is not None:
                    bad.append(f"{tag}: pyccl raised {err!r}")
                    continue
                ref = np_ref([make(r, n, dtype, salt=int(op.value if hasattr(op, "value") else 0),
                                   positive=op == R.PRODUCT) for r in range(ctx.size)], op, dtype, ctx.size)
                if same(mine, ref, dtype, op):
                    bad.append(f"{tag} (vs reference): {same(mine, ref, dtype, op)}")
    return bad


def rank_allreduce_layouts(ctx):
    """Non-contiguous tensors reduce their own elements (the result of reducing a contiguous copy).
    Gloo agrees for dense permuted layouts; for strided views it reduces the wrong memory (it
    ignores the strides), so those are checked against the contiguous reference only."""
    bad = []
    for dtype in (torch.float32, torch.int64, torch.bfloat16, torch.bool):
        op = R.MAX if dtype == torch.bool else R.SUM
        for name, view in (("column", lambda b: b[:, 1]), ("transposed", lambda b: b.t()),
                           ("every-other", lambda b: b.view(-1)[::2]), ("0-d", lambda b: b[0, 0])):
            base = make(ctx.rank, 7 * 3, dtype).view(7, 3).clone()
            dist.all_reduce(view(base), op=op, group=ctx.pyccl)
            ref = make(ctx.rank, 7 * 3, dtype).view(7, 3).clone()
            part = view(ref).contiguous()
            dist.all_reduce(part, op=op, group=ctx.gloo)
            view(ref).copy_(part)
            if same(base, ref, dtype):
                bad.append(f"all_reduce non-contiguous {name} {dtype}: {same(base, ref, dtype)}")
            if name == "transposed":
                theirs = make(ctx.rank, 7 * 3, dtype).view(7, 3).clone()
                dist.all_reduce(view(theirs), op=op, group=ctx.gloo)
                if same(base, theirs, dtype):
                    bad.append(f"all_reduce transposed {dtype} differs from Gloo")
    # sparse COO (SUM, like Gloo); one rank may hold no entries
    outs = []
    for group in (ctx.pyccl, ctx.gloo):
        n = 0 if ctx.rank == 1 else 3 + ctx.rank
        gen = torch.Generator().manual_seed(ctx.rank)
        idx = torch.randint(0, 6, (2, n), generator=gen)
        val = torch.randint(-3, 4, (n, 2), generator=gen).float()
        t = torch.sparse_coo_tensor(idx, val, (6, 6, 2), check_invariants=False)
        dist.all_reduce(t, group=group)
        outs.append(t)
    if not outs[0].is_coalesced() or not torch.equal(outs[0].to_dense(), outs[1].to_dense()):
        bad.append("sparse all_reduce differs from Gloo")
    # premul sum (NCCL-only in torch): sum(f * x_i); the factor may be a tensor
    for factor in (2.5, torch.tensor([0.5])):
        x = make(ctx.rank, 11, torch.float32)
        dist.all_reduce(x, op=dist._make_nccl_premul_sum(factor), group=ctx.pyccl)
        f = float(factor) if not isinstance(factor, torch.Tensor) else float(factor[0])
        ref = sum(make(r, 11, torch.float32) * f for r in range(ctx.size))
        if same(x, ref, torch.float32, R.PREMUL_SUM):
            bad.append(f"premul_sum {factor}: {same(x, ref, torch.float32, R.PREMUL_SUM)}")
    e = expect_error(lambda: dist.all_reduce(torch.ones(3, dtype=torch.int32),
                                             op=dist._make_nccl_premul_sum(2.0), group=ctx.pyccl))
    if e is None:
        bad.append("premul_sum on int32 should raise")
    # coalesced (several dtypes, one call per dtype)
    for op in (R.SUM, R.MAX):
        outs = []
        for group in (ctx.pyccl, ctx.gloo):
            ts = [make(ctx.rank, n, torch.float32, salt=n) for n in (3, 0, 5)]
            dist.all_reduce_coalesced(ts, op=op, group=group)
            outs.append(ts)
        for a, b in zip(*outs):
            if same(a, b, torch.float32):
                bad.append(f"all_reduce_coalesced {op}: {same(a, b, torch.float32)}")
    # mixed dtypes (torch's frontend refuses them; the group method takes them, like Gloo's)
    ts = [make(ctx.rank, 4, torch.float64), make(ctx.rank, 3, torch.int32), make(ctx.rank, 2, torch.float64, 1)]
    ctx.pyccl.allreduce_coalesced(ts, torch._C._distributed_c10d.AllreduceCoalescedOptions()).wait()
    for k, (t, d, s) in enumerate(((ts[0], torch.float64, 0), (ts[1], torch.int32, 0), (ts[2], torch.float64, 1))):
        ref = sum(make(r, t.numel(), d, s) for r in range(ctx.size)).to(d)
        if same(t, ref, d):
            bad.append(f"all_reduce_coalesced mixed dtypes #{k}: {same(t, ref, d)}")
    # async: Work.wait / is_completed / get_future; several in flight
    xs = [make(ctx.rank, 1000, torch.float64, salt=k) for k in range(6)]
    works = [dist.all_reduce(x, group=ctx.pyccl, async_op=True) for x in xs]
    fut = works[-1].get_future()
    chained = fut.then(lambda f: f.value()[0] * 2)
    for k, w in enumerate(works):
        w.wait()
        if not w.is_completed():
            bad.append("work not completed after wait")
        ref = sum(make(r, 1000, torch.float64, salt=k) for r in range(ctx.size))
        if same(xs[k], ref, torch.float64):
            bad.append(f"async all_reduce #{k}: {same(xs[k], ref, torch.float64)}")
    if not torch.equal(chained.wait(), xs[-1] * 2):
        bad.append("future .then result wrong")
    if not torch.equal(fut.value()[0], xs[-1]):
        bad.append("future value is not the output tensor")
    # a synchronous collective inside a future callback (runs on the group's worker thread)
    w = dist.all_reduce(torch.ones(3), group=ctx.pyccl, async_op=True)

    def callback(f):
        y = torch.ones(2)
        dist.all_reduce(y, group=ctx.pyccl)
        return y
    out = w.get_future().then(callback).wait()
    if out.tolist() != [float(ctx.size)] * 2:
        bad.append(f"collective in a future callback: {out}")
    return bad


def rank_reduce_broadcast(ctx):
    bad = []
    for dtype in (torch.float32, torch.float16, torch.bfloat16, torch.int8, torch.int64, torch.bool,
                  torch.uint16, torch.complex64, torch.float8_e4m3fn):
        for n in SIZES:
            for root in range(ctx.size):
                x = make(ctx.rank, n, dtype, salt=root)
                a = x.clone()
                dist.broadcast(a, src=root, group=ctx.pyccl)
                ref = make(root, n, dtype, salt=root)
                if same(a, ref, dtype):
                    bad.append(f"broadcast {dtype} n={n} root={root}: {same(a, ref, dtype)}")
    for dtype in GLOO_DTYPES:
        for op in (R.SUM, R.MIN, R.MAX, R.PRODUCT, R.AVG, R.BXOR):
            if not gloo_allows(dtype, op):
                continue
            for n in (0, 1, 1031):
                root = (n + ctx.size) % ctx.size
                outs = []
                for group in (ctx.pyccl, ctx.gloo):
                    x = make(ctx.rank, n, dtype, salt=3, positive=op == R.PRODUCT)
                    dist.reduce(x, dst=root, op=op, group=group)
                    outs.append(x)
                if ctx.rank == root and same(outs[0], outs[1], dtype, op):
                    bad.append(f"reduce {dtype} {op} n={n}: {same(outs[0], outs[1], dtype, op)}")
                if ctx.rank != root and not torch.equal(outs[0], make(ctx.rank, n, dtype, salt=3,
                                                                      positive=op == R.PRODUCT)):
                    bad.append(f"reduce {dtype} {op}: non-root tensor changed")
    for dtype, op in ((torch.int16, R.SUM), (torch.uint32, R.MAX), (torch.int32, R.BAND), (torch.uint64, R.MIN)):
        x = make(ctx.rank, 9, dtype)
        dist.reduce(x, dst=ctx.size - 1, op=op, group=ctx.pyccl)
        if ctx.rank == ctx.size - 1:
            ref = np_ref([make(r, 9, dtype) for r in range(ctx.size)], op, dtype, ctx.size)
            if same(x, ref, dtype):
                bad.append(f"reduce {dtype} {op}: {same(x, ref, dtype)}")
    # non-contiguous broadcast/reduce
    base = make(ctx.rank, 12, torch.float32).view(3, 4).clone()
    dist.broadcast(base[:, 2], src=1, group=ctx.pyccl)
    exp = make(ctx.rank, 12, torch.float32).view(3, 4).clone()
    exp[:, 2] = make(1, 12, torch.float32).view(3, 4)[:, 2]
    if same(base, exp, torch.float32):
        bad.append(f"broadcast non-contiguous: {same(base, exp, torch.float32)}")
    return bad


def rank_allgather(ctx):
    bad = []
    for dtype in ALL_DTYPES:
        for n in SIZES:
            x = make(ctx.rank, n, dtype)
            want = [make(r, n, dtype) for r in range(ctx.size)]
            outs = [torch.empty(n, dtype=dtype) for _ in range(ctx.size)]
            dist.all_gather(outs, x, group=ctx.pyccl)
            for r in range(ctx.size):
                if same(outs[r], want[r], dtype):
                    bad.append(f"all_gather {dtype} n={n} from {r}: {same(outs[r], want[r], dtype)}")
            big = torch.empty(n * ctx.size, dtype=dtype)
            dist.all_gather_into_tensor(big, x, group=ctx.pyccl)
            if same(big, torch.cat(want), dtype):
                bad.append(f"all_gather_into_tensor {dtype} n={n}: {same(big, torch.cat(want), dtype)}")
    # same as Gloo, including non-contiguous inputs and outputs
    res = []
    for group in (ctx.pyccl, ctx.gloo):
        base = make(ctx.rank, 12, torch.float32).view(3, 4)
        outb = torch.zeros(3, 2 * ctx.size)
        dist.all_gather([outb[:, 2 * i] for i in range(ctx.size)], base[:, 1], group=group)
        strided = torch.zeros(ctx.size * 4)
        dist.all_gather_into_tensor(strided[::2], base[1, 1:3], group=group)
        res.append((outb, strided))
    for k in range(2):
        if same(res[0][k], res[1][k], torch.float32):
            bad.append(f"all_gather layouts #{k}: {same(res[0][k], res[1][k], torch.float32)}")
    # 2-d output for all_gather_into_tensor (stacked form)
    x = make(ctx.rank, 6, torch.int32).view(2, 3)
    out = torch.empty(ctx.size, 2, 3, dtype=torch.int32)
    dist.all_gather_into_tensor(out, x, group=ctx.pyccl)
    if same(out, torch.stack([make(r, 6, torch.int32).view(2, 3) for r in range(ctx.size)]), torch.int32):
        bad.append("all_gather_into_tensor stacked output wrong")
    # uneven sizes (NCCL allows; Gloo raises)
    x = make(ctx.rank, ctx.rank + 1, torch.float64)
    outs = [torch.empty(r + 1, dtype=torch.float64) for r in range(ctx.size)]
    dist.all_gather(outs, x, group=ctx.pyccl)
    for r in range(ctx.size):
        if same(outs[r], make(r, r + 1, torch.float64), torch.float64):
            bad.append(f"uneven all_gather from {r}")
    # coalesced: outputs[r][k] = input k of rank r
    ins = [make(ctx.rank, 3, torch.float32), make(ctx.rank, 2, torch.int64).view(1, 2)]
    outl = [[torch.empty(3), torch.empty(1, 2, dtype=torch.int64)] for _ in range(ctx.size)]
    ctx.pyccl.allgather_coalesced(outl, ins, torch._C._distributed_c10d.AllgatherOptions()).wait()  # mixed dtypes
    for r in range(ctx.size):
        if same(outl[r][0], make(r, 3, torch.float32), torch.float32) or \
                same(outl[r][1], make(r, 2, torch.int64).view(1, 2), torch.int64):
            bad.append(f"all_gather_coalesced (mixed dtypes) from {r}")
    same_dt = [make(ctx.rank, 3, torch.float32, salt=1), make(ctx.rank, 4, torch.float32, salt=2).view(2, 2)]
    outs2 = [[[torch.empty(3), torch.empty(2, 2)] for _ in range(ctx.size)] for _ in range(2)]
    for group, o in zip((ctx.pyccl, ctx.gloo), outs2):
        dist.all_gather_coalesced(o, same_dt, group=group)
    for a, b in zip(outs2[0], outs2[1]):
        for x, y in zip(a, b):
            if same(x, y, torch.float32):
                bad.append("all_gather_coalesced differs from Gloo")
    from torch.distributed.distributed_c10d import _coalescing_manager
    ins = [make(ctx.rank, 4, torch.float32, salt=k) for k in range(3)]
    outs = [torch.empty(4 * ctx.size) for _ in range(3)]
    with _coalescing_manager(group=ctx.pyccl, async_ops=True) as cm:
        for o, i in zip(outs, ins):
            dist.all_gather_into_tensor(o, i, group=ctx.pyccl)
    cm.wait()
    for k in range(3):
        ref = torch.cat([make(r, 4, torch.float32, salt=k) for r in range(ctx.size)])
        if same(outs[k], ref, torch.float32):
            bad.append(f"coalesced all_gather_into_tensor #{k}: {same(outs[k], ref, torch.float32)}")
    return bad


def rank_reduce_scatter(ctx):
    bad = []
    for dtype in GLOO_DTYPES + EXTRA_DTYPES:
        for op in OPS:
            if dtype == torch.bool and op == R.AVG or dtype.is_floating_point and op in (R.BAND, R.BOR, R.BXOR):
                continue
            if dtype == torch.uint64 and op == R.AVG:
                continue
            for n in (0, 1, 13):
                x = make(ctx.rank, n * ctx.size, dtype, salt=5, positive=op == R.PRODUCT)
                mine = torch.empty(n, dtype=dtype)
                keep = x.clone()
                dist.reduce_scatter_tensor(mine, x, op=op, group=ctx.pyccl)
                if not torch.equal(keep.view(torch.uint8) if n else keep, x.view(torch.uint8) if n else x):
                    bad.append(f"reduce_scatter_tensor {dtype} {op}: input modified")
                if gloo_allows(dtype, op):
                    theirs = torch.empty(n, dtype=dtype)
                    dist.reduce_scatter_tensor(theirs, x.clone(), op=op, group=ctx.gloo)
                else:
                    full = np_ref([make(r, n * ctx.size, dtype, salt=5, positive=op == R.PRODUCT)
                                   for r in range(ctx.size)], op, dtype, ctx.size)
                    theirs = full[ctx.rank * n:(ctx.rank + 1) * n]
                if same(mine, theirs, dtype, op):
                    bad.append(f"reduce_scatter_tensor {dtype} {op} n={n}: {same(mine, theirs, dtype, op)}")
    for op in (R.SUM, R.MAX, R.AVG):
        outs = []
        for group in (ctx.pyccl, ctx.gloo):
            ins = [make(ctx.rank, 5, torch.float32, salt=k) for k in range(ctx.size)]
            out = torch.empty(5)
            dist.reduce_scatter(out, ins, op=op, group=group)
            outs.append(out)
        if same(outs[0], outs[1], torch.float32, op):
            bad.append(f"reduce_scatter list {op}: {same(outs[0], outs[1], torch.float32, op)}")
    # premul sum, coalesced
    x = make(ctx.rank, 3 * ctx.size, torch.float64)
    out = torch.empty(3, dtype=torch.float64)
    dist.reduce_scatter_tensor(out, x, op=dist._make_nccl_premul_sum(3.0), group=ctx.pyccl)
    ref = (sum(make(r, 3 * ctx.size, torch.float64) for r in range(ctx.size)) * 3.0)[3 * ctx.rank:3 * ctx.rank + 3]
    if same(out, ref, torch.float64, R.PREMUL_SUM) or not torch.equal(x, make(ctx.rank, 3 * ctx.size, torch.float64)):
        bad.append("reduce_scatter premul_sum")
    from torch.distributed.distributed_c10d import _coalescing_manager
    ins = [make(ctx.rank, 2 * ctx.size, torch.float32, salt=k) for k in range(2)]
    outs = [torch.empty(2) for _ in range(2)]
    with _coalescing_manager(group=ctx.pyccl, async_ops=False):
        for o, i in zip(outs, ins):
            dist.reduce_scatter_tensor(o, i, group=ctx.pyccl)
    for k in range(2):
        ref = sum(make(r, 2 * ctx.size, torch.float32, salt=k) for r in range(ctx.size))[2 * ctx.rank:2 * ctx.rank + 2]
        if same(outs[k], ref, torch.float32):
            bad.append(f"coalesced reduce_scatter #{k}")
    return bad


def rank_alltoall(ctx):
    bad = []
    s = ctx.size
    for dtype in ALL_DTYPES:
        for n in (0, 1, 5):
            x = make(ctx.rank, n * s, dtype)
            outs = []
            for group in (ctx.pyccl, ctx.gloo) if dtype in GLOO_DTYPES else (ctx.pyccl,):
                o = torch.empty(n * s, dtype=dtype)
                dist.all_to_all_single(o, x, group=group)
                outs.append(o)
            ref = torch.cat([make(r, n * s, dtype)[ctx.rank * n:(ctx.rank + 1) * n] for r in range(s)])
            for o in outs:
                if same(o, ref, dtype):
                    bad.append(f"all_to_all_single {dtype} n={n}: {same(o, ref, dtype)}")
    # uneven splits (rows of a 2-d tensor; the list form NCCL-style, tensors of those lengths);
    # rank i sends rows(i, j) rows to rank j: (i + j) % 3, i + j + 1, and a layout where rank 0's
    # own splits are all equal while its peers' are not
    cols = 4
    for kind, rows in (("mod 3", lambda i, j: (i + j) % 3), ("i + j + 1", lambda i, j: i + j + 1),
                       ("even on rank 0", lambda i, j: 2 if 0 in (i, j) else 2 + i + j)):
        x = torch.cat([torch.full((rows(ctx.rank, j), cols), float(100 * ctx.rank + j)) for j in range(s)])
        in_splits = [rows(ctx.rank, j) for j in range(s)]
        out_splits = [rows(j, ctx.rank) for j in range(s)]
        results = []
        for group in (ctx.pyccl, ctx.gloo):
            o = torch.empty(sum(out_splits), cols)
            dist.all_to_all_single(o, x, out_splits, in_splits, group=group)
            results.append(o)
        ref = torch.cat([torch.full((rows(j, ctx.rank), cols), float(100 * j + ctx.rank)) for j in range(s)])
        for o in results:
            if same(o, ref, torch.float32):
                bad.append(f"all_to_all_single uneven ({kind}): {same(o, ref, torch.float32)}")
        ins = [torch.full((rows(ctx.rank, j),), 100 * ctx.rank + j) for j in range(s)]
        outs = [torch.empty(rows(j, ctx.rank), dtype=torch.int64) for j in range(s)]
        dist.all_to_all(outs, ins, group=ctx.pyccl)
        for j, o in enumerate(outs):
            if not torch.equal(o, torch.full((rows(j, ctx.rank),), 100 * j + ctx.rank)):
                bad.append(f"all_to_all list uneven ({kind}) from {j}: {o.tolist()}")
    # list form, even (vs Gloo)
    results = []
    for group in (ctx.pyccl, ctx.gloo):
        ins = [make(ctx.rank, 3, torch.int64, salt=j) for j in range(s)]
        outs = [torch.empty(3, dtype=torch.int64) for _ in range(s)]
        dist.all_to_all(outs, ins, group=group)
        results.append(outs)
    for a, b in zip(*results):
        if same(a, b, torch.int64):
            bad.append("all_to_all list differs from Gloo")
    return bad


def rank_gather_scatter(ctx):
    bad = []
    s = ctx.size
    for dtype in (torch.float32, torch.bfloat16, torch.int16, torch.bool, torch.complex128):
        for n in (0, 1, 7):
            for root in range(s):
                x = make(ctx.rank, n, dtype, salt=root)
                outs = [torch.empty(n, dtype=dtype) for _ in range(s)] if ctx.rank == root else None
                dist.gather(x, outs, dst=root, group=ctx.pyccl)
                if ctx.rank == root:
                    for r in range(s):
                        if same(outs[r], make(r, n, dtype, salt=root), dtype):
                            bad.append(f"gather {dtype} n={n} root={root} from {r}")
                o = torch.empty(n, dtype=dtype)
                ins = [make(r, n, dtype, salt=99) for r in range(s)] if ctx.rank == root else None
                dist.scatter(o, ins, src=root, group=ctx.pyccl)
                if same(o, make(ctx.rank, n, dtype, salt=99), dtype):
                    bad.append(f"scatter {dtype} n={n} root={root}")
    res = []
    for group in (ctx.pyccl, ctx.gloo):
        x = make(ctx.rank, 6, torch.float32).view(2, 3)
        outs = [torch.zeros(3, 2).t() for _ in range(s)] if ctx.rank == 0 else None
        dist.gather(x[:, 1], [o[:, 0] for o in outs] if outs else None, dst=0, group=group)
        res.append(outs)
    if ctx.rank == 0:
        for a, b in zip(*res):
            if same(a, b, torch.float32):
                bad.append("gather non-contiguous differs from Gloo")
    return bad


def rank_p2p(ctx):
    bad = []
    s, me = ctx.size, ctx.rank
    nxt, prv = (me + 1) % s, (me - 1) % s
    # ring exchange of a large message with batch_isend_irecv and with plain isend/irecv
    for n in (0, 1, 3_000_001):
        for dtype in (torch.float32, torch.int16, torch.bool):
            x = make(me, n, dtype) if n < 100 else torch.full((n,), me % 2 == 0).to(dtype)
            y = torch.empty(n, dtype=dtype)
            reqs = dist.batch_isend_irecv([dist.P2POp(dist.isend, x, nxt, group=ctx.pyccl),
                                           dist.P2POp(dist.irecv, y, prv, group=ctx.pyccl)])
            for r in reqs:
                r.wait()
            want = make(prv, n, dtype) if n < 100 else torch.full((n,), prv % 2 == 0).to(dtype)
            if same(y, want, dtype):
                bad.append(f"batch_isend_irecv {dtype} n={n}")
            y2 = torch.empty(n, dtype=dtype)
            w = dist.isend(x, nxt, group=ctx.pyccl)
            dist.recv(y2, prv, group=ctx.pyccl)
            w.wait()
            if same(y2, want, dtype):
                bad.append(f"isend/recv {dtype} n={n}")
    # tags: receive out of send order
    if me == 0:
        a, b = torch.zeros(2), torch.zeros(3)
        wb = dist.irecv(b, 1, group=ctx.pyccl, tag=7)
        wa = dist.irecv(a, 1, group=ctx.pyccl, tag=5)
        wa.wait()
        wb.wait()
        if a.tolist() != [5.0, 5.0] or b.tolist() != [7.0] * 3:
            bad.append(f"tags: {a.tolist()} {b.tolist()}")
    elif me == 1:
        dist.send(torch.full((2,), 5.0), 0, group=ctx.pyccl, tag=5)
        dist.send(torch.full((3,), 7.0), 0, group=ctx.pyccl, tag=7)
    # receive from any source (src=None) returns the sender
    if me == 0:
        got = set()
        for _ in range(s - 1):
            t = torch.zeros(4, dtype=torch.int64)
            src = dist.recv(t, group=ctx.pyccl, tag=11)
            if t.tolist() != [src] * 4:
                bad.append(f"anysource: from {src} got {t.tolist()}")
            got.add(src)
        if got != set(range(1, s)):
            bad.append(f"anysource senders {got}")
    else:
        dist.send(torch.full((4,), me, dtype=torch.int64), 0, group=ctx.pyccl, tag=11)
    # to self with isend/irecv; non-contiguous receive
    t = torch.zeros(3)
    w1 = dist.irecv(t, me, group=ctx.pyccl)
    w2 = dist.isend(torch.arange(3.0) + me, me, group=ctx.pyccl)
    w1.wait()
    w2.wait()
    if t.tolist() != (torch.arange(3.0) + me).tolist():
        bad.append("send to self")
    if s >= 2 and me < 2:
        base = torch.zeros(4, 3)
        if me == 0:
            dist.recv(base[:, 1], 1, group=ctx.pyccl)
            if base[:, 1].tolist() != [1.0, 2.0, 3.0, 4.0] or base.sum() != 10:
                bad.append(f"recv into non-contiguous: {base}")
        else:
            src = torch.tensor([[1.0, 0], [2, 0], [3, 0], [4, 0]])
            dist.send(src[:, 0], 0, group=ctx.pyccl)
    # object p2p
    if me == 0:
        objs = [None, None]
        dist.recv_object_list(objs, src=s - 1, group=ctx.pyccl)
        if objs != [{"from": s - 1}, "x" * 1000]:
            bad.append(f"recv_object_list {objs!r:.80}")
    elif me == s - 1:
        dist.send_object_list([{"from": me}, "x" * 1000], dst=0, group=ctx.pyccl)
    dist.barrier(group=ctx.pyccl)
    return bad


def rank_objects_groups(ctx):
    bad = []
    s, me = ctx.size, ctx.rank
    objs = [None] * s
    dist.all_gather_object(objs, {"rank": me, "x": list(range(me))}, group=ctx.pyccl)
    if objs != [{"rank": r, "x": list(range(r))} for r in range(s)]:
        bad.append(f"all_gather_object {objs!r:.100}")
    lst = [f"hello-{me}", me, None] if me == 1 else [None, None, None]
    dist.broadcast_object_list(lst, src=1, group=ctx.pyccl)
    if lst != ["hello-1", 1, None]:
        bad.append(f"broadcast_object_list {lst}")
    g = [None] * s if me == 0 else None
    dist.gather_object(("g", me), g, dst=0, group=ctx.pyccl)
    if me == 0 and g != [("g", r) for r in range(s)]:
        bad.append(f"gather_object {g}")
    out = [None]
    dist.scatter_object_list(out, [{"to": r} for r in range(s)] if me == 0 else None, src=0, group=ctx.pyccl)
    if out != [{"to": me}]:
        bad.append(f"scatter_object_list {out}")
    # new_group over a subset (non-members get NON_GROUP_MEMBER), and new_subgroups
    sub = dist.new_group(ranks=[0, s - 1], backend="pyccl")
    if me in (0, s - 1):
        t = torch.tensor([float(me)])
        dist.all_reduce(t, group=sub)
        if t.item() != float(s - 1):
            bad.append(f"new_group all_reduce {t}")
        if dist.get_backend(sub) != "pyccl" or sub.size() != 2:
            bad.append(f"new_group backend/size: {dist.get_backend(sub)} {sub.size()}")
        x = torch.zeros(2)
        if me == 0:
            dist.send(torch.ones(2), s - 1, group=sub)             # global rank
        else:
            dist.recv(x, 0, group=sub)
            if x.tolist() != [1.0, 1.0]:
                bad.append("new_group send/recv")
    elif sub != dist.GroupMember.NON_GROUP_MEMBER:
        bad.append("non-member got a group")
    cur, subs = dist.new_subgroups(group_size=1 if s == 3 else 2, backend="pyccl")
    t = torch.tensor([1.0])
    dist.all_reduce(t, group=cur)
    if t.item() != float(cur.size()):
        bad.append(f"new_subgroups all_reduce {t.item()} vs {cur.size()}")
    for g_ in subs:
        dist.destroy_process_group(g_)
    if me in (0, s - 1):
        dist.destroy_process_group(sub)
    # split_group: torch only allows it on an accelerator-bound default group; Gloo and pyccl alike
    e = expect_error(lambda: dist.split_group(split_ranks=[[0], list(range(1, s))]))
    if e is None:
        bad.append("split_group unexpectedly worked on CPU (check Gloo too)")
    # a tensor on another device (no CUDA here: meta) is refused with a clear message
    e = expect_error(lambda: dist.all_reduce(torch.empty(3, device="meta"), group=ctx.pyccl))
    if e is None or "CPU tensors" not in str(e):
        bad.append(f"non-CPU tensor: {e!r}")
    dist.barrier(group=ctx.pyccl)
    # monitored barrier (dist.monitored_barrier refuses non-Gloo groups inside torch)
    pg = ctx.pyccl
    pg.monitored_barrier(timedelta(seconds=20))
    e = expect_error(lambda: dist.monitored_barrier(group=ctx.pyccl))
    if e is None:
        bad.append("dist.monitored_barrier accepted a non-Gloo group (torch changed?)")
    return bad


def rank_mismatch(ctx, kind, shm_collectives):
    """Sizes that differ across ranks: every rank raises a clear error quickly."""
    old = os.environ.get("PYCCL_SHM_COLLECTIVES")
    os.environ["PYCCL_SHM_COLLECTIVES"] = "1" if shm_collectives else "0"
    try:
        g = dist.new_group(backend="pyccl", timeout=timedelta(seconds=30))
    finally:
        if old is None:
            del os.environ["PYCCL_SHM_COLLECTIVES"]
        else:
            os.environ["PYCCL_SHM_COLLECTIVES"] = old
    me, s = ctx.rank, ctx.size
    t0 = time.monotonic()
    try:
        if kind == "all_reduce":
            dist.all_reduce(torch.ones(1000 + me), group=g)
        elif kind == "broadcast":
            dist.broadcast(torch.ones(10 + (me == s - 1)), src=0, group=g)
        elif kind == "all_gather_into_tensor":
            dist.all_gather_into_tensor(torch.empty((5 + me) * s), torch.ones(5 + me), group=g)
        elif kind == "all_to_all_single":
            n = 2 * s + (me == 0) * s
            dist.all_to_all_single(torch.empty(n), torch.ones(n), group=g)
        elif kind == "async":
            dist.all_reduce(torch.ones(100 + me), group=g, async_op=True).wait()
        err = None
    except Exception as e:  # noqa: BLE001 - inspected below
        err = e
    took = time.monotonic() - t0
    # a rank whose part succeeded (e.g. a broadcast root) learns on its next call on the group
    t1 = time.monotonic()
    err2 = expect_error(lambda: dist.all_reduce(torch.ones(2), group=g))
    took2 = time.monotonic() - t1
    bad = []
    if err is None and err2 is None:
        bad.append(f"{kind}: mismatched sizes were not detected on rank {me}")
    if took > 15 or took2 > 15:
        bad.append(f"{kind}: took {took:.1f}s + {took2:.1f}s to fail")
    text = str(err if err is not None else err2)
    if "mismatch" not in text:
        bad.append(f"{kind}: unclear error on rank {me}: {text}")
    objs = [None] * s
    dist.all_gather_object(objs, err is not None, group=ctx.pyccl)
    if not any(objs):
        bad.append(f"{kind}: no rank saw the mismatch on the call itself")
    dist.destroy_process_group(g)
    return bad


def rank_p2p_mismatch(ctx):
    bad = []
    g = dist.new_group(backend="pyccl", timeout=timedelta(seconds=30))
    if ctx.rank == 0:
        e = expect_error(lambda: dist.recv(torch.zeros(5), 1, group=g))
        if e is None or "size mismatch" not in str(e):
            bad.append(f"p2p size mismatch: {e!r}")
        t = torch.zeros(2)
        dist.recv(t, 1, group=g)                 # the pair is still usable afterwards
        if t.tolist() != [3.0, 3.0]:
            bad.append("p2p after mismatch")
    elif ctx.rank == 1:
        dist.send(torch.zeros(4), 0, group=g)
        dist.send(torch.full((2,), 3.0), 0, group=g)
    dist.barrier(group=g)
    dist.destroy_process_group(g)
    return bad


TORCH_TIMEOUT_RE = " (Timed out|closed|timeout) "     # torch's DistributedTest (test_barrier_timeout_*)


def _torch_words(what, e, bad):
    """A timeout's message carries torch's words, which its tests and users' log searches match."""
    if e is not None and not re.search(TORCH_TIMEOUT_RE, str(e)):
        bad.append(f"{what}: message does not match {TORCH_TIMEOUT_RE!r}: {e}")


def rank_timeouts(ctx):
    bad = []
    me = ctx.rank
    g = dist.new_group(backend="pyccl", timeout=timedelta(seconds=2))
    # work.wait(timeout) on a receive that is not satisfied yet; it completes later
    if me == 0:
        t = torch.zeros(3)
        w = dist.irecv(t, 1, group=g)
        t0 = time.monotonic()
        e = expect_error(lambda: w.wait(timedelta(seconds=0.3)))
        if e is None or time.monotonic() - t0 > 1.5:
            bad.append(f"work.wait(timeout) did not time out: {e!r}")
        _torch_words("work.wait(timeout)", e, bad)
    dist.barrier(group=ctx.pyccl)
    if me == 1:
        dist.send(torch.ones(3), 0, group=g)
    if me == 0:
        w.wait()
        if t.tolist() != [1.0] * 3:
            bad.append("late receive")
    # group timeout on a receive nobody answers
    if me == 0:
        t0 = time.monotonic()
        e = expect_error(lambda: dist.recv(torch.zeros(1), 1, group=g))
        took = time.monotonic() - t0
        if e is None or "2s" not in str(e) or not 1.5 < took < 6:
            bad.append(f"recv timeout: {e!r} after {took:.1f}s")
        _torch_words("recv timeout", e, bad)
    # group timeout on a collective only rank 0 enters
    if me == 0:
        t0 = time.monotonic()
        e = expect_error(lambda: dist.all_reduce(torch.ones(4), group=g))
        took = time.monotonic() - t0
        if e is None or "timed out" not in str(e) or not 1.5 < took < 8:
            bad.append(f"collective timeout: {e!r} after {took:.1f}s")
        _torch_words("collective timeout", e, bad)
    dist.barrier(group=ctx.pyccl)
    # torch's test_barrier_timeout_full_group: a barrier only rank 0 enters, on a fresh group
    g2 = dist.new_group(backend="pyccl", timeout=timedelta(seconds=1))
    if me == 0:
        t0 = time.monotonic()
        e = expect_error(lambda: dist.barrier(group=g2))
        if e is None or not 0.8 < time.monotonic() - t0 < 8:
            bad.append(f"barrier timeout: {e!r}")
        _torch_words("barrier timeout", e, bad)
    dist.barrier(group=ctx.pyccl)
    dist.destroy_process_group(g2)
    if me == 0:
        # monitored barrier that the other ranks never enter: rank 0 names them all
        e = expect_error(lambda: g.monitored_barrier(timedelta(seconds=1), wait_all_ranks=True))
        want = ", ".join(str(r) for r in range(1, ctx.size))
        if e is None or f"Ranks {want} failed to pass monitoredBarrier" not in str(e):
            bad.append(f"monitored_barrier: {e!r}")
        _torch_words("monitored_barrier", e, bad)
    dist.barrier(group=ctx.pyccl)
    dist.destroy_process_group(g)
    return bad


class _SparseNet(torch.nn.Module):
    def __init__(self, emb, mlp):
        super().__init__()
        self.emb, self.mlp = emb, mlp

    def forward(self, ids):
        return self.mlp(self.emb(ids).sum(1))


def rank_ddp(ctx):
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
    bad = []
    cases = [("default", dict(bucket_cap_mb=25)), ("many buckets", dict(bucket_cap_mb=0.001)),
             ("fp16 hook", dict(hook=default_hooks.fp16_compress_hook)),
             ("sparse embedding", dict(sparse=True))]
    for name, kw in cases:
        a = _train_any(ctx.pyccl, ctx.rank, **kw)
        b = _train_any(ctx.gloo, ctx.rank, **kw)
        # fp16 compression: pyccl adds float16 in float32 and rounds once, Gloo rounds after
        # every addition, so from 3 ranks on the gradients differ in the last fp16 bit
        tol = dict(rtol=1e-3, atol=1e-3) if "fp16" in name else dict(rtol=1e-5, atol=1e-6)
        for k, (x, y) in enumerate(zip(a, b)):
            if not torch.allclose(x, y, **tol):
                bad.append(f"DDP {name}: param {k} differs by {(x - y).abs().max().item():.3g}")
        objs = [None] * ctx.size
        dist.all_gather_object(objs, [p.sum().item() for p in a], group=ctx.pyccl)
        if any(o != objs[0] for o in objs):
            bad.append(f"DDP {name}: replicas diverged")
    return bad


def _train_any(group, rank, bucket_cap_mb=25, hook=None, sparse=False, steps=5):
    import torch.nn as nn
    from torch.nn.parallel import DistributedDataParallel as DDP
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))
    model = _SparseNet(nn.Embedding(50, 16, sparse=True), mlp) if sparse else mlp
    ddp = DDP(model, process_group=group, bucket_cap_mb=bucket_cap_mb)
    if hook is not None:
        ddp.register_comm_hook(group, hook)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.1, momentum=0.0 if sparse else 0.9)
    g = torch.Generator().manual_seed(100 + rank)
    for _ in range(steps):
        x = torch.randint(0, 50, (8, 3), generator=g) if sparse else torch.randn(8, 16, generator=g)
        y = torch.randn(8, 4, generator=g)
        opt.zero_grad()
        ((ddp(x) - y) ** 2).mean().backward()
        opt.step()
    return [p.detach().clone() for p in model.parameters()]


def rank_fsdp(ctx):
    """FSDP2 (fully_shard) and FSDP1 (FullyShardedDataParallel) on CPU: same parameters as on Gloo."""
    import torch.nn as nn
    from torch.distributed.device_mesh import DeviceMesh
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP, fully_shard
    bad = []
    for flavour in ("fsdp2", "fsdp1"):
        results = []
        for group in (ctx.pyccl, ctx.gloo):
            torch.manual_seed(0)
            model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))
            if flavour == "fsdp2":
                mesh = DeviceMesh.from_group(group, "cpu")
                for layer in model:
                    if isinstance(layer, nn.Linear):
                        fully_shard(layer, mesh=mesh)
                fully_shard(model, mesh=mesh)
                wrapped = model
            else:
                wrapped = FSDP(model, process_group=group, device_id=torch.device("cpu"), use_orig_params=True)
            opt = torch.optim.SGD(wrapped.parameters(), lr=0.1)
            g = torch.Generator().manual_seed(100 + ctx.rank)
            for _ in range(4):
                x, y = torch.randn(8, 16, generator=g), torch.randn(8, 4, generator=g)
                opt.zero_grad()
                ((wrapped(x) - y) ** 2).mean().backward()
                opt.step()
            if flavour == "fsdp2":
                results.append([p.full_tensor().detach().clone() for p in model.parameters()])
            else:
                with FSDP.summon_full_params(wrapped):
                    results.append([p.detach().clone() for p in wrapped.parameters()])
        for k, (x, y) in enumerate(zip(*results)):
            if not torch.allclose(x, y, rtol=1e-5, atol=1e-6):
                bad.append(f"{flavour} param {k} differs by {(x - y).abs().max().item():.3g}")
    return bad


def _resizable(name, tensors, bad):
    """FSDP frees and re-grows parameter storage with resize_: it must still work after pyccl
    touched the tensors (torch 2.13's Tensor.numpy() would have pinned their storage)."""
    for k, t in enumerate(tensors):
        keep = t.clone()
        n = t.untyped_storage().nbytes()
        try:
            t.untyped_storage().resize_(0)
            t.untyped_storage().resize_(n)
            t.copy_(keep)
            shape = t.shape
            t.resize_(t.numel() + 5)
            t.resize_(shape)
        except RuntimeError as e:
            bad.append(f"{name}: tensor {k} cannot be resized after the call: {e}")


def rank_resize_after_every_call(ctx):
    bad = []
    me, n = ctx.rank, ctx.size
    peer_to, peer_from = (me + 1) % n, (me - 1) % n

    def fresh(k=6, dtype=torch.float32):
        return torch.arange(k, dtype=dtype) + me

    cases = []
    t = fresh()
    dist.all_reduce(t)
    cases.append(("all_reduce", [t]))
    t = fresh(dtype=torch.bfloat16)
    dist.all_reduce(t)
    cases.append(("all_reduce bfloat16", [t]))
    t = fresh()
    dist.all_reduce(t, async_op=True).wait()
    cases.append(("all_reduce async", [t]))
    ts = [fresh(), fresh(3)]
    dist.all_reduce_coalesced(ts)
    cases.append(("all_reduce_coalesced", ts))
    t = fresh()
    dist.reduce(t, 0)
    cases.append(("reduce", [t]))
    t = fresh()
    dist.broadcast(t, 0)
    cases.append(("broadcast", [t]))
    i, outs = fresh(), [torch.empty(6) for _ in range(n)]
    dist.all_gather(outs, i)
    cases.append(("all_gather", [i] + outs))
    i, o = fresh(), torch.empty(6 * n)
    dist.all_gather_into_tensor(o, i)
    cases.append(("all_gather_into_tensor", [i, o]))
    o, ins = torch.empty(6), [fresh() for _ in range(n)]
    dist.reduce_scatter(o, ins)
    cases.append(("reduce_scatter", [o] + ins))
    o, i = torch.empty(6), fresh(6 * n)
    dist.reduce_scatter_tensor(o, i)
    cases.append(("reduce_scatter_tensor", [o, i]))
    o, i = torch.empty(2 * n), fresh(2 * n)
    dist.all_to_all_single(o, i)
    cases.append(("all_to_all_single", [o, i]))
    outs, ins = [torch.empty(2) for _ in range(n)], [fresh(2) for _ in range(n)]
    dist.all_to_all(outs, ins)
    cases.append(("all_to_all", outs + ins))
    i = fresh()
    outs = [torch.empty(6) for _ in range(n)] if me == 0 else None
    dist.gather(i, outs, dst=0)
    cases.append(("gather", [i] + (outs or [])))
    o = torch.empty(6)
    ins = [fresh() for _ in range(n)] if me == 0 else None
    dist.scatter(o, ins, src=0)
    cases.append(("scatter", [o] + (ins or [])))
    s, r = fresh(), torch.empty(6)
    ws = [dist.isend(s, peer_to), dist.irecv(r, peer_from)]
    for w in ws:
        w.wait()
    cases.append(("isend/irecv", [s, r]))
    s, r = fresh(), torch.empty(6)
    for w in dist.batch_isend_irecv([dist.P2POp(dist.isend, s, peer_to), dist.P2POp(dist.irecv, r, peer_from)]):
        w.wait()
    cases.append(("batch_isend_irecv", [s, r]))
    if me == 0:
        s = fresh()
        dist.send(s, 1)
        cases.append(("send", [s]))
    elif me == 1:
        r = torch.empty(6)
        dist.recv(r, 0)
        cases.append(("recv", [r]))
    dist.barrier()
    for name, ts in cases:
        _resizable(name, ts, bad)
    t = fresh()                                  # and the group still works on a re-grown tensor
    dist.all_reduce(t)
    want = sum(torch.arange(6, dtype=torch.float32) + r for r in range(n))
    if not torch.equal(t, want):
        bad.append(f"all_reduce after the resizes: {t.tolist()} != {want.tolist()}")
    return bad


def rank_all_to_all_tensor_splits(ctx):
    """pyccl.torch_backend.all_to_all_single takes split sizes as tensors (on CPU: read as ints)."""
    from pyccl.torch_backend import all_to_all_single
    me, n = ctx.rank, ctx.size
    send = torch.tensor([(me + r) % 3 for r in range(n)])
    recv = torch.tensor([(q + me) % 3 for q in range(n)])
    inp = torch.arange(int(send.sum()) * 2, dtype=torch.float32).view(-1, 2) + 100 * me
    out, ref = torch.empty(int(recv.sum()), 2), torch.empty(int(recv.sum()), 2)
    all_to_all_single(out, inp, recv, send)
    dist.all_to_all_single(ref, inp, recv.tolist(), send.tolist(), group=ctx.gloo)
    return [] if torch.equal(out, ref) else [f"tensor splits: {out.tolist()} != {ref.tolist()}"]


# ---- tests ---------------------------------------------------------------------------------------
def test_all_to_all_single_with_tensor_splits(tr):
    _ok(tr.run(rank_all_to_all_tensor_splits))


def test_storage_stays_resizable_after_every_call(tr):
    _ok(tr.run(rank_resize_after_every_call))


def test_all_reduce_every_dtype_and_op(tr):
    _ok(tr.run(rank_allreduce))


def test_all_reduce_layouts_premul_coalesced_async(tr):
    _ok(tr.run(rank_allreduce_layouts))


def test_reduce_and_broadcast(tr):
    _ok(tr.run(rank_reduce_broadcast))


def test_all_gather_variants(tr):
    _ok(tr.run(rank_allgather))


def test_reduce_scatter_variants(tr):
    _ok(tr.run(rank_reduce_scatter))


def test_all_to_all_variants(tr):
    _ok(tr.run(rank_alltoall))


def test_gather_scatter(tr):
    _ok(tr.run(rank_gather_scatter))


def test_point_to_point(tr):
    _ok(tr.run(rank_p2p))


def test_object_collectives_groups_monitored_barrier(tr):
    _ok(tr.run(rank_objects_groups))


MISMATCH_KINDS = ["all_reduce", "broadcast", "all_gather_into_tensor", "all_to_all_single", "async"]


@pytest.mark.parametrize("kind", MISMATCH_KINDS)
def test_mismatched_sizes_fail_fast(tr, kind):
    """Over the transports (the executor path) the byte counts are checked on the wire."""
    _ok(tr.run(rank_mismatch, kind, False, timeout=60))


@pytest.mark.parametrize("kind", MISMATCH_KINDS)
def test_mismatched_sizes_fail_fast_shm_collectives(tr, kind):
    _ok(tr.run(rank_mismatch, kind, True, timeout=60))


def test_p2p_size_mismatch(tr):
    _ok(tr.run(rank_p2p_mismatch))


def test_timeouts(tr):
    _ok(tr.run(rank_timeouts, timeout=60))


def test_ddp_matches_gloo(tr):
    _ok(tr.run(rank_ddp))


def test_fsdp_matches_gloo(tr):
    _ok(tr.run(rank_fsdp))


_TORCHRUN_SCRIPT = textwrap.dedent("""
    import os, torch, torch.distributed as dist
    import pyccl.torch_backend
    dist.init_process_group("pyccl")
    assert dist.get_backend() == "pyccl", dist.get_backend()
    r, n = dist.get_rank(), dist.get_world_size()
    t = torch.full((5,), float(r))
    dist.all_reduce(t)
    assert t.tolist() == [float(sum(range(n)))] * 5, t
    objs = [None] * n
    dist.all_gather_object(objs, r)
    assert objs == list(range(n)), objs
    dist.barrier()
    dist.destroy_process_group()
    print("TORCHRUN-OK", r, flush=True)
""")


@pytest.mark.timeout(120)
def test_init_under_torchrun(tmp_path):
    script = tmp_path / "prog.py"
    script.write_text(_TORCHRUN_SCRIPT)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    t0 = time.monotonic()
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                        str(script)], capture_output=True, text=True, timeout=110, env=env)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert p.stdout.count("TORCHRUN-OK") == 2, p.stdout
    assert time.monotonic() - t0 < 100


def test_register_is_idempotent():
    import pyccl.torch_backend as tb
    tb.register()
    tb.register()
    assert "PYCCL" in dist.Backend._plugins
    assert dist.Backend("pyccl") == "pyccl"
    assert "cpu" in dist.Backend.backend_capability["pyccl"]
    # registering does not steal the default device backends
    assert dist.Backend.default_device_backend_map["cpu"] == "gloo"


def test_torch_plugin_entry_point(tmp_path):
    """`import torch` loads the `torch.backends` entry point (what pyproject.toml declares), and
    "pyccl" is registered before any pyccl import by the user."""
    import pyccl
    target = "pyccl:_torch_autoload" if hasattr(pyccl, "_torch_autoload") else "pyccl.torch_backend:_autoload"
    info = tmp_path / "pyccl_entry_point_test-0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: pyccl-entry-point-test\nVersion: 0\n")
    (info / "entry_points.txt").write_text(f"[torch.backends]\npyccl = {target}\n")
    code = "import torch, torch.distributed as dist; print('PYCCL' in dist.Backend._plugins)"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")]))
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=100, env=env)
    assert p.returncode == 0 and p.stdout.strip() == "True", p.stdout + p.stderr
