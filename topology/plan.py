"""Plans are plain data: for each rank, an ordered list of stages of ops.

A plan says *what* moves between which ranks; the executor decides *how* (chunks,
pipelining, which transport). Buffers are named: "in" (the input), "out" (the
output; the same memory as "in" for in-place ops) and "tmp" (scratch the executor
allocates, `tmp_elems` long). Regions are element ranges of those buffers.

Stage semantics (the contract every builder and the executor share):
  * the ops of one stage are independent of each other and run concurrently;
  * a stage ends when every op in it that writes local memory has finished
    (sends may still be in flight; the executor waits for them before a region
    they read is overwritten);
  * messages between two ranks match in order: the k-th send from a to b is the
    k-th receive at b from a. Every region is cut into max(1, ceil(len/chunk))
    chunks; the executor runs "for chunk: for stage: for op", skipping ops that
    have fewer chunks, so both ends still agree on the order.

Op kinds (NCCL's primitives, one message per chunk):
  SEND(send_peer, src)                       send src
  RECV(recv_peer, dst)                       receive into dst
  RECV_REDUCE(recv_peer, src, dst)           dst = src (op) received
  RECV_REDUCE_SEND(recv_peer, send_peer, src, dst)  as above, then send dst
  RECV_COPY_SEND(recv_peer, send_peer, dst)  receive into dst, then send dst
  COPY(src, dst)                             local copy
"""
from dataclasses import dataclass, field
from typing import NamedTuple, Optional

SEND = "SEND"
RECV = "RECV"
RECV_REDUCE = "RECV_REDUCE"
RECV_REDUCE_SEND = "RECV_REDUCE_SEND"
RECV_COPY_SEND = "RECV_COPY_SEND"
COPY = "COPY"

RECEIVES = frozenset({RECV, RECV_REDUCE, RECV_REDUCE_SEND, RECV_COPY_SEND})
SENDS = frozenset({SEND, RECV_REDUCE_SEND, RECV_COPY_SEND})


class Region(NamedTuple):
    buf: str     # "in" | "out" | "tmp"
    start: int   # elements
    stop: int

    @property
    def length(self) -> int:
        return self.stop - self.start


class Op(NamedTuple):
    kind: str
    recv_peer: int = -1
    send_peer: int = -1
    src: Optional[Region] = None
    dst: Optional[Region] = None

    def __str__(self):
        peers = []
        if self.recv_peer >= 0:
            peers.append(f"from {self.recv_peer}")
        if self.send_peer >= 0:
            peers.append(f"to {self.send_peer}")
        regs = " ".join(f"{n}={r.buf}[{r.start}:{r.stop}]" for n, r in (("src", self.src), ("dst", self.dst)) if r)
        return f"{self.kind} {' '.join(peers)} {regs}".strip()


def send(peer, src):
    return Op(SEND, send_peer=peer, src=src)


def recv(peer, dst):
    return Op(RECV, recv_peer=peer, dst=dst)


def recv_reduce(peer, src, dst):
    return Op(RECV_REDUCE, recv_peer=peer, src=src, dst=dst)


def recv_reduce_send(rpeer, speer, src, dst):
    return Op(RECV_REDUCE_SEND, recv_peer=rpeer, send_peer=speer, src=src, dst=dst)


def recv_copy_send(rpeer, speer, dst):
    return Op(RECV_COPY_SEND, recv_peer=rpeer, send_peer=speer, dst=dst)


def copy(src, dst):
    return Op(COPY, src=src, dst=dst)


@dataclass
class RankPlan:
    """One rank's part of a plan."""

    op: str
    algo: str
    rank: int
    nranks: int
    stages: list = field(default_factory=list)   # list[list[Op]]
    tmp_elems: int = 0
    reduces: bool = False
    # True when later stages read sub-ranges or unions of regions written earlier (recursive
    # halving/doubling, hierarchical all-gather): such a plan is only correct when every region
    # moves as ONE message, so the executor must use chunk_elems >= max_region(plan).
    atomic: bool = False

    def peers(self) -> set:
        out = set()
        for stage in self.stages:
            for o in stage:
                if o.recv_peer >= 0:
                    out.add(o.recv_peer)
                if o.send_peer >= 0:
                    out.add(o.send_peer)
        return out

    def describe(self) -> str:
        lines = [f"rank {self.rank}/{self.nranks} {self.op} ({self.algo}), tmp={self.tmp_elems}"]
        for i, stage in enumerate(self.stages):
            lines.append(f"  stage {i}: " + "; ".join(str(o) for o in stage))
        return "\n".join(lines)


def max_region(plan) -> int:
    """Length of the longest region of a plan (what an atomic plan needs as chunk size)."""
    return max(((o.dst or o.src).length for st in plan.stages for o in st), default=0)


def block(count: int, nblocks: int, i: int) -> tuple:
    """Element range of block i when `count` is cut into `nblocks` near-equal blocks."""
    return count * i // nblocks, count * (i + 1) // nblocks


def nchunks(length: int, chunk_elems: int) -> int:
    """How many chunks a region is cut into; at least one, so empty messages still flow."""
    return max(1, -(-length // chunk_elems))


def chunk_of(region: Region, c: int, n: int) -> Region:
    """Chunk c of n of a region (near-equal cuts; both ends of a message cut alike)."""
    length = region.stop - region.start
    return Region(region.buf, region.start + length * c // n, region.start + length * (c + 1) // n)


def relabel(plan: RankPlan, members) -> RankPlan:
    """`plan`, built for a group numbered 0..len(members)-1, with every peer and the rank
    renamed to members[i] (the group's ranks in a bigger communicator), so the bigger
    communicator's executor and connections run it (e.g. one rail of a composed collective)."""
    def op(o):
        return o._replace(recv_peer=members[o.recv_peer] if o.recv_peer >= 0 else -1,
                          send_peer=members[o.send_peer] if o.send_peer >= 0 else -1)
    return RankPlan(plan.op, plan.algo, members[plan.rank], len(members),
                    [[op(o) for o in stage] for stage in plan.stages], plan.tmp_elems, plan.reduces,
                    plan.atomic)
