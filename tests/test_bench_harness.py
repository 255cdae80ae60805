"""benchmarks/harness.py, the helpers every benchmark script shares: the bookkeeping of
alternating timed rounds, the detector of rounds that other processes disturbed (fed synthetic
/proc readings and a fake clock: nothing here sleeps or looks at how fast anything is), peak
RSS, the error metrics and the machine description."""

import ast
import math
import os
import statistics
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

BENCH_DIR = Path(__file__).resolve().parents[1] / "benchmarks"

pytestmark = pytest.mark.skipif(not BENCH_DIR.is_dir(), reason="benchmarks/ is not in this "
                                "tree (tests run against an installed wheel)")


@pytest.fixture(scope="module")
def harness():
    import harness   # benchmarks/ is on sys.path: pyproject.toml's pytest pythonpath
    return harness


# ------------------------------------------------------------------------ rounds and medians

@pytest.mark.parametrize("xs", [[3.0], [5.0, 1.0], [4.0, 1.0, 3.0, 2.0],
                                [0.3, 0.1, 0.2, 9.0, 0.15]])
def test_median_matches_statistics(harness, xs):
    assert harness.median(xs) == statistics.median(xs)
    assert harness.median(xs + [None]) == statistics.median(xs)   # None: a missing reading
    assert harness.median([]) is None and harness.median([None]) is None


class FakeClock:
    """A clock that only the timed functions move: each call of a function advances it by that
    function's next duration."""

    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now

    def function(self, name, durations, calls):
        durations = list(durations)

        def fn():
            calls.append(name)
            self.now += durations.pop(0)
        return fn


def test_run_alternating_rounds(harness):
    clock, calls = FakeClock(), []
    # two warm-up calls, then four timed ones; binary fractions keep the fake clock exact
    a = [64.0, 128.0, 0.5, 0.25, 1.0, 0.75]
    b = [64.0, 128.0, 2.0, 4.0, 1.0, 3.0]
    fns = {"a": clock.function("a", a, calls), "b": clock.function("b", b, calls)}
    res = harness.run_alternating(fns, repeats=4, warmup=2, clock=clock)
    assert calls == ["a", "b"] * 6                # warm-ups too alternate, then A B per round
    for name, durations in (("a", a[2:]), ("b", b[2:])):
        r = res[name]
        assert r["times_s"] == durations and r["n"] == 4
        assert r["median_s"] == statistics.median(durations)
        assert (r["min_s"], r["max_s"]) == (min(durations), max(durations))
        assert "rounds_discarded" not in r        # no guard, no load bookkeeping


# --------------------------------------------------------------------------- quiet machine

def write_stat(path, fields):
    """A /proc/stat: the machine's "cpu" line with these tick counts, then one per CPU."""
    path.write_text("cpu  " + " ".join(map(str, fields)) + "\n"
                    "cpu0 " + " ".join("1" for _ in fields) + "\nintr 12345 0 0\n")
    return str(path)


def test_machine_busy_s_from_proc_stat(harness, tmp_path):
    # user nice system idle iowait irq softirq steal guest guest_nice (proc(5)): busy is all
    # but idle and iowait; guest is already counted inside user
    stat = write_stat(tmp_path / "stat", [100, 20, 30, 1000, 50, 5, 5, 10, 7, 3])
    hz = os.sysconf("SC_CLK_TCK")
    assert harness.machine_busy_s(stat) == pytest.approx((100 + 20 + 30 + 5 + 5 + 10) / hz)
    snap = harness.cpu_snapshot(stat)
    assert snap[1] == pytest.approx(170 / hz) and snap[2] >= 0
    assert harness.machine_busy_s(str(tmp_path / "missing")) is None
    assert harness.cpu_snapshot(str(tmp_path / "missing")) is None
    assert harness.machine_busy_s(write_stat(tmp_path / "short", [1, 2, 3])) is None


