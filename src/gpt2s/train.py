"""``python -m gpt2s.train``: train GPT-2, or fine-tune a GPT-2, Llama, Qwen2 or GPT-NeoX checkpoint, on
text files or token shards.

    python -m gpt2s.train input.txt --init mini --steps 2000 --out runs/mini
    python -m gpt2s.train "shards/train_*.bin" --val-data "shards/val_*.bin" --out runs/big
    mpiexec -n 4 python -m gpt2s.train input.txt --init mini --batch-size 2 --out runs/dp

The command line of ``gpt2s.training`` (the run configuration and its resume rules, the step,
the evaluation, the loop and its checkpoints; ``gpt2s.metrics`` records it): this module parses
and checks the arguments, opens the data (``gpt2s.data``), the model and the run directory (one
writer at a time, never through a symlink, a previous run kept unless ``--overwrite``:
``gpt2s.checkpoint``), and reports in one line per event.  ``--help`` says what every option
does; exit status: 0 done, 2 a usage error or a refused directory, 1 a failed run (diverged,
disk full, unwritable), 128 + N stopped by signal N.
"""

from __future__ import annotations

import argparse
import os
import sys
from functools import partial
from pathlib import Path

from ._cli import (Parser, UserError, add_quiet_option, add_threads_option,
                   add_version_option, plural, positive_float, positive_int, run_main)
from .checkpoint import DATA_HASHES, CheckpointError, lock_run_dir, remove_leftovers
from .vocab import VOCAB_FILE
from .metrics import Metrics, NullMetrics, have_matplotlib, plot_metrics, redraw_plot
from .training import (COMPUTE_DTYPES, DEFAULT_WARMUP, Resume, RunConfig, RunFailed,
                       TrainingDiverged, World, default_warmup, effective_warmup, eval_batch,
                       evaluate, lr_at,
                       open_data, open_run_dir, resume_differences, resume_state, start_over,
                       train_batch, train_loop, train_step)

# the library's names stay importable from here, as before they moved to gpt2s.training
__all__ = ["main", "build_parser", "lr_at", "effective_warmup", "default_warmup",
           "train_batch", "eval_batch",
           "train_step", "evaluate", "RunConfig", "plot_metrics", "TrainingDiverged"]

PROG = "python -m gpt2s.train"


