"""``python -m gpt2s.prepare``: tokenize a text corpus into llm.c token shards, in parallel.

The output directory gets ``train_000000.bin``, ``train_000001.bin``, ... (and ``val_*.bin``
with --val-fraction or --val-shards) in llm.c's format (gpt2s.data: a 256-int32 header, then
uint16 GPT-2 tokens), plus ``prepare.json`` describing the run.  The token stream is exactly
what ``gpt2s.data.TokenData`` reads from the same text files: each file's tokens, one
``<|endoftext|>`` between consecutive files, a literal ``<|endoftext|>`` in the text being the
end-of-text token.

Memory stays bounded for any corpus size: files are read in blocks cut just after an
``<|endoftext|>`` (tokenizing the pieces separately gives exactly the tokens of the whole, since
the tokenizer splits the text at special tokens first), the blocks are tokenized by a pool of
processes, and their tokens are written to shards in order as they arrive.  A file without
``<|endoftext|>`` is tokenized as one piece.

Nothing half-done is left in the output directory: shards are written in a temporary
directory inside it and moved into place at the end.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from ._cli import Parser, UserError, add_quiet_option, add_version_option, plural, run_main
from .fs import atomic_write
from .tokenizer import EOT_TOKEN

__all__ = ["main", "prepare"]

PROG = "python -m gpt2s.prepare"
EOT_BYTES = EOT_TOKEN.encode()
DEFAULT_SHARD_SIZE = 100_000_000     # llm.c's FineWeb shards: 200 MB each
DEFAULT_BLOCK_BYTES = 32 << 20


class PrepareError(ValueError):
    """A bad input or option: reported as ``error: ...`` by the command line."""


def _tokenize_block(data: bytes, path: str, offset: int, enc=None) -> np.ndarray:
    """Worker: the tokens (uint16) of one UTF-8 block of a file (offset: where it starts),
    GPT-2's or (enc) the run's own vocabulary's."""
    from .data import tokenize_text
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise PrepareError(f"{path}: not UTF-8 text (byte 0x{data[e.start]:02x} at offset "
                           f"{offset + e.start})") from None
    if enc is None:
        return tokenize_text(text)
    try:
        return np.asarray(enc.encode_ordinary(text), np.uint16)
    except ValueError as e:     # a character the vocabulary lacks
        raise PrepareError(f"{path}: {e}") from None


def _blocks(paths, block_bytes: int, whole: bool = False):
    """(file index, path, byte offset, bytes) for every block of every file, each block ending
    just after an <|endoftext|> (or at the end of its file); whole: one block per file."""
    for i, path in enumerate(paths):
        offset = 0
        carry = b""
        if whole:
            yield i, path, 0, Path(path).read_bytes()
            continue
        with open(path, "rb") as f:
            while True:
                block = f.read(block_bytes)
                if not block:
                    break
                buf = carry + block
                cut = buf.rfind(EOT_BYTES)
                if cut < 0:
                    carry = buf
                    continue
                cut += len(EOT_BYTES)
                yield i, path, offset, buf[:cut]
                offset += cut
                carry = buf[cut:]
        yield i, path, offset, carry


def prepare(inputs, out_dir, *, shard_size: int = DEFAULT_SHARD_SIZE, val_fraction: float = 0.0,
            val_shards: int = 0, workers: int | None = None, overwrite: bool = False,
            block_bytes: int = DEFAULT_BLOCK_BYTES, progress: bool = False, err=None,
            tokenizer: str | None = None, train_tokenizer: int | None = None) -> dict:
    """Tokenize the text files ``inputs`` (paths or globs) into llm.c shards in ``out_dir``.

    The last ``val_fraction`` of the tokens (or the last ``val_shards`` shards) go to
    ``val_*.bin``, the rest to ``train_*.bin``.  Returns the manifest also written to
    ``out_dir/prepare.json``.

    ``tokenizer``: "gpt2" (the default), "char" (one token per character of the input text)
    or the path of a Hugging Face tokenizers tokenizer.json; ``train_tokenizer=N`` trains a
    byte-level BPE of N tokens on the input text instead (saved as ``out_dir/tokenizer.json``).
    A vocabulary other than GPT-2's is saved as ``out_dir/vocab.json`` and named in
    prepare.json, so train and eval read the shards with it."""
    from .data import (DataError, MAX_SHARD_TOKENS, expand_paths)

    if not 1 <= shard_size <= MAX_SHARD_TOKENS:
        raise PrepareError(f"--shard-size must be in [1, {MAX_SHARD_TOKENS:,}], got {shard_size}")
    if not 0 <= val_fraction < 1:
        raise PrepareError(f"--val-fraction must be in [0, 1), got {val_fraction}")
    if val_shards < 0:
        raise PrepareError(f"--val-shards must be >= 0, got {val_shards}")
    if val_fraction and val_shards:
        raise PrepareError("give --val-fraction or --val-shards, not both")
    workers = (os.cpu_count() or 1) if workers is None else workers
    if workers < 1:
        raise PrepareError(f"--workers must be >= 1, got {workers}")
    try:
        paths = expand_paths(inputs)
    except DataError as e:
        raise PrepareError(str(e)) from None
    for p in paths:
        if p.suffix.lower() == ".bin":
            raise PrepareError(f"{p}: a .bin file is already tokens; prepare takes UTF-8 text "
                               f"files (train and eval read .bin files directly)")
    enc = _own_vocabulary(tokenizer, train_tokenizer, paths)
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise PrepareError(f"--out {out_dir}: exists and is not a directory")
    # the directories this call makes: removed again (when still empty) if it fails, so a
    # failed run leaves no empty --out behind
    made = [d for d in (out_dir, *out_dir.parents) if not d.exists()]
    out_dir.mkdir(parents=True, exist_ok=True)
    try:
        return _prepare_into(paths, out_dir, shard_size, val_fraction, val_shards, workers,
                             overwrite, block_bytes, progress, err, enc)
    except BaseException:
        for d in made:             # deepest first
            try:
                d.rmdir()          # only an empty directory
            except OSError:
                break
        raise


