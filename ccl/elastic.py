"""Growing a running communicator: members call ``comm.grow(n_new)``, new processes ``pyccl.join()``.

Why through the store: a joiner knows nothing but the store's address and the job secret
(from the environment, as ``pyccl.init()``), and the store is the one place every member and
joiner can reach before they know each other. It carries only a handful of small keys per
grow; the communicator is then built from records every process already holds (as
``split``/``shrink`` do, ccl/bootstrap.py), so no bootstrap all-gather runs and connections
stay lazy. Old ranks keep their order; joiners are numbered after them in arrival order.

The keys (``J`` = ``pyccl/join`` on the root store, ``G`` = ``grow<k>`` under the
communicator's prefix)::

    J/tickets    counter: a joiner takes ticket t (1, 2, ...) when it arrives
    J/rec/<t>    joiner t's bootstrap record (listener address, host, pid)
    J/taken      tickets handed to grows so far (only the job's one open grow moves it)
    J/open       counter: 1 while a grow of this job is deciding; a second one fails
    J/ans/<t>    the answer to joiner t: the new communicator's tag, rank, size and ids,
                 then the members' records (written only once a grow claimed t)
    G/here/<r>   member r called grow(n) (value: n)
    G/lead       counter: the first member to call leads
    G/done       the leader's decision for the members (the joiners' records), or the error

Store requests: a member 3 (set, add, get), the leader 11-13 (its waits are single blocking
requests; all but 3 of them while the other members are still arriving), a joiner 3, whatever
the size. The leader's decision lands in one key every member reads, so an error (members
missing, n differing, another grow open, joiners late) reaches every member that called
within the timeout. Joiners are claimed only when all n_new have
come, so a failed grow leaves them waiting for the next one (or their own timeout). The old
communicator is never touched: after any failure it is as usable as before.

A grow ends with a barrier on the new communicator, so "returned" means "every member and
joiner built it"; a joiner that dies before that makes the grow raise PeerFailure on the
members (within the communicator's timeout), after closing what was built of the new one.
"""
import json
import logging
import threading
import time

from . import bootstrap, settings
from . import env as _env
from .errors import InvalidArgument, PeerFailure, PycclError, Timeout
from .store import TCPStore, multi_get
from .transports.tcp_dial import listener_for

log = logging.getLogger("pyccl")

JOIN = "pyccl/join"
_GUARD = threading.Lock()


def _ticket_key(t):
    return f"{JOIN}/ans/{t}"


def _joiner_id(t) -> str:
    """How a joiner is named among members (world ranks are ints; a joiner has none)."""
    return f"joiner{t}"


# ---- members ---------------------------------------------------------------------------------
def grow(comm, n_new, timeout=None):
    """Members' side of a grow (Communicator.grow): the new communicator of size+n_new ranks."""
    if isinstance(n_new, bool) or not isinstance(n_new, int) or n_new < 1:
        raise InvalidArgument(f"grow: n_new must be a positive int, got {n_new!r}")
    window = float(timeout if timeout is not None else comm.timeout)
    with _GUARD:
        if getattr(comm, "_growing", False):
            raise InvalidArgument(f"grow: rank {comm.rank} of {comm.tag} is already in a grow "
                                  f"(another thread); grows of one communicator run one at a time")
        comm._growing = True
        comm._grows = getattr(comm, "_grows", 0) + 1
    try:
        return _grow(comm, n_new, window, f"grow{comm._grows}")
    finally:
        comm._growing = False


