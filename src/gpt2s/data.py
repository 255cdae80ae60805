"""Token sources for training and evaluation: text files, nanoGPT ``.bin`` files and llm.c shards.

A corpus is one or more paths or globs, concatenated in the order given (the matches of one
glob in sorted order).  Each file is one of:

* **llm.c shard** (``*.bin`` starting with magic 20240520): a header of 256 little-endian int32
  words — ``[0]`` magic 20240520, ``[1]`` version 1, ``[2]`` token count, the rest 0 — then
  ``count`` uint16 GPT-2 token ids.  Version 2 (llm.c's uint32 LLaMA-3 shards) is refused.
* **nanoGPT raw tokens** (any other ``*.bin``, e.g. ``train.bin``/``val.bin`` of nanoGPT's
  prepare scripts): little-endian uint16 token ids, no header.  The two formats cannot be
  confused: the low half of the magic, 54472, is not a GPT-2 token id.  A ``.bin`` whose first
  1024 bytes hold a token id >= 50257, or that looks like an llm.c header with another magic,
  is refused rather than read as tokens.
* **UTF-8 text** (every other file): tokenized with the GPT-2 tokenizer when the corpus is
  opened (in memory: for a corpus too big for that, ``python -m gpt2s.prepare`` writes shards).
  A literal ``<|endoftext|>`` in the text is the end-of-text token, as in TinyStories.  Each
  text file is a document: one ``<|endoftext|>`` is put between a text file and the source
  before it, so documents do not run into each other.  Token files are taken as they are (they
  carry their own separators), and ``python -m gpt2s.prepare`` writes exactly the token stream
  this module reads from the same text files.

Shard and raw files are read through ``np.memmap``: opening a corpus reads only headers, and a
batch of windows reads only its own ``B * (T + 1)`` tokens.

>>> data = TokenData(["shards/train_*.bin"])          # doctest: +SKIP
>>> x = data.windows([0, 1000], 64)                   # (2, 65) int64: inputs x[:, :-1], targets x[:, 1:]
"""

from __future__ import annotations

import glob as _glob
import hashlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .tokenizer import EOT_ID, EOT_TOKEN, N_VOCAB
from .fs import atomic_write, sha256_file

__all__ = ["TokenData", "DataError", "FileHashes", "expand_paths", "read_shard_header",
           "write_shard", "ShardWriter", "tokenize_text", "SHARD_MAGIC", "SHARD_VERSION",
           "HEADER_WORDS", "HEADER_BYTES"]

SHARD_MAGIC = 20240520
SHARD_VERSION = 1
HEADER_WORDS = 256
HEADER_BYTES = HEADER_WORDS * 4
# llm.c writes at most this many tokens per shard; the count must fit its int32 header word
MAX_SHARD_TOKENS = 2**31 - 1
FORMATS = ("auto", "llmc", "uint16", "text")
_GLOB_CHARS = set("*?[")
_LEGACY_EDGE = 4096   # bytes at each end of a file in the legacy fingerprint
FINGERPRINT_PREFIX = "sha256:"


class DataError(ValueError):
    """A corpus file that cannot be read as tokens: the message names the file."""


# ------------------------------------------------------------------------------------------
# Paths


def expand_paths(specs) -> list[Path]:
    """The files named by ``specs`` (a path, a glob, or a list of them), in order: each glob's
    matches sorted, a file named twice kept once.  A path that does not exist, a glob that
    matches nothing and a directory are errors."""
    if isinstance(specs, (str, os.PathLike)):
        specs = [specs]
    files: list[Path] = []
    seen = set()
    for spec in specs:
        text = os.fspath(spec)
        if _GLOB_CHARS & set(text) and not Path(text).exists():
            matches = sorted(m for m in _glob.glob(os.path.expanduser(text), recursive=True)
                             if Path(m).is_file())
            if not matches:
                raise DataError(f"{text}: the pattern matches no files")
            paths = [Path(m) for m in matches]
        else:
            p = Path(text).expanduser()
            if p.is_dir():
                raise DataError(f"{text}: is a directory; give its files or a glob such as "
                                f"{Path(text) / '*.bin'}")
            if not p.is_file():
                raise DataError(f"{text}: no such file")
            paths = [p]
        for p in paths:
            key = os.path.realpath(p)
            if key not in seen:
                seen.add(key)
                files.append(p)
    if not files:
        raise DataError("no data files given")
    return files


