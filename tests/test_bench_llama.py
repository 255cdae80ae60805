"""The gpt2s-vs-llama.cpp harness (benchmarks/vs_llama_cpp.py) must keep working: its parsers of
llama.cpp's output and of GGUF files, its summary against the issue's targets, and a gpt2s-only
run end to end on a tiny model.  llama.cpp itself (built by ../shared/peers/setup.sh into
/tmp/anchors) is only used where present; CI has none, and those tests skip saying so.
Nothing here looks at how fast anything is."""

import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

BENCH_DIR = Path(__file__).resolve().parents[1] / "benchmarks"
SCRIPT = BENCH_DIR / "vs_llama_cpp.py"
ANCHORS = Path(os.environ.get("GPT2S_ANCHORS", "/tmp/anchors"))

pytestmark = pytest.mark.skipif(not SCRIPT.exists(), reason="benchmarks/ is not in this tree "
                                "(tests run against an installed wheel)")


@pytest.fixture(scope="module")
def vs():
    import vs_llama_cpp   # benchmarks/ is on sys.path: pyproject.toml's pytest pythonpath
    return vs_llama_cpp


def _need_llama():
    if not (ANCHORS / "llama-build" / "bin" / "llama-completion").exists():
        pytest.skip(f"no llama.cpp build in {ANCHORS} (made by ../shared/peers/setup.sh; "
                    "not available in CI)")


# llama-completion's stderr tail, as printed by the build in /tmp/anchors (numbers changed)
COMPLETION_STDERR = """\
0.00.634.139 I generate: n_ctx = 256, n_batch = 2048, n_predict = 128, n_keep = 0
0.13.121.500 I common_perf_print:    sampling time =      12.34 ms
0.13.121.539 I common_perf_print:        load time =     210.55 ms
0.13.121.539 I common_perf_print: prompt eval time =      80.00 ms /    16 tokens (    5.00 ms per token,   200.00 tokens per second)
0.13.121.563 I common_perf_print:        eval time =    2540.00 ms /   127 runs   (   20.00 ms per token,    50.00 tokens per second)
0.13.121.570 I common_perf_print:       total time =    2700.00 ms /   143 tokens
"""

BATCHED_STDOUT = """\
main: n_kv_max = 1024, n_batch = 1024, n_ubatch = 512, flash_attn = -1, is_pp_shared = 0, n_gpu_layers = -1, n_threads = 2, n_threads_batch = 2

|    PP |     TG |    B |   N_KV |   T_PP s | S_PP t/s |   T_TG s | S_TG t/s |      T s |    S t/s |
|-------|--------|------|--------|----------|----------|----------|----------|----------|----------|
|    16 |    128 |    1 |    144 |    0.080 |   200.00 |    2.560 |    50.00 |    2.640 |    54.55 |
|    16 |    128 |    8 |   1152 |    0.500 |   256.00 |    5.120 |   200.00 |    5.620 |   204.98 |

llama_perf_context_print:        load time =     200.00 ms
"""


def test_parse_completion_timings(vs):
    r = vs.parse_completion_timings(COMPLETION_STDERR)
    assert r["n_prompt"] == 16 and r["decode_calls"] == 127
    assert r["prefill_s"] == pytest.approx(0.080) and r["decode_s"] == pytest.approx(2.54)
    assert r["prefill_tok_s"] == pytest.approx(200.0)
    assert r["decode_tok_s"] == pytest.approx(50.0)
    with pytest.raises(ValueError, match="eval time"):
        vs.parse_completion_timings("no timings here")


def test_parse_batched_bench(vs):
    rows = vs.parse_batched_bench(BATCHED_STDOUT)
    assert [r["B"] for r in rows] == [1.0, 8.0]
    assert rows[1]["S_TG t/s"] == 200.0 and rows[0]["T_PP s"] == 0.08
    with pytest.raises(ValueError, match="table"):
        vs.parse_batched_bench("| a | b |\n|---|---|\n| 1 | 2 |\n")


