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
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from matplotlib.patches import Rectangle

from circuits.measure import SinkMeasurement, nanmean  # noqa: E402

SEQUENTIAL = "cividis"  #: colour map of values (sink scores)
DIVERGING = "PuOr_r"  #: colour map of signed changes (intervened - clean)
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


#: line styles that differ in marker and dash as well as colour (grey-printable), one per series
MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")
LINES = ("-", "--", ":", "-.")
COLORS = ("#1b1b1b", "#5e5e5e", "#9a9a9a", "#2c7fb8", "#d95f0e", "#7a0177")


def series(i: int) -> dict:
    """The line style of the ``i``-th series of a figure (keyword arguments of ``Axes.plot``)."""
    return dict(marker=MARKERS[i % len(MARKERS)], ls=LINES[i % len(LINES)], color=COLORS[i % len(COLORS)], ms=4)


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
    with style():  # savefig reads bbox and dpi from the rc parameters in force when it runs
        fig.savefig(path)
    plt.close(fig)
    return path


# --------------------------------------------------------------------------- intervention effects


def _significant(rows: pd.DataFrame) -> pd.Series:
    """Cells whose bootstrap CI of the delta excludes 0."""
    return (rows["ci_low"] > 0) | (rows["ci_high"] < 0)


def sink_delta_heatmap(
    frame: pd.DataFrame,
    *,
    tokens: list[str] | None = None,
    target_positions: list[int] | tuple[int, ...] | None = None,
    title: str | None = None,
):
    """Change of the sink score (intervened − clean, mean over sequences) per layer × position.

    Reads the ``sink_score`` rows of an effect table (:attr:`interventions.effect.Effect.frame`
    or one item of a sweep). Diverging colour map centred on 0 with symmetric limits; a dot
    marks cells whose 95 % bootstrap CI excludes 0; triangles above the map mark the target
    positions. ``tokens`` (one sequence's tokens) label the positions when given.
    """
    rows = frame[frame["metric"] == "sink_score"]
    if rows.empty:
        raise ValueError("the table has no sink_score rows")
    delta = rows.pivot(index="layer", columns="position", values="delta").sort_index().sort_index(axis=1)
    layers = delta.index.to_numpy(int)
    positions = delta.columns.to_numpy(int)
    data = delta.to_numpy(float)
    finite = np.abs(data[np.isfinite(data)])
    lim = float(finite.max()) if finite.size and finite.max() > 0 else 1e-12
    with style():
        width = min(18, 3.5 + 0.16 * len(positions))
        fig, ax = plt.subplots(figsize=(width, 0.2 * len(layers) + 2.8))
        im = ax.imshow(data, aspect="auto", cmap=DIVERGING, vmin=-lim, vmax=lim, interpolation="nearest")
        sig = rows[_significant(rows)]
        col = {p: i for i, p in enumerate(positions)}
        row = {l: i for i, l in enumerate(layers)}
        if not sig.empty:
            ax.scatter([col[int(p)] for p in sig["position"]], [row[int(l)] for l in sig["layer"]], s=4, c="#1b1b1b",
                       marker="o", linewidths=0, label="95 % CI excludes 0")
        marked = [p for p in (target_positions or ()) if p in col]
        for i, p in enumerate(marked):
            ax.add_patch(Rectangle((col[p] - 0.5, -0.5), 1, len(layers), fill=False, edgecolor="#d95f0e", lw=1.2,
                                   label="target position" if i == 0 else None))
        if not sig.empty or marked:
            ax.legend(loc="upper right", fontsize=6, framealpha=0.8)
        step = max(1, int(np.ceil(len(positions) / 64)))
        idx = np.arange(0, len(positions), step)
        ax.set_xticks(idx)
        if tokens is not None:
            labels = [f"{token_label(tokens[positions[i]])} ({positions[i]})" if positions[i] < len(tokens) else str(positions[i]) for i in idx]
        else:
            labels = [str(positions[i]) for i in idx]
        ax.set_xticklabels(labels, rotation=90, fontsize=6)
        ystep = max(1, int(np.ceil(len(layers) / 40)))
        ax.set_yticks(np.arange(0, len(layers), ystep))
        ax.set_yticklabels([str(layers[i]) for i in range(0, len(layers), ystep)], fontsize=7)
        ax.set_xlabel("position (0-based)" + (" and token of sequence 0" if tokens is not None else ""))
        ax.set_ylabel("layer")
        ax.grid(False)
        fig.colorbar(im, ax=ax, label="Δ sink score (intervened − clean)")
        n = int(rows["n"].max())
        ax.set_title(title or f"Change of the sink score by layer and position (mean over {n} sequences)")
    return fig


#: the y-axis label of each metric a dose-response panel may show
DOSE_LABELS = {
    "target_sink_score": "Δ sink score of the target",
    "kl": "KL(clean ‖ intervened) (nats / token)",
    "next_token_loss": "Δ next-token loss (nats)",
}


