"""Communicator.memory(), suspend() and resume(): the engines' device and pinned memory, by
purpose, and giving it back between phases of a job (NCCL 2.29's ncclCommSuspend/Resume).

The engine states that hold memory offer ``memory() -> {"device.<purpose>" | "pinned.<purpose>"
| "mapped.<purpose>": bytes}``, ``suspend()`` and ``resume()`` (ccl/engines/cuda/memory.py says
what the CUDA state frees and keeps; the staged engine: ccl/engines/staged_memory.py).

Semantics, chosen to match NCCL's and to keep the collective fast path untouched:
* ``suspend()`` is local: it waits for this rank's queued calls, then every state frees what it
  can. Every rank should call it (a rank's memory is only released once its peers have
  unmapped it, i.e. suspended too).
* ``resume()`` is collective (the states publish their new scratch to the peers): every rank
  calls it, or makes its next call, which resumes first. The next call of *any* collective
  resumes: while suspended, the communicator's collective methods are wrapped by instance
  attributes that resume and then call through; resume() removes them, so a communicator that
  is not suspended runs exactly the code it ran before (no flag is read per call).
* A CUDA graph captured before suspend() is replayed only after resume() (see
  ccl/engines/cuda/memory.py for what stays valid). ``suspend(graphs=False)`` promises that no
  such graph is replayed again: what only graphs needed (the CUDA control block, the loaded
  kernels) goes too, so the device holds nothing of the communicator until resume.
"""
from .errors import Timeout

#: the communicator methods that resume a suspended communicator before they run
CALLS = ("all_reduce", "reduce", "broadcast", "all_gather", "reduce_scatter", "all_to_all", "gather", "scatter",
         "send", "recv", "barrier")


def holders(comm) -> list:
    """(engine name, state) of every engine state that offers memory()."""
    out = []
    for e in comm.engines.engines:
        st = getattr(e, "state", None)
        if st is not None and hasattr(st, "memory") and hasattr(st, "suspend"):
            out.append((e.name, st))
    return out


def memory(comm) -> dict:
    """{"device": bytes, "pinned": bytes, "mapped": bytes, "suspended": bool,
    "parts": {"<engine>.<device|pinned|mapped>.<purpose>": bytes}}."""
    parts, totals = {}, {"device": 0, "pinned": 0, "mapped": 0}
    for name, st in holders(comm):
        for k, v in st.memory().items():
            parts[f"{name}.{k}"] = int(v)
            kind = k.split(".", 1)[0]
            totals[kind] = totals.get(kind, 0) + int(v)
    return {**totals, "suspended": bool(comm.__dict__.get("_suspended")), "parts": parts}


def suspend(comm, graphs=True):
    """graphs=False: the caller's word that no CUDA graph captured with `comm` is replayed again;
    the states then also free what only captured graphs needed kept (``suspend_all()`` where a
    state has one; ccl/engines/cuda/memory.py), also when `comm` is already suspended."""
    if comm.__dict__.get("_suspended"):
        if not graphs:
            for _, st in holders(comm):
                getattr(st, "suspend_all", st.suspend)()
        return
    if not comm.queue.wait_idle(comm.timeout):
        raise Timeout(f"suspend on {comm.tag} (rank {comm.rank}): queued calls still running after "
                      f"{comm.timeout:g}s")
    _wrap(comm)                     # first: a state that raises leaves the others to the next call's resume
    for _, st in holders(comm):
        (st.suspend if graphs else getattr(st, "suspend_all", st.suspend))()


def resume(comm):
    if not comm.__dict__.get("_suspended"):
        return
    _unwrap(comm)
    for _, st in holders(comm):
        st.resume()


def _wrap(comm):
    """Install the resume-first wrappers (keeping any instance attribute they shadow)."""
    saved = {n: comm.__dict__[n] for n in CALLS if n in comm.__dict__}
    comm.__dict__["_suspended"] = True
    comm.__dict__["_suspended_saved"] = saved

    def wrapper(name):
        def call(*args, **kwargs):
            resume(comm)
            return getattr(comm, name)(*args, **kwargs)
        call.__name__ = name
        return call
    for n in CALLS:
        comm.__dict__[n] = wrapper(n)


def _unwrap(comm):
    comm.__dict__.pop("_suspended")
    saved = comm.__dict__.pop("_suspended_saved")
    for n in CALLS:
        if n in saved:
            comm.__dict__[n] = saved[n]
        else:
            comm.__dict__.pop(n, None)
