"""Data-parallel training over MPI: two processes ("ranks") train one small GPT-2, each on
half of every global batch, and end with exactly the weights one process training on the
whole batches reaches.

    python examples/data_parallel.py               # starts itself under `mpiexec -n 2`
    mpiexec -n 2 python -m mpi4py examples/data_parallel.py

Needs mpi4py and an MPI runtime with mpiexec: pip install "gpt2s[mpi]".  Guide:
docs/distributed.md.  Runs in well under a minute on 2 cores.
"""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np

from gpt2s import GPT2, AdamW, GPT2Config, clip_grad_norm, get_tokenizer, set_num_threads
from gpt2s.distributed import world_size_from_env

TEXT = Path(__file__).resolve().parent.parent / "tests" / "data" / "tinyshakespeare_excerpt.txt"
RANKS, STEPS, GLOBAL_BATCH, SEQ_LEN, LR = 2, 8, 8, 32, 1e-3

# Started as a plain script (no MPI launcher in the environment)?  Run this same file under
# mpiexec with 2 ranks and pass its exit status on.  `python -m mpi4py` makes an uncaught
# exception on one rank end all of them instead of leaving the others waiting.
if world_size_from_env() == 1 and os.environ.get("GPT2S_EXAMPLE_CHILD") != "1":
    mpiexec = shutil.which("mpiexec")
    if mpiexec is None:
        sys.exit("mpiexec not found: pip install 'gpt2s[mpi]' (mpi4py + MPICH)")
    env = dict(os.environ, GPT2S_EXAMPLE_CHILD="1", OMP_NUM_THREADS="1")  # 1 core per rank
    cmd = [mpiexec, "-n", str(RANKS), sys.executable, "-m", "mpi4py", __file__, *sys.argv[1:]]
    sys.exit(subprocess.call(cmd, env=env))

from gpt2s.distributed import DataParallel  # noqa: E402  (imports mpi4py)

set_num_threads(1)   # the ranks share the machine's cores: one kernel thread each
tokens = np.array(get_tokenizer().encode_ordinary(TEXT.read_text(encoding="utf-8")))


def global_batch(step):
    """The whole batch of a step, a function of the step alone, so every rank (and the
    single-process check below) builds the same one without communicating."""
    rng = np.random.default_rng([0, step])
    starts = rng.integers(0, len(tokens) - SEQ_LEN - 1, size=GLOBAL_BATCH)
    windows = tokens[starts[:, None] + np.arange(SEQ_LEN + 1)]
    return windows[:, :-1], windows[:, 1:]


model = GPT2.from_config(GPT2Config.preset("tiny"), seed=0)
dp = DataParallel(model)                       # MPI.COMM_WORLD
dp.broadcast_parameters()                      # every rank starts from rank 0's weights
dp.check_consistent(tokens=len(tokens), lr=LR, steps=STEPS)   # same settings everywhere
opt = AdamW(model, lr=LR)
if dp.rank == 0:
    print(f"{dp.size} ranks, {model}")

for step in range(STEPS):
    x, y = dp.shard(*global_batch(step))       # this rank's GLOBAL_BATCH / size rows
    model.zero_grad()
    loss = dp.forward(x, y)                    # the global mean loss, the same on every rank
    dp.backward()                              # gradients summed over the ranks
    norm = dp.clip_grad_norm(1.0)              # the global norm, the same on every rank
    opt.step()
    if dp.rank == 0:
        print(f"step {step + 1}  loss {loss:.4f}  grad norm {norm:.3f}  "
              f"(this rank's rows: {x.shape[0]} of {GLOBAL_BATCH})")

print(f"rank {dp.rank}: weights identical on every rank: {dp.parameters_in_sync()}")

if dp.rank == 0:
    # The same training in this one process, on the whole global batches: the weights
    # must agree with the data-parallel run up to float32 summation order.
    alone = GPT2.from_config(GPT2Config.preset("tiny"), seed=0)
    opt1 = AdamW(alone, lr=LR)
    for step in range(STEPS):
        x, y = global_batch(step)
        alone.zero_grad()
        alone.forward(x, y, return_logits=False)
        alone.backward()
        clip_grad_norm(alone, 1.0)
        opt1.step()
    diff = max(float(np.max(np.abs(model.params[k] - alone.params[k]))) for k in model.params)
    print(f"largest weight difference from one process on the whole batches: {diff:.2e}")
dp.barrier()
