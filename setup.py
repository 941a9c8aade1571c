"""Builds the native core (cffi's setuptools hook compiles native/ into pyccl._native) and, where a
CUDA toolkit is (nvcc on PATH, or CUDA_HOME), the CUDA kernels ahead: cubins for sm_80, sm_90
and sm_100 in ccl/engines/cuda/prebuilt/, so that no GPU process compiles a kernel (see
ccl/engines/cuda/build.py). They are built with the toolkit's own NVRTC (libnvrtc next to nvcc):
the same compiler the runtime fallback uses, which also gives the lowered names of the template
kernels. Without a toolkit the step is skipped and the kernels are built at run time (in the
background, cached on disk). PYCCL_BUILD_KERNELS: `0` skip, `1` fail when it cannot be done,
unset: build where possible; PYCCL_KERNEL_ARCHS: other architectures (e.g. `80,90`).
"""
import glob
import importlib.util
import json
import os
import shutil
import sys
from concurrent.futures import ThreadPoolExecutor

from setuptools import setup
from setuptools.command.build_py import build_py

HERE = os.path.dirname(os.path.abspath(__file__))
CUDA_DIR = os.path.join(HERE, "ccl", "engines", "cuda")


def _load(name):
    """A module of ccl/engines/cuda/ on its own (the package needs numpy, which a build may lack)."""
    spec = importlib.util.spec_from_file_location(f"_pyccl_build_{name}", os.path.join(CUDA_DIR, f"{name}.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _toolkit_nvrtc():
    """libnvrtc of the CUDA toolkit whose nvcc is on PATH (or under CUDA_HOME), else None."""
    nvcc = shutil.which("nvcc")
    homes = [os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))] if nvcc else []
    homes += [h for h in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")) if h]
    for home in homes:
        if not os.path.exists(os.path.join(home, "bin", "nvcc")):
            continue
        for sub in ("lib64", "lib", os.path.join("targets", "x86_64-linux", "lib"),
                    os.path.join("targets", "sbsa-linux", "lib")):
            libs = sorted(p for p in glob.glob(os.path.join(home, sub, "libnvrtc.so*"))
                          if "builtins" not in p and "alt" not in os.path.basename(p))
            if libs:
                return libs[0]
    return None


def prebuild_kernels(dest=os.path.join(CUDA_DIR, "prebuilt")):
    want = os.environ.get("PYCCL_BUILD_KERNELS", "").strip()
    if want == "0":
        return
    path = _toolkit_nvrtc()
    if path is None:
        if want == "1":
            raise SystemExit("PYCCL_BUILD_KERNELS=1 but no CUDA toolkit (nvcc with libnvrtc) was found")
        print("pyccl: no CUDA toolkit (nvcc): CUDA kernels will be built at run time and cached", file=sys.stderr)
        return
    kc, nvrtc = _load("kernel_cache"), _load("nvrtc")
    try:
        nvrtc.lib(path)
        archs = [int(a) for a in (os.environ.get("PYCCL_KERNEL_ARCHS") or "80,90,100").split(",") if a.strip()]
        known = nvrtc.supported_archs()
        archs = [a for a in archs if not known or a in known]
        source = kc.read_source(CUDA_DIR)
        jobs = [(a, u) for a in archs for u in kc.all_units()]

        def one(job):
            arch, unit = job
            names, extra, plain = kc.unit_source(unit)
            image, lowered = nvrtc.compile_source(source, names, arch, list(kc.OPTIONS) + extra)
            lowered.update({p: p for p in plain})
            kc.DiskCache(dest, f"sm_{arch}").put(unit, image, lowered)
        shutil.rmtree(dest, ignore_errors=True)
        with ThreadPoolExecutor(max(1, min(16, os.cpu_count() or 1))) as ex:
            list(ex.map(one, jobs))
        with open(os.path.join(dest, "index.json"), "w") as f:
            json.dump({"source": kc.source_hash(source), "archs": archs, "nvrtc": list(nvrtc.version())}, f)
        print(f"pyccl: CUDA kernels prebuilt for sm_{', sm_'.join(map(str, archs))} with {path}", file=sys.stderr)
    except Exception as e:  # noqa: BLE001 - optional: the run-time build remains
        shutil.rmtree(dest, ignore_errors=True)
        if want == "1":
            raise
        print(f"pyccl: prebuilding the CUDA kernels failed ({type(e).__name__}: {e}); they will be built at "
              f"run time", file=sys.stderr)


class BuildPy(build_py):
    """build_py that first prebuilds the CUDA kernels into the source tree (package data)."""

    def run(self):
        prebuild_kernels()
        super().run()


setup(cffi_modules=["native/build.py:ffibuilder", "native/build_verbs.py:ffibuilder"],
      cmdclass={"build_py": BuildPy})
