"""The one interface of a window's path to one peer, so each transport is a class of its own.

A `Window` (ccl/windows/window.py) checks every call, then hands it to the `Link` of the
target peer: `LocalLink` (this rank itself), `CmaLink` (same host: the kernel copies straight
into the peer's pages, ccl/windows/cma.py), `RdmaLink` (over ibverbs: RDMA WRITE into the
peer's registered window, ccl/windows/rdma.py) or `TcpLink` (elsewhere: the peer's service
thread applies it, ccl/windows/tcp.py). Links take byte offsets and flat uint8 views, already checked.
CUDA buffers have a window class of their own (ccl/windows/cuda.py): their calls are queued on a
stream, not done by a link.
"""
import threading

import numpy as np


class Link:
    """One-sided access to one peer's window; every argument was checked by the Window."""

    kind = "?"
    peer: int

    def put(self, src: np.ndarray, offset: int, slot: int) -> None:
        """Copy `src` (uint8) to byte `offset` of the peer's window, then add 1 to its signal
        slot `slot` (-1: none), after the data."""
        raise NotImplementedError

    def get(self, dst: np.ndarray, offset: int) -> None:
        """Copy the peer's window bytes from `offset` into `dst` (uint8); returns once there."""
        raise NotImplementedError

    def signal(self, slot: int, value: int) -> None:
        """Add `value` to the peer's slot, after this rank's earlier puts to it."""
        raise NotImplementedError

    def flush(self) -> None:
        """Return once this rank's earlier puts and signals to the peer have landed."""

    def failure(self):
        """Why the peer is known gone (a string), or None."""
        return None

    def close(self) -> None:
        pass


class LocalLink(Link):
    """This rank's own window: plain copies, signals into its own row of the board."""

    kind = "local"

    def __init__(self, rank: int, window: np.ndarray, board):
        self.peer = rank
        self.window, self.board = window, board
        self.lock = threading.Lock()            # this rank's row: one writer at a time

    def put(self, src, offset, slot):
        self.window[offset:offset + src.size] = src
        if slot >= 0:
            self.signal(slot, 1)

    def get(self, dst, offset):
        dst[:] = self.window[offset:offset + dst.size]

    def signal(self, slot, value):
        with self.lock:
            self.board.add(self.peer, slot, value)
