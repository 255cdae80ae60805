"""The public KV-cache interface (GPT2.kv_cache, GPT2.forward_cached, KVCache): the logits of
every decoding step against the float64 reference (tests/ref.py) on the whole sequence, the
positions a cache holds, its ownership, and the errors that name what is wrong."""

import numpy as np
import pytest

import ref
from gpt2s import GPT2
from gpt2s.buffers import KVCache


@pytest.fixture(scope="module")
def setup(make_config, make_model):
    cfg = make_config(n_layer=2, n_head=2, head_size=16, vocab_size=211, n_ctx=24)
    m = make_model(cfg, seed=5)
    params64 = {k: v.astype(np.float64) for k, v in m.params.items()}
    return cfg, m, params64


def reference_logits(cfg, params64, idx):
    return ref.forward(params64, idx, n_head=cfg.n_head, eps=cfg.layer_norm_epsilon)[0]


def test_each_step_equals_the_full_sequence_in_float64(setup):
    """A prefill of 5 positions, one position at a time to the end of the context, then a
    chunk of several positions: each call's logits are those of its last position in a
    forward of the whole sequence so far (float64 reference)."""
    cfg, m, params64 = setup
    B, T = 3, cfg.n_ctx
    idx = np.random.default_rng(0).integers(0, cfg.vocab_size, (B, T))
    want = reference_logits(cfg, params64, idx)
    cache = m.kv_cache(B)
    assert (cache.rows, cache.capacity) == (B, cfg.n_ctx)
    got = m.forward_cached(idx[:, :5], 0, cache)
    assert got.shape == (B, cfg.vocab_size) and got.dtype == np.float32
    assert ref.rel_err(got, want[:, 4]) < 1e-5
    for t in range(5, T):
        got = m.forward_cached(idx[:, t:t + 1], t, cache)
        assert ref.rel_err(got, want[:, t]) < 1e-5, t
    # positions 0..9 rewritten by a prefill, then a chunk of 7 positions after them
    m.forward_cached(idx[:, :10], 0, cache)
    got = m.forward_cached(idx[:, 10:17], 10, cache)
    assert ref.rel_err(got, want[:, 16]) < 1e-5


def test_a_one_dimensional_idx_is_one_sequence(setup):
    cfg, m, params64 = setup
    seq = np.array([3, 1, 4, 1, 5, 9, 2, 6])
    want = reference_logits(cfg, params64, seq)
    cache = m.kv_cache(1, positions=8)
    m.forward_cached(seq[:6], 0, cache)
    assert ref.rel_err(m.forward_cached(seq[6:7], 6, cache)[0], want[0, 6]) < 1e-5
    assert ref.rel_err(m.forward_cached(seq[7:], 7, cache)[0], want[0, 7]) < 1e-5


def test_capacity_is_what_was_asked_at_most_n_ctx(setup):
    cfg, m, _ = setup
    cache = m.kv_cache(2, positions=6)
    assert cache.keys.shape == cache.values.shape == (cfg.n_layer, 2, 6, cfg.n_embd)
    assert m.kv_cache(1, positions=10 * cfg.n_ctx).capacity == cfg.n_ctx
    idx = np.ones((2, 6), np.int64)
    m.forward_cached(idx, 0, cache)   # the whole capacity
    with pytest.raises(ValueError, match=r"position 6 is beyond the KV cache's 6 positions"):
        m.forward_cached(idx[:, :1], 6, cache)
    with pytest.raises(ValueError, match=r"position 7 is beyond the KV cache's 6 positions"):
        m.forward_cached(idx[:, :3], 5, cache)
    full = m.kv_cache(2)
    with pytest.raises(ValueError, match=rf"position {cfg.n_ctx} is beyond the context "
                                         rf"n_ctx={cfg.n_ctx}"):
        m.forward_cached(idx[:, :2], cfg.n_ctx - 1, full)


