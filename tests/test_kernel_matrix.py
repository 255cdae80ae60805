"""Every product kernel x every weight type x every instruction-set variant this build has
(run where this CPU has it), forced one at a time, against float64 NumPy.

The matrix is generated from the kernels' own table (``_core.weight_types()`` and
``_core.kernel_variants(type, built=True)``), so a new type or variant is tested without editing this
file -- except for its independent reference widening below, whose absence fails the
test.  A variant this build has but this CPU lacks is skipped, with the reason.  For each
(type, variant) both routes run: the direct kernels (forced for every row
count) and the panel route (widened panels into BLAS; for float32, BLAS itself).  Operations:
the Conv1D product with and without bias (``matmul_forward``), the output head
(``lm_head_forward``) and the embedding (``embedding_forward``); rows 1 to 33 (one-row
kernels, every tile shape, past the direct limit), on 1 thread and on 3 (uneven column splits,
K split three ways), over shapes that hit every tail: rows past a tile, columns past a
16- or 32-column strip or a W-row tile, K past a 64-row block, an 8- or 16-lane vector or a
scale block (and fewer than 16 blocks: the masked scale loads of the avx512 one-row kernel),
several weight panels.
"""

from __future__ import annotations

import numpy as np
import pytest

import gpt2s
from gpt2s import _core
from gpt2s import weight_types

U = 2.0 ** -24
NO_BIAS = np.empty(0, np.float32)


# ------------------------------------------------------------------ independent references
# How each type's stored elements become float64, derived here from the format's definition
# (not through _core), and how to draw random stored weights of the type.

def _bf16_widen(h):
    return (h.astype(np.uint32) << 16).view(np.float32).astype(np.float64)


def _bf16_round(x):
    """float32 -> bfloat16 bits, round to nearest even (finite inputs)."""
    u = np.ascontiguousarray(x, np.float32).view(np.uint32).astype(np.uint64)
    return ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)


def _q8_widen(q, s):
    d = s.view(np.float16).astype(np.float64)
    return q.astype(np.float64) * np.repeat(d, 32, axis=1)


def _q4_widen(p, s):
    """4-bit blocks: byte j of a block of 16 holds weight j (low nibble) and j + 16 (high)."""
    rows, nb = s.shape
    b = p.reshape(rows, nb, 16)
    q = np.concatenate([b & 15, b >> 4], axis=2).reshape(rows, nb * 32).astype(np.float64) - 8
    return q * np.repeat(s.view(np.float16).astype(np.float64), 32, axis=1)


