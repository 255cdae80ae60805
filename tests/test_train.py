"""python -m gpt2s.train: a short run learns and saves a loadable model, --steps is the total
and --resume continues to it with the same schedule and batches, resuming a different run is
refused, the warm-up is clamped, the progress shows no nan, --help documents every option,
every error is one line in generate's style, --data takes several files, globs and token
shards, metrics.jsonl and train_state.json are strict JSON, loss.png is drawn.  Also
AdamW.step(grad_scale, max_norm) against torch's AdamW + clip_grad_norm_ with accumulation.
(The SIGKILL + resume checks are in test_train_cli.py, the checkpoint protocol in
test_checkpoint.py.)"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import gpt2s
from gpt2s import train

DATA = Path(__file__).parent / "data" / "tinyshakespeare_excerpt.txt"
PROG = "python -m gpt2s.train"


@pytest.fixture(autouse=True)
def one_thread(restore_threads):
    """Tiny models run fastest on one thread (and the suite shares the machine)."""
    gpt2s.set_num_threads(1)


def run(tmp_path, *extra, data=(str(DATA),), out="run"):
    """A tiny in-process run; later options in `extra` override these."""
    return train.main([*data, "--init", "tiny", "--batch-size", "2", "--seq-len", "16",
                       "--warmup", "1", "--eval-every", "10", "--eval-batches", "1", "--quiet",
                       "--no-plot", "--out", str(tmp_path / out), *extra])


def metrics(out: Path) -> list[dict]:
    def no_constants(name):
        raise AssertionError(f"{name} in {out / 'metrics.jsonl'}: not JSON")
    return [json.loads(line, parse_constant=no_constants)
            for line in (out / "metrics.jsonl").read_text().splitlines()]


def train_rows(out: Path) -> list[dict]:
    return [r for r in metrics(out) if r["type"] == "train"]


def cli(tmp_path, *args, threads=1):
    return subprocess.run([sys.executable, "-m", "gpt2s.train", *args], capture_output=True,
                          text=True, cwd=tmp_path,
                          env={**os.environ, "OMP_NUM_THREADS": str(threads)})


# ------------------------------------------------------------------------------------------
# Training, saving, resuming


def test_short_run_learns_and_saves(tmp_path):
    assert run(tmp_path, "--steps", "40", "--lr", "3e-3", "--warmup", "5", "--batch-size", "4",
               "--seq-len", "32", "--log", str(tmp_path / "log.csv")) == 0
    out = tmp_path / "run"
    losses = [r["train_loss"] for r in train_rows(out)]
    assert len(losses) == 40
    assert np.mean(losses[-5:]) < np.mean(losses[:5]) - 1.0, losses
    m = gpt2s.GPT2.from_safetensors(out)
    assert m.config == gpt2s.GPT2Config.preset("tiny")
    for name in ("model.safetensors", "config.json", "optimizer.npz", "train_state.json",
                 "metrics.jsonl"):
        mode = stat.S_IMODE(os.stat(out / name).st_mode)
        assert mode & 0o044, f"{name} is not readable by others: {oct(mode)}"
    assert not [p for p in out.rglob("*") if p.name.endswith(".tmp")]
    # the CSV log: one row per step, validation loss on the evaluation steps only
    rows = [line.split(",") for line in (tmp_path / "log.csv").read_text().splitlines()]
    assert rows[0] == ["step", "lr", "train_loss", "val_loss", "tokens_per_s"]
    assert [int(r[0]) for r in rows[1:]] == list(range(1, 41))
    assert [int(r[0]) for r in rows[1:] if r[3]] == [10, 20, 30, 40]
    assert "nan" not in (tmp_path / "log.csv").read_text().lower()


def test_steps_is_the_total_and_a_finished_run_can_be_extended(tmp_path, capsys):
    """--steps counts every step of the run: a finished 5-step run resumed with --steps 8
    takes 3 more steps (not 8), on the 8-step schedule, and says the schedule changed."""
    from gpt2s.checkpoint import load_checkpoint
    assert run(tmp_path, "--steps", "8", "--warmup", "2", out="whole") == 0
    assert run(tmp_path, "--steps", "5", "--warmup", "2", out="five") == 0
    five = tmp_path / "five"
    assert json.loads((five / "train_state.json").read_text())["run"]["steps"] == 5
    capsys.readouterr()
    assert run(tmp_path, "--steps", "8", "--warmup", "2", "--resume", out="five") == 0
    assert "note: --steps is now 8 (was 5)" in capsys.readouterr().err
    assert load_checkpoint(five).step == 8
    # at the total already: nothing to do
    assert run(tmp_path, "--steps", "8", "--warmup", "2", "--resume", out="five") == 0
    assert "nothing to do" in capsys.readouterr().err
    a, b = train_rows(tmp_path / "whole"), train_rows(five)
    assert [r["step"] for r in b] == list(range(1, 9))
    # the first 5 steps had --steps 5 (a shorter schedule), the last 3 follow --steps 8
    assert [r["lr"] for r in b[5:]] == [r["lr"] for r in a[5:]]
    assert b[-1]["lr"] == pytest.approx(1e-3 * 0.1)


def test_resume_removes_what_a_kill_in_the_last_cleanup_left(tmp_path, capsys):
    """A kill after the last save's commit but during its cleanup leaves older or half-written
    checkpoint directories; no save follows when the run is already at --steps, so --resume
    itself removes them (and a refused --resume touches nothing)."""
    from gpt2s.checkpoint import load_checkpoint
    assert run(tmp_path, "--steps", "2", "--save-every", "1") == 0
    out = tmp_path / "run"
    ckdir = out / ".checkpoints"
    current = load_checkpoint(out).dir.name
    left = [ckdir / "step-00000001-abcdef", ckdir / ".partial-step-00000003-123456"]
    for d in left:
        d.mkdir()
        (d / "model.safetensors").write_bytes(b"partial")
    stray = [ckdir / ".current.0badc0de.tmp", out / ".model.safetensors.0badc0de.tmp"]
    stray[0].symlink_to(current)
    stray[1].write_bytes(b"x")
    planted = left + stray
    assert run(tmp_path, "--steps", "2", "--resume", "--seed", "8") == 2   # a different run
    assert all(os.path.lexists(p) for p in planted)
    capsys.readouterr()
    assert run(tmp_path, "--steps", "2", "--resume") == 0
    assert "nothing to do" in capsys.readouterr().err
    assert not any(os.path.lexists(p) for p in planted)
    assert sorted(p.name for p in ckdir.iterdir()) == sorted(["current", current])
    assert load_checkpoint(out).step == 2


def test_resume_of_a_stopped_run_is_bitwise_the_uninterrupted_run(tmp_path):
    assert run(tmp_path, "--steps", "6", "--grad-accum", "2", out="whole") == 0
    # the same run, stopped after its step-3 checkpoint (as a SIGTERM would stop it)
    out = tmp_path / "stopped"
    import signal
    calls = []
    from gpt2s import training   # the loop's module: its train_step is the one it calls
    real = training.train_step

    def stop_after_3(model, opt, data, cfg, step):
        result = real(model, opt, data, cfg, step)
        calls.append(step)
        if step == 2:
            os.kill(os.getpid(), signal.SIGTERM)   # handled: finish the step, save, stop
        return result
    training.train_step = stop_after_3
    try:
        assert run(tmp_path, "--steps", "6", "--grad-accum", "2", out="stopped") == 128 + 15
    finally:
        training.train_step = real
    assert calls == [0, 1, 2]
    assert json.loads((out / "train_state.json").read_text())["step"] == 3
    assert run(tmp_path, "--steps", "6", "--grad-accum", "2", "--resume", out="stopped") == 0
    a = gpt2s.GPT2.from_safetensors(tmp_path / "whole")
    b = gpt2s.GPT2.from_safetensors(out)
    for k in a.params:
        np.testing.assert_array_equal(a.params[k], b.params[k], err_msg=k)
    ra, rb = metrics(tmp_path / "whole"), metrics(out)
    drop = ("tokens_per_s", "elapsed_s")
    assert [{k: v for k, v in r.items() if k not in drop} for r in ra] == \
        [{k: v for k, v in r.items() if k not in drop} for r in rb]


def test_resume_truncates_rows_after_the_checkpoint(tmp_path):
    assert run(tmp_path, "--steps", "4", "--save-every", "2", "--eval-every", "1") == 0
    out = tmp_path / "run"
    # a run killed after logging steps 5 and 6 but before their checkpoint
    with open(out / "metrics.jsonl", "a") as f:
        f.write('{"type": "train", "step": 5, "lr": 1, "train_loss": 1}\n'
                '{"type": "eval", "step": 5, "val_loss": 1}\n{"type": "tr')
    assert run(tmp_path, "--steps", "6", "--resume", "--eval-every", "1") == 0
    rows = metrics(out)
    assert [r["step"] for r in rows if r["type"] == "train"] == [1, 2, 3, 4, 5, 6]
    assert [r["step"] for r in rows if r["type"] == "eval"] == [1, 2, 3, 4, 5, 6]
    assert rows[8]["train_loss"] != 1


@pytest.mark.parametrize("change, message", [
    (["--batch-size", "3"], "--batch-size 3"),
    (["--seq-len", "8"], "--seq-len 8"),
    (["--grad-accum", "2"], "--grad-accum 2"),
    (["--seed", "5"], "--seed 5"),
    (["--init", "mini"], "the model"),
    ("data", "the training data differ"),
])
def test_resume_refuses_a_different_run(tmp_path, capsys, change, message):
    assert run(tmp_path, "--steps", "2") == 0
    data = (str(DATA),)
    if change == "data":
        other = tmp_path / "other.txt"
        other.write_text(DATA.read_text()[:-100])
        data, change = (str(other),), []
    capsys.readouterr()
    assert run(tmp_path, "--steps", "3", "--resume", *change, data=data) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"{PROG}: error: --resume:") and message in err, err
    assert "--allow-changes" in err
    assert json.loads((tmp_path / "run" / "train_state.json").read_text())["step"] == 2
    # explicitly allowed: continues, and says what differs
    if change != ["--init", "mini"]:
        assert run(tmp_path, "--steps", "3", "--resume", "--allow-changes", *change,
                   data=data) == 0
        assert "warning: --allow-changes" in capsys.readouterr().err
        assert json.loads((tmp_path / "run" / "train_state.json").read_text())["step"] == 3


def test_a_new_run_never_overwrites_a_run_or_a_model(tmp_path, capsys):
    assert run(tmp_path, "--steps", "1") == 0
    assert run(tmp_path, "--steps", "1") == 2
    assert "already holds a run; continue it with --resume" in capsys.readouterr().err
    m = tmp_path / "model"
    gpt2s.GPT2.from_config(gpt2s.GPT2Config.preset("tiny")).save_safetensors(m)
    before = (m / "model.safetensors").read_bytes()
    assert run(tmp_path, "--steps", "1", out="model") == 2
    assert "already holds model.safetensors" in capsys.readouterr().err
    assert (m / "model.safetensors").read_bytes() == before


def test_fine_tune_from_a_model(tmp_path):
    base = tmp_path / "base"
    gpt2s.GPT2.from_config(gpt2s.GPT2Config.preset("tiny"), seed=3).save_safetensors(base)
    assert train.main([str(DATA), "--model", str(base), "--steps", "2", "--batch-size", "2",
                       "--seq-len", "16", "--eval-batches", "1", "--quiet", "--no-plot",
                       "--out", str(tmp_path / "ft")]) == 0
    state = json.loads((tmp_path / "ft" / "train_state.json").read_text())
    assert state["identity"]["model_source"] == f"model:{base.resolve()}"
    assert gpt2s.GPT2.from_safetensors(tmp_path / "ft").config == gpt2s.GPT2Config.preset("tiny")


# ------------------------------------------------------------------------------------------
# Schedule


def test_lr_schedule():
    lrs = [train.lr_at(s, 100, 1.0, 10, 0.1) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert lrs[-1] == pytest.approx(0.1)   # the last step reaches the floor
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))


@pytest.mark.parametrize("warmup, steps, expect", [(100, 100, 10), (150, 40, 4), (99, 100, 99),
                                                  (0, 5, 0), (7, 7, 0)])
def test_warmup_is_clamped_below_the_steps(warmup, steps, expect):
    got, warning = train.effective_warmup(warmup, steps)
    assert got == expect
    assert (warning is None) == (warmup < steps)
    lrs = [train.lr_at(s, steps, 1.0, got, 0.1) for s in range(steps)]
    assert lrs[-1] == pytest.approx(0.1)   # the schedule always decays to its floor


def test_warmup_clamp_is_reported_and_used(tmp_path, capsys):
    assert run(tmp_path, "--steps", "10", "--warmup", "100") == 0
    err = capsys.readouterr().err
    assert "warning: --warmup 100 is not below --steps 10" in err and "--warmup 1 " in err
    lrs = [r["lr"] for r in train_rows(tmp_path / "run")]
    assert lrs[0] == pytest.approx(1e-3) and lrs[-1] == pytest.approx(1e-4)
    state = json.loads((tmp_path / "run" / "train_state.json").read_text())
    assert state["run"]["warmup"] == 1


# ------------------------------------------------------------------------------------------
# Output: progress, metrics, plot, strict JSON


def test_progress_shows_the_last_validation_loss_and_never_nan(tmp_path, capsys):
    assert train.main([str(DATA), "--init", "tiny", "--batch-size", "2", "--seq-len", "16",
                       "--steps", "20", "--eval-every", "7", "--eval-batches", "1",
                       "--no-plot", "--out", str(tmp_path / "run")]) == 0
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("step ")]
    assert len(lines) >= 10   # a line every 5% when stderr is not a terminal
    assert "nan" not in err.lower(), err
    for line in lines:
        step = int(line.split()[1].split("/")[0])
        m = re.search(r"val (\d+\.\d+) \(step (\d+)\)", line)
        if step < 7:
            assert m is None, line
        else:
            assert m and int(m.group(2)) == step // 7 * 7 or (step == 20 and
                                                               int(m.group(2)) == 20), line


def test_metrics_and_train_state_are_strict_json_with_null_for_nan(tmp_path):
    """A last update that blows the weights up (huge learning rate, no clipping) after a
    finite training loss gives a NaN validation loss: it is null.  (A non-finite training
    loss stops the run instead: test_a_diverging_run_stops_and_saves_nothing.)"""
    assert run(tmp_path, "--steps", "1", "--lr", "1e30", "--grad-clip", "0", "--warmup", "0",
               "--eval-every", "1") == 0
    out = tmp_path / "run"
    rows = metrics(out)   # parse_constant rejects NaN and Infinity
    assert any(r.get("val_loss") is None for r in rows), rows
    text = (out / "train_state.json").read_text()
    state = json.loads(text, parse_constant=lambda c: pytest.fail(f"{c} in train_state.json"))
    assert state["last_val"] == {"step": 1, "loss": None}
    assert "NaN" not in text and "Infinity" not in text


def test_plot_is_written_and_has_content(tmp_path):
    pytest.importorskip("matplotlib")
    from matplotlib.image import imread
    assert train.main([str(DATA), "--init", "tiny", "--batch-size", "2", "--seq-len", "16",
                       "--steps", "8", "--eval-every", "4", "--eval-batches", "1",
                       "--warmup", "2", "--quiet", "--plot", "--out", str(tmp_path / "run")]) == 0
    png = tmp_path / "run" / "loss.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    img = imread(png)
    assert img.shape[:2] == (480, 800)
    # lines of three colours on a white background: the blue train loss, the orange
    # validation loss, the grey learning rate
    rgb = img[..., :3].reshape(-1, 3)
    blue = np.sum((rgb[:, 2] > 0.6) & (rgb[:, 0] < 0.3))
    orange = np.sum((rgb[:, 0] > 0.9) & (rgb[:, 1] > 0.4) & (rgb[:, 1] < 0.6) & (rgb[:, 2] < 0.2))
    assert blue > 200 and orange > 200, (blue, orange)
    # the plot function on its own, from the metrics file
    again = train.plot_metrics(tmp_path / "run" / "metrics.jsonl", tmp_path / "again.png")
    assert again.stat().st_size > 10_000


# ------------------------------------------------------------------------------------------
# Data: several files, globs, token shards


def test_data_from_several_files_globs_and_shards(tmp_path):
    from gpt2s.data import TokenData, write_shard
    text = DATA.read_text()
    parts = tmp_path / "parts"
    parts.mkdir()
    for i in range(3):
        (parts / f"part{i}.txt").write_text(text[i * len(text) // 3:(i + 1) * len(text) // 3])
    assert run(tmp_path, "--steps", "2", data=(str(parts / "part*.txt"),), out="glob") == 0
    assert train.main([str(parts / "part0.txt"), "--data", str(parts / "part1.txt"),
                       str(parts / "part2.txt"), "--init", "tiny", "--batch-size", "2",
                       "--seq-len", "16", "--steps", "2", "--eval-batches", "1", "--quiet",
                       "--no-plot", "--out", str(tmp_path / "files")]) == 0
    # the same three files, globbed or listed, are the same data
    fp = [json.loads((tmp_path / d / "train_state.json").read_text())["identity"]["train_data"]
          for d in ("glob", "files")]
    assert fp[0] == fp[1]
    # llm.c shards for training, a nanoGPT-style raw uint16 file for validation
    tokens = TokenData([DATA]).tokens()
    shards = tmp_path / "shards"
    shards.mkdir()
    write_shard(shards / "train_000000.bin", tokens[:5000])
    write_shard(shards / "train_000001.bin", tokens[5000:8000])
    tokens[8000:].astype("<u2").tofile(shards / "val.bin")
    assert train.main([str(shards / "train_*.bin"), "--val-data", str(shards / "val.bin"),
                       "--init", "tiny", "--batch-size", "2", "--seq-len", "16", "--steps", "3",
                       "--eval-every", "3", "--eval-batches", "1", "--quiet", "--no-plot",
                       "--out", str(tmp_path / "shardrun")]) == 0
    rows = metrics(tmp_path / "shardrun")
    assert [r["step"] for r in rows if r["type"] == "eval"] == [3]
    # the batches are the windows train_batch draws from exactly that corpus
    data = TokenData([shards / "train_000000.bin", shards / "train_000001.bin"])
    x, y = train.train_batch(data, 0, 0, 0, 4, 32)
    full = tokens[:8000]
    for row_x, row_y in zip(x, y):
        starts = [s for s in range(len(full) - 32) if np.array_equal(full[s:s + 32], row_x)]
        assert starts and np.array_equal(full[starts[0] + 1:starts[0] + 33], row_y)
    assert TokenData([shards / "train_*.bin"]).fingerprint == json.loads(
        (tmp_path / "shardrun" / "train_state.json").read_text())["identity"]["train_data"]


def test_batches_are_a_pure_function_of_seed_step_micro():
    from gpt2s.data import TokenData
    data = TokenData([DATA])
    a = train.train_batch(data, 1, 5, 0, 4, 16)
    b = train.train_batch(data, 1, 5, 0, 4, 16)
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[0][:, 1:], a[1][:, :-1])   # targets are shifted inputs
    for other in (train.train_batch(data, 2, 5, 0, 4, 16), train.train_batch(data, 1, 6, 0, 4, 16),
                  train.train_batch(data, 1, 5, 1, 4, 16), train.eval_batch(data, 1, 5, 4, 16)):
        assert not np.array_equal(a[0], other[0])


# ------------------------------------------------------------------------------------------
# Command line: help and errors


def _option_help(parser) -> dict:
    """{option string: its help text} as --help prints it."""
    text = parser.format_help()
    options = text.split("options:", 1)[1].split("\n\n", 1)[0]
    entries, current = {}, None
    for line in options.splitlines():
        m = re.match(r"  (-\S+)", line)
        if m:
            current = m.group(1).rstrip(",")
            first = line.strip().split("  ", 1)
            entries[current] = first[1].strip() if len(first) > 1 else ""
        elif current:
            entries[current] += " " + line.strip()
    return entries


def test_help_documents_every_option_with_its_real_default():
    parser = train.build_parser()
    shown = _option_help(parser)
    for action in parser._actions:
        if not action.option_strings or action.help == argparse.SUPPRESS:
            continue
        opt = action.option_strings[-1] if action.option_strings[-1].startswith("--") else \
            action.option_strings[0]
        key = next(s for s in action.option_strings if s in shown)
        help_text = re.sub(r"\s+", " ", shown[key])
        assert len(help_text) > 10, f"{opt} has no help text"
        if isinstance(action, (argparse._StoreTrueAction, argparse._HelpAction,
                               argparse._VersionAction)):
            continue
        defaults = re.findall(r"default: ([^;)]*)", help_text)
        if action.required:
            assert "default" not in help_text, f"{opt} is required but shows a default"
            continue
        assert len(defaults) == 1, f"{opt}: {help_text!r} shows {len(defaults)} defaults"
        if action.default not in (None, []):
            assert defaults[0] == str(action.default), (opt, defaults[0], action.default)
    assert "(default" not in shown["--out"]
    assert shown["--threads"].count("default") == 1
    epilog = parser.epilog
    for size in gpt2s.GPT2Config.presets():
        assert re.search(rf"^  {re.escape(size)} +\d+ layers", epilog, re.M), size
    assert "examples:" in epilog and f"{PROG} input.txt --init mini" in epilog


def test_help_runs_from_the_command_line(tmp_path):
    p = cli(tmp_path, "--help")
    assert p.returncode == 0 and "examples:" in p.stdout and "small-demo" in p.stdout


@pytest.mark.parametrize("args, message", [
    (["missing.txt", "--out", "OUT"], "missing.txt: no such file"),
    ([str(DATA), "--out", "OUT", "--init", "tiny", "--seq-len", "500"], "--seq-len 500"),
    ([str(DATA), "--out", "OUT", "--resume"], "--resume"),
    ([str(DATA), "--out", "OUT", "--steps", "0"], "--steps"),
    ([str(DATA), "--out", "OUT", "--warmup", "-1"], "--warmup"),
    ([str(DATA), "--out", "OUT", "--val-fraction", "1"], "--val-fraction"),
    ([str(DATA), "--out", "OUT", "--lr", "nan"], "--lr"),
    ([str(DATA)], "--out"),
    ([str(DATA), "--out", "OUT", "--bogus"], "--bogus"),
    (["--out", "OUT"], "no training data"),
    ([str(DATA), "--out", "OUT", "--model", "nowhere/model.safetensors"], "nowhere"),
    ([str(DATA), "--out", "OUT", "--threads", "0"], "--threads"),
    ([str(DATA), "--out", "OUT", "--allow-changes"], "--allow-changes"),
])
def test_errors_are_one_line_in_generates_style(tmp_path, args, message):
    args = [a.replace("OUT", str(tmp_path / "o")) for a in args]
    p = cli(tmp_path, *args)
    assert p.returncode == 2, p.stderr
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1, p.stderr
    assert lines[0].startswith(f"{PROG}: error: ") and message in lines[0], p.stderr
    assert "Traceback" not in p.stderr and "usage:" not in p.stderr
    assert not (tmp_path / "o").exists() or not any((tmp_path / "o").iterdir())


def test_generate_uses_the_same_error_style(tmp_path):
    """The style copied: generate's user errors are PROG: error: message, exit 2."""
    p = subprocess.run([sys.executable, "-m", "gpt2s.generate", "hi", "--top-p", "2"],
                       capture_output=True, text=True, cwd=tmp_path)
    assert p.returncode == 2 and p.stderr.startswith("python -m gpt2s.generate: error: ")


