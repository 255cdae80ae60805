"""Weight types: how a model stores its matmul weights, one class per type, registered by
name (the ``dtype=`` of ``GPT2.from_safetensors`` and ``to_dtype``).

Each class names a row of the kernels' table (src/gpt2s/kernels/types.h, where a type's
layout, block size and kernels are declared), so adding a type is its C header, one table row
and one class here.  Only the matmul weights are stored in a model's type: the four Conv1D
weights of every block, the token embedding ``wte`` (the tied lm_head) and an untied
``lm_head.weight``, > 99% of GPT-2's bytes.  Biases, layernorms and the position embedding
``wpe`` stay float32, as do activations and every accumulation.

A float32 weight is a NumPy array.  Any other is a :class:`gpt2s._core.PackedWeight`: its
stored arrays, its type and the logical ``shape``/``size``/``dtype`` of the float32 tensor it
stands for; ``np.asarray(w)`` widens it to that tensor (for saving or inspection, one tensor
at a time), so code that reads parameters by name keeps working.  The kernels
(``_core.matmul_forward``, ``lm_head_forward``, ``embedding_forward``) take either.
"""

from __future__ import annotations

import numpy as np

from . import _core
from ._core import PackedWeight

__all__ = ["WeightType", "Float32", "BFloat16", "Int8", "DTYPES", "get", "check_dtype",
           "is_compressed", "is_row_major", "PackedWeight"]

# (V, C): already output-major (GPT-2's, then the Llama family's embedding)
_ROW_MAJOR = ("wte.weight", "lm_head.weight", "model.embed_tokens.weight",
              "gpt_neox.embed_in.weight", "embed_out.weight")
_MATMUL_SUFFIXES = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight",
                    "mlp.c_proj.weight")
# the Llama family's projections: nn.Linear weights (out, in), output-major as they are
_LINEAR_SUFFIXES = ("self_attn.q_proj.weight", "self_attn.k_proj.weight",
                    "self_attn.v_proj.weight", "self_attn.o_proj.weight",
                    "mlp.gate_proj.weight", "mlp.up_proj.weight", "mlp.down_proj.weight",
                    # GPT-NeoX's
                    "attention.query_key_value.weight", "attention.dense.weight",
                    "mlp.dense_h_to_4h.weight", "mlp.dense_4h_to_h.weight")


def is_compressed(name: str) -> bool:
    """True for the tensors a model of a type other than float32 stores in that type: the
    matmul weights (GPT-2's Conv1D weights and embedding, a Llama model's projections and
    embedding, an untied output head)."""
    return name in _ROW_MAJOR or name.endswith(_MATMUL_SUFFIXES) \
        or name.endswith(_LINEAR_SUFFIXES)


def is_row_major(name: str) -> bool:
    """True for the (V, C) embedding / output head and a Llama model's (out, in) projections,
    stored as they are (output-major already): they can be converted a few rows at a time."""
    return name in _ROW_MAJOR or name.endswith(_LINEAR_SUFFIXES)


def _other_variants(name, variant):
    """The other kernel variants of a type this CPU runs (forceable with
    ``_core.set_kernel_variant``), as a suffix of its kernels() line."""
    others = [v for v in _core.kernel_variants(name) if v not in ("portable", variant)]
    return f" (also here: {', '.join(others)})" if others else ""


