"""What a new user meets first: the documented commands exist and run as written (the download
command is the one huggingface_hub installs, data files named in the docs are in the
repository), the README says what a source build needs, and the command-line entry points
(``python -m gpt2s``, ``--version``, the console scripts) are there.

The documentation checks need the repository layout; an installed-wheel test run (tests/
copied alone) skips them with that reason.
"""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def _need_repo():
    if not (ROOT / "README.md").is_file() or not (ROOT / "docs").is_dir():
        pytest.skip("README.md and docs/ not present (the tests run outside the repository)")


def _code_blocks(text: str, lang: str) -> list[str]:
    return re.findall(rf"^```{lang}\n(.*?)^```", text, re.M | re.S)


def test_download_command_is_huggingface_hubs():
    # huggingface_hub >= 1.0 installs `hf` only: `huggingface-cli` is "command not found"
    from importlib.metadata import PackageNotFoundError, distribution

    from gpt2s.hub import HF_DOWNLOAD
    try:
        scripts = {e.name for e in distribution("huggingface_hub").entry_points
                   if e.group == "console_scripts"}
    except PackageNotFoundError:
        pytest.skip("huggingface_hub is not installed")
    program, sub = HF_DOWNLOAD.split()[:2]
    assert program in scripts, (HF_DOWNLOAD, scripts)
    assert sub == "download"
    help_text = subprocess.run([sys.executable, "-m", "gpt2s.generate", "--help"],
                               capture_output=True, text=True, timeout=120).stdout
    assert HF_DOWNLOAD in help_text
    assert "huggingface-cli" not in help_text


def test_docs_name_no_missing_program():
    _need_repo()
    for path in DOCS:
        text = path.read_text(encoding="utf-8")
        assert "huggingface-cli" not in text, f"{path.name} still names huggingface-cli"
    for path in (ROOT / "README.md", ROOT / "docs" / "checkpoints.md"):
        text = path.read_text(encoding="utf-8")
        assert "hf download openai-community/gpt2" in text, path.name
        assert "snapshot_download(" in text, path.name


def test_readme_states_requirements():
    _need_repo()
    for path in (ROOT / "README.md", ROOT / "docs" / "index.md"):
        text = path.read_text(encoding="utf-8")
        assert "## Requirements" in text, path.name
        req = text.split("## Requirements", 1)[1].split("\n## ", 1)[0]
        for fragment in ("OpenMP", "libomp", "macOS", "Windows", "MSVC", "wheel"):
            assert fragment in req, (path.name, fragment)
        # the CPU build of torch for the test extras, at the version the extras pin
        assert "pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu" \
            in text, path.name
        assert re.search(r'The whole suite \(about [\d,]+ tests,[^)]*\) took \d+\s+minutes', text), \
            f"{path.name}: the suite's duration"
    pinned = re.search(r'"torch==([\d.]+)"', (ROOT / "pyproject.toml").read_text()).group(1)
    assert pinned == "2.13.0"


# files that the copy-paste commands may name although a fresh clone lacks them: what the
# same page tells the user to make first
MADE_BY_THE_DOCS = {"assets", "runs", "data", "site", "distilgpt2"}


def _paths_in_commands(block: str) -> list[str]:
    found = []
    for line in block.splitlines():
        line = line.split(" #", 1)[0].strip()
        if not line or line.startswith("#"):
            continue
        try:
            words = shlex.split(line)
        except ValueError:
            continue
        for w in words:
            if re.fullmatch(r"[\w./-]+\.(txt|bin|raw)", w) and "*" not in w:
                found.append(w)
    return found


@pytest.mark.parametrize("page", ["README.md", "docs/index.md", "docs/training.md",
                                  "docs/evaluation.md", "docs/distributed.md"])
def test_copy_paste_commands_name_files_that_exist(page):
    _need_repo()
    text = (ROOT / page).read_text(encoding="utf-8")
    missing = []
    for block in _code_blocks(text, "bash"):
        for p in _paths_in_commands(block):
            if p.split("/")[0] in MADE_BY_THE_DOCS:
                continue
            if not (ROOT / p).exists():
                missing.append(p)
    for block in _code_blocks(text, "python"):
        for p in re.findall(r'open\("([^"]+)"|TokenData\("([^"]+)"\)', block):
            p = p[0] or p[1]
            if not (ROOT / p).exists():
                missing.append(p)
    assert not missing, f"{page}: commands name files a fresh clone lacks: {missing}"


