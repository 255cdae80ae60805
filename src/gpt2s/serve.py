"""``python -m gpt2s.serve``: an OpenAI-compatible HTTP server over a continuous-batching
`gpt2s.engine.BatchEngine`.

Routes: ``POST /v1/completions``, ``POST /v1/chat/completions`` (checkpoints with a chat
template), ``GET /v1/models``, ``GET /v1/models/{id}``, ``GET /health``, ``GET /metrics``
(Prometheus text format).  Errors are OpenAI-shaped JSON (``{"error": {"message", "type",
"param", "code"}}``) with their HTTP status: 400 bad parameters, malformed JSON or a prompt
longer than the context, 401 a wrong API key, 404 an unknown model or route, 413 a body over
``--max-body-bytes``, 429 a full queue (with ``Retry-After``), 503 an engine that stopped.

The HTTP stack (Starlette on uvicorn, the ``serve`` extra) is imported only here: the rest of
gpt2s does not need it.  `create_app` builds the ASGI application for an engine, for tests
and for embedding in another server.
"""

from __future__ import annotations

import asyncio
import json
import math
import numbers
import os
import sys
import time
import uuid
from pathlib import Path

from .engine import TTFT_BUCKETS, BatchEngine, EngineClosed, QueueFull, load_in_thread

__all__ = ["create_app", "render_chat", "load_chat_template", "main", "APIError"]

PROG = "python -m gpt2s.serve"
MAX_N = 16            # most choices per request (n)
MAX_LOGPROBS = 20     # most top logprobs per token


