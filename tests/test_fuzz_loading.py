"""Fuzzing the model loader (issue 10): thousands of random mutations of small valid files.

Every mutated file must either load *correctly* or raise SafetensorsError: never another
exception type, a hang, a crash, or an allocation beyond a small address-space limit.

"Correctly" means:
* every parameter equals, bit for bit, that tensor decoded here from the mutated file by a
  separate reader (F16 widened by NumPy, BF16 by a 16-bit shift);
* the safetensors library (if installed) also accepts the file: gpt2s is never looser than the
  format's reference implementation;
* a mutation of data bytes alone never makes a valid file fail (unless it breaks the tie
  lm_head == wte, or puts a NaN or an infinity in a parameter: both are errors);
* every parameter is finite (a file with a non-finite weight is refused);
* a forward pass runs, and its logits are finite whenever the parameters are below 1e3 in
  magnitude.

The cases run in a worker subprocess (this file run as a script) under RLIMIT_AS (its own
footprint after a warm-up, plus 256 MiB) and OMP_NUM_THREADS=1; the test reads one result
line per case with a wall-clock limit, so a hang or a crash names the case that caused it.
To replay one case: python tests/test_fuzz_loading.py --replay SEED CASE
"""

from __future__ import annotations

import json
import os
import re
import selectors
import struct
import subprocess
import sys
import time
import traceback
from pathlib import Path

import numpy as np
import pytest

HERE = Path(__file__).resolve().parent
DEFAULT_CASES = 3000
SLOW_CASES = 60000
# seconds of wall clock per case before the test calls it a hang (a case takes milliseconds;
# no speed is asserted: the work of a case is bounded by the address-space limit instead)
CASE_WALL_LIMIT = 60.0
HEADROOM = 256 << 20     # address space the worker may use beyond its warmed-up footprint

posix_only = pytest.mark.skipif(not sys.platform.startswith("linux"),
                                reason="RLIMIT_AS and /proc/self/status are Linux's")


# ------------------------------------------------------------------------------------------
# the test side


def run_worker(tmp_path, seed: int, start: int, count: int) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONFAULTHANDLER="1")
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", str(seed), str(start),
           str(count), str(tmp_path)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env,
                            cwd=str(HERE))
    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ)
    failures, last, summary, buf = [], start - 1, None, b""
    deadline_extra = 60.0   # imports and warm-up before the first case
    try:
        while True:
            if not sel.select(timeout=CASE_WALL_LIMIT + deadline_extra):
                proc.kill()
                pytest.fail(f"fuzz case {last + 1} (seed {seed}) hung: no result in "
                            f"{CASE_WALL_LIMIT + deadline_extra:.0f} s; replay with "
                            f"python tests/test_fuzz_loading.py --replay {seed} {last + 1}")
            deadline_extra = 0.0
            chunk = os.read(proc.stdout.fileno(), 1 << 16)
            if not chunk:
                break
            buf += chunk
            *lines, buf = buf.split(b"\n")
            for line in lines:
                kind, _, rest = line.decode().partition(" ")
                if kind == "R":
                    last = int(rest.split()[0])
                elif kind == "FAIL":
                    failures.append(json.loads(rest))
                    last = failures[-1]["case"]
                elif kind == "DONE":
                    summary = json.loads(rest)
    finally:
        proc.stdout.close()
        rc = proc.wait()
        err = proc.stderr.read().decode(errors="replace")
        proc.stderr.close()
    if summary is None:
        pytest.fail(f"fuzz worker died (exit code {rc}) after case {last} (seed {seed}): "
                    f"replay case {last + 1} with python tests/test_fuzz_loading.py --replay "
                    f"{seed} {last + 1}\n{err[-3000:]}")
    assert not failures, "\n\n".join(
        f"case {f['case']} ({f['kind']}): {f['error']}\nreplay: python "
        f"tests/test_fuzz_loading.py --replay {seed} {f['case']}" for f in failures[:5])
    assert rc == 0, err[-3000:]
    assert summary["cases"] == count
    return summary


def check_summary(summary: dict, count: int):
    # the mutations reach both outcomes and every kind, so the test is not vacuous
    assert summary["loaded"] > count // 20 and summary["refused"] > count // 2, summary
    assert set(summary["kinds"]) == set(MUTATIONS), summary["kinds"]
    print(f"\nfuzz: {count} cases in {summary['seconds']:.1f} s "
          f"({summary['cpu_seconds']:.1f} s CPU) "
          f"({summary['loaded']} loaded, {summary['refused']} refused), slowest case "
          f"{summary['max_cpu'] * 1000:.1f} ms CPU, address-space limit "
          f"{summary['limit_mib']} MiB")


