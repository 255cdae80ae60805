"""``python -m gpt2s`` and the ``gpt2s`` console script: the command-line programs as
subcommands, ``gpt2s generate ...`` being ``python -m gpt2s.generate ...``.

Without a command (or with ``-h``) it lists the commands with what each does; ``--version``
prints the version.  A command's own options, ``--help`` and exit status are the program's.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys

__all__ = ["main", "COMMANDS", "commands"]

# name -> (module, what it does in one line); shown in this order
COMMANDS = {
    "generate": ("gpt2s.generate", "continue a prompt, streaming the text to stdout"),
    "train": ("gpt2s.train", "train or fine-tune a model on text files or token shards"),
    "eval": ("gpt2s.eval", "loss and perplexity of a model on text or token files"),
    "prepare": ("gpt2s.prepare", "tokenize text files into token shards for big corpora"),
    "quantize": ("gpt2s.quantize", "save a model with bfloat16, int8 or int4 weights"),
    "serve": ("gpt2s.serve", "serve a model over an OpenAI-compatible HTTP API"),
}

PROG = "gpt2s"


def commands() -> dict:
    """The commands this installation has (name -> (module, description))."""
    have = {}
    for name, (module, what) in COMMANDS.items():
        try:
            found = importlib.util.find_spec(module) is not None
        except (ImportError, ValueError):
            found = False
        if found:
            have[name] = (module, what)
    return have


def _usage() -> str:
    from . import __version__
    have = commands()
    width = max(len(n) for n in have)
    lines = [f"usage: {PROG} COMMAND [OPTIONS ...]   (or: python -m gpt2s COMMAND ...)",
             "",
             f"gpt2s {__version__}: GPT-2 on the CPU. Commands:",
             *(f"  {name:<{width}}  {what}" for name, (_, what) in have.items()),
             "",
             f"{PROG} COMMAND --help shows a command's options; {PROG} --version the version."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help"):
        sys.stdout.write(_usage())
        return 0
    if argv[0] == "--version":
        from . import __version__
        print(f"gpt2s {__version__}")
        return 0
    have = commands()
    if argv[0] not in have:
        sys.stderr.write(f"{PROG}: error: {argv[0]!r} is not a command; the commands are "
                         f"{', '.join(have)} (see {PROG} --help)\n")
        return 2
    module = importlib.import_module(have[argv[0]][0])
    return module.main(argv[1:])


if __name__ == "__main__":
    sys.exit(main())
