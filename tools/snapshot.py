"""Record, or compare against a record, the exact outputs of a fixed set of cases: logits,
losses, every gradient, an AdamW step, greedy and seeded-sampling generations, at float32,
bfloat16 and int8 storage, on 1 and 2 threads, for the bundled demo model, a random GPT-2
124M-shaped model and a small model with the non-default config fields.

A refactoring that must not change behaviour runs ``save`` on the tree before it and
``compare`` on the tree after it: every output must be equal bit for bit.  Only the public API
(and _core's kernel-variant switch) is used, so the script runs on both trees.  The record holds a SHA-256 of each output's bytes
(and its first values, to show how far a mismatch is off); it is generated from our own code,
so it is a regression check of a change, never a test expectation.

    python tools/snapshot.py save before.json
    python tools/snapshot.py compare before.json

``--kernel-variant V`` forces every weight type's kernels to the instruction-set variant V
(``x86-64-v3``, ``avx512``, ...; the types without it keep their best one): a record made on
an AVX2-only machine is compared on an AVX-512 one with ``--kernel-variant x86-64-v3``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time

import numpy as np

import gpt2s
from gpt2s import AdamW, GPT2, GPT2Config
from gpt2s import _core   # the kernel variants (--kernel-variant)


def _entry(a) -> dict:
    a = np.ascontiguousarray(np.asarray(a))
    return {"sha256": hashlib.sha256(a.tobytes()).hexdigest(), "dtype": str(a.dtype),
            "shape": list(a.shape), "head": [float(x) for x in a.reshape(-1)[:4]]}


def _models():
    yield "demo", lambda: GPT2.from_pretrained("demo")
    yield "gpt2-124M", lambda: GPT2.from_config(GPT2Config.preset("gpt2"), seed=0)
    # every non-default field that changes the math: an MLP width that is not 4 C, another
    # activation, unscaled / per-layer scaled attention, an untied head
    yield "variant", lambda: GPT2.from_config(
        GPT2Config(n_layer=3, n_head=4, n_embd=96, n_ctx=96, n_inner=224,
                   activation_function="gelu", scale_attn_by_inverse_layer_idx=True,
                   tie_word_embeddings=False, layer_norm_epsilon=1e-6), seed=3)
    yield "variant-relu", lambda: GPT2.from_config(
        GPT2Config(n_layer=2, n_head=2, n_embd=64, n_ctx=64, activation_function="relu",
                   scale_attn_weights=False), seed=4)


def _inputs(V: int, n_ctx: int):
    rng = np.random.default_rng(1234)
    # M = 1 (one-row products), 7, 15 (few-row kernels), 128 (sgemm / widened panels)
    shapes = [(1, 1), (1, 7), (5, 3), (2, min(64, n_ctx))]
    return [rng.integers(0, V, size=s) for s in shapes]


def run_cases(progress=True) -> dict:
    out = {}
    t0 = time.perf_counter()
    for mname, make in _models():
        base = make()
        V, n_ctx = base.config.vocab_size, base.config.n_ctx
        for threads in (1, 2):
            gpt2s.set_num_threads(threads)
            for dtype in ("float32", "bfloat16", "int8"):
                m = base if dtype == "float32" else base.to_dtype(dtype)
                key = f"{mname}/t{threads}/{dtype}"
                for i, idx in enumerate(_inputs(V, n_ctx)):
                    logits, _ = m.forward(idx)
                    out[f"{key}/logits{i}"] = _entry(logits)
                    tgt = np.roll(idx, -1, axis=1)
                    _, loss = m.forward(idx, tgt, for_backward=False)
                    out[f"{key}/loss{i}"] = _entry(np.float64(loss))
                prompt = _inputs(V, n_ctx)[1][0]
                out[f"{key}/greedy"] = _entry(m.generate(prompt, 12, temperature=0))
                out[f"{key}/sampled"] = _entry(m.generate(prompt, 12, temperature=0.9,
                                                          top_k=40, top_p=0.95, seed=7,
                                                          num_samples=3))
                out[f"{key}/batch_greedy"] = _entry(m.generate(_inputs(V, n_ctx)[2], 6,
                                                               temperature=0))
                out[f"{key}/stream"] = _entry(np.array(list(m.generate_stream(
                    prompt, 8, temperature=1.0, seed=11))))
                if progress:
                    print(f"  {key}: {time.perf_counter() - t0:.0f} s", file=sys.stderr)
            # training: every gradient, then one AdamW step with clipping
            m = make() if mname != "demo" else GPT2.from_pretrained("demo")
            idx = _inputs(V, n_ctx)[3]
            tgt = np.roll(idx, -1, axis=1)
            tgt[0, :3] = -1
            m.zero_grad()
            _, loss = m.forward(idx, tgt, return_logits=False)
            m.backward()
            key = f"{mname}/t{threads}/train"
            out[f"{key}/loss"] = _entry(np.float64(loss))
            for name, g in m.grads.items():
                out[f"{key}/grad/{name}"] = _entry(g)
            opt = AdamW(m, lr=1e-3, weight_decay=0.1)
            norm = opt.step(max_norm=0.5)
            out[f"{key}/norm"] = _entry(np.float64(norm))
            for name, p in m.params.items():
                out[f"{key}/param/{name}"] = _entry(p)
            _, loss2 = m.forward(idx, tgt, return_logits=False)
            out[f"{key}/loss_after_step"] = _entry(np.float64(loss2))
            if progress:
                print(f"  {key}: {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("mode", choices=["save", "compare"])
    p.add_argument("record")
    p.add_argument("--kernel-variant", metavar="V",
                   help="force every weight type that has variant V to it (default: each "
                        "type's best on this CPU)")
    args = p.parse_args(argv)
    if args.kernel_variant:
        forced = [t for t in _core.weight_types()
                  if args.kernel_variant in _core.kernel_variants(t)]
        if not forced:
            p.error(f"no weight type has kernel variant {args.kernel_variant!r} on this CPU")
        for t in forced:
            _core.set_kernel_variant(t, args.kernel_variant)
    print("kernels: " + ", ".join(f"{t} {_core.get_kernel_variant(t)}"
                                  for t in _core.weight_types()), file=sys.stderr)
    got = run_cases()
    if args.mode == "save":
        with open(args.record, "w") as f:
            json.dump({"gpt2s": gpt2s.__version__, "cases": got}, f, indent=0)
        print(f"saved {len(got)} outputs to {args.record}")
        return 0
    with open(args.record) as f:
        want = json.load(f)["cases"]
    missing = sorted(set(want) - set(got))
    extra = sorted(set(got) - set(want))
    differ = [k for k in sorted(set(want) & set(got)) if want[k]["sha256"] != got[k]["sha256"]]
    for k in differ[:40]:
        print(f"DIFFERS {k}: was {want[k]['head']}, now {got[k]['head']}")
    for k in missing[:20]:
        print(f"MISSING {k}")
    for k in extra[:20]:
        print(f"NEW {k}")
    same = len(want) - len(differ) - len(missing)
    print(f"{same} of {len(want)} outputs equal bit for bit; {len(differ)} differ, "
          f"{len(missing)} missing, {len(extra)} new")
    return 0 if not differ and not missing else 1


if __name__ == "__main__":
    sys.exit(main())
