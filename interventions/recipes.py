"""Recipes: whole causal experiments on attention sinks, each one function returning tidy tables.

Why this module exists. :func:`~interventions.effect.measure_effect` and
:func:`~interventions.sweep.sweep` answer "what does *this* intervention do?". The papers ask
questions one level up — "can a sink be planted anywhere?", "which MLP writes each secondary
sink, and does removing it remove the sink?", "does the norm of that MLP output set the sink's
score and lifetime?". A recipe strings the building blocks together for one such question,
with the controls it needs, and returns numbers a test can assert on. Nothing here measures on
its own: every number comes from :func:`circuits.measure.measure`, ``measure_effect`` or
``sweep``.

Recipes (positions 0-based; position 0 is the papers' Sink_1, the primary sink):

* :func:`plant_sink` — Li et al.'s planting. ``method="isolate"``: in early layers the query at
  position ``p`` attends only to itself (it aggregates like the first token,
  :class:`~interventions.attention.IsolateAggregation`); ``method="amplify"``: ``p``'s attention
  output's deviation from the sequence mean is multiplied in early layers
  (:class:`~interventions.residual.AmplifyVariance`; ``amplify`` picks its site, mode and mean).
  Returns ``p``'s sink score per layer: clean, intervened, an equal-budget random control
  (the same edit at a random other position, scored at ``p``), the difference of differences
  with its bootstrap CI, the control's score at *its own* planted position, and which layers
  hold a sink at ``p``.
* :func:`secondary_sink_mlps` — Wong et al.'s formation: for every secondary sink of
  :func:`circuits.anatomy.secondary_sinks`, the MLP whose output at the token
  (``hook_mlp_out``) best aligns (|cos|) with the primary-sink direction ``h_0^l`` at or just
  before the creation layer, found automatically (:class:`circuits.analyses.MLPSiteMeter`).
* :func:`ablate_secondary_sinks` — ablate that MLP output at exactly that token of exactly that
  sequence (:class:`~interventions.mlp.TokenMLPEdit`) and re-measure: fraction of sinks no longer flagged, drop of
  the cosine to ``h_0`` and of the sink score over the former lifetime, against a random
  position control.
* :func:`rescale_dose_response` — rescale the same MLP output by a grid of factors (Wong et al.'s
  norm intervention); per factor, each sink's peak score and mean score over its former
  lifetime, and its lifetime recomputed from the intervened run's ``cos_to_first``; Spearman's
  rho of both against the factor. The grid also runs through :func:`~interventions.sweep.sweep`
  for the per-position table with CIs.

One protocol each. :func:`plant_sink` and :func:`rescale_dose_response` are also the protocols
``sinkscope reproduce`` judges Li et al.'s planting and Wong et al.'s dose response by (the
report calls them), so a number quoted from a recipe and a verdict in a report differ only by
their data, never by their method.

The cells of a secondary sink are edited with :class:`~interventions.mlp.TokenMLPEdit`
(``"edit-token-mlp"``): secondary sinks sit at different positions in different sequences, each
written by its own MLP layer, and it edits a list of (sequence, layer, position) cells, so all
sinks of a batch are handled in one forward pass (and ``measure_effect``'s position control
moves the cells to random positions of the same sequences and layers).
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any, Literal, Mapping, Sequence

import numpy as np
import pandas as pd
from jaxtyping import Float
from scipy.stats import spearmanr

from circuits import analyses, anatomy
from circuits.errors import SinkscopeError
from circuits.measure import SinkMeasurement, SinkMeter, measure, nanmean
from circuits.probes import TokenBatch
from interventions.attention import IsolateAggregation
from interventions.base import Intervention
from interventions.effect import Effect, intervention_layers, measure_effect, paired_bootstrap
from interventions.mlp import EditMode, TokenMLPEdit
from interventions.residual import AmplifyVariance
from interventions.sweep import sweep

PlantMethod = Literal["isolate", "amplify"]


class RecipeError(SinkscopeError, ValueError):
    """A recipe asked for something its inputs cannot give (an unknown planting method, no sink to edit)."""


#: defaults chosen from measurements on smollm2-135m (8 probe passages × 64 tokens, position 32):
#: isolating layers 0-2 plants a sink of score ~0.2 (layers 3-9); layers beyond 2 add nothing.
DEFAULT_ISOLATE_LAYERS = (0, 1, 2)
#: Li et al.'s lambda for ``method="amplify"`` when no strength is given (the issue's spec, factor 8)
DEFAULT_AMPLIFY_FACTOR = 8.0


# ============================================================================ planting


def _ordinary_median(meas: SinkMeasurement, exclude: Sequence[int] = ()) -> Float[np.ndarray, " layer"]:
    """Per layer, the median sink score over every (sequence, position >= 1) cell, ``exclude`` left out."""
    scores = meas.sink_score[:, :, 1:].copy()
    for p in exclude:
        if p >= 1:
            scores[:, :, p - 1] = np.nan
    flat = scores.transpose(1, 0, 2).reshape(meas.n_layers, -1)
    with np.errstate(all="ignore"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            return np.nanmedian(flat, axis=1)


def plant_intervention(
    method: PlantMethod, position: int, layers: Sequence[int] | None, strength: float | None, amplify: Mapping[str, Any] | None = None
) -> Intervention:
    """The intervention :func:`plant_sink` runs (see there for the defaults)."""
    if method == "isolate":
        return IsolateAggregation(layers=tuple(layers) if layers is not None else DEFAULT_ISOLATE_LAYERS, queries=(position,))
    if method == "amplify":
        chosen = tuple(layers) if layers is not None else DEFAULT_ISOLATE_LAYERS
        factor = float(strength if strength is not None else DEFAULT_AMPLIFY_FACTOR)
        return AmplifyVariance(layers=chosen, positions=(position,), factor=factor, **dict(amplify or {}))
    raise ValueError(f"method must be 'isolate' or 'amplify', got {method!r}")


def plant_sink(
    model,
    batch: TokenBatch,
    position: int,
    *,
    method: PlantMethod,
    layers: Sequence[int] | None = None,
    strength: float | None = None,
    amplify: Mapping[str, Any] | None = None,
    control: str | Intervention | None = "random",
    seed: int = 0,
    sink_ratio: float = 5.0,
    n_resamples: int = 1000,
    batch_size: int = 8,
) -> pd.DataFrame:
    """Plant a sink at ``position`` (Li et al.) and report its sink score layer by layer.

    Args:
        method: ``"isolate"`` — in each of ``layers`` (default :data:`DEFAULT_ISOLATE_LAYERS`,
            0-2) the query at ``position`` attends only to itself, as the first token must;
            ``"amplify"`` — ``AmplifyVariance(layers, positions=(position,), factor=strength,
            **amplify)`` (default layers 0-2, factor :data:`DEFAULT_AMPLIFY_FACTOR`): by default
            the token's attention output after ``W_O`` becomes ``mu + strength (o - mu)``, ``mu``
            the sequence's mean attention output at that layer; ``amplify`` sets the other
            fields (``site``, ``mode="norm"`` for the plain-scaling control, ``mu``).
        control: passed to :func:`~interventions.effect.measure_effect`. ``"random"`` moves the
            edit to a random non-sink position ``q`` of the same sequences (same kind, same
            layers, same strength: an equal budget), seeded by ``seed``.
        sink_ratio: a layer "holds a sink at ``position``" when the planted position's mean score
            is at least ``sink_ratio`` times the clean median score of ordinary tokens at that
            layer and the difference-of-differences CI excludes 0 from below.

    Returns:
        One row per layer, with ``layer``, ``clean``, ``intervened``, ``delta`` and its CI, ``control``
        (the control run's score at ``position``, where it did *not* edit), ``did`` =
        (intervened - clean) - (control - clean) with ``did_ci_low``/``did_ci_high`` (paired
        bootstrap over sequences), ``control_own`` (the control run's score at its own edited
        position ``q``: does planting work elsewhere too?), ``primary`` (the clean run's score at
        position 0, the scale a planted sink is compared with), ``ordinary_median``, ``ratio``
        (intervened / ordinary_median), ``edited`` (the layer's attention or residual is edited)
        and ``is_sink``. ``frame.attrs`` holds the specs, the control move, the
        ``target_sink_score`` summary of the effect and ``sink_layers`` (the ``is_sink`` layers).
    """
    iv = plant_intervention(method, position, layers, strength, amplify)
    effect = measure_effect(model, batch, iv, control=control, positions=[position], seed=seed,
                            n_resamples=n_resamples, batch_size=batch_size)
    return plant_table(effect, position, sink_ratio=sink_ratio)


def plant_table(effect: Effect, position: int, *, sink_ratio: float = 5.0) -> pd.DataFrame:
    """The per-layer table of :func:`plant_sink` from an :class:`~interventions.effect.Effect`."""
    rows = effect.frame[(effect.frame["metric"] == "sink_score") & (effect.frame["position"] == position)]
    rows = rows.sort_values("layer").reset_index(drop=True)
    cols = ["layer", "n", "clean", "intervened", "delta", "ci_low", "ci_high"]
    has_ctrl = effect.control is not None
    if has_ctrl:
        cols += ["control", "control_delta", "did", "did_ci_low", "did_ci_high"]
    out = rows[cols].copy()
    out["layer"] = out["layer"].astype(int)
    if has_ctrl:
        q = [p for p in effect.control_target.positions]
        out["control_own"] = nanmean(nanmean(effect.control.sink_score[:, :, q], axis=2), axis=0)
    out["primary"] = nanmean(effect.clean.sink_score[:, :, 0], axis=0)  # the clean primary sink, for scale
    med = _ordinary_median(effect.clean, exclude=[position])
    out["ordinary_median"] = med
    out["ratio"] = out["intervened"] / med
    first_seen = min(effect.target.layers) if effect.target.layers else effect.clean.n_layers
    iv_layers = set(intervention_layers(effect.intervention) or ())
    out["edited"] = out["layer"].isin(iv_layers)
    significant = out["did_ci_low"] > 0 if has_ctrl else out["ci_low"] > 0
    out["is_sink"] = (out["ratio"] >= sink_ratio) & significant & (out["layer"] >= first_seen)
    out.attrs.update(
        intervention=effect.spec, control=effect.control_spec, control_move=effect.metadata.get("control"),
        target_sink_score=effect.summary["target_sink_score"], sink_layers=out.loc[out["is_sink"], "layer"].tolist(),
        sink_ratio=sink_ratio, position=position,
    )
    return out


def summarize_plant(table: pd.DataFrame, layers: Sequence[int] | None = None) -> dict:
    """Mean over ``layers`` (default: the layers after the last edited one) of the table's scores."""
    if layers is None:
        edited = table.loc[table["edited"], "layer"]
        start = int(edited.max()) + 1 if len(edited) else 0
        layers = [l for l in table["layer"] if l >= start]
    sel = table[table["layer"].isin(list(layers))]
    out = {"layers": [int(l) for l in sel["layer"]], "sink_layers": table.attrs.get("sink_layers")}
    for col in ("clean", "intervened", "control", "did", "did_ci_low", "control_own", "ordinary_median", "primary"):
        if col in sel:
            out[col] = float(nanmean(np.asarray(sel[col], dtype=float)))  # all-NaN (a tiny model): NaN, no warning
    out["vs_clean"] = out["intervened"] / out["clean"] if out.get("clean") else float("nan")
    out["vs_primary"] = out["intervened"] / out["primary"] if out.get("primary") else float("nan")
    return out


# ============================================================================ secondary sinks


def secondary_sink_mlps(
    model,
    batch: TokenBatch,
    meas: SinkMeasurement | None = None,
    *,
    thresholds: anatomy.SecondaryThresholds | None = None,
    lookback: int = 1,
    min_score_ratio: float | None = None,
    sites: analyses.MLPSites | None = None,
    batch_size: int = 8,
    skip_first: int = 1,
) -> pd.DataFrame:
    """Locate, for every secondary sink, the MLP that writes it.

    The sinks are the ``kind == "secondary"`` rows of :func:`circuits.anatomy.secondary_sinks`
    (``min_score_ratio`` optionally keeps only those receiving that many times the median
    token's attention). For each, over the MLP layers ``start_layer - lookback .. start_layer``
    (at or just before the creation layer), the one whose output at the token
    (``hook_mlp_out``) has the largest |cos| with the primary-sink direction ``h_0^l`` of the
    same layer (:class:`circuits.analyses.MLPSiteMeter`'s ``cos_sink``) is chosen.
    ``skip_first``: positions excluded from detection, as in
    :func:`circuits.anatomy.secondary_sinks` (3 for a chat-templated input, as Wong et al.).

    Returns the secondary-sink table with ``mlp_layer``, ``mlp_cos`` (signed cosine of that MLP's
    output with ``h_0``), ``mlp_norm`` (its L2 norm) and ``cos_at_creation`` (the same cosine
    of the MLP at the creation layer itself). ``attrs`` holds the measurement used.
    """
    if meas is None:
        meas = measure(model, batch, batch_size=batch_size, progress=False)
    table = anatomy.secondary_sinks(meas, thresholds, skip_first=skip_first)
    table = table[table["kind"] == "secondary"]
    if min_score_ratio is not None:
        table = table[table["score_ratio"] >= min_score_ratio]
    table = table.reset_index(drop=True)
    if sites is None:
        meter = analyses.MLPSiteMeter(model)
        analyses.observe(model, batch, [meter], batch_size=batch_size)
        sites = meter.result()
    layer_col, cos_col, norm_col, created = [], [], [], []
    for s, p, c in zip(table["sequence"].astype(int), table["position"].astype(int), table["start_layer"].astype(int)):
        window = np.arange(max(0, c - lookback), c + 1)
        cosines = sites.cos_sink[s, window, p]
        best = int(window[int(np.nanargmax(np.abs(cosines)))])
        layer_col.append(best)
        cos_col.append(float(sites.cos_sink[s, best, p]))
        norm_col.append(float(sites.written_norm[s, best, p]))
        created.append(float(sites.cos_sink[s, c, p]))
    out = table.assign(mlp_layer=pd.Series(layer_col, dtype=int), mlp_cos=pd.Series(cos_col, dtype=float),
                       mlp_norm=pd.Series(norm_col, dtype=float), cos_at_creation=pd.Series(created, dtype=float))
    out.attrs["meas"] = meas
    out.attrs["lookback"] = lookback
    return out


def sink_edit(sinks: pd.DataFrame, mode: EditMode = "zero", **kwargs) -> TokenMLPEdit:
    """The :class:`TokenMLPEdit` of every row of :func:`secondary_sink_mlps` (its MLP, its token)."""
    return TokenMLPEdit(
        sequences=tuple(sinks["sequence"].astype(int)), layers=tuple(sinks["mlp_layer"].astype(int)),
        positions=tuple(sinks["position"].astype(int)), mode=mode, **kwargs,
    )


def _per_sink(meas: SinkMeasurement, sinks: pd.DataFrame, clean: SinkMeasurement, cos: float) -> pd.DataFrame:
    """Per sink, in ``meas``: score over its *clean* lifetime (mean, peak), max |cos| there, lifetime now."""
    rows = []
    for s, p in zip(sinks["sequence"].astype(int), sinks["position"].astype(int)):
        life = np.abs(clean.cos_to_first[s, :, p]) > cos  # the former lifetime, from the clean run
        sc = meas.sink_score[s, life, p]
        c = np.abs(meas.cos_to_first[s, :, p])
        rows.append(dict(score=float(np.nanmean(sc)), peak_score=float(np.nanmax(sc)), max_abs_cos=float(c[life].max()),
                         lifetime=int((c > cos).sum())))
    return pd.DataFrame(rows)


def _still_flagged(meas: SinkMeasurement, sinks: pd.DataFrame, thresholds: anatomy.SecondaryThresholds | None) -> np.ndarray:
    table = anatomy.secondary_sinks(meas, thresholds)
    live = set(zip(table.loc[table["kind"] == "secondary", "sequence"], table.loc[table["kind"] == "secondary", "position"]))
    return np.array([(int(s), int(p)) in live for s, p in zip(sinks["sequence"], sinks["position"])], dtype=bool)


def ablate_secondary_sinks(
    model,
    batch: TokenBatch,
    sinks: pd.DataFrame | None = None,
    *,
    mode: Literal["zero", "mean"] = "zero",
    control: str | Intervention | None = "random",
    seed: int = 0,
    thresholds: anatomy.SecondaryThresholds | None = None,
    n_resamples: int = 1000,
    batch_size: int = 8,
) -> tuple[pd.DataFrame, dict]:
    """Ablate each secondary sink's MLP at its token and check that the sink is gone.

    ``sinks`` is the table of :func:`secondary_sink_mlps` (computed when None). One
    :func:`~interventions.effect.measure_effect` run edits every sink's cell at once
    (:class:`TokenMLPEdit`, ``mode`` zero or mean); its random control moves each edited
    position to a random non-sink position of the same sequence and layer.

    Returns ``(per_sink, summary)``. ``per_sink`` has, for each sink, clean and ablated values
    of: ``score`` (mean sink score over the clean lifetime layers), ``peak_score``,
    ``max_abs_cos`` (largest |cos(h_t, h_0)| over those layers), ``lifetime`` (layers flagged
    now) and ``flagged`` (still a secondary sink by :func:`circuits.anatomy.secondary_sinks`);
    with a control, the same for the control run at the sink. ``summary``: ``n_sinks``,
    ``removed`` (fraction no longer flagged), ``control_removed``, mean clean and ablated
    score / |cos| / lifetime, the score ratio ablated / clean, the per-sink paired bootstrap CI
    of the score drop, and the effect's ``target_sink_score`` row.
    """
    if sinks is None:
        sinks = secondary_sink_mlps(model, batch, thresholds=thresholds, batch_size=batch_size)
    if sinks.empty:
        raise RecipeError("no secondary sink to ablate")
    th = thresholds or anatomy.SecondaryThresholds.for_depth(int(model.cfg.n_layers))
    effect = measure_effect(model, batch, sink_edit(sinks, mode), control=control, seed=seed, positions="target",
                            n_resamples=n_resamples, batch_size=batch_size)
    clean = _per_sink(effect.clean, sinks, effect.clean, th.cos).add_prefix("clean_")
    abl = _per_sink(effect.intervened, sinks, effect.clean, th.cos).add_prefix("ablated_")
    per = pd.concat([sinks[["sequence", "position", "token", "start_layer", "lifetime", "mlp_layer", "mlp_cos"]].reset_index(drop=True), clean, abl], axis=1)
    per["clean_flagged"] = _still_flagged(effect.clean, sinks, th)
    per["ablated_flagged"] = _still_flagged(effect.intervened, sinks, th)
    if effect.control is not None:
        ctrl = _per_sink(effect.control, sinks, effect.clean, th.cos).add_prefix("control_")
        per = pd.concat([per, ctrl], axis=1)
        per["control_flagged"] = _still_flagged(effect.control, sinks, th)
    drop = (per["clean_score"] - per["ablated_score"]).to_numpy()
    lo, hi = paired_bootstrap(drop, n_resamples=n_resamples, seed=seed)
    summary = {
        "n_sinks": len(per), "mode": mode, "intervention": effect.spec, "control": effect.control_spec,
        "removed": float(1 - per["ablated_flagged"].mean()),
        "clean_score": float(per["clean_score"].mean()), "ablated_score": float(per["ablated_score"].mean()),
        "score_ratio": float(per["ablated_score"].mean() / per["clean_score"].mean()),
        "score_drop_ci95": [float(lo[0]), float(hi[0])],
        "clean_max_abs_cos": float(per["clean_max_abs_cos"].mean()), "ablated_max_abs_cos": float(per["ablated_max_abs_cos"].mean()),
        "clean_lifetime": float(per["clean_lifetime"].mean()), "ablated_lifetime": float(per["ablated_lifetime"].mean()),
        "target_sink_score": effect.summary["target_sink_score"], "kl": effect.summary["kl"],
    }
    if effect.control is not None:
        summary.update(control_removed=float(1 - per["control_flagged"].mean()), control_score=float(per["control_score"].mean()),
                       control_move=effect.metadata.get("control"))
    return per, summary


def rescale_dose_response(
    model,
    batch: TokenBatch,
    sinks: pd.DataFrame | None = None,
    *,
    factors: Sequence[float] = (0.0, 0.25, 0.5, 1.0, 1.5, 2.0),
    scope: Literal["whole", "component"] = "whole",
    thresholds: anatomy.SecondaryThresholds | None = None,
    sweep_out: str | Path | None = None,
    batch_size: int = 8,
) -> dict:
    """Rescale each secondary sink's MLP output by ``factors`` and follow the sink's score and lifetime.

    Per factor ``f`` the MLP output of every sink's cell is multiplied by ``f``
    (:class:`TokenMLPEdit` ``mode="rescale"``; ``scope="whole"`` scales the whole output, i.e.
    sets its L2 norm to ``f`` times the clean one, as in Wong et al.'s norm intervention;
    ``"component"`` only its part along ``h_0^l``). The batch is re-measured with
    :func:`circuits.measure.measure` (the sweep table has no ``cos_to_first``, which the
    lifetime needs), and each sink's ``score``/``peak_score`` over its *clean* lifetime layers
    and its ``lifetime`` (layers with |cos(h_t, h_0)| above the detection threshold, from the
    intervened run) are read. ``f = 1`` is the clean run.

    With ``sweep_out`` the same grid also runs through :func:`interventions.sweep.sweep`
    (``grid={"strength": factors}``, prefix reuse; rows for the sink positions), stored there.

    Returns a dict: ``per_sink`` (one row per sink × factor), ``by_factor`` (means over sinks, with
    ``score_ratio`` and ``lifetime_ratio``: the mean score and lifetime over the clean run's),
    ``rho`` (Spearman's rho and p of factor vs score, peak score and lifetime, pooled over sink ×
    factor pairs, and of the per-factor means), ``sweep`` (the sweep table or None).
    """
    if sinks is None:
        sinks = secondary_sink_mlps(model, batch, thresholds=thresholds, batch_size=batch_size)
    if sinks.empty:
        raise RecipeError("no secondary sink to rescale")
    th = thresholds or anatomy.SecondaryThresholds.for_depth(int(model.cfg.n_layers))
    clean = sinks.attrs.get("meas")
    if clean is None or clean.token_ids != batch.token_ids:
        clean = measure(model, batch, batch_size=batch_size, progress=False)
    frames = []
    for f in factors:
        if float(f) == 1.0:
            meas = clean
        else:
            iv = sink_edit(sinks, "rescale", factor=float(f), scope=scope)
            meter = SinkMeter(model)  # no logits needed: the forward stops after the last block
            analyses.observe(model, batch, [meter], hooks=iv.hooks_for(model, batch), batch_size=batch_size)
            meas = meter.result()
        per = _per_sink(meas, sinks, clean, th.cos)
        per.insert(0, "factor", float(f))
        per.insert(1, "sink", np.arange(len(sinks)))
        per["flagged"] = _still_flagged(meas, sinks, th)
        frames.append(per)
    per_sink = pd.concat(frames, ignore_index=True)
    by_factor = per_sink.groupby("factor", as_index=False)[["score", "peak_score", "max_abs_cos", "lifetime", "flagged"]].mean()
    base = _per_sink(clean, sinks, clean, th.cos)
    by_factor["score_ratio"] = by_factor["score"] / base["score"].mean()
    by_factor["lifetime_ratio"] = by_factor["lifetime"] / base["lifetime"].mean()
    rho = {}
    for col in ("score", "peak_score", "lifetime"):
        pooled = spearmanr(per_sink["factor"], per_sink[col])
        means = spearmanr(by_factor["factor"], by_factor[col])
        rho[col] = {"pooled": float(pooled[0]), "pooled_p": float(pooled[1]), "means": float(means[0]), "means_p": float(means[1]),
                    "n_pooled": len(per_sink), "n_means": len(by_factor)}
    table = None
    if sweep_out is not None:
        template = sink_edit(sinks, "rescale", factor=1.0, scope=scope)
        table = sweep(model, batch, template, {"strength": [float(f) for f in factors]}, sweep_out, format="csv",
                      batch_size=batch_size, positions="target", n_resamples=1000, progress=False).frame
    return {"per_sink": per_sink, "by_factor": by_factor, "rho": rho, "sweep": table, "n_sinks": len(sinks), "scope": scope}


__all__ = [
    "DEFAULT_AMPLIFY_FACTOR",
    "DEFAULT_ISOLATE_LAYERS",
    "RecipeError",
    "ablate_secondary_sinks",
    "plant_intervention",
    "plant_sink",
    "plant_table",
    "rescale_dose_response",
    "secondary_sink_mlps",
    "sink_edit",
    "summarize_plant",
]

#: the name the issue uses (one call handles every sink of the batch)
ablate_secondary_sink = ablate_secondary_sinks
__all__.append("ablate_secondary_sink")
