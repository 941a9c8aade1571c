"""The Communicator: validates a call, picks a plan, and hands it to the executor.

Collectives run in the order they are called (like a CUDA stream in NCCL). A
synchronous call runs on the caller's thread when nothing is queued, which keeps
small-message latency low; `async_op=True` queues the call on the communicator's
progress thread and returns a `Work` at once. After an error (peer failure, timeout,
call or size mismatch seen on the wire) the communicator is broken: later calls raise at once
instead of hanging on a peer that has given up.
"""
import json
import logging
import os
import queue
import secrets
import threading
import time
import zlib

import numpy as np

from . import callsig
from . import env as _env
from .engines import reproducible as _repro
from .buffers import as_buffer, same_dtype
from .cuda_buffers import is_cuda
from .dtypes import AVG, SUM, as_op, check_op_dtype, dtype_name
from .errors import InvalidArgument, PeerFailure, PycclError, Timeout
from .engines.executor import Executor
from .process import pid_alive
from .recorder import FlightRecorder
from .reduce import _DTYPE_CODE, _OP_BY_ID, divide_into
from .store import PrefixStore
from pyccl.topology import direct, ring as ring_plans
from pyccl.topology.cost import transport_costs
from pyccl.topology.graph import Topology, applicable, build_plan
from pyccl.transports.base import SetupContext
from .tuner import choose

log = logging.getLogger("pyccl")

# all_reduce's short path takes the dtypes every op reduces natively (bool takes MIN/MAX only):
# dtype -> (C core code, name for the flight recorder); ops by identity through _OP_BY_ID
_FAST_DTYPES = {dt: (code, dtype_name(dt)) for dt, code in _DTYPE_CODE.items() if dt != np.bool_}

DEFAULT_CHUNK_BYTES = 1 << 20


class Work:
    """Handle of one queued collective, like torch's Work."""

    def __init__(self, what: str, comm=None):
        self.what = what
        self._comm = comm
        self._done = threading.Event()
        self._error = None
        self.result = None

    def _finish(self, error=None):
        self._error = error
        self._done.set()

    def is_completed(self) -> bool:
        return self._done.is_set()

    def exception(self):
        return self._error

    def wait(self, timeout=None) -> bool:
        """Block until done (bounded by `timeout` or the communicator's); re-raise its error."""
        limit = timeout if timeout is not None else (self._comm.timeout * 2 + 5 if self._comm else None)
        if not self._done.wait(limit):
            raise Timeout(f"{self.what} did not finish within {limit:.0f}s")
        if self._error is not None:
            raise self._error
        return True


