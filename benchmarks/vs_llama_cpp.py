"""gpt2s against llama.cpp at three precisions, whole process against whole process (issue 11).

    python benchmarks/vs_llama_cpp.py --anchors /tmp/anchors --rounds 3 --out results.json

Both engines run the same random GPT-2 124M (gpt2s from the transformers-saved
``ANCHORS/gpt2-random``, llama.cpp from its own F32/F16/Q8_0 GGUF conversions of it), on the
same token ids, with the same thread count, in fresh processes, alternating gpt2s and llama.cpp
in every round (which one goes first alternates between rounds).  Medians over the rounds.
benchmarks/README.md explains each column.  Measurements only: nothing here asserts a speed.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import harness
from harness import cpu_snapshot, median, other_load, redo_while_disturbed, rel_l2, wait_quiet

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
RUNNER = HERE / "gpt2s_runner.py"
LOGITS_CPP = HERE / "llama_logits.cpp"

# (gpt2s dtype, llama.cpp type name, GGUF file suffix): the pairs the issues compare (11:
# float32, bfloat16, int8; 26: int4 against both 4-bit formats llama.cpp users pick)
PAIRS = (("float32", "F32", "f32"), ("bfloat16", "F16", "f16"), ("int8", "Q8_0", "q8_0"),
         ("int4", "Q4_0", "q4_0"), ("int4", "Q4_K_M", "q4_k_m"))
# the issues' targets: gpt2s / llama.cpp batch-1 decode tokens/s at each precision, prefill
# rates (None: reported only), and gpt2s's batch-8 decode rate against its own float32 one
DECODE_TARGETS = {"float32": 1.0, "bfloat16": 1.1, "int8": 1.1, "int4": 1.1}
PREFILL_TARGETS = {"int4": 1.0}
BATCH8_TARGETS = {"bfloat16": 1.6, "int8": 2.5}
RSS_SLACK_MIB = 64
REDO = 2   # redos of a disturbed pair of runs
# 16 GPT-2 BPE tokens (checked at start-up); the 512-token prompt is " the" 512 times, one
# token each in both tokenizers (the count each engine saw is recorded and checked)
PROMPT16 = "The meaning of life is a question that has puzzled philosophers and scientists " \
           "for centuries."
PROMPT512 = " the" * 512


# ------------------------------------------------------------------------- parsing llama.cpp

def parse_completion_timings(text: str) -> dict:
    """Prefill and decode rates from llama-completion's performance lines (stderr):
    ``prompt eval time = X ms / N tokens`` and ``eval time = Y ms / M runs``.  Rates are
    recomputed from the milliseconds (the printed tokens/s are rounded)."""
    pre = re.search(r"prompt eval time\s*=\s*([\d.]+) ms\s*/\s*(\d+) tokens", text)
    dec = re.search(r"(?<!prompt )\beval time\s*=\s*([\d.]+) ms\s*/\s*(\d+) (?:runs|tokens)",
                    text)
    if not pre or not dec:
        raise ValueError("llama-completion printed no 'prompt eval time' / 'eval time' lines")
    pre_ms, n_prompt = float(pre.group(1)), int(pre.group(2))
    dec_ms, runs = float(dec.group(1)), int(dec.group(2))
    return {"n_prompt": n_prompt, "prefill_s": pre_ms / 1e3,
            "prefill_tok_s": n_prompt / (pre_ms / 1e3) if pre_ms > 0 else None,
            "decode_calls": runs, "decode_s": dec_ms / 1e3,
            "decode_tok_s": runs / (dec_ms / 1e3) if runs and dec_ms > 0 else None}


def parse_batched_bench(text: str) -> list[dict]:
    """The rows of llama-batched-bench's markdown table, keyed by its header (PP, TG, B, N_KV,
    T_PP s, S_PP t/s, T_TG s, S_TG t/s, T s, S t/s), numbers as floats."""
    header, rows = None, []
    for line in text.splitlines():
        line = line.strip()
        if not line.startswith("|"):
            continue
        cells = [c.strip() for c in line.strip("|").split("|")]
        if header is None:
            if "S_TG t/s" in cells:
                header = cells
            continue
        if all(set(c) <= set("-: ") for c in cells):
            continue
        try:
            rows.append(dict(zip(header, (float(c) for c in cells))))
        except ValueError:
            continue
    if not rows:
        raise ValueError("llama-batched-bench printed no results table")
    return rows


def parse_time_v(text: str) -> dict:
    """Peak RSS (MiB) and CPU seconds from GNU time -v's report."""
    m = re.search(r"Maximum resident set size \(kbytes\):\s*(\d+)", text)
    if not m:
        raise ValueError("no 'Maximum resident set size' in /usr/bin/time -v's report")
    out = {"peak_rss_mib": int(m.group(1)) / 1024}
    for key, label in (("user_s", "User time (seconds)"), ("sys_s", "System time (seconds)")):
        m = re.search(re.escape(label) + r":\s*([\d.]+)", text)
        if m:
            out[key] = float(m.group(1))
    return out


