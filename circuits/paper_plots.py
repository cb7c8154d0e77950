"""Figures of the paper reproductions (Wong, Li, Gu et al.), in the shared style of
:mod:`circuits.plots`.

Every figure uses matplotlib's constrained layout, so labels fit whatever saves it. Every
function takes tidy tables (from :mod:`circuits.analyses`, :mod:`circuits.anatomy` or
:mod:`interventions.recipes`) and returns a matplotlib ``Figure``; nothing here computes a
statistic beyond picking columns. Grey-printable: lines differ in marker and dash as well as
colour, colour maps are :data:`circuits.plots.SEQUENTIAL` / :data:`circuits.plots.DIVERGING`.

Wong et al.'s dose response is :func:`circuits.plots.dose_response`, the one figure of every
dose response (a sweep's or a rescaling's); it is importable from here too.
"""

from __future__ import annotations

import io

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from matplotlib.colors import LogNorm

from circuits.plots import SEQUENTIAL, dose_response, series, style, token_label


def show(fig):
    """A figure as an IPython PNG image (and closed): notebooks display it the same under any
    matplotlib backend, exactly as :func:`circuits.plots.save` would write it."""
    from IPython.display import Image  # optional: only notebooks display figures, the report and CLI save them

    buf = io.BytesIO()
    with style():
        fig.savefig(buf, format="png")
    plt.close(fig)
    return Image(buf.getvalue())


# ------------------------------------------------------------------------------ Wong et al.


def long_heatmap(meas, sequence: int = 0, *, zoom: int = 96, title: str | None = None):
    """Sink score (layer × position) of one long input, in two panels: the whole sequence on a
    logarithmic colour scale (secondary sinks are 10-100 × weaker than the first token but far
    above ordinary tokens), and its first ``zoom`` positions with their tokens, on a linear
    scale. The last positions have few later queries, so their scores are noisy."""
    length = int(meas.lengths[sequence])
    data = meas.sink_score[sequence, :, :length]
    zoom = min(zoom, length)
    vmax = float(np.nanmax(data))
    with style():
        fig, axes = plt.subplots(2, 1, layout="constrained", figsize=(13, 0.2 * meas.n_layers + 5), gridspec_kw=dict(height_ratios=[1, 1.25]))
        ax = axes[0]
        im = ax.imshow(np.clip(data, 1e-3, None), aspect="auto", cmap=SEQUENTIAL, norm=LogNorm(1e-3, max(vmax, 2e-3)), interpolation="nearest")
        ax.set_xlabel("position (0-based)")
        ax.set_ylabel("layer")
        ax.grid(False)
        fig.colorbar(im, ax=ax, label="sink score (log scale)")
        ax.set_title(f"whole sequence ({length} tokens)", fontsize=9)
        ax = axes[1]
        im = ax.imshow(data[:, :zoom], aspect="auto", cmap=SEQUENTIAL, vmin=0, vmax=vmax, interpolation="nearest")
        ax.set_xticks(range(zoom), [token_label(t) for t in meas.tokens[sequence][:zoom]], rotation=90, fontsize=5.5)
        ax.set_xlabel(f"first {zoom} positions (token)")
        ax.set_ylabel("layer")
        ax.grid(False)
        fig.colorbar(im, ax=ax, label="sink score\n(mean attention from later queries)")
        fig.suptitle(title or f"{meas.model}: sink score by layer and position (sequence {sequence})", fontsize=10)
    return fig