def _sizes_text() -> str:
    from .config import GPT2Config
    notes = {"tiny": "tests: seconds per run, learns little",
             "mini": "the bundled demo model's size",
             "small-demo": "a small model for hours of CPU training",
             "gpt2": "GPT-2 (124M)", "gpt2-medium": "GPT-2 medium", "gpt2-large": "GPT-2 large",
             "gpt2-xl": "GPT-2 XL"}
    lines = []
    for name in GPT2Config.presets():
        c = GPT2Config.preset(name)
        lines.append(f"  {name:<11} {c.n_layer:>2} layers {c.n_head:>2} heads n_embd {c.n_embd:>4} "
                     f"n_ctx {c.n_ctx:>4} {c.num_parameters() / 1e6:6.1f}M"
                     f"{'  ' + notes[name] if name in notes else ''}")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    from .config import GPT2Config
    p = Parser(
        prog=PROG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Train GPT-2 from random weights, or fine-tune a saved model (GPT-2, Llama,\n"
                    "Qwen2, GPT-NeoX), on the CPU.\n"
                    "Checkpoints are all-or-nothing, and a run stopped in any way continues\n"
                    "exactly with --resume.",
        epilog=f"""\
data: UTF-8 text files (tokenized with the GPT-2 tokenizer, or a --model checkpoint's own
  tokenizer.json), nanoGPT uint16 .bin files
  (train.bin/val.bin) and llm.c .bin shards (python -m gpt2s.prepare writes them); several
  paths and quoted globs are concatenated.  Any UTF-8 text works, e.g. the Tiny Shakespeare
  excerpt in the repository's tests/data/.  Without --val-data the last --val-fraction of
  the tokens is held out for validation.

sizes for --init (random weights, GPT-2 initialisation, the GPT-2 vocabulary):
{_sizes_text()}

schedule: --steps is the total number of optimizer steps of the run; each one averages
  --grad-accum micro-batches of --batch-size windows of --seq-len tokens.  The learning rate
  rises linearly for --warmup steps (default: 10% of the run, at most 100), then decays on a
  cosine to --min-lr-ratio x --lr at the last step.  A --warmup of --steps or more is cut to
  10% of the run (with a warning).

output in --out: model.safetensors + config.json (loadable by gpt2s and transformers),
  optimizer.npz, train_state.json, metrics.jsonl (one JSON object per step and per
  evaluation) and loss.png (when matplotlib is installed).  A run stopped in any way
  (Ctrl-C, kill, power loss) continues exactly with the same command plus --resume.  One
  trainer at a time per --out (a second one stops at once, naming the first one's PID); a
  new run refuses a directory that holds a previous run's checkpoints unless --overwrite.
  A step whose loss or gradient norm is not finite stops the run, saving nothing (the last
  checkpoint stays the resume point).  Exit status: 0 done, 2 a usage error or a refused
  --out, 1 a failed run (diverged, disk full, no permission), 128+N stopped by signal N.

examples:
  {PROG} input.txt --init mini --steps 2000 --out runs/mini
  {PROG} input.txt --model assets --steps 200 --lr 1e-4 --out runs/ft
  {PROG} input.txt --model smollm2-135m --steps 200 --lr 1e-4 --out runs/smol
  {PROG} "shards/train_*.bin" --val-data "shards/val_*.bin" --init gpt2 \\
      --batch-size 8 --seq-len 1024 --grad-accum 8 --out runs/gpt2 --save-every 100
  {PROG} input.txt --init mini --steps 2000 --out runs/mini --resume
  mpiexec -n 4 {PROG} input.txt --init mini --batch-size 2 --out runs/dp
  python -m gpt2s.generate --model runs/mini "ROMEO:"

data parallel over MPI (pip install "gpt2s[mpi]"; docs/distributed.md): under
  mpiexec -n N (or srun) each of the N processes trains on its share of every global batch of
  N x --batch-size windows per micro-batch, and the gradients are summed over the processes
  during the backward, so the run computes what one process with --batch-size N x B computes
  (the same windows, loss and clipping; train_state.json records the global batch, so a run
  resumes with any N that keeps it).  The world size is read from the variables MPI
  launchers set: PMI_SIZE (MPICH, Intel MPI), OMPI_COMM_WORLD_SIZE (Open MPI),
  MV2_COMM_WORLD_SIZE (MVAPICH), PMIX_SIZE, SLURM_NTASKS inside an srun step; mpi4py is
  imported only then (or with --distributed).  Rank 0 alone prints, writes metrics and
  checkpoints; evaluation is split over the ranks.  A rank that dies or hangs makes the
  others abort the job after --dp-timeout seconds.
""")

    p.add_argument("data", nargs="*", metavar="DATA",
                   help="training data: text files, nanoGPT .bin files, llm.c shards or globs "
                        "of them (also accepted as --data)")
    p.add_argument("--data", dest="data_opt", nargs="+", action="extend", default=[],
                   metavar="DATA", help="more training data, as the positional DATA "
                                        "(default: none)")
    # one value per --val-data (repeat it for more), so the training files after it stay
    # training files: `--val-data v.bin train.txt`
    p.add_argument("--val-data", action="append", default=None, metavar="DATA",
                   help="validation data in the same forms (e.g. nanoGPT's val.bin); one file "
                        "or quoted glob per --val-data, repeat it for more; then "
                        "--val-fraction is not used (default: hold out --val-fraction)")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--model", metavar="PATH",
                     help="fine-tune this model: a .safetensors file or a model directory "
                          "(or a name such as gpt2 or demo: GPT2.from_pretrained); a Llama, "
                          "Qwen2 or GPT-NeoX checkpoint directory brings its tokenizer.json, which the "
                          "run uses and keeps (default: random weights of --init)")
    src.add_argument("--init", choices=GPT2Config.presets(), default=None, metavar="SIZE",
                     help="start from random weights of this size, one of "
                          f"{', '.join(GPT2Config.presets())} (see sizes below; default: mini)")
    p.add_argument("--out", required=True, metavar="DIR",
                   help="run directory for the checkpoint, metrics.jsonl and loss.png "
                        "(required)")
    p.add_argument("--resume", action="store_true",
                   help="continue the run saved in --out from its checkpoint, to --steps")
    p.add_argument("--overwrite", action="store_true",
                   help="start a new run in an --out that holds a previous run: delete that "
                        "run's checkpoints (.checkpoints and the four links to it), "
                        "metrics.jsonl and loss.png, and nothing else (default: refuse; "
                        "continue it with --resume)")
    p.add_argument("--allow-changes", action="store_true",
                   help="with --resume: continue even if "
                        f"{', '.join(RunConfig.flags(Resume.MUST_MATCH))}, the data or the "
                        "model differ from the checkpoint's (the run is then no longer "
                        "reproducible)")
    # the command line's warm-up follows the run's length unless given
    p.add_argument("--tokenizer", default=None, metavar="gpt2|char|FILE",
                   help="how text is turned into tokens: gpt2 (GPT-2's 50,257 tokens), char "
                        "(one token per character of the training text) or a Hugging Face "
                        "tokenizers tokenizer.json (e.g. a BPE trained on your text); char "
                        "and FILE make a new vocabulary, saved as vocab.json in --out, which "
                        "generate and eval read; they need --init (default: gpt2; a resumed "
                        "run keeps its own)")
    RunConfig.add_arguments(p, warmup=(None, f"steps of linear learning-rate warm-up (default: "
                                             f"10%% of --steps, at most {DEFAULT_WARMUP}; a "
                                             f"resumed run keeps its own)"),
                            compute_dtype=(None, "precision of the matmuls: bfloat16 operands "
                                                 "with float32 sums, forward and backward; the "
                                                 "weights, gradients and AdamW state stay "
                                                 "float32 (default: float32; a resumed run "
                                                 "keeps its own)"))
    add_threads_option(p, type=positive_int,
                       default_note="; under MPI the cores divided by the ranks on the node")
    p.add_argument("--distributed", action="store_true",
                   help="data parallel over MPI even when no launcher variable announces more "
                        "than one process (default: when one does; see below)")
    p.add_argument("--dp-timeout", type=positive_float, default=300.0, metavar="S",
                   help="data parallel: abort the job when another rank has not answered for "
                        "S seconds (default: %(default)s)")
    p.add_argument("--no-overlap", action="store_true",
                   help="data parallel: sum the gradients after the backward instead of "
                        "during it (for comparison)")
    p.add_argument("--log", metavar="CSV",
                   help="also write step, lr, train loss, val loss, tokens/s to this CSV "
                        "(default: none; metrics.jsonl in --out has the same and more)")
    plot = p.add_mutually_exclusive_group()
    plot.add_argument("--plot", action="store_true",
                      help="require matplotlib and redraw loss.png at every evaluation "
                           "(default: draw it at the end of a run if matplotlib is installed)")
    plot.add_argument("--no-plot", action="store_true", help="never draw loss.png")
    add_quiet_option(p, "progress lines on stderr", short=False)
    add_version_option(p)
    return p


