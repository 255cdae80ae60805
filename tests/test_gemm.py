"""The float32 GEMM (gemm / gemm_serial in _core.pyx) beyond the weight products that
tests/test_kernel_matrix.py covers: the backward products with few rows (the transposed direct
kernel with accumulation), the empty inner dimension, tall products cut into sgemm slices, the
shape checks, and a model forward and batch decode that give the same logits and tokens with
the float32 direct kernels and with sgemm, and match tests/ref.py.

Where the CPU or build has no direct float32 kernels, the "direct" cases run the portable
route (BLAS) twice.
"""

from __future__ import annotations

import numpy as np
import pytest

import ref
from conftest import check_matmul as check
import gpt2s
from gpt2s import _core

VARIANTS = _core.kernel_variants("float32")


@pytest.fixture(params=VARIANTS)
def path(request):
    """Run the test with each variant of the float32 kernels (portable: sgemm only)."""
    previous = _core.set_kernel_variant("float32", request.param)
    yield request.param
    _core.set_kernel_variant("float32", previous)


@pytest.fixture(params=[1, 3])
def nthreads(request, every_kernel_parallel, matmul_paths):
    """1 thread, and 3 (uneven column splits) with every kernel forced onto its parallel path:
    afterwards no matmul of the test may have stayed on one thread (the path counters say)."""
    n = request.param if _core.have_openmp() else 1
    gpt2s.set_num_threads(n)
    yield n
    counts = matmul_paths()
    if n > 1:
        assert counts["serial"] == 0, counts
        assert counts["split_columns"] + counts["split_rows"] + counts["gemv_split_k"] > 0
    else:
        assert counts["serial"] > 0 and counts["split_columns"] == counts["split_rows"] == 0


def test_empty_inner_dimension(path):
    """K = 0: an empty sum, so the output is the bias (or zero), as with sgemm."""
    x = np.empty((5, 0), np.float32)
    b = np.arange(20, dtype=np.float32)
    out = np.full((5, 20), np.nan, np.float32)
    _core.matmul_forward(out, x, np.empty((0, 20), np.float32), b)
    np.testing.assert_array_equal(out, np.broadcast_to(b, (5, 20)))
    _core.lm_head_forward(out, x, np.empty((20, 0), np.float32))
    np.testing.assert_array_equal(out, 0.0)


@pytest.mark.parametrize("M", [2, 5, 9, 32])
def test_matmul_backward_few_rows_accumulates_dinp(path, nthreads, M):
    """dinp (M, C) += dout @ weight^T runs the transposed kernel with accumulation."""
    rng = np.random.default_rng(200 + M)
    C, OC = 37, 100
    x = rng.standard_normal((M, C)).astype(np.float32)
    w = rng.standard_normal((C, OC)).astype(np.float32)
    dout = rng.standard_normal((M, OC)).astype(np.float32)
    dinp0 = rng.standard_normal((M, C)).astype(np.float32)
    dinp = dinp0.copy()
    dw = np.zeros((C, OC), np.float32)
    db = np.zeros(OC, np.float32)
    _core.matmul_backward(dinp, dw, db, dout, x, w, True)
    d64, x64, w64 = dout.astype(np.float64), x.astype(np.float64), w.astype(np.float64)
    check(dinp, dinp0 + d64 @ w64.T, np.abs(dinp0) + np.abs(d64) @ np.abs(w64).T, OC + 1, "dinp")
    check(dw, x64.T @ d64, np.abs(x64).T @ np.abs(d64), M, "dweight")
    check(db, d64.sum(0), np.abs(d64).sum(0), M, "dbias")


