"""ibverbs RDMA transport: reliable-connected queue pairs, RDMA WRITE with immediate.

What it builds (after NCCL's net-IB design: eager slots for small messages, zero-copy rendezvous
for large ones):

* **Discovery.** Devices and ports come from ``/sys/class/infiniband`` (no library needed to
  look); ``PYCCL_IB_HCA=dev[:port][,dev2...]`` restricts them (like ``NCCL_IB_HCA``).  The
  port is the one whose RoCE GID table holds the IPv4 address this rank uses toward the
  rendezvous store (the address of the NIC that carries the route there, the one the TCP
  transport listens on; ``PYCCL_SOCKET_IFNAME`` moves both), so a host with soft-RoCE on
  ``lo`` and on its NIC, or several NICs, picks the NIC its peers are reached through; without
  such a GID (InfiniBand, IPv6-only) the first ACTIVE port wins.  On RoCE the GID is chosen
  like NCCL does: that address as RoCE v2 (IPv4-mapped), else RoCE v2 IPv4-mapped, then RoCE
  v2 global IPv6, then anything non-zero (``PYCCL_IB_GID_INDEX`` overrides, like
  ``NCCL_IB_GID_INDEX``).  InfiniBand ports are addressed by LID.  ``describe()`` prints what
  was found and why it was (not) usable.
* **Connections.** Per peer: one completion queue (with a completion channel, so an idle
  executor can ``select()`` on it) and ``PYCCL_IB_QPS`` RC queue pairs (4 by default).  QP numbers, PSNs,
  GID/LID, MTU and the address + rkey of the peer's control ring travel through the bootstrap
  store (``ib/<from>-><to>``); both sides reach RTS before either says ``ready``.
* **Small messages: eager slots with credits.** A message of at most ``PYCCL_IB_EAGER_BYTES``
  (64 KiB) is copied into a registered staging slot and RDMA-WRITTEN with an immediate
  (message number, slot) into receive slot ``k % PYCCL_IB_SLOTS`` of the peer, so the send is
  done at once and a sender can run ahead of its receiver like TCP does.  The receiver copies
  the message out when the matching ``irecv`` is posted and returns credits (the count of
  freed slots) with a zero-byte write-with-immediate; without a credit the sender queues.
* **Large messages: receiver-driven rendezvous, zero-copy.** ``isend`` announces the message
  (request-to-send, a zero-byte write-with-immediate); ``irecv(view)`` registers ``view``
  (memory-registration cache) and writes a 32-byte *clear-to-send* entry (address, rkey,
  length, message number) into slot ``seq % PYCCL_IB_DEPTH`` of the sender's control ring,
  with an immediate; the sender checks the sizes agree and RDMA-WRITEs the data straight into
  the receive buffer, cut into one part per QP from ``PYCCL_IB_STRIPE_MIN`` bytes, each part
  with an immediate naming (message, part).  At most ``PYCCL_IB_DEPTH`` CTS are outstanding
  (a slot is reused only once the message that consumed it has landed).  Every immediate
  finds a posted receive (the receive queues are sized for the credit limits: no RNR).
* **Size checks.** Both sides cut and classify a message by their own length; any
  disagreement (eager length, CTS length, RTS against an eager receive, eager data against a
  rendezvous receive) raises ``TransportError`` naming the peer and the sizes.
* **Memory registration cache** (``MRCache``, one per device, shared by all connections):
  a buffer is registered whole (its exporting object's full range) on first use and found
  again by address for any slice of it.  An entry stays valid because it keeps the memory
  alive: a weak reference to a numpy array that owns its data (the entry dies with the array),
  else a strong reference, evicted LRU past ``PYCCL_IB_MR_CACHE_MB``.  In-use entries are
  never evicted.
* **Errors, never a hang.** Any completion with an error status puts the connection in error:
  retry-exceeded (the peer's QP is gone: it died or closed) raises ``PeerFailure`` naming the
  peer, anything else ``TransportError`` with the verbs status.  One-sided writes tell a
  waiting receiver nothing about a dead sender, so a connection that has work outstanding and
  has heard nothing from its peer for ``PYCCL_IB_PING_S`` seconds posts a zero-byte RDMA
  WRITE: against a dead peer it fails within ACK timeout x retries (``PYCCL_IB_TIMEOUT`` 16:
  0.27 s, ``PYCCL_IB_RETRY`` 6; 7 is refused since rxe reads it as "forever"): ~2 s.

The hot path (post a write, post receives, poll the CQ) is ``pyccl._verbs``, a cffi module
built from native/ibverbs.c that opens libibverbs.so.1 with dlopen at run time: pyccl builds
and imports everywhere, and the transport reports itself unavailable with the reason where
rdma-core or an RDMA device is missing.

The package follows Gloo's transport layout, one concept a file: verbs.py (the verbs constants,
loading pyccl._verbs), device.py (sysfs discovery, the port/GID choice, the opened device),
buffer.py (MRCache), pair.py (IbvConnection: the per-peer protocol), context.py (IbvTransport:
a connection per peer through the store). Every name the single module had is re-exported
here, so ``pyccl.transports.ibverbs.X`` keeps working.
"""
# re-exports: the names the single module had (tests/rdma, bench/rdma*, the staged engine)
from .buffer import MRCache, _Entry  # noqa: F401
from .context import IbvTransport  # noqa: F401
from .device import (  # noqa: F401
    _CHOSEN, _Device, _choose_port, _gid_rank, _gid_text, _link_layers, _mapped, _port_gids, _read,
    _wanted, available, choose_port, describe, local_rdma, ports,
)
from .pair import (  # noqa: F401
    _CTRL_CREDIT, _CTRL_RTS, _CTS, _CTS_BYTES, _IMM_CTRL, _IMM_CTS, _IMM_DATA, _IMM_EAGER, _K_CTRL,
    _K_CTS, _K_DATA, _K_EAGER, _K_PING, _K_RECV, _MAGIC, _MAX_PART, _SEQ_MASK, IbvConnection, _Msg,
    _cut, _near,
)
from .verbs import (  # noqa: F401
    _ACCESS_FULL, _LINK_ETHERNET, _MTU_BYTES, _PORT_ACTIVE, _QP_STATES, _WC_RECV_RDMA_WITH_IMM,
    _WC_REM_ACCESS_ERR, _WC_RETRY_EXC_ERR, _WC_RNR_RETRY_EXC_ERR, _WC_WR_FLUSH_ERR, SYSFS, _errstr,
    _native,
)
