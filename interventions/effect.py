"""Clean run against intervened run: an :class:`Effect`, with its uncertainty and a random control.

Why this module exists. A causal claim ("ablating MLP 3 at position 5 removes the secondary
sink there") is a *difference* between two runs of the same sequences, and it is only worth
something with its uncertainty and next to a control. :func:`measure_effect` does exactly
"measure the clean run, measure the intervened run, compare" (``shared/architecture.md``):
both runs go through the same :class:`~circuits.measure.SinkMeter` hooks, the intervention only
adds its own hooks (:func:`interventions.base.hooks_for`), so the measurement never knows which
intervention ran. :func:`compare` turns the measurements into an :class:`Effect`; the sweep
(:mod:`interventions.sweep`) reuses it, so a sweep item and a single effect are the same table.
:func:`output_change` is the same pairing reduced to the next-token distribution only.

What an effect is made of lives next to what it belongs to; this module puts it together:

* :mod:`interventions.paired`: the paired runner (clean, intervened, KL while both logits exist);
* :mod:`interventions.settings`: the one set of defaults (:class:`EffectSettings`,
  :class:`RunSettings`) and :class:`EffectError`;
* :mod:`interventions.targets`: where an intervention is expected to act (:func:`target_of`);
* :mod:`interventions.moves`: :func:`vary`, :func:`relocated` and the seeded
  :func:`random_control` (same kind and strength, moved to a random non-sink position, a random
  other layer, or a random unit direction);
* :mod:`interventions.statistics`: the rows of :attr:`Effect.frame` (:data:`METRIC_TABLE`) and
  their paired bootstrap CIs, with the difference of differences against a control.

All positions are 0-based; position 0 is the papers' Sink_1. The names of those modules stay
importable from here, where notebooks and older code import them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal, Mapping, Sequence

import numpy as np
import pandas as pd
import torch
from jaxtyping import Float
from torch import Tensor

from circuits.checks import check_float
from circuits.measure import SinkMeasurement, SinkMeter, next_token_loss, provenance
from circuits.meter import SubBatch
from circuits.output import to_jsonable
from circuits.probes import TokenBatch, as_batch
from circuits.stats import MIN_SEQUENCES, paired_bootstrap, valid_positions
from interventions import registry
from interventions.base import Intervention, InterventionError, hooks_for, shortest_length
from interventions.moves import CONTROL_MODES, ControlMode, check_control, random_control, relocated, sink_positions, vary
from interventions.paired import Arm, PairedRunner, first_token_resid_hooks, kl_divergence
from interventions.settings import EffectError, EffectSettings, RunSettings, check_batch_size
from interventions.statistics import METRIC_TABLE, METRICS, Cells, Metric, RunView, metric_columns, summary_row
from interventions.targets import (
    Target,
    check_target_positions,
    empty_target_note,
    first_affected_layer,
    intervention_layers,
    intervention_positions,
    target_of,
    target_sink_score,
)

SCHEMA = "sinkscope.effect/1"


# --------------------------------------------------------------------------- the result


@dataclass
class Effect:
    """Clean vs intervened (and optionally control) statistics of the same sequences.

    Attributes:
        frame: the tidy table (see :func:`compare` for its columns).
        summary: the headline rows (target sink score, loss, KL, Sink_1^eps) as a dict.
        clean, intervened, control: the per-sequence measurements (``control`` may be None).
        kl, control_kl: ``[N, T]`` per-position KL(clean || run), NaN at pad positions.
        intervention, control_intervention: the interventions themselves (the control's is
            None without a control); :attr:`spec` and :attr:`control_spec` are their text specs.
        target, control_target: the cells each run's ``target_sink_score`` averages.
        metadata: provenance (model, BOS policy, versions), settings and the control's move.
    """

    frame: pd.DataFrame
    summary: dict
    clean: SinkMeasurement
    intervened: SinkMeasurement
    kl: np.ndarray
    intervention: Intervention
    target: Target
    control: SinkMeasurement | None = None
    control_kl: np.ndarray | None = None
    control_intervention: Intervention | None = None
    control_target: Target | None = None
    metadata: dict = field(default_factory=dict)

    @property
    def spec(self) -> str:
        """The intervention's text spec (``repr`` for an unregistered kind)."""
        return spec_text(self.intervention)

    @property
    def control_spec(self) -> str | None:
        return None if self.control_intervention is None else spec_text(self.control_intervention)

    def rows(self, metric: str) -> pd.DataFrame:
        """The rows of one metric."""
        return self.frame[self.frame["metric"] == metric].reset_index(drop=True)

    def to_json(self) -> dict:
        """The ``effect.json`` document (schema ``sinkscope.effect/1``), JSON-safe (NaN -> null)."""
        meta = dict(self.metadata)
        frame = self.frame.astype(object).where(self.frame.notna(), None)
        return to_jsonable(
            {
                "schema": SCHEMA,
                "model": self.clean.model,
                "prepend_bos": self.clean.prepend_bos,
                "positions": "0-based: position 0 is the first token (the papers' Sink_1)",
                "intervention": self.spec,
                "target": self.target.to_dict(),
                "control": None if self.control_spec is None else {
                    "spec": self.control_spec,
                    "target": self.control_target.to_dict() if self.control_target else None,
                    **meta.pop("control", {}),
                },
                "n_sequences": self.clean.n_sequences,
                "n_layers": self.clean.n_layers,
                "n_heads": self.clean.n_heads,
                "settings": meta.pop("settings", {}),
                "summary": self.summary,
                "rows": frame.to_dict(orient="records"),
                "token_ids": self.clean.token_ids,
                "tokens": self.clean.tokens,
                "versions": meta.pop("versions", {}),
                "metadata": meta,
            }
        )


