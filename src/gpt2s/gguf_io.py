"""GGUF files, both ways, through the ``gguf`` package (llama.cpp's own reader and writer,
the ``gguf`` extra: ``pip install 'gpt2s[gguf]'``).

Reading (`GPT2.from_gguf`, and `GPT2.from_pretrained` / ``--model`` given a ``.gguf`` file)
takes a GPT-2 GGUF laid out as llama.cpp's ``convert_hf_to_gguf.py`` writes it: architecture
``gpt2``, the sizes in ``gpt2.*`` keys, tensors ``token_embd``, ``position_embd``,
``blk.N.{attn_norm, attn_qkv, attn_output, ffn_norm, ffn_up, ffn_down}`` (weights and biases),
``output_norm`` and, optionally, ``output`` (the head: absent, as the converter writes a
tied GPT-2, or with the same type and bytes as ``token_embd``, it is the tied head; otherwise
an untied ``lm_head``).  GGUF
keeps ggml's ``(out, in)`` rows for the matmul weights; gpt2s's float32 and bfloat16 weights
are Conv1D ``(in, out)`` (transposed while loading), while its int8 and int4 types keep
output-major rows with blocks of 32 along the input, GGUF's order.

Stored types: F32, F16, BF16 and ggml's Q8_0 and Q4_0 blocks.  Q8_0 (an fp16 scale, then 32
int8) and Q4_0 (an fp16 scale, then 16 bytes: byte j holds weight j in its low nibble and
weight j + 16 in its high one) hold exactly gpt2s's int8 and int4 numbers; gpt2s keeps the
codes and the scales in two arrays rather than interleaved, so each block is split (repacked
byte for byte, never quantized again).  Any other ggml type the ``gguf`` package dequantizes
(the K-quants llama-quantize writes, ...) is widened to float32 with it and converted to the
model's storage.  By default a file loads in the storage that holds its block weights as they
are: Q8_0 as int8, Q4_0 as int4, BF16 as bfloat16, anything else as float32.

Writing (`GPT2.save_gguf`, ``python -m gpt2s.quantize IN OUT.gguf``) lays the file out the same
way, with the tokenizer llama.cpp's ``gpt2`` vocabulary needs (``tokenizer.ggml.model`` "gpt2",
the pre-tokenizer "gpt-2", the 50257 tokens in GPT-2's byte-to-unicode spelling, their types,
the 50000 merges), all derived from the bundled BPE ranks.
"""

from __future__ import annotations

import functools
import math
import os
import re
import stat
from pathlib import Path

import numpy as np

from . import weight_types as _wt
from .config import GPT2Config
from .weights import HEAD, LoadCounter

__all__ = ["GGUFError", "is_gguf", "load_parameters", "save_gguf", "gguf_tokenizer",
           "EXPORT_TYPES"]

ARCH = "gpt2"
MAGIC = b"GGUF"
BLOCK = 32   # weights per block of Q8_0 and Q4_0 (and of gpt2s's int8 and int4)


class GGUFError(ValueError):
    """A GGUF file gpt2s cannot use; the message names the file and the key or tensor at
    fault.  A subclass of ``ValueError``."""


def _gguf():
    try:
        import gguf
    except ImportError:
        raise ModuleNotFoundError(
            "GGUF files need the gguf package (llama.cpp's GGUF reader and writer): "
            "pip install 'gpt2s[gguf]' (or pip install gguf)") from None
    return gguf


def is_gguf(path) -> bool:
    """True for an existing regular file that starts with GGUF's magic bytes, or whose name
    ends in .gguf."""
    p = Path(os.fspath(path)).expanduser()
    try:
        st = os.stat(p)
    except OSError:
        return False
    if not stat.S_ISREG(st.st_mode):
        return False
    if p.suffix.lower() == ".gguf":
        return True
    try:
        with open(p, "rb") as f:
            return f.read(4) == MAGIC
    except OSError:
        return False


# ------------------------------------------------------------------------------------------
# Names


