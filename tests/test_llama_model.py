"""gpt2s.llama (LlamaConfig, LlamaForCausalLM) against transformers' LlamaForCausalLM on random
tiny configs, in float64: logits, loss, every gradient, the KV-cache decode path; the rotary
inverse frequencies (default, linear, llama3) against transformers' own; the config's
refusals."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest

import gpt2s
from gpt2s.llama import LlamaForCausalLM
from gpt2s.llama_config import LlamaConfig

from ref import rel_err

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
          "high_freq_factor": 4.0, "original_max_position_embeddings": 16}

CONFIGS = {
    # GQA ratio 2, tied head
    "gqa2-tied": dict(vocab_size=61, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True),
    # GQA ratio 3, untied, llama3 rope scaling, head_dim set apart from hidden / heads
    "gqa3-llama3": dict(vocab_size=50, hidden_size=24, intermediate_size=40,
                        num_hidden_layers=2, num_attention_heads=6, num_key_value_heads=2,
                        head_dim=6, rope_scaling=LLAMA3, rope_theta=500000.0,
                        rms_norm_eps=1e-5),
    # multi-query (ratio 8), linear rope scaling, biases
    "mqa-linear-bias": dict(vocab_size=40, hidden_size=32, intermediate_size=24,
                            num_hidden_layers=1, num_attention_heads=8, num_key_value_heads=1,
                            rope_scaling={"rope_type": "linear", "factor": 4.0},
                            attention_bias=True, mlp_bias=True),
    # multi-head (ratio 1)
    "mha": dict(vocab_size=33, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                num_attention_heads=2, num_key_value_heads=2),
    # Qwen2: q, k, v biases (GQA ratio 4, untied)
    "qwen2": dict(model_type="qwen2", vocab_size=45, hidden_size=32, intermediate_size=40,
                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=1,
                  rope_theta=1000000.0),
}


def _hf_classes(cfg):
    if cfg.model_type == "qwen2":
        return transformers.Qwen2Config, transformers.Qwen2ForCausalLM
    return transformers.LlamaConfig, transformers.LlamaForCausalLM


def _pair(name, seed=0):
    cfg = LlamaConfig(**CONFIGS[name])
    m = LlamaForCausalLM.from_config(cfg, seed=seed)
    rng = np.random.default_rng(seed + 1)
    for p in m.params.values():   # norms and biases away from 1 and 0, larger weights
        p[...] = (p * 5 + rng.normal(0, 0.05, p.shape)).astype(np.float32)
        if p.ndim == 1:
            p += 1.0
    config_class, model_class = _hf_classes(cfg)
    hf_cfg = config_class(**copy.deepcopy(cfg.to_hf_dict()))
    hf = model_class(hf_cfg).double().eval()
    state = {k: torch.from_numpy(v.astype(np.float64)) for k, v in m.params.items()}
    if cfg.tie_word_embeddings:
        state["lm_head.weight"] = state["model.embed_tokens.weight"]
    missing, unexpected = hf.load_state_dict(state, strict=False)
    assert not unexpected and all("rotary_emb" in k for k in missing), (missing, unexpected)
    return cfg, m, hf


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("threads", [1, 2])
def test_forward_backward_match_transformers(name, threads, restore_threads):
    gpt2s.set_num_threads(threads)
    cfg, m, hf = _pair(name)
    rng = np.random.default_rng(7)
    B, T = 2, 11
    idx = rng.integers(0, cfg.vocab_size, (B, T))
    targets = rng.integers(0, cfg.vocab_size, (B, T))
    targets[0, :3] = -1
    out = hf(input_ids=torch.from_numpy(idx), labels=None)
    ref_logits = out.logits.detach().numpy()
    lt = torch.from_numpy(targets)
    ref_loss = torch.nn.functional.cross_entropy(out.logits.reshape(B * T, -1),
                                                 lt.reshape(-1), ignore_index=-1)
    ref_loss.backward()
    logits, loss = m.forward(idx, targets)
    assert rel_err(logits, ref_logits) < 1e-5
    assert abs(loss - ref_loss.item()) / ref_loss.item() < 1e-5
    m.zero_grad()
    m.forward(idx, targets)
    m.backward()
    hf_params = dict(hf.named_parameters())
    for k, g in m.grads.items():
        ref = hf_params[k].grad.numpy()
        assert rel_err(g, ref) < 1e-4, k


@pytest.mark.parametrize("name", ["gqa2-tied", "gqa3-llama3", "qwen2"])
def test_cached_decoding_matches_transformers(name):
    """Prefill of 5 tokens, then one token at a time from the KV cache of KV heads: each
    step's last logits equal transformers' logits over the whole sequence."""
    cfg, m, hf = _pair(name, seed=3)
    rng = np.random.default_rng(4)
    B, T = 2, 9
    idx = rng.integers(0, cfg.vocab_size, (B, T))
    ref = hf(input_ids=torch.from_numpy(idx)).logits.detach().numpy()
    cache = m.kv_cache(B, 12)
    assert cache.keys.shape == (cfg.n_layer, B, 12, cfg.kv_width)
    got = [m.forward_cached(idx[:, :5], 0, cache)]
    for t in range(5, T):
        got.append(m.forward_cached(idx[:, t:t + 1], t, cache))
    for step, t in enumerate(range(4, T)):
        assert rel_err(got[step], ref[:, t]) < 1e-5, t
    # the forward without cache agrees too
    logits, _ = m.forward(idx)
    assert rel_err(logits, ref) < 1e-5


@pytest.mark.parametrize("rope_scaling", [None, {"rope_type": "linear", "factor": 2.5},
                                          dict(LLAMA3, original_max_position_embeddings=256)])
@pytest.mark.parametrize("head_dim", [8, 64, 128])
def test_inv_freq_matches_transformers(rope_scaling, head_dim):
    from transformers.models.llama import modeling_llama
    kw = dict(vocab_size=10, hidden_size=head_dim * 2, intermediate_size=8,
              num_hidden_layers=1, num_attention_heads=2, rope_theta=500000.0,
              rope_scaling=rope_scaling)
    ours = LlamaConfig(**kw).inv_freq()
    # (transformers writes rope_theta into the rope_scaling dict it is given: a copy)
    hf = modeling_llama.LlamaRotaryEmbedding(
        transformers.LlamaConfig(**copy.deepcopy(kw))).inv_freq.numpy()
    assert ours.dtype == np.float32 and ours.shape == hf.shape
    # float32 to the last bit, or one ulp (powf)
    assert np.all(np.abs(ours - hf) <= np.spacing(hf)), np.abs(ours / hf - 1).max()


def test_config_reads_both_rope_forms_and_round_trips():
    d4 = {"model_type": "llama", "vocab_size": 10, "hidden_size": 16, "intermediate_size": 8,
          "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 1,
          "rope_theta": 5000.0, "rope_scaling": {"type": "linear", "factor": 2.0},
          "torch_dtype": "bfloat16", "pretraining_tp": 1, "rope_interleaved": False}
    d5 = {k: v for k, v in d4.items() if k not in ("rope_theta", "rope_scaling")}
    d5["rope_parameters"] = {"rope_type": "linear", "factor": 2.0, "rope_theta": 5000.0}
    a, b = LlamaConfig.from_hf_dict(d4), LlamaConfig.from_hf_dict(d5)
    assert a == b and a.rope_theta == 5000.0 and a.rope_scaling["factor"] == 2.0
    assert a.n_kv_head == 1 and a.head_dim == 8
    assert LlamaConfig.from_hf_dict(a.to_hf_dict()) == a
    # transformers reads our dict into the same config
    t = transformers.LlamaConfig(**copy.deepcopy(a.to_hf_dict()))
    assert t.num_key_value_heads == 1 and t.rope_parameters["factor"] == 2.0


BASE = {"model_type": "llama", "vocab_size": 10, "hidden_size": 16, "intermediate_size": 8,
        "num_hidden_layers": 1, "num_attention_heads": 2}


@pytest.mark.parametrize("extra,message", [
    ({"model_type": "gpt_neox"}, "model_type=\"gpt_neox\""),
    ({"sliding_window": 4096, "use_sliding_window": True}, "unknown key 'sliding_window'"),
    ({"num_local_experts": 8}, "unknown key 'num_local_experts'"),
    ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "rope_type='yarn'"),
    ({"rope_scaling": {"rope_type": "dynamic", "factor": 2.0}}, "rope_type='dynamic'"),
    ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, "low_freq_factor"),
    ({"rope_interleaved": True}, "rope_interleaved=true"),
    ({"num_key_value_heads": 3}, "num_key_value_heads=3"),
    ({"head_dim": 7}, "head_dim=7"),
    ({"hidden_act": "mish"}, "hidden_act='mish'"),
    ({"rope_parameters": {"rope_theta": 1e4, "partial_rotary_factor": 0.5}},
     "partial_rotary_factor"),
    ({"quantization_config": {"quant_method": "gptq"}}, "quantization_config"),
    ({"model_type": "qwen2", "use_sliding_window": True, "sliding_window": 64},
     "use_sliding_window=true"),
    ({"model_type": "qwen2", "layer_types": ["sliding_attention"]}, "layer_types"),
    ({"model_type": "qwen2", "attention_bias": True}, "attention_bias=true"),
])
def test_config_refuses_by_name(extra, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace("[", r"\[")):
        LlamaConfig.from_hf_dict({**BASE, **extra}, source="cfg.json")


def test_config_missing_size_named():
    d = dict(BASE)
    del d["intermediate_size"]
    with pytest.raises(ValueError, match="cfg.json: missing llama config key 'intermediate_size'"):
        LlamaConfig.from_hf_dict(d, source="cfg.json")


def test_refuses_bad_token_ids_and_targets():
    m = LlamaForCausalLM.from_config(LlamaConfig(**CONFIGS["mha"]), seed=0)
    with pytest.raises(ValueError, match="token id 33 at \\(0, 1\\)"):
        m.forward(np.array([[1, 33]]))
    with pytest.raises(ValueError, match="targets: -2 at 0"):
        m.forward(np.array([[1, 2]]), np.array([[-2, 1]]))
    with pytest.raises(RuntimeError, match="backward\\(\\) needs a forward"):
        m.backward()


@pytest.mark.parametrize("name", ["gqa3-llama3", "qwen2"])
def test_load_transformers_checkpoint_and_save_back(tmp_path, name):
    """A checkpoint transformers saves (float32 and bfloat16) loads; gpt2s' save loads back
    into transformers' LlamaForCausalLM with the same logits."""
    cfg, m, hf = _pair(name, seed=5)
    idx = np.random.default_rng(1).integers(0, cfg.vocab_size, (2, 7))
    ref = hf(input_ids=torch.from_numpy(idx)).logits.detach().numpy()
    hf.float().save_pretrained(tmp_path / "hf", safe_serialization=True)
    loaded = LlamaForCausalLM.from_safetensors(tmp_path / "hf")
    assert loaded.config == cfg
    assert rel_err(loaded.forward(idx)[0], ref) < 1e-5
    for k, v in m.params.items():
        assert np.array_equal(loaded.params[k], v), k
    out = loaded.save_safetensors(tmp_path / "ours")
    back = _hf_classes(cfg)[1].from_pretrained(out).double().eval()
    assert rel_err(back(input_ids=torch.from_numpy(idx)).logits.detach().numpy(), ref) < 1e-5
    # a lone file carries its config
    single = loaded.save_safetensors(tmp_path / "one.safetensors", dtype="bfloat16")
    again = LlamaForCausalLM.from_safetensors(single)
    assert again.config == cfg
    assert rel_err(again.forward(idx)[0], ref) < 3e-2   # bfloat16 weights
    hf.to(torch.bfloat16).save_pretrained(tmp_path / "hf16", safe_serialization=True)
    assert LlamaForCausalLM.from_safetensors(tmp_path / "hf16").config == cfg


