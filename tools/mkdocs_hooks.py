"""MkDocs hooks (mkdocs.yml loads this file).

``<!-- cli-help: gpt2s.generate -->`` in a page is replaced at build time by the output of
``python -m gpt2s.generate --help`` from the installed package, so the command-line reference
cannot drift from the code.  A command that fails fails the build.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys

_MARKER = re.compile(r"<!--\s*cli-help:\s*([\w.]+)\s*-->")


def _help(module: str) -> str:
    env = dict(os.environ, COLUMNS="90", PYTHONIOENCODING="utf-8")
    r = subprocess.run([sys.executable, "-m", module, "--help"], capture_output=True,
                       text=True, env=env, timeout=120)
    if r.returncode != 0:
        raise RuntimeError(f"`python -m {module} --help` failed with status {r.returncode}:\n"
                           f"{r.stderr}")
    return r.stdout.rstrip()


def on_page_markdown(markdown, page, config, files):
    return _MARKER.sub(lambda m: "```text\n" + _help(m.group(1)) + "\n```", markdown)
