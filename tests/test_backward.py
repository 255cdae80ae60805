"""gpt2s backward: every gradient against the float64 reference (tests/ref.py), against PyTorch
autograd on transformers' GPT2LMHeadModel, and against finite differences; gradient
accumulation, zero_grad and the errors of backward().

Acceptance: every gradient within 1e-4 relative (per tensor, L2) of the float64 references.
"""

from __future__ import annotations

import numpy as np
import pytest

import ref
from conftest import train_step

TOL = 1e-4

CONFIGS = [
    # (n_layer, n_head, head_size, vocab, n_ctx, B, T, eps)
    pytest.param(1, 1, 16, 97, 16, 1, 16, 1e-5, id="L1-H1-hs16-T16-B1"),
    pytest.param(2, 2, 16, 211, 64, 3, 64, 1e-5, id="L2-H2-hs16-T64-B3"),
    pytest.param(3, 4, 8, 300, 80, 2, 75, 1e-3, id="L3-H4-hs8-T75-eps1e-3"),
    pytest.param(2, 3, 20, 257, 150, 2, 140, 1e-5, id="L2-H3-hs20-T140"),
    pytest.param(2, 6, 12, 64, 40, 4, 33, 1e-4, id="L2-H6-hs12-T33-B4"),
]


@pytest.mark.parametrize("L,NH,HS,V,n_ctx,B,T,eps", CONFIGS)
def test_gradients_match_reference(L, NH, HS, V, n_ctx, B, T, eps, make_config, make_model,
                                   make_batch, record_error, request):
    cfg = make_config(n_layer=L, n_head=NH, head_size=HS, vocab_size=V, n_ctx=n_ctx, eps=eps)
    m = make_model(cfg, seed=L * 10 + NH)
    idx, targets = make_batch(cfg, B, T, seed=T, ignore_frac=0.3)
    params = {k: v.copy() for k, v in m.params.items()}
    _, _, grads = train_step(m, idx, targets)
    _, _, ref_grads = ref.loss_and_grads(params, idx, targets, n_head=NH, eps=eps)

    assert set(m.grads) == set(m.params)
    for name, g in m.grads.items():
        assert g.shape == m.params[name].shape and g.dtype == np.float32, name
    errors = {}
    for name, g_ref in ref_grads.items():
        errors[name] = ref.rel_err(grads[name], g_ref)
        kind = name.split(".", 2)[-1] if name.startswith("h.") else name
        record_error(f"grad vs ref.py: {kind}", errors[name], request.node.callspec.id)
    bad = {k: f"{e:.2e}" for k, e in errors.items() if not e < TOL}
    assert not bad, f"gradients off by more than {TOL} relative: {bad}"


@pytest.mark.parametrize("L,NH,HS,V,n_ctx,B,T", [
    pytest.param(2, 2, 16, 150, 48, 2, 48, id="L2-H2-T48"),
    pytest.param(2, 4, 8, 230, 96, 2, 90, id="L2-H4-T90"),
])
def test_gradients_match_pytorch(L, NH, HS, V, n_ctx, B, T, make_config, make_model,
                                 make_batch, make_hf_model, record_error, request):
    """PyTorch float64 autograd of transformers' GPT2LMHeadModel, loss = cross_entropy
    (ignore_index=-1) on the same (unshifted) targets.  lm_head is tied to wte there, so wte's
    gradient carries both the embedding and the output-head contributions, as in gpt2s."""
    torch = pytest.importorskip("torch")
    cfg = make_config(n_layer=L, n_head=NH, head_size=HS, vocab_size=V, n_ctx=n_ctx)
    m = make_model(cfg, seed=31 + L)
    idx, targets = make_batch(cfg, B, T, seed=32, ignore_frac=0.3)
    assert (targets == -1).any()
    params = {k: v.copy() for k, v in m.params.items()}
    _, loss, grads = train_step(m, idx, targets)

    hf = make_hf_model(cfg, params, dtype="float64")
    logits = hf(torch.from_numpy(idx)).logits
    hf_loss = torch.nn.functional.cross_entropy(
        logits.reshape(-1, V), torch.from_numpy(targets).reshape(-1), ignore_index=-1)
    hf_loss.backward()
    assert abs(loss - hf_loss.item()) < 1e-5 * abs(hf_loss.item())
    errors = {}
    for name, p in hf.transformer.named_parameters():
        errors[name] = ref.rel_err(grads[name], p.grad.numpy())
        kind = name.split(".", 2)[-1] if name.startswith("h.") else name
        record_error(f"grad vs transformers: {kind}", errors[name], request.node.callspec.id)
    assert set(errors) == set(grads)
    bad = {k: f"{e:.2e}" for k, e in errors.items() if not e < TOL}
    assert not bad, f"gradients off by more than {TOL} relative: {bad}"


