"""The one engine that runs every plan over every transport.

It walks a plan's passes in the order topology/walk.py gives ("for chunk: for stage: for
op", each op on its chunk), posts sends and receives on the peers' connections, and keeps
many chunks in flight: sends complete in the background while later chunks are received
and reduced, which is the pipelining.
A region that a pending send still reads is not overwritten until that send is done.
Every wait is bounded by the communicator's timeout and names what it was waiting for.
"""
import os
import select
import time

import numpy as np

from pyccl.topology.plan import COPY, RECV, RECV_COPY_SEND, RECV_REDUCE_SEND, SEND
from pyccl.topology.walk import layout, passes
from .. import settings
from ..errors import PeerFailure, Timeout, TransportError
from ..reduce import reduce_into

_EMPTY = np.empty(0, dtype=np.uint8)

#: Seconds of polling before the engine sleeps in select()/sleep() (PYCCL_SPIN_US).
SPIN_SECONDS = settings.get("PYCCL_SPIN_US") * 1e-6
#: More ranks than cores on this host: yield the CPU between polls so the peer can run.
OVERSUBSCRIBED = (settings.get("PYCCL_LOCAL_SIZE") or int(os.environ.get("LOCAL_WORLD_SIZE", "1"))) > \
    len(os.sched_getaffinity(0))


class _Recv:
    """A receive in flight and what to do when it lands."""

    __slots__ = ("op", "req", "dst", "src", "scratch", "peer")

    def __init__(self, op, req, dst, src, scratch):
        self.op, self.req, self.dst, self.src, self.scratch = op, req, dst, src, scratch
        self.peer = op.recv_peer


