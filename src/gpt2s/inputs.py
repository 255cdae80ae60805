"""Checks of what callers pass to a model (token ids, targets, counts): each returns the value
normalised or raises an error that names the argument and the bad value."""

from __future__ import annotations

import numbers

import numpy as np

from .config import GPT2Config

__all__ = ["check_token_ids", "check_targets", "check_int", "check_row_positions"]


def check_int(name: str, value, minimum: int) -> int:
    """value as an int; TypeError unless it is an integer (bool is not), ValueError below
    minimum."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an integer, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return int(value)


def _short(value, limit: int = 40) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def check_token_ids(idx, config: GPT2Config, name: str = "idx") -> np.ndarray:
    """Token ids for a model of this config, as a C-contiguous int64 array (B, T) (a 1-D idx
    is one sequence, B = 1).

    Raises:
        TypeError: idx is not an integer array.
        ValueError: no ids, a shape other than (B, T) or (T,), T > n_ctx, or an id outside
            [0, vocab_size) (the message names its position).

    Examples:
        >>> from gpt2s import GPT2Config
        >>> check_token_ids([464, 3290], GPT2Config.preset("tiny"))
        array([[ 464, 3290]])
    """
    a = np.asarray(idx)
    if a.dtype.kind in "USO" and any(isinstance(v, (str, bytes)) for v in a.flat):
        raise TypeError(f"{name} must be an integer array of token ids, got text "
                        f"({_short(idx)}): for text in and text out use "
                        f"model.generate_text(prompt, max_new_tokens), or encode the text "
                        f"with gpt2s.get_tokenizer().encode(prompt)")
    if a.size == 0:   # before the dtype: np.asarray([]) is float64
        raise ValueError(f"{name} is empty (shape {a.shape}): give at least one token id")
    if a.dtype == np.bool_ or not np.issubdtype(a.dtype, np.integer):
        raise TypeError(f"{name} must be an integer array of token ids, got dtype {a.dtype}")
    if a.ndim == 1:
        a = a[None, :]
    if a.ndim != 2:
        raise ValueError(f"{name} must have shape (B, T) or (T,), got shape {a.shape}")
    B, T = a.shape
    if T > config.n_ctx:
        raise ValueError(f"{name} has T={T} positions, longer than the model's context "
                         f"n_ctx={config.n_ctx}")
    lo, hi = int(a.min()), int(a.max())
    if lo < 0 or hi >= config.vocab_size:
        bad = lo if lo < 0 else hi
        where = tuple(int(i) for i in np.argwhere(a == bad)[0])
        raise ValueError(f"{name} contains token id {bad} at {where}, outside "
                         f"[0, {config.vocab_size})")
    return np.ascontiguousarray(a, dtype=np.int64)


def check_targets(targets, shape: tuple, vocab_size: int) -> np.ndarray:
    """Targets of token ids of the given (B, T) shape, as a C-contiguous int64 array: each in
    [0, vocab_size) or -1 (not counted in the loss).  A 1-D array is one sequence.

    Raises:
        TypeError: targets is not an integer array.
        ValueError: another shape, or a value outside [-1, vocab_size) (named with its
            position).
    """
    t = np.asarray(targets)
    if t.dtype == np.bool_ or not np.issubdtype(t.dtype, np.integer):
        raise TypeError(f"targets must be an integer array, got dtype {t.dtype}")
    if t.ndim == 1:
        t = t[None, :]
    if t.shape != shape:
        raise ValueError(f"targets has shape {np.asarray(targets).shape}, idx has {shape}")
    bad = (t < -1) | (t >= vocab_size)
    if bad.any():
        where = tuple(int(i) for i in np.argwhere(bad)[0])
        raise ValueError(f"targets contains {int(t[where])} at {where}, outside "
                         f"[0, {vocab_size}) and not the ignore value -1")
    return np.ascontiguousarray(t, dtype=np.int64)


def check_row_positions(pos, rows: int, name: str = "pos0") -> np.ndarray:
    """Per-row positions (one int >= 0 per row of a batch of ``rows``) as a C-contiguous
    int64 array; TypeError unless integers, ValueError for another count or a negative one."""
    a = np.asarray(pos)
    if a.dtype == np.bool_ or not np.issubdtype(a.dtype, np.integer):
        raise TypeError(f"{name} must be an integer or one integer per row, got dtype {a.dtype}")
    if a.shape != (rows,):
        raise ValueError(f"{name} must be an integer or one per row ({rows},), got shape "
                         f"{a.shape}")
    if rows and int(a.min()) < 0:
        raise ValueError(f"{name} must be >= 0, got {int(a.min())} for row "
                         f"{int(np.argmin(a))}")
    return np.ascontiguousarray(a, dtype=np.int64)