def test_other_load(harness):
    # 3 s of the machine's CPU over 2 s of wall time, 1 s of it ours: others used 1 core
    assert harness.other_load((10.0, 100.0, 5.0), (12.0, 103.0, 6.0)) == pytest.approx(1.0)
    # our own CPU time is counted in getrusage before /proc/stat shows it: never below 0
    assert harness.other_load((10.0, 100.0, 5.0), (12.0, 100.5, 6.0)) == 0.0
    assert harness.other_load(None, (12.0, 100.0, 5.0)) is None
    assert harness.other_load((12.0, 100.0, 5.0), (12.0, 101.0, 5.0)) is None


class FakeMachine:
    """Snapshots of a machine whose other processes use loads[i] cores during window i (each
    window one wall second, this process using none)."""

    def __init__(self, loads):
        self.loads = list(loads)
        self.snapshots = 0
        self.wall = self.busy = 0.0

    def snapshot(self):
        if self.snapshots % 2:                    # the second of a pair closes a window
            self.wall += 1.0
            self.busy += self.loads.pop(0)
        self.snapshots += 1
        return self.wall, self.busy, 0.0


def test_guard_redoes_disturbed_rounds(harness):
    # round 1 quiet; round 2 disturbed once, then quiet; round 3 disturbed every time: kept
    # after max_redo redos, with its load
    machine = FakeMachine([0.05, 0.5, 0.0] + [0.9] * 4)
    waits = []
    guard = harness.QuietGuard(wait_s=30.0, max_load=0.15, max_redo=3,
                               snapshot=machine.snapshot, wait=waits.append)
    clock, calls = FakeClock(), []
    fns = {"a": clock.function("a", [1.0] * 9, calls), "b": clock.function("b", [2.0] * 9, calls)}
    res = harness.run_alternating(fns, repeats=3, warmup=1, guard=guard, clock=clock)
    assert calls == ["a", "b"] * 8                # 1 warm-up + 3 kept + 4 discarded rounds
    assert waits == [30.0] * 4                    # a wait for quiet before each redo
    for r in res.values():
        assert r["n"] == 3
        assert r["other_load_per_round"] == pytest.approx([0.05, 0.0, 0.9])
        assert r["rounds_discarded"] == 4
    assert guard.discarded == 4 and guard.loads == pytest.approx([0.05, 0.0, 0.9])
    assert machine.loads == []


def test_guard_without_waiting_redoes_nothing(harness):
    machine = FakeMachine([0.9, 0.9])
    guard = harness.QuietGuard(wait_s=0.0, snapshot=machine.snapshot,
                               wait=lambda s: pytest.fail("waited"))
    res = harness.run_alternating({"a": lambda: None}, repeats=2, warmup=0, guard=guard)
    assert res["a"]["n"] == 2 and res["a"]["rounds_discarded"] == 0
    assert res["a"]["other_load_per_round"] == pytest.approx([0.9, 0.9])
    assert guard.discarded == 0


def test_redo_while_disturbed(harness):
    def rounds(*loads):
        it = iter(enumerate(loads))
        return lambda: next(it)

    discarded = []
    # above the limit: redone; at the limit or unknown: kept
    assert harness.redo_while_disturbed(rounds(0.5, 0.25), 0.25, 2, discarded.append) == \
        (1, 0.25, 1)
    assert discarded == [0.5]
    assert harness.redo_while_disturbed(rounds(None), 0.1, 2) == (0, None, 0)
    assert harness.redo_while_disturbed(rounds(0.5, 0.5, 0.5, 0.0), 0.1, 2) == (2, 0.5, 2)
    assert harness.redo_while_disturbed(rounds(0.5), 0.1, 0) == (0, 0.5, 0)


def test_wait_quiet(harness):
    def waiting(loads, limit_s):
        machine, now = FakeMachine(loads), [0.0]

        def sleep(s):
            now[0] += s
        return harness.wait_quiet(limit_s, 0.1, machine.snapshot, sleep, lambda: now[0]), machine

    (waited, load), m = waiting([0.5, 0.3, 0.05, 0.9], 60.0)   # quiet in the third window
    assert (waited, load) == (3.0, pytest.approx(0.05)) and m.loads == [0.9]
    (waited, load), m = waiting([0.5] * 5, 2.0)                  # never quiet: gives up at 2 s
    assert (waited, load) == (2.0, pytest.approx(0.5)) and len(m.loads) == 3
    (waited, load), m = waiting([0.5], 0.0)                      # not asked to wait
    assert (waited, load) == (0.0, None) and m.snapshots == 0


