"""The public parameter store (GPT2.store, gpt2s.params.ParameterStore) and the record of a
training forward (GPT2.pending_backward): the views share the flat buffers, the gradients
appear on first use, the training calls hold the store's lock, a mapped model's parameters
are copied in on first use of the buffer."""

import threading
import tracemalloc

import numpy as np
import pytest

import gpt2s
from conftest import config_shapes
from gpt2s import GPT2, AdamW, clip_grad_norm
from gpt2s.params import ParameterStore


@pytest.fixture
def model(make_config, make_model):
    return make_model(make_config(n_layer=2, n_head=2, head_size=16, vocab_size=211, n_ctx=32),
                      seed=3)


def test_every_parameter_is_its_slice_of_the_flat_buffer(model):
    store = model.store
    assert model.params is store.params
    shapes = config_shapes(model.config)   # written out independently of gpt2s
    assert [name for name, _, _ in store.layout] == list(shapes)
    buffer = store.buffer
    assert buffer.dtype == np.float32 and buffer.ndim == 1 and buffer.flags.c_contiguous
    end = 0
    for name, shape, offset in store.layout:
        assert tuple(shape) == shapes[name] and offset >= end and offset % 16 == 0, name
        size = int(np.prod(shape))
        end = offset + size
        view = store.params[name]
        assert view.shape == tuple(shape)
        assert np.array_equal(view.reshape(-1), buffer[offset:end]), name
        buffer[offset] += 1.0        # a write through the buffer is a write to the parameter
        assert view.reshape(-1)[0] == buffer[offset], name
    assert end <= buffer.size
    for l in range(model.config.n_layer):
        for suffix, view in store.layer_params[l].items():
            assert view is store.params[f"h.{l}.{suffix}"]


def test_gradients_are_allocated_on_first_use_and_share_the_grad_buffer(model):
    """The first use of grads allocates one zeroed vector of the buffer's size (traced by
    tracemalloc); later uses allocate nothing."""
    store = model.store
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        grads = store.grads
        first = tracemalloc.get_traced_memory()[0] - before
        assert store.grads is grads and store.grad_buffer is store.grad_buffer
        again = tracemalloc.get_traced_memory()[0] - before - first
    finally:
        tracemalloc.stop()
    n = store.buffer.nbytes
    assert n <= first < n + 64 * 1024, (first, n)
    assert again < 4096, again
    flat = store.grad_buffer
    assert flat.shape == store.buffer.shape and not flat.any()
    assert model.grads is grads
    for name, _, offset in store.layout:
        assert np.shares_memory(grads[name], flat) and grads[name].shape == store.params[name].shape
        grads[name].reshape(-1)[0] = 2.0
        assert flat[offset] == 2.0, name
    for l in range(model.config.n_layer):
        for suffix, g in store.layer_grads[l].items():
            assert g is grads[f"h.{l}.{suffix}"]
    model.zero_grad()
    assert not flat.any()


class RecordingLock:
    """The store's RLock, counting how deep the calling thread holds it."""

    def __init__(self, lock):
        self.lock, self.depth, self.entered = lock, 0, 0

    def __enter__(self):
        self.lock.acquire()
        self.depth += 1
        self.entered += 1
        return self

    def __exit__(self, *exc):
        self.depth -= 1
        self.lock.release()


def test_training_calls_hold_the_store_lock(model, make_batch, monkeypatch):
    """forward with targets, backward, zero_grad, AdamW.step and clip_grad_norm run their
    kernels while holding store.lock; an inference forward does not take it."""
    lock = RecordingLock(model.store.lock)
    model.store.lock = lock
    held = []

    def spy(name):
        kernel = getattr(gpt2s._core, name)

        def call(*args, **kwargs):
            held.append((name, lock.depth > 0))
            return kernel(*args, **kwargs)
        monkeypatch.setattr(gpt2s._core, name, call)

    for name in ("crossentropy_forward", "crossentropy_backward", "fill_zero", "adamw_step",
                 "sum_squares", "scale_inplace"):
        spy(name)
    idx, targets = make_batch(model.config, 2, 8, seed=1)
    opt = AdamW(model, lr=1e-3)
    model.forward(idx)
    assert held == [] and lock.entered == 0   # no targets: no lock, no loss
    model.zero_grad()
    model.forward(idx, targets)
    model.backward()
    clip_grad_norm(model, 1e-3)
    opt.step(max_norm=1.0)
    names = [name for name, _ in held]
    for name in ("crossentropy_forward", "crossentropy_backward", "fill_zero", "adamw_step",
                 "sum_squares", "scale_inplace"):
        assert name in names, name
    assert all(inside for _, inside in held), held
    assert lock.depth == 0


