"""Checkpoint files beyond one float32 model.safetensors: sharded checkpoints
(model.safetensors.index.json + model-0000X-of-0000N.safetensors) written by transformers'
save_pretrained with a small max_shard_size load in gpt2s (GPT-2 and Llama) with the logits
transformers computes; gpt2s' own sharded saves load back in transformers; a missing shard, a
tensor in another shard than the index says, a shard name that leaves the directory are
refused by name.  And a low-precision Llama model saves its stored form (packed int8 / int4
blocks, BF16 projections), which loads back mapped, bit for bit, without quantizing again
(also through python -m gpt2s.quantize)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from llama_ckpt import save_hf

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

IDS = np.array([[3, 17, 42, 5, 99, 250, 7, 1]])


def _rel(a, b):
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def _hf_logits(hf):
    with torch.no_grad():
        return hf(torch.tensor(IDS)).logits.double().numpy()


@pytest.fixture(scope="module")
def gpt2_hf():
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=300, n_positions=64, n_embd=64, n_layer=3,
                                  n_head=4)
    return transformers.GPT2LMHeadModel(cfg).float().eval()


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("llama") / "ckpt"
    hf, _ = save_hf(path, "llama", seed=2, tokenizer=False, tie_word_embeddings=False)
    return path, hf


def _shards(d):
    return sorted(p.name for p in d.iterdir() if p.name.startswith("model-"))


def test_gpt2_sharded_by_transformers_loads(gpt2_hf, tmp_path):
    import gpt2s
    d = tmp_path / "sharded"
    gpt2_hf.save_pretrained(d, max_shard_size="100KB")
    assert (d / "model.safetensors.index.json").is_file() and len(_shards(d)) > 2
    assert not (d / "model.safetensors").exists()
    ref = _hf_logits(gpt2_hf)
    for mmap in (True, False):
        m = gpt2s.GPT2.from_safetensors(d, mmap=mmap)
        assert _rel(m.forward(IDS)[0], ref) < 1e-5
    m = gpt2s.AutoModelForCausalLM.from_pretrained(d, dtype="int8")
    assert m.dtype == "int8" and _rel(m.forward(IDS)[0], ref) < 0.05


def test_llama_sharded_by_transformers_loads(llama_dir, tmp_path):
    import gpt2s
    path, hf = llama_dir
    d = tmp_path / "sharded"
    hf.save_pretrained(d, max_shard_size="50KB")
    assert len(_shards(d)) > 2
    m = gpt2s.AutoModelForCausalLM.from_pretrained(d)
    assert isinstance(m, gpt2s.LlamaForCausalLM)
    from gpt2s.hub import find_model     # the command lines' --model takes the directory
    assert find_model(str(d)) == d
    assert _rel(m.forward(IDS)[0], _hf_logits(hf)) < 1e-5


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_gpt2s_sharded_save_loads_in_transformers(family, gpt2_hf, llama_dir, tmp_path):
    import gpt2s
    if family == "gpt2":
        src = tmp_path / "src"
        gpt2_hf.save_pretrained(src)
        m = gpt2s.GPT2.from_safetensors(src)
        cls = transformers.GPT2LMHeadModel
    else:
        m = gpt2s.AutoModelForCausalLM.from_pretrained(llama_dir[0])
        cls = transformers.LlamaForCausalLM
    d = tmp_path / "out"
    m.save_safetensors(d)                     # one file first: replaced by the shards
    m.save_safetensors(d, max_shard_size="60KB")
    assert not (d / "model.safetensors").exists()
    index = json.loads((d / "model.safetensors.index.json").read_text())
    shards = _shards(d)
    assert len(shards) > 2 and sorted(set(index["weight_map"].values())) == shards
    assert all(s.endswith(f"-of-{len(shards):05d}.safetensors") for s in shards)
    for s in shards:    # at most 60 KB of tensors a shard, unless one tensor is larger
        held = [k for k, v in index["weight_map"].items() if v == s]
        raw = (d / s).read_bytes()
        header = json.loads(raw[8:8 + int.from_bytes(raw[:8], "little")])
        size = sum(e["data_offsets"][1] - e["data_offsets"][0]
                   for k, e in header.items() if k != "__metadata__")
        assert sorted(k for k in header if k != "__metadata__") == sorted(held)
        assert size <= 60_000 or len(held) == 1
    assert index["metadata"]["total_size"] == sum(p.size * 4 for p in m.params.values())
    hf = cls.from_pretrained(d).float().eval()
    ours = m.forward(IDS)[0]
    assert _rel(ours, _hf_logits(hf)) < 1e-5
    back = gpt2s.AutoModelForCausalLM.from_pretrained(d)
    np.testing.assert_array_equal(back.forward(IDS)[0], ours)
    # and back to one file: the index and the shards go
    m.save_safetensors(d)
    assert (d / "model.safetensors").is_file() and not _shards(d)
    assert not (d / "model.safetensors.index.json").exists()


def test_sharded_int8_gpt2_maps_its_blocks(gpt2_hf, tmp_path):
    import gpt2s
    src = tmp_path / "src"
    gpt2_hf.save_pretrained(src)
    q = gpt2s.GPT2.from_safetensors(src, dtype="int8")
    d = tmp_path / "q"
    q.save_safetensors(d, max_shard_size="20KB")
    assert len(_shards(d)) > 2
    back = gpt2s.GPT2.from_safetensors(d)
    assert back.dtype == "int8" and back.mapped
    np.testing.assert_array_equal(back.forward(IDS)[0], q.forward(IDS)[0])


def _broken(tmp_path, gpt2_hf):
    d = tmp_path / "b"
    gpt2_hf.save_pretrained(d, max_shard_size="100KB")
    return d, json.loads((d / "model.safetensors.index.json").read_text())


def _write_index(d, index):
    (d / "model.safetensors.index.json").write_text(json.dumps(index))


def test_sharded_errors_name_the_shard_and_tensor(gpt2_hf, tmp_path):
    import gpt2s
    from gpt2s.weights import SafetensorsError
    d, index = _broken(tmp_path, gpt2_hf)
    shards = _shards(d)
    os.unlink(d / shards[1])
    with pytest.raises(SafetensorsError, match=f"shard '{shards[1]}' .* is missing"):
        gpt2s.GPT2.from_safetensors(d)

    d, index = _broken(tmp_path / "2", gpt2_hf)
    wm = index["weight_map"]
    name = next(k for k, v in wm.items() if v == shards[0])
    wm[name] = shards[1]                       # the index puts it in the wrong shard
    _write_index(d, index)
    with pytest.raises(SafetensorsError, match=rf"tensor '{name}' is in shard "
                                               rf"'{shards[0]}', but the index says "
                                               rf"'{shards[1]}'"):
        gpt2s.GPT2.from_safetensors(d)
    with pytest.raises(SafetensorsError, match="but the index says"):
        gpt2s.AutoModelForCausalLM.from_pretrained(d)

    del wm[name]                               # a tensor the index does not list
    _write_index(d, index)
    with pytest.raises(SafetensorsError, match=f"tensor '{name}' is not in .*weight_map"):
        gpt2s.GPT2.from_safetensors(d)

    d, index = _broken(tmp_path / "3", gpt2_hf)
    index["weight_map"]["h.99.attn.c_attn.weight"] = shards[0]   # listed, in no shard
    _write_index(d, index)
    with pytest.raises(SafetensorsError, match="'h.99.attn.c_attn.weight' is not in shard"):
        gpt2s.GPT2.from_safetensors(d)

    d, index = _broken(tmp_path / "4", gpt2_hf)
    first = next(iter(index["weight_map"]))
    index["weight_map"][first] = "../elsewhere.safetensors"
    _write_index(d, index)
    with pytest.raises(SafetensorsError, match="not a .safetensors file name beside"):
        gpt2s.GPT2.from_safetensors(d)
    (d / "model.safetensors.index.json").write_text("{}")
    with pytest.raises(SafetensorsError, match="no \"weight_map\""):
        gpt2s.GPT2.from_safetensors(d)


# ------------------------------------------------------------------------------------------
# Low-precision Llama models: their stored form on disk


@pytest.mark.parametrize("dtype", ["int8", "int4", "bfloat16"])
def test_llama_saves_and_maps_its_stored_form(llama_dir, tmp_path, dtype):
    import gpt2s
    from gpt2s import packed
    from safetensors import safe_open
    m = gpt2s.AutoModelForCausalLM.from_pretrained(llama_dir[0])
    q = m.to_dtype(dtype)
    d = q.save_safetensors(tmp_path / "q")
    cfg = json.loads((d / "config.json").read_text())
    if dtype == "bfloat16":
        # BF16 projections, any reader's tensors: transformers loads the file
        with safe_open(str(d / "model.safetensors"), "np") as f:
            dtypes = {k: f.get_slice(k).get_dtype() for k in f.keys()}
        assert dtypes["model.layers.0.mlp.up_proj.weight"] == "BF16"
        assert dtypes["model.norm.weight"] == "F32"
        hf = transformers.LlamaForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
        assert _rel(q.forward(IDS)[0], _hf_logits(hf)) < 1e-5
    else:
        assert cfg["quantization_config"]["weight_type"] == dtype
        assert packed.file_storage(d / "model.safetensors", json.loads(
            (d / "model.safetensors").read_bytes()[8:8 + int.from_bytes(
                (d / "model.safetensors").read_bytes()[:8], "little")])
            ["__metadata__"])[0] == dtype
    back = gpt2s.AutoModelForCausalLM.from_pretrained(d)
    assert back.dtype == dtype
    # the very blocks and scales, not quantized again from a widened copy
    for name, w in q.params.items():
        b = back.params[name]
        if isinstance(w, np.ndarray):
            np.testing.assert_array_equal(b, w, err_msg=name)
        else:
            np.testing.assert_array_equal(np.asarray(b.data), np.asarray(w.data), err_msg=name)
            if w.scales is not None:
                np.testing.assert_array_equal(np.asarray(b.scales), np.asarray(w.scales))
    if dtype != "bfloat16":
        assert back.store.mapped
    np.testing.assert_array_equal(back.forward(IDS)[0], q.forward(IDS)[0])
    wide = gpt2s.AutoModelForCausalLM.from_pretrained(d, dtype="float32")
    for name, w in q.params.items():
        np.testing.assert_array_equal(wide.params[name], np.asarray(w), err_msg=name)


def test_quantize_cli_takes_a_llama_checkpoint(llama_dir, tmp_path):
    import gpt2s
    path, _ = llama_dir
    out = tmp_path / "q8"
    p = subprocess.run([sys.executable, "-m", "gpt2s.quantize", str(path), str(out),
                        "--dtype", "int8", "--quiet"], capture_output=True, text=True,
                       timeout=300)
    assert p.returncode == 0, p.stderr
    want = gpt2s.AutoModelForCausalLM.from_pretrained(path, dtype="int8")
    got = gpt2s.AutoModelForCausalLM.from_pretrained(out)
    assert got.dtype == "int8"
    np.testing.assert_array_equal(got.forward(IDS)[0], want.forward(IDS)[0])
    p = subprocess.run([sys.executable, "-m", "gpt2s.quantize", str(path),
                        str(tmp_path / "x.gguf"), "--dtype", "int8", "--quiet"],
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 2 and "GPT-2 GGUF files only" in p.stderr
