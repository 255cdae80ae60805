"""gpt2s.training, the library under python -m gpt2s.train: the command line's run options and
the resume checks are generated from RunConfig's fields (a field added to the dataclass shows
in --help, in train_state.json and in the resume check with no other edit), every resume rule
does what it says, and the one train_step (a single process being a team of one) is today's
step bit for bit and one AdamW step of a float64 reference.  (The loop end to end is in
test_train.py, the data-parallel step against one process in test_distributed.py.)"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

import gpt2s
from gpt2s import train, training
from gpt2s.data import TokenData
from gpt2s.optim import clip_coefficient, grad_norm
from gpt2s.training import Resume, RunConfig

DATA = Path(__file__).parent / "data" / "tinyshakespeare_excerpt.txt"
BASE = ["--init", "tiny", "--batch-size", "2", "--seq-len", "16", "--warmup", "1",
        "--eval-every", "10", "--eval-batches", "1", "--steps", "4", "--quiet", "--no-plot"]


@pytest.fixture(autouse=True)
def one_thread(restore_threads):
    gpt2s.set_num_threads(1)


def _actions(parser) -> dict:
    return {a.dest: a for a in parser._actions}


def _help_text(parser) -> str:
    """--help as one line (argparse wraps it to the terminal)."""
    return " ".join(parser.format_help().split())


# ------------------------------------------------------------------------------------------
# The parser and the checks come from the fields


def test_every_run_config_field_is_an_option_of_the_command_line():
    parser = train.build_parser()
    actions = _actions(parser)
    # the command line's own defaults: the warm-up follows the run's length (None until the
    # run's --steps is known: train.default_warmup), the compute dtype a resumed run's
    # checkpoint (None until it is read)
    cli_default = {"warmup": None, "compute_dtype": None}
    for f in dataclasses.fields(RunConfig):
        m = f.metadata
        assert isinstance(m["resume"], Resume), f.name
        a = actions.get(f.name)
        assert a is not None, f"RunConfig.{f.name} has no option"
        assert a.option_strings == [m["flag"]] and a.type is m["type"], f.name
        want = cli_default.get(f.name, f.default)
        assert a.default == want, f.name
        assert (a.help == m["help"]) == (f.name not in cli_default), f.name
        # what the option gives is what the field holds
        assert parser.parse_args(["--out", "x"]).__dict__[f.name] == want
    cfg = RunConfig.from_arguments(parser.parse_args(["--out", "x"]),
                                   warmup=RunConfig().warmup,
                                   compute_dtype=RunConfig().compute_dtype)
    assert cfg == RunConfig()
    # the refused settings are the ones --allow-changes says it lets through
    allow = actions["allow_changes"].help
    for flag in RunConfig.flags(Resume.MUST_MATCH):
        assert flag in allow, (flag, allow)


@dataclasses.dataclass(frozen=True)
class _Extended(RunConfig):
    dropout: float = training.setting(0.0, "--dropout", gpt2s._cli.fraction,
                                      "dropout probability (default: %(default)s)",
                                      Resume.MUST_MATCH, "P")
    label_smoothing: float = training.setting(0.0, "--label-smoothing", gpt2s._cli.fraction,
                                              "label smoothing (default: %(default)s)",
                                              Resume.MAY_CHANGE, "E")
    log_every: int = training.setting(1, "--log-every", gpt2s._cli.positive_int,
                                      "print every N steps (default: %(default)s)",
                                      Resume.NOT_COMPARED, "N")


def test_a_field_added_to_run_config_is_an_option_and_is_checked_on_resume(
        tmp_path, capsys, monkeypatch):
    """Only the dataclass changes: --help, the argument check, train_state.json's run record
    and the resume rules follow."""
    monkeypatch.setattr(train, "RunConfig", _Extended)
    parser = train.build_parser()
    text = _help_text(parser)
    assert "--dropout P dropout probability (default: 0.0)" in text
    assert "--label-smoothing E label smoothing (default: 0.0)" in text
    assert "--log-every N print every N steps (default: 1)" in text
    allow = _actions(parser)["allow_changes"].help
    assert "--dropout" in allow and "--label-smoothing" not in allow
    with pytest.raises(SystemExit):
        parser.parse_args(["--out", "x", "--dropout", "1.5"])
    assert "--dropout: must be in [0, 1), got 1.5 (see --help)" in capsys.readouterr().err

    out = tmp_path / "run"
    run = [str(DATA), *BASE, "--out", str(out)]
    assert train.main(run + ["--dropout", "0.25", "--log-every", "3"]) == 0
    recorded = json.loads((out / "train_state.json").read_text())["run"]
    assert recorded["dropout"] == 0.25 and recorded["label_smoothing"] == 0.0
    assert "log_every" not in recorded
    capsys.readouterr()

    assert train.main(run + ["--resume", "--dropout", "0.5"]) == 2
    err = capsys.readouterr().err
    assert "--dropout 0.5 (the checkpoint's run used 0.25)" in err and "--allow-changes" in err
    assert train.main(run + ["--resume", "--dropout", "0.25", "--label-smoothing", "0.1",
                             "--log-every", "7"]) == 0
    err = capsys.readouterr().err
    assert "note: --label-smoothing is now 0.1 (was 0.0)" in err and "--log-every" not in err


# ------------------------------------------------------------------------------------------
# Every rule of every field, through the command line


def _other_value(value):
    """Another valid value of a field: one more for a count, half for a rate or fraction,
    the other compute dtype."""
    if isinstance(value, str):
        return {"float32": "bfloat16", "bfloat16": "float32"}[value]
    return value + 1 if isinstance(value, int) else value / 2


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A 4-step run to resume, and the parsed arguments that made it."""
    out = tmp_path_factory.mktemp("base") / "run"
    threads = gpt2s.get_num_threads()
    gpt2s.set_num_threads(1)
    try:
        assert train.main([str(DATA), *BASE, "--out", str(out)]) == 0
    finally:
        gpt2s.set_num_threads(threads)
    return out, train.build_parser().parse_args([str(DATA), *BASE, "--out", str(out)])


