"""One thread count for both pools: our OpenMP team and the BLAS our kernels call.

Our matmuls call a single-threaded sgemm from each OpenMP thread, so the BLAS library behind
scipy.linalg.cython_blas is limited to one thread of its own; otherwise its pthreads would
spin against libgomp's workers (docs/architecture.md, "The GEMM note").  Only that library is limited: NumPy's
own BLAS (a separate copy in the PyPI wheels) keeps its settings.
"""

from __future__ import annotations

import os

from . import _core

_blas_info: list[dict] = []


def _scipy_blas_controllers():
    try:
        from threadpoolctl import ThreadpoolController
    except ImportError:  # pragma: no cover - a declared dependency
        return []
    from ._blas import cython_blas
    cython_blas()   # make sure the library is loaded
    ctl = ThreadpoolController()
    libs = [lib for lib in ctl.lib_controllers if lib.user_api == "blas"]
    # SciPy's own copy: in scipy.libs/ (PyPI wheels), or any library named after scipy that is
    # not NumPy's (NumPy's wheels ship a libscipy_openblas64_ of their own)
    scipy_libs = [lib for lib in libs
                  if "scipy" in os.path.basename(os.path.dirname(lib.filepath))
                  or ("scipy" in os.path.basename(lib.filepath)
                      and "numpy" not in lib.filepath)]
    return scipy_libs or libs


def _limit_blas():
    global _blas_info
    _blas_info = []
    for lib in _scipy_blas_controllers():
        try:
            lib.set_num_threads(1)
        except Exception:  # pragma: no cover - a BLAS threadpoolctl cannot steer
            pass
        _blas_info.append(dict(lib.info()))


def _default_threads() -> int:
    env = os.environ.get("OMP_NUM_THREADS", "").split(",")[0].strip()
    if env:
        try:
            n = int(env)
            if n >= 1:
                return min(n, _core.max_num_threads())
        except ValueError:
            pass
    return min(max(1, _core.omp_max_threads()), _core.max_num_threads())


#: ``with pinned_num_threads() as n:`` -- every kernel called inside runs on the same n
#: threads, the count read when the block is entered, whatever `set_num_threads` does
#: meanwhile in other threads (a C thread-local in _runtime.h, which ``threads_for`` in
#: _core.pyx reads before the global count).  Each public call of the façade (a forward, a
#: backward, an optimizer step, a generation or one step of a stream) runs inside one, so
#: its float32 sums are all ordered for one team size.  Re-entrant: a block inside another,
#: on the same thread, keeps the outer count.
pinned_num_threads = _core.pinned_num_threads


def set_num_threads(n: int) -> None:
    """Set the number of CPU threads every gpt2s kernel uses (matmuls included).

    The default is ``$OMP_NUM_THREADS``, else the number of cores OpenMP sees.  It may be
    called at any time, from any thread: a call already running (a forward, a backward, an
    optimizer step, a generation, one step of a stream) finishes with the count it started
    with.  Without OpenMP the kernels run on one thread whatever is set.

    Args:
        n: threads, 1 to 1024.

    Raises:
        TypeError: n is not an int.
        ValueError: n < 1 or n > 1024.

    Examples:
        >>> import gpt2s
        >>> before = gpt2s.get_num_threads()
        >>> gpt2s.set_num_threads(1); gpt2s.get_num_threads()
        1
        >>> gpt2s.set_num_threads(before)
    """
    if isinstance(n, bool) or not isinstance(n, int):
        raise TypeError(f"set_num_threads: n must be an int, got {type(n).__name__}")
    if not 1 <= n <= _core.max_num_threads():
        raise ValueError(f"set_num_threads: n must be between 1 and {_core.max_num_threads()}, "
                         f"got {n}")
    _core.set_num_threads(n)


def get_num_threads() -> int:
    """The number of CPU threads the kernels use (see `set_num_threads`).

    Examples:
        >>> import gpt2s
        >>> gpt2s.get_num_threads() >= 1
        True
    """
    return _core.get_num_threads()


def init() -> None:
    _core.set_num_threads(_default_threads())
    _limit_blas()


def show_config(file=None) -> dict:
    """Print (and return) the build and run-time configuration: whether OpenMP is compiled in,
    the thread count, which CPU kernels are in use, and the BLAS library behind the matmuls.

    Args:
        file: where to print (default: sys.stdout).

    Returns:
        the same facts as a dict (keys ``gpt2s``, ``openmp``, ``isa_clones``,
        ``kernels`` (weight type -> the instruction-set variant its products run),
        ``cpu_variants`` (the instruction-set levels this build has and this CPU runs),
        ``bf16_compute`` (the route of compute_dtype="bfloat16": "portable", operands
        rounded to bfloat16 and multiplied at float32 speed, or "avx512-bf16"),
        ``threads``, ``omp_max_threads``, ``blas``, ``numpy``, ``python``).

    Examples:
        >>> import io, gpt2s
        >>> info = gpt2s.show_config(file=io.StringIO())
        >>> info["threads"] == gpt2s.get_num_threads()
        True
    """
    import sys
    import numpy as np
    from . import __version__
    info = {
        "gpt2s": __version__,
        "openmp": _core.have_openmp(),
        "isa_clones": _core.have_isa_clones(),
        "kernels": {t: _core.get_kernel_variant(t) for t in _core.weight_types()},
        "cpu_variants": list(_core.cpu_variants()),
        "bf16_compute": _core.get_bf16_compute_variant(),
        "threads": _core.get_num_threads(),
        "omp_max_threads": _core.omp_max_threads(),
        "blas": [{k: lib.get(k) for k in ("internal_api", "version", "num_threads",
                                          "architecture", "filepath")} for lib in _blas_info],
        "numpy": np.__version__,
        "python": sys.version.split()[0],
    }
    out = file or sys.stdout
    print(f"gpt2s {info['gpt2s']}  (python {info['python']}, numpy {info['numpy']})", file=out)
    print(f"  OpenMP: {'yes' if info['openmp'] else 'no (kernels run on one thread)'}", file=out)
    print(f"  threads: {info['threads']} (OpenMP default {info['omp_max_threads']})", file=out)
    print(f"  row kernels: {'baseline + x86-64-v3 (AVX2/FMA), chosen at load' if info['isa_clones'] else 'baseline ISA only'}", file=out)
    print(f"  instruction-set levels of this CPU (CPUID / AT_HWCAP): {', '.join(info['cpu_variants'])}",
          file=out)
    from .weight_types import get
    for name in info["kernels"]:
        print(f"  {get(name).kernels()}", file=out)
    if info["bf16_compute"] == "portable":
        print("  bfloat16 compute (compute_dtype='bfloat16'): portable -- no bfloat16 "
              "dot-product instruction (AVX512_BF16) on this CPU: operands rounded to bfloat16, "
              "products at float32 speed", file=out)
    else:
        print(f"  bfloat16 compute (compute_dtype='bfloat16'): {info['bf16_compute']} "
              f"(vdpbf16ps GEMM)", file=out)
    for lib in info["blas"]:
        print(f"  BLAS for matmuls: {lib['internal_api']} {lib['version']} "
              f"({lib['architecture']}), {lib['num_threads']} thread(s) of its own: "
              f"{lib['filepath']}", file=out)
    if not info["blas"]:
        print("  BLAS for matmuls: scipy.linalg.cython_blas (threads not controllable)", file=out)
    return info
