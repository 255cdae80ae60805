"""bfloat16 compute (``compute_dtype="bfloat16"``, ``--compute-dtype bfloat16``): every matmul of
the forward and the backward with its operands rounded to bfloat16 and float32 sums.

Checked against a NumPy float64 reference of the same rounded computation written here (its
bfloat16 rounding done in float64 arithmetic, independently of the kernels' bit tricks), per
matmul and for a whole GPT-2; against float32 (loss within 1e-2 relative); against PyTorch's
``torch.autocast("cpu", torch.bfloat16)`` on the same weights (per-tensor gradient error vs
float64 no worse than twice autocast's); and through the C harness of the vdpbf16ps GEMM
(natively where the CPU has AVX512_BF16, else emulated by SIMDe)."""

from __future__ import annotations

import io
import os
import platform
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

import gpt2s
import ref
from gpt2s import GPT2, AdamW, GPT2Config, _core

ROOT = Path(__file__).resolve().parents[1]
HARNESS = ROOT / "tests" / "harness" / "bf16gemm_harness.c"
KERNELS = ROOT / "src" / "gpt2s" / "kernels"

# every route this CPU runs, and "reference": kernels/bf16gemm.h's scalar GEMM through the
# route the vdpbf16ps GEMM takes (its strides and its split over the threads), on any CPU
VARIANTS = _core.bf16_compute_variants() + ("reference",)


@pytest.fixture(params=VARIANTS)
def variant(request, every_kernel_parallel):
    previous = _core.set_bf16_compute_variant(request.param)
    yield request.param
    _core.set_bf16_compute_variant(previous)


# ---------------------------------------------------------------------- the float64 reference

def bf16(x):
    """x rounded to the nearest bfloat16 (ties to even), as float64: 8 significant bits, by
    frexp / rint in float64 (bfloat16 denormals: a spacing of 2^-133)."""
    x = np.asarray(x, np.float64)
    m, e = np.frexp(x)                         # |x| = |m| 2^e, |m| in [0.5, 1)
    q = np.ldexp(1.0, np.maximum(e - 8, -133))
    return np.where(x == 0, x, np.rint(x / q) * q)


def mm(a, b):
    """The reference product: both operands rounded to bfloat16, summed in float64."""
    return bf16(a) @ bf16(b)


def product_bound(a, b, K):
    """float32 summation error of a K-term sum of the rounded products, with margin."""
    return 4.0 * np.sqrt(K) * 2.0 ** -24 * (np.abs(bf16(a)) @ np.abs(bf16(b))) + 1e-30


def as_bits(w):
    """The bfloat16 bits of float32 w (what the model's weight copies hold)."""
    out = np.empty(w.size, np.uint16)
    _core.bf16_round_into(out, np.ascontiguousarray(w, np.float32).reshape(-1))
    return out.reshape(w.shape)


def test_bf16_round_into_matches_the_float64_rounding():
    rng = np.random.default_rng(0)
    x = np.concatenate([rng.standard_normal(5000).astype(np.float32) * 10.0 ** rng.integers(-30, 30, 5000),
                        (1.0 + np.arange(256) / 256 + 1 / 512).astype(np.float32),   # exact ties
                        np.float32([0.0, -0.0, 1e-39, -3e-40, 3.3e38])]).astype(np.float32)
    bits = as_bits(x)
    got = (bits.astype(np.uint32) << 16).view(np.float32).astype(np.float64)
    want = bf16(x)
    finite = np.isfinite(want) & (np.abs(want) < 3.39e38)
    assert np.array_equal(got[finite], want[finite])


# ---------------------------------------------------------------------- per matmul

SHAPES = [(1, 5, 7), (3, 37, 70), (33, 64, 48), (70, 17, 129)]   # (N, C, OC): every tail


