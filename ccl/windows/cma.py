"""Same-host windows through Linux cross-memory attach: one system call per put or get.

`process_vm_writev` / `process_vm_readv` copy between this process and a peer's user buffer
(a numpy array or torch CPU tensor, anywhere in its memory) without the peer doing anything
and without staging it in shared memory first; the signal is then a store into the peer's
signal board (ccl/windows/signals.py), mapped here. The kernel allows it between processes
of one user unless ptrace is restricted (Yama `ptrace_scope` >= 1 without PR_SET_PTRACER,
seccomp): `probe` finds out at set-up and the pair falls back to the TCP link
(ccl/windows/tcp.py). ctypes releases the GIL during the call. No C of our own, so no twin.
"""
import ctypes
import errno
import threading

import numpy as np

from ..errors import PeerFailure, TransportError
from ..process import pid_alive
from .base import Link


class _Iov(ctypes.Structure):
    _fields_ = [("base", ctypes.c_void_p), ("len", ctypes.c_size_t)]


_LIBC = None


def _calls():
    """(process_vm_writev, process_vm_readv) from libc, or None where libc lacks them."""
    global _LIBC
    if _LIBC is None:
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            fns = (libc.process_vm_writev, libc.process_vm_readv)
        except (OSError, AttributeError):
            _LIBC = ()
            return None
        for f in fns:
            f.restype = ctypes.c_ssize_t
            f.argtypes = [ctypes.c_int, ctypes.POINTER(_Iov), ctypes.c_ulong, ctypes.POINTER(_Iov),
                          ctypes.c_ulong, ctypes.c_ulong]
        _LIBC = fns
    return _LIBC or None


def _move(fn, pid: int, local: int, remote: int, nbytes: int, who: str) -> None:
    """Copy nbytes between this process's `local` and process pid's `remote` address."""
    done = 0
    while done < nbytes:
        lo, re = _Iov(local + done, nbytes - done), _Iov(remote + done, nbytes - done)
        got = fn(pid, ctypes.byref(lo), 1, ctypes.byref(re), 1, 0)
        if got > 0:
            done += got
            continue
        err = ctypes.get_errno() if got < 0 else errno.EFAULT
        if err == errno.EINTR:
            continue
        if err == errno.ESRCH:
            raise PeerFailure(f"{who}: its process {pid} is gone")
        raise TransportError(f"{who}: cross-memory copy of {nbytes} bytes failed after {done}: "
                             f"{errno.errorcode.get(err, err)}")


def probe(pid: int, address: int) -> bool:
    """Whether this process may read 8 bytes at `address` of process pid (its signal board)."""
    fns = _calls()
    if fns is None:
        return False
    tmp = np.zeros(1, np.int64)
    lo, re = _Iov(tmp.ctypes.data, 8), _Iov(address, 8)
    return fns[1](pid, ctypes.byref(lo), 1, ctypes.byref(re), 1, 0) == 8


class CmaLink(Link):
    """A peer of this host: the kernel copies into its window; signals go to its board."""

    kind = "cma"

    def __init__(self, peer: int, pid: int, address: int, board, who: str):
        self.peer, self.pid, self.address, self.board, self.who = peer, pid, address, board, who
        self.write, self.read = _calls()
        self.lock = threading.Lock()            # this rank's row of the peer's board: one writer

    def put(self, src, offset, slot):
        if src.size:
            _move(self.write, self.pid, src.ctypes.data, self.address + offset, src.size, self.who)
        if slot >= 0:
            self.signal(slot, 1)

    def get(self, dst, offset):
        if dst.size:
            _move(self.read, self.pid, dst.ctypes.data, self.address + offset, dst.size, self.who)

    def signal(self, slot, value):
        with self.lock:
            self.board.add(slot, value)

    def failure(self):
        return None if pid_alive(self.pid) else f"its process {self.pid} exited"

    def close(self):
        self.board.close()
