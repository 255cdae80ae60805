"""GPT-NeoX models with their matmul weights (query_key_value, dense, the two MLP products, the
embedding, an untied embed_out) stored in bfloat16, int8 or int4 blocks, against the float32
model with the same weights: logits within the bounds GPT-2's low-precision models meet, and
equal to a float32 model run on the stored weights widened by NumPy (the kernels add nothing
beyond the weights' own rounding), on every kernel variant of this CPU; the KV-cache path."""

from __future__ import annotations

import numpy as np
import pytest
import ref

from gpt2s import AutoModelForCausalLM, GPTNeoXConfig, GPTNeoXForCausalLM, _core
from gpt2s import weight_types as wt
from gpt2s.weight_types import PackedWeight

LOWP = ["bfloat16", "int8", "int4"]
BOUND = {"bfloat16": 1e-2, "int8": 3e-2, "int4": 0.35}     # as tests/test_lowp_model.py
VARIANTS = sorted(set(_core.kernel_variants("bfloat16")) & set(_core.kernel_variants("int8")))

CONFIGS = {
    "parallel-untied": dict(vocab_size=301, hidden_size=128, intermediate_size=512,
                            num_hidden_layers=2, num_attention_heads=4),
    "sequential-tied-nobias": dict(vocab_size=97, hidden_size=64, intermediate_size=96,
                                   num_hidden_layers=2, num_attention_heads=2,
                                   rotary_pct=1.0, use_parallel_residual=False,
                                   tie_word_embeddings=True, attention_bias=False),
}


def rel_l2(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def widen(w) -> np.ndarray:
    if not isinstance(w, PackedWeight):
        return np.asarray(w, np.float32)
    assert not w.transposed
    return ref.widen_stored(w.type_name, w.data, w.scales)


def make(name, seed=0):
    m = GPTNeoXForCausalLM.from_config(GPTNeoXConfig(**CONFIGS[name]), seed=seed)
    rng = np.random.default_rng(seed + 1)
    for p in m.params.values():
        p[...] = (p + rng.normal(0, 0.01, p.shape)).astype(np.float32)
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
    assert type(q) is GPTNeoXForCausalLM and q.dtype == dtype and dtype in repr(q)
    got, loss = q.forward(idx, tgt)
    err = rel_l2(got, want)
    assert err <= BOUND[dtype], f"{dtype}: logits rel L2 {err:.2e}"
    assert abs(loss - want_loss) <= BOUND[dtype] * abs(want_loss)
    for k, v in q.params.items():
        assert isinstance(v, PackedWeight) == wt.is_compressed(k), k
        if not wt.is_compressed(k):
            assert np.array_equal(v, m.params[k]), k
    assert sum(isinstance(v, PackedWeight) for v in q.params.values()) == \
        4 * m.config.n_layer + 1 + (not m.config.tie_word_embeddings)
    f = GPTNeoXForCausalLM(m.config)
    for k, v in q.params.items():
        f.params[k][...] = widen(v)
    exact = f.forward(idx)[0]
    assert rel_l2(got, exact) < 1e-5   # 38 rows: widened panels, float32 products
    # the decoding path: at most 32 rows go to the direct kernels, whose 4-bit ones round the
    # activations to int8 per block (tests/test_lowp_int4_kernels.py): ~1e-2 from float32's
    tol = 4e-2 if dtype == "int4" and lowp_path != "portable" else 1e-5
    kv = q.kv_cache(2, 32)
    first = q.forward_cached(idx[:, :12], 0, kv)
    assert rel_l2(first, got[:, 11]) < tol
    step = q.forward_cached(idx[:, 12:13], 12, kv)
    assert rel_l2(step, got[:, 12]) < tol


def test_inference_only_and_round_trips(tmp_path):
    m = make("parallel-untied")
    q = m.to_dtype("int8")
    idx = np.array([[1, 2, 3, 4]])
    q.forward(idx, idx)
    with pytest.raises(RuntimeError, match="int8, for inference only"):
        q.backward()
    back = q.to_dtype("float32")
    assert type(back) is GPTNeoXForCausalLM and back.dtype == "float32"
    for k, v in q.params.items():
        assert np.array_equal(back.params[k], widen(v)), k
    q.save_safetensors(tmp_path / "m")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "m", dtype="int8")
    assert np.array_equal(loaded.forward(idx)[0], q.forward(idx)[0])
    assert loaded.generate(idx, 5, temperature=0.0).shape == (1, 9)


def test_loading_in_low_precision_is_to_dtype(tmp_path):
    """dtype= at load compresses each weight as it is read (the float32 model is never held
    whole): the same stored weights as a float32 load converted by to_dtype."""
    m = make("parallel-untied", seed=4)
    m.save_safetensors(tmp_path / "m")
    idx = np.array([[5, 6, 7, 8, 9]])
    f = GPTNeoXForCausalLM.from_pretrained(tmp_path / "m")
    for dtype in LOWP:
        a = GPTNeoXForCausalLM.from_pretrained(tmp_path / "m", dtype=dtype)
        b = f.to_dtype(dtype)
        assert a.dtype == dtype
        for k in a.params:
            assert np.array_equal(np.asarray(a.params[k]), np.asarray(b.params[k])), k
        assert np.array_equal(a.forward(idx)[0], b.forward(idx)[0])
