"""python -m gpt2s.train when a run cannot go on: a full disk, a read-only or unwritable run
directory and a permission error are one line naming the file and the cause (no traceback),
exit status 1, and a save that fails removes its partial checkpoint at once, leaving the
previous one current; a diverging run (non-finite loss or gradient norm) stops at that step
and saves nothing, on one process and under MPI on every rank.

The tests run as root here, where chmod makes nothing read-only: the errors are injected at the
os layer in-process, and a real one comes from RLIMIT_FSIZE in a subprocess (EFBIG on a write
past the limit, with SIGXFSZ ignored)."""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

import gpt2s
from gpt2s import train

DATA = Path(__file__).parent / "data" / "tinyshakespeare_excerpt.txt"
PROG = "python -m gpt2s.train"
SUBPROCESS_TIMEOUT = 300


@pytest.fixture(autouse=True)
def one_thread(restore_threads):
    gpt2s.set_num_threads(1)


def args(out: Path, *extra) -> list[str]:
    return [str(DATA), "--init", "tiny", "--batch-size", "2", "--seq-len", "16", "--warmup",
            "1", "--eval-every", "10", "--eval-batches", "1", "--quiet", "--no-plot", "--out",
            str(out), *extra]


def run(out: Path, *extra):
    return train.main(args(out, "--steps", "1", *extra))


def error_line(err: str) -> str:
    """The one line of an error exit: the last line of stderr (a run prints its model and
    data first), no traceback."""
    assert "Traceback" not in err, err
    lines = [line for line in err.strip().splitlines() if line.startswith(f"{PROG}: error:")]
    assert len(lines) == 1, err
    assert err.strip().splitlines()[-1] == lines[0], err
    return lines[0]


def checkpoint_entries(out: Path) -> list[str]:
    return sorted(os.listdir(out / ".checkpoints"))


def assert_only_checkpoint_of(out: Path, step: int):
    """The checkpoint of `step` is current and loads, and nothing else is in .checkpoints (no
    partial directory left for the next save)."""
    from gpt2s.checkpoint import load_checkpoint
    ck = load_checkpoint(out)
    assert ck.step == step
    assert checkpoint_entries(out) == sorted(["current", ck.dir.name])
    gpt2s.GPT2.from_safetensors(out)


# ------------------------------------------------------------------------------------------
# Write errors


def test_disk_full_during_a_save_is_one_line_and_leaves_the_previous_checkpoint(
        tmp_path, capsys, monkeypatch):
    """The optimizer state's write fails half-way as a full disk fails it (an OSError without
    a file name, from the write itself)."""
    import gpt2s.optim
    out = tmp_path / "run"
    assert run(out) == 0
    real = gpt2s.optim.atomic_write

    def disk_full(dest, write):
        def half(f):
            f.write(b"\0" * 4096)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(dest, half)
    monkeypatch.setattr(gpt2s.optim, "atomic_write", disk_full)
    capsys.readouterr()
    assert run(out, "--resume", "--steps", "2") == 1
    line = error_line(capsys.readouterr().err)
    assert "optimizer.npz: No space left on device" in line, line
    assert f"{out}" in line and "the checkpoint of step 2 was not saved" in line
    assert "keeps the checkpoint of step 1" in line
    assert_only_checkpoint_of(out, 1)
    monkeypatch.undo()
    assert run(out, "--resume", "--steps", "2") == 0     # the space is back: it continues
    assert_only_checkpoint_of(out, 2)


@pytest.fixture
def unwritable(monkeypatch):
    """unwritable(dir, errno): creating or opening for writing anything under dir fails with
    that error, as a read-only file system or a directory without write permission makes
    it fail (os.open: tempfile's and our lock's; os.mkdir)."""
    def install(root: Path, code: int):
        root = os.path.realpath(root)
        real_open, real_mkdir = os.open, os.mkdir

        def inside(path):
            return os.path.realpath(os.fspath(path)).startswith(root + os.sep)

        def guarded_open(path, flags, *a, **k):
            if flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT) and inside(path):
                raise OSError(code, os.strerror(code), os.fspath(path))
            return real_open(path, flags, *a, **k)

        def guarded_mkdir(path, *a, **k):
            if inside(path):
                raise OSError(code, os.strerror(code), os.fspath(path))
            return real_mkdir(path, *a, **k)
        monkeypatch.setattr(os, "open", guarded_open)
        monkeypatch.setattr(os, "mkdir", guarded_mkdir)
    return install