def _own_vocabulary(tokenizer, train_tokenizer, paths):
    """The vocabulary the shards are written with: None for GPT-2's, else a
    gpt2s.vocab.CharTokenizer or FileTokenizer."""
    from .vocab import CharTokenizer, FileTokenizer, VocabError, train_bpe
    if tokenizer is not None and train_tokenizer is not None:
        raise PrepareError("give --tokenizer or --train-tokenizer, not both")
    try:
        if train_tokenizer is not None:
            return train_bpe(paths, train_tokenizer)
        if tokenizer in (None, "gpt2"):
            return None
        if tokenizer != "char":
            if not os.path.isfile(tokenizer):
                raise PrepareError(f"--tokenizer {tokenizer}: not gpt2, char or a "
                                   f"tokenizer.json file")
            enc = FileTokenizer.from_file(tokenizer)
        else:
            chars: set = set()
            for path in paths:      # the distinct characters, read a piece at a time
                with open(path, encoding="utf-8") as f:
                    try:
                        while piece := f.read(1 << 24):
                            chars.update(piece)
                    except UnicodeDecodeError as e:
                        raise PrepareError(f"{path}: not UTF-8 text ({e.reason} at byte "
                                           f"{e.start} of a block)") from None
            if not chars:
                raise PrepareError("--tokenizer char: the text files are empty")
            enc = CharTokenizer("".join(sorted(chars)))
    except VocabError as e:
        raise PrepareError(str(e) if train_tokenizer is not None else f"--tokenizer {e}") \
            from None
    if enc.n_vocab > 65536:
        raise PrepareError(f"--tokenizer {tokenizer}: {enc.n_vocab} tokens; token files hold "
                           f"uint16 ids, at most 65,536 tokens")
    return enc