REFERENCE = {
    # type: (widen(data, scales) -> float64 of the stored layout, draw(rng, rows, cols))
    "float32": (lambda d, s: d.astype(np.float64),
                lambda rng, r, c: (rng.standard_normal((r, c)).astype(np.float32), None)),
    "bfloat16": (lambda d, s: _bf16_widen(d),
                 lambda rng, r, c: (_bf16_round(rng.standard_normal((r, c))), None)),
    "int8": (lambda d, s: _q8_widen(d, s),
             lambda rng, r, c: (rng.integers(-127, 128, (r, c)).astype(np.int8),
                                rng.uniform(1e-3, 0.1, (r, c // 32)).astype(np.float16)
                                .view(np.uint16))),
    "int4": (lambda d, s: _q4_widen(d, s),
             lambda rng, r, c: (rng.integers(0, 256, (r, c // 2)).astype(np.uint8),
                                rng.uniform(-0.1, 0.1, (r, c // 32)).astype(np.float16)
                                .view(np.uint16))),
}

# every variant this build has, also those this CPU cannot run (skipped, saying so)
MATRIX = [(t, v) for t in _core.weight_types() for v in _core.kernel_variants(t, built=True)]


def test_every_type_has_a_reference():
    assert set(_core.weight_types()) == set(REFERENCE), \
        "a weight type without an independent reference widening in this file"


@pytest.fixture(params=MATRIX, ids=[f"{t}-{v}" for t, v in MATRIX])
def variant(request):
    t, v = request.param
    if v not in _core.kernel_variants(t):
        pytest.skip(f"this CPU lacks the {v} instruction set (CPUID; it runs "
                    f"{', '.join(_core.cpu_variants())})")
    previous = _core.set_kernel_variant(t, v)
    yield t, v
    _core.set_kernel_variant(t, previous)


@pytest.fixture(params=["direct", "panel"])
def route(request, variant):
    previous = _core.set_direct_max_rows(1 << 20 if request.param == "direct" else 0)
    yield request.param
    _core.set_direct_max_rows(previous)


@pytest.fixture(params=[1, 3])
def nthreads(request, every_kernel_parallel):
    n = request.param if _core.have_openmp() else 1
    gpt2s.set_num_threads(n)
    return n


def stored(wtype: str, name: str, shape, rng):
    """A random weight of the type for parameter ``name`` with float32 shape ``shape``, and
    its float64 value (the logical tensor)."""
    wt = weight_types.get(wtype)
    widen, draw = REFERENCE[wtype]
    transposed = wt.output_major and not weight_types.is_row_major(name)
    rows, cols = (shape[1], shape[0]) if transposed else shape
    data, scales = draw(rng, rows, cols)
    w64 = widen(data, scales)
    if transposed:
        w64 = w64.T
    if wtype == "float32":
        return data, w64
    return wt.from_stored(name, data, scales), w64


def check(got, want, scale, K, what, extra=0.0):
    """|got - want| <= 4 sqrt(K) u scale elementwise (scale: the sum of |terms|): the usual
    size of float32 rounding in a sum of K products; an indexing mistake is off by O(scale)."""
    assert np.isfinite(got).all(), f"{what}: non-finite output"
    err = np.abs(got.astype(np.float64) - want)
    bound = 4.0 * np.sqrt(max(K, 1)) * U * scale + extra + 1e-30
    worst = float((err / bound).max()) if err.size else 0.0
    assert worst <= 1.0, f"{what}: error {worst:.2f} x the rounding bound"


def activation_rounding(wtype, variant, route, x64, w_out64):
    """The error the direct int8 and 4-bit kernels add by rounding the activations per block of
    32, times |w|, summed; 0 elsewhere.  int8's one-row kernel rounds the row to int16
    (|x - xq dx| <= max|x of the block| / 65534); the 4-bit kernels round every row, whatever
    their number, to int8 (<= max|x| / 254, llama.cpp's Q8_0 activations)."""
    if wtype not in ("int8", "int4") or route != "direct" or variant == "portable":
        return 0.0
    if wtype == "int8" and x64.shape[0] != 1:
        return 0.0
    M, K = x64.shape
    amax = np.repeat(np.abs(x64).reshape(M, K // 32, 32).max(axis=2), 32, axis=1)
    step = 254 if wtype == "int4" else 65534
    return amax / step * 1.01 @ np.abs(w_out64).T


ROWS = [1, 2, 3, 5, 8, 13, 33]


def shapes(wtype):
    """(K, N): K 7/13 below a vector or with a lane tail, 48 = 32 + 16, 64 one block, 65/130 a
    block plus a tail, 8200 past the one-row head kernel's stack scratch; N 1/5 below a strip
    or tile, 16 one strip, 17/37/100 with tails; 3072 x 100 spans two panels.  Blocked types:
    K a multiple of the block (1, 2, 3 blocks, GPT-2's 768 and 3072)."""
    block = _core.weight_type_info(wtype)["block"]
    if block:
        return [(block, 1), (block, 7), (2 * block, 17), (3 * block, 37), (768, 10),
                (3072, 100)]
    return [(1, 5), (7, 1), (13, 37), (48, 9), (64, 16), (65, 17), (130, 100), (3072, 100),
            (8200, 3)]


@pytest.mark.parametrize("M", ROWS)
def test_matmul_forward(variant, route, nthreads, M):
    wtype, v = variant
    rng = np.random.default_rng(M)
    for K, N in shapes(wtype):
        x = rng.standard_normal((M, K)).astype(np.float32)
        w, w64 = stored(wtype, "h.0.mlp.c_fc.weight", (K, N), rng)
        b = rng.standard_normal(N).astype(np.float32)
        x64 = x.astype(np.float64)
        scale = np.abs(x64) @ np.abs(w64)
        extra = activation_rounding(wtype, v, route, x64, w64.T)
        out = np.full((M, N), np.nan, np.float32)
        _core.matmul_forward(out, x, w, b)
        check(out, x64 @ w64 + b, scale + np.abs(b), K + 1, ("bias", M, K, N), extra)
        out[:] = np.nan
        _core.matmul_forward(out, x, w, NO_BIAS)
        check(out, x64 @ w64, scale, K, ("no bias", M, K, N), extra)


@pytest.mark.parametrize("M", ROWS)
def test_lm_head_forward(variant, route, nthreads, M):
    wtype, v = variant
    rng = np.random.default_rng(100 + M)
    for K, V in shapes(wtype):
        x = rng.standard_normal((M, K)).astype(np.float32)
        w, w64 = stored(wtype, "wte.weight", (V, K), rng)
        x64 = x.astype(np.float64)
        out = np.full((M, V), np.nan, np.float32)
        _core.lm_head_forward(out, x, w)
        check(out, x64 @ w64.T, np.abs(x64) @ np.abs(w64).T, K, (M, K, V),
              activation_rounding(wtype, v, route, x64, w64))


@pytest.mark.parametrize("split_k", [True, False], ids=["split-k", "split-columns"])
def test_one_row_team_splits(variant, every_kernel_parallel, split_k):
    """One row on a team of 3: K split in three runs of whole rows (partials added in thread
    order) or the columns split in three blocks; both give the product."""
    wtype, v = variant
    gpt2s.set_num_threads(3)
    previous = _core.set_split_k(split_k)
    try:
        rng = np.random.default_rng(50)
        block = _core.weight_type_info(wtype)["block"] or 1
        for K, N in [(192, 5), (6 * block * 4, 37), (768, 100), (3072, 48)]:
            x = rng.standard_normal((1, K)).astype(np.float32)
            w, w64 = stored(wtype, "h.0.mlp.c_proj.weight", (K, N), rng)
            b = rng.standard_normal(N).astype(np.float32)
            x64 = x.astype(np.float64)
            out = np.full((1, N), np.nan, np.float32)
            _core.matmul_forward(out, x, w, b)
            check(out, x64 @ w64 + b, np.abs(x64) @ np.abs(w64) + np.abs(b), K + 1, (K, N),
                  activation_rounding(wtype, v, "direct", x64, w64.T))
    finally:
        _core.set_split_k(previous)


def test_embedding_forward(variant, nthreads):
    wtype, _ = variant
    rng = np.random.default_rng(9)
    V, C, n_ctx, B, T, pos0 = 50, 64, 16, 3, 5, 4
    w, w64 = stored(wtype, "wte.weight", (V, C), rng)
    wpe = rng.standard_normal((n_ctx, C)).astype(np.float32)
    idx = rng.integers(0, V, B * T).astype(np.int64)
    pos = pos0 + np.arange(B * T) % T
    out = np.full((B * T, C), np.nan, np.float32)
    _core.embedding_forward(out, idx, w, wpe, T, pos0)
    # widening is exact, so is one float32 addition of the two rows
    np.testing.assert_array_equal(out, w64.astype(np.float32)[idx] + wpe[pos])
    bad = idx.copy()
    bad[7] = V
    with pytest.raises(ValueError, match=f"token id {V} at 7"):
        _core.embedding_forward(out, bad, w, wpe, T, pos0)
    with pytest.raises(ValueError, match="pos0=12"):
        _core.embedding_forward(out, idx, w, wpe, T, 12)


def test_packed_weights_read_only(variant):
    """Stored weights may be read-only views of a file mapping."""
    wtype, _ = variant
    rng = np.random.default_rng(8)
    x = rng.standard_normal((2, 64)).astype(np.float32)
    w, w64 = stored(wtype, "h.0.attn.c_proj.weight", (64, 16), rng)
    for a in ((w,) if wtype == "float32" else (w.data, w.scales)):
        if a is not None:
            a.setflags(write=False)
    out = np.empty((2, 16), np.float32)
    _core.matmul_forward(out, x, w, NO_BIAS)
    x64 = x.astype(np.float64)
    check(out, x64 @ w64, np.abs(x) @ np.abs(w64), 64, "read-only",
          activation_rounding(wtype, variant[1], "direct", x64, w64.T))


# the levels whose kernels compute their base's integer block sums with other instructions
# and then the same float32 operations: x86-64-v3's outputs bit for bit
SAME_INTEGERS = [("int8", "avx-vnni"), ("int4", "avx-vnni"), ("int4", "avx512"),
                 ("int4", "avx512-vnni")]


@pytest.mark.parametrize("wtype,level", SAME_INTEGERS, ids=[f"{t}-{v}" for t, v in SAME_INTEGERS])
def test_vnni_same_integers(wtype, level):
    """int8's avx-vnni one-row kernel (vpdpwssd in place of vpmaddwd + vpaddd) and int4's
    avx-vnni and avx512-vnni kernels (2 vpdpbusd in place of 2 vpmaddubsw, a vpaddw and a
    vpmaddwd) and avx512 kernels (those on 512 bits), every row count, give x86-64-v3's
    float32 outputs bit for bit."""
    if level not in _core.kernel_variants(wtype):
        pytest.skip(f"this CPU or build has no {level} {wtype} kernels (it runs "
                    f"{', '.join(_core.cpu_variants())})")
    rng = np.random.default_rng(5)
    w, _ = stored(wtype, "h.0.mlp.c_fc.weight", (800, 301), rng)   # 25 blocks: an odd one last
    previous_rows = _core.set_direct_max_rows(32)
    try:
        for M in ((1,) if wtype == "int8" else (1, 2, 3, 4, 7, 8, 32)):
            x = rng.standard_normal((M, 800)).astype(np.float32)
            outs = []
            for v in ("x86-64-v3", level):
                previous = _core.set_kernel_variant(wtype, v)
                try:
                    out = np.empty((M, 301), np.float32)
                    _core.matmul_forward(out, x, w, NO_BIAS)
                    outs.append(out)
                finally:
                    _core.set_kernel_variant(wtype, previous)
            np.testing.assert_array_equal(outs[0], outs[1], err_msg=f"M={M}")
    finally:
        _core.set_direct_max_rows(previous_rows)
