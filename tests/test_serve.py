"""python -m gpt2s.serve through a real HTTP server on 127.0.0.1 (a random port): the
official ``openai`` client and raw HTTP (httpx, sockets), streaming and not, bad requests,
disconnects, a full queue, and a short load test whose every completed response must equal
the same request generated alone (``model.generate_text``, greedy)."""

from __future__ import annotations

import json
import random
import socket
import threading
import time

import numpy as np
import pytest

pytest.importorskip("starlette")
pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")
openai = pytest.importorskip("openai")

from gpt2s import GPT2, GPT2Config, get_tokenizer  # noqa: E402
from gpt2s.engine import BatchEngine  # noqa: E402
from gpt2s.serve import create_app, render_chat  # noqa: E402

MODEL = "tiny-gpt2"


class Server:
    """uvicorn serving app in a thread, on a socket bound to 127.0.0.1:0."""

    def __init__(self, app):
        import uvicorn
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]},
                                       daemon=True)
        self.thread.start()
        deadline = time.time() + 20
        while not self.server.started:
            assert time.time() < deadline, "the server did not start"
            time.sleep(0.01)

    def close(self):
        self.server.should_exit = True
        self.thread.join(10)
        self.sock.close()


def _serve(model, **engine_kw):
    enc = get_tokenizer()
    engine = BatchEngine(model, tokenizer=enc, **engine_kw)
    server = Server(create_app(engine, model_name=MODEL, max_body_bytes=4096))
    return engine, server


@pytest.fixture(scope="module")
def model():
    return GPT2.from_config(GPT2Config.preset("tiny", n_ctx=64), seed=1)


@pytest.fixture(scope="module")
def served(model):
    engine, server = _serve(model, slots=4, max_queue=64)
    yield engine, server
    server.close()
    engine.close()


@pytest.fixture(scope="module")
def client(served):
    return openai.OpenAI(base_url=served[1].url + "/v1", api_key="none", max_retries=0,
                         timeout=60)


def solo(model, prompt, n):
    """The greedy continuation of prompt generated alone (gpt2s' own decoding loop)."""
    return model.generate_text(prompt, n, temperature=0)


PROMPTS = ["Hello there", "The quick brown fox", "Once upon a time", "def f(x):",
           "A", "In 1492, Columbus sailed", "Numbers: 1, 2, 3,", "Zebras"]


# ---------------------------------------------------------------------------------- openai

def test_completion_equals_solo_generation(client, model):
    r = client.completions.create(model=MODEL, prompt="Hello there", max_tokens=12,
                                  temperature=0)
    assert r.object == "text_completion" and r.model == MODEL
    assert r.choices[0].text == solo(model, "Hello there", 12)
    assert r.choices[0].finish_reason in ("length", "stop")
    enc = get_tokenizer()
    assert r.usage.prompt_tokens == len(enc.encode("Hello there"))
    assert 1 <= r.usage.completion_tokens <= 12
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_streaming_equals_non_streaming(client, model):
    chunks = list(client.completions.create(model=MODEL, prompt="Once upon a time",
                                            max_tokens=15, temperature=0, stream=True,
                                            stream_options={"include_usage": True}))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == solo(model, "Once upon a time", 15)
    finals = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finals[-1] in ("length", "stop") and all(f is None for f in finals[:-1])
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens >= 1


def test_several_prompts_n_and_token_ids(client, model):
    enc = get_tokenizer()
    r = client.completions.create(model=MODEL, prompt=["A", "Zebras"], n=2, max_tokens=6,
                                  temperature=0)
    assert [c.index for c in r.choices] == [0, 1, 2, 3]
    assert [c.text for c in r.choices] == [solo(model, "A", 6)] * 2 + \
        [solo(model, "Zebras", 6)] * 2
    r2 = client.completions.create(model=MODEL, prompt=enc.encode("Zebras"), max_tokens=6,
                                   temperature=0)
    assert r2.choices[0].text == solo(model, "Zebras", 6)


