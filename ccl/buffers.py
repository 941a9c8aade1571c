"""One way to describe a user's buffer, checked once at the API edge (like mpi4py).

Every collective turns its arguments into `Buffer`s here: a flat numpy view of the
same memory (no copy), pyccl's dtype name, the element count and the device. A bad
argument raises `InvalidArgument` here, before any byte moves.
"""
from dataclasses import dataclass

import numpy as np

from .cuda_buffers import cuda_view, is_cuda
from .dtypes import DTYPES, NAMES, name_of
from .errors import InvalidArgument


@dataclass
class Buffer:
    """A contiguous buffer seen as a flat numpy array (`array`) over the caller's memory."""

    array: np.ndarray
    dtype: str
    device: str
    obj: object

    @property
    def count(self) -> int:
        return self.array.size

    @property
    def nbytes(self) -> int:
        return self.array.nbytes

    @property
    def itemsize(self) -> int:
        return self.array.itemsize


class _Capsule:
    """Hands numpy a DLPack capsule made by torch's C function (torch's Python ``__dlpack__``
    costs ~1.5 us of checks per call; this path is as cheap as ``Tensor.numpy()``)."""
    __slots__ = ("capsule",)

    def __dlpack__(self, stream=None, max_version=None, dl_device=None, copy=None):
        return self.capsule

    def __dlpack_device__(self):
        return (1, 0)                           # kDLCPU


_to_dlpack = None


def torch_numpy(t) -> np.ndarray:
    """A numpy array over a contiguous CPU tensor's memory, through DLPack (no copy).

    Not ``Tensor.numpy()``: since torch 2.13 that marks the tensor's storage non-resizable for
    good, so after any collective ``t.resize_()`` / ``t.untyped_storage().resize_()`` (FSDP frees
    and re-grows parameters that way) would raise "Trying to resize storage that is not
    resizable". The DLPack capsule holds a reference to the tensor, which keeps the memory alive
    as long as the array. bfloat16 is viewed as int16 and re-typed (numpy has no bfloat16)."""
    global _to_dlpack
    import torch
    if t.dtype == torch.bfloat16:
        return torch_numpy(t.view(torch.int16)).view(DTYPES["bfloat16"])
    if _to_dlpack is None:
        _to_dlpack = getattr(torch._C, "_to_dlpack_versioned", None) or getattr(torch._C, "_to_dlpack", False)
    if _to_dlpack and not t.is_conj() and not t.is_neg():
        c = _Capsule()
        c.capsule = _to_dlpack(t)
        return np.from_dlpack(c)
    return np.from_dlpack(t)


def _torch_to_numpy(t, what: str) -> np.ndarray:
    if t.is_cuda or t.device.type != "cpu":
        raise InvalidArgument(
            f"{what}: tensor is on {t.device}; only CPU tensors are supported by this communicator")
    if not t.is_contiguous():
        raise InvalidArgument(f"{what}: tensor is not contiguous (strides {tuple(t.stride())}); "
                              "call .contiguous() first")
    try:
        return torch_numpy(t.detach())
    except (TypeError, BufferError, RuntimeError) as e:
        raise InvalidArgument(f"{what}: torch dtype {t.dtype} is not supported ({e})") from None


def _is_torch_tensor(obj) -> bool:
    mod = type(obj).__module__
    return mod.startswith("torch") and hasattr(obj, "is_contiguous")


def as_buffer(obj, what: str, writable: bool = False) -> Buffer:
    """Describe `obj` without copying; `what` names it in errors (e.g. 'all_reduce: x')."""
    if isinstance(obj, Buffer):
        return obj
    if type(obj) is np.ndarray:         # the common case first: latency of small calls
        arr = obj
    elif is_cuda(obj):                  # GPU memory: described (not copied) by cuda_buffers.py
        view, dtype, obj = cuda_view(obj, what, writable)
        return Buffer(view, dtype, f"cuda:{view.device}", obj)
    elif _is_torch_tensor(obj):
        arr = _torch_to_numpy(obj, what)
    elif isinstance(obj, np.ndarray):
        arr = obj
    elif hasattr(obj, "__cuda_array_interface__"):
        raise InvalidArgument(f"{what}: CUDA arrays need the CUDA transport, which this "
                              "communicator does not have")
    elif hasattr(obj, "__dlpack__"):
        try:
            arr = np.from_dlpack(obj)
        except (RuntimeError, TypeError, BufferError) as e:
            raise InvalidArgument(f"{what}: cannot view {type(obj).__name__} through DLPack: {e}") from None
    else:
        try:
            arr = np.asarray(memoryview(obj))
        except TypeError:
            raise InvalidArgument(
                f"{what}: expected a numpy array, torch tensor, cupy array or buffer-protocol "
                f"object, got {type(obj).__name__}") from None
    if not arr.flags.c_contiguous:
        raise InvalidArgument(f"{what}: array is not contiguous (strides {arr.strides}); "
                              "pass np.ascontiguousarray(x)")
    if writable and not arr.flags.writeable:
        raise InvalidArgument(f"{what}: array is read-only but the op writes into it")
    name = name_of(arr.dtype)
    if name is None:
        raise InvalidArgument(f"{what}: dtype {arr.dtype} is not supported; pyccl carries "
                              f"{', '.join(NAMES)}")
    return Buffer(arr.reshape(-1), name, "cpu", obj)


def same_dtype(a: Buffer, b: Buffer, opname: str) -> None:
    if a.dtype != b.dtype:
        raise InvalidArgument(f"{opname}: output dtype {a.dtype} differs from input dtype {b.dtype}")
