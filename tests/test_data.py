"""gpt2s.data: llm.c shards, nanoGPT uint16 files and text read as one token stream.

The expected bytes of a shard are written here with struct/NumPy from the format's definition
(llm.c's dev/data/data_common.py: 256 int32 words, magic 20240520, version 1, count; uint16
tokens), not with gpt2s's writer, and expected token streams come from tiktoken directly.
"""

from __future__ import annotations

import os
import struct

import numpy as np
import pytest

from gpt2s import data as D
from gpt2s.data import DataError, TokenData


def llmc_bytes(tokens, magic=20240520, version=1, count=None) -> bytes:
    tokens = list(tokens)
    header = [magic, version, len(tokens) if count is None else count] + [0] * 253
    return struct.pack("<256i", *header) + struct.pack(f"<{len(tokens)}H", *tokens)


def tiktoken_ids(text: str) -> list[int]:
    tiktoken = pytest.importorskip("tiktoken")
    try:
        enc = tiktoken.get_encoding("gpt2")      # needs the network or a cached download
    except Exception:
        from gpt2s import get_tokenizer
        enc = get_tokenizer()
    return enc.encode(text, allowed_special={"<|endoftext|>"})


def test_llmc_shard_read(tmp_path):
    toks = [5, 50256, 0, 65535 - 15279, 17, 42]   # the largest is 50256: a valid GPT-2 id
    (tmp_path / "a.bin").write_bytes(llmc_bytes(toks))
    d = TokenData(tmp_path / "a.bin")
    assert d.sources[0].kind == "llmc"
    assert len(d) == len(toks)
    assert d.tokens().tolist() == toks
    w = d.windows([0, 2], 3)
    assert w.dtype == np.int64 and w.shape == (2, 4)
    assert w.tolist() == [toks[0:4], toks[2:6]]
    # read through a memory map, not loaded
    assert isinstance(d._arrays[0], np.memmap)


def test_writer_matches_format(tmp_path):
    toks = np.arange(1000, dtype=np.int64) * 7 % 50257
    D.write_shard(tmp_path / "s.bin", toks)
    assert (tmp_path / "s.bin").read_bytes() == llmc_bytes(toks.tolist())
    assert D.read_shard_header(tmp_path / "s.bin") == 1000
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]   # no temp file left
    with pytest.raises(ValueError, match="70000 does not fit uint16"):
        D.write_shard(tmp_path / "t.bin", [1, 70000])
    assert not (tmp_path / "t.bin").exists()


def test_shard_writer_cuts_shards(tmp_path):
    with D.ShardWriter(tmp_path, "train", shard_size=4) as w:
        w.add([1, 2, 3])
        w.add([4, 5, 6, 7, 8, 9])
        w.add([])
    assert [p.name for p in w.paths] == ["train_000000.bin", "train_000001.bin",
                                        "train_000002.bin"]
    assert [D.read_shard_header(p) for p in w.paths] == [4, 4, 1]
    assert TokenData(str(tmp_path / "train_*.bin")).tokens().tolist() == list(range(1, 10))


@pytest.mark.parametrize("mutate, message", [
    (lambda b: struct.pack("<i", 20240521) + b[4:], "bad magic 20240521"),
    (lambda b: b[:4] + struct.pack("<i", 2) + b[8:], "version 2 .*LLaMA-3.* not supported"),
    (lambda b: b[:4] + struct.pack("<i", 7) + b[8:], "version 7 is not supported"),
    (lambda b: b[:-2], r"says 10 tokens .* file has 1,042 bytes \(truncated\?\)"),
    (lambda b: b + b"\0\0", "says 10 tokens .* file has 1,046 bytes"),
    (lambda b: b[:8] + struct.pack("<i", -3) + b[12:], "negative token count -3"),
    (lambda b: b[:100], "100 bytes, too small"),
])
def test_corrupt_shard_headers(tmp_path, mutate, message):
    good = llmc_bytes(range(10))
    bad = tmp_path / "shard_000.bin"
    bad.write_bytes(mutate(good))
    with pytest.raises(DataError, match=message) as e:
        TokenData(bad, format="llmc")
    assert str(bad) in str(e.value)
    if message.startswith("100 bytes"):
        return      # in auto mode a 100-byte .bin is raw uint16 tokens (its values are < 50257)
    # detected as an llm.c shard (or a damaged one), never silently read as raw tokens
    with pytest.raises(DataError, match="magic|version|token") as e:
        TokenData(bad)
    assert str(bad) in str(e.value)