def test_interleaved_caches_do_not_disturb_each_other(setup):
    """Two sequences decoded step by step in alternation, each in its own cache, give the
    same logits bit for bit as each decoded alone."""
    cfg, m, _ = setup
    rng = np.random.default_rng(1)
    a, b = rng.integers(0, cfg.vocab_size, (2, 1, 12))

    def alone(seq):
        cache = m.kv_cache(1)
        out = [m.forward_cached(seq[:, :4], 0, cache)]
        out += [m.forward_cached(seq[:, t:t + 1], t, cache) for t in range(4, 12)]
        return out

    want_a, want_b = alone(a), alone(b)
    ca, cb = m.kv_cache(1), m.kv_cache(1)
    got_a, got_b = [m.forward_cached(a[:, :4], 0, ca)], [m.forward_cached(b[:, :4], 0, cb)]
    for t in range(4, 12):
        got_a.append(m.forward_cached(a[:, t:t + 1], t, ca))
        got_b.append(m.forward_cached(b[:, t:t + 1], t, cb))
    for got, want in ((got_a, want_a), (got_b, want_b)):
        assert all(np.array_equal(g, w) for g, w in zip(got, want))


def test_view_rows_shares_the_cache(setup):
    """A prefill through a view of rows 0..0 fills row 0 of the whole cache (what generation
    does for num_samples > 1), exactly as a one-row cache would hold it."""
    cfg, m, _ = setup
    prompt = np.array([[7, 8, 9, 10]])
    whole = m.kv_cache(3, positions=8)
    view = whole.view_rows(0, 1)
    assert isinstance(view, KVCache) and view.rows == 1 and view.capacity == 8
    assert np.shares_memory(view.keys, whole.keys)
    m.forward_cached(prompt, 0, view)
    one = m.kv_cache(1, positions=8)
    m.forward_cached(prompt, 0, one)
    assert np.array_equal(whole.keys[:, 0, :4], one.keys[:, 0, :4])
    assert np.array_equal(whole.values[:, 0, :4], one.values[:, 0, :4])


@pytest.mark.parametrize("call, error, message", [
    (lambda m, c: m.forward_cached([[1, 2]], -1, c), ValueError, "pos0 must be >= 0"),
    (lambda m, c: m.forward_cached([[1, 2]], 1.0, c), TypeError, "pos0 must be an integer"),
    (lambda m, c: m.forward_cached([[1, 999]], 0, c), ValueError, r"token id 999 at \(0, 1\)"),
    (lambda m, c: m.forward_cached([[1.5]], 0, c), TypeError, "idx must be an integer array"),
    (lambda m, c: m.forward_cached([[1], [2]], 0, c), ValueError, "B=2 rows"),
    (lambda m, c: m.forward_cached([[1]], 0, (c.keys, c.values)), TypeError,
     "cache must be a KVCache"),
    (lambda m, c: m.kv_cache(0), ValueError, "rows must be >= 1"),
    (lambda m, c: m.kv_cache(2, positions=0), ValueError, "positions must be >= 1"),
    (lambda m, c: m.kv_cache(2.0), TypeError, "rows must be an integer"),
])
def test_bad_arguments_are_named(setup, call, error, message):
    _, m, _ = setup
    cache = m.kv_cache(1)
    with pytest.raises(error, match=message):
        call(m, cache)


def test_a_cache_of_another_model_is_refused(setup, make_config):
    cfg, m, _ = setup
    other = GPT2(make_config(n_layer=3, n_head=2, head_size=16, vocab_size=211, n_ctx=24))
    with pytest.raises(ValueError, match="does not fit a model of n_layer=2"):
        m.forward_cached([[1, 2]], 0, other.kv_cache(1))


def test_kvcache_refuses_arrays_that_are_not_a_cache():
    keys = np.zeros((2, 1, 4, 8), np.float32)
    with pytest.raises(ValueError, match="two float32 arrays of one shape"):
        KVCache(keys, np.zeros((2, 1, 4, 8), np.float64))
    with pytest.raises(ValueError, match="two float32 arrays of one shape"):
        KVCache(keys, np.zeros((2, 1, 5, 8), np.float32))
    with pytest.raises(ValueError, match="two float32 arrays of one shape"):
        KVCache(keys[0], keys[0])
