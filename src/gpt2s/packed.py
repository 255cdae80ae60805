"""Model files in a model's own storage: a bfloat16 model's matmul weights as BF16 tensors, and
the packed files of the blocked types (int8, int4), which hold the kernels' stored form.

A packed file is a safetensors file whose ``__metadata__`` has ``format`` "gpt2s" (so a reader
that expects PyTorch tensors, "pt", refuses it), ``gpt2s_storage`` the weight type's name,
``gpt2s_packing`` a JSON object that says how the bytes read (`packing`: the format version,
the weight type, the block, the layout, the element and scale dtypes, the meaning of the
codes) and ``gpt2s_config`` the model's config.  Every matmul weight ``NAME`` is two tensors:
``NAME`` holds the stored elements exactly as the kernels read them (``I8`` for int8, ``U8``
two 4-bit codes a byte for int4; a Conv1D weight output-major, ``[out][in / per element]``,
the embedding ``[V][C / per element]``), ``NAME.scales`` the block scales as they are stored
(``F16``, ``[rows][in / block]``).  The other tensors (biases, layernorms, ``wpe``) are F32.
Loading such a file with its own type maps it and uses the tensors in place: nothing is
quantized again and nothing is copied; another dtype widens each weight and converts it.

``config.json`` beside a packed file carries ``quantization_config`` = {"quant_method":
"gpt2s", "weight_type": ..., "block_size": ..., "version": ...}, which `gpt2s.config` accepts
and other tools refuse.  A file this code cannot read (another format version, an unknown
weight type, a block or layout other than this build's) is refused with a
`SafetensorsError` naming the file and the field; a tensor of the wrong dtype or shape, a
missing scale tensor, a NaN or infinite scale, likewise naming the tensor.
"""

from __future__ import annotations

import json
import math

import numpy as np

from . import weight_types as _wt
from . import weights as _w
from .weights import HEAD, SafetensorsError

__all__ = ["FORMAT", "STORAGE_KEY", "PACKING_KEY", "VERSION", "SCALES", "packing",
           "quantization_config", "file_storage", "check_quantization_config",
           "check_against_config", "load_tensors", "save_entries", "check_scales"]

FORMAT = "gpt2s"                 # __metadata__["format"] of a packed file
STORAGE_KEY = "gpt2s_storage"    # __metadata__: the weight type of the matmul weights
PACKING_KEY = "gpt2s_packing"    # __metadata__: JSON, how a packed file's bytes read
VERSION = 1                      # of the packed layout this code writes and reads
SCALES = ".scales"               # a packed weight's scale tensor: its name + SCALES
QUANT_METHOD = "gpt2s"           # config.json's quantization_config.quant_method

_ELEMENT = {"int8": "I8", "uint8": "U8"}            # stored NumPy dtype -> safetensors dtype
_NUMPY = {"I8": np.dtype("i1"), "U8": np.dtype("u1"), "F16": np.dtype("<u2")}
_MAX_PACKING_CHARS = 4096


def _packed_types() -> list[str]:
    return [name for name in _wt.DTYPES if _wt.get(name).block]


def packing(wt: _wt.WeightType) -> dict:
    """What ``gpt2s_packing`` records for a blocked weight type: everything a reader must
    agree on to use the bytes as they are."""
    return {"version": VERSION, "weight_type": wt.name, "block": wt.block,
            "layout": "output-major" if wt.output_major else "input-major",
            "element": _ELEMENT[wt.store.name], "weights_per_element": wt.per_element,
            "scale": "F16", "codes": wt.codes}


def quantization_config(wt: _wt.WeightType) -> dict:
    """config.json's ``quantization_config`` of a packed file of weight type wt."""
    return {"quant_method": QUANT_METHOD, "weight_type": wt.name, "block_size": wt.block,
            "version": VERSION}


# ------------------------------------------------------------------------------------------
# Reading


