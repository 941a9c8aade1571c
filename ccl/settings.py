"""Every ``PYCCL_*`` environment variable, declared once: name, type, default, one line of meaning.

Why one registry: the same knob used to be parsed in several places with different rules and
documented in several others with different defaults.  Here each variable says what the code
does, the README's table is generated from it (``python -m pyccl.settings --markdown``), and
tests/test_settings.py fails when the two differ or when a source file names an undeclared
``PYCCL_*`` variable or reads one from ``os.environ`` itself.

Reading::

    from pyccl import settings
    chunk = settings.get("PYCCL_CHUNK_BYTES")          # 1048576 unless set
    settings.get("PYCCL_TIMEOUT", {"PYCCL_TIMEOUT": "5"})   # an explicit mapping instead of os.environ
    settings.is_set("PYCCL_ALGO")                      # set and not blank?

The environment is read at call time (tests set variables per process); a call is a dict
lookup and one parse, meant for communicator set-up, not for every collective.  Unset or blank
means the default.  A value that does not parse raises ``InvalidArgument`` naming the variable
and the value; reading an undeclared name raises too, so no reader can bypass the registry.
A default of ``None`` means "computed" (or "unset"): the meaning says how the code decides.

Which names are declared: every ``PYCCL_*`` variable read anywhere in the package (ccl/,
transports/, topology/, native/ build scripts).  Variables read only by the test suite are in
the section "tests" (labelled so in the table); knobs of bench shell scripts are not declared.
Names like ``PYCCL_SUM`` or ``PYCCL_SHM_OK`` in native/ are C macros, not settings.

This module is in the base layer: it imports only pyccl.errors and the standard library.
"""
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass

from .errors import InvalidArgument

__all__ = ["Setting", "SETTINGS", "SECTIONS", "declared", "get", "is_set", "parse", "markdown"]

TYPES = ("int", "bytes", "float", "bool", "str", "choice")
#: sections in the order the README shows them
SECTIONS = {
    "core": "Core",
    "launch": "Launch and rendezvous",
    "tuner": "Plans and the tuner",
    "shm": "Shared memory (one host)",
    "tcp": "TCP",
    "ibverbs": "ibverbs (RDMA)",
    "cuda": "CUDA",
    "torch": "torch backend",
    "debug": "Debugging",
    "tests": "Read only by the test suite (not by pyccl)",
}


@dataclass(frozen=True)
class Setting:
    """One variable.  `name` may end in ``<T>`` (a family: PYCCL_BW_TCP, PYCCL_BW_SHM, ...)."""
    name: str
    type: str
    default: object
    meaning: str
    section: str = "core"
    choices: tuple = ()
    lo: float | None = None        # inclusive bounds, checked when set
    hi: float | None = None
    shown: str = ""                # the default as the table shows it, when None or not plain

    @property
    def prefix(self) -> str:
        return self.name[:-3] if self.name.endswith("<T>") else ""