def _grow(comm, n_new, window, key):
    store = comm.store
    start = time.monotonic()
    store.set(f"{key}/here/{comm.rank}", str(n_new).encode())
    if store.add(f"{key}/lead", 1) == 1:
        decision = _lead(comm, n_new, window, key, start)
    else:
        try:
            decision = json.loads(store.get(f"{key}/done", timeout=2 * window + 5))
        except Timeout:
            raise Timeout(f"grow ({comm.tag} rank {comm.rank}): no decision from the leading member "
                          f"within {2 * window + 5:.0f}s") from None
    if "error" in decision:
        raise _error(decision)
    base, size = decision["base"], comm.size + n_new
    ids = list(comm._members) + [_joiner_id(base + 1 + i) for i in range(n_new)]
    bootstrap.remember(comm._root_store, {ids[comm.size + i]: rec for i, rec in enumerate(decision["joiners"])})
    new = _build(type(comm), comm.rank, size, comm._root_store, comm.timeout, comm._secret,
                 comm.transport_name, comm.reproducible, ids, decision["tag"], "grow")
    log.info("%s rank %d: grow +%d -> %s (%.3fs)", comm.tag, comm.rank, n_new, new.tag, time.monotonic() - start)
    return new


def _error(decision):
    kind = {"Timeout": Timeout, "InvalidArgument": InvalidArgument}.get(decision.get("kind"), PeerFailure)
    return kind(decision["error"])


def _lead(comm, n_new, window, key, start) -> dict:
    """Decide the grow and publish the decision to the members and the claimed joiners.

    The leader is the first member to call, so what needs no other member (the job's grow
    lock, the claim counter, joiners already waiting) is done while the others arrive: after
    the last member's key only MGET, the joiners' answers and `done` remain (3 requests)."""
    store, root = comm.store, comm._root_store
    deadline = start + window
    if root.add(f"{JOIN}/open", 1) != 1:
        root.add(f"{JOIN}/open", -1)
        decision = {"kind": "InvalidArgument", "error": f"grow ({comm.tag}): another grow of this job is in "
                    f"progress; joiners cannot tell two grows apart, so they run one at a time"}
        store.set(f"{key}/done", json.dumps(decision).encode())
        return decision
    try:
        base = root.add(f"{JOIN}/taken", 0)        # only the holder of J/open moves it
        recs = [f"{JOIN}/rec/{base + 1 + i}" for i in range(n_new)]
        joiners = _records(root, recs, 0.0)        # already waiting (the usual case)?
        decision = _members_agree(comm, n_new, window, key, deadline)
        if decision is None:
            if joiners is None:
                joiners = _records(root, recs, max(0.0, deadline - time.monotonic()))
            if joiners is None:
                came = sum(root.check(recs))
                decision = {"kind": "Timeout", "error": f"grow ({comm.tag}): {came} of {n_new} new process(es) "
                            f"called pyccl.join() within {window:.0f}s"}
            else:
                decision = _answer(comm, n_new, base, joiners, key)
        store.set(f"{key}/done", json.dumps(decision).encode())
        if "error" not in decision:
            root.add(f"{JOIN}/taken", n_new)      # before the lock goes: the next grow's base
    finally:
        root.add(f"{JOIN}/open", -1)
    return decision


def _records(root, recs, timeout):
    """The joiners' records, or None if they did not all come within `timeout`."""
    try:
        return [json.loads(v) for v in multi_get(root, recs, timeout)]
    except Timeout:
        return None


def _members_agree(comm, n_new, window, key, deadline):
    """None once every member called grow with the same n_new, else the error decision."""
    keys = [f"{key}/here/{r}" for r in range(comm.size)]
    try:
        asked = [int(v) for v in comm.store.multi_get(keys, max(0.0, deadline - time.monotonic()))]
    except Timeout:
        missing = [r for r, ok in enumerate(comm.store.check(keys)) if not ok]
        return {"kind": "Timeout", "error": f"grow ({comm.tag}): ranks {missing} of {comm.size} did not call "
                f"grow within {window:.0f}s; every member must call it"}
    if len(set(asked)) > 1:
        return {"kind": "InvalidArgument", "error": f"grow ({comm.tag}): the members asked for different "
                f"numbers of new ranks: {dict(enumerate(asked))}"}
    return None


