"""Checks what a gpt2s wheel holds.  Used after every cibuildwheel repair step
(pyproject.toml) and by tools/check_wheel.sh.

    python tools/check_wheel_contents.py WHEEL_OR_DIR... [--no-openmp-runtime] [--project DIR]

Required: the compiled gpt2s._core (exactly one), gpt2s/__init__.py, the bundled BPE ranks
(gpt2s/assets/gpt2.tiktoken), py.typed and the _core.pyi stub, and the demo model
(gpt2s/assets/demo/model.safetensors) when the project tree has one.  After a repair step the
wheel also carries the OpenMP runtime its platform needs (libgomp on Linux, libomp on macOS,
vcomp140.dll on Windows); --no-openmp-runtime skips that for an unrepaired wheel.
Forbidden: tests, benchmarks, Cython/C sources (.pyx .pxd .pxi .c .h), build junk (CMake
files, object files, __pycache__, .pyc).  Only the standard library is used.
Exit status 0 when every wheel passes; otherwise the problems are printed and it is 1.
"""

from __future__ import annotations

import argparse
import re
import sys
import zipfile
from pathlib import Path, PurePosixPath

REQUIRED = ["gpt2s/__init__.py", "gpt2s/assets/gpt2.tiktoken", "gpt2s/py.typed", "gpt2s/_core.pyi"]
DEMO_MODEL = "gpt2s/assets/demo/model.safetensors"
CORE_EXT = re.compile(r"^gpt2s/_core(\.[\w.-]+)?\.(so|pyd)$")
FORBIDDEN_SUFFIXES = {".pyx", ".pxd", ".pxi", ".c", ".h", ".o", ".obj", ".a", ".lib", ".pyc",
                      ".cmake", ".ninja", ".html"}
FORBIDDEN_PARTS = {"tests", "benchmarks", "__pycache__", "CMakeFiles", "build", ".git"}
FORBIDDEN_NAMES = {"CMakeCache.txt", "Makefile", "build.ninja", "compile_commands.json",
                   "conftest.py", "ref.py"}
# the OpenMP runtime a repaired wheel must carry, by platform tag
OPENMP_RUNTIME = [
    (re.compile(r"(many|musl)linux"), re.compile(r"^gpt2s\.libs/libgomp[-.\w]*\.so[.\d]*$"),
     "libgomp grafted by auditwheel into gpt2s.libs/"),
    (re.compile(r"macosx"), re.compile(r"^gpt2s/\.dylibs/libomp\.dylib$"),
     "libomp.dylib copied by delocate into gpt2s/.dylibs/"),
    (re.compile(r"win"), re.compile(r"^gpt2s\.libs/vcomp140[-.\w]*\.dll$", re.IGNORECASE),
     "vcomp140.dll copied by delvewheel into gpt2s.libs/"),
]


def check_wheel(path: Path, project: Path, openmp_runtime: bool) -> list[str]:
    problems = []
    with zipfile.ZipFile(path) as zf:
        names = [n for n in zf.namelist() if not n.endswith("/")]
    data = [n for n in names if not n.split("/", 1)[0].endswith(".dist-info")]
    required = list(REQUIRED)
    if (project / "src" / DEMO_MODEL).is_file():
        required.append(DEMO_MODEL)
    for r in required:
        if r not in names:
            problems.append(f"missing {r}")
    cores = [n for n in names if CORE_EXT.match(n)]
    if len(cores) != 1:
        problems.append(f"expected one compiled gpt2s/_core extension, found {cores or 'none'}")
    for n in data:
        p = PurePosixPath(n)
        if p.suffix.lower() in FORBIDDEN_SUFFIXES or p.name in FORBIDDEN_NAMES \
                or FORBIDDEN_PARTS & set(p.parts[:-1]):
            problems.append(f"should not ship: {n}")
        elif not (n.startswith("gpt2s/") or n.startswith("gpt2s.libs/")):
            problems.append(f"outside the gpt2s package: {n}")
    if openmp_runtime:
        tag = path.name.rsplit("-", 1)[-1]
        for platform, pattern, what in OPENMP_RUNTIME:
            if platform.search(tag):
                if not any(pattern.match(n) for n in names):
                    problems.append(f"no OpenMP runtime: expected {what}")
                break
        else:
            problems.append(f"unknown platform tag {tag!r}: cannot tell which OpenMP runtime")
    return problems


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("paths", nargs="+", type=Path, help="wheels, or directories of wheels")
    ap.add_argument("--no-openmp-runtime", action="store_true",
                    help="do not require a bundled OpenMP runtime (unrepaired wheel)")
    ap.add_argument("--project", type=Path, default=Path(__file__).resolve().parent.parent,
                    help="project root, to know whether the demo model exists (default: ..)")
    args = ap.parse_args(argv)
    wheels = []
    for p in args.paths:
        wheels += sorted(p.glob("*.whl")) if p.is_dir() else [p]
    if not wheels:
        print(f"check_wheel_contents: no wheel in {[str(p) for p in args.paths]}")
        return 1
    failed = False
    for w in wheels:
        problems = check_wheel(w, args.project, not args.no_openmp_runtime)
        with zipfile.ZipFile(w) as zf:
            n = len(zf.namelist())
        if problems:
            failed = True
            print(f"check_wheel_contents: {w.name}: FAIL")
            for msg in problems:
                print(f"  - {msg}")
        else:
            print(f"check_wheel_contents: {w.name}: OK ({n} files)")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