@pytest.mark.parametrize("code", [errno.EROFS, errno.EACCES, errno.EPERM],
                         ids=["read-only", "permission", "not-permitted"])
def test_an_unwritable_run_directory_is_one_line(tmp_path, capsys, unwritable, code):
    out = tmp_path / "run"
    assert run(out) == 0
    before = {p: p.read_bytes() for p in (out / "metrics.jsonl", out / "train_state.json")}
    unwritable(out, code)
    capsys.readouterr()
    assert run(out, "--resume", "--steps", "2") == 1
    line = error_line(capsys.readouterr().err)
    assert f"{out}{os.sep}" in line and os.strerror(code) in line, line
    assert_only_checkpoint_of(out, 1)
    assert {p: p.read_bytes() for p in before} == before


def test_an_unwritable_parent_of_a_new_run_directory_is_one_line(tmp_path, capsys, unwritable):
    unwritable(tmp_path / "ro", errno.EROFS)
    (tmp_path / "ro").mkdir()   # the guard covers what is inside it
    capsys.readouterr()
    assert run(tmp_path / "ro" / "run") == 1
    line = error_line(capsys.readouterr().err)
    assert f"{tmp_path / 'ro' / 'run'}: Read-only file system" in line, line


def _limited_fsize(limit: int):
    def preexec():
        import resource
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)   # a write past the limit: EFBIG
    return preexec


