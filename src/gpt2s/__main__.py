"""``python -m gpt2s`` and the ``gpt2s`` console script: the command-line programs as
subcommands, ``gpt2s generate ...`` being ``python -m gpt2s.generate ...``.

Without a command (or with ``-h``) it lists the commands with what each does; ``--version``
prints the version.  A command's own options, ``--help`` and exit status are the program's;
its usage line, errors and examples name it the way it was run (``gpt2s generate``,
``python -m gpt2s generate``), as they name ``python -m gpt2s.generate`` when run so.
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


def _usage(prog: str = PROG) -> str:
    from . import __version__
    have = commands()
    width = max(len(n) for n in have)
    other = "python -m gpt2s" if prog == PROG else PROG
    lines = [f"usage: {prog} COMMAND [OPTIONS ...]   (or: {other} COMMAND ...)",
             "",
             f"gpt2s {__version__}: GPT-2 on the CPU. Commands:",
             *(f"  {name:<{width}}  {what}" for name, (_, what) in have.items()),
             "",
             f"{prog} COMMAND --help shows a command's options; {prog} --version the version."]
    return "\n".join(lines) + "\n"


def main(argv=None, prog: str = PROG) -> int:
    """Run ``prog COMMAND ARGS...`` (argv: the arguments after prog; default sys.argv[1:]).
    prog is how the user ran it (``gpt2s``, ``python -m gpt2s``): messages name it."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help"):
        sys.stdout.write(_usage(prog))
        return 0
    if argv[0] == "--version":
        from . import __version__
        print(f"gpt2s {__version__}")
        return 0
    have = commands()
    if argv[0] not in have:
        sys.stderr.write(f"{prog}: error: {argv[0]!r} is not a command; the commands are "
                         f"{', '.join(have)} (see {prog} --help)\n")
        return 2
    module = importlib.import_module(have[argv[0]][0])
    # the command's usage line, errors and examples read its module's PROG when it runs:
    # name it as invoked ("gpt2s generate", not "python -m gpt2s.generate") meanwhile
    own = module.PROG
    module.PROG = f"{prog} {argv[0]}"
    try:
        return module.main(argv[1:])
    finally:
        module.PROG = own


if __name__ == "__main__":
    sys.exit(main(prog="python -m gpt2s"))
