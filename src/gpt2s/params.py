"""The parameter store: a model's parameters and gradients, laid out once for the kernels, the
optimizer and the gradient reduction."""

from __future__ import annotations

import threading

import numpy as np

from . import _core
from . import weight_types as _wt
from .config import GPT2Config
from .weights import ALIGN, layer_views, param_layout

__all__ = ["ParameterStore"]


def _family(config):
    """(layout function, per-block views function, block-name function) of a config: GPT-2's
    from weights.py, another family's (e.g. `gpt2s.llama.LlamaConfig`) from its own methods
    ``param_layout()``, ``layer_views(tensors, layer)`` and ``layer_of(name)``."""
    if isinstance(config, GPT2Config):
        def layer_of(name):
            if not name.startswith("h."):
                return None
            l, suffix = name[2:].split(".", 1)
            return int(l), suffix
        return (lambda: param_layout(config)), layer_views, layer_of
    if all(callable(getattr(config, m, None)) for m in ("param_layout", "layer_views",
                                                        "layer_of")):
        return config.param_layout, config.layer_views, config.layer_of
    raise TypeError(f"config must be a GPT2Config, got {type(config).__name__}")


def _views(buffer: np.ndarray, layout) -> dict:
    return {name: buffer[off:off + int(np.prod(shape))].reshape(shape)
            for name, shape, off in layout}


