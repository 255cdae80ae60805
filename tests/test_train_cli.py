"""python -m gpt2s.train killed with SIGKILL at random instants, then resumed (several times),
ends bitwise equal to the run that was never stopped: same weights, same optimizer state, one
metrics row per step with the same losses.  Each process is a real subprocess killed by
os.kill(pid, SIGKILL): no handler runs, so this is what a crash or an OOM kill leaves.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

DATA = Path(__file__).parent / "data" / "tinyshakespeare_excerpt.txt"


def _args(out: Path, steps: int, extra=()):
    return [sys.executable, "-m", "gpt2s.train", str(DATA), "--init", "tiny", "--steps",
            str(steps), "--batch-size", "2", "--seq-len", "16", "--grad-accum", "2",
            "--warmup", "2", "--eval-every", "3", "--eval-batches", "1", "--save-every", "1",
            "--seed", "7", "--no-plot", "--quiet", "--out", str(out), *extra]


def _env(threads: int):
    return {**os.environ, "OMP_NUM_THREADS": str(threads)}


def _final_state(out: Path):
    from gpt2s import GPT2, AdamW
    from gpt2s.checkpoint import load_checkpoint
    ck = load_checkpoint(out)
    m = GPT2.from_safetensors(ck.dir)
    opt = AdamW(m)
    opt.load(ck.path("optimizer.npz"))
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return ck, m, opt, rows


def _mid_save(out: Path) -> bool:
    """Whether a kill left a save unfinished (a checkpoint directory that is not current)."""
    ck = out / ".checkpoints"
    if not ck.is_dir():
        return False
    current = os.readlink(ck / "current") if (ck / "current").is_symlink() else None
    return any(p.name not in ("current", current) for p in ck.iterdir())


def _train_rows(out: Path) -> int:
    """The last step with a row in metrics.jsonl (0 if none)."""
    try:
        text = (out / "metrics.jsonl").read_text()
    except FileNotFoundError:
        return 0
    steps = [json.loads(line)["step"] for line in text.splitlines(keepends=True)
             if line.endswith("\n")]
    return max(steps, default=0)


def _checkpoint_step(out: Path) -> int:
    try:
        return json.loads((out / "train_state.json").read_text())["step"]
    except (FileNotFoundError, json.JSONDecodeError):
        return 0


def kill_and_resume(tmp_path: Path, steps: int, kills: int, threads: int, seed: int,
                    kill_in_startup: float = 0.0):
    """Run uninterrupted, then the same run killed `kills` times and resumed each time;
    compare.  Each kill waits until the run has logged a step at least one past its last
    checkpoint, then a random fraction of a step's time longer, so it lands anywhere in a
    step, an evaluation or a save; with probability `kill_in_startup` it lands at a random
    instant of the start-up instead.  Returns (kills made, kills that hit a save, steps
    resumed at); fewer kills than asked are made when the run finishes first."""
    ref = tmp_path / "ref"
    t0 = time.perf_counter()
    subprocess.run(_args(ref, steps), env=_env(threads), check=True, capture_output=True)
    duration = time.perf_counter() - t0
    rows = [json.loads(line) for line in (ref / "metrics.jsonl").read_text().splitlines()]
    step_time = [r for r in rows if r["type"] == "train"][-1]["elapsed_s"] / steps
    startup = max(0.1, duration - step_time * steps)

    out = tmp_path / "killed"
    rnd = random.Random(seed)
    hit_save, killed, resumed_at, done = 0, 0, [], False
    for k in range(kills + 1):
        resume = (out / ".checkpoints" / "current").is_symlink()
        at = json.loads((out / "train_state.json").read_text())["step"] if resume else 0
        if resume:
            resumed_at.append(at)
        # a kill during the first save, after its checkpoint directory is complete but before
        # it is current, leaves a previous run that a new run starts over only when told
        restart = ["--resume"] if resume else ["--overwrite"] if k else []
        p = subprocess.Popen(_args(out, steps, restart),
                             env=_env(threads), stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, text=True)
        if k == kills:
            _, err = p.communicate(timeout=600)
            assert p.returncode == 0, err
            done = True
            break
        target = min(steps, at + rnd.choice((1, 2)))
        if rnd.random() < kill_in_startup:
            time.sleep(rnd.uniform(0, startup))
        elif rnd.random() < 0.5:
            # after a step's metrics row: in its evaluation, its save or the next step
            while p.poll() is None and _train_rows(out) < target:
                time.sleep(0.01)
            time.sleep(rnd.uniform(0, 1.5 * step_time))
        else:
            # after a committed checkpoint: in the save's cleanup or the next step's compute
            while p.poll() is None and _checkpoint_step(out) < target:
                time.sleep(0.01)
            time.sleep(rnd.uniform(0, 0.5 * step_time))
        if p.poll() is not None:
            assert p.returncode == 0, p.stderr.read()
            done = True   # finished before the kill: the remaining kills have nothing to hit
            break
        os.kill(p.pid, signal.SIGKILL)
        p.wait()
        if p.returncode == 0:
            # it finished between the poll and the signal (a fast machine's last step): the
            # run is complete, as when it finishes before the poll
            done = True
            break
        assert p.returncode == -signal.SIGKILL, p.stderr.read()
        killed += 1
        hit_save += _mid_save(out)
        p.stderr.close()
    assert done

    ck_a, m_a, opt_a, rows_a = _final_state(ref)
    ck_b, m_b, opt_b, rows_b = _final_state(out)
    assert ck_a.step == ck_b.step == steps
    for name in m_a.params:
        np.testing.assert_array_equal(m_b.params[name], m_a.params[name], err_msg=name)
    np.testing.assert_array_equal(opt_b.m, opt_a.m)
    np.testing.assert_array_equal(opt_b.v, opt_a.v)
    assert opt_b.t == opt_a.t == steps
    # exactly one row per step and per evaluation, with the same losses
    strip = [{k: v for k, v in r.items() if k not in ("tokens_per_s", "elapsed_s")}
             for r in rows_b]
    assert strip == [{k: v for k, v in r.items() if k not in ("tokens_per_s", "elapsed_s")}
                     for r in rows_a]
    assert [r["step"] for r in rows_b if r["type"] == "train"] == list(range(1, steps + 1))
    # the last successful save removed whatever the kills left
    assert not _mid_save(out)
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in ref.iterdir())
    return killed, hit_save, resumed_at


def test_sigkill_at_random_instants_then_resume_is_bitwise_exact(tmp_path):
    """3 kills of a 6-step run (2 micro-batches per step, a checkpoint every step)."""
    killed, hit_save, resumed_at = kill_and_resume(tmp_path, steps=6, kills=3, threads=1, seed=0)
    print(f"{killed} kills, {hit_save} during a save, resumed at steps {resumed_at}")
    assert resumed_at, "no kill happened after a checkpoint"


@pytest.mark.slow
@pytest.mark.parametrize("threads", [1, 2])
def test_many_sigkills_then_resume_is_bitwise_exact(tmp_path, threads):
    """12 kills of a 12-step run, on 1 and on 2 threads; at least one resume must have
    started from a checkpoint (else nothing was tested)."""
    killed, hit_save, resumed_at = kill_and_resume(tmp_path, steps=12, kills=12,
                                                   threads=threads, seed=threads,
                                                   kill_in_startup=0.15)
    print(f"{killed} kills on {threads} threads, {hit_save} during a save, resumed at "
          f"{resumed_at}")
    assert resumed_at, "no kill happened after a checkpoint"
