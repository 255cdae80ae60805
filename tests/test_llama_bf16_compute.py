"""bfloat16 compute (``compute_dtype="bfloat16"``) for the Llama family (Llama, Qwen2) and
GPT-NeoX: every product of the forward and the backward with its operands rounded to
bfloat16 and float32 sums, the rest float32 (as tests/test_bf16_compute.py checks for GPT-2).

Checked against a NumPy float64 reference of the same rounded computation: for Llama / Qwen2
a whole model written here from tests/ref_llama.py's pieces (RMSNorm, rotary, SwiGLU,
grouped-query attention), for GPT-NeoX tests/ref_neox.py with its linear layers and head
rounded; the rounding is test_bf16_compute.py's (float64 frexp / rint, independent of the
kernels' bit tricks).  The same reference with exact products is first checked against the
float32 model (so the reference itself is right), then the bfloat16 model is held to the
bounds of the GPT-2 test (the loss within 3e-5 relative of the rounded reference, each
gradient tensor within 6e-3 relative, on average at most half the distance of the unrounded
float32 computation), and the loss within 1e-2 relative of float32's."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

import ref
import ref_neox
from ref_llama import (default_inv_freq, glu, glu_backward, gqa_attention,
                       gqa_attention_backward, rmsnorm, rmsnorm_backward, rotary,
                       rotary_backward)
from test_bf16_compute import as_bits, bf16

from gpt2s import AdamW, AutoModelForCausalLM, _core
from gpt2s.llama import LlamaForCausalLM
from gpt2s.llama_config import LlamaConfig
from gpt2s.neox import GPTNeoXForCausalLM
from gpt2s.neox_config import GPTNeoXConfig

VARIANTS = _core.bf16_compute_variants() + ("reference",)

LLAMA = {
    # grouped-query attention (2 key/value heads for 4), untied head
    "llama-gqa": dict(vocab_size=61, hidden_size=32, intermediate_size=48,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2),
    # Qwen2: biases on q, k, v; a tied head
    "qwen2-tied": dict(vocab_size=50, hidden_size=48, intermediate_size=64,
                       num_hidden_layers=2, num_attention_heads=6, num_key_value_heads=3,
                       model_type="qwen2", tie_word_embeddings=True),
}
NEOX = {
    # Pythia's block: parallel residual, a quarter of each head rotated, untied head
    "neox-parallel": dict(vocab_size=61, hidden_size=32, intermediate_size=48,
                          num_hidden_layers=2, num_attention_heads=4),
    # sequential residual, the whole head rotated, tied head
    "neox-sequential-tied": dict(vocab_size=50, hidden_size=48, intermediate_size=64,
                                 num_hidden_layers=2, num_attention_heads=6, rotary_pct=1.0,
                                 use_parallel_residual=False, tie_word_embeddings=True),
}


@pytest.fixture(params=VARIANTS)
def variant(request, every_kernel_parallel):
    """Every route of the bfloat16 products this CPU runs, and the scalar reference GEMM
    through the vdpbf16ps route (the portable route rounds the head's and the products'
    output gradients in place: this also checks the residual gradient is not)."""
    previous = _core.set_bf16_compute_variant(request.param)
    yield request.param
    _core.set_bf16_compute_variant(previous)


def make(name, seed=0):
    """(config, model) of LLAMA or NEOX's name, with norms and biases away from 1 and 0 and
    larger weights than the 0.02 init (logits that differ, products that round)."""
    if name in LLAMA:
        cfg = LlamaConfig(**LLAMA[name])
        m = LlamaForCausalLM.from_config(cfg, seed=seed)
    else:
        cfg = GPTNeoXConfig(**NEOX[name])
        m = GPTNeoXForCausalLM.from_config(cfg, seed=seed)
    rng = np.random.default_rng(seed + 1)
    for p in m.params.values():
        p[...] = (p * 2.0 + rng.normal(0, 0.05, p.shape)).astype(np.float32)
        if p.ndim == 1:
            p += 1.0
    return cfg, m


def batch(cfg, seed=7, B=2, T=13):
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, cfg.vocab_size, (B, T))
    targets = rng.integers(0, cfg.vocab_size, (B, T))
    targets[0, :3] = -1
    return idx, targets


# ---------------------------------------------------------------------- the float64 references

def _products(rounded):
    """(mm, lin, lin_backward): a product of two operands in float64, both rounded to
    bfloat16 first when rounded; an nn.Linear (y = x W^T + b) and its backward on it."""
    def mm(a, b):
        return bf16(a) @ bf16(b) if rounded else np.asarray(a, np.float64) @ b

    def lin(x, w, b=None):
        y = mm(x.reshape(-1, x.shape[-1]), w.T).reshape(*x.shape[:-1], w.shape[0])
        return y if b is None else y + b

    def lin_backward(dy, x, w):
        x2, dy2 = x.reshape(-1, x.shape[-1]), dy.reshape(-1, dy.shape[-1])
        return (mm(dy2, w).reshape(*dy.shape[:-1], w.shape[1]), mm(dy2.T, x2),
                dy2.sum(axis=0))
    return mm, lin, lin_backward


def llama_loss_and_grads(cfg, params, idx, targets, rounded):
    """A Llama / Qwen2 model's loss and gradients in float64 (transformers' LlamaForCausalLM
    from ref_llama's pieces), every product rounded to bfloat16 operands when rounded."""
    _, lin, lin_backward = _products(rounded)
    P = {k: np.asarray(v, np.float64) for k, v in params.items()}
    B, T = idx.shape
    N, NH, NKV, HS = B * T, cfg.n_head, cfg.n_kv_head, cfg.head_dim
    eps, act = cfg.rms_norm_eps, ref.ACTIVATIONS[cfg.hidden_act]
    inv = default_inv_freq(HS, cfg.rope_theta)
    pos = np.tile(np.arange(T), B)
    scale = 1.0 / np.sqrt(HS)
    pre = "model.layers."
    x = P["model.embed_tokens.weight"][idx.reshape(-1)]
    kept = []
    for l in range(cfg.n_layer):
        w = {k[len(f"{pre}{l}."):]: v for k, v in P.items() if k.startswith(f"{pre}{l}.")}
        a1, c1 = rmsnorm(x, w["input_layernorm.weight"], eps)
        q, k, v = (lin(a1, w[f"self_attn.{n}_proj.weight"], w.get(f"self_attn.{n}_proj.bias"))
                   for n in "qkv")
        q = rotary(q, pos, inv, NH, HS)
        k = rotary(k, pos, inv, NKV, HS)
        y, ac = gqa_attention(q.reshape(B, T, -1), k.reshape(B, T, -1), v.reshape(B, T, -1),
                              NH, NKV, scale)
        y = y.reshape(N, -1)
        h = x + lin(y, w["self_attn.o_proj.weight"])
        a2, c2 = rmsnorm(h, w["post_attention_layernorm.weight"], eps)
        gu = np.concatenate([lin(a2, w["mlp.gate_proj.weight"]),
                             lin(a2, w["mlp.up_proj.weight"])], axis=-1)
        g = glu(gu, act)
        kept.append(dict(w=w, x=x, a1=a1, c1=c1, y=y, ac=ac, h=h, a2=a2, c2=c2, gu=gu, g=g))
        x = h + lin(g, w["mlp.down_proj.weight"])
    lnf, cf = rmsnorm(x, P["model.norm.weight"], eps)
    tied = cfg.tie_word_embeddings
    head = P["model.embed_tokens.weight"] if tied else P["lm_head.weight"]
    logits = lin(lnf, head)
    loss, dlogits = ref.cross_entropy(logits.reshape(B, T, -1), targets)
    dlogits = dlogits.reshape(N, -1)

    grads = {}
    dlnf, dhead, _ = lin_backward(dlogits, lnf, head)
    dx, grads["model.norm.weight"] = rmsnorm_backward(dlnf, P["model.norm.weight"], cf)
    for l in reversed(range(cfg.n_layer)):
        c, w, name = kept[l], kept[l]["w"], f"{pre}{l}."
        dg, grads[name + "mlp.down_proj.weight"], _ = lin_backward(
            dx, c["g"], w["mlp.down_proj.weight"])
        dgu = glu_backward(dg, c["gu"], act)
        I = dgu.shape[-1] // 2
        da2g, grads[name + "mlp.gate_proj.weight"], _ = lin_backward(
            dgu[:, :I], c["a2"], w["mlp.gate_proj.weight"])
        da2u, grads[name + "mlp.up_proj.weight"], _ = lin_backward(
            dgu[:, I:], c["a2"], w["mlp.up_proj.weight"])
        dh, grads[name + "post_attention_layernorm.weight"] = rmsnorm_backward(
            da2g + da2u, w["post_attention_layernorm.weight"], c["c2"])
        dh = dx + dh
        dy, grads[name + "self_attn.o_proj.weight"], _ = lin_backward(
            dh, c["y"], w["self_attn.o_proj.weight"])
        dq, dk, dv = gqa_attention_backward(dy.reshape(B, T, -1), c["ac"])
        dq = rotary_backward(dq.reshape(N, -1), pos, inv, NH, HS)
        dk = rotary_backward(dk.reshape(N, -1), pos, inv, NKV, HS)
        da1 = 0.0
        for n, d in zip("qkv", (dq, dk, dv.reshape(N, -1))):
            dai, grads[f"{name}self_attn.{n}_proj.weight"], db = lin_backward(
                d, c["a1"], w[f"self_attn.{n}_proj.weight"])
            if f"self_attn.{n}_proj.bias" in w:
                grads[f"{name}self_attn.{n}_proj.bias"] = db
            da1 = da1 + dai
        dx1, grads[name + "input_layernorm.weight"] = rmsnorm_backward(
            da1, w["input_layernorm.weight"], c["c1"])
        dx = dh + dx1
    demb = np.zeros_like(P["model.embed_tokens.weight"])
    np.add.at(demb, idx.reshape(-1), dx)
    if tied:
        demb += dhead
    else:
        grads["lm_head.weight"] = dhead
    grads["model.embed_tokens.weight"] = demb
    return loss, grads