@pytest.mark.parametrize("N,C,OC", SHAPES)
def test_matmul_forward_backward(variant, N, C, OC):
    rng = np.random.default_rng(N * 1000 + C)
    x = rng.standard_normal((N, C)).astype(np.float32)
    w = (rng.standard_normal((C, OC)) / np.sqrt(C)).astype(np.float32)
    b = rng.standard_normal(OC).astype(np.float32)
    dy = rng.standard_normal((N, OC)).astype(np.float32)
    wb = as_bits(w)
    out = np.empty((N, OC), np.float32)
    _core.matmul_forward_bf16(out, x, wb, b)
    want = mm(x, w) + b
    assert np.all(np.abs(out - want) <= product_bound(x, w, C) + 1e-6 * np.abs(b)), "forward"
    # the rounding is really applied: the unrounded product differs by far more
    assert np.abs(out - (x.astype(np.float64) @ w + b)).max() > 10 * product_bound(x, w, C).max()

    dx = np.full((N, C), 0.5, np.float32)
    dw = rng.standard_normal((C, OC)).astype(np.float32)
    db = rng.standard_normal(OC).astype(np.float32)
    dw0, db0 = dw.astype(np.float64), db.astype(np.float64)
    _core.matmul_backward_bf16(dx, dw, db, dy, x, wb, True)
    assert np.all(np.abs(dx - (0.5 + mm(dy, w.T))) <= product_bound(dy, w.T, OC) + 1e-7), "dinp"
    assert np.all(np.abs(dw - (dw0 + mm(x.T, dy)))
                  <= product_bound(x.T, dy, N) + 1e-6 * np.abs(dw0)), "dweight"
    np.testing.assert_allclose(db, db0 + dy.astype(np.float64).sum(0), rtol=1e-5, atol=1e-5)
    _core.matmul_backward_bf16(dx, dw, db, dy, x, wb, False)   # dinp overwritten
    assert np.all(np.abs(dx - mm(dy, w.T)) <= product_bound(dy, w.T, OC) + 1e-7), "dinp (=)"


@pytest.mark.parametrize("N,C,V", [(1, 16, 50), (9, 37, 211), (40, 64, 33)])
def test_lm_head_forward_backward(variant, N, C, V):
    rng = np.random.default_rng(V)
    x = rng.standard_normal((N, C)).astype(np.float32)
    wte = (rng.standard_normal((V, C)) / np.sqrt(C)).astype(np.float32)
    dl = rng.standard_normal((N, V)).astype(np.float32)
    wb = as_bits(wte)
    logits = np.empty((N, V), np.float32)
    _core.lm_head_forward_bf16(logits, x, wb)
    assert np.all(np.abs(logits - mm(x, wte.T)) <= product_bound(x, wte.T, C)), "logits"
    dx = np.empty((N, C), np.float32)
    dwte = np.ones((V, C), np.float32)
    _core.lm_head_backward_bf16(dx, dwte, dl.copy(), x, wb)
    assert np.all(np.abs(dx - mm(dl, wte)) <= product_bound(dl, wte, V)), "dinp"
    assert np.all(np.abs(dwte - (1.0 + mm(dl.T, x))) <= product_bound(dl.T, x, N) + 1e-7), "dwte"


def test_bad_shapes_are_named():
    with pytest.raises(ValueError, match="matmul_forward_bf16"):
        _core.matmul_forward_bf16(np.empty((2, 4), np.float32), np.empty((2, 3), np.float32),
                                  np.empty((5, 4), np.uint16), np.empty(0, np.float32))
    with pytest.raises(ValueError, match="unknown bfloat16 compute variant"):
        _core.set_bf16_compute_variant("avx9000")


# ---------------------------------------------------------------------- whole model

