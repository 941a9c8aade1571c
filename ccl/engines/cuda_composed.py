"""CUDA buffers across hosts with several ranks per host: the phases of ccl/engines/composed.py with
the GPU's own engine inside each host and the staged network between hosts.

H hosts of L ranks; my host h, my local index j; my *rail* is the ranks with local index j, one
per host. all_gather and reduce_scatter work on a *rail-major* stage of every rank's block
(block of rank members[h][j] at position j * H + h, as ccl/engines/composed.py's ``_rail_major``), in
which rail j's H blocks are contiguous (the rail phase's buffer) and the L rails follow each
other (the local phase's buffer).

  all_reduce     1. local reduce_scatter on the CUDA IPC engine (ccl/engines/cuda/) among
                    the ranks of my host, in place: my shard of the buffer then holds my host's
                    sum;
                 2. rail all_reduce of my shard, staged through pinned host memory
                    (ccl/engines/staged.py: device-to-host copies, the executor's passes and
                    host-to-device copies pipelined), every local rank on its own rail at once:
                    a host sends each byte of its sum across the network once, split over its
                    L ranks, instead of every rank staging and sending the whole buffer;
                 3. local all_gather on the CUDA IPC engine, in place.
                 A count not divisible by L leaves a tail of < L elements that rides on the last
                 rail: local reduce to local rank L-1, its rail, local broadcast (as on the CPU).
  all_gather     1. rail all_gather of my input, staged, into my rail's segment of the stage
                    (H blocks, by host);
                 2. local all_gather of those segments on the CUDA IPC engine, in place: the
                    stage then holds every rank's block;
                 3. the stage copied into the output in the communicator's rank order, on the
                    local engine's stream (one strided cudaMemcpy2DAsync per run of blocks: L
                    copies when ranks are numbered host by host).
  reduce_scatter 1. the input copied into the stage (rail-major order; the same strided copies);
                 2. local reduce_scatter on the CUDA IPC engine of the L segments (H blocks each),
                    in place: local rank j's segment then holds my host's sum of the H blocks
                    that rail j delivers, one per host;
                 3. rail reduce_scatter of that segment, staged, into the output.
  broadcast      1. rail broadcast among the root's rail ("leaders"), staged;
                 2. local broadcast on the CUDA IPC engine.

The stage of all_gather and reduce_scatter is a scratch CUDA buffer of this object (H x L
blocks, allocated with cudaMalloc and grown as needed, kept until close), except when the
rail-major order is the communicator's rank order (ranks dealt to hosts round robin: rank =
j * H + h): then the output is all_gather's stage (phase 1 writes straight into it, no phase
3) and the input is reduce_scatter's (no phase 1: the local phase reduces from it, which stays
unchanged, into a scratch segment of H blocks). A count of 0 is a no-op, ordered on the
streams like every call. In-place calls (the input is this rank's block of the output, or the
output this rank's block of the input) work: what reads the input is done before anything
writes that block.

AVG: the local phases sum and the staged rail phase divides by the communicator's size when it
copies the result back (``_Call.avg``), so every element is divided once, on the host, as in
the one-phase staged path (all_reduce, reduce_scatter).

The other collectives (reduce, all_to_all(v), gather, scatter) stay staged whole through the
communicator's CPU plan (ccl/engines/staged.py); so do hosts with unequal rank counts, reproducible
mode for the reducing collectives (ccl/engines/reproducible.py fixes its own order),
``PYCCL_CUDA_COMPOSED=0``, and messages under ``PYCCL_CUDA_COMPOSED_MIN`` bytes (default 0, or
SHARED_GPU_MIN below when ranks of one host share a GPU; the message is the largest buffer of
the call: all_gather's output, reduce_scatter's input).

Streams: the local phases and the copies into or out of the stage run on the local engine's
stream. A call's first phase starts after the caller's stream (as every CUDA collective); where
that is all_gather's staged rail, an event after both the caller's stream and the local
engine's earlier work (which may still use the scratch stage) gates its copies. A staged rail
after a local phase waits for an event after that phase; a local phase after the staged rail
waits for the staged phase's copies back (the staging's host-to-device stream is its
"caller"), and so does the event that ends reduce_scatter, whose rail is its last phase. The
caller's stream (synchronous) or ``work.wait()`` (async) waits for the event that ends the call
on the local engine's stream. Errors: a local kernel that gives up (dead peer, timeout,
mismatched call) leaves its reason in host memory; the host waits for a local phase before the
staged rail after it sends anything, so that phase's error raises in the same call, naming the
phase; the network phase raises the executor's errors (op, peer, step) like every staged call.
"""
from types import SimpleNamespace

