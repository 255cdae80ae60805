"""An independent NumPy float64 GPT-2: forward, loss and a hand-written backward.

This is the project's teaching reference (the role llm.c's ``ref.py`` / PyTorch played for the C
code).  It is written from the math alone and imports nothing from gpt2s, so that the kernels
and this file can only agree by both being right.

Conventions (Hugging Face's, which gpt2s follows):

* parameters are a dict name -> array with Hugging Face's names without the ``transformer.``
  prefix: ``wte.weight`` (V, C), ``wpe.weight`` (n_ctx, C), ``h.{l}.ln_1.weight`` (C,), ...
* linear layers are Conv1D: weight (in, out), ``y = x @ W + b``;
* ``attn.c_attn`` is the fused query/key/value projection (C, 3C): columns [0, C) are the
  queries, [C, 2C) the keys, [2C, 3C) the values; head h uses columns h*HS .. (h+1)*HS of each;
* the output head is tied, ``logits = lnf @ wte.T``, unless the parameters hold their own
  ``lm_head.weight`` (V, C) (``tie_word_embeddings: false``): then ``logits = lnf @ lm_head.T``;
* the GPT-2 variants of Hugging Face's config: the MLP width is whatever ``c_fc`` has (n_inner),
  ``activation`` is one of ``ACTIVATIONS`` (Hugging Face's activation_function names), and the
  attention scores of layer l are multiplied by ``attention_scale(HS, l, ...)``.

Shapes: B batch, T time, C channels, NH heads, HS = C / NH, V vocabulary, L layers.

Everything is computed in float64, whatever the dtype of the parameters passed in.
"""

from __future__ import annotations

import math

import numpy as np

__all__ = ["forward", "backward", "loss_and_grads", "gelu", "gelu_grad", "rel_err",
           "n_layers", "LAYER_SUFFIXES", "ACTIVATIONS", "attention_scale"]

GELU_K = math.sqrt(2.0 / math.pi)
GELU_C = 0.044715

LAYER_SUFFIXES = (
    "ln_1.weight", "ln_1.bias", "attn.c_attn.weight", "attn.c_attn.bias",
    "attn.c_proj.weight", "attn.c_proj.bias", "ln_2.weight", "ln_2.bias",
    "mlp.c_fc.weight", "mlp.c_fc.bias", "mlp.c_proj.weight", "mlp.c_proj.bias",
)


def rel_err(a, b) -> float:
    """||a - b|| / ||b|| in float64 (L2 over all elements); b is the reference."""
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    denom = np.linalg.norm(b)
    diff = np.linalg.norm(a - b)
    if denom == 0.0:
        return 0.0 if diff == 0.0 else math.inf
    return float(diff / denom)


def n_layers(params: dict) -> int:
    layers = {int(k.split(".")[1]) for k in params if k.startswith("h.")}
    return max(layers) + 1 if layers else 0


# ------------------------------------------------------------------------------------------
# The pieces, each with its own backward


def gelu(x):
    """gelu_new: 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))."""
    return 0.5 * x * (1.0 + np.tanh(GELU_K * (x + GELU_C * x ** 3)))


def gelu_grad(x):
    """d gelu / dx = 0.5 (1 + t) + 0.5 x (1 - t^2) sqrt(2/pi) (1 + 3 * 0.044715 x^2)."""
    t = np.tanh(GELU_K * (x + GELU_C * x ** 3))
    return 0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * GELU_K * (1.0 + 3.0 * GELU_C * x * x)


_erfc = np.frompyfunc(math.erfc, 1, 1)


def normal_cdf(x):
    """Phi(x) = 0.5 erfc(-x / sqrt 2) (math.erfc elementwise; NumPy has no erf), accurate
    in both tails, unlike 0.5 (1 + erf(x / sqrt 2)) whose negative tail cancels."""
    return 0.5 * _erfc(-np.asarray(x, np.float64) / math.sqrt(2.0)).astype(np.float64)


def gelu_erf(x):
    """gelu (erf): x Phi(x) = 0.5 x (1 + erf(x / sqrt 2))."""
    return x * normal_cdf(x)


def gelu_erf_grad(x):
    """Phi(x) + x phi(x), phi(x) = exp(-x^2 / 2) / sqrt(2 pi)."""
    return normal_cdf(x) + x * np.exp(-0.5 * x * x) / math.sqrt(2.0 * math.pi)


def _sigmoid(z):
    return 1.0 / (1.0 + np.exp(-z))


