"""How was this process launched? Rank, size and the rendezvous store, from the environment.

`detect()` only reads variables (no sockets, no MPI calls), so it is cheap and testable
with a plain dict. Launchers are recognised in this order, the first match wins:

==============  ==================================================================  ==========
launcher        rank / size / local rank / local size                               store
==============  ==================================================================  ==========
pyccl.launch    PYCCL_RANK PYCCL_SIZE PYCCL_LOCAL_RANK PYCCL_LOCAL_SIZE             PYCCL_STORE_ADDR, PYCCL_JOB_SECRET
torchrun        RANK WORLD_SIZE LOCAL_RANK LOCAL_WORLD_SIZE                          MASTER_ADDR:MASTER_PORT (torch's TCPStore)
Open MPI        OMPI_COMM_WORLD_RANK _SIZE _LOCAL_RANK _LOCAL_SIZE                   see below
MPICH / Hydra   PMI_RANK PMI_SIZE MPI_LOCALRANKID MPI_LOCALNRANKS                    see below
Slurm (srun)    SLURM_PROCID SLURM_NTASKS SLURM_LOCALID SLURM_NTASKS_PER_NODE        see below
none            a single process, rank 0 of 1                                        a private store
==============  ==================================================================  ==========

Under MPI and Slurm, rank 0 hosts a pyccl StoreServer and every rank connects to it. Its
address is, first match wins: PYCCL_STORE_ADDR=host:port; MASTER_ADDR + MASTER_PORT; (MPI,
mpi4py importable) a free port chosen by rank 0 and broadcast over MPI_COMM_WORLD; (Slurm)
the first node of the step's node list (where rank 0 runs under the default block
distribution; SLURM_LAUNCH_NODE_IPADDR if there is no list) and a port derived from
SLURM_JOB_ID and SLURM_STEP_ID. The job secret is PYCCL_JOB_SECRET (hex) when set; else
under MPI with mpi4py a random one broadcast by rank 0; else one derived from the job id and
the user, which anyone who can guess those can forge, so a warning says so. The store lives
in rank 0's process, so rank 0 waits at exit (up to PYCCL_TIMEOUT) until every rank has joined
and the others have disconnected: finishing first must not take the store away from them.

The PYCCL_* variables read here (PYCCL_TIMEOUT, PYCCL_SOCKET_IFNAME, the launch ones) are
declared, with their defaults, in pyccl.settings; every read goes through it.
"""
import getpass
import hashlib
import logging
import os
import re
import secrets
import socket
import struct
from collections.abc import Mapping
from dataclasses import dataclass

from . import settings
from .errors import InvalidArgument

log = logging.getLogger("pyccl")

__all__ = [
    "DEFAULT_TIMEOUT",
    "LaunchInfo",
    "default_timeout",
    "detect",
    "env_float",
    "env_int",
    "open_store",
    "socket_interface_address",
]

DEFAULT_TIMEOUT = settings.declared("PYCCL_TIMEOUT").default
_SERVERS = {}      # (port, secret) -> StoreServer this process hosts for its job; alive for the process lifetime
_HOSTED = {}       # (port, secret) -> (ranks expected to join, seconds to linger at exit)
_JOINED = set()    # (host, port) of job stores this process has announced itself to
_JOINED_KEY = "pyccl/bootstrap/joined"
_ATEXIT = []
_MPI_LAUNCHERS = ("openmpi", "mpich")


# ---- PYCCL_* settings ----------------------------------------------------------------------
# Kept for callers written before pyccl.settings; new code calls settings.get(name), whose
# declared default is the one documented.  A declared name parses by its declaration (so 4MiB
# works for a byte count); `default` stands in when it is unset.
_FLOAT = settings.Setting("", "float", None, "")
_INT = settings.Setting("", "int", None, "")


def _read(name, default, environ, plain):
    value = (os.environ if environ is None else environ).get(name, "")
    if not value.strip():
        return default
    return settings.parse(settings.declared(name) or plain, name, value.strip())


def env_float(name: str, default: float, environ: Mapping | None = None) -> float:
    """`name` as a float, `default` when unset or empty; InvalidArgument naming it when malformed."""
    return float(_read(name, default, environ, _FLOAT))


