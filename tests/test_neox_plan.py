"""GPT-NeoX inference through the one-call `_core.LlamaPlan` (LayerNorm with biases, parallel
or sequential residual, partial rotary, a non-gated MLP, per-head interleaved query_key_value)
against the block-by-block path `LlamaForCausalLM._block` on the same model: the logits of
forward, of a cached prefill, of decode steps and of a ragged batch, and greedy generations,
equal bit for bit in float32, bfloat16, int8 and int4, on one and two threads; the float32
plan also against the float64 reference (tests/ref_neox.py)."""

from __future__ import annotations

import numpy as np
import pytest
import ref_neox
from ref import rel_err

import gpt2s
from gpt2s import _core
from gpt2s.neox import GPTNeoXForCausalLM
from gpt2s.neox_config import GPTNeoXConfig

CONFIGS = {
    # Pythia's block: parallel residual, a quarter of each head rotated, untied head
    "parallel-quarter": dict(vocab_size=61, hidden_size=64, intermediate_size=96,
                             num_hidden_layers=2, num_attention_heads=4),
    # sequential residual, the whole head rotated, tied head
    "sequential-full-tied": dict(vocab_size=50, hidden_size=64, intermediate_size=64,
                                 num_hidden_layers=2, num_attention_heads=8, rotary_pct=1.0,
                                 use_parallel_residual=False, tie_word_embeddings=True),
    # no attention biases, the tanh GELU, half of each head rotated, another base and eps
    "nobias-tanh-half": dict(vocab_size=40, hidden_size=64, intermediate_size=96,
                             num_hidden_layers=2, num_attention_heads=4, rotary_pct=0.5,
                             attention_bias=False, hidden_act="gelu_new",
                             rotary_emb_base=500.0, layer_norm_eps=1e-6),
    # Pythia-160M's head of 64 with a rotary 16, three layers
    "pythia-heads": dict(vocab_size=70, hidden_size=128, intermediate_size=256,
                         num_hidden_layers=3, num_attention_heads=2),
}
DTYPES = ["float32", "bfloat16", "int8", "int4"]


def make(name, seed=0):
    cfg = GPTNeoXConfig(**CONFIGS[name])
    m = GPTNeoXForCausalLM.from_config(cfg, seed=seed)
    rng = np.random.default_rng(seed + 1)
    scale = 5.0 * (32 / cfg.hidden_size) ** 0.5
    for p in m.params.values():
        p[...] = (p * scale + rng.normal(0, 0.05, p.shape)).astype(np.float32)
        if p.ndim == 1:
            p += 1.0
    return cfg, m


def _no_block(*a, **k):
    raise AssertionError("the plan route ran a block through _block")


def run(m, idx, steps, *, plan):
    """Everything the inference paths compute for idx (B, T): forward's logits, a cached
    prefill and steps greedy decode steps (logits of each), a ragged batch step, and a greedy
    generation; plan False forces the block-by-block path."""
    if plan:
        assert m._inference_plan() is not None
        m._block = _no_block   # the one-call route must not fall back
    else:
        m._inference_plan = lambda: None
    try:
        B, T = idx.shape
        out = [m.forward(idx)[0]]
        cache = m.kv_cache(B, T + steps + 2)
        logits = m.forward_cached(idx, 0, cache)
        out.append(logits)
        for i in range(steps):
            nxt = logits.argmax(-1)[:, None]
            logits = m.forward_cached(nxt, T + i, cache)
            out.append(logits)
        m.__dict__.pop("_block", None)
        # ragged: the rows at different positions (the block-by-block path runs these on
        # both routes; the cache they read was written by the route under test)
        out.append(m.forward_cached(np.arange(B)[:, None] % 7,
                                    np.array([T + steps - b for b in range(B)]), cache))
        out.append(m.generate(idx, steps + 2, temperature=0.0))
        return out
    finally:
        m.__dict__.pop("_inference_plan", None)
        m.__dict__.pop("_block", None)


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", list(CONFIGS))
def test_plan_equals_block_path(name, dtype, threads, every_kernel_parallel):
    gpt2s.set_num_threads(threads)
    cfg, m = make(name)
    m = m.to_dtype(dtype) if dtype != "float32" else m
    idx = np.random.default_rng(3).integers(0, cfg.vocab_size, (2, 9))
    got = run(m, idx, 4, plan=True)
    want = run(m, idx, 4, plan=False)
    assert len(got) == len(want)
    for i, (g, w) in enumerate(zip(got, want)):
        assert g.shape == w.shape and g.dtype == w.dtype, i
        assert np.array_equal(g, w), (i, float(np.abs(g.astype(np.float64) - w).max()))