@posix_only
def test_fuzz_loading(tmp_path):
    summary = run_worker(tmp_path, seed=20261130, start=0, count=DEFAULT_CASES)
    check_summary(summary, DEFAULT_CASES)


@posix_only
@pytest.mark.slow
def test_fuzz_loading_long(tmp_path):
    """Many more cases: two workers with seeds of their own, one after the other."""
    half = SLOW_CASES // 2
    for seed in (1000, 1001):
        d = tmp_path / str(seed)
        d.mkdir()
        check_summary(run_worker(d, seed=seed, start=0, count=half), half)


# ------------------------------------------------------------------------------------------
# the worker side: base files, mutations, the independent reader


def pack(header: dict, data: bytes) -> bytes:
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw + data


def hf_config_dict(n_layer, n_head, n_embd, vocab, n_ctx, eps=1e-5) -> dict:
    return {"model_type": "gpt2", "n_layer": n_layer, "n_head": n_head, "n_embd": n_embd,
            "n_positions": n_ctx, "n_ctx": n_ctx, "vocab_size": vocab,
            "layer_norm_epsilon": eps}


def _encode(a: np.ndarray, dtype: str) -> bytes:
    if dtype == "F32":
        return a.astype("<f4").tobytes()
    if dtype == "F16":
        return a.astype("<f2").tobytes()
    return (a.astype("<f4").view("<u4") >> 16).astype("<u2").tobytes()   # BF16, truncated


def make_bases() -> list[tuple[dict, bytes]]:
    """Three small valid files as (header, data), 55-110 KB: F32 with the config in
    __metadata__ and the "transformer." prefix; the original openai layout in F16 (no prefix,
    mask buffers, a tied lm_head, no config: inferred); BF16 with n_embd 32 (only loadable
    through its metadata)."""
    sys.path.insert(0, str(HERE))
    from conftest import param_shapes

    def build(L, H, C, V, T, dtype, prefix, config, buffers=False, lm_head=False, seed=0):
        rng = np.random.default_rng(seed)
        tensors = {prefix + k: (rng.standard_normal(s) * 0.2).astype(np.float32)
                   for k, s in param_shapes(L, C, V, T).items()}
        if buffers:
            for l in range(L):
                tensors[f"h.{l}.attn.bias"] = np.tril(np.ones((T, T), np.float32))[None, None]
                tensors[f"h.{l}.attn.masked_bias"] = np.array(-1e4, np.float32)
        if lm_head:
            tensors["lm_head.weight"] = tensors[prefix + "wte.weight"]
        header, chunks, offset = {}, [], 0
        for name, a in tensors.items():
            b = _encode(a, dtype)
            header[name] = {"dtype": dtype, "shape": list(a.shape),
                            "data_offsets": [offset, offset + len(b)]}
            chunks.append(b)
            offset += len(b)
        if config:
            header["__metadata__"] = {"format": "pt", "gpt2s_config": json.dumps(
                hf_config_dict(L, H, C, V, T, eps=1e-4))}
        return header, b"".join(chunks)

    return [build(2, 4, 32, 40, 12, "F32", "transformer.", True, seed=1),
            build(1, 1, 64, 30, 8, "F16", "", False, buffers=True, lm_head=True, seed=2),
            build(2, 2, 32, 20, 8, "BF16", "transformer.", True, seed=3)]


INTERESTING_INTS = [0, 1, 2, 3, 7, 8, 63, 64, 65, 2**31, 2**32, 2**58, 2**63, 2**64 - 1,
                    2**64, 2**70, -1, -2**63]
DTYPES = ["F32", "F16", "BF16", "F64", "I32", "U8", "BOOL", "F4", "F8_E4M3", "I64", "", "f32",
          7, None]
JSON_BYTES = b'0123456789"{}[],:-.e \\xnNt'


def _tensor_names(header):
    return [k for k in header if k != "__metadata__"]


def mutate_json(rng, header: dict, data: bytes) -> tuple[dict, bytes]:
    """One JSON-level mutation; a step that does not apply to what earlier steps left (an entry
    that is no longer a dict, say) leaves the header as it was."""
    try:
        return _mutate_json(rng, json.loads(json.dumps(header)), data)
    except (KeyError, TypeError, AttributeError, ValueError, IndexError, RecursionError):
        return header, data


