"""save_safetensors(dtype=...) writes float16 / bfloat16 exactly as torch rounds them, and
transformers loads the result.

The rounding is checked twice: against torch (skipped without it) and against NumPy, whose
float16 is IEEE round-to-nearest-even and whose missing bfloat16 is done here on the float32
bits, so that a machine without torch still tests every saved dtype."""

import numpy as np
import pytest

import gpt2s


@pytest.fixture
def model():
    m = gpt2s.GPT2.from_config(gpt2s.GPT2Config.preset("tiny", vocab_size=300, n_ctx=32), seed=0)
    rng = np.random.default_rng(1)
    for v in m.params.values():
        v[...] = rng.standard_normal(v.shape) * 3.0
    # values that round differently under truncation, ties-away and ties-to-even
    m.params["ln_f.bias"][:6] = np.array([1.0 + 2 ** -8, 1.0 + 3 * 2 ** -8, 1.0 + 2 ** -11,
                                          1.0 + 3 * 2 ** -11, 1.0 + 2 ** -9, 1e-40], np.float32)
    return m


def bf16_round(x):
    """float32 -> the nearest bfloat16 (ties to even), widened back to float32; no NaNs."""
    u = np.asarray(x, np.float32).view(np.uint32).astype(np.uint64)
    u = (u + 0x7FFF + ((u >> 16) & 1)) >> 16 << 16
    return u.astype(np.uint32).view(np.float32)


def test_bf16_round_reference():
    """The test's own bfloat16 rounding on hand-worked cases."""
    x = np.array([1.0, 1.0 + 2 ** -8, 1.0 + 3 * 2 ** -8, 1.0 + 2 ** -9, -2.5, 3.4e38, 0.0],
                 np.float32)
    want = np.array([1.0, 1.0, 1.0 + 2 ** -6, 1.0, -2.5, np.inf, 0.0], np.float32)
    np.testing.assert_array_equal(bf16_round(x), want)


def _rounded_by(reference, value, dtype):
    if dtype == "float32":
        return value
    if reference == "numpy":
        return value.astype(np.float16).astype(np.float32) if dtype == "float16" \
            else bf16_round(value)
    torch = pytest.importorskip("torch")
    return torch.from_numpy(value.copy()).to(getattr(torch, dtype)).float().numpy()


@pytest.mark.parametrize("reference", ["numpy", "torch"])
@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
def test_roundtrip_matches_rounding(model, dtype, reference, tmp_path):
    model.save_safetensors(tmp_path, dtype=dtype)
    loaded = gpt2s.GPT2.from_safetensors(tmp_path)
    for name, value in model.params.items():
        expected = _rounded_by(reference, value, dtype)
        np.testing.assert_array_equal(loaded.params[name], expected, err_msg=name)


def test_half_file_loads_in_transformers(model, tmp_path):
    torch = pytest.importorskip("torch")
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