def primary_vs_secondary(layers: pd.DataFrame, *, title: str | None = None):
    """Primary-sink score per layer (left axis) against the number of secondary sinks alive at
    that layer (right axis, bars). ``layers`` has columns layer, primary_sink_score,
    live_secondary."""
    with style():
        fig, ax = plt.subplots(layout="constrained", figsize=(7, 3.4))
        ax2 = ax.twinx()
        ax2.bar(layers["layer"], layers["live_secondary"], color="#c8c8c8", width=0.8, label="secondary sinks alive", zorder=0)
        ax2.set_ylabel("secondary sinks alive at the layer (count)")
        ax2.grid(False)
        ax.set_zorder(ax2.get_zorder() + 1)
        ax.patch.set_visible(False)
        ax.plot(layers["layer"], layers["primary_sink_score"], **series(0), label="primary-sink score (position 0)")
        ax.set_xlabel("layer")
        ax.set_ylabel("attention to position 0\n(mean over heads, later queries)")
        ax.set_ylim(0, 1)
        h1, l1 = ax.get_legend_handles_labels()
        h2, l2 = ax2.get_legend_handles_labels()
        ax.legend(h1 + h2, l1 + l2, loc="upper left", fontsize=7)
        ax.set_title(title or "Primary-sink strength and live secondary sinks per layer")
    return fig


def mlp_site_cosines(table: pd.DataFrame, sites: tuple[str, ...], baseline: dict[str, float] | None = None, *, title: str | None = None):
    """|cos| of each MLP sub-output with the first token's at the creation layer, one box per
    site, with the median over ordinary tokens at the same layers (diamonds)."""
    with style():
        fig, ax = plt.subplots(layout="constrained", figsize=(7, 3.4))
        data = [np.abs(table[f"cos_{s}"].dropna().to_numpy()) for s in sites]
        if len(table):
            ax.boxplot(data, tick_labels=list(sites), showfliers=False, patch_artist=True,
                       boxprops=dict(facecolor="#d9d9d9", color="#1b1b1b"), medianprops=dict(color="#1b1b1b", lw=1.5))
            for i, d in enumerate(data):
                jitter = np.random.default_rng(i).uniform(-0.15, 0.15, len(d))
                ax.plot(i + 1 + jitter, d, ".", color="#5e5e5e", ms=2, alpha=0.5)
        else:
            ax.set_xticks(range(1, len(sites) + 1), list(sites))
            ax.text(0.5, 0.5, "no secondary sink to analyse", ha="center", va="center", transform=ax.transAxes)
        if baseline:
            ax.plot(range(1, len(sites) + 1), [abs(baseline.get(s, np.nan)) for s in sites], "D", color="#d95f0e", ms=5,
                    label="ordinary tokens, same layers (median)")
            ax.legend(loc="upper left", fontsize=7)
        ax.set_ylim(0, 1.02)
        ax.set_xlabel("MLP sub-output (input → down projection → written to the residual)")
        ax.set_ylabel("|cos| with the first token's\nvector at the same site")
        ax.set_title(title or f"Secondary sinks at their creation layer (n={len(table)})")
    return fig


def norm_scatter(table: pd.DataFrame, corr_score: dict, corr_life: dict, *, title: str | None = None):
    """L2 norm of the aligning MLP output against the sink score and against the lifetime."""
    with style():
        fig, axes = plt.subplots(1, 2, layout="constrained", figsize=(8, 3.3))
        for ax, col, corr, label in (
            (axes[0], "peak_score", corr_score, "peak sink score (mean attention received)"),
            (axes[1], "lifetime", corr_life, "lifetime (layers)"),
        ):
            ax.plot(table["written_norm"], table[col], "o", color="#1b1b1b", ms=3, alpha=0.6, mfc="none")
            ax.set_xlabel("L2 norm of the MLP output at the creation layer")
            ax.set_ylabel(label)
            ax.set_title(f"Spearman ρ = {corr['spearman']:.2f}, Pearson r = {corr['pearson']:.2f} (n={corr['n']})", fontsize=8)
        fig.suptitle(title or "Does the MLP output norm set the secondary sink's strength?", fontsize=10)
    return fig


# ------------------------------------------------------------------------------ Li et al.


