"""The memory-registration cache (MRCache): registered buffers of one device, by address range.

Its own module because its lifetime rules (weak references to owning arrays, LRU eviction,
`forget` before memory is freed) are the one subtle part shared by the connections and the
staged engine; see the package docstring.
"""
import threading
import weakref

from ...errors import TransportError
from .verbs import _errstr, _native


class _Entry:
    __slots__ = ("start", "end", "access", "mr", "lkey", "rkey", "keep", "users", "dead", "nbytes")


class MRCache:
    """Registered buffers of one device, found by address range (see the module docstring)."""

    def __init__(self, dev, limit_bytes: int):
        self.dev = dev
        self.limit = limit_bytes
        self.entries = []            # LRU first, MRU last
        self.bytes = 0
        self.lock = threading.Lock()
        self.hits = self.misses = 0
        self._dead = []

    def acquire(self, view: memoryview, access: int) -> _Entry:
        """The entry covering `view` with at least `access`; its user count is raised."""
        ffi, _ = _native()
        addr = int(ffi.cast("uintptr_t", ffi.from_buffer(view)))
        end = addr + view.nbytes
        with self.lock:
            self._reap()
            for i in range(len(self.entries) - 1, -1, -1):
                e = self.entries[i]
                if not e.dead and e.start <= addr and end <= e.end and (e.access & access) == access:
                    if i != len(self.entries) - 1:
                        self.entries.append(self.entries.pop(i))
                    e.users += 1
                    self.hits += 1
                    return e
            e = self._register(view, addr, end, access)
            e.users += 1
            self.misses += 1
            self.entries.append(e)
            self.bytes += e.nbytes
            self._evict()
            return e

    @staticmethod
    def release(e: _Entry) -> None:
        e.users -= 1

    def forget(self, e: _Entry) -> None:
        """Release `e` and deregister it now: its memory is about to be freed (a later buffer
        at the same address must not find the old registration)."""
        _, lib = _native()
        with self.lock:
            e.users -= 1
            e.dead = True
            if e in self.entries and e.users == 0:
                self.entries.remove(e)
                self.bytes -= e.nbytes
                lib.pv_dereg_mr(e.mr)
                e.mr, e.keep = None, None

    def _register(self, view, addr, end, access) -> _Entry:
        ffi, lib = _native()
        region, owner = self._region(view, addr, end)
        ptr = ffi.from_buffer(region)
        start = int(ffi.cast("uintptr_t", ptr))
        n = region.nbytes
        lkey, rkey = ffi.new("uint32_t *"), ffi.new("uint32_t *")
        err = ffi.new("char[512]")
        mr = lib.pv_reg_mr(self.dev.handle, ptr, max(n, 1), access, lkey, rkey, err, 512)
        if mr == ffi.NULL:
            raise TransportError(f"{self.dev.name}: {_errstr(err)}")
        e = _Entry()
        e.start, e.end, e.access, e.mr, e.lkey, e.rkey = start, start + n, access, mr, lkey[0], rkey[0]
        e.users, e.dead, e.nbytes = 0, False, n
        if owner is not None:
            dead = self._dead

            def _gone(_ref, e=e):          # runs in whatever thread freed the array: no lock
                e.dead = True
                dead.append(e)
            e.keep = weakref.ref(owner, _gone)
        else:
            e.keep = region              # holds the memory (and blocks resizing) until evicted
        return e

    @staticmethod
    def _region(view, addr, end):
        """(the largest contiguous buffer around `view` we can keep valid, owner to weak-ref)."""
        obj = view.obj
        owner = None
        try:
            import numpy as np
            if isinstance(obj, np.ndarray):
                o = obj
                while isinstance(o.base, np.ndarray):
                    o = o.base
                if o.base is None and o.flags.owndata:
                    owner = o
        except ImportError:
            pass
        try:
            whole = memoryview(obj)
            if whole.c_contiguous:
                if whole.ndim != 1 or whole.format != "B":
                    whole = whole.cast("B")
                ffi, _ = _native()
                s = int(ffi.cast("uintptr_t", ffi.from_buffer(whole)))
                if s <= addr and end <= s + whole.nbytes:
                    return whole, owner
        except (TypeError, ValueError, BufferError):
            pass
        return view, None

    def _reap(self) -> None:
        _, lib = _native()
        while self._dead:
            e = self._dead.pop()
            if e in self.entries and e.users == 0:
                self.entries.remove(e)
                self.bytes -= e.nbytes
                lib.pv_dereg_mr(e.mr)
                e.mr = None

    def _evict(self) -> None:
        _, lib = _native()
        i = 0
        while self.bytes > self.limit and i < len(self.entries) - 1:
            e = self.entries[i]
            if e.users:
                i += 1
                continue
            self.entries.pop(i)
            self.bytes -= e.nbytes
            lib.pv_dereg_mr(e.mr)
            e.mr, e.keep, e.dead = None, None, True
