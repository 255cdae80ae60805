"""LlamaForCausalLM's inference blocks in one call (`_core.LlamaPlan`) and its loader of
compressed storages: both must give exactly what the per-kernel path and `to_dtype` give
(those are checked against transformers and the NumPy reference in test_llama_model.py and
test_llama_lowp.py)."""

import tracemalloc

import numpy as np
import pytest

from gpt2s import _core
from gpt2s.llama import LlamaForCausalLM
from gpt2s.llama_config import LlamaConfig

CASES = {
    "gqa4-tied": dict(num_key_value_heads=2),
    "mha-untied-biases": dict(num_key_value_heads=8, tie_word_embeddings=False,
                              attention_bias=True, mlp_bias=True),
    "qwen2": dict(model_type="qwen2", num_key_value_heads=4),
}


def _model(case, seed=0):
    cfg = LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=96,
                      num_hidden_layers=3, num_attention_heads=8, **CASES[case])
    m = LlamaForCausalLM.from_config(cfg, seed=seed)
    rng = np.random.default_rng(seed + 1)
    for p in m.params.values():   # norms and biases away from 1 and 0
        if p.ndim == 1:
            p[...] = rng.normal(0.5, 0.3, p.shape)
    return m


def _per_kernel(m):
    """m with the plan switched off: every block through `_block`, one kernel call at a
    time."""
    m._inference_plan = lambda: None
    return m


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "int8", "int4"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_plan_matches_the_per_kernel_path_bit_for_bit(case, dtype):
    m = _model(case)
    m = m if dtype == "float32" else m.to_dtype(dtype)
    ref = _per_kernel(m.to_dtype(dtype) if dtype != "float32" else _model(case))
    assert m._inference_plan() is not None
    rng = np.random.default_rng(2)
    idx = rng.integers(0, 300, (3, 70))   # two query blocks of attention
    assert np.array_equal(m.forward(idx)[0], ref.forward(idx)[0])
    # the cache: a prompt, then single positions, on every row; and a view of some rows
    for cache_rows in (3, 5):
        kv, kv_ref = m.kv_cache(cache_rows, 80), ref.kv_cache(cache_rows, 80)
        if cache_rows > 3:
            kv, kv_ref = kv.view_rows(1, 4), kv_ref.view_rows(1, 4)
        assert np.array_equal(m.forward_cached(idx[:, :60], 0, kv),
                              ref.forward_cached(idx[:, :60], 0, kv_ref))
        for p in range(60, 64):
            assert np.array_equal(m.forward_cached(idx[:, p:p + 1], p, kv),
                                  ref.forward_cached(idx[:, p:p + 1], p, kv_ref))
        assert np.array_equal(kv.keys[:, :, :64], kv_ref.keys[:, :, :64])
        assert np.array_equal(kv.values[:, :, :64], kv_ref.values[:, :, :64])


def test_plan_follows_replaced_parameters():
    m = _model("gqa4-tied")
    idx = np.array([[1, 2, 3, 4]])
    before = m.forward(idx)[0]
    name = "model.layers.1.self_attn.o_proj.weight"
    m.store.set_param(name, np.zeros_like(m.params[name]))
    after = m.forward(idx)[0]
    assert np.array_equal(after, _per_kernel(m).forward(idx)[0])
    assert not np.array_equal(before, after)


def test_plan_refuses_bad_arguments():
    m = _model("gqa4-tied")
    plan = m._inference_plan()
    x = np.zeros((2, 64), np.float32)
    pos = np.arange(2, dtype=np.int64)
    work = np.empty(plan.work_size(2), np.float32)
    with pytest.raises(ValueError, match="LlamaPlan.forward"):
        plan.forward(x, 2, pos, m._inv_freq, work[:10])
    with pytest.raises(ValueError, match="negative"):
        plan.forward(x, 1, np.array([0, -1]), m._inv_freq, work)
    kv = m.kv_cache(1, 4)
    with pytest.raises(ValueError, match="pos0 \\+ T <= capacity"):
        plan.forward(x, 1, pos, m._inv_freq, work, kv.keys, kv.values, 3)
    with pytest.raises(ValueError, match="layer 0"):
        _core.LlamaPlan([(np.ones(3, np.float32),) + (None,) * 9], 64, 8, 2, 8, 96, 1e-5,
                        0.35, "silu")


@pytest.mark.parametrize("dtype", ["bfloat16", "int8", "int4"])
@pytest.mark.parametrize("case", ["mha-untied-biases", "qwen2"])
def test_loading_a_storage_is_to_dtype_exactly(tmp_path, case, dtype):
    """Loading with dtype= fills the compressed store tensor by tensor (no float32 model in
    between): the weights, the joined q|k|v and gate|up biases and the logits are exactly
    to_dtype's."""
    m = _model(case, seed=4)
    m.save_safetensors(tmp_path / "m")
    want = m.to_dtype(dtype)
    got = LlamaForCausalLM.from_pretrained(tmp_path / "m", dtype=dtype)
    for name, w in want.params.items():
        assert np.array_equal(np.asarray(got.params[name]), np.asarray(w)), name
    idx = np.random.default_rng(5).integers(0, 300, (2, 9))
    assert np.array_equal(got.forward(idx)[0], want.forward(idx)[0])


def test_inference_leaves_the_gradients_unallocated():
    """An inference forward and a generation allocate far less than the gradients' buffer
    (they once allocated the gradients: a float32 model's peak RSS doubled)."""
    m = _model("gqa4-tied")
    tracemalloc.start()
    try:
        m.forward(np.array([[1, 2, 3]]))
        m.generate(np.array([[1, 2]]), 2, temperature=0.0)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < m.store.buffer.nbytes / 2
