"""Point-to-point calls of ProcessGroupPyccl (a mixin of group.py): send, recv, recv from any
source, and Gloo's monitored_barrier, all on the p2p engine (p2p_engine.py). CUDA tensors go
GPU to GPU through CUDA IPC to a rank of the same host (p2p_ipc.py; on unless PYCCL_P2P_IPC=0) and
are staged through pinned host memory otherwise (see "CUDA tensors" in the package doc).
Under CUDA-graph capture the p2p engine (a host thread matching tags) cannot take part, so CUDA
send/recv go to the communicator's stream-ordered send/recv instead (across hosts the proxy
engine, ccl/engines/proxy/): ordered with the collectives and matched by order, not by tag, as
NCCL's; what cannot run that way raises InvalidArgument at capture."""
import time

import torch

from ..errors import InvalidArgument, PeerFailure, PycclError, Timeout

from .p2p_ipc import CudaRecv
from .tensors import _bytes, _contig, _nbytes, _single
from .works import _SYNC_DONE, _PycclWork, _seconds

_MONITOR_TAG = -(1 << 40)             # outside torch's int32 tag range: never a user tag


class PointToPointMixin:
    """send/recv/recv_anysource and monitored_barrier of ProcessGroupPyccl."""

    def monitored_barrier(self, timeout=None, wait_all_ranks=False):
        """Gloo's monitored barrier: rank 0 hears from every rank within `timeout` (else raises
        naming the missing ranks), then releases them."""
        limit = _seconds(timeout) or self._timeout
        token = torch.zeros(1, dtype=torch.uint8)
        what = self._what("monitored_barrier")
        if self._rank != 0:
            w = self._p2p_send(token, 0, _MONITOR_TAG, "monitored_barrier")
            r = self._p2p_recv(torch.zeros(1, dtype=torch.uint8), 0, _MONITOR_TAG + 1, "monitored_barrier")
            try:
                w.wait(limit)
                r.wait(limit)
            except Timeout:
                raise Timeout(f"{what}: rank 0 did not release rank {self._rank} within {limit:g}s") from None
            return
        recvs = {p: self._p2p_recv(torch.zeros(1, dtype=torch.uint8), p, _MONITOR_TAG, "monitored_barrier")
                 for p in range(1, self._size)}
        deadline = time.monotonic() + limit
        missing = []
        for p, w in recvs.items():
            try:
                w.wait(max(0.001, deadline - time.monotonic()))
            except Timeout:
                missing.append(p)
                if not wait_all_ranks:
                    raise Timeout(f"{what}: Rank {p} failed to pass monitoredBarrier in {limit * 1000:.0f} ms") \
                        from None
            except PycclError as e:
                missing.append(p)
                if not wait_all_ranks:
                    raise PeerFailure(f"{what}: Rank {p} failed to pass monitoredBarrier: {e}") from None
        if missing:
            raise Timeout(f"{what}: Ranks {', '.join(map(str, missing))} failed to pass monitoredBarrier in "
                          f"{limit * 1000:.0f} ms")
        for p in range(1, self._size):
            self._p2p_send(torch.zeros(1, dtype=torch.uint8), p, _MONITOR_TAG + 1, "monitored_barrier")

    # ===== point-to-point ===================================================================
    def _peer_ok(self, peer, what):
        if not isinstance(peer, int) or not 0 <= peer < self._size:
            raise InvalidArgument(f"{what}: rank {peer!r} is outside this group (0..{self._size - 1})")
        return peer

    def _p2p_captured(self, op, flat, wb, peer):
        """A CUDA send/recv inside a CUDA-graph capture: the communicator's (see the module doc)."""
        if peer is None:
            raise InvalidArgument("pyccl recv from any source cannot be captured in a CUDA graph")
        try:
            getattr(self._comm, op)(flat, peer)
        except PycclError as e:
            raise InvalidArgument(f"pyccl {op} cannot be captured in a CUDA graph here: {e}") from None
        wb()
        return _SYNC_DONE

    def _p2p_send(self, t, peer, tag, name):
        flat, _ = _contig(t)
        if flat.is_cuda and torch.cuda.is_current_stream_capturing():
            return self._p2p_captured("send", flat, lambda: None, peer)
        work = _PycclWork(self._what(f"{name} to rank {peer}"), [t])
        if flat.is_cuda:
            ipc = self._p2p.ipc
            if ipc is not None and peer != self._rank and flat.numel() and ipc.reaches(peer):
                # Same host: copy into a staging block on the caller's stream; the engine
                # announces it once that copy has happened, the peer copies it GPU to GPU.
                staged = ipc.stage(flat)
                if staged is not None:
                    block, ready = staged
                    self._p2p.send(None, peer, tag, work, ready, block=block)
                    return work
            # Staged (module doc): copy to pinned memory on the caller's stream; the engine
            # sends once that copy has happened. t may be changed as soon as this returns.
            host = torch.empty(_nbytes(flat), dtype=torch.uint8, pin_memory=True)
            host.copy_(_bytes(flat), non_blocking=True)
            ready = torch.cuda.Event()
            ready.record()
            self._p2p.send(host, peer, tag, work, ready)
            return work
        self._p2p.send(_bytes(flat), peer, tag, work)   # in place: do not modify t before wait()
        return work

    def _p2p_recv(self, t, peer, tag, name):
        src = "any rank" if peer is None else f"rank {peer}"
        flat, wb = _contig(t)
        if flat.is_cuda and torch.cuda.is_current_stream_capturing():
            return self._p2p_captured("recv", flat, wb, peer)
        work = _PycclWork(self._what(f"{name} from {src}"), [t])
        if flat.is_cuda:
            # The engine thread copies the bytes to the GPU (from a peer's GPU, or from pinned
            # memory) on a pyccl stream that waits for the caller's stream as it is now, and
            # hands the copy's event to the Work (wait() joins it).
            target = CudaRecv(flat, wb, work, self._p2p_streams)
            self._p2p.recv(None, peer, tag, work, target.writeback, target=target)
            return work
        self._p2p.recv(_bytes(flat), peer, tag, work, wb)
        return work

    def p2p_stats(self):
        """Counters of this group's point-to-point CUDA paths (p2p_engine._P2PEngine.stats):
        e.g. ``ipc_sent``/``ipc_received``, the messages that went GPU to GPU."""
        return self._p2p.stats()

    def send(self, tensors, dstRank, tag=0):
        t = _single(tensors, "send")
        self._check_usable("send")
        return self._p2p_send(t, self._peer_ok(int(dstRank), "send"), tag, "send")

    def recv(self, tensors, srcRank, tag=0):
        t = _single(tensors, "recv")
        self._check_usable("recv")
        return self._p2p_recv(t, self._peer_ok(int(srcRank), "recv"), tag, "recv")

    def recv_anysource(self, tensors, tag=0):
        t = _single(tensors, "recv_anysource")
        self._check_usable("recv_anysource")
        return self._p2p_recv(t, None, tag, "recv")

    def _check_usable(self, what):
        if self._closed:
            raise PycclError(f"pyccl {what}: the process group is shut down")
