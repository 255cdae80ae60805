"""The newer families against their peers (issue 25, Targets): one checkpoint directory, any
family gpt2s loads through ``gpt2s.AutoModelForCausalLM`` (GPT-2, Llama/Qwen2, GPT-NeoX where
this build has it).

    python benchmarks/families.py --model /tmp/anchors/smollm2-135m-random --rounds 3
    python benchmarks/families.py --model /tmp/anchors/pythia-160m-random --skip-train

Inference, whole process against whole process (as benchmarks/vs_llama_cpp.py, whose runner
and parsers this reuses): gpt2s at float32 / bfloat16 / int8 storage against llama.cpp on the
F32 / F16 / Q8_0 GGUF files its own converter made of the same checkpoint
(``ANCHORS/gguf/<model dir name>-{f32,f16,q8_0}.gguf``), same token ids, same thread count,
fresh processes, the engine that goes first alternating between rounds:
  - decode: a 16-token prompt then 128 greedy tokens; decode tokens/s over the 127 calls
    after the first token (llama-completion's "eval time"), prefill-16 tokens/s from the time
    to the first token (its "prompt eval time"), and the process's peak RSS (GNU time);
  - prefill 512: a 512-token prompt and one new token.
Training, in this process, alternating rounds: one step (B=4, T=64, forward + backward, the
gradients zeroed before and outside the timed call) of gpt2s float32, of transformers'
AutoModelForCausalLM in PyTorch eager float32 and of the same model under torch.compile,
on the same weights and token ids.

Medians over the rounds; ratios against the issue's targets.  Measurements only: nothing here
asserts a speed.  On a shared machine the figures are noise (the JSON records the other
processes' load around every run).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import harness
from harness import median, redo_while_disturbed
from vs_llama_cpp import (PROMPT16, PROMPT512, REDO, RSS_SLACK_MIB, Runner, llama_completion,
                          machine_info, ours)

HERE = Path(__file__).resolve().parent

# (gpt2s dtype, llama.cpp type, GGUF suffix, decode target: gpt2s / llama.cpp tokens/s)
PAIRS = (("float32", "F32", "f32", 1.0), ("bfloat16", "F16", "f16", 1.1),
         ("int8", "Q8_0", "q8_0", 1.1))
PREFILL_TARGET = 1.0
TRAIN_EAGER_TARGET = 0.80   # gpt2s step time / PyTorch eager's
TRAIN_B, TRAIN_T = 4, 64


def log(msg):
    print(msg, file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------- model


def model_type(model_dir: Path) -> str:
    with open(model_dir / "config.json") as f:
        return json.load(f).get("model_type", "gpt2")


def gpt2s_support(model_dir: Path) -> str | None:
    """None when gpt2s loads this checkpoint's family, else why not (the message of its
    refusal, e.g. a build without GPTNeoXForCausalLM)."""
    from gpt2s.auto import check_model_type
    try:
        check_model_type(model_type(model_dir), model_dir / "config.json")
    except ValueError as e:
        return str(e)
    return None


def token_ids(model_dir: Path) -> tuple[list[int], list[int]]:
    """The 16- and 512-token prompts as the checkpoint's tokenizer encodes them (its
    tokenizer.json, else GPT-2's bundled one), as llama.cpp encodes the same text."""
    tj = model_dir / "tokenizer.json"
    if tj.is_file():
        try:
            from tokenizers import Tokenizer
            tok = Tokenizer.from_file(str(tj))
            return (tok.encode(PROMPT16, add_special_tokens=False).ids,
                    tok.encode(PROMPT512, add_special_tokens=False).ids)
        except ImportError:
            pass
    from gpt2s import get_tokenizer
    enc = get_tokenizer()
    return enc.encode(PROMPT16), enc.encode(PROMPT512)


# ------------------------------------------------------------------------------- training


