"""Generation: the KV-cache decoding loop against full recomputation (our forward and
transformers' GPT2LMHeadModel), seeds, batches, num_samples, <|endoftext|>, the context
window, the streaming and text forms, and the argument checks."""

import warnings

import numpy as np
import pytest

from conftest import assert_chi_square
from ref import rel_err
import gpt2s
from gpt2s import GPT2, GPT2Config
from gpt2s.generation import generate, generate_stream, generate_text, stream_text

V, NCTX = 512, 48


def scaled_model(config, seed=0):
    """A random model with its embeddings scaled by 5 and its other weights by 10, so that
    greedy decoding wanders over many tokens with clear top-2 logit gaps (GPT-2's 0.02 init
    gives near-flat logits and repetitive greedy output)."""
    m = GPT2.from_config(config, seed=seed)
    for name, p in m.params.items():
        if p.ndim == 2:
            p *= np.float32(5.0 if name in ("wte.weight", "wpe.weight") else 10.0)
    return m


@pytest.fixture(scope="module")
def model():
    return scaled_model(GPT2Config(n_layer=3, n_head=4, n_embd=64, vocab_size=V, n_ctx=NCTX))


@pytest.fixture(scope="module")
def text_model():
    # the GPT-2 vocabulary, for the text helpers
    return GPT2.from_config(GPT2Config.preset("tiny", n_ctx=64), seed=1)


def prompts(B, T, seed=0, vocab=V):
    return np.random.default_rng(seed).integers(0, vocab, (B, T))


def full_recompute_greedy(m, idx, n_new):
    """Greedy decoding by running forward on the whole window every step, with the sliding
    rule of generation.py: once the sequence passes n_ctx, keep its last n_ctx - n_ctx // 2
    tokens."""
    n_ctx = m.config.n_ctx
    keep = n_ctx - n_ctx // 2
    seq = np.array(idx, np.int64)
    start, gaps = 0, []
    for _ in range(n_new):
        logits, _ = m.forward(seq[:, start:])
        last = logits[:, -1].astype(np.float64)
        top2 = np.sort(last, axis=1)[:, -2:]
        gaps.append(np.min((top2[:, 1] - top2[:, 0]) / np.abs(top2[:, 1])))
        seq = np.concatenate([seq, last.argmax(1)[:, None]], axis=1)
        if seq.shape[1] - start > n_ctx:
            start = seq.shape[1] - keep
    return seq, min(gaps)


# ------------------------------------------------------------------ the KV cache

def test_cached_logits_equal_full_forward_at_every_position(model):
    B, T = 3, NCTX
    idx = prompts(B, T, seed=1)
    full, _ = model.forward(idx)
    kv = model.kv_cache(B)
    # prefill 5 positions, then one position at a time up to the end of the context
    got = model.forward_cached(idx[:, :5], 0, kv)
    assert rel_err(got, full[:, 4]) < 1e-5
    for t in range(5, T):
        got = model.forward_cached(idx[:, t:t + 1], t, kv)
        assert got.shape == (B, V)
        assert rel_err(got, full[:, t]) < 1e-5, t
        for b in range(B):
            assert rel_err(got[b], full[b, t]) < 1e-5, (t, b)
    # chunks of several positions after a prefill
    got = model.forward_cached(idx[:, :11], 0, kv)
    assert rel_err(got, full[:, 10]) < 1e-5
    got = model.forward_cached(idx[:, 11:30], 11, kv)
    assert rel_err(got, full[:, 29]) < 1e-5
    with pytest.raises(ValueError, match="n_ctx"):
        model.forward_cached(idx[:, :2], T - 1, kv)


def test_greedy_kv_cache_equals_full_recompute(model):
    idx = prompts(2, 9, seed=2)
    ref, gap = full_recompute_greedy(model, idx, 30)
    assert gap > 1e-4, "the test model has near-tied logits; the comparison would be moot"
    assert len(set(ref[0, 9:].tolist())) > 5, "greedy decoding of the test model is degenerate"
    out = model.generate(idx, 30, temperature=0)
    assert out.dtype == np.int64 and out.shape == (2, 39)
    np.testing.assert_array_equal(out, ref)
    np.testing.assert_array_equal(out[:, :9], idx)


