"""Element-wise reduction kernels: the hot loop of every reducing collective.

The executor calls :func:`reduce_into` on each received chunk (``dst = a op b``) and
:func:`divide_into` once at the end of an AVG.  Both run the C core ``pyccl._native``
(native/reduce.c, built by cffi; the call releases the GIL so other threads keep moving data)
when it is built, else their pure-numpy twins :func:`reduce_numpy` / :func:`divide_numpy`,
which give bit-identical results (NaN payloads aside) and are what the tests check the C
against.

Semantics, shared by both:

- integers wrap around (two's complement), like numpy;
- float16 and bfloat16 are computed in float32 and rounded back to nearest-even;
- MIN/MAX on floats propagate NaN like ``np.minimum``/``np.maximum`` on float32: a NaN in
  either input gives NaN, and ties (``-0.0`` vs ``0.0``) return the second operand;
- bool: MIN is logical and, MAX logical or (and SUM/PROD are or/and, as numpy's add/multiply);
- AVG is SUM here; :func:`divide_into` divides afterwards: floats by ``float(divisor)`` (in
  float32 for the 16-bit types), integers truncating toward zero like C and NCCL's ncclAvg.

``PYCCL_NATIVE=0`` (pyccl.settings) forces the numpy twin even when the C core is built.
"""
import numpy as np

from . import settings
from .dtypes import DTYPES, ReduceOp, as_op, name_of, on_bfloat16
from .errors import InvalidArgument

try:
    from ._native import ffi as _ffi, lib as _lib
except ImportError:  # not built (e.g. running from a source tree without `pip install -e .`)
    _ffi = _lib = None

#: True when the C core ``pyccl._native`` is built and importable.
NATIVE_AVAILABLE = _lib is not None
#: True when reduce_into/divide_into use it (NATIVE_AVAILABLE and not ``PYCCL_NATIVE=0``).
USE_NATIVE = NATIVE_AVAILABLE and settings.get("PYCCL_NATIVE")

# Codes shared with native/reduce.h; tables built once so a call does two dict lookups.
_F16, _BF16, _F32, _F64, _I8, _U8, _I32, _I64, _BOOL = range(9)
#: dtype name -> C code (static: tables keyed by code or name need no numpy dtype)
CODE_BY_NAME = {"float16": _F16, "bfloat16": _BF16, "float32": _F32, "float64": _F64, "int8": _I8,
                "uint8": _U8, "int32": _I32, "int64": _I64, "bool": _BOOL}


class _ByDtype(dict):
    """numpy dtype -> C code. bfloat16's entry joins when ml_dtypes loads (pyccl.dtypes
    imports it only when bfloat16 is first needed); `[dt]` of a bfloat16 dtype loads it."""

    def __missing__(self, dt):
        if name_of(dt) == "bfloat16":       # loads bfloat16, and on_bfloat16 below adds it here
            return dict.__getitem__(self, dt)
        raise KeyError(dt)


_DTYPE_CODE = _ByDtype((DTYPES[name], code) for name, code in CODE_BY_NAME.items() if name != "bfloat16")
on_bfloat16(lambda dt: _DTYPE_CODE.__setitem__(dt, _BF16))
_SUM, _PROD, _MIN, _MAX = range(4)
_OP_CODE = {ReduceOp.SUM: _SUM, ReduceOp.PROD: _PROD, ReduceOp.MIN: _MIN,
            ReduceOp.MAX: _MAX, ReduceOp.AVG: _SUM}
# Enum members hash in Python; their ids are stable (members live as long as the class).
_OP_BY_ID = {id(member): code for member, code in _OP_CODE.items()}
_INT64_MAX = (1 << 63) - 1

_from_buffer = _ffi.from_buffer if NATIVE_AVAILABLE else None


def _fail(what, dst, a, b=None):
    def desc(x):
        return f"{type(x).__name__}(dtype={getattr(x, 'dtype', '?')}, size={getattr(x, 'size', '?')})"
    others = f", a={desc(a)}" + (f", b={desc(b)}" if b is not None else "")
    raise InvalidArgument(f"reduce: {what} (dst={desc(dst)}{others})")


