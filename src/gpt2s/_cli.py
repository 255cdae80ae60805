"""What the command-line tools (generate, train, eval, prepare) share: the usage error and one
error style, argparse value types, the ``--threads`` and ``-q/--quiet`` options, the main
wrapper that turns errors, Ctrl-C and a closed pipe into one line and an exit status, and the
progress display."""

from __future__ import annotations

import argparse
import math
import os
import sys
import time

__all__ = ["UserError", "run_main", "os_error_text", "Parser", "positive_int", "nonneg_int",
           "nonneg_float", "positive_float", "fraction", "add_threads_option",
           "add_quiet_option", "add_version_option", "Progress", "plural"]


class UserError(Exception):
    """A mistake in the command line or its inputs: printed as ``PROG: error: ...``, exit 2,
    without a traceback."""


def os_error_text(e: OSError) -> str:
    """One line: the file, then the cause (e.g. "No space left on device")."""
    cause = e.strerror or str(e) or type(e).__name__
    if e.filename is None:
        return cause
    where = f"{e.filename} -> {e.filename2}" if e.filename2 is not None else f"{e.filename}"
    return f"{where}: {cause}"


def run_main(prog: str, body, err=None, *, interrupted: str = "", after_error=None) -> int:
    """body() -> exit status, with the ways a command ends early turned into one line on
    ``err`` (default: stderr) and an exit status: a UserError 2, an OSError 1 (naming the file
    and the cause), Ctrl-C 130 (printing ``interrupted``), a reader that went away (a closed
    pipe) 1, quietly.  ``after_error(status)`` runs after the line of a UserError or an
    OSError (a data-parallel run ends its other processes there)."""
    err = sys.stderr if err is None else err
    try:
        return body()
    except UserError as e:
        message, status = str(e), 2
    except KeyboardInterrupt:
        print(interrupted, file=err)
        return 130
    except BrokenPipeError:
        # the reader went away (e.g. `| head`): stop quietly; point stdout at devnull so the
        # flush at exit does not raise again (the recipe of Python's signal docs)
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 1
    except OSError as e:
        # disk full, a read-only or unwritable directory, an unreadable input
        message, status = os_error_text(e), 1
    print(f"{prog}: error: {message}", file=err)
    if after_error is not None:
        after_error(status)
    return status


class Parser(argparse.ArgumentParser):
    """An ArgumentParser whose every error is one line, ``PROG: error: ... (see --help)``,
    exit status 2 (argparse's own prints the usage first)."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def plural(n: int, word: str) -> str:
    """``n word`` with the word plural unless n is 1: "1 token", "2,048 tokens"."""
    return f"{n:,} {word}{'' if n == 1 else 's'}"


# ------------------------------------------------------------------------------------------
# Value types: each names what it expected and what it got


def _int(text):
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None


def positive_int(text) -> int:
    v = _int(text)
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {v}")
    return v


def nonneg_int(text) -> int:
    v = _int(text)
    if v < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {v}")
    return v


def nonneg_float(text) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not (v >= 0 and math.isfinite(v)):
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {text}")
    return v


def positive_float(text) -> float:
    v = nonneg_float(text)
    if not v > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return v


def fraction(text) -> float:
    v = nonneg_float(text)
    if not v < 1:
        raise argparse.ArgumentTypeError(f"must be in [0, 1), got {text}")
    return v


# ------------------------------------------------------------------------------------------
# Options every tool words the same way


def add_threads_option(parser, *, type=int, default_note: str = ""):
    """``--threads N``; ``default_note`` extends the default's description."""
    parser.add_argument("--threads", type=type, default=None, metavar="N",
                        help=f"CPU threads (default: $OMP_NUM_THREADS, else all cores"
                             f"{default_note})")


def add_version_option(parser):
    """``--version``: prints ``gpt2s X.Y.Z`` and exits."""
    from . import __version__
    parser.add_argument("--version", action="version", version=f"gpt2s {__version__}",
                        help="print the version of gpt2s and exit")


def add_quiet_option(parser, what: str, *, short: bool = True):
    """``-q/--quiet`` (``--quiet`` alone without ``short``): no ``what``."""
    parser.add_argument(*(("-q",) if short else ()), "--quiet", action="store_true",
                        help=f"no {what}")


# ------------------------------------------------------------------------------------------
# Progress


class Progress:
    """Progress on stderr without dependencies: one line redrawn in place on a terminal, else
    a plain line each time the work passes another 1/``lines`` of ``total`` (logs stay short).

    ``update(n, info)`` advances by n and draws a bar (``unit`` names what is counted);
    ``show(done, line)`` moves to ``done`` and draws a line of the caller's own.  ``done`` is
    where the work starts (a resumed run): the time left is estimated from the work since."""

    def __init__(self, total: int, unit: str = "", *, done: int = 0, lines: int = 10,
                 enabled: bool = True, stream=None):
        self.total, self.unit, self.enabled = max(0, int(total)), unit, enabled
        self.lines = lines
        self.stream = sys.stderr if stream is None else stream
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.first = self.done = done
        self.start = time.perf_counter()
        self._last_slot = -1
        self._shown = False

    def update(self, n: int = 1, info: str = ""):
        self.show(self.done + n, lambda elapsed, eta: self._bar(info, elapsed, eta))

    def _bar(self, info: str, elapsed: float, eta) -> str:
        frac = self.done / self.total if self.total else 1.0
        bar = "#" * int(30 * frac) + "." * (30 - int(30 * frac))
        return (f"[{bar}] {self.done:,}/{self.total:,} {self.unit} {100 * frac:3.0f}%"
                f"{' ' + info if info else ''} {elapsed:.0f}s"
                f"{f' eta {eta:.0f}s' if eta is not None else ''}")

    def show(self, done: int, line):
        """Move to ``done``; when a line is due, draw ``line(elapsed, eta)``: the seconds since
        the start and the estimated seconds left (None at the start and at the end)."""
        self.done = done
        if not self.enabled:
            return
        slot = int(self.lines * done / self.total) if self.total else self.lines
        if not self.tty and slot == self._last_slot and done != self.total:
            return
        self._last_slot = slot
        elapsed = time.perf_counter() - self.start
        part = (done - self.first) / max(1, self.total - self.first)
        text = line(elapsed, elapsed / part - elapsed if 0 < part < 1 else None)
        self.stream.write("\r" + text + "\033[K" if self.tty else text + "\n")
        self.stream.flush()
        self._shown = True

    def close(self):
        if self.enabled and self.tty and self._shown:
            self.stream.write("\n")
            self.stream.flush()
        self._shown = False