def neox_loss_and_grads(cfg, params, idx, targets, rounded):
    """tests/ref_neox.py's loss and gradients with its linear layers and its head on
    bfloat16-rounded operands when rounded (its products made through the module's _lin and
    _lin_backward, swapped for the rounded ones while it runs; the head's three products
    take the rounded logits' inputs from its cache)."""
    mm, lin, lin_backward = _products(rounded)
    kw = dict(n_head=cfg.n_head, rotary_pct=cfg.rotary_pct, rotary_base=cfg.rotary_emb_base,
              eps=cfg.layer_norm_eps, parallel=cfg.use_parallel_residual,
              activation=cfg.hidden_act)
    saved = ref_neox._lin, ref_neox._lin_backward
    ref_neox._lin, ref_neox._lin_backward = lin, lin_backward
    try:
        _, _, cache = ref_neox.forward(params, idx, targets, **kw)
        lnf, head = cache["lnf"], cache["head"]
        B, T, C = lnf.shape
        logits = mm(lnf.reshape(-1, C), head.T).reshape(B, T, -1)
        loss, dlogits = ref.cross_entropy(logits, targets)
        if rounded:   # ref_neox.backward's head products: dlogits @ head, dlogits^T @ lnf
            dlogits, cache["head"], cache["lnf"] = bf16(dlogits), bf16(head), bf16(lnf)
        cache["dlogits"] = dlogits
        grads = ref_neox.backward(cache)
    finally:
        ref_neox._lin, ref_neox._lin_backward = saved
    return loss, grads