@pytest.mark.parametrize("name", [f.name for f in dataclasses.fields(RunConfig)])
def test_each_setting_follows_its_resume_rule(name, finished_run, tmp_path, capsys):
    base, args = finished_run
    out = tmp_path / "run"
    shutil.copytree(base, out, symlinks=True)
    f = next(f for f in dataclasses.fields(RunConfig) if f.name == name)
    flag, rule = f.metadata["flag"], f.metadata["resume"]
    old = getattr(args, name)
    if old is None:   # a command-line default of None: the run took the field's default
        old = f.default
    new = _other_value(old)
    argv = [str(DATA), *BASE, "--out", str(out), "--resume", flag, str(new)]
    capsys.readouterr()
    status = train.main(argv)
    err = capsys.readouterr().err
    changed = f"{flag} {new} (the checkpoint's run used {old})"
    if rule is Resume.MUST_MATCH:
        assert status == 2, err
        assert "error: --resume: this run differs from the checkpoint's in: " in err
        assert changed in err and "pass --allow-changes to continue anyway" in err, err
        assert train.main(argv + ["--allow-changes"]) == 0
        assert f"warning: --allow-changes: {changed}" in capsys.readouterr().err
    elif rule is Resume.MAY_CHANGE:
        assert status == 0, err
        assert f"note: {flag} is now {new} (was {old}); the run continues with the new " \
               f"value" in err, err
    else:
        assert status == 0 and flag not in err, err


# ------------------------------------------------------------------------------------------
# One train_step: a single process is a team of one


