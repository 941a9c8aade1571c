"""Reduction ops and element types: the names users pass and how numpy stores them.

bfloat16 has no numpy dtype of its own; we use ``ml_dtypes.bfloat16``, the
well-kept one that JAX and TensorFlow share, so bf16 arrays look like any other.
"""
import enum

import ml_dtypes
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

bfloat16 = np.dtype(ml_dtypes.bfloat16)

#: name -> numpy dtype, for every type pyccl moves and reduces.
DTYPES = {
    "float16": np.dtype(np.float16),
    "bfloat16": bfloat16,
    "float32": np.dtype(np.float32),
    "float64": np.dtype(np.float64),
    "int8": np.dtype(np.int8),
    "uint8": np.dtype(np.uint8),
    "int32": np.dtype(np.int32),
    "int64": np.dtype(np.int64),
    "bool": np.dtype(np.bool_),
}


def dtype_name(dtype) -> str:
    """Our name for a numpy dtype; InvalidArgument if pyccl does not carry it."""
    dtype = np.dtype(dtype)
    for name, known in DTYPES.items():
        if known == dtype:
            return name
    raise InvalidArgument(
        f"dtype {dtype} is not supported; pyccl carries {', '.join(DTYPES)}")


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