def test_nanogpt_uint16(tmp_path):
    toks = np.array([464, 3290, 50256, 0, 11], np.uint16)
    toks.tofile(tmp_path / "train.bin")
    d = TokenData(tmp_path / "train.bin")
    assert d.sources[0].kind == "uint16"
    assert d.tokens().tolist() == toks.tolist()
    (tmp_path / "odd.bin").write_bytes(b"\1\0\2")
    with pytest.raises(DataError, match="odd.bin: 3 bytes, an odd size"):
        TokenData(tmp_path / "odd.bin")
    # a .bin that is neither: values past the GPT-2 vocabulary in its first KiB
    np.array([1, 2, 60000, 3], np.uint16).tofile(tmp_path / "junk.bin")
    with pytest.raises(DataError, match=r"junk.bin: unknown format.*60000 >= 50257 at token 2"):
        TokenData(tmp_path / "junk.bin")


def test_text_files_joined_with_eot(tmp_path):
    a, b = "Hello world.\n\nSecond line", "  another<|endoftext|>document ü"
    (tmp_path / "a.txt").write_text(a, encoding="utf-8")
    (tmp_path / "b.md").write_text(b, encoding="utf-8")
    d = TokenData([tmp_path / "a.txt", tmp_path / "b.md"])
    assert [s.kind for s in d.sources] == ["text", "text"]
    expected = tiktoken_ids(a) + [50256] + tiktoken_ids(b)
    assert d.tokens().tolist() == expected
    assert tiktoken_ids(b).count(50256) == 1   # the literal marker is the special token
    # one file: no separator at all
    assert TokenData(tmp_path / "a.txt").tokens().tolist() == tiktoken_ids(a)
    (tmp_path / "bad.txt").write_bytes(b"ok \xff\xfe")
    with pytest.raises(DataError, match=r"bad.txt: unknown format: not UTF-8 text \(byte 0xff "
                                        r"at offset 3\)"):
        TokenData(tmp_path / "bad.txt")


def test_mixed_sources_and_windows_across_files(tmp_path):
    D.write_shard(tmp_path / "s0.bin", [1, 2, 3])
    np.array([4, 5], np.uint16).tofile(tmp_path / "raw.bin")
    D.write_shard(tmp_path / "s1.bin", [])
    D.write_shard(tmp_path / "s2.bin", [6, 7, 8, 9])
    (tmp_path / "t.txt").write_text("Hello", encoding="utf-8")
    d = TokenData([tmp_path / "s0.bin", tmp_path / "raw.bin", tmp_path / "s1.bin",
                   tmp_path / "s2.bin", tmp_path / "t.txt"])
    full = [1, 2, 3, 4, 5, 6, 7, 8, 9, 50256] + tiktoken_ids("Hello")
    assert len(d) == len(full)
    assert d.tokens().tolist() == full
    T = 4
    starts = np.arange(len(full) - T)
    w = d.windows(starts, T)
    assert w.tolist() == [full[s:s + T + 1] for s in starts]
    with pytest.raises(ValueError, match=r"window start 7 is outside \[0, 6\]"):
        d.windows([0, 7], T)
    with pytest.raises(ValueError, match="window start -1"):
        d.windows([-1], T)
    rng = np.random.default_rng(0)
    r = d.random_windows(rng, 64, T)
    assert r.shape == (64, T + 1)
    assert all(r[i].tolist() in w.tolist() for i in range(64))
    # subsets and splits share the files
    train, val = d.split(0.25)
    assert len(val) == int(len(full) * 0.25) and len(train) + len(val) == len(full)
    assert val.tokens().tolist() == full[len(train):]
    assert val.windows([0], 1).tolist() == [full[len(train):len(train) + 2]]
    assert train.fingerprint != val.fingerprint != d.fingerprint
    assert "5 files (3 llm.c shards, 1 uint16 token file, 1 text file)" in d.describe()


def test_globs_and_path_errors(tmp_path):
    for i in (2, 0, 1):
        D.write_shard(tmp_path / f"train_{i:06d}.bin", [i])
    d = TokenData(str(tmp_path / "train_*.bin"))
    assert d.tokens().tolist() == [0, 1, 2]       # sorted glob order
    # the same file twice is read once
    assert len(TokenData([str(tmp_path / "train_*.bin"), tmp_path / "train_000000.bin"])) == 3
    with pytest.raises(DataError, match=r"val_\*.bin: the pattern matches no files"):
        TokenData(str(tmp_path / "val_*.bin"))
    with pytest.raises(DataError, match="missing.txt: no such file"):
        TokenData(tmp_path / "missing.txt")
    with pytest.raises(DataError, match="is a directory"):
        TokenData(tmp_path)
    with pytest.raises(ValueError, match="format must be one of"):
        TokenData(tmp_path / "train_000000.bin", format="npy")


