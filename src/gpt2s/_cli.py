"""What the command-line tools (generate, eval) share: one error style, and the exits for
Ctrl-C and for a reader that went away."""

from __future__ import annotations

import os
import sys


class UserError(Exception):
    """A mistake in the command line or its inputs: printed as ``PROG: error: ...``, exit 2,
    without a traceback."""


def run_main(prog: str, body, err) -> int:
    """body() -> exit code, with UserError, Ctrl-C and a closed pipe turned into exit codes."""
    try:
        return body()
    except UserError as e:
        print(f"{prog}: error: {e}", file=err)
        return 2
    except KeyboardInterrupt:
        print("", file=err)
        return 130
    except BrokenPipeError:
        # the reader went away (e.g. `| head`): stop quietly; point stdout at devnull so the
        # flush at exit does not raise again (the recipe of Python's signal docs)
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 1
