"""GPT-NeoX checkpoint loading with dtype=: every tensor is read a few rows at a time and
compressed into its place (no float32 copy of a matmul weight, the file's pages dropped as
they go), and the result is the model `to_dtype` makes from the float32 load, bit for bit;
the checkpoint's tokenizer.json is parsed on first use of ``m.tokenizer``."""

from __future__ import annotations

import json
import struct
import tracemalloc

import numpy as np
import pytest

import gpt2s
from gpt2s import GPTNeoXForCausalLM
from gpt2s import weights as _weights

from llama_ckpt import make_tokenizer
from neox_ckpt import pythia_config, write_random_neox

DTYPES = ("float32", "bfloat16", "int8", "int4")


def _file_tensors(path):
    """{name: float32 array} read straight from a safetensors file (F32 or BF16), not by
    gpt2s."""
    raw = path.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8:8 + n])
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        a, b = info["data_offsets"]
        data = raw[8 + n + a:8 + n + b]
        if info["dtype"] == "BF16":
            x = (np.frombuffer(data, np.uint16).astype(np.uint32) << 16).view(np.float32)
        else:
            x = np.frombuffer(data, np.float32)
        out[name] = x.reshape(info["shape"])
    return out


def _stored(w):
    """The stored arrays of a parameter (a float32 array, or a compressed weight's data and
    scales)."""
    if isinstance(w, np.ndarray):
        return [w]
    return [w.data] + ([w.scales] if w.scales is not None else [])


@pytest.fixture(params=["F32", "BF16"])
def ckpt(tmp_path, request):
    # 300 x 64 embeddings: several row chunks at the small chunk size the tests set
    cfg = pythia_config(64, 2, 4, vocab=300, use_parallel_residual=False)
    write_random_neox(tmp_path / "m", cfg, seed=3, dtype=request.param)
    return tmp_path / "m"


@pytest.mark.parametrize("dtype", DTYPES)
def test_loaded_dtype_is_to_dtype_of_the_float32_load(ckpt, dtype, monkeypatch):
    # a chunk of 7 x 64 elements: the embeddings (300 rows) end in a partial chunk
    monkeypatch.setattr(_weights, "CHUNK_ELEMENTS", 7 * 64)
    full = GPTNeoXForCausalLM.from_safetensors(ckpt)
    raw = _file_tensors(ckpt / "model.safetensors")
    for name, p in full.params.items():   # the float32 load is the file's values
        assert np.array_equal(p, raw[name]), name
    want = full.to_dtype(dtype)
    m = GPTNeoXForCausalLM.from_pretrained(ckpt, dtype=dtype)
    assert m.dtype == dtype
    for name, w in want.params.items():
        got = m.params[name]
        assert type(got) is type(w), name
        for a, b in zip(_stored(got), _stored(w)):
            assert a.dtype == b.dtype and np.array_equal(a.view(np.uint8), b.view(np.uint8)), name
    idx = np.random.default_rng(0).integers(0, 300, (2, 9))
    la, lb = m.forward(idx)[0], want.forward(idx)[0]
    assert np.array_equal(la.view(np.uint32), lb.view(np.uint32))


def test_a_saved_tied_head_is_compared_by_chunks(tmp_path, monkeypatch):
    monkeypatch.setattr(_weights, "CHUNK_ELEMENTS", 5 * 64)
    cfg = pythia_config(64, 1, 4, vocab=200, tie_word_embeddings=True)
    m0 = GPTNeoXForCausalLM.from_config(gpt2s.GPTNeoXConfig.from_hf_dict(cfg), seed=1)
    path = m0.save_safetensors(tmp_path / "m")
    # transformers saves the tied head too for some configs: append it to the file
    raw = _file_tensors(path / "model.safetensors")
    head = raw["gpt_neox.embed_in.weight"].copy()

    def write(head):
        tensors = dict(raw, **{"embed_out.weight": head})
        header, off, blobs = {}, 0, []
        for name, x in tensors.items():
            b = np.ascontiguousarray(x, np.float32).tobytes()
            header[name] = {"dtype": "F32", "shape": list(x.shape),
                            "data_offsets": [off, off + len(b)]}
            off += len(b)
            blobs.append(b)
        text = json.dumps(header).encode()
        text += b" " * (-len(text) % 8)
        (path / "model.safetensors").write_bytes(struct.pack("<Q", len(text)) + text
                                                 + b"".join(blobs))

    write(head)
    m = GPTNeoXForCausalLM.from_pretrained(path, dtype="int8")
    assert m.config.tie_word_embeddings and "embed_out.weight" not in m.params
    head[-1, 3] += 1.0     # the last row: in the last, partial chunk
    write(head)
    with pytest.raises(_weights.SafetensorsError, match="differs from"):
        GPTNeoXForCausalLM.from_pretrained(path, dtype="int8")


