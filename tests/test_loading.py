"""Loading and saving safetensors checkpoints: Hugging Face layouts (with and without the
"transformer." prefix, the original openai-community/gpt2 file with its mask buffers), F32, F16
and BF16, config inference for the four GPT-2 sizes, every malformed input, and saving files
that transformers loads.

Every checkpoint is built here from random weights; nothing is downloaded.  Only the tests
that need transformers (its save_pretrained files, its model as the judge) or torch (its
bfloat16 rounding) skip without them, each on its own; every malformed-file, truncation,
interrupted-save and layout test runs with safetensors and NumPy alone, judged by tests/ref.py.
"""

from __future__ import annotations

import json
import math
import os
import struct
from pathlib import Path

import numpy as np
import pytest
import safetensors.numpy as st_numpy   # a runtime dependency of gpt2s

import ref
from conftest import hf_logits_loss, param_shapes
import gpt2s
from gpt2s import GPT2, GPT2Config, SafetensorsError
from gpt2s import weights as gw

TOL = 1e-5


# ------------------------------------------------------------------------------------------
# helpers


def read_header(path) -> dict:
    """The JSON header of a safetensors file, read by hand."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        return json.loads(f.read(n))


def write_config_json(directory, cfg: GPT2Config):
    """The keys of transformers' GPT2Config.to_json_file that describe the model, written by
    hand (test_load_save_pretrained reads transformers' own file)."""
    config = {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2",
              "activation_function": "gelu_new", "n_layer": cfg.n_layer, "n_head": cfg.n_head,
              "n_embd": cfg.n_embd, "vocab_size": cfg.vocab_size, "n_positions": cfg.n_ctx,
              "n_ctx": cfg.n_ctx, "layer_norm_epsilon": cfg.layer_norm_epsilon,
              "tie_word_embeddings": True, "torch_dtype": "float32"}
    (Path(directory) / "config.json").write_text(json.dumps(config, indent=2))


def write_raw_safetensors(path, tensors: dict):
    """A safetensors file written byte by byte: name -> (dtype tag, shape, raw bytes), for
    dtypes NumPy cannot hold (BF16)."""
    header, offset = {}, 0
    for name, (tag, shape, raw) in tensors.items():
        header[name] = {"dtype": tag, "shape": list(shape),
                        "data_offsets": [offset, offset + len(raw)]}
        offset += len(raw)
    hraw = json.dumps(header).encode()
    hraw += b" " * (-len(hraw) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(hraw)) + hraw)
        for _, _, raw in tensors.values():
            f.write(raw)


def save_hf_dir(tmp_path, cfg, params, make_hf_model, dtype="float32", name="hf"):
    """transformers' own save_pretrained of a GPT2LMHeadModel holding params, in dtype."""
    model = make_hf_model(cfg, params, dtype=dtype)
    d = tmp_path / name
    model.save_pretrained(str(d))
    assert (d / "model.safetensors").is_file() and (d / "config.json").is_file()
    return d


def compare_with_ref(m: GPT2, cfg, params64, make_batch, record_error, label, B=2, T=None):
    """Our logits and loss against tests/ref.py (float64) on params64."""
    T = T or min(cfg.n_ctx, 40)
    idx, targets = make_batch(cfg, B, T, seed=17, ignore_frac=0.25)
    want_logits, want_loss, _ = ref.forward(params64, idx, targets, n_head=cfg.n_head,
                                            eps=cfg.layer_norm_epsilon)
    logits, loss = m.forward(idx, targets)
    e_logits = record_error("loaded model logits vs ref.py", ref.rel_err(logits, want_logits),
                            label)
    assert e_logits < TOL, f"{label}: logits relative error {e_logits:.3e}"
    assert abs(loss - want_loss) < TOL * want_loss, f"{label}: loss {loss} vs {want_loss}"


def compare_with_hf(m: GPT2, cfg, params64, make_hf_model, make_batch, record_error, label,
                    B=2, T=None):
    """Our logits and loss against transformers run in float64 on params64."""
    T = T or min(cfg.n_ctx, 40)
    idx, targets = make_batch(cfg, B, T, seed=17, ignore_frac=0.25)
    hf = make_hf_model(cfg, params64, dtype="float64")
    hf_logits, hf_loss = hf_logits_loss(hf, idx, targets)
    logits, loss = m.forward(idx, targets)
    e_logits = record_error("loaded model logits vs transformers f64", ref.rel_err(logits, hf_logits),
                            label)
    e_loss = record_error("loaded model loss vs transformers f64", abs(loss - hf_loss) / hf_loss,
                          label)
    assert e_logits < TOL, f"{label}: logits relative error {e_logits:.3e}"
    assert e_loss < TOL, f"{label}: loss {loss} vs {hf_loss}"


def assert_params_equal(m: GPT2, params: dict):
    assert set(m.params) == set(params)
    for name, value in params.items():
        np.testing.assert_array_equal(m.params[name], np.asarray(value, np.float32),
                                      err_msg=name)


