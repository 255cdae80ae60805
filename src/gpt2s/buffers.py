"""The buffers a call writes besides its result: the activation arenas of a workspace and the
KV cache of a generation."""

from __future__ import annotations

import math

import numpy as np

__all__ = ["Arena", "Workspace", "KVCache"]


class Arena:
    """Named float32 arrays carved from one allocation, regrown only when a larger request
    arrives (no allocation per step).  The views of the last few layouts are kept: a decoding
    step asks for the same one every token, and building its twenty views cost ~0.4 ms a
    token (2% of a bfloat16 GPT-2 step)."""

    _KEEP = 8   # layouts whose views are kept

    def __init__(self):
        self._buf = np.empty(0, np.float32)
        self._carved = {}

    def carve(self, spec: dict) -> dict:
        """{name: array of shape spec[name]}, each starting on a 64-byte boundary of the
        arena; valid until the next carve of a larger total."""
        key = tuple(spec.items())
        views = self._carved.get(key)
        if views is None:
            sizes = {k: math.prod(s) for k, s in spec.items()}
            total = sum((n + 15) // 16 * 16 for n in sizes.values())
            if total > self._buf.size:
                self._buf = np.empty(total, np.float32)
                self._carved.clear()   # views of the old buffer
            views, off = {}, 0
            for k, shape in spec.items():
                views[k] = self._buf[off:off + sizes[k]].reshape(shape)
                off += (sizes[k] + 15) // 16 * 16
            if len(self._carved) >= self._KEEP:
                del self._carved[next(iter(self._carved))]
            self._carved[key] = views
        return dict(views)

    @property
    def nbytes(self) -> int:
        return self._buf.nbytes


class Workspace:
    """Everything one call writes besides its result: the activations of a forward, the
    backward's temporaries and the logits of ``forward(..., return_logits=False)``.

    Inference calls use a workspace of their own thread, so any number of threads can run
    ``forward`` (no targets) and ``generate`` on one model at once: the weights are only
    read.  Training calls share the model's one training workspace under its training lock.
    """

    def __init__(self):
        self.acts = Arena()
        self.scratch = Arena()
        self.logits = Arena()

    @property
    def nbytes(self) -> int:
        return self.acts.nbytes + self.scratch.nbytes + self.logits.nbytes


class KVCache:
    """The keys and values of the positions a generation has run (`GPT2.kv_cache`,
    `GPT2.forward_cached`).

    ``keys`` and ``values`` are float32 arrays of shape (n_layer, rows, capacity, n_embd):
    ``keys[l, b, p]`` holds the keys of every head (side by side, as ``c_attn`` lays them out)
    of position p of sequence b in block l.  A position holds data only once a
    ``forward_cached`` call has run it; the arrays start uninitialised.

    A cache belongs to one generation: two calls that use one cache at the same time (two
    threads, or two interleaved sequences) would overwrite each other's positions.

    Args:
        keys: the keys array, (n_layer, rows, capacity, n_embd) float32.
        values: the values array, the same shape.

    Raises:
        ValueError: the arrays are not two float32 arrays of one 4-d shape.

    Examples:
        >>> from gpt2s import GPT2, GPT2Config
        >>> cache = GPT2(GPT2Config.preset("tiny")).kv_cache(2, positions=16)
        >>> cache.keys.shape, cache.rows, cache.capacity
        ((2, 2, 16, 64), 2, 16)
        >>> cache.view_rows(1, 2).keys.shape
        (2, 1, 16, 64)
    """

    __slots__ = ("keys", "values")

    def __init__(self, keys: np.ndarray, values: np.ndarray):
        if not (isinstance(keys, np.ndarray) and isinstance(values, np.ndarray)
                and keys.dtype == values.dtype == np.float32 and keys.ndim == 4
                and keys.shape == values.shape):
            raise ValueError(f"a KV cache is two float32 arrays of one shape (n_layer, rows, "
                             f"capacity, n_embd); got {_describe(keys)} and {_describe(values)}")
        self.keys = keys
        self.values = values

    @classmethod
    def empty(cls, n_layer: int, rows: int, capacity: int, n_embd: int) -> "KVCache":
        """A new cache of that shape (uninitialised)."""
        shape = (n_layer, rows, capacity, n_embd)
        return cls(np.empty(shape, np.float32), np.empty(shape, np.float32))

    @property
    def rows(self) -> int:
        """How many sequences the cache holds (the batch size of its calls)."""
        return self.keys.shape[1]

    @property
    def capacity(self) -> int:
        """How many positions each sequence may have."""
        return self.keys.shape[2]

    @staticmethod
    def check(cache, config, rows: int, positions: int):
        """Raise TypeError unless cache is a KVCache, ValueError unless it is one for a model
        of config with that many rows and room for that many positions."""
        if not isinstance(cache, KVCache):
            raise TypeError(f"cache must be a KVCache (GPT2.kv_cache), got "
                            f"{type(cache).__name__}")
        L, B, capacity, C = cache.keys.shape
        if (L, C, B) != (config.n_layer, config.n_embd, rows):
            raise ValueError(f"{cache} does not fit a model of n_layer={config.n_layer}, "
                             f"n_embd={config.n_embd} and token ids of B={rows} rows")
        if positions > capacity:
            raise ValueError(f"position {positions - 1} is beyond the KV cache's {capacity} "
                             f"positions")

    def view_rows(self, start: int, stop: int) -> "KVCache":
        """The cache of sequences start .. stop - 1, sharing this cache's memory."""
        return KVCache(self.keys[:, start:stop], self.values[:, start:stop])

    def __repr__(self):
        n_layer, rows, capacity, n_embd = self.keys.shape
        return f"KVCache(n_layer={n_layer}, rows={rows}, capacity={capacity}, n_embd={n_embd})"


def _describe(a) -> str:
    if isinstance(a, np.ndarray):
        return f"{a.dtype} {a.shape}"
    return type(a).__name__
