"""A nanoGPT-style GPT-2 in PyTorch eager, the baseline gpt2s is timed against.

Module names mirror Hugging Face's keys (``h.3.mlp.c_fc``), so copying a gpt2s model in is a
loop over ``m.params``: Hugging Face's Conv1D weights are ``[in, out]`` and ``nn.Linear`` wants
``[out, in]``, hence the transposes.  Attention is ``F.scaled_dot_product_attention`` with
``is_causal=True`` (PyTorch's fused CPU kernel); GELU is the tanh approximation; ``lm_head``
is tied to ``wte``.  ``forward`` returns logits for every position (not just the last one, as
nanoGPT does at inference) so that it computes what ``gpt2s.GPT2.forward`` computes.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F


class CausalSelfAttention(nn.Module):
    def __init__(self, n_embd: int, n_head: int):
        super().__init__()
        self.n_head = n_head
        self.c_attn = nn.Linear(n_embd, 3 * n_embd)
        self.c_proj = nn.Linear(n_embd, n_embd)

    def forward(self, x):
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)
        hs = C // self.n_head
        q = q.view(B, T, self.n_head, hs).transpose(1, 2)
        k = k.view(B, T, self.n_head, hs).transpose(1, 2)
        v = v.view(B, T, self.n_head, hs).transpose(1, 2)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.c_proj(y)


class MLP(nn.Module):
    def __init__(self, n_embd: int):
        super().__init__()
        self.c_fc = nn.Linear(n_embd, 4 * n_embd)
        self.c_proj = nn.Linear(4 * n_embd, n_embd)

    def forward(self, x):
        return self.c_proj(F.gelu(self.c_fc(x), approximate="tanh"))


class Block(nn.Module):
    def __init__(self, n_embd: int, n_head: int, eps: float):
        super().__init__()
        self.ln_1 = nn.LayerNorm(n_embd, eps=eps)
        self.attn = CausalSelfAttention(n_embd, n_head)
        self.ln_2 = nn.LayerNorm(n_embd, eps=eps)
        self.mlp = MLP(n_embd)

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class TorchGPT2(nn.Module):
    def __init__(self, n_layer: int, n_head: int, n_embd: int, vocab_size: int, n_ctx: int,
                 eps: float = 1e-5):
        super().__init__()
        self.n_ctx = n_ctx
        self.wte = nn.Embedding(vocab_size, n_embd)
        self.wpe = nn.Embedding(n_ctx, n_embd)
        self.h = nn.ModuleList([Block(n_embd, n_head, eps) for _ in range(n_layer)])
        self.ln_f = nn.LayerNorm(n_embd, eps=eps)
        self.lm_head = nn.Linear(n_embd, vocab_size, bias=False)
        self.lm_head.weight = self.wte.weight  # tied
        # GPT-2's initialisation (used only when no weights are copied in)
        for name, p in self.named_parameters():
            if name.endswith(".bias"):
                nn.init.zeros_(p)
            elif ".ln_" in name or name.startswith("ln_"):
                nn.init.ones_(p)
            else:
                std = 0.02 / math.sqrt(2 * n_layer) if name.endswith("c_proj.weight") else 0.02
                nn.init.normal_(p, 0.0, std)

    @classmethod
    def from_config(cls, config) -> "TorchGPT2":
        """Same sizes as a gpt2s.GPT2Config, GPT-2 random initialisation."""
        return cls(config.n_layer, config.n_head, config.n_embd, config.vocab_size,
                   config.n_ctx, config.layer_norm_epsilon)

    @classmethod
    def from_gpt2s(cls, m) -> "TorchGPT2":
        """A copy of a gpt2s.GPT2's weights (``m.params``, Hugging Face names and shapes)."""
        model = cls.from_config(m.config)
        own = dict(model.named_parameters())
        conv1d = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight",
                  "mlp.c_proj.weight")
        copied = set()
        with torch.no_grad():
            for name, arr in m.params.items():
                src = torch.from_numpy(np.ascontiguousarray(arr))
                if name.endswith(conv1d):
                    src = src.t()
                dst = own[name]
                if tuple(dst.shape) != tuple(src.shape):
                    raise ValueError(f"{name}: torch shape {tuple(dst.shape)}, gpt2s "
                                     f"{tuple(src.shape)}")
                dst.copy_(src)
                copied.add(name)
        missing = set(own) - copied - {"lm_head.weight"}
        if missing:
            raise ValueError(f"parameters not copied from gpt2s: {sorted(missing)}")
        return model

    def forward(self, idx, targets=None):
        B, T = idx.shape
        pos = torch.arange(T, device=idx.device)
        x = self.wte(idx) + self.wpe(pos)
        for block in self.h:
            x = block(x)
        logits = self.lm_head(self.ln_f(x))
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1),
                                   ignore_index=-1)
        return logits, loss
