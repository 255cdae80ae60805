"""Low-precision inference: the demo model with its matmul weights stored as bfloat16 and as
int8 blocks, compared with float32 on the same prompt: agreement of the
next-token distributions, and greedy text.

    python examples/lowp_generate.py

bfloat16 halves the bytes read per token and int8 (blocks of 32 with a float16 scale) nearly
quarters them, which is what decoding on a CPU is limited by; the logits move a little, so
greedy text can diverge after a while.  Low-precision models are for inference only:
backward() and zero_grad() raise.
"""

import numpy as np

from gpt2s import GPT2, get_tokenizer

enc = get_tokenizer()
prompt = enc.encode("ROMEO:\nWhat light through yonder window breaks?")

models = {"float32": GPT2.from_pretrained("demo")}
for dtype in ("bfloat16", "int8"):
    # converted one tensor at a time; GPT2.from_safetensors(path, dtype=...) converts
    # while loading instead
    models[dtype] = models["float32"].to_dtype(dtype)


def softmax(z):
    e = np.exp(z - z.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


ref_logits, _ = models["float32"].forward(prompt)
ref_p = softmax(ref_logits[0].astype(np.float64))
for dtype, m in models.items():
    logits, _ = m.forward(prompt)
    p = softmax(logits[0].astype(np.float64))
    # total variation distance between the next-token distributions, worst position
    tv = 0.5 * np.abs(p - ref_p).sum(-1).max()
    same_top = float(np.mean(p.argmax(-1) == ref_p.argmax(-1)))
    text = m.generate_text("ROMEO:", 20, temperature=0)
    print(f"{dtype:8s} {m!r}")
    print(f"         max total-variation distance {tv:.4f}, same top token at "
          f"{same_top:.0%} of positions")
    print(f"         greedy: {text!r}")
