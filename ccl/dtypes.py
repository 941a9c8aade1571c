"""Reduction ops and element types: the names users pass and how numpy stores them.

bfloat16 has no numpy dtype of its own; we use ``ml_dtypes.bfloat16``, the
well-kept one that JAX and TensorFlow share, so bf16 arrays look like any other.
ml_dtypes costs half a second to import (every rank pays it), so it is imported only when
bfloat16 is first needed: `pyccl.bfloat16`, ``DTYPES["bfloat16"]``, or a numpy bfloat16 array
met at the API edge (whose maker has imported ml_dtypes already). Torch and cupy tensors on
the GPU never need it.
"""
import enum
from collections.abc import Mapping

import numpy as np

from .errors import InvalidArgument


class ReduceOp(enum.Enum):
    SUM = "sum"
    PROD = "prod"
    MIN = "min"
    MAX = "max"
    AVG = "avg"

    def __repr__(self):
        return f"pyccl.{self.name}"


SUM, PROD, MIN, MAX, AVG = ReduceOp.SUM, ReduceOp.PROD, ReduceOp.MIN, ReduceOp.MAX, ReduceOp.AVG

#: every type pyccl moves and reduces, in the order messages list them
NAMES = ("float16", "bfloat16", "float32", "float64", "int8", "uint8", "int32", "int64", "bool")
_NUMPY = {"float16": np.dtype(np.float16), "float32": np.dtype(np.float32), "float64": np.dtype(np.float64),
          "int8": np.dtype(np.int8), "uint8": np.dtype(np.uint8), "int32": np.dtype(np.int32),
          "int64": np.dtype(np.int64), "bool": np.dtype(np.bool_)}
_NAME_OF = {dt: name for name, dt in _NUMPY.items()}       # numpy dtype -> name; bfloat16 joins on load
_BFLOAT16 = []                                             # [ml_dtypes' bfloat16 dtype] once loaded
_ON_BFLOAT16 = []                                          # callbacks(dtype) run when it loads


def load_bfloat16() -> np.dtype:
    """ml_dtypes' bfloat16 dtype, imported on first use; tables that key on numpy dtypes
    (ccl/reduce.py) learn it through on_bfloat16()."""
    if not _BFLOAT16:
        import ml_dtypes
        dt = np.dtype(ml_dtypes.bfloat16)
        _NAME_OF[dt] = "bfloat16"
        _BFLOAT16.append(dt)
        for fn in _ON_BFLOAT16:
            fn(dt)
    return _BFLOAT16[0]


def on_bfloat16(fn) -> None:
    """Call fn(bfloat16 dtype) when bfloat16 loads (now, if it has)."""
    _ON_BFLOAT16.append(fn)
    if _BFLOAT16:
        fn(_BFLOAT16[0])


class _Dtypes(Mapping):
    """name -> numpy dtype (DTYPES). Its names are known without ml_dtypes; looking up
    bfloat16's dtype loads it."""

    def __getitem__(self, name):
        if name == "bfloat16":
            return load_bfloat16()
        return _NUMPY[name]

    def __iter__(self):
        return iter(NAMES)

    def __len__(self):
        return len(NAMES)

    def __contains__(self, name):
        return name in NAMES

    def __repr__(self):
        return f"DTYPES({', '.join(NAMES)})"


#: name -> numpy dtype, for every type pyccl moves and reduces.
DTYPES = _Dtypes()


def name_of(dtype):
    """Our name for a numpy dtype, None if pyccl does not carry it (a dict lookup; a dtype
    named bfloat16 is checked against ml_dtypes', which its array's maker has loaded)."""
    name = _NAME_OF.get(dtype)
    if name is None and getattr(dtype, "name", None) == "bfloat16" and dtype == load_bfloat16():
        name = "bfloat16"
    return name


def dtype_name(dtype) -> str:
    """Our name for a numpy dtype; InvalidArgument if pyccl does not carry it."""
    if isinstance(dtype, str) and dtype == "bfloat16":
        return "bfloat16"          # np.dtype("bfloat16") would need ml_dtypes loaded
    dtype = np.dtype(dtype)
    name = name_of(dtype)
    if name is None:
        raise InvalidArgument(f"dtype {dtype} is not supported; pyccl carries {', '.join(NAMES)}")
    return name


def __getattr__(name):
    # `pyccl.dtypes.bfloat16` (and `from pyccl.dtypes import bfloat16`): loads ml_dtypes
    if name == "bfloat16":
        return load_bfloat16()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def as_op(op) -> ReduceOp:
    """Accept ReduceOp, its name ('sum', 'SUM') or anything with a matching .name."""
    if isinstance(op, ReduceOp):
        return op
    name = op if isinstance(op, str) else getattr(op, "name", str(op))
    try:
        return ReduceOp[name.upper()]
    except KeyError:
        raise InvalidArgument(f"unknown reduction op {op!r}; use one of SUM PROD MIN MAX AVG") from None


def check_op_dtype(op: ReduceOp, name: str, opname: str) -> None:
    """bool reduces only with MIN/MAX (logical and/or), as in NCCL."""
    if name == "bool" and op not in (MIN, MAX):
        raise InvalidArgument(f"{opname}: op {op.name} is not defined for bool; use MIN or MAX")
