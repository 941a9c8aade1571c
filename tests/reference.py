"""Deterministic inputs and float64 numpy references for the collective tests.

Every rank can rebuild every other rank's input from the seed, so each rank checks its
own result against the reference without moving any extra data.
"""
import numpy as np

from pyccl.dtypes import DTYPES

FLOAT_EPS = {"float16": 2.0 ** -10, "bfloat16": 2.0 ** -7, "float32": 2.0 ** -23, "float64": 2.0 ** -52}
REDUCE_DTYPES = ["float16", "bfloat16", "float32", "float64", "int8", "uint8", "int32", "int64"]
OPS = ["sum", "prod", "min", "max", "avg"]


def reduce_cases(ops):
    """(dtype, op) pairs to check: every reduce dtype with every op, bool with min/max only."""
    for dtype in REDUCE_DTYPES + ["bool"]:
        for op in ops:
            if dtype == "bool" and op not in ("min", "max"):
                continue
            yield dtype, op


def make(rank, count, dtype, op="sum", salt=0):
    """Input of `rank`: small values so sums and products stay exact enough in every dtype."""
    rng = np.random.default_rng([rank, count, salt, len(dtype), ord(dtype[0]), ord(dtype[-1])])
    if dtype == "bool":
        return rng.integers(0, 2, count).astype(bool)
    if op == "prod":
        vals = rng.choice([1, 1, 1, 2, -1] if dtype not in ("uint8",) else [1, 1, 2], count)
        if dtype in FLOAT_EPS:
            vals = vals * rng.choice([1.0, 0.5, 1.5], count)
    elif dtype in FLOAT_EPS:
        vals = rng.uniform(-4, 4, count)
    elif dtype == "uint8":
        vals = rng.integers(0, 30, count)
    else:
        vals = rng.integers(-30, 30, count)
    return np.asarray(vals).astype(DTYPES[dtype])


def reduce_ref(inputs, op, dtype):
    """float64 reference of reducing `inputs` (one per rank) with op, cast back to dtype."""
    stack = np.stack([x.astype(np.float64) for x in inputs]) if inputs[0].size else np.zeros((len(inputs), 0))
    if op in ("sum", "avg"):
        out = stack.sum(0)
        if op == "avg":
            if dtype not in FLOAT_EPS and dtype != "bool":
                # integers: the sum wraps in the dtype first (as in NCCL), then truncates
                out = out.astype(np.int64).astype(DTYPES[dtype]).astype(np.float64)
                out = np.trunc(out / len(inputs))
            else:
                out = out / len(inputs)
    elif op == "prod":
        out = stack.prod(0)
    elif op == "min":
        out = stack.min(0)
    else:
        out = stack.max(0)
    if dtype == "bool":
        return out.astype(bool)
    if dtype not in FLOAT_EPS:
        return out.astype(np.int64).astype(DTYPES[dtype])    # wraps like the integer kernels
    return out


def mismatch(got, inputs, op, dtype):
    """'' when `got` matches the reference within the dtype's rounding, else a description."""
    want = reduce_ref(inputs, op, dtype)
    got = np.asarray(got)
    if got.shape != want.shape:
        return f"shape {got.shape} != {want.shape}"
    if dtype not in FLOAT_EPS:
        bad = np.flatnonzero(got != want)
    else:
        g = got.astype(np.float64)
        scale = np.abs(np.stack([x.astype(np.float64) for x in inputs])).sum(0) if got.size else 0
        if op == "prod":
            scale = np.abs(want)
        tol = FLOAT_EPS[dtype] * (len(inputs) + 1) * (scale + 1e-30) * 2
        bad = np.flatnonzero(np.abs(g - want) > tol)
    if bad.size:
        i = bad[0]
        return f"{bad.size} wrong, first at [{i}]: got {got[i]!r}, want {want[i]!r}"
    return ""
