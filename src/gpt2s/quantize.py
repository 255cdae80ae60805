"""``python -m gpt2s.quantize IN OUT --dtype int8``: convert a model once and save it in its
new storage (a packed int8 / int4 file, or bfloat16 matmul weights), so that loading it later
maps the file instead of converting it again.

IN is read tensor by tensor (a float32 file through its mapping, each weight converted and its
file pages let go), so the conversion holds about one model of the new type in memory.  OUT
is a directory made whole under a temporary name beside it and then renamed into place: an
interrupted run leaves no half-written model.  Errors are one line, ``PROG: error: ...``.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from pathlib import Path

from ._cli import Parser, Progress, UserError, add_quiet_option, add_threads_option, run_main
from ._cli import add_version_option
from .fs import fsync_dir
from .hub import ModelNotFound, find_model
from .weight_types import DTYPES

__all__ = ["main", "quantize"]

PROG = "python -m gpt2s.quantize"


def _parser() -> argparse.ArgumentParser:
    p = Parser(
        prog=PROG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Convert a GPT-2 model to another weight storage once and save it in that "
                    "storage\n(model.safetensors + config.json in OUT), so that loading it "
                    "maps the file\ninstead of converting it again.",
        epilog=f"""\
storage: int8 and int4 are written as packed gpt2s files (the kernels' blocks of 32
  weights and their fp16 scales, exactly as they are used); other programs refuse them.
  bfloat16 writes the matmul weights as BF16 tensors, which any safetensors reader
  loads; float32 writes a plain float32 file (from a packed one, say).  Loading OUT
  (gpt2s.GPT2.from_pretrained, python -m gpt2s.generate --model OUT) uses the stored
  type by default.

examples:
  {PROG} gpt2 gpt2-int8 --dtype int8
  {PROG} runs/mini runs/mini-int4 --dtype int4
  {PROG} gpt2-int8 gpt2-f32 --dtype float32
  {PROG} gpt2 gpt2-q8_0.gguf --dtype int8     # a GGUF for llama.cpp
  python -m gpt2s.generate --model gpt2-int8 "Hello"
