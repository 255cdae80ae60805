"""The programs in examples/ and the ``>>>`` examples in the public docstrings run, and do what
their text says.

Each example runs in a subprocess exactly as a user runs it (``python examples/x.py`` from a
scratch directory) and its output is checked: numbers that must improve, results that must
repeat, concurrent answers that must equal sequential ones.  An example without a check here
fails test_every_example_is_checked.  Examples need the repository layout; an installed-wheel
test run (tests/ copied alone) skips them with that reason.
"""

from __future__ import annotations

import ast
import doctest
import importlib
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"
# Each example finishes in well under a minute on 2 idle cores; the limit is generous because
# test machines are often shared.
TIMEOUT = 600


def run_example(name: str, tmp_path: Path, *args: str) -> str:
    path = EXAMPLES / name
    if not path.is_file():
        pytest.skip(f"{path} not present (the tests run outside the repository)")
    r = subprocess.run([sys.executable, str(path), *args], cwd=tmp_path, capture_output=True,
                       text=True, timeout=TIMEOUT, env=dict(os.environ, PYTHONIOENCODING="utf-8"))
    assert r.returncode == 0, f"{name} failed ({r.returncode}):\n{r.stdout}\n{r.stderr}"
    assert "Traceback" not in r.stderr, r.stderr
    return r.stdout


def _float(pattern: str, text: str) -> float:
    m = re.search(pattern, text)
    assert m, f"no match for {pattern!r} in:\n{text}"
    return float(m.group(1))


def test_generate(tmp_path):
    out = run_example("generate.py", tmp_path)
    assert "same seed, same text: True" in out
    samples = re.findall(r"^\[top-p 0\.9, sample (\d)\] (['\"].*['\"])$", out, re.M)
    assert [i for i, _ in samples] == ["0", "1", "2"], out
    assert len({s for _, s in samples}) == 3, "three samples with one seed must differ"
    assert "output shape: (2, 15)" in out
    rows = re.findall(r"^\[batch row\] ['\"](.*)['\"]$", out, re.M)
    assert len(rows) == 2 and rows[0].startswith("First Citizen:") \
        and rows[1].startswith("Second Citizen:"), out
    assert "[streamed 40 tokens]" in out
    streamed = out.split("[streaming] ", 1)[1].split("\n[streamed", 1)[0]
    assert len(streamed.strip()) > 20, "the stream printed (almost) nothing"


def test_generate_stream_matches_generate():
    """What the example prints while streaming is the continuation generate() makes with the
    same arguments (the stream is not a different sampler)."""
    import numpy as np
    import gpt2s
    m = gpt2s.GPT2.from_safetensors(Path(gpt2s.__file__).parent / "assets" / "demo")
    enc = gpt2s.get_tokenizer()
    prompt = enc.encode("First Citizen:")
    streamed = list(m.generate_stream(prompt, 12, temperature=0.8, top_k=40, seed=2))
    whole = m.generate(np.array([prompt]), 12, temperature=0.8, top_k=40, seed=2)[0]
    assert streamed == whole[len(prompt):].tolist()


@pytest.mark.slow
def test_finetune(tmp_path):
    out = run_example("finetune.py", tmp_path)
    before = _float(r"loss on the training text: before ([\d.]+)", out)
    after = _float(r"loss on the training text: before [\d.]+, after ([\d.]+)", out)
    # the demo model has never seen this text; 120 steps on it must cut the loss a lot
    assert before > 4.0 and after < before - 2.0, out
    # the greedy continuation of the prompt switches from Shakespeare to the training text's
    # own words
    vocab = set(re.findall(r"[a-z]+", (EXAMPLES / "finetune.py").read_text().split("FACTS = ")[1]
                                      .split("PROMPT")[0].lower())) | {"q", "a"}

    def in_vocab(sample):
        words = re.findall(r"[a-z]+", sample.lower())
        return sum(w in vocab for w in words) / max(1, len(words))

    before_sample = ast.literal_eval(re.search(r"^before: (['\"].*['\"])$", out, re.M).group(1))
    after_sample = ast.literal_eval(re.search(r"^after:  (['\"].*['\"])$", out, re.M).group(1))
    assert in_vocab(after_sample) >= 0.8, after_sample
    # and it learned the answer to the prompt's question (the example says so)
    assert after_sample.split()[0].strip(".") == "green", after_sample
    assert in_vocab(before_sample) < 0.6, before_sample


