"""Training as a library: the run configuration, one training step, the evaluation, the loop
with its checkpoints, and the checks that make a resumed run the same run.
``python -m gpt2s.train`` is argument parsing around these.

    from gpt2s import GPT2, GPT2Config, AdamW
    from gpt2s.data import TokenData
    from gpt2s.training import RunConfig, evaluate, train_step

    cfg = RunConfig(steps=300, batch_size=8, seq_len=128, lr=1e-3, warmup=30)
    train, val = TokenData("tests/data/tinyshakespeare_excerpt.txt").split(0.1)
    model = GPT2.from_config(GPT2Config.preset("mini"), seed=cfg.seed)
    opt = AdamW(model, lr=cfg.lr, weight_decay=cfg.weight_decay)
    for step in range(cfg.steps):
        loss, norm = train_step(model, opt, train, cfg, step)
    print(evaluate(model, val, cfg))

A run is a pure function of its configuration: optimizer step ``s`` trains on the windows drawn
by ``numpy.random.default_rng([seed, 0, s, micro])`` for each micro-batch, evaluation batch
``j`` is drawn by ``default_rng([seed, 1, j])`` (every evaluation sees the same windows), and
the learning rate of step ``s`` depends on ``s`` and ``steps`` (the total) only.  So the data
position and every random state of a run are its seed and step count, and a run stopped at any
instant and continued from its last checkpoint ends bitwise equal to the run that was never
stopped, with the same thread count: the kernels split work over threads statically, so
another thread count can change float sums in the last bits (never the data or the schedule).

Data parallel: pass a ``gpt2s.distributed.DataParallel`` wherever a model is taken
(``train_step``, ``evaluate``, ``train_loop``).  A single process is a team of one
(``SingleProcess``): the same step, with the batch not split and nothing reduced.
"""

from __future__ import annotations

import argparse
import enum
import math
import signal
import sys
import time
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import NamedTuple, Protocol

import numpy as np

from ._cli import Progress, fraction, nonneg_float, nonneg_int, positive_int
from .checkpoint import (LOG_FILES, CheckpointError, check_run_dir, load_checkpoint,
                         previous_run, remove_run, save_checkpoint)
from .optim import clip_coefficient, grad_norm

__all__ = ["RunConfig", "Resume", "setting", "TrainingDiverged", "RunFailed", "lr_at",
           "effective_warmup", "default_warmup", "DEFAULT_WARMUP", "train_batch", "eval_batch",
           "SingleProcess", "Trainable", "config_record", "train_step",
           "evaluate", "open_data", "open_run_dir", "start_over", "resume_differences",
           "resume_state", "save_run", "train_loop", "LoopEnd", "World"]

STATE_FORMAT = "gpt2s-train"
DEFAULT_WARMUP = 100   # the command line's warm-up, at most (default_warmup)
WARMUP_CLAMP = 0.1   # a warm-up of --steps or more is cut to this fraction of the run


class TrainingDiverged(FloatingPointError):
    """A training step whose loss or gradient norm is not finite (NaN or infinity).  Raised
    before the step's update, so the model and optimizer keep the previous step's values;
    ``step`` is the step's 1-based number (as in metrics.jsonl), ``what`` "training loss" or
    "gradient norm"."""

    def __init__(self, step: int, what: str, value: float):
        super().__init__(f"step {step}: the {what} is {value} (not finite)")
        self.step, self.what, self.value = step, what, value


class RunFailed(Exception):
    """A run that cannot go on (it diverged): the message says so and where the run can be
    resumed from; every rank of a data-parallel run raises it at the same step."""


def _stop_unless_finite(value, step: int, what: str):
    if not math.isfinite(value):
        raise TrainingDiverged(step + 1, what, float(value))


# ------------------------------------------------------------------------------------------
# The run configuration: each field carries its command-line option and its resume rule


class Resume(enum.Enum):
    """What ``--resume`` does when a setting differs from the checkpoint's."""
    MUST_MATCH = "must match"        # refused (or, with --allow-changes, a warning): the run
                                     # would no longer be the one the checkpoint continues
    MAY_CHANGE = "may change"        # taken, with a note: a schedule change asked for
    NOT_COMPARED = "not compared"    # neither recorded in the checkpoint nor compared


COMPUTE_DTYPES = ("float32", "bfloat16")


