"""Bootstrap: how the ranks of a communicator learn about each other in O(1) store requests.

NCCL's shape, in Python:

1. **Rendezvous through the store, two requests per rank.** Each rank publishes the address
   of its process's listener (``boot/<rank>``) and reads one other: its successor's.
2. **All-gather among the ranks themselves** (Bruck's algorithm): in round k rank r receives
   the records of ranks r+2^k, r+2^k+1, ... from rank r+2^k and sends its own first records
   to rank r-2^k; ceil(log2 N) rounds over short-lived authenticated connections. A record
   carries its rank's address *and its successor's*, so the address needed in round k+1 is
   in what round k brought: the store is asked nothing more. A record is the rank's part of
   ``topology.detect.local_info`` plus the host's part, sent once per run of same-host ranks.
3. **Records are remembered per root store**, so a communicator of ranks already known
   (``split``, ``shrink``, ``Communicator(..., _members=, _tag=)``) needs no store request
   and no all-gather at all: only its own tag.

Connections (bootstrap rounds and the TCP transport's lazily opened ones) all arrive at one
listener per process and job secret, shared by every communicator (transports/tcp_dial.py,
where the TCP transport dials too). Both ends prove they know the secret; the dialer speaks
first, so neither side ever waits for the other to be ready to accept (the handshake moves on
whenever either side polls)::

    D->A  hello(magic, kind, from, to, lane, step, tag digest) nonce_d(32)
    A->D  nonce_a(32) HMAC(secret, "acc" hello nonce_d nonce_a)
    D->A  HMAC(secret, "dial" hello nonce_a nonce_d)

An accepted connection is kept under (tag digest, kind, from, to, lane, step) until the
communicator that wants it takes it, so a peer that runs ahead (a later round, a collective
this rank has not reached) is answered and parked, never refused.
"""
import json
import select
import struct
import time
import weakref

from .errors import InvalidArgument, PeerFailure, Timeout
from .transports.tcp_dial import (COUNTERS, KIND_BOOT, KIND_TCP, MAGIC, Listener, check_fds,  # noqa: F401
                                  digest, link, listener_for, raise_fd_limit)

_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")
_SAME_HOST = 0xFFFFFFFF                   # host part length meaning "as the previous record"
MAX_RECORD = 1 << 20                      # bytes of one part of one record
_RANK_KEYS = ("rank", "pid", "cpus", "numa_nodes", "addr", "next", "tune")


def _swap(listener, send_sock, data: bytes, recv_sock, deadline, who, limit) -> bytes:
    """Send `data` on one socket while receiving one u64-framed block on another."""
    out = memoryview(_U64.pack(len(data)) + data)
    head, body, want = b"", bytearray(), None
    while out or want is None or len(body) < want:
        rd = [recv_sock] if want is None or len(body) < want else []
        wr = [send_sock] if out else []
        left = deadline - time.monotonic()
        if left <= 0:
            raise Timeout(f"{who}: timed out exchanging bootstrap records")
        r, w, _ = select.select(rd, wr, [], min(left, 0.05))
        if send_sock in w:
            try:
                n = send_sock.send(out[:1 << 20])
            except BlockingIOError:
                n = 0
            except OSError as e:
                raise PeerFailure(f"{who}: a peer dropped the bootstrap connection ({e})") from None
            out = out[n:]
            COUNTERS["bytes_sent"] += n
        if recv_sock in r:
            try:
                got = recv_sock.recv(8 - len(head) if want is None else min(want - len(body), 1 << 20))
            except BlockingIOError:
                continue
            except OSError as e:
                raise PeerFailure(f"{who}: a peer dropped the bootstrap connection ({e})") from None
            if not got:
                raise PeerFailure(f"{who}: a peer closed the bootstrap connection mid-exchange")
            COUNTERS["bytes_recv"] += len(got)
            if want is None:
                head += got
                if len(head) == 8:
                    (want,) = _U64.unpack(head)
                    if want > limit:
                        raise PeerFailure(f"{who}: a peer sent a {want}-byte block, over the {limit} bound")
            else:
                body += got
    return bytes(body)


# ---- records -------------------------------------------------------------------------------
def _split_info(info: dict) -> tuple:
    """(rank part, host part) as JSON bytes: the host part is the same for every rank of a host."""
    rank_part = {k: info[k] for k in _RANK_KEYS if k in info}
    host_part = {k: v for k, v in info.items() if k not in _RANK_KEYS}
    return (json.dumps(rank_part, separators=(",", ":")).encode(),
            json.dumps(host_part, separators=(",", ":"), sort_keys=True).encode())


def _pack(records) -> bytes:
    out, prev = [], None
    for rank_part, host_part in records:
        out += [_U32.pack(len(rank_part)), rank_part]
        if host_part == prev:
            out.append(_U32.pack(_SAME_HOST))
        else:
            out += [_U32.pack(len(host_part)), host_part]
            prev = host_part
    return b"".join(out)


def _unpack(data: bytes, count: int, who: str) -> list:
    recs, i, prev = [], 0, None
    try:
        for _ in range(count):
            (n,) = _U32.unpack_from(data, i)
            if n > MAX_RECORD:
                raise ValueError("record too long")
            rank_part = data[i + 4:i + 4 + n]
            i += 4 + n
            (m,) = _U32.unpack_from(data, i)
            i += 4
            if m == _SAME_HOST:
                if prev is None:
                    raise ValueError("host reference without a host")
                host_part = prev
            else:
                if m > MAX_RECORD:
                    raise ValueError("record too long")
                host_part = prev = data[i:i + m]
                i += m
            recs.append((rank_part, host_part))
        if i != len(data):
            raise ValueError("trailing bytes")
    except (struct.error, ValueError) as e:
        raise PeerFailure(f"{who}: malformed bootstrap records from a peer ({e})") from None
    return recs


