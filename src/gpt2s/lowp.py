"""Low-precision weight storage for inference models (issue 11): which tensors are stored in
bfloat16 or int8 blocks, the objects that hold them, and the kernels each dtype calls.

Only the matmul weights are compressed: the four Conv1D weights of every block, the token
embedding ``wte`` (the tied lm_head) and an untied ``lm_head.weight``: > 99% of GPT-2's bytes.  Biases, layernorms and
the position embedding ``wpe`` stay float32, as do activations and every accumulation.

``model.params[name]`` of a compressed weight is a :class:`BF16Weight` or :class:`Q8Weight`:
it has the logical ``shape``/``size``/``dtype`` of the float32 tensor it stands for, and
``np.asarray(w)`` widens it to that float32 tensor (for saving or inspection, one tensor at a
time), so code that reads parameters by name keeps working.
"""

from __future__ import annotations

import numpy as np

from . import _core

DTYPES = ("float32", "bfloat16", "int8")
Q8_BLOCK = 32
_ROW_MAJOR = ("wte.weight", "lm_head.weight")   # (V, C): already output-major


def check_dtype(dtype) -> str:
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {list(DTYPES)}, got {dtype!r}")
    return dtype


def is_compressed(name: str) -> bool:
    """True for the tensors a bfloat16 / int8 model stores compressed: the matmul weights."""
    return name in ("wte.weight", "lm_head.weight") or name.endswith(
        ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight"))


class BF16Weight:
    """A float32 tensor stored as bfloat16 bits (uint16, same shape and layout)."""

    dtype = np.dtype(np.float32)   # what np.asarray gives

    def __init__(self, bits: np.ndarray):
        self.bits = bits
        self.shape = bits.shape
        self.size = bits.size
        self.ndim = bits.ndim

    @property
    def nbytes(self) -> int:
        return self.bits.nbytes

    def __array__(self, dtype=None, copy=None):
        out = np.empty(self.shape, np.float32)
        _core.bf16_to_float32(out.reshape(-1), self.bits.reshape(-1))
        return out if dtype is None else out.astype(dtype, copy=False)


class Q8Weight:
    """A float32 tensor stored as int8 blocks of 32 along its reduction dimension, one fp16
    scale per block.  ``q`` (N, K) int8 and ``scales`` (N, K / 32) fp16 bits are output-major
    (_lowp.h explains why): a Conv1D weight (K, N) is stored transposed (``transposed``), the
    embedding (V, C) as it is."""

    dtype = np.dtype(np.float32)

    def __init__(self, q: np.ndarray, scales: np.ndarray, transposed: bool):
        self.q, self.scales, self.transposed = q, scales, transposed
        self.shape = (q.shape[1], q.shape[0]) if transposed else q.shape
        self.size = q.size
        self.ndim = 2

    @property
    def nbytes(self) -> int:
        return self.q.nbytes + self.scales.nbytes

    def __array__(self, dtype=None, copy=None):
        out = np.empty(self.q.shape, np.float32)
        _core.q8_dequantize(out, self.q, self.scales)
        out = np.ascontiguousarray(out.T) if self.transposed else out
        return out if dtype is None else out.astype(dtype, copy=False)


def compress(name: str, w: np.ndarray, dtype: str):
    """The stored form of float32 tensor w (its parameter name says its layout)."""
    w = np.ascontiguousarray(w, np.float32)
    out = empty(name, w.shape, dtype)
    if isinstance(out, BF16Weight):
        _core.bf16_from_float32(out.bits.reshape(-1), w.reshape(-1))
    else:
        _quantize(name, out.q, out.scales, w, out.transposed)
    return out


def _quantize(name, q, scales, w, transposed):
    try:
        _core.q8_quantize(q, scales, w, transposed)
    except ValueError as e:
        raise ValueError(f"tensor {name!r}: {e}") from None


def is_row_major(name: str) -> bool:
    """True for the (V, C) embedding / output head, stored as it is (output-major already):
    it can be compressed a few rows at a time."""
    return name in _ROW_MAJOR


def compress_rows_into(name: str, w, row0: int, rows: np.ndarray):
    """Compress float32 rows into rows row0 .. row0 + len(rows) of the row-major weight w
    (parameter name: a `BF16Weight` or an untransposed `Q8Weight`), so a big embedding is
    converted without a float32 copy of the whole."""
    rows = np.ascontiguousarray(rows, np.float32)
    r1 = row0 + rows.shape[0]
    if isinstance(w, BF16Weight):
        _core.bf16_from_float32(w.bits[row0:r1].reshape(-1), rows.reshape(-1))
    else:
        _quantize(name, w.q[row0:r1], w.scales[row0:r1], rows, False)


def empty(name: str, shape, dtype: str):
    """A zero weight of the given logical shape in dtype's storage."""
    if dtype == "bfloat16":
        return BF16Weight(np.zeros(shape, np.uint16))
    transposed = name not in _ROW_MAJOR
    N, K = (shape[1], shape[0]) if transposed else shape
    if K % Q8_BLOCK:
        raise ValueError(f"int8 weights need the reduction dimension of {name!r} {tuple(shape)}"
                         f" to be a multiple of {Q8_BLOCK}, got {K} (n_embd must be a multiple "
                         f"of {Q8_BLOCK})")
    return Q8Weight(np.zeros((N, K), np.int8), np.zeros((N, K // Q8_BLOCK), np.uint16),
                    transposed)


# the kernels of each storage: matmul (Conv1D), lm_head (tied wte), token + position embedding

def matmul(out, inp, w, bias):
    if isinstance(w, np.ndarray):
        _core.matmul_forward(out, inp, w, bias)
    elif isinstance(w, BF16Weight):
        _core.matmul_forward_bf16(out, inp, w.bits, bias)
    else:
        _core.matmul_forward_q8(out, inp, w.q, w.scales, bias)


def lm_head(logits, inp, wte):
    if isinstance(wte, np.ndarray):
        _core.lm_head_forward(logits, inp, wte)
    elif isinstance(wte, BF16Weight):
        _core.lm_head_forward_bf16(logits, inp, wte.bits)
    else:
        _core.lm_head_forward_q8(logits, inp, wte.q, wte.scales)


def embedding(out, idx, wte, wpe, T, pos0):
    if isinstance(wte, np.ndarray):
        _core.embedding_forward(out, idx, wte, wpe, T, pos0)
    elif isinstance(wte, BF16Weight):
        _core.embedding_forward_bf16(out, idx, wte.bits, wpe, T, pos0)
    else:
        _core.embedding_forward_q8(out, idx, wte.q, wte.scales, wpe, T, pos0)


def kernels_description(dtype: str) -> str:
    """Which kernels a model of this dtype runs, on this CPU and build."""
    if dtype == "float32":
        return "float32 BLAS sgemm/sgemv" + (" + few-row AVX2 kernels"
                                             if _core.have_small_m_kernels() else "")
    path = _core.get_lowp_kernels()
    if path == "avx2":
        return f"{dtype} AVX2+FMA+F16C direct (1-32 rows) + widened panels into sgemm"
    return f"{dtype} portable C widened panels into BLAS"