def test_a_mapped_store_copies_in_on_first_use_of_the_buffer(model, tmp_path):
    path = tmp_path / "m.safetensors"
    model.save_safetensors(path)
    m = GPT2.from_safetensors(path)
    store = m.store
    assert store.mapped and m.mapped
    early = store.params["h.0.mlp.c_fc.weight"]   # a view of the mapping
    buffer = store.buffer
    assert not store.mapped and not m.mapped
    for name, shape, offset in store.layout:
        view = store.params[name]
        assert np.shares_memory(view, buffer), name
        assert np.array_equal(view, model.params[name]), name
    assert not np.shares_memory(early, buffer)
    assert store.buffer is buffer


def test_set_param_and_copy_param(make_config):
    cfg = make_config(n_layer=2, n_head=2, head_size=16, vocab_size=211, n_ctx=32)
    store = ParameterStore(cfg)
    w = np.full((cfg.n_embd, 4 * cfg.n_embd), 0.5, np.float32)
    store.set_param("h.1.mlp.c_fc.weight", w)
    assert store.params["h.1.mlp.c_fc.weight"] is w
    assert store.layer_params[1]["mlp.c_fc.weight"] is w
    store.copy_param("ln_f.bias", np.arange(cfg.n_embd, dtype=np.float32))
    name, _, offset = next(e for e in store.layout if e[0] == "ln_f.bias")
    assert np.array_equal(store.buffer[offset:offset + cfg.n_embd], np.arange(cfg.n_embd))
    # a compressed store keeps the matmul weights out of its float32 buffer
    bf16 = ParameterStore(cfg, "bfloat16")
    assert "h.0.attn.c_attn.weight" not in {n for n, _, _ in bf16.layout}
    assert "h.0.attn.c_attn.bias" in {n for n, _, _ in bf16.layout}
    x = np.random.default_rng(0).standard_normal((cfg.n_embd, 3 * cfg.n_embd)).astype(np.float32)
    bf16.copy_param("h.0.attn.c_attn.weight", x)
    got = np.asarray(bf16.params["h.0.attn.c_attn.weight"])
    assert got.shape == x.shape and np.allclose(got, x, rtol=2 ** -8, atol=0)
    assert bf16.layer_params[0]["attn.c_attn.weight"] is bf16.params["h.0.attn.c_attn.weight"]
    with pytest.raises(RuntimeError, match="grads: this model stores its weights in bfloat16"):
        bf16.grads
    with pytest.raises(TypeError, match="config must be a GPT2Config"):
        ParameterStore({"n_layer": 2})


def test_pending_backward_is_the_record_the_next_backward_consumes(model, make_batch):
    idx, targets = make_batch(model.config, 2, 8, seed=4)
    assert model.pending_backward is None
    model.forward(idx, targets, for_backward=False)
    assert model.pending_backward is None
    model.zero_grad()
    model.forward(idx, targets)
    first = model.pending_backward
    assert first.n_valid == int(np.count_nonzero(targets != -1))
    assert first.thread == threading.get_ident()
    model.forward(idx, np.full_like(targets, -1))
    second = model.pending_backward
    assert second is not first and second.n_valid == 0
    with pytest.raises(RuntimeError, match="every target of the last forward was -1"):
        model.backward()
    model.forward(idx)   # this thread's inference forward: nothing left to differentiate
    assert model.pending_backward is None
    model.forward(idx, targets)
    model.backward()
    assert model.pending_backward is None
