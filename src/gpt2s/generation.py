"""Text generation: KV-cache decoding with greedy, temperature, top-k and top-p sampling.

The prompt is run once (prefill) and its keys and values stay in the generation's KV cache
(`GPT2.kv_cache`, `GPT2.forward_cached`); each new token then costs one position per layer.
Sampling runs in the Cython kernels of ``kernels/sampling.pxi`` (``_core.argmax_rows``,
``_core.sample_rows``).

Semantics shared by every entry point:

* ``temperature=0`` is greedy decoding (argmax; the first index on exact ties); ``top_k``,
  ``top_p`` and ``seed`` are then ignored.  Otherwise tokens are drawn from
  softmax(logits / temperature), restricted to the ``top_k`` largest logits, then to the
  ``top_p`` nucleus (the smallest set of most likely tokens whose probability reaches
  ``top_p``), in that order (as Hugging Face's ``generate`` does).
* ``seed``: an int (or a ``numpy.random.Generator``) fixes every sampled token: the same seed,
  prompt, model and arguments give the same tokens.  ``None`` draws fresh entropy.  Each step
  draws one uniform number per row from NumPy's PCG64 generator; the kernels turn it into a
  token by inverse CDF.
* Batches: ``idx`` of shape (B, T) holds B prompts of the same length T, decoded together.
  ``num_samples=n`` decodes n independent continuations of each prompt: the output has
  B * n rows, prompt b's samples at rows b*n .. b*n + n-1 (the prompt is prefilled once and
  its cache copied).
* ``stop_at_eos=True`` stops a row at ``<|endoftext|>`` (``eos_token_id``, included in the
  output); a finished row is padded with ``eos_token_id`` while the others go on, and
  generation ends early once every row has finished.
* Each generation owns its KV cache (sized for the prompt and ``max_new_tokens``, at most
  ``n_ctx`` positions) and its activation buffers are its thread's: streams may be
  interleaved, and any number of threads may generate with one model at once.
* The context window: when a sequence reaches the model's ``n_ctx`` positions,
  ``context_full="slide"`` (the default) keeps the last ``n_ctx - n_ctx // 2`` tokens,
  recomputes their cache in one prefill and carries on, so generation can run past
  ``n_ctx``; every token is conditioned on at least the last ``n_ctx // 2`` tokens (GPT-2's
  learned position embeddings cannot be shifted, so the cache cannot slide by one position
  without recomputing it).  ``context_full="stop"`` instead stops with a RuntimeWarning
  when the sequence (prompt included) is n_ctx tokens long, so it never exceeds the context
  and can be fed back to ``forward``.
"""

from __future__ import annotations

import codecs
import math
import numbers
import warnings

import numpy as np

from . import _core
from .inputs import check_int, check_token_ids
from ._threads import pinned_num_threads
from .tokenizer import EOT_ID

__all__ = ["generate", "generate_stream", "generate_text", "stream_text", "EOT_ID"]

_CONTEXT_FULL = ("slide", "stop")


# ---------------------------------------------------------------------------------- checks

def check_sampling_args(temperature=1.0, top_k=None, top_p=None, seed=None, num_samples=1,
                        max_new_tokens=0, context_full="slide"):
    """Validate the sampling arguments (shared with the CLI); returns them normalised.
    Raises TypeError/ValueError naming the bad value."""
    max_new_tokens = check_int("max_new_tokens", max_new_tokens, 0)
    if isinstance(temperature, bool) or not isinstance(temperature, numbers.Real):
        raise TypeError(f"temperature must be a number, got {temperature!r}")
    temperature = float(temperature)
    if not (math.isfinite(temperature) and temperature >= 0.0):
        raise ValueError(f"temperature must be a finite number >= 0 (0 is greedy), "
                         f"got {temperature}")
    if temperature < 1e-30:
        temperature = 0.0  # below float32's range: the limit of sampling is argmax anyway
    if top_k is not None:
        top_k = check_int("top_k", top_k, 1)
    if top_p is not None:
        if isinstance(top_p, bool) or not isinstance(top_p, numbers.Real):
            raise TypeError(f"top_p must be a number, got {top_p!r}")
        top_p = float(top_p)
        if not (0.0 < top_p <= 1.0):
            raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    if seed is not None and not isinstance(seed, np.random.Generator):
        if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
            raise TypeError(f"seed must be a non-negative integer, a numpy.random.Generator "
                            f"or None, got {seed!r}")
        if seed < 0:
            raise ValueError(f"seed must be a non-negative integer, got {seed}")
        seed = int(seed)
    num_samples = check_int("num_samples", num_samples, 1)
    if context_full not in _CONTEXT_FULL:
        raise ValueError(f"context_full must be one of {_CONTEXT_FULL}, got {context_full!r}")
    return dict(temperature=temperature, top_k=top_k, top_p=top_p, seed=seed,
                num_samples=num_samples, max_new_tokens=max_new_tokens,
                context_full=context_full)


