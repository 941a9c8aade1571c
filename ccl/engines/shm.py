"""Collectives inside one shared-memory segment, for communicators whose ranks share a host.

Why not the executor over the shm transport: a plan moves every byte through a ring, one
message per chunk and peer, driven from Python.  Here each collective is one C call
(native/shm_coll.c and shm_coll_ops.c, GIL released): every rank writes its data once into its own area of a
node-wide segment, publishes a step counter, and every reader copies (or reduces) straight
out of the writers' areas.  No per-message Python, no per-pair rings.

- all_reduce, small (<= ``PYCCL_SHM_SMALL_BYTES``): one-shot.  Every rank copies its input
  into its area, one handshake, every rank reduces all areas in rank order.
- all_reduce, large: pipelined reduce-scatter + all-gather in steps of nranks parts of
  ``PYCCL_SHM_CHUNK_BYTES``; every rank reduces one part per step, everybody gathers it.
- reduce_scatter, all_gather, broadcast, all_to_all: every rank writes its part once, every
  reader copies it out once, step by step, double-buffered.
- barrier: one handshake.
- broadcast from 32 KiB (``DEFAULT_CMA_BROADCAST_BYTES``) while ``PYCCL_SHM_CMA_BYTES`` is unset,
  where every rank has a core (rank 0's CPU affinity counts at least nranks CPUs): the copies
  shared (native/shm_cma.c, cma_broadcast; :func:`broadcast_parts` is the twin).  The ranks swap
  buffer addresses; the root writes part k-1 into the reader k places after it
  (process_vm_writev) while each reader reads the other parts from the root's buffer
  (process_vm_readv), so every rank copies (P-1)/P of the bytes and the root's core works too,
  where the segment's broadcast copies every byte in (root) and out (each reader).  Measured
  on the 2-core VM, 2 ranks, same processes, rounds alternated: 1.1-5x faster at 8 KiB-128 MiB
  (bench/JOURNAL.md, 2026-12-07, the shared broadcast); 4 ranks on the 2 cores: 0.7-1.0x, so
  not there.
- all_reduce from 64 MiB (``DEFAULT_CMA_CROWD_BYTES``) while ``PYCCL_SHM_CMA_BYTES`` is unset,
  where ranks outnumber rank 0's CPUs: the single-copy all_reduce below.  With more ranks than
  cores the bytes every rank moves add up on the cores, and it moves fewer than the segment's
  (no copy in) with 3 handshakes instead of two per step: 4 ranks on the 2-core VM, 128 MiB,
  segment/single-copy time 0.90-1.59 over ten runs (median 1.27), 64 MiB 0.99-1.20, 16 MiB
  0.84-1.28 (so not below 64 MiB).
- all_reduce, reduce_scatter, all_gather, broadcast of at least ``PYCCL_SHM_CMA_BYTES`` per
  rank (unset: only the two cases above; 0: never): single copy (native/shm_cma.c).  The ranks swap buffer addresses through the
  segment and read each other's buffers in place with Linux cross-memory attach
  (process_vm_readv), so a byte crosses memory once, not into the segment and out again.
  all_reduce is a reduce-scatter (rank r reduces slice r from every peer's input) and an
  all-gather (rank r reads slice q of peer q's output), three handshakes in all.  A probe at
  set-up reads a word of every peer; where the kernel refuses (ptrace restrictions, other
  pid namespaces) every rank keeps to the segment path and PYCCL_DEBUG=INFO says why.
  Off by default for these ops: it did not pay where it was measured (bench/JOURNAL.md, 2026-12-07, issue 33;
  bench/single_copy.py).  process_vm_readv is a copy too (so all_reduce keeps two copies and a
  reduction per rank, as the segment path does), and on the 2-core VM (32 MiB L3) it ran 2-4x
  slower than memcpy while the data sits in cache (9-28 against 45-48 GB/s at 1-4 MiB) and no
  faster beyond (6-13 against 10-12 GB/s at 128 MiB).  Same processes, rounds alternated:
  2 ranks, all_gather and reduce_scatter slower at every size (segment/single 0.42-0.98),
  all_reduce and broadcast from 0.53x to 1.23x; 4 ranks on 2 cores mixed (0.43-1.63), no op
  or size faster in every run.
Reductions always run in rank order (in_0 op in_1 op ...), so every rank gets the same bits,
and they equal :func:`reduce_in_order`, the numpy twin the tests compare against.

The segment: created by rank 0, named ``/pyccl-<uid>-<pid>-<tag>.coll-<random>`` through the
store, mapped by the others and unlinked by rank 0 once all have it, so a crash leaves nothing
behind.  Rank 0 also writes the configuration into it, so every rank decides `wants()` alike
even when their environments differ.

Waits spin, then yield, then sleep; each is bounded by the communicator's timeout and watches
the awaited process: a dead peer raises PeerFailure naming it, a timeout names the ranks that
have not arrived and the step.  Either way the segment is marked failed, so the other ranks
stop waiting too.

all_gather and all_to_all outputs of at least ``PYCCL_SHM_NT_BYTES`` are written with
streaming (non-temporal) stores: bigger than the caches, they would only evict the shared
buffers the next steps reuse and cost a read-for-ownership of every destination line.  So are
broadcasts of that size where ranks outnumber the cores (the readers' copies share the cores;
4 ranks on the 2-core VM: 128 MiB 1.13-1.37x in three runs, 64 MiB 1.29x, 16 MiB 0.93-1.36x).

Environment (read on rank 0, agreed through the segment): ``PYCCL_SHM_COLLECTIVES`` (1; 0
turns this path off, the executor then runs every collective over the transports),
``PYCCL_SHM_SMALL_BYTES`` (65536), ``PYCCL_SHM_CHUNK_BYTES`` (524288),
``PYCCL_SHM_NT_BYTES`` (8 MiB; 0: never).

Stores into the shared areas (the copies the peers read, the reduced parts, the ring slots):
``PYCCL_SHM_STREAM`` (per process) ``auto`` (default): both kinds timed per (op, size) and the
cheaper used (native/shm_coll_ops.c, choose_kind); 0 plain, 1 streaming (non-temporal). On this VM a
plain store to a line the peer just read swung between ~40 and ~2.5 GB/s with the host's
placement of the vCPUs, streaming stores stayed at 14-27 GB/s; collectives with plain stores ran
3-5x slower in the slow minutes, with streaming stores up to 2x slower in the fast ones.
"""
import logging
import os

