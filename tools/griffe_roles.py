"""Griffe extension for the API reference (mkdocs.yml loads it).

The docstrings are written to read well in ``help()``: they name other objects as
reStructuredText roles (``:meth:`generate```) or in single backquotes (`` `GPT2Config` ``,
the default role).  mkdocstrings renders Markdown, where both would be plain code; this turns
each one that names a documented object (looked up from the docstring's own class, module,
then the package) into an autorefs link, and leaves the others as inline code.
``double backquotes`` are literal text and stay as they are."""

from __future__ import annotations

import re

import griffe

_ROLE = re.compile(r":(?:meth|func|class|attr|mod|obj|exc):`~?([\w.]+)`")
# `Name` or `Name.attr` in single backquotes, not part of ``...``
_DEFAULT_ROLE = re.compile(r"(?<![`\w\[])`([A-Za-z_][\w.]*)`(?![`\w\]])")


class RstRolesToLinks(griffe.Extension):
    def on_package(self, *, pkg, **kwargs):
        for obj in _walk(pkg, set()):
            doc = obj.docstring
            if doc is not None and "`" in doc.value:
                doc.value = _ROLE.sub(lambda m: _link(obj, m.group(1)), doc.value)
                doc.value = "\n".join(
                    line if line.lstrip().startswith((">>>", "...")) else
                    _DEFAULT_ROLE.sub(lambda m: _link(obj, m.group(1), keep=m.group(0)), line)
                    for line in doc.value.split("\n"))


def _walk(obj, seen):
    if obj.path in seen:
        return
    seen.add(obj.path)
    yield obj
    for member in obj.members.values():
        if not member.is_alias:
            yield from _walk(member, seen)


def _link(obj, target, keep=None):
    """[`target`][full.path] when target resolves from obj's scope (its class, its module,
    the package), else keep (default: `target`)."""
    scopes = [obj] + [p for p in _parents(obj)]
    for scope in scopes:
        try:
            found = scope.get_member(target) if "." not in target else None
        except (KeyError, ValueError, AttributeError):
            found = None
        if found is None and "." in target:
            head = target.split(".")[0]
            try:
                found = scope.get_member(head)
                for part in target.split(".")[1:]:
                    found = found.get_member(part)
            except (KeyError, ValueError, AttributeError):
                found = None
        if found is not None:
            try:   # an imported name: link to where it is defined
                path = found.final_target.path if found.is_alias else found.path
            except Exception:  # an alias griffe cannot resolve (outside the package)
                continue
            if not path.startswith("gpt2s."):
                continue
            return f"[`{target}`][{path}]"
    return keep if keep is not None else f"`{target}`"


def _parents(obj):
    p = obj.parent
    while p is not None:
        yield p
        p = p.parent
