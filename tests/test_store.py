"""The rendezvous store over real sockets: semantics, timeouts, authentication, hostile input.

The server must survive anything a network peer can send (garbage, lies about lengths,
half a frame, silence) and keep serving good clients; these tests send exactly that.
"""
import hashlib
import hmac
import os
import secrets
import socket
import struct
import subprocess
import sys
import textwrap
import threading
import time

import pytest
from pyccl.errors import InvalidArgument, PeerFailure, PycclError, Timeout
from pyccl.store import (
    MAX_KEY,
    MAX_VALUE,
    PrefixStore,
    StoreServer,
    TCPStore,
    TorchStoreAdapter,
)

pytestmark = pytest.mark.timeout(30)

MAGIC = b"PYCCLKV1"


@pytest.fixture
def secret():
    return secrets.token_bytes(32)


@pytest.fixture
def server(secret):
    s = StoreServer("127.0.0.1", 0, secret, handshake_timeout=1.0, frame_timeout=1.0)
    yield s
    s.close()


@pytest.fixture
def client(server, secret):
    c = TCPStore(*server.address, secret, timeout=10)
    yield c
    c.close()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _raw_authenticated(server, secret):
    """A socket that did the documented handshake by hand, to send hand-made frames."""
    sock = socket.create_connection(server.address, timeout=5)
    hello = _recv_n(sock, 40)
    assert hello[:8] == MAGIC
    nonce_c = os.urandom(32)
    sock.sendall(hmac.new(secret, b"client" + hello[8:], hashlib.sha256).digest() + nonce_c)
    reply = _recv_n(sock, 33)
    assert reply[:1] == b"\x01"
    assert reply[1:] == hmac.new(secret, b"server" + nonce_c + hello[8:], hashlib.sha256).digest()
    return sock


def _recv_n(sock, n):
    out = b""
    while len(out) < n:
        chunk = sock.recv(n - len(out))
        if not chunk:
            break
        out += chunk
    return out


def _closed_by_peer(sock, within=5.0) -> bool:
    sock.settimeout(within)
    try:
        while True:
            if sock.recv(4096) == b"":
                return True
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False


def _still_serves(server, secret):
    c = TCPStore(*server.address, secret, timeout=5)
    key = f"probe-{secrets.token_hex(4)}"
    c.set(key, b"alive")
    assert c.get(key, timeout=2) == b"alive"
    c.close()


# ---- semantics ---------------------------------------------------------------------------------
def test_set_get_add_check_delete(client):
    client.set("a", b"\x00\xffbinary")
    assert client.get("a") == b"\x00\xffbinary"
    client.set("a", b"")                       # empty values and overwrites are fine
    assert client.get("a") == b""
    assert client.add("n", 2) == 2
    assert client.add("n", -5) == -3
    assert client.get("n") == b"-3"            # counters read as ASCII, like torch's stores
    assert client.check(["a", "missing", "n"]) == [True, False, True]
    assert client.check([]) == []
    assert client.delete("a") is True
    assert client.delete("a") is False
    assert client.check(["a"]) == [False]
    client.wait(["n"], timeout=1)
    client.wait([], timeout=0)


def test_keys_with_odd_characters(client):
    keys = ["with\nnewline", "ü/ñ/ß", "", "a" * MAX_KEY]
    for i, k in enumerate(keys):
        client.set(k, str(i).encode())
    assert client.check(keys + ["nope"]) == [True] * len(keys) + [False]
    assert [client.get(k) for k in keys] == [b"0", b"1", b"2", b"3"]


def test_limits_checked_on_client(client):
    with pytest.raises(InvalidArgument, match="limit"):
        client.set("k" * (MAX_KEY + 1), b"x")
    with pytest.raises(InvalidArgument, match="limit"):
        client.set("big", bytes(MAX_VALUE + 1))
    with pytest.raises(InvalidArgument):
        client.set(b"bytes-key", b"x")
    with pytest.raises(InvalidArgument, match="not an integer"):
        client.set("text", b"abc")
        client.add("text", 1)
    assert client.get("text") == b"abc"        # the refused add left the value alone


