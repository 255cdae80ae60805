"""GPT2.from_pretrained and gpt2s.hub: names resolved from a Hugging Face cache laid out as
huggingface_hub lays it out (blobs named by hash, snapshots/<commit>/ symlinks into them,
refs/main naming the commit), the bundled demo model, paths, and the errors when a model is
absent.  Nothing is downloaded: the download path is exercised with a stand-in for
huggingface_hub.hf_hub_download, and every test runs with HF_HUB_OFFLINE=1 unless it replaces
the download itself."""

from __future__ import annotations

import contextlib
import hashlib
import http.server
import os
import socket
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

import gpt2s
from gpt2s import GPT2, GPT2Config
from gpt2s import hub
from gpt2s.hub import ModelNotFound

COMMIT_OLD = "1" * 40
COMMIT_MAIN = "607a30d783dfa663caf39e06633721c8d4cfcd7e"


@pytest.fixture(autouse=True)
def isolated_env(monkeypatch, tmp_path):
    """No user cache, no network: HF_HUB_CACHE points at an empty temporary directory."""
    for var in ("HF_HOME", "HUGGINGFACE_HUB_CACHE", "XDG_CACHE_HOME", "GPT2S_MODEL"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def tiny_model(seed):
    return GPT2.from_config(GPT2Config.preset("tiny", n_ctx=32), seed=seed)


def add_to_cache(hub_dir: Path, repo_id: str, model: GPT2, commit: str, set_main=True,
                 folder=None) -> Path:
    """Store model under hub_dir exactly as huggingface_hub does: the files as blobs named by
    their hash, snapshots/<commit>/<file> relative symlinks to them, refs/main = commit."""
    repo = hub_dir / (folder or "models--" + repo_id.replace("/", "--"))
    src = hub_dir.parent / f"src-{repo.name}-{commit[:6]}"
    model.save_safetensors(src)
    (repo / "blobs").mkdir(parents=True, exist_ok=True)
    snap = repo / "snapshots" / commit
    snap.mkdir(parents=True)
    for name in ("model.safetensors", "config.json"):
        data = (src / name).read_bytes()
        blob = hashlib.sha256(data).hexdigest()
        (repo / "blobs" / blob).write_bytes(data)
        (snap / name).symlink_to(Path("..") / ".." / "blobs" / blob)
    if set_main:
        (repo / "refs").mkdir(exist_ok=True)
        (repo / "refs" / "main").write_text(commit)
    return snap


def assert_same_weights(a: GPT2, b: GPT2):
    assert a.config == b.config
    for name, value in a.params.items():
        np.testing.assert_array_equal(b.params[name], value, err_msg=name)


def test_names_resolve_from_the_cache(tmp_path):
    hub_dir = tmp_path / "hub"
    old, new = tiny_model(1), tiny_model(2)
    snap = add_to_cache(hub_dir, "openai-community/gpt2", new, COMMIT_MAIN)
    # a newer snapshot that refs/main does not name (e.g. another revision downloaded later)
    add_to_cache(hub_dir, "openai-community/gpt2", old, COMMIT_OLD, set_main=False)
    os.utime(hub_dir / "models--openai-community--gpt2" / "snapshots" / COMMIT_OLD,
             (2e9, 2e9))
    assert hub.resolve_pretrained("gpt2") == snap            # refs/main picks the snapshot
    assert hub.resolve_pretrained("openai-community/gpt2") == snap
    assert_same_weights(new, GPT2.from_pretrained("gpt2"))
    assert_same_weights(new, GPT2.from_pretrained("openai-community/gpt2", dtype="float32"))
    # every size by its short name
    for i, size in enumerate(("gpt2-medium", "gpt2-large", "gpt2-xl")):
        m = tiny_model(10 + i)
        add_to_cache(hub_dir, f"openai-community/{size}", m, COMMIT_MAIN)
        assert_same_weights(m, GPT2.from_pretrained(size))


def test_cache_location_and_legacy_folder(tmp_path, monkeypatch):
    m = tiny_model(3)
    home = tmp_path / "hf-home"
    # caches made before 2024 hold the checkpoint as models--gpt2; no refs/main: newest snapshot
    snap = add_to_cache(home / "hub", "gpt2", m, COMMIT_MAIN, set_main=False)
    monkeypatch.delenv("HF_HUB_CACHE")
    monkeypatch.setenv("HF_HOME", str(home))
    assert hub.resolve_pretrained("gpt2") == snap
    assert_same_weights(m, GPT2.from_pretrained("gpt2"))
    monkeypatch.delenv("HF_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "user"))
    default = tmp_path / "user" / ".cache" / "huggingface" / "hub"
    assert hub.hub_cache_dirs() == [default]
    with pytest.raises(ModelNotFound, match=str(default)):
        GPT2.from_pretrained("gpt2")


def test_absent_model_error(tmp_path):
    with pytest.raises(ModelNotFound) as e:
        GPT2.from_pretrained("gpt2-xl")
    msg = str(e.value)
    for fragment in ("gpt2-xl: not in the Hugging Face cache", "HF_HUB_OFFLINE",
                     str(tmp_path / "hub" / "models--openai-community--gpt2-xl"),
                     "hf download openai-community/gpt2-xl model.safetensors config.json"):
        assert fragment in msg, (fragment, msg)
    assert "\n" not in msg, msg
    assert isinstance(e.value, FileNotFoundError)
    # a snapshot whose blob was deleted (dangling symlink) is not a model
    snap = add_to_cache(tmp_path / "hub", "openai-community/gpt2", tiny_model(0), COMMIT_MAIN)
    os.unlink((snap / "model.safetensors").resolve())
    with pytest.raises(ModelNotFound, match="not in the Hugging Face cache"):
        GPT2.from_pretrained("gpt2")
    with pytest.raises(ModelNotFound, match=r"nonsense: no such file or directory, and not a "
                                            r"model name \(\"demo\", \"gpt2\""):
        GPT2.from_pretrained("nonsense")
    with pytest.raises(ModelNotFound, match="local_files_only"):
        GPT2.from_pretrained("gpt2-large", local_files_only=True)


def test_without_huggingface_hub(monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)    # import fails
    with pytest.raises(ModelNotFound, match=r"huggingface_hub is not installed.*"
                                            r"pip install 'gpt2s\[hub\]'.*hf download"):
        GPT2.from_pretrained("gpt2-medium")


@contextlib.contextmanager
def local_endpoint(answer: bool):
    """A stand-in for https://huggingface.co on 127.0.0.1: answer=True serves 404 to every
    request (a Hub that is up); False accepts each connection and closes it at once (a
    network that fails).  Yields (url, the number of connections accepted so far)."""
    connections = []
    if answer:
        class Handler(http.server.BaseHTTPRequestHandler):
            def do_HEAD(self):
                connections.append(1)
                self.send_response(404)
                self.end_headers()

            do_GET = do_HEAD

            def log_message(self, *a):
                pass

        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        thread = threading.Thread(target=server.serve_forever, daemon=True)
        thread.start()
        try:
            yield f"http://127.0.0.1:{server.server_address[1]}", connections
        finally:
            server.shutdown()
            server.server_close()
        return
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(16)
    stop = threading.Event()

    def serve():
        sock.settimeout(0.2)
        while not stop.is_set():
            try:
                conn, _ = sock.accept()
            except OSError:
                continue
            connections.append(1)
            conn.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}", connections
    finally:
        stop.set()
        thread.join()
        sock.close()


def test_unreachable_hub_fails_at_once_in_one_line(monkeypatch, tmp_path):
    """huggingface_hub retries a failed connection five times with back-off (half a minute);
    gpt2s tries once, then says in one line that the model is not cached and how to get it."""
    pytest.importorskip("huggingface_hub")
    monkeypatch.delenv("HF_HUB_OFFLINE")
    with local_endpoint(answer=False) as (url, connections):
        monkeypatch.setenv("HF_ENDPOINT", url)
        with pytest.raises(ModelNotFound) as e:
            GPT2.from_pretrained("gpt2")
        assert len(connections) == 1, connections
    msg = str(e.value)
    assert "\n" not in msg, msg
    for fragment in ("gpt2: not in the Hugging Face cache",
                     str(tmp_path / "hub" / "models--openai-community--gpt2"),
                     f"{url} cannot be reached",
                     "hf download openai-community/gpt2 model.safetensors config.json"):
        assert fragment in msg, (fragment, msg)
    # huggingface_hub is installed: no advice to install it; no truncated text
    assert "gpt2s[hub]" not in msg and "pip install" not in msg and ".." not in msg, msg


def test_offline_hub_cli_one_line(tmp_path):
    """generate --model gpt2 with HF_HUB_OFFLINE=1 and nothing cached: one line, exit 2."""
    pytest.importorskip("huggingface_hub")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE_"))}
    env.update(HF_HUB_CACHE=str(tmp_path / "hub"), HF_HUB_OFFLINE="1")
    p = subprocess.run([sys.executable, "-m", "gpt2s.generate", "--model", "gpt2", "Hi"],
                       capture_output=True, text=True, timeout=300, env=env)
    assert p.returncode == 2, p.stderr
    assert p.stdout == ""
    lines = p.stderr.splitlines()
    assert len(lines) == 1, p.stderr
    for fragment in ("python -m gpt2s.generate: error: --model gpt2: not in the Hugging Face "
                     "cache", "HF_HUB_OFFLINE is set", "hf download openai-community/gpt2"):
        assert fragment in lines[0], (fragment, lines[0])
    assert "gpt2s[hub]" not in lines[0]


def test_download_through_huggingface_hub(monkeypatch, tmp_path):
    huggingface_hub = pytest.importorskip("huggingface_hub")
    monkeypatch.delenv("HF_HUB_OFFLINE")
    # the Hub is up (a local server answers), the download itself is a stand-in
    with local_endpoint(answer=True) as (url, connections):
        monkeypatch.setenv("HF_ENDPOINT", url)
        _download_through_huggingface_hub(monkeypatch, tmp_path, huggingface_hub)
        assert connections       # the Hub was asked once per download before the download


def _download_through_huggingface_hub(monkeypatch, tmp_path, huggingface_hub):
    m = tiny_model(5)
    calls = []

    def fake_download(repo_id, filename, cache_dir=None, **kwargs):
        """What hf_hub_download leaves behind, without the network."""
        calls.append((repo_id, filename, Path(cache_dir)))
        repo = Path(cache_dir) / ("models--" + repo_id.replace("/", "--"))
        if not (repo / "snapshots").exists():
            add_to_cache(Path(cache_dir), repo_id, m, COMMIT_MAIN)
        return str(repo / "snapshots" / COMMIT_MAIN / filename)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
    loaded = GPT2.from_pretrained("gpt2-large")
    assert_same_weights(m, loaded)
    assert calls == [("openai-community/gpt2-large", f, tmp_path / "hub")
                     for f in ("model.safetensors", "config.json")]

    def failing(*a, **k):
        raise OSError("We couldn't connect to 'https://huggingface.co'\nmore detail")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", failing)
    with pytest.raises(ModelNotFound, match="downloading it with huggingface_hub failed: "
                                            "OSError: We couldn't connect"):
        GPT2.from_pretrained("gpt2-xl")


def test_demo_and_paths(tmp_path, monkeypatch):
    demo = GPT2.from_pretrained("demo")
    demo_dir = Path(gpt2s.__file__).parent / "assets" / "demo"
    assert_same_weights(GPT2.from_safetensors(demo_dir), demo)
    assert demo.config.n_layer == 4
    # a path works as in from_safetensors, and wins over a name
    m = tiny_model(7)
    m.save_safetensors(tmp_path / "gpt2")
    monkeypatch.chdir(tmp_path)
    assert_same_weights(m, GPT2.from_pretrained("gpt2"))
    assert_same_weights(m, GPT2.from_pretrained(tmp_path / "gpt2" / "model.safetensors"))
    (tmp_path / "runs").mkdir()          # "runs/mini" is then a mistyped path, not a repo id
    with pytest.raises(ModelNotFound, match="runs/mini: no such file or directory, and not a "
                                            "model name"):
        GPT2.from_pretrained("runs/mini")
    # the storage dtype goes through to from_safetensors
    bf16 = GPT2.from_pretrained("demo", dtype="bfloat16")
    assert bf16.dtype == "bfloat16"
    with pytest.raises(ValueError, match="dtype"):
        GPT2.from_pretrained("demo", dtype="float8")
    # from_safetensors("demo") with no such file points to from_pretrained
    with pytest.raises(FileNotFoundError, match=r"demo: no such file or directory; to load the "
                                                r"bundled demo model by name use "
                                                r"GPT2.from_pretrained\('demo'\)"):
        GPT2.from_safetensors("demo")
    with pytest.raises(FileNotFoundError, match=r"from_pretrained\('gpt2-xl'\)"):
        GPT2.from_safetensors("gpt2-xl")


def test_generate_shares_the_resolver(tmp_path):
    """`python -m gpt2s.generate --model NAME` resolves names with hub.resolve_pretrained, and
    without --model finds the cached GPT-2 the same way."""
    from gpt2s.generate import find_model
    env = {"HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1"}
    with pytest.raises(ModelNotFound, match="--model gpt2-medium: not in the Hugging Face cache"):
        find_model("gpt2-medium", env=env, cwd=tmp_path)
    snap = add_to_cache(tmp_path / "hub", "openai-community/gpt2-medium", tiny_model(8),
                        COMMIT_MAIN)
    assert find_model("gpt2-medium", env=env, cwd=tmp_path) == snap
    assert find_model("demo", env=env, cwd=tmp_path) == hub.DEMO_DIR
    snap2 = add_to_cache(tmp_path / "hub", "openai-community/gpt2", tiny_model(9), COMMIT_MAIN)
    assert find_model(env=env, cwd=tmp_path) == snap2
    run_env = dict(os.environ, OMP_NUM_THREADS="1", **env)
    run_env.pop("GPT2S_MODEL", None)
    p = subprocess.run([sys.executable, "-m", "gpt2s.generate", "--model", "gpt2-medium", "Hi",
                        "-n", "2", "--seed", "0", "--verbose"], env=run_env, cwd=tmp_path,
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    assert f"model: {snap}" in p.stderr


def crafted_refs(hub_dir: Path, tmp_path: Path) -> dict:
    """refs/main contents that name no snapshot of the cache, each pointing at a model of its
    own placed where the path would lead (outside the cache, or not a direct child of
    snapshots/), so that following it would load that model."""
    repo = hub_dir / "models--openai-community--gpt2"
    outside = tmp_path / "outside"
    tiny_model(20).save_safetensors(outside)
    tiny_model(21).save_safetensors(repo / "snapshots" / "nested" / "deeper")
    tiny_model(22).save_safetensors(repo / "snapshots")   # the folder itself
    return {"relative path out of the cache": "../../../outside",
            "absolute path": str(outside),
            "name with a slash": "nested/deeper",
            "empty file": "",
            "whitespace": "  \n",
            "a hash with a path after it": COMMIT_MAIN + "/../../../../outside",
            "very long file": "a" * 100_000}


def test_crafted_refs_main_is_refused(tmp_path):
    """refs/main must hold a commit hash, which names a direct child of snapshots/; anything
    else is refused naming refs/main, rather than followed out of the cache (or into a nested
    folder) or silently replaced by another snapshot."""
    hub_dir = tmp_path / "hub"
    add_to_cache(hub_dir, "openai-community/gpt2", tiny_model(2), COMMIT_MAIN)
    ref = hub_dir / "models--openai-community--gpt2" / "refs" / "main"
    for name, text in crafted_refs(hub_dir, tmp_path).items():
        ref.write_text(text)
        with pytest.raises(hub.CacheError) as e:
            GPT2.from_pretrained("gpt2")
        assert str(e.value).startswith(f"{ref}: does not hold a commit hash"), (name, e.value)
        assert len(str(e.value)) < len(str(ref)) + 300, (name, e.value)
    ref.write_text(COMMIT_MAIN + "\n")   # as huggingface_hub writes it, give or take a newline
    assert hub.resolve_pretrained("gpt2") == ref.parent.parent / "snapshots" / COMMIT_MAIN


def test_crafted_refs_main_at_the_command_line(tmp_path):
    hub_dir = tmp_path / "hub"
    add_to_cache(hub_dir, "openai-community/gpt2", tiny_model(2), COMMIT_MAIN)
    ref = hub_dir / "models--openai-community--gpt2" / "refs" / "main"
    ref.write_text(crafted_refs(hub_dir, tmp_path)["relative path out of the cache"])
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_CACHE=str(hub_dir), HF_HUB_OFFLINE="1")
    env.pop("GPT2S_MODEL", None)
    p = subprocess.run([sys.executable, "-m", "gpt2s.generate", "--model", "gpt2", "Hi", "-n",
                        "2"], env=env, cwd=tmp_path, capture_output=True, text=True,
                       timeout=300)
    assert p.returncode == 2, (p.returncode, p.stdout, p.stderr)
    assert p.stdout == "" and p.stderr.count("\n") == 1, p.stderr
    assert p.stderr.startswith(f"python -m gpt2s.generate: error: {ref}: does not hold a "
                               f"commit hash"), p.stderr