def env_int(name: str, default: int, environ: Mapping | None = None) -> int:
    """`name` as an int (0x.. and 1_000 accepted), `default` when unset or empty."""
    return int(_read(name, default, environ, _INT))


def default_timeout(environ: Mapping | None = None) -> float:
    """PYCCL_TIMEOUT in seconds (default 300): how long any setup or collective may wait."""
    t = settings.get("PYCCL_TIMEOUT", environ)
    if not t > 0:
        raise InvalidArgument(f"PYCCL_TIMEOUT={t} must be a positive number of seconds")
    return t


# ---- detection -----------------------------------------------------------------------------
@dataclass
class LaunchInfo:
    """What the launcher told this process. store_host/port None: not known yet (see open_store)."""
    rank: int
    size: int
    local_rank: int
    local_size: int
    launcher: str                      # "pyccl.launch" | "torchrun" | "openmpi" | "mpich" | "slurm" | "none"
    store_host: str | None = None
    store_port: int | None = None
    secret: bytes | None = None


def parse_addr(text: str, var: str = "address"):
    """'host:port' or '[v6addr]:port' -> (host, port); InvalidArgument naming `var` otherwise."""
    m = re.fullmatch(r"\[([^\]]+)\]:(\d+)|([^:\s]+):(\d+)", text.strip())
    if not m:
        raise InvalidArgument(f"{var}={text!r} must be host:port")
    host = m.group(1) or m.group(3)
    port = int(m.group(2) or m.group(4))
    if not 0 < port < 65536:
        raise InvalidArgument(f"{var}={text!r}: port {port} is out of range")
    return host, port


def _int(e, name, default=None) -> int:
    v = e.get(name, "")
    if v.strip() == "":
        if default is None:
            raise InvalidArgument(f"{name} is not set")
        return default
    try:
        return int(v)
    except ValueError:
        raise InvalidArgument(f"{name}={v!r} is not an integer") from None


def _setting(e, name, default=None) -> int:
    """A launch variable of pyccl.launch from `e`; InvalidArgument when unset and required."""
    v = settings.get(name, e)
    if v is None:
        if default is None:
            raise InvalidArgument(f"{name} is not set")
        return default
    return v


def _explicit_addr(e):
    addr = settings.get("PYCCL_STORE_ADDR", e)
    if addr:
        return parse_addr(addr, "PYCCL_STORE_ADDR")
    if e.get("MASTER_ADDR", "").strip() and e.get("MASTER_PORT", "").strip():
        return e["MASTER_ADDR"].strip(), _int(e, "MASTER_PORT")
    return None, None


def _secret(e) -> bytes | None:
    text = settings.get("PYCCL_JOB_SECRET", e)
    if not text:
        return None
    try:
        secret = bytes.fromhex(text)
    except ValueError:
        raise InvalidArgument("PYCCL_JOB_SECRET must be hex (e.g. from `python -c "
                              "'import secrets; print(secrets.token_hex(32))'`)") from None
    if not secret:
        raise InvalidArgument("PYCCL_JOB_SECRET is empty")
    return secret


def slurm_first_host(nodelist: str) -> str | None:
    """The first host of a Slurm hostlist: 'gpu[003-005,9],cpu1' -> 'gpu003'."""
    nodelist = nodelist.strip()
    if not nodelist:
        return None
    depth, end = 0, len(nodelist)
    for i, ch in enumerate(nodelist):            # the first entry ends at a comma outside brackets
        depth += ch == "["
        depth -= ch == "]"
        if ch == "," and depth == 0:
            end = i
            break
    first = nodelist[:end]
    return re.sub(r"\[([^\]]*)\]", lambda m: re.split(r"[,-]", m.group(1))[0], first) or None


def slurm_tasks_on_node(spec: str, node_id: int) -> int | None:
    """Tasks on node `node_id` from SLURM_TASKS_PER_NODE's form '2(x3),1' (nodes 0-2: 2, node 3: 1)."""
    counts = []
    for part in spec.split(","):
        m = re.fullmatch(r"\s*(\d+)(?:\(x(\d+)\))?\s*", part)
        if not m:
            return None
        counts.extend([int(m.group(1))] * int(m.group(2) or 1))
    if not counts:
        return None
    return counts[node_id] if 0 <= node_id < len(counts) else counts[0]