def compute_dtype_name(text) -> str:
    """The ``--compute-dtype`` option's argparse type: "float32" or "bfloat16"."""
    if text not in COMPUTE_DTYPES:
        raise argparse.ArgumentTypeError(f"expected one of {', '.join(COMPUTE_DTYPES)}, got "
                                         f"{text!r}")
    return text


def setting(default, flag: str, type, help: str, resume: Resume, metavar: str | None = None):
    """A RunConfig field: its default, its command-line option (``flag``, an argparse
    ``type`` converter, ``help`` and ``metavar``) and its ``resume`` rule."""
    return field(default=default, metadata={"flag": flag, "type": type, "help": help,
                                            "resume": resume, "metavar": metavar})


@dataclass(frozen=True)
class RunConfig:
    """What defines a run.  Each field is a command-line option of ``python -m gpt2s.train``
    (``add_arguments`` makes them) with a resume rule (``Resume``): the fields a resume
    compares make up the ``run`` record of train_state.json (``recorded``).
    ``batch_size`` is the global micro-batch (all ranks of a data-parallel run together).

    Examples:
        >>> cfg = RunConfig(steps=200, batch_size=4)
        >>> cfg.recorded()["batch_size"], "eval_every" in cfg.recorded()
        (4, False)
        >>> RunConfig.flags(Resume.MUST_MATCH)
        ['--batch-size', '--seq-len', '--grad-accum', '--seed', '--val-fraction', '--compute-dtype']
    """
    steps: int = setting(1000, "--steps", positive_int,
                         "total optimizer steps of the run (default: %(default)s)",
                         Resume.MAY_CHANGE, "N")
    batch_size: int = setting(8, "--batch-size", positive_int,
                              "windows per micro-batch (default: %(default)s)",
                              Resume.MUST_MATCH, "B")
    seq_len: int = setting(128, "--seq-len", positive_int,
                           "tokens per window, at most the model's n_ctx (default: %(default)s)",
                           Resume.MUST_MATCH, "T")
    grad_accum: int = setting(1, "--grad-accum", positive_int,
                              "micro-batches averaged per optimizer step (default: %(default)s)",
                              Resume.MUST_MATCH, "N")
    lr: float = setting(1e-3, "--lr", nonneg_float, "peak learning rate (default: %(default)s)",
                        Resume.MAY_CHANGE)
    min_lr_ratio: float = setting(0.1, "--min-lr-ratio", nonneg_float,
                                  "final learning rate as a fraction of --lr "
                                  "(default: %(default)s)", Resume.MAY_CHANGE, "R")
    warmup: int = setting(100, "--warmup", nonneg_int,
                          "steps of linear learning-rate warm-up (default: %(default)s)",
                          Resume.MAY_CHANGE, "N")
    weight_decay: float = setting(0.1, "--weight-decay", nonneg_float,
                                  "AdamW weight decay of the 2-D weights (default: %(default)s)",
                                  Resume.MAY_CHANGE, "WD")
    grad_clip: float = setting(1.0, "--grad-clip", nonneg_float,
                               "clip the global gradient norm to this; 0 disables "
                               "(default: %(default)s)", Resume.MAY_CHANGE, "NORM")
    seed: int = setting(0, "--seed", nonneg_int,
                        "seed of the initial weights and of the batches (default: %(default)s)",
                        Resume.MUST_MATCH, "S")
    val_fraction: float = setting(0.1, "--val-fraction", fraction,
                                  "fraction of the tokens (the last ones) held out for "
                                  "validation; 0 disables validation (default: %(default)s)",
                                  Resume.MUST_MATCH, "F")
    compute_dtype: str = setting("float32", "--compute-dtype", compute_dtype_name,
                                 "precision of the matmuls: bfloat16 operands with float32 "
                                 "sums, forward and backward; the weights, gradients and "
                                 "AdamW state stay float32 (default: %(default)s)",
                                 Resume.MUST_MATCH, "{float32,bfloat16}")
    eval_every: int = setting(100, "--eval-every", positive_int,
                              "evaluate on the validation data every N steps and at the end "
                              "(default: %(default)s)", Resume.NOT_COMPARED, "N")
    eval_batches: int = setting(8, "--eval-batches", positive_int,
                                "validation batches per evaluation, the same ones each time "
                                "(default: %(default)s)", Resume.MAY_CHANGE, "N")
    save_every: int = setting(0, "--save-every", nonneg_int,
                              "also save a checkpoint every N steps; 0 saves at the end (and on "
                              "Ctrl-C) only (default: %(default)s)", Resume.NOT_COMPARED, "N")

    @classmethod
    def add_arguments(cls, parser, **cli_defaults):
        """Add an option per field to an argparse parser, in field order.  ``cli_defaults``:
        field name -> (the option's default, its help) where the command line differs from
        the field's default."""
        for f in fields(cls):
            m = f.metadata
            default, help = cli_defaults.get(f.name, (f.default, m["help"]))
            parser.add_argument(m["flag"], dest=f.name, type=m["type"], default=default,
                                metavar=m["metavar"], help=help)

    @classmethod
    def from_arguments(cls, args, **changes) -> RunConfig:
        """The configuration of parsed arguments (their attributes named as the fields),
        with ``changes`` applied."""
        return replace(cls(**{f.name: getattr(args, f.name) for f in fields(cls)}), **changes)

    @classmethod
    def flags(cls, resume: Resume) -> list[str]:
        """The options of the fields with this resume rule."""
        return [f.metadata["flag"] for f in fields(cls) if f.metadata["resume"] is resume]

    def recorded(self) -> dict:
        """The fields a checkpoint records and a resume compares (train_state.json's "run")."""
        return {f.name: getattr(self, f.name) for f in fields(self)
                if f.metadata["resume"] is not Resume.NOT_COMPARED}

    def unrecorded(self) -> dict:
        """The other fields (settings that leave the trajectory alone)."""
        return {f.name: getattr(self, f.name) for f in fields(self)
                if f.metadata["resume"] is Resume.NOT_COMPARED}

    def changes_from(self, saved: dict) -> tuple[list[str], list[str]]:
        """(refused, notes): how this configuration differs from a checkpoint's recorded one,
        by resume rule; a field the checkpoint does not record is not compared."""
        refused, notes = [], []
        for f in fields(self):
            rule, flag, value = f.metadata["resume"], f.metadata["flag"], getattr(self, f.name)
            if rule is Resume.NOT_COMPARED or f.name not in saved or saved[f.name] == value:
                continue
            if rule is Resume.MUST_MATCH:
                refused.append(f"{flag} {value} (the checkpoint's run used {saved[f.name]})")
            else:
                notes.append(f"{flag} is now {value} (was {saved[f.name]}); the run continues "
                             f"with the new value")
        return refused, notes


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


