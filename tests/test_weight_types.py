"""The weight types (src/gpt2s/kernels/types.h, bf16.h, q8.h; gpt2s/weight_types.py): their
conversions from and to float32, the stored weights, the variant switch and the argument checks
of the product entries.  The products themselves run in tests/test_kernel_matrix.py (every
type x every variant x both routes).

References are independent of the kernels: bfloat16 rounding is re-derived here on the bits
(round to nearest even), int8 blocks are checked against their defining properties (the
smallest fp16 scale with 127 d >= max|w|, q = round(w / d), |w - q d| <= d / 2).
"""

from __future__ import annotations

import numpy as np
import pytest

import gpt2s
from gpt2s import _core

from gpt2s import weight_types
from gpt2s.weight_types import PackedWeight

U = 2.0 ** -24   # float32 unit roundoff
NO_BIAS = np.empty(0, np.float32)
BF16, Q8 = weight_types.get("bfloat16"), weight_types.get("int8")
VARIANTS = [(t, v) for t in ("bfloat16", "int8") for v in _core.kernel_variants(t)]


@pytest.fixture(params=[v for v in _core.kernel_variants("int8")])
def route(request):
    """the int8 kernels forced to each variant, the direct kernels taking every row count"""
    prev_variant = _core.set_kernel_variant("int8", request.param)
    prev_rows = _core.set_direct_max_rows(1 << 20)
    yield request.param
    _core.set_kernel_variant("int8", prev_variant)
    _core.set_direct_max_rows(prev_rows)


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
    x = np.ascontiguousarray(x, np.float32).reshape(-1, 1) if x.ndim < 2 else x
    return BF16.compress("wte.weight", x).data.reshape(-1)


def quantize(w: np.ndarray, transpose: bool):
    """(q (N, K), scales (N, K/32)) of a Conv1D weight w (K, N) (transpose) or an embedding
    w (N, K)"""
    packed = Q8.compress("h.0.mlp.c_fc.weight" if transpose else "wte.weight", w)
    return packed.data, packed.scales


def product_weight(q, s):
    return Q8.from_stored("wte.weight", q, s)


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
    back = np.asarray(BF16.from_stored("wte.weight", h.reshape(-1, 1))).reshape(-1)
    np.testing.assert_array_equal(back.view(np.uint32), bf16_widen(h).view(np.uint32))
    np.testing.assert_array_equal(to_bf16(back), h)
    w = BF16.empty("wte.weight", (3, 4))
    with pytest.raises(ValueError, match="quantize_into"):
        _core.quantize_into(w, np.empty((4, 4), np.float32))
    with pytest.raises(ValueError, match="widen_into"):
        _core.widen_into(np.empty((3, 5), np.float32), w)


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
    _core.widen_into(out, product_weight(q, s))
    np.testing.assert_array_equal(out, q8_widen(q, s).astype(np.float32))
    # np.asarray gives the logical (float32) tensor: the Conv1D layout when transposed
    packed = PackedWeight(Q8.id, q, s, (K, N) if transpose else (N, K), transpose)
    want = q8_widen(q, s).astype(np.float32)
    np.testing.assert_array_equal(np.asarray(packed), want.T if transpose else want)


def test_q8_quantize_rejects_bad_input():
    with pytest.raises(ValueError, match="multiple of 32"):
        Q8.empty("wte.weight", (4, 40))
    with pytest.raises(ValueError, match="multiple of 32"):
        PackedWeight(Q8.id, np.empty((4, 40), np.int8), np.empty((4, 1), np.uint16), (4, 40),
                     False)
    with pytest.raises(ValueError, match="scales must have shape"):
        PackedWeight(Q8.id, np.empty((4, 32), np.int8), np.empty((4, 2), np.uint16), (4, 32),
                     False)
    with pytest.raises(ValueError, match="whole tensors only"):
        _core.quantize_into(Q8.empty("h.0.mlp.c_fc.weight", (32, 4)),
                            np.zeros((4, 32), np.float32))
    for bad in (np.nan, np.inf, 1e7):
        w = np.zeros((4, 32), np.float32)
        w[2, 7] = bad
        with pytest.raises(ValueError, match="non-finite|too large"):
            quantize(w, False)