def _decode(records) -> list:
    hosts = {}
    out = []
    for rank_part, host_part in records:
        h = hosts.get(host_part)
        if h is None:
            h = hosts[host_part] = json.loads(host_part)
        info = dict(h)
        info.update(json.loads(rank_part))
        out.append(info)
    return out


def all_gather(listener, tag, rank, size, mine: tuple, timeout, describe, alive=None) -> list:
    """Bruck all-gather of one record per rank; the records in rank order.

    `mine` is (rank part, host part), the rank part naming this rank's "addr" and its
    successor's ("next"). Round k: dial rank+2^k (its address is the "next" of the last
    record held), accept from rank-2^k, receive its records while sending ours."""
    have = [mine]
    step = 0
    deadline = time.monotonic() + timeout
    who = f"{tag}: rank {rank}"
    while len(have) < size:
        d = len(have)
        n = min(d, size - d)
        dst, src = (rank - d) % size, (rank + d) % size
        src_addr = json.loads(have[d - 1][0])["next"]
        socks = link(listener, tag, rank, [(src, src_addr, KIND_BOOT, 0, step)], [(dst, KIND_BOOT, 0, step)],
                     deadline, describe, alive)
        try:
            got = _swap(listener, socks[(dst, KIND_BOOT, 0, step, "a")], _pack(have[:n]),
                        socks[(src, KIND_BOOT, 0, step, "d")], deadline, who, n * 2 * (MAX_RECORD + 4))
        finally:
            for s in socks.values():
                s.close()
        have += _unpack(got, n, who)
        step += 1
        COUNTERS["rounds"] += 1
    return have[size - rank:] + have[:size - rank]


# ---- the communicator's entry point ----------------------------------------------------------
_KNOWN = weakref.WeakKeyDictionary()      # root store -> {member id: info}


def exchange(store, root_store, rank, size, members, secret, tag, timeout, bind_host, derived: bool,
             alive_check=None) -> tuple:
    """Everything rank `rank` needs to know of its peers: (peer_info list, listener).

    `store` is the communicator's prefixed store, `root_store` the one it was built from (the
    memory of known ranks is kept per root store), `members` the world ranks of the members,
    `derived`: the communicator was made from another (split, shrink, _members=)."""
    listener = listener_for(bind_host, secret)
    try:
        known = _KNOWN.setdefault(root_store, {})
    except TypeError:                      # a store that cannot be weakly referenced
        known = {}
    if derived and all(m in known for m in members) and known[members[rank]].get("addr") == listener.address:
        COUNTERS["reused"] += 1
        return [dict(known[m], rank=r) for r, m in enumerate(members)], listener
    me = own_record(rank, listener)
    if size == 1:
        infos = [me]
    else:
        store.set(f"boot/{rank}", listener.address.encode())

        def missing(_waiting=None):
            keys = [f"boot/{r}" for r in range(size)]
            try:
                gone = [r for r, ok in enumerate(store.check(keys)) if not ok]
            except Exception:  # noqa: BLE001 - only for the message
                gone = []
            if gone:
                return (f"{tag}: rank {rank} waited {timeout:.0f}s for ranks {gone} to join "
                        f"(of {size}); did they start?")
            return (f"{tag}: rank {rank} waited {timeout:.0f}s in the bootstrap all-gather for ranks "
                    f"{_waiting}; all {size} ranks joined the store")
        try:
            me["next"] = store.get(f"boot/{(rank + 1) % size}", timeout=timeout).decode()
        except Timeout:
            raise Timeout(missing()) from None
        rec = _split_info(me)
        infos = _decode(all_gather(listener, tag, rank, size, rec, timeout, missing, alive_check))
    for info in infos:
        info.pop("next", None)
    for r, m in enumerate(members):
        known[m] = infos[r]
    return infos, listener


def own_record(rank, listener) -> dict:
    """This process's record: where it listens, its host, and (rank 0) the calibration."""
    from pyccl.topology.detect import local_info
    me = local_info(rank)
    me["addr"] = listener.address
    if rank == 0:
        from .topology.profile import load
        me["tune"] = load()                 # rank 0's calibration prices the plans of every rank
    from pyccl.transports.tcp import _lanes
    me["tcp_lanes"] = _lanes()              # both ends of a TCP pair must open as many sockets
    return me


def remember(root_store, records: dict) -> None:
    """Note {member id: record} as known for communicators made over `root_store` (grow, join)."""
    try:
        _KNOWN.setdefault(root_store, {}).update(records)
    except TypeError:                      # a store that cannot be weakly referenced: nothing kept
        pass


def pack_records(infos) -> bytes:
    """Records (peer_info dicts) as bytes, each host's part once per run of same-host ranks."""
    return _pack([_split_info(i) for i in infos])


def unpack_records(data: bytes, count: int, who: str) -> list:
    return _decode(_unpack(data, count, who))


def check_secret(secret) -> bytes:
    if not isinstance(secret, (bytes, bytearray)) or not secret:
        raise InvalidArgument("the bootstrap needs a non-empty job secret (bytes)")
    return bytes(secret)