def _slurm_addr(e):
    """Rank 0's node and a port every rank of this job step computes alike, from Slurm's variables."""
    host = slurm_first_host(e.get("SLURM_STEP_NODELIST") or e.get("SLURM_JOB_NODELIST")
                            or e.get("SLURM_NODELIST") or "") or e.get("SLURM_LAUNCH_NODE_IPADDR") or None
    if host is None or not e.get("SLURM_JOB_ID", "").strip():
        return None, None
    job, step = _int(e, "SLURM_JOB_ID", 0), _int(e, "SLURM_STEP_ID", 0)
    return host, 20000 + (job + 1009 * step) % 12000   # 20000-31999: below Linux's ephemeral range


def _slurm_local_size(e) -> int:
    if e.get("SLURM_NTASKS_PER_NODE", "").strip():
        n = slurm_tasks_on_node(e["SLURM_NTASKS_PER_NODE"], 0)
        if n:
            return n
    for name in ("SLURM_STEP_TASKS_PER_NODE", "SLURM_TASKS_PER_NODE"):
        if e.get(name, "").strip():
            n = slurm_tasks_on_node(e[name], _int(e, "SLURM_NODEID", 0))
            if n:
                return n
    return 1


def _check(info: LaunchInfo, names) -> LaunchInfo:
    if info.size < 1 or not 0 <= info.rank < info.size:
        raise InvalidArgument(f"{info.launcher}: rank {info.rank} of size {info.size} is impossible "
                              f"(from {names[0]}/{names[1]})")
    if info.local_size < 1 or not 0 <= info.local_rank < info.local_size:
        raise InvalidArgument(f"{info.launcher}: local rank {info.local_rank} of local size {info.local_size} "
                              f"is impossible (from {names[2]}/{names[3]})")
    return info


def detect(environ: Mapping = os.environ) -> LaunchInfo:
    """Read rank, size, local rank/size and the store address of whichever launcher started us.

    Pure: reads `environ` only. Under MPI with no address set, store_host stays None and
    open_store() finds one (mpi4py broadcast, or Slurm's variables).
    """
    e = environ
    secret = _secret(e)
    if settings.is_set("PYCCL_RANK", e):
        names = ("PYCCL_RANK", "PYCCL_SIZE", "PYCCL_LOCAL_RANK", "PYCCL_LOCAL_SIZE")
        if not settings.is_set("PYCCL_STORE_ADDR", e):
            raise InvalidArgument("PYCCL_RANK is set but PYCCL_STORE_ADDR is not; run under "
                                  "`python -m pyccl.launch` or set PYCCL_STORE_ADDR=host:port")
        host, port = parse_addr(settings.get("PYCCL_STORE_ADDR", e), "PYCCL_STORE_ADDR")
        info = LaunchInfo(_setting(e, names[0]), _setting(e, names[1]), _setting(e, names[2], 0),
                          _setting(e, names[3], 1), "pyccl.launch", host, port, secret)
        return _check(info, names)
    if e.get("RANK", "").strip() and e.get("WORLD_SIZE", "").strip():
        names = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE")
        host, port = None, None
        if e.get("MASTER_ADDR", "").strip() and e.get("MASTER_PORT", "").strip():
            host, port = e["MASTER_ADDR"].strip(), _int(e, "MASTER_PORT")
        info = LaunchInfo(_int(e, names[0]), _int(e, names[1]), _int(e, names[2], 0), _int(e, names[3], 1),
                          "torchrun", host, port, secret)
        return _check(info, names)
    for launcher, names in (("openmpi", ("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE",
                                         "OMPI_COMM_WORLD_LOCAL_RANK", "OMPI_COMM_WORLD_LOCAL_SIZE")),
                            ("mpich", ("PMI_RANK", "PMI_SIZE", "MPI_LOCALRANKID", "MPI_LOCALNRANKS"))):
        if e.get(names[0], "").strip() and e.get(names[1], "").strip():
            host, port = _explicit_addr(e)
            info = LaunchInfo(_int(e, names[0]), _int(e, names[1]), _int(e, names[2], 0), _int(e, names[3], 1),
                              launcher, host, port, secret)
            return _check(info, names)
    if e.get("SLURM_PROCID", "").strip() and e.get("SLURM_NTASKS", "").strip():
        names = ("SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID", "SLURM_NTASKS_PER_NODE")
        host, port = _explicit_addr(e)
        if host is None:
            host, port = _slurm_addr(e)
        info = LaunchInfo(_int(e, names[0]), _int(e, names[1]), _int(e, names[2], 0), _slurm_local_size(e),
                          "slurm", host, port, secret)
        return _check(info, names)
    return LaunchInfo(0, 1, 0, 1, "none", None, None, secret)


