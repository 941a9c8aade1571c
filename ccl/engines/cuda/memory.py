"""What a CUDA communicator holds on the device and pinned on the host, and giving it back
while the communicator stays valid: ``memory()``, ``suspend()``, ``resume()``.

The interface every engine state that holds memory offers (see ccl/engines/memory.py, which
sums them for ``Communicator.memory()``)::

    memory() -> {"device.<purpose>" | "pinned.<purpose>" | "mapped.<purpose>": bytes}
    suspend()    # free what it can; the state stays usable
    resume()     # collective: every rank of the communicator calls it (or makes its next call)

Suspend (like NCCL 2.29's ncclCommSuspend(comm, NCCL_SUSPEND_MEM)): waits for this process's
work on the device, closes the mappings of the peers' scratch and user buffers, frees the
scratch regions and the reduce buffer. What stays: the control block (flags, the epoch counter
and the peer table: ~0.23 MiB in one allocation), the host status words, streams, events and
the loaded kernels. Resume allocates the scratch again *at the same sizes*, publishes it and
writes the new addresses into the peer table, where every kernel looks them up at run time:
so a CUDA graph captured before suspend() replays correctly after resume() (one-shot,
'kernel' two-shot, staged copies: nothing in their launch parameters moves). Two exceptions,
decided so rather than mapped at fixed virtual addresses (cuMemMap would need file-descriptor
passing between the ranks): (1) the peers' user buffers and the reduce buffer that a capture
named are kept (not unmapped, not freed) until close(); (2) a capture of the copy-engine
two-shot (PYCCL_CUDA_TWOSHOT=ce, or reduce-scatter segments of PYCCL_CUDA_RS_CE_MIN and more)
bakes the peers' scratch addresses into copy nodes: suspend() then raises InvalidArgument.
Never replay a graph while suspended (its kernels would find no scratch): resume() first.

``suspend(graphs=False)`` (Communicator.suspend(graphs=False)) is the caller's word that no
graph captured with this communicator is replayed again (capture anew after resume): then the
graphs' parts go too: the control block (its epoch is carried over to a new one at resume,
zeroed flags, the peer table written again), the kept buffers and mappings, and the loaded
kernels once no other communicator of the process on the device is active: every allocation of
this communicator is freed until resume. CUDA itself keeps some (measured on one H100,
bench/gpu_startup.py parts): the memory of unloaded kernel modules and of destroyed streams
(2 MiB for pyccl's 3) stays with the process's CUDA context, so cudaMemGetInfo does not see it
come back (library.py).
"""
import numpy as np

from ...errors import InvalidArgument
from .kernels import FLAG_WORDS, MAXR


