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
* Ragged batches: ``idx`` may be a list of token sequences of different lengths (and
  ``generate_text`` a list of strings of any lengths).  Each row keeps its own positions: its
  prompt is prefilled alone (``forward_cached`` into its rows of the cache), then each step
  decodes every row at its own position (``forward_cached`` with per-row positions: a row
  attends to its own positions only, nothing is padded); a row whose window is full slides
  alone, and with ``context_full="stop"`` a row stops alone (one RuntimeWarning, naming the
  first row).  ``generate`` returns a list of 1-D arrays (row r: its prompt and its own new
  tokens); streams pad a row that has stopped with ``eos_token_id`` (with token 0 when
  that is not one of the model's ids, as a character vocabulary's place-holder is not).  A
  row's tokens are those of generating its prompt alone; its logits may differ from those in
  the last bit (a step's matrix products have several rows), as in a rectangular batch.
* Seeds per row: ``seed`` may be a list of one seed (int or Generator) per output row
  (B * num_samples); row r then draws one uniform per step from its own generator, exactly as
  a one-row generation with ``seed=seed[r]``.  A single seed is one generator shared by the
  rows (one number per row per step, rows in order).
* Controls, applied in this order to a step's logits before the choice, each skipped unless
  set (their defaults change nothing): ``repetition_penalty`` (a token already in the row,
  prompt included, has its logit divided by it when positive, multiplied when negative:
  transformers' definition); ``frequency_penalty`` and ``presence_penalty`` (token j's logit
  minus c_j * frequency_penalty + (c_j > 0) * presence_penalty, c_j its count among the new
  tokens: OpenAI's definition); ``min_new_tokens`` (``eos_token_id`` set to the lowest
  float32 before that many new tokens); ``logits_processor`` (``fn(token_ids, logits)``:
  token_ids a list of one read-only int64 array per row, the row's whole sequence so far;
  logits the (rows, vocab_size) float32 array, changed in place (return None or it) or
  replaced by a returned array of that shape; -inf bans a token, NaN/+inf or banning every
  token of a row raise ValueError).
* ``stop`` (text functions): a continuation ends before the first occurrence of any stop
  string in its decoded text (across token boundaries; the stop string is left out).  Only
  occurrences that end in the text of the ``min_new_tokens``-th new token or later count.
  ``stream_text`` holds back the end of the text while it is the start of a stop string.
* ``stop_at_eos=True`` stops a row at ``<|endoftext|>`` (``eos_token_id``, included in the
  output); a finished row is padded with ``eos_token_id`` (token 0 if that is not one of
  the model's ids) while the others go on, and
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

__all__ = ["generate", "generate_stream", "generate_text", "stream_text", "check_controls",
           "EOT_ID"]

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
    if isinstance(seed, (list, tuple)):
        if not seed:
            raise ValueError("seed is an empty list: give one seed per row")
        seed = tuple(_check_seed(x) for x in seed)
    else:
        seed = _check_seed(seed)
    num_samples = check_int("num_samples", num_samples, 1)
    if context_full not in _CONTEXT_FULL:
        raise ValueError(f"context_full must be one of {_CONTEXT_FULL}, got {context_full!r}")
    return dict(temperature=temperature, top_k=top_k, top_p=top_p, seed=seed,
                num_samples=num_samples, max_new_tokens=max_new_tokens,
                context_full=context_full)


def check_controls(repetition_penalty=1.0, presence_penalty=0.0, frequency_penalty=0.0,
                   min_new_tokens=0, stop=None, logits_processor=None):
    """Validate the generation controls (shared with the CLI); returns them normalised:
    ``stop`` as a tuple of str.  Raises TypeError/ValueError naming the bad value."""
    def real(name, value):
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise TypeError(f"{name} must be a number, got {value!r}")
        value = float(value)
        if not math.isfinite(value):
            raise ValueError(f"{name} must be a finite number, got {value}")
        return value
    repetition_penalty = real("repetition_penalty", repetition_penalty)
    if repetition_penalty <= 0.0:
        raise ValueError(f"repetition_penalty must be > 0 (1 is no penalty), got "
                         f"{repetition_penalty}")
    presence_penalty = real("presence_penalty", presence_penalty)
    frequency_penalty = real("frequency_penalty", frequency_penalty)
    min_new_tokens = check_int("min_new_tokens", min_new_tokens, 0)
    if stop is None:
        stop = ()
    elif isinstance(stop, str):
        stop = (stop,)
    elif isinstance(stop, (list, tuple)) and all(isinstance(x, str) for x in stop):
        stop = tuple(stop)
    else:
        raise TypeError(f"stop must be a str or a list of str, got {stop!r:.80}")
    if any(x == "" for x in stop):
        raise ValueError("stop contains an empty string: every stop string needs at least "
                         "one character")
    if logits_processor is not None and not callable(logits_processor):
        raise TypeError(f"logits_processor must be a callable fn(token_ids, logits) or None, "
                        f"got {type(logits_processor).__name__}")
    return dict(repetition_penalty=repetition_penalty, presence_penalty=presence_penalty,
                frequency_penalty=frequency_penalty, min_new_tokens=min_new_tokens, stop=stop,
                logits_processor=logits_processor)


def _check_seed(seed):
    if seed is None or isinstance(seed, np.random.Generator):
        return seed
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
        raise TypeError(f"seed must be a non-negative integer, a numpy.random.Generator, "
                        f"one of those per row, or None, got {seed!r:.80}")
    if seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed}")
    return int(seed)


# ---------------------------------------------------------------------------------- sampler

_LOWEST = np.finfo(np.float32).min   # a token's logit when it must not be chosen
_HIGHEST = np.finfo(np.float32).max


class _Controls:
    """The logit changes before sampling, each costing only when enabled: the repetition,
    presence and frequency penalties, min_new_tokens and the user's logits processor."""

    def __init__(self, rows, vocab_size, controls, eos_token_id, seq, lengths):
        self.rep = controls["repetition_penalty"]
        self.presence = controls["presence_penalty"]
        self.frequency = controls["frequency_penalty"]
        self.min_new = controls["min_new_tokens"]
        self.processor = controls["logits_processor"]
        self.eos = eos_token_id
        self.rows = rows
        self.vocab_size = vocab_size
        # seen (repetition): every token of the prompt and of the output so far;
        # counts (presence, frequency): the tokens generated so far
        self.seen = None
        if self.rep != 1.0:
            self.seen = np.zeros((rows, vocab_size), bool)
            for r in range(rows):
                self.seen[r, seq[r, :lengths[r]]] = True
        self.counts = None
        if self.presence != 0.0 or self.frequency != 0.0:
            self.counts = np.zeros((rows, vocab_size), np.float32)
        self.enabled = (self.seen is not None or self.counts is not None or self.min_new > 0
                        or self.processor is not None)

    def apply(self, logits, step, seq, cur):
        """Change logits (rows, V) in place for the token of generation step ``step``."""
        with np.errstate(over="ignore"):   # an overflow is clipped below
            if self.seen is not None:
                # transformers' RepetitionPenaltyLogitsProcessor: a logit of a token already in
                # the sequence is divided by the penalty when positive, multiplied when negative
                x = logits[self.seen]
                theta = np.float32(self.rep)
                logits[self.seen] = np.where(x < 0, x * theta, x / theta)
            if self.counts is not None:
                # OpenAI's definition: mu_j -= c_j * frequency_penalty
                #                               + (c_j > 0) * presence_penalty,
                # c_j the times token j was generated so far
                if self.frequency != 0.0:
                    logits -= self.counts * np.float32(self.frequency)
                if self.presence != 0.0:
                    logits -= (self.counts > 0) * np.float32(self.presence)
            if self.seen is not None or self.counts is not None:
                # a penalty may overflow float32 (a banned token's lowest logit times 1.2): the
                # kernels take finite logits
                np.clip(logits, _LOWEST, _HIGHEST, out=logits)
        if step < self.min_new:
            if isinstance(self.eos, np.ndarray):    # several end tokens (a Llama config's list)
                logits[:, self.eos[self.eos < self.vocab_size]] = _LOWEST
            elif self.eos < self.vocab_size:
                logits[:, self.eos] = _LOWEST
        if self.processor is not None:
            ids = []
            for r in range(self.rows):
                v = seq[r, :cur if isinstance(cur, int) else cur[r]]
                v.flags.writeable = False
                ids.append(v)
            out = self.processor(ids, logits)
            if out is not None and out is not logits:
                out = np.asarray(out)
                if out.shape != logits.shape:
                    raise ValueError(f"logits_processor returned shape {out.shape}, expected "
                                     f"{logits.shape} (rows, vocab_size)")
                logits[...] = out
            if np.isnan(logits).any() or np.isposinf(logits).any():
                raise ValueError(f"logits_processor returned NaN or +inf logits at generation "
                                 f"step {step} (-inf bans a token; NaN and +inf are refused)")
            np.maximum(logits, _LOWEST, out=logits)   # -inf: never chosen
            if (logits == _LOWEST).all(axis=1).any():
                r = int(np.flatnonzero((logits == _LOWEST).all(axis=1))[0])
                raise ValueError(f"logits_processor banned every token of row {r} at "
                                 f"generation step {step}")

    def update(self, tok):
        rows = np.arange(self.rows)
        if self.seen is not None:
            self.seen[rows, tok] = True
        if self.counts is not None:
            self.counts[rows, tok] += 1


class _Sampler:
    """Turns a (rows, V) logits array into one token per row; buffers allocated once.

    seed: one generator for all rows (an int, a Generator or None: each step draws one
    uniform number per row, rows in order), or a list of one seed per row (row r draws
    from its own generator, exactly as a one-row generation with that seed)."""

    def __init__(self, rows, vocab_size, temperature, top_k, top_p, seed, token_limit,
                 controls=None):
        self.greedy = temperature == 0.0
        self.temperature = temperature
        self.top_k = 0 if top_k is None or top_k >= vocab_size else top_k
        self.top_p = 1.0 if top_p is None else top_p
        if isinstance(seed, (list, tuple)):
            self.rng = None
            self.rngs = [s if isinstance(s, np.random.Generator) else np.random.default_rng(s)
                         for s in seed]
        else:
            self.rng = seed if isinstance(seed, np.random.Generator) else \
                np.random.default_rng(seed)
        self.out = np.empty(rows, np.int64)
        self.weights = None if self.greedy else np.empty((rows, vocab_size), np.float32)
        # ids the tokenizer cannot decode (a vocabulary padded past it, e.g. 50304) are
        # never sampled
        self.token_limit = token_limit if token_limit is not None and token_limit < vocab_size \
            else None
        self.controls = controls if controls is not None and controls.enabled else None
        self.step = 0

    def __call__(self, logits, seq=None, cur=None):
        if not np.isfinite(logits).all():
            bad = np.argwhere(~np.isfinite(logits))[0]
            raise FloatingPointError(
                f"the model produced a non-finite logit ({logits[tuple(bad)]}) for row "
                f"{bad[0]}, token {bad[1]} at generation step {self.step}: its weights "
                f"may be corrupt")
        if self.token_limit is not None:
            logits[:, self.token_limit:] = np.finfo(np.float32).min
        if self.controls is not None:
            self.controls.apply(logits, self.step, seq, cur)
        self.step += 1
        if self.greedy:
            _core.argmax_rows(self.out, logits)
        else:
            if self.rng is not None:
                u = self.rng.random(self.out.shape[0])
            else:
                u = np.array([g.random() for g in self.rngs])
            _core.sample_rows(self.out, logits, u, self.temperature, self.top_k, self.top_p,
                              self.weights)
        return self.out


# ---------------------------------------------------------------------------------- decoding

class _Run:
    """One generation: seq (rows, Tmax + max_new_tokens) holds row r's prompt at
    seq[r, :lengths[r]] and its new tokens after it; n_out[r] counts the new tokens that are
    row r's own (a row that has stopped is padded beyond them); steps is the iterator of
    each step's (rows,) tokens."""

    def __init__(self, seq, lengths, ragged, max_new_tokens):
        self.seq = seq
        self.lengths = lengths
        self.ragged = ragged
        self.max_new_tokens = max_new_tokens
        self.n_out = np.zeros(seq.shape[0], np.int64)
        self.steps = iter(())

    def rows(self):
        """Each row's prompt and own new tokens, a list of 1-D int64 arrays."""
        return [self.seq[r, :self.lengths[r] + self.n_out[r]] for r in range(self.seq.shape[0])]


def _decode(model, prompts, run, max_new_tokens, sampler, num_samples, stop_at_eos,
            eos_token_id, context_full, stopper=None):
    """Yield the (rows,) new tokens of each step; run.seq already holds the prompts and
    receives each new token.  prompts: a (B, T) array, or (ragged) a list of B 1-D arrays."""
    n_ctx = model.config.n_ctx
    seq, lens = run.seq, run.lengths
    ns = num_samples
    B = len(prompts)
    rows = B * ns
    T = int(lens.max())
    # the cache belongs to this generation alone (so generations on one model, interleaved
    # or in several threads, never disturb each other), sized for what it can reach: the
    # prompt and the new tokens, at most the context (a sliding window restarts at 0)
    kv = model.kv_cache(rows, min(n_ctx, T + max_new_tokens))
    if run.ragged:
        # prompts of different lengths: each prefilled alone into its first row (exactly as a
        # one-prompt generation does), its keys and values copied to its other samples' rows
        logits = np.empty((rows, model.config.vocab_size), np.float32)
        for b, p in enumerate(prompts):
            logits[b * ns:(b + 1) * ns] = model.forward_cached(p[None], 0,
                                                               kv.view_rows(b * ns, b * ns + 1))
            for array in (kv.keys, kv.values):
                array[:, b * ns + 1:(b + 1) * ns, :len(p)] = array[:, b * ns:b * ns + 1, :len(p)]
    elif ns == 1:
        logits = model.forward_cached(prompts, 0, kv)
    else:
        # prefill each distinct prompt once, into cache rows 0..B-1 (each layer's (B, n_ctx, C)
        # block of them is contiguous), then copy prompt b's keys and values to the rows of
        # its samples, b*ns .. b*ns + ns-1; from the last prompt down, so no source row is
        # overwritten before it is copied
        logits = model.forward_cached(prompts, 0, kv.view_rows(0, B))
        for array in (kv.keys, kv.values):
            for b in reversed(range(B)):
                array[:, b * ns:(b + 1) * ns, :T] = array[:, b:b + 1, :T]
        logits = np.repeat(logits, ns, axis=0)
    keep = n_ctx - n_ctx // 2
    if not run.ragged:
        yield from _decode_rectangular(model, run, kv, logits, max_new_tokens, sampler,
                                       stop_at_eos, eos_token_id, context_full, stopper)
        return
    every = np.arange(rows)
    cur = lens.copy()                   # seq[r, start[r]:cur[r]] is row r's cached window
    start = np.zeros(rows, np.int64)
    done = np.zeros(rows, bool)         # rows whose output is complete
    warned = False
    for step in range(max_new_tokens):
        if context_full == "stop":
            full = (cur >= n_ctx) & ~done
            if full.any():
                if not warned:
                    warnings.warn(
                        f"row {int(np.flatnonzero(full)[0])}: generation stopped after {step} "
                        f"of {max_new_tokens} new tokens: the sequence reached the model's "
                        f"context of n_ctx={n_ctx} positions (pass context_full='slide' to go "
                        f"on with a sliding window)", RuntimeWarning, stacklevel=4)
                    warned = True
                done |= full
                if done.all():
                    return
        tok = sampler(logits, seq, cur)
        # a finished row is padded
        tok[done] = _eos_pad(eos_token_id, model.config.vocab_size)
        run.n_out[~done] += 1
        if stop_at_eos:
            done |= _is_eos(tok, eos_token_id)
        seq[every, cur] = tok
        cur += 1
        if sampler.controls is not None:
            sampler.controls.update(tok)
        if stopper is not None:
            done |= stopper(tok)
        yield tok.copy()
        if step + 1 == max_new_tokens or done.all():
            return
        # one step for every row at its own position; a row that is done or out of room runs
        # a throw-away step at position 0 (its cache is no longer read), and a row whose
        # window is full then recomputes its last `keep` tokens alone
        slide = (cur - start > n_ctx) & ~done
        idle = done | slide | (cur >= n_ctx) & (context_full == "stop")
        pos = np.where(idle, 0, cur - 1 - start)
        last = np.where(idle, 0, seq[every, cur - 1])[:, None]   # (its pad may be no token id)
        logits = model.forward_cached(last, pos, kv)
        for r in np.flatnonzero(slide):
            start[r] = cur[r] - keep
            logits[r] = model.forward_cached(seq[r:r + 1, start[r]:cur[r]], 0,
                                             kv.view_rows(r, r + 1))[0]


def _decode_rectangular(model, run, kv, logits, max_new_tokens, sampler, stop_at_eos,
                        eos_token_id, context_full, stopper):
    """The steps of a batch whose rows all sit at the same position (scalar cur, start)."""
    n_ctx = model.config.n_ctx
    seq = run.seq
    keep = n_ctx - n_ctx // 2
    start, cur = 0, seq.shape[1] - max_new_tokens   # seq[:, start:cur] is the cached window
    done = np.zeros(seq.shape[0], bool) if stop_at_eos or stopper is not None else None
    for step in range(max_new_tokens):
        if context_full == "stop" and cur >= n_ctx:
            warnings.warn(
                f"generation stopped after {step} of {max_new_tokens} new tokens: the "
                f"sequence reached the model's context of n_ctx={n_ctx} positions (pass "
                f"context_full='slide' to go on with a sliding window)",
                RuntimeWarning, stacklevel=5)
            return
        tok = sampler(logits, seq, cur)
        if done is None:
            run.n_out += 1
        else:
            tok[done] = _eos_pad(eos_token_id, model.config.vocab_size)   # padded
            run.n_out[~done] += 1
            if stop_at_eos:
                done |= _is_eos(tok, eos_token_id)
        seq[:, cur] = tok
        cur += 1
        if sampler.controls is not None:
            sampler.controls.update(tok)
        if stopper is not None:
            done |= stopper(tok)
        yield tok.copy()
        if step + 1 == max_new_tokens or (done is not None and done.all()):
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


def _is_ragged(idx):
    """Whether idx is a list of token sequences of different lengths."""
    if not isinstance(idx, (list, tuple)) or len(idx) < 2:
        return False
    lengths = set()
    for row in idx:
        if isinstance(row, (str, bytes)) or np.ndim(row) != 1:
            return False
        lengths.add(len(row))
    return len(lengths) > 1


def _check_eos(eos_token_id):
    """An end token id (an int), or several (a non-empty list or tuple of ints, as a Llama
    config's eos_token_id may be: a 1-D int64 array, the first the padding)."""
    if isinstance(eos_token_id, (list, tuple, np.ndarray)):
        ids = [check_int(f"eos_token_id[{i}]", t, 0) for i, t in enumerate(eos_token_id)]
        if not ids:
            raise ValueError("eos_token_id: an empty list (give at least one end token)")
        return ids[0] if len(ids) == 1 else np.array(ids, np.int64)
    return check_int("eos_token_id", eos_token_id, 0)


def _eos_pad(eos, vocab_size):
    """The token that pads a finished row: the (first) end token when it is one of the
    model's tokens, else 0 (a character vocabulary has no end token: its place-holder,
    GPT-2's 50256, is no id of a 65-token model, and the penalties index their per-token
    tables with every step's tokens).  A pad is never fed to the model as a row's input."""
    first = int(eos[0] if isinstance(eos, (np.ndarray, list, tuple)) else eos)
    return first if 0 <= first < vocab_size else 0


def _is_eos(tok, eos):
    """Which of the tokens tok (an array) are an end token."""
    return np.isin(tok, eos) if isinstance(eos, (np.ndarray, list, tuple)) else tok == eos


def _prepare(model, idx, max_new_tokens, temperature, top_k, top_p, seed, num_samples,
             stop_at_eos, eos_token_id, context_full, token_limit=None, controls=None,
             stopper_factory=None):
    args = check_sampling_args(temperature, top_k, top_p, seed, num_samples, max_new_tokens,
                               context_full)
    controls = check_controls(**(controls or {}))
    ragged = _is_ragged(idx)
    if ragged:
        prompts = [check_token_ids(row, model.config, f"idx[{i}]")[0]
                   for i, row in enumerate(idx)]
    else:
        prompts = check_token_ids(idx, model.config, "idx")
    if stop_at_eos or controls["min_new_tokens"] > 0 or ragged:
        eos_token_id = _check_eos(eos_token_id)
    B = len(prompts)
    ns = args["num_samples"]
    rows = B * ns
    if isinstance(args["seed"], tuple) and len(args["seed"]) != rows:
        raise ValueError(f"seed has {len(args['seed'])} entries for {rows} rows (one seed per "
                         f"row: prompts x num_samples)")
    n_new = args["max_new_tokens"]
    lengths = np.repeat([len(p) for p in prompts], ns).astype(np.int64)
    try:   # every row's token ids: prompt and new tokens
        seq = np.empty((rows, int(lengths.max()) + n_new), np.int64)
    except (MemoryError, ValueError):   # NumPy: too much memory, or too large a dimension
        raise ValueError(f"max_new_tokens must leave room in memory for the token ids "
                         f"({rows} row(s) of {int(lengths.max()) + n_new:,} int64), got "
                         f"{n_new:,}") from None
    if ragged:
        for r in range(rows):
            seq[r, :lengths[r]] = prompts[r // ns]
    else:
        seq[:, :prompts.shape[1]] = np.repeat(prompts, ns, axis=0) if ns > 1 else prompts
    run = _Run(seq, lengths, ragged, n_new)
    ctl = _Controls(rows, model.config.vocab_size, controls, eos_token_id, seq, lengths)
    sampler = _Sampler(rows, model.config.vocab_size, args["temperature"], args["top_k"],
                       args["top_p"], args["seed"], token_limit, ctl)
    stopper = stopper_factory(rows, controls) if stopper_factory is not None else None
    if n_new > 0:
        run.steps = _pinned_steps(_decode(model, prompts, run, n_new, sampler, ns, stop_at_eos,
                                          eos_token_id, args["context_full"], stopper))
    run.stopper = stopper
    return run




def _controls(repetition_penalty, presence_penalty, frequency_penalty, min_new_tokens,
              logits_processor, stop=None):
    return dict(repetition_penalty=repetition_penalty, presence_penalty=presence_penalty,
                frequency_penalty=frequency_penalty, min_new_tokens=min_new_tokens,
                logits_processor=logits_processor, stop=stop)


def generate(model, idx, max_new_tokens, temperature=1.0, top_k=None, top_p=None, seed=None,
             *, num_samples=1, stop_at_eos=False, eos_token_id=EOT_ID, context_full="slide",
             repetition_penalty=1.0, presence_penalty=0.0, frequency_penalty=0.0,
             min_new_tokens=0, logits_processor=None):
    """Continue the prompts idx by up to max_new_tokens tokens; returns the token ids
    (B * num_samples, T + new) as an int64 array, prompts included.

    idx: token ids, shape (B, T) (B prompts of the same length) or (T,); 1 <= T <= n_ctx.
    Or a list of B token sequences of different lengths (a ragged batch): then the result is
    a list of B * num_samples 1-D int64 arrays, row r its prompt and its own new tokens, as
    generating that prompt alone would give them (with seed, a list of one seed per row).
    temperature: 0 is greedy argmax; > 0 samples from softmax(logits / temperature).
    top_k: keep only the k most likely tokens (None: all).  top_p: keep only the nucleus
    of probability top_p, 0 < top_p <= 1 (None: all).  seed: int, numpy Generator or None,
    or a list of those, one per row (B * num_samples).
    num_samples: continuations per prompt.  stop_at_eos: stop each row at eos_token_id
    (<|endoftext|>), pad finished rows with it and end once all have finished (then new <
    max_new_tokens).  context_full: "slide" or "stop" at n_ctx (see the module docstring).
    repetition_penalty, presence_penalty, frequency_penalty, min_new_tokens,
    logits_processor: see the module docstring ("Controls"); their defaults change nothing.
    """
    run = _prepare(model, idx, max_new_tokens, temperature, top_k, top_p, seed, num_samples,
                   stop_at_eos, eos_token_id, context_full,
                   controls=_controls(repetition_penalty, presence_penalty, frequency_penalty,
                                      min_new_tokens, logits_processor))
    n = 0
    with pinned_num_threads():   # the whole generation on one thread count
        for _ in run.steps:
            n += 1
    if run.ragged:
        return run.rows()
    T = run.seq.shape[1] - max_new_tokens
    return run.seq[:, :T + n] if n < max_new_tokens else run.seq


def generate_stream(model, idx, max_new_tokens, temperature=1.0, top_k=None, top_p=None,
                    seed=None, *, num_samples=1, stop_at_eos=False, eos_token_id=EOT_ID,
                    context_full="slide", repetition_penalty=1.0, presence_penalty=0.0,
                    frequency_penalty=0.0, min_new_tokens=0, logits_processor=None):
    """Like generate, but an iterator over the new tokens as they are produced: Python ints
    when idx is 1-D and num_samples is 1, else int64 arrays of shape (B * num_samples,), one
    per step (in a ragged batch a row that has stopped, at eos or at the context with
    context_full="stop", is padded with eos_token_id, or 0 when that is no id of the
    model).  Arguments are checked when this is called, not at the first next()."""
    run = _prepare(model, idx, max_new_tokens, temperature, top_k, top_p, seed, num_samples,
                   stop_at_eos, eos_token_id, context_full,
                   controls=_controls(repetition_penalty, presence_penalty, frequency_penalty,
                                      min_new_tokens, logits_processor))
    if not run.ragged and np.ndim(idx) == 1 and run.seq.shape[0] == 1:
        return (int(tok[0]) for tok in run.steps)
    return run.steps


# ---------------------------------------------------------------------------------- text

def _encode_prompts(enc, prompt, config):
    """The token ids of prompt (a str or a list of str): a (B, T) array, or a list of 1-D
    arrays when the prompts encode to different lengths."""
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
    if len({len(t) for t in ids}) > 1:
        return [np.array(t, np.int64) for t in ids]
    return np.array(ids, np.int64)


def _decoder(enc):
    """A function token id -> text piece that holds back incomplete UTF-8 sequences."""
    utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def piece(token, final=False):
        data = b"" if token is None else enc.decode_single_token_bytes(int(token))
        return utf8.decode(data, final=final)
    return piece


class _TextRows:
    """The text of each row as its tokens come, with the stop strings: a row's text ends
    before the first occurrence of any stop string (matched in the text, across token
    boundaries), and ``ready(r)`` is the length of row r's text that can no longer turn out
    to be part of a stop string (what a stream may show).  Called with each step's tokens;
    returns the rows that reached a stop string at that step."""

    def __init__(self, enc, rows, stop, min_new_tokens, stop_at_eos, eos_token_id):
        self.pieces = [_decoder(enc) for _ in range(rows)]
        self.text = [""] * rows
        self.end = [None] * rows        # where a row's text ends (a stop string starts)
        self.finished = np.zeros(rows, bool)
        self.stop = stop
        self.min_new = min_new_tokens
        self.stop_at_eos = stop_at_eos
        self.eos = eos_token_id
        self.floor = [0] * rows         # stop strings count only when they end after this
        self.step = 0

    def __call__(self, tok):
        hit = np.zeros(len(self.text), bool)
        for r, t in enumerate(tok.tolist()):
            if self.finished[r]:
                continue
            if self.stop_at_eos and bool(_is_eos(t, self.eos)):
                self.finished[r] = True
                self._close(r)
                continue
            old = len(self.text[r])
            if self.step + 1 == self.min_new:
                self.floor[r] = old      # the text before the min_new_tokens-th token
            self.text[r] += self.pieces[r](t)
            if self.step + 1 >= self.min_new and self._find(r, old):
                hit[r] = True
        self.step += 1
        return hit

    def _find(self, r, old):
        # the first stop string that ends after max(old, floor): earlier ones were looked
        # for already, or do not count (min_new_tokens)
        text = self.text[r]
        best = None
        for s in self.stop:
            i = text.find(s, max(0, max(old, self.floor[r]) - len(s) + 1))
            if i >= 0 and (best is None or i < best):
                best = i
        if best is None:
            return False
        self.end[r] = best
        self.finished[r] = True
        return True

    def _close(self, r):
        if self.end[r] is None:
            old = len(self.text[r])
            self.text[r] += self.pieces[r](None, final=True)
            if self.step + 1 >= self.min_new:
                self._find(r, old)

    def finish(self):
        """End every row's text (a row still open flushes its incomplete characters)."""
        for r in range(len(self.text)):
            if not self.finished[r]:
                self.finished[r] = True
                self._close(r)

    def result(self, r):
        return self.text[r] if self.end[r] is None else self.text[r][:self.end[r]]

    def ready(self, r):
        """The length of row r's text that is final."""
        if self.end[r] is not None:
            return self.end[r]
        text = self.text[r]
        if self.finished[r]:
            return len(text)
        hold = 0   # the longest end of the text that begins a stop string
        for s in self.stop:
            for k in range(min(len(s) - 1, len(text)), hold, -1):
                if text.endswith(s[:k]):
                    hold = k
                    break
        return len(text) - hold


def _eos_of(enc):
    """The end-of-text id of a tokenizer: a model's own vocabulary's (``eot_id``: None for
    one without, e.g. characters), else GPT-2's 50256."""
    return getattr(enc, "eot_id", EOT_ID)


def _text_eos(enc, eos_token_id, stop_at_eos):
    """(stop_at_eos, end token(s)) of a text call: eos_token_id when given (a Llama
    config's, maybe a list), else the tokenizer's own end-of-text id; a vocabulary without
    one (characters) stops at nothing: 50256 is then a place-holder that is no token of it
    (finished rows are padded with token 0 instead, see _eos_pad)."""
    if eos_token_id is None:
        eos_token_id = _eos_of(enc)
        if eos_token_id is None:
            return False, EOT_ID
    return stop_at_eos, eos_token_id


def _text_run(model, enc, ids, max_new_tokens, temperature, top_k, top_p, seed, num_samples,
              stop_at_eos, context_full, stop, repetition_penalty, presence_penalty,
              frequency_penalty, min_new_tokens, logits_processor, eos_token_id=None):
    stop_at_eos, eos = _text_eos(enc, eos_token_id, stop_at_eos)
    controls = _controls(repetition_penalty, presence_penalty, frequency_penalty,
                         min_new_tokens, logits_processor, stop)
    stop = check_controls(**controls)["stop"]
    factory = None
    if stop:
        def factory(rows, c):
            return _TextRows(enc, rows, c["stop"], c["min_new_tokens"], stop_at_eos, eos)
    return _prepare(model, ids, max_new_tokens, temperature, top_k, top_p, seed, num_samples,
                    stop_at_eos, eos, context_full, token_limit=enc.n_vocab,
                    controls=controls, stopper_factory=factory)


def _text_steps(model, prompt, max_new_tokens, temperature=1.0, top_k=None, top_p=None,
                seed=None, *, stop_at_eos=True, context_full="slide", tokenizer=None,
                stop=None, repetition_penalty=1.0, presence_penalty=0.0, frequency_penalty=0.0,
                min_new_tokens=0, logits_processor=None, eos_token_id=None, prompt_ids=None):
    """(token id, text piece) per generated token of prompt (a str), then (None, the rest
    of the text) once at the end; pieces may be "" while a character is incomplete or the
    text may still be part of a stop string.  eos_token_id: the end token, or a list of
    them (a Llama config's); None: the tokenizer's own.  prompt_ids: the prompt's token ids,
    used instead of encoding prompt (an unconditional start token, which a tokenizer may
    not encode back from its text).  Arguments are checked when this is called."""
    from .tokenizer import get_tokenizer
    enc = tokenizer or get_tokenizer()
    if not isinstance(prompt, str):
        raise TypeError(f"prompt must be a str, got {type(prompt).__name__}")
    ids = _encode_prompts(enc, prompt, model.config) if prompt_ids is None else \
        np.array([prompt_ids], np.int64)
    run = _text_run(model, enc, ids, max_new_tokens, temperature, top_k, top_p, seed, 1,
                    stop_at_eos, context_full, stop, repetition_penalty, presence_penalty,
                    frequency_penalty, min_new_tokens, logits_processor, eos_token_id)

    stops, eos = _text_eos(enc, eos_token_id, stop_at_eos)

    def pairs():
        piece = _decoder(enc)
        for tok in run.steps:
            t = int(tok[0])
            yield t, ("" if stops and bool(_is_eos(t, eos)) else piece(t))
        yield None, piece(None, final=True)

    def stopped_pairs():
        rows = run.stopper
        shown = 0
        for tok in run.steps:
            n = rows.ready(0)
            yield int(tok[0]), rows.text[0][shown:n]
            shown = max(shown, n)
        rows.finish()
        yield None, rows.result(0)[shown:]
    return stopped_pairs() if run.stopper is not None else pairs()


def stream_text(model, prompt, max_new_tokens, temperature=1.0, top_k=None, top_p=None,
                seed=None, *, stop_at_eos=True, context_full="slide", tokenizer=None,
                stop=None, repetition_penalty=1.0, presence_penalty=0.0, frequency_penalty=0.0,
                min_new_tokens=0, logits_processor=None):
    """An iterator of text pieces continuing prompt (a str), decoded as tokens are produced
    (a multi-byte character split across tokens comes out whole).  With stop_at_eos (the
    default here) ``<|endoftext|>`` ends the text and is not part of it.  stop: a str or a
    list of str; the text ends before the first one it contains, which is not shown (text
    that may be the start of a stop string is held back until the next tokens decide).
    Other arguments as in generate; they are checked when this is called."""
    steps = _text_steps(model, prompt, max_new_tokens, temperature, top_k, top_p, seed,
                        stop_at_eos=stop_at_eos, context_full=context_full, tokenizer=tokenizer,
                        stop=stop, repetition_penalty=repetition_penalty,
                        presence_penalty=presence_penalty, frequency_penalty=frequency_penalty,
                        min_new_tokens=min_new_tokens, logits_processor=logits_processor)
    return (text for _, text in steps if text)


def generate_text(model, prompt, max_new_tokens, temperature=1.0, top_k=None, top_p=None,
                  seed=None, *, num_samples=1, stop_at_eos=True, context_full="slide",
                  tokenizer=None, stop=None, repetition_penalty=1.0, presence_penalty=0.0,
                  frequency_penalty=0.0, min_new_tokens=0, logits_processor=None,
                  eos_token_id=None):
    """Text in, text out: the continuation of prompt (without the prompt itself).

    prompt: a str, or a list of str (a batch; they may encode to different lengths, each
    row is then continued as it would be alone; with seed, a list of one seed per row gives
    each row its own generator).
    Returns a str for one prompt and num_samples=1; otherwise a list (one entry per prompt,
    or per sample), or for several prompts with num_samples > 1 a list of lists.
    ``<|endoftext|>`` in the prompt is GPT-2's document separator (token 50256); with
    stop_at_eos (the default here) a continuation ends before the first one generated.
    stop: a str or a list of str; a continuation ends before the first one it contains (the
    stop string is not part of it).  eos_token_id: the end token, or a list of them (a Llama
    config's); None (the default): the tokenizer's own end-of-text token (GPT-2's 50256, a
    trained vocabulary's own, none for characters).  Other arguments as in generate.
    """
    from .tokenizer import get_tokenizer
    enc = tokenizer or get_tokenizer()
    ids = _encode_prompts(enc, prompt, model.config)
    run = _text_run(model, enc, ids, max_new_tokens, temperature, top_k, top_p, seed,
                    num_samples, stop_at_eos, context_full, stop, repetition_penalty,
                    presence_penalty, frequency_penalty, min_new_tokens, logits_processor,
                    eos_token_id)
    with pinned_num_threads():   # the whole generation on one thread count
        for _ in run.steps:
            pass
    if run.stopper is not None:
        run.stopper.finish()
        texts = [run.stopper.result(r) for r in range(run.seq.shape[0])]
    else:
        texts = []
        stops, eos = _text_eos(enc, eos_token_id, stop_at_eos)
        for r, row in enumerate(run.rows()):
            new = row[run.lengths[r]:].tolist()
            if stops:
                ends = [i for i, t in enumerate(new) if _is_eos(t, eos)]
                if ends:
                    new = new[:ends[0]]
            texts.append(enc.decode(new, errors="replace"))
    ns = check_sampling_args(num_samples=num_samples)["num_samples"]
    if isinstance(prompt, str):
        return texts[0] if ns == 1 else texts
    if ns == 1:
        return texts
    return [texts[i * ns:(i + 1) * ns] for i in range(len(prompt))]
