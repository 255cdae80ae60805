"""Training loops for tests/test_distributed.py: one process with the whole global batch
(``single``), or one rank of ``mpiexec -n N`` on its shard (``dp``).  Both draw each step's
global batch from (seed, step), so they train on the same sequences.

    mpiexec -n 2 python tests/mpi_worker.py dp --out run.npz [--no-overlap] [--uneven]
    python tests/mpi_worker.py single --out ref.npz [--uneven]

Writes the final parameters (rank 0 only) and prints ``step <i> loss <repr>`` per step.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time

import numpy as np

CONFIG = dict(n_layer=3, n_head=2, n_embd=32, vocab_size=101, n_ctx=32)


def global_batch(seed: int, step: int, B: int, T: int, V: int, uneven: bool):
    """Tokens and targets (B, T) of one step, a function of (seed, step) only.  uneven: the
    first half of the rows (rank 0's with 2 ranks) has ~80% of its targets ignored (-1), every
    third step all of them, the other half none."""
    rng = np.random.default_rng([seed, step])
    x = rng.integers(0, V, size=(B, T))
    y = rng.integers(0, V, size=(B, T))
    if uneven:
        half = B // 2
        drop = rng.random((half, T)) < 0.8
        if step % 3 == 1:
            drop[:] = True
        y[:half][drop] = -1
    return x, y


def make_model(seed: int):
    from gpt2s import GPT2, GPT2Config
    return GPT2.from_config(GPT2Config(**CONFIG), seed=seed)


def run_single(args, out=sys.stdout):
    from gpt2s import AdamW, _core, clip_grad_norm
    model = make_model(args.seed)
    opt = AdamW(model, lr=args.lr, weight_decay=0.1)
    for step in range(args.steps):
        model.zero_grad()
        loss = 0.0
        for micro in range(args.accum):
            x, y = global_batch(args.seed, step * args.accum + micro, args.batch, args.seq,
                                CONFIG["vocab_size"], args.uneven)
            _, micro_loss = model.forward(x, y, return_logits=False)
            model.backward()
            loss += micro_loss / args.accum
        if args.accum > 1:
            _core.scale_inplace(model.store.grad_buffer, 1.0 / args.accum)
        clip_grad_norm(model, args.clip)
        opt.step()
        print(f"step {step} loss {loss!r}", file=out, flush=True)
    return model


def run_dp(args):
    from mpi4py import MPI
    from gpt2s import AdamW, _core
    from gpt2s.distributed import DataParallel
    comm = MPI.COMM_WORLD
    rank = comm.Get_rank()
    # rank 0 alone holds the seeded initialisation; the others start from other weights, so
    # the run proves the broadcast
    model = make_model(args.seed if rank == 0 else args.seed + 1000 + rank)
    dp = DataParallel(model, comm, overlap=not args.no_overlap, bucket_mb=args.bucket_mb,
                      timeout=args.timeout)
    dp.broadcast_parameters()
    lr = args.lr + (1e-3 if args.mismatch and rank == 1 else 0.0)
    try:
        dp.check_consistent(lr=lr, seed=args.seed, batch=args.batch)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 3
    opt = AdamW(model, lr=lr, weight_decay=0.1)
    for step in range(args.steps):
        model.zero_grad()
        loss = 0.0
        for micro in range(args.accum):
            x, y = dp.shard(*global_batch(args.seed, step * args.accum + micro, args.batch,
                                          args.seq, CONFIG["vocab_size"], args.uneven))
            loss += dp.forward(x, y) / args.accum
            if step == args.fail_step and rank == args.fail_rank:
                print(f"rank {rank}: {args.fail} at step {step}", file=sys.stderr, flush=True)
                if args.fail == "kill":
                    os.kill(os.getpid(), signal.SIGKILL)
                time.sleep(3600)
            # accumulate locally; the last micro-batch's reduction carries them all
            dp.backward(sync=micro == args.accum - 1)
        if args.accum > 1:
            _core.scale_inplace(model.store.grad_buffer, 1.0 / args.accum)
        dp.clip_grad_norm(args.clip)
        opt.step()
        if rank == 0:
            print(f"step {step} loss {loss!r}", flush=True)
    if not dp.parameters_in_sync():
        print(f"rank {rank}: parameters differ between ranks", file=sys.stderr, flush=True)
        return 4
    if rank == 0 and args.out:
        np.save(args.out, model.store.buffer)
    return 0


def parser():
    p = argparse.ArgumentParser()
    p.add_argument("mode", choices=["single", "dp"])
    p.add_argument("--out")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--batch", type=int, default=4, help="global batch (rows)")
    p.add_argument("--seq", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--clip", type=float, default=0.5)
    p.add_argument("--uneven", action="store_true")
    p.add_argument("--accum", type=int, default=1, help="micro-batches per step")
    p.add_argument("--no-overlap", action="store_true")
    p.add_argument("--bucket-mb", type=float, default=1e-3)
    p.add_argument("--timeout", type=float, default=60.0)
    p.add_argument("--mismatch", action="store_true", help="rank 1 uses another lr")
    p.add_argument("--fail", choices=["kill", "hang"])
    p.add_argument("--fail-step", type=int, default=-1)
    p.add_argument("--fail-rank", type=int, default=1)
    return p


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    if args.mode == "single":
        model = run_single(args)
        if args.out:
            np.save(args.out, model.store.buffer)
        return 0
    return run_dp(args)


if __name__ == "__main__":
    sys.exit(main())
