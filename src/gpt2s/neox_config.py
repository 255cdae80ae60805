"""GPTNeoXConfig: the sizes and variant fields of a GPT-NeoX model (``model_type: gpt_neox``:
the Pythia suite, GPT-NeoX-20B), read from a Hugging Face ``config.json``, and its block
description for the decoder `gpt2s.llama.LlamaForCausalLM` runs (`gpt2s.neox`).

A GPT-NeoX block, as transformers' GPTNeoXLayer computes it:

    a = dense(attn(rope(query_key_value(ln1(x)))))          (LayerNorms with biases)
    parallel residual:    x' = x + a + mlp(ln2(x))
    sequential residual:  h = x + a;  x' = h + mlp(ln2(h))
    mlp(y) = dense_4h_to_h(act(dense_h_to_4h(y)))          (act: "gelu", the exact erf GELU)

query_key_value's output rows are laid out per head ([n_head, 3, head_dim]: q, k, v of head 0,
then of head 1, ...); the rotary embedding turns the first rotary_pct of each head's values
(Pythia: 0.25) in the rotate_half convention (value i pairs with value i + rotary_dim / 2).

Every key of a GPT-NeoX config.json is either honoured, known not to change the math
(dropouts, token ids, ``use_cache``, ...: gpt2s never applies dropout), or refused with an
error naming the key, an unknown key included.  Both forms of the rotary settings are read:
transformers 4's ``rotary_pct`` / ``rotary_emb_base`` / ``rope_scaling`` and transformers 5's
``rope_parameters`` (``partial_rotary_factor``, ``rope_theta``); when a file carries both they
must agree.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field

import numpy as np

from .config import ACTIVATION_KERNELS, read_config_json
from .llama_config import ALIGN, _bad, _check_rope_scaling, _check_token_ids, rope_inv_freq

__all__ = ["GPTNeoXConfig", "NEOX_LAYER_SUFFIXES"]

# keys that do not change the computation: accepted and ignored (gpt2s applies no dropout)
_IGNORED_KEYS = frozenset({
    "architectures", "transformers_version", "torch_dtype", "dtype", "initializer_range",
    "use_cache", "pad_token_id", "attention_dropout", "hidden_dropout", "classifier_dropout",
    "attention_probs_dropout_prob", "hidden_dropout_prob", "gradient_checkpointing",
    "output_hidden_states", "output_attentions", "return_dict", "chunk_size_feed_forward",
    "is_encoder_decoder", "is_decoder", "id2label", "label2id", "problem_type",
    "_name_or_path", "tokenizer_class", "model_type",
})
# keys read into GPTNeoXConfig (the rotary settings in either transformers' form)
_READ_KEYS = frozenset({
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
    "num_attention_heads", "hidden_act", "max_position_embeddings", "layer_norm_eps",
    "rotary_pct", "rotary_emb_base", "rope_theta", "partial_rotary_factor", "rope_scaling",
    "rope_parameters", "use_parallel_residual", "attention_bias", "tie_word_embeddings",
    "bos_token_id", "eos_token_id", "head_dim",
})
_ROPE_KNOWN = {"rope_type", "type", "rope_theta", "partial_rotary_factor", "factor",
               "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"}

# the tensors of block l, "gpt_neox.layers.{l}.<suffix>" (attention biases when the config
# has them; the MLP's always)
NEOX_LAYER_SUFFIXES = (
    "input_layernorm.weight", "input_layernorm.bias", "post_attention_layernorm.weight",
    "post_attention_layernorm.bias", "attention.query_key_value.weight",
    "attention.query_key_value.bias", "attention.dense.weight", "attention.dense.bias",
    "mlp.dense_h_to_4h.weight", "mlp.dense_h_to_4h.bias", "mlp.dense_4h_to_h.weight",
    "mlp.dense_4h_to_h.bias",
)
EMBED = "gpt_neox.embed_in.weight"
NORM = "gpt_neox.final_layer_norm.weight"
NORM_BIAS = "gpt_neox.final_layer_norm.bias"
HEAD = "embed_out.weight"
LAYERS = "gpt_neox.layers."


@dataclass(frozen=True)
class GPTNeoXConfig:
    """The sizes and variant fields of a GPT-NeoX (Pythia) model, with transformers' key
    names and defaults.  Frozen; checked when made.

    Args:
        vocab_size: the rows of the embedding (Pythia: 50304, beyond its tokenizer's).
        hidden_size: the width of the residual stream.
        num_hidden_layers: the blocks.
        num_attention_heads: the heads (each hidden_size / num_attention_heads wide).
        intermediate_size: the width of the MLP.
        hidden_act: the MLP's activation (transformers' name): "gelu" (the exact erf GELU,
            Pythia's), "gelu_new" / "gelu_fast" / "gelu_pytorch_tanh" (the tanh form), and
            the others of ``gpt2s.config.ACTIVATION_KERNELS``.
        max_position_embeddings: the longest sequence.
        layer_norm_eps: the epsilon of every LayerNorm.
        rotary_pct: the share of each head the rotary embedding turns (transformers 5's
            partial_rotary_factor); rotary_pct * head_dim must be an even whole number.
        rotary_emb_base: the rotary base (rope_theta).
        rope_scaling: None, {"rope_type": "linear", "factor": f} or Llama 3's scaling (as
            `gpt2s.llama_config.LlamaConfig`), applied to the rotated part.
        use_parallel_residual: x + attn(ln1(x)) + mlp(ln2(x)) (True, Pythia's), else the
            sequential block.
        attention_bias: query_key_value and dense have biases.
        tie_word_embeddings: the output head (embed_out) is the embedding.
        bos_token_id: the checkpoint's begin token (read, not used in the computation).
        eos_token_id: its end token, or a tuple of them: generation stops at any (not
            compared by ``==``: it changes no number the model computes).

    Raises:
        ValueError: a size out of bounds, heads that do not divide hidden_size, a rotary
            share that is not an even number of values, an unknown activation or rope scaling
            (the message names the field).

    Examples:
        >>> c = GPTNeoXConfig(vocab_size=100, hidden_size=64, num_hidden_layers=2,
        ...                   num_attention_heads=4, intermediate_size=256)
        >>> c.head_dim, c.rotary_dim, c.inv_freq().shape
        (16, 4, (2,))
    """

    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    intermediate_size: int
    hidden_act: str = "gelu"
    max_position_embeddings: int = 2048
    layer_norm_eps: float = 1e-5
    rotary_pct: float = 0.25
    rotary_emb_base: float = 10000.0
    rope_scaling: dict | None = field(default=None, hash=False)
    use_parallel_residual: bool = True
    attention_bias: bool = True
    tie_word_embeddings: bool = False
    bos_token_id: int | None = field(default=None, compare=False)
    eos_token_id: int | tuple | None = field(default=None, compare=False)

    model_type = "gpt_neox"   # (not a field)

    def __post_init__(self):
        def setf(name, value):
            object.__setattr__(self, name, value)
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                     "num_attention_heads", "max_position_embeddings"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or not 1 <= v <= 1 << 24:
                raise ValueError(f"GPTNeoXConfig.{name}={v!r}: need an integer in [1, 2^24]")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"GPTNeoXConfig.num_attention_heads={self.num_attention_heads}: "
                             f"need a divisor of hidden_size={self.hidden_size}")
        for name in ("layer_norm_eps", "rotary_emb_base"):
            v = getattr(self, name)
            if (not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v)
                    or v <= 0):
                raise ValueError(f"GPTNeoXConfig.{name}={v!r}: need a positive finite number")
        pct = self.rotary_pct
        if (not isinstance(pct, (int, float)) or isinstance(pct, bool)
                or not 0.0 <= pct <= 1.0):
            raise ValueError(f"GPTNeoXConfig.rotary_pct={pct!r}: need a number in [0, 1]")
        if self.rotary_dim % 2:
            raise ValueError(f"GPTNeoXConfig.rotary_pct={pct!r}: turns {self.rotary_dim} of a "
                             f"head's {self.head_dim} values, an odd number (the rotary "
                             f"embedding rotates pairs)")
        for name in ("use_parallel_residual", "attention_bias", "tie_word_embeddings"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"GPTNeoXConfig.{name}={getattr(self, name)!r}: need true or "
                                 f"false")
        if self.hidden_act not in ACTIVATION_KERNELS:
            raise ValueError(f"GPTNeoXConfig.hidden_act={self.hidden_act!r}: not one of "
                             f"{sorted(ACTIVATION_KERNELS)}")
        setf("eos_token_id", _check_token_ids("GPTNeoXConfig", self.bos_token_id,
                                              self.eos_token_id, self.vocab_size))
        setf("rope_scaling", _check_rope_scaling(self.rope_scaling,
                                                 "GPTNeoXConfig.rope_scaling"))

    # --- sizes the kernels use ---------------------------------------------------------

    @property
    def n_layer(self) -> int:
        return self.num_hidden_layers

    @property
    def n_ctx(self) -> int:
        """The longest sequence (max_position_embeddings), by the name the decoding loop
        reads."""
        return self.max_position_embeddings

    @property
    def n_head(self) -> int:
        return self.num_attention_heads

    @property
    def n_kv_head(self) -> int:
        return self.num_attention_heads

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    head_size = head_dim

    @property
    def rotary_dim(self) -> int:
        """The values of each head the rotary embedding turns: int(head_dim * rotary_pct),
        as transformers rounds it."""
        return int(self.head_dim * self.rotary_pct)

    @property
    def q_width(self) -> int:
        return self.hidden_size

    @property
    def kv_width(self) -> int:
        return self.hidden_size

    @property
    def qkv_bias(self) -> bool:
        return self.attention_bias

    @property
    def o_bias(self) -> bool:
        return self.attention_bias

    @property
    def mlp_bias(self) -> bool:
        """The MLP's two products always have biases."""
        return True

    @property
    def activation_kernel(self) -> str:
        return ACTIVATION_KERNELS[self.hidden_act]

    @property
    def attention_scale(self) -> float:
        return 1.0 / math.sqrt(self.head_dim)

    # --- the block description the decoder reads (gpt2s.llama) -------------------------

    norm = "layernorm"
    gated_mlp = False
    qkv_interleaved = True
    layer_prefix = LAYERS
    embed_name, final_norm_name, final_norm_bias_name, head_name = EMBED, NORM, NORM_BIAS, HEAD
    block_names = {
        "ln1": "input_layernorm.weight", "ln1_bias": "input_layernorm.bias",
        "qkv": "attention.query_key_value.weight", "qkv_bias": "attention.query_key_value.bias",
        "o": "attention.dense.weight", "o_bias": "attention.dense.bias",
        "ln2": "post_attention_layernorm.weight", "ln2_bias": "post_attention_layernorm.bias",
        "up": "mlp.dense_h_to_4h.weight", "up_bias": "mlp.dense_h_to_4h.bias",
        "down": "mlp.dense_4h_to_h.weight", "down_bias": "mlp.dense_4h_to_h.bias",
    }

    @property
    def parallel_residual(self) -> bool:
        return self.use_parallel_residual

    @property
    def norm_eps(self) -> float:
        return self.layer_norm_eps

    @property
    def up_width(self) -> int:
        return self.intermediate_size

    def inv_freq(self) -> np.ndarray:
        """The rotary inverse frequencies (rotary_dim / 2,) float32, as transformers computes
        them for the rotated part of a head (base^(-2i / rotary_dim), then the scaling)."""
        return rope_inv_freq(self.rotary_dim, self.rotary_emb_base, self.rope_scaling)

    # --- the parameters (ParameterStore's family interface) ------------------------------

    def layer_suffixes(self) -> tuple:
        """The tensors of one block, in the order of the parameter buffer."""
        return tuple(s for s in NEOX_LAYER_SUFFIXES
                     if self.attention_bias or not (s.startswith("attention.")
                                                    and s.endswith(".bias")))

    def _layer_shapes(self) -> dict:
        H, I = self.hidden_size, self.intermediate_size
        return {
            "input_layernorm.weight": (H,), "input_layernorm.bias": (H,),
            "post_attention_layernorm.weight": (H,), "post_attention_layernorm.bias": (H,),
            "attention.query_key_value.weight": (3 * H, H),
            "attention.query_key_value.bias": (3 * H,),
            "attention.dense.weight": (H, H), "attention.dense.bias": (H,),
            "mlp.dense_h_to_4h.weight": (I, H), "mlp.dense_h_to_4h.bias": (I,),
            "mlp.dense_4h_to_h.weight": (H, I), "mlp.dense_4h_to_h.bias": (H,),
        }

    def param_layout(self):
        """[(name, shape, offset)] of every parameter in the float32 buffer, and its length:
        the embedding, the blocks, the final LayerNorm, an untied head (embed_out); each
        tensor on a 64-byte boundary."""
        shapes = self._layer_shapes()
        entries = [(EMBED, (self.vocab_size, self.hidden_size))]
        for l in range(self.num_hidden_layers):
            entries += [(f"{LAYERS}{l}.{s}", shapes[s]) for s in self.layer_suffixes()]
        entries += [(NORM, (self.hidden_size,)), (NORM_BIAS, (self.hidden_size,))]
        if not self.tie_word_embeddings:
            entries.append((HEAD, (self.vocab_size, self.hidden_size)))
        layout, offset = [], 0
        for name, shape in entries:
            offset = (offset + ALIGN - 1) // ALIGN * ALIGN
            layout.append((name, shape, offset))
            offset += math.prod(shape)
        return layout, (offset + ALIGN - 1) // ALIGN * ALIGN

    def layer_views(self, tensors: dict, layer: int) -> dict:
        return {s: tensors[f"{LAYERS}{layer}.{s}"] for s in self.layer_suffixes()}

    @staticmethod
    def layer_of(name: str):
        if not name.startswith(LAYERS):
            return None
        l, suffix = name[len(LAYERS):].split(".", 1)
        return int(l), suffix

    # --- Hugging Face config.json -----------------------------------------------------

    @classmethod
    def from_hf_dict(cls, d: dict, source: str = "config.json") -> "GPTNeoXConfig":
        """The config from the keys of a Hugging Face GPT-NeoX ``config.json``.

        Raises:
            ValueError: another model_type, a key gpt2s refuses or does not know, a missing
                size, two forms of a rotary setting that disagree, a value out of bounds (the
                message names the source and the key).
        """
        model_type = d.get("model_type")
        if model_type != "gpt_neox":
            raise _bad(source, "model_type", model_type, "GPTNeoXConfig reads model_type "
                       "'gpt_neox'")
        for key in d:
            if key not in _READ_KEYS and key not in _IGNORED_KEYS:
                if key == "quantization_config":
                    raise _bad(source, key, d[key], "gpt2s loads float32/float16/bfloat16 "
                               "weights, not a quantisation scheme")
                raise ValueError(f"{source}: unknown key {key!r} (= "
                                 f"{json.dumps(d[key], default=str)[:60]}) for model_type "
                                 f"'gpt_neox': gpt2s does not know what it changes, so it "
                                 f"refuses the config")
        try:
            kwargs = {k: d[k] for k in ("vocab_size", "hidden_size", "intermediate_size",
                                        "num_hidden_layers", "num_attention_heads")}
        except KeyError as e:
            raise ValueError(f"{source}: missing gpt_neox config key {e.args[0]!r}") from None
        for k in ("hidden_act", "max_position_embeddings", "layer_norm_eps",
                  "use_parallel_residual", "attention_bias", "tie_word_embeddings",
                  "bos_token_id", "eos_token_id"):
            if d.get(k) is not None:
                kwargs[k] = d[k]
        hd = d.get("head_dim")
        heads, hidden = d["num_attention_heads"], d["hidden_size"]
        if hd is not None and not (isinstance(heads, int) and isinstance(hidden, int)
                                   and heads > 0 and hd * heads == hidden):
            raise _bad(source, "head_dim", hd, "a GPT-NeoX head is hidden_size / "
                       "num_attention_heads wide")
        # the rotary settings: each may be written in several places, which must agree
        rope = d.get("rope_parameters")
        if rope is not None and not isinstance(rope, dict):
            raise _bad(source, "rope_parameters", rope, "need an object")
        rope = dict(rope or {})
        scaling = d.get("rope_scaling")
        if scaling is not None and not isinstance(scaling, dict):
            raise _bad(source, "rope_scaling", scaling, "need null or an object")
        scaling = dict(scaling or {})
        for where, r in (("rope_parameters", rope), ("rope_scaling", scaling)):
            for k in r:
                if k not in _ROPE_KNOWN:
                    raise _bad(source, f"{where}.{k}", r[k], "an unknown rope parameter")
        for name, places in (
                ("rotary_emb_base", (("rope_parameters.rope_theta", rope.pop("rope_theta", None)),
                                     ("rope_scaling.rope_theta", scaling.pop("rope_theta", None)),
                                     ("rotary_emb_base", d.get("rotary_emb_base")),
                                     ("rope_theta", d.get("rope_theta")))),
                ("rotary_pct", (("rope_parameters.partial_rotary_factor",
                                 rope.pop("partial_rotary_factor", None)),
                                ("rope_scaling.partial_rotary_factor",
                                 scaling.pop("partial_rotary_factor", None)),
                                ("rotary_pct", d.get("rotary_pct")),
                                ("partial_rotary_factor", d.get("partial_rotary_factor"))))):
            given = [(k, v) for k, v in places if v is not None]
            for k, v in given[1:]:
                if v != given[0][1]:
                    raise _bad(source, k, v, f"it differs from {given[0][0]}={given[0][1]}")
            if given:
                kwargs[name] = given[0][1]
        kinds = []
        for where, r in (("rope_parameters", rope), ("rope_scaling", scaling)):
            if "type" in r and "rope_type" not in r:
                r["rope_type"] = r["type"]
            r.pop("type", None)
            if r.get("rope_type", "default") != "default":
                kinds.append(r)
            elif set(r) - {"rope_type"}:
                k = sorted(set(r) - {"rope_type"})[0]
                raise _bad(source, f"{where}.{k}", r[k],
                           "not a parameter of the default rotary embedding")
        if len(kinds) == 2 and kinds[0] != kinds[1]:
            raise _bad(source, "rope_scaling", d["rope_scaling"],
                       "it differs from the scaling in rope_parameters")
        if kinds:
            kwargs["rope_scaling"] = kinds[0]
        try:
            return cls(**kwargs)
        except ValueError as e:
            raise ValueError(f"{source}: {str(e).removeprefix('GPTNeoXConfig.')}") from None

    @classmethod
    def from_json_file(cls, path: str | os.PathLike) -> "GPTNeoXConfig":
        """The config from a GPT-NeoX ``config.json`` file (`from_hf_dict`)."""
        return cls.from_hf_dict(read_config_json(path), source=str(path))

    def to_hf_dict(self) -> dict:
        """The ``config.json`` content that ``transformers.GPTNeoXForCausalLM`` loads (the
        rotary settings in transformers 4's keys, rotary_pct and rotary_emb_base, which
        transformers 5 and llama.cpp's converter read as well)."""
        d = {k: v for k, v in asdict(self).items() if k != "rope_scaling"}
        if isinstance(self.eos_token_id, tuple):
            d["eos_token_id"] = list(self.eos_token_id)
        d.update(model_type="gpt_neox", architectures=["GPTNeoXForCausalLM"],
                 rope_scaling=None if self.rope_scaling is None else dict(self.rope_scaling),
                 attention_dropout=0.0, hidden_dropout=0.0, torch_dtype="float32")
        return d
