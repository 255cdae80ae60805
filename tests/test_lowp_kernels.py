"""The low-precision weight kernels (src/gpt2s/_lowp.h, _lowp.pxi): bfloat16 and int8-block
storage, and the products that read it directly.

References are independent of the kernels: bfloat16 rounding is re-derived here on the bits
(round to nearest even), int8 blocks are checked against their defining properties (the
smallest fp16 scale with 127 d >= max|w|, q = round(w / d), |w - q d| <= d / 2) and products
against float64 NumPy on the weights as stored (widened by this file, not by _core).  Every
product runs on each kernel route: the AVX2 direct kernels ("avx2-direct", forced for every
row count), AVX2 widening into panels for the float32 gemm ("avx2-panel", forced for every row
count) and the portable C route ("portable"), on 1 thread and on 3 (uneven column splits),
over shapes that hit every tail: rows past a 1/2/4-row tile, columns past a 16-column strip or
an 8/4/2-row W tile, K past a 64-row block or an 8-lane vector, several weight panels.
"""

from __future__ import annotations

import numpy as np
import pytest

import gpt2s
from gpt2s import _core

HAVE_AVX2 = _core.have_lowp_avx2()
U = 2.0 ** -24   # float32 unit roundoff
NO_BIAS = np.empty(0, np.float32)


@pytest.fixture(params=["avx2-direct", "avx2-panel", "portable"])
def route(request):
    if request.param.startswith("avx2") and not HAVE_AVX2:
        pytest.skip("no AVX2 + FMA + F16C low-precision kernels on this CPU/build")
    prev_path = _core.set_lowp_kernels("avx2" if request.param.startswith("avx2") else "portable")
    prev_rows = _core.set_lowp_direct_max_rows(1 << 20 if request.param == "avx2-direct" else 0)
    yield request.param
    _core.set_lowp_kernels(prev_path)
    _core.set_lowp_direct_max_rows(prev_rows)


@pytest.fixture(params=[1, 3])
def nthreads(request, every_kernel_parallel):
    gpt2s.set_num_threads(request.param)
    return request.param


# ------------------------------------------------------------------ independent references

