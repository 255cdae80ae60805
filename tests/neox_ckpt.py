"""Tiny GPT-NeoX checkpoints for tests, saved by transformers itself (random weights,
config.json + model.safetensors as ``save_pretrained`` writes them), with the small byte-level
BPE tokenizer.json of llama_ckpt.  Nothing is downloaded."""

from __future__ import annotations

import pytest

from llama_ckpt import make_tokenizer


def save_hf_neox(directory, vocab_size=300, seed=0, tokenizer=True, legacy_keys=False,
                 **sizes):
    """A transformers GPTNeoXForCausalLM checkpoint of a tiny random model in directory;
    returns (the transformers model in float32, eval mode; the tokenizers.Tokenizer or None).
    legacy_keys: config.json gets transformers 4's rotary_pct / rotary_emb_base beside
    transformers 5's rope_parameters (as the benchmark's pythia-160m-random is written)."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    directory.mkdir(parents=True, exist_ok=True)
    tk = make_tokenizer(directory, vocab_size) if tokenizer else None
    if tk is not None:
        vocab_size = tk.get_vocab_size()
    cfg = dict(vocab_size=vocab_size, hidden_size=64, intermediate_size=128,
               num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=128,
               rotary_pct=0.25, use_parallel_residual=True, tie_word_embeddings=False)
    cfg.update(sizes)
    torch.manual_seed(seed)
    hf = transformers.GPTNeoXForCausalLM(transformers.GPTNeoXConfig(**cfg)).float().eval()
    with torch.no_grad():   # larger weights than the 0.02 init, biases and norms off 0 and 1
        for name, p in hf.named_parameters():
            if p.ndim > 1:
                p.mul_(4.0)
            else:
                p.add_(torch.randn_like(p) * 0.1)
    hf.save_pretrained(directory, safe_serialization=True)
    if legacy_keys:
        import json
        path = directory / "config.json"
        d = json.loads(path.read_text())
        rp = d["rope_parameters"]
        d.update(rotary_pct=rp["partial_rotary_factor"], rotary_emb_base=rp["rope_theta"],
                 rope_theta=rp["rope_theta"])
        path.write_text(json.dumps(d))
    return hf, tk


def pythia_config(hidden, layers, heads, vocab=50304, **extra) -> dict:
    """A config.json dict shaped as EleutherAI's Pythia configs are (transformers 4 keys)."""
    d = {"architectures": ["GPTNeoXForCausalLM"], "bos_token_id": 0, "eos_token_id": 0,
         "hidden_act": "gelu", "hidden_size": hidden, "initializer_range": 0.02,
         "intermediate_size": 4 * hidden, "layer_norm_eps": 1e-05,
         "max_position_embeddings": 2048, "model_type": "gpt_neox",
         "num_attention_heads": heads, "num_hidden_layers": layers, "rotary_emb_base": 10000,
         "rotary_pct": 0.25, "tie_word_embeddings": False, "torch_dtype": "float16",
         "use_cache": True, "use_parallel_residual": True, "vocab_size": vocab}
    d.update(extra)
    return d


PYTHIA_160M = pythia_config(768, 12, 12)
PYTHIA_1_4B = pythia_config(2048, 24, 16)


def write_random_neox(directory, config: dict, seed=0, dtype="BF16", std=0.02):
    """model.safetensors + config.json of a GPT-NeoX model with random weights (normal, std
    0.02; LayerNorm weights near 1, biases near 0), written one tensor at a time (a 1.4B
    model never sits in memory whole), with Hugging Face's names and shapes written out here
    (not taken from gpt2s).  dtype: "BF16" or "F32"."""
    import json
    import struct

    import numpy as np
    directory.mkdir(parents=True, exist_ok=True)
    H, I, V = config["hidden_size"], config["intermediate_size"], config["vocab_size"]
    shapes = [("gpt_neox.embed_in.weight", (V, H))]
    for l in range(config["num_hidden_layers"]):
        p = f"gpt_neox.layers.{l}."
        shapes += [(p + "input_layernorm.weight", (H,)), (p + "input_layernorm.bias", (H,)),
                   (p + "post_attention_layernorm.weight", (H,)),
                   (p + "post_attention_layernorm.bias", (H,)),
                   (p + "attention.query_key_value.weight", (3 * H, H)),
                   (p + "attention.query_key_value.bias", (3 * H,)),
                   (p + "attention.dense.weight", (H, H)), (p + "attention.dense.bias", (H,)),
                   (p + "mlp.dense_h_to_4h.weight", (I, H)), (p + "mlp.dense_h_to_4h.bias", (I,)),
                   (p + "mlp.dense_4h_to_h.weight", (H, I)), (p + "mlp.dense_4h_to_h.bias", (H,))]
    shapes += [("gpt_neox.final_layer_norm.weight", (H,)),
               ("gpt_neox.final_layer_norm.bias", (H,))]
    if not config.get("tie_word_embeddings", False):
        shapes.append(("embed_out.weight", (V, H)))
    size = 2 if dtype == "BF16" else 4
    header, off = {}, 0
    for name, shape in shapes:
        n = int(np.prod(shape)) * size
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [off, off + n]}
        off += n
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    rng = np.random.default_rng(seed)
    # drawn from a pool of normals at a random start per tensor (drawing a billion normals
    # would take minutes; these weights need only be random-looking and distinct)
    pool = rng.standard_normal(1 << 20, dtype=np.float32) * np.float32(std)
    with open(directory / "model.safetensors", "wb") as f:
        f.write(struct.pack("<Q", len(text)) + text)
        for name, shape in shapes:
            start = int(rng.integers(pool.size))
            x = np.resize(np.roll(pool, -start), shape)
            if name.endswith("norm.weight"):
                x += np.float32(1.0)
            if dtype == "BF16":   # truncated to bfloat16 (a random weight needs no rounding)
                f.write((x.view(np.uint32) >> 16).astype("<u2").tobytes())
            else:
                f.write(x.astype("<f4").tobytes())
    (directory / "config.json").write_text(json.dumps(config, indent=2))