def spec_text(iv: Intervention) -> str:
    """The text spec of ``iv`` (:func:`interventions.registry.spec`), or its ``repr`` when its
    kind is not registered (a class defined in a notebook without ``@register``)."""
    try:
        return registry.spec(iv)
    except InterventionError:
        return repr(iv)

def _settings(settings: EffectSettings | None, **given: Any) -> EffectSettings:
    """``settings``, or one built from the keyword arguments given (not None); never both."""
    given = {k: v for k, v in given.items() if v is not None}
    if settings is None:
        return EffectSettings(**given)
    if given:
        raise EffectError(f"pass either settings or {', '.join(sorted(given))}, not both")
    return settings

def compare(
    clean: SinkMeasurement,
    intervened: SinkMeasurement,
    *,
    target: Target,
    intervention: Intervention | str,
    kl: Float[np.ndarray, "seq pos"] | None = None,
    control: SinkMeasurement | None = None,
    control_kl: Float[np.ndarray, "seq pos"] | None = None,
    control_target: Target | None = None,
    control_intervention: Intervention | str | None = None,
    eps: float | None = None,
    layers: Sequence[int] | None = None,
    positions: Sequence[int] | Literal["target"] | None = None,
    confidence: float | None = None,
    n_resamples: int | None = None,
    seed: int | None = None,
    settings: EffectSettings | None = None,
    metadata: dict | None = None,
) -> Effect:
    """Compare two (or three) measurements of the same sequences and build an :class:`Effect`.

    ``frame`` columns: ``metric`` (one of :data:`METRICS`, rows in :data:`METRIC_TABLE` order),
    ``layer`` and ``position`` (nullable ints; NA for metrics aggregated over them), ``n``
    (sequences contributing), ``clean``, ``intervened``, ``delta`` (mean of per-sequence
    ``intervened - clean``), ``ci_low``/``ci_high`` (paired bootstrap CI of ``delta``); with a
    control also ``control``, ``control_delta``, ``did`` (difference of differences) and
    ``did_ci_low``/``did_ci_high``.

    ``eps``, ``layers``, ``positions``, ``confidence``, ``n_resamples``, ``seed``: the
    :class:`EffectSettings` (defaults 0.3, all, all, 0.95, 2000, 0), or ``settings`` holding
    them all (not both). ``layers``/``positions`` restrict the ``sink_score`` rows (and
    ``positions`` the ``sink_rate`` rows): None is all, ``"target"`` is position 0 plus the
    target positions of both runs. ``kl`` None (no logits) leaves the KL row NaN.
    """
    s = _settings(settings, eps=eps, layers=layers, positions=positions, confidence=confidence, n_resamples=n_resamples, seed=seed)
    if clean.sink_score.shape != intervened.sink_score.shape or clean.token_ids != intervened.token_ids:
        raise EffectError("the clean and intervened measurements are not of the same sequences")
    if control is not None and (control.sink_score.shape != clean.sink_score.shape or control_target is None):
        raise EffectError("the control measurement must cover the same sequences and come with its target")
    n, n_layers, width = clean.sink_score.shape
    has_ctrl = control is not None
    sel_pos = s.select_positions(width, [target.positions] + ([control_target.positions] if has_ctrl else []))
    cells = Cells(s.eps, s.select_layers(n_layers), sel_pos)
    unknown, zeros = np.full((n, width), np.nan), np.zeros((n, width))
    runs = {"clean": RunView(clean, target, zeros), "intervened": RunView(intervened, target, unknown if kl is None else kl)}
    if has_ctrl:
        runs["control"] = RunView(control, control_target, unknown if control_kl is None else control_kl)
        runs["control_clean"] = RunView(clean, control_target, zeros)

    frame = pd.concat([pd.DataFrame(metric_columns(m, cells, runs, s.bootstrap)) for m in METRIC_TABLE], ignore_index=True)
    frame["layer"] = frame["layer"].astype("Int64")
    frame["position"] = frame["position"].astype("Int64")
    frame["n"] = frame["n"].astype("int64")

    summary = {}
    for m in METRIC_TABLE:
        if m.summary is None:
            continue
        key, position = m.summary
        rows = frame[frame["metric"] == m.name]
        if position is not None:
            rows = rows[rows["position"] == position]
        if len(rows):
            summary[key] = summary_row(rows.iloc[0], has_ctrl)
    if summary.get("target_sink_score", {}).get("n") == 0:
        summary["target_sink_score"]["note"] = empty_target_note(target, int(clean.lengths.max()))
    for row in summary.values():  # a missing interval says why, in effect.json and in print
        if s.n_resamples and row["n"] and not np.isfinite(np.asarray(row["ci95"], dtype=float)).all():
            row["ci95_note"] = f"a confidence interval needs at least {MIN_SEQUENCES} sequences with a value (got {row['n']})"
    meta = {**(metadata or {}), "settings": {**(metadata or {}).get("settings", {}), **s.describe(cells.layers, cells.positions)}}
    return Effect(
        frame=frame, summary=summary, clean=clean, intervened=intervened, kl=np.asarray(runs["intervened"].kl),
        intervention=as_intervention(intervention), target=target, control=control,
        control_kl=None if control_kl is None else np.asarray(control_kl),
        control_intervention=None if control_intervention is None else as_intervention(control_intervention),
        control_target=control_target, metadata=meta,
    )


