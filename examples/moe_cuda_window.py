"""``--dispatch window`` on CUDA for examples/moe_inference.py: the MoE exchanges by one-sided
puts into pyccl CUDA windows (ccl/windows/cuda.py), every call queued on the current stream.

The windows are those of moe_inference's ``WindowExchange`` (rows at ``source * cap`` in each target's window,
per-expert counts beside them, one signal per source), in device memory. The split sizes stay
on the device: each row's destination and place there are computed on the device. Two ways to
move the rows (``--window-puts``):

- ``copies``: the rows are scattered into a [world, cap] send block and the host queues one
  ``win.put`` of a whole block per destination (``cap`` rows: a size the host knows without
  reading a count), with its signal;
- ``fused``: one kernel stores the counts and every row into their destinations' windows and
  signals once; the target waits once for both (``dispatch()``, which moe_inference calls instead
  of ``counts()`` + ``rows("dispatch")``); the combine as with ``kernel``;
- ``kernel``: one kernel stores every row straight into its destination's mapped window
  (``win.device_addresses()``); its last block adds the signals. The counts go the same way
  (one small kernel). Fewer launches, no send block.

Either way the target's stream waits for one signal per source. Nothing in the counts exchange
or in queuing the dispatch or the combine may synchronise with the device: they run inside
``SyncCount``, which counts every synchronisation there (torch's sync debug mode "warn": each
synchronising torch call warns; and the cupy runtime's synchronising and polling functions, which
pyccl calls, wrapped while inside) into ``syncs``. The host reads how many rows arrived only after
the dispatch is queued (the experts need it), as with ``--splits device``. ``layer_us``: host
time of queuing the counts and the dispatch, per MoE layer (``reset()`` forgets the warm-up's);
``wait_us``: the part of it spent in ``wait_signal`` (the rest: launches or puts, and checks).
"""
import statistics
import threading
import time
import warnings

import torch

import parallel as par

_SOURCE = r"""
typedef long long i64;
typedef unsigned long long u64;

// the block that finishes last adds 1 to every destination's signal cell (slot), after every
// block's stores are visible system-wide, and resets the counter for the next launch
__device__ void signal_when_last(const u64* cells, i64 world, i64 slot, unsigned int* finished) {
  __threadfence_system();
  __syncthreads();
  if (threadIdx.x == 0) {
    unsigned int before = atomicAdd(finished, 1u);
    if (before == gridDim.x - 1) {
      __threadfence_system();
      for (i64 p = 0; p < world; p++) atomicAdd((u64*)(cells[p] + 8 * slot), 1ULL);
      *finished = 0;
    }
  }
}

// rows [m, d] float32, grouped by destination (splits[world] rows each): row i goes to
// destination p's window at row rank * cap + (i - start of p). The last block to finish adds
// 1 to every destination's signal cell (slot).
extern "C" __global__ void moe_put_rows(const float* rows, i64 m, i64 d, const i64* splits, i64 world,
                                        const u64* peers, const u64* cells, i64 rank, i64 cap, i64 slot,
                                        unsigned int* finished) {
  for (i64 i = blockIdx.x; i < m; i += gridDim.x) {
    i64 p = 0, start = 0;
    while (p < world - 1 && i >= start + splits[p]) { start += splits[p]; p++; }
    float* out = (float*)peers[p] + (rank * cap + (i - start)) * d;
    const float* in = rows + i * d;
    for (i64 j = threadIdx.x; j < d; j += blockDim.x) out[j] = in[j];
  }
  signal_when_last(cells, world, slot, finished);
}

// counts and rows at once: block 0 also stores counts [world, per] (row p into destination p's
// counts window at rank * per); each row's destination comes from the counts (its experts' sum);
// the last block to finish adds 1 to every destination's cell (slot of the rows' window).
extern "C" __global__ void moe_put_all(const float* rows, i64 m, i64 d, const i64* counts, i64 world, i64 per,
                                       const u64* peers, const u64* cpeers, const u64* cells, i64 rank, i64 cap,
                                       i64 slot, unsigned int* finished) {
  if (blockIdx.x == 0)
    for (i64 k = threadIdx.x; k < world * per; k += blockDim.x)
      ((i64*)cpeers[k / per])[rank * per + k % per] = counts[k];
  for (i64 i = blockIdx.x; i < m; i += gridDim.x) {
    i64 p = 0, start = 0;
    for (;;) {
      i64 n = 0;
      for (i64 e = 0; e < per; e++) n += counts[p * per + e];
      if (p == world - 1 || i < start + n) break;
      start += n;
      p++;
    }
    float* out = (float*)peers[p] + (rank * cap + (i - start)) * d;
    const float* in = rows + i * d;
    for (i64 j = threadIdx.x; j < d; j += blockDim.x) out[j] = in[j];
  }
  signal_when_last(cells, world, slot, finished);
}

// counts [world, per] int64: row p goes to destination p's window at rank * per; then signals.
extern "C" __global__ void moe_put_counts(const i64* counts, i64 world, i64 per, const u64* peers,
                                          const u64* cells, i64 rank, i64 slot) {
  for (i64 k = threadIdx.x; k < world * per; k += blockDim.x) {
    i64 p = k / per;
    ((i64*)peers[p])[rank * per + k % per] = counts[k];
  }
  __threadfence_system();
  __syncthreads();
  if (threadIdx.x == 0)
    for (i64 p = 0; p < world; p++) atomicAdd((u64*)(cells[p] + 8 * slot), 1ULL);
}
"""


