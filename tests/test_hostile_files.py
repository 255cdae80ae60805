"""A model file carries its config, and hostile model files fail fast and cleanly (issue 10,
items 4 and 5).

Every probe file is written here by hand (an 8-byte header length, a JSON header, raw bytes),
independently of gpt2s.weights.  A hostile file must raise SafetensorsError naming the file and
the tensor, in well under a second, having allocated (tracemalloc: NumPy's buffers included)
no more than the file's size.  The random version of these probes is test_fuzz_loading.py.
"""

from __future__ import annotations

import json
import os
import socket
import struct
import sys
import threading
import tracemalloc
from pathlib import Path

import numpy as np
import pytest

import ref
from conftest import param_shapes
from gpt2s import GPT2, GPT2Config, SafetensorsError

HANG_S = 60  # a refusal still running after this long is a hang (no speed is asserted)

needs_posix = pytest.mark.skipif(sys.platform == "win32", reason="FIFOs and sockets are POSIX")


# ------------------------------------------------------------------------------------------
# hand-written safetensors files


def hf_config_dict(cfg: GPT2Config) -> dict:
    """config.json keys (Hugging Face's names), written out here."""
    return {"model_type": "gpt2", "n_layer": cfg.n_layer, "n_head": cfg.n_head,
            "n_embd": cfg.n_embd, "n_positions": cfg.n_ctx, "vocab_size": cfg.vocab_size,
            "layer_norm_epsilon": cfg.layer_norm_epsilon}


def pack(header: dict, data: bytes) -> bytes:
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw + data


def tensors_file(tensors: dict, metadata: dict | None = None) -> tuple[dict, bytes]:
    """(header, data) of float32 tensors laid out one after another."""
    header, chunks, offset = {}, [], 0
    for name, a in tensors.items():
        b = np.ascontiguousarray(a, "<f4").tobytes()
        header[name] = {"dtype": "F32", "shape": list(np.shape(a)),
                        "data_offsets": [offset, offset + len(b)]}
        chunks.append(b)
        offset += len(b)
    if metadata is not None:
        header["__metadata__"] = metadata
    return header, b"".join(chunks)


CFG = GPT2Config(n_layer=2, n_head=4, n_embd=64, vocab_size=50, n_ctx=16)


def random_params(cfg: GPT2Config, seed=0) -> dict:
    rng = np.random.default_rng(seed)
    return {k: (rng.standard_normal(s) * 0.1).astype(np.float32)
            for k, s in param_shapes(cfg.n_layer, cfg.n_embd, cfg.vocab_size, cfg.n_ctx).items()}


def base(with_config=True, prefix="transformer.") -> tuple[dict, bytes]:
    """(header, data) of a valid small model; its config in __metadata__ when with_config."""
    md = {"format": "pt"}
    if with_config:
        md["gpt2s_config"] = json.dumps(hf_config_dict(CFG))
    params = random_params(CFG)
    return tensors_file({prefix + k: v for k, v in params.items()}, md)


def append_tensor(header: dict, data: bytes, name: str, a) -> tuple[dict, bytes]:
    """header and data with one more F32 tensor at the end of the data section."""
    header = json.loads(json.dumps(header))
    b = np.ascontiguousarray(a, "<f4").tobytes()
    header[name] = {"dtype": "F32", "shape": list(np.shape(a)),
                    "data_offsets": [len(data), len(data) + len(b)]}
    return header, data + b


