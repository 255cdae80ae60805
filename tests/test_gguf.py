"""GGUF files both ways (gpt2s/gguf_io.py, GPT2.from_gguf / save_gguf).

Files are written here with the gguf package itself, laid out as llama.cpp's
convert_hf_to_gguf.py lays out a GPT-2 (the Conv1D weights transposed to ggml's (out, in)
rows, no ``output`` for the tied head (older converters wrote a copy of ``token_embd``
there; both are read), 1-D tensors and position_embd in F32, the
block types quantized by the gguf package), then loaded:

- F32: logits equal to the source model's bit for bit;
- F16 / BF16: the weights equal NumPy's rounding of the source (done here), logits equal to a
  float32 model holding those rounded weights;
- Q8_0 / Q4_0: the stored blocks, widened, equal a dequantization written here from ggml's
  block definitions (Q8_0: an fp16 scale d then 32 int8 q, w = d q; Q4_0: d then 16 bytes,
  byte j holding weight j's q in its low nibble and weight j + 16's in its high one,
  w = d (q - 8)), and the logits equal a float32 model holding those weights to float32
  rounding.

Exports are read back with the gguf package's reader (its tensor names, types, shapes,
metadata and tokenizer checked here) and loaded again.  Hostile files are refused naming the
file and the key or tensor.  Skipped when the gguf package is not installed (the ``gguf``
extra).
"""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

gguf = pytest.importorskip("gguf", reason="the gguf package (pip install 'gpt2s[gguf]') is not "
                                          "installed")

from gpt2s import GPT2, GPT2Config, SafetensorsError   # noqa: E402
from gpt2s.gguf_io import GGUFError                     # noqa: E402
from gpt2s.weight_types import PackedWeight             # noqa: E402

T = gguf.GGMLQuantizationType
MATMUL = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
LAYER = {"ln_1.weight": "attn_norm.weight", "ln_1.bias": "attn_norm.bias",
         "attn.c_attn.weight": "attn_qkv.weight", "attn.c_attn.bias": "attn_qkv.bias",
         "attn.c_proj.weight": "attn_output.weight", "attn.c_proj.bias": "attn_output.bias",
         "ln_2.weight": "ffn_norm.weight", "ln_2.bias": "ffn_norm.bias",
         "mlp.c_fc.weight": "ffn_up.weight", "mlp.c_fc.bias": "ffn_up.bias",
         "mlp.c_proj.weight": "ffn_down.weight", "mlp.c_proj.bias": "ffn_down.bias"}
TOP = {"wte.weight": "token_embd.weight", "wpe.weight": "position_embd.weight",
       "ln_f.weight": "output_norm.weight", "ln_f.bias": "output_norm.bias",
       "lm_head.weight": "output.weight"}


