"""GPTNeoXForCausalLM: a GPT-NeoX decoder (the Pythia suite) on gpt2s' kernels, with Hugging
Face's parameter names (``gpt_neox.layers.3.attention.query_key_value.weight``, ...).

A family is a block description, not a new model: `gpt2s.neox_config.GPTNeoXConfig` describes
the block (LayerNorms with biases, a fused per-head query_key_value, partial rotary, a GELU
MLP with biases, parallel or sequential residual, an untied ``embed_out`` head) and the
forward, backward, KV-cache decoding and generation are `gpt2s.llama.LlamaForCausalLM`'s,
which read that description.  This class adds what is GPT-NeoX's own: the config class, the
initialisation, the checkpoint loader (``embed_out.weight`` or a tied head; the attention
mask buffers and rotary tables old checkpoints carry are skipped) and the low-precision
weights' views.
"""

from __future__ import annotations

import os

import numpy as np

from . import weight_types as _wt
from . import weights as _weights
from .config import parse_config_json
from .llama import LlamaForCausalLM
from .neox_config import EMBED, HEAD, GPTNeoXConfig

__all__ = ["GPTNeoXForCausalLM"]

# buffers older transformers versions saved beside the weights: not parameters
_BUFFERS = (".attention.bias", ".attention.masked_bias", ".rotary_emb.inv_freq")


def _check_tied_head(file, header, data_start, mm, config):
    """A tied model's file may also hold embed_out.weight: it must equal embed_in.weight.
    Compared a chunk of rows at a time (no float32 copy of either)."""
    shape = (config.vocab_size, config.hidden_size)
    if not _weights.rows_equal((file, header, HEAD, data_start, mm),
                               (file, header, EMBED, data_start, mm), shape):
        raise _weights.SafetensorsError(
            f"{file}: {HEAD!r} differs from {EMBED!r} but the config ties them "
            f"(tie_word_embeddings)")


