"""Shared helpers for the gpt2s test suites.

* ``make_config`` / ``make_params`` / ``make_model``: small random GPT-2 models whose every
  parameter (layernorms and biases included) is random and non-trivial, so that no term of the
  forward or backward can be wrong without the numbers showing it;
* ``make_batch``: token ids and targets (some -1);
* ``make_hf_model``: the same weights in transformers' GPT2LMHeadModel (a second reference);
* ``record_error``: the worst relative errors seen, printed at the end of the run;
* ``train_step``: zero_grad, forward, backward (and an optimizer step) as every test takes it;
* ``check_matmul``: a float32 product against float64 within the rounding bound of its sums;
* ``assert_chi_square``: sampled counts against exact probabilities;
* ``matmul_paths``: which dispatched matmul paths (_core.matmul_path_counts) a test ran.

Nothing here downloads anything: checkpoints are built from random weights.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))  # `import ref` from any test module

import gpt2s  # noqa: E402
from gpt2s import GPT2, GPT2Config  # noqa: E402

LAYER_SHAPES = {
    # Hugging Face's GPT-2 tensors of one block, as a function of C and the MLP width H
    # (n_inner, 4C by default); Conv1D weights are [in, out]
    "ln_1.weight": lambda C, H: (C,),
    "ln_1.bias": lambda C, H: (C,),
    "attn.c_attn.weight": lambda C, H: (C, 3 * C),
    "attn.c_attn.bias": lambda C, H: (3 * C,),
    "attn.c_proj.weight": lambda C, H: (C, C),
    "attn.c_proj.bias": lambda C, H: (C,),
    "ln_2.weight": lambda C, H: (C,),
    "ln_2.bias": lambda C, H: (C,),
    "mlp.c_fc.weight": lambda C, H: (C, H),
    "mlp.c_fc.bias": lambda C, H: (H,),
    "mlp.c_proj.weight": lambda C, H: (H, C),
    "mlp.c_proj.bias": lambda C, H: (C,),
}


def param_shapes(n_layer, n_embd, vocab_size, n_ctx, n_inner=None, tied=True) -> dict:
    """name -> shape of every GPT-2 parameter (Hugging Face names without 'transformer.'),
    written out here independently of gpt2s.weights; an untied model has lm_head.weight."""
    C = n_embd
    H = 4 * C if n_inner is None else n_inner
    shapes = {"wte.weight": (vocab_size, C), "wpe.weight": (n_ctx, C)}
    for l in range(n_layer):
        for suffix, shape in LAYER_SHAPES.items():
            shapes[f"h.{l}.{suffix}"] = shape(C, H)
    shapes["ln_f.weight"] = (C,)
    shapes["ln_f.bias"] = (C,)
    if not tied:
        shapes["lm_head.weight"] = (vocab_size, C)
    return shapes


def config_shapes(cfg: GPT2Config) -> dict:
    return param_shapes(cfg.n_layer, cfg.n_embd, cfg.vocab_size, cfg.n_ctx, cfg.n_inner,
                        cfg.tie_word_embeddings)


def _make_config(n_layer=2, n_head=2, head_size=16, vocab_size=211, n_ctx=64, eps=1e-5,
                 **variant):
    """A small GPT2Config; variant: GPT2Config's other fields (n_inner, activation_function,
    scale_attn_weights, ..., tie_word_embeddings)."""
    return GPT2Config(n_layer=n_layer, n_head=n_head, n_embd=n_head * head_size,
                      vocab_size=vocab_size, n_ctx=n_ctx, layer_norm_epsilon=eps, **variant)


def _make_params(cfg: GPT2Config, seed=0, dtype=np.float32) -> dict:
    """Random, non-trivial parameters scaled so activations stay O(1): layernorm weights
    1 + 0.2 N(0,1), every bias 0.1 N(0,1), matmul weights N(0, 1/fan_in) (the residual
    projections a bit smaller), embeddings N(0, 1/C)."""
    rng = np.random.default_rng(seed)
    C = cfg.n_embd
    out = {}
    for name, shape in config_shapes(cfg).items():
        if name in ("wte.weight", "wpe.weight", "lm_head.weight"):
            std = 1.0 / math.sqrt(C) * (0.5 if name == "wpe.weight" else 1.0)
            a = rng.standard_normal(shape) * std
        elif name.endswith(".bias"):
            a = 0.1 * rng.standard_normal(shape)
        elif ".ln_" in name or name.startswith("ln_"):
            a = 1.0 + 0.2 * rng.standard_normal(shape)
        else:  # Conv1D weight (in, out)
            gain = 0.7 if name.endswith("c_proj.weight") else 1.2
            a = rng.standard_normal(shape) * gain / math.sqrt(shape[0])
        out[name] = a.astype(dtype)
    return out


def _make_model(cfg: GPT2Config, seed=0) -> GPT2:
    """GPT2.from_config, then every parameter overwritten in place with _make_params."""
    m = GPT2.from_config(cfg, seed=seed)
    params = _make_params(cfg, seed=seed + 1000)
    assert set(m.params) == set(params), "gpt2s parameter names differ from Hugging Face's"
    for name, value in params.items():
        assert m.params[name].shape == value.shape, name
        m.params[name][...] = value
    return m


def _make_batch(cfg: GPT2Config, B, T, seed=0, ignore_frac=0.2):
    """idx (B, T) int64 and targets (B, T) with about ignore_frac of them -1 (at least one
    valid)."""
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, cfg.vocab_size, size=(B, T), dtype=np.int64)
    targets = rng.integers(0, cfg.vocab_size, size=(B, T), dtype=np.int64)
    targets[rng.random((B, T)) < ignore_frac] = -1
    targets[0, 0] = rng.integers(0, cfg.vocab_size)
    return idx, targets


def hf_config(cfg: GPT2Config):
    """transformers' GPT2Config for ``cfg``, every field written out here (not through
    gpt2s' to_hf_dict, which the tests check against this)."""
    transformers = pytest.importorskip("transformers")
    return transformers.GPT2Config(
        vocab_size=cfg.vocab_size, n_positions=cfg.n_ctx, n_embd=cfg.n_embd,
        n_layer=cfg.n_layer, n_head=cfg.n_head, layer_norm_epsilon=cfg.layer_norm_epsilon,
        n_inner=cfg.n_inner, activation_function=cfg.activation_function,
        scale_attn_weights=cfg.scale_attn_weights,
        scale_attn_by_inverse_layer_idx=cfg.scale_attn_by_inverse_layer_idx,
        reorder_and_upcast_attn=cfg.reorder_and_upcast_attn,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
        bos_token_id=None, eos_token_id=None, tie_word_embeddings=cfg.tie_word_embeddings)