# ------------------------------------------------------------------------------------------
# Exits: under MPI a rank that stops alone ends the job


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    world = World()
    return run_main(PROG, lambda: _run(args, world), after_error=world.abort,
                    interrupted=f"\n{PROG}: stopped; the last checkpoint in {args.out} is "
                                f"intact")


def _run(args, world: World) -> int:
    try:
        return _run_inner(args, world)
    except CheckpointError as e:
        raise UserError(str(e)) from None
    except RunFailed as e:
        # every rank stopped at the same step: no abort needed, one message is enough
        if world.rank == 0:
            print(f"{PROG}: error: {e}", file=sys.stderr)
        return 1
    except (UserError, OSError, KeyboardInterrupt):
        raise
    except BaseException as e:
        world.abort_on_crash(PROG, e)
        raise


# ------------------------------------------------------------------------------------------
# The run


def _run_inner(args, world: World) -> int:
    import gpt2s

    try:
        mpi = world.join(args.distributed)
    except ImportError as e:
        raise UserError(f"data parallel needs mpi4py (pip install 'gpt2s[mpi]'): {e}") \
            from None
    # every check that needs no data or model first
    if args.threads:
        try:
            gpt2s.set_num_threads(args.threads)
        except ValueError as e:
            raise UserError(f"--threads: {e}") from None
    elif mpi and not os.environ.get("OMP_NUM_THREADS"):
        from .distributed import default_threads
        gpt2s.set_num_threads(default_threads())
    if world.rank > 0:
        args.quiet, args.plot, args.no_plot, args.log = True, False, True, None
    if args.allow_changes and not args.resume:
        raise UserError("--allow-changes is for --resume only")
    if args.overwrite and args.resume:
        raise UserError("--overwrite starts a new run, --resume continues one: give one")
    if args.val_data and args.val_fraction != RunConfig().val_fraction:
        raise UserError("--val-fraction and --val-data exclude each other")
    if args.plot and not have_matplotlib():
        raise UserError("--plot needs matplotlib: pip install matplotlib "
                        "(or gpt2s[plot])")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out}: exists and is not a directory")
    if world.rank > 0:
        return _run_locked(args, out, world)
    # the one writer: held from before anything in OUT is read for writing until the end
    with lock_run_dir(out):
        return _run_locked(args, out, world)