def reference(name, cfg, m, idx, targets, rounded):
    f = llama_loss_and_grads if name in LLAMA else neox_loss_and_grads
    return f(cfg, {k: np.asarray(v) for k, v in m.params.items()}, idx, targets, rounded)


# ---------------------------------------------------------------------- whole model

@pytest.mark.parametrize("name", list(LLAMA) + list(NEOX))
def test_the_reference_is_the_float32_model(name):
    """The float64 reference with exact products is what the float32 model computes (so the
    rounded one below differs from it by the rounding only)."""
    cfg, m = make(name)
    idx, targets = batch(cfg)
    loss, grads = reference(name, cfg, m, idx, targets, rounded=False)
    m.zero_grad()
    _, got = m.forward(idx, targets)
    m.backward()
    assert abs(got - loss) <= 1e-5 * abs(loss)
    assert set(grads) == set(m.grads)
    for k, g in grads.items():
        assert ref.rel_err(m.grads[k], g) <= 1e-4, k


@pytest.mark.parametrize("name", list(LLAMA) + list(NEOX))
def test_model_matches_the_rounded_float64_reference(variant, name):
    cfg, m = make(name)
    idx, targets = batch(cfg)
    want_loss, want = reference(name, cfg, m, idx, targets, rounded=True)
    exact_loss, exact = reference(name, cfg, m, idx, targets, rounded=False)
    m.zero_grad()
    _, plain_loss = m.forward(idx, targets)   # float32
    m.backward()
    plain = {k: g.copy() for k, g in m.grads.items()}
    m.compute_dtype = "bfloat16"
    m.zero_grad()
    _, loss = m.forward(idx, targets)
    m.backward()
    # the bounds of tests/test_bf16_compute.py's GPT-2 test: float32 activations round to a
    # different bfloat16 now and then where the float64 ones sit near a rounding boundary,
    # and each flip spreads; the model follows the rounded reference several times closer
    # than the unrounded computation is to it
    assert abs(loss - want_loss) <= 3e-5 * abs(want_loss), (loss, want_loss)
    assert abs(plain_loss - want_loss) > 10 * abs(loss - want_loss)
    assert abs(loss - exact_loss) <= 1e-2 * abs(exact_loss)
    ratios = []
    for k, g in m.grads.items():
        err = ref.rel_err(g, want[k])
        assert err <= 6e-3, f"{k}: {err:.2e} from the rounded reference"
        # and from the exact gradients no farther than the ideal rounded computation is
        # (float64 sums), with room for the flips above
        assert ref.rel_err(g, exact[k]) <= 1.5 * ref.rel_err(want[k], exact[k]) + 1e-3, k
        ratios.append(err / ref.rel_err(plain[k], want[k]))
    assert np.mean(ratios) <= 0.5, f"mean error ratio (ours / unrounded) {np.mean(ratios):.2f}"


