"""Loaded kernel modules of one device, shared by the process's communicators on it.

Why shared and counted: a module's code takes device memory, and every communicator on a GPU
runs the same kernels. The first communicator on a device starts the background build
(build.py); each unit is loaded (cuModuleLoadData) when one of its kernels is first launched,
and everything is unloaded when the last communicator on the device closes. Loaded modules stay
through suspend(): a captured CUDA graph names their functions; suspend(graphs=False) pauses its
communicator's use (``pause``), and when no user of the device is active the modules are
unloaded (loaded again by the next launch).

Measured (one H100, bench/gpu_startup.py parts, run s4-1 of issue 32): a loaded module takes
more device memory than its image (1 module: +2 MiB; 9 more: +12 MiB, for 2.6 MiB of images),
and CUDA does not give it back to cudaMemGetInfo when the module is unloaded: the context keeps
it (a later load of the same 9 units through Library took nothing more) until the process exits.
"""
import threading

from ...errors import PycclError
from . import kernel_cache as kc
from .build import builder_for

_libs = {}
_lock = threading.Lock()


class Library:
    """The kernels of one device: ``function(key)`` is the CUfunction of (kind, dtype, opcode, n)
    or of a common kernel's name."""

    def __init__(self, cupy, dev):
        self.cupy, self.dev = cupy, dev
        cc = cupy.cuda.Device(dev).compute_capability
        self.arch = int(cc)
        self.builder = builder_for(self.arch)
        self.users = 0
        self.active = 0            # users not paused (suspend(graphs=False))
        self._mods = {}            # unit -> cupy Module
        self._fns = {}             # key -> (Function, ptr)
        self.loaded_bytes = 0      # image bytes loaded (CUDA's footprint for them is larger: above)
        self._lock = threading.Lock()

    def function(self, key) -> int:
        got = self._fns.get(key)
        if got is not None:
            return got[1]
        try:
            img = self.builder.image_for(key)
        except Exception as e:  # noqa: BLE001 - NVRTC missing or failing: say which kernel and why
            raise PycclError(f"CUDA kernel {key} for sm_{self.arch}: not prebuilt, not cached, and NVRTC could "
                             f"not build it: {type(e).__name__}: {e}") from e
        with self._lock:
            mod = self._mods.get(img.unit)
            if mod is None:
                with self.cupy.cuda.Device(self.dev):
                    mod = _load(self.cupy, img.image)
                self._mods[img.unit] = mod
                self.loaded_bytes += len(img.image)
            name = key if isinstance(key, str) else kc.kernel_name(*key)
            fn = mod.get_function(img.names[name])
            # cupy's Function has .ptr (the CUfunction); a RawModule's RawKernel has it in .kernel
            ptr = getattr(fn, "ptr", None) or getattr(getattr(fn, "kernel", None), "ptr", None)
            self._fns[key] = (fn, int(ptr))
        return self._fns[key][1]

    def unload(self):
        with self._lock:
            self._fns.clear()
            self._mods.clear()            # cupy's Module unloads itself when dropped
            self.loaded_bytes = 0


def _load(cupy, image: bytes):
    """A loaded module of `image` (cubin or PTX) in the current context: cupy's Module
    (cuModuleLoadData), or where this cupy lacks it, a RawModule read from a temporary file."""
    try:
        from cupy.cuda import function
        mod = function.Module()
        mod.load(image)
        return mod
    except (ImportError, AttributeError, TypeError):
        import os
        import tempfile
        fd, path = tempfile.mkstemp(prefix="pyccl-kernels-", suffix=".cubin" if image[:4] == b"\x7fELF" else ".ptx")
        with os.fdopen(fd, "wb") as f:          # kept: cupy may read it when first asked for a kernel
            f.write(image if image[:4] == b"\x7fELF" else image.rstrip(b"\0"))
        return cupy.RawModule(path=path)


def acquire(cupy, dev: int) -> Library:
    """The device's library, one more user; starts the background build on first use."""
    with _lock:
        lib = _libs.get(dev)
        if lib is None:
            lib = _libs[dev] = Library(cupy, dev)
        lib.users += 1
        lib.active += 1
    lib.builder.start()
    return lib


def release(dev: int, paused: bool = False):
    """One user fewer (`paused`: it had paused); the last one unloads the device's modules
    (their device memory), and so does the last active one."""
    with _lock:
        lib = _libs.get(dev)
        if lib is None:
            return
        lib.users -= 1
        if not paused:
            lib.active -= 1
        if lib.users <= 0:
            lib.unload()
            del _libs[dev]
        elif lib.active <= 0:
            lib.unload()


def pause(dev: int):
    """A user suspended with graphs=False: it launches nothing until unpause; the modules go
    when no user is active."""
    with _lock:
        lib = _libs.get(dev)
        if lib is None:
            return
        lib.active -= 1
        if lib.active <= 0:
            lib.unload()


def unpause(dev: int):
    with _lock:
        lib = _libs.get(dev)
        if lib is not None:
            lib.active += 1