def _run_locked(args, out: Path, world: World) -> int:
    import gpt2s
    from .config import GPT2Config
    from .data import DataError, FileHashes
    from .model import GPT2
    from .optim import AdamW
    from .vocab import check_data_ids

    ck = open_run_dir(out, resume=args.resume, overwrite=args.overwrite)
    warning = None
    if args.warmup is None:
        # not given: the checkpoint's (a resumed run keeps its schedule), else one that
        # follows the run's length
        saved = ck.state.get("run", {}).get("warmup") if ck is not None else None
        warmup = saved if type(saved) is int and 0 <= saved < args.steps \
            else default_warmup(args.steps)
    else:
        warmup, warning = effective_warmup(args.warmup, args.steps)
    compute_dtype, kept_note = args.compute_dtype, None
    if compute_dtype is None:
        # not given: the checkpoint's (a resumed run keeps its precision), else float32
        saved = ck.state.get("run", {}).get("compute_dtype") if ck is not None else None
        compute_dtype = saved if saved in COMPUTE_DTYPES else "float32"
        if saved in COMPUTE_DTYPES and saved != "float32":
            kept_note = (f"--resume: the run continues with the checkpoint's --compute-dtype "
                         f"{saved}")
    # batch_size is the global micro-batch: N ranks x --batch-size
    run = RunConfig.from_arguments(args, batch_size=args.batch_size * world.size, warmup=warmup,
                                   val_fraction=0.0 if args.val_data else args.val_fraction,
                                   compute_dtype=compute_dtype)
    specs = list(args.data) + list(args.data_opt)
    if not specs:
        raise UserError("no training data: give text files, .bin files or globs as DATA")
    # the model before the data when that is cheap, so a --seq-len beyond its context is
    # blamed on n_ctx, not on data too short for such windows
    model = own = None
    try:
        if ck is None and args.model:
            # any family AutoModelForCausalLM runs (GPT-2, Llama, Qwen2, GPT-NeoX), with
            # its own tokenizer when it is not GPT-2's
            model, own = _load_model(args.model)
    except (OSError, ValueError) as e:   # SafetensorsError, VocabError are ValueErrors
        raise UserError(str(e)) from None
    tokenizer = _vocabulary(args, ck, out, specs, own)
    try:
        if ck is None and not args.model:
            sizes = {} if tokenizer is None else {"vocab_size": tokenizer.n_vocab}
            model = GPT2.from_config(GPT2Config.preset(args.init or "mini", **sizes),
                                     seed=args.seed)
    except (OSError, ValueError) as e:   # SafetensorsError is a ValueError
        raise UserError(str(e)) from None
    n_ctx = model.config.n_ctx if model is not None else _saved_n_ctx(ck.dir)
    if n_ctx is not None and args.seq_len > n_ctx:
        raise UserError(f"--seq-len {args.seq_len} exceeds the model's context n_ctx={n_ctx}")
    try:
        train, val, described = open_data(specs, args.val_data, run, tokenizer)
        # content hashes, cached in OUT by the writer (a data-parallel rank only reads them)
        hashes = FileHashes(out / DATA_HASHES, readonly=world.rank > 0)
        train.hash_files(hashes)
        if val is not None:
            val.hash_files(hashes)
    except DataError as e:
        raise UserError(str(e)) from None
    identity = {"train_data": train.fingerprint, "val_data": val.fingerprint if val else None,
                "model_source": _model_source(args), "train_files": train.files(),
                "val_files": val.files() if val is not None and args.val_data else None}

    try:
        if ck is not None:
            by_key = {"train_data": train, "val_data": val}
            _check_resume(ck.state, run, identity, args.allow_changes,
                          legacy=lambda key: by_key[key].legacy_fingerprint()
                          if by_key[key] is not None else None)
            identity["model_source"] = ck.state.get("identity", {}).get("model_source")
            model = _auto().from_pretrained(ck.dir, dtype="float32")
        elif not args.model:
            identity["model_source"] = "init:" + (args.init or "mini")
    except (OSError, ValueError) as e:   # SafetensorsError is a ValueError
        raise UserError(str(e)) from None
    if args.seq_len > model.config.n_ctx:
        raise UserError(f"--seq-len {args.seq_len} exceeds the model's context "
                        f"n_ctx={model.config.n_ctx}")
    try:   # token files of another vocabulary (e.g. GPT-2's for a character-level model)
        for d in (train, val):
            if d is not None:
                check_data_ids(d, model.config.vocab_size)
    except ValueError as e:
        raise UserError(str(e)) from None
    if warning and world.rank == 0:   # once the inputs are known to be usable
        print(f"warning: {warning}", file=sys.stderr)
    if kept_note and world.rank == 0:
        print(f"note: {kept_note}", file=sys.stderr)
    try:
        model.compute_dtype = run.compute_dtype
    except ValueError as e:
        raise UserError(f"--compute-dtype {run.compute_dtype}: {e}") from None
    opt = AdamW(model, lr=run.lr, weight_decay=run.weight_decay)
    first, last_val, elapsed = 0, None, 0.0
    if ck is not None:
        try:
            first, last_val, elapsed = resume_state(ck, opt, run)
        except (OSError, ValueError) as e:
            raise UserError(f"--resume: {e}") from None

    trainee = model if world.size == 1 else world.data_parallel(
        model, opt, run, identity, first, resumed=ck is not None, overlap=not args.no_overlap,
        timeout=args.dp_timeout)
    loop = partial(train_loop, trainee, opt, train, val, run, out, identity, first=first,
                   last_val=last_val, elapsed=elapsed, progress=not args.quiet, plot=args.plot)
    if world.rank > 0:
        return _train(loop, NullMetrics(), out, run, first, world.rank)
    # the first writes: every check has passed
    out.mkdir(parents=True, exist_ok=True)
    if tokenizer is not None and ck is None:
        tokenizer.save(out / VOCAB_FILE)      # beside the model: generate and eval read it
        if own is not None:                   # and the checkpoint's tokenizer files as they are
            _copy_tokenizer_files(args.model, out)
    elif tokenizer is None and ck is None and (out / VOCAB_FILE).is_file() \
            and not (out / VOCAB_FILE).is_symlink():
        (out / VOCAB_FILE).unlink()           # a previous run's (--overwrite): not this one's
    if args.overwrite:
        removed = start_over(out)
        if removed:
            print(f"--overwrite: deleted the previous run's {', '.join(removed)} in {out}",
                  file=sys.stderr)
    elif ck is not None:   # what a kill during the last save's cleanup left
        remove_leftovers(out, ck.dir.name)
    hashes.save()
    metrics = Metrics(out, Path(args.log) if args.log else None, upto=first)
    print(f"{model!r}\ndata: {described}\n"
          f"{'resuming at step ' + str(first) + ' of ' if first else ''}"
          f"{plural(run.steps, 'step')} of "
          f"{run.batch_size}x{run.seq_len}{f' x{run.grad_accum}' if run.grad_accum > 1 else ''}"
          f" tokens, {plural(gpt2s.get_num_threads(), 'thread')}"
          + (f" per rank, {world.size} ranks of {plural(args.batch_size, 'window')}"
             if world.size > 1 else ""),
          file=sys.stderr)
    if not args.no_plot and not have_matplotlib():
        print(f"note: matplotlib is not installed, so no {out / 'loss.png'} is drawn (pip "
              f"install 'gpt2s[plot]'; --no-plot silences this note)", file=sys.stderr)
    try:
        status = _train(loop, metrics, out, run, first, 0)
    finally:
        metrics.close()
    if (args.plot or (not args.no_plot and have_matplotlib())) and metrics.rows:
        redraw_plot(out, model)
    return status


