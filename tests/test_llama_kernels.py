"""The kernels of the Llama / Qwen2 / GPT-NeoX blocks against the float64 reference
(tests/ref_llama.py, itself checked by finite differences here) and, where installed, against
PyTorch autograd and transformers' own functions (LlamaRMSNorm, LlamaRotaryEmbedding,
apply_rotary_pos_emb, repeat_kv): RMSNorm, rotary position embeddings (full and partial, at
any positions), gated linear units (SwiGLU) and grouped-query attention (training and the KV
cache of KV heads), forward and backward, on one and two threads with every kernel on its
parallel path."""

from __future__ import annotations

import numpy as np
import pytest

import gpt2s
from gpt2s import _core

import ref
import ref_llama as rl
from ref import rel_err

FWD_TOL = 2e-6     # float32 kernels against float64, L2-relative
GRAD_TOL = 2e-6


@pytest.fixture(params=[1, 2], ids=["1thread", "2threads"])
def threads(request, every_kernel_parallel):
    gpt2s.set_num_threads(request.param)
    return request.param


def f32(rng, *shape):
    return rng.standard_normal(shape).astype(np.float32)


def numgrad(f, x, dy, h=1e-6):
    """d/dx of sum(f(x) * dy) by central differences, float64."""
    g = np.zeros_like(x)
    it = np.nditer(x, flags=["multi_index"])
    for _ in it:
        i = it.multi_index
        old = x[i]
        x[i] = old + h
        up = (f(x) * dy).sum()
        x[i] = old - h
        down = (f(x) * dy).sum()
        x[i] = old
        g[i] = (up - down) / (2 * h)
    return g


# ------------------------------------------------------------------------------------------
# the reference's hand-written backward, by finite differences

def test_reference_backwards_match_finite_differences():
    rng = np.random.default_rng(0)
    x, w, dy = rng.standard_normal((3, 7)), rng.standard_normal(7), rng.standard_normal((3, 7))
    y, cache = rl.rmsnorm(x, w, 1e-5)
    dx, dw = rl.rmsnorm_backward(dy, w, cache)
    assert rel_err(dx, numgrad(lambda a: rl.rmsnorm(a, w, 1e-5)[0], x, dy)) < 1e-7
    assert rel_err(dw, numgrad(lambda a: rl.rmsnorm(x, a, 1e-5)[0], w.copy(), dy)) < 1e-7

    pos = np.array([0, 3, 17])
    inv = rl.default_inv_freq(4, 10000.0)
    x, dy = rng.standard_normal((3, 2 * 5 + 1)), rng.standard_normal((3, 2 * 5 + 1))
    dx = rl.rotary_backward(dy, pos, inv, 2, 5, 1)
    assert rel_err(dx, numgrad(lambda a: rl.rotary(a, pos, inv, 2, 5, 1), x, dy)) < 1e-7

    act = ref.ACTIVATIONS["silu"]
    x, dy = rng.standard_normal((3, 8)), rng.standard_normal((3, 4))
    assert rel_err(rl.glu_backward(dy, x, act),
                   numgrad(lambda a: rl.glu(a, act), x, dy)) < 1e-7

    B, T, NH, NKV, HS = 2, 4, 4, 2, 3
    q = rng.standard_normal((B, T, NH * HS))
    k = rng.standard_normal((B, T, NKV * HS))
    v = rng.standard_normal((B, T, NKV * HS))
    dy = rng.standard_normal((B, T, NH * HS))
    y, cache = rl.gqa_attention(q, k, v, NH, NKV, 0.4)
    dq, dk, dv = rl.gqa_attention_backward(dy, cache)
    assert rel_err(dq, numgrad(lambda a: rl.gqa_attention(a, k, v, NH, NKV, 0.4)[0], q, dy)) < 1e-7
    assert rel_err(dk, numgrad(lambda a: rl.gqa_attention(q, a, v, NH, NKV, 0.4)[0], k, dy)) < 1e-7
    assert rel_err(dv, numgrad(lambda a: rl.gqa_attention(q, k, a, NH, NKV, 0.4)[0], v, dy)) < 1e-7


# ------------------------------------------------------------------------------------------
# RMSNorm