class MemoryMixin:
    """memory / suspend / resume of CudaCollectives (the state it reads is CudaState's)."""

    def memory(self) -> dict:
        """{purpose: bytes} this communicator holds (see the module docstring for the keys).
        ``device.kernels`` is the process's loaded kernel images on this GPU (CUDA takes more
        for them: library.py), shared by its communicators; ``mapped.*`` is the peers' memory
        mapped here (theirs, not ours: it is freed when they free it and we unmap it)."""
        n = 2 * self.size
        mapped = self.registry.mapped() if not self._closed else {}
        tmp = getattr(self, "_tmp_buf", None)
        return {
            "device.control": self.ctrl_bytes if self.ctrl else 0,
            "device.scratch_oneshot": n * self.small_cap if self.small else 0,
            "device.scratch_twoshot": n * self.big_cap if self.big else 0,
            "device.reduce_buffer": tmp[1] if tmp else 0,
            "device.kernels": self._library.loaded_bytes if self._library is not None else 0,
            "pinned.status": 64 if self.status.ptr else 0,
            "mapped.peer_scratch": mapped.get("scratch", 0),
            "mapped.peer_buffers": mapped.get("buffer", 0),
            "mapped.graph_buffers": mapped.get("graph", 0),
            "mapped.windows": mapped.get("kept", 0),
        }

    def suspend(self, graphs=True):
        """Free the scratch, the reduce buffer and the peers' mappings (see the module docstring).
        graphs=False: no CUDA graph captured with this communicator is replayed again, so the
        control block and this communicator's hold on the loaded kernels go too (also when
        already suspended)."""
        if self._closed:
            return
        if not self.suspended:
            if self._big_pinned and graphs:
                raise InvalidArgument(f"suspend on {self.tag} (rank {self.rank}): a CUDA graph captured a copy-engine "
                                      f"two-shot, whose copies name the peers' scratch; suspending would move it. Use "
                                      f"PYCCL_CUDA_TWOSHOT=kernel for captured calls, suspend(graphs=False) if no "
                                      f"graph is replayed again, or do not suspend")
            rt = self.rt
            with self._device:
                rt.deviceSynchronize()             # our kernels (pyccl's stream, the torch lane's callers) are done
                self.registry.close_kinds(("scratch", "buffer"))
                for name in ("small", "big"):
                    p = getattr(self, name)
                    if p:
                        rt.free(p)
                        setattr(self, name, 0)
                for r in range(self.size):
                    self.tab_host[1 * MAXR + r] = 0
                    self.tab_host[2 * MAXR + r] = 0
                rt.memcpy(self.tab, self.tab_host.ctypes.data, self.tab_host.nbytes, 1)
            self.suspended = True
        with self._device:
            tmp = getattr(self, "_tmp_buf", None)
            if tmp is not None and (not self._tmp_pinned or not graphs):
                self.rt.free(tmp[0])
                self._tmp_buf = None
            self.forget_prepared()                 # prepared launches name the reduce buffer
            if not graphs:
                self._release_graph_parts()

    def _release_graph_parts(self):
        """What only captured graphs needed kept: the peers' buffers they named, their split
        tensors, then the control block (the device epoch is read back first and written into
        the new block by resume, so epochs go on growing) and the loaded kernels, unloaded when
        no other communicator of the process on this device is active (library.py)."""
        self.registry.close_kinds(("graph",))
        self._captured_splits = []
        self._tmp_pinned = self._big_pinned = False
        if self.ctrl:
            ep = np.zeros(2, dtype=np.uint64)
            self.rt.memcpy(ep.ctypes.data, self.ectr, 16, 2)                # device to host
            self.rt.free(self.ctrl)
            self._saved_epoch = int(ep[0])
            self.ctrl = self.flags = self.ectr = self.tab = 0
        self._mods.clear()                         # launchers of the kernels about to be unloaded
        if self._library is not None and not self._library_paused:
            from . import library
            library.pause(self.dev)
            self._library_paused = True

    def suspend_all(self):
        """suspend(graphs=False): ccl/suspension.py calls it for Communicator.suspend(graphs=False)."""
        self.suspend(graphs=False)

    def resume(self):
        """Allocate and publish the scratch again, same sizes (collective: every rank); the
        control block too, where suspend(graphs=False) gave it back."""
        if not self.suspended or self._closed:
            return
        rt = self.rt
        self._gen += 1
        with self._device:
            if not self.ctrl:
                self._alloc_control()
                ep = np.array([self._saved_epoch, 0], dtype=np.uint64)
                rt.memcpy(self.ectr, ep.ctypes.data, 16, 1)                 # host to device
            if self._library_paused:
                from . import library
                library.unpause(self.dev)
                self._library_paused = False
            self.small = rt.malloc(2 * self.size * self.small_cap)
            self._share(f"base.g{self._gen}", [self.flags, self.small], [0, 1])
            if self.big_cap:
                self.big = rt.malloc(2 * self.size * self.big_cap)
                self._big_keys = self._share(f"big.g{self._gen}", [self.big], [2])
        self.suspended = False

    # ---- helpers the state uses -------------------------------------------------------------
    def _alloc_control(self):
        """flags | epoch counter (16 B) | peer table, one allocation (one 2 MiB page at most
        stays through suspend)."""
        rt = self.rt
        flags_b = FLAG_WORDS * 8
        self.ctrl_bytes = flags_b + 16 + 3 * MAXR * 8
        self.ctrl = rt.malloc(self.ctrl_bytes)
        rt.memset(self.ctrl, 0, self.ctrl_bytes)
        self.flags = self.ctrl
        self.ectr = self.ctrl + flags_b
        self.tab = self.ectr + 16

    def _capture_now(self) -> bool:
        """Whether the call being made is captured into a CUDA graph (the caller's stream)."""
        caller = self._caller
        return bool(caller) and self._capturing(caller)
