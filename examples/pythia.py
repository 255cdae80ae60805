"""A Pythia-shaped GPT-NeoX model from the Python API: a small one with random weights
(parallel residual, a quarter of each head rotated, untied embed_out) trained from scratch on
Shakespeare with AdamW, then saved in Hugging Face's layout and reloaded; or, given a
checkpoint directory (``hf download EleutherAI/pythia-160m config.json model.safetensors
tokenizer.json --local-dir pythia-160m``), that model's loss on the same text and a greedy
continuation.

    python examples/pythia.py [CHECKPOINT_DIR]

The text is tokenized with GPT-2's tokenizer for the random model (Pythia's own BPE is a
different 50k vocabulary, read from the checkpoint's tokenizer.json when one is given).
"""

import sys
import tempfile
from pathlib import Path

import numpy as np

from gpt2s import AdamW, AutoModelForCausalLM, GPTNeoXConfig, GPTNeoXForCausalLM, get_tokenizer

TEXT = (Path(__file__).resolve().parent.parent / "tests" / "data" /
        "tinyshakespeare_excerpt.txt").read_text(encoding="utf-8")
BATCH, SEQ_LEN = 8, 64


def windows(ids, rng, n=BATCH):
    starts = rng.integers(0, len(ids) - SEQ_LEN - 1, n)
    x = np.stack([ids[s:s + SEQ_LEN] for s in starts])
    y = np.stack([ids[s + 1:s + SEQ_LEN + 1] for s in starts])
    return x, y


if len(sys.argv) > 1:   # a Pythia checkpoint: its loss on the text, and a continuation
    model = AutoModelForCausalLM.from_pretrained(sys.argv[1])
    print(model)
    ids = np.array(model.tokenizer.encode(TEXT[:4000]))
    x, y = windows(ids, np.random.default_rng(0), 4)
    print(f"loss on Shakespeare: {model.forward(x, y)[1]:.3f}")
    print(model.generate_text("ROMEO:", 30, temperature=0.0))
    sys.exit(0)

enc = get_tokenizer()
ids = np.array(enc.encode_ordinary(TEXT))
split = int(0.9 * len(ids))
config = GPTNeoXConfig(vocab_size=enc.n_vocab, hidden_size=64, num_hidden_layers=2,
                       num_attention_heads=4, intermediate_size=256, rotary_pct=0.25,
                       use_parallel_residual=True, max_position_embeddings=256)
model = GPTNeoXForCausalLM.from_config(config, seed=0)
print(model)
rng = np.random.default_rng(0)
val = windows(ids[split:], np.random.default_rng(1))
first = model.forward(*val)[1]
opt = AdamW(model, lr=3e-3, weight_decay=0.1)
for step in range(40):
    model.zero_grad()
    _, loss = model.forward(*windows(ids[:split], rng))
    model.backward()
    opt.step(max_norm=1.0)
    if step % 10 == 0:
        print(f"step {step:2d}: train loss {loss:.3f}")
print(f"validation loss: {first:.3f} -> {model.forward(*val)[1]:.3f}")

with tempfile.TemporaryDirectory() as d:
    model.save_safetensors(d)       # model.safetensors + config.json, as transformers writes
    again = AutoModelForCausalLM.from_pretrained(d)
    same = np.array_equal(again.forward(val[0])[0], model.forward(val[0])[0])
    print(f"reloaded {type(again).__name__} gives identical logits: {same}")
prompt = enc.encode_ordinary("ROMEO:")
out = model.generate(np.array([prompt]), 20, temperature=0.0)
print("sample:", repr(enc.decode(out[0].tolist())))
