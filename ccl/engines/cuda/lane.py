"""The torch backend's fast lanes: one prepared launch per call, with no torch Work, Future or
flight-recorder entry: ``torch_all_reduce`` (one-shot or 'kernel' two-shot all-reduce) and
``torch_copies`` (all_gather_into_tensor, all_to_all_single with equal pieces, broadcast and
reduce_scatter_tensor through the peers' scratch, and one-shot reduces)."""
from ...dtypes import AVG, MAX, MIN, PROD, SUM
from ..reproducible import takes
from .kernels import THREADS
from .signature import _signature


def _torch_maps():
    """What the lanes read per call: torch's raw current-stream and current-device getters, and
    the torch dtypes and op names with native kernels (as pyccl names them)."""
    import torch
    get_stream = getattr(torch._C, "_cuda_getCurrentRawStream", None) or \
        (lambda d: torch.cuda.current_stream(d).cuda_stream)
    dtypes = {torch.float16: "float16", torch.bfloat16: "bfloat16", torch.float32: "float32",
              torch.float64: "float64", torch.int8: "int8", torch.uint8: "uint8", torch.int32: "int32",
              torch.int64: "int64"}
    ops = {"SUM": SUM, "PROD": PROD, "MIN": MIN, "MAX": MAX, "AVG": AVG}
    return get_stream, torch._C._cuda_getDevice, dtypes, ops


