"""A custom training loop from the Python API: a small random GPT-2 trained from scratch on
Shakespeare with AdamW, gradient clipping, gradient accumulation, a linear warm-up + cosine
learning-rate schedule, a validation loss, and a save/reload round trip.

    python examples/training_loop.py [TEXT_FILE]

TEXT_FILE defaults to the Shakespeare excerpt in the repository's tests/data.  The model is
GPT-2's "tiny" preset (2 layers, n_embd 64): 60 steps take well under a minute on 2 cores.
`python -m gpt2s.train` runs the same kind of loop with checkpoints and logging.
"""

import math
import sys
import tempfile
from pathlib import Path

import numpy as np

from gpt2s import GPT2, AdamW, GPT2Config, get_tokenizer

TEXT = Path(sys.argv[1]) if len(sys.argv) > 1 else \
    Path(__file__).resolve().parent.parent / "tests" / "data" / "tinyshakespeare_excerpt.txt"
STEPS, WARMUP, PEAK_LR, MIN_LR = 60, 6, 3e-3, 3e-4
BATCH, SEQ_LEN, ACCUM = 8, 64, 2          # each step: 2 micro-batches of 8 x 64 tokens
MAX_NORM = 1.0                            # clip the global gradient norm to this

# --- data: tokens, a train/validation split, random windows ----------------------------------
ids = np.array(get_tokenizer().encode_ordinary(TEXT.read_text(encoding="utf-8")))
split = int(0.9 * len(ids))
train_ids, val_ids = ids[:split], ids[split:]
rng = np.random.default_rng(0)


def batch(tokens):
    """BATCH random windows of SEQ_LEN tokens and, as targets, the same windows shifted by one."""
    starts = rng.integers(0, len(tokens) - SEQ_LEN - 1, size=BATCH)
    windows = tokens[starts[:, None] + np.arange(SEQ_LEN + 1)]
    return windows[:, :-1], windows[:, 1:]


def lr_at(step):
    """Linear warm-up to PEAK_LR, then a cosine decay to MIN_LR at the last step."""
    if step < WARMUP:
        return PEAK_LR * (step + 1) / WARMUP
    progress = (step - WARMUP) / max(1, STEPS - 1 - WARMUP)
    return MIN_LR + (PEAK_LR - MIN_LR) * 0.5 * (1 + math.cos(math.pi * progress))


def val_loss(model):
    """Validation loss on 4 fixed windows; for_backward=False keeps nothing for backward."""
    n = 4
    x = val_ids[:n * SEQ_LEN].reshape(n, SEQ_LEN)
    y = val_ids[1:n * SEQ_LEN + 1].reshape(n, SEQ_LEN)
    return model.forward(x, y, for_backward=False)[1]


# --- model and optimizer ---------------------------------------------------------------------
config = GPT2Config.preset("tiny")        # or GPT2Config(n_layer=..., n_head=..., n_embd=...)
model = GPT2.from_config(config, seed=0)  # GPT-2's initialisation, repeatable
opt = AdamW(model, lr=PEAK_LR, betas=(0.9, 0.95), weight_decay=0.1)  # decay on 2-D weights only
print(f"{model}\n{len(train_ids):,} training tokens, {len(val_ids):,} validation tokens")
print(f"weight decay on {len(opt.decayed)} of {len(model.params)} tensors")

first_val = val_loss(model)
print(f"step   0  val loss {first_val:.3f}  (a uniform guess: ln(50257) = {math.log(50257):.3f})")
for step in range(STEPS):
    opt.lr = lr_at(step)                  # the learning rate may change before every step
    model.zero_grad()                     # backward() accumulates (+=) into model.grads
    loss = 0.0
    for _ in range(ACCUM):
        x, y = batch(train_ids)
        # return_logits=False: only the loss; the logits stay in a buffer the backward reuses
        _, micro_loss = model.forward(x, y, return_logits=False)
        model.backward()
        loss += micro_loss / ACCUM
    # The gradients were summed over ACCUM micro-batches: grad_scale=1/ACCUM averages them,
    # and max_norm clips the global norm, both folded into the one fused update pass (the
    # gradient buffer is left as it is).  step() returns the norm before clipping.  The
    # same, in two passes: clip_grad_norm(model, MAX_NORM) on averaged gradients, opt.step().
    norm = opt.step(grad_scale=1.0 / ACCUM, max_norm=MAX_NORM)
    if (step + 1) % 10 == 0:
        print(f"step {step + 1:3d}  lr {opt.lr:.2e}  train loss {loss:.3f}  grad norm {norm:.2f}"
              f"  val loss {val_loss(model):.3f}")
last_val = val_loss(model)

# --- save, reload, check ---------------------------------------------------------------------
with tempfile.TemporaryDirectory() as tmp:
    model.save_safetensors(tmp)           # model.safetensors + config.json (Hugging Face layout)
    opt.save(Path(tmp) / "optimizer.npz")  # m, v and the step count, to resume later
    reloaded = GPT2.from_safetensors(tmp)
    x, _ = batch(val_ids)
    same = np.array_equal(model(x)[0], reloaded(x)[0])
print(f"reloaded model gives identical logits: {same}")
print(f"validation loss: {first_val:.3f} -> {last_val:.3f}")
print("sample:", repr(model.generate_text("ROMEO:", 20, temperature=0.8, top_k=40, seed=0)))
