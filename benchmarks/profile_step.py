#!/usr/bin/env python
"""Where a gpt2s train step spends its time: a per-kernel breakdown.

Every public function of ``gpt2s._core`` is wrapped with a timer (the façade calls them as
``_core.name(...)``, so replacing the module attributes catches every call); the model's
``forward``, ``backward`` and ``zero_grad`` (and the optimizer's ``step`` with ``--adamw``) are
wrapped to know which phase a call belongs to.  Kernels are synchronous (each OpenMP region
joins before it returns), so the wall time of a call is the kernel's time.  What a phase spends
outside the kernels (Python, argument checks, NumPy glue) is reported as "outside kernels".

    python benchmarks/profile_step.py                       # GPT-2 124M, B=4, T=64, 2 threads
    python benchmarks/profile_step.py --B 1 --T 1024 --adamw
    python benchmarks/profile_step.py --torch               # + torch.profiler on the baseline

Columns: ms/step (mean over the timed steps), % of the phase's wall time, calls per step,
GFLOP/s for the kernels that do matmul FLOPs (with % of the sgemm rate measured here), and
"arg GB/s": the bytes of every array argument divided by the time, a rough lower bound on the
memory traffic of the memory-bound kernels (layernorm, GELU, softmax ...).
"""

from __future__ import annotations

import argparse
import functools
import json
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

from harness import (announce_machine, cpu_snapshot, numpy_blas_threads, other_load, time_call,
                     wait_quiet)

NOT_KERNELS = {"have_openmp", "omp_max_threads", "set_num_threads", "get_num_threads"}


def matmul_label(weight_shape, C: int) -> str:
    rows, cols = weight_shape
    return {(C, 3 * C): "attn.c_attn", (C, C): "attn.c_proj", (C, 4 * C): "mlp.c_fc",
            (4 * C, C): "mlp.c_proj"}.get((rows, cols), f"{rows}x{cols}")


def kernel_flops(name: str, args, C: int):
    """(FLOPs, label) of one call, for the kernels that do matmul work; (0, None) else."""
    try:
        if name == "matmul_forward":            # out, inp (N, C), weight (C, OC), bias
            (N, K), (_, OC) = args[1].shape, args[2].shape
            return 2.0 * N * K * OC, matmul_label(args[2].shape, C)
        if name == "matmul_backward":           # dinp, dweight, dbias, dout, inp, weight, acc
            (N, K), (_, OC) = args[4].shape, args[5].shape
            return 4.0 * N * K * OC, matmul_label(args[5].shape, C)
        if name == "lm_head_forward":           # logits, inp (N, C), wte (V, C)
            (N, K), V = args[1].shape, args[2].shape[0]
            return 2.0 * N * K * V, "lm_head"
        if name == "lm_head_backward":          # dinp, dwte, dlogits, inp, wte
            (N, K), V = args[3].shape, args[4].shape[0]
            return 4.0 * N * K * V, "lm_head"
        if name == "attention_forward":         # out (B, T, C), lse, q, qoff, k, koff, v, ...
            B, T, CC = args[0].shape
            Tk = args[4].shape[1] if args[4].ndim == 3 else T
            return 2.0 * B * CC * T * (Tk + 1) if Tk == T else 4.0 * B * CC * T * Tk, None
        if name == "attention_backward":        # dqkv, dout (B, T, C), ...
            B, T, CC = args[1].shape
            return 4.0 * B * CC * T * (T + 1), None
    except (AttributeError, IndexError, TypeError, ValueError):
        pass
    return 0.0, None


