"""Kernels and their launch: compiling the kernels' source (ccl/engines/cuda/kernels*.cu, see
``cuda_source``) once per (kind, dtype, op, vector width) with NVRTC through ``cupy.RawModule``,
the parameter block of each kernel (``_PARAMS``, see cuda_ipc.KernelParams), prepared launches
whose only per-call change is the epoch, the barrier kernel and the SM copy kernel. The kernels
read the epoch from a counter in device memory (``CudaState.ectr``, see epoch_begin in the .cu),
so a prepared launch changes no parameter between calls and a launch captured in a CUDA graph
replays correctly."""
import os

from ...dtypes import AVG, MAX, MIN, PROD, SUM
from ...errors import PycclError

MAXR = 8                    # ranks per host the kernels take (tab layout, flags)
MAXB = 256                  # thread blocks with their own flags
FLAG_WORDS = (2 * MAXB * MAXR * 2) + 2 * (MAXB * MAXR * 2) + MAXR * 2 + 16 + MAXB * MAXR * 2 + \
    2 * MAXR * (2 * MAXR + 3) + \
    2 * (MAXB * MAXR * 2)                        # see the .cu (OFF_SPL: split tables; OFF_RP, OFF_RC: rounds)
THREADS = 512
#: The kernels' source, one translation unit in three files read in this order: kernels.cu (the
#: flag buffer layout, waits, epochs, element types), kernels_reduce.cu (one-shot, two-shot and
#: pull two-shot all-reduce), kernels_copy.cu (SM copies, the copy-engine reduction, the stream
#: barrier, the copy collectives through scratch, all-to-all). Split only to keep files short.
_CU_PARTS = tuple(os.path.join(os.path.dirname(__file__), name)
                  for name in ("kernels.cu", "kernels_reduce.cu", "kernels_copy.cu"))


def cuda_source() -> str:
    """The parts joined in order: what NVRTC compiles (cupy's cache is keyed on this whole text)."""
    parts = []
    for path in _CU_PARTS:
        with open(path) as f:
            parts.append(f.read())
    return "".join(parts)


_CTYPE = {"float16": "f16_t", "bfloat16": "bf16_t", "float32": "float", "float64": "double",
          "int8": "signed char", "uint8": "unsigned char", "int32": "int", "int64": "long long",
          "bool": "unsigned char"}
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
        key = (kind, dtype, opcode, n)
        fn = self._mods.get(key)
        if fn is None:
            ctype = _CTYPE[dtype]
            kinds = ("oneshot", "twoshot", "reduce_n", "twoshot_pull")
            names = [f"{k}<{ctype}, {opcode}, {v}>" for k in kinds for v in sorted({1, n})]
            code = cuda_source()
            options = ["-std=c++17", "-DPYCCL_COMMON=1"]
            cuda_path = self.cupy.cuda.get_cuda_path()
            if cuda_path and os.path.isdir(os.path.join(cuda_path, "include")):
                options.append("-I" + os.path.join(cuda_path, "include"))
            with self._device:
                mod = self.cupy.RawModule(code=code, options=tuple(options), name_expressions=names)
                for k in kinds:
                    for v in sorted({1, n}):
                        self._mods[(k, dtype, opcode, v)] = self._launcher(
                            k, mod.get_function(f"{k}<{ctype}, {opcode}, {v}>"))
                if "barrier" not in self._mods:
                    self._mods["barrier"] = self._launcher("barrier", mod.get_function("barrier"))
                    self._mods["copy_n"] = self._launcher("copy_n", mod.get_function("copy_n"))
                    self._mods["alltoallv"] = self._launcher("alltoallv", mod.get_function("alltoallv"))
                    self._mods["staged"] = self._launcher("staged", mod.get_function("staged"))
                    self._mods["alltoallv_staged"] = self._launcher("alltoallv_staged",
                                                                    mod.get_function("alltoallv_staged"))
            fn = self._mods[key]
        return fn

    def _remember(self, key, p):
        """Keep prepared launch `p` under `key` (at most 1024: then start over)."""
        if len(self._prepared) >= 1024:
            self._prepared.clear()
        self._prepared[key] = p

    def _launcher(self, kind, function):
        """A launchable kernel: ``k(grid, stream_ptr, args)``; ``k.ptr`` is its CUfunction."""
        # RawModule.get_function gives a RawKernel; its .kernel is the loaded CUfunction wrapper.
        ptr = getattr(getattr(function, "kernel", function), "ptr", None)
        if not ptr:
            raise PycclError(f"CUDA collectives: cupy {self.cupy.__version__} does not expose the CUfunction of "
                             f"the {kind} kernel (RawKernel.kernel.ptr); pyccl launches it through the driver")
        return _Kernel(int(ptr), _PARAMS[kind], 32 if kind == "barrier" else THREADS, self.ipc)

    def _barrier_fn(self):
        fn = self._mods.get("barrier")
        if fn is None:
            self._kernel("oneshot", "float32", 0, 1)
            fn = self._mods["barrier"]
        return fn

    def _sm_copies(self, copies):
        """Run (lane, dst, src, nbytes) copies with one SM kernel on pyccl's stream; False (nothing
        done) when they do not fit it (more than MAXR pieces, or a piece not 16-byte aligned)."""
        copies = [c for c in copies if c[3] > 0 and c[1] != c[2]]
        if not copies:
            return True
        if len(copies) > MAXR or any(c[3] >= 16 and (c[1] % 16 or c[2] % 16) for c in copies):
            return False
        self._barrier_fn()
        fn = self._mods["copy_n"]
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