def _prepare_into(paths, out_dir: Path, shard_size, val_fraction, val_shards, workers,
                  overwrite, block_bytes, progress, err, enc=None) -> dict:
    from ._cli import Progress
    from .data import ShardWriter, read_shard_header, write_shard
    from .tokenizer import EOT_ID

    old = sorted(list(out_dir.glob("train_*.bin")) + list(out_dir.glob("val_*.bin")))
    if old and not overwrite:
        raise PrepareError(f"--out {out_dir} already has shards ({old[0].name}"
                           f"{f' and {len(old) - 1} more' if len(old) > 1 else ''}); remove them "
                           f"or pass --overwrite")

    total_bytes = sum(p.stat().st_size for p in paths)
    bar = Progress(total_bytes, "bytes", enabled=progress, stream=err)
    tmp = Path(tempfile.mkdtemp(prefix=".prepare-", dir=out_dir))
    t0 = time.perf_counter()
    # the file being written (or a function giving it): a write that fails (disk full) says
    # only why, not where
    writing = None
    try:
        writer = ShardWriter(tmp, "part", shard_size)

        def next_shard():
            return writer.out_dir / f"{writer.prefix}_{len(writer.paths):06d}.bin"
        writing = next_shard
        # files are joined with the vocabulary's end-of-text token (none for char)
        eot_id = EOT_ID if enc is None else enc.eot_id
        eot = None if eot_id is None else np.array([eot_id], np.uint16)
        # an own tokenizer.json may merge across <|endoftext|> text: whole files, unsplit
        whole = enc is not None and enc.name != "char"

        def consume(index, size, tokens):
            if index > 0 and consume.last_index != index and eot is not None:
                writer.add(eot)                   # one separator between consecutive files
            consume.last_index = index
            writer.add(tokens)
            bar.update(size, f"{writer.n_tokens:,} tokens")
        consume.last_index = -1

        if workers == 1:
            for index, path, offset, data in _blocks(paths, block_bytes, whole):
                consume(index, len(data), _tokenize_block(data, str(path), offset, enc))
        else:
            from concurrent.futures import ProcessPoolExecutor
            with ProcessPoolExecutor(workers) as pool:
                pending = collections.deque()
                for index, path, offset, data in _blocks(paths, block_bytes, whole):
                    pending.append((index, len(data),
                                    pool.submit(_tokenize_block, data, str(path), offset,
                                                enc)))
                    while len(pending) >= 2 * workers:    # bounded: results kept in order
                        i, n, fut = pending.popleft()
                        consume(i, n, fut.result())
                while pending:
                    i, n, fut = pending.popleft()
                    consume(i, n, fut.result())
        parts = writer.close()
        n_tokens = writer.n_tokens
        bar.close()
        if n_tokens == 0:
            raise PrepareError(f"no tokens: the input file{'s are' if len(paths) > 1 else ' is'} "
                               f"empty")

        # the split: the last val tokens go to val_*.bin
        if val_shards:
            if val_shards >= len(parts):
                raise PrepareError(f"--val-shards {val_shards}: the corpus makes only "
                                   f"{len(parts)} shard{'s' if len(parts) != 1 else ''} of "
                                   f"--shard-size {shard_size:,} tokens; nothing would be left "
                                   f"to train on")
            split = sum(read_shard_header(p) for p in parts[:len(parts) - val_shards])
        else:
            split = n_tokens - int(n_tokens * val_fraction)
        names: dict[str, list[str]] = {"train": [], "val": []}
        moves = []
        start = 0
        for part in parts:
            count = read_shard_header(part)
            end = start + count
            if end <= split or start >= split:
                kind = "train" if end <= split else "val"
                name = f"{kind}_{len(names[kind]):06d}.bin"
                names[kind].append(name)
                moves.append((part, name))
            else:        # the shard that holds the split point becomes two
                tokens = np.memmap(part, dtype="<u2", mode="r", offset=1024, shape=(count,))
                for kind, piece in (("train", tokens[:split - start]),
                                    ("val", tokens[split - start:])):
                    name = f"{kind}_{len(names[kind]):06d}.bin"
                    names[kind].append(name)
                    writing = tmp / name
                    write_shard(tmp / name, piece)
                    moves.append((tmp / name, name))
                del tokens
                part.unlink()
            start = end
        from .vocab import VOCAB_FILE
        for p in old:
            p.unlink()
        if enc is not None:        # the vocabulary before the shards that need it
            writing = out_dir / VOCAB_FILE
            enc.save(out_dir / VOCAB_FILE)
            if enc.name != "char":
                spec = enc.spec.encode()
                writing = out_dir / "tokenizer.json"
                atomic_write(out_dir / "tokenizer.json", lambda f: f.write(spec))
        elif (out_dir / VOCAB_FILE).is_file():
            (out_dir / VOCAB_FILE).unlink()     # a previous run's (--overwrite)
        for src, name in moves:
            os.replace(src, out_dir / name)
        manifest = {
            "format": "llm.c shards: 256 int32 header words (magic 20240520, version 1, "
                      "token count), then uint16 "
                      + ("GPT-2 tokens" if enc is None else f"token ids of {VOCAB_FILE}"),
            "vocabulary": "gpt2" if enc is None else enc.name,
            "vocab_size": 50257 if enc is None else enc.n_vocab,
            "inputs": [str(p) for p in paths], "input_bytes": total_bytes,
            "tokens": n_tokens, "train_tokens": split, "val_tokens": n_tokens - split,
            "shard_size": shard_size, "train": names["train"], "val": names["val"],
            "seconds": round(time.perf_counter() - t0, 3),
        }
        text = (json.dumps(manifest, indent=1) + "\n").encode()
        writing = out_dir / "prepare.json"
        atomic_write(out_dir / "prepare.json", lambda f: f.write(text))
        return manifest
    except OSError as e:
        if e.filename is None and writing is not None:
            where = writing() if callable(writing) else writing
            raise OSError(e.errno, e.strerror or str(e), str(where)) from e
        raise
    finally:
        bar.close()
        shutil.rmtree(tmp, ignore_errors=True)


# ------------------------------------------------------------------------------------------
# command line