def openai_layout(params: dict, n_ctx: int, prefix: str = "", buffers: bool = True) -> dict:
    """Tensors as in the original openai-community/gpt2 model.safetensors: no
    "transformer." prefix, and per block the causal-mask buffer h.N.attn.bias
    (1, 1, n_ctx, n_ctx) lower-triangular and the scalar h.N.attn.masked_bias."""
    out = {prefix + k: np.ascontiguousarray(v, np.float32) for k, v in params.items()}
    if buffers:
        n_layer = ref.n_layers(params)
        tril = np.tril(np.ones((n_ctx, n_ctx), np.float32))[None, None]
        for l in range(n_layer):
            out[f"{prefix}h.{l}.attn.bias"] = tril
            out[f"{prefix}h.{l}.attn.masked_bias"] = np.array(-1e4, np.float32)
    return out


# ------------------------------------------------------------------------------------------
# transformers' own files


@pytest.mark.parametrize("L,NH,HS,V,n_ctx,eps", [
    pytest.param(2, 2, 16, 150, 48, 1e-5, id="C32"),
    pytest.param(3, 4, 12, 201, 64, 1e-3, id="C48-eps1e-3"),
    pytest.param(1, 3, 32, 97, 40, 1e-5, id="C96-H3"),
])
def test_load_save_pretrained(tmp_path, L, NH, HS, V, n_ctx, eps, make_config, make_params,
                              make_batch, make_hf_model, record_error, request):
    """transformers.GPT2LMHeadModel with every parameter random -> save_pretrained -> gpt2s,
    from the directory and from the model.safetensors inside it (config.json beside it counts:
    n_head and layer_norm_epsilon here cannot be inferred from shapes)."""
    cfg = make_config(n_layer=L, n_head=NH, head_size=HS, vocab_size=V, n_ctx=n_ctx, eps=eps)
    params = make_params(cfg, seed=L + NH)
    d = save_hf_dir(tmp_path, cfg, params, make_hf_model)
    assert all(k.startswith("transformer.") for k in read_header(d / "model.safetensors")
               if k != "__metadata__")
    for source in (d, d / "model.safetensors", str(d)):
        m = GPT2.from_safetensors(source)
        assert m.config == cfg, source
        assert_params_equal(m, params)
    compare_with_hf(m, cfg, params, make_hf_model, make_batch, record_error,
                    request.node.callspec.id)