_LAYER = {   # llama.cpp's GPT-2 block tensor -> gpt2s's (Hugging Face's) suffix
    "attn_norm.weight": "ln_1.weight", "attn_norm.bias": "ln_1.bias",
    "attn_qkv.weight": "attn.c_attn.weight", "attn_qkv.bias": "attn.c_attn.bias",
    "attn_output.weight": "attn.c_proj.weight", "attn_output.bias": "attn.c_proj.bias",
    "ffn_norm.weight": "ln_2.weight", "ffn_norm.bias": "ln_2.bias",
    "ffn_up.weight": "mlp.c_fc.weight", "ffn_up.bias": "mlp.c_fc.bias",
    "ffn_down.weight": "mlp.c_proj.weight", "ffn_down.bias": "mlp.c_proj.bias",
}
_TOP = {"token_embd.weight": "wte.weight", "position_embd.weight": "wpe.weight",
        "output_norm.weight": "ln_f.weight", "output_norm.bias": "ln_f.bias",
        "output.weight": HEAD}
_BLK = re.compile(r"blk\.(\d+)\.(.+)")


def gguf_name(name: str) -> str:
    """llama.cpp's GGUF tensor name of a gpt2s parameter name."""
    for g, ours in _TOP.items():
        if ours == name:
            return g
    layer, suffix = name[2:].split(".", 1)
    for g, ours in _LAYER.items():
        if ours == suffix:
            return f"blk.{layer}.{g}"
    raise KeyError(name)


def _conv1d(name: str) -> bool:
    """A Conv1D weight: (in, out) in gpt2s, (out, in) rows in GGUF."""
    return _wt.is_compressed(name) and not _wt.is_row_major(name)


# ------------------------------------------------------------------------------------------
# Tokenizer


def _byte_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map (the spelling of its vocab.json):
    printable Latin-1 bytes stand for themselves, the other 68 bytes for U+0100 onwards."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAC + 1)) \
        + list(range(0xAE, 0xFF + 1))
    table, extra = {}, 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def _split(ranks: dict, token: bytes, rank: int) -> list[bytes]:
    """The BPE of token with only the merges ranked below rank: the two parts whose merge
    makes it (GPT-2's ranks are in merge order)."""
    parts = [token[i:i + 1] for i in range(len(token))]
    while len(parts) > 2:
        best, at = None, -1
        for i in range(len(parts) - 1):
            r = ranks.get(parts[i] + parts[i + 1])
            if r is not None and r < rank and (best is None or r < best):
                best, at = r, i
        if best is None:
            break
        parts[at:at + 2] = [parts[at] + parts[at + 1]]
    return parts


@functools.lru_cache(maxsize=1)
def gguf_tokenizer() -> tuple[list[str], list[int], list[str]]:
    """(tokens, token types, merges) of GPT-2's tokenizer in llama.cpp's ``gpt2`` vocabulary
    form, from the bundled BPE ranks: each token spelled with GPT-2's byte-to-unicode map (as in
    its vocab.json), type 1 (normal) but ``<|endoftext|>`` 3 (control), the merges "a b" in
    rank order (merges.txt)."""
    from .tokenizer import EOT_ID, EOT_TOKEN, load_ranks
    ranks = load_ranks()
    table = _byte_to_unicode()
    by_rank = sorted(ranks.items(), key=lambda kv: kv[1])
    if [r for _, r in by_rank] != list(range(len(by_rank))) or len(by_rank) != EOT_ID:
        raise ValueError("the bundled GPT-2 ranks are not 0 .. 50255 (reinstall gpt2s)")
    spell = lambda b: "".join(table[x] for x in b)   # noqa: E731
    tokens = [spell(b) for b, _ in by_rank] + [EOT_TOKEN]
    types = [1] * EOT_ID + [3]
    merges = []
    for token, rank in by_rank:
        if len(token) < 2:
            continue
        parts = _split(ranks, token, rank)
        if len(parts) != 2:
            raise ValueError(f"GPT-2 rank {rank} ({token!r}) is not a merge of two tokens")
        merges.append(f"{spell(parts[0])} {spell(parts[1])}")
    return tokens, types, merges


