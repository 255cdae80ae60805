"""Fine-tuning a GPT-NeoX (Pythia) checkpoint with the command lines, end to end: python -m
gpt2s.prepare with the checkpoint's tokenizer.json -> python -m gpt2s.train --model CKPT (the
loss falls, the run keeps the checkpoint's tokenizer, transformers loads the run directory
back and computes the logits gpt2s does) -> a run killed by SIGKILL after a checkpoint and resumed ends
byte-identical to the run never stopped -> eval and generate on the run directory (the greedy
tokens transformers gives).  AdamW on a GPT-NeoX model's parameters is torch.optim.AdamW's.
(The gradients are tested against transformers in tests/test_neox_model.py.)"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from family_train import check_run_dir
from family_train import eval_loss as _eval_loss
from family_train import run as _run
from family_train import train_args as _train_args
from neox_ckpt import save_hf_neox

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("tokenizers", reason="the checkpoint's tokenizer.json needs tokenizers")

DATA = Path(__file__).parent / "data" / "tinyshakespeare_excerpt.txt"
HELDOUT = Path(__file__).parent / "data" / "tinyshakespeare_heldout.txt"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("neox") / "ckpt"
    save_hf_neox(path, seed=3, eos_token_id=2, bos_token_id=1)
    return path


def _checkpoint_step(out: Path) -> int:
    try:
        return json.loads((out / "train_state.json").read_text())["step"]
    except (FileNotFoundError, json.JSONDecodeError):
        return 0


def _determined(name, cfg):
    """The elements of a parameter whose AdamW step the data decide: all but the key biases
    outside the rotated part of each head, which add the same score to every key of a query
    (their gradient is 0 up to rounding, so AdamW's step follows the rounding's sign)."""
    if not name.endswith("query_key_value.bias"):
        return Ellipsis
    keep = np.ones((cfg.n_head, 3, cfg.head_dim), bool)
    keep[:, 1, cfg.rotary_dim:] = False
    return keep.ravel()


def test_prepare_train_resume_eval_generate(checkpoint, tmp_path):
    import transformers
    import gpt2s
    shards = tmp_path / "shards"
    _run("gpt2s.prepare", str(DATA), "--out", str(shards), "--tokenizer",
         str(checkpoint / "tokenizer.json"), "--val-fraction", "0.1")
    train = sorted(str(p) for p in shards.glob("*train*.bin"))
    val = sorted(str(p) for p in shards.glob("*val*.bin"))
    assert train and val
    before = _eval_loss(checkpoint, HELDOUT)
    out = tmp_path / "run"
    args = _train_args(out, train, "--val-data", val[0], "--model", checkpoint)
    p = _run(*args)
    assert "GPTNeoXForCausalLM(gpt_neox" in p.stderr
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r["type"] == "train"] == list(range(1, 9))
    # the model learned: held-out text (never trained on) costs less than before
    after = _eval_loss(out, HELDOUT)
    assert after < before - 0.05, (before, after)

    # killed by SIGKILL after a checkpoint and resumed: the same bytes and metrics as the
    # run never stopped
    half = tmp_path / "killed"
    args = _train_args(half, train, "--val-data", val[0], "--model", checkpoint)
    run = subprocess.Popen([sys.executable, "-m", *map(str, args)], stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL, env={**os.environ, "OMP_NUM_THREADS": "1"})
    deadline = time.monotonic() + 300
    while run.poll() is None and _checkpoint_step(half) < 3 and time.monotonic() < deadline:
        time.sleep(0.005)
    assert run.poll() is None, "the run ended before it could be killed"
    os.kill(run.pid, signal.SIGKILL)
    run.wait()
    assert 3 <= _checkpoint_step(half) < 8
    _run(*args, "--resume")
    for name in ("model.safetensors", "optimizer.npz", "config.json"):
        assert (half / name).read_bytes() == (out / name).read_bytes(), name

    def metrics(d):
        return [{k: v for k, v in json.loads(line).items()
                 if k not in ("tokens_per_s", "elapsed_s")}
                for line in (d / "metrics.jsonl").read_text().splitlines()]
    assert metrics(half) == metrics(out)

    # the run directory is a GPT-NeoX checkpoint: its tokenizer, weights transformers loads
    check_run_dir(out, checkpoint, "gpt_neox", gpt2s.GPTNeoXForCausalLM,
                  transformers.GPTNeoXForCausalLM)


def test_adamw_on_neox_params_is_torch_adamw(checkpoint):
    """Three steps of gpt2s' AdamW (weight decay on the 2-D tensors) on a GPT-NeoX model
    equal torch.optim.AdamW's on transformers' model with the same groups."""
    import transformers
    import gpt2s
    m = gpt2s.AutoModelForCausalLM.from_pretrained(checkpoint)
    hf = transformers.GPTNeoXForCausalLM.from_pretrained(checkpoint).float()
    hf.train()
    opt = gpt2s.AdamW(m, lr=1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    # transformers 5 names the head lm_head in memory (embed_out in the file)
    named = {("embed_out.weight" if n == "lm_head.weight" else n): p
             for n, p in hf.named_parameters()}
    assert sorted(named) == sorted(m.params)
    start = {n: p.detach().double().numpy().copy() for n, p in named.items()}
    decay = [p for n, p in named.items() if p.ndim == 2]
    rest = [p for n, p in named.items() if p.ndim != 2]
    assert sorted(opt.decayed) == sorted(n for n, p in named.items() if p.ndim == 2)
    topt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1},
                              {"params": rest, "weight_decay": 0.0}], lr=1e-2,
                             betas=(0.9, 0.95), eps=1e-8)
    rng = np.random.default_rng(0)
    for _ in range(3):
        idx = rng.integers(0, m.config.vocab_size, (2, 12))
        tgt = rng.integers(0, m.config.vocab_size, (2, 12))
        m.zero_grad()
        m.forward(idx, tgt)
        m.backward()
        opt.step()
        topt.zero_grad()
        logits = hf(torch.tensor(idx)).logits
        torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                          torch.tensor(tgt).reshape(-1)).backward()
        topt.step()
    for name, p in named.items():
        moved = p.detach().double().numpy() - start[name]
        keep = _determined(name, m.config)
        moved, ours = moved[keep], (m.params[name] - start[name])[keep]
        err = np.linalg.norm(ours - moved) / np.linalg.norm(moved)
        assert err < 1e-4, (name, err)


def test_data_parallel_buckets_end_at_neox_blocks(checkpoint):
    """The gradient buckets of MPI data parallel end where a GPT-NeoX block's tensors begin
    (config.layer_of names them), as GPT-2's and Llama's do."""
    import gpt2s
    from gpt2s.distributed import DataParallel
    m = gpt2s.AutoModelForCausalLM.from_pretrained(checkpoint)
    starts = {}
    for name, _shape, off in m.store.layout:
        if name.startswith("gpt_neox.layers."):
            l = int(name.split(".")[2])
            starts[l] = min(starts.get(l, off), off)
    assert sorted(starts) == list(range(m.config.n_layer))
    dp = DataParallel.__new__(DataParallel)
    dp.model = m
    dp._plan_buckets(min_floats=1)
    assert {l: b[0] for l, b in dp._after_layer.items()} == starts


def test_two_mpi_ranks_train_as_one_process(checkpoint, tmp_path):
    """Data parallel over 2 ranks of 2 windows each == one process with batches of 4 on a
    GPT-NeoX model: the same losses (to float rounding of the summed gradients) and
    parameters."""
    import shutil
    import gpt2s
    pytest.importorskip("mpi4py", reason="pip install 'gpt2s[mpi]'")
    beside = Path(sys.executable).parent / "mpiexec"
    exe = str(beside) if beside.exists() else shutil.which("mpiexec")
    if exe is None:
        pytest.skip("no mpiexec next to the interpreter or on PATH; pip install 'gpt2s[mpi]'")
    version = subprocess.run([exe, "--version"], capture_output=True, text=True).stdout
    mpi = [exe, "-n", "2"] + (["--oversubscribe"] if "Open MPI" in version else [])
    single, dp = tmp_path / "single", tmp_path / "dp"
    _run(*_train_args(single, [DATA], "--model", checkpoint, "--steps", "4"))
    args = _train_args(dp, [DATA], "--model", checkpoint, "--steps", "4", "--batch-size", "2")
    env = dict(os.environ, OMP_NUM_THREADS="1", OMPI_ALLOW_RUN_AS_ROOT="1",
               OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1")
    p = subprocess.run([*mpi, sys.executable, "-m", *map(str, args)], capture_output=True,
                       text=True, env=env, timeout=300)
    assert p.returncode == 0, p.stderr
    assert "2 ranks of 2 windows" in p.stderr

    def losses(d):
        rows = [json.loads(line) for line in (d / "metrics.jsonl").read_text().splitlines()]
        return [r.get("train_loss", r.get("val_loss")) for r in rows]
    np.testing.assert_allclose(losses(dp), losses(single), rtol=1e-6)
    a = gpt2s.AutoModelForCausalLM.from_pretrained(single)
    b = gpt2s.AutoModelForCausalLM.from_pretrained(dp)
    for name in a.params:
        keep = _determined(name, a.config)
        np.testing.assert_allclose(b.params[name][keep], a.params[name][keep], atol=1e-4,
                                   err_msg=name)