@pytest.mark.parametrize("name", ["llama-gqa", "neox-parallel"])
def test_loss_within_1e2_of_float32(name):
    cfg, m = make(name)
    idx, targets = batch(cfg, B=4, T=64)
    _, loss32 = m.forward(idx, targets, for_backward=False)
    m.compute_dtype = "bfloat16"
    _, loss16 = m.forward(idx, targets, for_backward=False)
    assert loss16 != loss32
    assert abs(loss16 - loss32) <= 1e-2 * abs(loss32)


@pytest.mark.parametrize("name", ["llama-gqa", "neox-sequential-tied"])
def test_float32_default_is_unchanged(name):
    """float32 is the default, keeps no copy, and switching to bfloat16 and back gives the
    float32 numbers again bit for bit (training forward, backward, inference, decoding)."""
    cfg, m = make(name)
    idx, targets = batch(cfg)

    def everything():
        m.zero_grad()
        logits, loss = m.forward(idx, targets)
        logits = logits.copy()
        m.backward()
        grads = m.store.grad_buffer.copy()
        infer, _ = m.forward(idx)
        gen = m.generate(idx[:, :4], 5, temperature=0)
        return logits, loss, grads, infer.copy(), gen

    assert m.compute_dtype == "float32" and m.store.compute_buffer is None
    before = everything()
    m.compute_dtype = "bfloat16"
    during = everything()
    assert during[1] != before[1] and not np.array_equal(during[2], before[2])
    m.compute_dtype = "float32"
    assert m.store.compute_buffer is None and m.store.compute_params is None
    if name in LLAMA:   # the one-call inference plan again (NeoX's blocks have none)
        assert m._inference_plan() is not None
    after = everything()
    for a, b in zip(before, after):
        assert np.array_equal(a, b)


@pytest.mark.parametrize("name", ["llama-gqa", "neox-parallel"])
def test_adamw_refreshes_the_bf16_copies(name):
    cfg, a = make(name, seed=4)
    _, b = make(name, seed=4)
    idx, targets = batch(cfg)
    b.compute_dtype = "bfloat16"
    before = b.store.compute_buffer.copy()
    opt_a, opt_b = AdamW(a, lr=1e-2), AdamW(b, lr=1e-2)
    for _ in range(2):
        b.zero_grad()
        b.forward(idx, targets)
        b.backward()
        # the same gradients into the float32-compute model: the same update
        a.store.grad_buffer[...] = b.store.grad_buffer
        opt_a.step()
        opt_b.step()
        # the master weights are updated exactly as without the copy, and the copy is
        # bf16(master) after each step
        assert np.array_equal(a.store.buffer, b.store.buffer)
        assert np.array_equal(b.store.compute_buffer, as_bits(b.store.buffer))
        for k, bits in b.store.compute_params.items():
            assert np.array_equal(bits, as_bits(b.params[k])), k
    assert not np.array_equal(b.store.compute_buffer, before)
    # and the next forward reads it: a fresh model on the same weights computes the same
    _, fresh = make(name, seed=4)
    fresh.store.buffer[...] = b.store.buffer
    fresh.compute_dtype = "bfloat16"
    assert np.array_equal(fresh.forward(idx)[0], b.forward(idx)[0])


