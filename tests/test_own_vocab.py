"""A model with a vocabulary of its own, from the text to the samples: python -m gpt2s.prepare
--tokenizer char / --train-tokenizer N writes the shards and records the vocabulary, train
takes it (and refuses another by name), generate and eval use it, and text generation stops
at the vocabulary's own end-of-text token.

References are independent of gpt2s's tokenizing: the character ids are the index in the
sorted character set (nanoGPT's shakespeare_char), the BPE ids are what Hugging Face
tokenizers encodes from the saved tokenizer.json.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
EXCERPT = ROOT / "tests" / "data" / "tinyshakespeare_excerpt.txt"
HELDOUT = ROOT / "tests" / "data" / "tinyshakespeare_heldout.txt"


def _data_files():
    if not EXCERPT.is_file() or not HELDOUT.is_file():
        pytest.skip("tests/data not present")


def _shard(path) -> list[int]:
    """The tokens of an llm.c shard, read without gpt2s: 256 int32 header words, uint16 ids."""
    raw = Path(path).read_bytes()
    header = np.frombuffer(raw[:1024], "<i4")
    assert header[0] == 20240520 and header[1] == 1
    tokens = np.frombuffer(raw[1024:], "<u2")
    assert len(tokens) == header[2]
    return tokens.tolist()


def test_character_level_prepare_train_generate_eval(tmp_path, capsys):
    _data_files()
    from gpt2s import GPT2, eval as gpt2s_eval, generate, prepare, train
    from gpt2s.eval import evaluate
    text = EXCERPT.read_text(encoding="utf-8")
    chars = sorted(set(text))
    data = tmp_path / "data"
    assert prepare.main([str(EXCERPT), "--out", str(data), "--tokenizer", "char",
                         "--val-fraction", "0.1", "--workers", "2", "-q"]) == 0
    manifest = json.loads((data / "prepare.json").read_text())
    assert manifest["vocabulary"] == "char" and manifest["vocab_size"] == len(chars)
    assert list(json.loads((data / "vocab.json").read_text())["chars"]) == chars
    ids = [chars.index(c) for c in text]
    train_ids, val_ids = _shard(data / "train_000000.bin"), _shard(data / "val_000000.bin")
    assert train_ids + val_ids == ids and len(val_ids) == len(ids) // 10

    # train takes the shards' vocabulary (no --tokenizer needed) and saves it with the model
    out = tmp_path / "run"
    assert train.main([str(data / "train_*.bin"), "--val-data", str(data / "val_*.bin"),
                       "--init", "tiny", "--steps", "30", "--batch-size", "4", "--seq-len", "64",
                       "--lr", "3e-3", "--eval-batches", "2", "--out", str(out), "--no-plot",
                       "--quiet"]) == 0
    capsys.readouterr()
    m = GPT2.from_safetensors(out)
    assert m.config.vocab_size == len(chars)
    assert list(json.loads((out / "vocab.json").read_text())["chars"]) == chars

    # generate: the model's own greedy tokens, decoded with its characters
    assert generate.main(["ROMEO:", "--model", str(out), "-n", "30", "--temperature", "0",
                          "--no-echo"]) == 0
    sample = capsys.readouterr().out
    prompt = np.array([[chars.index(c) for c in "ROMEO:"]])
    want = "".join(chars[i] for i in m.generate(prompt, 30, temperature=0)[0, 6:])
    assert sample == want + "\n"

    # eval on the validation shard: the model's loss on those ids
    assert gpt2s_eval.main(["--model", str(out), "--json", "-q", "--seq-len", "64",
                            "--stride", "64", str(data / "val_000000.bin")]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["loss"] == pytest.approx(evaluate(m, val_ids, 64, 64)["loss"], rel=1e-6)
    assert result["loss"] < np.log(len(chars))       # it learned something in 30 steps

    # refusals by name: GPT-2's tokenizer for char shards, char for GPT-2 shards, a --model
    assert train.main([str(data / "train_*.bin"), "--tokenizer", "gpt2", "--init", "tiny",
                       "--steps", "1", "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert f"{data / 'train_000000.bin'}: token ids of char ({len(chars)} characters)" in err
    assert "not of --tokenizer gpt2" in err
    assert train.main([str(data / "train_*.bin"), "--model", str(out), "--steps", "1",
                       "--out", str(tmp_path / "x")]) == 2
    assert "not --model's" in capsys.readouterr().err
    gpt2_data = tmp_path / "gpt2data"
    assert prepare.main([str(EXCERPT), "--out", str(gpt2_data), "--workers", "1", "-q"]) == 0
    assert json.loads((gpt2_data / "prepare.json").read_text())["vocabulary"] == "gpt2"
    assert not (gpt2_data / "vocab.json").exists()
    assert train.main([str(gpt2_data / "train_*.bin"), "--tokenizer", "char", "--init", "tiny",
                       "--steps", "1", "--out", str(tmp_path / "x")]) == 2
    assert "GPT-2's tokens (its prepare.json), not --tokenizer char's" in \
        capsys.readouterr().err
    # eval refuses shards of another vocabulary than the model's
    assert gpt2s_eval.main(["--model", str(out), "-q", str(gpt2_data / "train_000000.bin")]) == 2
    err = capsys.readouterr().err
    assert f"{gpt2_data / 'train_000000.bin'}: token ids of gpt2 (its prepare.json), not of " \
        f"the model's (char ({len(chars)} characters))" in err, err
    # shards of two vocabularies together
    assert train.main([str(data / "train_*.bin"), str(gpt2_data / "train_*.bin"), "--init",
                       "tiny", "--steps", "1", "--out", str(tmp_path / "x")]) == 2
    assert "token files of different vocabularies" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
    # a character outside a given vocabulary: prepare with char of other text still works,
    # and --overwrite with GPT-2's tokens removes the old vocab.json
    assert prepare.main([str(EXCERPT), "--out", str(data), "--overwrite", "-q"]) == 0
    assert not (data / "vocab.json").exists()
    assert json.loads((data / "prepare.json").read_text())["vocabulary"] == "gpt2"


def test_prepare_train_tokenizer_then_train_and_generate(tmp_path, capsys):
    _data_files()
    tokenizers = pytest.importorskip("tokenizers",
                                     reason="--train-tokenizer needs the tokenizers package")
    from gpt2s import GPT2, generate, prepare, train
    data = tmp_path / "data"
    assert prepare.main([str(EXCERPT), str(HELDOUT), "--out", str(data), "--train-tokenizer",
                         "400", "--workers", "2", "-q"]) == 0
    tk = tokenizers.Tokenizer.from_file(str(data / "tokenizer.json"))
    assert tk.get_vocab_size() == 400
    eot = tk.token_to_id("<|endoftext|>")
    assert eot is not None
    manifest = json.loads((data / "prepare.json").read_text())
    assert manifest["vocabulary"] == "tokenizers" and manifest["vocab_size"] == 400
    # the files' tokens joined by the tokenizer's own end-of-text token
    want = (tk.encode(EXCERPT.read_text(encoding="utf-8"), add_special_tokens=False).ids
            + [eot] + tk.encode(HELDOUT.read_text(encoding="utf-8"),
                                add_special_tokens=False).ids)
    assert _shard(data / "train_000000.bin") == want

    out = tmp_path / "run"
    assert train.main([str(data / "train_*.bin"), "--tokenizer", str(data / "tokenizer.json"),
                       "--init", "tiny", "--steps", "10", "--batch-size", "2", "--seq-len", "32",
                       "--eval-batches", "1", "--out", str(out), "--no-plot", "--quiet"]) == 0
    capsys.readouterr()
    m = GPT2.from_safetensors(out)
    assert m.config.vocab_size == 400
    prompt = "ROMEO:"
    assert generate.main([prompt, "--model", str(out), "-n", "12", "--temperature", "0",
                          "--ignore-eos"]) == 0
    ids = tk.encode(prompt, add_special_tokens=False).ids
    new = m.generate([ids], 12, temperature=0)[0, len(ids):].tolist()
    assert capsys.readouterr().out == tk.decode(ids + new, skip_special_tokens=False) + "\n"

    # another tokenizer.json than the shards' is refused, naming the shard
    other = tmp_path / "other"
    assert prepare.main([str(HELDOUT), "--out", str(other), "--train-tokenizer", "300",
                         "-q"]) == 0
    assert train.main([str(data / "train_*.bin"), "--tokenizer", str(other / "tokenizer.json"),
                       "--init", "tiny", "--steps", "1", "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert f"{data / 'train_000000.bin'}: token ids of a tokenizer.json of 400 tokens" in err
    assert train.main([str(data / "train_*.bin"), "--tokenizer", "char", "--init", "tiny",
                       "--steps", "1", "--out", str(tmp_path / "x")]) == 2
    assert "not of --tokenizer char" in capsys.readouterr().err
    # bad values are named
    assert prepare.main([str(EXCERPT), "--out", str(tmp_path / "y"), "--train-tokenizer",
                         "100"]) == 2
    assert "--train-tokenizer 100: must be in [257, 65536]" in capsys.readouterr().err
    assert not (tmp_path / "y").exists()
    assert prepare.main([str(EXCERPT), "--out", str(tmp_path / "y"), "--tokenizer",
                         str(EXCERPT)]) == 2
    assert f"{EXCERPT}: not a tokenizers tokenizer.json" in capsys.readouterr().err


def test_prepare_train_tokenizer_without_the_package_is_one_line(tmp_path, capsys,
                                                                  monkeypatch):
    _data_files()
    import sys

    from gpt2s import prepare
    monkeypatch.setitem(sys.modules, "tokenizers", None)     # import tokenizers fails
    assert prepare.main([str(EXCERPT), "--out", str(tmp_path / "d"), "--train-tokenizer",
                         "300"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "needs the tokenizers package" in err, err
    assert not (tmp_path / "d").exists()


def test_generation_stops_at_the_vocabularys_own_end_of_text():
    _data_files()
    tokenizers = pytest.importorskip("tokenizers")
    from gpt2s import GPT2, GPT2Config
    from gpt2s.generation import stream_text
    from gpt2s.vocab import CharTokenizer, FileTokenizer
    tk = tokenizers.Tokenizer(tokenizers.models.BPE())
    tk.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = tokenizers.decoders.ByteLevel()
    # </s> as the end-of-text token, at an id that is not GPT-2's 50256
    tk.train([str(EXCERPT)], tokenizers.trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<pad>", "</s>"], show_progress=False,
        initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet()))
    enc = FileTokenizer(tk.to_str())
    eos = tk.token_to_id("</s>")
    assert enc.eot_id == eos == 1
    a, b = tk.token_to_id("a"), tk.token_to_id("b")
    m = GPT2.from_config(GPT2Config.preset("tiny", vocab_size=300), seed=0)
    script = [a, b, eos, a, a, a, a, a]

    def force(token_ids, logits):      # the model makes a, b, </s>, a, a, ...
        step = len(token_ids[0]) - 1
        logits[:] = -np.inf
        logits[:, script[step]] = 0.0
    assert m.generate_text("x", 8, temperature=0, tokenizer=enc,
                           logits_processor=force) == "ab"
    # stream_text is the generate command's path (its tokens and text pieces)
    assert "".join(stream_text(m, "x", 8, temperature=0, tokenizer=enc,
                               logits_processor=force)) == "ab"
    assert m.generate_text("x", 8, temperature=0, tokenizer=enc, stop_at_eos=False,
                           logits_processor=force) == "ab</s>aaaaa"
    # with a stop string too (the other path through the text rows)
    assert m.generate_text("x", 8, temperature=0, tokenizer=enc, stop="zz",
                           logits_processor=force) == "ab"

    # a character vocabulary has no end-of-text token: nothing stops it early
    chars = CharTokenizer("abx")
    mc = GPT2.from_config(GPT2Config.preset("tiny", vocab_size=3), seed=0)

    def force_c(token_ids, logits):
        logits[:] = -np.inf
        logits[:, len(token_ids[0]) % 2] = 0.0
    assert mc.generate_text("x", 4, temperature=0, tokenizer=chars, min_new_tokens=2,
                            logits_processor=force_c) == "baba"


def test_a_character_vocabulary_is_padded_with_its_own_ids():
    """A finished row of a batch is padded with a token of the model's vocabulary: a
    character vocabulary has no end token, and GPT-2's 50256 (the place-holder) is no id of a
    62-token model (the penalties' per-token tables are indexed with every step's tokens)."""
    import string
    import warnings

    from gpt2s import GPT2Config
    from gpt2s.generation import generate_stream, generate_text
    from gpt2s.vocab import CharTokenizer
    from test_generate import scaled_model
    enc = CharTokenizer("".join(sorted(set(string.ascii_letters + " \n.,:;!?-'"))))
    m = scaled_model(GPT2Config(n_layer=2, n_head=2, n_embd=32, vocab_size=enc.n_vocab,
                                n_ctx=32), seed=3)
    kw = dict(temperature=0, tokenizer=enc, repetition_penalty=1.3, min_new_tokens=1)
    solo = generate_text(m, "ab", 12, **kw)
    stop = solo[2:4]
    assert len(solo) == 12 and stop not in solo[:3]
    # row 0 ends at its stop string, row 1 goes on: each as it is alone
    prompts = ["ab", "To be", "or"]
    got = generate_text(m, prompts, 12, stop=stop, **kw)
    assert got == [generate_text(m, p, 12, stop=stop, **kw) for p in prompts]
    assert got[0] == solo[:2]
    # a ragged batch whose rows stop at the context: the stream's pads are ids of the model
    ids = [np.array(enc.encode(p)) for p in ("ab", "To be or not to be")]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        steps = np.array(list(generate_stream(m, ids, 30, temperature=0, context_full="stop",
                                              frequency_penalty=0.5)))
        rows = m.generate(ids, 30, temperature=0, context_full="stop", frequency_penalty=0.5)
    assert steps.shape == (32 - 2, 2) and 0 <= steps.min() and steps.max() < enc.n_vocab
    for r, (p, row) in enumerate(zip(ids, rows)):
        np.testing.assert_array_equal(steps[:len(row) - len(p), r], row[len(p):])


def test_unconditional_generation_starts_from_the_vocabularys_own_separator(tmp_path, capsys):
    """Without a PROMPT, generate starts from the model vocabulary's document separator (here
    a tokenizer.json's </s>, the token training puts between documents), not from the text
    "<|endoftext|>" encoded with that vocabulary."""
    _data_files()
    tokenizers = pytest.importorskip("tokenizers")
    from gpt2s import GPT2, GPT2Config, generate
    from gpt2s.vocab import FileTokenizer
    tk = tokenizers.Tokenizer(tokenizers.models.BPE())
    tk.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = tokenizers.decoders.ByteLevel()
    tk.train([str(EXCERPT)], tokenizers.trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<pad>", "</s>"], show_progress=False,
        initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet()))
    sep = tk.token_to_id("</s>")
    m = GPT2.from_config(GPT2Config.preset("tiny", vocab_size=300, n_ctx=64), seed=5)
    m.save_safetensors(tmp_path / "bpe")
    FileTokenizer(tk.to_str()).save(tmp_path / "bpe" / "vocab.json")
    assert generate.main(["--model", str(tmp_path / "bpe"), "-n", "12", "--temperature", "0",
                          "--ignore-eos", "-v"]) == 0
    out, err = capsys.readouterr()
    assert "prompt: 1 token\n" in err
    want = m.generate(np.array([[sep]]), 12, temperature=0)[0, 1:].tolist()
    assert out == tk.decode(want, skip_special_tokens=False) + "\n"


def test_unconditional_generation_of_a_llama_checkpoint_starts_from_its_bos(tmp_path, capsys):
    torch = pytest.importorskip("torch")
    from llama_ckpt import save_hf
    from gpt2s import generate
    hf, tk = save_hf(tmp_path / "llama", "llama", seed=4, bos_token_id=1, eos_token_id=2)
    assert tk.id_to_token(1) == "<|im_start|>"
    assert generate.main(["--model", str(tmp_path / "llama"), "-n", "10", "--temperature", "0",
                          "--ignore-eos"]) == 0
    out = capsys.readouterr().out
    ids = torch.tensor([[1]])
    with torch.no_grad():                            # transformers' greedy tokens from BOS
        for _ in range(10):
            ids = torch.cat([ids, hf(ids).logits[:, -1].argmax(-1, keepdim=True)], 1)
    assert out == tk.decode(ids[0, 1:].tolist(), skip_special_tokens=False) + "\n"


def test_a_hugging_face_gpt2_checkpoint_keeps_gpt2s_tokenizer(tmp_path, capsys):
    """`hf download openai-community/gpt2` puts Hugging Face's own vocab.json (token -> id)
    and merges.txt beside the weights: that is GPT-2's vocabulary, not a gpt2s one, so
    generate and eval read the model with GPT-2's tokenizer (they used to refuse the file)."""
    from gpt2s import GPT2, GPT2Config
    from gpt2s.eval import main as eval_main
    from gpt2s.generate import main as generate_main
    from gpt2s.tokenizer import get_tokenizer
    from gpt2s.vocab import model_vocab, tokenizer_for

    enc = get_tokenizer()
    d = tmp_path / "gpt2"
    m = GPT2.from_config(GPT2Config.preset("tiny"), seed=0)
    m.save_safetensors(d)
    # the shape of Hugging Face's files: every token's text -> its id, and the merges
    (d / "vocab.json").write_text(json.dumps({f"t{i}": i for i in range(enc.n_vocab)}))
    (d / "merges.txt").write_text("#version: 0.2\nt0 t1\n")
    assert model_vocab(d) is None
    assert tokenizer_for(d, m.config) is enc
    capsys.readouterr()
    assert generate_main(["--model", str(d), "-n", "4", "--temperature", "0", "Hello"]) == 0
    out = capsys.readouterr().out
    ids = enc.encode("Hello")
    want = m.generate(np.array([ids]), 4, temperature=0)[0, len(ids):]
    assert out == "Hello" + enc.decode(list(want)) + "\n"
    text = tmp_path / "t.txt"
    text.write_text("Hello there, a short text to score. " * 8)
    assert eval_main(["--model", str(d), "--json", "-q", str(text)]) == 0
    assert json.loads(capsys.readouterr().out)["tokens"] > 0
    # a broken gpt2s vocabulary is still refused, naming the file
    (d / "vocab.json").write_text(json.dumps({"format": "gpt2s-vocab", "type": "char"}))
    with pytest.raises(ValueError, match="vocab.json"):
        model_vocab(d)


def test_hugging_face_vocab_with_a_format_token_is_gpt2s(tmp_path):
    """GPT-2's own vocab.json has the word "format" as a token (an id): it is still a
    Hugging Face vocabulary (GPT-2's), not a broken gpt2s one."""
    from gpt2s.vocab import model_vocab
    (tmp_path / "vocab.json").write_text('{"!": 0, "format": 18982, "the": 1169}')
    assert model_vocab(tmp_path) is None