class TorchLaneMixin:
    """``torch_all_reduce`` and the caches it keeps."""

    def torch_all_reduce(self):
        """The fast lane of the torch backend: ``lane(tensor, op, async_op)`` enqueues a one-shot
        (or, once the scratch has grown to fit it, a 'kernel' two-shot) all-reduce of a
        contiguous CUDA tensor on this GPU and returns None (synchronous: on
        the caller's current stream, which therefore sees the result) or the end event on
        pyccl's stream (async_op), or returns False when the call does not fit the lane
        (too big, dtype or op without a native kernel, another device, the communicator busy):
        the caller then takes the general path. Everything that does not change between calls
        with the same (pointer, count, dtype, op) is computed once and cached; per call the
        host reads the error word, counts the call (for error messages) and launches one kernel;
the epoch advances on the device (capture-safe)."""
        get_stream, get_device, dtypes, ops = _torch_maps()
        q, repro = self.comm.queue, self.comm.reproducible      # call order and mode (ccl/queue.py)
        cache = {}
        self._lane_caches.append(cache)
        dev = self.dev
        base_sig = {}

        def lane(t, opname, async_op):
            key = (t.data_ptr(), t.numel(), t.dtype, opname)
            p = cache.get(key)
            if p is None:
                p = prepare(t, key, opname)
            if p is False or get_device() != dev or not t.is_contiguous() or q.inflight:
                return False
            return self._go(p, "all_reduce", q, get_stream(dev), async_op)

        def prepare(t, key, opname):
            if self.suspended:                   # the general path resumes first (not cached)
                return False
            p = False
            dtype = dtypes.get(t.dtype)
            op = ops.get(opname)
            nbytes = t.numel() * t.element_size()
            if repro and takes(dtype, op):
                dtype = None                     # reproducible mode: the general path (ccl/engines/reproducible.py)
            if dtype is not None and op is not None and t.is_cuda and t.get_device() == dev and \
                    0 < nbytes and t.is_contiguous():
                sig = base_sig.get((dtype, op))
                if sig is None:
                    sig = base_sig[(dtype, op)] = _signature("all_reduce", {"dtype": dtype, "root": -1,
                                                                             "redop": op.name, "count": 0})
                sig |= key[1] & 0xFFFFFFFF
                with self._device:
                    if nbytes <= self.oneshot_max:
                        p = self._prepare_oneshot(key[0], key[0], key[1], t.element_size(), dtype, op, sig)
                    else:           # a two-shot that fits the scratch grown by an earlier call
                        p = self._prepare_twoshot(key[0], key[1], t.element_size(), dtype, op, sig) or False
            if len(cache) >= 1024:
                cache.clear()
            cache[key] = p
            return p
        return lane

    def torch_copies(self):
        """The fast lane of the torch backend's other collectives: ``lane(name, out, inp, arg,
        async_op)`` with name 'all_gather' (arg unused), 'all_to_all' (equal pieces), 'broadcast'
        (out is the buffer, arg the root), 'reduce_scatter' (arg the op name, as
        torch_all_reduce takes it) or 'reduce' (out = inp = the buffer, arg (root, op name);
        one-shot sizes). Returns as torch_all_reduce's lane does: None (done, on the
        caller's stream), the end event (async_op) or False (not for the lane: the general path
        then runs it, with the same kernel, so ranks may differ in which path they take). Only
        calls that make no host exchange take it: pieces up to PYCCL_CUDA_STAGE_MAX that fit
        the scratch as it is (growing it is collective and left to the general path)."""
        get_stream, get_device, dtypes, ops = _torch_maps()
        q, repro = self.comm.queue, self.comm.reproducible      # call order and mode (ccl/queue.py)
        cache = {}
        self._lane_caches.append(cache)
        dev, size = self.dev, self.size

        def lane(name, out, inp, arg, async_op):
            key = (name, out.data_ptr(), inp.data_ptr(), out.numel(), inp.numel(), out.dtype, arg)
            p = cache.get(key)
            if p is None:
                p = prepare(name, out, inp, arg, key)
            if p is False or get_device() != dev or not out.is_contiguous() or not inp.is_contiguous() or \
                    q.inflight:
                return False
            return self._go(p, name, q, get_stream(dev), async_op)

        def prepare(name, out, inp, arg, key):
            if self.suspended:                   # the general path resumes first (not cached)
                return False
            p = None
            ok = out.is_cuda and inp.is_cuda and out.get_device() == dev and inp.get_device() == dev and \
                out.is_contiguous() and inp.is_contiguous()
            nb = inp.numel() * inp.element_size()
            if not ok or nb == 0 or size < 2:
                pass
            elif name == "reduce_scatter":
                dtype, op = dtypes.get(out.dtype), ops.get(arg)
                if dtype is not None and op is not None and not (repro and takes(dtype, op)):
                    n = out.numel()
                    sig = _signature("reduce_scatter", {"dtype": dtype, "root": -1, "redop": op.name, "count": n})
                    with self._device:
                        p = self._prepare_rs(inp.data_ptr(), out.data_ptr(), n, out.element_size(), dtype, op, sig)
            elif name == "reduce":                 # one-shot sizes; non-roots reduce into pyccl's buffer
                root, opname = arg
                dtype, op = dtypes.get(out.dtype), ops.get(opname)
                if dtype is not None and op is not None and not (repro and takes(dtype, op)) and \
                        nb <= self.oneshot_max:
                    n = out.numel()
                    sig = _signature("reduce", {"dtype": dtype, "root": root, "redop": op.name, "count": n})
                    with self._device:
                        self._caller = get_stream(dev)      # _tmp asks whether this call is captured
                        dst = out.data_ptr() if self.rank == root else self._tmp(nb)
                        p = self._prepare_oneshot(inp.data_ptr(), dst, n, out.element_size(), dtype, op, sig)
            else:
                root = arg if name == "broadcast" else -1
                count = nb // size if name == "all_to_all" else nb
                sig = _signature(name, {"dtype": "uint8", "root": root, "redop": None, "count": nb})
                if name == "all_to_all":
                    sig |= count & 0xFFFFFFFF
                if self._takes_staged(count) and count <= self.big_cap:
                    with self._device:
                        p = self._prepare_staged(sig, count, *self._pieces(name, out.data_ptr(), inp.data_ptr(),
                                                                           count, root))
            if len(cache) >= 1024:
                cache.clear()
            cache[key] = p or False
            return p or False
        return lane

    def _go(self, p, name, q, caller, async_op):
        """Launch prepared `p` as a call of the torch lane: synchronous on the caller's stream
        (after our previous collective), or async on pyccl's stream (returns its end event).
        First the health check every lane makes: an error a kernel left (or a closed or aborted
        state) raises here, counted as this call; a broken or closed communicator returns False,
        so that the general path raises the right error."""
        if self._closed or self.status.words[1] or self._abort_reason is not None:
            q.seq += 1
            self.raise_if_failed(f"{name} #{q.seq} on {self.tag} (rank {self.rank}/{self.size})")
        if q.broken is not None or q.closed:
            return False
        q.seq += 1
        e = self._epoch = self._epoch + 1
        self._names[e & 4095] = (name, q.seq)
        if async_op:
            self._begin(caller)
            p.launch(p.fn, p.grid, THREADS, self.stream, p.address)
            return self._end(caller, False)
        tail = self._tail
        if tail != caller:
            if tail is not None and not self._capturing(caller):
                self._after(tail, caller)
            self._tail = caller
        self._last = None
        p.launch(p.fn, p.grid, THREADS, caller, p.address)
        return None

    def forget_prepared(self):
        """Drop every prepared launch and fast-lane decision (after changing a knob such as
        oneshot_max at run time, on every rank alike)."""
        self._prepared.clear()
        for c in self._lane_caches:
            c.clear()