_MIB = 1 << 20
_DECLARED = (
    # ---- core ------------------------------------------------------------------------------
    Setting("PYCCL_TIMEOUT", "float", 300.0, "seconds any setup wait or collective may take before `Timeout` "
            "(must be > 0)"),
    Setting("PYCCL_TRANSPORT", "str", "auto", "force one transport for every pair: `shm`, `tcp`, `ibverbs` "
            "(default: shm within a host, ibverbs across hosts when an RDMA device is up, else tcp)"),
    Setting("PYCCL_CHUNK_BYTES", "bytes", _MIB, "pipeline chunk of the plan executor; when set, the tuner "
            "keeps it instead of choosing one"),
    Setting("PYCCL_ENGINE", "str", None, "force an engine by name (e.g. `shm`, `flat`, `composed`) wherever it "
            "can run the call; elsewhere the priced choice stands, with a warning", shown="lowest cost"),
    Setting("PYCCL_NATIVE", "bool", True, "`0`: reduce with the numpy twins even when the C kernels are built"),
    Setting("PYCCL_REPRODUCIBLE", "bool", False, "`1`: float SUM/AVG reductions give the same bytes whatever the "
            "algorithm, chunking, transport, device or host layout (README \"Reproducible mode\"); every rank "
            "must agree"),
    Setting("PYCCL_SPIN_US", "float", 50.0, "microseconds a wait polls before sleeping in select(); ranks yield "
            "the CPU while polling when they outnumber cores"),
    # ---- launch ----------------------------------------------------------------------------
    Setting("PYCCL_RANK", "int", None, "this process's rank (set by `pyccl.launch`; read before torchrun's "
            "RANK, MPI's and Slurm's variables)", "launch", shown="set by `pyccl.launch`"),
    Setting("PYCCL_SIZE", "int", None, "number of ranks; required with PYCCL_RANK", "launch",
            shown="set by `pyccl.launch`"),
    Setting("PYCCL_LOCAL_RANK", "int", None, "rank within this host (unset: 0)", "launch",
            shown="set by `pyccl.launch`"),
    Setting("PYCCL_LOCAL_SIZE", "int", None, "ranks on this host (unset: LOCAL_WORLD_SIZE, else 1); the "
            "executor yields the CPU while polling when it exceeds the cores", "launch",
            shown="set by `pyccl.launch`"),
    Setting("PYCCL_STORE_ADDR", "str", None, "`host:port` of the rendezvous store (set by `pyccl.launch`; "
            "under mpirun/Slurm: else MASTER_ADDR:MASTER_PORT, mpi4py's broadcast, or Slurm's node list)",
            "launch", shown="set by `pyccl.launch`"),
    Setting("PYCCL_JOB_SECRET", "str", None, "hex secret every rank proves to the store (set by `pyccl.launch`; "
            "else mpi4py broadcasts a random one, else a weak one from the job id and user, with a warning)",
            "launch", shown="set by `pyccl.launch`"),
    Setting("PYCCL_JOIN", "bool", False, "this process replaces a dead rank (set by `pyccl.launch --elastic`): "
            "`pyccl.init()` joins the running job (`pyccl.join()`) instead of starting one", "launch"),
    Setting("PYCCL_SOCKET_IFNAME", "str", None, "interface(s) whose address pyccl listens on, NCCL_SOCKET_IFNAME's "
            "rules: `eth0,ib` prefixes in order, `=eth0` exact, `^docker,lo` exclude", "launch",
            shown="route to the store"),
    Setting("PYCCL_HOST_ID", "str", None, "pose as another host (tests of multi-host plans); ranks with the "
            "same id are one host", "launch", shown="hostname + boot id"),
    # ---- tuner -----------------------------------------------------------------------------
    Setting("PYCCL_ALGO", "str", None, "force `ring`, `tree`, `hierarchical`, `halving_doubling`, `direct` or "
            "`composed` (across hosts: node-local engine, one network plan per rail, node-local engine; "
            "docs/hierarchy.md); a comma list restricts the choice", "tuner", shown="tuner's choice"),
    Setting("PYCCL_TUNE_PROFILE", "str", None, "the tuner's calibration profile (`python -m pyccl.tune` writes "
            "it; rank 0's is used by every rank); `off`: the built-in costs", "tuner",
            shown="`$XDG_CACHE_HOME` or `~/.cache`, `/pyccl/tune-<hostname>.json`"),
    Setting("PYCCL_ALPHA_<T>", "float", None, "per-message latency (µs) of transport T (SHM, TCP, IBVERBS, "
            "CUDA_IPC, SHM_ENGINE) for the tuner, over the profile", "tuner",
            shown="shm 4, tcp 30, ibverbs 6, cuda_ipc 10, shm_engine 4", lo=0),
    Setting("PYCCL_BW_<T>", "float", None, "bandwidth (GB/s) of transport T for the tuner, over the profile",
            "tuner", shown="shm 10, tcp 1.25, ibverbs 12, cuda_ipc 150, shm_engine 10", lo=0),
    Setting("PYCCL_REDUCE_BW_<T>", "float", None, "reduction speed (GB/s) where T's data lives, for the tuner",
            "tuner", shown="6 (cuda_ipc 1000)", lo=0),
    # ---- shm -------------------------------------------------------------------------------
    Setting("PYCCL_SHM_COLLECTIVES", "bool", True, "`0` turns off the node-local shared-memory C collectives "
            "(plans then run over shm slot rings); read on rank 0, agreed through the segment", "shm"),
    Setting("PYCCL_SHM_SMALL_BYTES", "bytes", 64 << 10, "largest all-reduce done one-shot in shared memory",
            "shm"),
    Setting("PYCCL_SHM_CHUNK_BYTES", "bytes", 512 << 10, "per-rank part of the pipelined shared-memory "
            "collectives (shrunk for many ranks so the segment stays below ~256 MiB)", "shm"),
    Setting("PYCCL_SHM_NT_BYTES", "bytes", 8 * _MIB, "all_gather/all_to_all outputs (and broadcasts where ranks "
            "outnumber the cores) from this size are written with streaming (non-temporal) stores; `0`: never",
            "shm"),
    Setting("PYCCL_SHM_CMA_BYTES", "bytes", None, "all_reduce, reduce_scatter, all_gather and broadcast from this "
            "size per rank read the peers' buffers in place (cross-memory attach); `0`: never; unset: broadcast "
            "from 32 KiB where every rank has a core (the root and the readers share its copies), all_reduce from "
            "64 MiB where ranks outnumber the cores, nothing else (slower through the kernel's copy on the 2-core "
            "VM); read on rank 0", "shm", shown="unset"),
    Setting("PYCCL_SHM_STREAM", "choice", "auto", "stores into shared memory: `auto` times plain and streaming "
            "per op and size and uses the faster; `0` plain, `1` streaming", "shm", choices=("auto", "0", "1")),
    Setting("PYCCL_SHM_SLOTS", "int", 8, "slots per ring of the shm transport (one ring per directed pair; "
            "at least 2)", "shm"),
    Setting("PYCCL_SHM_SLOT_BYTES", "bytes", 0, "slot size of the shm transport; `0`: 256 KiB, halved (to "
            "16 KiB) until a rank's rings fit 16 MiB", "shm"),
    Setting("PYCCL_SHM_RESERVE", "choice", "check", "memory of new shared-memory segments: `check` makes them "
            "unallocated (pages on first touch) once statvfs shows /dev/shm has room for this set-up's segments "
            "on the host (else a clear error); `full` allocates every byte at creation (posix_fallocate: slower "
            "set-up, shrink and grow, but no SIGBUS if something else fills /dev/shm later)", "shm",
            choices=("check", "full")),
    Setting("PYCCL_WINDOW_CMA", "bool", True, "one-sided windows (`comm.window`) between ranks of one host copy "
            "through cross-memory attach (process_vm_writev/readv); `0`: through the TCP emulation", "shm"),
    # ---- tcp -------------------------------------------------------------------------------
    Setting("PYCCL_TCP_SOCKETS", "int", 2, "TCP sockets (lanes) per peer; large messages are striped over "
            "them; every rank must agree", "tcp"),
    Setting("PYCCL_TCP_STRIPE_MIN", "bytes", 256 << 10, "smallest message striped over several TCP lanes", "tcp"),
    # ---- ibverbs ---------------------------------------------------------------------------
    Setting("PYCCL_IB_HCA", "str", None, "RDMA ports ibverbs may use, `dev[:port][,dev2…]` (like NCCL_IB_HCA); "
            "unset: the port whose RoCE GID table holds this rank's address toward the store, else the "
            "first ACTIVE port", "ibverbs", shown="route to the store"),
    Setting("PYCCL_IB_GID_INDEX", "int", None, "GID index on RoCE (like NCCL_IB_GID_INDEX); unset: the RoCE v2 "
            "IPv4-mapped GID of that address, else RoCE v2 IPv4-mapped, then v2 IPv6, then any", "ibverbs",
            lo=0, hi=1 << 16, shown="auto"),
    Setting("PYCCL_IB_QPS", "int", 4, "RC queue pairs per connection; messages from PYCCL_IB_STRIPE_MIN are "
            "striped over them (2 soft-RoCE VMs: 4 QPs 94-98 % of ib_write_bw at 1-4 MiB, 1 QP 60-62 %)",
            "ibverbs", lo=1, hi=64),
    Setting("PYCCL_IB_STRIPE_MIN", "bytes", 256 << 10, "smallest message striped over several QPs", "ibverbs",
            lo=1),
    Setting("PYCCL_IB_DEPTH", "int", 32, "clear-to-send ring depth: large receives outstanding per connection",
            "ibverbs", lo=2, hi=256),
    Setting("PYCCL_IB_SLOTS", "int", 16, "eager receive slots (credits) per connection", "ibverbs", lo=1, hi=256),
    Setting("PYCCL_IB_EAGER_BYTES", "bytes", 64 << 10, "largest message sent eagerly through a slot (larger: "
            "rendezvous, RDMA WRITE into the receive buffer)", "ibverbs", lo=0, hi=1 << 26),
    Setting("PYCCL_IB_MR_CACHE_MB", "int", 1024, "registered-memory cache (MiB), evicted LRU beyond it",
            "ibverbs", lo=1),
    Setting("PYCCL_IB_PING_S", "float", 1.0, "seconds of silence before a zero-byte RDMA WRITE probes the peer",
            "ibverbs"),
    Setting("PYCCL_IB_TIMEOUT", "int", 16, "RC ACK timeout code (4.096 µs × 2^code; 16: 0.27 s)", "ibverbs",
            lo=1, hi=31),
    Setting("PYCCL_IB_RETRY", "int", 6, "RC retry count (7 is refused: rxe reads it as forever); with the "
            "timeout, a dead peer is seen in ~2 s", "ibverbs", lo=0, hi=6),
    # ---- cuda ------------------------------------------------------------------------------
    Setting("PYCCL_CUDA_ONESHOT_MAX", "bytes", None, "largest CUDA all-reduce done one-shot", "cuda",
            shown="8388608 on 2 ranks, 4194304 on more"),
    Setting("PYCCL_CUDA_ONESHOT_CAP", "bytes", None, "one-shot scratch per rank and slot (at least "
            "PYCCL_CUDA_ONESHOT_MAX); 2 x ranks slots are held", "cuda", shown="PYCCL_CUDA_ONESHOT_MAX"),
    Setting("PYCCL_CUDA_TWOSHOT", "choice", "auto", "two-shot all-reduce/reduce-scatter: `kernel` (SM stores), "
            "`ce` (copy engines push), `pull`; `auto`: pull on 2 ranks, PYCCL_CUDA_TWOSHOT_WIDE on more", "cuda",
            choices=("auto", "kernel", "ce", "pull")),
    Setting("PYCCL_CUDA_TWOSHOT_WIDE", "choice", "kernel", "what two-shot `auto` picks on more than 2 ranks",
            "cuda", choices=("kernel", "ce", "pull")),
    Setting("PYCCL_CUDA_COPY", "choice", "auto", "copy collectives (all-gather, all-to-all, broadcast, gather, "
            "scatter): `ce`, `push`, `pull`, `staged`; `auto`: staged up to PYCCL_CUDA_STAGE_MAX, else pull on "
            "2 ranks, PYCCL_CUDA_COPY_WIDE on more", "cuda", choices=("auto", "ce", "push", "pull", "staged")),
    Setting("PYCCL_CUDA_COPY_WIDE", "choice", "ce", "what copy `auto` picks on more than 2 ranks", "cuda",
            choices=("ce", "push", "pull", "staged")),
    Setting("PYCCL_CUDA_STAGE_MAX", "bytes", 16 * _MIB, "`auto`: copy collectives whose pieces fit go through "
            "the peers' scratch in one kernel, as does a 2-rank reduce-scatter", "cuda"),
    Setting("PYCCL_CUDA_A2AV", "choice", "mailbox", "uneven CUDA all-to-all: `mailbox` names the peers' outputs "
            "through the host mailbox per call; `staged` rounds through the scratch, no host exchange per call",
            "cuda", choices=("mailbox", "staged")),
    Setting("PYCCL_CUDA_SCRATCH", "bytes", 4 * _MIB, "largest two-shot scratch region per peer (at least 1 MiB, "
            "64 KiB-aligned; 2 x ranks regions are held); bigger messages go in rounds, copies staged through the "
            "scratch stop at it", "cuda"),
    Setting("PYCCL_CUDA_IPC_CACHE", "bytes", 256 * _MIB, "peers' user buffers kept mapped (CUDA IPC, least "
            "recently used first out): a mapping keeps the peer's memory alive after it frees the buffer", "cuda"),
    Setting("PYCCL_KERNEL_CACHE", "str", None, "folder of the CUDA kernels NVRTC built (keyed by source, GPU "
            "architecture and NVRTC version); `0`: no disk cache", "cuda",
            shown="`$XDG_CACHE_HOME` or `~/.cache`, `/pyccl/kernels`"),
    Setting("PYCCL_KERNEL_BUILD_THREADS", "int", None, "threads of the background build of every CUDA kernel "
            "(started by the first CUDA communicator); `0`: none, each kernel is built when first needed",
            "cuda", lo=0, shown="CPUs / 4, 1 to 4"),
    Setting("PYCCL_NVRTC", "str", None, "path of libnvrtc, when the loader, the nvidia-* wheels and CUDA_HOME "
            "do not have it", "cuda", shown="found"),
    Setting("PYCCL_CUDA_RS_CE_MIN", "bytes", 64 * _MIB, "reduce-scatter: per-rank segments from which copy "
            "engines push", "cuda"),
    Setting("PYCCL_CUDA_BLOCKS", "int", 0, "most thread blocks of a kernel; `0`: the GPU's SM count (at most "
            "256)", "cuda", lo=0),
    Setting("PYCCL_CUDA_COPY_BLOCKS", "int", 0, "thread blocks of the SM copy kernel; `0`: the GPU's SM count",
            "cuda", lo=0),
    Setting("PYCCL_CUDA_SYNC", "bool", False, "`1`: block the host after every CUDA call and raise its error "
            "there (debugging)", "cuda"),
    Setting("PYCCL_CUDA_LAUNCH", "choice", "driver", "kernel launches: `driver` (cupy's cuLaunchKernel binding) "
            "or `ctypes`", "cuda", choices=("driver", "ctypes")),
    Setting("PYCCL_CUDA_COMPOSED", "bool", True, "CUDA collectives across hosts with several ranks per host: "
            "node-local CUDA IPC phases around a staged rail; `0`: stage the whole call", "cuda"),
    Setting("PYCCL_CUDA_COMPOSED_OPS", "str", "all_reduce,broadcast,all_gather,reduce_scatter",
            "which CUDA collectives across hosts are composed (a comma-separated subset)", "cuda"),
    Setting("PYCCL_CUDA_COMPOSED_MIN", "bytes", None, "smallest composed message; 32 MiB when ranks of a host "
            "share one GPU (time-sliced: measured slower below), else 0", "cuda", shown="0 / 33554432"),
    Setting("PYCCL_STAGING_CHUNK", "bytes", 4 * _MIB, "CUDA buffers across hosts (staged through pinned host "
            "memory): largest executor chunk, the unit of copy/network overlap (at least 4096)", "cuda"),
    Setting("PYCCL_STAGING_AHEAD", "bytes", 16 * _MIB, "CUDA buffers across hosts: bytes of device-to-host "
            "copies queued ahead of the network (at least 1 MiB)", "cuda"),
    Setting("PYCCL_PROXY", "bool", True, "CUDA collectives across hosts (one rank per host) run on the stream "
            "through the proxy engine: calls return once queued, CUDA graphs capture them; `0`: the staged engine "
            "(the host waits for each transfer; 8-18 % more busbw at 16-64 MiB on one shared GPU, "
            "bench/RESULTS.md)", "cuda"),
    Setting("PYCCL_PROXY_ARENA", "bytes", 32 * _MIB, "CUDA buffers across hosts on the stream (the proxy "
            "engine): pinned host bytes of its arena at first (grown for a larger eager call, never while a "
            "stream captures)", "cuda"),
    Setting("PYCCL_PROXY_WAIT", "choice", "stream", "CUDA buffers across hosts on the stream: how the device "
            "waits for the proxy: `stream` (stream waits on host-mapped words, no kernel resident meanwhile; "
            "kept where the driver offers cuStreamWaitValue64) or `kernel` (a kernel spins, bounded by the timeout)",
            "cuda", choices=("stream", "kernel")),
    Setting("PYCCL_PROXY_LAUNCH", "choice", "fork", "CUDA buffers across hosts on the stream: where the proxy's "
            "launches go: `fork` (pyccl's own stream, forked from and joined back to the caller's) or `caller` (the "
            "caller's stream itself: four driver calls fewer per call; tests/test_cuda_proxy.py's one-rank-per-host tests "
            "pass with it on an H100, its host time is not measured yet)", "cuda",
            choices=("fork", "caller")),
    Setting("PYCCL_PROXY_CTAS", "int", 16, "CUDA buffers across hosts on the stream: thread blocks of the proxy "
            "kernel per direction (device to host, host to device)", "cuda"),
    # ---- torch -----------------------------------------------------------------------------
    Setting("PYCCL_P2P_IPC", "bool", True, "torch send/recv of CUDA tensors within a host go GPU to GPU through "
            "CUDA IPC; `0`: through pinned host memory and the CPU connection", "torch"),
    Setting("PYCCL_TORCH_P2P_TRANSPORT", "str", None, "transport of the torch backend's send/recv "
            "communicator (`auto`: shm within a host, twice the bandwidth, but one dead peer fails all)",
            "torch", shown="tcp"),
    # ---- debug -----------------------------------------------------------------------------
    Setting("PYCCL_DEBUG", "str", None, "log level of the `pyccl` logger, to stderr: `WARN`, `INFO`, `TRACE` "
            "(like NCCL_DEBUG)", "debug", shown="unset (WARNING)"),
    Setting("PYCCL_CHECK", "bool", False, "`1`: compare every rank's op, dtype, count and root before each "
            "collective", "debug"),
    Setting("PYCCL_DUMP_ON_TIMEOUT", "str", None, "directory for flight-recorder dumps of failing ranks (read "
            "them with `python -m pyccl.doctor`)", "debug", shown="unset"),
    # ---- tests -----------------------------------------------------------------------------
    Setting("PYCCL_REQUIRE_NATIVE", "bool", False, "`1` (CI): a missing C extension fails tests/test_reduce.py "
            "instead of skipping", "tests"),
    Setting("PYCCL_SOAK_OPS", "int", 5000, "collectives per rank in tests/test_soak.py", "tests"),
)

