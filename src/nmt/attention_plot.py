"""Attention heatmaps of one sentence pair (``nmt.attention_maps``): for each of encoder self-,
decoder self- and cross-attention, a grid of heads per layer and the head means of every layer.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from nmt.attention_maps import SentenceAttention
from nmt.plot import new_figure, save_figure

# kind in AttentionMaps -> (file name prefix, title, row axis, column axis)
KINDS = {
    "encoder": ("encoder_self", "encoder self-attention", "source (query)", "source (key)"),
    "decoder_self": ("decoder_self", "decoder self-attention (causal)",
                     "predicted target token", "decoder input (key)"),
    "cross": ("cross", "encoder-decoder (cross) attention", "predicted target token", "source (key)"),
}


def plot_attention(att: SentenceAttention, out_dir: str | Path) -> list[Path]:
    """For each kind: one grid per layer (every head and their mean) and one file with the mean of
    the heads of every layer. Returns the written paths."""
    out_dir = Path(out_dir)
    written = []
    for kind, layers in att.maps.items():
        prefix, title, _, _ = KINDS[kind]
        for i, weights in enumerate(layers, 1):
            panels = [(f"head {h + 1}", weights[h]) for h in range(weights.size(0))]
            panels.append(("mean of heads", weights.mean(0)))
            fig = _grid(att, kind, panels, f"{title}, layer {i} of {len(layers)}")
            written.append(save_figure(fig, out_dir / f"{prefix}_layer{i}.png"))
        panels = [(f"layer {i}", w.mean(0)) for i, w in enumerate(layers, 1)]
        fig = _grid(att, kind, panels, f"{title}, mean of the heads of each layer", max_cols=len(panels))
        written.append(save_figure(fig, out_dir / f"{prefix}_mean.png"))
    return written


def _grid(att: SentenceAttention, kind: str, panels: list[tuple[str, torch.Tensor]], title: str,
          max_cols: int = 3):
    """Heatmap panels with token labels on both axes of every panel and one shared colour scale.

    Margins are computed from the label lengths instead of by a layout engine, which would measure
    every tick label several times (seconds per figure)."""
    rows_lab, cols_lab = att.labels(kind)
    _, _, row_axis, col_axis = KINDS[kind]
    n_cols = min(max_cols, len(panels))
    n_rows = math.ceil(len(panels) / n_cols)
    font = 7.0 if max(len(rows_lab), len(cols_lab)) <= 40 else 5.0
    cell = font / 72 * 1.75  # inches per token
    char = font / 72 * 0.62  # inches per label character
    panel_w, panel_h = max(1.2, cell * len(cols_lab)), max(1.2, cell * len(rows_lab))
    gap_w = char * max(map(len, rows_lab)) + 0.45  # y tick labels and axis label of the next panel
    gap_h = char * max(map(len, cols_lab)) + 0.65  # x tick labels, axis label, next panel's title
    left, right, top, bottom = gap_w, 1.0, 0.85, gap_h - 0.25
    width = left + n_cols * panel_w + (n_cols - 1) * gap_w + right
    height = top + n_rows * panel_h + (n_rows - 1) * gap_h + bottom
    fig = new_figure(width, height, layout=None)
    axes = fig.subplots(n_rows, n_cols, squeeze=False, gridspec_kw={
        "left": left / width, "right": 1 - right / width, "top": 1 - top / height,
        "bottom": bottom / height, "wspace": gap_w / panel_w, "hspace": gap_h / panel_h})
    vmax = max(float(w.max()) for _, w in panels)
    image = None
    for k, ax in enumerate(axes.flat):
        if k >= len(panels):
            ax.set_visible(False)
            continue
        name, weights = panels[k]
        image = ax.imshow(weights.numpy(), cmap="viridis", vmin=0.0, vmax=vmax, interpolation="nearest",
                          aspect="auto")
        ax.set_title(name, fontsize=9)
        ax.set_xticks(range(len(cols_lab)), cols_lab, rotation=90, fontsize=font)
        ax.set_yticks(range(len(rows_lab)), rows_lab, fontsize=font)
        ax.tick_params(length=0, pad=1)
        ax.set_xlabel(col_axis, fontsize=7)
        ax.set_ylabel(row_axis, fontsize=7)
    bar = fig.add_axes((1 - 0.75 / width, bottom / height, 0.12 / width, 1 - (top + bottom) / height))
    colorbar = fig.colorbar(image, cax=bar)
    colorbar.ax.tick_params(labelsize=7)
    colorbar.set_label("attention weight", fontsize=7)
    fig.text(0.5, 1 - 0.1 / height, f"{title}\ntarget: {_shorten(att.target)}", ha="center", va="top",
             fontsize=10)
    return fig


def _shorten(text: str, limit: int = 110) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."
