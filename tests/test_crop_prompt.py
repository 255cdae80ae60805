"""`python -m gpt2s.generate --crop-prompt`: a prompt longer than the model's context keeps its
last max(n_ctx - max_new_tokens, n_ctx // 2) tokens instead of being refused."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from gpt2s import GPT2, GPT2Config, get_tokenizer
from gpt2s.generate import crop_prompt

N_CTX = 32
WORDS = ("the quick brown fox jumps over a lazy dog while seven wizards quietly hex "
         "every jovial knight ").split()


def long_text(n_words=120):
    return " ".join(WORDS[i % len(WORDS)] + ("," if i % 7 == 3 else "") for i in range(n_words))


@pytest.mark.parametrize("max_new, keep", [(8, 24), (30, 16), (100, 16), (1, 31)])
def test_crop_prompt_keeps_the_end(max_new, keep):
    enc = get_tokenizer()
    text = long_text()
    ids = enc.encode(text)
    assert len(ids) > N_CTX
    kept, n_kept, n_whole = crop_prompt(enc, text, N_CTX, max_new)
    assert n_whole == len(ids)
    assert text.endswith(kept)
    # cut at a token boundary between words: exactly the last `keep` tokens
    assert n_kept == keep and enc.encode(kept) == ids[-keep:]


def test_crop_inside_a_character_still_fits():
    enc = get_tokenizer()
    text = "🎉" * 40           # each emoji is several byte-level tokens
    kept, n_kept, _ = crop_prompt(enc, text, N_CTX, 8)
    assert text.endswith(kept) and 0 < n_kept <= 24 and len(enc.encode(kept)) == n_kept
    short = "fits in the context"
    assert crop_prompt(enc, short, N_CTX, 8) == (short, 4, 4)


def run(args, cwd):
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", PYTHONIOENCODING="utf-8")
    env.pop("GPT2S_MODEL", None)
    return subprocess.run([sys.executable, "-m", "gpt2s.generate", *args], env=env, cwd=cwd,
                          capture_output=True, text=True, encoding="utf-8", timeout=300)


def test_cli_crop_prompt(tmp_path):
    model_dir = tmp_path / "model"
    GPT2.from_config(GPT2Config.preset("tiny", n_ctx=N_CTX), seed=3).save_safetensors(model_dir)
    text = long_text()
    common = ["--model", str(model_dir), "-n", "6", "--seed", "4", "--ignore-eos"]
    p = run([text, *common], tmp_path)
    assert p.returncode == 2 and "--crop-prompt keeps its end" in p.stderr, p.stderr
    p = run([text, *common, "--crop-prompt"], tmp_path)
    assert p.returncode == 0, p.stderr
    kept, n_kept, n_whole = crop_prompt(get_tokenizer(), text, N_CTX, 6)
    assert f"the prompt is {n_whole} tokens long" in p.stderr
    assert f"kept its last {n_kept} tokens" in p.stderr and n_kept == N_CTX - 6
    # the model saw exactly the kept end: same output as that text given whole
    q = run([kept, *common], tmp_path)
    assert q.returncode == 0, q.stderr
    assert p.stdout == q.stdout and p.stdout.startswith(kept)