#: name -> Setting (families under their ``<T>`` name)
SETTINGS = {s.name: s for s in _DECLARED}
_FAMILIES = sorted((s for s in _DECLARED if s.prefix), key=lambda s: -len(s.prefix))
_UNITS = {"k": 1 << 10, "kib": 1 << 10, "m": 1 << 20, "mib": 1 << 20, "g": 1 << 30, "gib": 1 << 30}
_TRUE, _FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")


def declared(name: str) -> Setting | None:
    """The declaration of `name` (PYCCL_BW_TCP finds PYCCL_BW_<T>), None when undeclared."""
    s = SETTINGS.get(name)
    if s is not None:
        return s
    for f in _FAMILIES:
        if name.startswith(f.prefix) and len(name) > len(f.prefix):
            return f
    return None


def _setting(name: str) -> Setting:
    s = declared(name)
    if s is None:
        raise InvalidArgument(f"{name} is not a pyccl setting (declare it in ccl/settings.py)")
    return s


def _int(name: str, text: str) -> int:
    try:
        return int(text, 0)                 # 0x10, 1_000
    except ValueError:
        pass
    try:
        return int(text)                    # 010
    except ValueError:
        raise InvalidArgument(f"{name}={text!r} is not an integer") from None


def parse(s: Setting, name: str, text: str):
    """`text` (already stripped, not blank) as `s` says; InvalidArgument naming `name` when it does not."""
    t = s.type
    if t == "int":
        v = _int(name, text)
    elif t == "bytes":
        m = re.fullmatch(r"(.+?)\s*(k|kib|m|mib|g|gib)", text, re.IGNORECASE)
        number, unit = (m.group(1), _UNITS[m.group(2).lower()]) if m else (text, 1)
        try:
            v = _int(name, number) * unit
        except InvalidArgument:
            raise InvalidArgument(f"{name}={text!r} is not a byte count (e.g. 4194304, 4M or 4MiB)") from None
    elif t == "float":
        try:
            v = float(text)
        except ValueError:
            raise InvalidArgument(f"{name}={text!r} is not a number") from None
    elif t == "bool":
        low = text.lower()
        if low in _TRUE or low in _FALSE:
            return low in _TRUE
        try:
            return _int(name, text) != 0     # 2 was "on" when these were integers
        except InvalidArgument:
            raise InvalidArgument(f"{name}={text!r} is not a boolean (use 0 or 1)") from None
    elif t == "choice":
        v = text.lower()
        if v not in s.choices:
            raise InvalidArgument(f"{name}={text!r}: use one of {', '.join(s.choices)}")
        return v
    else:
        return text
    if (s.lo is not None and v < s.lo) or (s.hi is not None and v > s.hi):
        lo = "" if s.lo is None else s.lo
        hi = "" if s.hi is None else s.hi
        raise InvalidArgument(f"{name}={text!r} is outside {lo}..{hi}")
    return v


