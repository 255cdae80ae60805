"""LlamaForCausalLM: a Llama-architecture decoder (RMSNorm, rotary embeddings, grouped-query
attention, SwiGLU MLP) on gpt2s' kernels, with Hugging Face's parameter names; also Qwen2
(``LlamaConfig(model_type="qwen2")``: biases on the q, k, v projections).

The first increment of issue 25: float32 parameters in a `ParameterStore`, forward (logits
and loss), backward (gradients accumulated into ``grads``), the KV-cache forward of
decoding (`forward_cached`, the cache holding the key/value heads only), loading and saving
safetensors in Hugging Face's layout, generation through gpt2s' decoding loop, and inference
with the matmul weights stored in bfloat16, int8 or int4 (`to_dtype`, ``dtype=``: the
projections are nn.Linear (out, in) weights, output-major as the stored types' kernels read
them, so they are compressed as they are).  Training through the trainer comes next.

Per block, as transformers' LlamaDecoderLayer computes it:

    h = x + o_proj(attn(rope(q_proj(rms1(x))), rope(k_proj(rms1(x))), v_proj(rms1(x))))
    x' = h + down_proj(act(gate_proj(rms2(h))) * up_proj(rms2(h)))

q, k and v are one product with the three weights side by side in the buffer (the row
[q | k | v] the attention kernels read), gate and up likewise ([gate | up], what the gated
linear unit reads).  The Linear weights are [out, in], the layout of the output-head kernels
(``lm_head_forward``: y = x W^T), which therefore run every product; with
``compute_dtype="bfloat16"`` their bfloat16 twins (``lm_head_forward_bf16``,
``lm_head_backward_bf16``) run them on the store's bfloat16 copies of the weights.
"""

from __future__ import annotations

import numpy as np

import os
import threading

from . import _core
from . import generation as _generation
from . import weight_types as _wt
from . import weights as _weights
from .buffers import KVCache
from .config import parse_config_json
from .inputs import check_row_positions
from .llama_config import EMBED, HEAD, NORM, LlamaConfig
from .params import ParameterStore

__all__ = ["LlamaForCausalLM"]


# serialises the first read of a checkpoint's tokenizer (`LlamaForCausalLM.tokenizer`)
_TOKENIZER_LOCK = threading.Lock()


def _checkpoint_tokenizer(folder, config):
    """The tokenizer.json beside a checkpoint, or None (none there, or no tokenizers
    package)."""
    from .vocab import TOKENIZER_FILE, VocabError, tokenizer_for
    if not (folder / TOKENIZER_FILE).is_file():
        return None
    try:
        return tokenizer_for(folder, config)
    except VocabError:
        return None