# ------------------------------------------------------------------------------------------
# Reading


def _open(gguf, path: Path):
    try:
        return gguf.GGUFReader(path, "r")
    except MemoryError:
        raise GGUFError(f"{path}: not enough memory to read its header") from None
    except Exception as e:   # the reader's own errors: bad magic, version, truncation, ...
        raise GGUFError(f"{path}: not a GGUF file gpt2s can read ({type(e).__name__}: "
                        f"{e})") from None


def _field(gguf, reader, path, key: str, kind, required: bool = True):
    f = reader.get_field(key)
    if f is None:
        if required:
            raise GGUFError(f"{path}: missing metadata key {key!r}")
        return None
    try:
        value = f.contents()
    except Exception:
        value = None
    ok = (isinstance(value, kind) and not isinstance(value, bool)) if kind in (int, float) \
        else isinstance(value, kind)
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value, ok = float(value), True
    if not ok:
        raise GGUFError(f"{path}: metadata {key!r} is {value!r}, not "
                        f"{'an integer' if kind is int else 'a ' + kind.__name__}")
    return value


def _config(gguf, reader, path, tensors: dict) -> GPT2Config:
    arch = _field(gguf, reader, path, "general.architecture", str)
    if arch != ARCH:
        raise GGUFError(f"{path}: general.architecture is {arch!r}; gpt2s reads GPT-2 GGUF "
                        f"files (architecture {ARCH!r}) only")
    n_ctx = _field(gguf, reader, path, "gpt2.context_length", int)
    n_embd = _field(gguf, reader, path, "gpt2.embedding_length", int)
    n_layer = _field(gguf, reader, path, "gpt2.block_count", int)
    n_head = _field(gguf, reader, path, "gpt2.attention.head_count", int)
    eps = _field(gguf, reader, path, "gpt2.attention.layer_norm_epsilon", float)
    n_inner = _field(gguf, reader, path, "gpt2.feed_forward_length", int, required=False)
    if reader.get_field("gpt2.attention.layer_norm_epsilon").types == \
            [gguf.GGUFValueType.FLOAT32]:
        # GGUF keeps it as a float32: its shortest decimal (1e-05, not 9.9999997e-06)
        eps = float(np.format_float_positional(np.float32(eps), unique=True))
    embd = tensors.get("token_embd.weight")
    if embd is None:
        raise GGUFError(f"{path}: missing tensor 'token_embd.weight' (the token embedding)")
    dims = [int(d) for d in embd.shape]
    if len(dims) != 2:
        raise GGUFError(f"{path}: tensor 'token_embd.weight' has {len(dims)} dimensions "
                        f"{dims}, expected [n_embd, n_vocab]")
    vocab = dims[1]
    tied = "output.weight" not in tensors or _same_bytes(embd, tensors["output.weight"])
    try:
        return GPT2Config(n_layer=n_layer, n_head=n_head, n_embd=n_embd, vocab_size=vocab,
                          n_ctx=n_ctx, layer_norm_epsilon=eps,
                          n_inner=None if n_inner in (None, 4 * n_embd) else n_inner,
                          tie_word_embeddings=tied)
    except ValueError as e:
        raise GGUFError(f"{path}: its gpt2.* metadata is not a GPT-2 gpt2s runs: {e}") from None


def _same_bytes(a, b) -> bool:
    return (a.tensor_type == b.tensor_type and [int(x) for x in a.shape] ==
            [int(x) for x in b.shape] and a.data.nbytes == b.data.nbytes
            and np.array_equal(a.data.reshape(-1).view(np.uint8),
                               b.data.reshape(-1).view(np.uint8)))


