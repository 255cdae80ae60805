"""gpt2s's safetensors header reader against the safetensors library (its reference
implementation): on thousands of headers with mutated numbers, strings and structures, gpt2s
refuses a file exactly when ``safetensors.safe_open`` refuses it, except where gpt2s is
deliberately stricter (DELIBERATELY_STRICTER below says where and why).

Both readers judge the same bytes, written here by hand (a tiny JSON emitter that can write
what json.dumps cannot: duplicate keys, ``-0``, ``NaN``, lone surrogate escapes, raw control
characters).  The gpt2s side is the header reader alone (``read_safetensors_header``): whether
the tensors make a GPT-2 is another question, asked after it.
"""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest

from gpt2s import SafetensorsError
from gpt2s.weights import read_safetensors_header

safetensors = pytest.importorskip("safetensors")

# Where gpt2s refuses files the library accepts, on purpose:
DELIBERATELY_STRICTER = {
    "duplicate tensor name": "the library keeps the last entry of a name given twice; which of "
                             "the two the writer meant is unknowable, so gpt2s refuses",
    "duplicate __metadata__ key": "same: a second gpt2s_config could silently replace the "
                                  "first",
    "more than MAX_DIMS dimensions": "no tensor of the families gpt2s reads has more than 4; "
                                     "the cap bounds the work on a shape before it is read",
    "header longer than MAX_HEADER_BYTES": "8.4 MB instead of the library's 100 MB: 512 bytes "
                                           "for each tensor a model of at most 1024 blocks "
                                           "can have (docs/checkpoints.md)",
    "more than MAX_TENSORS entries": "the same bound, counted before the JSON is parsed",
}


class Raw(str):
    """JSON text emitted as it is (a number literal, a string with its escapes)."""


class Obj(list):
    """A JSON object as a list of (key, value) pairs, so that a key can appear twice."""


def emit(value) -> str:
    if isinstance(value, Raw):
        return str(value)
    if isinstance(value, Obj):
        return "{" + ",".join(f"{emit_key(k)}:{emit(v)}" for k, v in value) + "}"
    if isinstance(value, list):
        return "[" + ",".join(emit(v) for v in value) + "]"
    return json.dumps(value)


def emit_key(key) -> str:
    return str(key) if isinstance(key, Raw) else json.dumps(key)


def entry(dtype, shape, offsets, extra=()) -> Obj:
    return Obj([("dtype", dtype), ("shape", shape), ("data_offsets", offsets), *extra])


def base() -> tuple[Obj, int]:
    """A valid header of three tensors and __metadata__, and its data section's size."""
    header = Obj([("a", entry("F32", [2, 2], [0, 16])),
                  ("b", entry("F16", [3], [16, 22])),
                  ("c", entry("BF16", [1], [22, 24])),
                  ("__metadata__", Obj([("format", "pt")]))])
    return header, 24


def file_bytes(header, data_size: int, before="", after="") -> bytes:
    text = (before + emit(header) + after).encode("utf-8", "surrogatepass")
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text + b"\0" * data_size


def library_refuses(path) -> bool:
    try:
        with safetensors.safe_open(str(path), "np") as f:
            f.keys()
    except Exception:  # noqa: BLE001 - SafetensorError, or its parser's other errors
        return True
    return False


def gpt2s_refuses(path, raw: bytes) -> bool:
    try:
        read_safetensors_header(path, len(raw), raw)
    except SafetensorsError as e:
        assert str(path) in str(e), e
        return True
    return False


def key_text(key):
    """The string a key stands for (a Raw key is JSON text with its escapes)."""
    if not isinstance(key, Raw):
        return key
    try:
        return json.loads(key)
    except ValueError:
        return key


def has_duplicates(keys) -> bool:
    keys = [key_text(k) for k in keys]
    return len(set(keys)) != len(keys)


def stricter_reason(header) -> str | None:
    """The DELIBERATELY_STRICTER case a header falls under, judged here from its structure."""
    if not isinstance(header, Obj):
        return None
    if has_duplicates(k for k, _ in header if key_text(k) != "__metadata__"):
        return "duplicate tensor name"
    for key, value in header:
        if key_text(key) == "__metadata__":
            if isinstance(value, Raw):
                pairs = []
                try:
                    json.loads(value, object_pairs_hook=lambda p: pairs.extend(p) or {})
                except ValueError:
                    pass
                if has_duplicates(k for k, _ in pairs):
                    return "duplicate __metadata__ key"
            elif isinstance(value, Obj) and has_duplicates(k for k, _ in value):
                return "duplicate __metadata__ key"
        elif isinstance(value, Obj):
            shapes = [v for k, v in value if key_text(k) == "shape"]
            if any(isinstance(s, list) and len(s) > 8 for s in shapes):
                return "more than MAX_DIMS dimensions"
    return None