# ------------------------------------------------------------------------------------------
# The optimizer step of the loop: 1/grad_accum and clipping folded into the fused update


def _accumulated_grads(m, batches):
    m.zero_grad()
    for idx, targets in batches:
        m.forward(idx, targets)
        m.backward()


def test_step_grad_scale_equals_scaling_the_gradients_first(make_config, make_model,
                                                           make_batch):
    from gpt2s import AdamW
    cfg = make_config(n_layer=1, n_head=2, head_size=8, vocab_size=50, n_ctx=16)
    batches = [make_batch(cfg, 2, 16, seed=s) for s in range(3)]
    a, b = make_model(cfg, seed=1), make_model(cfg, seed=1)
    oa, ob = AdamW(a, lr=1e-2), AdamW(b, lr=1e-2)
    for _ in range(3):
        _accumulated_grads(a, batches)
        _accumulated_grads(b, batches)
        g_before = a.grads["wte.weight"].copy()
        oa.step(grad_scale=1 / 3)
        assert np.array_equal(a.grads["wte.weight"], g_before)   # gradients left alone
        for g in b.grads.values():
            g *= np.float32(1 / 3)
        ob.step()
        for k in a.params:
            np.testing.assert_array_equal(a.params[k], b.params[k], err_msg=k)
    with pytest.raises(ValueError, match="grad_scale"):
        oa.step(grad_scale=0.0)
    with pytest.raises(ValueError, match="max_norm"):
        oa.step(max_norm=-1.0)