def _ref_bf16_loss_and_grads(params, idx, targets, n_head, eps=1e-5):
    """GPT-2's loss and gradients in float64 with every matmul of the forward and backward on
    bfloat16-rounded operands (the linear layers and the head; attention, layernorm, GELU and
    the loss unrounded), assembled from tests/ref.py's pieces."""
    saved = ref.linear, ref.linear_backward
    P = {k: np.asarray(v, np.float64) for k, v in params.items()}

    def linear(x, w, b):
        return (mm(x.reshape(-1, w.shape[0]), w) + b).reshape(*x.shape[:-1], w.shape[1])

    def linear_backward(dy, x, w):
        x2, dy2 = x.reshape(-1, w.shape[0]), dy.reshape(-1, w.shape[1])
        return (mm(dy2, w.T).reshape(x.shape), mm(x2.T, dy2), dy2.sum(axis=0))

    ref.linear, ref.linear_backward = linear, linear_backward
    try:
        # the head (logits = lnf @ wte^T and its two backward products) rounded too
        _, _, cache = ref.forward(P, idx, targets, n_head=n_head, eps=eps)
        lnf = cache["lnf"]
        B, T, C = lnf.shape
        logits = mm(lnf.reshape(-1, C), P["wte.weight"].T).reshape(B, T, -1)
        loss, dlogits = ref.cross_entropy(logits, targets)
        V = logits.shape[-1]
        dlnf = mm(dlogits.reshape(-1, V), P["wte.weight"]).reshape(lnf.shape)
        dwte_head = mm(dlogits.reshape(-1, V).T, lnf.reshape(-1, C))
        grads = _backward_from_dlnf(cache, dlnf, dwte_head)
    finally:
        ref.linear, ref.linear_backward = saved
    return loss, grads


def _backward_from_dlnf(cache, dlnf, dwte_head):
    """ref.backward's body after the head, starting from the given dlnf (a copy of its
    layer loop; ref.linear_backward is the rounded one while this runs)."""
    P, idx, layers = cache["P"], cache["idx"], cache["layers"]
    B, T = idx.shape
    C = P["wte.weight"].shape[1]
    grads = {k: np.zeros_like(v) for k, v in P.items()}
    grads["wte.weight"] += dwte_head
    dx, grads["ln_f.weight"], grads["ln_f.bias"] = ref.layernorm_backward(
        dlnf, P["ln_f.weight"], cache["lnf_cache"])
    for l in reversed(range(len(layers))):
        c = layers[l]
        w = {s: P[f"h.{l}.{s}"] for s in ref.LAYER_SUFFIXES}
        g = {}
        dfg, g["mlp.c_proj.weight"], g["mlp.c_proj.bias"] = ref.linear_backward(
            dx, c["fch_gelu"], w["mlp.c_proj.weight"])
        dfch = dfg * cache["act_grad"](c["fch"])
        dln2, g["mlp.c_fc.weight"], g["mlp.c_fc.bias"] = ref.linear_backward(
            dfch, c["ln2"], w["mlp.c_fc.weight"])
        d2, g["ln_2.weight"], g["ln_2.bias"] = ref.layernorm_backward(
            dln2, w["ln_2.weight"], c["ln2_cache"])
        dx = dx + d2
        datty, g["attn.c_proj.weight"], g["attn.c_proj.bias"] = ref.linear_backward(
            dx, c["atty"], w["attn.c_proj.weight"])
        dqkv = ref.attention_backward(datty, c["attn_cache"])
        dln1, g["attn.c_attn.weight"], g["attn.c_attn.bias"] = ref.linear_backward(
            dqkv, c["ln1"], w["attn.c_attn.weight"])
        d1, g["ln_1.weight"], g["ln_1.bias"] = ref.layernorm_backward(
            dln1, w["ln_1.weight"], c["ln1_cache"])
        dx = dx + d1
        for s, v in g.items():
            grads[f"h.{l}.{s}"] = v
    np.add.at(grads["wte.weight"], idx.reshape(-1), dx.reshape(-1, C))
    grads["wpe.weight"][:T] += dx.sum(axis=0)
    return grads


def _model(make_config, make_model, **kw):
    cfg = make_config(**kw)
    m = make_model(cfg, seed=3)
    return cfg, m


