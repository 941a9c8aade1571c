"""Alpha-beta-gamma cost model: how long a collective takes on a topology, per algorithm.

Each transport is three numbers (LinkCost):
  alpha  seconds per message: wire latency plus the Python executor's per-message work
  beta   seconds per byte moved (1 / bandwidth); between hosts this is the host's NIC,
         shared by every flow that leaves the host at once
  gamma  seconds per byte reduced (1 / reduction bandwidth where that transport's data
         lives: CPU for shm/tcp/ibverbs, GPU for cuda_ipc); also charged for local copies

Defaults (DEFAULTS) are round numbers for a Python executor. `python -m pyccl.tune` measures
them on a host and writes a profile (ccl/tune.py; ~/.cache/pyccl/tune-<host>.json, or
PYCCL_TUNE_PROFILE) that transport_costs() loads over the defaults; a communicator uses rank
0's profile on every rank. Override single numbers per transport in the environment
(identical on every rank, or ranks may choose differently): PYCCL_ALPHA_<T> (µs),
PYCCL_BW_<T> and PYCCL_REDUCE_BW_<T> (GB/s), e.g. PYCCL_ALPHA_TCP=40, declared in pyccl.settings.

Two ways to cost:
  predict(op, algo, nbytes, topo, costs, chunk_bytes)  closed forms below, O(1)-ish,
      used by the tuner and for the 2..16,384-rank crossover picture;
  walk(plans, topo, costs, itemsize, chunk_bytes)      replays the real plans the way the
      executor runs them ("for chunk: for stage", sends asynchronous, a stage ends when
      its receives are done), with per-rank (intra) and per-host (inter) send/receive
      ports, and returns the critical-path time and every message's interval (the chunk
      schedule drawn by draw.py). Use it to check the closed forms on small clusters.

Sizes: nbytes is the user's buffer for all_reduce/reduce/broadcast and the *large* buffer
(N x count) for all_gather/reduce_scatter, as nccl-tests reports them.
"""
import os
from collections import deque
from dataclasses import dataclass
from typing import NamedTuple, Optional

from pyccl import settings

from . import tree
from .graph import INTER_ALGOS, Topology, build_all, canonical_algo

DEFAULT_CHUNK_BYTES = 1 << 20


@dataclass(frozen=True)
class LinkCost:
    alpha: float        # s per message
    beta: float         # s per byte
    gamma: float        # s per byte reduced/copied

    @classmethod
    def of(cls, alpha_us: float, bw_gbs: float, reduce_gbs: float):
        return cls(alpha_us * 1e-6, 1.0 / (bw_gbs * 1e9), 1.0 / (reduce_gbs * 1e9))

    def scaled(self, flows: int) -> "LinkCost":
        """The same link shared by `flows` concurrent flows (bandwidth divided)."""
        return LinkCost(self.alpha, self.beta * flows, self.gamma)


DEFAULTS = {
    "shm": LinkCost.of(4.0, 10.0, 6.0),          # shared memory, CPU reduce
    "tcp": LinkCost.of(30.0, 1.25, 6.0),         # 10 GbE
    "ibverbs": LinkCost.of(6.0, 12.0, 6.0),      # 100 Gb/s RDMA
    "cuda_ipc": LinkCost.of(10.0, 150.0, 1000.0),  # NVLink, GPU reduce
    # not a transport: the node-local shared-memory C collectives (ccl/engines/shm.py), a
    # whole local phase of a composed collective in one call (pyccl.tune measures it)
    "shm_engine": LinkCost.of(4.0, 10.0, 6.0),
}
#: the cost entry of the node-local engine that runs a composed collective's local phases
SHM_ENGINE = "shm_engine"


def measured_costs(profile: dict) -> dict:
    """{transport: LinkCost} of a profile from topology/profile.py's load()."""
    return {name: LinkCost.of(v["alpha_us"], v["bw_gbs"], v["reduce_gbs"]) for name, v in (profile or {}).items()}


