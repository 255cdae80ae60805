"""The public API of the Llama-family models: the names exported from gpt2s, the generic
entry point that picks the class from config.json's model_type, the refusals (gpt_neox, an
unknown type, GPT2 given a Llama checkpoint), and the config's end tokens (a list) stopping
generation as transformers' generate does.  Checkpoints are written by transformers."""

from __future__ import annotations

import numpy as np
import pytest

import gpt2s
from gpt2s import AutoModelForCausalLM, GPT2, GPT2Config, LlamaConfig, LlamaForCausalLM

from llama_ckpt import save_hf, write_config
from ref import rel_err

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")


def test_exported_names():
    from gpt2s import GPT2 as G   # as before
    assert G is gpt2s.model.GPT2
    for name in ("GPT2", "GPT2Config", "LlamaForCausalLM", "LlamaConfig",
                 "AutoModelForCausalLM"):
        assert name in gpt2s.__all__ and hasattr(gpt2s, name)
    with pytest.raises(TypeError, match="from_pretrained"):
        AutoModelForCausalLM()


@pytest.mark.parametrize("model_type", ["llama", "qwen2"])
def test_auto_loads_a_transformers_checkpoint(tmp_path, model_type):
    hf, _ = save_hf(tmp_path / "m", model_type, tokenizer=False, vocab_size=97,
                    tie_word_embeddings=model_type == "llama")
    m = AutoModelForCausalLM.from_pretrained(tmp_path / "m")
    assert isinstance(m, LlamaForCausalLM) and m.config.model_type == model_type
    assert model_type in repr(m)
    idx = np.random.default_rng(0).integers(0, 97, (2, 9))
    want = hf(input_ids=torch.from_numpy(idx)).logits.detach().numpy()
    assert rel_err(m.forward(idx)[0], want) < 1e-5
    # the directory as a string, and from_safetensors as an alias
    assert isinstance(AutoModelForCausalLM.from_safetensors(str(tmp_path / "m")),
                      LlamaForCausalLM)
    # the class's own entry point
    assert LlamaForCausalLM.from_pretrained(tmp_path / "m").config == m.config
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "m", dtype="int8").dtype == "int8"
    with pytest.raises(ValueError, match="dtype must be one of"):
        AutoModelForCausalLM.from_pretrained(tmp_path / "m", dtype="float16")
    # a lone file saved by gpt2s keeps its model_type in its metadata
    one = m.save_safetensors(tmp_path / "one.safetensors")
    assert AutoModelForCausalLM.from_pretrained(one).config == m.config


def test_auto_loads_gpt2(tmp_path):
    m = GPT2.from_config(GPT2Config.preset("tiny"), seed=0)
    m.save_safetensors(tmp_path / "g")
    m.save_safetensors(tmp_path / "g.safetensors")
    idx = np.array([[1, 2, 3]])
    for path in (tmp_path / "g", tmp_path / "g.safetensors"):
        got = AutoModelForCausalLM.from_pretrained(path)
        assert type(got) is GPT2
        assert np.array_equal(got.forward(idx)[0], m.forward(idx)[0])
    got = AutoModelForCausalLM.from_pretrained(tmp_path / "g", dtype="int8")
    assert type(got) is GPT2 and got.dtype == "int8"


def test_refusals_by_name(tmp_path):
    save_hf(tmp_path / "m", tokenizer=False, vocab_size=50)
    with pytest.raises(ValueError, match="AutoModelForCausalLM"):
        GPT2.from_pretrained(tmp_path / "m")
    write_config(tmp_path / "m", model_type="gpt_neox")
    with pytest.raises(ValueError, match=r"'gpt_neox'.*not supported yet"):
        AutoModelForCausalLM.from_pretrained(tmp_path / "m")
    write_config(tmp_path / "m", model_type="mamba")
    with pytest.raises(ValueError, match=r"config.json: model_type 'mamba'"):
        AutoModelForCausalLM.from_pretrained(tmp_path / "m")
    write_config(tmp_path / "m", model_type=3)
    with pytest.raises(ValueError, match="model_type=3 is not a string"):
        AutoModelForCausalLM.from_pretrained(tmp_path / "m")
    # a GPT-2 checkpoint given to the Llama class
    GPT2.from_config(GPT2Config.preset("tiny"), seed=0).save_safetensors(tmp_path / "g")
    with pytest.raises(ValueError, match="model_type"):
        LlamaForCausalLM.from_pretrained(tmp_path / "g")


def test_end_tokens_read_and_refused(tmp_path):
    save_hf(tmp_path / "m", tokenizer=False, vocab_size=50, eos_token_id=[7, 9],
            bos_token_id=3)
    cfg = AutoModelForCausalLM.from_pretrained(tmp_path / "m").config
    assert cfg.eos_token_id == (7, 9) and cfg.bos_token_id == 3
    assert cfg.to_hf_dict()["eos_token_id"] == [7, 9]
    assert LlamaConfig.from_hf_dict(cfg.to_hf_dict()).eos_token_id == (7, 9)
    for bad in (50, [1, -1], [], "2", True):
        with pytest.raises(ValueError, match="eos_token_id"):
            LlamaConfig.from_hf_dict({**cfg.to_hf_dict(), "eos_token_id": bad})


@pytest.mark.parametrize("stop_index", [2, 5])
def test_generation_stops_at_any_end_token_as_transformers(tmp_path, stop_index):
    """eos_token_id a list: greedy generation ends at the first of them that is generated,
    as transformers' generate does with the same list."""
    hf, _ = save_hf(tmp_path / "m", tokenizer=False, vocab_size=64, seed=3)
    m = AutoModelForCausalLM.from_pretrained(tmp_path / "m")
    prompt = np.array([[5, 17, 33, 2]])
    hf.generation_config.eos_token_id = None
    free = hf.generate(torch.from_numpy(prompt), max_new_tokens=12, do_sample=False,
                       attention_mask=torch.ones(prompt.shape, dtype=torch.long),
                       pad_token_id=0).numpy()[0, 4:]
    # an id never generated first, and the token generated at step stop_index
    target = int(free[stop_index])
    unused = next(t for t in range(64) if t not in free.tolist())
    eos = [unused, target]
    want = hf.generate(torch.from_numpy(prompt), max_new_tokens=12, do_sample=False,
                       attention_mask=torch.ones(prompt.shape, dtype=torch.long),
                       pad_token_id=0, eos_token_id=eos).numpy()
    assert want.shape[1] < 4 + 12
    got = m.generate(prompt, 12, temperature=0.0, stop_at_eos=True, eos_token_id=eos)
    assert np.array_equal(got, want)
    # the config's list is the default
    write_config(tmp_path / "m", eos_token_id=eos)
    m2 = AutoModelForCausalLM.from_pretrained(tmp_path / "m")
    assert np.array_equal(m2.generate(prompt, 12, temperature=0.0, stop_at_eos=True), want)
    # min_new_tokens keeps every end token out until then
    g = gpt2s.generation.generate(m2, prompt, 12, temperature=0.0, stop_at_eos=True,
                                  eos_token_id=eos, min_new_tokens=12)
    assert g.shape[1] == 4 + 12 and not np.isin(g[0, 4:], eos).any()
