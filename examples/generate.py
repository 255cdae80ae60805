"""Generate text with the bundled demo model: greedy decoding, sampling (temperature, top-k,
top-p), repeatable seeds, several samples per prompt, and streaming token by token.

    python examples/generate.py

The demo model is a 7.3M-parameter GPT-2 trained for a few minutes on Tiny Shakespeare, so
expect Shakespeare-flavoured nonsense; load real GPT-2 weights with
GPT2.from_safetensors("assets/model.safetensors") for real text.
"""

import codecs
import sys

import numpy as np

from gpt2s import GPT2, get_tokenizer

# "demo": the small model bundled inside the package (nothing is downloaded).  The same
# call takes "gpt2" (GPT-2 124M, from the Hugging Face cache) or a path to a model directory.
model = GPT2.from_pretrained("demo")
enc = get_tokenizer()                      # GPT-2's BPE tokenizer (tiktoken), offline
print(model)

# --- 1. Text in, text out ------------------------------------------------------------------
# temperature=0 is greedy decoding: always the most likely token, so the output is fixed.
greedy = model.generate_text("ROMEO:", 30, temperature=0)
print("\n[greedy]", repr(greedy))

# Sampling: draw from softmax(logits / temperature), keeping only the 40 most likely tokens.
# A seed makes the draw repeatable: the same seed gives the same text.
a = model.generate_text("ROMEO:", 30, temperature=0.8, top_k=40, seed=1)
b = model.generate_text("ROMEO:", 30, temperature=0.8, top_k=40, seed=1)
print("\n[top-k 40, seed 1]", repr(a))
print("same seed, same text:", a == b)

# Nucleus (top-p) sampling, three independent continuations of one prompt.
samples = model.generate_text("JULIET:", 20, temperature=1.0, top_p=0.9, seed=7, num_samples=3)
for i, s in enumerate(samples):
    print(f"\n[top-p 0.9, sample {i}]", repr(s))

# --- 2. Token ids in, token ids out ----------------------------------------------------------
# generate() takes a (B, T) array of B prompts of equal length and returns (B, T + new) ids,
# prompts included.  Here two prompts of 3 tokens each, decoded together as a batch.
prompts = np.array([enc.encode("First Citizen:"), enc.encode("Second Citizen:")])
print("\nprompt ids:", prompts.tolist())
out = model.generate(prompts, 12, temperature=0.7, seed=3)
print("output shape:", out.shape)         # (2, T + 12)
for row in out:
    print("[batch row]", repr(enc.decode(row.tolist())))

# --- 3. Streaming ----------------------------------------------------------------------------
# generate_stream() yields each new token as soon as it is made (one int per step for a 1-D
# prompt).  A token can end in the middle of a multi-byte UTF-8 character, so decode the bytes
# incrementally and print whatever is complete.
print("\n[streaming] ", end="")
decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
n = 0
for token in model.generate_stream(enc.encode("First Citizen:"), 40, temperature=0.8,
                                   top_k=40, seed=2):
    sys.stdout.write(decoder.decode(enc.decode_single_token_bytes(token)))
    sys.stdout.flush()
    n += 1
sys.stdout.write(decoder.decode(b"", final=True))
print(f"\n[streamed {n} tokens]")
