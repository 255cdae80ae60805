"""A progress bar on stderr for the command-line tools (eval, prepare), without dependencies:
one line redrawn in place on a terminal, else a plain line every 10% (logs stay short)."""

from __future__ import annotations

import sys
import time


class Progress:
    def __init__(self, total: int, unit: str, *, enabled: bool = True, stream=None):
        self.total, self.unit, self.enabled = max(0, int(total)), unit, enabled
        self.stream = sys.stderr if stream is None else stream
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.done = 0
        self.start = time.perf_counter()
        self._last_tenth = -1
        self._shown = False

    def update(self, n: int = 1, info: str = ""):
        self.done += n
        if not self.enabled:
            return
        frac = self.done / self.total if self.total else 1.0
        tenth = int(10 * frac)
        if not self.tty and tenth == self._last_tenth and self.done != self.total:
            return
        self._last_tenth = tenth
        elapsed = time.perf_counter() - self.start
        eta = f" eta {elapsed / frac - elapsed:.0f}s" if 0 < frac < 1 else ""
        bar = "#" * int(30 * frac) + "." * (30 - int(30 * frac))
        line = (f"[{bar}] {self.done:,}/{self.total:,} {self.unit} {100 * frac:3.0f}%"
                f"{' ' + info if info else ''} {elapsed:.0f}s{eta}")
        if self.tty:
            self.stream.write("\r" + line + "\033[K")
        else:
            self.stream.write(line + "\n")
        self.stream.flush()
        self._shown = True

    def close(self):
        if self.enabled and self.tty and self._shown:
            self.stream.write("\n")
            self.stream.flush()
        self._shown = False
