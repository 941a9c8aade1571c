#!/usr/bin/env python3
"""Issue 31's crash at exit on the GPU, without a GPU: a process that exits while a thread is
inside NVRTC (nvrtcCompileProgram) may die of SIGSEGV or SIGABRT in exit(), after Python is done.

    python bench/exit_during_build.py --runs 8 --live 0.5,1,1.5,2

Each run is a fresh process with an empty kernel cache that starts a build of the CUDA kernels
and lets its main thread end `live` seconds later, in one of three ways:
  raw      a bare daemon thread compiling the units with NVRTC, nobody waits for it
  nojoin   pyccl's KernelBuilder with its exit hook's wait taken out (the code before 46598c2)
  builder  pyccl's KernelBuilder as it is (its exit hook stops it and waits up to 5 s)
Prints each mode's exit codes; exit status 1 if a `builder` run did not exit 0. Needs NVRTC
(the nvidia-cuda-nvrtc wheel, a CUDA toolkit, or PYCCL_NVRTC), no GPU.
"""
import argparse
import os
import subprocess
import sys
import tempfile
import threading
import time


def child(mode, live):
    from pyccl.engines.cuda import build, nvrtc
    from pyccl.engines.cuda import kernel_cache as kc
    if mode == "raw":
        src = kc.read_source()

        def work():
            for u in kc.all_units():
                names, extra, _ = kc.unit_source(u)
                nvrtc.compile_source(src, names, 90, list(kc.OPTIONS) + extra)
        threading.Thread(target=work, daemon=True).start()
    else:
        b = build.builder_for(90)
        if mode == "nojoin":
            b.wait = lambda timeout=None: True
        b.start()
    time.sleep(live)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", type=int, default=8, help="runs per mode (the lives taken in turn)")
    p.add_argument("--live", default="0.5,1,1.5,2", help="seconds the main thread lives after the build starts")
    p.add_argument("--modes", default="raw,nojoin,builder")
    p.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        child(a.child[0], float(a.child[1]))
        return
    lives = [float(v) for v in a.live.split(",")]
    modes = a.modes.split(",")
    codes = {m: [] for m in modes}
    print(f"# load average {os.getloadavg()[0]:.1f} at the start", flush=True)
    for i in range(a.runs):
        for m in modes:                          # modes alternated, so load hits each alike
            with tempfile.TemporaryDirectory(prefix="pyccl-kcache-") as cache:
                r = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", m, str(lives[i % len(lives)])],
                                   env={**os.environ, "PYCCL_KERNEL_CACHE": cache}, capture_output=True, text=True,
                                   timeout=120)
            codes[m].append(r.returncode)
            why = (r.stderr.strip().splitlines() or [""])[-1][:100]
            if r.returncode:
                print(f"  {m} live {lives[i % len(lives)]}: exit {r.returncode} {why}", flush=True)
    for m in modes:
        bad = [c for c in codes[m] if c != 0]
        print(f"{m:8s} {len(bad)} of {len(codes[m])} runs died at exit  (exit codes {codes[m]})", flush=True)
    print(f"# load average {os.getloadavg()[0]:.1f} at the end", flush=True)
    sys.exit(1 if any(codes.get("builder", [])) else 0)


if __name__ == "__main__":
    main()
