"""Communicator.memory() / suspend() / resume() on the host (ccl/suspension.py): the report's
shape, the resume-on-call wrappers (installed while suspended, gone after: the communicator's
methods are then its own again), and collectives still right after suspend and resume. The GPU
side (what the CUDA state frees, graphs) is tests/test_cuda_memory.py."""
import numpy as np

import pyccl
from pyccl import suspension


def rank_cycle(comm):
    out = {}
    before = {n: type(comm).__dict__[n] for n in suspension.CALLS}
    m = comm.memory()
    out["report"] = set(m) == {"device", "pinned", "mapped", "suspended", "parts"} and m["suspended"] is False
    comm.suspend()
    out["suspended"] = comm.memory()["suspended"] and "all_reduce" in comm.__dict__
    x = np.arange(10, dtype=np.float32) * (comm.rank + 1)
    comm.all_reduce(x)                                    # resumes first, then runs
    out["sum after suspend"] = bool(np.array_equal(x, np.arange(10, dtype=np.float32) * 3))
    out["resumed by the call"] = not comm.memory()["suspended"] and not any(n in comm.__dict__
                                                                             for n in suspension.CALLS)
    comm.suspend()
    comm.suspend()                                        # twice: no-op
    comm.resume()
    comm.resume()
    y = np.full(4, comm.rank, dtype=np.int64)
    comm.broadcast(y, root=1)
    out["broadcast after resume"] = bool((y == 1).all())
    out["methods are the class's again"] = all(getattr(type(comm), n) is before[n] for n in suspension.CALLS) \
        and not any(n in comm.__dict__ for n in suspension.CALLS)
    return out


def rank_keeps_instance_attributes(comm):
    """A method the instance itself set (a fast path of another module) is put back by resume."""
    calls = []

    def mine(x, op=pyccl.SUM, async_op=False):
        calls.append(1)
        return type(comm).all_reduce(comm, x, op, async_op)
    comm.all_reduce = mine
    comm.suspend()
    comm.all_reduce(np.ones(3, dtype=np.float32))
    ok = comm.__dict__.get("all_reduce") is mine and calls == [1]
    del comm.all_reduce
    return ok


def test_suspend_resume_on_the_host(groups):
    for res in groups(2).run(rank_cycle):
        assert all(res.values()), res


def test_resume_restores_instance_methods(groups):
    assert groups(2).run(rank_keeps_instance_attributes) == [True, True]