@pytest.mark.parametrize("dtype", ["bfloat16", "int8", "int4"])
def test_loading_never_holds_a_float32_copy_of_a_matmul_weight(tmp_path, dtype):
    # 2048 x 128 embeddings: 1 MiB each in float32.  NumPy reports its allocations to
    # tracemalloc: what the load allocates beyond the model it returns (the transient) must
    # stay well under one float32 embedding (the row chunks are 4 MiB / 1M elements by
    # default: at this size 8192 rows, so shrink them to test the chunking, not the size)
    V, H = 2048, 128
    cfg = pythia_config(H, 2, 4, vocab=V)
    write_random_neox(tmp_path / "m", cfg, seed=5, dtype="F32")
    embed_f32 = V * H * 4
    old = _weights.CHUNK_ELEMENTS
    _weights.CHUNK_ELEMENTS = 32 * H
    tracemalloc.start()
    try:
        m = GPTNeoXForCausalLM.from_pretrained(tmp_path / "m", dtype=dtype)
        kept, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
        _weights.CHUNK_ELEMENTS = old
    model_bytes = sum(a.nbytes for w in m.params.values() for a in _stored(w))
    assert kept >= model_bytes   # the model itself is traced (a sanity check of the measure)
    assert peak - kept < embed_f32 // 4, (peak, kept, embed_f32)


@pytest.fixture
def tok_ckpt(tmp_path):
    pytest.importorskip("tokenizers", reason="the checkpoint's tokenizer.json needs tokenizers")
    cfg = pythia_config(64, 1, 4, vocab=300)
    write_random_neox(tmp_path / "m", cfg, seed=2, dtype="F32")
    tk = make_tokenizer(tmp_path / "m", 300)
    return tmp_path / "m", tk


def test_the_tokenizer_is_parsed_on_first_use(tok_ckpt, monkeypatch):
    from gpt2s import llama
    path, tk = tok_ckpt
    calls = []
    real = llama._checkpoint_tokenizer
    monkeypatch.setattr(llama, "_checkpoint_tokenizer",
                        lambda *a: calls.append(a) or real(*a))
    m = GPTNeoXForCausalLM.from_pretrained(path, dtype="int8")
    assert calls == []                       # loading did not read it
    q = m.to_dtype("float32")                # a copy neither
    assert calls == []
    enc = m.tokenizer
    assert len(calls) == 1 and enc is m.tokenizer and len(calls) == 1   # read once
    text = "The quick brown fox"
    assert enc.encode(text) == tk.encode(text).ids
    assert q.tokenizer.encode(text) == tk.encode(text).ids
    out = m.generate_text(text, 3, temperature=0.0, stop_at_eos=False)
    assert isinstance(out, str)
    m.tokenizer = None                       # an assignment replaces it, as before
    assert m.tokenizer is None
    with pytest.raises(ValueError, match="needs the model's tokenizer"):
        m.generate_text(text, 2)


def test_a_bad_or_missing_tokenizer_json_is_none_on_use(tok_ckpt):
    path, _ = tok_ckpt
    (path / "tokenizer.json").write_text("{not json")
    m = GPTNeoXForCausalLM.from_pretrained(path)
    assert m.tokenizer is None
    with pytest.raises(ValueError, match="needs the model's tokenizer"):
        m.generate_text("abc", 2)
    (path / "tokenizer.json").unlink()
    assert GPTNeoXForCausalLM.from_pretrained(path).tokenizer is None
