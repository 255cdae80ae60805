"""``python -m gpt2s.generate``: continue a prompt with GPT-2, streaming the text to stdout.

Diagnostics (model path, timings, tokens/s with --verbose) go to stderr only, so stdout is
just the text.  User mistakes (a bad option value, an empty or too long prompt, a missing
model) print ``error: ...`` and exit with status 2, without a traceback.
"""

from __future__ import annotations

import argparse
import glob
import os
import sys
import time
from pathlib import Path

__all__ = ["main", "find_model", "ModelNotFound"]

PROG = "python -m gpt2s.generate"
DEMO_DIR = Path(__file__).resolve().parent / "assets" / "demo"
HF_REPOS = ("models--openai-community--gpt2", "models--gpt2")
HF_DOWNLOAD = ("huggingface-cli download openai-community/gpt2 model.safetensors config.json "
               "--local-dir assets")


class ModelNotFound(FileNotFoundError):
    """No model at the given path, or none found by the search order of find_model."""


def _hf_hub_dirs(env) -> list[Path]:
    if env.get("HF_HUB_CACHE"):
        return [Path(env["HF_HUB_CACHE"]).expanduser()]
    if env.get("HF_HOME"):
        return [Path(env["HF_HOME"]).expanduser() / "hub"]
    cache = Path(env["XDG_CACHE_HOME"]).expanduser() if env.get("XDG_CACHE_HOME") else \
        Path(env.get("HOME", "~")).expanduser() / ".cache"
    return [cache / "huggingface" / "hub"]


def _hf_snapshot(repo_dir: Path) -> Path | None:
    """The snapshot directory of a Hugging Face cache repo that has model.safetensors: the one
    refs/main names, else the most recently modified."""
    ref = repo_dir / "refs" / "main"
    if ref.is_file():
        snap = repo_dir / "snapshots" / ref.read_text().strip()
        if (snap / "model.safetensors").is_file():
            return snap
    snaps = [Path(p).parent for p in glob.glob(str(repo_dir / "snapshots" / "*" /
                                                   "model.safetensors"))
             if Path(p).is_file()]
    return max(snaps, key=lambda p: p.stat().st_mtime) if snaps else None


