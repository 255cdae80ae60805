"""gpt2s.neox (GPTNeoXConfig, GPTNeoXForCausalLM) on random tiny configs, in float64 terms:
logits, loss and every gradient against the independent NumPy reference (tests/ref_neox.py)
and against transformers' GPTNeoXForCausalLM; the KV-cache decode path and greedy generation;
the rotary inverse frequencies of the rotated part; the config's two rotary forms and its
refusals; checkpoints transformers writes, and gpt2s' saves read back by transformers."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest

import gpt2s
import ref_neox
from gpt2s.neox import GPTNeoXForCausalLM
from gpt2s.neox_config import GPTNeoXConfig
from gpt2s.weights import SafetensorsError, save_safetensors

from ref import rel_err

CONFIGS = {
    # Pythia's block: parallel residual, a quarter of each head rotated, untied head
    "parallel-quarter": dict(vocab_size=61, hidden_size=32, intermediate_size=48,
                             num_hidden_layers=2, num_attention_heads=4),
    # sequential residual, the whole head rotated, tied head
    "sequential-full-tied": dict(vocab_size=50, hidden_size=48, intermediate_size=64,
                                 num_hidden_layers=2, num_attention_heads=6, rotary_pct=1.0,
                                 use_parallel_residual=False, tie_word_embeddings=True),
    # no attention biases, the tanh GELU, half of each head rotated, another base and eps
    "nobias-tanh-half": dict(vocab_size=40, hidden_size=64, intermediate_size=96,
                             num_hidden_layers=1, num_attention_heads=4, rotary_pct=0.5,
                             attention_bias=False, hidden_act="gelu_new",
                             rotary_emb_base=500.0, layer_norm_eps=1e-6),
    # wider heads, three layers (Pythia-160M's head of 64, rotary 16, at a smaller width)
    "pythia-heads": dict(vocab_size=70, hidden_size=128, intermediate_size=256,
                         num_hidden_layers=3, num_attention_heads=2),
}
# configs the float64 reference does not compute (a rope scaling): transformers only
SCALED = {
    "sequential-linear": dict(vocab_size=45, hidden_size=32, intermediate_size=40,
                              num_hidden_layers=2, num_attention_heads=2,
                              use_parallel_residual=False,
                              rope_scaling={"rope_type": "linear", "factor": 3.0}),
    # no rotary embedding at all (rotary_pct 0: positions only through the causal mask)
    "no-rotary": dict(vocab_size=30, hidden_size=32, intermediate_size=40,
                      num_hidden_layers=1, num_attention_heads=2, rotary_pct=0.0),
}


def _hf_name(name):
    return "lm_head.weight" if name == "embed_out.weight" else name


def make(name, seed=0):
    cfg = GPTNeoXConfig(**{**CONFIGS, **SCALED}[name])
    m = GPTNeoXForCausalLM.from_config(cfg, seed=seed)
    rng = np.random.default_rng(seed + 1)
    # norms and biases away from 1 and 0, larger weights (less so in wider models, whose
    # logits would otherwise be so sharp that float32 rounding alone passes 1e-5)
    scale = 5.0 * (32 / cfg.hidden_size) ** 0.5
    for p in m.params.values():
        p[...] = (p * scale + rng.normal(0, 0.05, p.shape)).astype(np.float32)
        if p.ndim == 1:
            p += 1.0
    return cfg, m


def ref_kwargs(cfg):
    return dict(n_head=cfg.n_head, rotary_pct=cfg.rotary_pct, rotary_base=cfg.rotary_emb_base,
                eps=cfg.layer_norm_eps, parallel=cfg.use_parallel_residual,
                activation=cfg.hidden_act)


def hf_model(cfg, m):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    hf = transformers.GPTNeoXForCausalLM(
        transformers.GPTNeoXConfig(**copy.deepcopy(cfg.to_hf_dict()))).double().eval()
    state = {_hf_name(k): torch.from_numpy(v.astype(np.float64)) for k, v in m.params.items()}
    if cfg.tie_word_embeddings:
        state["lm_head.weight"] = state["gpt_neox.embed_in.weight"]
    missing, unexpected = hf.load_state_dict(state, strict=False)
    assert not missing and not unexpected, (missing, unexpected)
    return hf


def batch(cfg, seed=7, B=2, T=11):
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, cfg.vocab_size, (B, T))
    targets = rng.integers(0, cfg.vocab_size, (B, T))
    targets[0, :3] = -1
    return idx, targets


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("threads", [1, 2])
def test_forward_backward_match_reference(name, threads, restore_threads):
    gpt2s.set_num_threads(threads)
    cfg, m = make(name)
    idx, targets = batch(cfg)
    want_logits, want_loss, want = ref_neox.loss_and_grads(m.params, idx, targets,
                                                           **ref_kwargs(cfg))
    m.zero_grad()
    logits, loss = m.forward(idx, targets)
    m.backward()
    assert rel_err(logits, want_logits) < 1e-5
    assert abs(loss - want_loss) / want_loss < 1e-5
    assert set(m.grads) == set(want)
    for k, g in m.grads.items():
        assert rel_err(g, want[k]) < 1e-4, k


@pytest.mark.parametrize("name", ["parallel-quarter", "sequential-full-tied"])
def test_reference_matches_transformers(name):
    """The NumPy reference itself against transformers (float64): logits, loss, gradients."""
    torch = pytest.importorskip("torch")
    cfg, m = make(name, seed=4)
    hf = hf_model(cfg, m)
    idx, targets = batch(cfg, seed=5)
    logits, loss, grads = ref_neox.loss_and_grads(m.params, idx, targets, **ref_kwargs(cfg))
    out = hf(input_ids=torch.from_numpy(idx)).logits
    tl = torch.nn.functional.cross_entropy(out.reshape(-1, cfg.vocab_size),
                                           torch.from_numpy(targets).reshape(-1),
                                           ignore_index=-1)
    tl.backward()
    # (transformers rounds the rotary cos and sin to float32 even in a float64 model: the
    # two agree to that, not to float64's last bits)
    assert rel_err(logits, out.detach().numpy()) < 1e-6
    assert abs(loss - tl.item()) < 1e-6 * tl.item()
    named = dict(hf.named_parameters())
    for k, g in grads.items():
        ref = named[_hf_name(k)].grad.numpy()
        assert rel_err(g, ref) < 1e-5, k


@pytest.mark.parametrize("name", list(CONFIGS) + list(SCALED))
def test_forward_backward_match_transformers(name):
    torch = pytest.importorskip("torch")
    cfg, m = make(name, seed=2)
    hf = hf_model(cfg, m)
    idx, targets = batch(cfg, seed=3)
    out = hf(input_ids=torch.from_numpy(idx)).logits
    tl = torch.nn.functional.cross_entropy(out.reshape(-1, cfg.vocab_size),
                                           torch.from_numpy(targets).reshape(-1),
                                           ignore_index=-1)
    tl.backward()
    m.zero_grad()
    logits, loss = m.forward(idx, targets)
    m.backward()
    assert rel_err(logits, out.detach().numpy()) < 1e-5
    assert abs(loss - tl.item()) / tl.item() < 1e-5
    named = dict(hf.named_parameters())
    for k, g in m.grads.items():
        assert rel_err(g, named[_hf_name(k)].grad.numpy()) < 1e-4, k


@pytest.mark.parametrize("name", ["parallel-quarter", "sequential-full-tied",
                                  "sequential-linear"])
def test_cached_decoding_matches_transformers(name):
    """Prefill of 5 tokens, then one token at a time from the KV cache: each step's logits
    equal transformers' logits over the whole sequence."""
    torch = pytest.importorskip("torch")
    cfg, m = make(name, seed=3)
    hf = hf_model(cfg, m)
    idx = np.random.default_rng(4).integers(0, cfg.vocab_size, (2, 9))
    ref = hf(input_ids=torch.from_numpy(idx)).logits.detach().numpy()
    cache = m.kv_cache(2, 12)
    assert cache.keys.shape == (cfg.n_layer, 2, 12, cfg.hidden_size)
    got = [m.forward_cached(idx[:, :5], 0, cache)]
    for t in range(5, 9):
        got.append(m.forward_cached(idx[:, t:t + 1], t, cache))
    for step, t in enumerate(range(4, 9)):
        assert rel_err(got[step], ref[:, t]) < 1e-5, t