def file_storage(path, metadata: dict) -> tuple[str, _wt.WeightType | None]:
    """(the weight type the file stores its matmul weights in, that type when the file is
    packed, else None), from the file's __metadata__.  A file not saved by gpt2s in another
    type is "float32" (whatever its tensors' dtypes: they are converted)."""
    storage = metadata.get(STORAGE_KEY)
    if metadata.get("format") == FORMAT or PACKING_KEY in metadata:
        wt = _read_packing(path, metadata)
        return wt.name, wt
    if storage is None:
        return "float32", None
    if storage not in _wt.DTYPES:
        raise SafetensorsError(
            f"{path}: __metadata__ {STORAGE_KEY}={_w._r(storage)} is a weight type this gpt2s "
            f"does not know (it reads {', '.join(_wt.DTYPES)}); a newer gpt2s may read it")
    if _wt.get(storage).block:
        raise SafetensorsError(
            f"{path}: __metadata__ {STORAGE_KEY}={storage!r}, but the file is not a packed "
            f"gpt2s file (its format is {_w._r(metadata.get('format'))}, not {FORMAT!r}, and "
            f"it has no {PACKING_KEY!r}): the file is broken")
    return storage, None


def _read_packing(path, metadata: dict) -> _wt.WeightType:
    fmt = metadata.get("format")
    if fmt != FORMAT:
        raise SafetensorsError(f"{path}: __metadata__ has {PACKING_KEY!r} but its format is "
                               f"{_w._r(fmt)}, not {FORMAT!r}: the file is broken")
    text = metadata.get(PACKING_KEY)
    if text is None:
        raise SafetensorsError(f"{path}: a packed gpt2s file (format {FORMAT!r}) without its "
                               f"{PACKING_KEY!r} metadata: the file is broken")
    d = None
    if len(text) <= _MAX_PACKING_CHARS:
        try:
            d = json.loads(text)
        except ValueError:
            pass
    if not isinstance(d, dict):
        raise SafetensorsError(f"{path}: __metadata__ {PACKING_KEY!r} is not a JSON object: "
                               f"{_w._r(text)}")
    version = d.get("version")
    if version != VERSION:
        raise SafetensorsError(
            f"{path}: packed in gpt2s packing version {_w._r(version)}; this gpt2s reads "
            f"version {VERSION} only (a newer gpt2s wrote it? load it there and save it with "
            f"dtype='float32')")
    name = d.get("weight_type")
    if not (isinstance(name, str) and name in _packed_types()):
        raise SafetensorsError(
            f"{path}: packed weight type {_w._r(name)} is not one this gpt2s reads (it reads "
            f"packed {', '.join(_packed_types())})")
    wt = _wt.get(name)
    want = packing(wt)
    for key in sorted(set(want) | set(d)):
        if d.get(key) != want.get(key):
            raise SafetensorsError(
                f"{path}: packed {name} file with {key}={_w._r(d.get(key))}; this gpt2s reads "
                f"{name} with {key}={_w._r(want.get(key))} only (a layout it cannot read)")
    storage = metadata.get(STORAGE_KEY)
    if storage is not None and storage != name:
        raise SafetensorsError(f"{path}: __metadata__ {STORAGE_KEY}={_w._r(storage)} differs "
                               f"from the packing's weight type {name!r}: the file is broken")
    return wt


def check_quantization_config(cfg_file, file, storage: str, packed):
    """config.json's quantization_config (which gpt2s.config accepts only as gpt2s's own)
    must name the file's packed weight type."""
    from .config import parse_config_json
    with open(cfg_file, encoding="utf-8") as f:
        d = parse_config_json(f.read(), str(cfg_file))
    quant = d.get("quantization_config") if isinstance(d, dict) else None
    if quant is None:
        return
    said = quant.get("weight_type") if isinstance(quant, dict) else None
    if packed is None or said != packed.name:
        actual = f"is packed {packed.name}" if packed is not None else \
            f"is not a packed file (it stores {storage} weights)"
        raise SafetensorsError(f"{cfg_file}: quantization_config says the weights are packed "
                               f"{_w._r(said)}, but {file} {actual}: the two files do not "
                               f"belong together")


