"""LlamaConfig: the sizes and variant fields of a Llama-architecture model (``model_type:
llama``: SmolLM2, TinyLlama, Llama 3.2; ``qwen2``: Qwen2.5, the same block with biases on the
q, k, v projections), read from a Hugging Face ``config.json``, and the
inverse frequencies of its rotary embeddings (the rope scaling types ``linear`` and
``llama3`` included).

Every key of a Llama config.json is either carried here and honoured by the kernels, known
not to change the math (dropouts, token ids, ``architectures``, ...; dropout is never
applied), or refused with an error naming the key: an unknown key is refused too, since
gpt2s cannot know what it changes.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field

import numpy as np

from .config import ACTIVATION_KERNELS, read_config_json

__all__ = ["LlamaConfig", "LLAMA_LAYER_SUFFIXES", "rope_inv_freq"]

ALIGN = 16   # as weights.ALIGN: every group of tensors starts on a 64-byte boundary

# keys that do not change the computation: accepted and ignored
_IGNORED_KEYS = frozenset({
    "architectures", "transformers_version", "torch_dtype", "dtype", "initializer_range",
    "use_cache", "pad_token_id", "attention_dropout",
    "output_hidden_states", "output_attentions", "return_dict", "chunk_size_feed_forward",
    "is_encoder_decoder", "id2label", "label2id", "problem_type", "_name_or_path",
    "tokenizer_class", "is_llama_config", "transformers.js_config", "pretraining_tp",
    "model_type",
})
# keys read into LlamaConfig (rope_theta / rope_scaling: transformers 4's form;
# rope_parameters: transformers 5's)
_READ_KEYS = frozenset({
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
    "num_attention_heads", "num_key_value_heads", "head_dim", "max_position_embeddings",
    "rms_norm_eps", "rope_theta", "rope_scaling", "rope_parameters", "tie_word_embeddings",
    "attention_bias", "mlp_bias", "hidden_act", "rope_interleaved",
    "bos_token_id", "eos_token_id",
})
# Qwen2's keys besides: its sliding window, read to refuse it when it is on
_QWEN2_KEYS = frozenset({"use_sliding_window", "sliding_window", "max_window_layers",
                         "layer_types"})
_ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}
# the rope scaling types gpt2s computes, with the keys each needs
_ROPE_TYPES = {
    "default": (),
    "linear": ("factor",),
    "llama3": ("factor", "low_freq_factor", "high_freq_factor",
               "original_max_position_embeddings"),
}
_ROPE_KNOWN = {"rope_type", "type", "rope_theta", "factor", "low_freq_factor",
               "high_freq_factor", "original_max_position_embeddings", "partial_rotary_factor"}

# the tensors of block l, "model.layers.{l}.<suffix>" (biases when the config has them)
LLAMA_LAYER_SUFFIXES = (
    "input_layernorm.weight", "self_attn.q_proj.weight", "self_attn.k_proj.weight",
    "self_attn.v_proj.weight", "self_attn.q_proj.bias", "self_attn.k_proj.bias",
    "self_attn.v_proj.bias", "self_attn.o_proj.weight", "self_attn.o_proj.bias",
    "post_attention_layernorm.weight", "mlp.gate_proj.weight", "mlp.up_proj.weight",
    "mlp.gate_proj.bias", "mlp.up_proj.bias", "mlp.down_proj.weight", "mlp.down_proj.bias",
)
EMBED = "model.embed_tokens.weight"
NORM = "model.norm.weight"
HEAD = "lm_head.weight"


def _bad(source, key, value, why):
    return ValueError(f"{source}: {key}={json.dumps(value, default=str)} is not supported: "
                      f"{why}")


@dataclass(frozen=True)
class LlamaConfig:
    """The sizes and variant fields of a Llama model, with transformers' key names and
    defaults.  Frozen; checked when made.

    Args:
        vocab_size: the tokens of the vocabulary.
        hidden_size: the width of the residual stream.
        intermediate_size: the width of the MLP.
        num_hidden_layers: the blocks.
        num_attention_heads: the query heads.
        num_key_value_heads: the key/value heads of grouped-query attention (None: as many
            as num_attention_heads), a divisor of num_attention_heads.
        head_dim: the size of a head (None: hidden_size // num_attention_heads), even.
        max_position_embeddings: the longest sequence.
        rms_norm_eps: the epsilon of every RMSNorm.
        rope_theta: the rotary base.
        rope_scaling: None, or {"rope_type": "linear", "factor": f}, or Llama 3's
            {"rope_type": "llama3", "factor", "low_freq_factor", "high_freq_factor",
            "original_max_position_embeddings"}.
        tie_word_embeddings: the output head is the embedding.
        attention_bias: q, k, v and o projections have biases.
        mlp_bias: gate, up and down projections have biases.
        hidden_act: the gate's activation (transformers' name; "silu" for SwiGLU).
        model_type: "llama", or "qwen2" (q, k, v projections with biases, none elsewhere;
            attention_bias and mlp_bias stay false).
        bos_token_id: the checkpoint's begin token (read from config.json, not used in the
            computation).
        eos_token_id: its end token, or a tuple of them: generation stops at any (not
            compared by ``==``: it changes no number the model computes).

    Raises:
        ValueError: a size out of bounds, heads that do not divide, an odd head_dim, an
            unknown activation or rope scaling (the message names the field).

    Examples:
        >>> c = LlamaConfig(vocab_size=100, hidden_size=64, intermediate_size=128,
        ...                 num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
        >>> c.head_size, c.kv_width, c.inv_freq().shape
        (16, 32, (8,))
    """

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    max_position_embeddings: int = 2048
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict | None = field(default=None, hash=False)
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    mlp_bias: bool = False
    hidden_act: str = "silu"
    model_type: str = "llama"
    # the checkpoint's begin / end tokens (not part of the computation, so not compared):
    # eos_token_id one id, or several (a tuple; generation stops at any of them)
    bos_token_id: int | None = field(default=None, compare=False)
    eos_token_id: int | tuple | None = field(default=None, compare=False)

    def __post_init__(self):
        def setf(name, value):
            object.__setattr__(self, name, value)
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                     "num_attention_heads", "max_position_embeddings"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or not 1 <= v <= 1 << 24:
                raise ValueError(f"LlamaConfig.{name}={v!r}: need an integer in [1, 2^24]")
        if self.num_key_value_heads is None:
            setf("num_key_value_heads", self.num_attention_heads)
        if self.head_dim is None:
            setf("head_dim", self.hidden_size // self.num_attention_heads)
        nkv, hd = self.num_key_value_heads, self.head_dim
        if (not isinstance(nkv, int) or isinstance(nkv, bool) or nkv < 1
                or self.num_attention_heads % nkv != 0):
            raise ValueError(f"LlamaConfig.num_key_value_heads={nkv!r}: need a positive "
                             f"divisor of num_attention_heads={self.num_attention_heads}")
        if not isinstance(hd, int) or isinstance(hd, bool) or hd < 2 or hd % 2 or hd > 1 << 16:
            raise ValueError(f"LlamaConfig.head_dim={hd!r}: need an even integer in [2, 2^16] "
                             f"(the rotary embedding rotates pairs)")
        for name in ("rms_norm_eps", "rope_theta"):
            v = getattr(self, name)
            if (not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v)
                    or v <= 0):
                raise ValueError(f"LlamaConfig.{name}={v!r}: need a positive finite number")
        for name in ("tie_word_embeddings", "attention_bias", "mlp_bias"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"LlamaConfig.{name}={getattr(self, name)!r}: need true or false")
        if self.hidden_act not in ACTIVATION_KERNELS:
            raise ValueError(f"LlamaConfig.hidden_act={self.hidden_act!r}: not one of "
                             f"{sorted(ACTIVATION_KERNELS)}")
        setf("eos_token_id", _check_token_ids("LlamaConfig", self.bos_token_id,
                                              self.eos_token_id, self.vocab_size))
        setf("rope_scaling", _check_rope_scaling(self.rope_scaling, "LlamaConfig.rope_scaling"))
        if self.model_type not in _ARCHITECTURES:
            raise ValueError(f"LlamaConfig.model_type={self.model_type!r}: one of "
                             f"{sorted(_ARCHITECTURES)}")
        if self.model_type == "qwen2" and (self.attention_bias or self.mlp_bias):
            raise ValueError("LlamaConfig.attention_bias / mlp_bias: a qwen2 model has biases "
                             "on its q, k, v projections only (both must be false)")

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
        return self.num_key_value_heads

    @property
    def head_size(self) -> int:
        return self.head_dim

    @property
    def q_width(self) -> int:
        """The columns of the queries (and of the attention output): n_head * head_dim."""
        return self.num_attention_heads * self.head_dim

    @property
    def kv_width(self) -> int:
        """The columns of the keys, and of the values: n_kv_head * head_dim."""
        return self.num_key_value_heads * self.head_dim

    @property
    def qkv_bias(self) -> bool:
        """Whether the q, k, v projections have biases (qwen2 always; llama: attention_bias)."""
        return self.model_type == "qwen2" or self.attention_bias

    @property
    def o_bias(self) -> bool:
        """Whether the output projection has a bias (llama's attention_bias)."""
        return self.attention_bias

    @property
    def activation_kernel(self) -> str:
        return ACTIVATION_KERNELS[self.hidden_act]

    @property
    def attention_scale(self) -> float:
        return 1.0 / math.sqrt(self.head_dim)

    # --- the block description the decoder reads (gpt2s.llama; GPT-NeoX's differs) ----------
    # class attributes, not fields: fixed for the family
    norm = "rmsnorm"               # the norms: "rmsnorm" (weight only) or "layernorm"
    parallel_residual = False      # x + attn(ln1 x) + mlp(ln2 x) when True
    gated_mlp = True               # act(gate) * up (the [gate | up] product) or act(up)
    qkv_interleaved = False        # the fused q|k|v rows per head ([n_head, 3, head_dim])
    layer_prefix = "model.layers."
    embed_name, final_norm_name, final_norm_bias_name, head_name = EMBED, NORM, None, HEAD
    # role -> the block's tensor (the first of a fused product); None: not in this family
    block_names = {
        "ln1": "input_layernorm.weight", "ln1_bias": None,
        "qkv": "self_attn.q_proj.weight", "qkv_bias": "self_attn.q_proj.bias",
        "o": "self_attn.o_proj.weight", "o_bias": "self_attn.o_proj.bias",
        "ln2": "post_attention_layernorm.weight", "ln2_bias": None,
        "up": "mlp.gate_proj.weight", "up_bias": "mlp.gate_proj.bias",
        "down": "mlp.down_proj.weight", "down_bias": "mlp.down_proj.bias",
    }

    @property
    def norm_eps(self) -> float:
        return self.rms_norm_eps

    @property
    def up_width(self) -> int:
        """The columns of the MLP's first product: [gate | up], 2 intermediate_size."""
        return 2 * self.intermediate_size

    def inv_freq(self) -> np.ndarray:
        """The rotary inverse frequencies (head_dim / 2,) float32, computed as transformers
        computes them, in float32 (within an ulp of its values): base^(-2i / d), then the rope scaling (``linear``: divided
        by the factor; ``llama3``: long wavelengths divided by the factor, short ones kept,
        the band between interpolated)."""
        return rope_inv_freq(self.head_dim, self.rope_theta, self.rope_scaling)

    # --- the parameters (ParameterStore's family interface) ------------------------------

    def layer_suffixes(self) -> tuple:
        """The tensors of one block, in the order of the parameter buffer: q, k, v weights
        side by side (one (q_width + 2 kv_width, hidden) product), their biases side by side,
        and gate, up likewise."""
        out = []
        for s in LLAMA_LAYER_SUFFIXES:
            if s.endswith(".bias"):
                if s == "self_attn.o_proj.bias" and not self.o_bias:
                    continue
                if s.startswith("self_attn.") and not self.qkv_bias:
                    continue
                if s.startswith("mlp.") and not self.mlp_bias:
                    continue
            out.append(s)
        return tuple(out)

    def _layer_shapes(self) -> dict:
        H, I, Q, KV = self.hidden_size, self.intermediate_size, self.q_width, self.kv_width
        return {
            "input_layernorm.weight": (H,), "post_attention_layernorm.weight": (H,),
            "self_attn.q_proj.weight": (Q, H), "self_attn.k_proj.weight": (KV, H),
            "self_attn.v_proj.weight": (KV, H), "self_attn.q_proj.bias": (Q,),
            "self_attn.k_proj.bias": (KV,), "self_attn.v_proj.bias": (KV,),
            "self_attn.o_proj.weight": (H, Q), "self_attn.o_proj.bias": (H,),
            "mlp.gate_proj.weight": (I, H), "mlp.up_proj.weight": (I, H),
            "mlp.gate_proj.bias": (I,), "mlp.up_proj.bias": (I,),
            "mlp.down_proj.weight": (H, I), "mlp.down_proj.bias": (H,),
        }

    # tensors that follow the previous one without padding (a fused product's parts)
    _JOINED = ("self_attn.k_proj.weight", "self_attn.v_proj.weight", "self_attn.k_proj.bias",
               "self_attn.v_proj.bias", "mlp.up_proj.weight", "mlp.up_proj.bias")

    def param_layout(self):
        """[(name, shape, offset)] of every parameter in the float32 buffer, and its length:
        the embedding, the blocks, the final norm, an untied head."""
        entries = [(EMBED, (self.vocab_size, self.hidden_size), False)]
        shapes = self._layer_shapes()
        for l in range(self.num_hidden_layers):
            entries += [(f"model.layers.{l}.{s}", shapes[s], s in self._JOINED)
                        for s in self.layer_suffixes()]
        entries.append((NORM, (self.hidden_size,), False))
        if not self.tie_word_embeddings:
            entries.append((HEAD, (self.vocab_size, self.hidden_size), False))
        layout, offset = [], 0
        for name, shape, joined in entries:
            if not joined:
                offset = (offset + ALIGN - 1) // ALIGN * ALIGN
            layout.append((name, shape, offset))
            offset += math.prod(shape)
        return layout, (offset + ALIGN - 1) // ALIGN * ALIGN

    def layer_views(self, tensors: dict, layer: int) -> dict:
        return {s: tensors[f"model.layers.{layer}.{s}"] for s in self.layer_suffixes()}

    @staticmethod
    def layer_of(name: str):
        if not name.startswith("model.layers."):
            return None
        l, suffix = name[len("model.layers."):].split(".", 1)
        return int(l), suffix

    # --- Hugging Face config.json -----------------------------------------------------

    @classmethod
    def from_hf_dict(cls, d: dict, source: str = "config.json") -> "LlamaConfig":
        """The config from the keys of a Hugging Face Llama ``config.json`` (transformers 4's
        ``rope_theta`` / ``rope_scaling`` or transformers 5's ``rope_parameters``).

        Raises:
            ValueError: another model_type, a key gpt2s refuses or does not know, a missing
                size, a value out of bounds (the message names the source and the key).
        """
        model_type = d.get("model_type")
        if model_type not in _ARCHITECTURES:
            raise _bad(source, "model_type", model_type,
                       f"LlamaConfig reads model_type {' or '.join(map(repr, _ARCHITECTURES))}")
        if model_type == "qwen2":
            if d.get("use_sliding_window"):
                raise _bad(source, "use_sliding_window", d["use_sliding_window"],
                           "gpt2s computes full causal attention, not a sliding window")
            kinds = d.get("layer_types") or []
            bad = [k for k in kinds if k != "full_attention"]
            if bad:
                raise _bad(source, "layer_types", sorted(set(bad)),
                           "gpt2s computes full causal attention only")
            for k in ("attention_bias", "mlp_bias"):
                if d.get(k):
                    raise _bad(source, k, d[k], "a qwen2 model has biases on q, k, v only")
        for key in d:
            if model_type == "qwen2" and key in _QWEN2_KEYS:
                continue
            if key not in _READ_KEYS and key not in _IGNORED_KEYS:
                if key in ("sliding_window", "use_sliding_window") and not d[key]:
                    continue
                if key == "quantization_config":
                    raise _bad(source, key, d[key], "gpt2s loads float32/float16/bfloat16 "
                               "weights, not a quantisation scheme")
                raise ValueError(f"{source}: unknown key {key!r} (= "
                                 f"{json.dumps(d[key], default=str)[:60]}) for model_type "
                                 f"{model_type!r}: gpt2s does not know what it changes, so it "
                                 f"refuses the config")
        if d.get("rope_interleaved"):
            raise _bad(source, "rope_interleaved", d["rope_interleaved"],
                       "gpt2s implements the rotate_half rotary layout of transformers' Llama")
        try:
            kwargs = {k: d[k] for k in ("vocab_size", "hidden_size", "intermediate_size",
                                        "num_hidden_layers", "num_attention_heads")}
        except KeyError as e:
            raise ValueError(f"{source}: missing {model_type} config key {e.args[0]!r}") \
                from None
        kwargs["model_type"] = model_type
        for k in ("num_key_value_heads", "head_dim", "max_position_embeddings", "rms_norm_eps",
                  "tie_word_embeddings", "attention_bias", "mlp_bias", "hidden_act",
                  "bos_token_id", "eos_token_id"):
            if d.get(k) is not None:
                kwargs[k] = d[k]
        rope = d.get("rope_parameters")
        if rope is not None:
            where = "rope_parameters"
            if not isinstance(rope, dict):
                raise _bad(source, where, rope, "need an object")
            # a file may carry the legacy key beside it (for older readers): it must agree
            if "rope_theta" in d and "rope_theta" in rope and d["rope_theta"] != rope["rope_theta"]:
                raise _bad(source, "rope_theta", d["rope_theta"],
                           f"it differs from rope_parameters.rope_theta={rope['rope_theta']}")
        else:
            where, rope = "rope_scaling", dict(d.get("rope_scaling") or {})
            if "rope_theta" in d:
                rope["rope_theta"] = d["rope_theta"]
        rope = dict(rope)
        for k in rope:
            if k not in _ROPE_KNOWN:
                raise _bad(source, f"{where}.{k}", rope[k], "an unknown rope parameter")
        prf = rope.pop("partial_rotary_factor", 1.0)
        if prf != 1.0:
            raise _bad(source, f"{where}.partial_rotary_factor", prf,
                       "a Llama model rotates whole heads")
        if "rope_theta" in rope:
            kwargs["rope_theta"] = rope.pop("rope_theta")
        if "type" in rope and "rope_type" not in rope:
            rope["rope_type"] = rope["type"]
        rope.pop("type", None)
        if rope and rope.get("rope_type", "default") != "default":
            kwargs["rope_scaling"] = rope
        try:
            return cls(**kwargs)
        except ValueError as e:
            msg = str(e).removeprefix("LlamaConfig.")
            if msg.startswith("rope_scaling") and where == "rope_parameters":
                msg = "rope_parameters" + msg[len("rope_scaling"):]
            raise ValueError(f"{source}: {msg}") from None

    @classmethod
    def from_json_file(cls, path: str | os.PathLike) -> "LlamaConfig":
        """The config from a Llama ``config.json`` file (`from_hf_dict`)."""
        return cls.from_hf_dict(read_config_json(path), source=str(path))

    def to_hf_dict(self) -> dict:
        """The ``config.json`` content that ``transformers.LlamaForCausalLM`` loads (the
        transformers 4 form, which transformers 5 reads as well)."""
        d = {k: v for k, v in asdict(self).items() if k != "rope_scaling"}
        if isinstance(self.eos_token_id, tuple):
            d["eos_token_id"] = list(self.eos_token_id)
        d.update(architectures=[_ARCHITECTURES[self.model_type]],
                 rope_scaling=None if self.rope_scaling is None else dict(self.rope_scaling),
                 attention_dropout=0.0, torch_dtype="float32")
        if self.model_type == "qwen2":
            del d["attention_bias"], d["mlp_bias"]
            d["use_sliding_window"] = False
        return d


def rope_inv_freq(d: int, theta: float, rope_scaling) -> np.ndarray:
    """The rotary inverse frequencies (d / 2,) float32 of d rotated values per head, as
    transformers computes them (`LlamaConfig.inv_freq`; GPT-NeoX: d the rotated part of a
    head)."""
    f32 = np.float32
    e = np.arange(0, d, 2, dtype=np.int64).astype(f32) / f32(d)
    # base^e: rounded from double (PyTorch's float32 pow is within an ulp of that)
    inv = f32(1.0) / (float(theta) ** e.astype(np.float64)).astype(f32)
    rs = rope_scaling
    if rs is None or rs["rope_type"] == "default":
        return inv
    factor = f32(rs["factor"])
    if rs["rope_type"] == "linear":
        return inv / factor
    old = f32(rs["original_max_position_embeddings"])
    low, high = f32(rs["low_freq_factor"]), f32(rs["high_freq_factor"])
    low_wavelen, high_wavelen = old / low, old / high
    wavelen = (f32(1.0) / inv) * f32(2 * math.pi)
    scaled = np.where(wavelen > low_wavelen, inv / factor, inv)
    smooth = ((f32(1.0) / wavelen) * old - low) / (high - low)
    smoothed = (f32(1.0) - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
    return np.where(medium, smoothed, scaled).astype(f32)


def _is_token_id(t, vocab_size) -> bool:
    return isinstance(t, int) and not isinstance(t, bool) and 0 <= t < vocab_size


def _check_token_ids(owner: str, bos, eos, vocab_size: int):
    """Refuse (ValueError naming owner's field) a bos_token_id / eos_token_id that is not a token
    id of the vocabulary; return eos normalised: one id, a tuple of several, or None."""
    if bos is not None and not _is_token_id(bos, vocab_size):
        raise ValueError(f"{owner}.bos_token_id={bos!r}: need a token id in "
                         f"[0, vocab_size={vocab_size})")
    if isinstance(eos, (list, tuple)):
        if not eos or not all(_is_token_id(t, vocab_size) for t in eos):
            raise ValueError(f"{owner}.eos_token_id={list(eos)!r}: need token ids in "
                             f"[0, vocab_size={vocab_size})")
        return tuple(eos) if len(eos) > 1 else eos[0]
    if eos is not None and not _is_token_id(eos, vocab_size):
        raise ValueError(f"{owner}.eos_token_id={eos!r}: need a token id (or a list of "
                         f"them) in [0, vocab_size={vocab_size})")
    return eos


def _check_rope_scaling(rs, where):
    if rs is None:
        return None
    if not isinstance(rs, dict):
        raise ValueError(f"{where}={rs!r}: need null or an object")
    rs = dict(rs)
    kind = rs.get("rope_type", rs.get("type", "default"))
    if kind not in _ROPE_TYPES:
        raise ValueError(f"{where}.rope_type={kind!r} is not supported: gpt2s computes "
                         f"{sorted(_ROPE_TYPES)}")
    out = {"rope_type": kind}
    for k in _ROPE_TYPES[kind]:
        v = rs.get(k)
        if (not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v)
                or v <= 0):
            raise ValueError(f"{where}.{k}={v!r}: the {kind} rope scaling needs it, a "
                             f"positive number")
        out[k] = v
    if kind == "llama3" and not out["high_freq_factor"] > out["low_freq_factor"]:
        raise ValueError(f"{where}: high_freq_factor={out['high_freq_factor']} must be above "
                         f"low_freq_factor={out['low_freq_factor']}")
    for k in rs:
        if k not in out and k not in ("type", "rope_type"):
            raise ValueError(f"{where}.{k}={rs[k]!r}: not a parameter of the {kind} rope "
                             f"scaling")
    return None if kind == "default" else out