class ParameterStore:
    """The parameters of one model (``GPT2.store``), their gradients and the training lock.

    The float32 parameters live in one contiguous vector, `buffer`: tensor ``name`` is
    ``buffer[offset:offset + size]`` for its entry ``(name, shape, offset)`` of ``layout``, and
    ``params[name]`` is that slice as an array of its shape.  The gradients (`grad_buffer`,
    `grads`) and AdamW's moments use the same layout, so an optimizer step or a gradient
    reduction is one pass over one vector.  A store of another dtype ("bfloat16", "int8",
    inference only) keeps its matmul weights compressed in ``params`` (one
    `gpt2s._core.PackedWeight` each) and only the small float32 tensors (biases, layernorms,
    ``wpe``) in `buffer` and ``layout``.

    A store loaded with ``mmap=True`` (`GPT2.from_safetensors`) starts with its float32
    parameters viewing the file's copy-on-write mapping (`mapped` is True, `buffer` does not
    exist yet); the first use of `buffer` (an optimizer, the gradients, a broadcast) copies them
    in and lets the mapping go.

    Training calls (a forward with targets, ``backward``, `zero_grad`, ``AdamW.step``, the
    gradient clipping and reduction) hold ``lock``, a reentrant lock: they write the gradients,
    the parameters and the model's training buffers, one at a time.

    Args:
        config: the model's sizes: a `GPT2Config`, or another family's config that lays out
            its own parameters (``param_layout()``, ``layer_views``, ``layer_of``: the
            `gpt2s.llama_config.LlamaConfig`).
        dtype: the storage of the matmul weights: "float32" (trainable), "bfloat16" or "int8".
        allocate: False leaves the float32 parameters (or the compressed matmul weights) as
            read-only zero-byte placeholders of the right shapes, for a loader that replaces
            every one with `set_param`.

    Attributes:
        config: the model's sizes.
        dtype: the storage dtype of the matmul weights.
        layout: ``[(name, shape, offset)]`` of the float32 tensors in `buffer`, in Hugging Face
            order (wte, wpe, h.0 .. h.L-1, ln_f, an untied lm_head).
        params: name -> parameter (a float32 view, or a compressed weight), every tensor of
            the model in that order.
        layer_params: per transformer block, the dict {suffix: parameter} of its tensors
            (``layer_params[3]["mlp.c_fc.weight"] is params["h.3.mlp.c_fc.weight"]``).
        lock: the training lock (a ``threading.RLock``).

    Raises:
        TypeError: config is neither a `GPT2Config` nor a family's config.
        ValueError: an unknown dtype.

    Examples:
        >>> from gpt2s import GPT2, GPT2Config
        >>> store = GPT2.from_config(GPT2Config.preset("tiny"), seed=0).store
        >>> name, shape, offset = store.layout[2]   # after wte and wpe
        >>> name, shape, offset == store.params["wte.weight"].size + store.params["wpe.weight"].size
        ('h.0.ln_1.weight', (64,), True)
        >>> bool(np.shares_memory(store.params[name], store.buffer[offset:offset + 64]))
        True
    """

    def __init__(self, config: GPT2Config, dtype: str = "float32", *, allocate: bool = True):
        layout_of, self._layer_views, self._layer_of = _family(config)
        self.config = config
        self.dtype = _wt.check_dtype(dtype)
        self.layout, size = layout_of()
        if dtype != "float32":
            # only the small tensors (biases, layernorms, wpe) in the float32 buffer
            layout, size = [], 0
            for name, shape, _ in self.layout:
                if not _wt.is_compressed(name):
                    layout.append((name, shape, size))
                    size += (int(np.prod(shape)) + ALIGN - 1) // ALIGN * ALIGN
            full, self.layout = self.layout, layout
        self._size = size
        self._mapping = None   # the file mapping the parameters view, kept open while they do
        # the float32 parameters: one contiguous buffer, or None while a loaded model's
        # parameters are views of its file mapping: the first use of `buffer` copies them in
        if allocate or dtype != "float32":   # (a compressed model's small tensors: always)
            self._buffer = np.zeros(size, np.float32)
            self.params = _views(self._buffer, self.layout)
        else:
            self._buffer = None
            self.params = {name: np.broadcast_to(np.float32(0), shape)
                           for name, shape, _ in self.layout}
        if dtype != "float32":   # every parameter, in the float32 model's order
            self.params = {name: self.params[name] if name in self.params
                           else _wt.get(dtype).empty(name, shape) if allocate
                           else np.broadcast_to(np.float32(0), shape)
                           for name, shape, _ in full}
        self._grad_buffer = None
        self._grads = None
        self.layer_params = [self._layer_views(self.params, l) for l in range(config.n_layer)]
        self._layer_grads = None
        self.lock = threading.RLock()
        # counts the `set_param` calls: what a model derived from the parameters (a plan of
        # their pointers) compares to know it is stale
        self.version = 0

    # ------------------------------------------------------------------ parameters

    def set_param(self, name: str, value):
        """Make value (a float32 array of the parameter's shape, or a compressed weight) the
        parameter ``name``, in ``params`` and in its block's dict of ``layer_params``.  The value
        is used as it is, not copied (a loader passes views of a file mapping)."""
        self.params[name] = value
        self.version += 1
        block = self._layer_of(name)
        if block is not None:
            self.layer_params[block[0]][block[1]] = value

    def copy_param(self, name: str, value: np.ndarray):
        """Write the float32 tensor value into parameter ``name``: copied into its view of the
        buffer, or compressed into a new weight when the store keeps that tensor compressed."""
        if _wt.is_compressed(name) and self.dtype != "float32":
            self.set_param(name, _wt.get(self.dtype).compress(name, value))
        else:
            self.params[name][...] = value

    @property
    def buffer(self) -> np.ndarray:
        """The float32 parameters as one contiguous vector in the order of ``layout``.  While the
        parameters view a file mapping (`mapped`), the first use copies them into a new vector
        and makes ``params`` views of it; views taken from ``params`` before then keep
        pointing at the mapping."""
        if self._buffer is None:
            with self.lock:
                if self._buffer is None:
                    flat = np.empty(self._size, np.float32)
                    views = _views(flat, self.layout)
                    for name, view in views.items():
                        view[...] = self.params[name]
                    for name, view in views.items():
                        self.set_param(name, view)
                    self._buffer = flat
                    self._mapping = None   # closed once no view of it is left
        return self._buffer

    @property
    def mapped(self) -> bool:
        """True while some parameters are views of the file they were loaded from."""
        return self._mapping is not None

    def keep_mapping(self, mapping):
        """Keep the file mapping some parameters view open as long as the store needs it
        (until `buffer` copies them in)."""
        self._mapping = mapping

    # ------------------------------------------------------------------ compute dtype

    compute_dtype = "float32"
    compute_buffer = None    # float32 store, bfloat16 compute: the bf16 bits of `buffer`
    compute_params = None    # name -> the bfloat16 copy (uint16 bits) of each matmul weight
    compute_layers = None    # per block, {suffix: bfloat16 copy}, as layer_params

    def set_compute_dtype(self, compute_dtype: str):
        """Choose the precision of the matmuls: "float32", or "bfloat16" (bfloat16 operands,
        float32 sums; the float32 parameters stay the master copy).  For "bfloat16" a float32
        store keeps a bfloat16 copy of its parameters (``compute_buffer``, laid out as
        `buffer`, which AdamW's step refreshes as it updates them, and ``compute_params``, the
        matmul weights' views of it, uint16 bits); a bfloat16 store's matmul weights are their
        own copies.

        Raises:
            ValueError: an unknown compute dtype, or "bfloat16" on an int8 / int4 store.
        """
        if compute_dtype not in ("float32", "bfloat16"):
            raise ValueError(f"compute_dtype must be 'float32' or 'bfloat16', got "
                             f"{compute_dtype!r}")
        with self.lock:
            if compute_dtype == "float32":
                self.compute_buffer = self.compute_params = self.compute_layers = None
            elif self.dtype == "float32":
                self.compute_buffer = np.zeros(self._size, np.uint16)
                self.compute_params = {
                    name: self.compute_buffer[off:off + int(np.prod(shape))].reshape(shape)
                    for name, shape, off in self.layout if _wt.is_compressed(name)}
                self.refresh_compute_weights()
            elif self.dtype == "bfloat16":
                self.compute_params = {name: w.data for name, w in self.params.items()
                                       if isinstance(w, _core.PackedWeight)}
            else:
                raise ValueError(f"compute_dtype='bfloat16' needs float32 or bfloat16 "
                                 f"weights; this model stores them in {self.dtype}")
            if self.compute_params is not None:
                layers = [{} for _ in range(self.config.n_layer)]
                for name, w in self.compute_params.items():
                    block = self._layer_of(name)
                    if block is not None:
                        layers[block[0]][block[1]] = w
                self.compute_layers = layers
            self.compute_dtype = compute_dtype

    def refresh_compute_weights(self):
        """Round the float32 parameters into their bfloat16 copies again (after a write into
        ``params`` other than an optimizer step, which refreshes them itself).  Nothing to do
        unless the store is float32 with compute_dtype "bfloat16"."""
        if self.compute_buffer is None:
            return
        with self.lock:
            if self._buffer is not None:
                _core.bf16_round_into(self.compute_buffer, self._buffer)
                return
            for name, shape, off in self.layout:   # still viewing the file mapping
                x = np.ascontiguousarray(self.params[name], np.float32).reshape(-1)
                _core.bf16_round_into(self.compute_buffer[off:off + x.size], x)

    # ------------------------------------------------------------------ gradients

    def check_trainable(self, what: str):
        """Raise RuntimeError (naming what) unless the parameters are float32: a compressed
        store is for inference only."""
        if self.dtype != "float32":
            raise RuntimeError(f"{what}: this model stores its weights in {self.dtype}, for "
                               f"inference only (forward, generate); training needs a float32 "
                               f"model (GPT2.from_safetensors(path) or m.to_dtype('float32'))")

    @property
    def grads(self) -> dict:
        """name -> gradient, float32 views of `grad_buffer` with the names and shapes of the
        float32 ``params`` (allocated, as zeros, on first use).

        Raises:
            RuntimeError: the store is not float32.
        """
        if self._grads is None:
            self.check_trainable("grads")
            with self.lock:
                if self._grads is None:
                    buffer = np.zeros_like(self.buffer)
                    self._layer_grads = None
                    grads = _views(buffer, self.layout)
                    self._layer_grads = [self._layer_views(grads, l)
                                         for l in range(self.config.n_layer)]
                    self._grad_buffer = buffer
                    self._grads = grads
        return self._grads

    @property
    def grad_buffer(self) -> np.ndarray:
        """The gradients as one contiguous vector, in the layout of `buffer` (allocated on
        first use, as `grads`)."""
        self.grads  # allocated
        return self._grad_buffer

    @property
    def layer_grads(self) -> list:
        """Per transformer block, the dict {suffix: gradient} (as ``layer_params``)."""
        self.grads  # allocated
        return self._layer_grads

    def zero_grad(self):
        """Set every gradient to zero (allocating them on first use), under ``lock``.

        Raises:
            RuntimeError: the store is not float32.
        """
        self.check_trainable("zero_grad()")
        with self.lock:
            _core.fill_zero(self.grad_buffer)