def test_a_real_write_error_in_a_save_is_one_line(tmp_path):
    """A real OS error: under RLIMIT_FSIZE the model file cannot be written (EFBIG)."""
    out = tmp_path / "run"
    assert run(out) == 0
    size = (out / "model.safetensors").stat().st_size
    r = subprocess.run([sys.executable, "-m", "gpt2s.train",
                        *args(out, "--resume", "--steps", "2")],
                       capture_output=True, text=True, timeout=SUBPROCESS_TIMEOUT,
                       env={**os.environ, "OMP_NUM_THREADS": "1"},
                       preexec_fn=_limited_fsize(size // 4))
    assert r.returncode == 1, r.stderr
    line = error_line(r.stderr)
    assert "model.safetensors: File too large" in line, line
    assert ".checkpoints" in line and "keeps the checkpoint of step 1" in line
    assert_only_checkpoint_of(out, 1)


# ------------------------------------------------------------------------------------------
# Divergence


def test_a_diverging_run_stops_and_saves_nothing(tmp_path, capsys):
    """--lr 1e30: the first update blows the weights up, the second step's loss is not
    finite: the run stops there, exit status 1, and the step-1 checkpoint stays current."""
    out = tmp_path / "run"
    assert train.main(args(out, "--steps", "5", "--lr", "1e30", "--warmup", "0",
                           "--save-every", "1")) == 1
    line = error_line(capsys.readouterr().err)
    assert "error: step 2: the training loss is" in line and "(not finite)" in line, line
    assert "keeps the checkpoint of step 1" in line
    assert_only_checkpoint_of(out, 1)
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r["type"] == "train"] == [1]
    # without --save-every nothing is saved at all
    out2 = tmp_path / "run2"
    assert train.main(args(out2, "--steps", "5", "--lr", "1e30", "--warmup", "0")) == 1
    line = error_line(capsys.readouterr().err)
    assert "step 2" in line and f"{out2} holds no checkpoint" in line, line
    assert not (out2 / ".checkpoints").exists()


def test_a_non_finite_gradient_norm_stops_the_run(tmp_path, capsys, monkeypatch):
    """The gradients overflow while the loss is finite: the clipping norm (the one read pass
    over the gradients) is infinite, and the step stops before its update."""
    out = tmp_path / "run"
    assert run(out) == 0
    monkeypatch.setattr(gpt2s._core, "sum_squares", lambda buf: float("inf"))
    capsys.readouterr()
    assert run(out, "--resume", "--steps", "3") == 1
    line = error_line(capsys.readouterr().err)
    assert "step 2: the gradient norm is inf (not finite)" in line, line
    assert_only_checkpoint_of(out, 1)


def test_train_step_raises_before_touching_the_weights(monkeypatch):
    model = gpt2s.GPT2.from_config(gpt2s.GPT2Config.preset("tiny"), seed=0)
    opt = gpt2s.AdamW(model)
    from gpt2s.data import TokenData
    data = TokenData(DATA)
    cfg = train.RunConfig(steps=3, batch_size=2, seq_len=16, grad_accum=1, lr=1e-3,
                          min_lr_ratio=0.1, warmup=0, weight_decay=0.1, grad_clip=1.0, seed=0,
                          val_fraction=0.0, eval_batches=1)
    before = model.store.buffer.copy()
    monkeypatch.setattr(gpt2s._core, "sum_squares", lambda buf: float("nan"))
    with pytest.raises(train.TrainingDiverged, match="step 1: the gradient norm is nan"):
        train.train_step(model, opt, data, cfg, 0)
    assert (model.store.buffer == before).all() and opt.t == 0


# ------------------------------------------------------------------------------------------
# Under MPI: rank 0 holds the lock; every rank stops on divergence


def _mpiexec():
    try:
        import mpi4py  # noqa: F401
    except ImportError as e:
        pytest.skip(f"mpi4py is not installed ({e}); pip install 'gpt2s[mpi]'")
    beside = Path(sys.executable).parent / "mpiexec"
    exe = str(beside) if beside.exists() else shutil.which("mpiexec")
    if exe is None:
        pytest.skip("no mpiexec next to the interpreter or on PATH; pip install 'gpt2s[mpi]'")
    cmd = [exe, "-n", "2"]
    version = subprocess.run([exe, "--version"], capture_output=True, text=True).stdout
    if "Open MPI" in version or "OpenRTE" in version:
        cmd.append("--oversubscribe")
    return cmd


def _mpi_train(out: Path, *extra):
    env = dict(os.environ, OMP_NUM_THREADS="1", OMPI_ALLOW_RUN_AS_ROOT="1",
               OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1")
    p = subprocess.Popen([*_mpiexec(), sys.executable, "-m", "gpt2s.train", *args(out, *extra)],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                         start_new_session=True)
    try:
        _, err = p.communicate(timeout=SUBPROCESS_TIMEOUT)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        _, err = p.communicate()
        pytest.fail(f"mpiexec still running after {SUBPROCESS_TIMEOUT} s:\n{err}")
    return p.returncode, err


def test_under_mpi_every_rank_stops_when_the_run_diverges(tmp_path):
    out = tmp_path / "run"
    code, err = _mpi_train(out, "--steps", "5", "--lr", "1e30", "--warmup", "0",
                           "--save-every", "1")
    assert code == 1, err
    lines = [line for line in err.splitlines() if line.startswith(f"{PROG}: error:")]
    assert len(lines) == 1 and "step 2: the training loss is" in lines[0], err
    assert "Traceback" not in err and "Abort" not in err and "aborting" not in err, err
    assert_only_checkpoint_of(out, 1)


@pytest.mark.skipif(os.name != "posix", reason="the test holds the lock with fcntl.flock")
def test_under_mpi_rank_0_holds_the_lock_and_a_refusal_ends_the_job(tmp_path):
    import fcntl
    out = tmp_path / "run"
    assert run(out, "--batch-size", "4") == 0      # the global batch of 2 ranks x 2
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    fd = os.open(out / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.write(fd, b"31337\n")
        code, err = _mpi_train(out, "--resume", "--steps", "2")
    finally:
        os.close(fd)
    assert code == 2, err
    assert f"--out {out}: another trainer (PID 31337)" in err, err
    assert "Traceback" not in err
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == \
        {**before, ".lock": b"31337\n"}
    assert_only_checkpoint_of(out, 1)
    # free: the 2-rank run continues the checkpoint
    code, err = _mpi_train(out, "--resume", "--steps", "2")
    assert code == 0, err
    assert_only_checkpoint_of(out, 2)


def test_stop_request_messages_name_what_stops_the_run_now(capsys):
    """Ctrl-C: a second one stops at once, and the message says so; SIGTERM (what a scheduler
    sends): the step ends first, and the message does not talk of Ctrl-C."""
    import signal

    from gpt2s.training import _StopRequests
    for sig, again in ((signal.SIGINT, True), (signal.SIGTERM, False)):
        stop = _StopRequests()
        stop._handle(sig, None)
        err = capsys.readouterr().err
        assert stop.signal == sig
        assert err == f"\n{signal.Signals(sig).name}: stopping after this step" \
                      + (" (Ctrl-C again to stop now)" if again else "") + "\n"
    stop = _StopRequests()
    stop._handle(signal.SIGINT, None)
    with pytest.raises(KeyboardInterrupt):
        stop._handle(signal.SIGINT, None)
