"""No module reaches into the private state of ``GPT2`` or ``ParameterStore`` from outside
the file that defines the class: the class boundary is the boundary.

The rule, a heuristic over each file's syntax tree (``ast``):

* a class's private names are those its own file binds as ``self._x = ...`` anywhere inside
  the class body (nested functions included) or defines as ``def _x`` / ``_x = ...`` directly
  in the class body; dunder names (``__init__``) are not private;
* every other ``.py`` file of the package (``src/gpt2s/``) and of ``tests/`` fails when it
  holds an attribute access ``<expr>._x`` (read, write or call) with ``_x`` one of those names
  and ``<expr>`` anything but the bare names ``self`` or ``cls`` (a class's own attribute of
  the same name), or a call ``getattr`` / ``setattr`` / ``hasattr`` / ``delattr`` (or
  ``monkeypatch.setattr`` / ``.delattr``) whose attribute-name argument is one of those names
  as a string;
* a module-qualified private (``_core._x``, ``_threads._x``) counts only when its name is in
  the class's private set, so the package's private modules and their functions are not
  flagged unless they share a name with the class's privates.

It cannot know the type of ``<expr>``: a private of another class with the same name is
flagged too; rename one of them.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import gpt2s

PACKAGE = Path(gpt2s.__file__).resolve().parent
TESTS = Path(__file__).resolve().parent
CLASSES = [("model.py", "GPT2"), ("params.py", "ParameterStore")]
ATTRIBUTE_FUNCTIONS = {"getattr", "setattr", "hasattr", "delattr"}


def _is_private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def private_names(source: str, class_name: str) -> set:
    """The private attribute and method names class_name binds in source."""
    tree = ast.parse(source)
    classes = [n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == class_name]
    assert len(classes) == 1, f"class {class_name} not found once at the top level"
    names = set()
    for stmt in classes[0].body:
        if isinstance(stmt, (ast.FunctionDef, ast.AsyncFunctionDef)):
            names.add(stmt.name)
        elif isinstance(stmt, (ast.Assign, ast.AnnAssign)):
            targets = stmt.targets if isinstance(stmt, ast.Assign) else [stmt.target]
            names.update(t.id for t in targets if isinstance(t, ast.Name))
    for node in ast.walk(classes[0]):
        targets = node.targets if isinstance(node, ast.Assign) else \
            [node.target] if isinstance(node, (ast.AnnAssign, ast.AugAssign)) else []
        for target in targets:
            for t in ast.walk(target):
                if isinstance(t, ast.Attribute) and isinstance(t.value, ast.Name) and \
                        t.value.id == "self":
                    names.add(t.attr)
    return {n for n in names if _is_private(n)}


def private_uses(source: str, names: set) -> list:
    """(line, text) of every use of one of names from outside the class (the rule above)."""
    uses = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Attribute) and node.attr in names and not (
                isinstance(node.value, ast.Name) and node.value.id in ("self", "cls")):
            uses.append((node.lineno, ast.unparse(node)))
        elif isinstance(node, ast.Call):
            f = node.func
            called = f.id if isinstance(f, ast.Name) else f.attr \
                if isinstance(f, ast.Attribute) else None
            if called in ATTRIBUTE_FUNCTIONS and len(node.args) >= 2:
                arg = node.args[1]
                if isinstance(arg, ast.Constant) and arg.value in names:
                    uses.append((node.lineno, ast.unparse(node)))
    return sorted(uses)


def _files(defining: str):
    for path in sorted(PACKAGE.glob("*.py")):
        if path.name != defining:
            yield path
    yield from sorted(TESTS.glob("*.py"))


@pytest.mark.parametrize("defining, class_name", CLASSES)
def test_no_module_touches_the_private_attributes(defining, class_name):
    names = private_names((PACKAGE / defining).read_text(encoding="utf-8"), class_name)
    found = []
    for path in _files(defining):
        for line, text in private_uses(path.read_text(encoding="utf-8"), names):
            found.append(f"{path.name}:{line}: {text}")
    assert not found, (f"{len(found)} uses of {class_name}'s private attributes outside "
                       f"{defining}:\n" + "\n".join(found))


def test_the_rule_sees_each_kind_of_use():
    """The detector itself: what it must flag and what it must leave alone."""
    cls_source = (
        "class GPT2:\n"
        "    _CONST = 1\n"
        "    def __init__(self):\n"
        "        self._buffer = None\n"
        "        self.public = None\n"
        "        def helper():\n"
        "            self._nested = 1\n"
        "    def _helper(self):\n"
        "        pass\n"
    )
    names = private_names(cls_source, "GPT2")
    assert names == {"_CONST", "_buffer", "_nested", "_helper"}
    user = (
        "m._buffer[0] = 1\n"                            # 1: a write through an expression
        "x = model._helper()\n"                         # 2: a call
        "getattr(m, '_nested')\n"                       # 3: by name
        "monkeypatch.setattr(m, '_helper', f)\n"        # 4: patched by name
        "self._buffer = 2\n"                            # another class's own attribute
        "_core._helper2()\n"                            # a module's private function
        "m.public\n"
        "make()._CONST\n"                               # 8
    )
    assert [line for line, _ in private_uses(user, names)] == [1, 2, 3, 4, 8]
