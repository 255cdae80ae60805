"""Model files in a model's own storage (gpt2s/packed.py): round trips of every stored type bit
for bit, packed blocks mapped without a copy, the stored bytes read independently against the
documented format, hostile packed files refused by name, files this gpt2s cannot read refused,
and `python -m gpt2s.quantize` end to end.

The files are read and rewritten here with a safetensors reader/writer of the test's own
(struct + json), not through gpt2s."""

from __future__ import annotations

import json
import mmap
import os
import struct
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from gpt2s import GPT2, GPT2Config, SafetensorsError
from gpt2s.weight_types import PackedWeight

TYPES = ["float32", "bfloat16", "int8", "int4"]
PACKED = ["int8", "int4"]
MATMUL = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
NP = {"F32": np.float32, "F16": np.float16, "BF16": np.uint16, "I8": np.int8, "U8": np.uint8}


def is_matmul(name: str) -> bool:
    return name in ("wte.weight", "lm_head.weight") or name.endswith(MATMUL)


# ------------------------------------------------------------------ the test's own safetensors

def read_st(path) -> tuple[dict, dict]:
    """({name: (dtype, shape, bytes)} in file order, __metadata__) of a safetensors file."""
    raw = Path(path).read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    meta = header.pop("__metadata__", {})
    data = raw[8 + n:]
    order = sorted(header, key=lambda k: header[k]["data_offsets"][0])
    return {k: (header[k]["dtype"], list(header[k]["shape"]),
                data[header[k]["data_offsets"][0]:header[k]["data_offsets"][1]])
            for k in order}, meta


def write_st(path, tensors: dict, meta: dict):
    header, offset, blobs = {}, 0, []
    for k, (dtype, shape, blob) in tensors.items():
        header[k] = {"dtype": dtype, "shape": list(shape),
                     "data_offsets": [offset, offset + len(blob)]}
        offset += len(blob)
        blobs.append(blob)
    header["__metadata__"] = meta
    h = json.dumps(header).encode()
    h += b" " * (-len(h) % 8)
    Path(path).write_bytes(struct.pack("<Q", len(h)) + h + b"".join(blobs))


def array(entry) -> np.ndarray:
    dtype, shape, blob = entry
    return np.frombuffer(blob, NP[dtype]).reshape(shape)


# ------------------------------------------------------------------ fixtures

@pytest.fixture(scope="module")
def cfg(make_config):
    return make_config(n_layer=2, n_head=2, head_size=32, vocab_size=173, n_ctx=48)   # C = 64


@pytest.fixture(scope="module")
def model(cfg, make_model):
    return make_model(cfg, seed=26)


@pytest.fixture(scope="module")
def saved(model, tmp_path_factory):
    """{dtype: (in-memory model of that storage, the directory it was saved to)}."""
    out = {}
    for dtype in TYPES:
        m = model.to_dtype(dtype)
        d = tmp_path_factory.mktemp(f"saved-{dtype}")
        m.save_safetensors(d)
        out[dtype] = m, d
    return out


def ids(cfg, T=11, seed=0):
    return np.random.default_rng(seed).integers(0, cfg.vocab_size, (2, T))


def assert_same_storage(a: GPT2, b: GPT2):
    assert a.dtype == b.dtype
    for name, w in a.params.items():
        v = b.params[name]
        if isinstance(w, PackedWeight):
            assert isinstance(v, PackedWeight) and v.type_name == w.type_name, name
            np.testing.assert_array_equal(v.data, w.data, err_msg=name)
            if w.scales is not None:
                np.testing.assert_array_equal(v.scales, w.scales, err_msg=name)
        else:
            np.testing.assert_array_equal(v, w, err_msg=name)


# ------------------------------------------------------------------ round trips

@pytest.mark.parametrize("dtype", TYPES)
def test_round_trip_is_bit_for_bit(saved, cfg, dtype):
    m, d = saved[dtype]
    back = GPT2.from_pretrained(d)           # dtype None: the file's own storage
    assert back.dtype == dtype and back.mapped
    assert_same_storage(m, back)
    x = ids(cfg)
    np.testing.assert_array_equal(back.forward(x)[0], m.forward(x)[0])
    np.testing.assert_array_equal(back.generate(x[:1, :3], 8, temperature=0),
                                  m.generate(x[:1, :3], 8, temperature=0))
    # and the same again without the mapping
    copied = GPT2.from_safetensors(d, mmap=False)
    assert not copied.mapped
    assert_same_storage(m, copied)