def load_hostile(path, *, source=None):
    """GPT2.from_safetensors(source or path) must raise SafetensorsError naming path, with no
    allocation beyond a few times the file's size (the work a refusal may do is bounded by
    what it may allocate, not timed: a loaded machine makes any time limit flaky); returns the
    message."""
    size = os.stat(path).st_size if os.path.isfile(path) else 0
    result = {}

    def refuse():
        tracemalloc.start()
        try:
            GPT2.from_safetensors(source or path)
        except BaseException as e:  # noqa: BLE001 - checked below
            result["e"] = e
        finally:
            result["peak"] = tracemalloc.get_traced_memory()[1]
            tracemalloc.stop()

    t = threading.Thread(target=refuse, daemon=True)
    t.start()
    t.join(HANG_S)
    assert not t.is_alive(), f"{path}: from_safetensors still running after {HANG_S} s"
    e, peak = result.get("e"), result["peak"]
    assert isinstance(e, SafetensorsError), repr(e)
    msg = str(e)
    assert str(path) in msg, msg
    assert len(msg) < len(str(path)) + 1000, f"a {len(msg)}-character message: {msg[:300]}"
    # nothing of the size the header claims: the parsed JSON header costs up to ~3x its own
    # size in Python objects (a list of a million small ints is 8 MB of pointers)
    assert peak < 4 * size + (1 << 20), f"{peak} bytes allocated for a {size}-byte file: {msg}"
    return msg


# ------------------------------------------------------------------------------------------
# item 4: a model file round-trips its config


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_single_file_roundtrip_4_heads(tmp_path, dtype, make_params):
    """A 4-head model with n_embd 128 (inference from shapes would say 2 heads) and a
    non-default epsilon, saved as one file: the config and the logits come back identical,
    and the logits match the float64 reference with 4 heads (they do not with 2)."""
    cfg = GPT2Config(n_layer=2, n_head=4, n_embd=128, vocab_size=90, n_ctx=24,
                     layer_norm_epsilon=1e-3)
    m = GPT2(cfg)
    for k, v in make_params(cfg, seed=5).items():
        m.params[k][...] = v
    path = tmp_path / "x.safetensors"
    m.save_safetensors(path, dtype=dtype)
    assert sorted(os.listdir(tmp_path)) == ["x.safetensors"]
    m2 = GPT2.from_safetensors(path)
    assert m2.config == cfg
    idx = np.random.default_rng(0).integers(0, cfg.vocab_size, (2, 20))
    logits2, _ = m2.forward(idx)
    if dtype == "float32":
        logits, _ = m.forward(idx)
        assert np.array_equal(logits2, logits)
    ref_logits = ref.forward(m2.params, idx, n_head=4, eps=1e-3)[0]
    assert ref.rel_err(logits2, ref_logits) < 1e-5
    assert ref.rel_err(logits2, ref.forward(m2.params, idx, n_head=2, eps=1e-3)[0]) > 1e-3


def test_single_file_roundtrip_variant(tmp_path):
    """Every config field goes through to_hf_dict/from_hf_dict, so the variant fields (an
    untied head, another activation, n_inner) round-trip in one file too."""
    cfg = GPT2Config(n_layer=2, n_head=4, n_embd=128, vocab_size=90, n_ctx=24, n_inner=200,
                     activation_function="relu", tie_word_embeddings=False)
    m = GPT2.from_config(cfg, seed=1)
    m.save_safetensors(tmp_path / "u.safetensors")
    m2 = GPT2.from_safetensors(tmp_path / "u.safetensors")
    assert m2.config == cfg
    idx = np.arange(10)[None]
    assert np.array_equal(m.forward(idx)[0], m2.forward(idx)[0])


def test_config_is_in_the_metadata(tmp_path):
    """Read back with the safetensors library: __metadata__ holds config.json's keys as a
    JSON string (values there must be strings), beside format=pt for transformers."""
    safe_open = pytest.importorskip("safetensors").safe_open
    cfg = GPT2Config(n_layer=1, n_head=4, n_embd=128, vocab_size=30, n_ctx=8)
    path = tmp_path / "x.safetensors"
    GPT2.from_config(cfg).save_safetensors(path)
    with safe_open(str(path), "np") as f:
        md = f.metadata()
    assert md["format"] == "pt"
    d = json.loads(md["gpt2s_config"])
    assert (d["n_layer"], d["n_head"], d["n_embd"], d["vocab_size"], d["n_positions"]) == \
        (1, 4, 128, 30, 8)