def default_warmup(steps: int) -> int:
    """The warm-up of a run of ``steps`` steps whose warm-up was not given: WARMUP_CLAMP of the
    run, at most DEFAULT_WARMUP steps (so a short run warms up briefly and still decays)."""
    return min(DEFAULT_WARMUP, int(steps * WARMUP_CLAMP))


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


# ------------------------------------------------------------------------------------------
# One step, one evaluation: a single process is a team of one


class Trainable(Protocol):
    """What the trainer needs of a model, whatever its family (`gpt2s.GPT2`,
    `gpt2s.LlamaForCausalLM`, ...; the trainer never asks which): ``config`` (``n_layer``,
    ``n_ctx``; a family's ``layer_of(name)``), ``store`` (the `ParameterStore` AdamW and the
    gradient reduction work on), ``params`` / ``grads``, ``forward(idx, targets,
    return_logits=False)``, ``pending_backward`` (its ``n_valid``), ``backward(normalizer=,
    on_layer_done=)``, ``zero_grad()`` and ``save_safetensors(directory)``, which writes
    model.safetensors and config.json that ``AutoModelForCausalLM.from_pretrained`` loads
    back to the same bits."""

    config: object
    store: object

    def forward(self, idx, targets=None, *, return_logits: bool = True): ...

    def backward(self, *, normalizer=None, on_layer_done=None): ...

    def zero_grad(self): ...

    def save_safetensors(self, path): ...


