"""cffi build script for pyccl._verbs, the ibverbs core (``setup.py``: cffi_modules).

Builds everywhere: native/ibverbs.c declares the verbs structures it uses itself and opens
libibverbs.so.1 with dlopen at run time, so neither rdma-core's headers nor the library are
needed to compile, and a machine without them gets a module whose ``pv_load`` says why.

``python native/build_verbs.py`` compiles in place (into ``ccl/``, where the editable install
finds it); ``pip install .`` / ``pip install -e .`` build it through setuptools.
"""
import glob
import os
import sys

from cffi import FFI

HERE = os.path.dirname(os.path.abspath(__file__))


def _path(p):
    # setuptools wants paths relative to the project root (its cwd during a build); a
    # standalone build (cffi compiles inside its tmpdir) needs them absolute.
    if __name__ == "__main__":
        return p
    rel = os.path.relpath(p)
    return p if rel.startswith(os.pardir) else rel


def _cdef() -> str:
    """The part of ibverbs.h after its 'pyccl's interface' line, which cffi parses as is."""
    with open(os.path.join(HERE, "ibverbs.h")) as f:
        text = f.read()
    start = text.index("typedef struct pv_dev pv_dev;")
    end = text.rindex("#endif")
    return text[start:end]


ffibuilder = FFI()
ffibuilder.cdef(_cdef())
ffibuilder.set_source(
    "pyccl._verbs",
    '#include "ibverbs.h"',
    sources=[_path(os.path.join(HERE, "ibverbs.c"))],
    include_dirs=[_path(HERE)],
    define_macros=[("PYCCL_VERBS_MODULE", "1")],
    extra_compile_args=[] if sys.platform == "win32" else ["-O2", "-std=gnu99"],
    libraries=[] if sys.platform == "win32" else ["dl"],
    depends=[_path(os.path.join(HERE, "ibverbs.h"))],
)

if __name__ == "__main__":
    out = os.path.join(os.path.dirname(HERE), "ccl")
    tmp = os.path.join(os.path.dirname(HERE), "build", "cffi-verbs")
    so = ffibuilder.compile(tmpdir=tmp, verbose=False)
    import shutil
    for old in glob.glob(os.path.join(out, "_verbs*.so")):
        os.remove(old)
    dst = os.path.join(out, os.path.basename(so))
    shutil.copy2(so, dst)
    print("built", dst)
