"""Where each kernel image comes from: the package (prebuilt), the disk cache, or NVRTC now.

Why a background build: NVRTC takes seconds per (dtype, op) and tens of seconds for every
kernel, and a job meets a new dtype or op at an arbitrary step. The first CUDA communicator of
a process starts ``KernelBuilder.start()``: a few low-priority threads build every unit
(kernel_cache.all_units, most used first) into the disk cache; ranks of one host split the
units through claim files instead of each building all. A call that needs a kernel whose unit
is not ready does not wait for the whole build: ``image_for(key)`` returns its unit when it is
there (package, memory, disk) or about to be (its build has less left than building the one
kernel would take), and otherwise builds just that kernel in the caller's thread (~0.3 s).

The builder knows nothing of CUDA devices: ``compile_fn(source, names, target, options)``
returns (image, lowered names), NVRTC's in production (nvrtc.compile_source), anything in
tests. ``report()`` says how every unit came and how long it took (``python -m pyccl.doctor
kernels``).
"""
import atexit
import logging
import os
import threading
import time

from ... import settings
from . import kernel_cache as kc

log = logging.getLogger("pyccl")


class Image:
    """A built unit: the image bytes, {name: lowered name}, how it came and in how many seconds."""
    __slots__ = ("unit", "image", "names", "how", "seconds")

    def __init__(self, unit, image, names, how, seconds):
        self.unit, self.image, self.names, self.how, self.seconds = unit, image, names, how, seconds


