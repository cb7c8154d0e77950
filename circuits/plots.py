"""Figures: one shared style, and every figure a function of a result object.

Why one module: notebooks, the CLI and the reports must show the same picture of the same
numbers. Every function takes a result (or a tidy table), returns a matplotlib ``Figure`` and
never computes statistics of its own beyond trivial aggregation for display.

Style rules: labelled axes with units, readable token labels, and colour maps whose lightness
is monotone (``cividis`` for magnitudes, ``PuOr`` for signed differences, both legible in
grey print); markers differ in shape as well as colour.
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

import matplotlib

matplotlib.use("Agg", force=False)
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from circuits.measure import SinkMeasurement, nanmean  # noqa: E402

SEQUENTIAL = "cividis"
DIVERGING = "PuOr_r"
STYLE = {
    "figure.dpi": 110,
    "savefig.dpi": 130,
    "savefig.bbox": "tight",
    "font.size": 9,
    "axes.titlesize": 10,
    "axes.labelsize": 9,
    "axes.grid": True,
    "grid.alpha": 0.25,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "image.cmap": SEQUENTIAL,
    "axes.prop_cycle": matplotlib.cycler(color=["#1b1b1b", "#5e5e5e", "#9a9a9a", "#2c7fb8", "#d95f0e"]),
}


@contextmanager
def style():
    """Apply sinkscope's figure style inside a ``with`` block."""
    with plt.rc_context(STYLE):
        yield


def token_label(token: str, max_len: int = 10) -> str:
    """A printable label: whitespace made visible, long tokens cut."""
    shown = token.replace("\n", "\\n").replace("\t", "\\t")
    if not shown.strip():
        shown = "␣" * max(1, len(shown))
    return shown if len(shown) <= max_len else shown[: max_len - 1] + "…"


def _position_ticks(ax, tokens: list[str], max_labels: int = 64) -> None:
    step = max(1, int(np.ceil(len(tokens) / max_labels)))
    idx = np.arange(0, len(tokens), step)
    ax.set_xticks(idx)
    ax.set_xticklabels([f"{token_label(tokens[i])} ({i})" if step > 1 else token_label(tokens[i]) for i in idx], rotation=90, fontsize=6)


def sink_score_heatmap(meas: SinkMeasurement, sequence: int = 0, *, max_positions: int | None = None, title: str | None = None):
    """Sink score (mean attention received from later queries) per layer × position."""
    length = int(meas.lengths[sequence])
    if max_positions:
        length = min(length, max_positions)
    data = meas.sink_score[sequence, :, :length]
    with style():
        width = min(18, 3 + 0.13 * length)
        fig, ax = plt.subplots(figsize=(width, 0.18 * meas.n_layers + 2))
        im = ax.imshow(data, aspect="auto", cmap=SEQUENTIAL, vmin=0, vmax=max(1e-6, float(np.nanmax(data))), interpolation="nearest")
        ax.set_ylabel("layer")
        ax.set_xlabel("position (token)")
        ax.grid(False)
        _position_ticks(ax, meas.tokens[sequence][:length])
        fig.colorbar(im, ax=ax, label="sink score (mean attention from later queries)")
        ax.set_title(title or f"{meas.model}: sink score by layer and position (sequence {sequence})")
    return fig


def primary_sink_mass(meas: SinkMeasurement, *, title: str | None = None):
    """The first token's sink score per layer: mean over sequences with a 5-95 % band."""
    mass = meas.primary_sink_mass()  # [N, L]
    layers = np.arange(meas.n_layers)
    with style():
        fig, ax = plt.subplots(figsize=(6.5, 3.2))
        mean = nanmean(mass, axis=0)
        if mass.shape[0] > 1:
            lo, hi = np.nanpercentile(mass, [5, 95], axis=0)
            ax.fill_between(layers, lo, hi, color="#9a9a9a", alpha=0.35, label="5-95 % of sequences")
        ax.plot(layers, mean, marker="o", ms=3, color="#1b1b1b", label="mean")
        ax.set_xlabel("layer")
        ax.set_ylabel("attention to position 0\n(mean over heads, later queries)")
        ax.set_ylim(0, 1)
        ax.legend(loc="lower right", fontsize=7)
        ax.set_title(title or f"{meas.model}: primary-sink mass per layer (n={meas.n_sequences})")
    return fig


def secondary_sinks_plot(table: pd.DataFrame, n_layers: int, *, title: str | None = None):
    """Counts of flagged tokens over (creation layer, lifetime): Wong et al.'s sink-level plane.

    Each cell is annotated with its count; clusters of cells are the "sink levels". The dashed
    lines mark the class boundaries when ``table`` carries them in ``attrs``.
    """
    with style():
        fig, ax = plt.subplots(figsize=(6, 4.2))
        counts = np.zeros((n_layers + 1, n_layers), dtype=int)
        if not table.empty:
            np.add.at(counts, (table["lifetime"].to_numpy(int), table["start_layer"].to_numpy(int)), 1)
        shown = np.where(counts > 0, counts, np.nan)
        im = ax.imshow(shown, origin="lower", aspect="auto", cmap=SEQUENTIAL, interpolation="nearest",
                       extent=(-0.5, n_layers - 0.5, -0.5, n_layers + 0.5))
        for (life, start), c in np.ndenumerate(counts):
            if c:
                ax.text(start, life, str(c), ha="center", va="center", fontsize=6, color="white" if c < counts.max() / 2 else "black")
        for key, label in (("min_lifetime", "secondary above"), ("primary_from", "primary-like from")):
            if key in table.attrs:
                y = table.attrs[key] + 0.5 if key == "min_lifetime" else table.attrs[key] - 0.5
                ax.axhline(y, ls="--", lw=0.8, color="#5e5e5e")
                ax.text(n_layers - 1, y + 0.2, label, ha="right", va="bottom", fontsize=6, color="#5e5e5e")
        if table.empty:
            ax.text(0.5, 0.5, "no token met the hidden-state rule", ha="center", va="center", transform=ax.transAxes)
        ax.set_xlabel("creation layer (first layer with |cos(h_t, h_0)| > threshold)")
        ax.set_ylabel("lifetime (number of flagged layers)")
        ax.grid(False)
        fig.colorbar(im, ax=ax, label="tokens")
        ax.set_title(title or f"Secondary-sink candidates: creation layer × lifetime (n={len(table)})")
    return fig


def save(fig, path: str | Path) -> Path:
    """Save and close (figures are never left open in long runs)."""
    path = Path(path)
    fig.savefig(path)
    plt.close(fig)
    return path