class SingleProcess:
    """A model trained by this process alone, with the methods of
    ``gpt2s.distributed.DataParallel`` that a training step uses: the batch is not split,
    the loss and the gradient norm are the model's own, and nothing waits for anyone."""
    rank, size = 0, 1

    def __init__(self, model):
        self.model = model

    def shard(self, *arrays):
        return arrays[0] if len(arrays) == 1 else arrays

    def forward(self, idx, targets) -> float:
        """The mean loss, through the training forward (``return_logits=False``): its logits
        buffer is the one the training steps already hold, where an evaluation forward would
        allocate another (B, T, V) array per batch (1.6 GB for GPT-2 at B=8, T=1024); the
        next training forward replaces what it keeps for a backward."""
        return self.model.forward(idx, targets, return_logits=False)[1]

    def backward(self, sync: bool = True):
        self.model.backward()

    def grad_norm(self) -> float:
        return grad_norm(self.model)

    def max_int(self, value: int) -> int:
        return int(value)

    def barrier(self):
        pass


def _team(model):
    """A model (a GPT2, a LlamaForCausalLM: any `Trainable`) as a team of one; a
    DataParallel (or a SingleProcess) as it is."""
    return model if isinstance(model, SingleProcess) or hasattr(model, "shard") \
        else SingleProcess(model)


def config_record(config) -> dict:
    """A model config as train_state.json records it: GPT-2's ``as_dict()``, another
    family's config.json content (``to_hf_dict()``)."""
    as_dict = getattr(config, "as_dict", None)
    return as_dict() if as_dict is not None else config.to_hf_dict()


def _lr_of(cfg: RunConfig, step: int) -> float:
    return lr_at(step, cfg.steps, cfg.lr, cfg.warmup, cfg.min_lr_ratio)


def train_step(model, opt, data, cfg: RunConfig, step: int) -> tuple[float, float | None]:
    """Optimizer step ``step`` (0-based): ``grad_accum`` micro-batches, their gradients
    averaged, clipped and applied in one fused AdamW pass.  Returns (the mean training loss,
    the gradient norm before clipping or None).  Raises TrainingDiverged, before updating
    anything, when a micro-batch's loss or the gradient norm is not finite.

    ``model``: a GPT2 (or another `Trainable` family), or a DataParallel whose rank trains on its rows of each global
    micro-batch of ``cfg.batch_size`` windows (the gradients are summed over the ranks during
    the last micro-batch's backward, and every rank sees the same loss and norm)."""
    team = _team(model)
    opt.lr = _lr_of(cfg, step)
    team.model.zero_grad()
    loss = 0.0
    for micro in range(cfg.grad_accum):
        x, y = team.shard(*train_batch(data, cfg.seed, step, micro, cfg.batch_size,
                                       cfg.seq_len))
        micro_loss = team.forward(x, y)
        # the same value on every rank, so every rank stops here together
        _stop_unless_finite(micro_loss, step, "training loss")
        loss += micro_loss
        # the last micro-batch's reduction carries the gradients of all of them
        team.backward(sync=micro == cfg.grad_accum - 1)
    # each micro-batch loss is a mean, so the step's gradient is the mean of theirs: 1/N
    # rides along in the fused update instead of a pass of its own over the gradients
    scale, norm = 1.0 / cfg.grad_accum, None
    if cfg.grad_clip > 0:
        # the norm AdamW.step(max_norm=) would take, checked before it reaches the weights
        # (under data parallel the global one, the same on every rank)
        norm = team.grad_norm() * scale
        _stop_unless_finite(norm, step, "gradient norm")
        scale *= clip_coefficient(norm, cfg.grad_clip)
    opt.step(grad_scale=scale)
    return loss / cfg.grad_accum, norm


def evaluate(model, data, cfg: RunConfig) -> float:
    """Mean loss over the ``eval_batches`` fixed validation batches of ``data``.  ``model``:
    a GPT2 (or another `Trainable`), or a DataParallel (each rank evaluates its rows of every batch)."""
    team = _team(model)
    losses = [team.forward(*team.shard(*eval_batch(data, cfg.seed, j, cfg.batch_size,
                                                   cfg.seq_len)))
              for j in range(cfg.eval_batches)]
    return float(np.mean(losses))


# ------------------------------------------------------------------------------------------
# Resuming: what must match the checkpoint


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