def variance_by_layer(frame: pd.DataFrame, *, title: str | None = None):
    """Attention-output variance and norm per layer, the first token against the rest."""
    with style():
        fig, axes = plt.subplots(1, 2, layout="constrained", figsize=(9, 3.3))
        for ax, key, label in ((axes[0], "z_var", "variance of head outputs (hook_z)"), (axes[1], "out_norm", "L2 norm of the attention output")):
            ax.plot(frame["layer"], frame[f"{key}_first"], **series(0), label="first token (position 0)")
            ax.plot(frame["layer"], frame[f"{key}_rest"], **series(1), label="other tokens (median)")
            ax.set_yscale("log")
            ax.set_xlabel("layer")
            ax.set_ylabel(label)
            ax.legend(fontsize=7)
        fig.suptitle(title or "Variance discrepancy: attention outputs of the first token against the rest", fontsize=10)
    return fig


def super_neuron_plot(table: pd.DataFrame, massive_dims: set[int] | None = None, *, title: str | None = None, top: int = 20):
    """The strongest super neurons: first-token activation over the layer's median |activation|
    (log scale), labelled by the residual dimension they write most; hatched when that
    dimension is a massive activation. An empty table (even one without columns, as an empty
    list of records reads back) draws an empty figure."""
    massive_dims = massive_dims or set()
    shown = table.sort_values("ratio", ascending=False).head(top).iloc[::-1] if len(table) else table
    with style():
        fig, ax = plt.subplots(layout="constrained", figsize=(6.5, 0.25 * max(len(shown), 4) + 1.2))
        if shown.empty:
            ax.text(0.5, 0.5, "no super neuron found", ha="center", va="center", transform=ax.transAxes)
        else:
            labels = [f"L{r.layer} ch{r.channel} → dim {r.top_dims[0]}" for r in shown.itertuples()]
            hatches = ["///" if r.top_dims[0] in massive_dims else "" for r in shown.itertuples()]
            bars = ax.barh(range(len(shown)), shown["ratio"], color="#9a9a9a", edgecolor="#1b1b1b")
            for bar, h in zip(bars, hatches):
                bar.set_hatch(h)
            ax.set_yticks(range(len(shown)), labels, fontsize=7)
            ax.set_xscale("log")
        ax.set_xlabel("|first-token activation| / median |activation| of the layer")
        ax.set_title(title or "Super neurons (hatched: writes a massive residual dimension)")
    return fig


def planting_plot(frame: pd.DataFrame, *, title: str | None = None):
    """Sink score by layer of the planted position under each condition. ``frame``: layer,
    condition, score."""
    with style():
        fig, ax = plt.subplots(layout="constrained", figsize=(7, 3.4))
        for i, (cond, sub) in enumerate(frame.groupby("condition", sort=False)):
            ax.plot(sub["layer"], sub["score"], **series(i), label=cond)
        ax.set_xlabel("layer")
        ax.set_ylabel("sink score of the position\n(mean attention from later queries)")
        ax.set_ylim(bottom=0)
        ax.legend(fontsize=6.5, ncol=2)
        ax.set_title(title or "Planting a sink at an arbitrary position")
    return fig


def lambda_curve(frame: pd.DataFrame, *, title: str | None = None):
    """Planted sink score against the amplification factor lambda, one line per mode (Li et al.'s
    deviation amplification and its plain-scaling control). ``frame``: factor, mode, score."""
    with style():
        fig, ax = plt.subplots(layout="constrained", figsize=(5.5, 3.4))
        for i, (mode, sub) in enumerate(frame.groupby("mode", sort=False)):
            sub = sub.sort_values("factor")
            ax.plot(sub["factor"], sub["score"], **series(i), label=mode)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("λ")
        ax.set_ylabel("sink score of the planted position")
        ax.set_ylim(bottom=0)
        ax.legend(fontsize=7)
        ax.set_title(title or "Planting by amplification: sink score vs λ")
    return fig


# ------------------------------------------------------------------------------ Gu et al.


