"""gpt2s.checkpoint: a kill at any instant of a save leaves the previous complete checkpoint or
the new one, never a mix; the next save removes every leftover; loading refuses anything the
manifest does not vouch for; the run directory loads as a model (ours and transformers').

The kill test is exhaustive rather than random: every file-system call a save makes (open,
write-side fsync, mkdir, rename, symlink, unlink, ...) is intercepted, and *before* it runs
the run directory is copied as it stands.  A SIGKILL at that instant would leave exactly that
copy on disk (the page cache survives the process), so loading each copy is loading what every
possible kill leaves.  tests/test_train_cli.py kills real training processes on top of this.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from gpt2s import GPT2, AdamW
from gpt2s.checkpoint import (CHECKPOINT_FILES, CheckpointError, has_checkpoint,
                              load_checkpoint, save_checkpoint, strict_json)

INTERCEPTED = ("open", "mkdir", "rename", "replace", "symlink", "unlink", "remove", "rmdir",
               "fsync", "chmod", "close")


@pytest.fixture
def tiny(make_config, make_model):
    cfg = make_config(n_layer=1, n_head=2, head_size=8, vocab_size=97, n_ctx=16)

    def make(step: int):
        """A model, optimizer and train state that differ for every step."""
        m = make_model(cfg, seed=step)
        opt = AdamW(m, lr=1e-3)
        opt.m[:] = step + 0.5
        opt.v[:] = step + 0.25
        opt.t = step
        return m, opt, {"step": step, "seed": 0, "last_val": {"step": step, "loss": 1.5}}
    return make


def _expect(ck, tiny):
    """The checkpoint holds exactly what was saved for its step."""
    m, opt, state = tiny(ck.step)
    loaded = GPT2.from_safetensors(ck.dir)
    for k, v in m.params.items():
        np.testing.assert_array_equal(loaded.params[k], v, err_msg=k)
    opt2 = AdamW(loaded)
    opt2.load(ck.path("optimizer.npz"))
    np.testing.assert_array_equal(opt2.m, opt.m)
    np.testing.assert_array_equal(opt2.v, opt.v)
    assert opt2.t == ck.step
    assert ck.state == state


def _record_snapshots(monkeypatch, out: Path, snapdir: Path):
    """Patch the os functions a save uses so that each call first copies out to a new
    snapshot directory; returns the list of (snapshot, call) made."""
    snaps, busy = [], [False]

    def wrap(name, fn):
        def call(*args, **kwargs):
            if not busy[0]:
                busy[0] = True
                try:
                    dest = snapdir / f"{len(snaps):04d}"
                    if out.exists():
                        shutil.copytree(out, dest, symlinks=True)
                    else:
                        dest.mkdir()
                    snaps.append((dest, f"os.{name}{tuple(map(str, args))[:2]}"))
                finally:
                    busy[0] = False
            return fn(*args, **kwargs)
        return call

    for name in INTERCEPTED:
        monkeypatch.setattr(os, name, wrap(name, getattr(os, name)))
    return snaps


def _leftovers(out: Path) -> list[str]:
    """Entries of a run directory besides the links and the current checkpoint."""
    ck = out / ".checkpoints"
    current = os.readlink(ck / "current")
    extra = [p.name for p in out.iterdir() if p.name not in CHECKPOINT_FILES + (".checkpoints",)]
    extra += [f".checkpoints/{p.name}" for p in ck.iterdir() if p.name not in ("current", current)]
    return extra


@pytest.mark.parametrize("previous", [True, False], ids=["over-previous", "first-save"])
def test_a_kill_before_any_call_of_a_save_leaves_old_or_new(tmp_path, monkeypatch, tiny,
                                                            previous):
    out = tmp_path / "run"
    if previous:
        save_checkpoint(out, *tiny(1))
        save_checkpoint(out, *tiny(2))  # a previous save's cleanup has run too
    snapdir = tmp_path / "snaps"
    snapdir.mkdir()
    with monkeypatch.context() as mp:
        snaps = _record_snapshots(mp, out, snapdir)
        save_checkpoint(out, *tiny(3))
    assert len(snaps) > 20, snaps  # the interception really saw the save
    print(f"{len(snaps)} kill points checked")
    _expect(load_checkpoint(out), tiny)
    assert load_checkpoint(out).step == 3
    assert _leftovers(out) == []

    seen = {}
    for snap, call in snaps:
        try:
            ck = load_checkpoint(snap)
        except CheckpointError as e:
            assert not previous, f"killed before {call}: {e}"
            assert "no checkpoint" in str(e) or "no such directory" in str(e), (call, e)
            seen.setdefault("none", call)
            continue
        assert ck.step in ((2, 3) if previous else (3,)), call
        _expect(ck, tiny)
        seen.setdefault(ck.step, call)
        # the run directory itself loads as a model whenever a checkpoint is current
        m = GPT2.from_safetensors(snap)
        np.testing.assert_array_equal(m.params["wte.weight"], tiny(ck.step)[0].params["wte.weight"])
        # the next successful save removes everything the kill left behind
        save_checkpoint(snap, *tiny(4))
        assert load_checkpoint(snap).step == 4
        assert _leftovers(snap) == [], call
    # both outcomes really occur: the test covers the switch from old to new
    assert set(seen) == ({2, 3} if previous else {"none", 3}), seen


def test_resume_refuses_what_the_manifest_does_not_vouch_for(tmp_path, tiny):
    out = tmp_path / "run"
    save_checkpoint(out, *tiny(5))
    d = load_checkpoint(out).dir

    def refused(match):
        with pytest.raises(CheckpointError, match=match):
            load_checkpoint(out)

    # one flipped byte in the optimizer state
    raw = bytearray((d / "optimizer.npz").read_bytes())
    raw[len(raw) // 2] ^= 1
    (d / "optimizer.npz").write_bytes(bytes(raw))
    refused("optimizer.npz: contents differ")
    raw[len(raw) // 2] ^= 1
    (d / "optimizer.npz").write_bytes(bytes(raw))
    load_checkpoint(out)
    # a truncated model
    whole = (d / "model.safetensors").read_bytes()
    (d / "model.safetensors").write_bytes(whole[:-4])
    refused("model.safetensors: .* bytes, the manifest says")
    (d / "model.safetensors").write_bytes(whole)
    # a train state for another step (the manifest's hash catches it first)
    state = (d / "train_state.json").read_text()
    (d / "train_state.json").write_text(state.replace('"step": 5', '"step": 6'))
    refused("train_state.json")
    (d / "train_state.json").write_text(state)
    load_checkpoint(out)
    # no manifest: never vouched for
    (d / "manifest.json").rename(d / "manifest.bak")
    refused("no manifest.json")
    (d / "manifest.bak").rename(d / "manifest.json")
    # a missing file
    (d / "config.json").rename(d / "config.bak")
    refused("config.json: missing")
    (d / "config.bak").rename(d / "config.json")
    load_checkpoint(out)
    # no checkpoint at all, and a directory of an older gpt2s (real files, no manifest)
    with pytest.raises(CheckpointError, match="no checkpoint"):
        load_checkpoint(tmp_path)
    old = tmp_path / "old"
    tiny(1)[0].save_safetensors(old)
    tiny(1)[1].save(old / "optimizer.npz")
    (old / "train_state.json").write_text('{"step": 1}')
    assert has_checkpoint(old)
    with pytest.raises(CheckpointError, match="older gpt2s"):
        load_checkpoint(old)
    # and a save never replaces real files by links
    with pytest.raises(CheckpointError, match="already holds model.safetensors"):
        save_checkpoint(old, *tiny(2))
    assert not (old / "model.safetensors").is_symlink()


def test_state_is_strict_json(tmp_path, tiny):
    out = tmp_path / "run"
    m, opt, state = tiny(1)
    state["last_val"] = {"step": 1, "loss": float("nan")}
    state["losses"] = [1.0, float("inf"), float("-inf")]
    save_checkpoint(out, m, opt, state)
    text = (out / "train_state.json").read_text()

    def no_constants(name):
        raise AssertionError(f"non-JSON constant {name} in train_state.json")
    parsed = json.loads(text, parse_constant=no_constants)
    assert parsed["last_val"]["loss"] is None and parsed["losses"] == [1.0, None, None]
    with pytest.raises(AssertionError, match="NaN"):  # the check above can fail
        json.loads(strict_json({"x": 1.0}).replace("1.0", "NaN"), parse_constant=no_constants)


def test_run_directory_loads_in_transformers(tmp_path, tiny):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    out = tmp_path / "run"
    save_checkpoint(out, *tiny(1))
    save_checkpoint(out, *tiny(2))
    for name in CHECKPOINT_FILES:
        assert (out / name).is_symlink() and (out / name).is_file()
    ours = GPT2.from_safetensors(out)
    hf = transformers.GPT2LMHeadModel.from_pretrained(out)
    idx = np.arange(12, dtype=np.int64)[None] % 97
    logits, _ = ours.forward(idx)
    with torch.no_grad():
        theirs = hf(torch.from_numpy(idx)).logits.numpy()
    np.testing.assert_allclose(logits, theirs, rtol=1e-4, atol=1e-5)
    np.testing.assert_array_equal(ours.params["wte.weight"], tiny(2)[0].params["wte.weight"])
