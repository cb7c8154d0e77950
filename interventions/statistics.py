"""The statistics of an effect: which rows a run becomes, and their paired bootstrap CIs.

Why this module exists. Clean, intervened and control runs become one tidy table, one row family
per entry of :data:`METRIC_TABLE` (a :class:`Metric`: how one run becomes per-sequence values,
and which cells they cover), so a new statistic of :class:`~circuits.measure.SinkMeasurement`
shows up in every effect and sweep table with one more entry here:

* ``target_sink_score``: the sink score of each run's own target
  (:func:`interventions.targets.target_sink_score`);
* side effects: ``next_token_loss`` (mean over a sequence's real positions of -log p(next
  token)) and ``kl``, KL(clean || intervened) of the next-token distributions
  (:func:`interventions.paired.kl_divergence`), averaged over real positions;
* ``sink_rate`` per position: Sink_k^eps in percent (thresholded per sequence, averaged over
  layers and heads; the ``layers`` restriction does not apply to it);
* ``sink_score`` per (layer, position): the mean attention a token receives from later queries,
  averaged over heads (:mod:`circuits.measure`).

Uncertainty: every row carries a 95 % bootstrap CI of its delta over *sequences*, paired (the
statistic is the mean of per-sequence deltas), with :func:`circuits.stats.paired_bootstrap`; with
a control also the difference of differences ``(intervened - clean) - (control - clean)`` and
its own paired CI (:func:`metric_columns`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Mapping

import numpy as np
import pandas as pd
from jaxtyping import Float

from circuits.measure import SinkMeasurement
from circuits.stats import nanmean, paired_bootstrap
from interventions.targets import Target, target_sink_score


@dataclass(frozen=True)
class RunView:
    """One run as :func:`compare` reads it: its measurement, the target it is scored at, and its
    per-position KL to the clean run (zeros for the clean run itself, NaN when unknown)."""

    meas: SinkMeasurement
    target: Target
    kl: Float[np.ndarray, "seq pos"]


@dataclass(frozen=True)
class Cells:
    """What the per-cell rows cover: the selected layers and positions, and Sink_k^eps's eps."""

    eps: float
    layers: list[int]
    positions: list[int]


@dataclass(frozen=True)
class Metric:
    """One family of rows of :attr:`Effect.frame`, as data.

    ``value(run, cells)``: the run's per-sequence values ``[N, C]``, one column per row;
    ``labels(cells)``: the layer and position of each row (None: aggregated over it);
    ``summary``: the :attr:`Effect.summary` key this metric fills, and the position of the row
    it takes (None: the metric's first row).
    """

    name: str
    value: Callable[[RunView, Cells], np.ndarray]
    labels: Callable[[Cells], tuple[list, list]]
    summary: tuple[str, int | None] | None = None


def _one_row(cells: Cells) -> tuple[list, list]:
    return [None], [None]


def _row_per_position(cells: Cells) -> tuple[list, list]:
    return [None] * len(cells.positions), list(cells.positions)


def _row_per_cell(cells: Cells) -> tuple[list, list]:
    grid_l, grid_p = np.meshgrid(cells.layers, cells.positions, indexing="ij")
    return grid_l.ravel().tolist(), grid_p.ravel().tolist()


#: the rows of :attr:`Effect.frame`, in order. A new statistic of :class:`SinkMeasurement`
#: shows up in every effect and sweep table with one more entry here.
METRIC_TABLE: tuple[Metric, ...] = (
    # the sink score of each run's own target (planting at p is compared with planting at q)
    Metric("target_sink_score", lambda r, c: target_sink_score(r.meas, r.target)[:, None], _one_row, ("target_sink_score", None)),
    # side effects: mean next-token loss and KL to the clean run over a sequence's real positions
    Metric("next_token_loss", lambda r, c: nanmean(r.meas.next_token_loss, axis=1)[:, None], _one_row, ("next_token_loss", None)),
    Metric("kl", lambda r, c: nanmean(np.asarray(r.kl, dtype=np.float64), axis=1)[:, None], _one_row, ("kl", None)),
    # Sink_k^eps per position (per sequence: percent of (layer, head) pairs with alpha > eps)
    Metric("sink_rate", lambda r, c: 100.0 * r.meas.sink_indicator(c.eps)[:, c.positions], _row_per_position, ("first_token_sink_rate", 0)),
    # sink score per (layer, position)
    Metric("sink_score", lambda r, c: r.meas.sink_score[:, c.layers][:, :, c.positions].reshape(r.meas.n_sequences, -1), _row_per_cell),
)
#: metric names of :attr:`Effect.frame`, in row order
METRICS = tuple(m.name for m in METRIC_TABLE)


def metric_columns(metric: Metric, cells: Cells, runs: Mapping[str, RunView], boot: dict) -> dict[str, np.ndarray]:
    """The columns of one metric's rows, from its per-sequence values ``[N, C]`` in every run."""
    layers, positions = metric.labels(cells)
    clean = np.asarray(metric.value(runs["clean"], cells), dtype=np.float64)
    intervened = np.asarray(metric.value(runs["intervened"], cells), dtype=np.float64)
    c = clean.shape[1]
    delta = intervened - clean
    lo, hi = paired_bootstrap(delta, **boot)
    out = {
        "metric": np.array([metric.name] * c, dtype=object),
        "layer": np.asarray(layers, dtype=object),
        "position": np.asarray(positions, dtype=object),
        "n": (~np.isnan(delta)).sum(0),
        "clean": nanmean(clean, axis=0),
        "intervened": nanmean(intervened, axis=0),
        "delta": nanmean(delta, axis=0),
        "ci_low": lo,
        "ci_high": hi,
    }
    if "control" in runs:
        control = np.asarray(metric.value(runs["control"], cells), dtype=np.float64)
        control_delta = control - np.asarray(metric.value(runs["control_clean"], cells), dtype=np.float64)
        did = delta - control_delta
        dlo, dhi = paired_bootstrap(did, **boot)
        out.update(
            control=nanmean(control, axis=0), control_delta=nanmean(control_delta, axis=0),
            did=nanmean(did, axis=0), did_ci_low=dlo, did_ci_high=dhi,
        )
    return out


def summary_row(row: pd.Series, has_ctrl: bool) -> dict:
    """One row of the frame as an :attr:`Effect.summary <interventions.effect.Effect.summary>` entry."""
    out = {
        "clean": row["clean"], "intervened": row["intervened"], "delta": row["delta"],
        "ci95": [row["ci_low"], row["ci_high"]], "n": int(row["n"]),
    }
    if has_ctrl:
        out.update(control=row["control"], control_delta=row["control_delta"], did=row["did"], did_ci95=[row["did_ci_low"], row["did_ci_high"]])
    return out


__all__ = ["Cells", "METRICS", "METRIC_TABLE", "Metric", "RunView", "metric_columns", "summary_row"]