@pytest.mark.parametrize("max_norm", [None, 0.05, 1e6], ids=["no-clip", "clip", "no-effect"])
def test_fused_accumulation_and_clipping_match_torch(make_config, make_model, make_batch,
                                                     make_hf_model, max_norm):
    """3 micro-batches per step, 4 steps: ours (gradients summed, 1/3 and the clip factor in
    the fused update) against torch (loss / 3 per micro-batch, clip_grad_norm_, AdamW)."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("transformers")
    import ref
    from gpt2s import AdamW
    cfg = make_config(n_layer=2, n_head=2, head_size=16, vocab_size=150, n_ctx=32)
    m = make_model(cfg, seed=3)
    hf = make_hf_model(cfg, {k: v.copy() for k, v in m.params.items()}, dtype="float32")
    opt = AdamW(m, lr=1e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    named = dict(hf.transformer.named_parameters())
    dec = set(opt.decayed)
    topt = torch.optim.AdamW(
        [{"params": [p for k, p in named.items() if k in dec], "weight_decay": 0.1},
         {"params": [p for k, p in named.items() if k not in dec], "weight_decay": 0.0}],
        lr=1e-3, betas=(0.9, 0.95), eps=1e-8)
    clipped = 0
    for step in range(4):
        micro = [make_batch(cfg, 2, 32, seed=10 * step + i, ignore_frac=0.1) for i in range(3)]
        _accumulated_grads(m, micro)
        norm = opt.step(grad_scale=1 / 3, max_norm=max_norm)
        topt.zero_grad()
        for idx, targets in micro:
            logits = hf(torch.from_numpy(idx)).logits
            loss = torch.nn.functional.cross_entropy(
                logits.reshape(-1, cfg.vocab_size), torch.from_numpy(targets).reshape(-1),
                ignore_index=-1)
            (loss / 3).backward()
        if max_norm is not None:
            tnorm = torch.nn.utils.clip_grad_norm_(hf.parameters(), max_norm).item()
            assert abs(norm - tnorm) < 1e-5 * tnorm
            clipped += norm > max_norm
        else:
            assert norm is None
        topt.step()
    if max_norm == 0.05:
        assert clipped == 4, "clipping never engaged: the test would prove nothing"
    C = cfg.n_embd
    for name, p in named.items():
        ours, theirs = m.params[name], p.detach().numpy()
        if name.endswith("attn.c_attn.bias"):   # see test_optim.compare_params
            ours = np.concatenate([ours[:C], ours[2 * C:]])
            theirs = np.concatenate([theirs[:C], theirs[2 * C:]])
        assert ref.rel_err(ours, theirs) < 1e-5, name


# ------------------------------------------------------------------------------------------
# The data of a resumed run: every byte counts, the name does not


def _settled(monkeypatch):
    """Data files count as settled (their hashes cacheable) 50 ms after their last change
    instead of 2 s; wait that long."""
    import time
    import gpt2s.data
    if hasattr(gpt2s.data, "FileHashes"):
        monkeypatch.setattr(gpt2s.data.FileHashes, "RACY_S", 0.05)
    time.sleep(0.06)


def _random_bin(path: Path, n: int, seed: int) -> Path:
    np.random.default_rng(seed).integers(0, 50257, n).astype(np.uint16).tofile(path)
    return path


def test_resume_refuses_a_same_size_edit_in_the_middle_naming_the_file(tmp_path, capsys,
                                                                       monkeypatch):
    data = _random_bin(tmp_path / "train.bin", 40_000, 0)
    _settled(monkeypatch)
    assert run(tmp_path, "--steps", "1", data=(str(data),)) == 0
    assert run(tmp_path, "--steps", "2", "--resume", data=(str(data),)) == 0
    # one token changed 40 KB into the 80 KB file, the size and the modification time kept
    # (the file's hash is cached in the run directory: the cache must not hide the edit)
    t = os.stat(data).st_mtime_ns
    raw = bytearray(data.read_bytes())
    raw[40_000] ^= 1
    data.write_bytes(bytes(raw))
    os.utime(data, ns=(t, t))
    capsys.readouterr()
    assert run(tmp_path, "--steps", "3", "--resume", data=(str(data),)) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert f"the training data differ: {data}: its content changed since the checkpoint " \
           f"(same size)" in err, err
    assert "the validation data differ" not in err     # the same file, named once
    assert json.loads((tmp_path / "run" / "train_state.json").read_text())["step"] == 2


def test_resume_reads_each_data_file_in_full_once(tmp_path, monkeypatch):
    """The content hash is computed once and cached in the run directory by the file's
    resolved path, size, times and inode: a resume does not read the data in full again."""
    import gpt2s.data
    data = _random_bin(tmp_path / "train.bin", 40_000, 0)
    _settled(monkeypatch)
    reads = []
    real = gpt2s.data.sha256_file
    monkeypatch.setattr(gpt2s.data, "sha256_file", lambda p: reads.append(p) or real(p))
    assert run(tmp_path, "--steps", "1", data=(str(data),)) == 0
    assert reads == [os.path.realpath(data)]
    cache = json.loads((tmp_path / "run" / ".data-hashes.json").read_text())
    assert list(cache["files"]) == [os.path.realpath(data)]
    assert run(tmp_path, "--steps", "2", "--resume", data=(str(data),)) == 0
    assert len(reads) == 1


def test_resume_accepts_the_same_data_under_another_name(tmp_path, capsys):
    (tmp_path / "a").mkdir()
    a = _random_bin(tmp_path / "a" / "train.bin", 20_000, 1)
    assert run(tmp_path, "--steps", "1", data=(str(a),)) == 0
    b = tmp_path / "b" / "renamed.bin"
    b.parent.mkdir()
    shutil.copyfile(a, b)
    a.unlink()
    assert run(tmp_path, "--steps", "2", "--resume", data=(str(b),)) == 0
    # another file of the same size is not
    np.fromfile(b, np.uint16)[::-1].tofile(b)
    capsys.readouterr()
    assert run(tmp_path, "--steps", "3", "--resume", data=(str(b),)) == 2
    assert f"{b}: its content changed since the checkpoint (same size)" in \
        capsys.readouterr().err


def _earlier_fingerprint(path: Path, kind: str, n_tokens: int, lo: int, hi: int) -> str:
    """The data fingerprint earlier gpt2s releases stored, written out from their definition:
    SHA-256 of the file's name, format, size and token count, its first 4 KiB and its last
    4 KiB (from byte 4096 on at least), then the token range; 16 hex digits."""
    import hashlib
    h = hashlib.sha256()
    raw = path.read_bytes()
    h.update(f"{path.name}\0{kind}\0{len(raw)}\0{n_tokens}\0".encode())
    h.update(raw[:4096])
    if len(raw) > 4096:
        h.update(raw[max(4096, len(raw) - 4096):])
    h.update(f"{lo}:{hi}".encode())
    return h.hexdigest()[:16]


def _rewrite_state(out: Path, edit):
    """Change the current checkpoint's train_state.json and its manifest entry to match."""
    import hashlib
    from gpt2s.checkpoint import load_checkpoint
    d = load_checkpoint(out).dir
    state = json.loads((d / "train_state.json").read_text())
    edit(state)
    raw = json.dumps(state, indent=1).encode()
    (d / "train_state.json").write_bytes(raw)
    manifest = json.loads((d / "manifest.json").read_text())
    manifest["files"]["train_state.json"] = {"size": len(raw),
                                             "sha256": hashlib.sha256(raw).hexdigest()}
    (d / "manifest.json").write_text(json.dumps(manifest))


