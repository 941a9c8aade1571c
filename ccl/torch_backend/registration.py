"""Registering "pyccl" with torch.distributed: ``register()`` (idempotent; done on import),
torch's creator ``_create`` and the ``torch.backends`` entry point ``_autoload``."""
import torch.distributed as dist

from .group import BACKEND_NAME, ProcessGroupPyccl


def _create(store, rank, size, timeout):
    """torch's creator: (PrefixStore of the group, group rank, group size, timedelta)."""
    return ProcessGroupPyccl(store, rank, size, timeout)


def register():
    """Register the backend "pyccl" with torch.distributed (idempotent)."""
    if BACKEND_NAME.upper() in getattr(dist.Backend, "_plugins", {}):
        return
    dist.Backend.register_backend(BACKEND_NAME, _create, devices=["cpu", "cuda"])


def _autoload():
    """Entry point of the `torch.backends` group, which `import torch` calls. It must never
    make `import torch` fail, so every error becomes a warning."""
    try:
        register()
    except Exception as e:  # noqa: BLE001
        import warnings
        warnings.warn(f"pyccl: could not register the torch.distributed backend 'pyccl': {e}", stacklevel=2)