def test_greedy_equals_transformers_argmax(tmp_path):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_layer=3, n_head=4, n_embd=64, n_positions=NCTX, vocab_size=V,
                                  bos_token_id=0, eos_token_id=0)
    hf = transformers.GPT2LMHeadModel(cfg).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if p.dim() == 2:
                p.mul_(5.0)   # clear top-2 gaps, varied continuations (see scaled_model)
    hf.save_pretrained(tmp_path)
    m = GPT2.from_safetensors(tmp_path)
    assert m.config.n_ctx == NCTX and m.config.vocab_size == V

    idx = prompts(2, 8, seed=0)
    n_new = 35
    seq, gaps = torch.tensor(idx), []
    with torch.no_grad():
        for _ in range(n_new):
            last = hf(seq).logits[:, -1].double()
            top2 = last.topk(2).values
            gaps.append(((top2[:, 0] - top2[:, 1]) / top2[:, 0].abs()).min().item())
            seq = torch.cat([seq, last.argmax(-1, keepdim=True)], dim=1)
        hf_logits = hf(seq).logits.numpy()
    expected = seq.numpy()
    assert min(gaps) > 1e-4
    assert len(set(expected[0, 8:].tolist())) > 5
    np.testing.assert_array_equal(m.generate(idx, n_new, temperature=0), expected)
    # and the logits along the way, from the cache, match transformers'
    kv = m.kv_cache(2)
    m.forward_cached(expected[:, :8], 0, kv)
    for t in range(8, expected.shape[1]):
        got = m.forward_cached(expected[:, t:t + 1], t, kv)
        assert rel_err(got, hf_logits[:, t]) < 1e-5, t


def test_sliding_window_past_n_ctx_equals_full_recompute(model):
    idx = prompts(2, 20, seed=3)
    n_new = 2 * NCTX + 7   # slides several times
    ref, gap = full_recompute_greedy(model, idx, n_new)
    assert gap > 1e-5
    out = model.generate(idx, n_new, temperature=0)
    assert out.shape == (2, 20 + n_new)
    np.testing.assert_array_equal(out, ref)
    # a prompt that fills the context exactly
    idx = prompts(1, NCTX, seed=4)
    ref, _ = full_recompute_greedy(model, idx, 10)
    np.testing.assert_array_equal(model.generate(idx, 10, temperature=0), ref)


def test_context_full_stop(model):
    idx = prompts(1, NCTX - 5, seed=5)
    with pytest.warns(RuntimeWarning, match=r"stopped after 5 of 20 new tokens.*n_ctx=48"):
        out = model.generate(idx, 20, temperature=0, context_full="stop")
    assert out.shape == (1, NCTX)   # never longer than the context: forward accepts it
    np.testing.assert_array_equal(out, model.generate(idx, 5, temperature=0))
    model.forward(out)
    with pytest.warns(RuntimeWarning, match="stopped after 0 of 3"):
        out = model.generate(prompts(1, NCTX), 3, temperature=0, context_full="stop")
    assert out.shape == (1, NCTX)
    with warnings.catch_warnings():
        warnings.simplefilter("error")   # no warning when it fits
        model.generate(idx, 5, temperature=0, context_full="stop")


def test_cache_is_reused_across_batch_sizes(model):
    a = model.generate(prompts(2, 6, seed=6), 12, temperature=0)
    b = model.generate(prompts(1, 6, seed=7), 12, temperature=0)
    c = model.generate(prompts(3, 6, seed=8), 12, temperature=0)
    fresh = scaled_model(model.config)
    np.testing.assert_array_equal(a, fresh.generate(prompts(2, 6, seed=6), 12, temperature=0))
    np.testing.assert_array_equal(b, fresh.generate(prompts(1, 6, seed=7), 12, temperature=0))
    np.testing.assert_array_equal(c, fresh.generate(prompts(3, 6, seed=8), 12, temperature=0))


def test_batch_rows_equal_single_prompts(model):
    idx = prompts(3, 7, seed=9)
    batch = model.generate(idx, 15, temperature=0)
    for b in range(3):
        np.testing.assert_array_equal(batch[b], model.generate(idx[b], 15, temperature=0)[0])


# ------------------------------------------------------------------ sampling and seeds

