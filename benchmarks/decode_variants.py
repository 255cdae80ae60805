"""Decoding speed of each kernel variant, side by side in one run: tokens/s of greedy
generation with random GPT-2 124M weights stored in each weight type, at each batch size, with
the type's kernels forced to each instruction-set variant this CPU runs (x86-64-v3, avx512,
...).

    python benchmarks/decode_variants.py [--dtypes int8 bfloat16] [--batch 1 8] [--new 64]
                                         [--rounds 7] [--threads 2] [--variants x86-64-v3 avx512]
                                         [--clock cpu] [--json out.json]

Each generation is a prompt of --prompt tokens (one prefill call) and --new tokens; the rate
is batch * new / seconds of the whole call (the short prefill included).  The variants of one
(type, batch) alternate (A B A B ...) after a warm-up, and the median of the rounds is
reported with min-max.  The greedy tokens of every variant are compared with the first's (on
random weights a near-tie may flip a token; the count is printed, not asserted).  Benchmarks
are not tests: nothing here asserts anything about time.  On a shared machine the figures are
noisy: repeat, and compare only the variants of one run; ``--clock cpu --threads 1`` times
with the process's CPU time (what one core sustains, robust to neighbours taking the CPU).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

import gpt2s
from gpt2s import GPT2, GPT2Config, _core
from harness import announce_machine, run_alternating


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dtypes", nargs="+", default=["int8", "bfloat16"])
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--prompt", type=int, default=8)
    ap.add_argument("--new", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--variants", nargs="+",
                    help="variants to compare (default: every one this CPU runs but portable)")
    ap.add_argument("--clock", choices=("wall", "cpu"), default="wall")
    ap.add_argument("--json", help="write the rows here")
    args = ap.parse_args(argv)
    gpt2s.set_num_threads(args.threads)
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    info = announce_machine(Path(__file__).resolve().parent.parent)
    print(f"threads {args.threads}, clock {args.clock}; instruction-set levels: "
          f"{', '.join(_core.cpu_variants())}")
    base = GPT2.from_config(GPT2Config.preset("gpt2"), seed=0)
    rng = np.random.default_rng(0)
    rows = []
    print(f"{'dtype':9} {'B':>2} {'variant':12} {'tok/s':>7} {'min-max':>15} {'same tokens':>11}")
    for dtype in args.dtypes:
        m = base if dtype == "float32" else base.to_dtype(dtype)
        variants = args.variants or [v for v in _core.kernel_variants(dtype) if v != "portable"]
        variants = [v for v in variants if v in _core.kernel_variants(dtype)]
        for B in args.batch:
            idx = rng.integers(0, 50257, (B, args.prompt))
            toks = {}

            def run(v):
                def go():
                    prev = _core.set_kernel_variant(dtype, v)
                    try:
                        toks[v] = m.generate(idx, args.new, temperature=0)
                    finally:
                        _core.set_kernel_variant(dtype, prev)
                return go

            timed = run_alternating({v: run(v) for v in variants}, args.rounds, warmup=1,
                                    clock=clock)
            first = toks[variants[0]]
            for v in variants:
                r = timed[v]
                rate = B * args.new / r["median_s"]
                same = int((np.asarray(toks[v]) == np.asarray(first)).sum())
                rows.append(dict(dtype=dtype, batch=B, variant=v, tokens_per_s=rate,
                                 min_s=r["min_s"], max_s=r["max_s"], median_s=r["median_s"],
                                 same_tokens=same, tokens=int(np.asarray(first).size)))
                print(f"{dtype:9} {B:2d} {v:12} {rate:7.1f} "
                      f"{B * args.new / r['max_s']:7.1f}-{B * args.new / r['min_s']:<7.1f} "
                      f"{same:5d}/{np.asarray(first).size:<5d}", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": info, "threads": args.threads, "clock": args.clock,
                       "new": args.new, "prompt": args.prompt, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
