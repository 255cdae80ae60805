"""GPT-2 variants (issue 15): every config field of transformers' GPT2Config that changes the
math is honoured exactly or refused by name.

* kernels: the erf against math.erf, each activation's forward and backward against float64
  (and the float64 derivatives against finite differences);
* the parity matrix: each field alone and a few combined, against transformers'
  GPT2LMHeadModel in float64 (logits, loss, every gradient by torch autograd, greedy
  generation with the KV cache) and against tests/ref.py (itself checked against
  transformers);
* save -> transformers from_pretrained -> same logits, and transformers' save_pretrained ->
  gpt2s; config.json round trips; refusals naming the field and the value;
* an untied head trains: AdamW moves lm_head.weight and wte.weight separately.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

import ref
from gpt2s import GPT2, AdamW, GPT2Config, _core
from gpt2s.config import ACTIVATION_KERNELS
from gpt2s.weights import SafetensorsError

LOGIT_TOL = 1e-5
GRAD_TOL = 1e-4

# name -> GPT2Config fields (``eps`` is make_config's name for layer_norm_epsilon)
VARIANTS = {
    "default": {},
    "gelu_pytorch_tanh": dict(activation_function="gelu_pytorch_tanh"),
    "gelu_fast": dict(activation_function="gelu_fast"),
    "gelu_erf": dict(activation_function="gelu"),
    "relu": dict(activation_function="relu"),
    "silu": dict(activation_function="silu"),
    "swish": dict(activation_function="swish"),
    "quick_gelu": dict(activation_function="quick_gelu"),
    "n_inner": dict(n_inner=80),
    "eps1e-3": dict(eps=1e-3),
    "no_scale": dict(scale_attn_weights=False),
    "inverse_layer_idx": dict(scale_attn_by_inverse_layer_idx=True),
    "reorder_upcast": dict(reorder_and_upcast_attn=True),
    "crfm": dict(scale_attn_by_inverse_layer_idx=True, reorder_and_upcast_attn=True),
    "untied": dict(tie_word_embeddings=False),
    "cerebras_like": dict(activation_function="gelu", n_inner=96),
    "combo": dict(activation_function="quick_gelu", n_inner=48, tie_word_embeddings=False,
                  scale_attn_weights=False, scale_attn_by_inverse_layer_idx=True, eps=1e-4),
}


# aliases of another entry's kernels (gelu_pytorch_tanh, gelu_fast, swish) and flags whose
# math is another entry's (reorder_upcast, eps, cerebras_like) are left out of the slower
# generation and save tests; the parity test covers every entry
DISTINCT = ["default", "gelu_erf", "relu", "silu", "quick_gelu", "n_inner", "no_scale",
            "inverse_layer_idx", "crfm", "untied", "combo"]


def _cfg(make_config, variant, **sizes):
    kw = dict(n_layer=3, n_head=2, head_size=16, vocab_size=97, n_ctx=40)
    kw.update(sizes)
    return make_config(**kw, **VARIANTS[variant])


def _ref_flags(cfg: GPT2Config) -> dict:
    return dict(eps=cfg.layer_norm_epsilon, activation=cfg.activation_function,
                scale_attn_weights=cfg.scale_attn_weights,
                scale_attn_by_inverse_layer_idx=cfg.scale_attn_by_inverse_layer_idx)


def _hf_model(cfg, params, make_hf_model):
    """transformers in float64.  reorder_and_upcast_attn acts only in its eager attention,
    which refuses float64 (it insists on float32 scores): in float64 the flag changes nothing
    there, as here; test_parity_with_transformers also runs the eager float32 path."""
    return make_hf_model(cfg, params, dtype="float64")


def _hf_named(hf):
    named = dict(hf.transformer.named_parameters())
    if not hf.config.tie_word_embeddings:
        named["lm_head.weight"] = hf.lm_head.weight
    return named


# ------------------------------------------------------------------------------------------
# kernels


def test_erf_accuracy(record_error):
    """The float32 erf/erfc of the gelu_erf kernel against math.erf/math.erfc (double)."""
    z = np.concatenate([np.linspace(-10, 10, 400_001), [0.0, -0.0, 1.0, -1.0, 0.99999994,
                                                        9.3, 12.0, -30.0, 1e-30, -1e-30]])
    z = z.astype(np.float32)
    out, outc = np.empty((1, z.size), np.float32), np.empty((1, z.size), np.float32)
    _core.erf_forward(out, z[None])
    _core.erf_forward(outc, z[None], True)
    zd = z.astype(np.float64)
    want = np.array([math.erf(v) for v in zd])
    wantc = np.array([math.erfc(v) for v in zd])
    err = np.abs(out[0] - want)
    record_error("erf max abs error vs math.erf", err.max(), f"z={zd[err.argmax()]:.6g}")
    assert err.max() < 1.0e-7
    ulps = err / np.spacing(np.abs(want).astype(np.float32))
    assert ulps[zd != 0].max() < 2.0
    assert np.all(np.abs(out[0]) <= 1.0) and np.all(out[0][zd == 0] == 0.0)
    normal = wantc > 1e-37     # erfc below float32's normal range keeps a ~4e-39 floor
    relc = np.abs(outc[0] - wantc)[normal] / wantc[normal]
    record_error("erfc max rel error vs math.erfc (normal range)", relc.max())
    assert relc.max() < 1e-6
    assert np.all((outc[0][~normal] >= 0) & (outc[0][~normal] < 2e-37))


def _act_inputs():
    rng = np.random.default_rng(7)
    x = np.concatenate([np.linspace(-30, 30, 60_000), rng.standard_normal(2997) * 3,
                        [0.0, 1e-30, -1e-30]])
    return x.astype(np.float32).reshape(3, -1)


def _sigmoid(z):
    with np.errstate(over="ignore"):
        return 1.0 / (1.0 + np.exp(-z))


def _exact(kernel, x):
    """float64 (f, f', g, m) of each kernel, written in forms that stay accurate in the tails
    (ref.py's 1 + tanh cancels there): f = x g(x), and m bounds the size of the terms of f'
    whose float32 rounding the kernel's error is measured against."""
    if kernel == "gelu_tanh":
        s = _sigmoid(2 * ref.GELU_K * (x + ref.GELU_C * x ** 3))
        k = 2 * ref.GELU_K * (1 + 3 * ref.GELU_C * x * x)
        return x * s, s + x * s * (1 - s) * k, s, s + np.abs(x) * k * s
    if kernel in ("silu", "quick_gelu"):
        k = 1.0 if kernel == "silu" else 1.702
        s = _sigmoid(k * x)
        return x * s, s + k * x * s * (1 - s), s, s + k * np.abs(x) * s
    if kernel == "gelu_erf":
        cdf, pdf = ref.normal_cdf(x), np.exp(-x * x / 2) / math.sqrt(2 * math.pi)
        return x * cdf, cdf + x * pdf, cdf, cdf + np.abs(x) * pdf
    g = (x > 0).astype(np.float64)
    return x * g, g, g, g


@pytest.mark.parametrize("hf_name", ["gelu_new", "gelu", "relu", "silu", "quick_gelu"])
def test_activation_forward_backward_vs_float64(hf_name, record_error):
    """Each activation kernel, forward and backward, against float64 elementwise over
    [-30, 30]: the error is at most 4 float32 half-ulps times (1 + |ln g|) of f (forward) or
    of the size of f's terms (backward), f = x g(x).  The |ln g| factor is the float32
    rounding of the exponent in the tails (exp(y) is only as exact as y); below 1e-34 only
    an absolute bound.  ref.py's formulas are checked against the same values."""
    kernel = ACTIVATION_KERNELS[hf_name]
    x = _act_inputs()
    xd = x.astype(np.float64)
    out = np.empty_like(x)
    _core.activation_forward(out, x, kernel)
    dout = np.random.default_rng(1).uniform(0.5, 2.0, x.shape).astype(np.float32)
    dout *= np.where(np.random.default_rng(2).random(x.shape) < 0.5, -1, 1).astype(np.float32)
    dinp = np.empty_like(x)
    _core.activation_backward(dinp, x, dout, kernel)
    din2 = dout.copy()    # in place (dinp over dout), as the model calls it
    _core.activation_backward(din2, x, din2, kernel)
    np.testing.assert_array_equal(din2, dinp)

    f, fprime, g, m = _exact(kernel, xd)
    envelope = 2.0 ** -24 * (1 + np.abs(np.log(np.maximum(g, 1e-300))))
    dd = dout.astype(np.float64)
    for what, got, want, size in (("forward", out, f, np.abs(f)),
                                  ("backward", dinp, dd * fprime, np.abs(dd) * m)):
        err = np.abs(got - want)
        ratio = np.where(size > 1e-34, err / np.maximum(envelope * size, 1e-300), 0.0)
        record_error(f"activation {kernel} {what}: error / envelope", ratio.max())
        assert ratio.max() < 4.0, (what, xd.ravel()[ratio.argmax()])
        assert err[size <= 1e-34].max(initial=0.0) < 1e-34
        rel = err[np.abs(want) > 1e-3] / np.abs(want[np.abs(want) > 1e-3])
        record_error(f"activation {kernel} {what}: worst rel (|value| > 1e-3)", rel.max())
    assert np.all(out[x == 0] == 0.0)
    # ref.py (the model reference) computes the same functions
    f_ref, fprime_ref = ref.ACTIVATIONS[hf_name]
    mid = np.abs(xd) < 5
    np.testing.assert_allclose(f_ref(xd[mid]), f[mid], rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(fprime_ref(xd[mid]), fprime[mid], rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("hf_name", ["gelu_new", "gelu", "relu", "silu", "quick_gelu"])
def test_reference_activation_derivatives_by_finite_differences(hf_name):
    """ref.py's analytic derivatives (which the kernels are held to) against central
    differences in float64 (away from relu's kink)."""
    f, fgrad = ref.ACTIVATIONS[hf_name]
    x = np.linspace(-9, 9, 3601)
    x = x[np.abs(x) > 1e-3]
    h = 1e-6
    fd = (f(x + h) - f(x - h)) / (2 * h)
    np.testing.assert_allclose(fgrad(x), fd, rtol=1e-7, atol=1e-8)


def test_activation_kernel_errors():
    x = np.zeros((2, 8), np.float32)
    with pytest.raises(ValueError, match="mish"):
        _core.activation_forward(x, x, "mish")
    with pytest.raises(ValueError, match="mish"):
        _core.activation_backward(x, x, x, "mish")
    with pytest.raises(ValueError, match=r"activation_forward: out \(2,7\)"):
        _core.activation_forward(np.zeros((2, 7), np.float32), x, "relu")
    with pytest.raises(ValueError, match="activation_backward"):
        _core.activation_backward(x, x, np.zeros((3, 8), np.float32), "silu")
    assert set(ACTIVATION_KERNELS.values()) == set(_core.activation_kernels())


# ------------------------------------------------------------------------------------------
# the parity matrix against transformers (float64) and ref.py


def _run_ours(m, idx, targets):
    m.zero_grad()
    logits, loss = m.forward(idx, targets)
    m.backward()
    return logits, loss, {k: v.copy() for k, v in m.grads.items()}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_parity_with_transformers(variant, make_config, make_model, make_batch, make_hf_model,
                                  record_error):
    torch = pytest.importorskip("torch")
    cfg = _cfg(make_config, variant)
    m = make_model(cfg, seed=3)
    params = {k: v.copy() for k, v in m.params.items()}
    idx, targets = make_batch(cfg, 2, 40, seed=5, ignore_frac=0.2)
    logits, loss, grads = _run_ours(m, idx, targets)

    hf = _hf_model(cfg, params, make_hf_model)
    hf_logits = hf(torch.from_numpy(idx)).logits
    hf_loss = torch.nn.functional.cross_entropy(
        hf_logits.reshape(-1, cfg.vocab_size), torch.from_numpy(targets).reshape(-1),
        ignore_index=-1)
    hf_loss.backward()
    e_logits = record_error(f"variants: logits vs transformers [{variant}]",
                            ref.rel_err(logits, hf_logits.detach().numpy()))
    e_loss = record_error(f"variants: loss vs transformers [{variant}]",
                          abs(loss - hf_loss.item()) / abs(hf_loss.item()))
    named = _hf_named(hf)
    assert set(named) == set(grads)
    errors = {k: ref.rel_err(grads[k], p.grad.numpy()) for k, p in named.items()}
    worst = max(errors, key=errors.get)
    record_error(f"variants: worst grad vs transformers [{variant}]", errors[worst], worst)
    assert e_logits < LOGIT_TOL and e_loss < LOGIT_TOL
    bad = {k: f"{e:.2e}" for k, e in errors.items() if not e < GRAD_TOL}
    assert not bad, f"{variant}: gradients off by more than {GRAD_TOL}: {bad}"
    if not cfg.tie_word_embeddings:   # the two really are separate parameters
        assert ref.rel_err(grads["lm_head.weight"], grads["wte.weight"]) > 0.5

    # ref.py (float64) computes the same model: against transformers to float64 rounding,
    # and gpt2s against it to the same tolerances
    r_logits, r_loss, r_grads = ref.loss_and_grads(params, idx, targets, n_head=cfg.n_head,
                                                   **_ref_flags(cfg))
    assert set(r_grads) == set(grads)
    assert ref.rel_err(r_logits, hf_logits.detach().numpy()) < 1e-10
    assert abs(r_loss - hf_loss.item()) < 1e-10 * abs(r_loss)
    for k, p in named.items():
        assert ref.rel_err(r_grads[k], p.grad.numpy()) < 1e-9, k
    assert ref.rel_err(logits, r_logits) < LOGIT_TOL
    worst_ref = max(ref.rel_err(grads[k], g) for k, g in r_grads.items())
    record_error(f"variants: worst grad vs ref.py [{variant}]", worst_ref)
    assert worst_ref < GRAD_TOL
    if cfg.reorder_and_upcast_attn:
        # transformers' own reorder-and-upcast path (eager attention, float32 model): the
        # scale folded into the Q K^T product, float32 scores, as gpt2s computes them
        eager = make_hf_model(cfg, params, dtype="float32", attn_implementation="eager")
        eager_logits = eager(torch.from_numpy(idx)).logits
        e = record_error("variants: logits vs transformers eager float32 reorder_and_upcast",
                         ref.rel_err(logits, eager_logits.detach().numpy()), variant)
        assert e < LOGIT_TOL


def _greedy_model(make_config, make_model, variant):
    """A model whose greedy continuation moves (matmul weights and wte x4) with clear top-2
    logit gaps, so float32 vs float64 cannot flip an argmax."""
    cfg = _cfg(make_config, variant, vocab_size=131, n_ctx=40)
    m = make_model(cfg, seed=21)
    for name, p in m.params.items():
        if p.ndim == 2 and name not in ("wpe.weight",):
            p *= np.float32(4.0)
    return cfg, m


@pytest.mark.parametrize("variant", DISTINCT)
def test_greedy_generation_equals_transformers(variant, make_config, make_model, make_hf_model):
    """gpt2s' KV-cache greedy decoding gives transformers' greedy generate, token for token
    (its own cache, float64)."""
    torch = pytest.importorskip("torch")
    cfg, m = _greedy_model(make_config, make_model, variant)
    hf = _hf_model(cfg, {k: v.copy() for k, v in m.params.items()}, make_hf_model)
    prompt = np.random.default_rng(4).integers(0, cfg.vocab_size, (2, 6))
    n_new = 24
    with torch.no_grad():
        out = hf.generate(torch.from_numpy(prompt), max_new_tokens=n_new, do_sample=False,
                          min_new_tokens=n_new, pad_token_id=0, eos_token_id=None,
                          output_scores=True, return_dict_in_generate=True)
    expected = out.sequences.numpy()
    top2 = torch.stack(out.scores).topk(2, dim=-1).values       # (n_new, B, 2)
    gap = ((top2[..., 0] - top2[..., 1]) / top2[..., 0].abs()).min().item()
    assert gap > 1e-5, f"a near-tie (relative top-2 gap {gap:.1e}) makes the test fragile"
    assert len(set(expected[:, 6:].ravel().tolist())) >= 3, "degenerate greedy continuation"
    np.testing.assert_array_equal(m.generate(prompt, n_new, temperature=0), expected)


@pytest.mark.parametrize("variant", DISTINCT)
def test_save_then_transformers_from_pretrained(variant, tmp_path, make_config, make_model,
                                                make_batch, record_error):
    """Our save (model.safetensors + config.json from to_hf_dict) is the same model in
    transformers; and transformers' save_pretrained of it loads back into gpt2s unchanged."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    cfg = _cfg(make_config, variant, n_layer=2, vocab_size=61, n_ctx=24)
    m = make_model(cfg, seed=31)
    idx, _ = make_batch(cfg, 2, 24, seed=32)
    logits, _ = m.forward(idx)
    m.save_safetensors(tmp_path / "ours")
    hf = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "ours",
                                                      dtype=torch.float64).eval()
    assert hf.config.tie_word_embeddings == cfg.tie_word_embeddings
    with torch.no_grad():
        hf_logits = hf(torch.from_numpy(idx)).logits.numpy()
    e = record_error("variants: saved model logits vs transformers from_pretrained",
                     ref.rel_err(logits, hf_logits), variant)
    assert e < LOGIT_TOL
    hf.to(torch.float32).save_pretrained(tmp_path / "theirs")
    back = GPT2.from_safetensors(tmp_path / "theirs")
    assert back.config == cfg
    assert set(back.params) == set(m.params)
    for k, v in m.params.items():
        np.testing.assert_array_equal(back.params[k], v, err_msg=k)
    np.testing.assert_array_equal(back.forward(idx)[0], logits)


# ------------------------------------------------------------------------------------------
# config.json


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_config_round_trips(variant, make_config, tmp_path):
    pytest.importorskip("transformers")
    from conftest import hf_config
    cfg = _cfg(make_config, variant)
    d = cfg.to_hf_dict()
    assert GPT2Config.from_hf_dict(json.loads(json.dumps(d))) == cfg
    # transformers' own config of the same model, in full and as the diff it writes
    full = hf_config(cfg).to_dict()
    assert GPT2Config.from_hf_dict(full) == cfg
    hf_config(cfg).to_json_file(str(tmp_path / "config.json"))
    assert GPT2Config.from_json_file(tmp_path / "config.json") == cfg
    # ours, read by transformers: every field that changes the math means the same there
    import transformers
    theirs = transformers.GPT2Config.from_dict(d)
    for key in ("n_inner", "activation_function", "scale_attn_weights",
                "scale_attn_by_inverse_layer_idx", "reorder_and_upcast_attn",
                "tie_word_embeddings", "layer_norm_epsilon", "add_cross_attention"):
        assert getattr(theirs, key) == full[key], key


def test_config_derived_values(make_config):
    cfg = make_config(n_layer=3, n_head=2, head_size=16)
    assert cfg.inner_size == 128 and cfg.activation_kernel == "gelu_tanh"
    assert [cfg.attention_scale(l) for l in range(3)] == [0.25] * 3
    c2 = make_config(n_layer=3, n_head=2, head_size=16, n_inner=40, activation_function="swish",
                     scale_attn_by_inverse_layer_idx=True, tie_word_embeddings=False)
    assert c2.inner_size == 40 and c2.activation_kernel == "silu"
    assert [c2.attention_scale(l) for l in range(3)] == [0.25, 0.125, 0.25 / 3]
    assert make_config(scale_attn_weights=False).attention_scale(0) == 1.0
    m = GPT2.from_config(c2)
    assert m.num_parameters() == c2.num_parameters()
    assert m.params["lm_head.weight"].shape == (c2.vocab_size, c2.n_embd)
    assert m.params["h.0.mlp.c_fc.weight"].shape == (32, 40)
    assert m.params["h.2.mlp.c_proj.weight"].shape == (40, 32)


def test_ignored_fields_are_accepted(make_config):
    """Fields that do not change the math (dropouts, token ids, architectures, generation
    settings, ...) are accepted and ignored."""
    cfg = make_config()
    d = dict(cfg.to_hf_dict(), resid_pdrop=0.1, embd_pdrop=0.1, attn_pdrop=0.1,
             summary_first_dropout=0.1, bos_token_id=1, eos_token_id=2, pad_token_id=3,
             architectures=["GPT2DoubleHeadsModel"], use_cache=False, initializer_range=0.5,
             task_specific_params={"text-generation": {"do_sample": True}},
             transformers_version="4.0", torch_dtype="bfloat16", add_cross_attention=False,
             pruned_heads={}, quantization_config=None, n_inner=None, some_future_key=1)
    assert GPT2Config.from_hf_dict(d) == cfg


@pytest.mark.parametrize("key,value,shown", [
    ("add_cross_attention", True, "add_cross_attention=true"),
    ("model_type", "gpt_neo", 'model_type="gpt_neo"'),
    ("model_type", "gpt2-custom", 'model_type="gpt2-custom"'),
    ("activation_function", "mish", "activation_function='mish'"),
    ("activation_function", "gelu_10", "activation_function='gelu_10'"),
    ("activation_function", "relu6", "activation_function='relu6'"),
    ("pruned_heads", {"0": [1]}, "pruned_heads="),
    ("quantization_config", {"quant_method": "gptq", "bits": 4}, "quantization_config="),
    ("n_inner", 0, "n_inner"),
    ("n_inner", 12.5, "n_inner"),
    ("scale_attn_weights", "yes", "scale_attn_weights"),
    ("tie_word_embeddings", 0, "tie_word_embeddings"),
    ("reorder_and_upcast_attn", None, "reorder_and_upcast_attn"),
])
def test_refused_fields_name_field_and_value(key, value, shown, make_config, tmp_path):
    d = dict(make_config().to_hf_dict(), **{key: value})
    path = tmp_path / "config.json"
    path.write_text(json.dumps(d))
    with pytest.raises(ValueError) as e:
        GPT2Config.from_json_file(path)
    msg = str(e.value)
    assert str(path) in msg and shown in msg and key in msg, msg
    if key in ("quantization_config",):
        assert "gptq" in msg


def test_refused_field_when_loading_a_checkpoint(tmp_path, make_config, make_model):
    m = make_model(make_config(n_layer=1), seed=1)
    m.save_safetensors(tmp_path)
    d = json.loads((tmp_path / "config.json").read_text())
    d["activation_function"] = "mish"
    (tmp_path / "config.json").write_text(json.dumps(d))
    with pytest.raises(ValueError, match="activation_function='mish'"):
        GPT2.from_safetensors(tmp_path)


# ------------------------------------------------------------------------------------------
# weights: n_inner inferred, untied head loaded / required / saved outside the prefix


def test_n_inner_inferred_without_config(tmp_path, make_config, make_model, make_batch):
    cfg = make_config(n_layer=2, n_head=1, head_size=64, n_inner=96, vocab_size=50, n_ctx=16)
    m = make_model(cfg, seed=2)
    m.save_safetensors(tmp_path / "m.safetensors")
    back = GPT2.from_safetensors(tmp_path / "m.safetensors")
    assert back.config == cfg
    idx, _ = make_batch(cfg, 1, 16)
    np.testing.assert_array_equal(back.forward(idx)[0], m.forward(idx)[0])


def test_untied_checkpoint_layout(tmp_path, make_config, make_model):
    from gpt2s.weights import read_safetensors_header
    cfg = make_config(n_layer=1, tie_word_embeddings=False)
    m = make_model(cfg, seed=4)
    m.save_safetensors(tmp_path)
    raw = (tmp_path / "model.safetensors").read_bytes()
    header, _ = read_safetensors_header(tmp_path / "model.safetensors", len(raw), raw)
    assert "lm_head.weight" in header and "transformer.lm_head.weight" not in header
    assert "transformer.wte.weight" in header
    # a missing head is named, with why it is needed
    d = tmp_path / "nohead"
    d.mkdir()
    tensors = {"transformer." + k: v for k, v in m.params.items() if k != "lm_head.weight"}
    pytest.importorskip("safetensors")
    from safetensors.numpy import save_file
    save_file(tensors, str(d / "model.safetensors"))
    (d / "config.json").write_text(json.dumps(cfg.to_hf_dict()))
    with pytest.raises(SafetensorsError, match="'lm_head.weight'.*tie_word_embeddings false"):
        GPT2.from_safetensors(d)
    # a tied config with a differing head says how to untie it
    (d / "config.json").write_text(json.dumps(dict(cfg.to_hf_dict(), tie_word_embeddings=True)))
    save_file(dict(tensors, **{"lm_head.weight": m.params["lm_head.weight"]}),
              str(d / "model.safetensors"))
    with pytest.raises(SafetensorsError, match="tie_word_embeddings"):
        GPT2.from_safetensors(d)


def test_untied_head_trains_separately(make_config, make_model, make_batch):
    """One AdamW step: lm_head.weight and wte.weight get their own gradients and updates
    (torch.optim.AdamW given the same gradients agrees); wte rows of tokens absent from the
    batch get no gradient (only the decay), while every lm_head row moves; a few more steps
    lower the loss."""
    torch = pytest.importorskip("torch")
    cfg = make_config(n_layer=2, vocab_size=80, n_ctx=16, tie_word_embeddings=False)
    m = make_model(cfg, seed=8)
    idx, targets = make_batch(cfg, 2, 16, seed=9, ignore_frac=0.0)
    before = {k: v.copy() for k, v in m.params.items()}
    opt = AdamW(m, lr=1e-3, weight_decay=0.1)
    assert "lm_head.weight" in opt.decayed
    m.zero_grad()
    _, loss0 = m.forward(idx, targets)
    m.backward()
    grads = {k: v.copy() for k, v in m.grads.items()}
    opt.step()

    # torch's AdamW, fed the same gradients
    tparams = {k: torch.tensor(v, dtype=torch.float64, requires_grad=True)
               for k, v in before.items()}
    decayed = set(opt.decayed)
    topt = torch.optim.AdamW(
        [{"params": [p for k, p in tparams.items() if k in decayed], "weight_decay": 0.1},
         {"params": [p for k, p in tparams.items() if k not in decayed], "weight_decay": 0.0}],
        lr=1e-3, betas=opt.betas, eps=opt.eps)
    for k, p in tparams.items():
        p.grad = torch.from_numpy(grads[k].astype(np.float64))
    topt.step()
    for k in ("lm_head.weight", "wte.weight", "h.1.mlp.c_fc.weight"):
        np.testing.assert_allclose(m.params[k], tparams[k].detach().numpy(), rtol=2e-6,
                                   atol=2e-8, err_msg=k)

    used = np.zeros(cfg.vocab_size, bool)
    used[idx.ravel()] = True
    assert not used.all()
    d_head = m.params["lm_head.weight"] - before["lm_head.weight"]
    d_wte = m.params["wte.weight"] - before["wte.weight"]
    assert np.all(np.abs(d_head).max(axis=1) > 5e-4)              # every head row moved by ~lr
    np.testing.assert_array_equal(grads["wte.weight"][~used], 0.0)
    np.testing.assert_allclose(m.params["wte.weight"][~used],
                               before["wte.weight"][~used] * np.float32(1 - 1e-3 * 0.1),
                               rtol=1e-7)
    assert np.all(np.abs(d_wte[used]).max(axis=1) > 5e-4)
    assert not np.allclose(d_head, d_wte)
    for _ in range(5):
        m.zero_grad()
        m.forward(idx, targets)
        m.backward()
        opt.step()
    assert m.forward(idx, targets)[1] < loss0 - 0.01