def test_same_seed_same_tokens_different_seeds_differ(model):
    idx = prompts(2, 5, seed=10)
    kw = dict(temperature=1.3, top_k=100, top_p=0.95)
    a = model.generate(idx, 25, seed=123, **kw)
    b = model.generate(idx, 25, seed=123, **kw)
    np.testing.assert_array_equal(a, b)
    c = model.generate(idx, 25, seed=124, **kw)
    assert not np.array_equal(a, c)
    np.testing.assert_array_equal(a[:, :5], c[:, :5])
    # a Generator continues its own stream: two calls differ, and match a fresh one
    g = np.random.default_rng(5)
    first, second = model.generate(idx, 10, seed=g, **kw), model.generate(idx, 10, seed=g, **kw)
    assert not np.array_equal(first, second)
    np.testing.assert_array_equal(first, model.generate(idx, 10, seed=5, **kw))
    # the rows of a batch are sampled independently
    same = model.generate(np.repeat(idx[:1], 4, axis=0), 25, seed=1, **kw)
    assert len({tuple(r) for r in same.tolist()}) == 4


def test_sampled_tokens_respect_top_k_and_top_p(model):
    idx = prompts(2, 6, seed=11)
    for kw in (dict(top_k=3), dict(top_p=0.5), dict(top_k=20, top_p=0.7, temperature=2.0)):
        out = model.generate(idx, 20, seed=0, **kw)
        for t in range(6, out.shape[1]):
            logits, _ = model.forward(out[:, :t])
            last = logits[:, -1].astype(np.float64) / kw.get("temperature", 1.0)
            for b in range(2):
                order = np.argsort(-last[b])
                allowed = order[:kw.get("top_k", V)]
                if "top_p" in kw:
                    p = np.exp(last[b, allowed] - last[b, allowed].max())
                    p /= p.sum()
                    m = int(np.searchsorted(np.cumsum(p), kw["top_p"])) + 1
                    allowed = allowed[:m]
                assert out[b, t] in allowed, (kw, t, b)


def test_degenerate_filters_are_greedy(model):
    idx = prompts(2, 6, seed=12)
    greedy = model.generate(idx, 15, temperature=0)
    np.testing.assert_array_equal(model.generate(idx, 15, top_k=1, seed=3), greedy)
    np.testing.assert_array_equal(model.generate(idx, 15, top_p=1e-6, seed=4), greedy)
    np.testing.assert_array_equal(model.generate(idx, 15, temperature=1e-6, seed=5), greedy)
    # temperature 0 ignores seeds and filters
    np.testing.assert_array_equal(
        model.generate(idx, 15, temperature=0, top_k=7, top_p=0.3, seed=9), greedy)


def test_sampling_follows_the_model_distribution(model):
    """First sampled token over many rows of the same prompt: chi-square against softmax of
    the full-forward logits at temperature 0.8 with top-k 8."""
    n = 4000
    idx = prompts(1, 10, seed=13)
    logits, _ = model.forward(idx)
    x = logits[0, -1].astype(np.float64) / 0.8
    top = np.argsort(-x)[:8]
    p = np.exp(x[top] - x[top].max())
    p /= p.sum()
    first = model.generate(idx, 1, temperature=0.8, top_k=8, seed=0, num_samples=n)[:, -1]
    assert set(first.tolist()) <= set(top.tolist())
    counts = np.array([(first == t).sum() for t in top])
    assert counts.sum() == n
    assert_chi_square(counts, p)


# ------------------------------------------------------------------ batches and num_samples

def test_num_samples(model):
    idx = prompts(2, 6, seed=14)
    out = model.generate(idx, 12, temperature=0.9, seed=2, num_samples=3)
    assert out.shape == (6, 18)
    # prompt b's samples are rows 3b .. 3b + 2
    np.testing.assert_array_equal(out[:, :6], np.repeat(idx, 3, axis=0))
    assert len({tuple(r) for r in out[:3].tolist()}) == 3
    # the same as decoding the repeated prompts as a batch (prefill once, cache copied)
    rep = model.generate(np.repeat(idx, 3, axis=0), 12, temperature=0.9, seed=2)
    np.testing.assert_array_equal(out, rep)
    # greedy samples are all the same continuation
    g = model.generate(idx, 12, temperature=0, num_samples=2)
    np.testing.assert_array_equal(g, np.repeat(model.generate(idx, 12, temperature=0), 2, axis=0))
    one = model.generate(idx[0], 5, seed=1, num_samples=4)
    assert one.shape == (4, 11)


