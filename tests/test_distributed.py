"""Data parallel over MPI (gpt2s.distributed): real 2-rank runs under the installed MPI's
``mpiexec`` against one process that trains on the whole global batch (tests/mpi_worker.py
holds both loops).  Without mpi4py or mpiexec these tests skip and say why."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

HERE = Path(__file__).resolve().parent
WORKER = HERE / "mpi_worker.py"
RUN_TIMEOUT = 180  # seconds any one mpiexec run may take before the test kills it


def _find_mpiexec():
    # the MPI wheel installs mpiexec next to the interpreter; else the PATH's
    beside = Path(sys.executable).parent / "mpiexec"
    return str(beside) if beside.exists() else shutil.which("mpiexec")


@pytest.fixture(scope="module")
def mpiexec():
    try:
        import mpi4py  # noqa: F401
    except ImportError as e:
        pytest.skip(f"mpi4py is not installed ({e}); pip install 'gpt2s[mpi]'")
    exe = _find_mpiexec()
    if exe is None:
        pytest.skip("no mpiexec next to the interpreter or on PATH; pip install 'gpt2s[mpi]'")
    cmd = [exe, "-n", "2"]
    version = subprocess.run([exe, "--version"], capture_output=True, text=True).stdout
    if "Open MPI" in version or "OpenRTE" in version:
        cmd.append("--oversubscribe")  # CI machines may have fewer cores than ranks
    return cmd


def _rank_env():
    # one thread per rank (2 ranks on CI's 2 cores); Open MPI refuses to run as root (CI
    # containers) unless told it may (MPICH ignores these)
    return dict(os.environ, OMP_NUM_THREADS="1", OMPI_ALLOW_RUN_AS_ROOT="1",
                OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1")


def _launch(mpiexec, *args, timeout=RUN_TIMEOUT):
    """Run the worker on 2 ranks; returns (returncode, stdout, stderr, seconds).  The whole
    process group is killed if it outlives timeout, so a hang fails the test instead of
    hanging the suite."""
    env = _rank_env()
    t0 = time.perf_counter()
    p = subprocess.Popen([*mpiexec, sys.executable, str(WORKER), "dp", *args],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                         start_new_session=True)
    try:
        out, err = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        out, err = p.communicate()
        pytest.fail(f"mpiexec run {args} still running after {timeout} s\n{out}\n{err}")
    return p.returncode, out, err, time.perf_counter() - t0


def _losses(text: str) -> list[float]:
    return [float(line.split()[3]) for line in text.splitlines() if line.startswith("step ")]


def _single(tmp_path, *args):
    """The one-process reference, run in this process on the whole global batch."""
    import io
    sys.path.insert(0, str(HERE))
    try:
        import mpi_worker
    finally:
        sys.path.remove(str(HERE))
    out = io.StringIO()
    model = mpi_worker.run_single(mpi_worker.parser().parse_args(["single", *args]), out)
    return model.store.buffer.copy(), _losses(out.getvalue())


def _dp(mpiexec, tmp_path, name, *args):
    path = tmp_path / f"{name}.npy"
    rc, out, err, _ = _launch(mpiexec, "--out", str(path), *args)
    assert rc == 0, f"mpiexec run failed ({rc}):\n{out}\n{err}"
    return np.load(path), _losses(out)


def _assert_same_run(ref, got, what):
    (p_ref, loss_ref), (p_got, loss_got) = ref, got
    assert len(loss_ref) == len(loss_got) == 20
    rel = float(np.linalg.norm(p_got - p_ref) / np.linalg.norm(p_ref))
    # measured here: 1.7e-6 (even), 2.4e-6 (uneven), 1.8e-6 (uneven with 2 micro-batches)
    # after 20 AdamW steps with clipping;
    # the difference is float32 summation order (rows split over two ranks)
    assert rel < 1e-5, f"{what}: parameters differ by {rel:.3g} relative (L2)"
    worst = max(abs(a - b) / abs(a) for a, b in zip(loss_ref, loss_got))
    assert worst < 1e-6, f"{what}: losses differ by {worst:.3g} relative: {loss_ref} vs {loss_got}"
    # and training did something: the parameters moved away from the initialisation
    assert not np.allclose(p_ref, _single_init(), atol=1e-4)


def _single_init():
    sys.path.insert(0, str(HERE))
    try:
        import mpi_worker
    finally:
        sys.path.remove(str(HERE))
    return mpi_worker.make_model(0).store.buffer


def test_import_gpt2s_does_not_import_mpi4py():
    code = "import sys, gpt2s, gpt2s.train; assert 'mpi4py' not in sys.modules, 'imported'"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_world_size_from_env():
    from gpt2s.distributed import world_size_from_env
    assert world_size_from_env({}) == 1
    assert world_size_from_env({"PMI_SIZE": "4"}) == 4
    assert world_size_from_env({"OMPI_COMM_WORLD_SIZE": "3"}) == 3
    # SLURM_NTASKS alone is a job's allocation, not a launched step: not counted
    assert world_size_from_env({"SLURM_NTASKS": "8"}) == 1
    assert world_size_from_env({"SLURM_NTASKS": "8", "SLURM_PROCID": "0",
                                "SLURM_STEP_ID": "0"}) == 8


def test_two_ranks_match_one_process_and_overlap_changes_nothing(mpiexec, tmp_path):
    """2 ranks x batch 2 == 1 process x batch 4: 20 AdamW steps with clipping; rank 1 starts
    from other weights, so the broadcast is part of the check.  Overlap on and off give
    bit-identical parameters (the same buckets are reduced either way)."""
    ref = _single(tmp_path)
    overlapped = _dp(mpiexec, tmp_path, "overlap")
    _assert_same_run(ref, overlapped, "2 ranks vs 1 process")
    serial = _dp(mpiexec, tmp_path, "no_overlap", "--no-overlap")
    assert np.array_equal(overlapped[0], serial[0]), "overlap on vs off: parameters differ"
    assert overlapped[1] == serial[1]


def test_uneven_ignored_targets_use_the_global_count(mpiexec, tmp_path):
    """Rank 0's rows have ~80% of their targets ignored (every third micro-batch all of them),
    rank 1's none: the loss and gradient are normalized by the global valid count, as one
    process normalizes them (a per-rank mean would weight rank 0's few targets 5x too much).
    With 2 micro-batches per step: the first accumulates locally (sync=False), the second's
    reduction carries both."""
    args = ("--uneven", "--accum", "2")
    _assert_same_run(_single(tmp_path, *args), _dp(mpiexec, tmp_path, "uneven", *args),
                     "uneven ignored targets, accumulation")


def test_differing_options_are_refused_naming_rank_and_field(mpiexec):
    rc, out, err, _ = _launch(mpiexec, "--mismatch", "--steps", "1")
    assert rc == 3, (rc, out, err)
    assert "rank 1 differs from rank 0 in 'lr'" in err


def test_killed_rank_makes_the_survivor_exit(mpiexec):
    timeout = 20
    rc, out, err, _ = _launch(mpiexec, "--fail", "kill", "--fail-step", "2",
                                    "--timeout", str(timeout), timeout=timeout + 60)
    assert rc != 0, (out, err)
    assert "step 1 loss" in out and "step 2 loss" not in out


def test_hung_rank_makes_the_others_abort_after_the_timeout(mpiexec):
    """A rank that stops answering (not dead, so the launcher sees nothing) must not hang the
    others: they give up after --timeout with a message and MPI_Abort the job."""
    from gpt2s.distributed import EXIT_TIMEOUT
    rc, out, err, _ = _launch(mpiexec, "--fail", "hang", "--fail-step", "2",
                                    "--timeout", "3", timeout=120)
    assert rc == EXIT_TIMEOUT, (rc, out, err)
    assert "did not complete within 3 s" in err and "rank 0 of 2" in err


def test_backward_hook_marks_final_gradients_and_normalizer_scales():
    """The two hooks DataParallel relies on, without MPI: on_layer_done(l) comes for
    l = L-1 .. 0, and when it does, the gradient buffer from block l's first tensor to the end
    already holds its final values; normalizer=k divides the summed loss by k instead of the
    valid-target count."""
    sys.path.insert(0, str(HERE))
    try:
        import mpi_worker
    finally:
        sys.path.remove(str(HERE))
    model = mpi_worker.make_model(0)
    L = model.config.n_layer
    x, y = mpi_worker.global_batch(0, 1, 4, 16, model.config.vocab_size, uneven=True)
    starts = {l: min(off for name, _, off in model.store.layout if name.startswith(f"h.{l}."))
              for l in range(L)}
    snapshots = []
    model.zero_grad()
    _, loss = model.forward(x, y)
    n_valid = int(np.count_nonzero(y != -1))
    model.backward(on_layer_done=lambda l: snapshots.append(
        (l, model.store.grad_buffer[starts[l]:].copy())))
    final = model.store.grad_buffer.copy()
    assert [l for l, _ in snapshots] == list(reversed(range(L)))
    for l, snap in snapshots:
        assert np.array_equal(snap, final[starts[l]:]), f"block {l}: gradients changed later"
    assert not np.array_equal(snapshots[-1][1], np.zeros_like(snapshots[-1][1]))
    model.zero_grad()
    model.forward(x, y)
    model.backward(normalizer=3 * n_valid)
    # float32: dloss 1/(3n) is rounded differently from (1/n)/3, so compare in L2
    rel = np.linalg.norm(model.store.grad_buffer - final / 3) / np.linalg.norm(final / 3)
    assert rel < 1e-5, rel
    model.forward(x, y)
    with pytest.raises(ValueError, match="normalizer"):
        model.backward(normalizer=0)


# ------------------------------------------------------------------------------------------
# python -m gpt2s.train under mpiexec

DATA = HERE / "data" / "tinyshakespeare_excerpt.txt"
TRAIN_ARGS = ["--init", "tiny", "--steps", "4", "--seq-len", "32", "--warmup", "1",
              "--grad-accum", "2", "--eval-every", "2", "--eval-batches", "2", "--no-plot"]


def _train(cmd, out, batch, *extra, timeout=RUN_TIMEOUT, threads="1"):
    env = _rank_env()
    if threads is None:
        env.pop("OMP_NUM_THREADS", None)
    p = subprocess.Popen([*cmd, sys.executable, "-m", "gpt2s.train", str(DATA), *TRAIN_ARGS,
                          "--batch-size", str(batch), "--out", str(out), *extra],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                         start_new_session=True)
    try:
        stdout, stderr = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        stdout, stderr = p.communicate()
        pytest.fail(f"gpt2s.train still running after {timeout} s\n{stdout}\n{stderr}")
    assert p.returncode == 0, f"gpt2s.train failed ({p.returncode}):\n{stdout}\n{stderr}"
    return stderr


def _metrics(out):
    import json
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return ([r["train_loss"] for r in rows if r["type"] == "train"],
            [r["val_loss"] for r in rows if r["type"] == "eval"])


def _params(out):
    from gpt2s import GPT2
    return GPT2.from_safetensors(out).store.buffer.copy()


def test_train_cli_two_ranks_match_one_process(mpiexec, tmp_path):
    """mpiexec -n 2 python -m gpt2s.train --batch-size 2 == one process with --batch-size 4:
    the same windows (a function of seed and step, split over the ranks), losses, evaluation
    (split over the ranks) and parameters, with gradient accumulation and clipping.  Rank 0
    alone prints and writes."""
    one, two = tmp_path / "one", tmp_path / "two"
    _train([], one, 4)
    err = _train(mpiexec, two, 2, threads=None)
    assert err.count("saved ") == 1 and "2 ranks of 2 windows" in err, err
    # without OMP_NUM_THREADS each rank takes its share of the cores
    share = max(1, len(os.sched_getaffinity(0)) // 2) if hasattr(os, "sched_getaffinity") \
        else max(1, (os.cpu_count() or 1) // 2)
    assert f"{share} thread{'' if share == 1 else 's'} per rank" in err, err
    (loss1, val1), (loss2, val2) = _metrics(one), _metrics(two)
    assert len(loss1) == len(loss2) == 4 and len(val1) == len(val2) == 2
    for a, b in zip(loss1 + val1, loss2 + val2):
        assert abs(a - b) <= 1e-6 * abs(a), (loss1, val1, loss2, val2)
    p1, p2 = _params(one), _params(two)
    rel = float(np.linalg.norm(p2 - p1) / np.linalg.norm(p1))
    assert rel < 1e-5, f"parameters differ by {rel:.3g} relative"


def test_train_cli_resume_with_two_ranks_is_exact(mpiexec, tmp_path):
    """A 2-rank run killed (SIGKILL, the whole job) after one of its checkpoints and resumed
    on 2 ranks ends bitwise equal to the run that was never stopped."""
    import json
    straight, broken = tmp_path / "straight", tmp_path / "broken"
    _train(mpiexec, straight, 2, "--save-every", "2", "--steps", "8")
    env = _rank_env()
    p = subprocess.Popen([*mpiexec, sys.executable, "-m", "gpt2s.train", str(DATA), *TRAIN_ARGS,
                          "--batch-size", "2", "--out", str(broken), "--save-every", "2",
                          "--steps", "8"],
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env,
                         start_new_session=True)
    state = broken / "train_state.json"
    deadline = time.monotonic() + RUN_TIMEOUT
    step = 0
    while p.poll() is None and time.monotonic() < deadline:
        try:
            step = json.loads(state.read_text())["step"]
        except (OSError, ValueError, KeyError):
            step = 0
        if 2 <= step < 8:
            os.killpg(p.pid, signal.SIGKILL)
            break
        time.sleep(0.01)
    p.wait(timeout=60)
    assert 2 <= step < 8, f"the run was not caught between its checkpoints (step {step})"
    err = _train(mpiexec, broken, 2, "--save-every", "2", "--steps", "8", "--resume")
    assert f"resuming at step {step}" in err, err
    assert np.array_equal(_params(straight), _params(broken))
    assert _metrics(straight) == _metrics(broken)


def test_train_help_says_how_the_world_size_is_detected():
    out = subprocess.run([sys.executable, "-m", "gpt2s.train", "--help"], capture_output=True,
                         text=True, timeout=60, check=True).stdout
    for name in ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "SLURM_NTASKS", "--distributed",
                 "--dp-timeout"):
        assert name in out, name
