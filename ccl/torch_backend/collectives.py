"""The collectives of ProcessGroupPyccl (a mixin of group.py): argument checks on the caller's
thread, then a body that runs on the communicator's queue (``self._submit``: inline, or on its
progress thread). CUDA
all-reduces of one small tensor take the fast lane (``allreduce``'s first branch); after their
checks, all_gather_into_tensor, reduce_scatter_tensor, broadcast, all_to_all_single (equal
splits) and reduce of CUDA tensors try theirs (``_copy_fast``: one prepared launch, no queue entry).
The lanes are taken only while nothing is queued (they read ``queue.inflight`` too)."""
import collections
import math

import torch
import torch.distributed as dist

from ..errors import InvalidArgument, PycclError

from .reductions import _OP_NAMES, _R, _Reduction, _op_kind
from .tensors import _as_list, _bytes, _check, _contig, _copy_bytes_into, _cuda_dev, _nbytes, _single
from .works import _SYNC_DONE, _CudaWork

_AllreduceOptions = dist.AllreduceOptions
_HAS_ASYNC_OP = hasattr(_AllreduceOptions(), "asyncOp")
#: torch ops the CUDA fast lane of all_reduce takes (pyccl names)
_LANE_OPS = {_R.SUM: "SUM", _R.PRODUCT: "PROD", _R.MIN: "MIN", _R.MAX: "MAX", _R.AVG: "AVG"}