def test_load_refuses_missing_and_unexpected_tensors(tmp_path):
    from gpt2s.weights import SafetensorsError
    cfg, m, _ = _pair("mha", seed=2)
    params = dict(m.params)
    del params["model.layers.1.mlp.up_proj.weight"]
    from gpt2s.weights import save_safetensors
    save_safetensors(tmp_path / "a", params, cfg, prefix="")
    with pytest.raises(SafetensorsError, match="'model.layers.1.mlp.up_proj.weight' is missing"):
        LlamaForCausalLM.from_safetensors(tmp_path / "a")
    params = dict(m.params)
    params["model.layers.0.extra.weight"] = np.zeros(3, np.float32)
    save_safetensors(tmp_path / "b", params, cfg, prefix="")
    with pytest.raises(SafetensorsError, match="unexpected tensor 'model.layers.0.extra.weight'"):
        LlamaForCausalLM.from_safetensors(tmp_path / "b")
    (tmp_path / "b" / "config.json").write_text(json.dumps({**cfg.to_hf_dict(), "foo": 1}))
    with pytest.raises(ValueError, match="unknown key 'foo'"):
        LlamaForCausalLM.from_safetensors(tmp_path / "b")


@pytest.mark.parametrize("name", ["gqa2-tied", "gqa3-llama3"])
def test_greedy_generation_matches_transformers(name):
    """Greedy decoding through gpt2s' loop (prefill, then one token at a time from the cache of
    KV heads) gives transformers' greedy tokens; two samples per prompt share the prefill."""
    cfg, m, hf = _pair(name, seed=8)
    prompt = np.random.default_rng(2).integers(0, cfg.vocab_size, (2, 4))
    hf.generation_config.eos_token_id = None   # (no end token: every row runs 10 steps)
    want = hf.generate(torch.from_numpy(prompt), max_new_tokens=10, do_sample=False,
                       attention_mask=torch.ones(prompt.shape, dtype=torch.long),
                       pad_token_id=0).numpy()
    got = m.generate(prompt, 10, temperature=0.0)
    assert np.array_equal(got, want)
    two = m.generate(prompt, 10, temperature=0.0, num_samples=2)
    assert np.array_equal(two, np.repeat(want, 2, axis=0))