def judge(tmp_path, name, header, data_size, before="", after="") -> tuple[bool, bool, str]:
    raw = file_bytes(header, data_size, before, after)
    path = tmp_path / "h.safetensors"
    path.unlink(missing_ok=True)
    path.write_bytes(raw)
    return library_refuses(path), gpt2s_refuses(path, raw), raw[8:200].decode("utf-8", "replace")


def check_agrees(tmp_path, name, header, data_size, before="", after=""):
    lib, ours, text = judge(tmp_path, name, header, data_size, before, after)
    reason = stricter_reason(header)
    if reason is not None:
        assert ours, f"{name}: gpt2s accepts a header it refuses on purpose ({reason}): {text}"
    else:
        assert lib == ours, (f"{name}: the safetensors library {'refuses' if lib else 'accepts'}"
                             f" but gpt2s {'refuses' if ours else 'accepts'}: {text}")
    return lib, ours


# ------------------------------------------------------------------------------------------
# the cases found by hand, each with what the library does (asserted, so that a change in the
# library shows up here)

def with_entry(name, new_entry, data_size=24):
    header, size = base()
    header[[k for k, _ in header].index(name)] = (name, new_entry)
    return header, data_size


def with_a(dtype="F32", shape=(2, 2), offsets=(0, 16), extra=()):
    return with_entry("a", entry(dtype, list(shape) if isinstance(shape, tuple) else shape,
                                 list(offsets) if isinstance(offsets, tuple) else offsets,
                                 extra))


def alone(dtype, shape, offsets, data_size):
    """A header of one tensor."""
    return Obj([("a", entry(dtype, shape, offsets))]), data_size


def extra(value):
    return with_a(extra=[("x", value)])


def deep(levels):
    return Raw("[" * levels + "]" * levels)


