"""GPU start-up and memory (issue 32), on a real GPU: 2 ranks, each a fresh spawned process
(ranks may share one GPU). Skips, with the reason, without cupy or a CUDA GPU.

* first calls: with an empty kernel cache, a communicator and its first bfloat16 all_reduce
  within 1.5 s; then, in new processes on the warm cache, the first call of every op x dtype
  within 0.1 s (the first CUDA call of a communicator also makes its CUDA state: reported);
* memory: comm.memory()'s device total <= 64 MiB after every op at 1 MiB and 64 MiB; the GPU's
  free memory (cudaMemGetInfo, both ranks) back within 2 MiB of its value before the first
  call after suspend() and after close();
* suspend -> resume -> every collective right, and a CUDA graph captured before suspend()
  replayed after resume() (one-shot and two-shot all-reduce, staged all-gather, reduce).
"""
import gc
import time

import numpy as np
import pytest

from cuda_available import require_gpu

NGPU = require_gpu()

import cupy  # noqa: E402  (only on GPU machines)
import torch  # noqa: E402  (only on GPU machines)

import pyccl  # noqa: E402
from spawned import run_spawned  # noqa: E402

MIB = 1 << 20
DTYPES = ("float32", "bfloat16", "float16", "int32")


def _comm(rank, size, port):
    from pyccl.store import StoreServer, TCPStore
    secret = b"m" * 32
    server = StoreServer("127.0.0.1", port, secret) if rank == 0 else None
    store = TCPStore("127.0.0.1", port, secret, timeout=60)
    comm = pyccl.Communicator(rank, size, store=store, secret=secret)
    sync = TCPStore("127.0.0.1", port, secret, timeout=60)      # outlives comm.close()
    return comm, server, sync


def _dev(rank):
    d = rank % cupy.cuda.runtime.getDeviceCount()
    cupy.cuda.Device(d).use()
    torch.cuda.set_device(d)
    torch.zeros(1, device="cuda")                               # the context, before any baseline
    return d


def _sync(store, key, size, pause=0.01):
    """Every rank got here (the store outlives the communicator)."""
    store.add(key, 1)
    deadline = time.monotonic() + 60
    while store.add(key, 0) < size:
        if time.monotonic() > deadline:
            raise TimeoutError(key)
        time.sleep(pause)


def _leave(store, server, size):
    """The scenario's last step. Rank 0 hosts the store (`server`), which goes when its process
    exits: it waits until every other rank says it is done with the store (each says so last).
    Without this, rank 1 could still be polling the last _sync when rank 0 had seen it complete
    and exited (every scenario here failed so on one H100, session 4)."""
    if server is None:
        store.add("left", 1)
        return
    deadline = time.monotonic() + 30
    while store.add("left", 0) < size - 1 and time.monotonic() < deadline:
        time.sleep(0.01)


def _returned(out, size):
    """[result of rank r] once every rank returned "ok"; before failing on a rank that did not,
    prints what each rank sent (the others' results are not lost in a truncated message)."""
    if all(r in out and out[r][0] == "ok" for r in range(size)):
        return [out[r][1] for r in range(size)]
    for r in range(size):
        print(f"rank {r}:", out.get(r, "no result (died or timed out)"))
    raise AssertionError(f"ranks {[r for r in range(size) if r not in out or out[r][0] != 'ok']} did not "
                         f"return (their errors are printed above)")


def _free_after(store, key, size):
    """cudaMemGetInfo's free bytes once every rank has reached `key` with nothing queued."""
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    cupy.get_default_memory_pool().free_all_blocks()
    _sync(store, key, size)
    time.sleep(0.2)
    free = cupy.cuda.runtime.memGetInfo()[0]
    _sync(store, key + "/read", size)
    return free