class KernelBuilder:
    """Images of one source for one target (e.g. sm_90), from wherever they are fastest to get."""

    def __init__(self, source, target, compile_fn, cache=None, prebuilt_dir=None, threads=None,
                 units=None, one_estimate=0.5, unit_estimate=3.0, resolve=None):
        self.source, self._target = source, target
        self.compile_fn = compile_fn
        self._cache = cache                     # kernel_cache.DiskCache or None
        # resolve() -> (target, cache), called once when first needed: with a complete prebuilt
        # set nothing needs NVRTC (whose version keys the disk cache), so it is not even loaded
        self._resolve_fn = resolve
        self._resolve_lock = threading.Lock()
        self.prebuilt_dir = prebuilt_dir
        self.threads = max(0, int(threads if threads is not None else default_threads()))
        self.units = list(units if units is not None else kc.all_units())
        self._cv = threading.Condition()
        self._images = {}                       # unit -> Image
        self._building = {}                     # unit -> monotonic start (this process)
        self._failed = {}                       # unit -> error text
        self._queue = []
        self._workers = []
        self._stop = False
        self.est = {"one": one_estimate, "unit": unit_estimate}      # seconds, updated as builds end
        self.started_at = None
        self.finished_at = None

    def _resolve(self):
        if self._resolve_fn is not None:
            with self._resolve_lock:
                if self._resolve_fn is not None:
                    self._target, self._cache = self._resolve_fn()
                    self._resolve_fn = None

    @property
    def target(self):
        """The NVRTC compile target ('sm_90', 'compute_90'); resolved (NVRTC loaded) on first use."""
        self._resolve()
        return self._target

    @property
    def cache(self):
        """The disk cache (kernel_cache.DiskCache) or None; resolved on first use (see __init__)."""
        self._resolve()
        return self._cache

    @property
    def label(self) -> str:
        """What report() files this builder under, without resolving it."""
        if self._resolve_fn is None or not self.prebuilt_dir:
            return self.target
        return os.path.basename(self.prebuilt_dir.rstrip(os.sep)) + " (prebuilt)"

    # ---- looking up -------------------------------------------------------------------------
    def _ready(self, unit):
        """The image of `unit` if this process has it or can read it (package, disk), else None."""
        img = self._images.get(unit)
        if img is not None:
            return img
        t = time.perf_counter()
        got, how = None, None
        if self.prebuilt_dir and not unit.startswith("one:"):
            got = kc.DiskCache(self.prebuilt_dir, "").get(unit)
            how = "prebuilt"
        if got is None and self.cache is not None:
            got, how = self.cache.get(unit), "disk cache"
        if got is None:
            return None
        img = self._images[unit] = Image(unit, got[0], got[1], how, time.perf_counter() - t)
        return img

    def _available(self, unit) -> bool:
        """Whether `unit` is here or on disk (without reading it)."""
        return unit in self._images or \
            bool(self.prebuilt_dir and os.path.exists(kc.DiskCache(self.prebuilt_dir, "").path(unit))) or \
            bool(self.cache is not None and os.path.exists(self.cache.path(unit)))

    def image_for(self, key, wait_s=None) -> Image:
        """An image holding kernel `key` ((kind, dtype, opcode, n) or a common kernel's name):
        its unit when ready or nearly so, else that one kernel built now on this thread."""
        unit, one = kc.unit_of(key), kc.single_of(key)
        with self._cv:
            img = self._ready(unit) or self._images.get(one) or (self.cache and self._ready(one))
            if img:
                return img
            began = self._building.get(unit)
            if began is not None:
                left = self.est["unit"] - (time.monotonic() - began)
                if left <= self.est["one"]:
                    deadline = time.monotonic() + max(left, 0) + self.est["one"] + (wait_s or 0)
                    while unit not in self._images and unit not in self._failed and \
                            time.monotonic() < deadline:
                        self._cv.wait(0.01)
                    if unit in self._images:
                        return self._images[unit]
        return self._build(one, foreground=True)

    # ---- building ---------------------------------------------------------------------------
    def _build(self, unit, foreground=False) -> Image:
        names, extra, plain = kc.unit_source(unit)
        t = time.perf_counter()
        image, lowered = self.compile_fn(self.source, names, self.target, list(kc.OPTIONS) + extra)
        dt = time.perf_counter() - t
        lowered = dict(lowered)
        for p in plain:
            lowered[p] = p
        img = Image(unit, image, lowered, "compiled" + (" (foreground)" if foreground else ""), dt)
        if self.cache is not None:
            try:
                self.cache.put(unit, image, lowered)
            except OSError as e:
                log.warning("pyccl: cannot write the kernel cache %s: %s", self.cache.dir, e)
        with self._cv:
            self._images[unit] = img
            key = "one" if unit.startswith("one:") else "unit"
            if key == "unit" and unit == "common":
                pass                               # the common unit is no (dtype, op) unit's measure
            else:
                self.est[key] = 0.5 * self.est[key] + 0.5 * dt
            self._cv.notify_all()
        log.info("pyccl: CUDA kernels %s built in %.2f s (%s)", unit, dt, self.target)
        return img

    def start(self):
        """Start the background build of every unit not available yet (once; no-op with 0 threads)."""
        with self._cv:
            if self._workers or self.threads == 0:
                return
            self.started_at = time.monotonic()
            self._queue = [u for u in self.units if not self._available(u)]
            if not self._queue:
                self.finished_at = self.started_at
                return
            for i in range(min(self.threads, len(self._queue))):
                w = threading.Thread(target=self._work, daemon=True, name=f"pyccl-kernels-{i}")
                self._workers.append(w)
                w.start()

    def _next(self):
        """The next unit to build here, None when all are done; waits while the rest are being
        built by other processes (claims), reading their results from the disk cache."""
        while True:
            with self._cv:
                if self._stop:
                    return None
                for u in list(self._queue):
                    if self._available(u):
                        self._queue.remove(u)
                        self._cv.notify_all()
                        continue
                    if self.cache is None or self.cache.claim(u):
                        self._queue.remove(u)
                        if self.cache is not None and self._available(u):   # finished just before the claim
                            self.cache.release(u)
                            self._cv.notify_all()
                            continue
                        self._building[u] = time.monotonic()
                        return u
                if not self._queue:
                    return None
            time.sleep(0.05)                   # the rest are claimed by other processes

    def _work(self):
        _lower_priority()
        while True:
            u = self._next()
            if u is None:
                break
            try:
                self._build(u)
            except Exception as e:  # noqa: BLE001 - a unit that fails is built again per kernel, in the foreground
                with self._cv:
                    self._failed[u] = f"{type(e).__name__}: {e}"
                    self._cv.notify_all()
                log.warning("pyccl: background build of CUDA kernels %s failed: %s", u, e)
            finally:
                if self.cache is not None:
                    self.cache.release(u)
                with self._cv:
                    self._building.pop(u, None)
        with self._cv:
            if all(not w.is_alive() or w is threading.current_thread() for w in self._workers):
                self.finished_at = time.monotonic()

    def wait(self, timeout=None) -> bool:
        """Block until the background build is over (True) or `timeout` passes (False)."""
        end = None if timeout is None else time.monotonic() + timeout
        for w in list(self._workers):
            w.join(None if end is None else max(0.0, end - time.monotonic()))
            if w.is_alive():
                return False
        return True

    def stop(self):
        with self._cv:
            self._stop = True

    def release_claims(self):
        """Give up the claims of units this process is building (at exit: the others take them).
        The workers stop after their current unit; waiting for them a few seconds keeps a worker
        from being inside NVRTC while the process tears it down (a suspect of issue 31's crash
        at exit, bench/JOURNAL.md #2026-12-07-elastic-3)."""
        self.stop()
        self.wait(5.0)
        if self._resolve_fn is None and self._cache is not None:     # (never resolved: no claims)
            for u in list(self._building):
                self._cache.release(u)

    def report(self) -> list:
        """[(unit, how, seconds)] of every unit this process has, then the failures."""
        with self._cv:
            rows = [(i.unit, i.how, i.seconds) for i in self._images.values()]
            rows += [(u, "failed: " + why, 0.0) for u, why in self._failed.items()]
            return rows