# ------------------------------------------------------------------------------ peak RSS

def test_vm_hwm_from_proc_status(harness, tmp_path):
    status = tmp_path / "status"
    status.write_text("Name:\tpython\nVmPeak:\t  900000 kB\nVmSize:\t  800000 kB\n"
                      "VmHWM:\t  204800 kB\nVmRSS:\t  102400 kB\n")
    assert harness.vm_hwm_mib(str(status)) == 200.0
    assert harness.vm_hwm_mib(str(tmp_path / "missing")) is None


def _in_fresh_python(code):
    env = dict(os.environ, PYTHONPATH=str(BENCH_DIR))
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       timeout=120, env=env, cwd=BENCH_DIR)
    assert p.returncode == 0, p.stderr[-3000:]
    return p.stdout


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs Linux /proc")
def test_peak_rss_of_a_process(harness):
    """A fresh process that touches 256 MiB reports a peak of at least that, by VmHWM and by
    ru_maxrss, and peak_rss_mib is the VmHWM.  Only VmHWM has an upper bound: on Linux
    ru_maxrss of a fork + exec child starts at its parent's mark (the test runner's, which can
    be gigabytes by the time this runs), which is why the harness reports VmHWM."""
    out = _in_fresh_python("import harness\nb = bytearray(256 << 20)\ndel b\n"
                           "print(harness.vm_hwm_mib(), harness.ru_maxrss_mib(), "
                           "harness.peak_rss_mib())")
    hwm, maxrss, peak = map(float, out.split())
    assert 256 <= hwm < 256 + 200 and maxrss >= 256
    assert peak >= hwm   # read after vm_hwm_mib: the mark can only have grown


def test_importing_the_harness_leaves_numpy_out():
    """gpt2s_runner.py's peak RSS is part of what it reports: importing it (and the harness)
    must not load NumPy or gpt2s before the measured work does."""
    out = _in_fresh_python("import sys, harness, gpt2s_runner\n"
                           "print(sorted(m for m in ('numpy', 'gpt2s') if m in sys.modules))")
    assert out.strip() == "[]"


# -------------------------------------------------------------------------------- metrics

def test_rel_l2_against_a_float64_sum(harness):
    rng = np.random.default_rng(0)
    b = rng.standard_normal((3, 4, 5)).astype(np.float32)
    a = b + (1e-3 * rng.standard_normal(b.shape)).astype(np.float32)
    da = [float(x) for x in a.ravel()]
    db = [float(x) for x in b.ravel()]
    want = math.sqrt(math.fsum((x - y) ** 2 for x, y in zip(da, db))) / \
        math.sqrt(math.fsum(y * y for y in db))
    assert harness.rel_l2(a, b) == pytest.approx(want, rel=1e-12)
    assert harness.rel_l2(a, b) == pytest.approx(
        np.linalg.norm(a.astype(np.float64) - b) / np.linalg.norm(b.astype(np.float64)),
        rel=1e-12)
    assert harness.rel_l2(b, b) == 0.0
    assert harness.rel_l2([1.0, 0.0], [0.0, 0.0]) > 1e20   # a zero reference: huge, not a crash


def test_max_rel_error(harness):
    assert harness.max_rel_error(3.0, 2.0) == pytest.approx(0.5)
    assert harness.max_rel_error([1.0, -4.0, 2.5], [1.5, -4.0, 2.0]) == pytest.approx(0.5 / 4.0)
    assert harness.max_rel_error(np.ones((2, 3)), np.ones((2, 3))) == 0.0


# ------------------------------------------------------------------------------- machine

