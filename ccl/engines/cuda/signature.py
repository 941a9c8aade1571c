"""The 63-bit word every rank of a CUDA call must agree on, checked by the kernels and the
mailbox (a peer that called with another op, dtype, root, reduction or count fails the call)."""
import zlib

_SIGS = {}


def _signature(name, sig) -> int:
    """63 bits every rank must agree on: op, dtype, root, reduction and count (all_to_all's
    counts may differ per rank; its splits are checked pairwise instead)."""
    count = 0 if name.startswith("all_to_all") else int(sig.get("count", 0))
    key = (name, sig.get("dtype"), sig.get("root"), sig.get("redop"))
    head = _SIGS.get(key)
    if head is None:
        if len(_SIGS) > 4096:
            _SIGS.clear()
        head = _SIGS[key] = (zlib.crc32("|".join(map(str, key)).encode()) & 0x7FFFFFFF) << 32
    return head | (count & 0xFFFFFFFF)