def test_config_json_wins_for_a_directory(tmp_path):
    """A directory's config.json is used even though model.safetensors carries a config."""
    cfg = GPT2Config(n_layer=1, n_head=4, n_embd=128, vocab_size=30, n_ctx=8)
    GPT2.from_config(cfg).save_safetensors(tmp_path / "d")
    (tmp_path / "d" / "config.json").write_text(json.dumps(
        hf_config_dict(GPT2Config(n_layer=1, n_head=2, n_embd=128, vocab_size=30, n_ctx=8))))
    assert GPT2.from_safetensors(tmp_path / "d").config.n_head == 2
    assert GPT2.from_safetensors(tmp_path / "d" / "model.safetensors").config.n_head == 2
    # the same file elsewhere uses its own metadata
    os.replace(tmp_path / "d" / "model.safetensors", tmp_path / "m.safetensors")
    assert GPT2.from_safetensors(tmp_path / "m.safetensors").config.n_head == 4


def test_file_without_config_is_inferred(tmp_path):
    """No config anywhere: n_head = n_embd / 64 from the shapes (documented)."""
    path = tmp_path / "m.safetensors"
    path.write_bytes(pack(*base(with_config=False)))
    assert GPT2.from_safetensors(path).config == GPT2Config(
        n_layer=2, n_head=1, n_embd=64, vocab_size=50, n_ctx=16)


@pytest.mark.parametrize("value,words", [
    ("{not json", ["not JSON"]),
    ("[1, 2]", ["not a JSON object"]),
    (json.dumps({"n_layer": 2, "n_head": 4}), ["n_embd"]),
    (json.dumps({**hf_config_dict(CFG), "n_head": 3}), ["divisible"]),
    (json.dumps({**hf_config_dict(CFG), "layer_norm_epsilon": "x"}), ["layer_norm_epsilon"]),
    (json.dumps({**hf_config_dict(CFG), "n_layer": 3}), ["missing tensor", "h.2."]),
    (json.dumps({**hf_config_dict(CFG), "n_layer": 1}), ["h.1.", "n_layer=1"]),
    (json.dumps({**hf_config_dict(CFG), "n_layer": 10**9}), ["n_layer", "1024"]),
    (json.dumps({**hf_config_dict(CFG), "vocab_size": 1 << 24}), ["parameters", "bytes"]),
    ("[" * 100000 + "]" * 100000, ["not JSON"]),
], ids=["not-json", "list", "missing-keys", "n_head-3", "eps-str", "n_layer-3", "n_layer-1",
        "n_layer-1e9", "vocab-2^24", "deep"])
def test_bad_config_in_metadata(tmp_path, value, words):
    header, data = base()
    header["__metadata__"]["gpt2s_config"] = value
    path = tmp_path / "m.safetensors"
    path.write_bytes(pack(header, data))
    msg = load_hostile(path)
    assert all(w in msg for w in words), msg
    assert "gpt2s_config" in msg or "tensor" in msg or "parameters" in msg, msg


@pytest.mark.parametrize("md", [["a"], {"format": 1}, {"gpt2s_config": {"n_layer": 2}}])
def test_corrupt_metadata(tmp_path, md):
    header, data = base()
    header["__metadata__"] = md
    path = tmp_path / "m.safetensors"
    path.write_bytes(pack(header, data))
    assert "__metadata__" in load_hostile(path)


# ------------------------------------------------------------------------------------------
# item 5: the probes and their relatives


def write(tmp_path, header, data, name="m.safetensors") -> Path:
    path = tmp_path / name
    path.write_bytes(pack(header, data))
    return path


@pytest.mark.parametrize("with_config", [True, False], ids=["config", "inferred"])
def test_stray_huge_block_index(tmp_path, with_config):
    """One extra key h.999999999.ln_1.weight with bytes of its own (once: minutes and 5.7 GB,
    then a bare MemoryError)."""
    path = write(tmp_path, *append_tensor(*base(with_config), "h.999999999.ln_1.weight",
                                          np.ones(64)))
    msg = load_hostile(path)
    assert "h.999999999.ln_1.weight" in msg


