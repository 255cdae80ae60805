"""What a training run records besides its checkpoints: ``metrics.jsonl`` (a JSON object per
step and per evaluation, NaN written as null), the optional CSV log, and ``loss.png`` (train
and validation loss against the step, the learning rate on a second axis)."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import numpy as np

from .checkpoint import LOG_FILES, strict_json
from .fs import atomic_write, errors_name

__all__ = ["Metrics", "NullMetrics", "plot_metrics", "loss_figure", "redraw_plot",
           "have_matplotlib",
           "METRICS", "PLOT"]

METRICS, PLOT = LOG_FILES     # the run directory's metrics.jsonl and loss.png


class Metrics:
    """Appends rows to OUT/metrics.jsonl and the optional CSV log.  Opening cuts both back to
    the rows of steps <= ``upto`` (the checkpoint's step), so a resumed run rewrites the
    steps after its checkpoint instead of repeating them."""

    CSV_HEADER = "step,lr,train_loss,val_loss,tokens_per_s\n"

    def __init__(self, out: Path, csv_path: Path | None, upto: int):
        self.path = out / METRICS
        self.csv_path = csv_path
        self._f = self._csv = None
        self._csv_pending = None
        with errors_name(self.path):
            self.rows = self._cut_jsonl(self.path, upto)
            self._f = open(self.path, "a", encoding="utf-8")
        if csv_path is not None:
            with errors_name(csv_path):
                self._cut_csv(csv_path, upto)
                self._csv = open(csv_path, "a", encoding="utf-8")
                if self._csv.tell() == 0:
                    self._csv.write(self.CSV_HEADER)
                    self._csv.flush()

    @staticmethod
    def _cut_jsonl(path: Path, upto: int) -> list:
        rows, kept = [], []
        if path.exists():
            for line in path.read_text(encoding="utf-8").splitlines(keepends=True):
                try:
                    row = json.loads(line) if line.endswith("\n") else None
                except json.JSONDecodeError:
                    row = None   # a line cut by a kill
                if isinstance(row, dict) and isinstance(row.get("step"), int) \
                        and row["step"] <= upto:
                    rows.append(row)
                    kept.append(line)
        text = "".join(kept).encode()
        if not path.exists() or path.read_bytes() != text:
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write(path, lambda f: f.write(text))
        return rows

    @classmethod
    def _cut_csv(cls, path: Path, upto: int):
        if not path.exists():
            return
        kept = []
        for line in path.read_text(encoding="utf-8").splitlines(keepends=True):
            step = line.split(",", 1)[0]
            if line.endswith("\n") and step.isdigit() and int(step) <= upto:
                kept.append(line)
        text = (cls.CSV_HEADER + "".join(kept)).encode()
        if path.read_bytes() != text:
            atomic_write(path, lambda f: f.write(text))

    def step(self, step: int, lr: float, loss: float, norm, tokens_per_s: float,
             elapsed: float):
        self._write({"type": "train", "step": step, "lr": lr, "train_loss": loss,
                     "grad_norm": norm, "tokens_per_s": round(tokens_per_s, 1),
                     "elapsed_s": round(elapsed, 3)})
        # the CSV row waits for this step's evaluation, if there is one
        self._flush_csv()
        self._csv_pending = [step, lr, loss, None, tokens_per_s]

    def eval(self, step: int, val_loss: float):
        self._write({"type": "eval", "step": step, "val_loss": val_loss})
        if self._csv_pending and self._csv_pending[0] == step:
            self._csv_pending[3] = val_loss

    def _write(self, row: dict):
        self.rows.append(row)
        with errors_name(self.path):
            self._f.write(strict_json(row) + "\n")
            self._f.flush()

    def _flush_csv(self):
        if self._csv is not None and self._csv_pending is not None:
            step, lr, loss, val, tps = self._csv_pending
            val_text = "" if val is None or not math.isfinite(val) else f"{val:.6f}"
            with errors_name(self.csv_path):
                self._csv.write(f"{step},{lr:.6g},{loss:.6f},{val_text},{tps:.1f}\n")
                self._csv.flush()
        self._csv_pending = None

    def sync(self):
        """Flush the pending CSV row (before a checkpoint, so the CSV holds its steps)."""
        self._flush_csv()

    def close(self):
        try:
            self._flush_csv()
        finally:
            for f in (self._f, self._csv):
                if f is not None:
                    try:
                        f.close()
                    except OSError:
                        # a failed flush of what a failed write left buffered: the write
                        # already reported it
                        pass


class NullMetrics:
    """Metrics that write nothing (the ranks of a data-parallel run other than rank 0)."""
    rows = ()

    def step(self, *a, **k):
        pass

    eval = sync = close = step


def plot_metrics(metrics_path, png_path, title: str = "") -> Path:
    """Draw train and validation loss against the step, the learning rate on a second axis,
    from a metrics.jsonl; written atomically.  Needs matplotlib (no pyplot, no display)."""
    fig = loss_figure(metrics_path, title)
    png_path = Path(png_path)
    atomic_write(png_path, lambda f: fig.savefig(f, format="png"))
    return png_path


def loss_figure(metrics_path, title: str = ""):
    """The matplotlib Figure plot_metrics saves.  Steps are whole numbers: the step axis
    has integer ticks only, however short the run."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    rows = []
    for line in Path(metrics_path).read_text(encoding="utf-8").splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    train = [(r["step"], r["train_loss"], r["lr"]) for r in rows if r.get("type") == "train"]
    val = [(r["step"], r["val_loss"]) for r in rows if r.get("type") == "eval"]

    fig = Figure(figsize=(8, 4.8), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    if train:
        steps = np.array([t[0] for t in train])
        loss = np.array([np.nan if t[1] is None else t[1] for t in train], float)
        ax.plot(steps, loss, color="tab:blue", lw=0.8, alpha=0.45 if len(train) > 50 else 1,
                label="train loss")
        if len(train) > 50:
            # a moving average shows the trend through the batch-to-batch noise
            k = max(2, len(train) // 50)
            smooth = np.convolve(np.nan_to_num(loss, nan=np.nanmean(loss)), np.ones(k) / k,
                                 mode="valid")
            ax.plot(steps[k - 1:], smooth, color="tab:blue", lw=1.6,
                    label=f"train loss ({k}-step mean)")
    if val:
        ax.plot([v[0] for v in val], [np.nan if v[1] is None else v[1] for v in val], "o-",
                color="tab:orange", lw=1.6, ms=4, label="validation loss")
    ax.set_xlabel("step")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel("loss (cross-entropy, nats)")
    ax.grid(True, alpha=0.3)
    handles, labels = ax.get_legend_handles_labels()
    if train:
        ax2 = ax.twinx()
        line, = ax2.plot([t[0] for t in train], [t[2] for t in train], "--", color="tab:gray",
                         lw=1, label="learning rate")
        ax2.set_ylabel("learning rate")
        from matplotlib.ticker import FuncFormatter
        ax2.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:.3g}"))
        ax2.set_ylim(bottom=0)
        handles.append(line)
        labels.append("learning rate")
    if handles:
        ax.legend(handles, labels, loc="best")
    if title:
        ax.set_title(title)
    fig.tight_layout()
    return fig


def redraw_plot(out: Path, model) -> None:
    """Draw OUT/loss.png from OUT/metrics.jsonl, titled with the model's size; a failure is a
    warning on stderr, never the end of the run."""
    c = model.config
    width = getattr(c, "n_embd", None) or getattr(c, "hidden_size", 0)   # GPT-2's, or Llama's
    n_params = sum(p.size for p in model.params.values())
    title = (f"{out.resolve().name}: {c.n_layer} layers, {c.n_head} heads, n_embd {width}, "
             f"{n_params / 1e6:.1f}M parameters")
    try:
        plot_metrics(out / METRICS, out / PLOT, title=title)
    except Exception as e:
        print(f"warning: could not draw {out / PLOT}: {e}", file=sys.stderr)


def have_matplotlib() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True