class APIError(Exception):
    """An error answered as OpenAI does: status, message, type, param, code."""

    def __init__(self, status, message, type_="invalid_request_error", param=None, code=None,
                 headers=None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, \
            param, code
        self.headers = headers

    def body(self):
        return {"error": {"message": self.message, "type": self.type, "param": self.param,
                          "code": self.code}}


# ---------------------------------------------------------------------------------- chat
# One renderer for the whole package: gpt2s.chat's ChatTemplate (what generate --chat and
# apply_chat_template use).  The two functions below are this module's earlier public names,
# kept as thin wrappers over it.

def load_chat_template(model_dir):
    """(chat_template, bos_token, eos_token) of the checkpoint in model_dir, as
    `gpt2s.chat.ChatTemplate.from_pretrained` reads it (chat_template.jinja, else
    tokenizer_config.json's ``chat_template``; the special tokens from tokenizer_config.json or
    special_tokens_map.json), or (None, "", "") without one."""
    from .chat import ChatTemplate
    template = ChatTemplate.from_pretrained(model_dir) if model_dir is not None else None
    if template is None:
        return None, "", ""
    tokens = template.special_tokens
    return template.template, tokens.get("bos_token", ""), tokens.get("eos_token", "")


def render_chat(template: str, messages, *, bos_token="", eos_token="",
                add_generation_prompt=True) -> str:
    """The prompt text of messages under a Hugging Face chat template: `gpt2s.chat.ChatTemplate`
    rendering it (jinja2, sandboxed, as transformers' apply_chat_template renders it).

    Raises:
        gpt2s.chat.ChatTemplateError: the template refused or failed on the messages."""
    from .chat import ChatTemplate
    return ChatTemplate(template, {"bos_token": bos_token, "eos_token": eos_token}).render(
        messages, add_generation_prompt)


def _chat_template(template, bos_token="", eos_token=""):
    """create_app's chat template: a `ChatTemplate` as it is, a template string with these
    special tokens, or None."""
    from .chat import ChatTemplate
    if template is None or isinstance(template, ChatTemplate):
        return template
    if not template:
        return None
    return ChatTemplate(template, {"bos_token": bos_token, "eos_token": eos_token})


# ---------------------------------------------------------------------------------- params

def _bad(param, message):
    return APIError(400, f"{param}: {message}", param=param)


class _Params:
    """Typed access to a JSON request body; every error names the parameter."""

    def __init__(self, body):
        if not isinstance(body, dict):
            raise APIError(400, "the request body must be a JSON object")
        self.body = body

    def get(self, name, kind, default=None, lo=None, hi=None, lo_open=False):
        v = self.body.get(name)
        if v is None:
            return default
        if kind is bool:
            if not isinstance(v, bool):
                raise _bad(name, f"expected a boolean, got {json.dumps(v)[:40]}")
            return v
        if kind is int:
            if isinstance(v, bool) or not isinstance(v, int):
                if isinstance(v, float) and v.is_integer():
                    v = int(v)
                else:
                    raise _bad(name, f"expected an integer, got {json.dumps(v)[:40]}")
        elif kind is float:
            if isinstance(v, bool) or not isinstance(v, numbers.Real) or not math.isfinite(v):
                raise _bad(name, f"expected a number, got {json.dumps(v)[:40]}")
            v = float(v)
        if lo is not None and (v <= lo if lo_open else v < lo):
            raise _bad(name, f"must be {'>' if lo_open else '>='} {lo}, got {v}")
        if hi is not None and v > hi:
            raise _bad(name, f"must be <= {hi}, got {v}")
        return v


def _stop_list(p):
    stop = p.body.get("stop")
    if stop is None:
        return None
    if isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
        raise _bad("stop", "expected a string or a list of strings")
    if any(s == "" for s in stop):
        raise _bad("stop", "an empty stop string")
    return stop or None


# ---------------------------------------------------------------------------------- app

class _State:
    def __init__(self, engine, model_name, tokenizer, chat, max_body_bytes, api_key,
                 aliases):
        self.engine = engine
        self.model_name = model_name
        self.names = {model_name, *aliases}
        self.tokenizer = tokenizer
        self.chat = chat              # a gpt2s.chat.ChatTemplate, or None
        self.max_body_bytes = max_body_bytes
        self.api_key = api_key
        self.created = int(time.time())
        self.http = {}                # (route, status) -> count


def create_app(engine: BatchEngine, *, model_name: str = "gpt2s", tokenizer=None,
               chat_template=None, bos_token: str = "", eos_token: str = "",
               max_body_bytes: int = 1 << 20, api_key: str | None = None, aliases=()):
    """The Starlette application serving engine under the OpenAI API.

    Args:
        engine: the `BatchEngine` (its tokenizer is the default ``tokenizer``).
        model_name: the id clients pass as ``model`` (``aliases``: other accepted ids).
        chat_template: the chat template of /v1/chat/completions: a
            `gpt2s.chat.ChatTemplate` (``ChatTemplate.from_pretrained(checkpoint)``), or a
            Hugging Face template string (jinja2) rendered with ``bos_token`` and
            ``eos_token``; None: that route answers 400.
        max_body_bytes: larger request bodies are refused with 413.
        api_key: when set, requests need ``Authorization: Bearer <api_key>``.
    """
    from starlette.applications import Starlette
    from starlette.exceptions import HTTPException
    from starlette.requests import Request as HTTPRequest
    from starlette.responses import JSONResponse, PlainTextResponse
    from starlette.routing import Route

    st = _State(engine, model_name, tokenizer if tokenizer is not None else engine.tokenizer,
                _chat_template(chat_template, bos_token, eos_token),
                max_body_bytes, api_key, aliases)

    def error_response(e: APIError):
        return JSONResponse(e.body(), status_code=e.status, headers=e.headers)

    def endpoint(fn):
        async def wrapped(request: HTTPRequest):
            route = request.url.path
            try:
                if st.api_key is not None and route not in ("/health", "/metrics"):
                    auth = request.headers.get("authorization", "")
                    if auth != f"Bearer {st.api_key}":
                        raise APIError(401, "invalid or missing API key (Authorization: "
                                            "Bearer ...)", "authentication_error",
                                       code="invalid_api_key")
                response = await fn(request)
            except APIError as e:
                response = error_response(e)
            key = (route if not route.startswith("/v1/models/") else "/v1/models/{id}",
                   response.status_code)
            st.http[key] = st.http.get(key, 0) + 1
            return response
        return wrapped

    async def read_json(request):
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > st.max_body_bytes:
            raise APIError(413, f"the request body is {int(length)} bytes, more than the "
                                f"server's limit of {st.max_body_bytes}",
                           code="request_too_large")
        data = bytearray()
        async for chunk in request.stream():
            data += chunk
            if len(data) > st.max_body_bytes:
                raise APIError(413, f"the request body is more than the server's limit of "
                                    f"{st.max_body_bytes} bytes", code="request_too_large")
        try:
            return json.loads(bytes(data))
        except (ValueError, UnicodeDecodeError) as e:
            raise APIError(400, f"the request body is not valid JSON: {e}") from None

    def check_model(p):
        name = p.body.get("model")
        if not isinstance(name, str):
            raise _bad("model", "required: the id of a model of GET /v1/models")
        if name not in st.names:
            raise APIError(404, f"the model {name!r} does not exist; this server serves "
                                f"{st.model_name!r}", param="model", code="model_not_found")
        return name

    def need_engine():
        if not st.engine.alive:
            raise APIError(503, "the engine is not running", "server_error",
                           code="service_unavailable")

    # ---------------------------------------------------------------- simple routes

    async def health(request):
        s = st.engine.stats()
        body = {"status": "ok" if s["alive"] else "unavailable", "model": st.model_name,
                "slots": s["slots"], "active": s["active"], "queue_length": s["queue_length"]}
        return JSONResponse(body, status_code=200 if s["alive"] else 503)

    def model_card():
        return {"id": st.model_name, "object": "model", "created": st.created,
                "owned_by": "gpt2s", "max_model_len": st.engine.max_context}

    async def models(request):
        return JSONResponse({"object": "list", "data": [model_card()]})

    async def model_one(request):
        name = request.path_params["model"]
        if name not in st.names:
            raise APIError(404, f"the model {name!r} does not exist", param="model",
                           code="model_not_found")
        return JSONResponse(model_card())

    async def metrics(request):
        return PlainTextResponse(_prometheus(st), media_type="text/plain; version=0.0.4")

    # ---------------------------------------------------------------- generation

    def sampling(p, chat):
        kw = {}
        kw["temperature"] = p.get("temperature", float, 1.0, 0.0, 2.0)
        kw["top_p"] = p.get("top_p", float, None, 0.0, 1.0, lo_open=True)
        top_k = p.get("top_k", int, None, -1)
        kw["top_k"] = None if top_k is None or top_k <= 0 else top_k
        kw["seed"] = p.get("seed", int, None, 0)
        kw["presence_penalty"] = p.get("presence_penalty", float, 0.0, -2.0, 2.0)
        kw["frequency_penalty"] = p.get("frequency_penalty", float, 0.0, -2.0, 2.0)
        kw["repetition_penalty"] = p.get("repetition_penalty", float, 1.0, 0.0, lo_open=True)
        kw["min_tokens"] = p.get("min_tokens", int, 0, 0)
        kw["stop_at_eos"] = not p.get("ignore_eos", bool, False)
        kw["stop"] = _stop_list(p)
        if kw["stop"] and st.tokenizer is None:
            raise _bad("stop", "this server has no tokenizer for the model")
        if chat:
            lp = p.get("logprobs", bool, False)
            top = p.get("top_logprobs", int, None, 0, MAX_LOGPROBS)
            if top is not None and not lp:
                raise _bad("top_logprobs", "needs logprobs: true")
            kw["logprobs"] = (top or 0) if lp else None
            max_tokens = p.get("max_completion_tokens", int, None, 1)
            if max_tokens is None:
                max_tokens = p.get("max_tokens", int, None, 1)
            if max_tokens is None:
                max_tokens = st.engine.max_context
        else:
            kw["logprobs"] = p.get("logprobs", int, None, 0, MAX_LOGPROBS)
            max_tokens = p.get("max_tokens", int, 16, 1)
            if p.get("echo", bool, False):
                raise _bad("echo", "echo=true is not supported")
            if p.body.get("suffix") is not None:
                raise _bad("suffix", "suffix is not supported")
        bias = p.body.get("logit_bias")
        if bias is not None:
            kw["logit_bias"] = _logit_bias(bias, st.engine.vocab_size)
        n = p.get("n", int, 1, 1, MAX_N)
        best_of = p.get("best_of", int, None, 1)
        if best_of is not None and best_of != n:
            raise _bad("best_of", "only best_of equal to n is supported")
        stream = p.get("stream", bool, False)
        opts = p.body.get("stream_options")
        if opts is not None and not isinstance(opts, dict):
            raise _bad("stream_options", "expected an object")
        usage = bool(stream and opts and opts.get("include_usage"))
        return kw, max_tokens, n, stream, usage

    def encode_prompts(p):
        prompt = p.body.get("prompt")
        enc = st.tokenizer
        if isinstance(prompt, str):
            prompts = [prompt]
        elif isinstance(prompt, list) and prompt and all(isinstance(x, int) and
                                                         not isinstance(x, bool)
                                                         for x in prompt):
            return [list(prompt)]
        elif isinstance(prompt, list) and prompt and all(isinstance(x, str) for x in prompt):
            prompts = prompt
        elif isinstance(prompt, list) and prompt and all(
                isinstance(x, list) and x and all(isinstance(t, int) and not isinstance(t, bool)
                                                  for t in x) for x in prompt):
            return [list(x) for x in prompt]
        else:
            raise _bad("prompt", "required: a string, a list of strings, a list of token ids "
                                 "or a list of lists of token ids (none empty)")
        if enc is None:
            raise _bad("prompt", "this server has no tokenizer: give token ids")
        out = []
        for text in prompts:
            if text == "":
                raise _bad("prompt", "an empty prompt")
            out.append(_encode(enc, text, chat=False))
        return out

    async def run(request, prompts, kw, max_tokens, n, stream, usage, chat):
        need_engine()
        logit_bias = kw.pop("logit_bias", None)
        if logit_bias is not None:
            kw["logits_processor"] = logit_bias
        reqs = []
        try:
            for prompt in prompts:
                for j in range(n):
                    kj = dict(kw)
                    if kj["seed"] is not None:
                        kj["seed"] = kj["seed"] + j
                    reqs.append(_submit(st.engine, prompt, max_tokens, kj))
        except QueueFull as e:
            for r in reqs:
                r.cancel()
            raise APIError(429, str(e), "rate_limit_exceeded", code="queue_full",
                           headers={"Retry-After": "1"}) from None
        except EngineClosed as e:
            for r in reqs:
                r.cancel()
            raise APIError(503, str(e), "server_error", code="service_unavailable") from None
        except (TypeError, ValueError) as e:
            for r in reqs:
                r.cancel()
            code = "context_length_exceeded" if "context" in str(e) else None
            param = "prompt" if code or str(e).startswith("prompt") else None
            raise APIError(400, str(e), param=param, code=code) from None
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        n_prompt = sum(len(x) for x in prompts)
        if stream:
            return _SSE(st, reqs, rid, chat, usage, n_prompt, kw["logprobs"])
        try:
            await _until_done_or_disconnect(request, reqs)
        finally:
            for r in reqs:
                r.cancel()
        for r in reqs:
            if r.finish_reason == "error":
                raise APIError(500, f"generation failed: {r.error}", "server_error")
            if r.finish_reason == "cancelled":
                raise APIError(503, "the request was cancelled (the engine stopped)",
                               "server_error", code="service_unavailable")
        choices = [_choice(st, i, r, chat, kw["logprobs"]) for i, r in enumerate(reqs)]
        n_out = sum(len(r.tokens) for r in reqs)
        return JSONResponse({
            "id": rid, "object": "chat.completion" if chat else "text_completion",
            "created": int(time.time()), "model": st.model_name, "choices": choices,
            "usage": {"prompt_tokens": n_prompt, "completion_tokens": n_out,
                      "total_tokens": n_prompt + n_out}})

    async def completions(request):
        p = _Params(await read_json(request))
        check_model(p)
        kw, max_tokens, n, stream, usage = sampling(p, chat=False)
        prompts = encode_prompts(p)
        return await run(request, prompts, kw, max_tokens, n, stream, usage, chat=False)

    async def chat_completions(request):
        p = _Params(await read_json(request))
        check_model(p)
        if st.chat is None:
            raise APIError(400, f"the model {st.model_name!r} has no chat template (no "
                                f"chat_template.jinja beside it, none in its "
                                f"tokenizer_config.json; --chat-template FILE gives one): "
                                f"use /v1/completions", code="no_chat_template")
        if st.tokenizer is None:
            raise APIError(400, "this server has no tokenizer for the model")
        messages = _check_messages(p.body.get("messages"))
        kw, max_tokens, n, stream, usage = sampling(p, chat=True)
        try:
            text = st.chat.render(messages)
        except Exception as e:   # ChatTemplateError (refused, or failed on them), or another
            raise APIError(400, f"the chat template refused the messages: {e}",
                           param="messages") from None
        prompt = _encode(st.tokenizer, text, chat=True)
        if not prompt:
            raise _bad("messages", "the rendered prompt is empty")
        return await run(request, [prompt], kw, max_tokens, n, stream, usage, chat=True)

    async def not_found(request, exc):
        status = getattr(exc, "status_code", 404)
        msg = {404: f"no route {request.method} {request.url.path}",
               405: f"method {request.method} is not allowed on {request.url.path}"}.get(
                   status, str(getattr(exc, "detail", "")))
        return error_response(APIError(status, msg, code="not_found" if status == 404
                                       else "method_not_allowed"))

    async def server_error(request, exc):
        return error_response(APIError(500, f"internal error: {type(exc).__name__}: {exc}",
                                       "server_error"))

    routes = [
        Route("/health", endpoint(health), methods=["GET"]),
        Route("/metrics", endpoint(metrics), methods=["GET"]),
        Route("/v1/models", endpoint(models), methods=["GET"]),
        Route("/v1/models/{model:path}", endpoint(model_one), methods=["GET"]),
        Route("/v1/completions", endpoint(completions), methods=["POST"]),
        Route("/v1/chat/completions", endpoint(chat_completions), methods=["POST"]),
    ]
    app = Starlette(routes=routes, exception_handlers={HTTPException: not_found,
                                                       Exception: server_error})
    app.state.gpt2s = st
    return app


# ---------------------------------------------------------------------------------- helpers

def _encode(enc, text, chat):
    from .vocab import FileTokenizer
    if isinstance(enc, FileTokenizer):
        # a chat prompt carries its own BOS and special tokens (the template writes them)
        return enc.encode_ordinary(text) if chat else enc.encode(text)
    try:
        return enc.encode(text, allowed_special="all")
    except TypeError:
        return enc.encode(text)


def _logit_bias(bias, vocab_size):
    if not isinstance(bias, dict):
        raise _bad("logit_bias", "expected an object {token id: bias}")
    ids, values = [], []
    for k, v in bias.items():
        try:
            t = int(k)
        except ValueError:
            raise _bad("logit_bias", f"key {k!r} is not a token id") from None
        if not 0 <= t < vocab_size:
            raise _bad("logit_bias", f"token id {t} is outside [0, {vocab_size})")
        if isinstance(v, bool) or not isinstance(v, numbers.Real) or not -100 <= v <= 100:
            raise _bad("logit_bias", f"the bias of {t} must be a number in [-100, 100]")
        ids.append(t)
        values.append(float(v))
    if not ids:
        return None
    import numpy as np
    ids_a = np.array(ids, np.int64)
    vals = np.array(values, np.float32)
    ban = vals <= -100

    def processor(token_ids, logits):
        logits[:, ids_a] += vals
        logits[:, ids_a[ban]] = -np.inf
    return processor


def _check_messages(messages):
    if not isinstance(messages, list) or not messages:
        raise _bad("messages", "required: a non-empty list of {role, content}")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise _bad(f"messages[{i}]", "expected an object with a string role")
        content = m.get("content")
        if isinstance(content, list):   # [{"type": "text", "text": ...}, ...]
            parts = []
            for part in content:
                if not (isinstance(part, dict) and part.get("type") == "text"
                        and isinstance(part.get("text"), str)):
                    raise _bad(f"messages[{i}].content", "only text parts are supported")
                parts.append(part["text"])
            content = "".join(parts)
        elif content is None:
            content = ""
        elif not isinstance(content, str):
            raise _bad(f"messages[{i}].content", "expected a string or a list of text parts")
        out.append({**m, "content": content})
    return out


def _submit(engine, prompt, max_tokens, kw):
    return engine.submit(prompt, max_tokens, **kw)


def _token_str(enc, t):
    if enc is None:
        return str(t)
    return enc.decode_single_token_bytes(int(t)).decode("utf-8", errors="replace")


def _logprobs_block(st, events, chat, offset0=0):
    enc = st.tokenizer
    if chat:
        content = []
        for ev in events:
            s = _token_str(enc, ev.token)
            content.append({"token": s, "logprob": ev.logprob, "bytes": list(s.encode()),
                            "top_logprobs": [{"token": _token_str(enc, t), "logprob": lp,
                                              "bytes": list(_token_str(enc, t).encode())}
                                             for t, lp in (ev.top_logprobs or [])]})
        return {"content": content}
    tokens, lps, tops, offsets = [], [], [], []
    off = offset0
    for ev in events:
        s = _token_str(enc, ev.token)
        tokens.append(s)
        lps.append(ev.logprob)
        top = {}
        for t, lp in ev.top_logprobs or []:
            top.setdefault(_token_str(enc, t), lp)
        tops.append(top)
        offsets.append(off)
        off += len(s)
    return {"tokens": tokens, "token_logprobs": lps, "top_logprobs": tops,
            "text_offset": offsets}


def _choice(st, index, req, chat, logprobs):
    text = req.text if st.tokenizer is not None else ""
    c = {"index": index, "finish_reason": req.finish_reason}
    if chat:
        c["message"] = {"role": "assistant", "content": text}
    else:
        c["text"] = text
    c["logprobs"] = _logprobs_block(st, req._events_log, chat) if logprobs is not None \
        else None
    if not chat and st.tokenizer is None:
        c["token_ids"] = list(req.tokens)
    return c


async def _until_done_or_disconnect(request, reqs):
    """Wait for every request to finish; a client that disconnects cancels them."""
    async def consume(r):
        r._events_log = []
        async for ev in r:
            r._events_log.append(ev)

    async def disconnected():
        while True:
            msg = await request.receive()
            if msg["type"] == "http.disconnect":
                return

    work = asyncio.ensure_future(asyncio.gather(*(consume(r) for r in reqs)))
    watch = asyncio.ensure_future(disconnected())
    try:
        done, _ = await asyncio.wait({work, watch}, return_when=asyncio.FIRST_COMPLETED)
        if watch in done:
            for r in reqs:
                r.cancel()
            work.cancel()
            raise APIError(499, "the client closed the connection", code="client_closed")
        await work
    finally:
        watch.cancel()


class _SSE:
    """A server-sent-events response streaming the requests' tokens; a client that
    disconnects cancels them at once (their slots are free for the next step)."""

    def __init__(self, st, reqs, rid, chat, usage, n_prompt, logprobs):
        self.st, self.reqs, self.rid, self.chat = st, reqs, rid, chat
        self.usage, self.n_prompt, self.logprobs = usage, n_prompt, logprobs
        self.status_code = 200

    def _chunk(self, choices):
        return {"id": self.rid,
                "object": "chat.completion.chunk" if self.chat else "text_completion",
                "created": int(time.time()), "model": self.st.model_name, "choices": choices}

    def _choice(self, i, text, finish, events, first=False):
        c = {"index": i, "finish_reason": finish}
        if self.chat:
            delta = {}
            if first:
                delta["role"] = "assistant"
            if text or first:
                delta["content"] = text
            c["delta"] = delta
        else:
            c["text"] = text
        c["logprobs"] = _logprobs_block(self.st, events, self.chat) \
            if self.logprobs is not None and events else None
        return c

    async def __call__(self, scope, receive, send):
        queue = asyncio.Queue()

        async def pump(i, r):
            try:
                async for ev in r:
                    queue.put_nowait((i, ev))
            finally:
                queue.put_nowait((i, None))

        async def watch():
            while True:
                msg = await receive()
                if msg["type"] == "http.disconnect":
                    for r in self.reqs:
                        r.cancel()
                    return

        pumps = [asyncio.ensure_future(pump(i, r)) for i, r in enumerate(self.reqs)]
        watcher = asyncio.ensure_future(watch())
        try:
            await send({"type": "http.response.start", "status": 200, "headers": [
                (b"content-type", b"text/event-stream; charset=utf-8"),
                (b"cache-control", b"no-cache"), (b"x-accel-buffering", b"no")]})

            async def emit(obj):
                data = obj if isinstance(obj, str) else json.dumps(obj, ensure_ascii=False)
                await send({"type": "http.response.body",
                            "body": f"data: {data}\n\n".encode(), "more_body": True})

            if self.chat:
                await emit(self._chunk([self._choice(i, "", None, [], first=True)
                                        for i in range(len(self.reqs))]))
            left = len(self.reqs)
            while left:
                i, ev = await queue.get()
                r = self.reqs[i]
                if watcher.done():
                    return
                if ev is None:
                    left -= 1
                    if r.finish_reason == "error":
                        await emit({"error": APIError(500, f"generation failed: {r.error}",
                                                      "server_error").body()["error"]})
                        continue
                    if r.finish_reason == "cancelled":
                        continue
                    await emit(self._chunk([self._choice(i, "", r.finish_reason, [])]))
                    continue
                # completions: one chunk per token (its text may be "" while a character
                # or a possible stop string is incomplete); chat: only non-empty deltas
                if ev.text or not self.chat or self.logprobs is not None:
                    await emit(self._chunk([self._choice(i, ev.text, None, [ev])]))
            if self.usage:
                n_out = sum(len(r.tokens) for r in self.reqs)
                c = self._chunk([])
                c["usage"] = {"prompt_tokens": self.n_prompt, "completion_tokens": n_out,
                              "total_tokens": self.n_prompt + n_out}
                await emit(c)
            await emit("[DONE]")
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        except OSError:      # the client went away while we wrote
            pass
        finally:
            for r in self.reqs:
                r.cancel()
            for t in pumps:
                t.cancel()
            watcher.cancel()


def _prometheus(st) -> str:
    s = st.engine.stats()
    lines = []

    def metric(name, kind, help_, samples):
        lines.append(f"# HELP {name} {help_}")
        lines.append(f"# TYPE {name} {kind}")
        for labels, value in samples:
            lab = "{" + ",".join(f'{k}="{v}"' for k, v in labels.items()) + "}" if labels \
                else ""
            lines.append(f"{name}{lab} {value}")

    metric("gpt2s_http_requests_total", "counter", "HTTP requests by route and status.",
           [({"route": r, "status": c}, n) for (r, c), n in sorted(st.http.items())])
    metric("gpt2s_requests_submitted_total", "counter",
           "Generations submitted to the engine (one per choice).",
           [({}, s["requests_submitted"])])
    metric("gpt2s_requests_rejected_total", "counter",
           "Generations refused because the queue was full.", [({}, s["requests_rejected"])])
    metric("gpt2s_requests_finished_total", "counter", "Generations ended, by reason.",
           [({"reason": k}, v) for k, v in sorted(s["finished"].items())])
    metric("gpt2s_prompt_tokens_total", "counter", "Prompt tokens prefilled.",
           [({}, s["prompt_tokens"])])
    metric("gpt2s_generation_tokens_total", "counter", "Tokens generated.",
           [({}, s["generated_tokens"])])
    metric("gpt2s_queue_length", "gauge", "Generations waiting for a slot.",
           [({}, s["queue_length"])])
    metric("gpt2s_slots", "gauge", "Slots (rows of the decode batch).", [({}, s["slots"])])
    metric("gpt2s_slots_busy", "gauge", "Slots in use (decoding or prefilling).",
           [({}, s["active"])])
    metric("gpt2s_decode_steps_total", "counter", "Decode steps run.",
           [({}, s["decode_steps"])])
    metric("gpt2s_decode_rows_total", "counter",
           "Rows over all decode steps (rows / steps is the mean batch occupancy).",
           [({}, s["decode_rows"])])
    occ = s["decode_rows"] / s["decode_steps"] / s["slots"] if s["decode_steps"] else 0.0
    metric("gpt2s_batch_occupancy", "gauge",
           "Mean fraction of the slots filled per decode step since the start.",
           [({}, f"{occ:.6f}")])
    cum, samples = 0, []
    for b, c in zip(TTFT_BUCKETS, s["ttft_buckets"]):
        cum += c
        samples.append(({"le": "+Inf" if b == math.inf else repr(b)}, cum))
    lines.append("# HELP gpt2s_time_to_first_token_seconds From submission to the first "
                 "generated token.")
    lines.append("# TYPE gpt2s_time_to_first_token_seconds histogram")
    for labels, v in samples:
        lines.append(f'gpt2s_time_to_first_token_seconds_bucket{{le="{labels["le"]}"}} {v}')
    lines.append(f"gpt2s_time_to_first_token_seconds_sum {s['ttft_sum']:.6f}")
    lines.append(f"gpt2s_time_to_first_token_seconds_count {s['ttft_count']}")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------- CLI

def _parser():
    from ._cli import Parser, add_threads_option, add_version_option, positive_int, nonneg_int
    from .weight_types import DTYPES
    p = Parser(prog=PROG, description="Serve a model over an OpenAI-compatible HTTP API "
               "(completions, chat completions, models, health, metrics) with continuous "
               "batching.  Needs the serve extra: pip install 'gpt2s[serve]'.")
    p.add_argument("--model", default=None,
                   help="a checkpoint directory or .safetensors file, or a name: demo, gpt2, "
                        "gpt2-medium, ... (default: $GPT2S_MODEL, ./assets, the Hugging Face "
                        "cache, the bundled demo)")
    p.add_argument("--dtype", choices=DTYPES, default=None,
                   help="weight storage (default: the file's own); int8 decodes fastest")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=nonneg_int, default=8000, help="TCP port (default 8000)")
    p.add_argument("--served-model-name", default=None, metavar="NAME",
                   help="the model id clients pass (default: the --model name, or the "
                        "checkpoint's directory or file name)")
    p.add_argument("--slots", type=positive_int, default=8,
                   help="generations decoded together, 1..32 (default 8)")
    p.add_argument("--max-queue", type=nonneg_int, default=64,
                   help="generations that may wait for a slot before 429 (default 64)")
    p.add_argument("--prefill-chunk", type=positive_int, default=256, metavar="TOKENS",
                   help="most prompt tokens prefilled between two decode steps (default 256)")
    p.add_argument("--max-context", type=positive_int, default=None, metavar="TOKENS",
                   help="positions per slot (default: the model's context)")
    p.add_argument("--chat-template", default=None, metavar="FILE",
                   help="a jinja2 chat template, rendered with the checkpoint's special "
                        "tokens (default: the checkpoint's: chat_template.jinja, else "
                        "tokenizer_config.json's, as generate --chat reads it)")
    p.add_argument("--api-key", default=os.environ.get("GPT2S_API_KEY"),
                   help="require Authorization: Bearer KEY (default: $GPT2S_API_KEY, else "
                        "none)")
    p.add_argument("--max-body-bytes", type=positive_int, default=1 << 20,
                   help="largest request body (default 1 MiB)")
    p.add_argument("--log-level", default="info",
                   choices=["critical", "error", "warning", "info", "debug"],
                   help="uvicorn's log level (default info)")
    add_threads_option(p)
    add_version_option(p)
    return p