def _todays_step(model, opt, data, cfg, step):
    """The single-process step as python -m gpt2s.train took it before there was one step for
    both kinds of run, written out with the public API."""
    opt.lr = training.lr_at(step, cfg.steps, cfg.lr, cfg.warmup, cfg.min_lr_ratio)
    model.zero_grad()
    loss = 0.0
    for micro in range(cfg.grad_accum):
        x, y = training.train_batch(data, cfg.seed, step, micro, cfg.batch_size, cfg.seq_len)
        _, micro_loss = model.forward(x, y, return_logits=False)
        model.backward()
        loss += micro_loss
    scale, norm = 1.0 / cfg.grad_accum, None
    if cfg.grad_clip > 0:
        norm = grad_norm(model) * scale
        scale *= clip_coefficient(norm, cfg.grad_clip)
    opt.step(grad_scale=scale)
    return loss / cfg.grad_accum, norm


CFG = RunConfig(steps=5, batch_size=2, seq_len=16, grad_accum=2, lr=3e-3, warmup=2,
                grad_clip=0.5, seed=7, eval_batches=2)


@pytest.mark.parametrize("wrap", ["model", "team of one"])
def test_train_step_is_todays_step_bit_for_bit(wrap):
    data = TokenData(DATA)
    a = gpt2s.GPT2.from_config(gpt2s.GPT2Config.preset("tiny"), seed=0)
    b = gpt2s.GPT2.from_config(gpt2s.GPT2Config.preset("tiny"), seed=0)
    opt_a, opt_b = gpt2s.AdamW(a, weight_decay=0.1), gpt2s.AdamW(b, weight_decay=0.1)
    trainee = a if wrap == "model" else training.SingleProcess(a)
    for step in range(3):
        got = training.train_step(trainee, opt_a, data, CFG, step)
        want = _todays_step(b, opt_b, data, CFG, step)
        assert got == want and got[1] > CFG.grad_clip, (step, got, want)   # clipping active
        assert (a.store.buffer == b.store.buffer).all(), step
        assert (opt_a.m == opt_b.m).all() and (opt_a.v == opt_b.v).all(), step
    assert training.evaluate(trainee, data, CFG) == training.evaluate(b, data, CFG)


def test_train_step_is_one_adamw_step_of_a_float64_reference():
    """Step 0 with two accumulated micro-batches and active clipping, against the closed form
    of AdamW's first step in float64: p <- p (1 - lr wd) - lr g / (|g| + eps) with g the
    clipped mean of the micro-batches' gradients (each taken alone)."""
    data = TokenData(DATA)
    model = gpt2s.GPT2.from_config(gpt2s.GPT2Config.preset("tiny"), seed=1)
    p0 = {k: v.astype(np.float64) for k, v in model.params.items()}
    g = {k: np.zeros_like(v) for k, v in p0.items()}
    for micro in range(CFG.grad_accum):
        x, y = training.train_batch(data, CFG.seed, 0, micro, CFG.batch_size, CFG.seq_len)
        model.zero_grad()
        model.forward(x, y)
        model.backward()
        for k in g:
            g[k] += model.grads[k].astype(np.float64) / CFG.grad_accum
    norm = float(np.sqrt(sum(float((v * v).sum()) for v in g.values())))
    coef = CFG.grad_clip / (norm + 1e-6)
    assert coef < 1
    lr, wd, eps = CFG.lr * 1 / CFG.warmup, 0.3, 1e-3     # warm-up step 1 of 2
    # an eps near the gradients' size makes the step depend on their scale (the clipping)
    opt = gpt2s.AdamW(model, weight_decay=wd, eps=eps)
    loss, got_norm = training.train_step(model, opt, data, CFG, 0)
    assert abs(got_norm - norm) <= 1e-5 * norm and opt.lr == lr
    for name in p0:
        decay = wd if name in opt.decayed else 0.0
        gs = g[name] * coef
        expect = p0[name] * (1 - lr * decay) - lr * gs / (np.abs(gs) + eps)
        np.testing.assert_allclose(model.params[name], expect, rtol=2e-6, atol=2e-7,
                                   err_msg=name)
