"""``python -m gpt2s.eval``: mean loss and perplexity of a GPT-2 model on text or token files.

The evaluation is the sliding-window one used to report GPT-2's perplexity (Hugging Face's
"Perplexity of fixed-length models" recipe): windows of ``seq_len + 1`` tokens (``seq_len``
inputs, each predicting the next token) start every ``stride`` tokens; the first window scores
all its targets, every later window only the targets no earlier window scored (its last
``stride``), so each token after the first is scored exactly once, with at least
``seq_len - stride`` tokens of context outside the first window.  The last window ends at the
last token (it may be shorter).  ``stride = seq_len`` is the plain non-overlapping evaluation.

The loss is the mean negative log-likelihood (nats) over the scored tokens, accumulated in
float64; perplexity is ``exp(loss)``.  Diagnostics and the progress bar go to stderr, the
result to stdout (one JSON object with ``--json``).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time

import numpy as np

from ._cli import UserError as _UserError
from ._cli import Parser, add_quiet_option, add_threads_option, add_version_option, plural
from ._cli import run_main
from .weight_types import DTYPES

__all__ = ["main", "evaluate", "sliding_windows"]

PROG = "python -m gpt2s.eval"


def sliding_windows(n_tokens: int, seq_len: int, stride: int):
    """(begin, end, first_scored) of each window over tokens [0, n_tokens): the window holds
    tokens [begin, end) (at most seq_len + 1), and scores the targets at positions
    [first_scored, end)."""
    if n_tokens < 2:
        return
    length = seq_len + 1
    prev_end = 0
    for begin in range(0, n_tokens, stride):
        end = min(begin + length, n_tokens)
        yield begin, end, max(prev_end, begin + 1)
        prev_end = end
        if end == n_tokens:
            return


def count_windows(n_tokens: int, seq_len: int, stride: int) -> int:
    if n_tokens < 2:
        return 0
    if n_tokens <= seq_len + 1:
        return 1
    return 1 + -(-(n_tokens - seq_len - 1) // stride)


def evaluate(model, data, seq_len: int | None = None, stride: int | None = None,
             batch_size: int | None = None, progress=None) -> dict:
    """Sliding-window loss of ``model`` on ``data`` (a gpt2s.data.TokenData, or a 1-D array of
    token ids).  ``seq_len`` defaults to the model's n_ctx, ``stride`` to ``seq_len // 2``,
    ``batch_size`` (windows per forward pass) to ``max(1, 1024 // seq_len)``.  Returns a dict
    with loss, perplexity, tokens (scored), windows, seconds and tokens_per_s.  ``progress``:
    an object with ``update(n, info)`` called once per batch of windows."""
    from .data import TokenData
    if not isinstance(data, TokenData):
        data = _ArrayData(np.asarray(data))
    n_ctx = model.config.n_ctx
    seq_len = n_ctx if seq_len is None else int(seq_len)
    if not 1 <= seq_len <= n_ctx:
        raise ValueError(f"seq_len must be in [1, n_ctx={n_ctx}], got {seq_len}")
    stride = max(1, seq_len // 2) if stride is None else int(stride)
    if not 1 <= stride <= seq_len:
        raise ValueError(f"stride must be in [1, seq_len={seq_len}], got {stride}")
    batch_size = max(1, 1024 // seq_len) if batch_size is None else int(batch_size)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    N = len(data)
    if N < 2:
        raise ValueError(f"the data has {N} token{'s' if N != 1 else ''}: at least 2 are "
                         f"needed to score one")

    nll_sum = 0.0
    n_scored = 0
    n_windows = 0
    t0 = time.perf_counter()

    def run(group):
        nonlocal nll_sum, n_scored, n_windows
        T = group[0][1] - group[0][0] - 1
        w = data.windows(np.array([g[0] for g in group], np.int64), T)
        x, y = w[:, :-1], w[:, 1:].copy()
        for row, (begin, _, first) in enumerate(group):
            y[row, :first - begin - 1] = -1        # already scored by an earlier window
        n_valid = int(np.count_nonzero(y != -1))
        _, loss = model.forward(x, y, return_logits=False, for_backward=False)
        nll_sum += loss * n_valid
        n_scored += n_valid
        n_windows += len(group)
        if progress is not None:
            dt = time.perf_counter() - t0
            progress.update(len(group), f"loss {nll_sum / n_scored:.4f} "
                                        f"{n_scored / dt if dt > 0 else 0:,.0f} tok/s")

    group: list = []
    for win in sliding_windows(N, seq_len, stride):
        if group and (len(group) == batch_size or win[1] - win[0] != group[0][1] - group[0][0]):
            run(group)
            group = []
        group.append(win)
    if group:
        run(group)
    seconds = time.perf_counter() - t0
    loss = nll_sum / n_scored
    return {"loss": loss, "perplexity": math.exp(loss) if loss < 709 else float("inf"),
            "tokens": n_scored, "windows": n_windows, "seq_len": seq_len, "stride": stride,
            "batch_size": batch_size, "seconds": seconds,
            "tokens_per_s": n_scored / seconds if seconds > 0 else None}


class _ArrayData:
    """TokenData's window interface over an in-memory 1-D array."""

    def __init__(self, tokens: np.ndarray):
        if tokens.ndim != 1 or not np.issubdtype(tokens.dtype, np.integer):
            raise ValueError(f"tokens must be a 1-D integer array, got {tokens.dtype} "
                             f"shape {tokens.shape}")
        self.tokens = tokens

    def __len__(self):
        return len(self.tokens)

    def windows(self, starts, T):
        return self.tokens[np.asarray(starts)[:, None] + np.arange(T + 1)].astype(np.int64)


# ------------------------------------------------------------------------------------------
# command line


def _parser() -> argparse.ArgumentParser:
    p = Parser(
        prog=PROG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Mean loss (nats per token), perplexity and tokens/s of a GPT-2 model on\n"
                    "text or token files, with the sliding-window evaluation used to report\n"
                    "GPT-2's perplexity.",
        epilog=f"""\
data: UTF-8 text files (tokenized with the GPT-2 tokenizer, files joined with <|endoftext|>),
  nanoGPT uint16 .bin files, llm.c .bin shards (read through a memory map); globs work.
  The files are evaluated as one token stream, in the order given.

windows: windows of --seq-len + 1 tokens start every --stride tokens; each window scores only
  the targets no earlier window scored (the first window scores all of its own), so every
  token after the first is scored once, with at least seq-len - stride tokens of context.
  A smaller stride gives more context (a lower perplexity) at the cost of more windows;
  --stride equal to --seq-len is the plain non-overlapping evaluation.

model, if --model is not given: as in python -m gpt2s.generate ($GPT2S_MODEL,
  ./assets/model.safetensors, the Hugging Face cache, the bundled demo model).

examples:
  {PROG} --model gpt2 wiki.test.raw
  {PROG} --model runs/mini --stride 128 --json "shards/val_*.bin"
  {PROG} --model assets --seq-len 256 --max-tokens 100000 input.txt
  {PROG} --model gpt2 --dtype int8 wiki.test.raw      # what int8 weights cost in loss
""")
    p.add_argument("data", nargs="+", metavar="DATA",
                   help="text files, .bin token files or llm.c shards, or globs of them")
    p.add_argument("--model", metavar="PATH",
                   help="a .safetensors file, a directory with model.safetensors (a Llama, "
                        "Qwen2 or GPT-NeoX checkpoint directory: with its tokenizer.json), or a name: "
                        "demo, gpt2, gpt2-medium, gpt2-large, gpt2-xl")
    p.add_argument("--seq-len", type=int, default=None, metavar="T",
                   help="inputs per window, at most the model's context (default: n_ctx; "
                        "min(n_ctx, 1024) for a Llama, Qwen2 or GPT-NeoX model)")
    p.add_argument("--stride", type=int, default=None, metavar="S",
                   help="tokens between window starts, 1 <= S <= T (default: T / 2)")
    p.add_argument("--batch-size", type=int, default=None, metavar="B",
                   help="windows per forward pass (default: max(1, 1024 / T))")
    p.add_argument("--max-tokens", type=int, default=None, metavar="N",
                   help="evaluate only the first N tokens of the data (default: all)")
    p.add_argument("--dtype", choices=DTYPES, default=None,
                   help="weight storage to evaluate: measure what bfloat16, int8 or int4 "
                        "weights cost in loss (default: the file's own storage)")
    add_threads_option(p)
    p.add_argument("--json", action="store_true",
                   help="print the result as one JSON object on stdout")
    add_quiet_option(p, "progress bar")
    add_version_option(p)
    return p



def _run(args, out, err) -> int:
    import gpt2s
    from ._cli import Progress
    from .data import DataError, TokenData
    from .hub import find_model
    from .auto import model_type_of
    from .vocab import check_data_ids, model_vocab, same_vocab, shards_vocab, tokenizer_for
    from .vocab import vocab_name
    from .weights import SafetensorsError

    for name in ("seq_len", "stride", "batch_size", "max_tokens", "threads"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise _UserError(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    if args.seq_len is not None and args.stride is not None and args.stride > args.seq_len:
        raise _UserError(f"--stride {args.stride} is larger than --seq-len {args.seq_len}: "
                         f"tokens between the windows would not be scored")
    try:
        if args.threads is not None:
            gpt2s.set_num_threads(args.threads)
        path = find_model(args.model)
        model = None
        no_tokenizer = None
        if model_type_of(path)[0] != "gpt2":
            # a Llama / Qwen2 checkpoint: its own tokenizer (tokenizer.json), never GPT-2's
            model = gpt2s.AutoModelForCausalLM.from_pretrained(path, dtype=args.dtype)
            try:
                enc = tokenizer_for(path, model.config)
            except ValueError as e:     # needed only if the data is text
                enc, no_tokenizer = None, str(e)
        else:
            # text is read with the model's own vocabulary (vocab.json beside it), else GPT-2's
            enc = model_vocab(path)
        data = TokenData(args.data, tokenizer=enc)
        for src in data.sources:   # shards prepare wrote in another vocabulary are refused
            known, shard_enc = shards_vocab(src.path) if src.kind == "llmc" else (False, None)
            if known and not same_vocab(shard_enc, enc):
                raise ValueError(f"{src.path}: token ids of {vocab_name(shard_enc)} (its "
                                 f"prepare.json), not of the model's ({vocab_name(enc)})")
        if no_tokenizer is not None and any(s.kind == "text" for s in data.sources):
            raise ValueError(no_tokenizer)
    except (DataError, ValueError, FileNotFoundError, SafetensorsError) as e:
        raise _UserError(str(e)) from None
    if args.max_tokens is not None and args.max_tokens < len(data):
        data = data.subset(0, args.max_tokens)
    try:
        # dtype None: the weights as the file stores them (float32, bfloat16, packed or
        # a GGUF file's own block type)
        if model is None:
            model = gpt2s.GPT2.from_safetensors(path, dtype=args.dtype)
    except (FileNotFoundError, SafetensorsError, ValueError, ImportError) as e:
        raise _UserError(str(e)) from None
    cfg = model.config
    if enc is None and isinstance(model, gpt2s.GPT2) \
            and any(s.kind == "text" for s in data.sources):
        try:
            tokenizer_for(path, cfg)      # refuses GPT-2's tokens for a smaller vocabulary
        except ValueError as e:
            raise _UserError(str(e)) from None
    if args.seq_len is not None and args.seq_len > cfg.n_ctx:
        raise _UserError(f"--seq-len {args.seq_len} exceeds the model's context "
                         f"n_ctx={cfg.n_ctx}")
    # a Llama model's context may be 8k-128k positions: windows of 1024 by default
    seq_len = args.seq_len or (cfg.n_ctx if isinstance(model, gpt2s.GPT2)
                               else min(cfg.n_ctx, 1024))
    stride = args.stride or max(1, seq_len // 2)
    if stride > seq_len:
        raise _UserError(f"--stride {stride} is larger than the window (--seq-len {seq_len})")
    if len(data) < 2:
        raise _UserError(f"{' '.join(args.data)}: {plural(len(data), 'token')}, at least 2 "
                         f"are needed")
    try:
        check_data_ids(data, cfg.vocab_size)     # token files of another vocabulary
    except ValueError as e:
        raise _UserError(str(e)) from None
    print(f"model: {path}\n  {model!r}\ndata: {data.describe()}", file=err)
    progress = Progress(count_windows(len(data), seq_len, stride), "windows",
                        enabled=not args.quiet, stream=err)
    try:
        result = evaluate(model, data, seq_len, stride, args.batch_size, progress=progress)
    except ValueError as e:     # e.g. a token id outside the model's vocabulary
        raise _UserError(str(e)) from None
    finally:
        progress.close()
    result = {"model": str(path), "dtype": model.dtype,
              "data": [str(s.path) for s in data.sources],
              "data_fingerprint": data.fingerprint, **result}
    if args.json:
        out.write(json.dumps(result) + "\n")
    else:
        out.write(f"loss {result['loss']:.4f}  perplexity {result['perplexity']:.3f}  "
                  f"({plural(result['tokens'], 'token')} in "
                  f"{plural(result['windows'], 'window')} of "
                  f"{seq_len}, stride {stride}; {result['tokens_per_s'] or 0:,.0f} tokens/s)\n")
    out.flush()
    return 0


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    return run_main(PROG, lambda: _run(args, sys.stdout, sys.stderr), sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
