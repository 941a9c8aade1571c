"""The store's wire format: frame layouts, opcodes, bounds and the key/HMAC helpers.

Split from store.py so the server (store_server.py) and the client (tcp_store.py) share one
definition of the bytes on the wire and neither imports the other.

Wire format (all integers little-endian)::

    handshake  S->C  MAGIC(8) nonce_s(32)
               C->S  HMAC(secret, "client" + nonce_s)(32) nonce_c(32)
               S->C  0x01 HMAC(secret, "server" + nonce_c + nonce_s)(32)   | 0x00, close
    request    op(u8) key_len(u32) value_len(u32) key(utf-8) value
               (CHECK, WAIT, MGET carry their keys in value, each as u32 length + utf-8;
               MGET answers u32 length + value for each key, or MISSING)
    reply      status(u8) len(u32) payload
"""
import hashlib
import hmac
import socket
import struct

from .errors import InvalidArgument

MAX_KEY = 4 << 10            # bytes of a key, utf-8
MAX_VALUE = 64 << 20         # bytes of a value (and of any request or reply body)
MAGIC = b"PYCCLKV1"
_NONCE = 32
_MAC = 32
_REQ = struct.Struct("<BII")         # op, key length, value length
_REP = struct.Struct("<BI")          # status, payload length
_U32 = struct.Struct("<I")
_I64 = struct.Struct("<q")
SET, GET, ADD, CHECK, WAIT, DELETE, MGET = 1, 2, 3, 4, 5, 6, 7
_OPS = frozenset((SET, GET, ADD, CHECK, WAIT, DELETE, MGET))
OK, MISSING, BAD = 0, 1, 2
_MAX_SERVER_WAIT = 30.0      # one WAIT/GET request is parked at most this long
_REPLY_MARGIN = 30.0         # how much longer than the server's wait a client waits for a reply


def _recv_exact(sock, n: int) -> bytes:
    """Read exactly n bytes or raise ConnectionError (EOF) / socket.timeout."""
    buf = bytearray(n)
    view = memoryview(buf)
    got = 0
    while got < n:
        k = sock.recv_into(view[got:])
        if k == 0:
            raise ConnectionError(f"connection closed after {got} of {n} bytes")
        got += k
    return bytes(buf)


def _mac(secret: bytes, *parts: bytes) -> bytes:
    return hmac.new(secret, b"".join(parts), hashlib.sha256).digest()


def _pack_keys(keys) -> bytes:
    """Keys as u32 length + utf-8 bytes each: no separator a key could contain."""
    out = []
    for k in keys:
        b = _key_bytes(k)
        out.append(_U32.pack(len(b)))
        out.append(b)
    return b"".join(out)


def _unpack_keys(data: bytes) -> list:
    """Inverse of _pack_keys; raises ValueError on anything malformed (the caller drops the client)."""
    keys, i, n = [], 0, len(data)
    while i < n:
        if n - i < 4:
            raise ValueError("truncated key list")
        (klen,) = _U32.unpack_from(data, i)
        i += 4
        if klen > MAX_KEY or klen > n - i:
            raise ValueError("bad key length in key list")
        keys.append(data[i:i + klen].decode("utf-8"))
        i += klen
    return keys


def _key_bytes(key) -> bytes:
    if not isinstance(key, str):
        raise InvalidArgument(f"store keys are str, got {type(key).__name__} {key!r}")
    b = key.encode("utf-8")
    if len(b) > MAX_KEY:
        raise InvalidArgument(f"store key of {len(b)} bytes is over the {MAX_KEY}-byte limit: {key[:64]!r}...")
    return b


def _family(host: str):
    return socket.AF_INET6 if ":" in host else socket.AF_INET