@pytest.mark.parametrize("C,layout", [
    pytest.param(64, "openai", id="C64-openai"),
    pytest.param(128, "openai", id="C128-openai"),
    pytest.param(128, "hf-prefix", id="C128-prefix-no-config"),
    pytest.param(64, "prefix+buffers", id="C64-prefix+buffers"),
])
def test_load_original_layout_without_config(tmp_path, C, layout, make_params, make_batch,
                                             record_error):
    """No config.json: n_layer, n_embd, vocab and n_ctx come from the shapes, n_head = n_embd/64
    as in all four released sizes.  The openai layout has no prefix and carries the mask
    buffers h.N.attn.bias / h.N.attn.masked_bias, which are ignored."""
    cfg = GPT2Config(n_layer=2, n_head=C // 64, n_embd=C, vocab_size=131, n_ctx=36)
    params = make_params(cfg, seed=C)
    prefix = "" if layout == "openai" else "transformer."
    tensors = openai_layout(params, cfg.n_ctx, prefix=prefix, buffers=layout != "hf-prefix")
    # both as a model directory and as a loose file
    d = tmp_path / "gpt2"
    d.mkdir()
    st_numpy.save_file(tensors, str(d / "model.safetensors"))
    loose = tmp_path / "gpt2-loose.safetensors"
    st_numpy.save_file(tensors, str(loose))
    for source in (d, loose):
        m = GPT2.from_safetensors(source)
        assert m.config == cfg, (source, m.config)
        assert_params_equal(m, params)
    compare_with_ref(m, cfg, params, make_batch, record_error, layout)


def test_config_json_beside_loose_file_is_not_used(tmp_path, make_config, make_params):
    """A config.json counts for model.safetensors in the same directory; another file name is a
    loose file whose config is inferred from shapes (here: n_head = 64/64 = 1, not 4)."""
    cfg = make_config(n_layer=1, n_head=4, head_size=16, vocab_size=60, n_ctx=20)
    d = tmp_path / "hf"
    d.mkdir()
    st_numpy.save_file({"transformer." + k: v for k, v in make_params(cfg, seed=3).items()},
                       str(d / "model.safetensors"))
    write_config_json(d, cfg)
    assert GPT2.from_safetensors(d / "model.safetensors").config.n_head == 4
    os.replace(d / "model.safetensors", d / "other.safetensors")
    assert GPT2.from_safetensors(d / "other.safetensors").config.n_head == 1


def test_load_fp16(tmp_path, make_config, make_params, make_batch, record_error):
    """An F16 checkpoint (written by safetensors from NumPy float16): the values are the fp16
    numbers exactly, and the model matches tests/ref.py in float64 on them."""
    cfg = make_config(n_layer=2, n_head=2, head_size=16, vocab_size=120, n_ctx=40)
    params = make_params(cfg, seed=21)
    st_numpy.save_file({"transformer." + k: v.astype(np.float16) for k, v in params.items()},
                       str(tmp_path / "model.safetensors"))
    write_config_json(tmp_path, cfg)
    assert {v["dtype"] for k, v in read_header(tmp_path / "model.safetensors").items()
            if k != "__metadata__"} == {"F16"}
    rounded = {k: v.astype(np.float16).astype(np.float64) for k, v in params.items()}
    m = GPT2.from_safetensors(tmp_path)
    assert_params_equal(m, rounded)
    compare_with_ref(m, cfg, rounded, make_batch, record_error, "fp16")


def test_load_fp16_saved_by_transformers(tmp_path, make_config, make_params, make_batch,
                                         make_hf_model, record_error):
    """transformers' save_pretrained of a .half() model: the fp16 numbers exactly, and the
    model matches transformers run in float64 on them."""
    cfg = make_config(n_layer=2, n_head=2, head_size=16, vocab_size=120, n_ctx=40)
    params = make_params(cfg, seed=21)
    d = save_hf_dir(tmp_path, cfg, params, make_hf_model, dtype="float16")
    header = read_header(d / "model.safetensors")
    assert {v["dtype"] for k, v in header.items() if k != "__metadata__"} == {"F16"}
    rounded = {k: v.astype(np.float16).astype(np.float64) for k, v in params.items()}
    m = GPT2.from_safetensors(d)
    assert_params_equal(m, rounded)
    compare_with_hf(m, cfg, rounded, make_hf_model, make_batch, record_error, "fp16")


def test_load_bf16(tmp_path, make_config, make_params, make_batch, make_hf_model, record_error):
    """A BF16 checkpoint: widened exactly to float32 (NumPy has no bfloat16; torch is the
    judge of the rounding), and the model matches transformers float64 on those values."""
    torch = pytest.importorskip("torch")
    cfg = make_config(n_layer=2, n_head=2, head_size=16, vocab_size=120, n_ctx=40)
    params = make_params(cfg, seed=22)
    d = save_hf_dir(tmp_path, cfg, params, make_hf_model, dtype="bfloat16")
    header = read_header(d / "model.safetensors")
    assert {v["dtype"] for k, v in header.items() if k != "__metadata__"} == {"BF16"}
    rounded = {k: torch.from_numpy(v).to(torch.bfloat16).to(torch.float64).numpy()
               for k, v in params.items()}
    assert any(not np.array_equal(rounded[k], params[k]) for k in params)  # really rounded
    m = GPT2.from_safetensors(d)
    assert_params_equal(m, rounded)
    compare_with_hf(m, cfg, rounded, make_hf_model, make_batch, record_error, "bf16")


def test_bf16_special_values(tmp_path):
    """Negative numbers, zeros, subnormals, the largest values survive the BF16 widening
    bit-exactly: a bfloat16 is the top half of a float32, so the widened value has exactly the
    stored 16 bits on top and zeros below (the file is written byte by byte, no torch needed).
    (Infinities are refused: tests/test_nonfinite_weights.py.)"""
    cfg = GPT2Config(n_layer=1, n_head=1, n_embd=64, vocab_size=8, n_ctx=4)
    shapes = param_shapes(1, 64, 8, 4)
    rng = np.random.default_rng(0)
    bits = {k: (rng.standard_normal(s).astype(np.float32) * 3).view(np.uint32) >> 16
            for k, s in shapes.items()}
    special = np.array([0.0, -0.0, 1e-40, -1e-40, 3.3895314e38, -3.3895314e38, 3.0e38, -2.5,
                        65504.0, 1.0 / 3.0], np.float32).view(np.uint32) >> 16
    bits["ln_f.bias"][:len(special)] = special
    tensors = {k: ("BF16", b.shape, b.astype("<u2").tobytes()) for k, b in bits.items()}
    write_raw_safetensors(tmp_path / "m.safetensors", tensors)
    m = GPT2.from_safetensors(tmp_path / "m.safetensors")
    assert m.config == cfg
    for k, b in bits.items():
        assert m.params[k].view(np.uint32).tolist() == (b << 16).tolist(), k
    assert m.params["ln_f.bias"][2] > 0


@pytest.mark.parametrize("prefix", ["", "transformer."])
def test_lm_head_equal_to_wte_loads(tmp_path, prefix, make_config, make_params):
    cfg = make_config(n_layer=1, n_head=2, head_size=16, vocab_size=70, n_ctx=16)
    params = make_params(cfg, seed=31)
    tensors = {prefix + k: v for k, v in params.items()}
    tensors["lm_head.weight"] = params["wte.weight"].copy()
    st_numpy.save_file(tensors, str(tmp_path / "model.safetensors"))
    write_config_json(tmp_path, cfg)
    m = GPT2.from_safetensors(tmp_path)
    assert_params_equal(m, params)


def test_lm_head_differing_from_wte_raises(tmp_path, make_config, make_params):
    cfg = make_config(n_layer=1, n_head=2, head_size=16, vocab_size=70, n_ctx=16)
    params = make_params(cfg, seed=32)
    tensors = {"transformer." + k: v for k, v in params.items()}
    lm = params["wte.weight"].copy()
    lm[5, 3] += 1e-3
    tensors["lm_head.weight"] = lm
    path = tmp_path / "model.safetensors"
    st_numpy.save_file(tensors, str(path))
    write_config_json(tmp_path, cfg)
    with pytest.raises(SafetensorsError) as e:
        GPT2.from_safetensors(tmp_path)
    assert "lm_head.weight" in str(e.value) and str(path) in str(e.value)


# ------------------------------------------------------------------------------------------
# config inference for the four released sizes


SIZES = [("gpt2", 12, 768, 12), ("gpt2-medium", 24, 1024, 16), ("gpt2-large", 36, 1280, 20),
         ("gpt2-xl", 48, 1600, 25)]


def release_shapes(n_layer, n_embd, prefix="", buffers=True) -> dict:
    """name -> shape of the released checkpoints (vocab 50257, context 1024)."""
    shapes = {prefix + k: v for k, v in param_shapes(n_layer, n_embd, 50257, 1024).items()}
    if buffers:
        for l in range(n_layer):
            shapes[f"{prefix}h.{l}.attn.bias"] = (1, 1, 1024, 1024)
            shapes[f"{prefix}h.{l}.attn.masked_bias"] = ()
    return shapes


@pytest.mark.parametrize("name,L,C,NH", SIZES)
def test_infer_config_four_sizes(name, L, C, NH):
    cfg = gw.infer_config(release_shapes(L, C), "somewhere")
    assert (cfg.n_layer, cfg.n_embd, cfg.n_head, cfg.vocab_size, cfg.n_ctx) == \
        (L, C, NH, 50257, 1024)
    assert cfg == GPT2Config.preset(name)
    assert cfg.head_size == 64
    assert cfg.num_parameters() == sum(math.prod(s) for k, s in release_shapes(L, C, buffers=False)
                                       .items())


def write_sparse_safetensors(path, shapes: dict, dtype="F16"):
    """A safetensors file with the given tensor shapes whose data section is a hole (reads as
    zeros, takes no disk space): exercises the header path at the real sizes."""
    itemsize = {"F16": 2, "BF16": 2, "F32": 4}[dtype]
    header, offset = {}, 0
    for k, s in shapes.items():
        n = math.prod(s) * itemsize
        header[k] = {"dtype": dtype, "shape": list(s), "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        f.truncate(8 + len(raw) + offset)
    return 8 + len(raw) + offset


@pytest.mark.parametrize("name,L,C,NH", SIZES)
@pytest.mark.parametrize("layout", ["openai", "hf"])
def test_infer_config_from_real_size_headers(tmp_path, name, L, C, NH, layout):
    """The real key sets and shapes in a file (the data is a sparse hole), parsed by
    gpt2s.weights.read_safetensors_header, then infer_config."""
    shapes = release_shapes(L, C, prefix="" if layout == "openai" else "transformer.",
                            buffers=layout == "openai")
    path = tmp_path / f"{name}.safetensors"
    size = write_sparse_safetensors(path, shapes)
    with open(path, "rb") as f:
        head = f.read(8)
        head += f.read(struct.unpack("<Q", head)[0])
    header, data_start = gw.read_safetensors_header(path, size, head)
    assert data_start == len(head)
    canonical = {k.removeprefix("transformer."): tuple(v["shape"]) for k, v in header.items()}
    assert gw.infer_config(canonical, str(path)) == GPT2Config.preset(name)


def test_load_gpt2_124m_real_shapes(tmp_path):
    """The full 124M-parameter key set of openai-community/gpt2 (mask buffers included, no
    config.json), from a sparse F16 file: the config is GPT-2 small's and all-zero weights give
    uniform logits."""
    path = tmp_path / "model.safetensors"
    write_sparse_safetensors(path, release_shapes(12, 768, buffers=True), dtype="F16")
    m = GPT2.from_safetensors(tmp_path)
    assert m.config == GPT2Config.preset("gpt2")
    assert m.num_parameters() == 124_439_808
    logits, loss = m.forward(np.array([464, 3290, 50256]), np.array([3290, 50256, -1]))
    assert logits.shape == (1, 3, 50257) and not logits.any()
    assert abs(loss - math.log(50257)) < 1e-5


def test_infer_config_errors():
    shapes = release_shapes(2, 100, buffers=False)
    with pytest.raises(SafetensorsError) as e:
        gw.infer_config(shapes, "/x/odd.safetensors")
    assert "/x/odd.safetensors" in str(e.value) and "64" in str(e.value)
    assert "config.json" in str(e.value)
    shapes = release_shapes(2, 64, buffers=False)
    for missing in ("wte.weight", "wpe.weight"):
        s = dict(shapes)
        del s[missing]
        with pytest.raises(SafetensorsError) as e:
            gw.infer_config(s, "/x/f.safetensors")
        assert missing in str(e.value) and "/x/f.safetensors" in str(e.value)


# ------------------------------------------------------------------------------------------
# malformed inputs: the exception type, and a message naming the file and the tensor


@pytest.fixture
def good_checkpoint(tmp_path, make_config, make_params):
    """(cfg, params, directory) of a valid F32 checkpoint with config.json."""
    cfg = make_config(n_layer=2, n_head=2, head_size=16, vocab_size=50, n_ctx=16)
    params = make_params(cfg, seed=41)
    d = tmp_path / "ckpt"
    d.mkdir()
    st_numpy.save_file({"transformer." + k: v for k, v in params.items()},
                       str(d / "model.safetensors"))
    write_config_json(d, cfg)
    assert_params_equal(GPT2.from_safetensors(d), params)  # the baseline loads
    return cfg, params, d


def rewrite(d, params, change):
    """Save params after change(tensors) into d/model.safetensors; returns the path."""
    tensors = {"transformer." + k: v for k, v in params.items()}
    change(tensors)
    path = d / "model.safetensors"
    st_numpy.save_file(tensors, str(path))
    return path


@pytest.mark.parametrize("name", ["h.1.mlp.c_fc.bias", "ln_f.weight", "wpe.weight",
                                  "h.0.attn.c_attn.weight"])
def test_missing_tensor(good_checkpoint, name):
    cfg, params, d = good_checkpoint
    path = rewrite(d, params, lambda t: t.pop("transformer." + name))
    with pytest.raises(SafetensorsError) as e:
        GPT2.from_safetensors(d)
    msg = str(e.value)
    assert str(path) in msg and name in msg and "missing" in msg


def test_missing_tensor_without_config(tmp_path, make_params):
    cfg = GPT2Config(n_layer=2, n_head=1, n_embd=64, vocab_size=30, n_ctx=8)
    params = make_params(cfg, seed=1)
    for name in ("wte.weight", "wpe.weight", "h.1.ln_2.bias"):
        p = dict(params)
        del p[name]
        path = tmp_path / f"no-{name}.safetensors"
        st_numpy.save_file(p, str(path))
        with pytest.raises(SafetensorsError) as e:
            GPT2.from_safetensors(path)
        assert str(path) in str(e.value) and name in str(e.value)


@pytest.mark.parametrize("name,new_shape", [
    ("h.0.attn.c_attn.weight", (96, 32)),      # transposed (nn.Linear layout)
    ("h.1.mlp.c_fc.bias", (127,)),
    ("wte.weight", (51, 32)),
    ("ln_f.weight", (1, 32)),
])
def test_unexpected_shape(good_checkpoint, name, new_shape):
    cfg, params, d = good_checkpoint
    expected = params[name].shape
    rng = np.random.default_rng(0)
    path = rewrite(d, params, lambda t: t.__setitem__(
        "transformer." + name, rng.standard_normal(new_shape).astype(np.float32)))
    with pytest.raises(SafetensorsError) as e:
        GPT2.from_safetensors(d)
    msg = str(e.value)
    assert str(path) in msg and name in msg
    assert str(tuple(expected)) in msg and str(tuple(new_shape)) in msg, msg


def _save_one_changed(tmp_path, make_params, name, value):
    """A 1-layer model's tensors with `name` replaced by `value`, saved without config.json."""
    cfg = GPT2Config(n_layer=1, n_head=1, n_embd=64, vocab_size=30, n_ctx=8)
    params = make_params(cfg, seed=2)
    params[name] = value
    path = tmp_path / "m.safetensors"
    st_numpy.save_file(params, str(path))
    return path


@pytest.mark.parametrize("name,shape", [("wte.weight", (30, 64, 1)), ("wpe.weight", (8,)),
                                        ("wte.weight", (64,))])
def test_embedding_not_2d_without_config(tmp_path, make_params, name, shape):
    """Inference reads sizes off wte and wpe; a wrongly-shaped one is reported, not unpacked."""
    path = _save_one_changed(tmp_path, make_params, name, np.zeros(shape, np.float32))
    with pytest.raises(SafetensorsError) as e:
        GPT2.from_safetensors(path)
    assert str(path) in str(e.value) and name in str(e.value)


@pytest.mark.parametrize("name,shape", [("wte.weight", (0, 64)), ("wpe.weight", (0, 64)),
                                        ("wte.weight", (30, 0))])
def test_zero_sized_embedding_without_config(tmp_path, make_params, name, shape):
    """An empty wte/wpe gives an impossible inferred config (vocab, n_ctx or n_embd 0): the
    error must still say which file and which tensor."""
    path = _save_one_changed(tmp_path, make_params, name, np.zeros(shape, np.float32))
    with pytest.raises(ValueError) as e:
        GPT2.from_safetensors(path)
    assert str(path) in str(e.value) and name in str(e.value), str(e.value)


def test_block_structure_without_config(tmp_path, make_params):
    """n_layer is inferred from the h.N keys: a gap names the first missing tensor, no blocks
    at all is reported as such."""
    cfg = GPT2Config(n_layer=3, n_head=1, n_embd=64, vocab_size=30, n_ctx=8)
    params = make_params(cfg, seed=2)
    path = tmp_path / "m.safetensors"
    st_numpy.save_file({k: v for k, v in params.items() if not k.startswith("h.1.")}, str(path))
    with pytest.raises(SafetensorsError) as e:
        GPT2.from_safetensors(path)
    assert str(path) in str(e.value) and "h.1." in str(e.value)
    st_numpy.save_file({k: v for k, v in params.items() if not k.startswith("h.")}, str(path))
    with pytest.raises(SafetensorsError) as e:
        GPT2.from_safetensors(path)
    assert str(path) in str(e.value) and "h.N" in str(e.value)


def test_unexpected_shape_without_config(tmp_path, make_params):
    """Inferred config (from wte/wpe) and a block tensor that disagrees with it."""
    path = _save_one_changed(tmp_path, make_params, "h.0.mlp.c_proj.weight",
                             np.zeros((64, 256), np.float32))   # transposed
    with pytest.raises(SafetensorsError) as e:
        GPT2.from_safetensors(path)
    msg = str(e.value)
    assert str(path) in msg and "h.0.mlp.c_proj.weight" in msg
    assert "(256, 64)" in msg and "(64, 256)" in msg


@pytest.mark.parametrize("dtype,tag", [(np.int64, "I64"), (np.float64, "F64"),
                                       (np.int32, "I32"), (np.uint8, "U8")])
def test_unknown_dtype(good_checkpoint, dtype, tag):
    cfg, params, d = good_checkpoint
    name = "h.1.ln_1.bias"
    path = rewrite(d, params, lambda t: t.__setitem__(
        "transformer." + name, params[name].astype(dtype)))
    assert read_header(path)["transformer." + name]["dtype"] == tag
    with pytest.raises(SafetensorsError) as e:
        GPT2.from_safetensors(d)
    msg = str(e.value)
    assert str(path) in msg and name in msg and tag in msg


def test_unexpected_extra_tensor(good_checkpoint):
    cfg, params, d = good_checkpoint
    path = rewrite(d, params, lambda t: t.__setitem__("transformer.h.7.mlp.c_fc.weight",
                                                       np.zeros((32, 128), np.float32)))
    with pytest.raises(SafetensorsError) as e:
        GPT2.from_safetensors(d)
    assert str(path) in str(e.value) and "h.7.mlp.c_fc.weight" in str(e.value)


def test_duplicate_tensor_with_and_without_prefix(good_checkpoint):
    cfg, params, d = good_checkpoint
    path = rewrite(d, params, lambda t: t.__setitem__("ln_f.bias", params["ln_f.bias"]))
    with pytest.raises(SafetensorsError) as e:
        GPT2.from_safetensors(d)
    assert str(path) in str(e.value) and "ln_f.bias" in str(e.value)


@pytest.mark.parametrize("cut", [1, 100, 1000])
def test_truncated_file(good_checkpoint, cut):
    """The file cut short inside the data section: the message names a tensor whose bytes are
    missing."""
    cfg, params, d = good_checkpoint
    path = d / "model.safetensors"
    raw = path.read_bytes()
    header = read_header(path)
    path.write_bytes(raw[:-cut])
    data_size = len(raw) - cut - 8 - struct.unpack("<Q", raw[:8])[0]
    cut_tensors = [k for k, v in header.items()
                   if k != "__metadata__" and v["data_offsets"][1] > data_size]
    assert cut_tensors
    with pytest.raises(SafetensorsError) as e:
        GPT2.from_safetensors(d)
    msg = str(e.value)
    assert str(path) in msg and "truncated" in msg
    assert any(k in msg for k in cut_tensors), msg


@pytest.mark.parametrize("keep", [0, 3, 8, 20])
def test_truncated_in_header(good_checkpoint, keep):
    cfg, params, d = good_checkpoint
    path = d / "model.safetensors"
    path.write_bytes(path.read_bytes()[:keep])
    with pytest.raises(SafetensorsError) as e:
        GPT2.from_safetensors(d)
    assert str(path) in str(e.value)


@pytest.mark.parametrize("content", [
    pytest.param(b"", id="empty"),
    pytest.param(np.random.default_rng(0).bytes(4096), id="random-bytes"),
    pytest.param(b'{"n_layer": 2, "n_head": 2, "n_embd": 32, "vocab_size": 50}\n', id="json-text"),
    pytest.param(struct.pack("<Q", 16) + b"this is not json" + b"\0" * 64, id="header-not-json"),
    pytest.param(struct.pack("<Q", 8) + b"[1,2,3] " + b"\0" * 64, id="header-json-list"),
    pytest.param(struct.pack("<Q", 16) + b"\xff\xfe\xfd\xfc" * 4 + b"\0" * 64, id="header-bad-utf8"),
    pytest.param(struct.pack("<Q", 0), id="zero-header"),
    pytest.param(struct.pack("<Q", 2**63) + b"{}", id="huge-header-length"),
])
def test_not_a_safetensors_file(tmp_path, content):
    path = tmp_path / "model.safetensors"
    path.write_bytes(content)
    for source in (tmp_path, path):
        with pytest.raises(SafetensorsError) as e:
            GPT2.from_safetensors(source)
        assert str(path) in str(e.value)


@pytest.mark.parametrize("entry", [
    pytest.param({"dtype": "F32", "shape": [50, 32]}, id="no-offsets"),
    pytest.param({"dtype": "F32", "shape": [50, 32], "data_offsets": [100, 50]}, id="reversed"),
    pytest.param({"dtype": "F32", "shape": [50, 32], "data_offsets": [0, 10**9]}, id="past-end"),
    pytest.param({"dtype": "F32", "shape": [50, 32], "data_offsets": [0, 16]}, id="too-few-bytes"),
    pytest.param({"dtype": "F32", "shape": [50, -32], "data_offsets": [0, 6400]}, id="neg-shape"),
    pytest.param({"dtype": "F32", "shape": "50x32", "data_offsets": [0, 6400]}, id="str-shape"),
    pytest.param("garbage", id="not-a-dict"),
    pytest.param({"dtype": "F32", "shape": [50, 32], "data_offsets": [0]}, id="offsets-len1"),
    pytest.param({"dtype": "F32", "shape": [50, 32], "data_offsets": [0, 6400, 1]},
                 id="offsets-len3"),
    pytest.param({"dtype": "F32", "shape": [50, 32], "data_offsets": None}, id="offsets-null"),
    pytest.param({"dtype": "F32", "shape": [50, 32], "data_offsets": ["0", "6400"]},
                 id="offsets-strings"),
    pytest.param({"dtype": "F32", "shape": [50, 32], "data_offsets": [0.0, 6400.0]},
                 id="offsets-floats"),
    pytest.param({"dtype": ["F32"], "shape": [50, 32], "data_offsets": [0, 6400]},
                 id="dtype-list"),
    pytest.param({"dtype": "F32", "shape": [50, 32, 1], "data_offsets": [0, 6400]},
                 id="3-D"),
])
def test_corrupt_header_entry(good_checkpoint, entry):
    """A header that is valid JSON with one bad tensor entry: a SafetensorsError (not a bare
    TypeError or unpacking ValueError from deep inside the loader) naming file and tensor."""
    cfg, params, d = good_checkpoint
    path = d / "model.safetensors"
    raw = path.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8:8 + n])
    data = raw[8 + n:]
    header["transformer.wte.weight"] = entry
    hraw = json.dumps(header).encode()
    hraw += b" " * (-len(hraw) % 8)
    path.write_bytes(struct.pack("<Q", len(hraw)) + hraw + data)
    with pytest.raises(SafetensorsError) as e:
        GPT2.from_safetensors(d)
    assert str(path) in str(e.value) and "wte.weight" in str(e.value)


