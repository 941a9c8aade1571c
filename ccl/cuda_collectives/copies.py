"""Copy collectives on CUDA buffers (all-gather, broadcast, all-to-all, gather, scatter): the
peers' buffers are named through the mailbox, then a barrier kernel, the copies (copy engines,
one stream per peer, or one SM kernel that pushes or pulls), and a closing barrier."""
import numpy as np

from ..errors import InvalidArgument
from .kernels import MAXR


class CopiesMixin:
    """The copy collectives of CudaCollectives."""

    def _copies(self, copies):
        """cudaMemcpyAsync each (lane, dst, src, nbytes); lanes run on their own streams at once."""
        rt = self.rt
        copies = [c for c in copies if c[3] > 0 and c[1] != c[2]]
        if not copies:
            return
        if len(copies) == 1:
            _, dst, src, n = copies[0]
            rt.memcpyAsync(dst, src, n, 4, self.stream)            # cudaMemcpyDefault
            return
        rt.eventRecord(self._fork, self.stream)
        lanes = sorted({c[0] for c in copies})
        for lane in lanes:
            rt.streamWaitEvent(self.side[lane].ptr, self._fork, 0)
        for lane, dst, src, n in copies:
            rt.memcpyAsync(dst, src, n, 4, self.side[lane].ptr)
        for lane in lanes:
            rt.eventRecord(self._joins[lane], self.side[lane].ptr)
            rt.streamWaitEvent(self.stream, self._joins[lane], 0)

    def _copy_collective(self, what, caller, join, sig, ptrs, extra, plan, pull=None, src=0):
        """Copy collective: exchange buffer names, barrier, copies, barrier. `plan(peers, table)`
        gives the pushes (lane, dst, src, nbytes); `pull(peers, table)`, where given, the same
        data as reads from the peers' buffers (`src`, this rank's input, is published as the
        second buffer). The copies run on copy engines or in one SM kernel (see _cm)."""
        mode = self._cm()
        if mode == "pull" and pull is not None:
            peers, table = self._mail(what, sig, list(ptrs) + [src], extra)
            copies = pull(peers, table)
        else:
            peers, table = self._mail(what, sig, ptrs, extra)
            copies = plan(peers, table)
        self._begin(caller)
        if self.size > 1:
            self._barrier(what, sig, 4)
        if mode == "ce" or not self._sm_copies(copies):
            self._copies(copies)
        if self.size > 1:
            self._barrier(what, sig, 5)
        return self._end(caller, join)

    def all_gather(self, what, caller, join, sig, out, inp):
        self.raise_if_failed(what)
        o, i = out.array, inp.array
        nb = i.nbytes
        me = self.rank
        with self._device:
            if nb == 0:
                return self._empty(caller, join)

            def plan(peers, _):
                return [(r, peers[0][r] + me * nb, i.ptr, nb) for r in range(self.size)]

            def pull(peers, _):
                return [(r, o.ptr + r * nb, peers[1][r], nb) for r in range(self.size)]
            return self._copy_collective(what, caller, join, sig, [o.ptr], (), plan, pull, i.ptr)

    def broadcast(self, what, caller, join, sig, buf, root):
        self.raise_if_failed(what)
        v = buf.array
        with self._device:
            if v.nbytes == 0:
                return self._empty(caller, join)

            def plan(peers, _):
                if self.rank != root:
                    return []
                return [(r, peers[0][r], v.ptr, v.nbytes) for r in range(self.size) if r != root]
            return self._copy_collective(what, caller, join, sig, [v.ptr], (), plan)

    def all_to_all(self, what, caller, join, sig, out, inp, out_splits, in_splits):
        self.raise_if_failed(what)
        o, i = out.array, inp.array
        item = i.itemsize
        size, me = self.size, self.rank
        out_displ = np.concatenate([[0], np.cumsum(out_splits)[:-1]]).astype(np.int64)
        in_displ = np.concatenate([[0], np.cumsum(in_splits)[:-1]]).astype(np.int64)
        with self._device:
            # No shortcut when this rank has nothing to send or receive: its peers' counts differ
            # and they exchange names through the mailbox (a skipped exchange put the mailbox out
            # of step; found by test_all_to_all_with_device_splits' host-split reference).
            extra = np.concatenate([out_displ, np.asarray(out_splits, dtype=np.int64),
                                    np.asarray(in_splits, dtype=np.int64)])

            def plan(peers, table):
                # Every rank checks the whole matrix, so a disagreement raises on all of them.
                for src in range(size):
                    for dst in range(size):
                        sent, expected = int(table[src][2 * size + dst]), int(table[dst][size + src])
                        if sent != expected:
                            raise InvalidArgument(
                                f"{what}: rank {src} sends {sent} elements to rank {dst}, which expects "
                                f"{expected} from it (in_splits/out_splits disagree; seen by rank {me})")
                copies = []
                for r in range(size):
                    their_displ = int(table[r][me])
                    copies.append((r, peers[0][r] + their_displ * item, i.ptr + int(in_displ[r]) * item,
                                   in_splits[r] * item))
                return copies

            def pull(peers, table):
                plan(peers, table)                   # the same checks
                copies = []
                for r in range(size):
                    their_in = table[r][2 * size:3 * size]
                    their_displ = int(sum(int(x) for x in their_in[:me]))
                    copies.append((r, o.ptr + int(out_displ[r]) * item, peers[1][r] + their_displ * item,
                                   int(their_in[me]) * item))
                return copies
            return self._copy_collective(what, caller, join, sig, [o.ptr], extra, plan, pull, i.ptr)

    def gather(self, what, caller, join, sig, out, inp, root):
        self.raise_if_failed(what)
        i = inp.array
        nb, me = i.nbytes, self.rank
        with self._device:
            if nb == 0:
                return self._empty(caller, join)
            mine = [out.array.ptr] if (me == root and out is not None) else [0]

            def plan(peers, _):
                return [(root, peers[0][root] + me * nb, i.ptr, nb)]
            return self._copy_collective(what, caller, join, sig, mine, (), plan)

    def scatter(self, what, caller, join, sig, out, inp, root):
        self.raise_if_failed(what)
        o = out.array
        nb, me = o.nbytes, self.rank
        with self._device:
            if nb == 0:
                return self._empty(caller, join)

            def plan(peers, _):
                if me != root:
                    return []
                src = inp.array.ptr
                return [(r, peers[0][r], src + r * nb, nb) for r in range(self.size)]
            return self._copy_collective(what, caller, join, sig, [o.ptr], (), plan)

    def all_to_all_dev(self, what, caller, join, sig, out, inp, out_splits, in_splits):
        """all_to_all whose split sizes (int64 element counts, one per rank) are CUDA tensors on
        this GPU (MoE: the router counts on the GPU): one kernel reads them, exchanges them
        through the peers' flag memory and pushes the pieces, so the host never waits for the
        GPU. `out_splits` may be None (the output then only has to be large enough); given, it
        is checked against what the peers send. The kernel puts every rank's counts, capacities
        and expectations in every rank's table, so a disagreement is found by every rank alike
        (each raises InvalidArgument on its next call) and then no byte moves. The output's bytes past what arrives are left
        as they were. The peers' output buffers are named through the mailbox (host, at call
        time; once per capture under a CUDA graph)."""
        import torch
        self.raise_if_failed(what)
        o, i = out.array, inp.array
        ins = self._split_tensor(in_splits, what, "in_splits")
        outs = self._split_tensor(out_splits, what, "out_splits") if out_splits is not None else None
        with self._device:
            peers, _ = self._mail(what, sig, [o.ptr])
            self._begin(caller)
            self._barrier_fn()
            fn = self._mods["alltoallv"]
            self._next_epoch(what)
            outp = [int(p) for p in peers[0]] + [0] * (MAXR - self.size)
            fn(min(self.max_blocks, 32), self.stream,
               (i.ptr, ins.data_ptr(), outs.data_ptr() if outs is not None else 0, i.size, o.size, i.itemsize,
                self.tab, *outp, self.rank, self.size, self.ectr, sig, self.status.ptr, self._timeout_ns))
            # the split tensors must not be recycled by torch before pyccl's stream has read them
            # (under capture they belong to the graph's pool and live as long as the graph)
            if not self._capturing(caller):
                stream = torch.cuda.ExternalStream(self.stream, device=torch.device("cuda", self.dev))
                for t in (ins, outs):
                    if t is not None:
                        t.record_stream(stream)
            return self._end(caller, join)

    def _split_tensor(self, t, what, name):
        import torch
        if not isinstance(t, torch.Tensor) or not t.is_cuda or t.get_device() != self.dev:
            raise InvalidArgument(f"{what}: {name} must be a CUDA tensor on cuda:{self.dev} (or a list), got "
                                  f"{type(t).__name__}{' on ' + str(t.device) if isinstance(t, torch.Tensor) else ''}")
        if t.numel() != self.size or t.dim() != 1:
            raise InvalidArgument(f"{what}: {name} must hold {self.size} counts (one per rank), got shape "
                                  f"{tuple(t.shape)}")
        if t.dtype != torch.int64 or not t.is_contiguous():
            t = t.to(torch.int64).contiguous()        # on the device, stream-ordered: no host sync
        return t
