"""Microbenchmark of the low-precision matmul kernels (issue 11): GB/s of weight bytes read by
out (M, N) = x (M, K) @ W at GPT-2 124M's shapes, W float32 (gpt2s's own path: sgemv for one
row, the few-row kernels of _smallm.h for 2-32), bfloat16 and int8 blocks (each through its
AVX2 kernels and its portable route), for M = 1 and M = 8 (batch-1 and batch-8 decoding).

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
from gpt2s import _core
from harness import run_alternating

SHAPES = [  # (name, K, N, lm_head): out = x (M, K) @ W (K, N); the lm_head is x @ wte (V, K)^T
    ("attn.c_attn", 768, 2304, False), ("attn.c_proj", 768, 768, False),
    ("mlp.c_fc", 768, 3072, False), ("mlp.c_proj", 3072, 768, False),
    ("lm_head", 768, 50257, True)]


def to_bf16(w: np.ndarray) -> np.ndarray:
    out = np.empty(w.size, np.uint16)
    _core.bf16_from_float32(out, np.ascontiguousarray(w, np.float32).ravel())
    return out.reshape(w.shape)


def to_q8(w: np.ndarray, lm_head: bool):
    """(q (N, K), scales (N, K/32)) from a Conv1D weight (K, N) or an embedding (N, K)."""
    N, K = (w.shape[0], w.shape[1]) if lm_head else (w.shape[1], w.shape[0])
    q = np.empty((N, K), np.int8)
    s = np.empty((N, K // 32), np.uint16)
    _core.q8_quantize(q, s, w, not lm_head)
    return q, s


def bench_shape(name, K, N, lm_head, M, rounds, rng, clock=time.perf_counter):
    wshape = (N, K) if lm_head else (K, N)
    x = rng.standard_normal((M, K), dtype=np.float32)
    out = np.empty((M, N), np.float32)
    no_bias = np.empty(0, np.float32)
    n32 = 4 * K * N
    copies = max(2, -(-(64 << 20) // (N * K)))   # >= 64 MiB of int8 (more of the others)
    f32 = [rng.standard_normal(wshape, dtype=np.float32) * 0.02 for _ in range(copies)]
    b16 = [to_bf16(w) for w in f32]
    q8 = [to_q8(w, lm_head) for w in f32]
    nbytes = {"float32": n32, "bfloat16": 2 * K * N, "int8": K * N + 2 * (K // 32) * N}

    def run_f32():
        for w in f32:
            if lm_head:
                _core.lm_head_forward(out, x, w)
            else:
                _core.matmul_forward(out, x, w, no_bias)

    def run_b16():
        for w in b16:
            if lm_head:
                _core.lm_head_forward_bf16(out, x, w)
            else:
                _core.matmul_forward_bf16(out, x, w, no_bias)

    def run_q8():
        for q, s in q8:
            if lm_head:
                _core.lm_head_forward_q8(out, x, q, s)
            else:
                _core.matmul_forward_q8(out, x, q, s, no_bias)

    def on_path(fn, path):
        def run():
            prev = _core.set_lowp_kernels(path)
            try:
                fn()
            finally:
                _core.set_lowp_kernels(prev)
        return run

    fns = {("float32", "gpt2s"): run_f32}
    paths = (["avx2"] if _core.have_lowp_avx2() else []) + ["portable"]
    for path in paths:
        fns[("bfloat16", path)] = on_path(run_b16, path)
        fns[("int8", path)] = on_path(run_q8, path)
    timed = run_alternating(fns, rounds, warmup=1, clock=clock)
    base = timed[("float32", "gpt2s")]["median_s"]
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
    print(f"threads {args.threads}, clock {args.clock}, lowp avx2 kernels: {_core.have_lowp_avx2()}")
    print(f"{'matrix':12} {'M':>2} {'dtype':9} {'path':9} {'GB/s':>6} {'us/call':>8} {'t/f32':>6}")
    for M in args.rows:
        for name, K, N, lm_head in SHAPES:
            if args.only and name not in args.only:
                continue
            for r in bench_shape(name, K, N, lm_head, M, args.rounds, rng, clock):
                rows.append(r)
                print(f"{r['matrix']:12} {M:2d} {r['dtype']:9} {r['path']:9} {r['gbs']:6.1f} "
                      f"{r['median_s'] * 1e6:8.1f} {r['time_vs_float32']:6.2f}", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"threads": args.threads, "clock": args.clock, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
