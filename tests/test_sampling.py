"""The sampling kernels (kernels/sampling.pxi) against an independent float64 NumPy definition:
exact supports for top-k / top-p, the distribution itself, inverse-CDF sampling on a grid
of uniforms, and chi-square goodness of fit of seeded samples."""

import numpy as np
import pytest

from conftest import assert_chi_square
from gpt2s import _core


# ------------------------------------------------------------------ the reference

def reference_probs(logits, temperature=1.0, top_k=None, top_p=None):
    """Hugging Face's order: temperature, then top-k, then top-p; float64."""
    x = np.asarray(logits, np.float64) / temperature
    keep = np.ones(x.shape, bool)
    if top_k is not None and top_k < x.size:
        kth = np.sort(x)[::-1][top_k - 1]
        keep &= x >= kth
    p = np.where(keep, np.exp(x - x[keep].max()), 0.0)
    p /= p.sum()
    if top_p is not None and top_p < 1.0:
        order = np.argsort(-p, kind="stable")
        csum = np.cumsum(p[order])
        m = int(np.searchsorted(csum, top_p)) + 1  # smallest prefix with mass >= top_p
        nucleus = np.zeros(x.shape, bool)
        nucleus[order[:m]] = True
        p = np.where(nucleus, p, 0.0)
        p /= p.sum()
    return p


def nucleus_margin(p, top_p):
    """Distance of top_p from the cumulative masses of the sorted distribution (how far the
    nucleus is from changing): tests pick top_p values away from these boundaries."""
    csum = np.cumsum(np.sort(p)[::-1])
    return np.min(np.abs(csum - top_p))


def kernel_probs(logits, temperature=1.0, top_k=None, top_p=None):
    x = np.ascontiguousarray(np.atleast_2d(logits), np.float32)
    out = np.empty_like(x)
    _core.sampling_distribution(out, x, temperature, top_k or 0, 1.0 if top_p is None else top_p)
    return out


def kernel_sample(logits, uniforms, temperature=1.0, top_k=None, top_p=None):
    """One token per uniform, all from the same logits row."""
    u = np.ascontiguousarray(uniforms, np.float64)
    x = np.ascontiguousarray(np.broadcast_to(np.asarray(logits, np.float32), (u.size, len(logits))))
    out = np.empty(u.size, np.int64)
    w = np.empty_like(x)
    _core.sample_rows(out, x, u, temperature, top_k or 0, 1.0 if top_p is None else top_p, w)
    return out


@pytest.fixture(scope="module")
def small_logits():
    # 24 distinct logits spread over a few nats, no ties
    rng = np.random.default_rng(1234)
    return (rng.standard_normal(24) * 1.5).astype(np.float32)


@pytest.fixture(scope="module")
def vocab_logits():
    # a GPT-2-sized row
    rng = np.random.default_rng(99)
    return (rng.standard_normal(50257) * 2.0).astype(np.float32)


CASES = [
    dict(),
    dict(temperature=0.7),
    dict(temperature=2.5),
    dict(top_k=1),
    dict(top_k=5),
    dict(top_k=5, temperature=0.5),
    dict(top_p=0.5),
    dict(top_p=0.83),
    dict(top_k=10, top_p=0.6, temperature=1.3),
    dict(top_p=1.0),
    dict(top_k=24),
]


# ------------------------------------------------------------------ greedy

def test_argmax_rows_matches_numpy_including_ties():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((37, 1001)).astype(np.float32)
    x[3, [10, 500, 900]] = 50.0          # ties: the first index wins, as numpy.argmax
    x[4, :] = 0.0
    x[5, -1] = 9.0                       # the last position
    out = np.empty(37, np.int64)
    _core.argmax_rows(out, x)
    np.testing.assert_array_equal(out, np.argmax(x, axis=1))
    assert out[3] == 10 and out[4] == 0 and out[5] == 1000


def test_argmax_rows_rejects_mismatched_out():
    with pytest.raises(ValueError):
        _core.argmax_rows(np.empty(2, np.int64), np.zeros((3, 5), np.float32))


# ------------------------------------------------------------------ the distribution

@pytest.mark.parametrize("case", CASES, ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items())
                         or "plain")
