"""Sink anatomy: structure derived from a :class:`~circuits.measure.SinkMeasurement`.

Nothing here runs a model. Each function reads the per-sequence statistics and returns a tidy
pandas table, so the same numbers feed the CLI, the reports and the notebooks.

* :func:`primary_sink_layers` — where the first token actually receives attention.
* :func:`secondary_sinks` — Wong et al.'s hidden-state rule (|cos(h_t, h_0)| > 0.9), with
  creation layer, lifetime, class and the attention the token really receives.
* :func:`massive_activations` — residual dimensions far above the median (Sun et al.).
* :func:`sink_window` — Wong et al.'s optional "sink clipper" layer window.
* :func:`sink_levels` — Wong et al.'s "sink levels": the count histogram over (creation layer,
  lifetime) of the flagged tokens, which their code plots as log(1 + count).
* :func:`attended_secondary` — the secondary sinks that also receive outsized attention, and
  :func:`live_per_layer` — how many of them are flagged at each layer (the pairing science.md
  asks for on models, such as Gemma 3, where the hidden-state rule alone flags ordinary tokens).
* :func:`sink_rate_ci` — Sink_k^eps (Gu et al.) with a bootstrap CI over sequences.
* :func:`once_per_context` — a table's tokens counted once per distinct context (a sink in a
  prefix that several sequences share is one observation), and :func:`distinct_contexts`, their number.
* :func:`layer_ranges` — a set of layers as text (``"3-5, 9"``), as every report prints them.

Class thresholds. The authors' code labels a flagged token *secondary* when
``4 < lifetime < L - 15`` and *primary-like* when ``lifetime >= L - 15`` (else *noise*), for
models of L ≈ 40-64 layers. A 30-layer model cannot use those constants, so
:meth:`SecondaryThresholds.for_depth` scales both by ``L / 48`` (48: the middle of the authors'
depth range) and rounds half up: 30 layers → ``3 < lifetime < 21``; 18 layers → ``2 < lifetime < 12``.
"""

from __future__ import annotations

import math
import warnings
from collections import Counter
from dataclasses import asdict, dataclass

import numpy as np
import pandas as pd
from jaxtyping import Int

from circuits.checks import check_eps
from circuits.measure import SinkMeasurement, nanmean
from circuits.stats import bootstrap_ci

REFERENCE_DEPTH = 48


def _round_half_up(x: float) -> int:
    return int(math.floor(x + 0.5))


@dataclass(frozen=True)
class SecondaryThresholds:
    """Wong et al.'s detection and class thresholds (see the module docstring)."""

    cos: float = 0.9
    min_lifetime: int = 4  # secondary needs lifetime > min_lifetime
    primary_margin: int = 15  # primary-like when lifetime >= n_layers - primary_margin

    @classmethod
    def for_depth(cls, n_layers: int, cos: float = 0.9) -> "SecondaryThresholds":
        scale = n_layers / REFERENCE_DEPTH
        return cls(cos=cos, min_lifetime=max(1, _round_half_up(4 * scale)), primary_margin=max(1, _round_half_up(15 * scale)))

    def classify(self, lifetime: int, n_layers: int) -> str:
        if lifetime >= n_layers - self.primary_margin:
            return "primary-like"
        if lifetime > self.min_lifetime:
            return "secondary"
        return "noise"


def sink_window(meas: SinkMeasurement, sequence: int) -> tuple[int, int]:
    """Wong et al.'s layer window for one sequence: [start, stop) over layers.

    From the layer after the largest increase of ||h_0^l|| to the layer after the largest
    decrease that comes later. Falls back to all layers when the norm never decreases.
    """
    norms = meas.resid_norm[sequence, :, 0]
    diffs = np.diff(norms)
    if len(diffs) == 0:
        return 0, meas.n_layers
    rise = int(np.argmax(diffs))
    start = rise + 1
    later = diffs[rise + 1 :]
    if len(later) == 0 or later.min() >= 0:
        return start, meas.n_layers
    stop = rise + 1 + int(np.argmin(later)) + 1
    return start, stop + 1


