"""`python -m gpt2s.generate` end to end, in subprocesses, on a small random model saved to a
temporary directory: output, seeds, samples, model resolution and the bad-input exits."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

import gpt2s
from gpt2s import GPT2, GPT2Config
from gpt2s.hub import HF_DOWNLOAD, ModelNotFound, find_model

N_CTX = 64


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("model")
    GPT2.from_config(GPT2Config.preset("tiny", n_ctx=N_CTX), seed=3).save_safetensors(d)
    return d


@pytest.fixture(scope="module")
def model(model_dir):
    return GPT2.from_safetensors(model_dir)


@pytest.fixture
def clean_env(tmp_path):
    """An environment with no model configured and an empty Hugging Face cache."""
    env = {k: v for k, v in os.environ.items() if k not in ("GPT2S_MODEL", "HF_HUB_CACHE")}
    env["HF_HOME"] = str(tmp_path / "hf-home")
    env["PYTHONIOENCODING"] = "utf-8"
    env["OMP_NUM_THREADS"] = "1"   # a tiny model: threads only add start-up cost
    return env


def run(args, env, cwd=None, stdin=None):
    return subprocess.run([sys.executable, "-m", "gpt2s.generate", *args], env=env, cwd=cwd,
                          input=stdin, capture_output=True, text=True, encoding="utf-8",
                          timeout=300)


def assert_user_error(p, *fragments):
    assert p.returncode == 2, (p.returncode, p.stdout, p.stderr)
    assert "Traceback" not in p.stderr, p.stderr
    assert "error:" in p.stderr
    for f in fragments:
        assert f in p.stderr, (f, p.stderr)
    assert p.stdout == ""


# ------------------------------------------------------------------ generation

def test_streams_the_api_text(model_dir, model, clean_env, tmp_path):
    prompt = "The king said"
    p = run([prompt, "--model", str(model_dir), "--max-new-tokens", "15", "--seed", "7",
             "--top-k", "50", "--temperature", "0.9", "--ignore-eos"], clean_env, cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    assert p.stderr == ""                      # nothing on stderr without --verbose
    expected = model.generate_text(prompt, 15, temperature=0.9, top_k=50, seed=7,
                                   stop_at_eos=False)
    assert p.stdout == prompt + expected + "\n"


def test_greedy_and_no_echo(model_dir, model, clean_env):
    p = run(["Once upon a time", "--model", str(model_dir), "-n", "10", "--temperature", "0",
             "--no-echo"], clean_env)
    assert p.returncode == 0, p.stderr
    assert p.stdout == model.generate_text("Once upon a time", 10, temperature=0) + "\n"


def test_seed_repeats_and_differs(model_dir, clean_env):
    args = ["Hello", "--model", str(model_dir), "-n", "12", "--ignore-eos", "--top-p", "0.95"]
    a = run(args + ["--seed", "1"], clean_env)
    b = run(args + ["--seed", "1"], clean_env)
    c = run(args + ["--seed", "2"], clean_env)
    assert a.returncode == b.returncode == c.returncode == 0
    assert a.stdout == b.stdout
    assert a.stdout != c.stdout


def test_num_samples_and_verbose(model_dir, clean_env):
    args = ["Hello", "--model", str(model_dir), "-n", "8", "--ignore-eos", "--seed", "4"]
    one = run(args, clean_env)
    p = run(args + ["--num-samples", "3", "--verbose", "--threads", "2"], clean_env)
    assert p.returncode == 0, p.stderr
    # stdout carries only the text: the separators go to stderr
    assert "========" not in p.stdout
    assert [line for line in p.stderr.splitlines() if line.startswith("========")] == \
        [f"======== sample {i} of 3 ========" for i in (1, 2, 3)]
    # the first sample is the single-sample run; the others go on with the same generator
    assert p.stdout.startswith(one.stdout)
    rest = p.stdout[len(one.stdout):]
    assert rest.startswith("Hello") and rest.count("Hello") >= 2
    assert p.stderr.count("tokens/s") == 3
    assert "threads: 2" in p.stderr and str(model_dir) in p.stderr
    assert "tokens/s" not in p.stdout


def test_prompt_from_stdin_and_unconditional(model_dir, clean_env):
    p = run(["-", "--model", str(model_dir), "-n", "5", "--seed", "0", "--ignore-eos"],
            clean_env, stdin="From stdin\n")
    assert p.returncode == 0, p.stderr
    assert p.stdout.startswith("From stdin")
    p = run(["--model", str(model_dir), "-n", "5", "--seed", "0"], clean_env)
    assert p.returncode == 0, p.stderr
    assert "<|endoftext|>" not in p.stdout


def test_slides_past_the_context(model_dir, clean_env):
    p = run(["a b c", "--model", str(model_dir), "-n", str(2 * N_CTX), "--ignore-eos",
             "--seed", "1", "--verbose"], clean_env)
    assert p.returncode == 0, p.stderr
    assert f"generated {2 * N_CTX} tokens" in p.stderr


def test_help():
    p = subprocess.run([sys.executable, "-m", "gpt2s.generate", "--help"], capture_output=True,
                       text=True, timeout=120)
    assert p.returncode == 0
    for opt in ("--model", "--max-new-tokens", "--temperature", "--top-k", "--top-p", "--seed",
                "--num-samples", "--threads", "--verbose", "PROMPT", "hf download"):
        assert opt in p.stdout, opt


# ------------------------------------------------------------------ bad input

@pytest.mark.parametrize("args, fragments", [
    (["", "-n", "5"], ["prompt is empty"]),
    (["x", "-n", "-1"], ["--max-new-tokens", "-1"]),
    (["x", "--top-p", "0"], ["--top-p", "0.0"]),
    (["x", "--top-p", "1.5"], ["--top-p", "1.5"]),
    (["x", "--top-k", "0"], ["--top-k", "0"]),
    (["x", "--temperature", "-1"], ["--temperature", "-1"]),
    (["x", "--num-samples", "0"], ["--num-samples", "0"]),
    (["x", "--threads", "0"], ["--threads", "0"]),
    (["x", "--seed", "-5"], ["--seed", "-5"]),
    (["x", "--top-k", "many"], ["--top-k", "many"]),
    (["x" + " x" * N_CTX], [f"{N_CTX + 1} tokens", f"n_ctx={N_CTX}"]),
])
def test_bad_input_exits_2_without_traceback(model_dir, clean_env, args, fragments):
    assert_user_error(run(args + ["--model", str(model_dir)], clean_env), *fragments)


def test_missing_model_paths(tmp_path, clean_env):
    missing = tmp_path / "nowhere" / "model.safetensors"
    assert_user_error(run(["hi", "--model", str(missing)], clean_env), str(missing),
                      "no such file")
    empty = tmp_path / "empty-dir"
    empty.mkdir()
    assert_user_error(run(["hi", "--model", str(empty)], clean_env), "no model.safetensors")
    env = dict(clean_env, GPT2S_MODEL=str(missing))
    assert_user_error(run(["hi"], env), "$GPT2S_MODEL", str(missing))
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a model")
    assert_user_error(run(["hi", "--model", str(junk)], clean_env), str(junk))


def test_no_model_anywhere(tmp_path, clean_env):
    # the bundled demo model is always there, so point the last fallback at an empty folder
    from gpt2s.hub import ModelNotFound, find_model
    with pytest.raises(ModelNotFound) as e:
        find_model(env=clean_env, cwd=tmp_path, demo_dir=tmp_path / "no-demo")
    for fragment in ("no GPT-2 model found", "assets/model.safetensors", HF_DOWNLOAD, "--model",
                     str(tmp_path / "no-demo")):
        assert fragment in str(e.value)


def test_bundled_demo_model_is_the_last_fallback(tmp_path, clean_env):
    demo = Path(gpt2s.__file__).parent / "assets" / "demo"
    assert (demo / "model.safetensors").is_file() and (demo / "config.json").is_file()
    p = run(["ROMEO:", "-n", "5", "--seed", "0", "--verbose", "--ignore-eos"], clean_env,
            cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    assert f"model: {demo}" in p.stderr
    # exactly what the API gives with the demo model: its 5 tokens after the prompt
    expected = GPT2.from_safetensors(demo).generate_text("ROMEO:", 5, seed=0, stop_at_eos=False)
    assert p.stdout == "ROMEO:" + expected + "\n"
    assert expected   # five tokens are never the empty string


# ------------------------------------------------------------------ model resolution

def test_model_from_env_and_local_assets(model_dir, clean_env, tmp_path):
    env = dict(clean_env, GPT2S_MODEL=str(model_dir))
    p = run(["Hi", "-n", "3", "--seed", "0", "--verbose"], env, cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    assert f"model: {model_dir}" in p.stderr
    work = tmp_path / "work"
    (work / "assets").mkdir(parents=True)
    for f in ("model.safetensors", "config.json"):
        (work / "assets" / f).write_bytes((model_dir / f).read_bytes())
    p = run(["Hi", "-n", "3", "--seed", "0", "--verbose"], clean_env, cwd=work)
    assert p.returncode == 0, p.stderr
    assert "assets/model.safetensors" in p.stderr
    assert f"n_ctx={N_CTX}" in p.stderr   # config.json beside it was used


def make_hf_cache(hub, repo, model_dir, revision="0123abcd"):
    snap = hub / repo / "snapshots" / revision
    snap.mkdir(parents=True)
    for f in ("model.safetensors", "config.json"):
        (snap / f).symlink_to(model_dir / f)
    (hub / repo / "refs").mkdir()
    (hub / repo / "refs" / "main").write_text(revision)
    return snap


def test_model_from_hugging_face_cache(model_dir, clean_env, tmp_path):
    hub = Path(clean_env["HF_HOME"]) / "hub"
    snap = make_hf_cache(hub, "models--openai-community--gpt2", model_dir)
    p = run(["Hi", "-n", "3", "--seed", "0", "--verbose"], clean_env, cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    assert f"model: {snap}" in p.stderr


def test_find_model_order(model_dir, tmp_path):
    demo = tmp_path / "demo"
    demo.mkdir()
    (demo / "model.safetensors").write_bytes(b"x")
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    env = {"HOME": str(tmp_path / "home")}
    assert find_model(env=env, cwd=cwd, demo_dir=demo) == demo
    with pytest.raises(ModelNotFound, match="hf download"):
        find_model(env=env, cwd=cwd, demo_dir=tmp_path / "no-demo")
    hub = tmp_path / "home" / ".cache" / "huggingface" / "hub"
    legacy = make_hf_cache(hub, "models--gpt2", model_dir)
    assert find_model(env=env, cwd=cwd, demo_dir=demo) == legacy
    snap = make_hf_cache(hub, "models--openai-community--gpt2", model_dir)
    assert find_model(env=env, cwd=cwd, demo_dir=demo) == snap
    assert find_model(env=dict(env, HF_HUB_CACHE=str(tmp_path / "other")), cwd=cwd,
                      demo_dir=demo) == demo
    (cwd / "assets").mkdir()
    (cwd / "assets" / "model.safetensors").write_bytes(b"x")
    assert find_model(env=env, cwd=cwd, demo_dir=demo) == cwd / "assets" / "model.safetensors"
    env["GPT2S_MODEL"] = str(model_dir)
    assert find_model(env=env, cwd=cwd, demo_dir=demo) == model_dir
    assert find_model(str(model_dir / "model.safetensors"), env=env, cwd=cwd) == \
        model_dir / "model.safetensors"
    with pytest.raises(ModelNotFound, match="--model"):
        find_model(str(tmp_path / "missing"), env=env, cwd=cwd)


def test_quantize_into_a_missing_directory_names_it_before_converting(tmp_path, capsys):
    # a .gguf file needs its directory (a model directory OUT is made with its parents:
    # tests/test_packed_files.py::test_quantize_cli_end_to_end)
    from gpt2s import quantize
    for out in (tmp_path / "no" / "m.gguf",):
        assert quantize.main(["demo", str(out), "--dtype", "int8"]) == 2
        err = capsys.readouterr().err
        assert err == f"python -m gpt2s.quantize: error: {out}: the directory " \
                      f"{out.parent} does not exist\n", err     # no progress bar, no temp name
    assert not (tmp_path / "no").exists()


def test_eval_token_file_of_another_vocabulary_is_one_line_naming_it(tmp_path, capsys):
    """Raw uint16 tokens valid for GPT-2 but outside a small model's vocabulary: the error
    names the data and the model's vocabulary, not the API's idx."""
    import numpy as np

    from gpt2s import GPT2, GPT2Config, eval as gpt2s_eval
    from gpt2s.vocab import CharTokenizer
    GPT2.from_config(GPT2Config.preset("tiny", vocab_size=40), seed=0).save_safetensors(
        tmp_path / "m")
    CharTokenizer("".join(chr(65 + i) for i in range(40))).save(tmp_path / "m" / "vocab.json")
    data = tmp_path / "d.bin"
    np.array([1, 2, 3, 39] * 50 + [1000] + [1] * 49, np.uint16).tofile(data)
    assert gpt2s_eval.main(["--model", str(tmp_path / "m"), "-q", str(data)]) == 2
    err = capsys.readouterr().err
    assert err == f"python -m gpt2s.eval: error: {data}: token 200 of the data is id 1000, " \
                  f"outside the model's vocabulary of 40 tokens (token files written with " \
                  f"another vocabulary?)\n", err
    # train on them from that model: the same line, before anything is written
    from gpt2s import train
    out = tmp_path / "run"
    assert train.main([str(data), "--model", str(tmp_path / "m"), "--steps", "1",
                       "--seq-len", "16", "--batch-size", "2", "--out", str(out),
                       "--val-fraction", "0", "--no-plot", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"python -m gpt2s.train: error: {data}: token 200 of the data is id "
                          f"1000, outside the model's vocabulary of 40 tokens"), err
    assert "Traceback" not in err and not out.exists()
