"""Concurrent inference on one shared model: tokens/s of N threads each running ``generate``
on the same GPT2 object, against one thread, and the memory each extra thread costs.

    python benchmarks/concurrent_generate.py [--size gpt2] [--threads 2] [--new 64]

GPT-2 124M shapes with random weights (nothing is downloaded).  Each round runs one thread
alone, then N threads at once (a barrier starts them together), alternating; medians over
--rounds.  The kernel thread count (``gpt2s.set_num_threads``) is reported: with N Python
threads each kernel call still uses that many OpenMP threads, so the cores are shared.
Memory: growth of the peak resident set in the first concurrent round (each thread's activation
buffers and each generation's KV cache), the kernel's VmHWM from /proc/self/status (the peak,
not the current size: a thread's buffers are freed when it ends; ru_maxrss without /proc).
"""

from __future__ import annotations

import argparse
import statistics
import threading
import time

import numpy as np

import gpt2s
from gpt2s import GPT2, GPT2Config
from harness import announce_machine, peak_rss_mib


def timed_generate(m, prompt, new):
    t0 = time.perf_counter()
    m.generate(prompt, new, temperature=0)
    return time.perf_counter() - t0


def run_concurrent(m, prompts, new):
    n = len(prompts)
    barrier = threading.Barrier(n + 1)
    times = [0.0] * n

    def body(i):
        barrier.wait()
        times[i] = timed_generate(m, prompts[i], new)

    threads = [threading.Thread(target=body, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    t0 = time.perf_counter()
    barrier.wait()
    for t in threads:
        t.join()
    return time.perf_counter() - t0


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", default="gpt2", choices=GPT2Config.presets())
    p.add_argument("--threads", type=int, default=2, help="Python threads generating at once")
    p.add_argument("--kernel-threads", type=int, default=None,
                   help="gpt2s.set_num_threads for the kernels (default: as configured)")
    p.add_argument("--prompt", type=int, default=16, help="prompt tokens")
    p.add_argument("--new", type=int, default=64, help="new tokens per generate call")
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args(argv)
    if args.kernel_threads:
        gpt2s.set_num_threads(args.kernel_threads)
    announce_machine()
    m = GPT2.from_config(GPT2Config.preset(args.size), seed=0)
    rng = np.random.default_rng(0)
    prompts = [rng.integers(0, 50257, size=(1, args.prompt)) for _ in range(args.threads)]
    timed_generate(m, prompts[0], 8)   # warm-up: this thread's buffers
    rss_one = peak_rss_mib()
    run_concurrent(m, prompts, 8)      # warm-up: the other threads' buffers
    rss_many = peak_rss_mib()
    one, many = [], []
    for _ in range(args.rounds):
        one.append(args.new / timed_generate(m, prompts[0], args.new))
        many.append(args.threads * args.new / run_concurrent(m, prompts, args.new))
    o, c = statistics.median(one), statistics.median(many)
    print(f"{args.size}, batch 1, prompt {args.prompt}, {args.new} new tokens, kernel threads "
          f"{gpt2s.get_num_threads()}, medians of {args.rounds}")
    print(f"1 thread:          {o:7.1f} tokens/s")
    print(f"{args.threads} threads at once: {c:7.1f} tokens/s in total ({c / o:.2f}x)")
    print(f"peak resident memory: {rss_one:.0f} MiB with one thread's buffers, {rss_many:.0f} "
          f"MiB with {args.threads} concurrent generations "
          f"({(rss_many - rss_one) / max(1, args.threads - 1):.1f} MiB per extra thread)")


if __name__ == "__main__":
    main()