# ---------------------------------------------------------------------------------- sampler

class _Sampler:
    """Turns a (rows, V) logits array into one token per row; buffers allocated once."""

    def __init__(self, rows, vocab_size, temperature, top_k, top_p, seed, token_limit):
        self.greedy = temperature == 0.0
        self.temperature = temperature
        self.top_k = 0 if top_k is None or top_k >= vocab_size else top_k
        self.top_p = 1.0 if top_p is None else top_p
        self.rng = seed if isinstance(seed, np.random.Generator) else \
            np.random.default_rng(seed)
        self.out = np.empty(rows, np.int64)
        self.weights = None if self.greedy else np.empty((rows, vocab_size), np.float32)
        # ids the tokenizer cannot decode (a vocabulary padded past it, e.g. 50304) are
        # never sampled
        self.token_limit = token_limit if token_limit is not None and token_limit < vocab_size \
            else None
        self.step = 0

    def __call__(self, logits):
        if not np.isfinite(logits).all():
            bad = np.argwhere(~np.isfinite(logits))[0]
            raise FloatingPointError(
                f"the model produced a non-finite logit ({logits[tuple(bad)]}) for row "
                f"{bad[0]}, token {bad[1]} at generation step {self.step}: its weights "
                f"may be corrupt")
        if self.token_limit is not None:
            logits[:, self.token_limit:] = np.finfo(np.float32).min
        self.step += 1
        if self.greedy:
            _core.argmax_rows(self.out, logits)
        else:
            u = self.rng.random(self.out.shape[0])
            _core.sample_rows(self.out, logits, u, self.temperature, self.top_k, self.top_p,
                              self.weights)
        return self.out


# ---------------------------------------------------------------------------------- decoding

def _decode(model, prompt, seq, max_new_tokens, sampler, num_samples, stop_at_eos,
            eos_token_id, context_full):
    """Yield the (rows,) new tokens of each step; seq (rows, T + max_new_tokens) already holds
    the prompts and receives each new token."""
    n_ctx = model.config.n_ctx
    B, T = prompt.shape
    ns = num_samples
    rows = B * ns
    # the cache belongs to this generation alone (so generations on one model, interleaved
    # or in several threads, never disturb each other), sized for what it can reach: the
    # prompt and the new tokens, at most the context (a sliding window restarts at 0)
    kv = model.kv_cache(rows, min(n_ctx, T + max_new_tokens))
    if ns == 1:
        logits = model.forward_cached(prompt, 0, kv)
    else:
        # prefill each distinct prompt once, into cache rows 0..B-1 (each layer's (B, n_ctx, C)
        # block of them is contiguous), then copy prompt b's keys and values to the rows of
        # its samples, b*ns .. b*ns + ns-1; from the last prompt down, so no source row is
        # overwritten before it is copied
        logits = model.forward_cached(prompt, 0, kv.view_rows(0, B))
        for array in (kv.keys, kv.values):
            for b in reversed(range(B)):
                array[:, b * ns:(b + 1) * ns, :T] = array[:, b:b + 1, :T]
        logits = np.repeat(logits, ns, axis=0)
    keep = n_ctx - n_ctx // 2
    start, cur = 0, T       # seq[:, start:cur] is the window whose keys/values are cached
    finished = np.zeros(rows, bool) if stop_at_eos else None
    for step in range(max_new_tokens):
        if context_full == "stop" and cur >= n_ctx:
            warnings.warn(
                f"generation stopped after {step} of {max_new_tokens} new tokens: the "
                f"sequence reached the model's context of n_ctx={n_ctx} positions (pass "
                f"context_full='slide' to go on with a sliding window)",
                RuntimeWarning, stacklevel=4)
            return
        tok = sampler(logits)
        if stop_at_eos:
            tok[finished] = eos_token_id
            finished |= tok == eos_token_id
        seq[:, cur] = tok
        cur += 1
        yield tok.copy()
        if step + 1 == max_new_tokens or (stop_at_eos and finished.all()):
            return
        if context_full == "stop" and cur >= n_ctx:
            continue  # no position left for the token just made: stop at the loop's top
        if cur - start > n_ctx:
            # slide: recompute the cache of the last `keep` tokens, at positions 0..keep-1
            start = cur - keep
            logits = model.forward_cached(seq[:, start:cur], 0, kv)
        else:
            logits = model.forward_cached(seq[:, cur - 1:cur], cur - 1 - start, kv)