class WeightType:
    """A storage type of matmul weights.  Subclasses set ``name`` (a row of the kernels'
    table) and a one-line ``description``; the layout, block size and stored element type
    come from the table."""

    name = ""
    description = ""
    trainable = False   # only float32 weights have gradients and an optimizer
    codes = ""          # a blocked type: how its stored bytes read (see Int8, Int4)
    max_abs = float(np.finfo(np.float32).max)   # the largest magnitude the type stores

    def __init__(self):
        info = _core.weight_type_info(self.name)
        self.id = info["id"]
        self.block = info["block"]
        self.output_major = info["output_major"]
        self.store = np.dtype(info["store"])
        self.bits = info["bits"]
        self.per_element = 8 * self.store.itemsize // self.bits   # weights per stored element

    def __repr__(self):
        return f"<weight type {self.name}>"

    def _stored_shape(self, name: str, shape) -> tuple[tuple[int, int], bool]:
        transposed = self.output_major and not is_row_major(name)
        rows, cols = (shape[1], shape[0]) if transposed else tuple(shape)
        if self.block and cols % self.block:
            raise ValueError(f"{self.name} weights need the reduction dimension of {name!r} "
                             f"{tuple(shape)} to be a multiple of {self.block}, got {cols} "
                             f"(n_embd must be a multiple of {self.block})")
        return (rows, cols), transposed

    def stored_shapes(self, name: str, shape) -> tuple[tuple[int, int], tuple[int, int] | None]:
        """(shape of the stored elements, shape of the scales or None) of tensor ``name`` of
        float32 shape ``shape`` in this type: what a packed model file holds for it.

        Raises:
            ValueError: the tensor's reduction dimension is not a multiple of the block.
        """
        (rows, cols), _ = self._stored_shape(name, shape)
        scales = (rows, cols // self.block) if self.block else None
        return (rows, cols // self.per_element), scales

    def empty(self, name: str, shape) -> PackedWeight:
        """A zero weight of the given float32 shape in this type's storage."""
        (rows, cols), transposed = self._stored_shape(name, shape)
        scales = np.zeros((rows, cols // self.block), np.uint16) if self.block else None
        return PackedWeight(self.id, np.zeros((rows, cols // self.per_element), self.store),
                            scales, shape, transposed)

    def from_stored(self, name: str, data: np.ndarray, scales=None) -> PackedWeight:
        """A weight whose stored arrays already exist (a view of a file mapping)."""
        transposed = self.output_major and not is_row_major(name)
        rows, cols = data.shape[0], data.shape[1] * self.per_element
        return PackedWeight(self.id, data, scales, (cols, rows) if transposed else (rows, cols),
                            transposed)

    def compress(self, name: str, w: np.ndarray) -> PackedWeight:
        """The stored form of float32 tensor w (its parameter name says its layout)."""
        w = np.ascontiguousarray(w, np.float32)
        out = self.empty(name, w.shape)
        self._quantize(name, out, w, 0)
        return out

    def compress_rows_into(self, name: str, w: PackedWeight, row0: int, rows: np.ndarray):
        """Store float32 rows into rows row0 .. row0 + len(rows) of the row-major weight w, so
        a big embedding is converted without a float32 copy of the whole."""
        self._quantize(name, w, np.ascontiguousarray(rows, np.float32), row0)

    @staticmethod
    def _quantize(name, w, x, row0):
        try:
            _core.quantize_into(w, x, row0)
        except ValueError as e:
            raise ValueError(f"tensor {name!r}: {e}") from None

    def kernels(self) -> str:
        """Which kernels products with this type run on this CPU and build."""
        variant = _core.get_kernel_variant(self.name)
        if variant == "portable":
            return f"{self.name}: portable C, widened panels + BLAS"
        return (f"{self.name}: {variant} direct kernels (1-32 rows) + widened panels into BLAS"
                f"{_other_variants(self.name, variant)}")


class Float32(WeightType):
    """float32, as trained: the weights are NumPy arrays, products go to BLAS."""

    name = "float32"
    description = "float32 (trainable)"
    trainable = True

    def empty(self, name, shape):
        return np.zeros(shape, np.float32)

    def from_stored(self, name, data, scales=None):
        return data

    def compress(self, name, w):
        return np.array(w, np.float32)

    def compress_rows_into(self, name, w, row0, rows):
        w[row0:row0 + len(rows)] = rows

    def kernels(self):
        variant = _core.get_kernel_variant(self.name)
        if variant == "portable":
            return "float32 BLAS sgemm/sgemv"
        return (f"float32 BLAS sgemm/sgemv + {variant} few-row kernels"
                f"{_other_variants(self.name, variant)}")


class BFloat16(WeightType):
    """bfloat16: the top 16 bits of each float32 (round to nearest even), in the tensor's own
    layout; exact for a checkpoint saved in BF16."""

    name = "bfloat16"
    description = "bfloat16 (inference)"
    # the largest float32 that rounds to a finite bfloat16 (0x7f7f8000, halfway to the next
    # binade, rounds up to infinity)
    max_abs = float(np.array(0x7F7F7FFF, np.uint32).view(np.float32))


class Int8(WeightType):
    """int8 blocks of 32 weights along the reduction dimension with an fp16 scale each
    (llama.cpp's Q8_0 format), stored output-major."""

    name = "int8"
    description = "int8 blocks of 32 with fp16 scales (inference)"
    # how a packed model file's element bytes read (recorded in the file, checked on loading)
    codes = "q8_0: weight = scale * q, q an int8"
    max_abs = 127.0 * 65504.0   # 127 times the largest fp16 scale


class Int4(WeightType):
    """4-bit blocks of 32 weights along the reduction dimension with an fp16 scale each,
    weight = scale (q - 8), q in 0..15 (llama.cpp's Q4_0 format), stored output-major, two
    weights a byte."""

    name = "int4"
    description = "4-bit blocks of 32 with fp16 scales (inference)"
    codes = ("q4_0: weight = scale * (q - 8); byte j of a block holds q of weight j in its low "
             "nibble, of weight j + 16 in its high nibble")
    max_abs = 8.0 * 65504.0     # the block's extreme is -8 times its fp16 scale


_REGISTRY = {t.name: t for t in (Float32(), BFloat16(), Int8(), Int4())}
DTYPES = tuple(_REGISTRY)


def check_dtype(dtype) -> str:
    if dtype not in _REGISTRY:
        raise ValueError(f"dtype must be one of {list(DTYPES)}, got {dtype!r}")
    return dtype


def get(dtype) -> WeightType:
    """The registered weight type of that name ("float32", "bfloat16", "int8")."""
    return _REGISTRY[check_dtype(dtype)]


def type_of(w) -> WeightType:
    """The weight type a parameter is stored in."""
    return _REGISTRY[w.type_name] if isinstance(w, PackedWeight) else _REGISTRY["float32"]