# ------------------------------------------------------------------------------------------
# llm.c shards


def read_shard_header(path) -> int:
    """Validate an llm.c shard's header and size; returns its token count."""
    path = Path(path)
    size = path.stat().st_size
    if size < HEADER_BYTES:
        raise DataError(f"{path}: {size} bytes, too small for an llm.c shard's "
                        f"{HEADER_BYTES}-byte header")
    with open(path, "rb") as f:
        header = np.frombuffer(f.read(HEADER_BYTES), dtype="<i4")
    return _check_shard_header(path, header, size)


def _check_shard_header(path: Path, header: np.ndarray, size: int) -> int:
    magic, version, count = (int(v) for v in header[:3])
    if magic != SHARD_MAGIC:
        raise DataError(f"{path}: bad magic {magic} in the llm.c shard header, expected "
                        f"{SHARD_MAGIC}")
    if version != SHARD_VERSION:
        extra = " (llm.c's uint32 LLaMA-3 token shards)" if version == 2 else ""
        raise DataError(f"{path}: llm.c shard version {version}{extra} is not supported; "
                        f"expected version {SHARD_VERSION} (uint16 GPT-2 tokens)")
    if count < 0:
        raise DataError(f"{path}: negative token count {count} in the llm.c shard header")
    expected = HEADER_BYTES + 2 * count
    if size != expected:
        raise DataError(f"{path}: the llm.c shard header says {count:,} tokens "
                        f"({expected:,} bytes with the header) but the file has {size:,} bytes"
                        f"{' (truncated?)' if size < expected else ''}")
    return count


def _looks_like_llmc_header(header: np.ndarray, size: int) -> bool:
    """An llm.c header whose magic is wrong: version 1 or 2, a token count that matches the
    file size, and zeros after word 3 (a raw token file essentially never has 253 zeros)."""
    version, count = int(header[1]), int(header[2])
    if version not in (1, 2) or count < 0 or np.any(header[3:]):
        return False
    return size in (HEADER_BYTES + 2 * count, HEADER_BYTES + 4 * count)


def write_shard(path, tokens) -> Path:
    """Write ``tokens`` (integers in [0, 65535]) as an llm.c shard at ``path``, atomically
    (a temporary file renamed over ``path``: never half-written).  Returns the path."""
    path = Path(path)
    tokens = np.asarray(tokens)
    if tokens.ndim != 1:
        raise ValueError(f"write_shard: tokens must be 1-D, got shape {tokens.shape}")
    if tokens.size and not np.issubdtype(tokens.dtype, np.integer):
        raise TypeError(f"write_shard: tokens must be integers, got dtype {tokens.dtype}")
    if len(tokens) > MAX_SHARD_TOKENS:
        raise ValueError(f"write_shard: {len(tokens):,} tokens do not fit one shard "
                         f"(at most {MAX_SHARD_TOKENS:,})")
    if tokens.size and tokens.dtype != np.uint16:
        lo, hi = int(tokens.min()), int(tokens.max())
        if lo < 0 or hi > 65535:
            raise ValueError(f"write_shard: token id {lo if lo < 0 else hi} does not fit uint16")
    header = np.zeros(HEADER_WORDS, dtype="<i4")
    header[:3] = (SHARD_MAGIC, SHARD_VERSION, len(tokens))
    body = np.ascontiguousarray(tokens, dtype="<u2")

    def write(f):
        f.write(header.tobytes())
        f.write(body.data)

    atomic_write(path, write)
    return path


