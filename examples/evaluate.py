"""Evaluate a model: mean next-token loss (cross-entropy, in nats) and perplexity on a text
file, for the bundled demo model and, as a baseline, an untrained model of the same size.

    python examples/evaluate.py [TEXT_FILE]

TEXT_FILE defaults to the Shakespeare excerpt in the repository's tests/data.  Perplexity is
exp(mean loss): how many tokens the model is, on average, choosing between.  An untrained
model is close to the vocabulary size (50257); the demo model, trained on Shakespeare, is far
lower on Shakespeare.

The same measurement from the command line, with the sliding windows used to report GPT-2's
perplexity: python -m gpt2s.eval --model demo tests/data/tinyshakespeare_excerpt.txt
"""

import math
import sys
from pathlib import Path

import numpy as np

from gpt2s import GPT2, get_tokenizer

TEXT = Path(sys.argv[1]) if len(sys.argv) > 1 else \
    Path(__file__).resolve().parent.parent / "tests" / "data" / "tinyshakespeare_excerpt.txt"


def evaluate(model: GPT2, ids: np.ndarray, seq_len: int, batch: int = 8):
    """(mean loss per token, tokens scored) over consecutive, non-overlapping windows.

    Each window of seq_len tokens predicts its own next tokens, so every token after the first
    is scored once.  forward(x, y, for_backward=False) returns the mean loss of a batch
    without keeping anything for a backward pass; weighting each batch by its token count
    gives the mean over the whole text.
    """
    n = (len(ids) - 1) // seq_len
    x_all = ids[:n * seq_len].reshape(n, seq_len)
    y_all = ids[1:n * seq_len + 1].reshape(n, seq_len)
    total, count = 0.0, 0
    for i in range(0, n, batch):
        x, y = x_all[i:i + batch], y_all[i:i + batch]
        _, loss = model.forward(x, y, for_backward=False)
        total += loss * y.size
        count += y.size
    return total / count, count


ids = np.array(get_tokenizer().encode_ordinary(TEXT.read_text(encoding="utf-8")))
print(f"{TEXT.name}: {len(ids):,} tokens")

demo = GPT2.from_pretrained("demo")            # the bundled demo model
untrained = GPT2.from_config(demo.config, seed=0)   # same sizes, random weights
seq_len = demo.config.n_ctx                         # the longest window the model can read

for name, model in (("demo model", demo), ("untrained", untrained)):
    loss, count = evaluate(model, ids, seq_len)
    print(f"{name:11s} loss {loss:.4f} nats/token  perplexity {math.exp(loss):9.1f}  "
          f"({count:,} tokens in windows of {seq_len})")