def test_large_activations_match_reference(make_config, make_model, make_batch, record_error):
    """Sharp attention (query/key weights x3), GELU driven deep into both tails (c_fc x8: the
    tanh of the fast exp saturates) and large logits (ln_f weight x5): forward and every
    gradient still within the acceptance tolerances."""
    cfg = make_config(n_layer=2, n_head=2, head_size=16, vocab_size=120, n_ctx=80)
    m = make_model(cfg, seed=5)
    for name, view in m.params.items():
        if name.endswith("c_attn.weight"):
            view *= 3
        elif name.endswith("c_fc.weight"):
            view *= 8
    m.params["ln_f.weight"][...] *= 5
    params = {k: v.copy() for k, v in m.params.items()}
    idx, targets = make_batch(cfg, 2, 80, seed=1)
    logits, loss = m.forward(idx, targets)
    m.zero_grad()
    m.backward()
    ref_logits, ref_loss, cache = ref.forward(params, idx, targets, n_head=2)
    fch = np.concatenate([c["fch"].ravel() for c in cache["layers"]])
    assert fch.min() < -10 and fch.max() > 10            # really in the tails
    assert cache["layers"][0]["attn_cache"][3].max(axis=-1).mean() > 0.5  # peaked softmax
    assert record_error("large activations: logits vs ref.py",
                        ref.rel_err(logits, ref_logits)) < 1e-5
    assert abs(loss - ref_loss) < 1e-5 * ref_loss
    ref_grads = ref.backward(cache)
    for name, g in ref_grads.items():
        e = record_error("large activations: worst grad vs ref.py", ref.rel_err(m.grads[name], g),
                         name)
        assert e < TOL, f"{name}: {e:.2e}"


def test_reference_backward_matches_pytorch(make_config, make_params, make_batch,
                                            make_hf_model):
    """ref.py's hand-written backward equals PyTorch autograd to float64 rounding: the
    reference itself is right."""
    torch = pytest.importorskip("torch")
    cfg = make_config(n_layer=2, n_head=3, head_size=8, vocab_size=70, n_ctx=30, eps=1e-3)
    params = make_params(cfg, seed=41)
    idx, targets = make_batch(cfg, 2, 30, seed=42, ignore_frac=0.3)
    logits, loss, grads = ref.loss_and_grads(params, idx, targets, n_head=3, eps=1e-3)
    hf = make_hf_model(cfg, params, dtype="float64")
    hf_logits = hf(torch.from_numpy(idx)).logits
    hf_loss = torch.nn.functional.cross_entropy(
        hf_logits.reshape(-1, 70), torch.from_numpy(targets).reshape(-1), ignore_index=-1)
    hf_loss.backward()
    assert ref.rel_err(logits, hf_logits.detach().numpy()) < 1e-12
    assert abs(loss - hf_loss.item()) < 1e-12 * abs(loss)
    for name, p in hf.transformer.named_parameters():
        assert ref.rel_err(grads[name], p.grad.numpy()) < 1e-10, name


def test_reference_key_bias_gradient_vanishes(make_config, make_params, make_batch):
    """A structural property of attention the reference must show: adding b to every key
    adds q.b to a whole softmax row, which softmax ignores, so the key bias gradient is zero."""
    cfg = make_config(n_layer=2, n_head=2, head_size=8, vocab_size=40, n_ctx=12)
    params = make_params(cfg, seed=5)
    idx, targets = make_batch(cfg, 2, 12, seed=6)
    _, _, grads = ref.loss_and_grads(params, idx, targets, n_head=2)
    C = cfg.n_embd
    for l in range(2):
        g = grads[f"h.{l}.attn.c_attn.bias"]
        assert np.abs(g[C:2 * C]).max() < 1e-12 * np.abs(g).max()
        assert np.abs(g[:C]).max() > 1e-6 and np.abs(g[2 * C:]).max() > 1e-6