def _mutate_json(rng, header: dict, data: bytes) -> tuple[dict, bytes]:
    names = _tensor_names(header)
    name = names[rng.integers(len(names))]
    entry = header[name]
    what = rng.integers(9)
    if what == 0:    # shape
        shape = list(entry["shape"])
        op = rng.integers(8)
        if op == 0 and shape:
            shape[rng.integers(len(shape))] += int(rng.choice([-1, 1]))
        elif op == 1 and shape:
            shape[rng.integers(len(shape))] = int(rng.choice(INTERESTING_INTS))
        elif op == 2:
            shape = shape[::-1]
        elif op == 3:
            shape.insert(int(rng.integers(len(shape) + 1)), 1)
        elif op == 4 and shape:
            shape.pop(int(rng.integers(len(shape))))
        elif op == 5 and shape:
            shape[0] = float(shape[0])
        elif op == 6:
            shape = [2**60] * int(rng.integers(2, 3000))
        else:
            shape = str(shape)
        entry["shape"] = shape
    elif what == 1:  # data offsets
        b, e = entry["data_offsets"]
        op = rng.integers(7)
        if op == 0:
            entry["data_offsets"] = [b + int(rng.integers(-8, 9)), e]
        elif op == 1:
            entry["data_offsets"] = [b, e + int(rng.integers(-8, 9))]
        elif op == 2:
            entry["data_offsets"] = [e, b]
        elif op == 3:
            other = header[names[rng.integers(len(names))]]
            entry["data_offsets"] = list(other["data_offsets"])
        elif op == 4:
            entry["data_offsets"] = [b, int(rng.choice(INTERESTING_INTS))]
        elif op == 5:
            entry["data_offsets"] = [int(rng.choice(INTERESTING_INTS)), e]
        else:
            entry["data_offsets"] = [[b], [b, e, e], None, [float(b), float(e)],
                                     [str(b), str(e)]][rng.integers(5)]
    elif what == 2:  # dtype
        entry["dtype"] = DTYPES[rng.integers(len(DTYPES))]
    elif what == 3:  # rename
        new = ["h.999999999.ln_1.weight", "h.2.ln_1.weight", "h.3.mlp.c_fc.bias",
               name.replace("transformer.", ""), "transformer." + name, "lm_head.weight",
               "h.01.ln_1.weight", "", "h." + "9" * 30 + ".ln_1.weight", "wte.weight",
               "h.0.attn.bias", name.upper()][rng.integers(12)]
        header[new] = header.pop(name)
    elif what == 4:  # delete a tensor (leaves a hole, or a missing parameter)
        del header[name]
        if rng.integers(2):   # ... and close the hole by dropping its bytes
            b, e = entry["data_offsets"]
            if isinstance(b, int) and isinstance(e, int) and 0 <= b <= e <= len(data):
                data = data[:b] + data[e:]
                for k in _tensor_names(header):
                    o = header[k]["data_offsets"]
                    if o[0] >= e:
                        header[k]["data_offsets"] = [o[0] - (e - b), o[1] - (e - b)]
    elif what == 5:  # an extra tensor with its own bytes at the end
        n = int(rng.integers(0, 65))
        new = ["h.999999999.ln_1.weight", "h.2.ln_1.weight", "extra", "h.0.attn.bias",
               "transformer.h.0.attn.masked_bias", "lm_head.weight"][rng.integers(6)]
        header[new] = {"dtype": "F32", "shape": [n],
                       "data_offsets": [len(data), len(data) + 4 * n]}
        data = data + rng.bytes(4 * n)
    elif what == 6:  # the config in the metadata
        md = header.setdefault("__metadata__", {})
        op = rng.integers(6)
        if op == 0:
            header.pop("__metadata__")
        elif op == 1:
            header["__metadata__"] = [["format", "pt"], 3, None][rng.integers(3)]
        elif op == 2:
            md["gpt2s_config"] = {"n_layer": 2}
        elif op == 3:
            md["gpt2s_config"] = ["{", "[]", "null", '"x"', "[" * 5000][rng.integers(5)]
        else:
            try:
                cfg = json.loads(md.get("gpt2s_config", "{}"))
            except ValueError:
                cfg = {}
            key = ["n_layer", "n_head", "n_embd", "vocab_size", "n_positions",
                   "layer_norm_epsilon"][rng.integers(6)]
            cfg[key] = [0, 1, 2, 3, 4, 8, 64, -1, 10**9, 2**64, 1.5, "4", None, 1e-300,
                        1e300][rng.integers(15)]
            md["gpt2s_config"] = json.dumps(cfg)
    elif what == 7:  # a stray top-level value
        header[["__metadata__x", "x", name + "x"][rng.integers(3)]] = \
            [1, "s", None, [], {}, {"dtype": "F32"}][rng.integers(6)]
    else:            # entry keys
        key = ["dtype", "shape", "data_offsets"][rng.integers(3)]
        if rng.integers(2):
            entry.pop(key)
        else:
            entry[key + "x"] = entry.pop(key)
    return header, data


