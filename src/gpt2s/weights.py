"""safetensors <-> the parameter buffer, in Hugging Face's GPT-2 key layout.

We read and write the safetensors format ourselves (an 8-byte little-endian header length, a
JSON header, then raw little-endian tensor bytes) rather than through the ``safetensors``
package, because:

* each tensor is converted from the memory-mapped file straight into its view of the one
  float32 parameter buffer — no dict of intermediate arrays, so loading never holds two full
  float32 copies of the model;
* BF16 needs no torch (NumPy has no bfloat16: we widen the 16 bits into float32 ourselves);
* every problem can name the file and the tensor (missing, wrong shape, unknown dtype,
  truncated data, not a safetensors file, a NaN weight);
* a hostile header is bounded before Python's json parses it (the library caps it at 100 MB,
  which json.loads turns into ~1 GB of objects), and every header the library refuses is
  refused here too.
"""

from __future__ import annotations

import errno
import json
import math
import mmap
import os
import re
import stat
import struct
from pathlib import Path

import numpy as np

from .config import GPT2Config, parse_config_json
from .fs import atomic_write

__all__ = [
    "param_layout", "read_safetensors_header", "load_into", "infer_config",
    "resolve_model_path", "save_safetensors", "SafetensorsError", "open_model",
    "check_against_config", "config_from_metadata", "CONFIG_METADATA_KEY", "file_storage",
    "LoadCounter", "Tensors", "open_tensors", "read_index", "INDEX_FILE",
]

ALIGN = 16  # every tensor starts on a 64-byte boundary of the parameter buffer

_LAYER_TENSORS = [
    # (suffix, shape as a function of C and the MLP width H = n_inner or 4C)
    ("ln_1.weight", lambda C, H: (C,)),
    ("ln_1.bias", lambda C, H: (C,)),
    ("attn.c_attn.weight", lambda C, H: (C, 3 * C)),
    ("attn.c_attn.bias", lambda C, H: (3 * C,)),
    ("attn.c_proj.weight", lambda C, H: (C, C)),
    ("attn.c_proj.bias", lambda C, H: (C,)),
    ("ln_2.weight", lambda C, H: (C,)),
    ("ln_2.bias", lambda C, H: (C,)),
    ("mlp.c_fc.weight", lambda C, H: (C, H)),
    ("mlp.c_fc.bias", lambda C, H: (H,)),
    ("mlp.c_proj.weight", lambda C, H: (H, C)),
    ("mlp.c_proj.bias", lambda C, H: (C,)),
]

LAYER_SUFFIXES = tuple(suffix for suffix, _ in _LAYER_TENSORS)


def layer_views(tensors: dict, layer: int) -> dict:
    """{suffix: tensors["h.<layer>.<suffix>"]} for one transformer block."""
    return {suffix: tensors[f"h.{layer}.{suffix}"] for suffix in LAYER_SUFFIXES}


def canonical_name(name: str) -> str:
    """A tensor name without Hugging Face's "transformer." prefix."""
    return name[len("transformer."):] if name.startswith("transformer.") else name