@pytest.mark.parametrize("N,C", [(1, 1), (5, 7), (33, 64), (3, 100)])
def test_rmsnorm_forward_backward(threads, N, C):
    rng = np.random.default_rng(C)
    x, w = f32(rng, N, C) * 3, f32(rng, C)
    eps = 1e-6
    y, cache = rl.rmsnorm(x, w, eps)
    out, rstd = np.full((N, C), np.nan, np.float32), np.full(N, np.nan, np.float32)
    _core.rmsnorm_forward(out, rstd, x, w, eps)
    assert rel_err(out, y) < FWD_TOL
    assert rel_err(rstd, cache[1][:, 0]) < FWD_TOL
    out2 = np.empty_like(out)
    _core.rmsnorm_forward(out2, np.empty(0, np.float32), x, w, eps)
    assert np.array_equal(out, out2)

    # fused with the residual add
    a, b = f32(rng, N, C), f32(rng, N, C)
    res, out3, r3 = (np.empty((N, C), np.float32), np.empty((N, C), np.float32),
                     np.empty(N, np.float32))
    _core.residual_rmsnorm_forward(res, out3, r3, a, b, w, eps)
    assert np.array_equal(res, a + b)
    assert rel_err(out3, rl.rmsnorm(res, w, eps)[0]) < FWD_TOL

    # backward accumulates into dinp and dweight
    dy = f32(rng, N, C)
    dx_ref, dw_ref = rl.rmsnorm_backward(dy.astype(np.float64), w, cache)
    scratch = np.empty((gpt2s.get_num_threads(), C), np.float32)
    dinp, dw = np.zeros((N, C), np.float32), np.zeros(C, np.float32)
    _core.rmsnorm_backward(dinp, dw, dy, x, w, rstd, scratch)
    if C > 1:
        assert rel_err(dinp, dx_ref) < GRAD_TOL
    else:   # dx = r g (1 - n^2) with n^2 = x^2 / (x^2 + eps): only eps survives the cancellation
        assert np.abs(dinp - dx_ref).max() < 1e-6 * np.abs(dy * w * rstd[:, None]).max()
    assert rel_err(dw, dw_ref) < GRAD_TOL
    dinp0, dw0 = f32(rng, N, C), f32(rng, C)
    dinp2, dw2 = dinp0.copy(), dw0.copy()
    _core.rmsnorm_backward(dinp2, dw2, dy, x, w, rstd, scratch)
    assert np.allclose(dinp2, dinp0 + dinp, rtol=1e-6, atol=1e-6)   # added, not overwritten
    assert np.allclose(dw2, dw0 + dw, rtol=1e-6, atol=1e-6)


def test_rmsnorm_matches_transformers():
    torch = pytest.importorskip("torch")
    llama = pytest.importorskip("transformers.models.llama.modeling_llama")
    rng = np.random.default_rng(5)
    N, C, eps = 6, 48, 1e-5
    x, w, dy = f32(rng, N, C), f32(rng, C), f32(rng, N, C)
    norm = llama.LlamaRMSNorm(C, eps=eps)
    with torch.no_grad():
        norm.weight.copy_(torch.from_numpy(w))
    xt = torch.from_numpy(x).requires_grad_(True)
    yt = norm(xt)
    yt.backward(torch.from_numpy(dy))
    out, rstd = np.empty((N, C), np.float32), np.empty(N, np.float32)
    _core.rmsnorm_forward(out, rstd, x, w, eps)
    assert rel_err(out, yt.detach().numpy()) < 1e-6
    dinp, dw = np.zeros((N, C), np.float32), np.zeros(C, np.float32)
    _core.rmsnorm_backward(dinp, dw, dy, x, w, rstd, np.empty((1, C), np.float32))
    assert rel_err(dinp, xt.grad.numpy()) < 2e-6
    assert rel_err(dw, norm.weight.grad.numpy()) < 2e-6


# ------------------------------------------------------------------------------------------
# rotary position embeddings

ROTARY_SHAPES = [
    # (N, n_heads, head_dim, rot_dim, col_off, ld)
    (5, 3, 8, 8, 0, 24),        # full
    (4, 2, 16, 4, 0, 32),       # partial (rotary_pct 0.25)
    (3, 2, 7, 4, 5, 20),        # odd head_dim, partial, offset, spare columns
    (1, 6, 64, 64, 0, 6 * 64),  # one row (decoding)
    (70, 4, 10, 10, 0, 40),
    (3, 2, 6, 0, 0, 12),        # nothing rotated
]