def _pinned_steps(steps):
    """The steps of a generation, each computed (the forward of the last token, the sampling
    of the next) on one thread count: the one set when that step starts.  A generator must
    not hold the pin across a yield: the consumer's other calls, on this thread or another,
    would run under it."""
    while True:
        with pinned_num_threads():
            try:
                tok = next(steps)
            except StopIteration:
                return
        yield tok


def _prepare(model, idx, max_new_tokens, temperature, top_k, top_p, seed, num_samples,
             stop_at_eos, eos_token_id, context_full, token_limit=None):
    args = check_sampling_args(temperature, top_k, top_p, seed, num_samples, max_new_tokens,
                               context_full)
    prompt = check_token_ids(idx, model.config, "idx")
    if stop_at_eos:
        eos_token_id = check_int("eos_token_id", eos_token_id, 0)
    B, T = prompt.shape
    ns = args["num_samples"]
    n_new = args["max_new_tokens"]
    seq = np.empty((B * ns, T + n_new), np.int64)
    seq[:, :T] = np.repeat(prompt, ns, axis=0) if ns > 1 else prompt
    sampler = _Sampler(B * ns, model.config.vocab_size, args["temperature"], args["top_k"],
                       args["top_p"], args["seed"], token_limit)
    steps = _pinned_steps(_decode(model, prompt, seq, n_new, sampler, ns, stop_at_eos,
                                  eos_token_id, args["context_full"])) if n_new > 0 \
        else iter(())
    return seq, steps


def generate(model, idx, max_new_tokens, temperature=1.0, top_k=None, top_p=None, seed=None,
             *, num_samples=1, stop_at_eos=False, eos_token_id=EOT_ID, context_full="slide"):
    """Continue the prompts idx by up to max_new_tokens tokens; returns the token ids
    (B * num_samples, T + new) as an int64 array, prompts included.

    idx: token ids, shape (B, T) (B prompts of the same length) or (T,); 1 <= T <= n_ctx.
    temperature: 0 is greedy argmax; > 0 samples from softmax(logits / temperature).
    top_k: keep only the k most likely tokens (None: all).  top_p: keep only the nucleus
    of probability top_p, 0 < top_p <= 1 (None: all).  seed: int, numpy Generator or None.
    num_samples: continuations per prompt.  stop_at_eos: stop each row at eos_token_id
    (<|endoftext|>), pad finished rows with it and end once all have finished (then new <
    max_new_tokens).  context_full: "slide" or "stop" at n_ctx (see the module docstring).
    """
    seq, steps = _prepare(model, idx, max_new_tokens, temperature, top_k, top_p, seed,
                          num_samples, stop_at_eos, eos_token_id, context_full)
    T = seq.shape[1] - max_new_tokens
    n = 0
    with pinned_num_threads():   # the whole generation on one thread count
        for _ in steps:
            n += 1
    return seq[:, :T + n] if n < max_new_tokens else seq


def generate_stream(model, idx, max_new_tokens, temperature=1.0, top_k=None, top_p=None,
                    seed=None, *, num_samples=1, stop_at_eos=False, eos_token_id=EOT_ID,
                    context_full="slide"):
    """Like generate, but an iterator over the new tokens as they are produced: Python ints
    when idx is 1-D and num_samples is 1, else int64 arrays of shape (B * num_samples,), one
    per step.  Arguments are checked when this is called, not at the first next()."""
    seq, steps = _prepare(model, idx, max_new_tokens, temperature, top_k, top_p, seed,
                          num_samples, stop_at_eos, eos_token_id, context_full)
    if np.ndim(idx) == 1 and seq.shape[0] == 1:
        return (int(tok[0]) for tok in steps)
    return steps


# ---------------------------------------------------------------------------------- text