def build(args):
    """(app, engine) for parsed command-line args (loads the model)."""
    import gpt2s
    from ._cli import UserError
    from .hub import find_model
    from .vocab import VocabError, tokenizer_for
    from .weights import SafetensorsError
    if args.threads is not None:
        gpt2s.set_num_threads(args.threads)
    try:
        path = find_model(args.model)
        # in a thread that ends: no OpenMP team of the load left beside the engine's (engine.py)
        model = load_in_thread(gpt2s.AutoModelForCausalLM.from_pretrained, path,
                               dtype=args.dtype)
    except (FileNotFoundError, SafetensorsError, ValueError, ImportError) as e:
        raise UserError(str(e)) from None
    try:
        enc = tokenizer_for(path, model.config)
    except (VocabError, ValueError) as e:
        print(f"{PROG}: warning: {e}; serving token ids only", file=sys.stderr)
        enc = None
    from .chat import ChatTemplate, ChatTemplateError
    folder = Path(path) if Path(path).is_dir() else Path(path).parent
    try:
        # the checkpoint's, as generate --chat reads it; --chat-template FILE: that template
        # with the checkpoint's special tokens
        template = ChatTemplate.from_pretrained(folder)
        if args.chat_template is not None:
            try:
                text = Path(args.chat_template).read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError) as e:
                raise ChatTemplateError(f"--chat-template {args.chat_template}: {e}") from None
            template = ChatTemplate(text, template.special_tokens if template else None,
                                    args.chat_template)
    except ChatTemplateError as e:
        raise UserError(str(e)) from None
    try:
        engine = BatchEngine(model, slots=args.slots, max_queue=args.max_queue,
                             prefill_chunk=args.prefill_chunk, max_context=args.max_context,
                             tokenizer=enc)
    except (TypeError, ValueError) as e:
        raise UserError(str(e)) from None
    if args.served_model_name:
        name = args.served_model_name
    elif args.model and not Path(args.model).exists():
        name = args.model                 # a name: "gpt2", "demo", a Hugging Face repo id
    else:
        name = Path(path).name if Path(path).is_dir() else Path(path).stem
    name = name or "gpt2s"
    app = create_app(engine, model_name=name, tokenizer=enc, chat_template=template,
                     max_body_bytes=args.max_body_bytes,
                     api_key=args.api_key, aliases=(args.model,) if args.model else ())
    return app, engine


def main(argv=None) -> int:
    from ._cli import UserError, run_main
    args = _parser().parse_args(argv)

    def body():
        try:
            import uvicorn  # noqa: F401
            import starlette  # noqa: F401
        except ImportError as e:
            raise UserError(f"serving needs the serve extra ({e.name} is missing): "
                            f"pip install 'gpt2s[serve]'") from None
        import uvicorn
        app, engine = build(args)
        print(f"{PROG}: serving {app.state.gpt2s.model_name!r} ({engine.slots} slots) on "
              f"http://{args.host}:{args.port}/v1", file=sys.stderr)
        try:
            uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level,
                        timeout_graceful_shutdown=5)
        finally:
            engine.close()
        return 0
    return run_main(PROG, body)


if __name__ == "__main__":
    sys.exit(main())
