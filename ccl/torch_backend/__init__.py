"""The torch.distributed backend "pyccl": ``init_process_group(backend="pyccl")``.

The package, file by file:

* ``group.py``          ``ProcessGroupPyccl``: identity, ordered execution (the communicator's
                        queue: inline calls, its progress thread, CUDA calls on the caller's
                        thread), teardown;
* ``collectives.py``    the group's collectives (all_reduce ... all_to_all, barrier);
* ``point_to_point.py`` the group's send/recv/recv_anysource and monitored_barrier;
* ``p2p_engine.py``     the point-to-point engine thread (eager sends, tags, any-source; why it is
                        not the queue: its docstring);
* ``p2p_ipc.py``        its CUDA IPC path between the GPUs of one host;
* ``works.py``          the Work objects torch gets back (over pyccl's queue Work; CUDA; synchronous CUDA);
* ``reductions.py``     how each (torch op, dtype) reduces on pyccl;
* ``tensors.py``        tensor checks, flat contiguous views and write-backs;
* ``registration.py``   ``register()`` and torch's entry points.

    import torch.distributed as dist
    import pyccl.torch_backend              # registers "pyccl" (also done by `import pyccl`
                                            # when torch is loaded, and by torch's plugin hook)
    dist.init_process_group("pyccl")        # torchrun, env://, file://, tcp://, mpirun + env
    dist.all_reduce(t)                      # CPU tensors: behaves like Gloo
    dist.init_process_group("pyccl", device_id=torch.device("cuda", local_rank))
    dist.all_reduce(t_cuda)                 # CUDA tensors: stream-ordered like NCCL

How it plugs in
---------------
``register()`` calls ``torch.distributed.Backend.register_backend("pyccl", _create,
devices=["cpu", "cuda"])``. torch calls ``_create(store, rank, size, timeout)`` once per
process group (the default group, every ``new_group``/``new_subgroups``), handing it a
``PrefixStore`` private to that group. We build two ``pyccl.Communicator``s over that store
(keys under ``pyccl/coll`` and ``pyccl/p2p``, so nothing collides with torch's own keys or
with other groups), both with the group's ``timeout``:

* **collectives** run on the first one's call queue (``pyccl/queue.py``: one order, one progress
  thread, one place that breaks after a failure), in the order they are issued: on its progress
  thread (``async_op=True``) or inline on the caller's thread when nothing is queued and the
  call is synchronous (no thread hand-off for plain ``dist.all_reduce(t)``); the pyccl calls a
  collective makes run inside its turn;
* **point-to-point** (send/recv/isend/irecv/batch_isend_irecv, recv from any source) runs on
  the second one's connections, driven by ``_P2PEngine``: every message carries a small header
  (tag, byte count), sends never wait for the receiver (unexpected messages are buffered),
  receives match by (source, tag) in order — Gloo's semantics. A ring of ``isend``/``irecv``
  or ``batch_isend_irecv`` therefore never deadlocks, whatever the message size.

The process-group object is a pure-Python ``torch.distributed.ProcessGroup`` subclass; torch
uses it directly as the group (a Python class cannot subclass c10d ``Backend``), including from
C++ (DDP's reducer, functional collectives, DTensor, FSDP1/FSDP2). Works are a
``torch.distributed.Work`` subclass (``_PycclWork``): ``wait(timeout)``, ``is_completed()``,
``is_success()``, ``exception()``, ``get_future()`` (a ``torch.futures.Future`` whose value is
the output tensors, as with Gloo), ``_source_rank()`` for receives from any source.

Behaviour (written down where Gloo/NCCL differ)
-----------------------------------------------
* Tensors: CPU. Non-contiguous tensors are accepted everywhere (copied to a contiguous buffer
  and back, so a strided view reduces its own elements; Gloo ignores the strides of such views
  and reduces the wrong memory). Zero-size tensors are fine. Any dtype moves (broadcast,
  all_gather, all_to_all, gather, scatter, send/recv go as bytes), including int16,
  uint16/32/64, float8 and complex, which Gloo rejects. Sparse COO all_reduce (SUM, as Gloo;
  DDP with ``nn.Embedding(sparse=True)``) gathers every rank's indices and values and writes the
  coalesced sum in place.
* Reductions: SUM, PRODUCT, MIN, MAX, AVG, BAND, BOR, BXOR, PREMUL_SUM.
  - float16/bfloat16/float32/float64, int8/uint8/int32/int64: pyccl reduces them natively
    (float16/bfloat16 add in float32 and round once, so from 3 ranks on they can differ from
    Gloo, which rounds after every addition, in the last bit).
  - int16/uint16 reduce in int32, uint32 in int64, float8 in float32, and uint64 as int64
    (sign bit flipped for MIN/MAX); results are cast back (integers wrap as they would natively).
  - bool: SUM/BOR/MAX = logical or, PRODUCT/BAND/MIN = logical and, BXOR = parity (like Gloo,
    except that Gloo's bool SUM can leave the byte value 2 in a bool; pyccl writes 0/1).
  - BAND/BOR/BXOR on integers: exact, by gathering every rank's data and reducing locally
    (all_gather / gather / all_to_all), so they cost size x the memory of the tensor.
  - AVG on integers truncates toward zero (pyccl's and NCCL's rule; Gloo raises instead).
  - PREMUL_SUM (``dist._make_nccl_premul_sum(f)``; Gloo raises): floating types only,
    ``sum(f * x_i)``; the user's input tensors are not scaled.
  - complex: SUM, AVG and PREMUL_SUM (on the real view); others raise, like torch.
* all_gather/all_to_all lists may have uneven sizes (like NCCL; Gloo raises). ``reduce`` leaves
  non-root tensors unchanged. ``allgather_coalesced(outputs, inputs)``: ``outputs[r][k]`` is
  input ``k`` of rank ``r`` (Gloo's layout); the group methods take mixed dtypes.
* Mismatched sizes across ranks: the transports compare byte counts and raise
  ``TransportError`` ("size mismatch ...") on the rank that notices; the communicator leaves the
  reason in the store and drops its connections, so the other ranks fail at once too
  (``PeerFailure`` naming the first error) instead of waiting for the timeout. The error
  surfaces from ``wait()`` (or the synchronous call). Gloo silently returns garbage in some of
  these cases. (The shared-memory collectives of ccl/engines/shm.py do not compare counts
  yet; ``PYCCL_CHECK=1`` makes every collective compare its signature across ranks first.)
* After such a failure, or a timeout, the group is *broken*: later collectives raise at once.
  Build a new group (``new_group``) or restart, as with NCCL.
* ``timeout`` of ``init_process_group``/``new_group`` bounds every wait of every operation
  (``opts.timeout`` of a single C++ call is not used); ``work.wait(timeout)`` additionally
  bounds one wait (raising ``pyccl.Timeout``; the operation itself keeps running until it
  finishes or the group timeout hits).
* Point-to-point: tags are honoured; ``recv(src=None)`` receives from any source and returns
  the sender; ``irecv``/``isend`` to this rank itself work. Messages are sent eagerly (no
  rendezvous), so a send completes without a matching receive having been posted; the receiver
  buffers it until one is. A receive of the wrong size fails alone with "size mismatch" (the
  message is drained; the pair stays usable). The connections are TCP (``P2P_TRANSPORT``,
  ``PYCCL_TORCH_P2P_TRANSPORT=auto`` uses shared memory on one host: about twice the bandwidth,
  but a peer that leaves early currently takes this rank's other shm connections down with it).
* ``monitored_barrier``: ``dist.monitored_barrier`` refuses every backend but Gloo (a check in
  torch itself); ``group.monitored_barrier(timeout, wait_all_ranks)`` on a pyccl group does what
  Gloo's does (rank 0 names the ranks that did not arrive).
* ``split_group``: torch only offers it when the default group is bound to an accelerator
  device; on CPU it raises for Gloo and for us alike. ``new_group``/``new_subgroups`` work.
* Object collectives (all_gather_object, gather_object, broadcast_object_list,
  scatter_object_list, send/recv_object_list) work through the calls above.
* A synchronous collective issued from a ``get_future().then(...)`` callback runs at once on the
  communicator's progress thread (queueing it would wait for itself); asynchronous ones queue
  as usual.
* An InvalidArgument (or a torch error in the copies around a collective) fails that call only;
  any other pyccl error breaks the group (above).

CUDA tensors (ranks of one host, one GPU each; ccl/engines/cuda/ does the work)
-------------------------------------------------------------------------------------
* ``init_process_group("pyccl", device_id=torch.device("cuda", i))`` works (torch asks the
  group for its per-device backend: the group answers for every device itself), and so does
  ``new_group(backend="pyccl")`` under a default group bound to a device (NCCL's or ours).
* A collective on CUDA tensors runs on the **caller's thread**, after whatever the group had
  queued before it (it waits for that), and only *enqueues* GPU work: the host never waits
  for the GPU. The stream contract is NCCL's:
  - synchronous (``async_op=False``, what ``dist.all_reduce(t)`` does): ordered after the work
    already queued on the caller's current stream, and everything queued on that stream
    afterwards sees the result. The returned Work is complete.
  - ``async_op=True``: the collective runs on a side stream that first waits for the caller's
    current stream; ``work.wait()`` makes the *then* current stream wait for it (no host
    block), ``work.wait(timeout)`` also blocks the host until it is done (at most `timeout`
    seconds) and raises its error, ``is_completed()`` polls, ``get_future()`` is a CUDA-aware
    future (``torch.futures.Future(devices=[...])``) whose callbacks are stream-ordered. Keep
    the tensors alive and unchanged until then (the Work also holds them).
  - all-reduce of one contiguous tensor up to ``PYCCL_CUDA_ONESHOT_MAX`` bytes (float16,
    bfloat16, float32, float64, int8, uint8, int32, int64; SUM, PRODUCT, MIN, MAX, AVG) takes a
    fast lane: one one-shot kernel launch, synchronised between the GPUs on the device,
    prepared once per (pointer, count, dtype, op) (``CudaCollectives.torch_all_reduce``). No
    flight-recorder entry and no torch Future are made for it; a synchronous one runs on the
    caller's stream itself.
  - Errors of GPU work (a peer that died, a mismatched call, a timeout) are found by the
    kernels, which give up and leave the reason in host memory; they are raised by the next
    call on the group (or by ``work.wait(timeout)``), naming the op and the peer. The group is
    broken from then on.
* Everything else on CUDA goes through the general bodies above with device buffers (every
  temporary lives on the tensors' device): bitwise ops, int16/uint64/float8 reductions,
  uneven all_gather lists, ``all_to_all_single`` with uneven splits (MoE), coalesced calls.
* Point-to-point on CUDA tensors runs on the same engine with the same semantics (eager sends,
  tags, any-source receives). Between ranks of one host it goes **GPU to GPU through CUDA IPC**
  (``p2p_ipc.py``; ``PYCCL_P2P_IPC=0`` turns it off): a send copies the tensor into a staging
  block of pyccl's device memory on the caller's stream, and the engine announces the block
  (tag, size, IPC allocation) once that copy is done; the receiver, once matched, copies from
  the peer's block into its tensor and acknowledges, and the block is reused. Across hosts it is
  **staged through pinned host memory**: a send copies the tensor to pinned memory on the
  caller's stream and the engine sends it once that copy is done (the host does not wait for
  it); a receive lands in pinned memory. Either way the copy into the receiving tensor runs on
  a pyccl stream that first waits for the caller's stream as it was when the receive was
  posted, ``wait()`` makes the current stream wait for that copy, and the sent tensor may be
  changed as soon as ``isend`` returns (in stream order). ``group.p2p_stats()`` counts the
  messages of each path.
* Sparse CUDA tensors are not supported (InvalidArgument).
* CUDA graphs: every synchronous collective on CUDA tensors can be captured
  (``with torch.cuda.graph(g): dist.all_reduce(t)``) after a warm-up on a side stream (torch's
  recipe: the warm-up compiles the kernels, grows the scratch and maps the peers' buffers), and
  replayed with new values in the same tensors. Each replay synchronises the GPUs again on the
  device (the epoch is a counter in device memory), with no host work; a replay's error
  (mismatched peer, timeout, dead peer) is raised by the next host call on the group. Every rank
  must capture and replay the same collectives in the same order, as with NCCL. Tensors
  allocated inside the capture are not supported (their IPC export would run during capture).
* CPU tensors are viewed through DLPack, not ``Tensor.numpy()`` (which in torch 2.13 marks the
  storage non-resizable for good): ``resize_`` still works after any call (FSDP relies on it).
"""
from __future__ import annotations

