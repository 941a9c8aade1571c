"""One collective call, described once: what every engine is priced on and runs.

The communicator's validation (ccl/validate.py) makes a `Call` at the API edge; the engines
read it and nothing else of the caller's arguments. The memory kind ("cpu" or "cuda") is a
field, not a branch: it is one of the keys the engines are priced by (ccl/engines/choice.py).
"""


class Call:
    """op: the collective ("all_reduce", ..., "send", "recv", "barrier"); inp/out: Buffers
    (None where the call has none on this rank); kind: "cpu" or "cuda"; dtype, count, root and
    redop: what every rank must agree on (the signature); nbytes: the size the engines are
    priced by, the same on every rank; in_splits/out_splits: all_to_all's element counts
    (tuples, or CUDA int tensors); even: no splits were given (MPI Alltoall, not Alltoallv);
    peer: send/recv's other rank; reproducible: the communicator is in reproducible mode and
    the reduction depends on order (float SUM/AVG); async_op: the caller wants a Work back;
    stream: engine data bound on the caller's thread (the caller's CUDA stream and events).

    The fields most calls leave alone are class defaults, set on the instance only where a
    call has them: an 8-byte all_reduce is mostly Python time, and making this object is part
    of it (positional arguments, few assignments)."""

    in_splits = out_splits = stream = None
    even = True
    dev_splits = False               # all_to_all's split sizes are CUDA int tensors
    peer = -1

    def __init__(self, op, inp=None, out=None, kind="cpu", dtype=None, count=0, nbytes=0, redop=None, root=-1,
                 reproducible=False, async_op=False):
        self.op = op
        self.inp = inp
        self.out = out
        self.kind = kind
        self.dtype = dtype
        self.count = count
        self.nbytes = nbytes
        self.redop = redop
        self.root = root
        self.reproducible = reproducible
        self.async_op = async_op

    @property
    def sig(self) -> dict:
        """What every rank must agree on (flight recorder, PYCCL_CHECK, the wire signature)."""
        if self.dtype is None:
            return {}
        return {"dtype": self.dtype, "count": self.count, "root": self.root,
                "redop": self.redop.name if self.redop is not None else None}

    def __repr__(self):
        bits = [self.kind, f"{self.dtype} x {self.count}" if self.dtype else "", f"{self.nbytes} B"]
        if self.redop is not None:
            bits.append(self.redop.name)
        if self.root >= 0:
            bits.append(f"root {self.root}")
        if self.peer >= 0:
            bits.append(f"peer {self.peer}")
        return f"{self.op}({', '.join(b for b in bits if b)})"