# ------------------------------------------------------------------------------------- GGUF

GGML_TYPES = {0: ("F32", 1, 4), 1: ("F16", 1, 2), 2: ("Q4_0", 32, 18), 3: ("Q4_1", 32, 20),
              6: ("Q5_0", 32, 22), 7: ("Q5_1", 32, 24), 8: ("Q8_0", 32, 34),
              10: ("Q2_K", 256, 84), 11: ("Q3_K", 256, 110), 12: ("Q4_K", 256, 144),
              13: ("Q5_K", 256, 176), 14: ("Q6_K", 256, 210), 30: ("BF16", 1, 2)}          # type id: (name, block size, bytes per block)
_GGUF_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q",
                 11: "q", 12: "d"}


def gguf_tensors(path) -> list[dict]:
    """The tensor table of a GGUF file (v2/v3): name, type name, shape (ne0 first: ne0 is the
    row length) and bytes of each tensor.  Metadata values are skipped, not interpreted."""
    with open(path, "rb") as f:
        def read(fmt):
            size = struct.calcsize("<" + fmt)
            data = f.read(size)
            if len(data) != size:
                raise ValueError(f"{path}: truncated GGUF header")
            return struct.unpack("<" + fmt, data)

        def string():
            (n,) = read("Q")
            return f.read(n).decode("utf-8", "replace")

        def skip_value(vtype):
            if vtype == 8:
                (n,) = read("Q")
                f.seek(n, 1)
            elif vtype == 9:
                etype, n = read("IQ")
                if etype in _GGUF_SCALARS:
                    f.seek(n * struct.calcsize("<" + _GGUF_SCALARS[etype]), 1)
                else:
                    for _ in range(n):
                        skip_value(etype)
            elif vtype in _GGUF_SCALARS:
                read(_GGUF_SCALARS[vtype])
            else:
                raise ValueError(f"{path}: unknown GGUF value type {vtype}")

        if f.read(4) != b"GGUF":
            raise ValueError(f"{path}: not a GGUF file")
        (version,) = read("I")
        if version < 2:
            raise ValueError(f"{path}: GGUF version {version} is not supported")
        n_tensors, n_kv = read("QQ")
        for _ in range(n_kv):
            string()
            (vtype,) = read("I")
            skip_value(vtype)
        tensors = []
        for _ in range(n_tensors):
            name = string()
            (n_dims,) = read("I")
            shape = list(read("Q" * n_dims))
            ttype, _offset = read("IQ")
            if ttype not in GGML_TYPES:
                raise ValueError(f"{path}: tensor {name!r} has ggml type {ttype}, unknown here")
            tname, blck, tsize = GGML_TYPES[ttype]
            n = 1
            for d in shape:
                n *= d
            tensors.append({"name": name, "type": tname, "shape": shape,
                            "nbytes": n // blck * tsize, "row_bytes": shape[0] // blck * tsize})
    return tensors


def gguf_weight_bytes_per_token(tensors: list[dict]) -> int:
    """Bytes of weights one decoding step reads: every tensor once, except one row of the
    position embedding, and one row of the token embedding when a separate output.weight is
    the output head (else token_embd is the tied head and is read whole)."""
    names = {t["name"] for t in tensors}
    total = 0
    for t in tensors:
        if t["name"] == "position_embd.weight" or (t["name"] == "token_embd.weight"
                                                   and "output.weight" in names):
            total += t["row_bytes"]
        else:
            total += t["nbytes"]
    return total


def gguf_matmul_types(tensors: list[dict]) -> dict:
    """How many tensors of each ggml type the file holds (e.g. {'Q8_0': 49, 'F32': 100})."""
    out = {}
    for t in tensors:
        out[t["type"]] = out.get(t["type"], 0) + 1
    return out


# ----------------------------------------------------------------------------- machine, load

def machine_info(threads: int) -> dict:
    lscpu = {}
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        for line in out.splitlines():
            k, _, v = line.partition(":")
            if k.strip() in ("Model name", "CPU family", "Model", "Hypervisor vendor",
                             "L2 cache", "L3 cache", "CPU(s)"):
                lscpu[k.strip()] = v.strip()
    except (OSError, subprocess.SubprocessError):
        pass
    machine = harness.announce_machine(REPO, file=sys.stderr)
    return {"cpu": machine["cpu"], "lscpu": lscpu, "isa": machine["isa"],
            "cpu_levels": machine["cpu_levels"], "kernels": machine["kernels"],
            "cores": machine["cores"], "mem_gib": machine["mem_gib"],
            "platform": machine["platform"], "python": machine["python"],
            "git": machine["git"], "threads": threads,
            "env": {k: os.environ.get(k) for k in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS",
                                                     "OPENBLAS_CORETYPE", "GPT2S_LOWP")}}


# ------------------------------------------------------------------------------ subprocesses

# GNU time -v's report, for machines without /usr/bin/time: fork+exec the command from this
# small interpreter (so its ru_maxrss is its own) and write the lines parse_time_v reads.
_LAUNCHER = """import os, sys
pid = os.fork()
if pid == 0:
    try:
        os.execvp(sys.argv[2], sys.argv[2:])
    finally:
        os._exit(127)
_, status, ru = os.wait4(pid, 0)
with open(sys.argv[1], "w") as f:
    f.write(f"User time (seconds): {ru.ru_utime:.2f}\\n"
            f"System time (seconds): {ru.ru_stime:.2f}\\n"
            f"Maximum resident set size (kbytes): {ru.ru_maxrss}\\n")
sys.exit(os.waitstatus_to_exitcode(status))
"""


class Runner:
    """Runs one measured command under GNU time -v (or _LAUNCHER): its peak RSS is then the
    command's own (a process started straight from this one would carry our high-water mark
    into its ru_maxrss: Linux keeps the peak of the address space exec replaces), with
    OMP_NUM_THREADS set,
    recording the CPU that other processes used meanwhile."""

    def __init__(self, threads: int, tmp: Path, quiet_s: float, log, gnu_time: bool = True):
        self.tmp, self.quiet_s, self.log = tmp, quiet_s, log
        self.env = dict(os.environ, OMP_NUM_THREADS=str(threads))
        time_bin = shutil.which("time", path="/usr/bin:/bin") if gnu_time else None
        # without GNU time, a small Python launcher reports the same wait4() figures
        self.prefix = [time_bin, "-v", "-o"] if time_bin else [sys.executable, "-c", _LAUNCHER]
        self.n = 0

    def __call__(self, cmd: list, label: str, timeout: float = 1800) -> dict:
        self.n += 1
        waited, _ = wait_quiet(self.quiet_s)
        report = self.tmp / f"time{self.n}.txt"
        snap = cpu_snapshot()
        t0 = time.perf_counter()
        p = subprocess.run(self.prefix + [str(report)] + [str(c) for c in cmd],
                           capture_output=True, text=True, env=self.env,
                           stdin=subprocess.DEVNULL, timeout=timeout,
                           errors="replace")   # random weights print broken UTF-8
        wall = time.perf_counter() - t0
        load = other_load(snap, cpu_snapshot())
        if p.returncode != 0:
            raise RuntimeError(f"{label} failed (exit {p.returncode}): {' '.join(map(str, cmd))}"
                               f"\n{p.stdout[-2000:]}\n{p.stderr[-3000:]}")
        res = parse_time_v(report.read_text())
        res.update(wall_s=wall, other_load=load, waited_s=waited)
        self.log(f"  {label}: {wall:.1f} s, peak RSS {res['peak_rss_mib']:.0f} MiB, "
                 f"other processes {load if load is not None else float('nan'):.2f} cores")
        return {"stdout": p.stdout, "stderr": p.stderr, "proc": res}


def ours(run: Runner, args, mode: str, dtype: str, ids_file: Path, batch=1, new=None,
         out=None) -> dict:
    cmd = [sys.executable, RUNNER, mode, "--model", args.model, "--dtype", dtype,
           "--ids-file", ids_file, "--threads", args.threads, "--batch", batch,
           "--new", new or args.new] + (["--out", out] if out else [])
    r = run(cmd, f"gpt2s {mode} {dtype} B={batch}")
    res = json.loads(r["stdout"].strip().splitlines()[-1])
    res.update(r["proc"])
    return res


def llama_completion(run: Runner, args, gguf: Path, prompt_file: Path, n_new: int, ctx: int,
                     label: str) -> dict:
    cmd = [args.llama_bin / "llama-completion", "-m", gguf, "-f", prompt_file, "-n", n_new,
           "-t", args.threads, "-tb", args.threads, "--temp", 0, "--ignore-eos", "-no-cnv",
           "-c", ctx]
    r = run(cmd, label)
    res = parse_completion_timings(r["stderr"])
    res.update(r["proc"], text=r["stdout"])
    return res


def llama_batched(run: Runner, args, gguf: Path, label: str) -> dict:
    cmd = [args.llama_bin / "llama-batched-bench", "-m", gguf, "-c", 1024, "-b", 1024,
           "-ub", 512, "-npp", 16, "-ntg", args.new, "-npl", "1,8", "-t", args.threads,
           "-tb", args.threads]
    r = run(cmd, label)
    rows = parse_batched_bench(r["stdout"] + "\n" + r["stderr"])
    by_b = {int(row["B"]): row for row in rows}
    res = {"rows": rows, "decode_tok_s": by_b[8]["S_TG t/s"],
           "decode_tok_s_b1": by_b[1]["S_TG t/s"] if 1 in by_b else None}
    res.update(r["proc"])
    return res


def compile_llama_logits(anchors: Path, cache: Path) -> Path:
    """Build benchmarks/llama_logits.cpp against the anchors' llama.cpp headers and static
    libraries, once per (source, libraries) into the cache directory (outside the repo)."""
    include = [anchors / "llama.cpp" / "include", anchors / "llama.cpp" / "ggml" / "include"]
    libs = sorted((anchors / "llama-build").rglob("*.a"))
    wanted = [l for l in libs if l.name in ("libllama.a", "libggml.a", "libggml-cpu.a",
                                            "libggml-base.a")]
    if len(wanted) < 3:
        raise FileNotFoundError(f"no llama.cpp static libraries (libllama.a, libggml*.a) under "
                                f"{anchors / 'llama-build'}")
    h = hashlib.sha256(LOGITS_CPP.read_bytes())
    for l in wanted:
        st = l.stat()
        h.update(f"{l}:{st.st_size}:{st.st_mtime_ns}".encode())
    exe = cache / f"llama_logits-{h.hexdigest()[:16]}"
    if exe.exists():
        return exe
    cache.mkdir(parents=True, exist_ok=True)
    cxx = os.environ.get("CXX", "g++")
    tmp_exe = exe.with_suffix(".tmp")
    cmd = [cxx, "-O2", "-std=c++17", str(LOGITS_CPP), "-o", str(tmp_exe)] + \
        [f"-I{i}" for i in include] + ["-Wl,--start-group"] + [str(l) for l in wanted] + \
        ["-Wl,--end-group", "-fopenmp", "-lpthread", "-ldl", "-lm"]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    if p.returncode != 0:
        raise RuntimeError(f"compiling {LOGITS_CPP.name} failed:\n{' '.join(cmd)}\n"
                           f"{p.stderr[-4000:]}")
    os.replace(tmp_exe, exe)
    return exe


# ------------------------------------------------------------------------------- statistics

def logits_compare(x, ref) -> dict:
    import numpy as np
    return {"rel_l2": rel_l2(x, ref), "max_abs": float(np.max(np.abs(x - ref))),
            "argmax_agree": float(np.mean(np.argmax(x, -1) == np.argmax(ref, -1)))}


def summarize(results: dict) -> dict:
    """Per engine and precision, the median over rounds of every column of the table, and the
    ratios against the issue's targets."""
    bw = median(r["gbs"] for r in results["bandwidth"])
    rows = []
    seen = set()
    for dtype, lq, _ in PAIRS:
        for engine, key in (("gpt2s", dtype), ("llama.cpp", lq)):
            runs = results["runs"].get(engine, {}).get(key)
            if not runs or (engine, key) in seen:   # int4: one row for its two peers
                continue
            seen.add((engine, key))
            dec, p512, b8 = runs.get("decode", []), runs.get("prefill512", []), \
                runs.get("batch8", [])
            bpt = runs.get("weight_bytes_per_token")
            row = {"engine": engine, "precision": key,
                   "decode_tok_s": median(r["decode_tok_s"] for r in dec),
                   "prefill16_tok_s": median(r["prefill_tok_s"] for r in dec),
                   "prefill512_tok_s": median(r["prefill_tok_s"] for r in p512),
                   "peak_rss_mib": median(r["peak_rss_mib"] for r in dec),
                   "batch8_tok_s": median(r["decode_tok_s"] for r in b8),
                   "weight_bytes_per_token": bpt, "rounds": len(dec)}
            if engine == "llama.cpp":
                row["batch1_s_tg"] = median(r.get("decode_tok_s_b1") for r in b8)
            for col, rate, per in (("frac_ceiling", row["decode_tok_s"], 1),
                                   ("frac_ceiling_b8", row["batch8_tok_s"], 8)):
                row[col] = (bpt * rate / per / (bw * 1e9)) if bpt and rate and bw else None
            rows.append(row)
    by = {(r["engine"], r["precision"]): r for r in rows}
    ratios = []

    def add(metric, precision, ours, theirs, target, kind="ratio"):
        if ours is None or theirs is None:
            value, met = None, None
        elif kind == "ratio":
            value = ours / theirs
            met = None if target is None else value >= target
        else:   # "rss": difference in MiB, at most target
            value = ours - theirs
            met = value <= target
        ratios.append({"metric": metric, "precision": precision, "gpt2s": ours,
                       "reference": theirs, "value": value, "kind": kind, "target": target,
                       "met": met})

    for dtype, lq, _ in PAIRS:
        g, l = by.get(("gpt2s", dtype), {}), by.get(("llama.cpp", lq), {})
        if not g:
            continue
        add("decode tok/s, B=1", f"{dtype} / {lq}", g.get("decode_tok_s"),
            l.get("decode_tok_s"), DECODE_TARGETS[dtype])
        add("prefill 16 tok/s", f"{dtype} / {lq}", g.get("prefill16_tok_s"),
            l.get("prefill16_tok_s"), PREFILL_TARGETS.get(dtype))
        add("prefill 512 tok/s", f"{dtype} / {lq}", g.get("prefill512_tok_s"),
            l.get("prefill512_tok_s"), PREFILL_TARGETS.get(dtype))
        add("peak RSS MiB", f"{dtype} / {lq}", g.get("peak_rss_mib"), l.get("peak_rss_mib"),
            RSS_SLACK_MIB, kind="rss")
    f32 = by.get(("gpt2s", "float32"), {})
    for dtype, target in BATCH8_TARGETS.items():
        g = by.get(("gpt2s", dtype))
        if g:
            add("batch-8 decode tok/s vs gpt2s float32", f"{dtype} / float32",
                g.get("batch8_tok_s"), f32.get("batch8_tok_s"), target)
    q = results.get("quality") or {}
    q8 = (q.get("llama.cpp Q8_0 vs llama.cpp F32") or {}).get("rel_l2")
    for dtype in ("bfloat16", "int8"):
        mine = (q.get(f"gpt2s {dtype} vs gpt2s float32") or {}).get("rel_l2")
        if mine is not None:
            ratios.append({"metric": "logits rel. L2 error vs float32", "precision":
                           f"{dtype} / Q8_0", "gpt2s": mine, "reference": q8,
                           "value": None if q8 is None else mine / q8, "kind": "error",
                           "target": 1.0, "met": None if q8 is None else mine <= q8})
    qk = (q.get("llama.cpp Q4_K_M vs llama.cpp F32") or {}).get("rel_l2")
    mine = (q.get("gpt2s int4 vs gpt2s float32") or {}).get("rel_l2")
    if mine is not None:
        ratios.append({"metric": "logits rel. L2 error vs float32", "precision":
                       "int4 / Q4_K_M", "gpt2s": mine, "reference": qk,
                       "value": None if qk is None else mine / qk, "kind": "error",
                       "target": 1.0, "met": None if qk is None else mine <= qk})
    return {"bandwidth_gbs": bw, "rows": rows, "ratios": ratios}


# ----------------------------------------------------------------------------------- tables

def _f(x, fmt="{:.1f}"):
    return "n/a" if x is None else fmt.format(x)


def _table(header, rows) -> str:
    lines = ["| " + " | ".join(header) + " |",
             "|" + "|".join("---" if i == 0 else "--:" for i in range(len(header))) + "|"]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def _family(meta) -> str:
    ls = meta.get("lscpu") or {}
    if "CPU family" not in ls:
        return ""
    return f", family {ls['CPU family']} model {ls.get('Model', '?')}" + (
        f", {ls['Hypervisor vendor']} guest" if ls.get("Hypervisor vendor") else "")


def format_report(results: dict) -> str:
    meta, summ = results["meta"], results["summary"]
    lines = [f"## gpt2s vs llama.cpp: GPT-2 124M (random weights), {meta['threads']} threads, "
             f"medians of {meta['rounds']} rounds",
             "",
             f"machine: {meta['cpu']}{_family(meta)} "
             f"({meta['lscpu'].get('CPU(s)', meta['cores'])} CPUs, "
             f"ISA {' '.join(meta['isa']) or 'none of avx2/avx512'}; "
             f"{_f(meta.get('mem_gib'))} GiB); {meta['platform']}",
             f"gpt2s {meta['git']}; llama.cpp {meta.get('llama_cpp') or 'n/a'}; "
             f"load average at start {meta['loadavg_start']}, at end {meta.get('loadavg_end')}; "
             f"other processes used {_f(meta.get('other_load_median'), '{:.2f}')} cores "
             f"(median over the kept runs, max {_f(meta.get('other_load_max'), '{:.2f}')}; "
             f"{len(results.get('discarded') or [])} disturbed pairs redone)",
             f"read bandwidth ceiling: {_f(summ['bandwidth_gbs'], '{:.2f}')} GB/s "
             f"({meta.get('bandwidth_method', '')})",
             ""]
    rows = []
    for r in summ["rows"]:
        bpt = r["weight_bytes_per_token"]
        rows.append([r["engine"], r["precision"], _f(r["decode_tok_s"]),
                     _f(r["prefill16_tok_s"]), _f(r["prefill512_tok_s"]),
                     _f(r["peak_rss_mib"], "{:.0f}"), _f(r["batch8_tok_s"]),
                     _f(None if bpt is None else bpt / 1e6, "{:.0f}"),
                     _f(None if r["frac_ceiling"] is None else 100 * r["frac_ceiling"],
                        "{:.0f}%"),
                     _f(None if r["frac_ceiling_b8"] is None else 100 * r["frac_ceiling_b8"],
                        "{:.0f}%")])
    lines.append(_table(["engine", "precision", "decode tok/s (B=1)", "prefill 16 tok/s",
                         "prefill 512 tok/s", "peak RSS MiB", "decode tok/s (B=8)",
                         "weight MB/token", "% BW ceiling (B=1)", "% BW ceiling (B=8)"], rows))
    lines += ["", "### against the targets", ""]
    rows = []
    for r in summ["ratios"]:
        if r["kind"] == "ratio":
            value, target = _f(r["value"], "{:.2f}x"), \
                ("report" if r["target"] is None else f">= {r['target']}x")
            g, ref = _f(r["gpt2s"]), _f(r["reference"])
        elif r["kind"] == "rss":
            value, target = _f(r["value"], "{:+.0f} MiB"), f"<= +{r['target']} MiB"
            g, ref = _f(r["gpt2s"], "{:.0f}"), _f(r["reference"], "{:.0f}")
        else:
            value, target = _f(r["value"], "{:.2f}x"), \
                f"<= llama.cpp {r['precision'].split(' / ')[-1]}'s"
            g, ref = _f(r["gpt2s"], "{:.2e}"), _f(r["reference"], "{:.2e}")
        met = {True: "yes", False: "NO", None: "-"}[r["met"]]
        rows.append([r["metric"], r["precision"], g, ref, value, target, met])
    lines.append(_table(["metric", "gpt2s / reference", "gpt2s", "reference", "ratio",
                         "target", "met"], rows))
    q = results.get("quality") or {}
    if q:
        lines += ["", f"### logits quality ({meta.get('quality_tokens')} token ids, "
                      "every position; relative L2 = |x - ref| / |ref| over all logits)", ""]
        lines.append(_table(["logits", "rel. L2 error", "max abs diff", "same argmax"],
                            [[k, _f(v.get("rel_l2"), "{:.2e}"), _f(v.get("max_abs"), "{:.3g}"),
                              _f(None if v.get("argmax_agree") is None
                                 else 100 * v["argmax_agree"], "{:.1f}%")]
                             for k, v in q.items()]))
    notes = results.get("notes") or []
    if notes:
        lines += [""] + [f"- {n}" for n in notes]
    return "\n".join(lines)


# -------------------------------------------------------------------------------------- main

def _parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--anchors", type=Path, default=Path("/tmp/anchors"),
                   help="llama.cpp build, GGUF files and the random GPT-2 "
                        "(benchmarks/README.md; default: %(default)s)")
    p.add_argument("--model", type=Path, default=None,
                   help="gpt2s's model directory (default: ANCHORS/gpt2-random)")
    p.add_argument("--rounds", type=int, default=3, help="default: %(default)s")
    p.add_argument("--new", type=int, default=128, help="new tokens (default: %(default)s)")
    p.add_argument("--threads", type=int, default=2, help="default: %(default)s")
    p.add_argument("--dtypes", default="float32,bfloat16,int8,int4",
                   help="gpt2s precisions (with their llama.cpp pairs) to run")
    p.add_argument("--quality-tokens", type=int, default=128,
                   help="random token ids whose logits are compared (default: %(default)s)")
    p.add_argument("--bandwidth-mib", type=int, default=1024,
                   help="array size of the read-bandwidth measurement (default: %(default)s)")
    p.add_argument("--wait-quiet", type=float, default=0.0, metavar="S",
                   help="before each run wait up to S s for other processes to use < 0.1 cores")
    p.add_argument("--max-other-load", type=float, default=0.25, metavar="CORES",
                   help="redo a gpt2s/llama.cpp pair of runs during which other processes used "
                        "more CPU than this (default: %(default)s; at most 2 redos)")
    p.add_argument("--skip-llama", action="store_true",
                   help="run only gpt2s's side (no llama.cpp needed)")
    p.add_argument("--cache", type=Path,
                   default=Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
                   / "gpt2s-bench", help="where llama_logits is compiled (default: %(default)s)")
    p.add_argument("--out", type=Path, default=HERE / "results" / "vs_llama_cpp.json",
                   help="results JSON (default: %(default)s)")
    return p


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    args.model = args.model or args.anchors / "gpt2-random"
    args.llama_bin = args.anchors / "llama-build" / "bin"
    dtypes = [d.strip() for d in args.dtypes.split(",") if d.strip()]
    pairs = [p for p in PAIRS if p[0] in dtypes]
    if len({p[0] for p in pairs}) != len(dtypes):
        raise SystemExit(f"error: --dtypes must be a comma list of "
                         f"{[p[0] for p in PAIRS]}, got {args.dtypes!r}")
    if args.rounds < 1 or args.new < 2:
        raise SystemExit("error: --rounds must be >= 1 and --new >= 2")
    model_file = args.model / "model.safetensors" if args.model.is_dir() else args.model
    if not model_file.is_file():
        raise SystemExit(f"error: no model at {args.model} (run the anchors' setup.sh, or "
                         f"pass --model)")
    ggufs = {lq: args.anchors / "gguf" / f"gpt2-random-{suffix}.gguf" for _, lq, suffix in pairs}
    if not args.skip_llama:
        missing = [str(p) for p in [args.llama_bin / "llama-completion",
                                    args.llama_bin / "llama-batched-bench", *ggufs.values()]
                   if not p.exists()]
        if missing:
            raise SystemExit("error: llama.cpp anchors missing (build them with "
                             "../shared/peers/setup.sh, or --skip-llama):\n  "
                             + "\n  ".join(missing))

    def log(msg):
        print(msg, file=sys.stderr, flush=True)

    import numpy as np

    from gpt2s import get_tokenizer
    enc = get_tokenizer()
    ids16, ids512 = enc.encode(PROMPT16), enc.encode(PROMPT512)
    assert len(ids16) == 16 and len(ids512) == 512, (len(ids16), len(ids512))
    q_ids = np.random.default_rng(1234).integers(0, 50257, args.quality_tokens).tolist()

    meta = machine_info(args.threads)
    meta.update(rounds=args.rounds, new_tokens=args.new, loadavg_start=
                [round(x, 2) for x in os.getloadavg()], model=str(args.model),
                anchors=str(args.anchors), quality_tokens=args.quality_tokens,
                prompt16=PROMPT16, prompt16_ids=ids16,
                bandwidth_method=f"best median of 5 reads of a {args.bandwidth_mib} MiB float32 "
                                 f"array on {args.threads} threads (gpt2s _core.sum_squares, "
                                 f"NumPy sum in {args.threads} Python threads), every round")
    results = {"meta": meta, "runs": {"gpt2s": {}, "llama.cpp": {}}, "bandwidth": [],
               "quality": {}, "notes": [], "errors": [], "discarded": []}
    if args.skip_llama:
        results["notes"].append("--skip-llama: llama.cpp was not run")
    else:
        meta["llama_cpp"] = str(args.anchors / "llama.cpp")
        try:
            meta["llama_cpp"] = os.path.realpath(args.anchors / "llama.cpp")
        except OSError:
            pass
        for lq, path in ggufs.items():
            tensors = gguf_tensors(path)
            results["runs"]["llama.cpp"][lq] = {
                "gguf": str(path), "types": gguf_matmul_types(tensors),
                "weight_bytes_per_token": gguf_weight_bytes_per_token(tensors),
                "decode": [], "prefill512": [], "batch8": []}
    for dtype, _, _ in pairs:   # int4 runs once per peer format: twice the samples
        results["runs"]["gpt2s"][dtype] = {"decode": [], "prefill512": [], "batch8": []}

    with tempfile.TemporaryDirectory(prefix="vs_llama_") as td:
        tmp = Path(td)
        files = {}
        for name, ids in (("ids16", ids16), ("ids512", ids512), ("quality", q_ids)):
            files[name] = tmp / f"{name}.txt"
            files[name].write_text(" ".join(map(str, ids)) + "\n")
        (tmp / "prompt16.txt").write_text(PROMPT16)
        (tmp / "prompt512.txt").write_text(PROMPT512)
        run = Runner(args.threads, tmp, args.wait_quiet, log)
        loads = []

        def pair(first_ours, key, ours_fn, llama_fn):
            """One gpt2s run and its llama.cpp counterpart, kept together: when other
            processes used more than --max-other-load cores during either, both are redone
            (at most REDO times; the discarded runs are counted in the JSON)."""
            named = [("gpt2s", ours_fn)] + ([] if args.skip_llama else [("llama.cpp", llama_fn)])
            if not first_ours:
                named.reverse()

            def run_pair():
                got = [(engine, fn()) for engine, fn in named]
                return got, max((r.get("other_load") or 0.0) for _, r in got)

            def discard(worst):
                results["discarded"].append({"round": rnd, "key": key, "other_load": worst})
                log(f"  (other processes used {worst:.2f} cores: the pair is redone)")

            got, _, attempt = redo_while_disturbed(run_pair, args.max_other_load, REDO, discard)
            for engine, r in got:
                r["round"], r["attempt"] = rnd, attempt
                loads.append(r.get("other_load"))
                store = results["runs"][engine][dtype if engine == "gpt2s" else lq]
                store[key].append(r)

        for rnd in range(args.rounds):
            first_ours = rnd % 2 == 0
            log(f"round {rnd + 1}/{args.rounds} (load average {os.getloadavg()[0]:.2f}; "
                f"{'gpt2s' if first_ours else 'llama.cpp'} first)")
            bw = run([sys.executable, RUNNER, "bandwidth", "--threads", args.threads,
                      "--mib", args.bandwidth_mib], "bandwidth")
            ours_bw = json.loads(bw["stdout"].strip().splitlines()[-1])
            ours_bw.update(loadavg=os.getloadavg()[0], other_load=bw["proc"]["other_load"])
            results["bandwidth"].append(ours_bw)
            for dtype, lq, _ in pairs:
                gguf = ggufs[lq]
                pair(first_ours, "decode",
                     lambda: ours(run, args, "decode", dtype, files["ids16"]),
                     lambda: llama_completion(run, args, gguf, tmp / "prompt16.txt", args.new,
                                              256, f"llama-completion {lq} 16+{args.new}"))
                pair(first_ours, "prefill512",
                     lambda: ours(run, args, "prefill", dtype, files["ids512"]),
                     lambda: llama_completion(run, args, gguf, tmp / "prompt512.txt", 1, 1024,
                                              f"llama-completion {lq} prefill 512"))
                pair(first_ours, "batch8",
                     lambda: ours(run, args, "decode", dtype, files["ids16"], batch=8),
                     lambda: llama_batched(run, args, gguf, f"llama-batched-bench {lq}"))

        # bytes of weights per decoding step, as the gpt2s runner counted them
        for dtype, _, _ in pairs:
            g = results["runs"]["gpt2s"][dtype]
            g["weight_bytes_per_token"] = g["decode"][0]["weight_bytes_per_token"]
            g["model"] = g["decode"][0]["model"]
        # prompts: both engines must have seen the same number of tokens
        for lq, l in results["runs"]["llama.cpp"].items():
            for key, n in (("decode", 16), ("prefill512", 512)):
                seen = {r["n_prompt"] for r in l[key]}
                if seen != {n}:
                    results["errors"].append(f"llama.cpp {lq} {key}: prompt of {seen} tokens, "
                                             f"gpt2s had {n}")
        if "float32" in results["runs"]["gpt2s"] and "F32" in results["runs"]["llama.cpp"]:
            mine = enc.decode(results["runs"]["gpt2s"]["float32"]["decode"][0]["tokens"][0])
            theirs = results["runs"]["llama.cpp"]["F32"]["decode"][0]["text"]
            theirs = theirs[theirs.find(PROMPT16) + len(PROMPT16):] if PROMPT16 in theirs \
                else theirs
            same = 0
            while same < min(len(mine), len(theirs)) and mine[same] == theirs[same]:
                same += 1
            results["greedy_text_f32"] = {"gpt2s": mine, "llama.cpp": theirs,
                                          "common_prefix_chars": same}
            results["notes"].append(
                f"greedy float32 continuations of the 16-token prompt: the first {same} of "
                f"{len(mine)} characters are the same in gpt2s and llama.cpp F32")

        # quality: logits of every position of the same random ids
        log("logits for the quality table")
        logits = {}
        # the float32 references of the quality table are always computed
        for dtype in dict.fromkeys(["float32"] + [p[0] for p in pairs]):
            out = tmp / f"gpt2s-{dtype}.f32"
            ours(run, args, "logits", dtype, files["quality"], out=out)
            logits[f"gpt2s {dtype}"] = np.fromfile(out, np.float32).reshape(len(q_ids), -1)
        if not args.skip_llama:
            try:
                exe = compile_llama_logits(args.anchors, args.cache)
                meta["llama_logits_exe"] = str(exe)
                qfiles = {"F32": args.anchors / "gguf" / "gpt2-random-f32.gguf", **ggufs}
                for lq, path in qfiles.items():
                    out = tmp / f"llama-{lq}.f32"
                    run([exe, path, files["quality"], out, args.threads],
                        f"llama_logits {lq}")
                    logits[f"llama.cpp {lq}"] = np.fromfile(out, np.float32).reshape(
                        len(q_ids), -1)
            except (OSError, RuntimeError) as e:
                results["errors"].append(f"llama.cpp logits: {e}")
        q = results["quality"]
        for engine, ref, others in (("gpt2s", "float32", ("bfloat16", "int8", "int4")),
                                    ("llama.cpp", "F32", ("F16", "Q8_0", "Q4_0", "Q4_K_M"))):
            if f"{engine} {ref}" in logits:
                for o in others:
                    if f"{engine} {o}" in logits:
                        q[f"{engine} {o} vs {engine} {ref}"] = logits_compare(
                            logits[f"{engine} {o}"], logits[f"{engine} {ref}"])
        if "gpt2s float32" in logits and "llama.cpp F32" in logits:
            q["gpt2s float32 vs llama.cpp F32 (cross-check)"] = logits_compare(
                logits["gpt2s float32"], logits["llama.cpp F32"])

    meta["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    loads = [x for x in loads if x is not None]
    meta["other_load_median"] = median(loads)
    meta["other_load_max"] = max(loads) if loads else None
    results["summary"] = summarize(results)
    report = format_report(results)
    results["report"] = report
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp_out = args.out.with_suffix(args.out.suffix + ".tmp")
    tmp_out.write_text(json.dumps(results, indent=1, default=str))
    os.replace(tmp_out, args.out)
    print(report)
    for e in results["errors"]:
        print(f"error: {e}", file=sys.stderr)
    print(f"\nresults: {args.out}", file=sys.stderr)
    return 1 if results["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
