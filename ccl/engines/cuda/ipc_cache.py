"""The peers' memory this rank has mapped (CUDA IPC), by purpose and size.

Opening, caching and closing a mapping is transports/cuda_ipc.IpcRegistry's (written once there);
this subclass adds, through its hooks, a size and a kind per mapping and its own eviction.
Why not IpcRegistry as it is: it keeps up to 512 mappings whatever their
size, and a mapping keeps the peer's allocation alive after the peer frees it (torch's
``empty_cache`` then gives nothing back: 848 MiB on 2 ranks in issue 32), and it may evict the
mapping of a peer's scratch, which the kernels still name through the device table. Here each
mapping has a kind:

* ``scratch``  a peer's flags and scratch (mapped by CudaState._share): never evicted, closed by
  suspend() (the peer frees them) and when the scratch is re-made;
* ``buffer``   a peer's user buffer named through the mailbox: LRU, bounded by
  PYCCL_CUDA_IPC_CACHE bytes (the newest stays even alone above it), closed by suspend();
* ``graph``    a user buffer named while a CUDA graph was being captured: the graph's replays
  use this very mapping, so it stays until close() (it costs no memory of its own: the
  buffer belongs to the graph's pool on the peer);
* ``kept``     anything opened by other users of the registry (CUDA windows, ccl/windows/cuda.py,
  which close their own): never evicted nor closed here.
"""
from pyccl.transports import cuda_ipc


class PeerMappings(cuda_ipc.IpcRegistry):
    """IpcRegistry with sizes, kinds and a byte bound (see the module docstring)."""

    def __init__(self, rank: int, store, timeout: float, max_bytes: int, max_open: int = 512):
        super().__init__(rank, store, timeout, max_open)
        self.max_bytes = max_bytes
        self.mode = "kept"            # the kind of mappings opened (or used) now (the engine sets it)
        self.sizes = {}               # (peer, buffer id) -> bytes
        self.kinds = {}               # (peer, buffer id) -> kind

    def _reused(self, key):
        if self.mode in ("graph", "scratch", "kept") and self.kinds.get(key) == "buffer":
            self.kinds[key] = self.mode

    def _added(self, key, raw):
        self.sizes[key] = cuda_ipc.published_size(raw)
        self.kinds[key] = self.mode

    def _evict(self, keep):
        """Close the least recently used user-buffer mappings while over the count or byte bound."""
        lru = [k for k in self.opened if self.kinds.get(k) == "buffer" and k != keep]
        total = sum(self.sizes.get(k, 0) for k in lru) + (self.sizes.get(keep, 0)
                                                          if self.kinds.get(keep) == "buffer" else 0)
        while lru and (len(self.opened) > self.max_open or total > self.max_bytes):
            k = lru.pop(0)
            total -= self.sizes.get(k, 0)
            if self.before_close is not None:
                self.before_close()
            self.close_mapping(k)

    def close_mapping(self, key):
        super().close_mapping(key)
        self.sizes.pop(key, None)
        self.kinds.pop(key, None)

    def close_kinds(self, kinds, keys=None) -> int:
        """Close every mapping of `kinds` (or just `keys`); returns the bytes let go."""
        gone = 0
        for k in list(self.opened):
            if self.kinds.get(k) in kinds and (keys is None or k in keys):
                gone += self.sizes.get(k, 0)
                self.close_mapping(k)
        return gone

    def mapped(self) -> dict:
        """{kind: bytes mapped}."""
        out = {"scratch": 0, "buffer": 0, "graph": 0, "kept": 0}
        for k in self.opened:
            kind = self.kinds.get(k, "kept")
            out[kind] = out.get(kind, 0) + self.sizes.get(k, 0)
        return out

    def close(self):
        super().close()
        self.sizes.clear()
        self.kinds.clear()
