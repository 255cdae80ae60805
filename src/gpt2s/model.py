"""The GPT2 façade: owns the buffers, validates input, calls one _core kernel per layer step."""

from __future__ import annotations

import math
import threading
from pathlib import Path

import numpy as np

from . import _core
from . import generation as _generation
from . import weight_types as _wt
from .config import GPT2Config
from .tokenizer import EOT_ID
from . import weights as _weights
from .weights import ALIGN, layer_views, load_into, open_model, param_layout, save_safetensors

__all__ = ["GPT2"]

_EMPTY1 = np.empty(0, np.float32)
_EMPTY3 = np.empty((0, 0, 0), np.float32)


def _views(buffer: np.ndarray, layout) -> dict:
    return {name: buffer[off:off + int(np.prod(shape))].reshape(shape)
            for name, shape, off in layout}


class _Arena:
    """Named float32 arrays carved from one allocation, regrown only when a larger request
    arrives (no allocation per step).  The views of the last few layouts are kept: a decoding
    step asks for the same one every token, and building its twenty views cost ~0.4 ms a
    token (2% of a bfloat16 GPT-2 step)."""

    _KEEP = 8   # layouts whose views are kept

    def __init__(self):
        self._buf = np.empty(0, np.float32)
        self._carved = {}

    def carve(self, spec: dict) -> dict:
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


class _Workspace:
    """Everything one call writes besides its result: the activations of a forward, the
    backward's temporaries and the logits of ``forward(..., return_logits=False)``.

    Inference calls use a workspace of their own thread, so any number of threads can run
    ``forward`` (no targets) and ``generate`` on one model at once: the weights are only
    read.  Training calls share the model's one training workspace under its training lock.
    """

    def __init__(self):
        self.acts = _Arena()
        self.scratch = _Arena()
        self.logits = _Arena()

    @property
    def nbytes(self) -> int:
        return self.acts.nbytes + self.scratch.nbytes + self.logits.nbytes