# buffers of the original openai-community/gpt2 file that are not parameters
# buffers some checkpoints carry that are not parameters: GPT-2's attention masks, the
# rotary inverse frequencies of older Llama saves
_IGNORED = re.compile(r"h\.\d+\.attn\.(bias|masked_bias)|"
                      r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq")
# the block of a tensor: GPT-2's h.N., the Llama family's model.layers.N.
_BLOCK_KEY = re.compile(r"(?:h|model\.layers)\.(\d+)\.")
_LAYER_KEY = re.compile(r"h\.(\d+)\.")

HEAD = "lm_head.weight"  # the output head's key: never under the "transformer." prefix

_DTYPES = {"F32": (np.dtype("<f4"), 4), "F16": (np.dtype("<f2"), 2), "BF16": (np.dtype("<u2"), 2)}


class SafetensorsError(ValueError):
    """A safetensors file that gpt2s cannot use; the message names the file and the tensor.

    Raised by `GPT2.from_safetensors` for a file that is not safetensors, a truncated file, a
    missing or unexpected tensor, a wrong shape or an unsupported dtype, a header past the
    limits (``MAX_HEADER_BYTES``, ``MAX_TENSORS``, ...), a NaN or infinite weight or one the
    storage dtype cannot hold, and when memory runs out while loading.  A subclass of
    ``ValueError``.

    Examples:
        >>> import os, tempfile
        >>> from gpt2s import GPT2
        >>> path = os.path.join(tempfile.mkdtemp(), "bad.safetensors")
        >>> with open(path, "wb") as f:
        ...     _ = f.write(b"not a safetensors file")
        >>> try:
        ...     GPT2.from_safetensors(path)
        ... except SafetensorsError as e:
        ...     print("bad.safetensors" in str(e))
        True
    """


def param_layout(config: GPT2Config):
    """[(name, shape, offset)] of every parameter in the buffer, and the buffer's length.
    An untied output head (tie_word_embeddings false) is a parameter of its own,
    ``lm_head.weight`` (V, C), after the others."""
    C, L, H = config.n_embd, config.n_layer, config.inner_size
    entries = [("wte.weight", (config.vocab_size, C)), ("wpe.weight", (config.n_ctx, C))]
    for layer in range(L):
        entries += [(f"h.{layer}.{suffix}", shape(C, H)) for suffix, shape in _LAYER_TENSORS]
    entries += [("ln_f.weight", (C,)), ("ln_f.bias", (C,))]
    if not config.tie_word_embeddings:
        entries.append((HEAD, (config.vocab_size, C)))
    layout, offset = [], 0
    for name, shape in entries:
        layout.append((name, shape, offset))
        size = math.prod(shape)
        offset += (size + ALIGN - 1) // ALIGN * ALIGN
    return layout, offset


# ------------------------------------------------------------------------------------------
# Reading
#
# Everything in a file is validated before anything is allocated for it: the header against the
# file (every byte range inside the data section, sizes equal to shape x dtype, ranges neither
# overlapping nor leaving holes), then the config (config.json, the file's __metadata__, or the
# shapes) against the header (every parameter present with its exact shape and a readable dtype).
# Only then is the parameter buffer allocated, and since every parameter is backed by at least
# two bytes of its own in the file, that buffer is at most twice the file's size.

# What a header may hold, derived from the config bounds (GPT2Config.MAX_SIZES) so that a
# hostile header costs little to refuse: json.loads of the library's 100 MB cap builds ~1 GB of
# Python objects and takes minutes.  A block of any family gpt2s reads has at most 16 tensors
# (GPT-2: 12 parameters and 2 mask buffers; GPT-NeoX: 12 and 3; Llama/Qwen2: 9 to 13), a model
# at most n_layer 1024 blocks, plus a few embeddings, norms and heads.
MAX_TENSORS_PER_BLOCK = 16
MAX_TENSORS = MAX_TENSORS_PER_BLOCK * GPT2Config.MAX_SIZES["n_layer"] + 16
# an entry is ~150 bytes ("model.layers.1023.self_attn.q_proj.weight": dtype, a 2-d shape,
# two 12-digit offsets); 512 each leaves room for long names and the __metadata__, and keeps
# the parse of any header under the cap below ~100 MB (a non-BMP character makes Python hold
# the text, and a string parsed from it, at 4 bytes per character)
MAX_HEADER_BYTES = MAX_TENSORS * 512
# the tensors of these families have at most 4 dimensions (GPT-2's mask buffer [1, 1, T, T])
MAX_DIMS = 8
# JSON values and strings (counted as the commas, colons, brackets and quotes that delimit
# them) per entry: a full entry uses 23, the rest is room for __metadata__ keys
MAX_JSON_TOKENS = 32 * MAX_TENSORS
# the safetensors library's JSON parser (serde_json) refuses deeper nesting
MAX_JSON_DEPTH = 127
# the JSON config stored in a file's __metadata__ (whose values must be strings)
CONFIG_METADATA_KEY = "gpt2s_config"
# bits per element of every dtype of the safetensors format (the library's closed list: a
# file with any other dtype string is refused, even on a tensor gpt2s would not read)
_DTYPE_BITS = {"BOOL": 8, "U8": 8, "I8": 8, "F8_E5M2": 8, "F8_E4M3": 8, "F8_E8M0": 8,
               "F8_E4M3FNUZ": 8, "F8_E5M2FNUZ": 8, "I16": 16, "U16": 16, "F16": 16,
               "BF16": 16, "I32": 32, "U32": 32, "F32": 32, "I64": 64, "U64": 64, "F64": 64,
               "C64": 64, "F4": 4, "F6_E2M3": 6, "F6_E3M2": 6}
# offsets and dimensions are Rust usize in the library: 64-bit on the platforms it ships for
_USIZE_END = 1 << 64
_MAX_CONFIG_JSON_BYTES = 16 << 20


def _file_kind(mode: int) -> str:
    for is_kind, kind in ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"),
                          (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
                          (stat.S_ISSOCK, "a socket")):
        if is_kind(mode):
            return kind
    return "not a regular file"


def _not_regular(path, mode) -> SafetensorsError:
    return SafetensorsError(f"{path}: is {_file_kind(mode)}, not a regular file; gpt2s reads "
                            f"models only from regular files (or a directory holding "
                            f"model.safetensors)")


def _stat(path: Path, missing: str) -> os.stat_result:
    try:
        return os.stat(path)
    except (FileNotFoundError, NotADirectoryError):
        raise FileNotFoundError(missing) from None


def resolve_model_path(path) -> tuple[Path, Path | None]:
    """(the .safetensors file, config.json or None) for a file or a model directory.  Only
    regular files are accepted: a FIFO would block open() forever, a device never ends."""
    p = Path(path)
    try:
        st = os.stat(p)
    except (FileNotFoundError, NotADirectoryError):
        from .hub import pretrained_hint
        raise FileNotFoundError(f"{p}: no such file or directory{pretrained_hint(path)}") \
            from None
    if stat.S_ISDIR(st.st_mode):
        f = p / "model.safetensors"
        if not os.path.lexists(f) and os.path.lexists(p / INDEX_FILE):
            f = p / INDEX_FILE     # a sharded checkpoint: its index names the shards
        st = _stat(f, f"{p}: directory has no model.safetensors (nor {INDEX_FILE})")
        if not stat.S_ISREG(st.st_mode):
            raise _not_regular(f, st.st_mode)
        cfg = p / "config.json"
        return f, (cfg if cfg.is_file() else None)
    if not stat.S_ISREG(st.st_mode):
        raise _not_regular(p, st.st_mode)
    cfg = p.parent / "config.json"
    # a config.json beside a file counts only when the file is the directory's model.safetensors
    # (or its sharded form's index)
    return p, (cfg if p.name in ("model.safetensors", INDEX_FILE) and cfg.is_file() else None)


class _Number:
    """A JSON number the safetensors format's parser does not read as Python does: ``-0`` (a
    float there, so never an offset or a dimension), NaN and Infinity (not JSON), and numbers
    beyond float64 ("number out of range").  Stands in for the value so that the entry that
    holds it can be named."""

    def __init__(self, text: str, valid: bool):
        self.text, self.valid = text, valid

    def __repr__(self):
        return self.text if len(self.text) <= 40 else f"{self.text[:20]}...({len(self.text)} characters)"


class _DuplicateKeys(dict):
    """A JSON object with a repeated key (json.loads would keep the last silently)."""

    def __init__(self, pairs, duplicate: str):
        super().__init__(pairs)
        self.duplicate = duplicate


class _JSONReader:
    """json.loads hooks that record what the safetensors library's parser would refuse or read
    differently, instead of letting Python's json accept it silently."""

    def __init__(self):
        self.invalid: list[_Number] = []

    def object_pairs(self, pairs):
        out = dict(pairs)
        if len(out) == len(pairs):
            return out
        seen = set()
        duplicate = next(k for k, _ in pairs if k in seen or seen.add(k))
        return _DuplicateKeys(pairs, duplicate)

    def integer(self, text: str):
        if text == "-0":
            return _Number(text, valid=True)
        if len(text) > 19 and not math.isfinite(float(text)):
            if len(text) > 4300:   # Python's own limit for int(str); far out of range anyway
                raise _NotJSON(f"an integer of {len(text)} digits")
            return self._invalid(text)
        return int(text)

    def real(self, text: str):
        value = float(text)
        return value if math.isfinite(value) else self._invalid(text)

    def constant(self, text: str):   # NaN, Infinity, -Infinity: Python's extension of JSON
        return self._invalid(text)

    def _invalid(self, text):
        number = _Number(text, valid=False)
        self.invalid.append(number)
        return number

    def loads(self, text: str):
        return json.loads(text, object_pairs_hook=self.object_pairs, parse_int=self.integer,
                          parse_float=self.real, parse_constant=self.constant)


class _NotJSON(Exception):
    pass


def _refuse_header(path, why: str):
    return SafetensorsError(f"{path}: not a safetensors file (header is not JSON: {why})")


_NOT_BRACKETS = bytes(b for b in range(256) if b not in b"[]{}")
_SCAN_CHUNK = 1 << 20


def _scan_header(path, raw: bytes):
    """Bound what json.loads would build before it builds it: count the tensor entries, the
    JSON tokens and the nesting depth from the raw bytes, in a few passes of C-speed bytes
    methods.  A JSON parser accepts a prefix only where this scan reads the same structure
    (backslashes occur only inside strings there), so even a header that is not JSON costs the
    parser no more than the counts admit."""
    # every backslash of a JSON text starts a two-character escape inside a string: drop the
    # escaped backslashes, then the escaped quotes; each quote left opens or closes a string
    text = raw.replace(b"\\\\", b"").replace(b'\\"', b"")
    quotes = text.count(b'"')
    if quotes % 2:
        raise _refuse_header(path, "a string is not terminated")
    outside, in_string = [], False
    for start in range(0, len(text), _SCAN_CHUNK):   # pieces of 1 MiB: few small objects
        pieces = text[start:start + _SCAN_CHUNK].split(b'"')
        outside.append(b"".join(pieces[1 if in_string else 0::2]))
        in_string ^= bool((len(pieces) - 1) % 2)
    del text
    structure = b"".join(outside)
    del outside
    objects = structure.count(b"{")
    if objects > MAX_TENSORS + 2:
        raise SafetensorsError(
            f"{path}: header has {objects:,} JSON objects, more than the {MAX_TENSORS:,} tensor "
            f"entries a model of gpt2s can have (at most {MAX_TENSORS_PER_BLOCK} tensors in "
            f"each of up to {GPT2Config.MAX_SIZES['n_layer']} blocks); not a model file")
    tokens = quotes // 2 + objects + sum(structure.count(c) for c in (b"[", b",", b":"))
    if tokens > MAX_JSON_TOKENS:
        raise SafetensorsError(
            f"{path}: header has {tokens:,} JSON values and strings, more than the "
            f"{MAX_JSON_TOKENS:,} that {MAX_TENSORS:,} tensor entries of up to {MAX_DIMS} "
            f"dimensions need; not a model file")
    brackets = np.frombuffer(structure.translate(None, _NOT_BRACKETS), np.uint8)
    depth = 0
    for start in range(0, brackets.size, 1 << 16):
        chunk = brackets[start:start + (1 << 16)]
        # +1 for [ and { (0x5b, 0x7b: bit 1 set), -1 for ] and } (0x5d, 0x7d: clear)
        levels = np.cumsum((chunk & 2).view(np.int8) - 1, dtype=np.int32)
        levels += depth
        if levels.max() > MAX_JSON_DEPTH:
            raise _refuse_header(path, f"nested more than {MAX_JSON_DEPTH} levels deep, the "
                                       f"most the safetensors format's parser reads")
        depth = int(levels[-1])


def read_safetensors_header(path: Path, file_size: int, head: bytes) -> tuple[dict, int]:
    """Parse and validate the header; returns ({name: info}, offset of the data section)."""
    tensors, _, data_start = _parse_header(path, file_size, head)
    return tensors, data_start


def _decode_header(path, head, n: int):
    """The header's JSON (head[8:8 + n]), bounded by _scan_header, parsed with _JSONReader."""
    raw = bytes(head[8:8 + n])
    _scan_header(path, raw)
    del raw
    reader = _JSONReader()
    try:
        with memoryview(head) as view, view[8:8 + n] as header_bytes:
            text = str(header_bytes, "utf-8")
        header = reader.loads(text)
    except _NotJSON as e:
        raise _refuse_header(path, e.args[0]) from None
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        # ValueError: JSONDecodeError
        raise _refuse_header(path, str(e)[:200]) from None
    # a string with an unpaired UTF-16 surrogate escape ("\ud800") is not text: the library
    # refuses it, Python keeps it as a lone surrogate that cannot be encoded
    if "\\u" in text:
        try:
            json.dumps(header, ensure_ascii=False, default=repr).encode("utf-8")
        except UnicodeEncodeError:
            raise _refuse_header(path, "a string holds an unpaired UTF-16 surrogate "
                                       "escape") from None
    return header, reader


def _parse_header(path, file_size: int, head) -> tuple[dict, dict, int]:
    """({name: info} of the tensors, the __metadata__ dict, offset of the data section), with
    every tensor entry checked against the file (see the comment at the top of "Reading")."""
    if file_size < 8:
        raise SafetensorsError(f"{path}: not a safetensors file ({file_size} bytes, too short)")
    (n,) = struct.unpack("<Q", head[:8])
    if n == 0:
        raise SafetensorsError(f"{path}: not a safetensors file (header length 0)")
    if n > MAX_HEADER_BYTES:
        raise SafetensorsError(
            f"{path}: not a safetensors file of a model gpt2s reads (header length {n:,} bytes; "
            f"at most {MAX_HEADER_BYTES:,}: 512 bytes for each of the {MAX_TENSORS:,} tensors a "
            f"model can have)")
    if 8 + n > file_size:
        raise SafetensorsError(
            f"{path}: truncated or not a safetensors file (header of {n} bytes, "
            f"file has {file_size})")
    try:
        header, reader = _decode_header(path, head, n)
    except MemoryError:
        raise SafetensorsError(f"{path}: out of memory reading its {n:,}-byte header") from None
    if not isinstance(header, dict):
        raise SafetensorsError(f"{path}: not a safetensors file (header is not a JSON object)")
    if isinstance(header, _DuplicateKeys):
        raise SafetensorsError(f"{path}: corrupt header: key {_r(header.duplicate)} appears twice")
    metadata = header.pop("__metadata__", None)
    if metadata is None:
        metadata = {}
    if not (isinstance(metadata, dict) and all(isinstance(v, str) for v in metadata.values())):
        raise SafetensorsError(f"{path}: corrupt header: __metadata__ must map names to strings")
    if isinstance(metadata, _DuplicateKeys):
        raise SafetensorsError(f"{path}: corrupt header: __metadata__ key "
                               f"{_r(metadata.duplicate)} appears twice")
    if len(header) > MAX_TENSORS:
        raise SafetensorsError(f"{path}: header has {len(header):,} tensors, more than the "
                               f"{MAX_TENSORS:,} a model of gpt2s can have; not a model file")
    data_start = 8 + n
    data_size = file_size - data_start
    for name, info in header.items():
        _check_entry(path, name, info, data_size)
    _check_spans(path, header, data_size)
    if reader.invalid:   # in a place no check above reads (a tensor entry's extra key)
        raise _refuse_header(path, f"the number {reader.invalid[0]!r} is out of the range "
                                   f"JSON numbers have (or not JSON at all)")
    return header, metadata, data_start


_ENTRY_FIELDS = ("dtype", "shape", "data_offsets")


def _is_usize(value) -> bool:
    return type(value) is int and 0 <= value < _USIZE_END


def _check_entry(path, name: str, info, data_size: int):
    """One tensor entry: well-formed, its bytes inside the data section, as many bytes as its
    shape and dtype need (computed as the safetensors library does, in 64 bits, before NumPy
    sees the shape).  Keys besides the three fields are ignored, as the library does."""
    if not (isinstance(info, dict) and all(field in info for field in _ENTRY_FIELDS)):
        raise SafetensorsError(f"{path}: corrupt header entry for tensor {_r(name)}")
    if isinstance(info, _DuplicateKeys) and info.duplicate in _ENTRY_FIELDS:
        raise SafetensorsError(f"{path}: corrupt header: key {_r(info.duplicate)} appears "
                               f"twice in the entry of tensor {_r(name)}")
    offsets, dtype, shape = info["data_offsets"], info["dtype"], info["shape"]
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(map(_is_usize, offsets))):
        raise SafetensorsError(f"{path}: tensor {_r(name)} has corrupt data offsets "
                               f"{_r(offsets)} (expected two integers)")
    if not isinstance(dtype, str):
        raise SafetensorsError(f"{path}: tensor {_r(name)} has a corrupt dtype {_r(dtype)}")
    if not (isinstance(shape, list) and all(map(_is_usize, shape))):
        raise SafetensorsError(f"{path}: tensor {_r(name)} has a corrupt shape {_r(shape)}")
    if len(shape) > MAX_DIMS:
        raise SafetensorsError(f"{path}: tensor {_r(name)} has {len(shape)} dimensions "
                               f"{_shape_str(shape)}; gpt2s reads tensors of at most "
                               f"{MAX_DIMS}")
    begin, end = offsets
    if not begin <= end:
        raise SafetensorsError(f"{path}: tensor {_r(name)} has corrupt data offsets "
                               f"{_r(offsets)}")
    if end > data_size:
        raise SafetensorsError(
            f"{path}: truncated file: tensor {_r(name)} needs bytes {_r(begin)}..{_r(end)} "
            f"of the data section but only {data_size} are present")
    bits = _DTYPE_BITS.get(dtype)
    if bits is None:
        raise SafetensorsError(f"{path}: tensor {_r(name)} has unknown dtype {_r(dtype)}")
    # the element count folded left to right in 64 bits, as the library does: a product
    # that overflows is refused even when a later dimension is 0
    count = 1
    for d in shape:
        count *= d
        if count >= _USIZE_END:
            break
    need_bits = count * bits
    if need_bits >= _USIZE_END:
        raise SafetensorsError(
            f"{path}: tensor {_r(name)} ({dtype} {_shape_str(shape)}) has more elements than "
            f"a 64-bit size can count")
    if need_bits != 8 * (end - begin):
        raise SafetensorsError(
            f"{path}: tensor {_r(name)} ({dtype} {_shape_str(shape)}) needs "
            f"{_bits_str(need_bits)} but its data_offsets {begin}..{end} hold {end - begin} "
            f"bytes")