def _make_hf_model(cfg: GPT2Config, params: dict, dtype="float64", attn_implementation=None):
    """transformers.GPT2LMHeadModel (eval mode) holding ``params``; attn_implementation
    "eager" is the only one where transformers honours reorder_and_upcast_attn."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    model = transformers.GPT2LMHeadModel(hf_config(cfg))
    if attn_implementation is not None:
        model.set_attn_implementation(attn_implementation)
        assert model.config._attn_implementation == attn_implementation
    model.eval()
    model.to(getattr(torch, dtype))
    named = dict(model.transformer.named_parameters())
    if not cfg.tie_word_embeddings:
        named["lm_head.weight"] = model.lm_head.weight
    assert set(named) == set(params)
    with torch.no_grad():
        for name, p in named.items():
            p.copy_(torch.from_numpy(np.asarray(params[name])).to(p.dtype))
    tied = model.lm_head.weight.data_ptr() == model.transformer.wte.weight.data_ptr()
    assert tied == cfg.tie_word_embeddings, "lm_head must be tied to wte exactly when configured"
    return model


def hf_logits_loss(model, idx, targets=None):
    """(logits ndarray (B, T, V), loss float or None) of a transformers model; the loss is the
    mean cross-entropy over targets != -1 on unshifted targets (gpt2s' convention)."""
    torch = pytest.importorskip("torch")
    idx = np.asarray(idx)
    if idx.ndim == 1:
        idx = idx[None]
    with torch.no_grad():
        logits = model(torch.from_numpy(idx)).logits
        loss = None
        if targets is not None:
            V = logits.shape[-1]
            loss = torch.nn.functional.cross_entropy(
                logits.reshape(-1, V), torch.from_numpy(np.asarray(targets)).reshape(-1),
                ignore_index=-1).item()
    return logits.numpy(), loss


def train_step(m, idx, targets, opt=None):
    """One training step: zero_grad, forward with targets, backward, then opt.step() when an
    optimizer is given.  Returns (logits, loss, grads), grads a copy of every gradient as the
    backward left it (before the optimizer step)."""
    m.zero_grad()
    logits, loss = m.forward(idx, targets)
    m.backward()
    grads = {k: v.copy() for k, v in m.grads.items()}
    if opt is not None:
        opt.step()
    return logits, loss, grads


U32 = 2.0 ** -24   # float32 unit roundoff


def check_matmul(got, want, scale, K, what):
    """|got - want| <= 4 sqrt(K) u scale elementwise, scale = the sum of |terms| of each output:
    the usual size of rounding error in a float32 sum of K products (the worst case is K u);
    an indexing mistake is off by O(scale)."""
    err = np.abs(got.astype(np.float64) - want)
    bound = 4.0 * np.sqrt(max(K, 1)) * U32 * scale
    worst = float((err / bound).max()) if err.size else 0.0
    assert worst <= 1.0, f"{what}: error {worst:.2f} x the rounding bound"


def assert_chi_square(counts, probs, p_value=1e-4):
    """Pearson's chi-square test of integer counts against exact probabilities (same index):
    no count where the probability is 0; categories with expectations below 5 merged (smallest
    first) so that the chi-square approximation holds; fails with probability p_value when the
    sampler is right."""
    from scipy import stats
    counts = np.asarray(counts)
    probs = np.asarray(probs, np.float64)
    n = int(counts.sum())
    support = probs > 0
    assert counts[~support].sum() == 0, "samples outside the support"
    expected = probs[support] / probs[support].sum() * n
    order = np.argsort(expected)
    obs, exp = counts[support][order].astype(np.float64), expected[order]
    small = np.cumsum(exp) < 5
    if small.any() and (~small).any():
        k = np.count_nonzero(small)
        obs = np.concatenate([[obs[:k + 1].sum()], obs[k + 1:]])
        exp = np.concatenate([[exp[:k + 1].sum()], exp[k + 1:]])
    if exp.size < 2:   # one category: nothing to test beyond the support
        return 0.0
    chi2 = float(np.sum((obs - exp) ** 2 / exp))
    assert chi2 < stats.chi2.ppf(1 - p_value, exp.size - 1), (chi2, exp.size)
    return chi2


# ------------------------------------------------------------------------------------------
# fixtures


@pytest.fixture(scope="session")
def make_config():
    return _make_config


@pytest.fixture(scope="session")
def make_params():
    return _make_params


@pytest.fixture(scope="session")
def make_model():
    return _make_model


@pytest.fixture(scope="session")
def make_batch():
    return _make_batch


@pytest.fixture(scope="session")
def make_hf_model():
    return _make_hf_model


@pytest.fixture
def restore_threads():
    """Restores gpt2s' thread count after the test."""
    n = gpt2s.get_num_threads()
    yield n
    gpt2s.set_num_threads(n)


@pytest.fixture
def every_kernel_parallel(restore_threads):
    """Kernels normally stay on one thread below a work size that small test models do not
    reach; this lifts that threshold for the test (and restores it and the thread count), so
    every kernel really runs its parallel path."""
    saved = gpt2s._core.get_parallel_min_work()
    gpt2s._core.set_parallel_min_work(0)
    yield
    gpt2s._core.set_parallel_min_work(saved)


@pytest.fixture
def matmul_paths():
    """Resets _core's matmul path counters and hands back a function returning them: the
    calls of each dispatched path since (see _core.matmul_path_counts)."""
    gpt2s._core.reset_matmul_path_counts()
    return gpt2s._core.matmul_path_counts


# worst relative errors, by what was compared; printed after the run
_WORST: dict = {}


@pytest.fixture
def record_error():
    def record(kind: str, value: float, where: str = ""):
        value = float(value)
        if kind not in _WORST or value > _WORST[kind][0]:
            _WORST[kind] = (value, where)
        return value
    return record


def pytest_terminal_summary(terminalreporter):
    if not _WORST:
        return
    terminalreporter.section("worst relative errors observed")
    for kind in sorted(_WORST):
        value, where = _WORST[kind]
        terminalreporter.write_line(f"{kind:<48s} {value:.3e}  {where}")