def test_stop_at_eos(model):
    idx = prompts(3, 6, seed=15)
    free = model.generate(idx, 30, temperature=0)
    new = free[:, 6:]
    # the most common generated token of row 0 plays <|endoftext|>
    eos = int(np.bincount(new[0]).argmax())
    out = model.generate(idx, 30, temperature=0, stop_at_eos=True, eos_token_id=eos)
    first = [int(np.flatnonzero(r == eos)[0]) if (r == eos).any() else None for r in new]
    # row 0 meets its eos, another row never does: the batch runs to the end for that row
    assert first[0] is not None and None in first
    assert out.shape[1] == 36
    # a batch whose every row meets eos ends right after the last of them
    done = model.generate(idx[:1], 30, temperature=0, stop_at_eos=True, eos_token_id=eos)
    np.testing.assert_array_equal(done, free[:1, :6 + first[0] + 1])
    for b, f in enumerate(first):
        if f is None:
            np.testing.assert_array_equal(out[b], free[b, :out.shape[1]])
        else:
            np.testing.assert_array_equal(out[b, :6 + f + 1], free[b, :6 + f + 1])
            assert np.all(out[b, 6 + f:] == eos)  # padded with eos after it
    # stream: stops after the eos of a single prompt
    toks = list(model.generate_stream(idx[0], 30, temperature=0, stop_at_eos=True,
                                      eos_token_id=eos))
    assert toks == new[0, :first[0] + 1].tolist()


# ------------------------------------------------------------------ streaming and text

def test_generate_stream(model):
    idx = prompts(2, 5, seed=16)
    full = model.generate(idx, 10, seed=8, top_k=50)
    steps = list(model.generate_stream(idx, 10, seed=8, top_k=50))
    assert len(steps) == 10 and all(s.shape == (2,) for s in steps)
    np.testing.assert_array_equal(np.stack(steps, axis=1), full[:, 5:])
    # a 1-D prompt streams plain ints
    toks = list(generate_stream(model, idx[0], 10, seed=8, top_k=50))
    assert all(type(t) is int for t in toks)
    assert toks == model.generate(idx[0], 10, seed=8, top_k=50)[0, 5:].tolist()
    # arguments are checked at the call, not at the first next()
    with pytest.raises(ValueError, match="top_p"):
        model.generate_stream(idx, 5, top_p=2.0)
    assert list(model.generate_stream(idx, 0)) == []


def test_interleaved_streams_on_one_model(model):
    """Each stream owns its KV cache: another stream run to the end between two steps of the
    first leaves the first one's tokens unchanged."""
    idx = prompts(1, 5, seed=18)
    other = prompts(1, 7, seed=20)
    expected = model.generate(idx, 6, temperature=0)
    expected_other = model.generate(other, 6, temperature=0)
    first = model.generate_stream(idx, 6, temperature=0)
    toks = [next(first)]
    second = list(model.generate_stream(other, 6, temperature=0))
    np.testing.assert_array_equal(np.stack(second, 1), expected_other[:, 7:])
    toks += list(first)
    np.testing.assert_array_equal(np.stack(toks, 1), expected[:, 5:])
    # forward between the steps of a stream does not disturb it
    stream = model.generate_stream(idx, 6, temperature=0)
    toks = [next(stream)]
    model.forward(prompts(2, 9, seed=19))
    toks += list(stream)
    np.testing.assert_array_equal(np.stack(toks, 1), expected[:, 5:])


def test_generate_text(text_model):
    enc = gpt2s.get_tokenizer()
    prompt = "The quick brown fox"
    ids = enc.encode(prompt)
    text = text_model.generate_text(prompt, 12, seed=3, stop_at_eos=False)
    assert isinstance(text, str)
    toks = text_model.generate(ids, 12, seed=3)[0, len(ids):].tolist()
    assert text == enc.decode(toks)
    assert "".join(stream_text(text_model, prompt, 12, seed=3, stop_at_eos=False)) == text
    # a batch of prompts of the same token length, and num_samples
    batch = ["Hello there", "Good night"]
    assert len({len(enc.encode(p)) for p in batch}) == 1
    texts = generate_text(text_model, batch, 6, temperature=0)
    assert isinstance(texts, list) and len(texts) == 2
    assert texts[0] == text_model.generate_text(batch[0], 6, temperature=0)
    many = text_model.generate_text(prompt, 6, seed=1, num_samples=3)
    assert isinstance(many, list) and len(many) == 3
    nested = text_model.generate_text(batch, 4, seed=1, num_samples=2)
    assert [len(x) for x in nested] == [2, 2]
    # <|endoftext|> is GPT-2's separator in a prompt
    assert isinstance(text_model.generate_text("<|endoftext|>", 3, seed=0), str)