def find_model(explicit=None, *, env=None, cwd=None, demo_dir=DEMO_DIR) -> Path:
    """Where the model comes from: ``explicit`` (--model), else $GPT2S_MODEL, else
    ./assets/model.safetensors, else the Hugging Face cache (openai-community/gpt2, then
    gpt2), else the demo model bundled with gpt2s.  An explicit path or $GPT2S_MODEL that does
    not exist is an error, not skipped.  Raises ModelNotFound with what was tried."""
    env = os.environ if env is None else env
    cwd = Path.cwd() if cwd is None else Path(cwd)
    for source, value in (("--model", explicit), ("$GPT2S_MODEL", env.get("GPT2S_MODEL"))):
        if value:
            p = Path(value).expanduser()
            if not p.is_absolute():
                p = cwd / p
            if p.is_dir() and not (p / "model.safetensors").is_file():
                raise ModelNotFound(f"{source} {value}: the directory has no model.safetensors")
            if not p.exists():
                raise ModelNotFound(f"{source} {value}: no such file or directory")
            return p
    tried = []
    local = cwd / "assets" / "model.safetensors"
    if local.is_file():
        return local
    tried.append(f"./assets/model.safetensors (in {cwd})")
    for hub in _hf_hub_dirs(env):
        for repo in HF_REPOS:
            snap = _hf_snapshot(hub / repo)
            if snap is not None:
                return snap
            tried.append(f"{hub / repo}/snapshots/*/model.safetensors")
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


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=PROG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Continue PROMPT with GPT-2 on the CPU, streaming the text to stdout as "
                    "tokens are produced (the prompt is echoed first).",
        epilog=f"""\
model, if --model is not given, the first of:
  $GPT2S_MODEL, ./assets/model.safetensors, the Hugging Face cache
  (~/.cache/huggingface/hub/models--openai-community--gpt2 or models--gpt2),
  the demo model bundled with gpt2s.  To get GPT-2 (124M):
    {HF_DOWNLOAD}

sampling: temperature 0 is greedy (argmax; --top-k, --top-p, --seed are then ignored).
  Otherwise tokens are drawn from softmax(logits / temperature), restricted to the
  --top-k most likely tokens, then to the --top-p nucleus.  --seed makes it repeatable.
  Generation stops at <|endoftext|> unless --ignore-eos; past the model's context
  (1024 tokens for GPT-2) it goes on with a sliding window unless --context-full stop.

examples:
  {PROG} "The meaning of life is" --max-new-tokens 50 --top-k 40 --seed 1
  {PROG} "def fib(n):" --temperature 0
  echo "Once upon a time" | {PROG} - --num-samples 3 --top-p 0.9
""")
    p.add_argument("prompt", nargs="?", metavar="PROMPT",
                   help="text to continue; '-' reads it from stdin; without PROMPT, generation "
                        "is unconditional (it starts from <|endoftext|>)")
    p.add_argument("--model", metavar="PATH",
                   help="a .safetensors file, or a directory with model.safetensors "
                        "(+ config.json)")
    p.add_argument("-n", "--max-new-tokens", type=int, default=100, metavar="N",
                   help="tokens to generate per sample (default: %(default)s)")
    p.add_argument("--temperature", type=float, default=1.0, metavar="T",
                   help="softmax temperature; 0 is greedy (default: %(default)s)")
    p.add_argument("--top-k", type=int, default=None, metavar="K",
                   help="sample only from the K most likely tokens (default: all)")
    p.add_argument("--top-p", type=float, default=None, metavar="P",
                   help="sample only from the smallest set of tokens whose probability "
                        "reaches P, 0 < P <= 1 (default: 1, all)")
    p.add_argument("--seed", type=int, default=None, metavar="S",
                   help="random seed for repeatable samples (default: fresh each run)")
    p.add_argument("--num-samples", type=int, default=1, metavar="N",
                   help="independent continuations, streamed one after another "
                        "(default: %(default)s)")
    p.add_argument("--threads", type=int, default=None, metavar="N",
                   help="CPU threads (default: $OMP_NUM_THREADS, else all cores)")
    p.add_argument("--ignore-eos", action="store_true",
                   help="do not stop at <|endoftext|>")
    p.add_argument("--context-full", choices=("slide", "stop"), default="slide",
                   help="at the model's context length: slide the window (recomputing the "
                        "cache of the last half) or stop (default: %(default)s)")
    p.add_argument("--no-echo", action="store_true",
                   help="print only the generated text, not the prompt")
    p.add_argument("-v", "--verbose", action="store_true",
                   help="report the model, timings and tokens/s on stderr")
    return p


class _UserError(Exception):
    pass


_OPTIONS = ("max_new_tokens", "temperature", "top_k", "top_p", "seed", "num_samples",
            "context_full")


def _option_names(message: str) -> str:
    """An API error message in the CLI's terms: 'top_p must be ...' -> '--top-p must be ...'."""
    for name in _OPTIONS:
        if message.startswith(name + " "):
            return "--" + name.replace("_", "-") + message[len(name):]
    if message.startswith("set_num_threads: n "):
        return "--threads " + message[len("set_num_threads: n "):]
    return message


def _write(out, text):
    out.write(text)
    out.flush()


