#!/usr/bin/env python
"""gpt2s against PyTorch on the CPU: train step, forward, generation, memory, scaling.

One set of random GPT-2 weights (``GPT2.from_config(GPT2Config.preset("gpt2"), seed=0)``) is
built once and copied into a nanoGPT-style PyTorch model (benchmarks/torch_gpt2.py) and, for
generation, into transformers' GPT2LMHeadModel (through ``save_safetensors``).  Every case runs
both libraries on the same inputs, checks that they compute the same thing, warms up, then
alternates timed runs (gpt2s, torch, gpt2s, torch, ...) with a short idle gap before each run so
that one library's idle-spinning worker threads never overlap the other's timed run.  It prints
medians, min-max, the ratio gpt2s / torch of median times (< 1: gpt2s is faster), GFLOP/s and
percent of the float32 sgemm rate measured in the same run.

    python benchmarks/bench.py                           # everything, GPT-2 124M (minutes)
    python benchmarks/bench.py --only train,sgemm        # a subset
    python benchmarks/bench.py --quick --json out.json   # tiny model, < 60 s (CI)

Benchmarks are not tests: nothing here asserts anything about time.  A correctness check that
fails (losses or logits differ) skips the timing of that case and makes the exit status 2; a
case that crashes makes it 1; a case whose API is missing is reported as "n/a: <reason>".
"""

from __future__ import annotations

import argparse
import inspect
import io
import json
import math
import os
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from pathlib import Path

import numpy as np

import harness
from harness import (QuietGuard, cpu_snapshot, max_rel_error, median, numpy_blas_threads,
                     other_load, rel_l2, run_alternating, wait_quiet)

HERE = Path(__file__).resolve().parent
REPO = HERE.parent

ALL_CASES = ("sgemm", "bandwidth", "train", "forward", "generate", "decode_matmul", "memory",
             "scaling")
ENV_VARS = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "OMP_WAIT_POLICY",
            "GOMP_SPINCOUNT", "OPENBLAS_THREAD_TIMEOUT", "OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE")


# ----------------------------------------------------------------------------------- settings

class Settings:
    """What a run measures: the full GPT-2 124M run or the --quick tiny one."""

    def __init__(self, quick: bool):
        self.quick = quick
        if quick:
            self.preset = "tiny"
            self.train_shapes = [(2, 32), (1, 128)]
            self.gen_batches, self.gen_prompt, self.gen_new = [1, 8], 16, 8
            self.memory_shape = (4, 64)
            self.scaling_shape = (2, 32)
            self.scaling_T = [32, 64, 128]
            self.sgemm_shapes = [(64, 768, 768)]
            self.decode_rows, self.decode_shapes = 8, [("mlp.c_fc", 64, 256, False),
                                                       ("lm_head", 1000, 64, True)]
            self.bandwidth_bytes = 64 << 20
            self.repeats, self.warmup, self.settle = 3, 1, 0.01
        else:
            self.preset = "gpt2"
            self.train_shapes = [(4, 64), (1, 1024)]
            self.gen_batches, self.gen_prompt, self.gen_new = [1, 8], 16, 128
            self.memory_shape = (4, 64)
            self.scaling_shape = (4, 64)
            self.scaling_T = [128, 256, 512, 1024]
            self.sgemm_shapes = [(256, 768, 3072), (1024, 768, 3072)]
            # (name, K or V, N or K, transposed): out (8, N) = x (8, K) @ W (K, N), or for the
            # tied lm_head x (8, K) @ wte (V, K)^T
            self.decode_rows, self.decode_shapes = 8, [
                ("attn.c_attn", 768, 2304, False), ("attn.c_proj", 768, 768, False),
                ("mlp.c_fc", 768, 3072, False), ("mlp.c_proj", 3072, 768, False),
                ("lm_head", 50257, 768, True)]
            self.bandwidth_bytes = 1 << 30
            self.repeats, self.warmup, self.settle = 5, 1, 0.05


# ----------------------------------------------------------------------------------- timing

# Shared machines: with --wait-quiet S, a round of timed runs (one run of each function) during
# which other processes used more than 0.15 cores is discarded, and redone (at most 5 times per
# round) after waiting up to S seconds for the machine to go quiet.  Its loads and discarded
# rounds are whole-run tallies.
QUIET = QuietGuard(max_load=0.15, max_redo=5)


# ----------------------------------------------------------------------------------- machine

def machine_info(args, threadpool) -> dict:
    info = harness.machine_description(REPO)
    core = harness.amd_core(info["cpu"], info["cpu_family"], info["cpu_model"])
    if core and core not in info["cpu"]:
        info["cpu"] = f"{info['cpu']} ({core})"
    versions = {"python": info.pop("python")}
    for mod in ("gpt2s", "numpy", "scipy", "torch", "transformers", "matplotlib"):
        try:
            versions[mod] = __import__(mod).__version__
        except Exception as e:  # noqa: BLE001 - a missing optional package is information
            versions[mod] = f"n/a ({type(e).__name__})"
    info.update(versions=versions, env={k: os.environ.get(k) for k in ENV_VARS},
                threadpools=threadpool)
    return info


def threadpool_snapshot() -> list:
    try:
        from threadpoolctl import threadpool_info
    except ImportError:
        return []
    return [{k: d.get(k) for k in ("user_api", "internal_api", "num_threads", "version",
                                   "filepath")} for d in threadpool_info()]