@pytest.mark.parametrize("name", ["parallel-quarter", "nobias-tanh-half"])
def test_greedy_generation_matches_transformers(name):
    torch = pytest.importorskip("torch")
    cfg, m = make(name, seed=8)
    hf = hf_model(cfg, m)
    prompt = np.random.default_rng(2).integers(0, cfg.vocab_size, (2, 4))
    hf.generation_config.eos_token_id = None
    want = hf.generate(torch.from_numpy(prompt), max_new_tokens=10, do_sample=False,
                       attention_mask=torch.ones(prompt.shape, dtype=torch.long),
                       pad_token_id=0).numpy()
    assert np.array_equal(m.generate(prompt, 10, temperature=0.0), want)
    two = m.generate(prompt, 10, temperature=0.0, num_samples=2)
    assert np.array_equal(two, np.repeat(want, 2, axis=0))
    streamed = np.stack([t for t in m.generate_stream(prompt, 10, temperature=0.0)], axis=1)
    assert np.array_equal(streamed, want[:, 4:])


@pytest.mark.parametrize("rope_scaling", [
    None, {"rope_type": "linear", "factor": 2.5},
    {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
     "original_max_position_embeddings": 64}])
@pytest.mark.parametrize("head_dim,pct", [(64, 0.25), (128, 0.25), (16, 1.0), (80, 0.5)])
def test_inv_freq_matches_transformers(rope_scaling, head_dim, pct):
    transformers = pytest.importorskip("transformers")
    from transformers.models.gpt_neox import modeling_gpt_neox
    kw = dict(vocab_size=10, hidden_size=head_dim * 2, intermediate_size=8,
              num_hidden_layers=1, num_attention_heads=2, rotary_emb_base=10000.0,
              rotary_pct=pct, rope_scaling=rope_scaling)
    cfg = GPTNeoXConfig(**kw)
    ours = cfg.inv_freq()
    hf = modeling_gpt_neox.GPTNeoXRotaryEmbedding(transformers.GPTNeoXConfig(
        **copy.deepcopy(cfg.to_hf_dict()))).inv_freq.numpy()
    assert ours.dtype == np.float32 and ours.shape == hf.shape == (cfg.rotary_dim // 2,)
    assert np.all(np.abs(ours - hf) <= np.spacing(hf)), np.abs(ours / hf - 1).max()


def test_adamw_training_steps_match_torch():
    """gpt2s' AdamW (with clipping) on the GPT-NeoX model's store tracks torch.optim.AdamW on
    transformers' model (float64) for three steps."""
    torch = pytest.importorskip("torch")
    cfg, m = make("parallel-quarter", seed=6)
    hf = hf_model(cfg, m)
    rng = np.random.default_rng(6)
    idx = rng.integers(0, cfg.vocab_size, (2, 8))
    targets = rng.integers(0, cfg.vocab_size, (2, 8))
    opt = gpt2s.AdamW(m, lr=1e-3, weight_decay=0.1, eps=1e-6)
    named = dict(hf.named_parameters())
    groups = [{"params": [p for p in named.values() if p.ndim >= 2], "weight_decay": 0.1},
              {"params": [p for p in named.values() if p.ndim < 2], "weight_decay": 0.0}]
    topt = torch.optim.AdamW(groups, lr=1e-3, betas=(0.9, 0.95), eps=1e-6)
    for _ in range(3):
        m.zero_grad()
        _, loss = m.forward(idx, targets)
        m.backward()
        opt.step(max_norm=1.0)
        topt.zero_grad()
        out = hf(input_ids=torch.from_numpy(idx))
        tl = torch.nn.functional.cross_entropy(out.logits.reshape(16, -1),
                                               torch.from_numpy(targets).reshape(-1))
        tl.backward()
        torch.nn.utils.clip_grad_norm_(hf.parameters(), 1.0)
        topt.step()
        assert abs(loss - tl.item()) / tl.item() < 1e-5
    for k, v in m.params.items():
        assert rel_err(v, named[_hf_name(k)].detach().numpy()) < 1e-5, k


# ------------------------------------------------------------------------------------------
# config.json

PYTHIA_160M = {   # EleutherAI/pythia-160m's config.json (transformers 4.24)
    "architectures": ["GPTNeoXForCausalLM"], "bos_token_id": 0, "eos_token_id": 0,
    "hidden_act": "gelu", "hidden_size": 768, "initializer_range": 0.02,
    "intermediate_size": 3072, "layer_norm_eps": 1e-05, "max_position_embeddings": 2048,
    "model_type": "gpt_neox", "num_attention_heads": 12, "num_hidden_layers": 12,
    "rotary_emb_base": 10000, "rotary_pct": 0.25, "tie_word_embeddings": False,
    "torch_dtype": "float16", "transformers_version": "4.24.0", "use_cache": True,
    "use_parallel_residual": True, "vocab_size": 50304,
}


def test_config_reads_both_rotary_forms_and_round_trips():
    a = GPTNeoXConfig.from_hf_dict(PYTHIA_160M)
    assert (a.rotary_dim, a.head_dim, a.rotary_emb_base, a.use_parallel_residual) == \
        (16, 64, 10000, True)
    d5 = {k: v for k, v in PYTHIA_160M.items() if k not in ("rotary_emb_base", "rotary_pct")}
    d5["rope_parameters"] = {"rope_type": "default", "rope_theta": 10000.0,
                             "partial_rotary_factor": 0.25}
    assert GPTNeoXConfig.from_hf_dict(d5) == a
    both = {**PYTHIA_160M, "rope_parameters": d5["rope_parameters"], "rope_theta": 10000.0}
    assert GPTNeoXConfig.from_hf_dict(both) == a
    assert GPTNeoXConfig.from_hf_dict(a.to_hf_dict()) == a
    # defaults as transformers': rotary_pct 0.25, base 10000, gelu, parallel, biases
    bare = {k: PYTHIA_160M[k] for k in ("model_type", "vocab_size", "hidden_size",
                                         "intermediate_size", "num_hidden_layers",
                                         "num_attention_heads")}
    assert GPTNeoXConfig.from_hf_dict(bare) == a
    transformers = pytest.importorskip("transformers")
    t = transformers.GPTNeoXConfig(**copy.deepcopy(a.to_hf_dict()))
    assert t.rope_parameters["partial_rotary_factor"] == 0.25
    assert t.use_parallel_residual and not t.tie_word_embeddings
    # transformers' own dict (transformers 5: rope_parameters only) reads back
    t2 = transformers.GPTNeoXConfig(**{**copy.deepcopy(a.to_hf_dict()), "rotary_pct": 1.0,
                                       "use_parallel_residual": False})
    b = GPTNeoXConfig.from_hf_dict(json.loads(t2.to_json_string()))
    assert b.rotary_pct == 1.0 and not b.use_parallel_residual


@pytest.mark.parametrize("extra,message", [
    ({"model_type": "llama"}, "model_type=\"llama\""),
    ({"rotary_pct": 0.3}, "rotary_pct=0.3: turns 19"),
    ({"rotary_pct": 0.5, "rope_parameters": {"partial_rotary_factor": 0.25}},
     "rotary_pct=0.5 is not supported: it differs from rope_parameters.partial_rotary_factor"),
    ({"rope_theta": 500.0}, "rope_theta=500.0 is not supported: it differs"),
    ({"rope_scaling": {"rope_type": "dynamic", "factor": 2.0}}, "rope_type='dynamic'"),
    ({"rope_scaling": {"type": "yarn", "factor": 2.0}}, "rope_type='yarn'"),
    ({"rope_parameters": {"rope_type": "default", "factor": 2.0}},
     "rope_parameters.factor=2.0 is not supported"),
    ({"rope_parameters": {"mrope_section": [1]}}, "rope_parameters.mrope_section"),
    ({"hidden_act": "mish"}, "hidden_act='mish'"),
    ({"num_attention_heads": 5}, "num_attention_heads=5: need a divisor"),
    ({"head_dim": 32}, "head_dim=32 is not supported"),
    ({"num_key_value_heads": 4}, "unknown key 'num_key_value_heads'"),
    ({"sliding_window": 256}, "unknown key 'sliding_window'"),
    ({"quantization_config": {"quant_method": "gptq"}}, "quantization_config"),
    ({"use_parallel_residual": "yes"}, "use_parallel_residual='yes'"),
    ({"layer_norm_eps": 0}, "layer_norm_eps=0"),
    ({"eos_token_id": 50304}, "eos_token_id=50304"),
])
def test_config_refuses_by_name(extra, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace("[", r"\[")):
        GPTNeoXConfig.from_hf_dict({**PYTHIA_160M, **extra}, source="cfg.json")


def test_config_ignores_what_does_not_change_the_math():
    """Dropouts (gpt2s never applies dropout), use_cache, token ids, ... are accepted."""
    extra = {"attention_dropout": 0.1, "hidden_dropout": 0.1, "classifier_dropout": 0.1,
             "use_cache": False, "pad_token_id": None, "is_decoder": True,
             "initializer_range": 0.01, "dtype": "bfloat16", "rope_scaling": None}
    assert GPTNeoXConfig.from_hf_dict({**PYTHIA_160M, **extra}) == \
        GPTNeoXConfig.from_hf_dict(PYTHIA_160M)


def test_config_missing_size_named():
    d = dict(PYTHIA_160M)
    del d["intermediate_size"]
    with pytest.raises(ValueError, match="cfg.json: missing gpt_neox config key "
                                         "'intermediate_size'"):
        GPTNeoXConfig.from_hf_dict(d, source="cfg.json")


# ------------------------------------------------------------------------------------------
# checkpoints

@pytest.mark.parametrize("kw", [dict(), dict(use_parallel_residual=False, rotary_pct=1.0,
                                             tie_word_embeddings=True)])
def test_load_transformers_checkpoint_and_save_back(tmp_path, kw):
    """A checkpoint transformers saves loads (float32, and bfloat16); gpt2s' save loads back
    into transformers' GPTNeoXForCausalLM with the same logits."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from neox_ckpt import save_hf_neox
    hf, _ = save_hf_neox(tmp_path / "hf", tokenizer=False, vocab_size=97, seed=1, **kw)
    idx = np.random.default_rng(1).integers(0, 97, (2, 7))
    ref = hf.double()(input_ids=torch.from_numpy(idx)).logits.detach().numpy()
    loaded = GPTNeoXForCausalLM.from_safetensors(tmp_path / "hf")
    assert rel_err(loaded.forward(idx)[0], ref) < 1e-5
    assert ("embed_out.weight" in loaded.params) != bool(kw.get("tie_word_embeddings"))
    out = loaded.save_safetensors(tmp_path / "ours")
    back = transformers.GPTNeoXForCausalLM.from_pretrained(out).double().eval()
    assert rel_err(back(input_ids=torch.from_numpy(idx)).logits.detach().numpy(), ref) < 1e-5
    assert GPTNeoXForCausalLM.from_safetensors(out).config == loaded.config
    single = loaded.save_safetensors(tmp_path / "one.safetensors", dtype="bfloat16")
    again = GPTNeoXForCausalLM.from_safetensors(single)
    assert again.config == loaded.config
    assert rel_err(again.forward(idx)[0], ref) < 3e-2   # bfloat16 weights
    hf.to(torch.bfloat16).save_pretrained(tmp_path / "hf16", safe_serialization=True)
    assert GPTNeoXForCausalLM.from_safetensors(tmp_path / "hf16").config == loaded.config


def test_load_refuses_missing_and_unexpected_tensors_skips_buffers(tmp_path):
    cfg, m = make("parallel-quarter", seed=2)
    params = dict(m.params)
    del params["gpt_neox.layers.1.mlp.dense_h_to_4h.bias"]
    save_safetensors(tmp_path / "a", params, cfg, prefix="")
    with pytest.raises(SafetensorsError,
                       match="'gpt_neox.layers.1.mlp.dense_h_to_4h.bias' is missing"):
        GPTNeoXForCausalLM.from_safetensors(tmp_path / "a")
    params = dict(m.params)
    params["gpt_neox.layers.0.extra.weight"] = np.zeros(3, np.float32)
    save_safetensors(tmp_path / "b", params, cfg, prefix="")
    with pytest.raises(SafetensorsError, match="unexpected tensor 'gpt_neox.layers.0.extra"):
        GPTNeoXForCausalLM.from_safetensors(tmp_path / "b")
    # the mask and rotary buffers older transformers saved are skipped
    params = dict(m.params)
    params["gpt_neox.layers.0.attention.bias"] = np.tril(np.ones((4, 4), np.float32))
    params["gpt_neox.layers.0.attention.masked_bias"] = np.array([-1e9], np.float32)
    params["gpt_neox.layers.0.attention.rotary_emb.inv_freq"] = cfg.inv_freq()
    save_safetensors(tmp_path / "c", params, cfg, prefix="")
    got = GPTNeoXForCausalLM.from_safetensors(tmp_path / "c")
    idx = np.array([[1, 2, 3]])
    assert np.array_equal(got.forward(idx)[0], m.forward(idx)[0])
    (tmp_path / "c" / "config.json").write_text(json.dumps({**cfg.to_hf_dict(), "foo": 1}))
    with pytest.raises(ValueError, match="unknown key 'foo'"):
        GPTNeoXForCausalLM.from_safetensors(tmp_path / "c")


def test_tied_head_saved_anyway_must_equal_the_embedding(tmp_path):
    cfg, m = make("sequential-full-tied", seed=3)
    params = dict(m.params)
    params["embed_out.weight"] = params["gpt_neox.embed_in.weight"].copy()
    save_safetensors(tmp_path / "a", params, cfg, prefix="")
    assert GPTNeoXForCausalLM.from_safetensors(tmp_path / "a").config == cfg
    params["embed_out.weight"] = params["embed_out.weight"] + 1
    save_safetensors(tmp_path / "b", params, cfg, prefix="")
    with pytest.raises(SafetensorsError, match="differs from 'gpt_neox.embed_in.weight'"):
        GPTNeoXForCausalLM.from_safetensors(tmp_path / "b")


def test_refuses_bad_inputs():
    cfg, m = make("parallel-quarter")
    with pytest.raises(ValueError, match="token id 61 at \\(0, 1\\)"):
        m.forward(np.array([[1, 61]]))
    with pytest.raises(RuntimeError, match="backward\\(\\) needs a forward"):
        m.backward()
    with pytest.raises(TypeError, match="config must be a GPTNeoXConfig"):
        GPTNeoXForCausalLM(gpt2s.LlamaConfig(vocab_size=10, hidden_size=8,
                                             intermediate_size=8, num_hidden_layers=1,
                                             num_attention_heads=2))