class _Kernels:
    """The two kernels, compiled by NVRTC through cupy, launched through pyccl's driver launcher
    on torch's current stream (about a microsecond of host time each)."""

    def __init__(self, device):
        import cupy
        from pyccl.transports import cuda_ipc
        loaded = _MODULES.get(device.index)
        if loaded is None:                   # a module load waits for the device: once per process
            with cupy.cuda.Device(device.index):
                mod = cupy.RawModule(code=_SOURCE, options=("-std=c++17",))
                loaded = _MODULES.setdefault(device.index, (mod, *(int(mod.get_function(n).kernel.ptr) for n in
                                                                   ("moe_put_rows", "moe_put_counts", "moe_put_all"))))
        self.mod, self.rows_fn, self.counts_fn, self.all_fn = loaded
        self.p_all = cuda_ipc.KernelParams("uiiuiiuuuiiiu")
        self.p_rows = cuda_ipc.KernelParams("uiiuiuuiiiu")
        self.p_counts = cuda_ipc.KernelParams("uiiuuii")
        self.launch = cuda_ipc.launcher()


_MODULES = {}                 # device -> (module, its three CUfunctions); parameter blocks: one set per exchange


class CudaWindowExchange:
    """The exchanges by puts into CUDA windows (module docstring); ``puts``: "copies", "kernel" or "fused";
    ``window(buf, signals)`` makes a window (default: pyccl.torch_backend.window on the default group)."""
    device_splits = True

    def __init__(self, rt: par.Runtime, prof: par.Profiler, cap: int, d: int, per_rank: int, puts="copies",
                 window=None):
        from pyccl.cuda_buffers import current_torch_stream
        if window is None:
            import pyccl.torch_backend as ccl_torch
            window = ccl_torch.window
        dev = rt.device
        self.world, self.ranks, self.rank, self.prof = rt.world, [rt.rank], rt.rank, prof
        self.cap, self.per_rank, self.d, self.puts = cap, per_rank, d, puts
        self.counts_buf = torch.zeros(rt.world * per_rank, dtype=torch.int64, device=dev)
        self.bufs = {w: torch.zeros(rt.world * cap, d, device=dev) for w in ("dispatch", "combine")}
        self.send = {w: torch.zeros(rt.world, cap, d, device=dev) for w in ("dispatch", "combine")}
        self.wins = {w: window(b, signals=3) for w, b in (("counts", self.counts_buf), *self.bufs.items())}
        self.slot = {"counts": 0, "dispatch": 1, "combine": 2}
        self.ar = torch.arange(rt.world, device=dev)
        self.stream = lambda: current_torch_stream(dev.index)
        self.watch = SyncCount()
        self.reset()
        self.fused = puts == "fused"          # moe_inference then calls dispatch()
        if puts in ("kernel", "fused"):
            self.k = _Kernels(dev)
            self.tables = {w: tuple(torch.tensor(v, dtype=torch.int64, device=dev)   # u64 bits in int64
                                    for v in win.device_addresses()) for w, win in self.wins.items()}
            self.addr = {w: tuple(t.data_ptr() for t in ts) for w, ts in self.tables.items()}  # (peers, cells)
            self.finished = torch.zeros(1, dtype=torch.int32, device=dev)
            self.finished_ptr = self.finished.data_ptr()

    def reset(self):
        """Forget the host times so far (the warm-up's); the sync count stays."""
        self.layer_us, self.counts_us, self.wait_us, self._counts_s, self._wait_s = [], [], [], 0.0, 0.0

    @property
    def syncs(self) -> int:
        return self.watch.count

    def host_summary(self) -> str:
        if not self.layer_us:
            return "no layers timed"
        u, c, w = self.layer_us, self.counts_us, self.wait_us
        return (f"{statistics.median(u):.1f} us median (mean {statistics.mean(u):.1f}, min {min(u):.1f}, max "
                f"{max(u):.1f}) of host time per MoE layer to queue counts + dispatch (counts part "
                f"{statistics.median(c):.1f}, wait_signal part {statistics.median(w):.1f}), {len(u)} layers, "
                f"{self.puts} puts, "
                f"{getattr(self.wins['counts'], 'wait_mode', '?')} waits; device syncs while queuing: "
                f"{self.syncs}{' ' + str(self.watch.seen[:3]) if self.watch.seen else ''}")

    def _wait(self, win, slot):
        """win.wait_signal(slot, world); its host time is added to the layer's wait part."""
        t = time.perf_counter()
        win.wait_signal(slot, self.world)
        self._wait_s += time.perf_counter() - t

    def _launch(self, fn, params, grid, block, args):
        params.set(args)
        self.k.launch(fn, grid, block, self.stream(), params.address)

    def counts(self, cs):
        win = self.wins["counts"]
        with self.prof("window counts"):
            with self.watch:
                t, self._wait_s = time.perf_counter(), 0.0
                mine = cs[0].view(self.world, self.per_rank)
                if self.puts == "kernel":
                    peers, cells = self.addr["counts"]
                    self._launch(self.k.counts_fn, self.k.p_counts, 1, 128,
                                 (mine.data_ptr(), self.world, self.per_rank, peers, cells, self.rank,
                                  self.slot["counts"]))
                else:
                    for dst in range(self.world):
                        win.put(mine[dst], dst, offset=self.rank * self.per_rank, signal=0)
                self._wait(win, 0)
                self._counts_s = time.perf_counter() - t
        # the window itself, no copy: a peer writes the next layer's counts only after this rank's
        # combine reached it, which this rank's stream queues after every use of these
        return [self.counts_buf.view(self.world, self.per_rank)]

    def dispatch(self, cs, bufs):
        """``fused``: counts and rows in one kernel, one wait; ([counts from every source], [rows])."""
        win, buf, d = self.wins["dispatch"], bufs[0], self.d
        with self.prof("window dispatch"):
            with self.watch:
                t, self._wait_s = time.perf_counter(), 0.0
                m = buf.shape[0]
                if m > self.cap * self.world:
                    raise SystemExit(f"{m} rows exceed the window's {self.cap} per source")
                rows = buf.contiguous()
                peers, cells = self.addr["dispatch"]
                self._launch(self.k.all_fn, self.k.p_all, max(1, min(m, 256)), 128,
                             (rows.data_ptr(), m, d, cs[0].data_ptr(), self.world, self.per_rank, peers,
                              self.addr["counts"][0], cells, self.rank, self.cap, self.slot["dispatch"],
                              self.finished_ptr))
                self._wait(win, self.slot["dispatch"])
                took = time.perf_counter() - t
            self.layer_us.append(1e6 * took)
            self.counts_us.append(0.0)
            self.wait_us.append(1e6 * self._wait_s)
            recv_counts = self.counts_buf.view(self.world, self.per_rank)   # the window (see counts())
            out_splits = recv_counts.sum(1)
            n = int(out_splits.sum())                   # the host learns the count after queuing
            with self.watch:
                src, spos = self._place(out_splits, n)
                got = self.bufs["dispatch"].view(self.world, self.cap, d)[src, spos]
        return [recv_counts], [got]

    def _place(self, splits, n):
        """(destination, row there) of each of n rows grouped by destination (no sync)."""
        dst = torch.repeat_interleave(self.ar, splits, output_size=n)
        start = torch.cumsum(splits, 0) - splits
        return dst, torch.arange(n, device=splits.device) - start[dst]

    def rows(self, what, bufs, in_splits, out_splits, out_rows):
        win, buf, d = self.wins[what], bufs[0], self.d
        with self.prof(f"window {what}"):
            with self.watch:
                t = time.perf_counter()
                m = buf.shape[0]
                if m > self.cap * self.world:
                    raise SystemExit(f"{m} rows exceed the window's {self.cap} per source")
                if self.puts != "copies":
                    peers, cells = self.addr[what]
                    rows = buf.contiguous()
                    self._launch(self.k.rows_fn, self.k.p_rows, max(1, min(m, 256)), 128,
                                 (rows.data_ptr(), m, d, in_splits[0].data_ptr(), self.world, peers, cells,
                                  self.rank, self.cap, self.slot[what], self.finished_ptr))
                else:
                    dst, pos = self._place(in_splits[0], m)
                    block = self.send[what]
                    block[dst, pos] = buf
                    for r in range(self.world):
                        win.put(block[r].view(-1), r, offset=self.rank * self.cap * d, signal=self.slot[what])
                self._wait(win, self.slot[what])
                took = time.perf_counter() - t
            if what == "dispatch":
                self.layer_us.append(1e6 * (self._counts_s + took))
                self.counts_us.append(1e6 * self._counts_s)
                self.wait_us.append(1e6 * self._wait_s)
                n = int(out_splits[0].sum())            # the host learns the count after queuing
            else:
                n = out_rows[0]                         # the rows come back: as many as went out
            with self.watch:
                src, spos = self._place(out_splits[0], n)
                got = self.bufs[what].view(self.world, self.cap, d)[src, spos]
            return [got]

    def close(self):
        for win in self.wins.values():
            win.close()