def _answer(comm, n_new, base, joiners, key) -> dict:
    """Hand each claimed joiner its rank (the members' records ride along: one request for it)."""
    root = comm._root_store
    tag = f"grow{base + 1}"
    size = comm.size + n_new
    ids = list(comm._members) + [_joiner_id(base + 1 + i) for i in range(n_new)]
    table = bootstrap.pack_records(comm.peer_info)
    for i in range(n_new):
        head = json.dumps({
            "tag": tag, "rank": comm.size + i, "size": size, "members": comm.size, "ids": ids,
            "joiners": joiners, "timeout": comm.timeout, "transport": comm.transport_name,
            "reproducible": comm.reproducible}).encode()
        root.set(_ticket_key(base + 1 + i), head + b"\n" + table)
    return {"tag": tag, "base": base, "joiners": joiners}


def _build(cls, rank, size, root, timeout, secret, transport, reproducible, ids, tag, who):
    """The new communicator from known records, confirmed by a barrier; nothing left on failure."""
    new = None
    try:
        new = cls(rank, size, root, timeout, secret=secret, transport=transport, reproducible=reproducible,
                  _members=ids, _tag=tag)
        new.barrier()
    except PycclError as e:
        if new is not None:
            new.abort()
            new.close()
        raise PeerFailure(f"{who}: building {tag} ({size} ranks) failed on rank {rank}: {e}; a process "
                          f"that joined may have died. The old communicator is unaffected") from None
    new.joined = who == "join"
    return new


# ---- joiners ---------------------------------------------------------------------------------
def _job_store(timeout):
    """The job's store from the environment (PYCCL_STORE_ADDR, PYCCL_JOB_SECRET: pyccl.launch sets both)."""
    addr = settings.get("PYCCL_STORE_ADDR")
    hexed = settings.get("PYCCL_JOB_SECRET")
    if not addr or not hexed:
        raise InvalidArgument("pyccl.join(): PYCCL_STORE_ADDR and PYCCL_JOB_SECRET must be set (pyccl.launch "
                              "--elastic sets them for a replacement), or pass store= and secret=")
    host, port = _env.parse_addr(addr, "PYCCL_STORE_ADDR")
    try:
        secret = bytes.fromhex(hexed)
    except ValueError:
        raise InvalidArgument("PYCCL_JOB_SECRET must be hex") from None
    return TCPStore(host, port, secret, timeout), secret


def _preload():
    """Import before queueing what building a communicator imports: the members would wait
    for it (0.17 s measured at 4 ranks on the 2-core machine)."""
    try:
        from .engines import shm  # noqa: F401
        from .transports import ibverbs, select  # noqa: F401
        from .transports import shm as _shm  # noqa: F401
    except ImportError:                       # no C core / no shm: the build says so itself
        pass


def join(cls, timeout=None, store=None, secret=None):
    """A new process's side of a grow: wait for the members' grow, return the new communicator."""
    timeout = float(timeout if timeout is not None else _env.default_timeout())
    if store is None:
        store, secret = _job_store(timeout)
    secret = bootstrap.check_secret(secret)
    start = time.monotonic()
    listener = listener_for(_env.socket_interface_address(getattr(store, "host", None)), secret)
    me = bootstrap.own_record(-1, listener)
    me.pop("rank", None)
    _preload()
    t = store.add(f"{JOIN}/tickets", 1)
    store.set(f"{JOIN}/rec/{t}", json.dumps(me).encode())
    try:
        head, _, table = store.get(_ticket_key(t), timeout=timeout).partition(b"\n")
    except Timeout:
        raise Timeout(f"pyccl.join(): no grow took this process (ticket {t}) within {timeout:.0f}s; "
                      f"the members must call comm.grow(n)") from None
    ans = json.loads(head)
    n_old = ans["members"]
    records = bootstrap.unpack_records(table, n_old, f"pyccl.join() ticket {t}") + ans["joiners"]
    ids = ans["ids"]
    bootstrap.remember(store, {ids[r]: rec for r, rec in enumerate(records)})
    new = _build(cls, ans["rank"], ans["size"], store, ans.get("timeout", timeout), secret, ans["transport"],
                 ans["reproducible"], ids, ans["tag"], "join")
    log.info("pyccl.join(): rank %d of %s (%d ranks) in %.3fs", new.rank, new.tag, new.size,
             time.monotonic() - start)
    return new
