"""A call that differs on one rank (op, dtype, count, root, collective) is reported as a call
mismatch naming that field, by every engine: the shm collectives (one host, default), the
executor over TCP (PYCCL_TRANSPORT=tcp) and the executor over shm rings (PYCCL_SHM_COLLECTIVES=0)."""
import numpy as np
import pytest

from pyccl.errors import PycclError

pytestmark = pytest.mark.timeout(120)

ENGINES = {"shm": {}, "tcp": {"PYCCL_TRANSPORT": "tcp"}, "shm-ring": {"PYCCL_SHM_COLLECTIVES": "0"}}


def rank_calls(comm, field):
    """The last rank makes a call that differs from the others' in `field` only (the
    collective case also differs in root, which all_reduce does not have)."""
    odd = comm.rank == comm.size - 1
    x = np.ones(1000, np.float32)
    try:
        if field == "op":
            comm.all_reduce(x, op="max" if odd else "sum")
        elif field == "dtype":
            comm.all_reduce(x.astype(np.int32) if odd else x)
        elif field == "count":
            comm.all_reduce(np.ones(2000 if odd else 1000, np.float32))
        elif field == "collective":
            comm.reduce(x, root=0) if odd else comm.all_reduce(x)
        elif field == "root":
            comm.broadcast(x, root=1 if odd else 0)
        comm.barrier()          # a broadcast root may finish before it sees the others' calls
    except PycclError as e:
        return str(e)
    return None


CASES = [(engine, field) for engine in ENGINES for field in ("op", "dtype", "count", "collective")]


@pytest.mark.parametrize("engine,field", CASES + [("shm", "root"), ("tcp", "root"), ("shm-ring", "root")])
def test_call_mismatch_names_the_field(groups, engine, field):
    # root: 3 ranks, so that a rank of one view receives from a rank of the other (with two
    # ranks each naming itself root, no message would flow between them); ring broadcast
    env = dict(ENGINES[engine], PYCCL_TIMEOUT="20")
    size = 3 if field == "root" else 2
    if field == "root":
        env["PYCCL_ALGO"] = "ring"
    g = groups(size, env=env)
    msgs = g.run(rank_calls, field)
    g.broken = True                    # its communicators are broken by design now
    assert all(m is not None for m in msgs), f"a rank finished a mismatched call: {msgs}"
    named = [m for m in msgs if "call mismatch" in m]
    assert named, msgs
    assert any(f"the {field}" in m for m in named), named
    assert not any("size mismatch" in m for m in msgs), msgs
    if field != "collective":
        other = {"op", "dtype", "count", "root", "collective"} - {field}
        assert not any(f"the {o} " in m or f" and {o} " in m for m in named for o in other), named