def transport_costs(env=None, measured: Optional[dict] = None) -> dict:
    """{transport: LinkCost}: measured values over DEFAULTS, then PYCCL_* overrides.

    measured: {transport: LinkCost}; {} means none (the defaults); None loads the profile
    (topology/profile.py's load) when env is the process environment (None) or names PYCCL_TUNE_PROFILE,
    so that an explicit env dict stays a pure input (tests, the plan CLI's what-ifs)."""
    if measured is None:
        from .profile import load
        measured = measured_costs(load(env)) if env is None or "PYCCL_TUNE_PROFILE" in env else {}
    env = os.environ if env is None else env
    out = dict(DEFAULTS)
    out.update(measured)
    for name, c in list(out.items()):
        key = name.upper()
        alpha, beta, gamma = c.alpha, c.beta, c.gamma
        over = [settings.get(f"PYCCL_{what}_{key}", env) for what in ("ALPHA", "BW", "REDUCE_BW")]
        if over[0] is not None:
            alpha = over[0] * 1e-6
        if over[1] is not None:
            beta = 1.0 / (over[1] * 1e9)
        if over[2] is not None:
            gamma = 1.0 / (over[2] * 1e9)
        out[name] = LinkCost(alpha, beta, gamma)
    return out


def _ceil(a, b):
    return -(-int(a) // int(b)) if b > 0 else 1


def _cost_of(costs: dict, name: str) -> LinkCost:
    """The costs of transport `name`; an unknown name is costed as tcp (the fallback transport)."""
    return costs.get(name) or costs.get("tcp") or DEFAULTS["tcp"]


def _links(topo: Topology, costs: dict):
    intra = _cost_of(costs, topo.intra)
    inter = _cost_of(costs, topo.inter) if topo.nhosts > 1 else intra
    slow = inter if inter.beta >= intra.beta else intra
    return intra, inter, slow


def _tree_levels(n: int, hosts: int):
    """(levels inside hosts, levels across hosts) of an in-order tree over n positions."""
    d = tree.depth(n)
    if hosts <= 1:
        return d, 0
    de = min(d, tree.depth(hosts) + 1)
    return d - de, de


def _segs(nbytes: float, chunk: int):
    """Tree segments and chunks per segment, as tree.segments() and the executor cut them."""
    k = max(1, min(tree.MAX_SEGMENTS, _ceil(nbytes, chunk)))
    seg = nbytes / k
    passes = max(1, _ceil(seg, chunk))
    return k, passes, seg / passes


def predict(op: str, algo: str, nbytes: int, topo: Topology, costs: dict,
            chunk_bytes: Optional[int] = None, inter: Optional[str] = None) -> float:
    """Predicted seconds for one collective (closed forms; see the module docstring)."""
    algo = canonical_algo(algo)
    n, H = topo.nranks, topo.nhosts
    if n == 1 or nbytes == 0:
        return 0.0
    if algo == "composed":
        return sum(p.seconds for p in composed_phases(op, nbytes, topo, costs, chunk_bytes))
    chunk = chunk_bytes or DEFAULT_CHUNK_BYTES
    ci, ce, cs = _links(topo, costs)
    S = float(nbytes)
    if algo == "ring":
        # The ring crosses each host boundary once: H of its N hops are inter-host. Latency
        # adds up hop by hop along the ring; bandwidth is set by the slowest hop.
        inter_hops = H if H > 1 else 0
        a_avg = (inter_hops * ce.alpha + (n - inter_hops) * ci.alpha) / n
        if op in ("all_reduce", "all_gather", "reduce_scatter"):
            b = S / n
            k = max(1, _ceil(b, chunk))
            steps = 2 * (n - 1) if op == "all_reduce" else n - 1
            red = 0.0 if op == "all_gather" else (n - 1) * b * cs.gamma
            return steps * (k * a_avg + b * cs.beta) + red
        k = max(1, _ceil(S, chunk))
        c = S / k
        red = 1.0 if op == "reduce" else 0.0
        hops_e = H - 1 if H > 1 else 0
        fill = hops_e * (ce.alpha + c * (ce.beta + red * ce.gamma)) + (n - 1 - hops_e) * (ci.alpha + c * (ci.beta + red * ci.gamma))
        return fill + (k - 1) * (cs.alpha + c * (cs.beta + red * cs.gamma))
    if algo == "tree":
        di, de = _tree_levels(n, H)
        if op == "all_reduce":
            if H > 1 and ce.beta >= ci.beta:    # the two trees' edges leave a host side by side
                cs = ce.scaled(2)
            k, passes, c = _segs(S / 2, chunk)

            def t_up(l):
                return l.alpha + 2 * c * (l.beta + l.gamma)

            def t_down(l):
                return l.alpha + 2 * c * l.beta
            return passes * ((k - 1) * (t_up(cs) + t_down(cs)) + di * (t_up(ci) + t_down(ci))
                             + de * (t_up(ce) + t_down(ce)))
        k, passes, c = _segs(S, chunk)
        red = 1.0 if op == "reduce" else 0.0

        def t(l):
            return l.alpha + 2 * c * (l.beta + red * l.gamma)
        return passes * ((k - 1) * t(cs) + di * t(ci) + de * t(ce))
    if algo == "halving_doubling":
        if op != "all_reduce":
            raise ValueError(f"halving_doubling does not build {op}")
        return _hd(n, S, topo, ci, ce, chunk)
    if algo == "hierarchical":
        return _hier(op, S, topo, costs, chunk, inter)
    raise ValueError(f"no cost model for {algo} {op}")


def _hd(n, S, topo, ci, ce, chunk, flows=None):
    p = 1 << (n.bit_length() - 1)
    g = max(1, _ceil(S, chunk))                        # segments (messages per exchange)
    L = topo.ranks_per_host if topo.nhosts > 1 else n
    flows = L if flows is None else flows
    ce_f = ce.scaled(flows)
    t = 0.0
    if n != p:
        t += 2 * g * ci.alpha + S * (2 * ci.beta + ci.gamma)
    mask, size = 1, S
    while mask < p:
        size /= 2
        link = ci if (topo.nhosts <= 1 or mask < L) else ce_f
        t += 2 * g * link.alpha + size * (2 * link.beta + link.gamma)
        mask *= 2
    return t


def _hier(op, S, topo, costs, chunk, inter):
    ci = _cost_of(costs, topo.intra)
    ce = _cost_of(costs, topo.inter) if topo.nhosts > 1 else ci
    H = topo.nhosts
    sizes = topo.local_sizes()
    L, Lmax = min(sizes), max(sizes)
    n = topo.nranks
    if op == "all_reduce":
        B = S / L                                       # one slice
        group = Topology.uniform(H, 1, topo.inter, topo.inter)
        shared = dict(costs)
        shared[topo.inter] = ce.scaled(L)               # L slices cross the host NIC at once
        options = [inter] if inter else list(INTER_ALGOS)
        t_inter = min(predict("all_reduce", a, int(B), group, shared, chunk) for a in options) if H > 1 else 0.0
        regions = 1
        if inter == "ring":
            regions = H
        elif inter in (None, "tree"):
            regions = 2 * _segs(B / 2, chunk)[0]
        msgs = max(regions, _ceil(B, chunk))
        return (Lmax - 1) * (msgs * ci.alpha + B * (2 * ci.beta + ci.gamma)) + t_inter
    if op in ("reduce", "broadcast"):
        k, passes, c = _segs(S, chunk)
        red = 1.0 if op == "reduce" else 0.0
        di, de = tree.depth(Lmax), tree.depth(H)

        def t(l):
            return l.alpha + 2 * c * (l.beta + red * l.gamma)
        slow = ce if ce.beta >= ci.beta else ci
        return passes * ((k - 1) * t(slow) + di * t(ci) + de * t(ce))
    b = S / n
    red = ci.gamma if op == "reduce_scatter" else 0.0
    return ((H - 1) * (ce.alpha + b * (ce.beta * L + red)) + (L - 1) * (ci.alpha + H * b * (ci.beta + red))
            + S * ci.gamma)


def best_inter(S_slice: float, topo: Topology, costs: dict, chunk: int) -> str:
    """The inter-host algorithm hierarchical all_reduce should use (first of the cheapest)."""
    if topo.nhosts < 2:
        return "tree"
    L = topo.ranks_per_host
    group = Topology.uniform(topo.nhosts, 1, topo.inter, topo.inter)
    shared = dict(costs)
    shared[topo.inter] = _cost_of(costs, topo.inter).scaled(L)
    times = [(predict("all_reduce", a, int(S_slice), group, shared, chunk), a) for a in ("tree", "ring", "halving_doubling")]
    best = min(t for t, _ in times)
    return next(a for t, a in times if t <= best * (1 + 1e-9))


# ---- walking real plans --------------------------------------------------------------------
class Message(NamedTuple):
    src: int
    dst: int
    start: float        # leaves the sender's port
    end: float          # fully received
    nbytes: int
    stage: int          # sender's (expanded) stage index
    kind: str


class Timeline(NamedTuple):
    time: float                 # when the last rank finished
    finish: list                # per rank
    messages: list              # Message, in the order they were matched


def walk(plans, topo: Topology, costs: dict, itemsize: int = 4, chunk_bytes: int = DEFAULT_CHUNK_BYTES,
         record: bool = True) -> Timeline:
    """Replay `plans` (one per rank) under the cost model, as the executor would run them."""
    from .simulate import PlanError
    from .walk import chunked_stages
    n = len(plans)
    chunk_elems = max(1, chunk_bytes // itemsize)
    xs = [chunked_stages(p, chunk_elems) for p in plans]     # each rank's steps, in order
    hosts = topo.hosts
    port = {}
    cpu = [0.0] * n                  # when each rank's CPU is free (reductions and copies are serial)
    chans = {}
    now = [0.0] * n
    stage_at = [0] * n
    pending = [None] * n
    ready = deque(range(n))
    queued = [True] * n
    msgs = []

    def link(a, b):
        return _cost_of(costs, topo.transport(a, b))

    def key(r, other, d):
        return ("h", hosts[r], d) if hosts[r] != hosts[other] else ("r", r, d)

    def post(r, peer, nelems, t, si, kind):
        nb = nelems * itemsize
        lk = link(r, peer)
        k = key(r, peer, "tx")
        start = max(t, port.get(k, 0.0))
        port[k] = start + nb * lk.beta
        chans.setdefault((r, peer), deque()).append((start, start + nb * lk.beta, nb, si, kind))
        if not queued[peer]:
            queued[peer] = True
            ready.append(peer)

    while ready:
        r = ready.popleft()
        queued[r] = False
        stages = xs[r]
        while stage_at[r] < len(stages):
            si = stage_at[r]
            st = stages[si]
            if pending[r] is None:
                pending[r] = ([], now[r], now[r])       # (receives left, stage start, stage end)
                t0 = now[r]
                for o in st:
                    if o.kind == "COPY":
                        t0 = cpu[r] = max(t0, cpu[r]) + o.dst.length * itemsize * _cost_of(costs, topo.intra).gamma
                    elif o.kind == "SEND":
                        post(r, o.send_peer, o.src.length, t0, si, o.kind)
                    else:
                        pending[r][0].append(o)
                pending[r] = (pending[r][0], t0, t0)
            left, t0, tend = pending[r]
            still = []
            for o in left:
                q = chans.get((o.recv_peer, r))
                if not q or any(p.recv_peer == o.recv_peer for p in still):
                    still.append(o)
                    continue
                start, tx_end, nb, ssi, kind = q.popleft()
                lk = link(o.recv_peer, r)
                k = key(r, o.recv_peer, "rx")
                done = max(tx_end, port.get(k, 0.0) + nb * lk.beta)
                port[k] = done
                got = max(t0, done + lk.alpha)
                if o.kind in ("RECV_REDUCE", "RECV_REDUCE_SEND"):
                    got = cpu[r] = max(got, cpu[r]) + nb * lk.gamma
                if record:
                    msgs.append(Message(o.recv_peer, r, start, done + lk.alpha, nb, ssi, kind))
                if o.kind in ("RECV_REDUCE_SEND", "RECV_COPY_SEND"):
                    post(r, o.send_peer, o.dst.length, got, si, o.kind)
                tend = max(tend, got)
            if still:
                pending[r] = (still, t0, tend)
                break
            pending[r] = None
            now[r] = tend
            stage_at[r] += 1
    stuck = [r for r in range(n) if stage_at[r] < len(xs[r])]
    if stuck:
        raise PlanError(f"walk: deadlock, {len(stuck)} ranks stuck (e.g. rank {stuck[0]})")
    return Timeline(max(now, default=0.0), now, msgs)


def walk_time(op: str, algo: str, nbytes: int, topo: Topology, costs: dict,
              chunk_bytes: int = DEFAULT_CHUNK_BYTES, itemsize: int = 4, root: int = 0,
              inter: Optional[str] = None) -> float:
    """Build every rank's plan for nbytes and walk it (small clusters: it is per op)."""
    n = topo.nranks
    elems = nbytes // itemsize
    count = elems // n if op in ("all_gather", "reduce_scatter") else elems
    plans = build_all(op, algo, topo, count, root=root, chunk_elems=max(1, chunk_bytes // itemsize), inter=inter)
    return walk(plans, topo, costs, itemsize, chunk_bytes, record=False).time


# ---- the composed collective (topology/composed.py): its phases, costed -----------------------
#: the flat algorithms a composed collective's rail phase may use, per op
RAIL_ALGOS = {"all_reduce": ("ring", "tree", "halving_doubling"), "reduce_scatter": ("ring",),
              "all_gather": ("ring",), "broadcast": ("ring", "tree"), "reduce": ("ring", "tree")}


class Phase(NamedTuple):
    scope: str          # "local" (every host at once) | "rail"
    op: str
    nbytes: int         # the phase's buffer, counted as predict() counts sizes
    algo: str           # local engine, or the rail's flat algorithm
    seconds: float


def composed_phases(op: str, nbytes: int, topo: Topology, costs: dict, chunk_bytes=None) -> list:
    """The phases of composed `op` of nbytes on topo, each with its predicted seconds
    (topology/composed.py: the composed collective; its rail phase is a flat plan costed here)."""
    H, L = topo.nhosts, topo.ranks_per_host
    engine = SHM_ENGINE if topo.intra == "shm" and SHM_ENGINE in costs else topo.intra
    label = "CUDA IPC engine" if topo.intra == "cuda_ipc" else "shm engine"
    ci, ce = _cost_of(costs, engine), _cost_of(costs, topo.inter)
    rail_topo = Topology.uniform(H, 1, topo.inter, topo.inter)
    S = int(nbytes)

    def local(name, b, reduces=False, copies=0.0):
        t = ci.alpha + b * (L - 1) / L * (ci.beta + (ci.gamma if reduces else 0.0)) + copies * b * ci.gamma
        return Phase("local", name, b, label, t)

    def rail(name, b, shared=True):
        c = dict(costs)
        c[topo.inter] = ce.scaled(L) if shared else ce
        best = min(((predict(name, a, b, rail_topo, c, chunk_bytes), a) for a in RAIL_ALGOS[name]),
                   key=lambda x: x[0])
        return Phase("rail", name, b, best[1], best[0])

    if op == "all_reduce":
        return [local("reduce_scatter", S, True), rail("all_reduce", S // L), local("all_gather", S)]
    if op == "reduce_scatter":
        return [local("reduce_scatter", S, True, copies=1.0), rail("reduce_scatter", S // L)]
    if op == "all_gather":
        return [rail("all_gather", S // L), local("all_gather", S, copies=1.0)]
    if op == "broadcast":
        return [rail("broadcast", S, shared=False), local("broadcast", S)]
    if op == "reduce":
        return [local("reduce", S, True), rail("reduce", S, shared=False)]
    if op == "barrier":
        return [local("barrier", 0), Phase("rail", "barrier", 0, "dissemination",
                                           max(1, (H - 1).bit_length()) * ce.alpha)]
    raise ValueError(f"composed does not build {op}")