def _check_tokenizer(gguf, reader, path, vocab: int):
    model = _field(gguf, reader, path, "tokenizer.ggml.model", str, required=False)
    if model is None:
        return
    if model != "gpt2":
        raise GGUFError(f"{path}: tokenizer.ggml.model is {model!r}; gpt2s has GPT-2's "
                        f"tokenizer only ('gpt2')")
    f = reader.get_field("tokenizer.ggml.tokens")
    if f is None:
        return
    ours = gguf_tokenizer()[0]
    n = len(f.data)
    for i in range(min(n, len(ours))):
        theirs = bytes(f.parts[f.data[i]]).decode("utf-8", "replace")
        if theirs != ours[i]:
            raise GGUFError(f"{path}: its tokenizer is not GPT-2's: token {i} is {theirs!r}, "
                            f"GPT-2's is {ours[i]!r} (gpt2s encodes text with GPT-2's "
                            f"tokenizer only)")


def _expected(config: GPT2Config) -> dict:
    """{GGUF name: (gpt2s name, ggml dims [ne0, ne1, ...])} of a model of this config."""
    from .weights import param_layout
    out = {}
    for name, shape, _ in param_layout(config)[0]:
        g = gguf_name(name)
        # ggml's dims are numpy's reversed; a Conv1D (in, out) weight is (out, in) in numpy
        dims = list(shape) if _conv1d(name) else list(reversed(shape))
        out[g] = (name, dims)
    if config.tie_word_embeddings:
        out["output.weight"] = (None, [config.n_embd, config.vocab_size])   # a copy, optional
    return out


def _check_tensors(gguf, path, tensors: dict, config: GPT2Config) -> dict:
    expected = _expected(config)
    T = gguf.GGMLQuantizationType
    for g, t in tensors.items():
        m = _BLK.fullmatch(g)
        if m and int(m.group(1)) >= config.n_layer:
            raise GGUFError(f"{path}: unexpected tensor {g!r} (block {m.group(1)}, but "
                            f"gpt2.block_count is {config.n_layer})")
        if g not in expected:
            raise GGUFError(f"{path}: unexpected tensor {g!r} (not a tensor of llama.cpp's "
                            f"GPT-2 layout)")
    for g, (name, dims) in expected.items():
        t = tensors.get(g)
        if t is None:
            if name is None:
                continue
            raise GGUFError(f"{path}: missing tensor {g!r} (gpt2s's {name!r})")
        have = [int(x) for x in t.shape]
        if have != dims:
            raise GGUFError(f"{path}: tensor {g!r} has shape {have} (ggml order), expected "
                            f"{dims} for this model's gpt2.* sizes")
        kind = T(t.tensor_type)
        if len(dims) == 1 or g == "position_embd.weight":
            ok = kind in (T.F32, T.F16, T.BF16)
        else:
            ok = kind in (T.F32, T.F16, T.BF16) or _dequantizable(gguf, kind)
        if not ok:
            raise GGUFError(f"{path}: tensor {g!r} is stored as {kind.name}, a type gpt2s does "
                            f"not read there (it reads F32, F16, BF16, Q8_0, Q4_0 and, widened "
                            f"with the gguf package, its other block types)")
    return expected


def _dequantizable(gguf, kind) -> bool:
    T = gguf.GGMLQuantizationType
    if kind in (T.F64, T.I8, T.I16, T.I32, T.I64):
        return False
    # a block type; one the gguf package cannot dequantize is refused when it is read
    return kind in gguf.GGML_QUANT_SIZES


