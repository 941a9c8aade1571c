"""Draws docs/architecture.png, the picture of docs/ARCHITECTURE.md (needs matplotlib:
pip install "pyccl[plot]"). The picture follows the page; change both together.

    python docs/architecture.py [out.png]
"""
import os
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.patches import FancyArrowPatch, FancyBboxPatch  # noqa: E402

BLUE, GREEN, ORANGE, GREY, RED = "#dbe9f6", "#dcefd8", "#fde7cf", "#eeeeee", "#f6d5d5"


def box(ax, x, y, w, h, text, color, size=8.5, bold=False):
    ax.add_patch(FancyBboxPatch((x, y), w, h, boxstyle="round,pad=0.01,rounding_size=0.015",
                                fc=color, ec="#555555", lw=0.9))
    ax.text(x + w / 2, y + h / 2, text, ha="center", va="center", fontsize=size,
            fontweight="bold" if bold else "normal", wrap=True)


def arrow(ax, a, b, text="", color="#333333", style="-|>", ls="-"):
    ax.add_patch(FancyArrowPatch(a, b, arrowstyle=style, mutation_scale=11, color=color, lw=1.1, ls=ls))
    if text:
        ax.text((a[0] + b[0]) / 2 + 0.01, (a[1] + b[1]) / 2, text, fontsize=7, color=color, va="center")


def flow(ax):
    ax.set_title("The flow of one collective", fontsize=11, fontweight="bold")
    box(ax, 0.05, 0.91, 0.42, 0.06, "user code: comm.all_reduce(x)", GREY)
    box(ax, 0.53, 0.91, 0.42, 0.06, "torch.distributed: ProcessGroupPyccl\n(ccl/torch_backend/)", GREY, 7.5)
    box(ax, 0.05, 0.66, 0.90, 0.19,
        "Communicator (ccl/communicator.py): validate -> choose -> submit\n"
        "1. Validator (validate.py) -> one Call (call.py): op, buffers, memory kind, dtype, ...\n"
        "2. Engines.choose (engines/choice.py): every engine's cost(call), the lowest wins,\n"
        "    ties to registry order; PYCCL_ENGINE forces; cached; logged at PYCCL_DEBUG=INFO\n"
        "3. CallQueue (queue.py): call order, flight recorder, Work; run_now short path", BLUE, 7.6)
    arrow(ax, (0.26, 0.91), (0.26, 0.85))
    arrow(ax, (0.74, 0.91), (0.74, 0.85))
    engines = [("reproducible\nreproducible_cuda\n(wrap the others)", GREEN),
               ("cuda\nCUDA IPC kernels,\none host", GREEN),
               ("staged\nCUDA across hosts,\npinned host copies", ORANGE),
               ("shm\nC collectives,\none host", GREEN),
               ("composed\nlocal -> rails ->\nlocal", ORANGE),
               ("flat\nplan + executor,\nanywhere", ORANGE)]
    w = 0.142
    for i, (text, color) in enumerate(engines):
        x = 0.025 + i * (w + 0.0186)
        box(ax, x, 0.43, w, 0.16, text, color, 6.6)
        arrow(ax, (x + w / 2, 0.66), (x + w / 2, 0.59))
    ax.text(0.5, 0.405, "engines (ccl/engines/), in registry order; each: cost(call), run(call, what), abort(), close()",
            fontsize=6.8, color="#555555", ha="center")
    box(ax, 0.02, 0.18, 0.46, 0.17, "topology/ (pure)\ngraph, plan builders, walk.py,\n"
        "cost model (cost.py), simulator", GREY, 7.3)
    box(ax, 0.52, 0.18, 0.46, 0.17, "transports/  Connection per peer\nshm  ·  tcp  ·  ibverbs  (cuda_ipc: GPU maps)\n"
        "select.py: same host -> shm, RDMA -> ibverbs, else tcp", RED, 7.3)
    arrow(ax, (0.25, 0.43), (0.25, 0.35), "plans, prices")
    arrow(ax, (0.91, 0.43), (0.91, 0.35), "chunks in flight")
    box(ax, 0.02, 0.02, 0.96, 0.09, "native/  C through cffi -> pyccl._native: reductions, shm collectives and rings, ibverbs;\n"
        "CUDA kernels: ccl/engines/cuda/kernels.cu", GREY, 7.3)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.axis("off")


def hosts(ax):
    H, L = 2, 3
    ax.set_title("A multi-host all_reduce, composed (2 hosts × 3 ranks)", fontsize=11, fontweight="bold")
    xs = [0.08, 0.58]
    ys = [0.66, 0.45, 0.24]
    for h in range(H):
        ax.add_patch(FancyBboxPatch((xs[h] - 0.05, 0.15), 0.37, 0.68, boxstyle="round,pad=0.01",
                                    fc="#f7fbff", ec="#6a8caf", lw=1.2))
        ax.text(xs[h] + 0.135, 0.86, f"host {h}: shm engine inside", ha="center", fontsize=8.5)
        for j in range(L):
            box(ax, xs[h], ys[j], 0.27, 0.12, f"rank {h * L + j}  (local {j})\nshard {j} of the data", GREEN, 7.5)
    for j in range(L):
        arrow(ax, (xs[0] + 0.27, ys[j] + 0.06), (xs[1], ys[j] + 0.06), "", "#c0504d", style="<|-|>")
        ax.text(0.465, ys[j] + 0.085, f"rail {j}", fontsize=7.5, color="#c0504d", ha="center")
    ax.text(0.5, 0.06, "1. local reduce_scatter (shm): local rank j holds shard j, summed over its host\n"
            "2. rail j all_reduces shard j across hosts (executor over TCP/ibverbs; all rails at once)\n"
            "3. local all_gather (shm): every rank has the whole sum",
            ha="center", va="center", fontsize=7.8)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.axis("off")


def main(out=None):
    out = out or os.path.join(os.path.dirname(os.path.abspath(__file__)), "architecture.png")
    fig, axes = plt.subplots(1, 2, figsize=(15, 6.6), gridspec_kw={"width_ratios": [1.6, 1]})
    flow(axes[0])
    hosts(axes[1])
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    print("wrote", out)


if __name__ == "__main__":
    main(*sys.argv[1:2])