class Profiler:
    def __init__(self, core, C: int):
        self.core, self.C = core, C
        self.phase = "other"
        self.enabled = False
        self.kernel = defaultdict(lambda: [0.0, 0, 0.0, 0.0])   # (phase, name) -> t, n, flops, bytes
        self.matmul = defaultdict(lambda: [0.0, 0, 0.0])        # (phase, name, label) -> t, n, flops
        self.phase_wall = defaultdict(float)
        self.originals = {}

    def install(self):
        for name in dir(self.core):
            fn = getattr(self.core, name)
            if name.startswith("_") or name in NOT_KERNELS or not callable(fn) \
                    or isinstance(fn, type):
                continue
            self.originals[name] = fn
            setattr(self.core, name, self._wrap(name, fn))

    def uninstall(self):
        for name, fn in self.originals.items():
            setattr(self.core, name, fn)

    def _wrap(self, name, fn):
        prof = self

        @functools.wraps(fn)
        def timed(*args, **kwargs):
            if not prof.enabled:
                return fn(*args, **kwargs)
            t0 = time.perf_counter()
            r = fn(*args, **kwargs)
            dt = time.perf_counter() - t0
            flops, label = kernel_flops(name, args, prof.C)
            nbytes = sum(a.nbytes for a in args if isinstance(a, np.ndarray))
            k = prof.kernel[(prof.phase, name)]
            k[0] += dt
            k[1] += 1
            k[2] += flops
            k[3] += nbytes
            if label is not None:
                mm = prof.matmul[(prof.phase, name, label)]
                mm[0] += dt
                mm[1] += 1
                mm[2] += flops
            return r
        return timed

    def phase_of(self, phase, fn):
        prof = self

        @functools.wraps(fn)
        def run(*args, **kwargs):
            prev, prof.phase = prof.phase, phase
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                if prof.enabled:
                    prof.phase_wall[phase] += time.perf_counter() - t0
                prof.phase = prev
        return run


def measure_sgemm(N: int, C: int, threads: int) -> float:
    """GFLOP/s of the best of numpy / torch at the c_fc shape (N, C) @ (C, 4C)."""
    import torch
    rng = np.random.default_rng(0)
    A = rng.standard_normal((N, C), dtype=np.float32)
    W = rng.standard_normal((C, 4 * C), dtype=np.float32)
    out = np.empty((N, 4 * C), np.float32)
    tA, tW, tout = torch.from_numpy(A), torch.from_numpy(W), torch.empty(N, 4 * C)
    limit = numpy_blas_threads(threads)   # numpy's BLAS only: gpt2s's stays at 1 thread
    best = 0.0
    with limit:
        for fn in (lambda: np.matmul(A, W, out=out), lambda: torch.mm(tA, tW, out=tout)):
            fn()

            def five_calls(fn=fn):
                for _ in range(5):
                    fn()

            ts = [time_call(five_calls) / 5 for _ in range(7)]
            best = max(best, 2.0 * N * C * 4 * C / np.median(ts) / 1e9)
    time.sleep(0.3)  # let numpy's OpenBLAS workers go idle
    return best


def quiet_first(args):
    if args.wait_quiet > 0:
        waited, busy = wait_quiet(args.wait_quiet)
        if waited >= 2:
            print(f"(waited {waited:.0f} s for a quiet machine; other processes used "
                  f"{busy:.2f} cores in the last second)")


def timed_runs(step, n: int) -> list:
    """Wall times of n calls of step, each after 50 ms idle (as bench.py's full runs do)."""
    return [time_call(step, settle=0.05) for _ in range(n)]


def report_load(load):
    if load is None:
        print()
    elif load > 0.1:
        print(f"!! other processes used {load:.2f} cores during the measurement: these numbers "
              "are disturbed (with 2 threads, every parallel region waits for a descheduled "
              "thread)\n")
    else:
        print(f"(other processes used {load:.2f} cores during the measurement)\n")


