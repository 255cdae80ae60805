"""Every way a matmul is dispatched (gemm in _core.pyx) is forced here, proved taken by the
path counters (_core.matmul_path_counts) and checked against float64 NumPy:

    gemm        serial (one thread, or below the work threshold), column split (N >= M),
                row split (M > N), gemv_split_k (one row times B (K, N), split over K)
    gemm_serial few-row float32 kernels NN and NT (kernels/f32.h, 2 <= M <= 32), sgemv (M = 1),
                sgemm (in slices of at most set_rows_per_sgemm rows)

set_parallel_min_work is the one switch for all kernels, matmuls included.  A batch-1 decode
on two threads takes gemv_split_k and still decodes what one thread decodes.
"""

from __future__ import annotations

import numpy as np
import pytest

import ref
from conftest import check_matmul
import gpt2s
from gpt2s import _core

HAVE_SMALLM = _core.kernel_variants("float32")[-1] != "portable"
NEED_OPENMP = pytest.mark.skipif(not _core.have_openmp(),
                                 reason="built without OpenMP: every matmul runs on one thread")


@pytest.fixture
def team(every_kernel_parallel):
    """set_num_threads with the work threshold at 0: every matmul with 2+ threads splits."""
    return gpt2s.set_num_threads


@pytest.fixture
def sgemm_only():
    """The few-row kernels bypassed, so that 2..32-row products go to sgemm."""
    previous = _core.set_kernel_variant("float32", "portable")
    yield
    _core.set_kernel_variant("float32", previous)


def _rand(rng, *shape):
    return rng.standard_normal(shape).astype(np.float32)


def forward_and_check(M, K, N, seed, bias=True):
    """matmul_forward out (M, N) = x (M, K) @ w (K, N) (+ b) against float64."""
    rng = np.random.default_rng(seed)
    x, w = _rand(rng, M, K), _rand(rng, K, N)
    b = _rand(rng, N) if bias else np.empty(0, np.float32)
    out = np.full((M, N), np.nan, np.float32)
    _core.matmul_forward(out, x, w, b)
    x64, w64 = x.astype(np.float64), w.astype(np.float64)
    want, scale = x64 @ w64, np.abs(x64) @ np.abs(w64)
    if bias:
        want, scale = want + b, scale + np.abs(b)
    check_matmul(out, want, scale, K + 1, f"matmul_forward M={M} K={K} N={N}")


def lm_head_and_check(M, K, V, seed):
    """lm_head_forward logits (M, V) = x (M, K) @ wte (V, K)^T against float64."""
    rng = np.random.default_rng(seed)
    x, wte = _rand(rng, M, K), _rand(rng, V, K)
    logits = np.full((M, V), np.nan, np.float32)
    _core.lm_head_forward(logits, x, wte)
    x64, e64 = x.astype(np.float64), wte.astype(np.float64)
    check_matmul(logits, x64 @ e64.T, np.abs(x64) @ np.abs(e64).T, K, f"lm_head M={M}")


def only(counts, **expected):
    """counts equal expected on the named paths and are zero on every other path."""
    want = {k: 0 for k in counts}
    want.update(expected)
    assert counts == want


# ------------------------------------------------------------------ gemm's choice

def test_serial_on_one_thread(restore_threads, matmul_paths, sgemm_only):
    gpt2s.set_num_threads(1)
    forward_and_check(64, 40, 48, seed=1)
    only(matmul_paths(), serial=1, sgemm=1)


