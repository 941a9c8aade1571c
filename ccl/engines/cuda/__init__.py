"""GPU fast paths: collectives on CUDA buffers of ranks that share a host.

The package, file by file (the way Gloo splits a transport into context, pair, buffer):

* ``submit.py``    ``CudaEngine`` (the engine the communicator chooses for CUDA buffers on one
                   host: begin/run/finish on the caller's stream) and the async Work;
* ``signature.py`` the 63-bit call signature the kernels and the mailbox compare;
* ``engine.py``    ``CudaCollectives``, one per communicator, composed of the parts below;
* ``state.py``     scratch, flags, streams and events, the per-call mailbox, health and errors;
* ``kernels.py``   the kernels' source, parameter blocks, launches, SM copies;
* ``kernel_cache.py``, ``build.py``, ``nvrtc.py``, ``library.py``  kernels built ahead (setup.py),
                   cached on disk or built by NVRTC on a background thread; loaded per device;
* ``memory.py``, ``ipc_cache.py``  what a communicator holds (``memory()``), ``suspend()`` /
                   ``resume()``, the peers' mapped memory by kind and its bound;
* ``reductions.py`` all-reduce, reduce, reduce-scatter (one-shot, two-shot: kernel, copy engines, pull);
* ``copies.py``    all-gather, broadcast, all-to-all, gather, scatter (copy engines or one SM kernel);
* ``lane.py``      the torch backend's fast lane for small all-reduces.


The engine choice sends every collective whose buffers are on a GPU of one host here. The
data never leaves the GPUs: each rank maps its peers' memory through CUDA IPC
(transports/cuda_ipc.py) and the bytes move over NVLink/PCIe, either

* by **copy engines** — ``cudaMemcpyAsync`` from this rank's buffer into the peer's, one
  stream per peer so that several engines run at once — for all-gather, broadcast,
  all-to-all, gather, scatter, and the copy-engine variant of the two-shot all-reduce; or
* by **kernels** (ccl/engines/cuda/kernels*.cu: prebuilt by setup.py where a CUDA toolkit is, else
  built by NVRTC in the background and cached on disk, see build.py) that store into peer memory
  and reduce:
  - *one-shot all-reduce* (messages up to ``PYCCL_CUDA_ONESHOT_MAX``): every rank pushes its
    buffer into every peer's scratch and reduces all copies locally. One launch, no barrier.
  - *two-shot all-reduce* (larger): reduce-scatter then all-gather in one kernel: push
    segment r to rank r's scratch, reduce the own segment, store the result into every peer's
    scratch (its gather half), then copy the peers' segments from there into the own buffer.
  - *reduce-scatter*: the first half of the two-shot.

Ordering between processes uses flags in device memory (epoch + signature words, written
into the peer's flag buffer with release stores, polled with acquire loads); every wait is
bounded by the communicator's timeout and by an abort word in host-mapped memory, which the
host sets when it sees a peer process die. A kernel that gives up writes why into that host
memory and returns; the next pyccl call on this communicator (or ``work.wait(timeout)``)
raises ``PeerFailure``, ``Timeout`` or ``InvalidArgument`` (a mismatched call: other count,
dtype, op or root) naming the op, the peer and the step.

Streams (the contract, like NCCL's): a collective runs on pyccl's own stream of the device,
which first waits for the caller's current stream (so it sees the data the caller produced
there). A synchronous call then makes the caller's stream wait for pyccl's, and returns
without blocking the host: anything the caller queues afterwards on that stream sees the
result. With ``async_op=True`` the caller's stream is not held back; ``work.wait()`` makes
the *then* current stream wait (still no host block); ``work.wait(timeout=s)`` also blocks
the host until done (at most s seconds) and raises the collective's error, if any;
``work.is_completed()`` polls. Keep the buffers alive and unmodified until then (as with
NCCL). The host never waits for the GPU, except in that bounded wait and when
``PYCCL_CUDA_SYNC=1`` (every call blocks until done and raises at once: for debugging).

CUDA graphs: every kernel that synchronises with the peers reads its epoch from a counter in
device memory and the last of its blocks advances it, so a captured collective replays with a
fresh epoch each time and the host keeps no per-call state a replay would skip. A call on a
stream being captured does not wait for pyccl's earlier work outside the capture, and keeps no
captured event as its host-visible end. The host mailbox exchange (below) happens at capture
time only; replays reuse the peers' buffers named then (the graph's buffers are fixed).

User buffers: the copy collectives (all-gather, all-to-all with equal pieces, broadcast,
gather, scatter) with pieces up to PYCCL_CUDA_STAGE_MAX bytes push into the peers' scratch
(mapped once) and copy out of their own in one kernel ('staged', copies.py), as NCCL copies
through its own buffers when a user buffer is not registered: no host exchange per call. Larger
pieces, uneven all-to-alls and the 'ce' and 'pull' two-shots write into (or read from) a peer's
buffer and tell their peers which allocation to use through a small host mailbox (one exchange
per call, /dev/shm); each allocation's IPC
handle is exported once and opened once per peer (cached). Buffers must come from cudaMalloc
(torch's caching allocator, cupy's pool) — not from ``expandable_segments``. The one-shot and
the 'kernel' two-shot all-reduce (and reduce) need no peer buffer: they push into the peers'
scratch (mapped once) and gather back through it, so they make no host exchange per call (only
when the scratch grows); a mismatched call is then found by the kernels' flags and raised on
the next call.

Environment (defaults):
  PYCCL_CUDA_ONESHOT_MAX   8388608 on 2 ranks, 4194304 on more: largest all-reduce (bytes) done one-shot
  PYCCL_CUDA_ONESHOT_CAP   ONESHOT_MAX  one-shot scratch per rank and slot (bytes; at least ONESHOT_MAX)
  PYCCL_CUDA_TWOSHOT       auto     two-shot all-reduce and reduce-scatter: 'kernel' (SM stores into the
                                    peers' scratch), 'ce' (copy engines), 'pull' (every rank reads its segment
                                    from the peers' buffers with SM loads, no scratch) or 'auto' (2 ranks:
                                    all-reduce 'kernel', reduce-scatter 'kernel' up to STAGE_MAX, then
                                    'pull', measured fastest on 2 x H200; more ranks: PYCCL_CUDA_TWOSHOT_WIDE). 'kernel' takes copy
                                    engines for reduce-scatter segments >= RS_CE_MIN.
  PYCCL_CUDA_TWOSHOT_WIDE  kernel   what 'auto' picks on more than 2 ranks (kept at the old path until the
                                    variants are measured on 4+ GPUs: bench/gpu_bench.py --variants 1)
  PYCCL_CUDA_COPY          auto     copy collectives (all-gather, all-to-all, broadcast, gather, scatter):
                                    'ce' (copy engines, one stream per peer), 'push' (one SM kernel stores
                                    into the peers), 'pull' (all-gather and all-to-all: one SM kernel reads
                                    from the peers' buffers; the others push) or 'auto' (2 ranks: 'ce';
                                    more ranks: PYCCL_CUDA_COPY_WIDE), above PYCCL_CUDA_STAGE_MAX (below it:
                                    'staged'). SM copies need 16-byte aligned
                                    pieces; others take the copy engines.
  PYCCL_CUDA_COPY_WIDE     ce       what 'auto' picks on more than 2 ranks (see TWOSHOT_WIDE)
  PYCCL_CUDA_STAGE_MAX     16777216 'auto': copy collectives whose pieces (bytes) fit it and PYCCL_CUDA_SCRATCH take
                                    'staged' (through the
                                    peers' scratch, one kernel, no host exchange; costs one local copy more),
                                    and so does a 2-rank reduce-scatter (the 'kernel' two-shot). PYCCL_CUDA_COPY=
                                    staged forces it up to PYCCL_CUDA_SCRATCH.
  PYCCL_CUDA_COPY_BLOCKS   0        thread blocks of the SM copy kernel (0: the GPU's SM count)
  PYCCL_CUDA_BLOCKS        0        max thread blocks of a kernel (0: the GPU's SM count, at most 256)
  PYCCL_CUDA_SCRATCH       4194304  largest two-shot scratch region per peer (bytes); bigger messages go in
                                    rounds (device memory: memory.py and the README's "GPU memory")
  PYCCL_CUDA_RS_CE_MIN     67108864 reduce-scatter: per-rank segments (bytes) from which copy engines push
  PYCCL_CUDA_SYNC          0        1: block the host after every call and raise its error there
  PYCCL_CUDA_LAUNCH        driver   'driver': cupy's Cython cuLaunchKernel binding; 'ctypes': through ctypes

Fast lane (torch backend): ``torch_all_reduce`` returns the function that
``ProcessGroupPyccl.allreduce`` calls first for small CUDA tensors: one prepared one-shot
launch on the caller's stream per call (see its docstring).
"""
from .engine import CudaCollectives
from .kernels import FLAG_WORDS, MAXB, MAXR, THREADS
from .state import MAIL_WORDS
from .signature import _signature
from .submit import CudaEngine, CudaWork, cuda_args

__all__ = ["CudaCollectives", "CudaEngine", "CudaWork", "cuda_args", "FLAG_WORDS", "MAIL_WORDS", "MAXB", "MAXR", "THREADS",
           "_signature"]