def train_step_fns(model_dir: Path, threads: int, with_compile: bool, seed: int = 0) -> dict:
    """{engine: one training step} on the same weights and token ids: gpt2s (None when it
    does not load the family), PyTorch eager, torch.compile (when asked for and it compiles:
    the first calls, untimed, compile it)."""
    import numpy as np
    rng = np.random.default_rng(seed)
    fns, notes = {}, []
    if gpt2s_support(model_dir) is None:
        import gpt2s
        gpt2s.set_num_threads(threads)
        g = gpt2s.AutoModelForCausalLM.from_pretrained(model_dir)
        V = g.config.vocab_size
    else:
        g = None
        with open(model_dir / "config.json") as f:
            V = json.load(f)["vocab_size"]
    seq = rng.integers(0, V, (TRAIN_B, TRAIN_T + 1))
    idx, tgt = seq[:, :-1], seq[:, 1:]
    if g is not None:
        g.zero_grad()

        def step_gpt2s():
            g.forward(idx, tgt, return_logits=False)
            g.backward()
        fns["gpt2s"] = (step_gpt2s, g.zero_grad)
    try:
        import torch
        import torch.nn.functional as F
        import transformers
    except ImportError as e:
        notes.append(f"PyTorch/transformers missing ({e}): no PyTorch timings")
        return {"fns": fns, "notes": notes}
    torch.set_num_threads(threads)
    tm = transformers.AutoModelForCausalLM.from_pretrained(str(model_dir),
                                                           dtype=torch.float32)
    tm.train()
    ti, tt = torch.from_numpy(idx), torch.from_numpy(tgt)

    def torch_step(module):
        def step():
            logits = module(input_ids=ti).logits
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tt.reshape(-1))
            loss.backward()
        return step

    def torch_zero():
        tm.zero_grad(set_to_none=True)

    fns["pytorch eager"] = (torch_step(tm), torch_zero)
    if with_compile:
        try:
            compiled = torch.compile(tm)
            t0 = time.perf_counter()
            for _ in range(2):   # compiles forward and backward
                torch_zero()
                torch_step(compiled)()
            notes.append(f"torch.compile: first two steps (compiling) took "
                         f"{time.perf_counter() - t0:.1f} s")
            fns["torch.compile"] = (torch_step(compiled), torch_zero)
        except Exception as e:   # noqa: BLE001 (reported: the others still run)
            notes.append(f"torch.compile failed: {type(e).__name__}: {str(e)[:300]}")
    return {"fns": fns, "notes": notes}


def time_training(model_dir: Path, threads: int, rounds: int, with_compile: bool,
                  settle: float) -> dict:
    """Each engine's step once untimed, then `rounds` rounds of one timed step each (the
    order reversed every other round), the gradients zeroed untimed before every step."""
    made = train_step_fns(model_dir, threads, with_compile)
    results = {k: [] for k in made["fns"]}
    for name, (step, zero) in made["fns"].items():   # warm-up
        zero()
        step()
    guard = harness.QuietGuard(0.0)
    for rnd in range(rounds):
        order = list(made["fns"].items())
        if rnd % 2:
            order.reverse()
        snap = harness.cpu_snapshot()
        for name, (step, zero) in order:
            zero()
            results[name].append(harness.time_call(step, settle))
        guard.loads.append(harness.other_load(snap, harness.cpu_snapshot()))
    out = {name: harness.summarize_times(ts) for name, ts in results.items()}
    return {"engines": out, "notes": made["notes"], "other_load_per_round": guard.loads,
            "batch": TRAIN_B, "seq": TRAIN_T, "threads": threads}


# ------------------------------------------------------------------------------- report


def _m(runs: list, key: str):
    return median([r.get(key) for r in runs])


