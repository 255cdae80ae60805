"""Two builds of gpt2s against each other, alternating in one run: the A/B of a change that
must not cost speed (a refactoring, a new dispatch layer).

    python benchmarks/ab_builds.py --a /path/to/old/venv/bin/python --b .venv/bin/python \
        [--rounds 5] [--threads 2] [--only train,forward,decode] [--json out.json]

Each run is a fresh process of one build (its own interpreter and installed gpt2s) that makes
the same random GPT-2 124M (GPT2.from_config(preset "gpt2"), seed 0), warms up, and times one
case a few times; the processes alternate A B, B A, A B, ... so that a slow minute of the
machine falls on both builds.  Only the public API both builds have is used.  Reported per
case: the median over the rounds of each build's in-process median, the spread, and B / A
(< 1: B is faster).  On a shared machine add --wait-quiet: a round during which other
processes used more than 0.15 cores is discarded and redone.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from harness import QuietGuard, announce_machine, cpu_snapshot, median, other_load

REPO = Path(__file__).resolve().parent.parent

# (name, what is timed, repetitions per process): the worker below runs them
CASES = {
    "train": "zero_grad + forward with loss + backward, B=4 T=64",
    "forward": "logits of B=1 T=128",
    "decode-float32": "greedy, 16-token prompt, 64 new tokens, batch 1",
    "decode-bfloat16": "as decode-float32, bfloat16 weights",
    "decode-int8": "as decode-float32, int8 weights",
    "decode8-float32": "greedy, 16-token prompts, 32 new tokens, batch 8",
    "decode8-bfloat16": "as decode8-float32, bfloat16 weights",
    "decode8-int8": "as decode8-float32, int8 weights",
}

WORKER = r"""
import json, sys, time
import numpy as np
import gpt2s
from gpt2s import GPT2, GPT2Config

case, threads, reps = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
gpt2s.set_num_threads(threads)
m = GPT2.from_config(GPT2Config.preset("gpt2"), seed=0)
rng = np.random.default_rng(1)
kind, _, dtype = case.partition("-")
if kind == "train":
    idx = rng.integers(0, 50257, (4, 65))
    def run():
        m.zero_grad()
        m.forward(idx[:, :-1], idx[:, 1:], return_logits=False)
        m.backward()
elif kind == "forward":
    idx = rng.integers(0, 50257, (1, 128))
    def run():
        m.forward(idx)
else:
    if dtype != "float32":
        m = m.to_dtype(dtype)
    B, new = (1, 64) if kind == "decode" else (8, 32)
    prompt = rng.integers(0, 50257, (B, 16))
    def run():
        m.generate(prompt, new, temperature=0)
run()
times = []
for _ in range(reps):
    t0 = time.perf_counter()
    run()
    times.append(time.perf_counter() - t0)
times.sort()
print(json.dumps({"median_s": times[len(times) // 2], "min_s": times[0]}))
"""


def run_one(python: str, case: str, threads: int, reps: int) -> float:
    p = subprocess.run([python, "-c", WORKER, case, str(threads), str(reps)],
                       capture_output=True, text=True, timeout=1800)
    if p.returncode != 0:
        raise RuntimeError(f"{python} {case}: exit {p.returncode}\n{p.stderr[-2000:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])["median_s"]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--a", required=True, metavar="PYTHON", help="interpreter of build A")
    ap.add_argument("--b", required=True, metavar="PYTHON", help="interpreter of build B")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--reps", type=int, default=5, help="timed repetitions per process")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--only", help="comma list of cases: " + ", ".join(CASES)
                    + " (a prefix selects several: decode)")
    ap.add_argument("--wait-quiet", type=float, default=0.0, metavar="S")
    ap.add_argument("--json", metavar="PATH")
    args = ap.parse_args(argv)
    cases = list(CASES)
    if args.only:
        wanted = args.only.split(",")
        cases = [c for c in cases if any(c == w or c.startswith(w) for w in wanted)]
    guard = QuietGuard(wait_s=args.wait_quiet)
    machine = announce_machine(REPO)
    print(f"threads {args.threads}", flush=True)
    times = {c: {"a": [], "b": []} for c in cases}
    for r in range(args.rounds):
        order = ("a", "b") if r % 2 == 0 else ("b", "a")
        for c in cases:
            def one_round(c=c):
                before = cpu_snapshot()
                got = {who: run_one(getattr(args, who), c, args.threads, args.reps)
                       for who in order}
                return got, other_load(before, cpu_snapshot())
            got, _, _ = guard.run_round(one_round)
            for who, t in got.items():
                times[c][who].append(t)
        print(f"round {r + 1}/{args.rounds} done", file=sys.stderr, flush=True)
    rows = []
    print(f"{'case':18} {'A median s':>11} {'B median s':>11} {'B/A':>6}  A range / B range")
    for c in cases:
        a, b = median(times[c]["a"]), median(times[c]["b"])
        rows.append({"case": c, "what": CASES[c], "a_s": times[c]["a"], "b_s": times[c]["b"],
                     "a_median_s": a, "b_median_s": b, "b_over_a": b / a})
        print(f"{c:18} {a:11.4f} {b:11.4f} {b / a:6.3f}  "
              f"{min(times[c]['a']):.4f}-{max(times[c]['a']):.4f} / "
              f"{min(times[c]['b']):.4f}-{max(times[c]['b']):.4f}")
    if guard.loads:
        print(f"other processes' load during the rounds: max {max(guard.loads):.2f} cores; "
              f"{guard.discarded} rounds redone")
    if args.json:
        Path(args.json).write_text(json.dumps({"machine": machine, "threads": args.threads,
                                               "a": args.a, "b": args.b, "rows": rows},
                                              indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
