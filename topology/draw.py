"""Pictures of plans (needs matplotlib: pip install matplotlib, or pip install -e ".[plot]").

draw_plan(op, algo, topo, path)   left: who talks to whom (ranks along the ring order,
    hosts as shaded bands; trees drawn in-order, one panel per tree; other plans as an arc
    diagram coloured by the stage where a pair first talks, solid inside a host, dashed
    between hosts); right: the chunk schedule the cost model predicts (cost.walk): one row
    per rank, one bar per message while it leaves the sender, coloured by stage, so the
    pipeline shows as diagonal bands. Large clusters are drawn on a sub-cluster (at most
    4 hosts x 8 ranks) with the same algorithm; the title says so.
draw_crossover(path)              predicted all-reduce time of ring, tree, hierarchical and
    halving-doubling as the cluster grows from 2 to 16,384 ranks (8 per host), for a
    latency-bound, a medium and a bandwidth-bound size (docs/crossover.png).
"""
from . import cost, tree
from .graph import Topology, build_all, canonical_algo


def _plt():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _host_bands(ax, topo, order, ymin, ymax):
    pos = {r: i for i, r in enumerate(order)}
    for h, members in enumerate(topo.members()):
        xs = [pos[r] for r in members]
        ax.axvspan(min(xs) - 0.45, max(xs) + 0.45, color=f"C{h % 10}", alpha=0.08, lw=0)
        ax.text((min(xs) + max(xs)) / 2, ymax, f"host {h}", ha="center", va="bottom", fontsize=7, color="0.3")
    ax.set_ylim(ymin, ymax + 0.6)


def _draw_trees(axes, topo, order):
    m = len(order)
    for ax, shape, name in zip(axes, (tree.tree_a, tree.tree_b), ("tree A (first half)", "tree B (second half)")):
        depth = {}

        def d(i):
            if i not in depth:
                p = shape(m, i)[0]
                depth[i] = 0 if p < 0 else d(p) + 1
            return depth[i]
        maxd = max(d(i) for i in range(m))
        _host_bands(ax, topo, order, -maxd - 0.5, 0.5)
        for i in range(m):
            p, ch = shape(m, i)
            inner = bool(ch)
            if p >= 0:
                inter = topo.hosts[order[i]] != topo.hosts[order[p]]
                ax.plot([i, p], [-d(i), -d(p)], "-" if not inter else "--", color="0.35" if not inter else "C3", lw=1)
            ax.scatter([i], [-d(i)], s=110 if inner else 60, zorder=3,
                       color=f"C{topo.hosts[order[i]] % 10}", edgecolor="k" if inner else "none")
            ax.text(i, -d(i), str(order[i]), ha="center", va="center", fontsize=6, zorder=4)
        ax.set_title(f"{name}: filled ring = interior, red dashed = between hosts", fontsize=8)
        ax.set_yticks([])
        ax.set_xticks([])


def _draw_arcs(ax, plans, topo, order):
    import matplotlib.patches as mp
    pos = {r: i for i, r in enumerate(order)}
    first = {}
    nst = max((len(p.stages) for p in plans), default=1)
    for p in plans:
        for si, st in enumerate(p.stages):
            for o in st:
                if o.send_peer >= 0:
                    key = (p.rank, o.send_peer)
                    first[key] = min(first.get(key, si), si)
    cmap = _plt().get_cmap("viridis")
    top = 1.0
    for (a, b), si in sorted(first.items(), key=lambda kv: -kv[1]):
        x0, x1 = pos[a], pos[b]
        w = abs(x1 - x0)
        h = 0.5 + 0.5 * (w / max(1, len(order))) * 6
        top = max(top, h)
        inter = topo.hosts[a] != topo.hosts[b]
        sign = 1 if x1 > x0 else -1          # forward arcs above, backward below
        ax.add_patch(mp.Arc(((x0 + x1) / 2, 0), w, 2 * h, theta1=0 if sign > 0 else 180,
                            theta2=180 if sign > 0 else 360, color=cmap(si / max(1, nst - 1)),
                            ls="--" if inter else "-", lw=0.9))
    _host_bands(ax, topo, order, -top - 0.2, top + 0.2)
    for r in order:
        ax.scatter([pos[r]], [0], s=60, color=f"C{topo.hosts[r] % 10}", zorder=3)
        ax.text(pos[r], 0, str(r), ha="center", va="center", fontsize=6, zorder=4)
    ax.set_xlim(-1, len(order))
    ax.set_yticks([])
    ax.set_xticks([])
    ax.set_title("who talks to whom (arc colour: first stage, dark = early; above: forward in the ring "
                 "order, below: backward; dashed: between hosts)", fontsize=7)


def _draw_schedule(ax, plans, topo, costs, itemsize, chunk_bytes):
    tl = cost.walk(plans, topo, costs, itemsize, chunk_bytes)
    cmap = _plt().get_cmap("plasma")
    nst = max((m.stage for m in tl.messages), default=0) + 1
    for m in tl.messages:
        ax.barh(m.src, max(m.end - m.start, tl.time * 0.002) * 1e6, left=m.start * 1e6, height=0.7,
                color=cmap(m.stage / max(1, nst)), lw=0)
    ax.set_xlabel("predicted time (us)")
    ax.set_ylabel("sending rank")
    ax.invert_yaxis()
    ax.set_title(f"chunk schedule from the cost model: {len(tl.messages)} messages, "
                 f"{tl.time * 1e6:.0f} us (colour: stage)", fontsize=8)
    return tl