def test_parse_time_v(vs):
    text = ("\tCommand being timed: \"x\"\n\tUser time (seconds): 1.50\n"
            "\tSystem time (seconds): 0.25\n\tMaximum resident set size (kbytes): 204800\n")
    assert vs.parse_time_v(text) == {"peak_rss_mib": 200.0, "user_s": 1.5, "sys_s": 0.25}
    with pytest.raises(ValueError, match="resident"):
        vs.parse_time_v("nothing")


@pytest.mark.parametrize("gnu_time", [True, False])
def test_runner_peak_rss(vs, tmp_path, gnu_time):
    """The peak RSS of a command that allocates 256 MiB is its own, with GNU time or
    with the fallback launcher."""
    if gnu_time and not Path("/usr/bin/time").exists():
        pytest.skip("no /usr/bin/time")
    run = vs.Runner(1, tmp_path, 0.0, lambda msg: None, gnu_time=gnu_time)
    r = run([sys.executable, "-c", "b = bytearray(256 << 20)"], "alloc")
    assert 256 <= r["proc"]["peak_rss_mib"] < 256 + 200
    small = run([sys.executable, "-c", "pass"], "small")["proc"]["peak_rss_mib"]
    assert small < 100
    with pytest.raises(RuntimeError, match="exit 3"):
        run([sys.executable, "-c", "raise SystemExit(3)"], "fails")


def _gguf_string(s):
    b = s.encode()
    return struct.pack("<Q", len(b)) + b


def write_gguf(path, tensors, kv_extra=True):
    """A minimal GGUF v3: a few metadata values of different types (a string array like the
    tokenizer's among them) and the tensor table (data section left out: the parser never
    reads it)."""
    kvs = [_gguf_string("general.architecture") + struct.pack("<I", 8) + _gguf_string("gpt2"),
           _gguf_string("gpt2.block_count") + struct.pack("<II", 4, 1),
           _gguf_string("gpt2.layer_norm_epsilon") + struct.pack("<If", 6, 1e-5),
           _gguf_string("tokenizer.ggml.tokens") + struct.pack("<IIQ", 9, 8, 3)
           + b"".join(_gguf_string(t) for t in ("a", "bb", "ccc")),
           _gguf_string("tokenizer.ggml.scores") + struct.pack("<IIQ", 9, 6, 2)
           + struct.pack("<ff", 0.5, 1.5)]
    if not kv_extra:
        kvs = kvs[:1]
    out = b"GGUF" + struct.pack("<IQQ", 3, len(tensors), len(kvs)) + b"".join(kvs)
    for name, shape, ttype in tensors:
        out += _gguf_string(name) + struct.pack("<I", len(shape)) \
            + struct.pack("<" + "Q" * len(shape), *shape) + struct.pack("<IQ", ttype, 0)
    path.write_bytes(out)


def test_gguf_tensors_and_bytes_per_token(vs, tmp_path):
    p = tmp_path / "m.gguf"
    # ne0 first: token_embd is (n_vocab=10 rows of n_embd=64), Q8_0 = 34 bytes per 32 values
    write_gguf(p, [("token_embd.weight", [64, 10], 8), ("position_embd.weight", [64, 16], 0),
                   ("blk.0.attn_qkv.weight", [64, 192], 1), ("blk.0.attn_qkv.bias", [192], 0),
                   ("output_norm.weight", [64], 0)])
    ts = vs.gguf_tensors(p)
    assert [t["name"] for t in ts][:2] == ["token_embd.weight", "position_embd.weight"]
    nbytes = {t["name"]: t["nbytes"] for t in ts}
    assert nbytes == {"token_embd.weight": 10 * 2 * 34, "position_embd.weight": 64 * 16 * 4,
                      "blk.0.attn_qkv.weight": 64 * 192 * 2, "blk.0.attn_qkv.bias": 192 * 4,
                      "output_norm.weight": 64 * 4}
    assert vs.gguf_matmul_types(ts) == {"Q8_0": 1, "F32": 3, "F16": 1}
    # tied head: token_embd read whole, one row of position_embd
    expect = 10 * 2 * 34 + 64 * 4 + 64 * 192 * 2 + 192 * 4 + 64 * 4
    assert vs.gguf_weight_bytes_per_token(ts) == expect
    # a separate output.weight: then token_embd contributes one row only
    untied = ts + [{"name": "output.weight", "type": "Q8_0", "shape": [64, 10],
                    "nbytes": 680, "row_bytes": 68}]
    assert vs.gguf_weight_bytes_per_token(untied) == expect - 10 * 68 + 68 + 680


