"""One-sided windows (`comm.window(buf)`): put, get, signal, wait_signal, flush, close.

window.py holds the API for host memory; common.py what every window shares (name, set-up
exchange, slot checks); base.py the per-peer `Link` interface; cma.py the same-host link,
rdma.py the ibverbs link (WRITE, WRITE_WITH_IMM, READ), tcp.py the link between hosts and the
target's service thread; signals.py the signal slots in shared memory; cuda.py the window of
CUDA buffers (CUDA IPC, stream-ordered) and cuda_kernels.py its two kernels. See README.md,
"One-sided windows".
"""
from .window import DEFAULT_SIGNALS, Window

__all__ = ["Window", "DEFAULT_SIGNALS"]
