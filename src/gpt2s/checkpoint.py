"""All-or-nothing training checkpoints in a run directory.

Protocol: a checkpoint's files (model.safetensors, config.json, optimizer.npz,
train_state.json) are written and fsynced into a new directory under ``OUT/.checkpoints/``,
then manifest.json (the step and every file's size and SHA-256) is written last, and the
symlink ``OUT/.checkpoints/current`` is switched to the new directory by a single rename, the
one atomic step: before it a kill leaves the previous checkpoint, after it the new one.
Loading resolves ``current`` once and refuses the directory unless every file matches the
manifest; what saves leave under ``.checkpoints`` besides the current checkpoint (older
checkpoints, half-written ones, temporary links) is deleted by the next successful save, or by
``--resume`` once it has verified the current checkpoint (remove_leftovers).  Cleanup deletes
only names this module makes (``step-NNNNNNNN-hex``, ``.partial-step-...``, its temporary
links), never anything else a user put there.

Nothing is written or deleted through a symlink out of the run directory: ``.checkpoints``
and the checkpoint directories in it must be real directories, ``current`` a link to a plain
checkpoint name beside it, the four fixed links must point exactly where this module points
them, and ``metrics.jsonl`` / ``loss.png`` must not be links (check_run_dir refuses the run
directory otherwise, naming the entry).

One writer per run directory: a trainer holds an advisory lock on ``OUT/.lock`` for its whole
run (lock_run_dir; the holder's PID is written into it), so a second trainer on the same
directory stops at once, naming the holder.  The lock belongs to the process: a killed run
leaves no stale lock.

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

import errno
import json
import math
import os
import re
import secrets
import shutil
import stat
import time
from dataclasses import dataclass
from pathlib import Path

from .fs import atomic_write, fsync_dir, sha256_file

__all__ = ["save_checkpoint", "load_checkpoint", "has_checkpoint", "previous_run",
           "CheckpointError", "RunDirectoryBusy", "Checkpoint", "strict_json", "check_run_dir",
           "remove_leftovers", "remove_run", "lock_run_dir", "RunLock", "CHECKPOINT_FILES"]

CHECKPOINT_DIR = ".checkpoints"
CURRENT = "current"
MANIFEST = "manifest.json"
FORMAT = "gpt2s-checkpoint"
VERSION = 1
# the files of a checkpoint, each also linked from the run directory
CHECKPOINT_FILES = ("model.safetensors", "config.json", "optimizer.npz", "train_state.json")
# files a training run writes into its directory besides the links (never links themselves)
LOG_FILES = ("metrics.jsonl", "loss.png")
# the content hashes of the data files (gpt2s.data.FileHashes), a cache
DATA_HASHES = ".data-hashes.json"
LOCK_FILE = ".lock"
# every file written into OUT by an atomic write (whose temporary names cleanup removes)
RUN_FILES = CHECKPOINT_FILES + LOG_FILES + (DATA_HASHES,)
_STEP_PREFIX = "step-"
_PARTIAL_PREFIX = ".partial-"
# the only names cleanup deletes: what save_checkpoint, _replace_symlink and atomic_write make
_STEP_NAME = re.compile(r"step-[0-9]{8,}-[0-9a-f]{6}\Z")
_PARTIAL_NAME = re.compile(r"\.partial-step-[0-9]{8,}-[0-9a-f]{6}\Z")
_TEMP_LINK_NAME = re.compile(r"\.current\.[0-9a-f]{8}\.tmp\Z")
_TEMP_RUN_FILE_NAME = re.compile(r"\.(?:%s)\.[A-Za-z0-9_]{6,16}\.tmp\Z"
                                 % "|".join(re.escape(f) for f in RUN_FILES))


class CheckpointError(ValueError):
    """A run directory whose checkpoint is missing, incomplete or does not match its
    manifest, or that holds something a run must not write through (a symlink where a
    directory or file of the run belongs): the message names the directory and the file."""


class RunDirectoryBusy(CheckpointError):
    """Another process holds the run directory's lock; ``pid`` is its process id (None when
    it could not be read)."""

    def __init__(self, message: str, pid: int | None):
        super().__init__(message)
        self.pid = pid


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
    what the previous checkpoint left.  ``state["step"]`` must be an int.  Returns the
    checkpoint's directory.

    A save that fails (disk full, a read-only or unwritable directory) removes what it wrote
    at once and raises the OSError with ``filename`` set to the file it was writing; the
    previous checkpoint stays current."""
    out = Path(out)
    step = state["step"]
    if not isinstance(step, int) or isinstance(step, bool) or step < 0:
        raise ValueError(f"save_checkpoint: state['step'] must be an int >= 0, got {step!r}")
    check_run_dir(out)
    ckdir = out / CHECKPOINT_DIR
    ckdir.mkdir(parents=True, exist_ok=True)
    name = f"{_STEP_PREFIX}{step:08d}-{secrets.token_hex(3)}"
    partial = ckdir / (_PARTIAL_PREFIX + name)
    final = ckdir / name
    committed = False
    try:
        partial.mkdir()
        # 1. every file, each fsynced (atomic_write), then the manifest that vouches for them
        model.save_safetensors(partial)
        optimizer.save(partial / "optimizer.npz")
        state_text = strict_json(state, indent=1).encode()
        atomic_write(partial / "train_state.json", lambda f: f.write(state_text))
        files = {}
        for fname in CHECKPOINT_FILES:
            p = partial / fname
            files[fname] = {"size": p.stat().st_size, "sha256": sha256_file(p)}
        manifest = strict_json({"format": FORMAT, "version": VERSION, "step": step,
                                "files": files}, indent=1).encode()
        atomic_write(partial / MANIFEST, lambda f: f.write(manifest))
        fsync_dir(partial)
        os.rename(partial, final)
        fsync_dir(ckdir)

        # 2. the run directory's fixed links (dangling until the first checkpoint is current)
        for fname in CHECKPOINT_FILES:
            _replace_symlink(out / fname, f"{CHECKPOINT_DIR}/{CURRENT}/{fname}")
        fsync_dir(out)

        # 3. the commit: one rename switches every file at once
        _replace_symlink(ckdir / CURRENT, name)
        committed = True
        fsync_dir(ckdir)
    except BaseException as e:
        where = None
        if isinstance(e, OSError) and e.filename is None:
            # a failed write says only "No space left on device": name the file it was
            # writing, the first of the checkpoint's files (written in this order) missing
            missing = next((f for f in CHECKPOINT_FILES + (MANIFEST,)
                            if not os.path.lexists(partial / f)), None)
            where = partial / missing if missing and partial.is_dir() else ckdir
        if not committed:
            # never current: nothing refers to it, and a full disk wants its space back now
            for d in (partial, final):
                _remove_entry(d)
        if where is not None:
            raise OSError(e.errno, e.strerror, str(where)) from e
        raise

    # 4. garbage: older checkpoints, half-written ones, temporary links
    remove_leftovers(out, name)
    return final


