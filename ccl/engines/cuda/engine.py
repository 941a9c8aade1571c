"""``CudaCollectives``: the GPU engine of one communicator, composed of its parts (state,
kernels, the reducing and the copy collectives, the torch fast lane, memory / suspend /
resume)."""
from .copies import CopiesMixin
from .kernels import KernelsMixin
from .lane import TorchLaneMixin
from .memory import MemoryMixin
from .reductions import ReductionsMixin
from .state import CudaState


class CudaCollectives(ReductionsMixin, CopiesMixin, TorchLaneMixin, KernelsMixin, MemoryMixin, CudaState):
    """IPC-mapped scratch and flags, streams, kernels and the watchdog of one communicator, and
    the collectives on them. Each collective takes (what, caller stream, join, signature, *the
    communicator's arguments) and returns the event that marks its end on pyccl's stream (None
    when it ran on the caller's stream itself)."""
