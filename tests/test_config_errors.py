"""A config.json (or the config a gpt2s file carries in its __metadata__) that is not what a
config can be fails with an error naming the file and the field: bytes that are not UTF-8,
integers longer than Python converts, NaN and Infinity (which JSON does not have), a value of
the wrong type where a size or a name goes.  The command-line tools print that error on one
line and exit with status 2.

Every config here is written as text by hand, next to a model file built with a config
json.dumps writes.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from gpt2s import GPT2, GPT2Config, SafetensorsError

GOOD = {"model_type": "gpt2", "n_layer": 2, "n_head": 2, "n_embd": 64, "vocab_size": 64,
        "n_positions": 32, "layer_norm_epsilon": 1e-5}
DIGITS = "9" * 5000


def text_with(key, literal, base=GOOD) -> str:
    """config.json text with key's value written as the JSON text literal."""
    return json.dumps({**base, key: "@"}).replace('"@"', literal)


# name: (config.json bytes, words the message holds besides the file)
BAD_CONFIGS = {
    "byte 0xff": (b"\xff" + json.dumps(GOOD).encode(), ["UTF-8", "0xff"]),
    "latin-1 text": (json.dumps({**GOOD, "name": "caf\u00e9"}).encode("latin-1")
                     .replace(b"\\u00e9", b"\xe9"), ["UTF-8", "0xe9"]),
    "5000-digit n_layer": (text_with("n_layer", DIGITS).encode(), ["n_layer", "5000 digits"]),
    "5000-digit unread key": (text_with("bos_token_id", DIGITS).encode(),
                              ["bos_token_id", "5000 digits"]),
    "NaN epsilon": (text_with("layer_norm_epsilon", "NaN").encode(),
                    ["layer_norm_epsilon", "NaN"]),
    "Infinity n_embd": (text_with("n_embd", "Infinity").encode(), ["n_embd", "Infinity"]),
    "-Infinity in an unread key": (text_with("attn_pdrop", "-Infinity").encode(),
                                   ["attn_pdrop", "-Infinity"]),
    "NaN nested in an unread key": (text_with("task_specific_params",
                                              '{"text-generation": {"top_p": NaN}}').encode(),
                                    ["task_specific_params.text-generation.top_p", "NaN"]),
    "activation_function a list": (text_with("activation_function", '["gelu"]').encode(),
                                   ["activation_function", "['gelu']"]),
    "n_positions a string": (text_with("n_positions", '"32"').encode(), ["n_positions", "'32'"]),
}


@pytest.fixture(scope="module")
def model_file(tmp_path_factory):
    d = tmp_path_factory.mktemp("weights")
    GPT2.from_config(GPT2Config.from_hf_dict(GOOD), seed=0).save_safetensors(d)
    return d / "model.safetensors"


def model_dir_with(tmp_path, model_file, config: bytes):
    d = tmp_path / "model"
    d.mkdir()
    os.link(model_file, d / "model.safetensors")
    (d / "config.json").write_bytes(config)
    return d


@pytest.mark.parametrize("name", list(BAD_CONFIGS))
def test_config_json_error_names_file_and_field(tmp_path, model_file, name):
    config, words = BAD_CONFIGS[name]
    d = model_dir_with(tmp_path, model_file, config)
    with pytest.raises(ValueError) as e:
        GPT2.from_safetensors(d)
    msg = str(e.value)
    assert msg.startswith(f"{d / 'config.json'}: "), msg
    why = msg[len(f"{d / 'config.json'}: "):]   # (the test's directory is named after the case)
    assert all(w in why for w in words), msg
    assert len(why) < 300, msg


@pytest.mark.parametrize("name", ["NaN epsilon", "Infinity n_embd", "5000-digit unread key",
                                  "NaN nested in an unread key"])
def test_metadata_config_error_names_file_and_field(tmp_path, model_file, name):
    """The same config text as the __metadata__ config of a single file."""
    config, words = BAD_CONFIGS[name]
    raw = model_file.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + n])
    header["__metadata__"]["gpt2s_config"] = config.decode()
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    path = tmp_path / "m.safetensors"
    path.write_bytes(len(text).to_bytes(8, "little") + text + raw[8 + n:])
    with pytest.raises(SafetensorsError) as e:
        GPT2.from_safetensors(path)
    msg = str(e.value)
    assert msg.startswith(f"{path}: __metadata__['gpt2s_config']: "), msg
    why = msg[len(f"{path}: __metadata__['gpt2s_config']: "):]
    assert all(w in why for w in words), msg


@pytest.mark.parametrize("tool,extra", [
    ("generate", ["x", "--max-new-tokens", "1"]),
    ("eval", ["{data}", "-q"]),
    ("train", ["{data}", "--out", "{out}", "--steps", "1", "--warmup", "0", "--seq-len", "16",
               "--val-fraction", "0"]),
])
@pytest.mark.parametrize("name", ["byte 0xff", "5000-digit n_layer", "NaN epsilon"])
def test_cli_prints_one_line(tmp_path, model_file, tool, extra, name):
    config, words = BAD_CONFIGS[name]
    d = model_dir_with(tmp_path, model_file, config)
    data = tmp_path / "data.txt"
    data.write_text("To be, or not to be, that is the question. " * 20)
    args = [a.format(data=data, out=tmp_path / "run") for a in extra]
    p = subprocess.run([sys.executable, "-m", f"gpt2s.{tool}", "--model", str(d), *args],
                       capture_output=True, text=True, timeout=300,
                       env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert p.returncode == 2, (p.returncode, p.stdout, p.stderr)
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1, p.stderr
    assert lines[0].startswith(f"python -m gpt2s.{tool}: error: "), lines[0]
    assert "config.json: " in lines[0], lines[0]
    why = lines[0].split("config.json: ", 1)[1]
    assert all(w in why for w in words), lines[0]