from .group import BACKEND_NAME, DEFAULT_TIMEOUT_S, P2P_TRANSPORT, ProcessGroupPyccl
from .p2p_engine import _P2PEngine
from .reductions import _Reduction
from .registration import _autoload, _create, register
from .window import window
from .works import _CudaWork, _PycclWork, _SyncDone



def _as_ints(splits):
    import torch
    return splits.tolist() if isinstance(splits, torch.Tensor) else splits


def all_to_all_single(output, input, output_split_sizes=None, input_split_sizes=None, group=None, async_op=False):
    """``dist.all_to_all_single`` on a pyccl group whose split sizes may be CUDA tensors (rows
    of dim 0 per rank), as an MoE router computes them: the counts stay on the GPU (torch's own
    call turns them into Python ints, a device-to-host sync). Lists go to torch's call."""
    import torch
    import torch.distributed as dist
    pg = group if group is not None else dist.distributed_c10d._get_default_group()
    if not output.is_cuda:                       # CPU counts cost nothing to read
        output_split_sizes = _as_ints(output_split_sizes)
        input_split_sizes = _as_ints(input_split_sizes)
    if not isinstance(input_split_sizes, torch.Tensor) and not isinstance(output_split_sizes, torch.Tensor):
        return dist.all_to_all_single(output, input, output_split_sizes, input_split_sizes, group=group,
                                      async_op=async_op)
    if not isinstance(pg, ProcessGroupPyccl):
        from ..errors import InvalidArgument
        raise InvalidArgument(f"all_to_all_single with device split sizes needs a pyccl group, got {type(pg).__name__}")
    return pg.all_to_all_single_dev(output, input, output_split_sizes, input_split_sizes, async_op)


__all__ = ["all_to_all_single", "window", "BACKEND_NAME", "DEFAULT_TIMEOUT_S", "P2P_TRANSPORT", "ProcessGroupPyccl", "register", "_autoload",
           "_create", "_CudaWork", "_PycclWork", "_P2PEngine", "_Reduction", "_SyncDone"]

register()