def test_distribution_equals_reference(small_logits, case):
    ref = reference_probs(small_logits, **case)
    if case.get("top_p") not in (None, 1.0):
        tk = case.get("top_k")
        base = reference_probs(small_logits, case.get("temperature", 1.0), tk)
        assert nucleus_margin(base, case["top_p"]) > 1e-3  # the test itself is well posed
    got = kernel_probs(small_logits, **case)[0]
    np.testing.assert_array_equal(got > 0, ref > 0)       # exactly the same support
    np.testing.assert_allclose(got, ref, rtol=2e-5, atol=1e-7)


@pytest.mark.parametrize("top_k", [1, 2, 40, 1000, 50256])
def test_top_k_support_is_the_k_largest(vocab_logits, top_k):
    p = kernel_probs(vocab_logits, top_k=top_k)[0]
    support = np.flatnonzero(p)
    expected = np.argsort(-vocab_logits.astype(np.float64), kind="stable")[:top_k]
    assert set(support.tolist()) == set(expected.tolist())
    np.testing.assert_allclose(p, reference_probs(vocab_logits, top_k=top_k), rtol=2e-5,
                               atol=1e-9)


@pytest.mark.parametrize("top_p", [0.05, 0.3, 0.9, 0.95])
def test_top_p_support_is_the_nucleus(vocab_logits, top_p):
    ref = reference_probs(vocab_logits, top_p=top_p)
    assert nucleus_margin(reference_probs(vocab_logits), top_p) > 1e-6
    p = kernel_probs(vocab_logits, top_p=top_p)[0]
    np.testing.assert_array_equal(np.flatnonzero(p), np.flatnonzero(ref))
    np.testing.assert_allclose(p, ref, rtol=1e-4, atol=1e-9)


def test_top_k_keeps_exact_ties_at_the_boundary():
    x = np.array([3.0, 1.0, 2.0, 2.0, 2.0, 0.0], np.float32)
    p = kernel_probs(x, top_k=2)[0]
    # the 2nd largest value (2.0) is shared by three tokens: all are kept (documented)
    np.testing.assert_array_equal(np.flatnonzero(p), [0, 2, 3, 4])


def test_distribution_is_stable_for_extreme_logits():
    x = np.array([1e4, 1e4 - 1.0, -1e4, 0.0, 3e4 - 5.0, 3e4], np.float32)
    p = kernel_probs(x)[0]
    assert np.isfinite(p).all()
    np.testing.assert_allclose(p, reference_probs(x), atol=1e-7)
    # a tiny temperature is (numerically) greedy; a huge one is (nearly) uniform
    p = kernel_probs(x, temperature=1e-20)[0]
    assert p[5] == pytest.approx(1.0)
    p = kernel_probs(np.arange(10, dtype=np.float32), temperature=1e6)[0]
    np.testing.assert_allclose(p, 0.1, rtol=1e-4)


def test_rows_are_independent_under_threads(vocab_logits):
    # rows run in parallel: each row's result must not depend on its neighbours
    rng = np.random.default_rng(5)
    x = (rng.standard_normal((9, 3000)) * 2).astype(np.float32)
    u = rng.random(9)
    together = np.empty(9, np.int64)
    _core.sample_rows(together, x, u, 0.9, 50, 0.8, np.empty_like(x))
    for b in range(9):
        one = np.empty(1, np.int64)
        _core.sample_rows(one, x[b:b + 1], u[b:b + 1], 0.9, 50, 0.8, np.empty_like(x[b:b + 1]))
        assert one[0] == together[b]
    probs = kernel_probs(x, temperature=0.9, top_k=50, top_p=0.8)
    for b in range(9):
        np.testing.assert_allclose(probs[b], reference_probs(x[b], 0.9, 50, 0.8), rtol=1e-4,
                                   atol=1e-9)


# ------------------------------------------------------------------ sampling

@pytest.mark.parametrize("case", CASES, ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items())
                         or "plain")