def secondary_sinks(
    meas: SinkMeasurement,
    thresholds: SecondaryThresholds | None = None,
    *,
    use_window: bool = False,
    include_noise: bool = False,
    abs_cos: bool = True,
    skip_first: int = 1,
) -> pd.DataFrame:
    """Tokens whose hidden state aligns with the first token's, per Wong et al.

    A token t >= ``skip_first`` is flagged at layer l when |cos(h_t^l, h_0^l)| > ``thresholds.cos``
    (``abs_cos=False``: the signed cosine). Its lifetime is the number of flagged layers, which
    need not be contiguous (as in the authors' code), its creation layer the first one.

    Defaults and the authors' code: they scan only the sink-clipper window (``use_window=True``;
    the default here is False, every layer, because on 30-layer models the window can be a few
    layers wide; the reports show both), use |cos| (``abs_cos=True``, the default), and exclude
    positions 0-2 when a chat template is used (``skip_first=3``; default 1, only the first token). ``peak_score``
    is its largest sink score over the flagged layers, and ``score_ratio`` that score over the
    median sink score of the sequence's other non-first tokens at the same layer: the check
    science.md asks for on models where the hidden-state rule alone is not discriminative.

    Returns one row per flagged token: sequence, position, token, start_layer, lifetime, kind,
    peak_score, peak_layer, score_ratio, max_abs_cos.
    """
    th = thresholds or SecondaryThresholds.for_depth(meas.n_layers)
    rows = []
    n_layers = meas.n_layers
    for s in range(meas.n_sequences):
        length = int(meas.lengths[s])
        signed = meas.cos_to_first[s, :, 1:length]  # [L, t-1]
        cos = np.abs(signed) if abs_cos else signed
        flagged = cos > th.cos
        flagged[:, : max(0, skip_first - 1)] = False
        if use_window:
            lo, hi = sink_window(meas, s)
            outside = np.ones(n_layers, dtype=bool)
            outside[lo:hi] = False
            flagged[outside] = False
        scores = meas.sink_score[s, :, 1:length]
        with np.errstate(all="ignore"), warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # a 2-token sequence: no other token has a score (NaN)
            median_other = np.nanmedian(np.where(np.isnan(scores), np.nan, scores), axis=1)  # [L]
        for j in np.flatnonzero(flagged.any(axis=0)):
            layers = np.flatnonzero(flagged[:, j])
            lifetime = int(len(layers))
            kind = th.classify(lifetime, n_layers)
            if kind == "noise" and not include_noise:
                continue
            sc = scores[layers, j]
            if np.all(np.isnan(sc)):
                peak, peak_layer, ratio = float("nan"), -1, float("nan")
            else:
                k = int(np.nanargmax(sc))
                peak, peak_layer = float(sc[k]), int(layers[k])
                med = median_other[peak_layer]
                ratio = float(peak / med) if med and med > 0 else float("nan")
            position = j + 1
            rows.append(
                dict(
                    sequence=s, position=int(position), token=meas.tokens[s][position], start_layer=int(layers[0]),
                    lifetime=lifetime, kind=kind, peak_score=peak, peak_layer=peak_layer, score_ratio=ratio,
                    max_abs_cos=float(cos[layers, j].max()),
                )
            )
    columns = ["sequence", "position", "token", "start_layer", "lifetime", "kind", "peak_score", "peak_layer", "score_ratio", "max_abs_cos"]
    return pd.DataFrame(rows, columns=columns)


def sink_levels(table: pd.DataFrame, n_layers: int) -> Int[np.ndarray, "layer lifetime"]:
    """Wong et al.'s sink levels: ``counts[c, n]`` = flagged tokens created at layer c that live
    n layers (n from 0 to ``n_layers``; column 0 stays empty). ``table`` is a
    :func:`secondary_sinks` table (pass ``include_noise=True`` to count every flagged token, as
    their histogram does). No clustering: a level is a cell, or a cluster of cells, of this grid.
    """
    counts = np.zeros((n_layers, n_layers + 1), dtype=np.int64)
    for c, n in zip(table["start_layer"].to_numpy(int), table["lifetime"].to_numpy(int)):
        counts[c, n] += 1
    return counts


