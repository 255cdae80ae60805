"""Data-parallel measurements for docs/distributed.md.

    mpiexec -n 2 python benchmarks/dp_step.py allreduce            # 124M-float Allreduce
    OMP_NUM_THREADS=2 python benchmarks/dp_step.py step --batch 8  # 1 process x 2 threads
    OMP_NUM_THREADS=1 mpiexec -n 2 python benchmarks/dp_step.py step --batch 8 [--no-overlap]

``step`` times full training steps of GPT-2 124M (random weights and tokens) on a global batch
of --batch x --seq: forward, backward (with the gradient reduction under MPI), global-norm
clipping, AdamW.  Prints one JSON line (rank 0) with the median step time and, under MPI, the
time the backward took and the time spent waiting for the reduction after it.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import numpy as np

import harness


def allreduce(args):
    from mpi4py import MPI
    comm = MPI.COMM_WORLD
    buf = np.ones(args.floats, np.float32)
    times = []
    for _ in range(args.repeats):
        comm.Barrier()
        t0 = time.perf_counter()
        comm.Allreduce(MPI.IN_PLACE, [buf, MPI.FLOAT], op=MPI.SUM)
        times.append(time.perf_counter() - t0)
    if comm.Get_rank() == 0:
        machine = harness.announce_machine(file=sys.stderr)   # stdout: one JSON line
        print(json.dumps({"case": "allreduce", "ranks": comm.Get_size(), "floats": args.floats,
                          "seconds": [round(t, 4) for t in times],
                          "median_s": round(statistics.median(times), 4),
                          "GB_per_s": round(4 * args.floats / statistics.median(times) / 1e9, 2),
                          "machine": machine}))


def step(args):
    import gpt2s
    from gpt2s import GPT2, GPT2Config, AdamW, clip_grad_norm
    from gpt2s.distributed import world_size_from_env
    size = world_size_from_env()
    model = GPT2.from_config(GPT2Config.preset("gpt2"), seed=0)
    opt = AdamW(model, lr=1e-4)
    dp = None
    if size > 1:
        from gpt2s.distributed import DataParallel
        dp = DataParallel(model, overlap=not args.no_overlap, bucket_mb=args.bucket_mb)
        dp.broadcast_parameters()
    V = model.config.vocab_size
    rows = []
    for i in range(args.warmup + args.steps):
        rng = np.random.default_rng([0, i])
        x = rng.integers(0, V, (args.batch, args.seq))
        y = rng.integers(0, V, (args.batch, args.seq))
        if dp is not None:
            dp.barrier()
        t0 = time.perf_counter()
        model.zero_grad()
        if dp is None:
            model.forward(x, y, return_logits=False)
            t1 = time.perf_counter()
            model.backward()
            t2 = time.perf_counter()
            clip_grad_norm(model, 1.0)
            wait = 0.0
        else:
            dp.forward(*dp.shard(x, y))
            t1 = time.perf_counter()
            dp.backward()
            t2 = time.perf_counter()
            dp.clip_grad_norm(1.0)
            wait = dp.last_wait_s
        opt.step()
        t3 = time.perf_counter()
        if i >= args.warmup:
            rows.append((t3 - t0, t1 - t0, t2 - t1 - wait, wait, t3 - t2))
    if dp is None or dp.rank == 0:
        med = [round(statistics.median(c), 4) for c in zip(*rows)]
        machine = harness.announce_machine(file=sys.stderr)
        print(json.dumps({"case": "step", "ranks": size, "threads": gpt2s.get_num_threads(),
                          "batch": args.batch, "seq": args.seq,
                          "overlap": None if dp is None else dp.overlap,
                          "buckets": None if dp is None else len(dp.buckets),
                          "step_s": [round(r[0], 3) for r in rows], "median_step_s": med[0],
                          "forward_s": med[1], "backward_s": med[2], "wait_s": med[3],
                          "clip_adamw_s": med[4],
                          "tokens_per_s": round(args.batch * args.seq / med[0], 1),
                          "machine": machine}),
              flush=True)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("case", choices=["allreduce", "step"])
    p.add_argument("--floats", type=int, default=124_439_808)  # GPT-2 124M's parameters
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--batch", type=int, default=8, help="global batch")
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--no-overlap", action="store_true")
    p.add_argument("--bucket-mb", type=float, default=25.0)
    args = p.parse_args()
    allreduce(args) if args.case == "allreduce" else step(args)


if __name__ == "__main__":
    main()