def _identity_changes(old_id: dict, identity: dict, legacy) -> tuple[list[str], list[str]]:
    """(refused, notes) for the data and the model a run starts from."""
    from .data import FINGERPRINT_PREFIX
    refused, notes = [], []
    for key, what in (("train_data", "the training data"), ("val_data", "the validation data")):
        old_fp, new_fp = old_id.get(key), identity[key]
        if old_fp == new_fp:
            continue
        if key == "val_data" and refused and refused[-1].startswith("the training data") and \
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
            refused.append(f"{what} differ: {detail}")
        elif older:
            refused.append(f"{what} differ (the checkpoint holds the fingerprint of an earlier "
                           f"gpt2s, {old_fp}, of each file's name, size and first and last "
                           f"4 KiB: a file was renamed, resized or changed at an end)")
        else:
            files = identity.get(files_key) or identity.get("train_files") or []
            named = ", ".join(str(f.get("path")) for f in files if isinstance(f, dict))
            refused.append(f"{what} differ ({named + ': ' if named else ''}fingerprint "
                           f"{new_fp}, the checkpoint's run used {old_fp}, which records no "
                           f"file names)")
    if identity["model_source"] is not None and old_id.get("model_source") != \
            identity["model_source"]:
        refused.append(f"the model ({identity['model_source'].split(':', 1)[1]}; the "
                       f"checkpoint's run started from {old_id.get('model_source')})")
    return refused, notes


def resume_differences(saved: dict, run: RunConfig, identity: dict,
                       legacy=None) -> tuple[list[str], list[str]]:
    """(refused, notes): what breaks an exact continuation of the checkpoint whose
    train_state.json is ``saved`` (the settings that must match, the data, the model), and
    the schedule changes that are taken with a note.  ``identity``: this run's data
    fingerprints and file records and its model source; ``legacy(key)`` gives the data's
    fingerprint in the format of earlier gpt2s releases, for a checkpoint that holds one."""
    run_refused, run_notes = run.changes_from(saved.get("run", {}))
    id_refused, id_notes = _identity_changes(saved.get("identity", {}), identity, legacy)
    return run_refused + id_refused, id_notes + run_notes


def open_data(specs, val_specs, run: RunConfig, tokenizer=None):
    """(train, val, description): the tokens of ``specs`` (paths and globs) to train on, and
    to validate on the files of ``val_specs``, else the last ``run.val_fraction`` of the
    tokens, else (0) nothing (val None); text is encoded with ``tokenizer`` (None: GPT-2's).
    Raises gpt2s.data.DataError for a file that cannot be read as tokens, or data too short
    for one window of ``run.seq_len`` tokens."""
    from .data import DataError, TokenData
    data = TokenData(specs, tokenizer=tokenizer)
    if val_specs:
        train, val = data, TokenData(val_specs, tokenizer=tokenizer)
    elif run.val_fraction > 0:
        train, val = data.split(run.val_fraction)
    else:
        train, val = data, None
    need = run.seq_len + 1
    if len(train) < need:
        raise DataError(f"{' '.join(specs)}: {len(train):,} training tokens, too few for one "
                        f"window of --seq-len {run.seq_len} (+1 for the targets)")
    if val is not None and len(val) < need:
        where = " ".join(val_specs) if val_specs else \
            f"the validation split (--val-fraction {run.val_fraction})"
        raise DataError(f"{where}: {len(val):,} token{'' if len(val) == 1 else 's'}, too few "
                        f"for one window of --seq-len {run.seq_len}; lower --seq-len, raise "
                        f"--val-fraction, or pass --val-fraction 0 to train without validation")
    return train, val, data.describe() if not val_specs else \
        f"{data.describe()}; validation {val.describe()}"


def open_run_dir(out: Path, *, resume: bool, overwrite: bool):
    """The checkpoint a run in ``out`` continues (``resume``), else None: a new run, which
    starts over a previous run's checkpoints only with ``overwrite``.  Raises CheckpointError,
    naming the entry, for a directory a run must not write through (check_run_dir), a missing
    or damaged checkpoint to resume, or a previous run in the way."""
    check_run_dir(out)     # no symlink where the run writes or deletes
    if resume:
        try:
            return load_checkpoint(out)
        except CheckpointError as e:
            hint = ""
            if "does not exist" in str(e) and previous_run(out):
                hint = f" (it holds {previous_run(out)}; --overwrite starts a new run there)"
            raise CheckpointError(f"--resume: {e}{hint}") from None
    previous = None if overwrite else previous_run(out)
    if previous:
        raise CheckpointError(f"--out {out} already holds a run; continue it with --resume, "
                              f"start over with --overwrite (deletes its checkpoints, "
                              f"{' and '.join(LOG_FILES)}), or choose another --out "
                              f"(found {previous})")
    return None


