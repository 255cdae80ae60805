"""gpt2s forward (logits and loss) against the independent float64 reference tests/ref.py, and
the input validation of forward().

Acceptance: logits and loss within 1e-5 relative (L2 norm of the difference over the L2 norm of
the reference) on random models whose every parameter is perturbed.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

import ref
from gpt2s import GPT2

TOL = 1e-5

# (n_layer, n_head, head_size, vocab, n_ctx, B, T, eps): T > 64 crosses the attention kernel's
# query-block boundary; T == n_ctx uses every position; odd head sizes and vocabularies catch
# stride mistakes; eps != 1e-5 checks that the config's epsilon is used.
CONFIGS = [
    pytest.param(1, 1, 16, 97, 16, 1, 16, 1e-5, id="L1-H1-hs16-T16-B1"),
    pytest.param(2, 2, 16, 211, 64, 3, 64, 1e-5, id="L2-H2-hs16-T64-B3"),
    pytest.param(3, 4, 8, 300, 80, 2, 75, 1e-3, id="L3-H4-hs8-T75-eps1e-3"),
    pytest.param(2, 3, 20, 257, 150, 2, 150, 1e-5, id="L2-H3-hs20-T150=n_ctx"),
    pytest.param(1, 6, 12, 64, 40, 4, 33, 1e-4, id="L1-H6-hs12-T33-B4"),
    pytest.param(4, 2, 32, 503, 32, 1, 1, 1e-5, id="L4-H2-hs32-T1"),
]


def _perturbed_model(cfg, seed, make_params):
    """from_config(seed), then every parameter overwritten with random values through
    m.params[name][...] = ..."""
    m = GPT2.from_config(cfg, seed=seed)
    params = make_params(cfg, seed=seed + 7)
    assert sorted(m.params) == sorted(params)
    for name, value in params.items():
        m.params[name][...] = value
    # the writes went into the model, not into copies
    for name, value in params.items():
        np.testing.assert_array_equal(m.params[name], value, err_msg=name)
    return m, params


@pytest.mark.parametrize("L,NH,HS,V,n_ctx,B,T,eps", CONFIGS)
def test_forward_matches_reference(L, NH, HS, V, n_ctx, B, T, eps, make_config, make_params,
                                   make_batch, record_error, request):
    cfg = make_config(n_layer=L, n_head=NH, head_size=HS, vocab_size=V, n_ctx=n_ctx, eps=eps)
    m, params = _perturbed_model(cfg, seed=L * 100 + NH, make_params=make_params)
    idx, targets = make_batch(cfg, B, T, seed=B * 1000 + T, ignore_frac=0.25)

    logits, loss = m.forward(idx, targets)
    ref_logits, ref_loss, _ = ref.forward(params, idx, targets, n_head=NH, eps=eps)

    assert logits.dtype == np.float32 and logits.shape == (B, T, V)
    assert isinstance(loss, float)
    e_logits = record_error("forward logits vs ref.py", ref.rel_err(logits, ref_logits),
                            request.node.callspec.id)
    e_loss = record_error("forward loss vs ref.py", abs(loss - ref_loss) / abs(ref_loss),
                          request.node.callspec.id)
    assert e_logits < TOL, f"logits relative error {e_logits:.3e}"
    assert e_loss < TOL, f"loss {loss!r} vs reference {ref_loss!r} (relative {e_loss:.3e})"

    # without targets: the same logits, no loss
    logits2, loss2 = m.forward(idx)
    assert loss2 is None
    np.testing.assert_array_equal(logits2, logits)


def test_from_config_is_reproducible(make_config):
    """GPT2.from_config(cfg, seed): the same seed gives the same weights, another seed others;
    GPT-2's initialisation (layernorm weights 1, biases 0, N(0, 0.02) weights, residual
    projections N(0, 0.02 / sqrt(2 n_layer)))."""
    cfg = make_config(n_layer=3, n_head=2, head_size=32, vocab_size=500, n_ctx=64)
    a, b, c = GPT2.from_config(cfg, seed=1), GPT2.from_config(cfg, seed=1), \
        GPT2.from_config(cfg, seed=2)
    for name in a.params:
        np.testing.assert_array_equal(a.params[name], b.params[name], err_msg=name)
    assert not np.array_equal(a.params["wte.weight"], c.params["wte.weight"])
    for name, v in a.params.items():
        if name.endswith(".bias"):
            assert not v.any(), name
        elif ".ln_" in name or name.startswith("ln_"):
            assert (v == 1).all(), name
        else:
            std = 0.02 / math.sqrt(2 * 3) if name.endswith("c_proj.weight") else 0.02
            assert abs(v.std() / std - 1) < 0.1, (name, v.std())
            assert abs(v.mean()) < 0.1 * std


def test_reference_loss_is_mean_over_valid_targets(make_config, make_params, make_batch):
    """The loss ignores targets == -1 and averages over the rest (checked on ref.py and gpt2s
    by recomputing it from the logits)."""
    cfg = make_config(n_layer=1, n_head=2, head_size=8, vocab_size=50, n_ctx=20)
    params = make_params(cfg, seed=3)
    idx, targets = make_batch(cfg, 2, 20, seed=4, ignore_frac=0.5)
    assert (targets == -1).any() and (targets != -1).any()
    logits, loss, _ = ref.forward(params, idx, targets, n_head=2)
    lse = np.log(np.exp(logits).sum(-1))
    valid = targets != -1
    picked = np.take_along_axis(logits, np.where(valid, targets, 0)[..., None], -1)[..., 0]
    expected = float(((lse - picked)[valid]).mean())
    assert abs(loss - expected) < 1e-12

    m = GPT2(cfg)
    for k, v in params.items():
        m.params[k][...] = v
    logits32, loss32 = m.forward(idx, targets)
    lse32 = np.log(np.exp(logits32.astype(np.float64)).sum(-1))
    picked32 = np.take_along_axis(logits32, np.where(valid, targets, 0)[..., None], -1)[..., 0]
    assert abs(loss32 - float(((lse32 - picked32)[valid]).mean())) < 1e-5 * abs(loss32)
    # ignoring more targets averages over the rest only (the logits do not depend on targets)
    t2 = targets.copy()
    t2[0, :6] = -1
    valid2 = t2 != -1
    assert valid2.sum() < valid.sum() and valid2.any()
    loss2 = m.forward(idx, t2)[1]
    expected2 = float(((lse32 - picked32)[valid2]).mean())
    assert abs(loss2 - expected2) < 1e-5 * abs(expected2)
    assert loss2 != loss32


def test_all_targets_ignored_gives_nan_loss(make_model, make_config):
    """Like torch's cross_entropy(ignore_index=-1) on all-ignored targets: nan; and backward
    then has no loss to differentiate."""
    cfg = make_config(n_layer=1, n_head=2, head_size=8, vocab_size=40, n_ctx=8)
    m = make_model(cfg)
    _, loss = m.forward(np.arange(8) % 40, np.full(8, -1))
    assert math.isnan(loss)
    with pytest.raises(RuntimeError):
        m.backward()


def test_one_dimensional_idx_is_batch_of_one(make_config, make_model, make_batch):
    cfg = make_config(n_layer=2, n_head=2, head_size=16, vocab_size=101, n_ctx=24)
    m = make_model(cfg, seed=5)
    idx, targets = make_batch(cfg, 1, 24, seed=6)
    logits1, loss1 = m.forward(idx[0], targets[0])
    logits2, loss2 = m.forward(idx, targets)
    assert logits1.shape == (1, 24, 101)
    np.testing.assert_array_equal(logits1, logits2)
    assert loss1 == loss2
    # `m(idx, targets)` is m.forward
    logits3, loss3 = m(idx[0], targets[0])
    np.testing.assert_array_equal(logits3, logits1)
    assert loss3 == loss1


def test_batch_rows_are_independent(make_config, make_model, make_batch):
    """Row b of a batched forward equals the forward of row b alone (no cross-batch leak),
    and the prefix logits do not depend on later tokens (causality)."""
    cfg = make_config(n_layer=2, n_head=4, head_size=8, vocab_size=120, n_ctx=100)
    m = make_model(cfg, seed=8)
    idx, _ = make_batch(cfg, 3, 90, seed=9)
    batched, _ = m.forward(idx)
    for b in range(3):
        single, _ = m.forward(idx[b])
        assert ref.rel_err(single[0], batched[b]) < 1e-6
    # causality: changing the last 20 tokens leaves the first 70 positions' logits unchanged
    idx2 = idx.copy()
    idx2[:, 70:] = (idx2[:, 70:] + 1) % cfg.vocab_size
    changed, _ = m.forward(idx2)
    assert ref.rel_err(changed[:, :70], batched[:, :70]) < 1e-6
    assert ref.rel_err(changed[:, 70:], batched[:, 70:]) > 1e-3


def test_logits_not_overwritten_by_later_calls(make_config, make_model, make_batch):
    cfg = make_config(n_layer=2, n_head=2, head_size=16, vocab_size=90, n_ctx=48)
    m = make_model(cfg, seed=11)
    idx_a, tgt_a = make_batch(cfg, 2, 40, seed=12)
    idx_b, tgt_b = make_batch(cfg, 2, 40, seed=13)
    logits_a, _ = m.forward(idx_a, tgt_a)
    saved = logits_a.copy()
    m.zero_grad()
    m.backward()                          # backward of softmax-cross-entropy
    np.testing.assert_array_equal(logits_a, saved)
    logits_b, _ = m.forward(idx_b, tgt_b)  # same shape: would reuse a buffer if any
    np.testing.assert_array_equal(logits_a, saved)
    assert not np.shares_memory(logits_a, logits_b)
    logits_c, _ = m.forward(idx_b[:1, :7])  # a smaller one, without targets
    m.forward(np.concatenate([idx_b, idx_a]))  # a larger one (buffers grow)
    np.testing.assert_array_equal(logits_a, saved)
    assert not np.shares_memory(logits_c, logits_b)
    np.testing.assert_array_equal(logits_c, m.forward(idx_b[:1, :7])[0])


def test_accepts_integer_dtypes_and_noncontiguous(make_config, make_model, make_batch):
    cfg = make_config(n_layer=1, n_head=2, head_size=8, vocab_size=100, n_ctx=32)
    m = make_model(cfg)
    idx, tgt = make_batch(cfg, 2, 32, seed=1)
    base, loss = m.forward(idx, tgt)
    for dt in (np.int32, np.uint16, np.int16):
        lg, ls = m.forward(idx.astype(dt), tgt.astype(np.int32))
        np.testing.assert_array_equal(lg, base)
        assert ls == loss
    lg, _ = m.forward([list(r) for r in idx])  # nested lists
    np.testing.assert_array_equal(lg, base)
    wide = np.zeros((2, 64), np.int64)
    wide[:, ::2] = idx
    lg, ls = m.forward(wide[:, ::2], tgt)  # a strided view
    np.testing.assert_array_equal(lg, base)
    assert ls == loss


# ------------------------------------------------------------------------------------------
# input validation


@pytest.fixture
def small_model(make_config, make_model):
    return make_model(make_config(n_layer=1, n_head=2, head_size=8, vocab_size=50, n_ctx=16))


@pytest.mark.parametrize("bad", [50, 51, 1000, -1, -7])
def test_token_id_out_of_range(small_model, bad):
    idx = np.array([[1, 2, 3], [4, 5, 6]])
    idx[1, 2] = bad
    with pytest.raises(ValueError) as e:
        small_model.forward(idx)
    assert str(bad) in str(e.value)


def test_too_long_sequence(small_model):
    with pytest.raises(ValueError) as e:
        small_model.forward(np.zeros((2, 17), np.int64))
    assert "17" in str(e.value) and "16" in str(e.value)
    small_model.forward(np.zeros((2, 16), np.int64))  # exactly n_ctx is fine


@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.float16, bool, np.complex64])
def test_non_integer_idx_raises_type_error(small_model, dtype):
    with pytest.raises(TypeError):
        small_model.forward(np.zeros((1, 4), dtype))
    with pytest.raises(TypeError):
        small_model.forward(np.zeros((1, 4), np.int64), np.zeros((1, 4), dtype))


def test_float_python_list_raises_type_error(small_model):
    with pytest.raises(TypeError):
        small_model.forward([1.0, 2.0, 3.0])


@pytest.mark.parametrize("shape", [(), (2, 3, 4), (0,), (2, 0)])
def test_bad_idx_shape(small_model, shape):
    with pytest.raises(ValueError):
        small_model.forward(np.zeros(shape, np.int64))


@pytest.mark.parametrize("bad", [50, 77, -2, -100])
def test_bad_target_value(small_model, bad):
    idx = np.zeros((2, 4), np.int64)
    targets = np.zeros((2, 4), np.int64)
    targets[1, 3] = bad
    with pytest.raises(ValueError) as e:
        small_model.forward(idx, targets)
    assert str(bad) in str(e.value)


@pytest.mark.parametrize("tshape", [(2, 3), (2, 5), (1, 4), (8,), (2, 4, 1)])
def test_bad_target_shape(small_model, tshape):
    with pytest.raises(ValueError):
        small_model.forward(np.zeros((2, 4), np.int64), np.zeros(tshape, np.int64))


def test_failed_forward_keeps_the_last_successful_one(small_model):
    """A forward whose arguments are rejected runs nothing and changes no state: backward()
    then gives the gradient of the last successful forward (not of a half-run one)."""
    small_model.forward(np.zeros((1, 4), np.int64), np.zeros((1, 4), np.int64))
    with pytest.raises(ValueError):
        small_model.forward(np.zeros((1, 4), np.int64), np.full((1, 4), 99))
    small_model.zero_grad()
    small_model.backward()
    g = {k: v.copy() for k, v in small_model.grads.items()}
    assert any(v.any() for v in g.values())
    small_model.forward(np.zeros((1, 4), np.int64), np.zeros((1, 4), np.int64))
    small_model.zero_grad()
    small_model.backward()
    for k in g:
        np.testing.assert_array_equal(g[k], small_model.grads[k], err_msg=k)