def _shape_str(shape) -> str:
    s = str(tuple(shape[:20]))
    return s if len(s) <= 80 and len(shape) <= 20 else s[:76].rstrip(",)") + ", ...)"


def _r(value, limit: int = 120) -> str:
    """repr() of a value read from a file, cut short: a hostile name or shape can be megabytes."""
    s = repr(value)
    return s if len(s) <= limit else s[:limit - 3] + "..."


def _bits_str(bits: int) -> str:
    return f"{bits // 8} bytes" if bits % 8 == 0 else f"{bits} bits"


def _check_spans(path, header: dict, data_size: int):
    """The tensors' byte ranges, sorted, tile the data section exactly: no two overlap (else a
    small file could describe many tensors over the same bytes and make us allocate far more
    than its size), no holes and no trailing bytes (the safetensors format forbids them, so no
    file we accept is one the safetensors library refuses, and nothing hides in the gaps)."""
    spans = sorted((info["data_offsets"][0], info["data_offsets"][1], name)
                   for name, info in header.items())
    pos, prev = 0, None
    for begin, end, name in spans:
        if begin < pos:
            raise SafetensorsError(
                f"{path}: tensor {_r(name)} (bytes {begin}..{end}) overlaps tensor {_r(prev[2])} "
                f"(bytes {prev[0]}..{prev[1]})")
        if begin > pos:
            after = f"after tensor {_r(prev[2])}" if prev else "at the start of the data section"
            raise SafetensorsError(
                f"{path}: corrupt data offsets: bytes {pos}..{begin} {after} belong to no "
                f"tensor (next: {_r(name)})")
        pos, prev = end, (begin, end, name)
    if pos != data_size:
        last = f" after tensor {_r(prev[2])}" if prev else ""
        raise SafetensorsError(
            f"{path}: corrupt data offsets: {data_size - pos} trailing bytes{last} belong to "
            f"no tensor")