# ---- the store -----------------------------------------------------------------------------
def open_store(info: LaunchInfo, timeout: float | None = None, environ: Mapping | None = None):
    """The store this job rendezvous through; under MPI/Slurm rank 0 hosts it here.

    Fills in info.store_host/store_port/secret with what was used. A server this process
    hosts stays alive until the process exits (later communicators reuse it), and at exit
    the process waits up to `timeout` s for every rank to have joined and disconnected.
    """
    from .store import TCPStore
    e = os.environ if environ is None else environ
    timeout = default_timeout(e) if timeout is None else float(timeout)
    if info.launcher == "pyccl.launch":
        if info.store_host is None or info.secret is None:
            raise InvalidArgument("pyccl.launch: PYCCL_STORE_ADDR and PYCCL_JOB_SECRET must both be set")
        return TCPStore(info.store_host, info.store_port, info.secret, timeout)
    if info.launcher == "torchrun":
        return _torch_store(info, timeout, e)
    if info.launcher == "none":
        # One process: a private store on loopback, so the same code path works at size 1.
        info.secret = info.secret or secrets.token_bytes(32)
        server = _host_store("127.0.0.1", 0, info.secret)
        info.store_host, info.store_port = server.address[0], server.address[1]
        return TCPStore(info.store_host, info.store_port, info.secret, timeout)

    host, port, secret = info.store_host, info.store_port, info.secret
    hosted = False
    if info.launcher in _MPI_LAUNCHERS and (host is None or secret is None):
        shared = _share_via_mpi(info, host, port, secret, timeout)
        if shared is not None:
            host, port, secret, hosted = shared
    if host is None:
        host, port = _slurm_addr(e)
    if host is None:
        raise InvalidArgument(
            f"pyccl under {info.launcher} (rank {info.rank} of {info.size}) does not know where the rendezvous "
            f"store is: set PYCCL_STORE_ADDR=host:port (host: rank 0's node, port: a free TCP port there), "
            f"or MASTER_ADDR and MASTER_PORT"
            + (", or install mpi4py so rank 0 can broadcast its address" if info.launcher in _MPI_LAUNCHERS else ""))
    if secret is None:
        secret = _weak_secret(e, f"{host}:{port}")
    info.store_host, info.store_port, info.secret = host, port, secret
    if info.rank == 0 and not hosted:
        _host_store("::" if ":" in host else "0.0.0.0", port, secret, info.size, timeout)
    store = TCPStore(host, port, secret, timeout)
    if (host, port) not in _JOINED:
        store.add(_JOINED_KEY, 1)                  # lets rank 0 know, at exit, that everyone came
        _JOINED.add((host, port))
    return store


def _host_store(bind: str, port: int, secret: bytes, expected: int = 0, linger: float = 0.0):
    """Start (or reuse) the store this process serves for its job.

    With `expected` ranks and `linger` > 0 (rank 0 under MPI/Slurm), the process waits at exit,
    up to `linger` seconds, until all `expected` ranks have joined (each adds 1 to a counter
    when it connects) and every other rank has disconnected: the store dies with this process,
    and a rank that finishes first must not pull it from under peers that are still
    starting or still using it.
    """
    from .store import StoreServer
    if port and (port, secret) in _SERVERS:
        server = _SERVERS[(port, secret)]        # a second communicator in this process
    else:
        try:
            server = StoreServer(bind, port, secret)
        except OSError as err:
            raise InvalidArgument(f"rank 0 could not host the pyccl store on port {port}: {err}; the port is "
                                  f"probably taken, pick another with PYCCL_STORE_ADDR or MASTER_PORT") from None
        _SERVERS[(server.address[1], secret)] = server
    if expected > 1 and linger > 0:
        key = (server.address[1], secret)
        old = _HOSTED.get(key, (0, 0.0))
        _HOSTED[key] = (max(old[0], expected), max(old[1], linger))
        if not _ATEXIT:
            import atexit
            atexit.register(_linger_at_exit)      # runs before mpi4py's MPI_Finalize and daemon-thread teardown
            _ATEXIT.append(True)
    return server