class CollectivesMixin:
    """all_reduce ... all_to_all and barrier of ProcessGroupPyccl."""

    # -- collective bodies (run on the queue: inline or on its progress thread) --
    def _allreduce_flat(self, flat, red, may_modify):
        buf = red.to_work(flat, may_modify)
        if red.gather_fold is not None:
            stack = torch.empty((self._size, buf.numel()), dtype=buf.dtype, device=buf.device)
            self._comm.all_gather(_bytes(stack), _bytes(buf))
            buf.copy_(red.gather_fold(stack))
        else:
            self._comm.all_reduce(buf, op=red.pyccl_op)
        red.from_work(buf, flat)

    def _copy_fast(self, name, out, inp, arg, opts, result):
        """The CUDA fast lane of the collectives other than all_reduce (engines/cuda/lane.py
        ``torch_copies``): a torch Work, or None when the call takes the general path."""
        lane = self._copy_lane
        if lane is None or self._q.broken is not None or self._q.inflight != self._q.detached or not out.is_cuda:
            return None
        try:
            r = lane(name, out, inp, arg, getattr(opts, "asyncOp", True) if opts is not None else True)
        except PycclError as e:
            self._break(e)
            raise
        if r is False:
            return None
        if r is None:
            return _SYNC_DONE
        return _CudaWork(f"pyccl {name}", result, self._lane_dev, self._lane_cc, r)

    # ===== collectives =====================================================================
    def allreduce(self, tensors, opts=None):
        lane = self._lane
        if lane is not None and type(tensors) is list and len(tensors) == 1 and self._q.broken is None and \
                self._q.inflight == self._q.detached:
            # Fast lane: one small contiguous CUDA tensor, nothing queued (see the module doc).
            t = tensors[0]
            if type(opts) is _AllreduceOptions:
                opname = _LANE_OPS.get(opts.reduceOp.op)
                async_op = opts.asyncOp if _HAS_ASYNC_OP else True
            else:
                opname = "SUM" if opts is None else _LANE_OPS.get(getattr(opts, "op", opts))
                async_op = True
            if opname is not None and t.is_cuda:
                try:
                    r = lane(t, opname, async_op)
                except PycclError as e:
                    self._break(e)
                    raise
                if r is not False:
                    if r is None:
                        return _SYNC_DONE
                    return _CudaWork("pyccl allreduce", tensors, self._lane_dev, self._lane_cc, r)
        if isinstance(opts, dist.ReduceOp) or opts is None:
            op, opts = (opts if opts is not None else dist.ReduceOp.SUM), None
        else:
            op = opts.reduceOp
        tensors = _as_list(tensors)
        if len(tensors) == 1 and isinstance(tensors[0], torch.Tensor) and tensors[0].layout == torch.sparse_coo:
            return self._allreduce_sparse(tensors, op, opts)
        t = _single(tensors, "allreduce")
        red = _Reduction(op, t.dtype, "allreduce")

        def run(work):
            flat, wb = _contig(t)
            self._allreduce_flat(flat, red, True)
            wb()
        return self._submit("allreduce", run, tensors, opts, dev=_cuda_dev(t))

    def _allreduce_sparse(self, tensors, op, opts):
        """Sparse COO all_reduce (SUM, like Gloo): gather every rank's indices and values, add them
        up and write the coalesced sum into the tensor in place."""
        t = tensors[0]
        if t.device.type != "cpu":
            raise InvalidArgument(f"allreduce: sparse tensors on {t.device} are not supported (sparse CPU "
                                  f"tensors are)")
        if _op_kind(op) != _R.SUM:
            raise InvalidArgument(f"allreduce: sparse tensors reduce with SUM only, got {_OP_NAMES.get(_op_kind(op))}")

        def run(work):
            idx = t._indices().t().contiguous()               # (nnz, sparse_dim) int64
            val = t._values().contiguous()                     # (nnz, *dense)
            shape = list(t.shape)
            meta = torch.tensor([idx.shape[0], t.sparse_dim(), len(shape)] + shape + [-1] * (8 - len(shape)),
                                dtype=torch.int64)
            table = torch.empty(self._size * meta.numel(), dtype=torch.int64)
            self._comm.all_gather(table, meta)
            table = table.view(self._size, -1)
            if not torch.equal(table[:, 1:], meta[1:].expand(self._size, -1)):
                raise InvalidArgument(f"allreduce: sparse tensors differ in shape across ranks: "
                                      f"{[row[3:3 + int(row[2])].tolist() for row in table]}")
            counts = table[:, 0].tolist()
            row_i = idx.shape[1] * 8
            row_v = math.prod(val.shape[1:]) * val.element_size()
            all_idx = torch.empty((sum(counts), idx.shape[1]), dtype=torch.int64)
            all_val = torch.empty((sum(counts),) + tuple(val.shape[1:]), dtype=val.dtype)
            for mine, out, row in ((idx, all_idx, row_i), (val, all_val, row_v)):
                sizes = [c * row for c in counts]
                flat = _bytes(mine)
                self._comm.all_to_all(_bytes(out), flat.repeat(self._size), out_splits=sizes,
                                      in_splits=[flat.numel()] * self._size)
            summed = torch.sparse_coo_tensor(all_idx.t(), all_val, t.shape).coalesce()
            t.copy_(summed)
        return self._submit("allreduce (sparse)", run, tensors, opts)

    def allreduce_coalesced(self, tensors, opts=None):
        op = opts.reduceOp if opts is not None else dist.ReduceOp.SUM
        tensors = list(tensors)
        for t in tensors:
            _check(t, "allreduce_coalesced")
        reds = [_Reduction(op, t.dtype, "allreduce_coalesced") for t in tensors]

        def run(work):
            # One flat buffer per dtype (same order on every rank), reduced in one call.
            groups = collections.OrderedDict()
            for t, red in zip(tensors, reds):
                groups.setdefault(t.dtype, []).append((t, red))
            for items in groups.values():
                red = items[0][1]
                flats = [_contig(t)[0] for t, _ in items]
                packed = torch.cat(flats)
                self._allreduce_flat(packed, red, True)
                off = 0
                for (t, _), f in zip(items, flats):
                    n = f.numel()
                    src = packed[off:off + n]
                    off += n
                    if t.is_complex():
                        torch.view_as_real(t).copy_(src.view(torch.view_as_real(t).shape))
                    else:
                        t.copy_(src.view(t.shape))
        return self._submit("allreduce_coalesced", run, tensors, opts, dev=_cuda_dev(tensors))

    def reduce(self, tensors, opts=None):
        tensors = _as_list(tensors)
        t = _single(tensors, "reduce")
        root = self._root(opts.rootRank, "reduce")
        if self._copy_lane is not None:
            opname = _LANE_OPS.get(_op_kind(opts.reduceOp))
            if opname is not None:
                w = self._copy_fast("reduce", t, t, (root, opname), opts, tensors)
                if w is not None:
                    return w
        red = _Reduction(opts.reduceOp, t.dtype, "reduce")

        def run(work):
            flat, wb = _contig(t)
            is_root = self._rank == root
            if red.gather_fold is not None:
                stack = torch.empty((self._size, flat.numel()), dtype=flat.dtype, device=flat.device) \
                    if is_root else None
                self._comm.gather(_bytes(stack) if is_root else None, _bytes(flat), root=root)
                if is_root:
                    flat.copy_(red.gather_fold(stack))
                    wb()
                return
            buf = red.to_work(flat, False)          # pyccl leaves non-root buffers unchanged
            self._comm.reduce(buf, root=root, op=red.pyccl_op)
            if is_root:
                red.from_work(buf, flat)
                wb()
        return self._submit("reduce", run, tensors, opts, dev=_cuda_dev(t))

    def broadcast(self, tensors, opts=None):
        tensors = _as_list(tensors)
        t = _single(tensors, "broadcast")
        if isinstance(opts, int):                   # pg.broadcast(tensor, root) overload
            opts, root = None, self._root(opts, "broadcast")
        else:
            root = self._root(opts.rootRank if opts is not None else 0, "broadcast")
            if self._copy_lane is not None and opts is not None:
                w = self._copy_fast("broadcast", t, t, root, opts, tensors)
                if w is not None:
                    return w

        def run(work):
            flat, wb = _contig(t)
            self._comm.broadcast(_bytes(flat), root=root)
            if self._rank != root:
                wb()
        return self._submit("broadcast", run, tensors, opts, dev=_cuda_dev(t))

    def allgather(self, output_tensors, input_tensors, opts=None):
        outs = [list(o) for o in output_tensors]
        ins = list(input_tensors)
        t = _single(ins, "allgather")
        if len(outs) != 1 or len(outs[0]) != self._size:
            raise InvalidArgument(f"allgather: expected one list of {self._size} output tensors, got "
                                  f"{[len(o) for o in outs]}")
        for o in outs[0]:
            _check(o, "allgather: output")
            if o.dtype != t.dtype:
                raise InvalidArgument(f"allgather: output dtype {o.dtype} differs from input dtype {t.dtype}")

        def run(work):
            self._gather_into_list(outs[0], t)
        return self._submit("allgather", run, outs, opts, dev=_cuda_dev(t, outs))

    def _gather_into_list(self, out_list, t):
        flat, _ = _contig(t)
        n = _nbytes(flat)
        sizes = [_nbytes(o) for o in out_list]
        if sizes[self._rank] != n:
            raise InvalidArgument(f"allgather: output tensor {self._rank} holds {sizes[self._rank]} bytes "
                                  f"but this rank's input holds {n}")
        if all(s == n for s in sizes):
            packed = torch.empty(n * self._size, dtype=torch.uint8, device=flat.device)
            self._comm.all_gather(packed, _bytes(flat))
        else:
            # Uneven sizes (NCCL allows them): every rank sends its input to everyone.
            packed = torch.empty(sum(sizes), dtype=torch.uint8, device=flat.device)
            mine = _bytes(flat).repeat(self._size)
            self._comm.all_to_all(packed, mine, out_splits=sizes, in_splits=[n] * self._size)
        off = 0
        for o, s in zip(out_list, sizes):
            _copy_bytes_into(o, packed[off:off + s])
            off += s

    def allgather_coalesced(self, output_lists, input_list, opts=None):
        """output_lists[r][k] receives input k of rank r (Gloo's layout)."""
        outs = [list(o) for o in output_lists]
        ins = list(input_list)
        if len(outs) != self._size:
            raise InvalidArgument(f"allgather_coalesced: need one output list per rank ({self._size}), "
                                  f"got {len(outs)}")
        for i in ins:
            _check(i, "allgather_coalesced: input")
        for r, o in enumerate(outs):
            if len(o) != len(ins):
                raise InvalidArgument(f"allgather_coalesced: output list {r} has {len(o)} tensors for "
                                      f"{len(ins)} inputs")
            for x, i in zip(o, ins):
                _check(x, "allgather_coalesced: output")
                if _nbytes(x) != _nbytes(i) or x.dtype != i.dtype:
                    raise InvalidArgument(f"allgather_coalesced: output list {r} does not match the inputs "
                                          f"({x.dtype} {tuple(x.shape)} vs {i.dtype} {tuple(i.shape)})")

        def run(work):
            flats = [_bytes(_contig(i)[0]) for i in ins]
            mine = torch.cat(flats) if flats else torch.empty(0, dtype=torch.uint8)
            per = mine.numel()
            packed = torch.empty(per * self._size, dtype=torch.uint8, device=mine.device)
            self._comm.all_gather(packed, mine)
            for r in range(self._size):
                off = r * per
                for k, f in enumerate(flats):
                    n = f.numel()
                    _copy_bytes_into(outs[r][k], packed[off:off + n])
                    off += n
        return self._submit("allgather_coalesced", run, outs, opts, dev=_cuda_dev(ins, outs))

    def all_gather_single(self, output, input, opts=None):
        _check(output, "all_gather_single: output")
        _check(input, "all_gather_single: input")
        if output.dtype != input.dtype:
            raise InvalidArgument(f"all_gather_into_tensor: output dtype {output.dtype} differs from input "
                                  f"dtype {input.dtype}")
        if output.numel() != input.numel() * self._size:
            raise InvalidArgument(f"all_gather_into_tensor: output holds {output.numel()} elements, expected "
                                  f"size {self._size} x input {input.numel()}")
        if self._copy_lane is not None:
            w = self._copy_fast("all_gather", output, input, None, opts, [output])
            if w is not None:
                return w

        def run(work):
            self._all_gather_tensor(output, input)
        return self._submit("all_gather_into_tensor", run, [output], opts, dev=_cuda_dev(output, input))

    _allgather_base = all_gather_single

    def _all_gather_tensor(self, output, input):
        fo, wbo = _contig(output)
        fi, _ = _contig(input)
        self._comm.all_gather(_bytes(fo), _bytes(fi))
        wbo()

    def all_gather_single_coalesced(self, outputs, inputs, opts=None):
        outputs, inputs = list(outputs), list(inputs)
        if len(outputs) != len(inputs):
            raise InvalidArgument("all_gather_into_tensor_coalesced: as many outputs as inputs needed")
        for o, i in zip(outputs, inputs):
            _check(o, "all_gather_into_tensor_coalesced")
            _check(i, "all_gather_into_tensor_coalesced")
            if _nbytes(o) != _nbytes(i) * self._size:
                raise InvalidArgument("all_gather_into_tensor_coalesced: output must hold size x input")

        def run(work):
            flats = [_bytes(_contig(i)[0]) for i in inputs]
            mine = torch.cat(flats) if flats else torch.empty(0, dtype=torch.uint8)
            per = mine.numel()
            packed = torch.empty(per * self._size, dtype=torch.uint8, device=mine.device)
            self._comm.all_gather(packed, mine)
            views = packed.view(self._size, per) if per else None
            off = 0
            for o, f in zip(outputs, flats):
                n = f.numel()
                if views is not None:
                    _copy_bytes_into(o, views[:, off:off + n].reshape(-1))
                off += n
        return self._submit("all_gather_into_tensor_coalesced", run, outputs, opts,
                            dev=_cuda_dev(outputs, inputs))

    allgather_into_tensor_coalesced = all_gather_single_coalesced

    def _root_list(self, lists, root, what, side, like):
        """gather's outputs / scatter's inputs: the root passes one list of `size` tensors of
        `like`'s bytes each, the other ranks none."""
        lists = [list(x) for x in lists]
        if self._rank == root:
            if len(lists) != 1 or len(lists[0]) != self._size:
                raise InvalidArgument(f"{what}: the root needs one list of {self._size} {side} tensors")
            for x in lists[0]:
                _check(x, f"{what}: {side}")
                if _nbytes(x) != _nbytes(like):
                    raise InvalidArgument(f"{what}: {side} tensors must have the {'in' if side == 'output' else 'out'}"
                                          f"put's size ({_nbytes(x)} vs {_nbytes(like)} bytes)")
        elif any(len(x) for x in lists):
            raise InvalidArgument(f"{what}: only the root passes {side} tensors")
        return lists

    def gather(self, output_tensors, input_tensors, opts=None):
        ins = list(input_tensors)
        t = _single(ins, "gather")
        root = self._root(opts.rootRank, "gather")
        outs = self._root_list(output_tensors, root, "gather", "output", t)

        def run(work):
            flat, _ = _contig(t)
            n = _nbytes(flat)
            packed = torch.empty(n * self._size, dtype=torch.uint8, device=flat.device) \
                if self._rank == root else None
            self._comm.gather(packed, _bytes(flat), root=root)
            if self._rank == root:
                for r, o in enumerate(outs[0]):
                    _copy_bytes_into(o, packed[r * n:(r + 1) * n])
        return self._submit("gather", run, outs, opts, dev=_cuda_dev(t, outs))

    def scatter(self, output_tensors, input_tensors, opts=None):
        outs = list(output_tensors)
        t = _single(outs, "scatter")
        root = self._root(opts.rootRank, "scatter")
        ins = self._root_list(input_tensors, root, "scatter", "input", t)

        def run(work):
            flat, wb = _contig(t)
            packed = None
            if self._rank == root:
                packed = torch.cat([_bytes(_contig(i)[0]) for i in ins[0]])
            self._comm.scatter(_bytes(flat), packed, root=root)
            wb()
        return self._submit("scatter", run, outs, opts, dev=_cuda_dev(t, ins))

    def reduce_scatter(self, output_tensors, input_tensors, opts=None):
        outs = list(output_tensors)
        t = _single(outs, "reduce_scatter")
        ins = [list(i) for i in input_tensors]
        if len(ins) != 1 or len(ins[0]) != self._size:
            raise InvalidArgument(f"reduce_scatter: expected one list of {self._size} input tensors")
        for i in ins[0]:
            _check(i, "reduce_scatter: input")
            if i.dtype != t.dtype or i.numel() != t.numel():
                raise InvalidArgument(f"reduce_scatter: every input must match the output "
                                      f"({t.dtype}, {t.numel()} elements); got {i.dtype}, {i.numel()}")
        red = _Reduction(opts.reduceOp, t.dtype, "reduce_scatter")

        def run(work):
            flat_in = torch.cat([_contig(i)[0] for i in ins[0]])
            self._reduce_scatter_flat(t, flat_in, red, True)
        return self._submit("reduce_scatter", run, outs, opts, dev=_cuda_dev(t, ins))

    def _reduce_scatter_flat(self, output, flat_in, red, may_modify):
        fo, wbo = _contig(output)
        n = fo.numel()
        if red.gather_fold is not None:
            stack = torch.empty((self._size, n), dtype=fo.dtype, device=fo.device)
            self._comm.all_to_all(_bytes(stack), _bytes(flat_in))
            fo.copy_(red.gather_fold(stack))
            wbo()
            return
        bin_ = red.to_work(flat_in, may_modify)
        bout = fo if red.work_dtype is None else torch.empty(n, dtype=red.work_dtype, device=fo.device)
        self._comm.reduce_scatter(bout, bin_, op=red.pyccl_op)
        red.from_work(bout, fo)
        wbo()

    def reduce_scatter_single(self, output, input, opts=None):
        _check(output, "reduce_scatter_tensor: output")
        _check(input, "reduce_scatter_tensor: input")
        if output.dtype != input.dtype:
            raise InvalidArgument(f"reduce_scatter_tensor: output dtype {output.dtype} differs from input "
                                  f"dtype {input.dtype}")
        if input.numel() != output.numel() * self._size:
            raise InvalidArgument(f"reduce_scatter_tensor: input holds {input.numel()} elements, expected "
                                  f"size {self._size} x output {output.numel()}")
        if self._copy_lane is not None:
            # the lane's dtypes reduce natively: the op name is all it needs (PREMUL_SUM, bitwise: not here)
            opname = _LANE_OPS.get(_op_kind(opts.reduceOp) if opts is not None else _R.SUM)
            if opname is not None:
                w = self._copy_fast("reduce_scatter", output, input, opname, opts, [output])
                if w is not None:
                    return w
        red = _Reduction(opts.reduceOp if opts is not None else dist.ReduceOp.SUM, output.dtype,
                         "reduce_scatter_tensor")

        def run(work):
            fi, _ = _contig(input)
            self._reduce_scatter_flat(output, fi, red, False)
        return self._submit("reduce_scatter_tensor", run, [output], opts, dev=_cuda_dev(output, input))

    _reduce_scatter_base = reduce_scatter_single

    def reduce_scatter_single_coalesced(self, outputs, inputs, opts=None):
        outputs, inputs = list(outputs), list(inputs)
        if len(outputs) != len(inputs):
            raise InvalidArgument("reduce_scatter_tensor_coalesced: as many outputs as inputs needed")
        op = opts.reduceOp if opts is not None else dist.ReduceOp.SUM
        reds = []
        for o, i in zip(outputs, inputs):
            _check(o, "reduce_scatter_tensor_coalesced")
            _check(i, "reduce_scatter_tensor_coalesced")
            if i.numel() != o.numel() * self._size or i.dtype != o.dtype:
                raise InvalidArgument("reduce_scatter_tensor_coalesced: input must hold size x output, same dtype")
            reds.append(_Reduction(op, o.dtype, "reduce_scatter_tensor_coalesced"))

        def run(work):
            for o, i, red in zip(outputs, inputs, reds):
                self._reduce_scatter_flat(o, _contig(i)[0], red, False)
        return self._submit("reduce_scatter_tensor_coalesced", run, outputs, opts,
                            dev=_cuda_dev(outputs, inputs))

    reduce_scatter_tensor_coalesced = reduce_scatter_single_coalesced

    def alltoall(self, output_tensors, input_tensors, opts=None):
        outs, ins = list(output_tensors), list(input_tensors)
        if len(outs) != self._size or len(ins) != self._size:
            raise InvalidArgument(f"alltoall: need {self._size} input and {self._size} output tensors, "
                                  f"got {len(ins)} and {len(outs)}")
        for x in outs + ins:
            _check(x, "alltoall")
        if len({x.dtype for x in outs + ins}) > 1:
            raise InvalidArgument("alltoall: all tensors must have the same dtype")

        def run(work):
            flats = [_bytes(_contig(i)[0]) for i in ins]
            packed_in = torch.cat(flats)
            out_sizes = [_nbytes(o) for o in outs]
            packed_out = torch.empty(sum(out_sizes), dtype=torch.uint8, device=packed_in.device)
            self._comm.all_to_all(packed_out, packed_in, out_splits=out_sizes,
                                  in_splits=[f.numel() for f in flats])
            off = 0
            for o, s in zip(outs, out_sizes):
                _copy_bytes_into(o, packed_out[off:off + s])
                off += s
        return self._submit("alltoall", run, outs, opts, dev=_cuda_dev(outs, ins))

    def all_to_all_single(self, output, input, output_split_sizes, input_split_sizes, opts=None):
        _check(output, "all_to_all_single: output")
        _check(input, "all_to_all_single: input")
        if output.dtype != input.dtype:
            raise InvalidArgument(f"all_to_all_single: output dtype {output.dtype} differs from input "
                                  f"dtype {input.dtype}")
        in_splits = self._splits(input, input_split_sizes, "input")
        out_splits = self._splits(output, output_split_sizes, "output")
        # Equal pieces go the equal-split way only when no split sizes were given: sizes that
        # happen to be equal on this rank say nothing about the peers' (Communicator.all_to_all).
        even = not input_split_sizes and not output_split_sizes
        if self._copy_lane is not None and even:
            w = self._copy_fast("all_to_all", output, input, None, opts, [output])
            if w is not None:
                return w

        def run(work):
            fo, wbo = _contig(output)
            fi, _ = _contig(input)
            if even:
                self._comm.all_to_all(_bytes(fo), _bytes(fi))
            else:
                self._comm.all_to_all(_bytes(fo), _bytes(fi), out_splits=out_splits, in_splits=in_splits)
            wbo()
        return self._submit("all_to_all_single", run, [output], opts, dev=_cuda_dev(output, input))

    alltoall_base = all_to_all_single

    def all_to_all_single_dev(self, output, input, output_split_sizes, input_split_sizes, async_op=False):
        """all_to_all_single whose split sizes (rows of dim 0, one per rank) are CUDA tensors,
        e.g. an MoE router's counts: no device-to-host copy (see ``pyccl.torch_backend.
        all_to_all_single``). `output_split_sizes` may be None: the output then only has to be
        large enough (rows past what arrives are left as they were)."""
        _check(output, "all_to_all_single: output")
        _check(input, "all_to_all_single: input")
        if not (output.is_cuda and input.is_cuda and output.is_contiguous() and input.is_contiguous()):
            raise InvalidArgument("all_to_all_single with device splits: output and input must be contiguous "
                                  "CUDA tensors")
        if output.dtype != input.dtype:
            raise InvalidArgument(f"all_to_all_single: output dtype {output.dtype} differs from input "
                                  f"dtype {input.dtype}")
        rows_in = input.shape[0] if input.dim() else 1
        rows_out = output.shape[0] if output.dim() else 1
        row_bytes = (_nbytes(input) // rows_in) if rows_in else 0
        if rows_out and _nbytes(output) // rows_out != row_bytes and rows_in:
            raise InvalidArgument("all_to_all_single: output and input rows differ in size")
        # rows -> bytes on the GPU, on the caller's stream (the collective is ordered after it)
        in_b = input_split_sizes.to(torch.int64) * row_bytes
        out_b = output_split_sizes.to(torch.int64) * row_bytes if output_split_sizes is not None else None

        def run(work):
            self._comm.all_to_all(_bytes(output), _bytes(input), out_splits=out_b, in_splits=in_b)
        work = self._submit("all_to_all_single", run, [output], None, async_op=async_op, dev=_cuda_dev(output))
        return work if async_op else None

    def _splits(self, t, splits, name):
        """Split sizes (rows of dim 0) -> byte counts per rank."""
        rows = t.shape[0] if t.dim() else 1
        row_bytes = (_nbytes(t) // rows) if rows else 0
        splits = [int(s) for s in (splits or [])]
        if not splits:
            if rows % self._size:
                raise InvalidArgument(f"all_to_all_single: {name} has {rows} rows, not divisible by "
                                      f"size {self._size}; pass {name}_split_sizes")
            return [rows // self._size * row_bytes] * self._size
        if len(splits) != self._size or any(s < 0 for s in splits) or sum(splits) != rows:
            raise InvalidArgument(f"all_to_all_single: {name}_split_sizes {splits} must be {self._size} "
                                  f"non-negative row counts adding up to {rows}")
        return [s * row_bytes for s in splits]

    def barrier(self, opts=None):
        def run(work):
            self._comm.barrier()
        return self._submit("barrier", run, [], opts)