import numpy as np


from pyccl.topology.cost import SHM_ENGINE

from .. import settings
from .. import callsig
from ..dtypes import AVG, as_op
from ..errors import PeerFailure, Timeout, TransportError
from ..reduce import _DTYPE_CODE, _OP_BY_ID, _OP_CODE, CODE_BY_NAME, divide_into, reduce_numpy
from ..tuner import choose
from .base import EngineBase

try:
    from .._native import ffi, lib
except ImportError:
    lib = None
if lib is None or not hasattr(lib, "pyccl_coll_attach"):
    # the communicator treats ImportError as "no shared-memory collectives here"
    raise ImportError("pyccl._native is not built with shared-memory collectives")

from pyccl.transports.shm import Segment, clean_leftovers, pid_namespace, segment_name  # noqa: E402

log = logging.getLogger("pyccl")

_TIMEOUT, _PEER_DEAD, _PEER_ABORT, _SIZE_MISMATCH, _ABORTED = 1, 2, 3, 4, 7   # native/shm.h
DEFAULT_SMALL_BYTES = 64 << 10
DEFAULT_CHUNK_BYTES = 512 << 10
DEFAULT_NT_BYTES = 8 << 20
DEFAULT_CMA_BYTES = 0   # off: see the module docstring
DEFAULT_CMA_BROADCAST_BYTES = 32 << 10  # broadcast's shared single copy, where every rank has a core
DEFAULT_CMA_CROWD_BYTES = 64 << 20      # all_reduce's single copy, where ranks outnumber the cores
SMALL_BOUND = 64 << 10  # ShmEngine.short keeps the pointers of the last two Calls up to this size
_CMA_FAILED = 9                                   # native/shm.h
_ENABLED = 1
_from_buffer = ffi.from_buffer