def test_cpu_info_from_proc_cpuinfo(harness, tmp_path):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(
        "processor\t: 0\nvendor_id\t: AuthenticAMD\ncpu family\t: 25\nmodel\t\t: 17\n"
        "model name\t: AMD EPYC 9R14 96-Core Processor\n"
        "flags\t\t: fpu sse2 avx f16c fma avx2 avx512f avx512_bf16 avx512_vnni sha_ni\n\n"
        "processor\t: 1\ncpu family\t: 6\nmodel\t\t: 85\nmodel name\t: Other CPU\n"
        "flags\t\t: fpu sse2 avx_vnni amx_tile\n")
    info = harness.cpu_info(str(cpuinfo))
    assert info["name"] == "AMD EPYC 9R14 96-Core Processor"
    assert (info["family"], info["model"]) == ("25", "17")
    assert harness.kernel_isa(info["flags"]) == ["avx2", "fma", "f16c", "avx512f",
                                                  "avx512_bf16", "avx512_vnni"]
    assert harness.amd_core(info["name"], info["family"], info["model"]) == "Zen 4"
    arm = tmp_path / "arm"
    arm.write_text("processor\t: 0\nFeatures\t: fp asimd evtstrm crc32\nCPU part\t: 0xd0c\n")
    info = harness.cpu_info(str(arm))
    assert harness.kernel_isa(info["flags"]) == ["asimd"] and info["name"]   # platform.machine()


def test_arm_cpu_without_model_name(harness, tmp_path):
    """Arm's /proc/cpuinfo names no model: the implementer and part numbers stand in, and the
    dot-product / BF16 features count among the kernel flags."""
    arm = tmp_path / "arm"
    arm.write_text("processor\t: 0\nFeatures\t: fp asimd asimddp bf16 i8mm sve\n"
                   "CPU implementer\t: 0x41\nCPU part\t: 0xd40\n")
    info = harness.cpu_info(str(arm))
    assert "CPU implementer 0x41, part 0xd40" in info["name"]
    assert harness.kernel_isa(info["flags"]) == ["asimd", "asimddp", "bf16", "i8mm"]


def test_announce_machine_names_cpu_and_kernels(harness, capsys):
    """Every benchmark's provenance: the CPU model, its kernel flags and the variant each weight
    type runs, printed on one line and returned for the results."""
    from gpt2s import _core
    machine = harness.announce_machine()
    line = capsys.readouterr().out.strip()
    assert machine["kernels"] == {t: _core.get_kernel_variant(t) for t in _core.weight_types()}
    assert machine["cpu_levels"] == list(_core.cpu_variants())
    assert line == harness.provenance_line(machine) and machine["cpu"] in line
    for t, variant in machine["kernels"].items():
        assert f"{t} {variant}" in line
    harness.announce_machine(file=None)
    assert capsys.readouterr().out == ""


def test_every_benchmark_script_announces_its_machine():
    """Each timing script calls announce_machine (directly, or through vs_llama_cpp's
    machine_info, or bench.py's provenance_line over machine_description); dp_scaling_plot
    only plots dp_step's results (which carry the machine) and torch_gpt2 is a model, not a
    script."""
    exempt = {"harness.py", "dp_scaling_plot.py", "torch_gpt2.py"}
    missing = [f.name for f in sorted(BENCH_DIR.glob("*.py")) if f.name not in exempt
               and not any(call in f.read_text() for call in
                           ("announce_machine(", "provenance_line(", "machine_info("))]
    assert missing == []


def test_mem_gib(harness, tmp_path):
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:       16777216 kB\nMemFree:         1048576 kB\n")
    assert harness.mem_gib(str(meminfo)) == 16.0
    assert harness.mem_gib(str(tmp_path / "missing")) is None


def test_scripts_do_not_edit_sys_path():
    """The scripts share the harness by a plain import: none of them (nor the benchmark tests)
    edits sys.path to find its neighbours."""
    files = sorted(BENCH_DIR.glob("*.py")) + sorted(Path(__file__).parent.glob("test_bench*.py"))
    offenders = []
    for f in files:
        for node in ast.walk(ast.parse(f.read_text(), str(f))):
            if (isinstance(node, ast.Attribute) and node.attr == "path"
                    and isinstance(node.value, ast.Name) and node.value.id == "sys"):
                offenders.append(f"{f.name}:{node.lineno}")
    assert offenders == []
