"""The GPT-2 tokenizer, offline: tiktoken's "gpt2" encoding built from the BPE ranks shipped in
the package (assets/gpt2.tiktoken), so no network access is ever needed.

The ranks file is checked against its SHA-256 once, when the tokenizer is first built.
"""

from __future__ import annotations

import base64
import hashlib
import functools
from pathlib import Path

__all__ = ["get_tokenizer", "EOT_TOKEN", "EOT_ID", "GPT2_PATTERN", "RANKS_PATH", "RANKS_SHA256"]

RANKS_PATH = Path(__file__).resolve().parent / "assets" / "gpt2.tiktoken"
RANKS_SHA256 = "306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930"

# GPT-2's pre-tokenisation regex exactly as tiktoken's "gpt2" encoding spells it
# (tiktoken_ext.openai_public.r50k_pat_str): an equivalent, faster form of the pattern in
# OpenAI's GPT-2 encoder.py, r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""
EOT_TOKEN = "<|endoftext|>"
EOT_ID = 50256
N_VOCAB = 50257


def load_ranks(path=RANKS_PATH, expected_sha256: str | None = RANKS_SHA256) -> dict[bytes, int]:
    """{token bytes: rank} from a tiktoken ranks file (one "base64-token rank" per line),
    after checking the file's SHA-256 when expected_sha256 is given."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise FileNotFoundError(f"GPT-2 BPE ranks file {path} is missing; the gpt2s installation "
                                f"is incomplete (reinstall gpt2s)") from None
    if expected_sha256 is not None:
        digest = hashlib.sha256(data).hexdigest()
        if digest != expected_sha256:
            raise ValueError(f"GPT-2 BPE ranks file {path} is corrupt: sha256 {digest}, expected "
                             f"{expected_sha256} (reinstall gpt2s)")
    ranks = {}
    for lineno, line in enumerate(data.splitlines(), 1):
        if not line:
            continue
        try:
            token, rank = line.split()
            ranks[base64.b64decode(token, validate=True)] = int(rank)
        except ValueError:
            raise ValueError(f"{path}:{lineno}: not a 'base64-token rank' line: {line[:60]!r}") \
                from None
    return ranks


@functools.lru_cache(maxsize=1)
def get_tokenizer():
    """The GPT-2 tokenizer: a ``tiktoken.Encoding`` identical to ``tiktoken.get_encoding("gpt2")``
    (same regex, the 50,256 BPE ranks, ``<|endoftext|>`` = 50256), built from the ranks file
    bundled with gpt2s; no network access.  Built once and cached.

    Returns:
        the ``tiktoken.Encoding`` (``encode``, ``encode_ordinary``, ``decode``,
        ``decode_single_token_bytes``, ...).

    Raises:
        FileNotFoundError: the bundled ranks file is missing (a broken installation).
        ValueError: the ranks file is corrupt (its SHA-256 does not match).

    Examples:
        >>> enc = get_tokenizer()
        >>> enc.encode("Hello world")
        [15496, 995]
        >>> enc.decode([15496, 995])
        'Hello world'
    """
    import tiktoken

    ranks = load_ranks()
    if len(ranks) != EOT_ID:
        raise ValueError(f"{RANKS_PATH}: {len(ranks)} BPE ranks, expected {EOT_ID}")
    return tiktoken.Encoding(
        name="gpt2",
        pat_str=GPT2_PATTERN,
        mergeable_ranks=ranks,
        special_tokens={EOT_TOKEN: EOT_ID},
        explicit_n_vocab=N_VOCAB,
    )