# ------------------------------------------------------------------------------------------
# finite differences


def _fd_coordinates(g_ref, rng, k=3):
    """k coordinates where the gradient is not negligible (|g| >= 5% of the tensor's largest),
    plus one uniformly random coordinate."""
    flat = np.abs(g_ref).reshape(-1)
    big = np.nonzero(flat >= 0.05 * flat.max())[0]
    picks = list(rng.choice(big, size=min(k, len(big)), replace=False))
    picks.append(int(rng.integers(flat.size)))
    return [np.unravel_index(int(i), g_ref.shape) for i in picks]


@pytest.fixture(scope="module")
def fd_setup(make_config, make_model, make_batch):
    """A tiny model, a batch and both analytic gradients (ours and the reference's)."""
    cfg = make_config(n_layer=2, n_head=2, head_size=8, vocab_size=53, n_ctx=12,
                                eps=1e-5)
    m = make_model(cfg, seed=51)
    idx, targets = make_batch(cfg, 2, 10, seed=52, ignore_frac=0.25)
    params64 = {k: v.astype(np.float64) for k, v in m.params.items()}
    _, _, ours = train_step(m, idx, targets)
    _, _, theirs = ref.loss_and_grads(params64, idx, targets, n_head=2)
    return cfg, m, idx, targets, params64, ours, theirs


def test_finite_differences_float64(fd_setup):
    """Central differences of ref.py's float64 loss (h = 1e-5: truncation ~h^2, rounding
    ~1e-16/h) against the reference backward (within 1e-6 of the tensor's largest gradient)
    and gpt2s' float32 backward (within 3e-5 of it)."""
    cfg, _, idx, targets, params64, ours, theirs = fd_setup
    rng = np.random.default_rng(53)
    h = 1e-5
    for name in params64:
        scale = np.abs(theirs[name]).max()
        for coord in _fd_coordinates(theirs[name], rng):
            p = {k: v.copy() for k, v in params64.items()}
            p[name][coord] += h
            up = ref.forward(p, idx, targets, n_head=2)[1]
            p[name][coord] -= 2 * h
            down = ref.forward(p, idx, targets, n_head=2)[1]
            fd = (up - down) / (2 * h)
            where = f"{name}{list(coord)}"
            assert abs(theirs[name][coord] - fd) <= 1e-6 * scale + 1e-9, \
                f"ref.py backward {where}: {theirs[name][coord]!r} vs FD {fd!r}"
            assert abs(ours[name][coord] - fd) <= 3e-5 * scale + 1e-8, \
                f"gpt2s backward {where}: {ours[name][coord]!r} vs FD {fd!r}"


def test_finite_differences_float32_forward(fd_setup):
    """gpt2s against itself: central differences of our own float32 loss, on the largest
    gradient coordinates of each tensor, with a step large enough to beat float32 noise."""
    cfg, m, idx, targets, params64, ours, _ = fd_setup
    saved = {k: v.copy() for k, v in m.params.items()}
    h = 1e-2
    try:
        for name in m.params:
            g = ours[name]
            for flat in np.argsort(np.abs(g).reshape(-1))[-2:]:
                coord = np.unravel_index(int(flat), g.shape)
                view = m.params[name]
                view[coord] = saved[name][coord] + np.float32(h)
                up = m.forward(idx, targets)[1]
                view[coord] = saved[name][coord] - np.float32(h)
                down = m.forward(idx, targets)[1]
                view[coord] = saved[name][coord]
                fd = (up - down) / (2 * h)
                assert abs(g[coord] - fd) <= 1e-2 * abs(g[coord]) + 1e-4, \
                    f"{name}{list(coord)}: analytic {g[coord]!r} vs FD {fd!r}"
    finally:
        for k, v in saved.items():
            m.params[k][...] = v


# ------------------------------------------------------------------------------------------
# accumulation, zero_grad, errors


