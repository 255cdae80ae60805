"""The data-parallel scaling model of docs/distributed.md, plotted: predicted step time of GPT-2
124M vs the number of ranks N for 10, 25 and 100 Gb/s links, with and without overlapping the
gradient reduction with the backward.

    python benchmarks/dp_scaling_plot.py [--compute 4.05 --backward 2.41 --out docs/...png]

Model (per optimizer step, every rank on its own node with a fixed per-rank batch):
    t_ar(N)   = 2 (N-1)/N * S / bw + 2 (N-1) * latency     ring allreduce of S bytes
    hidden    = min(f * t_ar, w * t_backward)                overlap (f: the share of the
                                                             buffer reduced during the backward,
                                                             w: the share of the backward left
                                                             to overlap it with)
    t_step(N) = t_compute + t_ar - hidden                    (t_compute + t_ar without overlap)
with S = 497.8 MB (124.4M float32 gradients).  f = 0.683: the blocks and ln_f; the tied token
embedding (wte, 31% of the buffer) gets its last gradient contribution at the very end of the
backward, so its bucket can only start then.  The overlapped curves assume the transfers
progress on their own during the backward (RDMA, or an MPI progress thread): MPICH over shared
memory on an idle 2-core machine hid about 30% (docs/distributed.md).  Default compute times:
this 2-core Zen 3 machine when idle (benchmarks/dp_step.py, 1 process x 2 threads, B=8 T=64:
4.05 s per step, 2.41 s of it the backward), 69% of the backward in the blocks (the rest is
the lm_head).
"""

from __future__ import annotations

import argparse

import numpy as np

S_BYTES = 124_439_808 * 4
OVERLAP_SHARE = 1 - (50257 * 768 + 1024 * 768) / 124_439_808   # all but wte and wpe


def t_allreduce(n, gbit, latency=20e-6):
    n = np.asarray(n, float)
    return 2 * (n - 1) / n * S_BYTES * 8 / (gbit * 1e9) + 2 * (n - 1) * latency


def t_step(n, gbit, compute, backward_window, overlap=True):
    ar = t_allreduce(n, gbit)
    hidden = np.minimum(OVERLAP_SHARE * ar, backward_window) if overlap else 0.0
    return compute + ar - hidden


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--compute", type=float, default=4.05,
                   help="seconds of forward + backward + AdamW per step on one node")
    p.add_argument("--backward", type=float, default=2.41,
                   help="seconds of the backward on one node")
    p.add_argument("--window", type=float, default=0.69,
                   help="share of the backward after the first bucket is ready (the blocks)")
    p.add_argument("--speedup", type=float, default=16.0,
                   help="right panel: a node this many times faster (e.g. 32 cores)")
    p.add_argument("--out", default="docs/distributed_scaling.png")
    args = p.parse_args()

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ns = np.arange(2, 65)
    window = args.window * args.backward
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(14, 4.8), dpi=110)
    colors = {10: "tab:red", 25: "tab:orange", 100: "tab:green"}
    for gbit, color in colors.items():
        ax.plot(ns, t_step(ns, gbit, args.compute, window, overlap=False), "--", color=color,
                lw=1.2, label=f"{gbit} Gb/s, reduce after the backward")
        ax.plot(ns, t_step(ns, gbit, args.compute, window, overlap=True), "-", color=color,
                lw=2, label=f"{gbit} Gb/s, overlapped (ideal progress)")
    ax.axhline(args.compute, color="k", lw=1, ls=":", label="compute alone (no communication)")
    ax.set_ylabel("predicted seconds per optimizer step")
    ax.set_ylim(0, None)
    ax.set_title(f"node = this 2-core machine (compute {args.compute:.2f} s per step)",
                 fontsize=10)
    ax.legend(fontsize=7.5, loc="lower right")

    # a node `speedup` times faster: communication is the same, compute shrinks; accumulating
    # k micro-batches per step pays the allreduce once per k
    fast_c, fast_w = args.compute / args.speedup, window / args.speedup
    for gbit, color in colors.items():
        for k, style in ((1, "-"), (8, ":")):
            eff = k * fast_c / t_step(ns, gbit, k * fast_c, fast_w, overlap=True)
            ax2.plot(ns, 100 * eff, style, color=color, lw=2 if k == 1 else 1.6,
                     label=f"{gbit} Gb/s, " + ("no accumulation" if k == 1
                                                   else f"{k} micro-batches per step"))
    ax2.set_ylabel("compute share of the step (%), overlapped (ideal)")
    ax2.set_ylim(0, 100)
    ax2.set_title(f"node {args.speedup:g}x faster (compute {fast_c:.2f} s per micro-batch)",
                  fontsize=10)
    ax2.legend(fontsize=7.5, loc="center left", bbox_to_anchor=(1.02, 0.5))
    for a in (ax, ax2):
        a.set_xscale("log", base=2)
        a.set_xticks([2, 4, 8, 16, 32, 64], ["2", "4", "8", "16", "32", "64"])
        a.set_xlabel("ranks N (one per node, B=8 T=64 each)")
        a.grid(alpha=0.3)
    fig.suptitle("GPT-2 124M data parallel: ring allreduce of 498 MB per optimizer step",
                 fontsize=11)
    fig.tight_layout()
    fig.savefig(args.out)
    print(f"wrote {args.out}")
    for gbit in colors:
        for n in (2, 8, 64):
            ar = float(t_allreduce(n, gbit))
            print(f"{gbit:>3} Gb/s N={n:>2}: allreduce {ar:.3f} s, step "
                  f"{float(t_step(n, gbit, args.compute, window, False)):.3f} s serial, "
                  f"{float(t_step(n, gbit, args.compute, window, True)):.3f} s overlapped")
    fast_c, fast_w = args.compute / args.speedup, window / args.speedup
    for gbit in colors:
        for k in (1, 8):
            eff = k * fast_c / float(t_step(64, gbit, k * fast_c, fast_w, True))
            print(f"{args.speedup:g}x node, {gbit:>3} Gb/s, N=64, {k} micro-batch(es): "
                  f"compute share {100 * eff:.0f}%")


if __name__ == "__main__":
    main()
