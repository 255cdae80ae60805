"""Generation controls: ragged batches (prompts of different lengths, each row as it would be
alone), the repetition / presence / frequency penalties against a NumPy float64 reference of
their definitions (transformers' RepetitionPenaltyLogitsProcessor, OpenAI's presence and
frequency penalties), min_new_tokens, the logits-processor hook and text-level stop strings."""

import warnings

import numpy as np
import pytest

import gpt2s
from gpt2s import GPT2, GPT2Config
from gpt2s.generation import generate_stream, stream_text
from test_generate import scaled_model

V, NCTX = 512, 48
LOWEST = np.finfo(np.float32).min


@pytest.fixture(scope="module")
def model():
    return scaled_model(GPT2Config(n_layer=3, n_head=4, n_embd=64, vocab_size=V, n_ctx=NCTX))


@pytest.fixture(scope="module")
def text_model():
    # the GPT-2 vocabulary, with varied greedy text (scaled weights)
    return scaled_model(GPT2Config.preset("tiny", n_ctx=64), seed=2)


def ragged(lengths, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, V, n) for n in lengths]


def alone(m, prompt, n, **kw):
    return m.generate(np.asarray(prompt)[None], n, **kw)[0]


# ------------------------------------------------------------------ ragged batches

def test_ragged_greedy_with_every_kernel_parallel(model, every_kernel_parallel):
    gpt2s.set_num_threads(2)
    ps = ragged((3, 20, 9), seed=16)
    out = model.generate(ps, 8, temperature=0)
    for p, row in zip(ps, out):
        np.testing.assert_array_equal(row, alone(model, p, 8, temperature=0))


@pytest.mark.parametrize("dtype", ["bfloat16", "int8"])
def test_ragged_low_precision_weights(model, dtype):
    """The packed embedding's per-row positions (low-precision weights widen wte's rows)."""
    low = model.to_dtype(dtype)
    ps = ragged((4, 15, 9), seed=17)
    out = low.generate(ps, 8, temperature=0)
    for p, row in zip(ps, out):
        np.testing.assert_array_equal(row, alone(low, p, 8, temperature=0))


@pytest.mark.parametrize("lengths,n_new", [((3, 11, 7), 12),      # within the context
                                           ((5, 30, 44), 40),     # rows slide at other steps
                                           ((2, 1), 5)])
def test_ragged_greedy_rows_equal_each_prompt_alone(model, lengths, n_new):
    ps = ragged(lengths, seed=len(lengths) + n_new)
    out = model.generate(ps, n_new, temperature=0)
    assert isinstance(out, list) and len(out) == len(ps)
    for p, row in zip(ps, out):
        assert row.dtype == np.int64
        np.testing.assert_array_equal(row, alone(model, p, n_new, temperature=0))


def test_ragged_seeded_sampling_with_a_seed_per_row(model):
    ps = ragged((4, 13, 8), seed=3)
    kw = dict(temperature=1.1, top_k=60, top_p=0.95)
    seeds = [5, 6, 7]
    out = model.generate(ps, 20, seed=seeds, **kw)
    for p, s, row in zip(ps, seeds, out):
        np.testing.assert_array_equal(row, alone(model, p, 20, seed=s, **kw))
    # Generators work as seeds too, and rows with the same prompt differ by their seed
    same = model.generate([ps[0], ps[0], ps[1]], 20, seed=[np.random.default_rng(5), 9, 6], **kw)
    np.testing.assert_array_equal(same[0], out[0])
    np.testing.assert_array_equal(same[2], out[1])
    assert not np.array_equal(same[0], same[1])


def test_seed_per_row_on_a_rectangular_batch(model):
    idx = np.random.default_rng(4).integers(0, V, (3, 6))
    out = model.generate(idx, 15, temperature=0.9, seed=[1, 2, 3])
    assert out.shape == (3, 21)
    for b in range(3):
        np.testing.assert_array_equal(out[b], alone(model, idx[b], 15, temperature=0.9,
                                                    seed=b + 1))


