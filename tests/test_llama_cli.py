"""The command lines with Llama-family checkpoints (saved by transformers, with a small
tokenizer.json made by the tokenizers package): generate continues a prompt with the
checkpoint's own tokenizer and stops at the config's end tokens, as transformers' greedy
generate does; eval's loss is transformers' on the same tokens; a model without its
tokenizer is refused (never decoded with GPT-2's), by train too."""

from __future__ import annotations

import json

import numpy as np
import pytest

from llama_ckpt import save_hf, write_config

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("tokenizers", reason="the checkpoints' tokenizer.json needs tokenizers")

PROMPT = "The quick brown fox"


@pytest.fixture(params=["llama", "qwen2"])
def checkpoint(request, tmp_path):
    # the Llama checkpoint's tokenizer puts a BOS before the prompt (as Llama 3's does)
    hf, tk = save_hf(tmp_path / request.param, request.param, seed=4,
                     bos=request.param == "llama")
    if request.param == "llama":
        assert tk.encode(PROMPT).ids[0] == tk.token_to_id("<|im_start|>")
    else:   # Hugging Face checkpoints ship vocab.json and merges.txt beside tokenizer.json
        (tmp_path / request.param / "vocab.json").write_text(json.dumps(tk.get_vocab()))
        (tmp_path / request.param / "merges.txt").write_text("#version: 0.2\n")
    return tmp_path / request.param, hf, tk


def _greedy(hf, tk, n, eos=None):
    ids = torch.tensor([tk.encode(PROMPT).ids])
    hf.generation_config.eos_token_id = None
    out = hf.generate(ids, max_new_tokens=n, do_sample=False, pad_token_id=0,
                      attention_mask=torch.ones(ids.shape, dtype=torch.long),
                      eos_token_id=eos).numpy()[0]
    return out[ids.shape[1]:].tolist()


def _generate(capsys, *args):
    from gpt2s.generate import main
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def test_generate_greedy_as_transformers(checkpoint, capsys):
    path, hf, tk = checkpoint
    new = _greedy(hf, tk, 12)
    code, out, err = _generate(capsys, "--model", str(path), PROMPT, "--temperature", "0",
                               "-n", "12", "--ignore-eos")
    assert code == 0, err
    assert out == PROMPT + tk.decode(new, skip_special_tokens=False) + "\n"


def test_generate_stops_at_the_config_end_tokens(checkpoint, capsys):
    path, hf, tk = checkpoint
    free = _greedy(hf, tk, 12)
    unused = next(t for t in range(tk.get_vocab_size()) if t not in free)
    eos = [unused, free[4]]
    first = free.index(free[4])
    write_config(path, eos_token_id=eos)
    code, out, err = _generate(capsys, "--model", str(path), PROMPT, "--temperature", "0",
                               "-n", "12")
    assert code == 0, err
    assert _greedy(hf, tk, 12, eos=eos) == free[:first + 1]     # transformers stops there too
    # the end token is not shown
    assert out == PROMPT + tk.decode(free[:first], skip_special_tokens=False) + "\n"
    # --ignore-eos goes on
    code, out, err = _generate(capsys, "--model", str(path), PROMPT, "--temperature", "0",
                               "-n", "12", "--ignore-eos")
    assert out == PROMPT + tk.decode(free, skip_special_tokens=False) + "\n"


def test_generate_refuses_without_the_tokenizer(checkpoint, capsys):
    path, hf, tk = checkpoint
    (path / "tokenizer.json").unlink()
    code, out, err = _generate(capsys, "--model", str(path), PROMPT)
    assert code == 2 and "no tokenizer.json beside the model" in err and "not GPT-2's" in err
    assert out == ""


def test_eval_loss_as_transformers(checkpoint, tmp_path):
    from gpt2s.eval import main
    path, hf, tk = checkpoint
    text = "Once upon a time there was a quick brown fox. Hello, world!"
    (tmp_path / "a.txt").write_text(text, encoding="utf-8")
    ids = tk.encode(text, add_special_tokens=False).ids   # eval scores the text's own tokens
    with torch.no_grad():
        t = torch.tensor([ids])
        want = float(hf(input_ids=t, labels=t).loss)
    import contextlib
    import io
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(io.StringIO()):
        code = main(["--model", str(path), "--seq-len", str(len(ids) - 1), "--json", "-q",
                     str(tmp_path / "a.txt")])
    assert code == 0
    result = json.loads(out.getvalue())
    assert result["tokens"] == len(ids) - 1 and result["dtype"] == "float32"
    assert result["loss"] == pytest.approx(want, rel=1e-5)
    # int8 weights: within the bound of the low-precision tests
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(io.StringIO()):
        code = main(["--model", str(path), "--seq-len", str(len(ids) - 1), "--json", "-q",
                     "--dtype", "int8", str(tmp_path / "a.txt")])
    assert code == 0
    result = json.loads(out.getvalue())
    assert result["dtype"] == "int8" and result["loss"] == pytest.approx(want, rel=3e-2)


def test_eval_refuses_text_without_the_tokenizer(checkpoint, tmp_path, capsys):
    from gpt2s.eval import main
    path, hf, tk = checkpoint
    (path / "tokenizer.json").unlink()
    (tmp_path / "a.txt").write_text("some text " * 10, encoding="utf-8")
    assert main(["--model", str(path), "-q", str(tmp_path / "a.txt")]) == 2
    assert "no tokenizer.json beside the model" in capsys.readouterr().err


def test_train_refuses_a_llama_checkpoint_without_its_tokenizer(checkpoint, tmp_path, capsys):
    """The trainer fine-tunes Llama checkpoints (tests/test_llama_train.py), but never
    encodes their text with GPT-2's tokens."""
    from gpt2s.train import main
    path, hf, tk = checkpoint
    (path / "tokenizer.json").unlink()
    (tmp_path / "a.txt").write_text("some text " * 100, encoding="utf-8")
    code = main(["--model", str(path), "--out", str(tmp_path / "run"), "--steps", "1",
                 str(tmp_path / "a.txt")])
    err = capsys.readouterr().err
    assert code == 2 and "no tokenizer.json beside the model" in err, err


def test_generate_text_and_stream_from_python(checkpoint):
    """The model loaded from the directory carries its tokenizer: generate_text gives the
    greedy text transformers gives, and stops at the config's end tokens."""
    import gpt2s
    path, hf, tk = checkpoint
    free = _greedy(hf, tk, 12)
    m = gpt2s.AutoModelForCausalLM.from_pretrained(path)
    assert m.tokenizer is not None
    assert m.generate_text(PROMPT, 12, temperature=0.0, stop_at_eos=False) == \
        tk.decode(free, skip_special_tokens=False)
    ids = tk.encode(PROMPT).ids
    assert list(m.generate_stream(ids, 12, temperature=0.0)) == free
    unused = next(t for t in range(tk.get_vocab_size()) if t not in free)
    write_config(path, eos_token_id=[unused, free[3]])
    m = gpt2s.AutoModelForCausalLM.from_pretrained(path, dtype="float32")
    first = free.index(free[3])
    assert m.generate_text(PROMPT, 12, temperature=0.0) == \
        tk.decode(free[:first], skip_special_tokens=False)
    assert list(m.generate_stream(ids, 12, temperature=0.0, stop_at_eos=True)) == \
        free[:first + 1]
    # without its tokenizer
    (path / "tokenizer.json").unlink()
    bare = gpt2s.AutoModelForCausalLM.from_pretrained(path)
    with pytest.raises(ValueError, match="needs the model's tokenizer"):
        bare.generate_text(PROMPT, 3)