@pytest.mark.parametrize("dtype", PACKED)
def test_lone_packed_file_round_trip(model, cfg, tmp_path, dtype):
    """A lone .safetensors file carries its config in the metadata."""
    m = model.to_dtype(dtype)
    f = m.save_safetensors(tmp_path / "w.safetensors")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["w.safetensors"]
    back = GPT2.from_safetensors(f)
    assert_same_storage(m, back)
    x = ids(cfg, seed=1)
    np.testing.assert_array_equal(back.forward(x)[0], m.forward(x)[0])


@pytest.mark.parametrize("dtype", PACKED + ["bfloat16"])
def test_untied_head_round_trip(make_config, make_model, tmp_path, dtype):
    """An untied output head is a matmul weight of its own: stored (and packed) like wte,
    under its own name outside the "transformer." prefix."""
    cfg = make_config(n_layer=1, n_head=2, head_size=32, vocab_size=97, n_ctx=16,
                      tie_word_embeddings=False)
    m = make_model(cfg, seed=4).to_dtype(dtype)
    m.save_safetensors(tmp_path)
    tensors, _ = read_st(tmp_path / "model.safetensors")
    assert "lm_head.weight" in tensors
    back = GPT2.from_pretrained(tmp_path)
    assert_same_storage(m, back)
    x = ids(cfg, T=5)
    np.testing.assert_array_equal(back.forward(x)[0], m.forward(x)[0])


@pytest.mark.parametrize("dtype", TYPES)
def test_file_layout(saved, cfg, dtype):
    """What the file holds, read by the test's own reader: dtypes per tensor, the metadata and
    config.json's quantization_config."""
    _, d = saved[dtype]
    tensors, meta = read_st(d / "model.safetensors")
    quant = json.loads((d / "config.json").read_text()).get("quantization_config")
    names = {k.removeprefix("transformer."): v[0] for k, v in tensors.items()}
    if dtype == "float32":
        assert set(names.values()) == {"F32"} and meta["format"] == "pt"
        assert "gpt2s_storage" not in meta and quant is None
        return
    assert meta["gpt2s_storage"] == dtype
    small = {n: t for n, t in names.items() if not is_matmul(n) and not n.endswith(".scales")}
    assert set(small.values()) == {"F32"}
    if dtype == "bfloat16":
        assert meta["format"] == "pt" and quant is None
        assert {t for n, t in names.items() if is_matmul(n)} == {"BF16"}
        return
    assert meta["format"] == "gpt2s"
    packing = json.loads(meta["gpt2s_packing"])
    assert packing["weight_type"] == dtype and packing["block"] == 32
    assert packing["version"] == 1 and packing["layout"] == "output-major"
    assert quant == {"quant_method": "gpt2s", "weight_type": dtype, "block_size": 32,
                     "version": 1}
    element = {"int8": "I8", "int4": "U8"}[dtype]
    for n, t in names.items():
        if is_matmul(n):
            assert t == element and names[n + ".scales"] == "F16", n