def test_gguf_rejects(vs, tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGML" + bytes(20))
    with pytest.raises(ValueError, match="not a GGUF"):
        vs.gguf_tensors(bad)
    unknown = tmp_path / "unknown.gguf"
    write_gguf(unknown, [("t", [32], 99)], kv_extra=False)
    with pytest.raises(ValueError, match="ggml type 99"):
        vs.gguf_tensors(unknown)
    write_gguf(unknown, [("t", [32], 0)], kv_extra=False)
    unknown.write_bytes(unknown.read_bytes()[:-6])
    with pytest.raises(ValueError, match="truncated"):
        vs.gguf_tensors(unknown)


def _results(g_decode, l_decode, g_rss, l_rss, b8, q):
    """A results dict as main() builds it: one round, per engine and precision."""
    def runs(dec, rss, b8rate, bpt):
        return {"decode": [{"decode_tok_s": dec, "prefill_tok_s": 2 * dec, "peak_rss_mib": rss}],
                "prefill512": [{"prefill_tok_s": 10 * dec}],
                "batch8": [{"decode_tok_s": b8rate, "decode_tok_s_b1": dec}],
                "weight_bytes_per_token": bpt}
    pairs = [("float32", "F32", 4e8), ("bfloat16", "F16", 2e8), ("int8", "Q8_0", 1.1e8)]
    return {"meta": {"threads": 2, "rounds": 1, "cpu": "Test CPU", "lscpu": {}, "cores": 2,
                     "isa": ["avx2"], "mem_gib": 8.0, "platform": "test", "git": "abc",
                     "loadavg_start": [0.1, 0.1, 0.1], "loadavg_end": [1.0, 1.0, 1.0],
                     "quality_tokens": 16},
            "bandwidth": [{"gbs": 20.0}],
            "runs": {"gpt2s": {d: runs(g_decode[d], g_rss[d], b8[d], bpt)
                               for d, _, bpt in pairs},
                     "llama.cpp": {l: runs(l_decode[l], l_rss[l], 100.0, bpt)
                                   for _, l, bpt in pairs if l in l_decode}},
            "quality": q, "notes": ["a note"]}


def test_summary_against_targets(vs):
    q = {"gpt2s bfloat16 vs gpt2s float32": {"rel_l2": 2e-3, "max_abs": 0.01,
                                            "argmax_agree": 1.0},
         "gpt2s int8 vs gpt2s float32": {"rel_l2": 6e-3, "max_abs": 0.02, "argmax_agree": 0.99},
         "llama.cpp Q8_0 vs llama.cpp F32": {"rel_l2": 5e-3, "max_abs": 0.02,
                                            "argmax_agree": 0.99}}
    res = _results({"float32": 40.0, "bfloat16": 66.0, "int8": 100.0},
                   {"F32": 40.0, "F16": 60.0, "Q8_0": 100.0},
                   {"float32": 600.0, "bfloat16": 400.0, "int8": 300.0},
                   {"F32": 500.0, "F16": 350.0, "Q8_0": 200.0},
                   {"float32": 100.0, "bfloat16": 160.0, "int8": 240.0}, q)
    s = vs.summarize(res)
    assert s["bandwidth_gbs"] == 20.0
    row = {(r["engine"], r["precision"]): r for r in s["rows"]}
    f32 = row[("gpt2s", "float32")]
    assert f32["decode_tok_s"] == 40.0 and f32["prefill512_tok_s"] == 400.0
    assert f32["frac_ceiling"] == pytest.approx(4e8 * 40 / 20e9)
    assert f32["frac_ceiling_b8"] == pytest.approx(4e8 * 100 / 8 / 20e9)
    assert row[("llama.cpp", "Q8_0")]["batch1_s_tg"] == 100.0
    met = {(r["metric"], r["precision"]): (r["value"], r["met"]) for r in s["ratios"]}
    assert met[("decode tok/s, B=1", "float32 / F32")] == (1.0, True)          # >= 1.0
    assert met[("decode tok/s, B=1", "bfloat16 / F16")] == (pytest.approx(1.1), True)
    assert met[("decode tok/s, B=1", "int8 / Q8_0")] == (1.0, False)           # < 1.1
    assert met[("prefill 512 tok/s", "int8 / Q8_0")] == (1.0, None)            # no target
    assert met[("peak RSS MiB", "float32 / F32")] == (100.0, False)            # > +64 MiB
    assert met[("peak RSS MiB", "bfloat16 / F16")] == (50.0, True)
    assert met[("batch-8 decode tok/s vs gpt2s float32", "bfloat16 / float32")] == (1.6, True)
    assert met[("batch-8 decode tok/s vs gpt2s float32", "int8 / float32")] == (2.4, False)
    assert met[("logits rel. L2 error vs float32", "bfloat16 / Q8_0")][1] is True
    assert met[("logits rel. L2 error vs float32", "int8 / Q8_0")][1] is False

    res["summary"] = s
    text = vs.format_report(res)
    assert "| gpt2s | float32 | 40.0 | 80.0 | 400.0 | 600 | 100.0 | 400 | 80% | 25% |" in text
    assert "| peak RSS MiB | float32 / F32 | 600 | 500 | +100 MiB | <= +64 MiB | NO |" in text
    assert "| llama.cpp Q8_0 vs llama.cpp F32 | 5.00e-03 |" in text
    assert "Test CPU" in text and "- a note" in text


def test_summary_without_llama(vs):
    """A gpt2s-only run (--skip-llama) has no ratios against llama.cpp, only n/a cells."""
    res = _results({"float32": 40.0, "bfloat16": 60.0, "int8": 90.0}, {}, {"float32": 600.0,
                   "bfloat16": 400.0, "int8": 300.0}, {},
                   {"float32": 100.0, "bfloat16": 150.0, "int8": 200.0}, {})
    s = vs.summarize(res)
    assert {r["engine"] for r in s["rows"]} == {"gpt2s"}
    for r in s["ratios"]:
        if r["metric"].startswith("batch-8"):
            assert r["value"] is not None
        else:
            assert r["value"] is None and r["met"] is None
    res["summary"] = s
    assert "| decode tok/s, B=1 | float32 / F32 | 40.0 | n/a | n/a | >= 1.0x | - |" in \
        vs.format_report(res)


def test_gpt2s_only_run(vs, tmp_path):
    """The whole script, gpt2s's side only, on a tiny model with a 1024-token context."""
    from gpt2s import GPT2, GPT2Config
    cfg = GPT2Config(n_layer=2, n_head=2, n_embd=64, vocab_size=50257, n_ctx=1024)
    GPT2.from_config(cfg, seed=0).save_safetensors(tmp_path / "tiny")
    out = tmp_path / "r.json"
    env = dict(os.environ, OMP_NUM_THREADS="2")
    p = subprocess.run([sys.executable, str(SCRIPT), "--skip-llama", "--model",
                        str(tmp_path / "tiny"), "--rounds", "1", "--new", "3",
                        "--dtypes", "float32,int8", "--bandwidth-mib", "16", "--quality-tokens",
                        "8", "--out", str(out)], capture_output=True, text=True, timeout=300,
                       env=env)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert "| gpt2s | float32 |" in p.stdout and "| gpt2s | int8 |" in p.stdout
    res = json.loads(out.read_text())
    assert res["errors"] == []
    g = res["runs"]["gpt2s"]
    assert set(g) == {"float32", "int8"}
    for dtype, r in g.items():
        dec = r["decode"][0]
        assert dec["n_prompt"] == 16 and dec["n_new"] == 3 and dec["decode_calls"] == 2
        assert dec["peak_rss_mib"] > 10 and dec["decode_tok_s"] > 0
        assert r["prefill512"][0]["n_prompt"] == 512
        assert r["batch8"][0]["batch"] == 8 and len(r["batch8"][0]["tokens"]) == 8
        # bytes per step: int8 stores the matmul weights in 34 bytes per 32 values
        assert r["weight_bytes_per_token"] > 0
    assert g["int8"]["weight_bytes_per_token"] < 0.4 * g["float32"]["weight_bytes_per_token"]
    # greedy tokens: rows of the batch-8 run are the prompt rotated, row 0 the prompt itself
    assert g["float32"]["batch8"][0]["tokens"][0] == g["float32"]["decode"][0]["tokens"][0]
    q = res["quality"]["gpt2s int8 vs gpt2s float32"]
    assert 0 < q["rel_l2"] < 0.05
    assert res["bandwidth"][0]["gbs"] > 0
    assert res["meta"]["threads"] == 2 and res["meta"]["git"]


@pytest.mark.slow
def test_llama_logits_match_gpt2s(vs, tmp_path):
    """llama_logits.cpp, compiled against the anchors' llama.cpp, gives on the F32 GGUF the
    logits gpt2s gives on the same safetensors weights (llama.cpp's KV cache is F16, hence the
    tolerance): the harness feeds both engines the same ids and reads the logits right."""
    _need_llama()
    gguf = ANCHORS / "gguf" / "gpt2-random-f32.gguf"
    if not gguf.exists():
        pytest.skip(f"no {gguf}")
    from gpt2s import GPT2
    exe = vs.compile_llama_logits(ANCHORS, tmp_path / "cache")
    ids = [464, 3616, 286, 1204, 318, 257, 1808, 326, 468, 36907, 24858, 290, 5519, 329, 10675, 13]
    (tmp_path / "ids.txt").write_text(" ".join(map(str, ids)))
    subprocess.run([str(exe), str(gguf), str(tmp_path / "ids.txt"), str(tmp_path / "l.f32"), "2"],
                   check=True, timeout=300)
    theirs = np.fromfile(tmp_path / "l.f32", np.float32).reshape(len(ids), -1)
    mine, _ = GPT2.from_safetensors(ANCHORS / "gpt2-random").forward(np.array([ids]))
    assert theirs.shape == mine[0].shape
    assert vs.rel_l2(theirs, mine[0]) < 2e-3


def test_disturbed_pairs_are_redone(vs, tmp_path):
    """--max-other-load below any possible load: every pair is redone twice, then kept, and the
    JSON says so."""
    from gpt2s import GPT2, GPT2Config
    cfg = GPT2Config(n_layer=1, n_head=2, n_embd=64, vocab_size=50257, n_ctx=1024)
    GPT2.from_config(cfg, seed=0).save_safetensors(tmp_path / "tiny")
    out = tmp_path / "r.json"
    p = subprocess.run([sys.executable, str(SCRIPT), "--skip-llama", "--model",
                        str(tmp_path / "tiny"), "--rounds", "1", "--new", "2", "--dtypes",
                        "int8", "--bandwidth-mib", "16", "--quality-tokens", "4",
                        "--max-other-load", "-1", "--out", str(out)],
                       capture_output=True, text=True, timeout=300,
                       env=dict(os.environ, OMP_NUM_THREADS="2"))
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    res = json.loads(out.read_text())
    assert sorted(d["key"] for d in res["discarded"]) == \
        ["batch8", "batch8", "decode", "decode", "prefill512", "prefill512"]
    for key in ("decode", "prefill512", "batch8"):
        kept = res["runs"]["gpt2s"]["int8"][key]
        assert len(kept) == 1 and kept[0]["attempt"] == vs.REDO
    assert "6 disturbed pairs redone" in p.stdout
