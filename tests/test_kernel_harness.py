"""The C-level kernel harness (tests/harness/kernel_harness.c): every instruction-set variant of
every weight type's kernels against the portable reference, compiled with the system C compiler
and run natively, then again with the levels above x86-64-v3 emulated by SIMDe (simde-py), so
that the AVX-512 and AVX-VNNI code runs on any x86-64-v3 CPU, and cross-compiled for aarch64
and run under qemu-aarch64 on CPU models with and without the dotprod / bf16 extensions.  A
case the CPU cannot run is reported SKIP-CPU by the harness, never counted as passed."""

import os
import platform
import re
import shutil
import signal
import subprocess
import sys
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
    # int4's vpdpbusd and 512-bit kernels, every row count: x86-64-v3's outputs bit for bit
    for level in ("avx-vnni", "avx512", "avx512-vnni"):
        cases = [x for x in lines if x.startswith("PASS") and x.split()[1:4] == ["int4", level, "direct-out"]]
        assert len(cases) == 33 and all("bit-exact vs x86-64-v3" in x for x in cases), (level, len(cases))


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


# --------------------------------------------------------------------------- aarch64 (qemu)
# The aarch64 variants (neon, neon-dotprod; neon-bf16's probe) cross-compiled once with Debian's
# gcc-aarch64-linux-gnu and run under qemu-aarch64 (qemu-user) on three CPU models: "max" (every
# extension), "cortex-a76" (dotprod, no bf16) and "cortex-a53" (armv8.0: neither), so that the
# run-time choice is seen falling back (a dotprod instruction reached on the a53 would kill the
# run with SIGILL).

# what each qemu CPU model has (qemu 7.2 AT_HWCAP / AT_HWCAP2), and so what each type runs
QEMU_CPUS = {
    "max": (["portable", "neon", "neon-dotprod", "neon-bf16"],
            {"float32": "neon", "bfloat16": "neon", "int8": "neon-dotprod", "int4": "neon-dotprod"}),
    "cortex-a76": (["portable", "neon", "neon-dotprod"],
                   {"float32": "neon", "bfloat16": "neon", "int8": "neon-dotprod",
                    "int4": "neon-dotprod"}),
    "cortex-a53": (["portable", "neon"],
                   {"float32": "neon", "bfloat16": "neon", "int8": "neon", "int4": "neon"}),
}
# instructions of the extensions the dispatched levels add (FEAT_DotProd, FEAT_BF16, and
# FEAT_I8MM's, which no level may use yet)
EXTENSION_OPS = {"sdot", "udot", "usdot", "sudot", "bfdot", "bfmmla", "bfmlalb", "bfmlalt",
                 "bfcvt", "bfcvtn", "bfcvtn2", "smmla", "ummla", "usmmla"}


@pytest.fixture(scope="module")
def aarch64_harness(tmp_path_factory):
    """(qemu, the static aarch64 harness), built once for the module."""
    cc = shutil.which("aarch64-linux-gnu-gcc")
    qemu = shutil.which("qemu-aarch64")
    if not cc or not qemu:
        pytest.skip("no aarch64 cross compiler (gcc-aarch64-linux-gnu) or qemu-aarch64 (qemu-user)")
    exe = tmp_path_factory.mktemp("aarch64") / "harness_aarch64"
    build = subprocess.run([cc, *FLAGS, "-static", "-I", str(KERNELS), str(HARNESS), "-lm", "-o", str(exe)],
                           capture_output=True, text=True)
    assert build.returncode == 0, f"aarch64 harness did not compile:\n{build.stderr}"
    return qemu, exe


def _run_qemu(aarch64_harness, cpu, *args, timeout=600):
    qemu, exe = aarch64_harness
    run = subprocess.run([qemu, "-cpu", cpu, str(exe), *args], capture_output=True, text=True,
                         timeout=timeout)
    lines = run.stdout.splitlines()
    failed = [line for line in lines if line.startswith("FAIL")]
    assert run.returncode == 0 and not failed, \
        f"-cpu {cpu}: exit {run.returncode}\n" + ("\n".join(failed) or run.stdout + run.stderr)
    return lines


@pytest.mark.parametrize("cpu", list(QEMU_CPUS))
def test_aarch64_dispatch_under_qemu(aarch64_harness, cpu):
    """On each CPU model the run-time checks (getauxval) find exactly its extensions, each
    weight type picks the best level it has there, and the kernels that dispatch picks (through
    types.h's lookups, as _core's) pass against the portable reference; the neon-bf16 probe
    (bfdot, bfmmla) runs only where the CPU has them."""
    levels, best = QEMU_CPUS[cpu]
    lines = _run_qemu(aarch64_harness, cpu, "--dispatch")
    assert f"CPU-LEVELS {' '.join(levels)}" in lines, lines[:3]
    for wtype, variant in best.items():
        assert f"BEST {wtype} {variant}" in lines, (wtype, [x for x in lines if x.startswith("BEST")])
        ran = [x for x in lines if x.startswith("PASS") and x.split()[1] == wtype
               and x.split()[2] != "portable"]
        assert ran and all(x.split()[2] == variant for x in ran), ran
    # the portable quantizers and widenings against the formats' definitions
    assert sum(1 for x in lines if x.startswith("PASS") and " portable " in x) == 6, lines
    probe = [x for x in lines if "neon-bf16 probe" in x]
    assert len(probe) == 1 and probe[0].startswith("PASS" if "neon-bf16" in levels else "SKIP-CPU"), probe


