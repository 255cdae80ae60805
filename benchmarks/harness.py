"""What the benchmark scripts share: timing in alternating rounds, the quiet-machine guard,
peak RSS, error metrics and a description of the machine.

Scripts import it as ``import harness`` (run as ``python benchmarks/x.py``, the script's own
folder is on ``sys.path``); the tests get benchmarks/ on ``sys.path`` from pytest's
``pythonpath`` setting in pyproject.toml.

Only the standard library is imported here at module level: gpt2s_runner.py reports its own
peak RSS, so importing this must not pull NumPy in (the error metrics import it when called).
"""

from __future__ import annotations

import contextlib
import os
import platform
import resource
import subprocess
import sys
import time

# ----------------------------------------------------------------------------- statistics


def median(xs) -> float | None:
    """Median of the values that are not None (the mean of the middle two for an even count);
    None when there are none."""
    xs = sorted(x for x in xs if x is not None)
    if not xs:
        return None
    n = len(xs)
    return xs[n // 2] if n % 2 else (xs[n // 2 - 1] + xs[n // 2]) / 2


def summarize_times(times: list[float]) -> dict:
    """median_s, min_s, max_s, n and every time (times_s) of a list of timed runs."""
    return {"median_s": float(median(times)), "min_s": float(min(times)),
            "max_s": float(max(times)), "n": len(times), "times_s": [float(t) for t in times]}


# ---------------------------------------------------------------------------------- timing


def time_call(fn, settle: float = 0.0, clock=time.perf_counter) -> float:
    """Duration of one fn() on `clock`, after sleeping `settle` seconds: OpenMP and OpenBLAS
    workers spin for a few ms after a parallel region and must not steal the cores of the run
    that follows."""
    if settle > 0:
        time.sleep(settle)
    t0 = clock()
    fn()
    return clock() - t0


def run_alternating(fns: dict, repeats: int, warmup: int, settle: float = 0.0, guard=None,
                    clock=time.perf_counter) -> dict:
    """Call each function `warmup` times untimed, then time them in rounds (A B C, A B C, ...),
    `repeats` rounds, each call after a `settle` s idle gap.  Returns {name: summarize_times}.

    With a QuietGuard, a round that other processes disturbed is redone (see QuietGuard), and
    every summary also gets the other processes' load of each kept round
    (other_load_per_round) and the number of rounds discarded (rounds_discarded)."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict = {k: [] for k in fns}
    loads, discarded = [], 0

    def one_round():
        snap = guard.snapshot() if guard is not None else None
        got = {k: time_call(fn, settle, clock) for k, fn in fns.items()}
        return got, (other_load(snap, guard.snapshot()) if guard is not None else None)

    for _ in range(repeats):
        if guard is None:
            round_times, _ = one_round()
        else:
            round_times, load, redone = guard.run_round(one_round)
            loads.append(load)
            discarded += redone
        for k, t in round_times.items():
            times[k].append(t)
    out = {k: summarize_times(v) for k, v in times.items()}
    if guard is not None:
        for r in out.values():
            r["other_load_per_round"] = loads
            r["rounds_discarded"] = discarded
    return out


def numpy_blas_threads(n: int):
    """A context limiting NumPy's own BLAS to n threads, and only NumPy's: gpt2s's BLAS
    (SciPy's OpenBLAS, 1 thread, called from inside OpenMP regions) must stay as gpt2s set it,
    or its matmuls oversubscribe the cores ("OpenBLAS Warning: Detect OpenMP Loop")."""
    try:
        from threadpoolctl import ThreadpoolController
    except ImportError:
        return contextlib.nullcontext()
    ctl = ThreadpoolController()
    libs = [lib.filepath for lib in ctl.lib_controllers
            if lib.user_api == "blas" and "numpy" in os.path.basename(os.path.dirname(
                lib.filepath))]
    if not libs:
        return contextlib.nullcontext()
    return ctl.select(filepath=libs[0]).limit(limits=n)


# -------------------------------------------------------------------------- quiet machine
# With two threads on two cores, one busy neighbour can double a step time (every OpenMP
# region waits for the descheduled thread): what other processes used is measured around every
# timed run, from the machine's CPU time (/proc/stat) minus this process's own (getrusage).


def machine_busy_s(stat_path: str = "/proc/stat") -> float | None:
    """CPU seconds every process on the machine has used since boot: the first ("cpu") line of
    /proc/stat, user + nice + system + irq + softirq + steal (idle and iowait are not work;
    guest time is already inside user).  None where the file is missing or unreadable."""
    try:
        with open(stat_path) as f:
            ticks = [int(v) for v in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    if len(ticks) < 8:
        return None
    return (sum(ticks[:8]) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK")


def own_cpu_s() -> float:
    """CPU seconds of this process and its reaped children."""
    total = 0.0
    for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN):
        ru = resource.getrusage(who)
        total += ru.ru_utime + ru.ru_stime
    return total


def cpu_snapshot(stat_path: str = "/proc/stat"):
    """(wall s, CPU s of every process on the machine, CPU s of this process and its reaped
    children), or None without /proc/stat."""
    busy = machine_busy_s(stat_path)
    if busy is None:
        return None
    return time.perf_counter(), busy, own_cpu_s()


def other_load(before, after) -> float | None:
    """Cores' worth of CPU time that other processes used between two snapshots: timings taken
    while this is well above 0 are disturbed.  None when either snapshot is missing."""
    if before is None or after is None or after[0] <= before[0]:
        return None
    return max(0.0, ((after[1] - before[1]) - (after[2] - before[2])) / (after[0] - before[0]))


def wait_quiet(limit_s: float, threshold: float = 0.1, snapshot=cpu_snapshot,
               sleep=time.sleep, clock=time.perf_counter):
    """Watch 1 s windows until other processes used < threshold cores in one, or limit_s has
    passed; returns (seconds waited, other load of the last window or None).  Returns at once
    when limit_s <= 0 or the load cannot be read."""
    t0 = clock()
    load = None
    while limit_s > 0:
        snap = snapshot()
        if snap is None:
            break
        sleep(1.0)
        load = other_load(snap, snapshot()) or 0.0
        if load < threshold or clock() - t0 >= limit_s:
            break
    return clock() - t0, load


def redo_while_disturbed(run_round, max_load: float, max_redo: int, on_discard=None):
    """run_round() -> (result, load); run it again while load (other processes' cores) is above
    max_load, at most max_redo more times, calling on_discard(load) for each round thrown away.
    An unknown load (None) counts as quiet.  Returns (result, load, rounds discarded)."""
    for attempt in range(max_redo + 1):
        result, load = run_round()
        if load is None or load <= max_load or attempt == max_redo:
            return result, load, attempt
        if on_discard is not None:
            on_discard(load)
    raise ValueError(f"max_redo must be >= 0, got {max_redo}")


class QuietGuard:
    """For shared machines: with wait_s > 0, a round of timed runs during which other
    processes used more than max_load cores is thrown away and redone (at most max_redo times
    per round) after waiting up to wait_s s for the machine to go quiet.  With wait_s == 0
    nothing is redone, but the load of every round is still recorded.  `loads` and `discarded`
    are tallies over everything run under this guard."""

    def __init__(self, wait_s: float = 0.0, max_load: float = 0.15, max_redo: int = 5,
                 snapshot=cpu_snapshot, wait=wait_quiet):
        self.wait_s, self.max_load, self.max_redo = wait_s, max_load, max_redo
        self.snapshot, self.wait = snapshot, wait
        self.loads: list[float] = []
        self.discarded = 0

    def _discard(self, load):
        self.discarded += 1
        self.wait(self.wait_s)

    def run_round(self, run_round):
        """(result, load, rounds discarded) of run_round() -> (result, load), redone while
        disturbed."""
        result, load, redone = redo_while_disturbed(
            run_round, self.max_load, self.max_redo if self.wait_s > 0 else 0, self._discard)
        if load is not None:
            self.loads.append(load)
        return result, load, redone


# --------------------------------------------------------------------------------- memory


def vm_hwm_mib(status_path: str = "/proc/self/status") -> float | None:
    """The kernel's peak resident set of this address space since exec (VmHWM), MiB; None
    where /proc is missing."""
    try:
        with open(status_path) as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def ru_maxrss_mib() -> float:
    """getrusage's peak resident set of this process, MiB (bytes on macOS, KiB elsewhere).  On
    Linux a process started by fork + exec from a large one starts with its parent's mark."""
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r / 2**20 if sys.platform == "darwin" else r / 1024


def peak_rss_mib() -> float:
    """This process's peak resident set so far, MiB: VmHWM, or ru_maxrss without /proc."""
    hwm = vm_hwm_mib()
    return hwm if hwm is not None else ru_maxrss_mib()


# ---------------------------------------------------------------------------------- errors


def rel_l2(a, b) -> float:
    """||a - b|| / ||b|| in float64 over all elements (b is the reference)."""
    import numpy as np
    a = np.asarray(a, np.float64).ravel()
    b = np.asarray(b, np.float64).ravel()
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def max_rel_error(a, b) -> float:
    """max |a - b| / max |b| in float64 (b is the reference): the relative error in the max
    norm; for two numbers, |a - b| / |b|."""
    import numpy as np
    a = np.asarray(a, np.float64).ravel()
    b = np.asarray(b, np.float64).ravel()
    return float(np.max(np.abs(a - b)) / max(float(np.max(np.abs(b))), 1e-30))


# -------------------------------------------------------------------------------- machine

# CPU flags that decide which kernels run: gpt2s's x86-64-v3 (AVX2/FMA/F16C) and AVX-512 /
# VNNI paths, AMX, and Arm's Advanced SIMD, dot products (asimddp), BF16 and I8MM
KERNEL_FLAGS = ("avx2", "fma", "f16c", "avx512f", "avx512_bf16", "avx512_vnni", "avx_vnni",
                "amx_tile", "asimd", "asimddp", "bf16", "i8mm")


def cpu_info(cpuinfo_path: str = "/proc/cpuinfo") -> dict:
    """The first processor's model name, family, model and flags ("Features" on Arm) from
    /proc/cpuinfo; without a model name (Arm): macOS's brand string, else platform.machine()
    and the CPU implementer / part numbers."""
    info = {"name": None, "family": "", "model": "", "flags": set()}
    arm = {}
    try:
        with open(cpuinfo_path) as f:
            for line in f:
                key, _, value = line.partition(":")
                key, value = key.strip(), value.strip()
                if key in ("CPU implementer", "CPU part"):   # Arm names no model
                    arm.setdefault(key, value)
                if key == "model name" and info["name"] is None:
                    info["name"] = value
                elif key == "cpu family" and not info["family"]:
                    info["family"] = value
                elif key == "model" and not info["model"]:
                    info["model"] = value
                elif key in ("flags", "Features") and not info["flags"]:
                    info["flags"] = set(value.split())
    except OSError:
        pass
    if info["name"] is None and sys.platform == "darwin":
        try:   # "Apple M2"
            info["name"] = subprocess.run(["sysctl", "-n", "machdep.cpu.brand_string"],
                                          capture_output=True, text=True,
                                          timeout=10).stdout.strip() or None
        except (OSError, subprocess.SubprocessError):
            pass
    if info["name"] is None:
        info["name"] = platform.machine() + (
            f" (CPU implementer {arm.get('CPU implementer', '?')}, part {arm['CPU part']})"
            if "CPU part" in arm else "")
    return info


def kernel_isa(flags) -> list[str]:
    """The KERNEL_FLAGS among `flags`, in KERNEL_FLAGS's order."""
    return [f for f in KERNEL_FLAGS if f in flags]


def amd_core(cpu: str, family: str, model: str) -> str | None:
    """AMD's core generation from /proc/cpuinfo's family and model numbers (model names such as
    "AMD EPYC" in a VM often omit it)."""
    if "AMD" not in cpu or not family.isdigit() or not model.isdigit():
        return None
    fam, mod = int(family), int(model)
    if fam == 0x17:
        return "Zen 2" if mod >= 0x30 else "Zen / Zen+"
    if fam == 0x19:
        return "Zen 4" if 0x10 <= mod <= 0x1F or 0x60 <= mod <= 0xAF else "Zen 3"
    if fam == 0x1A:
        return "Zen 5"
    return None


def mem_gib(meminfo_path: str = "/proc/meminfo") -> float | None:
    """MemTotal in GiB, or None without /proc."""
    try:
        with open(meminfo_path) as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) / 2**20
    except (OSError, ValueError, IndexError):
        pass
    return None


def available_cores() -> int:
    """CPUs this process may run on (its affinity mask where the OS has one)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count()


def git_describe(repo) -> str | None:
    """`git describe --always --dirty` of the checkout at repo, or None outside one."""
    try:
        return subprocess.run(["git", "-C", str(repo), "describe", "--always", "--dirty"],
                              capture_output=True, text=True, timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def kernel_variants() -> dict:
    """The instruction sets gpt2s's kernels use in this process: {"cpu_levels": the levels
    this build has and this CPU runs (_core.cpu_variants), "kernels": {weight type: the
    variant its products run now (_core.get_kernel_variant)}}; both None where gpt2s cannot
    be imported (a script timing another program only)."""
    try:
        from gpt2s import _core
    except ImportError:
        return {"cpu_levels": None, "kernels": None}
    return {"cpu_levels": list(_core.cpu_variants()),
            "kernels": {t: _core.get_kernel_variant(t) for t in _core.weight_types()}}


def machine_description(repo) -> dict:
    """The machine a benchmark ran on: CPU (model name, family, model, the KERNEL_FLAGS it
    has), gpt2s's kernel variants in use (kernel_variants), cores available, memory,
    platform, Python, the git commit of repo and the load average now."""
    cpu = cpu_info()
    return {"cpu": cpu["name"], "cpu_family": cpu["family"], "cpu_model": cpu["model"],
            "isa": kernel_isa(cpu["flags"]), **kernel_variants(), "cores": available_cores(),
            "os_cpu_count": os.cpu_count(), "mem_gib": mem_gib(),
            "platform": platform.platform(), "python": platform.python_version(),
            "git": git_describe(repo), "loadavg_start": list(os.getloadavg())}


def provenance_line(machine: dict) -> str:
    """One line naming where a run's figures come from: the CPU model (and AMD core), its
    kernel-relevant flags and the kernel variant each weight type runs."""
    core = amd_core(machine.get("cpu") or "", machine.get("cpu_family") or "",
                    machine.get("cpu_model") or "")
    kernels = machine.get("kernels")
    used = (", ".join(f"{t} {v}" for t, v in kernels.items()) if kernels
            else "gpt2s not imported")
    return (f"cpu: {machine.get('cpu')}{f' ({core})' if core else ''}; "
            f"flags: {' '.join(machine.get('isa') or []) or 'none listed'}; "
            f"kernels: {used}")


_STDOUT = object()   # sys.stdout as it is at the call (pytest's capture replaces it)


def announce_machine(repo=None, file=_STDOUT) -> dict:
    """What every benchmark calls once before timing: prints provenance_line (to `file`; None:
    nothing) and returns machine_description(repo) for the script to record with its results,
    so that every figure says which CPU and which instruction sets it came from."""
    machine = machine_description(repo if repo is not None
                                  else os.path.dirname(os.path.abspath(__file__)))
    if file is not None:
        print(provenance_line(machine), file=sys.stdout if file is _STDOUT else file,
              flush=True)
    return machine
