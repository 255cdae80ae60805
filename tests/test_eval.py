"""gpt2s.eval against transformers: the same small random model, saved once and loaded by both,
scored with Hugging Face's sliding-window perplexity recipe (the loop of its "Perplexity of
fixed-length models" guide, written out here with windows of seq_len + 1 tokens and an exact
count of the scored tokens)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest

from gpt2s import GPT2, GPT2Config
from gpt2s.data import TokenData, write_shard
from gpt2s.eval import count_windows, evaluate, sliding_windows

N_CTX = 48


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory, make_params):
    """A 2-layer model with the GPT-2 vocabulary and random non-trivial weights, saved in
    Hugging Face's layout."""
    cfg = GPT2Config(n_layer=2, n_head=2, n_embd=32, vocab_size=50257, n_ctx=N_CTX)
    m = GPT2(cfg)
    for name, value in make_params(cfg, seed=11).items():
        m.params[name][...] = value
    d = tmp_path_factory.mktemp("eval-model")
    m.save_safetensors(d)
    return d


def hf_recipe(model_dir, ids, seq_len, stride):
    """Hugging Face's perplexity loop: windows of max_length tokens every stride tokens, labels
    -100 except the last trg_len; the loss of each window times its scored-token count."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    model = transformers.GPT2LMHeadModel.from_pretrained(model_dir, torch_dtype=torch.float64)
    model.eval()
    encodings = torch.tensor([ids])
    max_length = seq_len + 1
    seq_len_total = encodings.size(1)
    nll_sum, n_tokens, prev_end_loc, n_windows = 0.0, 0, 0, 0
    for begin_loc in range(0, seq_len_total, stride):
        end_loc = min(begin_loc + max_length, seq_len_total)
        trg_len = end_loc - prev_end_loc
        input_ids = encodings[:, begin_loc:end_loc]
        target_ids = input_ids.clone()
        target_ids[:, :-trg_len] = -100
        with torch.no_grad():
            loss = model(input_ids, labels=target_ids).loss
        scored = int((target_ids[:, 1:] != -100).sum())   # labels are shifted inside the model
        nll_sum += loss.item() * scored
        n_tokens += scored
        n_windows += 1
        prev_end_loc = end_loc
        if end_loc == seq_len_total:
            break
    return nll_sum / n_tokens, n_tokens, n_windows


def test_window_schedule():
    # every token after the first is scored exactly once, in order
    for n, T, s in [(2, 8, 4), (9, 8, 4), (10, 8, 4), (100, 8, 3), (101, 16, 16), (57, 16, 1)]:
        wins = list(sliding_windows(n, T, s))
        assert len(wins) == count_windows(n, T, s)
        scored = [p for b, e, f in wins for p in range(f, e)]
        assert scored == list(range(1, n))
        assert all(e - b <= T + 1 and f > b for b, e, f in wins)
        assert all(e - b == T + 1 for b, e, f in wins[:-1])
    assert list(sliding_windows(1, 8, 4)) == []


@pytest.mark.parametrize("seq_len, stride, batch", [(32, 16, 1), (32, 16, 3), (32, 32, 2),
                                                    (20, 7, 4)])
def test_loss_matches_transformers(saved_model, tmp_path, seq_len, stride, batch):
    # (transformers' recipe feeds seq_len + 1 tokens, so seq_len < n_ctx here; the full
    # context is test_full_context_windows)
    rng = np.random.default_rng(seq_len * 100 + stride)
    ids = rng.integers(0, 50257, size=101).astype(np.uint16)
    ids.tofile(tmp_path / "val.bin")
    model = GPT2.from_safetensors(saved_model)
    got = evaluate(model, TokenData(tmp_path / "val.bin"), seq_len, stride, batch)
    want, n_tokens, n_windows = hf_recipe(saved_model, ids.tolist(), seq_len, stride)
    assert got["tokens"] == n_tokens == len(ids) - 1
    assert got["windows"] == n_windows
    assert got["loss"] == pytest.approx(want, rel=1e-5)
    assert got["perplexity"] == pytest.approx(math.exp(want), rel=1e-5)


def test_full_context_windows(saved_model, make_params):
    """seq_len = n_ctx (the default): windows of n_ctx + 1 tokens.  transformers cannot take
    n_ctx + 1 positions, so the reference is its logits on the n_ctx inputs of each window,
    with torch's cross-entropy on the targets no earlier window scored."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    hf = transformers.GPT2LMHeadModel.from_pretrained(saved_model, torch_dtype=torch.float64)
    hf.eval()
    ids = np.random.default_rng(5).integers(0, 50257, size=130)
    stride = 20
    nll, n, prev_end = 0.0, 0, 0
    for begin in range(0, len(ids), stride):
        end = min(begin + N_CTX + 1, len(ids))
        window = torch.from_numpy(ids[begin:end])[None]
        targets = window[:, 1:].clone()
        first = max(prev_end, begin + 1)
        targets[:, :first - begin - 1] = -100
        with torch.no_grad():
            logits = hf(window[:, :-1]).logits
        nll += torch.nn.functional.cross_entropy(logits[0], targets[0], ignore_index=-100,
                                                 reduction="sum").item()
        n += int((targets != -100).sum())
        prev_end = end
        if end == len(ids):
            break
    got = evaluate(GPT2.from_safetensors(saved_model), ids, stride=stride)
    assert got["seq_len"] == N_CTX and got["tokens"] == n == len(ids) - 1
    assert got["loss"] == pytest.approx(nll / n, rel=1e-5)


