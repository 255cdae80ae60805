"""Kernel-call fuzzer: every exported kernel of gpt2s._core, called from a valid call with one
dimension or integer argument perturbed at a time, either refuses the call cleanly or computes
a complete answer.

The list of kernels comes from the module itself: every public callable of ``_core`` that
takes a parameter (arrays, sizes) must have an entry in ``SPECS`` (a valid call, or several
that reach the kernel's different paths) or in ``NOT_FUZZED`` with the reason, so a new
kernel cannot be missed silently (``check_table_covers_the_module``, the first step of every
fuzz test).

From each valid call the cases are:

* ``base``: the valid call itself (it must succeed: the table's calls are real calls);
* ``dim``: one named dimension (N, C, V, ...) set to 0, 1, 2 or one off its value, every array
  built consistently from it (zero-width, one-row and uneven cases of every loop);
* ``huge``: one named dimension set to 2^31 - 1, 2^31 or 2^40 while another is 0, so that the
  arrays stay empty and can be built (sizes that C ``int`` arithmetic would truncate);
* ``shape``: one axis of one array one larger or one smaller than the others say (a
  mismatch);
* ``int``: one integer argument set to 0, 1, 2, 2^31 - 1, 2^31, 2^63 - 1, -1, -2^31, beyond
  64 bits, one off its value, or a non-integer;
* ``ids``: one element of an integer array argument (token ids, targets, segment bounds) set
  to such values;

and, in a second sweep (``test_kernel_fuzz_pairs``), two at once: every pair of dimensions,
and every dimension value with every integer-argument value.

What each case must do: raise ``ValueError`` or ``TypeError`` whose message starts with the
kernel's name, or return with every output complete.  Nothing else: no other exception, no
crash or hang (each case runs in a subprocess under a per-case alarm), and nothing printed
on stdout or stderr during the call (BLAS reports an illegal argument by printing and
returning without writing).  What "complete" means per output (``outputs`` of each spec):

* ``written``: filled with a sentinel before the call (NaN; for integer outputs a value the
  kernel never produces: -2^62 for int64 indices, 0xFFFF, a NaN pattern, for bfloat16 / fp16
  bits, -128 for int8 blocks, which are symmetric in [-127, 127]); none may remain.  A
  region function narrows this to the part the kernel documents as written (kv_cache_write
  writes the rows pos0 .. pos0 + T - 1 of the cache);
* ``accumulated`` (gradients the backward kernels add into): filled with NaN; every element
  must still be NaN afterwards, i.e. the kernel added to it and never overwrote it;
* ``updated`` (read-modify-write state: AdamW's parameters and moments, a scaled buffer):
  finite before, every element finite afterwards;
* ``scratch``: not checked.

A weight of a packed type (bfloat16, int8 blocks: ``_core.PackedWeight``) is built from its
stored arrays after the perturbation (``pack`` of a spec), so its arrays are perturbed like
any other; a PackedWeight its own constructor refuses is a clean refusal.

Results returned by value (sum_squares) must be finite.  Setters that take a size
(set_num_threads, ...) are followed by a probe kernel call that uses the setting, and the
worker's configuration is restored after each case.
"""

from __future__ import annotations

import ctypes
import inspect
import json
import math
import os
import signal
import subprocess
import sys
import tempfile
from types import SimpleNamespace

import numpy as np

from gpt2s import _core

try:
    import pytest
except ImportError:  # the worker runs without pytest's plugins
    pytest = None

HERE = os.path.abspath(__file__)

# ---------------------------------------------------------------------------- values

INT_VALUES = [0, 1, 2, 2**31 - 1, 2**31, 2**63 - 1, -1, -2**31, 2**63, -2**63 - 1, 2**64]
NOT_INTS = [1.5, None, "3"]
HUGE_DIMS = [2**31 - 1, 2**31, 2**40]
ID_VALUES = [-1, -2, 2**31 - 1, 2**31, 2**63 - 1, -2**31, -2**63]
MAX_ELEMENTS = 1 << 22          # an array larger than this (non-empty) is not built
CASE_SECONDS = 10               # a case that runs longer is a hang (SIGALRM ends the worker)

SENTINEL_I64 = -(2**62)


class Unbuildable(Exception):
    """The perturbed arguments cannot be built in memory (a huge dimension without an empty
    partner): the case is skipped and counted."""


def _shape(shape):
    shape = tuple(int(s) for s in shape)
    if any(s < 0 for s in shape):
        raise Unbuildable(f"negative dimension {shape}")
    n = math.prod(shape)
    if n > MAX_ELEMENTS:
        raise Unbuildable(f"shape {shape}")
    return shape


class Builder:
    """Arrays of the kinds the kernels take, from one seeded generator."""

    def __init__(self, seed):
        self.rng = np.random.default_rng(seed)

    def f32(self, *shape):
        shape = _shape(shape)
        return self.rng.standard_normal(shape, dtype=np.float32)

    def pos(self, *shape):          # positive float32 (rstd, second moments)
        return np.abs(self.f32(*shape)) + np.float32(0.5)

    def f64u(self, *shape):         # uniforms in [0, 1)
        return self.rng.random(_shape(shape))

    def ids(self, n, V):            # token ids in [0, V)
        shape = _shape((n,))
        return self.rng.integers(0, max(int(V), 1), size=shape, dtype=np.int64) \
            if V > 0 else np.zeros(shape, np.int64)

    def targets(self, n, V):        # targets in [0, V) with some -1
        t = self.ids(n, V)
        t[::3] = -1
        return t

    def bf16(self, *shape):         # bfloat16 bits of normal numbers (truncated)
        return (self.f32(*shape).view(np.uint32) >> 16).astype(np.uint16)

    def q8(self, *shape):
        return self.rng.integers(-127, 128, size=_shape(shape), dtype=np.int8)

    def f16(self, *shape):          # fp16 bits of positive scales
        return (np.abs(self.f32(*shape)) * np.float32(0.01) + np.float32(1e-3)).astype(
            np.float16).view(np.uint16)

    def u16(self, *shape):
        return np.zeros(_shape(shape), np.uint16)

    def i8(self, *shape):
        return np.zeros(_shape(shape), np.int8)

    def i64(self, *shape):
        return np.zeros(_shape(shape), np.int64)