def _encode_prompts(enc, prompt, config):
    from .tokenizer import EOT_TOKEN
    n_ctx = config.n_ctx
    prompts = [prompt] if isinstance(prompt, str) else prompt
    if not isinstance(prompts, (list, tuple)) or not prompts or \
            not all(isinstance(p, str) for p in prompts):
        raise TypeError(f"prompt must be a str or a non-empty list of str, got {prompt!r:.80}")
    ids = []
    for p in prompts:
        if p == "":
            raise ValueError("the prompt is empty: give at least one token of text (use "
                             f"{EOT_TOKEN!r} to generate unconditionally)")
        t = enc.encode(p, allowed_special={EOT_TOKEN})
        if len(t) > n_ctx:
            raise ValueError(f"the prompt is {len(t)} tokens long, longer than the model's "
                             f"context n_ctx={n_ctx}: {p[:40]!r}...")
        if t and max(t) >= config.vocab_size:
            raise ValueError(f"the prompt has token id {max(t)}, outside the model's vocabulary "
                             f"of {config.vocab_size} tokens: the model was not trained with "
                             f"the GPT-2 tokenizer")
        ids.append(t)
    lengths = sorted({len(t) for t in ids})
    if len(lengths) > 1:
        raise ValueError(f"a batch of prompts must have the same length in tokens; got "
                         f"lengths {[len(t) for t in ids]}")
    return np.array(ids, np.int64)


def _decoder(enc):
    """A function token id -> text piece that holds back incomplete UTF-8 sequences."""
    utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def piece(token, final=False):
        data = b"" if token is None else enc.decode_single_token_bytes(int(token))
        return utf8.decode(data, final=final)
    return piece


def _text_steps(model, prompt, max_new_tokens, temperature=1.0, top_k=None, top_p=None,
                seed=None, *, stop_at_eos=True, context_full="slide", tokenizer=None):
    """(token id, text piece) per generated token of prompt (a str), then (None, the rest
    of the text) once at the end; pieces may be "" while a character is incomplete.
    Arguments are checked when this is called."""
    from .tokenizer import get_tokenizer
    enc = tokenizer or get_tokenizer()
    if not isinstance(prompt, str):
        raise TypeError(f"prompt must be a str, got {type(prompt).__name__}")
    ids = _encode_prompts(enc, prompt, model.config)
    seq, steps = _prepare(model, ids, max_new_tokens, temperature, top_k, top_p, seed, 1,
                          stop_at_eos, EOT_ID, context_full, token_limit=enc.n_vocab)

    def pairs():
        piece = _decoder(enc)
        for tok in steps:
            t = int(tok[0])
            yield t, ("" if stop_at_eos and t == EOT_ID else piece(t))
        yield None, piece(None, final=True)
    return pairs()


def stream_text(model, prompt, max_new_tokens, temperature=1.0, top_k=None, top_p=None,
                seed=None, *, stop_at_eos=True, context_full="slide", tokenizer=None):
    """An iterator of text pieces continuing prompt (a str), decoded as tokens are produced
    (a multi-byte character split across tokens comes out whole).  With stop_at_eos (the
    default here) ``<|endoftext|>`` ends the text and is not part of it.  Other arguments as
    in generate; they are checked when this is called."""
    steps = _text_steps(model, prompt, max_new_tokens, temperature, top_k, top_p, seed,
                        stop_at_eos=stop_at_eos, context_full=context_full, tokenizer=tokenizer)
    return (text for _, text in steps if text)


def generate_text(model, prompt, max_new_tokens, temperature=1.0, top_k=None, top_p=None,
                  seed=None, *, num_samples=1, stop_at_eos=True, context_full="slide",
                  tokenizer=None):
    """Text in, text out: the continuation of prompt (without the prompt itself).

    prompt: a str, or a list of str that encode to the same number of tokens (a batch).
    Returns a str for one prompt and num_samples=1; otherwise a list (one entry per prompt,
    or per sample), or for several prompts with num_samples > 1 a list of lists.
    ``<|endoftext|>`` in the prompt is GPT-2's document separator (token 50256); with
    stop_at_eos (the default here) a continuation ends before the first one generated.
    Other arguments as in generate.
    """
    from .tokenizer import get_tokenizer
    enc = tokenizer or get_tokenizer()
    ids = _encode_prompts(enc, prompt, model.config)
    seq, steps = _prepare(model, ids, max_new_tokens, temperature, top_k, top_p, seed,
                          num_samples, stop_at_eos, EOT_ID, context_full, token_limit=enc.n_vocab)
    with pinned_num_threads():   # the whole generation on one thread count
        n = sum(1 for _ in steps)
    T = ids.shape[1]
    texts = []
    for row in seq[:, T:T + n]:
        new = row.tolist()
        if stop_at_eos and EOT_ID in new:
            new = new[:new.index(EOT_ID)]
        texts.append(enc.decode(new, errors="replace"))
    ns = check_sampling_args(num_samples=num_samples)["num_samples"]
    if isinstance(prompt, str):
        return texts[0] if ns == 1 else texts
    if ns == 1:
        return texts
    return [texts[i * ns:(i + 1) * ns] for i in range(len(prompt))]
