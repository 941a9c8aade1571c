"""How was this process launched? Rank, size and the rendezvous store from the environment.

Recognised, in this order: `python -m pyccl.launch`, torchrun, Open MPI's mpirun, MPICH's
Hydra (mpiexec), Slurm's srun; none of them means a single process (rank 0 of 1).
"""
import fcntl
import hashlib
import logging
import os
import socket
import struct
from dataclasses import dataclass
from typing import Optional

from .errors import InvalidArgument

log = logging.getLogger("pyccl")
_SERVERS = []          # stores this process hosts for its job (rank 0 under mpirun/Slurm)


def env_float(name: str, default: float) -> float:
    value = os.environ.get(name, "")
    try:
        return float(value) if value.strip() else default
    except ValueError:
        raise InvalidArgument(f"{name}={value!r} is not a number") from None


def env_int(name: str, default: int) -> int:
    value = os.environ.get(name, "")
    try:
        return int(value) if value.strip() else default
    except ValueError:
        raise InvalidArgument(f"{name}={value!r} is not an integer") from None


@dataclass
class LaunchInfo:
    rank: int
    size: int
    local_rank: int
    local_size: int
    launcher: str
    store_host: Optional[str] = None
    store_port: Optional[int] = None
    secret: Optional[bytes] = None


def _addr(text, var):
    host, _, port = text.rpartition(":")
    if not host or not port.isdigit():
        raise InvalidArgument(f"{var}={text!r} must be host:port")
    return host, int(port)


def _store_addr(environ):
    if environ.get("PYCCL_STORE_ADDR"):
        return _addr(environ["PYCCL_STORE_ADDR"], "PYCCL_STORE_ADDR")
    if environ.get("MASTER_ADDR") and environ.get("MASTER_PORT"):
        return environ["MASTER_ADDR"], int(environ["MASTER_PORT"])
    return None, None


def detect(environ=None) -> LaunchInfo:
    """Read rank, size and the store address of whichever launcher started us."""
    e = os.environ if environ is None else environ

    def num(name, default=None):
        v = e.get(name)
        return int(v) if v not in (None, "") else default

    secret = bytes.fromhex(e["PYCCL_JOB_SECRET"]) if e.get("PYCCL_JOB_SECRET") else None
    if "PYCCL_RANK" in e:
        host, port = _addr(e["PYCCL_STORE_ADDR"], "PYCCL_STORE_ADDR") if e.get("PYCCL_STORE_ADDR") else (None, None)
        return LaunchInfo(num("PYCCL_RANK"), num("PYCCL_SIZE"), num("PYCCL_LOCAL_RANK", 0),
                          num("PYCCL_LOCAL_SIZE", 1), "pyccl.launch", host, port, secret)
    if "RANK" in e and "WORLD_SIZE" in e:
        host, port = _store_addr(e)
        return LaunchInfo(num("RANK"), num("WORLD_SIZE"), num("LOCAL_RANK", 0),
                          num("LOCAL_WORLD_SIZE", 1), "torchrun", host, port, secret)
    for launcher, r, s, lr, ls in (("openmpi", "OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE",
                                    "OMPI_COMM_WORLD_LOCAL_RANK", "OMPI_COMM_WORLD_LOCAL_SIZE"),
                                   ("mpich", "PMI_RANK", "PMI_SIZE", "MPI_LOCALRANKID", "MPI_LOCALNRANKS"),
                                   ("slurm", "SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID",
                                    "SLURM_NTASKS_PER_NODE")):
        if r in e and s in e:
            host, port = _store_addr(e)
            local_size = e.get(ls, "1").split("(")[0].split(",")[0]
            if launcher == "slurm" and host is None:
                host = e.get("SLURM_LAUNCH_NODE_IPADDR")
                port = 20000 + num("SLURM_JOB_ID", 0) % 20000 if host else None
            return LaunchInfo(num(r), num(s), num(lr, 0), int(local_size or 1), launcher, host, port, secret)
    return LaunchInfo(0, 1, 0, 1, "none", None, None, secret)


