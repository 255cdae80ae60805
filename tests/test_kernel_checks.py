"""The exported kernels read through raw row pointers with bounds checking off: each checks its
shapes, and the token ids, targets and positions it indexes with, once per call, and raises a
ValueError naming the kernel (and the shapes) instead of reading past an array.  A thread of
an attention kernel that cannot get its scratch memory raises MemoryError, never writes
through NULL.

(matmul_forward / matmul_backward / lm_head_*: tests/test_gemm.py; adamw_step and the
sampling kernels: tests/test_optim.py and tests/test_sampling.py.)  That every exported kernel
refuses what it cannot compute is the kernel-call fuzzer's proof (tests/test_kernel_fuzz.py,
whose table must cover the module); the calls here pin down the messages.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from gpt2s import _core


def f32(*shape):
    return np.zeros(shape, np.float32)


def i64(*values):
    return np.array(values, np.int64)


N, C, V, NCTX, T = 6, 8, 11, 5, 3
IDS = i64(1, 2, 3, 4, 5, 6)


# (kernel name, call, text the message must contain): one bad argument per case
BAD_CALLS = [
    # embedding
    ("embedding_forward", lambda: _core.embedding_forward(f32(N, C), IDS[:5], f32(V, C),
                                                          f32(NCTX, C), T, 0), "idx (5,)"),
    ("embedding_forward", lambda: _core.embedding_forward(f32(N, C), IDS, f32(V, C + 1),
                                                          f32(NCTX, C), T, 0), "wte (11, 9)"),
    ("embedding_forward", lambda: _core.embedding_forward(f32(N, C), IDS, f32(V, C),
                                                          f32(NCTX, 4), T, 0), "wpe (5, 4)"),
    ("embedding_forward", lambda: _core.embedding_forward(f32(N, C), IDS, f32(V, C),
                                                          f32(NCTX, C), 4, 0), "T=4"),
    ("embedding_forward", lambda: _core.embedding_forward(f32(N, C), IDS, f32(V, C),
                                                          f32(NCTX, C), 0, 0), "T=0"),
    ("embedding_forward", lambda: _core.embedding_forward(f32(N, C), IDS, f32(V, C),
                                                          f32(NCTX, C), T, 3), "pos0=3"),
    ("embedding_forward", lambda: _core.embedding_forward(f32(N, C), IDS, f32(V, C),
                                                          f32(NCTX, C), T, -1), "pos0=-1"),
    ("embedding_forward", lambda: _core.embedding_forward(f32(N, C), i64(1, 2, 11, 4, 5, 6),
                                                          f32(V, C), f32(NCTX, C), T, 0),
     "token id 11 at 2"),
    ("embedding_forward", lambda: _core.embedding_forward(f32(N, C), i64(1, 2, 3, 4, 5, -1),
                                                          f32(V, C), f32(NCTX, C), T, 0),
     "token id -1 at 5"),
    ("embedding_backward", lambda: _core.embedding_backward(f32(V, C), f32(NCTX, C),
                                                            f32(N, C), IDS[:4], T), "idx (4,)"),
    ("embedding_backward", lambda: _core.embedding_backward(f32(V, C), f32(2, C), f32(N, C),
                                                            IDS, T), "dwpe (2, 8)"),
    ("embedding_backward", lambda: _core.embedding_backward(f32(V, C - 1), f32(NCTX, C),
                                                            f32(N, C), IDS, T), "dwte (11, 7)"),
    ("embedding_backward", lambda: _core.embedding_backward(f32(V, C), f32(NCTX, C),
                                                            f32(N, C), IDS, 4), "T=4"),
    ("embedding_backward", lambda: _core.embedding_backward(f32(V, C), f32(NCTX, C), f32(N, C),
                                                            i64(0, 0, 0, 0, 0, 99), T),
     "token id 99 at 5"),
    # layernorm
    ("layernorm_forward", lambda: _core.layernorm_forward(f32(N, C + 1), f32(N), f32(N),
                                                          f32(N, C), f32(C), f32(C), 1e-5),
     "out (6, 9)"),
    ("layernorm_forward", lambda: _core.layernorm_forward(f32(N, C), f32(N), f32(N), f32(N, C),
                                                          f32(C - 1), f32(C), 1e-5),
     "weight (7,)"),
    ("layernorm_forward", lambda: _core.layernorm_forward(f32(N, C), f32(N), f32(N), f32(N, C),
                                                          f32(C), f32(2), 1e-5), "bias (2,)"),
    ("layernorm_forward", lambda: _core.layernorm_forward(f32(N, C), f32(N), f32(0), f32(N, C),
                                                          f32(C), f32(C), 1e-5), "rstd (0,)"),
    ("layernorm_forward", lambda: _core.layernorm_forward(f32(N, C), f32(N - 1), f32(N - 1),
                                                          f32(N, C), f32(C), f32(C), 1e-5),
     "mean (5,)"),
    ("residual_layernorm_forward", lambda: _core.residual_layernorm_forward(
        f32(N, C), f32(N, C), f32(N), f32(N), f32(N, C), f32(N - 1, C), f32(C), f32(C), 1e-5),
     "inp2 (5, 8)"),
    ("residual_layernorm_forward", lambda: _core.residual_layernorm_forward(
        f32(N - 1, C), f32(N, C), f32(N), f32(N), f32(N, C), f32(N, C), f32(C), f32(C), 1e-5),
     "residual (5, 8)"),
    ("residual_layernorm_forward", lambda: _core.residual_layernorm_forward(
        f32(N, C), f32(N, C), f32(N), f32(N), f32(N, C), f32(N, C), f32(C), f32(C + 3), 1e-5),
     "bias (11,)"),
    ("residual_layernorm_forward", lambda: _core.residual_layernorm_forward(
        f32(N, C), f32(N, C), f32(0), f32(N), f32(N, C), f32(N, C), f32(C), f32(C), 1e-5),
     "mean (0,)"),
    ("layernorm_backward", lambda: _core.layernorm_backward(
        f32(N, C), f32(C), f32(C), f32(N, C), f32(N, C), f32(C), f32(N), f32(N - 2),
        f32(8, 2 * C)), "rstd (4,)"),
    ("layernorm_backward", lambda: _core.layernorm_backward(
        f32(N, C), f32(C), f32(C), f32(N + 1, C), f32(N, C), f32(C), f32(N), f32(N),
        f32(8, 2 * C)), "dout (7, 8)"),
    ("layernorm_backward", lambda: _core.layernorm_backward(
        f32(N, C), f32(C + 1), f32(C), f32(N, C), f32(N, C), f32(C), f32(N), f32(N),
        f32(8, 2 * C)), "dweight (9,)"),
    # activations
    ("activation_forward", lambda: _core.activation_forward(f32(N, C), f32(N + 1, C), "gelu_tanh"),
     "inp (7,8)"),
    ("activation_forward", lambda: _core.activation_forward(f32(N, C - 1), f32(N, C), "relu"),
     "out (6,7)"),
    ("activation_backward", lambda: _core.activation_backward(f32(N, C), f32(N, C),
                                                              f32(N, C + 1), "gelu_tanh"),
     "dout (6,9)"),
    ("activation_backward", lambda: _core.activation_backward(f32(N - 1, C), f32(N, C),
                                                              f32(N, C), "silu"),
     "dinp (5,8)"),
    # attention (B = 2, T = 3, C = 8 in 2 heads; qkv (2, 3, 24))
    ("attention_forward", lambda: _core.attention_forward(
        f32(2, 3, C), f32(2, 2, 3), f32(2, 3, 24), 0, f32(2, 3, 24), C, f32(2, 3, 24), 2 * C,
        0, 3, 0.5), "n_head=3"),
    ("attention_forward", lambda: _core.attention_forward(
        f32(2, 3, C), f32(2, 2, 3), f32(2, 3, 24), 0, f32(2, 3, 24), C, f32(2, 3, 24), 2 * C,
        0, 0, 0.5), "n_head=0"),
    ("attention_forward", lambda: _core.attention_forward(
        f32(2, 3, C), f32(2, 2, 4), f32(2, 3, 24), 0, f32(2, 3, 24), C, f32(2, 3, 24), 2 * C,
        0, 2, 0.5), "lse (2, 2, 4)"),
    ("attention_forward", lambda: _core.attention_forward(
        f32(2, 3, C), f32(2, 2, 3), f32(1, 3, 24), 0, f32(2, 3, 24), C, f32(2, 3, 24), 2 * C,
        0, 2, 0.5), "q (1, 3, 24)"),
    ("attention_forward", lambda: _core.attention_forward(
        f32(2, 3, C), f32(2, 2, 3), f32(2, 3, 24), 17, f32(2, 3, 24), C, f32(2, 3, 24), 2 * C,
        0, 2, 0.5), "column 17"),
    ("attention_forward", lambda: _core.attention_forward(
        f32(2, 3, C), f32(2, 2, 3), f32(2, 3, 24), 0, f32(2, 3, 24), 20, f32(2, 3, 24), 2 * C,
        0, 2, 0.5), "at 20"),
    ("attention_forward", lambda: _core.attention_forward(
        f32(2, 3, C), f32(2, 2, 3), f32(2, 3, 24), 0, f32(2, 3, 24), C, f32(2, 3, 24), -1,
        0, 2, 0.5), "at -1"),
    ("attention_forward", lambda: _core.attention_forward(
        f32(2, 3, C), f32(2, 2, 3), f32(2, 3, 24), 0, f32(1, 3, 24), C, f32(1, 3, 24), 2 * C,
        0, 2, 0.5), "k (1, 3, 24)"),
    ("attention_forward", lambda: _core.attention_forward(
        f32(2, 1, C), f32(0, 0, 0), f32(2, 1, 24), 0, f32(2, 5, C), 0, f32(2, 5, C), 0,
        -1, 2, 0.5), "pos0=-1"),
    ("attention_forward", lambda: _core.attention_forward(
        f32(2, 1, C), f32(0, 0, 0), f32(2, 1, 24), 0, f32(2, 5, C), 0, f32(2, 5, C), 0,
        5, 2, 0.5), "too short"),
    ("attention_backward", lambda: _core.attention_backward(
        f32(2, 3, 24), f32(2, 3, C), f32(2, 3, C), f32(2, 2, 3), f32(2, 3, 24), 3, 0.5),
     "n_head=3"),
    ("attention_backward", lambda: _core.attention_backward(
        f32(2, 3, 24), f32(2, 3, C), f32(2, 3, C), f32(2, 2, 2), f32(2, 3, 24), 2, 0.5),
     "lse (2, 2, 2)"),
    ("attention_backward", lambda: _core.attention_backward(
        f32(2, 3, 16), f32(2, 3, C), f32(2, 3, C), f32(2, 2, 3), f32(2, 3, 24), 2, 0.5),
     "dqkv (2, 3, 16)"),
    ("attention_backward", lambda: _core.attention_backward(
        f32(2, 3, 24), f32(2, 3, C), f32(2, 3, C), f32(2, 2, 3), f32(2, 2, 24), 2, 0.5),
     "qkv (2, 2, 24)"),
    ("attention_backward", lambda: _core.attention_backward(
        f32(2, 3, 24), f32(1, 3, C), f32(2, 3, C), f32(2, 2, 3), f32(2, 3, 24), 2, 0.5),
     "dout (1, 3, 8)"),
    # the KV cache (B = 2, n_ctx = 5, C = 8)
    ("kv_cache_write", lambda: _core.kv_cache_write(f32(2, 5, C), f32(2, 5, C), f32(2, 2, 24), 4),
     "pos0=4"),
    ("kv_cache_write", lambda: _core.kv_cache_write(f32(2, 5, C), f32(2, 5, C), f32(2, 2, 24), -1),
     "pos0=-1"),
    ("kv_cache_write", lambda: _core.kv_cache_write(f32(2, 5, C), f32(2, 4, C), f32(2, 2, 24), 0),
     "vcache (2, 4, 8)"),
    ("kv_cache_write", lambda: _core.kv_cache_write(f32(2, 5, C), f32(2, 5, C), f32(2, 2, 20), 0),
     "qkv (2, 2, 20)"),
    ("kv_cache_write", lambda: _core.kv_cache_write(f32(1, 5, C), f32(1, 5, C), f32(2, 2, 24), 0),
     "kcache (1, 5, 8)"),
    # softmax cross-entropy (N = 6 rows, V = 11)
    ("crossentropy_forward", lambda: _core.crossentropy_forward(
        f32(N), f32(N), f32(N, V), i64(0, 1, 2, 3, 11, 5)), "target 11 at 4"),
    ("crossentropy_forward", lambda: _core.crossentropy_forward(
        f32(N), f32(N), f32(N, V), i64(0, 1, -2, 3, 4, 5)), "target -2 at 2"),
    ("crossentropy_forward", lambda: _core.crossentropy_forward(
        f32(N), f32(N), f32(N, V), i64(0, 1, 2)), "targets (3,)"),
    ("crossentropy_forward", lambda: _core.crossentropy_forward(
        f32(N), f32(N - 1), f32(N, V), IDS - 1), "lse (5,)"),
    ("crossentropy_forward", lambda: _core.crossentropy_forward(
        f32(N + 1), f32(N), f32(N, V), IDS - 1), "losses (7,)"),
    ("crossentropy_backward", lambda: _core.crossentropy_backward(
        f32(N, V), f32(N, V), f32(N), i64(0, 1, 2, 3, 4, 50), 1.0), "target 50 at 5"),
    ("crossentropy_backward", lambda: _core.crossentropy_backward(
        f32(N, V), f32(N, V), f32(N), i64(-7, 1, 2, 3, 4, 5), 1.0), "target -7 at 0"),
    ("crossentropy_backward", lambda: _core.crossentropy_backward(
        f32(N, V - 1), f32(N, V), f32(N), IDS - 1, 1.0), "dlogits (6, 10)"),
    ("crossentropy_backward", lambda: _core.crossentropy_backward(
        f32(N, V), f32(N, V), f32(N), IDS[:2], 1.0), "targets (2,)"),
]


@pytest.mark.parametrize("kernel,call,fragment", BAD_CALLS,
                         ids=[f"{k}-{i}" for i, (k, _, _) in enumerate(BAD_CALLS)])
def test_bad_arguments_raise_value_error_naming_kernel(kernel, call, fragment):
    with pytest.raises(ValueError) as e:
        call()
    msg = str(e.value)
    assert msg.startswith(kernel + ":"), msg
    assert fragment in msg, msg


def test_good_arguments_still_run():
    """The boundaries the checks allow: the last token id, the last position, target -1 and
    V - 1, layernorm without mean/rstd, a KV cache filled to n_ctx."""
    wte = np.arange(V * C, dtype=np.float32).reshape(V, C)
    wpe = np.ones((NCTX, C), np.float32)
    out = f32(N, C)
    _core.embedding_forward(out, i64(10, 0, 1, 2, 3, 10), wte, wpe, T, NCTX - T)
    np.testing.assert_array_equal(out[0], wte[10] + 1)
    _core.layernorm_forward(f32(N, C), f32(0), f32(0), out, f32(C) + 1, f32(C), 1e-5)
    losses = f32(N)
    logits = np.random.default_rng(0).standard_normal((N, V)).astype(np.float32)
    _core.crossentropy_forward(losses, f32(N), logits, i64(-1, 10, 0, -1, 5, 3))
    assert losses[0] == 0 and losses[3] == 0 and (losses[[1, 2, 4, 5]] > 0).all()
    k, v = f32(2, 5, C), f32(2, 5, C)
    qkv = np.ones((2, 2, 24), np.float32)
    _core.kv_cache_write(k, v, qkv, 3)
    assert k[:, 3:].all() and not k[:, :3].any()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="RLIMIT_AS and /proc: Linux")
@pytest.mark.parametrize("kernel", ["attention_forward", "attention_backward"])
def test_attention_scratch_allocation_failure_raises_memory_error(kernel):
    """With the address space capped just above what the process uses, a thread's 64 x T
    scratch (51 MB at T = 200000) cannot be allocated: MemoryError after the parallel region,
    and the process goes on."""
    code = textwrap.dedent(f"""
        import resource, numpy as np, gpt2s
        from gpt2s import _core
        gpt2s.set_num_threads(1)
        T = 200_000
        if "{kernel}" == "attention_forward":
            args = (np.zeros((1, 1, 1), np.float32), np.zeros((0, 0, 0), np.float32),
                    np.zeros((1, 1, 1), np.float32), 0, np.zeros((1, T, 1), np.float32), 0,
                    np.zeros((1, T, 1), np.float32), 0, T - 1, 1, 1.0)
        else:
            args = (np.zeros((1, T, 3), np.float32), np.zeros((1, T, 1), np.float32),
                    np.zeros((1, T, 1), np.float32), np.zeros((1, 1, T), np.float32),
                    np.zeros((1, T, 3), np.float32), 1, 1.0)
        kernel = getattr(_core, "{kernel}")
        for line in open("/proc/self/status"):
            if line.startswith("VmSize:"):
                used = int(line.split()[1]) * 1024
        resource.setrlimit(resource.RLIMIT_AS, (used + (24 << 20), resource.RLIM_INFINITY))
        try:
            kernel(*args)
        except MemoryError as e:
            print("MemoryError:", e)
        else:
            print("no error")
    """)
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert p.returncode == 0, p.stderr
    assert p.stdout.startswith(f"MemoryError: {kernel}: no memory"), (p.stdout, p.stderr)


@pytest.mark.parametrize("empty", [[], [[]], np.zeros((1, 0), np.int64), np.zeros(0)])
def test_facade_names_empty_token_ids(empty):
    """In front of the kernels, the façade's own check: no token ids is "idx is empty" (an
    empty list is a float64 array to NumPy, which must not turn into a dtype complaint), for
    forward and for generate."""
    from gpt2s import GPT2, GPT2Config
    m = GPT2(GPT2Config(n_layer=1, n_head=1, n_embd=8, vocab_size=11, n_ctx=5))
    for call in (lambda: m.forward(empty), lambda: m.generate(empty, 2),
                 lambda: m.generate_stream(empty, 2)):
        with pytest.raises(ValueError, match=r"^idx is empty \(shape .*\): give at least one "
                                             r"token id$"):
            call()


# Integer arguments: any Python integer is taken and checked in 64 bits (a Cython `int`
# parameter raised OverflowError naming neither kernel nor argument, and took 1.5 as 1).
QKV = (f32(2, 3, 24), f32(2, 2, 3), f32(2, 3, 24))
INT_ARGUMENTS = [
    ("embedding_forward", "pos0", lambda x: _core.embedding_forward(
        f32(N, C), IDS, f32(V, C), f32(NCTX, C), T, x)),
    ("embedding_forward", "T", lambda x: _core.embedding_forward(
        f32(N, C), IDS, f32(V, C), f32(NCTX, C), x, 0)),
    ("embedding_backward", "T", lambda x: _core.embedding_backward(
        f32(V, C), f32(NCTX, C), f32(N, C), IDS, x)),
    ("embedding_forward", "pos0", lambda x: _core.embedding_forward(
        f32(N, C), IDS, _core.PackedWeight(_core.WTYPE_BFLOAT16, np.zeros((V, C), np.uint16),
                                           None, (V, C), False), f32(NCTX, C), T, x)),
    ("embedding_forward", "pos0", lambda x: _core.embedding_forward(
        f32(N, 32), IDS, _core.PackedWeight(_core.WTYPE_INT8, np.zeros((V, 32), np.int8),
                                            np.zeros((V, 1), np.uint16), (V, 32), False),
        f32(NCTX, 32), T, x)),
    ("attention_forward", "q_off", lambda x: _core.attention_forward(
        f32(2, 3, C), f32(2, 2, 3), f32(2, 3, 24), x, f32(2, 3, 24), C, f32(2, 3, 24), 2 * C,
        0, 2, 0.5)),
    ("attention_forward", "k_off", lambda x: _core.attention_forward(
        f32(2, 3, C), f32(2, 2, 3), f32(2, 3, 24), 0, f32(2, 3, 24), x, f32(2, 3, 24), 2 * C,
        0, 2, 0.5)),
    ("attention_forward", "pos0", lambda x: _core.attention_forward(
        f32(2, 1, C), f32(0, 0, 0), f32(2, 1, 24), 0, f32(2, 5, C), 0, f32(2, 5, C), 0,
        x, 2, 0.5)),
    ("attention_forward", "n_head", lambda x: _core.attention_forward(
        f32(2, 3, C), f32(2, 2, 3), f32(2, 3, 24), 0, f32(2, 3, 24), C, f32(2, 3, 24), 2 * C,
        0, x, 0.5)),
    ("attention_backward", "n_head", lambda x: _core.attention_backward(
        f32(2, 3, 24), f32(2, 3, C), f32(2, 3, C), f32(2, 2, 3), f32(2, 3, 24), x, 0.5)),
    ("kv_cache_write", "pos0", lambda x: _core.kv_cache_write(
        f32(2, 5, C), f32(2, 5, C), f32(2, 2, 24), x)),
    # (a segment out of range: refused also where the step itself is valid)
    ("adamw_step", "step", lambda x: _core.adamw_step(
        f32(4), f32(4), f32(4), f32(4), i64(0), i64(5), f32(1), 1e-3, 0.9, 0.95, 1e-8, x, 1.0)),
]


@pytest.mark.parametrize("value", [2**31, 2**63 - 1, 2**64, -2**63 - 1])
@pytest.mark.parametrize("kernel,argument,call", INT_ARGUMENTS,
                         ids=[f"{k}-{a}" for k, a, _ in INT_ARGUMENTS])
def test_integer_arguments_beyond_c_int_are_the_kernels_value_error(kernel, argument, call,
                                                                    value):
    """2^31 and beyond (and below -2^63): the kernel's ValueError with the value in it (for
    adamw_step a segment out of range, the step being valid)."""
    with pytest.raises(ValueError) as e:
        call(value)
    msg = str(e.value)
    assert msg.startswith(kernel + ":"), msg
    assert str(value) in msg or kernel == "adamw_step", msg


@pytest.mark.parametrize("value", [1.5, None, "3"])
@pytest.mark.parametrize("kernel,argument,call", INT_ARGUMENTS,
                         ids=[f"{k}-{a}" for k, a, _ in INT_ARGUMENTS])
def test_integer_arguments_refuse_non_integers(kernel, argument, call, value):
    with pytest.raises(TypeError) as e:
        call(value)
    assert str(e.value).startswith(f"{kernel}: {argument} must be an integer"), str(e.value)


def test_adamw_step_refuses_a_step_below_one():
    """Step 0 divided by 1 - beta^0 = 0 and wrote NaN into every parameter."""
    params = np.ones(4, np.float32)
    for step in (0, -1):
        with pytest.raises(ValueError, match=f"^adamw_step: step must be >= 1.*got {step}$"):
            _core.adamw_step(params, f32(4), f32(4), f32(4), i64(0), i64(4), f32(1), 1e-3, 0.9,
                             0.95, 1e-8, step, 1.0)
    assert (params == 1).all()


def _run_isolated(code):
    """Run code in a fresh interpreter (a crash there fails the test, not the session);
    returns (returncode, stdout, stderr)."""
    p = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True,
                       text=True, timeout=300)
    return p.returncode, p.stdout, p.stderr


def test_positions_near_int_max_are_refused_not_overflowed():
    """pos0 = 2^31 - 1: pos0 + T overflowed a C int, so the bound check passed and
    kv_cache_write and embedding_forward wrote and read far outside their arrays (a
    segmentation fault), and attention_forward asked for a negative scratch (MemoryError)."""
    rc, out, err = _run_isolated("""
        import numpy as np
        from gpt2s import _core
        f32 = lambda *s: np.zeros(s, np.float32)
        big = 2**31 - 1
        calls = {
            "kv_cache_write": lambda: _core.kv_cache_write(f32(2, 5, 8), f32(2, 5, 8),
                                                           f32(2, 2, 24), big),
            "embedding_forward": lambda: _core.embedding_forward(
                f32(6, 8), np.arange(6), f32(11, 8), f32(5, 8), 3, big),
            "embedding_forward (bfloat16)": lambda: _core.embedding_forward(
                f32(6, 8), np.arange(6),
                _core.PackedWeight(_core.WTYPE_BFLOAT16, np.zeros((11, 8), np.uint16), None,
                                   (11, 8), False), f32(5, 8), 3, big),
            "attention_forward": lambda: _core.attention_forward(
                f32(2, 1, 8), f32(0, 0, 0), f32(2, 1, 24), 0, f32(2, 5, 8), 0, f32(2, 5, 8),
                0, big, 2, 0.5),
        }
        for name, call in calls.items():
            print(name, "...", flush=True)
            try:
                call()
                print("no error")
            except Exception as e:
                print(type(e).__name__, e)
    """)
    assert rc == 0, f"the process died (status {rc}) after:\n{out}{err}"
    lines = out.splitlines()
    for name, result in zip(lines[::2], lines[1::2]):
        name = name.split()[0]
        assert result.startswith(f"ValueError {name}: "), result
        assert "pos0=2147483647" in result, result
    assert len(lines) == 8 and err == "", (out, err)


def test_matmuls_with_an_empty_reduction_write_zeros_and_print_nothing():
    """K = 0 is an empty sum: the output is the bias, or zeros.  With one row it went to
    sgemv, which printed "** On entry to SGEMV parameter number 6 had an illegal value" and
    returned without writing the output (and the one-row lm_head backward's dinp likewise).
    (Products of several rows: tests/test_gemm.py and the fuzzer.)"""
    rc, out, err = _run_isolated("""
        import numpy as np
        from gpt2s import _core
        M = 1
        nan = lambda *s: np.full(s, np.nan, np.float32)
        e = lambda *s: np.zeros(s, np.float32)
        out = nan(M, 24)
        _core.matmul_forward(out, e(M, 0), e(0, 24), e(0))
        logits = nan(M, 37)
        _core.lm_head_forward(logits, e(M, 0), e(37, 0))
        dinp, dwte = nan(M, 40), e(0, 40)
        _core.lm_head_backward(dinp, dwte, e(M, 0), e(M, 40), e(0, 40))
        dinp2 = nan(M, 40)
        _core.matmul_backward(dinp2, e(40, 0), e(0), e(M, 0), e(M, 40), e(40, 0), False)
        for name, a in (("matmul_forward", out), ("lm_head_forward", logits),
                        ("lm_head_backward", dinp), ("matmul_backward", dinp2)):
            print(name, "zeros" if (a == 0).all() else "NOT WRITTEN")
    """)
    assert rc == 0, err
    assert out.split("\n") == ["matmul_forward zeros", "lm_head_forward zeros",
                               "lm_head_backward zeros", "matmul_backward zeros", ""], out
    assert err == ""
