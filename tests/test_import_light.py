"""`import pyccl` stays light (issue 28 item 11): every rank pays it, 128 ranks on 2 cores wait
on it before their first rendezvous. ml_dtypes alone took 0.5 s; it now loads only when
bfloat16 is needed. Checked by what a fresh interpreter has loaded, not by timing.
"""
import json
import subprocess
import sys

import numpy as np

HEAVY = ("ml_dtypes", "torch", "cupy", "jax", "mpi4py", "pynvml", "_cffi_backend", "pyccl._native", "pyccl._verbs")


def loaded_after(code: str) -> list:
    """The HEAVY modules a fresh interpreter has loaded after running `code`."""
    probe = f"import sys\n{code}\nimport json; print(json.dumps(sorted(m for m in {HEAVY!r} if m in sys.modules)))"
    r = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_import_pyccl_loads_nothing_heavy():
    assert loaded_after("import pyccl") == []


def test_the_communicator_module_needs_no_bfloat16_or_torch():
    """What pyccl.init() imports before any collective: no ml_dtypes, torch or cupy (the C core
    may load: the collectives use it)."""
    got = loaded_after("import pyccl; pyccl.Communicator")
    assert not set(got) & {"ml_dtypes", "torch", "cupy", "jax"}, got


def test_names_of_dtypes_need_no_ml_dtypes():
    assert loaded_after("from pyccl.dtypes import DTYPES, dtype_name; list(DTYPES); "
                        "dtype_name('float32'); dtype_name('bfloat16')") == []


def test_bfloat16_loads_when_asked_for():
    assert loaded_after("import pyccl; pyccl.bfloat16") == ["ml_dtypes"]
    assert loaded_after("from pyccl.dtypes import DTYPES; DTYPES['bfloat16']") == ["ml_dtypes"]


def test_a_numpy_bfloat16_array_is_known_without_asking():
    """An array made with ml_dtypes directly (pyccl never asked for bfloat16 before): described,
    signed, reduced and divided like any other dtype."""
    code = """
import ml_dtypes, numpy as np
from pyccl.buffers import as_buffer
from pyccl import callsig
from pyccl.reduce import divide_into, reduce_into
a = np.arange(6, dtype=np.float32).astype(ml_dtypes.bfloat16)
b = as_buffer(a, "x")
out = np.empty_like(a)
reduce_into(out, a, a, "sum")
divide_into(out, 2)
sig = callsig.unpack(callsig.pack("all_reduce", b.dtype, b.count, -1, "sum"))
print(b.dtype, sig["dtype"], out.astype(np.float32).tolist())
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split(None, 2) == ["bfloat16", "bfloat16", "[0.0, 1.0, 2.0, 3.0, 4.0, 5.0]\n"]


def test_bfloat16_is_ml_dtypes_and_listed_first_class():
    import ml_dtypes

    import pyccl
    from pyccl.dtypes import DTYPES, NAMES, dtype_name, name_of
    assert pyccl.bfloat16 == np.dtype(ml_dtypes.bfloat16) == DTYPES["bfloat16"]
    assert list(DTYPES) == list(NAMES) and "bfloat16" in DTYPES and len(DTYPES) == 9
    assert dtype_name(ml_dtypes.bfloat16) == name_of(np.dtype(ml_dtypes.bfloat16)) == "bfloat16"
    assert name_of(np.dtype(np.complex64)) is None and name_of(np.dtype(">f4")) is None