def test_raw_sse_two_choices(served, model):
    """Raw HTTP: the event stream of n=2 interleaves both choices, one chunk per token,
    each ending with its finish_reason, then data: [DONE]."""
    url = served[1].url + "/v1/completions"
    texts, finishes, tokens = {0: "", 1: ""}, {}, {0: 0, 1: 0}
    with httpx.stream("POST", url, json={"model": MODEL, "prompt": "Zebras", "n": 2,
                                         "max_tokens": 7, "temperature": 0,
                                         "ignore_eos": True, "stream": True},
                      timeout=60) as resp:
        assert resp.status_code == 200
        assert resp.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in resp.iter_lines() if line]
    assert all(line.startswith("data: ") for line in lines)
    assert lines[-1] == "data: [DONE]"
    for line in lines[:-1]:
        chunk = json.loads(line[6:])
        assert chunk["object"] == "text_completion" and chunk["model"] == MODEL
        (c,) = chunk["choices"]
        texts[c["index"]] += c["text"]
        if c["finish_reason"] is None:
            tokens[c["index"]] += 1
        else:
            finishes[c["index"]] = c["finish_reason"]
    want = model.generate_text("Zebras", 7, temperature=0, stop_at_eos=False)
    assert texts == {0: want, 1: want}
    assert finishes == {0: "length", 1: "length"} and tokens == {0: 7, 1: 7}


def test_seeded_sampling_is_reproducible(client, model):
    kw = dict(model=MODEL, prompt="Numbers: 1, 2, 3,", max_tokens=10, temperature=1.0,
              top_p=0.9, seed=7, extra_body={"top_k": 50})
    a = client.completions.create(**kw).choices[0].text
    b = client.completions.create(**kw).choices[0].text
    assert a == b == model.generate_text("Numbers: 1, 2, 3,", 10, temperature=1.0, top_k=50,
                                         top_p=0.9, seed=7)
    # choice j of n uses seed + j
    r = client.completions.create(**{**kw, "n": 2})
    assert r.choices[0].text == a
    assert r.choices[1].text == model.generate_text("Numbers: 1, 2, 3,", 10, temperature=1.0,
                                                    top_k=50, top_p=0.9, seed=8)


def test_logprobs(client, model):
    r = client.completions.create(model=MODEL, prompt="Hello there", max_tokens=3,
                                  temperature=0, logprobs=2)
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 3
    # the first token's log-probability from the model's own logits
    enc = get_tokenizer()
    logits, _ = model.forward(np.array([enc.encode("Hello there")]))
    x = logits[0, -1].astype(np.float64)
    ref = x - (np.log(np.exp(x - x.max()).sum()) + x.max())
    assert lp.token_logprobs[0] == pytest.approx(ref.max(), abs=1e-4)
    assert len(lp.top_logprobs[0]) == 2 and max(lp.top_logprobs[0].values()) == \
        pytest.approx(ref.max(), abs=1e-4)


def test_models_health_metrics(client, served):
    ids = [m.id for m in client.models.list().data]
    assert ids == [MODEL]
    assert client.models.retrieve(MODEL).id == MODEL
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("nope")
    url = served[1].url
    h = httpx.get(url + "/health")
    assert h.status_code == 200 and h.json()["status"] == "ok"
    client.completions.create(model=MODEL, prompt="A", max_tokens=2, temperature=0)
    m = httpx.get(url + "/metrics")
    assert m.status_code == 200 and m.headers["content-type"].startswith("text/plain")
    text = m.text
    for name in ("gpt2s_http_requests_total", "gpt2s_prompt_tokens_total",
                 "gpt2s_generation_tokens_total", "gpt2s_queue_length", "gpt2s_slots_busy",
                 "gpt2s_batch_occupancy", "gpt2s_time_to_first_token_seconds_bucket",
                 "gpt2s_time_to_first_token_seconds_count"):
        assert name in text
    count = [line for line in text.splitlines()
             if line.startswith("gpt2s_time_to_first_token_seconds_count")][0]
    assert int(count.split()[-1]) >= 1
    assert 'route="/v1/completions",status="200"' in text


