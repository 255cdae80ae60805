"""gpt2s.AdamW and gpt2s.clip_grad_norm against torch.optim.AdamW and
torch.nn.utils.clip_grad_norm_ on transformers' GPT2LMHeadModel (float32), overfitting one
batch, optimizer state save/load, and custom weight-decay rules.

Only the comparisons with torch need torch and transformers (each skips without them); the
closed-form first step, clipping against float64, state save/load, the decay rules and the
argument checks run everywhere.
"""

from __future__ import annotations

import math
import re

import numpy as np
import pytest

import ref
from conftest import train_step
import gpt2s
from gpt2s import GPT2, AdamW, clip_grad_norm

BETAS = (0.9, 0.95)
EPS = 1e-8
WD = 0.1


@pytest.fixture
def setup(make_config, make_model, make_batch):
    cfg = make_config(n_layer=2, n_head=2, head_size=16, vocab_size=150, n_ctx=32)
    m = make_model(cfg, seed=3)
    batches = [make_batch(cfg, 2, 32, seed=100 + i, ignore_frac=0.2) for i in range(10)]
    return cfg, m, batches


def torch_adamw(hf, decayed, lr, weight_decay=WD):
    """torch.optim.AdamW with two groups: weight decay for the tensors gpt2s decays, 0 for the
    others (the usual nanoGPT split)."""
    torch = pytest.importorskip("torch")
    named = dict(hf.transformer.named_parameters())
    decayed = set(decayed)
    groups = [{"params": [p for k, p in named.items() if k in decayed],
               "weight_decay": weight_decay},
              {"params": [p for k, p in named.items() if k not in decayed], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=BETAS, eps=EPS)


def torch_step_loss(hf, idx, targets, V):
    torch = pytest.importorskip("torch")
    logits = hf(torch.from_numpy(idx)).logits
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, V),
                                             torch.from_numpy(targets).reshape(-1),
                                             ignore_index=-1)
    loss.backward()
    return loss.item()


def _torch_train(hf, topt, batches, V):
    """The torch side of _train: one optimizer step per batch."""
    for idx, targets in batches:
        topt.zero_grad()
        torch_step_loss(hf, idx, targets, V)
        topt.step()


def compare_params(m, hf, C, record_error=None, label=""):
    """Per-tensor relative errors of the parameters.  The key slice of attn.c_attn.bias is
    left out: its gradient is exactly zero in exact arithmetic (adding b to every key shifts a
    whole softmax row), so in float32 it is rounding noise on both sides, which Adam's
    normalisation turns into O(lr) steps of random sign.  It is returned separately."""
    errors, key_bias = {}, 0.0
    for name, p in hf.transformer.named_parameters():
        ours, theirs = m.params[name], p.detach().numpy()
        if name.endswith("attn.c_attn.bias"):
            key_bias = max(key_bias, float(np.abs(ours[C:2 * C] - theirs[C:2 * C]).max()))
            ours = np.concatenate([ours[:C], ours[2 * C:]])
            theirs = np.concatenate([theirs[:C], theirs[2 * C:]])
        errors[name] = ref.rel_err(ours, theirs)
        if record_error is not None:
            kind = name.split(".", 2)[-1] if name.startswith("h.") else name
            record_error(f"AdamW params vs torch: {kind}", errors[name], label)
    return errors, key_bias


