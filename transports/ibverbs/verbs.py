"""The verbs ABI as pyccl uses it: constants, and loading pyccl._verbs (libibverbs by dlopen).

Its own module because every other part (device discovery, the memory-region cache, the
queue pairs) needs the native handle and these numbers, and none of them needs another.
"""
from ...errors import TransportError

SYSFS = "/sys/class/infiniband"

# verbs constants (native/ibverbs.h checks them against <infiniband/verbs.h>)
_ACCESS_FULL = 1 | 2            # LOCAL_WRITE | REMOTE_WRITE
_WC_RECV_RDMA_WITH_IMM = 129
_WC_WR_FLUSH_ERR = 5
_WC_RETRY_EXC_ERR = 12
_WC_RNR_RETRY_EXC_ERR = 13
_WC_REM_ACCESS_ERR = 10
_PORT_ACTIVE = 4
_LINK_ETHERNET = 2
_QP_STATES = {0: "RESET", 1: "INIT", 2: "RTR", 3: "RTS", 4: "SQD", 5: "SQE", 6: "ERROR"}
_MTU_BYTES = {1: 256, 2: 512, 3: 1024, 4: 2048, 5: 4096}


# ---- loading the native part --------------------------------------------------------------------
_NATIVE = None


def _native():
    """(ffi, lib) of pyccl._verbs with libibverbs loaded; raises TransportError saying why not."""
    global _NATIVE
    if _NATIVE is None:
        try:
            from ..._verbs import ffi, lib
        except ImportError as e:
            _NATIVE = TransportError(f"pyccl._verbs is not built ({e}); reinstall pyccl "
                                     f"(pip install -e .) or run python native/build_verbs.py")
        else:
            err = ffi.new("char[512]")
            if lib.pv_load(err, 512):
                _NATIVE = TransportError(ffi.string(err).decode(errors="replace"))
            else:
                _NATIVE = (ffi, lib)
    if isinstance(_NATIVE, Exception):
        raise _NATIVE
    return _NATIVE


def _errstr(buf) -> str:
    ffi, _ = _native()
    return ffi.string(buf).decode(errors="replace")
