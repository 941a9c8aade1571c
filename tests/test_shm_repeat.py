"""A repeated small all_reduce (issue 33): the validator hands the same array's Call out again,
the engine choice and the shm engine's pointer are kept with it, and the queue records the
call as it ends. Checked here: the Call is reused only while the array is unchanged (size,
dtype, contiguity, writability, op, async_op) and a changed one is checked again and raises
what a fresh one raises; results stay right while the contents change between calls; a rank
that changes its array's dtype or op after repeated calls gets the call mismatch naming the
field; the flight recorder still has one entry per call, in order; Engines.forget drops the
remembered choice.
"""
import numpy as np
import pytest

from pyccl.dtypes import SUM
from pyccl.errors import InvalidArgument, PycclError
from pyccl.validate import AGAIN_BYTES, Validator
from reference import make

pytestmark = pytest.mark.timeout(120)


# ---- the validator alone (no ranks) ----------------------------------------------------------
def test_same_array_same_call():
    v = Validator(0, 2, False)
    x = np.ones(3, np.float32)
    c = v.all_reduce(x, SUM, False)
    assert v.all_reduce(x, SUM, False) is c
    assert v.all_reduce(x, "max", False) is not c                  # another op
    assert v.all_reduce(x, "max", False) is v.all_reduce(x, "max", False)
    assert v.all_reduce(x, SUM, True) is not c                     # async: never remembered
    y = np.ones(3, np.float32)
    cy = v.all_reduce(y, SUM, False)
    c = v.all_reduce(x, SUM, False)
    assert cy is not c and v.all_reduce(y, SUM, False) is cy and v.all_reduce(x, SUM, False) is c   # two held
    for _ in range(3):                        # x again and again, a new array between: x stays
        assert v.all_reduce(np.ones(1), "max", False) is not None and v.all_reduce(x, SUM, False) is c
    assert v.all_reduce(y, SUM, False) is not cy                              # pushed out


def test_changed_array_is_checked_again():
    v = Validator(0, 2, False)
    x = np.ones((2, 4), np.float32)
    c = v.all_reduce(x, SUM, False)
    assert (c.count, c.dtype, c.out.array.shape) == (8, "float32", (8,))
    x.shape = (8,)                        # the same memory in the same order: the same Call
    assert v.all_reduce(x, SUM, False) is c and np.shares_memory(c.out.array, x)
    x.dtype = np.float64                                          # same bytes, half the elements
    c3 = v.all_reduce(x, SUM, False)
    assert (c3.count, c3.dtype, c3.nbytes) == (4, "float64", 32)
    x.dtype = np.bool_                                             # SUM of bool: refused
    with pytest.raises(InvalidArgument):
        v.all_reduce(x, SUM, False)
    x.dtype = np.float32
    assert v.all_reduce(x, SUM, False).count == 8
    x.flags.writeable = False
    with pytest.raises(InvalidArgument):
        v.all_reduce(x, SUM, False)
    x.flags.writeable = True
    assert v.all_reduce(x, SUM, False).dtype == "float32"


