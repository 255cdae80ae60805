"""safetensors <-> the parameter buffer, in Hugging Face's GPT-2 key layout.

We read and write the safetensors format ourselves (an 8-byte little-endian header length, a
JSON header, then raw little-endian tensor bytes) rather than through the ``safetensors``
package, because:

* each tensor is converted from the memory-mapped file straight into its view of the one
  float32 parameter buffer — no dict of intermediate arrays, so loading never holds two full
  float32 copies of the model;
* BF16 needs no torch (NumPy has no bfloat16: we widen the 16 bits into float32 ourselves);
* every problem can name the file and the tensor (missing, wrong shape, unknown dtype,
  truncated data, not a safetensors file).
"""

from __future__ import annotations

import json
import mmap
import os
import re
import struct
import tempfile
from pathlib import Path

import numpy as np

from .config import GPT2Config

__all__ = [
    "param_layout", "read_safetensors_header", "load_into", "infer_config",
    "resolve_model_path", "save_safetensors", "SafetensorsError",
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
_IGNORED = re.compile(r"h\.\d+\.attn\.(bias|masked_bias)")
_LAYER_KEY = re.compile(r"h\.(\d+)\.")

HEAD = "lm_head.weight"  # the output head's key: never under the "transformer." prefix

_DTYPES = {"F32": (np.dtype("<f4"), 4), "F16": (np.dtype("<f2"), 2), "BF16": (np.dtype("<u2"), 2)}


class SafetensorsError(ValueError):
    """A safetensors file that gpt2s cannot use; the message names the file and tensor."""


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
        size = int(np.prod(shape))
        offset += (size + ALIGN - 1) // ALIGN * ALIGN
    return layout, offset


# ------------------------------------------------------------------------------------------
# Reading


def resolve_model_path(path) -> tuple[Path, Path | None]:
    """(the .safetensors file, config.json or None) for a file or a model directory."""
    p = Path(path)
    if p.is_dir():
        f = p / "model.safetensors"
        if not f.is_file():
            raise FileNotFoundError(f"{p}: directory has no model.safetensors")
        cfg = p / "config.json"
        return f, (cfg if cfg.is_file() else None)
    if not p.exists():
        from .hub import pretrained_hint
        raise FileNotFoundError(f"{p}: no such file or directory{pretrained_hint(path)}")
    cfg = p.parent / "config.json"
    # a config.json beside a file counts only when the file is the directory's model.safetensors
    return p, (cfg if p.name == "model.safetensors" and cfg.is_file() else None)


def read_safetensors_header(path: Path, file_size: int, head: bytes) -> tuple[dict, int]:
    """Parse and validate the header; returns ({name: info}, offset of the data section)."""
    if file_size < 8:
        raise SafetensorsError(f"{path}: not a safetensors file ({file_size} bytes, too short)")
    (n,) = struct.unpack("<Q", head[:8])
    if n == 0 or n > 100_000_000:
        raise SafetensorsError(f"{path}: not a safetensors file (header length {n})")
    if 8 + n > file_size:
        raise SafetensorsError(
            f"{path}: truncated or not a safetensors file (header of {n} bytes, "
            f"file has {file_size})")
    raw = head[8:8 + n]
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise SafetensorsError(f"{path}: not a safetensors file (header is not JSON: {e})") \
            from None
    if not isinstance(header, dict):
        raise SafetensorsError(f"{path}: not a safetensors file (header is not a JSON object)")
    header.pop("__metadata__", None)
    data_start = 8 + n
    data_size = file_size - data_start
    for name, info in header.items():
        if not (isinstance(info, dict) and "dtype" in info and "shape" in info
                and "data_offsets" in info):
            raise SafetensorsError(f"{path}: corrupt header entry for tensor {name!r}")
        offsets, dtype, shape = info["data_offsets"], info["dtype"], info["shape"]
        if not (isinstance(offsets, list) and len(offsets) == 2
                and all(type(o) is int for o in offsets)):
            raise SafetensorsError(f"{path}: tensor {name!r} has corrupt data offsets "
                                   f"{offsets!r} (expected two integers)")
        if not isinstance(dtype, str):
            raise SafetensorsError(f"{path}: tensor {name!r} has a corrupt dtype {dtype!r}")
        if not (isinstance(shape, list) and all(type(d) is int and d >= 0 for d in shape)):
            raise SafetensorsError(f"{path}: tensor {name!r} has a corrupt shape {shape!r}")
        begin, end = offsets
        if not (0 <= begin <= end):
            raise SafetensorsError(f"{path}: tensor {name!r} has corrupt data offsets "
                                   f"{info['data_offsets']}")
        if end > data_size:
            raise SafetensorsError(
                f"{path}: truncated file: tensor {name!r} needs bytes {begin}..{end} of the "
                f"data section but only {data_size} are present")
    return header, data_start


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
            raise SafetensorsError(f"{source}: tensor {name!r} has shape {tuple(shape)}, "
                                   f"expected 2-D with no zero-sized dimension")
    V, C = names_shapes["wte.weight"]
    T = names_shapes["wpe.weight"][0]
    layers = {int(m.group(1)) for n in names_shapes if (m := _LAYER_KEY.match(n))}
    if not layers:
        raise SafetensorsError(f"{source}: no transformer blocks (no 'h.N.*' tensors)")
    if C % 64:
        raise SafetensorsError(
            f"{source}: n_embd={C} is not a multiple of 64, so n_head cannot be inferred; "
            f"put a config.json beside the file")
    fc = names_shapes.get("h.0.mlp.c_fc.weight")
    n_inner = None
    if fc is not None and len(fc) == 2 and fc[0] == C and fc[1] >= 1 and fc[1] != 4 * C:
        n_inner = int(fc[1])   # any other shape is reported against the config when loading
    return GPT2Config(n_layer=max(layers) + 1, n_head=C // 64, n_embd=C, vocab_size=V, n_ctx=T,
                      n_inner=n_inner)


def _convert_into(dst: np.ndarray, raw: memoryview, dtype: str, shape, path, name):
    np_dtype, itemsize = _DTYPES[dtype]
    count = int(np.prod(shape))
    if len(raw) != count * itemsize:
        raise SafetensorsError(
            f"{path}: tensor {name!r} has {len(raw)} bytes, expected {count * itemsize} for "
            f"{dtype} {tuple(shape)}")
    src = np.frombuffer(raw, dtype=np_dtype, count=count).reshape(shape)
    if dtype == "BF16":
        # bfloat16 is the top half of a float32: widen the bits in place into the destination
        bits = dst.view(np.uint32)
        np.left_shift(src, 16, out=bits, dtype=np.uint32)
    else:
        np.copyto(dst, src, casting="unsafe")


def load_into(path: Path, header: dict, data_start: int, mm, params: dict, config: GPT2Config,
              store=None):
    """Copy every parameter from the mapped file into params (dict of float32 views).  With
    store, params only gives the names and shapes: each tensor is read into a float32
    temporary, one at a time, and handed to store(name, array) (low-precision models)."""
    seen = {}
    for raw_name, info in header.items():
        name = canonical_name(raw_name)
        if _IGNORED.fullmatch(name):
            continue
        if name == HEAD and HEAD not in params:   # tied: checked against wte below
            seen[name] = raw_name
            continue
        if name not in params:
            raise SafetensorsError(f"{path}: unexpected tensor {raw_name!r} (not a GPT-2 "
                                   f"parameter of this config: {config})")
        if name in seen:
            raise SafetensorsError(f"{path}: tensor {name!r} appears twice "
                                   f"({seen[name]!r} and {raw_name!r})")
        seen[name] = raw_name
    missing = [n for n in params if n not in seen]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        why = (" (the config has tie_word_embeddings false: the output head is its own tensor)"
               if missing[0] == HEAD else "")
        raise SafetensorsError(f"{path}: missing tensor {missing[0]!r}{more}{why}")

    for name, dst in params.items():
        if store is None:
            _read_tensor(path, header, seen[name], data_start, mm, dst)
        else:
            tmp = np.empty(dst.shape, np.float32)
            _read_tensor(path, header, seen[name], data_start, mm, tmp)
            store(name, tmp)
            del tmp
            _drop_pages(mm, data_start, header[seen[name]])

    if HEAD in seen and HEAD not in params:
        raw_name = seen[HEAD]
        wte = params["wte.weight"]
        if store is not None:
            wte = np.empty(wte.shape, np.float32)
            _read_tensor(path, header, seen["wte.weight"], data_start, mm, wte)
        lm = np.empty(wte.shape, np.float32)
        _read_tensor(path, header, raw_name, data_start, mm, lm)
        if not np.array_equal(lm, wte):
            raise SafetensorsError(
                f"{path}: tensor {raw_name!r} differs from 'wte.weight', but the config ties the "
                f"output head to the token embedding (tie_word_embeddings true, GPT-2's default); "
                f"an untied model needs a config.json with \"tie_word_embeddings\": false")


def _drop_pages(mm, data_start: int, info: dict):
    """Let the kernel drop the file pages of a tensor already converted (they would otherwise
    stay in this process's resident set until the mapping closes: a low-precision load would
    peak at the file's size plus the compressed model)."""
    if not isinstance(mm, mmap.mmap) or not hasattr(mm, "madvise"):
        return
    begin, end = info["data_offsets"]
    lo = (data_start + begin) // mmap.PAGESIZE * mmap.PAGESIZE
    hi = (data_start + end) // mmap.PAGESIZE * mmap.PAGESIZE   # whole pages only
    if hi > lo:
        try:
            mm.madvise(mmap.MADV_DONTNEED, lo, hi - lo)
        except (OSError, ValueError, AttributeError):
            pass


def _read_tensor(path, header, raw_name, data_start, mm, dst):
    info = header[raw_name]
    dtype, shape = info["dtype"], tuple(info["shape"])
    if dtype not in _DTYPES:
        raise SafetensorsError(f"{path}: tensor {raw_name!r} has unsupported dtype {dtype!r} "
                               f"(gpt2s reads F32, F16 and BF16)")
    if shape != dst.shape:
        raise SafetensorsError(f"{path}: tensor {raw_name!r} has shape {shape}, expected "
                               f"{dst.shape}")
    begin, end = info["data_offsets"]
    raw = memoryview(mm)[data_start + begin:data_start + end]
    try:
        _convert_into(dst, raw, dtype, shape, path, raw_name)
    finally:
        raw.release()


def open_mapped(path: Path):
    """(mmap, header, data_start) of a safetensors file; the caller closes the mmap."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) == 8:
            (n,) = struct.unpack("<Q", head)
            if 0 < n <= 100_000_000 and 8 + n <= size:
                head += f.read(n)
        header, data_start = read_safetensors_header(path, size, head)
        mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) if size > 0 else b""
    return mm, header, data_start


# ------------------------------------------------------------------------------------------
# Writing


_SAVE_DTYPES = {"float32": "F32", "float16": "F16", "bfloat16": "BF16"}


def save_safetensors(path, params: dict, config: GPT2Config, prefix: str = "transformer.",
                     dtype: str = "float32"):
    """Write the parameters as a safetensors file (and config.json when path is a directory or
    ends without .safetensors), in float32, float16 or bfloat16 (rounded to nearest even).
    Files are written to a temporary name and renamed, so an interrupted save never leaves a
    half-written model behind."""
    if dtype not in _SAVE_DTYPES:
        raise ValueError(f"dtype must be one of {sorted(_SAVE_DTYPES)}, got {dtype!r}")
    st_dtype = _SAVE_DTYPES[dtype]
    p = Path(path)
    if p.suffix == ".safetensors":
        p.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(p, lambda f: _write_tensors(f, params, prefix, st_dtype))
        return p
    p.mkdir(parents=True, exist_ok=True)
    atomic_write(p / "model.safetensors", lambda f: _write_tensors(f, params, prefix, st_dtype))
    cfg = json.dumps(config.to_hf_dict(), indent=2).encode()
    atomic_write(p / "config.json", lambda f: f.write(cfg))
    return p


def _encode(arr: np.ndarray, st_dtype: str) -> np.ndarray:
    if st_dtype == "F32":
        return np.ascontiguousarray(arr, dtype="<f4")
    if st_dtype == "F16":
        return np.ascontiguousarray(arr, dtype="<f2")
    # bfloat16: the top 16 bits of the float32, rounded to nearest even
    bits = np.ascontiguousarray(arr, dtype="<f4").view(np.uint32)
    rounded = bits + (np.uint32(0x7FFF) + ((bits >> 16) & np.uint32(1)))
    return (rounded >> 16).astype("<u2")


def _write_tensors(f, params: dict, prefix: str, st_dtype: str = "F32"):
    itemsize = _DTYPES[st_dtype][1]
    header, offset = {}, 0
    for name, arr in params.items():
        nbytes = arr.size * itemsize
        # transformers keeps the output head outside the "transformer." module
        header[(name if name == HEAD else prefix + name)] = {"dtype": st_dtype, "shape": list(arr.shape),
                                 "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    header["__metadata__"] = {"format": "pt"}
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data section starts 8-byte aligned
    f.write(struct.pack("<Q", len(raw)))
    f.write(raw)
    for arr in params.values():
        f.write(_encode(arr, st_dtype).data)


def _default_mode() -> int:
    # mkstemp creates 0600 files; a saved model gets the permissions open() would give it
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def atomic_write(dest: Path, write):
    """Call write(f) on a temporary file beside dest, then rename it over dest."""
    dest = Path(dest)
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, _default_mode())
        os.replace(tmp, dest)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
