"""save_safetensors(dtype=...) writes float16 / bfloat16 exactly as torch rounds them, and
transformers loads the result."""

import numpy as np
import pytest

import gpt2s

torch = pytest.importorskip("torch")


@pytest.fixture
def model():
    m = gpt2s.GPT2.from_config(gpt2s.GPT2Config.preset("tiny", vocab_size=300, n_ctx=32), seed=0)
    rng = np.random.default_rng(1)
    for v in m.params.values():
        v[...] = rng.standard_normal(v.shape) * 3.0
    return m


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
def test_roundtrip_matches_torch_rounding(model, dtype, tmp_path):
    model.save_safetensors(tmp_path, dtype=dtype)
    loaded = gpt2s.GPT2.from_safetensors(tmp_path)
    for name, value in model.params.items():
        expected = torch.from_numpy(value.copy()).to(getattr(torch, dtype)).float().numpy()
        np.testing.assert_array_equal(loaded.params[name], expected, err_msg=name)


def test_half_file_loads_in_transformers(model, tmp_path):
    transformers = pytest.importorskip("transformers")
    model.save_safetensors(tmp_path, dtype="bfloat16")
    hf = transformers.GPT2LMHeadModel.from_pretrained(tmp_path, torch_dtype=torch.float32).eval()
    ours = gpt2s.GPT2.from_safetensors(tmp_path)
    idx = np.arange(20).reshape(2, 10) % 300
    with torch.no_grad():
        ref = hf(torch.from_numpy(idx)).logits.numpy()
    got, _ = ours.forward(idx)
    assert np.linalg.norm(got - ref) / np.linalg.norm(ref) < 1e-5


def test_bad_dtype(model, tmp_path):
    with pytest.raises(ValueError, match="float64"):
        model.save_safetensors(tmp_path, dtype="float64")