CASES = {
    # name: (header, data size, library refuses?)
    "valid": (*base(), False),
    "-0 offset": (*with_a(offsets=[Raw("-0"), 16]), True),
    "-0 dimension": (*with_a(shape=[Raw("-0"), 2]), True),
    "1.0 offset": (*with_a(offsets=[0, Raw("16.0")]), True),
    "1e1 dimension": (*with_a(shape=[Raw("2e0"), 2]), True),
    "leading +": (*with_a(shape=[Raw("+2"), 2]), True),
    "leading zero": (*with_a(shape=[Raw("02"), 2]), True),
    "2**64 dimension of an empty tensor": (*alone("F32", [0, 2**64], [0, 0], 0), True),
    "2**64-1 dimension of an empty tensor": (*alone("F32", [0, 2**64 - 1], [0, 0], 0), False),
    "product overflows before a 0": (*alone("F32", [2**40, 2**40, 0], [0, 0], 0), True),
    "0 before a product that would overflow": (*alone("F32", [0, 2**40, 2**40], [0, 0], 0),
                                               False),
    "2**64-1 offset": (*alone("F32", [1], [0, 2**64 - 1], 4), True),
    "2**62 F32 elements": (*with_a(shape=[2**62]), True),
    "boolean dimension": (*with_a(shape=[True, 2]), True),
    "null offset": (*with_a(offsets=[0, None]), True),
    "nested list shape": (*with_a(shape=[[2], 2]), True),
    "three offsets": (*with_a(offsets=[0, 16, 16]), True),
    "string dimension": (*with_a(shape=["2", 2]), True),
    "NaN offset": (*with_a(offsets=[0, Raw("NaN")]), True),
    "extra key (int)": (*extra(1), False),
    "extra key (nested)": (*extra([[Obj([("y", None)])]]), False),
    "extra key -0": (*extra(Raw("-0")), False),
    "extra key 2**70": (*extra(2**70), False),
    "extra key NaN": (*extra(Raw("NaN")), True),
    "extra key -Infinity": (*extra(Raw("-Infinity")), True),
    "extra key 1e400": (*extra(Raw("1e400")), True),
    "extra key of 309 digits": (*extra(Raw("9" * 309)), True),
    "extra key of 308 digits": (*extra(Raw("9" * 308)), False),
    "extra key with a duplicate inside": (*extra(Obj([("q", 1), ("q", 2)])), False),
    "extra key twice": (*with_a(extra=[("x", 1), ("x", 2)]), False),
    "extra key nested 125 deep (127 in all)": (*extra(deep(125)), False),
    "extra key nested 126 deep (128 in all)": (*extra(deep(126)), True),
    "extra key nested 1000 deep": (*extra(deep(1000)), True),
    "dtype twice": (*with_a(extra=[("dtype", "F32")]), True),
    "missing data_offsets": (*with_entry("a", Obj([("dtype", "F32"), ("shape", [2, 2])])),
                             True),
    "empty name": (Obj([("", entry("F32", [1], [0, 4]))]), 4, False),
    "no tensors": (Obj([]), 0, False),
    "lone high surrogate in a name": (Obj([(Raw('"\\ud800"'), entry("F32", [1], [0, 4]))]), 4,
                                      True),
    "lone low surrogate in metadata": (Obj([("a", entry("F32", [1], [0, 4])),
                                            ("__metadata__", Obj([("x", Raw('"\\udc00"'))]))]),
                                       4, True),
    "surrogate pair in a name": (Obj([(Raw('"\\ud83d\\ude00"'), entry("F32", [1], [0, 4]))]),
                                 4, False),
    "high surrogate then a letter": (*extra(Raw('"\\ud800\\u0041"')), True),
    "lone surrogate after an escaped backslash": (*extra(Raw('"\\\\ud800"')), False),
    "control character in a name": (Obj([(Raw('"a\x01"'), entry("F32", [1], [0, 4]))]), 4,
                                    True),
    "escaped quote in a name": (Obj([(Raw('"a\\"b"'), entry("F32", [1], [0, 4]))]), 4, False),
    "non-ASCII name": (Obj([("é😀", entry("F32", [1], [0, 4]))]), 4, False),
    "__metadata__ null": (Obj([("a", entry("F32", [1], [0, 4])), ("__metadata__", None)]), 4,
                          False),
    "__metadata__ with an int": (Obj([("a", entry("F32", [1], [0, 4])),
                                      ("__metadata__", Obj([("x", 1)]))]), 4, True),
    "__metadata__ with null": (Obj([("a", entry("F32", [1], [0, 4])),
                                    ("__metadata__", Obj([("x", None)]))]), 4, True),
    "__metadata__ a list": (Obj([("a", entry("F32", [1], [0, 4])), ("__metadata__", [])]), 4,
                            True),
    "__metadata__ twice": (Obj([("__metadata__", Obj([])), ("__metadata__", Obj([])),
                                ("a", entry("F32", [1], [0, 4]))]), 4, True),
    "top-level int": (Obj([("a", entry("F32", [1], [0, 4])), ("x", 1)]), 4, True),
    "zero-size tensors first and last": (Obj([("z", entry("F32", [0], [0, 0])),
                                              ("a", entry("F32", [1], [0, 4])),
                                              ("y", entry("I8", [0, 5], [4, 4]))]), 4, False),
    "zero-size tensor inside another": (Obj([("z", entry("F32", [0], [2, 2])),
                                             ("a", entry("F32", [1], [0, 4]))]), 4, True),
    "gap": (Obj([("a", entry("F32", [1], [4, 8]))]), 8, True),
    "trailing bytes": (Obj([("a", entry("F32", [1], [0, 4]))]), 8, True),
    "overlap": (Obj([("a", entry("F32", [1], [0, 4])), ("b", entry("F32", [1], [0, 4]))]), 4,
                True),
    "past the end": (Obj([("a", entry("F32", [2], [0, 8]))]), 4, True),
    "end before begin": (Obj([("a", entry("F32", [0], [4, 0]))]), 4, True),
    "scalar": (Obj([("a", entry("F32", [], [0, 4]))]), 4, False),
    "F4 odd count": (Obj([("a", entry("F4", [1], [0, 1]))]), 1, True),
    "F4 even count": (Obj([("a", entry("F4", [2], [0, 1]))]), 1, False),
    "F6 four elements": (Obj([("a", entry("F6_E2M3", [4], [0, 3]))]), 3, False),
    "F8_E8M0": (Obj([("a", entry("F8_E8M0", [1], [0, 1]))]), 1, False),
    "C64": (Obj([("a", entry("C64", [1], [0, 8]))]), 8, False),
    "lowercase dtype": (Obj([("a", entry("f32", [1], [0, 4]))]), 4, True),
    "unknown dtype": (Obj([("a", entry("E8M0", [1], [0, 1]))]), 1, True),
    "duplicate tensor name": (Obj([("a", entry("F32", [1], [0, 4])),
                                   ("a", entry("F32", [1], [0, 4]))]), 4, False),
    "duplicate __metadata__ key": (Obj([("a", entry("F32", [1], [0, 4])),
                                        ("__metadata__", Obj([("k", "1"), ("k", "2")]))]), 4,
                                   False),
    "9 dimensions": (Obj([("a", entry("F32", [1] * 9, [0, 4]))]), 4, False),
}
WRAPPERS = {
    # name: (text before the JSON, text after it, library refuses?)
    "leading spaces and newline": (" \n\t", "", False),
    "trailing tab": ("", "\t", False),
    "trailing form feed": ("", "\f", True),
    "trailing NUL": ("", "\0", True),
    "byte-order mark": ("\ufeff", "", True),
    "trailing garbage": ("", "x", True),
    "two objects": ("", "{}", True),
}