def test_model_matches_the_rounded_float64_reference(variant, make_config, make_model,
                                                     make_batch):
    cfg, m = _model(make_config, make_model, n_layer=2, n_head=2, head_size=16, vocab_size=211)
    idx, targets = make_batch(cfg, 3, 17, seed=5)
    want_loss, want = _ref_bf16_loss_and_grads(m.params, idx, targets, cfg.n_head)
    _, plain_loss, plain = ref.loss_and_grads(m.params, idx, targets, n_head=cfg.n_head)
    m.compute_dtype = "bfloat16"
    m.zero_grad()
    _, loss = m.forward(idx, targets)
    m.backward()
    # float32 activations round to a different bfloat16 now and then where the float64 ones
    # sit near a rounding boundary, and each such flip spreads: the model follows the rounded
    # reference to a few 1e-3, several times closer than the unrounded computation is to it
    # (the per-matmul tests above pin every product exactly)
    assert abs(loss - want_loss) <= 3e-5 * abs(want_loss)
    assert abs(plain_loss - want_loss) > 10 * abs(loss - want_loss)
    ratios = []
    for name, g in m.grads.items():
        err = ref.rel_err(g, want[name])
        assert err <= 6e-3, f"{name}: {err:.2e} from the rounded reference"
        ratios.append(err / ref.rel_err(plain[name], want[name]))
    assert np.mean(ratios) <= 0.5, f"mean error ratio (ours / unrounded) {np.mean(ratios):.2f}"


def test_loss_within_1e2_of_float32(make_config, make_model, make_batch):
    cfg, m = _model(make_config, make_model, n_layer=2, n_head=4, head_size=16,
                    vocab_size=1000)
    idx, targets = make_batch(cfg, 4, 64, seed=1)
    _, loss32 = m.forward(idx, targets, for_backward=False)
    m.compute_dtype = "bfloat16"
    _, loss16 = m.forward(idx, targets, for_backward=False)
    assert loss16 != loss32
    assert abs(loss16 - loss32) <= 1e-2 * abs(loss32)


def _autocast_grads(cfg, params, idx, targets):
    """transformers' GPT2LMHeadModel with float32 master weights under
    torch.autocast("cpu", torch.bfloat16): the gradients of the mean loss, as float64."""
    torch = pytest.importorskip("torch")
    from conftest import _make_hf_model
    model = _make_hf_model(cfg, params, dtype="float32", attn_implementation="eager")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(torch.from_numpy(idx)).logits
    loss = torch.nn.functional.cross_entropy(logits.float().reshape(-1, cfg.vocab_size),
                                             torch.from_numpy(targets).reshape(-1),
                                             ignore_index=-1)
    loss.backward()
    named = dict(model.transformer.named_parameters())
    return {n: p.grad.double().numpy() for n, p in named.items()}


def _gradient_errors_vs_autocast(cfg, m, idx, targets):
    _, _, exact = ref.loss_and_grads(m.params, idx, targets, n_head=cfg.n_head)
    theirs = _autocast_grads(cfg, {k: np.asarray(v) for k, v in m.params.items()}, idx, targets)
    m.compute_dtype = "bfloat16"
    m.zero_grad()
    m.forward(idx, targets)
    m.backward()
    worse = {}
    for name, g in m.grads.items():
        ours, torchs = ref.rel_err(g, exact[name]), ref.rel_err(theirs[name], exact[name])
        if ours > 2 * torchs:
            worse[name] = (ours, torchs)
    return worse


def test_gradient_error_at_most_twice_autocast(make_config, make_model, make_batch):
    pytest.importorskip("transformers")
    cfg, m = _model(make_config, make_model, n_layer=2, n_head=4, head_size=16, vocab_size=300)
    idx, targets = make_batch(cfg, 2, 32, seed=2, ignore_frac=0.0)
    worse = _gradient_errors_vs_autocast(cfg, m, idx, targets)
    assert not worse, f"(ours, autocast's) relative error vs float64: {worse}"


