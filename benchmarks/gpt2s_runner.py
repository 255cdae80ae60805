"""One whole-process gpt2s run for vs_llama_cpp.py: the counterpart of one llama.cpp command.

    python benchmarks/gpt2s_runner.py decode  --model DIR --dtype D --ids-file F [--batch 8] [--new 128]
    python benchmarks/gpt2s_runner.py prefill --model DIR --dtype D --ids-file F
    python benchmarks/gpt2s_runner.py logits  --model DIR --dtype D --ids-file F --out logits.f32
    python benchmarks/gpt2s_runner.py bandwidth [--mib 1024]

Prints one JSON object on stdout.  Like llama-completion it loads the model, runs a short
warm-up generation (llama.cpp warms up with a two-token decode), then does the timed work once;
the parent measures this process's peak RSS from outside (/usr/bin/time), so everything here —
interpreter, NumPy, BLAS, the model — counts, as llama.cpp's whole process does.

decode: the prompt (ids-file; with --batch B, row b is the prompt rotated by b, so the rows
differ) is prefilled, then --new tokens are generated greedily.  prefill_s is the time to the
first new token (the prompt's forward + one argmax, like llama.cpp's "prompt eval"); decode_s
the time of the --new - 1 single-position steps after it (llama.cpp's "eval": 127 calls for
128 tokens).  prefill: only the prompt's forward (one new token).
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from harness import announce_machine, ru_maxrss_mib, run_alternating, vm_hwm_mib


def read_ids(path) -> list[int]:
    with open(path) as f:
        return [int(t) for t in f.read().split()]


def weight_bytes_per_token(model) -> int:
    """Bytes of weights one decoding step reads: every parameter once, except that the
    position embedding contributes one row, and the token embedding one row too when an
    untied lm_head.weight (read whole) is the output head."""
    params = model.params
    total = 0
    for name, w in params.items():
        nbytes = int(w.nbytes)
        if name == "wpe.weight" or (name == "wte.weight" and "lm_head.weight" in params):
            nbytes //= w.shape[0]
        total += nbytes
    return total


def _load(args):
    import gpt2s
    gpt2s.set_num_threads(args.threads)
    t0 = time.perf_counter()
    # any family: GPT2.from_safetensors for a GPT-2 checkpoint, as before
    model = gpt2s.AutoModelForCausalLM.from_pretrained(args.model, dtype=args.dtype)
    return model, time.perf_counter() - t0


def _prompts(args):
    import numpy as np
    ids = np.array(read_ids(args.ids_file), np.int64)
    return np.stack([np.roll(ids, b) for b in range(args.batch)])


def _ready(args):
    """(model, load seconds, prompts) after the warm-up generation every timed mode runs
    first (llama.cpp warms up with a two-token decode)."""
    model, load_s = _load(args)
    idx = _prompts(args)
    list(model.generate_stream(idx[:, :2], 2, temperature=0))
    return model, load_s, idx


def run_decode(args) -> dict:
    model, load_s, idx = _ready(args)
    B, T = idx.shape
    t_start = time.perf_counter()
    steps = model.generate_stream(idx, args.new, temperature=0, context_full="stop")
    tokens = [next(steps)]
    t_first = time.perf_counter()
    tokens += list(steps)
    t_end = time.perf_counter()
    rows = [[int(t[b]) for t in tokens] for b in range(B)]
    decode_calls = len(tokens) - 1
    return {"mode": "decode", "dtype": args.dtype, "batch": B, "n_prompt": T,
            "n_new": len(tokens), "load_s": load_s, "prefill_s": t_first - t_start,
            "prefill_tok_s": B * T / (t_first - t_start), "decode_calls": decode_calls,
            "decode_s": t_end - t_first,
            "decode_tok_s": B * decode_calls / (t_end - t_first) if decode_calls else None,
            "tokens": rows, "weight_bytes_per_token": weight_bytes_per_token(model),
            "model": repr(model)}


def run_prefill(args) -> dict:
    model, load_s, idx = _ready(args)
    B, T = idx.shape
    t0 = time.perf_counter()
    steps = model.generate_stream(idx, 1, temperature=0, context_full="stop")
    next(steps)
    dt = time.perf_counter() - t0
    steps.close()
    return {"mode": "prefill", "dtype": args.dtype, "batch": B, "n_prompt": T, "load_s": load_s,
            "prefill_s": dt, "prefill_tok_s": B * T / dt}


def run_logits(args) -> dict:
    import numpy as np
    model, load_s = _load(args)
    idx = _prompts(args)[:1]
    logits, _ = model.forward(idx)
    np.ascontiguousarray(logits[0], np.float32).tofile(args.out)
    return {"mode": "logits", "dtype": args.dtype, "n_prompt": idx.shape[1],
            "vocab": logits.shape[-1], "out": args.out}


def run_bandwidth(args) -> dict:
    """Memory read bandwidth on --threads threads: sum a --mib MiB float32 array (pages touched
    first) with gpt2s's OpenMP reduction _core.sum_squares, and with NumPy's sum in --threads
    Python threads (one slice each; NumPy releases the GIL in reductions).  5 timed reads of
    each after one warm-up; the reference is the best median (the ceiling must be reachable)."""
    from concurrent.futures import ThreadPoolExecutor

    import numpy as np

    import gpt2s
    from gpt2s import _core
    gpt2s.set_num_threads(args.threads)
    nbytes = args.mib << 20
    x = np.ones(nbytes // 4, np.float32)
    parts = np.array_split(x, args.threads)
    with ThreadPoolExecutor(args.threads) as pool:
        fns = {"gpt2s _core.sum_squares": lambda: _core.sum_squares(x),
               f"numpy sum, {args.threads} Python threads": lambda: sum(pool.map(np.sum, parts))}
        timed = run_alternating(fns, repeats=5, warmup=1)
    readers = {name: {"times_s": r["times_s"], "median_s": r["median_s"],
                      "gbs": nbytes / r["median_s"] / 1e9} for name, r in timed.items()}
    best = max(readers, key=lambda k: readers[k]["gbs"])
    return {"mode": "bandwidth", "bytes": nbytes, "threads": args.threads, "readers": readers,
            "reference": best, "gbs": readers[best]["gbs"]}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("mode", choices=("decode", "prefill", "logits", "bandwidth"))
    p.add_argument("--model")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "int8", "int4"))
    p.add_argument("--ids-file")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--new", type=int, default=128)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out")
    p.add_argument("--mib", type=int, default=1024)
    args = p.parse_args(argv)
    if args.mode != "bandwidth" and not (args.model and args.ids_file):
        p.error(f"{args.mode} needs --model and --ids-file")
    if args.mode == "logits" and not args.out:
        p.error("logits needs --out")
    res = {"decode": run_decode, "prefill": run_prefill, "logits": run_logits,
           "bandwidth": run_bandwidth}[args.mode](args)
    res["ru_maxrss_mib"] = ru_maxrss_mib()
    res["vm_hwm_mib"] = vm_hwm_mib()
    res["machine"] = announce_machine(file=sys.stderr)   # stdout is the JSON
    json.dump(res, sys.stdout)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