@pytest.mark.parametrize("name", list(CASES))
def test_known_case(tmp_path, name):
    header, data_size, library_refuses_it = CASES[name]
    lib, ours = check_agrees(tmp_path, name, header, data_size)
    assert lib == library_refuses_it, f"the safetensors library changed its mind on {name}"


@pytest.mark.parametrize("name", list(WRAPPERS))
def test_text_around_the_json(tmp_path, name):
    before, after, library_refuses_it = WRAPPERS[name]
    lib, _ = check_agrees(tmp_path, name, *base(), before=before, after=after)
    assert lib == library_refuses_it


def test_every_stricter_case_is_exercised():
    """Each DELIBERATELY_STRICTER reason has a case here or in test_large_headers.py."""
    judged = {stricter_reason(h) for h, _, _ in CASES.values()}
    assert {"duplicate tensor name", "duplicate __metadata__ key",
            "more than MAX_DIMS dimensions"} <= judged
    assert set(DELIBERATELY_STRICTER) - judged == {"header longer than MAX_HEADER_BYTES",
                                                   "more than MAX_TENSORS entries"}


def test_caps_are_stricter_than_the_library(tmp_path):
    """The caps refuse headers the library reads (see DELIBERATELY_STRICTER)."""
    from gpt2s.weights import MAX_HEADER_BYTES, MAX_TENSORS
    many = Obj([(f"t{i}", entry("F32", [0], [0, 0])) for i in range(MAX_TENSORS + 1)])
    lib, ours, _ = judge(tmp_path, "many", many, 0)
    assert (lib, ours) == (False, True)
    long_name = Obj([("n" * MAX_HEADER_BYTES, entry("F32", [1], [0, 4]))])
    lib, ours, _ = judge(tmp_path, "long", long_name, 4)
    assert (lib, ours) == (False, True)


# ------------------------------------------------------------------------------------------
# random mutations

NUMBERS = ["0", "-0", "1", "2", "4", "16", "24", "1.0", "16.0", "1e1", "1E1", "2e0", "+1",
           "01", "-1", str(2**63), str(2**64 - 1), str(2**64), str(2**70), "9" * 309,
           "true", "false", "null", '"1"', "[1]", "{}", "NaN", "Infinity", "-Infinity",
           "1e400", "-1e400", "1e-400", "0.5", "-0.0"]
STRINGS = ['""', '"a"', '"\\ud800"', '"\\udc00x"', '"\\ud83d\\ude00"', '"\\\\ud800"',
           '"a\\u0000b"', '"\x01"', '"\\"', '"\\"\\\\"', '"é"', '"\\u00e9"', '"F32"',
           '"__metadata__"']
VALUES = NUMBERS + STRINGS + ["[]", "[[[]]]", '{"y": null}', '{"q": 1, "q": 2}',
                              "[" * 126 + "]" * 126, "[" * 125 + "]" * 125]
DTYPES = ["F32", "F16", "BF16", "I8", "U8", "BOOL", "F4", "F6_E3M2", "F8_E4M3", "F64",
          "C64", "U64", "f32", "", "E8M0", "F8"]


def _slots(header: Obj):
    """(container, index) of every number inside the tensor entries' shapes and offsets."""
    out = []
    for _, value in header:
        if isinstance(value, Obj):
            for _, field in value:
                if isinstance(field, list) and not isinstance(field, Obj):
                    out += [(field, i) for i in range(len(field))]
    return out


