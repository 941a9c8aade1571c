"""pyccl: collective communication in Python with a small C core.

    import pyccl
    comm = pyccl.init()                 # from pyccl.launch, torchrun, mpirun or Slurm
    comm.all_reduce(x, op=pyccl.SUM)    # numpy arrays, torch tensors (CPU/CUDA), cupy arrays
"""
from .dtypes import AVG, MAX, MIN, PROD, SUM, ReduceOp
from .errors import InvalidArgument, PeerFailure, PycclError, Timeout, TransportError

__version__ = "0.1.0"


def _configure_logging():
    """PYCCL_DEBUG=WARN|INFO|TRACE, like NCCL_DEBUG: level of the "pyccl" logger, to stderr."""
    import logging
    import os

    from . import settings
    level = (settings.get("PYCCL_DEBUG") or "").upper()
    if not level:
        return
    log = logging.getLogger("pyccl")
    log.setLevel({"TRACE": logging.DEBUG, "DEBUG": logging.DEBUG, "INFO": logging.INFO}.get(level, logging.WARNING))
    if not log.handlers:
        h = logging.StreamHandler()
        try:
            rank = settings.get("PYCCL_RANK")
        except InvalidArgument:           # a label only: pyccl.init() reports the bad value
            rank = None
        rank = os.environ.get("RANK", "?") if rank is None else rank
        h.setFormatter(logging.Formatter(f"pyccl[{os.getpid()}] rank {rank} %(levelname)s %(message)s"))
        log.addHandler(h)


_configure_logging()

__all__ = [
    "init", "join", "Communicator", "Work", "ReduceOp", "SUM", "PROD", "MIN", "MAX", "AVG", "bfloat16",
    "PycclError", "InvalidArgument", "Timeout", "PeerFailure", "TransportError",
]


def __getattr__(name):
    # Imported lazily so `import pyccl` stays cheap and works before the communicator loads.
    if name in ("Communicator", "Work", "init", "join"):
        from . import communicator
        return getattr(communicator, name)
    if name == "bfloat16":              # ml_dtypes takes 0.5 s to import: only when asked for
        from .dtypes import load_bfloat16
        return load_bfloat16()
    raise AttributeError(f"module 'pyccl' has no attribute {name!r}")


def _torch_autoload():
    """`torch.backends` entry point (run by `import torch`): registers the torch.distributed
    backend "pyccl". Never lets an error escape into `import torch`."""
    try:
        from . import torch_backend  # noqa: F401 - registers on import
    except Exception as e:  # noqa: BLE001 - import torch must not fail because of us
        import warnings
        warnings.warn(f"pyccl: torch.distributed backend 'pyccl' not registered: {e}", stacklevel=2)


import sys as _sys  # noqa: E402

if "torch" in _sys.modules:          # torch already loaded: register now
    _torch_autoload()