def check_against_config(path, header: dict, data_size: int, config, wt) -> dict:
    """A packed file's tensors against the config: every matmul weight NAME present with the
    stored shape and element dtype of wt and NAME.scales as F16 of its block count, every
    other parameter with its shape and a float dtype, nothing else (but the ignored buffers);
    returns {name (NAME.scales too): header name}.  Reads no tensor data."""
    expected = {}   # name -> (dtypes, shape)
    element = _ELEMENT[wt.store.name]
    for name, shape, _ in _w.layout_of(config):
        if not _wt.is_compressed(name):
            expected[name] = (("F32", "F16", "BF16"), tuple(shape))
            continue
        try:
            data_shape, scales_shape = wt.stored_shapes(name, shape)
        except ValueError as e:
            raise SafetensorsError(f"{path}: {e}") from None
        expected[name] = ((element,), data_shape)
        expected[name + SCALES] = (("F16",), scales_shape)
    seen = _w.match_tensors(path, header, config, expected,
                            what=f"a tensor of a packed {wt.name} model of this config")
    for name, (dtypes, shape) in expected.items():
        if name not in seen:
            what = (f"the block scales of {name[:-len(SCALES)]!r}" if name.endswith(SCALES)
                    else "a parameter")
            raise SafetensorsError(f"{path}: missing tensor {name!r} ({what}) in a packed "
                                   f"{wt.name} file")
        info = header[seen[name]]
        if info["dtype"] not in dtypes:
            raise SafetensorsError(
                f"{path}: tensor {_w._r(seen[name])} has dtype {_w._r(info['dtype'])}; a packed "
                f"{wt.name} file stores it as {' or '.join(dtypes)}")
        if tuple(info["shape"]) != shape:
            blocks = (f" ({shape[1]} blocks of {wt.block} per row)" if name.endswith(SCALES)
                      else "")
            raise SafetensorsError(
                f"{path}: tensor {_w._r(seen[name])} has shape {_w._shape_str(info['shape'])}, "
                f"expected {shape}{blocks} for a packed {wt.name} model of this config")
    return seen


def check_scales(path, raw_name: str, bits: np.ndarray):
    """Refuse fp16 scales (uint16 bits) that are NaN or infinite (exponent bits all set),
    naming the tensor and the first bad index."""
    flat = bits.reshape(-1)
    exponent = np.empty(min(_w.VALUE_CHUNK, flat.size), np.uint16)
    for start in range(0, flat.size, _w.VALUE_CHUNK):
        chunk = flat[start:start + _w.VALUE_CHUNK]
        masked = np.bitwise_and(chunk, 0x7C00, out=exponent[:chunk.size])
        if masked.max() != 0x7C00:
            continue
        bad = start + int(np.flatnonzero(masked == 0x7C00)[0])
        value = float(np.array(flat[bad], np.uint16).view(np.float16))
        at = tuple(map(int, np.unravel_index(bad, bits.shape)))
        raise SafetensorsError(f"{path}: tensor {raw_name!r} holds the scale {value!r} at "
                               f"index {at}: a block scale must be a finite number (the file "
                               f"is broken)")


def _array(header: dict, raw_name: str, data_start: int, mm, st_dtype: str):
    """(the tensor as an array of its stored dtype, True when it is a view of the mapping):
    a view when its offset is aligned to the element size, else a copy."""
    info = header[raw_name]
    dtype = _NUMPY[st_dtype]
    begin, end = info["data_offsets"]
    shape = tuple(info["shape"])
    if (data_start + begin) % dtype.itemsize == 0:
        view = np.frombuffer(mm, dtype=dtype, count=math.prod(shape), offset=data_start + begin)
        return view.reshape(shape), True
    raw = mm[data_start + begin:data_start + end]
    return np.frombuffer(raw, dtype=dtype).reshape(shape).copy(), False


def load_tensors(store, src, wt, mmap: bool, progress=None) -> bool:
    """Fill the store's params from a packed file of weight type wt: the matmul weights in
    place (views of the mapping, mmap) or copied (not mmap) when the store's dtype is wt,
    else widened and converted one at a time (the embedding a few rows at a time); the
    small tensors into the store's buffer.  Returns True when some parameter views the
    mapping."""
    header = src.header
    seen = check_against_config(src.file, header, src.data_size, store.config, wt)
    counter = _w.LoadCounter(progress, store.config)
    dtype, viewed = store.dtype, False
    element = _ELEMENT[wt.store.name]
    for name in list(store.params):
        raw = seen[name]
        file, mm, data_start = src.at(raw)
        shape = tuple(store.params[name].shape)
        if not _wt.is_compressed(name):
            _w.read_tensor(file, header, raw, data_start, mm, store.params[name])
            _w.drop_tensor_pages(mm, data_start, header[raw])
            counter.add(math.prod(shape))
            continue
        raw_scales = seen[name + SCALES]
        data, data_view = _array(header, raw, data_start, mm, element)
        s_file, s_mm, s_start = src.at(raw_scales)
        scales, scales_view = _array(header, raw_scales, s_start, s_mm, "F16")
        check_scales(s_file, raw_scales, scales)
        if dtype == wt.name:
            if mmap:
                viewed = viewed or data_view or scales_view
            else:
                data, scales = np.array(data), np.array(scales)
            store.set_param(name, wt.from_stored(name, data, scales))
        else:
            _convert(store, name, shape, wt, data, scales, file, raw)
            _w.drop_tensor_pages(mm, data_start, header[raw])
            _w.drop_tensor_pages(s_mm, s_start, header[raw_scales])
        counter.add(math.prod(shape))
    return viewed