def mutate(rng, header: Obj, data_size: int) -> tuple[Obj, int, str, str]:
    """One to three random changes of a copy of header."""
    header = _copy(header)
    before, after = "", ""
    for _ in range(int(rng.integers(1, 4))):
        what = int(rng.integers(10))
        names = [k for k, v in header if k != "__metadata__" and isinstance(v, Obj)]
        entry_ = dict(header)[names[rng.integers(len(names))]] if names else None
        if what == 0 and _slots(header):            # a number where a usize goes
            slots = _slots(header)
            field, i = slots[rng.integers(len(slots))]
            field[i] = Raw(NUMBERS[rng.integers(len(NUMBERS))])
        elif what == 1 and entry_ is not None:      # an extra key
            entry_.append((["x", "dtype", "shape", "y"][rng.integers(4)],
                           Raw(VALUES[rng.integers(len(VALUES))])))
        elif what == 2 and entry_ is not None:      # a field removed, or its key renamed
            i = int(rng.integers(len(entry_)))
            key, value = entry_.pop(i)
            if rng.integers(2):
                entry_.append((key + "x", value))
        elif what == 3 and entry_ is not None:      # dtype
            entry_[0] = ("dtype", DTYPES[rng.integers(len(DTYPES))])
        elif what == 4 and entry_ is not None:      # shape
            shape = [1] * int(rng.integers(0, 11)) if rng.integers(3) == 0 else \
                [[], [0], [2, 2], [4], [3], [1, 1, 1, 1], [0, 2**40, 2**40],
                 [2**40, 2**40, 0], [8], [2, 2, 0]][rng.integers(10)]
            entry_[:] = [(k, shape if k == "shape" else v) for k, v in entry_]
        elif what == 5 and entry_ is not None:      # offsets: overlap, gap, past the end
            b = int(rng.integers(0, data_size + 2))
            entry_[:] = [(k, [b, b + int(rng.integers(0, 20))] if k == "data_offsets" else v)
                         for k, v in entry_]
        elif what == 6:                             # a name
            i = int(rng.integers(len(header)))
            header[i] = (Raw(STRINGS[rng.integers(len(STRINGS))]), header[i][1])
        elif what == 7:                             # duplicate a top-level or metadata pair
            i = int(rng.integers(len(header)))
            target = header
            if header[i][0] == "__metadata__" and isinstance(header[i][1], Obj) \
                    and header[i][1] and rng.integers(2):
                target, i = header[i][1], 0
            target.insert(int(rng.integers(len(target) + 1)), target[i])
        elif what == 8:                             # __metadata__
            md = [Obj([("format", "pt")]), None, Raw("[]"), Obj([("k", Raw("1"))]),
                  Obj([("k", Raw(STRINGS[rng.integers(len(STRINGS))]))]), Obj([]),
                  Raw('{"k": "v", "k": "w"}'), Raw("NaN")][rng.integers(8)]
            header[:] = [p for p in header if p[0] != "__metadata__"] + [("__metadata__", md)]
        else:                                       # the data section's size, or the text
            op = int(rng.integers(4))
            if op == 0:
                data_size = max(0, data_size + int(rng.integers(-4, 5)))
            elif op == 1:
                before = [" ", "\n", "\ufeff", "\t"][rng.integers(4)]
            else:
                after = [" ", "\t", "\0", "x", "\f", "\r\n"][rng.integers(6)]
    return header, data_size, before, after


def _copy(value):
    if isinstance(value, Obj):
        return Obj([(k, _copy(v)) for k, v in value])
    if isinstance(value, list) and not isinstance(value, Raw):
        return [_copy(v) for v in value]
    return value


RANDOM_CASES = 1500


def test_random_mutations(tmp_path):
    rng = np.random.default_rng(20261201)
    outcomes = {"both refuse": 0, "both accept": 0, "stricter": 0}
    for i in range(RANDOM_CASES):
        header, data_size, before, after = mutate(rng, *base())
        lib, ours = check_agrees(tmp_path, f"random case {i}", header, data_size, before, after)
        outcomes["stricter" if ours and not lib else
                 "both refuse" if ours else "both accept"] += 1
    print(outcomes)
    # both outcomes, and the stricter cases, are reached: the comparison is not vacuous
    assert outcomes["both accept"] > RANDOM_CASES // 20, outcomes
    assert outcomes["both refuse"] > RANDOM_CASES // 3, outcomes
    assert outcomes["stricter"] > 0, outcomes