def _layer_index(path, name: str) -> int | None:
    m = _LAYER_KEY.match(name)
    if m is None:
        return None
    digits = m.group(1)
    if len(digits) > 9:  # and int() of 5000 digits would raise a bare ValueError
        raise SafetensorsError(f"{path}: tensor {_r(name)} has an impossible block index")
    return int(digits)


def infer_config(names_shapes: dict, source: str) -> GPT2Config:
    """The config from tensor shapes alone: n_layer from the keys, n_embd and vocab from wte,
    n_ctx from wpe, n_inner from h.0.mlp.c_fc.weight (C, n_inner), n_head = n_embd / 64 as in
    all four GPT-2 sizes.  Everything else takes GPT-2's defaults (gelu_new, a tied head)."""
    for required in ("wte.weight", "wpe.weight"):
        if required not in names_shapes:
            raise SafetensorsError(f"{source}: missing tensor {required!r}")
    for name in ("wte.weight", "wpe.weight"):
        shape = names_shapes[name]
        if len(shape) != 2 or min(shape) < 1:
            raise SafetensorsError(f"{source}: tensor {name!r} has shape {_shape_str(shape)}, "
                                   f"expected 2-D with no zero-sized dimension")
    V, C = names_shapes["wte.weight"]
    T = names_shapes["wpe.weight"][0]
    layer_of = {}  # block index -> one tensor name with it
    for n in names_shapes:
        if (index := _layer_index(source, n)) is not None:
            layer_of.setdefault(index, n)
    if not layer_of:
        raise SafetensorsError(f"{source}: no transformer blocks (no 'h.N.*' tensors)")
    # the block indices must be exactly 0..n_layer-1: one stray h.999999999.* must not make a
    # model of a billion blocks
    if len(layer_of) != max(layer_of) + 1:
        gap = next(i for i, index in enumerate(sorted(layer_of)) if i != index)
        top = max(layer_of)
        raise SafetensorsError(
            f"{source}: block indices are not 0..n_layer-1: no 'h.{gap}.*' tensors, but there "
            f"is {_r(layer_of[top])}")
    if C % 64:
        raise SafetensorsError(
            f"{source}: n_embd={C} is not a multiple of 64, so n_head cannot be inferred; "
            f"put a config.json beside the file")
    fc = names_shapes.get("h.0.mlp.c_fc.weight")
    n_inner = None
    if fc is not None and len(fc) == 2 and fc[0] == C and fc[1] >= 1 and fc[1] != 4 * C:
        n_inner = int(fc[1])   # any other shape is reported against the config when loading
    try:
        return GPT2Config(n_layer=len(layer_of), n_head=C // 64, n_embd=C, vocab_size=V,
                          n_ctx=T, n_inner=n_inner)
    except ValueError as e:
        raise SafetensorsError(
            f"{source}: the config inferred from 'wte.weight' {(V, C)}, 'wpe.weight' "
            f"{tuple(names_shapes['wpe.weight'])}, 'h.0.mlp.c_fc.weight' {_r(fc)} and "
            f"{len(layer_of)} blocks is impossible: "
            f"{e}") from None


def config_from_metadata(path, metadata: dict) -> GPT2Config | None:
    """The config a gpt2s save stored in the file's __metadata__, or None if there is none."""
    if CONFIG_METADATA_KEY not in metadata:
        return None
    source = f"{path}: __metadata__[{CONFIG_METADATA_KEY!r}]"
    try:
        d = parse_config_json(metadata[CONFIG_METADATA_KEY], source)
        return GPT2Config.from_hf_dict(d, source=source)
    except (ValueError, TypeError) as e:
        msg = str(e)[:len(source) + 300]
        raise SafetensorsError(msg if msg.startswith(source) else f"{source}: {msg}") from None


def _config_from_json(cfg_file: Path) -> GPT2Config:
    size = os.stat(cfg_file).st_size
    if size > _MAX_CONFIG_JSON_BYTES:
        raise ValueError(f"{cfg_file}: {size} bytes is too large for a config.json")
    return GPT2Config.from_json_file(cfg_file)


def layout_of(config) -> list:
    """[(name, shape, offset)] of every parameter of a model of config, GPT-2's
    (`param_layout`) or another family's (its ``param_layout()``)."""
    if isinstance(config, GPT2Config):
        return param_layout(config)[0]
    return config.param_layout()[0]


def count_parameters(config) -> int:
    """The parameters of a model of config (any family)."""
    if isinstance(config, GPT2Config):
        return config.num_parameters()
    return sum(math.prod(shape) for _, shape, _ in layout_of(config))


def match_tensors(path, header: dict, config, expected, *, tied_head: bool = False,
                  what: str = "a parameter of this config") -> dict:
    """{name: header name} for every tensor of the header (under its canonical name): each
    one of ``expected`` (names; ``tied_head``: also an lm_head a tied config does not list)
    or an ignored buffer, of a block the config has, and present once; raises
    SafetensorsError naming the file and the tensor otherwise (``what`` says what the
    tensors should have been).  Which expected tensors are missing is the caller's
    check."""
    seen = {}
    for raw_name in header:
        name = canonical_name(raw_name)
        m = _BLOCK_KEY.match(name)
        if m is not None:
            digits = m.group(1)
            if len(digits) > 9:  # and int() of 5000 digits would raise a bare ValueError
                raise SafetensorsError(f"{path}: tensor {_r(name)} has an impossible block "
                                       f"index")
            if int(digits) >= config.n_layer:
                raise SafetensorsError(
                    f"{path}: unexpected tensor {_r(raw_name)} (block {int(digits)}, but the "
                    f"model has n_layer={config.n_layer} blocks: {config})")
        if _IGNORED.fullmatch(name):
            continue
        is_tied_head = tied_head and name == HEAD and HEAD not in expected
        if not is_tied_head and name not in expected:
            raise SafetensorsError(f"{path}: unexpected tensor {_r(raw_name)} (not {what}: "
                                   f"{config})")
        if name in seen:
            raise SafetensorsError(f"{path}: tensor {_r(name)} appears twice "
                                   f"({_r(seen[name])} and {_r(raw_name)})")
        seen[name] = raw_name
    return seen


def check_against_config(path, header: dict, data_size: int, config: GPT2Config) -> dict:
    """Every parameter of config present in the header exactly once with its shape and a dtype
    we read, nothing else but the ignored buffers and (tied) an lm_head equal in shape to wte;
    returns {parameter name: header name}.  Reads no tensor data and allocates nothing of the model's size."""
    # each parameter takes >= 2 bytes (F16/BF16) of its own in the data section
    n_params = count_parameters(config)
    if 2 * n_params > data_size:
        raise SafetensorsError(
            f"{path}: the config ({config}) has {n_params:,} parameters, at least "
            f"{2 * n_params:,} bytes, but the file holds only {data_size:,} bytes of tensors")
    expected = {name: shape for name, shape, _ in layout_of(config)}
    seen = match_tensors(path, header, config, expected, tied_head=True,
                         what="a GPT-2 parameter of this config" if isinstance(config, GPT2Config)
                         else "a parameter of this config")
    missing = [n for n in expected if n not in seen]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        why = (" (the config has tie_word_embeddings false: the output head is its own tensor)"
               if missing[0] == HEAD else "")
        raise SafetensorsError(f"{path}: missing tensor {missing[0]!r}{more}{why}")
    if HEAD in seen and HEAD not in expected:
        expected[HEAD] = next(iter(expected.values()))   # the embedding's shape
    for name, shape in expected.items():
        check_readable(path, seen[name], header[seen[name]], shape)
    return seen