def get(name: str, environ: Mapping | None = None):
    """The value of `name` from `environ` (default os.environ), parsed; its default when unset or blank."""
    s = _setting(name)
    text = (os.environ if environ is None else environ).get(name)
    if text is None or not text.strip():
        return s.default
    return parse(s, name, text.strip())


def is_set(name: str, environ: Mapping | None = None) -> bool:
    """Whether `name` is set to something not blank (e.g. the user fixed the chunk: don't tune it)."""
    _setting(name)
    return bool((os.environ if environ is None else environ).get(name, "").strip())


# ---- the README table ------------------------------------------------------------------------------
def _shown(s: Setting) -> str:
    if s.shown:
        return s.shown
    d = s.default
    if d is None:
        return "unset"
    if isinstance(d, bool):
        return f"`{int(d)}`"
    if s.type == "bytes" and d >= 1024:
        unit = next((u for u, k in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)) if d % k == 0), "")
        k = {"GiB": 1 << 30, "MiB": 1 << 20, "KiB": 1 << 10}.get(unit)
        return f"`{d}` ({d // k} {unit})" if unit else f"`{d}`"
    if isinstance(d, float) and d.is_integer():
        return f"`{int(d)}`"
    return f"`{d}`"


def _type(s: Setting) -> str:
    if s.type == "choice":
        return " \\| ".join(s.choices)
    return {"bytes": "bytes", "bool": "0/1"}.get(s.type, s.type)


