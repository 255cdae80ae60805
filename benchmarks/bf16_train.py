#!/usr/bin/env python
"""bfloat16 compute against float32: a Tiny Shakespeare training run and a training-step timing.

1. Quality: the same small GPT-2 (same initial weights, same batches, same AdamW) trained for
   --steps steps on Tiny Shakespeare (GPT-2 tokens, the last 10% held out) once with
   compute_dtype="float32" and once with "bfloat16"; the validation loss of each at the end
   (each model in its own compute dtype, over the same held-out windows).  Target: the
   bfloat16 run within 1% of the float32 run.
2. Speed: one training step (zero_grad, forward, backward, AdamW) of GPT-2 124M at B=4 T=64
   and B=1 T=1024: gpt2s float32, gpt2s bfloat16 and PyTorch eager under
   torch.autocast("cpu", torch.bfloat16) (benchmarks/torch_gpt2.py, torch.optim.AdamW), the
   median of --repeats steps after one warm-up, in one run on the same weights.

The CPU model, its instruction sets and the route bfloat16 compute takes here
(gpt2s.show_config: "portable" on a CPU without AVX512_BF16, where the numbers are the same
but the speed is float32's) are printed first, so every figure says where it came from.

    python benchmarks/bf16_train.py                       # both parts
    python benchmarks/bf16_train.py --skip-timing --preset tiny --steps 300
    python benchmarks/bf16_train.py --skip-quality --repeats 5
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np

from harness import amd_core, cpu_info, kernel_isa

import gpt2s  # noqa: E402
from gpt2s import GPT2, AdamW, GPT2Config, _core  # noqa: E402

DEFAULT_DATA = [Path("/work/shared/data/tinyshakespeare.txt"),
                Path(__file__).resolve().parents[1] / "tests" / "data"
                / "tinyshakespeare_excerpt.txt"]


def machine() -> dict:
    info = cpu_info()
    core = amd_core(info["name"], info["family"], info["model"])
    return {"cpu": info["name"] + (f" ({core})" if core else ""), "isa": kernel_isa(info["flags"]),
            "bf16_compute": _core.get_bf16_compute_variant(),
            "threads": gpt2s.get_num_threads()}


def load_tokens(path: Path) -> np.ndarray:
    enc = gpt2s.get_tokenizer()
    return np.asarray(enc.encode_ordinary(path.read_text(encoding="utf-8")), np.int64)


def batches(tokens: np.ndarray, B: int, T: int, n: int, seed: int):
    rng = np.random.default_rng(seed)
    for _ in range(n):
        starts = rng.integers(0, len(tokens) - T - 1, size=B)
        x = np.stack([tokens[s:s + T] for s in starts])
        y = np.stack([tokens[s + 1:s + T + 1] for s in starts])
        yield x, y


def lr_at(step: int, steps: int, lr: float, warmup: int) -> float:
    if step < warmup:
        return lr * (step + 1) / warmup
    return 0.1 * lr + 0.9 * lr * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))


def train_run(compute_dtype: str, train, val, args) -> dict:
    cfg = GPT2Config.preset(args.preset, n_ctx=max(args.seq_len, 64))
    m = GPT2.from_config(cfg, seed=args.seed, compute_dtype=compute_dtype)
    opt = AdamW(m, lr=args.lr, weight_decay=0.1)
    t0 = time.perf_counter()
    losses = []
    for step, (x, y) in enumerate(batches(train, args.batch_size, args.seq_len, args.steps,
                                          args.seed)):
        opt.lr = lr_at(step, args.steps, args.lr, args.warmup)
        m.zero_grad()
        _, loss = m.forward(x, y)
        m.backward()
        opt.step(max_norm=1.0)
        losses.append(loss)
    train_s = time.perf_counter() - t0
    vals = [m.forward(x, y, for_backward=False)[1]
            for x, y in batches(val, args.batch_size, args.seq_len, args.val_batches, 12345)]
    return {"compute_dtype": compute_dtype, "final_train_loss": float(np.mean(losses[-10:])),
            "val_loss": float(np.mean(vals)), "train_s": round(train_s, 1)}


def quality(args) -> dict:
    path = next((p for p in ([Path(args.data)] if args.data else DEFAULT_DATA) if p.is_file()),
                None)
    if path is None:
        raise SystemExit("no Tiny Shakespeare text found: give --data")
    tokens = load_tokens(path)
    cut = int(0.9 * len(tokens))
    train, val = tokens[:cut], tokens[cut:]
    runs = [train_run(dt, train, val, args) for dt in ("float32", "bfloat16")]
    rel = runs[1]["val_loss"] / runs[0]["val_loss"] - 1.0
    out = {"data": str(path), "tokens": int(len(tokens)), "preset": args.preset,
           "steps": args.steps, "batch": [args.batch_size, args.seq_len], "runs": runs,
           "val_loss_rel_diff": rel, "within_1pct": abs(rel) <= 0.01}
    for r in runs:
        print(f"  {r['compute_dtype']:>8}: val loss {r['val_loss']:.4f}  (train loss, last 10 "
              f"steps {r['final_train_loss']:.4f}; {r['train_s']} s)")
    print(f"  bfloat16 vs float32 validation loss: {100 * rel:+.3f}% "
          f"({'within' if abs(rel) <= 0.01 else 'OUTSIDE'} 1%)")
    return out


def time_steps(fn, repeats: int) -> float:
    fn()   # warm-up: buffers, packing, the first-touch of pages
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return float(np.median(ts))


def timing(args) -> dict:
    torch = None
    try:
        import torch
        from torch_gpt2 import TorchGPT2
        torch.set_num_threads(gpt2s.get_num_threads())
    except ImportError:
        print("  (torch not installed: PyTorch autocast column skipped)")
    cfg = GPT2Config.preset(args.timing_preset)
    results = []
    for B, T in ((4, 64), (1, min(1024, cfg.n_ctx))):
        m = GPT2.from_config(cfg, seed=0)
        rng = np.random.default_rng(0)
        x = rng.integers(0, cfg.vocab_size, (B, T))
        y = rng.integers(0, cfg.vocab_size, (B, T))
        opt = AdamW(m, lr=1e-5)

        def ours():
            m.zero_grad()
            m.forward(x, y)
            m.backward()
            opt.step()

        row = {"B": B, "T": T}
        if torch is not None:
            tm = TorchGPT2.from_gpt2s(m)
            topt = torch.optim.AdamW(tm.parameters(), lr=1e-5)
            tx, ty = torch.from_numpy(x), torch.from_numpy(y)

            def theirs():
                topt.zero_grad(set_to_none=True)
                with torch.autocast("cpu", dtype=torch.bfloat16):
                    _, loss = tm(tx, ty)
                loss.backward()
                topt.step()

            row["torch_autocast_bf16_s"] = time_steps(theirs, args.repeats)
            del tm, topt
        m.compute_dtype = "float32"
        row["gpt2s_float32_s"] = time_steps(ours, args.repeats)
        m.compute_dtype = "bfloat16"
        row["gpt2s_bfloat16_s"] = time_steps(ours, args.repeats)
        if "torch_autocast_bf16_s" in row:
            row["bf16_vs_torch"] = row["gpt2s_bfloat16_s"] / row["torch_autocast_bf16_s"]
        print("  " + "  ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}"
                               for k, v in row.items()))
        results.append(row)
        del m, opt
    return {"steps": results, "repeats": args.repeats}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default=None, help="Tiny Shakespeare text (default: the shared "
                                                "copy, else the excerpt in tests/data)")
    p.add_argument("--preset", default="tiny", choices=GPT2Config.presets())
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--warmup", type=int, default=30)
    p.add_argument("--val-batches", type=int, default=40)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--repeats", type=int, default=3, help="timed steps per case")
    p.add_argument("--timing-preset", default="gpt2", choices=GPT2Config.presets(),
                   help="the model of the timing (default: GPT-2 124M)")
    p.add_argument("--skip-quality", action="store_true")
    p.add_argument("--skip-timing", action="store_true")
    p.add_argument("--json", default=None, help="write the results there too")
    args = p.parse_args(argv)
    from harness import announce_machine
    announce_machine()
    info = machine()
    print(f"CPU: {info['cpu']}; ISA: {', '.join(info['isa'])}; gpt2s threads: "
          f"{info['threads']}; bfloat16 compute route: {info['bf16_compute']}"
          + (" (no AVX512_BF16: bfloat16 numbers at float32 speed)"
             if info["bf16_compute"] == "portable" else ""))
    out = {"machine": info}
    if not args.skip_quality:
        print(f"quality: {args.steps} steps of GPT-2 '{args.preset}', B={args.batch_size} "
              f"T={args.seq_len}, Tiny Shakespeare")
        out["quality"] = quality(args)
    if not args.skip_timing:
        print(f"training step, GPT-2 '{args.timing_preset}' (median of {args.repeats}, "
              f"seconds):")
        out["timing"] = timing(args)
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
