"""Vocabularies other than GPT-2's: a model trained with its own (``python -m gpt2s.train
--tokenizer char``, nanoGPT's character-level Shakespeare) keeps it in ``vocab.json`` beside
its ``model.safetensors``, and generate and eval use it from there.

A model without ``vocab.json`` uses the GPT-2 tokenizer, and only when its vocabulary holds
GPT-2's 50,257 tokens: a smaller one was not trained on GPT-2's tokens, so decoding it with
them would print nonsense; it is refused instead.

``CharTokenizer`` has the part of ``tiktoken.Encoding``'s interface that gpt2s's text
functions use (``encode``, ``encode_ordinary``, ``decode``, ``decode_single_token_bytes``,
``decode_with_offsets``, ``n_vocab``), so it can be passed wherever a ``tokenizer=`` is taken.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from .fs import atomic_write

__all__ = ["CharTokenizer", "FileTokenizer", "VOCAB_FILE", "TOKENIZER_FILE", "load_vocab",
           "model_vocab", "tokenizer_for", "start_token", "check_data_ids", "VocabError"]

VOCAB_FILE = "vocab.json"
FORMAT = "gpt2s-vocab"


class VocabError(ValueError):
    """A vocabulary file gpt2s cannot use, or text it cannot encode (the message says which)."""


class CharTokenizer:
    """One token per character: the sorted distinct characters of the training text, as
    nanoGPT's shakespeare_char prepares them.  It has no end-of-text token."""

    name = "char"
    eot_id = None

    def __init__(self, chars: str):
        if not isinstance(chars, str) or not chars:
            raise VocabError("a character vocabulary needs at least one character")
        if len(set(chars)) != len(chars):
            raise VocabError("a character vocabulary lists a character twice")
        self.chars = chars
        self._ids = {c: i for i, c in enumerate(chars)}

    @classmethod
    def from_text(cls, text: str) -> "CharTokenizer":
        return cls("".join(sorted(set(text))))

    @property
    def n_vocab(self) -> int:
        return len(self.chars)

    def encode_ordinary(self, text: str) -> list[int]:
        ids = self._ids
        try:
            return [ids[c] for c in text]
        except KeyError:
            bad = next(c for c in text if c not in ids)
            raise VocabError(f"the text has {bad!r} (at offset {text.index(bad)}), which is not "
                             f"in the model's character vocabulary of {self.n_vocab}") from None

    def encode(self, text: str, allowed_special=(), disallowed_special=()) -> list[int]:
        return self.encode_ordinary(text)

    def decode(self, ids, errors: str = "replace") -> str:
        chars = self.chars
        return "".join(chars[i] if 0 <= i < len(chars) else "\ufffd" for i in map(int, ids))

    def decode_single_token_bytes(self, token: int) -> bytes:
        return self.decode([token]).encode("utf-8")

    def decode_with_offsets(self, ids) -> tuple[str, list[int]]:
        return self.decode(ids), list(range(len(ids)))

    def to_dict(self) -> dict:
        return {"format": FORMAT, "type": "char", "chars": self.chars}

    def save(self, path) -> Path:
        """Write the vocabulary as JSON (all-or-nothing: fs.atomic_write)."""
        text = (json.dumps(self.to_dict(), ensure_ascii=True) + "\n").encode()
        atomic_write(Path(path), lambda f: f.write(text))
        return Path(path)

    def __eq__(self, other):
        return isinstance(other, CharTokenizer) and other.chars == self.chars

    def __repr__(self):
        return f"CharTokenizer(n_vocab={self.n_vocab})"