def test_resume_of_a_checkpoint_with_the_earlier_fingerprint(tmp_path, capsys):
    """A checkpoint saved by an earlier release holds the weaker fingerprint: --resume checks
    the data against it, says so, and the next checkpoint records the content hashes; data
    that does not match it is refused."""
    from gpt2s.data import TokenData
    assert run(tmp_path, "--steps", "1", "--val-fraction", "0") == 0
    out = tmp_path / "run"
    n = len(TokenData(DATA))
    earlier = _earlier_fingerprint(DATA, "text", n, 0, n)

    def to_earlier(state, fp=earlier):
        ident = state["identity"]
        ident["train_data"] = fp
        ident.pop("train_files", None)
        ident.pop("val_files", None)
    _rewrite_state(out, to_earlier)
    capsys.readouterr()
    assert run(tmp_path, "--steps", "2", "--resume", "--val-fraction", "0") == 0
    err = capsys.readouterr().err
    assert "the checkpoint holds the fingerprint of an earlier gpt2s" in err and \
        "which matches" in err, err
    ident = json.loads((out / "train_state.json").read_text())["identity"]
    assert ident["train_data"].startswith("sha256:")
    assert ident["train_files"][0]["path"] == str(DATA)
    # an earlier fingerprint that does not match is refused, saying what it covered
    _rewrite_state(out, lambda s: to_earlier(s, "0123456789abcdef"))
    assert run(tmp_path, "--steps", "3", "--resume", "--val-fraction", "0") == 2
    err = capsys.readouterr().err
    assert "the training data differ (the checkpoint holds the fingerprint of an earlier " \
           "gpt2s, 0123456789abcdef" in err, err
    # validation data the checkpoint's run had (an earlier fingerprint) and this one has not
    _rewrite_state(out, lambda s: (to_earlier(s), s["identity"].update(
        val_data="fedcba9876543210")))
    assert run(tmp_path, "--steps", "3", "--resume", "--val-fraction", "0") == 2
    err = capsys.readouterr().err
    assert "the validation data differ (the checkpoint holds the fingerprint of an earlier " \
           "gpt2s, fedcba9876543210" in err, err