class Executor:
    def __init__(self, rank: int, conns: dict, timeout: float, chunk_bytes: int, tag: str, names=None):
        self.rank = rank
        # how errors name rank r: "rank r", with its host across hosts (Communicator.names)
        self.names = names or {}
        self.conns = conns
        self.timeout = timeout
        self.chunk_bytes = chunk_bytes
        self.tag = tag
        self._scratch = {}
        self.where = ""          # what the engine is doing now, for error messages

    def _scratch_for(self, i: int, dtype, n: int) -> np.ndarray:
        key = (i, dtype.str if dtype.names is None else str(dtype))
        arr = self._scratch.get(key)
        if arr is None or arr.size < n or arr.dtype != dtype:
            arr = np.empty(max(n, 1), dtype=dtype)
            self._scratch[key] = arr
        return arr[:n]

    def run(self, plan, bufs: dict, op, what: str, chunk_bytes=None, call: int = 0, stager=None) -> None:
        """Execute `plan` on `bufs` ({"in","out","tmp"} -> flat numpy arrays).

        `op` is the ReduceOp for reducing plans; `what` names the call in errors; chunk_bytes
        (the tuner's) overrides the communicator's default; `call` (ccl/callsig.py) travels
        with every message, so a peer that runs a different call says which field differs.
        Atomic plans (whose ops read unions of regions written earlier) are never cut into
        chunks. `stager` (ccl/engines/staged.py: the buffers are pinned copies of device memory) is
        told the chunk layout and called before and after every pass, to copy in what the pass
        reads and copy out what it finalised."""
        arrays = dict(bufs)
        ref = arrays.get("out") if arrays.get("out") is not None else arrays.get("in")
        item = ref.itemsize if ref is not None else 1
        if plan.tmp_elems:
            arrays["tmp"] = self._scratch_for(-1, ref.dtype, plan.tmp_elems)
        elif "tmp" not in arrays:
            arrays["tmp"] = ref[:0] if ref is not None else _EMPTY
        alias = {}
        a_in, a_out = arrays.get("in"), arrays.get("out")
        if a_in is not None and a_out is not None and a_in.nbytes == a_out.nbytes and \
                a_in.__array_interface__["data"][0] == a_out.__array_interface__["data"][0]:
            alias["in"] = "out"
        raw = {k: memoryview(v.view(np.uint8)) for k, v in arrays.items() if v is not None}
        chunk_elems = max(1, (chunk_bytes or self.chunk_bytes) // item)
        lay = layout(plan, chunk_elems)         # the order of passes: topology/walk.py
        peers = lay.peers
        # open every connection this plan needs at once (lazy: ccl/bootstrap.py, transports/select.py)
        ensure = getattr(self.conns, "ensure", None)
        try:
            conns = ensure(peers) if ensure is not None else [self.conns[p] for p in peers]
        except (PeerFailure, TransportError, Timeout) as e:
            raise type(e)(f"{self._name(self.rank)} in {what}, opening connections: {e}") from None
        sends = []                     # (request, canonical buf, start, stop)
        if stager is not None:
            stager.start(plan, lay.counts, lay.total, alias, lay.chunk_elems)

        def canon(reg):
            return alias.get(reg.buf, reg.buf)

        def mv(reg):
            return raw[reg.buf][reg.start * item:reg.stop * item]

        def typed(reg):
            return arrays[reg.buf][reg.start:reg.stop]

        def protect(reg):
            """Wait until no pending send reads memory that `reg` is about to overwrite."""
            name = canon(reg)
            for s in sends:
                if not s[0].done and s[1] == name and s[2] < reg.stop and reg.start < s[3]:
                    self._drive(conns, lambda: s[0].done, f"send of {s[1]}[{s[2]}:{s[3]}]")

        def post_send(peer, reg):
            req = self.conns[peer].isend(mv(reg), call)
            if not req.done:
                sends.append((req, canon(reg), reg.start, reg.stop))

        for c, stages in passes(plan, chunk_elems):
            if stager is not None:
                stager.before(c)
            for si, steps in stages:
                active = []
                for oi, o, n, src, dst in steps:
                    self.where = f"{what} stage {si} chunk {c}/{n}: {o.kind}"
                    kind = o.kind
                    if kind == SEND:
                        post_send(o.send_peer, src)
                    elif kind == COPY:
                        protect(dst)
                        typed(dst)[...] = typed(src)
                    else:
                        protect(dst)
                        if kind in (RECV, RECV_COPY_SEND):
                            req = self.conns[o.recv_peer].irecv(mv(dst), call)
                            active.append(_Recv(o, req, dst, None, None))
                        else:
                            scratch = self._scratch_for(oi, arrays[dst.buf].dtype, dst.length)
                            req = self.conns[o.recv_peer].irecv(memoryview(scratch.view(np.uint8)), call)
                            active.append(_Recv(o, req, dst, src, scratch))
                while active:
                    self._drive(conns, lambda: any(a.req.done for a in active),
                                lambda: self._waiting(what, si, c, active))
                    still = []
                    for a in active:
                        if not a.req.done:
                            still.append(a)
                            continue
                        if a.scratch is not None:
                            reduce_into(typed(a.dst), typed(a.src), a.scratch, op)
                        if a.op.kind in (RECV_REDUCE_SEND, RECV_COPY_SEND):
                            post_send(a.op.send_peer, a.dst)
                    active = still
                if len(sends) > 64:
                    sends = [s for s in sends if not s[0].done]
            if stager is not None:
                stager.after(c)
        if sends:
            self._drive(conns, lambda: all(s[0].done for s in sends),
                        lambda: f"{what}: {sum(not s[0].done for s in sends)} sends still in flight at the end")
        self.where = ""

    def _name(self, r) -> str:
        return self.names.get(r) or f"rank {r}"

    def _waiting(self, what, si, c, active) -> str:
        parts = [f"{a.op.kind} from {self._name(a.peer)} ({a.req.nbytes} bytes)" for a in active if not a.req.done]
        return f"{what} stage {si} chunk {c}: waiting on " + ", ".join(parts)

    def _drive(self, conns, done, describe) -> None:
        """Progress every connection until done(): poll for SPIN_SECONDS (yielding the CPU
        between polls when ranks outnumber cores), then sleep in select()/sleep, waking as
        soon as a socket is ready, with a timeout that grows to 10 ms."""
        spin_end = None
        naps = 0
        while not done():
            moved = False
            try:
                for conn in conns:
                    if conn.progress():
                        moved = True
            except (PeerFailure, TransportError) as e:
                where = describe() if callable(describe) else describe
                raise type(e)(f"{self._name(self.rank)} in {where}: {e}") from None
            if moved:
                spin_end = None
                naps = 0
                continue
            now = time.monotonic()
            if spin_end is None:
                spin_end = now + SPIN_SECONDS
                deadline = now + self.timeout
            if now < spin_end:
                if OVERSUBSCRIBED:
                    os.sched_yield()
                continue
            if now > deadline:
                where = describe() if callable(describe) else describe
                raise Timeout(f"{self._name(self.rank)} timed out after {self.timeout:.0f}s in {where}")
            naps += 1
            self._idle_wait(conns, min(0.01, 0.00005 * naps))

    @staticmethod
    def _idle_wait(conns, seconds: float) -> None:
        rd, wr = [], []
        for conn in conns:
            h = conn.wait_handles()
            if h is None:
                time.sleep(min(seconds, 0.0005) if seconds > 0.0002 else 0)
                return
            rd += h[0]
            wr += h[1]
        if rd or wr:
            select.select(rd, wr, [], seconds)
        else:
            time.sleep(0)