def summarize(results: dict) -> list[dict]:
    rows = []
    g, l = results["runs"]["gpt2s"], results["runs"]["llama.cpp"]
    for dtype, lq, _, target in PAIRS:
        if dtype not in g:
            continue
        gd, ld = g[dtype], l.get(lq, {})

        def ratio(metric, gv, lv, tgt):
            rows.append({"metric": metric, "precision": f"{dtype} / {lq}", "gpt2s": gv,
                         "reference": lv, "value": gv / lv if gv and lv else None,
                         "target": tgt, "kind": "ratio",
                         "met": None if not (gv and lv) else gv / lv >= tgt})

        ratio("decode tok/s", _m(gd["decode"], "decode_tok_s"),
              _m(ld.get("decode", []), "decode_tok_s"), target)
        ratio("prefill 16 tok/s", _m(gd["decode"], "prefill_tok_s"),
              _m(ld.get("decode", []), "prefill_tok_s"), PREFILL_TARGET)
        ratio("prefill 512 tok/s", _m(gd["prefill512"], "prefill_tok_s"),
              _m(ld.get("prefill512", []), "prefill_tok_s"), PREFILL_TARGET)
        gr, lr = _m(gd["decode"], "peak_rss_mib"), _m(ld.get("decode", []), "peak_rss_mib")
        rows.append({"metric": "peak RSS MiB (decode run)", "precision": f"{dtype} / {lq}",
                     "gpt2s": gr, "reference": lr, "kind": "rss",
                     "value": gr - lr if gr and lr else None, "target": RSS_SLACK_MIB,
                     "met": None if not (gr and lr) else gr - lr <= RSS_SLACK_MIB})
    tr = (results.get("train") or {}).get("engines", {})
    ours = tr.get("gpt2s", {}).get("median_s")
    for peer, tgt in (("pytorch eager", TRAIN_EAGER_TARGET), ("torch.compile", 1.0)):
        theirs = tr.get(peer, {}).get("median_s")
        v = ours / theirs if ours and theirs else None
        rows.append({"metric": f"train step s (B={TRAIN_B}, T={TRAIN_T})",
                     "precision": f"float32 / {peer}", "gpt2s": ours, "reference": theirs,
                     "value": v, "target": tgt, "kind": "time",
                     "met": None if v is None else (v <= tgt if tgt < 1.0 else v < tgt)})
    return rows


def _f(x, fmt="{:.1f}"):
    return "-" if x is None else fmt.format(x)


def format_report(results: dict) -> str:
    meta = results["meta"]
    lines = [f"## {meta['model']} ({meta['model_type']}): gpt2s vs llama.cpp and PyTorch",
             "", f"{meta['cpu']} ({', '.join(meta['isa'])}), {meta['threads']} threads, "
             f"{meta['rounds']} inference / {meta.get('train_rounds')} training rounds, "
             f"medians; other processes' load median "
             f"{_f(meta.get('other_load_median'), '{:.2f}')} cores (noisy when well above 0)",
             "", "| metric | gpt2s / reference | gpt2s | reference | ratio | target | met |",
             "|---|---|---|---|---|---|---|"]
    for r in results["summary"]:
        if r["kind"] == "rss":
            val, tgt = _f(r["value"], "{:+.0f} MiB"), f"<= +{r['target']} MiB"
            gv, rv = _f(r["gpt2s"], "{:.0f}"), _f(r["reference"], "{:.0f}")
        elif r["kind"] == "time":
            val = _f(r["value"], "{:.2f}x")
            tgt = f"<= {r['target']}x" if r["target"] < 1.0 else "< 1.0x"
            gv, rv = _f(r["gpt2s"], "{:.3f}"), _f(r["reference"], "{:.3f}")
        else:
            val, tgt = _f(r["value"], "{:.2f}x"), f">= {r['target']}x"
            gv, rv = _f(r["gpt2s"]), _f(r["reference"])
        met = {True: "yes", False: "NO", None: "-"}[r["met"]]
        lines.append(f"| {r['metric']} | {r['precision']} | {gv} | {rv} | {val} | {tgt} | "
                     f"{met} |")
    for n in results["notes"] + (results.get("train") or {}).get("notes", []):
        lines.append(f"\n- {n}")
    return "\n".join(lines)


