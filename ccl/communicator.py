"""The Communicator: validate a call, choose its engine, submit it.

Each public call is three steps (../shared/DESIGN.md, "The flow of one collective"):
  1. validate: the arguments become one `Call` (ccl/validate.py, ccl/call.py), or raise
     InvalidArgument before any byte moves;
  2. choose: the engines made at set-up price the call, the cheapest runs it
     (ccl/engines/choice.py; PYCCL_ENGINE forces one, PYCCL_DEBUG=INFO logs why);
  3. submit: the call queue runs it now or on the progress thread, in call order
     (ccl/queue.py), and after a failure breaks the communicator so later calls raise at once.
Engines get what they use when they are made (`Resources`: connections, executor, topology,
costs, store, timeout, queue, recorder) and never call back into the communicator.
"""
import json
import logging
import secrets
import time

import numpy as np

from . import env as _env
from . import settings
from .dtypes import SUM
from .engines.base import Resources
from .engines.choice import Engines
from .engines.composed import Hierarchy
from .engines.cuda import CudaEngine
from .engines.executor import Executor
from .engines.flat import FlatEngine
from .engines.reproducible import Reproducible, ReproducibleCuda
from .engines.proxy import ProxyEngine
from .engines.staged import StagedEngine
from .errors import InvalidArgument, PeerFailure, Timeout
from .process import pid_alive
from .queue import CallQueue, Work  # noqa: F401 - Work: pyccl.communicator.Work, as before
from .recorder import FlightRecorder
from .store import PrefixStore
from .validate import Validator
from pyccl.topology.cost import measured_costs, transport_costs
from pyccl.topology.graph import Topology
from pyccl.transports.base import SetupContext

log = logging.getLogger("pyccl")