def test_block_index_of_thousands_of_digits(tmp_path):
    """int() of a 5000-digit block index would raise a bare ValueError."""
    path = write(tmp_path, *append_tensor(*base(False), "h." + "9" * 5000 + ".ln_1.weight",
                                          np.ones(64)))
    assert "h.999999999" in load_hostile(path)


@pytest.mark.parametrize("where", ["name", "shape", "dtype", "offsets"])
def test_megabyte_values_are_not_echoed(tmp_path, where):
    """A name, shape, dtype or offset list of a megabyte: the message quotes a short prefix."""
    header, data = base()
    if where == "name":
        header, data = append_tensor(header, data, "h.0." + "x" * (1 << 20), np.ones(4))
    else:
        entry = header["transformer.wte.weight"]
        key = {"shape": "shape", "dtype": "dtype", "offsets": "data_offsets"}[where]
        entry[key] = "F" * (1 << 20) if where == "dtype" else [7] * (1 << 18)
    load_hostile(write(tmp_path, header, data))


def test_block_indices_not_dense(tmp_path):
    header, data = base(False)
    header = {k.replace(".h.1.", ".h.7."): v for k, v in header.items()}
    msg = load_hostile(write(tmp_path, header, data))
    assert "h.1." in msg and "h.7." in msg


@pytest.mark.parametrize("shape", [[2**31, 64], [2**58, 64], [2**64, 2**64], [0, 2**70],
                                   [2**60] * 20000, [-1, 64], [50, 64.0]])
@pytest.mark.parametrize("with_config", [True, False], ids=["config", "inferred"])
def test_absurd_shape(tmp_path, shape, with_config):
    """[2**31, 64] once raised MemoryError (512 GiB, file not named), [2**58, 64] a reshape
    error.  Sizes are compared in Python integers before NumPy sees the shape."""
    header, data = base(with_config)
    header["transformer.wte.weight"]["shape"] = shape
    msg = load_hostile(write(tmp_path, header, data))
    assert "wte.weight" in msg


def test_absurd_shape_of_an_ignored_buffer(tmp_path):
    """h.N.attn.bias is never read, but its size is still checked against its bytes."""
    header, data = append_tensor(*base(False), "h.0.attn.bias", np.ones((1, 1, 4, 4)))
    header["h.0.attn.bias"]["shape"] = [1, 1, 2**40, 2**40]
    assert "h.0.attn.bias" in load_hostile(write(tmp_path, header, data))


def test_lm_head_aliasing_wte(tmp_path):
    """Overlapping data_offsets (once loaded without complaint): lm_head.weight over the very
    bytes of wte.weight, the data section otherwise tiled exactly."""
    header, data = base()
    header["lm_head.weight"] = dict(header["transformer.wte.weight"])
    msg = load_hostile(write(tmp_path, header, data))
    assert "overlaps" in msg and "lm_head.weight" in msg and "wte.weight" in msg


def test_aliasing_cannot_amplify(tmp_path):
    """A 64-layer n_embd=1024 config (~3 GB of float32) whose every block tensor of a kind
    aliases the same few bytes: refused before anything of the model's size is allocated."""
    cfg = GPT2Config(n_layer=64, n_head=16, n_embd=1024, vocab_size=64, n_ctx=16)
    shapes = param_shapes(cfg.n_layer, cfg.n_embd, cfg.vocab_size, cfg.n_ctx)
    header, offset, spans = {}, 0, {}
    for name, shape in shapes.items():
        kind = name.split(".", 2)[-1] if name.startswith("h.") else name
        if kind not in spans:
            n = int(np.prod(shape)) * 2
            spans[kind] = [offset, offset + n]
            offset += n
        header[name] = {"dtype": "F16", "shape": list(shape), "data_offsets": spans[kind]}
    header["__metadata__"] = {"gpt2s_config": json.dumps(hf_config_dict(cfg))}
    path = tmp_path / "m.safetensors"
    path.write_bytes(pack(header, b"\0" * offset))
    assert "overlaps" in load_hostile(path)