def test_nonexistent_path(tmp_path):
    missing = tmp_path / "nope" / "model.safetensors"
    with pytest.raises(FileNotFoundError) as e:
        GPT2.from_safetensors(missing)
    assert str(missing) in str(e.value)
    with pytest.raises(FileNotFoundError) as e:
        GPT2.from_safetensors(str(tmp_path / "nope"))
    assert str(tmp_path / "nope") in str(e.value)


def test_directory_without_model_file(tmp_path, make_config):
    d = tmp_path / "empty-model"
    d.mkdir()
    write_config_json(d, make_config())
    (d / "pytorch_model.bin").write_bytes(b"\0" * 16)
    with pytest.raises(FileNotFoundError) as e:
        GPT2.from_safetensors(d)
    assert str(d) in str(e.value) and "model.safetensors" in str(e.value)


def test_bad_config_json(good_checkpoint):
    cfg, params, d = good_checkpoint
    (d / "config.json").write_text("{not json")
    with pytest.raises(ValueError) as e:
        GPT2.from_safetensors(d)
    assert "config.json" in str(e.value)
    (d / "config.json").write_text(json.dumps({"n_layer": 2, "n_head": 2, "n_embd": 32}))
    with pytest.raises(ValueError) as e:
        GPT2.from_safetensors(d)
    assert "config.json" in str(e.value) and "vocab_size" in str(e.value)