@pytest.mark.parametrize("N,nh,hd,rd,off,ld", ROTARY_SHAPES)
def test_rotary_forward_backward(threads, N, nh, hd, rd, off, ld):
    rng = np.random.default_rng(N * 100 + hd)
    x = f32(rng, N, ld)
    pos = rng.integers(0, 5000, N).astype(np.int64)
    pos[0] = 0
    inv = rl.default_inv_freq(rd, 10000.0) if rd else np.empty(0, np.float32)
    want = rl.rotary(x, pos, inv, nh, hd, off)
    got = x.copy()
    _core.rotary_forward(got, pos, inv, off, nh, hd)
    assert rel_err(got, want) < FWD_TOL
    # columns outside the heads, and past rot_dim in each head, are untouched
    same = np.ones(ld, bool)
    for j in range(nh):
        same[off + j * hd:off + j * hd + rd] = False
    assert np.array_equal(got[:, same], x[:, same])

    dy = f32(rng, N, ld)
    dx = dy.copy()
    _core.rotary_backward(dx, pos, inv, off, nh, hd)
    assert rel_err(dx, rl.rotary_backward(dy, pos, inv, nh, hd, off)) < GRAD_TOL
    # backward of forward is the identity (a rotation)
    _core.rotary_backward(got, pos, inv, off, nh, hd)
    assert rel_err(got, x) < FWD_TOL


@pytest.mark.parametrize("rope_scaling,partial", [
    (None, 1.0), ({"rope_type": "linear", "factor": 4.0}, 1.0),
    ({"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
      "original_max_position_embeddings": 64}, 1.0),
    (None, 0.25)])
