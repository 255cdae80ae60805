"""The generic entry point: ``gpt2s.AutoModelForCausalLM.from_pretrained(path_or_name)`` reads
the checkpoint's ``model_type`` (config.json, or the config a gpt2s save keeps in its
``__metadata__``) and returns the model class that runs it, as transformers' class of that
name does:

======================  =========================================
``model_type``          class
======================  =========================================
``gpt2`` (or none)      `gpt2s.GPT2`
``llama``               `gpt2s.LlamaForCausalLM`
``qwen2``               `gpt2s.LlamaForCausalLM` (q, k, v biases)
``gpt_neox``            `gpt2s.GPTNeoXForCausalLM` (Pythia)
======================  =========================================

Every other model type is refused by name.
"""

from __future__ import annotations

import json
import os

from . import weights as _weights
from .config import parse_config_json, read_config_json

__all__ = ["AutoModelForCausalLM", "model_type_of", "MODEL_TYPES"]

MODEL_TYPES = ("gpt2", "llama", "qwen2", "gpt_neox")
_NOT_YET: dict = {}   # model_type -> why gpt2s does not run it yet


def model_type_of(path) -> tuple[str, str]:
    """(model_type, where it was read) of the checkpoint at path (a resolved file or
    directory): config.json's beside the weights, else the config in a gpt2s file's
    __metadata__, else "gpt2" (a GPT-2 file whose sizes come from its tensor shapes).

    Raises:
        FileNotFoundError: no such file, or a directory without model.safetensors.
        ValueError: a config.json that is not JSON or whose model_type is not a string.
    """
    from .gguf_io import is_gguf
    if is_gguf(path):          # gpt2s reads GPT-2 GGUF files only (GPT2.from_gguf)
        return "gpt2", str(path)
    file, cfg_file = _weights.resolve_model_path(path)
    if cfg_file is not None:
        if os.stat(cfg_file).st_size > 16 << 20:
            raise ValueError(f"{cfg_file}: too large for a config.json")
        d = read_config_json(cfg_file)
        source = str(cfg_file)
    else:
        src = _weights.open_tensors(file)    # (a sharded checkpoint: its first shard's)
        src.close()
        metadata = src.metadata
        text = metadata.get(_weights.CONFIG_METADATA_KEY)
        if text is None:
            return "gpt2", str(file)
        source = f"{file}: __metadata__[{_weights.CONFIG_METADATA_KEY!r}]"
        d = parse_config_json(text, source)
    model_type = d.get("model_type", "gpt2")
    if not isinstance(model_type, str):
        raise ValueError(f"{source}: model_type={json.dumps(model_type)[:60]} is not a string")
    return model_type, source


def check_model_type(model_type: str, source) -> str:
    """model_type when gpt2s runs it, else a ValueError naming it."""
    if model_type in MODEL_TYPES:
        return model_type
    why = _NOT_YET.get(model_type, "gpt2s does not implement this architecture")
    raise ValueError(f"{source}: model_type {model_type!r}: {why} (gpt2s runs "
                     f"{', '.join(map(repr, MODEL_TYPES))})")


class AutoModelForCausalLM:
    """Load any checkpoint gpt2s runs, choosing the class from its ``model_type``.

    Examples:
        >>> import tempfile
        >>> from gpt2s import GPT2, GPT2Config
        >>> d = tempfile.mkdtemp()
        >>> _ = GPT2.from_config(GPT2Config.preset("tiny"), seed=0).save_safetensors(d)
        >>> type(AutoModelForCausalLM.from_pretrained(d)).__name__
        'GPT2'
    """

    def __init__(self, *args, **kwargs):
        raise TypeError("AutoModelForCausalLM is not instantiated: use "
                        "AutoModelForCausalLM.from_pretrained(path_or_name)")

    @staticmethod
    def from_pretrained(name_or_path, dtype: str | None = None, *,
                        local_files_only: bool = False, compute_dtype: str = "float32"):
        """The model at name_or_path: a directory with config.json and model.safetensors (a
        Hugging Face checkpoint, e.g. fetched with ``hf download``), a .safetensors file, or a
        name `GPT2.from_pretrained` knows ("demo", "gpt2", ..., a repo id in the local
        Hugging Face cache).  A `GPT2` for model_type "gpt2", a `LlamaForCausalLM` for
        "llama" and "qwen2", a `GPTNeoXForCausalLM` for "gpt_neox".  dtype: the weight storage, None (the file's own, float32 for a
        Hugging Face checkpoint), "float32", "bfloat16", "int8" or "int4" (see
        `GPT2.from_safetensors`, `LlamaForCausalLM.from_safetensors`); compute_dtype: the
        precision of the matmuls, "float32" or "bfloat16" (`GPT2.compute_dtype`, every
        family).

        Raises:
            ModelNotFound / FileNotFoundError: nothing at name_or_path.
            ValueError: a model_type gpt2s does not run (named), a config or file gpt2s
                refuses (as the class's own loader says).
        """
        from .hub import resolve_pretrained
        path = resolve_pretrained(name_or_path, local_files_only=local_files_only)
        model_type = check_model_type(*model_type_of(path))
        if model_type == "gpt2":
            from .model import GPT2
            return GPT2.from_safetensors(path, dtype=dtype, compute_dtype=compute_dtype)
        if model_type == "gpt_neox":
            from .neox import GPTNeoXForCausalLM
            return GPTNeoXForCausalLM.from_pretrained(path, dtype=dtype,
                                                      compute_dtype=compute_dtype)
        from .llama import LlamaForCausalLM
        return LlamaForCausalLM.from_pretrained(path, dtype=dtype,
                                                compute_dtype=compute_dtype)

    from_safetensors = from_pretrained
