"""How each (torch ReduceOp, dtype) pair reduces on pyccl: natively, in a wider type, with the
sign bit flipped (uint64 MIN/MAX), or by gathering everyone's data and folding it locally
(bitwise ops, bool XOR). See "Reductions" in the package doc."""
from functools import reduce as _fold

import torch
import torch.distributed as dist

from ..errors import InvalidArgument

_R = dist.ReduceOp.RedOpType
_NATIVE = {torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.int8, torch.uint8,
           torch.int32, torch.int64, torch.bool}
_FLOAT8 = {getattr(torch, n) for n in ("float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz",
                                         "float8_e5m2fnuz", "float8_e8m0fnu") if hasattr(torch, n)}
_UPCAST = {torch.int16: torch.int32, torch.uint16: torch.int32, torch.uint32: torch.int64,
           **{d: torch.float32 for d in _FLOAT8}}
_SIGNED_VIEW = {torch.uint16: torch.int16, torch.uint32: torch.int32, torch.uint64: torch.int64}
_INTEGRAL = {torch.int8, torch.uint8, torch.int16, torch.int32, torch.int64, torch.uint16,
             torch.uint32, torch.uint64}


# ---- reductions ------------------------------------------------------------------------------------
def _op_kind(op):
    return getattr(op, "op", op)


_OP_NAMES = {_R.SUM: "SUM", _R.PRODUCT: "PRODUCT", _R.MIN: "MIN", _R.MAX: "MAX", _R.AVG: "AVG",
             _R.BAND: "BAND", _R.BOR: "BOR", _R.BXOR: "BXOR", _R.PREMUL_SUM: "PREMUL_SUM"}
_TO_PYCCL = {_R.SUM: "SUM", _R.PRODUCT: "PROD", _R.MIN: "MIN", _R.MAX: "MAX", _R.AVG: "AVG",
             _R.PREMUL_SUM: "SUM"}
_BITWISE = {_R.BAND: torch.bitwise_and, _R.BOR: torch.bitwise_or, _R.BXOR: torch.bitwise_xor}


class _Reduction:
    """How one (torch op, dtype) pair reduces on pyccl: natively, in a wider type, or by
    gathering everyone's data and folding it locally (bitwise ops)."""

    def __init__(self, op, dtype, what):
        kind = _op_kind(op)
        if kind not in _OP_NAMES:
            raise InvalidArgument(f"{what}: unknown reduce op {op!r}")
        name = _OP_NAMES[kind]
        self.what, self.name = what, name
        self.factor = getattr(op, "factor", None) if kind == _R.PREMUL_SUM else None
        self.gather_fold = None       # callable folding a (size, n) tensor into (n,)
        self.work_dtype = None        # reduce in this dtype (then cast back)
        self.flip = False             # uint64 MIN/MAX: flip the sign bit around the reduction
        self.pyccl_op = _TO_PYCCL.get(kind)
        if dtype.is_complex:
            if kind not in (_R.SUM, _R.AVG, _R.PREMUL_SUM):
                raise InvalidArgument(f"{what}: ReduceOp.{name} is not defined for complex tensors "
                                      f"(only SUM, AVG, PREMUL_SUM)")
            dtype = torch.float32 if dtype == torch.complex64 else (
                torch.float64 if dtype == torch.complex128 else torch.float16)
        if dtype == torch.bool:
            if kind in (_R.SUM, _R.BOR, _R.MAX):
                self.pyccl_op = "MAX"
            elif kind in (_R.PRODUCT, _R.BAND, _R.MIN):
                self.pyccl_op = "MIN"
            elif kind == _R.BXOR:
                self.gather_fold = _fold_with(torch.bitwise_xor, torch.uint8)
            else:
                raise InvalidArgument(f"{what}: ReduceOp.{name} is not defined for bool tensors")
            return
        if kind in _BITWISE:
            if dtype not in _INTEGRAL:
                raise InvalidArgument(f"{what}: Cannot use ReduceOp.{name} with non-integral dtype {dtype}")
            self.gather_fold = _fold_with(_BITWISE[kind], _SIGNED_VIEW.get(dtype))
            return
        if kind == _R.PREMUL_SUM and not dtype.is_floating_point:
            raise InvalidArgument(f"{what}: ReduceOp.PREMUL_SUM needs a floating-point tensor, got {dtype}")
        if dtype in _NATIVE:
            return
        if dtype == torch.uint64:
            self.work_dtype = torch.int64
            self.flip = kind in (_R.MIN, _R.MAX)
            if kind == _R.AVG:
                raise InvalidArgument(f"{what}: ReduceOp.AVG is not supported for uint64")
            return
        if dtype in _UPCAST:
            self.work_dtype = _UPCAST[dtype]
            return
        raise InvalidArgument(f"{what}: dtype {dtype} cannot be reduced by pyccl")

    # Work buffers -------------------------------------------------------------------------------
    def to_work(self, flat, may_modify):
        """The contiguous buffer pyccl reduces for `flat` (a contiguous 1-D tensor).
        `may_modify`: whether `flat` itself may be scaled/overwritten before the reduction."""
        buf = flat
        if self.work_dtype is not None:
            if self.flip:
                buf = flat.view(torch.int64) ^ (-(1 << 63))
            else:
                buf = flat.to(self.work_dtype)
        if self.factor is not None:
            if buf is flat and not may_modify:
                buf = flat.clone()
            f = self.factor
            buf.mul_(f.to(buf.dtype) if isinstance(f, torch.Tensor) else f)
        return buf

    def from_work(self, buf, flat):
        """Write the reduced `buf` back into `flat` (no-op when they are the same memory)."""
        if buf is flat:
            return
        if self.flip:
            buf ^= (-(1 << 63))
            flat.view(torch.int64).copy_(buf)
        else:
            flat.copy_(buf)


def _fold_with(fn, view_dtype):
    def fold(stack):
        rows = stack.view(view_dtype) if view_dtype is not None else stack
        if stack.dtype == torch.bool:
            rows = stack.view(torch.uint8)
        out = _fold(fn, list(rows.unbind(0))) if rows.shape[0] else rows.new_zeros(rows.shape[1:])
        if stack.dtype == torch.bool:
            return out.view(torch.bool)
        return out.view(stack.dtype) if view_dtype is not None else out
    return fold