def _train(loop, metrics, out: Path, run: RunConfig, first: int, rank: int) -> int:
    """loop (train_loop, all but its metrics given), then its end in one line."""
    if first >= run.steps:
        print(f"the checkpoint in {out} is at step {first}, already at --steps {run.steps}; "
              f"nothing to do (raise --steps to train longer)", file=sys.stderr)
        return 0
    end = loop(metrics=metrics)
    if rank > 0:
        return 128 + end.signal if end.signal else 0
    if end.signal is not None:
        print(f"stopped at step {end.step} of {run.steps}; saved {out} (continue with "
              f"--resume)", file=sys.stderr)
        return 128 + end.signal
    val_text = ""
    if end.last_val and end.last_val["loss"] is not None:
        val_text = (f", validation loss {end.last_val['loss']:.4f} at step "
                    f"{end.last_val['step']}")
    print(f"saved {out} after {plural(end.step, 'step')} ({end.seconds:.0f} s{val_text})",
          file=sys.stderr)
    return 0


def _auto():
    from .auto import AutoModelForCausalLM
    return AutoModelForCausalLM


def _load_model(name_or_path):
    """(the float32 model of --model, its own tokenizer or None): a checkpoint of any family
    `AutoModelForCausalLM` runs (another is refused by name); a model whose vocabulary is not
    GPT-2's (a Llama, Qwen2 or GPT-NeoX checkpoint) comes with the tokenizer.json beside it (or the
    vocab.json of a gpt2s run), which the run encodes its text with and saves."""
    from .hub import resolve_pretrained
    from .vocab import tokenizer_for
    path = resolve_pretrained(name_or_path)
    model = _auto().from_pretrained(path, dtype="float32")
    if getattr(model.config, "model_type", "gpt2") == "gpt2":
        return model, None
    return model, tokenizer_for(path, model.config)