class Spec:
    """One valid call of a kernel: dims (named sizes), ints (the integer arguments as a
    function of the dims), build(d, i, b) -> the arguments by name, outputs {name: check}."""

    def __init__(self, kernel, variant, dims, build, outputs, ints=None, int_arrays=(),
                 result=None, probe=None, pack=None):
        self.kernel, self.variant, self.dims = kernel, variant, dims
        self.build, self.outputs = build, outputs
        self.ints = ints or (lambda d: {})
        self.int_arrays, self.result, self.probe = int_arrays, result, probe
        # {argument: (weight type, data array, scales array or None, transposed)}
        self.pack = pack or {}

    def call_args(self, args):
        """The kernel's arguments: the packed weights built from their arrays (which stay in
        args, where the outputs are checked)."""
        out = dict(args)
        for arg, (wtype, data, scales, transposed) in self.pack.items():
            a = out.pop(data)
            sc = out.pop(scales) if scales else None
            info = _core.weight_type_info(wtype)
            rows = a.shape[0]
            cols = a.shape[1] * 8 * np.dtype(info["store"]).itemsize // info["bits"]
            out[arg] = _core.PackedWeight(info["id"], a, sc,
                                          (cols, rows) if transposed else (rows, cols),
                                          transposed)
        return out

    @property
    def label(self):
        return f"{self.kernel}[{self.variant}]"


def written(region=None):
    return ("written", region)


ACC = ("accumulated", None)
UPD = ("updated", None)
SCRATCH = ("scratch", None)
W = written()
SPECS: list[Spec] = []


def spec(kernel, variant, dims, outputs, ints=None, int_arrays=(), result=None, probe=None,
         pack=None):
    def register(build):
        SPECS.append(Spec(kernel, variant, dims, build, outputs, ints, int_arrays, result,
                          probe, pack))
        return build
    return register


PACKED = _core.weight_types()[1:]   # every type but float32