# ---------------------------------------------------------------------------------- errors

def _err(resp, status, param=None, code=None):
    assert resp.status_code == status, resp.text
    body = resp.json()
    assert set(body) == {"error"} and isinstance(body["error"]["message"], str)
    assert set(body["error"]) >= {"message", "type", "param", "code"}
    if param is not None:
        assert body["error"]["param"] == param
    if code is not None:
        assert body["error"]["code"] == code
    return body["error"]


def test_bad_requests(served, client):
    url = served[1].url + "/v1/completions"
    ok = {"model": MODEL, "prompt": "Hi", "max_tokens": 2}
    _err(httpx.post(url, json={**ok, "model": "gpt-4"}), 404, "model", "model_not_found")
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="gpt-4", prompt="Hi", max_tokens=1)
    e = _err(httpx.post(url, json={**ok, "prompt": "word " * 70}), 400, "prompt",
             "context_length_exceeded")
    assert "context" in e["message"]
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model=MODEL, prompt="word " * 70, max_tokens=1)
    _err(httpx.post(url, json={**ok, "temperature": "hot"}), 400, "temperature")
    _err(httpx.post(url, json={**ok, "temperature": 3}), 400, "temperature")
    _err(httpx.post(url, json={**ok, "top_p": 1.5}), 400, "top_p")
    _err(httpx.post(url, json={**ok, "top_p": 0}), 400, "top_p")
    _err(httpx.post(url, json={**ok, "max_tokens": 0}), 400, "max_tokens")
    _err(httpx.post(url, json={**ok, "max_tokens": True}), 400, "max_tokens")
    _err(httpx.post(url, json={**ok, "n": 99}), 400, "n")
    _err(httpx.post(url, json={**ok, "stop": [1]}), 400, "stop")
    _err(httpx.post(url, json={**ok, "stream": "yes"}), 400, "stream")
    _err(httpx.post(url, json={**ok, "logprobs": 50}), 400, "logprobs")
    _err(httpx.post(url, json={**ok, "prompt": ""}), 400, "prompt")
    _err(httpx.post(url, json={**ok, "prompt": [1, -1]}), 400)
    _err(httpx.post(url, json={**ok, "prompt": None}), 400, "prompt")
    _err(httpx.post(url, json={**ok, "logit_bias": {"x": 1}}), 400, "logit_bias")
    _err(httpx.post(url, json=[1, 2]), 400)
    _err(httpx.post(url, content=b"{not json", headers={"content-type": "application/json"}),
         400)
    _err(httpx.post(url, content=b'{"model": "' + b"x" * 5000 + b'"}'), 413,
         code="request_too_large")
    _err(httpx.get(served[1].url + "/v1/nothing"), 404)
    _err(httpx.get(url), 405)
    # no chat template for this model
    _err(httpx.post(served[1].url + "/v1/chat/completions",
                    json={"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}),
         400, code="no_chat_template")
    # the server still works
    assert httpx.post(url, json=ok).status_code == 200


def test_logit_bias_bans_and_forces(client, model):
    enc = get_tokenizer()
    first = enc.encode(solo(model, "Hello there", 1))[0]
    r = client.completions.create(model=MODEL, prompt="Hello there", max_tokens=1,
                                  temperature=0, logit_bias={str(first): -100})
    assert enc.encode(r.choices[0].text)[0] != first
    r = client.completions.create(model=MODEL, prompt="Hello there", max_tokens=2,
                                  temperature=0, logit_bias={"314": 100})
    assert r.choices[0].text == enc.decode([314, 314])


def test_stop_string(client, model):
    full = solo(model, "The quick brown fox", 20)
    cut = full[5:8]
    r = client.completions.create(model=MODEL, prompt="The quick brown fox", max_tokens=20,
                                  temperature=0, stop=[cut])
    assert r.choices[0].text == full[:full.index(cut)]
    assert r.choices[0].finish_reason == "stop"


# ---------------------------------------------------------------------------------- load

def _wait(pred, timeout=10.0):
    deadline = time.time() + timeout
    while not pred():
        if time.time() > deadline:
            return False
        time.sleep(0.01)
    return True


def test_stream_disconnect_frees_the_slot(served):
    engine, server = served
    before = engine.stats()["finished"].get("cancelled", 0)
    with httpx.Client(timeout=30) as http:
        with http.stream("POST", server.url + "/v1/completions",
                         json={"model": MODEL, "prompt": "Hello", "max_tokens": 60,
                               "temperature": 0, "stream": True, "ignore_eos": True}) as resp:
            assert resp.status_code == 200
            lines = resp.iter_lines()
            got = [next(lines) for _ in range(4)]
            assert any(line.startswith("data: ") for line in got)
    # closing the stream closes the connection: the engine frees the slot at once
    assert _wait(lambda: engine.stats()["finished"].get("cancelled", 0) > before)
    assert _wait(lambda: engine.stats()["active"] == 0)


def test_non_streaming_disconnect_cancels(served):
    engine, server = served
    before = engine.stats()["finished"].get("cancelled", 0)
    body = json.dumps({"model": MODEL, "prompt": "Hello", "max_tokens": 60, "temperature": 0,
                       "ignore_eos": True}).encode()
    s = socket.create_connection(("127.0.0.1", server.port))
    s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
              b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
    assert _wait(lambda: engine.stats()["active"] > 0)
    s.close()
    assert _wait(lambda: engine.stats()["finished"].get("cancelled", 0) > before)
    assert _wait(lambda: engine.stats()["active"] == 0)


def test_full_queue_is_429(model):
    engine, server = _serve(model, slots=1, max_queue=0)
    gate = threading.Event()

    def hold(ids, logits):   # keeps the only slot busy until the gate opens
        gate.wait(30)
        return None
    try:
        busy = engine.submit([1, 2], 3, logits_processor=hold)
        assert _wait(lambda: engine.stats()["active"] == 1)
        r = httpx.post(server.url + "/v1/completions",
                       json={"model": MODEL, "prompt": "Hi", "max_tokens": 2}, timeout=30)
        e = _err(r, 429, code="queue_full")
        assert "queue" in e["message"] and r.headers["retry-after"] == "1"
        c = openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0)
        with pytest.raises(openai.RateLimitError):
            c.completions.create(model=MODEL, prompt="Hi", max_tokens=2)
        assert engine.stats()["requests_rejected"] == 2
        gate.set()
        busy.result(timeout=30)
        assert _wait(lambda: engine.stats()["active"] == 0)
        # a free slot again: served
        r = httpx.post(server.url + "/v1/completions",
                       json={"model": MODEL, "prompt": "Hi", "max_tokens": 2}, timeout=30)
        assert r.status_code == 200
        engine.close()
        r = httpx.post(server.url + "/v1/completions",
                       json={"model": MODEL, "prompt": "Hi", "max_tokens": 2}, timeout=30)
        _err(r, 503)
        assert httpx.get(server.url + "/health").status_code == 503
    finally:
        server.close()
        engine.close()


def test_load_with_cancellations(served, model):
    """40 requests from 8 concurrent clients, streaming and not, some cancelled midway:
    every completed response equals its prompt generated alone; no error; every slot free
    afterwards."""
    engine, server = served
    want = {p: solo(model, p, 24) for p in PROMPTS}
    rng = random.Random(0)
    jobs = [(PROMPTS[rng.randrange(len(PROMPTS))], rng.random() < 0.5, rng.random() < 0.2)
            for _ in range(40)]
    results, errors = [], []
    lock = threading.Lock()
    it = iter(jobs)
    c = openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0, timeout=60)

    def worker():
        while True:
            with lock:
                job = next(it, None)
            if job is None:
                return
            prompt, stream, cancel = job
            try:
                if cancel:
                    s = c.completions.create(model=MODEL, prompt=prompt, max_tokens=24,
                                             temperature=0, stream=True)
                    next(iter(s))
                    s.close()
                    continue
                if stream:
                    text = "".join(ch.choices[0].text for ch in
                                   c.completions.create(model=MODEL, prompt=prompt,
                                                        max_tokens=24, temperature=0,
                                                        stream=True) if ch.choices)
                else:
                    text = c.completions.create(model=MODEL, prompt=prompt, max_tokens=24,
                                                temperature=0).choices[0].text
                with lock:
                    results.append((prompt, text))
            except Exception as e:   # noqa: BLE001 (collected, asserted below)
                with lock:
                    errors.append(repr(e))

    threads = [threading.Thread(target=worker) for _ in range(8)]
    t0 = time.time()
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors
    assert len(results) == sum(1 for j in jobs if not j[2])
    assert all(text == want[p] for p, text in results)
    assert _wait(lambda: engine.stats()["active"] == 0 and engine.stats()["queue_length"] == 0)
    assert time.time() - t0 < 120


