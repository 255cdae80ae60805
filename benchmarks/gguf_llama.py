"""GGUF interop against llama.cpp (issue 26): greedy tokens both ways.  Benchmark-only: it needs
the peers built by ../shared/peers/setup.sh in ANCHORS (default /tmp/anchors): llama.cpp's
``llama-completion`` and static libraries, its GGUF conversions of ``gpt2-random`` and the
random GPT-2 itself.

(a) gpt2s on llama.cpp's GGUF files (``ANCHORS/gguf/gpt2-random-{f32,f16,q8_0,q4_0,...}.gguf``,
    loaded with ``GPT2.from_gguf`` in the file's own storage) against gpt2s on the original
    safetensors: the greedy continuation (64 tokens) of a 16-token prompt, position by
    position, against float32 and against gpt2s's own quantization of the safetensors to the
    same storage; whether the stored blocks are the same bytes; and llama-completion's own
    greedy tokens on the same file against gpt2s's.
(b) llama.cpp on GGUF files gpt2s exported (``save_gguf``, float32 / bfloat16 / int8 / int4):
    teacher-forced, llama.cpp's logits (benchmarks/llama_logits.cpp) for the prompt followed by
    gpt2s's 64 greedy tokens: its argmax at each step must be gpt2s's next token (then greedy
    decoding in llama.cpp produces the same 64 tokens, step by step); and
    ``llama-completion --temp 0 --no-repack`` run on the file, its text compared with gpt2s's
    (--no-repack: this build's repacked quantized CPU path dies of SIGILL here).

    python benchmarks/gguf_llama.py [--anchors /tmp/anchors] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from vs_llama_cpp import PROMPT16, compile_llama_logits, machine_info

NEW = 64
LLAMA_FILES = {"f32": "float32", "f16": "float32", "bf16": "bfloat16", "q8_0": "int8",
               "q8_0-llq": "int8", "q4_0": "int4", "q4_k_m": "float32"}


def greedy(model, ids, n=NEW) -> list[int]:
    return [int(t) for t in model.generate(np.array([ids]), n, temperature=0)[0, len(ids):]]


def matches(a, b) -> dict:
    same = [x == y for x, y in zip(a, b)]
    prefix = next((i for i, s in enumerate(same) if not s), len(same))
    return {"equal_positions": int(sum(same)), "common_prefix": prefix, "of": len(same)}


def run_llama_logits(exe: Path, gguf: Path, ids: list[int], tmp: Path, threads: int):
    ids_file, out = tmp / "ids.txt", tmp / "logits.f32"
    ids_file.write_text(" ".join(map(str, ids)))
    subprocess.run([str(exe), str(gguf), str(ids_file), str(out), str(threads)], check=True,
                   capture_output=True, text=True, timeout=1800)
    return np.fromfile(out, np.float32).reshape(len(ids), -1)


def run_completion(bin_dir: Path, gguf: Path, tmp: Path, threads: int) -> str:
    prompt = tmp / "prompt.txt"
    prompt.write_text(PROMPT16)
    p = subprocess.run([str(bin_dir / "llama-completion"), "-m", str(gguf), "-f", str(prompt),
                        "-n", str(NEW), "-t", str(threads), "-tb", str(threads), "--temp", "0",
                        "--ignore-eos", "-no-cnv", "-c", "256", "--no-repack"],
                       capture_output=True, text=True, timeout=1800, stdin=subprocess.DEVNULL)
    if p.returncode != 0:
        raise RuntimeError(f"llama-completion on {gguf} failed:\n{p.stderr[-3000:]}")
    text = p.stdout
    text = text[text.find(PROMPT16) + len(PROMPT16):] if PROMPT16 in text else text
    return text.removesuffix("\n\n")   # (llama-completion ends its output with two newlines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--anchors", type=Path, default=Path(os.environ.get("ANCHORS",
                                                                        "/tmp/anchors")))
    ap.add_argument("--gguf-dir", type=Path, help="llama.cpp's conversions (default: "
                    "ANCHORS/gguf)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", type=Path, help="write the results here too")
    args = ap.parse_args(argv)
    import gpt2s
    from gpt2s import GPT2, get_tokenizer
    gpt2s.set_num_threads(args.threads)
    A = args.anchors
    args.gguf_dir = args.gguf_dir or A / "gguf"
    bin_dir = A / "llama-build" / "bin"
    if not (A / "gpt2-random").exists():
        print(f"missing {A / 'gpt2-random'}: run bash ../shared/peers/setup.sh", file=sys.stderr)
        return 2
    have_llama = (bin_dir / "llama-completion").exists()
    enc = get_tokenizer()
    ids = enc.encode(PROMPT16)
    assert len(ids) == 16, len(ids)
    results = {"machine": machine_info(args.threads), "prompt_ids": ids, "new": NEW,
               "a_gpt2s_on_llama_gguf": {}, "b_llama_on_gpt2s_gguf": {}}
    src = GPT2.from_safetensors(A / "gpt2-random")
    own = {"float32": src}
    ref_tokens = {"float32": greedy(src, ids)}
    for dt in ("bfloat16", "int8", "int4"):
        own[dt] = src.to_dtype(dt)
        ref_tokens[dt] = greedy(own[dt], ids)
    results["gpt2s_safetensors_tokens"] = ref_tokens

    # (a) gpt2s on llama.cpp's conversions
    for tag, want_dtype in LLAMA_FILES.items():
        path = args.gguf_dir / f"gpt2-random-{tag}.gguf"
        if not path.exists():
            continue
        m = GPT2.from_gguf(path)
        toks = greedy(m, ids)
        r = {"file": str(path), "dtype": m.dtype, "tokens": toks,
             "vs_float32": matches(toks, ref_tokens["float32"])}
        if m.dtype != "float32":
            r[f"vs_gpt2s_{m.dtype}"] = matches(toks, ref_tokens[m.dtype])
            same = total = 0
            codes = [0, 0]
            scales = [0, 0]
            for name, w in m.params.items():
                o = own[m.dtype].params[name]
                if hasattr(w, "type_name") and getattr(o, "type_name", None) == w.type_name:
                    total += 1
                    same += bool(np.array_equal(w.data, o.data)
                                 and (w.scales is None or np.array_equal(w.scales, o.scales)))
                    codes[0] += int(np.sum(w.data == o.data))
                    codes[1] += w.data.size
                    if w.scales is not None:
                        scales[0] += int(np.sum(w.scales == o.scales))
                        scales[1] += w.scales.size
            r["stored_tensors_identical_to_gpt2s_quantization"] = f"{same} of {total}"
            r["stored_bytes_equal_fraction"] = codes[0] / max(codes[1], 1)
            r["scales_equal_fraction"] = scales[0] / max(scales[1], 1) if scales[1] else None
        logits = m.forward(np.array([ids + ref_tokens["float32"]]))[0][0]
        want = src.forward(np.array([ids + ref_tokens["float32"]]))[0][0]
        r["logits_rel_l2_vs_float32"] = float(np.linalg.norm(logits - want)
                                              / np.linalg.norm(want))
        if have_llama:   # llama.cpp's own greedy tokens on the same file
            with tempfile.TemporaryDirectory() as d:
                try:
                    text = run_completion(bin_dir, path, Path(d), args.threads)
                    r["llama_completion_same_file"] = matches(
                        enc.encode(text, allowed_special="all"), toks)
                except RuntimeError as e:
                    r["llama_completion_error"] = str(e)[-800:]
            if m.dtype != "float32" and "llama_completion_same_file" in r:
                # the file's values widened exactly (a tensor of another block type, like
                # llama-quantize's Q6_K token_embd in its Q4_0 files, is not quantized again)
                f = GPT2.from_gguf(path, dtype="float32")
                r["float32_widened_vs_llama_completion"] = matches(
                    enc.encode(text, allowed_special="all"), greedy(f, ids))
                del f
        results["a_gpt2s_on_llama_gguf"][tag] = r
        print(f"(a) {tag:9s} as {m.dtype:8s}: vs float32 {r['vs_float32']}"
              + (f"; vs gpt2s {m.dtype} {r[f'vs_gpt2s_{m.dtype}']}; stored blocks identical "
                 f"{r['stored_tensors_identical_to_gpt2s_quantization']} (codes equal "
                 f"{r['stored_bytes_equal_fraction']:.4f}, scales "
                 f"{r['scales_equal_fraction'] or 0:.4f})"
                 if m.dtype != "float32" else "")
              + f"; llama-completion on the same file vs gpt2s on it "
                f"{r.get('llama_completion_same_file', r.get('llama_completion_error'))}"
              + (f"; loaded as float32 (widened exactly) vs llama-completion "
                 f"{r['float32_widened_vs_llama_completion']}"
                 if "float32_widened_vs_llama_completion" in r else ""), flush=True)

    # (b) llama.cpp on gpt2s's exports
    if not have_llama:
        print(f"(b) skipped: no {bin_dir / 'llama-completion'} (../shared/peers/setup.sh)",
              file=sys.stderr)
        if args.json:
            args.json.write_text(json.dumps(results, indent=1))
        return 1
    exe = None
    try:
        exe = compile_llama_logits(A, Path(tempfile.gettempdir()) / "gpt2s-bench-cache")
    except Exception as e:   # noqa: BLE001 (reported; the completion check still runs)
        results["llama_logits_error"] = str(e)
        print(f"llama_logits not built: {e}", file=sys.stderr)
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        for dt in ("float32", "bfloat16", "int8", "int4"):
            m = own[dt]
            path = m.save_gguf(tmp / f"gpt2s-{dt}.gguf")
            toks = ref_tokens[dt]
            r = {"dtype": dt, "gpt2s_tokens": toks}
            if exe is not None:
                seq = ids + toks
                try:
                    theirs = run_llama_logits(exe, path, seq, tmp, args.threads)
                except subprocess.CalledProcessError as e:
                    theirs = None
                    r["llama_logits_error"] = f"exit {e.returncode}: {e.stderr[-500:]}"
                    print(f"(b) {dt}: llama_logits failed ({r['llama_logits_error']})",
                          flush=True)
            if exe is not None and theirs is not None:
                mine = m.forward(np.array([seq]))[0][0]
                steps = range(len(ids) - 1, len(seq) - 1)
                argmax = [int(np.argmax(theirs[p])) for p in steps]
                r["teacher_forced_argmax"] = matches(argmax, toks)
                r["logits_rel_l2_llama_vs_gpt2s"] = float(np.linalg.norm(theirs - mine)
                                                          / np.linalg.norm(mine))
                top2 = np.sort(mine[list(steps)], axis=1)[:, -2:]
                r["gpt2s_min_top1_top2_gap"] = float(np.min(top2[:, 1] - top2[:, 0]))
            try:
                text = run_completion(bin_dir, path, tmp, args.threads)
            except RuntimeError as e:
                r["llama_completion_error"] = str(e)[-800:]
                results["b_llama_on_gpt2s_gguf"][dt] = r
                print(f"(b) {dt}: {r['llama_completion_error']}", flush=True)
                continue
            mine_text = enc.decode(toks)
            r["llama_completion_text_equal"] = text == mine_text
            r["llama_completion_tokens"] = matches(enc.encode(text, allowed_special="all"), toks)
            if text != mine_text:
                r["llama_completion_text"] = text
                r["gpt2s_text"] = mine_text
                # gpt2s's margin where llama.cpp left its tokens: a near-tie, or a real error?
                at = r["llama_completion_tokens"]["common_prefix"]
                if at < len(toks):
                    lg = m.forward(np.array([ids + toks[:at]]))[0][0, -1]
                    top2 = np.sort(lg)[-2:]
                    r["gpt2s_top1_top2_gap_at_divergence"] = float(top2[1] - top2[0])
            results["b_llama_on_gpt2s_gguf"][dt] = r
            print(f"(b) gpt2s {dt:8s} export: llama.cpp teacher-forced argmax "
                  f"{r.get('teacher_forced_argmax')}, logits rel L2 "
                  f"{r.get('logits_rel_l2_llama_vs_gpt2s', float('nan')):.2e}; "
                  f"llama-completion text equal: {r['llama_completion_text_equal']} "
                  f"{r['llama_completion_tokens']}", flush=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