def print_header(info: dict, args, st: Settings, threads: dict):
    print(f"gpt2s benchmark  ({'--quick, ' if st.quick else ''}model preset {st.preset!r})")
    fam = f", family {info['cpu_family']} model {info['cpu_model']}" if info["cpu_family"] else ""
    mem = f"; {info['mem_gib']:.1f} GiB" if info["mem_gib"] else ""
    print(f"  machine : {info['cpu']}{fam}; {info['cores']} cores available "
          f"(os.cpu_count {info['os_cpu_count']}){mem}; ISA {' '.join(info['isa']) or '?'}")
    v = info["versions"]
    print("  versions: " + ", ".join(f"{k} {v[k]}" for k in v) + f"; git {info['git']}")
    print(f"  threads : --threads {args.threads}; gpt2s {threads['gpt2s']}, torch "
          f"{threads['torch']} (interop {threads['torch_interop']})")
    for tp in info["threadpools"]:
        print(f"            {tp['internal_api']} {tp['version'] or ''} x{tp['num_threads']}: "
              f"{tp['filepath']}")
    env = " ".join(f"{k}={'unset' if val is None else val}" for k, val in info["env"].items())
    print(f"  env     : {env}")
    print(f"  {harness.provenance_line(info)}")
    if info["env"]["OPENBLAS_CORETYPE"] or info["env"]["OPENBLAS_L2_SIZE"]:
        print("            (OPENBLAS_CORETYPE / OPENBLAS_L2_SIZE are set: they slow current "
              "numpy's OpenBLAS; unset both for a clean run)")
    la = info["loadavg_start"]
    ol = info.get("other_load_start")
    print(f"  load    : loadavg {la[0]:.2f} {la[1]:.2f} {la[2]:.2f}; other processes used "
          + (f"{ol:.2f} cores over 1 s before start" if ol is not None else "? cores")
          + ("  (busy machine: timings will be noisy)" if ol and ol > 0.1 else ""))
    print(f"  timing  : median of {args.repeats} alternating runs after {args.warmup} warm-up "
          f"run(s), {st.settle * 1000:.0f} ms idle before each run")
    print()


# ----------------------------------------------------------------------------------- FLOPs

def train_flops(cfg, B: int, T: int, backward: bool) -> float:
    """Matmul FLOPs of a forward (and backward) pass: the 4 weight matmuls per layer and the
    lm_head (2 N K OC each), attention QK^T and AV over the causal triangle; the backward
    does twice the forward's.  Elementwise work (layernorm, GELU, softmax) is not counted."""
    C, L, V, N = cfg.n_embd, cfg.n_layer, cfg.vocab_size, B * T
    fwd = 2.0 * N * (L * 12 * C * C + C * V) + L * 2.0 * B * C * T * (T + 1)
    return 3.0 * fwd if backward else fwd


# ----------------------------------------------------------------------------------- context

class Bench:
    """The models, shared inputs and reference rates of one run."""

    def __init__(self, args, st: Settings):
        import gpt2s
        import torch
        from torch_gpt2 import TorchGPT2
        self.args, self.st = args, st
        self.gpt2s, self.torch = gpt2s, torch
        self.set_threads(args.threads)
        t0 = time.perf_counter()
        self.cfg = gpt2s.GPT2Config.preset(st.preset)
        self.m = gpt2s.GPT2.from_config(self.cfg, seed=0)
        self.tm = TorchGPT2.from_gpt2s(self.m)
        self.build_s = time.perf_counter() - t0
        self.n_params = int(self.m.num_parameters())
        self.results: dict = {}
        self.train_cache: dict = {}
        self.sgemm_gflops = None     # set by the sgemm case (or measured on demand)
        self.bandwidth_gbs = None
        self.check_failures: list[str] = []
        params = inspect.signature(self.m.forward).parameters
        self.return_logits_kw = ({"return_logits": False} if "return_logits" in params else {})

    def set_threads(self, n: int):
        self.gpt2s.set_num_threads(n)
        self.torch.set_num_threads(n)

    def threads(self) -> dict:
        return {"gpt2s": self.gpt2s.get_num_threads(), "torch": self.torch.get_num_threads(),
                "torch_interop": self.torch.get_num_interop_threads()}

    def inputs(self, B: int, T: int):
        rng = np.random.default_rng(1000 * B + T)
        idx = rng.integers(0, self.cfg.vocab_size, (B, T), dtype=np.int64)
        tgt = rng.integers(0, self.cfg.vocab_size, (B, T), dtype=np.int64)
        return idx, tgt

    def pct(self, gflops):
        if gflops is None or not self.sgemm_gflops:
            return None
        return 100.0 * gflops / self.sgemm_gflops


# ----------------------------------------------------------------------------------- cases

def case_sgemm(b: Bench) -> dict:
    """float32 C = A @ B at GPT-2 shapes (M rows = B*T, K = n_embd, N = 4 n_embd) through
    numpy (its OpenBLAS, limited to --threads), torch (MKL/oneDNN) and gpt2s's own matmul
    kernel (a prange over blocks, each a 1-thread sgemm).  The reference rate for "% sgemm"
    is the best numpy/torch median."""
    torch = b.torch
    rows = []
    try:
        from gpt2s import _core
        core_mm = _core.matmul_forward
    except (ImportError, AttributeError):
        core_mm = None
    inner = 5
    for M, K, N in b.st.sgemm_shapes:
        rng = np.random.default_rng(0)
        A = rng.standard_normal((M, K), dtype=np.float32)
        W = rng.standard_normal((K, N), dtype=np.float32)
        out = np.empty((M, N), np.float32)
        tA, tW, tout = torch.from_numpy(A), torch.from_numpy(W), torch.empty(M, N)
        no_bias = np.empty(0, np.float32)
        flops = 2.0 * M * K * N * inner

        def np_mm():
            for _ in range(inner):
                np.matmul(A, W, out=out)

        def torch_mm():
            for _ in range(inner):
                torch.mm(tA, tW, out=tout)

        def gpt2s_mm():
            for _ in range(inner):
                core_mm(out, A, W, no_bias)

        fns = {"numpy": np_mm, "torch": torch_mm}
        if core_mm is not None:
            fns["gpt2s matmul_forward"] = gpt2s_mm
        limit = numpy_blas_threads(b.args.threads)
        # numpy's OpenBLAS workers busy-wait ~0.1 s after a call (OPENBLAS_THREAD_TIMEOUT's
        # default 2^28 cycles): a longer idle gap keeps them off the next provider's cores
        with limit:
            res = run_alternating(fns, max(b.args.repeats, 5), 1, max(b.st.settle, 0.25),
                                  guard=QUIET)
        time.sleep(0.3)
        for name, r in res.items():
            r.update(provider=name, M=M, K=K, N=N, calls_per_run=inner,
                     gflops=flops / r["median_s"] / 1e9)
            rows.append(r)
    refs = [r["gflops"] for r in rows if r["provider"] in ("numpy", "torch")]
    b.sgemm_gflops = max(refs)
    return {"rows": rows, "reference_gflops": b.sgemm_gflops,
            "reference": "best median of numpy / torch over the shapes above"}


