"""python -m gpt2s.train: a short run lowers the loss, saves a loadable model atomically with
normal file permissions, resumes, and rejects bad input with exit code 2 and no traceback."""

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import gpt2s
from gpt2s import train

DATA = Path(__file__).parent / "data" / "tinyshakespeare_excerpt.txt"


def run(tmp_path, *extra):
    return train.main([str(DATA), "--init", "tiny", "--batch-size", "4", "--seq-len", "32",
                       "--eval-every", "10", "--eval-batches", "2", "--quiet",
                       "--out", str(tmp_path / "run"), "--log", str(tmp_path / "log.csv"),
                       *extra])


def test_short_run_learns_and_saves(tmp_path):
    assert run(tmp_path, "--steps", "40", "--lr", "3e-3", "--warmup", "5") == 0
    rows = [line.split(",") for line in (tmp_path / "log.csv").read_text().splitlines()[1:]]
    losses = [float(r[2]) for r in rows]
    assert len(losses) == 40
    assert np.mean(losses[-5:]) < np.mean(losses[:5]) - 1.0, losses
    out = tmp_path / "run"
    m = gpt2s.GPT2.from_safetensors(out)
    assert m.config == gpt2s.GPT2Config.preset("tiny")
    for name in ("model.safetensors", "config.json", "optimizer.npz", "train_state.json"):
        mode = stat.S_IMODE(os.stat(out / name).st_mode)
        assert mode & 0o044, f"{name} is not readable by others: {oct(mode)}"
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]


def test_resume_continues_the_step_count(tmp_path):
    assert run(tmp_path, "--steps", "5") == 0
    assert run(tmp_path, "--steps", "3", "--resume") == 0
    state = json.loads((tmp_path / "run" / "train_state.json").read_text())
    assert state["step"] == 8
    assert [h[0] for h in state["history"]] == list(range(1, 9))


def test_lr_schedule():
    lrs = [train.lr_at(s, 100, 1.0, 10, 0.1) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert lrs[-1] == pytest.approx(0.1, abs=1e-3)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))


@pytest.mark.parametrize("args, message", [
    (["missing.txt", "--out", "OUT"], "missing.txt"),
    ([str(DATA), "--out", "OUT", "--init", "tiny", "--seq-len", "500"], "--seq-len 500"),
    ([str(DATA), "--out", "OUT", "--resume"], "--resume"),
    ([str(DATA), "--out", "OUT", "--steps", "0"], "--steps"),
])
def test_bad_input_exits_2_without_traceback(tmp_path, args, message):
    args = [a.replace("OUT", str(tmp_path / "o")) for a in args]
    p = subprocess.run([sys.executable, "-m", "gpt2s.train", *args], capture_output=True,
                       text=True, cwd=tmp_path, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert p.returncode == 2, p.stderr
    assert message in p.stderr
    assert "Traceback" not in p.stderr
