"""gpt2s._blas: SciPy's Cython BLAS table is loaded without importing all of scipy.linalg (26 MiB
of resident memory for a table of pointers), and the ordinary import is the fallback."""

from __future__ import annotations

import subprocess
import sys

import numpy as np

from gpt2s import _blas, _core


def test_import_gpt2s_leaves_scipy_linalg_unimported():
    code = ("import sys, gpt2s, numpy as np\n"
            "m = gpt2s.GPT2.from_config(gpt2s.GPT2Config(n_layer=1, n_head=2, n_embd=32, "
            "vocab_size=50, n_ctx=16))\n"
            "m.forward(np.arange(8)[None] % 50)\n"
            "print('scipy.linalg' in sys.modules)")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip() == "False"


def test_cython_blas_has_the_capsules_core_uses():
    capi = _blas.cython_blas().__pyx_capi__
    assert {"sgemm", "sgemv"} <= set(capi)


def test_fallback_to_the_ordinary_import(monkeypatch):
    def broken():
        raise OSError("pretend the file is elsewhere")
    monkeypatch.setattr(_blas, "_module", None)
    monkeypatch.setattr(_blas, "_load_alone", broken)
    module = _blas.cython_blas()
    from scipy.linalg import cython_blas
    assert module is cython_blas
    # and sgemm (40 rows: past the few-row kernels) still works on the pointers _core took
    a = np.arange(160, dtype=np.float32).reshape(40, 4)
    w = np.arange(8, dtype=np.float32).reshape(4, 2)
    out = np.empty((40, 2), np.float32)
    _core.matmul_forward(out, a, w, np.empty(0, np.float32))
    np.testing.assert_array_equal(out, a @ w)