def primary_sink_layers(meas: SinkMeasurement, eps: float = 0.3, min_share: float = 0.5) -> pd.DataFrame:
    """Per layer: the first token's mean sink score and the share of heads with alpha_0 > eps.

    ``holds_sink`` marks the layers where that share, over heads and sequences, is at least
    ``min_share``.
    """
    eps = check_eps(eps)
    alpha0 = meas.alpha[:, :, :, 0]  # [N, L, H]
    share = (alpha0 > eps).mean(axis=(0, 2))
    score = nanmean(meas.sink_score[:, :, 0], axis=0)
    return pd.DataFrame(
        {
            "layer": np.arange(meas.n_layers),
            "primary_sink_score": score,
            "mean_alpha0": alpha0.mean(axis=(0, 2)),
            "head_share_alpha0_gt_eps": share,
            "holds_sink": share >= min_share,
        }
    )


def massive_activations(meas: SinkMeasurement, *, min_value: float = 100.0, min_ratio: float = 1000.0) -> pd.DataFrame:
    """Every (sequence, layer, position, dim) whose |value| ≥ min_value and ≥ min_ratio × median.

    Defaults follow Sun et al. (2024): magnitude above 100 and around 1,000 times the median
    |activation| of the layer's residual stream in that sequence.
    """
    vals = meas.top_values  # [N, L, T, K]
    ratio = np.abs(vals) / meas.median_abs[:, :, None, None]
    with np.errstate(invalid="ignore"):
        hit = (np.abs(vals) >= min_value) & (ratio >= min_ratio)
    s, l, t, k = np.nonzero(hit)
    frame = pd.DataFrame(
        {
            "sequence": s,
            "layer": l,
            "position": t,
            "token": [meas.tokens[a][b] for a, b in zip(s, t)],
            "dim": meas.top_dims[s, l, t, k],
            "value": vals[s, l, t, k],
            "median_abs": meas.median_abs[s, l],
            "ratio": ratio[s, l, t, k],
        }
    )
    return frame


def massive_dimensions(meas: SinkMeasurement, **kwargs) -> pd.DataFrame:
    """Summary of :func:`massive_activations` by residual dimension.

    One row per dim: the layers where it is massive, the largest |value| and its ratio to the
    median, and the share of its occurrences that sit at position 0.
    """
    occ = massive_activations(meas, **kwargs)
    if occ.empty:
        return pd.DataFrame(columns=["dim", "first_layer", "last_layer", "max_abs_value", "max_ratio", "share_at_position_0", "n_occurrences"])
    occ = occ.assign(abs_value=occ["value"].abs(), at_first=occ["position"] == 0)
    return (
        occ.groupby("dim")
        .agg(
            first_layer=("layer", "min"),
            last_layer=("layer", "max"),
            max_abs_value=("abs_value", "max"),
            max_ratio=("ratio", "max"),
            share_at_position_0=("at_first", "mean"),
            n_occurrences=("value", "size"),
        )
        .reset_index()
        .sort_values("max_abs_value", ascending=False, ignore_index=True)
    )


def thresholds_dict(th: SecondaryThresholds) -> dict:
    return asdict(th)


