"""The benchmark harness must keep working: run `benchmarks/bench.py --quick` (tiny model, every
case) and check the JSON it writes.  Nothing here looks at how fast anything is.  The harness
times gpt2s against torch and transformers, so every test needs them (the `report` fixture
skips each one without them)."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "bench.py"

pytestmark = pytest.mark.skipif(not BENCH.exists(), reason="benchmarks/ is not in this tree "
                                "(tests run against an installed wheel)")


def _finite(x):
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _check_timing(r, what):
    assert isinstance(r, dict), what
    for k in ("median_s", "min_s", "max_s"):
        assert _finite(r[k]) and r[k] > 0, f"{what}: {k}={r.get(k)!r}"
    assert r["min_s"] <= r["median_s"] <= r["max_s"], what
    assert r["n"] == len(r["times_s"]) >= 1, what


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    tmp = tmp_path_factory.mktemp("bench")
    out = tmp / "bench.json"
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "2")
    p = subprocess.run([sys.executable, str(BENCH), "--quick", "--json", str(out),
                        "--plot", str(tmp / "plot.png")],
                       capture_output=True, text=True, timeout=300, env=env)
    assert p.returncode == 0, f"bench.py --quick failed ({p.returncode}):\n{p.stdout[-4000:]}\n" \
                              f"{p.stderr[-4000:]}"
    assert "gpt2s/torch" in p.stdout   # the table was printed
    with open(out) as f:
        rep = json.load(f)
    rep["_tmp"] = tmp
    return rep


def test_meta(report):
    meta = report["meta"]
    for k in ("cpu", "cores", "versions", "env", "threads", "preset", "repeats"):
        assert k in meta, k
    assert meta["quick"] is True
    assert {"OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE"} <= set(meta["env"])
    assert report["errors"] == [] and report["check_failures"] == []
    assert set(report["results"]) == {"sgemm", "bandwidth", "train", "forward", "generate",
                                      "decode_matmul", "memory", "scaling"}


def test_reference_rates(report):
    res = report["results"]
    assert _finite(res["sgemm"]["reference_gflops"]) and res["sgemm"]["reference_gflops"] > 0
    for r in res["sgemm"]["rows"]:
        _check_timing(r, f"sgemm {r['provider']}")
        assert _finite(r["gflops"])
    assert _finite(res["bandwidth"]["reference_gbs"]) and res["bandwidth"]["reference_gbs"] > 0


@pytest.mark.parametrize("case", ["train", "forward"])
def test_train_and_forward(report, case):
    rows = report["results"][case]["rows"]
    assert len(rows) == 2
    for r in rows:
        assert "status" not in r, r.get("status")
        for lib in ("gpt2s", "torch"):
            _check_timing(r[lib], f"{case} B={r['B']} T={r['T']} {lib}")
            assert _finite(r[lib]["gflops"]) and _finite(r[lib]["pct_sgemm"])
        assert _finite(r["ratio"]) and r["ratio"] > 0
        if case == "train":
            assert r["loss_rel_diff"] <= 1e-4
        else:
            assert r["logits_rel_diff"] <= 1e-4


def test_generate(report):
    gen = report["results"]["generate"]
    assert "status" not in gen, gen.get("status")
    assert _finite(gen["ceiling_steps_per_s"])
    assert [r["B"] for r in gen["rows"]] == [1, 8]
    for r in gen["rows"]:
        for lib in ("gpt2s", "transformers"):
            x = r[lib]
            if "status" in x:   # a side whose API is missing is reported, not timed
                assert x["status"].startswith("n/a"), x["status"]
                continue
            _check_timing(x, f"generate B={r['B']} {lib}")
            assert _finite(x["tokens_per_s"]) and _finite(x["frac_ceiling"])
        if "median_s" in r["gpt2s"] and "median_s" in r["transformers"]:
            assert _finite(r["ratio"]) and r["ratio"] > 0
            # greedy tokens of both on the same weights: the match fraction agrees with where
            # each row first differs (None: never)
            first = r["first_mismatch"]
            assert len(first) == r["B"]
            n_new = gen["new_tokens"]
            assert all(f is None or (type(f) is int and 0 <= f < n_new) for f in first), first
            if all(f is None for f in first):
                assert r["tokens_match"] == 1.0
            else:
                # a row that differs at step f matches on its first f tokens at least
                least = sum(n_new if f is None else f for f in first) / (n_new * r["B"])
                assert least <= r["tokens_match"] < 1.0, (r["tokens_match"], first)


def test_decode_matmul(report):
    dm = report["results"]["decode_matmul"]
    providers = {"gpt2s", "torch.mm"} | ({"gpt2s via sgemm"} if dm["small_m_kernels"] else set())
    for matrix in ("mlp.c_fc", "lm_head"):
        rows = [r for r in dm["rows"] if r["matrix"] == matrix]
        assert {r["provider"] for r in rows} == providers, matrix
        for r in rows:
            _check_timing(r, f"decode_matmul {matrix} {r['provider']}")
            assert _finite(r["gbs"]) and _finite(r["pct_bandwidth"]) and r["M"] == 8


def test_memory(report):
    mem = report["results"]["memory"]
    kinds = {r["kind"]: r for r in mem["rows"]}
    assert set(kinds) == {"gpt2s", "gpt2s+adamw", "torch", "torch+adamw"}
    for r in kinds.values():
        assert _finite(r["peak_rss_mb"]) and r["peak_rss_mb"] >= r["rss_after_imports_mb"] > 0


def test_scaling(report):
    sc = report["results"]["scaling"]
    assert [r["n_threads"] for r in sc["threads"]["rows"]][0] == 1
    for r in sc["threads"]["rows"] + sc["step_vs_T"]["rows"]:
        _check_timing(r["gpt2s"], "scaling gpt2s")
        _check_timing(r["torch"], "scaling torch")
    assert all(_finite(v) for v in sc["threads"]["speedup"].values())
    plot = sc["plot"]
    if not plot.startswith("n/a"):     # matplotlib is optional
        assert Path(plot).stat().st_size > 1000
