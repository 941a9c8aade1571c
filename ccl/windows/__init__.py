"""One-sided windows (`comm.window(buf)`): put, get, signal, wait_signal, flush, close.

window.py holds the API and its checks; base.py the per-peer `Link` interface; cma.py the
same-host link, tcp.py the link between hosts and the target's service thread; signals.py
the signal slots in shared memory. See README.md, "One-sided windows".
"""
from .window import DEFAULT_SIGNALS, Window

__all__ = ["Window", "DEFAULT_SIGNALS"]
