"""Tiny Llama / Qwen2 checkpoints for tests, saved by transformers itself (random weights,
config.json + model.safetensors as ``save_pretrained`` writes them), with a small byte-level
BPE tokenizer.json made by the ``tokenizers`` package.  Nothing is downloaded."""

from __future__ import annotations

import json

import pytest

TEXT = ["The quick brown fox jumps over the lazy dog.", "Once upon a time there was a cat.",
        "def fib(n): return n if n < 2 else fib(n - 1) + fib(n - 2)",
        "Hello, world! Hello again, world."] * 20
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def make_tokenizer(directory, vocab_size: int = 300, bos: bool = False):
    """A byte-level BPE tokenizer.json in directory; returns the tokenizers.Tokenizer (skips
    the test when the tokenizers package is missing).  bos: its post-processor puts
    <|im_start|> before a text, as Llama 3's and TinyLlama's put their BOS."""
    tokenizers = pytest.importorskip("tokenizers", reason="tokenizer.json needs the "
                                     "tokenizers package")
    from tokenizers import decoders, models, pre_tokenizers, trainers
    tk = tokenizers.Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tk.train_from_iterator(TEXT, trainer)
    if bos:
        from tokenizers import processors
        tk.post_processor = processors.TemplateProcessing(
            single="<|im_start|> $A", special_tokens=[("<|im_start|>",
                                                       tk.token_to_id("<|im_start|>"))])
    tk.save(str(directory / "tokenizer.json"))
    return tk


def save_hf(directory, model_type="llama", vocab_size=300, eos_token_id=None, seed=0,
            tokenizer=True, bos=False, **sizes):
    """A transformers checkpoint of a tiny random model in directory; returns
    (transformers model in float32, eval mode, tokenizers.Tokenizer or None)."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    directory.mkdir(parents=True, exist_ok=True)
    tk = make_tokenizer(directory, vocab_size, bos) if tokenizer else None
    if tk is not None:
        vocab_size = tk.get_vocab_size()
    cfg = dict(vocab_size=vocab_size, hidden_size=64, intermediate_size=96,
               num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
               max_position_embeddings=128, tie_word_embeddings=True)
    cfg.update(sizes)
    if eos_token_id is not None:
        cfg["eos_token_id"] = eos_token_id
    classes = {"llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
               "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM)}
    config_class, model_class = classes[model_type]
    torch.manual_seed(seed)
    hf = model_class(config_class(**cfg)).float().eval()
    with torch.no_grad():   # larger weights than the 0.02 init: the logits then differ
        for p in hf.parameters():
            p.mul_(4.0 if p.ndim > 1 else 1.0)
    hf.save_pretrained(directory, safe_serialization=True)
    return hf, tk


def write_config(directory, **changes):
    """Rewrite config.json in directory with keys changed (and the end tokens of
    generation_config.json, which generation reads first, as transformers does)."""
    path = directory / "config.json"
    d = json.loads(path.read_text())
    d.update(changes)
    path.write_text(json.dumps(d))
    gen = directory / "generation_config.json"
    if "eos_token_id" in changes and gen.is_file():
        g = json.loads(gen.read_text())
        g["eos_token_id"] = changes["eos_token_id"]
        gen.write_text(json.dumps(g))
