"""The topology model the plan builders and the tuner see: hosts -> ranks, and which
transport joins two ranks.

`Topology` is plain, hashable data (every rank builds the same one from what the
bootstrap exchanged, so every rank derives the same plans and tuner choices):

    hosts  rank -> host index (0..H-1, dense, numbered by first appearance)
    intra  transport between ranks of one host ("shm", or "cuda_ipc" for GPU buffers)
    inter  transport between hosts ("tcp" or "ibverbs")

`ring_order()` is the rank order every ring/tree/halving-doubling plan walks: hosts one
after another, ranks of one host contiguous, so a ring crosses each host boundary once
and an in-order tree has few edges leaving a host (see tree.py).

`build_plan()` is the one entry point from an algorithm name to a RankPlan; the
communicator calls it with the tuner's Choice.
"""
from dataclasses import dataclass
from functools import cached_property
from typing import Optional, Sequence

ALGOS = ("ring", "tree", "hierarchical", "halving_doubling", "direct", "composed")

#: spellings accepted for algorithm names (PYCCL_ALGO, the CLI)
ALIASES = {"double_tree": "tree", "dtree": "tree", "binary_tree": "tree", "btree": "tree",
           "hd": "halving_doubling", "rabenseifner": "halving_doubling",
           "recursive_halving_doubling": "halving_doubling",
           "hier": "hierarchical", "2d": "hierarchical", "ring": "ring", "tree": "tree",
           "hierarchical": "hierarchical", "halving_doubling": "halving_doubling", "direct": "direct",
           "composed": "composed"}

#: which algorithm builds which collective
APPLIES = {
    "all_reduce": ("ring", "tree", "hierarchical", "halving_doubling", "composed"),
    "reduce": ("ring", "tree", "hierarchical", "composed"),
    "broadcast": ("ring", "tree", "hierarchical", "composed"),
    "all_gather": ("ring", "hierarchical", "composed"),
    "reduce_scatter": ("ring", "hierarchical", "composed"),
    "all_to_all": ("direct",), "gather": ("direct",), "scatter": ("direct",),
}

#: inter-host algorithms of hierarchical all_reduce
INTER_ALGOS = ("ring", "tree", "halving_doubling")
#: collectives composed (gather, scatter, all_to_all stay flat direct plans); topology/composed.py
COMPOSED_OPS = ("all_reduce", "reduce_scatter", "all_gather", "broadcast", "reduce", "barrier")


def canonical_algo(name: str) -> str:
    """'double_tree' -> 'tree', 'hd' -> 'halving_doubling', ...; ValueError if unknown."""
    key = name.strip().lower().replace("-", "_")
    if key not in ALIASES:
        raise ValueError(f"unknown algorithm {name!r}; expected one of {', '.join(ALGOS)} "
                         f"(aliases: {', '.join(sorted(k for k in ALIASES if k not in ALGOS))})")
    return ALIASES[key]