def _parser() -> argparse.ArgumentParser:
    p = Parser(
        prog=PROG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Tokenize UTF-8 text files with the GPT-2 tokenizer (or a vocabulary of your\n"
                    "own: --tokenizer, --train-tokenizer) into llm.c token shards\n"
                    "(train_000000.bin, ...), in parallel, so a corpus larger than memory can be\n"
                    "trained on and evaluated.",
        epilog=f"""\
output: DIR/train_NNNNNN.bin (and val_NNNNNN.bin) in llm.c's format: 256 int32 header words
  (magic 20240520, version 1, token count), then uint16 token ids; DIR/prepare.json describes
  the run.  Files are joined with one <|endoftext|> between them (an own vocabulary's
  end-of-text token; none for char); a literal <|endoftext|> in the text is that token
  (characters, for char).  python -m gpt2s.train and python -m gpt2s.eval read the
  shards through a memory map, e.g. "DIR/train_*.bin".

validation: --val-fraction F puts the last F of the tokens in val_*.bin; --val-shards K the
  last K shards.  Without either, everything goes to train_*.bin.

errors: one line naming the file and the cause; exit status 2 for a bad input or option, 1
  when reading or writing fails (disk full, a read-only or unwritable --out).

examples:
  {PROG} input.txt --out data/shakespeare --val-fraction 0.1
  {PROG} "books/**/*.txt" --out data/books --shard-size 10000000 --val-shards 1
  {PROG} TinyStories-train.txt --out data/tinystories --workers 2
  {PROG} input.txt --out data/shakespeare_char --tokenizer char --val-fraction 0.1
  {PROG} input.txt --out data/bpe --train-tokenizer 4096
""")
    p.add_argument("text", nargs="+", metavar="TEXT",
                   help="UTF-8 text files, or globs of them (quoted; ** matches directories)")
    p.add_argument("--out", required=True, metavar="DIR",
                   help="output directory (created if needed; required)")
    p.add_argument("--shard-size", type=int, default=DEFAULT_SHARD_SIZE, metavar="N",
                   help="tokens per shard (default: %(default)s, llm.c's 200 MB shards)")
    split = p.add_mutually_exclusive_group()
    split.add_argument("--val-fraction", type=float, default=0.0, metavar="F",
                       help="put the last F of the tokens, 0 <= F < 1, in val_*.bin "
                            "(default: %(default)s, no validation shards)")
    split.add_argument("--val-shards", type=int, default=0, metavar="K",
                       help="put the last K shards in val_*.bin instead (default: 0)")
    vocab = p.add_mutually_exclusive_group()
    vocab.add_argument("--tokenizer", default=None, metavar="gpt2|char|FILE",
                       help="the vocabulary: gpt2 (GPT-2's 50,257 tokens), char (one token per "
                            "character of the text) or a Hugging Face tokenizers "
                            "tokenizer.json; char and FILE are saved as DIR/vocab.json, which "
                            "train reads with the shards (default: gpt2)")
    vocab.add_argument("--train-tokenizer", type=int, default=None, metavar="N",
                       help="train a byte-level BPE of N tokens on the text (needs the "
                            "tokenizers package) and use it; saved as DIR/tokenizer.json and "
                            "DIR/vocab.json")
    p.add_argument("--workers", type=int, default=None, metavar="N",
                   help="tokenizing processes (default: the number of CPU cores)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the shards already in DIR (default: refuse)")
    add_quiet_option(p, "progress bar or summary")
    add_version_option(p)
    return p


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    err = sys.stderr
    return run_main(PROG, lambda: _run(args, err), err)


def _run(args, err) -> int:
    try:
        m = prepare(args.text, args.out, shard_size=args.shard_size,
                    val_fraction=args.val_fraction, val_shards=args.val_shards,
                    workers=args.workers, overwrite=args.overwrite, progress=not args.quiet,
                    err=err, tokenizer=args.tokenizer, train_tokenizer=args.train_tokenizer)
    except PrepareError as e:
        raise UserError(str(e)) from None
    if not args.quiet:
        n_files = len(m["inputs"])
        print(f"{plural(m['tokens'], 'token')} from {n_files} file{'s' if n_files > 1 else ''} "
              f"({m['input_bytes']:,} bytes) in {m['seconds']:.1f} s: "
              f"{len(m['train'])} train shard{'s' if len(m['train']) != 1 else ''} "
              f"({plural(m['train_tokens'], 'token')}), {len(m['val'])} val "
              f"shard{'s' if len(m['val']) != 1 else ''} ({plural(m['val_tokens'], 'token')}) in "
              f"{args.out}", file=err)
    return 0


if __name__ == "__main__":
    sys.exit(main())