def test_kernels_and_sgemm_agree_on_a_model(make_config, make_model, make_batch):
    """A forward with B*T = 12 rows (every matmul few-row) and a batch-of-5 greedy decode: the
    same logits and tokens with the kernels and with sgemm, and the logits match ref.py."""
    cfg = make_config(n_layer=2, n_head=2, head_size=16, vocab_size=211, n_ctx=64)
    m = make_model(cfg, seed=5)
    idx, _ = make_batch(cfg, 3, 4, seed=6)
    params64 = {k: v.astype(np.float64) for k, v in m.params.items()}
    want = ref.forward(params64, idx, n_head=cfg.n_head, eps=cfg.layer_norm_epsilon)[0]
    prompt, _ = make_batch(cfg, 5, 3, seed=7)
    got = {}
    for variant in (VARIANTS[-1], "portable"):
        previous = _core.set_kernel_variant("float32", variant)
        try:
            logits, _ = m.forward(idx)
            tokens = np.asarray(m.generate(prompt, 6, temperature=0.0))
        finally:
            _core.set_kernel_variant("float32", previous)
        assert ref.rel_err(logits, want) < 1e-5
        got[variant] = (logits, tokens)
    assert ref.rel_err(got[VARIANTS[-1]][0], got["portable"][0]) < 1e-6
    np.testing.assert_array_equal(got[VARIANTS[-1]][1], got["portable"][1])


@pytest.mark.parametrize("call, match", [
    (lambda: _core.lm_head_forward(np.empty((2, 5), np.float32), np.empty((2, 8), np.float32),
                                   np.empty((5, 7), np.float32)), "lm_head_forward"),
    (lambda: _core.lm_head_forward(np.empty((2, 4), np.float32), np.empty((2, 8), np.float32),
                                   np.empty((5, 8), np.float32)), "lm_head_forward"),
    (lambda: _core.matmul_forward(np.empty((2, 5), np.float32), np.empty((2, 8), np.float32),
                                  np.empty((8, 5), np.float32), np.empty(3, np.float32)),
     r"bias \(3,\)"),
    (lambda: _core.matmul_backward(np.empty((2, 8), np.float32), np.empty((8, 5), np.float32),
                                   np.empty(5, np.float32), np.empty((2, 6), np.float32),
                                   np.empty((2, 8), np.float32), np.empty((8, 5), np.float32),
                                   False), "matmul_backward"),
    (lambda: _core.lm_head_backward(np.empty((2, 8), np.float32), np.empty((5, 7), np.float32),
                                    np.empty((2, 5), np.float32), np.empty((2, 8), np.float32),
                                    np.empty((5, 8), np.float32)), "lm_head_backward"),
])
def test_matmul_kernels_reject_mismatched_shapes(call, match):
    """The kernels read through raw pointers: a shape mismatch must raise, never read past an
    array."""
    with pytest.raises(ValueError, match=match):
        call()


def test_tall_products_in_slices(nthreads):
    """BLAS gets at most set_rows_per_sgemm rows of C per call; with 37 rows per call the
    lm_head backward's dwte (rows = V) and a tall forward still match float64, on one thread
    and split over three."""
    previous = _core.set_rows_per_sgemm(37)
    try:
        rng = np.random.default_rng(9)
        N, C, V = 40, 24, 301
        dl = rng.standard_normal((N, V)).astype(np.float32)
        x = rng.standard_normal((N, C)).astype(np.float32)
        wte = rng.standard_normal((V, C)).astype(np.float32)
        dwte0 = rng.standard_normal((V, C)).astype(np.float32)
        dinp, dwte = np.empty((N, C), np.float32), dwte0.copy()
        _core.lm_head_backward(dinp, dwte, dl, x, wte)
        d64, x64 = dl.astype(np.float64), x.astype(np.float64)
        check(dwte, dwte0 + d64.T @ x64, np.abs(dwte0) + np.abs(d64).T @ np.abs(x64), N + 1,
              "dwte")
        check(dinp, d64 @ wte, np.abs(d64) @ np.abs(wte.astype(np.float64)), V, "dinp")
        tall = rng.standard_normal((600, 64)).astype(np.float32)    # 600 rows > 40 columns
        w = rng.standard_normal((64, 40)).astype(np.float32)
        b = rng.standard_normal(40).astype(np.float32)
        out = np.empty((600, 40), np.float32)
        _core.matmul_forward(out, tall, w, b)
        t64 = tall.astype(np.float64)
        check(out, t64 @ w + b, np.abs(t64) @ np.abs(w.astype(np.float64)) + np.abs(b), 65,
              "tall forward")
        with pytest.raises(ValueError, match="rows per sgemm"):
            _core.set_rows_per_sgemm(0)
    finally:
        _core.set_rows_per_sgemm(previous)