def check_readable(path, raw_name, info, shape):
    """A tensor's header entry info has a dtype gpt2s reads and the shape expected
    (SafetensorsError naming the file and tensor otherwise); reads no data."""
    dtype = info["dtype"]
    if dtype not in _DTYPES:
        raise SafetensorsError(f"{path}: tensor {_r(raw_name)} has unsupported dtype {_r(dtype)} "
                               f"(gpt2s reads F32, F16 and BF16)")
    if tuple(info["shape"]) != tuple(shape):
        raise SafetensorsError(f"{path}: tensor {_r(raw_name)} has shape "
                               f"{_shape_str(info['shape'])}, expected {tuple(shape)}")


def _convert_into(dst: np.ndarray, raw: memoryview, dtype: str, shape, path, name):
    np_dtype, itemsize = _DTYPES[dtype]
    count = dst.size
    if tuple(shape) != dst.shape or len(raw) != count * itemsize:
        raise SafetensorsError(
            f"{path}: tensor {name!r} has {len(raw)} bytes, expected {count * itemsize} for "
            f"{dtype} {dst.shape}")
    src = np.frombuffer(raw, dtype=np_dtype, count=count).reshape(dst.shape)
    if dtype == "BF16":
        # bfloat16 is the top half of a float32: widen the bits in place into the destination
        bits = dst.view(np.uint32)
        np.left_shift(src, 16, out=bits, dtype=np.uint32)
    else:
        np.copyto(dst, src, casting="unsafe")


def load_into(src: "Tensors", params: dict, config: GPT2Config, progress=None):
    """Copy every parameter from the mapped file(s) straight into its view in params (dict of
    float32 views): no intermediate array of the model's size."""
    header = src.header
    seen = check_against_config(src.file, header, src.data_size, config)
    counter = LoadCounter(progress, config)
    for name, dst in params.items():
        read_tensor(*located(src, seen[name]), dst)
        counter.add(dst.size)
    check_tied_head(src, seen, config)


def located(src: "Tensors", raw_name: str):
    """(path, header, raw_name, data_start, mm): the arguments of read_tensor / read_rows for
    a tensor of src."""
    f, mm, start = src.at(raw_name)
    return f, src.header, raw_name, start, mm


# Rows converted at a time when a big row-major tensor (wte, lm_head) is read in pieces: 1 MiB
# of float32, so a low-precision load never holds a float32 copy of the 160-320 MB embedding
# (4 MiB chunks left a 16 MiB load transient in the peak RSS of an int8 Pythia-160M load: the
# buffer, the chunk's file pages and malloc's retained heap; 1 MiB: 3 MiB, no slower).
CHUNK_ELEMENTS = 1 << 18


def viewable(info: dict, data_start: int, st_dtype: str) -> bool:
    """True when a tensor can be used in place: the file stores it as st_dtype ("F32" or
    "BF16") at an offset aligned to its element size."""
    if info["dtype"] != st_dtype:
        return False
    _, itemsize = _DTYPES[st_dtype]
    begin, end = info["data_offsets"]
    count = int(np.prod(info["shape"], dtype=np.int64))
    return (data_start + begin) % itemsize == 0 and end - begin == count * itemsize


def tensor_view(header: dict, raw_name: str, data_start: int, mm, st_dtype: str):
    """The tensor as a NumPy view of the mapping (no copy: F32 as float32, BF16 as uint16 bits)
    when it is `viewable`; None otherwise (the caller converts it).  Writable when the mapping
    is copy-on-write."""
    info = header[raw_name]
    if not viewable(info, data_start, st_dtype):
        return None
    np_dtype, _ = _DTYPES[st_dtype]
    count = int(np.prod(info["shape"], dtype=np.int64))
    view = np.frombuffer(mm, dtype=np_dtype, count=count, offset=data_start + info["data_offsets"][0])
    return view.reshape(tuple(info["shape"]))


def read_rows(path, header: dict, raw_name: str, data_start: int, mm, dst: np.ndarray,
              row0: int, storage: str = "float32"):
    """Rows row0 .. row0 + len(dst) of a 2-d tensor, converted to float32 into dst and checked
    to fit storage (`check_values`), then the file pages they came from dropped from this
    process's resident set."""
    info = header[raw_name]
    np_dtype, itemsize = _DTYPES[info["dtype"]]
    begin, _ = info["data_offsets"]
    row_bytes = int(info["shape"][1]) * itemsize
    lo = data_start + begin + row0 * row_bytes
    hi = lo + dst.shape[0] * row_bytes
    raw = memoryview(mm)[lo:hi]
    try:
        _convert_into(dst, raw, info["dtype"], dst.shape, path, raw_name)
    finally:
        raw.release()
    drop_pages(mm, lo, hi)
    check_values(path, raw_name, dst, storage, first=row0 * dst.shape[1],
                 shape=tuple(info["shape"]))