def run(args, cwd):
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", PYTHONIOENCODING="utf-8")
    env.pop("GPT2S_MODEL", None)
    return subprocess.run([sys.executable, "-m", "gpt2s.eval", *args], env=env, cwd=cwd,
                          capture_output=True, text=True, encoding="utf-8", timeout=300)


def test_cli_json_on_text_and_shards(saved_model, tmp_path):
    text = ("It was the best of times, it was the worst of times, it was the age of wisdom, "
            "it was the age of foolishness, it was the epoch of belief. ") * 4
    (tmp_path / "a.txt").write_text(text, encoding="utf-8")
    from gpt2s import get_tokenizer
    ids = get_tokenizer().encode(text)
    want, n_tokens, _ = hf_recipe(saved_model, ids, 32, 12)
    p = run(["--model", str(saved_model), "--seq-len", "32", "--stride", "12", "--json",
             "--batch-size", "2", "a.txt"], tmp_path)
    assert p.returncode == 0, p.stderr
    result = json.loads(p.stdout)
    assert result["tokens"] == n_tokens == len(ids) - 1
    assert result["loss"] == pytest.approx(want, rel=1e-5)
    assert result["perplexity"] == pytest.approx(math.exp(want), rel=1e-5)
    assert result["tokens_per_s"] > 0 and result["seq_len"] == 32 and result["stride"] == 12
    assert "windows" in p.stderr and "100%" in p.stderr        # the progress bar
    # the same tokens as llm.c shards give the same numbers
    write_shard(tmp_path / "val_000000.bin", ids[:100])
    write_shard(tmp_path / "val_000001.bin", ids[100:])
    q = run(["--model", str(saved_model), "--seq-len", "32", "--stride", "12", "--json", "-q",
             "val_*.bin"], tmp_path)
    assert q.returncode == 0, q.stderr
    assert json.loads(q.stdout)["loss"] == pytest.approx(want, rel=1e-5)
    assert "windows" not in q.stderr
    # plain output
    r = run(["--model", str(saved_model), "--seq-len", "32", "--stride", "32", "a.txt"], tmp_path)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("loss ") and "perplexity" in r.stdout and "tokens/s" in r.stdout


def test_cli_errors(saved_model, tmp_path, monkeypatch, capsys):
    from gpt2s.eval import main
    monkeypatch.chdir(tmp_path)
    (tmp_path / "a.txt").write_text("some text to score " * 5, encoding="utf-8")
    write_shard(tmp_path / "bad.bin", list(range(10)))
    raw = bytearray((tmp_path / "bad.bin").read_bytes())
    raw[4] = 2                                              # version 2
    (tmp_path / "bad.bin").write_bytes(bytes(raw))
    m = ["--model", str(saved_model)]
    for args, fragment in [
        ([*m, "--stride", "0", "a.txt"], "--stride must be >= 1"),
        ([*m, "--seq-len", "8", "--stride", "9", "a.txt"], "--stride 9 is larger than --seq-len 8"),
        ([*m, "--seq-len", "49", "a.txt"], "--seq-len 49 exceeds the model's context n_ctx=48"),
        ([*m, "missing.txt"], "missing.txt: no such file"),
        ([*m, "nothing_*.bin"], "nothing_*.bin: the pattern matches no files"),
        ([*m, "bad.bin"], "bad.bin: llm.c shard version 2"),
        (["--model", str(tmp_path / "nomodel"), "a.txt"], "nomodel"),
    ]:
        assert main(args) == 2, args
        out, err = capsys.readouterr()
        assert "gpt2s.eval: error: " in err and fragment in err, (fragment, err)
        assert out == ""
