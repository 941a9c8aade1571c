"""Reduction kernels: the C core (pyccl._native) against its numpy twin, bit for bit, and the
twin against a float64 / exact-integer reference.

Bitwise means identical bytes, with one exception: for SUM/PROD/divide the sign and payload of
a NaN that the hardware *produces* from NaN inputs is not defined by IEEE (x86 returns the first
operand's NaN, and numpy's own SIMD and scalar loops disagree), so there any NaN matches any
NaN.  MIN/MAX return one of their inputs, so they are compared strictly, NaNs included.
"""
import functools
import os
import subprocess
import sys

import ml_dtypes
import numpy as np
import pytest

from pyccl import reduce as R
from pyccl.dtypes import DTYPES, ReduceOp
from pyccl.errors import InvalidArgument

pytestmark = pytest.mark.timeout(60)

DTYPE_NAMES = list(DTYPES)  # float16 bfloat16 float32 float64 int8 uint8 int32 int64 bool
FLOATS = ("float16", "bfloat16", "float32", "float64")
INTS = ("int8", "uint8", "int32", "int64")
OPS = (ReduceOp.SUM, ReduceOp.PROD, ReduceOp.MIN, ReduceOp.MAX)
SIZES = (0, 1, 7, 1031, (1 << 20) + 3)
MODES = ("out", "dst=a", "dst=b")

needs_native = pytest.mark.skipif(
    not R.NATIVE_AVAILABLE,
    reason="pyccl._native is not built (run `pip install -e .`); native-vs-twin checks skipped")

_UINT = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}


def finfo(dt):
    return ml_dtypes.finfo(dt) if dt == DTYPES["bfloat16"] else np.finfo(dt)


@functools.lru_cache(maxsize=None)
def data(name, n, seed=0):
    """Two read-only arrays (a, b): wide-range values with negatives, ties, +-0, subnormals,
    +-Inf and NaN for floats; the full range (so SUM/PROD overflow and wrap) for integers."""
    rng = np.random.default_rng([seed, n, DTYPE_NAMES.index(name)])
    dt = DTYPES[name]
    if name == "bool":
        a, b = rng.integers(0, 2, n).astype(bool), rng.integers(0, 2, n).astype(bool)
    elif name in INTS:
        info = np.iinfo(dt)
        a = rng.integers(info.min, info.max, n, dtype=dt, endpoint=True)
        b = rng.integers(info.min, info.max, n, dtype=dt, endpoint=True)
        small = rng.random(n) < 0.25  # also values whose products do not all wrap
        b[small] = rng.integers(-3 if info.min else 0, 4, small.sum()).astype(dt)
    else:
        fi = finfo(dt)
        minexp, maxexp = int(fi.minexp), int(fi.maxexp)

        def one():
            # mantissa in +-[0.5, 1) times 2^e, e over the whole range (so sums/products
            # overflow, underflow and go subnormal) or near 0 most of the time.
            m = rng.uniform(0.5, 1.0, n) * rng.choice([-1.0, 1.0], n)
            wide = rng.random(n) < 0.3
            e = np.where(wide, rng.integers(minexp - 8, maxexp + 1, n), rng.integers(-6, 7, n))
            return np.ldexp(m, e)

        a, b = one(), one()
        tie = rng.random(n) < 0.05
        b[tie] = a[tie]
        specials = np.array([np.nan, -np.nan, np.inf, -np.inf, 0.0, -0.0,
                             float(fi.smallest_subnormal), -float(fi.smallest_subnormal),
                             float(fi.max), -float(fi.max)])
        for arr in (a, b):
            pos = rng.random(n) < 0.08
            arr[pos] = rng.choice(specials, pos.sum())
        zpos = rng.random(n) < 0.02
        a[zpos], b[zpos] = -0.0, 0.0
        with np.errstate(over="ignore"):  # float64 -> dtype rounds (may overflow to Inf)
            a, b = a.astype(dt), b.astype(dt)
    a = np.ascontiguousarray(a, dtype=dt)
    b = np.ascontiguousarray(b, dtype=dt)
    a.flags.writeable = False
    b.flags.writeable = False
    return a, b


def bits(x):
    return x.view(_UINT[x.dtype.itemsize]) if x.dtype != np.bool_ else x.view(np.uint8)