def _remove_entry(path: Path):
    """Delete a file, a link (never what it points to) or a real directory tree."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if stat.S_ISDIR(st.st_mode):
        shutil.rmtree(path, ignore_errors=True)   # never follows the links inside
    else:
        try:
            os.unlink(path)
        except (FileNotFoundError, IsADirectoryError, PermissionError):
            pass


def remove_leftovers(out, keep: str | None):
    """Delete what saves of run directory ``out`` left besides its current checkpoint (the
    directory ``keep`` under .checkpoints): older checkpoints, half-written ones and temporary
    links, and the temporary names of our own atomic writes in ``out``.  A save calls it after
    its commit; ``--resume`` calls it once the checkpoint is verified, so a kill during the last
    save's cleanup leaves nothing behind even when no further save comes.

    Only the names this module makes are deleted (``step-NNNNNNNN-hex``, ``.partial-step-...``,
    ``.current.XXXXXXXX.tmp`` and ``.<run file>.XXXXXXXX.tmp``), each as what it is: a link is
    unlinked, never followed.  Anything else in the directory is left alone."""
    out = Path(out)
    ckdir = out / CHECKPOINT_DIR
    if _is_real_dir(ckdir):
        for entry in os.scandir(ckdir):
            name = entry.name
            if name == keep or name == CURRENT:
                continue
            if _STEP_NAME.match(name) or _PARTIAL_NAME.match(name) or \
                    _TEMP_LINK_NAME.match(name):
                _remove_entry(ckdir / name)
    for entry in os.scandir(out):
        # temporary names of our own atomic writes in OUT (a kill in the middle of one)
        if _TEMP_RUN_FILE_NAME.match(entry.name) and not entry.is_dir(follow_symlinks=False):
            try:
                os.unlink(out / entry.name)
            except (FileNotFoundError, IsADirectoryError, PermissionError):
                pass


def remove_run(out) -> list[str]:
    """Delete a previous run's checkpoints from run directory ``out`` (``--overwrite``): the
    ``current`` link, every checkpoint directory and leftover this module names, and the four
    fixed links; nothing else (metrics.jsonl and loss.png are the trainer's).  Refuses, as
    check_run_dir, a directory with a symlink where the run's entries belong.  Returns the
    names removed, relative to ``out``."""
    out = Path(out)
    check_run_dir(out)
    removed = []
    ckdir = out / CHECKPOINT_DIR
    if _is_real_dir(ckdir):
        # current first: a kill in the middle leaves checkpoints that nothing calls current,
        # which the next run refuses as a previous run, never a link to a deleted directory
        names = sorted(os.listdir(ckdir), key=lambda n: n != CURRENT)
        for name in names:
            if name == CURRENT or _STEP_NAME.match(name) or _PARTIAL_NAME.match(name) or \
                    _TEMP_LINK_NAME.match(name):
                _remove_entry(ckdir / name)
                removed.append(f"{CHECKPOINT_DIR}/{name}")
        fsync_dir(ckdir)
    for fname in CHECKPOINT_FILES:
        if os.path.islink(out / fname):   # check_run_dir: one of our four links
            os.unlink(out / fname)
            removed.append(fname)
    remove_leftovers(out, None)
    return removed


def _is_real_dir(path: Path) -> bool:
    try:
        return stat.S_ISDIR(os.lstat(path).st_mode)
    except FileNotFoundError:
        return False


def _link_text(path: Path) -> str:
    try:
        return f"a symlink to {os.readlink(path)!r}"
    except OSError:
        return "a symlink"


def check_run_dir(out):
    """Refuse a run directory where writing or cleaning up would follow a symlink out of it,
    or replace a real file (a model someone put there, or a run of an older gpt2s) by a link:
    ``.checkpoints`` must be a real directory, each checkpoint directory in it too, ``current``
    a link to a plain checkpoint name, the four fixed links must point exactly at
    ``.checkpoints/current/<name>``, and ``metrics.jsonl`` and ``loss.png`` must not be links.
    Raises CheckpointError naming the entry."""
    out = Path(out)
    ckdir = out / CHECKPOINT_DIR
    try:
        st = os.lstat(ckdir)
    except FileNotFoundError:
        st = None
    if st is not None:
        if stat.S_ISLNK(st.st_mode):
            raise CheckpointError(f"{ckdir}: {_link_text(ckdir)}; a run keeps its checkpoints "
                                  f"in a real directory inside --out and never writes or deletes "
                                  f"through a link (remove the link, or choose another --out)")
        if not stat.S_ISDIR(st.st_mode):
            raise CheckpointError(f"{ckdir}: not a directory; choose another --out")
        for entry in os.scandir(ckdir):
            name, path = entry.name, ckdir / entry.name
            if name == CURRENT:
                if not entry.is_symlink():
                    raise CheckpointError(f"{path}: not a link; a run directory's current "
                                          f"checkpoint is a link to a directory beside it")
                target = os.readlink(path)
                if not _STEP_NAME.match(target):
                    raise CheckpointError(f"{path}: points to {target!r}, not to a checkpoint "
                                          f"directory in {ckdir}")
            elif (_STEP_NAME.match(name) or _PARTIAL_NAME.match(name)) and \
                    not entry.is_dir(follow_symlinks=False):
                what = _link_text(path) if entry.is_symlink() else "not a directory"
                raise CheckpointError(f"{path}: {what} where a checkpoint directory belongs; "
                                      f"a run never follows a link out of its directory")
    for fname in CHECKPOINT_FILES:
        p = out / fname
        if not os.path.lexists(p):
            continue
        if not p.is_symlink():
            raise CheckpointError(f"{out}: already holds {fname}, which is not a link of a "
                                  f"gpt2s run directory; choose another directory for the run")
        target, expected = os.readlink(p), f"{CHECKPOINT_DIR}/{CURRENT}/{fname}"
        if target != expected:
            raise CheckpointError(f"{p}: a link to {target!r}, not to {expected!r} as in a "
                                  f"gpt2s run directory; remove it or choose another --out")
    for fname in LOG_FILES:
        p = out / fname
        if p.is_symlink():
            raise CheckpointError(f"{p}: {_link_text(p)}; a run writes its {fname} itself "
                                  f"and never through a link (remove the link)")


def previous_run(out) -> str | None:
    """What in ``out`` shows a previous run (a ``current`` link, a checkpoint directory, or the
    model and optimizer files of a run directory written by an older gpt2s), as a short
    description naming it; None when there is none."""
    out = Path(out)
    ckdir = out / CHECKPOINT_DIR
    if os.path.lexists(ckdir / CURRENT):
        return f"{ckdir / CURRENT}"
    if ckdir.is_dir():
        steps = sorted(n for n in os.listdir(ckdir) if _STEP_NAME.match(n))
        if steps:
            more = f" and {len(steps) - 1} more" if len(steps) > 1 else ""
            return (f"{ckdir / steps[-1]}{more}, without a current link: a save interrupted "
                    f"before its commit, or a damaged run")
    if (out / "optimizer.npz").exists() and (out / "train_state.json").exists():
        return f"{out / 'optimizer.npz'} and {out / 'train_state.json'}"
    return None


def has_checkpoint(out) -> bool:
    """Whether ``out`` holds a previous run's checkpoint (valid or not): a current link, a
    checkpoint directory, or the model and optimizer files of a run directory written by an
    older gpt2s."""
    return previous_run(out) is not None


# ------------------------------------------------------------------------------------------
# One writer per run directory


class RunLock:
    """The lock of a run directory held by this process (lock_run_dir); ``release()`` (or
    the end of the process, however it ends) lets the next trainer in."""

    def __init__(self, out: Path, fd: int, created_dir: bool):
        self.out, self.path, self._fd, self._created_dir = out, out / LOCK_FILE, fd, created_dir

    def release(self):
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        if os.name == "posix":
            # unlinked while still held: an acquirer that opened this file checks, once it
            # holds the lock, that the name still refers to its file, and retries if not
            try:
                if _same_file(os.stat(self.path, follow_symlinks=False), os.fstat(fd)):
                    os.unlink(self.path)
            except OSError:
                pass
        os.close(fd)
        if self._created_dir:
            try:
                os.rmdir(self.out)    # only if the run wrote nothing: rmdir needs it empty
            except OSError:
                pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.release()


def _same_file(a, b) -> bool:
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


def _try_lock(fd: int) -> bool:
    """Take the lock on fd without waiting: True if taken, False if another holds it."""
    try:
        import fcntl
    except ImportError:       # Windows: a byte range far past the PID text
        import msvcrt
        os.lseek(fd, _WINDOWS_LOCK_OFFSET, os.SEEK_SET)
        try:
            msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
        except OSError:
            return False
        return True
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            return False
        raise
    return True


# Windows' locks are mandatory: the locked byte must not be the PID the refused trainer reads
_WINDOWS_LOCK_OFFSET = 1 << 20


def _read_pid(fd: int) -> int | None:
    """The PID the holder wrote (it writes it just after taking the lock: wait a moment)."""
    for _ in range(100):
        os.lseek(fd, 0, os.SEEK_SET)
        text = os.read(fd, 32).decode("ascii", "replace").strip()
        if text.isdigit():
            return int(text)
        time.sleep(0.01)
    return None


def lock_run_dir(out) -> RunLock:
    """Take run directory ``out``'s lock (creating the directory if needed) for this process,
    or raise RunDirectoryBusy naming the directory and the holder's PID, touching nothing.
    ``fcntl.flock`` on ``out/.lock`` (``msvcrt.locking`` on Windows): the operating system
    drops the lock when its process ends, however it ends, so a killed run leaves no stale
    lock; the stale file is simply locked again."""
    out = Path(out)
    path = out / LOCK_FILE
    flags = os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
    created_dir = False
    for _ in range(100):
        if not out.is_dir():
            try:
                out.mkdir(parents=True)
                created_dir = True
            except FileExistsError:
                pass
        try:
            fd = os.open(path, flags, 0o644)
        except FileNotFoundError:    # the directory went away (another run's rmdir): again
            continue
        except OSError as e:
            if e.errno == errno.ELOOP or path.is_symlink():
                raise CheckpointError(f"{path}: {_link_text(path)}; a run's lock file is a "
                                      f"plain file (remove the link)") from None
            raise
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise CheckpointError(f"{path}: not a plain file; a run's lock file is one "
                                      f"(remove it)")
            if not _try_lock(fd):
                pid = _read_pid(fd)
                who = f"PID {pid}" if pid is not None else "PID unknown"
                raise RunDirectoryBusy(
                    f"--out {out}: another trainer ({who}) is running in this directory (it "
                    f"holds {path}); wait for it to end, or choose another --out", pid)
            if os.name == "posix":
                # the holder before us may have unlinked the file between our open and lock
                try:
                    if not _same_file(os.stat(path, follow_symlinks=False), os.fstat(fd)):
                        os.close(fd)
                        continue
                except FileNotFoundError:
                    os.close(fd)
                    continue
            # only now, holding the lock, replace the previous holder's PID by ours
            os.ftruncate(fd, 0)
            os.lseek(fd, 0, os.SEEK_SET)
            os.write(fd, f"{os.getpid()}\n".encode())
        except BaseException:
            os.close(fd)
            raise
        return RunLock(out, fd, created_dir)
    raise CheckpointError(f"{path}: could not take the lock (the file kept being replaced)")


# ------------------------------------------------------------------------------------------
# Loading


def load_checkpoint(out) -> Checkpoint:
    """The current checkpoint of run directory ``out``, verified against its manifest (every
    file's size and SHA-256, the step); raises CheckpointError naming what is wrong."""
    out = Path(out)
    ckdir = out / CHECKPOINT_DIR
    link = ckdir / CURRENT
    if ckdir.is_symlink():
        raise CheckpointError(f"{ckdir}: {_link_text(ckdir)}; a run keeps its checkpoints in a "
                              f"real directory inside it and never follows a link out of it")
    if not link.is_symlink():
        if not out.exists():
            raise CheckpointError(f"{out}: no such directory")
        if (out / "optimizer.npz").exists() and not (out / "optimizer.npz").is_symlink():
            raise CheckpointError(
                f"{out}: a checkpoint written by an older gpt2s, without a manifest that "
                f"vouches for it; it cannot be resumed exactly (start a new run from its "
                f"weights with --model {out})")
        if os.path.lexists(link):
            raise CheckpointError(f"{link}: not a link; a run directory's current checkpoint "
                                  f"is a link to a directory beside it")
        raise CheckpointError(f"{out}: no checkpoint ({link} does not exist)")
    target = os.readlink(link)
    d = ckdir / target
    if not _STEP_NAME.match(target):
        raise CheckpointError(f"{out}: {link} points to {target!r}, not a checkpoint "
                              f"directory in {ckdir}")
    if d.is_symlink():
        raise CheckpointError(f"{d}: {_link_text(d)}, not a checkpoint directory; a run "
                              f"never follows a link out of its directory")
    if not d.is_dir():
        raise CheckpointError(f"{out}: {link} points to {target!r}, not a checkpoint "
                              f"directory in {ckdir}")
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
        if p.is_symlink():
            raise CheckpointError(f"{p}: {_link_text(p)}; a checkpoint holds its files "
                                  f"itself")
        if not p.is_file():
            raise CheckpointError(f"{p}: missing (the manifest lists it)")
        size = p.stat().st_size
        if size != info.get("size"):
            raise CheckpointError(f"{p}: {size} bytes, the manifest says {info.get('size')}")
        if sha256_file(p) != info.get("sha256"):
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
