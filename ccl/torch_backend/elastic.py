"""Elastic process groups on "pyccl": shrink to the survivors, grow to a replacement, keep going.

Why beside torch rather than through it: torch's own ``dist.shrink_group`` (2.10+) wants a c10d
``Backend`` with ``shrink`` and rebuilds the *default* group when given it (destroying every
other group), and torch has no grow at all. A pyccl group made here is a plain
``ProcessGroupPyccl`` over a pyccl Communicator of the job (``pyccl.init()``: the launcher's
store, not torch's), so the communicator's ``shrink``/``grow`` and ``pyccl.join()`` carry over
to it and torch's default group (whatever its backend) is never touched. Use the groups with
``dist.*(..., group=pg)``; name roots with ``group_src=``/``group_dst=`` (these groups are not
in torch's table of global ranks, since a joined process has no rank in the default group).

    pg = elastic_group()                  # every starting rank; a replacement joins instead
    ... dist.all_reduce(t, group=pg) raises after a rank died ...
    small = shrink_group(pg); pg.abort()  # torch: dist.shrink_group(ranks, group)
    pg = grow_group(small, 1); small.shutdown()
    # the replacement, started by `pyccl.launch --elastic`: pg = elastic_group() (joins)
"""
from .group import ProcessGroupPyccl, p2p_transport


def _group(comm) -> ProcessGroupPyccl:
    """A process group over `comm`; its point-to-point communicator is derived from the same
    members (known records: no store request, connections on first use)."""
    p2p = type(comm)(comm.rank, comm.size, comm._root_store, comm.timeout, secret=comm._secret,
                     transport=p2p_transport(), reproducible=comm.reproducible,
                     _members=list(comm._members), _tag=f"{comm.tag}.p2p")
    pg = ProcessGroupPyccl(None, comm.rank, comm.size, comm.timeout, comms=(comm, p2p))
    pg._group_name = f"pyccl:{comm.tag}"
    return pg


def elastic_group(timeout=None) -> ProcessGroupPyccl:
    """The job's group from the environment (``pyccl.init()``); in a replacement started by
    ``pyccl.launch --elastic`` (PYCCL_JOIN=1) this waits for the members' ``grow_group``."""
    from ..communicator import init
    return _group(init(timeout))


def join_group(timeout=None) -> ProcessGroupPyccl:
    """A new process's side of ``grow_group`` (``pyccl.join()``)."""
    from ..communicator import join
    return _group(join(timeout))


def shrink_group(group: ProcessGroupPyccl, exclude=(), timeout=None) -> ProcessGroupPyccl:
    """The survivors' group after a failure (``Communicator.shrink``); every survivor calls it.
    `group` is left as it is: ``abort()`` it."""
    return _group(group.pyccl_communicator.shrink(exclude, timeout))


def grow_group(group: ProcessGroupPyccl, n_new, timeout=None) -> ProcessGroupPyccl:
    """`group`'s ranks and `n_new` joiners (``Communicator.grow``); `group` stays usable."""
    return _group(group.pyccl_communicator.grow(n_new, timeout))