def sink_rate_vs_eps(frame: pd.DataFrame, *, title: str | None = None):
    """Sink_1^eps (percent) against eps, one line per model. ``frame``: model, eps, sink_rate."""
    with style():
        fig, ax = plt.subplots(layout="constrained", figsize=(5.5, 3.4))
        for i, (model, sub) in enumerate(frame.groupby("model", sort=False)):
            ax.plot(sub["eps"], sub["sink_rate"], **series(i), label=model)
        ax.set_xlabel("threshold eps")
        ax.set_ylabel("Sink_1^eps (% of heads × layers)")
        ax.set_ylim(0, 100)
        ax.legend(fontsize=7)
        ax.set_title(title or "First-token sink rate across thresholds")
    return fig


def kv_norms_plot(frame: pd.DataFrame, *, title: str | None = None):
    """Key and value norm of the first token over the other tokens' per layer, with the
    attention it receives and the share of head outputs its value makes."""
    with style():
        fig, axes = plt.subplots(1, 2, layout="constrained", figsize=(9, 3.3))
        ax = axes[0]
        ax.plot(frame["layer"], frame["k_ratio"], **series(0), label="key norm ratio")
        ax.plot(frame["layer"], frame["v_ratio"], **series(1), label="value norm ratio")
        ax.axhline(1, color="#9a9a9a", lw=0.8)
        ax.set_yscale("log")
        ax.set_xlabel("layer")
        ax.set_ylabel("first token / median other token")
        ax.legend(fontsize=7)
        ax = axes[1]
        ax.plot(frame["layer"], frame["attn_first"], **series(0), label="attention later queries give it")
        ax.plot(frame["layer"], frame["value_share"], **series(1), label="share of head-output norm from its value")
        ax.set_ylim(0, 1)
        ax.set_xlabel("layer")
        ax.set_ylabel("mean over heads and queries")
        ax.legend(fontsize=7)
        fig.suptitle(title or "The first token as a key bias: key and value norms", fontsize=10)
    return fig


def keybias_effect_plot(frame: pd.DataFrame, *, title: str | None = None):
    """KL(clean ‖ intervened) per intervention, log scale."""
    frame = frame[frame["intervention"] != "clean"]
    with style():
        fig, ax = plt.subplots(layout="constrained", figsize=(7.5, 0.45 * len(frame) + 1.3))
        ax.barh(range(len(frame)), frame["kl"].clip(lower=1e-6), color="#9a9a9a", edgecolor="#1b1b1b")
        ax.set_yticks(range(len(frame)), frame["intervention"], fontsize=7)
        ax.set_xscale("log")
        ax.set_xlim(right=frame["kl"].max() * 40)  # room for the labels inside the axes
        ax.set_xlabel("KL(clean ‖ intervened), nats per token")
        for i, (kl, dl) in enumerate(zip(frame["kl"], frame["delta_loss"])):
            ax.text(max(kl, 1e-6), i, f"  {kl:.3g} nats, Δloss {dl:+.3f}", va="center", fontsize=7)
        ax.set_title(title or "Zeroing the sink's value against removing its attention")
    return fig


__all__ = [
    "dose_response", "keybias_effect_plot", "long_heatmap", "kv_norms_plot", "mlp_site_cosines", "norm_scatter", "planting_plot",
    "primary_vs_secondary", "show", "sink_rate_vs_eps", "super_neuron_plot", "variance_by_layer", "SEQUENTIAL",
    "lambda_curve", "sink_levels_plot",
]


def sink_levels_plot(counts: np.ndarray, *, title: str | None = None):
    """Wong et al.'s sink-level histogram: log(1 + count) over (creation layer, lifetime), as
    their code plots it. ``counts`` is :func:`circuits.anatomy.sink_levels`."""
    with style():
        fig, ax = plt.subplots(layout="constrained", figsize=(5.5, 3.8))
        im = ax.imshow(np.log1p(counts).T, origin="lower", aspect="auto", cmap=SEQUENTIAL, interpolation="nearest")
        ax.set_xlabel("creation layer")
        ax.set_ylabel("lifetime (flagged layers)")
        fig.colorbar(im, ax=ax, label="log(1 + count)")
        ax.set_title(title or "Sink levels (Wong et al.)")
    return fig