def _lower_priority():
    """Background builds yield the CPU to the job (nice +10 for this thread, Linux)."""
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 10)
    except (AttributeError, OSError):
        pass


def default_threads() -> int:
    """PYCCL_KERNEL_BUILD_THREADS, else a quarter of the CPUs (1 to 4); 0: no background build."""
    v = settings.get("PYCCL_KERNEL_BUILD_THREADS")
    if v is not None:
        return v
    return max(1, min(4, (os.cpu_count() or 1) // 4))


_builders = {}
_lock = threading.Lock()


def builder_for(arch: int) -> KernelBuilder:
    """The process's builder for a GPU of compute capability `arch` (e.g. 90), made on first use:
    prebuilt cubins of the package when they fit, the disk cache, NVRTC for the rest."""
    from . import nvrtc
    from .kernels import cuda_source
    with _lock:
        b = _builders.get(arch)
        if b is not None:
            return b
        source = cuda_source()
        pre = kc.prebuilt_target(arch, source=source)

        def resolve():
            """(compile target, disk cache): loads NVRTC, whose version keys the cache."""
            version = nvrtc_version_or_none()
            target = compile_target(arch)
            root = kc.cache_root()
            if root is None or version is None:
                return target, None
            return target, kc.DiskCache(root, kc.cache_key(source, target, version))

        def compile_fn(src, names, tgt, options):
            t = tgt.split("_")
            return nvrtc.compile_source(src, names, int(t[1]), options, ptx=t[0] == "compute")
        if pre:          # the package's cubins: NVRTC is loaded only if a unit is missing there
            b = KernelBuilder(source, None, compile_fn, None, pre[0], resolve=resolve)
        else:
            target, cache = resolve()
            b = KernelBuilder(source, target, compile_fn, cache, None)
        _builders[arch] = b
        atexit.register(b.release_claims)
        return b


def nvrtc_version_or_none():
    from . import nvrtc
    try:
        return nvrtc.version()
    except (nvrtc.NvrtcError, OSError):
        return None


def compile_target(arch: int) -> str:
    """'sm_<arch>' when this NVRTC builds cubins for it, else PTX for the newest architecture it
    knows below (the driver finishes it), e.g. 'compute_90'."""
    from . import nvrtc
    try:
        archs = nvrtc.supported_archs()
    except (nvrtc.NvrtcError, OSError):
        archs = []
    if not archs or arch in archs:
        return f"sm_{arch}"
    lower = [a for a in archs if a <= arch]
    return f"compute_{max(lower)}" if lower else f"sm_{arch}"


def report() -> dict:
    """{target: [(unit, how, seconds)]} of this process's builders."""
    with _lock:
        return {b.label: b.report() for b in _builders.values()}