def test_adamw_training_steps_match_torch():
    """gpt2s' AdamW (with clipping) runs on the Llama model's store: three steps track
    torch.optim.AdamW on transformers' model (float64), decay on the 2-D tensors only."""
    cfg, m, hf = _pair("gqa2-tied", seed=6)
    rng = np.random.default_rng(6)
    idx = rng.integers(0, cfg.vocab_size, (2, 8))
    targets = rng.integers(0, cfg.vocab_size, (2, 8))
    # eps 1e-6: Adam turns any gradient far above eps into a step of ~lr whatever its size,
    # so a gradient at float32's noise level (1e-8) would be a full step on one side only
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
        tloss = torch.nn.functional.cross_entropy(out.logits.reshape(16, -1),
                                                  torch.from_numpy(targets).reshape(-1))
        tloss.backward()
        torch.nn.utils.clip_grad_norm_(hf.parameters(), 1.0)
        topt.step()
        assert abs(loss - tloss.item()) / tloss.item() < 1e-5
    for k, v in m.params.items():
        assert rel_err(v, named[k].detach().numpy()) < 1e-5, k


def test_qwen2_config_as_transformers_writes_it():
    """A Qwen2.5-style config.json (sliding window present but off) reads; its biases are on
    q, k, v only."""
    d = transformers.Qwen2Config(vocab_size=20, hidden_size=16, intermediate_size=8,
                                 num_hidden_layers=2, num_attention_heads=2,
                                 num_key_value_heads=1, sliding_window=32,
                                 use_sliding_window=False, max_window_layers=1,
                                 tie_word_embeddings=True).to_dict()
    cfg = LlamaConfig.from_hf_dict(json.loads(json.dumps(d)))
    assert cfg.model_type == "qwen2" and cfg.qkv_bias and not cfg.o_bias
    assert "model.layers.0.self_attn.k_proj.bias" in dict(
        (n, s) for n, s, _ in cfg.param_layout()[0])
    assert not any(n.endswith(("o_proj.bias", "mlp.up_proj.bias"))
                   for n, _, _ in cfg.param_layout()[0])


