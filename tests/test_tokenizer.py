"""gpt2s.get_tokenizer() against an independent byte-level BPE written here: GPT-2's original
pre-tokenisation regex (OpenAI's encoder.py) and lowest-rank-first pair merging over the same
ranks file, on Shakespeare, unicode, whitespace runs, numbers, contractions and random text."""

import base64
import functools
import hashlib
import shutil
from pathlib import Path

import numpy as np
import pytest
import regex   # a dependency of tiktoken, so always there: no reason to skip the file

import gpt2s
from gpt2s import tokenizer as tok_mod

DATA = Path(__file__).parent / "data"
# the pattern of OpenAI's GPT-2 encoder.py (tiktoken uses an equivalent, faster spelling)
GPT2_ORIGINAL_PATTERN = regex.compile(
    r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+""")


class ReferenceBPE:
    """Byte-level BPE: split with the regex, then in each piece repeatedly merge the adjacent
    pair whose concatenation has the lowest rank, until no pair is a token."""

    def __init__(self, ranks_file):
        self.ranks = {}
        for line in Path(ranks_file).read_text("ascii").splitlines():
            token, rank = line.split()
            self.ranks[base64.b64decode(token)] = int(rank)
        self.decoder = {r: t for t, r in self.ranks.items()}

    @functools.lru_cache(maxsize=None)
    def encode_piece(self, piece: bytes) -> tuple:
        parts = [piece[i:i + 1] for i in range(len(piece))]
        while len(parts) > 1:
            best, best_rank = None, None
            for i in range(len(parts) - 1):
                r = self.ranks.get(parts[i] + parts[i + 1])
                if r is not None and (best_rank is None or r < best_rank):
                    best, best_rank = i, r
            if best is None:
                break
            parts[best:best + 2] = [parts[best] + parts[best + 1]]
        return tuple(self.ranks[p] for p in parts)

    def encode(self, text: str) -> list:
        out = []
        for m in GPT2_ORIGINAL_PATTERN.finditer(text):
            out.extend(self.encode_piece(m.group().encode("utf-8")))
        return out

    def decode(self, ids) -> str:
        return b"".join(self.decoder[i] for i in ids).decode("utf-8", errors="replace")


@pytest.fixture(scope="module")
def enc():
    return gpt2s.get_tokenizer()


@pytest.fixture(scope="module")
def ref():
    return ReferenceBPE(tok_mod.RANKS_PATH)


SAMPLES = [
    # known GPT-2 ids
    "Hello world",
    # contractions, in and out of the regex's special cases
    "I'm sure they'll say we've done it, don't you? She'd've known. It's JOHN'S, 'tis O'Neil's",
    "'s 't 're 've 'm 'll 'd 'S 'T 'RE 'LL '' ' '' 'x",
    # numbers
    "1 12 123 1234 12345 3.14159 1,000,000 -42 +7 0x1F 1e-9 2024-11-25 ½ ² ٣ 一二三",
    # whitespace runs, tabs, newlines, leading and trailing blanks
    "a  b   c    d\t\te\n\nf\n\n\n\ng \n h\r\nend   ",
    "   leading", "trailing   ", " ", "  ", "\n", "\n\n\n", "\t", " \t \n ", "x\u00a0y\u2003z",
    # unicode: accents (composed and combining), CJK, RTL, emoji with joiners, symbols
    "naïve café résumé — “quotes” ‘single’ … Ünïcödé",
    "e\u0301 a\u0308 n\u0303",
    "日本語のテキストと中文文本，한국어 텍스트",
    "مرحبا بالعالم שלום עולם",
    "👩‍👩‍👧‍👦 🏳️‍🌈 👍🏽 🤖🚀 ∑∫√∞ ≠ ≤ ≥ ← → ∀x∈ℝ",
    "Ελληνικά, русский текст, ქართული",
    # code and markup
    "def f(x):\n    return x**2  # square\n\n\tprint(f'{x!r}')\n",
    "<html><body class=\"a-b\">&amp; &lt;tag&gt;</body></html>",
    "!!!??? ... --- *** ___ ### $$$ %%% ^^^ &&& ((( ))) [[[ ]]] {{{ }}}",
]


@pytest.mark.parametrize("text", SAMPLES)
def test_matches_reference_bpe(enc, ref, text):
    ids = enc.encode(text)
    assert ids == ref.encode(text)
    assert enc.decode(ids) == text


def test_known_ids(enc):
    assert enc.encode("Hello world") == [15496, 995]
    assert enc.encode(" the") == [262]
    assert enc.encode("\n") == [198]
    assert enc.decode([15496, 11, 995, 0]) == "Hello, world!"


def test_shakespeare_corpus(enc, ref):
    text = (DATA / "tinyshakespeare_excerpt.txt").read_text("utf-8")
    assert len(text) > 30000
    ids = enc.encode(text)
    assert ids == ref.encode(text)
    assert enc.decode(ids) == text
    # per line as well (a different split of the whitespace)
    for line in text.splitlines(keepends=True)[:400]:
        assert enc.encode(line) == ref.encode(line)


def test_random_strings(enc, ref):
    rng = np.random.default_rng(0)
    alphabet = list("abcXYZ019 '\t\n.,!?-_") + ["  ", "\n\n", "'s", "'ll", "é", "ß", "ñ", "中",
                                                 "文", "😀", "👍🏽", "\u200d", "\u0301", "٣",
                                                 "½", "\u00a0", "\r\n", "'re", "'VE"]
    for _ in range(300):
        n = int(rng.integers(1, 40))
        text = "".join(alphabet[i] for i in rng.integers(0, len(alphabet), n))
        assert enc.encode(text) == ref.encode(text), repr(text)
        assert enc.decode(enc.encode(text)) == text
    # random code points from several planes (no surrogates)
    for _ in range(100):
        cps = rng.integers(0x20, 0x2FFFF, 12)
        text = "".join(chr(c) for c in cps if not 0xD800 <= c <= 0xDFFF)
        assert enc.encode(text) == ref.encode(text), repr(text)


def test_arbitrary_bytes_round_trip(enc, ref):
    # every single byte is a token, so any token sequence decodes (invalid UTF-8 is replaced)
    rng = np.random.default_rng(1)
    ids = rng.integers(0, 50256, 200).tolist()
    assert enc.decode(ids) == ref.decode(ids)
    assert enc.decode_bytes(ids) == b"".join(ref.decoder[i] for i in ids)


def test_identical_to_tiktokens_gpt2_definition(enc):
    openai_public = pytest.importorskip("tiktoken_ext.openai_public")
    assert enc.name == "gpt2"
    assert enc._pat_str == openai_public.r50k_pat_str
    assert enc._special_tokens == {"<|endoftext|>": 50256}
    assert enc.n_vocab == 50257
    assert enc.eot_token == 50256
    assert enc.max_token_value == 50256
    ranks = tok_mod.load_ranks()
    assert len(ranks) == 50256 and sorted(ranks.values()) == list(range(50256))
    assert all(bytes([b]) in ranks for b in range(256))


def test_special_token(enc):
    assert enc.encode("<|endoftext|>", allowed_special="all") == [50256]
    assert enc.encode("a<|endoftext|>b", allowed_special={"<|endoftext|>"}) == [64, 50256, 65]
    with pytest.raises(ValueError):
        enc.encode("<|endoftext|>")  # tiktoken's default: special text is refused
    assert enc.encode("<|endoftext|>", disallowed_special=()) == \
        enc.encode("<|endoftext|>", allowed_special=set(), disallowed_special=())
    assert enc.decode([50256]) == "<|endoftext|>"


def test_cached_and_exported(enc):
    assert gpt2s.get_tokenizer() is enc
    assert "get_tokenizer" in gpt2s.__all__


def test_bundled_ranks_file_checksum():
    data = tok_mod.RANKS_PATH.read_bytes()
    assert hashlib.sha256(data).hexdigest() == tok_mod.RANKS_SHA256 == \
        "306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930"


def test_corrupt_ranks_file_is_refused(tmp_path):
    bad = tmp_path / "gpt2.tiktoken"
    shutil.copy(tok_mod.RANKS_PATH, bad)
    data = bytearray(bad.read_bytes())
    data[100] ^= 1
    bad.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="sha256"):
        tok_mod.load_ranks(bad)
    with pytest.raises(FileNotFoundError, match="missing"):
        tok_mod.load_ranks(tmp_path / "nope.tiktoken")
    # without the checksum the parse still validates lines
    (tmp_path / "junk.tiktoken").write_bytes(b"IQ== 0\nnot-base64!! x\n")
    with pytest.raises(ValueError, match="junk.tiktoken:2"):
        tok_mod.load_ranks(tmp_path / "junk.tiktoken", expected_sha256=None)
