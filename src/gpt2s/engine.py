"""Continuous batching: many generations on one model share one decode batch.

`BatchEngine` runs a scheduler thread that owns a KV cache of ``slots`` rows.  Requests
(`BatchEngine.submit`) wait in a bounded queue, then each takes a free slot; every scheduler
iteration runs **one decode step for all the running rows together** (each row at its own
position: ``forward_cached`` with per-row positions) and then prefills at most
``prefill_chunk`` prompt tokens of the requests being admitted (several short prompts, or one
chunk of a long one), so a long prompt delays the running streams by one chunk at a time,
not by its whole prefill.  A request leaves the
batch at the token boundary where it finishes (its end token, a stop string, its
``max_tokens``, the context) or is cancelled (`Request.cancel`: a client that went away), and
the next queued request takes its slot at once: iteration-level scheduling.

Each row has its own sampler (temperature, top-k, top-p, seed, penalties) and stop rules, and
its numbers do not depend on the other rows: the decode batch always has between 2 and 32
rows (a lone row runs beside a throw-away row), the range where gpt2s' matmul kernels compute
each row exactly as they would with any other rows beside it, and a prompt is prefilled alone,
in chunks that depend only on its own length.  So a request's greedy output is the same
whether it ran alone or in a busy batch, bit for bit; with ``prompt <= prefill_chunk`` tokens
its tokens are also those of ``model.generate`` (which decodes one row at a time; its logits
may differ in the last bit, so an exact tie could break differently).

Threads and OpenMP: the scheduler thread runs every kernel.  libgomp gives each thread that
runs a parallel region a team of worker threads of its own, kept while that thread lives, and
once it manages more threads than there are CPUs its workers stop spinning between regions and
sleep instead: a model loaded (int8 and int4 weights are quantized in parallel) or run in the
main thread and then served here made each decoding step 2.4x slower (GPT-2 124M int8, 2
threads, 2-core Zen 5: 7.7 ms against 3.2 ms).  Load the model with `load_in_thread` (as
``python -m gpt2s.serve`` does) and leave the kernels to the engine while it runs.

Examples:
    >>> from gpt2s import GPT2, GPT2Config
    >>> m = GPT2.from_config(GPT2Config.preset("tiny"), seed=0)
    >>> with BatchEngine(m, slots=4) as engine:
    ...     a = engine.submit([464, 3290], max_tokens=5, temperature=0)
    ...     b = engine.submit([40, 1101, 257], max_tokens=3, temperature=0)
    ...     len(a.result()), len(b.result())
    (5, 3)
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import math
import threading
import time

import numpy as np

from . import generation as _gen
from .inputs import check_int

__all__ = ["BatchEngine", "Request", "TokenEvent", "EngineError", "QueueFull", "EngineClosed",
           "MAX_SLOTS", "load_in_thread"]

MAX_SLOTS = 32   # the most rows the matmul kernels compute row-independently (direct kernels)

# time-to-first-token histogram buckets (seconds), Prometheus-style upper bounds
TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, math.inf)


def load_in_thread(fn, *args, **kwargs):
    """fn(*args, **kwargs), run in a thread that ends when fn returns; its result, or its
    exception raised here.  For loading the model a `BatchEngine` will serve: the OpenMP team
    the load creates goes away with that thread instead of slowing the engine's (see the
    module docstring, "Threads and OpenMP").

    Examples:
        >>> from gpt2s import GPT2, GPT2Config
        >>> m = load_in_thread(GPT2.from_config, GPT2Config.preset("tiny"), seed=0)
        >>> m.config.n_layer
        2
    """
    box = {}

    def target():
        try:
            box["result"] = fn(*args, **kwargs)
        except BaseException as e:   # re-raised in the caller's thread
            box["error"] = e

    t = threading.Thread(target=target, name="gpt2s-load")
    t.start()
    t.join()
    if "error" in box:
        raise box["error"]
    return box["result"]


class EngineError(RuntimeError):
    """The engine cannot take a request."""


class QueueFull(EngineError):
    """Every slot is busy and the queue holds ``max_queue`` requests already (HTTP 429)."""


class EngineClosed(EngineError):
    """The engine was closed, or its scheduler thread failed (HTTP 503)."""


class TokenEvent:
    """One generated token of a request.

    Attributes:
        token: the token id.
        text: the text it completes, as far as it is final ("" while a character is
            incomplete or the text may still turn out to be the start of a stop string, and
            always "" without a tokenizer); the pieces of a request add up to its `text`.
        logprob: its log-probability under the model (log-softmax of the logits, before
            temperature and penalties), when the request asked for ``logprobs``; else None.
        top_logprobs: the ``logprobs`` most likely tokens as (token id, log-probability)
            pairs, most likely first (None unless asked for).
    """

    __slots__ = ("token", "text", "logprob", "top_logprobs")

    def __init__(self, token, text="", logprob=None, top_logprobs=None):
        self.token, self.text, self.logprob, self.top_logprobs = token, text, logprob, \
            top_logprobs

    def __repr__(self):
        return f"TokenEvent(token={self.token}, text={self.text!r})"


_END = object()


class Request:
    """A generation submitted to a `BatchEngine`: iterate it (``for event in request``, or
    ``async for`` in asyncio code) for its `TokenEvent` s as they come, or wait for them all
    with `result`.  Made by `BatchEngine.submit`.

    Attributes:
        id: a number unique in its engine.
        prompt: the prompt's token ids (int64 array).
        tokens: the token ids generated so far.
        text: the text generated so far (its final text once finished; "" without a
            tokenizer).
        finish_reason: None while running, then "stop" (an end token or a stop string),
            "length" (max_tokens, or the context is full), "cancelled" or "error".
        error: the exception that ended it with "error".
        submitted, first_token, finished: ``time.perf_counter()`` times (None until then).
    """

    def __init__(self, rid, prompt, max_tokens, sampling, controls, stop, stop_at_eos,
                 logprobs):
        self.id = rid
        self.prompt = prompt
        self.max_tokens = max_tokens
        self.sampling = sampling
        self.controls = controls
        self.stop = stop
        self.stop_at_eos = stop_at_eos
        self.logprobs = logprobs
        self.tokens = []
        self.text = ""
        self.finish_reason = None
        self.error = None
        self.submitted = time.perf_counter()
        self.first_token = None
        self.finished = None
        self._cancelled = False
        self._events = collections.deque()
        self._cond = threading.Condition()
        self._done = threading.Event()
        self._waker = None
        self._engine = None

    # ------------------------------------------------------------------ consumer side

    def cancel(self):
        """Stop this request: it leaves the queue, or frees its slot at the next token
        boundary (finish_reason "cancelled").  Safe from any thread, and after it ended."""
        self._cancelled = True
        engine = self._engine
        if engine is not None:
            engine._wake()

    @property
    def done(self) -> bool:
        """Whether the request has finished (its last event is queued)."""
        return self._done.is_set()

    def __iter__(self):
        while True:
            with self._cond:
                while not self._events:
                    self._cond.wait()
                ev = self._events.popleft()
            if ev is _END:
                return
            yield ev

    async def _aiter(self):
        loop = asyncio.get_running_loop()
        flag = asyncio.Event()
        self._waker = (loop, flag)
        while True:
            with self._cond:
                ev = self._events.popleft() if self._events else None
            if ev is None:
                await flag.wait()
                flag.clear()
                continue
            if ev is _END:
                return
            yield ev

    def __aiter__(self):
        return self._aiter()

    def result(self, timeout: float | None = None) -> list:
        """Wait until the request finishes; returns its generated token ids.  Raises
        TimeoutError after timeout seconds, or the error that ended it."""
        if not self._done.wait(timeout):
            raise TimeoutError(f"request {self.id} did not finish within {timeout} s")
        if self.finish_reason == "error":
            raise self.error
        return list(self.tokens)

    def __repr__(self):
        return (f"Request(id={self.id}, prompt={len(self.prompt)} tokens, "
                f"generated={len(self.tokens)}, finish_reason={self.finish_reason!r})")

    # ------------------------------------------------------------------ engine side

    def _push(self, ev):
        with self._cond:
            self._events.append(ev)
            self._cond.notify_all()
        waker = self._waker
        if waker is not None:
            loop, flag = waker
            try:
                loop.call_soon_threadsafe(flag.set)
            except RuntimeError:   # the consumer's event loop is closed
                pass

    def _finish(self, reason, error=None):
        if self.finish_reason is not None:
            return
        self.finish_reason = reason
        self.error = error
        self.finished = time.perf_counter()
        if self._engine is not None:
            self._engine.metrics["finished"][reason] += 1
        self._done.set()
        self._push(_END)


class _Row:
    """A request in a slot: its sequence, sampler, controls and text."""

    def __init__(self, req, model_vocab, token_limit, enc, eos):
        P = len(req.prompt)
        self.req = req
        self.n_prompt = P
        self.seq = np.empty((1, P + req.max_tokens), np.int64)
        self.seq[0, :P] = req.prompt
        self.cached = 0            # positions in the KV cache
        self.n_out = 0
        ctl = _gen._Controls(1, model_vocab, req.controls, eos, self.seq,
                             np.array([P], np.int64))
        s = req.sampling
        self.sampler = _gen._Sampler(1, model_vocab, s["temperature"], s["top_k"], s["top_p"],
                                     s["seed"], token_limit, ctl)
        self.text = None
        if enc is not None:
            self.text = _gen._TextRows(enc, 1, req.stop, req.controls["min_new_tokens"],
                                       req.stop_at_eos, eos)
            self.shown = 0


class BatchEngine:
    """Continuous batching over one model (a `gpt2s.GPT2` or `gpt2s.LlamaForCausalLM`): see
    the module docstring.  The scheduler thread starts at once; `close` (or leaving a
    ``with`` block) stops it.  Thread-safe: submit from any thread, iterate each request in
    the thread (or asyncio task) that consumes it.

    Args:
        model: the model; its weights are only read.
        slots: rows of the decode batch (requests generating at once), 1 .. 32.
        max_queue: requests that may wait for a slot; `submit` raises `QueueFull` beyond.
        prefill_chunk: the most prompt tokens prefilled between two decode steps.
        max_context: positions per slot (default and at most the model's context); a prompt
            must be shorter, and a generation stops (finish_reason "length") when its
            sequence fills it.
        tokenizer: for text (`TokenEvent.text`) and stop strings; None: tokens only.
        eos_token_id: the end token(s) (an id or a list of ids) that finish a request with
            ``stop_at_eos``; default: GPT-2's <|endoftext|> for a GPT2, the config's for a
            Llama model, else the tokenizer's.

    Raises:
        TypeError, ValueError: a bad argument, named.
    """

    def __init__(self, model, *, slots: int = 8, max_queue: int = 64, prefill_chunk: int = 256,
                 max_context: int | None = None, tokenizer=None, eos_token_id=None):
        self.model = model
        cfg = model.config
        self.n_ctx = int(getattr(cfg, "n_ctx", None) or cfg.max_position_embeddings)
        self.vocab_size = int(cfg.vocab_size)
        self.slots = check_int("slots", slots, 1)
        if self.slots > MAX_SLOTS:
            raise ValueError(f"slots must be at most {MAX_SLOTS} (the rows the kernels compute "
                             f"independently of each other), got {slots}")
        self.max_queue = check_int("max_queue", max_queue, 0)
        self.prefill_chunk = check_int("prefill_chunk", prefill_chunk, 1)
        self.max_context = self.n_ctx if max_context is None else \
            min(check_int("max_context", max_context, 2), self.n_ctx)
        self.tokenizer = tokenizer
        if eos_token_id is None:
            from .model import GPT2
            eos_token_id = _gen.EOT_ID if isinstance(model, GPT2) else \
                getattr(cfg, "eos_token_id", None)
            if eos_token_id is None and tokenizer is not None:
                eos_token_id = getattr(tokenizer, "eot_id", None)
        self.eos_token_id = None if eos_token_id is None else _gen._check_eos(eos_token_id)
        self.token_limit = None
        if tokenizer is not None and tokenizer.n_vocab < self.vocab_size:
            self.token_limit = tokenizer.n_vocab   # ids the tokenizer cannot decode
        # decode rows 0 .. n-1 (at least 2 rows per step), the last row stages a prefill
        self._rows_total = max(self.slots, 2) + 1
        self._staging = self._rows_total - 1
        self.kv = model.kv_cache(self._rows_total, self.max_context)
        self._lock = threading.Condition()
        self._queue = collections.deque()
        self._decoding: list[_Row] = []
        self._prefilling: _Row | None = None
        self._ids = itertools.count(1)
        self._closed = False
        self._failure = None
        self.metrics = {
            "requests_submitted": 0, "requests_rejected": 0, "prompt_tokens": 0,
            "generated_tokens": 0, "decode_steps": 0, "decode_rows": 0,
            "prefill_chunks": 0, "finished": collections.Counter(),
            "ttft_buckets": [0] * len(TTFT_BUCKETS), "ttft_sum": 0.0, "ttft_count": 0,
        }
        self._thread = threading.Thread(target=self._run, name="gpt2s-engine", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ public API

    def submit(self, prompt, max_tokens: int = 16, *, temperature: float = 1.0, top_k=None,
               top_p=None, seed=None, stop=None, stop_at_eos: bool = True, logprobs=None,
               presence_penalty: float = 0.0, frequency_penalty: float = 0.0,
               repetition_penalty: float = 1.0, min_tokens: int = 0,
               logits_processor=None) -> Request:
        """Queue a generation; returns its `Request` at once.

        Args:
            prompt: token ids (a sequence of ints), 1 .. max_context - 1 of them.
            max_tokens: the most tokens to generate (>= 1); fewer when the sequence fills
                the context.
            temperature: as in `gpt2s.GPT2.generate` (0: greedy), as are top_k, top_p
                and seed (one int or None).
            top_k: keep the k most likely tokens (None: all).
            top_p: keep the nucleus of that probability (None: all).
            seed: an int fixes the sampled tokens (None: fresh entropy).
            stop: a str or list of str ending the text (needs the engine's tokenizer).
            stop_at_eos: finish at the end token (which is then the last of `tokens`).
            logprobs: None, or k >= 0: each event carries its token's log-probability and
                the k most likely tokens'.
            presence_penalty: as the controls of `gpt2s.GPT2.generate`, as are the next
                three.
            frequency_penalty: OpenAI's frequency penalty.
            repetition_penalty: transformers' repetition penalty (1: none).
            min_tokens: no end token before that many tokens (generate's min_new_tokens).
            logits_processor: ``fn(token_ids, logits)`` as generate's (one row, called from
                the engine's thread).

        Raises:
            TypeError, ValueError: a bad argument (named); a prompt too long for the context.
            QueueFull: the queue is full.  EngineClosed: the engine is closed or failed.
        """
        ids = np.asarray(prompt)
        if ids.ndim != 1 or ids.size == 0 or not (np.issubdtype(ids.dtype, np.integer)
                                                  and ids.dtype != np.bool_):
            raise TypeError(f"prompt must be a non-empty sequence of token ids, got "
                            f"{prompt!r:.80}")
        if int(ids.min()) < 0 or int(ids.max()) >= self.vocab_size:
            bad = int(ids[(ids < 0) | (ids >= self.vocab_size)][0])
            raise ValueError(f"prompt: token id {bad} is outside the model's vocabulary "
                             f"[0, {self.vocab_size})")
        if ids.size >= self.max_context:
            raise ValueError(f"the prompt is {ids.size} tokens long; the context holds "
                             f"{self.max_context} positions, which leaves no room for a "
                             f"completion")
        max_tokens = check_int("max_tokens", max_tokens, 1)
        sampling = _gen.check_sampling_args(temperature, top_k, top_p, seed)
        if isinstance(sampling["seed"], tuple):
            raise TypeError("seed must be one integer (or None) for a request")
        controls = _gen.check_controls(repetition_penalty, presence_penalty,
                                       frequency_penalty, min_tokens, stop,
                                       logits_processor)
        if controls["stop"] and self.tokenizer is None:
            raise ValueError("stop strings need the engine's tokenizer (BatchEngine(..., "
                             "tokenizer=...))")
        if logprobs is not None:
            logprobs = check_int("logprobs", logprobs, 0)
            logprobs = min(logprobs, self.vocab_size)
        if stop_at_eos and self.eos_token_id is None:
            stop_at_eos = False   # a model without an end token runs to max_tokens
        # the sequence never outgrows the context
        max_tokens = min(max_tokens, self.max_context - int(ids.size))
        req = Request(next(self._ids), ids.astype(np.int64), max_tokens, sampling, controls,
                      controls["stop"], bool(stop_at_eos), logprobs)
        with self._lock:
            if self._closed or self._failure is not None:
                raise EngineClosed("the engine is closed" if self._failure is None else
                                   f"the engine failed: {self._failure!r}")
            free = self.slots - len(self._decoding) - (self._prefilling is not None)
            if len(self._queue) >= self.max_queue + max(free, 0):
                self.metrics["requests_rejected"] += 1
                raise QueueFull(f"the queue is full: {len(self._queue)} requests wait for "
                                f"{self.slots} slots (max_queue={self.max_queue})")
            req._engine = self
            self._queue.append(req)
            self.metrics["requests_submitted"] += 1
            self._lock.notify_all()
        return req

    def generate(self, prompt, max_tokens: int = 16, **kwargs) -> list:
        """`submit` and wait: the generated token ids."""
        return self.submit(prompt, max_tokens, **kwargs).result()

    def stats(self) -> dict:
        """A snapshot: queue length, busy slots, the counters in ``metrics``."""
        with self._lock:
            m = dict(self.metrics)
            m["finished"] = dict(m["finished"])
            m["ttft_buckets"] = list(m["ttft_buckets"])
            m.update(queue_length=len(self._queue), slots=self.slots,
                     active=len(self._decoding) + (self._prefilling is not None),
                     decoding=len(self._decoding), alive=self.alive)
        return m

    @property
    def alive(self) -> bool:
        """Whether the scheduler is running (not closed, not failed)."""
        return not self._closed and self._failure is None and self._thread.is_alive()

    def close(self, timeout: float | None = 10.0):
        """Stop the scheduler: queued and running requests end with "cancelled"."""
        with self._lock:
            self._closed = True
            self._lock.notify_all()
        if threading.current_thread() is not self._thread:
            self._thread.join(timeout)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # ------------------------------------------------------------------ scheduler

    def _has_free_slot(self):
        return len(self._decoding) + (self._prefilling is not None) < self.slots

    def _wake(self):
        with self._lock:
            self._lock.notify_all()

    def _run(self):
        try:
            while True:
                with self._lock:
                    while True:
                        # forget cancelled requests in the queue, admit the next one
                        while self._queue and self._queue[0]._cancelled:
                            self._queue.popleft()._finish("cancelled")
                        if self._closed:
                            break
                        if self._decoding or self._prefilling is not None or \
                                (self._queue and self._has_free_slot()):
                            break
                        self._lock.wait()
                    if self._closed:
                        break
                    for r in self._decoding:
                        if r.req._cancelled:
                            r.req._finish("cancelled")
                    if self._prefilling is not None and self._prefilling.req._cancelled:
                        self._prefilling.req._finish("cancelled")
                        self._prefilling = None
                    self._compact()
                if self._decoding:
                    self._decode_step()
                self._prefill_some()
        except BaseException as e:   # the scheduler itself broke: fail everything
            self._failure = e
        with self._lock:
            reason = "error" if self._failure is not None else "cancelled"
            for req in list(self._queue) + [r.req for r in self._decoding] + \
                    ([self._prefilling.req] if self._prefilling is not None else []):
                req._finish(reason, self._failure)
            self._queue.clear()
            self._decoding = []
            self._prefilling = None

    def _prefill_some(self):
        """Prefill chunks, of this request and the next ones admitted, while they fit in
        prefill_chunk tokens (at least one chunk): short prompts arriving together all start
        before the next decode step.  A prompt's chunks start at multiples of prefill_chunk
        whatever else runs, so its numbers depend on it alone."""
        used = 0
        while True:
            with self._lock:
                if self._prefilling is None:
                    while self._queue and self._queue[0]._cancelled:
                        self._queue.popleft()._finish("cancelled")
                    if self._closed or not self._queue or not self._has_free_slot():
                        return
                    self._admit(self._queue.popleft())
                row = self._prefilling
            n = min(row.n_prompt - row.cached, self.prefill_chunk)
            if used and used + n > self.prefill_chunk:
                return
            self._prefill_chunk()
            used += n

    def _admit(self, req):
        self._prefilling = _Row(req, self.vocab_size, self.token_limit, self.tokenizer,
                                self.eos_token_id if self.eos_token_id is not None
                                else _gen.EOT_ID)
        self.metrics["prompt_tokens"] += int(req.prompt.size)

    def _compact(self):
        """Drop finished rows from the decode batch, moving the last rows into the holes
        (their cached positions copied) so the batch stays rows 0 .. n-1."""
        rows = self._decoding
        i = 0
        while i < len(rows):
            if rows[i].req.finish_reason is None:
                i += 1
                continue
            last = rows.pop()
            if i < len(rows):
                self._move(len(rows), i, last.cached)
                rows[i] = last

    def _move(self, src, dst, n):
        for a in (self.kv.keys, self.kv.values):
            a[:, dst, :n] = a[:, src, :n]

    def _prefill_chunk(self):
        row = self._prefilling
        P = row.n_prompt
        lo = row.cached
        hi = min(P, lo + self.prefill_chunk)
        st = self._staging
        try:
            logits = self.model.forward_cached(row.seq[:, lo:hi], lo,
                                               self.kv.view_rows(st, st + 1))
        except Exception as e:
            row.req._finish("error", e)
            self._prefilling = None
            return
        self.metrics["prefill_chunks"] += 1
        row.cached = hi
        if hi < P:
            return
        # prefilled: its first token, then it joins the decode batch
        self._emit(row, logits)
        with self._lock:
            self._prefilling = None
            if row.req.finish_reason is None:
                self._move(st, len(self._decoding), P)
                self._decoding.append(row)

    def _decode_step(self):
        rows = self._decoding
        n = len(rows)
        B = max(n, 2)   # a lone row beside a throw-away one: every step has 2..32 rows
        last = np.zeros((B, 1), np.int64)
        pos = np.zeros(B, np.int64)
        for i, r in enumerate(rows):
            last[i, 0] = r.seq[0, r.cached]
            pos[i] = r.cached
        try:
            logits = self.model.forward_cached(last, pos, self.kv.view_rows(0, B))
        except Exception as e:
            for r in rows:
                r.req._finish("error", e)
            with self._lock:
                self._decoding = []
            return
        self.metrics["decode_steps"] += 1
        self.metrics["decode_rows"] += n
        for i, r in enumerate(rows):
            r.cached += 1
            if r.req._cancelled:
                r.req._finish("cancelled")
                continue
            self._emit(r, logits[i:i + 1])
        with self._lock:
            self._compact()

    def _emit(self, row, logits):
        """Sample row's next token from logits (1, V), queue its event, finish the request
        when it ends there."""
        req = row.req
        ev_logprob = ev_top = None
        if req.logprobs is not None:
            x = logits[0].astype(np.float64)
            lse = float(np.log(np.sum(np.exp(x - x.max()))) + x.max())
        try:
            tok = int(row.sampler(logits, row.seq, row.n_prompt + row.n_out)[0])
        except Exception as e:
            req._finish("error", e)
            return
        if row.sampler.controls is not None:
            row.sampler.controls.update(np.array([tok]))
        row.seq[0, row.n_prompt + row.n_out] = tok
        row.n_out += 1
        if req.logprobs is not None:
            ev_logprob = float(x[tok] - lse)
            if req.logprobs > 0:
                k = req.logprobs
                top = np.argpartition(-x, k - 1)[:k] if k < x.size else np.arange(x.size)
                top = top[np.lexsort((top, -x[top]))]
                ev_top = [(int(t), float(x[t] - lse)) for t in top]
            else:
                ev_top = []
        now = time.perf_counter()
        if req.first_token is None:
            req.first_token = now
            ttft = now - req.submitted
            m = self.metrics
            m["ttft_sum"] += ttft
            m["ttft_count"] += 1
            m["ttft_buckets"][next(i for i, b in enumerate(TTFT_BUCKETS) if ttft <= b)] += 1
        self.metrics["generated_tokens"] += 1
        req.tokens.append(tok)
        finish = None
        text = ""
        if row.text is not None:
            t = row.text
            if t(np.array([tok]))[0]:
                finish = "stop"
            n = t.ready(0)
            text = t.text[0][row.shown:n]
            row.shown = max(row.shown, n)
        if req.stop_at_eos and bool(_gen._is_eos(tok, self.eos_token_id)):
            finish = "stop"
        if finish is None and row.n_out >= req.max_tokens:
            finish = "length"
        if finish is not None and row.text is not None:
            t = row.text
            t.finish()
            rest = t.result(0)[row.shown:]
            text += rest
            row.shown += len(rest)
        req.text += text
        req._push(TokenEvent(tok, text, ev_logprob, ev_top))
        if finish is not None:
            req._finish(finish)