def _codes(dst, a, b, op):
    """Validate once (same dtype and size, writable dst, known dtype/op); return codes."""
    dt = dst.dtype
    n = dst.size
    if a.size != n or b.size != n:
        _fail("dst, a and b must have the same number of elements", dst, a, b)
    if (a.dtype is not dt and a.dtype != dt) or (b.dtype is not dt and b.dtype != dt):
        _fail("dst, a and b must have the same dtype", dst, a, b)
    try:
        code = _DTYPE_CODE[dt]
    except KeyError:
        _fail(f"dtype {dt} is not supported; pyccl reduces {', '.join(DTYPES)}", dst, a, b)
    try:
        opc = _OP_CODE[op]
    except (KeyError, TypeError):
        opc = _OP_CODE[as_op(op)]  # a name like "sum"; InvalidArgument if unknown
    if not dst.flags.writeable:
        _fail("dst is read-only", dst, a, b)
    if not (dst.flags.c_contiguous and a.flags.c_contiguous and b.flags.c_contiguous):
        _fail("arrays must be C-contiguous", dst, a, b)
    return n, code, opc


def reduce_native(dst, a, b, op):
    """dst[:] = a (op) b with the C core.  Arrays: C-contiguous, same dtype and size; dst may
    be a or b (in place) or disjoint from both (a partial overlap is not checked and gives
    garbage).  Returns dst."""
    n, code, opc = _codes(dst, a, b, op)
    if n == 0:
        return dst
    if _lib is None:
        raise InvalidArgument("reduce: the C core pyccl._native is not built")
    try:
        pd, pa, pb = _from_buffer(dst), _from_buffer(a), _from_buffer(b)
    except (ValueError, TypeError, BufferError) as e:
        _fail(f"arrays must be C-contiguous buffers ({e})", dst, a, b)
    _lib.pyccl_reduce(pd, pa, pb, n, code, opc)
    return dst


_F32_UFUNC = (np.add, np.multiply, np.minimum, np.maximum)
_BOOL_UFUNC = (np.logical_or, np.logical_and, np.logical_and, np.logical_or)


def reduce_numpy(dst, a, b, op):
    """The numpy twin of :func:`reduce_native`, with identical results.  Returns dst."""
    n, code, opc = _codes(dst, a, b, op)
    if n == 0:
        return dst
    d, x, y = dst.reshape(-1), a.reshape(-1), b.reshape(-1)
    with np.errstate(all="ignore"):  # overflow/NaN are results here, as in the C core
        _reduce_numpy(d, x, y, code, opc)
    return dst


def _reduce_numpy(d, x, y, code, opc):
    if code == _F16 or code == _BF16:
        # float32 math, then astype rounds to nearest-even (numpy for f16, ml_dtypes for bf16).
        r = _F32_UFUNC[opc](x.astype(np.float32), y.astype(np.float32))
        np.copyto(d, r.astype(d.dtype))
    elif code == _BOOL:
        _BOOL_UFUNC[opc](x, y, out=d)
    else:
        # float32/64: IEEE; integers wrap (numpy array arithmetic is modular, no warning).
        _F32_UFUNC[opc](x, y, out=d)


def reduce_into(dst, a, b, op):
    """dst[:] = a (op) b element-wise (AVG counts as SUM; see :func:`divide_into`).

    numpy arrays, C-contiguous, same dtype and size; dst may be a or b.  Uses the C core when
    built (and not ``PYCCL_NATIVE=0``), else the numpy twin.  Returns dst."""
    if not USE_NATIVE:
        return reduce_numpy(dst, a, b, op)
    # The latency path (tiny chunks must stay cheap): table lookups and attribute checks only;
    # anything unusual goes through _codes, which raises the precise InvalidArgument.
    dt = dst.dtype
    n = dst.size
    code = _DTYPE_CODE.get(dt)
    opc = _OP_BY_ID.get(id(op))
    if (code is None or opc is None or a.size != n or b.size != n
            or (a.dtype is not dt and a.dtype != dt) or (b.dtype is not dt and b.dtype != dt)
            or not dst.flags.writeable):
        n, code, opc = _codes(dst, a, b, op)
    if n == 0:
        return dst
    try:
        pd, pa, pb = _from_buffer(dst), _from_buffer(a), _from_buffer(b)
    except (ValueError, TypeError, BufferError) as e:
        _fail(f"arrays must be C-contiguous buffers ({e})", dst, a, b)
    _lib.pyccl_reduce(pd, pa, pb, n, code, opc)
    return dst


