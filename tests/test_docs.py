"""The documentation site builds in strict mode (every warning, broken link or unresolved
API reference is an error) and its generated parts contain what they are generated from.

Needs the docs extra (``pip install ".[docs]"``) and the repository layout; otherwise the test
skips with the reason.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def test_docs_build_strict(tmp_path):
    if not (ROOT / "mkdocs.yml").is_file():
        pytest.skip("mkdocs.yml not present (the tests run outside the repository)")
    for module in ("mkdocs", "material", "mkdocstrings_handlers.python"):
        pytest.importorskip(module, reason=f"{module} not installed: pip install '.[docs]'")
    site = tmp_path / "site"
    # cwd=ROOT: the snippets of docs/examples.md are paths from the repository root
    r = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict",
                        "-f", str(ROOT / "mkdocs.yml"), "-d", str(site)],
                       cwd=ROOT, capture_output=True, text=True, timeout=600,
                       env=dict(os.environ, NO_MKDOCS_2_WARNING="1"))
    assert r.returncode == 0, f"mkdocs build --strict failed:\n{r.stderr[-5000:]}"
    warnings = [line for line in r.stderr.splitlines() if line.startswith("WARNING")]
    assert not warnings, warnings

    api = (site / "api.html").read_text(encoding="utf-8")
    for name in ("gpt2s.GPT2.generate_stream", "gpt2s.AdamW", "gpt2s.clip_grad_norm",
                 "gpt2s.GPT2Config", "gpt2s.get_tokenizer", "gpt2s.set_num_threads",
                 "gpt2s.SafetensorsError"):
        assert f'id="{name}"' in api, f"the API reference has no entry {name}"
    cli = (site / "cli.html").read_text(encoding="utf-8")
    assert "cli-help" not in cli, "a --help marker was not replaced"
    for option in ("--max-new-tokens", "--top-p", "--context-full", "--grad-clip", "--resume",
                   "--stride", "--shard-size"):
        assert option in cli, f"the CLI reference lacks {option}"
    examples = (site / "examples.html").read_text(encoding="utf-8")
    for path in sorted((ROOT / "examples").glob("*.py")):
        first_code = next(line for line in path.read_text().splitlines()
                          if line.startswith("import "))
        assert re.sub(r"\s+", " ", first_code.split()[1]) in examples, \
            f"docs/examples.md does not show {path.name}"
        assert f"examples/{path.name}" in examples, f"docs/examples.md does not show {path.name}"


def test_readme_links_every_guide():
    readme = ROOT / "README.md"
    nav = ROOT / "mkdocs.yml"
    if not nav.is_file():
        pytest.skip("mkdocs.yml not present (the tests run outside the repository)")
    pages = re.findall(r":\s*(\S+\.md)\s*$", nav.read_text(encoding="utf-8"), re.M)
    assert len(pages) >= 8, pages
    text = readme.read_text(encoding="utf-8")
    missing = [p for p in pages if f"docs/{p}" not in text]
    assert not missing, f"README's Documentation list does not link {missing}"
