"""The C-level kernel harness (tests/harness/kernel_harness.c): every instruction-set variant of
every weight type's kernels against the portable reference, compiled with the system C compiler
and run natively, then again with the levels above x86-64-v3 emulated by SIMDe (simde-py), so
that the AVX-512 and AVX-VNNI code runs on any x86-64-v3 CPU.  A case the CPU cannot run is
reported SKIP-CPU by the harness, never counted as passed."""

import os
import platform
import shutil
import signal
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
HARNESS = ROOT / "tests" / "harness" / "kernel_harness.c"
KERNELS = ROOT / "src" / "gpt2s" / "kernels"
# the harness compiles the kernels' C headers, which are in the source tree, not in a wheel
pytestmark = pytest.mark.skipif(not (KERNELS / "types.h").is_file(),
                                reason="the kernels' C headers (src/gpt2s/kernels) are not here: "
                                       "the harness runs from a source checkout")
FLAGS = ["-O2", "-std=gnu11", "-fno-trapping-math", "-fno-math-errno"]


def _cc():
    names = [os.environ["CC"]] if os.environ.get("CC") else ["cc", "gcc", "clang"]
    cc = next((shutil.which(name) for name in names if shutil.which(name)), None)
    if not cc:
        pytest.skip(f"no C compiler ({', '.join(names)}) on PATH")
    return cc


def _build_and_run(cc, args, exe, runner=(), source=HARNESS):
    build = subprocess.run([cc, *FLAGS, *args, "-I", str(KERNELS), str(source), "-lm", "-o", str(exe)],
                           capture_output=True, text=True)
    if build.returncode != 0 and "needs a compiler that builds the AVX-512 variants" in build.stderr:
        pytest.skip(f"{cc} cannot build the AVX-512 variants (GCC >= 11 or clang >= 13 can)")
    assert build.returncode == 0, f"harness did not compile:\n{build.stderr}"
    run = subprocess.run([*runner, str(exe)], capture_output=True, text=True, timeout=300)
    if run.returncode == -signal.SIGILL and "-mavx2" in args:
        pytest.skip("illegal instruction: this CPU lacks x86-64-v3 (AVX2, FMA, F16C), which the SIMDe "
                    "build is compiled for")
    lines = run.stdout.splitlines()
    failed = [line for line in lines if line.startswith("FAIL")]
    assert run.returncode == 0 and not failed, "\n".join(failed) or run.stdout + run.stderr
    return lines


def test_native(tmp_path):
    lines = _build_and_run(_cc(), [], tmp_path / "harness")
    assert any(line.startswith("PASS") for line in lines)
    passed = [line for line in lines if line.startswith("PASS")]
    skipped = [line for line in lines if line.startswith("SKIP-CPU")]
    # the quantizers (portable) always run; every case is either run or skipped by CPU
    assert any("quantize" in line for line in passed)
    if platform.machine().lower() in ("x86_64", "amd64"):   # x86-64-v3 is built with GCC / clang
        assert any(" x86-64-v3 " in line for line in passed + skipped), lines[-1]


@pytest.mark.skipif(platform.machine().lower() not in ("x86_64", "amd64"),
                    reason="SIMDe emulation of the x86 variants: x86-64 only")
def test_simde_emulated(tmp_path):
    simde_py = pytest.importorskip("simde_py", reason="simde-py is not installed (pip install simde-py)")
    cc = _cc()
    lines = _build_and_run(cc, ["-mavx2", "-mfma", "-mf16c", "-Wno-psabi", "-DGPT2S_HARNESS_SIMDE",
                                "-I", simde_py.get_include(), "-I", str(HARNESS.parent)],
                           tmp_path / "harness_simde")
    if any(line.startswith("SKIP-CPU") for line in lines):
        pytest.skip("this CPU has no AVX2/FMA/F16C (x86-64-v3), which the SIMDe build needs: "
                    + next(line for line in lines if line.startswith("SKIP-CPU")))
    # every level above x86-64-v3 ran (emulated)
    for level in ("avx-vnni", "avx512"):
        assert any(line.startswith("PASS") and f" {level} " in line for line in lines), level


@pytest.mark.skipif(platform.machine().lower() not in ("x86_64", "amd64"),
                    reason="the SIMDe shim maps x86 intrinsics: x86-64 only")
def test_simde_shim_matches_hardware(tmp_path):
    """simde_shim.h's portable fallbacks (what SIMDe 0.8.2 lacks or reads past its lanes)
    equal the instructions themselves, where this CPU has them (tests/harness/shim_check.c)."""
    simde_py = pytest.importorskip("simde_py", reason="simde-py is not installed (pip install simde-py)")
    lines = _build_and_run(_cc(), ["-mavx2", "-mfma", "-mf16c", "-Wno-psabi", "-I", simde_py.get_include(),
                                   "-I", str(HARNESS.parent)],
                           tmp_path / "shim_check", source=HARNESS.parent / "shim_check.c")
    if not any(line.startswith("PASS") for line in lines):
        pytest.skip("this CPU has none of AVX-VNNI, AVX512_BF16, AVX-512: " + "; ".join(lines))


def test_aarch64_under_qemu(tmp_path):
    """The harness cross-compiled for aarch64 (Debian's gcc-aarch64-linux-gnu) and run under
    qemu-aarch64 -cpu max (Debian's qemu-user): the portable path (quantizers, widenings);
    the aarch64 variants join the same run once they exist."""
    cc = shutil.which("aarch64-linux-gnu-gcc")
    qemu = shutil.which("qemu-aarch64")
    if not cc or not qemu:
        pytest.skip("no aarch64 cross compiler (gcc-aarch64-linux-gnu) or qemu-aarch64 (qemu-user)")
    lines = _build_and_run(cc, ["-static"], tmp_path / "harness_aarch64", runner=(qemu, "-cpu", "max"))
    passed = [line for line in lines if line.startswith("PASS")]
    assert any("quantize" in line for line in passed) and any("widen" in line for line in passed)