def test_ragged_num_samples_rows_follow_their_prompt(model):
    ps = ragged((3, 9), seed=5)
    seeds = [10, 11, 12, 13]
    out = model.generate(ps, 10, temperature=1.0, seed=seeds, num_samples=2)
    assert len(out) == 4
    for r, row in enumerate(out):
        np.testing.assert_array_equal(row, alone(model, ps[r // 2], 10, temperature=1.0,
                                                 seed=seeds[r]))


def test_ragged_stop_at_eos_and_context_stop(model):
    ps = ragged((4, 12, 30), seed=6)
    solo = [alone(model, p, 30, temperature=0) for p in ps]
    eos = int(solo[1][len(ps[1]) + 3])   # a token row 1 makes by its 4th new token
    first = solo[1][len(ps[1]):].tolist().index(eos)
    out = model.generate(ps, 30, temperature=0, stop_at_eos=True, eos_token_id=eos)
    for p, row in zip(ps, out):
        np.testing.assert_array_equal(
            row, alone(model, p, 30, temperature=0, stop_at_eos=True, eos_token_id=eos))
    assert len(out[1]) == len(ps[1]) + first + 1 and out[1][-1] == eos
    # context_full="stop": each row ends at n_ctx positions, as it does alone
    with pytest.warns(RuntimeWarning, match="row 2: generation stopped after 18 of 30"):
        out = model.generate(ps, 30, temperature=0, context_full="stop")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        for p, row in zip(ps, out):
            np.testing.assert_array_equal(row, alone(model, p, 30, temperature=0,
                                                     context_full="stop"))
    assert [len(r) for r in out] == [34, 42, NCTX]


def test_ragged_stream_yields_each_step_with_stopped_rows_padded(model):
    ps = ragged((6, 2, 10), seed=7)
    eos = 3
    steps = np.array(list(generate_stream(model, ps, 12, temperature=0, stop_at_eos=True,
                                          eos_token_id=eos, repetition_penalty=1.3)))
    rows = model.generate(ps, 12, temperature=0, stop_at_eos=True, eos_token_id=eos,
                          repetition_penalty=1.3)
    for r, (p, row) in enumerate(zip(ps, rows)):
        new = row[len(p):]
        np.testing.assert_array_equal(steps[:len(new), r], new)
        assert (steps[len(new):, r] == eos).all()


def test_ragged_text_batch_equals_each_prompt_alone(text_model):
    prompts = ["Hi", "The quick brown fox jumps", "A tale of"]
    got = text_model.generate_text(prompts, 12, temperature=0)
    assert got == [text_model.generate_text(p, 12, temperature=0) for p in prompts]
    got = text_model.generate_text(prompts, 12, temperature=0.8, seed=[1, 2, 3])
    assert got == [text_model.generate_text(p, 12, temperature=0.8, seed=s)
                   for p, s in zip(prompts, (1, 2, 3))]


def test_forward_cached_per_row_positions(model):
    ps = ragged((7, 3), seed=8)
    want, caches = [], []
    for p in ps:
        c = model.kv_cache(1, 12)
        model.forward_cached(p[None], 0, c)
        want.append(model.forward_cached([[5]], len(p), c)[0])
        caches.append(c)
    both = model.kv_cache(2, 12)
    for b, c in enumerate(caches):
        both.keys[:, b], both.values[:, b] = c.keys[:, 0], c.values[:, 0]
    got = model.forward_cached([[5], [5]], np.array([7, 3]), both)
    for b in range(2):
        np.testing.assert_allclose(got[b], want[b], rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match=r"pos0 must be an integer or one per row \(2,\)"):
        model.forward_cached([[5], [5]], np.array([1, 2, 3]), both)
    with pytest.raises(ValueError, match="pos0 must be >= 0, got -1 for row 1"):
        model.forward_cached([[5], [5]], np.array([1, -1]), both)
    with pytest.raises(ValueError, match="position 12 is beyond the KV cache's 12"):
        model.forward_cached([[5], [5]], np.array([1, 12]), both)


def test_ragged_bad_rows_are_named(model):
    with pytest.raises(ValueError, match=rf"idx\[1\] contains token id {V}"):
        model.generate([[1, 2], [3, V, 4]], 2)
    with pytest.raises(ValueError, match="seed has 2 entries for 3 rows"):
        model.generate([[1], [2, 3], [4]], 2, seed=[1, 2])


# ------------------------------------------------------------------ penalties

def reference_penalties(logits, prompt, new, repetition, presence, frequency):
    """NumPy float64 from the definitions: transformers' repetition penalty over every token of
    the sequence (prompt and new), then OpenAI's mu_j - c_j * frequency - (c_j > 0) * presence
    with c_j the count of j among the new tokens."""
    x = logits.astype(np.float64)
    seen = np.unique(np.concatenate([prompt, new]).astype(np.int64))
    s = x[seen]
    x[seen] = np.where(s < 0, s * repetition, s / repetition)
    c = np.bincount(np.asarray(new, np.int64), minlength=x.size).astype(np.float64)
    return x - c * frequency - (c > 0) * presence


@pytest.mark.parametrize("rep,pres,freq", [(1.3, 0.0, 0.0), (1.0, 0.7, 0.0),
                                           (1.0, 0.0, 0.4), (0.8, -0.5, 1.1)])
def test_penalties_against_the_numpy_reference(model, rep, pres, freq):
    prompt = ragged((6,), seed=9)[0]
    seen_logits = []

    def record(ids, logits):
        seen_logits.append((ids[0].copy(), logits[0].copy()))

    n_new = 25
    out = alone(model, prompt, n_new, temperature=0, repetition_penalty=rep,
                presence_penalty=pres, frequency_penalty=freq, logits_processor=record)
    assert len(seen_logits) == n_new
    for step, (ids, got) in enumerate(seen_logits):
        np.testing.assert_array_equal(ids, out[:len(prompt) + step])
        raw = model.forward(ids)[0][0, -1]
        want = reference_penalties(raw, prompt, ids[len(prompt):], rep, pres, freq)
        np.testing.assert_allclose(got, want, rtol=2e-4, atol=2e-4 * np.abs(want).max())
        # greedy picks the reference's argmax (the scaled model has clear gaps)
        top2 = np.sort(want)[-2:]
        assert (top2[1] - top2[0]) > 1e-3 * abs(top2[1])
        assert out[len(prompt) + step] == np.argmax(want)
    if rep != 1.0 or pres or freq:
        assert not np.array_equal(out, alone(model, prompt, n_new, temperature=0))


def test_penalties_apply_to_sampling_rows_independently(model):
    ps = ragged((5, 9), seed=10)
    kw = dict(temperature=1.0, repetition_penalty=1.4, frequency_penalty=0.3)
    out = model.generate(ps, 15, seed=[3, 4], **kw)
    for p, s, row in zip(ps, (3, 4), out):
        np.testing.assert_array_equal(row, alone(model, p, 15, seed=s, **kw))


def test_penalties_never_overflow_into_the_kernels(model):
    """A penalty that takes a logit past float32's range (here a token made twice under a
    frequency penalty of -2e38: +4e38) is clipped to the largest float32, so the sampling
    kernels still see finite logits: the token made first keeps being drawn."""
    out = alone(model, [1, 2, 3], 6, temperature=1.0, seed=1, frequency_penalty=-2e38)
    assert out[3:].tolist() == [out[3]] * 6


def test_neutral_controls_change_nothing(model):
    idx = np.random.default_rng(11).integers(0, V, (2, 5))
    neutral = dict(repetition_penalty=1.0, presence_penalty=0.0, frequency_penalty=0.0,
                   min_new_tokens=0, logits_processor=None)
    for kw in (dict(temperature=0), dict(temperature=0.9, top_k=40, seed=3)):
        np.testing.assert_array_equal(model.generate(idx, 12, **kw, **neutral),
                                      model.generate(idx, 12, **kw))


# ------------------------------------------------------------------ min_new_tokens

def test_min_new_tokens_suppresses_eos(model):
    prompt = ragged((5,), seed=12)[0]
    free = alone(model, prompt, 10, temperature=0)
    eos = int(free[5])   # greedy's first new token
    assert len(alone(model, prompt, 10, temperature=0, stop_at_eos=True,
                     eos_token_id=eos)) == 6
    seen = []
    out = alone(model, prompt, 10, temperature=0, stop_at_eos=True, eos_token_id=eos,
                min_new_tokens=4, logits_processor=lambda ids, x: seen.append(x[0, eos]))
    assert eos not in out[5:9].tolist()
    assert seen[:4] == [LOWEST] * 4 and seen[4] != LOWEST
    # the reference: greedy over the full forward with eos masked for 4 steps
    seq = list(prompt)
    for step in range(10):
        x = model.forward(seq)[0][0, -1].astype(np.float64)
        if step < 4:
            x[eos] = -np.inf
        seq.append(int(np.argmax(x)))
        if seq[-1] == eos:
            break
    np.testing.assert_array_equal(out, seq)


# ------------------------------------------------------------------ logits processor

def test_logits_processor_in_place_or_returned(model):
    prompt = ragged((4,), seed=13)[0]
    free = alone(model, prompt, 8, temperature=0)
    banned = sorted(set(free[4:].tolist()))

    def ban_in_place(ids, logits):
        logits[:, banned] = -np.inf

    def ban_returned(ids, logits):
        out = logits.copy()
        out[:, banned] = -np.inf
        return out
    a = alone(model, prompt, 8, temperature=0, logits_processor=ban_in_place)
    b = alone(model, prompt, 8, temperature=0, logits_processor=ban_returned)
    np.testing.assert_array_equal(a, b)
    assert not set(a[4:].tolist()) & set(banned)
    # before sampling: forcing one token makes every sample that token
    force = alone(model, prompt, 6, temperature=1.5, seed=0,
                  logits_processor=lambda ids, x: np.where(np.arange(V) == 17, x, -np.inf))
    assert force[4:].tolist() == [17] * 6


def test_logits_processor_sees_read_only_histories(model):
    ps = ragged((3, 6), seed=14)
    lengths = []

    def check(ids, logits):
        assert logits.shape == (2, V) and logits.dtype == np.float32
        lengths.append([len(i) for i in ids])
        with pytest.raises(ValueError):
            ids[0][0] = 1
    model.generate(ps, 4, temperature=0, logits_processor=check)
    assert lengths == [[3, 6], [4, 7], [5, 8], [6, 9]]


@pytest.mark.parametrize("fn,match", [
    (lambda ids, x: x[:, :10], r"returned shape \(1, 10\), expected \(1, 512\)"),
    (lambda ids, x: np.full_like(x, np.nan), "NaN or \\+inf"),
    (lambda ids, x: np.full_like(x, -np.inf), "banned every token of row 0"),
])
def test_logits_processor_errors(model, fn, match):
    with pytest.raises(ValueError, match=match):
        model.generate([1, 2], 3, temperature=0, logits_processor=fn)


@pytest.mark.parametrize("kwargs,exc,match", [
    (dict(repetition_penalty=0), ValueError, "repetition_penalty must be > 0"),
    (dict(repetition_penalty="2"), TypeError, "repetition_penalty must be a number"),
    (dict(presence_penalty=float("nan")), ValueError, "presence_penalty must be a finite"),
    (dict(frequency_penalty=None), TypeError, "frequency_penalty must be a number"),
    (dict(min_new_tokens=-1), ValueError, "min_new_tokens must be >= 0"),
    (dict(logits_processor=3), TypeError, "logits_processor must be a callable"),
    (dict(seed=[1, -2]), ValueError, "seed must be a non-negative integer, got -2"),
])
def test_bad_control_arguments(model, kwargs, exc, match):
    with pytest.raises(exc, match=match):
        model.generate([1, 2], 3, **kwargs)


# ------------------------------------------------------------------ stop strings

def pieces_of(text_model, prompt, n):
    """The greedy continuation's text and the text of each of its tokens."""
    from gpt2s import get_tokenizer
    enc = get_tokenizer()
    toks = text_model.generate(np.array(enc.encode(prompt)), n, temperature=0)[0]
    new = toks[len(enc.encode(prompt)):].tolist()
    return enc.decode(new), [enc.decode([t]) for t in new]


def test_stop_string_across_a_token_boundary(text_model):
    prompt = "Once upon a time"
    full, pieces = pieces_of(text_model, prompt, 30)
    assert text_model.generate_text(prompt, 30, temperature=0, stop_at_eos=False) == full
    # a stop string made of the end of one token and the start of the next
    for i in range(3, len(pieces) - 1):
        a, b = pieces[i], pieces[i + 1]
        if len(a) >= 2 and len(b) >= 2 and a.isprintable() and b.isprintable():
            stop = a[-2:] + b[:2]
            if full.find(stop) == sum(map(len, pieces[:i + 1])) - 2:
                break
    else:
        pytest.fail("no token boundary to test in the continuation")
    want = full[:full.find(stop)]
    kw = dict(temperature=0, stop_at_eos=False)
    assert text_model.generate_text(prompt, 30, stop=stop, **kw) == want
    # streaming shows exactly that text: nothing of the stop string, even for a moment
    streamed = list(stream_text(text_model, prompt, 30, stop=stop, **kw))
    assert "".join(streamed) == want
    # several stop strings: the first occurrence of any ends the text; one that never
    # occurs changes nothing
    assert text_model.generate_text(prompt, 30, stop=["\x00never", stop], **kw) == want
    assert text_model.generate_text(prompt, 30, stop="\x00never", **kw) == full
    # the start of a stop string that does not go on is held back, then shown
    assert "".join(stream_text(text_model, prompt, 30, stop=stop[:2] + "\x00", **kw)) == full
    # min_new_tokens: an occurrence that ends within the first tokens does not count
    ends_in = i + 2     # the stop string ends in new token number i + 2
    later = text_model.generate_text(prompt, 30, stop=stop, min_new_tokens=ends_in + 1, **kw)
    again = full.find(stop, full.find(stop) + 1)
    assert later == (full[:again] if again >= 0 else full)
    assert text_model.generate_text(prompt, 30, stop=stop, min_new_tokens=ends_in, **kw) == want


def test_stop_strings_per_row_of_a_batch(text_model):
    prompts = ["Once upon a time", "Hi"]
    kw = dict(temperature=0, stop_at_eos=False)
    fulls = text_model.generate_text(prompts, 20, **kw)
    stop = fulls[0][5:8]
    got = text_model.generate_text(prompts, 20, stop=stop, **kw)
    assert got == [f[:f.find(stop)] if stop in f else f for f in fulls]
    assert got == [text_model.generate_text(p, 20, stop=stop, **kw) for p in prompts]


def test_stop_string_holds_back_only_a_possible_start(text_model):
    """A streamed piece is held back only while it may be the start of a stop string."""
    prompt = "Once upon a time"
    full, pieces = pieces_of(text_model, prompt, 12)
    streamed = list(stream_text(text_model, prompt, 12, temperature=0, stop_at_eos=False,
                                stop="\x00" + "z" * 40))
    assert "".join(streamed) == full and len(streamed) >= len([p for p in pieces if p]) - 1


# ------------------------------------------------------------------ the kernels' per-row positions

@pytest.mark.parametrize("parallel", [False, True])
def test_kernels_with_row_positions_equal_one_row_calls(parallel, request):
    """embedding_forward, kv_cache_write and attention_forward with row_pos give, row by row,
    exactly (bit for bit) what a one-row call with pos0 = row_pos[b] gives (on one thread
    and with every kernel on its parallel path)."""
    from gpt2s import _core
    if parallel:
        request.getfixturevalue("every_kernel_parallel")
        gpt2s.set_num_threads(2)
    rng = np.random.default_rng(15)
    B, T, C, NH, n_ctx, Vs = 3, 2, 16, 2, 12, 20
    row_pos = np.array([0, 7, 3], np.int64)
    wte = rng.standard_normal((Vs, C)).astype(np.float32)
    wpe = rng.standard_normal((n_ctx, C)).astype(np.float32)
    idx = rng.integers(0, Vs, B * T)
    emb = np.empty((B * T, C), np.float32)
    _core.embedding_forward(emb, idx, wte, wpe, T, 0, row_pos)
    for b in range(B):
        for t in range(T):
            np.testing.assert_array_equal(emb[b * T + t], wte[idx[b * T + t]] +
                                          wpe[row_pos[b] + t])
    qkv = rng.standard_normal((B, T, 3 * C)).astype(np.float32)
    keys = rng.standard_normal((B, n_ctx, C)).astype(np.float32)
    values = rng.standard_normal((B, n_ctx, C)).astype(np.float32)
    k1, v1 = keys.copy(), values.copy()
    _core.kv_cache_write(keys, values, qkv, 0, row_pos=row_pos)
    out = np.empty((B, T, C), np.float32)
    _core.attention_forward(out, np.empty((0, 0, 0), np.float32), qkv, 0, keys, 0, values, 0,
                            0, NH, 0.25, row_pos=row_pos)
    for b in range(B):
        kb, vb = k1[b:b + 1].copy(), v1[b:b + 1].copy()
        _core.kv_cache_write(kb, vb, qkv[b:b + 1], int(row_pos[b]))
        np.testing.assert_array_equal(keys[b], kb[0])
        np.testing.assert_array_equal(values[b], vb[0])
        ob = np.empty((1, T, C), np.float32)
        _core.attention_forward(ob, np.empty((0, 0, 0), np.float32), qkv[b:b + 1], 0, kb, 0,
                                vb, 0, int(row_pos[b]), NH, 0.25)
        np.testing.assert_array_equal(out[b], ob[0])
    with pytest.raises(ValueError, match=r"row_pos\[1\] = 11: need 0 <= row_pos and "
                                         r"row_pos \+ T <= 12"):
        _core.kv_cache_write(keys, values, qkv, 0, row_pos=np.array([0, 11, 0], np.int64))
    with pytest.raises(ValueError, match="row_pos has 2 entries for 3 rows"):
        _core.attention_forward(out, np.empty((0, 0, 0), np.float32), qkv, 0, keys, 0, values,
                                0, 0, NH, 0.25, row_pos=np.array([0, 1], np.int64))
    with pytest.raises(ValueError, match=r"row_pos\[0\] = -1"):
        _core.embedding_forward(emb, idx, wte, wpe, T, 0, np.array([-1, 0, 0], np.int64))


# ------------------------------------------------------------------ the command line

def cli(capsys, *args):
    from gpt2s.generate import main
    status = main(list(args))
    out, err = capsys.readouterr()
    return status, out, err


def test_cli_controls_match_the_api(capsys):
    demo = GPT2.from_pretrained("demo")
    prompt = "Hello, my name is"
    full = demo.generate_text(prompt, 30, temperature=0)
    stop = full[4:7]
    status, out, err = cli(capsys, prompt, "--model", "demo", "-n", "30", "--temperature", "0",
                           "--stop", "\x00never", "--stop", stop, "--no-echo")
    assert status == 0, err
    assert out == full[:full.find(stop)] + "\n"
    kw = dict(repetition_penalty=1.5, presence_penalty=0.5, frequency_penalty=0.25,
              min_new_tokens=5)
    status, out, err = cli(capsys, prompt, "--model", "demo", "-n", "20", "--seed", "3",
                           "--repetition-penalty", "1.5", "--presence-penalty", "0.5",
                           "--frequency-penalty", "0.25", "--min-new-tokens", "5")
    assert status == 0, err
    want = demo.generate_text(prompt, 20, seed=np.random.default_rng(3), **kw)
    assert out == prompt + want + "\n"
    assert want != demo.generate_text(prompt, 20, seed=np.random.default_rng(3))


@pytest.mark.parametrize("args,message", [
    (["--repetition-penalty", "0"], "--repetition-penalty must be > 0"),
    (["--presence-penalty", "nan"], "--presence-penalty must be a finite number"),
    (["--min-new-tokens", "-2"], "--min-new-tokens must be >= 0, got -2"),
    (["--stop", ""], "--stop contains an empty string"),
    (["-n", "1000000000000"], "--max-new-tokens must leave room in memory for the token ids"),
])
def test_cli_bad_controls(capsys, args, message):
    status, out, err = cli(capsys, "Hi", "--model", "demo", *args)
    assert status == 2 and out == "" and message in err and "Traceback" not in err