# ------------------------------------------------------------------------------------------
# The compute dtype of a resumed run


def _stopped_after(tmp_path, out, step, *extra):
    """The run of `extra` stopped after its checkpoint of step `step` + 1 (as SIGTERM stops it)."""
    import signal
    from gpt2s import training
    real = training.train_step

    def stop(model, opt, data, cfg, s):
        result = real(model, opt, data, cfg, s)
        if s == step:
            os.kill(os.getpid(), signal.SIGTERM)
        return result
    training.train_step = stop
    try:
        assert run(tmp_path, *extra, out=out) == 128 + 15
    finally:
        training.train_step = real


def test_resume_keeps_the_recorded_compute_dtype(tmp_path, capsys):
    """A run started with --compute-dtype bfloat16 records it; --resume without the option
    continues in bfloat16 (saying so), bitwise the uninterrupted bfloat16 run; the explicit
    same value is accepted silently; another one is refused by name (or, with
    --allow-changes, taken with a warning)."""
    bf = ("--steps", "4", "--compute-dtype", "bfloat16")
    assert run(tmp_path, *bf, out="whole") == 0
    assert json.loads((tmp_path / "whole" / "train_state.json").read_text())["run"][
        "compute_dtype"] == "bfloat16"
    out = tmp_path / "stopped"
    _stopped_after(tmp_path, "stopped", 1, *bf)
    assert json.loads((out / "train_state.json").read_text())["step"] == 2
    for name in ("again", "f32", "allowed", "explicit"):
        shutil.copytree(out, tmp_path / name, symlinks=True)
    capsys.readouterr()
    assert run(tmp_path, "--steps", "4", "--resume", out="stopped") == 0
    err = capsys.readouterr().err
    assert "note: --resume: the run continues with the checkpoint's --compute-dtype " \
           "bfloat16" in err, err
    a = gpt2s.GPT2.from_safetensors(tmp_path / "whole")
    b = gpt2s.GPT2.from_safetensors(out)
    for k in a.params:
        np.testing.assert_array_equal(a.params[k], b.params[k], err_msg=k)
    assert json.loads((out / "train_state.json").read_text())["run"][
        "compute_dtype"] == "bfloat16"
    # the same value given explicitly: no note, no refusal
    assert run(tmp_path, *bf, "--resume", out="explicit") == 0
    assert "compute-dtype" not in capsys.readouterr().err
    # another one, explicitly: refused, naming the option and both values
    assert run(tmp_path, "--steps", "4", "--resume", "--compute-dtype", "float32",
               out="f32") == 2
    err = capsys.readouterr().err
    assert "--compute-dtype float32 (the checkpoint's run used bfloat16)" in err, err
    assert "--allow-changes" in err
    assert run(tmp_path, "--steps", "4", "--resume", "--compute-dtype", "float32",
               "--allow-changes", out="allowed") == 0
    err = capsys.readouterr().err
    assert "warning: --allow-changes: --compute-dtype float32 (the checkpoint's run used " \
           "bfloat16)" in err, err
    assert json.loads((tmp_path / "allowed" / "train_state.json").read_text())["run"][
        "compute_dtype"] == "float32"
    # the float32 continuation is not the bfloat16 one
    c = gpt2s.GPT2.from_safetensors(tmp_path / "allowed")
    assert any(not np.array_equal(a.params[k], c.params[k]) for k in a.params)


