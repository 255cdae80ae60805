"""Microbenchmark of the weight products: GB/s of weight bytes read by out (M, N) = x (M, K) @ W
at GPT-2 124M's shapes, for every weight type (float32, bfloat16, int8 blocks, ...) on every
kernel variant this CPU runs (the direct kernels of x86-64-v3, ...; "portable": widened panels
into BLAS, or BLAS itself for float32), for M = 1 and M = 8 (batch-1 and batch-8 decoding).

The weights are not in cache: each run cycles through copies totalling >= 64 MiB of that
storage.  Providers alternate (A B C ... A B C ...) and the median of the rounds is reported,
with the time relative to float32 (the figure that matters to decoding: < 1 is faster).

    python benchmarks/lowp_matmul.py [--threads 2] [--rounds 7] [--rows 1 8] [--json out.json]
                                     [--clock cpu]

--clock cpu times with the process's CPU time instead of the wall clock: on a shared, busy
machine (where a parallel region waits for descheduled team threads) one thread with CPU time
still measures what a core sustains; GB/s are then per CPU-second.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np

import gpt2s
from gpt2s import _core, weight_types
from harness import announce_machine, run_alternating

SHAPES = [  # (name, K, N, lm_head): out = x (M, K) @ W (K, N); the lm_head is x @ wte (V, K)^T
    ("attn.c_attn", 768, 2304, False), ("attn.c_proj", 768, 768, False),
    ("mlp.c_fc", 768, 3072, False), ("mlp.c_proj", 3072, 768, False),
    ("lm_head", 768, 50257, True)]


def bench_shape(name, K, N, lm_head, M, rounds, rng, clock=time.perf_counter):
    """Every weight type on every kernel variant this CPU has: one product entry for all."""
    wshape = (N, K) if lm_head else (K, N)
    pname = "wte.weight" if lm_head else f"h.0.{name}.weight"
    x = rng.standard_normal((M, K), dtype=np.float32)
    out = np.empty((M, N), np.float32)
    no_bias = np.empty(0, np.float32)
    copies = max(2, -(-(64 << 20) // (N * K)))   # >= 64 MiB of int8 (more of the others)
    f32 = [rng.standard_normal(wshape, dtype=np.float32) * 0.02 for _ in range(copies)]
    stored = {t: [weight_types.get(t).compress(pname, w) for w in f32]
              for t in weight_types.DTYPES}
    nbytes = {t: stored[t][0].nbytes for t in stored}

    def run(dtype, variant):
        def go():
            prev = _core.set_kernel_variant(dtype, variant)
            try:
                for w in stored[dtype]:
                    if lm_head:
                        _core.lm_head_forward(out, x, w)
                    else:
                        _core.matmul_forward(out, x, w, no_bias)
            finally:
                _core.set_kernel_variant(dtype, prev)
        return go

    fns = {(t, v): run(t, v) for t in weight_types.DTYPES for v in _core.kernel_variants(t)[::-1]}
    timed = run_alternating(fns, rounds, warmup=1, clock=clock)
    base = timed[("float32", _core.kernel_variants("float32")[-1])]["median_s"]
    rows = []
    for (dtype, path), r in timed.items():
        med = r["median_s"]
        rows.append(dict(matrix=name, M=M, K=K, N=N, dtype=dtype, path=path, copies=copies,
                         median_s=med / copies, gbs=nbytes[dtype] * copies / med / 1e9,
                         time_vs_float32=med / base))
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--only", nargs="+", help="matrix names (attn.c_attn, ..., lm_head)")
    ap.add_argument("--json", help="write the rows here")
    ap.add_argument("--clock", choices=("wall", "cpu"), default="wall")
    args = ap.parse_args(argv)
    gpt2s.set_num_threads(args.threads)
    rng = np.random.default_rng(0)
    rows = []
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    machine = announce_machine()
    print(f"threads {args.threads}, clock {args.clock}, kernel variants: "
          + ", ".join(f"{t} {'/'.join(_core.kernel_variants(t))}" for t in weight_types.DTYPES))
    print(f"{'matrix':12} {'M':>2} {'dtype':9} {'path':10} {'GB/s':>6} {'us/call':>8} {'t/f32':>6}")
    for M in args.rows:
        for name, K, N, lm_head in SHAPES:
            if args.only and name not in args.only:
                continue
            for r in bench_shape(name, K, N, lm_head, M, args.rounds, rng, clock):
                rows.append(r)
                print(f"{r['matrix']:12} {M:2d} {r['dtype']:9} {r['path']:10} {r['gbs']:6.1f} "
                      f"{r['median_s'] * 1e6:8.1f} {r['time_vs_float32']:6.2f}", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": machine, "threads": args.threads, "clock": args.clock,
                       "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
