"""All-reduce, reduce and reduce-scatter on CUDA buffers: one-shot (small; one launch, no
barrier), two-shot by SM stores into the peers' scratch ('kernel'), by copy engines ('ce')
or by SM loads from the peers' buffers ('pull'), in rounds that fit the scratch."""
from ...dtypes import AVG
from ...errors import PycclError
from .kernels import _PARAMS, MAXR, THREADS, _Prepared


class ReductionsMixin:
    """The reducing collectives of CudaCollectives."""

    # Each takes (what, caller stream, join, signature, *the communicator's arguments) and
    # returns the event that marks its end on pyccl's stream.
    def all_reduce(self, what, caller, join, sig, buf, op):
        self.raise_if_failed(what)
        v = buf.array
        with self._device:
            if v.size == 0:
                return self._empty(caller, join)
            if v.nbytes <= self.oneshot_max:
                return self._oneshot(what, caller, join, sig, v, buf.dtype, op)
            return self._twoshot(what, caller, join, sig, v.ptr, v.ptr, v.size, v.itemsize, buf.dtype, op,
                                 allgather=True)

    def reduce(self, what, caller, join, sig, buf, root, op):
        self.raise_if_failed(what)
        v = buf.array
        with self._device:
            if v.size == 0:
                return self._empty(caller, join)
            if v.nbytes <= self.oneshot_max:    # non-roots keep their buffer: the result goes elsewhere
                p = self._prepare_oneshot(v.ptr, v.ptr if self.rank == root else self._tmp(v.nbytes), v.size,
                                          v.itemsize, buf.dtype, op, sig)
                return self._launch_prepared(p, what, caller, join)
            # non-roots keep their buffer: they reduce a copy in pyccl's reduce buffer, which holds
            # at most tmp_max bytes, so every rank goes in rounds of that many (the same rounds)
            step = max(1, self.tmp_max // v.itemsize)
            tmp = self._tmp(min(v.size, step) * v.itemsize) if self.rank != root else 0
            self._begin(caller)
            for start in range(0, v.size, step):
                cnt = min(step, v.size - start)
                src = v.ptr + start * v.itemsize
                ptr = src if self.rank == root else tmp
                if ptr != src:
                    self.rt.memcpyAsync(ptr, src, cnt * v.itemsize, 4, self.stream)
                self._twoshot_body(what, sig, ptr, ptr, cnt, v.itemsize, buf.dtype, op, allgather=True)
            return self._end(caller, join)

    def _oneshot(self, what, caller, join, sig, v, dtype, op):
        # A synchronous one-shot whose predecessor already ends on the caller's stream is
        # launched right there (same order, two events fewer per call): _launch_prepared.
        return self._launch_prepared(self._prepare_oneshot(v.ptr, v.ptr, v.size, v.itemsize, dtype, op, sig),
                                     what, caller, join)

    def _oneshot_body(self, what, sig, v, dtype, op, stream=None):
        """Enqueue the one-shot alone (bench/gpu_bench.py's probe of the bare launch)."""
        p = self._prepare_oneshot(v.ptr, v.ptr, v.size, v.itemsize, dtype, op, sig)
        self._next_epoch(what)
        p.launch(p.fn, p.grid, THREADS, self.stream if stream is None else stream, p.address)

    def _prepare_oneshot(self, inp, out, count, itemsize, dtype, op, sig):
        """The one-shot launch of (in, out, count, dtype, op), kernel parameters filled in
        once; a call then only launches it."""
        key = (inp, out, count, dtype, op, sig)
        p = self._prepared.get(key)
        if p is None:
            n = 16 // itemsize if inp % 16 == 0 and out % 16 == 0 else 1
            opcode = self._opcode(dtype, op)
            fn = self._mods.get(("oneshot", dtype, opcode, n)) or self._kernel("oneshot", dtype, opcode, n)
            grid = min(self.max_blocks, -(-(count // n) // THREADS)) or 1
            avg = self.size if op is AVG else 0
            p = _Prepared(fn.ptr, grid, _PARAMS["oneshot"],
                          (inp, out, count, self.tab, self.small_cap, self.rank, self.size, self.ectr, sig,
                           self.status.ptr, self._timeout_ns, avg))
            self._remember(key, p)
        return p

    def _gather_targets(self):
        """The 'kernel' two-shot's gather half: no addresses (zeros) and gather = 1, which tells
        the kernel to read them from the peer table (region r of a scratch belongs to sender r),
        so a captured launch survives a resume that re-makes the scratch (memory.py)."""
        return [0] * self.size, 1

    def _prepare_twoshot(self, ptr, count, itemsize, dtype, op, sig):
        """The in-place 'kernel' two-shot all-reduce of (ptr, count, dtype, op) as one prepared
        launch, or None when it would not be one: another two-shot flavour, or a message whose
        segments do not fit the scratch as it is (growing it is collective, so that is left to
        the general path). The scratch pointers are in the launch: growing it forgets these."""
        key = ("twoshot", ptr, count, dtype, op, sig)
        p = self._prepared.get(key)
        if p is None:
            size, rank = self.size, self.rank
            n = 16 // itemsize
            seg = -(-count // size)
            seg = -(-seg // n) * n                # as _twoshot_body's one round
            if self._ts(True) != "kernel" or size < 2 or seg * itemsize > self.big_cap:
                return None
            dst, gather = self._gather_targets()
            my_out = ptr + rank * seg * itemsize
            vec = self._vec(itemsize, ptr, my_out, seg * itemsize, *[d for d in dst if d])
            fn = self._kernel("twoshot", dtype, self._opcode(dtype, op), vec)
            p = _Prepared(fn.ptr, self._blocks(seg // vec), _PARAMS["twoshot"],
                          (ptr, seg, seg, count, my_out, self.tab, self.big_cap, *dst, *[0] * (MAXR - size),
                           gather, rank, size, self.ectr, sig, self.status.ptr, self._timeout_ns,
                           size if op is AVG else 0))
            self._remember(key, p)
        return p

    def _prepare_rs(self, inp, out, count, itemsize, dtype, op, sig):
        """The 'kernel' reduce-scatter of (inp: size x count, out: count) as one prepared launch,
        exactly as _twoshot_body launches it in one round, or None when that body would do
        otherwise (another flavour, copy engines, a scratch too small: growing is collective)."""
        key = ("rs", inp, out, count, dtype, op, sig)
        p = self._prepared.get(key)
        if p is None:
            nb = count * itemsize
            if self.size < 2 or self._ts(False, nb) != "kernel" or nb > self.big_cap or nb >= self.rs_ce_min:
                return None
            vec = self._vec(itemsize, inp, out, nb)
            fn = self._kernel("twoshot", dtype, self._opcode(dtype, op), vec)
            p = _Prepared(fn.ptr, self._blocks(count // vec), _PARAMS["twoshot"],
                          (inp, count, count, 1 << 62, out, self.tab, self.big_cap, *[0] * MAXR, 0, self.rank,
                           self.size, self.ectr, sig, self.status.ptr, self._timeout_ns,
                           self.size if op is AVG else 0))
            self._remember(key, p)
        return p

    def _twoshot(self, what, caller, join, sig, inp, out, count, itemsize, dtype, op, allgather):
        peers = None
        if allgather and self._ts(allgather) != "kernel":     # 'kernel' gathers through the scratch
            peers, _ = self._mail(what, sig, [out])
            peers = peers[0]
        self._begin(caller)
        self._twoshot_body(what, sig, inp, out, count, itemsize, dtype, op, allgather, peers)
        return self._end(caller, join)

    def _twoshot_body(self, what, sig, inp, out, count, itemsize, dtype, op, allgather, peers=None):
        """All-reduce (allgather=True: in place, inp == out, `count` elements) or reduce-scatter
        (inp holds size x count, out count), in rounds that fit the scratch."""
        size, rank = self.size, self.rank
        mode = self._ts(allgather, count * itemsize)
        if allgather and peers is None and mode != "kernel":
            peers, _ = self._mail(what, sig, [out])
            peers = peers[0]
        if mode == "pull" and size > 1:
            return self._twoshot_pull(what, sig, inp, out, count, itemsize, dtype, op, allgather, peers)
        n = 16 // itemsize
        avg = size if op is AVG else 0
        opcode = self._opcode(dtype, op)
        if allgather:
            seg = -(-count // size)
            seg = -(-seg // n) * n
        else:
            seg = count
        per_round = max(n, (self.scratch_max // itemsize) // n * n)
        need = min(seg, per_round) * itemsize
        if need > self.big_cap and size > 1:
            # Growing the scratch is collective (every rank maps the new one): first check through
            # the mailbox that every rank makes this very call, so that a mismatched call raises
            # here instead of growing to different sizes. Calls that fit skip every host exchange.
            self._mail(what, sig, [])
        self._ensure_big(need, what)
        per_round = min(per_round, self.big_cap // itemsize // n * n)
        start = 0
        while start < seg:
            chunk = min(per_round, seg - start)
            gather = 0
            if allgather:
                # Round k takes elements [start, start + chunk) of every segment.
                stride, total = seg, count - start
                base_in = inp + start * itemsize
                my_out = inp + (rank * seg + start) * itemsize
                ce = mode == "ce"
                if ce:
                    dst = [(peers[r] + (rank * seg + start) * itemsize) if r != rank else 0 for r in range(size)]
                else:                     # the gather half of every peer's scratch: no buffer exchange
                    dst, gather = self._gather_targets()
            else:
                stride, total = seg, 1 << 62
                base_in = inp + start * itemsize
                my_out = out + start * itemsize
                dst = [0] * size
                ce = chunk * itemsize >= self.rs_ce_min or mode == "ce"
            vec = self._vec(itemsize, base_in, my_out, stride * itemsize, *[d for d in dst if d])
            if ce and size > 1:
                if self._capture_now():
                    self._big_pinned = True       # its copies name the peers' scratch (memory.py)
                self._twoshot_ce(what, sig, base_in, stride, chunk, total, my_out, dst, itemsize, dtype, opcode,
                                 avg, vec)
            else:
                fn = self._kernel("twoshot", dtype, opcode, vec)
                self._next_epoch(what)
                grid = self._blocks(chunk // vec)
                fn(grid, self.stream, (base_in, stride, chunk, total, my_out, self.tab, self.big_cap,
                                       *dst, *[0] * (MAXR - size), gather, rank, size, self.ectr, sig,
                                       self.status.ptr, self._timeout_ns, avg))
            start += chunk

    def _twoshot_pull(self, what, sig, inp, out, count, itemsize, dtype, op, allgather, peers):
        """Two-shot by SM loads from the peers' buffers (kernel twoshot_pull): no scratch, no
        rounds, one launch. All-reduce: in place, `peers` = every rank's buffer. Reduce-scatter:
        every rank publishes its input (size x count) through the mailbox."""
        size, rank = self.size, self.rank
        if allgather:
            seg = -(-count // size)
            seg = -(-seg // (16 // itemsize)) * (16 // itemsize)
            bases, total, my_out = list(peers), count, inp + rank * seg * itemsize
        else:
            got, _ = self._mail(what, sig, [inp])
            seg, bases, total, my_out = count, list(got[0]), 1 << 62, out
        if any(b == 0 for b in bases):
            raise PycclError(f"{what}: a peer published no buffer for the pull two-shot")
        vec = self._vec(itemsize, my_out, seg * itemsize, *bases)
        opcode = self._opcode(dtype, op)
        fn = self._kernel("twoshot_pull", dtype, opcode, vec)
        self._next_epoch(what)
        grid = self._blocks(seg // vec)
        fn(grid, self.stream, (seg, seg, total, my_out, self.tab, *bases, *[0] * (MAXR - size), rank, size,
                               1 if allgather else 0, self.ectr, sig, self.status.ptr, self._timeout_ns,
                               size if op is AVG else 0))

    def _twoshot_ce(self, what, sig, base_in, stride, chunk, total, my_out, dst, itemsize, dtype, opcode, avg, vec):
        size, rank = self.size, self.rank

        def seg_len(r):
            return max(0, min(total - r * stride, chunk))
        big = [int(self.tab_host[2 * MAXR + r]) for r in range(size)]
        pushes = [(r, big[r] + rank * self.big_cap, base_in + r * stride * itemsize, seg_len(r) * itemsize)
                  for r in range(size) if r != rank]
        self._copies(pushes)
        self._barrier(what, sig, 4)
        mine = seg_len(rank)
        srcs = [(base_in + rank * stride * itemsize) if r == rank else (big[rank] + r * self.big_cap)
                for r in range(size)]
        fn = self._kernel("reduce_n", dtype, opcode, vec)
        grid = self._blocks(mine // vec, cap=4 * self.max_blocks)
        fn(grid, self.stream, (my_out, mine, *srcs, *[0] * (MAXR - size), size, avg))
        if any(dst):
            self._copies([(r, dst[r], my_out, mine * itemsize) for r in range(size) if r != rank and dst[r]])
        self._barrier(what, sig, 5)

    def reduce_scatter(self, what, caller, join, sig, out, inp, op):
        self.raise_if_failed(what)
        o, i = out.array, inp.array
        with self._device:
            if o.size == 0:
                return self._empty(caller, join)
            self._begin(caller)
            self._twoshot_body(what, sig, i.ptr, o.ptr, o.size, o.itemsize, out.dtype, op, allgather=False)
            return self._end(caller, join)