@pytest.mark.parametrize("name", ["llama-gqa", "qwen2-tied", "neox-parallel"])
def test_constructors_storage_and_errors(tmp_path, name):
    cfg, m = make(name)
    cls = type(m)
    idx = np.arange(9)[None] % cfg.vocab_size
    m.compute_dtype = "bfloat16"
    want = m.forward(idx)[0]
    m.save_safetensors(tmp_path)
    for loaded in (cls.from_safetensors(tmp_path, compute_dtype="bfloat16"),
                   cls.from_pretrained(str(tmp_path), compute_dtype="bfloat16"),
                   AutoModelForCausalLM.from_pretrained(tmp_path, compute_dtype="bfloat16")):
        assert type(loaded) is cls and loaded.compute_dtype == "bfloat16"
        assert np.array_equal(loaded.forward(idx)[0], want)
    fresh = cls.from_config(cfg, seed=0, compute_dtype="bfloat16")
    assert fresh.compute_dtype == "bfloat16" and fresh.store.compute_buffer is not None
    with pytest.raises(ValueError, match="compute_dtype"):
        m.compute_dtype = "float16"
    with pytest.raises(ValueError, match="int8"):
        m.to_dtype("int8").compute_dtype = "bfloat16"
    # a bfloat16-storage model computes on its own stored weights: the numbers of a float32
    # model holding the same (rounded) weights
    b = m.to_dtype("bfloat16")
    b.compute_dtype = "bfloat16"
    w = b.to_dtype("float32")
    w.compute_dtype = "bfloat16"
    assert np.array_equal(b.forward(idx)[0], w.forward(idx)[0])
    # and not the bfloat16 storage's own float32-activation products
    b.compute_dtype = "float32"
    assert not np.array_equal(b.forward(idx)[0], w.forward(idx)[0])


@pytest.mark.parametrize("name", ["llama-gqa", "neox-parallel"])
def test_generate_greedy_with_bf16_compute(name):
    _, m = make(name)
    m.compute_dtype = "bfloat16"
    out = m.generate([[1, 2, 3]], 6, temperature=0)
    # the cached decode (one bfloat16 product per new row) equals the full forward on the
    # same tokens, step by step
    for t in range(3, out.shape[1]):
        logits, _ = m.forward(out[:, :t])
        assert out[0, t] == int(np.argmax(logits[0, -1]))


# ---------------------------------------------------------------------- CLI

@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    from llama_ckpt import save_hf
    from neox_ckpt import save_hf_neox
    root = tmp_path_factory.mktemp("ckpts")
    save_hf(root / "llama", vocab_size=300)
    save_hf_neox(root / "neox", vocab_size=300)
    return root


@pytest.mark.parametrize("family", ["llama", "neox"])
def test_train_and_generate_cli(checkpoints, tmp_path, family, capsys):
    from gpt2s import generate as gen_cli
    from gpt2s import train as train_cli
    data = tmp_path / "data.txt"
    data.write_text("To be, or not to be, that is the question. " * 40)
    out = tmp_path / "run"
    argv = [str(data), "--out", str(out), "--model", str(checkpoints / family), "--steps", "2",
            "--batch-size", "2", "--seq-len", "16", "--quiet", "--no-plot",
            "--val-fraction", "0"]
    assert train_cli.main(argv + ["--compute-dtype", "bfloat16"]) == 0
    state = json.loads((out / "train_state.json").read_text())
    assert state["run"]["compute_dtype"] == "bfloat16"
    # the run's losses are bfloat16's: a float32 run of the same data logs others
    out32 = tmp_path / "run32"
    assert train_cli.main([*argv[:1], "--out", str(out32), *argv[3:]]) == 0
    bf16_rows, f32_rows = _losses(out), _losses(out32)
    assert len(bf16_rows) == len(f32_rows) == 2 and bf16_rows != f32_rows
    capsys.readouterr()
    assert gen_cli.main(["--model", str(out), "-n", "3", "--temperature", "0",
                         "--compute-dtype", "bfloat16", "To be"]) == 0
    assert capsys.readouterr().out.strip()
    # int8 weights have no bfloat16 copy to compute on: refused, naming both
    assert gen_cli.main(["--model", str(checkpoints / family), "--dtype", "int8",
                         "--compute-dtype", "bfloat16", "-n", "2", "To be"]) == 2
    err = capsys.readouterr().err
    assert "--compute-dtype bfloat16" in err and "int8" in err, err


def _losses(out: Path) -> list:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [(r["train_loss"], r["grad_norm"]) for r in rows if r["type"] == "train"]
