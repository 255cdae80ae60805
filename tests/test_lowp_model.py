"""Low-precision inference models (issue 11): GPT2 with its matmul weights stored in bfloat16 or
int8 blocks (``dtype=``), against the float32 model with the same weights.

Error bounds of the issue: logits relative L2 error <= 1e-2 (bfloat16) and <= 3e-2 (int8)
against float32.  Independent check of the storage: the bfloat16 model's logits equal a float32
model run on the bfloat16-rounded weights (rounded here, by NumPy) to float32 accuracy, and the
int8 model's equal a float32 model on the dequantized weights; so the low-precision kernels add
no error beyond the weights' own rounding.
"""

from __future__ import annotations

import numpy as np
import pytest

import gpt2s
import ref
from gpt2s import GPT2, GPT2Config, _core
from gpt2s.weight_types import PackedWeight, is_compressed

LOWP = ["bfloat16", "int8", "int4"]
# logits error against float32 on random weights (real checkpoints lose far less: the demo
# model's held-out loss, tests/test_examples.py and docs/lowprec.md)
BOUND = {"bfloat16": 1e-2, "int8": 3e-2, "int4": 0.35}


def rel_l2(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@pytest.fixture(scope="module")
def model(make_config, make_model):
    """random, non-trivial weights; C = 128 (int8 blocks need C % 32 == 0), V not a multiple
    of any tile, n_ctx for a 40-token prompt plus decoding"""
    cfg = make_config(n_layer=3, n_head=4, head_size=32, vocab_size=1031, n_ctx=96)
    return make_model(cfg, seed=3)


VARIANTS = sorted(set(_core.kernel_variants("bfloat16")) & set(_core.kernel_variants("int8")))


@pytest.fixture(params=VARIANTS)
def lowp_path(request):
    prev = [_core.set_kernel_variant(t, request.param) for t in LOWP]
    yield request.param
    for t, p in zip(LOWP, prev):
        _core.set_kernel_variant(t, p)


def widened_float32_model(m: GPT2) -> GPT2:
    """A float32 model holding exactly the weights m stores (NumPy widening)."""
    f = GPT2(m.config)
    for name, w in m.params.items():
        if isinstance(w, PackedWeight):
            deq = ref.widen_stored(w.type_name, w.data, w.scales)
            f.params[name][...] = deq.T if w.transposed else deq
        else:
            f.params[name][...] = w
    return f


@pytest.mark.parametrize("dtype", LOWP)
def test_logits_error_against_float32(model, make_batch, lowp_path, dtype, record_error):
    idx, tgt = make_batch(model.config, 2, 40, seed=4)
    want, want_loss = model.forward(idx, tgt, for_backward=False)
    m = model.to_dtype(dtype)
    assert m.dtype == dtype
    got, loss = m.forward(idx, tgt)          # with targets: evaluation, nothing kept
    err = rel_l2(got, want)
    record_error(f"lowp logits {dtype} vs float32", err)
    assert err <= BOUND[dtype], f"{dtype}: logits rel L2 {err:.2e} > {BOUND[dtype]}"
    assert abs(loss - want_loss) <= BOUND[dtype] * abs(want_loss)
    # the kernels add only float32 rounding to the stored weights' own error
    exact = widened_float32_model(m).forward(idx)[0]
    assert rel_l2(got, exact) < 1e-5
    got_no_targets, none = m.forward(idx)
    assert none is None
    np.testing.assert_array_equal(got_no_targets, got)


@pytest.mark.parametrize("dtype", LOWP)
def test_gpt2_initialised_weights(dtype):
    """GPT-2's own initialisation (from_config(..., dtype=)) through the 124M-like widths."""
    cfg = GPT2Config(n_layer=2, n_head=4, n_embd=256, vocab_size=2000, n_ctx=64)
    f = GPT2.from_config(cfg, seed=1)
    m = GPT2.from_config(cfg, seed=1, dtype=dtype)
    idx = np.random.default_rng(0).integers(0, cfg.vocab_size, (2, 24))
    assert rel_l2(m.forward(idx)[0], f.forward(idx)[0]) <= BOUND[dtype]


@pytest.mark.parametrize("dtype", LOWP)
def test_paths_and_rows_agree(model, make_batch, dtype):
    """Every variant's direct kernels and panels and the portable route: the same logits to
    float32 rounding, for a 40-row prefill (panels) and a few-row decode step (direct)."""
    m = model.to_dtype(dtype)
    idx, _ = make_batch(model.config, 1, 40, seed=5)
    out = {}
    prev_path, prev_rows = _core.get_kernel_variant(dtype), _core.set_direct_max_rows(32)
    try:
        for path in _core.kernel_variants(dtype):
            for rows in ([32] if path == "portable" else [32, 0, 1 << 20]):
                _core.set_kernel_variant(dtype, path)
                _core.set_direct_max_rows(rows)
                out[path, rows] = m.forward(idx)[0]
    finally:
        _core.set_kernel_variant(dtype, prev_path)
        _core.set_direct_max_rows(prev_rows)
    base = out["portable", 32]
    for k, v in out.items():
        # int4's direct kernels round the activations to int8 per block (llama.cpp's Q8_0
        # activations; tests/test_lowp_int4_kernels.py checks them against that definition):
        # through 2 layers and the head that moves the logits ~1.4e-2 from the float route
        bound = 4e-2 if dtype == "int4" and k[0] != "portable" and k[1] == 1 << 20 else 1e-5
        assert rel_l2(v, base) < bound, k


@pytest.mark.parametrize("dtype", ["float32", *LOWP])
def test_generate_same_tokens_on_any_thread_count(model, make_batch, restore_threads, dtype):
    m = model.to_dtype(dtype) if dtype != "float32" else model
    prompt, _ = make_batch(model.config, 3, 6, seed=6)
    got = {}
    for nt in (1, 2, 3):
        gpt2s.set_num_threads(nt)
        greedy = np.asarray(m.generate(prompt, 12, temperature=0.0))
        sampled = np.asarray(m.generate(prompt[:1], 12, temperature=0.9, top_k=50, seed=7))
        got[nt] = (greedy, sampled)
    for nt in (2, 3):
        np.testing.assert_array_equal(got[nt][0], got[1][0])
        np.testing.assert_array_equal(got[nt][1], got[1][1])


@pytest.mark.parametrize("dtype", LOWP)
def test_load_with_dtype_equals_conversion(model, tmp_path, make_batch, dtype):
    model.save_safetensors(tmp_path / "f32")
    loaded = GPT2.from_safetensors(tmp_path / "f32", dtype=dtype)
    converted = model.to_dtype(dtype)
    for name, w in converted.params.items():
        if is_compressed(name):
            assert isinstance(loaded.params[name], type(w))
        np.testing.assert_array_equal(np.asarray(loaded.params[name]), np.asarray(w))
    idx, _ = make_batch(model.config, 2, 9, seed=8)
    np.testing.assert_array_equal(loaded.forward(idx)[0], converted.forward(idx)[0])


def test_bfloat16_file_loads_exactly_and_saves_back(model, tmp_path):
    """A BF16 file into a bfloat16 model: the stored bits are the file's; saved again as
    bfloat16 the matmul weights come back bit for bit (the float32 ones were already bf16)."""
    model.save_safetensors(tmp_path / "b16", dtype="bfloat16")
    m = GPT2.from_safetensors(tmp_path / "b16", dtype="bfloat16")
    f = GPT2.from_safetensors(tmp_path / "b16")          # float32: exact widening of the file
    for name, w in m.params.items():
        np.testing.assert_array_equal(np.asarray(w), f.params[name])
        if is_compressed(name):
            want = (f.params[name].view(np.uint32) >> 16).astype(np.uint16)
            np.testing.assert_array_equal(w.data, want)
    m.save_safetensors(tmp_path / "again", dtype="bfloat16")
    assert ((tmp_path / "again" / "model.safetensors").read_bytes()
            == (tmp_path / "b16" / "model.safetensors").read_bytes())


@pytest.mark.parametrize("dtype", LOWP)
def test_saved_float32_of_a_low_precision_model(model, tmp_path, make_batch, dtype):
    m = model.to_dtype(dtype)
    m.save_safetensors(tmp_path / "out", dtype="float32")
    back = GPT2.from_safetensors(tmp_path / "out")
    assert back.dtype == "float32"
    idx, _ = make_batch(model.config, 1, 7, seed=9)
    # 7 rows: int4's direct kernels, activations rounded to int8 per block (~1e-2)
    tol = 4e-2 if dtype == "int4" and _core.get_kernel_variant("int4") != "portable" else 1e-5
    assert rel_l2(back.forward(idx)[0], m.forward(idx)[0]) < tol
    np.testing.assert_array_equal(back.forward(idx)[0], m.to_dtype("float32").forward(idx)[0])


@pytest.mark.parametrize("dtype", LOWP)
def test_training_calls_raise(model, make_batch, dtype):
    m = model.to_dtype(dtype)
    idx, tgt = make_batch(model.config, 1, 5, seed=10)
    m.forward(idx, tgt)
    for call in (m.backward, m.zero_grad, lambda: m.grads):
        with pytest.raises(RuntimeError, match=f"{dtype}, for inference only"):
            call()


def test_bad_dtype_and_widths(model, tmp_path):
    with pytest.raises(ValueError, match="dtype must be one of"):
        model.to_dtype("float16")
    with pytest.raises(ValueError, match="dtype must be one of"):
        GPT2.from_safetensors(tmp_path / "nothing", dtype="int3")
    cfg = GPT2Config(n_layer=1, n_head=2, n_embd=48, vocab_size=64, n_ctx=16)
    with pytest.raises(ValueError, match="multiple of 32"):
        GPT2.from_config(cfg, dtype="int8")
    GPT2.from_config(cfg, dtype="bfloat16")   # any width for bfloat16


def test_repr_and_show_config(model, capsys):
    for dtype in LOWP:
        r = repr(model.to_dtype(dtype))
        assert f"dtype='{dtype}'" in r and "kernels=" in r
    assert "dtype='float32'" in repr(model)
    info = gpt2s.show_config()
    assert info["kernels"] == {t: _core.get_kernel_variant(t) for t in _core.weight_types()}
    out = capsys.readouterr().out
    assert "bfloat16:" in out and "int8:" in out


def test_compressed_storage_sizes(model):
    """bfloat16 halves the matmul weights, int8 blocks take 34 bytes per 32."""
    sizes = {}
    for dtype in LOWP:
        m = model.to_dtype(dtype)
        sizes[dtype] = sum(w.nbytes for n, w in m.params.items() if is_compressed(n))
        assert m.num_parameters() == model.num_parameters()
    n = sum(model.params[k].size for k in model.params if is_compressed(k))
    assert sizes["bfloat16"] == 2 * n
    assert sizes["int8"] == n + n // 32 * 2


@pytest.mark.parametrize("dtype", LOWP)
def test_untied_head_is_compressed_too(dtype, tmp_path):
    """An untied lm_head.weight (issue 15's variants) is a (V, C) matmul weight like wte."""
    cfg = GPT2Config(n_layer=1, n_head=2, n_embd=64, vocab_size=300, n_ctx=32,
                     tie_word_embeddings=False)
    f = GPT2.from_config(cfg, seed=2)
    f.params["lm_head.weight"][...] = np.random.default_rng(3).standard_normal(
        f.params["lm_head.weight"].shape).astype(np.float32) * 0.1
    idx = np.random.default_rng(4).integers(0, 300, (2, 12))
    m = f.to_dtype(dtype)
    assert isinstance(m.params["lm_head.weight"], PackedWeight)
    assert m.params["lm_head.weight"].type_name == dtype
    assert rel_l2(m.forward(idx)[0], f.forward(idx)[0]) <= BOUND[dtype]
    f.save_safetensors(tmp_path / "untied")
    loaded = GPT2.from_safetensors(tmp_path / "untied", dtype=dtype)
    np.testing.assert_array_equal(loaded.forward(idx)[0], m.forward(idx)[0])


HELD_OUT = __import__("pathlib").Path(__file__).parent / "data" / "tinyshakespeare_heldout.txt"


def test_demo_model_held_out_loss(record_error):
    """The issue's quality target on a trained model: the bundled demo model's loss on text it
    never saw (the last 32000 characters of Tiny Shakespeare, inside the 10% held out when it
    was trained, tools/train_demo.sh) within 0.5% (bfloat16) and 1% (int8) of float32's."""
    ids = np.asarray(gpt2s.get_tokenizer().encode(HELD_OUT.read_text("utf-8")))
    T = 256
    n = (len(ids) - 1) // T
    assert n >= 30
    x, y = ids[:n * T].reshape(n, T), ids[1:n * T + 1].reshape(n, T)
    x, y = x[::4], y[::4]    # 10 windows spread over the text: 2560 predictions
    loss = {dtype: GPT2.from_pretrained("demo", dtype=dtype).forward(
        x, targets=y, return_logits=False, for_backward=False)[1]
        for dtype in ("float32", "bfloat16", "int8")}
    assert 4.0 < loss["float32"] < 7.0, loss      # a trained model (untrained: ~10.8)
    for dtype, bound in (("bfloat16", 5e-3), ("int8", 1e-2)):
        rel = abs(loss[dtype] - loss["float32"]) / loss["float32"]
        record_error(f"demo held-out loss {dtype} vs float32", rel)
        assert rel < bound, (dtype, loss)
