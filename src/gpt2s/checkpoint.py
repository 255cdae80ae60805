"""All-or-nothing training checkpoints in a run directory.

Protocol: a checkpoint's files (model.safetensors, config.json, optimizer.npz,
train_state.json) are written and fsynced into a new directory under ``OUT/.checkpoints/``,
then manifest.json (the step and every file's size and SHA-256) is written last, and the
symlink ``OUT/.checkpoints/current`` is switched to the new directory by a single rename, the
one atomic step: before it a kill leaves the previous checkpoint, after it the new one.
Loading resolves ``current`` once and refuses the directory unless every file matches the
manifest; everything else under ``.checkpoints`` (older checkpoints, half-written ones, stray
temporary files) is deleted by the next successful save, or by ``--resume`` once it has
verified the current checkpoint (remove_leftovers).

The run directory itself looks like a model directory: ``OUT/model.safetensors``,
``OUT/config.json``, ``OUT/optimizer.npz`` and ``OUT/train_state.json`` are fixed relative
symlinks through ``.checkpoints/current``, created once and never changed, so
``GPT2.from_safetensors(OUT)`` and transformers' ``GPT2LMHeadModel.from_pretrained(OUT)`` read
the current checkpoint, and a copy of OUT (``cp -r``, ``rsync -a``) keeps working.

    OUT/model.safetensors -> .checkpoints/current/model.safetensors      (and the other three)
    OUT/.checkpoints/current -> step-00000200-3f9a1c                      (swapped atomically)
    OUT/.checkpoints/step-00000200-3f9a1c/{model.safetensors, config.json, optimizer.npz,
                                            train_state.json, manifest.json}
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import secrets
import shutil
from dataclasses import dataclass
from pathlib import Path

from .weights import atomic_write

__all__ = ["save_checkpoint", "load_checkpoint", "has_checkpoint", "CheckpointError",
           "Checkpoint", "strict_json", "check_run_dir", "remove_leftovers", "CHECKPOINT_FILES"]

CHECKPOINT_DIR = ".checkpoints"
CURRENT = "current"
MANIFEST = "manifest.json"
FORMAT = "gpt2s-checkpoint"
VERSION = 1
# the files of a checkpoint, each also linked from the run directory
CHECKPOINT_FILES = ("model.safetensors", "config.json", "optimizer.npz", "train_state.json")
# files a training run writes into its directory besides the links (their temporary names
# are cleaned up by the next save)
RUN_FILES = CHECKPOINT_FILES + ("metrics.jsonl", "loss.png")
_STEP_PREFIX = "step-"
_PARTIAL_PREFIX = ".partial-"


class CheckpointError(ValueError):
    """A run directory whose checkpoint is missing, incomplete or does not match its
    manifest: the message names the directory and the file."""


@dataclass(frozen=True)
class Checkpoint:
    """A verified checkpoint: ``dir`` is its real directory (read the files from there, not
    through the symlinks, so a concurrent save cannot mix two checkpoints), ``state`` the
    parsed train_state.json."""
    dir: Path
    step: int
    state: dict

    def path(self, name: str) -> Path:
        return self.dir / name


# ------------------------------------------------------------------------------------------
# Strict JSON


def _finite_or_none(obj):
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite_or_none(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite_or_none(v) for v in obj]
    return obj


def strict_json(obj, **kwargs) -> str:
    """JSON text with every NaN or infinity written as null: RFC 8259 JSON, which any parser
    (JavaScript's JSON.parse included) reads; ``allow_nan=False`` makes sure."""
    return json.dumps(_finite_or_none(obj), allow_nan=False, **kwargs)


# ------------------------------------------------------------------------------------------
# Saving


def _fsync_dir(path: Path):
    """Make a directory's entries (creations, renames, removals) durable; a no-op where
    directories cannot be opened (Windows)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    buf = bytearray(1 << 20)
    view = memoryview(buf)
    with open(path, "rb") as f:
        while n := f.readinto(buf):
            h.update(view[:n])
    return h.hexdigest()


def _replace_symlink(link: Path, target: str):
    """Point ``link`` at ``target`` (relative) with one rename, never leaving it missing."""
    if link.is_symlink() and os.readlink(link) == target:
        return
    tmp = link.with_name(f".{link.name}.{secrets.token_hex(4)}.tmp")
    os.symlink(target, tmp)
    os.replace(tmp, link)


def save_checkpoint(out, model, optimizer, state: dict) -> Path:
    """Write model, optimizer and ``state`` (JSON-able; NaN becomes null) as the run
    directory's new current checkpoint, all or nothing (see the module docstring), and delete
    everything the previous checkpoint left.  ``state["step"]`` must be an int.  Returns the
    checkpoint's directory."""
    out = Path(out)
    step = state["step"]
    if not isinstance(step, int) or isinstance(step, bool) or step < 0:
        raise ValueError(f"save_checkpoint: state['step'] must be an int >= 0, got {step!r}")
    check_run_dir(out)
    ckdir = out / CHECKPOINT_DIR
    ckdir.mkdir(parents=True, exist_ok=True)
    name = f"{_STEP_PREFIX}{step:08d}-{secrets.token_hex(3)}"
    partial = ckdir / (_PARTIAL_PREFIX + name)
    partial.mkdir()

    # 1. every file, each fsynced (atomic_write), then the manifest that vouches for them
    model.save_safetensors(partial)
    optimizer.save(partial / "optimizer.npz")
    state_text = strict_json(state, indent=1).encode()
    atomic_write(partial / "train_state.json", lambda f: f.write(state_text))
    files = {}
    for fname in CHECKPOINT_FILES:
        p = partial / fname
        files[fname] = {"size": p.stat().st_size, "sha256": _sha256(p)}
    manifest = strict_json({"format": FORMAT, "version": VERSION, "step": step,
                            "files": files}, indent=1).encode()
    atomic_write(partial / MANIFEST, lambda f: f.write(manifest))
    _fsync_dir(partial)
    os.rename(partial, ckdir / name)
    _fsync_dir(ckdir)

    # 2. the run directory's fixed links (dangling until the first checkpoint is current)
    for fname in CHECKPOINT_FILES:
        _replace_symlink(out / fname, f"{CHECKPOINT_DIR}/{CURRENT}/{fname}")
    _fsync_dir(out)

    # 3. the commit: one rename switches every file at once
    _replace_symlink(ckdir / CURRENT, name)
    _fsync_dir(ckdir)

    # 4. garbage: older checkpoints, half-written ones, temporary links
    remove_leftovers(out, name)
    return ckdir / name


def remove_leftovers(out, keep: str):
    """Delete what saves of run directory ``out`` left besides its current checkpoint (the
    directory ``keep`` under .checkpoints): older checkpoints, half-written ones and temporary
    links, and the temporary names of our own atomic writes in ``out``.  A save calls it after
    its commit; ``--resume`` calls it once the checkpoint is verified, so a kill during the last
    save's cleanup leaves nothing behind even when no further save comes."""
    out = Path(out)
    ckdir = out / CHECKPOINT_DIR
    for entry in ckdir.iterdir():
        if entry.name in (CURRENT, keep):
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            try:
                entry.unlink()
            except FileNotFoundError:
                pass
    for entry in out.iterdir():
        # temporary names of our own atomic writes in OUT (a kill in the middle of one)
        if entry.name.endswith(".tmp") and any(entry.name.startswith(f".{f}.")
                                                for f in RUN_FILES):
            try:
                entry.unlink()
            except (FileNotFoundError, IsADirectoryError, PermissionError):
                pass


def check_run_dir(out):
    """Refuse a directory where saving a checkpoint would replace a real file (a model
    someone put there, or a run of an older gpt2s) by a link."""
    out = Path(out)
    for fname in CHECKPOINT_FILES:
        p = out / fname
        if p.exists() and not p.is_symlink():
            raise CheckpointError(f"{out}: already holds {fname}, which is not a link of a "
                                  f"gpt2s run directory; choose another directory for the run")


# ------------------------------------------------------------------------------------------
# Loading


def has_checkpoint(out) -> bool:
    """Whether ``out`` holds a checkpoint (valid or not): a current link, or the model and
    optimizer files of a run directory written by an older gpt2s."""
    out = Path(out)
    return (out / CHECKPOINT_DIR / CURRENT).is_symlink() or (
        (out / "optimizer.npz").exists() and (out / "train_state.json").exists())


def load_checkpoint(out) -> Checkpoint:
    """The current checkpoint of run directory ``out``, verified against its manifest (every
    file's size and SHA-256, the step); raises CheckpointError naming what is wrong."""
    out = Path(out)
    link = out / CHECKPOINT_DIR / CURRENT
    if not link.is_symlink():
        if not out.exists():
            raise CheckpointError(f"{out}: no such directory")
        if (out / "optimizer.npz").exists() and not (out / "optimizer.npz").is_symlink():
            raise CheckpointError(
                f"{out}: a checkpoint written by an older gpt2s, without a manifest that "
                f"vouches for it; it cannot be resumed exactly (start a new run from its "
                f"weights with --model {out})")
        raise CheckpointError(f"{out}: no checkpoint ({link} does not exist)")
    target = os.readlink(link)
    d = (link.parent / target)
    if os.sep in target or (os.altsep and os.altsep in target) or not d.is_dir():
        raise CheckpointError(f"{out}: {link} points to {target!r}, not a checkpoint "
                              f"directory in {link.parent}")
    d = d.resolve()
    mpath = d / MANIFEST
    try:
        manifest = json.loads(mpath.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"{d}: no {MANIFEST}; the checkpoint is incomplete") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{mpath}: not valid JSON ({e})") from None
    if not (isinstance(manifest, dict) and manifest.get("format") == FORMAT
            and isinstance(manifest.get("files"), dict)
            and isinstance(manifest.get("step"), int)):
        raise CheckpointError(f"{mpath}: not a gpt2s checkpoint manifest")
    if manifest.get("version") != VERSION:
        raise CheckpointError(f"{mpath}: checkpoint format version {manifest.get('version')!r}"
                              f", this gpt2s reads version {VERSION}")
    files = manifest["files"]
    for fname in CHECKPOINT_FILES:
        info = files.get(fname)
        p = d / fname
        if not isinstance(info, dict):
            raise CheckpointError(f"{mpath}: does not list {fname}")
        if not p.is_file():
            raise CheckpointError(f"{p}: missing (the manifest lists it)")
        size = p.stat().st_size
        if size != info.get("size"):
            raise CheckpointError(f"{p}: {size} bytes, the manifest says {info.get('size')}")
        if _sha256(p) != info.get("sha256"):
            raise CheckpointError(f"{p}: contents differ from the manifest (SHA-256 mismatch)")
    try:
        state = json.loads((d / "train_state.json").read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{d / 'train_state.json'}: not valid JSON ({e})") from None
    if not isinstance(state, dict) or state.get("step") != manifest["step"]:
        found = state.get("step") if isinstance(state, dict) else None
        raise CheckpointError(f"{d / 'train_state.json'}: step {found!r} differs from the "
                              f"manifest's {manifest['step']}")
    return Checkpoint(dir=d, step=manifest["step"], state=state)