# ---------------------------------------------------------------------------------- chat

TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
            "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    """A tiny random Llama checkpoint (gpt2s' own save: no torch needed) with a byte-level
    BPE tokenizer.json and a ChatML template in tokenizer_config.json."""
    from llama_ckpt import make_tokenizer

    from gpt2s import LlamaConfig, LlamaForCausalLM
    d = tmp_path_factory.mktemp("llama-chat")
    tk = make_tokenizer(d, 300)
    cfg = LlamaConfig(vocab_size=tk.get_vocab_size(), hidden_size=32, intermediate_size=48,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=128, eos_token_id=tk.token_to_id("<|im_end|>"))
    m = LlamaForCausalLM.from_config(cfg, seed=0)
    rng = np.random.default_rng(0)
    for p in m.params.values():
        p[...] = (0.3 * rng.standard_normal(p.shape)).astype(np.float32)
    m.save_safetensors(d)
    (d / "tokenizer_config.json").write_text(json.dumps(
        {"chat_template": TEMPLATE, "bos_token": None, "eos_token": "<|im_end|>"}))
    return d


def test_render_chat():
    text = render_chat(TEMPLATE, [{"role": "user", "content": "hi"}])
    assert text == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


def test_chat_completions_through_the_cli_build(llama_dir):
    import gpt2s
    from gpt2s.serve import _parser, build
    args = _parser().parse_args(["--model", str(llama_dir), "--slots", "3"])
    app, engine = build(args)
    server = Server(app)
    try:
        name = app.state.gpt2s.model_name
        c = openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0, timeout=60)
        msgs = [{"role": "system", "content": "Be brief."},
                {"role": "user", "content": "Hello, world!"}]
        r = c.chat.completions.create(model=name, messages=msgs, max_tokens=10,
                                      temperature=0)
        # the reference: the rendered template, tokenized, generated alone
        m = gpt2s.AutoModelForCausalLM.from_pretrained(llama_dir)
        enc = m.tokenizer
        ids = enc.encode_ordinary(render_chat(TEMPLATE, msgs))
        eos = m.config.eos_token_id
        out = m.generate(np.array([ids]), 10, temperature=0, stop_at_eos=True,
                         eos_token_id=eos)[0, len(ids):].tolist()
        if eos in out:
            out = out[:out.index(eos)]
        assert r.object == "chat.completion" and len(out) >= 3
        assert r.choices[0].message.role == "assistant"
        assert r.choices[0].message.content == enc.decode(out)
        assert r.usage.prompt_tokens == len(ids)
        chunks = list(c.chat.completions.create(model=name, messages=msgs, max_tokens=10,
                                                temperature=0, stream=True))
        assert chunks[0].choices[0].delta.role == "assistant"
        assert "".join(ch.choices[0].delta.content or "" for ch in chunks) == \
            r.choices[0].message.content
        assert chunks[-1].choices[0].finish_reason == r.choices[0].finish_reason
        r2 = c.chat.completions.create(model=name, messages=msgs, max_tokens=3, temperature=0,
                                       logprobs=True, top_logprobs=2)
        content = r2.choices[0].logprobs.content
        assert len(content) == r2.usage.completion_tokens >= 1
        assert all(len(t.top_logprobs) == 2 and t.logprob <= 0 for t in content)
        bad = httpx.post(server.url + "/v1/chat/completions",
                         json={"model": name, "messages": "hi"})
        _err(bad, 400, "messages")
    finally:
        server.close()
        engine.close()


def test_api_key(model):
    engine = BatchEngine(model, slots=1, tokenizer=get_tokenizer())
    server = Server(create_app(engine, model_name=MODEL, api_key="sesame"))
    try:
        _err(httpx.get(server.url + "/v1/models"), 401, code="invalid_api_key")
        ok = httpx.get(server.url + "/v1/models", headers={"Authorization": "Bearer sesame"})
        assert ok.status_code == 200
        assert httpx.get(server.url + "/health").status_code == 200
        c = openai.OpenAI(base_url=server.url + "/v1", api_key="wrong", max_retries=0)
        with pytest.raises(openai.AuthenticationError):
            c.models.list()
    finally:
        server.close()
        engine.close()


# ---------------------------------------------------------------------------------- CLI

def test_cli_help_and_errors(tmp_path):
    import subprocess
    import sys
    r = subprocess.run([sys.executable, "-m", "gpt2s", "serve", "--help"], capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0
    for option in ("--model", "--dtype", "--host", "--port", "--slots", "--max-queue",
                   "--prefill-chunk", "--threads", "--api-key", "--chat-template"):
        assert option in r.stdout
    r = subprocess.run([sys.executable, "-m", "gpt2s"], capture_output=True, text=True,
                       timeout=120)
    assert "serve" in r.stdout
    r = subprocess.run([sys.executable, "-m", "gpt2s.serve", "--model",
                        str(tmp_path / "missing")], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 2
    assert r.stderr.startswith("python -m gpt2s.serve: error:") and "missing" in r.stderr
    assert "Traceback" not in r.stderr
    r = subprocess.run([sys.executable, "-m", "gpt2s.serve", "--slots", "0"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "--slots" in r.stderr


def test_cli_slots_over_the_limit_is_one_line(tmp_path):
    from gpt2s._cli import UserError
    from gpt2s.serve import _parser, build
    m = GPT2.from_config(GPT2Config.preset("tiny", n_ctx=32), seed=0)
    m.save_safetensors(tmp_path)
    with pytest.raises(UserError, match="slots must be at most 32"):
        build(_parser().parse_args(["--model", str(tmp_path), "--slots", "33"]))


CHATML = (
    "{% if messages[0]['role'] != 'system' %}<|im_start|>system\nYou are helpful.<|im_end|>\n"
    "{% endif %}{% for m in messages %}"
    "{% if m['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('unknown role ' + m['role']) }}{% endif %}"
    "<|im_start|>{{ m['role'] }}\n{{ m['content'] | trim }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def test_render_chat_equals_transformers(tmp_path):
    """render_chat against transformers' apply_chat_template, the reference renderer."""
    transformers = pytest.importorskip("transformers")
    from llama_ckpt import make_tokenizer
    make_tokenizer(tmp_path, 300)
    tok = transformers.PreTrainedTokenizerFast(tokenizer_file=str(tmp_path / "tokenizer.json"),
                                               eos_token="<|im_end|>")
    tok.chat_template = CHATML
    for msgs in ([{"role": "user", "content": " Hi there "}],
                 [{"role": "system", "content": "Be brief."},
                  {"role": "user", "content": "Hello"},
                  {"role": "assistant", "content": "Hi!"},
                  {"role": "user", "content": "And now?"}]):
        want = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        assert render_chat(CHATML, msgs, eos_token="<|im_end|>") == want
    from gpt2s.chat import ChatTemplateError
    with pytest.raises(ChatTemplateError, match="unknown role tool"):
        render_chat(CHATML, [{"role": "tool", "content": "x"}])


def test_serve_renders_with_the_chat_module(tmp_path):
    """One renderer: serve's render_chat and load_chat_template are gpt2s.chat's
    (apply_chat_template, what generate --chat uses), so serve reads a template the way
    generate does (chat_template.jinja beside the model, transformers 5's layout) and
    renders what only gpt2s.chat's environment provides (dict(), namespace(), a
    {% generation %} block); a template error is a ChatTemplateError naming the template."""
    from gpt2s.chat import ChatTemplate, apply_chat_template
    from gpt2s.serve import load_chat_template
    template = ("{% set ns = namespace(n=0) %}{% for m in messages %}{% set ns.n = ns.n + 1 %}"
                "{% set d = dict(role=m['role']) %}<|{{ d.role }}|>"
                "{% generation %}{{ m['content'] }}{% endgeneration %}{{ eos_token }}"
                "{% endfor %}[{{ ns.n }}]{% if add_generation_prompt %}<|assistant|>{% endif %}")
    (tmp_path / "chat_template.jinja").write_text(template)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<s>", "eos_token": {"content": "</s>"}}))
    assert load_chat_template(tmp_path) == (template, "<s>", "</s>")
    msgs = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}]
    want = "<|user|>Hi</s><|assistant|>Yo</s>[2]<|assistant|>"

    class Tokenizer:
        chat_template = ChatTemplate.from_pretrained(tmp_path)
    assert apply_chat_template(Tokenizer, msgs) == want
    assert render_chat(template, msgs, bos_token="<s>", eos_token="</s>") == want
    assert render_chat(template, msgs, eos_token="</s>", add_generation_prompt=False) == \
        want[:-len("<|assistant|>")]
    assert load_chat_template(tmp_path / "nothing-here") == (None, "", "")
    assert load_chat_template(None) == (None, "", "")


