"""GPT-NeoX checkpoints (saved by transformers, with a small tokenizer.json made by the
tokenizers package) through the public API and the command lines: the exported names, the
generic entry point, GPT2 refusing one by name, generate (greedy, as transformers' generate)
and eval (the loss transformers computes), text in and out from Python."""

from __future__ import annotations

import contextlib
import io
import json

import numpy as np
import pytest

import gpt2s
from gpt2s import AutoModelForCausalLM, GPT2, GPTNeoXConfig, GPTNeoXForCausalLM

from neox_ckpt import save_hf_neox
from ref import rel_err

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

PROMPT = "The quick brown fox"


def test_exported_names():
    for name in ("GPTNeoXForCausalLM", "GPTNeoXConfig"):
        assert name in gpt2s.__all__ and hasattr(gpt2s, name)
    assert gpt2s.GPTNeoXForCausalLM is gpt2s.neox.GPTNeoXForCausalLM
    # the same public methods as the Llama family's class (the trainer and server use them)
    for meth in ("forward", "backward", "zero_grad", "generate", "generate_stream",
                 "generate_text", "kv_cache", "forward_cached", "save_safetensors",
                 "to_dtype", "from_config", "from_pretrained", "from_safetensors"):
        assert callable(getattr(GPTNeoXForCausalLM, meth)), meth


@pytest.mark.parametrize("kw", [dict(), dict(use_parallel_residual=False, rotary_pct=1.0,
                                             tie_word_embeddings=True, legacy_keys=True)])
def test_auto_loads_a_transformers_checkpoint(tmp_path, kw):
    hf, _ = save_hf_neox(tmp_path / "m", tokenizer=False, vocab_size=97, seed=2, **kw)
    m = AutoModelForCausalLM.from_pretrained(tmp_path / "m")
    assert type(m) is GPTNeoXForCausalLM and "gpt_neox" in repr(m)
    idx = np.random.default_rng(0).integers(0, 97, (2, 9))
    want = hf.double()(input_ids=torch.from_numpy(idx)).logits.detach().numpy()
    assert rel_err(m.forward(idx)[0], want) < 1e-5
    assert GPTNeoXForCausalLM.from_pretrained(tmp_path / "m").config == m.config
    q = AutoModelForCausalLM.from_pretrained(tmp_path / "m", dtype="int8")
    assert type(q) is GPTNeoXForCausalLM and q.dtype == "int8"
    assert rel_err(q.forward(idx)[0], want) < 3e-2
    with pytest.raises(ValueError, match="dtype must be one of"):
        AutoModelForCausalLM.from_pretrained(tmp_path / "m", dtype="float16")
    # a lone file saved by gpt2s keeps its model_type in its metadata
    one = m.save_safetensors(tmp_path / "one.safetensors")
    again = AutoModelForCausalLM.from_pretrained(one)
    assert type(again) is GPTNeoXForCausalLM and again.config == m.config


def test_refusals_by_name(tmp_path):
    save_hf_neox(tmp_path / "m", tokenizer=False, vocab_size=50)
    with pytest.raises(ValueError, match="GPTNeoXForCausalLM"):
        GPT2.from_pretrained(tmp_path / "m")
    with pytest.raises(ValueError, match="model_type"):
        gpt2s.LlamaForCausalLM.from_pretrained(tmp_path / "m")
    gpt2s.GPT2.from_config(gpt2s.GPT2Config.preset("tiny"), seed=0).save_safetensors(
        tmp_path / "g")
    with pytest.raises(ValueError, match="model_type"):
        GPTNeoXForCausalLM.from_pretrained(tmp_path / "g")
    d = json.loads((tmp_path / "m" / "config.json").read_text())
    d["rope_parameters"]["rope_type"] = "dynamic"
    d["rope_parameters"]["factor"] = 2.0
    (tmp_path / "m" / "config.json").write_text(json.dumps(d))
    with pytest.raises(ValueError, match="rope_type='dynamic' is not supported"):
        AutoModelForCausalLM.from_pretrained(tmp_path / "m")


@pytest.fixture
def checkpoint(tmp_path):
    pytest.importorskip("tokenizers", reason="the checkpoint's tokenizer.json needs tokenizers")
    hf, tk = save_hf_neox(tmp_path / "pythia", seed=4)
    return tmp_path / "pythia", hf, tk


def _greedy(hf, tk, n):
    ids = torch.tensor([tk.encode(PROMPT).ids])
    hf.generation_config.eos_token_id = None
    out = hf.generate(ids, max_new_tokens=n, do_sample=False, pad_token_id=0,
                      attention_mask=torch.ones(ids.shape, dtype=torch.long)).numpy()[0]
    return out[ids.shape[1]:].tolist()


def test_generate_cli_greedy_as_transformers(checkpoint, capsys):
    from gpt2s.generate import main
    path, hf, tk = checkpoint
    new = _greedy(hf, tk, 12)
    code = main(["--model", str(path), PROMPT, "--temperature", "0", "-n", "12",
                 "--ignore-eos"])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert out == PROMPT + tk.decode(new, skip_special_tokens=False) + "\n"


def test_generate_text_and_stream_from_python(checkpoint):
    path, hf, tk = checkpoint
    m = AutoModelForCausalLM.from_pretrained(path)
    assert m.tokenizer is not None
    new = _greedy(hf, tk, 8)
    text = m.generate_text(PROMPT, 8, temperature=0.0, stop_at_eos=False)
    assert text == tk.decode(new, skip_special_tokens=False)
    ids = np.array([tk.encode(PROMPT).ids])
    streamed = [int(t[0]) for t in m.generate_stream(ids, 8, temperature=0.0)]
    assert streamed == new


def test_eval_cli_loss_as_transformers(checkpoint, tmp_path):
    from gpt2s.eval import main
    path, hf, tk = checkpoint
    text = "Once upon a time there was a quick brown fox. Hello, world!"
    (tmp_path / "a.txt").write_text(text, encoding="utf-8")
    ids = tk.encode(text, add_special_tokens=False).ids
    with torch.no_grad():
        t = torch.tensor([ids])
        want = float(hf.double()(input_ids=t, labels=t).loss)
    for dtype, tol in (("float32", 1e-5), ("int8", 3e-2)):
        out = io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(io.StringIO()):
            code = main(["--model", str(path), "--seq-len", str(len(ids) - 1), "--json", "-q",
                         "--dtype", dtype, str(tmp_path / "a.txt")])
        assert code == 0
        result = json.loads(out.getvalue())
        assert result["tokens"] == len(ids) - 1 and result["dtype"] == dtype
        assert result["loss"] == pytest.approx(want, rel=tol)


def test_config_type_checked():
    with pytest.raises(ValueError, match="GPTNeoXConfig.rotary_pct=1.5"):
        GPTNeoXConfig(vocab_size=10, hidden_size=8, num_hidden_layers=1,
                      num_attention_heads=2, intermediate_size=8, rotary_pct=1.5)
