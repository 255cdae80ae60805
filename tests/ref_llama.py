"""An independent NumPy float64 reference of the pieces of the Llama / Qwen2 / GPT-NeoX blocks:
RMSNorm, rotary position embeddings (full and partial), gated linear units (SwiGLU) and
grouped-query causal attention, forward and a hand-written backward, written from the math
(beside ``ref.py``, the GPT-2 reference; nothing here imports gpt2s).

Conventions (transformers'):

* RMSNorm: ``y = w * x / sqrt(mean(x^2) + eps)`` over the last axis;
* rotary, the ``rotate_half`` convention of Llama and GPT-NeoX (not the interleaved pairs of
  GPT-J): of a head's first ``rot_dim`` values, value ``i`` and value ``i + rot_dim / 2``
  form a pair rotated by the angle ``pos * inv_freq[i]``; the rest of the head passes.  The
  angle is the float32 product of the float32 position and the float32 inverse frequency, as
  transformers forms it (``position_ids.float()``, ``inv_freq.float()``, a float32 matmul),
  and everything after it is float64 here;
* grouped-query attention: query head ``h`` of ``n_head`` reads key/value head
  ``h // (n_head / n_kv_head)`` (transformers' ``repeat_kv``);
* gated linear unit: ``act(gate) * up``, ``gate`` and ``up`` the two halves of one row.
"""

from __future__ import annotations

import numpy as np

__all__ = ["rmsnorm", "rmsnorm_backward", "rope_angles", "rotary", "rotary_backward",
           "glu", "glu_backward", "gqa_attention", "gqa_attention_lse", "gqa_attention_backward",
           "default_inv_freq"]


# ------------------------------------------------------------------------------------------
# RMSNorm

def rmsnorm(x, w, eps):
    """y = w * x * r, r = 1 / sqrt(mean(x^2) + eps); returns y and (x, r) for the backward."""
    x = np.asarray(x, np.float64)
    r = 1.0 / np.sqrt((x * x).mean(axis=-1, keepdims=True) + eps)
    return np.asarray(w, np.float64) * (x * r), (x, r)


def rmsnorm_backward(dy, w, cache):
    """(dx, dw) of rmsnorm.  With n = x r and g = dy * w:
        dr/dx_j = -r^3 x_j / C, so dx = r g - x r^3 mean(g x) = r (g - n mean(g n));
        dw = sum over rows of dy * n."""
    x, r = cache
    n = x * r
    g = np.asarray(dy, np.float64) * np.asarray(w, np.float64)
    dx = r * (g - n * (g * n).mean(axis=-1, keepdims=True))
    axes = tuple(range(np.ndim(dy) - 1))
    return dx, (dy * n).sum(axis=axes)


# ------------------------------------------------------------------------------------------
# Rotary position embeddings

def default_inv_freq(rot_dim, base):
    """transformers' default inverse frequencies: base^(-2i / rot_dim), i < rot_dim / 2, as
    float32 (the dtype of its buffer)."""
    i = np.arange(0, rot_dim, 2, dtype=np.int64).astype(np.float32)
    return (1.0 / (base ** (i / rot_dim))).astype(np.float32)


def rope_angles(positions, inv_freq):
    """(N, rot_dim / 2) angles pos * inv_freq, the product rounded to float32 (module
    docstring), returned as float64."""
    p = np.asarray(positions).astype(np.float32)[:, None]
    f = np.asarray(inv_freq, np.float32)[None, :]
    return (p * f).astype(np.float32).astype(np.float64)


def _rotate(x, positions, inv_freq, n_heads, head_dim, col_off, sign):
    x = np.array(x, np.float64)
    h = len(inv_freq)
    ang = rope_angles(positions, inv_freq)
    c, s = np.cos(ang), sign * np.sin(ang)
    for j in range(n_heads):
        o = col_off + j * head_dim
        a = x[:, o:o + h].copy()
        b = x[:, o + h:o + 2 * h].copy()
        x[:, o:o + h] = a * c - b * s
        x[:, o + h:o + 2 * h] = b * c + a * s
    return x


def rotary(x, positions, inv_freq, n_heads, head_dim, col_off=0):
    """x (N, ld): the n_heads heads of head_dim at col_off of row n rotated at positions[n];
    the pair (a, b) = (x[i], x[i + h]), h = len(inv_freq), becomes
    (a cos - b sin, b cos + a sin) (x * cos + rotate_half(x) * sin)."""
    return _rotate(x, positions, inv_freq, n_heads, head_dim, col_off, 1.0)


def rotary_backward(dy, positions, inv_freq, n_heads, head_dim, col_off=0):
    """The gradient through rotary: each pair's rotation is orthogonal, so dx = R^T dy, the
    rotation by the opposite angle (the columns outside the rotated pairs pass dy)."""
    return _rotate(dy, positions, inv_freq, n_heads, head_dim, col_off, -1.0)


