"""Hostile bytes at the TCP transport and the store: a clear error, never a crash, a hang or
a memory blow-up. Hypothesis generates the frames; every case runs against real sockets."""
import socket
import struct
import time

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from pyccl.errors import PeerFailure, PycclError, TransportError
from pyccl.store import _OPS as STORE_OPS, StoreServer, TCPStore
from pyccl.transports.tcp import _HDR, _MAGIC, TCPConnection

pytestmark = pytest.mark.timeout(300)
FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
STATS = {"tcp_frames": 0, "store_frames": 0}


def _drive(conn, req, limit=2.0):
    t = time.monotonic()
    while not req.done:
        conn.progress()
        if time.monotonic() - t > limit:
            raise AssertionError("hung on hostile input")


@FUZZ
@given(junk=st.binary(min_size=0, max_size=200), expect=st.integers(0, 64))
def test_tcp_connection_rejects_garbage(junk, expect):
    a, b = socket.socketpair()
    conn = TCPConnection(7, [a], stripe_min=1 << 30)
    buf = np.zeros(expect, np.uint8)
    req = conn.irecv(memoryview(buf))
    b.sendall(junk)
    b.close()                                       # then the peer is gone
    STATS["tcp_frames"] += 1
    try:
        _drive(conn, req)
        # only a well-formed header of exactly the expected size may complete
        magic, seq, n, _call = _HDR.unpack(junk[:_HDR.size])
        assert magic == _MAGIC and seq == 0 and n == expect
    except (TransportError, PeerFailure) as e:
        assert "rank 7" in str(e)
    finally:
        conn.close()


@FUZZ
@given(length=st.integers(0, 2**64 - 1), seq=st.integers(0, 2**32 - 1))
def test_tcp_header_fields_are_bounded(length, seq):
    """A forged header claiming a huge length is a size mismatch, not an allocation."""
    a, b = socket.socketpair()
    conn = TCPConnection(3, [a], stripe_min=1 << 30)
    req = conn.irecv(memoryview(np.zeros(16, np.uint8)))
    b.sendall(_HDR.pack(_MAGIC, seq, length, 0) + b"\0" * 16)
    STATS["tcp_frames"] += 1
    try:
        _drive(conn, req)
        assert seq == 0 and length == 16
    except TransportError as e:
        assert ("size mismatch" in str(e)) or ("out of step" in str(e))
    finally:
        conn.close()
        b.close()


@pytest.fixture(scope="module")
def server():
    s = StoreServer("127.0.0.1", 0, b"k" * 32)
    yield s
    s.close()


@FUZZ
@given(frame=st.binary(min_size=0, max_size=300), authed=st.booleans())
def test_store_survives_garbage(server, frame, authed):
    sock = socket.create_connection(server.address, timeout=5)
    try:
        if authed:                                   # garbage after a good handshake
            sock.close()
            sock = TCPStore(*server.address, b"k" * 32, timeout=5)._connect(5.0)
            sock.sendall(frame)
        else:
            sock.sendall(frame)
    except OSError:
        pass
    finally:
        sock.close()
    STATS["store_frames"] += 1
    good = TCPStore(*server.address, b"k" * 32, timeout=5)
    good.set("alive", b"1")
    assert good.get("alive") == b"1"
    good.close()


@FUZZ
@given(op=st.integers(0, 255), klen=st.integers(0, 2**32 - 1), vlen=st.integers(0, 2**32 - 1))
def test_store_bounds_sizes(server, op, klen, vlen):
    sock = TCPStore(*server.address, b"k" * 32, timeout=5)._connect(5.0)
    sock.settimeout(5)
    sock.sendall(struct.pack("<BII", op, klen, vlen))
    STATS["store_frames"] += 1
    if klen > 4096 or vlen > (64 << 20) or op not in STORE_OPS:
        try:
            assert sock.recv(1) == b""               # dropped at once, nothing allocated
        except ConnectionResetError:
            pass
    sock.close()


def test_report_fuzz_counts():
    print(f"fuzzed: {STATS}")
    assert STATS["tcp_frames"] >= 500 and STATS["store_frames"] >= 500
    assert issubclass(TransportError, PycclError)