#: What this path runs (wants() is True for these whenever the segment is up).
OPS = frozenset({"all_reduce", "reduce", "reduce_scatter", "all_gather", "broadcast", "all_to_all",
                 "barrier"})


def _env_bytes(name, default):
    """A byte size from the registry (pyccl.settings); `default` where it declares none."""
    v = settings.get(name)
    return default if v is None else v


def layout(nranks: int, small: int, part: int) -> tuple:
    """(half, part, small) bytes: a rank's area holds two halves, each big enough for a step of
    the pipelined all-reduce (nranks parts) and a one-shot message.  Parts shrink for large
    node counts so the segment stays below ~256 MiB."""
    part = max(4096, part // 128 * 128)
    while part > 4096 and 2 * nranks * nranks * part > (256 << 20):
        part //= 2
    small = max(0, small)
    half = max(nranks * part, small, nranks * 128, 4096)
    half = -(-half // 4096) * 4096
    return half, part, small


_OPNAMES = {1: "all_reduce", 2: "reduce", 3: "reduce_scatter", 4: "all_gather", 5: "broadcast",
             6: "all_to_all", 7: "barrier"}
_DTYPE_NAMES = {code: name for name, code in CODE_BY_NAME.items()}
_REDOP_NAMES = {code: op.name for op, code in _OP_CODE.items() if op.name != "AVG"}
_ITEMSIZE = {code: 2 if name == "bfloat16" else np.dtype(name).itemsize for name, code in CODE_BY_NAME.items()}


def _fields(sig, nbytes) -> dict:
    """A call signature (native/shm.h: what | op+1 << 4 | dtype+1 << 8 | root+1 << 16, and the
    bytes per rank) as ccl/callsig.py's fields; count in elements where the dtype is known,
    else in bytes."""
    what, op, dtype, root = sig & 15, (sig >> 4 & 15) - 1, (sig >> 8 & 255) - 1, (sig >> 16) - 1
    f = {"collective": _OPNAMES.get(what, f"collective {what}"), "op": None, "dtype": None,
         "root": root if root >= 0 else None, "count": nbytes}
    if dtype >= 0:
        f["dtype"] = _DTYPE_NAMES.get(dtype, f"dtype {dtype}")
        f["count"] = nbytes // _ITEMSIZE.get(dtype, 1)
    if op >= 0:
        f["op"] = _REDOP_NAMES.get(op, f"op {op}")
    return f


def _mismatch(peer, peer_sig, peer_bytes, sig, nbytes) -> str:
    """callsig.mismatch() for two shm call signatures; counts of dtype-less calls are bytes."""
    theirs, mine = _fields(peer_sig, peer_bytes), _fields(sig, nbytes)
    unit = "bytes" if theirs["dtype"] is None and mine["dtype"] is None else ""
    if (theirs["dtype"] is None) != (mine["dtype"] is None):    # different collectives: bytes
        theirs["count"], mine["count"] = peer_bytes, nbytes
        theirs["dtype"] = mine["dtype"] = None
        unit = "bytes"
    return callsig.mismatch(peer, theirs, mine, unit)


def reduce_in_order(inputs, op):
    """numpy twin of the C reduction order: ((in_0 op in_1) op in_2) op ... (AVG as SUM)."""
    out = inputs[0].copy()
    for x in inputs[1:]:
        reduce_numpy(out, out, x, op)
    return out


def single_copy_slices(count: int, nranks: int) -> list:
    """The element ranges [lo, hi) each rank reduces in a single-copy all_reduce (shm_cma.c)."""
    return [(count * q // nranks, count * (q + 1) // nranks) for q in range(nranks)]


def single_copy_twin(inputs, op):
    """numpy twin of cma_all_reduce: every rank's slice reduced in rank order, concatenated."""
    n, P = inputs[0].size, len(inputs)
    parts = [reduce_in_order([x[lo:hi] for x in inputs], op) for lo, hi in single_copy_slices(n, P)]
    return np.concatenate(parts) if parts else inputs[0].copy()


def broadcast_parts(nbytes: int, nranks: int, root: int) -> list:
    """Python twin of cma_broadcast's split (shm_cma.c): (copier, reader, lo, hi) for every byte
    range a reader gets.  Part j is [nbytes*j//P, nbytes*(j+1)//P) rounded down to 64 bytes; the
    root writes part k-1 into the reader k places after it, each reader reads the other parts."""
    def at(j):
        return nbytes if j >= nranks else nbytes * j // nranks // 64 * 64
    parts = []
    for k in range(1, nranks):
        q = (root + k) % nranks
        lo, hi = at(k - 1), at(k)
        if hi > lo:
            parts.append((root, q, lo, hi))
        if lo:
            parts.append((q, q, 0, lo))
        if nbytes > hi:
            parts.append((q, q, hi, nbytes))
    return parts


def _cma_why(errno_code) -> str:
    """Why the kernel refused cross-memory attach, for the INFO line."""
    import errno
    if errno_code == errno.EPERM:
        return ("EPERM: ptrace access refused (kernel.yama.ptrace_scope >= 1 between sibling processes, "
                "a container without CAP_SYS_PTRACE, or a non-dumpable process)")
    if errno_code == errno.ESRCH:
        return "ESRCH: the peer runs in another pid namespace"
    if errno_code == errno.ENOSYS:
        return "ENOSYS: the kernel has no process_vm_readv"
    return f"{errno.errorcode.get(errno_code, errno_code)}: {os.strerror(errno_code)}"


class ShmCollectives:
    """The shared-memory collectives of one communicator (every rank on this host)."""

    def __init__(self, rank, size, store, tag, timeout, ranks=None, host=""):
        self.rank, self.size, self.tag, self.timeout = rank, size, tag, float(timeout)
        # how errors name local rank i: the communicator's rank behind it (and the host), so a
        # composed phase's errors speak of the ranks the user knows
        self.ranks = list(ranks) if ranks is not None else list(range(size))
        self.host = f" of host {host}" if host else ""
        self._c = None
        self._seg = None
        self.enabled = False
        self.single_copy_bytes = self.single_copy_broadcast_bytes = self.single_copy_crowd_bytes = 0
        clean_leftovers()
        name = self._create_or_lookup(store)
        if not name:
            return
        ok = b"1"
        try:
            if self._seg is None:
                self._seg = Segment(name)
            err = ffi.new("int *")
            c = lib.pyccl_coll_attach(self._seg.base, self._seg.size, rank, size, os.getpid(),
                                      pid_namespace(), err)
            if c == ffi.NULL:
                raise TransportError(f"segment {name} does not fit this communicator ({os.strerror(err[0])})")
            self._c = c
        except TransportError as e:
            ok = f"0{e}".encode()
        try:
            # all-agree: if any rank failed to map it, nobody uses this path
            store.set(f"shmcoll/ok/{rank}", ok)
            keys = [f"shmcoll/ok/{r}" for r in range(size)]
            try:
                store.wait(keys, timeout=self.timeout)
            except Timeout:
                missing = [r for r, have in enumerate(store.check(keys)) if not have]
                raise Timeout(f"{tag}: rank {rank} waited {self.timeout:.0f}s for ranks {missing} to map "
                              f"the shared-memory segment {name}") from None
            values = store.multi_get(keys, self.timeout) if hasattr(store, "multi_get") else \
                [store.get(k, timeout=self.timeout) for k in keys]      # one request, not one per rank
            bad = [(r, v[1:].decode(errors="replace")) for r, v in enumerate(values) if v[:1] != b"1"]
        except BaseException:
            self.close()
            raise
        finally:
            if self._seg is not None:
                self._seg.unlink()     # every rank has it mapped (or gave up): drop the name
        if bad:
            log.warning("%s: shared-memory collectives off: %s", tag,
                        "; ".join(f"rank {r}: {why}" for r, why in bad))
            self.close()
            return
        self.enabled = True
        c = self._c
        self._probe_single_copy(tag, rank)
        stream = settings.get("PYCCL_SHM_STREAM")
        lib.pyccl_share_force({"0": 0, "1": 1}.get(stream, -1))
        log.info("%s rank %d: shm collectives on (half %d B, part %d B, one-shot <= %d B)",
                 tag, rank, c.half_bytes, c.part_bytes, c.small_bytes)

    def _probe_single_copy(self, tag, rank):
        """Collective: may every rank read every peer's memory (pyccl_coll_cma_probe)?  Rank 0's
        PYCCL_SHM_CMA_BYTES is the threshold on every rank."""
        c = self._c
        every = bcast = crowd = _env_bytes("PYCCL_SHM_CMA_BYTES", DEFAULT_CMA_BYTES)
        if not settings.is_set("PYCCL_SHM_CMA_BYTES"):
            bcast, crowd = DEFAULT_CMA_BROADCAST_BYTES, DEFAULT_CMA_CROWD_BYTES
        rc = lib.pyccl_coll_cma_probe(c, every, bcast, crowd, self.timeout)
        if rc:
            self.enabled = False
            try:
                self._fail(rc, f"{tag}: set-up", "single-copy probe")
            finally:
                self.close()
        self.single_copy_bytes = int(c.cma_bytes)
        self.single_copy_broadcast_bytes = int(c.cma_bcast_bytes)
        self.single_copy_crowd_bytes = int(c.cma_crowd_bytes)
        if c.cma_errno:
            log.info("%s rank %d: single-copy collectives off, large messages go through the segment: rank %d "
                     "cannot read rank %d's memory with process_vm_readv (%s)", tag, rank, self.ranks[c.cma_rank],
                     self.ranks[c.cma_peer] if c.cma_peer >= 0 else -1, _cma_why(c.cma_errno))
        elif self.single_copy_bytes:
            log.info("%s rank %d: single-copy collectives (cross-memory attach) from %d B per rank", tag, rank,
                     self.single_copy_bytes)
        elif self.single_copy_broadcast_bytes:
            log.info("%s rank %d: broadcast from %d B shares its copies through cross-memory attach", tag, rank,
                     self.single_copy_broadcast_bytes)
        elif self.single_copy_crowd_bytes:
            log.info("%s rank %d: ranks outnumber the cores: all_reduce from %d B through cross-memory attach", tag,
                     rank, self.single_copy_crowd_bytes)

    def _create_or_lookup(self, store) -> str:
        """Rank 0 makes and formats the segment and publishes its name ('' = path off)."""
        if self.rank != 0:
            return store.get("shmcoll/name", timeout=self.timeout).decode()
        name = ""
        if settings.get("PYCCL_SHM_COLLECTIVES"):
            half, part, small = layout(self.size, _env_bytes("PYCCL_SHM_SMALL_BYTES", DEFAULT_SMALL_BYTES),
                                       _env_bytes("PYCCL_SHM_CHUNK_BYTES", DEFAULT_CHUNK_BYTES))
            nbytes = lib.pyccl_coll_bytes(self.size, half)
            try:
                self._seg = Segment(segment_name(self.tag, "coll"), nbytes, create=True)
                rc = lib.pyccl_coll_format(self._seg.base, self._seg.size, self.size, half, part, small,
                                           _env_bytes("PYCCL_SHM_NT_BYTES", DEFAULT_NT_BYTES), _ENABLED)
                if rc:
                    raise TransportError(f"cannot format segment: {os.strerror(rc)}")
                name = self._seg.name
            except TransportError as e:
                log.warning("%s: shared-memory collectives off: %s", self.tag, e)
                if self._seg is not None:
                    self._seg.close()
                    self._seg = None
        store.set("shmcoll/name", name.encode())
        return name

    # ---- the decision -------------------------------------------------------------------
    def wants(self, opname: str, nbytes: int) -> bool:
        """Whether this path runs `opname` of `nbytes`; the same answer on every rank (the
        configuration comes from rank 0 through the segment)."""
        return self.enabled and opname in OPS

    # ---- errors -----------------------------------------------------------------------------
    def _fail(self, rc, what, opname):
        c = self._c
        r, step = c.err_rank, c.err_step
        where = f"shm {opname} step {step}" if step >= 0 else f"shm {opname} (before its first step)"
        g = self.ranks
        name = [f"rank {q}" for q in g]
        me = f"rank {g[self.rank]}{self.host}"
        if rc == _ABORTED:
            raise PeerFailure(f"{what}: comm.abort() was called on {me} while it was in {where}")
        if rc == _PEER_DEAD:
            raise PeerFailure(f"{what}: {name[r]} (pid {lib.pyccl_coll_pid(c, r)}) died; {me} "
                              f"was waiting for it in {where}")
        if rc == _CMA_FAILED:
            raise TransportError(f"{what}: {me} could not read {name[r]}'s buffer in {where} "
                                 f"(process_vm_readv: {os.strerror(c.err_cause)})")
        if rc == _SIZE_MISMATCH:
            raise TransportError(f"{what}: " + _mismatch(g[r], c.err_peer_what, c.err_peer_bytes, c.sig_what,
                                                         c.sig_bytes))
        if rc == _PEER_ABORT:
            why = {_SIZE_MISMATCH: "found a call mismatch between the ranks' calls",
                   _TIMEOUT: "timed out", _PEER_DEAD: "saw a rank die",
                   _CMA_FAILED: "could not read a peer's buffer"}.get(c.err_cause, "failed")
            cls = TransportError if c.err_cause == _SIZE_MISMATCH else PeerFailure
            raise cls(f"{what}: {name[r]} {why} and gave up the shared-memory collectives of "
                      f"{self.tag}; {me} was in {where}")
        if rc == _TIMEOUT:
            target = c.err_target
            behind = [g[q] for q in range(self.size)
                      if q != self.rank and lib.pyccl_coll_counter(c, q) < target]
            raise Timeout(f"{what}: {me} timed out after {self.timeout:.0f}s in {where}: "
                          f"ranks {behind or [g[r]]} have not arrived ({name[r]} is at step counter "
                          f"{c.err_have}, needed {target})")
        raise TransportError(f"{what}: shm {opname} failed with code {rc}")

    def abort(self):
        """comm.abort(): every wait of this rank (any thread) and of the peers ends now."""
        if self._c is not None:
            lib.pyccl_coll_abort(self._c)

    def _check(self, what):
        if self._c is None:
            raise TransportError(f"{what}: shared-memory collectives of {self.tag} are closed")

    # ---- the collectives ---------------------------------------------------------------
    def all_reduce(self, arr, op, what):
        """In place, every rank gets in_0 op in_1 op ... (AVG as SUM; the caller divides)."""
        n = arr.size
        c = self._c
        if n == 0 or c is None:
            return self._check(what)
        opc = _OP_BY_ID.get(id(op))
        if opc is None:
            opc = _OP_CODE[as_op(op)]
        rc = self.all_reduce_raw(arr, _DTYPE_CODE[arr.dtype], opc)
        if rc:
            self._fail(rc, what, "all_reduce")

    def all_reduce_raw(self, arr, dtype_code, op_code) -> int:
        """all_reduce in place with the codes already looked up (the communicator's short
        path); returns the C core's code (0: done; else pass it to _fail)."""
        p = _from_buffer(arr)
        return lib.pyccl_coll_all_reduce(self._c, p, p, arr.size, dtype_code, op_code, -1, self.timeout)

    def reduce(self, arr, root, op, what):
        """In place at the root; other ranks' `arr` is left unchanged."""
        self._check(what)
        n = arr.size
        if n == 0:
            return
        p = _from_buffer(arr)
        rc = lib.pyccl_coll_all_reduce(self._c, p, p, n, _DTYPE_CODE[arr.dtype], _OP_CODE[as_op(op)],
                                       int(root), self.timeout)
        if rc:
            self._fail(rc, what, "reduce")

    def reduce_scatter(self, out, inp, op, what):
        """out (n) = block `rank` of the reduction of every rank's inp (size * n)."""
        self._check(what)
        if inp.size != out.size * self.size or inp.dtype != out.dtype:
            raise TransportError(f"{what}: reduce_scatter needs inp of {self.size} x {out.size} {out.dtype}")
        if out.size == 0:
            return
        rc = lib.pyccl_coll_reduce_scatter(self._c, _from_buffer(out), _from_buffer(inp), out.size,
                                           _DTYPE_CODE[out.dtype], _OP_CODE[as_op(op)], self.timeout)
        if rc:
            self._fail(rc, what, "reduce_scatter")

    def all_gather(self, out, inp, what):
        self._check(what)
        if out.nbytes != inp.nbytes * self.size:
            raise TransportError(f"{what}: all_gather needs out of {self.size} x {inp.nbytes} bytes")
        if inp.nbytes == 0:
            return
        rc = lib.pyccl_coll_all_gather(self._c, _from_buffer(out), _from_buffer(inp), inp.nbytes, self.timeout)
        if rc:
            self._fail(rc, what, "all_gather")

    def broadcast(self, arr, root, what):
        self._check(what)
        if arr.nbytes == 0:
            return
        rc = lib.pyccl_coll_broadcast(self._c, _from_buffer(arr), arr.nbytes, int(root), self.timeout)
        if rc:
            self._fail(rc, what, "broadcast")

    def all_to_all(self, out, inp, what):
        """Equal splits: block j of inp goes to rank j; block i of out comes from rank i."""
        self._check(what)
        if out.nbytes != inp.nbytes or inp.nbytes % self.size:
            raise TransportError(f"{what}: all_to_all needs equal in/out sizes divisible by {self.size}")
        if inp.nbytes == 0:
            return
        rc = lib.pyccl_coll_all_to_all(self._c, _from_buffer(out), _from_buffer(inp),
                                       inp.nbytes // self.size, self.timeout)
        if rc:
            self._fail(rc, what, "all_to_all")

    def barrier(self, what):
        self._check(what)
        rc = lib.pyccl_coll_barrier(self._c, self.timeout)
        if rc:
            self._fail(rc, what, "barrier")

    def close(self):
        """Unmap; the name was unlinked at set-up.  Peers still inside a collective fail on
        their timeout or see this rank's exit."""
        self.enabled = False
        if self._c is not None:
            lib.pyccl_coll_free(self._c)
            self._c = None
        if self._seg is not None:
            self._seg.close()
            self._seg = None


class ShmPricing(EngineBase):
    """What the shm engine runs and its price, apart from its shared memory (so the plan CLI
    can price it for a machine it is not on).

    Priced with the model's node-local engine entry (topology/cost.py SHM_ENGINE, which
    `python -m pyccl.tune` measures on these C calls) where a flat plan is priced with the shm
    transport's: the same algorithmic bytes without the executor's per-message work, so on
    equal entries it ties with the flat plan and, listed first, wins."""
    name = "shm"
    ops = OPS
    shortcuts = frozenset({"all_reduce"})
    enabled = True

    def __init__(self, res):
        self.res = res
        self._costs = dict(res.costs)
        self._costs[res.topology.intra] = res.costs.get(SHM_ENGINE, res.costs.get(res.topology.intra))

    def takes(self, call) -> bool:
        return self.enabled and self.res.topology.nhosts == 1 and EngineBase.takes(self, call) and \
            (call.op != "all_to_all" or call.even)

    def price(self, call):
        return choose(call.op, call.nbytes, self.res.topology, self._costs, flat=True, env={}).predicted


class ShmEngine(ShmCollectives, ShmPricing):
    """The shm C collectives as the engine of a communicator whose ranks share this host."""

    _bound = _before = (None,)       # (Call, cffi pointer, count, dtype code, op code, AVG): see short

    def __init__(self, res):
        ShmCollectives.__init__(self, res.rank, res.size, res.store, res.tag, res.timeout)
        ShmPricing.__init__(self, res)

    def _average(self, arr, op):
        if op is AVG:
            divide_into(arr, self.size)

    def run_all_reduce(self, call, what):
        self.all_reduce(call.out.array, call.redop, what)
        self._average(call.out.array, call.redop)

    def run_reduce(self, call, what):
        self.reduce(call.out.array, call.root, call.redop, what)
        if self.rank == call.root:
            self._average(call.out.array, call.redop)

    def run_reduce_scatter(self, call, what):
        self.reduce_scatter(call.out.array, call.inp.array, call.redop, what)
        self._average(call.out.array, call.redop)

    def run_all_gather(self, call, what):
        self.all_gather(call.out.array, call.inp.array, what)

    def run_broadcast(self, call, what):
        self.broadcast(call.out.array, call.root, what)

    def run_all_to_all(self, call, what):
        self.all_to_all(call.out.array, call.inp.array, what)

    def run_barrier(self, call, what):
        self.barrier(what)

    def short(self, call, seq):
        """all_reduce (the one shortcut) with the codes looked up once: the queue's run_now
        path (8-byte calls are mostly Python time). It must do exactly what run_all_reduce does,
        since ranks take one path or the other by their own queue's state: an empty call
        touches no segment. The last two small Calls' pointers and codes are kept (the validator
        hands a repeated small all_reduce the same Call: ccl/validate.py): ffi.from_buffer and
        the code lookups are ~0.2 us of a ~3 us 8-byte call."""
        b = self._bound
        c = self._c
        if call is not b[0] or c is None:
            before = self._before
            if call is before[0] and c is not None:      # the one before (two held, as the validator)
                self._bound, self._before = before, b
                b = before
            else:
                n = call.count
                if not n or c is None:
                    return self._check(self.res.queue.what("all_reduce", seq))
                a = call.out.array
                p = _from_buffer(a)
                op = _OP_BY_ID[id(call.redop)]
                rc = lib.pyccl_coll_all_reduce(c, p, p, n, CODE_BY_NAME[call.dtype], op, -1, self.timeout)
                if rc:
                    self._fail(rc, self.res.queue.what("all_reduce", seq), "all_reduce")
                if call.redop is AVG:
                    divide_into(a, self.size)
                if call.nbytes <= SMALL_BOUND:     # they hold the Calls (and arrays): small ones only
                    self._bound, self._before = (call, p, n, CODE_BY_NAME[call.dtype], op, call.redop is AVG), b
                return
        p = b[1]
        rc = lib.pyccl_coll_all_reduce(c, p, p, b[2], b[3], b[4], -1, self.timeout)
        if rc:
            self._fail(rc, self.res.queue.what("all_reduce", seq), "all_reduce")
        if b[5]:
            divide_into(call.out.array, self.size)

    def close(self):
        self._bound = self._before = (None,)
        ShmCollectives.close(self)