# ------------------------------------------------------------------------------------------
# Gated linear unit

def glu(inp, act):
    """inp (N, 2I) = [gate | up] -> act(gate) * up (N, I); act = (f, f') as ref.ACTIVATIONS."""
    inp = np.asarray(inp, np.float64)
    I = inp.shape[-1] // 2
    return act[0](inp[..., :I]) * inp[..., I:]


def glu_backward(dy, inp, act):
    """[dgate | dup] = [dy * up * f'(gate) | dy * f(gate)]."""
    inp = np.asarray(inp, np.float64)
    I = inp.shape[-1] // 2
    gate, up = inp[..., :I], inp[..., I:]
    return np.concatenate([dy * up * act[1](gate), dy * act[0](gate)], axis=-1)


# ------------------------------------------------------------------------------------------
# Grouped-query causal attention

def gqa_attention(q, k, v, n_head, n_kv_head, scale, pos0=0):
    """q (B, Tq, NH HS), k and v (B, Tk, NKV HS) with Tk >= pos0 + Tq: query i at position
    pos0 + i sees keys 0 .. pos0 + i; query head h reads KV head h // (NH / NKV).  Returns y
    (B, Tq, NH HS) and the cache for the backward (P, the per-query-head k and v)."""
    q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
    B, Tq, C = q.shape
    HS = C // n_head
    G = n_head // n_kv_head
    Tk = pos0 + Tq
    qh = q.reshape(B, Tq, n_head, HS).transpose(0, 2, 1, 3)
    kh = np.repeat(k[:, :Tk].reshape(B, Tk, n_kv_head, HS).transpose(0, 2, 1, 3), G, axis=1)
    vh = np.repeat(v[:, :Tk].reshape(B, Tk, n_kv_head, HS).transpose(0, 2, 1, 3), G, axis=1)
    s = scale * (qh @ kh.transpose(0, 1, 3, 2))                  # (B, NH, Tq, Tk)
    mask = np.arange(Tk)[None, :] <= (pos0 + np.arange(Tq))[:, None]
    s = np.where(mask, s, -np.inf)
    s = s - s.max(axis=-1, keepdims=True)
    p = np.exp(s)
    p /= p.sum(axis=-1, keepdims=True)
    y = (p @ vh).transpose(0, 2, 1, 3).reshape(B, Tq, C)
    return y, (qh, kh, vh, p, scale, n_kv_head)


def gqa_attention_lse(q, k, n_head, n_kv_head, scale):
    """The row log-sum-exp of the scaled, masked scores (B, NH, T) (pos0 = 0)."""
    q, k = np.asarray(q, np.float64), np.asarray(k, np.float64)
    B, T, C = q.shape
    HS = C // n_head
    G = n_head // n_kv_head
    qh = q.reshape(B, T, n_head, HS).transpose(0, 2, 1, 3)
    kh = np.repeat(k.reshape(B, T, n_kv_head, HS).transpose(0, 2, 1, 3), G, axis=1)
    s = scale * (qh @ kh.transpose(0, 1, 3, 2))
    s = np.where(np.tril(np.ones((T, T), bool)), s, -np.inf)
    m = s.max(axis=-1, keepdims=True)
    return (m + np.log(np.exp(s - m).sum(axis=-1, keepdims=True)))[..., 0]


def gqa_attention_backward(dy, cache):
    """(dq, dk, dv) from dL/dy (B, T, NH HS).  Per query head as ref.attention_backward:
    dV_h = P^T dY, dP = dY V^T, dS = P (dP - rowsum(dP P)), dQ = scale dS K, dK_h = scale
    dS^T Q; a KV head's gradient is the sum over the G query heads that read it (the
    backward of repeat_kv)."""
    qh, kh, vh, p, scale, n_kv_head = cache
    B, NH, T, HS = qh.shape
    G = NH // n_kv_head
    dyh = np.asarray(dy, np.float64).reshape(B, T, NH, HS).transpose(0, 2, 1, 3)
    dv = p.transpose(0, 1, 3, 2) @ dyh
    dp = dyh @ vh.transpose(0, 1, 3, 2)
    ds = p * (dp - (dp * p).sum(axis=-1, keepdims=True))
    dq = scale * (ds @ kh)
    dk = scale * (ds.transpose(0, 1, 3, 2) @ qh)

    def merge(x, heads):
        return x.transpose(0, 2, 1, 3).reshape(B, x.shape[2], heads * HS)

    def fold(x):   # (B, NH, Tk, HS) -> sum over each group -> (B, NKV, Tk, HS)
        return x.reshape(B, n_kv_head, G, x.shape[2], HS).sum(axis=2)
    return merge(dq, NH), merge(fold(dk), n_kv_head), merge(fold(dv), n_kv_head)
