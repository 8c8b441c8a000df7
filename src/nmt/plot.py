"""Pictures of a run: training curves from ``metrics.jsonl`` and the sinusoidal positional encoding.

matplotlib is an optional dependency (``pip install 'nmt[plot]'``). Figures are drawn on the Agg
canvas directly (no pyplot), so nothing here changes the process-wide matplotlib backend.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from nmt.errors import NMTError

DPI = 100


def new_figure(width: float, height: float, layout: str | None = "constrained"):
    """A matplotlib Figure (inches) on an Agg canvas; a one-line NMTError when matplotlib is missing."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise NMTError("plotting needs the matplotlib package: pip install 'nmt[plot]'") from None
    fig = Figure(figsize=(width, height), dpi=DPI, layout=layout)
    FigureCanvasAgg(fig)
    return fig


def save_figure(fig, path: str | Path) -> Path:
    """Write ``fig`` as PNG to ``path`` (parent folders created) and return the path."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, format="png", dpi=DPI)
    except OSError as e:
        raise NMTError(f"cannot write {path}: {e.strerror or e}") from None
    return path


# -- training curves -----------------------------------------------------------------------------


def read_metrics(run_dir: str | Path) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(training log records, validation records) of ``run_dir/metrics.jsonl``, in file order.

    A resumed run may repeat steps; the last record of a step wins. A torn last line (a run killed
    while writing) is skipped.
    """
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise NMTError(f"no metrics.jsonl in {run_dir} (is it the run_dir of an nmt train run?)")
    train: dict[int, dict[str, Any]] = {}
    valid: dict[int, dict[str, Any]] = {}
    lines = path.read_text(encoding="utf-8").splitlines()
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            if i == len(lines) - 1:
                continue
            raise NMTError(f"{path} line {i + 1} is not valid JSON") from None
        if not isinstance(record, dict) or not isinstance(record.get("step"), int):
            raise NMTError(f"{path} line {i + 1} has no integer 'step'")
        (valid if "valid_loss" in record else train)[record["step"]] = record
    if not train and not valid:
        raise NMTError(f"{path} has no records yet")
    return [train[s] for s in sorted(train)], [valid[s] for s in sorted(valid)]


def _series(records: list[dict[str, Any]], key: str) -> tuple[list[int], list[float]]:
    pairs = [(r["step"], r[key]) for r in records
             if isinstance(r.get(key), (int, float)) and math.isfinite(r[key])]
    return [s for s, _ in pairs], [v for _, v in pairs]


def _line(ax, records, key: str, label: str, **style) -> bool:
    steps, values = _series(records, key)
    if not steps:
        return False
    ax.plot(steps, values, label=label, marker="o" if len(steps) <= 20 else None, markersize=3, **style)
    return True


def plot_training(run_dir: str | Path, out: str | Path) -> Path:
    """Four panels against step: train/valid loss, valid BLEU (or perplexity), learning rate, target tokens/s."""
    train, valid = read_metrics(run_dir)
    fig = new_figure(10, 6.5)
    (loss_ax, bleu_ax), (lr_ax, speed_ax) = fig.subplots(2, 2, sharex=True)

    _line(loss_ax, train, "loss", "train loss (label-smoothed)", color="tab:blue", alpha=0.6)
    _line(loss_ax, train, "nll_loss", "train NLL", color="tab:blue")
    _line(loss_ax, valid, "valid_loss", "valid NLL", color="tab:orange", linewidth=2)
    loss_ax.set_title("loss (nats per target token)")
    loss_ax.legend(fontsize=8)

    _score_panel(bleu_ax, valid)

    _line(lr_ax, train, "lr", "learning rate", color="tab:red")
    lr_ax.set_title("learning rate")
    lr_ax.ticklabel_format(axis="y", style="sci", scilimits=(-2, 2))

    _line(speed_ax, train, "tokens_per_s", "tokens/s", color="tab:purple")
    speed_ax.set_title("target tokens per second")
    speed_ax.set_ylim(bottom=0)

    for ax in (lr_ax, speed_ax):
        ax.set_xlabel("step")
    for ax in (loss_ax, bleu_ax, lr_ax, speed_ax):
        ax.grid(alpha=0.3)
    fig.suptitle(f"training run {Path(run_dir).resolve().name}", fontsize=11)
    return save_figure(fig, out)


def _score_panel(ax, valid: list[dict[str, Any]]) -> None:
    """Validation BLEU and chrF; masked-token accuracy for a masked LM's run, perplexity for a
    language model's (neither has BLEU)."""
    if _line(ax, valid, "valid_bleu", "valid BLEU", color="tab:green", linewidth=2):
        _line(ax, valid, "valid_chrf", "valid chrF", color="tab:olive", linestyle="--")
        ax.legend(fontsize=8)
        ax.set_title("validation BLEU / chrF")
    elif _line(ax, valid, "valid_accuracy", "valid masked-token accuracy", color="tab:green", linewidth=2):
        ax.legend(fontsize=8)
        ax.set_title("validation masked-token accuracy (%)")  # task mlm
    elif _line(ax, valid, "valid_ppl", "valid perplexity", color="tab:green", linewidth=2):
        ax.legend(fontsize=8)
        ax.set_title("validation perplexity")
    else:
        ax.text(0.5, 0.5, "no validation yet", ha="center", va="center", transform=ax.transAxes)
        ax.set_title("validation BLEU / chrF")


# -- positional encoding -------------------------------------------------------------------------


def positional_encoding(d_model: int, length: int):
    """The first ``length`` rows [length, d_model] of the model's own sinusoidal encoding module."""
    from nmt.model.embeddings import PositionalEncoding

    if d_model < 1 or length < 1:
        raise NMTError(f"--d-model and --length must be >= 1, got {d_model} and {length}")
    return PositionalEncoding(d_model, length)(length)


def plot_positional(d_model: int, length: int, out: str | Path) -> Path:
    """Heatmap of PE[position, dimension]: fast sines in the first dimensions, slow ones at the end."""
    pe = positional_encoding(d_model, length).numpy()
    fig = new_figure(10, 4.8)
    ax = fig.subplots()
    image = ax.imshow(pe, aspect="auto", cmap="RdBu_r", vmin=-1, vmax=1, interpolation="nearest")
    ax.set_xlabel("embedding dimension (even: sin, odd: cos)")
    ax.set_ylabel("position")
    ax.set_title(f"sinusoidal positional encoding, d_model={d_model}, positions 0..{length - 1}")
    fig.colorbar(image, ax=ax, fraction=0.04, pad=0.02)
    return save_figure(fig, out)