def _floats(gguf, path, g: str, t) -> np.ndarray:
    """The tensor's values as float32, in numpy order (ggml's dims reversed)."""
    T = gguf.GGMLQuantizationType
    kind = T(t.tensor_type)
    shape = tuple(reversed([int(x) for x in t.shape]))
    if kind == T.F32:
        out = np.array(t.data, np.float32).reshape(shape)
    elif kind == T.F16:
        out = t.data.astype(np.float32).reshape(shape)
    elif kind == T.BF16:
        bits = t.data.reshape(-1).view(np.uint16).astype(np.uint32) << 16
        out = bits.view(np.float32).reshape(shape)
    elif kind in (T.Q8_0, T.Q4_0):
        out = _dequant_blocks(kind == T.Q4_0, t.data, shape)
    else:
        from gguf import quants
        try:
            out = quants.dequantize(t.data, kind).astype(np.float32).reshape(shape)
        except NotImplementedError:
            raise GGUFError(f"{path}: tensor {g!r} is stored as {kind.name}, which the gguf "
                            f"package cannot dequantize") from None
    return out


def _blocks(is_q4: bool, data: np.ndarray, shape) -> np.ndarray:
    rows, cols = shape
    size = 18 if is_q4 else 34
    return np.asarray(data).reshape(-1).view(np.uint8).reshape(rows, cols // BLOCK, size)


def _repack(is_q4: bool, data: np.ndarray, shape) -> tuple[np.ndarray, np.ndarray]:
    """(codes, fp16 scale bits) of GGUF Q8_0 / Q4_0 rows (rows, cols weights): each block's
    bytes as they are, split into gpt2s's two arrays."""
    rows, cols = shape
    b = _blocks(is_q4, data, shape)
    scales = np.ascontiguousarray(b[:, :, :2]).view("<u2").reshape(rows, cols // BLOCK)
    codes = np.ascontiguousarray(b[:, :, 2:]).reshape(rows, -1)
    return (codes.view(np.int8) if not is_q4 else codes), scales.astype(np.uint16)


def _dequant_blocks(is_q4: bool, data, shape) -> np.ndarray:
    codes, scales = _repack(is_q4, data, shape)
    rows, cols = shape
    d = scales.view(np.float16).astype(np.float32)[:, :, None]
    if is_q4:
        c = codes.reshape(rows, cols // BLOCK, 16)
        q = np.concatenate([c & 0x0F, c >> 4], axis=2).astype(np.float32) - 8
    else:
        q = codes.reshape(rows, cols // BLOCK, BLOCK).astype(np.float32)
    return (q * d).reshape(rows, cols)


def _default_dtype(gguf, tensors: dict) -> str:
    T = gguf.GGMLQuantizationType
    kind = T(tensors["blk.0.attn_qkv.weight"].tensor_type) \
        if "blk.0.attn_qkv.weight" in tensors else T.F32
    return {T.Q8_0: "int8", T.Q4_0: "int4", T.BF16: "bfloat16"}.get(kind, "float32")


def load_parameters(path, dtype: str | None = None, *, progress=None):
    """The `ParameterStore` of a GPT-2 GGUF file (what `GPT2.from_gguf` does; its docstring
    states the rules)."""
    from . import packed as _packed
    from . import weights as _w
    from .params import ParameterStore
    gguf = _gguf()
    if dtype is not None:
        _wt.check_dtype(dtype)
    path = Path(os.fspath(path)).expanduser()
    try:
        st = os.stat(path)
    except (FileNotFoundError, NotADirectoryError):
        raise FileNotFoundError(f"{path}: no such file") from None
    if not stat.S_ISREG(st.st_mode):
        raise GGUFError(f"{path}: not a regular file")
    reader = _open(gguf, path)
    tensors = {t.name: t for t in reader.tensors}
    config = _config(gguf, reader, path, tensors)
    _check_tensors(gguf, path, tensors, config)
    _check_tokenizer(gguf, reader, path, config.vocab_size)
    if dtype is None:
        dtype = _default_dtype(gguf, tensors)
    T = gguf.GGMLQuantizationType
    try:
        store = ParameterStore(config, dtype)
    except MemoryError:
        raise GGUFError(f"{path}: not enough memory to load it as {dtype} "
                        f"({config.num_parameters():,} parameters)") from None
    target = _wt.get(dtype)
    counter = LoadCounter(progress, config)
    for name in list(store.params):
        g = gguf_name(name)
        t = tensors[g]
        kind = T(t.tensor_type)
        shape = tuple(store.params[name].shape)
        where = f"{path}: tensor {g!r}"
        if dtype != "float32" and _wt.is_compressed(name):
            rows_shape = tuple(reversed([int(x) for x in t.shape]))   # numpy (rows, cols)
            if (kind, dtype) in ((T.Q8_0, "int8"), (T.Q4_0, "int4")):
                codes, scales = _repack(kind == T.Q4_0, t.data, rows_shape)
                _packed.check_scales(path, g, scales)
                store.set_param(name, target.from_stored(name, codes, scales))
            elif (kind, dtype) == (T.BF16, "bfloat16"):
                bits = np.array(t.data.reshape(-1).view(np.uint16)).reshape(rows_shape)
                if _conv1d(name):
                    bits = np.ascontiguousarray(bits.T)
                _w.check_bfloat16_bits(path, g, bits)
                store.set_param(name, target.from_stored(name, bits))
            else:
                values = _floats(gguf, path, g, t)
                if _conv1d(name):
                    values = np.ascontiguousarray(values.T)
                _w.check_values(path, g, values, dtype)
                try:
                    store.set_param(name, target.compress(name, values))
                except ValueError as e:
                    raise GGUFError(f"{where}: {e}") from None
        else:
            values = _floats(gguf, path, g, t)
            if _conv1d(name):
                values = values.T
            _w.check_values(path, g, values)
            store.params[name][...] = values.reshape(shape)
        counter.add(math.prod(shape))
    del reader
    return store


# ------------------------------------------------------------------------------------------
# Writing


# gpt2s storage -> the GGUF type of the matmul weights (and llama.cpp's file type)
EXPORT_TYPES = {"float32": "F32", "float16": "F16", "bfloat16": "BF16", "int8": "Q8_0",
                "int4": "Q4_0"}


def _interleave(codes: np.ndarray, scales: np.ndarray, is_q4: bool) -> np.ndarray:
    """GGUF Q8_0 / Q4_0 rows (uint8, rows x bytes) from gpt2s's codes and scale bits."""
    rows, nb = scales.shape
    per = 16 if is_q4 else 32
    out = np.empty((rows, nb, 2 + per), np.uint8)
    out[:, :, :2] = np.ascontiguousarray(scales, "<u2").view(np.uint8).reshape(rows, nb, 2)
    out[:, :, 2:] = np.ascontiguousarray(codes).view(np.uint8).reshape(rows, nb, per)
    return out.reshape(rows, nb * (2 + per))


def _tensor(gguf, name: str, w, kind: str):
    """(array, raw_shape or None, raw_dtype or None) of one parameter for GGUFWriter.add_tensor
    in GGUF type kind, in ggml's (out, in) row order."""
    T = gguf.GGMLQuantizationType
    if kind in ("Q8_0", "Q4_0"):
        wt = _wt.get("int8" if kind == "Q8_0" else "int4")
        if isinstance(w, _wt.PackedWeight) and w.type_name == wt.name:
            codes, scales = w.data, w.scales
        else:
            c = wt.compress(name, w if isinstance(w, np.ndarray) else np.asarray(w))
            codes, scales = c.data, c.scales
        return _interleave(codes, scales, kind == "Q4_0"), None, T[kind]
    if kind == "BF16" and isinstance(w, _wt.PackedWeight) and w.type_name == "bfloat16":
        bits = np.asarray(w.data)
        bits = bits.T if _conv1d(name) else bits
        return np.ascontiguousarray(bits, "<u2").view(np.uint8), None, T.BF16
    values = np.asarray(w, np.float32)
    if _conv1d(name):
        values = values.T
    if kind == "F32":
        return np.ascontiguousarray(values, "<f4"), None, None
    if kind == "F16":
        return np.ascontiguousarray(values, "<f2"), None, None
    # BF16: the top 16 bits of each float32, rounded to nearest even (as save_safetensors)
    bits = np.ascontiguousarray(values, "<f4").view(np.uint32)
    bits = ((bits + (np.uint32(0x7FFF) + ((bits >> 16) & np.uint32(1)))) >> 16).astype("<u2")
    return bits.view(np.uint8), None, T.BF16


def save_gguf(path, params: dict, config: GPT2Config, storage: str) -> Path:
    """Write the model as a llama.cpp GPT-2 GGUF with its matmul weights in EXPORT_TYPES[
    storage] (biases, layernorms and position_embd F32), atomically (temporary file, rename)."""
    from .fs import atomic_write
    from .tokenizer import EOT_ID
    gguf = _gguf()
    if storage not in EXPORT_TYPES:
        raise ValueError(f"dtype must be None or one of {list(EXPORT_TYPES)}, got {storage!r}")
    kind = EXPORT_TYPES[storage]
    if config.vocab_size < EOT_ID + 1:
        raise ValueError(f"a GGUF file carries GPT-2's tokenizer of {EOT_ID + 1} tokens; this "
                         f"model's vocab_size is {config.vocab_size}")
    if config.activation_function not in ("gelu_new", "gelu_pytorch_tanh", "gelu_fast",
                                          "gelu_accurate", "gelu_python_tanh") \
            or not config.scale_attn_weights or config.scale_attn_by_inverse_layer_idx:
        raise ValueError("llama.cpp's GPT-2 computes the tanh GELU with scaled attention only; "
                         "this model's config differs (activation_function="
                         f"{config.activation_function!r}, scale_attn_weights="
                         f"{config.scale_attn_weights}, scale_attn_by_inverse_layer_idx="
                         f"{config.scale_attn_by_inverse_layer_idx})")
    if kind in ("Q8_0", "Q4_0") and config.n_embd % BLOCK or config.inner_size % BLOCK:
        raise ValueError(f"{kind} needs n_embd and the MLP width to be multiples of {BLOCK}, "
                         f"got {config.n_embd} and {config.inner_size}")
    T = gguf.GGMLQuantizationType
    file_type = {"F32": gguf.LlamaFileType.ALL_F32, "F16": gguf.LlamaFileType.MOSTLY_F16,
                 "BF16": gguf.LlamaFileType.MOSTLY_BF16, "Q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
                 "Q4_0": gguf.LlamaFileType.MOSTLY_Q4_0}[kind]
    w = gguf.GGUFWriter(None, ARCH)
    w.add_name("gpt2s GPT-2")
    w.add_block_count(config.n_layer)
    w.add_context_length(config.n_ctx)
    w.add_embedding_length(config.n_embd)
    w.add_feed_forward_length(config.inner_size)
    w.add_head_count(config.n_head)
    w.add_layer_norm_eps(float(config.layer_norm_epsilon))
    w.add_file_type(int(file_type))
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    tokens, types, merges = gguf_tokenizer()
    extra = config.vocab_size - len(tokens)   # a padded vocabulary: unused tokens
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("gpt-2")
    w.add_token_list(tokens + [f"[PAD{i}]" for i in range(extra)])
    w.add_token_types(types + [int(gguf.TokenType.UNUSED)] * extra)
    w.add_token_merges(merges)
    w.add_bos_token_id(EOT_ID)
    w.add_eos_token_id(EOT_ID)
    w.add_unk_token_id(EOT_ID)
    w.add_add_bos_token(False)
    for name, p in params.items():
        g = gguf_name(name)
        k = kind if _wt.is_compressed(name) else "F32"
        data, raw_shape, raw_dtype = _tensor(gguf, name, p, k)
        # a tied head is token_embd itself (no "output", as llama.cpp's converter writes it)
        w.add_tensor(g, data, raw_shape=raw_shape, raw_dtype=raw_dtype)
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)

    def write(f):
        w.fout = [f]
        w.state = gguf.gguf_writer.WriterState.EMPTY
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.fout = None

    atomic_write(p, write)
    del T
    return p