# --------------------------------------------------------------------------- running


def as_intervention(intervention: Intervention | str) -> Intervention:
    """An :class:`Intervention`, parsing a text spec (``"ablate-mlp:layer=3"``) if given one."""
    if isinstance(intervention, str):
        return registry.parse_spec(intervention)
    if not isinstance(intervention, Intervention):
        raise InterventionError(f"expected an Intervention or a spec string, got {type(intervention).__name__}")
    return intervention


@torch.no_grad()
def measure_effect(
    model,
    batch: TokenBatch | str | Sequence[str],
    intervention: Intervention | str,
    *,
    control: ControlMode | Intervention | None = None,
    eps: float = EffectSettings.eps,
    layers: Sequence[int] | None = EffectSettings.layers,
    positions: Sequence[int] | Literal["target"] | None = EffectSettings.positions,
    batch_size: int = RunSettings.batch_size,
    n_resamples: int = EffectSettings.n_resamples,
    confidence: float = EffectSettings.confidence,
    seed: int = EffectSettings.seed,
    flag_percent: float = 5.0,
    progress: bool = RunSettings.progress,
    metadata: dict | None = None,
) -> Effect:
    """Measure the clean run, measure the intervened run, compare.

    Args:
        batch: a :class:`~circuits.probes.TokenBatch` (or texts, tokenized with the model's
            native BOS policy).
        intervention: an :class:`Intervention` or a text spec. It is validated against the
            model and the batch before any forward pass.
        control: ``"random"``, ``"position"``, ``"layer"`` or ``"direction"`` for a seeded
            random control (:func:`random_control`), or an explicit control intervention.
        eps: threshold of Sink_k^eps.
        layers, positions: restrict the per-cell rows of the frame (see :func:`compare`).
        batch_size: sequences per forward pass.
        n_resamples, confidence, seed: the bootstrap (``n_resamples=0``: no CIs), and the seed of
            the random control.
        flag_percent: Sink_k^eps (percent) from which a position counts as a sink and is never
            a random control position.

    The defaults are those of :class:`~interventions.settings.EffectSettings` and
    :class:`~interventions.settings.RunSettings`. The paired runner
    (:meth:`interventions.paired.PairedRunner.together`) runs, per sub-batch, a clean forward
    and an intervened forward with the same :class:`~circuits.measure.SinkMeter` hooks;
    KL(clean || intervened) is computed while both logits exist. A control is the same pair of
    runs for the control intervention, after the clean measurement is complete (the control's
    position must avoid the positions the clean run flags as sinks).
    """
    iv = as_intervention(intervention)
    settings = EffectSettings(eps=eps, layers=layers, positions=positions, confidence=confidence, n_resamples=n_resamples, seed=seed)
    run = RunSettings(batch_size=batch_size, progress=progress)
    check_float(flag_percent, "flag_percent", low=0, high=100, error=EffectError)
    batch = as_batch(model, batch)
    factory = hooks_for(model, iv, batch)  # validates before any forward pass
    check_target_positions(intervention_positions(iv), batch)
    explicit_control = None
    if isinstance(control, Intervention):
        explicit_control = control
        hooks_for(model, control, batch)  # validate early
    elif control is not None:
        check_control(iv, control)
    n_layers = int(model.cfg.n_layers)
    settings.select_layers(n_layers)  # bad restrictions fail before any forward pass too
    if settings.positions != "target":
        settings.select_positions(int(batch.lengths.max()))
    meta = {**provenance(model, batch), **(metadata or {})}

    clean_meter, arm = SinkMeter(model), Arm(iv, factory, SinkMeter(model))
    PairedRunner(model, batch, run, desc="effect").together([arm], clean_meters=[clean_meter])
    clean, intervened = clean_meter.result(meta), arm.meter.result(meta)
    target = target_of(iv, arm.names, n_layers)

    ctrl_meas = ctrl_kl = ctrl_target = ctrl_iv = None
    if control is not None:
        if explicit_control is not None:
            ctrl_iv, info = explicit_control, {"mode": "explicit"}
        else:
            ctrl_iv, info = random_control(
                iv, clean, control, model=model, n_positions=shortest_length(batch), seed=seed, eps=eps, flag_percent=flag_percent
            )
        ctrl_factory = hooks_for(model, ctrl_iv, batch)
        ctrl_factory.shared = factory.shared  # reference statistics (means, sources) are shared
        ctrl = Arm(ctrl_iv, ctrl_factory, SinkMeter(model))
        PairedRunner(model, batch, run, desc="control").together([ctrl])
        ctrl_meas, ctrl_kl = ctrl.meter.result(meta), ctrl.kl
        ctrl_target = target_of(ctrl_iv, ctrl.names, n_layers)
        meta["control"] = info

    return compare(
        clean, intervened, target=target, intervention=iv, kl=arm.kl, control=ctrl_meas, control_kl=ctrl_kl,
        control_target=ctrl_target, control_intervention=ctrl_iv, settings=settings, metadata=meta,
    )