def case_bandwidth(b: Bench) -> dict:
    """Memory read bandwidth: sum a large float32 array with torch (--threads threads), with
    numpy in --threads Python threads (one slice each; numpy releases the GIL in reductions),
    with numpy on one thread, and with gpt2s's own prange reduction (_core.sum_squares).
    The reference is the best median of any reader: the ceiling must be attainable."""
    from concurrent.futures import ThreadPoolExecutor
    torch = b.torch
    nbytes = b.st.bandwidth_bytes
    x = np.ones(nbytes // 4, np.float32)          # pages touched before timing
    tx = torch.from_numpy(x)
    nt = b.args.threads
    pool = ThreadPoolExecutor(nt)
    parts = np.array_split(x, nt)
    fns = {"torch sum": lambda: float(tx.sum()),
           f"numpy sum, {nt} Python threads": lambda: sum(pool.map(np.sum, parts)),
           "numpy sum, 1 thread": lambda: float(x.sum())}
    try:
        from gpt2s import _core
        fns["gpt2s _core.sum_squares"] = lambda: _core.sum_squares(x)
    except (ImportError, AttributeError):
        pass
    try:
        res = run_alternating(fns, max(b.args.repeats, 5), 1, b.st.settle, guard=QUIET)
    finally:
        pool.shutdown()
    rows = []
    for name, r in res.items():
        r.update(reader=name, bytes=nbytes, gbs=nbytes / r["median_s"] / 1e9,
                 gbs_best=nbytes / r["min_s"] / 1e9)
        rows.append(r)
    del x, tx, parts
    best = max(rows, key=lambda r: r["gbs"])
    b.bandwidth_gbs = best["gbs"]
    return {"rows": rows, "reference_gbs": b.bandwidth_gbs,
            "reference": f"best median of any reader ({best['reader']})"}


def time_against_torch(b: Bench, row: dict, g_fn, t_fn, flops: float, repeats: int):
    """Time g_fn (gpt2s) and t_fn (torch) alternately; row gets their timings, the GFLOP of one
    call, each side's GFLOP/s and % of the sgemm rate, and the time ratio gpt2s / torch."""
    res = run_alternating({"gpt2s": g_fn, "torch": t_fn}, repeats, b.args.warmup, b.st.settle,
                          guard=QUIET)
    row.update(res)
    row["gflop"] = flops / 1e9
    for lib in ("gpt2s", "torch"):
        row[lib]["gflops"] = flops / res[lib]["median_s"] / 1e9
        row[lib]["pct_sgemm"] = b.pct(row[lib]["gflops"])
    row["ratio"] = res["gpt2s"]["median_s"] / res["torch"]["median_s"]


def measure_train(b: Bench, B: int, T: int, repeats=None) -> dict:
    """One train step (zero_grad, forward with loss, backward; no optimizer) in both
    libraries, after checking that their losses agree."""
    key = (B, T, b.gpt2s.get_num_threads(), b.torch.get_num_threads())
    if key in b.train_cache and repeats is None:
        return b.train_cache[key]
    torch, m, tm = b.torch, b.m, b.tm
    idx, tgt = b.inputs(B, T)
    tidx, ttgt = torch.from_numpy(idx), torch.from_numpy(tgt)
    kw = b.return_logits_kw

    def g_step():
        m.zero_grad()
        _, loss = m.forward(idx, tgt, **kw)
        m.backward()
        return loss

    def t_step():
        tm.zero_grad(set_to_none=True)
        _, loss = tm(tidx, ttgt)
        loss.backward()
        return loss

    loss_g, loss_t = float(g_step()), float(t_step().item())
    rel = max_rel_error(loss_g, loss_t)
    out = {"B": B, "T": T, "loss_gpt2s": loss_g, "loss_torch": loss_t, "loss_rel_diff": rel,
           "threads": {"gpt2s": key[2], "torch": key[3]}}
    # a gradient too (informational): c_fc of the first layer, Conv1D [in, out] vs Linear
    gname = "h.0.mlp.c_fc.weight"
    if gname in m.grads:
        out["grad_rel_diff_" + gname] = rel_l2(
            m.grads[gname], b.tm.h[0].mlp.c_fc.weight.grad.t().numpy())
    if not rel <= 1e-4:
        msg = f"train B={B} T={T}: loss gpt2s {loss_g!r} vs torch {loss_t!r} (rel {rel:.2e})"
        b.check_failures.append(msg)
        out["status"] = f"check failed: {msg}"
        return out
    time_against_torch(b, out, g_step, t_step, train_flops(b.cfg, B, T, backward=True),
                       repeats or b.args.repeats)
    if repeats is None:
        b.train_cache[key] = out
    return out


def case_train(b: Bench) -> dict:
    return {"rows": [measure_train(b, B, T) for B, T in b.st.train_shapes]}


def case_forward(b: Bench) -> dict:
    """Logits for every position; torch under no_grad.  Logits checked before timing."""
    torch, m, tm = b.torch, b.m, b.tm
    rows = []
    for B, T in b.st.train_shapes:
        idx, _ = b.inputs(B, T)
        tidx = torch.from_numpy(idx)

        def g_fwd():
            return m.forward(idx)[0]

        def t_fwd():
            with torch.no_grad():
                return tm(tidx)[0]

        rel = rel_l2(g_fwd(), t_fwd().numpy())
        row = {"B": B, "T": T, "logits_rel_diff": rel}
        if not rel <= 1e-4:
            msg = f"forward B={B} T={T}: logits differ, relative L2 {rel:.2e}"
            b.check_failures.append(msg)
            row["status"] = f"check failed: {msg}"
            rows.append(row)
            continue
        time_against_torch(b, row, g_fwd, t_fwd, train_flops(b.cfg, B, T, backward=False),
                           b.args.repeats)
        rows.append(row)
    return {"rows": rows}


def _load_transformers(b: Bench, tmpdir: str):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from transformers import GPT2LMHeadModel
        from transformers.utils import logging as hf_logging
        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
        b.m.save_safetensors(tmpdir)
        hf = GPT2LMHeadModel.from_pretrained(tmpdir)
    hf = hf.float().eval()   # fp32 like gpt2s (the saved weights are F32 already)
    return hf


def case_generate(b: Bench) -> dict:
    """Greedy generation, prompt of gen_prompt tokens, gen_new new tokens (forced: the HF side
    has min_new_tokens = max_new_tokens; gpt2s never stops early).  tokens/s = B * new tokens /
    wall time of one generate call (prefill included).  The fp32 ceiling: every decoding step
    reads every parameter once (4 bytes each), so at most bandwidth / (4 * n_params) steps/s,
    i.e. B times that in tokens/s."""
    torch, m = b.torch, b.m
    st = b.st
    weight_bytes = 4 * b.n_params
    steps_per_s = b.bandwidth_gbs * 1e9 / weight_bytes if b.bandwidth_gbs else None
    out = {"prompt": st.gen_prompt, "new_tokens": st.gen_new, "weight_bytes": weight_bytes,
           "n_params": b.n_params,
           "bandwidth_gbs": b.bandwidth_gbs, "ceiling_steps_per_s": steps_per_s, "rows": []}
    # does gpt2s generate exist yet?
    probe = np.zeros((1, 2), np.int64)
    gen_na = None
    try:
        r = np.asarray(m.generate(probe, 1, temperature=0.0))
        if r.shape != (1, 3):
            gen_na = f"n/a: gpt2s generate returned shape {r.shape} for (1, 2) + 1 new token"
    except (ImportError, AttributeError, NotImplementedError, TypeError) as e:
        gen_na = f"n/a: gpt2s generate unavailable ({type(e).__name__}: {e})"
    hf, hf_na = None, None
    tmp = tempfile.TemporaryDirectory(prefix="gpt2s-bench-")
    try:
        hf = _load_transformers(b, tmp.name)
        out["transformers_attn_implementation"] = getattr(hf.config, "_attn_implementation",
                                                          None)
    except Exception as e:  # noqa: BLE001 - reported, the gpt2s side still runs
        hf_na = f"n/a: transformers unavailable ({type(e).__name__}: {e})"
    try:
        for B in st.gen_batches:
            rng = np.random.default_rng(7 + B)
            prompt = rng.integers(0, b.cfg.vocab_size, (B, st.gen_prompt), dtype=np.int64)
            tprompt = torch.from_numpy(prompt)
            mask = torch.ones_like(tprompt)
            row = {"B": B}
            fns = {}
            if gen_na is None:
                def g_gen(prompt=prompt):
                    return np.asarray(m.generate(prompt, st.gen_new, temperature=0.0))
                fns["gpt2s"] = g_gen
            else:
                row["gpt2s"] = {"status": gen_na}
            if hf is not None:
                def t_gen(tprompt=tprompt, mask=mask):
                    with torch.no_grad(), warnings.catch_warnings():
                        warnings.simplefilter("ignore")
                        return hf.generate(input_ids=tprompt, attention_mask=mask,
                                           do_sample=False, use_cache=True,
                                           max_new_tokens=st.gen_new,
                                           min_new_tokens=st.gen_new,
                                           pad_token_id=hf.config.eos_token_id)
                fns["transformers"] = t_gen
            else:
                row["transformers"] = {"status": hf_na}
            if not fns:
                out["rows"].append(row)
                continue
            outputs = {k: np.asarray(fn()) for k, fn in fns.items()}
            for k, o in outputs.items():
                if o.shape != (B, st.gen_prompt + st.gen_new):
                    raise RuntimeError(f"{k} generate returned shape {o.shape}, expected "
                                       f"{(B, st.gen_prompt + st.gen_new)}")
            if len(outputs) == 2:
                new_g = outputs["gpt2s"][:, st.gen_prompt:]
                new_t = outputs["transformers"][:, st.gen_prompt:]
                same = new_g == new_t
                first = [int(np.argmin(r)) if not r.all() else None for r in same]
                row["tokens_match"] = float(same.mean())
                row["first_mismatch"] = first
            res = run_alternating(fns, b.args.repeats, b.args.warmup, st.settle, guard=QUIET)
            for k, r in res.items():
                r["tokens_per_s"] = B * st.gen_new / r["median_s"]
                if steps_per_s:
                    r["ceiling_tokens_per_s"] = B * steps_per_s
                    r["frac_ceiling"] = r["tokens_per_s"] / (B * steps_per_s)
                row[k] = r
            if len(res) == 2:
                row["ratio"] = res["gpt2s"]["median_s"] / res["transformers"]["median_s"]
            out["rows"].append(row)
    finally:
        tmp.cleanup()
    if gen_na:
        out["status_gpt2s"] = gen_na
    if hf_na:
        out["status_transformers"] = hf_na
    return out


# ----------------------------------------------------------------------------------- memory

def memory_worker(kind: str, cfg_json: str, B: int, T: int, threads: int) -> dict:
    """Runs in a fresh interpreter: build one model, two fwd+bwd steps (+ optimizer step),
    report ru_maxrss (the peak resident set) after the imports and at the end."""
    cfg = json.loads(cfg_json)
    rng = np.random.default_rng(0)
    idx = rng.integers(0, cfg["vocab_size"], (B, T), dtype=np.int64)
    tgt = rng.integers(0, cfg["vocab_size"], (B, T), dtype=np.int64)
    if kind.startswith("gpt2s"):
        import gpt2s
        gpt2s.set_num_threads(threads)
        base = harness.ru_maxrss_mib()
        m = gpt2s.GPT2.from_config(gpt2s.GPT2Config(**cfg), seed=0)
        kw = {"return_logits": False} if "return_logits" in inspect.signature(
            m.forward).parameters else {}
        opt = gpt2s.AdamW(m) if kind.endswith("adamw") else None
        for _ in range(2):
            m.zero_grad()
            m.forward(idx, tgt, **kw)
            m.backward()
            if opt is not None:
                opt.step()
    else:
        import torch
        from torch_gpt2 import TorchGPT2
        torch.set_num_threads(threads)
        base = harness.ru_maxrss_mib()
        tm = TorchGPT2(cfg["n_layer"], cfg["n_head"], cfg["n_embd"], cfg["vocab_size"],
                       cfg["n_ctx"], cfg["layer_norm_epsilon"])
        opt = torch.optim.AdamW(tm.parameters(), lr=3e-4) if kind.endswith("adamw") else None
        tidx, ttgt = torch.from_numpy(idx), torch.from_numpy(tgt)
        for _ in range(2):
            tm.zero_grad(set_to_none=True)
            _, loss = tm(tidx, ttgt)
            loss.backward()
            if opt is not None:
                opt.step()
    peak = harness.ru_maxrss_mib()
    return {"kind": kind, "peak_rss_mb": peak, "rss_after_imports_mb": base,
            "peak_minus_imports_mb": peak - base, "vm_hwm_mb": harness.vm_hwm_mib()}


# A fork of this (large) process would carry our RSS into the worker's ru_maxrss: Linux keeps
# the high-water mark of the address space a process replaces at exec.  A small interpreter
# in between starts the worker from a small address space, so its ru_maxrss is its own.
_LAUNCHER = "import subprocess, sys; sys.exit(subprocess.call(sys.argv[1:]))"


def case_decode_matmul(b: Bench) -> dict:
    """The matmuls of decoding a batch: 8 rows times each GPT-2 weight matrix, the weights not
    in cache (the product cycles through copies totalling >= 64 MiB), as gpt2s runs them (its
    few-row kernels where the CPU has AVX2 + FMA), through gpt2s's sgemm path (the kernels
    bypassed) and torch.mm.  The measure is GB/s of weights read against the same-run read
    bandwidth: these products cost one pass over the weights and little else."""
    torch = b.torch
    from gpt2s import _core
    M = b.st.decode_rows
    rows = []
    have = _core.kernel_variants("float32")[-1] != "portable"
    for name, K, N, trans in b.st.decode_shapes:
        rng = np.random.default_rng(1)
        wshape = (K, N)   # (V, K) for the lm_head, which runs x @ W^T
        nbytes = 4 * K * N
        copies = max(2, -(-(64 << 20) // nbytes))
        Ws = [rng.standard_normal(wshape, dtype=np.float32) for _ in range(copies)]
        kdim, ndim = (N, K) if trans else (K, N)
        x = rng.standard_normal((M, kdim), dtype=np.float32)
        out = np.empty((M, ndim), np.float32)
        no_bias = np.empty(0, np.float32)
        tWs = [torch.from_numpy(W) for W in Ws]
        tx, tout = torch.from_numpy(x), torch.empty(M, ndim)

        def gpt2s_run():
            for W in Ws:
                if trans:
                    _core.lm_head_forward(out, x, W)
                else:
                    _core.matmul_forward(out, x, W, no_bias)

        def sgemm_run():
            previous = _core.set_kernel_variant("float32", "portable")
            try:
                gpt2s_run()
            finally:
                _core.set_kernel_variant("float32", previous)

        def torch_run():
            for tW in tWs:
                torch.mm(tx, tW.t() if trans else tW, out=tout)

        fns = {"gpt2s": gpt2s_run}
        if have:   # without the kernels "gpt2s" already is the sgemm path
            fns["gpt2s via sgemm"] = sgemm_run
        fns["torch.mm"] = torch_run
        res = run_alternating(fns, max(b.args.repeats, 5), 1, b.st.settle, guard=QUIET)
        for provider, r in res.items():
            gbs = nbytes * copies / r["median_s"] / 1e9
            r.update(provider=provider, matrix=name, M=M, K=kdim, N=ndim, calls_per_run=copies,
                     weight_bytes=nbytes, gbs=gbs,
                     pct_bandwidth=100.0 * gbs / b.bandwidth_gbs if b.bandwidth_gbs else None)
            rows.append(r)
    return {"rows": rows, "small_m_kernels": have, "reference_gbs": b.bandwidth_gbs}


def case_memory(b: Bench) -> dict:
    """Peak RSS of a B x T fwd+bwd step, each configuration in its own fresh subprocess."""
    B, T = b.st.memory_shape
    cfg_json = json.dumps(b.cfg.as_dict())
    out = {"B": B, "T": T, "param_mb": 4 * b.n_params / 2**20, "rows": []}
    for kind in ("gpt2s", "gpt2s+adamw", "torch", "torch+adamw"):
        cmd = [sys.executable, "-c", _LAUNCHER,
               sys.executable, str(Path(__file__).resolve()), "--_memory-worker", kind,
               "--_cfg", cfg_json, "--_shape", f"{B},{T}", "--threads", str(b.args.threads)]
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        if p.returncode != 0:
            raise RuntimeError(f"memory worker {kind} failed (exit {p.returncode}):\n"
                               f"{p.stderr[-3000:]}")
        out["rows"].append(json.loads(p.stdout.strip().splitlines()[-1]))
    return out


# ----------------------------------------------------------------------------------- scaling

def case_scaling(b: Bench) -> dict:
    """gpt2s (and torch) step time at 1 and --threads threads; step time vs T at B=1."""
    B, T = b.st.scaling_shape
    counts = sorted({1, max(2, b.args.threads)})
    threads = []
    for n in counts:
        b.set_threads(n)
        try:
            threads.append(dict(measure_train(b, B, T), n_threads=n))
        finally:
            b.set_threads(b.args.threads)
    speedup = {}
    if all("gpt2s" in r for r in threads):
        for lib in ("gpt2s", "torch"):
            speedup[lib] = threads[0][lib]["median_s"] / threads[-1][lib]["median_s"]
    vs_T = [measure_train(b, 1, T) for T in b.st.scaling_T]
    out = {"threads": {"B": B, "T": T, "rows": threads, "speedup": speedup,
                       "speedup_of": f"{counts[0]} -> {counts[-1]} threads"},
           "step_vs_T": {"B": 1, "rows": vs_T}}
    out["plot"] = write_plot(b.args.plot, vs_T, b.sgemm_gflops, dict(
        cpu=b.info["cpu"], cores=b.info["cores"], preset=b.st.preset, n_params=b.n_params,
        torch=b.torch.__version__))
    return out


def write_plot(path, rows: list, sgemm_gflops, meta: dict) -> str:
    """Step time and GFLOP/s vs T, both libraries; meta: cpu, cores, preset, n_params, torch."""
    if not path:
        return "n/a: no --plot path"
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import matplotlib.ticker
    except ImportError as e:
        return f"n/a: matplotlib unavailable ({e})"
    rows = [r for r in rows if "gpt2s" in r]
    if not rows:
        return "n/a: no timed rows"
    Ts = [r["T"] for r in rows]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.4))
    for lib, style, label in (("gpt2s", "o-", "gpt2s"),
                              ("torch", "s--", f"PyTorch {meta['torch']} eager")):
        med = np.array([r[lib]["median_s"] for r in rows])
        lo = med - np.array([r[lib]["min_s"] for r in rows])
        hi = np.array([r[lib]["max_s"] for r in rows]) - med
        ax1.errorbar(Ts, med, yerr=[lo, hi], fmt=style, capsize=3, label=label)
        ax2.plot(Ts, [r[lib]["gflops"] for r in rows], style, label=label)
    if sgemm_gflops:
        ax2.axhline(sgemm_gflops, color="gray", ls=":", label="sgemm (measured)")
    for ax in (ax1, ax2):
        ax.set_xscale("log", base=2)
        ax.set_xticks(Ts)
        ax.set_xticklabels([str(t) for t in Ts])
        ax.set_xlabel("sequence length T (batch 1)")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    ax1.set_yscale("log")
    ax1.yaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
    ax1.yaxis.set_minor_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
    ax1.set_ylabel("train step time, s (median, min-max)")
    ax1.set_title("fwd + loss + bwd step time")
    ax2.set_ylabel("GFLOP/s (matmul FLOPs / median time)")
    ax2.set_ylim(bottom=0)
    ax2.set_title("throughput")
    n_thr = rows[0]["threads"]["gpt2s"]
    name = "GPT-2 124M" if meta["preset"] == "gpt2" else f"GPT-2 preset {meta['preset']!r}"
    fig.suptitle(f"{name} ({meta['n_params'] / 1e6:.1f}M parameters, fp32) train step vs T on "
                 f"{meta['cpu']}, {meta['cores']} cores, {n_thr} threads")
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return str(path)


# ----------------------------------------------------------------------------------- output

def _fmt_s(r: dict) -> str:
    if not isinstance(r, dict) or "median_s" not in r:
        return (r or {}).get("status", "n/a") if isinstance(r, dict) else "n/a"
    med, lo, hi = r["median_s"], r["min_s"], r["max_s"]
    if med < 1.0:
        return f"{med * 1e3:8.1f} ms [{lo * 1e3:.1f}-{hi * 1e3:.1f}]"
    return f"{med:8.3f} s  [{lo:.3f}-{hi:.3f}]"


def _fmt_rate(r: dict) -> str:
    if not isinstance(r, dict) or r.get("gflops") is None:
        return "-"
    p = r.get("pct_sgemm")
    return f"{r['gflops']:6.1f}" + (f" ({p:3.0f}%)" if p is not None else "")


def print_table(title: str, header: list, rows: list):
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)] if rows else \
        [len(h) for h in header]
    print(f"== {title}")
    print("  " + "  ".join(str(h).ljust(w) for h, w in zip(header, widths)))
    for row in rows:
        print("  " + "  ".join(str(x).ljust(w) for x, w in zip(row, widths)))
    print()