def test_generate_text_stops_at_endoftext():
    # a model whose every prediction is <|endoftext|>: its text continuation is empty
    m = GPT2.from_config(GPT2Config.preset("tiny", n_ctx=32), seed=0)
    m.params["wte.weight"][50256] *= 500.0
    assert m.generate_text("Hi", 5, temperature=0) == ""
    assert m.generate_text("Hi", 3, temperature=0, stop_at_eos=False) == "<|endoftext|>" * 3


def test_padded_vocabulary_never_yields_undecodable_ids():
    # vocabularies padded past the tokenizer's 50257 (llm.c uses 50304): the text helpers
    # never sample the padding ids
    m = GPT2.from_config(GPT2Config.preset("tiny", n_ctx=32, vocab_size=50304), seed=0)
    m.params["wte.weight"][50257:] *= 500.0   # the padding would win every argmax
    ids = gpt2s.get_tokenizer().encode("Hi")
    assert np.all(m.generate(ids, 4, temperature=0)[0, 2:] >= 50257)
    text = m.generate_text("Hi", 4, temperature=0)
    assert isinstance(text, str)
    text = m.generate_text("Hi", 4, seed=0, stop_at_eos=False)
    assert isinstance(text, str)


# ------------------------------------------------------------------ argument checks

@pytest.mark.parametrize("kwargs, exc, match", [
    (dict(max_new_tokens=-1), ValueError, "max_new_tokens.*-1"),
    (dict(max_new_tokens=2.5), TypeError, "max_new_tokens"),
    (dict(top_p=0.0), ValueError, r"top_p.*\(0, 1\].*0\.0"),
    (dict(top_p=1.5), ValueError, "top_p.*1.5"),
    (dict(top_p=float("nan")), ValueError, "top_p"),
    (dict(top_k=0), ValueError, "top_k.*0"),
    (dict(top_k=-2), ValueError, "top_k.*-2"),
    (dict(top_k=2.0), TypeError, "top_k"),
    (dict(temperature=-0.5), ValueError, "temperature.*-0.5"),
    (dict(temperature=float("inf")), ValueError, "temperature"),
    (dict(seed=-1), ValueError, "seed.*-1"),
    (dict(seed="x"), TypeError, "seed"),
    (dict(num_samples=0), ValueError, "num_samples.*0"),
    (dict(context_full="wrap"), ValueError, "context_full.*wrap"),
    (dict(stop_at_eos=True, eos_token_id=-3), ValueError, "eos_token_id.*-3"),
])
def test_bad_arguments(model, kwargs, exc, match):
    kw = dict(max_new_tokens=3)
    kw.update(kwargs)
    n = kw.pop("max_new_tokens")
    with pytest.raises(exc, match=match):
        model.generate(prompts(1, 4), n, **kw)
    with pytest.raises(exc, match=match):
        model.generate_stream(prompts(1, 4), n, **kw)


def test_bad_prompts(model, text_model):
    with pytest.raises(ValueError, match=f"T={NCTX + 1}.*n_ctx={NCTX}"):
        model.generate(prompts(1, NCTX + 1), 1)
    with pytest.raises(ValueError, match="empty"):
        model.generate(np.zeros((1, 0), np.int64), 1)
    with pytest.raises(ValueError, match=f"token id {V}"):
        model.generate([[1, 2, V]], 1)
    with pytest.raises(TypeError, match="integer"):
        model.generate([0.5, 1.0], 1)
    with pytest.raises(ValueError, match="empty"):
        text_model.generate_text("", 5)
    with pytest.raises(ValueError, match="empty"):
        text_model.generate_text(["a", ""], 5)
    long_prompt = "hello" + " hello" * 69
    with pytest.raises(ValueError, match="70 tokens.*n_ctx=64"):
        text_model.generate_text(long_prompt, 5)
    with pytest.raises(TypeError, match="prompt"):
        text_model.generate_text(42, 5)
    with pytest.raises(ValueError, match=f"token id 15496.*vocabulary of {V}"):
        model.generate_text("Hello", 5)   # a model without the GPT-2 vocabulary


def test_zero_new_tokens_and_input_untouched(model):
    idx = prompts(2, 5, seed=17)
    keep = idx.copy()
    out = model.generate(idx, 0)
    np.testing.assert_array_equal(out, idx)
    assert out is not idx
    model.generate(idx, 5, seed=0, num_samples=2)
    np.testing.assert_array_equal(idx, keep)