from pyccl.topology.composed import applicable

from .. import settings
from ..buffers import Buffer
from ..cuda_buffers import CudaView
from ..dtypes import AVG, SUM
from ..errors import PycclError
from .composed import with_host_ranks

OPS = ("all_reduce", "all_gather", "reduce_scatter", "broadcast")
#: what is composed unless PYCCL_CUDA_COMPOSED_OPS (a comma-separated list out of OPS) says
#: otherwise: all four, since all_gather and reduce_scatter (the last two) passed
#: tests/test_cuda_multihost.py on an H100 on 2026-12-07 (bench/JOURNAL.md, 2026-12-07 "Run on an H100").
DEFAULT_OPS = ("all_reduce", "broadcast", "all_gather", "reduce_scatter")


def composed_ops():
    v = settings.get("PYCCL_CUDA_COMPOSED_OPS")
    return DEFAULT_OPS if v is None else tuple(x.strip() for x in v.split(",") if x.strip())

#: cudaDevAttrMaxPitch: the largest pitch (bytes) of a cudaMemcpy2DAsync
_MAX_PITCH_ATTR = 11


#: Smallest message (bytes) composed when some host's ranks share one GPU (ranks posing as hosts
#: on a lent 1-GPU machine): there every local phase waits for kernels of other processes that
#: time-slice the GPU (2-4.5 ms each), and the flat staged path, which makes no GPU kernel wait
#: for another process, wins below this. Measured on one H100, 2 hosts x 2 ranks
#: (bench/JOURNAL.md, 2026-12-06 "several ranks per host", run 0): composed/flat busbw 0.08x at
#: 1 MiB, 0.52x at 16 MiB, 1.36x at 64 MiB.
SHARED_GPU_MIN = 32 << 20


def wanted(comm, name, nbytes, st) -> bool:
    """Whether `name` on CUDA buffers of `comm` takes the composition (else the flat staging).
    The same answer on every rank: it depends only on the call, the topology, the environment
    and the GPUs of all ranks (exchanged once)."""
    if name not in OPS or name not in composed_ops() or not settings.get("PYCCL_CUDA_COMPOSED"):
        return False
    if getattr(comm, "reproducible", False) and name in ("all_reduce", "reduce_scatter"):
        return False
    if not applicable(name, comm.topology):
        return False
    if st.composed_min is None:
        st.composed_min = _composed_min(comm, st.dev)
    if name == "reduce_scatter":        # `nbytes` is the first buffer's, the output: the message is the input
        nbytes *= comm.size
    return nbytes >= st.composed_min


def _composed_min(comm, dev) -> int:
    """PYCCL_CUDA_COMPOSED_MIN if set, else 0, or SHARED_GPU_MIN when two ranks of a host use
    the same GPU (every rank publishes its host and its GPU's PCI bus id once, in the store)."""
    fixed = settings.get("PYCCL_CUDA_COMPOSED_MIN")
    if fixed is not None:
        return fixed
    from pyccl.transports import cuda_ipc

    bus = cuda_ipc._cupy().cuda.runtime.deviceGetPCIBusId(dev)
    host = comm.peer_info[comm.rank].get("host")
    comm.store.set(f"cudagpu/{comm.rank}", f"{host}|{bus}".encode())
    seen = comm.store.multi_get([f"cudagpu/{r}" for r in range(comm.size)], comm.timeout)   # a PrefixStore
    return SHARED_GPU_MIN if len(set(seen)) < comm.size else 0


