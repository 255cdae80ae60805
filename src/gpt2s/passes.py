"""GPT-2's forward and backward passes: which `_core` kernel runs on which buffer, in order
(docs/architecture.md, "A forward" and "A backward"; the math in docs/forward.md and
docs/backward.md).  `GPT2` validates the input, picks the buffers, holds the locks and the
thread-count pin, and calls these."""

from __future__ import annotations

import threading

import numpy as np

from . import _core

__all__ = ["Passes", "TrainingForward", "cross_entropy"]

_EMPTY1 = np.empty(0, np.float32)
_EMPTY3 = np.empty((0, 0, 0), np.float32)


class TrainingForward:
    """What a training forward (``forward(idx, targets)``) keeps for its backward; the model's
    `GPT2.pending_backward` until that backward consumes it.

    Attributes:
        n_valid: how many targets are not -1: the loss is the mean over them, and `backward`
            divides by this count unless it is given another ``normalizer``.
        thread: the ``threading.get_ident()`` of the thread that made the forward (only it may
            call the backward).

    The other attributes are what the backward reads: ``idx`` (B, T), the flat ``targets``,
    each row's log-sum-exp ``lse``, the ``logits`` (B, T, V), ``logits_owned`` (the model's
    buffer, which the backward overwrites) and the activations ``acts``.  Each training
    forward makes a new record, so records compare by identity.
    """

    __slots__ = ("idx", "targets", "lse", "n_valid", "logits", "logits_owned", "acts",
                 "thread")

    def __init__(self, idx, targets, lse, logits, logits_owned, acts):
        self.idx, self.targets, self.lse = idx, targets, lse
        self.n_valid = int(np.count_nonzero(targets != -1))
        self.logits, self.logits_owned, self.acts = logits, logits_owned, acts
        self.thread = threading.get_ident()

    def backward_normalizer(self, normalizer=None):
        """What the backward of this forward divides the summed loss by: normalizer (a
        positive integer), or n_valid; RuntimeError when the calling thread did not make this
        forward or no target was counted."""
        if self.thread != threading.get_ident():
            raise RuntimeError("backward(): the last forward(idx, targets) on this model was "
                               "made by another thread; training calls on one model must come "
                               "from one thread at a time (forward and its backward from the "
                               "same thread)")
        if normalizer is None:
            if self.n_valid == 0:
                raise RuntimeError("backward(): every target of the last forward was -1 "
                                   "(ignored); the loss is undefined")
            return self.n_valid
        if isinstance(normalizer, bool) or int(normalizer) != normalizer or normalizer < 1:
            raise ValueError(f"backward(): normalizer must be a positive integer, "
                             f"got {normalizer!r}")
        return normalizer


def cross_entropy(logits, tgt):
    """(mean cross-entropy over targets != -1 or nan, the rows' log-sum-exp)."""
    N = tgt.size
    losses = np.empty(N, np.float32)
    lse = np.empty(N, np.float32)
    flat_t = tgt.reshape(-1)
    _core.crossentropy_forward(losses, lse, logits.reshape(N, -1), flat_t)
    n_valid = int(np.count_nonzero(flat_t != -1))
    loss = float(np.sum(losses, dtype=np.float64) / n_valid) if n_valid else float("nan")
    return loss, lse


