"""Load time of a saved packed model (int8, int4) against converting a float32 file while
loading (``from_pretrained(f32, dtype="int8")``), each load in a fresh process.

    python benchmarks/packed_load.py                 # GPT-2 XL-shaped random weights
    python benchmarks/packed_load.py --preset gpt2 --repeats 5

The random model is made one tensor at a time in its stored type (never a float32 copy of the
whole: GPT-2 XL in float32 is 6.2 GB), saved packed (int8, int4) and as float32 (the int8
model's widened weights) into --dir (kept for reruns with --keep).  Each case then runs in a
new process, in alternating rounds after one untimed warm-up round (so every file is in the
page cache: these are warm loads), and reports, measured inside that process after
``import gpt2s``: the from_pretrained time, the time of a first one-token forward after it
(a mapped load reads its pages then), and the process's peak RSS.  Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import harness

CHILD = r"""
import json, sys, time
import numpy as np
from gpt2s import GPT2
path, dtype = sys.argv[1], (sys.argv[2] if sys.argv[2] != "None" else None)
t0 = time.perf_counter()
m = GPT2.from_pretrained(path, dtype=dtype)
t1 = time.perf_counter()
m.forward_cached(np.array([[464]]), 0, m.kv_cache(1, 8))
t2 = time.perf_counter()
with open("/proc/self/status") as f:
    hwm = next(int(l.split()[1]) for l in f if l.startswith("VmHWM:")) / 1024
print(json.dumps({"load_s": t1 - t0, "first_token_s": t2 - t1, "peak_rss_mib": hwm,
                  "dtype": m.dtype, "mapped": m.mapped}))
"""


def build(directory: Path, preset: str, seed: int = 0):
    """int8/, int4/ and f32/ model directories of one random model of the preset's sizes."""
    import numpy as np

    from gpt2s import GPT2, GPT2Config
    cfg = GPT2Config.preset(preset)
    rng = np.random.default_rng(seed)
    m8 = GPT2(cfg, dtype="int8")
    proj_std = 0.02 / math.sqrt(2 * cfg.n_layer)
    for name, w in list(m8.params.items()):
        if name.endswith(".bias"):
            continue   # zeros already
        if ".ln_" in name or name.startswith("ln_"):
            m8.store.copy_param(name, np.ones(w.shape, np.float32))
            continue
        std = proj_std if name.endswith("c_proj.weight") else 0.02
        value = rng.standard_normal(w.shape, dtype=np.float32)
        value *= np.float32(std)
        m8.store.copy_param(name, value)
    m8.save_safetensors(directory / "int8")
    m8.save_safetensors(directory / "f32", dtype="float32")   # widened one tensor at a time
    m4 = m8.to_dtype("int4")
    del m8
    m4.save_safetensors(directory / "int4")


def run_case(path: Path, dtype) -> dict:
    r = subprocess.run([sys.executable, "-c", CHILD, str(path), str(dtype)],
                       capture_output=True, text=True, timeout=3600)
    if r.returncode:
        raise RuntimeError(f"{path} {dtype}: {r.stderr}")
    return json.loads(r.stdout)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="gpt2-xl")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--dir", type=Path, default=None,
                   help="where the model files go (default: a temporary directory)")
    p.add_argument("--keep", action="store_true", help="keep the model files")
    args = p.parse_args(argv)
    directory = args.dir or Path(tempfile.mkdtemp(prefix="gpt2s-packed-load-"))
    try:
        if not all((directory / d / "model.safetensors").is_file()
                   for d in ("int8", "int4", "f32")):
            build(directory, args.preset)
        cases = {"int8 file (packed)": (directory / "int8", None),
                 "int4 file (packed)": (directory / "int4", None),
                 "float32 file as int8": (directory / "f32", "int8"),
                 "float32 file as int4": (directory / "f32", "int4")}
        for path, dtype in cases.values():   # warm-up: every file into the page cache
            run_case(path, dtype)
        runs = {name: [] for name in cases}
        for _ in range(args.repeats):
            for name, (path, dtype) in cases.items():
                runs[name].append(run_case(path, dtype))
        result = {"preset": args.preset, "repeats": args.repeats,
                  "machine": harness.announce_machine(Path(__file__).resolve().parents[1]),
                  "files_mb": {d: (directory / d / "model.safetensors").stat().st_size / 1e6
                               for d in ("int8", "int4", "f32")},
                  "cases": {}}
        for name, rs in runs.items():
            result["cases"][name] = {
                key: harness.median([r[key] for r in rs])
                for key in ("load_s", "first_token_s", "peak_rss_mib")}
            result["cases"][name]["load_s_all"] = [r["load_s"] for r in rs]
            result["cases"][name]["dtype"] = rs[0]["dtype"]
            result["cases"][name]["mapped"] = rs[0]["mapped"]
        print(json.dumps(result, indent=1))
    finally:
        if not args.keep and args.dir is None:
            shutil.rmtree(directory, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