def rel_l2(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def ggml_name(name: str) -> str:
    if name in TOP:
        return TOP[name]
    layer, suffix = name[2:].split(".", 1)
    return f"blk.{layer}.{LAYER[suffix]}"


def conv1d(name: str) -> bool:
    return name.endswith(MATMUL)


# ------------------------------------------------------------------ the converter's layout

def converted_tensors(model: GPT2, copy_head: bool = False) -> dict:
    """{ggml name: float32 array in ggml's numpy order} as convert_hf_to_gguf.py makes them
    for GPT-2: Conv1D weights transposed; copy_head: the tied head copied as "output" (as
    older converters did)."""
    out = {}
    for name, w in model.params.items():
        w = np.asarray(w, np.float32)
        out[ggml_name(name)] = np.ascontiguousarray(w.T if conv1d(name) else w)
    if model.config.tie_word_embeddings and copy_head:
        out["output.weight"] = out["token_embd.weight"]
    return out


def store_type(gname: str, array: np.ndarray, kind) -> object:
    """The converter's choice: 1-D tensors and position_embd stay F32."""
    return T.F32 if array.ndim == 1 or gname == "position_embd.weight" else kind


def write_gguf(path, config: GPT2Config, tensors: dict, types: dict, *, arch="gpt2",
               meta=None, drop=(), tokenizer=False):
    """A GGUF written with the gguf package: metadata as the converter writes it (overridden
    or dropped by meta: {key: value or None}), tensors {name: float32 array} stored as
    types[name] (quantized by the gguf package), or {name: (raw uint8 bytes, type)}."""
    w = gguf.GGUFWriter(str(path), arch)
    keys = {"gpt2.block_count": config.n_layer, "gpt2.context_length": config.n_ctx,
            "gpt2.embedding_length": config.n_embd,
            "gpt2.feed_forward_length": config.inner_size,
            "gpt2.attention.head_count": config.n_head}
    keys.update(meta or {})
    for k, v in keys.items():
        if v is not None and k not in drop:
            w.add_uint32(k, v) if isinstance(v, int) else w.add_string(k, v)
    if "gpt2.attention.layer_norm_epsilon" not in drop:
        w.add_float32("gpt2.attention.layer_norm_epsilon", config.layer_norm_epsilon)
    w.add_file_type(1)
    if tokenizer:
        from gpt2s.gguf_io import gguf_tokenizer
        toks, types_, merges = gguf_tokenizer()
        w.add_tokenizer_model(tokenizer if isinstance(tokenizer, str) else "gpt2")
        w.add_token_list(toks)
        w.add_token_types(types_)
        w.add_token_merges(merges)
    for name, a in tensors.items():
        if isinstance(a, tuple):
            raw, kind = a
            w.add_tensor(name, raw, raw_dtype=kind)
            continue
        kind = types.get(name, T.F32)
        if kind == T.F32:
            w.add_tensor(name, a.astype(np.float32))
        elif kind == T.F16:
            w.add_tensor(name, a.astype(np.float16))
        else:
            w.add_tensor(name, gguf.quants.quantize(a, kind), raw_dtype=kind)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def write_converted(path, model: GPT2, kind, copy_head=False, **kw):
    tensors = converted_tensors(model, copy_head)
    types = {g: store_type(g, a, kind) for g, a in tensors.items()}
    return write_gguf(path, model.config, tensors, types, **kw)


# ------------------------------------------------------------------ references written here

def bf16_round(x: np.ndarray) -> np.ndarray:
    bits = np.ascontiguousarray(x, np.float32).view(np.uint32).astype(np.uint64)
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16 << 16
    return bits.astype(np.uint32).view(np.float32)


def dequant(raw: np.ndarray, kind, rows: int, cols: int) -> np.ndarray:
    """ggml's Q8_0 / Q4_0 rows (bytes) to float32, from the block definitions."""
    raw = np.asarray(raw).reshape(-1).view(np.uint8)
    nb = cols // 32
    size = 34 if kind == T.Q8_0 else 18
    blocks = raw.reshape(rows, nb, size)
    d = blocks[:, :, :2].copy().view(np.float16).astype(np.float32)     # (rows, nb, 1)
    if kind == T.Q8_0:
        q = blocks[:, :, 2:].copy().view(np.int8).astype(np.float32)
    else:
        qs = blocks[:, :, 2:]
        q = np.concatenate([qs & 0x0F, qs >> 4], axis=2).astype(np.float32) - 8
    return (q * d).reshape(rows, cols)


def reference_model(model: GPT2, values: dict) -> GPT2:
    """A float32 model with model's config holding values {ggml name: numpy-order array}."""
    ref = GPT2(model.config)
    for name in ref.params:
        v = values[ggml_name(name)]
        ref.params[name][...] = v.T if conv1d(name) else v
    return ref


def widened(w) -> np.ndarray:
    return np.asarray(w, np.float32)


@pytest.fixture(scope="module")
def model(make_config, make_model):
    cfg = make_config(n_layer=2, n_head=2, head_size=32, vocab_size=1031, n_ctx=64)
    return make_model(cfg, seed=5)


@pytest.fixture(scope="module")
def idx(model, make_batch):
    return make_batch(model.config, 2, 24, seed=6)[0]


# ------------------------------------------------------------------ loading converted files

@pytest.mark.parametrize("copy_head", [False, True])
def test_f32_loads_bit_for_bit(model, idx, tmp_path, copy_head):
    p = write_converted(tmp_path / "m-f32.gguf", model, T.F32, copy_head)
    m = GPT2.from_gguf(p)
    assert m.dtype == "float32" and m.config == model.config   # tied either way
    for name, w in model.params.items():
        np.testing.assert_array_equal(m.params[name], w, err_msg=name)
    np.testing.assert_array_equal(m.forward(idx)[0], model.forward(idx)[0])
    # from_pretrained and from_safetensors take the .gguf path too
    np.testing.assert_array_equal(GPT2.from_pretrained(p).forward(idx)[0],
                                  model.forward(idx)[0])
    assert GPT2.from_safetensors(str(p)).dtype == "float32"


def test_f16_equals_numpy_rounding(model, idx, tmp_path):
    p = write_converted(tmp_path / "m-f16.gguf", model, T.F16)
    m = GPT2.from_gguf(p)
    assert m.dtype == "float32"
    values = {g: (a if store_type(g, a, T.F16) == T.F32
                  else a.astype(np.float16).astype(np.float32))
              for g, a in converted_tensors(model).items()}
    ref = reference_model(model, values)
    for name in ref.params:
        np.testing.assert_array_equal(m.params[name], ref.params[name], err_msg=name)
    np.testing.assert_array_equal(m.forward(idx)[0], ref.forward(idx)[0])
    assert rel_l2(m.forward(idx)[0], model.forward(idx)[0]) < 1e-3


def test_bf16_loads_as_bfloat16_exactly(model, idx, tmp_path):
    p = write_converted(tmp_path / "m-bf16.gguf", model, T.BF16)
    m = GPT2.from_gguf(p)
    assert m.dtype == "bfloat16"
    values = {g: (a if store_type(g, a, T.BF16) == T.F32 else bf16_round(a))
              for g, a in converted_tensors(model).items()}
    ref = reference_model(model, values)
    for name in ref.params:
        np.testing.assert_array_equal(widened(m.params[name]), ref.params[name], err_msg=name)
    assert rel_l2(m.forward(idx)[0], ref.forward(idx)[0]) < 1e-5
    # the same file as float32: the rounded values, widened exactly
    f = GPT2.from_gguf(p, dtype="float32")
    np.testing.assert_array_equal(f.forward(idx)[0], ref.forward(idx)[0])


@pytest.mark.parametrize("kind,dtype", [(T.Q8_0, "int8"), (T.Q4_0, "int4")])
def test_blocks_load_as_our_type_without_requantizing(model, idx, tmp_path, kind, dtype):
    p = write_converted(tmp_path / f"m-{kind.name}.gguf", model, kind, copy_head=True)
    reader = gguf.GGUFReader(p)
    raw = {t.name: t for t in reader.tensors}
    values = {}
    for g, a in converted_tensors(model).items():
        t = raw[g]
        if t.tensor_type == T.F32:
            values[g] = np.array(t.data, np.float32).reshape(a.shape)
        else:
            assert t.tensor_type == kind
            values[g] = dequant(t.data, kind, *a.shape)
    m = GPT2.from_gguf(p)
    assert m.dtype == dtype and m.config.tie_word_embeddings
    ref = reference_model(model, values)
    for name, w in m.params.items():
        if conv1d(name) or name == "wte.weight":
            assert isinstance(w, PackedWeight) and w.type_name == dtype
        np.testing.assert_array_equal(widened(w), ref.params[name], err_msg=name)
    assert rel_l2(m.forward(idx)[0], ref.forward(idx)[0]) < 1e-5
    # as float32: the same dequantized weights, bit for bit
    f = GPT2.from_gguf(p, dtype="float32")
    np.testing.assert_array_equal(f.forward(idx)[0], ref.forward(idx)[0])


def test_untied_output_of_another_type(model, idx, tmp_path):
    """llama-quantize's Q4_0 keeps the head in another type (Q6_K there; Q5_0 here, which the
    gguf package quantizes): an untied lm_head, widened with the gguf package."""
    tensors = converted_tensors(model, copy_head=True)
    types = {g: store_type(g, a, T.Q4_0) for g, a in tensors.items()}
    types["output.weight"] = T.Q5_0
    p = write_gguf(tmp_path / "mixed.gguf", model.config, tensors, types)
    m = GPT2.from_gguf(p)
    assert m.dtype == "int4" and not m.config.tie_word_embeddings
    head = gguf.GGUFReader(p).tensors
    head = next(t for t in head if t.name == "output.weight")
    want = gguf.quants.dequantize(head.data, T.Q5_0).reshape(tensors["output.weight"].shape)
    f = GPT2.from_gguf(p, dtype="float32")
    np.testing.assert_array_equal(f.params["lm_head.weight"], want)
    assert rel_l2(m.forward(idx)[0], model.forward(idx)[0]) < 0.5


def test_untied_model_round_trip(make_config, make_model, tmp_path):
    cfg = GPT2Config.preset("tiny")
    cfg = GPT2Config(**{**cfg.__dict__, "tie_word_embeddings": False})
    m = GPT2.from_config(cfg, seed=2)
    p = m.save_gguf(tmp_path / "untied.gguf")
    names = {t.name for t in gguf.GGUFReader(p).tensors}
    assert "output.weight" in names
    back = GPT2.from_gguf(p)
    assert not back.config.tie_word_embeddings
    for name, w in m.params.items():
        np.testing.assert_array_equal(back.params[name], w, err_msg=name)


# ------------------------------------------------------------------ export

@pytest.fixture(scope="module")
def tiny():
    return GPT2.from_config(GPT2Config.preset("tiny"), seed=1)


@pytest.fixture(scope="module")
def exports(tiny, tmp_path_factory):
    d = tmp_path_factory.mktemp("exports")
    out = {}
    for dtype in ("float32", "float16", "bfloat16", "int8", "int4"):
        out[dtype] = tiny.save_gguf(d / f"tiny-{dtype}.gguf", dtype=dtype)
    return out


def byte_to_unicode():
    """GPT-2's encoder.py byte -> character table (its vocab.json's spelling)."""
    bs = list(range(33, 127)) + list(range(161, 173)) + list(range(174, 256))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def test_export_layout_and_tokenizer(tiny, exports):
    import tiktoken
    from gpt2s import get_tokenizer
    r = gguf.GGUFReader(exports["int8"])
    f = lambda k: r.get_field(k).contents()   # noqa: E731
    cfg = tiny.config
    assert f("general.architecture") == "gpt2"
    assert (f("gpt2.block_count"), f("gpt2.context_length"), f("gpt2.embedding_length"),
            f("gpt2.feed_forward_length"), f("gpt2.attention.head_count")) == \
        (cfg.n_layer, cfg.n_ctx, cfg.n_embd, 4 * cfg.n_embd, cfg.n_head)
    assert f("gpt2.attention.layer_norm_epsilon") == pytest.approx(cfg.layer_norm_epsilon)
    assert f("tokenizer.ggml.model") == "gpt2" and f("tokenizer.ggml.pre") == "gpt-2"
    assert f("tokenizer.ggml.eos_token_id") == 50256 == f("tokenizer.ggml.bos_token_id")
    tokens, types, merges = (f("tokenizer.ggml.tokens"), f("tokenizer.ggml.token_type"),
                             f("tokenizer.ggml.merges"))
    enc = get_tokenizer()
    table = byte_to_unicode()
    assert len(tokens) == 50257 and tokens[50256] == "<|endoftext|>"
    for i in list(range(0, 50256, 97)) + [0, 255, 256, 50255]:
        assert tokens[i] == "".join(table[b] for b in enc.decode_single_token_bytes(i)), i
    assert types[:3] == [1, 1, 1] and types[50256] == 3
    # GPT-2's merges.txt, first lines; every merge makes the token of its rank
    assert merges[:6] == ["Ġ t", "Ġ a", "h e", "i n", "r e", "o n"]
    assert len(merges) == 50000
    index = {t: i for i, t in enumerate(tokens)}
    assert all(index[m.replace(" ", "")] == 256 + i for i, m in enumerate(merges))
    assert isinstance(enc, tiktoken.Encoding)
    # tensors: llama.cpp's names, ggml dims, types; the tied head as "output"
    t = {x.name: x for x in r.tensors}
    C = cfg.n_embd
    assert [int(d) for d in t["blk.0.attn_qkv.weight"].shape] == [C, 3 * C]
    assert [int(d) for d in t["blk.1.ffn_down.weight"].shape] == [4 * C, C]
    assert [int(d) for d in t["token_embd.weight"].shape] == [C, 50257]
    assert t["token_embd.weight"].tensor_type == T.Q8_0 and "output.weight" not in t
    assert t["position_embd.weight"].tensor_type == T.F32 == t["blk.0.attn_norm.bias"].tensor_type
    assert len(t) == 4 + 12 * cfg.n_layer


@pytest.mark.parametrize("dtype,kind", [("float32", T.F32), ("float16", T.F16),
                                        ("bfloat16", T.BF16), ("int8", T.Q8_0),
                                        ("int4", T.Q4_0)])
def test_export_values(tiny, exports, dtype, kind):
    """Each exported matmul weight, read with the gguf reader and widened here, is the model's
    weight rounded as the type says (int8/int4: the blocks of to_dtype, widened)."""
    r = gguf.GGUFReader(exports[dtype])
    t = {x.name: x for x in r.tensors}
    src = tiny.to_dtype(dtype) if dtype in ("int8", "int4", "bfloat16") else tiny
    for name, w in src.params.items():
        g = ggml_name(name)
        x = t[g]
        want = widened(w)
        want = want.T if conv1d(name) else want
        if dtype == "float16" and want.ndim == 2 and g != "position_embd.weight":
            want = want.astype(np.float16).astype(np.float32)
        if x.tensor_type in (T.Q8_0, T.Q4_0):
            got = dequant(x.data, x.tensor_type, *want.shape)
        elif x.tensor_type == T.BF16:
            got = (x.data.reshape(-1).view(np.uint16).astype(np.uint32) << 16) \
                .view(np.float32).reshape(want.shape)
        else:
            got = np.asarray(x.data, np.float32).reshape(want.shape)
        expect_kind = T.F32 if want.ndim == 1 or g == "position_embd.weight" else kind
        assert x.tensor_type == expect_kind, g
        np.testing.assert_array_equal(got, want, err_msg=g)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "int8", "int4"])