""")
    p.add_argument("input", metavar="IN",
                   help="the model: a .safetensors file, a directory with model.safetensors "
                        "(+ config.json; a Llama or Qwen2 checkpoint directory too, whose "
                        "tokenizer files are copied along), or a name: demo, gpt2, "
                        "gpt2-medium, gpt2-large, gpt2-xl (as generate's --model)")
    p.add_argument("output", metavar="OUT",
                   help="the directory to write (model.safetensors, config.json), or a file "
                        "ending in .gguf (a GGUF llama.cpp runs: int8 as Q8_0, int4 as Q4_0, "
                        "bfloat16 as BF16, float32 as F32; needs the gguf package); it must "
                        "not exist unless --force")
    p.add_argument("--dtype", required=True, choices=DTYPES,
                   help="the weight storage to save")
    p.add_argument("--force", action="store_true",
                   help="replace OUT when it exists")
    add_threads_option(p)
    add_quiet_option(p, "progress bar")
    add_version_option(p)
    return p


def quantize(src, out, dtype: str, *, force: bool = False, progress=None) -> Path:
    """Load the model at src (a path) as dtype and save it in that storage into the
    directory out, atomically: written under a temporary name beside out, then renamed
    (replacing out when force).  ``progress(done, total)`` follows the conversion.  Returns
    out."""
    from .model import GPT2
    out = Path(out)
    if out.suffix.lower() == ".gguf":   # a GGUF file (gpt2s.gguf_io), written atomically
        if out.exists() and not force:
            raise FileExistsError(f"{out} exists; choose a new name, or --force replaces it")
        if out.is_dir():
            raise IsADirectoryError(f"{out}: is a directory")
        from .auto import check_model_type, model_type_of
        kind = check_model_type(*model_type_of(src))
        if kind != "gpt2":
            raise ValueError(f"{src}: a {kind} checkpoint; gpt2s writes GPT-2 GGUF files only "
                             f"(save to a directory instead)")
        return GPT2.from_safetensors(src, dtype=dtype, progress=progress).save_gguf(out)
    if out.exists() and not force:
        raise FileExistsError(f"{out} exists; choose a new directory, or --force replaces it")
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"{out}: exists and is not a directory")
    from .auto import check_model_type, model_type_of
    if check_model_type(*model_type_of(src)) == "gpt2":
        model = GPT2.from_safetensors(src, dtype=dtype, progress=progress)
    else:   # a Llama / Qwen2 checkpoint: its tokenizer files go along
        from .auto import AutoModelForCausalLM
        model = AutoModelForCausalLM.from_pretrained(src, dtype=dtype)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)
        model.save_safetensors(tmp)
        if not isinstance(model, GPT2):
            _copy_tokenizer_files(src, tmp)
        del model   # the input's mapping (when it is out itself, it is renamed, not changed)
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".old", dir=out.parent))
            os.replace(out, old / out.name)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
        fsync_dir(out.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _copy_tokenizer_files(src, dest: Path):
    """The tokenizer (and chat template, generation config) files of the checkpoint at src,
    copied beside the converted model."""
    from .train import TOKENIZER_FILES
    folder = Path(src) if Path(src).is_dir() else Path(src).parent
    for name in TOKENIZER_FILES + ("vocab.json",):
        if (folder / name).is_file():
            shutil.copyfile(folder / name, dest / name)


def _size(n: int) -> str:
    return f"{n / 1e6:,.1f} MB" if n >= 1e5 else f"{n:,} bytes"


def _run(args, out, err) -> int:
    import gpt2s
    from .gguf_io import is_gguf
    from .weights import SafetensorsError, file_storage, resolve_model_path

    try:
        if args.threads is not None:
            gpt2s.set_num_threads(args.threads)
    except (TypeError, ValueError) as e:
        raise UserError(f"--threads {str(e).removeprefix('set_num_threads: n ')}") from None
    dest = Path(args.output)
    to_gguf = dest.suffix.lower() == ".gguf"
    if dest.exists() and not args.force:
        raise UserError(f"{dest} exists; choose a new {'name' if to_gguf else 'directory'}, "
                        f"or --force replaces it")
    if dest.exists() and dest.is_dir() == to_gguf:
        raise UserError(f"{dest}: exists and is {'a' if to_gguf else 'not a'} directory")
    if to_gguf and not dest.absolute().parent.is_dir():     # before converting, naming OUT
        raise UserError(f"{dest}: the directory {dest.absolute().parent} does not exist")
    try:
        path = find_model(args.input)
        src_file, _ = resolve_model_path(path)
        src_storage = "GGUF" if is_gguf(src_file) else file_storage(src_file)
    except (FileNotFoundError, ModelNotFound, SafetensorsError, ValueError) as e:
        # (find_model names the source as generate's option)
        raise UserError(str(e).removeprefix("--model ")) from None
    bar = Progress(0, "parameters", enabled=not args.quiet, stream=err)

    def progress(done, total):
        bar.total = total
        bar.update(done - bar.done, f"to {args.dtype}")

    try:
        quantize(path, dest, args.dtype, force=args.force, progress=progress)
    except (SafetensorsError, ValueError, ImportError) as e:
        raise UserError(str(e)) from None
    finally:
        bar.close()
    written = dest if to_gguf else dest / "model.safetensors"
    stored = f" {src_storage}" if src_storage != "float32" else ""   # a gpt2s save's type
    print(f"{written}: {args.dtype}, {_size(written.stat().st_size)} (from {src_file}:"
          f"{stored} {_size(src_file.stat().st_size)})", file=out)
    return 0


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    return run_main(PROG, lambda: _run(args, sys.stdout, sys.stderr), sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
