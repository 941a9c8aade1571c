"""The two device functions of a CUDA window: add to a signal cell, and make a stream wait on one.

Compiled once per device with NVRTC through ``cupy.RawModule`` (as ccl/engines/cuda/kernels.py
compiles its kernels) and launched through the driver with a kept parameter block
(transports/cuda_ipc.py: ``launcher``, ``KernelParams``), so a launch costs about a
microsecond of host time and no cupy dispatch.

- ``win_signal(cell, value)``: one thread, after the stream's earlier copies (stream order):
  a system-wide fence, then ``atomicAdd`` into the cell (a peer's, mapped through CUDA IPC).
- ``win_wait(cell, value, status, timeout_ns, slot)``: one thread spins (acquire loads,
  ``__nanosleep`` between them) until the cell holds at least ``value``, then subtracts it
  (the slot counts arrivals and a wait consumes them). It gives up, leaving the cell alone,
  when the host sets the abort word ``status[0]`` (a peer died: the window's watcher thread
  saw it) or after ``timeout_ns``, and writes why into the host-mapped status words
  ``[1] code (1 timeout, 2 abort), [2] slot, [3] value, [4] what the cell held``, which the
  window raises on the host. Plain stores there: atomics into host memory over PCIe are not
  everywhere; the first kernel that fails writes, later ones see ``status[1]`` set.
"""
import ctypes
import threading

SOURCE = r"""
typedef unsigned long long u64;
typedef long long i64;

__device__ __forceinline__ u64 win_now() {
  u64 t;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
  return t;
}

__device__ __forceinline__ i64 win_load(const i64* p) {
  i64 v;
  asm volatile("ld.acquire.sys.global.u64 %0, [%1];" : "=l"(v) : "l"(p) : "memory");
  return v;
}

extern "C" __global__ void win_signal(i64* cell, i64 value) {
  __threadfence_system();
  atomicAdd((u64*)cell, (u64)value);
}

extern "C" __global__ void win_wait(i64* cell, i64 value, i64* status, i64 timeout_ns, i64 slot) {
  volatile i64* s = status;
  u64 start = win_now();
  for (unsigned n = 0;; n++) {
    i64 v = win_load(cell);
    if (v >= value) {
      atomicAdd((u64*)cell, (u64)(-value));
      __threadfence_system();
      return;
    }
    bool aborted = s[0] != 0;
    if (aborted || ((n & 63) == 63 && win_now() - start > (u64)timeout_ns)) {
      if (s[1] == 0) {
        s[2] = slot;
        s[3] = value;
        s[4] = v;
        __threadfence_system();
        s[1] = aborted ? 2 : 1;
      }
      __threadfence_system();
      return;
    }
    __nanosleep(256);
  }
}
"""

_MODULES = {}                 # device -> {name: CUfunction pointer}
_LOCK = threading.Lock()


def functions(cupy, device: int) -> dict:
    """{"win_signal": ptr, "win_wait": ptr}: the kernels loaded on `device` (compiled once)."""
    with _LOCK:
        fns = _MODULES.get(device)
        if fns is None:
            with cupy.cuda.Device(device):
                mod = cupy.RawModule(code=SOURCE, options=("-std=c++17",))
                fns = {}
                for name in ("win_signal", "win_wait"):
                    f = mod.get_function(name)
                    ptr = getattr(getattr(f, "kernel", f), "ptr", None)
                    if not ptr:
                        from ..errors import PycclError
                        raise PycclError(f"CUDA windows: cupy {cupy.__version__} does not expose the CUfunction "
                                         f"of {name} (RawKernel.kernel.ptr); pyccl launches it through the driver")
                    fns[name] = int(ptr)
                fns["_module"] = mod                 # keeps the module loaded
            _MODULES[device] = fns
        return fns


class Launches:
    """The window's two launches with their parameter blocks kept (one lock: callers may be threads)."""

    def __init__(self, cupy, device: int):
        from ..transports import cuda_ipc
        fns = functions(cupy, device)
        self.fn_signal, self.fn_wait = fns["win_signal"], fns["win_wait"]
        self.p_signal = cuda_ipc.KernelParams("ui")
        self.p_wait = cuda_ipc.KernelParams("uiuii")
        self.launch = cuda_ipc.launcher()
        self.lock = threading.Lock()

    def signal(self, stream: int, cell: int, value: int) -> None:
        with self.lock:
            self.p_signal.set((cell, value))
            self.launch(self.fn_signal, 1, 1, stream, self.p_signal.address)

    def wait(self, stream: int, cell: int, value: int, status: int, timeout_ns: int, slot: int) -> None:
        with self.lock:
            self.p_wait.set((cell, value, status, timeout_ns, slot))
            self.launch(self.fn_wait, 1, 1, stream, self.p_wait.address)


class StreamWaits:
    """``cuStreamWaitValue64_v2`` (GEQ) through the driver, the GIL held (an enqueue-only call): the
    stream waits with no kernel resident, so on a GPU that processes share (time-sliced contexts)
    the waiting context holds no slice (bench/JOURNAL.md 2026-12-07: 0.59 ms a round against a
    spinning kernel's 2.6 ms). ``ok``: whether this driver has it."""

    def __init__(self):
        try:
            lib = ctypes.PyDLL("libcuda.so.1")
        except OSError:
            lib = None
        f = getattr(lib, "cuStreamWaitValue64_v2", None)
        if f is not None:
            f.restype = ctypes.c_int
            f.argtypes = [ctypes.c_void_p, ctypes.c_uint64, ctypes.c_uint64, ctypes.c_uint]
        self.fn = f
        self.ok = f is not None

    def works(self, stream: int, address: int) -> bool:
        """Whether a stream wait on `address` is accepted (one that holds already: >= 0)."""
        return self.fn(stream, address, 0, 0) == 0

    def wait(self, stream: int, address: int, value: int) -> None:
        rc = self.fn(stream, address, value, 0)          # CU_STREAM_WAIT_VALUE_GEQ
        if rc != 0:
            from ..errors import PycclError
            raise PycclError(f"CUDA windows: cuStreamWaitValue64 failed with CUDA driver error {rc}")
