"""AdamW (one fused Cython pass over all parameters) and global gradient-norm clipping.

A training step reads the gradients twice at most: ``grad_norm`` (one read pass, only when
clipping) and the fused AdamW update, which multiplies every gradient by ``grad_scale`` as it
reads it.  Gradient accumulation (1 / grad_accum) and clipping (``clip_coefficient``) are
folded into that one factor instead of each rewriting the whole gradient buffer::

    norm = opt.step(grad_scale=1 / grad_accum, max_norm=1.0)   # clip + update, one write pass
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Callable

import numpy as np

from . import _core
from .weights import atomic_write

__all__ = ["AdamW", "clip_grad_norm", "clip_coefficient", "grad_norm", "default_decay_rule"]


def default_decay_rule(name: str, shape: tuple) -> bool:
    """nanoGPT's rule: weight decay for 2-D tensors (matmul weights and embeddings), none for
    biases and layernorm parameters."""
    return len(shape) == 2


class AdamW:
    """AdamW matching ``torch.optim.AdamW``: decoupled weight decay, bias correction.

    ``decay``: a function (name, shape) -> bool choosing the tensors that get weight decay
    (default: ``default_decay_rule``, 2-D tensors only); ``opt.decayed`` lists them.
    ``lr`` may be changed between steps (learning-rate schedules).
    """

    def __init__(self, model, lr: float = 3e-4, betas=(0.9, 0.95), eps: float = 1e-8,
                 weight_decay: float = 0.1,
                 decay: Callable[[str, tuple], bool] = default_decay_rule):
        b1, b2 = betas
        for name, value, lo, hi in (("lr", lr, 0.0, math.inf), ("beta1", b1, 0.0, 1.0),
                                    ("beta2", b2, 0.0, 1.0), ("eps", eps, 0.0, math.inf),
                                    ("weight_decay", weight_decay, 0.0, math.inf)):
            if not (lo <= value < hi) or (name == "eps" and value == 0.0):
                raise ValueError(f"AdamW: invalid {name}={value!r}")
        self.model = model
        self.lr, self.betas, self.eps, self.weight_decay = float(lr), (float(b1), float(b2)), \
            float(eps), float(weight_decay)
        n = model._param_buffer.size
        self.m = np.zeros(n, np.float32)
        self.v = np.zeros(n, np.float32)
        self.t = 0
        self.decayed = [name for name, arr in model.params.items() if decay(name, arr.shape)]
        decayed = set(self.decayed)
        starts, stops, flags = [], [], []
        for name, shape, off in model._layout:
            starts.append(off)
            stops.append(off + int(np.prod(shape)))
            flags.append(1.0 if name in decayed else 0.0)
        self._seg_start = np.array(starts, np.int64)
        self._seg_stop = np.array(stops, np.int64)
        self._seg_flag = np.array(flags, np.float32)

    def step(self, grad_scale: float = 1.0, max_norm: float | None = None) -> float | None:
        """One update of every parameter from ``grad_scale * model.grads``.

        ``grad_scale`` multiplies each gradient as the fused update reads it (e.g.
        ``1 / grad_accum`` after accumulating micro-batches whose losses were means).  With
        ``max_norm``, the scaled gradients are clipped to that global L2 norm first, as
        ``torch.nn.utils.clip_grad_norm_`` would, by folding the clip factor into the same
        scale; returns the norm before clipping (None without ``max_norm``).  The gradient
        buffer itself is left unchanged."""
        grad_scale = float(grad_scale)
        if not (math.isfinite(grad_scale) and grad_scale > 0):
            raise ValueError(f"AdamW.step: grad_scale must be a finite number > 0, "
                             f"got {grad_scale!r}")
        norm = None
        if max_norm is not None:
            _check_max_norm(max_norm, "AdamW.step")
        # a training call: the norm and the update see the same gradients, serialized with
        # backward and zero_grad (the lock is reentrant)
        with self.model._train_lock:
            if max_norm is not None:
                norm = grad_norm(self.model) * grad_scale
                grad_scale *= clip_coefficient(norm, max_norm)
            self._update(grad_scale)
        return norm

    def _update(self, grad_scale: float):
        b1, b2 = self.betas
        model = self.model
        model.grads  # allocated
        self.t += 1
        with model._train_lock:   # a training call: serialized with backward and zero_grad
            _core.adamw_step(model._param_buffer, model._grad_buffer, self.m, self.v,
                             self._seg_start, self._seg_stop,
                             self._seg_flag * np.float32(self.weight_decay), self.lr, b1, b2,
                             self.eps, self.t, grad_scale)

    # ---------------------------------------------------------------- state

    def state_dict(self) -> dict:
        return {"step": self.t, "lr": self.lr, "betas": self.betas, "eps": self.eps,
                "weight_decay": self.weight_decay, "m": self.m.copy(), "v": self.v.copy()}

    def load_state_dict(self, state: dict):
        for key in ("m", "v"):
            arr = np.asarray(state[key])
            if arr.shape != self.m.shape:
                raise ValueError(f"optimizer state {key!r} has shape {arr.shape}, this model "
                                 f"needs {self.m.shape}")
        self.m[...] = state["m"]
        self.v[...] = state["v"]
        self.t = int(state["step"])
        self.lr, self.eps, self.weight_decay = float(state["lr"]), float(state["eps"]), \
            float(state["weight_decay"])
        self.betas = tuple(float(b) for b in state["betas"])

    def save(self, path):
        """Save the optimizer state (.npz), written to a temporary name and renamed."""
        # the live moment buffers, not state_dict()'s copies: saving GPT-2 124M's optimizer
        # would otherwise hold another 1 GB while it writes
        atomic_write(Path(path), lambda f: np.savez(
            f, step=self.t, lr=self.lr, betas=np.array(self.betas), eps=self.eps,
            weight_decay=self.weight_decay, m=self.m, v=self.v))

    def load(self, path):
        with np.load(path) as z:
            self.load_state_dict({k: z[k] for k in z.files})


def _check_max_norm(max_norm, where):
    if not (max_norm > 0):
        raise ValueError(f"{where}: max_norm must be > 0, got {max_norm!r}")


def grad_norm(model) -> float:
    """The global L2 norm of all gradients (one read pass; float32 partial sums per block,
    added in double)."""
    model.grads  # allocated
    with model._train_lock:
        return math.sqrt(_core.sum_squares(model._grad_buffer))


def clip_coefficient(norm: float, max_norm: float) -> float:
    """The factor ``torch.nn.utils.clip_grad_norm_`` multiplies the gradients by:
    ``max_norm / (norm + 1e-6)``, at most 1."""
    return min(1.0, max_norm / (norm + 1e-6))


def clip_grad_norm(model, max_norm: float) -> float:
    """Scale all gradients so their global L2 norm is at most max_norm; returns the norm
    before clipping (as torch.nn.utils.clip_grad_norm_).  A training step does better with
    ``AdamW.step(max_norm=...)``, which folds the factor into the update instead of
    rewriting the gradients."""
    _check_max_norm(max_norm, "clip_grad_norm")
    with model._train_lock:
        norm = grad_norm(model)
        coef = clip_coefficient(norm, max_norm)
        if coef < 1.0:
            _core.scale_inplace(model._grad_buffer, coef)
    return norm
