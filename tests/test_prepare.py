"""python -m gpt2s.prepare: text -> llm.c shards -> the same tokens back.

Expected token streams come from tiktoken on the whole text of each file (not from the
block-wise path under test), joined with <|endoftext|> between files as gpt2s.data documents."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from gpt2s.data import TokenData, read_shard_header
from gpt2s.prepare import main, prepare

EOT = 50256


def encode(text):
    from gpt2s import get_tokenizer
    return get_tokenizer().encode(text, allowed_special={"<|endoftext|>"})


@pytest.fixture
def corpus(tmp_path):
    d = tmp_path / "corpus"
    d.mkdir()
    texts = {
        "a.txt": "First document.\n\nWith two paragraphs — and ünïcödé 🎉.",
        "b.txt": "".join(f"Story {i}: once upon a time there were {i} cats.<|endoftext|>"
                         for i in range(40)) + "An unfinished tail",
        "c.txt": "",
        "d.txt": "<|endoftext|>starts with the marker\n" * 3,
    }
    for name, text in texts.items():
        (d / name).write_text(text, encoding="utf-8")
    expected = []
    for i, name in enumerate(sorted(texts)):
        if i:
            expected.append(EOT)
        expected += encode(texts[name])
    return d, expected


def read_back(out):
    return (TokenData(str(out / "train_*.bin")).tokens().tolist(),
            TokenData(str(out / "val_*.bin")).tokens().tolist()
            if list(out.glob("val_*.bin")) else [])


@pytest.mark.parametrize("workers, block_bytes", [(1, 1 << 20), (1, 64), (2, 100)])
def test_round_trip(corpus, tmp_path, workers, block_bytes):
    d, expected = corpus
    out = tmp_path / "out"
    m = prepare([str(d / "*.txt")], out, shard_size=97, workers=workers,
                block_bytes=block_bytes)
    train, val = read_back(out)
    assert train == expected and val == []
    # the same stream TokenData reads from the text files themselves
    assert TokenData(str(d / "*.txt")).tokens().tolist() == expected
    shards = sorted(out.glob("train_*.bin"))
    assert [p.name for p in shards] == m["train"]
    counts = [read_shard_header(p) for p in shards]
    assert all(c == 97 for c in counts[:-1]) and 0 < counts[-1] <= 97
    assert m["tokens"] == len(expected) == sum(counts)
    assert json.loads((out / "prepare.json").read_text()) == m
    assert not [p for p in out.iterdir() if p.name.startswith(".")]     # temp dir removed


def test_validation_split(corpus, tmp_path):
    d, expected = corpus
    m = prepare([d / "a.txt", d / "b.txt", d / "d.txt"], tmp_path / "f", shard_size=50,
                val_fraction=0.25, workers=1)
    full = encode((d / "a.txt").read_text()) + [EOT] + encode((d / "b.txt").read_text()) + \
        [EOT] + encode((d / "d.txt").read_text())
    n = len(full)
    train, val = read_back(tmp_path / "f")
    assert len(val) == int(n * 0.25) and train + val == full
    assert m["train_tokens"] == len(train) and m["val_tokens"] == len(val)
    assert all(read_shard_header(tmp_path / "f" / s) <= 50 for s in m["train"] + m["val"])
    # --val-shards: the last K shards
    m = prepare([str(d / "*.txt")], tmp_path / "k", shard_size=50, val_shards=2, workers=1)
    train, val = read_back(tmp_path / "k")
    assert train + val == expected
    n_shards = -(-len(expected) // 50)
    assert len(m["train"]) == n_shards - 2 and len(m["val"]) == 2
    assert len(train) == 50 * (n_shards - 2)
    assert [read_shard_header(tmp_path / "k" / s) for s in m["train"]] == [50] * (n_shards - 2)
    with pytest.raises(ValueError, match=f"--val-shards {n_shards}: the corpus makes only "
                                         f"{n_shards} shards"):
        prepare([str(d / "*.txt")], tmp_path / "k2", shard_size=50, val_shards=n_shards,
                workers=1)


def test_errors_leave_nothing(corpus, tmp_path, capsys):
    d, _ = corpus
    (d / "bad.txt").write_bytes(b"fine text<|endoftext|>more \xc3\x28 text")
    out = tmp_path / "o"
    for workers in ("1", "2"):
        assert main([str(d / "bad.txt"), "--out", str(out), "--workers", workers,
                     "--shard-size", "3"]) == 2
        err = capsys.readouterr().err
        assert f"gpt2s.prepare: error: {d / 'bad.txt'}: not UTF-8 text (byte 0xc3 at offset 27)" \
            in err, err
        # the failed run made --out (and its parent): neither is left behind, empty
        assert not out.exists()
    nested = tmp_path / "new" / "deeper"
    assert main([str(d / "bad.txt"), "--out", str(nested), "-q"]) == 2
    assert not (tmp_path / "new").exists()
    # a directory that was there before stays
    out.mkdir()
    assert main([str(d / "bad.txt"), "--out", str(out), "-q"]) == 2
    assert list(out.iterdir()) == []
    out.rmdir()
    capsys.readouterr()
    for args, fragment in [
        ([str(d / "nothing*.txt")], "nothing*.txt: the pattern matches no files"),
        ([str(d / "a.txt"), "--val-fraction", "1.5"], "--val-fraction must be in [0, 1)"),
        ([str(d / "a.txt"), "--shard-size", "0"], "--shard-size must be in [1,"),
        ([str(d / "c.txt")], "no tokens: the input file is empty"),
    ]:
        assert main([*args, "--out", str(out), "-q"]) == 2
        assert fragment in capsys.readouterr().err
        assert not out.exists(), args
    np.zeros(4, np.uint16).tofile(tmp_path / "train.bin")
    assert main([str(tmp_path / "train.bin"), "--out", str(out)]) == 2
    assert "train.bin: a .bin file is already tokens" in capsys.readouterr().err
    # existing shards are not overwritten silently
    assert main([str(d / "a.txt"), "--out", str(out), "-q"]) == 0
    assert main([str(d / "b.txt"), "--out", str(out), "-q"]) == 2
    assert "already has shards (train_000000.bin); remove them or pass --overwrite" in \
        capsys.readouterr().err
    assert main([str(d / "b.txt"), "--out", str(out), "-q", "--overwrite"]) == 0
    assert read_back(out)[0] == encode((d / "b.txt").read_text())


def test_cli(corpus, tmp_path):
    d, expected = corpus
    env = dict(os.environ, PYTHONIOENCODING="utf-8")
    p = subprocess.run([sys.executable, "-m", "gpt2s.prepare", str(d / "*.txt"), "--out",
                        str(tmp_path / "s"), "--shard-size", "120", "--val-fraction", "0.1",
                        "--workers", "2"], env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    assert p.stdout == ""
    assert f"{len(expected):,} tokens from 4 files" in p.stderr and "100%" in p.stderr
    train, val = read_back(tmp_path / "s")
    assert train + val == expected and len(val) == int(len(expected) * 0.1)
    p = subprocess.run([sys.executable, "-m", "gpt2s.prepare", "--help"], capture_output=True,
                       text=True, timeout=60)
    assert p.returncode == 0 and "examples:" in p.stdout
    p = subprocess.run([sys.executable, "-m", "gpt2s.prepare", "x.txt", "--out", "o",
                        "--val-fraction", "0.1", "--val-shards", "1"], capture_output=True,
                       text=True, timeout=60, cwd=tmp_path)
    assert p.returncode == 2 and "not allowed with argument" in p.stderr


def test_prepare_then_train_and_eval(tmp_path, capsys):
    """prepare -> train on the shards -> eval on the validation shards."""
    from pathlib import Path
    from gpt2s import GPT2, train
    from gpt2s.eval import evaluate
    from gpt2s.eval import main as eval_main
    text_file = Path(__file__).parent / "data" / "tinyshakespeare_excerpt.txt"
    out = tmp_path / "shards"
    m = prepare([text_file], out, shard_size=3000, val_fraction=0.1, workers=1)
    assert len(m["train"]) >= 2 and m["val"]
    text_tokens = TokenData(text_file).tokens()
    train_data = TokenData(str(out / "train_*.bin"))
    assert np.array_equal(train_data.tokens(), text_tokens[:m["train_tokens"]])
    assert train.main([str(out / "train_*.bin"), "--val-data", str(out / "val_*.bin"),
                       "--init", "tiny", "--batch-size", "2", "--seq-len", "16", "--steps", "3",
                       "--eval-every", "3", "--eval-batches", "1", "--quiet", "--no-plot",
                       "--out", str(tmp_path / "run")]) == 0
    state = json.loads((tmp_path / "run" / "train_state.json").read_text())
    assert state["identity"]["train_data"] == train_data.fingerprint
    # the training batches are windows of the text's tokens
    x, y = train.train_batch(train_data, 0, 0, 0, 2, 16)
    for row in x:
        assert any(np.array_equal(text_tokens[s:s + 16], row)
                   for s in range(m["train_tokens"] - 16))
    capsys.readouterr()
    assert eval_main(["--model", str(tmp_path / "run"), "--seq-len", "16", "--json", "-q",
                      str(out / "val_*.bin")]) == 0
    result = json.loads(capsys.readouterr().out)
    want = evaluate(GPT2.from_safetensors(tmp_path / "run"), text_tokens[m["train_tokens"]:],
                    16)
    assert result["tokens"] == m["val_tokens"] - 1
    assert result["loss"] == pytest.approx(want["loss"], rel=1e-6)


def test_disk_full_is_one_line_naming_the_shard_and_leaves_nothing(corpus, tmp_path, capsys,
                                                                   monkeypatch):
    """A shard's write fails half-way as a full disk fails it (an OSError without a file
    name): one line naming the shard and the cause, exit status 1, and the temporary
    directory is gone."""
    import errno
    import gpt2s.data
    d, _ = corpus
    real = gpt2s.data.atomic_write
    written = []

    def disk_full(dest, write):
        if len(written) == 1:          # the second shard
            def half(f):
                f.write(b"\0" * 100)
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            return real(dest, half)
        written.append(dest)
        return real(dest, write)
    monkeypatch.setattr(gpt2s.data, "atomic_write", disk_full)
    out = tmp_path / "o"
    assert main([str(d / "b.txt"), "--out", str(out), "--shard-size", "50", "--workers", "1",
                 "-q"]) == 1
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith("python -m gpt2s.prepare: error: ") and \
        lines[0].endswith("part_000001.bin: No space left on device"), err
    assert str(out) in lines[0]
    assert not out.exists()       # made by the failed run: not left behind, empty


def test_a_real_write_error_is_one_line(corpus, tmp_path):
    """A real OS error: RLIMIT_FSIZE below one shard's size gives EFBIG on its write."""
    import signal

    def limited():
        import resource
        resource.setrlimit(resource.RLIMIT_FSIZE, (2048, 2048))
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    d, _ = corpus
    out = tmp_path / "o"
    out.mkdir()
    p = subprocess.run([sys.executable, "-m", "gpt2s.prepare", str(d / "b.txt"), "--out",
                        str(out), "--workers", "1", "-q"], capture_output=True, text=True,
                       timeout=300, preexec_fn=limited)
    assert p.returncode == 1, p.stderr
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in p.stderr, p.stderr
    assert lines[0].startswith(f"python -m gpt2s.prepare: error: {out}") and \
        lines[0].endswith(".bin: File too large"), p.stderr
    assert list(out.iterdir()) == []