# the tokenizer files of a Hugging Face checkpoint, copied into a fine-tuning run's directory
# so that it is a checkpoint directory of the same model (generate --chat reads them)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "chat_template.jinja", "generation_config.json")


def _copy_tokenizer_files(name_or_path, out: Path):
    from .fs import atomic_write
    from .hub import resolve_pretrained
    src = Path(resolve_pretrained(name_or_path))
    src = src if src.is_dir() else src.parent
    for fname in TOKENIZER_FILES:
        if (src / fname).is_file() and (src / fname).resolve() != (out / fname).resolve():
            data = (src / fname).read_bytes()
            atomic_write(out / fname, lambda f, data=data: f.write(data))


def _vocabulary(args, ck, out: Path, specs, own=None):
    """The run's vocabulary (None: GPT-2's), as _chosen_vocabulary, checked against the one
    python -m gpt2s.prepare recorded for the token files in DATA: a new run without
    --tokenizer (or with --tokenizer char for char shards) takes theirs; any other
    difference is refused, naming the file.  own: the --model checkpoint's tokenizer (not
    GPT-2's), which a new run must use."""
    from .data import DataError, detect_format, expand_paths
    from .vocab import VocabError, same_vocab, shards_vocab, vocab_name
    recorded = []
    try:
        for path in expand_paths(specs + list(args.val_data or [])):
            if detect_format(path) == "llmc":
                known, enc = shards_vocab(path)
                if known:
                    recorded.append((path, enc))
    except (DataError, VocabError) as e:
        raise UserError(str(e)) from None
    if own is not None and ck is None:
        return _model_vocabulary(args, own, recorded)
    if not recorded:
        return _chosen_vocabulary(args, ck, out, specs)
    where, enc = recorded[0]
    for p, e in recorded[1:]:
        if not same_vocab(e, enc):
            raise UserError(f"{p} and {where}: token files of different vocabularies "
                            f"({vocab_name(e)} and {vocab_name(enc)}, their prepare.json)")
    if enc is None and ck is None and args.tokenizer not in (None, "gpt2"):
        raise UserError(f"{where}: GPT-2's tokens (its prepare.json), not --tokenizer "
                        f"{args.tokenizer}'s; prepare the text with --tokenizer "
                        f"{args.tokenizer}")
    if enc is not None and ck is None:
        if args.model:
            raise UserError(f"{where}: token ids of its own vocabulary ({vocab_name(enc)}, "
                            f"{where.parent / 'vocab.json'}), not --model's; train a new "
                            f"model (--init)")
        if args.tokenizer is None or (args.tokenizer == "char" and enc.name == "char"):
            return enc          # the shards' vocabulary: saved as OUT/vocab.json
    if ck is None and args.tokenizer == "char":     # not char shards (those returned above)
        chosen = "char"
    else:
        chosen = _chosen_vocabulary(args, ck, out, specs)
    if chosen == "char" or not same_vocab(chosen, enc):
        what = (f"--tokenizer {args.tokenizer}" if ck is None or args.tokenizer else
                f"the resumed run's vocabulary ({vocab_name(chosen)})")
        raise UserError(f"{where}: token ids of {vocab_name(enc, where.parent / 'vocab.json')}"
                        f" (its prepare.json), not of {what}")
    return chosen


