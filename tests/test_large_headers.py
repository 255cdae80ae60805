"""Large hostile safetensors headers cost little to refuse: bounded memory, and no JSON parse
of what the caps counted from the raw bytes refuse (gpt2s.weights: MAX_HEADER_BYTES,
MAX_TENSORS, MAX_JSON_TOKENS, MAX_JSON_DEPTH).

Each file is built here and loaded in a subprocess (this file run as a script) under an
address-space limit, which reports: the exception, the peak resident memory the load added
(VmHWM after resetting it, else ru_maxrss, minus the resident memory before), and what the
JSON parser was handed (characters, and the objects and lists it built).  The assertions bound
memory and the parse, never time: the timeout only turns a hang into a failure.
"""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from gpt2s.weights import MAX_HEADER_BYTES, MAX_JSON_TOKENS, MAX_TENSORS

posix_only = pytest.mark.skipif(not sys.platform.startswith("linux"),
                                reason="/proc/self/status and RLIMIT_AS are Linux's")

PEAK_BOUND = 100 << 20        # resident memory a load may add, on any header
ADDRESS_HEADROOM = 768 << 20  # the worker's address-space limit above its footprint
TIMEOUT = 180                 # seconds: a hang, not a slow machine


def header_file(path: Path, header: bytes) -> Path:
    header += b" " * (-len(header) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(header)))
        f.write(header)
    return path


def zero_size_entries(count: int) -> bytes:
    return b"{" + b",".join(b'"t%d":{"dtype":"F32","shape":[0],"data_offsets":[0,0]}' % i
                            for i in range(count)) + b"}"


def entry_with(extra: bytes, shape: bytes = b"[0]") -> bytes:
    return (b'{"a":{"dtype":"F32","shape":' + shape + b',"data_offsets":[0,0]' + extra
            + b"}}")


# (name, header bytes builder, words the message holds, parsed?)  "parsed" False: refused
# from the raw bytes, before any JSON is parsed
REFUSED_BEFORE_PARSING = {
    "100k zero-size entries (7 MB)": (lambda: zero_size_entries(100_000),
                                      ["100,001 JSON objects", f"{MAX_TENSORS:,}"]),
    "1.4M zero-size entries (83 MB)": (lambda: zero_size_entries(1_400_000),
                                       ["header length", f"{MAX_HEADER_BYTES:,}"]),
    "one 24M-long shape (96 MB)": (lambda: entry_with(b"", b"[" + b"64, " * 24_000_000 + b"0]"),
                                   ["header length"]),
    "one 4M-long shape under the size cap": (lambda: entry_with(b"", b"[" + b"1," * 4_000_000
                                                                + b"0]"),
                                             ["JSON values", f"{MAX_JSON_TOKENS:,}"]),
    "4M nested lists": (lambda: b"[" * 4_000_000 + b"]" * 4_000_000, ["JSON values"]),
    "100k nested lists": (lambda: b"[" * 100_000 + b"]" * 100_000, ["not JSON", "127"]),
    "16k nested objects": (lambda: b'{"a":' * 16_000 + b"1" + b"}" * 16_000,
                           ["not JSON", "127"]),
    "an unterminated string at the cap": (lambda: b'{"a' + b"x" * (MAX_HEADER_BYTES - 16),
                                          ["not terminated"]),
}


def tokens(header: bytes) -> int:
    """JSON values and strings of a header whose strings hold no brackets, commas, colons or
    escapes, counted by their delimiters as MAX_JSON_TOKENS is defined."""
    return header.count(b'"') // 2 + sum(header.count(c) for c in (b"{", b"[", b",", b":"))


def most_values(over: bool) -> bytes:
    head = entry_with(b',"x":[0]')
    zeros = MAX_JSON_TOKENS - tokens(head) + over
    return entry_with(b',"x":[' + b"0," * zeros + b"0]")


def most_entries(over: bool) -> bytes:
    # no __metadata__: the header's own object and MAX_TENSORS entries, 2 more over
    return b"{" + b",".join(b'"%05d%s":{"dtype":"F32","shape":[0],"data_offsets":[0,0]}'
                            % (i, b"n" * 440) for i in range(MAX_TENSORS + 2 * over)) + b"}"


def longest(prefix: bytes, unit: bytes, suffix: bytes, over: bool) -> bytes:
    """prefix + unit * k + suffix, k as large as MAX_HEADER_BYTES allows (and 8 units past
    it when over)."""
    room = MAX_HEADER_BYTES - len(prefix) - len(suffix)
    if over:
        return prefix + unit * (room // len(unit) + 8) + suffix
    return prefix + unit * (room // len(unit)) + suffix + b" " * (room % len(unit))


# headers at a cap, which the scan admits (parsed, then refused as no model), and just past
# it, which it refuses before parsing
AT_THE_CAPS = {
    "JSON values": most_values,
    "tensor entries, with long names": most_entries,
    "size, one string of 4-byte characters": lambda over: longest(
        b'{"a":{"dtype":"F32","shape":[0],"data_offsets":[0,0],"x":"\xf0\x9f\x98\x80',
        b"a", b'"}}', over),
    "size, escaped quotes": lambda over: longest(
        b'{"a":{"dtype":"F32","shape":[0],"data_offsets":[0,0],"x":"', b'\\"', b'"}}', over),
}


def run_worker(path: Path, headroom: int = ADDRESS_HEADROOM) -> dict:
    proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), str(path),
                           str(headroom)],
                          capture_output=True, text=True, timeout=TIMEOUT,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))
    lines = [l for l in proc.stdout.splitlines() if l.startswith("REPORT ")]
    assert proc.returncode == 0 and lines, f"worker failed ({proc.returncode}):\n" \
                                           f"{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
    return json.loads(lines[-1][len("REPORT "):])