@NEED_OPENMP
@pytest.mark.parametrize("nt", [2, 3])
def test_column_split(team, matmul_paths, sgemm_only, nt):
    """N >= M: C's columns in blocks of a multiple of 16, one single-thread sgemm each; N = 100
    leaves a short last block."""
    team(nt)
    forward_and_check(40, 33, 100, seed=2)
    step = ((100 + nt - 1) // nt + 15) // 16 * 16
    only(matmul_paths(), split_columns=1, sgemm=-(-100 // step))


@NEED_OPENMP
@pytest.mark.parametrize("nt", [2, 3])
def test_row_split(team, matmul_paths, sgemm_only, nt):
    """M > N: C's rows in blocks (M = 300 rows, 40 columns)."""
    team(nt)
    forward_and_check(300, 20, 40, seed=3)
    step = ((300 + nt - 1) // nt + 15) // 16 * 16
    only(matmul_paths(), split_rows=1, sgemm=-(-300 // step))


@NEED_OPENMP
@pytest.mark.parametrize("nt", [2, 3])
@pytest.mark.parametrize("bias", [True, False], ids=["beta1", "beta0"])
def test_gemv_split_k(team, matmul_paths, nt, bias):
    """One row times B (K, N): B's rows split in nt blocks, partial sums added (accumulating
    onto the bias, or overwriting); also with rows of 3000 floats."""
    team(nt)
    forward_and_check(1, 301, 100, seed=4, bias=bias)
    only(matmul_paths(), gemv_split_k=1)
    _core.reset_matmul_path_counts()
    forward_and_check(1, 64, 3000, seed=5, bias=bias)
    only(matmul_paths(), gemv_split_k=1)


@NEED_OPENMP
def test_gemv_split_k_at_gpt2_decode_shapes(team, matmul_paths):
    """The batch-1 decode products of GPT-2 small: c_attn (768 x 2304), attn.c_proj (768 x
    768), c_fc (768 x 3072) and mlp.c_proj (3072 x 768) split over K; the lm_head (B
    transposed) splits its columns, and one row shorter than the team splits columns too."""
    team(2)
    for seed, (K, N) in enumerate([(768, 2304), (768, 768), (768, 3072), (3072, 768)]):
        gpt2s._core.reset_matmul_path_counts()
        forward_and_check(1, K, N, seed=10 + seed)
        only(matmul_paths(), gemv_split_k=1)
    gpt2s._core.reset_matmul_path_counts()
    lm_head_and_check(1, 64, 1000, seed=20)
    only(matmul_paths(), split_columns=1, gemv=2)
    team(3)
    gpt2s._core.reset_matmul_path_counts()
    forward_and_check(1, 5, 40, seed=21)   # K = 5 < 2 x 3 threads
    only(matmul_paths(), split_columns=1, gemv=3)


def test_gemv_one_row(restore_threads, matmul_paths):
    """M = 1 on one thread: sgemv, for B (K, N) and for the transposed lm_head B (V, K)."""
    gpt2s.set_num_threads(1)
    forward_and_check(1, 70, 50, seed=5)
    only(matmul_paths(), serial=1, gemv=1)
    _core.reset_matmul_path_counts()
    lm_head_and_check(1, 37, 90, seed=6)
    only(matmul_paths(), serial=1, gemv=1)


def test_sgemm_row_slices(restore_threads, matmul_paths, sgemm_only):
    """gemm_serial gives sgemm at most set_rows_per_sgemm rows of C per call."""
    gpt2s.set_num_threads(1)
    previous = _core.set_rows_per_sgemm(37)
    try:
        forward_and_check(300, 24, 40, seed=7)
        only(matmul_paths(), serial=1, sgemm=-(-300 // 37))
    finally:
        _core.set_rows_per_sgemm(previous)


@pytest.mark.skipif(not HAVE_SMALLM, reason="no AVX2 + FMA few-row kernels on this CPU/build")
@pytest.mark.parametrize("M", [2, 7, 32])
def test_few_row_kernels(restore_threads, matmul_paths, M):
    """2..32 rows: the NN kernel for matmul_forward, the NT kernel for the lm_head; 33 rows go
    back to sgemm."""
    gpt2s.set_num_threads(1)
    forward_and_check(M, 130, 37, seed=8)
    only(matmul_paths(), serial=1, smallm_nn=1)
    _core.reset_matmul_path_counts()
    lm_head_and_check(M, 21, 50, seed=9)
    only(matmul_paths(), serial=1, smallm_nt=1)
    _core.reset_matmul_path_counts()
    forward_and_check(33, 13, 20, seed=10)
    only(matmul_paths(), serial=1, sgemm=1)


# ------------------------------------------------------------------ one threshold

@NEED_OPENMP
def test_parallel_min_work_governs_matmuls(restore_threads, matmul_paths, sgemm_only):
    """The threshold of every kernel decides for gemm too: a 64 x 128 x 128 product splits at
    the default threshold, stays serial when the threshold is above its work, and a 40 x 16 x
    48 product splits only when the threshold is lifted."""
    saved = _core.get_parallel_min_work()
    gpt2s.set_num_threads(2)
    try:
        _core.set_parallel_min_work(65536.0)
        forward_and_check(64, 128, 128, seed=11)
        assert matmul_paths()["split_columns"] == 1
        forward_and_check(40, 16, 48, seed=12)
        assert matmul_paths()["serial"] == 1
        _core.reset_matmul_path_counts()
        _core.set_parallel_min_work(1e12)
        forward_and_check(64, 128, 128, seed=11)
        only(matmul_paths(), serial=1, sgemm=1)
        _core.reset_matmul_path_counts()
        _core.set_parallel_min_work(0)
        forward_and_check(40, 16, 48, seed=12)
        only(matmul_paths(), split_columns=1, sgemm=2)
    finally:
        _core.set_parallel_min_work(saved)


def test_reset_and_counts_are_plain_ints(matmul_paths):
    counts = matmul_paths()
    assert set(counts) == {"serial", "split_columns", "split_rows", "gemv_split_k",
                           "smallm_nn", "smallm_nt", "gemv", "sgemm"}
    assert all(type(v) is int and v == 0 for v in counts.values())


# ------------------------------------------------------------------ in a model

@NEED_OPENMP
def test_batch1_decode_on_two_threads_takes_gemv_split_k(team, matmul_paths, make_config,
                                                          make_model):
    """Greedy batch-1 decoding with every kernel on two threads: the KV-cache logits match a
    full forward in float64 (tests/ref.py), the tokens equal the one-thread decode, and the
    products went through gemv_split_k."""
    cfg = make_config(n_layer=2, n_head=2, head_size=32, vocab_size=300, n_ctx=48)
    m = make_model(cfg, seed=21)
    prompt = np.array([[5, 17, 200, 3]])
    team(1)
    one = np.asarray(m.generate(prompt, 8, temperature=0))
    team(2)
    _core.reset_matmul_path_counts()
    two = np.asarray(m.generate(prompt, 8, temperature=0))
    counts = matmul_paths()
    assert counts["gemv_split_k"] >= 7 * cfg.n_layer * 3, counts   # c_attn, c_proj, c_fc
    np.testing.assert_array_equal(two, one)

    # the decode logits themselves, one step at a time, against the float64 reference
    params64 = {k: v.astype(np.float64) for k, v in m.params.items()}
    want = ref.forward(params64, two, n_head=cfg.n_head, eps=cfg.layer_norm_epsilon)[0]
    kv = m.kv_cache(1)
    m.forward_cached(two[:, :4], 0, kv)
    for t in range(4, two.shape[1]):
        _core.reset_matmul_path_counts()
        got = m.forward_cached(two[:, t:t + 1], t, kv)
        assert matmul_paths()["gemv_split_k"] == 4 * cfg.n_layer, t
        assert ref.rel_err(got[0], want[0, t]) < 1e-5, t