def _weak_secret(e) -> bytes:
    job = e.get("SLURM_JOB_ID") or e.get("OMPI_MCA_ess_base_jobid") or e.get("PMI_ID") or \
        e.get("MASTER_PORT") or ""
    log.warning("pyccl: no PYCCL_JOB_SECRET; deriving a weak one from the job id. "
                "Set PYCCL_JOB_SECRET (hex) on shared networks.")
    return hashlib.sha256(f"pyccl/{job}/{os.getuid()}".encode()).digest()


def open_store(info: LaunchInfo, timeout: float):
    """The store this job rendezvous through; rank 0 hosts it where the launcher does not."""
    from .store import StoreServer, TCPStore, TorchStoreAdapter
    e = os.environ
    if info.launcher == "pyccl.launch":
        return TCPStore(info.store_host, info.store_port, info.secret, timeout)
    if info.launcher == "torchrun":
        try:
            import torch.distributed as dist
        except ImportError:
            raise InvalidArgument("under torchrun pyccl uses torch's TCPStore; install torch") from None
        from datetime import timedelta
        master = info.rank == 0 and e.get("TORCHELASTIC_USE_AGENT_STORE") != "True"
        ts = dist.TCPStore(info.store_host, info.store_port, info.size, master,
                           timeout=timedelta(seconds=timeout))
        return TorchStoreAdapter(ts, timeout)
    if info.launcher == "none":
        import secrets
        secret = secrets.token_bytes(32)
        server = StoreServer("127.0.0.1", 0, secret)
        _SERVERS.append(server)
        info.secret = secret
        return TCPStore(*server.address, secret, timeout)
    host, port, secret = info.store_host, info.store_port, info.secret
    if host is None and info.launcher in ("openmpi", "mpich"):
        host, port, secret = _via_mpi(info, secret)
    if host is None:
        raise InvalidArgument(f"pyccl under {info.launcher}: set PYCCL_STORE_ADDR=host:port (or MASTER_ADDR "
                              f"and MASTER_PORT), or install mpi4py so rank 0 can share its store address")
    secret = secret or _weak_secret(e)
    info.secret = secret
    if info.rank == 0 and not any(s.address[1] == port for s in _SERVERS):
        try:
            _SERVERS.append(StoreServer("0.0.0.0", port, secret))
        except OSError:
            pass        # already served (by an earlier communicator or another process): connect to it
    return TCPStore(host, port, secret, timeout)


def _via_mpi(info, secret):
    """Rank 0 opens a store on a free port and tells the others through MPI."""
    try:
        from mpi4py import MPI
    except ImportError:
        return None, None, secret
    from .store import StoreServer
    comm = MPI.COMM_WORLD
    payload = None
    if comm.Get_rank() == 0:
        import secrets as s
        secret = secret or s.token_bytes(32)
        server = StoreServer("0.0.0.0", 0, secret)
        _SERVERS.append(server)
        payload = (_my_address(), server.address[1], secret.hex())
    host, port, hexsecret = comm.bcast(payload, root=0)
    return host, port, bytes.fromhex(hexsecret)


def _ifname_address(name: str) -> Optional[str]:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        packed = fcntl.ioctl(s.fileno(), 0x8915, struct.pack("256s", name[:15].encode()))  # SIOCGIFADDR
        return socket.inet_ntoa(packed[20:24])
    except OSError:
        return None
    finally:
        s.close()


def _my_address() -> str:
    return socket_interface_address(None)


def socket_interface_address(store_host=None) -> str:
    """The IPv4 address to listen on: PYCCL_SOCKET_IFNAME's, else the one routing to the store."""
    names = os.environ.get("PYCCL_SOCKET_IFNAME", "")
    for name in filter(None, (n.strip() for n in names.split(","))):
        addr = _ifname_address(name)
        if addr:
            return addr
    if names:
        raise InvalidArgument(f"PYCCL_SOCKET_IFNAME={names!r}: no such interface with an IPv4 address")
    if store_host in (None, "", "localhost") or str(store_host).startswith("127."):
        return "127.0.0.1"
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        s.connect((store_host, 9))            # no packet is sent; the kernel picks the route
        return s.getsockname()[0]
    except OSError:
        return "127.0.0.1"
    finally:
        s.close()
