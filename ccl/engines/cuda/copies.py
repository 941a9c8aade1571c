"""Copy collectives on CUDA buffers (all-gather, broadcast, all-to-all, gather, scatter).

Pieces up to PYCCL_CUDA_STAGE_MAX bytes go through the peers' scratch in one kernel
(``_staged``: push into the scratch, flags, copy out of the own scratch; the way NCCL copies
through its own buffers when a user buffer is not registered): no rank needs a peer's buffer,
so the host exchanges nothing per call and the call can be captured and replayed. Larger
pieces skip that extra local copy: the peers' buffers are named through the mailbox (one host
exchange per call), then a barrier kernel, the copies (copy engines, one stream per peer, or one
SM kernel that pushes or pulls), and a closing barrier."""
import numpy as np

from ...errors import InvalidArgument
from .kernels import _PARAMS, MAXR, THREADS, _Prepared

#: the least scratch region (bytes per sender) of the uneven all-to-all through the scratch: the
#: bytes one round moves per pair of ranks
A2AV_REGION = 4 << 20


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

    def _takes_staged(self, piece):
        """Whether a copy collective whose pieces hold `piece` bytes goes through the scratch:
        PYCCL_CUDA_COPY=staged (up to the scratch's limit), or 'auto' up to PYCCL_CUDA_STAGE_MAX.
        The same answer on every rank (it depends on the call and the environment only)."""
        if self.size < 2 or piece <= 0:
            return False
        if self.copy_mode == "staged":
            return piece <= self.scratch_max
        return self.copy_mode == "auto" and piece <= min(self.stage_max, self.scratch_max)

    def _staged(self, what, caller, join, sig, piece, pushes, drains, own=(0, 0, 0)):
        """One 'staged' kernel (ccl/engines/cuda/kernels_copy.cu): pushes {peer: (src, nbytes)} into region
        `rank` of each peer's scratch, drains {peer: (dst, nbytes)} out of region `peer` of ours,
        `own` = (dst, src, nbytes) copied locally. No host exchange, unless the scratch must grow
        (collective: the mailbox first checks that every rank makes this call)."""
        if piece > self.big_cap:
            self._mail(what, sig, [])
            self._ensure_big(piece, what, caller)
        return self._launch_prepared(self._prepare_staged(sig, piece, pushes, drains, own), what, caller, join)

    def _launch_prepared(self, p, what, caller, join):
        """One prepared launch as a collective of the general path: on the caller's stream when
        it is synchronous and our previous collective already ends there (as _oneshot), else on
        pyccl's stream after the caller's."""
        self._next_epoch(what)
        if join and self._tail == caller:
            p.launch(p.fn, p.grid, THREADS, caller, p.address)
            self._last = None
            return None
        self._begin(caller)
        p.launch(p.fn, p.grid, THREADS, self.stream, p.address)
        return self._end(caller, join)

    def _pieces(self, name, out_ptr, in_ptr, nb, root=-1):
        """What `name` moves through the scratch, as _staged takes it: (pushes, drains, own).
        nb = the bytes of one piece (all_to_all: of each rank's piece); broadcast: out_ptr is
        the buffer. Shared by the general path and the torch lane, so both launch the same."""
        me = self.rank
        others = [r for r in range(self.size) if r != me]
        none = (0, 0, 0)
        if name == "all_gather":
            return ({r: (in_ptr, nb) for r in others}, {q: (out_ptr + q * nb, nb) for q in others},
                    (out_ptr + me * nb, in_ptr, nb))
        if name == "all_to_all":
            return ({r: (in_ptr + r * nb, nb) for r in others}, {q: (out_ptr + q * nb, nb) for q in others},
                    (out_ptr + me * nb, in_ptr + me * nb, nb))
        if name == "broadcast":
            return ({r: (out_ptr, nb) for r in others}, {}, none) if me == root else \
                ({}, {root: (out_ptr, nb)}, none)
        if name == "gather":
            return ({}, {q: (out_ptr + q * nb, nb) for q in others}, (out_ptr + me * nb, in_ptr, nb)) \
                if me == root else ({root: (in_ptr, nb)}, {}, none)
        if name == "scatter":
            return ({r: (in_ptr + r * nb, nb) for r in others}, {}, (out_ptr, in_ptr + me * nb, nb)) \
                if me == root else ({}, {root: (out_ptr, nb)}, none)
        raise ValueError(name)

    def _prepare_staged(self, sig, piece, pushes, drains, own):
        key = ("staged", sig, piece, tuple(sorted(pushes.items())), tuple(sorted(drains.items())), own)
        p = self._prepared.get(key)
        if p is None:
            ps, pn, dd, dn = ([0] * MAXR for _ in range(4))
            for r, (src, n) in pushes.items():
                ps[r], pn[r] = src, n
            for q, (dst, n) in drains.items():
                dd[q], dn[q] = dst, n
            fn = self._common("staged")
            p = _Prepared(fn.ptr, self._blocks(-(-piece // 16)), _PARAMS["staged"],
                          (self.tab, self.big_cap, *ps, *pn, *dd, *dn, *own, self.rank, self.size, self.ectr, sig,
                           self.status.ptr, self._timeout_ns))
            self._remember(key, p)
        return p

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
            if self._takes_staged(nb):
                return self._staged(what, caller, join, sig, nb, *self._pieces("all_gather", o.ptr, i.ptr, nb))

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
            nb = v.nbytes
            if self._takes_staged(nb):
                return self._staged(what, caller, join, sig, nb, *self._pieces("broadcast", v.ptr, 0, nb, root))

            def plan(peers, _):
                if self.rank != root:
                    return []
                return [(r, peers[0][r], v.ptr, v.nbytes) for r in range(self.size) if r != root]
            return self._copy_collective(what, caller, join, sig, [v.ptr], (), plan)

    def all_to_all(self, what, caller, join, sig, out, inp, out_splits, in_splits, even=False):
        """`even`: the caller gave no splits, on every rank (see Communicator.all_to_all), so
        the equal-piece kernel may run; given splits always take the uneven path."""
        self.raise_if_failed(what)
        o, i = out.array, inp.array
        item = i.itemsize
        size, me = self.size, self.rank
        with self._device:
            k = in_splits[0]
            if even and self._takes_staged(k * item):
                # equal pieces (all_to_all_single's default): the piece count joins the signature
                return self._staged(what, caller, join, sig | (k & 0xFFFFFFFF), k * item,
                                    *self._pieces("all_to_all", o.ptr, i.ptr, k * item))
            if self.a2av_mode == "staged":
                return self._alltoallv_staged(what, caller, join, sig, o, i, host=(in_splits, out_splits))
            # No shortcut when this rank has nothing to send or receive: its peers' counts differ
            # and they exchange names through the mailbox (a skipped exchange put the mailbox out
            # of step; found by test_all_to_all_with_device_splits' host-split reference).
            out_displ = np.concatenate([[0], np.cumsum(out_splits)[:-1]]).astype(np.int64)
            in_displ = np.concatenate([[0], np.cumsum(in_splits)[:-1]]).astype(np.int64)
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
            if self._takes_staged(nb):
                o_ptr = out.array.ptr if me == root else 0
                return self._staged(what, caller, join, sig, nb, *self._pieces("gather", o_ptr, i.ptr, nb, root))
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
            if self._takes_staged(nb):
                i_ptr = inp.array.ptr if me == root else 0
                return self._staged(what, caller, join, sig, nb, *self._pieces("scatter", o.ptr, i_ptr, nb, root))

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
        (each raises InvalidArgument on its next call) and then no byte moves. The output's bytes
        past what arrives are left as they were. The peers' output buffers are named through the
        mailbox (host, at call time; once per capture under a CUDA graph), or, with
        PYCCL_CUDA_A2AV=staged, the pieces go through the scratch and the host exchanges nothing."""
        self.raise_if_failed(what)
        o, i = out.array, inp.array
        ins = self._split_tensor(in_splits, what, "in_splits")
        outs = self._split_tensor(out_splits, what, "out_splits") if out_splits is not None else None
        if self.a2av_mode == "staged":
            with self._device:
                return self._alltoallv_staged(what, caller, join, sig, o, i, dev=(ins, outs))
        with self._device:
            peers, _ = self._mail(what, sig, [o.ptr])
            self._begin(caller)
            fn = self._common("alltoallv")
            self._next_epoch(what)
            outp = [int(p) for p in peers[0]] + [0] * (MAXR - self.size)
            fn(min(self.max_blocks, 32), self.stream,
               (i.ptr, ins.data_ptr(), outs.data_ptr() if outs is not None else 0, i.size, o.size, i.itemsize,
                self.tab, *outp, self.rank, self.size, self.ectr, sig, self.status.ptr, self._timeout_ns))
            self._keep_splits(caller, ins, outs)
            return self._end(caller, join)

    def _keep_splits(self, caller, *tensors):
        """The split tensors must not be recycled by torch before pyccl's stream has read them.
        Under capture record_stream does not apply, and a temporary (an int64 copy, the torch
        backend's rows-to-bytes product) freed when the call returns would go back to the
        graph's pool, where a later captured allocation could reuse it while the graph's copy
        of this call (async_op: nothing orders the two) still reads it: captured calls keep
        theirs as long as this communicator (a few counts per captured call)."""
        import torch
        if self._capturing(caller):
            self._captured_splits.extend(t for t in tensors if t is not None)
            return
        stream = torch.cuda.ExternalStream(self.stream, device=torch.device("cuda", self.dev))
        for t in tensors:
            if t is not None:
                t.record_stream(stream)

    def _alltoallv_staged(self, what, caller, join, sig, o, i, host=None, dev=None):
        """Uneven all-to-all through the peers' scratch ('alltoallv_staged' in the .cu): split
        sizes from the host (`host` = (in_splits, out_splits), element lists) or the device
        (`dev` = (in tensor, out tensor or None)); the kernel exchanges them through the flag
        memory and moves the pieces in rounds of the scratch's region size. No peer buffer, so
        no host exchange per call, only once to make the scratch (PYCCL_CUDA_A2AV=staged).
        Block b waits for block b of every peer, round after round: ranks sharing one GPU
        under MPS need all ranks x grid blocks resident at once (about 2 per SM at 64
        registers a thread), and without MPS each round waits for the peers' time slices (why
        it is not the default: bench/JOURNAL.md, the H100 run of 2026-12-07)."""
        sig ^= 1 << 62                       # not the mailbox flavour's call: a mix is a mismatch
        region = min(A2AV_REGION, self.scratch_max)
        if self.big_cap < region:
            self._mail(what, sig, [])        # collective: every rank makes this call
            self._ensure_big(region, what, caller)
        fn = self._common("alltoallv_staged")
        pad = [0] * MAXR
        if host is not None:
            ins_ptr = outs_ptr = 0
            h = list(host[0]) + pad[len(host[0]):]
            e = list(host[1]) + pad[len(host[1]):]
            has_e = 1
        else:
            ins, outs = dev
            ins_ptr, outs_ptr = ins.data_ptr(), (outs.data_ptr() if outs is not None else 0)
            h, e, has_e = pad, pad, 0
        grid = min(self.max_blocks, 32)
        # Every rank must cut the pieces into the same spans and rounds: they follow from the
        # grid and the region, so both join the signature's count bits (all_to_all leaves them
        # free) and ranks that differ (PYCCL_CUDA_BLOCKS, PYCCL_CUDA_SCRATCH, SM count) raise a
        # call mismatch instead of hanging.
        sig |= (grid << 24 | (self.big_cap >> 20) & 0xFFFFFF) & 0xFFFFFFFF
        self._begin(caller)
        self._next_epoch(what)
        fn(grid, self.stream,
           (i.ptr, ins_ptr, outs_ptr, i.size, o.size, i.itemsize, self.tab, o.ptr, self.big_cap, *h, *e, has_e,
            self.rank, self.size, self.ectr, sig, self.status.ptr, self._timeout_ns))
        if dev is not None:
            self._keep_splits(caller, *dev)
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