def assert_bitwise(got, want, nan_any=False, what=""):
    """Identical bytes; with nan_any, a NaN matches any NaN (hardware-defined sign/payload)."""
    gb, wb = bits(got), bits(want)
    diff = gb != wb
    if nan_any and got.dtype.kind in "fV":
        g64, w64 = got.astype(np.float64), want.astype(np.float64)
        diff &= ~(np.isnan(g64) & np.isnan(w64))
    if diff.any():
        i = np.flatnonzero(diff)[:5]
        raise AssertionError(
            f"{what}: {diff.sum()} of {got.size} elements differ, first at {i.tolist()}: "
            f"got {got[i]} ({[hex(v) for v in gb[i]]}) want {want[i]} ({[hex(v) for v in wb[i]]})")


def run(fn, name, n, op, mode):
    a, b = data(name, n)
    if mode == "out":
        dst = np.full(n, 7, dtype=DTYPES[name]) if name != "bool" else np.ones(n, bool)
        out = fn(dst, a, b, op)
        assert out is dst
    elif mode == "dst=a":
        dst = a.copy()
        fn(dst, dst, b, op)
    else:
        dst = b.copy()
        fn(dst, a, dst, op)
    return dst


# ---- native vs twin, bit for bit -----------------------------------------------------------

@needs_native
@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("op", OPS, ids=lambda o: o.name)
@pytest.mark.parametrize("name", DTYPE_NAMES)
def test_native_matches_twin(name, op, n):
    for mode in MODES:
        got = run(R.reduce_native, name, n, op, mode)
        want = run(R.reduce_numpy, name, n, op, mode)
        assert_bitwise(got, want, nan_any=op in (ReduceOp.SUM, ReduceOp.PROD),
                       what=f"{name} {op.name} n={n} {mode}")


@needs_native
def test_reduce_into_uses_native_and_avg_is_sum():
    a, b = data("float32", 1031)
    want = R.reduce_numpy(np.empty(1031, np.float32), a, b, ReduceOp.SUM)
    got = R.reduce_into(np.empty(1031, np.float32), a, b, ReduceOp.AVG)
    assert_bitwise(got, want, nan_any=True, what="AVG as SUM")
    assert R.reduce_into(np.empty(0, np.float32), a[:0], b[:0], ReduceOp.SUM).size == 0


@pytest.mark.parametrize("name", ("float16", "bfloat16"))
def test_half_rounding_edges(name):
    """Round-to-nearest-even ties, overflow to Inf, subnormals, NaN stays NaN (both paths).

    Each case runs alone (n=1: the scalar loop) and tiled to 3*13 elements (the SIMD body and
    the tail), since the C core has both for the 16-bit types."""
    dt = DTYPES[name]
    fi = finfo(dt)
    one, eps, big, tiny = 1.0, float(fi.eps), float(fi.max), float(fi.smallest_subnormal)
    cases = [  # (a, b) whose float32 sum is an exact tie or an edge
        (one, eps / 2), (one + eps, eps / 2), (-one, -eps / 2), (big, big), (-big, -big),
        (big, float(fi.max) * 2 ** -(fi.nmant + 1)), (tiny, tiny), (tiny, -tiny),
        (np.nan, 1.0), (1.0, np.nan), (np.inf, -np.inf), (np.inf, 1.0), (-0.0, -0.0),
    ]
    a = np.array([c[0] for c in cases], np.float32).astype(dt)
    b = np.array([c[1] for c in cases], np.float32).astype(dt)
    with np.errstate(all="ignore"):
        want = (a.astype(np.float64) + b.astype(np.float64)).astype(np.float32).astype(dt)
    assert np.isnan(want.astype(np.float32)[8:11]).all()
    fns = [R.reduce_numpy] + ([R.reduce_native] if R.NATIVE_AVAILABLE else [])
    for fn in fns:
        got = fn(np.empty(39, dt), np.tile(a, 3), np.tile(b, 3), ReduceOp.SUM)
        assert_bitwise(got, np.tile(want, 3), nan_any=True, what=f"{name} edges via {fn.__name__}")
        for i in range(len(cases)):
            got = fn(np.empty(1, dt), a[i:i + 1], b[i:i + 1], ReduceOp.SUM)
            assert_bitwise(got, want[i:i + 1], nan_any=True, what=f"{name} case {i} {fn.__name__}")


# ---- twin vs reference -----------------------------------------------------------------

_REF64 = {ReduceOp.SUM: np.add, ReduceOp.PROD: np.multiply,
          ReduceOp.MIN: np.minimum, ReduceOp.MAX: np.maximum}


def _wrap_int64(values):
    return np.array([((int(v) + (1 << 63)) % (1 << 64)) - (1 << 63) for v in values], np.int64)


