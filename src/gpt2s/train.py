"""``python -m gpt2s.train``: train or fine-tune GPT-2 on text files or token shards.

    python -m gpt2s.train input.txt --init mini --steps 2000 --out runs/mini
    python -m gpt2s.train "shards/train_*.bin" --val-data "shards/val_*.bin" --out runs/big
    python -m gpt2s.train input.txt --model assets --steps 200 --lr 1e-4 --out runs/ft

Data (``gpt2s.data``): UTF-8 text files (tokenized with the GPT-2 tokenizer), nanoGPT uint16
``.bin`` files and llm.c shards (memory-mapped), several paths and globs concatenated.  Without
``--val-data`` the last ``--val-fraction`` of the tokens is held out for validation.

A run is a pure function of its arguments: optimizer step ``s`` trains on the windows drawn by
``numpy.random.default_rng([seed, 0, s, micro])`` for each micro-batch, evaluation batch ``j``
is drawn by ``default_rng([seed, 1, j])`` (every evaluation sees the same windows), and the
learning rate of step ``s`` depends on ``s`` and ``--steps`` (the total) only.  So the data
position and every random state of a run are its seed and step count, and a run killed at any
instant (SIGKILL included) and continued with ``--resume`` ends bitwise equal to the run that
was never stopped, with the same thread count (see "Exact resume" below).

Checkpoints (``gpt2s.checkpoint``) are all or nothing: the files of a checkpoint and a
manifest of their sizes and SHA-256 hashes are written into a new directory, and one rename of
a symlink makes it current; ``--resume`` loads only a checkpoint its manifest vouches for.
``OUT/model.safetensors`` and ``OUT/config.json`` always show the current checkpoint, so OUT
loads with ``GPT2.from_safetensors`` and with transformers.  Saved every ``--save-every``
steps, at the end, and after the step in progress on Ctrl-C or SIGTERM.  Beside it:
``metrics.jsonl`` (a JSON object per step and per evaluation, NaN as null) and ``loss.png``.

A run directory has one writer: the trainer holds ``OUT/.lock`` (an advisory lock the system
drops when the process ends) from before it reads or writes anything in OUT, so a second
trainer on the same OUT stops at once.  Nothing is written or deleted through a symlink out of
OUT, and a new run never replaces a previous run's checkpoints unless told (``--overwrite``).
A step whose loss or gradient norm is not finite stops the run before its update, saving
nothing (``TrainingDiverged``).  Exit status: 0 done, 2 a usage error or a refused directory,
1 a failed run (diverged, disk full, unwritable), 128 + N stopped by signal N.

Exact resume: the kernels split work over threads statically, so a run is bitwise
reproducible on the same machine with the same thread count; resuming on another thread count
can change float sums in the last bits (never the data or the schedule).  The training loop
is a few functions (``train_batch``, ``train_step``, ``evaluate``, ``save_run``) so that a
data-parallel driver can reuse them.

Data parallel: ``mpiexec -n N python -m gpt2s.train ...`` trains one model on N processes
(``gpt2s.distributed``); see --help and docs/distributed.md.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from .checkpoint import (DATA_HASHES, LOG_FILES, CheckpointError, check_run_dir,
                         load_checkpoint, lock_run_dir, previous_run, remove_leftovers,
                         remove_run, save_checkpoint, strict_json)
from .optim import clip_coefficient, grad_norm
from .fs import atomic_write

__all__ = ["main", "build_parser", "lr_at", "effective_warmup", "train_batch", "eval_batch",
           "train_step", "evaluate", "RunConfig", "plot_metrics", "TrainingDiverged"]

PROG = "python -m gpt2s.train"
STATE_FORMAT = "gpt2s-train"
METRICS = "metrics.jsonl"
PLOT = "loss.png"
WARMUP_CLAMP = 0.1   # a warm-up of --steps or more is cut to this fraction of the run


class UsageError(Exception):
    """A mistake in the command line or its inputs: reported in one line, no traceback."""


class RunFailed(Exception):
    """A run that cannot go on (it diverged): reported in one line, exit status 1; every rank
    of a data-parallel run raises it at the same step."""


class TrainingDiverged(FloatingPointError):
    """A training step whose loss or gradient norm is not finite (NaN or infinity).  Raised
    before the step's update, so the model and optimizer keep the previous step's values;
    ``step`` is the step's 1-based number (as in metrics.jsonl), ``what`` "training loss" or
    "gradient norm"."""

    def __init__(self, step: int, what: str, value: float):
        super().__init__(f"step {step}: the {what} is {value} (not finite)")
        self.step, self.what, self.value = step, what, value


def _stop_unless_finite(value, step: int, what: str):
    if not math.isfinite(value):
        raise TrainingDiverged(step + 1, what, float(value))


# ------------------------------------------------------------------------------------------
# Command line


def _positive_int(text):
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {v}")
    return v


def _nonneg_int(text):
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if v < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {v}")
    return v


def _nonneg_float(text):
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not (v >= 0 and math.isfinite(v)):
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {text}")
    return v


def _positive_float(text):
    v = _nonneg_float(text)
    if not v > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return v


def _fraction(text):
    v = _nonneg_float(text)
    if not v < 1:
        raise argparse.ArgumentTypeError(f"must be in [0, 1), got {text}")
    return v


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        # one style for every error, as python -m gpt2s.generate: "PROG: error: ..."
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def _sizes_text() -> str:
    from .config import GPT2Config
    notes = {"tiny": "tests: seconds per run, learns little",
             "mini": "the bundled demo model's size",
             "small-demo": "a small model for hours of CPU training",
             "gpt2": "GPT-2 (124M)", "gpt2-medium": "GPT-2 medium", "gpt2-large": "GPT-2 large",
             "gpt2-xl": "GPT-2 XL"}
    lines = []
    for name in GPT2Config.presets():
        c = GPT2Config.preset(name)
        lines.append(f"  {name:<11} {c.n_layer:>2} layers {c.n_head:>2} heads n_embd {c.n_embd:>4} "
                     f"n_ctx {c.n_ctx:>4} {c.num_parameters() / 1e6:6.1f}M"
                     f"{'  ' + notes[name] if name in notes else ''}")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    from .config import GPT2Config
    p = _Parser(
        prog=PROG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Train GPT-2 from random weights, or fine-tune a saved model, on the CPU.\n"
                    "Checkpoints are all-or-nothing, and a run stopped in any way continues\n"
                    "exactly with --resume.",
        epilog=f"""\
