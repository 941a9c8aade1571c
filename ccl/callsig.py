"""One collective call in 64 bits, so a rank can say *which* field of a call differs.

Every message the executor moves carries the call it belongs to (the TCP header, the shm
ring's slot metadata); the shm collectives publish theirs per call (native/shm_coll_ops.c). A
receiver that finds the sender's call differing raises "call mismatch with rank P: the op
differs (it called all_reduce(float32 x 1000, MAX), this rank all_reduce(float32 x 1000,
SUM))" instead of a size mismatch, or instead of silently reducing with two ops.

Layout (little end first): collective (4 bits, COLLECTIVES index + 1), op (4 bits, OPS index
+ 1, 0 = none), dtype (8 bits, pyccl.reduce's dtype code + 1, 0 = none), root (16 bits, root + 1
mod 2**16, 0 = none), count (32 bits, count + 1 mod 2**32, 0 = not compared: all_to_all's
splits may differ per rank). 0 as a whole means "not checked" (send/recv, the torch backend).
"""
import numpy as np

from .dtypes import name_of
from .reduce import CODE_BY_NAME

#: collective codes, in the order of native/shm.h's PYCCL_COLL_* (1-based there and here)
COLLECTIVES = ("all_reduce", "reduce", "reduce_scatter", "all_gather", "broadcast", "all_to_all",
               "barrier", "gather", "scatter")
OPS = ("SUM", "PROD", "MIN", "MAX", "AVG")
FIELDS = ("collective", "op", "dtype", "root", "count")
_DTYPE_BY_CODE = {code: name for name, code in CODE_BY_NAME.items()}
_M32 = 0xFFFFFFFF


def pack(collective: str, dtype=None, count=None, root=-1, redop=None) -> int:
    """The call's 64-bit signature (0 for calls that are not collectives)."""
    if collective not in COLLECTIVES:
        return 0
    c = COLLECTIVES.index(collective) + 1
    o = OPS.index(str(redop).upper()) + 1 if redop is not None else 0
    d = _dtype_code(dtype) + 1 if dtype is not None else 0
    r = (int(root) + 1) & 0xFFFF if root is not None and root >= 0 else 0
    n = (int(count) + 1) & _M32 if count is not None and count >= 0 and collective != "all_to_all" else 0
    return c | o << 4 | d << 8 | r << 16 | n << 32


def _dtype_code(dtype) -> int:
    """The C core's code of a dtype or its name (-1: not one pyccl carries)."""
    code = CODE_BY_NAME.get(dtype) if isinstance(dtype, str) else None
    return code if code is not None else CODE_BY_NAME.get(name_of(np.dtype(dtype)), -1)


def unpack(call: int) -> dict:
    """{field: value or None} of a signature from pack()."""
    c, o, d, r, n = call & 15, call >> 4 & 15, call >> 8 & 255, call >> 16 & 0xFFFF, call >> 32 & _M32
    return {"collective": COLLECTIVES[c - 1] if 0 < c <= len(COLLECTIVES) else f"collective {c}",
            "op": (OPS[o - 1] if o <= len(OPS) else f"op {o}") if o else None,
            "dtype": _DTYPE_BY_CODE.get(d - 1, f"dtype {d - 1}") if d else None,
            "root": r - 1 if r else None,
            "count": n - 1 if n else None}


def describe(f: dict, unit="") -> str:
    """all_reduce(float32 x 1000, SUM) / broadcast(4000 bytes, root 1)."""
    parts = []
    if f.get("count") is not None:
        parts.append(f"{f['dtype']} x {f['count']}" if f.get("dtype") else f"{f['count']} {unit or 'elements'}")
    elif f.get("dtype"):
        parts.append(f["dtype"])
    if f.get("op"):
        parts.append(f["op"])
    if f.get("root") is not None:
        parts.append(f"root {f['root']}")
    return f"{f['collective']}({', '.join(parts)})"


def differences(theirs: dict, mine: dict) -> list:
    """The FIELDS whose values differ (a field one side leaves out counts only if the other
    has it, except count, which all_to_all leaves out on purpose)."""
    out = []
    for k in FIELDS:
        a, b = theirs.get(k), mine.get(k)
        if a != b and not (k == "count" and (a is None or b is None)):
            out.append(k)
    return out


def mismatch(peer: int, theirs: dict, mine: dict, unit="") -> str:
    """The words of a call mismatch with `peer` (fields as from unpack())."""
    diff = differences(theirs, mine) or ["call"]
    verb = "differs" if len(diff) == 1 else "differ"
    names = diff[0] if len(diff) == 1 else ", ".join(diff[:-1]) + " and " + diff[-1]
    return (f"call mismatch with rank {peer}: the {names} {verb} (it called "
            f"{describe(theirs, unit)}, this rank {describe(mine, unit)}; every rank must make the "
            f"same collective calls in the same order with the same op, dtype, count and root)")


def mismatch_of(peer: int, theirs: int, mine: int) -> str:
    return mismatch(peer, unpack(theirs), unpack(mine))
