"""GPT2Config: the sizes of a GPT-2 model, its presets, and inference from tensor shapes."""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, fields

__all__ = ["GPT2Config"]

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
    """Sizes of a GPT-2 model (Hugging Face's key names)."""

    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    vocab_size: int = 50257
    n_ctx: int = 1024
    layer_norm_epsilon: float = 1e-5

    def __post_init__(self):
        for name in ("n_layer", "n_head", "n_embd", "vocab_size", "n_ctx"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"GPT2Config.{name} must be a positive integer, got {value!r}")
        if self.n_embd % self.n_head:
            raise ValueError(
                f"GPT2Config: n_embd={self.n_embd} is not divisible by n_head={self.n_head}")
        if not (self.layer_norm_epsilon > 0):
            raise ValueError(
                f"GPT2Config.layer_norm_epsilon must be > 0, got {self.layer_norm_epsilon!r}")

    @property
    def head_size(self) -> int:
        return self.n_embd // self.n_head

    @classmethod
    def preset(cls, name: str, **overrides) -> "GPT2Config":
        """One of: gpt2, gpt2-medium, gpt2-large, gpt2-xl, tiny, mini, small-demo."""
        if name not in _PRESETS:
            raise ValueError(f"unknown GPT-2 preset {name!r}; choose one of {sorted(_PRESETS)}")
        return cls(**{**_PRESETS[name], **overrides})

    @staticmethod
    def presets() -> list[str]:
        return list(_PRESETS)

    def num_parameters(self) -> int:
        C, L, V, T = self.n_embd, self.n_layer, self.vocab_size, self.n_ctx
        per_layer = 2 * C + (C * 3 * C + 3 * C) + (C * C + C) + 2 * C + (C * 4 * C + 4 * C) \
            + (4 * C * C + C)
        return V * C + T * C + L * per_layer + 2 * C

    # --- Hugging Face config.json -------------------------------------------------------

    @classmethod
    def from_hf_dict(cls, d: dict, source: str = "config.json") -> "GPT2Config":
        """Read Hugging Face's GPT-2 config keys (n_positions or n_ctx for the context)."""
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
        try:
            return cls(**kwargs)
        except ValueError as e:
            raise ValueError(f"{source}: {e}") from None

    @classmethod
    def from_json_file(cls, path: str | os.PathLike) -> "GPT2Config":
        try:
            with open(path, encoding="utf-8") as f:
                d = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON ({e})") from None
        if not isinstance(d, dict):
            raise ValueError(f"{path}: expected a JSON object")
        return cls.from_hf_dict(d, source=str(path))

    def to_hf_dict(self) -> dict:
        """config.json content that transformers' GPT2LMHeadModel loads."""
        return {
            "architectures": ["GPT2LMHeadModel"],
            "model_type": "gpt2",
            "activation_function": "gelu_new",
            "n_layer": self.n_layer,
            "n_head": self.n_head,
            "n_embd": self.n_embd,
            "n_positions": self.n_ctx,
            "n_ctx": self.n_ctx,
            "vocab_size": self.vocab_size,
            "layer_norm_epsilon": self.layer_norm_epsilon,
            "bos_token_id": 50256,
            "eos_token_id": 50256,
            "attn_pdrop": 0.0,
            "embd_pdrop": 0.0,
            "resid_pdrop": 0.0,
            "tie_word_embeddings": True,
            "torch_dtype": "float32",
        }

    def as_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in fields(cls)]