def _byte_decoder() -> dict:
    """GPT-2's byte-level alphabet (the printable character standing for each byte, as
    byte-level BPE tokenizers spell their tokens) back to the bytes."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("\xa1"), ord("\xac") + 1)) \
        + list(range(ord("\xae"), ord("\xff") + 1))
    table, n = {}, 0
    for b in range(256):
        if b in keep:
            table[chr(b)] = b
        else:
            table[chr(256 + n)] = b
            n += 1
    return table


class FileTokenizer:
    """A Hugging Face ``tokenizers`` tokenizer (a tokenizer.json, e.g. a byte-level BPE trained
    on your text), with the interface gpt2s's text functions use.  Needs the ``tokenizers``
    package.  Its end-of-text token is ``<|endoftext|>`` (or ``</s>``, ``<eos>``) when the
    vocabulary has one."""

    name = "tokenizers"
    # encode() adds the tokenizer's special tokens (a checkpoint's BOS, as transformers'
    # tokenizer(text) does) when True: set for a Llama-family checkpoint's tokenizer.json
    add_special_tokens = False

    def __init__(self, spec: str, source: str = "tokenizer.json"):
        try:
            from tokenizers import Tokenizer
        except ImportError:
            raise VocabError(f"{source}: reading a tokenizer.json needs the tokenizers package "
                             f"(pip install tokenizers)") from None
        try:
            self.tk = Tokenizer.from_str(spec)
        except Exception as e:      # the library's own exception type
            raise VocabError(f"{source}: not a tokenizers tokenizer.json ({e})") from None
        self.spec = spec
        self.n_vocab = self.tk.get_vocab_size(with_added_tokens=True)
        self.eot_id = next((i for i in (self.tk.token_to_id(t) for t in
                                        ("<|endoftext|>", "</s>", "<eos>")) if i is not None),
                           None)
        decoder = json.loads(spec).get("decoder") or {}
        self._bytes = _byte_decoder() if decoder.get("type") == "ByteLevel" else None

    @classmethod
    def from_file(cls, path) -> "FileTokenizer":
        path = Path(path)
        try:
            spec = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            raise VocabError(f"{path}: not a tokenizer.json (not UTF-8)") from None
        return cls(spec, str(path))

    def encode_ordinary(self, text: str) -> list[int]:
        return self.tk.encode(text, add_special_tokens=False).ids

    def encode(self, text: str, allowed_special=(), disallowed_special=()) -> list[int]:
        if self.add_special_tokens:
            return self.tk.encode(text, add_special_tokens=True).ids
        return self.encode_ordinary(text)

    def decode(self, ids, errors: str = "replace") -> str:
        return self.tk.decode([int(i) for i in ids], skip_special_tokens=False)

    def decode_single_token_bytes(self, token: int) -> bytes:
        piece = self.tk.id_to_token(int(token))
        if piece is None:
            return "\ufffd".encode()
        if self._bytes is not None and all(c in self._bytes for c in piece):
            return bytes(self._bytes[c] for c in piece)
        return self.decode([token]).encode("utf-8")

    def decode_with_offsets(self, ids) -> tuple[str, list[int]]:
        offsets, data = [], b""
        for i in ids:
            offsets.append(len(data.decode("utf-8", errors="ignore")))
            data += self.decode_single_token_bytes(i)
        return data.decode("utf-8", errors="replace"), offsets

    def to_dict(self) -> dict:
        return {"format": FORMAT, "type": "tokenizers", "tokenizer": json.loads(self.spec)}

    def save(self, path) -> Path:
        text = (json.dumps(self.to_dict(), ensure_ascii=True) + "\n").encode()
        atomic_write(Path(path), lambda f: f.write(text))
        return Path(path)

    def __eq__(self, other):
        return isinstance(other, FileTokenizer) and other.to_dict() == self.to_dict()

    def __repr__(self):
        return f"FileTokenizer(n_vocab={self.n_vocab})"


def load_vocab(path):
    """The tokenizer a vocab.json describes: a CharTokenizer or a FileTokenizer."""
    path = Path(path)
    try:
        d = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise VocabError(f"{path}: not a gpt2s vocabulary (not JSON: {e})") from None
    if isinstance(d, dict) and d.get("format") == FORMAT and d.get("type") == "tokenizers" \
            and isinstance(d.get("tokenizer"), dict):
        return FileTokenizer(json.dumps(d["tokenizer"]), str(path))
    if not isinstance(d, dict) or d.get("format") != FORMAT or d.get("type") != "char" \
            or not isinstance(d.get("chars"), str):
        raise VocabError(f"{path}: not a gpt2s character vocabulary (expected "
                         f'{{"format": "{FORMAT}", "type": "char", "chars": "..."}})')
    try:
        return CharTokenizer(d["chars"])
    except VocabError as e:
        raise VocabError(f"{path}: {e}") from None


def model_vocab(model_path):
    """The gpt2s vocabulary saved beside a model (its vocab.json), or None when there is none.
    A Hugging Face checkpoint's own vocab.json (a JSON object of token -> id beside
    merges.txt, as `hf download openai-community/gpt2` fetches it) is not one and reads as
    None; a file that claims gpt2s's format but is broken raises VocabError."""
    vp = vocab_path(model_path)
    if not vp.is_file():
        return None
    try:
        d = json.loads(vp.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        d = None
    # (GPT-2's own vocabulary has a token "format": its id, an int, not gpt2s' format name)
    if isinstance(d, dict) and d.get("format") != FORMAT and d \
            and all(isinstance(v, int) for v in d.values()):
        return None
    return load_vocab(vp)


def vocab_path(model_path) -> Path:
    """Where a model's vocab.json is: beside its model.safetensors (a directory's, or the
    file's own directory)."""
    p = Path(model_path)
    return (p if p.is_dir() else p.parent) / VOCAB_FILE


TOKENIZER_FILE = "tokenizer.json"


def _checkpoint_tokenizer(model_path, config, vp):
    """A Llama-family checkpoint's own tokenizer: the tokenizer.json beside it (a Hugging Face
    checkpoint's vocab.json and merges.txt, which say the same, are not read), else a gpt2s
    vocab.json; never GPT-2's, whose ids are other tokens."""
    folder = vp.parent
    tj = folder / TOKENIZER_FILE
    if tj.is_file():
        enc = FileTokenizer.from_file(tj)
        enc.add_special_tokens = True   # a prompt starts with the checkpoint's BOS, if it has one
    else:
        enc = None
        if vp.is_file():
            try:
                enc = load_vocab(vp)
            except VocabError:   # a Hugging Face vocab.json (of a BPE with merges.txt)
                enc = None
    if enc is None:
        raise VocabError(f"{os.fspath(model_path)}: no {TOKENIZER_FILE} beside the model: a "
                         f"{config.model_type} model has its own vocabulary, not GPT-2's, so "
                         f"its text cannot be encoded or decoded without it (copy the "
                         f"checkpoint's {TOKENIZER_FILE} into {folder})")
    if enc.n_vocab > config.vocab_size:
        raise VocabError(f"{tj if tj.is_file() else vp}: {enc.n_vocab} tokens, more than "
                         f"the model's vocab_size {config.vocab_size}")
    return enc


def tokenizer_for(model_path, config=None):
    """The tokenizer of the model at model_path: its vocab.json when it has one, else GPT-2's.
    With ``config``, a model without vocab.json whose vocabulary is smaller than GPT-2's is
    refused (its ids are not GPT-2's tokens).  A model whose config is not GPT-2's (a Llama
    or Qwen2 checkpoint) uses its vocab.json or the checkpoint's tokenizer.json, and is refused
    without either: it is never given GPT-2's tokens."""
    from .tokenizer import N_VOCAB, get_tokenizer
    vp = vocab_path(model_path)
    model_type = getattr(config, "model_type", "gpt2")
    if model_type != "gpt2":
        return _checkpoint_tokenizer(model_path, config, vp)
    enc = model_vocab(model_path)
    if enc is not None:
        if config is not None and config.vocab_size < enc.n_vocab:
            raise VocabError(f"{vp}: {enc.n_vocab} tokens, more than the model's vocab_size "
                             f"{config.vocab_size}")
        return enc
    if config is not None and config.vocab_size < N_VOCAB:
        raise VocabError(f"{os.fspath(model_path)}: the model's vocabulary has "
                         f"{config.vocab_size} tokens, not GPT-2's {N_VOCAB}, and there is no "
                         f"{VOCAB_FILE} beside it to decode them with (a model trained with "
                         f"--tokenizer char keeps one in its run directory)")
    return get_tokenizer()


def start_token(enc, config=None):
    """The token an unconditional generation starts from, or None when the vocabulary has
    none: a Llama-family checkpoint's BOS (``bos_token_id``, else its first
    ``eos_token_id``), else the vocabulary's document separator, the token training puts
    between documents (GPT-2's ``<|endoftext|>`` 50256, a tokenizer.json's ``</s>`` ...).
    A character vocabulary has none."""
    from .tokenizer import EOT_ID
    ids = []
    if getattr(config, "model_type", "gpt2") != "gpt2":
        ids.append(getattr(config, "bos_token_id", None))
        eos = getattr(config, "eos_token_id", None)
        ids.append(eos[0] if isinstance(eos, (list, tuple)) and eos else eos)
    ids.append(getattr(enc, "eot_id", EOT_ID))   # a tiktoken Encoding: GPT-2's
    limit = getattr(config, "vocab_size", None)
    for i in ids:
        if isinstance(i, int) and i >= 0 and (limit is None or i < limit):
            return i
    return None


def check_data_ids(data, vocab_size: int, chunk: int = 1 << 24) -> None:
    """Refuse (VocabError, naming the files) token data (a gpt2s.data.TokenData) holding an id
    outside a model's vocabulary of ``vocab_size``: token files of another vocabulary, e.g.
    GPT-2's ids given to a character-level model.  Scanned only for a vocabulary smaller than
    GPT-2's (its token files are checked against 50257 as they are opened)."""
    from .tokenizer import N_VOCAB
    if vocab_size >= N_VOCAB:
        return
    for lo in range(0, len(data), chunk):
        ids = data.tokens(lo, min(len(data), lo + chunk))
        if len(ids) and int(ids.max()) >= vocab_size:
            i = int(np.flatnonzero(ids >= vocab_size)[0])
            files = ", ".join(str(s.path) for s in data.sources)
            raise VocabError(f"{files}: token {lo + i:,} of the data is id {int(ids[i])}, "
                             f"outside the model's vocabulary of {vocab_size:,} tokens (token "
                             f"files written with another vocabulary?)")


def train_bpe(paths, n_vocab: int, source: str = "--train-tokenizer") -> "FileTokenizer":
    """A byte-level BPE of ``n_vocab`` tokens (``<|endoftext|>`` among them, its end-of-text
    token) trained on the text files ``paths`` with the Hugging Face ``tokenizers`` package."""
    try:
        import tokenizers
    except ImportError:
        raise VocabError(f"{source}: training a tokenizer needs the tokenizers package (pip "
                         f"install tokenizers)") from None
    if not 257 <= n_vocab <= 65536:
        raise VocabError(f"{source} {n_vocab}: must be in [257, 65536] (the 256 bytes, "
                         f"<|endoftext|> and merges; token files hold uint16 ids)")
    tk = tokenizers.Tokenizer(tokenizers.models.BPE())
    tk.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = tokenizers.decoders.ByteLevel()
    tk.train([str(p) for p in paths], tokenizers.trainers.BpeTrainer(
        vocab_size=n_vocab, special_tokens=["<|endoftext|>"], show_progress=False,
        initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet()))
    return FileTokenizer(tk.to_str(), source)


def same_vocab(a, b) -> bool:
    """Whether two tokenizers (None: GPT-2's) give the same ids."""
    if a is None or b is None:
        return a is None and b is None
    return a.to_dict() == b.to_dict()


def shards_vocab(path):
    """The vocabulary recorded for a token file written by ``python -m gpt2s.prepare``:
    ``(recorded, tokenizer)`` — recorded False when the file is not one of a prepare.json's
    shards (nothing is known), tokenizer None for GPT-2's, else the vocab.json beside it."""
    path = Path(path)
    manifest = path.parent / "prepare.json"
    try:
        m = json.loads(manifest.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False, None
    if not isinstance(m, dict) or path.name not in list(m.get("train") or []) \
            + list(m.get("val") or []):
        return False, None
    if m.get("vocabulary", "gpt2") == "gpt2":
        return True, None
    return True, load_vocab(path.parent / VOCAB_FILE)


def vocab_name(enc, where=None) -> str:
    """How a vocabulary is named in messages: gpt2, char, or the file it came from."""
    if enc is None:
        return "gpt2"
    if enc.name == "char":
        return f"char ({enc.n_vocab} characters)"
    return f"a tokenizer.json of {enc.n_vocab} tokens" + (f" ({where})" if where else "")
