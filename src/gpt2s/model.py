"""The GPT2 façade: validates input, picks the buffers, holds the training lock and the
thread-count pin, and runs the passes of passes.py over its parameter store (params.py)."""

from __future__ import annotations

import math
import threading

import numpy as np

from . import _core
from . import generation as _generation
from . import weight_types as _wt
from .buffers import KVCache, Workspace
from .config import GPT2Config
from .tokenizer import EOT_ID
from . import weights as _weights
from .inputs import check_int, check_row_positions, check_targets, check_token_ids
from .params import ParameterStore
from .passes import Passes, TrainingForward, cross_entropy

__all__ = ["GPT2"]


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
        store: the `ParameterStore` that holds ``params`` and ``grads``: the flat buffers and
            their layout, the per-block views and the training lock (what an optimizer or a
            gradient reduction works on).

    Examples:
        >>> m = GPT2.from_config(GPT2Config.preset("tiny"), seed=0)
        >>> m.params["h.0.attn.c_attn.weight"].shape
        (64, 192)
        >>> logits, loss = m.forward([[464, 3290, 318]], targets=[[3290, 318, 257]])
        >>> logits.shape, round(loss, 1)
        ((1, 3, 50257), 10.9)
    """

    def __init__(self, config: GPT2Config, dtype: str = "float32"):
        self._setup(ParameterStore(config, dtype))

    def _setup(self, store: ParameterStore):
        self.store = store
        self.config, self.dtype = store.config, store.dtype
        self._passes = Passes(store)
        # Threading contract (README, "Threads"): inference calls write only their own
        # thread's workspace and their own KV cache; training calls (forward with targets,
        # backward, zero_grad, the optimizer step) hold the store's lock, so they are
        # serialized, and a backward checks that the forward it consumes is its own thread's.
        self._train_ws = Workspace()
        self._last = None            # the TrainingForward the next backward consumes
        self._local = threading.local()   # .ws: this thread's inference workspace

    # ------------------------------------------------------------------ construction

    @classmethod
    def from_config(cls, config: GPT2Config, seed: int | None = 0,
                    dtype: str = "float32", *, compute_dtype: str = "float32") -> "GPT2":
        """A model of the given sizes with GPT-2's random initialisation.

        Weights and embeddings are drawn from normal(0, 0.02), the residual projections
        (``c_proj``) from normal(0, 0.02 / sqrt(2 n_layer)); layernorm weights are 1 and all biases 0.

        Args:
            config: the sizes, e.g. ``GPT2Config.preset("gpt2")``.
            seed: seed of NumPy's random generator; the same seed gives the same weights.  None
                draws fresh entropy.
            dtype: "float32" (trainable), or "bfloat16" / "int8": an inference model with the
                matmul weights compressed (see `to_dtype`).
            compute_dtype: the precision of the matmuls, "float32" or "bfloat16" (see
                `compute_dtype`).

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
            m = cls.from_config(config, seed).to_dtype(dtype)
            m.compute_dtype = compute_dtype
            return m
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
        m.compute_dtype = compute_dtype
        return m

    @classmethod
    def from_safetensors(cls, path, dtype: str | None = None, *, mmap: bool = True,
                         progress=None, compute_dtype: str = "float32") -> "GPT2":
        """Load a Hugging Face GPT-2 checkpoint.

        F32, F16 and BF16 tensors are read; keys may carry the ``transformer.`` prefix; the
        ``h.N.attn.bias`` / ``masked_bias`` buffers are ignored; an ``lm_head.weight`` must equal
        ``wte.weight`` unless config.json has ``tie_word_embeddings: false``.  Without
        config.json the sizes come from the file's metadata (gpt2s saves) or the tensor shapes.
        A file `save_safetensors` wrote in another storage loads as that storage by default:
        a bfloat16 model's file as bfloat16, a packed int8 or int4 file as int8 or int4, its
        stored blocks used as they are (mapped, never quantized again).

        With ``mmap=True`` (the default) a tensor the file already stores in the model's dtype
        (F32 for "float32", BF16 for "bfloat16", the packed blocks and scales of a packed file for
        its own type) is not copied: the parameter is a view of a
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
            dtype: None (the default): the file's own storage, "float32" for any file gpt2s
                did not save in another type; "float32" (trainable); "bfloat16" (BF16 tensors
                load exactly, others round to nearest even), "int8" or "int4" (blocks of 32,
                gpt2s/weight_types.py): an inference model with compressed matmul weights.
            mmap: map the file and view the tensors already in the right dtype (True), or
                copy every tensor into memory (False).
            progress: called as ``progress(done, total)`` after each tensor, with the
                parameters loaded so far and in all (a progress bar over a long conversion).
            compute_dtype: the precision of the matmuls, "float32" (the default) or
                "bfloat16" (see `compute_dtype`).

        Returns:
            a new `GPT2` with the checkpoint's weights.

        Raises:
            FileNotFoundError: no such file, or a directory without model.safetensors.
            SafetensorsError: the file is not a usable GPT-2 safetensors file (the message names
                the file and the tensor: missing, wrong shape, unknown dtype, truncated, a
                header past the limits of docs/checkpoints.md, a NaN or infinite weight or
                block scale, a value dtype cannot hold, a packed file of a format version,
                weight type or layout this gpt2s cannot read), or there is not enough memory
                to load it.
            ValueError: config.json is not valid or does not describe a GPT-2 (the message
                names the file and the field).

        Examples:
            >>> import tempfile
            >>> d = tempfile.mkdtemp()
            >>> _ = GPT2.from_config(GPT2Config.preset("tiny"), seed=0).save_safetensors(d)
            >>> GPT2.from_safetensors(d).config.n_layer
            2
        """
        from . import gguf_io
        if gguf_io.is_gguf(path):   # a .gguf file: GPT2.from_gguf
            m = cls.from_gguf(path, dtype, progress=progress)
        else:
            m = cls.__new__(cls)
            m._setup(_weights.load_parameters(path, dtype, mmap=mmap, progress=progress))
        m.compute_dtype = compute_dtype
        return m

    @classmethod
    def from_gguf(cls, path, dtype: str | None = None, *, progress=None) -> "GPT2":
        """Load a GPT-2 GGUF file (llama.cpp's layout, as its convert_hf_to_gguf.py writes
        it) through the ``gguf`` package (the ``gguf`` extra).

        F32, F16 and BF16 tensors are read exactly; Q8_0 and Q4_0 blocks are gpt2s's int8 and
        int4 numbers and load as those types block for block (repacked, never quantized
        again); other ggml block types are widened with the gguf package and converted.  A
        file's ``output`` head whose bytes equal ``token_embd``'s is the tied head, another
        one an untied ``lm_head``.  ``from_safetensors`` and ``from_pretrained`` load a
        ``.gguf`` path through this method.  See docs/checkpoints.md, "GGUF".

        Args:
            path: a ``.gguf`` file.
            dtype: None: the storage that holds the file's block weights as they are (Q8_0:
                "int8", Q4_0: "int4", BF16: "bfloat16", else "float32"); or any gpt2s dtype.
            progress: called as ``progress(done, total)`` after each tensor.

        Returns:
            a new `GPT2`.

        Raises:
            FileNotFoundError: no such file.
            ModuleNotFoundError: the gguf package is not installed.
            gpt2s.gguf_io.GGUFError: not a GGUF file gpt2s can use (the message names the file
                and the key or tensor: another architecture, a missing or unexpected tensor,
                a wrong shape, a type gpt2s does not read, another tokenizer).
            SafetensorsError: a NaN or infinite weight or block scale (named).
        """
        from . import gguf_io
        m = cls.__new__(cls)
        m._setup(gguf_io.load_parameters(path, dtype, progress=progress))
        return m

    @classmethod
    def from_pretrained(cls, name_or_path, dtype: str | None = None, *,
                        local_files_only: bool = False,
                        compute_dtype: str = "float32") -> "GPT2":
        """Load by name or path: ``"demo"`` (the model bundled with gpt2s), ``"gpt2"``,
        ``"gpt2-medium"``, ``"gpt2-large"``, ``"gpt2-xl"``, ``"openai-community/..."`` (from the
        local Hugging Face cache, else downloaded with huggingface_hub when it is installed,
        the ``hub`` extra), or a path as in ``from_safetensors``.  ``dtype`` is the weight
        storage, as in ``from_safetensors``: None (the file's own), "float32", "bfloat16",
        "int8" or "int4" (the last three for inference); ``compute_dtype`` the precision of
        the matmuls (see `compute_dtype`).  See gpt2s.hub.resolve_pretrained for the rules."""
        from .hub import resolve_pretrained
        if dtype is not None:
            _wt.check_dtype(dtype)
        return cls.from_safetensors(resolve_pretrained(name_or_path,
                                                       local_files_only=local_files_only),
                                    dtype=dtype, compute_dtype=compute_dtype)

    def to_dtype(self, dtype: str, *, progress=None) -> "GPT2":
        """A new inference model with this one's weights stored in dtype ("bfloat16", "int8"
        or "int4": compressed matmul weights; "float32": a copy, widened back from a
        compressed model).  Tensors are converted one at a time; this model is left as it is.
        ``progress(done, total)`` is called after each tensor with the parameters converted
        so far and in all."""
        m = GPT2(self.config, _wt.check_dtype(dtype))
        counter = _weights.LoadCounter(progress, self.config)
        for name, w in self.params.items():
            m.store.copy_param(name, w if isinstance(w, np.ndarray) else np.asarray(w))
            counter.add(w.size)
        return m

    # ------------------------------------------------------------------ properties

    @property
    def params(self) -> dict:
        """The parameters by name (see the class docstring; ``store.params``)."""
        return self.store.params

    @property
    def grads(self) -> dict:
        """Gradients, same names and shapes as ``params`` (allocated on first use)."""
        return self.store.grads

    @property
    def compute_dtype(self) -> str:
        """The precision of the matmuls: "float32" (the default, exact) or "bfloat16":
        every matmul of the forward and the backward (the four of each block and the output
        head; dX = dY W^T and dW = X^T dY) takes its operands rounded to bfloat16 (nearest
        even) and sums in float32, as ``torch.autocast("cpu", torch.bfloat16)`` does.
        Layernorm, attention, softmax, GELU, the loss, the residual stream, the gradients and
        AdamW's master weights and moments stay float32; a trainable model keeps a bfloat16
        copy of its weights, which `AdamW.step` refreshes as it updates them (after writing
        into ``params`` yourself, set compute_dtype again to refresh it).  On a CPU without
        AVX512_BF16 the numbers are the same at float32 speed (`gpt2s.show_config` names the
        route).  Assigning it switches (ValueError for another value, or "bfloat16" on an
        int8 / int4 model).

        Examples:
            >>> m = GPT2.from_config(GPT2Config.preset("tiny"), seed=0, compute_dtype="bfloat16")
            >>> m.compute_dtype
            'bfloat16'
            >>> _, loss = m.forward([[464, 3290, 318]], targets=[[3290, 318, 257]])
            >>> round(loss, 1)
            10.9
        """
        return self.store.compute_dtype

    @compute_dtype.setter
    def compute_dtype(self, value: str):
        self.store.set_compute_dtype(value)

    @property
    def mapped(self) -> bool:
        """True while some parameters are views of the file the model was loaded from
        (``from_safetensors(..., mmap=True)``, the default), rather than copies in memory."""
        return self.store.mapped

    @property
    def pending_backward(self) -> TrainingForward | None:
        """The record of the last training forward, which the next `backward` consumes (its
        ``n_valid`` is the number of targets it counted), or None when there is none."""
        return self._last

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
        idx = check_token_ids(idx, self.config)
        B, T = idx.shape
        tgt = None if targets is None else check_targets(targets, (B, T), self.config.vocab_size)
        if tgt is not None and for_backward and self.dtype == "float32":
            with self.store.lock, _core.pinned_num_threads():
                return self._forward_train(idx, tgt, return_logits)
        with _core.pinned_num_threads():   # every kernel of this call on one team size
            return self._forward_inference(idx, tgt, return_logits)

    def _forward_inference(self, idx, tgt, return_logits):
        B, T = idx.shape
        last = self._last
        if last is not None and last.thread == threading.get_ident():
            # this thread's pending backward refers to an earlier forward: as before, only the
            # last forward of a thread can be differentiated
            with self.store.lock:
                if self._last is last:
                    self._last = None
        logits = np.empty((B, T, self.config.vocab_size), np.float32)
        lnf = self._passes.forward(idx, self._thread_workspace().acts, keep_layers=False)["lnf"]
        self._passes.head(logits.reshape(B * T, -1), lnf)
        if tgt is None:
            return logits, None
        loss, _ = cross_entropy(logits, tgt)
        return (logits if return_logits else None), loss

    def _forward_train(self, idx, tgt, return_logits):
        B, T = idx.shape
        ws = self._train_ws
        if return_logits:
            logits = np.empty((B, T, self.config.vocab_size), np.float32)
        else:
            logits = ws.logits.carve({"logits": (B, T, self.config.vocab_size)})["logits"]
        self._last = None
        acts = self._passes.forward(idx, ws.acts, keep_layers=True)
        self._passes.head(logits.reshape(B * T, -1), acts["lnf"])
        loss, lse = cross_entropy(logits, tgt)
        self._last = TrainingForward(idx, tgt.reshape(-1), lse, logits,
                                     logits_owned=not return_logits, acts=acts)
        return (logits if return_logits else None), loss

    def _thread_workspace(self) -> Workspace:
        ws = getattr(self._local, "ws", None)
        if ws is None:
            ws = self._local.ws = Workspace()
        return ws

    # ------------------------------------------------------------------ KV-cache decoding

    def kv_cache(self, rows: int, positions: int | None = None) -> KVCache:
        """A new, empty KV cache for `forward_cached`: rows sequences of up to ``positions``
        positions each (default, and at most, ``config.n_ctx``).

        Raises:
            TypeError, ValueError: rows or positions is not an integer >= 1.
        """
        cfg = self.config
        rows = check_int("rows", rows, 1)
        positions = cfg.n_ctx if positions is None else \
            min(check_int("positions", positions, 1), cfg.n_ctx)
        return KVCache.empty(cfg.n_layer, rows, positions, cfg.n_embd)

    def forward_cached(self, idx, pos0, cache: KVCache) -> np.ndarray:
        """The logits of the last position of idx, running only idx's positions: attention
        reads the earlier ones' keys and values from cache (KV-cache decoding).

        idx (B, T) holds positions pos0 .. pos0 + T - 1 of B sequences.  Their keys and
        values are written into rows 0 .. B-1 of the cache at those positions, and attention
        reads positions 0 .. pos0 + T - 1 from it: a generation runs its prompt with pos0 = 0
        (the prefill), then each new token with pos0 = the positions run so far.  pos0 may
        also be B per-row positions (a ragged batch: row b's tokens at pos0[b] ..
        pos0[b] + T - 1, attention over its own positions 0 .. pos0[b] + T - 1).  The logits
        equal ``forward(sequence)[0][:, pos0 + T - 1]`` up to float32 rounding.  An inference
        call: any number of threads may run it on one model at once, each with a cache of
        its own (a cache shared by two calls at once would mix their positions).

        Args:
            idx: token ids, shape (B, T) or (T,).
            pos0: the position of idx's first token (>= 0), or one per row (B,).
            cache: a `KVCache` of this model (`kv_cache`) with B rows.

        Returns:
            a new float32 array (B, vocab_size).

        Raises:
            TypeError, ValueError: bad token ids (as in `forward`), pos0 not an integer >= 0, a
                cache of another model or row count, or pos0 + T beyond n_ctx or the cache.

        Examples:
            >>> m = GPT2.from_config(GPT2Config.preset("tiny"), seed=0)
            >>> cache = m.kv_cache(1)
            >>> _ = m.forward_cached([464, 3290], 0, cache)   # positions 0, 1
            >>> step = m.forward_cached([318], 2, cache)       # position 2
            >>> bool(np.allclose(step, m.forward([464, 3290, 318])[0][:, 2], atol=1e-4))
            True
        """
        cfg = self.config
        idx = check_token_ids(idx, cfg)
        B, T = idx.shape
        row_pos = None
        if np.ndim(pos0) == 1:
            row_pos = check_row_positions(pos0, B)
            pos0 = int(row_pos.max())   # the furthest row bounds the checks below
        else:
            pos0 = check_int("pos0", pos0, 0)
        if pos0 + T > cfg.n_ctx:
            raise ValueError(f"position {pos0 + T - 1} is beyond the context n_ctx={cfg.n_ctx}")
        KVCache.check(cache, cfg, B, pos0 + T)
        with _core.pinned_num_threads():
            acts = self._passes.forward(idx, self._thread_workspace().acts, keep_layers=False,
                                        kv=cache, pos0=0 if row_pos is not None else pos0,
                                        row_pos=row_pos)
            last = np.ascontiguousarray(acts["lnf"].reshape(B, T, -1)[:, -1, :])
            logits = np.empty((B, cfg.vocab_size), np.float32)
            self._passes.head(logits, last)
        return logits

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
        with self.store.lock:
            self._train_ws = Workspace()
            self._last = None

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
        self.store.zero_grad()

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
        self.store.check_trainable("backward()")
        with self.store.lock, _core.pinned_num_threads() as nt:
            last = self._last
            if last is None:
                raise RuntimeError("backward() needs a preceding forward(idx, targets) with "
                                   "targets; the last forward had no targets, there was none, "
                                   "or its backward() was already called")
            normalizer = last.backward_normalizer(normalizer)
            d = self._passes.loss_backward(last, normalizer, self._train_ws.scratch, nt)
            # like PyTorch without retain_graph, a backward consumes its forward (and here the
            # logits may now hold dlogits)
            self._last = None
            self._passes.backward(last, d, on_layer_done)

    # ------------------------------------------------------------------ saving

    def save_safetensors(self, path, dtype: str | None = None, *, max_shard_size=None):
        """Save the weights: in Hugging Face's format, or in the model's own storage.

        A path ending in ``.safetensors`` is written as that one file; any other path is a
        directory (created if needed) that receives ``model.safetensors`` and ``config.json``,
        which ``transformers.GPT2LMHeadModel.from_pretrained`` and `from_safetensors` load.  Each
        file is written to a temporary name and renamed, so an interrupted save never leaves a
        half-written file.

        By default (dtype None) the file holds the model's own storage, bit for bit: a float32
        model's tensors as F32; a bfloat16 model's matmul weights as BF16 and the rest as F32
        (a file transformers loads too); an int8 or int4 model's packed blocks and fp16 scales
        exactly as the kernels read them (a packed gpt2s file, docs/checkpoints.md, with a
        ``quantization_config`` in config.json), which `from_safetensors` maps and uses in
        place.  Other readers refuse a packed file.

        Args:
            path: a directory, or a file name ending in ``.safetensors``.
            dtype: None (the model's storage); "float32", "float16" or "bfloat16": every
                tensor converted to that dtype (rounded to nearest even), a file any
                safetensors reader loads; "int8" or "int4": a packed file of that type (the
                matmul weights converted, one at a time).
            max_shard_size: None (one model.safetensors), or bytes / a size such as "2GB":
                a bigger model is written in shards with model.safetensors.index.json, as
                transformers' save_pretrained writes them (a directory only).

        Returns:
            the path written (a `pathlib.Path`).

        Raises:
            ValueError: an unknown dtype, or a model whose n_embd is not a multiple of the
                block of the packed type asked for.
            OSError: the file cannot be written.

        Examples:
            >>> import tempfile, pathlib
            >>> m = GPT2.from_config(GPT2Config.preset("tiny"), seed=0)
            >>> d = m.save_safetensors(tempfile.mkdtemp(), dtype="float16")
            >>> sorted(p.name for p in pathlib.Path(d).iterdir())
            ['config.json', 'model.safetensors']
        """
        converted = ("float32", "float16", "bfloat16")   # every tensor in that dtype
        packed = [t for t in _wt.DTYPES if _wt.get(t).block]
        if dtype is None:   # the model's own storage
            storage = self.dtype
        elif dtype in converted:
            storage = None
        elif dtype in packed:
            storage = dtype
        else:
            raise ValueError(f"dtype must be None or one of {list(converted) + packed}, got "
                             f"{dtype!r}")
        if storage is None or storage == "float32":
            return _weights.save_safetensors(path, self.params, self.config,
                                             dtype=dtype or "float32",
                                             max_shard_size=max_shard_size)
        return _weights.save_safetensors(path, self.params, self.config, storage=storage,
                                         max_shard_size=max_shard_size)

    def save_gguf(self, path, dtype: str | None = None):
        """Save the model as a GPT-2 GGUF file that llama.cpp runs (its layout and GPT-2's
        tokenizer metadata), through the ``gguf`` package (the ``gguf`` extra).  Written to a
        temporary name and renamed.

        Args:
            path: the file to write (conventionally ``*.gguf``).
            dtype: None (the model's storage: float32 as F32, bfloat16 as BF16, int8 as Q8_0,
                int4 as Q4_0, the blocks as they are), or "float32", "float16", "bfloat16",
                "int8", "int4" (converted one tensor at a time).  Biases, layernorms and the
                position embedding are always F32.

        Returns:
            the path written (a `pathlib.Path`).

        Raises:
            ValueError: an unknown dtype, or a model llama.cpp's GPT-2 cannot run (a
                vocabulary smaller than GPT-2's, another activation, n_embd not a multiple
                of 32 for Q8_0/Q4_0).
            ModuleNotFoundError: the gguf package is not installed.
        """
        from . import gguf_io
        return gguf_io.save_gguf(path, self.params, self.config,
                                 self.dtype if dtype is None else dtype)

    # ------------------------------------------------------------------ generation
    # The decoding loop, sampling and text helpers live in generation.py; these are the
    # public entry points on the model.

    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None, top_p=None,
                 seed=None, *, num_samples=1, stop_at_eos=False, eos_token_id=EOT_ID,
                 context_full="slide", repetition_penalty=1.0, presence_penalty=0.0,
                 frequency_penalty=0.0, min_new_tokens=0, logits_processor=None):
        """Continue the prompts ``idx`` by up to ``max_new_tokens`` tokens.

        Args:
            idx: token ids, shape (B, T) (B prompts of the same length) or (T,), or a list of
                token sequences of different lengths (a ragged batch; returns a list).
            max_new_tokens: how many tokens to add (>= 0).
            temperature: 0 is greedy argmax; > 0 samples from softmax(logits / temperature).
            top_k: sample only among the k most likely tokens (None: all).
            top_p: sample only within the nucleus of probability top_p, 0 < top_p <= 1.
            seed: an int or a ``numpy.random.Generator`` makes sampling repeatable; a list of
                them, one per row, gives each row the generator it would have alone.
            num_samples: continuations per prompt (rows b*n .. b*n + n-1 for prompt b).
            stop_at_eos: stop each row at ``eos_token_id`` and pad it with that id.
            eos_token_id: the end-of-text id (50256, ``<|endoftext|>``).
            context_full: at n_ctx positions, "slide" the window or "stop" with a warning.
            repetition_penalty: > 0, 1 is none: a logit of a token already in the row is
                divided by it when positive, multiplied when negative (transformers).
            presence_penalty: 0 is none: lowers the logit of every token generated so far
                (OpenAI's definition).
            frequency_penalty: 0 is none: lowers token j's logit by frequency_penalty * c_j,
                c_j its count among the new tokens so far (OpenAI's definition).
            min_new_tokens: ``eos_token_id`` cannot be drawn before that many new tokens.
            logits_processor: ``fn(token_ids, logits)`` called before each token is chosen
                (after the penalties): token_ids a list of one read-only int64 array per
                row, logits the (rows, vocab_size) float32 array to change in place (return
                None) or to replace (return a new array); -inf bans a token.

        Returns:
            int64 array (B * num_samples, T + new), the prompts included; new <
            max_new_tokens only when every row stopped at eos or the context was full.  For a
            ragged batch, a list of 1-D int64 arrays (each row's prompt and new tokens).

        Raises:
            TypeError, ValueError: a bad argument, named in the message.

        Examples:
            >>> m = GPT2.from_config(GPT2Config.preset("tiny"), seed=0)
            >>> m.generate([464, 3290], 5, temperature=0).shape
            (1, 7)
        """
        return _generation.generate(self, idx, max_new_tokens, temperature, top_k, top_p, seed,
                                    num_samples=num_samples, stop_at_eos=stop_at_eos,
                                    eos_token_id=eos_token_id, context_full=context_full,
                                    repetition_penalty=repetition_penalty,
                                    presence_penalty=presence_penalty,
                                    frequency_penalty=frequency_penalty,
                                    min_new_tokens=min_new_tokens,
                                    logits_processor=logits_processor)

    def generate_stream(self, idx, max_new_tokens, temperature=1.0, top_k=None, top_p=None,
                        seed=None, *, num_samples=1, stop_at_eos=False, eos_token_id=EOT_ID,
                        context_full="slide", repetition_penalty=1.0, presence_penalty=0.0,
                        frequency_penalty=0.0, min_new_tokens=0, logits_processor=None):
        """Like `generate`, but an iterator over the new tokens as they are made.

        Arguments are checked when this is called, not at the first ``next()``.  Each stream owns
        its KV cache, so streams may be interleaved or consumed in different threads.

        Args:
            idx: token ids, shape (B, T) or (T,), or a list of sequences of different lengths.
            max_new_tokens: how many tokens to make (>= 0).
            temperature: 0 is greedy; > 0 samples from softmax(logits / temperature).
            top_k: sample only among the k most likely tokens (None: all).
            top_p: sample only within the nucleus of probability top_p, 0 < top_p <= 1.
            seed: an int or a ``numpy.random.Generator`` makes sampling repeatable.
            num_samples: continuations per prompt.
            stop_at_eos: stop each row at ``eos_token_id``; the iterator ends when every row has.
            eos_token_id: the end-of-text id (50256).
            context_full: at n_ctx positions, "slide" the window or "stop" with a warning.
            repetition_penalty: as in `generate` (1: none).
            presence_penalty: as in `generate` (0: none).
            frequency_penalty: as in `generate` (0: none).
            min_new_tokens: as in `generate` (0: none).
            logits_processor: as in `generate` (None: none).

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
                                           context_full=context_full,
                                           repetition_penalty=repetition_penalty,
                                           presence_penalty=presence_penalty,
                                           frequency_penalty=frequency_penalty,
                                           min_new_tokens=min_new_tokens,
                                           logits_processor=logits_processor)

    def generate_text(self, prompt, max_new_tokens, temperature=1.0, top_k=None, top_p=None,
                      seed=None, *, num_samples=1, stop_at_eos=True, context_full="slide",
                      tokenizer=None, stop=None, repetition_penalty=1.0, presence_penalty=0.0,
                      frequency_penalty=0.0, min_new_tokens=0, logits_processor=None,
                      eos_token_id=None):
        """Text in, text out: the continuation of ``prompt`` (without the prompt itself).

        Args:
            prompt: a str, or a list of str (of any lengths).
            max_new_tokens: how many tokens to make at most (>= 0).
            temperature: 0 is greedy; > 0 samples from softmax(logits / temperature).
            top_k: sample only among the k most likely tokens (None: all).
            top_p: sample only within the nucleus of probability top_p, 0 < top_p <= 1.
            seed: an int or a ``numpy.random.Generator`` makes sampling repeatable.
            num_samples: continuations per prompt.
            stop_at_eos: end a continuation before the first ``<|endoftext|>`` it makes.
            context_full: at n_ctx positions, "slide" the window or "stop" with a warning.
            tokenizer: a tiktoken ``Encoding`` (default: the bundled GPT-2 tokenizer).
            stop: a str or list of str: a continuation ends before the first one it contains.
            repetition_penalty: as in `generate` (1: none).
            presence_penalty: as in `generate` (0: none).
            frequency_penalty: as in `generate` (0: none).
            min_new_tokens: as in `generate` (0: none).
            logits_processor: as in `generate` (None: none).
            eos_token_id: the end-of-text id, or a list of ids (any one ends the text); None
                (the default): the tokenizer's own (50256, ``<|endoftext|>``, for GPT-2's; a
                trained vocabulary's own; none for a character vocabulary).

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
                                         tokenizer=tokenizer, stop=stop,
                                         repetition_penalty=repetition_penalty,
                                         presence_penalty=presence_penalty,
                                         frequency_penalty=frequency_penalty,
                                         min_new_tokens=min_new_tokens,
                                         logits_processor=logits_processor,
                                         eos_token_id=eos_token_id)
