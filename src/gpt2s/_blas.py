"""Where the matmuls' BLAS comes from: scipy.linalg.cython_blas, SciPy's public Cython BLAS
table (its capsules give _core the sgemm/sgemv function pointers; the wheel links no BLAS).

``import scipy.linalg`` runs the whole package's __init__ (LAPACK wrappers, decompositions,
sparse helpers) and adds ~26 MiB of resident memory, 2% of a GPT-2 training step's peak, for
one table of pointers.  So the extension module is loaded on its own, from its file beside
scipy.linalg's __init__, without running that __init__ (~1 MiB).  If that fails (a SciPy laid
out otherwise), the ordinary import is used.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import os

_module = None


def cython_blas():
    """The scipy.linalg.cython_blas module (loaded once)."""
    global _module
    if _module is None:
        try:
            _module = _load_alone()
        except Exception:
            _module = None
        if _module is None or "sgemm" not in getattr(_module, "__pyx_capi__", {}):
            from scipy.linalg import cython_blas as module
            _module = module
    return _module


def _load_alone():
    spec = importlib.util.find_spec("scipy")
    if spec is None or not spec.submodule_search_locations:
        return None
    for root in spec.submodule_search_locations:
        linalg = os.path.join(root, "linalg")
        if not os.path.isdir(linalg):
            continue
        for suffix in importlib.machinery.EXTENSION_SUFFIXES:
            path = os.path.join(linalg, "cython_blas" + suffix)
            if os.path.isfile(path):
                name = "scipy.linalg.cython_blas"
                loader = importlib.machinery.ExtensionFileLoader(name, path)
                mspec = importlib.util.spec_from_file_location(name, path, loader=loader)
                module = importlib.util.module_from_spec(mspec)
                loader.exec_module(module)
                return module
    return None