def test_gradient_accumulation_halves(make_config, make_model, make_batch):
    """Two backward calls on the halves of a batch with equal numbers of valid targets
    accumulate to twice the gradient of the whole batch (each half's loss is a mean over half
    as many targets)."""
    cfg = make_config(n_layer=2, n_head=2, head_size=16, vocab_size=120, n_ctx=40)
    m = make_model(cfg, seed=61)
    idx, targets = make_batch(cfg, 4, 40, seed=62, ignore_frac=0.0)
    targets[0, :7] = -1
    targets[2, 10:17] = -1  # 7 ignored in each half
    _, whole_loss, whole = train_step(m, idx, targets)

    m.zero_grad()
    _, loss1 = m.forward(idx[:2], targets[:2])
    m.backward()
    _, loss2 = m.forward(idx[2:], targets[2:])
    m.backward()
    assert abs((loss1 + loss2) / 2 - whole_loss) < 1e-6 * whole_loss
    for name, g in whole.items():
        assert ref.rel_err(m.grads[name], 2 * g) < 1e-5, name


def test_gradient_accumulation_unequal_weights(make_config, make_model, make_batch):
    """With n1 and n2 valid targets in the two parts, the whole batch's gradient is
    (n1 g1 + n2 g2) / (n1 + n2); and accumulation is a plain sum of the separate gradients."""
    cfg = make_config(n_layer=1, n_head=4, head_size=8, vocab_size=90, n_ctx=32)
    m = make_model(cfg, seed=63)
    idx, targets = make_batch(cfg, 3, 32, seed=64, ignore_frac=0.4)
    n1, n2 = int((targets[:1] != -1).sum()), int((targets[1:] != -1).sum())
    assert n1 != n2
    _, _, whole = train_step(m, idx, targets)
    _, _, g1 = train_step(m, idx[:1], targets[:1])
    _, _, g2 = train_step(m, idx[1:], targets[1:])
    m.zero_grad()
    m.forward(idx[:1], targets[:1])
    m.backward()
    m.forward(idx[1:], targets[1:])
    m.backward()
    for name in whole:
        combined = (n1 * g1[name].astype(np.float64) + n2 * g2[name]) / (n1 + n2)
        assert ref.rel_err(combined, whole[name]) < 1e-5, name
        assert ref.rel_err(m.grads[name], g1[name] + g2[name].astype(np.float64)) < 1e-6, name


def test_zero_grad_clears(make_config, make_model, make_batch):
    cfg = make_config(n_layer=2, n_head=2, head_size=8, vocab_size=60, n_ctx=16)
    m = make_model(cfg, seed=71)
    idx, targets = make_batch(cfg, 2, 16, seed=72)
    _, first_loss, first = train_step(m, idx, targets)
    assert all(np.abs(g).max() > 0 for k, g in first.items() if k != "wpe.weight")
    m.zero_grad()
    for name, g in m.grads.items():
        assert not g.any(), f"{name} not cleared"
    # the next backward starts from zero: equal to the first, not twice it
    m.forward(idx, targets)
    m.backward()
    for name, g in first.items():
        np.testing.assert_array_equal(m.grads[name], g, err_msg=name)
    # grads views stay the same arrays across zero_grad (no reallocation behind a user's back)
    views = {k: v for k, v in m.grads.items()}
    m.zero_grad()
    assert all(m.grads[k] is views[k] or np.shares_memory(m.grads[k], views[k]) for k in views)
    assert not any(v.any() for v in views.values())


def test_backward_accumulates_without_zero_grad(make_config, make_model, make_batch):
    cfg = make_config(n_layer=1, n_head=2, head_size=8, vocab_size=60, n_ctx=16)
    m = make_model(cfg, seed=73)
    idx, targets = make_batch(cfg, 2, 16, seed=74)
    _, _, once = train_step(m, idx, targets)
    m.forward(idx, targets)
    m.backward()  # no zero_grad: adds to what is there
    for name, g in once.items():
        assert ref.rel_err(m.grads[name], 2.0 * g) < 1e-6, name


def test_backward_without_targets_raises(make_config, make_model, make_batch):
    cfg = make_config(n_layer=1, n_head=2, head_size=8, vocab_size=60, n_ctx=16)
    m = make_model(cfg, seed=75)
    idx, targets = make_batch(cfg, 2, 16, seed=76)
    with pytest.raises(RuntimeError):
        m.backward()  # no forward at all
    m.forward(idx)
    with pytest.raises(RuntimeError):
        m.backward()  # the forward had no targets
    m.forward(idx, targets)
    m.forward(idx)
    with pytest.raises(RuntimeError):
        m.backward()  # the *last* forward had no targets
    m.zero_grad()
    m.forward(idx, targets)
    m.backward()  # and now it works
    assert any(g.any() for g in m.grads.values())


