"""python -m gpt2s.train and its run directory: one trainer at a time (an advisory lock that
dies with its process), nothing written or deleted through a symlink out of the directory,
cleanup that deletes only the checkpoint code's own names, and a new run that never replaces a
previous one unless told (--overwrite).  Every symlink case keeps a sentinel file outside the
run directory that must survive."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import gpt2s
from gpt2s import train

DATA = Path(__file__).parent / "data" / "tinyshakespeare_excerpt.txt"
PROG = "python -m gpt2s.train"
SUBPROCESS_TIMEOUT = 300   # seconds: turns a hang into a failure


@pytest.fixture(autouse=True)
def one_thread(restore_threads):
    gpt2s.set_num_threads(1)


def run(out: Path, *extra):
    """A tiny in-process run; later options in `extra` override these."""
    plot = [] if "--plot" in extra or "--no-plot" in extra else ["--no-plot"]
    return train.main([str(DATA), "--init", "tiny", "--batch-size", "2", "--seq-len", "16",
                       "--warmup", "1", "--eval-every", "10", "--eval-batches", "1", "--quiet",
                       *plot, "--steps", "2", "--out", str(out), *extra])


def cli_args(out: Path, *extra) -> list[str]:
    return ["-m", "gpt2s.train", str(DATA), "--init", "tiny", "--batch-size", "2", "--seq-len",
            "16", "--warmup", "1", "--eval-every", "10", "--eval-batches", "1", "--quiet",
            "--no-plot", "--out", str(out), *extra]


def env1():
    return {**os.environ, "OMP_NUM_THREADS": "1"}


def one_error_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"{PROG}: error: "), err
    assert "Traceback" not in err
    return lines[0]


def tree(path: Path) -> dict:
    """Every entry under path (links not followed): relative name -> link target, file bytes
    or None for a directory."""
    found = {}
    for root, dirs, files in os.walk(path):
        for name in dirs + files:
            p = Path(root) / name
            rel = str(p.relative_to(path))
            if p.is_symlink():
                found[rel] = "-> " + os.readlink(p)
            elif p.is_dir():
                found[rel] = None
            else:
                found[rel] = p.read_bytes()
    return found


def sentinel_dir(tmp_path: Path) -> Path:
    """A user's directory outside the run directory: notes.txt and photos/cat.jpg."""
    d = tmp_path / "users_files"
    (d / "photos").mkdir(parents=True)
    (d / "notes.txt").write_text("keep me")
    (d / "photos" / "cat.jpg").write_bytes(b"\xff\xd8 cat")
    return d


def assert_sentinels(d: Path):
    assert (d / "notes.txt").read_text() == "keep me"
    assert (d / "photos" / "cat.jpg").read_bytes() == b"\xff\xd8 cat"


def checkpoint_step(out: Path) -> int:
    from gpt2s.checkpoint import load_checkpoint
    return load_checkpoint(out).step


# ------------------------------------------------------------------------------------------
# One writer per run directory


def _hold_lock(path: Path, pid_text: str):
    """Hold an flock on path as a trainer would (another open file description than any the
    trainer opens, so it conflicts with the trainer's even in this process)."""
    import fcntl
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    os.write(fd, pid_text.encode())
    return fd


@pytest.mark.skipif(os.name != "posix", reason="the test holds the lock with fcntl.flock")
def test_a_locked_run_directory_is_refused_naming_the_holder(tmp_path, capsys):
    out = tmp_path / "run"
    assert run(out) == 0
    before = tree(out)
    fd = _hold_lock(out / ".lock", "424242\n")
    try:
        capsys.readouterr()
        assert run(out, "--resume", "--steps", "3") == 2
        line = one_error_line(capsys.readouterr().err)
        assert f"--out {out}" in line and "PID 424242" in line, line
        assert tree(out) == {**before, ".lock": b"424242\n"}   # touched nothing
        # a fresh run and --overwrite are refused the same way, before anything else
        assert run(out, "--overwrite") == 2
        assert "PID 424242" in one_error_line(capsys.readouterr().err)
        assert tree(out) == {**before, ".lock": b"424242\n"}
    finally:
        os.close(fd)
    # released: the next trainer takes the lock, runs, and removes the lock file at the end
    assert run(out, "--resume", "--steps", "3") == 0
    assert checkpoint_step(out) == 3
    assert not os.path.lexists(out / ".lock")


