"""The 4-bit type's integer kernels (x86-64-v3) against their definition, written here in NumPy.

The direct 4-bit kernels round each row of activations to int8 per block of 32 (llama.cpp's
Q8_0 rounding of activations: xq = round(x 127 / max|x|), dx = max|x| / 127) and take each
block's dot product with the weights (q - 8) exactly in integers, scaled by the float32
product d_w dx.  This file computes that definition independently (float64 sums of exact
integer block sums times the float32 scale products) and checks:

- every row count (one row, every tile, rows past a tile), every K tail (an odd last block),
  every thread count: the kernel equals the definition to float32 rounding;
- a row's outputs do not depend on the other rows of the call, nor on their number, nor on
  the thread count: bit for bit (batch decoding gives a row what decoding it alone gives);
- the definition's distance from the exact float64 product is the activation rounding bound;
- a non-finite activation row gives the float route's non-finite outputs;
- the avx-vnni, avx512 and avx512-vnni kernels (the same block sums from vpdpbusd, or on
  512 bits) give x86-64-v3's outputs bit for bit, on every row count 1 to 32 and every tail of K (odd and even block
  counts, the one-row kernel's groups of 8 blocks and what follows) and of N (the W-row
  tiles), and equal the definition.
"""

from __future__ import annotations

import numpy as np
import pytest

import gpt2s
from gpt2s import _core, weight_types

U = 2.0 ** -24
NO_BIAS = np.empty(0, np.float32)

pytestmark = pytest.mark.skipif("x86-64-v3" not in _core.kernel_variants("int4"),
                                reason="this CPU or build has no x86-64-v3 int4 kernels "
                                       f"(variants: {_core.kernel_variants('int4')})")


@pytest.fixture(autouse=True)
def v3_direct():
    prev_v = _core.set_kernel_variant("int4", "x86-64-v3")
    prev_rows = _core.set_direct_max_rows(32)
    prev_nt = gpt2s.get_num_threads()
    yield
    _core.set_kernel_variant("int4", prev_v)
    _core.set_direct_max_rows(prev_rows)
    gpt2s.set_num_threads(prev_nt)


