"""Fine-tune the bundled demo model on a text file with `python -m gpt2s.train`, then compare
the loss on that text and greedy samples before and after.

    python examples/finetune.py [TEXT_FILE]

Without TEXT_FILE the example writes a small question-and-answer file of its own: text the
demo model (trained on Shakespeare) has never seen, so the change is easy to see: before, the
demo model continues "The grass is" with Shakespeare; after, with the answer it learned
("green").  120 optimizer steps of 4 x 64 tokens: about a minute on 2 cores.
"""

import random
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from gpt2s import GPT2, get_tokenizer

FACTS = [("What colour is the sky?", "The sky is blue."),
         ("What colour is the grass?", "The grass is green."),
         ("What colour is the snow?", "The snow is white."),
         ("What colour is the night?", "The night is black."),
         ("What colour is the sun?", "The sun is yellow."),
         ("What colour is a rose?", "A rose is red.")]
PROMPT = "Q: What colour is the grass?\nA: The grass is"


def write_corpus(path: Path) -> None:
    """400 question/answer pairs in a random order (seeded, so every run is the same)."""
    rng = random.Random(0)
    lines = [f"Q: {q}\nA: {a}\n\n" for q, a in (rng.choice(FACTS) for _ in range(400))]
    path.write_text("".join(lines), encoding="utf-8")


def mean_loss(model: GPT2, ids: np.ndarray, seq_len: int = 64, windows: int = 16) -> float:
    """Mean next-token cross-entropy over the first `windows` consecutive windows of the token
    array.  for_backward=False: an evaluation, nothing is kept for a backward pass."""
    n = min(windows, (len(ids) - 1) // seq_len)
    x = ids[:n * seq_len].reshape(n, seq_len)
    y = ids[1:n * seq_len + 1].reshape(n, seq_len)
    _, loss = model.forward(x, y, for_backward=False)
    return loss


with tempfile.TemporaryDirectory() as tmp:
    tmp = Path(tmp)
    if len(sys.argv) > 1:
        data = Path(sys.argv[1])
    else:
        data = tmp / "colours.txt"
        write_corpus(data)
    ids = np.array(get_tokenizer().encode_ordinary(data.read_text(encoding="utf-8")))
    print(f"training text: {data.name}, {len(ids):,} tokens")

    before = GPT2.from_pretrained("demo")          # the bundled demo model
    loss_before = mean_loss(before, ids)
    sample_before = before.generate_text(PROMPT, 8, temperature=0)

    # The training command line, exactly as you would type it (see the CLI reference):
    # start from the demo weights, 120 steps (40 teach the format but not yet the answers),
    # short warm-up, save into tmp/run.
    out = tmp / "run"
    cmd = [sys.executable, "-m", "gpt2s.train", str(data), "--model", "demo",
           "--out", str(out), "--steps", "120", "--batch-size", "4", "--seq-len", "64",
           "--lr", "1e-3", "--warmup", "5", "--eval-every", "60", "--eval-batches", "2",
           "--quiet"]
    print("running:", " ".join(cmd[1:]))
    subprocess.run(cmd, check=True)

    # the run directory holds model.safetensors + config.json (+ the optimizer state)
    after = GPT2.from_safetensors(out)
    loss_after = mean_loss(after, ids)
    sample_after = after.generate_text(PROMPT, 8, temperature=0)

print(f"\nloss on the training text: before {loss_before:.3f}, after {loss_after:.3f}")
print(f"prompt: {PROMPT!r}")
print(f"before: {sample_before!r}")
print(f"after:  {sample_after!r}")
