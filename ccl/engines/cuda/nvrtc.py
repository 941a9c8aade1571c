"""NVRTC through ctypes: source -> cubin (or PTX) with the lowered names of template kernels.

Why not cupy.RawModule: its compile holds no lock we control, keeps its own cache we cannot
key or move, and cannot run on a machine without a GPU. NVRTC itself needs no GPU (a build can
be tested on any machine where libnvrtc is installed, e.g. the ``nvidia-cuda-nvrtc`` wheel),
and a ctypes call releases the GIL, so a background build does not stall the caller's thread.
"""
import ctypes
import glob
import os
import sys
import threading

_lib = None
_lib_lock = threading.Lock()


class NvrtcError(RuntimeError):
    """NVRTC is missing or the source did not compile (the message holds NVRTC's log)."""


def _candidates():
    """Where libnvrtc may be: PYCCL_NVRTC, the loader's path, the nvidia-* wheels, CUDA_HOME."""
    if __package__:                        # (setup.py loads this file alone, with an explicit path)
        from ... import settings
        env = settings.get("PYCCL_NVRTC")
        if env:
            yield env
    for v in ("13", "12"):
        yield f"libnvrtc.so.{v}"
    yield "libnvrtc.so"
    for base in list(sys.path):
        for pattern in ("nvidia/cu13/lib/libnvrtc.so*", "nvidia/cuda_nvrtc/lib/libnvrtc.so*",
                        "nvidia/cu12/lib/libnvrtc.so*"):
            for p in sorted(glob.glob(os.path.join(base, pattern))):
                if "builtins" not in p and "alt" not in os.path.basename(p):
                    yield p
    try:                                   # where cupy found its CUDA (cuda-pathfinder, CUDA_PATH, ...)
        from cuda import pathfinder
        yield pathfinder.load_nvidia_dynamic_lib("nvrtc").abs_path
    except Exception:  # noqa: BLE001 - not installed, or no NVRTC there: the other places
        pass
    cupy_home = None
    if "cupy" in sys.modules:
        try:
            cupy_home = sys.modules["cupy"].cuda.get_cuda_path()
        except Exception:  # noqa: BLE001 - as above
            pass
    for home in (cupy_home, os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if home:
            for p in sorted(glob.glob(os.path.join(home, "lib64", "libnvrtc.so*"))):
                if "builtins" not in p and "alt" not in os.path.basename(p):
                    yield p


def lib(path=None):
    """The loaded libnvrtc (NvrtcError when none is found); `path`: that one."""
    global _lib
    with _lib_lock:
        if _lib is None:
            tried = []
            for name in ([path] if path else _candidates()):
                try:
                    cdll = ctypes.CDLL(name)
                except OSError:
                    tried.append(name)
                    continue
                _declare(cdll)
                _lib = cdll
                break
            if _lib is None:
                raise NvrtcError("libnvrtc not found (tried " + ", ".join(tried[:6]) + "); install the CUDA "
                                 "toolkit or the nvidia-cuda-nvrtc wheel, or set PYCCL_NVRTC to its path")
    return _lib


def _declare(L):
    c = ctypes
    L.nvrtcGetErrorString.restype = c.c_char_p
    L.nvrtcCreateProgram.argtypes = [c.POINTER(c.c_void_p), c.c_char_p, c.c_char_p, c.c_int, c.c_void_p,
                                     c.c_void_p]
    L.nvrtcAddNameExpression.argtypes = [c.c_void_p, c.c_char_p]
    L.nvrtcCompileProgram.argtypes = [c.c_void_p, c.c_int, c.POINTER(c.c_char_p)]
    L.nvrtcGetProgramLogSize.argtypes = [c.c_void_p, c.POINTER(c.c_size_t)]
    L.nvrtcGetProgramLog.argtypes = [c.c_void_p, c.c_char_p]
    L.nvrtcGetCUBINSize.argtypes = [c.c_void_p, c.POINTER(c.c_size_t)]
    L.nvrtcGetCUBIN.argtypes = [c.c_void_p, c.c_char_p]
    L.nvrtcGetPTXSize.argtypes = [c.c_void_p, c.POINTER(c.c_size_t)]
    L.nvrtcGetPTX.argtypes = [c.c_void_p, c.c_char_p]
    L.nvrtcGetLoweredName.argtypes = [c.c_void_p, c.c_char_p, c.POINTER(c.c_char_p)]
    L.nvrtcDestroyProgram.argtypes = [c.POINTER(c.c_void_p)]
    L.nvrtcVersion.argtypes = [c.POINTER(c.c_int), c.POINTER(c.c_int)]


def _check(L, rc, what):
    if rc != 0:
        raise NvrtcError(f"NVRTC {what}: {L.nvrtcGetErrorString(rc).decode()}")


def version() -> tuple:
    """(major, minor) of the loaded NVRTC: part of the cache key."""
    L = lib()
    a, b = ctypes.c_int(), ctypes.c_int()
    _check(L, L.nvrtcVersion(ctypes.byref(a), ctypes.byref(b)), "version")
    return a.value, b.value


def supported_archs() -> list:
    """The sm_XY numbers this NVRTC can build cubins for (XY as an int), [] when it cannot say."""
    L = lib()
    try:
        n = ctypes.c_int()
        L.nvrtcGetNumSupportedArchs.argtypes = [ctypes.POINTER(ctypes.c_int)]
        _check(L, L.nvrtcGetNumSupportedArchs(ctypes.byref(n)), "archs")
        arr = (ctypes.c_int * n.value)()
        L.nvrtcGetSupportedArchs.argtypes = [ctypes.POINTER(ctypes.c_int)]
        _check(L, L.nvrtcGetSupportedArchs(arr), "archs")
        return list(arr)
    except AttributeError:
        return []


def compile_source(source: str, names, arch: int, options=(), ptx: bool = False):
    """Compile `source` for sm_`arch` (a cubin; ``ptx=True``: PTX for compute_`arch`, which the
    driver finishes for newer GPUs). `names`: template instantiations to emit (``"f<int, 1>"``).
    Returns (image bytes, {name expression: lowered (mangled) name})."""
    L = lib()
    prog = ctypes.c_void_p()
    _check(L, L.nvrtcCreateProgram(ctypes.byref(prog), source.encode(), b"pyccl.cu", 0, None, None), "create")
    try:
        for n in names:
            _check(L, L.nvrtcAddNameExpression(prog, n.encode()), f"name {n}")
        target = f"--gpu-architecture={'compute' if ptx else 'sm'}_{arch}"
        opts = [o.encode() for o in (target, *options)]
        argv = (ctypes.c_char_p * len(opts))(*opts)
        rc = L.nvrtcCompileProgram(prog, len(opts), argv)
        if rc != 0:
            size = ctypes.c_size_t()
            L.nvrtcGetProgramLogSize(prog, ctypes.byref(size))
            buf = ctypes.create_string_buffer(size.value)
            L.nvrtcGetProgramLog(prog, buf)
            raise NvrtcError(f"NVRTC compile ({target}): {L.nvrtcGetErrorString(rc).decode()}\n"
                             f"{buf.value.decode(errors='replace')[-4000:]}")
        size = ctypes.c_size_t()
        get_size, get = (L.nvrtcGetPTXSize, L.nvrtcGetPTX) if ptx else (L.nvrtcGetCUBINSize, L.nvrtcGetCUBIN)
        _check(L, get_size(prog, ctypes.byref(size)), "image size")
        image = ctypes.create_string_buffer(size.value)
        _check(L, get(prog, image), "image")
        lowered = {}
        for n in names:
            out = ctypes.c_char_p()
            _check(L, L.nvrtcGetLoweredName(prog, n.encode(), ctypes.byref(out)), f"lowered {n}")
            lowered[n] = out.value.decode()
        return image.raw, lowered
    finally:
        L.nvrtcDestroyProgram(ctypes.byref(prog))