def test_fingerprint_is_stable_and_sensitive(tmp_path):
    D.write_shard(tmp_path / "a.bin", np.arange(5000) % 50257)
    f1 = TokenData(tmp_path / "a.bin").fingerprint
    os.utime(tmp_path / "a.bin", (1, 1))                       # touched: same data
    assert TokenData(tmp_path / "a.bin").fingerprint == f1
    D.write_shard(tmp_path / "a.bin", (np.arange(5000) + 1) % 50257)   # same size, new tokens
    assert TokenData(tmp_path / "a.bin").fingerprint != f1
    D.write_shard(tmp_path / "a.bin", np.arange(5001) % 50257)
    assert TokenData(tmp_path / "a.bin").fingerprint != f1


def _settled(monkeypatch):
    """Files count as settled (cacheable) 50 ms after their last change instead of 2 s; wait
    that long.  (The file system's clock tick is far below 50 ms on Linux.)"""
    import time
    monkeypatch.setattr(D.FileHashes, "RACY_S", 0.05)
    time.sleep(0.06)


def test_fingerprint_covers_every_byte_and_not_the_name(tmp_path):
    """A same-size edit in the middle of a file changes the fingerprint; the same bytes under
    another name (and in another directory) are the same data."""
    import hashlib
    data = tmp_path / "a.bin"
    (np.arange(100_000, dtype=np.uint16) % 50257).tofile(data)
    original = data.read_bytes()
    f1 = TokenData(data).fingerprint
    raw = bytearray(original)
    raw[100_000] ^= 1                                  # 100 KB into a 200 KB file
    data.write_bytes(bytes(raw))
    edited = TokenData(data)
    assert edited.fingerprint != f1
    # the records name each file and carry the SHA-256 of its bytes
    (rec,) = edited.files()
    assert rec["path"] == str(data) and rec["size"] == 200_000
    assert rec["sha256"] == hashlib.sha256(bytes(raw)).hexdigest()
    assert rec["kind"] == "uint16" and rec["tokens"] == 100_000
    data.write_bytes(original)
    assert TokenData(data).fingerprint == f1
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "renamed.bin").write_bytes(original)
    assert TokenData(tmp_path / "elsewhere" / "renamed.bin").fingerprint == f1


def test_file_hashes_are_read_once_and_cached_by_stat(tmp_path, monkeypatch):
    data = tmp_path / "a.bin"
    (np.arange(5000, dtype=np.uint16) % 50257).tofile(data)
    t = os.stat(data).st_mtime_ns - 3600 * 10**9
    os.utime(data, ns=(t, t))
    _settled(monkeypatch)
    cache = tmp_path / "run" / "hashes.json"
    cache.parent.mkdir()
    h = D.FileHashes(cache)
    d = TokenData(data)
    d.hash_files(h)
    fp = d.fingerprint
    h.save()
    assert h.hashed == 1 and cache.is_file()
    # a new process (a new cache object): the stat matches, the file is not read
    h2 = D.FileHashes(cache)
    d2 = TokenData(data)
    d2.hash_files(h2)
    assert h2.hashed == 0 and d2.fingerprint == fp
    # a same-size edit whose mtime is set back: the change time and the hash tell
    raw = bytearray(data.read_bytes())
    raw[5000] ^= 1
    data.write_bytes(bytes(raw))
    os.utime(data, ns=(t, t))
    h3 = D.FileHashes(cache)
    d3 = TokenData(data)
    d3.hash_files(h3)
    assert h3.hashed == 1 and d3.fingerprint != fp
    # a file changed just now is hashed but not remembered (a write in the same clock tick
    # would keep its size and times)
    monkeypatch.setattr(D.FileHashes, "RACY_S", 2.0)
    fresh = tmp_path / "fresh.bin"
    (np.arange(10, dtype=np.uint16)).tofile(fresh)
    h4 = D.FileHashes(cache)
    TokenData(fresh).hash_files(h4)
    h4.save()
    h5 = D.FileHashes(cache)
    TokenData(fresh).hash_files(h5)
    assert h4.hashed == h5.hashed == 1
    # a damaged cache is only a cache
    cache.write_text("{not json")
    h6 = D.FileHashes(cache)
    d6 = TokenData(data)
    d6.hash_files(h6)
    assert h6.hashed == 1 and d6.fingerprint == d3.fingerprint