@pytest.mark.slow
def test_124m_loss_and_gradients_against_float32_and_autocast(make_batch):
    pytest.importorskip("transformers")
    cfg = GPT2Config.preset("gpt2")
    m = GPT2.from_config(cfg, seed=0)
    idx, targets = make_batch(cfg, 2, 64, seed=3, ignore_frac=0.0)
    _, loss32 = m.forward(idx, targets, for_backward=False)
    m.compute_dtype = "bfloat16"
    _, loss16 = m.forward(idx, targets, for_backward=False)
    assert abs(loss16 - loss32) <= 1e-2 * abs(loss32)
    m.compute_dtype = "float32"
    worse = _gradient_errors_vs_autocast(cfg, m, idx, targets)
    assert not worse, f"(ours, autocast's) relative error vs float64: {worse}"


def test_float32_default_is_unchanged(make_config, make_model, make_batch):
    cfg, m = _model(make_config, make_model)
    idx, targets = make_batch(cfg, 2, 16)
    assert m.compute_dtype == "float32" and m.store.compute_buffer is None
    logits0, loss0 = m.forward(idx, targets)
    logits0 = logits0.copy()
    m.compute_dtype = "bfloat16"
    logits1, loss1 = m.forward(idx, targets)
    assert loss1 != loss0
    m.compute_dtype = "float32"
    assert m.store.compute_buffer is None
    logits2, loss2 = m.forward(idx, targets)
    assert loss2 == loss0 and np.array_equal(logits2, logits0)


def test_constructors_and_errors(tmp_path, make_config):
    cfg = make_config()
    m = GPT2.from_config(cfg, seed=0, compute_dtype="bfloat16")
    assert m.compute_dtype == "bfloat16"
    m.save_safetensors(tmp_path)
    for loaded in (GPT2.from_safetensors(tmp_path, compute_dtype="bfloat16"),
                   GPT2.from_pretrained(str(tmp_path), compute_dtype="bfloat16")):
        assert loaded.compute_dtype == "bfloat16" and loaded.mapped
        idx = np.arange(8)[None] % cfg.vocab_size
        assert np.array_equal(loaded.forward(idx)[0], m.forward(idx)[0])
    with pytest.raises(ValueError, match="compute_dtype"):
        m.compute_dtype = "float16"
    with pytest.raises(ValueError, match="int8"):
        GPT2.from_config(cfg, seed=0, dtype="int8", compute_dtype="bfloat16")
    # a bfloat16-storage model computes on its own stored weights: the numbers of a float32
    # model holding the same (rounded) weights
    b = GPT2.from_config(cfg, seed=0, dtype="bfloat16", compute_dtype="bfloat16")
    w = b.to_dtype("float32")
    w.compute_dtype = "bfloat16"
    assert np.array_equal(b.forward(idx)[0], w.forward(idx)[0])


def test_adamw_refreshes_the_bf16_copies(make_config, make_model, make_batch):
    cfg = make_config()
    idx, targets = make_batch(cfg, 2, 16)
    a = make_model(cfg, seed=4)
    b = make_model(cfg, seed=4)
    b.compute_dtype = "bfloat16"
    opt_a, opt_b = AdamW(a, lr=1e-2), AdamW(b, lr=1e-2)
    for _ in range(2):
        b.zero_grad()
        b.forward(idx, targets)
        b.backward()
        a.grads  # the same gradients into the float32-compute model: same update
        a.store.grad_buffer[...] = b.store.grad_buffer
        opt_a.step()
        opt_b.step()
        # the master weights are updated exactly as without the copies
        assert np.array_equal(a.store.buffer, b.store.buffer)
        for name, bits in b.store.compute_params.items():
            assert np.array_equal(bits, as_bits(b.params[name])), name
    # and the next forward uses them: it equals a fresh model's on the same weights
    fresh = make_model(cfg, seed=4)
    fresh.store.buffer[...] = b.store.buffer
    fresh.compute_dtype = "bfloat16"
    assert np.array_equal(fresh.forward(idx)[0], b.forward(idx)[0])


def test_generate_greedy_with_bf16_compute(make_config, make_model):
    cfg, m = _model(make_config, make_model)
    m.compute_dtype = "bfloat16"
    out = m.generate([[1, 2, 3]], 6, temperature=0)
    # the cached decode equals the full forward on the same tokens, step by step
    for t in range(3, out.shape[1]):
        logits, _ = m.forward(out[:, :t])
        assert out[0, t] == int(np.argmax(logits[0, -1]))