_PACKED = {}


def _packed(header: dict, data: bytes) -> bytes:
    key = id(header), id(data)
    if key not in _PACKED:
        _PACKED[key] = (header, data, pack(header, data))   # holds them: ids stay unique
    return _PACKED[key][2]


def mutate(rng, base_header: dict, base_data: bytes):
    """(kind, file bytes, header bytes unchanged?) of one random mutation."""
    kind = MUTATIONS[rng.integers(len(MUTATIONS))]
    raw = _packed(base_header, base_data)
    n = struct.unpack("<Q", raw[:8])[0]
    if kind == "data-bytes":
        b = bytearray(raw)
        for _ in range(int(rng.integers(1, 9))):
            b[8 + n + int(rng.integers(len(base_data)))] = int(rng.integers(256))
        return kind, bytes(b), True
    if kind == "header-bytes":
        b = bytearray(raw)
        for _ in range(int(rng.integers(1, 5))):
            pos = 8 + int(rng.integers(n))
            b[pos] = (int(rng.integers(256)) if rng.integers(2)
                      else JSON_BYTES[rng.integers(len(JSON_BYTES))])
        return kind, bytes(b), False
    if kind == "header-length":
        new = [n + int(rng.integers(-16, 17)), int(rng.integers(0, 2**63)), 0, len(raw),
               len(raw) - 8, 2**63, 2**64 - 1, n * 2, n // 2,
               100_000_001][rng.integers(10)]
        return kind, struct.pack("<Q", max(new, 0)) + raw[8:], False
    if kind == "truncate":
        cut = [int(rng.integers(len(raw))), len(raw) - int(rng.integers(1, 9)),
               int(rng.integers(0, 9)), 8 + n, 8 + n - 1][rng.integers(5)]
        return kind, raw[:cut], False
    if kind == "append":
        return kind, raw + rng.bytes(int(rng.integers(1, 65))), False
    if kind == "json":
        header, data = base_header, base_data
        for _ in range(int(rng.integers(1, 4))):
            header, data = mutate_json(rng, header, data)
        return kind, pack(header, data), False
    if kind == "json-duplicate-key":
        text = json.dumps(base_header)
        names = _tensor_names(base_header)
        k = names[rng.integers(len(names))]
        dup = json.dumps({k: base_header[k]})[1:-1]
        text = "{" + dup + ", " + text[1:]
        hraw = text.encode()
        hraw += b" " * (-len(hraw) % 8)
        return kind, struct.pack("<Q", len(hraw)) + hraw + base_data, False
    # "json+data": a header mutation and data bytes
    header, data = mutate_json(rng, base_header, base_data)
    b = bytearray(pack(header, data))
    if len(b) > 8:
        b[-1 - int(rng.integers(min(len(b) - 8, len(data) + 1)))] ^= 0xFF
    return kind, bytes(b), False


MUTATIONS = ["data-bytes", "header-bytes", "header-length", "truncate", "append", "json",
             "json-duplicate-key", "json+data"]


def reference_tensors(raw: bytes) -> dict:
    """{name: float32 array} decoded here, for a file gpt2s accepted (so well-formed)."""
    n = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8:8 + n])
    header.pop("__metadata__", None)
    data = raw[8 + n:]
    out = {}
    for name, info in header.items():
        if info["dtype"] not in ("F32", "F16", "BF16"):
            continue
        b, e = info["data_offsets"]
        chunk = data[b:e]
        if info["dtype"] == "F32":
            a = np.frombuffer(chunk, "<f4").astype(np.float32)
        elif info["dtype"] == "F16":
            a = np.frombuffer(chunk, "<f2").astype(np.float32)
        else:
            a = (np.frombuffer(chunk, "<u2").astype(np.uint32) << 16).view(np.float32)
        out[name.removeprefix("transformer.")] = a.reshape(info["shape"])
    return out


def check_loaded(m, raw: bytes, path):
    ref = reference_tensors(raw)
    for name, value in m.params.items():
        expect = ref[name]
        assert value.shape == expect.shape, name
        assert np.array_equal(value.view(np.uint32), expect.view(np.uint32)), name
    try:
        from safetensors import safe_open
    except ImportError:
        pass
    else:
        with safe_open(str(path), "np") as f:   # raises if the library refuses the file
            f.keys()
    for name, value in m.params.items():
        assert np.isfinite(value).all(), f"{name}: a non-finite weight was loaded"
    T = min(4, m.config.n_ctx)
    logits, _ = m.forward(np.arange(T) % m.config.vocab_size)
    assert logits.shape == (1, T, m.config.vocab_size)
    if all(np.all(np.abs(v) < 1e3) for v in m.params.values()):
        assert np.isfinite(logits).all(), "non-finite logits from finite, moderate weights"


