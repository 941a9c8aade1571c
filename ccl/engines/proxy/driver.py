"""The CUDA driver calls of a proxied launch, made while holding the GIL (ctypes.PyDLL).

Why not cupy's bindings: they release the GIL around every call, and with the proxy's host
thread running Python each release hands it the GIL, so the caller waited to get it back five
times per launch: 29-55 us per call where the calls themselves take about 1 us each
(bench/proxy_breakdown.py, H100). These calls only enqueue work and never wait for the device,
so holding the GIL through them costs the other threads nothing.
"""
import ctypes

from ...errors import PycclError

_GEQ = 0                  # CU_STREAM_WAIT_VALUE_GEQ


class Driver:
    """launch, record, wait_event, wait_value, capturing: one driver call each (handles are
    plain integers: cupy's runtime handles are the driver's)."""

    def __init__(self):
        lib = ctypes.PyDLL("libcuda.so.1")
        vp, u32, u64 = ctypes.c_void_p, ctypes.c_uint, ctypes.c_uint64

        def fn(name, *argtypes):
            f = getattr(lib, name, None)
            if f is not None:
                f.restype, f.argtypes = ctypes.c_int, list(argtypes)
            return f
        self._launch = fn("cuLaunchKernel", vp, u32, u32, u32, u32, u32, u32, u32, vp, vp, vp)
        self._record = fn("cuEventRecord", vp, vp)
        self._wait_event = fn("cuStreamWaitEvent", vp, vp, u32)
        # the _v2 entry point: the first one needs a driver option that is off by default
        self._wait_value = fn("cuStreamWaitValue64_v2", vp, u64, u64, u32)
        self._capturing = fn("cuStreamIsCapturing", vp, ctypes.POINTER(ctypes.c_int))
        self._status = ctypes.c_int()
        self._status_ref = ctypes.byref(self._status)

    @staticmethod
    def _check(rc, what):
        if rc != 0:
            raise PycclError(f"proxy: {what} failed with CUDA driver error {rc}")

    def launch(self, fn, grid, block, stream, params):
        self._check(self._launch(fn, grid, 1, 1, block, 1, 1, 0, stream, params, None), "cuLaunchKernel")

    def record(self, event, stream):
        self._check(self._record(event, stream), "cuEventRecord")

    def wait_event(self, stream, event):
        self._check(self._wait_event(stream, event, 0), "cuStreamWaitEvent")

    def wait_value(self, stream, address, value):
        """The stream waits until the 64-bit word at `address` (host-mapped) is >= value."""
        self._check(self._wait_value(stream, address, value, _GEQ), "cuStreamWaitValue64")

    def can_wait_value(self, stream, address) -> bool:
        """Whether stream waits work here (tried on a word that is already >= 0)."""
        return self._wait_value is not None and self._wait_value(stream, address, 0, _GEQ) == 0

    def capturing(self, stream) -> bool:
        self._check(self._capturing(stream, self._status_ref), "cuStreamIsCapturing")
        return self._status.value != 0