class Communicator:
    """A group of ranks that run collectives together (see README.md, "Use", for the API)."""

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
        self._seq = 0
        self._call = None            # (op, sig) of the call executing now (see _run)
        self._splits = 0
        self._shrinks = 0
        self._plans = {}
        self._broken = None
        self._closed = False
        self._lock = threading.Lock()          # serialises execution
        self._submit_lock = threading.Lock()
        self._queue = queue.Queue()
        self.recorder = FlightRecorder(self.tag, self.rank, self.size)
        self.check = os.environ.get("PYCCL_CHECK", "0") not in ("", "0")
        self._inflight = 0
        self._thread = None
        self.chunk_bytes = _env.env_int("PYCCL_CHUNK_BYTES", DEFAULT_CHUNK_BYTES)
        # reproducible mode (ccl/engines/reproducible.py): float SUM/AVG give the same bytes on any engine
        self.reproducible = bool(_env.env_int("PYCCL_REPRODUCIBLE", 0) if reproducible is None else reproducible)
        self.peer_info = self._exchange_info(derived=_members is not None)
        self.transport_name = (transport or os.environ.get("PYCCL_TRANSPORT") or "auto").lower()
        intra = "tcp" if self.transport_name == "tcp" else "shm"
        self.topology = Topology.from_host_ids([i["host"] for i in self.peer_info], intra=intra, inter="tcp")
        self.ring = list(self.topology.ring_order())
        self._costs = transport_costs(measured=self._measured_costs())
        self._fixed_chunk = self.chunk_bytes if os.environ.get("PYCCL_CHUNK_BYTES") else None
        self._transports = []
        self.conns = self._connect()
        self.executor = Executor(self.rank, self.conns, self.timeout, self.chunk_bytes, self.tag)
        self.local = self._local_collectives()
        self._hier = None   # multi-host: the composed collectives (ccl/engines/composed.py), made on first use
        # the short path of all_reduce (_all_reduce_shm); PYCCL_CHECK needs the general one
        self._fast = self.local is not None and self.local.enabled and not self.check and not self.reproducible
        self.cuda = None    # GPU fast paths (ccl/engines/cuda/), set up by the first CUDA call
        log.info("%s rank %d/%d up: transport %s, %d peers", self.tag, self.rank, self.size,
                 self.transport_name, len(self.conns))

    # ---- set-up -------------------------------------------------------------------------
    def _agree_secret(self, info) -> bytes:
        if info is not None and info.secret:
            return info.secret
        if os.environ.get("PYCCL_JOB_SECRET"):
            return bytes.fromhex(os.environ["PYCCL_JOB_SECRET"])
        if self.rank == 0:
            self.store.set("secret", secrets.token_bytes(32))
        return self.store.get("secret", timeout=self.timeout)

    def _wait_ranks(self, prefix: str) -> list:
        keys = [f"{prefix}/{r}" for r in range(self.size)]
        try:
            self.store.wait(keys, timeout=self.timeout)
        except Timeout:
            present = self.store.check(keys)
            missing = [r for r, ok in enumerate(present) if not ok]
            raise Timeout(f"{self.tag}: rank {self.rank} waited {self.timeout:.0f}s for ranks "
                          f"{missing} to join (of {self.size}); did they start?") from None
        return [self.store.get(k, timeout=self.timeout) for k in keys]

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
        from . import tune
        return tune.measured_costs(next((p["tune"] for p in self.peer_info if p.get("tune")), {}))

    def _bind_host(self) -> str:
        return _env.socket_interface_address(getattr(self._root_store, "host", None))

    def _connect(self):
        """{peer: Connection}, each opened when a plan or call first needs it (shm: at once)."""
        from pyccl.transports.select import Connections
        ctx = SetupContext(self.rank, self.size, self._members, self.store, self._secret, self.tag,
                           self.timeout, self._bind_host(), {r: i for r, i in enumerate(self.peer_info)},
                           self._listener, lambda: self._broken is not None)
        conns = Connections(ctx, self.transport_name)
        self._transports = conns.transports
        return conns

    def _local_collectives(self):
        """Shared-memory collectives when every rank is on this host (see shm_collectives.py)."""
        if self.size == 1 or self.transport_name not in ("auto", "shm"):
            return None
        if len({i["host"] for i in self.peer_info}) != 1:
            return None
        try:
            from .engines.shm import ShmCollectives
        except ImportError:
            return None
        return ShmCollectives(self.rank, self.size, self.store, self.tag, self.timeout)

    def _cuda(self, name, async_op, sig, *args):
        """Collectives on CUDA buffers: ccl/engines/cuda/ (stream-ordered, see there)."""
        from .engines.cuda import submit
        return submit(self, name, async_op, sig, *args)

    # ---- execution ----------------------------------------------------------------------
    def _check_usable(self, what):
        if self._closed:
            raise PycclError(f"{what}: communicator {self.tag} is closed")
        if self._broken is not None:
            raise PeerFailure(f"{what}: communicator {self.tag} is broken by an earlier error "
                              f"({self._broken}); create a new one")

    def _submit(self, what: str, fn, async_op: bool, sig=None):
        """Run `fn(what)` in call order; sig (dtype, count, root, redop) feeds the flight
        recorder and PYCCL_CHECK."""
        self._check_usable(what)
        self._seq += 1
        op = what
        what = self._what(op, self._seq)
        entry = self.recorder.record(self._seq, op, sig or {})
        call = (op, sig) if sig is not None else None      # packed by _run, only where a plan runs
        if self.check and sig is not None:
            fn = self._checked(fn, op, sig)
        with self._submit_lock:
            if not async_op and self._inflight == 0:
                return self._execute(what, fn, entry, call)
            work = Work(what, self)
            self._inflight += 1
            self._queue.put((work, fn, entry, call))
            if self._thread is None:
                self._thread = threading.Thread(target=self._worker, name=f"pyccl-{self.tag}-r{self.rank}",
                                                daemon=True)
                self._thread.start()
        if async_op:
            return work
        work.wait()
        return work.result

    def _execute(self, what, fn, entry, call=None):
        with self._lock:
            if self._broken is not None:
                raise PeerFailure(f"{what}: communicator broken by an earlier error ({self._broken})")
            self._call = call            # (op, sig) of this call: what _run's messages carry
            self.recorder.start(entry)
            try:
                result = fn(what)
            except Exception as e:
                raise self._failed(e, entry) from None
            self.recorder.finish(entry)
            return result

    def _failed(self, e, entry):
        """After a collective raised: tell the peers, note it, break the communicator; returns
        the exception to raise. Validation happens before _submit, so anything raised during
        a collective left the peers mid-collective: no later call may pretend the byte streams
        are in step."""
        self._tell_peers(f"{type(e).__name__}: {e}")
        if isinstance(e, PeerFailure):
            e = PeerFailure(f"{e}{self._peer_reports()}")
        self.recorder.finish(entry, e, self.executor.where)
        self._broken = f"{type(e).__name__}: {e}"
        if os.environ.get("PYCCL_DUMP_ON_TIMEOUT"):
            path = self.recorder.dump(os.environ["PYCCL_DUMP_ON_TIMEOUT"])
            log.error("pyccl: flight recorder of rank %d written to %s", self.rank, path)
        if not isinstance(e, Timeout):
            # peers still waiting on us would only time out; closing tells them now.
            # After a timeout the peers are waiting too and will time out themselves,
            # each naming what it waited on, which is the better diagnosis.
            self.abort()
        return e

    def _what(self, op, seq):
        return f"{op} #{seq} on {self.tag} (rank {self.rank}/{self.size})"

    def _all_reduce_shm(self, x, op):
        """The common call, a synchronous all_reduce of a numpy array on one host, with
        _submit's bookkeeping (order, flight recorder, errors) but none of its generality:
        Python's share of an 8-byte all_reduce is most of its time (README, Measured).
        Returns False when the call is not of that kind (the general path runs it)."""
        code = _OP_BY_ID.get(id(op))
        dt = _FAST_DTYPES.get(x.dtype)
        if code is None or dt is None or not x.size or not x.flags.c_contiguous or not x.flags.writeable:
            return False
        local = self.local
        with self._submit_lock:
            if self._inflight or self._closed or self._broken is not None:
                return False
            self._seq += 1
            seq = self._seq
            entry = self.recorder.record(seq, "all_reduce", (dt[1], x.size, -1, op.name))
            with self._lock:
                self.recorder.start(entry)
                rc = local.all_reduce_raw(x, dt[0], code)
                if rc:
                    try:
                        local._fail(rc, self._what("all_reduce", seq), "all_reduce")
                    except Exception as e:  # noqa: BLE001 - re-raised after the bookkeeping
                        raise self._failed(e, entry) from None
                if op is AVG:
                    divide_into(x.reshape(-1), self.size)
                self.recorder.finish(entry)
        return True

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

    def _checked(self, fn, op, sig):
        """PYCCL_CHECK=1: compare (op, dtype, count, root, redop) of every rank before moving data."""
        def code(text):
            return zlib.crc32(str(text).encode())
        mine = np.array([code(op), code(sig.get("dtype")), sig.get("count", -1), sig.get("root", -1),
                         code(sig.get("redop"))], dtype=np.int64)
        plan = self._plan(("check", mine.size), lambda: ring_plans.all_gather(self.rank, self.ring, mine.size))

        def run(what):
            table = np.empty(mine.size * self.size, np.int64)
            self._run(what + " [PYCCL_CHECK]", plan, {"in": mine, "out": table}, call=0)
            rows = table.reshape(self.size, mine.size)
            fields = ("op", "dtype", "count", "root", "redop")
            for r in range(self.size):
                diff = [f for f, a, b in zip(fields, rows[r], mine) if a != b]
                if diff:
                    raise InvalidArgument(
                        f"{what}: PYCCL_CHECK found rank {r} calling with a different {', '.join(diff)} "
                        f"(this rank: {op} dtype={sig.get('dtype')} count={sig.get('count')} "
                        f"root={sig.get('root')} op={sig.get('redop')}; rank {r}'s count={rows[r][2]}, "
                        f"root={rows[r][3]})")
            return fn(what)
        return run

    def _worker(self):
        while True:
            item = self._queue.get()
            if item is None:
                return
            work, fn, entry, call = item
            try:
                work.result = self._execute(work.what, fn, entry, call)
                work._finish()
            except BaseException as e:  # handed to the caller through Work.wait()
                work._finish(e)
            finally:
                with self._submit_lock:
                    self._inflight -= 1

    def _plan(self, key, build):
        plan = self._plans.get(key)
        if plan is None:
            plan = self._plans[key] = build()
        return plan

    def _tuned(self, op, count, itemsize, nbytes, root=0):
        """(plan, chunk_bytes) for a tuned op: the tuner picks the algorithm from the cost model
        (PYCCL_ALGO forces one) among those that are one plan, the builder makes this rank's
        plan; cached per shape."""
        key = (op, count, itemsize, root)
        hit = self._plans.get(key)
        if hit is None:
            c = choose(op, nbytes, self.topology, self._costs, chunk_bytes=self._fixed_chunk, flat=True)
            plan = build_plan(op, c.algo, self.rank, self.topology, count, root,
                              chunk_elems=max(1, c.chunk_bytes // itemsize), inter=c.inter)
            hit = self._plans[key] = (plan, c.chunk_bytes)
        return hit

    def _local_for(self, op, nbytes):
        """The shared-memory collectives if they run this call whole (one host), else None."""
        return self.local if self.local is not None and self.local.wants(op, nbytes) else None

    def _engine_for(self, op, nbytes):
        """The engine that runs this call whole, else None (then a flat plan is tuned): on one
        host the shared-memory collectives; across hosts the composition of ccl/engines/composed.py
        when the tuner picks it ("composed": node-local engine, rail plans, node-local engine)."""
        if self.local is not None:
            return self._local_for(op, nbytes)
        if self.topology.nhosts < 2 or not applicable(op, "composed", self.topology):
            return None
        if op != "barrier" and choose(op, nbytes, self.topology, self._costs,
                                      chunk_bytes=self._fixed_chunk).algo != "composed":
            return None
        if self._hier is None:
            from .engines.composed import Hierarchy
            self._hier = Hierarchy(self)
        return self._hier

    def _run(self, what, plan, bufs, op=None, call=None):
        """Run a plan; its messages carry `call` (default: the call being executed, ccl/callsig.py)."""
        if call is None:
            op_sig = self._call
            call = 0 if op_sig is None else callsig.pack(
                op_sig[0], op_sig[1].get("dtype"), op_sig[1].get("count"), op_sig[1].get("root", -1),
                op_sig[1].get("redop"))
        if isinstance(plan, tuple):
            plan, chunk = plan
            self.executor.run(plan, bufs, op, what, chunk, call)
        else:
            self.executor.run(plan, bufs, op, what, None, call)

    # ---- validation helpers ----------------------------------------------------------------
    def _root(self, root, what):
        if not isinstance(root, (int, np.integer)) or not 0 <= root < self.size:
            raise InvalidArgument(f"{what}: root {root!r} is outside 0..{self.size - 1}")
        return int(root)

    def _reduce_args(self, x, op, what):
        buf = as_buffer(x, f"{what}: tensor", writable=True)
        op = as_op(op)
        check_op_dtype(op, buf.dtype, what)
        return buf, op

    def _average(self, arr, op):
        if op is AVG:
            divide_into(arr, self.size)

    # ---- collectives ------------------------------------------------------------------------
    def all_reduce(self, x, op=SUM, async_op=False):
        if self._fast and not async_op and type(x) is np.ndarray and self._all_reduce_shm(x, op):
            return None
        buf, op = self._reduce_args(x, op, "all_reduce")
        if self.reproducible and _repro.takes(buf.dtype, op):
            return _repro.all_reduce(self, buf, op, async_op)
        if buf.device != "cpu":
            return self._cuda("all_reduce", async_op, _sig(buf, -1, op), buf, op)
        local = self._engine_for("all_reduce", buf.nbytes)
        plan = None if local else self._tuned("all_reduce", buf.count, buf.itemsize, buf.nbytes)

        def fn(what):
            if local is not None:
                local.all_reduce(buf.array, op, what)
            else:
                self._run(what, plan, {"in": buf.array, "out": buf.array}, op)
            self._average(buf.array, op)
        return self._submit("all_reduce", fn, async_op, _sig(buf, -1, op))

    def reduce(self, x, root=0, op=SUM, async_op=False):
        buf, op = self._reduce_args(x, op, "reduce")
        root = self._root(root, "reduce")
        if self.reproducible and _repro.takes(buf.dtype, op):
            return _repro.reduce(self, buf, root, op, async_op)
        if buf.device != "cpu":
            return self._cuda("reduce", async_op, _sig(buf, root, op), buf, root, op)
        local = self._engine_for("reduce", buf.nbytes)
        plan = None if local else self._tuned("reduce", buf.count, buf.itemsize, buf.nbytes, root)

        def fn(what):
            if local is not None:
                local.reduce(buf.array, root, op, what)
            else:
                self._run(what, plan, {"in": buf.array, "out": buf.array}, op)
            if self.rank == root:
                self._average(buf.array, op)
        return self._submit("reduce", fn, async_op, _sig(buf, root, op))

    def broadcast(self, x, root=0, async_op=False):
        buf = as_buffer(x, "broadcast: tensor", writable=True)
        root = self._root(root, "broadcast")
        if buf.device != "cpu":
            return self._cuda("broadcast", async_op, _sig(buf, root), buf, root)
        local = self._engine_for("broadcast", buf.nbytes)
        if local is not None:
            return self._submit("broadcast", lambda what: local.broadcast(buf.array, root, what), async_op,
                                _sig(buf, root))
        plan = self._tuned("broadcast", buf.count, buf.itemsize, buf.nbytes, root)
        return self._submit("broadcast", lambda what: self._run(what, plan, {"out": buf.array}), async_op,
                            _sig(buf, root))

    def all_gather(self, out, inp, async_op=False):
        o = as_buffer(out, "all_gather: output", writable=True)
        i = as_buffer(inp, "all_gather: input")
        same_dtype(o, i, "all_gather")
        if o.count != i.count * self.size:
            raise InvalidArgument(f"all_gather: output holds {o.count} elements, expected size "
                                  f"{self.size} x input {i.count} = {i.count * self.size}")
        if o.device != "cpu" or i.device != "cpu":
            return self._cuda("all_gather", async_op, _sig(i), o, i)
        local = self._engine_for("all_gather", o.nbytes)
        if local is not None:
            return self._submit("all_gather", lambda what: local.all_gather(o.array, i.array, what), async_op,
                                _sig(i))
        plan = self._tuned("all_gather", i.count, i.itemsize, o.nbytes)
        return self._submit("all_gather", lambda what: self._run(what, plan, {"in": i.array, "out": o.array}),
                            async_op, _sig(i))

    def reduce_scatter(self, out, inp, op=SUM, async_op=False):
        o, op = self._reduce_args(out, op, "reduce_scatter")
        i = as_buffer(inp, "reduce_scatter: input")
        same_dtype(o, i, "reduce_scatter")
        if i.count != o.count * self.size:
            raise InvalidArgument(f"reduce_scatter: input holds {i.count} elements, expected size "
                                  f"{self.size} x output {o.count} = {o.count * self.size}")
        if self.reproducible and _repro.takes(o.dtype, op) and o.device == i.device:
            return _repro.reduce_scatter(self, o, i, op, async_op)
        if o.device != "cpu" or i.device != "cpu":
            return self._cuda("reduce_scatter", async_op, _sig(o, -1, op), o, i, op)
        local = self._engine_for("reduce_scatter", i.nbytes)
        plan = None if local else self._tuned("reduce_scatter", o.count, o.itemsize, i.nbytes)

        def fn(what):
            if local is not None:
                local.reduce_scatter(o.array, i.array, op, what)
            else:
                self._run(what, plan, {"in": i.array, "out": o.array}, op)
            self._average(o.array, op)
        return self._submit("reduce_scatter", fn, async_op, _sig(o, -1, op))

    def all_to_all(self, out, inp, out_splits=None, in_splits=None, async_op=False):
        """Rank r's piece j of `inp` lands in rank j's piece r of `out`. Splits are element
        counts per rank (lists, or CUDA int tensors for CUDA buffers); every rank passes them
        or none does, as MPI's Alltoallv and Alltoall: None means equal pieces."""
        o = as_buffer(out, "all_to_all: output", writable=True)
        i = as_buffer(inp, "all_to_all: input")
        same_dtype(o, i, "all_to_all")
        if is_cuda(in_splits) or is_cuda(out_splits):      # counts on the GPU: no device-to-host copy
            return self._cuda("all_to_all_dev", async_op, _sig(i), o, i, out_splits, in_splits)
        # Equal pieces take the engines' faster equal-split path only when no splits are given
        # (MPI's Alltoall vs Alltoallv): a rank sees only its own splits, and equal ones on one
        # rank say nothing about its peers', so deciding from them could split the ranks
        # between two paths (a hang, found by test_uneven_all_to_all_p2p_barrier).
        even = in_splits is None and out_splits is None
        in_splits = self._splits_of(in_splits, i.count, "input", "in_splits")
        out_splits = self._splits_of(out_splits, o.count, "output", "out_splits")
        if o.device != "cpu" or i.device != "cpu":
            return self._cuda("all_to_all", async_op, _sig(i), o, i, out_splits, in_splits, even)
        if even and self.local is not None and self.local.wants("all_to_all", i.nbytes):
            return self._submit("all_to_all", lambda what: self.local.all_to_all(o.array, i.array, what), async_op,
                                _sig(i))
        plan = self._plan(("all_to_all", in_splits, out_splits),
                          lambda: direct.all_to_all(self.rank, self.size, in_splits, out_splits))
        return self._submit("all_to_all", lambda what: self._run(what, plan, {"in": i.array, "out": o.array}),
                            async_op, _sig(i))

    def _splits_of(self, splits, count, name, argname):
        if splits is None:
            if count % self.size:
                raise InvalidArgument(f"all_to_all: {name} holds {count} elements, not divisible by "
                                      f"size {self.size}; pass {argname}")
            return (count // self.size,) * self.size
        splits = tuple(int(s) for s in splits)
        if len(splits) != self.size or any(s < 0 for s in splits):
            raise InvalidArgument(f"all_to_all: {argname} must be {self.size} non-negative counts, got {splits}")
        if sum(splits) != count:
            raise InvalidArgument(f"all_to_all: {argname} add up to {sum(splits)} but the {name} "
                                  f"holds {count} elements")
        return splits

    def gather(self, out, inp, root=0, async_op=False):
        root = self._root(root, "gather")
        i = as_buffer(inp, "gather: input")
        bufs = {"in": i.array}
        if self.rank == root:
            o = as_buffer(out, "gather: output", writable=True)
            same_dtype(o, i, "gather")
            if o.count != i.count * self.size:
                raise InvalidArgument(f"gather: output at the root holds {o.count} elements, "
                                      f"expected {self.size} x {i.count}")
            bufs["out"] = o.array
        if i.device != "cpu" or (self.rank == root and o.device != "cpu"):
            return self._cuda("gather", async_op, _sig(i, root), o if self.rank == root else None, i, root)
        plan = self._plan(("gather", i.count, root), lambda: direct.gather(self.rank, self.size, i.count, root))
        return self._submit("gather", lambda what: self._run(what, plan, bufs), async_op, _sig(i, root))

    def scatter(self, out, inp, root=0, async_op=False):
        root = self._root(root, "scatter")
        o = as_buffer(out, "scatter: output", writable=True)
        bufs = {"out": o.array}
        if self.rank == root:
            i = as_buffer(inp, "scatter: input")
            same_dtype(o, i, "scatter")
            if i.count != o.count * self.size:
                raise InvalidArgument(f"scatter: input at the root holds {i.count} elements, "
                                      f"expected {self.size} x {o.count}")
            bufs["in"] = i.array
        if o.device != "cpu" or (self.rank == root and i.device != "cpu"):
            return self._cuda("scatter", async_op, _sig(o, root), o, i if self.rank == root else None, root)
        plan = self._plan(("scatter", o.count, root), lambda: direct.scatter(self.rank, self.size, o.count, root))
        return self._submit("scatter", lambda what: self._run(what, plan, bufs), async_op, _sig(o, root))

    def _peer(self, peer, what):
        if not isinstance(peer, (int, np.integer)) or not 0 <= peer < self.size or peer == self.rank:
            raise InvalidArgument(f"{what}: peer {peer!r} must be another rank in 0..{self.size - 1} "
                                  f"(this is rank {self.rank})")
        return int(peer)

    def send(self, x, peer, async_op=False):
        peer = self._peer(peer, "send")
        b = as_buffer(x, "send: tensor")
        plan = direct.send_recv(self.rank, self.size, b.count, peer, True)
        return self._submit("send", lambda what: self._run(what, plan, {"in": b.array}), async_op)

    def recv(self, x, peer, async_op=False):
        peer = self._peer(peer, "recv")
        b = as_buffer(x, "recv: tensor", writable=True)
        plan = direct.send_recv(self.rank, self.size, b.count, peer, False)
        return self._submit("recv", lambda what: self._run(what, plan, {"out": b.array}), async_op)

    def barrier(self, async_op=False):
        local = self._engine_for("barrier", 0)
        if local is not None:
            return self._submit("barrier", lambda what: local.barrier(what), async_op, {})
        plan = self._plan(("barrier",), lambda: direct.barrier(self.rank, self.size))
        return self._submit("barrier", lambda what: self._run(what, plan, {}), async_op, {})

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
        if self._broken is None:
            self._broken = "aborted by comm.abort()"
        if self.cuda is not None:
            self.cuda.abort()
        if self.local is not None:
            self.local.abort()
        if self._hier is not None:
            self._hier.abort()
        for c in self.conns.values():
            c.close()

    def close(self):
        if self._closed:
            return
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join(timeout=self.timeout)
            self._thread = None
        self._closed = True
        if self.local is not None:
            self.local.close()
        if self._hier is not None:
            self._hier.close()
        if self.cuda is not None:
            self.cuda.close()
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


def _sig(buf, root=-1, op=None) -> dict:
    """What every rank must agree on for one collective (flight recorder, PYCCL_CHECK)."""
    return {"dtype": buf.dtype, "count": buf.count, "root": root, "redop": op.name if op is not None else None}


def init(timeout=None, **kwargs) -> Communicator:
    """The world communicator from the environment (pyccl.launch, torchrun, mpirun, Slurm)."""
    return Communicator(timeout=timeout, **kwargs)