def bf16_round(x: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bits, round to nearest even (finite inputs)."""
    u = np.ascontiguousarray(x, np.float32).view(np.uint32).astype(np.uint64)
    return ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)


def bf16_widen(h: np.ndarray) -> np.ndarray:
    return (h.astype(np.uint32) << 16).view(np.float32)


def to_bf16(x: np.ndarray) -> np.ndarray:
    out = np.empty(x.size, np.uint16)
    _core.bf16_from_float32(out, np.ascontiguousarray(x, np.float32).ravel())
    return out.reshape(x.shape)


def quantize(w: np.ndarray, transpose: bool):
    N, K = (w.shape[1], w.shape[0]) if transpose else w.shape
    q = np.empty((N, K), np.int8)
    s = np.empty((N, K // 32), np.uint16)
    _core.q8_quantize(q, s, w, transpose)
    return q, s


def q8_widen(q: np.ndarray, s: np.ndarray) -> np.ndarray:
    """float64 (N, K) = q * the block's fp16 scale"""
    d = s.view(np.float16).astype(np.float64)
    return q.astype(np.float64) * np.repeat(d, 32, axis=1)


def act_rounding(x64, w64):
    """The error the one-row int8 kernel (AVX2) adds by rounding the activation row to int16
    per block of 32: |x - xq dx| <= dx / 2 = max|x of the block| / 65534, times |w|, summed."""
    M, K = x64.shape
    amax = np.repeat(np.abs(x64).reshape(M, K // 32, 32).max(axis=2), 32, axis=1)
    return amax / 65534 * 1.01 @ np.abs(w64).T


def check(got, want, scale, K, what, extra=0.0):
    """|got - want| <= 4 sqrt(K) u scale elementwise (scale = sum of |terms|), the bound
    tests/test_small_m.py uses: the usual size of float32 rounding in a sum of K products; an
    indexing mistake is off by O(scale)."""
    assert np.isfinite(got).all(), f"{what}: non-finite output"
    err = np.abs(got.astype(np.float64) - want)
    bound = 4.0 * np.sqrt(max(K, 1)) * U * scale + extra + 1e-30
    worst = float((err / bound).max()) if err.size else 0.0
    assert worst <= 1.0, f"{what}: error {worst:.2f} x the rounding bound"


# ------------------------------------------------------------------ conversions

def test_bf16_rounding_matches_the_bits():
    rng = np.random.default_rng(0)
    x = np.concatenate([
        rng.standard_normal(10000).astype(np.float32),
        (rng.standard_normal(1000) * 1e-40).astype(np.float32),          # subnormals
        np.array([0.0, -0.0, 1.0, -2.5, 3.4e38, -3.4e38, 1e-45, np.float32(np.finfo(np.float32).max)],
                 np.float32),
        # exact ties: low halves 0x8000 with an even and an odd kept bit (to even: down, up)
        np.array([0x3F808000, 0x3F818000, 0xBF808000, 0x3F807FFF, 0x3F808001],
                 np.uint32).view(np.float32),
    ])
    got = to_bf16(x)
    np.testing.assert_array_equal(got, bf16_round(x))
    # ties go to even
    assert list(got[-5:]) == [0x3F80, 0x3F82, 0xBF80, 0x3F80, 0x3F81]
    # past the largest bfloat16 the rounding overflows to inf, as IEEE rounding does
    assert bf16_widen(to_bf16(np.array([3.4028235e38], np.float32)))[0] == np.inf


def test_bf16_specials_and_round_trip():
    x = np.array([np.inf, -np.inf, np.nan, -np.nan], np.float32)
    w = bf16_widen(to_bf16(x))
    assert w[0] == np.inf and w[1] == -np.inf and np.isnan(w[2]) and np.isnan(w[3])
    # a bfloat16-representable value converts exactly, both ways
    rng = np.random.default_rng(1)
    h = rng.integers(0, 1 << 16, 20000).astype(np.uint16)
    h = h[np.isfinite(bf16_widen(h))]
    back = np.empty(h.size, np.float32)
    _core.bf16_to_float32(back, h)
    np.testing.assert_array_equal(back.view(np.uint32), bf16_widen(h).view(np.uint32))
    np.testing.assert_array_equal(to_bf16(back), h)
    with pytest.raises(ValueError, match="bf16_from_float32"):
        _core.bf16_from_float32(np.empty(3, np.uint16), np.empty(4, np.float32))
    with pytest.raises(ValueError, match="bf16_to_float32"):
        _core.bf16_to_float32(np.empty(3, np.float32), np.empty(4, np.uint16))


@pytest.mark.parametrize("transpose", [False, True])
def test_q8_quantize_properties(nthreads, transpose):
    rng = np.random.default_rng(2)
    N, K = 77, 96
    w = (rng.standard_normal((N, K)) * np.exp(rng.uniform(-12, 3, (N, 1)))).astype(np.float32)
    w[3, :32] = 0.0                                   # an all-zero block
    w[5, 40] = 1e-30                                  # a block whose scale is an fp16 subnormal
    w[5, 32:40] = 0.0
    w[5, 41:64] = 0.0
    src = np.ascontiguousarray(w.T) if transpose else w
    q, s = quantize(src, transpose)
    d = s.view(np.float16).astype(np.float64)                       # (N, K/32)
    amax = np.abs(w.astype(np.float64)).reshape(N, K // 32, 32).max(axis=2)
    # the scale is the smallest fp16 with 127 d >= max|w| (no weight clips)
    assert (127.0 * d >= amax).all()
    below = np.nextafter(s.view(np.float16), np.float16(0)).astype(np.float64)
    assert ((127.0 * below < amax) | (d == 0)).all()
    assert (d[3, 0] == 0.0) and (q[3, :32] == 0).all()
    assert d[5, 1] > 0
    # q = round(w / d), and the element error is at most d / 2
    dd = np.repeat(d, 32, axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        want = np.where(dd > 0, np.rint(w / dd), 0.0)
    np.testing.assert_array_equal(q.astype(np.float64), want)
    assert (np.abs(q) <= 127).all()
    assert (np.abs(w - q * dd) <= dd / 2).all()
    out = np.empty((N, K), np.float32)
    _core.q8_dequantize(out, q, s)
    np.testing.assert_array_equal(out, q8_widen(q, s).astype(np.float32))


def test_q8_quantize_rejects_bad_input():
    with pytest.raises(ValueError, match="multiple of 32"):
        _core.q8_quantize(np.empty((4, 40), np.int8), np.empty((4, 1), np.uint16),
                          np.zeros((4, 40), np.float32), False)
    with pytest.raises(ValueError, match="q8_quantize"):
        _core.q8_quantize(np.empty((4, 32), np.int8), np.empty((4, 1), np.uint16),
                          np.zeros((4, 32), np.float32), True)
    for bad in (np.nan, np.inf, 1e7):
        w = np.zeros((4, 32), np.float32)
        w[2, 7] = bad
        with pytest.raises(ValueError, match="non-finite|too large"):
            quantize(w, False)


# ------------------------------------------------------------------ products

ROWS = [1, 2, 3, 5, 8, 13, 33]
# (K, N): K 1/7 below a vector, 13 with a lane tail, 48 = 32 + 16 (the one-row NT kernel's
# two loops), 64 one block, 65/130 a block plus a tail, 8200 past the one-row NT kernel's
# stack scratch (the generic tile); N 1/5 below a strip or tile, 16 one strip, 17/37/100 with
# tails; 3072 x 100 spans two panels
BF16_SHAPES = [(1, 5), (7, 1), (13, 37), (48, 9), (64, 16), (65, 17), (130, 100), (3072, 100),
               (8200, 3)]
# int8: K a multiple of 32 (1, 2, 3 blocks, GPT-2's 768 and 3072)
Q8_SHAPES = [(32, 1), (32, 7), (64, 17), (96, 37), (768, 10), (3072, 100)]


@pytest.mark.parametrize("M", ROWS)
def test_matmul_forward_bf16(route, nthreads, M):
    rng = np.random.default_rng(M)
    for K, N in BF16_SHAPES:
        x = rng.standard_normal((M, K)).astype(np.float32)
        wh = bf16_round(rng.standard_normal((K, N)).astype(np.float32))
        b = rng.standard_normal(N).astype(np.float32)
        x64, w64 = x.astype(np.float64), bf16_widen(wh).astype(np.float64)
        scale = np.abs(x64) @ np.abs(w64)
        out = np.full((M, N), np.nan, np.float32)
        _core.matmul_forward_bf16(out, x, wh, b)
        check(out, x64 @ w64 + b, scale + np.abs(b), K + 1, ("bias", M, K, N))
        _core.matmul_forward_bf16(out, x, wh, NO_BIAS)
        check(out, x64 @ w64, scale, K, ("no bias", M, K, N))


@pytest.mark.parametrize("split_k", [True, False], ids=["split-k", "split-columns"])
def test_matmul_forward_bf16_one_row_team_splits(route, every_kernel_parallel, split_k):
    """One row on a team of 3: K split in three runs of whole rows (partials added in thread
    order) or the columns split in three blocks; both give the product."""
    gpt2s.set_num_threads(3)
    previous = _core.set_lowp_split_k(split_k)
    try:
        rng = np.random.default_rng(50)
        for K, N in [(192, 5), (200, 37), (768, 100), (3072, 48)]:
            x = rng.standard_normal((1, K)).astype(np.float32)
            wh = bf16_round(rng.standard_normal((K, N)).astype(np.float32))
            b = rng.standard_normal(N).astype(np.float32)
            x64, w64 = x.astype(np.float64), bf16_widen(wh).astype(np.float64)
            out = np.full((1, N), np.nan, np.float32)
            _core.matmul_forward_bf16(out, x, wh, b)
            check(out, x64 @ w64 + b, np.abs(x64) @ np.abs(w64) + np.abs(b), K + 1, (K, N))
    finally:
        _core.set_lowp_split_k(previous)


@pytest.mark.parametrize("M", ROWS)
def test_lm_head_forward_bf16(route, nthreads, M):
    rng = np.random.default_rng(100 + M)
    for K, V in BF16_SHAPES:
        x = rng.standard_normal((M, K)).astype(np.float32)
        wh = bf16_round(rng.standard_normal((V, K)).astype(np.float32))
        x64, w64 = x.astype(np.float64), bf16_widen(wh).astype(np.float64)
        out = np.full((M, V), np.nan, np.float32)
        _core.lm_head_forward_bf16(out, x, wh)
        check(out, x64 @ w64.T, np.abs(x64) @ np.abs(w64).T, K, (M, K, V))


@pytest.mark.parametrize("M", ROWS)
def test_matmul_forward_q8(route, nthreads, M):
    rng = np.random.default_rng(200 + M)
    for K, N in Q8_SHAPES:
        x = rng.standard_normal((M, K)).astype(np.float32)
        q = rng.integers(-127, 128, (N, K)).astype(np.int8)
        s = (rng.uniform(0.001, 0.1, (N, K // 32))).astype(np.float16).view(np.uint16)
        b = rng.standard_normal(N).astype(np.float32)
        x64, w64 = x.astype(np.float64), q8_widen(q, s)            # w64 (N, K)
        scale = np.abs(x64) @ np.abs(w64).T
        extra = act_rounding(x64, w64)
        out = np.full((M, N), np.nan, np.float32)
        _core.matmul_forward_q8(out, x, q, s, b)
        check(out, x64 @ w64.T + b, scale + np.abs(b), K + 1, ("bias", M, K, N), extra)
        _core.matmul_forward_q8(out, x, q, s, NO_BIAS)
        check(out, x64 @ w64.T, scale, K, ("no bias", M, K, N), extra)
        out2 = np.full((M, N), np.nan, np.float32)
        _core.lm_head_forward_q8(out2, x, q, s)
        np.testing.assert_array_equal(out2, out)


def test_q8_product_of_a_quantized_conv1d_weight(route):
    """quantize (transposing the Conv1D layout) then multiply: the product of the dequantized
    weight, and within the quantization error of the float32 weight."""
    rng = np.random.default_rng(7)
    M, K, N = 3, 256, 48
    x = rng.standard_normal((M, K)).astype(np.float32)
    w = (rng.standard_normal((K, N)) * 0.02).astype(np.float32)
    q, s = quantize(w, True)
    out = np.empty((M, N), np.float32)
    _core.matmul_forward_q8(out, x, q, s, NO_BIAS)
    x64, w64 = x.astype(np.float64), q8_widen(q, s)
    check(out, x64 @ w64.T, np.abs(x64) @ np.abs(w64).T, K, "dequantized",
          act_rounding(x64, w64))
    d = np.repeat(s.view(np.float16).astype(np.float64), 32, axis=1)   # (N, K)
    assert (np.abs(out - x64 @ w.astype(np.float64)) <= np.abs(x64) @ (d.T / 2) + 1e-4).all()


def test_empty_inner_dimension(route):
    x = np.empty((5, 0), np.float32)
    b = np.arange(20, dtype=np.float32)
    out = np.full((5, 20), np.nan, np.float32)
    _core.matmul_forward_bf16(out, x, np.empty((0, 20), np.uint16), b)
    np.testing.assert_array_equal(out, np.broadcast_to(b, (5, 20)))
    _core.lm_head_forward_bf16(out, x, np.empty((20, 0), np.uint16))
    np.testing.assert_array_equal(out, 0.0)
    out[:] = np.nan
    _core.matmul_forward_q8(out, x, np.empty((20, 0), np.int8), np.empty((20, 0), np.uint16), b)
    np.testing.assert_array_equal(out, np.broadcast_to(b, (5, 20)))


def test_read_only_weights():
    """The weights may be read-only views of a file mapping."""
    rng = np.random.default_rng(8)
    x = rng.standard_normal((2, 64)).astype(np.float32)
    wh = bf16_round(rng.standard_normal((64, 16)).astype(np.float32))
    q, s = quantize(rng.standard_normal((16, 64)).astype(np.float32), False)
    for a in (wh, q, s):
        a.setflags(write=False)
    out = np.empty((2, 16), np.float32)
    _core.matmul_forward_bf16(out, x, wh, NO_BIAS)
    _core.lm_head_forward_q8(out, x, q, s)


def f32(*shape):
    return np.empty(shape, np.float32)


@pytest.mark.parametrize("call, match", [
    (lambda: _core.matmul_forward_bf16(f32(2, 5), f32(2, 8), np.empty((7, 5), np.uint16),
                                       NO_BIAS), "matmul_forward_bf16"),
    (lambda: _core.matmul_forward_bf16(f32(2, 5), f32(2, 8), np.empty((8, 5), np.uint16),
                                       f32(3)), r"bias \(3,\)"),
    (lambda: _core.lm_head_forward_bf16(f32(2, 5), f32(2, 8), np.empty((5, 7), np.uint16)),
     "lm_head_forward_bf16"),
    (lambda: _core.matmul_forward_q8(f32(2, 5), f32(2, 40), np.empty((5, 40), np.int8),
                                     np.empty((5, 1), np.uint16), NO_BIAS), "multiple of 32"),
    (lambda: _core.matmul_forward_q8(f32(2, 5), f32(2, 32), np.empty((5, 32), np.int8),
                                     np.empty((5, 2), np.uint16), NO_BIAS), "matmul_forward_q8"),
    (lambda: _core.lm_head_forward_q8(f32(2, 6), f32(2, 32), np.empty((5, 32), np.int8),
                                      np.empty((5, 1), np.uint16)), "lm_head_forward_q8"),
    (lambda: _core.q8_dequantize(f32(5, 32), np.empty((5, 32), np.int8),
                                 np.empty((4, 1), np.uint16)), "q8_dequantize"),
])
def test_reject_mismatched_shapes(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_kernel_path_switch():
    prev = _core.set_lowp_kernels("portable")
    try:
        assert _core.get_lowp_kernels() == "portable"
        assert _core.set_lowp_kernels("auto") == "portable"
        assert _core.get_lowp_kernels() == ("avx2" if HAVE_AVX2 else "portable")
        with pytest.raises(ValueError, match="avx512"):
            _core.set_lowp_kernels("avx512")
        with pytest.raises(ValueError, match="'auto', 'avx2' or 'portable'"):
            _core.set_lowp_kernels("fast")
        if not HAVE_AVX2:
            with pytest.raises(ValueError, match="lacks AVX2"):
                _core.set_lowp_kernels("avx2")
        with pytest.raises(ValueError, match="direct max rows"):
            _core.set_lowp_direct_max_rows(-1)
    finally:
        _core.set_lowp_kernels(prev)


# ------------------------------------------------------------------ embedding

def test_embedding_forward_low_precision(nthreads):
    rng = np.random.default_rng(9)
    V, C, n_ctx, B, T, pos0 = 50, 64, 16, 3, 5, 4
    wte = rng.standard_normal((V, C)).astype(np.float32)
    wpe = rng.standard_normal((n_ctx, C)).astype(np.float32)
    idx = rng.integers(0, V, B * T).astype(np.int64)
    pos = pos0 + np.arange(B * T) % T
    out = np.empty((B * T, C), np.float32)
    wh = bf16_round(wte)
    _core.embedding_forward_bf16(out, idx, wh, wpe, T, pos0)
    np.testing.assert_array_equal(out, bf16_widen(wh)[idx] + wpe[pos])
    q, s = quantize(wte, False)
    _core.embedding_forward_q8(out, idx, q, s, wpe, T, pos0)
    np.testing.assert_array_equal(out, q8_widen(q, s).astype(np.float32)[idx] + wpe[pos])
    bad = idx.copy()
    bad[7] = V
    with pytest.raises(ValueError, match=f"token id {V} at position 7"):
        _core.embedding_forward_bf16(out, bad, wh, wpe, T, pos0)
    with pytest.raises(ValueError, match="token id -1"):
        bad[7] = -1
        _core.embedding_forward_q8(out, bad, q, s, wpe, T, pos0)
    with pytest.raises(ValueError, match="pos0=12"):
        _core.embedding_forward_bf16(out, idx, wh, wpe, T, 12)


def test_q8_one_row_activation_rounding_and_non_finite(route):
    """One row: the AVX2 kernel rounds the row to int16 per block; its error stays within
    act_rounding (and far below the weights' own rounding), and a row with inf or NaN takes
    the float path (inf/NaN propagate as in float32)."""
    rng = np.random.default_rng(11)
    K, N = 768, 40
    x = (rng.standard_normal((1, K)) * np.exp(rng.uniform(-6, 6, (1, K)))).astype(np.float32)
    q = rng.integers(-127, 128, (N, K)).astype(np.int8)
    s = rng.uniform(0.001, 0.1, (N, K // 32)).astype(np.float16).view(np.uint16)
    out = np.empty((1, N), np.float32)
    _core.lm_head_forward_q8(out, x, q, s)
    x64, w64 = x.astype(np.float64), q8_widen(q, s)
    check(out, x64 @ w64.T, np.abs(x64) @ np.abs(w64).T, K, "wide-range row",
          act_rounding(x64, w64))
    for bad in (np.inf, np.nan):
        xb = x.copy()
        xb[0, 100] = bad
        _core.lm_head_forward_q8(out, xb, q, s)
        assert np.isnan(out).all() if bad != bad else (~np.isfinite(out)).all()