def draw(rng, N, K):
    """Random stored 4-bit weights (N, K) of the output-major layout: nibbles and fp16 scales."""
    data = rng.integers(0, 256, (N, K // 2)).astype(np.uint8)
    scales = rng.uniform(-0.1, 0.1, (N, K // 32)).astype(np.float16).view(np.uint16)
    return data, scales


def nibbles(data):
    """(N, K) integers 0..15: byte j of a block of 16 holds weight j (low) and j + 16 (high)."""
    N = data.shape[0]
    b = data.reshape(N, -1, 16)
    return np.concatenate([b & 15, b >> 4], axis=2).reshape(N, -1).astype(np.int64)


def round_rows(x):
    """The kernels' int8 rounding of float32 rows per block of 32, in float32 arithmetic:
    xq (M, K) integers, dx (M, K / 32) float32."""
    M, K = x.shape
    blocks = x.reshape(M, K // 32, 32)
    amax = np.abs(blocks).max(axis=2)
    with np.errstate(divide="ignore"):
        inv = np.where(amax > 0, np.float32(127) / amax, np.float32(0)).astype(np.float32)
    xq = np.rint((blocks * inv[:, :, None]).astype(np.float32)).astype(np.int64)
    return xq.reshape(M, K), (amax / np.float32(127)).astype(np.float32)


def definition(x, data, scales):
    """out (M, N) float64 and the sum of |terms| (M, N): sum over blocks of the float32
    product d_w dx times the exact integer sum of (q - 8) xq."""
    M, K = x.shape
    N = data.shape[0]
    nb = K // 32
    xq, dx = round_rows(x)
    q = nibbles(data) - 8
    d = scales.view(np.float16).astype(np.float32)
    P = np.einsum("mbk,nbk->mnb", xq.reshape(M, nb, 32), q.reshape(N, nb, 32))
    s = (d[None, :, :] * dx[:, None, :]).astype(np.float32).astype(np.float64)
    Pa = np.einsum("mbk,nbk->mnb", np.abs(xq).reshape(M, nb, 32),
                   (np.abs(q) + 8).reshape(N, nb, 32))
    return (P * s).sum(axis=2), (Pa * np.abs(s)).sum(axis=2)


def product(x, w, lm_head=False):
    out = np.full((x.shape[0], w.shape[0] if lm_head else w.shape[1]), np.nan, np.float32)
    if lm_head:
        _core.lm_head_forward(out, x, w)
    else:
        _core.matmul_forward(out, x, w, NO_BIAS)
    return out


SHAPES = [(32, 1), (32, 7), (64, 5), (96, 37), (160, 9), (768, 100), (3072, 48), (8224, 3)]


@pytest.mark.parametrize("K,N", SHAPES)
@pytest.mark.parametrize("nt", [1, 3])
def test_kernel_is_its_definition(K, N, nt, every_kernel_parallel):
    """Rows 1 to 32 (the one-row kernel, every tile, aliased rows), weights both as a Conv1D
    weight and as the output head, on 1 thread and on 3 (uneven column blocks)."""
    if nt > 1 and not _core.have_openmp():
        pytest.skip("built without OpenMP: one thread only")
    gpt2s.set_num_threads(nt)
    rng = np.random.default_rng(K * 1000 + N)
    data, scales = draw(rng, N, K)
    wt = weight_types.get("int4")
    conv = wt.from_stored("h.0.mlp.c_fc.weight", data, scales)   # logical (K, N)
    head = wt.from_stored("wte.weight", data, scales)            # logical (N, K)
    x = (rng.standard_normal((33, K)) * rng.uniform(0.1, 10, (33, 1))).astype(np.float32)
    for M in (1, 2, 3, 4, 5, 8, 13, 32):
        want, scale = definition(x[:M], data, scales)
        bound = 4.0 * np.sqrt(K // 32 + 8) * U * scale + 1e-30
        for got in (product(x[:M], conv), product(x[:M], head, lm_head=True)):
            err = np.abs(got.astype(np.float64) - want)
            assert (err <= bound).all(), (M, float((err / bound).max()))


def test_rows_do_not_depend_on_the_batch(every_kernel_parallel):
    """Each row's outputs bit for bit what the row alone gets, on 1 and 2 threads, for every
    row count the direct kernels take."""
    rng = np.random.default_rng(3)
    K, N = 768, 300
    data, scales = draw(rng, N, K)
    w = weight_types.get("int4").from_stored("h.0.attn.c_attn.weight", data, scales)
    x = rng.standard_normal((32, K)).astype(np.float32)
    gpt2s.set_num_threads(1)
    alone = np.concatenate([product(x[m:m + 1], w) for m in range(32)])
    for nt in (1, 2):
        gpt2s.set_num_threads(nt)
        for M in (2, 3, 4, 7, 16, 32):
            np.testing.assert_array_equal(product(x[:M], w), alone[:M], err_msg=f"M={M}")
            np.testing.assert_array_equal(product(x[M // 2:M], w), alone[M // 2:M])


def test_definition_error_against_float64():
    """The definition's error from the exact product is within the int8 activation rounding
    (|x - xq dx| <= max|x of the block| / 254, times |w|)."""
    rng = np.random.default_rng(4)
    K, N = 768, 64
    data, scales = draw(rng, N, K)
    x = rng.standard_normal((5, K)).astype(np.float32)
    w64 = (nibbles(data) - 8) * np.repeat(scales.view(np.float16).astype(np.float64), 32, axis=1)
    want, scale = definition(x, data, scales)
    amax = np.repeat(np.abs(x).reshape(5, -1, 32).max(axis=2), 32, axis=1).astype(np.float64)
    bound = amax / 254 * 1.01 @ np.abs(w64).T + 4 * np.sqrt(K) * U * scale
    assert (np.abs(want - x.astype(np.float64) @ w64.T) <= bound).all()
    got = product(x, weight_types.get("int4").from_stored("wte.weight", data, scales), True)
    rel = np.linalg.norm(got - x.astype(np.float64) @ w64.T) / np.linalg.norm(x @ w64.T)
    assert 1e-4 < rel < 2e-2, rel   # rounded to int8 (not float32-exact), and close


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_non_finite_row(bad):
    """A NaN or inf in one row: that row's outputs are not finite (the float route then runs
    the call), the other rows are still the product."""
    rng = np.random.default_rng(6)
    K, N = 96, 20
    data, scales = draw(rng, N, K)
    w = weight_types.get("int4").from_stored("h.0.mlp.c_fc.weight", data, scales)
    x = rng.standard_normal((3, K)).astype(np.float32)
    x[1, 40] = bad
    out = product(x, w)
    assert not np.isfinite(out[1]).any()
    w64 = np.asarray(w).astype(np.float64)
    for m in (0, 2):
        ref = x[m].astype(np.float64) @ w64
        assert np.allclose(out[m], ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())


# block counts 1 to 25: odd (the last block alone) and even, below and past the one-row
# kernel's groups of 8 blocks, and one group plus every remainder of pairs
VNNI_KS = [32 * nb for nb in (1, 2, 3, 4, 5, 7, 8, 9, 10, 11, 14, 16, 17, 24, 25)]
VNNI_NS = [1, 2, 3, 4, 5, 6, 7, 9, 33]


@pytest.mark.parametrize("level", ["avx-vnni", "avx512", "avx512-vnni"])
def test_levels_above_v3_equal_x86_64_v3(level):
    """Every row count 1 to 32, every K and N tail, accumulate on and off (matmul_forward adds
    the bias after): the level's outputs are x86-64-v3's bit for bit, and the definition's."""
    if level not in _core.kernel_variants("int4"):
        pytest.skip(f"this CPU or build has no {level} int4 kernels (it runs "
                    f"{', '.join(_core.kernel_variants('int4'))})")
    gpt2s.set_num_threads(1)
    wt = weight_types.get("int4")
    rng = np.random.default_rng(27)
    compared = 0
    for K in VNNI_KS:
        for N in VNNI_NS:
            data, scales = draw(rng, N, K)
            conv = wt.from_stored("h.0.mlp.c_fc.weight", data, scales)
            head = wt.from_stored("wte.weight", data, scales)
            x = (rng.standard_normal((32, K)) * rng.uniform(0.1, 10, (32, 1))).astype(np.float32)
            want, scale = definition(x, data, scales)
            bound = 4.0 * np.sqrt(K // 32 + 8) * U * scale + 1e-30
            for M in range(1, 33):
                outs = {}
                for v in ("x86-64-v3", level):
                    _core.set_kernel_variant("int4", v)
                    outs[v] = (product(x[:M], conv), product(x[:M], head, lm_head=True))
                for ref, got in zip(outs["x86-64-v3"], outs[level]):
                    np.testing.assert_array_equal(got, ref, err_msg=f"{level} K={K} N={N} M={M}")
                    err = np.abs(got.astype(np.float64) - want[:M])
                    assert (err <= bound[:M]).all(), (K, N, M, float((err / bound[:M]).max()))
                    compared += got.size
    assert compared == 2 * 32 * 33 // 2 * sum(VNNI_NS) * len(VNNI_KS)