def _linger_at_exit():
    import time

    from .store import close_local_clients
    close_local_clients()
    for key, (expected, linger) in _HOSTED.items():
        server = _SERVERS.get(key)
        if server is None:
            continue
        deadline = time.monotonic() + linger
        told = False
        while True:
            joined = int(server.peek(_JOINED_KEY) or b"0")
            if joined >= expected and server.connections == 0:
                break
            if time.monotonic() >= deadline:
                log.warning("pyccl: exiting although %d of %d rank(s) joined the store this rank hosts and %d "
                            "connection(s) are still open; those ranks will fail if they use it",
                            joined, expected, server.connections)
                break
            if not told:
                log.info("pyccl: this rank hosts the store; waiting up to %.0fs for the other ranks "
                         "(%d of %d joined, %d connected) before exiting", linger, joined, expected,
                         server.connections)
                told = True
            time.sleep(0.05)
        server.close()


def _torch_store(info, timeout, e):
    if info.store_host is None:
        raise InvalidArgument("torchrun-style launch (RANK and WORLD_SIZE set) but MASTER_ADDR/MASTER_PORT "
                              "are missing; set both")
    try:
        import torch.distributed as dist
    except ImportError:
        raise InvalidArgument("launched by torchrun (RANK/WORLD_SIZE set): pyccl rendezvous through torch's "
                              "TCPStore there, so torch must be installed (or launch with "
                              "`python -m pyccl.launch`)") from None
    from datetime import timedelta

    from .store import TorchStoreAdapter
    master = info.rank == 0 and e.get("TORCHELASTIC_USE_AGENT_STORE") != "True"
    try:
        ts = dist.TCPStore(info.store_host, info.store_port, info.size, master,
                           timeout=timedelta(seconds=timeout))
    except RuntimeError as err:
        from .errors import Timeout
        raise Timeout(f"torch TCPStore at {info.store_host}:{info.store_port} (rank {info.rank}, "
                      f"{'hosting' if master else 'client'}): {str(err).splitlines()[0]}") from None
    return TorchStoreAdapter(ts, timeout)


def _share_via_mpi(info, host, port, secret, linger):
    """Rank 0 picks what is missing (a free port, a random secret) and broadcasts it over MPI.

    `linger`: how long rank 0 waits at exit for the others (see _host_store).
    Returns (host, port, secret, hosted) or None without mpi4py. The broadcast is a raw byte
    buffer (Bcast), not a pickled object. If rank 0 fails, it broadcasts the error so the
    others raise too instead of waiting in MPI forever.
    """
    try:
        from mpi4py import MPI
    except ImportError:
        return None
    comm = MPI.COMM_WORLD
    if comm.Get_size() != info.size or comm.Get_rank() != info.rank:
        raise InvalidArgument(f"MPI_COMM_WORLD says rank {comm.Get_rank()} of {comm.Get_size()}, the environment "
                              f"says {info.rank} of {info.size}")
    buf = bytearray(1024)
    hosted, error = False, None
    if info.rank == 0:
        try:
            secret = secret or secrets.token_bytes(32)
            if host is None:
                server = _host_store("0.0.0.0", 0, secret, info.size, linger)
                host, port, hosted = socket_interface_address(None), server.address[1], True
            msg = f"ok\n{host}\n{port}\n{secret.hex()}".encode()
        except Exception as err:  # noqa: BLE001 - re-raised below, after the others heard of it
            error = err
            msg = f"error\n{type(err).__name__}: {err}".encode()[:len(buf)]
        buf[:len(msg)] = msg
    comm.Bcast([buf, MPI.BYTE], root=0)
    if error is not None:
        raise error
    fields = bytes(buf).rstrip(b"\0").decode().split("\n")
    if fields[0] != "ok":
        raise InvalidArgument(f"rank 0 could not set up the pyccl store: {fields[1]}")
    return fields[1], int(fields[2]), bytes.fromhex(fields[3]), hosted


