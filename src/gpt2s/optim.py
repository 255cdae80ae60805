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
from .fs import atomic_write

__all__ = ["AdamW", "clip_grad_norm", "clip_coefficient", "grad_norm", "default_decay_rule"]


def default_decay_rule(name: str, shape: tuple) -> bool:
    """nanoGPT's rule for which tensors get weight decay: the 2-D ones (matmul weights and
    embeddings), not biases or layernorm parameters.

    Args:
        name: the parameter's name (unused by this rule).
        shape: its shape.

    Returns:
        True when the tensor gets weight decay.

    Examples:
        >>> default_decay_rule("h.0.mlp.c_fc.weight", (768, 3072)), default_decay_rule("ln_f.bias", (768,))
        (True, False)
    """
    return len(shape) == 2


class AdamW:
    """AdamW, with the update of ``torch.optim.AdamW``: decoupled weight decay, bias correction.

    One fused Cython pass updates every parameter from ``model.grads``.  ``lr`` may be changed
    between steps (learning-rate schedules); ``opt.decayed`` lists the tensors that get weight
    decay.

    Args:
        model: the `GPT2` whose ``params`` it updates.
        lr: learning rate (>= 0).
        betas: (beta1, beta2), each in [0, 1).
        eps: added to the denominator (> 0).
        weight_decay: decoupled weight decay (>= 0), applied where ``decay`` says.
        decay: a function (name, shape) -> bool choosing the tensors that get weight decay
            (default: `default_decay_rule`, 2-D tensors only).

    Raises:
        ValueError: a hyperparameter out of range (named in the message).

    Examples:
        >>> from gpt2s import GPT2, GPT2Config
        >>> m = GPT2.from_config(GPT2Config.preset("tiny"), seed=0)
        >>> opt = AdamW(m, lr=1e-3, weight_decay=0.1)
        >>> m.zero_grad(); _, loss = m.forward([[1, 2, 3]], [[2, 3, 4]]); m.backward()
        >>> opt.step(); opt.t
        1
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
        store = model.store
        n = store.buffer.size
        self.m = np.zeros(n, np.float32)
        self.v = np.zeros(n, np.float32)
        self.t = 0
        self.decayed = [name for name, arr in model.params.items() if decay(name, arr.shape)]
        decayed = set(self.decayed)
        starts, stops, flags = [], [], []
        for name, shape, off in store.layout:
            starts.append(off)
            stops.append(off + int(np.prod(shape)))
            flags.append(1.0 if name in decayed else 0.0)
        self._seg_start = np.array(starts, np.int64)
        self._seg_stop = np.array(stops, np.int64)
        self._seg_flag = np.array(flags, np.float32)

    def step(self, grad_scale: float = 1.0, max_norm: float | None = None) -> float | None:
        """One update of every parameter from ``grad_scale * model.grads``, with the current ``lr``.

        ``grad_scale`` multiplies each gradient as the fused update reads it (e.g. ``1 / grad_accum``
        after accumulating micro-batches whose losses were means).  With ``max_norm``, the scaled
        gradients are clipped to that global L2 norm first, as ``torch.nn.utils.clip_grad_norm_``
        would, by folding the clip factor into the same scale.  The gradient buffer itself is left
        unchanged.  A training call: serialized with the model's backward and zero_grad.

        Args:
            grad_scale: factor applied to every gradient (finite, > 0).
            max_norm: clip the scaled gradients' global norm to this (> 0); None: no clipping.

        Returns:
            the global norm of the scaled gradients before clipping, or None without ``max_norm``.

        Raises:
            ValueError: grad_scale or max_norm out of range.

        Examples:
            >>> from gpt2s import GPT2, GPT2Config
            >>> m = GPT2.from_config(GPT2Config.preset("tiny"), seed=0)
            >>> opt = AdamW(m, lr=1e-3)
            >>> m.zero_grad(); _, loss = m.forward([[1, 2, 3]], [[2, 3, 4]]); m.backward()
            >>> norm = opt.step(max_norm=1.0)
            >>> norm > 0, opt.t
            (True, 1)
        """
        grad_scale = float(grad_scale)
        if not (math.isfinite(grad_scale) and grad_scale > 0):
            raise ValueError(f"AdamW.step: grad_scale must be a finite number > 0, "
                             f"got {grad_scale!r}")
        norm = None
        if max_norm is not None:
            _check_max_norm(max_norm, "AdamW.step")
        # a training call: the norm and the update see the same gradients, serialized with
        # backward and zero_grad (the lock is reentrant), on one thread count
        with self.model.store.lock, _core.pinned_num_threads():
            if max_norm is not None:
                norm = grad_norm(self.model) * grad_scale
                grad_scale *= clip_coefficient(norm, max_norm)
            self._update(grad_scale)
        return norm

    def _update(self, grad_scale: float):
        b1, b2 = self.betas
        store = self.model.store
        store.grads  # allocated
        self.t += 1
        with store.lock:   # a training call: serialized with backward and zero_grad
            _core.adamw_step(store.buffer, store.grad_buffer, self.m, self.v,
                             self._seg_start, self._seg_stop,
                             self._seg_flag * np.float32(self.weight_decay), self.lr, b1, b2,
                             self.eps, self.t, grad_scale,
                             bf16_out=store.compute_buffer)   # compute_dtype "bfloat16"

    # ---------------------------------------------------------------- state

    def state_dict(self) -> dict:
        """The optimizer state: step count, hyperparameters and copies of the moments ``m`` and ``v``.

        Returns:
            a dict that `load_state_dict` accepts.
        """
        return {"step": self.t, "lr": self.lr, "betas": self.betas, "eps": self.eps,
                "weight_decay": self.weight_decay, "m": self.m.copy(), "v": self.v.copy()}

    def load_state_dict(self, state: dict):
        """Restore a state from `state_dict` (moments, step count, hyperparameters).

        Args:
            state: the dict.

        Raises:
            ValueError: the moments do not fit this model's parameters.
            KeyError: a key is missing.
        """
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
        """Save the optimizer state to a ``.npz`` file, written to a temporary name and renamed.

        Args:
            path: the file to write.

        Examples:
            >>> import tempfile, os
            >>> from gpt2s import GPT2, GPT2Config
            >>> m = GPT2.from_config(GPT2Config.preset("tiny"), seed=0)
            >>> path = os.path.join(tempfile.mkdtemp(), "optimizer.npz")
            >>> AdamW(m).save(path)
            >>> opt = AdamW(m); opt.load(path); opt.t
            0
        """
        # the live moment buffers, not state_dict()'s copies: saving GPT-2 124M's optimizer
        # would otherwise hold another 1 GB while it writes
        atomic_write(Path(path), lambda f: np.savez(
            f, step=self.t, lr=self.lr, betas=np.array(self.betas), eps=self.eps,
            weight_decay=self.weight_decay, m=self.m, v=self.v))

    def load(self, path):
        """Restore the state saved by `save`.

        Every array's shape and dtype are read from its ``.npy`` header inside the zip, and the
        member's declared size checked against them, before any array is read: a file that
        declares arrays other than this model's (a zip bomb among them) is refused without
        allocating them.

        Args:
            path: the ``.npz`` file.

        Raises:
            FileNotFoundError: no such file.
            ValueError: the file is not an optimizer state of this model (the message names
                the file and the array).
        """
        path = Path(path)
        expected = {"step": ((), "iu"), "lr": ((), "f"), "eps": ((), "f"),
                    "weight_decay": ((), "f"), "betas": ((2,), "f"),
                    "m": (self.m.shape, "f"), "v": (self.v.shape, "f")}
        _check_npz(path, expected)
        with np.load(path) as z:
            # only the checked arrays: any other member is never read
            self.load_state_dict({k: z[k] for k in expected})


def _check_npz(path: Path, expected: dict):
    """Refuse an .npz unless each array named in ``expected`` (name -> (shape, dtype kinds))
    is there as a plain numeric .npy member of that shape whose declared size is exactly its
    header plus shape x itemsize; reads only the zip directory and the .npy headers."""
    import zipfile
    from numpy.lib import format as npy

    try:
        zf = zipfile.ZipFile(path)
    except zipfile.BadZipFile as e:
        raise ValueError(f"{path}: not an optimizer state (.npz): {e}") from None
    with zf:
        for name, (shape, kinds) in expected.items():
            try:
                info = zf.getinfo(name + ".npy")
            except KeyError:
                raise ValueError(f"{path}: no array {name!r} (not an optimizer state saved by "
                                 f"AdamW.save)") from None
            try:
                with zf.open(info) as f:
                    version = npy.read_magic(f)
                    if version == (1, 0):
                        got_shape, fortran, dtype = npy.read_array_header_1_0(f)
                    elif version == (2, 0):
                        got_shape, fortran, dtype = npy.read_array_header_2_0(f)
                    else:
                        raise ValueError(f".npy format version {version} (1.0 or 2.0 expected)")
                    header_bytes = f.tell()
            except (ValueError, zipfile.BadZipFile, EOFError, NotImplementedError,
                    RuntimeError) as e:   # a bad header, compression method or encryption
                raise ValueError(f"{path}: array {name!r}: not a readable .npy header "
                                 f"({e})") from None
            if dtype.hasobject or dtype.kind not in kinds or dtype.subdtype is not None:
                raise ValueError(f"{path}: array {name!r} has dtype {dtype}, expected "
                                 f"{'an integer' if kinds == 'iu' else 'a float'} dtype")
            if tuple(got_shape) != tuple(shape):
                raise ValueError(f"{path}: array {name!r} has shape {tuple(got_shape)}, this "
                                 f"model needs {tuple(shape)}")
            want = header_bytes + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
            if info.file_size != want:
                raise ValueError(f"{path}: array {name!r} declares {info.file_size:,} bytes, "
                                 f"its header and shape {tuple(shape)} of {dtype} make "
                                 f"{want:,}")


def _check_max_norm(max_norm, where):
    if not (max_norm > 0):
        raise ValueError(f"{where}: max_norm must be > 0, got {max_norm!r}")


def grad_norm(model) -> float:
    """The global L2 norm of all gradients of ``model`` (one read pass; float32 partial sums per
    block, added in double).

    Args:
        model: a `GPT2`.

    Returns:
        the norm, a float.

    Examples:
        >>> from gpt2s import GPT2, GPT2Config
        >>> m = GPT2.from_config(GPT2Config.preset("tiny"), seed=0)
        >>> m.zero_grad(); grad_norm(m)
        0.0
    """
    store = model.store
    store.grads  # allocated
    with store.lock:
        return math.sqrt(_core.sum_squares(store.grad_buffer))


def clip_coefficient(norm: float, max_norm: float) -> float:
    """The factor ``torch.nn.utils.clip_grad_norm_`` multiplies the gradients by:
    ``max_norm / (norm + 1e-6)``, at most 1.

    Args:
        norm: the gradients' global norm.
        max_norm: the largest norm allowed.

    Returns:
        the factor, in (0, 1].

    Examples:
        >>> clip_coefficient(4.0, 1.0) < 0.25 < clip_coefficient(4.0, 1.0) + 1e-6
        True
        >>> clip_coefficient(0.5, 1.0)
        1.0
    """
    return min(1.0, max_norm / (norm + 1e-6))


def clip_grad_norm(model, max_norm: float) -> float:
    """Scale all gradients so that their global L2 norm is at most ``max_norm`` (as
    ``torch.nn.utils.clip_grad_norm_``).

    A training step does better with ``AdamW.step(max_norm=...)``, which folds the factor into
    the update instead of rewriting the gradients.

    Args:
        model: the `GPT2` whose ``grads`` to clip.
        max_norm: the largest norm allowed (> 0).

    Returns:
        the global norm before clipping.

    Raises:
        ValueError: max_norm <= 0.

    Examples:
        >>> from gpt2s import GPT2, GPT2Config
        >>> m = GPT2.from_config(GPT2Config.preset("tiny"), seed=0)
        >>> m.zero_grad(); _, loss = m.forward([[1, 2, 3]], [[2, 3, 4]]); m.backward()
        >>> norm = clip_grad_norm(m, 0.5)
        >>> norm > 0.5, round(clip_grad_norm(m, 0.5), 3)
        (True, 0.5)
    """
    _check_max_norm(max_norm, "clip_grad_norm")
    with model.store.lock:
        norm = grad_norm(model)
        coef = clip_coefficient(norm, max_norm)
        if coef < 1.0:
            _core.scale_inplace(model.store.grad_buffer, coef)
    return norm