# ------------------------------------------------------------------------------------------
# saving


def test_save_roundtrip(tmp_path, make_config, make_model):
    """gpt2s and the safetensors package read a saved model back bit-exactly, with Hugging
    Face names; saving again over it replaces it."""
    cfg = make_config(n_layer=2, n_head=2, head_size=16, vocab_size=150, n_ctx=48, eps=1e-4)
    m = make_model(cfg, seed=51)
    d = tmp_path / "saved"
    m.save_safetensors(d)
    assert (d / "model.safetensors").is_file() and (d / "config.json").is_file()
    assert sorted(os.listdir(d)) == ["config.json", "model.safetensors"]  # no temp files left

    # gpt2s reads it back bit-exactly
    m2 = GPT2.from_safetensors(d)
    assert m2.config == cfg
    assert_params_equal(m2, m.params)

    # the safetensors package reads it: Hugging Face names with the prefix, F32, exact values
    from safetensors import safe_open
    with safe_open(str(d / "model.safetensors"), "np") as f:
        keys = set(f.keys())
        assert keys == {"transformer." + k for k in m.params}
        for k in m.params:
            np.testing.assert_array_equal(f.get_tensor("transformer." + k), m.params[k])
    config = json.loads((d / "config.json").read_text())
    assert (config["n_head"], config["layer_norm_epsilon"]) == (2, 1e-4)

    # saving again over an existing checkpoint replaces it
    m.params["ln_f.bias"][...] += 1.0
    m.save_safetensors(d)
    assert_params_equal(GPT2.from_safetensors(d), m.params)