def test_export_round_trip(tiny, tmp_path, dtype):
    m = tiny.to_dtype(dtype) if dtype != "float32" else tiny
    p = m.save_gguf(tmp_path / "rt.gguf")
    back = GPT2.from_pretrained(p)
    assert back.dtype == dtype and back.config == m.config
    for name, w in m.params.items():
        if isinstance(w, PackedWeight):
            b = back.params[name]
            np.testing.assert_array_equal(b.data, w.data, err_msg=name)
            if w.scales is not None:
                np.testing.assert_array_equal(b.scales, w.scales, err_msg=name)
        else:
            np.testing.assert_array_equal(back.params[name], w, err_msg=name)
    ids = np.arange(40)[None] * 7
    np.testing.assert_array_equal(back.forward(ids)[0], m.forward(ids)[0])


def test_export_refusals(model, tmp_path):
    with pytest.raises(ValueError, match="vocab_size is 1031"):
        model.save_gguf(tmp_path / "x.gguf")
    with pytest.raises(ValueError, match="dtype"):
        GPT2.from_config(GPT2Config.preset("tiny")).save_gguf(tmp_path / "y.gguf", "int2")
    assert not list(tmp_path.iterdir())


def test_quantize_cli_writes_gguf(tmp_path, tiny):
    src = tiny.save_safetensors(tmp_path / "src")
    out = tmp_path / "t-q4.gguf"
    r = subprocess.run([sys.executable, "-m", "gpt2s.quantize", str(src), str(out), "--dtype",
                        "int4", "-q"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert str(out) in r.stdout
    m = GPT2.from_pretrained(out)
    assert m.dtype == "int4"
    want = tiny.to_dtype("int4")
    np.testing.assert_array_equal(m.params["h.1.mlp.c_fc.weight"].data,
                                  want.params["h.1.mlp.c_fc.weight"].data)
    r = subprocess.run([sys.executable, "-m", "gpt2s.quantize", str(src), str(out), "--dtype",
                        "int8", "-q"], capture_output=True, text=True)
    assert r.returncode == 2 and "exists" in r.stderr
    r = subprocess.run([sys.executable, "-m", "gpt2s.generate", "--model", str(out), "-n", "3",
                        "--temperature", "0", "Hello"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


# ------------------------------------------------------------------ hostile files

def refused(path, *words, error=GGUFError):
    with pytest.raises(error) as e:
        GPT2.from_gguf(path)
    msg = str(e.value)
    assert str(path) in msg, msg
    for w in words:
        assert w in msg, msg
    return msg


def test_hostile_metadata(model, tmp_path):
    refused(write_converted(tmp_path / "a.gguf", model, T.F32, arch="llama"),
            "general.architecture", "'llama'")
    refused(write_converted(tmp_path / "b.gguf", model, T.F32,
                            drop=("gpt2.attention.head_count",)), "gpt2.attention.head_count")
    refused(write_converted(tmp_path / "c.gguf", model, T.F32,
                            meta={"gpt2.embedding_length": "wide"}), "gpt2.embedding_length")
    refused(write_converted(tmp_path / "d.gguf", model, T.F32,
                            meta={"gpt2.attention.head_count": 3}), "n_head=3")
    refused(write_converted(tmp_path / "e.gguf", model, T.F32, tokenizer="llama"),
            "tokenizer.ggml.model", "'llama'")


def test_hostile_tensors(model, tmp_path):
    tensors = converted_tensors(model)
    types = {g: store_type(g, a, T.F32) for g, a in tensors.items()}
    cfg = model.config

    def variant(name, change):
        t = dict(tensors)
        change(t)
        return write_gguf(tmp_path / name, cfg, t, types)

    refused(variant("missing.gguf", lambda t: t.pop("blk.1.ffn_up.bias")),
            "missing tensor 'blk.1.ffn_up.bias'")
    refused(variant("shape.gguf", lambda t: t.update(
        {"blk.0.attn_qkv.weight": tensors["blk.0.attn_qkv.weight"].T.copy()})),
        "'blk.0.attn_qkv.weight'", "shape")
    refused(variant("extra.gguf", lambda t: t.update({"blk.0.attn_q.weight": t["blk.0.attn_norm.weight"]})),
            "unexpected tensor 'blk.0.attn_q.weight'")
    refused(variant("block.gguf", lambda t: t.update({"blk.2.attn_norm.weight": t["blk.0.attn_norm.weight"]})),
            "'blk.2.attn_norm.weight'", "block_count")
    refused(variant("notoken.gguf", lambda t: t.pop("token_embd.weight")),
            "'token_embd.weight'")
    # a weight of an integer type; a layernorm of a block type
    ints = (tensors["blk.0.ffn_down.weight"] * 100).astype(np.int32)
    refused(write_gguf(tmp_path / "int.gguf", cfg, {**tensors, "blk.0.ffn_down.weight":
                                                     (ints, None)}, types),
            "'blk.0.ffn_down.weight'", "I32")
    raw = gguf.quants.quantize(tensors["blk.0.attn_norm.weight"].reshape(1, -1), T.Q8_0)
    refused(write_gguf(tmp_path / "q8norm.gguf", cfg,
                       {**tensors, "blk.0.attn_norm.weight": (raw.reshape(-1), T.Q8_0)}, types),
            "'blk.0.attn_norm.weight'", "Q8_0")


def test_hostile_values(model, tmp_path):
    tensors = converted_tensors(model)
    types = {g: store_type(g, a, T.Q8_0) for g, a in tensors.items()}
    raw = gguf.quants.quantize(tensors["blk.1.attn_output.weight"], T.Q8_0).copy()
    raw.reshape(-1)[34 * 5:34 * 5 + 2] = np.array([0x7E00], "<u2").view(np.uint8)   # NaN scale
    p = write_gguf(tmp_path / "nan-scale.gguf", model.config,
                   {**tensors, "blk.1.attn_output.weight": (raw, T.Q8_0)}, types)
    refused(p, "'blk.1.attn_output.weight'", "scale", error=SafetensorsError)
    bad = tensors["blk.0.ffn_up.bias"].copy()
    bad[3] = np.inf
    p = write_gguf(tmp_path / "inf.gguf", model.config, {**tensors, "blk.0.ffn_up.bias": bad},
                   types)
    refused(p, "'blk.0.ffn_up.bias'", "inf", error=SafetensorsError)


def test_not_gguf_and_truncated(model, tmp_path):
    p = tmp_path / "junk.gguf"
    p.write_bytes(b"GGUF" + b"\xff" * 64)
    refused(p, "not a GGUF file")
    good = write_converted(tmp_path / "good.gguf", model, T.F32)
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(good.read_bytes()[:good.stat().st_size // 2])
    refused(cut, "not a GGUF file")
    with pytest.raises(FileNotFoundError):
        GPT2.from_gguf(tmp_path / "nope.gguf")