class Communicator:
    """A group of ranks that run collectives together (see README.md, "Use", for the API)."""
    joined = False          # True on the communicator pyccl.join() returned (ccl/elastic.py)

    def __init__(self, rank=None, size=None, store=None, timeout=None, *, secret=None,
                 transport=None, reproducible=None, _members=None, _tag=None):
        info = None
        if rank is None or size is None or store is None:
            info = _env.detect()
            rank = info.rank if rank is None else rank
            size = info.size if size is None else size
        if not (0 <= rank < size):
            raise InvalidArgument(f"Communicator: rank {rank} is outside 0..{size - 1}")
        self.rank, self.size = int(rank), int(size)
        self.timeout = float(timeout if timeout is not None else _env.default_timeout())
        if store is None:
            store = _env.open_store(info, self.timeout)
        self._root_store = store
        self._members = _members or list(range(self.size))
        if _tag is None:
            # Several world communicators may share one store: number them by arrival.
            ticket = store.add(f"pyccl/world/{self.size}", 1)
            _tag = f"world{(ticket - 1) // self.size}"
        self.tag = _tag
        self.store = PrefixStore(store, f"pyccl/{self.tag}")
        self._secret = secret or self._agree_secret(info)
        self._splits = 0
        self._shrinks = 0
        self.recorder = FlightRecorder(self.tag, self.rank, self.size)
        self.check = settings.get("PYCCL_CHECK")
        self.queue = CallQueue(self.tag, self.rank, self.size, self.timeout, self.recorder, self._failed)
        self.chunk_bytes = settings.get("PYCCL_CHUNK_BYTES")
        # reproducible mode (ccl/engines/reproducible.py): float SUM/AVG give the same bytes on any engine
        self.reproducible = bool(settings.get("PYCCL_REPRODUCIBLE") if reproducible is None else reproducible)
        self.validate = Validator(self.rank, self.size, self.reproducible)
        self.peer_info = self._exchange_info(derived=_members is not None)
        self.transport_name = (transport or settings.get("PYCCL_TRANSPORT") or "auto").lower()
        self._transports = []
        self.conns = self._connect()
        self.topology = self._topology()
        self.costs = transport_costs(measured=self._measured_costs())
        self.executor = Executor(self.rank, self.conns, self.timeout, self.chunk_bytes, self.tag, self._names())
        self.engines = self._make_engines()
        if self.check:
            self.queue.check = self.engines.by_name["flat"].agree
        log.info("%s rank %d/%d up: transport %s, %d peers, engines %s", self.tag, self.rank, self.size,
                 self.transport_name, len(self.conns), ", ".join(self.engines.by_name))

    # ---- set-up -------------------------------------------------------------------------
    def _agree_secret(self, info) -> bytes:
        if info is not None and info.secret:
            return info.secret
        if settings.get("PYCCL_JOB_SECRET"):
            return bytes.fromhex(settings.get("PYCCL_JOB_SECRET"))
        if self.rank == 0:
            self.store.set("secret", secrets.token_bytes(32))
        return self.store.get("secret", timeout=self.timeout)

    def _exchange_info(self, derived=False) -> list:
        """Every rank's info (ccl/bootstrap.py): two store requests per rank, then an all-gather
        among the ranks; none at all for a communicator of ranks this process already knows."""
        from . import bootstrap
        self._listener = None
        infos, self._listener = bootstrap.exchange(
            self.store, self._root_store, self.rank, self.size, self._members, self._secret, self.tag,
            self.timeout, self._bind_host(), derived)
        return infos

    def _measured_costs(self) -> dict:
        """Rank 0's calibrated transport costs (python -m pyccl.tune), the same on every rank."""
        return measured_costs(next((p["tune"] for p in self.peer_info if p.get("tune")), {}))

    def _bind_host(self) -> str:
        return _env.socket_interface_address(getattr(self._root_store, "host", None))

    def _connect(self):
        """{peer: Connection}, each opened when a plan or call first needs it (shm: at once)."""
        from pyccl.transports.select import Connections
        ctx = SetupContext(self.rank, self.size, self._members, self.store, self._secret, self.tag,
                           self.timeout, self._bind_host(), {r: i for r, i in enumerate(self.peer_info)},
                           self._listener, lambda: self.queue.broken is not None)
        conns = Connections(ctx, self.transport_name)
        self._transports = conns.transports
        return conns

    def _topology(self) -> Topology:
        """The ranks' hosts, with the links priced as the transports that carry them: shm (or
        tcp, forced) inside a host; between hosts what the selection rule gives the first
        ranks of hosts 0 and 1 (ibverbs where both have RDMA), the same on every rank."""
        hosts = [i["host"] for i in self.peer_info]
        intra = "tcp" if self.transport_name == "tcp" else "shm"
        inter = "tcp"
        others = [r for r, h in enumerate(hosts) if h != hosts[0]]
        if others:
            inter = self.conns.transport_between(0, others[0])
        return Topology.from_host_ids(hosts, intra=intra, inter=inter)

    def _names(self) -> dict:
        """How errors name each rank: its number here, with its world rank (a split or
        shrunk communicator) and, across hosts, its host."""
        hosts = self.topology.nhosts > 1
        names = {}
        for r, info in enumerate(self.peer_info):
            bits = [f"world rank {self._members[r]}"] if self._members[r] != r else []
            if hosts:
                bits.append(f"host {info.get('host', '?')}")
            names[r] = f"rank {r}" + (f" ({', '.join(bits)})" if bits else "")
        return names

    def _resources(self) -> Resources:
        fixed = self.chunk_bytes if settings.is_set("PYCCL_CHUNK_BYTES") else None
        return Resources(self.rank, self.size, self.tag, self.timeout, self.store, self.peer_info,
                         self.topology, self.costs, self.conns, self.executor, self.queue,
                         self.chunk_bytes, fixed, self.transport_name, self.reproducible,
                         prefixed=lambda prefix: PrefixStore(self.store, prefix))

    def _make_engines(self) -> Engines:
        """Every engine this communicator's placement can use, specialised before general
        (ties go to the earlier). The shm C collectives are set up now (collective among the
        ranks of this host); the others on their first call."""
        res = self._resources()
        algo = settings.get("PYCCL_ALGO") or ""
        flat = FlatEngine(res, algo)
        shm = self._shm_engine(res)
        composed = Hierarchy(res, algo)
        engines = None                         # ReproducibleCuda chooses its parts' engines here
        listed = [Reproducible(res, shm, flat), ReproducibleCuda(res, lambda call: engines.choose(call)),
                  CudaEngine(res), ProxyEngine(res, flat, self.validate, composed), StagedEngine(res, flat, composed),
                  shm, composed, flat]
        engines = Engines([e for e in listed if e is not None])
        return engines

    def _shm_engine(self, res):
        """The shared-memory collectives when every rank is on this host (ccl/engines/shm.py)."""
        if self.size == 1 or self.transport_name not in ("auto", "shm") or self.topology.nhosts != 1:
            return None
        try:
            from .engines.shm import ShmEngine
        except ImportError:
            return None
        return ShmEngine(res)

    @property
    def local(self):
        """The shm engine of a one-host communicator (None elsewhere)."""
        e = self.engines.by_name.get("shm")
        return e if e is not None and e.enabled else None

    @property
    def cuda(self):
        """The state of the GPU engine in use (the CUDA IPC engine on one host, the staging
        across hosts), made by the first call on CUDA buffers; None before."""
        for name in ("cuda", "proxy", "staged"):
            e = self.engines.by_name.get(name)
            if e is not None and e.state is not None:
                return e.state
        return None

    # ---- execution ----------------------------------------------------------------------
    def _failed(self, e, entry):
        """After a call raised: tell the peers, note it, break the communicator (the queue);
        returns the exception to raise. Validation happens before submission, so anything
        raised during a call left the peers mid-call: no later call may pretend the byte
        streams are in step."""
        self._tell_peers(f"{type(e).__name__}: {e}")
        if isinstance(e, PeerFailure):
            e = PeerFailure(f"{e}{self._peer_reports()}")
        if entry is not None:                  # None: an uncounted wrapper (CallQueue.run)
            self.recorder.finish(entry, e, self.executor.where)
        self.queue.broken = f"{type(e).__name__}: {e}"
        if settings.get("PYCCL_DUMP_ON_TIMEOUT"):
            path = self.recorder.dump(settings.get("PYCCL_DUMP_ON_TIMEOUT"))
            log.error("pyccl: flight recorder of rank %d written to %s", self.rank, path)
        if not isinstance(e, Timeout):
            # peers still waiting on us would only time out; closing tells them now.
            # After a timeout the peers are waiting too and will time out themselves,
            # each naming what it waited on, which is the better diagnosis.
            self.abort()
        return e

    def _tell_peers(self, reason: str) -> None:
        """Leave this rank's failure in the store before dropping connections, so ranks that
        see only 'connection closed' can name the root cause."""
        try:
            self.store.set(f"abort/{self.rank}", reason[:2000].encode())
        except Exception:  # noqa: BLE001 - the store may be gone too; the local error still stands
            pass

    def _peer_reports(self) -> str:
        """What failed peers left in the store (see _tell_peers); waits up to a second for the
        first report, since a peer may drop its links an instant before it writes one."""
        keys = [f"abort/{r}" for r in range(self.size) if r != self.rank]
        try:
            deadline = time.monotonic() + 1.0
            present = []
            while not present and time.monotonic() < deadline:
                present = [k for k, ok in zip(keys, self.store.check(keys)) if ok]
                if not present:
                    time.sleep(0.02)
            reports = [f"rank {k.split('/')[1]} reported: {self.store.get(k, timeout=1).decode()}" for k in present]
        except Exception:  # noqa: BLE001 - best effort: the store may be unreachable now
            return ""
        return ("; " + "; ".join(reports)) if reports else ""

    # ---- collectives: validate -> choose -> submit ---------------------------------------------
    # (written out in each: an 8-byte all_reduce is mostly Python time, one call level counts)
    def all_reduce(self, x, op=SUM, async_op=False):
        call = self.validate.all_reduce(x, op, async_op)
        return self.queue.submit(call, self.engines.choose(call))

    def reduce(self, x, root=0, op=SUM, async_op=False):
        call = self.validate.reduce(x, root, op, async_op)
        return self.queue.submit(call, self.engines.choose(call))

    def broadcast(self, x, root=0, async_op=False):
        call = self.validate.broadcast(x, root, async_op)
        return self.queue.submit(call, self.engines.choose(call))

    def all_gather(self, out, inp, async_op=False):
        call = self.validate.all_gather(out, inp, async_op)
        return self.queue.submit(call, self.engines.choose(call))

    def reduce_scatter(self, out, inp, op=SUM, async_op=False):
        call = self.validate.reduce_scatter(out, inp, op, async_op)
        return self.queue.submit(call, self.engines.choose(call))

    def all_to_all(self, out, inp, out_splits=None, in_splits=None, async_op=False):
        """Rank r's piece j of `inp` lands in rank j's piece r of `out`. Splits are element
        counts per rank (lists, or CUDA int tensors for CUDA buffers); every rank passes them
        or none does, as MPI's Alltoallv and Alltoall: None means equal pieces."""
        call = self.validate.all_to_all(out, inp, out_splits, in_splits, async_op)
        return self.queue.submit(call, self.engines.choose(call))

    def gather(self, out, inp, root=0, async_op=False):
        call = self.validate.gather(out, inp, root, async_op)
        return self.queue.submit(call, self.engines.choose(call))

    def scatter(self, out, inp, root=0, async_op=False):
        call = self.validate.scatter(out, inp, root, async_op)
        return self.queue.submit(call, self.engines.choose(call))

    def send(self, x, peer, async_op=False):
        call = self.validate.send(x, peer, async_op)
        return self.queue.submit(call, self.engines.choose(call))

    def recv(self, x, peer, async_op=False):
        call = self.validate.recv(x, peer, async_op)
        return self.queue.submit(call, self.engines.choose(call))

    def barrier(self, async_op=False):
        call = self.validate.barrier(async_op)
        return self.queue.submit(call, self.engines.choose(call))

    def window(self, buf, signals=None):
        """One-sided access to every rank's `buf` (put, get, signal, wait_signal, flush):
        collective, sizes may differ; ccl/windows/. Close it (or use `with`) on every rank."""
        from .windows import Window
        return Window(self, buf, signals)

    # ---- memory (ccl/suspension.py) -----------------------------------------------------------
    def memory(self) -> dict:
        """What this communicator holds on the device, pinned on the host and mapped from its
        peers, in bytes: totals and {"<engine>.<kind>.<purpose>": bytes}."""
        from . import suspension
        return suspension.memory(self)

    def suspend(self, graphs=True):
        """Give back the device memory, keep the communicator (every rank calls it); resume(),
        or the next call, brings it back (ccl/suspension.py). graphs=False: no CUDA graph
        captured with it is replayed again, so what only graphs needed goes too."""
        from . import suspension
        suspension.suspend(self, graphs)

    def resume(self):
        """Collective: make again what suspend() gave back (see suspend)."""
        from . import suspension
        suspension.resume(self)

    # ---- groups -----------------------------------------------------------------------------
    def split(self, color, key=0):
        """Like MPI_Comm_split: ranks with the same color form a new communicator, ordered by
        (key, old rank). color None or negative: this rank joins none and gets None."""
        mine = np.array([-1 if color is None or color < 0 else int(color), int(key)], dtype=np.int64)
        table = np.empty(2 * self.size, dtype=np.int64)
        self.all_gather(table, mine)
        self._splits += 1
        if mine[0] < 0:
            return None
        pairs = table.reshape(self.size, 2)
        members = sorted((int(k), r) for r, (c, k) in enumerate(pairs) if c == mine[0])
        ranks = [r for _, r in members]
        tag = f"{self.tag}.s{self._splits}c{mine[0]}"
        return Communicator(ranks.index(self.rank), len(ranks), self._root_store, self.timeout,
                            secret=self._secret, transport=self.transport_name, reproducible=self.reproducible,
                            _members=[self._members[r] for r in ranks], _tag=tag)

    def shrink(self, exclude=(), timeout=None):
        """A new communicator of the ranks still alive, after a peer failed (MPI_Comm_shrink,
        ncclCommShrink). Every surviving rank calls it; it runs over the store, not over the
        (broken) connections, so the store must outlive the failure (pyccl.launch and torchrun
        host it outside the ranks). Left out are: ranks in any caller's `exclude`, ranks found
        dead (same host, process gone), and ranks that have not called it within `timeout` s
        (default min(communicator timeout, 30)). The first caller decides and writes the member
        list; everybody builds the new communicator from it, ranks numbered in the old order.
        A rank that calls after the decision gets PeerFailure. This communicator is left as it
        is: close it."""
        self._shrinks += 1
        key = f"shrink{self._shrinks}"
        window = float(timeout if timeout is not None else min(self.timeout, 30.0))
        mine = {"exclude": sorted({int(r) for r in exclude}), "dead": self._dead_local_peers()}
        self.store.set(f"{key}/here/{self.rank}", json.dumps(mine).encode())
        if self.store.add(f"{key}/decider", 1) == 1:
            self.store.set(f"{key}/members", json.dumps(self._decide_members(key, window)).encode())
        members = json.loads(self.store.get(f"{key}/members", timeout=window + self.timeout))
        if self.rank not in members:
            raise PeerFailure(f"shrink: rank {self.rank} was left out; ranks {members} agreed on "
                              f"the new communicator before this rank called (after {window:.0f}s)")
        log.info("%s rank %d: shrink -> %d ranks %s", self.tag, self.rank, len(members), members)
        return Communicator(members.index(self.rank), len(members), self._root_store, self.timeout,
                            secret=self._secret, transport=self.transport_name, reproducible=self.reproducible,
                            _members=[self._members[r] for r in members], _tag=f"{self.tag}.{key}")

    def grow(self, n_new, timeout=None):
        """A new communicator of these ranks (same order) and `n_new` new processes, each of which
        calls pyccl.join(), numbered after them (ncclCommGrow). Every rank calls it; see
        ccl/elastic.py. This communicator is left as it is, usable whatever happens."""
        from .elastic import grow
        return grow(self, n_new, timeout)

    def _decide_members(self, key, window) -> list:
        """Wait until every rank not known dead has checked in (or `window` passes)."""
        keys = [f"{key}/here/{r}" for r in range(self.size)]
        deadline = time.monotonic() + window
        views = {}                                   # rank -> what it reported (read once)
        while True:
            for r, ok in enumerate(self.store.check(keys)):
                if ok and r not in views:
                    views[r] = json.loads(self.store.get(keys[r], timeout=self.timeout))
            dead = {d for v in views.values() for d in v["dead"]} | set(self._dead_local_peers())
            out = {x for v in views.values() for x in v["exclude"]}
            if set(range(self.size)) - dead <= views.keys() or time.monotonic() > deadline:
                return [r for r in sorted(views) if r not in out and r not in dead]
            time.sleep(0.01)

    def _dead_local_peers(self) -> list:
        """Peers on this host whose process is gone (a zombie counts as gone)."""
        me = self.peer_info[self.rank]
        return [r for r, i in enumerate(self.peer_info)
                if r != self.rank and i["host"] == me["host"] and i.get("pidns") == me.get("pidns")
                and not pid_alive(i["pid"])]

    # ---- teardown ----
    def abort(self):
        """Drop every connection now, so peers blocked on this rank fail fast instead of timing out."""
        if self.queue.broken is None:
            self.queue.broken = "aborted by comm.abort()"
        self.engines.abort()
        for c in self.conns.values():
            c.close()

    def close(self):
        if self.queue.closed:
            return
        self.queue.close()
        self.engines.close()
        for c in self.conns.values():
            c.close()
        for t in self._transports:
            t.close()
        self.conns = {}

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __repr__(self):
        return f"<pyccl.Communicator {self.tag} rank {self.rank}/{self.size} via {self.transport_name}>"


def init(timeout=None, **kwargs) -> Communicator:
    """The world communicator from the environment (pyccl.launch, torchrun, mpirun, Slurm); a
    replacement started by `pyccl.launch --elastic` (PYCCL_JOIN=1) joins the running job instead."""
    if settings.get("PYCCL_JOIN"):
        return join(timeout)
    return Communicator(timeout=timeout, **kwargs)


def join(timeout=None, store=None, secret=None) -> Communicator:
    """A new process's side of `comm.grow(n)`: waits for the members' grow, returns the new
    communicator (its ranks after the members'). The store and secret come from the environment
    (PYCCL_STORE_ADDR, PYCCL_JOB_SECRET) unless given. See ccl/elastic.py."""
    from .elastic import join as _join
    return _join(Communicator, timeout, store, secret)