class _Parts:
    """Where a timed call's seconds go: pyccl functions wrapped in this process (nested ones
    count inside their caller too) and Python's garbage collector pauses (gc.callbacks)."""

    def __init__(self):
        self.cur = {}
        self._gc_t0 = None
        gc.callbacks.append(self._gc)

    def _gc(self, phase, info):
        if phase == "start":
            self._gc_t0 = time.perf_counter()
        elif self._gc_t0 is not None:
            self.add(f"gc gen{info['generation']}", time.perf_counter() - self._gc_t0)
            self._gc_t0 = None

    def add(self, label, dt):
        self.cur[label] = self.cur.get(label, 0.0) + dt

    def wrap(self, owner, name, label):
        fn = getattr(owner, name)
        parts = self

        def timed(*a, **kw):
            t0 = time.perf_counter()
            try:
                return fn(*a, **kw)
            finally:
                parts.add(label, time.perf_counter() - t0)
        setattr(owner, name, timed)

    def take(self):
        cur, self.cur = self.cur, {}
        return cur

    @classmethod
    def on_pyccl(cls):
        from pyccl.engines.cuda import build, library, state
        from pyccl.engines.cuda.engine import CudaCollectives
        p = cls()
        p.wrap(CudaCollectives, "__init__", "CUDA state made")
        p.wrap(library.Library, "function", "kernel lookup")
        p.wrap(build.KernelBuilder, "image_for", "kernel lookup: image (package, disk, NVRTC)")
        p.wrap(library, "_load", "kernel lookup: module load")
        p.wrap(state.CudaState, "_mail", "host exchange (mailbox)")
        p.wrap(state.CudaState, "_share", "scratch published / peers' mapped")
        p.wrap(state.CudaState, "_ensure_big", "two-shot scratch grown")
        p.wrap(state.CudaState, "_tmp", "reduce buffer")
        return p


