"""Which transport carries each pair of ranks, and opening all of them.

The rule (DESIGN.md): same host and both on GPU -> cuda_ipc; same host -> shm;
RDMA device present -> ibverbs; else tcp. `PYCCL_TRANSPORT` (or the communicator's
`transport=`) forces one for every pair; "auto" applies the rule.
"""
from ..errors import InvalidArgument
from .base import SetupContext
from .tcp import TCPTransport

#: name -> Transport class, in order of preference for "auto".
TRANSPORTS = {"tcp": TCPTransport}


def register(name: str, cls, prefer: bool = True) -> None:
    """Add a transport; preferred ones are tried before those already registered."""
    global TRANSPORTS
    TRANSPORTS = {name: cls, **TRANSPORTS} if prefer else {**TRANSPORTS, name: cls}


def _load_builtin():
    try:
        from .shm import ShmTransport
        if "shm" not in TRANSPORTS:
            register("shm", ShmTransport)
    except ImportError:
        pass
    if "ibverbs" not in TRANSPORTS:
        from .ibverbs import IbvTransport   # imports everywhere: libibverbs is dlopen'ed on use
        register("ibverbs", IbvTransport)


def connect_all(ctx: SetupContext, choice: str):
    """Open a connection to every other rank; returns ({peer: Connection}, [transports])."""
    _load_builtin()
    peers = [p for p in range(ctx.size) if p != ctx.rank]
    if choice != "auto":
        if choice not in TRANSPORTS:
            raise InvalidArgument(f"unknown transport {choice!r}; known: auto, {', '.join(sorted(TRANSPORTS))}")
        transport = TRANSPORTS[choice]()
        ok, why = transport.available()
        if not ok:
            raise InvalidArgument(f"transport {choice!r} forced by PYCCL_TRANSPORT is unavailable: {why}")
        return transport.connect(ctx, peers), [transport]
    me = ctx.info[ctx.rank]
    chosen = {}
    for name, cls in TRANSPORTS.items():
        t = cls()
        if not t.available()[0]:
            continue
        mine = [p for p in peers if p not in chosen and t.can_connect(me, ctx.info[p])]
        # Every rank must make the same choice for a pair: can_connect is symmetric by contract.
        for p in mine:
            chosen[p] = (name, t)
    conns, used = {}, []
    for name, cls in TRANSPORTS.items():
        group = [p for p, (n, _) in chosen.items() if n == name]
        if not group:
            continue
        t = next(t for p, (n, t) in chosen.items() if n == name)
        conns.update(t.connect(ctx, group))
        used.append(t)
    return conns, used