def kernel_table(prof, phase, wall, n, sgemm=None):
    items = sorted(((name, v) for (ph, name), v in prof.kernel.items() if ph == phase),
                   key=lambda kv: -kv[1][0])
    rows, kernels, in_kernels = [], [], 0.0
    for name, (t, calls, flops, nbytes) in items:
        t /= n
        in_kernels += t
        gfl = flops / n / t / 1e9 if flops else None
        rate = "-" if not gfl else (f"{gfl:.1f} ({100 * gfl / sgemm:.0f}%)" if sgemm
                                    else f"{gfl:.1f}")
        rows.append([name, f"{1e3 * t:.2f}", f"{100 * t / wall:.1f}%", f"{calls / n:g}",
                     f"{1e6 * t * n / calls:.1f}", rate, f"{nbytes / n / t / 1e9:.1f}"])
        kernels.append({"kernel": name, "ms": 1e3 * t, "pct": 100 * t / wall,
                        "calls": calls / n, "us_per_call": 1e6 * t * n / calls,
                        "gflops": gfl, "arg_gbs": nbytes / n / t / 1e9})
    outside = wall - in_kernels
    rows.append(["(outside kernels)", f"{1e3 * outside:.2f}", f"{100 * outside / wall:.1f}%",
                 "", "", "", ""])
    rows.append(["total", f"{1e3 * wall:.2f}", "100%", "", "", "", ""])
    return rows, kernels, outside


def profile_generate(args):
    """Per-kernel breakdown of one greedy generate call (prefill + decoding)."""
    import gpt2s
    from gpt2s import _core
    gpt2s.set_num_threads(args.threads)
    cfg = gpt2s.GPT2Config.preset(args.preset)
    m = gpt2s.GPT2.from_config(cfg, seed=0)
    B = args.generate
    T = args.T if args.T != 64 else 16      # --T's default is the train step's
    prompt = np.random.default_rng(7 + B).integers(0, cfg.vocab_size, (B, T))
    m.generate(prompt, args.new, temperature=0.0)           # warm-up: buffers, KV cache
    prof = Profiler(_core, cfg.n_embd)
    prof.install()
    prof.phase = "generate"
    quiet_first(args)
    snap = cpu_snapshot()
    prof.enabled = True
    t0 = time.perf_counter()
    m.generate(prompt, args.new, temperature=0.0)
    wall = time.perf_counter() - t0
    prof.enabled = False
    prof.uninstall()
    load = other_load(snap, cpu_snapshot())
    wbytes = 4 * m.num_parameters()
    print(f"gpt2s {gpt2s.__version__}: {args.preset} generate, B={B}, prompt {T}, {args.new} new "
          f"tokens, {gpt2s.get_num_threads()} threads: {wall:.3f} s, {B * args.new / wall:.1f} "
          f"tok/s, {1e3 * wall / args.new:.1f} ms per decoding step (fp32 weights "
          f"{wbytes / 1e6:.0f} MB: {wbytes / (wall / args.new) / 1e9:.1f} GB/s of weight reads)")
    report_load(load)
    rows, kernels, outside = kernel_table(prof, "generate", wall / args.new, args.new)
    print_rows("per decoding step (prefill included, averaged)",
               ["kernel", "ms/step", "%", "calls/step", "us/call", "GFLOP/s", "arg GB/s"],
               rows)
    rows = []
    for (ph, name, label), (t, calls, flops) in sorted(prof.matmul.items(),
                                                       key=lambda kv: -kv[1][0]):
        rows.append([name, label, f"{1e3 * t / args.new:.2f}", f"{1e6 * t / calls:.1f}",
                     f"{flops / t / 1e9:.1f}"])
    print_rows("matmuls by weight", ["kernel", "weight", "ms/step", "us/call", "GFLOP/s"], rows)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        with open(args.json, "w") as f:
            json.dump({"mode": "generate", "B": B, "prompt": T, "new": args.new,
                       "wall_s": wall, "other_load_cores": load, "kernels": kernels,
                       "machine": announce_machine(file=None)}, f, indent=1)


