"""The typed stub gpt2s/_core.pyi must describe the compiled gpt2s._core as it is: the same
public functions, with the same parameter names, so editors and mypy never see a stale API.
It is checked against the installed package (the stub ships next to the extension)."""

from __future__ import annotations

import ast
import inspect
from pathlib import Path

import pytest

import gpt2s
from gpt2s import _core


def _stub_path() -> Path:
    here = Path(gpt2s.__file__).resolve().parent / "_core.pyi"
    if here.is_file():
        return here
    # an editable install keeps the Python sources (and the stub) apart from the extension
    there = Path(_core.__file__).resolve().parent / "_core.pyi"
    if there.is_file():
        return there
    pytest.fail(f"_core.pyi is not installed next to gpt2s ({here}) nor next to _core ({there})")


def _stub_functions() -> dict[str, list[str]]:
    tree = ast.parse(_stub_path().read_text(encoding="utf-8"))
    funcs = {}
    for node in tree.body:
        if isinstance(node, ast.FunctionDef):
            a = node.args
            funcs[node.name] = [p.arg for p in (*a.posonlyargs, *a.args, *a.kwonlyargs)]
    return funcs


def _exported_functions() -> dict[str, object]:
    """Public functions in dir(gpt2s._core) (names without a leading underscore)."""
    objs = {name: getattr(_core, name) for name in dir(_core) if not name.startswith("_")}
    return {name: obj for name, obj in objs.items()
            if callable(obj) and not isinstance(obj, type)}


def test_stub_names_match_core():
    stub = set(_stub_functions())
    core = set(_exported_functions())
    missing = sorted(core - stub)
    extra = sorted(stub - core)
    assert not missing, f"functions of gpt2s._core missing from _core.pyi: {missing}"
    assert not extra, f"functions in _core.pyi that gpt2s._core does not export: {extra}"


def test_stub_parameters_match_core():
    stub = _stub_functions()
    mismatched = {}
    for name, func in _exported_functions().items():
        if name not in stub:
            continue  # reported by test_stub_names_match_core
        try:
            params = list(inspect.signature(func).parameters)
        except (TypeError, ValueError):  # pragma: no cover - Cython without binding=True
            continue
        if params != stub[name]:
            mismatched[name] = {"_core": params, "_core.pyi": stub[name]}
    assert not mismatched, f"parameter names differ between _core and _core.pyi: {mismatched}"


def test_stub_is_valid_python_with_annotations():
    tree = ast.parse(_stub_path().read_text(encoding="utf-8"))
    for node in tree.body:
        if isinstance(node, ast.FunctionDef):
            assert node.returns is not None, f"{node.name}: no return annotation"
            for p in node.args.args:
                assert p.annotation is not None, f"{node.name}({p.arg}): no annotation"