def test_large_value_roundtrip(client):
    blob = os.urandom(3 << 20)
    client.set("blob", blob)
    assert client.get("blob") == blob


def test_threads_share_one_client(client):
    errors = []

    def work(t):
        try:
            for i in range(50):
                client.add("counter", 1)
                client.set(f"t{t}/{i}", f"{t}:{i}".encode())
                assert client.get(f"t{t}/{i}") == f"{t}:{i}".encode()
        except BaseException as e:  # noqa: BLE001 - collected and re-raised in the test thread
            errors.append(e)

    threads = [threading.Thread(target=work, args=(t,)) for t in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert client.add("counter", 0) == 400


def test_get_blocks_until_another_client_sets(server, secret, client):
    other = TCPStore(*server.address, secret, timeout=10)
    setter = threading.Timer(0.5, other.set, args=("late", b"here"))
    setter.start()
    t0 = time.monotonic()
    assert client.get("late", timeout=5) == b"here"
    assert 0.4 < time.monotonic() - t0 < 3
    setter.join()                               # its reply may still be in flight
    other.close()


def test_blocked_get_does_not_block_same_client_set(client):
    """One thread waits in get; another thread's set on the same client must still go through."""
    setter = threading.Timer(0.3, client.set, args=("k", b"v"))
    setter.start()
    t0 = time.monotonic()
    assert client.get("k", timeout=5) == b"v"
    assert time.monotonic() - t0 < 3
    setter.join()


def test_wait_returns_when_all_keys_arrive(client):
    def later():
        for k in ("x", "y", "z"):
            time.sleep(0.1)
            client.set(k, b"1")
    setter = threading.Thread(target=later)
    setter.start()
    client.wait(["x", "y", "z"], timeout=5)
    setter.join()


def test_timeouts_name_the_missing_keys(client):
    client.set("present", b"1")
    t0 = time.monotonic()
    with pytest.raises(Timeout) as e:
        client.wait(["present", "absent1", "absent2"], timeout=0.5)
    assert 0.4 < time.monotonic() - t0 < 3
    assert "absent1" in str(e.value) and "absent2" in str(e.value)
    assert "'present'" not in str(e.value)
    with pytest.raises(Timeout, match="'never'"):
        client.get("never", timeout=0.3)
    with pytest.raises(TimeoutError):           # pyccl's Timeout is also the builtin one
        client.get("never", timeout=0)


def test_two_subprocesses_rendezvous(server, secret, client):
    script = textwrap.dedent("""
        import sys
        from pyccl.store import TCPStore
        host, port, secret, rank = sys.argv[1], int(sys.argv[2]), bytes.fromhex(sys.argv[3]), int(sys.argv[4])
        s = TCPStore(host, port, secret, timeout=20)
        s.set(f"rank/{rank}", f"hello from {rank}".encode())
        s.wait(["rank/0", "rank/1"])
        other = s.get(f"rank/{1 - rank}").decode()
        n = s.add("arrived", 1)
        s.set(f"result/{rank}", f"{other}|{n}".encode())
    """)
    procs = [subprocess.Popen([sys.executable, "-c", script, server.address[0], str(server.address[1]),
                               secret.hex(), str(r)]) for r in range(2)]
    for p in procs:
        assert p.wait(timeout=25) == 0
    results = [client.get(f"result/{r}", timeout=1).decode() for r in range(2)]
    assert results[0].startswith("hello from 1|") and results[1].startswith("hello from 0|")
    assert sorted(int(r.split("|")[1]) for r in results) == [1, 2]
    assert client.get("arrived") == b"2"


# ---- authentication and reachability ---------------------------------------------------------
def test_wrong_secret_is_rejected(server, secret):
    with pytest.raises(PeerFailure, match="rejected the job secret"):
        TCPStore(*server.address, b"not the secret", timeout=5)
    _still_serves(server, secret)


def test_client_refuses_a_store_that_cannot_prove_the_secret(secret):
    """A fake store that accepts any answer must not fool the client (mutual authentication)."""
    lst = socket.create_server(("127.0.0.1", 0))

    def fake():
        conn, _ = lst.accept()
        conn.sendall(MAGIC + os.urandom(32))
        _recv_n(conn, 64)
        conn.sendall(b"\x01" + os.urandom(32))
        time.sleep(1)
        conn.close()
    threading.Thread(target=fake, daemon=True).start()
    with pytest.raises(PeerFailure, match="could not prove"):
        TCPStore(*lst.getsockname(), secret, timeout=5)
    lst.close()


def test_not_a_pyccl_store(secret):
    lst = socket.create_server(("127.0.0.1", 0))

    def http():
        conn, _ = lst.accept()
        conn.sendall(b"HTTP/1.1 400 Bad Request\r\n\r\n" + b"x" * 64)
        time.sleep(1)
        conn.close()
    threading.Thread(target=http, daemon=True).start()
    with pytest.raises(PeerFailure, match="not a pyccl store"):
        TCPStore(*lst.getsockname(), secret, timeout=5)
    lst.close()


def test_unreachable_store_times_out_naming_the_address(secret):
    port = _free_port()
    t0 = time.monotonic()
    with pytest.raises(Timeout) as e:
        TCPStore("127.0.0.1", port, secret, timeout=1.0)
    assert 0.9 < time.monotonic() - t0 < 4
    assert f"127.0.0.1:{port}" in str(e.value) and "tried to connect" in str(e.value)


def test_client_started_before_the_server_waits_for_it(secret):
    port = _free_port()
    result = {}

    def connect():
        try:
            c = TCPStore("127.0.0.1", port, secret, timeout=10)
            result["value"] = c.get("k", timeout=5)
            c.close()
        except BaseException as e:  # noqa: BLE001 - reported via result
            result["error"] = e
    t = threading.Thread(target=connect)
    t.start()
    time.sleep(0.5)
    server = StoreServer("127.0.0.1", port, secret)
    writer = TCPStore(*server.address, secret, timeout=5)
    writer.set("k", b"late server")
    t.join(10)
    server.close()
    assert result == {"value": b"late server"}


def test_server_close_makes_clients_fail_clearly(secret):
    server = StoreServer("127.0.0.1", 0, secret)
    c = TCPStore(*server.address, secret, timeout=2)
    c.set("a", b"1")
    server.close()
    with pytest.raises(PycclError):
        c.get("a", timeout=1)


def test_server_needs_a_secret():
    with pytest.raises(InvalidArgument):
        StoreServer("127.0.0.1", 0, b"")


# ---- hostile input -----------------------------------------------------------------------------
def test_garbage_before_handshake(server, secret):
    sock = socket.create_connection(server.address, timeout=5)
    sock.sendall(os.urandom(200))
    assert _closed_by_peer(sock)
    sock.close()
    _still_serves(server, secret)


def test_silent_clients_do_not_wedge_the_server(server, secret):
    silent = [socket.create_connection(server.address, timeout=5) for _ in range(20)]
    _still_serves(server, secret)               # served while 20 connections say nothing
    for s in silent:                            # and the silent ones are dropped (handshake timeout 1 s)
        assert _closed_by_peer(s, within=5)
        s.close()
    _still_serves(server, secret)


@pytest.mark.parametrize("frame", [
    struct.pack("<BII", 99, 1, 1) + b"kv",                      # unknown command
    struct.pack("<BII", 1, MAX_KEY + 1, 0),                     # key length over the limit
    struct.pack("<BII", 1, 1, 0xFFFFFFFF),                      # value length over the limit
    struct.pack("<BII", 4, 0, 7) + b"\xff\xff\xff\x7fabc",      # CHECK with a lying key-list length
    struct.pack("<BII", 3, 1, 3) + b"kabc",                     # ADD whose amount is not 8 bytes
    struct.pack("<BII", 1, 2, 0) + b"\xff\xfe",                 # key that is not utf-8
    os.urandom(64),
], ids=["unknown-op", "big-key", "big-value", "bad-key-list", "bad-add", "bad-utf8", "random"])
def test_malformed_frames_drop_only_that_client(server, secret, frame):
    sock = _raw_authenticated(server, secret)
    sock.sendall(frame)
    assert _closed_by_peer(sock)
    sock.close()
    _still_serves(server, secret)


def test_truncated_frame_is_dropped(server, secret):
    sock = _raw_authenticated(server, secret)
    sock.sendall(struct.pack("<BII", 1, 3, 100) + b"key" + b"only part of the value")
    assert _closed_by_peer(sock, within=5)      # frame timeout is 1 s in this fixture
    sock.close()
    sock = _raw_authenticated(server, secret)
    sock.sendall(struct.pack("<BII", 1, 3, 100)[:5])   # half a header, then hang up
    sock.close()
    _still_serves(server, secret)


def test_authenticated_raw_frame_roundtrip(server, secret, client):
    """The documented wire format, spoken by hand."""
    sock = _raw_authenticated(server, secret)
    sock.sendall(struct.pack("<BII", 1, 3, 5) + b"raw" + b"value")
    assert _recv_n(sock, 5) == struct.pack("<BI", 0, 0)
    sock.close()
    assert client.get("raw") == b"value"


# ---- PrefixStore -------------------------------------------------------------------------------
def test_prefix_store(client):
    p = PrefixStore(client, "job1")
    q = PrefixStore(p, "sub")
    p.set("a", b"1")
    q.set("a", b"2")
    assert client.get("job1/a") == b"1" and client.get("job1/sub/a") == b"2"
    assert p.get("a") == b"1" and q.get("a") == b"2"
    assert p.add("n", 4) == 4 and client.get("job1/n") == b"4"
    assert p.check(["a", "b"]) == [True, False]
    p.wait(["a"], timeout=1)
    with pytest.raises(Timeout) as e:
        p.wait(["a", "b"], timeout=0.3)
    assert "'b'" in str(e.value) and "job1" in str(e.value)
    with pytest.raises(Timeout, match="'zz'"):
        q.get("zz", timeout=0.2)
    assert p.delete("a") is True and client.check(["job1/a"]) == [False]
    p.close()
    assert client.get("job1/sub/a") == b"2"     # closing a prefix view leaves the store open


# ---- TorchStoreAdapter -------------------------------------------------------------------------
def test_torch_store_adapter():
    dist = pytest.importorskip("torch.distributed", reason="torch is not installed")
    from datetime import timedelta
    ts = dist.TCPStore("127.0.0.1", 0, 1, True, timeout=timedelta(seconds=7))
    s = TorchStoreAdapter(ts)
    assert s.timeout == 7
    s.set("a", b"\x00bin")
    assert s.get("a") == b"\x00bin"
    assert s.add("n", 3) == 3 and s.add("n", 2) == 5 and s.get("n") == b"5"
    assert s.check(["a", "missing", "n"]) == [True, False, True]
    s.wait(["a", "n"], timeout=1)
    setter = threading.Timer(0.3, s.set, args=("late", b"x"))
    setter.start()
    assert s.get("late", timeout=5) == b"x"
    setter.join()
    t0 = time.monotonic()
    with pytest.raises(Timeout, match="'absent'"):
        s.get("absent", timeout=0.3)
    assert time.monotonic() - t0 < 3
    assert ts.timeout == timedelta(seconds=7)  # per-call timeout restored
    with pytest.raises(Timeout) as e:
        s.wait(["a", "gone1", "gone2"], timeout=0.3)
    assert "gone1" in str(e.value) and "gone2" in str(e.value) and "'a'" not in str(e.value)
    assert s.delete("a") is True and s.check(["a"]) == [False]
    p = PrefixStore(s, "pfx")
    p.set("k", b"v")
    assert ts.get("pfx/k") == b"v"


def test_multi_get_is_two_requests(client):
    from pyccl import store as store_mod
    for i in range(50):
        client.set(f"m/{i}", bytes([i]) * i)
    before = store_mod.STATS["requests"]
    assert client.multi_get([f"m/{i}" for i in range(50)]) == [bytes([i]) * i for i in range(50)]
    assert store_mod.STATS["requests"] - before == 2
    p = PrefixStore(client, "m")
    assert p.multi_get(["3", "7"]) == [b"\x03" * 3, b"\x07" * 7]
    with pytest.raises(Timeout, match="'absent'"):
        p.multi_get(["3", "absent"], timeout=0.3)