def x_sigmoid(k):
    """(f, f') of x sigmoid(k x): silu (k = 1) and quick_gelu (k = 1.702).
    f' = s + k x s (1 - s), s = sigmoid(k x)."""
    def f(x):
        return x * _sigmoid(k * x)

    def grad(x):
        s = _sigmoid(k * x)
        return s + k * x * s * (1.0 - s)
    return f, grad


def relu(x):
    return np.maximum(x, 0.0)


def relu_grad(x):
    """1 where x > 0, else 0 (torch's value at 0)."""
    return (x > 0).astype(np.float64)


# Hugging Face activation_function -> (f, f')
ACTIVATIONS = {
    "gelu_new": (gelu, gelu_grad),
    "gelu_pytorch_tanh": (gelu, gelu_grad),
    "gelu_fast": (gelu, gelu_grad),
    "gelu": (gelu_erf, gelu_erf_grad),
    "relu": (relu, relu_grad),
    "silu": x_sigmoid(1.0),
    "swish": x_sigmoid(1.0),
    "quick_gelu": x_sigmoid(1.702),
}


def attention_scale(head_size, layer, scale_attn_weights=True,
                    scale_attn_by_inverse_layer_idx=False):
    """The factor on q.k: 1/sqrt(HS) (1 without scale_attn_weights), divided by layer + 1 with
    scale_attn_by_inverse_layer_idx (layers count from 0)."""
    scale = 1.0 / math.sqrt(head_size) if scale_attn_weights else 1.0
    return scale / (layer + 1) if scale_attn_by_inverse_layer_idx else scale


def layernorm(x, w, b, eps):
    """y = (x - mean) / sqrt(var + eps) * w + b over the last axis (biased variance).
    Returns y and (xhat, rstd) for the backward."""
    mean = x.mean(axis=-1, keepdims=True)
    var = ((x - mean) ** 2).mean(axis=-1, keepdims=True)
    rstd = 1.0 / np.sqrt(var + eps)
    xhat = (x - mean) * rstd
    return xhat * w + b, (xhat, rstd)


def layernorm_backward(dy, w, cache):
    """Gradients (dx, dw, db) of layernorm given dL/dy.

    With g = dy * w (the gradient with respect to xhat) and xhat = (x - mean) * rstd:
        dx = rstd * (g - mean(g) - xhat * mean(g * xhat))
    (the two mean terms are the paths through the mean and through the variance)."""
    xhat, rstd = cache
    g = dy * w
    dx = rstd * (g - g.mean(axis=-1, keepdims=True)
                 - xhat * (g * xhat).mean(axis=-1, keepdims=True))
    axes = tuple(range(dy.ndim - 1))
    return dx, (dy * xhat).sum(axis=axes), dy.sum(axis=axes)


def linear(x, w, b):
    """Conv1D: x (..., in) @ w (in, out) + b (out,)."""
    return x @ w + b


def linear_backward(dy, x, w):
    """(dx, dw, db) of y = x @ w + b, summing dw and db over every leading axis."""
    C_in, C_out = w.shape
    x2 = x.reshape(-1, C_in)
    dy2 = dy.reshape(-1, C_out)
    return dy @ w.T, x2.T @ dy2, dy2.sum(axis=0)