def test_readme_mpi_loop_sets_threads_per_rank():
    _need_repo()
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    loop = next(b for b in _code_blocks(text, "python") if "DataParallel(" in b)
    assert "set_num_threads(default_threads())" in loop


# ------------------------------------------------------------------------------------------
# Errors that blame the right thing

EXCERPT = ROOT / "tests" / "data" / "tinyshakespeare_excerpt.txt"
HELDOUT = ROOT / "tests" / "data" / "tinyshakespeare_heldout.txt"


def _data_files():
    if not EXCERPT.is_file() or not HELDOUT.is_file():
        pytest.skip("tests/data not present")


def test_seq_len_beyond_the_context_names_n_ctx(tmp_path, capsys):
    _data_files()
    from gpt2s import GPT2Config, train
    n_ctx = GPT2Config.preset("tiny").n_ctx
    status = train.main([str(EXCERPT), "--init", "tiny", "--seq-len", str(n_ctx * 8),
                         "--steps", "1", "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert status == 2, err
    assert f"--seq-len {n_ctx * 8} exceeds the model's context n_ctx={n_ctx}" in err, err
    assert "validation" not in err, err
    assert not (tmp_path / "run").exists()


def test_val_data_takes_one_value_and_leaves_the_training_file(tmp_path, capsys):
    _data_files()
    import json

    from gpt2s import train
    out = tmp_path / "run"
    status = train.main(["--val-data", str(HELDOUT), str(EXCERPT), "--init", "tiny",
                         "--steps", "1", "--batch-size", "2", "--seq-len", "16",
                         "--eval-batches", "1", "--out", str(out), "--no-plot", "--quiet"])
    err = capsys.readouterr().err
    assert status == 0, err
    identity = json.loads((out / "train_state.json").read_text())["identity"]
    assert [f["path"] for f in identity["train_files"]] == [str(EXCERPT)]
    assert [f["path"] for f in identity["val_files"]] == [str(HELDOUT)]


def test_an_unrecorded_data_fingerprint_is_refused_naming_the_files():
    from gpt2s.training import RunConfig, resume_differences
    saved = {"run": RunConfig().recorded(),
             "identity": {"train_data": "sha256:" + "1" * 32, "val_data": None,
                          "model_source": "init:tiny"}}
    identity = {"train_data": "sha256:" + "2" * 32, "val_data": None,
                "model_source": "init:tiny",
                "train_files": [{"path": "books/b.txt", "kind": "text", "tokens": 10,
                                 "size": 40, "sha256": "0" * 64}], "val_files": None}
    refused, _ = resume_differences(saved, RunConfig(), identity)
    assert len(refused) == 1 and "books/b.txt" in refused[0], refused


def test_text_given_to_generate_points_at_generate_text():
    from gpt2s import GPT2, GPT2Config
    m = GPT2.from_config(GPT2Config.preset("tiny"), seed=0)
    for bad in ("Hello", ["Hello", "World"]):
        with pytest.raises(TypeError, match=r"got text .*generate_text\(prompt, "
                                            r"max_new_tokens\)"):
            m.generate(bad, 3)
    with pytest.raises(TypeError, match="generate_text"):
        m.forward("Hello")


# ------------------------------------------------------------------------------------------
# The command line says what matters, once, in its own terms


def _train_args(out, *extra):
    return [str(EXCERPT), "--init", "tiny", "--batch-size", "2", "--seq-len", "16",
            "--eval-batches", "1", "--out", str(out), "--no-plot", "--quiet", *extra]


def test_default_warmup_follows_the_run_without_a_warning(tmp_path, capsys):
    _data_files()
    import json

    from gpt2s import train
    out = tmp_path / "run"
    assert train.main(_train_args(out, "--steps", "20")) == 0
    err = capsys.readouterr().err
    assert "warning:" not in err and "--warmup" not in err, err
    state = json.loads((out / "train_state.json").read_text())
    assert state["run"]["warmup"] == 2            # 10% of 20 steps
    # a longer resumed run keeps the warm-up it started with, without a note
    assert train.main(_train_args(out, "--steps", "30", "--resume")) == 0
    err = capsys.readouterr().err
    assert "--warmup" not in err, err
    assert json.loads((out / "train_state.json").read_text())["run"]["warmup"] == 2
    # long runs warm up for 100 steps at most; a --warmup given is used as given
    assert train.default_warmup(5000) == 100 and train.default_warmup(999) == 99
    assert train.main(_train_args(tmp_path / "r2", "--steps", "4", "--warmup", "10")) == 0
    assert "warning: --warmup 10 is not below --steps 4" in capsys.readouterr().err


def test_warmup_warning_does_not_come_before_an_unrelated_error(tmp_path, capsys):
    from gpt2s import train
    assert train.main([str(tmp_path / "missing.txt"), "--steps", "5", "--warmup", "50",
                       "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert err.strip().splitlines() == [f"python -m gpt2s.train: error: "
                                        f"{tmp_path / 'missing.txt'}: no such file"], err


def test_context_full_warning_in_the_command_lines_terms(capsys):
    from gpt2s import GPT2, generate
    n_ctx = GPT2.from_pretrained("demo").config.n_ctx
    assert generate.main(["ROMEO:", "--model", "demo", "-n", str(n_ctx + 10), "--temperature",
                          "0", "--ignore-eos", "--context-full", "stop"]) == 0
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err
    assert lines[0].startswith("python -m gpt2s.generate: warning: generation stopped after ")
    assert "--context-full slide" in lines[0] and "context_full" not in lines[0], lines[0]
    assert ".py:" not in captured.err and "warnings.warn" not in captured.err


def test_sample_separators_go_to_stderr_and_counts_are_singular(capsys):
    from gpt2s import generate
    assert generate.main(["ROMEO:", "--model", "demo", "-n", "1", "--num-samples", "2",
                          "--seed", "1", "-v"]) == 0
    captured = capsys.readouterr()
    assert "====" not in captured.out
    assert captured.out.count("ROMEO:") == 2
    assert "======== sample 1 of 2 ========" in captured.err
    assert "generated 1 token in" in captured.err and "1 tokens" not in captured.err


def test_training_without_matplotlib_says_once_that_no_plot_is_drawn(tmp_path, capsys,
                                                                     monkeypatch):
    _data_files()
    from gpt2s import train
    monkeypatch.setitem(sys.modules, "matplotlib", None)      # import fails
    out = tmp_path / "run"
    args = [a for a in _train_args(out, "--steps", "2") if a != "--no-plot"]
    assert train.main(args) == 0
    err = capsys.readouterr().err
    assert err.count("loss.png") == 1 and "matplotlib is not installed" in err, err
    assert not (out / "loss.png").exists()


def test_a_short_run_plot_has_whole_step_ticks(tmp_path):
    pytest.importorskip("matplotlib")
    import json

    from gpt2s.metrics import loss_figure
    rows = [{"type": "train", "step": s, "train_loss": 5.0 - s, "lr": 1e-3} for s in (1, 2, 3)]
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    ticks = loss_figure(path).axes[0].get_xticks()
    inside = [t for t in ticks if 1 <= t <= 3]
    assert inside and all(float(t).is_integer() for t in ticks), ticks


# ------------------------------------------------------------------------------------------
# Entry points: python -m gpt2s, the gpt2s script, --version, eval --dtype, --prompt-file

COMMAND_MODULES = ["generate", "train", "eval", "prepare"]


def test_python_m_gpt2s_lists_the_commands_and_runs_them():
    import gpt2s
    p = subprocess.run([sys.executable, "-m", "gpt2s"], capture_output=True, text=True,
                       timeout=120)
    assert p.returncode == 0, p.stderr
    listed = re.findall(r"^  (\w+)  +(\S.*)$", p.stdout, re.M)
    names = [n for n, _ in listed]
    assert names[:4] == COMMAND_MODULES, p.stdout
    assert all(len(what) > 10 for _, what in listed)
    import importlib
    for name in names:                 # every listed command is a program with a main()
        assert callable(importlib.import_module(f"gpt2s.{name}").main), name
    p = subprocess.run([sys.executable, "-m", "gpt2s", "eval", "--help"], capture_output=True,
                       text=True, timeout=120)
    assert p.returncode == 0 and "--stride" in p.stdout
    p = subprocess.run([sys.executable, "-m", "gpt2s", "nonsense"], capture_output=True,
                       text=True, timeout=120)
    assert p.returncode == 2 and "'nonsense' is not a command" in p.stderr
    p = subprocess.run([sys.executable, "-m", "gpt2s", "--version"], capture_output=True,
                       text=True, timeout=120)
    assert p.stdout.strip() == f"gpt2s {gpt2s.__version__}"


@pytest.mark.parametrize("name", [*COMMAND_MODULES, "quantize"])
def test_a_subcommand_names_itself_as_invoked(name, capsys):
    """gpt2s NAME's usage line, errors and examples say "gpt2s NAME", not "python -m
    gpt2s.NAME"; each error is one line."""
    import importlib

    from gpt2s.__main__ import main
    module = importlib.import_module(f"gpt2s.{name}")
    with pytest.raises(SystemExit) as e:
        main([name, "--no-such-option"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith(f"gpt2s {name}: error: ") and err.endswith(" (see --help)\n")
    assert err.count("\n") == 1, err
    with pytest.raises(SystemExit):
        main([name, "--help"], prog="python -m gpt2s")
    out = capsys.readouterr().out
    assert out.startswith(f"usage: python -m gpt2s {name} ")
    assert f"python -m gpt2s.{name}" not in out.split("examples:")[-1]
    # run on its own, the module names itself as before
    assert module.PROG == f"python -m gpt2s.{name}"


def test_subcommand_errors_name_the_program_run(tmp_path):
    missing = str(tmp_path / "missing.txt")
    cases = [([sys.executable, "-m", "gpt2s", "eval", "--model", "demo", missing],
              "python -m gpt2s eval: error: "),
             ([sys.executable, "-m", "gpt2s.eval", "--model", "demo", missing],
              "python -m gpt2s.eval: error: ")]
    script = Path(sys.executable).with_name("gpt2s")     # the console script, if installed
    if script.is_file():
        cases.append(([str(script), "eval", "--model", "demo", missing], "gpt2s eval: error: "))
    for argv, start in cases:
        p = subprocess.run(argv, capture_output=True, text=True, timeout=120)
        assert p.returncode != 0 and p.stderr.startswith(start), (argv, p.stderr)
        assert len(p.stderr.splitlines()) == 1 and missing in p.stderr, p.stderr


@pytest.mark.parametrize("name", [*COMMAND_MODULES, "quantize"])
def test_version_on_each_command(name, capsys):
    import importlib

    import gpt2s
    with pytest.raises(SystemExit) as e:
        importlib.import_module(f"gpt2s.{name}").main(["--version"])
    assert e.value.code == 0
    assert capsys.readouterr().out.strip() == f"gpt2s {gpt2s.__version__}"


def test_console_script_is_declared():
    from importlib.metadata import PackageNotFoundError, distribution
    try:
        eps = distribution("gpt2s").entry_points
    except PackageNotFoundError:
        pytest.skip("gpt2s is not installed as a distribution")
    scripts = {e.name: e.value for e in eps if e.group == "console_scripts"}
    assert scripts.get("gpt2s") == "gpt2s.__main__:main", scripts


def test_eval_dtype(capsys):
    _data_files()
    import json

    from gpt2s import GPT2, eval as gpt2s_eval
    from gpt2s.eval import evaluate
    from gpt2s.tokenizer import get_tokenizer
    args = ["--model", "demo", "--max-tokens", "600", "--seq-len", "64", "--json", "-q",
            str(HELDOUT)]
    results = {}
    for dtype in (None, "float32", "int8"):
        assert gpt2s_eval.main(args + (["--dtype", dtype] if dtype else [])) == 0
        results[dtype] = json.loads(capsys.readouterr().out)
    assert results[None]["dtype"] == "float32" and results["int8"]["dtype"] == "int8"
    assert results[None]["loss"] == results["float32"]["loss"]
    # the int8 number is the int8 model's loss, not float32's
    ids = get_tokenizer().encode_ordinary(HELDOUT.read_text(encoding="utf-8"))[:600]
    want = evaluate(GPT2.from_pretrained("demo", dtype="int8"), ids, 64)["loss"]
    assert results["int8"]["loss"] == pytest.approx(want, rel=1e-6)
    assert results["int8"]["loss"] != results["float32"]["loss"]


def test_generate_prompt_file(tmp_path, capsys):
    from gpt2s import generate
    f = tmp_path / "prompt.txt"
    f.write_text("ROMEO:\nWhat light\n", encoding="utf-8")
    args = ["--model", "demo", "-n", "5", "--temperature", "0"]
    assert generate.main(["--prompt-file", str(f), *args]) == 0
    from_file = capsys.readouterr().out
    assert generate.main(["ROMEO:\nWhat light", *args]) == 0
    assert from_file == capsys.readouterr().out
    assert from_file.startswith("ROMEO:\nWhat light")
    for bad, fragment in [(tmp_path / "missing.txt", "no such file"),
                          (tmp_path, "is a directory")]:
        assert generate.main(["--prompt-file", str(bad), *args]) == 2
        assert f"--prompt-file {bad}: {fragment}" in capsys.readouterr().err
    (tmp_path / "latin1.txt").write_bytes(b"caf\xe9")
    assert generate.main(["--prompt-file", str(tmp_path / "latin1.txt"), *args]) == 2
    assert "not UTF-8 text (byte 0xe9 at offset 3)" in capsys.readouterr().err
    assert generate.main(["Hi", "--prompt-file", str(f), *args]) == 2
    assert "not both" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------
# A model with its own vocabulary: character level, as nanoGPT's shakespeare_char


def test_character_level_train_generate_eval(tmp_path, capsys):
    _data_files()
    import json

    import numpy as np

    from gpt2s import GPT2, eval as gpt2s_eval, generate, train
    text = EXCERPT.read_text(encoding="utf-8")
    chars = sorted(set(text))                        # nanoGPT's shakespeare_char vocabulary
    out = tmp_path / "char"
    assert train.main([str(EXCERPT), "--tokenizer", "char", "--init", "tiny", "--steps", "30",
                       "--batch-size", "4", "--seq-len", "64", "--lr", "3e-3",
                       "--eval-batches", "2", "--out", str(out), "--no-plot", "--quiet"]) == 0
    capsys.readouterr()
    m = GPT2.from_safetensors(out)
    assert m.config.vocab_size == len(chars)
    vocab = json.loads((out / "vocab.json").read_text())
    assert list(vocab["chars"]) == chars
    # the data it trained on: one token per character, the index in the sorted set
    state = json.loads((out / "train_state.json").read_text())
    assert state["identity"]["train_files"][0]["tokens"] == len(text)

    # generate decodes with the model's characters, never GPT-2's tokens
    assert generate.main(["ROMEO:", "--model", str(out), "-n", "40", "--temperature", "0",
                          "--no-echo"]) == 0
    sample = capsys.readouterr().out
    assert sample.endswith("\n") and len(sample) == 41, repr(sample)
    assert set(sample[:-1]) <= set(chars)
    # the same tokens as the model's own greedy generation over character ids
    ids = np.array([[chars.index(c) for c in "ROMEO:"]])
    want = "".join(chars[i] for i in m.generate(ids, 40, temperature=0)[0, 6:])
    assert sample[:-1] == want

    # eval reads the text with the model's vocabulary: the loss is the model's on char ids
    assert gpt2s_eval.main(["--model", str(out), "--json", "-q", "--seq-len", "64",
                            "--stride", "64", "--max-tokens", "4000", str(EXCERPT)]) == 0
    result = json.loads(capsys.readouterr().out)
    from gpt2s.eval import evaluate
    want = evaluate(m, [chars.index(c) for c in text[:4000]], 64, 64)["loss"]
    assert result["loss"] == pytest.approx(want, rel=1e-6)
    assert result["loss"] < np.log(len(chars))       # it learned something in 30 steps
    # text with a character the vocabulary lacks is refused, naming the file and character
    held = HELDOUT.read_text(encoding="utf-8")
    unknown = next((c for c in held if c not in chars), None)
    if unknown is not None:
        assert gpt2s_eval.main(["--model", str(out), "-q", str(HELDOUT)]) == 2
        err = capsys.readouterr().err
        assert f"{HELDOUT}: the text has {unknown!r}" in err and "vocabulary of" in err, err

    # a character the vocabulary lacks is named; no prompt: there is no <|endoftext|>
    missing = next(c for c in "0123456789@#$%^&*~" if c not in chars)
    assert generate.main([f"ROMEO{missing}", "--model", str(out), "-n", "3"]) == 2
    assert f"{missing!r}" in capsys.readouterr().err
    assert generate.main(["--model", str(out), "-n", "3"]) == 2
    assert "has no token that starts a text (no <|endoftext|> or BOS token): give a PROMPT" \
        in capsys.readouterr().err

    # without its vocab.json the model is refused, not decoded with GPT-2's tokenizer
    (out / "vocab.json").rename(tmp_path / "vocab.json")
    assert generate.main(["ROMEO:", "--model", str(out), "-n", "3"]) == 2
    err = capsys.readouterr().err
    assert f"vocabulary has {len(chars)} tokens, not GPT-2's 50257" in err, err
    assert gpt2s_eval.main(["--model", str(out), "-q", str(EXCERPT)]) == 2
    assert "not GPT-2's 50257" in capsys.readouterr().err
    (tmp_path / "vocab.json").rename(out / "vocab.json")

    # resuming keeps the vocabulary; another --tokenizer is refused
    assert train.main([str(EXCERPT), "--tokenizer", "gpt2", "--init", "tiny", "--steps", "31",
                       "--batch-size", "4", "--seq-len", "64", "--out", str(out), "--resume",
                       "--quiet"]) == 2
    assert "used another vocabulary (--tokenizer char), not --tokenizer gpt2" in \
        capsys.readouterr().err
    assert train.main([str(EXCERPT), "--init", "tiny", "--steps", "31", "--batch-size", "4",
                       "--seq-len", "64", "--lr", "3e-3", "--eval-batches", "2",
                       "--out", str(out), "--resume", "--no-plot", "--quiet"]) == 0
    capsys.readouterr()
    assert list(json.loads((out / "vocab.json").read_text())["chars"]) == chars


def test_a_bpe_tokenizer_json_of_ones_own(tmp_path, capsys):
    """--tokenizer PATH/tokenizer.json: a byte-level BPE trained with Hugging Face tokenizers
    on the text; generate's text is what tokenizers decodes from the model's own ids."""
    _data_files()
    tokenizers = pytest.importorskip("tokenizers")
    import json

    from gpt2s import GPT2, generate, train
    tk = tokenizers.Tokenizer(tokenizers.models.BPE())
    tk.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = tokenizers.decoders.ByteLevel()
    tk.train([str(EXCERPT)], tokenizers.trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<|endoftext|>"],
        initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet()))
    spec = tmp_path / "tokenizer.json"
    tk.save(str(spec))
    out = tmp_path / "bpe"
    assert train.main([str(EXCERPT), "--tokenizer", str(spec), "--init", "tiny",
                       "--steps", "10", "--batch-size", "2", "--seq-len", "32",
                       "--eval-batches", "1", "--out", str(out), "--no-plot", "--quiet"]) == 0
    m = GPT2.from_safetensors(out)
    assert m.config.vocab_size == tk.get_vocab_size()
    state = json.loads((out / "train_state.json").read_text())
    want_tokens = len(tk.encode(EXCERPT.read_text(encoding="utf-8"),
                                add_special_tokens=False).ids)
    assert state["identity"]["train_files"][0]["tokens"] == want_tokens
    capsys.readouterr()
    prompt = "ROMEO: é"
    assert generate.main([prompt, "--model", str(out), "-n", "12", "--temperature", "0",
                          "--ignore-eos"]) == 0
    text = capsys.readouterr().out
    ids = tk.encode(prompt, add_special_tokens=False).ids
    new = m.generate([ids], 12, temperature=0)[0, len(ids):].tolist()
    assert text == tk.decode(ids + new, skip_special_tokens=False) + "\n"
    # a file that is not a tokenizer.json is refused by name
    assert train.main([str(EXCERPT), "--tokenizer", str(EXCERPT), "--init", "tiny",
                       "--steps", "1", "--out", str(tmp_path / "x")]) == 2
    assert f"{EXCERPT}: not a tokenizers tokenizer.json" in capsys.readouterr().err
