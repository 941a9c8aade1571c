"""The entry from the communicator: ``submit`` runs one collective on CUDA buffers through the
communicator's ordered execution; ``CudaWork`` is the Work of an async one; ``_signature`` is
the 63-bit word every rank of a call must agree on (checked by the kernels and the mailbox)."""
import zlib

from ...buffers import Buffer
from ...errors import InvalidArgument


# ---- entry from the communicator ---------------------------------------------------------------
def submit(comm, name, async_op, sig, *args):
    """Run collective `name` on CUDA buffers through `comm`'s ordered execution.

    args are the collective's arguments (Buffers, ops, roots, splits) as the communicator
    validated them. Called on the caller's thread, which fixes the caller's stream."""
    bufs = [a for a in args if isinstance(a, Buffer)]
    devs = {b.device for b in bufs}
    if "cpu" in devs:
        raise InvalidArgument(f"{name}: buffers are on {sorted(devs)}; all of one call's buffers must be on "
                              f"the same device")
    if len(devs) != 1:
        raise InvalidArgument(f"{name}: buffers are on several GPUs {sorted(devs)}; one GPU per rank")
    dev = bufs[0].array.device
    cc = getattr(comm, "cuda", None)
    if getattr(cc, "staged", False) or (cc is None and len({i.get("host") for i in comm.peer_info}) > 1):
        from ..staged import submit as staged          # ranks on several hosts: ccl/engines/staged.py
        return staged(comm, name, async_op, sig, *args)
    if cc is None:
        comm._check_usable(name)
        from .engine import CudaCollectives
        cc = comm.cuda = CudaCollectives(comm, dev)
    elif cc.dev != dev:
        raise InvalidArgument(f"{name}: buffer is on cuda:{dev} but this communicator's rank {comm.rank} works "
                              f"on cuda:{cc.dev} (one GPU per rank and communicator)")
    method = getattr(cc, name, None)
    if method is None:
        raise InvalidArgument(f"{name}: not implemented for CUDA buffers yet; use a CPU copy")
    caller = bufs[0].array.caller_stream()
    join = not async_op
    signature = _signature(name, sig)

    def fn(what):
        return method(what, caller, join, signature, *args)
    if async_op and comm._inflight == 0:
        # Nothing queued before it: enqueue right here (it never blocks the host) instead of
        # handing it to the communicator's thread; the caller's stream is not made to wait.
        return CudaWork(Enqueued(comm._submit(name, fn, False, sig), name), cc, bufs[0].array)
    work = comm._submit(name, fn, async_op, sig)
    if async_op:
        return CudaWork(work, cc, bufs[0].array)
    if cc.sync_each:
        cc.synchronize(name)
    return None


class Enqueued:
    """The host side of a collective that was enqueued inline on the caller's stream: already
    done for the host (its error, if any, was raised by the call itself), so waiting is a no-op."""
    __slots__ = ("result", "what")

    def __init__(self, event, what):
        self.result, self.what = event, what

    def wait(self, timeout=None):
        return True

    def is_completed(self):
        return True

    def exception(self):
        return None


_SIGS = {}


def _signature(name, sig) -> int:
    """63 bits every rank must agree on: op, dtype, root, reduction and count (all_to_all's
    counts may differ per rank; its splits are checked pairwise instead)."""
    count = 0 if name.startswith("all_to_all") else int(sig.get("count", 0))
    key = (name, sig.get("dtype"), sig.get("root"), sig.get("redop"))
    head = _SIGS.get(key)
    if head is None:
        if len(_SIGS) > 4096:
            _SIGS.clear()
        head = _SIGS[key] = (zlib.crc32("|".join(map(str, key)).encode()) & 0x7FFFFFFF) << 32
    return head | (count & 0xFFFFFFFF)


class CudaWork:
    """The Work of an async collective on CUDA buffers (see the module doc for the semantics)."""

    def __init__(self, work, cc, view):
        self._work, self._cc, self._view = work, cc, view
        self.what = work.what

    def _event(self):
        self._work.wait()                        # host: the enqueue has happened (raises its errors)
        return self._work.result

    def wait(self, timeout=None) -> bool:
        ev = self._event()
        cc = self._cc
        cc.rt.streamWaitEvent(self._view.caller_stream(), ev, 0)
        if timeout is not None:
            cc.synchronize(self.what, ev, timeout)
        else:
            cc.raise_if_failed(self.what)
        return True

    def is_completed(self) -> bool:
        if not self._work.is_completed():
            return False
        if self._work.exception() is not None:
            return True
        return self._cc.rt.eventQuery(self._work.result) == 0

    def exception(self):
        return self._work.exception()

    @property
    def result(self):
        return None