def test_rotary_matches_transformers(rope_scaling, partial):
    """transformers' own rotary module (its inv_freq, with the rope scaling applied, and its
    cos/sin) and apply_rotary_pos_emb on q (B, NH, T, HS) and k (B, NKV, T, HS), against the
    kernel on the [q | k] row with the module's inv_freq."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from transformers.models.gpt_neox import modeling_gpt_neox as neox
    from transformers.models.llama import modeling_llama as llama
    B, T, NH, NKV, HS = 2, 9, 4, 2, 16
    if partial < 1.0:
        cfg = transformers.GPTNeoXConfig(hidden_size=NH * HS, num_attention_heads=NH,
                                         rotary_pct=partial, max_position_embeddings=4096)
        emb = neox.GPTNeoXRotaryEmbedding(cfg)
        apply = neox.apply_rotary_pos_emb
    else:
        kw = {} if rope_scaling is None else {"rope_scaling": rope_scaling}
        cfg = transformers.LlamaConfig(hidden_size=NH * HS, num_attention_heads=NH,
                                       num_key_value_heads=NKV, max_position_embeddings=4096,
                                       rope_theta=50000.0, **kw)
        emb = llama.LlamaRotaryEmbedding(cfg)
        apply = llama.apply_rotary_pos_emb
    assert float(emb.attention_scaling) == 1.0
    inv = emb.inv_freq.numpy().astype(np.float32)
    rng = np.random.default_rng(3)
    pos = np.stack([np.arange(T) + 1000, np.arange(T) + 3]).astype(np.int64)   # (B, T)
    q, k = f32(rng, B, NH, T, HS), f32(rng, B, NKV, T, HS)
    cos, sin = emb(torch.from_numpy(q), torch.from_numpy(pos))
    qe, ke = apply(torch.from_numpy(q), torch.from_numpy(k), cos, sin)
    row = np.concatenate([q.transpose(0, 2, 1, 3).reshape(B * T, NH * HS),
                          k.transpose(0, 2, 1, 3).reshape(B * T, NKV * HS)], axis=1)
    _core.rotary_forward(row, pos.reshape(-1), inv, 0, NH + NKV, HS)
    want = np.concatenate([qe.numpy().transpose(0, 2, 1, 3).reshape(B * T, NH * HS),
                           ke.numpy().transpose(0, 2, 1, 3).reshape(B * T, NKV * HS)], axis=1)
    assert rel_err(row, want) < 1e-6


# ------------------------------------------------------------------------------------------
# gated linear units

@pytest.mark.parametrize("act", ["silu", "gelu_erf", "gelu_tanh"])
@pytest.mark.parametrize("N,I", [(1, 1), (5, 17), (40, 64)])
def test_glu_forward_backward(threads, act, N, I):
    fns = {"silu": ref.ACTIVATIONS["silu"], "gelu_erf": ref.ACTIVATIONS["gelu"],
           "gelu_tanh": ref.ACTIVATIONS["gelu_new"]}[act]
    rng = np.random.default_rng(N + I)
    inp, dy = f32(rng, N, 2 * I) * 2, f32(rng, N, I)
    out = np.full((N, I), np.nan, np.float32)
    _core.glu_forward(out, inp, act)
    assert rel_err(out, rl.glu(inp, fns)) < FWD_TOL
    dinp = np.full((N, 2 * I), np.nan, np.float32)
    _core.glu_backward(dinp, inp, dy, act)
    assert rel_err(dinp, rl.glu_backward(dy.astype(np.float64), inp, fns)) < GRAD_TOL


def test_swiglu_matches_torch():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(9)
    N, I = 7, 30
    inp, dy = f32(rng, N, 2 * I) * 3, f32(rng, N, I)
    t = torch.from_numpy(inp.astype(np.float64)).requires_grad_(True)
    y = torch.nn.functional.silu(t[:, :I]) * t[:, I:]
    y.backward(torch.from_numpy(dy.astype(np.float64)))
    out, dinp = np.empty((N, I), np.float32), np.empty((N, 2 * I), np.float32)
    _core.glu_forward(out, inp, "silu")
    _core.glu_backward(dinp, inp, dy, "silu")
    assert rel_err(out, y.detach().numpy()) < FWD_TOL
    assert rel_err(dinp, t.grad.numpy()) < GRAD_TOL


def test_neox_gelu_mlp_is_existing_kernels():
    """GPT-NeoX's MLP (dense_h_to_4h, exact GELU, dense_4h_to_h, biases) needs no new kernel:
    matmul_forward on the transposed Linear weights and activation_forward("gelu_erf")
    against transformers' GPTNeoXMLP."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from transformers.models.gpt_neox import modeling_gpt_neox as neox
    C, N = 16, 5
    cfg = transformers.GPTNeoXConfig(hidden_size=C, intermediate_size=4 * C, hidden_act="gelu",
                                     num_attention_heads=2)
    mlp = neox.GPTNeoXMLP(cfg)
    rng = np.random.default_rng(2)
    x = f32(rng, N, C)
    want = mlp(torch.from_numpy(x)).detach().numpy()
    w1 = np.ascontiguousarray(mlp.dense_h_to_4h.weight.detach().numpy().T)
    w2 = np.ascontiguousarray(mlp.dense_4h_to_h.weight.detach().numpy().T)
    h, y = np.empty((N, 4 * C), np.float32), np.empty((N, C), np.float32)
    _core.matmul_forward(h, x, w1, mlp.dense_h_to_4h.bias.detach().numpy())
    _core.activation_forward(h, h, "gelu_erf")
    _core.matmul_forward(y, h, w2, mlp.dense_4h_to_h.bias.detach().numpy())
    assert rel_err(y, want) < 2e-6


# ------------------------------------------------------------------------------------------
# grouped-query attention

GQA_SHAPES = [
    # (B, T, NH, NKV, HS)
    (2, 5, 4, 4, 8),     # multi-head (group 1)
    (2, 7, 6, 2, 5),     # group 3, odd head size
    (1, 70, 8, 2, 4),    # group 4, two query blocks
    (2, 3, 8, 1, 6),     # group 8 (multi-query)
    (3, 1, 4, 2, 8),     # T = 1
]


def _qkv(rng, B, T, NH, NKV, HS):
    return f32(rng, B, T, (NH + 2 * NKV) * HS)