def test_chat_completions_with_a_chat_template_jinja(llama_dir, tmp_path):
    """serve's CLI build reads chat_template.jinja (as generate --chat does) and renders it
    with tokenizer_config.json's special tokens; --chat-template FILE replaces the template
    and keeps those tokens; an unreadable FILE is one line naming it."""
    import shutil

    from gpt2s._cli import UserError
    from gpt2s.serve import _parser, build
    d = tmp_path / "ckpt"
    shutil.copytree(llama_dir, d)
    (d / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|im_end|>"}))
    (d / "chat_template.jinja").write_text(
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}{{ eos_token }}"
        "\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    app, engine = build(_parser().parse_args(["--model", str(d), "--slots", "1"]))
    try:
        chat = app.state.gpt2s.chat
        assert chat.render([{"role": "user", "content": "hi"}]) == \
            render_chat(TEMPLATE, [{"role": "user", "content": "hi"}])
    finally:
        engine.close()
    other = tmp_path / "other.jinja"
    other.write_text("{% for m in messages %}[{{ m['content'] }}]{{ eos_token }}{% endfor %}")
    app, engine = build(_parser().parse_args(["--model", str(d), "--slots", "1",
                                              "--chat-template", str(other)]))
    try:
        assert app.state.gpt2s.chat.render([{"role": "user", "content": "hi"}]) == \
            "[hi]<|im_end|>"
    finally:
        engine.close()
    with pytest.raises(UserError, match="missing.jinja"):
        build(_parser().parse_args(["--model", str(d), "--chat-template",
                                    str(tmp_path / "missing.jinja")]))
