"""`pyccl.torch_backend.window(tensor, group=None)`: a one-sided window over a torch process
group on backend "pyccl", the same object `comm.window` returns (ccl/windows/).

It runs on the group's collective communicator, so creation and close are collectives of
that group and every member must call them in the same order as its other collectives.
"""
from ..errors import InvalidArgument
from .group import ProcessGroupPyccl


def window(tensor, group=None, signals=None):
    """Every member's `tensor` (CPU, or CUDA on one host: ccl/windows/cuda.py; sizes may
    differ) open to put/get/signal."""
    import torch.distributed as dist
    pg = group if group is not None else dist.distributed_c10d._get_default_group()
    if not isinstance(pg, ProcessGroupPyccl):
        try:
            pg = pg._get_backend(tensor.device)
        except (AttributeError, RuntimeError):
            pass
    if not isinstance(pg, ProcessGroupPyccl):
        raise InvalidArgument(f"window: needs a process group on backend \"pyccl\", got {type(pg).__name__}")
    return pg.pyccl_communicator.window(tensor, signals)
