"""Signal slots of a window: counters in shared memory that peers of this host store into.

Why no atomic instructions: every cell has one writer. `cells[origin, slot]` is written only
by `origin` (through its mapping of this file: a same-host peer) or by this rank's service
thread on the origin's behalf (a peer reached over TCP), with aligned 8-byte stores. The
value of a slot is the column's sum minus what `wait_signal` consumed here, which is private
to this rank. A store from the origin follows its data copy (a finished process_vm_writev
system call, or the service thread's finished receive), so a waiter that sees the count sees
the data.
"""
import mmap
import os
import secrets

import numpy as np

from ..errors import TransportError

_DIR = "/dev/shm" if os.path.isdir("/dev/shm") else None


def _path(tag: str) -> str:
    import tempfile
    base = _DIR or tempfile.gettempdir()
    return os.path.join(base, f"pyccl-win-{os.getpid()}-{tag}-{secrets.token_hex(4)}")


def _map(fd: int, nbytes: int) -> mmap.mmap:
    return mmap.mmap(fd, max(nbytes, 8), mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)


class Board:
    """This rank's slots: a (size, nslots) int64 table in a file of /dev/shm."""

    def __init__(self, size: int, nslots: int, tag: str):
        self.size, self.nslots = size, nslots
        self.path = _path(tag)
        nbytes = size * nslots * 8
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
        except OSError as e:
            raise TransportError(f"window: cannot create its signal file {self.path}: {e}") from None
        try:
            os.ftruncate(fd, max(nbytes, 8))
            self.mm = _map(fd, nbytes)
        finally:
            os.close(fd)
        self.cells = np.frombuffer(self.mm, np.int64, size * nslots).reshape(size, nslots)
        self.address = self.cells.ctypes.data  # a peer probes cross-memory access on it
        self.consumed = np.zeros(nslots, np.int64)

    def value(self, slot: int) -> int:
        return int(self.cells[:, slot].sum()) - int(self.consumed[slot])

    def consume(self, slot: int, value: int) -> None:
        self.consumed[slot] += value

    def add(self, origin: int, slot: int, value: int) -> None:
        """The single writer of row `origin` (this rank for itself, or its service thread)."""
        self.cells[origin, slot] += value

    def unlink(self) -> None:
        """Once every peer has mapped it: nothing is left behind if a process dies."""
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass

    def close(self) -> None:
        self.unlink()
        self.cells = None
        self.mm.close()


class PeerBoard:
    """A same-host peer's board, mapped here: this rank writes its own row of it."""

    def __init__(self, path: str, size: int, nslots: int, me: int):
        fd = os.open(path, os.O_RDWR)
        try:
            self.mm = _map(fd, size * nslots * 8)
        finally:
            os.close(fd)
        self.row = np.frombuffer(self.mm, np.int64, size * nslots).reshape(size, nslots)[me]

    def add(self, slot: int, value: int) -> None:
        self.row[slot] += value

    def close(self) -> None:
        self.row = None
        self.mm.close()