def test_inverse_cdf_on_a_grid_of_uniforms(small_logits, case):
    """Sampling is exact inverse-CDF: u in [0, 1) maps to the first token whose cumulative
    probability (index order) exceeds u.  Checked on a fine grid away from the boundaries."""
    ref = reference_probs(small_logits, **case)
    cdf = np.cumsum(ref)
    u = (np.arange(20000) + 0.5) / 20000
    near = np.min(np.abs(u[:, None] - cdf[None, :]), axis=1) < 1e-5
    expected = np.minimum(np.searchsorted(cdf, u, side="right"), len(ref) - 1)
    got = kernel_sample(small_logits, u, **case)
    np.testing.assert_array_equal(got[~near], expected[~near])
    assert np.all(ref[got] > 0)  # even next to a boundary, never outside the support
    # every token of the support is reachable, in proportion to its probability
    counts = np.bincount(got, minlength=len(ref)) / u.size
    np.testing.assert_allclose(counts, ref, atol=2e-4)


def test_extreme_uniforms_stay_in_the_support(vocab_logits):
    u = np.array([0.0, 1e-300, 0.5, 1.0 - 2.0 ** -53, np.nextafter(1.0, 0.0)])
    for case in (dict(top_k=40), dict(top_p=0.9), dict(top_k=100, top_p=0.5, temperature=0.8)):
        ref = reference_probs(vocab_logits, **case)
        got = kernel_sample(vocab_logits, u, **case)
        assert np.all(ref[got] > 0), (case, got)


@pytest.mark.parametrize("case", [dict(top_k=40), dict(top_p=0.9), dict(top_p=0.3, top_k=200),
                                  dict(temperature=0.6, top_p=0.95)])
def test_large_vocab_samples_never_leave_the_support(vocab_logits, case):
    ref = reference_probs(vocab_logits, **case)
    rng = np.random.default_rng(7)
    got = np.concatenate([kernel_sample(vocab_logits, rng.random(200), **case)
                          for _ in range(5)])
    outside = got[ref[got] == 0]
    assert outside.size == 0, f"sampled outside the support: {outside[:10]}"


@pytest.mark.parametrize("case", [dict(), dict(temperature=0.5), dict(temperature=1.7),
                                  dict(top_k=6), dict(top_p=0.7),
                                  dict(top_k=12, top_p=0.8, temperature=1.2)],
                         ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()) or "plain")
def test_chi_square_against_the_exact_distribution(small_logits, case):
    ref = reference_probs(small_logits, **case)
    rng = np.random.default_rng(2024)
    n = 40000
    got = kernel_sample(small_logits, rng.random(n), **case)
    support = ref > 0
    counts = np.bincount(got, minlength=len(ref))
    assert counts[~support].sum() == 0 and counts.sum() == n
    assert_chi_square(counts, ref)


def test_same_uniforms_same_tokens_and_tokens_follow_the_uniforms(vocab_logits):
    u = np.random.default_rng(3).random(300)
    a = kernel_sample(vocab_logits, u, top_p=0.95)
    b = kernel_sample(vocab_logits, u, top_p=0.95)
    np.testing.assert_array_equal(a, b)
    c = kernel_sample(vocab_logits, np.random.default_rng(4).random(300), top_p=0.95)
    assert not np.array_equal(a, c)


# ------------------------------------------------------------------ argument checks

def test_kernel_argument_checks():
    x = np.zeros((2, 8), np.float32)
    out, u, w = np.empty(2, np.int64), np.full(2, 0.5), np.empty_like(x)
    with pytest.raises(ValueError, match="temperature"):
        _core.sample_rows(out, x, u, 0.0, 0, 1.0, w)
    with pytest.raises(ValueError, match="temperature"):
        _core.sample_rows(out, x, u, float("nan"), 0, 1.0, w)
    with pytest.raises(ValueError, match="top_p"):
        _core.sample_rows(out, x, u, 1.0, 0, 0.0, w)
    with pytest.raises(ValueError, match="top_p"):
        _core.sample_rows(out, x, u, 1.0, 0, 1.5, w)
    with pytest.raises(ValueError):
        _core.sample_rows(out, x, u, 1.0, 0, 1.0, np.empty((2, 7), np.float32))
    with pytest.raises(ValueError):
        _core.sample_rows(np.empty(3, np.int64), x, u, 1.0, 0, 1.0, w)
    with pytest.raises(ValueError):
        _core.sampling_distribution(np.empty((1, 8), np.float32), x, 1.0, 0, 1.0)