def test_only_small_arrays_are_held():
    v = Validator(0, 2, False)
    big = np.ones(AGAIN_BYTES // 4 + 1, np.float32)
    assert v.all_reduce(big, SUM, False) is not v.all_reduce(big, SUM, False)
    empty = np.ones(0, np.float32)
    assert v.all_reduce(empty, SUM, False) is not v.all_reduce(empty, SUM, False)


# ---- on ranks ----------------------------------------------------------------------------------
def rank_repeats(comm, count, op, calls):
    """The same array all_reduced `calls` times, its contents changed each time."""
    x = np.empty(count, np.float32)
    bad = []
    for i in range(calls):
        x[:] = make(comm.rank, count, "float32", op, salt=i)
        comm.all_reduce(x, op=op)
        ins = [make(r, count, "float32", op, salt=i).astype(np.float64) for r in range(comm.size)]
        want = {"sum": sum(ins), "max": np.maximum.reduce(ins), "avg": sum(ins) / comm.size}[op]
        if not np.allclose(x, want, rtol=1e-5, atol=1e-5):
            bad.append(i)
    return bad


@pytest.mark.parametrize("size", [2, 3])
@pytest.mark.parametrize("op", ["sum", "max", "avg"])
def test_repeated_calls_stay_right(groups, size, op):
    g = groups(size)
    for count in (1, 2, 1031):
        assert g.run(rank_repeats, count, op, 20) == [[]] * size


def rank_alternates(comm, count):
    """The benchmark's loop: the same array, then a new one (the timing's max) and a barrier
    every time, and a third array now and then: every memo (validator, choice, shm pointer)
    swaps its two, and the barrier pushes nothing out."""
    x, z = np.empty(count, np.float32), np.empty(3, np.int32)
    bad = []
    for i in range(12):
        x[:] = comm.rank + i
        comm.all_reduce(x)
        t = np.array([float(comm.rank * 10 + i)])
        comm.all_reduce(t, op="max")
        comm.barrier()                         # bench/collectives.py's loop: barrier, call, max
        if i % 3 == 0:
            z[:] = i
            comm.all_reduce(z)
            bad += [] if (z == i * comm.size).all() else [("z", i)]
        want = sum(r + i for r in range(comm.size))
        bad += [] if (x == want).all() else [("x", i)]
        bad += [] if t[0] == (comm.size - 1) * 10 + i else [("t", i)]
    comm.all_reduce(x)
    comm.all_reduce(t, op="max")
    comm.barrier()
    held = comm.validate.all_reduce(x, SUM, False)       # x's Call is still the remembered one
    return bad, held in (comm.engines._last[0], comm.engines._before[0])


@pytest.mark.parametrize("size", [2, 3])
def test_alternating_arrays(groups, size):
    for bad, held in groups(size).run(rank_alternates, 5):
        assert bad == [] and held


def rank_records(comm):
    x = np.ones(2, np.float32)
    first = comm.queue.seq + 1
    for _ in range(10):
        comm.all_reduce(x)
    entries = [comm.recorder.as_dict(e) for e in list(comm.recorder.entries)[-10:]]
    return first, entries


def test_recorder_has_every_call(groups):
    for first, entries in groups(2).run(rank_records):
        assert [e["seq"] for e in entries] == list(range(first, first + 10))
        for e in entries:
            assert (e["op"], e["dtype"], e["count"], e["redop"], e["state"]) == ("all_reduce", "float32", 2, "SUM",
                                                                                 "done")
            assert e["queued"] <= e["started"] <= e["ended"]


def rank_changes_after_repeats(comm, field):
    x = np.ones(256, np.float32)
    for _ in range(5):
        comm.all_reduce(x)
    odd = comm.rank == comm.size - 1
    try:
        if field == "dtype":
            if odd:
                x.dtype = np.int32                 # the same array object, another dtype
            comm.all_reduce(x)
        else:
            comm.all_reduce(x, op="max" if odd else SUM)
        comm.barrier()
    except PycclError as e:
        return str(e)
    return None


@pytest.mark.parametrize("field", ["dtype", "op"])
def test_mismatch_after_repeats(groups, field):
    g = groups(2, env={"PYCCL_TIMEOUT": "20"})
    msgs = g.run(rank_changes_after_repeats, field)
    g.broken = True
    assert all(m is not None for m in msgs), msgs
    assert any("call mismatch" in m and f"the {field}" in m for m in msgs), msgs


def rank_forget(comm):
    x = np.ones(2, np.float32)
    comm.all_reduce(x)
    call = comm.validate.all_reduce(x, SUM, False)
    engine = comm.engines.choose(call)
    comm.engines.forget()
    again = comm.engines.choose(call)
    comm.all_reduce(x)
    return engine.name, again.name, comm.engines._last[0] is call, float(x[0])


def test_forget_drops_the_remembered_choice(groups):
    for name, again, kept, value in groups(2).run(rank_forget):
        assert name == again == "shm" and kept and value == 4.0
