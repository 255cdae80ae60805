"""AdamW (one fused Cython pass over all parameters) and global gradient-norm clipping."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Callable

import numpy as np

from . import _core
from .weights import atomic_write

__all__ = ["AdamW", "clip_grad_norm", "default_decay_rule"]


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

    def step(self):
        """One update of every parameter from ``model.grads``."""
        self.t += 1
        b1, b2 = self.betas
        model = self.model
        model.grads  # allocated
        with model._train_lock:   # a training call: serialized with backward and zero_grad
            _core.adamw_step(model._param_buffer, model._grad_buffer, self.m, self.v,
                             self._seg_start, self._seg_stop,
                             self._seg_flag * np.float32(self.weight_decay), self.lr, b1, b2,
                             self.eps, self.t, 1.0)

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
        s = self.state_dict()
        atomic_write(Path(path), lambda f: np.savez(
            f, step=s["step"], lr=s["lr"], betas=np.array(s["betas"]), eps=s["eps"],
            weight_decay=s["weight_decay"], m=s["m"], v=s["v"]))

    def load(self, path):
        with np.load(path) as z:
            self.load_state_dict({k: z[k] for k in z.files})


def clip_grad_norm(model, max_norm: float) -> float:
    """Scale all gradients so their global L2 norm is at most max_norm; returns the norm
    before clipping (as torch.nn.utils.clip_grad_norm_)."""
    if not (max_norm > 0):
        raise ValueError(f"clip_grad_norm: max_norm must be > 0, got {max_norm!r}")
    model.grads
    with model._train_lock:
        norm = math.sqrt(_core.sum_squares(model._grad_buffer))
        coef = max_norm / (norm + 1e-6)
        if coef < 1.0:
            _core.scale_inplace(model._grad_buffer, coef)
    return norm
