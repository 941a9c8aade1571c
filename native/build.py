"""cffi build script for pyccl._native, the C core (``setup.py``: cffi_modules).

Out-of-line API mode: cffi compiles a real C extension, and every call into it releases the GIL
(cffi's default), so a progress thread can reduce one chunk while Python code runs elsewhere.

Builds from any working directory:  ``python native/build.py`` compiles in place (next to this
file's ``../ccl``), ``pip install .`` / ``pip install -e .`` build it through setuptools.
"""
import glob
import os
import sys

from cffi import FFI

HERE = os.path.dirname(os.path.abspath(__file__))


def _path(p):
    # setuptools prefers source paths relative to the project root (its cwd during a build);
    # fall back to absolute paths when built from elsewhere.
    rel = os.path.relpath(p)
    return p if rel.startswith(os.pardir) else rel


CDEF = """
void pyccl_reduce(void *dst, const void *a, const void *b, size_t n, int dtype, int op);
void pyccl_divide(void *x, size_t n, int dtype, int64_t divisor);
void pyccl_copy(void *dst, const void *src, size_t nbytes);
"""

SOURCES = sorted(_path(p) for p in glob.glob(os.path.join(HERE, "*.c")))

if sys.platform == "win32":
    EXTRA_COMPILE_ARGS = ["/O2", "/fp:precise"]
else:
    # -O3 for auto-vectorization; no -ffast-math (NaN/Inf/-0 must follow IEEE and numpy);
    # -ffp-contract=off so no fused multiply-add changes a rounding; -fno-trapping-math (we
    # never read FP exception flags) lets gcc vectorize the NaN-aware MIN/MAX selects.
    # Baseline code only, never -march=native: the x86-64 AVX2/F16C variants are chosen at
    # run time inside reduce.c (target_clones, __builtin_cpu_supports), so a wheel is portable.
    EXTRA_COMPILE_ARGS = ["-O3", "-std=c99", "-ffp-contract=off", "-fno-math-errno",
                          "-fno-trapping-math"]

ffibuilder = FFI()
ffibuilder.cdef(CDEF)
ffibuilder.set_source(
    "pyccl._native",
    '#include "reduce.h"',
    sources=SOURCES,
    include_dirs=[_path(HERE)],
    extra_compile_args=EXTRA_COMPILE_ARGS,
    depends=sorted(_path(p) for p in glob.glob(os.path.join(HERE, "*.h"))),
)

if __name__ == "__main__":
    # Standalone build into ccl/ (where the editable install finds pyccl._native).
    out = os.path.join(os.path.dirname(HERE), "ccl")
    tmp = os.path.join(os.path.dirname(HERE), "build", "cffi-native")
    so = ffibuilder.compile(tmpdir=tmp, verbose=True)
    import shutil
    for old in glob.glob(os.path.join(out, "_native*.so")) + glob.glob(os.path.join(out, "_native*.pyd")):
        os.remove(old)  # a stale _native.abi3.so from pip would shadow (or be shadowed by) this one
    dst = os.path.join(out, os.path.basename(so))
    shutil.copy2(so, dst)
    print("built", dst)