def _divide_code(x, divisor):
    dt = x.dtype
    code = _DTYPE_CODE.get(dt)
    if code is None and name_of(dt) is not None:      # bfloat16, first met here: now loaded
        code = _DTYPE_CODE[dt]
    if code is None:
        raise InvalidArgument(f"divide: dtype {dt} is not supported; pyccl reduces {', '.join(DTYPES)}")
    if code == _BOOL:
        raise InvalidArgument("divide: AVG is not defined for bool; use MIN or MAX")
    if isinstance(divisor, (bool, np.bool_)) or not isinstance(divisor, (int, np.integer)):
        raise InvalidArgument(f"divide: divisor must be an integer >= 1, got {divisor!r}")
    divisor = int(divisor)
    if not 1 <= divisor <= _INT64_MAX:
        raise InvalidArgument(f"divide: divisor must be an integer in [1, 2**63), got {divisor}")
    if not x.flags.writeable:
        raise InvalidArgument(f"divide: x is read-only (dtype={dt}, size={x.size})")
    return code, divisor


def divide_native(x, divisor):
    """x[:] /= divisor in place with the C core (AVG's last step).  Returns x."""
    code, divisor = _divide_code(x, divisor)
    if x.size == 0 or divisor == 1:
        return x
    if _lib is None:
        raise InvalidArgument("divide: the C core pyccl._native is not built")
    try:
        px = _from_buffer(x)
    except (ValueError, TypeError, BufferError) as e:
        raise InvalidArgument(f"divide: x must be a C-contiguous buffer ({e})") from None
    _lib.pyccl_divide(px, x.size, code, divisor)
    return x


def divide_numpy(x, divisor):
    """The numpy twin of :func:`divide_native`.  Returns x."""
    code, divisor = _divide_code(x, divisor)
    if x.size == 0 or divisor == 1:
        return x
    with np.errstate(all="ignore"):
        _divide_numpy(x.reshape(-1), code, divisor)
    return x


def _divide_numpy(v, code, divisor):
    # C converts the int64 divisor with (float)/(double); numpy's int64 cast does the same.
    d64 = np.array(divisor, dtype=np.int64)
    if code == _F16 or code == _BF16:
        np.copyto(v, (v.astype(np.float32) / d64.astype(np.float32)).astype(v.dtype))
    elif code == _F32:
        np.divide(v, d64.astype(np.float32), out=v)
    elif code == _F64:
        np.divide(v, d64.astype(np.float64), out=v)
    else:
        # Truncate toward zero: remove the C-style remainder (fmod keeps the dividend's sign),
        # then the division is exact.  int64 so the divisor fits for every integer type.
        w = v.astype(np.int64)
        np.copyto(v, ((w - np.fmod(w, d64)) // d64).astype(v.dtype))


def divide_into(x, divisor):
    """x[:] /= divisor in place, for AVG: floats divide (16-bit types via float32, rounded to
    nearest-even), integers truncate toward zero.  divisor: int >= 1.  Returns x."""
    if USE_NATIVE:
        return divide_native(x, divisor)
    return divide_numpy(x, divisor)


def copy_into(dst, src):
    """dst[:] = src (same nbytes, C-contiguous): a memcpy that releases the GIL.  Returns dst."""
    if dst.nbytes != src.nbytes:
        raise InvalidArgument(f"copy: dst has {dst.nbytes} bytes, src has {src.nbytes}")
    if dst.nbytes == 0:
        return dst
    if not USE_NATIVE:
        np.copyto(dst.reshape(-1).view(np.uint8), src.reshape(-1).view(np.uint8))
        return dst
    if not dst.flags.writeable:
        raise InvalidArgument("copy: dst is read-only")
    try:
        pd, ps = _from_buffer(dst), _from_buffer(src)
    except (ValueError, TypeError, BufferError) as e:
        raise InvalidArgument(f"copy: arrays must be C-contiguous buffers ({e})") from None
    _lib.pyccl_copy(pd, ps, dst.nbytes)
    return dst