@pytest.mark.parametrize("change,words", [
    (lambda h, d: (h, d + b"\0" * 8), ["trailing"]),
    (lambda h, d: (h, d[:-4]), ["truncated", "ln_f.bias"]),
    (lambda h, d: (h, b"\0" * 16 + d), ["belong to no tensor"]),
])
def test_data_section_not_tiled(tmp_path, change, words):
    """The tensors' byte ranges must tile the data section exactly, as the safetensors format
    (and library) requires: no trailing bytes, no holes, nothing past the end."""
    header, data = base()
    header, data = change(header, data)
    msg = load_hostile(write(tmp_path, header, data))
    assert all(w in msg for w in words), msg


def test_size_disagrees_with_shape(tmp_path):
    header, data = base()
    header["transformer.h.1.ln_2.bias"]["dtype"] = "F16"   # 64 F16 need 128 of its 256 bytes
    msg = load_hostile(write(tmp_path, header, data))
    assert "h.1.ln_2.bias" in msg and "128" in msg and "256" in msg


@pytest.mark.parametrize("length", [2**64 - 1, 2**63, 10**6, 100_000_001, 0])
def test_header_length_past_eof(tmp_path, length):
    header, data = base()
    raw = pack(header, data)
    path = tmp_path / "m.safetensors"
    path.write_bytes(struct.pack("<Q", length) + raw[8:])
    load_hostile(path)


@pytest.mark.parametrize("make_raw,words", [
    (lambda: b'{"a": 1, "a": 2}', ["twice"]),
    (lambda: b'{"wte.weight": {"dtype": "F32", "dtype": "F16", "shape": [], '
             b'"data_offsets": [0, 0]}}', ["twice"]),
    (lambda: b"[" * 50000 + b"]" * 50000, ["not JSON"]),
    (lambda: b'{"x": ' + b"9" * 5000 + b"}", ["not JSON"]),
    (lambda: b'{"x": {"dtype": "F32", "shape": [1], "data_offsets": [0, 1e400]}}',
     ["data offsets"]),
])
def test_hostile_json(tmp_path, make_raw, words):
    raw = make_raw()
    raw += b" " * (-len(raw) % 8)
    path = tmp_path / "m.safetensors"
    path.write_bytes(struct.pack("<Q", len(raw)) + raw)
    msg = load_hostile(path)
    assert all(w in msg for w in words), msg


def test_config_json_describing_a_bigger_model(tmp_path):
    """A directory whose config.json asks for 1000 layers of n_embd 4096 beside a small file:
    refused from the sizes before allocating ~800 GB."""
    d = tmp_path / "d"
    d.mkdir()
    write(d, *base(False), name="model.safetensors")
    (d / "config.json").write_text(json.dumps(hf_config_dict(GPT2Config(
        n_layer=1000, n_head=64, n_embd=4096, vocab_size=50, n_ctx=16))))
    msg = load_hostile(d / "model.safetensors", source=d)
    assert "parameters" in msg


@pytest.mark.parametrize("text", ["[" * 100000, json.dumps({"n_layer": "2"}),
                                  " " * (17 << 20)], ids=["deep", "types", "17MB"])
def test_hostile_config_json(tmp_path, text):
    """config.json errors stay ValueError naming config.json (as established)."""
    write(tmp_path, *base(False), name="model.safetensors")
    (tmp_path / "config.json").write_text(text)
    with pytest.raises(ValueError) as e:
        GPT2.from_safetensors(tmp_path)
    assert "config.json" in str(e.value)


# ------------------------------------------------------------------------------------------
# not a regular file


def _refused_without_blocking(path, source=None, match="FIFO"):
    """from_safetensors in a thread: it must refuse at once; if it hung in open() we unblock it
    by opening the FIFO for writing, and fail."""
    result = {}

    def run():
        try:
            GPT2.from_safetensors(source or path)
        except BaseException as e:  # noqa: BLE001 - reported below
            result["e"] = e

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(HANG_S)
    if t.is_alive():
        fd = os.open(path, os.O_WRONLY | os.O_NONBLOCK)
        os.close(fd)
        t.join(5)
        pytest.fail(f"{path}: from_safetensors blocked on a FIFO")
    e = result.get("e")
    assert isinstance(e, SafetensorsError), repr(e)
    assert str(path) in str(e) and match in str(e)


