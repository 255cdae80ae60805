"""Fine-tuning a Llama checkpoint with the command lines, end to end: python -m gpt2s.prepare
with the checkpoint's tokenizer.json -> python -m gpt2s.train --model CKPT (the loss falls,
the run keeps the checkpoint's tokenizer and transformers loads the run directory back) ->
a run killed by SIGKILL and resumed ends byte-identical to the run never stopped -> eval and
generate on the run directory.  AdamW on a Llama model's parameters is torch.optim.AdamW's;
two MPI ranks compute what one process with the whole batch computes.  (The training
step's gradients are tested against transformers in tests/test_llama_model.py.)"""

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
from llama_ckpt import save_hf

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("tokenizers", reason="the checkpoint's tokenizer.json needs tokenizers")

DATA = Path(__file__).parent / "data" / "tinyshakespeare_excerpt.txt"
HELDOUT = Path(__file__).parent / "data" / "tinyshakespeare_heldout.txt"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("llama") / "ckpt"
    hf, tk = save_hf(path, "llama", seed=3, eos_token_id=2)
    return path


def test_prepare_train_eval_generate(checkpoint, tmp_path):
    import transformers
    import gpt2s
    # the text prepared with the checkpoint's own tokenizer
    shards = tmp_path / "shards"
    _run("gpt2s.prepare", str(DATA), "--out", str(shards), "--tokenizer",
         str(checkpoint / "tokenizer.json"), "--val-fraction", "0.1")
    train = sorted(str(p) for p in shards.glob("*train*.bin"))
    val = sorted(str(p) for p in shards.glob("*val*.bin"))
    assert train and val
    before = _eval_loss(checkpoint, HELDOUT)
    out = tmp_path / "run"
    p = _run(*_train_args(out, train, "--val-data", val[0], "--model", checkpoint))
    assert "LlamaForCausalLM(llama" in p.stderr
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r["type"] == "train"] == list(range(1, 9))
    # the model learned: held-out text (never trained on) costs less than before
    after = _eval_loss(out, HELDOUT)
    assert after < before - 0.05, (before, after)

    # the run directory is a checkpoint of the same model: its tokenizer beside it, which
    # transformers' AutoTokenizer reads as the original, and weights transformers loads
    assert (out / "generation_config.json").is_file()
    check_run_dir(out, checkpoint, "llama", gpt2s.LlamaForCausalLM,
                  transformers.LlamaForCausalLM)

    # fine-tuning the run directory again (its own tokenizer.json, read back)
    again = _run(*_train_args(tmp_path / "again", [DATA], "--model", out, "--steps", "1"))
    assert "saved" in again.stderr


def test_text_data_is_encoded_with_the_checkpoints_tokenizer(checkpoint, tmp_path):
    """Text given to the trainer is tokenized with the checkpoint's tokenizer.json: the run's
    vocab.json records it, and another vocabulary is refused by name."""
    from gpt2s.vocab import FileTokenizer, load_vocab
    out = tmp_path / "run"
    _run(*_train_args(out, [DATA], "--model", checkpoint, "--steps", "1"))
    assert load_vocab(out / "vocab.json") == FileTokenizer.from_file(checkpoint / "tokenizer.json")
    for extra, why in ((["--tokenizer", "char"], "has its own tokenizer"),
                       (["--tokenizer", "gpt2"], "has its own tokenizer")):
        p = _run(*_train_args(tmp_path / "x", [DATA], "--model", checkpoint, *extra),
                 check=False)
        assert p.returncode == 2 and why in p.stderr, p.stderr
    # GPT-2 token files are not the checkpoint's tokens
    shards = tmp_path / "gpt2shards"
    _run("gpt2s.prepare", str(DATA), "--out", str(shards))
    p = _run(*_train_args(tmp_path / "y", sorted(shards.glob("*train*.bin")), "--model",
                          checkpoint), check=False)
    assert p.returncode == 2 and "not of --model" in p.stderr, p.stderr


def _checkpoint_step(out: Path) -> int:
    try:
        return json.loads((out / "train_state.json").read_text())["step"]
    except (FileNotFoundError, json.JSONDecodeError):
        return 0