def test_backward_after_larger_and_smaller_batches(make_config, make_model, make_batch):
    """Activation buffers are reused and regrown: gradients are still those of the last
    forward whatever came before."""
    cfg = make_config(n_layer=2, n_head=2, head_size=16, vocab_size=80, n_ctx=70)
    m = make_model(cfg, seed=77)
    small = make_batch(cfg, 1, 9, seed=78)
    big = make_batch(cfg, 3, 70, seed=79)
    params = {k: v.copy() for k, v in m.params.items()}
    _, _, ref_small = ref.loss_and_grads(params, *small, n_head=2)
    _, _, ref_big = ref.loss_and_grads(params, *big, n_head=2)
    for batch, expect in ((small, ref_small), (big, ref_big), (small, ref_small),
                          (big, ref_big)):
        _, _, got = train_step(m, *batch)
        for name in expect:
            assert ref.rel_err(got[name], expect[name]) < TOL, name


@pytest.mark.slow
def test_gpt2_small_shapes_forward_and_backward(make_model, make_batch, record_error):
    """GPT-2 small's real shapes (12 layers, C=768, 12 heads of 64, V=50257, n_ctx=1024) with
    every parameter random: logits, loss and every gradient against ref.py in float64."""
    from gpt2s import GPT2Config
    cfg = GPT2Config.preset("gpt2")
    m = make_model(cfg, seed=91)
    idx, targets = make_batch(cfg, 1, 80, seed=92, ignore_frac=0.2)
    m.zero_grad()
    logits, loss = m.forward(idx, targets)
    m.backward()
    ref_logits, ref_loss, cache = ref.forward(m.params, idx, targets, n_head=12)
    assert record_error("gpt2-small shapes: logits vs ref.py",
                        ref.rel_err(logits, ref_logits)) < 1e-5
    assert abs(loss - ref_loss) < 1e-5 * ref_loss
    del ref_logits
    ref_grads = ref.backward(cache)
    del cache
    for name, g in ref_grads.items():
        e = record_error("gpt2-small shapes: worst grad vs ref.py", ref.rel_err(m.grads[name], g),
                         name)
        assert e < TOL, f"{name}: {e:.2e}"


def test_return_logits_false_gives_the_same_gradients(make_config, make_model, make_batch):
    """forward(..., return_logits=False) returns (None, loss) and lets the backward write dlogits
    over the model-owned logits: the loss and every gradient are bit-identical to the default
    path, and logits returned earlier to the caller are never touched."""
    cfg = make_config(n_layer=2, n_head=2, head_size=16, vocab_size=150, n_ctx=40)
    m = make_model(cfg, seed=93)
    idx, targets = make_batch(cfg, 2, 40, seed=94)
    kept, loss_a = m.forward(idx, targets)
    saved = kept.copy()
    m.zero_grad()
    m.backward()
    grads_a = {k: v.copy() for k, v in m.grads.items()}
    for _ in range(2):  # twice: the second time the model's logits buffer is reused
        m.zero_grad()
        none, loss_b = m.forward(idx, targets, return_logits=False)
        assert none is None and loss_b == loss_a
        m.backward()
        for name, g in grads_a.items():
            np.testing.assert_array_equal(m.grads[name], g, err_msg=name)
    np.testing.assert_array_equal(kept, saved)


def test_one_backward_per_forward(make_config, make_model, make_batch):
    """A backward consumes its forward (as PyTorch without retain_graph): a second backward()
    raises instead of silently differentiating overwritten state."""
    cfg = make_config(n_layer=1, n_head=2, head_size=8, vocab_size=60, n_ctx=16)
    m = make_model(cfg, seed=95)
    idx, targets = make_batch(cfg, 2, 16, seed=96)
    for return_logits in (True, False):
        m.zero_grad()
        m.forward(idx, targets, return_logits=return_logits)
        m.backward()
        before = {k: v.copy() for k, v in m.grads.items()}
        with pytest.raises(RuntimeError):
            m.backward()
        for name, g in before.items():  # and the failed call changed nothing
            np.testing.assert_array_equal(m.grads[name], g, err_msg=name)