data: UTF-8 text files (tokenized with the GPT-2 tokenizer), nanoGPT uint16 .bin files
  (train.bin/val.bin) and llm.c .bin shards (python -m gpt2s.prepare writes them); several
  paths and quoted globs are concatenated.  Any UTF-8 text works, e.g. the Tiny Shakespeare
  excerpt in the repository's tests/data/.  Without --val-data the last --val-fraction of
  the tokens is held out for validation.

sizes for --init (random weights, GPT-2 initialisation, the GPT-2 vocabulary):
{_sizes_text()}

schedule: --steps is the total number of optimizer steps of the run; each one averages
  --grad-accum micro-batches of --batch-size windows of --seq-len tokens.  The learning rate
  rises linearly for --warmup steps, then decays on a cosine to --min-lr-ratio x --lr at the
  last step.  A --warmup of --steps or more is cut to 10% of the run (with a warning).

output in --out: model.safetensors + config.json (loadable by gpt2s and transformers),
  optimizer.npz, train_state.json, metrics.jsonl (one JSON object per step and per
  evaluation) and loss.png (when matplotlib is installed).  A run stopped in any way
  (Ctrl-C, kill, power loss) continues exactly with the same command plus --resume.  One
  trainer at a time per --out (a second one stops at once, naming the first one's PID); a
  new run refuses a directory that holds a previous run's checkpoints unless --overwrite.
  A step whose loss or gradient norm is not finite stops the run, saving nothing (the last
  checkpoint stays the resume point).  Exit status: 0 done, 2 a usage error or a refused
  --out, 1 a failed run (diverged, disk full, no permission), 128+N stopped by signal N.

examples:
  {PROG} input.txt --init mini --steps 2000 --out runs/mini
  {PROG} input.txt --model assets --steps 200 --lr 1e-4 --warmup 20 --out runs/ft
  {PROG} "shards/train_*.bin" --val-data "shards/val_*.bin" --init gpt2 \\
      --batch-size 8 --seq-len 1024 --grad-accum 8 --out runs/gpt2 --save-every 100
  {PROG} input.txt --init mini --steps 2000 --out runs/mini --resume
  mpiexec -n 4 {PROG} input.txt --init mini --batch-size 2 --out runs/dp
  python -m gpt2s.generate --model runs/mini "ROMEO:"

data parallel over MPI (pip install "gpt2s[mpi]"; docs/distributed.md): under
  mpiexec -n N (or srun) each of the N processes trains on its share of every global batch of
  N x --batch-size windows per micro-batch, and the gradients are summed over the processes
  during the backward, so the run computes what one process with --batch-size N x B computes
  (the same windows, loss and clipping; train_state.json records the global batch, so a run
  resumes with any N that keeps it).  The world size is read from the variables MPI
  launchers set: PMI_SIZE (MPICH, Intel MPI), OMPI_COMM_WORLD_SIZE (Open MPI),
  MV2_COMM_WORLD_SIZE (MVAPICH), PMIX_SIZE, SLURM_NTASKS inside an srun step; mpi4py is
  imported only then (or with --distributed).  Rank 0 alone prints, writes metrics and
  checkpoints; evaluation is split over the ranks.  A rank that dies or hangs makes the
  others abort the job after --dp-timeout seconds.
""")
    p.add_argument("data", nargs="*", metavar="DATA",
                   help="training data: text files, nanoGPT .bin files, llm.c shards or globs "
                        "of them (also accepted as --data)")
    p.add_argument("--data", dest="data_opt", nargs="+", action="extend", default=[],
                   metavar="DATA", help="more training data, as the positional DATA "
                                        "(default: none)")
    p.add_argument("--val-data", nargs="+", action="extend", default=None, metavar="DATA",
                   help="validation data in the same forms (e.g. nanoGPT's val.bin); then "
                        "--val-fraction is not used (default: hold out --val-fraction)")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--model", metavar="PATH",
                     help="fine-tune this model: a .safetensors file or a model directory "
                          "(or a name such as gpt2 or demo: GPT2.from_pretrained)"
                          " (default: random weights of --init)")
    src.add_argument("--init", choices=GPT2Config.presets(), default=None, metavar="SIZE",
                     help="start from random weights of this size, one of "
                          f"{', '.join(GPT2Config.presets())} (see sizes below; default: mini)")
    p.add_argument("--out", required=True, metavar="DIR",
                   help="run directory for the checkpoint, metrics.jsonl and loss.png "
                        "(required)")
    p.add_argument("--resume", action="store_true",
                   help="continue the run saved in --out from its checkpoint, to --steps")
    p.add_argument("--overwrite", action="store_true",
                   help="start a new run in an --out that holds a previous run: delete that "
                        "run's checkpoints (.checkpoints and the four links to it), "
                        "metrics.jsonl and loss.png, and nothing else (default: refuse; "
                        "continue it with --resume)")
    p.add_argument("--allow-changes", action="store_true",
                   help="with --resume: continue even if the batch size, sequence length, "
                        "gradient accumulation, seed, data or model differ from the "
                        "checkpoint's (the run is then no longer reproducible)")
    p.add_argument("--steps", type=_positive_int, default=1000, metavar="N",
                   help="total optimizer steps of the run (default: %(default)s)")
    p.add_argument("--batch-size", type=_positive_int, default=8, metavar="B",
                   help="windows per micro-batch (default: %(default)s)")
    p.add_argument("--seq-len", type=_positive_int, default=128, metavar="T",
                   help="tokens per window, at most the model's n_ctx (default: %(default)s)")
    p.add_argument("--grad-accum", type=_positive_int, default=1, metavar="N",
                   help="micro-batches averaged per optimizer step (default: %(default)s)")
    p.add_argument("--lr", type=_nonneg_float, default=1e-3,
                   help="peak learning rate (default: %(default)s)")
    p.add_argument("--min-lr-ratio", type=_nonneg_float, default=0.1, metavar="R",
                   help="final learning rate as a fraction of --lr (default: %(default)s)")
    p.add_argument("--warmup", type=_nonneg_int, default=100, metavar="N",
                   help="steps of linear learning-rate warm-up (default: %(default)s)")
    p.add_argument("--weight-decay", type=_nonneg_float, default=0.1, metavar="WD",
                   help="AdamW weight decay of the 2-D weights (default: %(default)s)")
    p.add_argument("--grad-clip", type=_nonneg_float, default=1.0, metavar="NORM",
                   help="clip the global gradient norm to this; 0 disables "
                        "(default: %(default)s)")
    p.add_argument("--val-fraction", type=_fraction, default=0.1, metavar="F",
                   help="fraction of the tokens (the last ones) held out for validation; "
                        "0 disables validation (default: %(default)s)")
    p.add_argument("--eval-every", type=_positive_int, default=100, metavar="N",
                   help="evaluate on the validation data every N steps and at the end "
                        "(default: %(default)s)")
    p.add_argument("--eval-batches", type=_positive_int, default=8, metavar="N",
                   help="validation batches per evaluation, the same ones each time "
                        "(default: %(default)s)")
    p.add_argument("--save-every", type=_nonneg_int, default=0, metavar="N",
                   help="also save a checkpoint every N steps; 0 saves at the end (and on "
                        "Ctrl-C) only (default: %(default)s)")
    p.add_argument("--seed", type=_nonneg_int, default=0, metavar="S",
                   help="seed of the initial weights and of the batches (default: %(default)s)")
    p.add_argument("--threads", type=_positive_int, default=None, metavar="N",
                   help="CPU threads (default: $OMP_NUM_THREADS, else all cores; under MPI "
                        "the cores divided by the ranks on the node)")
    p.add_argument("--distributed", action="store_true",
                   help="data parallel over MPI even when no launcher variable announces more "
                        "than one process (default: when one does; see below)")
    p.add_argument("--dp-timeout", type=_positive_float, default=300.0, metavar="S",
                   help="data parallel: abort the job when another rank has not answered for "
                        "S seconds (default: %(default)s)")
    p.add_argument("--no-overlap", action="store_true",
                   help="data parallel: sum the gradients after the backward instead of "
                        "during it (for comparison)")
    p.add_argument("--log", metavar="CSV",
                   help="also write step, lr, train loss, val loss, tokens/s to this CSV "
                        "(default: none; metrics.jsonl in --out has the same and more)")
    plot = p.add_mutually_exclusive_group()
    plot.add_argument("--plot", action="store_true",
                      help="require matplotlib and redraw loss.png at every evaluation "
                           "(default: draw it at the end of a run if matplotlib is installed)")
    plot.add_argument("--no-plot", action="store_true", help="never draw loss.png")
    p.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    return p


# ------------------------------------------------------------------------------------------
# Schedule and batches: pure functions of (seed, step, micro-step)


def lr_at(step: int, total: int, peak: float, warmup: int, min_ratio: float) -> float:
    """Learning rate of optimizer step ``step`` (0-based) of ``total``: linear warm-up to
    peak over ``warmup`` steps, then cosine decay to ``peak * min_ratio`` at the last step."""
    if warmup > 0 and step < warmup:
        return peak * (step + 1) / warmup
    if total <= warmup:
        return peak
    decay_steps = total - 1 - warmup   # the last step (total - 1) lands on the floor
    progress = min(1.0, (step - warmup) / decay_steps) if decay_steps > 0 else 1.0
    return peak * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def effective_warmup(warmup: int, steps: int) -> tuple[int, str | None]:
    """(the warm-up to use, a warning or None): a warm-up of ``steps`` or more would never
    reach the decay, so it is cut to WARMUP_CLAMP of the run."""
    if warmup < steps:
        return warmup, None
    clamped = int(steps * WARMUP_CLAMP)
    return clamped, (f"--warmup {warmup} is not below --steps {steps}, so the learning rate "
                     f"would never decay; using --warmup {clamped} (10% of the run)")


def _windows(data, rng, B: int, T: int):
    w = data.random_windows(rng, B, T)
    return w[:, :-1], w[:, 1:]


def train_batch(data, seed: int, step: int, micro: int, B: int, T: int):
    """(inputs, targets), each (B, T) int64: micro-batch ``micro`` of optimizer step ``step``,
    a pure function of its arguments (so resuming at any step sees the same batches)."""
    return _windows(data, np.random.default_rng([seed, 0, step, micro]), B, T)


def eval_batch(data, seed: int, index: int, B: int, T: int):
    """(inputs, targets) of validation batch ``index``: the same at every evaluation."""
    return _windows(data, np.random.default_rng([seed, 1, index]), B, T)


@dataclass(frozen=True)
class RunConfig:
    """What defines a run's trajectory (stored in train_state.json, compared on resume)."""
    steps: int
    batch_size: int
    seq_len: int
    grad_accum: int
    lr: float
    min_lr_ratio: float
    warmup: int
    weight_decay: float
    grad_clip: float
    seed: int
    val_fraction: float
    eval_batches: int


def _lr_of(cfg: RunConfig, step: int) -> float:
    return lr_at(step, cfg.steps, cfg.lr, cfg.warmup, cfg.min_lr_ratio)


# ------------------------------------------------------------------------------------------
# One step, one evaluation


def train_step(model, opt, data, cfg: RunConfig, step: int) -> tuple[float, float | None]:
    """Optimizer step ``step`` (0-based): ``grad_accum`` micro-batches, their gradients
    averaged, clipped and applied in one fused AdamW pass.  Returns (the mean training loss,
    the gradient norm before clipping or None).  Raises TrainingDiverged, before updating
    anything, when a micro-batch's loss or the gradient norm is not finite."""
    opt.lr = _lr_of(cfg, step)
    model.zero_grad()
    loss = 0.0
    for micro in range(cfg.grad_accum):
        x, y = train_batch(data, cfg.seed, step, micro, cfg.batch_size, cfg.seq_len)
        _, micro_loss = model.forward(x, y, return_logits=False)
        _stop_unless_finite(micro_loss, step, "training loss")
        model.backward()
        loss += micro_loss
    # each micro-batch loss is a mean, so the step's gradient is the mean of theirs: 1/N
    # rides along in the fused update instead of a pass of its own over the gradients
    scale, norm = 1.0 / cfg.grad_accum, None
    if cfg.grad_clip > 0:
        # the norm AdamW.step(max_norm=) would take, checked before it reaches the weights
        norm = grad_norm(model) * scale
        _stop_unless_finite(norm, step, "gradient norm")
        scale *= clip_coefficient(norm, cfg.grad_clip)
    opt.step(grad_scale=scale)
    return loss / cfg.grad_accum, norm


def _train_step_dp(model, opt, data, cfg: RunConfig, step: int, dp):
    """train_step on N ranks (dp: a DataParallel): this rank trains on its rows of each
    global micro-batch of ``cfg.batch_size`` windows; the gradients are summed over the ranks
    during the last micro-batch's backward."""
    opt.lr = _lr_of(cfg, step)
    model.zero_grad()
    loss = 0.0
    for micro in range(cfg.grad_accum):
        x, y = dp.shard(*train_batch(data, cfg.seed, step, micro, cfg.batch_size, cfg.seq_len))
        micro_loss = dp.forward(x, y)      # the global mean loss of the micro-batch
        # the same value on every rank, so every rank stops here together
        _stop_unless_finite(micro_loss, step, "training loss")
        loss += micro_loss
        # the last micro-batch's reduction carries the gradients of all of them
        dp.backward(sync=micro == cfg.grad_accum - 1)
    scale, norm = 1.0 / cfg.grad_accum, None
    if cfg.grad_clip > 0:
        # the same norm on every rank (AdamW's own would be each rank's local sum)
        norm = dp.grad_norm() * scale
        _stop_unless_finite(norm, step, "gradient norm")
        scale *= clip_coefficient(norm, cfg.grad_clip)
    opt.step(grad_scale=scale)
    return loss / cfg.grad_accum, norm


def evaluate(model, val, cfg: RunConfig, dp=None) -> float:
    """Mean loss over the ``eval_batches`` fixed validation batches.  Through the training
    forward (``return_logits=False``): its logits buffer is the one the training steps
    already hold, where ``for_backward=False`` would allocate another (B, T, V) array per
    batch (1.6 GB for GPT-2 at B=8, T=1024); the next training forward replaces what it
    keeps for a backward."""
    if dp is not None:
        # each rank evaluates its rows of every batch; dp.forward reduces the losses
        batches = (dp.shard(*eval_batch(val, cfg.seed, j, cfg.batch_size, cfg.seq_len))
                   for j in range(cfg.eval_batches))
        return float(np.mean([dp.forward(x, y) for x, y in batches]))
    losses = [model.forward(*eval_batch(val, cfg.seed, j, cfg.batch_size, cfg.seq_len),
                            return_logits=False)[1]
              for j in range(cfg.eval_batches)]
    return float(np.mean(losses))


# ------------------------------------------------------------------------------------------
# Metrics: metrics.jsonl (+ the optional CSV), one row per step, cut back on resume


class Metrics:
    """Appends rows to OUT/metrics.jsonl and the optional CSV log.  Opening cuts both back to
    the rows of steps <= ``upto`` (the checkpoint's step), so a resumed run rewrites the
    steps after its checkpoint instead of repeating them."""

    CSV_HEADER = "step,lr,train_loss,val_loss,tokens_per_s\n"

    def __init__(self, out: Path, csv_path: Path | None, upto: int):
        self.path = out / METRICS
        self.csv_path = csv_path
        self._f = self._csv = None
        self._csv_pending = None
        with _naming(self.path):
            self.rows = self._cut_jsonl(self.path, upto)
            self._f = open(self.path, "a", encoding="utf-8")
        if csv_path is not None:
            with _naming(csv_path):
                self._cut_csv(csv_path, upto)
                self._csv = open(csv_path, "a", encoding="utf-8")
                if self._csv.tell() == 0:
                    self._csv.write(self.CSV_HEADER)
                    self._csv.flush()

    @staticmethod
    def _cut_jsonl(path: Path, upto: int) -> list:
        rows, kept = [], []
        if path.exists():
            for line in path.read_text(encoding="utf-8").splitlines(keepends=True):
                try:
                    row = json.loads(line) if line.endswith("\n") else None
                except json.JSONDecodeError:
                    row = None   # a line cut by a kill
                if isinstance(row, dict) and isinstance(row.get("step"), int) \
                        and row["step"] <= upto:
                    rows.append(row)
                    kept.append(line)
        text = "".join(kept).encode()
        if not path.exists() or path.read_bytes() != text:
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write(path, lambda f: f.write(text))
        return rows

    @classmethod
    def _cut_csv(cls, path: Path, upto: int):
        if not path.exists():
            return
        kept = []
        for line in path.read_text(encoding="utf-8").splitlines(keepends=True):
            step = line.split(",", 1)[0]
            if line.endswith("\n") and step.isdigit() and int(step) <= upto:
                kept.append(line)
        text = (cls.CSV_HEADER + "".join(kept)).encode()
        if path.read_bytes() != text:
            atomic_write(path, lambda f: f.write(text))

    def step(self, step: int, lr: float, loss: float, norm, tokens_per_s: float,
             elapsed: float):
        self._write({"type": "train", "step": step, "lr": lr, "train_loss": loss,
                     "grad_norm": norm, "tokens_per_s": round(tokens_per_s, 1),
                     "elapsed_s": round(elapsed, 3)})
        # the CSV row waits for this step's evaluation, if there is one
        self._flush_csv()
        self._csv_pending = [step, lr, loss, None, tokens_per_s]

    def eval(self, step: int, val_loss: float):
        self._write({"type": "eval", "step": step, "val_loss": val_loss})
        if self._csv_pending and self._csv_pending[0] == step:
            self._csv_pending[3] = val_loss

    def _write(self, row: dict):
        self.rows.append(row)
        with _naming(self.path):
            self._f.write(strict_json(row) + "\n")
            self._f.flush()

    def _flush_csv(self):
        if self._csv is not None and self._csv_pending is not None:
            step, lr, loss, val, tps = self._csv_pending
            val_text = "" if val is None or not math.isfinite(val) else f"{val:.6f}"
            with _naming(self.csv_path):
                self._csv.write(f"{step},{lr:.6g},{loss:.6f},{val_text},{tps:.1f}\n")
                self._csv.flush()
        self._csv_pending = None

    def sync(self):
        """Flush the pending CSV row (before a checkpoint, so the CSV holds its steps)."""
        self._flush_csv()

    def close(self):
        try:
            self._flush_csv()
        finally:
            for f in (self._f, self._csv):
                if f is not None:
                    try:
                        f.close()
                    except OSError:
                        # a failed flush of what a failed write left buffered: the write
                        # already reported it
                        pass


class _naming:
    """Give an OSError raised inside the block the file's name when it has none (a write
    that fails says only "No space left on device")."""

    def __init__(self, path):
        self.path = path

    def __enter__(self):
        return self

    def __exit__(self, kind, e, tb):
        if isinstance(e, OSError) and e.filename is None:
            raise OSError(e.errno, e.strerror or str(e), str(self.path)) from e
        return False


def plot_metrics(metrics_path, png_path, title: str = "") -> Path:
    """Draw train and validation loss against the step, the learning rate on a second axis,
    from a metrics.jsonl; written atomically.  Needs matplotlib (no pyplot, no display)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    rows = []
    for line in Path(metrics_path).read_text(encoding="utf-8").splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    train = [(r["step"], r["train_loss"], r["lr"]) for r in rows if r.get("type") == "train"]
    val = [(r["step"], r["val_loss"]) for r in rows if r.get("type") == "eval"]

    fig = Figure(figsize=(8, 4.8), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    if train:
        steps = np.array([t[0] for t in train])
        loss = np.array([np.nan if t[1] is None else t[1] for t in train], float)
        ax.plot(steps, loss, color="tab:blue", lw=0.8, alpha=0.45 if len(train) > 50 else 1,
                label="train loss")
        if len(train) > 50:
            # a moving average shows the trend through the batch-to-batch noise
            k = max(2, len(train) // 50)
            smooth = np.convolve(np.nan_to_num(loss, nan=np.nanmean(loss)), np.ones(k) / k,
                                 mode="valid")
            ax.plot(steps[k - 1:], smooth, color="tab:blue", lw=1.6,
                    label=f"train loss ({k}-step mean)")
    if val:
        ax.plot([v[0] for v in val], [np.nan if v[1] is None else v[1] for v in val], "o-",
                color="tab:orange", lw=1.6, ms=4, label="validation loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (cross-entropy, nats)")
    ax.grid(True, alpha=0.3)
    handles, labels = ax.get_legend_handles_labels()
    if train:
        ax2 = ax.twinx()
        line, = ax2.plot([t[0] for t in train], [t[2] for t in train], "--", color="tab:gray",
                         lw=1, label="learning rate")
        ax2.set_ylabel("learning rate")
        from matplotlib.ticker import FuncFormatter
        ax2.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:.3g}"))
        ax2.set_ylim(bottom=0)
        handles.append(line)
        labels.append("learning rate")
    if handles:
        ax.legend(handles, labels, loc="best")
    if title:
        ax.set_title(title)
    fig.tight_layout()
    png_path = Path(png_path)
    atomic_write(png_path, lambda f: fig.savefig(f, format="png"))
    return png_path


def _plot_title(out: Path, model) -> str:
    c = model.config
    return (f"{out.resolve().name}: {c.n_layer} layers, {c.n_head} heads, n_embd {c.n_embd}, "
            f"{model.num_parameters() / 1e6:.1f}M parameters")


def _have_matplotlib() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


# ------------------------------------------------------------------------------------------
# Progress


class Progress:
    """Progress on stderr: one updating line on a terminal, else a line every 5% of the run."""

    def __init__(self, first: int, total: int, enabled: bool):
        self.first, self.total, self.enabled = first, total, enabled
        self.tty = sys.stderr.isatty()
        self.start = time.perf_counter()
        self._last_pct = -1

    def update(self, step: int, loss: float, last_val, lr: float, tokens_per_s: float):
        if not self.enabled:
            return
        pct = int(100 * step / self.total)
        if not self.tty and pct // 5 == self._last_pct // 5 and step != self.total:
            return
        self._last_pct = pct
        done = (step - self.first) / max(1, self.total - self.first)
        elapsed = time.perf_counter() - self.start
        eta = f" | eta {elapsed / done - elapsed:.0f}s" if 0 < done < 1 else ""
        val = (f" | val {last_val['loss']:.4f} (step {last_val['step']})"
               if last_val and last_val["loss"] is not None and math.isfinite(last_val["loss"])
               else "")
        line = (f"step {step}/{self.total} | loss {loss:.4f}{val} | lr {lr:.2e} | "
                f"{tokens_per_s:,.0f} tok/s{eta}")
        if self.tty:
            print("\r\x1b[K" + line, end="", file=sys.stderr, flush=True)
        else:
            print(line, file=sys.stderr, flush=True)

    def close(self):
        if self.enabled and self.tty:
            print(file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------------
# Signals: finish the step in progress, save, stop


class _StopRequests:
    """SIGINT (Ctrl-C) and SIGTERM set a flag the loop reads between steps, so the
    checkpoint written on the way out holds a whole number of steps.  A second Ctrl-C stops
    at once (the last checkpoint stays valid: saves are all-or-nothing)."""

    def __init__(self):
        self.signal = None
        self._old = {}

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:   # not the main thread: leave signals alone
                pass
        return self

    def _handle(self, sig, frame):
        if self.signal is not None and sig == signal.SIGINT:
            raise KeyboardInterrupt
        self.signal = sig
        print(f"\n{signal.Signals(sig).name}: stopping after this step (Ctrl-C again to stop "
              f"now)", file=sys.stderr, flush=True)

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)


# ------------------------------------------------------------------------------------------
# The run


def _load_data(args):
    from .data import TokenData
    specs = list(args.data) + list(args.data_opt)
    if not specs:
        raise UsageError("no training data: give text files, .bin files or globs as DATA")
    data = TokenData(specs)
    if args.val_data:
        train, val = data, TokenData(args.val_data)
    elif args.val_fraction > 0:
        train, val = data.split(args.val_fraction)
    else:
        train, val = data, None
    need = args.seq_len + 1
    what = " ".join(specs)
    if len(train) < need:
        raise UsageError(f"{what}: {len(train):,} training tokens, too few for one window of "
                         f"--seq-len {args.seq_len} (+1 for the targets)")
    if val is not None and len(val) < need:
        where = " ".join(args.val_data) if args.val_data else \
            f"the validation split (--val-fraction {args.val_fraction})"
        raise UsageError(f"{where}: {len(val):,} tokens, too few for one window of --seq-len "
                         f"{args.seq_len}; lower --seq-len, raise --val-fraction, or pass "
                         f"--val-fraction 0 to train without validation")
    return train, val, data.describe() if not args.val_data else \
        f"{data.describe()}; validation {val.describe()}"


def _model_source(args) -> str | None:
    if args.model:
        p = Path(args.model).expanduser()
        return "model:" + (str(p.resolve()) if p.exists() else args.model)
    if args.init:
        return "init:" + args.init
    return None


def _data_difference(old_files, new_files) -> str:
    """Which files differ between the checkpoint's data (``old_files``, the records
    TokenData.files() made then) and this run's, by position; "" when the checkpoint has no
    records."""
    if not isinstance(old_files, list) or not isinstance(new_files, list):
        return ""
    notes = []
    for i in range(max(len(old_files), len(new_files))):
        old = old_files[i] if i < len(old_files) and isinstance(old_files[i], dict) else None
        new = new_files[i] if i < len(new_files) else None
        if new is None:
            notes.append(f"{old.get('path') if old else f'file {i + 1}'}: in the checkpoint's "
                         f"run, not in this one")
        elif old is None:
            notes.append(f"{new['path']}: not in the checkpoint's run")
        elif old.get("sha256") != new["sha256"]:
            size = (f" ({new['size']:,} bytes, were {old['size']:,})"
                    if isinstance(old.get("size"), int) and old["size"] != new["size"] else
                    " (same size)")
            if old.get("path") == new["path"]:
                notes.append(f"{new['path']}: its content changed since the checkpoint{size}")
            else:
                notes.append(f"{new['path']}: its content differs from {old.get('path')}, "
                             f"the checkpoint's run's file {i + 1}{size}")
        elif old.get("kind") != new["kind"]:
            notes.append(f"{new['path']}: read as {new['kind']}, the checkpoint's run read "
                         f"it as {old.get('kind')}")
    return ", ".join(notes) if notes else "the same files, another token range"


def _check_resume(saved: dict, run: RunConfig, identity: dict, allow: bool, legacy=None):
    """Refuse (or with --allow-changes, warn about) what breaks an exact continuation; note
    schedule changes, which the user asked for explicitly.  ``legacy(key)`` gives the data's
    fingerprint in the format of earlier gpt2s releases, for a checkpoint that holds one."""
    from .data import FINGERPRINT_PREFIX
    old_run, old_id = saved.get("run", {}), saved.get("identity", {})
    broken, notes = [], []
    for key, flag in (("batch_size", "--batch-size"), ("seq_len", "--seq-len"),
                      ("grad_accum", "--grad-accum"), ("seed", "--seed"),
                      ("val_fraction", "--val-fraction")):
        if key in old_run and old_run[key] != getattr(run, key):
            broken.append(f"{flag} {getattr(run, key)} (the checkpoint's run used "
                          f"{old_run[key]})")
    for key, what in (("train_data", "the training data"), ("val_data", "the validation data")):
        old_fp, new_fp = old_id.get(key), identity[key]
        if old_fp == new_fp:
            continue
        if key == "val_data" and broken and broken[-1].startswith("the training data") and \
                identity.get("val_files") is None and old_id.get("val_files") is None:
            continue   # a split of the same files: what changed is already named
        older = isinstance(old_fp, str) and not old_fp.startswith(FINGERPRINT_PREFIX)
        if older and legacy is not None and legacy(key) == old_fp:
            notes.append(f"{what}: the checkpoint holds the fingerprint of an earlier gpt2s "
                         f"(each file's name, size and first and last 4 KiB), which matches; "
                         f"the next checkpoint records the files' content hashes")
            continue
        files_key = key.replace("_data", "_files")
        detail = _data_difference(old_id.get(files_key), identity.get(files_key))
        if detail:
            broken.append(f"{what} differ: {detail}")
        elif older:
            broken.append(f"{what} differ (the checkpoint holds the fingerprint of an earlier "
                          f"gpt2s, {old_fp}, of each file's name, size and first and last "
                          f"4 KiB: a file was renamed, resized or changed at an end)")
        else:
            broken.append(f"{what} differ (fingerprint {new_fp}, the checkpoint's run used "
                          f"{old_fp})")
    if identity["model_source"] is not None and old_id.get("model_source") != \
            identity["model_source"]:
        broken.append(f"the model ({identity['model_source'].split(':', 1)[1]}; the "
                      f"checkpoint's run started from {old_id.get('model_source')})")
    for key, flag in (("steps", "--steps"), ("lr", "--lr"), ("min_lr_ratio", "--min-lr-ratio"),
                      ("warmup", "--warmup"), ("weight_decay", "--weight-decay"),
                      ("grad_clip", "--grad-clip"), ("eval_batches", "--eval-batches")):
        if key in old_run and old_run[key] != getattr(run, key):
            notes.append(f"{flag} is now {getattr(run, key)} (was {old_run[key]}); the run "
                         f"continues with the new value")
    if broken and not allow:
        raise UsageError("--resume: this run differs from the checkpoint's in: "
                         + "; ".join(broken) + ". Resume with the same arguments, or pass "
                         "--allow-changes to continue anyway (not reproducible)")
    for b in broken:
        print(f"warning: --allow-changes: {b}", file=sys.stderr)
    for n in notes:
        print(f"note: {n}", file=sys.stderr)


def save_run(out: Path, model, opt, step: int, run: RunConfig, identity: dict, last_val,
             elapsed: float) -> Path:
    """The checkpoint of the run after ``step`` optimizer steps."""
    import gpt2s
    state = {
        "format": STATE_FORMAT, "step": step, "gpt2s_version": gpt2s.__version__,
        # the data position and every random state: batches are drawn from (seed, step,
        # micro-step) alone, so continuing needs only these two numbers
        "data_position": {"next_step": step, "next_micro_batch": 0, "seed": run.seed,
                          "train_batches": "numpy default_rng([seed, 0, step, micro])",
                          "eval_batches": "numpy default_rng([seed, 1, index])"},
        "run": asdict(run), "identity": identity, "model_config": model.config.as_dict(),
        "last_val": last_val, "tokens_seen": step * run.batch_size * run.seq_len
        * run.grad_accum, "elapsed_s": round(elapsed, 3),
    }
    return save_checkpoint(out, model, opt, state)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return _run(args)
    except (UsageError, CheckpointError) as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        _abort_other_ranks(2)
        return 2
    except RunFailed as e:
        # every rank stopped at the same step: no abort needed, one message is enough
        if _MPI_WORLD is None or _MPI_WORLD[1] == 0:
            print(f"{PROG}: error: {e}", file=sys.stderr)
        return 1
    except OSError as e:
        print(f"{PROG}: error: {_os_error_text(e)}", file=sys.stderr)
        _abort_other_ranks(1)
        return 1
    except KeyboardInterrupt:
        print(f"\n{PROG}: stopped; the last checkpoint in {args.out} is intact", file=sys.stderr)
        return 130


def _os_error_text(e: OSError) -> str:
    """One line: the file, then the cause (e.g. "No space left on device")."""
    cause = e.strerror or str(e) or type(e).__name__
    if e.filename is None:
        return cause
    where = f"{e.filename} -> {e.filename2}" if e.filename2 is not None else f"{e.filename}"
    return f"{where}: {cause}"


_MPI_WORLD = None   # the MPI world (size, rank) of a data-parallel run, else None


def _abort_other_ranks(status: int):
    """Under MPI a rank that stops alone would leave the others waiting until --dp-timeout:
    end the whole job now (MPI_Abort) instead."""
    if _MPI_WORLD is not None and _MPI_WORLD[0] > 1:
        from mpi4py import MPI
        sys.stderr.flush()
        MPI.COMM_WORLD.Abort(status)


def _setup_mpi(args):
    """(DataParallel class, world size, rank) when this is a data-parallel run, else None."""
    global _MPI_WORLD
    from .distributed import world_size_from_env
    if world_size_from_env() == 1 and not args.distributed:
        return None
    try:
        from mpi4py import MPI
    except ImportError as e:
        raise UsageError(f"data parallel needs mpi4py (pip install 'gpt2s[mpi]'): {e}") \
            from None
    from .distributed import DataParallel
    _MPI_WORLD = (MPI.COMM_WORLD.Get_size(), MPI.COMM_WORLD.Get_rank())
    if _MPI_WORLD[0] == 1:
        return None
    return DataParallel, _MPI_WORLD[0], _MPI_WORLD[1]


def _run(args) -> int:
    try:
        return _run_inner(args)
    except (UsageError, CheckpointError, RunFailed, OSError, KeyboardInterrupt):
        raise
    except BaseException as e:
        if _MPI_WORLD is not None and _MPI_WORLD[0] > 1 and not isinstance(e, SystemExit):
            import traceback
            traceback.print_exc()
            print(f"{PROG}: rank {_MPI_WORLD[1]}: {type(e).__name__}: {e}; aborting the job",
                  file=sys.stderr, flush=True)
            _abort_other_ranks(1)
        raise


def _run_inner(args) -> int:
    import gpt2s

    mpi = _setup_mpi(args)
    world, rank = (mpi[1], mpi[2]) if mpi else (1, 0)
    # every check that needs no data or model first
    if args.threads:
        try:
            gpt2s.set_num_threads(args.threads)
        except ValueError as e:
            raise UsageError(f"--threads: {e}") from None
    elif mpi and not os.environ.get("OMP_NUM_THREADS"):
        from .distributed import default_threads
        gpt2s.set_num_threads(default_threads())
    if rank > 0:
        args.quiet, args.plot, args.no_plot, args.log = True, False, True, None
    if args.allow_changes and not args.resume:
        raise UsageError("--allow-changes is for --resume only")
    if args.overwrite and args.resume:
        raise UsageError("--overwrite starts a new run, --resume continues one: give one")
    if args.val_data and args.val_fraction != build_parser().get_default("val_fraction"):
        raise UsageError("--val-fraction and --val-data exclude each other")
    if args.plot and not _have_matplotlib():
        raise UsageError("--plot needs matplotlib: pip install matplotlib "
                         "(or gpt2s[plot])")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out}: exists and is not a directory")
    if rank > 0:
        return _run_locked(args, out, mpi, world, rank)
    # the one writer: held from before anything in OUT is read for writing until the end
    with lock_run_dir(out):
        return _run_locked(args, out, mpi, world, rank)


def _run_locked(args, out: Path, mpi, world: int, rank: int) -> int:
    import gpt2s
    from .config import GPT2Config
    from .data import DataError, FileHashes
    from .model import GPT2
    from .optim import AdamW

    warmup, warning = effective_warmup(args.warmup, args.steps)
    if warning:
        print(f"warning: {warning}", file=sys.stderr)
    # batch_size is the global micro-batch: N ranks x --batch-size
    run = RunConfig(steps=args.steps, batch_size=args.batch_size * world, seq_len=args.seq_len,
                    grad_accum=args.grad_accum, lr=args.lr, min_lr_ratio=args.min_lr_ratio,
                    warmup=warmup, weight_decay=args.weight_decay, grad_clip=args.grad_clip,
                    seed=args.seed, val_fraction=0.0 if args.val_data else args.val_fraction,
                    eval_batches=args.eval_batches)

    ck = None
    check_run_dir(out)     # no symlink where the run writes or deletes
    if args.resume:
        try:
            ck = load_checkpoint(out)
        except CheckpointError as e:
            hint = ""
            if "does not exist" in str(e) and previous_run(out):
                hint = f" (it holds {previous_run(out)}; --overwrite starts a new run there)"
            raise UsageError(f"--resume: {e}{hint}") from None
    elif not args.overwrite:
        previous = previous_run(out)
        if previous:
            raise UsageError(f"--out {out} already holds a run; continue it with --resume, "
                             f"start over with --overwrite (deletes its checkpoints, "
                             f"{' and '.join(LOG_FILES)}), or choose another --out "
                             f"(found {previous})")

    try:
        train, val, described = _load_data(args)
        # content hashes, cached in OUT by the writer (a data-parallel rank only reads them)
        hashes = FileHashes(out / DATA_HASHES, readonly=rank > 0)
        train.hash_files(hashes)
        if val is not None:
            val.hash_files(hashes)
    except DataError as e:
        raise UsageError(str(e)) from None
    identity = {"train_data": train.fingerprint, "val_data": val.fingerprint if val else None,
                "model_source": _model_source(args), "train_files": train.files(),
                "val_files": val.files() if val is not None and args.val_data else None}

    try:
        if ck is not None:
            by_key = {"train_data": train, "val_data": val}
            _check_resume(ck.state, run, identity, args.allow_changes,
                          legacy=lambda key: by_key[key].legacy_fingerprint()
                          if by_key[key] is not None else None)
            identity["model_source"] = ck.state.get("identity", {}).get("model_source")
            model = GPT2.from_safetensors(ck.dir)
        elif args.model:
            # a path, or a name GPT2.from_pretrained knows (demo, gpt2, ...)
            load = GPT2.from_pretrained
            model = load(args.model)
        else:
            identity["model_source"] = "init:" + (args.init or "mini")
            model = GPT2.from_config(GPT2Config.preset(args.init or "mini"), seed=args.seed)
    except (OSError, ValueError) as e:   # SafetensorsError is a ValueError
        raise UsageError(str(e)) from None
    if args.seq_len > model.config.n_ctx:
        raise UsageError(f"--seq-len {args.seq_len} exceeds the model's context "
                         f"n_ctx={model.config.n_ctx}")
    opt = AdamW(model, lr=run.lr, weight_decay=run.weight_decay)
    first, last_val, elapsed0 = 0, None, 0.0
    if ck is not None:
        try:
            opt.load(ck.path("optimizer.npz"))
        except (OSError, ValueError) as e:
            raise UsageError(f"--resume: {e}") from None
        opt.weight_decay = run.weight_decay
        first, last_val = ck.step, ck.state.get("last_val")
        elapsed0 = float(ck.state.get("elapsed_s") or 0.0)

    dp = None
    if mpi:
        dp = mpi[0](model, overlap=not args.no_overlap, timeout=args.dp_timeout)
        dp.broadcast_parameters()          # rank 0's initialisation or checkpoint everywhere
        if ck is not None:
            dp.broadcast(opt.m)
            dp.broadcast(opt.v)
        dp.check_consistent(run=asdict(run), identity=identity, first_step=first,
                            gpt2s=gpt2s.__version__, eval_every=args.eval_every,
                            save_every=args.save_every)
    if rank > 0:
        return _train_loop(args, out, model, opt, train, val, run, identity, _NoMetrics(),
                           first, last_val, elapsed0, dp)
    # the first writes: every check has passed
    out.mkdir(parents=True, exist_ok=True)
    if args.overwrite:
        removed = remove_run(out)
        for fname in LOG_FILES:
            p = out / fname
            if p.is_file() and not p.is_symlink():   # check_run_dir refused links
                p.unlink()
                removed.append(fname)
        if removed:
            print(f"--overwrite: deleted the previous run's {', '.join(removed)} in {out}",
                  file=sys.stderr)
    elif ck is not None:   # what a kill during the last save's cleanup left
        remove_leftovers(out, ck.dir.name)
    hashes.save()
    metrics = Metrics(out, Path(args.log) if args.log else None, upto=first)
    print(f"{model!r}\ndata: {described}\n"
          f"{'resuming at step ' + str(first) + ' of ' if first else ''}{run.steps} steps of "
          f"{run.batch_size}x{run.seq_len}{f' x{run.grad_accum}' if run.grad_accum > 1 else ''}"
          f" tokens, {gpt2s.get_num_threads()} threads"
          f"{f' per rank, {world} ranks of {args.batch_size} windows' if dp else ''}",
          file=sys.stderr)
    try:
        status = _train_loop(args, out, model, opt, train, val, run, identity, metrics, first,
                             last_val, elapsed0, dp)
    finally:
        metrics.close()
    if (args.plot or (not args.no_plot and _have_matplotlib())) and metrics.rows:
        try:
            plot_metrics(out / METRICS, out / PLOT, title=_plot_title(out, model))
        except Exception as e:   # a plot must never cost the run
            print(f"warning: could not draw {out / PLOT}: {e}", file=sys.stderr)
    return status


class _NoMetrics:
    """What ranks other than 0 write: nothing."""
    rows = ()

    def step(self, *a, **k):
        pass

    eval = sync = close = step


def _no_stop(stop, dp) -> bool:
    """No stop requested (under MPI: on no rank; a signal may reach the ranks a step apart,
    and all must stop after the same step)."""
    if dp is None:
        return stop.signal is None
    return dp.max_int(stop.signal or 0) == 0


def _train_loop(args, out, model, opt, train, val, run, identity, metrics, first, last_val,
                elapsed0, dp=None) -> int:
    writer = dp is None or dp.rank == 0
    if first >= run.steps:
        print(f"the checkpoint in {out} is at step {first}, already at --steps {run.steps}; "
              f"nothing to do (raise --steps to train longer)", file=sys.stderr)
        return 0
    progress = Progress(first, run.steps, not args.quiet)
    tokens_per_step = run.batch_size * run.seq_len * run.grad_accum
    t0 = time.perf_counter()
    saved = first
    step = first

    def save(step):
        try:
            save_run(out, model, opt, step, run, identity, last_val,
                     elapsed0 + time.perf_counter() - t0)
        except OSError as e:
            raise OSError(e.errno, f"{e.strerror or e}; the checkpoint of step {step} was not "
                                   f"saved, {_resume_point(out, saved)}", e.filename) from e

    with _StopRequests() as stop:
        while step < run.steps and _no_stop(stop, dp):
            t_step = time.perf_counter()
            try:
                loss, norm = (train_step(model, opt, train, run, step) if dp is None
                              else _train_step_dp(model, opt, train, run, step, dp))
            except TrainingDiverged as e:
                # every rank sees the same loss and norm: all stop at this step, none saves
                progress.close()
                metrics.sync()
                raise RunFailed(f"{e}: the run diverged (lower --lr, or check the data); "
                                f"nothing was saved, {_resume_point(out, saved)}") from None
            step += 1
            now = time.perf_counter()
            metrics.step(step, opt.lr, loss, norm, tokens_per_step / (now - t_step),
                         elapsed0 + now - t0)
            if val is not None and (step % args.eval_every == 0 or step == run.steps):
                last_val = {"step": step, "loss": evaluate(model, val, run, dp)}
                metrics.eval(step, last_val["loss"])
                if args.plot:
                    metrics.sync()
                    try:
                        plot_metrics(out / METRICS, out / PLOT, title=_plot_title(out, model))
                    except Exception as e:
                        print(f"warning: could not draw {out / PLOT}: {e}", file=sys.stderr)
            progress.update(step, loss, last_val, opt.lr,
                            (step - first) * tokens_per_step / (time.perf_counter() - t0))
            if args.save_every and step % args.save_every == 0:
                metrics.sync()
                if writer:
                    save(step)
                saved = step
        progress.close()
        metrics.sync()
        if saved != step and writer:
            save(step)
    took = time.perf_counter() - t0
    if dp is not None:
        # the other ranks wait for rank 0's checkpoint, so none reports success before it is
        # written (and a failed save aborts them all)
        dp.barrier()
        stop.signal = dp.max_int(stop.signal or 0) or None
        if not writer:
            return 128 + stop.signal if stop.signal else 0
    if stop.signal is not None:
        print(f"stopped at step {step} of {run.steps}; saved {out} (continue with --resume)",
              file=sys.stderr)
        return 128 + stop.signal
    val_text = ""
    if last_val and last_val["loss"] is not None:
        val_text = f", validation loss {last_val['loss']:.4f} at step {last_val['step']}"
    print(f"saved {out} after {step} steps ({took:.0f} s{val_text})", file=sys.stderr)
    return 0


def _resume_point(out: Path, saved: int) -> str:
    if saved:
        return f"{out} keeps the checkpoint of step {saved} (continue from it with --resume)"
    return f"{out} holds no checkpoint"


if __name__ == "__main__":
    sys.exit(main())
