"""GPT2Config: the sizes and variant flags of a GPT-2 model, its presets, and inference from
tensor shapes.

Every field of transformers' GPT2Config that changes the computation is either carried here and
honoured exactly by the kernels, or refused by ``from_hf_dict`` with an error naming the field and
its value; fields that do not change the math (dropouts, token ids, ``architectures``, ...) are
accepted and ignored.  Dropout is never applied.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, fields

__all__ = ["GPT2Config", "ACTIVATION_KERNELS"]

# Hugging Face activation_function name -> the _core activation kernel that computes it.
# The tanh family differs only in how a constant is written (gelu_fast's 0.7978845608 is
# sqrt(2/pi) to 1e-11, far below float32's resolution).
ACTIVATION_KERNELS = {
    "gelu_new": "gelu_tanh",
    "gelu_pytorch_tanh": "gelu_tanh",
    "gelu_fast": "gelu_tanh",
    "gelu_accurate": "gelu_tanh",
    "gelu_python_tanh": "gelu_tanh",
    "gelu": "gelu_erf",
    "gelu_python": "gelu_erf",
    "relu": "relu",
    "silu": "silu",
    "swish": "silu",
    "quick_gelu": "quick_gelu",
}

# config.json keys read into GPT2Config besides the sizes (absent: the dataclass defaults,
# which are transformers' GPT2Config defaults)
_VARIANT_KEYS = ("n_inner", "activation_function", "scale_attn_weights",
                 "scale_attn_by_inverse_layer_idx", "reorder_and_upcast_attn",
                 "tie_word_embeddings")


def _refusals(d: dict):
    """(field, value, why) for each config.json key whose value changes the math in a way
    gpt2s does not implement."""
    out = []
    model_type = d.get("model_type", "gpt2")
    if model_type != "gpt2":
        if model_type in ("llama", "qwen2", "gpt_neox"):
            cls = "GPTNeoXForCausalLM" if model_type == "gpt_neox" else "LlamaForCausalLM"
            out.append(("model_type", model_type,
                        "GPT2 loads GPT-2 checkpoints only; load this one with "
                        f"gpt2s.AutoModelForCausalLM.from_pretrained (or gpt2s.{cls})"))
        else:
            out.append(("model_type", model_type, "GPT2 runs only model_type 'gpt2'"))
    if d.get("add_cross_attention", False) not in (False, None):
        out.append(("add_cross_attention", d["add_cross_attention"],
                    "gpt2s has no cross-attention layers (encoder-decoder use)"))
    if d.get("pruned_heads"):
        out.append(("pruned_heads", d["pruned_heads"],
                    "gpt2s needs every attention head (pruned checkpoints change the shapes)"))
    quant = d.get("quantization_config")
    if quant is not None:
        method = quant.get("quant_method", "?") if isinstance(quant, dict) else quant
        if method != "gpt2s":
            out.append(("quantization_config", {"quant_method": method},
                        "gpt2s loads float32/float16/bfloat16 weights and its own packed "
                        "files (quant_method 'gpt2s', written by GPT2.save_safetensors or "
                        "python -m gpt2s.quantize), not another quantisation scheme"))
        elif not isinstance(quant.get("weight_type"), str):
            out.append(("quantization_config", quant,
                        "a gpt2s quantization_config names its weight_type (a string)"))
    return out


class _Unreadable:
    """A number in a config.json that Python's json would turn into an error without naming
    the file (an integer past Python's 4300-digit conversion limit) or accept though JSON does
    not allow it (NaN, Infinity): kept as a marker until its field can be named."""

    def __init__(self, what: str):
        self.what = what


def _first_unreadable(value, field: str = ""):
    """(field path, _Unreadable) of the first marker inside a parsed config, or None."""
    stack = [(field, value)]
    while stack:
        where, v = stack.pop()
        if isinstance(v, _Unreadable):
            return where, v
        if isinstance(v, dict):
            stack.extend(reversed([(f"{where}.{k}" if where else k, x) for k, x in v.items()]))
        elif isinstance(v, list):
            stack.extend(reversed([(f"{where}[{i}]", x) for i, x in enumerate(v)]))
    return None


def read_config_json(path: str | os.PathLike) -> dict:
    """The JSON object of a ``config.json`` file, its errors naming the file
    (`parse_config_json`)."""
    with open(path, "rb") as f:
        raw = f.read()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text (byte 0x{raw[e.start]:02x} at offset "
                         f"{e.start}), so not a config.json") from None
    return parse_config_json(text, str(path))


def parse_config_json(text: str, source: str) -> dict:
    """The object of a config.json text.  Raises ValueError naming source (and the field,
    when one is at fault): not JSON, not an object, a NaN or Infinity literal (not JSON), an
    integer longer than Python converts (4300 digits)."""
    def integer(digits: str):
        if len(digits.lstrip("-")) > 4300:
            return _Unreadable(f"an integer of {len(digits.lstrip('-'))} digits")
        return int(digits)

    def constant(name: str):
        return _Unreadable(f"{name}, which is not a JSON number")

    try:
        d = json.loads(text, parse_int=integer, parse_constant=constant)
    except json.JSONDecodeError as e:
        raise ValueError(f"{source}: not JSON ({e})") from None
    except RecursionError:
        raise ValueError(f"{source}: not JSON (nested too deeply)") from None
    if not isinstance(d, dict):
        raise ValueError(f"{source}: not a JSON object")
    bad = _first_unreadable(d)
    if bad is not None:
        field, value = bad
        raise ValueError(f"{source}: {field} is {value.what}")
    return d


_PRESETS = {
    # the four released GPT-2 sizes
    "gpt2": dict(n_layer=12, n_head=12, n_embd=768),
    "gpt2-medium": dict(n_layer=24, n_head=16, n_embd=1024),
    "gpt2-large": dict(n_layer=36, n_head=20, n_embd=1280),
    "gpt2-xl": dict(n_layer=48, n_head=25, n_embd=1600),
    # small sizes for tests and demos (GPT-2 vocabulary, shorter context)
    "tiny": dict(n_layer=2, n_head=2, n_embd=64, n_ctx=128),
    "mini": dict(n_layer=4, n_head=4, n_embd=128, n_ctx=256),
    "small-demo": dict(n_layer=6, n_head=6, n_embd=384, n_ctx=256),
}


@dataclass(frozen=True)
class GPT2Config:
    """The sizes and variant flags of a GPT-2 model, with Hugging Face's key names and defaults.
    Frozen; checked when made.

    Attributes:
        n_layer: transformer blocks (12 for GPT-2 124M).
        n_head: attention heads per block; must divide n_embd.
        n_embd: channels of the residual stream (768).
        vocab_size: tokens in the vocabulary (50257 for GPT-2's tokenizer).
        n_ctx: the longest sequence the model reads (1024; Hugging Face's ``n_positions``).
        layer_norm_epsilon: added to the variance in every layernorm.
        n_inner: width of the MLP (None: 4 * n_embd).
        activation_function: the MLP's activation, one of ``ACTIVATION_KERNELS``: the tanh
            GELUs gelu_new / gelu_pytorch_tanh / gelu_fast, the erf GELU gelu, relu,
            silu / swish, quick_gelu.
        scale_attn_weights: attention scores are divided by sqrt(head_size) (False: not scaled).
        scale_attn_by_inverse_layer_idx: layer l's scores are further divided by l + 1.
        reorder_and_upcast_attn: transformers computes the scores in float32 under
            half-precision autocast; gpt2s always computes attention in float32 with the scale
            folded into the Q K^T product, so the flag is carried (and saved) but changes
            nothing here.
        tie_word_embeddings: True (GPT-2): the output head is ``wte.weight``; False: a separate
            ``lm_head.weight`` (V, C).

    Raises:
        ValueError: a size that is not a positive integer, n_embd not divisible by n_head, or
            a field value gpt2s does not support (named in the message).

    Examples:
        >>> GPT2Config(n_layer=6, n_head=8, n_embd=256, n_ctx=512).head_size
        32
        >>> GPT2Config.preset("gpt2-medium").n_layer
        24
    """

    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    vocab_size: int = 50257
    n_ctx: int = 1024
    layer_norm_epsilon: float = 1e-5
    n_inner: int | None = None
    activation_function: str = "gelu_new"
    scale_attn_weights: bool = True
    scale_attn_by_inverse_layer_idx: bool = False
    reorder_and_upcast_attn: bool = False
    tie_word_embeddings: bool = True

    def __post_init__(self):
        for name in ("n_layer", "n_head", "n_embd", "vocab_size", "n_ctx"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"GPT2Config.{name} must be a positive integer, got {value!r}")
        self._check_bounds()
        if self.n_embd % self.n_head:
            raise ValueError(
                f"GPT2Config: n_embd={self.n_embd} is not divisible by n_head={self.n_head}")
        if isinstance(self.layer_norm_epsilon, bool) or not (self.layer_norm_epsilon > 0):
            raise ValueError(
                f"GPT2Config.layer_norm_epsilon must be > 0, got {self.layer_norm_epsilon!r}")
        if self.n_inner is not None and (not isinstance(self.n_inner, int)
                                         or isinstance(self.n_inner, bool) or self.n_inner < 1):
            raise ValueError(f"GPT2Config.n_inner must be a positive integer or None (4 * n_embd),"
                             f" got {self.n_inner!r}")
        if not isinstance(self.activation_function, str) \
                or self.activation_function not in ACTIVATION_KERNELS:
            raise ValueError(
                f"GPT2Config.activation_function={self.activation_function!r} is not supported; "
                f"gpt2s computes {sorted(ACTIVATION_KERNELS)}")
        for name in ("scale_attn_weights", "scale_attn_by_inverse_layer_idx",
                     "reorder_and_upcast_attn", "tie_word_embeddings"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"GPT2Config.{name} must be true or false, got "
                                 f"{getattr(self, name)!r}")

    # Upper bounds, so a hostile config.json or file header cannot ask for absurd sizes.  They
    # are generous for the GPT-2 family (gpt2-xl: 48 layers, n_embd 1600, 1024 positions,
    # vocab 50257); a model file must also back every parameter with its own bytes (weights.py).
    MAX_SIZES = {"n_layer": 1024, "n_head": 1024, "n_embd": 65536, "n_ctx": 1 << 20,
                 "vocab_size": 1 << 24}

    def _check_bounds(self):
        for name, bound in self.MAX_SIZES.items():
            if getattr(self, name) > bound:
                raise ValueError(f"GPT2Config.{name}={getattr(self, name)} is larger than "
                                 f"gpt2s supports ({bound})")
        inner = self.n_inner
        if isinstance(inner, int) and inner > 4 * self.MAX_SIZES["n_embd"]:
            raise ValueError(f"GPT2Config.n_inner={inner} is larger than gpt2s supports "
                             f"({4 * self.MAX_SIZES['n_embd']})")
        eps = self.layer_norm_epsilon
        if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps < 1:
            raise ValueError(f"GPT2Config.layer_norm_epsilon must be a number below 1, got "
                             f"{eps!r}")
        if not math.isfinite(eps):
            raise ValueError(f"GPT2Config.layer_norm_epsilon must be a finite number, got "
                             f"{eps!r}")

    @property
    def head_size(self) -> int:
        """Channels per attention head, ``n_embd // n_head``.
        """
        return self.n_embd // self.n_head

    @property
    def inner_size(self) -> int:
        """Width of the MLP's hidden layer: n_inner, or 4 * n_embd when it is None."""
        return self.n_inner if self.n_inner is not None else 4 * self.n_embd

    @property
    def activation_kernel(self) -> str:
        """The _core activation kernel for activation_function (gelu_tanh, gelu_erf, relu,
        silu, quick_gelu)."""
        return ACTIVATION_KERNELS[self.activation_function]

    def attention_scale(self, layer: int) -> float:
        """The factor layer ``layer``'s attention scores q.k are multiplied by before the
        softmax: 1/sqrt(head_size) (or 1 without scale_attn_weights), divided by layer + 1 with
        scale_attn_by_inverse_layer_idx (transformers' GPT2Attention.scaling)."""
        scale = 1.0 / math.sqrt(self.head_size) if self.scale_attn_weights else 1.0
        if self.scale_attn_by_inverse_layer_idx:
            scale /= float(layer + 1)
        return scale

    @classmethod
    def preset(cls, name: str, **overrides) -> "GPT2Config":
        """The config of a named size, optionally with some fields changed.

        Args:
            name: gpt2, gpt2-medium, gpt2-large, gpt2-xl (the released GPT-2 sizes), or tiny,
                mini, small-demo (small sizes with a shorter context, for tests and demos).
            **overrides: fields to change, e.g. ``n_ctx=256``.

        Returns:
            a new `GPT2Config`.

        Raises:
            ValueError: an unknown name or a bad override.

        Examples:
            >>> GPT2Config.preset("gpt2", n_ctx=256).n_ctx
            256
        """
        if name not in _PRESETS:
            raise ValueError(f"unknown GPT-2 preset {name!r}; choose one of {sorted(_PRESETS)}")
        return cls(**{**_PRESETS[name], **overrides})

    @staticmethod
    def presets() -> list[str]:
        """The names `preset` accepts.

        Examples:
            >>> len(GPT2Config.presets()), "gpt2-xl" in GPT2Config.presets()
            (7, True)
        """
        return list(_PRESETS)

    def num_parameters(self) -> int:
        """The number of parameters a model of these sizes has (``wte`` counted once: it is tied to
        the output layer), without building it.

        Examples:
            >>> GPT2Config.preset("gpt2-xl").num_parameters()
            1557611200
        """
        C, L, V, T, H = self.n_embd, self.n_layer, self.vocab_size, self.n_ctx, self.inner_size
        per_layer = 2 * C + (C * 3 * C + 3 * C) + (C * C + C) + 2 * C + (C * H + H) \
            + (H * C + C)
        head = 0 if self.tie_word_embeddings else V * C
        return V * C + T * C + L * per_layer + 2 * C + head

    # --- Hugging Face config.json -------------------------------------------------------

    @classmethod
    def from_hf_dict(cls, d: dict, source: str = "config.json") -> "GPT2Config":
        """The config from the keys of a Hugging Face GPT-2 ``config.json`` (``n_positions`` or
        ``n_ctx`` for the context; other keys are ignored).

        Args:
            d: the parsed JSON object.
            source: what to name in error messages.

        Returns:
            a new `GPT2Config`.

        Raises:
            ValueError: a key is missing or a value is invalid (the message names the source).

        Examples:
            >>> GPT2Config.from_hf_dict({"n_layer": 2, "n_head": 2, "n_embd": 64,
            ...                          "vocab_size": 50257, "n_positions": 128}).n_ctx
            128
        """
        for name, value, why in _refusals(d):
            shown = json.dumps(value, default=str)
            raise ValueError(f"{source}: {name}={shown} is not supported: {why}")
        try:
            kwargs = dict(
                n_layer=d["n_layer"], n_head=d["n_head"], n_embd=d["n_embd"],
                vocab_size=d["vocab_size"],
                n_ctx=d.get("n_positions", d.get("n_ctx")),
                layer_norm_epsilon=d.get("layer_norm_epsilon", 1e-5),
            )
        except KeyError as e:
            raise ValueError(f"{source}: missing GPT-2 config key {e.args[0]!r}") from None
        if kwargs["n_ctx"] is None:
            raise ValueError(f"{source}: has neither 'n_positions' nor 'n_ctx'")
        for key in _VARIANT_KEYS:
            if key in d and not (key == "activation_function" and d[key] is None):
                kwargs[key] = d[key]
        try:
            return cls(**kwargs)
        except ValueError as e:
            # name the key as the file spells it
            msg = str(e).removeprefix("GPT2Config.")
            if msg.startswith("n_ctx") and "n_positions" in d:
                msg = "n_positions" + msg[len("n_ctx"):]
            raise ValueError(f"{source}: {msg}") from None

    @classmethod
    def from_json_file(cls, path: str | os.PathLike) -> "GPT2Config":
        """The config from a Hugging Face ``config.json`` file (see `from_hf_dict`).

        Args:
            path: the file.

        Returns:
            a new `GPT2Config`.

        Raises:
            FileNotFoundError: no such file.
            ValueError: not UTF-8, not JSON (NaN, Infinity and integers of more than 4300
                digits included), not an object, or not a GPT-2 config: a value missing, of
                the wrong type or out of bounds (the message names the file and the field).

        Examples:
            >>> import json, tempfile, os
            >>> path = os.path.join(tempfile.mkdtemp(), "config.json")
            >>> with open(path, "w") as f:
            ...     json.dump(GPT2Config.preset("tiny").to_hf_dict(), f)
            >>> GPT2Config.from_json_file(path) == GPT2Config.preset("tiny")
            True
        """
        return cls.from_hf_dict(read_config_json(path), source=str(path))

    def to_hf_dict(self) -> dict:
        """The ``config.json`` content for these sizes that ``transformers.GPT2LMHeadModel`` loads
        (GPT-2's activation, tied embeddings, no dropout).

        Examples:
            >>> GPT2Config.preset("tiny").to_hf_dict()["n_positions"]
            128
        """
        return {
            "architectures": ["GPT2LMHeadModel"],
            "model_type": "gpt2",
            "activation_function": self.activation_function,
            "n_layer": self.n_layer,
            "n_head": self.n_head,
            "n_embd": self.n_embd,
            "n_positions": self.n_ctx,
            "n_ctx": self.n_ctx,
            "vocab_size": self.vocab_size,
            "n_inner": self.n_inner,
            "layer_norm_epsilon": self.layer_norm_epsilon,
            "scale_attn_weights": self.scale_attn_weights,
            "scale_attn_by_inverse_layer_idx": self.scale_attn_by_inverse_layer_idx,
            "reorder_and_upcast_attn": self.reorder_and_upcast_attn,
            "add_cross_attention": False,
            "bos_token_id": 50256,
            "eos_token_id": 50256,
            "attn_pdrop": 0.0,
            "embd_pdrop": 0.0,
            "resid_pdrop": 0.0,
            "tie_word_embeddings": self.tie_word_embeddings,
            "torch_dtype": "float32",
        }

    def as_dict(self) -> dict:
        """The fields as a dict.

        Examples:
            >>> GPT2Config.preset("tiny").as_dict()["n_embd"]
            64
        """
        return asdict(self)

    @classmethod
    def field_names(cls) -> list[str]:
        """The names of the fields, in order.

        Examples:
            >>> GPT2Config.field_names()[:5]
            ['n_layer', 'n_head', 'n_embd', 'vocab_size', 'n_ctx']
        """
        return [f.name for f in fields(cls)]