@needs_posix
def test_fifo_is_refused(tmp_path):
    """A FIFO as the model path once hung in open()."""
    fifo = tmp_path / "m.safetensors"
    os.mkfifo(fifo)
    _refused_without_blocking(fifo)


@needs_posix
def test_fifo_inside_a_model_directory(tmp_path):
    os.mkfifo(tmp_path / "model.safetensors")
    _refused_without_blocking(tmp_path / "model.safetensors", source=tmp_path)


@needs_posix
@pytest.mark.parametrize("dev", ["/dev/zero", "/dev/null", "/dev/urandom"])
def test_device_is_refused(dev):
    if not os.path.exists(dev):
        pytest.skip(f"no {dev}")
    with pytest.raises(SafetensorsError) as e:
        GPT2.from_safetensors(dev)
    assert dev in str(e.value) and "device" in str(e.value)


@needs_posix
def test_socket_is_refused(tmp_path):
    path = tmp_path / "s.safetensors"
    if len(str(path)) > 100:
        pytest.skip("tmp path too long for a unix socket")
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.bind(str(path))
        with pytest.raises(SafetensorsError) as e:
            GPT2.from_safetensors(path)
        assert str(path) in str(e.value) and "socket" in str(e.value)
    finally:
        s.close()


def test_directory_without_model(tmp_path):
    (tmp_path / "model.safetensors").mkdir()   # a directory where the file should be
    with pytest.raises(SafetensorsError) as e:
        GPT2.from_safetensors(tmp_path)
    assert "directory" in str(e.value)
    with pytest.raises(FileNotFoundError):
        GPT2.from_safetensors(tmp_path / "model.safetensors" / "x")


# ------------------------------------------------------------------------------------------
# the valid path stays zero-copy


@pytest.mark.parametrize("st_dtype", ["F32", "F16", "BF16"])
def test_loading_allocates_only_the_parameter_buffer(tmp_path, st_dtype):
    """Each tensor goes from the memory-mapped file straight into its view of the one float32
    buffer: the peak of traced allocations (NumPy's included; the mapping is not) is that
    buffer plus a little, not two copies of the model."""
    cfg = GPT2Config(n_layer=2, n_head=4, n_embd=256, vocab_size=1000, n_ctx=64)
    m = GPT2.from_config(cfg, seed=3)
    path = tmp_path / "m.safetensors"
    m.save_safetensors(path, dtype={"F32": "float32", "F16": "float16",
                                    "BF16": "bfloat16"}[st_dtype])
    tracemalloc.start()
    try:
        m2 = GPT2.from_safetensors(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    buffer = m2.store.buffer.nbytes
    assert buffer > 7_000_000
    assert peak < buffer + 512 * 1024, (peak, buffer)
    if st_dtype == "F32":
        for k in m.params:
            assert np.array_equal(m.params[k], m2.params[k]), k


# ------------------------------------------------------------------------------------------
# config bounds


@pytest.mark.parametrize("kw", [dict(n_layer=1025), dict(n_embd=65536 * 2, n_head=2),
                                dict(n_ctx=(1 << 20) + 1), dict(vocab_size=(1 << 24) + 1),
                                dict(layer_norm_epsilon="1e-5"),
                                dict(layer_norm_epsilon=float("inf"))])
def test_config_bounds(kw):
    with pytest.raises(ValueError) as e:
        GPT2Config(**kw)
    assert next(iter(kw)) in str(e.value)


def test_config_bounds_admit_the_gpt2_family():
    for name in GPT2Config.presets():
        GPT2Config.preset(name)
    GPT2Config(n_layer=1024, n_head=512, n_embd=65536, n_ctx=1 << 20, vocab_size=1 << 24)
