"""Where a pretrained model's files are: the bundled demo, a local path, the Hugging Face cache,
or (when ``huggingface_hub`` is installed and the network allows) a download into that cache.

``GPT2.from_pretrained`` and the command-line tools (``find_model``) resolve names here.  The
cache is read as huggingface_hub lays it out, without importing it::

    $HF_HUB_CACHE (else $HF_HOME/hub, else ~/.cache/huggingface/hub)
      models--openai-community--gpt2/
        refs/main                       the commit hash of the snapshot "main" points to
                                        (nothing else is followed: a path there is refused)
        snapshots/<hash>/model.safetensors, config.json   (symlinks into ../../blobs/)

so a model downloaded once by transformers, the ``hf`` command or gpt2s loads with no network.
"""

from __future__ import annotations

import glob
import os
import re
from pathlib import Path

__all__ = ["resolve_pretrained", "ModelNotFound", "CacheError", "hub_cache_dirs",
           "cached_snapshot", "PRETRAINED", "DEMO_DIR", "HF_DOWNLOAD", "pretrained_hint",
           "find_model", "download_hint"]

DEMO_DIR = Path(__file__).resolve().parent / "assets" / "demo"
# short names -> Hugging Face repo ids (the official GPT-2 checkpoints moved from "gpt2" to
# "openai-community/gpt2" in 2024; caches made before that hold models--gpt2)
PRETRAINED = {
    "gpt2": "openai-community/gpt2",
    "gpt2-medium": "openai-community/gpt2-medium",
    "gpt2-large": "openai-community/gpt2-large",
    "gpt2-xl": "openai-community/gpt2-xl",
}
FILES = ("model.safetensors", "config.json")
# huggingface_hub's command-line program (``hf``; it replaced ``huggingface-cli``)
HF_DOWNLOAD = "hf download openai-community/gpt2 model.safetensors config.json --local-dir assets"


class ModelNotFound(FileNotFoundError):
    """No model at the given path or under the given name (the message says where it looked)."""


def hub_cache_dirs(env=None) -> list[Path]:
    """The Hugging Face hub cache directory, found as huggingface_hub finds it."""
    env = os.environ if env is None else env
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if env.get(var):
            return [Path(env[var]).expanduser()]
    if env.get("HF_HOME"):
        return [Path(env["HF_HOME"]).expanduser() / "hub"]
    cache = (Path(env["XDG_CACHE_HOME"]).expanduser() if env.get("XDG_CACHE_HOME")
             else Path(env.get("HOME") or Path.home()).expanduser() / ".cache")
    return [cache / "huggingface" / "hub"]


def cache_folders(repo_id: str) -> list[str]:
    """Cache folder names that may hold repo_id: its own, and the pre-2024 name of the GPT-2
    checkpoints (models--gpt2 for openai-community/gpt2)."""
    names = ["models--" + repo_id.replace("/", "--")]
    if repo_id.startswith("openai-community/"):
        names.append("models--" + repo_id.split("/", 1)[1])
    return names


# what huggingface_hub writes to refs/main: the commit's hash (40 hex digits; abbreviated,
# or SHA-256, accepted too): hex digits alone cannot name anything but a child of snapshots/
_COMMIT_HASH = re.compile(r"[0-9a-fA-F]{4,64}")


class CacheError(ValueError):
    """A Hugging Face cache entry gpt2s will not follow (the message names the file)."""


def _main_commit(ref: Path) -> str:
    """The commit hash refs/main holds.  Anything else (a path, a name with a slash, an empty
    or a huge file) would point outside the repo's snapshots/ directory: refused."""
    with open(ref, "rb") as f:
        raw = f.read(129)
    text = raw.decode("ascii", "replace").strip()
    if not _COMMIT_HASH.fullmatch(text):
        shown = "more than 128 bytes" if len(raw) > 128 else repr(text) if text else "empty"
        raise CacheError(f"{ref}: does not hold a commit hash ({shown}), so it names no "
                         f"snapshot of this cache; delete it, or the cached repo, and "
                         f"download again")
    return text


def cached_snapshot(repo_dir: Path) -> Path | None:
    """The snapshot directory of a cached repo that has model.safetensors: the one refs/main
    names (a commit hash: a direct child of snapshots/), else the most recently modified.  A
    dangling symlink (blob deleted) does not count.  Raises CacheError when refs/main holds
    anything but a commit hash."""
    ref = repo_dir / "refs" / "main"
    if ref.is_file():
        snap = repo_dir / "snapshots" / _main_commit(ref)
        if (snap / "model.safetensors").is_file():
            return snap
    snaps = [Path(p).parent for p in glob.glob(str(repo_dir / "snapshots" / "*" /
                                                   "model.safetensors"))
             if Path(p).is_file()]
    return max(snaps, key=lambda p: p.stat().st_mtime) if snaps else None