@pytest.mark.parametrize("B,T,NH,NKV,HS", GQA_SHAPES)
def test_gqa_attention_forward_backward(threads, B, T, NH, NKV, HS):
    rng = np.random.default_rng(B * 1000 + T * 10 + NKV)
    C, KVC, scale = NH * HS, NKV * HS, 1.0 / np.sqrt(HS)
    qkv = _qkv(rng, B, T, NH, NKV, HS)
    q, k, v = qkv[..., :C], qkv[..., C:C + KVC], qkv[..., C + KVC:]
    y, cache = rl.gqa_attention(q, k, v, NH, NKV, scale)
    out = np.full((B, T, C), np.nan, np.float32)
    lse = np.full((B, NH, T), np.nan, np.float32)
    _core.attention_forward(out, lse, qkv, 0, qkv, C, qkv, C + KVC, 0, NH, scale, NKV)
    assert rel_err(out, y) < FWD_TOL
    assert rel_err(lse, rl.gqa_attention_lse(q, k, NH, NKV, scale)) < FWD_TOL

    dy = f32(rng, B, T, C)
    dq, dk, dv = rl.gqa_attention_backward(dy, cache)
    dqkv = np.full_like(qkv, np.nan)
    _core.attention_backward(dqkv, dy, out, lse, qkv, NH, scale, NKV)
    for got, want in ((dqkv[..., :C], dq), (dqkv[..., C:C + KVC], dk)):
        if T > 1:
            assert rel_err(got, want) < GRAD_TOL
        else:   # one key: the softmax is 1 whatever q and k are, dq = dk = 0
            assert np.abs(got).max() < 1e-6 and np.abs(want).max() < 1e-12
    assert rel_err(dqkv[..., C + KVC:], dv) < GRAD_TOL


def test_gqa_with_n_kv_head_equal_to_n_head_is_the_mha_kernel(every_kernel_parallel):
    """n_kv_head = n_head runs exactly the multi-head computation (GPT-2's numbers)."""
    rng = np.random.default_rng(4)
    B, T, NH, HS = 2, 70, 3, 8
    C = NH * HS
    qkv = f32(rng, B, T, 3 * C)
    outs = []
    for kv in (None, NH):
        out, lse = np.empty((B, T, C), np.float32), np.empty((B, NH, T), np.float32)
        _core.attention_forward(out, lse, qkv, 0, qkv, C, qkv, 2 * C, 0, NH, 0.3, kv)
        dqkv = np.empty_like(qkv)
        _core.attention_backward(dqkv, out, out, lse, qkv, NH, 0.3, kv)
        outs.append((out, lse, dqkv))
    for a, b in zip(*outs):
        assert np.array_equal(a, b)


@pytest.mark.parametrize("NH,NKV", [(4, 4), (6, 2), (8, 1)])
def test_gqa_decoding_with_a_cache_of_kv_heads(threads, NH, NKV):
    """Prefill then one position at a time: the cache holds only the KV heads (kv_cache_write
    with q_width), rotary at each row's own position, and every step's output equals the
    reference's over the whole sequence."""
    rng = np.random.default_rng(NH + NKV)
    B, T, HS, P = 2, 6, 8, 10
    C, KVC, scale = NH * HS, NKV * HS, 1.0 / np.sqrt(HS)
    qkv = _qkv(rng, B, T, NH, NKV, HS)
    inv = rl.default_inv_freq(HS, 10000.0)
    pos = np.tile(np.arange(T, dtype=np.int64), B)
    roped = rl.rotary(qkv.reshape(B * T, -1), pos, inv, NH + NKV, HS).reshape(qkv.shape)
    want, _ = rl.gqa_attention(roped[..., :C], roped[..., C:C + KVC], roped[..., C + KVC:],
                               NH, NKV, scale)
    kc, vc = np.zeros((B, P, KVC), np.float32), np.zeros((B, P, KVC), np.float32)
    got = np.empty((B, T, C), np.float32)
    empty = np.empty((0, 0, 0), np.float32)
    pre = 4
    steps = [(0, pre)] + [(t, t + 1) for t in range(pre, T)]
    for t0, t1 in steps:
        x = np.ascontiguousarray(qkv[:, t0:t1])
        n = t1 - t0
        _core.rotary_forward(x.reshape(B * n, -1), np.tile(np.arange(t0, t1), B), inv, 0,
                             NH + NKV, HS)
        _core.kv_cache_write(kc, vc, x, t0, C)
        o = np.empty((B, n, C), np.float32)
        _core.attention_forward(o, empty, x, 0, kc, 0, vc, 0, t0, NH, scale, NKV)
        got[:, t0:t1] = o
    assert rel_err(kc[:, :T], roped[..., C:C + KVC]) < FWD_TOL
    assert np.array_equal(vc[:, :T], qkv[..., C + KVC:])
    assert rel_err(got, want) < FWD_TOL