def test_sigkill_then_resume_is_byte_identical(checkpoint, tmp_path):
    """A run killed by SIGKILL after a checkpoint and resumed ends with the same bytes
    (model.safetensors, optimizer.npz) and metrics as the run never stopped."""
    ref = tmp_path / "ref"
    _run(*_train_args(ref, [DATA], "--model", checkpoint, "--grad-accum", "2"))
    out = tmp_path / "killed"
    args = _train_args(out, [DATA], "--model", checkpoint, "--grad-accum", "2")
    p = subprocess.Popen([sys.executable, "-m", *args], stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL, env={**os.environ, "OMP_NUM_THREADS": "1"})
    deadline = time.monotonic() + 300
    while p.poll() is None and _checkpoint_step(out) < 3 and time.monotonic() < deadline:
        time.sleep(0.005)
    assert p.poll() is None, "the run ended before it could be killed"
    os.kill(p.pid, signal.SIGKILL)
    p.wait()
    at = _checkpoint_step(out)
    assert 3 <= at < 8
    _run(*args, "--resume")
    for name in ("model.safetensors", "optimizer.npz", "config.json"):
        assert (out / name).read_bytes() == (ref / name).read_bytes(), name

    def rows(d):
        return [{k: v for k, v in json.loads(line).items()
                 if k not in ("tokens_per_s", "elapsed_s")}
                for line in (d / "metrics.jsonl").read_text().splitlines()]
    assert rows(out) == rows(ref)


def test_adamw_on_llama_params_is_torch_adamw(checkpoint):
    """Three steps of gpt2s' AdamW (weight decay on the 2-D tensors) on a Llama model equal
    torch.optim.AdamW's on transformers' model with the same groups."""
    import transformers
    import gpt2s
    m = gpt2s.AutoModelForCausalLM.from_pretrained(checkpoint)
    hf = transformers.LlamaForCausalLM.from_pretrained(checkpoint).float()
    hf.train()
    opt = gpt2s.AdamW(m, lr=1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    named = dict(hf.named_parameters())
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
        # the change of each tensor over the three steps, relative (L2) to the change: an
        # element whose gradient is near zero moves by up to lr either way, so its sign
        # follows rounding in both implementations
        moved = p.detach().double().numpy() - start[name]
        err = np.linalg.norm(m.params[name] - start[name] - moved) / np.linalg.norm(moved)
        assert err < 1e-4, (name, err)


def test_token_data_keeps_ids_past_uint16():
    """A tokenizer of more than 65,536 tokens (Llama 3's, Qwen2's) keeps its ids whole when
    the trainer reads text."""
    from gpt2s.data import TokenData

    class Big:
        n_vocab, eot_id = 151_000, 150_999

        def encode_ordinary(self, text):
            return [70_000 + ord(c) for c in text]

        def to_dict(self):
            return {"type": "big"}

    data = TokenData([str(DATA), str(HELDOUT)], tokenizer=Big())
    text = DATA.read_text(encoding="utf-8")
    n = len(text)
    np.testing.assert_array_equal(data.tokens(0, 5), [70_000 + ord(c) for c in text[:5]])
    assert data.tokens(n, n + 1)[0] == 150_999


def _mpiexec():
    try:
        import mpi4py  # noqa: F401
    except ImportError as e:
        pytest.skip(f"mpi4py is not installed ({e}); pip install 'gpt2s[mpi]'")
    import shutil
    beside = Path(sys.executable).parent / "mpiexec"
    exe = str(beside) if beside.exists() else shutil.which("mpiexec")
    if exe is None:
        pytest.skip("no mpiexec next to the interpreter or on PATH; pip install 'gpt2s[mpi]'")
    version = subprocess.run([exe, "--version"], capture_output=True, text=True).stdout
    return [exe, "-n", "2"] + (["--oversubscribe"] if "Open MPI" in version else [])


def test_two_mpi_ranks_train_as_one_process(checkpoint, tmp_path):
    """Data parallel over 2 ranks of 2 windows each == one process with batches of 4: the
    same losses (to float rounding of the summed gradients) and parameters."""
    import gpt2s
    mpi = _mpiexec()
    single, dp = tmp_path / "single", tmp_path / "dp"
    _run(*_train_args(single, [DATA], "--model", checkpoint, "--steps", "4"))
    args = _train_args(dp, [DATA], "--model", checkpoint, "--steps", "4", "--batch-size", "2")
    env = dict(os.environ, OMP_NUM_THREADS="1", OMPI_ALLOW_RUN_AS_ROOT="1",
               OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1")
    p = subprocess.run([*mpi, sys.executable, "-m", *args], capture_output=True, text=True,
                       env=env, timeout=300)
    assert p.returncode == 0, p.stderr
    assert "2 ranks of 2 windows" in p.stderr

    def losses(d):
        rows = [json.loads(line) for line in (d / "metrics.jsonl").read_text().splitlines()]
        return [r.get("train_loss", r.get("val_loss")) for r in rows]
    np.testing.assert_allclose(losses(dp), losses(single), rtol=1e-6)
    a = gpt2s.AutoModelForCausalLM.from_pretrained(single)
    b = gpt2s.AutoModelForCausalLM.from_pretrained(dp)
    for name in a.params:
        np.testing.assert_allclose(b.params[name], a.params[name], atol=1e-4, err_msg=name)