@pytest.mark.slow
def test_training_loop(tmp_path):
    out = run_example("training_loop.py", tmp_path)
    first = _float(r"validation loss: ([\d.]+) ->", out)
    last = _float(r"validation loss: [\d.]+ -> ([\d.]+)", out)
    # a random GPT-2 starts at about ln(V) (a uniform guess) and must learn something
    assert abs(first - math.log(50257)) < 0.3, out
    assert last < first - 2.5, out
    lrs = [float(x) for x in re.findall(r"lr ([\d.e+-]+)", out)]
    assert len(lrs) == 6 and lrs == sorted(lrs, reverse=True), "cosine decay after warm-up"
    norms = [float(x) for x in re.findall(r"grad norm ([\d.]+)", out)]
    assert len(norms) == 6 and all(n > 0 for n in norms)
    assert "reloaded model gives identical logits: True" in out
    assert re.search(r"^sample: ['\"].+['\"]$", out, re.M)


@pytest.mark.slow
def test_pythia(tmp_path):
    out = run_example("pythia.py", tmp_path)
    first = _float(r"validation loss: ([\d.]+) ->", out)
    last = _float(r"validation loss: [\d.]+ -> ([\d.]+)", out)
    assert abs(first - math.log(50257)) < 0.3, out      # a random model: a uniform guess
    assert last < first - 2.5, out
    assert "reloaded GPTNeoXForCausalLM gives identical logits: True" in out
    assert re.search(r"^sample: ['\"]ROMEO:.*['\"]$", out, re.M)


def test_evaluate(tmp_path):
    out = run_example("evaluate.py", tmp_path)
    demo_loss = _float(r"demo model\s+loss ([\d.]+)", out)
    demo_ppl = _float(r"demo model\s+loss [\d.]+ nats/token\s+perplexity\s+([\d.]+)", out)
    rand_loss = _float(r"untrained\s+loss ([\d.]+)", out)
    rand_ppl = _float(r"untrained\s+loss [\d.]+ nats/token\s+perplexity\s+([\d.]+)", out)
    assert demo_ppl == pytest.approx(math.exp(demo_loss), rel=1e-3)
    assert rand_ppl == pytest.approx(math.exp(rand_loss), rel=1e-3)
    # the demo model was trained on Shakespeare (validation loss 5.11); an untrained model
    # scores about a uniform guess over the vocabulary
    assert demo_loss < 5.5, out
    assert abs(rand_loss - math.log(50257)) < 0.3, out
    assert "9,216 tokens in windows of 256" in out


def test_serve_threads(tmp_path):
    out = run_example("serve_threads.py", tmp_path)
    assert "4 concurrent requests answered" in out
    assert out.count("same as a call made alone: True") == 4, out
    assert "same as a call made alone: False" not in out
    assert int(_float(r"server threads used: (\d+)", out)) >= 2, out


def test_serve_openai(tmp_path):
    pytest.importorskip("uvicorn", reason="uvicorn not installed: pip install '.[serve]'")
    pytest.importorskip("openai", reason="the openai client is not installed")
    out = run_example("serve_openai.py", tmp_path)
    assert out.count("same as alone: True") == 8, out
    assert "same as alone: False" not in out
    assert "[streamed]" in out and "finish_reason" in out