def test_show_config_names_the_route():
    buf = io.StringIO()
    info = gpt2s.show_config(file=buf)
    assert info["bf16_compute"] == _core.get_bf16_compute_variant()
    text = buf.getvalue()
    assert "bfloat16 compute" in text
    if "avx512-bf16" not in _core.cpu_variants():
        assert info["bf16_compute"] == "portable"
        assert "float32 speed" in text and "AVX512_BF16" in text


# ---------------------------------------------------------------------- CLI

def test_train_and_generate_cli_flag(tmp_path):
    from gpt2s import generate as gen_cli
    from gpt2s import train as train_cli
    data = tmp_path / "data.txt"
    data.write_text("To be, or not to be, that is the question. " * 60)
    out = tmp_path / "run"
    rc = train_cli.main([str(data), "--out", str(out), "--init", "tiny", "--steps", "2",
                         "--batch-size", "2", "--seq-len", "16", "--compute-dtype", "bfloat16",
                         "--quiet", "--no-plot"])
    assert rc == 0
    rc = gen_cli.main(["--model", str(out), "-n", "3", "--temperature", "0",
                       "--compute-dtype", "bfloat16", "Hello"])
    assert rc == 0
    with pytest.raises(SystemExit):
        train_cli.main([str(data), "--out", str(out), "--compute-dtype", "float16"])


# ---------------------------------------------------------------------- the C harness

def _cc():
    names = [os.environ["CC"]] if os.environ.get("CC") else ["cc", "gcc", "clang"]
    cc = next((shutil.which(n) for n in names if shutil.which(n)), None)
    if not cc:
        pytest.skip(f"no C compiler ({', '.join(names)}) on PATH")
    return cc


def _harness(tmp_path, extra):
    if not (KERNELS / "bf16gemm.h").is_file():
        pytest.skip("the kernels' C headers are not here: the harness runs from a source checkout")
    exe = tmp_path / "bf16gemm_harness"
    build = subprocess.run([_cc(), "-O2", "-std=gnu11", "-fno-trapping-math", "-fno-math-errno",
                            *extra, "-I", str(KERNELS), str(HARNESS), "-lm", "-o", str(exe)],
                           capture_output=True, text=True)
    if build.returncode != 0 and "needs a compiler that builds the AVX-512" in build.stderr:
        pytest.skip("this compiler cannot build the AVX-512 variants")
    assert build.returncode == 0, build.stderr
    run = subprocess.run([str(exe)], capture_output=True, text=True, timeout=600)
    lines = run.stdout.splitlines()
    failed = [line for line in lines if line.startswith("FAIL")]
    assert run.returncode == 0 and not failed, "\n".join(failed[:20]) or run.stderr
    return lines


def test_harness_native(tmp_path):
    lines = _harness(tmp_path, [])
    assert any(line.startswith("PASS bf16gemm portable") for line in lines)
    assert any(line.startswith("PASS bf16gemm rounding") for line in lines)
    if "avx512-bf16" in _core.cpu_variants():
        assert any(line.startswith("PASS bf16gemm avx512-bf16") for line in lines)


@pytest.mark.skipif(platform.machine().lower() not in ("x86_64", "amd64"),
                    reason="SIMDe emulation of the x86 variants: x86-64 only")
def test_harness_simde_emulated(tmp_path):
    simde_py = pytest.importorskip("simde_py", reason="simde-py is not installed")
    if "x86-64-v3" not in _core.cpu_variants():
        pytest.skip("the SIMDe build is compiled for x86-64-v3, which this CPU lacks")
    lines = _harness(tmp_path, ["-mavx2", "-mfma", "-mf16c", "-Wno-psabi",
                                "-DGPT2S_HARNESS_SIMDE", "-I", simde_py.get_include(),
                                "-I", str(HARNESS.parent)])
    ran = [line for line in lines if line.startswith("PASS bf16gemm avx512-bf16")]
    assert len(ran) > 300, lines[-1]