def nonfinite_parameter(raw: bytes) -> bool:
    """A tensor gpt2s reads (not a mask buffer h.N.attn.bias / masked_bias) holds a NaN or an
    infinity."""
    return any(not np.isfinite(a).all() for name, a in reference_tensors(raw).items()
               if not re.fullmatch(r"h\.\d+\.attn\.(bias|masked_bias)", name))


def lm_head_tie_broken(raw: bytes) -> bool:
    ref = reference_tensors(raw)
    return "lm_head.weight" in ref and not np.array_equal(
        ref["lm_head.weight"].view(np.uint32), ref["wte.weight"].view(np.uint32))


def vm_size() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmSize:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmSize")


def run_case(seed, i, bases, path, GPT2, SafetensorsError):
    """One case: returns (kind, outcome, cpu seconds); raises AssertionError on a failure."""
    rng = np.random.default_rng([seed, i])
    kind, raw, header_intact = mutate(rng, *bases[i % len(bases)])
    # a new file each time: ext4 flushes a file truncated and rewritten in place (~6 ms)
    path.unlink(missing_ok=True)
    path.write_bytes(raw)
    t0 = time.process_time()
    try:
        m = GPT2.from_safetensors(path)
    except SafetensorsError:
        cpu = time.process_time() - t0
        if header_intact and not lm_head_tie_broken(raw) and not nonfinite_parameter(raw):
            raise AssertionError("a data-only mutation of a valid file was refused")
        return kind, "refused", cpu
    cpu = time.process_time() - t0
    check_loaded(m, raw, path)
    return kind, "loaded", cpu


def worker(seed: int, start: int, count: int, tmpdir: str):
    import resource

    from gpt2s import GPT2, SafetensorsError

    bases = make_bases()
    path = Path(tmpdir) / "case.safetensors"
    for b in bases:   # warm up: every code path's allocations and the thread pool exist
        path.write_bytes(pack(*b))
        GPT2.from_safetensors(path).forward(np.arange(4))
    from safetensors import safe_open  # noqa: F401 - imported before the limit
    limit = vm_size() + HEADROOM
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    try:   # the limit must bite, or the test would prove nothing about allocations
        np.empty(2 * HEADROOM, np.uint8)
    except MemoryError:
        pass
    else:
        raise SystemExit("RLIMIT_AS is not enforced here")

    t_start, cpu_start = time.perf_counter(), time.process_time()
    stats = {"loaded": 0, "refused": 0, "max_cpu": 0.0, "kinds": {}}
    for i in range(start, start + count):
        try:
            kind, outcome, cpu = run_case(seed, i, bases, path, GPT2, SafetensorsError)
        except BaseException as e:  # noqa: BLE001 - every other exception is the failure
            try:
                kind = mutate(np.random.default_rng([seed, i]), *bases[i % len(bases)])[0]
            except Exception:  # noqa: BLE001 - the mutation itself failed: a test bug
                kind = "mutation"
            tb = "".join(traceback.format_exception(type(e), e, e.__traceback__))[-2000:]
            print("FAIL " + json.dumps({"case": i, "kind": kind, "error": tb}), flush=True)
            continue
        stats[outcome] += 1
        stats["max_cpu"] = max(stats["max_cpu"], cpu)
        stats["kinds"][kind] = stats["kinds"].get(kind, 0) + 1
        print(f"R {i} {kind} {outcome}", flush=True)
    stats.update(cases=count, seconds=time.perf_counter() - t_start,
                 cpu_seconds=time.process_time() - cpu_start, limit_mib=limit >> 20)
    print("DONE " + json.dumps(stats), flush=True)


def replay(seed: int, i: int):
    """Run one case in this process and let any failure propagate with its traceback."""
    import tempfile

    from gpt2s import GPT2, SafetensorsError

    bases = make_bases()
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "case.safetensors"
        print(run_case(seed, i, bases, path, GPT2, SafetensorsError))
        try:
            GPT2.from_safetensors(path)
        except SafetensorsError as e:
            print("SafetensorsError:", e)


if __name__ == "__main__":
    if sys.argv[1] == "--worker":
        worker(int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5])
    elif sys.argv[1] == "--replay":
        replay(int(sys.argv[2]), int(sys.argv[3]))