class GPT2:
    """GPT-2 with forward, backward and generation in Cython kernels.

    Build one with `from_safetensors` (a Hugging Face checkpoint) or `from_config` (random
    weights); ``GPT2(config)`` alone gives a model whose parameters are all zero.

    Attributes:
        config: the model's sizes (a frozen `GPT2Config`).
        params: Hugging Face parameter names (without the ``transformer.`` prefix) mapped to
            float32 NumPy views of one contiguous buffer (or, after `from_safetensors`, of the
            file's copy-on-write mapping until training starts); matmul weights in GPT-2's
            Conv1D layout ``[in, out]``.  Writing into a view changes the model.  ``grads``
            (below) has the same names and shapes.

    Examples:
        >>> m = GPT2.from_config(GPT2Config.preset("tiny"), seed=0)
        >>> m.params["h.0.attn.c_attn.weight"].shape
        (64, 192)
        >>> logits, loss = m.forward([[464, 3290, 318]], targets=[[3290, 318, 257]])
        >>> logits.shape, round(loss, 1)
        ((1, 3, 50257), 10.9)
    """

    def __init__(self, config: GPT2Config, dtype: str = "float32"):
        self._setup(config, dtype, allocate=True)

    def _setup(self, config: GPT2Config, dtype: str, allocate: bool):
        """The model's state.  allocate=False leaves the float32 model's parameters, or the
        compressed model's matmul weights, as zero-byte placeholders of the right shapes, for
        a loader that replaces every one (`_set_param`)."""
        if not isinstance(config, GPT2Config):
            raise TypeError(f"config must be a GPT2Config, got {type(config).__name__}")
        self.config = config
        self.dtype = _wt.check_dtype(dtype)
        self._layout, size = param_layout(config)
        if dtype != "float32":
            # only the small tensors (biases, layernorms, wpe) in the float32 buffer
            layout, size = [], 0
            for name, shape, _ in self._layout:
                if not _wt.is_compressed(name):
                    layout.append((name, shape, size))
                    size += (int(np.prod(shape)) + ALIGN - 1) // ALIGN * ALIGN
            full, self._layout = self._layout, layout
        # the float32 parameters: one contiguous buffer (AdamW and the gradients share its
        # layout), or None while a loaded model's parameters are views of its file mapping
        # (from_safetensors, mmap=True): the first use of _param_buffer copies them in.
        self._param_size = size
        self._mapping = None   # the file mapping the parameters view, kept open while they do
        if allocate or dtype != "float32":   # (a compressed model's small tensors: always)
            self._flat = np.zeros(size, np.float32)
            self.params = _views(self._flat, self._layout)
        else:
            self._flat = None
            self.params = {name: np.broadcast_to(np.float32(0), shape)
                           for name, shape, _ in self._layout}
        if dtype != "float32":   # every parameter, in the float32 model's order
            self.params = {name: self.params[name] if name in self.params
                           else _wt.get(dtype).empty(name, shape) if allocate
                           else np.broadcast_to(np.float32(0), shape)
                           for name, shape, _ in full}
        self._grad_buffer = None
        self._grads = None
        # per-block dicts of the parameter views (and of the gradient views, with the grads)
        self._layer_params = [layer_views(self.params, l) for l in range(config.n_layer)]
        self._layer_grads = None
        # the variant's choices, made once: the MLP activation kernel, each layer's attention
        # score scale, and the output head (wte, or its own lm_head.weight when untied)
        self._activation = config.activation_kernel
        self._attn_scales = [config.attention_scale(l) for l in range(config.n_layer)]
        self._head_name = "wte.weight" if config.tie_word_embeddings else "lm_head.weight"
        # Threading contract (README, "Threads"): inference calls write only their own
        # thread's workspace and their own KV cache; training calls (forward with targets,
        # backward, zero_grad, the optimizer step) hold this lock, so they are serialized, and
        # a backward checks that the forward it consumes is its own thread's.
        self._train_lock = threading.RLock()
        self._train_ws = _Workspace()
        self._last = None            # what backward needs from the last training forward
        self._local = threading.local()   # .ws: this thread's inference workspace

    # ------------------------------------------------------------------ construction

    @classmethod
    def from_config(cls, config: GPT2Config, seed: int | None = 0,
                    dtype: str = "float32") -> "GPT2":
        """A model of the given sizes with GPT-2's random initialisation.

        Weights and embeddings are drawn from normal(0, 0.02), the residual projections
        (``c_proj``) from normal(0, 0.02 / sqrt(2 n_layer)); layernorm weights are 1 and all biases 0.

        Args:
            config: the sizes, e.g. ``GPT2Config.preset("gpt2")``.
            seed: seed of NumPy's random generator; the same seed gives the same weights.  None
                draws fresh entropy.
            dtype: "float32" (trainable), or "bfloat16" / "int8": an inference model with the
                matmul weights compressed (see `to_dtype`).

        Returns:
            a new `GPT2`.

        Raises:
            TypeError: config is not a `GPT2Config`.

        Examples:
            >>> m = GPT2.from_config(GPT2Config.preset("tiny"), seed=0)
            >>> m.num_parameters()
            3324736
        """
        if _wt.check_dtype(dtype) != "float32":
            return cls.from_config(config, seed).to_dtype(dtype)
        m = cls(config)
        rng = np.random.default_rng(seed)
        proj_std = 0.02 / math.sqrt(2 * config.n_layer)
        for name, view in m.params.items():
            if name.endswith(".bias"):
                view[...] = 0.0
            elif ".ln_" in name or name.startswith("ln_"):
                view[...] = 1.0
            else:
                std = proj_std if name.endswith("c_proj.weight") else 0.02
                rng.standard_normal(out=view, dtype=np.float32)
                view *= np.float32(std)
        return m

    @classmethod
    def from_safetensors(cls, path, dtype: str = "float32", *, mmap: bool = True) -> "GPT2":
        """Load a Hugging Face GPT-2 checkpoint.

        F32, F16 and BF16 tensors are read; keys may carry the ``transformer.`` prefix; the
        ``h.N.attn.bias`` / ``masked_bias`` buffers are ignored; an ``lm_head.weight`` must equal
        ``wte.weight`` unless config.json has ``tie_word_embeddings: false``.  Without
        config.json the sizes come from the file's metadata (gpt2s saves) or the tensor shapes.

        With ``mmap=True`` (the default) a tensor the file already stores in the model's dtype
        (F32 for "float32", BF16 for "bfloat16") is not copied: the parameter is a view of a
        private, copy-on-write mapping of the file, so loading takes no time and the weights
        count once in memory (as file pages the OS can share between processes).  Writing
        into such a view copies only that page; the file is never changed.  Every other tensor
        is converted one at a time (the embedding a few rows at a time), so a load never holds
        two full copies of the model.  Training a mapped float32 model first copies its
        parameters into one buffer (the first use of ``m.grads`` or an optimizer); views
        taken from ``m.params`` before then keep pointing at the mapping.  Do not modify the
        file in place while a mapped model uses it (gpt2s's own saves write a new file and
        rename it, which is safe); ``mmap=False`` reads everything into memory and closes the
        file.

        Args:
            path: a ``.safetensors`` file, or a directory with ``model.safetensors`` (and,
                optionally, ``config.json``).
            dtype: "float32" (trainable); "bfloat16" (BF16 tensors load exactly, others round to
                nearest even) or "int8" (blocks of 32, gpt2s/weight_types.py): an inference model with
                compressed matmul weights.
            mmap: map the file and view the tensors already in the right dtype (True), or
                copy every tensor into memory (False).

        Returns:
            a new `GPT2` with the checkpoint's weights.

        Raises:
            FileNotFoundError: no such file, or a directory without model.safetensors.
            SafetensorsError: the file is not a usable GPT-2 safetensors file (the message names
                the file and the tensor: missing, wrong shape, unknown dtype, truncated, a
                header past the limits of docs/checkpoints.md, a NaN or infinite weight, a
                value dtype cannot hold), or there is not enough memory to load it.
            ValueError: config.json is not valid or does not describe a GPT-2 (the message
                names the file and the field).

        Examples:
            >>> import tempfile
            >>> d = tempfile.mkdtemp()
            >>> _ = GPT2.from_config(GPT2Config.preset("tiny"), seed=0).save_safetensors(d)
            >>> GPT2.from_safetensors(d).config.n_layer
            2
        """
        _wt.check_dtype(dtype)
        file, config = path, None
        try:
            # validated, nothing allocated
            file, mm, header, data_start, config = open_model(path, copy_on_write=bool(mmap))
            try:
                m = cls.__new__(cls)
                # a float32 model whose file has no tensor to view reads into its one buffer
                into_buffer = dtype == "float32" and not (
                    mmap and any(_weights.viewable(info, data_start, "F32")
                                 for info in header.values()))
                m._setup(config, dtype, allocate=into_buffer)
                if into_buffer:
                    load_into(file, header, data_start, mm, m.params, config)
                    viewed = False
                else:
                    viewed = m._load_tensors(file, header, data_start, mm, bool(mmap))
            except BaseException:
                m = None
                try:
                    mm.close()
                except BufferError:   # a view is still held (by the traceback): freed with it
                    pass
                raise
        except MemoryError:
            size = f" ({config.num_parameters():,} parameters)" if config is not None else ""
            raise _weights.SafetensorsError(
                f"{file}: not enough memory to load it as {dtype}{size}") from None
        if viewed:
            m._mapping = mm
        else:
            mm.close()
        return m

    def _load_tensors(self, file, header, data_start, mm, mmap: bool) -> bool:
        """Fill params from the file, each tensor a view of the mapping when it can be (mmap
        and the file's dtype is the storage's), else converted, one tensor or a few embedding
        rows at a time, with the file pages of what was converted dropped as it goes.
        Returns True when some parameter views the mapping."""
        seen = _weights.check_against_config(file, header, len(mm) - data_start, self.config)
        viewed = False
        # one float32 scratch for every tensor converted: a temporary per tensor would leave
        # the heap full of freed holes between the compressed weights (+300 MiB of resident
        # memory over GPT-2 XL's 48 blocks)
        scratch = np.empty(0, np.float32)

        def temporary(shape):
            nonlocal scratch
            size = int(np.prod(shape))
            if scratch.size < size:
                scratch = np.empty(0, np.float32)   # (the old one freed first)
                scratch = np.empty(size, np.float32)
            return scratch[:size].reshape(shape)

        for name in list(self.params):
            raw = seen[name]
            info = header[raw]
            shape = self.params[name].shape
            compressed = self.dtype != "float32" and _wt.is_compressed(name)
            # the file dtype a parameter can be used in place from
            want = "F32" if self.dtype == "float32" else \
                "BF16" if compressed and self.dtype == "bfloat16" else None
            view = _weights.tensor_view(header, raw, data_start, mm, want) if mmap and want \
                else None
            if view is not None:
                viewed = True
                if compressed:
                    _weights.check_bfloat16_bits(file, raw, view)
                    self._set_param(name, _wt.get(self.dtype).from_stored(name, view))
                else:
                    _weights.check_values(file, raw, view)
                    self._set_param(name, view)
                continue
            # values the storage cannot hold are refused as they are read, before compressing
            storage = self.dtype if compressed else "float32"
            if compressed and _wt.is_row_major(name):
                w = _wt.get(self.dtype).empty(name, shape)
                for r0, r1 in _weights.row_chunks(*shape):
                    rows = temporary((r1 - r0, shape[1]))
                    _weights.read_rows(file, header, raw, data_start, mm, rows, r0, storage)
                    _wt.get(self.dtype).compress_rows_into(name, w, r0, rows)
                self._set_param(name, w)
            elif compressed:
                tmp = temporary(shape)
                _weights.read_tensor(file, header, raw, data_start, mm, tmp, storage)
                self._set_param(name, _wt.get(self.dtype).compress(name, tmp))
            elif self._flat is None:       # a float32 model whose other tensors are mapped
                tmp = np.empty(shape, np.float32)
                _weights.read_tensor(file, header, raw, data_start, mm, tmp)
                self._set_param(name, tmp)
            else:
                _weights.read_tensor(file, header, raw, data_start, mm, self.params[name])
            _weights.drop_tensor_pages(mm, data_start, info)
        _weights.check_tied_head(file, header, seen, data_start, mm, self.config)
        return viewed

    def _set_param(self, name: str, value):
        """Make value (a float32 array, or a compressed weight) parameter name, in params and
        in its block's dict."""
        self.params[name] = value
        if name.startswith("h."):
            l, suffix = name[2:].split(".", 1)
            self._layer_params[int(l)][suffix] = value

    @property
    def _param_buffer(self) -> np.ndarray:
        """The float32 parameters as one contiguous vector (the layout of ``_layout``, shared
        with the gradients and AdamW's moments).  A model whose parameters view its file
        mapping copies them in here first (``mmap=True`` loads are zero-copy until trained)."""
        if self._flat is None:
            with self._train_lock:
                if self._flat is None:
                    flat = np.empty(self._param_size, np.float32)
                    views = _views(flat, self._layout)
                    for name, view in views.items():
                        view[...] = self.params[name]
                    for name, view in views.items():
                        self._set_param(name, view)
                    self._flat = flat
                    self._mapping = None   # closed once no view of it is left
        return self._flat

    @property
    def mapped(self) -> bool:
        """True while some parameters are views of the file the model was loaded from
        (``from_safetensors(..., mmap=True)``, the default), rather than copies in memory."""
        return self._mapping is not None

    @classmethod
    def from_pretrained(cls, name_or_path, dtype: str = "float32", *,
                        local_files_only: bool = False) -> "GPT2":
        """Load by name or path: ``"demo"`` (the model bundled with gpt2s), ``"gpt2"``,
        ``"gpt2-medium"``, ``"gpt2-large"``, ``"gpt2-xl"``, ``"openai-community/..."`` (from the
        local Hugging Face cache, else downloaded with huggingface_hub when it is installed,
        the ``hub`` extra), or a path as in ``from_safetensors``.  ``dtype`` is the weight
        storage, as in ``from_safetensors``: "float32", "bfloat16" or "int8" (the latter two
        for inference).  See gpt2s.hub.resolve_pretrained for the rules."""
        from .hub import resolve_pretrained
        dtype = _wt.check_dtype(dtype)
        return cls.from_safetensors(resolve_pretrained(name_or_path,
                                                       local_files_only=local_files_only),
                                    dtype=dtype)

    def _store_param(self, name: str, value: np.ndarray):
        """Set parameter name from a float32 array (compressed when this model's dtype says)."""
        if _wt.is_compressed(name) and self.dtype != "float32":
            self._set_param(name, _wt.get(self.dtype).compress(name, value))
        else:
            self.params[name][...] = value

    def to_dtype(self, dtype: str) -> "GPT2":
        """A new inference model with this one's weights stored in dtype ("bfloat16" or
        "int8": compressed matmul weights; "float32": a copy, widened back from a compressed
        model).  Tensors are converted one at a time; this model is left as it is."""
        m = GPT2(self.config, _wt.check_dtype(dtype))
        for name, w in self.params.items():
            m._store_param(name, w if isinstance(w, np.ndarray) else np.asarray(w))
        return m

    def _require_float32(self, what: str):
        if self.dtype != "float32":
            raise RuntimeError(f"{what}: this model stores its weights in {self.dtype}, for "
                               f"inference only (forward, generate); training needs a float32 "
                               f"model (GPT2.from_safetensors(path) or m.to_dtype('float32'))")

    # ------------------------------------------------------------------ properties

    @property
    def grads(self) -> dict:
        """Gradients, same names and shapes as ``params`` (allocated on first use)."""
        if self._grads is None:
            self._require_float32("grads")
            with self._train_lock:
                if self._grads is None:
                    buffer = np.zeros_like(self._param_buffer)
                    self._layer_grads = None
                    grads = _views(buffer, self._layout)
                    self._layer_grads = [layer_views(grads, l)
                                         for l in range(self.config.n_layer)]
                    self._grad_buffer = buffer
                    self._grads = grads
        return self._grads

    def num_parameters(self) -> int:
        """The number of parameters (weights and biases; the tied ``wte`` counted once).

        Examples:
            >>> GPT2.from_config(GPT2Config.preset("mini"), seed=0).num_parameters()
            7259008
        """
        return sum(v.size for v in self.params.values())

    def __repr__(self):
        c = self.config
        return (f"GPT2(n_layer={c.n_layer}, n_head={c.n_head}, n_embd={c.n_embd}, "
                f"vocab_size={c.vocab_size}, n_ctx={c.n_ctx}, "
                f"parameters={self.num_parameters():,}, dtype={self.dtype!r}, "
                f"mapped={self.mapped}, kernels={_wt.get(self.dtype).kernels()!r})")

    # ------------------------------------------------------------------ input checks

    def _check_idx(self, idx, name="idx") -> np.ndarray:
        a = np.asarray(idx)
        if a.size == 0:   # before the dtype: np.asarray([]) is float64
            raise ValueError(f"{name} is empty (shape {a.shape}): give at least one token id")
        if a.dtype == np.bool_ or not np.issubdtype(a.dtype, np.integer):
            raise TypeError(f"{name} must be an integer array of token ids, got dtype {a.dtype}")
        if a.ndim == 1:
            a = a[None, :]
        if a.ndim != 2:
            raise ValueError(f"{name} must have shape (B, T) or (T,), got shape {a.shape}")
        B, T = a.shape
        if T > self.config.n_ctx:
            raise ValueError(f"{name} has T={T} positions, longer than the model's context "
                             f"n_ctx={self.config.n_ctx}")
        lo, hi = int(a.min()), int(a.max())
        if lo < 0 or hi >= self.config.vocab_size:
            bad = lo if lo < 0 else hi
            where = tuple(int(i) for i in np.argwhere(a == bad)[0])
            raise ValueError(f"{name} contains token id {bad} at {where}, outside "
                             f"[0, {self.config.vocab_size})")
        return np.ascontiguousarray(a, dtype=np.int64)

    def _check_targets(self, targets, shape) -> np.ndarray:
        t = np.asarray(targets)
        if t.dtype == np.bool_ or not np.issubdtype(t.dtype, np.integer):
            raise TypeError(f"targets must be an integer array, got dtype {t.dtype}")
        if t.ndim == 1:
            t = t[None, :]
        if t.shape != shape:
            raise ValueError(f"targets has shape {np.asarray(targets).shape}, idx has {shape}")
        bad = (t < -1) | (t >= self.config.vocab_size)
        if bad.any():
            where = tuple(int(i) for i in np.argwhere(bad)[0])
            raise ValueError(f"targets contains {int(t[where])} at {where}, outside "
                             f"[0, {self.config.vocab_size}) and not the ignore value -1")
        return np.ascontiguousarray(t, dtype=np.int64)

    # ------------------------------------------------------------------ forward

    def __call__(self, idx, targets=None):
        return self.forward(idx, targets)

    def forward(self, idx, targets=None, *, return_logits: bool = True,
                for_backward: bool = True):
        """Logits for every position and, with targets, the mean cross-entropy loss.

        With targets (and ``for_backward``, the default) the activations are kept for `backward`:
        a training call, serialized with the other training calls on this model.  Without targets,
        or with ``for_backward=False`` (evaluation), nothing is kept and any number of threads may
        call it at once.  ``model(idx, targets)`` is the same call.

        Args:
            idx: integer token ids, shape (B, T) or (T,) (then B = 1), T <= ``config.n_ctx``.
            targets: the token each position should predict, same shape as idx; -1 marks a position
                that is not counted in the loss.  None: logits only.
            return_logits: False returns ``(None, loss)`` (training loops): the logits then stay in
                a buffer the model reuses and the backward turns them into their gradient in place,
                saving a (B, T, V) array (51 MB for GPT-2 at B=4, T=64).
            for_backward: False computes the loss only (evaluation), keeping nothing for backward.

        Returns:
            ``(logits, loss)``: logits a new float32 array (B, T, V) the model never overwrites (or
            None, see ``return_logits``); loss a float, the mean over targets != -1 (nan if every
            target is -1), or None without targets.

        Raises:
            TypeError: idx or targets is not an integer array.
            ValueError: no token ids, a bad shape, T > n_ctx, or a token id outside
                [0, vocab_size) (the message names the position).

        Examples:
            >>> m = GPT2.from_config(GPT2Config.preset("tiny"), seed=0)
            >>> logits, loss = m.forward([464, 3290, 318])
            >>> logits.shape, loss
            ((1, 3, 50257), None)
            >>> _, loss = m.forward([[464, 3290]], [[3290, -1]], for_backward=False)
            >>> round(loss, 1)
            10.8
        """
        idx = self._check_idx(idx)
        B, T = idx.shape
        tgt = None if targets is None else self._check_targets(targets, (B, T))
        if tgt is not None and for_backward and self.dtype == "float32":
            with self._train_lock, _core.pinned_num_threads():
                return self._forward_train(idx, tgt, return_logits)
        with _core.pinned_num_threads():   # every kernel of this call on one team size
            return self._forward_inference(idx, tgt, return_logits)

    def _forward_inference(self, idx, tgt, return_logits):
        B, T = idx.shape
        me = threading.get_ident()
        last = self._last
        if last is not None and last["thread"] == me:
            # this thread's pending backward refers to an earlier forward: as before, only the
            # last forward of a thread can be differentiated
            with self._train_lock:
                if self._last is last:
                    self._last = None
        ws = self._thread_workspace()
        logits = np.empty((B, T, self.config.vocab_size), np.float32)
        lnf = self._run_blocks(idx, ws.acts, keep_layers=False)
        _core.lm_head_forward(logits.reshape(B * T, -1), lnf, self.params[self._head_name])
        if tgt is None:
            return logits, None
        loss, _ = self._loss(logits, tgt)
        return (logits if return_logits else None), loss

    def _forward_train(self, idx, tgt, return_logits):
        B, T = idx.shape
        ws = self._train_ws
        if return_logits:
            logits = np.empty((B, T, self.config.vocab_size), np.float32)
        else:
            logits = ws.logits.carve({"logits": (B, T, self.config.vocab_size)})["logits"]
        self._last = None
        acts = self._run_blocks(idx, ws.acts, keep_layers=True, return_all=True)
        _core.lm_head_forward(logits.reshape(B * T, -1), acts["lnf"],
                              self.params[self._head_name])
        loss, lse = self._loss(logits, tgt)
        flat_t = tgt.reshape(-1)
        self._last = dict(idx=idx, targets=flat_t, lse=lse,
                          n_valid=int(np.count_nonzero(flat_t != -1)), logits=logits,
                          logits_owned=not return_logits, acts=acts,
                          thread=threading.get_ident())
        return (logits if return_logits else None), loss

    @staticmethod
    def _loss(logits, tgt):
        """(mean cross-entropy over targets != -1 or nan, the rows' log-sum-exp)."""
        N = tgt.size
        losses = np.empty(N, np.float32)
        lse = np.empty(N, np.float32)
        flat_t = tgt.reshape(-1)
        _core.crossentropy_forward(losses, lse, logits.reshape(N, -1), flat_t)
        n_valid = int(np.count_nonzero(flat_t != -1))
        loss = float(np.sum(losses, dtype=np.float64) / n_valid) if n_valid else float("nan")
        return loss, lse

    def _thread_workspace(self) -> _Workspace:
        ws = getattr(self._local, "ws", None)
        if ws is None:
            ws = self._local.ws = _Workspace()
        return ws

    def _run_blocks(self, idx: np.ndarray, arena: _Arena, keep_layers: bool, kv=None,
                    pos0: int = 0, return_all: bool = False):
        """Embedding, the transformer blocks and the final layernorm; returns lnf (N, C), or
        with return_all the dict of every activation (what the backward reads).

        keep_layers (training): every activation the backward needs is kept, one slice per
        layer.  Otherwise one layer's worth is reused, and the residual stream alternates
        between two buffers.  With kv = (keys, values), each (L, B, capacity, C), idx holds
        positions pos0 .. pos0 + T - 1: their keys and values are appended to the cache and
        attention reads the cache (KV-cache decoding)."""
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
        P = self.params
        _core.embedding_forward(a["encoded"], idx.reshape(-1), P["wte.weight"], P["wpe.weight"], T,
                                pos0)
        _core.layernorm_forward(a["ln1"], a["ln1_mean"][0], a["ln1_rstd"][0], a["encoded"],
                                P["h.0.ln_1.weight"], P["h.0.ln_1.bias"], cfg.layer_norm_epsilon)
        res_in = a["encoded"]
        for l in range(L):
            res_out = a["res3"][l if keep_layers else l % 2]
            self._block_forward(l, a, l if keep_layers else 0, res_in, res_out, B, T, kv, pos0)
            res_in = res_out
        return a if return_all else a["lnf"]

    def _block_forward(self, l, a, s, res_in, res_out, B, T, kv, pos0):
        """Block l: res_out = res2 + mlp(ln_2(res2)), res2 = res_in + attn(ln1), where ln1 (the
        layernorm of res_in) is already in a["ln1"]; then the next block's ln_1 (or ln_f) of
        res_out.  s is the slice of the per-layer activations this block writes."""
        cfg = self.config
        C, eps = cfg.n_embd, cfg.layer_norm_epsilon
        w = self._layer_params[l]
        qkv = a["qkv"][s]
        mm = _core.matmul_forward   # float32, bfloat16 or int8 weights
        mm(qkv, a["ln1"], w["attn.c_attn.weight"], w["attn.c_attn.bias"])
        qkv3 = qkv.reshape(B, T, 3 * C)
        if kv is None:
            _core.attention_forward(a["atty"][s].reshape(B, T, C), a["att_lse"][s],
                                    qkv3, 0, qkv3, C, qkv3, 2 * C, 0, cfg.n_head,
                                    self._attn_scales[l])
        else:
            keys, values = kv[0][l], kv[1][l]
            _core.kv_cache_write(keys, values, qkv3, pos0)
            _core.attention_forward(a["atty"][s].reshape(B, T, C), _EMPTY3, qkv3, 0,
                                    keys, 0, values, 0, pos0, cfg.n_head,
                                    self._attn_scales[l])
        mm(a["proj"], a["atty"][s], w["attn.c_proj.weight"], w["attn.c_proj.bias"])
        _core.residual_layernorm_forward(a["res2"][s], a["ln2"], a["ln2_mean"][s],
                                         a["ln2_rstd"][s], res_in, a["proj"],
                                         w["ln_2.weight"], w["ln_2.bias"], eps)
        mm(a["fch"][s], a["ln2"], w["mlp.c_fc.weight"], w["mlp.c_fc.bias"])
        # act(fch) is not kept per layer: the backward recomputes it (one cheap pass)
        _core.activation_forward(a["fch_gelu"], a["fch"][s], self._activation)
        mm(a["proj"], a["fch_gelu"], w["mlp.c_proj.weight"], w["mlp.c_proj.bias"])
        if l + 1 < cfg.n_layer:   # the next block's ln_1, into ln1 and this slot's stats
            nxt = self._layer_params[l + 1]
            s_next = s + 1 if a["ln1_mean"].shape[0] > 1 else 0
            _core.residual_layernorm_forward(res_out, a["ln1"], a["ln1_mean"][s_next],
                                             a["ln1_rstd"][s_next], a["res2"][s], a["proj"],
                                             nxt["ln_1.weight"], nxt["ln_1.bias"], eps)
        else:
            P = self.params
            _core.residual_layernorm_forward(res_out, a["lnf"], a["lnf_mean"], a["lnf_rstd"],
                                             a["res2"][s], a["proj"], P["ln_f.weight"],
                                             P["ln_f.bias"], eps)

    # ------------------------------------------------------------------ KV-cache decoding

    def _kv_cache(self, B: int, positions: int | None = None):
        """A new KV cache: keys and values (L, B, positions, C), positions <= n_ctx (default
        n_ctx).  Each generation owns its cache, so generations on one model never share one."""
        cfg = self.config
        positions = cfg.n_ctx if positions is None else min(int(positions), cfg.n_ctx)
        shape = (cfg.n_layer, B, positions, cfg.n_embd)
        return np.empty(shape, np.float32), np.empty(shape, np.float32)

    def free_cache(self):
        """Release the calling thread's inference buffers and, when no training call is under way,
        the training activations and scratch; they are allocated again when next needed.

        Each generation's KV cache is its own and is freed when the generation ends.

        Examples:
            >>> m = GPT2.from_config(GPT2Config.preset("tiny"), seed=0)
            >>> _ = m.forward([1, 2, 3])
            >>> m.free_cache()
        """
        self._local.ws = None
        with self._train_lock:
            self._train_ws = _Workspace()
            self._last = None

    def _forward_cached(self, idx: np.ndarray, pos0: int, kv) -> np.ndarray:
        """Logits (B, V) of the last position of idx (B, T) int64, which holds positions
        pos0 .. pos0 + T - 1; positions before pos0 must already be in the cache kv."""
        idx = np.ascontiguousarray(idx, dtype=np.int64)
        B, T = idx.shape
        if pos0 + T > self.config.n_ctx:
            raise ValueError(f"position {pos0 + T - 1} is beyond the context n_ctx="
                             f"{self.config.n_ctx}")
        if pos0 + T > kv[0].shape[2]:
            raise ValueError(f"position {pos0 + T - 1} is beyond the KV cache's "
                             f"{kv[0].shape[2]} positions")
        with _core.pinned_num_threads():
            lnf = self._run_blocks(idx, self._thread_workspace().acts, keep_layers=False,
                                   kv=kv, pos0=pos0)
            last = np.ascontiguousarray(lnf.reshape(B, T, -1)[:, -1, :])
            logits = np.empty((B, self.config.vocab_size), np.float32)
            _core.lm_head_forward(logits, last, self.params[self._head_name])
        return logits

    # ------------------------------------------------------------------ backward

    def zero_grad(self):
        """Set every gradient in ``grads`` to zero (allocating them on first use).

        `backward` adds to the gradients, so call this before each step's first backward.

        Examples:
            >>> m = GPT2.from_config(GPT2Config.preset("tiny"), seed=0)
            >>> m.zero_grad()
            >>> float(abs(m.grads["wte.weight"]).max())
            0.0
        """
        self._require_float32("zero_grad()")
        with self._train_lock:
            self.grads  # allocate on first use
            _core.fill_zero(self._grad_buffer)

    def backward(self, *, normalizer: int | None = None, on_layer_done=None):
        """Add (+=) the gradient of the last forward's mean loss to ``grads``.

        Each ``forward(idx, targets)`` supports one backward, from the thread that made it.  With
        ``forward(..., return_logits=False)`` the backward overwrites the forward's logits buffer.

        Args:
            normalizer: divide the summed loss by this count instead of this forward's number of
                valid targets (data parallel: the global count over all ranks).
            on_layer_done: called as ``on_layer_done(l)`` after block l's backward (l = n_layer-1
                .. 0): from then on the gradients of block l and of everything after it in the
                gradient buffer (blocks l.., ln_f, an untied lm_head) are final, so their reduction
                may start while the backward goes on.

        Raises:
            RuntimeError: no forward with targets (and ``for_backward``) before it, its backward was
                already called, it came from another thread, or every target was -1.

        Examples:
            >>> m = GPT2.from_config(GPT2Config.preset("tiny"), seed=0)
            >>> m.zero_grad()
            >>> _, loss = m.forward([[464, 3290, 318]], [[3290, 318, 257]])
            >>> m.backward()
            >>> bool(m.grads["wte.weight"].any())
            True
        """
        self._require_float32("backward()")
        with self._train_lock, _core.pinned_num_threads() as nt:
            self._backward(normalizer, on_layer_done, nt)

    def _backward(self, normalizer, on_layer_done, nt):
        last = self._last
        if last is None:
            raise RuntimeError("backward() needs a preceding forward(idx, targets) with targets; "
                               "the last forward had no targets, there was none, or its "
                               "backward() was already called")
        if last["thread"] != threading.get_ident():
            raise RuntimeError("backward(): the last forward(idx, targets) on this model was "
                               "made by another thread; training calls on one model must come "
                               "from one thread at a time (forward and its backward from the "
                               "same thread)")
        if normalizer is None:
            if last["n_valid"] == 0:
                raise RuntimeError("backward(): every target of the last forward was -1 "
                                   "(ignored); the loss is undefined")
            normalizer = last["n_valid"]
        elif isinstance(normalizer, bool) or int(normalizer) != normalizer or normalizer < 1:
            raise ValueError(f"backward(): normalizer must be a positive integer, "
                             f"got {normalizer!r}")
        cfg = self.config
        eps = cfg.layer_norm_epsilon
        G, P, a = self.grads, self.params, last["acts"]
        idx = last["idx"]
        B, T = idx.shape
        N, C, L, NH, V, H = B * T, cfg.n_embd, cfg.n_layer, cfg.n_head, cfg.vocab_size, \
            cfg.inner_size
        in_place = last["logits_owned"]  # nobody else sees these logits: dlogits in place
        spec = {"dres": (N, C), "dln": (N, C), "datty": (N, C), "dqkv": (N, 3 * C),
                "dfch": (N, H), "ln_scratch": (nt, 2 * C)}
        if not in_place:
            spec["dlogits"] = (N, V)
        d = self._train_ws.scratch.carve(spec)
        logits = last["logits"].reshape(N, V)
        dlogits = logits if in_place else d["dlogits"]
        _core.crossentropy_backward(dlogits, logits, last["lse"], last["targets"],
                                    np.float32(1.0 / int(normalizer)))
        # like PyTorch without retain_graph, a backward consumes its forward (and here the
        # logits may now hold dlogits)
        self._last = None
        _core.lm_head_backward(d["dln"], G[self._head_name], dlogits, a["lnf"],
                               P[self._head_name])
        dres = d["dres"]
        dres.fill(0.0)
        _core.layernorm_backward(dres, G["ln_f.weight"], G["ln_f.bias"], d["dln"], a["res3"][L - 1],
                                 P["ln_f.weight"], a["lnf_mean"], a["lnf_rstd"], d["ln_scratch"])
        for l in reversed(range(L)):
            w, g = self._layer_params[l], self._layer_grads[l]
            res_in = a["encoded"] if l == 0 else a["res3"][l - 1]
            # MLP: res3 = res2 + act(ln2 @ Wfc + bfc) @ Wproj + bproj
            _core.activation_forward(a["fch_gelu"], a["fch"][l], self._activation)
            _core.matmul_backward(d["dfch"], g["mlp.c_proj.weight"], g["mlp.c_proj.bias"], dres,
                                  a["fch_gelu"], w["mlp.c_proj.weight"], False)
            _core.activation_backward(d["dfch"], a["fch"][l], d["dfch"], self._activation)
            _core.layernorm_forward(a["ln2"], _EMPTY1, _EMPTY1, a["res2"][l], w["ln_2.weight"],
                                    w["ln_2.bias"], eps)
            _core.matmul_backward(d["dln"], g["mlp.c_fc.weight"], g["mlp.c_fc.bias"], d["dfch"],
                                  a["ln2"], w["mlp.c_fc.weight"], False)
            _core.layernorm_backward(dres, g["ln_2.weight"], g["ln_2.bias"], d["dln"], a["res2"][l],
                                     w["ln_2.weight"], a["ln2_mean"][l], a["ln2_rstd"][l],
                                     d["ln_scratch"])
            # attention: res2 = res_in + attn(ln1) @ Wproj + bproj
            _core.matmul_backward(d["datty"], g["attn.c_proj.weight"], g["attn.c_proj.bias"],
                                  dres, a["atty"][l], w["attn.c_proj.weight"], False)
            _core.attention_backward(d["dqkv"].reshape(B, T, 3 * C), d["datty"].reshape(B, T, C),
                                     a["atty"][l].reshape(B, T, C), a["att_lse"][l],
                                     a["qkv"][l].reshape(B, T, 3 * C), NH,
                                     self._attn_scales[l])
            _core.layernorm_forward(a["ln1"], _EMPTY1, _EMPTY1, res_in, w["ln_1.weight"],
                                    w["ln_1.bias"], eps)
            _core.matmul_backward(d["dln"], g["attn.c_attn.weight"], g["attn.c_attn.bias"],
                                  d["dqkv"], a["ln1"], w["attn.c_attn.weight"], False)
            _core.layernorm_backward(dres, g["ln_1.weight"], g["ln_1.bias"], d["dln"], res_in,
                                     w["ln_1.weight"], a["ln1_mean"][l], a["ln1_rstd"][l],
                                     d["ln_scratch"])
            if on_layer_done is not None:
                on_layer_done(l)
        _core.embedding_backward(G["wte.weight"], G["wpe.weight"], dres, idx.reshape(-1), T)

    # ------------------------------------------------------------------ saving

    def save_safetensors(self, path, dtype: str = "float32"):
        """Save the weights in Hugging Face's format.

        A path ending in ``.safetensors`` is written as that one file; any other path is a
        directory (created if needed) that receives ``model.safetensors`` and ``config.json``,
        which ``transformers.GPT2LMHeadModel.from_pretrained`` and `from_safetensors` load.  Each
        file is written to a temporary name and renamed, so an interrupted save never leaves a
        half-written file.

        Args:
            path: a directory, or a file name ending in ``.safetensors``.
            dtype: "float32", "float16" or "bfloat16" (rounded to nearest even).

        Returns:
            the path written (a `pathlib.Path`).

        Raises:
            ValueError: an unknown dtype.
            OSError: the file cannot be written.

        Examples:
            >>> import tempfile, pathlib
            >>> m = GPT2.from_config(GPT2Config.preset("tiny"), seed=0)
            >>> d = m.save_safetensors(tempfile.mkdtemp(), dtype="float16")
            >>> sorted(p.name for p in pathlib.Path(d).iterdir())
            ['config.json', 'model.safetensors']
        """
        return save_safetensors(path, self.params, self.config, dtype=dtype)

    # ------------------------------------------------------------------ generation
    # The decoding loop, sampling and text helpers live in generation.py; these are the
    # public entry points on the model.

    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None, top_p=None,
                 seed=None, *, num_samples=1, stop_at_eos=False, eos_token_id=EOT_ID,
                 context_full="slide"):
        """Continue the prompts ``idx`` by up to ``max_new_tokens`` tokens.

        Args:
            idx: token ids, shape (B, T) (B prompts of the same length) or (T,).
            max_new_tokens: how many tokens to add (>= 0).
            temperature: 0 is greedy argmax; > 0 samples from softmax(logits / temperature).
            top_k: sample only among the k most likely tokens (None: all).
            top_p: sample only within the nucleus of probability top_p, 0 < top_p <= 1.
            seed: an int or a ``numpy.random.Generator`` makes sampling repeatable.
            num_samples: continuations per prompt (rows b*n .. b*n + n-1 for prompt b).
            stop_at_eos: stop each row at ``eos_token_id`` and pad it with that id.
            eos_token_id: the end-of-text id (50256, ``<|endoftext|>``).
            context_full: at n_ctx positions, "slide" the window or "stop" with a warning.

        Returns:
            int64 array (B * num_samples, T + new), the prompts included; new <
            max_new_tokens only when every row stopped at eos or the context was full.

        Raises:
            TypeError, ValueError: a bad argument, named in the message.

        Examples:
            >>> m = GPT2.from_config(GPT2Config.preset("tiny"), seed=0)
            >>> m.generate([464, 3290], 5, temperature=0).shape
            (1, 7)
        """
        return _generation.generate(self, idx, max_new_tokens, temperature, top_k, top_p, seed,
                                    num_samples=num_samples, stop_at_eos=stop_at_eos,
                                    eos_token_id=eos_token_id, context_full=context_full)

    def generate_stream(self, idx, max_new_tokens, temperature=1.0, top_k=None, top_p=None,
                        seed=None, *, num_samples=1, stop_at_eos=False, eos_token_id=EOT_ID,
                        context_full="slide"):
        """Like `generate`, but an iterator over the new tokens as they are made.

        Arguments are checked when this is called, not at the first ``next()``.  Each stream owns
        its KV cache, so streams may be interleaved or consumed in different threads.

        Args:
            idx: token ids, shape (B, T) or (T,).
            max_new_tokens: how many tokens to make (>= 0).
            temperature: 0 is greedy; > 0 samples from softmax(logits / temperature).
            top_k: sample only among the k most likely tokens (None: all).
            top_p: sample only within the nucleus of probability top_p, 0 < top_p <= 1.
            seed: an int or a ``numpy.random.Generator`` makes sampling repeatable.
            num_samples: continuations per prompt.
            stop_at_eos: stop each row at ``eos_token_id``; the iterator ends when every row has.
            eos_token_id: the end-of-text id (50256).
            context_full: at n_ctx positions, "slide" the window or "stop" with a warning.

        Returns:
            an iterator yielding a Python int per step when ``idx`` is 1-D and ``num_samples`` is
            1, otherwise an int64 array of shape (B * num_samples,) per step.

        Raises:
            TypeError, ValueError: a bad argument, named in the message.

        Examples:
            >>> m = GPT2.from_config(GPT2Config.preset("tiny"), seed=0)
            >>> len(list(m.generate_stream([464, 3290], 4, temperature=0)))
            4
        """
        return _generation.generate_stream(self, idx, max_new_tokens, temperature, top_k, top_p,
                                           seed, num_samples=num_samples,
                                           stop_at_eos=stop_at_eos, eos_token_id=eos_token_id,
                                           context_full=context_full)

    def generate_text(self, prompt, max_new_tokens, temperature=1.0, top_k=None, top_p=None,
                      seed=None, *, num_samples=1, stop_at_eos=True, context_full="slide",
                      tokenizer=None):
        """Text in, text out: the continuation of ``prompt`` (without the prompt itself).

        Args:
            prompt: a str, or a list of str that encode to the same number of tokens.
            max_new_tokens: how many tokens to make at most (>= 0).
            temperature: 0 is greedy; > 0 samples from softmax(logits / temperature).
            top_k: sample only among the k most likely tokens (None: all).
            top_p: sample only within the nucleus of probability top_p, 0 < top_p <= 1.
            seed: an int or a ``numpy.random.Generator`` makes sampling repeatable.
            num_samples: continuations per prompt.
            stop_at_eos: end a continuation before the first ``<|endoftext|>`` it makes.
            context_full: at n_ctx positions, "slide" the window or "stop" with a warning.
            tokenizer: a tiktoken ``Encoding`` (default: the bundled GPT-2 tokenizer).

        Returns:
            a str for one prompt and num_samples=1; else a list per prompt or per sample (a list of
            lists for several prompts with num_samples > 1).

        Raises:
            TypeError, ValueError: a bad argument, an empty prompt, or a prompt longer than n_ctx
                tokens.

        Examples:
            >>> m = GPT2.from_config(GPT2Config.preset("tiny"), seed=0)
            >>> isinstance(m.generate_text("Hello", 3, temperature=0), str)
            True
        """
        return _generation.generate_text(self, prompt, max_new_tokens, temperature, top_k, top_p,
                                         seed, num_samples=num_samples,
                                         stop_at_eos=stop_at_eos, context_full=context_full,
                                         tokenizer=tokenizer)