def packed_arrays(b, wtype, rows, cols):
    """(data, scales or None) of random stored weights of a type"""
    info = _core.weight_type_info(wtype)
    if wtype == "bfloat16":
        data = b.bf16(rows, cols)
    elif wtype == "int8":
        data = b.q8(rows, cols)
    else:   # random bytes of the stored elements
        per = 8 * np.dtype(info["store"]).itemsize // info["bits"]
        shape = _shape((rows, cols // per))
        data = b.rng.integers(0, 256, size=shape).astype(info["store"])
    scales = b.f16(rows, cols // info["block"]) if info["block"] else None
    return data, scales


# ---------------------------------------------------------------------------- the table

# embedding (B rows of T tokens, C channels, V tokens, P positions), every weight type
for _kind in ("float32",) + PACKED:
    _blocked = _kind != "float32" and _core.weight_type_info(_kind)["block"] > 0
    def _embedding(d, i, b, _kind=_kind):
        a = dict(out=b.f32(d.B * d.T, d.C), idx=b.ids(d.B * d.T, d.V))
        if _kind == "float32":
            a["wte"] = b.f32(d.V, d.C)
        else:
            a["wte_data"], scales = packed_arrays(b, _kind, d.V, d.C)
            if scales is not None:
                a["wte_scales"] = scales
        a.update(wpe=b.f32(d.P, d.C), T=i["T"], pos0=i["pos0"])
        return a
    _pack = None if _kind == "float32" else \
        {"wte": (_kind, "wte_data", "wte_scales" if _blocked else None, False)}
    spec("embedding_forward", f"prefill {_kind}",
         dict(B=2, T=3, C=64 if _blocked else 24, V=11, P=6), {"out": W},
         ints=lambda d: dict(T=d.T, pos0=2), int_arrays=("idx",), pack=_pack)(_embedding)
    spec("embedding_forward", f"decode {_kind}", dict(B=3, T=1, C=32, V=7, P=9), {"out": W},
         ints=lambda d: dict(T=d.T, pos0=8), int_arrays=("idx",), pack=_pack)(_embedding)


@spec("embedding_backward", "", dict(B=2, T=3, C=24, V=11, P=6),
      {"dwte": ACC, "dwpe": ACC}, ints=lambda d: dict(T=d.T), int_arrays=("idx",))
def _(d, i, b):
    return dict(dwte=b.f32(d.V, d.C), dwpe=b.f32(d.P, d.C), dout=b.f32(d.B * d.T, d.C),
                idx=b.ids(d.B * d.T, d.V), T=i["T"])


# layernorm
for _keep in (True, False):
    @spec("layernorm_forward", "stats" if _keep else "no stats", dict(N=5, C=24),
          {"out": W, "mean": W, "rstd": W})
    def _(d, i, b, _keep=_keep):
        M = d.N if _keep else 0
        return dict(out=b.f32(d.N, d.C), mean=b.f32(M), rstd=b.f32(M), inp=b.f32(d.N, d.C),
                    weight=b.f32(d.C), bias=b.f32(d.C), eps=1e-5)

    @spec("residual_layernorm_forward", "stats" if _keep else "no stats", dict(N=5, C=24),
          {"residual": W, "out": W, "mean": W, "rstd": W})
    def _(d, i, b, _keep=_keep):
        M = d.N if _keep else 0
        return dict(residual=b.f32(d.N, d.C), out=b.f32(d.N, d.C), mean=b.f32(M),
                    rstd=b.f32(M), inp1=b.f32(d.N, d.C), inp2=b.f32(d.N, d.C),
                    weight=b.f32(d.C), bias=b.f32(d.C), eps=1e-5)


@spec("layernorm_backward", "", dict(N=5, C=24, S=2),
      {"dinp": ACC, "dweight": ACC, "dbias": ACC, "scratch": SCRATCH})
def _(d, i, b):
    return dict(dinp=b.f32(d.N, d.C), dweight=b.f32(d.C), dbias=b.f32(d.C),
                dout=b.f32(d.N, d.C), inp=b.f32(d.N, d.C), weight=b.f32(d.C),
                mean=b.f32(d.N), rstd=b.pos(d.N), scratch=b.f32(d.S, 2 * d.C))


# RMSNorm
for _keep in (True, False):
    @spec("rmsnorm_forward", "stats" if _keep else "no stats", dict(N=5, C=24),
          {"out": W, "rstd": W})
    def _(d, i, b, _keep=_keep):
        return dict(out=b.f32(d.N, d.C), rstd=b.f32(d.N if _keep else 0), inp=b.f32(d.N, d.C),
                    weight=b.f32(d.C), eps=1e-5)

    @spec("residual_rmsnorm_forward", "stats" if _keep else "no stats", dict(N=5, C=24),
          {"residual": W, "out": W, "rstd": W})
    def _(d, i, b, _keep=_keep):
        return dict(residual=b.f32(d.N, d.C), out=b.f32(d.N, d.C),
                    rstd=b.f32(d.N if _keep else 0), inp1=b.f32(d.N, d.C),
                    inp2=b.f32(d.N, d.C), weight=b.f32(d.C), eps=1e-5)


@spec("rmsnorm_backward", "", dict(N=5, C=24, S=2), {"dinp": ACC, "dweight": ACC,
                                                     "scratch": SCRATCH})
def _(d, i, b):
    return dict(dinp=b.f32(d.N, d.C), dweight=b.f32(d.C), dout=b.f32(d.N, d.C),
                inp=b.f32(d.N, d.C), weight=b.f32(d.C), rstd=b.pos(d.N),
                scratch=b.f32(d.S, d.C))


# matmuls: one row (sgemv, or split over K), a few rows (the few-row kernels), many rows
for _N in (1, 5, 70):
    for _bias in (True, False):
        @spec("matmul_forward", f"N={_N} bias={_bias}", dict(N=_N, C=40, OC=24), {"out": W})
        def _(d, i, b, _bias=_bias):
            return dict(out=b.f32(d.N, d.OC), inp=b.f32(d.N, d.C), weight=b.f32(d.C, d.OC),
                        bias=b.f32(d.OC if _bias else 0))

        for _acc in (False, True):
            @spec("matmul_backward", f"N={_N} bias={_bias} accumulate={_acc}",
                  dict(N=_N, C=40, OC=24),
                  {"dinp": ACC if _acc else W, "dweight": ACC, "dbias": ACC})
            def _(d, i, b, _bias=_bias, _acc=_acc):
                return dict(dinp=b.f32(d.N, d.C), dweight=b.f32(d.C, d.OC),
                            dbias=b.f32(d.OC if _bias else 0), dout=b.f32(d.N, d.OC),
                            inp=b.f32(d.N, d.C), weight=b.f32(d.C, d.OC),
                            accumulate_dinp=_acc)

    @spec("lm_head_forward", f"N={_N}", dict(N=_N, C=40, V=37), {"logits": W})
    def _(d, i, b):
        return dict(logits=b.f32(d.N, d.V), inp=b.f32(d.N, d.C), wte=b.f32(d.V, d.C))

    @spec("lm_head_backward", f"N={_N}", dict(N=_N, C=40, V=37), {"dinp": W, "dwte": ACC})
    def _(d, i, b):
        return dict(dinp=b.f32(d.N, d.C), dwte=b.f32(d.V, d.C), dlogits=b.f32(d.N, d.V),
                    inp=b.f32(d.N, d.C), wte=b.f32(d.V, d.C))


# the bfloat16-compute products (compute_dtype="bfloat16"): float32 activations, bfloat16
# weight copies (uint16 bits), float32 sums
for _N in (1, 5, 70):
    for _bias in (True, False):
        @spec("matmul_forward_bf16", f"N={_N} bias={_bias}", dict(N=_N, C=40, OC=24),
              {"out": W})
        def _(d, i, b, _bias=_bias):
            return dict(out=b.f32(d.N, d.OC), inp=b.f32(d.N, d.C), weight=b.bf16(d.C, d.OC),
                        bias=b.f32(d.OC if _bias else 0))

        for _acc in (False, True):
            @spec("matmul_backward_bf16", f"N={_N} bias={_bias} accumulate={_acc}",
                  dict(N=_N, C=40, OC=24),
                  {"dinp": ACC if _acc else W, "dweight": ACC, "dbias": ACC})
            def _(d, i, b, _bias=_bias, _acc=_acc):
                return dict(dinp=b.f32(d.N, d.C), dweight=b.f32(d.C, d.OC),
                            dbias=b.f32(d.OC if _bias else 0), dout=b.f32(d.N, d.OC),
                            inp=b.f32(d.N, d.C), weight=b.bf16(d.C, d.OC),
                            accumulate_dinp=_acc)

    @spec("lm_head_forward_bf16", f"N={_N}", dict(N=_N, C=40, V=37), {"logits": W})
    def _(d, i, b):
        return dict(logits=b.f32(d.N, d.V), inp=b.f32(d.N, d.C), wte=b.bf16(d.V, d.C))

    @spec("lm_head_backward_bf16", f"N={_N}", dict(N=_N, C=40, V=37),
          {"dinp": W, "dwte": ACC, "dlogits": UPD})
    def _(d, i, b):
        return dict(dinp=b.f32(d.N, d.C), dwte=b.f32(d.V, d.C), dlogits=b.f32(d.N, d.V),
                    inp=b.f32(d.N, d.C), wte=b.bf16(d.V, d.C))


@spec("bf16_round_into", "", dict(N=77), {"out": W})
def _(d, i, b):
    return dict(out=b.u16(d.N), x=b.f32(d.N))


# the packed-weight products: direct kernels (<= 32 rows), widened panels (more rows), one
# row of a bfloat16 Conv1D weight split over K (K >= 64 per thread)
for _N, _C in ((3, 64), (40, 64), (1, 256)):
    for _kind in PACKED:
        # output-major types store a Conv1D weight transposed
        _t = _core.weight_type_info(_kind)["output_major"]
        for _bias in (True, False):
            @spec("matmul_forward", f"{_kind} N={_N} C={_C} bias={_bias}",
                  dict(N=_N, C=_C, OC=24), {"out": W},
                  pack={"weight": (_kind, "w_data", "w_scales" if _t else None, _t)})
            def _(d, i, b, _bias=_bias, _kind=_kind, _t=_t):
                data, scales = packed_arrays(b, _kind, *((d.OC, d.C) if _t else (d.C, d.OC)))
                a = dict(out=b.f32(d.N, d.OC), inp=b.f32(d.N, d.C), w_data=data,
                         bias=b.f32(d.OC if _bias else 0))
                if scales is not None:
                    a["w_scales"] = scales
                return a

        @spec("lm_head_forward", f"{_kind} N={_N} C={_C}", dict(N=_N, C=_C, V=37),
              {"logits": W}, pack={"wte": (_kind, "w_data", "w_scales" if _t else None, False)})
        def _(d, i, b, _kind=_kind):
            data, scales = packed_arrays(b, _kind, d.V, d.C)
            a = dict(logits=b.f32(d.N, d.V), inp=b.f32(d.N, d.C), w_data=data)
            if scales is not None:
                a["w_scales"] = scales
            return a


# conversions: float32 into a packed weight (whole, transposed, or some of its rows) and back
for _kind, _t in [(k, t) for k in PACKED for t in (False, True)
                  if t is False or _core.weight_type_info(k)["output_major"]]:
    _blocked = _core.weight_type_info(_kind)["block"] > 0
    _pk = {"w": (_kind, "w_data", "w_scales" if _blocked else None, _t)}

    # untransposed: the rows row0 .. row0 + len(x) are written
    _rows = None if _t else (lambda a: slice(a["row0"], a["row0"] + a["x"].shape[0]))
    @spec("quantize_into", f"{_kind} transposed={_t}", dict(N=5, K=64),
          # (every byte of 4-bit data is a valid pair of weights: no sentinel; its scales
          # are checked)
          {"w_data": SCRATCH if _core.weight_type_info(_kind)["store"] == "uint8"
           else written(_rows), **({"w_scales": written(_rows)} if _blocked else {})},
          pack=_pk, ints=lambda d: dict(row0=0))
    def _(d, i, b, _kind=_kind, _t=_t):
        data, scales = packed_arrays(b, _kind, d.N, d.K)
        a = dict(w_data=np.zeros_like(data), x=b.f32(d.K, d.N) if _t else b.f32(d.N, d.K),
                 row0=i["row0"])
        if scales is not None:
            a["w_scales"] = np.zeros_like(scales)
        return a

    @spec("widen_into", f"{_kind} transposed={_t}", dict(N=5, K=64), {"out": W}, pack=_pk)
    def _(d, i, b, _kind=_kind):
        data, scales = packed_arrays(b, _kind, d.N, d.K)
        a = dict(out=b.f32(d.N, d.K), w_data=data)
        if scales is not None:
            a["w_scales"] = scales
        return a

# rows 2 .. 4 of a weight of 7 rows
@spec("quantize_into", "bfloat16 rows", dict(R=3, N=7, K=48),
      {"w_data": written(lambda a: slice(a["row0"], a["row0"] + a["x"].shape[0]))},
      ints=lambda d: dict(row0=2),
      pack={"w": ("bfloat16", "w_data", None, False)})
def _(d, i, b):
    return dict(w_data=b.u16(d.N, d.K), x=b.f32(d.R, d.K), row0=i["row0"])


# elementwise
for _act in _core.activation_kernels():
    @spec("activation_forward", _act, dict(N=5, D=24), {"out": W})
    def _(d, i, b, _act=_act):
        return dict(out=b.f32(d.N, d.D), inp=b.f32(d.N, d.D), activation=_act)

    @spec("activation_backward", _act, dict(N=5, D=24), {"dinp": W})
    def _(d, i, b, _act=_act):
        return dict(dinp=b.f32(d.N, d.D), inp=b.f32(d.N, d.D), dout=b.f32(d.N, d.D),
                    activation=_act)

# gated linear units (SwiGLU) and rotary position embeddings (in place, at col_off, n_heads
# heads of head_dim, H pairs rotated per head, X spare columns)
for _act in ("silu", "gelu_erf"):
    @spec("glu_forward", _act, dict(N=5, I=12), {"out": W})
    def _(d, i, b, _act=_act):
        return dict(out=b.f32(d.N, d.I), inp=b.f32(d.N, 2 * d.I), activation=_act)

    @spec("glu_backward", _act, dict(N=5, I=12), {"dinp": W})
    def _(d, i, b, _act=_act):
        return dict(dinp=b.f32(d.N, 2 * d.I), inp=b.f32(d.N, 2 * d.I), dout=b.f32(d.N, d.I),
                    activation=_act)

for _kernel in ("rotary_forward", "rotary_backward"):
    @spec(_kernel, "", dict(N=5, NH=3, HD=6, H=2, X=2), {"x" if _kernel == "rotary_forward"
                                                         else "dx": UPD},
          ints=lambda d: dict(col_off=1, n_heads=d.NH, head_dim=d.HD),
          int_arrays=("positions",))
    def _(d, i, b, _kernel=_kernel):
        return {"x" if _kernel == "rotary_forward" else "dx": b.f32(d.N, d.X + d.NH * d.HD),
                "positions": b.ids(d.N, 100), "inv_freq": b.f32(d.H),
                "col_off": i["col_off"], "n_heads": i["n_heads"], "head_dim": i["head_dim"]}

for _complement in (False, True):
    @spec("erf_forward", f"complement={_complement}", dict(N=5, D=24), {"out": W})
    def _(d, i, b, _complement=_complement):
        return dict(out=b.f32(d.N, d.D), inp=b.f32(d.N, d.D), complement=_complement)


# attention: training (q, k, v in one qkv buffer, lse kept; 70 positions = two query
# blocks) and decoding (a query at position pos0 against a KV cache, no lse)
for _T in (5, 70):
    @spec("attention_forward", f"train T={_T}", dict(B=2, T=_T, NH=2, HS=4),
          {"out": W, "lse": W},
          ints=lambda d: dict(q_off=0, k_off=d.NH * d.HS, v_off=2 * d.NH * d.HS, pos0=0,
                              n_head=d.NH))
    def _(d, i, b):
        C = d.NH * d.HS
        qkv = b.f32(d.B, d.T, 3 * C)
        return dict(out=b.f32(d.B, d.T, C), lse=b.f32(d.B, d.NH, d.T), q=qkv, q_off=i["q_off"],
                    k=qkv, k_off=i["k_off"], v=qkv, v_off=i["v_off"], pos0=i["pos0"],
                    n_head=i["n_head"], scale=0.5)

    @spec("attention_backward", f"T={_T}", dict(B=2, T=_T, NH=2, HS=4), {"dqkv": W},
          ints=lambda d: dict(n_head=d.NH))
    def _(d, i, b):
        C = d.NH * d.HS
        # lse well above every score: exp(score - lse) stays finite
        lse = np.full(_shape((d.B, d.NH, d.T)), 8.0, np.float32)
        return dict(dqkv=b.f32(d.B, d.T, 3 * C), dout=b.f32(d.B, d.T, C),
                    out=b.f32(d.B, d.T, C), lse=lse, qkv=b.f32(d.B, d.T, 3 * C),
                    n_head=i["n_head"], scale=0.5)


@spec("attention_forward", "decode", dict(B=2, T=1, NH=2, HS=4, P=9), {"out": W, "lse": W},
      ints=lambda d: dict(q_off=0, k_off=0, v_off=0, pos0=5, n_head=d.NH))
def _(d, i, b):
    C = d.NH * d.HS
    return dict(out=b.f32(d.B, d.T, C), lse=b.f32(0, 0, 0), q=b.f32(d.B, d.T, 3 * C),
                q_off=i["q_off"], k=b.f32(d.B, d.P, C), k_off=i["k_off"],
                v=b.f32(d.B, d.P, C), v_off=i["v_off"], pos0=i["pos0"], n_head=i["n_head"],
                scale=0.5)


# grouped-query attention: NKV key/value heads, each read by G query heads; the qkv row is
# [q (C) | k (KVC) | v (KVC)], the KV cache KVC wide
for _T in (5, 70):
    @spec("attention_forward", f"gqa train T={_T}", dict(B=2, T=_T, NKV=2, G=3, HS=4),
          {"out": W, "lse": W},
          ints=lambda d: dict(q_off=0, k_off=d.NKV * d.G * d.HS,
                              v_off=d.NKV * (d.G + 1) * d.HS, pos0=0, n_head=d.NKV * d.G,
                              n_kv_head=d.NKV))
    def _(d, i, b):
        C, KVC = d.NKV * d.G * d.HS, d.NKV * d.HS
        qkv = b.f32(d.B, d.T, C + 2 * KVC)
        return dict(out=b.f32(d.B, d.T, C), lse=b.f32(d.B, d.NKV * d.G, d.T), q=qkv,
                    q_off=i["q_off"], k=qkv, k_off=i["k_off"], v=qkv, v_off=i["v_off"],
                    pos0=i["pos0"], n_head=i["n_head"], scale=0.5, n_kv_head=i["n_kv_head"])

    @spec("attention_backward", f"gqa T={_T}", dict(B=2, T=_T, NKV=2, G=3, HS=4), {"dqkv": W},
          ints=lambda d: dict(n_head=d.NKV * d.G, n_kv_head=d.NKV))
    def _(d, i, b):
        C, KVC = d.NKV * d.G * d.HS, d.NKV * d.HS
        lse = np.full(_shape((d.B, d.NKV * d.G, d.T)), 8.0, np.float32)
        return dict(dqkv=b.f32(d.B, d.T, C + 2 * KVC), dout=b.f32(d.B, d.T, C),
                    out=b.f32(d.B, d.T, C), lse=lse, qkv=b.f32(d.B, d.T, C + 2 * KVC),
                    n_head=i["n_head"], scale=0.5, n_kv_head=i["n_kv_head"])


@spec("attention_forward", "gqa decode", dict(B=2, T=1, NKV=2, G=4, HS=4, P=9),
      {"out": W, "lse": W},
      ints=lambda d: dict(q_off=0, k_off=0, v_off=0, pos0=5, n_head=d.NKV * d.G,
                          n_kv_head=d.NKV))
def _(d, i, b):
    C, KVC = d.NKV * d.G * d.HS, d.NKV * d.HS
    return dict(out=b.f32(d.B, d.T, C), lse=b.f32(0, 0, 0), q=b.f32(d.B, d.T, C + 2 * KVC),
                q_off=i["q_off"], k=b.f32(d.B, d.P, KVC), k_off=i["k_off"],
                v=b.f32(d.B, d.P, KVC), v_off=i["v_off"], pos0=i["pos0"], n_head=i["n_head"],
                scale=0.5, n_kv_head=i["n_kv_head"])


def _cache_rows(a):
    return np.s_[:a["qkv"].shape[0], a["pos0"]:a["pos0"] + a["qkv"].shape[1]]


@spec("kv_cache_write", "", dict(B=2, T=3, C=8, P=9),
      {"kcache": written(_cache_rows), "vcache": written(_cache_rows)},
      ints=lambda d: dict(pos0=4))
def _(d, i, b):
    return dict(kcache=b.f32(d.B, d.P, d.C), vcache=b.f32(d.B, d.P, d.C),
                qkv=b.f32(d.B, d.T, 3 * d.C), pos0=i["pos0"])


@spec("kv_cache_write", "gqa", dict(B=2, T=3, C=8, Q=24, P=9),
      {"kcache": written(_cache_rows), "vcache": written(_cache_rows)},
      ints=lambda d: dict(pos0=4, q_width=d.Q))
def _(d, i, b):
    return dict(kcache=b.f32(d.B, d.P, d.C), vcache=b.f32(d.B, d.P, d.C),
                qkv=b.f32(d.B, d.T, d.Q + 2 * d.C), pos0=i["pos0"], q_width=i["q_width"])


# softmax cross-entropy
@spec("crossentropy_forward", "", dict(N=5, V=11), {"losses": W, "lse": W},
      int_arrays=("targets",))
def _(d, i, b):
    return dict(losses=b.f32(d.N), lse=b.f32(d.N), logits=b.f32(d.N, d.V),
                targets=b.targets(d.N, d.V))


@spec("crossentropy_backward", "", dict(N=5, V=11), {"dlogits": W}, int_arrays=("targets",))
def _(d, i, b):
    logits = b.f32(d.N, d.V)
    with np.errstate(all="ignore"):
        lse = (np.log(np.exp(logits.astype(np.float64)).sum(axis=1)).astype(np.float32)
               if d.V > 0 else np.zeros(_shape((d.N,)), np.float32))
    return dict(dlogits=b.f32(d.N, d.V), logits=logits, lse=lse,
                targets=b.targets(d.N, d.V), dloss=0.25)


# whole buffers and AdamW
@spec("fill_zero", "", dict(n=1000), {"buf": W})
def _(d, i, b):
    return dict(buf=b.f32(d.n))


@spec("sum_squares", "", dict(n=10000), {}, result="finite")
def _(d, i, b):
    return dict(buf=b.f32(d.n))


@spec("scale_inplace", "", dict(n=1000), {"buf": UPD})
def _(d, i, b):
    return dict(buf=b.f32(d.n), factor=0.5)


@spec("adamw_step", "", dict(n=1000, S=2), {"params": UPD, "m": UPD, "v": UPD},
      ints=lambda d: dict(step=3), int_arrays=("seg_start", "seg_stop"))
def _(d, i, b):
    bounds = np.linspace(0, d.n, _shape((d.S + 1,))[0]).astype(np.int64)
    return dict(params=b.f32(d.n), grads=b.f32(d.n), m=b.f32(d.n), v=b.pos(d.n),
                seg_start=np.ascontiguousarray(bounds[:-1]),
                seg_stop=np.ascontiguousarray(bounds[1:]),
                seg_decay=np.full(_shape((d.S,)), 0.1, np.float32), lr=1e-3, beta1=0.9,
                beta2=0.95, eps=1e-8, step=i["step"], grad_scale=1.0)


# sampling
@spec("argmax_rows", "", dict(B=3, V=17), {"out": W})
def _(d, i, b):
    return dict(out=b.i64(d.B), logits=b.f32(d.B, d.V))


@spec("sample_rows", "", dict(B=3, V=17), {"out": W, "weights": W},
      ints=lambda d: dict(top_k=5))
def _(d, i, b):
    return dict(out=b.i64(d.B), logits=b.f32(d.B, d.V), uniforms=b.f64u(d.B),
                temperature=0.8, top_k=i["top_k"], top_p=0.9, weights=b.f32(d.B, d.V))


@spec("sampling_distribution", "", dict(B=3, V=17), {"probs": W}, ints=lambda d: dict(top_k=5))
def _(d, i, b):
    return dict(probs=b.f32(d.B, d.V), logits=b.f32(d.B, d.V), temperature=0.8,
                top_k=i["top_k"], top_p=0.9)


# setters that take a size: each followed by a kernel that uses the setting
def _probe_threads():
    x = np.ones((64, 64), np.float32)
    out = np.full_like(x, np.nan)
    _core.activation_forward(out, x, "gelu_tanh")
    _core.matmul_forward(np.empty((64, 64), np.float32), x, x, np.empty(0, np.float32))
    assert not np.isnan(out).any()


def _probe_rows_per_sgemm():
    x = np.ones((70, 8), np.float32)
    out = np.full((70, 8), np.nan, np.float32)
    _core.matmul_forward(out, x, np.ones((8, 8), np.float32), np.empty(0, np.float32))
    assert (out == 8).all()


def _probe_direct_rows():
    out = np.full((40, 24), np.nan, np.float32)
    w = _core.PackedWeight(_core.WTYPE_BFLOAT16, np.zeros((64, 24), np.uint16), None, (64, 24),
                           False)
    _core.matmul_forward(out, np.ones((40, 64), np.float32), w, np.empty(0, np.float32))
    assert (out == 0).all()


for _name, _arg, _default, _probe in (
        ("set_num_threads", "n", 2, _probe_threads),
        ("set_rows_per_sgemm", "n", 4096, _probe_rows_per_sgemm),
        ("set_direct_max_rows", "rows", 32, _probe_direct_rows),
        ("set_parallel_min_work", "work", 0, _probe_threads)):
    spec(_name, "", {}, {}, ints=lambda d, _arg=_arg, _default=_default: {_arg: _default},
         probe=_probe)(lambda d, i, b: dict(i))


# Public callables with parameters that take no array and no size.
NOT_FUZZED = {
    "set_kernel_variant": "names (tests/test_weight_types.py checks its refusals)",
    "get_kernel_variant": "a weight type's name",
    "kernel_variants": "a weight type's name",
    "weight_type_info": "a weight type's name",
    "set_split_k": "an on/off flag",
    "set_bf16_compute_variant": "a route's name (tests/test_bf16_compute.py checks its refusals)",
}


def exported_kernels() -> list[str]:
    """Every public callable of _core that takes a parameter."""
    names = []
    for name in dir(_core):
        f = getattr(_core, name)
        if name.startswith("_") or not callable(f) or isinstance(f, type):
            continue
        if inspect.signature(f).parameters:
            names.append(name)
    return sorted(names)


# ---------------------------------------------------------------------------- cases

def cases(sweep="single"):
    """(spec, family, description, dims, ints overrides, array tweak) for every case, in a
    fixed order (the worker resumes by index after a crash).  sweep "pairs": two
    perturbations at once instead (two dimensions, or a dimension and an integer argument)."""
    if sweep == "pairs":
        return _pair_cases()
    out = []
    for s in SPECS:
        out.append((s, "base", "valid call", {}, {}, None))
        for k, v in s.dims.items():
            for x in _dim_values(v):
                out.append((s, "dim", f"{k}={x}", {k: x}, {}, None))
        for k in s.dims:
            for zero in s.dims:
                if zero != k:
                    for x in HUGE_DIMS:
                        out.append((s, "huge", f"{k}={x}, {zero}=0", {k: x, zero: 0}, {},
                                    None))
        names = list(s.build(SimpleNamespace(**s.dims), s.ints(SimpleNamespace(**s.dims)),
                             Builder(0)).items())
        for name, value in names:
            if isinstance(value, np.ndarray):
                for axis in range(value.ndim):
                    for delta in (-1, 1):
                        if value.shape[axis] + delta >= 0:
                            out.append((s, "shape", f"{name}.shape[{axis}]{delta:+d}", {}, {},
                                        ("shape", name, axis, delta)))
        for k, v in s.ints(SimpleNamespace(**s.dims)).items():
            values = INT_VALUES + [v - 1, v + 1] + NOT_INTS
            for x in values:
                out.append((s, "int", f"{k}={x!r}", {}, {k: x}, None))
        for name in s.int_arrays:
            for where in (0, -1):
                for x in ID_VALUES:
                    out.append((s, "ids", f"{name}[{where}]={x}", {}, {},
                                ("value", name, where, x)))
    return out


def _dim_values(v):
    return sorted(x for x in {0, 1, 2, v - 1, v + 1} - {v} if x >= 0)


def _pair_cases():
    out = []
    for s in SPECS:
        dims = list(s.dims.items())
        for a, (k1, v1) in enumerate(dims):
            for k2, v2 in dims[a + 1:]:
                for x1 in _dim_values(v1):
                    for x2 in _dim_values(v2):
                        out.append((s, "dims", f"{k1}={x1}, {k2}={x2}", {k1: x1, k2: x2}, {},
                                    None))
        ints = s.ints(SimpleNamespace(**s.dims))
        for k, v in s.dims.items():
            for x in _dim_values(v):
                for name, value in ints.items():
                    for y in INT_VALUES + [value - 1, value + 1]:
                        out.append((s, "dim+int", f"{k}={x}, {name}={y}", {k: x}, {name: y},
                                    None))
    return out


def build_case(case, seed):
    s, family, what, dims, ints, tweak = case
    d = SimpleNamespace(**{**s.dims, **dims})
    i = {**s.ints(d), **ints}
    args = s.build(d, i, Builder(seed))
    if tweak is not None and tweak[0] == "shape":
        _, name, axis, delta = tweak
        old = args[name]
        shape = list(old.shape)
        shape[axis] += delta
        new = np.zeros(_shape(shape), old.dtype)
        common = tuple(slice(0, min(a, b)) for a, b in zip(old.shape, shape))
        new[common] = old[common]
        for other, value in args.items():   # arrays passed twice (q = k = v) stay one array
            if value is old:
                args[other] = new
    elif tweak is not None:
        _, name, where, x = tweak
        if args[name].size == 0:
            raise Unbuildable("no element to change")
        args[name][where] = x
    return args


def _fill_sentinels(s, args):
    for name, (kind, _) in s.outputs.items():
        a = args[name]
        if kind in ("written", "accumulated"):
            if a.dtype == np.int64:
                a.fill(SENTINEL_I64)
            elif a.dtype == np.uint16:
                a.fill(0xFFFF)
            elif a.dtype == np.int8:
                a.fill(-128)
            else:
                a.fill(np.nan)


def _sentinel_mask(a):
    if a.dtype == np.int64:
        return a == SENTINEL_I64
    if a.dtype == np.uint16:
        return a == 0xFFFF
    if a.dtype == np.int8:
        return a == -128
    return np.isnan(a)


def check_outputs(s, args, result):
    """None when every output is complete, else what is wrong."""
    for name, (kind, region) in s.outputs.items():
        a = args[name]
        if kind == "written":
            part = a[region(args)] if region is not None else a
            left = int(_sentinel_mask(part).sum())
            if left:
                return f"{name}: {left} of {part.size} elements left unwritten"
        elif kind == "accumulated":
            kept = int(_sentinel_mask(a).sum())
            if kept != a.size:
                return f"{name}: {a.size - kept} of {a.size} accumulated elements overwritten"
        elif kind == "updated":
            bad = int((~np.isfinite(a)).sum())
            if bad:
                return f"{name}: {bad} of {a.size} elements not finite"
    if s.result == "finite" and not (isinstance(result, float) and math.isfinite(result)):
        return f"returned {result!r}"
    return None


# ---------------------------------------------------------------------------- the worker

CONFIGS = {
    # every parallel path: a team of 2 with no work threshold
    "parallel": dict(threads=2, min_work=0.0, variant="auto", rows_per_sgemm=4096),
    # the serial paths
    "serial": dict(threads=1, min_work=None, variant="auto", rows_per_sgemm=4096),
    # the portable low-precision path, sgemm for few rows, sgemm cut into slices, uneven teams
    "portable": dict(threads=3, min_work=0.0, variant="portable",
                     rows_per_sgemm=7),
}


def apply_config(c):
    _core.set_num_threads(c["threads"])
    if c["min_work"] is not None:
        _core.set_parallel_min_work(c["min_work"])
    else:
        _core.set_parallel_min_work(65536.0)
    for t in _core.weight_types():
        _core.set_kernel_variant(t, c["variant"])
    _core.set_rows_per_sgemm(c["rows_per_sgemm"])
    _core.set_direct_max_rows(32)


def run_case(case, index, config):
    """Call one case; returns (outcome, detail): "ok", "refused", "skipped" or "BAD"."""
    s = case[0]
    try:
        args = build_case(case, index)
    except Unbuildable as e:
        return "skipped", str(e)
    _fill_sentinels(s, args)
    kernel = getattr(_core, s.kernel)
    try:
        call = s.call_args(args)
    except ValueError as e:   # the PackedWeight of the perturbed arrays refused by its type
        if case[1] == "base":
            return "BAD", f"the valid call's weight was refused: {e}"
        return "refused", f"ValueError: {e}"
    try:
        result = kernel(**call)
    except (ValueError, TypeError) as e:
        msg = str(e)
        if case[1] == "base":
            return "BAD", f"the valid call was refused: {type(e).__name__}: {msg}"
        if not msg.startswith(s.kernel + ":"):
            return "BAD", f"{type(e).__name__} without the kernel's name: {msg}"
        return "refused", f"{type(e).__name__}: {msg}"
    except BaseException as e:  # noqa: BLE001 - any other exception is the finding
        return "BAD", f"{type(e).__name__}: {e}"
    try:
        if s.probe is not None:
            s.probe()
    except BaseException as e:  # noqa: BLE001
        return "BAD", f"the probe after the setter failed: {type(e).__name__}: {e}"
    finally:
        if s.probe is not None:
            apply_config(config)
    try:
        problem = check_outputs(s, args, result)
    except Exception as e:  # noqa: BLE001 - e.g. a region of arguments the kernel accepted
        problem = f"outputs not checkable: {type(e).__name__}: {e}"
    if problem:
        return "BAD", problem
    return "ok", ""


def _c_stdio_flush():
    """fflush(NULL) of the C library, so that what BLAS printf-ed during a call reaches the
    capture file before it is read; a no-op where the C library cannot be found (the
    parent then still sees the output, unattributed, when the worker ends)."""
    try:
        libc = ctypes.CDLL(None) if sys.platform != "win32" else ctypes.cdll.msvcrt
        return lambda: libc.fflush(None)
    except (OSError, AttributeError):
        return lambda: None


def worker(config_name, sweep, start, results_path):
    config = CONFIGS[config_name]
    apply_config(config)
    all_cases = cases(sweep)
    flush_c_stdio = _c_stdio_flush()
    alarm = getattr(signal, "alarm", lambda seconds: None)   # (Windows: the parent's timeout)
    log = os.open(results_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    capture = tempfile.TemporaryFile()
    cfd = capture.fileno()
    saved = os.dup(1), os.dup(2)
    sys.stdout.flush()
    sys.stderr.flush()
    for index in range(start, len(all_cases)):
        os.write(log, (json.dumps({"i": index, "start": True}) + "\n").encode())
        os.ftruncate(cfd, 0)
        os.lseek(cfd, 0, 0)
        os.dup2(cfd, 1)
        os.dup2(cfd, 2)
        alarm(CASE_SECONDS)
        try:
            outcome, detail = run_case(all_cases[index], index, config)
        finally:
            alarm(0)
            flush_c_stdio()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
        printed = os.fstat(cfd).st_size
        if printed:
            os.lseek(cfd, 0, 0)
            text = os.read(cfd, 2000).decode(errors="replace").strip()
            outcome, detail = "BAD", f"printed during the call: {text!r} ({outcome}: {detail})"
        os.write(log, (json.dumps({"i": index, "outcome": outcome, "detail": detail})
                       + "\n").encode())
    os.close(log)


def describe(case):
    s, family, what = case[:3]
    return f"{s.label} {family} {what}"


def run_fuzz(config_name, sweep="single", timeout=900):
    """Run every case in worker subprocesses (a crashed worker is restarted after the case
    that crashed it); returns (counts by outcome, [failure descriptions])."""
    all_cases = cases(sweep)
    counts = {"ok": 0, "refused": 0, "skipped": 0, "BAD": 0}
    failures = []
    with tempfile.TemporaryDirectory() as tmp:
        start, attempt = 0, 0
        while start < len(all_cases):
            results = os.path.join(tmp, f"results-{attempt}.jsonl")
            attempt += 1
            p = subprocess.run([sys.executable, HERE, "--worker", config_name, sweep,
                                str(start), results], capture_output=True, text=True,
                               timeout=timeout)
            started, last = None, start - 1
            with open(results) if os.path.exists(results) else open(os.devnull) as f:
                for line in f:
                    r = json.loads(line)
                    if r.get("start"):
                        started = r["i"]
                        continue
                    started, last = None, r["i"]
                    counts[r["outcome"]] += 1
                    if r["outcome"] == "BAD":
                        failures.append(f"{describe(all_cases[r['i']])}: {r['detail']}")
            if p.returncode == 0 and started is None:
                if p.stdout or p.stderr:   # printed outside the captured calls
                    counts["BAD"] += 1
                    failures.append(f"the worker printed: {(p.stdout + p.stderr)[-500:]!r}")
                break
            if started is None:   # died between cases: the worker itself is broken
                raise AssertionError(f"fuzz worker exited {p.returncode} after case {last}: "
                                     f"{p.stdout[-2000:]}{p.stderr[-2000:]}")
            rc = p.returncode
            why = f"signal {signal.Signals(-rc).name}" if rc < 0 else f"exit status {rc}"
            counts["BAD"] += 1
            failures.append(f"{describe(all_cases[started])}: the process died ({why}) "
                            f"{p.stderr.strip()[-300:]!r}")
            start = started + 1
    return counts, failures


# ---------------------------------------------------------------------------- the tests

def check_table_covers_the_module():
    """The table covers exactly the exported kernels: a new kernel without an entry (or an
    entry for a kernel that is gone) fails every fuzz test."""
    exported = set(exported_kernels())
    in_table = {s.kernel for s in SPECS}
    missing = exported - in_table - set(NOT_FUZZED)
    assert not missing, f"exported kernels without a valid call in SPECS: {sorted(missing)}"
    stale = (in_table | set(NOT_FUZZED)) - exported
    assert not stale, f"entries for kernels _core does not export: {sorted(stale)}"
    assert not in_table & set(NOT_FUZZED)


if pytest is not None:
    def _check(config_name, sweep="single"):
        check_table_covers_the_module()
        counts, failures = run_fuzz(config_name, sweep)
        summary = ", ".join(f"{k} {v}" for k, v in counts.items())
        assert not failures, (f"{len(failures)} bad kernel calls ({summary}):\n"
                              + "\n".join(failures[:60]))
        assert counts["ok"] > 0 and counts["refused"] > 0, summary

    @pytest.mark.parametrize("config_name", list(CONFIGS))
    def test_kernel_fuzz(config_name):
        """Every case (the valid calls included, which must succeed), on each configuration:
        "parallel" (every parallel path: 2 threads, no work threshold), "serial" (one
        thread), "portable" (the portable low-precision path, sgemm for few rows, sgemm cut
        into 7-row slices, an uneven team of 3)."""
        _check(config_name)

    @pytest.mark.parametrize("config_name", list(CONFIGS))
    def test_kernel_fuzz_pairs(config_name):
        """Two perturbations at once: every pair of dimensions, and every dimension with
        every value of each integer argument (this sweep found the SIGFPE of a split over an
        empty side: matmul_backward with C = OC = 0 on two threads)."""
        _check(config_name, "pairs")


if __name__ == "__main__":
    if sys.argv[1:2] == ["--worker"]:
        worker(sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5])
    else:   # a report: python tests/test_kernel_fuzz.py [config [sweep]]
        config_name = sys.argv[1] if len(sys.argv) > 1 else "parallel"
        sweep = sys.argv[2] if len(sys.argv) > 2 else "single"
        counts, failures = run_fuzz(config_name, sweep)
        print("\n".join(failures))
        print(counts, f"{len(cases(sweep))} cases")
