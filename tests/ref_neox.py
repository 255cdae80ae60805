"""An independent NumPy float64 GPT-NeoX (Pythia): forward, loss and a hand-written backward,
written from the math (as tests/ref.py is for GPT-2); nothing here imports gpt2s.  The pieces
are ref.py's (LayerNorm, the activations, cross-entropy) and ref_llama.py's (rotary in the
rotate_half convention, causal attention); the model around them is GPT-NeoX's:

* parameters are a dict with Hugging Face's names: ``gpt_neox.embed_in.weight`` (V, C),
  ``gpt_neox.layers.{l}.input_layernorm.weight`` / ``.bias``, ``post_attention_layernorm``,
  ``attention.query_key_value`` (3C, C) and its bias (3C,), ``attention.dense`` (C, C),
  ``mlp.dense_h_to_4h`` (I, C), ``mlp.dense_4h_to_h`` (C, I), each with a bias (the attention
  ones only with attention_bias), ``gpt_neox.final_layer_norm.weight`` / ``.bias`` and
  ``embed_out.weight`` (V, C) (absent when tied: the head is the embedding);
* linear layers are nn.Linear: ``y = x @ W.T + b``;
* query_key_value's output columns are per head: head h holds q, k, v at columns
  ``h * 3 HS + (0, HS, 2 HS)`` ([n_head, 3, head_dim]);
* the rotary embedding turns the first ``rot = int(HS * rotary_pct)`` values of each query and
  key head (value i with value i + rot / 2), at the default inverse frequencies
  ``base^(-2i / rot)``;
* a block is ``x + attn(ln1(x)) + mlp(ln2(x))`` (parallel residual) or
  ``h = x + attn(ln1(x)); h + mlp(ln2(h))`` (sequential); ``mlp(y) = down(act(up(y)))``.
"""

from __future__ import annotations

import numpy as np

from ref import ACTIVATIONS, cross_entropy, layernorm, layernorm_backward
from ref_llama import (default_inv_freq, gqa_attention, gqa_attention_backward, rotary,
                       rotary_backward)

__all__ = ["forward", "backward", "loss_and_grads"]

P = "gpt_neox.layers."


def _lin(x, w, b=None):
    y = x @ w.T
    return y if b is None else y + b


def _lin_backward(dy, x, w):
    """(dx, dW, db) of y = x W^T + b, summed over the leading axes."""
    x2, dy2 = x.reshape(-1, x.shape[-1]), dy.reshape(-1, dy.shape[-1])
    return dy @ w, dy2.T @ x2, dy2.sum(axis=0)


def forward(params: dict, idx, targets=None, *, n_head: int, rotary_pct: float = 0.25,
            rotary_base: float = 10000.0, eps: float = 1e-5, parallel: bool = True,
            activation: str = "gelu"):
    """Logits (B, T, V) float64, the loss (or None) and the cache for `backward`."""
    p = {k: np.asarray(v, np.float64) for k, v in params.items()}
    idx = np.atleast_2d(np.asarray(idx))
    B, T = idx.shape
    V, C = p["gpt_neox.embed_in.weight"].shape
    HS = C // n_head
    rot = int(HS * rotary_pct)
    inv = default_inv_freq(rot, rotary_base)
    pos = np.tile(np.arange(T), B)
    act, act_grad = ACTIVATIONS[activation]
    L = 1 + max(int(k[len(P):].split(".")[0]) for k in p if k.startswith(P))
    x = p["gpt_neox.embed_in.weight"][idx]
    layers = []
    for l in range(L):
        w = {k[len(f"{P}{l}."):]: v for k, v in p.items() if k.startswith(f"{P}{l}.")}
        a1, c1 = layernorm(x, w["input_layernorm.weight"], w["input_layernorm.bias"], eps)
        qkv = _lin(a1, w["attention.query_key_value.weight"],
                   w.get("attention.query_key_value.bias"))
        heads = qkv.reshape(B, T, n_head, 3, HS)
        q, k, v = (heads[:, :, :, j].reshape(B * T, C) for j in range(3))
        q = rotary(q, pos, inv, n_head, HS).reshape(B, T, C)
        k = rotary(k, pos, inv, n_head, HS).reshape(B, T, C)
        y, ac = gqa_attention(q, k, v.reshape(B, T, C), n_head, n_head, 1.0 / np.sqrt(HS))
        attn = _lin(y, w["attention.dense.weight"], w.get("attention.dense.bias"))
        h = x if parallel else x + attn
        a2, c2 = layernorm(h, w["post_attention_layernorm.weight"],
                           w["post_attention_layernorm.bias"], eps)
        u = _lin(a2, w["mlp.dense_h_to_4h.weight"], w["mlp.dense_h_to_4h.bias"])
        g = act(u)
        m = _lin(g, w["mlp.dense_4h_to_h.weight"], w["mlp.dense_4h_to_h.bias"])
        layers.append(dict(w=w, a1=a1, c1=c1, y=y, ac=ac, a2=a2, c2=c2, u=u, g=g))
        x = x + attn + m if parallel else h + m
    lnf, cf = layernorm(x, p["gpt_neox.final_layer_norm.weight"],
                        p["gpt_neox.final_layer_norm.bias"], eps)
    tied = "embed_out.weight" not in p
    head = p["gpt_neox.embed_in.weight"] if tied else p["embed_out.weight"]
    logits = lnf @ head.T
    loss = dlogits = None
    if targets is not None:
        loss, dlogits = cross_entropy(logits, np.atleast_2d(targets))
    cache = dict(p=p, idx=idx, layers=layers, lnf=lnf, cf=cf, head=head, tied=tied,
                 dlogits=dlogits, n_head=n_head, pos=pos, inv=inv, parallel=parallel,
                 act_grad=act_grad)
    return logits, loss, cache


