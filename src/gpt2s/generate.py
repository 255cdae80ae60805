"""``python -m gpt2s.generate``: continue a prompt with GPT-2, streaming the text to stdout.

Diagnostics (model path, timings, tokens/s with --verbose) go to stderr only, so stdout is
just the text.  User mistakes (a bad option value, an empty or too long prompt, a missing
model) print ``error: ...`` and exit with status 2, without a traceback.
"""

from __future__ import annotations

import argparse
import re
import sys
import time
import warnings

from ._cli import UserError as _UserError
from ._cli import Parser, add_threads_option, add_version_option, plural, run_main
from .hub import HF_DOWNLOAD, ModelNotFound, find_model
from .weight_types import DTYPES

# find_model and ModelNotFound live in gpt2s.hub; importable from here as before
__all__ = ["main", "find_model", "ModelNotFound", "crop_prompt"]

PROG = "python -m gpt2s.generate"


def crop_prompt(enc, prompt: str, n_ctx: int, max_new_tokens: int) -> tuple[str, int, int]:
    """(the end of prompt that is kept, its length in tokens, the whole prompt's length).

    A prompt longer than the context keeps its last ``max(n_ctx - max_new_tokens, n_ctx // 2)``
    tokens: room for the new tokens without the window sliding, but never less than half the
    context of prompt.  The cut is made in the text at a token boundary; should re-encoding the
    kept text give more tokens (a cut inside a word or a character), one more token is dropped
    until it fits.  A prompt that fits is returned whole."""
    from .tokenizer import EOT_TOKEN
    ids = enc.encode(prompt, allowed_special={EOT_TOKEN})
    if len(ids) <= n_ctx:
        return prompt, len(ids), len(ids)
    limit = max(n_ctx - max_new_tokens, n_ctx // 2, 1)
    text, offsets = enc.decode_with_offsets(ids)
    if text != prompt:     # not expected for str input; cut the decoded text then
        prompt = text
    keep = limit
    while keep > 0:
        kept = prompt[offsets[len(ids) - keep]:]
        n = len(enc.encode(kept, allowed_special={EOT_TOKEN}))
        if 0 < n <= limit:
            return kept, n, len(ids)
        keep -= 1
    raise ValueError(f"could not crop the prompt to {limit} tokens")

def _parser() -> argparse.ArgumentParser:
    p = Parser(
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
  A prompt longer than the context is refused unless --crop-prompt: then only its last
  max(n_ctx - max_new_tokens, n_ctx / 2) tokens are kept (said on stderr), so the new
  tokens fit in the context.

examples:
  {PROG} "The meaning of life is" --max-new-tokens 50 --top-k 40 --seed 1
  {PROG} "def fib(n):" --temperature 0
  {PROG} "Q: Name a colour. A:" --stop "Q:" --repetition-penalty 1.2
  echo "Once upon a time" | {PROG} - --num-samples 3 --top-p 0.9
  {PROG} --model gpt2-medium "Hello"          # by name, from the Hugging Face cache
  cat long_story.txt | {PROG} - --crop-prompt -n 200
  {PROG} --prompt-file prompt.txt --temperature 0
  {PROG} --model SmolLM2-135M-Instruct --chat "What is 2 + 2?" --temperature 0
""")
    p.add_argument("prompt", nargs="?", metavar="PROMPT",
                   help="text to continue; '-' reads it from stdin; without PROMPT, generation "
                        "is unconditional (it starts from the vocabulary's document "
                        "separator: GPT-2's <|endoftext|>, a checkpoint's BOS token)")
    p.add_argument("--model", metavar="PATH",
                   help="a .safetensors file, a directory with model.safetensors "
                        "(+ config.json; a Llama, Qwen2 or GPT-NeoX checkpoint directory "
                        "with its tokenizer.json), or a name: demo, gpt2, gpt2-medium, gpt2-large, "
                        "gpt2-xl, openai-community/... (from the Hugging Face cache)")
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
    p.add_argument("--dtype", choices=DTYPES, default=None,
                   help="weight storage: bfloat16, int8 or int4 blocks read fewer bytes per "
                        "token (default: the file's own: float32, or the type of a file "
                        "saved by gpt2s in another, e.g. by python -m gpt2s.quantize)")
    p.add_argument("--compute-dtype", choices=("float32", "bfloat16"), default="float32",
                   help="precision of the matmuls: bfloat16 operands with float32 sums "
                        "(default: %(default)s)")
    add_threads_option(p)
    p.add_argument("--ignore-eos", action="store_true",
                   help="do not stop at <|endoftext|>")
    # generation controls (docs/generation.md, "Generation controls")
    p.add_argument("--stop", action="append", default=None, metavar="TEXT",
                   help="end the text before TEXT (not printed); may be given several times")
    p.add_argument("--min-new-tokens", type=int, default=0, metavar="N",
                   help="no <|endoftext|> and no --stop before N new tokens (default: 0)")
    p.add_argument("--repetition-penalty", type=float, default=1.0, metavar="R",
                   help="divide (multiply, if negative) the logit of each token already in "
                        "the text by R; 1 is none (default: 1)")
    p.add_argument("--presence-penalty", type=float, default=0.0, metavar="P",
                   help="lower the logit of each token generated before by P (default: 0)")
    p.add_argument("--frequency-penalty", type=float, default=0.0, metavar="F",
                   help="lower the logit of each token by F times its count among the "
                        "generated tokens (default: 0)")
    p.add_argument("--context-full", choices=("slide", "stop"), default="slide",
                   help="at the model's context length: slide the window (recomputing the "
                        "cache of the last half) or stop (default: %(default)s)")
    p.add_argument("--crop-prompt", action="store_true",
                   help="keep the end of a prompt longer than the model's context (the last "
                        "max(n_ctx - max_new_tokens, n_ctx/2) tokens) instead of refusing it")
    p.add_argument("--no-echo", action="store_true",
                   help="print only the generated text, not the prompt")
    p.add_argument("-v", "--verbose", action="store_true",
                   help="report the model, timings and tokens/s on stderr")
    p.add_argument("--chat", metavar="MESSAGE",
                   help="an instruct checkpoint: send MESSAGE as the user's turn through the "
                        "checkpoint's chat template (tokenizer_config.json or "
                        "chat_template.jinja) and print the assistant's reply, which ends at "
                        "the model's end tokens (generation_config.json's eos_token_id, the "
                        "template's end token); instead of PROMPT")
    p.add_argument("--prompt-file", metavar="FILE",
                   help="read the prompt from this UTF-8 text file (one final newline is "
                        "dropped), instead of PROMPT")
    add_version_option(p)
    return p



_OPTIONS = ("max_new_tokens", "temperature", "top_k", "top_p", "seed", "num_samples",
            "context_full", "stop", "min_new_tokens", "repetition_penalty", "presence_penalty",
            "frequency_penalty")


def _option_names(message: str) -> str:
    """An API error message in the CLI's terms: 'top_p must be ...' -> '--top-p must be ...'."""
    for name in _OPTIONS:
        if message.startswith(name + " "):
            return "--" + name.replace("_", "-") + message[len(name):]
    if message.startswith("set_num_threads: n "):
        return "--threads " + message[len("set_num_threads: n "):]
    # "pass context_full='slide'" -> "pass --context-full slide"
    return re.sub(r"\b(" + "|".join(_OPTIONS) + r")=['\"]?(\w+)['\"]?",
                  lambda m: f"--{m.group(1).replace('_', '-')} {m.group(2)}", message)


def _read_prompt_file(path) -> str:
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        raise _UserError(f"--prompt-file {path}: no such file") from None
    except IsADirectoryError:
        raise _UserError(f"--prompt-file {path}: is a directory") from None
    try:
        prompt = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise _UserError(f"--prompt-file {path}: not UTF-8 text (byte 0x{raw[e.start]:02x} at "
                         f"offset {e.start})") from None
    prompt = prompt[:-1] if prompt.endswith("\n") else prompt
    if prompt == "":
        raise _UserError(f"--prompt-file {path}: the file is empty")
    return prompt


def _write(out, text):
    out.write(text)
    out.flush()


def _run(args, out, err) -> int:
    import numpy as np

    import gpt2s
    from .generation import _text_steps, check_controls, check_sampling_args
    from .tokenizer import EOT_ID, EOT_TOKEN
    from .vocab import start_token, tokenizer_for
    from .weights import SafetensorsError

    # check every value before the (slow) model load
    try:
        sampling = check_sampling_args(args.temperature, args.top_k, args.top_p, args.seed,
                                       args.num_samples, args.max_new_tokens,
                                       args.context_full)
        controls = check_controls(args.repetition_penalty, args.presence_penalty,
                                  args.frequency_penalty, args.min_new_tokens, args.stop)
        if args.threads is not None:
            gpt2s.set_num_threads(args.threads)
    except (TypeError, ValueError) as e:
        raise _UserError(_option_names(str(e))) from None
    if args.chat is not None:
        if args.prompt is not None or args.prompt_file is not None:
            raise _UserError("--chat MESSAGE is the prompt: give no PROMPT or --prompt-file")
        if args.chat == "":
            raise _UserError("--chat: the message is empty")
        prompt = args.chat      # rendered through the template once the model is loaded
    elif args.prompt_file is not None:
        if args.prompt is not None:
            raise _UserError("give the prompt as PROMPT or --prompt-file, not both")
        prompt = _read_prompt_file(args.prompt_file)
    elif args.prompt == "-":
        prompt = sys.stdin.read()
        if prompt.endswith("\n"):
            prompt = prompt[:-1]
        if prompt == "":
            raise _UserError("the prompt read from stdin is empty")
    elif args.prompt is None:
        prompt = None     # unconditional: from the model vocabulary's start token (below)
    else:
        prompt = args.prompt
    if prompt == "":
        raise _UserError("the prompt is empty: give some text, or omit PROMPT to generate "
                         "unconditionally")

    try:
        path = find_model(args.model)
        t0 = time.perf_counter()
        # GPT-2, Llama, Qwen2 or GPT-NeoX: the class from config.json's model_type (a .gguf
        # file: GPT-2)
        model = gpt2s.AutoModelForCausalLM.from_pretrained(path, dtype=args.dtype)
        try:
            model.compute_dtype = args.compute_dtype
        except ValueError as e:   # bfloat16 on int8 / int4 weights
            raise ValueError(f"--compute-dtype {args.compute_dtype}: {e}") from None
    except (FileNotFoundError, SafetensorsError, ValueError, ImportError) as e:
        raise _UserError(str(e)) from None
    load_s = time.perf_counter() - t0
    try:
        # the model's own vocabulary (vocab.json beside it), else GPT-2's
        enc = tokenizer_for(path, model.config)
        gpt2_vocab = isinstance(model, gpt2s.GPT2)
        start = None
        if prompt is None and args.chat is None:
            start = start_token(enc, model.config)
            if start is None:
                raise ValueError(f"the model's vocabulary ({enc.n_vocab} tokens) has no "
                                 f"token that starts a text (no {EOT_TOKEN} or BOS "
                                 f"token): give a PROMPT to continue")
            prompt = enc.decode([start])
        # the end token(s): GPT-2's <|endoftext|>, a Llama config's eos_token_id (one id or
        # a list), else the tokenizer's end-of-text token
        eos = EOT_ID if gpt2_vocab else getattr(model.config, "eos_token_id", None)
        if eos is None:
            eos = getattr(enc, "eot_id", None)
        if args.chat is not None:
            prompt, enc, eos = _chat_prompt(path, enc, model.config, args.chat)
        n_prompt = 1 if start is not None else \
            len(enc.encode(prompt, allowed_special={EOT_TOKEN}))
    except (ValueError, ImportError) as e:
        raise _UserError(str(e)) from None
    if n_prompt > model.config.n_ctx:
        if not args.crop_prompt:
            raise _UserError(f"the prompt is {plural(n_prompt, 'token')} long, longer than the "
                             f"model's context n_ctx={model.config.n_ctx}; --crop-prompt keeps "
                             f"its end")
        prompt, n_prompt, n_whole = crop_prompt(enc, prompt, model.config.n_ctx,
                                                sampling["max_new_tokens"])
        print(f"{PROG}: the prompt is {plural(n_whole, 'token')} long, longer than the model's "
              f"context n_ctx={model.config.n_ctx}: kept its last {plural(n_prompt, 'token')}",
              file=err)
    if args.verbose:
        print(f"model: {path}\n  {model!r}, loaded in {load_s:.2f} s\n"
              f"threads: {gpt2s.get_num_threads()}\nprompt: {plural(n_prompt, 'token')}", file=err)

    rng = np.random.default_rng(sampling["seed"])
    echo = not args.no_echo and (args.prompt is not None or args.prompt_file is not None)
    echo = echo and args.chat is None     # a chat prints the reply only
    for i in range(sampling["num_samples"]):
        if sampling["num_samples"] > 1:     # stderr: stdout carries only the text
            _write(err, f"======== sample {i + 1} of {sampling['num_samples']} ========\n")
        try:
            steps = _text_steps(model, prompt, sampling["max_new_tokens"],
                                sampling["temperature"], sampling["top_k"], sampling["top_p"],
                                rng, stop_at_eos=not args.ignore_eos and eos is not None,
                                eos_token_id=EOT_ID if eos is None else eos,
                                context_full=sampling["context_full"], tokenizer=enc,
                                prompt_ids=None if start is None else [start], **controls)
        except ValueError as e:
            raise _UserError(_option_names(str(e))) from None
        if echo:
            _write(out, prompt)
        t_start = time.perf_counter()
        t_first = None
        n_tokens = 0
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for token, piece in steps:
                if token is not None:
                    n_tokens += 1
                    if t_first is None:
                        t_first = time.perf_counter()
                if piece:
                    _write(out, piece)
        t_end = time.perf_counter()
        for w in caught:      # one line each, in the command line's terms
            _write(err, f"{PROG}: warning: {_option_names(str(w.message))}\n")
        _write(out, "\n")
        if args.verbose:
            _report(err, n_prompt, n_tokens, t_start, t_first, t_end)
    return 0


def _chat_prompt(path, enc, config, message):
    """(the chat prompt of message, the tokenizer that encodes it as transformers does --
    no special tokens added: the template writes them --, the end tokens of the reply)."""
    import copy
    from pathlib import Path
    from .chat import apply_chat_template, chat_end_tokens, load_chat_template, \
        read_generation_config
    folder = Path(path) if Path(path).is_dir() else Path(path).parent
    template = load_chat_template(folder)
    if template is None or not hasattr(enc, "tk"):
        raise ValueError(f"--chat: {path} is not an instruct checkpoint (no chat_template in "
                         f"its tokenizer_config.json, no chat_template.jinja, or no "
                         f"tokenizer.json beside it); give a PROMPT to continue instead")
    enc = copy.copy(enc)
    enc.chat_template = template
    enc.generation_config = read_generation_config(folder)
    enc.add_special_tokens = False
    prompt = apply_chat_template(enc, [{"role": "user", "content": message}])
    return prompt, enc, chat_end_tokens(enc, config) or None


def _report(err, n_prompt, n_tokens, t_start, t_first, t_end):
    if n_tokens == 0 or t_first is None:
        print(f"generated 0 tokens in {t_end - t_start:.2f} s", file=err)
        return
    prefill = t_first - t_start
    msg = (f"prefill: {plural(n_prompt, 'token')} + first new token in {prefill:.3f} s; "
           f"generated {plural(n_tokens, 'token')} in {t_end - t_start:.2f} s")
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
    return run_main(PROG, lambda: _run(args, out, err), err)


if __name__ == "__main__":
    sys.exit(main())