def _dose_panel(ax, xs, curves, *, reference: tuple[float, dict], xlabel: str, ylabel: str) -> None:
    """One panel of :func:`dose_response`: each curve ``(ys, band, line style)`` against ``xs``
    (``band``: ``(low, high)`` drawn under it, or None), and a horizontal line at the value that
    means "no effect" (``reference``: the value and its line style)."""
    for ys, band, line in curves:
        if band is not None:
            ax.fill_between(xs, band[0], band[1], color="#9a9a9a", alpha=0.35, lw=0, label="95 % bootstrap CI")
        ax.plot(xs, ys, **line)
    ax.axhline(reference[0], **reference[1])
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)


def dose_response(
    frame: pd.DataFrame,
    *,
    x: str | None = None,
    metric: str = "target_sink_score",
    side_effect: str | None = "kl",
    title: str | None = None,
):
    """An intervention's effect against its dose, from either table that holds a dose response.

    * A sweep table (:func:`interventions.sweep.sweep`; it has a ``metric`` column, one row per
      item and metric): the delta of ``metric`` against the swept value ``x`` (default
      ``iv_strength``), its 95 % bootstrap CI as a band; a second panel shows the
      ``side_effect`` metric (default the KL divergence of the next-token distributions) the
      same way. A log x axis is used when ``x`` is positive and spans more than a factor of 50.
    * A rescaling table (the ``by_factor`` table of
      :func:`interventions.recipes.rescale_dose_response`: ``factor``, ``score_ratio``,
      ``lifetime_ratio``): the sinks' score and lifetime relative to the clean run against the
      factor applied to the aligned MLP output's norm (``x``, default ``factor``), in one
      panel on a symlog x axis; ``metric`` and ``side_effect`` are not read.
    """
    if "metric" not in frame.columns:
        return _rescaling_dose_response(frame, x or "factor", title)
    x = x or "iv_strength"
    if x not in frame.columns:
        raise ValueError(f"the table has no column {x!r}; columns: {', '.join(map(str, frame.columns))}")
    metrics = [metric] + ([side_effect] if side_effect else [])
    with style():
        fig, axes = plt.subplots(1, len(metrics), figsize=(4.8 * len(metrics) + 0.6, 3.4), squeeze=False)
        for ax, name in zip(axes[0], metrics):
            rows = frame[frame["metric"] == name].sort_values(x)
            if rows.empty:
                raise ValueError(f"the table has no {name!r} rows")
            xs = rows[x].to_numpy(float)
            band = (rows["ci_low"].to_numpy(float), rows["ci_high"].to_numpy(float))
            mean = dict(marker="o", ms=3.5, color="#1b1b1b", label="mean over sequences")
            _dose_panel(ax, xs, [(rows["delta"].to_numpy(float), band, mean)], reference=(0, dict(color="#5e5e5e", lw=0.8, ls="--")),
                        xlabel=x.removeprefix("iv_"), ylabel=DOSE_LABELS.get(name, f"Δ {name}"))
            if (xs > 0).all() and xs.max() / xs.min() > 50:
                ax.set_xscale("log")
            ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 4))
            ax.legend(loc="best", fontsize=7)
        spec = frame["spec"].iloc[0] if "spec" in frame.columns and len(frame) else ""
        fig.suptitle(title or f"Dose-response ({spec.split(':')[0]})" if spec else title or "Dose-response")
        fig.tight_layout(w_pad=2.5)
    return fig


def _rescaling_dose_response(frame: pd.DataFrame, x: str, title: str | None):
    """:func:`dose_response` of a rescaling table (ratios to the clean run, no CI)."""
    missing = [c for c in (x, "score_ratio", "lifetime_ratio") if c not in frame.columns]
    if missing:
        raise ValueError(f"the table is neither a sweep table (no 'metric' column) nor a rescaling table (no column "
                         f"{', '.join(map(repr, missing))}); columns: {', '.join(map(str, frame.columns))}")
    curves = [(frame[col], None, dict(series(i), label=label)) for i, (col, label) in
              enumerate((("score_ratio", "sink score (relative to clean)"), ("lifetime_ratio", "lifetime (relative to clean)")))]
    with style():
        fig, ax = plt.subplots(layout="constrained", figsize=(5.5, 3.4))
        _dose_panel(ax, frame[x], curves, reference=(1, dict(color="#9a9a9a", lw=0.8)),
                    xlabel="factor applied to the aligned MLP output's L2 norm", ylabel="relative to the clean run")
        ax.set_xscale("symlog", linthresh=0.25)
        ax.legend(fontsize=7)
        ax.set_title(title or "Norm rescaling of sink-aligned MLP outputs")
    return fig