# --------------------------------------------------------------------------------- main


def _parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--anchors", type=Path, default=Path(os.environ.get("ANCHORS",
                                                                       "/tmp/anchors")))
    p.add_argument("--model", type=Path, default=None,
                   help="checkpoint directory (default: ANCHORS/smollm2-135m-random)")
    p.add_argument("--gguf-prefix", default=None,
                   help="llama.cpp's files are ANCHORS/gguf/PREFIX-{f32,f16,q8_0}.gguf "
                        "(default: the model directory's name)")
    p.add_argument("--rounds", type=int, default=3, help="default: %(default)s")
    p.add_argument("--train-rounds", type=int, default=5, help="default: %(default)s")
    p.add_argument("--new", type=int, default=128, help="new tokens (default: %(default)s)")
    p.add_argument("--threads", type=int, default=2, help="default: %(default)s")
    p.add_argument("--dtypes", default="float32,bfloat16,int8")
    p.add_argument("--skip-llama", action="store_true", help="no llama.cpp runs")
    p.add_argument("--skip-inference", action="store_true", help="training only")
    p.add_argument("--skip-train", action="store_true", help="no training step timings")
    p.add_argument("--no-compile", action="store_true", help="no torch.compile peer")
    p.add_argument("--settle", type=float, default=0.1,
                   help="idle seconds before each timed training step (default: %(default)s)")
    p.add_argument("--wait-quiet", type=float, default=0.0, metavar="S",
                   help="before each process wait up to S s for other processes to go quiet")
    p.add_argument("--max-other-load", type=float, default=0.25, metavar="CORES",
                   help="redo a gpt2s/llama.cpp pair disturbed beyond this (at most 2 redos)")
    p.add_argument("--out", type=Path, default=None,
                   help="results JSON (default: benchmarks/results/families-<model>.json)")
    return p


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    args.model = (args.model or args.anchors / "smollm2-135m-random").resolve()
    if not (args.model / "config.json").is_file():
        raise SystemExit(f"error: no checkpoint at {args.model} (config.json): build the "
                         f"peers with ../shared/peers/setup.sh or pass --model")
    prefix = args.gguf_prefix or args.model.name
    args.out = args.out or HERE / "results" / f"families-{args.model.name}.json"
    args.llama_bin = args.anchors / "llama-build" / "bin"
    dtypes = [d.strip() for d in args.dtypes.split(",") if d.strip()]
    pairs = [p for p in PAIRS if p[0] in dtypes]
    if len(pairs) != len(dtypes):
        raise SystemExit(f"error: --dtypes: a comma list of {[p[0] for p in PAIRS]}")
    unsupported = gpt2s_support(args.model)
    mt = model_type(args.model)
    results = {"meta": machine_info(args.threads), "runs": {"gpt2s": {}, "llama.cpp": {}},
               "notes": [], "errors": [], "discarded": []}
    results["meta"].update(model=str(args.model), model_type=mt, rounds=args.rounds,
                           train_rounds=args.train_rounds, new_tokens=args.new,
                           loadavg_start=list(os.getloadavg()))
    if unsupported:
        msg = (f"gpt2s does not load this checkpoint's family ({mt}) in this build: "
               f"{unsupported}; only the peers are timed")
        results["notes"].append(msg)
        log(msg)
    ggufs = {lq: args.anchors / "gguf" / f"{prefix}-{suffix}.gguf" for _, lq, suffix, _ in pairs}
    run_llama = not args.skip_llama
    if run_llama:
        missing = [str(p) for p in [args.llama_bin / "llama-completion", *ggufs.values()]
                   if not p.exists()]
        if missing:
            msg = "llama.cpp peers missing (../shared/peers/setup.sh): " + ", ".join(missing)
            results["notes"].append(msg)
            log(msg)
            run_llama = False
    loads = []
    if not args.skip_inference and (run_llama or not unsupported):
        ids16, ids512 = token_ids(args.model)
        results["meta"].update(n_prompt16=len(ids16), n_prompt512=len(ids512))
        with tempfile.TemporaryDirectory(prefix="families_") as td:
            tmp = Path(td)
            files = {}
            for name, ids in (("ids16", ids16), ("ids512", ids512)):
                files[name] = tmp / f"{name}.txt"
                files[name].write_text(" ".join(map(str, ids)) + "\n")
            (tmp / "prompt16.txt").write_text(PROMPT16)
            (tmp / "prompt512.txt").write_text(PROMPT512)
            run = Runner(args.threads, tmp, args.wait_quiet, log)
            for dtype, lq, _, _ in pairs:
                if not unsupported:
                    results["runs"]["gpt2s"][dtype] = {"decode": [], "prefill512": []}
                if run_llama:
                    results["runs"]["llama.cpp"][lq] = {"gguf": str(ggufs[lq]), "decode": [],
                                                        "prefill512": []}
            for rnd in range(args.rounds):
                first_ours = rnd % 2 == 0
                log(f"round {rnd + 1}/{args.rounds} (load average {os.getloadavg()[0]:.2f})")
                for dtype, lq, _, _ in pairs:
                    gguf = ggufs[lq]
                    jobs = (
                        ("decode",
                         lambda: ours(run, args, "decode", dtype, files["ids16"]),
                         lambda: llama_completion(run, args, gguf, tmp / "prompt16.txt",
                                                  args.new, 256, f"llama-completion {lq} "
                                                  f"16+{args.new}")),
                        ("prefill512",
                         lambda: ours(run, args, "prefill", dtype, files["ids512"]),
                         lambda: llama_completion(run, args, gguf, tmp / "prompt512.txt", 1,
                                                  1024, f"llama-completion {lq} prefill 512")))
                    for key, ours_fn, llama_fn in jobs:
                        named = ([] if unsupported else [("gpt2s", ours_fn)]) + \
                            ([("llama.cpp", llama_fn)] if run_llama else [])
                        if not first_ours:
                            named.reverse()

                        def run_pair(named=named):
                            got = [(e, fn()) for e, fn in named]
                            return got, max((r.get("other_load") or 0.0) for _, r in got)

                        def discard(worst, key=key):
                            results["discarded"].append({"round": rnd, "key": key,
                                                         "other_load": worst})
                            log(f"  (other processes used {worst:.2f} cores: redone)")

                        got, _, attempt = redo_while_disturbed(run_pair, args.max_other_load,
                                                               REDO, discard)
                        for engine, r in got:
                            r.pop("text", None)
                            r["round"], r["attempt"] = rnd, attempt
                            loads.append(r.get("other_load"))
                            results["runs"][engine][dtype if engine == "gpt2s" else lq][
                                key].append(r)
            for lq, l in results["runs"]["llama.cpp"].items():
                for key, n in (("decode", len(ids16)), ("prefill512", len(ids512))):
                    seen = {r["n_prompt"] for r in l[key]}
                    if seen != {n}:
                        results["notes"].append(f"llama.cpp {lq} {key}: its prompt had {seen} "
                                                f"tokens, gpt2s's {n} (a BOS token?)")
    if not args.skip_train:
        log(f"training steps (B={TRAIN_B}, T={TRAIN_T}, {args.train_rounds} rounds)")
        results["train"] = time_training(args.model, args.threads, args.train_rounds,
                                         not args.no_compile, args.settle)
        loads += results["train"]["other_load_per_round"]
    loads = [x for x in loads if x is not None]
    results["meta"]["other_load_median"] = median(loads)
    results["meta"]["loadavg_end"] = list(os.getloadavg())
    results["summary"] = summarize(results)
    report = format_report(results)
    results["report"] = report
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp_out = args.out.with_suffix(args.out.suffix + ".tmp")
    tmp_out.write_text(json.dumps(results, indent=1, default=str))
    os.replace(tmp_out, args.out)
    print(report)
    log(f"\nresults: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