def start_over(out: Path) -> list[str]:
    """Delete the previous run in ``out`` (``--overwrite``): its checkpoints and their links
    (``gpt2s.checkpoint.remove_run``), metrics.jsonl and loss.png, nothing else.  Returns the
    names removed."""
    removed = remove_run(out)
    for fname in LOG_FILES:
        p = out / fname
        if p.is_file() and not p.is_symlink():   # check_run_dir refused links
            p.unlink()
            removed.append(fname)
    return removed


def resume_state(ck, opt, run: RunConfig) -> tuple[int, dict | None, float]:
    """Continue from checkpoint ``ck`` (``gpt2s.checkpoint.load_checkpoint``; its model is
    ``AutoModelForCausalLM.from_pretrained(ck.dir)``): load its optimizer state into ``opt``, with ``run``'s
    weight decay, and return (its step, its last evaluation, the seconds it trained)."""
    opt.load(ck.path("optimizer.npz"))
    opt.weight_decay = run.weight_decay
    return ck.step, ck.state.get("last_val"), float(ck.state.get("elapsed_s") or 0.0)


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
        # the precision the model really computed in (a library caller may have set the
        # model's compute_dtype and not the RunConfig's)
        "run": {**run.recorded(), "compute_dtype": getattr(model, "compute_dtype",
                                                           run.compute_dtype)},
        "identity": identity, "model_config": config_record(model.config),
        "last_val": last_val, "tokens_seen": step * run.batch_size * run.seq_len
        * run.grad_accum, "elapsed_s": round(elapsed, 3),
    }
    return save_checkpoint(out, model, opt, state)


# ------------------------------------------------------------------------------------------
# The processes of a run


class World:
    """The processes of a run: this one alone (``size`` 1, ``rank`` 0) unless ``join`` finds
    an MPI job; mpi4py is imported only then."""

    def __init__(self):
        self.size, self.rank = 1, 0

    def join(self, force: bool = False) -> bool:
        """Whether this process is one of several of an MPI job: asks MPI when a launcher's
        variable announces more than one process (``force``: always).  Raises ImportError
        without mpi4py."""
        from .distributed import world_size_from_env
        if world_size_from_env() == 1 and not force:
            return False
        from mpi4py import MPI
        self.size, self.rank = MPI.COMM_WORLD.Get_size(), MPI.COMM_WORLD.Get_rank()
        return self.size > 1

    def abort(self, status: int):
        """End every process of the job (MPI_Abort) when there are others: a process that
        stops alone would leave them waiting until their timeout."""
        if self.size > 1:
            from mpi4py import MPI
            sys.stderr.flush()
            MPI.COMM_WORLD.Abort(status)

    def abort_on_crash(self, prog: str, e: BaseException):
        """A process of several that stops on an unexpected exception ends the job, after its
        traceback and a line naming its rank: the others would wait for it until their
        timeout."""
        if self.size > 1 and not isinstance(e, SystemExit):
            import traceback
            traceback.print_exc()
            print(f"{prog}: rank {self.rank}: {type(e).__name__}: {e}; aborting the job",
                  file=sys.stderr, flush=True)
            self.abort(1)

    def data_parallel(self, model, opt, run: RunConfig, identity: dict, first: int, *,
                      resumed: bool, overlap: bool = True, timeout: float = 300.0):
        """A DataParallel of ``model`` over the job's processes, every rank starting from
        rank 0's parameters (and, ``resumed``, its optimizer moments); raises ValueError on
        every rank unless all run the same configuration on the same data from the same
        step."""
        import gpt2s
        from .distributed import DataParallel
        dp = DataParallel(model, overlap=overlap, timeout=timeout)
        dp.broadcast_parameters()
        if resumed:
            dp.broadcast(opt.m)
            dp.broadcast(opt.v)
        dp.check_consistent(run=run.recorded(), identity=identity, first_step=first,
                            gpt2s=gpt2s.__version__, **run.unrecorded())
        return dp


# ------------------------------------------------------------------------------------------
# The loop


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
        # a second Ctrl-C stops at once; a second SIGTERM (a scheduler's) waits for the step
        again = " (Ctrl-C again to stop now)" if sig == signal.SIGINT else ""
        print(f"\n{signal.Signals(sig).name}: stopping after this step{again}",
              file=sys.stderr, flush=True)

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)