def test_aarch64_extension_instructions_only_in_their_variants(aarch64_harness):
    """The baseline build carries no dotprod / bf16 instruction outside the functions of
    those levels (named *_arch_neon_dotprod, *_arch_neon_bf16), which run only after the
    run-time check: the same rule tools/check_wheel.sh applies to AVX on x86."""
    objdump = shutil.which("aarch64-linux-gnu-objdump")
    if not objdump:
        pytest.skip("no aarch64-linux-gnu-objdump (binutils-aarch64-linux-gnu)")
    _, exe = aarch64_harness
    dis = subprocess.run([objdump, "-d", "--no-show-raw-insn", str(exe)], capture_output=True,
                         text=True, check=True).stdout
    function, seen, stray = None, {}, []
    for line in dis.splitlines():
        head = re.match(r"^[0-9a-f]+ <(.+)>:$", line)
        if head:
            function = head.group(1)
            continue
        fields = line.split("\t")
        op = fields[1].split()[0] if len(fields) > 1 and fields[1].strip() else ""
        if op in EXTENSION_OPS:
            level = re.search(r"_arch_(neon_dotprod|neon_bf16)\b", function or "")
            allowed = {"neon_dotprod": {"sdot", "udot"},
                       "neon_bf16": {"bfdot", "bfmmla", "bfmlalb", "bfmlalt", "bfcvt", "bfcvtn",
                                     "bfcvtn2"}}.get(level.group(1) if level else "", set())
            (seen if op in allowed else {}).setdefault(function, set()).add(op)
            if op not in allowed:
                stray.append(f"{function}: {op}")
    assert not stray, stray
    # the dotprod kernels of both blocked types were built (and use the instructions)
    assert {"gpt2s_q8_nt_arch_neon_dotprod", "gpt2s_q4_nt_arch_neon_dotprod"} <= set(seen), seen


@pytest.mark.slow
def test_aarch64_every_variant_under_qemu(aarch64_harness):
    """Every aarch64 variant of every type against the portable reference on every tail shape,
    1 to 33 rows, under qemu -cpu max (every extension present): neon's and neon-dotprod's
    direct kernels within the float32 bound (plus the int16 rounding of one-row activations),
    the widenings bit for bit, neon-dotprod's int8 / int4 kernels equal to neon's bit for bit."""
    lines = _run_qemu(aarch64_harness, "max", timeout=1800)
    passed = [line for line in lines if line.startswith("PASS")]
    assert not any(line.startswith("SKIP-CPU") for line in lines)
    assert any("quantize" in line for line in passed)
    for wtype, layouts in {"float32": ("direct-in", "direct-out"), "bfloat16": ("direct-in", "direct-out", "widen"),
                           "int8": ("direct-out", "widen"), "int4": ("direct-out", "widen")}.items():
        for layout in layouts:
            cases = [x for x in passed if x.split()[1:4] == [wtype, "neon", layout]]
            assert len(cases) == (1 if layout == "widen" else 33), (wtype, layout, len(cases))
    for wtype in ("int8", "int4"):
        cases = [x for x in passed if x.split()[1:4] == [wtype, "neon-dotprod", "direct-out"]]
        assert len(cases) == 33 and all("bit-exact vs neon" in x for x in cases), cases[:2]
    assert any("neon-bf16 probe" in x for x in passed)


@pytest.mark.slow
def test_aarch64_core_module_compiles(aarch64_harness, tmp_path):
    """The package's own _core (Cython's C of _core.pyx, which includes kernels/types.h and
    its dispatch) compiles for aarch64 with every neon / neon-dotprod function in the table: the
    object holds them all.  Compiled against this Python's headers (LP64 both), not linked."""
    pytest.importorskip("Cython", reason="Cython is not installed")
    numpy = pytest.importorskip("numpy")
    import sysconfig
    cc = shutil.which("aarch64-linux-gnu-gcc")
    nm = shutil.which("aarch64-linux-gnu-nm")
    if not nm:
        pytest.skip("no aarch64-linux-gnu-nm (binutils-aarch64-linux-gnu)")
    core_c = tmp_path / "_core.c"
    subprocess.run([sys.executable, "-m", "cython", "-3", "-I", str(ROOT / "src" / "gpt2s"),
                    str(ROOT / "src" / "gpt2s" / "_core.pyx"), "-o", str(core_c)],
                   check=True, capture_output=True, text=True)
    obj = tmp_path / "_core.o"
    build = subprocess.run([cc, *FLAGS, "-fopenmp", "-fPIC", "-w", "-c", "-I", str(ROOT / "src" / "gpt2s"),
                            "-I", sysconfig.get_paths()["include"], "-I", numpy.get_include(),
                            str(core_c), "-o", str(obj)], capture_output=True, text=True)
    assert build.returncode == 0, build.stderr[-3000:]
    symbols = subprocess.run([nm, str(obj)], capture_output=True, text=True, check=True).stdout
    want = {f"gpt2s_{t}_{k}_arch_neon" for t, ks in {"f32": ("nn", "nt"), "bf16": ("nn", "nt", "widen"),
                                                     "q8": ("nt", "widen"), "q4": ("nt", "widen")}.items()
            for k in ks} | {"gpt2s_q8_nt_arch_neon_dotprod", "gpt2s_q4_nt_arch_neon_dotprod"}
    assert want <= {line.split()[-1] for line in symbols.splitlines() if line.strip()}
