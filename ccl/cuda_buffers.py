"""Describing GPU buffers: torch CUDA tensors, cupy arrays, anything with
``__cuda_array_interface__`` or a CUDA DLPack device.

`as_buffer` (ccl/buffers.py) sends every CUDA object here and makes a `Buffer` whose
``array`` is a :class:`CudaView` (pointer, element count, item size, device, and how to find
the caller's current stream), so the communicator's size and dtype checks work unchanged
while the bytes stay on the GPU. Nothing here imports torch or cupy unless the object is one
of theirs.

Streams: a collective on a CUDA buffer is ordered after the work already queued on the
*caller's current stream* (torch's ``torch.cuda.current_stream()`` for torch tensors, cupy's
``cupy.cuda.get_current_stream()`` otherwise), see ccl/engines/cuda/.
"""
from .dtypes import NAMES, name_of
from .errors import InvalidArgument

_DLPACK_CUDA = (2, 13)          # kDLCUDA, kDLCUDAManaged

_TORCH_DTYPES = None


def _torch_dtypes():
    global _TORCH_DTYPES
    if _TORCH_DTYPES is None:
        import torch
        _TORCH_DTYPES = {torch.float16: "float16", torch.bfloat16: "bfloat16", torch.float32: "float32",
                         torch.float64: "float64", torch.int8: "int8", torch.uint8: "uint8",
                         torch.int32: "int32", torch.int64: "int64", torch.bool: "bool"}
    return _TORCH_DTYPES


class CudaView:
    """A contiguous run of device memory, seen by pyccl (no copy, no ownership)."""

    __slots__ = ("ptr", "size", "itemsize", "device", "kind", "obj", "readonly")

    def __init__(self, ptr, size, itemsize, device, kind, obj, readonly=False):
        self.ptr, self.size, self.itemsize = int(ptr), int(size), int(itemsize)
        self.device, self.kind, self.obj, self.readonly = int(device), kind, obj, readonly

    @property
    def nbytes(self) -> int:
        return self.size * self.itemsize

    def caller_stream(self) -> int:
        """The raw cudaStream_t the caller is using on this thread for this device."""
        if self.kind == "torch":
            return current_torch_stream(self.device)
        return current_cupy_stream(self.device)

    def __repr__(self):
        return f"CudaView(cuda:{self.device}, 0x{self.ptr:x}, {self.size} x {self.itemsize} B, {self.kind})"


def current_cupy_stream(device: int) -> int:
    import cupy
    try:
        return cupy.cuda.get_current_stream(device).ptr
    except TypeError:                       # older cupy: the current device's stream
        with cupy.cuda.Device(device):
            return cupy.cuda.get_current_stream().ptr


_raw_stream = None


def current_torch_stream(device: int) -> int:
    global _raw_stream
    if _raw_stream is None:
        import torch
        fast = getattr(torch._C, "_cuda_getCurrentRawStream", None)
        _raw_stream = fast if fast is not None else (lambda d: torch.cuda.current_stream(d).cuda_stream)
    return _raw_stream(device)


def is_cuda(obj) -> bool:
    """True for objects whose memory is on a GPU (cheap; imports nothing)."""
    mod = type(obj).__module__
    if mod.startswith("torch"):
        return bool(getattr(obj, "is_cuda", False))
    if hasattr(obj, "__cuda_array_interface__"):
        return True
    dev = getattr(obj, "__dlpack_device__", None)
    if dev is not None and not hasattr(obj, "__array_interface__"):
        try:
            return dev()[0] in _DLPACK_CUDA
        except Exception:  # noqa: BLE001 - not a usable DLPack producer: not CUDA either
            return False
    return False


def cuda_view(obj, what: str, writable: bool = False) -> tuple:
    """(CudaView, dtype name, the object viewed) of `obj`'s device memory; InvalidArgument with
    the reason if unusable. ccl/buffers.py wraps it in a Buffer (it imports this module, never
    the reverse)."""
    mod = type(obj).__module__
    if mod.startswith("torch"):
        view, dtype = _torch_view(obj, what)
    else:
        if not hasattr(obj, "__cuda_array_interface__") and hasattr(obj, "__dlpack__"):
            obj = _from_dlpack(obj, what)
        view, dtype = _cai_view(obj, what)
    if writable and view.readonly:
        raise InvalidArgument(f"{what}: CUDA array is read-only but the op writes into it")
    return view, dtype, obj


def _torch_view(t, what):
    if not t.is_contiguous():
        raise InvalidArgument(f"{what}: tensor is not contiguous (strides {tuple(t.stride())}); "
                              "call .contiguous() first")
    name = _torch_dtypes().get(t.dtype)
    if name is None:
        raise InvalidArgument(f"{what}: torch dtype {t.dtype} is not supported on CUDA; pyccl carries "
                              f"{', '.join(NAMES)}")
    return CudaView(t.data_ptr(), t.numel(), t.element_size(), t.device.index, "torch", t), name


def _from_dlpack(obj, what):
    try:
        import cupy
        return cupy.from_dlpack(obj)
    except Exception as e:  # noqa: BLE001 - reported as the caller's bad argument
        raise InvalidArgument(f"{what}: cannot view {type(obj).__name__} through DLPack on CUDA: {e}") from None


def _cai_view(obj, what):
    cai = obj.__cuda_array_interface__
    import numpy as np
    try:
        dt = np.dtype(cai["typestr"])
    except TypeError:
        raise InvalidArgument(f"{what}: CUDA array type {cai['typestr']!r} is not supported") from None
    name = name_of(dt)
    if name is None:
        raise InvalidArgument(f"{what}: dtype {dt} is not supported; pyccl carries {', '.join(NAMES)}")
    shape = tuple(cai["shape"])
    count = 1
    for s in shape:
        count *= int(s)
    strides = cai.get("strides")
    if strides is not None and count > 1:
        expect, want = dt.itemsize, []
        for s in reversed(shape):
            want.append(expect)
            expect *= int(s)
        if [st for st, sh in zip(strides, shape) if sh != 1] != \
                [w for w, sh in zip(reversed(want), shape) if sh != 1]:
            raise InvalidArgument(f"{what}: CUDA array is not contiguous (strides {tuple(strides)})")
    ptr, readonly = cai["data"]
    device = _device_of(obj, ptr)
    return CudaView(ptr or 0, count, dt.itemsize, device, "cupy", obj, bool(readonly)), name


def _device_of(obj, ptr):
    dev = getattr(obj, "device", None)
    ident = getattr(dev, "id", None)
    if isinstance(ident, int):
        return ident
    import cupy
    if not ptr:
        return cupy.cuda.runtime.getDevice()
    return cupy.cuda.runtime.pointerGetAttributes(ptr).device
