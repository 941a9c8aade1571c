"""Kernels and their launch: the kernels' source (ccl/engines/cuda/kernels*.cu, see
``cuda_source``), its images loaded once per process and device (``Library``: images from
build.py, prebuilt, cached on disk or built by NVRTC), the parameter block of each kernel
(``_PARAMS``, see cuda_ipc.KernelParams), prepared launches whose only per-call change is the
epoch, the barrier kernel and the SM copy kernel. The kernels read the epoch from a counter in
device memory (``CudaState.ectr``, see epoch_begin in the .cu), so a prepared launch changes no
parameter between calls and a launch captured in a CUDA graph replays correctly."""
import os

from ...dtypes import AVG, MAX, MIN, PROD, SUM
from . import kernel_cache

MAXR = 8                    # ranks per host the kernels take (tab layout, flags)
MAXB = 256                  # thread blocks with their own flags
FLAG_WORDS = (2 * MAXB * MAXR * 2) + 2 * (MAXB * MAXR * 2) + MAXR * 2 + 16 + MAXB * MAXR * 2 + \
    2 * MAXR * (2 * MAXR + 3) + \
    2 * (MAXB * MAXR * 2)                        # see the .cu (OFF_SPL: split tables; OFF_RP, OFF_RC: rounds)
THREADS = 512
#: The kernels' source files, in the order they are joined (kernel_cache.PARTS says what each holds)
_CU_PARTS = tuple(os.path.join(os.path.dirname(__file__), name) for name in kernel_cache.PARTS)


def cuda_source() -> str:
    """The parts joined in order: what NVRTC compiles (and what the kernel cache is keyed on)."""
    return kernel_cache.read_source()


_OPCODE = {SUM: 0, PROD: 1, MIN: 2, MAX: 3, AVG: 0}

#: parameter letters of each kernel (see cuda_ipc.KernelLauncher)
_PARAMS = {"oneshot": "uuiuissuuuus", "twoshot": "uiiiuui" + "u" * MAXR + "ussuuuus",
           "reduce_n": "ui" + "u" * MAXR + "ss", "barrier": "ussuuuus",
           "twoshot_pull": "iiiuu" + "u" * MAXR + "sssuuuus", "copy_n": "u" * (3 * MAXR) + "s",
           "alltoallv": "uuuiiiu" + "u" * MAXR + "ssuuuu",
           "staged": "ui" + ("u" * MAXR + "i" * MAXR) * 2 + "uui" + "ss" + "uuuu",
           "alltoallv_staged": "uuuiiiuui" + "i" * (2 * MAXR) + "sss" + "uuuu"}


class _Kernel:
    """A compiled kernel and its parameter block (see cuda_ipc.KernelParams)."""
    __slots__ = ("ptr", "types", "block", "params", "launch")

    def __init__(self, ptr, types, block, ipc):
        self.ptr, self.types, self.block = ptr, types, block
        self.params = ipc.KernelParams(types)
        self.launch = ipc.launcher()

    def __call__(self, grid, stream, args):
        self.params.set(args)
        self.launch(self.ptr, grid, self.block, stream, self.params.address)


class _Prepared:
    """One launch of a kernel with fixed arguments, kept between calls (the epoch is on the device)."""
    __slots__ = ("fn", "grid", "params", "address", "launch")

    def __init__(self, fn, grid, types, args):
        from pyccl.transports import cuda_ipc
        self.fn, self.grid = fn, grid
        self.params = cuda_ipc.KernelParams(types, args)
        self.address = self.params.address
        self.launch = cuda_ipc.launcher()


class KernelsMixin:
    """The kernel side of CudaCollectives: compile, look up and launch."""

    def _kernel(self, kind, dtype, opcode, n):
        """The launchable template kernel (kind, dtype, opcode, n), loaded on first use (its image
        may be built now: see build.KernelBuilder.image_for)."""
        key = (kind, dtype, opcode, n)
        fn = self._mods.get(key)
        if fn is None:
            fn = self._mods[key] = _Kernel(self._library.function(key), _PARAMS[kind], THREADS, self.ipc)
        return fn

    def _common(self, name):
        """One of the extern "C" kernels (kernel_cache.COMMON) by name, loaded on first use."""
        fn = self._mods.get(name)
        if fn is None:
            fn = self._mods[name] = _Kernel(self._library.function(name), _PARAMS[name],
                                            32 if name == "barrier" else THREADS, self.ipc)
        return fn

    def _remember(self, key, p):
        """Keep prepared launch `p` under `key` (at most 1024: then start over)."""
        if len(self._prepared) >= 1024:
            self._prepared.clear()
        self._prepared[key] = p

    def _barrier_fn(self):
        return self._common("barrier")

    def _sm_copies(self, copies):
        """Run (lane, dst, src, nbytes) copies with one SM kernel on pyccl's stream; False (nothing
        done) when they do not fit it (more than MAXR pieces, or a piece not 16-byte aligned)."""
        copies = [c for c in copies if c[3] > 0 and c[1] != c[2]]
        if not copies:
            return True
        if len(copies) > MAXR or any(c[3] >= 16 and (c[1] % 16 or c[2] % 16) for c in copies):
            return False
        fn = self._common("copy_n")
        packs = sum(c[3] // 16 for c in copies)
        grid = int(max(1, min(self.copy_blocks or self.max_blocks, -(-packs // THREADS))))
        pad = [0] * (MAXR - len(copies))
        fn(grid, self.stream, ([c[1] for c in copies] + pad + [c[2] for c in copies] + pad +
                               [c[3] for c in copies] + pad + [len(copies)]))
        return True

    def _vec(self, dtype_size, *ptrs_and_counts):
        """Elements per 16-byte pack when every pointer (and stride) allows it, else 1."""
        n = 16 // dtype_size
        for v in ptrs_and_counts:
            if v % 16:
                return 1
        return n

    def _blocks(self, packs, cap=None):
        return int(max(1, min(cap or self.max_blocks, -(-packs // THREADS))))

    def _opcode(self, dtype, op):
        code = _OPCODE[op]
        if dtype == "bool" and code in (0, 1):      # bool: sum = or = max, prod = and = min
            code = 3 if code == 0 else 2
        return code