class _HostGroup:
    """The ranks of my host, seen by the CUDA engine as a communicator of their own (group
    ranks 0..L-1; store keys and the mailbox segment under the host's own prefix)."""

    def __init__(self, comm, hier, prefix="cudahost"):
        self.rank, self.size = hier.j, hier.L
        self.peer_info = [comm.peer_info[r] for r in hier.host]
        self.store = comm.prefixed(f"{prefix}{hier.h}")
        self.tag = f"{comm.tag}.{prefix}{hier.h}"
        self.timeout = comm.timeout
        self.reproducible = False
        # the torch lanes' view of call order (unused here: the composition runs in the
        # communicator's own order)
        self.queue = SimpleNamespace(seq=0, inflight=0, broken=None, closed=False)


def _part(buf, start, count):
    """Elements [start, start + count) of a CUDA Buffer, as a Buffer."""
    v = buf.array
    view = CudaView(v.ptr + start * v.itemsize, count, v.itemsize, v.device, v.kind, v.obj)
    return Buffer(view, buf.dtype, buf.device, buf.obj)


def _runs(pairs):
    """Block copies (dst, src) in the order given, merged into runs (dst0, src0, dst step,
    src step, blocks): consecutive copies whose destination and source both advance by the
    same positive steps are one strided copy (steps 1 and 1: one contiguous copy)."""
    runs, i, n = [], 0, len(pairs)
    while i < n:
        d0, s0 = pairs[i]
        dd = ds = 1
        k = 1
        if i + 1 < n:
            dd, ds = pairs[i + 1][0] - d0, pairs[i + 1][1] - s0
            if dd >= 1 and ds >= 1:
                while i + k < n and pairs[i + k] == (d0 + k * dd, s0 + k * ds):
                    k += 1
        if k == 1:
            dd = ds = 1
        runs.append((d0, s0, dd, ds, k))
        i += k
    return runs


def _sig(name, buf, **kw):
    from .cuda import _signature
    return _signature(name, dict({"dtype": buf.dtype, "count": buf.array.size, "root": -1, "redop": None}, **kw))