def test_forward_cached_refuses_a_cache_or_position_that_does_not_fit():
    m = LlamaForCausalLM.from_config(LlamaConfig(**CONFIGS["gqa2-tied"]), seed=0)
    cache = m.kv_cache(2, 8)
    with pytest.raises(ValueError, match="outside the KV cache's 8 positions"):
        m.forward_cached(np.array([[1, 2], [3, 4]]), 7, cache)
    with pytest.raises(ValueError, match="does not fit this model"):
        m.forward_cached(np.array([[1]] * 3), 0, cache)
    with pytest.raises(TypeError, match="pos0 must be an integer"):
        m.forward_cached(np.array([[1], [2]]), 1.0, cache)
    with pytest.raises(TypeError, match="cache must be a KVCache"):
        m.forward_cached(np.array([[1], [2]]), 0, None)
    other = LlamaForCausalLM.from_config(LlamaConfig(**CONFIGS["qwen2"]),
                                         seed=0).kv_cache(2, 8)   # kv_width 8
    with pytest.raises(ValueError, match="kv_width=16"):
        m.forward_cached(np.array([[1], [2]]), 0, other)


def test_checkpoint_with_both_rope_forms(tmp_path):
    """A transformers 5 save with the legacy rope_theta added beside rope_parameters (as the
    benchmark's smollm2-135m-random is written) loads; a disagreeing pair is refused."""
    cfg, m, hf = _pair("gqa2-tied", seed=9)
    hf.float().save_pretrained(tmp_path, safe_serialization=True)
    path = tmp_path / "config.json"
    d = json.loads(path.read_text())
    assert "rope_parameters" in d
    d["rope_theta"] = d["rope_parameters"]["rope_theta"]
    path.write_text(json.dumps(d))
    loaded = LlamaForCausalLM.from_safetensors(tmp_path)
    assert loaded.config == cfg
    idx = np.random.default_rng(0).integers(0, cfg.vocab_size, (1, 6))
    ref = hf.double()(input_ids=torch.from_numpy(idx)).logits.detach().numpy()
    assert rel_err(loaded.forward(idx)[0], ref) < 1e-5
    d["rope_theta"] = 5.0
    path.write_text(json.dumps(d))
    with pytest.raises(ValueError, match="rope_theta=5.0 is not supported: it differs"):
        LlamaForCausalLM.from_safetensors(tmp_path)