def _run(args, out, err) -> int:
    import numpy as np

    import gpt2s
    from .generation import _text_steps, check_sampling_args
    from .tokenizer import EOT_TOKEN, get_tokenizer
    from .weights import SafetensorsError

    # check every value before the (slow) model load
    try:
        sampling = check_sampling_args(args.temperature, args.top_k, args.top_p, args.seed,
                                       args.num_samples, args.max_new_tokens,
                                       args.context_full)
        if args.threads is not None:
            gpt2s.set_num_threads(args.threads)
    except (TypeError, ValueError) as e:
        raise _UserError(_option_names(str(e))) from None
    if args.prompt == "-":
        prompt = sys.stdin.read()
        if prompt.endswith("\n"):
            prompt = prompt[:-1]
        if prompt == "":
            raise _UserError("the prompt read from stdin is empty")
    elif args.prompt is None:
        prompt = EOT_TOKEN
    else:
        prompt = args.prompt
    if prompt == "":
        raise _UserError(f"the prompt is empty: give some text, or omit PROMPT to generate "
                         f"unconditionally (from {EOT_TOKEN})")
    enc = get_tokenizer()

    try:
        path = find_model(args.model)
        t0 = time.perf_counter()
        model = gpt2s.GPT2.from_safetensors(path)
    except (FileNotFoundError, SafetensorsError, ValueError) as e:
        raise _UserError(str(e)) from None
    load_s = time.perf_counter() - t0
    n_prompt = len(enc.encode(prompt, allowed_special={EOT_TOKEN}))
    if n_prompt > model.config.n_ctx:
        raise _UserError(f"the prompt is {n_prompt} tokens long, longer than the model's "
                         f"context n_ctx={model.config.n_ctx}")
    if args.verbose:
        print(f"model: {path}\n  {model!r}, loaded in {load_s:.2f} s\n"
              f"threads: {gpt2s.get_num_threads()}\nprompt: {n_prompt} tokens", file=err)

    rng = np.random.default_rng(sampling["seed"])
    echo = not args.no_echo and args.prompt is not None
    for i in range(sampling["num_samples"]):
        if sampling["num_samples"] > 1:
            _write(out, ("\n" if i else "") + f"======== sample {i + 1} of "
                   f"{sampling['num_samples']} ========\n")
        if echo:
            _write(out, prompt)
        try:
            steps = _text_steps(model, prompt, sampling["max_new_tokens"],
                                sampling["temperature"], sampling["top_k"], sampling["top_p"],
                                rng, stop_at_eos=not args.ignore_eos,
                                context_full=sampling["context_full"], tokenizer=enc)
        except ValueError as e:
            raise _UserError(str(e)) from None
        t_start = time.perf_counter()
        t_first = None
        n_tokens = 0
        for token, piece in steps:
            if token is not None:
                n_tokens += 1
                if t_first is None:
                    t_first = time.perf_counter()
            if piece:
                _write(out, piece)
        t_end = time.perf_counter()
        _write(out, "\n")
        if args.verbose:
            _report(err, n_prompt, n_tokens, t_start, t_first, t_end)
    return 0


def _report(err, n_prompt, n_tokens, t_start, t_first, t_end):
    if n_tokens == 0 or t_first is None:
        print(f"generated 0 tokens in {t_end - t_start:.2f} s", file=err)
        return
    prefill = t_first - t_start
    msg = (f"prefill: {n_prompt} tokens + first new token in {prefill:.3f} s; "
           f"generated {n_tokens} tokens in {t_end - t_start:.2f} s")
    if n_tokens > 1 and t_end > t_first:
        msg += f": {(n_tokens - 1) / (t_end - t_first):.1f} tokens/s after the first"
    print(msg, file=err)


def main(argv=None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    out, err = sys.stdout, sys.stderr
    try:
        out.reconfigure(errors="replace")
    except (AttributeError, ValueError):
        pass
    try:
        return _run(args, out, err)
    except _UserError as e:
        print(f"{PROG}: error: {e}", file=err)
        return 2
    except KeyboardInterrupt:
        print("", file=err)
        return 130
    except BrokenPipeError:
        # the reader went away (e.g. `| head`): stop quietly; point stdout at devnull so the
        # flush at exit does not raise again (the recipe of Python's signal docs)
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 1


if __name__ == "__main__":
    sys.exit(main())
