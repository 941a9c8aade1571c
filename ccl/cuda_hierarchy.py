"""CUDA buffers across hosts with several ranks per host: the three phases of ccl/hierarchy.py
with the GPU's own engine inside each host and the staged network between hosts.

  all_reduce  1. local reduce_scatter on the CUDA IPC engine (ccl/cuda_collectives) among the
                 ranks of my host, in place: my shard of the buffer then holds my host's sum;
              2. rail all_reduce of my shard, staged through pinned host memory (ccl/staging.py:
                 device-to-host copies, the executor's passes and host-to-device copies
                 pipelined), every local rank on its own rail at once: a host sends each byte
                 of its sum across the network once, split over its L ranks, instead of every
                 rank staging and sending the whole buffer;
              3. local all_gather on the CUDA IPC engine, in place.
              A count not divisible by L leaves a tail of < L elements that rides on the last
              rail: local reduce to local rank L-1, its rail, local broadcast (as on the CPU).
  broadcast   1. rail broadcast among the root's rail ("leaders"), staged;
              2. local broadcast on the CUDA IPC engine.

AVG: the local phases sum and the staged rail phase divides by the communicator's size when it
copies the result back (``_Call.avg``), so every element is divided once, on the host, as in
the one-phase staged path.

The other collectives (all_gather, reduce_scatter, reduce, all_to_all(v), gather, scatter)
stay staged whole through the communicator's CPU plan (ccl/staging.py); so do hosts with
unequal rank counts, reproducible mode (ccl/reproducible.py fixes its own order),
``PYCCL_CUDA_COMPOSED=0``, and messages under ``PYCCL_CUDA_COMPOSED_MIN`` bytes (default 0, or
SHARED_GPU_MIN below when ranks of one host share a GPU).

Streams: the local phases run on the local engine's stream; phase 1 starts after the caller's
stream (as every CUDA collective), the staged phase's copies wait for an event after phase 1,
phase 3 waits for the staged phase's copies back (the staging's host-to-device stream is its
"caller"), and the caller's stream (synchronous) or ``work.wait()`` (async) waits for the end
of phase 3. Errors: a local kernel that gives up (dead peer, timeout, mismatched call) leaves
its reason in host memory; the staged phase waits for phase 1 before it sends, so phase 3's
entry check raises it in the same call, naming the phase; the network phase raises the
executor's errors (op, peer, step) like every staged call.
"""
import os

from pyccl.topology.composed import applicable

from .buffers import Buffer
from .cuda_buffers import CudaView
from .dtypes import AVG, SUM
from .errors import PycclError
from .hierarchy import Hierarchy, with_host_ranks

OPS = ("all_reduce", "broadcast")


#: Smallest message (bytes) composed when some host's ranks share one GPU (ranks posing as hosts
#: on a lent 1-GPU machine): there every local phase waits for kernels of other processes that
#: time-slice the GPU (2-4.5 ms each), and the flat staged path, which makes no GPU kernel wait
#: for another process, wins below this. Measured on one H100, 2 hosts x 2 ranks
#: (bench/RESULTS.md): composed/flat busbw 0.08x at 1 MiB, 0.52x at 16 MiB, 1.36x at 64 MiB.
SHARED_GPU_MIN = 32 << 20


def wanted(comm, name, nbytes, st) -> bool:
    """Whether `name` on CUDA buffers of `comm` takes the composition (else the flat staging).
    The same answer on every rank: it depends only on the call, the topology, the environment
    and the GPUs of all ranks (exchanged once)."""
    if name not in OPS or os.environ.get("PYCCL_CUDA_COMPOSED", "1").strip() in ("0", ""):
        return False
    if getattr(comm, "reproducible", False) and name == "all_reduce":
        return False
    if not applicable(name, comm.topology):
        return False
    if st.composed_min is None:
        st.composed_min = _composed_min(comm, st.dev)
    return nbytes >= st.composed_min


def _composed_min(comm, dev) -> int:
    """PYCCL_CUDA_COMPOSED_MIN if set, else 0, or SHARED_GPU_MIN when two ranks of a host use
    the same GPU (every rank publishes its host and its GPU's PCI bus id once, in the store)."""
    env = os.environ.get("PYCCL_CUDA_COMPOSED_MIN", "").strip()
    if env:
        return int(env)
    from pyccl.transports import cuda_ipc

    from .store import multi_get
    bus = cuda_ipc._cupy().cuda.runtime.deviceGetPCIBusId(dev)
    host = comm.peer_info[comm.rank].get("host")
    comm.store.set(f"cudagpu/{comm.rank}", f"{host}|{bus}".encode())
    seen = multi_get(comm.store, [f"cudagpu/{r}" for r in range(comm.size)], comm.timeout)
    return SHARED_GPU_MIN if len(set(seen)) < comm.size else 0


