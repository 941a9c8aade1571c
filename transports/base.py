"""The interface every transport implements, as small as Gloo's pair.

A `Transport` opens a `Connection` to a peer when a plan or point-to-point call first needs
it (transports/select.py `Connections`; the addresses came with the bootstrap records). A `Connection` moves messages to and
from one peer in FIFO order: `isend`/`irecv` post a message and return a `Request`;
`progress()` moves bytes without blocking. The executor drives `progress()` on every
connection and never learns which transport it talks to.
"""
from dataclasses import dataclass, field


class Request:
    """One posted message; `done` turns True when its bytes have all moved."""

    __slots__ = ("nbytes", "done")

    def __init__(self, nbytes: int):
        self.nbytes = nbytes
        self.done = False


@dataclass
class SetupContext:
    """What a transport needs to connect a communicator's ranks."""

    rank: int
    size: int
    ranks: list            # global ranks of the members, index = communicator rank
    store: object          # bootstrap store, already prefixed for this communicator
    secret: bytes          # per-job secret every connection must prove it knows
    comm_tag: str          # names the communicator in handshakes and errors
    timeout: float
    bind_host: str = "127.0.0.1"
    info: dict = field(default_factory=dict)   # topology facts per rank (host id, addr, ...)
    listener: object = None                    # this process's bootstrap Listener (ccl/bootstrap.py)
    cancelled: object = None                   # callable: True once the communicator is aborted


class Connection:
    """Messages to and from one peer, in order. Subclasses move the bytes."""

    peer: int

    def isend(self, data: memoryview, call: int = 0) -> Request:
        """`call`: the collective call the message belongs to (ccl/callsig.py), carried in the
        message header where the transport has one (tcp, shm); 0 = not checked."""
        raise NotImplementedError

    def irecv(self, data: memoryview, call: int = 0) -> Request:
        """A message whose sender's `call` differs (both non-zero) fails with a call mismatch
        naming the field that differs."""
        raise NotImplementedError

    def progress(self) -> bool:
        """Move what can move now; True if any byte moved. Raises PeerFailure/TransportError."""
        raise NotImplementedError

    def wait_handles(self):
        """(readable fds, writable fds) worth select()ing on while idle, or None to poll."""
        return None

    def close(self) -> None:
        raise NotImplementedError


class Transport:
    """Makes connections; `can_connect` decides whether this transport fits a pair of ranks."""

    name = "?"

    @staticmethod
    def available() -> tuple:
        """(usable here, reason if not)."""
        return True, ""

    def can_connect(self, me: dict, peer: dict) -> bool:
        raise NotImplementedError

    def connect(self, ctx: SetupContext, peers: list) -> dict:
        """Open connections to `peers` (communicator ranks); returns {peer: Connection}.
        Called again with other peers as plans need them; the peer calls it for this rank
        at about the same time (both need the pair)."""
        raise NotImplementedError

    def close(self) -> None:
        pass