def _model_vocabulary(args, own, recorded):
    """A new run from a checkpoint with its own tokenizer (own): text is encoded with it, and
    token files must have been prepared with it (python -m gpt2s.prepare --tokenizer
    MODEL/tokenizer.json); --tokenizer may only name the same tokenizer."""
    from .vocab import FileTokenizer, VocabError, same_vocab, vocab_name
    if args.tokenizer is not None:
        given = None
        if os.path.isfile(args.tokenizer):
            try:
                given = FileTokenizer.from_file(args.tokenizer)
            except (OSError, VocabError) as e:
                raise UserError(f"--tokenizer {e}") from None
        if given is None or not same_vocab(given, own):
            raise UserError(f"--tokenizer {args.tokenizer}: --model {args.model} has its own "
                            f"tokenizer ({vocab_name(own)}), which the run uses; leave "
                            f"--tokenizer out")
    for where, enc in recorded:
        if not same_vocab(enc, own):
            raise UserError(
                f"{where}: token ids of {vocab_name(enc, where.parent / 'vocab.json')} (its "
                f"prepare.json), not of --model {args.model}'s tokenizer; prepare the text "
                f"with python -m gpt2s.prepare --tokenizer {args.model}/tokenizer.json")
    return own


def _chosen_vocabulary(args, ck, out: Path, specs):
    """The run's own vocabulary (a CharTokenizer), or None for GPT-2's: --tokenizer char
    makes one from the training (and validation) text; a resumed run takes the one saved in
    OUT/vocab.json, and refuses a --tokenizer that differs from it."""
    from .data import DataError, detect_format, expand_paths
    from .vocab import CharTokenizer, FileTokenizer, VocabError, load_vocab
    saved_path = out / VOCAB_FILE
    given = None
    if args.tokenizer not in (None, "gpt2", "char"):
        if not os.path.isfile(args.tokenizer):
            raise UserError(f"--tokenizer {args.tokenizer}: not gpt2, char or a tokenizer.json "
                            f"file")
        try:
            given = FileTokenizer.from_file(args.tokenizer)
        except (OSError, VocabError) as e:
            raise UserError(f"--tokenizer {e}") from None
    if ck is not None:
        try:
            saved = load_vocab(saved_path) if saved_path.is_file() else None
        except (OSError, VocabError) as e:
            raise UserError(f"--resume: {e}") from None
        kind = {None: "gpt2", "char": "char", "tokenizers": "FILE"}[getattr(saved, "name", None)]
        asked = None if args.tokenizer is None else \
            ("FILE" if given is not None else args.tokenizer)
        if asked is not None and (asked != kind or (given is not None and given != saved)):
            raise UserError(f"--resume: the checkpoint's run used another vocabulary "
                            f"(--tokenizer {kind if kind != 'FILE' else saved_path}), not "
                            f"--tokenizer {args.tokenizer}")
        return saved
    if args.tokenizer in (None, "gpt2"):
        return None
    if args.model:
        raise UserError(f"--tokenizer {args.tokenizer} makes a new vocabulary: train a new model "
                        f"(--init), not --model, which has its own")
    if given is not None:
        return given
    texts = []
    try:
        for path in expand_paths(specs + list(args.val_data or [])):
            if detect_format(path) != "text":
                raise UserError(f"{path}: --tokenizer char reads text files; this one is "
                                f"tokens already")
            try:
                texts.append(path.read_text(encoding="utf-8"))
            except UnicodeDecodeError as e:
                raise UserError(f"{path}: not UTF-8 text (offset {e.start})") from None
    except DataError as e:
        raise UserError(str(e)) from None
    if not any(texts):
        raise UserError("--tokenizer char: the text files are empty")
    return CharTokenizer.from_text("".join(texts))


