"""gpt2s.engine.BatchEngine: continuous batching against single-request generation.

The reference for every greedy output is ``model.generate`` of that prompt alone (its own
decoding loop, one row); the engine must give the same tokens whatever else is in the batch,
and a request's logits-derived values (logprobs) must be bit-identical alone and in a busy
batch (row-independent numerics)."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from conftest import _make_config, _make_model

from gpt2s import GPT2, GPT2Config, LlamaForCausalLM
from gpt2s.engine import BatchEngine, EngineClosed, QueueFull
from gpt2s.llama_config import LlamaConfig


@pytest.fixture(scope="module")
def model():
    return _make_model(_make_config(n_layer=2, n_head=2, head_size=16, vocab_size=211,
                                    n_ctx=64), seed=3)


def _prompts(n, vocab, seed=0, lo=1, hi=20):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, vocab, size=int(rng.integers(lo, hi))) for _ in range(n)]


def _solo(model, p, max_new, **kw):
    out = model.generate(np.asarray(p)[None], max_new, temperature=0, **kw)
    return out[0, len(p):].tolist()


def test_greedy_equals_generate_alone_and_in_a_busy_batch(model):
    prompts = _prompts(24, 211)
    want = [_solo(model, p, 12) for p in prompts]
    with BatchEngine(model, slots=6, prefill_chunk=32) as engine:
        reqs = [engine.submit(p, 12, temperature=0, stop_at_eos=False) for p in prompts]
        got = [r.result(timeout=60) for r in reqs]
        s = engine.stats()
    assert got == want
    assert all(r.finish_reason == "length" for r in reqs)
    # the batch really was shared: more rows than steps
    assert s["decode_rows"] > 2 * s["decode_steps"]
    assert s["generated_tokens"] == 24 * 12


def _llama(vocab=97, intermediate=64):
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=intermediate,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=64)
    m = LlamaForCausalLM.from_config(cfg, seed=0)
    rng = np.random.default_rng(0)
    for p in m.params.values():
        p[...] = (0.3 * rng.standard_normal(p.shape)).astype(np.float32)
    return m


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "int8"])
@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_logprobs_bit_identical_alone_and_batched(model, family, dtype):
    """Row-independent numerics: a request's log-probabilities (its logits) are the same
    bits alone (beside the throw-away row) and in a batch of 8 with other requests."""
    m = model if family == "gpt2" else _llama(211)
    m = m if dtype == "float32" else m.to_dtype(dtype)
    prompts = _prompts(10, 211, seed=1, hi=40)
    with BatchEngine(m, slots=1, prefill_chunk=8) as engine:
        alone = []
        for p in prompts:
            r = engine.submit(p, 10, temperature=0, stop_at_eos=False, logprobs=3)
            alone.append([(e.token, e.logprob, e.top_logprobs) for e in r])
    with BatchEngine(m, slots=8, prefill_chunk=8) as engine:
        reqs = [engine.submit(p, 10, temperature=0, stop_at_eos=False, logprobs=3)
                for p in prompts]
        busy = [[(e.token, e.logprob, e.top_logprobs) for e in r] for r in reqs]
    assert busy == alone      # == on floats: bit for bit


def test_logprobs_against_numpy_softmax(model):
    p = _prompts(1, 211, seed=2)[0]
    with BatchEngine(model, slots=2) as engine:
        ev = next(iter(engine.submit(p, 1, temperature=0, logprobs=5)))
    logits, _ = model.forward(np.asarray(p)[None])
    x = logits[0, -1].astype(np.float64)
    lp = x - (np.log(np.exp(x - x.max()).sum()) + x.max())
    order = np.argsort(-lp, kind="stable")[:5]
    assert ev.token == int(order[0])
    np.testing.assert_allclose(ev.logprob, lp[ev.token], atol=1e-5)
    assert [t for t, _ in ev.top_logprobs] == order.tolist()
    np.testing.assert_allclose([v for _, v in ev.top_logprobs], lp[order], atol=1e-5)


def test_seeded_sampling_equals_generate(model):
    prompts = _prompts(6, 211, seed=4)
    want = [model.generate(np.asarray(p)[None], 10, temperature=0.9, top_k=40, top_p=0.9,
                           seed=100 + i)[0, len(p):].tolist() for i, p in enumerate(prompts)]
    with BatchEngine(model, slots=4) as engine:
        reqs = [engine.submit(p, 10, temperature=0.9, top_k=40, top_p=0.9, seed=100 + i,
                              stop_at_eos=False) for i, p in enumerate(prompts)]
        got = [r.result(timeout=60) for r in reqs]
    assert got == want


def test_penalties_equal_generate(model):
    p = _prompts(1, 211, seed=5)[0]
    want = model.generate(np.asarray(p)[None], 15, temperature=0, presence_penalty=0.7,
                          frequency_penalty=0.4, repetition_penalty=1.3)[0, len(p):].tolist()
    with BatchEngine(model, slots=3) as engine:
        busy = [engine.submit(q, 15, temperature=0) for q in _prompts(3, 211, seed=6)]
        got = engine.generate(p, 15, temperature=0, presence_penalty=0.7,
                              frequency_penalty=0.4, repetition_penalty=1.3,
                              stop_at_eos=False)
        for r in busy:
            r.result(timeout=60)
    assert got == want


def test_end_token_and_context_limit():
    cfg = GPT2Config.preset("tiny", n_ctx=32)
    m = GPT2.from_config(cfg, seed=0)
    p = [464, 3290, 318]
    free = _solo(m, p, 40, context_full="stop")       # what fits in n_ctx = 32 positions
    assert len(free) == 29
    with BatchEngine(m, slots=2) as engine:
        r = engine.submit(p, 40, temperature=0, stop_at_eos=False)
        assert r.result(timeout=60) == free and r.finish_reason == "length"
        # the first generated token as the end token: stops there, the token included
        eos = free[0]
        e2 = BatchEngine(m, slots=2, eos_token_id=eos)
        try:
            r2 = e2.submit(p, 10, temperature=0)
            assert r2.result(timeout=60) == [eos] and r2.finish_reason == "stop"
        finally:
            e2.close()
        with pytest.raises(ValueError, match="context"):
            engine.submit(list(range(32)), 4)
        with pytest.raises(ValueError, match="outside"):
            engine.submit([1, 2, 50257], 4)
        with pytest.raises(TypeError, match="prompt"):
            engine.submit([], 4)
        with pytest.raises(ValueError, match="max_tokens"):
            engine.submit([1], 0)
        with pytest.raises(ValueError, match="temperature"):
            engine.submit([1], 2, temperature=-1)


def test_stop_strings_and_text(model):
    from gpt2s import get_tokenizer
    enc = get_tokenizer()
    m = GPT2.from_config(GPT2Config.preset("tiny", n_ctx=64), seed=1)
    prompt = enc.encode("Hello there")
    want_ids = _solo(m, prompt, 20)
    full = enc.decode(want_ids)
    with BatchEngine(m, slots=2, tokenizer=enc) as engine:
        r = engine.submit(prompt, 20, temperature=0, stop_at_eos=False)
        pieces = "".join(e.text for e in r)
        assert pieces == r.text == full
        # a stop string taken from the middle of the text ends it before the string
        cut = full[len(full) // 2:len(full) // 2 + 3]
        r2 = engine.submit(prompt, 20, temperature=0, stop=cut, stop_at_eos=False)
        text = "".join(e.text for e in r2)
        assert text == full[:full.index(cut)] and r2.finish_reason == "stop"
        assert len(r2.tokens) < 20


def test_cancel_frees_the_slot_at_once(model):
    with BatchEngine(model, slots=1, max_queue=4) as engine:
        long = engine.submit([1, 2, 3], 60, temperature=0, stop_at_eos=False)
        it = iter(long)
        next(it)
        waiting = engine.submit([4, 5], 3, temperature=0, stop_at_eos=False)
        long.cancel()
        assert waiting.result(timeout=30) == _solo(model, [4, 5], 3)
        assert long.finish_reason == "cancelled" and len(long.tokens) < 60
        assert engine.stats()["active"] == 0


def test_queue_full_and_closed(model):
    engine = BatchEngine(model, slots=1, max_queue=2)
    try:
        reqs = [engine.submit([1, 2], 60, temperature=0, stop_at_eos=False) for _ in range(3)]
        with pytest.raises(QueueFull, match="queue is full"):
            for _ in range(3):
                reqs.append(engine.submit([1, 2], 60, temperature=0))
        assert engine.stats()["requests_rejected"] == 1
    finally:
        engine.close()
    assert all(r.done for r in reqs)
    assert {r.finish_reason for r in reqs} <= {"cancelled", "length"}
    with pytest.raises(EngineClosed):
        engine.submit([1], 1)


def test_threads_submit_and_iterate(model):
    prompts = _prompts(16, 211, seed=7)
    want = [_solo(model, p, 8) for p in prompts]
    got = [None] * len(prompts)
    with BatchEngine(model, slots=4, max_queue=64) as engine:
        def client(i):
            got[i] = [e.token for e in engine.submit(prompts[i], 8, temperature=0,
                                                     stop_at_eos=False)]
        threads = [threading.Thread(target=client, args=(i,)) for i in range(len(prompts))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
    assert got == want


def test_async_iteration(model):
    import asyncio
    prompts = _prompts(5, 211, seed=8)
    want = [_solo(model, p, 6) for p in prompts]

    async def main(engine):
        async def one(p):
            return [e.token async for e in engine.submit(p, 6, temperature=0,
                                                          stop_at_eos=False)]
        return await asyncio.gather(*(one(p) for p in prompts))
    with BatchEngine(model, slots=3) as engine:
        got = asyncio.run(main(engine))
    assert got == want


def test_llama_model_batched_equals_generate():
    m = _llama()
    prompts = _prompts(8, 97, seed=9)
    want = [m.generate(np.asarray(p)[None], 10, temperature=0)[0, len(p):].tolist()
            for p in prompts]
    with BatchEngine(m, slots=4) as engine:
        reqs = [engine.submit(p, 10, temperature=0, stop_at_eos=False) for p in prompts]
        got = [r.result(timeout=60) for r in reqs]
    assert got == want


def test_prefill_is_chunked_between_decode_steps(model):
    """A long prompt arriving mid-stream does not stall a running stream for its whole
    prefill: the running request gets tokens between the new prompt's chunks."""
    long_prompt = _prompts(1, 211, seed=10, lo=60, hi=61)[0]
    with BatchEngine(model, slots=2, prefill_chunk=8) as engine:
        running = engine.submit([1, 2, 3], 40, temperature=0, stop_at_eos=False)
        it = iter(running)
        next(it)
        before = engine.stats()["prefill_chunks"]
        newcomer = engine.submit(long_prompt, 2, temperature=0, stop_at_eos=False)
        newcomer.result(timeout=60)
        chunks = engine.stats()["prefill_chunks"] - before
        assert chunks == 8     # 60 tokens in chunks of 8
        # the stream kept going while the newcomer was prefilled
        assert running.tokens and len(running.tokens) >= chunks - 1
        running.result(timeout=60)


def test_bad_arguments(model):
    with pytest.raises(ValueError, match="slots"):
        BatchEngine(model, slots=33)
    with pytest.raises(ValueError, match="slots"):
        BatchEngine(model, slots=0)
    with BatchEngine(model, slots=1) as engine:
        with pytest.raises(ValueError, match="tokenizer"):
            engine.submit([1], 2, stop="x")
        with pytest.raises(TypeError, match="seed"):
            engine.submit([1], 2, seed=[1, 2])


def test_load_in_thread_runs_elsewhere_and_passes_back_result_and_errors():
    import threading

    from gpt2s.engine import load_in_thread
    caller = threading.current_thread()
    seen = {}

    def work(a, b=0):
        seen["thread"] = threading.current_thread()
        return a + b

    assert load_in_thread(work, 2, b=3) == 5
    assert seen["thread"] is not caller and not seen["thread"].is_alive()

    def fail():
        raise FileNotFoundError("no such checkpoint: x")

    with pytest.raises(FileNotFoundError, match="no such checkpoint: x"):
        load_in_thread(fail)