def markdown() -> str:
    """The README's table of every setting, one table per section."""
    out = []
    for key, title in SECTIONS.items():
        rows = [s for s in _DECLARED if s.section == key]
        if not rows:
            continue
        out += [f"**{title}**", "", "| variable | type | default | meaning |", "|---|---|---|---|"]
        out += [f"| `{s.name}` | {_type(s)} | {_shown(s)} | {s.meaning.replace('|', chr(92) + '|')} |" for s in rows]
        out.append("")
    return "\n".join(out).rstrip("\n") + "\n"


def _main(argv=None) -> int:
    import argparse
    p = argparse.ArgumentParser(prog="python -m pyccl.settings",
                                description="pyccl's PYCCL_* settings: the values in force here, or the README table")
    p.add_argument("--markdown", action="store_true", help="print the README's table")
    args = p.parse_args(argv)
    if args.markdown:
        print(markdown(), end="")
        return 0
    for s in _DECLARED:
        names = [n for n in os.environ if s.prefix and declared(n) is s] if s.prefix else [s.name]
        for n in names:
            try:
                value = get(n)
            except InvalidArgument as e:
                value = f"error: {e}"
            mark = "set " if is_set(n) else "    "
            print(f"{mark}{n:<28} {value!r}")
    return 0


if __name__ == "__main__":
    raise SystemExit(_main())