def test_gqa_matches_torch_autograd_with_repeat_kv():
    """Second reference: transformers' repeat_kv and a float64 causal softmax attention under
    torch autograd."""
    torch = pytest.importorskip("torch")
    llama = pytest.importorskip("transformers.models.llama.modeling_llama")
    rng = np.random.default_rng(11)
    B, T, NH, NKV, HS = 2, 9, 6, 2, 4
    C, KVC, scale = NH * HS, NKV * HS, 0.5
    qkv = _qkv(rng, B, T, NH, NKV, HS)
    dy = f32(rng, B, T, C)
    t = torch.from_numpy(qkv.astype(np.float64)).requires_grad_(True)
    q = t[..., :C].reshape(B, T, NH, HS).transpose(1, 2)
    k = llama.repeat_kv(t[..., C:C + KVC].reshape(B, T, NKV, HS).transpose(1, 2), NH // NKV)
    v = llama.repeat_kv(t[..., C + KVC:].reshape(B, T, NKV, HS).transpose(1, 2), NH // NKV)
    s = (q @ k.transpose(-1, -2)) * scale
    s = s.masked_fill(~torch.ones(T, T, dtype=torch.bool).tril(), float("-inf"))
    y = (torch.softmax(s, -1) @ v).transpose(1, 2).reshape(B, T, C)
    y.backward(torch.from_numpy(dy.astype(np.float64)))
    out, lse = np.empty((B, T, C), np.float32), np.empty((B, NH, T), np.float32)
    _core.attention_forward(out, lse, qkv, 0, qkv, C, qkv, C + KVC, 0, NH, scale, NKV)
    dqkv = np.empty_like(qkv)
    _core.attention_backward(dqkv, dy, out, lse, qkv, NH, scale, NKV)
    assert rel_err(out, y.detach().numpy()) < FWD_TOL
    assert rel_err(dqkv, t.grad.numpy()) < GRAD_TOL


# ------------------------------------------------------------------------------------------
# refusals (the fuzzer covers the sizes; these pin the messages)

def test_new_kernels_refuse_bad_arguments_by_name():
    z = np.zeros
    with pytest.raises(ValueError, match="rmsnorm_forward: .*weight \\(5,\\)"):
        _core.rmsnorm_forward(z((2, 4), np.float32), z(2, np.float32), z((2, 4), np.float32),
                              z(5, np.float32), 1e-5)
    with pytest.raises(ValueError, match="rmsnorm_backward: scratch"):
        _core.rmsnorm_backward(z((2, 4), np.float32), z(4, np.float32), z((2, 4), np.float32),
                               z((2, 4), np.float32), z(4, np.float32), z(2, np.float32),
                               z((1, 3), np.float32))
    with pytest.raises(ValueError, match="rotary_forward: position -3 at row 1"):
        _core.rotary_forward(z((2, 8), np.float32), np.array([0, -3]), z(2, np.float32), 0, 2, 4)
    with pytest.raises(ValueError, match="rotary_forward: .*head_dim=4"):
        _core.rotary_forward(z((2, 8), np.float32), np.array([0, 3]), z(3, np.float32), 0, 2, 4)
    with pytest.raises(ValueError, match="rotary_backward: .*col_off=1"):
        _core.rotary_backward(z((2, 8), np.float32), np.array([0, 3]), z(2, np.float32), 1, 2, 4)
    with pytest.raises(ValueError, match="glu_forward: out \\(2, 3\\), inp \\(2, 5\\)"):
        _core.glu_forward(z((2, 3), np.float32), z((2, 5), np.float32), "silu")
    with pytest.raises(ValueError, match="glu_backward: unknown activation kernel 'swish'"):
        _core.glu_backward(z((2, 6), np.float32), z((2, 6), np.float32), z((2, 3), np.float32),
                           "swish")
    qkv = z((1, 3, 4 * 4 + 2 * 2 * 4), np.float32)
    with pytest.raises(ValueError, match="attention_forward: .*n_kv_head=3"):
        _core.attention_forward(z((1, 3, 16), np.float32), z((0, 0, 0), np.float32), qkv, 0,
                                qkv, 16, qkv, 24, 0, 4, 0.5, 3)
    with pytest.raises(ValueError, match="attention_backward: .*n_kv_head=2"):
        _core.attention_backward(z((1, 3, 48), np.float32), z((1, 3, 16), np.float32),
                                 z((1, 3, 16), np.float32), z((1, 4, 3), np.float32),
                                 z((1, 3, 48), np.float32), 4, 0.5, 2)
    with pytest.raises(ValueError, match="kv_cache_write: .*q_width=15"):
        _core.kv_cache_write(z((1, 4, 8), np.float32), z((1, 4, 8), np.float32), qkv, 0, 15)