class SyncCount:
    """Counts the device synchronisations made inside by this thread (re-entered per exchange):
    torch's (sync debug mode "warn": every synchronising torch call warns) and those of the cupy
    runtime's synchronising or polling functions (pyccl calls them there). ``count``; ``seen``:
    what the first few were."""
    CUPY = ("deviceSynchronize", "streamSynchronize", "eventSynchronize", "memcpy", "eventQuery", "streamQuery")

    def __init__(self):
        self.count, self.seen = 0, []

    def _note(self, what):
        self.count += 1
        if len(self.seen) < 8:
            self.seen.append(what)

    def __enter__(self):
        import cupy
        self.mode = torch.cuda.get_sync_debug_mode()
        self.rt, self.kept, me = cupy.cuda.runtime, {}, threading.get_ident()
        for name in self.CUPY:
            fn = getattr(self.rt, name, None)
            if fn is None:
                continue

            def counted(*args, _fn=fn, _name=name):
                if threading.get_ident() == me:
                    self._note(f"cupy.cuda.runtime.{_name}")
                return _fn(*args)
            try:
                setattr(self.rt, name, counted)
                self.kept[name] = fn
            except (AttributeError, TypeError):     # not patchable here: then only torch's are counted
                pass
        self.warned = warnings.catch_warnings(record=True)
        self.log = self.warned.__enter__()
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        return self

    def __exit__(self, *exc):
        torch.cuda.set_sync_debug_mode(self.mode)
        self.warned.__exit__(*exc)
        for name, fn in self.kept.items():
            setattr(self.rt, name, fn)
        for w in self.log:             # torch's sync warning, not its once-per-process "prototype feature" note
            if "called a synchronizing" in str(w.message):
                self._note(f"torch: {str(w.message)[:60]} ({w.filename.rsplit('/', 1)[-1]}:{w.lineno})")
        return False