class LoopEnd(NamedTuple):
    """How train_loop ended: after ``step`` steps, stopped by ``signal`` (None: it ran to
    the end), with the last evaluation ``last_val`` ({"step", "loss"} or None), in
    ``seconds``."""
    step: int
    signal: int | None
    last_val: dict | None
    seconds: float


def _resume_point(out: Path, saved: int) -> str:
    if saved:
        return f"{out} keeps the checkpoint of step {saved} (continue from it with --resume)"
    return f"{out} holds no checkpoint"


def _progress_line(step: int, total: int, loss: float, last_val, lr: float,
                   tokens_per_s: float):
    val = (f" | val {last_val['loss']:.4f} (step {last_val['step']})"
           if last_val and last_val["loss"] is not None and math.isfinite(last_val["loss"])
           else "")
    return lambda elapsed, eta: (f"step {step}/{total} | loss {loss:.4f}{val} | lr {lr:.2e} | "
                                 f"{tokens_per_s:,.0f} tok/s"
                                 f"{f' | eta {eta:.0f}s' if eta is not None else ''}")


def train_loop(model, opt, train, val, run: RunConfig, out: Path, identity: dict, *,
               metrics, first: int = 0, last_val=None, elapsed: float = 0.0,
               progress: bool = True, plot: bool = False) -> LoopEnd:
    """Train from step ``first`` to ``run.steps``: evaluate on ``val`` (None: never) every
    ``eval_every`` steps and at the end, record each step and evaluation in ``metrics``
    (a ``gpt2s.metrics.Metrics``), save a checkpoint in ``out`` every ``save_every`` steps
    and at the end, show the progress on stderr, and (``plot``) redraw loss.png at every
    evaluation.  SIGINT and SIGTERM stop the run after the step in progress, saved.

    ``model``: a GPT2 (or another `Trainable`), or a DataParallel (every rank runs the loop; rank 0 alone saves).
    ``last_val`` and ``elapsed``: the last evaluation and the seconds of a resumed run's
    checkpoint.  Raises RunFailed when a step diverges (nothing is saved)."""
    from .metrics import redraw_plot
    team = _team(model)
    model = team.model
    writer = team.rank == 0
    display = Progress(run.steps, done=first, lines=20, enabled=progress)
    tokens_per_step = run.batch_size * run.seq_len * run.grad_accum
    t0 = time.perf_counter()
    saved = step = first

    def save(step):
        try:
            save_run(out, model, opt, step, run, identity, last_val,
                     elapsed + time.perf_counter() - t0)
        except OSError as e:
            raise OSError(e.errno, f"{e.strerror or e}; the checkpoint of step {step} was not "
                                   f"saved, {_resume_point(out, saved)}", e.filename) from e

    with _StopRequests() as stop:
        # a signal may reach the ranks a step apart: all stop after the same step
        while step < run.steps and team.max_int(stop.signal or 0) == 0:
            t_step = time.perf_counter()
            try:
                loss, norm = train_step(team, opt, train, run, step)
            except TrainingDiverged as e:
                # every rank sees the same loss and norm: all stop at this step, none saves
                display.close()
                metrics.sync()
                raise RunFailed(f"{e}: the run diverged (lower --lr, or check the data); "
                                f"nothing was saved, {_resume_point(out, saved)}") from None
            step += 1
            now = time.perf_counter()
            metrics.step(step, opt.lr, loss, norm, tokens_per_step / (now - t_step),
                         elapsed + now - t0)
            if val is not None and (step % run.eval_every == 0 or step == run.steps):
                last_val = {"step": step, "loss": evaluate(team, val, run)}
                metrics.eval(step, last_val["loss"])
                if plot:
                    metrics.sync()
                    redraw_plot(out, model)
            display.show(step, _progress_line(
                step, run.steps, loss, last_val, opt.lr,
                (step - first) * tokens_per_step / (time.perf_counter() - t0)))
            if run.save_every and step % run.save_every == 0:
                metrics.sync()
                if writer:
                    save(step)
                saved = step
        display.close()
        metrics.sync()
        if saved != step and writer:
            save(step)
    took = time.perf_counter() - t0
    # the other ranks wait for rank 0's checkpoint, so none reports success before it is
    # written (and a failed save aborts them all)
    team.barrier()
    return LoopEnd(step, team.max_int(stop.signal or 0) or None, last_val, took)
