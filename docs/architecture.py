"""Draws docs/architecture.png, the picture of docs/ARCHITECTURE.md (needs matplotlib:
pip install "pyccl[plot]").

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
    box(ax, 0.05, 0.90, 0.42, 0.07, "user code: comm.all_reduce(x)", GREY)
    box(ax, 0.53, 0.90, 0.42, 0.07, "torch.distributed: ProcessGroup \"pyccl\"\n(ccl/torch_backend.py)", GREY, 7.5)
    box(ax, 0.05, 0.68, 0.90, 0.16,
        "Communicator (ccl/communicator.py)\n"
        "validate + describe the buffer once (buffers.py)  ·  call order, flight recorder, errors\n"
        "engine choice: one host → node-local engine;  else tuner (tuner.py) prices plans with\n"
        "topology/cost.py's α-β-γ model (calibrated: python -m pyccl.tune)", BLUE, 7.8)
    arrow(ax, (0.26, 0.90), (0.26, 0.84))
    arrow(ax, (0.74, 0.90), (0.74, 0.84))
    box(ax, 0.02, 0.43, 0.29, 0.18, "node-local engines\n\nshm C collectives\n(shm_collectives.py,\nnative/shm.c)\n"
        "CUDA IPC kernels\n(cuda_collectives.py)", GREEN, 7.5)
    box(ax, 0.355, 0.43, 0.29, 0.18, "composed multi-host\n(hierarchy.py)\n\nlocal phase → rail\nphase → local phase",
        ORANGE, 7.5)
    box(ax, 0.69, 0.43, 0.29, 0.18, "flat plan + executor\n\nplan: topology/ (ring, tree,\nhalving-doubling,\n"
        "hierarchical, direct)\nexecutor.py runs it", ORANGE, 7.5)
    for x in (0.165, 0.50, 0.835):
        arrow(ax, (x, 0.68), (x, 0.61))
    arrow(ax, (0.355, 0.50), (0.31, 0.50), "", "#777777", ls="--")
    arrow(ax, (0.645, 0.50), (0.69, 0.50), "", "#777777", ls="--")
    ax.text(0.33, 0.405, "phases 1, 3", fontsize=6.5, color="#777777", ha="center")
    ax.text(0.67, 0.405, "phase 2 (rail plan)", fontsize=6.5, color="#777777", ha="center")
    box(ax, 0.35, 0.17, 0.63, 0.16, "transports/  (one Connection per peer: isend, irecv, progress)\n"
        "shm slot rings  ·  tcp  ·  ibverbs  ·  cuda_ipc\nselect.py: same host → shm, RDMA → ibverbs, else tcp",
        RED, 7.5)
    arrow(ax, (0.835, 0.43), (0.835, 0.33), "chunks in flight")
    box(ax, 0.02, 0.02, 0.96, 0.09, "native/  C through cffi → pyccl._native: reduce kernels, shared-memory "
        "collectives and rings, ibverbs;  CUDA kernels", GREY, 7.5)
    arrow(ax, (0.165, 0.43), (0.165, 0.11))
    arrow(ax, (0.66, 0.17), (0.66, 0.11))
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
    fig, axes = plt.subplots(1, 2, figsize=(13, 6.2), gridspec_kw={"width_ratios": [1.15, 1]})
    flow(axes[0])
    hosts(axes[1])
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    print("wrote", out)


if __name__ == "__main__":
    main(*sys.argv[1:2])