def print_case(name: str, res: dict, b: Bench):
    if "status" in res:
        print(f"== {name}: {res['status']}\n")
        return
    if name == "sgemm":
        rows = [[r["provider"], f"{r['M']}x{r['K']}x{r['N']}",
                 f"{r['median_s'] / r['calls_per_run'] * 1e3:.2f} ms",
                 f"[{r['min_s'] / r['calls_per_run'] * 1e3:.2f}-"
                 f"{r['max_s'] / r['calls_per_run'] * 1e3:.2f}]",
                 f"{r['gflops']:.1f}"] for r in res["rows"]]
        print_table(f"sgemm float32, {b.args.threads} threads (reference = "
                    f"{res['reference_gflops']:.1f} GFLOP/s, {res['reference']})",
                    ["provider", "M x K x N", "median/call", "min-max", "GFLOP/s"], rows)
    elif name == "decode_matmul":
        rows = [[r["matrix"], f"{r['M']}x{r['K']}x{r['N']}", r["provider"],
                 f"{r['median_s'] / r['calls_per_run'] * 1e3:.3f} ms",
                 f"{r['gbs']:.1f}", "-" if r["pct_bandwidth"] is None
                 else f"{r['pct_bandwidth']:.0f}%"] for r in res["rows"]]
        kern = "in use" if res["small_m_kernels"] else "not available on this CPU/build"
        print_table(f"decode matmuls, 8 rows, weights from memory (gpt2s few-row kernels: {kern}; "
                    f"bandwidth reference {res['reference_gbs'] or 0:.1f} GB/s)",
                    ["matrix", "M x K x N", "provider", "median/call", "GB/s", "% bandwidth"],
                    rows)
    elif name == "bandwidth":
        rows = [[r["reader"], f"{r['bytes'] / 2**20:.0f} MiB", _fmt_s(r), f"{r['gbs']:.1f}",
                 f"{r['gbs_best']:.1f}"] for r in res["rows"]]
        print_table(f"memory read bandwidth (reference = {res['reference_gbs']:.1f} GB/s, "
                    f"{res['reference']})",
                    ["reader", "array", "median [min-max]", "GB/s (median)", "GB/s (best)"],
                    rows)
    elif name in ("train", "forward"):
        rows = []
        for r in res["rows"]:
            check = (f"loss {r['loss_gpt2s']:.6f} vs {r['loss_torch']:.6f} "
                     f"(rel {r['loss_rel_diff']:.1e})" if name == "train"
                     else f"logits rel L2 {r['logits_rel_diff']:.1e}")
            if "status" in r:
                rows.append([f"B={r['B']} T={r['T']}", r["status"], "", "", "", "", "", check])
                continue
            rows.append([f"B={r['B']} T={r['T']}", _fmt_s(r["gpt2s"]), _fmt_s(r["torch"]),
                         f"{r['ratio']:.2f}", f"{r['gflop']:.1f}", _fmt_rate(r["gpt2s"]),
                         _fmt_rate(r["torch"]), check])
        title = ("train step: zero_grad + forward + loss + backward, no optimizer"
                 if name == "train" else "forward: logits for all positions (torch no_grad)")
        print_table(title, ["shape", "gpt2s median [min-max]", "torch median [min-max]",
                            "gpt2s/torch", "GFLOP", "gpt2s GFLOP/s (%sgemm)",
                            "torch GFLOP/s (%sgemm)", "check"], rows)
    elif name == "generate":
        rows = []
        for r in res["rows"]:
            line = [f"B={r['B']}"]
            for lib in ("gpt2s", "transformers"):
                x = r.get(lib, {})
                if "median_s" in x:
                    frac = x.get("frac_ceiling")
                    line += [_fmt_s(x), f"{x['tokens_per_s']:.1f}",
                             f"{100 * frac:.0f}%" if frac is not None else "-"]
                else:
                    line += [x.get("status", "n/a"), "-", "-"]
            ceil = r.get("gpt2s", r.get("transformers", {})).get("ceiling_tokens_per_s")
            line += [f"{r['ratio']:.2f}" if "ratio" in r else "-",
                     f"{ceil:.1f}" if ceil else "-",
                     f"{100 * r['tokens_match']:.0f}%" if "tokens_match" in r else "-"]
            rows.append(line)
        print_table(f"generation: greedy, prompt {res['prompt']}, {res['new_tokens']} new "
                    f"tokens; ceiling = B x {res['bandwidth_gbs'] or 0:.1f} GB/s / "
                    f"{res['weight_bytes'] / 1e6:.0f} MB fp32 weights",
                    ["batch", "gpt2s median [min-max]", "tok/s", "%ceil",
                     "transformers median [min-max]", "tok/s", "%ceil", "gpt2s/hf",
                     "ceiling tok/s", "same tokens"], rows)
    elif name == "memory":
        rows = [[r["kind"], f"{r['peak_rss_mb']:.0f}", f"{r['rss_after_imports_mb']:.0f}",
                 f"{r['peak_minus_imports_mb']:.0f}",
                 f"{r['vm_hwm_mb']:.0f}" if r.get("vm_hwm_mb") else "-"] for r in res["rows"]]
        print_table(f"peak RSS, fresh subprocess each, two fwd+bwd steps at B={res['B']} "
                    f"T={res['T']} (fp32 parameters alone: {res['param_mb']:.0f} MiB)",
                    ["configuration", "peak RSS MiB (ru_maxrss)", "after imports MiB", "difference MiB",
                     "VmHWM MiB"],
                    rows)
    elif name == "scaling":
        th = res["threads"]
        rows = [[f"{r['n_threads']}", _fmt_s(r.get("gpt2s")), _fmt_s(r.get("torch")),
                 f"{r['ratio']:.2f}" if "ratio" in r else "-"] for r in th["rows"]]
        sp = ", ".join(f"{k} {v:.2f}x" for k, v in th["speedup"].items())
        print_table(f"thread scaling, train step B={th['B']} T={th['T']} (speed-up "
                    f"{th['speedup_of']}: {sp})",
                    ["threads", "gpt2s median [min-max]", "torch median [min-max]",
                     "gpt2s/torch"], rows)
        rows = [[f"T={r['T']}", _fmt_s(r.get("gpt2s")), _fmt_s(r.get("torch")),
                 f"{r['ratio']:.2f}" if "ratio" in r else r.get("status", "-"),
                 _fmt_rate(r.get("gpt2s")), _fmt_rate(r.get("torch"))]
                for r in res["step_vs_T"]["rows"]]
        print_table(f"train step vs T at B=1 (plot: {res['plot']})",
                    ["T", "gpt2s median [min-max]", "torch median [min-max]", "gpt2s/torch",
                     "gpt2s GFLOP/s (%sgemm)", "torch GFLOP/s (%sgemm)"], rows)