def _heads_to_blocks(qkv, n_head):
    """(N, 3 C) with per-head rows [q_h | k_h | v_h] (GPT-NeoX's query_key_value, heads
    [n_head, 3, head_dim]) -> a new (N, 3 C) [q | k | v], the row the attention kernels read."""
    N, W = qkv.shape
    return np.ascontiguousarray(
        qkv.reshape(N, n_head, 3, W // (3 * n_head)).transpose(0, 2, 1, 3)).reshape(N, W)


def _blocks_to_heads(dqkv, n_head):
    """The inverse of `_heads_to_blocks`: [q | k | v] rows back to per-head [q_h | k_h | v_h]."""
    N, W = dqkv.shape
    return np.ascontiguousarray(
        dqkv.reshape(N, 3, n_head, W // (3 * n_head)).transpose(0, 2, 1, 3)).reshape(N, W)


def _with_generation_eos(config, folder):
    """config with the end tokens of generation_config.json beside it (one id or a list), as
    transformers' generate stops at them; config as it is without one."""
    from dataclasses import replace
    from .chat import read_generation_config
    eos = read_generation_config(folder).get("eos_token_id")
    if isinstance(eos, list):
        eos = tuple(eos) if len(eos) != 1 else eos[0]
    if eos is None or eos == config.eos_token_id:
        return config
    try:
        return replace(config, eos_token_id=eos)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{folder / 'generation_config.json'}: eos_token_id={eos!r}: "
                         f"{e}") from None


_EMPTY1 = np.empty(0, np.float32)
_EMPTY3 = np.empty((0, 0, 0), np.float32)


class _Pending(dict):
    """What a training forward keeps for its backward; ``n_valid``: its targets that are not
    -1 (as GPT2's ``pending_backward``, read by data parallel)."""

    @property
    def n_valid(self) -> int:
        return self["valid"]


class LlamaForCausalLM:
    """A Llama or Qwen2 model: float32 (trainable), or bfloat16 / int8 / int4 matmul weights
    for inference (`to_dtype`).

    Args:
        config: a `LlamaConfig`.
        dtype: the storage of the matmul weights, "float32" (trainable; a new model's
            weights are zeros: `from_config`, `from_pretrained`) or "bfloat16", "int8",
            "int4" (inference: made by `to_dtype` or ``dtype=`` when loading).

    Attributes:
        config: the model's config.
        store: its `ParameterStore` (parameters and gradients in one buffer each).
        tokenizer: the checkpoint's tokenizer (the tokenizer.json of the directory the model
            was loaded from, read on first use of this attribute, so a model that is only
            given token ids never holds it; else None), `generate_text`'s default.

    Examples:
        >>> from gpt2s.llama_config import LlamaConfig
        >>> cfg = LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=64,
        ...                   num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
        >>> m = LlamaForCausalLM.from_config(cfg, seed=0)
        >>> logits, loss = m.forward(np.array([[1, 2, 3]]), np.array([[2, 3, 4]]))
        >>> logits.shape, bool(np.isfinite(loss))
        ((1, 3, 50), True)
    """

    _config_class = LlamaConfig   # (GPTNeoXForCausalLM: GPTNeoXConfig)

    def __init__(self, config: LlamaConfig, dtype: str = "float32"):
        if not isinstance(config, self._config_class):
            raise TypeError(f"config must be a {self._config_class.__name__}, got "
                            f"{type(config).__name__}")
        self.config = config
        self.store = ParameterStore(config, _wt.check_dtype(dtype))
        self._inv_freq = config.inv_freq()
        self._offsets = {name: off for name, _, off in self.store.layout}
        self._pending = None
        self._joined = None   # another dtype: per block the joined q|k|v, gate|up (+ biases)
        self._zero_pos = np.zeros((1, config.hidden_size), np.float32)
        self._plan = None   # (store version, _core.LlamaPlan): the inference blocks in one call
        self._join()
        # the checkpoint's tokenizer (its tokenizer.json, when loaded from a directory with
        # one): generate_text's default
        self.tokenizer = None

    @property
    def tokenizer(self):
        """The checkpoint's tokenizer, or None: a loaded checkpoint's tokenizer.json is read
        on the first use (the tokenizers library holding a 50k-token tokenizer.json costs
        ~30-60 MiB of resident memory a model fed token ids never needs)."""
        if self._tokenizer_from is not None:
            with _TOKENIZER_LOCK:     # two threads' first uses: read once
                pending = self._tokenizer_from
                if pending is not None:
                    self._tokenizer = pending()
                    self._tokenizer_from = None
        return self._tokenizer

    @tokenizer.setter
    def tokenizer(self, value):
        self._tokenizer, self._tokenizer_from = value, None

    def _tokenizer_later(self, folder, config, chat: bool = False):
        """Make ``tokenizer`` the tokenizer.json in folder, parsed when first used (None if
        there is none or it is unreadable, as `_checkpoint_tokenizer`); chat: with an
        instruct checkpoint's chat template and generation config, read now (small files: a
        bad one is refused while loading, as before)."""
        from .vocab import TOKENIZER_FILE
        if not (folder / TOKENIZER_FILE).is_file():
            self.tokenizer = None
            return
        extra = {}
        if chat:     # an instruct checkpoint's template (gpt2s.chat)
            from .chat import load_chat_template, read_generation_config
            extra = {"chat_template": load_chat_template(folder),
                     "generation_config": read_generation_config(folder)}

        def load():
            enc = _checkpoint_tokenizer(folder, config)
            if enc is not None:
                for key, value in extra.items():
                    setattr(enc, key, value)
            return enc
        self._tokenizer, self._tokenizer_from = None, load

    def to_dtype(self, dtype: str) -> "LlamaForCausalLM":
        """A new model with this one's weights, its matmul weights (the projections, the
        embedding, an untied head) stored in dtype: "bfloat16", "int8" or "int4" (inference
        only, as `GPT2.to_dtype`), or "float32" (a copy, widened back).  The norms and
        biases stay float32.  This model is left as it is."""
        m = type(self)(self.config, dtype)
        m._tokenizer, m._tokenizer_from = self._tokenizer, self._tokenizer_from   # unread stays so
        for name, w in self.params.items():
            m.store.copy_param(name, w if isinstance(w, np.ndarray) else np.asarray(w))
        m._join()
        return m

    def _join(self):
        """For a model of another dtype: the q, k, v (and gate, up) weights of each block as
        one stored weight, their rows side by side (each row's blocks are its own, so this is
        exactly the three compressed apart); ``params`` then holds views of its rows."""
        if self.store.dtype == "float32":
            return
        cfg, joined = self.config, []
        Q, KV, I = cfg.q_width, cfg.kv_width, cfg.intermediate_size
        for l in range(cfg.n_layer):
            P, entry = self.store.layer_params[l], {}
            for key, names, rows in (
                    ("qkv", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
                     (Q, KV, KV)),
                    ("gu", ("mlp.gate_proj", "mlp.up_proj"), (I, I))):
                parts = [P[n + ".weight"] for n in names]
                data = np.concatenate([w.data for w in parts])
                scales = (np.concatenate([w.scales for w in parts])
                          if parts[0].scales is not None else None)
                entry[key] = _wt.PackedWeight(parts[0].wtype, data, scales,
                                              (sum(rows), cfg.hidden_size), False)
                r0 = 0
                for n, r in zip(names, rows):
                    self.store.set_param(f"model.layers.{l}.{n}.weight", _wt.PackedWeight(
                        parts[0].wtype, data[r0:r0 + r],
                        None if scales is None else scales[r0:r0 + r],
                        (r, cfg.hidden_size), False))
                    r0 += r
                if f"{names[0]}.bias" in P:
                    entry[key + "_bias"] = np.concatenate([P[n + ".bias"] for n in names])
            joined.append(entry)
        self._joined = joined

    @property
    def dtype(self) -> str:
        """The storage of the matmul weights: "float32" (trainable), "bfloat16", "int8" or
        "int4"."""
        return self.store.dtype

    @property
    def compute_dtype(self) -> str:
        """The precision of the matmuls, as `GPT2.compute_dtype`: "float32" (the default) or
        "bfloat16": every product of the forward and the backward (the q|k|v, o, up (gate|up)
        and down projections of each block and the output head; dX = dY W and dW = dY^T X)
        takes its operands rounded to bfloat16 (nearest even) and sums in float32.  The
        norms, rotary embedding, attention, softmax, activations, the loss, the residual
        stream, the gradients and AdamW's master weights and moments stay float32; a
        trainable model keeps a bfloat16 copy of its weights, which `AdamW.step` refreshes as
        it updates them (after writing into ``params`` yourself, set compute_dtype again).
        On a CPU without AVX512_BF16 the numbers are the same at float32 speed.  Assigning
        it switches (ValueError for another value, or "bfloat16" on an int8 / int4 model).

        Examples:
            >>> from gpt2s.llama_config import LlamaConfig
            >>> cfg = LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=64,
            ...                   num_hidden_layers=2, num_attention_heads=4)
            >>> m = LlamaForCausalLM.from_config(cfg, seed=0, compute_dtype="bfloat16")
            >>> m.compute_dtype
            'bfloat16'
        """
        return self.store.compute_dtype

    @compute_dtype.setter
    def compute_dtype(self, value: str):
        self.store.set_compute_dtype(value)

    @classmethod
    def from_config(cls, config: LlamaConfig, seed: int | None = None, *,
                    compute_dtype: str = "float32") -> "LlamaForCausalLM":
        """A model with random weights as transformers initialises them (normal, std 0.02;
        the norms at 1, the biases at 0); compute_dtype: the precision of the matmuls
        (`compute_dtype`)."""
        m = cls(config)
        rng = np.random.default_rng(seed)
        for name, p in m.params.items():
            if name.endswith("layernorm.weight") or name == NORM:
                p[...] = 1.0
            elif name.endswith(".bias"):
                p[...] = 0.0
            else:
                p[...] = rng.normal(0.0, 0.02, p.shape)
        m.compute_dtype = compute_dtype
        return m

    @classmethod
    def from_safetensors(cls, path, dtype: str | None = None, *,
                         compute_dtype: str = "float32") -> "LlamaForCausalLM":
        """A float32 model from a Hugging Face Llama checkpoint: a directory with config.json
        and model.safetensors, or a .safetensors file saved by gpt2s (its config in the
        __metadata__).  Tensors in float32, float16 or bfloat16.  dtype: None or "float32",
        else the storage of the matmul weights ("bfloat16", "int8", "int4": `to_dtype`;
        converted from a float32 load, so the float32 model is held while converting).
        compute_dtype: the precision of the matmuls, "float32" or "bfloat16"
        (`compute_dtype`).

        Raises:
            FileNotFoundError: no such file or directory.
            SafetensorsError (a ValueError): a bad file, a tensor missing, unexpected or of
                the wrong shape, a non-finite value (the message names the file and tensor).
            ValueError: a config.json gpt2s refuses (named by key).
        """
        m = cls._load_safetensors(path, dtype)
        m.compute_dtype = compute_dtype
        return m

    @classmethod
    def _load_safetensors(cls, path, dtype):
        from . import packed as _packed
        from .config import read_config_json
        file, cfg_file = _weights.resolve_model_path(path)
        src = _weights.open_tensors(file)    # one file, or a sharded checkpoint's shards
        header, metadata = src.header, src.metadata
        keep_open = False
        try:
            storage, packed = _packed.file_storage(file, metadata)
            if cfg_file is not None:
                if os.stat(cfg_file).st_size > 16 << 20:
                    raise ValueError(f"{cfg_file}: too large for a config.json")
                d = read_config_json(cfg_file)
                quant = d.get("quantization_config")
                if isinstance(quant, dict) and quant.get("quant_method") == _packed.QUANT_METHOD:
                    del d["quantization_config"]    # gpt2s' own packed file: checked here
                    _packed.check_quantization_config(cfg_file, file, storage, packed)
                config = _with_generation_eos(LlamaConfig.from_hf_dict(d, str(cfg_file)),
                                              file.parent)
            elif _weights.CONFIG_METADATA_KEY in metadata:
                source = f"{file}: __metadata__[{_weights.CONFIG_METADATA_KEY!r}]"
                config = LlamaConfig.from_hf_dict(
                    parse_config_json(metadata[_weights.CONFIG_METADATA_KEY], source), source)
            else:
                raise _weights.SafetensorsError(
                    f"{file}: no config.json beside it and no config in its __metadata__: a "
                    f"Llama model's sizes cannot be read from its tensors alone")
            if packed is not None:
                # a packed int8 / int4 file: its blocks are used as they are (mapped), never
                # quantized again; another dtype widens and converts them
                want = dtype or storage
                store = ParameterStore(config, want, allocate=want == "float32")
                keep_open = _packed.load_tensors(store, src, packed, True)
                m = cls(config)
                m.store, m._offsets = store, {name: off for name, _, off in store.layout}
                m._join()
                if keep_open:
                    store.keep_mapping(src)
                dtype = None
            else:
                # the store in its final dtype, filled tensor by tensor (the file pages of each
                # dropped once converted): the peak is the model plus a few rows, not a float32
                # model beside the file and the compressed copy
                # (a bfloat16 file gpt2s saved: its own storage again, exact: bfloat16 widened
                # to float32 rounds back to itself)
                store_dtype = _wt.check_dtype(dtype) if dtype is not None else storage
                m = cls(config, store_dtype)
                for name in header:
                    if name in m.params or name.endswith(".rotary_emb.inv_freq"):
                        continue
                    if name == HEAD and config.tie_word_embeddings:
                        continue   # a tied head saved anyway: checked equal below
                    raise _weights.SafetensorsError(
                        f"{file}: unexpected tensor {name!r} for this Llama config")
                kind = _wt.get(store_dtype)
                for name, p in m.params.items():
                    if name not in header:
                        raise _weights.SafetensorsError(f"{file}: tensor {name!r} is missing")
                    where = _weights.located(src, name)
                    if isinstance(p, np.ndarray):
                        _weights.read_tensor(*where, p)
                    else:
                        # compressed a few rows at a time, as to_dtype compresses them, in
                        # place (q, k, v and gate, up: into their rows of the joined weight)
                        for r0, r1 in _weights.row_chunks(*p.shape):
                            rows = np.empty((r1 - r0, p.shape[1]), np.float32)
                            _weights.read_rows(*where, rows, r0, store_dtype)
                            kind.compress_rows_into(name, p, r0, rows)
                    _weights.drop_tensor_pages(where[4], where[3], where[1][name])
                for l, entry in enumerate(m._joined or ()):   # the joined biases are copies
                    P = m.store.layer_params[l]
                    for key, names in (("qkv_bias", ("q_proj", "k_proj", "v_proj")),
                                       ("gu_bias", ("gate_proj", "up_proj"))):
                        if key in entry:
                            part = "self_attn." if key == "qkv_bias" else "mlp."
                            entry[key][...] = np.concatenate([P[f"{part}{n}.bias"]
                                                              for n in names])
                if config.tie_word_embeddings and HEAD in header:
                    # compared a chunk of rows at a time: no float32 copy of either
                    if not _weights.rows_equal(_weights.located(src, HEAD),
                                               _weights.located(src, EMBED),
                                               m.params[EMBED].shape):
                        raise _weights.SafetensorsError(
                            f"{file}: {HEAD!r} differs from {EMBED!r} but the config ties "
                            f"them (tie_word_embeddings)")
        finally:
            if not keep_open:
                src.close()
        if cfg_file is not None:
            m._tokenizer_later(file.parent, config, chat=True)
        return m

    @classmethod
    def from_pretrained(cls, name_or_path, dtype: str | None = None, *,
                        compute_dtype: str = "float32") -> "LlamaForCausalLM":
        """A model from a local Llama or Qwen2 checkpoint directory (config.json +
        model.safetensors, as ``hf download`` fetches it) or a .safetensors file gpt2s
        saved.  dtype: the weight storage, compute_dtype: the precision of the matmuls, as
        in `from_safetensors`."""
        if dtype is not None:
            _wt.check_dtype(dtype)
        return cls.from_safetensors(name_or_path, dtype, compute_dtype=compute_dtype)

    def __repr__(self):
        c = self.config
        return (f"LlamaForCausalLM({c.model_type}: {c.n_layer} layers, hidden {c.hidden_size}, "
                f"{c.n_head} heads ({c.n_kv_head} key/value), vocab {c.vocab_size}, {self.dtype})")

    def save_safetensors(self, path, dtype: str | None = None, *, max_shard_size=None):
        """Write the model as Hugging Face's LlamaForCausalLM lays it out (model.safetensors
        and config.json in the directory path, or a lone .safetensors file with the config in
        its __metadata__); all-or-nothing (temp file + rename).  dtype None: the model's own
        storage, as `GPT2.save_safetensors` writes it (float32; a bfloat16 model's
        projections as BF16; an int8 / int4 model's packed blocks and scales, a packed gpt2s
        file that `from_safetensors` maps as it is); "float32", "float16", "bfloat16": every
        tensor in that dtype (a model of another storage widened), a file transformers
        loads; "int8", "int4": packed in that type.  max_shard_size: as
        `GPT2.save_safetensors` (shards and model.safetensors.index.json beyond that size).
        Returns the path written."""
        converted = ("float32", "float16", "bfloat16")
        storage = self.dtype if dtype is None else dtype if dtype not in converted else None
        if storage is not None and storage != "float32":
            _wt.check_dtype(storage)
            return _weights.save_safetensors(path, self.params, self.config, prefix="",
                                             storage=storage, max_shard_size=max_shard_size)
        params = self.params if self.dtype == "float32" else \
            {k: v if isinstance(v, np.ndarray) else np.asarray(v) for k, v in self.params.items()}
        return _weights.save_safetensors(path, params, self.config, prefix="",
                                         dtype=dtype or "float32",
                                         max_shard_size=max_shard_size)

    @property
    def params(self) -> dict:
        """name -> float32 parameter (Hugging Face's names and shapes)."""
        return self.store.params

    @property
    def grads(self) -> dict:
        """name -> float32 gradient (allocated at zero on first use)."""
        return self.store.grads

    def zero_grad(self):
        self.store.zero_grad()

    # ------------------------------------------------------------------ helpers

    def _fused(self, tensors: dict, layer: int, first: str, rows: int, cols: int) -> np.ndarray:
        """The (rows, cols) weight (or (rows,) bias when cols == 0) that starts at tensor
        ``first`` of the block and runs on over the tensors laid out after it in the buffer
        (LlamaConfig.param_layout joins them): the q, k, v (or gate, up) projections as one.
        tensors: ``params``, ``grads`` or the store's ``compute_params`` (bfloat16 bits)."""
        # (compared with params, not grads: reading store.grads would allocate the gradients)
        store = self.store
        buffer = (store.buffer if tensors is store.params else
                  store.compute_buffer if tensors is store.compute_params else
                  store.grad_buffer)
        off = self._offsets[f"{self.config.layer_prefix}{layer}.{first}"]
        n = rows * cols if cols else rows
        out = buffer[off:off + n]
        return out.reshape(rows, cols) if cols else out

    def _head(self, tensors):
        cfg = self.config
        return tensors[cfg.embed_name] if cfg.tie_word_embeddings else tensors[cfg.head_name]

    # the products: float32 kernels, or (compute_dtype "bfloat16") their bfloat16 twins on
    # the store's bfloat16 copies of the weights (uint16 bits, the same shapes)

    @property
    def _bf16(self) -> bool:
        return self.store.compute_params is not None

    def _mm(self, out, x, w):
        """out (N, OUT) = x (N, IN) @ w^T, w (OUT, IN) from `_weight`."""
        if self._bf16:
            _core.lm_head_forward_bf16(out, x, w)
        else:
            _core.lm_head_forward(out, x, w)

    def _mm_backward(self, dinp, dw, dout, x, w, dout_kept=False):
        """dinp = dout @ w, dw += dout^T @ x.  dout_kept: dout is read again afterwards (the
        bfloat16 kernel may round its dout in place: it gets a copy)."""
        if self._bf16:
            _core.lm_head_backward_bf16(dinp, dw, dout.copy() if dout_kept else dout, x, w)
        else:
            _core.lm_head_backward(dinp, dw, dout, x, w)

    def _weight(self, l: int, key: str, rows: int = 0):
        """The weight operand of block l's product key ("qkv", "up": the joined rows, of
        which there are rows; "o", "down"), for the current compute dtype."""
        nm = self.config.block_names
        joined = {"qkv": "qkv", "up": "gu"}.get(key)
        J = self._joined[l] if self._joined is not None else None
        if joined is not None:
            if J is not None:   # a compressed store: the joined weight (bfloat16: its bits)
                return J[joined].data if self._bf16 else J[joined]
            # float32 store: the joined rows of the weights, or of their bfloat16 copy
            return self._fused(self.store.compute_params if self._bf16 else self.params, l,
                               nm[key], rows, self.config.hidden_size)
        if self._bf16:
            return self.store.compute_layers[l][nm[key]]
        return self.store.layer_params[l][nm[key]]

    def _head_weight(self):
        return self._head(self.store.compute_params if self._bf16 else self.params)

    def _embed(self, flat) -> np.ndarray:
        """The embedding rows of the token ids flat (N,): (N, H) float32."""
        w = self.params[self.config.embed_name]
        if isinstance(w, np.ndarray):
            return np.ascontiguousarray(w[flat])
        out = np.empty((len(flat), self.config.hidden_size), np.float32)
        # each token as a sequence of one at position 0 of a zero position table
        _core.embedding_forward(out, np.ascontiguousarray(flat, np.int64), w, self._zero_pos,
                                1, 0)
        return out

    def _check_idx(self, idx, what="idx") -> np.ndarray:
        idx = np.asarray(idx)
        if idx.ndim != 2 or idx.shape[1] < 1 or not np.issubdtype(idx.dtype, np.integer):
            raise ValueError(f"{what}: need integer token ids of shape (B, T), T >= 1, got "
                             f"{idx.dtype} {idx.shape}")
        V = self.config.vocab_size
        bad = np.flatnonzero((idx < 0) | (idx >= V))
        if bad.size:
            i = np.unravel_index(bad[0], idx.shape)
            raise ValueError(f"{what}: token id {int(idx[i])} at {tuple(int(j) for j in i)} "
                             f"is outside [0, {V})")
        return np.ascontiguousarray(idx, np.int64)

    # ------------------------------------------------------------------ forward

    def _norm_params(self, tensors, role=None):
        """(weight, bias or None) of the block norm role ("ln1", "ln2") in tensors (a block's
        params or grads), or of the final norm (role None; tensors: ``params`` or ``grads``)."""
        cfg = self.config
        if role is None:
            b = cfg.final_norm_bias_name
            return tensors[cfg.final_norm_name], (tensors[b] if b else None)
        b = cfg.block_names[role + "_bias"]
        return tensors[cfg.block_names[role]], (tensors[b] if b else None)

    def _norm_forward(self, out, x, w, b, keep=True):
        """out = the family's norm of x (RMSNorm, or LayerNorm with bias b); returns what its
        backward reads ((rstd,) or (mean, rstd); empty when not keep)."""
        cfg, N = self.config, x.shape[0]
        if cfg.norm == "rmsnorm":
            rstd = np.empty(N, np.float32) if keep else _EMPTY1
            _core.rmsnorm_forward(out, rstd, x, w, cfg.norm_eps)
            return (rstd,)
        mean, rstd = (np.empty(N, np.float32), np.empty(N, np.float32)) if keep else \
            (_EMPTY1, _EMPTY1)
        _core.layernorm_forward(out, mean, rstd, x, w, b, cfg.norm_eps)
        return (mean, rstd)

    def _residual_norm_forward(self, res, out, x1, x2, w, b):
        """res = x1 + x2, out = norm(res) in one pass; returns the norm's statistics."""
        cfg, N = self.config, x1.shape[0]
        if cfg.norm == "rmsnorm":
            rstd = np.empty(N, np.float32)
            _core.residual_rmsnorm_forward(res, out, rstd, x1, x2, w, cfg.norm_eps)
            return (rstd,)
        mean, rstd = np.empty(N, np.float32), np.empty(N, np.float32)
        _core.residual_layernorm_forward(res, out, mean, rstd, x1, x2, w, b, cfg.norm_eps)
        return (mean, rstd)

    def _norm_backward(self, dinp, gw, gb, dout, x, w, stats, scratch):
        """dinp += the gradient through the norm of x; its weight's (and bias') gradients
        added into gw (gb)."""
        if self.config.norm == "rmsnorm":
            _core.rmsnorm_backward(dinp, gw, dout, x, w, stats[0], scratch)
        else:
            _core.layernorm_backward(dinp, gw, gb, dout, x, w, stats[0], stats[1], scratch)

    def _act_forward(self, h, up):
        """h = the MLP's activation of its first product: act(gate) * up (gated), act(up)."""
        cfg = self.config
        if cfg.gated_mlp:
            _core.glu_forward(h, up, cfg.activation_kernel)
        else:
            _core.activation_forward(h, up, cfg.activation_kernel)

    def _act_backward(self, dup, up, dh):
        cfg = self.config
        if cfg.gated_mlp:
            _core.glu_backward(dup, up, dh, cfg.activation_kernel)
        else:
            _core.activation_backward(dup, up, dh, cfg.activation_kernel)

    def _inference_plan(self):
        """The `_core.LlamaPlan` of this model's blocks (every block of an inference forward
        in one kernel call, the same kernels in the same order as `_block`), rebuilt when the
        store's parameters were replaced; None for a block it does not run."""
        cfg, store = self.config, self.store
        if self._bf16:
            return None   # the plan's kernels are float32: bfloat16 compute runs _block
        plan = self._plan
        if plan is not None and plan[0] == store.version:
            return plan[1]
        H, Q, KV, I, U = (cfg.hidden_size, cfg.q_width, cfg.kv_width, cfg.intermediate_size,
                          cfg.up_width)
        W, nm, layers = Q + 2 * KV, cfg.block_names, []
        layernorm = cfg.norm == "layernorm"
        for l in range(cfg.n_layer):
            P, J = store.layer_params[l], (self._joined[l] if self._joined is not None
                                           else None)
            fused = lambda first, rows, cols: self._fused(self.params, l, first, rows, cols)
            entry = (
                P[nm["ln1"]],
                J["qkv"] if J else fused(nm["qkv"], W, H),
                (J["qkv_bias"] if J else fused(nm["qkv_bias"], W, 0)) if cfg.qkv_bias else None,
                P[nm["o"]],
                P[nm["o_bias"]] if cfg.o_bias else None,
                P[nm["ln2"]],
                J["gu"] if J else fused(nm["up"], U, H),
                (J["gu_bias"] if J else fused(nm["up_bias"], U, 0)) if cfg.mlp_bias else None,
                P[nm["down"]],
                P[nm["down_bias"]] if cfg.mlp_bias else None)
            if layernorm:
                entry += (P[nm["ln1_bias"]], P[nm["ln2_bias"]])
            layers.append(entry)
        plan = _core.LlamaPlan(layers, H, cfg.n_head, cfg.n_kv_head, cfg.head_dim, I,
                               cfg.norm_eps, cfg.attention_scale, cfg.activation_kernel,
                               norm=cfg.norm, parallel_residual=cfg.parallel_residual,
                               gated=cfg.gated_mlp, interleaved=cfg.qkv_interleaved)
        self._plan = (store.version, plan)
        return plan

    def _blocks_inference(self, x, B, T, positions, cache=None, pos0=0):
        """Every block on the residual stream x (N, H) without keeping activations: the
        next residual stream (in x's memory when the plan runs them)."""
        plan = self._inference_plan()
        if plan is None:
            for l in range(self.config.n_layer):
                x = self._block(l, x, B, T, positions, None, cache, pos0)
            return x
        work = np.empty(plan.work_size(x.shape[0]), np.float32)
        if cache is None:
            plan.forward(x, B, positions, self._inv_freq, work)
        else:
            plan.forward(x, B, positions, self._inv_freq, work, cache.keys, cache.values, pos0)
        return x

    def _block(self, l, x, B, T, positions, keep, cache=None, pos0=0, row_pos=None):
        """One block on the residual stream x (N, H) -> the next residual stream; keep: a
        dict to fill with what the backward needs (or None)."""
        cfg, P, nm = self.config, self.store.layer_params[l], self.config.block_names
        N, H = x.shape
        Q, KV, I, U = cfg.q_width, cfg.kv_width, cfg.intermediate_size, cfg.up_width
        W = Q + 2 * KV
        ln1 = np.empty((N, H), np.float32)
        st1 = self._norm_forward(ln1, x, *self._norm_params(P, "ln1"))
        qkv = np.empty((N, W), np.float32)
        J = self._joined[l] if self._joined is not None else None
        self._mm(qkv, ln1, self._weight(l, "qkv", W))
        if cfg.qkv_bias:
            qkv += J["qkv_bias"] if J else self._fused(self.params, l, nm["qkv_bias"], W, 0)
        if cfg.qkv_interleaved:
            qkv = _heads_to_blocks(qkv, cfg.n_head)
        _core.rotary_forward(qkv, positions, self._inv_freq, 0, cfg.n_head + cfg.n_kv_head,
                             cfg.head_dim)
        qkv3 = qkv.reshape(B, T, W)
        atty = np.empty((B, T, Q), np.float32)
        if cache is None:
            lse = np.empty((B, cfg.n_head, T), np.float32) if keep is not None else _EMPTY3
            _core.attention_forward(atty, lse, qkv3, 0, qkv3, Q, qkv3, Q + KV, 0, cfg.n_head,
                                    cfg.attention_scale, cfg.n_kv_head)
        else:
            keys, values = cache.keys[l], cache.values[l]
            p0 = 0 if row_pos is not None else pos0
            _core.kv_cache_write(keys, values, qkv3, p0, Q, row_pos=row_pos)
            _core.attention_forward(atty, _EMPTY3, qkv3, 0, keys, 0, values, 0, p0,
                                    cfg.n_head, cfg.attention_scale, cfg.n_kv_head,
                                    row_pos=row_pos)
        atty2 = atty.reshape(N, Q)
        proj = np.empty((N, H), np.float32)
        self._mm(proj, atty2, self._weight(l, "o"))
        if cfg.o_bias:
            proj += P[nm["o_bias"]]
        ln2 = np.empty((N, H), np.float32)
        if cfg.parallel_residual:   # both norms read x
            res2 = None
            st2 = self._norm_forward(ln2, x, *self._norm_params(P, "ln2"))
        else:
            res2 = np.empty((N, H), np.float32)
            st2 = self._residual_norm_forward(res2, ln2, x, proj, *self._norm_params(P, "ln2"))
        gu = np.empty((N, U), np.float32)
        self._mm(gu, ln2, self._weight(l, "up", U))
        if cfg.mlp_bias:
            gu += J["gu_bias"] if J else self._fused(self.params, l, nm["up_bias"], U, 0)
        h = np.empty((N, I), np.float32)
        self._act_forward(h, gu)
        if cfg.parallel_residual:
            mlp = np.empty((N, H), np.float32)
            self._mm(mlp, h, self._weight(l, "down"))
            if cfg.mlp_bias:
                mlp += P[nm["down_bias"]]
            out = mlp + proj   # (mlp + attn) + x, as transformers' GPTNeoXLayer sums them
            out += x
        else:
            self._mm(proj, h, self._weight(l, "down"))
            if cfg.mlp_bias:
                proj += P[nm["down_bias"]]
            out = res2 + proj
        if keep is not None:
            keep.update(x=x, st1=st1, qkv=qkv, atty=atty, lse=lse, res2=res2, st2=st2, gu=gu)
        return out

    def forward(self, idx, targets=None, *, return_logits: bool = True,
                for_backward: bool = True):
        """Logits (B, T, V) for every position (None with return_logits=False) and, with
        targets (B, T; -1 ignored), the mean cross-entropy loss (else None).  With targets
        (and for_backward) the activations are kept for `backward`."""
        if targets is not None and for_backward and self.dtype == "float32":
            # a training forward writes the state backward reads: under the training lock,
            # as GPT2.forward's
            with self.store.lock, _core.pinned_num_threads():
                logits, loss = self._forward(idx, targets, for_backward)
        else:
            with _core.pinned_num_threads():   # every kernel of the call on one team size
                logits, loss = self._forward(idx, targets, for_backward)
        return (logits if return_logits else None), loss

    def _forward(self, idx, targets, for_backward=True):
        cfg = self.config
        idx = self._check_idx(idx)
        B, T = idx.shape
        if T > cfg.max_position_embeddings:
            raise ValueError(f"idx: T={T} is beyond max_position_embeddings="
                             f"{cfg.max_position_embeddings}")
        if targets is not None:
            targets = np.asarray(targets)
            if targets.shape != idx.shape:
                raise ValueError(f"targets: shape {targets.shape} is not idx's {idx.shape}")
            tflat = np.ascontiguousarray(targets, np.int64).reshape(-1)
            bad = np.flatnonzero((tflat < -1) | (tflat >= cfg.vocab_size))
            if bad.size:
                raise ValueError(f"targets: {int(tflat[bad[0]])} at {int(bad[0])} is outside "
                                 f"[-1, {cfg.vocab_size})")
        N = B * T
        flat = idx.reshape(-1)
        positions = np.tile(np.arange(T, dtype=np.int64), B)
        x = self._embed(flat)
        for_backward = for_backward and self.dtype == "float32"
        kept = [] if targets is not None and for_backward else None
        if kept is None:
            x = self._blocks_inference(x, B, T, positions)
        for l in range(cfg.n_layer if kept is not None else 0):
            keep = {}
            x = self._block(l, x, B, T, positions, keep)
            kept.append(keep)
        lnf = np.empty_like(x)
        stf = self._norm_forward(lnf, x, *self._norm_params(self.params))
        logits = np.empty((N, cfg.vocab_size), np.float32)
        self._mm(logits, lnf, self._head_weight())
        loss = None
        if targets is not None:
            losses, lse = np.empty(N, np.float32), np.empty(N, np.float32)
            _core.crossentropy_forward(losses, lse, logits, tflat)
            valid = int((tflat != -1).sum())
            loss = float(losses[tflat != -1].astype(np.float64).sum() / max(valid, 1))
            if for_backward:
                self._pending = _Pending(idx=flat, targets=tflat, lse=lse, logits=logits.copy(),
                                         layers=kept, xf=x, stf=stf, lnf=lnf, B=B, T=T,
                                         positions=positions, valid=valid)
        return logits.reshape(B, T, cfg.vocab_size), loss

    # ------------------------------------------------------------------ backward

    @property
    def pending_backward(self):
        """The record of the last training forward, which the next `backward` consumes (its
        ``n_valid`` is the number of targets it counted), or None."""
        return self._pending

    def backward(self, *, normalizer: int | None = None, on_layer_done=None):
        """Gradients of the last forward's loss, added into ``grads``.  normalizer: divide
        the summed loss by this count instead of the forward's valid targets (data
        parallel: the global count); on_layer_done(l): called after block l's backward, as
        `GPT2.backward` does."""
        with self.store.lock, _core.pinned_num_threads():
            self._backward(normalizer, on_layer_done)

    def _backward(self, normalizer=None, on_layer_done=None):
        self.store.check_trainable("backward()")
        if self._pending is None:
            raise RuntimeError("backward() needs a forward(idx, targets) first")
        if normalizer is not None and (not isinstance(normalizer, (int, np.integer))
                                       or isinstance(normalizer, bool) or normalizer < 1):
            raise ValueError(f"backward: normalizer must be a positive integer, got "
                             f"{normalizer!r}")
        f, self._pending = self._pending, None
        cfg, G, nm = self.config, self.grads, self.config.block_names
        B, T = f["B"], f["T"]
        N, H = B * T, cfg.hidden_size
        Q, KV, I, U = cfg.q_width, cfg.kv_width, cfg.intermediate_size, cfg.up_width
        W = Q + 2 * KV
        nt = _core.get_num_threads()
        # per-thread partial sums of the norm's weight (and bias) gradients
        scratch = np.empty((nt, max(H, 1) * (1 if cfg.norm == "rmsnorm" else 2)), np.float32)
        dlogits = np.empty_like(f["logits"])
        _core.crossentropy_backward(dlogits, f["logits"], f["lse"], f["targets"],
                                    1.0 / (normalizer or max(f["valid"], 1)))
        dln = np.empty((N, H), np.float32)
        self._mm_backward(dln, self._head(G), dlogits, f["lnf"], self._head_weight())
        dres = np.zeros((N, H), np.float32)
        self._norm_backward(dres, *self._norm_params(G), dln, f["xf"],
                            self._norm_params(self.params)[0], f["stf"], scratch)
        for l in reversed(range(cfg.n_layer)):
            k, P, GP = f["layers"][l], self.store.layer_params[l], self.store.layer_grads[l]
            # the MLP: mlp = down(act(up)), up = ln2 @ W_up^T (Llama: [gate | up])
            h = np.empty((N, I), np.float32)
            self._act_forward(h, k["gu"])
            dh = np.empty((N, I), np.float32)
            self._mm_backward(dh, GP[nm["down"]], dres, h, self._weight(l, "down"),
                              dout_kept=True)
            if cfg.mlp_bias:
                GP[nm["down_bias"]] += dres.sum(axis=0)
            dgu = np.empty((N, U), np.float32)
            self._act_backward(dgu, k["gu"], dh)
            if cfg.mlp_bias:
                self._fused(G, l, nm["up_bias"], U, 0)[...] += dgu.sum(axis=0)
            # ln2 reads x (parallel residual) or res2 = x + attn (sequential)
            ln2_in = k["x"] if cfg.parallel_residual else k["res2"]
            ln2 = np.empty((N, H), np.float32)
            self._norm_forward(ln2, ln2_in, *self._norm_params(P, "ln2"), keep=False)
            self._mm_backward(dln, self._fused(G, l, nm["up"], U, H), dgu, ln2,
                              self._weight(l, "up", U))
            if not cfg.parallel_residual:   # dres becomes d res2
                self._norm_backward(dres, *self._norm_params(GP, "ln2"), dln, ln2_in,
                                    self._norm_params(P, "ln2")[0], k["st2"], scratch)
            # attention: attn = o_proj(attention(rope(qkv)))
            atty2 = k["atty"].reshape(N, Q)
            datty = np.empty((N, Q), np.float32)
            self._mm_backward(datty, GP[nm["o"]], dres, atty2, self._weight(l, "o"),
                              dout_kept=True)
            if cfg.o_bias:
                GP[nm["o_bias"]] += dres.sum(axis=0)
            if cfg.parallel_residual:   # x's gradient through ln2, after attn read dres
                self._norm_backward(dres, *self._norm_params(GP, "ln2"), dln, ln2_in,
                                    self._norm_params(P, "ln2")[0], k["st2"], scratch)
            dqkv = np.empty((B, T, W), np.float32)
            _core.attention_backward(dqkv, datty.reshape(B, T, Q), k["atty"], k["lse"],
                                     k["qkv"].reshape(B, T, W), cfg.n_head,
                                     cfg.attention_scale, cfg.n_kv_head)
            dqkv2 = dqkv.reshape(N, W)
            _core.rotary_backward(dqkv2, f["positions"], self._inv_freq, 0,
                                  cfg.n_head + cfg.n_kv_head, cfg.head_dim)
            if cfg.qkv_interleaved:
                dqkv2 = _blocks_to_heads(dqkv2, cfg.n_head)
            if cfg.qkv_bias:
                self._fused(G, l, nm["qkv_bias"], W, 0)[...] += dqkv2.sum(axis=0)
            ln1 = np.empty((N, H), np.float32)
            self._norm_forward(ln1, k["x"], *self._norm_params(P, "ln1"), keep=False)
            self._mm_backward(dln, self._fused(G, l, nm["qkv"], W, H), dqkv2, ln1,
                              self._weight(l, "qkv", W))
            self._norm_backward(dres, *self._norm_params(GP, "ln1"), dln, k["x"],
                                self._norm_params(P, "ln1")[0], k["st1"], scratch)
            if on_layer_done is not None:
                on_layer_done(l)
        np.add.at(G[cfg.embed_name], f["idx"], dres)

    # ------------------------------------------------------------------ decoding

    def kv_cache(self, rows: int, positions: int | None = None) -> KVCache:
        """A KV cache for rows sequences of up to positions positions (default
        max_position_embeddings): (n_layer, rows, positions, kv_width), the KV heads only."""
        cfg = self.config
        positions = cfg.max_position_embeddings if positions is None else positions
        return KVCache.empty(cfg.n_layer, rows, positions, cfg.kv_width)

    def forward_cached(self, idx, pos0, cache: KVCache) -> np.ndarray:
        """The logits (B, V) of the last position of idx (B, T), whose tokens sit at
        positions pos0 .. pos0 + T - 1: their keys and values are written into the cache and
        attention reads positions 0 .. pos0 + T - 1 from it.  pos0 may also be B per-row
        positions (a ragged batch, as in `GPT2.forward_cached`; the cache then has B rows)."""
        with _core.pinned_num_threads():
            return self._forward_cached(idx, pos0, cache)

    def _forward_cached(self, idx, pos0, cache):
        cfg = self.config
        idx = self._check_idx(idx)
        B, T = idx.shape
        if not isinstance(cache, KVCache):
            raise TypeError(f"cache must be a KVCache (LlamaForCausalLM.kv_cache), got "
                            f"{type(cache).__name__}")
        L, rows, capacity, width = cache.keys.shape
        if (L, width) != (cfg.n_layer, cfg.kv_width) or rows < B:
            raise ValueError(f"{cache} does not fit this model (n_layer={cfg.n_layer}, "
                             f"kv_width={cfg.kv_width}) and {B} rows")
        row_pos = None
        if np.ndim(pos0) == 1:   # one position per row (a ragged batch, as GPT2's)
            row_pos = check_row_positions(pos0, B)
            first = int(row_pos.max())
            if rows != B:
                raise ValueError(f"{cache} has {rows} rows: per-row positions need one row "
                                 f"per sequence ({B})")
        elif not isinstance(pos0, (int, np.integer)) or isinstance(pos0, bool):
            raise TypeError(f"pos0 must be an integer, got {type(pos0).__name__}")
        else:
            first = pos0
        if first < 0 or first + T > capacity:
            raise ValueError(f"positions {first} .. {first + T - 1} are outside the KV cache's "
                             f"{capacity} positions")
        if row_pos is None:
            positions = np.tile(np.arange(pos0, pos0 + T, dtype=np.int64), B)
            x = self._blocks_inference(self._embed(idx.reshape(-1)), B, T, positions, cache,
                                       pos0)
        else:   # a ragged batch: the block by block path reads per-row positions
            positions = (row_pos[:, None] + np.arange(T, dtype=np.int64)).reshape(-1)
            x = self._embed(idx.reshape(-1))
            for l in range(cfg.n_layer):
                x = self._block(l, x, B, T, positions, None, cache, pos0, row_pos)
        last = np.ascontiguousarray(x.reshape(B, T, -1)[:, -1])
        lnf = np.empty_like(last)
        self._norm_forward(lnf, last, *self._norm_params(self.params), keep=False)
        logits = np.empty((B, cfg.vocab_size), np.float32)
        self._mm(logits, lnf, self._head_weight())
        return logits

    def generate(self, idx, max_new_tokens: int, temperature: float = 1.0, top_k=None,
                 top_p=None, seed=None, *, num_samples: int = 1, stop_at_eos: bool = False,
                 eos_token_id=None, context_full: str = "stop") -> np.ndarray:
        """Continue the prompts idx (B, T) or (T,) by up to max_new_tokens tokens, as
        `GPT2.generate` does (temperature 0: greedy); returns the token ids, prompts
        included.  stop_at_eos stops a row at eos_token_id (default: the config's, an id or
        a list of ids, any of which ends the row)."""
        if eos_token_id is None:
            eos_token_id = self.config.eos_token_id
        if stop_at_eos and eos_token_id is None:
            raise ValueError("stop_at_eos needs eos_token_id (the checkpoint's end token)")
        return _generation.generate(self, idx, max_new_tokens, temperature, top_k, top_p, seed,
                                    num_samples=num_samples, stop_at_eos=stop_at_eos,
                                    eos_token_id=eos_token_id if eos_token_id is not None
                                    else 0, context_full=context_full)

    def generate_stream(self, idx, max_new_tokens: int, temperature: float = 1.0, top_k=None,
                        top_p=None, seed=None, *, num_samples: int = 1,
                        stop_at_eos: bool = False, eos_token_id=None,
                        context_full: str = "stop", repetition_penalty=1.0,
                        presence_penalty=0.0, frequency_penalty=0.0, min_new_tokens=0,
                        logits_processor=None):
        """Like `generate`, an iterator over the new tokens as they are made (as
        `GPT2.generate_stream`; eos_token_id defaults to the config's)."""
        if eos_token_id is None:
            eos_token_id = self.config.eos_token_id
        if stop_at_eos and eos_token_id is None:
            raise ValueError("stop_at_eos needs eos_token_id (the checkpoint's end token)")
        return _generation.generate_stream(
            self, idx, max_new_tokens, temperature, top_k, top_p, seed,
            num_samples=num_samples, stop_at_eos=stop_at_eos,
            eos_token_id=eos_token_id if eos_token_id is not None else 0,
            context_full=context_full, repetition_penalty=repetition_penalty,
            presence_penalty=presence_penalty, frequency_penalty=frequency_penalty,
            min_new_tokens=min_new_tokens, logits_processor=logits_processor)

    def generate_text(self, prompt, max_new_tokens: int, temperature: float = 1.0, top_k=None,
                      top_p=None, seed=None, *, num_samples: int = 1, stop_at_eos: bool = True,
                      context_full: str = "stop", tokenizer=None, stop=None,
                      repetition_penalty=1.0, presence_penalty=0.0, frequency_penalty=0.0,
                      min_new_tokens=0, logits_processor=None):
        """Text in, text out, as `GPT2.generate_text`, with the checkpoint's tokenizer (the
        tokenizer.json beside the loaded checkpoint, or tokenizer=) and end tokens (the
        config's eos_token_id, one id or a list).

        Raises:
            ValueError: no tokenizer (a model not loaded from a directory with its
                tokenizer.json, and none passed).
        """
        enc = tokenizer if tokenizer is not None else self.tokenizer
        if enc is None:
            raise ValueError("generate_text needs the model's tokenizer: load the model from "
                             "a checkpoint directory with its tokenizer.json, or pass "
                             "tokenizer= (gpt2s.vocab.FileTokenizer.from_file(path))")
        eos = self.config.eos_token_id
        return _generation.generate_text(
            self, prompt, max_new_tokens, temperature, top_k, top_p, seed,
            num_samples=num_samples, stop_at_eos=stop_at_eos and eos is not None,
            context_full=context_full, tokenizer=enc, stop=stop,
            repetition_penalty=repetition_penalty, presence_penalty=presence_penalty,
            frequency_penalty=frequency_penalty, min_new_tokens=min_new_tokens,
            logits_processor=logits_processor, eos_token_id=eos if eos is not None else 0)