def _convert(store, name: str, shape, wt, data, scales, file, raw: str):
    """Packed weight (data, scales) of type wt into the store's dtype: widened to float32 (a
    chunk of rows of the embedding at a time) and stored in that type."""
    dtype = store.dtype
    target = _wt.get(dtype)
    if _wt.is_row_major(name):
        out = store.params[name] if dtype == "float32" else target.empty(name, shape)
        for r0, r1 in _w.row_chunks(*shape):
            rows = np.asarray(wt.from_stored(name, data[r0:r1], scales[r0:r1]))
            _w.check_values(file, raw, rows, dtype, first=r0 * shape[1], shape=shape)
            if dtype == "float32":
                out[r0:r1] = rows
            else:
                target.compress_rows_into(name, out, r0, rows)
        if dtype != "float32":
            store.set_param(name, out)
        return
    full = np.asarray(wt.from_stored(name, data, scales))
    _w.check_values(file, raw, full, dtype)
    if dtype == "float32":
        store.params[name][...] = full
    else:
        store.set_param(name, target.compress(name, full))


# ------------------------------------------------------------------------------------------
# Writing


def _stored(name: str, w, wt):
    """(data, scales) of parameter w in weight type wt: its own arrays when it is stored in
    wt already, else converted (from its float32 values)."""
    if isinstance(w, _wt.PackedWeight) and w.type_name == wt.name:
        return w.data, w.scales
    c = wt.compress(name, w if isinstance(w, np.ndarray) else np.asarray(w))
    return c.data, c.scales


def save_entries(params: dict, config, prefix: str, storage: str):
    """(entries for weights._write_tensors, __metadata__, config.json's quantization_config
    or None) of a file in weight type ``storage``: the float32 tensors first (4-byte aligned),
    then each matmul weight (and its scales) in the type's stored form."""
    wt = _wt.get(storage)

    def key(name):   # transformers keeps the output head outside the "transformer." module
        return name if name == HEAD else prefix + name

    entries = [(key(name), "F32", tuple(w.shape), 4 * w.size,
                lambda w=w: _w._encode(np.asarray(w), "F32"))
               for name, w in params.items() if not _wt.is_compressed(name)]
    metadata = {"format": "pt", _w.CONFIG_METADATA_KEY: json.dumps(config.to_hf_dict()),
                STORAGE_KEY: wt.name}
    compressed = [(name, w) for name, w in params.items() if _wt.is_compressed(name)]
    if not wt.block:
        # bfloat16: the tensor's own layout and shape, 16 bits a weight, readable by any
        # safetensors reader as BF16
        if wt.output_major or wt.store != np.dtype(np.uint16):
            raise NotImplementedError(f"saving {wt.name} weights")
        entries += [(key(name), "BF16", tuple(w.shape), 2 * w.size,
                     lambda name=name, w=w: _stored(name, w, wt)[0])
                    for name, w in compressed]
        return entries, metadata, None
    element = _ELEMENT[wt.store.name]
    for name, w in compressed:
        data_shape, scales_shape = wt.stored_shapes(name, w.shape)
        pending = {}   # the converted scales, from the data's conversion to its own entry

        def data(name=name, w=w, pending=pending):
            d, pending["scales"] = _stored(name, w, wt)
            return d

        entries.append((key(name), element, data_shape, math.prod(data_shape), data))
        entries.append((key(name) + SCALES, "F16", scales_shape, 2 * math.prod(scales_shape),
                        lambda pending=pending: pending.pop("scales")))
    metadata.update({"format": FORMAT, PACKING_KEY: json.dumps(packing(wt))})
    return entries, metadata, quantization_config(wt)