def _weak_secret(e, addr: str) -> bytes:
    job = "/".join(e.get(k, "") for k in ("SLURM_JOB_ID", "SLURM_STEP_ID", "PMIX_NAMESPACE",
                                          "OMPI_MCA_ess_base_jobid", "OMPI_MCA_orte_ess_jobid"))
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = str(os.getuid())
    log.warning("pyccl: PYCCL_JOB_SECRET is not set; using a weak job secret derived from the job id and "
                "user name (anyone who can guess them can join the store). Set PYCCL_JOB_SECRET to the same "
                "random hex string on every rank, or install mpi4py.")
    return hashlib.sha256(f"pyccl-weak-secret/{job}/{addr}/{user}".encode()).digest()


# ---- which address to listen on --------------------------------------------------------------
_SIOCGIFADDR = 0x8915


def interface_address(name: str) -> str | None:
    """IPv4 address of interface `name` (ioctl SIOCGIFADDR), None if it has none or does not exist."""
    import fcntl
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        packed = fcntl.ioctl(s.fileno(), _SIOCGIFADDR, struct.pack("256s", name[:15].encode()))
        return socket.inet_ntoa(packed[20:24])
    except OSError:
        return None
    finally:
        s.close()


def _interfaces():
    try:
        return [n for _, n in socket.if_nameindex()]
    except OSError:
        return []


def _from_ifname(spec: str) -> str | None:
    """NCCL_SOCKET_IFNAME's rules: 'eth0,ib' = first existing name, else prefix match, in order;
    '=eth0' = exact name only; '^docker,lo' = any interface except those prefixes."""
    entries = [x.strip() for x in spec.split(",") if x.strip()]
    if entries and all(x.startswith("^") for x in entries):
        excluded = [x[1:] for x in entries]
        for name in sorted(_interfaces()):
            if not any(name.startswith(p) for p in excluded):
                addr = interface_address(name)
                if addr:
                    return addr
        return None
    for entry in entries:
        exact = entry.startswith("=")
        name = entry.lstrip("=")
        addr = interface_address(name)
        if addr:
            return addr
        if not exact:
            for other in sorted(_interfaces()):
                if other.startswith(name):
                    addr = interface_address(other)
                    if addr:
                        return addr
    return None


def _is_loopback(host) -> bool:
    return host in ("localhost", "0.0.0.0", "::1", "::") or str(host).startswith("127.")


def socket_interface_address(store_host: str | None = None, environ: Mapping | None = None) -> str:
    """The local IPv4 address to listen on and publish to peers.

    PYCCL_SOCKET_IFNAME (like NCCL_SOCKET_IFNAME) when set; else the address the kernel would
    send from toward the store host (a UDP socket "connected" there: no packet is sent);
    127.0.0.1 when the store is on loopback. With no store host known, the default route's
    address, else the host name's, else loopback.
    """
    e = os.environ if environ is None else environ
    spec = settings.get("PYCCL_SOCKET_IFNAME", e) or ""
    if spec:
        addr = _from_ifname(spec)
        if addr:
            return addr
        raise InvalidArgument(f"PYCCL_SOCKET_IFNAME={spec!r}: no matching interface with an IPv4 address "
                              f"(interfaces here: {', '.join(_interfaces()) or 'unknown'})")
    if store_host and _is_loopback(store_host):
        return "127.0.0.1"
    target = store_host or "192.0.2.1"          # TEST-NET-1: only asks the routing table
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        s.connect((target, 9))
        addr = s.getsockname()[0]
        if addr and addr != "0.0.0.0":
            return addr
    except OSError:
        pass
    finally:
        s.close()
    try:
        addr = socket.gethostbyname(socket.gethostname())
        if not addr.startswith("127."):
            return addr
    except OSError:
        pass
    return "127.0.0.1"