def check_refused(report: dict, path: Path):
    assert report["error"] == "SafetensorsError", report
    assert str(path) in report["message"], report
    assert len(report["message"]) < len(str(path)) + 400, report["message"][:500]
    assert report["peak_added"] < PEAK_BOUND, \
        f"{report['peak_added'] >> 20} MiB resident added to refuse: {report['message']}"


@posix_only
@pytest.mark.parametrize("name", list(REFUSED_BEFORE_PARSING))
def test_refused_before_parsing(tmp_path, name):
    build, words = REFUSED_BEFORE_PARSING[name]
    path = header_file(tmp_path / "h.safetensors", build())
    try:
        report = run_worker(path)
    finally:
        path.unlink()
    check_refused(report, path)
    assert report["json_characters"] == 0 and report["json_containers"] == 0, report
    assert all(w in report["message"] for w in words), report["message"]


@posix_only
@pytest.mark.parametrize("name", list(AT_THE_CAPS))
def test_caps_are_exact(tmp_path, name):
    """At the cap: parsed, within the memory bound; one step past it: refused unparsed."""
    reports = {}
    for over in (False, True):
        header = AT_THE_CAPS[name](over)
        path = header_file(tmp_path / "h.safetensors", header)
        try:
            reports[over] = report = run_worker(path)
        finally:
            path.unlink()
        check_refused(report, path)
    at, past = reports[False], reports[True]
    assert at["json_characters"] > 0 and at["json_containers"] <= MAX_JSON_TOKENS, at
    assert "wte.weight" in at["message"], at            # refused as no model, after parsing
    assert past["json_characters"] == 0 and past["json_containers"] == 0, past


@posix_only
@pytest.mark.parametrize("headroom", [32 << 20, 120 << 20], ids=["mapping", "buffer"])
def test_out_of_memory_names_the_file(tmp_path, headroom):
    """A valid model that does not fit in the address space left: the 74 MB file cannot be
    mapped, or the 149 MB float32 parameter buffer cannot be allocated.  The MemoryError
    becomes a SafetensorsError naming the file (it was a bare MemoryError, or an OSError)."""
    n_embd, vocab = 1024, 24_000
    shapes = {"wte.weight": (vocab, n_embd), "wpe.weight": (8, n_embd),
              "ln_f.weight": (n_embd,), "ln_f.bias": (n_embd,)}
    for suffix, shape in {"ln_1.weight": (n_embd,), "ln_1.bias": (n_embd,),
                          "attn.c_attn.weight": (n_embd, 3 * n_embd),
                          "attn.c_attn.bias": (3 * n_embd,),
                          "attn.c_proj.weight": (n_embd, n_embd), "attn.c_proj.bias": (n_embd,),
                          "ln_2.weight": (n_embd,), "ln_2.bias": (n_embd,),
                          "mlp.c_fc.weight": (n_embd, 4 * n_embd),
                          "mlp.c_fc.bias": (4 * n_embd,),
                          "mlp.c_proj.weight": (4 * n_embd, n_embd),
                          "mlp.c_proj.bias": (n_embd,)}.items():
        shapes["h.0." + suffix] = shape
    header, offset = {}, 0
    for name, shape in shapes.items():
        size = 2 * int(np.prod(shape))
        header[name] = {"dtype": "F16", "shape": list(shape),
                        "data_offsets": [offset, offset + size]}
        offset += size
    header["__metadata__"] = {"gpt2s_config": json.dumps(
        {"n_layer": 1, "n_head": 16, "n_embd": n_embd, "vocab_size": vocab, "n_positions": 8})}
    path = header_file(tmp_path / "big.safetensors", json.dumps(header).encode())
    with open(path, "ab") as f:
        f.truncate(path.stat().st_size + offset)   # zeros: a valid F16 model
    try:
        report = run_worker(path, headroom)
    finally:
        path.unlink()
    assert report["error"] == "SafetensorsError", report
    assert str(path) in report["message"] and "memory" in report["message"], report


# ------------------------------------------------------------------------------------------
# the worker


def _status(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {key} in /proc/self/status")


def _containers(value) -> int:
    count, stack = 0, [value]
    while stack:
        v = stack.pop()
        if isinstance(v, dict):
            count += 1
            stack.extend(v.values())
        elif isinstance(v, list):
            count += 1
            stack.extend(v)
    return count


def worker(path: str, headroom: int):
    import json.decoder
    import resource

    from gpt2s import GPT2

    parsed = {"json_characters": 0, "json_containers": 0}
    raw_decode = json.decoder.JSONDecoder.raw_decode

    def counting_raw_decode(self, s, *args, **kwargs):
        parsed["json_characters"] += len(s)
        result = raw_decode(self, s, *args, **kwargs)
        parsed["json_containers"] += _containers(result[0])
        return result

    json.decoder.JSONDecoder.raw_decode = counting_raw_decode
    limit = _status("VmSize:") + headroom
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    before = _status("VmRSS:")
    try:   # reset VmHWM to the current resident set (Linux >= 4.0)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        peak = lambda: _status("VmHWM:")  # noqa: E731
    except OSError:
        peak = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # noqa: E731
    try:
        GPT2.from_safetensors(path)
        error, message = None, ""
    except BaseException as e:  # noqa: BLE001 - reported, the test judges it
        error, message = type(e).__name__, str(e)
    report = dict(parsed, error=error, message=message[:2000],
                  peak_added=peak() - before)
    print("REPORT " + json.dumps(report), flush=True)


if __name__ == "__main__":
    worker(sys.argv[1], int(sys.argv[2]))
