"""Pythia-shaped GPT-NeoX models with random weights, written tensor by tensor in Hugging
Face's layout (tests/neox_ckpt.py): Pythia-160M loads, runs and matches transformers on the
same file; Pythia-1.4B (slow) loads and runs in float32, bfloat16 and int8 storage in a fresh
process each, whose peak RSS is reported."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from gpt2s import AutoModelForCausalLM, GPTNeoXForCausalLM

from neox_ckpt import PYTHIA_1_4B, PYTHIA_160M, write_random_neox
from ref import rel_err


@pytest.fixture(scope="module")
def pythia_160m(tmp_path_factory):
    path = tmp_path_factory.mktemp("pythia-160m")
    write_random_neox(path, PYTHIA_160M, seed=1)
    return path


def test_pythia_160m_shapes_load_and_run(pythia_160m):
    m = AutoModelForCausalLM.from_pretrained(pythia_160m)
    assert type(m) is GPTNeoXForCausalLM
    cfg = m.config
    assert (cfg.n_layer, cfg.hidden_size, cfg.n_head, cfg.rotary_dim, cfg.vocab_size) == \
        (12, 768, 12, 16, 50304)
    assert sum(p.size for p in m.params.values()) == 162_322_944   # Pythia-160M's count
    idx = np.random.default_rng(0).integers(0, 50304, (1, 8))
    logits = m.forward(idx)[0]
    assert logits.shape == (1, 8, 50304) and np.isfinite(logits).all()
    out = m.generate(idx, 3, temperature=0.0)
    assert out.shape == (1, 11) and out[0, 8] == np.argmax(logits[0, -1])


@pytest.mark.slow
def test_pythia_160m_shapes_match_transformers(pythia_160m):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    m = AutoModelForCausalLM.from_pretrained(pythia_160m)
    idx = np.random.default_rng(0).integers(0, 50304, (2, 24))
    hf = transformers.GPTNeoXForCausalLM.from_pretrained(pythia_160m, dtype=torch.float64)
    with torch.no_grad():
        want = hf.eval()(input_ids=torch.from_numpy(idx)).logits.numpy()
    assert rel_err(m.forward(idx)[0], want) < 1e-5


_RUN = r"""
import json, resource, sys, time
import numpy as np
import gpt2s
t0 = time.perf_counter()
m = gpt2s.AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=sys.argv[2])
load = time.perf_counter() - t0
idx = np.random.default_rng(0).integers(0, m.config.vocab_size, (1, 16))
logits = m.forward(idx)[0]
out = m.generate(idx, 4, temperature=0.0)
np.save(sys.argv[3], logits[0, -1])
print(json.dumps({"rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "load_s": load, "params": int(sum(np.prod(p.shape) for p in m.params.values())),
                  "new": out[0, 16:].tolist()}))
"""


@pytest.mark.slow
def test_pythia_1_4b_shapes_load_and_run_with_peak_rss(tmp_path):
    write_random_neox(tmp_path / "p", PYTHIA_1_4B, seed=2)
    results = {}
    for dtype in ("float32", "bfloat16", "int8"):
        r = subprocess.run([sys.executable, "-c", _RUN, str(tmp_path / "p"), dtype,
                            str(tmp_path / f"{dtype}.npy")], capture_output=True, text=True,
                           timeout=1800)
        assert r.returncode == 0, r.stderr[-3000:]
        results[dtype] = json.loads(r.stdout.strip().splitlines()[-1])
        print(f"Pythia-1.4B shape, {dtype}: peak RSS {results[dtype]['rss_mib']:.0f} MiB, "
              f"loaded in {results[dtype]['load_s']:.1f} s")
    assert results["float32"]["params"] == 1_414_647_808   # Pythia-1.4B's parameter count
    want = np.load(tmp_path / "float32.npy")
    for dtype, bound in (("bfloat16", 1e-2), ("int8", 3e-2)):
        assert rel_err(np.load(tmp_path / f"{dtype}.npy"), want) < bound, dtype
    # the weights of a bfloat16 file are exact in bfloat16 storage: the same greedy tokens
    assert results["bfloat16"]["new"][:1] == results["float32"]["new"][:1]