class _HostGroup:
    """The ranks of my host, seen by the CUDA engine as a communicator of their own (group
    ranks 0..L-1; store keys and the mailbox segment under the host's own prefix)."""

    def __init__(self, comm, hier):
        from .store import PrefixStore
        self.rank, self.size = hier.j, hier.L
        self.peer_info = [comm.peer_info[r] for r in hier.host]
        self.store = PrefixStore(comm.store, f"cudahost{hier.h}")
        self.tag = f"{comm.tag}.cudahost{hier.h}"
        self.timeout = comm.timeout
        self.reproducible = False
        self._seq, self._inflight, self._broken, self._closed = 0, 0, None, False


def _part(buf, start, count):
    """Elements [start, start + count) of a CUDA Buffer, as a Buffer."""
    v = buf.array
    view = CudaView(v.ptr + start * v.itemsize, count, v.itemsize, v.device, v.kind, v.obj)
    return Buffer(view, buf.dtype, buf.device, buf.obj)


def _sig(name, buf, **kw):
    from .cuda_collectives import _signature
    return _signature(name, dict({"dtype": buf.dtype, "count": buf.array.size, "root": -1, "redop": None}, **kw))


class CudaComposed:
    """The composed collectives on CUDA buffers of one communicator (one per Staging)."""

    def __init__(self, staging):
        from .cuda_collectives import CudaCollectives
        comm = staging.comm
        if comm._hier is None:
            comm._hier = Hierarchy(comm)
        self.hier = h = comm._hier
        self.st = staging
        self.local = CudaCollectives(_HostGroup(comm, h), staging.dev)

    def _phase(self, what, n, name, fn, *args):
        where = f"{what}, phase {n} ({name})"
        try:
            return fn(where, *args)
        except PycclError as e:
            if name.startswith("local"):
                raise with_host_ranks(e, self.hier.h, self.hier.host) from None
            raise

    def _rail(self, what, caller_event, op_name, part, op=None, root=0):
        """The staged rail phase on `part` (in place), after `caller_event`; returns nothing:
        its copies back end on the staging's host-to-device stream."""
        from .staging import _Call
        st, rail = self.st, self.hier.rail
        v = part.array
        plan, chunk = rail._tuned(op_name, v.size, v.itemsize, v.nbytes, root)
        reducing = op_name == "all_reduce"

        def build(comm, buf):
            return _Call(plan, chunk, {"out": buf.array}, ("out",), ("out",), op if reducing else None,
                         reducing and op is AVG, True)
        st.run(what, build, caller_event, st.next_end(), (part,))

    def run(self, name, what, caller, args):
        """One composed collective, in call order (comm._submit); returns the event that ends it
        on the local engine's stream."""
        if name == "all_reduce":
            return self._all_reduce(what, caller, *args)
        return self._broadcast(what, caller, *args)

    def _all_reduce(self, what, caller, buf, op):
        L, j, local, st = self.hier.L, self.hier.j, self.local, self.st
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
        # The rail's first pass needs phase 1's result on the host anyway (its device-to-host
        # copy waits for it): wait here, so that a phase-1 failure (dead or departed local peer,
        # mismatched call) raises before this rank sends anything on its rail.
        self._phase(what, 1, "local phase done", local.synchronize, end)
        self._rail(what + ", phase 2 (rail all_reduce, staged)", st.record_ready(local.stream), "all_reduce",
                   mine, op)
        if q:
            end = self._phase(what, 3, "local all_gather", local.all_gather, st.h2d, False,
                              _sig("all_gather", _part(buf, 0, q)), _part(buf, 0, m), _part(buf, j * q, q))
        if n > m:
            end = self._phase(what, 3, "local broadcast of the tail", local.broadcast, st.h2d, False,
                              _sig("broadcast", tail, root=L - 1), tail, L - 1)
        return end

    def _broadcast(self, what, caller, buf, root):
        h, local, st = self.hier, self.local, self.st
        if buf.array.size == 0:
            return local._empty(caller, False)
        rh = st.comm.topology.hosts[root]
        lead = h.members[rh].index(root)
        after = caller
        if h.j == lead:
            self._rail(what + ", phase 1 (rail broadcast among leaders, staged)", st.record_ready(caller),
                       "broadcast", buf, root=rh)
            after = st.h2d
        return self._phase(what, 2, "local broadcast", local.broadcast, after, False,
                           _sig("broadcast", buf, root=lead), buf, lead)

    def abort(self):
        self.local.abort()

    def close(self):
        self.local.close()