class Passes:
    """The passes over one `ParameterStore`, with the variant's choices made once: the MLP
    activation kernel, each layer's attention score scale, and the output head (wte, or its
    own lm_head.weight when untied)."""

    def __init__(self, store):
        config = store.config
        self.config, self.store = config, store
        self.activation = config.activation_kernel
        self.attn_scales = [config.attention_scale(l) for l in range(config.n_layer)]
        self.head_name = "wte.weight" if config.tie_word_embeddings else "lm_head.weight"

    # ------------------------------------------------------------------ forward

    def forward(self, idx: np.ndarray, arena, keep_layers: bool, kv=None,
                pos0: int = 0, row_pos: np.ndarray | None = None) -> dict:
        """Embedding, the transformer blocks and the final layernorm of idx (B, T) int64;
        returns the dict of activations carved from arena (``["lnf"]``, (N, C), is the
        output; the others are what the backward reads).

        keep_layers (training): every activation the backward needs is kept, one slice per
        layer.  Otherwise one layer's worth is reused, and the residual stream alternates
        between two buffers.  With kv (a `KVCache`), idx holds positions pos0 .. pos0 + T - 1:
        their keys and values are written to the cache and attention reads the cache.  With
        row_pos (B,) int64 as well, row b's tokens sit at row_pos[b] .. row_pos[b] + T - 1
        instead (a ragged batch: each row computed as a one-row call would compute it)."""
        cfg = self.config
        B, T = idx.shape
        N, C, L, H = B * T, cfg.n_embd, cfg.n_layer, cfg.inner_size
        LS = L if keep_layers else 1
        a = arena.carve({
            "encoded": (N, C),
            # the layernorm outputs are not kept per layer: the backward recomputes them from
            # the residual stream (one cheap pass, bit-identical) and saves 2 x L x N x C floats
            "ln1": (N, C), "ln1_mean": (LS, N), "ln1_rstd": (LS, N),
            "qkv": (LS, N, 3 * C), "atty": (LS, N, C), "att_lse": (LS, B, cfg.n_head, T),
            "res2": (LS, N, C), "ln2": (N, C), "ln2_mean": (LS, N), "ln2_rstd": (LS, N),
            "fch": (LS, N, H), "fch_gelu": (N, H),
            "res3": (L if keep_layers else 2, N, C), "proj": (N, C),
            "lnf": (N, C), "lnf_mean": (N,), "lnf_rstd": (N,),
        })
        P = self.store.params
        _core.embedding_forward(a["encoded"], idx.reshape(-1), P["wte.weight"], P["wpe.weight"], T,
                                pos0, row_pos)
        _core.layernorm_forward(a["ln1"], a["ln1_mean"][0], a["ln1_rstd"][0], a["encoded"],
                                P["h.0.ln_1.weight"], P["h.0.ln_1.bias"], cfg.layer_norm_epsilon)
        res_in = a["encoded"]
        for l in range(L):
            res_out = a["res3"][l if keep_layers else l % 2]
            self._block_forward(l, a, l if keep_layers else 0, res_in, res_out, B, T, kv, pos0,
                                row_pos)
            res_in = res_out
        return a

    def _block_forward(self, l, a, s, res_in, res_out, B, T, kv, pos0, row_pos=None):
        """Block l: res_out = res2 + mlp(ln_2(res2)), res2 = res_in + attn(ln1), where ln1 (the
        layernorm of res_in) is already in a["ln1"]; then the next block's ln_1 (or ln_f) of
        res_out.  s is the slice of the per-layer activations this block writes."""
        cfg = self.config
        C, eps = cfg.n_embd, cfg.layer_norm_epsilon
        w = self.store.layer_params[l]
        qkv = a["qkv"][s]
        mm, cw = _core.matmul_forward, w   # float32, bfloat16 or int8 weights
        if self.store.compute_layers is not None:   # compute_dtype "bfloat16"
            mm, cw = _core.matmul_forward_bf16, self.store.compute_layers[l]
        mm(qkv, a["ln1"], cw["attn.c_attn.weight"], w["attn.c_attn.bias"])
        qkv3 = qkv.reshape(B, T, 3 * C)
        if kv is None:
            _core.attention_forward(a["atty"][s].reshape(B, T, C), a["att_lse"][s],
                                    qkv3, 0, qkv3, C, qkv3, 2 * C, 0, cfg.n_head,
                                    self.attn_scales[l])
        else:
            keys, values = kv.keys[l], kv.values[l]
            _core.kv_cache_write(keys, values, qkv3, pos0, row_pos=row_pos)
            _core.attention_forward(a["atty"][s].reshape(B, T, C), _EMPTY3, qkv3, 0,
                                    keys, 0, values, 0, pos0, cfg.n_head,
                                    self.attn_scales[l], row_pos=row_pos)
        mm(a["proj"], a["atty"][s], cw["attn.c_proj.weight"], w["attn.c_proj.bias"])
        _core.residual_layernorm_forward(a["res2"][s], a["ln2"], a["ln2_mean"][s],
                                         a["ln2_rstd"][s], res_in, a["proj"],
                                         w["ln_2.weight"], w["ln_2.bias"], eps)
        mm(a["fch"][s], a["ln2"], cw["mlp.c_fc.weight"], w["mlp.c_fc.bias"])
        # act(fch) is not kept per layer: the backward recomputes it (one cheap pass)
        _core.activation_forward(a["fch_gelu"], a["fch"][s], self.activation)
        mm(a["proj"], a["fch_gelu"], cw["mlp.c_proj.weight"], w["mlp.c_proj.bias"])
        if l + 1 < cfg.n_layer:   # the next block's ln_1, into ln1 and this slot's stats
            nxt = self.store.layer_params[l + 1]
            s_next = s + 1 if a["ln1_mean"].shape[0] > 1 else 0
            _core.residual_layernorm_forward(res_out, a["ln1"], a["ln1_mean"][s_next],
                                             a["ln1_rstd"][s_next], a["res2"][s], a["proj"],
                                             nxt["ln_1.weight"], nxt["ln_1.bias"], eps)
        else:
            P = self.store.params
            _core.residual_layernorm_forward(res_out, a["lnf"], a["lnf_mean"], a["lnf_rstd"],
                                             a["res2"][s], a["proj"], P["ln_f.weight"],
                                             P["ln_f.bias"], eps)

    def head(self, logits: np.ndarray, lnf: np.ndarray):
        """logits (N, V) = lnf (N, C) @ the output head^T."""
        if self.store.compute_params is not None:   # compute_dtype "bfloat16"
            _core.lm_head_forward_bf16(logits, lnf, self.store.compute_params[self.head_name])
            return
        _core.lm_head_forward(logits, lnf, self.store.params[self.head_name])

    # ------------------------------------------------------------------ backward

    def loss_backward(self, last: TrainingForward, normalizer: int, scratch, nt: int) -> dict:
        """The first step of the backward: dlogits of the mean loss (summed loss / normalizer),
        in place over the logits when the model owns them.  Returns the backward's temporaries
        carved from scratch (with ``["dlogits"]``), for `backward`."""
        self.store.grads  # allocated before anything of the forward is overwritten
        cfg = self.config
        B, T = last.idx.shape
        N, C, V, H = B * T, cfg.n_embd, cfg.vocab_size, cfg.inner_size
        in_place = last.logits_owned  # nobody else sees these logits: dlogits in place
        spec = {"dres": (N, C), "dln": (N, C), "datty": (N, C), "dqkv": (N, 3 * C),
                "dfch": (N, H), "ln_scratch": (nt, 2 * C)}
        if not in_place:
            spec["dlogits"] = (N, V)
        d = scratch.carve(spec)
        logits = last.logits.reshape(N, V)
        if in_place:
            d["dlogits"] = logits
        _core.crossentropy_backward(d["dlogits"], logits, last.lse, last.targets,
                                    np.float32(1.0 / int(normalizer)))
        return d

    def backward(self, last: TrainingForward, d: dict, on_layer_done=None):
        """The rest of the backward after `loss_backward`, adding into the store's gradients:
        the head, ln_f, the blocks from last to first (calling on_layer_done(l) after each),
        the embeddings."""
        cfg = self.config
        eps = cfg.layer_norm_epsilon
        G, P, a = self.store.grads, self.store.params, last.acts
        idx = last.idx
        B, T = idx.shape
        L, NH, C = cfg.n_layer, cfg.n_head, cfg.n_embd
        cl = self.store.compute_layers   # compute_dtype "bfloat16": the bfloat16 copies
        mmb = _core.matmul_backward if cl is None else _core.matmul_backward_bf16
        if cl is None:
            _core.lm_head_backward(d["dln"], G[self.head_name], d["dlogits"], a["lnf"],
                                   P[self.head_name])
        else:
            _core.lm_head_backward_bf16(d["dln"], G[self.head_name], d["dlogits"], a["lnf"],
                                        self.store.compute_params[self.head_name])
        dres = d["dres"]
        dres.fill(0.0)
        _core.layernorm_backward(dres, G["ln_f.weight"], G["ln_f.bias"], d["dln"], a["res3"][L - 1],
                                 P["ln_f.weight"], a["lnf_mean"], a["lnf_rstd"], d["ln_scratch"])
        for l in reversed(range(L)):
            w, g = self.store.layer_params[l], self.store.layer_grads[l]
            cw = w if cl is None else cl[l]
            res_in = a["encoded"] if l == 0 else a["res3"][l - 1]
            # MLP: res3 = res2 + act(ln2 @ Wfc + bfc) @ Wproj + bproj
            _core.activation_forward(a["fch_gelu"], a["fch"][l], self.activation)
            mmb(d["dfch"], g["mlp.c_proj.weight"], g["mlp.c_proj.bias"], dres,
                a["fch_gelu"], cw["mlp.c_proj.weight"], False)
            _core.activation_backward(d["dfch"], a["fch"][l], d["dfch"], self.activation)
            _core.layernorm_forward(a["ln2"], _EMPTY1, _EMPTY1, a["res2"][l], w["ln_2.weight"],
                                    w["ln_2.bias"], eps)
            mmb(d["dln"], g["mlp.c_fc.weight"], g["mlp.c_fc.bias"], d["dfch"],
                a["ln2"], cw["mlp.c_fc.weight"], False)
            _core.layernorm_backward(dres, g["ln_2.weight"], g["ln_2.bias"], d["dln"], a["res2"][l],
                                     w["ln_2.weight"], a["ln2_mean"][l], a["ln2_rstd"][l],
                                     d["ln_scratch"])
            # attention: res2 = res_in + attn(ln1) @ Wproj + bproj
            mmb(d["datty"], g["attn.c_proj.weight"], g["attn.c_proj.bias"],
                dres, a["atty"][l], cw["attn.c_proj.weight"], False)
            _core.attention_backward(d["dqkv"].reshape(B, T, 3 * C), d["datty"].reshape(B, T, C),
                                     a["atty"][l].reshape(B, T, C), a["att_lse"][l],
                                     a["qkv"][l].reshape(B, T, 3 * C), NH,
                                     self.attn_scales[l])
            _core.layernorm_forward(a["ln1"], _EMPTY1, _EMPTY1, res_in, w["ln_1.weight"],
                                    w["ln_1.bias"], eps)
            mmb(d["dln"], g["attn.c_attn.weight"], g["attn.c_attn.bias"],
                d["dqkv"], a["ln1"], cw["attn.c_attn.weight"], False)
            _core.layernorm_backward(dres, g["ln_1.weight"], g["ln_1.bias"], d["dln"], res_in,
                                     w["ln_1.weight"], a["ln1_mean"][l], a["ln1_rstd"][l],
                                     d["ln_scratch"])
            if on_layer_done is not None:
                on_layer_done(l)
        _core.embedding_backward(G["wte.weight"], G["wpe.weight"], dres, idx.reshape(-1), T)