def test_a_float32_run_resumed_with_bfloat16_is_refused(tmp_path, capsys):
    assert run(tmp_path, "--steps", "1") == 0
    assert json.loads((tmp_path / "run" / "train_state.json").read_text())["run"][
        "compute_dtype"] == "float32"
    capsys.readouterr()
    assert run(tmp_path, "--steps", "2", "--resume", "--compute-dtype", "bfloat16") == 2
    assert "--compute-dtype bfloat16 (the checkpoint's run used float32)" in \
        capsys.readouterr().err


def test_resume_of_a_checkpoint_without_a_compute_dtype(tmp_path, capsys):
    """A checkpoint of an earlier release records no compute dtype: not compared; the run
    continues in the one given (default float32) and records it from then on."""
    assert run(tmp_path, "--steps", "1") == 0
    _rewrite_state(tmp_path / "run", lambda state: state["run"].pop("compute_dtype"))
    capsys.readouterr()
    assert run(tmp_path, "--steps", "2", "--resume", "--compute-dtype", "bfloat16") == 0
    assert "compute-dtype" not in capsys.readouterr().err
    assert json.loads((tmp_path / "run" / "train_state.json").read_text())["run"][
        "compute_dtype"] == "bfloat16"


def test_compute_dtype_option_is_checked(tmp_path, capsys):
    with pytest.raises(SystemExit):
        run(tmp_path, "--compute-dtype", "float16")
    assert "--compute-dtype: expected one of float32, bfloat16, got 'float16'" in \
        capsys.readouterr().err
