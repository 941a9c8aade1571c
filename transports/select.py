"""Which transport carries each pair of ranks, and opening connections when first needed.

The rule (docs/ARCHITECTURE.md, "Transports and selection"): same host -> shm; RDMA device
present on both -> ibverbs; else tcp. (CUDA buffers do not take Connections: the CUDA engines
map their peers' memory through transports/cuda_ipc.py themselves.)
`PYCCL_TRANSPORT` (or the communicator's `transport=`) forces one for every pair; "auto"
applies the rule.

Connections are opened lazily (`Connections`): the first plan or point-to-point call that
needs a peer opens it, every peer of a plan at once. Shared memory stays eager: its rings are
mapped at set-up, cost no file descriptor per peer, and its set-up is collective among the
ranks of one host. Everything else (tcp, ibverbs) opens on first use; TCP needs no store
request for it (addresses came with the bootstrap records, ccl/bootstrap.py; dialing:
transports/tcp_dial.py).
"""
from collections.abc import Mapping

from ..errors import InvalidArgument, TransportError
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


EAGER = ("shm", "cuda_ipc")       # set up for every same-host peer at once: no fd per peer


class Connections(Mapping):
    """{peer: Connection} of one communicator, opening each on first use.

    `ensure(peers)` opens every missing one of `peers` at once (a plan's peers), so the
    handshakes of one plan overlap; `conns[p]` opens one. Iterating shows the open ones only.
    Both ends of a pair open it when a plan or call first needs it; for TCP the lower rank
    dials and the higher one accepts, and every wait keeps answering other peers' dials
    (`poll`), so two ranks never wait on each other."""

    def __init__(self, ctx: SetupContext, choice: str):
        _load_builtin()
        self.ctx = ctx
        self._open = {}
        self._by_name = {}                     # transport name -> Transport
        self._pick = {}
        if choice != "auto":
            if choice not in TRANSPORTS:
                raise InvalidArgument(f"unknown transport {choice!r}; known: auto, {', '.join(sorted(TRANSPORTS))}")
            t = TRANSPORTS[choice]()
            ok, why = t.available()
            if not ok:
                raise InvalidArgument(f"transport {choice!r} forced by PYCCL_TRANSPORT is unavailable: {why}")
            self._by_name[choice] = t
            self._forced = choice
        else:
            self._forced = None
            for name, cls in TRANSPORTS.items():
                t = cls()
                if t.available()[0]:
                    self._by_name[name] = t
        eager = {}
        for name in EAGER:
            if name in self._by_name and (self._forced in (None, name)):
                peers = [p for p in range(ctx.size) if p != ctx.rank and self.transport_of(p) == name]
                if peers:
                    eager[name] = peers
        for name, peers in eager.items():
            try:
                self._open.update(self._by_name[name].connect(ctx, peers))
            except BaseException:
                self.close()
                raise

    @property
    def transports(self) -> list:
        return list(self._by_name.values())

    def transport_of(self, peer: int) -> str:
        """The transport that carries `peer` (the same answer on both ends: can_connect is symmetric)."""
        name = self._pick.get(peer)
        if name is None:
            if self._forced:
                name = self._forced
            else:
                me, other = self.ctx.info[self.ctx.rank], self.ctx.info[peer]
                name = next((n for n, t in self._by_name.items() if t.can_connect(me, other)), None)
                if name is None:
                    raise TransportError(f"{self.ctx.comm_tag}: no transport joins rank {self.ctx.rank} "
                                         f"and rank {peer}")
            self._pick[peer] = name
        return name

    def transport_between(self, a: int, b: int) -> str:
        """The rule for ranks a and b from their bootstrap records alone, so every rank gets
        the same answer (the cost model prices the links between hosts by it)."""
        if self._forced:
            return self._forced
        ia, ib = self.ctx.info[a], self.ctx.info[b]
        for name, cls in TRANSPORTS.items():
            t = self._by_name.get(name) or cls()
            if t.can_connect(ia, ib):
                return name
        return "tcp"

    def __getitem__(self, peer):
        conn = self._open.get(peer)
        if conn is None:
            conn = self.ensure([peer])[0]
        return conn

    def __iter__(self):
        return iter(list(self._open))

    def __len__(self):
        return len(self._open)

    def __contains__(self, peer):
        return peer in self._open

    def ensure(self, peers) -> list:
        """The connections to `peers` (in order), opening the missing ones together."""
        missing = [p for p in peers if p not in self._open]
        if missing:
            groups = {}
            for p in dict.fromkeys(missing):
                if not 0 <= p < self.ctx.size or p == self.ctx.rank:
                    raise InvalidArgument(f"{self.ctx.comm_tag}: no connection from rank {self.ctx.rank} "
                                          f"to rank {p}")
                groups.setdefault(self.transport_of(p), []).append(p)
            for name, group in groups.items():
                self._open.update(self._by_name[name].connect(self.ctx, group))
        return [self._open[p] for p in peers]

    def open_all(self) -> dict:
        """Open a connection to every peer (for engines that listen to everybody); the dict."""
        self.ensure([p for p in range(self.ctx.size) if p != self.ctx.rank])
        return dict(self._open)

    def poll(self) -> None:
        """Answer peers' handshakes that arrived while this rank waits on something else."""
        lst = self.ctx.listener
        if lst is not None:
            lst.poll()

    def wait_fds(self) -> list:
        lst = self.ctx.listener
        return lst.fds() if lst is not None else []

    def close(self) -> None:
        for c in self._open.values():
            c.close()
        self._open = {}
        for t in self._by_name.values():
            t.close()


def connect_all(ctx: SetupContext, choice: str):
    """Open a connection to every other rank; returns ({peer: Connection}, [transports])."""
    conns = Connections(ctx, choice)
    return conns.open_all(), conns.transports