@pytest.mark.parametrize("max_norm", [None, 0.5], ids=["no-clip", "clip0.5"])
def test_adamw_matches_torch(setup, make_hf_model, record_error, max_norm):
    """10 steps on 10 different batches, with a learning-rate schedule (lr changed between
    steps) and optionally gradient clipping; losses and parameters follow torch's."""
    torch = pytest.importorskip("torch")
    cfg, m, batches = setup
    hf = make_hf_model(cfg, {k: v.copy() for k, v in m.params.items()}, dtype="float32")
    hf.train()  # dropout is 0: train mode changes nothing but is what a training loop uses
    lrs = [3e-4 * (0.55 + 0.45 * math.cos(math.pi * i / 10)) for i in range(10)]
    opt = AdamW(m, lr=lrs[0], betas=BETAS, eps=EPS, weight_decay=WD)
    topt = torch_adamw(hf, opt.decayed, lr=lrs[0])
    ours_losses, torch_losses, clipped = [], [], 0
    for step, (idx, targets) in enumerate(batches):
        opt.lr = lrs[step]
        for g in topt.param_groups:
            g["lr"] = lrs[step]
        _, loss, _ = train_step(m, idx, targets)
        topt.zero_grad()
        tloss = torch_step_loss(hf, idx, targets, cfg.vocab_size)
        if max_norm is not None:
            norm = clip_grad_norm(m, max_norm)
            tnorm = torch.nn.utils.clip_grad_norm_(hf.parameters(), max_norm).item()
            assert abs(norm - tnorm) < 1e-5 * tnorm
            clipped += norm > max_norm
        opt.step()
        topt.step()
        ours_losses.append(loss)
        torch_losses.append(tloss)
    assert opt.t == 10
    if max_norm is not None:
        assert clipped >= 3, "clipping never engaged: the test would prove nothing"
    loss_err = max(abs(a - b) / b for a, b in zip(ours_losses, torch_losses))
    record_error("AdamW loss sequence vs torch", loss_err)
    assert loss_err < 1e-5, (ours_losses, torch_losses)
    assert len(set(ours_losses)) == 10  # the parameters really moved between batches

    errors, key_bias = compare_params(m, hf, cfg.n_embd, record_error, "10 steps")
    bad = {k: f"{e:.2e}" for k, e in errors.items() if not e < 1e-5}
    assert not bad, bad
    assert key_bias <= 2 * sum(lrs)


def test_adamw_updates_match_torch(setup, make_hf_model):
    """The parameter *changes* over 5 steps agree tightly, so that even a small error in the
    update rule (bias correction, decay on the wrong tensors, eps placement at a larger eps)
    shows, which parameter values dominated by their initialisation could hide."""
    torch = pytest.importorskip("torch")
    cfg, m, batches = setup
    p0 = {k: v.copy() for k, v in m.params.items()}
    hf = make_hf_model(cfg, p0, dtype="float32")
    lr, eps = 1e-3, 1e-4   # a large eps keeps Adam from amplifying float32 noise on tiny grads
    opt = AdamW(m, lr=lr, betas=BETAS, eps=eps, weight_decay=0.5)
    named = dict(hf.transformer.named_parameters())
    dec = set(opt.decayed)
    topt = torch.optim.AdamW(
        [{"params": [p for k, p in named.items() if k in dec], "weight_decay": 0.5},
         {"params": [p for k, p in named.items() if k not in dec], "weight_decay": 0.0}],
        lr=lr, betas=BETAS, eps=eps)
    _train(m, opt, batches[:5])
    _torch_train(hf, topt, batches[:5], cfg.vocab_size)
    C = cfg.n_embd
    for name, p in named.items():
        d_ours = m.params[name].astype(np.float64) - p0[name]
        d_torch = p.detach().numpy().astype(np.float64) - p0[name]
        if name.endswith("attn.c_attn.bias"):
            d_ours[C:2 * C] = d_torch[C:2 * C] = 0.0
        if not d_torch.any():
            assert not d_ours.any(), name
            continue
        assert ref.rel_err(d_ours, d_torch) < 1e-2, name


def test_adamw_first_step_closed_form(make_config, make_model, make_batch):
    """Step 1 of AdamW from zero state: m = (1-b1) g, v = (1-b2) g^2, so after bias correction
    p <- p (1 - lr wd) - lr g / (|g| + eps): an independent float64 check of the kernel."""
    cfg = make_config(n_layer=1, n_head=2, head_size=8, vocab_size=40, n_ctx=16)
    m = make_model(cfg, seed=9)
    idx, targets = make_batch(cfg, 2, 16, seed=10)
    train_step(m, idx, targets)
    p0 = {k: v.astype(np.float64) for k, v in m.params.items()}
    g = {k: v.astype(np.float64) for k, v in m.grads.items()}
    lr, eps, wd = 1e-2, 1e-3, 0.3
    opt = AdamW(m, lr=lr, betas=(0.8, 0.9), eps=eps, weight_decay=wd)
    opt.step()
    for name in p0:
        decay = wd if name in opt.decayed else 0.0
        expect = p0[name] * (1 - lr * decay) - lr * g[name] / (np.abs(g[name]) + eps)
        np.testing.assert_allclose(m.params[name], expect, rtol=2e-6, atol=2e-7, err_msg=name)


