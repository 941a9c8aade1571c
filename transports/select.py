"""Which transport carries each pair of ranks, and opening all of them.

The rule (DESIGN.md): same host and both on GPU -> cuda_ipc; same host -> shm;
RDMA device present -> ibverbs; else tcp. `PYCCL_TRANSPORT` (or the communicator's
`transport=`) forces one for every pair.
"""
from .base import SetupContext
from .tcp import TCPTransport

_TRANSPORTS = {"tcp": TCPTransport}


def register(name: str, cls) -> None:
    _TRANSPORTS[name] = cls


def connect_all(ctx: SetupContext, choice: str):
    """Open a connection to every other rank; returns ({peer: Connection}, [transports])."""
    if choice not in _TRANSPORTS:
        from ..errors import InvalidArgument
        raise InvalidArgument(f"unknown transport {choice!r}; known: {', '.join(sorted(_TRANSPORTS))}")
    transport = _TRANSPORTS[choice]()
    peers = [p for p in range(ctx.size) if p != ctx.rank]
    return transport.connect(ctx, peers), [transport]
