"""A weight that is NaN or infinite is a broken file: refused at load for every file dtype
(F32, F16, BF16), every storage dtype (float32, bfloat16, int8) and both load paths (viewed
in place through the mapping, or converted), with a SafetensorsError naming the file, the
tensor and the first bad index.  A finite value too large for the storage (a bfloat16 that
rounds to infinity, an int8 block whose fp16 scale would overflow) is refused the same way.

The files are written byte by byte here (BF16 as the top 16 bits of the float32), and the
limits are derived here from the formats: bfloat16 keeps the top 16 bits of a float32 with
round-to-nearest-even, int8 blocks hold |w| <= 127 x the largest fp16 scale.
"""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest

from conftest import param_shapes
from gpt2s import GPT2, SafetensorsError

L, C, V, T = 2, 64, 40, 8
FP16_MAX = float(np.finfo(np.float16).max)
INT8_LIMIT = 127 * FP16_MAX


def encode(a: np.ndarray, tag: str) -> bytes:
    a = np.ascontiguousarray(a, np.float32)
    if tag == "F32":
        return a.astype("<f4").tobytes()
    if tag == "F16":
        return a.astype("<f2").tobytes()
    return (a.view(np.uint32) >> 16).astype("<u2").tobytes()   # BF16: truncated, exact here


def write_model(path, tensors: dict, tag: str, n_layer=L, n_embd=C, vocab=V, n_ctx=T):
    header, chunks, offset = {}, [], 0
    for name, a in tensors.items():
        raw = encode(a, tag)
        header["transformer." + name] = {"dtype": tag, "shape": list(a.shape),
                                         "data_offsets": [offset, offset + len(raw)]}
        chunks.append(raw)
        offset += len(raw)
    header["__metadata__"] = {"gpt2s_config": json.dumps({
        "n_layer": n_layer, "n_head": 2, "n_embd": n_embd, "vocab_size": vocab,
        "n_positions": n_ctx})}
    hraw = json.dumps(header).encode()
    hraw += b" " * (-len(hraw) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(hraw)) + hraw + b"".join(chunks))


def weights(seed=0, vocab=V) -> dict:
    rng = np.random.default_rng(seed)
    return {k: (rng.standard_normal(s) * 0.1).astype(np.float32)
            for k, s in param_shapes(L, C, vocab, T).items()}


def refusal(path, dtype, mmap) -> str:
    with pytest.raises(SafetensorsError) as e:
        GPT2.from_safetensors(path, dtype=dtype, mmap=mmap)
    msg = str(e.value)
    assert str(path) in msg, msg
    return msg


# (tensor, index): a compressed Conv1D weight, the embedding (compressed, read by rows), a
# float32 tensor of every model (a layernorm bias)
PLACES = [("h.1.mlp.c_fc.weight", (3, 5)), ("wte.weight", (37, 60)), ("h.0.ln_1.bias", (9,))]


@pytest.mark.parametrize("mmap", [True, False], ids=["mmap", "copy"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "int8"])
@pytest.mark.parametrize("tag", ["F32", "F16", "BF16"])
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf], ids=["nan", "inf", "-inf"])
def test_nonfinite_weight_is_refused(tmp_path, tag, dtype, mmap, bad):
    for tensor, index in PLACES:
        params = weights()
        params[tensor][index] = bad
        path = tmp_path / f"{tensor}.safetensors"
        write_model(path, params, tag)
        msg = refusal(path, dtype, mmap)
        assert f"'transformer.{tensor}' holds {float(bad)!r} at index {index}" in msg, msg
        assert "finite" in msg.split(str(path))[-1], msg


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "int8"])
def test_first_bad_index_deep_in_a_large_embedding(tmp_path, dtype):
    """The embedding is read a chunk of rows at a time (int8, bfloat16 from F32) or viewed
    (float32): the index named is the first bad one of the whole tensor."""
    vocab = 20_000                     # more rows than one chunk of 2^20 elements holds
    params = weights(vocab=vocab)
    params["wte.weight"][19_000, 7] = np.nan
    params["wte.weight"][19_001, 0] = np.inf
    path = tmp_path / "m.safetensors"
    write_model(path, params, "F32", vocab=vocab)
    msg = refusal(path, dtype, True)
    assert "'transformer.wte.weight' holds nan at index (19000, 7)" in msg, msg


@pytest.mark.parametrize("mmap", [True, False], ids=["mmap", "copy"])
def test_int8_block_scale_overflow_is_refused(tmp_path, mmap):
    """|w| > 127 x 65504 overflows an int8 block's fp16 scale: refused by name for int8, while
    float32 and bfloat16 load it; 127 x 65504 itself loads as int8."""
    above = float(np.nextafter(np.float32(INT8_LIMIT), np.float32(np.inf)))
    for tensor, index in PLACES[:2]:
        params = weights()
        params[tensor][index] = -above
        path = tmp_path / f"{tensor}.safetensors"
        write_model(path, params, "F32")
        msg = refusal(path, "int8", mmap)
        assert f"'transformer.{tensor}' holds {-above!r} at index {index}" in msg, msg
        assert "int8" in msg, msg
        m = GPT2.from_safetensors(path, mmap=mmap)
        assert m.params[tensor][index] == -above
        m = GPT2.from_safetensors(path, dtype="bfloat16", mmap=mmap)   # 8 significant bits
        assert abs(np.asarray(m.params[tensor])[index] / -above - 1) < 2**-8
        params[tensor][index] = INT8_LIMIT
        write_model(path, params, "F32")
        m = GPT2.from_safetensors(path, dtype="int8", mmap=mmap)
        assert np.asarray(m.params[tensor])[index] == INT8_LIMIT


@pytest.mark.parametrize("mmap", [True, False], ids=["mmap", "copy"])
def test_bfloat16_overflow_is_refused(tmp_path, mmap):
    """A float32 at or past 0x7f7f8000 (halfway between the largest bfloat16 and 2^128) rounds
    to infinity: refused for a bfloat16 model; one ulp below rounds to the largest bfloat16."""
    halfway = float(np.array(0x7F7F8000, np.uint32).view(np.float32))
    below = float(np.array(0x7F7F7FFF, np.uint32).view(np.float32))
    largest_bf16 = float(np.array(0x7F7F0000, np.uint32).view(np.float32))
    tensor, index = PLACES[0]
    params = weights()
    params[tensor][index] = halfway
    path = tmp_path / "m.safetensors"
    write_model(path, params, "F32")
    msg = refusal(path, "bfloat16", mmap)
    assert f"'transformer.{tensor}' holds {halfway!r} at index {index}" in msg, msg
    assert "bfloat16" in msg, msg
    assert GPT2.from_safetensors(path, mmap=mmap).params[tensor][index] == halfway
    params[tensor][index] = below
    write_model(path, params, "F32")
    m = GPT2.from_safetensors(path, dtype="bfloat16", mmap=mmap)
    assert np.asarray(m.params[tensor])[index] == largest_bf16