class CudaComposed:
    """The composed collectives on CUDA buffers of one communicator (one per Staging)."""
    host_group = "cudahost"          # the local engine's store prefix and tag


    def __init__(self, staging):
        from .cuda import CudaCollectives
        comm = staging.comm
        self.hier = h = staging.hier.ready()
        self.st = staging
        self.local = CudaCollectives(_HostGroup(comm, h, self.host_group), staging.dev)
        # the rail-major stage of all_gather / reduce_scatter: position j * H + h holds the block
        # of rank members[h][j] (ccl/engines/composed.py's _rail_major)
        rail_major = [h.members[hh][jj] for jj in range(h.L) for hh in range(h.H)]
        self.rank_order = rail_major == list(range(len(rail_major)))
        self._to_ranks = _runs([(r, p) for p, r in enumerate(rail_major)])      # stage -> rank order
        self._to_stage = _runs([(p, r) for p, r in enumerate(rail_major)])      # rank order -> stage
        self._scratch, self._scratch_cap = 0, 0
        with self.local._device:
            self._max_pitch = self.local.rt.deviceGetAttribute(_MAX_PITCH_ATTR, staging.dev)

    def _phase(self, what, n, name, fn, *args):
        where = f"{what}, phase {n} ({name})"
        try:
            return fn(where, *args)
        except PycclError as e:
            if name.startswith("local"):
                raise with_host_ranks(e, self.hier.h, self.hier.host) from None
            raise

    def _rail(self, what, after, op_name, part, op=None, root=0, inp=None):
        """The rail phase on `part` (in place; or from `inp` into `part`: all_gather,
        reduce_scatter), after the work queued on stream `after`; returns the stream its end is
        on. Here staged (the host moves the bytes: the copies back end on the staging's
        host-to-device stream); the proxy engine's composition (ccl/engines/proxy/composed.py)
        puts it on the stream instead."""
        from .staged_schedule import _Call
        st, rail = self.st, self.hier.rail
        caller_event = st.record_ready(after)
        v = part.array
        reducing = op_name in ("all_reduce", "reduce_scatter")
        if inp is None:
            plan, chunk = rail._tuned(op_name, v.size, v.itemsize, v.nbytes, root)

            def build(comm, buf):
                return _Call(plan, chunk, {"out": buf.array}, ("out",), ("out",), op if reducing else None,
                             reducing and op is AVG, True)
            st.run(what, build, caller_event, st.next_end(), (part,))
            return st.h2d
        i = inp.array
        # counts as the builders take them: all_gather the input's, reduce_scatter the output's
        count = i.size if op_name == "all_gather" else v.size
        plan, chunk = rail._tuned(op_name, count, v.itemsize, max(v.nbytes, i.nbytes))

        def build2(comm, out, src):
            return _Call(plan, chunk, {"in": src.array, "out": out.array}, ("in",), ("out",),
                         op if reducing else None, reducing and op is AVG)
        st.run(what, build2, caller_event, st.next_end(), (part, inp))
        return st.h2d

    def _local_done(self, what, n, end):
        """Before a rail phase that sends what a local phase made: wait for that phase, so that
        its failure (dead or departed local peer, mismatched call) raises before this rank sends
        anything on its rail (the rail's first copy waits for it anyway)."""
        self._phase(what, n, "local phase done", self.local.synchronize, end)

    def _rail_idle(self, what):
        """Block the host until the rail phases' copies back (into the scratch stage) are done."""
        st = self.st
        if st._last_end is not None:
            st.wait_event(st._last_end, what, "the copies back into the scratch stage")

    def _stage(self, what, like, count):
        """The scratch stage: `count` elements of `like`'s dtype, a CUDA Buffer (grown as
        needed; growing waits for our earlier local phases, which the peers' closing barriers
        order after their reads of it, and for the staged copies back into it)."""
        v = like.array
        need = count * v.itemsize
        if need > self._scratch_cap:
            local = self.local
            with local._device:
                if self._scratch:
                    local.synchronize(what)
                    self._rail_idle(what)
                    local.rt.free(self._scratch)
                    self._scratch, self._scratch_cap = 0, 0
                cap = -(-need // (1 << 20)) << 20
                self._scratch = local.rt.malloc(cap)
                self._scratch_cap = cap
        view = CudaView(self._scratch, count, v.itemsize, v.device, v.kind, None)
        return Buffer(view, like.dtype, like.device, None)

    def _copy_blocks(self, dst, src, runs, nb):
        """Block copies of `nb` bytes each (runs of _runs) from buffer `src` to `dst`, queued
        on the local engine's stream (copy engines; no kernel, no peer)."""
        rt, stream, cap = self.local.rt, self.local.stream, self._max_pitch
        for d0, s0, dd, ds, k in runs:
            d, s = dst + d0 * nb, src + s0 * nb
            if dd == 1 and ds == 1:
                rt.memcpyAsync(d, s, k * nb, 4, stream)                    # cudaMemcpyDefault
            elif k > 1 and dd * nb <= cap and ds * nb <= cap and hasattr(rt, "memcpy2DAsync"):
                rt.memcpy2DAsync(d, dd * nb, s, ds * nb, nb, k, 4, stream)
            else:                                   # a pitch past the device's limit
                for b in range(k):
                    rt.memcpyAsync(d + b * dd * nb, s + b * ds * nb, nb, 4, stream)

    def run(self, name, what, caller, args):
        """One composed collective, in call order (ccl/queue.py); returns the event that ends it
        on the local engine's stream."""
        if name == "all_reduce":
            return self._all_reduce(what, caller, *args)
        if name == "all_gather":
            return self._all_gather(what, caller, *args)
        if name == "reduce_scatter":
            return self._reduce_scatter(what, caller, *args)
        return self._broadcast(what, caller, *args)

    def _all_reduce(self, what, caller, buf, op):
        L, j, local = self.hier.L, self.hier.j, self.local
        n = buf.array.size
        if n == 0:
            return local._empty(caller, False)
        q = n // L
        m = q * L
        lop = SUM if op is AVG else op
        mine = _part(buf, j * q, q + (n - m if j == L - 1 else 0))      # the last rail takes the tail
        tail = _part(buf, m, n - m)
        end = None
        if q:
            end = self._phase(what, 1, "local reduce_scatter", local.reduce_scatter, caller, False,
                              _sig("reduce_scatter", _part(buf, 0, q), redop=lop.name), _part(buf, j * q, q),
                              _part(buf, 0, m), lop)
        if n > m:
            end = self._phase(what, 1, "local reduce of the tail", local.reduce, caller, False,
                              _sig("reduce", tail, root=L - 1, redop=lop.name), tail, L - 1, lop)
        self._local_done(what, 1, end)
        after = self._rail(what + ", phase 2 (rail all_reduce)", local.stream, "all_reduce", mine, op)
        if q:
            end = self._phase(what, 3, "local all_gather", local.all_gather, after, False,
                              _sig("all_gather", _part(buf, 0, q)), _part(buf, 0, m), _part(buf, j * q, q))
        if n > m:
            end = self._phase(what, 3, "local broadcast of the tail", local.broadcast, after, False,
                              _sig("broadcast", tail, root=L - 1), tail, L - 1)
        return end

    def _all_gather(self, what, caller, out, inp):
        H, L, j, local = self.hier.H, self.hier.L, self.hier.j, self.local
        c = inp.array.size
        with local._device:
            if c == 0:
                return local._empty(caller, False)
            stage = out if self.rank_order else self._stage(what, out, H * L * c)
            # the rail's copies wait for the caller and for our earlier local phases (which may
            # still read the scratch stage): an event after both on the local engine's stream
            local._begin(caller)
        piece = _part(stage, j * H * c, H * c)            # rail j's H blocks, by host
        after = self._rail(what + ", phase 1 (rail all_gather)", local.stream, "all_gather", piece, inp=inp)
        end = self._phase(what, 2, "local all_gather", local.all_gather, after, False,
                          _sig("all_gather", piece), stage, piece)
        if stage is not out:
            with local._device:
                self._copy_blocks(out.array.ptr, stage.array.ptr, self._to_ranks, inp.array.nbytes)
                end = local._end(after, False)
        return end

    def _reduce_scatter(self, what, caller, out, inp, op):
        H, L, j, local = self.hier.H, self.hier.L, self.hier.j, self.local
        c = out.array.size
        with local._device:
            if c == 0:
                return local._empty(caller, False)
            lop = SUM if op is AVG else op
            if self.rank_order:                    # the input is the stage (read only)
                stage, shard, after = inp, self._stage(what, out, H * c), caller
            else:
                stage = self._stage(what, out, H * L * c)
                shard = _part(stage, j * H * c, H * c)     # in place: my segment of the stage
                local._begin(caller)
                self._copy_blocks(stage.array.ptr, inp.array.ptr, self._to_stage, out.array.nbytes)
                after = local.stream
        end = self._phase(what, 2, "local reduce_scatter", local.reduce_scatter, after, False,
                          _sig("reduce_scatter", shard, redop=lop.name), shard, stage, lop)
        self._local_done(what, 2, end)
        after = self._rail(what + ", phase 3 (rail reduce_scatter)", local.stream, "reduce_scatter", out, op,
                           inp=shard)
        with local._device:
            return local._empty(after, False)        # the end, on the local engine's stream

    def _broadcast(self, what, caller, buf, root):
        h, local, st = self.hier, self.local, self.st
        if buf.array.size == 0:
            return local._empty(caller, False)
        rh = st.comm.topology.hosts[root]
        lead = h.members[rh].index(root)
        after = caller
        if h.j == lead:
            after = self._rail(what + ", phase 1 (rail broadcast among leaders)", caller, "broadcast", buf,
                               root=rh)
        return self._phase(what, 2, "local broadcast", local.broadcast, after, False,
                           _sig("broadcast", buf, root=lead), buf, lead)

    def abort(self):
        self.local.abort()

    def close(self):
        try:
            if self._scratch:
                with self.local._device:
                    try:
                        self.local.synchronize("close")
                    except PycclError:
                        pass
                    self.local.rt.free(self._scratch)
                self._scratch, self._scratch_cap = 0, 0
        finally:
            self.local.close()