def attended_secondary(
    meas: SinkMeasurement, min_score_ratio: float = 5.0, thresholds: SecondaryThresholds | None = None, *, skip_first: int = 1
) -> tuple[pd.DataFrame, pd.DataFrame, SecondaryThresholds]:
    """The secondary sinks that are attended: ``(candidates, attended, thresholds)``.

    ``candidates`` is :func:`secondary_sinks` (classes scaled to depth unless ``thresholds`` is
    given); ``attended`` keeps its ``kind == "secondary"`` rows whose ``score_ratio`` is at least
    ``min_score_ratio``, i.e. tokens that receive that many times the median token's attention
    at their peak layer; ``skip_first`` as in :func:`secondary_sinks`. ``attended.attrs`` carries ``min_lifetime`` and ``primary_from`` for
    :func:`circuits.plots.secondary_sinks_plot`.
    """
    th = thresholds or SecondaryThresholds.for_depth(meas.n_layers)
    table = secondary_sinks(meas, th, skip_first=skip_first)
    attended = table[(table["kind"] == "secondary") & (table["score_ratio"] >= min_score_ratio)].reset_index(drop=True)
    attended.attrs.update(min_lifetime=th.min_lifetime, primary_from=meas.n_layers - th.primary_margin)
    return table, attended, th


def once_per_context(meas: SinkMeasurement, table: pd.DataFrame) -> pd.DataFrame:
    """``table``'s rows (with ``sequence`` and ``position``), one per distinct context: the
    first row, in table order, of each set of rows whose tokens have the same context (the
    token ids up to and including them), with ``copies``, how many rows share it. Causal
    attention makes a token's activations a function of its context, so a sink inside a prefix
    several sequences share (a chat template's system prompt) is one observation, however many
    sequences repeat it. The row index is ``table``'s (a row can be traced back)."""
    if table.empty:
        return table.assign(copies=pd.Series(dtype=int))
    keys = [tuple(meas.token_ids[int(s)][: int(p) + 1]) for s, p in zip(table["sequence"], table["position"])]
    counts = Counter(keys)
    seen: set = set()
    first = np.array([not (k in seen or seen.add(k)) for k in keys])
    return table[first].assign(copies=[counts[k] for k, f in zip(keys, first) if f])


def distinct_contexts(meas: SinkMeasurement, table: pd.DataFrame) -> int:
    """How many of ``table``'s tokens (rows with ``sequence`` and ``position``) differ in their
    context, the token ids up to and including them (:func:`once_per_context`)."""
    return len(once_per_context(meas, table))


def live_per_layer(meas: SinkMeasurement, table: pd.DataFrame, cos: float) -> Int[np.ndarray, " layer"]:
    """How many of ``table``'s tokens (rows with ``sequence`` and ``position``) are flagged,
    |cos(h_t, h_0)| > ``cos``, at each layer."""
    live = np.zeros(meas.n_layers, dtype=int)
    for s, p in zip(table["sequence"], table["position"]):
        live += (np.abs(meas.cos_to_first[int(s), :, int(p)]) > cos).astype(int)
    return live


def sink_rate_ci(meas: SinkMeasurement, eps: float = 0.3, position: int = 0, confidence: float = 0.95) -> tuple[float, float, float]:
    """Sink_k^eps (percent) with a bootstrap CI over sequences (circuits.stats.bootstrap_ci, seed 0)."""
    per_seq = 100.0 * meas.sink_indicator(eps)[:, position]
    per_seq = per_seq[~np.isnan(per_seq)]
    point = float(per_seq.mean())
    if len(per_seq) < 3 or np.ptp(per_seq) == 0:
        return point, point, point
    low, high = bootstrap_ci(per_seq, confidence=confidence, n_resamples=2000, seed=0, legacy_rng=True)
    return point, float(low[0]), float(high[0])


def layer_ranges(layers, empty: str = "") -> str:
    """Layers as text: ``[3, 4, 5, 9]`` -> ``"3-5, 9"``; ``empty`` when there is none."""
    layers = [int(x) for x in layers]
    if not layers:
        return empty
    out, start, prev = [], layers[0], layers[0]
    for x in layers[1:] + [None]:
        if x is not None and x == prev + 1:
            prev = x
            continue
        out.append(f"{start}-{prev}" if start != prev else f"{start}")
        if x is not None:
            start = prev = x
    return ", ".join(out)