def test_default_decay_rule(setup):
    cfg, m, _ = setup
    opt = AdamW(m)
    expected = sorted(k for k, v in m.params.items() if v.ndim == 2)
    assert sorted(opt.decayed) == expected
    assert "wte.weight" in opt.decayed and "h.0.attn.c_attn.weight" in opt.decayed
    assert not any(k.endswith(".bias") or ".ln_" in k or k.startswith("ln_")
                   for k in opt.decayed)


def test_loss_falls_when_overfitting_one_batch(make_config, make_model, make_batch):
    cfg = make_config(n_layer=2, n_head=2, head_size=16, vocab_size=100, n_ctx=32)
    m = make_model(cfg, seed=13)
    idx, targets = make_batch(cfg, 2, 32, seed=14, ignore_frac=0.1)
    opt = AdamW(m, lr=3e-3, weight_decay=0.0)
    losses = [train_step(m, idx, targets, opt)[1] for _ in range(30)]
    final = m.forward(idx, targets)[1]
    assert all(math.isfinite(x) for x in losses)
    assert final < 0.5 * losses[0], (losses[0], final)
    assert sum(b < a for a, b in zip(losses, losses[1:])) >= 25  # mostly monotone


@pytest.mark.parametrize("max_norm", [1e-3, 0.05, 1e6])
def test_clip_grad_norm(setup, max_norm):
    """The norm of all gradients in float64, and every gradient scaled by max_norm / norm
    when that is below 1 (torch's rule, with its 1e-6 in the denominator), else untouched."""
    cfg, m, batches = setup
    _, _, before = train_step(m, *batches[0])
    exact = math.sqrt(sum(float((g.astype(np.float64) ** 2).sum()) for g in before.values()))
    norm = clip_grad_norm(m, max_norm)
    assert isinstance(norm, float)
    assert abs(norm - exact) < 1e-6 * exact
    coef = max_norm / (exact + 1e-6)
    for k, g in m.grads.items():
        if coef >= 1:
            np.testing.assert_array_equal(g, before[k], err_msg=k)  # untouched
        else:
            assert ref.rel_err(g, before[k].astype(np.float64) * coef) < 1e-6, k
    after = math.sqrt(sum(float((g.astype(np.float64) ** 2).sum()) for g in m.grads.values()))
    assert after <= max_norm * (1 + 1e-5)
    with pytest.raises(ValueError):
        clip_grad_norm(m, 0.0)
    with pytest.raises(ValueError):
        clip_grad_norm(m, -1.0)


@pytest.mark.parametrize("max_norm", [1e-3, 0.05, 1e6])
def test_clip_grad_norm_matches_torch(setup, max_norm):
    torch = pytest.importorskip("torch")
    cfg, m, batches = setup
    _, _, before = train_step(m, *batches[0])
    tparams = []
    for k, g in before.items():
        p = torch.nn.Parameter(torch.from_numpy(m.params[k].copy()))
        p.grad = torch.from_numpy(g.copy())
        tparams.append(p)
    tnorm = torch.nn.utils.clip_grad_norm_(tparams, max_norm).item()
    norm = clip_grad_norm(m, max_norm)
    assert abs(norm - tnorm) < 1e-5 * tnorm
    for (k, g), p in zip(m.grads.items(), tparams):
        assert ref.rel_err(g, p.grad.numpy()) < 1e-6, k


def _train(m, opt, batches):
    """One optimizer step per batch; the losses."""
    return [train_step(m, idx, targets, opt)[1] for idx, targets in batches]


def _clone(m) -> GPT2:
    c = GPT2(m.config)
    for k, v in m.params.items():
        c.params[k][...] = v
    return c


