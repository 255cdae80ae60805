"""GPT-NeoX (Pythia-160M shapes, random weights) in gpt2s against PyTorch eager
(transformers' GPTNeoXForCausalLM, float32) on the same weights and inputs: a training step
(forward + backward, B=4, T=64), the forward of a 512-token prompt, and batch-1 greedy decode
with float32 / bfloat16 / int8 weights.  A measurement, not a test: nothing is asserted.

    python benchmarks/neox_step.py [--threads 2] [--repeats 3] [--small] [--json out.json]

--small: a 2-layer, 128-wide model (seconds; checks the script runs).  Medians of --repeats
timed runs after one warm-up.  On a shared machine the figures are noise: rerun idle.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np


def median_time(fn, repeats):
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--small", action="store_true")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    from harness import announce_machine
    announce_machine()
    import gpt2s
    from gpt2s import GPTNeoXConfig, GPTNeoXForCausalLM
    gpt2s.set_num_threads(args.threads)
    sizes = (dict(hidden_size=128, num_hidden_layers=2, num_attention_heads=2,
                  intermediate_size=512, vocab_size=1000) if args.small else
             dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                  intermediate_size=3072, vocab_size=50304))
    cfg = GPTNeoXConfig(**sizes)
    model = GPTNeoXForCausalLM.from_config(cfg, seed=0)
    rng = np.random.default_rng(0)
    x = rng.integers(0, cfg.vocab_size, (4, 64))
    y = rng.integers(0, cfg.vocab_size, (4, 64))
    prompt512 = rng.integers(0, cfg.vocab_size, (1, 512))
    prompt16 = prompt512[:, :16]
    out = {"model": sizes, "threads": args.threads, "gpt2s": {}, "torch": {}}

    def step():
        model.zero_grad()
        model.forward(x, y)
        model.backward()
    out["gpt2s"]["train_step_s"] = median_time(step, args.repeats)
    out["gpt2s"]["prefill512_s"] = median_time(
        lambda: model.forward(prompt512, return_logits=False, for_backward=False),
        args.repeats)
    n_new = 32
    for dtype in ("float32", "bfloat16", "int8"):
        m = model if dtype == "float32" else model.to_dtype(dtype)
        t = median_time(lambda: m.generate(prompt16, n_new, temperature=0.0), args.repeats)
        out["gpt2s"][f"decode_{dtype}_tok_s"] = n_new / t
    try:
        import torch
        import transformers
    except ImportError:
        out["torch"] = "not installed"
    else:
        torch.set_num_threads(args.threads)
        hf = transformers.GPTNeoXForCausalLM(transformers.GPTNeoXConfig(**cfg.to_hf_dict()))
        state = {("lm_head.weight" if k == "embed_out.weight" else k): torch.from_numpy(v)
                 for k, v in model.params.items()}
        hf.load_state_dict(state, strict=False)
        tx, ty = torch.from_numpy(x), torch.from_numpy(y)

        def tstep():
            hf.zero_grad()
            logits = hf(input_ids=tx).logits
            torch.nn.functional.cross_entropy(logits.reshape(-1, cfg.vocab_size),
                                              ty.reshape(-1)).backward()
        out["torch"]["train_step_s"] = median_time(tstep, args.repeats)
        with torch.no_grad():
            out["torch"]["prefill512_s"] = median_time(
                lambda: hf(input_ids=torch.from_numpy(prompt512)), args.repeats)
    print(json.dumps(out, indent=2))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)


if __name__ == "__main__":
    main()