# ------------------------------------------------------------------------------ output change


@torch.no_grad()
def output_change(
    model,
    batch: TokenBatch,
    interventions: Mapping[str, Intervention],
    *,
    batch_size: int = RunSettings.batch_size,
    progress: bool = RunSettings.progress,
) -> pd.DataFrame:
    """What each intervention does to the next-token distribution, against the clean run.

    Per intervention (and the clean run, for reference): ``kl`` = mean over real positions
    of KL(clean ‖ intervened) in nats (:func:`kl_divergence`), ``loss`` =
    mean next-token loss (nats), ``delta_loss`` = intervened − clean, ``top1_agree`` = share of
    positions where the argmax token is unchanged; positions count where the next token is real.
    The paired runner (:meth:`interventions.paired.PairedRunner.together`) runs per sub-batch
    the clean forward, then each intervention's; only the clean logits and one intervened run's
    are alive at a time.
    """
    run = RunSettings(batch_size=batch_size, progress=progress)
    arms = [Arm(iv, hooks_for(model, iv, batch)) for iv in interventions.values()]
    names = ["clean", *interventions]
    sums = {name: np.zeros(4) for name in names}  # kl, loss, agree, count
    top: dict[str, Tensor] = {}

    def tally(name: str, sub: SubBatch, logits: Tensor, kl: Tensor) -> None:
        valid = valid_positions(sub.lengths, sub.tokens.shape[1], offset=1)  # t+1 is real
        nll = next_token_loss(logits, sub)
        agree = (logits.argmax(-1) == top["clean"]).float().cpu()
        sums[name] += [float(kl[valid].sum()), float(nll[valid].sum()), float(agree[valid].sum()), float(valid.sum())]

    def on_clean(sub: SubBatch, logits: Tensor) -> None:
        top["clean"] = logits.argmax(-1)
        tally("clean", sub, logits, torch.zeros(logits.shape[:2], dtype=torch.float64))

    def on_pair(sub: SubBatch, i: int, clean_logits: Tensor, logits: Tensor, kl: Tensor) -> None:
        tally(names[i + 1], sub, logits, kl)

    PairedRunner(model, batch, run, by_length=False, desc="output change").together(arms, on_clean=on_clean, on_pair=on_pair)
    rows = []
    base_loss = sums["clean"][1] / sums["clean"][3]
    for name, (kl, loss, agree, n) in sums.items():
        rows.append(dict(intervention=name, kl=kl / n, loss=loss / n, delta_loss=loss / n - base_loss, top1_agree=agree / n, n_tokens=int(n)))
    return pd.DataFrame(rows)


__all__ = [
    "CONTROL_MODES",
    "Cells",
    "Effect",
    "EffectError",
    "EffectSettings",
    "METRICS",
    "METRIC_TABLE",
    "Metric",
    "RunSettings",
    "RunView",
    "Target",
    "as_intervention",
    "check_batch_size",
    "check_control",
    "check_target_positions",
    "compare",
    "empty_target_note",
    "first_affected_layer",
    "first_token_resid_hooks",
    "intervention_layers",
    "intervention_positions",
    "kl_divergence",
    "measure_effect",
    "output_change",
    "paired_bootstrap",
    "random_control",
    "relocated",
    "sink_positions",
    "target_of",
    "target_sink_score",
    "vary",
]