@pytest.mark.parametrize("via", ["file", "state_dict"])
def test_optimizer_state_resume_is_exact(tmp_path, setup, via):
    """5 steps, save the optimizer (and the weights), 5 more steps; a fresh model and optimizer
    restored from the checkpoint take exactly the same 5 steps, bit for bit."""
    cfg, m, batches = setup
    opt = AdamW(m, lr=2e-3, betas=BETAS, eps=EPS, weight_decay=WD)
    _train(m, opt, batches[:5])
    opt.lr = 1.5e-3  # a schedule's current value is part of the state
    snapshot = _clone(m)
    if via == "file":
        path = tmp_path / "opt-state"  # no .npz suffix: saved and loaded at exactly this path
        opt.save(path)
        assert path.is_file()
    else:
        state = opt.state_dict()
    losses_a = _train(m, opt, batches[5:])

    m2 = _clone(snapshot)
    opt2 = AdamW(m2, lr=123.0, betas=(0.5, 0.6), eps=1.0, weight_decay=0.9)  # all overwritten
    if via == "file":
        opt2.load(path)
    else:
        opt2.load_state_dict(state)
    assert opt2.t == 5 and opt2.lr == 1.5e-3 and opt2.betas == BETAS
    assert opt2.eps == EPS and opt2.weight_decay == WD
    losses_b = _train(m2, opt2, batches[5:])
    assert losses_a == losses_b
    for k in m.params:
        np.testing.assert_array_equal(m2.params[k], m.params[k], err_msg=k)

    # without the state, the same 5 steps go elsewhere: the comparison above is meaningful
    m3 = _clone(snapshot)
    opt3 = AdamW(m3, lr=1.5e-3, betas=BETAS, eps=EPS, weight_decay=WD)
    _train(m3, opt3, batches[5:])
    assert any(not np.array_equal(m3.params[k], m.params[k]) for k in m.params)


def test_state_dict_is_a_copy_and_checks_shapes(setup, make_config, make_model):
    cfg, m, batches = setup
    opt = AdamW(m, lr=1e-3)
    _train(m, opt, batches[:2])
    state = opt.state_dict()
    assert state["step"] == 2
    m_before = state["m"].copy()
    _train(m, opt, batches[2:3])
    np.testing.assert_array_equal(state["m"], m_before)  # not a live view
    other = make_model(make_config(n_layer=1, n_head=2, head_size=8, vocab_size=30, n_ctx=8))
    with pytest.raises(ValueError):
        AdamW(other).load_state_dict(state)


def _decay_rule(name, shape):
    return name == "wte.weight" or name.endswith("c_fc.weight") or name.endswith("ln_2.bias")


def test_custom_decay_rule(setup):
    """decay=(name, shape) -> bool picks the decayed tensors: with zero gradients a step only
    shrinks those by (1 - lr wd) and leaves the rest bit-identical."""
    cfg, m, batches = setup
    rule = _decay_rule
    lr, wd = 1e-2, 0.5
    opt = AdamW(m, lr=lr, betas=BETAS, eps=EPS, weight_decay=wd, decay=rule)
    assert sorted(opt.decayed) == sorted(k for k in m.params if rule(k, m.params[k].shape))
    before = {k: v.copy() for k, v in m.params.items()}
    m.zero_grad()
    opt.step()
    shrink = np.float32(1 - lr * wd)
    for k, v in m.params.items():
        if k in opt.decayed:
            np.testing.assert_allclose(v, before[k] * shrink, rtol=1e-6, err_msg=k)
            assert not np.array_equal(v, before[k])
        else:
            np.testing.assert_array_equal(v, before[k], err_msg=k)


def test_custom_decay_rule_matches_torch(setup, make_hf_model):
    """With real gradients a custom rule follows torch's AdamW with the same two groups."""
    cfg, m, batches = setup
    wd = 0.5
    m2 = _clone(m)
    hf = make_hf_model(cfg, {k: v.copy() for k, v in m2.params.items()}, dtype="float32")
    opt2 = AdamW(m2, lr=3e-4, betas=BETAS, eps=EPS, weight_decay=wd, decay=_decay_rule)
    topt = torch_adamw(hf, opt2.decayed, lr=3e-4, weight_decay=wd)
    _train(m2, opt2, batches[:4])
    _torch_train(hf, topt, batches[:4], cfg.vocab_size)
    errors, _ = compare_params(m2, hf, cfg.n_embd)
    bad = {k: f"{e:.2e}" for k, e in errors.items() if not e < 1e-5}
    assert not bad, bad


@pytest.mark.parametrize("kwargs", [dict(lr=-1e-3), dict(betas=(1.0, 0.9)),
                                    dict(betas=(0.9, 1.0)), dict(betas=(-0.1, 0.9)),
                                    dict(eps=0.0), dict(eps=-1e-8), dict(weight_decay=-0.1)])
def test_adamw_rejects_bad_hyperparameters(setup, kwargs):
    cfg, m, _ = setup
    with pytest.raises(ValueError):
        AdamW(m, **kwargs)