class GPTNeoXForCausalLM(LlamaForCausalLM):
    """A GPT-NeoX (Pythia) model: float32 (trainable), or bfloat16 / int8 / int4 matmul
    weights for inference (`to_dtype`).  The same API as `gpt2s.LlamaForCausalLM` (forward,
    backward, kv_cache, forward_cached, generate, generate_stream, generate_text, params,
    grads, save_safetensors, to_dtype).

    Args:
        config: a `GPTNeoXConfig`.
        dtype: the storage of the matmul weights, "float32" (trainable; a new model's
            weights are zeros: `from_config`, `from_pretrained`) or "bfloat16", "int8",
            "int4" (inference).

    Examples:
        >>> from gpt2s.neox_config import GPTNeoXConfig
        >>> cfg = GPTNeoXConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2,
        ...                     num_attention_heads=4, intermediate_size=128)
        >>> m = GPTNeoXForCausalLM.from_config(cfg, seed=0)
        >>> logits, loss = m.forward(np.array([[1, 2, 3]]), np.array([[2, 3, 4]]))
        >>> logits.shape, bool(np.isfinite(loss))
        ((1, 3, 50), True)
    """

    _config_class = GPTNeoXConfig

    def __init__(self, config: GPTNeoXConfig, dtype: str = "float32"):
        super().__init__(config, dtype)

    def _join(self):
        """For a model of another dtype: the stored weights the block reads (query_key_value
        and dense_h_to_4h are one tensor each already)."""
        if self.store.dtype == "float32":
            return
        nm, joined = self.config.block_names, []
        for l in range(self.config.n_layer):
            P = self.store.layer_params[l]
            entry = {"qkv": P[nm["qkv"]], "gu": P[nm["up"]], "gu_bias": P[nm["up_bias"]]}
            if self.config.qkv_bias:
                entry["qkv_bias"] = P[nm["qkv_bias"]]
            joined.append(entry)
        self._joined = joined

    @classmethod
    def from_config(cls, config: GPTNeoXConfig, seed: int | None = None, *,
                    compute_dtype: str = "float32") -> "GPTNeoXForCausalLM":
        """A model with random weights as transformers initialises them (normal, std 0.02;
        the LayerNorm weights at 1, every bias at 0); compute_dtype: the precision of the
        matmuls (`compute_dtype`)."""
        m = cls(config)
        rng = np.random.default_rng(seed)
        for name, p in m.params.items():
            if name.endswith(".bias"):
                p[...] = 0.0
            elif p.ndim == 1:
                p[...] = 1.0
            else:
                p[...] = rng.normal(0.0, 0.02, p.shape)
        m.compute_dtype = compute_dtype
        return m

    @classmethod
    def from_safetensors(cls, path, dtype: str | None = None, *,
                         compute_dtype: str = "float32") -> "GPTNeoXForCausalLM":
        """A float32 model from a Hugging Face GPT-NeoX checkpoint: a directory with
        config.json and model.safetensors, or a .safetensors file saved by gpt2s (its config
        in the __metadata__).  Tensors in float32, float16 or bfloat16.  dtype: None or
        "float32", else the storage of the matmul weights ("bfloat16", "int8", "int4", as
        `to_dtype` stores them; each weight is compressed as it is read, so the float32 model
        is never held whole).  compute_dtype: the precision of the matmuls, "float32" or
        "bfloat16" (`compute_dtype`).

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
        file, cfg_file = _weights.resolve_model_path(path)
        mm, header, metadata, data_start = _weights.open_mapped(file)
        try:
            if cfg_file is not None:
                if os.stat(cfg_file).st_size > 16 << 20:
                    raise ValueError(f"{cfg_file}: too large for a config.json")
                config = GPTNeoXConfig.from_json_file(cfg_file)
            elif _weights.CONFIG_METADATA_KEY in metadata:
                source = f"{file}: __metadata__[{_weights.CONFIG_METADATA_KEY!r}]"
                config = GPTNeoXConfig.from_hf_dict(
                    parse_config_json(metadata[_weights.CONFIG_METADATA_KEY], source), source)
            else:
                raise _weights.SafetensorsError(
                    f"{file}: no config.json beside it and no config in its __metadata__: a "
                    f"GPT-NeoX model's sizes cannot be read from its tensors alone")
            # another storage: each matmul weight read (float32) and compressed in turn, so
            # the float32 model is never held whole
            low = dtype is not None and dtype != "float32"
            m = cls(config, dtype if low else "float32")
            for name in header:
                if name in m.params or name.endswith(_BUFFERS):
                    continue
                if name == HEAD and config.tie_word_embeddings:
                    continue   # a tied head saved anyway: checked equal below
                raise _weights.SafetensorsError(
                    f"{file}: unexpected tensor {name!r} for this GPT-NeoX config")
            # every tensor read a few rows at a time into its place (the float32 buffer's
            # view, or compressed into its rows of the stored weight, as to_dtype compresses
            # them), the file pages of each row range dropped once converted: the peak is the
            # model plus a few rows, never a float32 copy of a matmul weight or the file's
            # pages of a whole tensor
            kind = _wt.get(m.dtype)
            for name, p in m.params.items():
                if name not in header:
                    raise _weights.SafetensorsError(f"{file}: tensor {name!r} is missing")
                where = (file, header, name, data_start, mm)
                if len(p.shape) != 2:
                    _weights.read_tensor(*where, p)
                    _weights.drop_tensor_pages(mm, data_start, header[name])
                    continue
                _weights.check_readable(file, name, header[name], p.shape)
                compressed = not isinstance(p, np.ndarray)
                buf = None
                for r0, r1 in _weights.row_chunks(*p.shape):
                    if compressed:
                        if buf is None:
                            buf = np.empty((r1 - r0, p.shape[1]), np.float32)
                        rows = buf[:r1 - r0]
                        _weights.read_rows(*where, rows, r0, m.dtype)
                        kind.compress_rows_into(name, p, r0, rows)
                    else:
                        _weights.read_rows(*where, p[r0:r1], r0)
                _weights.drop_tensor_pages(mm, data_start, header[name])
            if config.tie_word_embeddings and HEAD in header:
                _check_tied_head(file, header, data_start, mm, config)
            if low:
                m._join()
        finally:
            mm.close()
        if cfg_file is not None:
            m._tokenizer_later(file.parent, config)
        return m

    @classmethod
    def from_pretrained(cls, name_or_path, dtype: str | None = None, *,
                        compute_dtype: str = "float32") -> "GPTNeoXForCausalLM":
        """A model from a local GPT-NeoX checkpoint directory (config.json +
        model.safetensors, as ``hf download EleutherAI/pythia-160m`` fetches it) or a
        .safetensors file gpt2s saved.  dtype: the weight storage, compute_dtype: the
        precision of the matmuls, as in `from_safetensors`."""
        if dtype is not None:
            _wt.check_dtype(dtype)
        return cls.from_safetensors(name_or_path, dtype, compute_dtype=compute_dtype)

    def __repr__(self):
        c = self.config
        return (f"GPTNeoXForCausalLM(gpt_neox: {c.n_layer} layers, hidden {c.hidden_size}, "
                f"{c.n_head} heads, rotary {c.rotary_dim}/{c.head_dim}, "
                f"{'parallel' if c.use_parallel_residual else 'sequential'} residual, "
                f"vocab {c.vocab_size}, {self.dtype})")

    def save_safetensors(self, path, dtype: str = "float32"):
        """Write the model as Hugging Face's GPTNeoXForCausalLM lays it out (model.safetensors
        and config.json in the directory path, or a lone .safetensors file with the config in
        its __metadata__), in float32, float16 or bfloat16; all-or-nothing (temp file +
        rename).  Returns the path written."""
        return super().save_safetensors(path, dtype)