def test_data_parallel(tmp_path):
    """Two MPI ranks end with the weights of one process on the whole batches."""
    pytest.importorskip("mpi4py", reason="mpi4py not installed: pip install '.[mpi]'")
    if shutil.which("mpiexec") is None:
        pytest.skip("mpiexec not found: pip install '.[mpi]'")
    out = run_example("data_parallel.py", tmp_path)
    assert out.startswith("2 ranks"), out
    losses = [float(x) for x in re.findall(r"^step \d+  loss ([\d.]+)", out, re.M)]
    assert len(losses) == 8 and losses[-1] < losses[0], out
    assert "(this rank's rows: 4 of 8)" in out
    assert out.count("weights identical on every rank: True") == 2, out
    diff = _float(r"largest weight difference from one process on the whole batches: "
                  r"([\d.e+-]+)", out)
    # float32 sums in another order, 8 AdamW steps of lr 1e-3: far below one step's size
    assert diff < 1e-4, out


def test_lowp_generate(tmp_path):
    out = run_example("lowp_generate.py", tmp_path)
    tv = {d: _float(rf"{d}\s+GPT2\(.*\n\s+max total-variation distance ([\d.]+)", out)
          for d in ("float32", "bfloat16", "int8")}
    assert tv["float32"] == 0.0, out
    # compressed weights move the distribution a little, int8 more than bfloat16
    assert 0.0 < tv["bfloat16"] < tv["int8"] < 0.1, out
    assert "dtype='bfloat16'" in out and "dtype='int8'" in out
    assert len(re.findall(r"greedy: ['\"].+['\"]", out)) == 3, out


CHECKED = {"generate.py", "lowp_generate.py", "finetune.py", "training_loop.py", "evaluate.py", "serve_threads.py",
           "data_parallel.py", "serve_openai.py", "pythia.py"}


def test_every_example_is_checked():
    if not EXAMPLES.is_dir():
        pytest.skip(f"{EXAMPLES} not present (the tests run outside the repository)")
    present = {p.name for p in EXAMPLES.glob("*.py")}
    assert present - CHECKED == set(), "examples without a test in tests/test_examples.py"
    assert CHECKED - present == set(), "tests for examples that no longer exist"


# ------------------------------------------------------------------ docstring examples

MODULES = ["gpt2s", "gpt2s.model", "gpt2s.config", "gpt2s.optim", "gpt2s.tokenizer",
           "gpt2s._threads", "gpt2s.weights", "gpt2s.generation", "gpt2s.generate",
           "gpt2s.train", "gpt2s.training", "gpt2s.params", "gpt2s.buffers",
           "gpt2s.inputs", "gpt2s.llama", "gpt2s.llama_config", "gpt2s.engine", "gpt2s.neox",
           "gpt2s.neox_config"]


def _doctests():
    finder = doctest.DocTestFinder(exclude_empty=True)
    found = {}
    for name in MODULES:
        module = importlib.import_module(name)
        for t in finder.find(module, name):
            # objects re-exported from another module are found there, once
            if t.examples and t.name.startswith(name + ".") or t.name == name:
                found.setdefault(t.name, t)
    return sorted(found.values(), key=lambda t: t.name)


DOCTESTS = _doctests()


def test_docstring_examples_exist():
    names = {t.name for t in DOCTESTS}
    # the examples the API reference shows for generation and the tokenizer, at least
    for expected in ("gpt2s.model.GPT2.generate", "gpt2s.model.GPT2.generate_stream",
                     "gpt2s.model.GPT2.generate_text", "gpt2s.tokenizer.get_tokenizer"):
        assert expected in names, f"{expected} lost its >>> example"


@pytest.mark.parametrize("test", DOCTESTS, ids=[t.name for t in DOCTESTS])
def test_docstring_example(test):
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    result = runner.run(test, out=lambda s: print(s, end=""))
    assert result.failed == 0, f"{result.failed} of {result.attempted} examples failed in {test.name}"