def reference(name, a, b, op):
    """float64 for floats (rounded once to the dtype), exact arithmetic for integers."""
    dt = DTYPES[name]
    if name == "bool":
        return (a & b) if op in (ReduceOp.MIN, ReduceOp.PROD) else (a | b)
    if name == "int64":
        x, y = a.astype(object), b.astype(object)
        if op is ReduceOp.SUM:
            return _wrap_int64(x + y)
        if op is ReduceOp.PROD:
            return _wrap_int64(x * y)
        return _REF64[op](a, b)
    if name in INTS:  # exact in int64, then wrap to the width
        return _REF64[op](a.astype(np.int64), b.astype(np.int64)).astype(dt)
    with np.errstate(all="ignore"):
        return _REF64[op](a.astype(np.float64), b.astype(np.float64)).astype(dt)


@pytest.mark.parametrize("n", (1, 7, 1031))
@pytest.mark.parametrize("op", OPS, ids=lambda o: o.name)
@pytest.mark.parametrize("name", DTYPE_NAMES)
def test_twin_matches_reference(name, op, n):
    a, b = data(name, n)
    with np.errstate(all="ignore"):
        got = R.reduce_numpy(np.empty(n, DTYPES[name]), a, b, op)
        want = reference(name, a, b, op)
    if name in FLOATS:
        fi = finfo(DTYPES[name])
        np.testing.assert_allclose(got.astype(np.float64), want.astype(np.float64),
                                   rtol=float(fi.eps), atol=float(fi.smallest_subnormal),
                                   equal_nan=True, err_msg=f"{name} {op.name}")
        if op in (ReduceOp.MIN, ReduceOp.MAX):  # exact: the result is one of the inputs
            np.testing.assert_array_equal(got.astype(np.float64), want.astype(np.float64))
    else:
        np.testing.assert_array_equal(got, want, err_msg=f"{name} {op.name}")


def test_min_max_nan_and_zero_like_numpy():
    a = np.array([np.nan, 1.0, np.nan, -0.0, 0.0, 2.0], np.float32)
    b = np.array([1.0, np.nan, -np.nan, 0.0, -0.0, 2.0], np.float32)
    for op, uf in ((ReduceOp.MIN, np.minimum), (ReduceOp.MAX, np.maximum)):
        want = uf(a, b)
        for fn in [R.reduce_numpy] + ([R.reduce_native] if R.NATIVE_AVAILABLE else []):
            assert_bitwise(fn(np.empty_like(a), a, b, op), want, what=f"{op.name} {fn.__name__}")


def test_integer_wraparound():
    a = np.array([127, -128, 100], np.int8)
    b = np.array([1, -1, 3], np.int8)
    for fn in [R.reduce_numpy] + ([R.reduce_native] if R.NATIVE_AVAILABLE else []):
        np.testing.assert_array_equal(fn(np.empty_like(a), a, b, ReduceOp.SUM), [-128, 127, 103])
        np.testing.assert_array_equal(fn(np.empty_like(a), a, b, ReduceOp.PROD), [127, -128, 44])
        big = np.array([np.iinfo(np.int64).max], np.int64)
        np.testing.assert_array_equal(fn(np.empty_like(big), big, big, ReduceOp.SUM), [-2])


# ---- divide (AVG) ----------------------------------------------------------------------

DIVISORS = (1, 2, 3, 7, 8, 1000)