def print_rows(title, header, rows):
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    print(f"== {title}")
    print("  " + "  ".join(str(h).rjust(w) if i else str(h).ljust(w)
                           for i, (h, w) in enumerate(zip(header, widths))))
    for row in rows:
        print("  " + "  ".join(str(x).rjust(w) if i else str(x).ljust(w)
                               for i, (x, w) in enumerate(zip(row, widths))))
    print()


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="gpt2")
    p.add_argument("--B", type=int, default=4)
    p.add_argument("--T", type=int, default=64)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--steps", type=int, default=5, help="timed steps (default 5)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--adamw", action="store_true", help="include gpt2s.AdamW(m).step()")
    p.add_argument("--torch", action="store_true",
                   help="also torch.profiler on the PyTorch baseline, same shape")
    p.add_argument("--generate", metavar="B", type=int, default=None,
                   help="profile greedy generation at batch B instead of a train step "
                        "(prompt of --T tokens, default 16 here, and --new new tokens)")
    p.add_argument("--new", type=int, default=128, help="new tokens with --generate")
    p.add_argument("--wait-quiet", metavar="SECONDS", type=float, default=120.0,
                   help="wait up to this long for other processes to leave the CPUs idle "
                        "before measuring (default 120; 0: don't)")
    p.add_argument("--json", metavar="PATH")
    args = p.parse_args(argv)
    announce_machine()
    if args.generate is not None:
        return profile_generate(args)

    import gpt2s
    from gpt2s import _core
    gpt2s.set_num_threads(args.threads)
    cfg = gpt2s.GPT2Config.preset(args.preset)
    m = gpt2s.GPT2.from_config(cfg, seed=0)
    B, T, C = args.B, args.T, cfg.n_embd
    rng = np.random.default_rng(1000 * B + T)
    idx = rng.integers(0, cfg.vocab_size, (B, T), dtype=np.int64)
    tgt = rng.integers(0, cfg.vocab_size, (B, T), dtype=np.int64)
    import inspect
    kw = {"return_logits": False} if "return_logits" in inspect.signature(
        m.forward).parameters else {}

    quiet_first(args)
    sgemm = measure_sgemm(B * T, C, args.threads)

    prof = Profiler(_core, C)
    prof.install()
    m.forward = prof.phase_of("forward", m.forward)
    m.backward = prof.phase_of("backward", m.backward)
    m.zero_grad = prof.phase_of("zero_grad", m.zero_grad)
    opt = None
    if args.adamw:
        opt = gpt2s.AdamW(m)
        opt.step = prof.phase_of("adamw", opt.step)

    def step():
        m.zero_grad()
        m.forward(idx, tgt, **kw)
        m.backward()
        if opt is not None:
            opt.step()

    for _ in range(args.warmup):
        step()
    quiet_first(args)
    snap = cpu_snapshot()
    prof.enabled = True
    steps = timed_runs(step, args.steps)
    prof.enabled = False
    prof.uninstall()
    load = other_load(snap, cpu_snapshot())
    n = args.steps
    step_ms = 1e3 * float(np.mean(steps))

    print(f"gpt2s {gpt2s.__version__}: {args.preset} ({m.num_parameters() / 1e6:.1f}M), "
          f"B={B} T={T}, {gpt2s.get_num_threads()} threads, {n} steps after {args.warmup} "
          f"warm-up; step {step_ms:.1f} ms mean (median {1e3 * np.median(steps):.1f}, "
          f"min {1e3 * min(steps):.1f}, max {1e3 * max(steps):.1f}); sgemm reference "
          f"{sgemm:.1f} GFLOP/s (numpy/torch at {B * T}x{C}x{4 * C})")
    report_load(load)

    report = {"preset": args.preset, "B": B, "T": T, "threads": gpt2s.get_num_threads(),
              "steps": n, "step_ms_mean": step_ms, "step_ms_all": [1e3 * s for s in steps],
              "sgemm_gflops": sgemm, "other_load_cores": load, "phases": {}, "matmuls": []}
    phases = [ph for ph in ("zero_grad", "forward", "backward", "adamw")
              if ph in prof.phase_wall]
    summary = []
    for ph in phases:
        wall = prof.phase_wall[ph] / n
        items = sorted(((name, v) for (phase, name), v in prof.kernel.items() if phase == ph),
                       key=lambda kv: -kv[1][0])
        rows, in_kernels, kernels = [], 0.0, []
        for name, (t, calls, flops, nbytes) in items:
            t /= n
            in_kernels += t
            gfl = flops / n / t / 1e9 if flops else None
            rows.append([name, f"{1e3 * t:.2f}", f"{100 * t / wall:.1f}%", f"{calls // n}",
                         f"{gfl:.1f} ({100 * gfl / sgemm:.0f}%)" if gfl else "-",
                         f"{nbytes / n / t / 1e9:.1f}"])
            kernels.append({"kernel": name, "ms": 1e3 * t, "pct_of_phase": 100 * t / wall,
                            "calls": calls // n, "gflops": gfl,
                            "arg_gbs": nbytes / n / t / 1e9})
        outside = wall - in_kernels
        rows.append(["(outside kernels)", f"{1e3 * outside:.2f}", f"{100 * outside / wall:.1f}%",
                     "", "", ""])
        rows.append(["total", f"{1e3 * wall:.2f}", "100%", "", "", ""])
        print_rows(f"{ph}: {1e3 * wall:.1f} ms/step ({100 * wall / (step_ms / 1e3):.0f}% of the "
                   f"step)", ["kernel", "ms/step", "% phase", "calls", "GFLOP/s (%sgemm)",
                              "arg GB/s"], rows)
        report["phases"][ph] = {"ms": 1e3 * wall, "outside_kernels_ms": 1e3 * outside,
                                "kernels": kernels}
        summary.append((ph, wall))

    rows = []
    for (ph, name, label), (t, calls, flops) in sorted(prof.matmul.items(),
                                                       key=lambda kv: -kv[1][0]):
        t /= n
        gfl = flops / n / t / 1e9
        rows.append([f"{ph}/{name}", label, f"{1e3 * t:.2f}", f"{calls // n}",
                     f"{flops / n / 1e9:.2f}", f"{gfl:.1f}", f"{100 * gfl / sgemm:.0f}%"])
        report["matmuls"].append({"phase": ph, "kernel": name, "weight": label, "ms": 1e3 * t,
                                  "calls": calls // n, "gflop": flops / n / 1e9,
                                  "gflops": gfl})
    print_rows("matmul work by weight (all layers summed)",
               ["phase/kernel", "weight", "ms/step", "calls", "GFLOP", "GFLOP/s", "%sgemm"],
               rows)
    tot_flops = sum(v[2] for v in prof.kernel.values()) / n
    print(f"step: {step_ms:.1f} ms; matmul+attention FLOPs {tot_flops / 1e9:.1f} GFLOP -> "
          f"{tot_flops / (step_ms / 1e3) / 1e9:.1f} GFLOP/s overall "
          f"({100 * tot_flops / (step_ms / 1e3) / 1e9 / sgemm:.0f}% of sgemm); at the sgemm "
          f"rate the step would take {1e3 * tot_flops / 1e9 / sgemm:.0f} ms")
    report["flops_per_step"] = tot_flops

    if args.torch:
        report["torch"] = torch_profile(cfg, m, idx, tgt, args)
    if args.json:
        report["machine"] = announce_machine(file=None)
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
        print(f"written to {args.json}")


def torch_profile(cfg, m, idx, tgt, args):
    import torch
    from torch_gpt2 import TorchGPT2
    torch.set_num_threads(args.threads)
    tm = TorchGPT2.from_gpt2s(m)
    tidx, ttgt = torch.from_numpy(idx), torch.from_numpy(tgt)

    def step():
        tm.zero_grad(set_to_none=True)
        _, loss = tm(tidx, ttgt)
        loss.backward()

    for _ in range(args.warmup):
        step()
    ts = timed_runs(step, args.steps)
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(args.steps):
            step()
    print(f"\n== PyTorch {torch.__version__} eager, same shape: step {1e3 * np.mean(ts):.1f} ms "
          f"mean (unprofiled); torch.profiler top ops by self CPU time over {args.steps} steps:")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=20))
    return {"step_ms_mean": 1e3 * float(np.mean(ts)), "step_ms_all": [1e3 * t for t in ts]}


if __name__ == "__main__":
    main()