def backward(cache) -> dict:
    """Gradients of the loss of `forward` (called with targets): name -> float64 array."""
    p, n_head, pos, inv = cache["p"], cache["n_head"], cache["pos"], cache["inv"]
    grads = {}
    dlogits = cache["dlogits"]
    B, T, V = dlogits.shape
    C = p["gpt_neox.embed_in.weight"].shape[1]
    HS = C // n_head
    dlnf = dlogits @ cache["head"]
    dhead = dlogits.reshape(-1, V).T @ cache["lnf"].reshape(-1, C)
    dx, grads["gpt_neox.final_layer_norm.weight"], grads["gpt_neox.final_layer_norm.bias"] = \
        layernorm_backward(dlnf, p["gpt_neox.final_layer_norm.weight"], cache["cf"])
    for l in reversed(range(len(cache["layers"]))):
        k = cache["layers"][l]
        w = k["w"]
        name = f"{P}{l}."
        # the MLP
        dg, grads[name + "mlp.dense_4h_to_h.weight"], grads[name + "mlp.dense_4h_to_h.bias"] = \
            _lin_backward(dx, k["g"], w["mlp.dense_4h_to_h.weight"])
        du = dg * cache["act_grad"](k["u"])
        da2, grads[name + "mlp.dense_h_to_4h.weight"], grads[name + "mlp.dense_h_to_4h.bias"] = \
            _lin_backward(du, k["a2"], w["mlp.dense_h_to_4h.weight"])
        dh, grads[name + "post_attention_layernorm.weight"], \
            grads[name + "post_attention_layernorm.bias"] = layernorm_backward(
                da2, w["post_attention_layernorm.weight"], k["c2"])
        if cache["parallel"]:   # out = x + attn + mlp(ln2(x))
            dattn, dx = dx, dx + dh
        else:                   # h = x + attn, out = h + mlp(ln2(h))
            dattn = dx = dx + dh
        # the attention
        dy, dwo, dbo = _lin_backward(dattn, k["y"], w["attention.dense.weight"])
        grads[name + "attention.dense.weight"] = dwo
        if "attention.dense.bias" in w:
            grads[name + "attention.dense.bias"] = dbo
        dq, dk, dv = gqa_attention_backward(dy, k["ac"])
        dq = rotary_backward(dq.reshape(B * T, C), pos, inv, n_head, HS)
        dk = rotary_backward(dk.reshape(B * T, C), pos, inv, n_head, HS)
        dqkv = np.stack([d.reshape(B, T, n_head, HS) for d in (dq, dk, dv)], axis=3)
        da1, dwqkv, dbqkv = _lin_backward(dqkv.reshape(B, T, 3 * C), k["a1"],
                                          w["attention.query_key_value.weight"])
        grads[name + "attention.query_key_value.weight"] = dwqkv
        if "attention.query_key_value.bias" in w:
            grads[name + "attention.query_key_value.bias"] = dbqkv
        dx1, grads[name + "input_layernorm.weight"], grads[name + "input_layernorm.bias"] = \
            layernorm_backward(da1, w["input_layernorm.weight"], k["c1"])
        dx = dx + dx1
    demb = np.zeros_like(p["gpt_neox.embed_in.weight"])
    np.add.at(demb, cache["idx"].reshape(-1), dx.reshape(-1, C))
    if cache["tied"]:
        demb += dhead
    else:
        grads["embed_out.weight"] = dhead
    grads["gpt_neox.embed_in.weight"] = demb
    return grads


def loss_and_grads(params, idx, targets, **kw):
    """(logits, loss, grads) in float64."""
    logits, loss, cache = forward(params, idx, targets, **kw)
    return logits, loss, backward(cache)