def split_heads(x, n_head):
    """(B, T, C) -> (B, NH, T, HS)."""
    B, T, C = x.shape
    return x.reshape(B, T, n_head, C // n_head).transpose(0, 2, 1, 3)


def merge_heads(x):
    """(B, NH, T, HS) -> (B, T, C)."""
    B, NH, T, HS = x.shape
    return x.transpose(0, 2, 1, 3).reshape(B, T, NH * HS)


def attention(qkv, n_head, scale=None):
    """Causal multi-head self-attention on the fused qkv (B, T, 3C); returns y (B, T, C) and
    the cache for the backward.  scores = scale q k^T (scale 1/sqrt(HS) unless given), key
    j > query i masked out."""
    B, T, C3 = qkv.shape
    C = C3 // 3
    q, k, v = (split_heads(qkv[..., i * C:(i + 1) * C], n_head) for i in range(3))
    if scale is None:
        scale = 1.0 / math.sqrt(C // n_head)
    scores = (q @ k.transpose(0, 1, 3, 2)) * scale               # (B, NH, T, T)
    causal = np.tril(np.ones((T, T), dtype=bool))
    scores = np.where(causal, scores, -np.inf)
    scores = scores - scores.max(axis=-1, keepdims=True)
    p = np.exp(scores)
    p /= p.sum(axis=-1, keepdims=True)                           # softmax, 0 above the diagonal
    y = merge_heads(p @ v)
    return y, (q, k, v, p, scale)


def attention_backward(dy, cache):
    """dqkv (B, T, 3C) from dL/dy (B, T, C).

    Per head: y = P V with P = softmax(S), S = scale Q K^T.
        dV = P^T dY,  dP = dY V^T,
        dS = P * (dP - rowsum(dP * P))       (softmax backward; masked entries have P = 0)
        dQ = scale dS K,  dK = scale dS^T Q."""
    q, k, v, p, scale = cache
    n_head = q.shape[1]
    dyh = split_heads(dy, n_head)
    dv = p.transpose(0, 1, 3, 2) @ dyh
    dp = dyh @ v.transpose(0, 1, 3, 2)
    ds = p * (dp - (dp * p).sum(axis=-1, keepdims=True))
    dq = scale * (ds @ k)
    dk = scale * (ds.transpose(0, 1, 3, 2) @ q)
    return np.concatenate([merge_heads(dq), merge_heads(dk), merge_heads(dv)], axis=-1)


def cross_entropy(logits, targets):
    """Mean over targets != -1 of -log softmax(logits)[target]; (loss, dlogits)."""
    B, T, V = logits.shape
    flat = logits.reshape(-1, V)
    t = np.asarray(targets).reshape(-1)
    valid = t != -1
    n_valid = int(valid.sum())
    m = flat.max(axis=-1, keepdims=True)
    lse = m[:, 0] + np.log(np.exp(flat - m).sum(axis=-1))
    rows = np.nonzero(valid)[0]
    losses = lse[rows] - flat[rows, t[rows]]
    loss = float(losses.sum() / n_valid) if n_valid else float("nan")
    # d loss / d logits = (softmax - onehot) / n_valid on valid rows, 0 elsewhere
    dlogits = np.zeros_like(flat)
    if n_valid:
        probs = np.exp(flat[rows] - lse[rows, None])
        probs[np.arange(len(rows)), t[rows]] -= 1.0
        dlogits[rows] = probs / n_valid
    return loss, dlogits.reshape(B, T, V)


# ------------------------------------------------------------------------------------------
# The model


def _as64(params):
    return {k: np.asarray(v, dtype=np.float64) for k, v in params.items()}


def forward(params: dict, idx, targets=None, *, n_head: int, eps: float = 1e-5,
            activation: str = "gelu_new", scale_attn_weights: bool = True,
            scale_attn_by_inverse_layer_idx: bool = False):
    """Logits (B, T, V) float64, loss (float or None) and the cache the backward needs.

    idx: int (B, T) or (T,); targets: same shape, -1 = ignored.  The keyword flags are
    Hugging Face's GPT2Config fields of the same names; an ``lm_head.weight`` in params is an
    untied output head."""
    act, act_grad = ACTIVATIONS[activation]
    P = _as64(params)
    idx = np.asarray(idx)
    if idx.ndim == 1:
        idx = idx[None, :]
    B, T = idx.shape
    L = n_layers(P)
    x = P["wte.weight"][idx] + P["wpe.weight"][np.arange(T)][None]     # (B, T, C)
    layers = []
    for l in range(L):
        w = {s: P[f"h.{l}.{s}"] for s in LAYER_SUFFIXES}
        c = {"x_in": x}
        # attention sub-block: x_mid = x + proj(attn(ln_1(x)))
        c["ln1"], c["ln1_cache"] = layernorm(x, w["ln_1.weight"], w["ln_1.bias"], eps)
        qkv = linear(c["ln1"], w["attn.c_attn.weight"], w["attn.c_attn.bias"])
        scale = attention_scale(qkv.shape[-1] // 3 // n_head, l, scale_attn_weights,
                                scale_attn_by_inverse_layer_idx)
        c["atty"], c["attn_cache"] = attention(qkv, n_head, scale)
        x = x + linear(c["atty"], w["attn.c_proj.weight"], w["attn.c_proj.bias"])
        # MLP sub-block: x_out = x_mid + proj(gelu(fc(ln_2(x_mid))))
        c["ln2"], c["ln2_cache"] = layernorm(x, w["ln_2.weight"], w["ln_2.bias"], eps)
        c["fch"] = linear(c["ln2"], w["mlp.c_fc.weight"], w["mlp.c_fc.bias"])
        c["fch_gelu"] = act(c["fch"])
        x = x + linear(c["fch_gelu"], w["mlp.c_proj.weight"], w["mlp.c_proj.bias"])
        layers.append(c)
    lnf, lnf_cache = layernorm(x, P["ln_f.weight"], P["ln_f.bias"], eps)
    head = "lm_head.weight" if "lm_head.weight" in P else "wte.weight"   # untied or tied
    logits = lnf @ P[head].T
    loss, dlogits = (None, None) if targets is None else cross_entropy(logits, targets)
    cache = dict(P=P, idx=idx, layers=layers, lnf=lnf, lnf_cache=lnf_cache, dlogits=dlogits,
                 head=head, act_grad=act_grad)
    return logits, loss, cache


def backward(cache) -> dict:
    """Gradients of the mean loss of ``forward`` with respect to every parameter (float64),
    keyed like the parameters.  ``wte.weight`` gets both the embedding and the lm_head part
    (tied), or only the embedding part when ``lm_head.weight`` is its own parameter."""
    if cache["dlogits"] is None:
        raise ValueError("backward needs a forward with targets")
    P, idx, layers = cache["P"], cache["idx"], cache["layers"]
    B, T = idx.shape
    grads = {k: np.zeros_like(v) for k, v in P.items()}
    dlogits = cache["dlogits"]                                           # (B, T, V)
    V = dlogits.shape[-1]
    C = P["wte.weight"].shape[1]
    # logits = lnf @ head^T, head = wte (tied) or lm_head
    head = cache["head"]
    grads[head] += dlogits.reshape(-1, V).T @ cache["lnf"].reshape(-1, C)
    dlnf = dlogits @ P[head]
    dx, grads["ln_f.weight"], grads["ln_f.bias"] = layernorm_backward(
        dlnf, P["ln_f.weight"], cache["lnf_cache"])
    for l in reversed(range(len(layers))):
        c = layers[l]
        w = {s: P[f"h.{l}.{s}"] for s in LAYER_SUFFIXES}
        g = {}
        # MLP sub-block; dx is dL/dx_out, and flows unchanged through the residual
        dfch_gelu, g["mlp.c_proj.weight"], g["mlp.c_proj.bias"] = linear_backward(
            dx, c["fch_gelu"], w["mlp.c_proj.weight"])
        dfch = dfch_gelu * cache["act_grad"](c["fch"])
        dln2, g["mlp.c_fc.weight"], g["mlp.c_fc.bias"] = linear_backward(
            dfch, c["ln2"], w["mlp.c_fc.weight"])
        dx_ln2, g["ln_2.weight"], g["ln_2.bias"] = layernorm_backward(
            dln2, w["ln_2.weight"], c["ln2_cache"])
        dx = dx + dx_ln2                                                 # dL/dx_mid
        # attention sub-block
        datty, g["attn.c_proj.weight"], g["attn.c_proj.bias"] = linear_backward(
            dx, c["atty"], w["attn.c_proj.weight"])
        dqkv = attention_backward(datty, c["attn_cache"])
        dln1, g["attn.c_attn.weight"], g["attn.c_attn.bias"] = linear_backward(
            dqkv, c["ln1"], w["attn.c_attn.weight"])
        dx_ln1, g["ln_1.weight"], g["ln_1.bias"] = layernorm_backward(
            dln1, w["ln_1.weight"], c["ln1_cache"])
        dx = dx + dx_ln1                                                 # dL/dx_in
        for s, v in g.items():
            grads[f"h.{l}.{s}"] = v
    # x_0 = wte[idx] + wpe[t]
    np.add.at(grads["wte.weight"], idx.reshape(-1), dx.reshape(-1, C))
    grads["wpe.weight"][:T] += dx.sum(axis=0)
    return grads


def loss_and_grads(params, idx, targets, *, n_head, eps=1e-5, **variant):
    """(logits, loss, grads) in one call; variant: forward's keyword flags."""
    logits, loss, cache = forward(params, idx, targets, n_head=n_head, eps=eps, **variant)
    return logits, loss, backward(cache)


def widen_stored(type_name: str, data, scales=None):
    """The float32 values of a low-precision stored weight, in its stored orientation,
    decoded from its bytes by the formats' definitions: bfloat16 is the top 16 bits of a
    float32; int8 and int4 are blocks of 32 codes along a row times the block's fp16 scale,
    int4's byte j of a block holding weights j (low nibble) and j + 16 (high), offset by 8."""
    if type_name == "bfloat16":
        return (np.asarray(data).astype(np.uint32) << 16).view(np.float32)
    d = np.repeat(np.asarray(scales).view(np.float16).astype(np.float32), 32, axis=1)
    if type_name == "int4":
        b = np.asarray(data).reshape(data.shape[0], -1, 16)
        q = np.concatenate([b & 15, b >> 4], axis=2).reshape(d.shape).astype(np.int8) - 8
    else:
        q = np.asarray(data)
    return q.astype(np.float32) * d
