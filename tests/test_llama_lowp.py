"""Llama / Qwen2 models with their matmul weights (the projections, the embedding, an untied
head) stored in bfloat16, int8 or int4 blocks, against the float32 model with the same
weights: logits within the bounds GPT-2's low-precision models meet (tests/test_lowp_model.py),
and equal to a float32 model run on the stored weights widened here by NumPy (so the kernels
add nothing beyond the weights' own rounding), on every kernel variant of this CPU."""

from __future__ import annotations

import numpy as np
import pytest
import ref

from gpt2s import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, _core
from gpt2s import weight_types as wt
from gpt2s.weight_types import PackedWeight

LOWP = ["bfloat16", "int8", "int4"]
BOUND = {"bfloat16": 1e-2, "int8": 3e-2, "int4": 0.35}     # as tests/test_lowp_model.py
VARIANTS = sorted(set(_core.kernel_variants("bfloat16")) & set(_core.kernel_variants("int8")))

CONFIGS = {
    "llama-tied-gqa2": dict(vocab_size=301, hidden_size=128, intermediate_size=96,
                            num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                            tie_word_embeddings=True),
    "qwen2-untied-gqa4": dict(model_type="qwen2", vocab_size=203, hidden_size=128,
                              intermediate_size=160, num_hidden_layers=2,
                              num_attention_heads=8, num_key_value_heads=2),
    "llama-mlp-bias": dict(vocab_size=97, hidden_size=64, intermediate_size=64,
                           num_hidden_layers=1, num_attention_heads=2, attention_bias=True,
                           mlp_bias=True),
}


def rel_l2(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def widen(w) -> np.ndarray:
    """The float32 tensor a stored weight stands for, decoded by NumPy from its bytes."""
    if not isinstance(w, PackedWeight):
        return np.asarray(w, np.float32)
    assert not w.transposed          # (out, in) as nn.Linear stores it
    return ref.widen_stored(w.type_name, w.data, w.scales)


def make(name, seed=0):
    m = LlamaForCausalLM.from_config(LlamaConfig(**CONFIGS[name]), seed=seed)
    rng = np.random.default_rng(seed + 1)
    for p in m.params.values():      # norms and biases away from 1 and 0
        p[...] = (p + rng.normal(0, 0.01, p.shape)).astype(np.float32)
        if p.ndim == 1:
            p += 1.0
    return m


@pytest.fixture(params=VARIANTS)
def lowp_path(request):
    prev = [_core.set_kernel_variant(t, request.param) for t in LOWP]
    yield request.param
    for t, p in zip(LOWP, prev):
        _core.set_kernel_variant(t, p)


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("dtype", LOWP)
def test_logits_against_float32(name, dtype, lowp_path):
    m = make(name)
    idx = np.random.default_rng(2).integers(0, m.config.vocab_size, (2, 19))
    tgt = np.random.default_rng(3).integers(0, m.config.vocab_size, (2, 19))
    want, want_loss = m.forward(idx, tgt, for_backward=False)
    q = m.to_dtype(dtype)
    assert q.dtype == dtype and dtype in repr(q)
    got, loss = q.forward(idx, tgt)
    err = rel_l2(got, want)
    assert err <= BOUND[dtype], f"{dtype}: logits rel L2 {err:.2e}"
    assert abs(loss - want_loss) <= BOUND[dtype] * abs(want_loss)
    # every matmul weight is stored; norms and biases stay float32 and equal
    for k, v in q.params.items():
        assert isinstance(v, PackedWeight) == wt.is_compressed(k), k
        if not wt.is_compressed(k):
            assert np.array_equal(v, m.params[k]), k
        else:   # the joined q|k|v, gate|up rows are each tensor compressed on its own
            assert np.array_equal(np.asarray(v), np.asarray(wt.get(dtype).compress(
                k, m.params[k]))), k
    # a float32 model on the stored weights (widened by NumPy) gives the same logits
    f = LlamaForCausalLM(m.config)
    for k, v in q.params.items():
        f.params[k][...] = widen(v)
    exact = f.forward(idx)[0]
    assert rel_l2(got, exact) < 1e-5   # 38 rows: widened panels, float32 products
    # the decoding path: prefill then one token at a time from the cache.  At most 32 rows
    # go to the direct kernels, whose 4-bit ones round the activations to int8 per block
    # (tests/test_lowp_int4_kernels.py): ~1e-2 from the float32 products then
    tol = 4e-2 if dtype == "int4" and lowp_path != "portable" else 1e-5
    kv = q.kv_cache(2, 32)
    first = q.forward_cached(idx[:, :12], 0, kv)
    assert rel_l2(first, got[:, 11]) < tol
    step = q.forward_cached(idx[:, 12:13], 12, kv)
    assert rel_l2(step, got[:, 12]) < tol


def test_inference_only_and_round_trips(tmp_path):
    m = make("qwen2-untied-gqa4")
    q = m.to_dtype("int8")
    idx = np.array([[1, 2, 3, 4]])
    q.forward(idx, idx)
    with pytest.raises(RuntimeError, match="int8, for inference only"):
        q.backward()
    with pytest.raises(RuntimeError, match="int8"):
        q.grads
    # widened back to float32: the stored weights exactly
    back = q.to_dtype("float32")
    assert back.dtype == "float32"
    for k, v in q.params.items():
        assert np.array_equal(back.params[k], widen(v)), k
    # saved (widened), loaded in another storage by the generic entry
    q.save_safetensors(tmp_path / "m")
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "m", dtype="bfloat16")
    assert again.dtype == "bfloat16"
    assert rel_l2(again.forward(idx)[0], back.to_dtype("bfloat16").forward(idx)[0]) < 1e-6
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "m", dtype="int8")
    assert np.array_equal(loaded.forward(idx)[0], q.forward(idx)[0])
    # greedy generation runs on the stored weights
    out = loaded.generate(idx, 5, temperature=0.0)
    assert out.shape == (1, 9)


def test_a_new_low_precision_model_has_zero_weights():
    cfg = LlamaConfig(**CONFIGS["qwen2-untied-gqa4"])
    m = LlamaForCausalLM(cfg, "int4")
    assert m.dtype == "int4"
    logits = m.forward(np.array([[1, 2, 3]]))[0]
    assert logits.shape == (1, 3, cfg.vocab_size) and not logits.any()
    with pytest.raises(ValueError, match="dtype must be one of"):
        LlamaForCausalLM(cfg, "float16")


def test_sizes_the_blocks_do_not_divide():
    m = LlamaForCausalLM.from_config(LlamaConfig(vocab_size=50, hidden_size=48,
                                                 intermediate_size=64, num_hidden_layers=1,
                                                 num_attention_heads=2), seed=0)
    assert m.to_dtype("bfloat16").forward(np.array([[1, 2]]))[0].shape == (1, 2, 50)
    with pytest.raises(ValueError, match="model.embed_tokens.weight.*multiple of 32"):
        m.to_dtype("int8")
