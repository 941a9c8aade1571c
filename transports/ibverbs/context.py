"""IbvTransport: opens one IbvConnection per peer through the bootstrap store (Gloo's "context").

Split from the connection (pair.py): this is the Transport interface select.py registers, and
the only part that talks to the store.
"""
import logging

from ... import settings
from ..base import Transport
from .device import _Device, _link_layers, available
from .pair import IbvConnection

log = logging.getLogger("pyccl")


class IbvTransport(Transport):
    """RDMA between hosts; `PYCCL_TRANSPORT=ibverbs` forces it for every pair."""

    name = "ibverbs"

    @staticmethod
    def available() -> tuple:
        return available()

    def can_connect(self, me: dict, peer: dict) -> bool:
        """Between hosts that both have an ACTIVE RDMA port of a common link layer, from the
        bootstrap info's `rdma` entry (topology.detect.rdma_devices()'s list, or the
        `local_rdma()` tag); symmetric as select.py requires."""
        return me.get("host") != peer.get("host") and \
            bool(_link_layers(me.get("rdma")) & _link_layers(peer.get("rdma")))

    def connect(self, ctx, peers: list) -> dict:
        dev = _Device.get(ctx.bind_host)         # the port holding our address toward the peers
        # 4 QPs: across two soft-RoCE VMs a 1-4 MiB message striped over 4 QPs reached 94-98 %
        # of ib_write_bw, over 2 QPs 73-83 %, over 1 QP 60-62 % (bench/JOURNAL.md, 2026-12-06 RDMA runs 2-5).
        # Messages under PYCCL_IB_STRIPE_MIN use one QP whatever the count.
        nqp = settings.get("PYCCL_IB_QPS")
        depth = settings.get("PYCCL_IB_DEPTH")
        # ACK timeout 4.096 us * 2**16 = 0.27 s, 6 retries: a dead peer is known in ~2 s.
        # Retry count 7 is refused: rdma_rxe (and some NICs) read it as "retry forever".
        timeout_code = settings.get("PYCCL_IB_TIMEOUT")
        retry = settings.get("PYCCL_IB_RETRY")
        conns = {}
        try:
            for p in peers:
                conns[p] = IbvConnection(p, dev, nqp, depth, ctx.comm_tag, ctx.rank)
                ctx.store.set(f"ib/{ctx.rank}->{p}", conns[p].card())
            for p in peers:
                card = ctx.store.get(f"ib/{p}->{ctx.rank}", timeout=ctx.timeout)
                conns[p].connect(card, timeout_code, retry)
                ctx.store.set(f"ib/{ctx.rank}->{p}/ready", b"1")
            for p in peers:
                ctx.store.get(f"ib/{p}->{ctx.rank}/ready", timeout=ctx.timeout)
        except BaseException:
            for c in conns.values():
                c.close()
            raise
        log.info("%s rank %d: ibverbs to %d peers over %s (%d QPs each, depth %d)", ctx.comm_tag,
                 ctx.rank, len(peers), dev.name, nqp, depth)
        return conns
