"""What every window has, host or CUDA: its name and number, the set-up exchange, the slot and
count checks, and the context manager. `Window` (ccl/windows/window.py, host memory) and
`CudaWindow` (ccl/windows/cuda.py, device memory) build on it; a file of its own so that the
two do not import each other."""
import itertools
import weakref

import numpy as np

from ..errors import InvalidArgument

DEFAULT_SIGNALS = 64
_NUMBERS = weakref.WeakKeyDictionary()    # communicator -> its window numbers (the same on every rank)


class WindowBase:
    """The parts of a window that do not depend on where its memory is."""

    def _base_init(self, comm, b, nslots):
        """What every window has (the CUDA window too): its communicator, number and name."""
        self.comm, self.rank, self.size = comm, comm.rank, comm.size
        self.number = next(_NUMBERS.setdefault(comm, itertools.count()))
        self.name = f"{comm.tag} window {self.number}"
        self.buffer, self.dtype, self.signals = b, b.dtype, nslots
        self.timeout = comm.timeout

    def _exchange(self, record: bytes) -> list:
        out = np.zeros(self.size * len(record), np.uint8)
        self.comm.all_gather(out, np.frombuffer(record, np.uint8).copy())
        return [out[r * len(record):(r + 1) * len(record)].tobytes() for r in range(self.size)]

    def _slot(self, op, slot):
        if not isinstance(slot, (int, np.integer)) or not 0 <= slot < self.signals:
            raise InvalidArgument(f"{self.name} {op}: signal slot {slot!r} is not one of 0..{self.signals - 1}")
        return int(slot)

    def _in_window(self, op, what, b, peer, offset) -> int:
        """Byte offset of Buffer `b` placed at element `offset` of `peer`'s window: its dtype
        must be the window's and the elements must lie inside it (host and CUDA windows)."""
        if b.dtype != self.dtypes[peer]:
            raise InvalidArgument(f"{self.name} {op}: {what} has dtype {b.dtype}, rank {peer}'s window "
                                  f"holds {self.dtypes[peer]}")
        if not isinstance(offset, (int, np.integer)) or offset < 0 or offset + b.count > self.counts[peer]:
            raise InvalidArgument(f"{self.name} {op}: elements [{offset}, {offset} + {b.count}) lie outside "
                                  f"rank {peer}'s window of {self.counts[peer]} {self.dtypes[peer]} elements")
        return int(offset) * b.itemsize

    @staticmethod
    def _count(op, name, value, name_of):
        if not isinstance(value, (int, np.integer)) or value < 0:
            raise InvalidArgument(f"{name_of} {op}: {name}={value!r}; expected an integer >= 0")
        return int(value)

    def __enter__(self):
        return self

    def __exit__(self, exc_type, *exc):
        if exc_type is None:
            self.close()
        elif not self.closed:
            self._teardown()                 # no collective while failing: peers would wait on it