def _start_trainer(out: Path, *extra):
    return subprocess.Popen([sys.executable, *cli_args(out, *extra)], env=env1(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def _wait_for(predicate, p, what: str, timeout=SUBPROCESS_TIMEOUT):
    deadline = time.monotonic() + timeout
    while not predicate():
        if p.poll() is not None:
            pytest.fail(f"the trainer ended ({p.returncode}) before {what}: {p.stderr.read()}")
        if time.monotonic() > deadline:
            p.kill()
            pytest.fail(f"no {what} after {timeout} s")
        time.sleep(0.005)


def _lock_holder(out: Path):
    try:
        text = (out / ".lock").read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def test_a_killed_trainer_leaves_no_stale_lock(tmp_path):
    """The lock is the process's: SIGKILL (no handler runs) leaves the lock file with the dead
    trainer's PID, and the next trainer simply takes it."""
    out = tmp_path / "run"
    p = _start_trainer(out, "--steps", "100000", "--save-every", "1")
    try:
        _wait_for(lambda: _lock_holder(out) == p.pid, p, "lock file naming the trainer")
        _wait_for(lambda: (out / ".checkpoints" / "current").is_symlink(), p, "checkpoint")
        # while it runs, a second trainer is refused naming it
        second = subprocess.run([sys.executable, *cli_args(out, "--resume", "--steps", "100000")],
                                env=env1(), capture_output=True, text=True,
                                timeout=SUBPROCESS_TIMEOUT)
        assert second.returncode == 2, second.stderr
        assert f"PID {p.pid}" in one_error_line(second.stderr)
    finally:
        os.kill(p.pid, signal.SIGKILL)
        p.wait(timeout=SUBPROCESS_TIMEOUT)
        p.stderr.close()
    assert _lock_holder(out) == p.pid          # the file stays, naming a dead process
    step = checkpoint_step(out)
    r = subprocess.run([sys.executable, *cli_args(out, "--resume", "--steps", str(step + 1))],
                       env=env1(), capture_output=True, text=True, timeout=SUBPROCESS_TIMEOUT)
    assert r.returncode == 0, r.stderr
    assert checkpoint_step(out) == step + 1


_GO = """
import os, sys, time
from gpt2s import train               # the slow imports, before the start line
ready, go = sys.argv[1], sys.argv[2]
open(ready, "w").close()
while not os.path.exists(go):
    time.sleep(0.0005)
sys.exit(train.main(sys.argv[3:]))
"""


def two_trainers_at_once(tmp_path: Path, trial: int):
    """Start two trainers on one fresh --out at the same instant (both wait, imports done, for
    one start file): exactly one runs to the end, the other is refused naming its PID, and
    the directory holds one run that loads."""
    out = tmp_path / f"run{trial}"
    go = tmp_path / f"go{trial}"
    procs = []
    for i in range(2):
        ready = tmp_path / f"ready{trial}-{i}"
        procs.append((ready, subprocess.Popen(
            [sys.executable, "-c", _GO, str(ready), str(go), *cli_args(out, "--steps", "30",
                                                                        "--save-every", "1")[2:]],
            env=env1(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)))
    for ready, p in procs:
        _wait_for(ready.exists, p, "start line")
    go.touch()
    results = []
    for _, p in procs:
        _, err = p.communicate(timeout=SUBPROCESS_TIMEOUT)
        results.append((p.pid, p.returncode, err))
    codes = sorted(code for _, code, _ in results)
    assert codes == [0, 2], results
    (winner, _, _), = [r for r in results if r[1] == 0]
    (_, _, err), = [r for r in results if r[1] == 2]
    line = one_error_line(err)
    assert f"--out {out}" in line and f"PID {winner}" in line, line
    # one run's checkpoint and metrics, nothing of the other's
    m = gpt2s.GPT2.from_safetensors(out)
    assert m.config == gpt2s.GPT2Config.preset("tiny")
    assert checkpoint_step(out) == 30
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r["type"] == "train"] == list(range(1, 31))
    ck = out / ".checkpoints"
    assert sorted(os.listdir(ck)) == sorted(["current", os.readlink(ck / "current")])
    assert not os.path.lexists(out / ".lock")


def test_two_trainers_started_together(tmp_path):
    for trial in range(2):
        two_trainers_at_once(tmp_path, trial)


@pytest.mark.slow
def test_two_trainers_started_together_20_times(tmp_path):
    for trial in range(20):
        two_trainers_at_once(tmp_path, trial)


# ------------------------------------------------------------------------------------------
# Symlinks: never written or deleted through


def test_a_checkpoints_symlink_is_refused_and_its_target_kept(tmp_path, capsys):
    """OUT/.checkpoints -> a user's directory: a new run, --overwrite and --resume all refuse,
    naming it; the user's files survive (a save's cleanup used to empty the directory)."""
    users = sentinel_dir(tmp_path)
    out = tmp_path / "run"
    out.mkdir()
    (out / ".checkpoints").symlink_to(users)
    for extra in ([], ["--overwrite"], ["--resume"]):
        capsys.readouterr()
        assert run(out, *extra) == 2, extra
        line = one_error_line(capsys.readouterr().err)
        assert f"{out / '.checkpoints'}: a symlink" in line, line
        assert_sentinels(users)
        assert sorted(os.listdir(users)) == ["notes.txt", "photos"]
        assert sorted(os.listdir(out)) == [".checkpoints"]


def _move_current_outside(out: Path, elsewhere: Path) -> Path:
    """Replace the current checkpoint directory by a symlink to a copy outside OUT."""
    ck = out / ".checkpoints"
    name = os.readlink(ck / "current")
    elsewhere.mkdir()
    target = elsewhere / name
    shutil.move(ck / name, target)
    (ck / name).symlink_to(target)
    return ck / name


def test_resume_refuses_a_checkpoint_directory_that_is_a_symlink(tmp_path, capsys):
    """current -> step-X, and step-X is a symlink out of OUT: --resume refuses naming it (it
    used to unlink the link, say "nothing to do" and exit 0 with no loadable checkpoint)."""
    out = tmp_path / "run"
    assert run(out) == 0
    link = _move_current_outside(out, tmp_path / "elsewhere")
    target = Path(os.readlink(link))
    (target / "sentinel.txt").write_text("keep me")
    before = tree(tmp_path / "elsewhere")
    for extra in (["--steps", "2"], ["--steps", "3"]):
        capsys.readouterr()
        assert run(out, "--resume", *extra) == 2
        line = one_error_line(capsys.readouterr().err)
        assert f"{link}: a symlink" in line, line
        assert link.is_symlink() and os.readlink(link) == str(target)
        assert tree(tmp_path / "elsewhere") == before
    # a new run and --overwrite refuse it too
    for extra in ([], ["--overwrite"]):
        assert run(out, *extra) == 2
        assert f"{link}: a symlink" in one_error_line(capsys.readouterr().err)
        assert tree(tmp_path / "elsewhere") == before
        assert link.is_symlink()


def test_resume_refuses_a_current_link_that_leaves_the_checkpoints(tmp_path, capsys):
    """current must name a checkpoint directory beside it: not "..", not a link of the
    user's in .checkpoints, not a path out of it."""
    users = sentinel_dir(tmp_path)
    out = tmp_path / "run"
    assert run(out) == 0
    ck = out / ".checkpoints"
    (ck / "users").symlink_to(users)
    for target in ("..", "users", "../../elsewhere", str(users),
                   "step-00000002-abcdef/../.."):
        os.unlink(ck / "current")
        (ck / "current").symlink_to(target)
        capsys.readouterr()
        assert run(out, "--resume", "--steps", "3") == 2
        line = one_error_line(capsys.readouterr().err)
        assert f"{ck / 'current'}" in line and f"points to {target!r}" in line, line
        assert_sentinels(users)
        assert sorted(os.listdir(users)) == ["notes.txt", "photos"]
        assert os.readlink(ck / "current") == target


@pytest.mark.parametrize("name", ["model.safetensors", "config.json", "optimizer.npz",
                                  "train_state.json"])
def test_a_run_link_pointing_elsewhere_is_refused(tmp_path, capsys, name):
    out = tmp_path / "run"
    assert run(out) == 0
    victim = tmp_path / f"victim-{name}"
    victim.write_bytes(b"a user's file")
    os.unlink(out / name)
    (out / name).symlink_to(victim)
    for extra in (["--resume", "--steps", "3"], ["--overwrite"]):
        capsys.readouterr()
        assert run(out, *extra) == 2
        line = one_error_line(capsys.readouterr().err)
        assert f"{out / name}: a link to {str(victim)!r}" in line, line
        assert victim.read_bytes() == b"a user's file"
        assert os.readlink(out / name) == str(victim)


@pytest.mark.parametrize("name", ["metrics.jsonl", "loss.png"])
def test_metrics_and_plot_must_not_be_symlinks(tmp_path, capsys, name):
    """A metrics.jsonl link to an empty file of the user's used to receive the run's rows."""
    if name == "loss.png":
        pytest.importorskip("matplotlib", reason="--plot needs matplotlib (the wheel check's "
                                                 "venv has none; the main suite's has)")
    victim = tmp_path / "victim"
    victim.write_bytes(b"")
    out = tmp_path / "run"
    out.mkdir()
    (out / name).symlink_to(victim)
    assert run(out, *(["--plot"] if name == "loss.png" else [])) == 2
    line = one_error_line(capsys.readouterr().err)
    assert f"{out / name}: a symlink" in line, line
    assert victim.read_bytes() == b""
    assert sorted(os.listdir(out)) == [name]


def test_cleanup_deletes_only_the_checkpoint_codes_own_names(tmp_path):
    """Files a user keeps in .checkpoints and in OUT survive saves and --resume; the
    leftovers the checkpoint code names itself go."""
    out = tmp_path / "run"
    assert run(out, "--save-every", "1") == 0
    ck = out / ".checkpoints"
    users = sentinel_dir(tmp_path)
    kept = {ck / "notes.txt": b"mine", ck / "step-notes": b"mine too", out / "README": b"run 1",
            ck / "step-00000001-abcdef.bak": b"a backup", out / ".model.safetensors.bak": b"x"}
    for p, data in kept.items():
        p.write_bytes(data)
    (ck / "photos").mkdir()
    (ck / "photos" / "cat.jpg").write_bytes(b"cat")
    (ck / "link-to-mine").symlink_to(users)
    ours = [ck / "step-00000001-abcdef", ck / ".partial-step-00000003-123456"]
    for d in ours:
        d.mkdir()
        (d / "model.safetensors").write_bytes(b"partial")
    assert run(out, "--resume", "--steps", "4", "--save-every", "1") == 0
    assert not any(os.path.lexists(d) for d in ours)
    for p, data in kept.items():
        assert p.read_bytes() == data, p
    assert (ck / "photos" / "cat.jpg").read_bytes() == b"cat"
    assert os.readlink(ck / "link-to-mine") == str(users)
    assert_sentinels(users)
    assert checkpoint_step(out) == 4


# ------------------------------------------------------------------------------------------
# A new run over a previous one


def test_a_new_run_refuses_step_directories_without_current(tmp_path, capsys):
    """A run whose current link is missing (a save killed before its first commit, or a
    damaged run) still holds checkpoints: a new run refuses instead of deleting them."""
    out = tmp_path / "run"
    assert run(out, "--save-every", "1") == 0
    ck = out / ".checkpoints"
    os.unlink(ck / "current")
    before = tree(out)
    steps = [n for n in os.listdir(ck) if n.startswith("step-")]
    assert steps
    capsys.readouterr()
    assert run(out) == 2
    line = one_error_line(capsys.readouterr().err)
    assert "already holds a run" in line and "--resume" in line and "--overwrite" in line
    assert str(ck / steps[0]) in line, line
    assert tree(out) == before
    # --resume cannot continue it (no current) and says how to start over
    assert run(out, "--resume") == 2
    line = one_error_line(capsys.readouterr().err)
    assert "does not exist" in line and "--overwrite" in line, line
    assert tree(out) == before


def test_overwrite_starts_over_and_deletes_only_the_previous_runs_files(tmp_path, capsys):
    pytest.importorskip("matplotlib", reason="the run draws loss.png with --plot, which needs "
                                             "matplotlib (the wheel check's venv has none)")
    users = sentinel_dir(tmp_path)
    out = tmp_path / "run"
    assert run(out, "--steps", "3", "--save-every", "1", "--plot") == 0
    ck = out / ".checkpoints"
    old_dirs = [n for n in os.listdir(ck) if n.startswith("step-")]
    (out / "notes.txt").write_text("mine")
    (ck / "notes.txt").write_text("mine too")
    (out / "link-to-mine").symlink_to(users)
    os.unlink(ck / "current")          # also without its current link
    capsys.readouterr()
    assert run(out, "--steps", "2", "--overwrite", "--seed", "5") == 0
    err = capsys.readouterr().err
    assert "--overwrite: deleted the previous run's" in err and "metrics.jsonl" in err
    assert not os.path.lexists(out / "loss.png")
    assert not any(os.path.lexists(ck / n) for n in old_dirs)
    assert (out / "notes.txt").read_text() == "mine"
    assert (ck / "notes.txt").read_text() == "mine too"
    assert os.readlink(out / "link-to-mine") == str(users)
    assert_sentinels(users)
    # a new run: its own step count, seed and metrics only
    state = json.loads((out / "train_state.json").read_text())
    assert state["step"] == 2 and state["run"]["seed"] == 5
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r["type"] == "train"] == [1, 2]
    assert gpt2s.GPT2.from_safetensors(out).config == gpt2s.GPT2Config.preset("tiny")


def test_overwrite_never_deletes_a_model_that_is_not_a_run(tmp_path, capsys):
    m = tmp_path / "model"
    gpt2s.GPT2.from_config(gpt2s.GPT2Config.preset("tiny")).save_safetensors(m)
    before = tree(m)
    assert run(m, "--overwrite") == 2
    assert "already holds model.safetensors" in one_error_line(capsys.readouterr().err)
    assert tree(m) == before
    assert run(m, "--overwrite", "--resume") == 2
    assert "--overwrite" in one_error_line(capsys.readouterr().err)


def test_help_documents_overwrite():
    text = train.build_parser().format_help()
    assert "--overwrite" in text and "metrics.jsonl and loss.png" in " ".join(text.split())
