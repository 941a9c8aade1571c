"""The one interface every engine fills, and what an engine receives when it is made.

An engine runs whole collectives of some kind (memory kind, placement, op). The communicator
asks each engine its price for a call (`cost`: predicted seconds, None when it cannot run the
call), runs the cheapest (ccl/engines/choice.py), and hands it the call (`run`) through its
queue (ccl/queue.py). Engines never call back into the communicator: what they use
(connections, executor, topology, costs, store, timeout, queue) comes in `Resources`.

Three flags shape how the queue runs an engine's calls (defaults in `EngineBase`), and one
set lets the hottest call skip the general path (`shortcuts`: a synchronous call with nothing
queued runs `short(call, seq)` through CallQueue.run_now, with the same order, recorder and
errors):
  stream_ordered  the engine orders its work on the caller's CUDA stream: `begin(call)` binds
                  the caller's stream on the caller's thread before the call is queued, and
                  `finish(call, outcome)` turns the outcome (run()'s result, or the queue's
                  Work for async_op) into what the caller gets back;
  enqueue_only    (stream-ordered engines) run() never blocks the host, so an async call with
                  nothing queued before it runs at once instead of on the progress thread;
  composite       the engine composes other calls, each submitted on the queue by itself
                  (reproducible mode on CUDA buffers): run() is called outside the queue.
"""
from dataclasses import dataclass
from typing import Any, Optional, Protocol, runtime_checkable


@runtime_checkable
class Engine(Protocol):
    name: str

    def cost(self, call) -> Optional[float]:
        """Predicted seconds for `call`, None when this engine cannot run it."""

    def run(self, call, what: str):
        """Run `call` (in call order; `what` names it in errors)."""

    def abort(self) -> None:
        """Make every wait of this engine end now (a peer failed, comm.abort())."""

    def close(self) -> None:
        """Release what the engine holds (shared memory, device memory, threads)."""


class EngineBase:
    """Defaults of the optional parts, and the capability filter every engine applies before
    it prices a call: memory kinds, ops, reproducible calls."""
    name = "engine"
    kinds = ("cpu",)                 # memory kinds it runs
    ops = frozenset()                # collectives it runs
    reproducible = False             # whether it gives reproducible mode's bytes
    stream_ordered = False
    enqueue_only = False
    host_async = False              # the host part is queued even for a synchronous call (the proxy)
    composite = False
    shortcuts = frozenset()          # ops short(call, seq) runs, for the queue's run_now

    def takes(self, call) -> bool:
        return call.kind in self.kinds and call.op in self.ops and (self.reproducible or not call.reproducible)

    def cost(self, call) -> Optional[float]:
        return self.price(call) if self.takes(call) else None

    def price(self, call) -> Optional[float]:
        raise NotImplementedError

    def run(self, call, what):
        return getattr(self, "run_" + call.op)(call, what)

    def abort(self):
        pass

    def close(self):
        pass


class DeviceEngine(EngineBase):
    """An engine whose device state (`state`) is made by its first call, which knows the GPU;
    abort and close go to that state."""
    state = None

    def abort(self):
        if self.state is not None:
            self.state.abort()

    def close(self):
        if self.state is not None:
            self.state.close()


@dataclass
class Resources:
    """What a communicator lends its engines when it makes them."""
    rank: int
    size: int
    tag: str
    timeout: float
    store: Any                       # the communicator's (prefixed) store
    peer_info: list                  # every rank's bootstrap info (host, pid, ...)
    topology: Any                    # pyccl.topology.graph.Topology of the ranks
    costs: dict                      # {transport: LinkCost} for the cost model
    conns: Any                       # {peer: Connection}, opened on first use
    executor: Any                    # the plan walker over the connections
    queue: Any                       # ccl/queue.CallQueue: call order, seq, inflight, broken
    chunk_bytes: int
    fixed_chunk: Optional[int]       # PYCCL_CHUNK_BYTES when the user set it, else None
    transport_name: str
    reproducible: bool
    prefixed: Any = None             # prefix -> the store with every key under prefix/

    @property
    def hosts(self) -> int:
        return self.topology.nhosts

    def host_of(self, rank: int) -> str:
        return str(self.peer_info[rank].get("host", "?"))


class Enqueued:
    """The Work of a call that ran at once on the caller's thread because it only enqueues
    device work (ccl/engines/base.py, `enqueue_only`): done for the host, so waiting is a no-op."""
    __slots__ = ("result", "what")

    def __init__(self, result, what):
        self.result, self.what = result, what

    def wait(self, timeout=None):
        return True

    def is_completed(self):
        return True

    def exception(self):
        return None