def row_chunks(rows: int, cols: int):
    """(start, stop) row ranges of about CHUNK_ELEMENTS elements covering rows."""
    step = max(1, CHUNK_ELEMENTS // max(cols, 1))
    return [(r, min(r + step, rows)) for r in range(0, rows, step)]


def rows_equal(where_a, where_b, shape) -> bool:
    """Whether two 2-d tensors of shape (`located` / read_rows argument tuples, first a then
    b) hold the same values, read a chunk of rows at a time (no copy of either); each is first
    checked readable at that shape."""
    for path, header, raw_name, _, _ in (where_a, where_b):
        check_readable(path, raw_name, header[raw_name], shape)
    chunks = row_chunks(*shape)
    a_buf = np.empty((chunks[0][1] if chunks else 0, shape[1]), np.float32)
    b_buf = np.empty_like(a_buf)
    for r0, r1 in chunks:
        a, b = a_buf[:r1 - r0], b_buf[:r1 - r0]
        read_rows(*where_a, a, r0)
        read_rows(*where_b, b, r0)
        if not np.array_equal(a, b):
            return False
    return True


def check_tied_head(src: "Tensors", seen: dict, config: GPT2Config):
    """A tied model's file may also hold lm_head.weight (transformers saves it for some
    configs): it must equal wte.weight.  Compared a chunk of rows at a time."""
    if HEAD not in seen or not config.tie_word_embeddings:
        return
    raw_wte, raw_head = seen[layout_of(config)[0][0]], seen[HEAD]   # the embedding, the head
    path = src.at(raw_head)[0]
    if not rows_equal(located(src, raw_wte), located(src, raw_head),
                      tuple(src.header[raw_wte]["shape"])):
        raise SafetensorsError(
            f"{path}: tensor {raw_head!r} differs from 'wte.weight', but the config ties the "
            f"output head to the token embedding (tie_word_embeddings true, GPT-2's default); "
            f"an untied model needs a config.json with \"tie_word_embeddings\": false")


def drop_pages(mm, lo: int, hi: int):
    """Let the kernel drop the whole file pages inside [lo, hi) of the mapping, once their
    tensor has been converted: they would otherwise stay in this process's resident set until
    the mapping closes, and a low-precision load would peak at the file's size plus the
    compressed model.  Pages shared with a neighbouring tensor are kept."""
    if not isinstance(mm, mmap.mmap) or not hasattr(mm, "madvise"):
        return
    lo = -(-lo // mmap.PAGESIZE) * mmap.PAGESIZE
    hi = hi // mmap.PAGESIZE * mmap.PAGESIZE
    if hi > lo:
        try:
            mm.madvise(mmap.MADV_DONTNEED, lo, hi - lo)
        except (OSError, ValueError, AttributeError):
            pass


def drop_tensor_pages(mm, data_start: int, info: dict):
    begin, end = info["data_offsets"]
    drop_pages(mm, data_start + begin, data_start + end)


def read_tensor(path, header, raw_name, data_start, mm, dst, storage: str = "float32"):
    """One tensor converted to float32 into dst (its shape checked against the file's), its
    values checked to fit storage (`check_values`)."""
    info = header[raw_name]
    check_readable(path, raw_name, info, dst.shape)
    begin, end = info["data_offsets"]
    raw = memoryview(mm)[data_start + begin:data_start + end]
    try:
        _convert_into(dst, raw, info["dtype"], info["shape"], path, raw_name)
    finally:
        raw.release()
    check_values(path, raw_name, dst, storage)


# Elements checked at a time: the reductions stay in the L2 cache, no tensor-sized temporary.
VALUE_CHUNK = 1 << 16


def check_values(path, raw_name: str, values: np.ndarray, storage: str = "float32", *,
                 first: int = 0, shape=None):
    """Refuse (SafetensorsError naming the file, the tensor and the first bad index) a NaN, an
    infinity, or a value beyond what the weight type storage ("float32", "bfloat16", ...)
    holds (its max_abs) among float32 values (a tensor, or the part of it from flat index
    first on, of shape shape).  Two reductions (min, max) a chunk at a time: the data is read
    once."""
    from .weight_types import get
    limit = get(storage).max_abs
    flat = values.reshape(-1)
    for start in range(0, flat.size, VALUE_CHUNK):
        chunk = flat[start:start + VALUE_CHUNK]
        if chunk.min() >= -limit and chunk.max() <= limit:   # False for NaN
            continue
        bad = start + int(np.flatnonzero(~(np.abs(chunk) <= limit))[0])
        value = float(flat[bad])
        at = np.unravel_index(first + bad, shape if shape is not None else values.shape)
        where = f"{path}: tensor {raw_name!r} holds {value!r} at index {tuple(map(int, at))}"
        if not math.isfinite(value):
            raise SafetensorsError(f"{where}: a weight must be a finite number (the file is "
                                   f"broken)")
        raise SafetensorsError(f"{where}, beyond the largest magnitude {storage} weights hold "
                               f"({limit:.7g}); load it with a wider dtype")


def check_bfloat16_bits(path, raw_name: str, bits: np.ndarray):
    """check_values for a tensor of bfloat16 bits (uint16) used in place: the exponent bits all
    set (bits & 0x7f80 == 0x7f80) is an infinity or a NaN."""
    flat = bits.reshape(-1)
    exponent = np.empty(min(VALUE_CHUNK, flat.size), np.uint16)
    for start in range(0, flat.size, VALUE_CHUNK):
        chunk = flat[start:start + VALUE_CHUNK]
        masked = np.bitwise_and(chunk, 0x7F80, out=exponent[:chunk.size])
        if masked.max() != 0x7F80:
            continue
        bad = start + int(np.flatnonzero(masked == 0x7F80)[0])
        value = float(np.array(int(flat[bad]) << 16, np.uint32).view(np.float32))
        at = tuple(map(int, np.unravel_index(bad, bits.shape)))
        raise SafetensorsError(f"{path}: tensor {raw_name!r} holds {value!r} at index {at}: a "
                               f"weight must be a finite number (the file is broken)")


def open_mapped(path: Path, copy_on_write: bool = False):
    """(mmap, {name: info}, metadata, data_start) of a safetensors file whose header has been
    validated against it; the caller closes the mmap.  copy_on_write maps the file privately
    and writable (MAP_PRIVATE: a write copies that page for this process, the file is never
    changed), for parameters that are views of the mapping.  The file is opened non-blocking and
    checked to be a regular file on the open descriptor (no FIFO swapped in after a stat)."""
    flags = os.O_RDONLY | getattr(os, "O_BINARY", 0) | getattr(os, "O_NONBLOCK", 0) \
        | getattr(os, "O_NOCTTY", 0) | getattr(os, "O_CLOEXEC", 0)
    fd = os.open(path, flags)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise _not_regular(path, st.st_mode)
        if st.st_size < 8:
            raise SafetensorsError(f"{path}: not a safetensors file ({st.st_size} bytes, "
                                   f"too short)")
        try:
            mm = mmap.mmap(fd, 0,
                           access=mmap.ACCESS_COPY if copy_on_write else mmap.ACCESS_READ)
        except OSError as e:
            if e.errno != errno.ENOMEM:
                raise
            raise MemoryError from None   # no address space left for the mapping
    finally:
        os.close(fd)
    try:
        # validated against the mapping's own length, in case the file changed since fstat
        header, metadata, data_start = _parse_header(path, len(mm), mm)
    except BaseException:
        mm.close()
        raise
    return mm, header, metadata, data_start


INDEX_FILE = "model.safetensors.index.json"   # a sharded checkpoint's index (transformers')
_MAX_INDEX_BYTES = 64 << 20
_SHARD_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*\.safetensors\Z")


class Tensors:
    """The tensors of a model: one mapped safetensors file, or the shards of a sharded
    checkpoint (``model.safetensors.index.json`` + ``model-0000X-of-0000N.safetensors``), each
    mapped and validated.  ``file`` names the model in messages (the file, or the index),
    ``header`` maps every tensor name to its entry, ``metadata`` is the (first) file's
    __metadata__, ``data_size`` the bytes of tensor data of all files; ``at(name)`` gives
    (the file holding it, its mapping, its data start) for the readers of this module.
    ``close()`` closes every mapping."""

    def __init__(self, file: Path, parts: list, where: dict | None = None):
        self.file = file
        self._parts = parts            # [(file, mm, header, metadata, data_start)]
        self._where = where            # name -> index into parts (None: one file)
        self.header = {}
        for f, mm, header, metadata, start in parts:
            self.header.update(header)
        self.metadata = parts[0][3]
        self.data_size = sum(len(mm) - start for _, mm, _, _, start in parts)

    @property
    def sharded(self) -> bool:
        return self._where is not None

    @property
    def maps(self) -> list:
        return [mm for _, mm, _, _, _ in self._parts]

    def at(self, name: str):
        """(file, mmap, data_start) of the file that holds tensor name."""
        f, mm, _, _, start = self._parts[0 if self._where is None else self._where[name]]
        return f, mm, start

    def close(self):
        for mm in self.maps:
            try:
                mm.close()
            except BufferError:   # a view is still held (by a traceback): freed with it
                pass


def open_tensors(path, copy_on_write: bool = False) -> Tensors:
    """`Tensors` of a resolved model file (`resolve_model_path`): a .safetensors file, or a
    sharded checkpoint's index, whose shards are opened and checked against it: every shard
    it names exists beside it (a plain file name, never a path out of the directory), every
    tensor is in the shard the index names and appears once, and the shards agree on their
    __metadata__.  Raises SafetensorsError naming the index, the shard and the tensor."""
    path = Path(path)
    if path.name != INDEX_FILE:
        mm, header, metadata, data_start = open_mapped(path, copy_on_write)
        return Tensors(path, [(path, mm, header, metadata, data_start)])
    weight_map = read_index(path)
    shards = list(dict.fromkeys(weight_map.values()))
    parts, where, opened = [], {}, {}
    try:
        for i, shard in enumerate(shards):
            f = path.parent / shard
            if not os.path.lexists(f):
                held = sum(1 for v in weight_map.values() if v == shard)
                raise SafetensorsError(f"{path}: shard {shard!r} (holding {held} of the "
                                       f"tensors) is missing from {path.parent}")
            mm, header, metadata, data_start = open_mapped(f, copy_on_write)
            parts.append((f, mm, header, metadata, data_start))
            for name in header:
                if name in opened:
                    raise SafetensorsError(f"{f}: tensor {_r(name)} is also in shard "
                                           f"{opened[name]!r}")
                opened[name] = shard
                listed = weight_map.get(name)
                if listed is None:
                    raise SafetensorsError(f"{f}: tensor {_r(name)} is not in {path}'s "
                                           f"weight_map")
                if listed != shard:
                    raise SafetensorsError(f"{path}: tensor {_r(name)} is in shard {shard!r}, "
                                           f"but the index says {listed!r}")
                where[name] = i
            if metadata != parts[0][3]:
                raise SafetensorsError(f"{f}: its __metadata__ differs from {parts[0][0].name}'s"
                                       f": the shards are not of one model")
        for name, shard in weight_map.items():
            if name not in opened:
                raise SafetensorsError(f"{path}: tensor {_r(name)} is not in shard {shard!r}, "
                                       f"where the index says it is")
    except BaseException:
        for p in parts:
            p[1].close()
        raise
    if not parts:
        raise SafetensorsError(f"{path}: the weight_map names no tensor")
    return Tensors(path, parts, where)


def read_index(path) -> dict:
    """The weight_map (tensor name -> shard file name) of a model.safetensors.index.json."""
    path = Path(path)
    if os.stat(path).st_size > _MAX_INDEX_BYTES:
        raise SafetensorsError(f"{path}: too large for an index of shards")
    try:
        d = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise SafetensorsError(f"{path}: not a JSON index of shards ({e})") from None
    weight_map = d.get("weight_map") if isinstance(d, dict) else None
    if not isinstance(weight_map, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()):
        raise SafetensorsError(f"{path}: no \"weight_map\" object of tensor names to shard "
                               f"file names")
    for name, shard in weight_map.items():
        if not _SHARD_NAME.match(shard):
            raise SafetensorsError(f"{path}: tensor {_r(name)} is in shard {_r(shard)}, not a "
                                   f".safetensors file name beside the index")
    return weight_map


def open_model(path, copy_on_write: bool = False):
    """(tensors, config, storage, packed) for a model file or directory (`Tensors`: one file
    or the shards of a sharded checkpoint), everything validated; the caller allocates the
    model, calls load_into (or the packed loader) and closes the mappings.  ``storage`` is the name of the weight type the file
    stores its matmul weights in ("float32" unless gpt2s saved it in another), ``packed`` that
    `WeightType` when the file is a packed gpt2s file (gpt2s/packed.py), else None.

    The config comes from config.json beside the directory's model.safetensors, else from the
    file's __metadata__ (gpt2s saves), else from the tensor shapes."""
    from . import packed as _packed
    file, cfg_file = resolve_model_path(path)
    src = open_tensors(file, copy_on_write)
    header, metadata = src.header, src.metadata
    try:
        storage, packed = _packed.file_storage(file, metadata)
        if cfg_file is not None:
            config = _config_from_json(cfg_file)
            _packed.check_quantization_config(cfg_file, file, storage, packed)
        else:
            config = config_from_metadata(file, metadata)
        if config is None:
            if packed is not None:
                raise SafetensorsError(
                    f"{file}: a packed {packed.name} file without its config (no config.json "
                    f"beside it, no {CONFIG_METADATA_KEY!r} in its __metadata__)")
            shapes = {canonical_name(raw): tuple(info["shape"]) for raw, info in header.items()}
            config = infer_config(shapes, str(file))
        if packed is not None:
            _packed.check_against_config(file, header, src.data_size, config, packed)
        else:
            check_against_config(file, header, src.data_size, config)
    except BaseException:
        src.close()
        raise
    return src, config, storage, packed


def file_storage(path) -> str:
    """The weight type a model file or directory stores its matmul weights in: "float32" for
    any file not saved by gpt2s in another type (the header is read and checked, no tensor)."""
    from . import packed as _packed
    file, _ = resolve_model_path(path)
    src = open_tensors(file)
    try:
        return _packed.file_storage(file, src.metadata)[0]
    finally:
        src.close()


def load_parameters(path, dtype: str | None = None, *, mmap: bool = True, progress=None):
    """The `ParameterStore` (of dtype, its config ``store.config``) of a model file or
    directory: what `GPT2.from_safetensors` does (its docstring states the rules: which
    tensors are viewed in place, which converted, the errors).  dtype None is the file's own
    storage (`file_storage`).  A store whose parameters view the file keeps the mapping open
    (`ParameterStore.mapped`); otherwise it is closed before returning.  ``progress(done,
    total)`` is called after each tensor with the parameters loaded so far and in all."""
    # imported here: params imports this module's layout
    from . import packed as _packed
    from . import weight_types as _wt
    from .params import ParameterStore
    if dtype is not None:
        _wt.check_dtype(dtype)
    file, config = path, None
    try:
        # validated, nothing allocated
        src, config, storage, packed = open_model(path, copy_on_write=bool(mmap))
        file = src.file
        if dtype is None:
            dtype = storage
        try:
            if packed is not None:
                store = ParameterStore(config, dtype, allocate=dtype == "float32")
                viewed = _packed.load_tensors(store, src, packed, bool(mmap), progress)
            else:
                # a float32 model whose file has no tensor to view reads into its one buffer
                into_buffer = dtype == "float32" and not (
                    mmap and any(viewable(info, src.at(name)[2], "F32")
                                 for name, info in src.header.items()))
                store = ParameterStore(config, dtype, allocate=into_buffer)
                if into_buffer:
                    load_into(src, store.params, config, progress)
                    viewed = False
                else:
                    viewed = _load_tensors(store, src, bool(mmap), progress)
        except BaseException:
            store = None
            src.close()   # (a view still held by the traceback is freed with it)
            raise
    except MemoryError:
        size = f" ({config.num_parameters():,} parameters)" if config is not None else ""
        raise SafetensorsError(
            f"{file}: not enough memory to load it as {dtype}{size}") from None
    if viewed:
        store.keep_mapping(src)
    else:
        src.close()
    return store


class LoadCounter:
    """Counts the parameters loaded for a ``progress(done, total)`` callback (or none)."""

    def __init__(self, callback, config: GPT2Config):
        self.callback, self.done, self.total = callback, 0, count_parameters(config)

    def add(self, n: int):
        if self.callback is not None:
            self.done = min(self.total, self.done + int(n))
            self.callback(self.done, self.total)


def _load_tensors(store, src: "Tensors", mmap: bool, progress=None) -> bool:
    """Fill the store's params from the file, each tensor a view of the mapping when it can
    be (mmap and the file's dtype is the storage's), else converted, one tensor or a few
    embedding rows at a time, with the file pages of what was converted dropped as it goes.
    Returns True when some parameter views the mapping."""
    from . import weight_types as _wt
    dtype = store.dtype
    header = src.header
    seen = check_against_config(src.file, header, src.data_size, store.config)
    counter = LoadCounter(progress, store.config)
    viewed = False
    # one float32 scratch for every tensor converted: a temporary per tensor would leave
    # the heap full of freed holes between the compressed weights (+300 MiB of resident
    # memory over GPT-2 XL's 48 blocks)
    scratch = np.empty(0, np.float32)

    def temporary(shape):
        nonlocal scratch
        size = int(np.prod(shape))
        if scratch.size < size:
            scratch = np.empty(0, np.float32)   # (the old one freed first)
            scratch = np.empty(size, np.float32)
        return scratch[:size].reshape(shape)

    for name in list(store.params):
        raw = seen[name]
        info = header[raw]
        file, mm, data_start = src.at(raw)
        shape = store.params[name].shape
        compressed = dtype != "float32" and _wt.is_compressed(name)
        # the file dtype a parameter can be used in place from
        want = "F32" if dtype == "float32" else \
            "BF16" if compressed and dtype == "bfloat16" else None
        view = tensor_view(header, raw, data_start, mm, want) if mmap and want else None
        if view is not None:
            viewed = True
            if compressed:
                check_bfloat16_bits(file, raw, view)
                store.set_param(name, _wt.get(dtype).from_stored(name, view))
            else:
                check_values(file, raw, view)
                store.set_param(name, view)
            counter.add(math.prod(shape))
            continue
        # values the storage cannot hold are refused as they are read, before compressing
        storage = dtype if compressed else "float32"
        if compressed and _wt.is_row_major(name):
            w = _wt.get(dtype).empty(name, shape)
            for r0, r1 in row_chunks(*shape):
                rows = temporary((r1 - r0, shape[1]))
                read_rows(file, header, raw, data_start, mm, rows, r0, storage)
                _wt.get(dtype).compress_rows_into(name, w, r0, rows)
            store.set_param(name, w)
        elif compressed:
            tmp = temporary(shape)
            read_tensor(file, header, raw, data_start, mm, tmp, storage)
            store.set_param(name, _wt.get(dtype).compress(name, tmp))
        elif dtype == "float32":   # no buffer: the tensors not viewed get arrays of their own
            tmp = np.empty(shape, np.float32)
            read_tensor(file, header, raw, data_start, mm, tmp)
            store.set_param(name, tmp)
        else:                      # a small tensor of a compressed model, into its buffer
            read_tensor(file, header, raw, data_start, mm, store.params[name])
        drop_tensor_pages(mm, data_start, info)
        counter.add(math.prod(shape))
    check_tied_head(src, seen, store.config)
    return viewed


# ------------------------------------------------------------------------------------------
# Writing


_SAVE_DTYPES = {"float32": "F32", "float16": "F16", "bfloat16": "BF16"}


def save_safetensors(path, params: dict, config: GPT2Config, prefix: str = "transformer.",
                     dtype: str = "float32", storage: str | None = None,
                     max_shard_size=None):
    """Write the parameters as a safetensors file (and config.json when path is a directory or
    ends without .safetensors), in float32, float16 or bfloat16 (rounded to nearest even).
    The file's __metadata__ carries the config too (as config.json's JSON text), so a lone
    .safetensors file loads back with its n_head and layer_norm_epsilon.  Files are written
    to a temporary name and renamed, so an interrupted save never leaves a half-written model
    behind.

    ``storage`` (a weight type other than float32) writes the matmul weights in that type's
    stored form instead, the other tensors in float32 (dtype is then ignored): bfloat16 as
    BF16 tensors in a file any safetensors reader loads, a blocked type (int8, int4) as a
    packed gpt2s file (gpt2s/packed.py).  A weight stored in another type is converted, one
    tensor at a time.

    ``max_shard_size`` (bytes, or a string such as "2GB", "500MB", "1GiB"; a directory
    only): a model whose tensors take more is written as transformers' ``save_pretrained``
    shards it: ``model-00001-of-0000N.safetensors`` .. (tensors in order, a new shard when
    the next one would pass the size; a larger tensor alone in its shard) and
    ``model.safetensors.index.json`` naming each tensor's shard.  Whichever form is written,
    the other one's files left by an earlier save in the directory are removed."""
    from . import packed as _packed
    if storage is not None and storage != "float32":
        entries, metadata, quant = _packed.save_entries(params, config, prefix, storage)
    else:
        if dtype not in _SAVE_DTYPES:
            raise ValueError(f"dtype must be one of {sorted(_SAVE_DTYPES)}, got {dtype!r}")
        st_dtype = _SAVE_DTYPES[dtype]
        entries = [((name if name == HEAD else prefix + name), st_dtype, tuple(arr.shape),
                    arr.size * _DTYPES[st_dtype][1],
                    lambda arr=arr: _encode(arr, st_dtype))
                   for name, arr in params.items()]
        metadata = {"format": "pt", CONFIG_METADATA_KEY: json.dumps(config.to_hf_dict())}
        quant = None
    p = Path(path)
    limit = None if max_shard_size is None else parse_size(max_shard_size)
    if p.suffix == ".safetensors":
        if limit is not None:
            raise ValueError(f"{p}: max_shard_size shards a model into a directory, not a "
                             f"single .safetensors file")
        p.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(p, lambda f: _write_tensors(f, entries, metadata))
        return p
    p.mkdir(parents=True, exist_ok=True)
    shards = _shard(entries, limit)
    if len(shards) == 1:
        atomic_write(p / "model.safetensors", lambda f: _write_tensors(f, entries, metadata))
        _remove_stale(p, keep=())
    else:
        names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
                 for i in range(len(shards))]
        for name, part in zip(names, shards):
            atomic_write(p / name, lambda f, part=part: _write_tensors(f, part, metadata))
        index = {"metadata": {"total_size": sum(e[3] for e in entries)},
                 "weight_map": {e[0]: name for name, part in zip(names, shards)
                                for e in part}}
        text = (json.dumps(index, indent=2, sort_keys=True) + "\n").encode()
        atomic_write(p / INDEX_FILE, lambda f: f.write(text))
        _remove_stale(p, keep=names)
    cfg = config.to_hf_dict()
    if quant is not None:
        cfg["quantization_config"] = quant
    text = json.dumps(cfg, indent=2).encode()
    atomic_write(p / "config.json", lambda f: f.write(text))
    return p


_SIZE_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
               "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(size) -> int:
    """Bytes from an int or a string such as "5GB" (10^9, as transformers reads it), "500MB",
    "1GiB" (2^30)."""
    if isinstance(size, (int, np.integer)) and not isinstance(size, bool):
        n = int(size)
    else:
        m = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([KMGT]i?B|B)?\s*", str(size),
                         re.IGNORECASE)
        if m is None:
            raise ValueError(f"max_shard_size={size!r}: need a number of bytes or a size such "
                             f"as '2GB', '500MB'")
        n = int(float(m.group(1)) * _SIZE_UNITS[(m.group(2) or "").upper()])
    if n <= 0:
        raise ValueError(f"max_shard_size={size!r}: must be positive")
    return n


