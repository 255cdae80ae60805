"""``python -m gpt2s.train``: train or fine-tune GPT-2 on a text file.

    python -m gpt2s.train data.txt --init mini --steps 2000 --out runs/mini
    python -m gpt2s.train data.txt --model assets/model.safetensors --steps 200 --lr 1e-4 --out runs/ft

The text is tokenized with the GPT-2 tokenizer; the last ``--val-fraction`` of the tokens is
held out for validation.  Each step samples ``--batch-size`` random windows of ``--seq-len``
tokens.  The learning rate warms up linearly, then decays on a cosine to 10%.  The model is
saved (model.safetensors + config.json, written atomically) to ``--out`` at the end, every
``--save-every`` steps and on Ctrl-C, together with the optimizer state (optimizer.npz) so
``--resume`` continues where it stopped.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np

from .weights import atomic_write


class UsageError(Exception):
    """A mistake in the command line or its inputs: reported without a traceback."""


def _positive_int(text):
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {v}")
    return v


def _nonneg_float(text):
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not (v >= 0 and math.isfinite(v)):
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {text}")
    return v


def build_parser() -> argparse.ArgumentParser:
    from .config import GPT2Config
    p = argparse.ArgumentParser(
        prog="python -m gpt2s.train",
        description="Train or fine-tune GPT-2 on a UTF-8 text file, on the CPU.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("data", help="UTF-8 text file to train on")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--model", help="start from this .safetensors file or model directory")
    src.add_argument("--init", default="mini", choices=GPT2Config.presets(),
                     help="start from random weights of this size (when --model is absent)")
    p.add_argument("--out", required=True, help="directory to save the model and optimizer")
    p.add_argument("--resume", action="store_true",
                   help="continue from the model and optimizer state saved in --out")
    p.add_argument("--steps", type=_positive_int, default=1000, help="optimizer steps")
    p.add_argument("--batch-size", type=_positive_int, default=8)
    p.add_argument("--seq-len", type=_positive_int, default=128,
                   help="tokens per training window (at most the model's n_ctx)")
    p.add_argument("--grad-accum", type=_positive_int, default=1,
                   help="micro-batches accumulated per optimizer step")
    p.add_argument("--lr", type=_nonneg_float, default=1e-3, help="peak learning rate")
    p.add_argument("--min-lr-ratio", type=_nonneg_float, default=0.1,
                   help="final learning rate as a fraction of --lr")
    p.add_argument("--warmup", type=int, default=100, help="linear warm-up steps")
    p.add_argument("--weight-decay", type=_nonneg_float, default=0.1)
    p.add_argument("--grad-clip", type=_nonneg_float, default=1.0,
                   help="global gradient-norm clip (0 disables)")
    p.add_argument("--val-fraction", type=_nonneg_float, default=0.1)
    p.add_argument("--eval-every", type=_positive_int, default=100)
    p.add_argument("--eval-batches", type=_positive_int, default=8)
    p.add_argument("--save-every", type=int, default=0, help="also save every N steps (0: end only)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=_positive_int, default=None,
                   help="threads for the kernels (default: OMP_NUM_THREADS or all cores)")
    p.add_argument("--log", help="write a CSV of step, lr, train loss, val loss, tokens/s here")
    p.add_argument("--quiet", action="store_true", help="no progress line")
    return p


def lr_at(step: int, total: int, peak: float, warmup: int, min_ratio: float) -> float:
    """Linear warm-up to peak, then cosine decay to peak * min_ratio at the last step."""
    if warmup > 0 and step < warmup:
        return peak * (step + 1) / warmup
    if total <= warmup:
        return peak
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return peak * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def load_tokens(path: Path) -> np.ndarray:
    from .tokenizer import get_tokenizer
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UsageError(f"{path}: no such file") from None
    except UnicodeDecodeError as e:
        raise UsageError(f"{path}: not UTF-8 text ({e})") from None
    ids = get_tokenizer().encode_ordinary(text)
    return np.asarray(ids, dtype=np.int64)


class Batches:
    """Random windows (B, T) of a token array and their next-token targets."""

    def __init__(self, tokens: np.ndarray, B: int, T: int, seed: int):
        self.tokens, self.B, self.T = tokens, B, T
        self.rng = np.random.default_rng(seed)
        self._offsets = np.arange(T + 1)

    def next(self):
        starts = self.rng.integers(0, len(self.tokens) - self.T - 1, size=self.B)
        w = self.tokens[starts[:, None] + self._offsets]
        return w[:, :-1], w[:, 1:]


class Progress:
    """Progress on stderr: one updating line on a terminal, else a line every 5% of the run."""

    def __init__(self, total: int, enabled: bool):
        self.total, self.enabled = total, enabled
        self.tty = sys.stderr.isatty()
        self.start = time.perf_counter()
        self._last_pct = -1

    def update(self, step: int, msg: str):
        if not self.enabled:
            return
        done = step / self.total
        pct = int(100 * done)
        if not self.tty and pct // 5 == self._last_pct // 5 and step != self.total:
            return
        self._last_pct = pct
        elapsed = time.perf_counter() - self.start
        eta = elapsed / done - elapsed if done > 0 else float("nan")
        bar = "#" * int(30 * done) + "." * (30 - int(30 * done))
        line = f"[{bar}] {step}/{self.total} {msg} eta {eta:4.0f}s"
        print("\r" + line if self.tty else line, end="" if self.tty else "\n",
              file=sys.stderr, flush=True)

    def close(self):
        if self.enabled and self.tty:
            print(file=sys.stderr)


def evaluate(model, batches: Batches, n: int) -> float:
    losses = []
    for _ in range(n):
        x, y = batches.next()
        _, loss = model.forward(x, y)
        losses.append(loss)
    model._last = None  # evaluation leaves nothing for backward
    return float(np.mean(losses))


def save(model, opt, out: Path, step: int, history: list):
    model.save_safetensors(out)
    opt.save(out / "optimizer.npz")
    state = json.dumps({"step": step, "history": history}).encode()
    atomic_write(out / "train_state.json", lambda f: f.write(state))


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return _run(args)
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def _run(args) -> int:
    import gpt2s
    from .config import GPT2Config
    from .model import GPT2
    from .optim import AdamW, clip_grad_norm

    if args.threads:
        gpt2s.set_num_threads(args.threads)
    out = Path(args.out)
    state = {"step": 0, "history": []}
    if args.resume:
        if not (out / "model.safetensors").is_file() or not (out / "optimizer.npz").is_file():
            raise UsageError(f"--resume: {out} has no saved model.safetensors + optimizer.npz")
        model = GPT2.from_safetensors(out)
        if (out / "train_state.json").is_file():
            state = json.loads((out / "train_state.json").read_text())
    elif args.model:
        model = GPT2.from_safetensors(args.model)
    else:
        model = GPT2.from_config(GPT2Config.preset(args.init), seed=args.seed)
    cfg = model.config
    if args.seq_len > cfg.n_ctx:
        raise UsageError(f"--seq-len {args.seq_len} exceeds the model's context n_ctx={cfg.n_ctx}")

    tokens = load_tokens(Path(args.data))
    n_val = int(len(tokens) * args.val_fraction)
    train_tokens, val_tokens = tokens[:len(tokens) - n_val], tokens[len(tokens) - n_val:]
    need = args.seq_len + 2
    if len(train_tokens) < need:
        raise UsageError(f"{args.data}: {len(train_tokens)} training tokens, need at least "
                         f"{need} for --seq-len {args.seq_len}")
    if n_val and len(val_tokens) < need:
        raise UsageError(f"{args.data}: the validation split has {len(val_tokens)} tokens, "
                         f"need {need}; lower --seq-len or raise --val-fraction (0 disables)")

    opt = AdamW(model, lr=args.lr, weight_decay=args.weight_decay)
    if args.resume:
        opt.load(out / "optimizer.npz")
    train = Batches(train_tokens, args.batch_size, args.seq_len, args.seed + state["step"])
    val = Batches(val_tokens, args.batch_size, args.seq_len, 1234) if n_val else None

    print(f"{model!r}\ntraining on {len(train_tokens):,} tokens, validating on "
          f"{len(val_tokens):,}; {args.steps} steps of {args.batch_size}x{args.seq_len}"
          f"{f' x{args.grad_accum}' if args.grad_accum > 1 else ''} tokens, "
          f"{gpt2s.get_num_threads()} threads", file=sys.stderr)
    log = open(args.log, "a", encoding="utf-8") if args.log else None
    if log and log.tell() == 0:
        log.write("step,lr,train_loss,val_loss,tokens_per_s\n")
    progress = Progress(args.steps, not args.quiet)
    history = state["history"]
    first = state["step"]
    step = first
    t0 = time.perf_counter()
    try:
        for step in range(first, first + args.steps):
            lr = lr_at(step, first + args.steps, args.lr, args.warmup, args.min_lr_ratio)
            opt.lr = lr
            model.zero_grad()
            loss = 0.0
            for _ in range(args.grad_accum):
                x, y = train.next()
                _, micro = model.forward(x, y, return_logits=False)
                model.backward()
                loss += micro / args.grad_accum
            if args.grad_accum > 1:
                from . import _core
                _core.scale_inplace(model._grad_buffer, 1.0 / args.grad_accum)
            if args.grad_clip > 0:
                clip_grad_norm(model, args.grad_clip)
            opt.step()
            dt = time.perf_counter() - t0
            tps = (step - first + 1) * args.batch_size * args.seq_len * args.grad_accum / dt
            val_loss = float("nan")
            last = step + 1 == first + args.steps
            if val is not None and ((step + 1) % args.eval_every == 0 or last):
                val_loss = evaluate(model, val, args.eval_batches)
            history.append([step + 1, lr, loss, val_loss])
            if log:
                log.write(f"{step + 1},{lr:.6g},{loss:.6f},{val_loss:.6f},{tps:.1f}\n")
                log.flush()
            progress.update(step + 1 - first, f"loss {loss:.4f} val {val_loss:.4f} "
                                              f"lr {lr:.2e} {tps:,.0f} tok/s")
            if args.save_every and (step + 1) % args.save_every == 0:
                save(model, opt, out, step + 1, history)
        step += 1
    except KeyboardInterrupt:
        progress.close()
        print(f"interrupted at step {step}; saving to {out}", file=sys.stderr)
        save(model, opt, out, step, history)
        return 130
    finally:
        if log:
            log.close()
    progress.close()
    save(model, opt, out, step, history)
    print(f"saved {out / 'model.safetensors'} after {step} steps "
          f"({time.perf_counter() - t0:.0f} s)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