def test_step_with_zero_grads_and_no_decay_changes_nothing(setup):
    """Zero gradients (a fresh model's grads) and weight_decay=0: m = v = 0, so the update
    0 / (0 + eps) is exactly zero everywhere."""
    cfg, m, _ = setup
    before = {k: v.copy() for k, v in m.params.items()}
    m.zero_grad()
    opt = AdamW(m, lr=1e-2, weight_decay=0.0)
    opt.step()
    for k, v in m.params.items():
        np.testing.assert_array_equal(v, before[k], err_msg=k)


# ------------------------------------------------------------------------------------------
# optimizer.npz: every array's header checked before any array is read


def _npz_with(tmp_path, opt, name: str, member: bytes):
    """opt's saved state with the .npy member `name` replaced by the bytes `member`."""
    import zipfile
    good = tmp_path / "good.npz"
    opt.save(good)
    bad = tmp_path / "optimizer.npz"
    with zipfile.ZipFile(good) as src, zipfile.ZipFile(bad, "w", zipfile.ZIP_DEFLATED) as dst:
        for info in src.infolist():
            dst.writestr(info.filename, member if info.filename == name + ".npy"
                         else src.read(info))
    return bad


def _npy(shape, descr="<f4", data=b""):
    """A .npy file's bytes, written from the format's definition (magic, version 1.0, a
    padded dict header), then `data`."""
    header = repr({"descr": descr, "fortran_order": False, "shape": tuple(shape)})
    header = header + " " * (63 - (10 + len(header)) % 64) + "\n"
    import struct
    return b"\x93NUMPY\x01\x00" + struct.pack("<H", len(header)) + header.encode() + data


def test_load_refuses_a_declared_8_gib_array_without_allocating_it(tmp_path, setup):
    """m.npy declares (2**31,) float32, 8 GiB, in a file of a few KB: refused naming the
    file and the array, in a process whose address space (2 GiB) cannot hold the array.  An
    extra member declaring as much is never read at all."""
    import os
    import subprocess
    import sys
    import zipfile
    cfg, m, _ = setup
    (tmp_path / "bomb").mkdir()
    bomb = _npz_with(tmp_path / "bomb", AdamW(m), "m", _npy((2**31,), data=b"\0" * 4096))
    assert bomb.stat().st_size < 1 << 20
    extra = tmp_path / "extra.npz"
    AdamW(m).save(extra)
    with zipfile.ZipFile(extra, "a") as z:
        z.writestr("junk.npy", _npy((2**31,), data=b"\0" * 4096))
    weights = tmp_path / "model"
    m.save_safetensors(weights)
    code = f"""
import resource, sys
resource.setrlimit(resource.RLIMIT_AS, (2 << 30, 2 << 30))
from gpt2s import GPT2, AdamW
opt = AdamW(GPT2.from_safetensors({str(weights)!r}))
for path in sys.argv[1:]:
    try:
        opt.load(path)
        print("loaded")
    except BaseException as e:
        print(type(e).__name__ + ": " + str(e))
"""
    r = subprocess.run([sys.executable, "-c", code, str(bomb), str(extra)], capture_output=True,
                       text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr
    refused, loaded = r.stdout.strip().splitlines()
    assert refused.startswith("ValueError: ") and str(bomb) in refused, refused
    assert "array 'm' has shape (2147483648,)" in refused and \
        f"needs ({m.store.buffer.size},)" in refused, refused
    assert loaded == "loaded"


@pytest.mark.parametrize("name, member, message", [
    ("v", lambda n: _npy((n,), data=b"\0" * (4 * n + 64)), "array 'v' declares"),
    ("m", lambda n: _npy((n,), descr="<i8", data=b"\0" * (8 * n)), "array 'm' has dtype int64"),
    ("betas", lambda n: _npy((3,), descr="<f8", data=b"\0" * 24), "array 'betas' has shape (3,)"),
])
def test_load_refuses_members_that_do_not_fit_the_model(tmp_path, setup, name, member, message):
    cfg, m, _ = setup
    opt = AdamW(m)
    opt.m[:] = 0.5
    path = _npz_with(tmp_path, opt, name, member(m.store.buffer.size))
    fresh = AdamW(m)
    with pytest.raises(ValueError, match=re.escape(message)) as e:
        fresh.load(path)
    assert str(path) in str(e.value)
    assert not fresh.m.any()          # nothing loaded