class ShardWriter:
    """Cut a stream of tokens into llm.c shards of ``shard_size`` tokens:
    ``DIR/{prefix}_000000.bin``, ``..._000001.bin``, ...  Each shard is written atomically
    when full; ``close()`` writes the last, partial one.  ``paths`` lists what was written."""

    def __init__(self, out_dir, prefix: str = "train", shard_size: int = 100_000_000):
        if not 1 <= shard_size <= MAX_SHARD_TOKENS:
            raise ValueError(f"shard_size must be in [1, {MAX_SHARD_TOKENS}], got {shard_size}")
        self.out_dir, self.prefix, self.shard_size = Path(out_dir), prefix, int(shard_size)
        self.paths: list[Path] = []
        self.n_tokens = 0
        self._buf = np.empty(self.shard_size, np.uint16)
        self._fill = 0

    def add(self, tokens) -> None:
        tokens = np.asarray(tokens)
        if tokens.size and tokens.dtype != np.uint16:
            lo, hi = int(tokens.min()), int(tokens.max())
            if lo < 0 or hi > 65535:
                raise ValueError(f"ShardWriter: token id {lo if lo < 0 else hi} does not fit "
                                 f"uint16")
        i = 0
        while i < len(tokens):
            n = min(len(tokens) - i, self.shard_size - self._fill)
            self._buf[self._fill:self._fill + n] = tokens[i:i + n]
            self._fill += n
            i += n
            if self._fill == self.shard_size:
                self._flush()
        self.n_tokens += len(tokens)

    def _flush(self):
        path = self.out_dir / f"{self.prefix}_{len(self.paths):06d}.bin"
        write_shard(path, self._buf[:self._fill])
        self.paths.append(path)
        self._fill = 0

    def close(self) -> list[Path]:
        if self._fill:
            self._flush()
        return self.paths

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if exc[0] is None:
            self.close()


# ------------------------------------------------------------------------------------------
# Text


def tokenize_text(text: str) -> np.ndarray:
    """GPT-2 token ids (uint16) of ``text``; a literal ``<|endoftext|>`` is the end-of-text
    token (50256), every other special-looking string is plain text."""
    from .tokenizer import get_tokenizer
    ids = get_tokenizer().encode(text, allowed_special={EOT_TOKEN}, disallowed_special=())
    return np.asarray(ids, dtype=np.uint16)


def _read_text(path: Path) -> str:
    data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: unknown format: not UTF-8 text (byte 0x{data[e.start]:02x} "
                        f"at offset {e.start}), and not a token file (token files end in .bin: "
                        f"llm.c shards or nanoGPT uint16 tokens)") from None


# ------------------------------------------------------------------------------------------
# Content hashes


def _stat_key(st) -> list:
    # any write to a file changes its mtime and ctime (ctime cannot be set back by touch -r or
    # os.utime), a replaced file has another inode
    return [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, st.st_dev]


class FileHashes:
    """SHA-256 of whole files, computed once and remembered by (resolved path, size, mtime,
    ctime, inode) in a small JSON file (``path``; None: in memory only), so a corpus is read
    in full once, not at every start of a run.

    A file changed within ``RACY_S`` seconds of its hashing is not remembered: a second write
    in the same clock tick of the file system would keep its size and times, and must not
    pass for the hashed content (git's "racy" entries).  ``readonly`` keeps the file as it is
    (ranks other than the writer of a data-parallel run).  ``save()`` writes the entries of
    the files hashed or looked up through this object, atomically."""

    FORMAT = "gpt2s-file-hashes"
    RACY_S = 2.0

    def __init__(self, path=None, readonly: bool = False):
        self.path = Path(path) if path is not None else None
        self.readonly = readonly
        self._known: dict[str, dict] = {}
        self._used: dict[str, dict] = {}
        self.hashed = 0            # files read in full by this object (the rest came cached)
        if self.path is not None:
            try:
                doc = json.loads(self.path.read_bytes())
            except (OSError, ValueError):
                doc = None           # missing or damaged: a cache, recomputed
            if isinstance(doc, dict) and doc.get("format") == self.FORMAT and \
                    isinstance(doc.get("files"), dict):
                self._known = {k: v for k, v in doc["files"].items() if isinstance(v, dict)}
        self._loaded = dict(self._known)

    def sha256(self, path) -> str:
        """Hex SHA-256 of the file's bytes (from the cache when its stat matches)."""
        key = os.path.realpath(path)
        before = os.stat(key)
        entry = self._used.get(key) or self._known.get(key)
        if entry is not None and entry.get("stat") == _stat_key(before) and \
                isinstance(entry.get("sha256"), str):
            self._used[key] = entry
            return entry["sha256"]
        started = time.time_ns()
        digest = sha256_file(key)
        self.hashed += 1
        after = os.stat(key)
        entry = {"stat": _stat_key(after), "sha256": digest}
        changed_during = _stat_key(before) != _stat_key(after)
        racy = started - max(after.st_mtime_ns, after.st_ctime_ns) < self.RACY_S * 1e9
        if changed_during or racy:
            self._known.pop(key, None)
            self._used.pop(key, None)
        else:
            self._used[key] = entry
        return digest

    def save(self):
        """Write the entries used (atomically); nothing when in memory or read-only, or when
        the file already holds exactly them."""
        if self.path is None or self.readonly:
            return
        if self._used == self._loaded:
            return
        doc = {"format": self.FORMAT, "version": 1, "files": dict(sorted(self._used.items()))}
        text = (json.dumps(doc, indent=1) + "\n").encode()
        atomic_write(self.path, lambda f: f.write(text))
        self._loaded = dict(self._used)