def _saved_n_ctx(ck_dir: Path) -> int | None:
    """The context of a checkpoint's model from its config.json, None when unreadable (the
    model's load then says what is wrong)."""
    from .config import GPT2Config, read_config_json
    try:
        d = read_config_json(ck_dir / "config.json")
        if d.get("model_type", "gpt2") == "gpt2":
            return GPT2Config.from_json_file(ck_dir / "config.json").n_ctx
        n = d.get("max_position_embeddings")    # Llama, Qwen2, GPT-NeoX
        return n if type(n) is int else None
    except (OSError, ValueError, AttributeError):
        return None


def _model_source(args) -> str | None:
    if args.model:
        p = Path(args.model).expanduser()
        return "model:" + (str(p.resolve()) if p.exists() else args.model)
    if args.init:
        return "init:" + args.init
    return None


def _check_resume(saved: dict, run: RunConfig, identity: dict, allow: bool, legacy=None):
    """Refuse (or with --allow-changes, warn about) what breaks an exact continuation; note
    schedule changes, which the user asked for explicitly."""
    refused, notes = resume_differences(saved, run, identity, legacy)
    if refused and not allow:
        raise UserError("--resume: this run differs from the checkpoint's in: "
                        + "; ".join(refused) + ". Resume with the same arguments, or pass "
                        "--allow-changes to continue anyway (not reproducible)")
    for b in refused:
        print(f"warning: --allow-changes: {b}", file=sys.stderr)
    for n in notes:
        print(f"note: {n}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