def test_saved_model_loads_in_transformers(tmp_path, make_config, make_model, make_batch,
                                           record_error):
    """transformers loads a saved model: weights identical, config right, logits equal within
    float32 rounding."""
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("torch")
    cfg = make_config(n_layer=2, n_head=2, head_size=16, vocab_size=150, n_ctx=48, eps=1e-4)
    m = make_model(cfg, seed=51)
    d = tmp_path / "saved"
    m.save_safetensors(d)
    hf = transformers.GPT2LMHeadModel.from_pretrained(str(d), attn_implementation="eager")
    hf.eval()
    assert hf.config.n_head == 2 and hf.config.layer_norm_epsilon == 1e-4
    assert hf.config.activation_function == "gelu_new"
    for name, p in hf.transformer.named_parameters():
        np.testing.assert_array_equal(p.detach().numpy(), m.params[name], err_msg=name)
    assert hf.lm_head.weight.data_ptr() == hf.transformer.wte.weight.data_ptr()
    idx, targets = make_batch(cfg, 2, 48, seed=52)
    hf_logits, hf_loss = hf_logits_loss(hf, idx, targets)
    logits, loss = m.forward(idx, targets)
    e = record_error("saved model: gpt2s f32 vs transformers f32 logits",
                     ref.rel_err(logits, hf_logits))
    assert e < TOL
    assert abs(loss - hf_loss) < TOL * hf_loss