def _ops(comm, dtype, nbytes, check=True, parts=None):
    """One call of every op on `nbytes` per rank, results checked; {op: seconds} (with `parts`:
    also {op: {part: seconds}} in parts.calls)."""
    t = getattr(torch, dtype)
    size, rank = comm.size, comm.rank
    n = max(size, nbytes // torch.tensor([], dtype=t).element_size()) // size * size
    ok = {}
    times = {}

    def run(name, fn, want):
        torch.cuda.synchronize()
        if parts is not None:                   # the ranks start each timed call together (a collective
            _sync(parts.store, f"ops/{dtype}/{name}", size, 0.0002)    # would wait for the later one)
            parts.take()
        t0 = time.perf_counter()
        got = fn()
        torch.cuda.synchronize()
        times[name] = time.perf_counter() - t0
        if parts is not None:
            parts.calls[f"{dtype} {name}"] = parts.take()
        if check and want is not None:
            ok[name] = bool(torch.equal(got.cpu(), want))
    x = torch.full((n,), rank + 1, dtype=t, device="cuda")
    run("all_reduce", lambda: (comm.all_reduce(x), x)[1], torch.full((n,), 3, dtype=t))
    y = torch.full((n,), rank + 1, dtype=t, device="cuda")
    run("all_reduce_max", lambda: (comm.all_reduce(y, op=pyccl.MAX), y)[1], torch.full((n,), 2, dtype=t))
    z = torch.full((n,), rank + 1, dtype=t, device="cuda")
    run("reduce", lambda: (comm.reduce(z, root=0), z)[1], torch.full((n,), 3 if rank == 0 else 2, dtype=t))
    b = torch.full((n,), rank + 5, dtype=t, device="cuda")
    run("broadcast", lambda: (comm.broadcast(b, root=1), b)[1], torch.full((n,), 6, dtype=t))
    inp = torch.full((n,), rank + 1, dtype=t, device="cuda")
    out = torch.zeros(n * size, dtype=t, device="cuda")
    want = torch.cat([torch.full((n,), r + 1, dtype=t) for r in range(size)])
    run("all_gather", lambda: (comm.all_gather(out, inp), out)[1], want)
    part = torch.zeros(n // size, dtype=t, device="cuda")
    run("reduce_scatter", lambda: (comm.reduce_scatter(part, inp), part)[1], torch.full((n // size,), 3, dtype=t))
    a_in = torch.cat([torch.full((n // size,), 10 * rank + j, dtype=t) for j in range(size)]).cuda()
    a_out = torch.zeros(n, dtype=t, device="cuda")
    want = torch.cat([torch.full((n // size,), 10 * j + rank, dtype=t) for j in range(size)])
    run("all_to_all", lambda: (comm.all_to_all(a_out, a_in), a_out)[1], want)
    return times, ok


# ---- memory, suspend, resume, graphs ----------------------------------------------------------
def _torch_warm():
    """torch's own kernels that _ops uses (fill, copies), loaded lazily by CUDA: loaded before
    the baseline, so that their code (torch's, not pyccl's) is not counted against pyccl."""
    for dtype in ("float32", "bfloat16", "float16", "int32"):
        t = getattr(torch, dtype)
        x = torch.full((4096,), 3, dtype=t, device="cuda")
        torch.zeros(4096, dtype=t, device="cuda")
        torch.equal(x.cpu(), torch.cat([torch.full((2048,), 3, dtype=t)] * 2).cuda().cpu())
    torch.cuda.synchronize()


def scenario_memory(rank, size, port):
    _dev(rank)
    _torch_warm()
    comm, server, sync = _comm(rank, size, port)
    base = _free_after(sync, "mem/base", size)
    res = {}
    stages = {}                                    # GPU-wide MiB over the baseline, step by step
    x = torch.ones(1024, device="cuda")
    comm.all_reduce(x)                             # makes the CUDA state (control block, scratch, kernels)
    del x
    stages["state made (one 4 KiB call)"] = (base - _free_after(sync, "mem/state", size)) / MIB
    for nbytes in (MIB, 64 * MIB):
        _, ok = _ops(comm, "float32", nbytes)
        res[f"ops right at {nbytes // MIB} MiB"] = all(ok.values())
    m = comm.memory()
    res["memory()"] = m
    res["device total <= 64 MiB"] = m["device"] <= 64 * MIB
    used = base - _free_after(sync, "mem/calls", size)
    stages["after the calls"] = used / MIB
    comm.suspend()
    after_suspend = base - _free_after(sync, "mem/suspended", size)
    stages["suspended"] = after_suspend / MIB
    res["memory() suspended"] = comm.memory()
    comm.resume()
    for dtype in ("float32", "bfloat16"):
        for nbytes in (4096, MIB, 24 * MIB):
            _, ok = _ops(comm, dtype, nbytes)
            res[f"ops right after resume, {dtype} {nbytes}"] = all(ok.values())
    comm.suspend()                                 # the next call resumes by itself
    _, ok = _ops(comm, "float16", MIB)
    res["ops right after suspend, resumed by the call"] = all(ok.values())
    stages["resumed by a float16 call"] = (base - _free_after(sync, "mem/resumed", size)) / MIB
    comm.suspend(graphs=False)                     # no graph replayed again: the control block and kernels go too
    after_all = base - _free_after(sync, "mem/suspended_all", size)
    stages["suspend(graphs=False)"] = after_all / MIB
    res["memory() after suspend(graphs=False)"] = comm.memory()["device"]
    _, ok = _ops(comm, "int32", MIB)               # resumes: a new control block, the kernels loaded again
    res["ops right after suspend(graphs=False), resumed by the call"] = all(ok.values())
    comm.suspend()
    comm.suspend(graphs=False)                     # already suspended: lets go of the rest
    stages["suspend() then suspend(graphs=False)"] = (base - _free_after(sync, "mem/suspended_all2", size)) / MIB
    comm.close()
    after_close = base - _free_after(sync, "mem/closed", size)
    stages["closed"] = after_close / MIB
    del comm
    gc.collect()
    stages["communicator dropped, gc"] = (base - _free_after(sync, "mem/dropped", size)) / MIB
    res["GPU MiB over the baseline, both ranks, by stage"] = stages
    res["GPU bytes used: calls, suspended, closed"] = (used, after_suspend, after_close)
    res["suspend() keeps for graphs (MiB, reported, not checked)"] = after_suspend / MIB
    res["within 2 MiB after suspend(graphs=False)"] = after_all <= 2 * MIB
    res["within 2 MiB after close"] = after_close <= 2 * MIB
    _leave(sync, server, size)
    return res


def test_memory_bounded_and_given_back():
    env = {"PYCCL_TIMEOUT": "60", "PYCCL_TRANSPORT": "tcp"}
    res = _returned(run_spawned(__name__, "scenario_memory", 2, [env] * 2, 55), 2)
    print("\nMEMTEST stages (GPU-wide MiB over the baseline):", res[0]["GPU MiB over the baseline, both ranks, by stage"])
    for r, x in enumerate(res):
        print(f"MEMTEST rank {r} memory() device {x['memory()']['device']}, suspended "
              f"{ {k: v for k, v in x['memory() suspended']['parts'].items() if v} }; failed checks:",
              [k for k, v in x.items() if v is False])
    for r in res:
        bad = {k: v for k, v in r.items() if v is False}
        assert not bad, (bad, r["GPU bytes used: calls, suspended, closed"], r["memory()"])


def scenario_graph(rank, size, port):
    _dev(rank)
    comm, server, sync = _comm(rank, size, port)
    n1, n2 = MIB // 4, 16 * MIB // 4                   # one-shot; two-shot in rounds of the 4 MiB regions
    a = torch.zeros(n1, device="cuda")
    b = torch.zeros(n2, device="cuda")
    inp = torch.zeros(1024, device="cuda")
    out = torch.zeros(1024 * size, device="cuda")
    r = torch.zeros(n1, device="cuda")

    def body():
        comm.all_reduce(a)
        comm.all_reduce(b)
        comm.all_gather(out, inp)
        comm.reduce(r, root=0)

    def fill(k):
        a.fill_(rank + k)
        b.fill_(2 * rank + k)
        inp.fill_(10 * rank + k)
        r.fill_(rank + 1 + k)

    def check(k):
        want_out = torch.cat([torch.full((1024,), 10.0 * q + k) for q in range(size)])
        return (bool((a.cpu() == sum(q + k for q in range(size))).all()) and
                bool((b.cpu() == sum(2 * q + k for q in range(size))).all()) and
                bool(torch.equal(out.cpu(), want_out)) and
                (rank != 0 or bool((r.cpu() == sum(q + 1 + k for q in range(size))).all())))
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):                       # warm-up outside the capture (as torch asks)
        fill(0)
        body()
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        body()
    res = {}
    fill(1)
    g.replay()
    torch.cuda.synchronize()
    res["replay before suspend"] = check(1)
    comm.suspend()
    _sync(sync, "graph/suspended", size)
    comm.resume()
    fill(2)
    g.replay()
    torch.cuda.synchronize()
    res["replay after resume"] = check(2)
    fill(3)
    g.replay()
    torch.cuda.synchronize()
    res["second replay after resume"] = check(3)
    fill(4)
    body()                                             # and outside the graph
    torch.cuda.synchronize()
    res["eager after resume"] = check(4)
    _sync(sync, "graph/replayed", size)
    del g                                              # not replayed again: everything may go
    comm.suspend(graphs=False)
    _sync(sync, "graph/suspended_all", size)
    comm.resume()                                      # a new control block (epochs carried over), kernels again
    fill(5)
    body()
    torch.cuda.synchronize()
    res["eager after suspend(graphs=False) and resume"] = check(5)
    g2 = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g2):
        body()
    for k in (6, 7):
        fill(k)
        g2.replay()
        torch.cuda.synchronize()
        res[f"graph captured after that, replay {k - 5}"] = check(k)
    _sync(sync, "graph/done", size)
    del g2
    comm.close()
    _leave(sync, server, size)
    return res


def test_graph_replays_after_suspend_and_resume():
    env = {"PYCCL_TIMEOUT": "60", "PYCCL_TRANSPORT": "tcp"}
    for r, res in enumerate(_returned(run_spawned(__name__, "scenario_graph", 2, [env] * 2, 55), 2)):
        print(f"GRAPH rank {r}:", res)
        assert all(res.values()), res


# ---- first calls ------------------------------------------------------------------------------
def scenario_cold(rank, size, port):
    t0 = time.perf_counter()
    _dev(rank)
    t1 = time.perf_counter()
    comm, server, sync = _comm(rank, size, port)
    x = torch.full((MIB // 2,), rank + 1, dtype=torch.bfloat16, device="cuda")
    comm.all_reduce(x)
    torch.cuda.synchronize()
    t2 = time.perf_counter()
    right = bool((x.cpu() == 3).all())
    from pyccl.engines.cuda import build
    b = build.builder_for(int(cupy.cuda.Device().compute_capability))
    finished = b.wait(45)
    t3 = time.perf_counter()
    hows = sorted({how for _, how, _ in b.report()})
    _sync(sync, "cold/done", size)
    comm.close()
    _leave(sync, server, size)
    return {"context s": t1 - t0, "communicator + first bf16 all_reduce s": t2 - t1, "right": right,
            "background build s": t3 - t0, "build finished": finished, "hows": hows,
            "failed": [r for r in b.report() if r[1].startswith("failed")]}


def _gen2_types():
    """How many objects of each type the oldest GC generation holds."""
    import collections
    return collections.Counter(type(o).__name__ for o in gc.get_objects(generation=2))


def scenario_warm(rank, size, port):
    import sys
    _dev(rank)
    _torch_warm()           # torch's own first uses (its kernels, its Python-side set-up) are not pyccl's
    comm, server, sync = _comm(rank, size, port)
    parts = _Parts.on_pyccl()
    parts.calls, parts.store = {}, sync
    first = {}
    ok = {}
    gc.collect()            # the timed calls start from a collected heap, as timing loops do (timeit)
    mods0, types0 = set(sys.modules), _gen2_types()
    for dtype in DTYPES:
        times, right = _ops(comm, dtype, MIB, parts=parts)
        first.update({f"{dtype} {k}": v for k, v in times.items()})
        ok.update({f"{dtype} {k}": v for k, v in right.items()})
    # what the calls left for the collector: modules first imported by them, and the oldest
    # generation's growth by type (a full collection runs once it grew by a quarter)
    grown = _gen2_types()
    grown.subtract(types0)
    new_mods = sorted(set(sys.modules) - mods0)
    from pyccl.engines.cuda import build
    hows = sorted({how for rows in build.report().values() for _, how, _ in rows})
    _sync(sync, "warm/done", size)
    comm.close()
    _leave(sync, server, size)
    return {"first": first, "ok": ok, "hows": hows, "parts": parts.calls,
            "gc thresholds, counts": (gc.get_threshold(), gc.get_count()),
            "gen2 objects at start, grown by type": (sum(types0.values()), grown.most_common(8)),
            "modules imported by the calls": (len(new_mods), new_mods[:30])}


def test_first_calls_cold_then_warm(tmp_path):
    env = {"PYCCL_TIMEOUT": "60", "PYCCL_TRANSPORT": "tcp", "PYCCL_KERNEL_CACHE": str(tmp_path / "kernels"),
           "CUPY_CACHE_DIR": str(tmp_path / "cupy")}
    cold = _returned(run_spawned(__name__, "scenario_cold", 2, [env] * 2, 75), 2)
    print("cold:", cold)
    assert all(c["right"] for c in cold), cold
    assert all(c["build finished"] and not c["failed"] for c in cold), cold
    assert max(c["communicator + first bf16 all_reduce s"] for c in cold) <= 1.5, cold
    warm = _returned(run_spawned(__name__, "scenario_warm", 2, [env] * 2, 50), 2)
    print("\nWARM hows", [w["hows"] for w in warm], "wrong:", [k for w in warm for k, v in w["ok"].items() if not v])
    calls = list(warm[0]["first"])
    walls = {}
    for k in calls:
        wall = walls[k] = max(w["first"][k] for w in warm)
        if wall > 0.02:                  # where the time of every slow first call went, on each rank
            print(f"WARM {k:26s} wall {[round(w['first'][k], 4) for w in warm]} s; parts "
                  f"{[{p: round(v, 4) for p, v in w['parts'][k].items() if v > 0.0005} for w in warm]}")
    for r, w in enumerate(warm):
        print(f"WARM rank {r} gc {w['gc thresholds, counts']}; gen2 objects at start, grown by type "
              f"{w['gen2 objects at start, grown by type']}; modules imported by the calls "
              f"{w['modules imported by the calls']}")
    print("WARM slowest (wall, both ranks):", sorted(((round(max(w["first"][k] for w in warm), 4), k)
                                                    for k in calls), reverse=True)[:4])
    assert all(all(w["ok"].values()) for w in warm), [w["ok"] for w in warm]
    assert all("compiled (foreground)" not in w["hows"] and "compiled" not in w["hows"] for w in warm), warm
    # calls[0] also makes the CUDA state (checked too). The wall time counts, garbage collection
    # included: a user waits for it as well. The heap is collected before the first timed call, so
    # a full collection inside one (0.09-0.17 s in a CPU twin of this scenario, bench/JOURNAL.md,
    # issue 32, third session) means the calls themselves allocated that much; the parts printed
    # above say where the time went.
    slow = {k: round(walls[k], 3) for k in calls if walls[k] > 0.1}
    assert not slow, (slow, {k: [round(w["first"][k], 3) for w in warm] for k in slow})


def test_memory_report_keys_on_this_gpu(tmp_path, monkeypatch):
    """memory() of a one-rank communicator: the CUDA state's purposes and the totals."""
    monkeypatch.setenv("PYCCL_KERNEL_CACHE", str(tmp_path / "k"))
    with pyccl.Communicator(0, 1) as comm:
        x = torch.ones(1000, device="cuda")
        comm.all_reduce(x)
        torch.cuda.synchronize()
        m = comm.memory()
        assert np.isclose(x.cpu().numpy(), 1).all()
        assert m["device"] == sum(v for k, v in m["parts"].items() if ".device." in k)
        if comm.cuda is None:
            pytest.skip("a one-rank communicator runs CUDA calls without the CUDA engine")
        assert m["parts"].get("cuda.device.control", 0) > 0, m