def _json_safe(x):
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {str(k): _json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_json_safe(v) for v in x]
    if isinstance(x, (np.floating, np.integer)):
        return _json_safe(x.item())
    return x


def _run_case(b: Bench, name: str, fn) -> dict:
    t0 = time.perf_counter()
    snap = cpu_snapshot()
    n_loads, n_discarded = len(QUIET.loads), QUIET.discarded
    try:
        res = fn(b)
    except Exception as e:  # noqa: BLE001 - one broken case must not hide the others
        traceback.print_exc()
        res = {"status": f"error: {type(e).__name__}: {e}"}
    res["wall_s"] = time.perf_counter() - t0
    res["other_load_cores"] = other_load(snap, cpu_snapshot())   # whole case, waits included
    timed = QUIET.loads[n_loads:]
    res["other_load_timed_median"] = median(timed)
    res["other_load_timed_max"] = max(timed) if timed else None
    res["rounds_discarded"] = QUIET.discarded - n_discarded
    return res


CASE_FUNCS = {"sgemm": case_sgemm, "bandwidth": case_bandwidth, "train": case_train,
              "forward": case_forward, "generate": case_generate,
              "decode_matmul": case_decode_matmul, "memory": case_memory,
              "scaling": case_scaling}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help="tiny model and short runs (CI: keeps the harness working; < 60 s)")
    p.add_argument("--json", metavar="PATH", help="write all results to this JSON file")
    p.add_argument("--plot", metavar="PATH", default=None,
                   help="PNG of step time vs T (default benchmarks/results/step_vs_T.png, "
                        "or step_vs_T_quick.png with --quick; '' for none)")
    p.add_argument("--repeats", type=int, default=None,
                   help="timed runs per library and case (default 5; 3 with --quick)")
    p.add_argument("--warmup", type=int, default=None, help="untimed runs first (default 1)")
    p.add_argument("--threads", type=int, default=2,
                   help="torch.set_num_threads and gpt2s.set_num_threads (default 2)")
    p.add_argument("--wait-quiet", metavar="SECONDS", type=float, default=0.0,
                   help="shared machines: before each case, wait up to this long for other "
                        "processes to leave the CPUs idle, and redo a round of timed runs "
                        "that other processes disturbed (after waiting likewise); default 0")
    p.add_argument("--only", metavar="CASES", default=",".join(ALL_CASES),
                   help=f"comma list of cases: {','.join(ALL_CASES)}")
    p.add_argument("--replot", metavar="JSON",
                   help="only redraw the --plot PNG from a results JSON of an earlier run")
    p.add_argument("--_memory-worker", dest="memory_worker", help=argparse.SUPPRESS)
    p.add_argument("--_cfg", dest="cfg", help=argparse.SUPPRESS)
    p.add_argument("--_shape", dest="shape", help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args.memory_worker:
        B, T = (int(x) for x in args.shape.split(","))
        print(json.dumps(memory_worker(args.memory_worker, args.cfg, B, T, args.threads)))
        return 0

    if args.replot:
        with open(args.replot) as f:
            rep = json.load(f)
        meta = rep["meta"]
        path = args.plot if args.plot is not None else str(HERE / "results" / "step_vs_T.png")
        print(write_plot(path, rep["results"]["scaling"]["step_vs_T"]["rows"],
                         rep["results"].get("sgemm", {}).get("reference_gflops"),
                         dict(cpu=meta["cpu"], cores=meta["cores"], preset=meta["preset"],
                              n_params=meta["n_params"], torch=meta["versions"]["torch"])))
        return 0

    st = Settings(args.quick)
    cases = [c.strip() for c in args.only.split(",") if c.strip()]
    bad = [c for c in cases if c not in ALL_CASES]
    if bad:
        p.error(f"--only: unknown case(s) {bad}; choose from {','.join(ALL_CASES)}")
    if args.threads < 1:
        p.error("--threads must be >= 1")
    args.repeats = args.repeats if args.repeats is not None else st.repeats
    args.warmup = args.warmup if args.warmup is not None else st.warmup
    if args.repeats < 1 or args.warmup < 0:
        p.error("--repeats must be >= 1 and --warmup >= 0")
    if args.plot is None:
        args.plot = str(HERE / "results" / ("step_vs_T_quick.png" if st.quick
                                            else "step_vs_T.png"))

    QUIET.wait_s = args.wait_quiet
    b = Bench(args, st)
    b.info = machine_info(args, threadpool_snapshot())
    snap = cpu_snapshot()
    time.sleep(1.0)
    b.info["other_load_start"] = other_load(snap, cpu_snapshot())
    print_header(b.info, args, st, b.threads())
    print(f"model: {b.m!r}; built and copied to torch in {b.build_s:.1f} s\n", flush=True)

    # the reference rates come first: "% sgemm" needs the sgemm rate, "% ceiling" the bandwidth
    wanted = set(cases)
    if wanted & {"train", "forward", "scaling"}:
        wanted.add("sgemm")
    if wanted & {"generate", "decode_matmul"}:
        wanted.add("bandwidth")
    order = [c for c in ALL_CASES if c in wanted]
    if set(order) != set(cases):
        print(f"(also running {sorted(set(order) - set(cases))}: the reference rates)\n")
    for name in order:
        if args.wait_quiet > 0:
            waited, busy = wait_quiet(args.wait_quiet)
            if waited >= 2.0:
                print(f"   (waited {waited:.0f} s for a quiet machine; other processes "
                      f"used {busy:.2f} cores in the last second)", flush=True)
        print(f"-- running {name} ...", flush=True)
        b.results[name] = _run_case(b, name, CASE_FUNCS[name])
        print_case(name, b.results[name], b)
        r = b.results[name]
        if r["rounds_discarded"]:
            print(f"   ({r['rounds_discarded']} round(s) of runs discarded and redone: other "
                  "processes were using the CPUs)")
        ol, mx = r["other_load_timed_median"], r["other_load_timed_max"]
        if ol is not None and (ol > QUIET.max_load or mx > 2 * QUIET.max_load):
            print(f"   !! during the timed runs of '{name}' other processes used {ol:.2f} cores "
                  f"(median; max {mx:.2f}): these timings are disturbed\n")
        elif ol is None and (r["other_load_cores"] or 0) > QUIET.max_load:
            print(f"   !! other processes used {r['other_load_cores']:.2f} cores during "
                  f"'{name}'\n")
        sys.stdout.flush()
    b.info["loadavg_end"] = list(os.getloadavg())

    report = {"meta": dict(b.info, threads=b.threads(), quick=st.quick, preset=st.preset,
                           n_params=b.n_params, repeats=args.repeats, warmup=args.warmup,
                           settle_s=st.settle, cases=order,
                           gpt2s_config=_gpt2s_show_config(b)),
              "results": b.results, "check_failures": b.check_failures}
    errors = [k for k, v in b.results.items() if str(v.get("status", "")).startswith("error")]
    report["errors"] = errors
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(_json_safe(report), f, indent=1)
        print(f"results written to {args.json}")
    la = b.info["loadavg_end"]
    print(f"load average at the end: {la[0]:.2f} {la[1]:.2f} {la[2]:.2f}")
    if errors:
        print(f"cases that crashed: {errors}", file=sys.stderr)
        return 1
    if b.check_failures:
        print("correctness checks failed:\n  " + "\n  ".join(b.check_failures), file=sys.stderr)
        return 2
    return 0


def _gpt2s_show_config(b: Bench):
    try:
        return b.gpt2s.show_config(file=io.StringIO())
    except Exception as e:  # noqa: BLE001
        return f"n/a ({e})"


if __name__ == "__main__":
    sys.exit(main())
