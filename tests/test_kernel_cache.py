"""The CUDA kernels' build without a GPU (ccl/engines/cuda/kernel_cache.py, build.py, nvrtc.py):
cache keys, the disk cache, the units, the prebuilt lookup, and the background build's
scheduling (real threads and files; the compiler is a timed stand-in, except in the NVRTC tests,
which compile the real source where libnvrtc is installed and skip where it is not)."""
import json
import os
import threading
import time

import pytest

from pyccl.engines.cuda import build, kernel_cache as kc
from pyccl.engines.cuda.kernels import _PARAMS, cuda_source


# ---- keys, files, units ---------------------------------------------------------------------
def test_cache_key_follows_source_target_and_nvrtc():
    src = cuda_source()
    k = kc.cache_key(src, "sm_90", (13, 0))
    assert k == kc.cache_key(src, "sm_90", (13, 0))
    others = {kc.cache_key(src + "\n", "sm_90", (13, 0)), kc.cache_key(src, "sm_80", (13, 0)),
              kc.cache_key(src, "compute_90", (13, 0)), kc.cache_key(src, "sm_90", (12, 8))}
    assert k not in others and len(others) == 4
    assert "sm_90" in k and "nvrtc13.0" in k


def test_cache_root_setting(monkeypatch, tmp_path):
    monkeypatch.setenv("PYCCL_KERNEL_CACHE", str(tmp_path / "k"))
    assert kc.cache_root() == str(tmp_path / "k")
    monkeypatch.setenv("PYCCL_KERNEL_CACHE", "0")
    assert kc.cache_root() is None
    monkeypatch.delenv("PYCCL_KERNEL_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert kc.cache_root() == str(tmp_path / "xdg" / "pyccl" / "kernels")


def test_disk_cache_round_trip_and_torn_files(tmp_path):
    c = kc.DiskCache(str(tmp_path), "key1")
    assert c.get("float32-0") is None
    c.put("float32-0", b"\x7fELF image", {"oneshot<float, 0, 4>": "_Z7oneshot"})
    c.put("one:oneshot-bfloat16-0-8", b"img2", {"a": "b"})
    assert c.get("float32-0") == (b"\x7fELF image", {"oneshot<float, 0, 4>": "_Z7oneshot"})
    assert c.units() == ["float32-0", "one:oneshot-bfloat16-0-8"]
    assert not [n for n in os.listdir(c.dir) if n.startswith(".tmp-")]
    with open(c.path("float32-0"), "r+b") as f:        # torn by something else: a miss, not an error
        f.truncate(7)
    assert c.get("float32-0") is None


def test_claims_are_exclusive_until_stale(tmp_path):
    c = kc.DiskCache(str(tmp_path), "k")
    assert c.claim("common")
    assert not c.claim("common")                       # ours, and we live
    with open(c.path("common") + ".claim", "w") as f:  # a builder that died (no such pid)
        f.write("999999999")
    assert c.claim("common")
    assert not c.claim("common")
    old = time.time() - 1000
    os.utime(c.path("common") + ".claim", (old, old))
    assert c.claim("common", stale_s=120)              # its builder died: taken over
    c.release("common")
    assert c.claim("common")


def test_every_kernel_the_engine_asks_for_is_in_its_unit():
    units = kc.all_units()
    assert units[0] == "common" and len(units) == len(set(units))
    for dtype, size in kc.ITEMSIZE.items():
        for op in kc.opcodes(dtype):
            assert f"{dtype}-{op}" in units
            for kind in kc.KINDS:
                for n in (1, 16 // size):
                    key = (kind, dtype, op, n)
                    names, _, _ = kc.unit_source(kc.unit_of(key))
                    assert kc.kernel_name(*key) in names
                    one, _, _ = kc.unit_source(kc.single_of(key))
                    assert one == [kc.kernel_name(*key)]
    for name in kc.COMMON:
        assert name in _PARAMS
        assert kc.unit_source(kc.unit_of(name))[2] == list(kc.COMMON)
        _, opts, plain = kc.unit_source(kc.single_of(name))
        assert plain == [name] and opts == [f"-DKERNEL_ONLY_{name}=1"]


def test_prebuilt_lookup_picks_a_compatible_architecture(tmp_path):
    src = cuda_source()
    (tmp_path / "index.json").write_text(json.dumps({"source": kc.source_hash(src), "archs": [80, 90, 100]}))
    pick = {a: kc.prebuilt_target(a, str(tmp_path), src) for a in (80, 86, 89, 90, 100, 103, 120, 75)}
    assert pick[80] == (str(tmp_path / "sm_80"), "sm_80") and pick[86][1] == "sm_80" and pick[89][1] == "sm_80"
    assert pick[90][1] == "sm_90" and pick[100][1] == "sm_100" and pick[103][1] == "sm_100"
    assert pick[120] is None and pick[75] is None
    assert kc.prebuilt_target(90, str(tmp_path), src + "// edited") is None    # an edited tree
    assert kc.prebuilt_target(90, str(tmp_path / "none"), src) is None


# ---- the background build -------------------------------------------------------------------
class Compiler:
    """A stand-in for NVRTC: takes `unit_s` per unit (one:... units `one_s`), records calls."""

    def __init__(self, unit_s=0.05, one_s=0.01, fail=()):
        self.unit_s, self.one_s, self.fail = unit_s, one_s, set(fail)
        self.calls = []
        self.lock = threading.Lock()

    def __call__(self, source, names, target, options):
        single = len(names) == 1 or any(o.startswith("-DKERNEL_ONLY_") for o in options)
        with self.lock:
            self.calls.append((tuple(names), tuple(options)))
        time.sleep(self.one_s if single else self.unit_s)
        if any(n in self.fail for n in names) or any(o in self.fail for o in options):
            raise RuntimeError("compile error (stand-in)")
        return b"image:" + "|".join(names).encode(), {n: "_Z" + n for n in names}


UNITS = ["common", "float32-0", "bfloat16-0", "float16-0", "int32-0", "float32-3"]


def _builder(tmp_path, comp, threads=2, **kw):
    cache = kc.DiskCache(str(tmp_path), "key")
    return build.KernelBuilder("src", "sm_90", comp, cache, threads=threads, units=UNITS, **kw)


def test_background_build_fills_the_cache_once(tmp_path):
    comp = Compiler()
    b = _builder(tmp_path, comp)
    b.start()
    assert b.wait(10)
    assert len(comp.calls) == len(UNITS)
    assert sorted(kc.DiskCache(str(tmp_path), "key").units()) == sorted(UNITS)
    assert {how for _, how, _ in b.report()} == {"compiled"}
    # a new process (builder) on the same cache: nothing to build, images come from disk
    comp2 = Compiler()
    b2 = _builder(tmp_path, comp2)
    b2.start()
    assert b2.wait(5) and comp2.calls == []
    img = b2.image_for(("oneshot", "bfloat16", 0, 8))
    assert img.how == "disk cache" and img.unit == "bfloat16-0"
    assert img.names["oneshot<bf16_t, 0, 8>"] == "_Zoneshot<bf16_t, 0, 8>"


def test_a_call_builds_its_one_kernel_instead_of_waiting_for_the_build(tmp_path):
    comp = Compiler(unit_s=0.5, one_s=0.02)
    b = _builder(tmp_path, comp, threads=1, one_estimate=0.02, unit_estimate=0.5)
    b.start()                                       # builds 'common' first, alone
    t = time.perf_counter()
    img = b.image_for(("oneshot", "int32", 0, 4))   # its unit is far down the queue
    took = time.perf_counter() - t
    assert img.unit == "one:oneshot-int32-0-4" and img.how == "compiled (foreground)"
    assert took < 0.4, took
    assert b.image_for(("oneshot", "int32", 0, 4)) is img          # kept
    b.stop()
    b.wait(5)


def test_a_call_waits_for_a_unit_that_is_nearly_built(tmp_path):
    comp = Compiler(unit_s=0.3, one_s=0.3)
    b = _builder(tmp_path, comp, threads=1, one_estimate=0.3, unit_estimate=0.3)
    b.units = ["float32-0"]
    b.start()
    deadline = time.monotonic() + 5
    while "float32-0" not in b._building and time.monotonic() < deadline:
        time.sleep(0.005)
    time.sleep(0.15)                                # half built: less left than a one-kernel build
    img = b.image_for(("twoshot", "float32", 0, 4), wait_s=2)     # (slack for a loaded machine)
    assert img.unit == "float32-0" and img.how == "compiled"
    assert all(len(n) != 1 for n, _ in comp.calls)  # no foreground build
    b.wait(5)


def test_two_processes_split_the_units(tmp_path):
    comp_a, comp_b = Compiler(unit_s=0.05), Compiler(unit_s=0.05)
    a, b = _builder(tmp_path, comp_a), _builder(tmp_path, comp_b)
    a.start()
    b.start()
    assert a.wait(10) and b.wait(10)
    built = [n for n, _ in comp_a.calls + comp_b.calls]
    assert len(built) == len(UNITS) == len(set(built))    # each unit once, by one of them
    assert comp_a.calls and comp_b.calls


def test_a_unit_that_fails_falls_back_to_its_one_kernel(tmp_path):
    comp = Compiler(fail={"-DKERNELS_COMMON=1"})
    b = _builder(tmp_path, comp, threads=1)
    b.units = ["common"]
    b.start()
    assert b.wait(5)
    assert any(how.startswith("failed") for _, how, _ in b.report())
    img = b.image_for("staged")
    assert img.unit == "one:staged" and img.names["staged"] == "staged"


def test_no_threads_means_no_background_build(tmp_path):
    comp = Compiler()
    b = _builder(tmp_path, comp, threads=0)
    b.start()
    assert comp.calls == []
    assert b.image_for("barrier").unit == "one:barrier"


# ---- NVRTC, where it is installed -------------------------------------------------------------
def _nvrtc():
    from pyccl.engines.cuda import nvrtc
    try:
        nvrtc.lib()
    except nvrtc.NvrtcError as e:
        pytest.skip(f"libnvrtc not installed here (pip install nvidia-cuda-nvrtc to run this): {e}")
    return nvrtc


def test_nvrtc_builds_one_kernel_and_a_common_one():
    nvrtc = _nvrtc()
    src = cuda_source()
    names, extra, _ = kc.unit_source(kc.single_of(("oneshot", "bfloat16", 0, 8)))
    image, lowered = nvrtc.compile_source(src, names, 90, list(kc.OPTIONS) + extra)
    assert image[:4] == b"\x7fELF" and lowered["oneshot<bf16_t, 0, 8>"].startswith("_Z7oneshot")
    names, extra, plain = kc.unit_source(kc.single_of("barrier"))
    image, _ = nvrtc.compile_source(src, names, 90, list(kc.OPTIONS) + extra)
    assert image[:4] == b"\x7fELF" and b"barrier" in image
    ptx, _ = nvrtc.compile_source(src, [], 80, list(kc.OPTIONS) + extra, ptx=True)
    assert b".entry barrier" in ptx


def test_nvrtc_builder_end_to_end(tmp_path, monkeypatch):
    _nvrtc()
    monkeypatch.setenv("PYCCL_KERNEL_CACHE", str(tmp_path))
    monkeypatch.setenv("PYCCL_KERNEL_BUILD_THREADS", "0")
    monkeypatch.setattr(build, "_builders", {})
    b = build.builder_for(90)
    assert b.target == "sm_90" and b.cache is not None
    img = b.image_for(("oneshot", "float32", 0, 4))
    assert img.how == "compiled (foreground)" and img.image[:4] == b"\x7fELF"
    assert b.cache.units() == ["one:oneshot-float32-0-4"]


def test_prebuilt_images_come_first(tmp_path):
    """Units in the package (setup.py's layout: prebuilt/sm_90/<unit>.bin) are used as they are:
    nothing compiled, nothing left for the background build."""
    pre = kc.DiskCache(str(tmp_path / "prebuilt"), "sm_90")
    for u in UNITS:
        pre.put(u, b"prebuilt:" + u.encode(), {n: "_Z" + n for n in kc.unit_source(u)[0]} |
                {p: p for p in kc.unit_source(u)[2]})
    comp = Compiler()
    b = build.KernelBuilder("src", "sm_90", comp, kc.DiskCache(str(tmp_path / "cache"), "k"), pre.dir,
                            threads=2, units=UNITS)
    b.start()
    assert b.wait(5) and comp.calls == []
    img = b.image_for(("twoshot", "float32", 3, 4))
    assert img.how == "prebuilt" and img.image == b"prebuilt:float32-3"
    assert b.image_for("alltoallv").names["alltoallv"] == "alltoallv"


def test_prebuilt_builder_loads_nvrtc_only_for_a_missing_unit(tmp_path):
    """With the package's cubins, the first calls need no NVRTC (whose version keys the disk
    cache): the builder resolves (target, cache) only when a unit is not prebuilt."""
    pre = kc.DiskCache(str(tmp_path / "prebuilt"), "sm_90")
    for u in UNITS[:-1]:                                  # float32-3 missing from the package
        pre.put(u, b"prebuilt:" + u.encode(), {n: "_Z" + n for n in kc.unit_source(u)[0]} |
                {p: p for p in kc.unit_source(u)[2]})
    resolved = []

    def resolve():
        resolved.append(1)
        return "sm_90", kc.DiskCache(str(tmp_path / "cache"), "k")
    comp = Compiler()
    b = build.KernelBuilder("src", None, comp, None, pre.dir, threads=2, units=UNITS[:-1], resolve=resolve)
    b.start()
    assert b.wait(5)
    assert b.image_for(("oneshot", "bfloat16", 0, 8)).how == "prebuilt"
    assert b.image_for("staged").how == "prebuilt"
    assert b.label == "sm_90 (prebuilt)" and b.report()
    b.release_claims()
    assert resolved == [] and comp.calls == []
    img = b.image_for(("twoshot", "float32", 3, 4))     # not in the package: resolved once, built
    assert img.how == "compiled (foreground)" and resolved == [1] and b.target == "sm_90"
    assert b.cache.units() == ["one:twoshot-float32-3-4"] and b.label == "sm_90" and resolved == [1]


def test_builder_for_with_prebuilt_cubins_defers_nvrtc(tmp_path, monkeypatch):
    pre = kc.DiskCache(str(tmp_path / "prebuilt"), "sm_90")
    monkeypatch.setattr(kc, "prebuilt_target", lambda arch, root=None, source=None: (pre.dir, "sm_90"))
    loads = []
    monkeypatch.setattr(build, "nvrtc_version_or_none", lambda: loads.append(1) or (13, 0))
    monkeypatch.setattr(build, "compile_target", lambda arch: "sm_90")
    monkeypatch.setattr(build, "_builders", {})
    monkeypatch.setenv("PYCCL_KERNEL_CACHE", str(tmp_path / "cache"))
    b = build.builder_for(90)
    assert loads == [] and b.prebuilt_dir == pre.dir
    assert b.cache.dir.startswith(str(tmp_path / "cache")) and loads == [1]
    monkeypatch.setattr(kc, "prebuilt_target", lambda arch, root=None, source=None: None)
    monkeypatch.setattr(build, "_builders", {})
    build.builder_for(90)                                 # no prebuilt cubins: resolved at once
    assert loads == [1, 1]
