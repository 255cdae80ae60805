"""File-system helpers shared by everything gpt2s writes (models, optimizer state, checkpoints,
token shards, metrics): a file is never half-written, a directory's entries are made durable,
and a failed write names its file."""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path

__all__ = ["atomic_write", "fsync_dir", "sha256_file", "errors_name"]


def _default_mode() -> int:
    # mkstemp creates 0600 files; a saved model gets the permissions open() would give it
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def atomic_write(dest: Path, write):
    """Call write(f) on a temporary file beside dest, then rename it over dest."""
    dest = Path(dest)
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, _default_mode())
        os.replace(tmp, dest)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def fsync_dir(path: Path):
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


def sha256_file(path) -> str:
    """The SHA-256 of a file's content (hex), read in 1 MiB pieces."""
    h = hashlib.sha256()
    buf = bytearray(1 << 20)
    view = memoryview(buf)
    with open(path, "rb") as f:
        while n := f.readinto(buf):
            h.update(view[:n])
    return h.hexdigest()


class errors_name:
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