@pytest.mark.parametrize("dtype", PACKED)
def test_stored_bytes_read_as_documented(saved, dtype):
    """The file's blocks widened by the documented format (docs/checkpoints.md), here in
    NumPy: int8 weight = scale q; int4 weight = scale (q - 8), byte j of a block holding
    weight j in its low nibble and weight j + 16 in its high one; Conv1D weights stored
    output-major [out][in], the embedding [V][C].  Equal to the model's own widening."""
    m, d = saved[dtype]
    tensors, _ = read_st(d / "model.safetensors")
    for key, entry in tensors.items():
        name = key.removeprefix("transformer.")
        if not is_matmul(name):
            continue
        q = array(entry)
        scales = array(tensors[key + ".scales"]).astype(np.float64)
        if dtype == "int8":
            codes = q.astype(np.float64)
        else:
            rows, half = q.shape
            blocks = q.reshape(rows, half // 16, 16)
            codes = np.concatenate([blocks & 15, blocks >> 4], axis=2).reshape(rows, 2 * half)
            codes = codes.astype(np.float64) - 8
        widened = codes * np.repeat(scales, 32, axis=1)
        if name != "wte.weight":
            widened = widened.T       # stored [out][in]
        np.testing.assert_array_equal(widened.astype(np.float32), np.asarray(m.params[name]),
                                      err_msg=name)


@pytest.mark.parametrize("dtype", PACKED)
def test_packed_file_converts_on_load(saved, model, cfg, dtype):
    """An explicit dtype converts: float32 is the exact widening; another type is the
    widening stored in it."""
    m, d = saved[dtype]
    as_f32 = GPT2.from_safetensors(d, dtype="float32")
    assert_same_storage(m.to_dtype("float32"), as_f32)
    other = "int4" if dtype == "int8" else "int8"
    for target in (other, "bfloat16"):
        got = GPT2.from_safetensors(d, dtype=target)
        assert_same_storage(m.to_dtype("float32").to_dtype(target), got)
    # training works on the float32 conversion
    x = ids(cfg)
    as_f32.zero_grad()
    as_f32.forward(x, x)
    as_f32.backward()


def test_explicit_save_dtype_converts(model, cfg, tmp_path):
    """dtype= on save converts: a float32 model saved as int4 is what to_dtype("int4") saves;
    an int8 model saved as float32 is a plain F32 file of its widened weights."""
    model.save_safetensors(tmp_path / "q4", dtype="int4")
    assert_same_storage(model.to_dtype("int4"), GPT2.from_safetensors(tmp_path / "q4"))
    m8 = model.to_dtype("int8")
    m8.save_safetensors(tmp_path / "f32", dtype="float32")
    tensors, meta = read_st(tmp_path / "f32" / "model.safetensors")
    assert {t for t, _, _ in tensors.values()} == {"F32"} and meta["format"] == "pt"
    assert "quantization_config" not in json.loads((tmp_path / "f32" / "config.json").read_text())
    back = GPT2.from_safetensors(tmp_path / "f32")
    assert back.dtype == "float32"
    assert_same_storage(m8.to_dtype("float32"), back)
    with pytest.raises(ValueError, match="dtype must be None or one of"):
        model.save_safetensors(tmp_path / "x", dtype="int3")


@pytest.mark.parametrize("dtype", TYPES)
def test_the_safetensors_library_reads_every_storage(saved, dtype):
    """Every file is valid safetensors: the library reads each tensor as the test's reader
    does."""
    _, d = saved[dtype]
    if dtype == "bfloat16":   # NumPy has no bfloat16: read through torch, compare the bits
        torch = pytest.importorskip("torch")
        st = pytest.importorskip("safetensors.torch")
        theirs = {k: v.view(torch.int16).numpy().view(np.uint16)
                  for k, v in st.load_file(str(d / "model.safetensors")).items()}
    else:
        st = pytest.importorskip("safetensors.numpy")
        theirs = st.load_file(str(d / "model.safetensors"))
    ours, _ = read_st(d / "model.safetensors")
    assert set(theirs) == set(ours)
    for key, entry in ours.items():
        want = array(entry)
        np.testing.assert_array_equal(theirs[key].view(want.dtype), want, err_msg=key)


# ------------------------------------------------------------------ no copy

def _mapping_base(a: np.ndarray):
    base = a
    while isinstance(base, np.ndarray) and base.base is not None:
        base = base.base
    return base.obj if isinstance(base, memoryview) else base


@pytest.mark.parametrize("dtype", PACKED + ["bfloat16"])
def test_mapped_in_place(saved, dtype):
    """Every stored array of a loaded file's matmul weights is a view of the file's mapping;
    with mmap=False none is."""
    _, d = saved[dtype]
    m = GPT2.from_safetensors(d)
    c = GPT2.from_safetensors(d, mmap=False)
    for name, w in m.params.items():
        if not is_matmul(name):
            continue
        arrays = [w.data] + ([w.scales] if w.scales is not None else [])
        for a in arrays:
            assert isinstance(_mapping_base(a), mmap.mmap), name
        for a in [c.params[name].data] + ([c.params[name].scales] if w.scales is not None
                                          else []):
            assert not isinstance(_mapping_base(a), mmap.mmap), name


RSS_SCRIPT = textwrap.dedent("""
    import sys
    from gpt2s import GPT2

    def anon_kib():
        with open("/proc/self/status") as f:
            return next(int(l.split()[1]) for l in f if l.startswith("RssAnon:"))

    mmap = sys.argv[2] == "mmap"
    first = GPT2.from_safetensors(sys.argv[1], mmap=mmap)   # imports, first-use allocations
    before = anon_kib()
    m = GPT2.from_safetensors(sys.argv[1], mmap=mmap)
    print(anon_kib() - before)
""")


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs Linux /proc")
@pytest.mark.parametrize("dtype", PACKED)
def test_loading_a_packed_file_allocates_no_copy(model, tmp_path, dtype):
    """The process's anonymous memory (what a copy would take; the mapped file pages are not
    in it) grows by far less than the file when a packed file is loaded mapped, and by about
    the file when it is loaded with mmap=False: the measure sees copies."""
    cfg = GPT2Config(n_layer=2, n_head=4, n_embd=256, vocab_size=50257, n_ctx=64)
    GPT2.from_config(cfg, seed=1, dtype=dtype).save_safetensors(tmp_path)
    size_kib = (tmp_path / "model.safetensors").stat().st_size // 1024
    grown = {}
    for how in ("mmap", "copy"):
        r = subprocess.run([sys.executable, "-c", RSS_SCRIPT, str(tmp_path), how],
                           capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr
        grown[how] = int(r.stdout.split()[-1])
    assert grown["mmap"] < size_kib // 10, (grown, size_kib)
    assert grown["copy"] > size_kib * 8 // 10, (grown, size_kib)


# ------------------------------------------------------------------ hostile packed files

@pytest.fixture
def packed8(saved, tmp_path):
    """(tensors, metadata) of the saved int8 file, and where to write a changed copy."""
    _, d = saved["int8"]
    tensors, meta = read_st(d / "model.safetensors")
    return tensors, meta, tmp_path / "bad.safetensors"


SCALES = "transformer.h.1.mlp.c_fc.weight.scales"
DATA = "transformer.h.1.mlp.c_fc.weight"


def refused(path, *fragments, dtype=None):
    with pytest.raises(SafetensorsError) as e:
        GPT2.from_safetensors(path, dtype=dtype)
    msg = str(e.value)
    assert str(path) in msg, msg
    for f in fragments:
        assert f in msg, (f, msg)
    return msg


@pytest.mark.parametrize("bits,shown", [(0x7E00, "nan"), (0x7C00, "inf"), (0xFC00, "-inf")])
def test_non_finite_scale(packed8, bits, shown):
    tensors, meta, path = packed8
    dtype, shape, blob = tensors[SCALES]
    s = np.frombuffer(blob, np.uint16).copy()
    s[37] = bits
    tensors[SCALES] = (dtype, shape, s.tobytes())
    write_st(path, tensors, meta)
    refused(path, "h.1.mlp.c_fc.weight.scales", shown, "finite")
    refused(path, "h.1.mlp.c_fc.weight.scales", dtype="float32")   # also when converting


def test_wrong_block_count(packed8):
    tensors, meta, path = packed8
    dtype, (rows, nb), blob = tensors[SCALES]
    tensors[SCALES] = (dtype, [rows, nb + 1], blob + bytes(2 * rows))
    write_st(path, tensors, meta)
    refused(path, "h.1.mlp.c_fc.weight.scales", f"({rows}, {nb})", "blocks of 32")


def test_data_not_output_major(packed8):
    tensors, meta, path = packed8
    dtype, (rows, cols), blob = tensors[DATA]
    tensors[DATA] = (dtype, [cols, rows], blob)     # the Conv1D layout, not the stored one
    write_st(path, tensors, meta)
    refused(path, DATA, "shape", f"({rows}, {cols})")


def test_element_dtype_mismatch(packed8):
    tensors, meta, path = packed8
    _, shape, blob = tensors[DATA]
    tensors[DATA] = ("U8", shape, blob)
    write_st(path, tensors, meta)
    refused(path, DATA, "'U8'", "I8")


def test_scales_dtype_mismatch(packed8):
    tensors, meta, path = packed8
    _, shape, blob = tensors[SCALES]
    tensors[SCALES] = ("BF16", shape, blob)
    write_st(path, tensors, meta)
    refused(path, SCALES, "'BF16'", "F16")


def test_missing_scales(packed8):
    tensors, meta, path = packed8
    del tensors[SCALES]
    write_st(path, tensors, meta)
    refused(path, "missing tensor 'h.1.mlp.c_fc.weight.scales'")


def test_unexpected_tensor(packed8):
    tensors, meta, path = packed8
    tensors["transformer.ln_f.weight.scales"] = ("F16", [2], bytes(4))
    write_st(path, tensors, meta)
    refused(path, "ln_f.weight.scales", "unexpected")


def test_truncated_blocks(saved, tmp_path):
    _, d = saved["int4"]
    raw = (d / "model.safetensors").read_bytes()
    tensors, _ = read_st(d / "model.safetensors")
    last = list(tensors)[-1]
    path = tmp_path / "cut.safetensors"
    path.write_bytes(raw[:-100])
    refused(path, "truncated", last)


def test_int8_code_minus_128_is_a_weight(packed8, saved, cfg):
    """Every int8 byte is a weight, -128 included: a file holding it computes what its
    widening (scale x -128) computes."""
    tensors, meta, path = packed8
    dtype, shape, blob = tensors[DATA]
    q = np.frombuffer(blob, np.int8).copy()
    q[::7] = -128
    tensors[DATA] = (dtype, shape, q.tobytes())
    write_st(path, tensors, meta)
    m = GPT2.from_safetensors(path)
    f = GPT2.from_safetensors(path, dtype="float32")
    assert float(np.asarray(m.params["h.1.mlp.c_fc.weight"]).T.reshape(-1)[0]) == \
        float(np.float16(array(tensors[SCALES])[0, 0]).astype(np.float32) * -128)
    x = ids(cfg, seed=3)
    a, b = m.forward(x)[0], f.forward(x)[0]
    assert np.linalg.norm(a - b) <= 1e-5 * np.linalg.norm(b)


# ------------------------------------------------------------------ files this gpt2s cannot read

@pytest.mark.parametrize("key,value,fragments", [
    ("version", 2, ["packing version 2", "reads version 1"]),
    ("weight_type", "int3", ["'int3'", "int8, int4"]),
    ("block", 64, ["block=64", "block=32"]),
    ("layout", "input-major", ["layout='input-major'", "'output-major'"]),
    ("codes", "k-quants", ["codes='k-quants'"]),
    ("extra", 1, ["extra=1"]),
])
def test_unreadable_packing_is_refused(packed8, key, value, fragments):
    tensors, meta, path = packed8
    packing = json.loads(meta["gpt2s_packing"])
    packing[key] = value
    write_st(path, tensors, {**meta, "gpt2s_packing": json.dumps(packing)})
    for dtype in (None, "float32"):
        refused(path, *fragments, dtype=dtype)


@pytest.mark.parametrize("change,fragments", [
    ({"gpt2s_packing": None}, ["without its 'gpt2s_packing'"]),
    ({"gpt2s_packing": "[1, 2]"}, ["not a JSON object"]),
    ({"format": "pt"}, ["format is 'pt'"]),
    ({"gpt2s_storage": "int4"}, ["gpt2s_storage='int4'", "'int8'"]),
])
def test_broken_packed_metadata(packed8, change, fragments):
    tensors, meta, path = packed8
    meta = {k: v for k, v in {**meta, **change}.items() if v is not None}
    write_st(path, tensors, meta)
    refused(path, *fragments)


def test_unknown_storage_in_a_plain_file(saved, tmp_path):
    _, d = saved["bfloat16"]
    tensors, meta = read_st(d / "model.safetensors")
    for storage, fragment in (("float8", "does not know"), ("int8", "not a packed gpt2s file")):
        path = tmp_path / f"{storage}.safetensors"
        write_st(path, tensors, {**meta, "gpt2s_storage": storage})
        refused(path, fragment)


def test_config_json_must_agree_with_the_file(saved, tmp_path):
    """config.json's quantization_config names the packed type of model.safetensors; another
    tool's quantization_config is refused by name."""
    _, d = saved["int8"]
    for name in ("model.safetensors", "config.json"):
        (tmp_path / name).write_bytes((d / name).read_bytes())
    cfg_json = json.loads((tmp_path / "config.json").read_text())
    cfg_json["quantization_config"]["weight_type"] = "int4"
    (tmp_path / "config.json").write_text(json.dumps(cfg_json))
    refused(tmp_path, "quantization_config", "'int4'", "is packed int8")
    cfg_json["quantization_config"] = {"quant_method": "bitsandbytes", "load_in_8bit": True}
    (tmp_path / "config.json").write_text(json.dumps(cfg_json))
    with pytest.raises(ValueError, match="quantization_config.*bitsandbytes"):
        GPT2.from_safetensors(tmp_path)
    # a gpt2s quantization_config beside a float32 file
    _, d32 = saved["float32"]
    (tmp_path / "model.safetensors").write_bytes((d32 / "model.safetensors").read_bytes())
    cfg_json["quantization_config"] = {"quant_method": "gpt2s", "weight_type": "int8"}
    (tmp_path / "config.json").write_text(json.dumps(cfg_json))
    refused(tmp_path, "is not a packed file", "float32")


def test_transformers_refuses_packed_and_loads_bfloat16(saved, cfg):
    """transformers (the other reader at hand) refuses a packed file and reads the bfloat16
    storage's BF16 + F32 file as the model's weights."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    _, d = saved["int8"]
    with pytest.raises(Exception):
        transformers.GPT2LMHeadModel.from_pretrained(d)
    m, d = saved["bfloat16"]
    hf = transformers.GPT2LMHeadModel.from_pretrained(d, torch_dtype=torch.float32)
    state = hf.state_dict()
    for name, w in m.params.items():
        got = state[name if name == "lm_head.weight" else "transformer." + name]
        np.testing.assert_array_equal(got.numpy(), np.asarray(w), err_msg=name)


# ------------------------------------------------------------------ python -m gpt2s.quantize

def quantize(*args, cwd=None):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONIOENCODING="utf-8")
    return subprocess.run([sys.executable, "-m", "gpt2s.quantize", *map(str, args)],
                          capture_output=True, text=True, env=env, cwd=cwd, timeout=300)


def test_quantize_cli_end_to_end(tmp_path):
    model = GPT2.from_config(GPT2Config.preset("tiny", n_ctx=32), seed=5)   # GPT-2's vocabulary
    src = model.save_safetensors(tmp_path / "src")
    out = tmp_path / "sub" / "q4"
    r = quantize(src, out, "--dtype", "int4")
    assert r.returncode == 0, r.stderr
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    assert "int4" in r.stdout and "parameters" in r.stderr      # the summary, the progress
    assert sorted(p.name for p in out.parent.iterdir()) == ["q4"]   # no temporary left
    q4 = GPT2.from_pretrained(out)
    assert q4.dtype == "int4" and q4.mapped
    assert_same_storage(model.to_dtype("int4"), q4)
    # generate on it: its own storage by default, the same greedy text as int4 from float32
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONIOENCODING="utf-8")
    texts = []
    for extra in ([], ["--dtype", "int4"]):
        g = subprocess.run([sys.executable, "-m", "gpt2s.generate", "--model",
                            str(out if not extra else src), "hi", "-n", "8",
                            "--temperature", "0", "-v", *extra],
                           capture_output=True, text=True, env=env, timeout=300)
        assert g.returncode == 0, g.stderr
        assert "dtype='int4'" in g.stderr
        texts.append(g.stdout)
    assert texts[0] == texts[1]
    # an existing OUT: refused, then replaced with --force; a packed IN converts back
    r = quantize(src, out, "--dtype", "int8")
    assert r.returncode == 2 and "exists" in r.stderr and "--force" in r.stderr
    assert r.stderr.count("\n") == 1 and "Traceback" not in r.stderr
    r = quantize(out, out, "--dtype", "float32", "--force", "-q")
    assert r.returncode == 0, r.stderr
    assert r.stderr == ""
    assert_same_storage(q4.to_dtype("float32"), GPT2.from_pretrained(out))
    assert sorted(p.name for p in out.parent.iterdir()) == ["q4"]


@pytest.mark.parametrize("args,fragment", [
    (["no/such/model", "OUT", "--dtype", "int8"], "no/such/model: no such file"),
    (["SRC", "OUT", "--dtype", "int5"], "invalid choice: 'int5'"),
    (["SRC", "OUT"], "--dtype"),
    (["SRC", "OUT", "--dtype", "int8", "--threads", "0"], "--threads"),
])
def test_quantize_cli_errors(saved, tmp_path, args, fragment):
    _, src = saved["float32"]
    args = [str(src) if a == "SRC" else str(tmp_path / "out") if a == "OUT" else a
            for a in args]
    r = quantize(*args, cwd=tmp_path)
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert fragment in r.stderr and r.stderr.count("\n") == 1, r.stderr
    assert "Traceback" not in r.stderr and not (tmp_path / "out").exists()


def test_quantize_cli_refuses_a_model_the_type_cannot_hold(tmp_path):
    """n_embd not a multiple of the block: one line naming the tensor, nothing written."""
    GPT2.from_config(GPT2Config(n_layer=1, n_head=2, n_embd=48, vocab_size=64, n_ctx=16),
                     seed=0).save_safetensors(tmp_path / "src")
    r = quantize(tmp_path / "src", tmp_path / "out", "--dtype", "int8", "-q")
    assert r.returncode == 2, r.stderr
    assert "multiple of 32" in r.stderr and r.stderr.count("\n") == 1, r.stderr
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------ random mutations

def _mutations(tensors: dict, rng):
    """One random structural change of a packed file's entries: a dimension off by one or
    swapped, another dtype, two tensors' names swapped, a tensor dropped, data or scale
    bytes overwritten."""
    keys = list(tensors)
    key = keys[rng.integers(len(keys))]
    dtype, shape, blob = tensors[key]
    kind = rng.integers(6)
    out = dict(tensors)
    if kind == 0 and shape:
        shape = list(shape)
        i = rng.integers(len(shape))
        shape[i] = max(0, shape[i] + int(rng.choice([-1, 1])))
        nbytes = np.dtype(NP[dtype]).itemsize * int(np.prod(shape))
        out[key] = (dtype, shape, (blob + bytes(nbytes))[:nbytes])
    elif kind == 1:
        out[key] = (str(rng.choice(["I8", "U8", "F16", "BF16", "F32", "I16"])), shape, blob)
        size = {"I8": 1, "U8": 1, "F16": 2, "BF16": 2, "F32": 4, "I16": 2}[out[key][0]]
        if len(blob) % size:
            return None
        out[key] = (out[key][0], [len(blob) // size], blob)
    elif kind == 2:
        other = keys[rng.integers(len(keys))]
        out[key], out[other] = tensors[other], tensors[key]
    elif kind == 3:
        del out[key]
    elif kind == 4 and len(shape) == 2:
        out[key] = (dtype, shape[::-1], blob)
    elif blob:
        b = bytearray(blob)
        for _ in range(int(rng.integers(1, 8))):
            b[rng.integers(len(b))] = int(rng.integers(256))
        out[key] = (dtype, shape, bytes(b))
    return out


@pytest.mark.parametrize("dtype", PACKED)
def test_random_mutations_load_or_refuse(saved, cfg, tmp_path, dtype):
    """200 random changes of a packed file: each loads (and runs a forward) or raises
    SafetensorsError; a change of data bytes alone never makes the file fail unless it puts
    a NaN or an infinity in a scale."""
    _, d = saved[dtype]
    tensors, meta = read_st(d / "model.safetensors")
    rng = np.random.default_rng(2026 + len(dtype))
    path = tmp_path / "m.safetensors"
    x = ids(cfg, T=4)
    outcomes = {"loaded": 0, "refused": 0}
    for case in range(200):
        changed = _mutations(tensors, rng)
        if changed is None:
            continue
        write_st(path, changed, meta)
        try:
            m = GPT2.from_safetensors(path, dtype=str(rng.choice([dtype, "float32"])))
        except SafetensorsError as e:
            outcomes["refused"] += 1
            same_layout = all(k in changed and changed[k][:2] == tensors[k][:2]
                              for k in tensors) and len(changed) == len(tensors)
            if same_layout:   # only bytes changed: refused only for a non-finite scale
                assert "finite" in str(e), (case, str(e))
            continue
        outcomes["loaded"] += 1
        m.forward(x)
    assert outcomes["loaded"] and outcomes["refused"], outcomes