def find_cached(repo_id: str, env=None) -> tuple[Path | None, list[str]]:
    """(snapshot directory or None, the places looked at)."""
    tried = []
    for hub in hub_cache_dirs(env):
        for folder in cache_folders(repo_id):
            snap = cached_snapshot(hub / folder)
            if snap is not None:
                return snap, tried
            tried.append(f"{hub / folder}/snapshots/*/model.safetensors")
    return None, tried


def repo_id_of(name: str) -> str | None:
    """The Hugging Face repo id a name stands for, or None if it is not a model name."""
    if name in PRETRAINED:
        return PRETRAINED[name]
    parts = name.split("/")
    if len(parts) == 2 and all(parts) and not name.startswith((".", "~")) \
            and not name.endswith(".safetensors") and not Path(parts[0]).is_dir():
        return name      # "owner/name"; not when "owner" is a local directory (a path typo)
    return None


_OFFLINE_VALUES = ("1", "true", "yes", "on")


def _hub_offline(env) -> bool:
    """HF_HUB_OFFLINE (or transformers' TRANSFORMERS_OFFLINE) set, as huggingface_hub reads it."""
    return any(str(env.get(v, "")).strip().lower() in _OFFLINE_VALUES
               for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def _unreachable(endpoint: str, timeout: float = 10.0) -> str | None:
    """None when ``endpoint`` answers (any HTTP status), else why not, in a few words.  One
    request, no retries (huggingface_hub retries a failed connection five times, backing off
    for half a minute, before it gives up)."""
    import http.client
    import urllib.error
    import urllib.request
    try:
        urllib.request.urlopen(urllib.request.Request(endpoint, method="HEAD"),
                               timeout=timeout).close()
    except urllib.error.HTTPError:
        return None                      # a server answered: the network works
    except (urllib.error.URLError, OSError, http.client.HTTPException, ValueError) as e:
        reason = getattr(e, "reason", None) or e
        text = str(reason).strip() or type(reason).__name__
        return text.splitlines()[0]
    return None


def _download(repo_id: str, env) -> Path:
    """Download model.safetensors and config.json into the cache; the snapshot directory.
    Raises ModelNotFound with the reason (in words that follow "and ...") when
    huggingface_hub is missing, offline mode is set, the Hub cannot be reached or the
    download fails."""
    if _hub_offline(env):
        raise ModelNotFound("HF_HUB_OFFLINE is set, so it was not downloaded")
    try:
        import huggingface_hub
        from huggingface_hub import constants
    except ImportError:
        raise ModelNotFound("huggingface_hub is not installed, so it could not be "
                            "downloaded") from None
    endpoint = env.get("HF_ENDPOINT") or constants.ENDPOINT
    why = _unreachable(endpoint)
    if why is not None:
        raise ModelNotFound(f"{endpoint} cannot be reached ({why})")
    cache_dir = hub_cache_dirs(env)[0]
    try:
        path = huggingface_hub.hf_hub_download(repo_id, "model.safetensors",
                                               cache_dir=cache_dir, endpoint=endpoint)
        try:
            huggingface_hub.hf_hub_download(repo_id, "config.json", cache_dir=cache_dir,
                                            endpoint=endpoint)
        except Exception:
            pass   # optional: the config is inferred from the tensor shapes without it
    except Exception as e:   # unknown repo, no model.safetensors, HTTP errors, lost network
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise ModelNotFound(f"downloading it with huggingface_hub failed: "
                            f"{type(e).__name__}: {first}") from None
    return Path(path).parent


def _have_hub() -> bool:
    import importlib.util
    try:
        return importlib.util.find_spec("huggingface_hub") is not None
    except (ImportError, ValueError):
        return False


def download_hint(repo_id: str) -> str:
    """How to get repo_id's files into the Hugging Face cache, where a name finds them."""
    get = f"hf download {repo_id} {' '.join(FILES)}"
    if not _have_hub():
        return f"`pip install 'gpt2s[hub]'` (or huggingface_hub), then `{get}`"
    return f"`{get}`"


def resolve_pretrained(name_or_path, *, env=None, local_files_only: bool = False) -> Path:
    """A path that ``GPT2.from_safetensors`` loads, for:

    * an existing file or directory (it wins over a name, as in transformers);
    * ``"demo"``: the small model bundled with gpt2s;
    * ``"gpt2"``, ``"gpt2-medium"``, ``"gpt2-large"``, ``"gpt2-xl"``, ``"openai-community/…"``
      or any other ``"owner/name"`` Hugging Face repo: its snapshot in the local Hugging Face
      cache, else downloaded with huggingface_hub (unless ``local_files_only`` or
      ``HF_HUB_OFFLINE=1``; when the Hub cannot be reached the first failed connection ends
      the attempt, with no retries).

    Raises ModelNotFound saying, in one line, where it looked and how to get the model,
    CacheError when a cached repo's refs/main holds anything but a commit hash.
    """
    env = os.environ if env is None else env
    text = os.fspath(name_or_path)
    p = Path(text).expanduser()
    if text and p.exists():
        return p
    if text == "demo":
        if (DEMO_DIR / "model.safetensors").is_file():
            return DEMO_DIR
        raise ModelNotFound(f"the demo model is missing from {DEMO_DIR}: the gpt2s installation "
                            f"is incomplete (reinstall gpt2s)")
    repo_id = repo_id_of(text)
    if repo_id is None:
        known = ", ".join(['"demo"'] + [f'"{n}"' for n in PRETRAINED])
        raise ModelNotFound(f"{text}: no such file or directory, and not a model name "
                            f"({known}, or a Hugging Face repo id such as "
                            f"\"openai-community/gpt2\")")
    snap, tried = find_cached(repo_id, env)
    if snap is not None:
        return snap
    if local_files_only:
        why = "local_files_only is set, so it was not downloaded"
    else:
        try:
            return _download(repo_id, env)
        except ModelNotFound as e:
            why = str(e)
    raise ModelNotFound(
        f"{text}: not in the Hugging Face cache (looked at {' and '.join(tried)}), and {why}; "
        f"get it with {download_hint(repo_id)} where the network allows, or pass a directory "
        f"that holds its model.safetensors")


def pretrained_hint(path) -> str:
    """For 'no such file' errors of from_safetensors: a pointer to from_pretrained when the
    missing path is a model name."""
    text = os.fspath(path)
    if text == "demo" or text in PRETRAINED or text.startswith("openai-community/"):
        return f"; to load the {'bundled demo' if text == 'demo' else 'pretrained'} model by " \
               f"name use GPT2.from_pretrained({text!r})"
    return ""


def find_model(explicit=None, *, env=None, cwd=None, demo_dir=DEMO_DIR) -> Path:
    """Where the model comes from: ``explicit`` (--model: a path, or a name that
    gpt2s.hub.resolve_pretrained knows: "demo", "gpt2", "gpt2-medium", ...), else $GPT2S_MODEL,
    else ./assets/model.safetensors, else the Hugging Face cache (openai-community/gpt2, then
    its older name gpt2; never a download), else the demo model bundled with gpt2s.  An explicit
    path or $GPT2S_MODEL that does not exist is an error, not skipped.  Raises ModelNotFound
    with what was tried."""
    env = os.environ if env is None else env
    cwd = Path.cwd() if cwd is None else Path(cwd)
    for source, value in (("--model", explicit), ("$GPT2S_MODEL", env.get("GPT2S_MODEL"))):
        if value:
            p = Path(value).expanduser()
            if not p.is_absolute():
                p = cwd / p
            if p.is_dir() and not (p / "model.safetensors").is_file() and \
                    not (p / "model.safetensors.index.json").is_file():   # (or shards)
                raise ModelNotFound(f"{source} {value}: the directory has no model.safetensors")
            if not p.exists():
                try:
                    return resolve_pretrained(value, env=env)
                except ModelNotFound as e:
                    raise ModelNotFound(f"{source} {e}") from None
            return p
    tried = []
    local = cwd / "assets" / "model.safetensors"
    if local.is_file():
        return local
    tried.append(f"./assets/model.safetensors (in {cwd})")
    snap, looked = find_cached("openai-community/gpt2", env)
    if snap is not None:
        return snap
    tried += looked
    demo = Path(demo_dir) / "model.safetensors"
    if demo.is_file():
        return Path(demo_dir)
    tried.append(f"{demo} (the demo model bundled with gpt2s)")
    raise ModelNotFound(
        "no GPT-2 model found; --model and $GPT2S_MODEL are not set, and there is none at:\n"
        + "".join(f"  {t}\n" for t in tried)
        + "Put GPT-2's weights at ./assets/model.safetensors, for example with\n"
        + f"  {HF_DOWNLOAD}\n"
        + "or pass --model PATH (a .safetensors file or a directory with model.safetensors).")