def draw_plan(op, algo, topo: Topology, path, costs=None, inter=None, root=0, nbytes=None,
              chunk_bytes=None, max_hosts=4, max_local=8):
    """Draw the structure and chunk schedule of `algo`'s plan for `op` (see module doc)."""
    plt = _plt()
    algo = canonical_algo(algo)
    costs = costs or cost.transport_costs()
    note = ""
    if topo.nranks > max_hosts * max_local:
        small = Topology.uniform(min(topo.nhosts, max_hosts), min(topo.ranks_per_host, max_local), topo.intra, topo.inter)
        note = f" (drawn on {small.nhosts} x {small.ranks_per_host} of {topo.describe()})"
        topo = small
    n = topo.nranks
    itemsize = 4
    nbytes = nbytes or 256 * 1024 * max(1, n // 8)
    chunk_bytes = chunk_bytes or max(4096, nbytes // 16)
    count = nbytes // itemsize // (n if op in ("all_gather", "reduce_scatter") else 1)
    plans = build_all(op, algo, topo, count, root=root, chunk_elems=chunk_bytes // itemsize, inter=inter)
    order = list(topo.ring_order())
    tree_like = algo == "tree" and op == "all_reduce"
    fig = plt.figure(figsize=(16, 7.5))
    if tree_like:
        ax_a = fig.add_subplot(2, 2, 1)
        ax_b = fig.add_subplot(2, 2, 3)
        _draw_trees([ax_a, ax_b], topo, order)
        ax_s = fig.add_subplot(1, 2, 2)
    else:
        ax_g = fig.add_subplot(1, 2, 1)
        _draw_arcs(ax_g, plans, topo, order)
        ax_s = fig.add_subplot(1, 2, 2)
    _draw_schedule(ax_s, plans, topo, costs, itemsize, chunk_bytes)
    extra = f", inter-host {inter}" if inter else ""
    fig.suptitle(f"{op} / {algo}{extra}: {nbytes // 1024} KiB, chunk {chunk_bytes // 1024} KiB{note}", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def crossover_data(sizes=(8, 1 << 20, 256 << 20), ranks_per_host=8, intra="shm", inter="tcp", costs=None,
                   max_ranks=16384):
    """{size: {algo: [(nranks, seconds)]}} for the crossover picture (closed forms)."""
    costs = costs or cost.transport_costs({})
    ns = [2 ** k for k in range(1, max_ranks.bit_length()) if 2 ** k <= max_ranks]
    out = {}
    for S in sizes:
        per = {a: [] for a in ("ring", "tree", "hierarchical", "halving_doubling")}
        for n in ns:
            topo = (Topology.single_host(n, intra) if n <= ranks_per_host
                    else Topology.uniform(n // ranks_per_host, ranks_per_host, intra, inter))
            for a in per:
                if a == "hierarchical" and topo.nhosts < 2:
                    continue
                inters = ("tree", "ring", "halving_doubling") if a == "hierarchical" else (None,)
                best = min(cost.predict("all_reduce", a, S, topo, costs, ch, it)
                           for ch in (64 << 10, 256 << 10, 1 << 20, 4 << 20) for it in inters)
                per[a].append((n, best))
        out[S] = per
    return out


def draw_crossover(path, sizes=(8, 1 << 20, 256 << 20), ranks_per_host=8, intra="shm", inter="tcp", costs=None):
    plt = _plt()
    data = crossover_data(sizes, ranks_per_host, intra, inter, costs)
    fig, axes = plt.subplots(1, len(sizes), figsize=(5.2 * len(sizes), 4.4))
    styles = {"ring": ("C0", "o"), "tree": ("C1", "s"), "hierarchical": ("C2", "^"), "halving_doubling": ("C3", "d")}
    for ax, S in zip(axes, sizes):
        for a, pts in data[S].items():
            if pts:
                xs, ys = zip(*pts)
                ax.plot(xs, [y * 1e3 for y in ys], marker=styles[a][1], color=styles[a][0], ms=3.5, lw=1.4,
                        label=a.replace("_", "-") + (" (double binary)" if a == "tree" else ""))
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel(f"ranks ({ranks_per_host} per host; {intra} inside, {inter} between hosts)")
        ax.set_ylabel("predicted all-reduce time (ms)")
        label = f"{S} B" if S < 1024 else (f"{S >> 20} MiB" if S >= 1 << 20 else f"{S >> 10} KiB")
        ax.set_title(f"all-reduce of {label}", fontsize=10)
        ax.grid(True, which="both", alpha=0.25)
    axes[0].legend(fontsize=8)
    fig.suptitle("pyccl cost model: ring latency grows linearly with ranks, trees and halving-doubling "
                 "logarithmically", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