def test_save_to_file_path(tmp_path, make_config, make_model):
    """A path ending in .safetensors writes just that file, with the config in its metadata:
    loading it back gives the same config, even one that shapes alone cannot tell (2 heads of
    16); a file without a config and with n_embd=32 cannot be inferred and says so."""
    cfg = GPT2Config(n_layer=2, n_head=1, n_embd=64, vocab_size=70, n_ctx=20)
    m = make_model(cfg, seed=53)
    path = tmp_path / "sub" / "weights.safetensors"
    m.save_safetensors(path)
    assert path.is_file() and sorted(os.listdir(path.parent)) == ["weights.safetensors"]
    m2 = GPT2.from_safetensors(path)
    assert m2.config == cfg
    assert_params_equal(m2, m.params)

    small = make_model(make_config(n_layer=1, n_head=2, head_size=16, vocab_size=30, n_ctx=8))
    p2 = tmp_path / "small.safetensors"
    small.save_safetensors(p2)
    back = GPT2.from_safetensors(p2)
    assert back.config == small.config
    assert_params_equal(back, small.params)

    st = pytest.importorskip("safetensors.numpy")   # a writer that stores no gpt2s config
    p3 = tmp_path / "bare.safetensors"
    st.save_file({name: np.ascontiguousarray(v) for name, v in small.params.items()}, str(p3))
    with pytest.raises(SafetensorsError) as e:
        GPT2.from_safetensors(p3)
    assert str(p3) in str(e.value) and "64" in str(e.value)


