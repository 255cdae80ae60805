"""Thread control: results with 1 and 2 OpenMP threads agree (forward, backward, AdamW), and
the thread API (set_num_threads / get_num_threads / show_config) behaves.

The `threads` fixture lifts the work threshold below which kernels stay on one thread, and
the model is sized so that every parallel path really splits work: T > 64 (two attention
query blocks), several (batch, head) pairs, a vocabulary that does not divide evenly.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys

import numpy as np
import pytest

import ref
from conftest import train_step
import gpt2s
from gpt2s import AdamW


@pytest.fixture
def threads(every_kernel_parallel):
    """set_num_threads for the test, with every kernel on its parallel path; the previous
    count and threshold are restored afterwards."""
    return gpt2s.set_num_threads


@pytest.fixture(scope="module")
def model_and_batch(make_config, make_model, make_batch):
    cfg = make_config(n_layer=2, n_head=4, head_size=32, vocab_size=517, n_ctx=128)
    m = make_model(cfg, seed=81)
    idx, targets = make_batch(cfg, 2, 100, seed=82, ignore_frac=0.2)
    return m, idx, targets


@pytest.mark.parametrize("n", [2, 3])
def test_one_and_n_threads_agree(threads, model_and_batch, record_error, n):
    """2 threads (the machine's cores) and 3 (uneven splits of every parallel loop)."""
    m, idx, targets = model_and_batch
    threads(1)
    assert gpt2s.get_num_threads() == 1
    logits1, loss1, grads1 = train_step(m, idx, targets)
    threads(n)
    assert gpt2s.get_num_threads() == (n if gpt2s._core.have_openmp() else 1)
    logits2, loss2, grads2 = train_step(m, idx, targets)

    e = record_error(f"threads 1 vs {n}: logits", ref.rel_err(logits2, logits1))
    assert e < 1e-6
    assert abs(loss1 - loss2) <= 1e-6 * abs(loss1)
    worst = 0.0
    for name in grads1:
        err = ref.rel_err(grads2[name], grads1[name])
        worst = max(worst, err)
        assert err < 1e-6, f"{name}: {err:.2e}"
    record_error(f"threads 1 vs {n}: gradients (worst tensor)", worst)

    # and repeatable: the same thread count gives the same bits twice
    logits3, loss3, grads3 = train_step(m, idx, targets)
    np.testing.assert_array_equal(logits3, logits2)
    assert loss3 == loss2
    for name in grads2:
        np.testing.assert_array_equal(grads3[name], grads2[name], err_msg=name)


def test_thread_count_changed_between_forward_and_backward(threads, model_and_batch):
    """The backward's per-thread scratch follows the current count, not the forward's."""
    m, idx, targets = model_and_batch
    threads(1)
    _, _, expect = train_step(m, idx, targets)
    for first, second in ((1, 2), (2, 1), (3, 2)):
        threads(first)
        m.zero_grad()
        m.forward(idx, targets)
        threads(second)
        m.backward()
        for name, g in expect.items():
            # float32 sums in another order (per-thread partial sums of the bias and weight
            # gradients): 1.07e-6 measured for ln_1.bias at (3, 2) with OpenBLAS's Haswell
            # kernels, whose own summation order differs from the SkylakeX ones
            assert ref.rel_err(m.grads[name], g) < 2e-6, (first, second, name)


def test_generation_path_forward_agrees(threads, model_and_batch):
    """Inference without targets (one layer of activations reused) is thread-independent too,
    and equals the training-mode forward."""
    m, idx, _ = model_and_batch
    threads(1)
    a, _ = m.forward(idx)
    threads(2)
    b, _ = m.forward(idx)
    assert ref.rel_err(b, a) < 1e-6
    c, _ = m.forward(idx, np.zeros_like(idx))
    np.testing.assert_array_equal(b, c)


def test_adamw_and_clipping_thread_independent(threads, make_config, make_model, make_batch):
    """AdamW is elementwise: bit-identical with 1 and 2 threads; the gradient norm agrees."""
    cfg = make_config(n_layer=1, n_head=2, head_size=32, vocab_size=300, n_ctx=64)
    results = []
    for n in (1, 2):
        threads(n)
        m = make_model(cfg, seed=83)
        idx, targets = make_batch(cfg, 2, 64, seed=84)
        opt = AdamW(m, lr=1e-3)
        threads(1)  # the same gradients for both runs: only clipping and the update vary
        train_step(m, idx, targets)
        threads(n)
        norm = gpt2s.clip_grad_norm(m, 0.1)
        opt.step()
        results.append((norm, {k: v.copy() for k, v in m.params.items()}))
    (n1, p1), (n2, p2) = results
    assert abs(n1 - n2) <= 1e-6 * n1
    for k in p1:
        np.testing.assert_array_equal(p1[k], p2[k], err_msg=k)


def test_set_num_threads_validation(threads):
    for bad in (0, -1, -8):
        with pytest.raises(ValueError) as e:
            gpt2s.set_num_threads(bad)
        assert str(bad) in str(e.value)
    for bad in (1.5, "2", None, True):
        with pytest.raises(TypeError):
            gpt2s.set_num_threads(bad)
    threads(1)
    assert gpt2s.get_num_threads() == 1


def test_restore_fixture_restores(restore_threads):
    """The fixture hands back the count it will restore (sanity for the other tests)."""
    assert restore_threads == gpt2s.get_num_threads()
    gpt2s.set_num_threads(1)


def test_show_config_reports_openmp_and_threads(threads, capsys):
    have = gpt2s._core.have_openmp()
    threads(2)
    info = gpt2s.show_config()
    out = capsys.readouterr().out
    assert "OpenMP" in out
    assert ("yes" if have else "no") in out.split("OpenMP", 1)[1].splitlines()[0]
    expected = 2 if have else 1
    assert f"threads: {expected}" in out
    assert info["openmp"] is have and info["threads"] == expected
    assert "BLAS" in out
    assert info["kernels"]["float32"] == gpt2s._core.get_kernel_variant("float32")
    for t, variant in info["kernels"].items():   # one line per weight type, naming its variant
        line = next(l for l in out.splitlines() if l.strip().startswith(t))
        assert (variant in line) or (variant == "portable" and "BLAS" in line), line

    threads(1)
    buf = io.StringIO()
    info = gpt2s.show_config(file=buf)
    assert "threads: 1" in buf.getvalue() and info["threads"] == 1
    assert capsys.readouterr().out == ""  # file= is honoured


@pytest.mark.parametrize("env,expected", [("1", 1), ("3", 3)])
def test_omp_num_threads_sets_the_default(env, expected):
    """A fresh interpreter takes its thread count from OMP_NUM_THREADS, and the BLAS behind
    the matmuls is held to one thread of its own (its pool must not fight OpenMP's)."""
    code = ("import gpt2s, io, json; info = gpt2s.show_config(file=io.StringIO()); "
            "print(json.dumps([gpt2s.get_num_threads(), info['openmp'], "
            "[b['num_threads'] for b in info['blas']]]))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={**os.environ, "OMP_NUM_THREADS": env}, check=True).stdout
    n, have_openmp, blas_threads = json.loads(out.strip().splitlines()[-1])
    assert n == (expected if have_openmp else 1)
    assert all(t == 1 for t in blas_threads), blas_threads


def test_set_num_threads_refuses_counts_no_team_can_have(threads):
    """Above max_num_threads() (1024) is refused: libgomp crashed the process (segmentation
    fault) when asked for a team of 100000, and the C int took 2^31 as an OverflowError."""
    top = gpt2s._core.max_num_threads()
    assert top == 1024
    for bad in (top + 1, 100_000, 2**31, 2**63):
        with pytest.raises(ValueError, match=f"set_num_threads: .*1024.*got {bad}"):
            gpt2s.set_num_threads(bad)
        with pytest.raises(ValueError, match=f"^set_num_threads: .*{bad}"):
            gpt2s._core.set_num_threads(bad)
    with pytest.raises(TypeError, match="^set_num_threads: n must be an integer"):
        gpt2s._core.set_num_threads(1.5)
    threads(top)   # the largest count is taken
    assert gpt2s.get_num_threads() == (top if gpt2s._core.have_openmp() else 1)


def test_huge_omp_num_threads_is_capped():
    """OMP_NUM_THREADS=100000 in the environment: the default count is capped and the
    kernels run (they crashed the process before)."""
    code = ("import gpt2s, numpy as np; from gpt2s import _core; "
            "_core.set_parallel_min_work(0); x = np.ones((64, 64), np.float32); "
            "_core.activation_forward(np.empty_like(x), x, 'gelu_tanh'); "
            "print(gpt2s.get_num_threads())")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       env={**os.environ, "OMP_NUM_THREADS": "100000"}, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    assert int(p.stdout.split()[-1]) == (1024 if gpt2s._core.have_openmp() else 1)


def test_pinned_thread_count_holds_inside_a_call(threads, matmul_paths):
    """Inside pinned_num_threads (what every public call runs in) the kernels use the count
    read on entry, even when the count changes meanwhile; a nested block keeps the outer
    count; on exit the current setting applies again.  Seen through the matmul paths: one
    thread runs gemm's serial path, two split the product."""
    if not gpt2s._core.have_openmp():
        pytest.skip("without OpenMP every kernel runs on one thread")
    from gpt2s._threads import pinned_num_threads
    x = np.ones((64, 64), np.float32)
    out, bias = np.empty_like(x), np.empty(0, np.float32)

    def path():
        gpt2s._core.reset_matmul_path_counts()
        gpt2s._core.matmul_forward(out, x, x, bias)
        counts = matmul_paths()
        return "serial" if counts["serial"] else "split"

    threads(1)
    with pinned_num_threads() as n:
        assert n == 1
        threads(2)
        assert path() == "serial"
        with pinned_num_threads() as inner:
            assert inner == 1
            assert path() == "serial"
        assert path() == "serial"
    assert path() == "split"
    with pinned_num_threads() as n:
        assert n == 2
        threads(1)
        assert path() == "split"
        try:
            with pinned_num_threads():
                raise KeyError("leaves the block")
        except KeyError:
            pass
        assert path() == "split"   # the inner block's exit left the outer pin in place
    assert path() == "serial"


def test_pins_are_per_python_thread(threads, matmul_paths):
    """A pin on one Python thread does not hold the kernels another thread calls."""
    if not gpt2s._core.have_openmp():
        pytest.skip("without OpenMP every kernel runs on one thread")
    import threading
    from gpt2s._threads import pinned_num_threads
    x = np.ones((64, 64), np.float32)
    seen = []

    def other():
        gpt2s._core.reset_matmul_path_counts()
        gpt2s._core.matmul_forward(np.empty_like(x), x, x, np.empty(0, np.float32))
        seen.append(matmul_paths()["serial"])

    threads(1)
    with pinned_num_threads():
        threads(2)
        t = threading.Thread(target=other)
        t.start()
        t.join()
    assert seen == [0]   # the other thread split its product over the current count, 2


@pytest.mark.parametrize("cli,args", [
    ("gpt2s.generate", ["hello", "--max-new-tokens", "1"]),
    ("gpt2s.eval", ["no-such-data.bin"]),
    ("gpt2s.train", ["no-such-data.bin", "--out", "no-such-run"]),
])
def test_clis_refuse_a_thread_count_beyond_the_cap_in_one_line(cli, args, tmp_path):
    p = subprocess.run([sys.executable, "-m", cli, *args, "--threads", "5000"],
                       capture_output=True, text=True, cwd=tmp_path, timeout=300)
    lines = p.stderr.strip().splitlines()
    assert p.returncode == 2 and len(lines) == 1, p.stderr[-2000:]
    assert lines[0].startswith(f"python -m {cli}: error: ") and "1024" in lines[0] \
        and "5000" in lines[0], lines[0]
    assert list(tmp_path.iterdir()) == []