def _shard(entries, limit):
    """entries split into shards of at most limit bytes each (a larger tensor alone), in
    order; one shard when limit is None."""
    if limit is None:
        return [entries]
    shards, size = [[]], 0
    for e in entries:
        if shards[-1] and size + e[3] > limit:
            shards.append([])
            size = 0
        shards[-1].append(e)
        size += e[3]
    return shards


_SHARD_FILE = re.compile(r"model-[0-9]{5}-of-[0-9]{5}\.safetensors\Z")


def _remove_stale(directory: Path, keep):
    """After a save: the other form's files an earlier save left (model.safetensors beside
    new shards; the index and shards beside a new model.safetensors), plain files only."""
    stale = [n for n in os.listdir(directory)
             if (_SHARD_FILE.match(n) and n not in keep) or
             (n == INDEX_FILE and not keep) or (n == "model.safetensors" and keep)]
    for name in stale:
        f = directory / name
        if f.is_file() and not f.is_symlink():
            f.unlink()


def _encode(arr: np.ndarray, st_dtype: str) -> np.ndarray:
    if st_dtype == "F32":
        return np.ascontiguousarray(arr, dtype="<f4")
    if st_dtype == "F16":
        return np.ascontiguousarray(arr, dtype="<f2")
    # bfloat16: the top 16 bits of the float32, rounded to nearest even
    bits = np.ascontiguousarray(arr, dtype="<f4").view(np.uint32)
    rounded = bits + (np.uint32(0x7FFF) + ((bits >> 16) & np.uint32(1)))
    return (rounded >> 16).astype("<u2")


def _write_tensors(f, entries, metadata: dict):
    """Write a safetensors file: entries are (key, dtype, shape, bytes, make) in file order,
    make() giving the tensor's bytes as a contiguous array, called once per tensor when its
    turn comes (so a converted tensor exists one at a time)."""
    header, offset = {}, 0
    for key, st_dtype, shape, nbytes, _ in entries:
        header[key] = {"dtype": st_dtype, "shape": list(shape),
                       "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    header["__metadata__"] = metadata
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data section starts 8-byte aligned
    f.write(struct.pack("<Q", len(raw)))
    f.write(raw)
    for key, _, _, nbytes, make in entries:
        arr = np.ascontiguousarray(make())
        if arr.nbytes != nbytes:   # a bug, never a file with a wrong header
            raise AssertionError(f"tensor {key!r}: {arr.nbytes} bytes, header says {nbytes}")
        f.write(arr.data.cast("B") if arr.size else b"")