class _Interrupted(Exception):
    pass


@pytest.mark.parametrize("exc", [OSError, KeyboardInterrupt, _Interrupted])
@pytest.mark.parametrize("target", ["dir", "file"])
def test_interrupted_save_leaves_no_partial_file(tmp_path, monkeypatch, make_config, make_model,
                                                 exc, target):
    """The tensor writer fails after 1000 bytes (disk full, Ctrl-C): no model.safetensors (and
    no temporary file) is left; an older checkpoint at the same place stays intact."""
    cfg = GPT2Config(n_layer=2, n_head=1, n_embd=64, vocab_size=150, n_ctx=48)  # inferable
    m = make_model(cfg, seed=54)
    old = make_model(cfg, seed=55)
    dest = tmp_path / "out" if target == "dir" else tmp_path / "out" / "w.safetensors"
    model_file = dest / "model.safetensors" if target == "dir" else dest

    real_writer = gw._write_tensors

    class FailingFile:
        def __init__(self, f):
            self.f, self.n = f, 0

        def write(self, b):
            b = memoryview(b).cast("B")
            if self.n + len(b) > 1000:
                self.f.write(b[:1000 - self.n])
                self.n = 1000
                raise exc("simulated failure while writing")
            self.n += len(b)
            return self.f.write(b)

        def __getattr__(self, name):
            return getattr(self.f, name)

    def failing_writer(f, *args, **kwargs):
        return real_writer(FailingFile(f), *args, **kwargs)

    monkeypatch.setattr(gw, "_write_tensors", failing_writer)
    with pytest.raises(exc):
        m.save_safetensors(dest)
    assert not model_file.exists()
    if target == "dir":
        assert not (dest / "config.json").exists()
    assert [p.name for p in model_file.parent.iterdir()] == []

    # over an existing checkpoint: the old one survives a failed save
    monkeypatch.setattr(gw, "_write_tensors", real_writer)
    old.save_safetensors(dest)
    before = model_file.read_bytes()
    monkeypatch.setattr(gw, "_write_tensors", failing_writer)
    with pytest.raises(exc):
        m.save_safetensors(dest)
    assert model_file.read_bytes() == before
    assert_params_equal(GPT2.from_safetensors(dest), old.params)
    leftovers = sorted(p.name for p in model_file.parent.iterdir())
    assert leftovers == (["config.json", "model.safetensors"] if target == "dir"
                         else ["w.safetensors"])