def divide_reference(name, x, d):
    if name in INTS:  # truncate toward zero, exact
        return np.array([(abs(int(v)) // d) * (1 if v >= 0 else -1) for v in x], DTYPES[name])
    with np.errstate(all="ignore"):
        return (x.astype(np.float64) / d).astype(DTYPES[name])


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("name", FLOATS + INTS)
def test_divide(name, n):
    a, _ = data(name, n)
    for d in DIVISORS:
        twin = R.divide_numpy(a.copy(), d)
        if R.NATIVE_AVAILABLE:
            assert_bitwise(R.divide_native(a.copy(), d), twin, nan_any=True,
                           what=f"divide {name} n={n} by {d}")
        if n > 1031:
            continue
        want = divide_reference(name, a, d)
        if name in FLOATS:
            fi = finfo(DTYPES[name])
            np.testing.assert_allclose(twin.astype(np.float64), want.astype(np.float64),
                                       rtol=float(fi.eps), atol=float(fi.smallest_subnormal),
                                       equal_nan=True, err_msg=f"{name} / {d}")
        else:
            np.testing.assert_array_equal(twin, want, err_msg=f"{name} / {d}")


def test_divide_truncates_negative_integers():
    for name in ("int8", "int32", "int64"):
        x = np.array([-7, 7, -1, 1, -128, 127, -6], DTYPES[name])
        for fn in [R.divide_numpy, R.divide_into] + ([R.divide_native] if R.NATIVE_AVAILABLE else []):
            np.testing.assert_array_equal(fn(x.copy(), 2), [-3, 3, 0, 0, -64, 63, -3], err_msg=name)
            np.testing.assert_array_equal(fn(x.copy(), 200), [0] * 7, err_msg=name)
    x = np.array([np.iinfo(np.int64).min, np.iinfo(np.int64).max], np.int64)
    for fn in [R.divide_numpy] + ([R.divide_native] if R.NATIVE_AVAILABLE else []):
        np.testing.assert_array_equal(fn(x.copy(), 3), [-(2**63) // 3 + 1, (2**63 - 1) // 3])
    u = np.array([255, 7], np.uint8)
    np.testing.assert_array_equal(R.divide_into(u.copy(), 2), [127, 3])
    np.testing.assert_array_equal(R.divide_into(u.copy(), 256), [0, 0])


def test_divide_rejects_bad_arguments():
    with pytest.raises(InvalidArgument):
        R.divide_into(np.ones(3, bool), 2)
    for bad in (0, -1, 2.0, True, 1 << 63):
        with pytest.raises(InvalidArgument):
            R.divide_into(np.ones(3, np.float32), bad)
    ro = np.ones(3, np.float32)
    ro.flags.writeable = False
    with pytest.raises(InvalidArgument):
        R.divide_into(ro, 2)


# ---- argument checks, copy, environment --------------------------------------------------

@pytest.mark.parametrize("fn", [R.reduce_into, R.reduce_numpy, R.reduce_native])
def test_reduce_rejects_bad_arguments(fn):
    f = np.ones(4, np.float32)
    with pytest.raises(InvalidArgument):
        fn(np.empty(4, np.float64), f, f, ReduceOp.SUM)          # dtype mismatch
    with pytest.raises(InvalidArgument):
        fn(np.empty(3, np.float32), f, f, ReduceOp.SUM)          # size mismatch
    with pytest.raises(InvalidArgument):
        fn(np.empty(4, np.complex64), f.astype(np.complex64), f.astype(np.complex64), ReduceOp.SUM)
    with pytest.raises(InvalidArgument):
        fn(np.empty(4, np.float32), f, f, "median")
    ro = np.ones(4, np.float32)
    ro.flags.writeable = False
    with pytest.raises(InvalidArgument):
        fn(ro, f, f, ReduceOp.SUM)
    if fn is not R.reduce_native or R.NATIVE_AVAILABLE:
        with pytest.raises(InvalidArgument):
            fn(np.empty(4, np.float32), np.ones(8, np.float32)[::2], f, ReduceOp.SUM)
    # names are accepted too
    np.testing.assert_array_equal(fn(np.empty(4, np.float32), f, f, "sum"), 2 * f)


def test_copy_into():
    src = np.arange(1031, dtype=np.int32)
    dst = np.zeros_like(src)
    assert R.copy_into(dst, src) is dst
    np.testing.assert_array_equal(dst, src)
    R.copy_into(np.empty(0, np.uint8), np.empty(0, np.uint8))
    with pytest.raises(InvalidArgument):
        R.copy_into(np.empty(3, np.int32), src)


def test_native_required_in_ci():
    """CI sets PYCCL_REQUIRE_NATIVE=1: a missing extension must fail there, not skip."""
    if os.environ.get("PYCCL_REQUIRE_NATIVE") != "1":
        pytest.skip("PYCCL_REQUIRE_NATIVE is not 1")
    assert R.NATIVE_AVAILABLE, "pyccl._native did not import; build it with `pip install -e .`"
    assert R.USE_NATIVE or os.environ.get("PYCCL_NATIVE") == "0"


def test_env_forces_numpy_twin():
    code = ("from pyccl import reduce as R, ReduceOp; import numpy as np; "
            "assert not R.USE_NATIVE; x = np.ones(3, np.float32); "
            "assert (R.reduce_into(x, x, x, ReduceOp.SUM) == 2).all(); print('ok')")
    env = dict(os.environ, PYCCL_NATIVE="0")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         timeout=30)
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr
