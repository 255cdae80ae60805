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