def q4_reference(w: np.ndarray):
    """float32 (N, K) -> (nibbles (N, K/2) uint8, scales (N, K/32) fp16 bits) by the format's
    definition: d = the fp16 nearest m / -8 (m: the block's element of largest magnitude, the
    first of equals), q = round(w / d) + 8 clamped to 0..15 (half to even), byte j of a block
    = q[j] | q[j + 16] << 4."""
    N, K = w.shape
    blocks = w.astype(np.float32).reshape(N, K // 32, 32)
    first = np.abs(blocks).argmax(axis=2)
    m = np.take_along_axis(blocks, first[..., None], axis=2)[..., 0]
    d = (np.abs(m) / np.float32(8)).astype(np.float16)
    d = np.where(m > 0, -d, d)
    d32 = d.astype(np.float32)
    with np.errstate(divide="ignore"):
        inv = np.where(d32 != 0, np.float32(1) / d32, np.float32(0)).astype(np.float32)
    q = np.clip(np.rint(blocks * inv[..., None] + np.float32(8)), 0, 15).astype(np.uint8)
    nibbles = q[..., :16] | (q[..., 16:] << 4)
    return nibbles.reshape(N, K // 2), d.view(np.uint16)


Q4 = weight_types.get("int4")


@pytest.mark.parametrize("transpose", [False, True])
def test_q4_quantize_matches_the_definition(nthreads, transpose):
    rng = np.random.default_rng(12)
    N, K = 45, 128
    w = (rng.standard_normal((N, K)) * np.exp(rng.uniform(-10, 3, (N, 1)))).astype(np.float32)
    w[2, :32] = 0.0                                     # an all-zero block
    w[4, 32:64] = np.abs(w[4, 32:64])                   # a positive extreme: d < 0
    w[6, 64] = 3e-6                                     # a block with a subnormal fp16 scale
    w[6, 65:96] = 0.0
    packed = Q4.compress("h.0.mlp.c_fc.weight" if transpose else "wte.weight",
                         np.ascontiguousarray(w.T) if transpose else w)
    want_q, want_d = q4_reference(w)
    np.testing.assert_array_equal(packed.scales, want_d)
    np.testing.assert_array_equal(packed.data, want_q)
    # widened: d (q - 8).  An element whose w / d + 8 lies within the levels (+- 1/2) is within
    # |d| / 2 of w; one beyond the top level (the far side of the extreme, at most |m|) is
    # clipped to 7 d, within |d| (and the fp16 rounding of d)
    got = np.asarray(packed)
    got = got.T if transpose else got
    d = np.repeat(want_d.view(np.float16).astype(np.float64), 32, axis=1)
    err = np.abs(got - w.astype(np.float64))
    with np.errstate(divide="ignore", invalid="ignore"):
        level = np.where(d != 0, w / d + 8, 8)
    inside = (level >= -0.5) & (level <= 15.5)
    assert (err[inside] <= np.abs(d[inside]) / 2 * (1 + 1e-6) + 1e-30).all()
    assert (err <= np.abs(d) * (1 + 2.0 ** -8) + 1e-30).all()
    assert (~inside).sum() < w.size // 32      # clipping is the exception


def test_q4_quantize_rejects_bad_input():
    with pytest.raises(ValueError, match="multiple of 32"):
        Q4.empty("wte.weight", (4, 48))
    for bad in (np.nan, -np.inf, 8 * 65520.0):
        w = np.zeros((4, 32), np.float32)
        w[1, 3] = bad
        with pytest.raises(ValueError, match="non-finite|too large"):
            Q4.compress("wte.weight", w)


# ------------------------------------------------------------------ products

def test_q8_product_of_a_quantized_conv1d_weight(route):
    """quantize (transposing the Conv1D layout) then multiply: the product of the dequantized
    weight, and within the quantization error of the float32 weight."""
    rng = np.random.default_rng(7)
    M, K, N = 3, 256, 48
    x = rng.standard_normal((M, K)).astype(np.float32)
    w = (rng.standard_normal((K, N)) * 0.02).astype(np.float32)
    packed = Q8.compress("h.0.mlp.c_fc.weight", w)
    q, s = packed.data, packed.scales
    out = np.empty((M, N), np.float32)
    _core.matmul_forward(out, x, packed, NO_BIAS)
    x64, w64 = x.astype(np.float64), q8_widen(q, s)
    check(out, x64 @ w64.T, np.abs(x64) @ np.abs(w64).T, K, "dequantized",
          act_rounding(x64, w64))
    d = np.repeat(s.view(np.float16).astype(np.float64), 32, axis=1)   # (N, K)
    assert (np.abs(out - x64 @ w.astype(np.float64)) <= np.abs(x64) @ (d.T / 2) + 1e-4).all()


def test_empty_inner_dimension(route):
    x = np.empty((5, 0), np.float32)
    b = np.arange(20, dtype=np.float32)
    out = np.full((5, 20), np.nan, np.float32)
    _core.matmul_forward(out, x, BF16.empty("h.0.mlp.c_fc.weight", (0, 20)), b)
    np.testing.assert_array_equal(out, np.broadcast_to(b, (5, 20)))
    _core.lm_head_forward(out, x, BF16.empty("wte.weight", (20, 0)))
    np.testing.assert_array_equal(out, 0.0)
    out[:] = np.nan
    _core.matmul_forward(out, x, Q8.empty("h.0.mlp.c_fc.weight", (0, 20)), b)
    np.testing.assert_array_equal(out, np.broadcast_to(b, (5, 20)))


def f32(*shape):
    return np.empty(shape, np.float32)


def bf16_weight(*shape):
    return BF16.empty("h.0.mlp.c_fc.weight", shape)


@pytest.mark.parametrize("call, match", [
    (lambda: _core.matmul_forward(f32(2, 5), f32(2, 8), bf16_weight(7, 5), NO_BIAS),
     "matmul_forward"),
    (lambda: _core.matmul_forward(f32(2, 5), f32(2, 8), bf16_weight(8, 5), f32(3)),
     r"bias \(3,\)"),
    (lambda: _core.lm_head_forward(f32(2, 5), f32(2, 8), BF16.empty("wte.weight", (5, 7))),
     "lm_head_forward"),
    (lambda: _core.matmul_forward(f32(2, 5), f32(2, 32), Q8.empty("h.0.mlp.c_fc.weight", (64, 5)),
                                  NO_BIAS), "matmul_forward"),
    (lambda: _core.lm_head_forward(f32(2, 6), f32(2, 32), Q8.empty("wte.weight", (5, 32))),
     "lm_head_forward"),
    (lambda: _core.matmul_forward(f32(2, 5), f32(2, 32),
                                  PackedWeight(Q8.id, np.empty((5, 32), np.int8), None,
                                               (32, 5), True), NO_BIAS), "scales"),
    (lambda: _core.lm_head_forward(f32(2, 32), f32(2, 32),
                                   Q8.empty("h.0.mlp.c_fc.weight", (32, 32))), "output-major"),
    (lambda: _core.embedding_forward(f32(2, 32), np.zeros(2, np.int64),
                                     Q8.empty("h.0.mlp.c_fc.weight", (32, 32)), f32(4, 32), 2, 0),
     "stored transposed"),
    (lambda: _core.widen_into(f32(5, 32), Q8.empty("wte.weight", (4, 32))), "widen_into"),
])
def test_reject_mismatched_shapes(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_kernel_variant_switch():
    for t in _core.weight_types():
        variants = _core.kernel_variants(t)
        assert variants[0] == "portable"
        prev = _core.set_kernel_variant(t, "portable")
        try:
            assert _core.get_kernel_variant(t) == "portable"
            assert _core.set_kernel_variant(t, "auto") == "portable"
            assert _core.get_kernel_variant(t) == variants[-1]
            with pytest.raises(ValueError, match="unknown kernel variant"):
                _core.set_kernel_variant(t, "fast")
        finally:
            _core.set_kernel_variant(t, prev)
    with pytest.raises(ValueError, match="unknown weight type"):
        _core.set_kernel_variant("int3", "portable")
    if "x86-64-v3" not in _core.kernel_variants("int8"):
        with pytest.raises(ValueError, match="not available"):
            _core.set_kernel_variant("int8", "x86-64-v3")
    with pytest.raises(ValueError, match="direct max rows"):
        _core.set_direct_max_rows(-1)


# ------------------------------------------------------------------ embedding

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
    w = product_weight(q, s)
    _core.lm_head_forward(out, x, w)
    x64, w64 = x.astype(np.float64), q8_widen(q, s)
    check(out, x64 @ w64.T, np.abs(x64) @ np.abs(w64).T, K, "wide-range row",
          act_rounding(x64, w64))
    for bad in (np.inf, np.nan):
        xb = x.copy()
        xb[0, 100] = bad
        _core.lm_head_forward(out, xb, w)
        assert np.isnan(out).all() if bad != bad else (~np.isfinite(out)).all()