@dataclass(frozen=True)
class Topology:
    hosts: tuple            # host index of every rank
    intra: str = "shm"
    inter: str = "tcp"
    names: tuple = ()       # optional host names, by host index

    def __post_init__(self):
        hosts = tuple(int(h) for h in self.hosts)
        if not hosts:
            raise ValueError("Topology: no ranks")
        seen = sorted(set(hosts))
        if seen != list(range(len(seen))):
            raise ValueError(f"Topology: host indices must be 0..H-1 with none missing, got {seen[:8]}...")
        object.__setattr__(self, "hosts", hosts)
        object.__setattr__(self, "names", tuple(self.names))

    # ---- constructors ----------------------------------------------------------------------
    @classmethod
    def uniform(cls, nhosts: int, ranks_per_host: int, intra: str = "shm", inter: str = "tcp"):
        """H hosts of L ranks, ranks numbered host by host (rank = host * L + local)."""
        if nhosts < 1 or ranks_per_host < 1:
            raise ValueError(f"Topology.uniform: need >= 1 host and >= 1 rank per host, "
                             f"got {nhosts} x {ranks_per_host}")
        return cls(tuple(r // ranks_per_host for r in range(nhosts * ranks_per_host)), intra, inter)

    @classmethod
    def from_host_ids(cls, ids: Sequence, intra: str = "shm", inter: str = "tcp"):
        """From one host identity per rank (e.g. Communicator.peer_info[r]["host"]);
        hosts are numbered in order of first appearance."""
        index = {}
        hosts = tuple(index.setdefault(i, len(index)) for i in ids)
        return cls(hosts, intra, inter, tuple(index))

    @classmethod
    def single_host(cls, nranks: int, intra: str = "shm"):
        return cls((0,) * nranks, intra, intra)

    # ---- queries ---------------------------------------------------------------------------
    @property
    def nranks(self) -> int:
        return len(self.hosts)

    @property
    def nhosts(self) -> int:
        return max(self.hosts) + 1

    def ranks_of(self, host: int) -> list:
        return [r for r, h in enumerate(self.hosts) if h == host]

    def members(self) -> list:
        """Ranks of every host, ascending: members()[h][local]."""
        out = [[] for _ in range(self.nhosts)]
        for r, h in enumerate(self.hosts):
            out[h].append(r)
        return out

    def local_sizes(self) -> tuple:
        sizes = [0] * self.nhosts
        for h in self.hosts:
            sizes[h] += 1
        return tuple(sizes)

    @property
    def uniform_hosts(self) -> bool:
        return len(set(self.local_sizes())) == 1

    @property
    def ranks_per_host(self) -> int:
        """Ranks of the smallest host (== every host's for a uniform topology)."""
        return min(self.local_sizes())

    def local_rank(self, rank: int) -> int:
        h = self.hosts[rank]
        return sum(1 for r in range(rank) if self.hosts[r] == h)

    def same_host(self, a: int, b: int) -> bool:
        return self.hosts[a] == self.hosts[b]

    def transport(self, a: int, b: int) -> str:
        return self.intra if self.hosts[a] == self.hosts[b] else self.inter

    def ring_order(self) -> Sequence:
        """Hosts in index order, each host's ranks contiguous and ascending.

        Returns range(n) when that is already the identity (O(1) index lookups at 16k ranks)."""
        return self._ring_order

    @cached_property
    def _ring_order(self) -> Sequence:
        n = self.nranks
        if all(self.hosts[r] <= self.hosts[r + 1] for r in range(n - 1)):
            return range(n)
        return [r for members in self.members() for r in members]

    def describe(self) -> str:
        sizes = self.local_sizes()
        shape = f"{self.nhosts} x {sizes[0]}" if self.uniform_hosts else f"{self.nhosts} hosts of {sizes}"
        return f"{self.nranks} ranks on {shape} ({self.intra} inside a host, {self.inter} between hosts)"


def ring_order(topo: Topology) -> Sequence:
    return topo.ring_order()


def applicable(op: str, algo: str, topo: Topology) -> bool:
    """Can `algo` build `op` on this topology? (hierarchical needs >1 host and >1 rank on a
    host (else it is ring/tree by another name); its all_gather/reduce_scatter need the same number of ranks on every host;
    composed: see composed.py)."""
    algo = canonical_algo(algo)
    if algo not in APPLIES.get(op, ()):
        return False
    if algo == "composed":
        return composed_applicable(op, topo)
    if algo == "hierarchical":
        if topo.nhosts < 2 or max(topo.local_sizes()) < 2:
            return False
        if op in ("all_gather", "reduce_scatter") and not topo.uniform_hosts:
            return False
    return True


def composed_applicable(op: str, topo: Topology) -> bool:
    """Composed needs >1 host, the same number of ranks (>1) on every host."""
    return op in COMPOSED_OPS and topo.nhosts > 1 and topo.uniform_hosts and topo.ranks_per_host > 1


def build_plan(op: str, algo: str, rank: int, topo: Topology, count: int, root: int = 0,
               chunk_elems: Optional[int] = None, inter: Optional[str] = None):
    """The RankPlan of `rank` for collective `op` with `algo` on `topo`.

    count: elements per rank as the collective defines it (all_gather: input count;
    reduce_scatter: output count). chunk_elems: the executor's chunk (pipelined plans cut
    their data into segments of about this size; atomic plans bound their messages by it).
    inter: hierarchical all_reduce's inter-host algorithm ("ring", "tree", "halving_doubling").
    """
    from . import halving_doubling, hierarchical, ring, tree
    algo = canonical_algo(algo)
    if algo not in APPLIES.get(op, ()):
        raise ValueError(f"{algo} does not build {op}; {op} is built by {', '.join(APPLIES.get(op, ())) or 'nothing here'}")
    if algo == "composed":
        raise ValueError("composed is not one plan: node-local engine calls around a rail plan "
                         "(topology/composed.py describes it, ccl/engines/composed.py runs it)")
    order = topo.ring_order()
    if algo == "ring":
        fn = getattr(ring, op)
        return fn(rank, order, count, root) if op in ("reduce", "broadcast") else fn(rank, order, count)
    if algo == "tree":
        if op == "all_reduce":
            return tree.all_reduce(rank, order, count, chunk_elems=chunk_elems)
        return getattr(tree, op)(rank, order, count, root, chunk_elems=chunk_elems)
    if algo == "halving_doubling":
        return halving_doubling.all_reduce(rank, order, count, max_elems=chunk_elems)
    if algo == "hierarchical":
        if op == "all_reduce":
            return hierarchical.all_reduce(rank, topo.hosts, count, inter=inter or "tree",
                                           chunk_elems=chunk_elems)
        if op in ("reduce", "broadcast"):
            return getattr(hierarchical, op)(rank, topo.hosts, count, root, chunk_elems=chunk_elems)
        return getattr(hierarchical, op)(rank, topo.hosts, count)
    raise ValueError(f"{algo} plans for {op} are built by topology/direct.py")


def build_all(op: str, algo: str, topo: Topology, count: int, root: int = 0,
              chunk_elems: Optional[int] = None, inter: Optional[str] = None) -> list:
    """Every rank's plan (for the simulator, the cost walker and drawings)."""
    return [build_plan(op, algo, r, topo, count, root, chunk_elems, inter) for r in range(topo.nranks)]