@pytest.mark.parametrize("name", list(CONFIGS))
def test_plan_matches_float64_reference(name):
    cfg, m = make(name, seed=2)
    assert m._inference_plan() is not None
    idx = np.random.default_rng(5).integers(0, cfg.vocab_size, (2, 10))
    want = ref_neox.forward(m.params, idx, n_head=cfg.n_head, rotary_pct=cfg.rotary_pct,
                            rotary_base=cfg.rotary_emb_base, eps=cfg.layer_norm_eps,
                            parallel=cfg.use_parallel_residual, activation=cfg.hidden_act)[0]
    assert rel_err(m.forward(idx)[0], want) < 1e-5
    cache = m.kv_cache(2, 16)
    m.forward_cached(idx[:, :6], 0, cache)
    for t in range(6, 10):
        assert rel_err(m.forward_cached(idx[:, t:t + 1], t, cache), want[:, t]) < 1e-5


def test_bfloat16_compute_stays_on_block_path():
    _, m = make("parallel-quarter")
    m.compute_dtype = "bfloat16"
    assert m._inference_plan() is None


def _layer(H, W, U, I, n=10):
    z = lambda *s: np.zeros(s, np.float32)
    return (z(H), z(W, H), z(W), z(H, H), z(H), z(H), z(U, H), z(U), z(H, I), z(H))[:n]


def test_plan_arguments_checked():
    H, NH, HD, I = 8, 2, 4, 12
    W = 3 * H
    with pytest.raises(ValueError, match="norm 'batchnorm'"):
        _core.LlamaPlan([_layer(H, W, I, I)], H, NH, NH, HD, I, 1e-5, 0.5, "gelu_erf",
                        norm="batchnorm")
    with pytest.raises(ValueError, match="n_kv_head == n_head"):
        _core.LlamaPlan([_layer(H, 2 * H, 2 * I, I)], H, NH, 1, HD, I, 1e-5, 0.5, "silu",
                        interleaved=True)
    with pytest.raises(ValueError, match="10 entries, need 12"):
        _core.LlamaPlan([_layer(H, W, I, I)], H, NH, NH, HD, I, 1e-5, 0.5, "gelu_erf",
                        norm="layernorm", gated=False)
    with pytest.raises(ValueError, match="needs both norm biases"):
        _core.LlamaPlan([_layer(H, W, I, I) + (None, None)], H, NH, NH, HD, I, 1e-5, 0.5,
                        "gelu_erf", norm="layernorm", gated=False)
    with pytest.raises(ValueError, match=r"gate\|up weight of logical shape \(24, 8\), need "
                                         r"\(12, 8\)"):
        _core.LlamaPlan([_layer(H, W, 2 * I, I) + (np.zeros(H, np.float32),) * 2], H, NH,
                        NH, HD, I, 1e-5, 0.5, "gelu_erf", norm="layernorm", gated=False)
    plan = _core.LlamaPlan([_layer(H, W, I, I) + (np.zeros(H, np.float32),) * 2], H, NH, NH,
                           HD, I, 1e-5, 0.5, "gelu_erf", norm="layernorm",
                           parallel_residual=True, gated=False, interleaved=True)
    assert (plan.layernorm, plan.parallel_residual, plan.gated, plan.interleaved) == \
        (True, True, False, True)
    assert plan.work_size(3) == 3 * (3 * H + W + H + 3 * I + HD + W)
