"""Tensor checks and flat views: what every collective does to a user's tensors before pyccl
sees them (contiguous 1-D views or copies with a write-back, byte views, device lookup)."""

import torch

from ..errors import InvalidArgument

# ---- tensor helpers --------------------------------------------------------------------------------
def _check(t, what):
    if not isinstance(t, torch.Tensor):
        raise InvalidArgument(f"{what}: expected a torch.Tensor, got {type(t).__name__}")
    if t.device.type not in ("cpu", "cuda"):
        raise InvalidArgument(f"{what}: tensor is on {t.device}; the torch backend 'pyccl' takes CPU tensors "
                              f"and CUDA tensors")
    if t.layout != torch.strided:
        raise InvalidArgument(f"{what}: {t.layout} tensors are not supported (dense tensors only)")
    return t


def _cuda_dev(*tensors):
    """Index of the GPU of the first CUDA tensor among `tensors` (nested lists too), or None."""
    for t in tensors:
        if isinstance(t, torch.Tensor):
            if t.is_cuda:
                return t.get_device()
        elif isinstance(t, (list, tuple)):
            d = _cuda_dev(*t)
            if d is not None:
                return d
    return None


def _contig(t):
    """(contiguous 1-D tensor over t's data or a copy of it, write-back function)."""
    if t.is_complex():
        if t.is_conj():
            raise InvalidArgument("complex tensor with the conjugate bit set: call .resolve_conj() first")
        t = torch.view_as_real(t)
    if t.is_contiguous():
        return t.reshape(-1), (lambda: None)
    c = t.contiguous().reshape(-1)
    return c, (lambda: t.copy_(c.view(t.shape)))


def _bytes(t):
    """A contiguous tensor's memory as a flat uint8 tensor (no copy)."""
    t = t.reshape(-1)
    return t if t.dtype == torch.uint8 else t.view(torch.uint8)


def _nbytes(t):
    return t.numel() * t.element_size()


def _as_list(x):
    return [x] if isinstance(x, torch.Tensor) else list(x)


def _single(tensors, what):
    tensors = _as_list(tensors)
    if len(tensors) != 1:
        raise InvalidArgument(f"{what}: expected exactly one tensor per process (CPU), got {len(tensors)}")
    return _check(tensors[0], what)


def _copy_bytes_into(dst, src_bytes):
    """Copy flat bytes into tensor `dst` (any layout or dtype)."""
    if dst.is_complex():
        dst = torch.view_as_real(dst)
    if dst.is_contiguous():
        _bytes(dst).copy_(src_bytes)
    elif src_bytes.numel():
        dst.copy_(src_bytes.view(dst.dtype).view(dst.shape))