# ------------------------------------------------------------------------------------------
# The corpus


@dataclass(frozen=True)
class Source:
    path: Path
    kind: str           # "llmc" | "uint16" | "text"
    n_tokens: int       # tokens of the file itself (without an inserted separator)


def detect_format(path: Path) -> str:
    """"llmc", "uint16" or "text" for one file (see the module docstring for the rules)."""
    if path.suffix.lower() != ".bin":
        return "text"
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(HEADER_BYTES)
    if len(head) >= 4 and int(np.frombuffer(head[:4], "<i4")[0]) == SHARD_MAGIC:
        return "llmc"
    if len(head) == HEADER_BYTES and _looks_like_llmc_header(np.frombuffer(head, "<i4"), size):
        magic = int(np.frombuffer(head[:4], "<i4")[0])
        raise DataError(f"{path}: bad magic {magic} in what looks like an llm.c shard header, "
                        f"expected {SHARD_MAGIC}")
    words = np.frombuffer(head[:len(head) // 2 * 2], "<u2")
    bad = np.flatnonzero(words >= N_VOCAB)
    if bad.size:
        i = int(bad[0])
        raise DataError(f"{path}: unknown format: not an llm.c shard (magic "
                        f"{int(np.frombuffer(head[:4], '<i4')[0]) if len(head) >= 4 else '-'}, "
                        f"expected {SHARD_MAGIC}) and not raw uint16 GPT-2 tokens (value "
                        f"{int(words[i])} >= {N_VOCAB} at token {i})")
    return "uint16"


class TokenData:
    """A corpus of GPT-2 tokens from text files, nanoGPT ``.bin`` files and llm.c shards.

    ``TokenData(sources, format="auto")``: ``sources`` is a path, a glob or a list of them;
    ``format`` forces every file to be read as "llmc", "uint16" or "text" instead of
    detecting it.  ``len(data)`` is the number of tokens; ``data.windows(starts, T)`` returns
    the windows ``tokens[s : s + T + 1]`` for each start as an int64 array ``(B, T + 1)``,
    read across file boundaries without copying the corpus; ``data.fingerprint`` is a short
    string that changes when the content of the files changes (for checking a resumed run
    uses the same data; ``data.files()`` says which file changed); ``data.subset(lo, hi)``
    is the token range ``[lo, hi)`` as a TokenData sharing the same files (e.g. a
    validation split).
    """

    def __init__(self, sources, *, format: str = "auto", tokenizer=None):
        """``tokenizer``: what text files are encoded with (an object with
        ``encode_ordinary`` and ``eot_id``, e.g. gpt2s.vocab.CharTokenizer; None: GPT-2's)."""
        if format not in FORMATS:
            raise ValueError(f"format must be one of {', '.join(FORMATS)}, got {format!r}")
        paths = expand_paths(sources)
        self.sources: list[Source] = []
        arrays: list[np.ndarray] = []
        eot = np.array([EOT_ID], np.uint16)
        for path in paths:
            kind = detect_format(path) if format == "auto" else format
            if kind == "llmc":
                count = read_shard_header(path)
                arr = (np.memmap(path, dtype="<u2", mode="r", offset=HEADER_BYTES, shape=(count,))
                       if count else np.empty(0, np.uint16))
            elif kind == "uint16":
                size = path.stat().st_size
                if size % 2:
                    raise DataError(f"{path}: {size} bytes, an odd size: not uint16 tokens")
                arr = (np.memmap(path, dtype="<u2", mode="r") if size
                       else np.empty(0, np.uint16))
            elif tokenizer is None:
                arr = tokenize_text(_read_text(path))
                if arrays:
                    arrays.append(eot)
            else:
                try:
                    # a vocabulary past uint16 (Llama 3's, Qwen2's) keeps its ids whole
                    arr = np.asarray(tokenizer.encode_ordinary(_read_text(path)),
                                     np.uint16 if tokenizer.n_vocab <= 65536 else np.uint32)
                except ValueError as e:
                    raise DataError(f"{path}: {e}") from None
                if arrays and tokenizer.eot_id is not None:
                    arrays.append(np.array([tokenizer.eot_id], arr.dtype))
            self.sources.append(Source(path, kind, len(arr)))
            arrays.append(arr)
        self._arrays = [a for a in arrays if len(a)]
        self._bounds = np.cumsum([0] + [len(a) for a in self._arrays], dtype=np.int64)
        self._lo, self._hi = 0, int(self._bounds[-1])
        # the files' SHA-256, shared with subsets; computed when first asked for
        self._digests: list = [None]
        # text read with another vocabulary is other data (GPT-2's adds nothing, so its
        # fingerprints are those of earlier releases)
        self._vocab = "" if tokenizer is None else json.dumps(tokenizer.to_dict())

    # ---------------------------------------------------------------- size and identity

    def __len__(self) -> int:
        return self._hi - self._lo

    def hash_files(self, hashes: FileHashes | None = None) -> None:
        """Compute the SHA-256 of every file (once per corpus and its subsets), through
        ``hashes`` (a FileHashes cache) when given; ``fingerprint`` and ``files()`` then use
        them."""
        if self._digests[0] is None:
            hashes = hashes if hashes is not None else FileHashes()
            self._digests[0] = [hashes.sha256(s.path) for s in self.sources]

    @property
    def fingerprint(self) -> str:
        """``"sha256:"`` and 32 hex digits of a hash of every file's content (its SHA-256,
        read in full once: hash_files), format and token count, in order, and of the token
        range: any edit of a file changes it; a file's name, location and times do not (the
        same content copied, renamed or touched is the same data)."""
        self.hash_files()
        h = hashlib.sha256()
        for s, digest in zip(self.sources, self._digests[0]):
            h.update(f"{s.kind}\0{s.n_tokens}\0{digest}\0".encode())
        h.update(f"{self._lo}:{self._hi}".encode())
        if self._vocab and any(s.kind == "text" for s in self.sources):
            h.update(self._vocab.encode())
        return FINGERPRINT_PREFIX + h.hexdigest()[:32]

    def files(self) -> list[dict]:
        """One record per file, in order: its path (as given), format, token count, size and
        SHA-256; what a run stores to name the files whose content changed."""
        self.hash_files()
        return [{"path": str(s.path), "kind": s.kind, "tokens": s.n_tokens,
                 "size": os.stat(s.path).st_size, "sha256": digest}
                for s, digest in zip(self.sources, self._digests[0])]

    def legacy_fingerprint(self) -> str:
        """The fingerprint earlier gpt2s releases stored (each file's name, size and first and
        last 4 KiB, the formats and the token range; 16 hex digits), to check a checkpoint
        saved with it against the data."""
        h = hashlib.sha256()
        for s in self.sources:
            size = s.path.stat().st_size
            h.update(f"{s.path.name}\0{s.kind}\0{size}\0{s.n_tokens}\0".encode())
            with open(s.path, "rb") as f:
                h.update(f.read(_LEGACY_EDGE))
                if size > _LEGACY_EDGE:
                    f.seek(max(_LEGACY_EDGE, size - _LEGACY_EDGE))
                    h.update(f.read())
        h.update(f"{self._lo}:{self._hi}".encode())
        return h.hexdigest()[:16]

    def describe(self) -> str:
        """'3 files (2 llm.c shards, 1 text file): 1,234,567 tokens'."""
        names = {"llmc": "llm.c shard", "uint16": "uint16 token file", "text": "text file"}
        counts: dict[str, int] = {}
        for s in self.sources:
            counts[s.kind] = counts.get(s.kind, 0) + 1
        parts = ", ".join(f"{n} {names[k]}{'s' if n > 1 else ''}" for k, n in counts.items())
        n = len(self.sources)
        return f"{n} file{'s' if n > 1 else ''} ({parts}): {len(self):,} " \
               f"token{'' if len(self) == 1 else 's'}"

    def __repr__(self):
        return f"TokenData({self.describe()})"

    # ---------------------------------------------------------------- access

    def subset(self, lo: int, hi: int) -> "TokenData":
        """Tokens [lo, hi) of this corpus (0 <= lo <= hi <= len), sharing its files."""
        if not 0 <= lo <= hi <= len(self):
            raise ValueError(f"subset [{lo}, {hi}) is outside [0, {len(self)}]")
        sub = object.__new__(TokenData)
        sub.sources, sub._arrays, sub._bounds = self.sources, self._arrays, self._bounds
        sub._lo, sub._hi = self._lo + lo, self._lo + hi
        sub._digests = self._digests
        sub._vocab = self._vocab
        return sub

    def split(self, val_fraction: float) -> tuple["TokenData", "TokenData"]:
        """(train, val): the last ``int(len * val_fraction)`` tokens are the validation part."""
        if not 0 <= val_fraction < 1:
            raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
        n_val = int(len(self) * val_fraction)
        return self.subset(0, len(self) - n_val), self.subset(len(self) - n_val, len(self))

    def tokens(self, start: int = 0, stop: int | None = None) -> np.ndarray:
        """Tokens [start, stop) as one new int64 array (copies that range only)."""
        stop = len(self) if stop is None else stop
        if not 0 <= start <= stop <= len(self):
            raise ValueError(f"token range [{start}, {stop}) is outside [0, {len(self)}]")
        return self._read(self._lo + start, stop - start, np.empty(stop - start, np.int64))

    def windows(self, starts, T: int) -> np.ndarray:
        """int64 ``(len(starts), T + 1)``: row i is tokens ``[starts[i], starts[i] + T + 1)``,
        so ``w[:, :-1]`` are a model's inputs and ``w[:, 1:]`` its targets.  Every start must be
        in ``[0, len - T - 1]``."""
        starts = np.asarray(starts)
        if starts.ndim != 1 or not np.issubdtype(starts.dtype, np.integer):
            raise ValueError(f"starts must be a 1-D integer array, got {starts.dtype} "
                             f"shape {starts.shape}")
        if T < 1:
            raise ValueError(f"T must be >= 1, got {T}")
        last = len(self) - T - 1
        if last < 0:
            raise ValueError(f"the data has {len(self):,} tokens, too few for one window of "
                             f"T + 1 = {T + 1}")
        if starts.size and (starts.min() < 0 or starts.max() > last):
            bad = int(starts.min()) if starts.min() < 0 else int(starts.max())
            raise ValueError(f"window start {bad} is outside [0, {last}] (the data has "
                             f"{len(self):,} tokens, a window T + 1 = {T + 1})")
        out = np.empty((len(starts), T + 1), np.int64)
        for row, s in zip(out, starts):
            self._read(self._lo + int(s), T + 1, row)
        return out

    def random_windows(self, rng: np.random.Generator, B: int, T: int) -> np.ndarray:
        """``windows`` at B starts drawn uniformly from ``[0, len - T - 1]``."""
        if len(self) < T + 1:
            raise ValueError(f"the data has {len(self):,} tokens, too few for one window of "
                             f"T + 1 = {T + 1}")
        return self.windows(rng.integers(0, len(self) - T, size=B), T)

    def _read(self, pos: int, n: int, out: np.ndarray) -> np.ndarray:
        """Copy n tokens from absolute position pos into out (1-D, length n)."""
        k = int(np.searchsorted(self._bounds, pos, side="right")) - 1
        done = 0
        while done < n:
            arr = self._arrays[k]
            off = pos + done - int(self._bounds[k])
            take = min(n - done, len(arr) - off)
            out[done:done + take] = arr[off:off + take]
            done += take
            k += 1
        return out
