"""What the training-CLI tests of the newer families share (tests/test_llama_train.py,
tests/test_neox_train.py): running the CLI, its arguments, and the check that a run directory
is a checkpoint of its family that transformers loads and generates from as gpt2s does."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np


def run(*args, threads=1, check=True):
    p = subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True,
                       env={**os.environ, "OMP_NUM_THREADS": str(threads)}, timeout=600)
    if check:
        assert p.returncode == 0, f"{args}\n{p.stdout}\n{p.stderr}"
    return p


def train_args(out, data, *extra):
    return ["gpt2s.train", *map(str, data), "--steps", "8", "--batch-size", "4",
            "--seq-len", "32", "--lr", "3e-3", "--warmup", "2", "--eval-every", "4",
            "--eval-batches", "2", "--save-every", "1", "--seed", "5", "--no-plot", "--quiet",
            "--out", str(out), *extra]


def eval_loss(model, data, *extra):
    p = run("gpt2s.eval", "--model", str(model), "--seq-len", "32", "--json", "-q",
            str(data), *extra)
    return json.loads(p.stdout)["loss"]


def check_run_dir(out, checkpoint, model_type, model_cls, hf_cls):
    """The run directory out, trained from checkpoint: its tokenizer is the checkpoint's,
    train_state.json names model_type, gpt2s loads it as model_cls with that tokenizer,
    transformers (hf_cls) loads the trained weights (logits within 1e-5 of gpt2s', not the
    checkpoint's), and `generate` from it gives transformers' greedy continuation."""
    import gpt2s
    import torch
    from tokenizers import Tokenizer
    assert (out / "tokenizer.json").read_bytes() == (checkpoint / "tokenizer.json").read_bytes()
    state = json.loads((out / "train_state.json").read_text())
    assert state["model_config"]["model_type"] == model_type
    m = gpt2s.AutoModelForCausalLM.from_pretrained(out)
    assert isinstance(m, model_cls) and m.tokenizer is not None
    ref_tok = Tokenizer.from_file(str(checkpoint / "tokenizer.json"))
    text = "ROMEO: But soft, what light"
    assert m.tokenizer.encode(text) == ref_tok.encode(text).ids
    hf = hf_cls.from_pretrained(out).float().eval()
    ids = np.array([ref_tok.encode(text).ids])
    with torch.no_grad():
        ref = hf(torch.tensor(ids)).logits.double().numpy()
    logits, _ = m.forward(ids)
    assert np.linalg.norm(logits - ref) / np.linalg.norm(ref) < 1e-5
    hf_before = hf_cls.from_pretrained(checkpoint).float().eval()
    with torch.no_grad():
        assert not np.allclose(hf_before(torch.tensor(ids)).logits.numpy(), ref, atol=1e-3)

    # generate from the run directory: the greedy continuation transformers gives
    g = run("gpt2s.generate", "--model", str(out), "--temperature", "0", "-n", "6",
            "--ignore-eos", "--no-echo", text)
    hf.generation_config.eos_token_id = None
    with torch.no_grad():
        want = hf.generate(torch.tensor(ids), max_new_tokens=6, do_sample=False,
                           pad_token_id=0,
                           attention_mask=torch.ones(ids.shape, dtype=torch.long))
    new = want[0, ids.shape[1]:].tolist()
    assert len(new) == 6
    assert g.stdout.rstrip("\n") == ref_tok.decode(new, skip_special_tokens=False)
