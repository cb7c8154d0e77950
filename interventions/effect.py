"""Clean run against intervened run: sink-score deltas, side effects, bootstrap CIs, random controls.

Why this module exists. A causal claim ("ablating MLP 3 at position 5 removes the secondary
sink there") is a *difference* between two runs of the same sequences, and it is only worth
something with its uncertainty and next to a control. :func:`measure_effect` does exactly
"measure the clean run, measure the intervened run, compare" (``shared/architecture.md``):
both runs go through the same :class:`~circuits.measure.SinkMeter` hooks, the intervention only
adds its own hooks (:func:`interventions.base.hooks_for`), so the measurement never knows which
intervention ran. :func:`compare` turns the two measurements into an :class:`Effect`; the sweep
(:mod:`interventions.sweep`) reuses it, so a sweep item and a single effect are the same table.

What is reported (all positions 0-based; position 0 is the papers' Sink_1), one row family per
entry of :data:`METRIC_TABLE` (a :class:`Metric`: how one run becomes per-sequence values, and
which cells they cover), with the summary settings in one :class:`EffectSettings`:

* ``sink_score`` per (layer, position): the mean attention a token receives from later queries,
  averaged over heads (:mod:`circuits.measure`), clean, intervened and their difference;
* ``sink_rate`` per position: Sink_k^eps in percent (thresholded per sequence, averaged over
  layers and heads; the ``layers`` restriction does not apply to it);
* ``target_sink_score``: the sink score of the intervention's *target* (:func:`target_of`):
  mean over the target positions and the layers the intervention can change;
* side effects: ``next_token_loss`` (mean over a sequence's real positions of
  -log p(next token)) and ``kl``, KL(clean || intervened) of the next-token distributions,
  per position, averaged over real positions. KL is computed per sub-batch while both logits
  exist; full logits are never stored.

Uncertainty: every row carries a 95 % bootstrap CI of its delta over *sequences*, paired (the
statistic is the mean of per-sequence deltas), with :func:`circuits.stats.paired_bootstrap`
(scipy's BCa, fixed seed; percentile where BCa is undefined). A delta that is identical in every sequence gets a
zero-width CI; fewer than :data:`circuits.stats.MIN_SEQUENCES` sequences give NaN, not a fake interval.

Random control (on request): the same intervention, same kind and strength, moved to a random
non-sink position, a random other layer, or a random unit direction (:func:`random_control`,
seeded). Each row then also reports the control's delta and the difference of differences
``(intervened - clean) - (control - clean)`` with its own paired CI. For the target row each run
is scored at its *own* target: planting at p is compared with planting at a random q.
"""

from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Literal, Mapping, Sequence

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
from circuits.stats import MIN_SEQUENCES, nanmean, paired_bootstrap, valid_positions
from interventions import registry
from interventions.base import (
    Compose,
    Intervention,
    InterventionError,
    SiteRole,
    hook_layer,
    hooks_for,
    shortest_length,
    site_value,
    sites_of,
)
from interventions.paired import Arm, PairedRunner, first_token_resid_hooks, kl_divergence
from interventions.settings import EffectError, EffectSettings, RunSettings, check_batch_size

SCHEMA = "sinkscope.effect/1"
CONTROL_MODES = ("random", "position", "layer", "direction")
ControlMode = Literal["random", "position", "layer", "direction"]

# Hooks of block l that sit after its attention pattern: an edit there first changes the
# attention (hence the sink score) of block l + 1. Anything else in block l (its input, ln1,
# q/k/v, scores, pattern) can change block l's own pattern.
_AFTER_PATTERN = (
    "attn.hook_z", "attn.hook_result", "attn.o.", "attn.hook_out", "hook_attn_out", "ln2", "hook_resid_mid",
    "hook_mlp_in", "mlp.", "hook_mlp_out", "hook_resid_post", "hook_out",
)


# --------------------------------------------------------------------------- targets


@dataclass(frozen=True)
class Target:
    """Where an intervention is expected to act: the cells its ``target_sink_score`` averages."""

    layers: tuple[int, ...]
    positions: tuple[int, ...]
    rule: str

    def to_dict(self) -> dict:
        return {"layers": list(self.layers), "positions": list(self.positions), "rule": self.rule}


def _parts(iv: Intervention) -> tuple[Intervention, ...]:
    return iv.parts if isinstance(iv, Compose) else (iv,)


def _site_union(iv: Intervention, role: SiteRole) -> tuple[int, ...] | None:
    found = {int(v) for part in _parts(iv) for v in (site_value(part, role) or ())}
    return tuple(sorted(found)) or None


def intervention_positions(iv: Intervention) -> tuple[int, ...] | None:
    """The explicit positions (or attention queries, or keys: each kind's declared positions
    site, :class:`~interventions.base.Sites`) an intervention edits, over all its parts; None
    when no part names any (``positions=None`` means "every position")."""
    return _site_union(iv, "positions")


def intervention_layers(iv: Intervention) -> tuple[int, ...] | None:
    """The declared layers site over all parts (None when no part names layers)."""
    return _site_union(iv, "layers")


def first_affected_layer(hook_names: Iterable[str]) -> int:
    """The first block whose attention pattern hooks named ``hook_names`` can change.

    An edit before or at block l's pattern (its input, ``ln1``, q/k/v, scores, the pattern
    itself) changes block l; an edit after it (``hook_z``, attention output, MLP, block output)
    first reaches block l + 1. Hooks outside the blocks (embedding) change block 0.
    """
    first = None
    for name in hook_names:
        layer = hook_layer(name)
        if layer < 0:
            layer_seen = 0
        else:
            rest = name.split(".", 2)[2] if name.count(".") >= 2 else ""
            layer_seen = layer + 1 if rest.startswith(_AFTER_PATTERN) else layer
        first = layer_seen if first is None else min(first, layer_seen)
    if first is None:
        raise EffectError("the intervention registered no hook")
    return first


def target_of(intervention: Intervention, hook_names: Iterable[str], n_layers: int) -> Target:
    """The target of an intervention, for its ``target_sink_score``.

    * positions: the positions (or attention queries) it edits; when it names none
      (``positions=None``, every position), position 0, the primary sink;
    * layers: from the first block whose attention it can change (:func:`first_affected_layer`)
      to the last. For a planted sink at p by an MLP edit at layer l: sink score at p over
      layers l+1..L-1. Empty when the edit comes after the last attention (score NaN).
    """
    names = list(hook_names)
    first = first_affected_layer(names)
    positions = intervention_positions(intervention)
    rule = "positions the intervention edits; layers from the first block whose attention it can change"
    if positions is None:
        positions = (0,)
        rule = "no explicit positions: position 0 (the primary sink); layers from the first block whose attention it can change"
    return Target(tuple(range(first, n_layers)), positions, rule)


def target_sink_score(meas: SinkMeasurement, target: Target) -> Float[np.ndarray, " seq"]:
    """Per sequence, the sink score averaged over the target's layers and positions."""
    if not target.layers:
        return np.full(meas.n_sequences, np.nan)
    cells = meas.sink_score[:, list(target.layers)][:, :, list(target.positions)]
    return nanmean(cells.reshape(meas.n_sequences, -1), axis=1)


# --------------------------------------------------------------------------- moving an intervention


def _as_tuple(value: Any) -> tuple:
    if isinstance(value, (list, tuple)):
        return tuple(value)
    if isinstance(value, np.ndarray):
        return tuple(value.tolist())
    return (value,)


def _init_fields(part: Intervention) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(part) if f.init} if dataclasses.is_dataclass(part) else {}


def _with_site(part: Intervention, role: SiteRole, values: tuple) -> Intervention:
    """``part`` with its ``role`` site set to ``values`` (one value for a single-int field)."""
    name = getattr(sites_of(part), role)
    if not isinstance(getattr(part, name), int):  # a tuple field (or None: every ...)
        return dataclasses.replace(part, **{name: tuple(values)})
    if len(values) != 1:
        raise InterventionError(f"{type(part).__name__}.{name}: takes one value, got {list(values)}")
    return dataclasses.replace(part, **{name: values[0]})


def _set_field(part: Intervention, key: str, value: Any) -> Intervention | None:
    """``part`` with ``key`` set, or None if it has no such field: ``strength`` is the kind's
    strength field, ``layer(s)``/``position(s)`` its declared sites, anything else a field name."""
    if key == "strength":
        return part.with_strength(value) if part.strength_name() is not None else None
    role = {"layer": "layers", "layers": "layers", "position": "positions", "positions": "positions"}.get(key)
    if role is not None:
        return None if getattr(sites_of(part), role) is None else _with_site(part, role, _as_tuple(value))
    if key in _init_fields(part):
        return dataclasses.replace(part, **{key: value})
    return None


def vary(intervention: Intervention, **changes: Any) -> Intervention:
    """A copy of ``intervention`` with fields set, for sweeps: ``vary(iv, layer=4, position=7, strength=2.0)``.

    ``layer``/``layers`` and ``position``/``positions`` set the kind's declared layers and
    positions sites (:class:`~interventions.base.Sites`), ``strength`` the strength field
    (:meth:`~interventions.base.Intervention.with_strength`); any other key is a field name.
    On a :class:`Compose` every part that has the field is changed. New values are checked like
    any field (:class:`InterventionError`).
    """
    parts = list(_parts(intervention))
    for key, value in changes.items():
        if key == "strength" and isinstance(intervention, Compose):
            parts = list(Compose(tuple(parts)).with_strength(value).parts)
            continue
        hit = False
        for i, part in enumerate(parts):
            new = _set_field(part, key, value)
            if new is not None:
                parts[i], hit = new, True
        if not hit:
            kinds = ", ".join(sorted({type(p).__name__ for p in parts}))
            raise InterventionError(f"{kinds}: cannot vary {key!r} (no such field)")
    return Compose(tuple(parts)) if isinstance(intervention, Compose) else parts[0]


def relocated(
    intervention: Intervention,
    *,
    positions: Mapping[int, int] | None = None,
    layers: Mapping[int, int] | None = None,
    direction: Sequence[float] | None = None,
) -> Intervention:
    """The same intervention moved: every edited position ``p`` becomes ``positions[p]``, every
    layer ``l`` becomes ``layers[l]``, and a fixed ``direction`` is replaced. Kind, strength and
    the number of edited cells stay the same (an equal-budget control)."""
    moves: list[tuple[SiteRole, Mapping[int, int]]] = []
    if positions:
        moves += [("positions", positions), ("keys", positions)]  # a key that is an edited position moves with it
    if layers:
        moves.append(("layers", layers))
    parts = []
    for part in _parts(intervention):
        for role, mapping in moves:
            values = site_value(part, role)
            if values is not None:
                part = _with_site(part, role, tuple(mapping.get(int(v), int(v)) for v in values))
        if direction is not None and site_value(part, "direction") is not None:
            part = _with_site(part, "direction", tuple(float(x) for x in direction))
        parts.append(part)
    return Compose(tuple(parts)) if isinstance(intervention, Compose) else parts[0]


def sink_positions(clean: SinkMeasurement, eps: float = 0.3, flag_percent: float = 5.0) -> tuple[int, ...]:
    """Positions the clean run flags as sinks, never used by a random control.

    Position 0 always; any position whose clean Sink_k^eps reaches ``flag_percent`` percent,
    or whose sequence-mean sink score reaches ``eps`` at some layer.
    """
    rate = clean.sink_rate(eps)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        peak = np.nanmax(clean.sink_score_mean(), axis=0)
    with np.errstate(invalid="ignore"):
        flagged = (rate >= flag_percent) | (peak >= eps)
    return tuple(sorted({0, *np.flatnonzero(flagged).tolist()}))


def _auto_mode(iv: Intervention) -> str:
    if any(site_value(p, "direction") is not None for p in _parts(iv)):
        return "direction"
    if intervention_positions(iv) is not None:
        return "position"
    return "layer"


def check_control(intervention: Intervention, mode: str) -> str:
    """The control mode ``mode`` resolves to for ``intervention``; raises :class:`EffectError`
    before any forward pass when the intervention has nothing that mode could move."""
    if mode not in CONTROL_MODES:
        raise EffectError(f"unknown control {mode!r}; choose one of {', '.join(CONTROL_MODES)}")
    chosen = _auto_mode(intervention) if mode == "random" else mode
    name = type(intervention).__name__
    if chosen == "direction" and _auto_mode(intervention) != "direction":
        raise EffectError(f"{name} has no fixed direction to replace; use a position or layer control")
    if chosen == "position" and intervention_positions(intervention) is None:
        raise EffectError(f"{name} names no positions (it edits every position); use a layer control")
    if chosen == "layer" and intervention_layers(intervention) is None:
        raise EffectError(f"{name} names no layers to move; use a position or direction control")
    return chosen


def random_control(
    intervention: Intervention,
    clean: SinkMeasurement,
    mode: ControlMode = "random",
    *,
    model,
    n_positions: int,
    seed: int = 0,
    eps: float = 0.3,
    flag_percent: float = 5.0,
    attempts: int = 100,
) -> tuple[Intervention, dict]:
    """An equal-budget random control of ``intervention``, and a description of the move.

    Modes: ``"position"`` moves the edited positions to as many random positions in
    ``1..n_positions-2`` that are neither edited nor flagged by :func:`sink_positions` (the
    last position has no later query, so no sink score); ``"layer"`` moves the layers to as many
    random other layers below the last one (an edit at the last layer has no later attention to
    show a sink); ``"direction"`` replaces a fixed ``direction`` by a random unit vector.
    ``"random"`` picks ``direction`` if the intervention has a fixed direction, else
    ``position`` if it names positions, else ``layer``. ``n_positions``: the shortest sequence.
    """
    chosen = check_control(intervention, mode)
    rng = np.random.default_rng(seed)
    info: dict[str, Any] = {"mode": chosen, "requested": mode, "seed": seed}
    name = type(intervention).__name__
    if chosen == "direction":
        d_model = int(model.cfg.d_model)
        v = rng.standard_normal(d_model)
        control = relocated(intervention, direction=(v / np.linalg.norm(v)).tolist())
        control.validate(model, n_positions)
        info["direction"] = "random unit vector (standard normal, normalised)"
        return control, info
    if chosen == "position":
        current = intervention_positions(intervention)
        flagged = sink_positions(clean, eps, flag_percent)
        candidates = [q for q in range(1, n_positions - 1) if q not in current and q not in flagged]
        info["excluded_positions"] = list(flagged)
        if len(candidates) < len(current):
            raise EffectError(
                f"no room for a position control: {len(current)} position(s) needed, {len(candidates)} non-sink "
                f"position(s) available in 1..{n_positions - 2} (flagged as sinks: {list(flagged)})"
            )
    else:
        current = intervention_layers(intervention)
        candidates = [l for l in range(int(model.cfg.n_layers) - 1) if l not in current]
        if len(candidates) < len(current):
            raise EffectError(f"no room for a layer control: {len(current)} layer(s) needed, {len(candidates)} other layer(s) available")
    # draw until the moved intervention is valid (e.g. a moved layer set that a kind rejects)
    for _ in range(attempts):
        pick = sorted(rng.choice(candidates, size=len(current), replace=False).tolist())
        mapping = dict(zip(current, pick))
        try:
            control = relocated(intervention, **({"positions": mapping} if chosen == "position" else {"layers": mapping}))
            control.validate(model, n_positions)
        except InterventionError:
            continue
        info["moved"] = {str(k): v for k, v in mapping.items()}
        return control, info
    raise EffectError(f"no valid random {chosen} control found for {name} in {attempts} draws")


# --------------------------------------------------------------------------- settings and metrics


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


def _block(metric: Metric, cells: Cells, runs: Mapping[str, RunView], boot: dict) -> dict[str, np.ndarray]:
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
    sel_pos = s.select_positions(width, [target] + ([control_target] if has_ctrl else []))
    cells = Cells(s.eps, s.select_layers(n_layers), sel_pos)
    unknown, zeros = np.full((n, width), np.nan), np.zeros((n, width))
    runs = {"clean": RunView(clean, target, zeros), "intervened": RunView(intervened, target, unknown if kl is None else kl)}
    if has_ctrl:
        runs["control"] = RunView(control, control_target, unknown if control_kl is None else control_kl)
        runs["control_clean"] = RunView(clean, control_target, zeros)

    frame = pd.concat([pd.DataFrame(_block(m, cells, runs, s.bootstrap)) for m in METRIC_TABLE], ignore_index=True)
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
            summary[key] = _summary_row(rows.iloc[0], has_ctrl)
    if summary.get("target_sink_score", {}).get("n") == 0:
        summary["target_sink_score"]["note"] = empty_target_note(target, int(clean.lengths.max()))
    for row in summary.values():  # a missing interval says why, in effect.json and in print
        if s.n_resamples and row["n"] and not np.isfinite(np.asarray(row["ci95"], dtype=float)).all():
            row["ci95_note"] = f"a confidence interval needs at least {MIN_SEQUENCES} sequences with a value (got {row['n']})"
    meta = {**(metadata or {}), "settings": {**(metadata or {}).get("settings", {}), **s.describe(cells)}}
    return Effect(
        frame=frame, summary=summary, clean=clean, intervened=intervened, kl=np.asarray(runs["intervened"].kl),
        intervention=as_intervention(intervention), target=target, control=control,
        control_kl=None if control_kl is None else np.asarray(control_kl),
        control_intervention=None if control_intervention is None else as_intervention(control_intervention),
        control_target=control_target, metadata=meta,
    )


def empty_target_note(target: Target, longest: int) -> str:
    """Why no sequence has a target sink score (said in the output and in effect.json, never NaN)."""
    if not target.layers:
        return ("no target sink score: the intervention acts after the last layer's attention, so no attention "
                "pattern can show its effect (the side effects, loss and KL, are measured)")
    return (f"no target sink score: no sequence has a token after the target position(s) "
            f"{list(target.positions)} (the longest has {longest} tokens), and a sink score is attention from later tokens")


def check_target_positions(positions: Sequence[int] | None, batch: TokenBatch) -> None:
    """Refuse, before any forward pass, an intervention whose target positions have no later
    token in any sequence: its target sink score would be empty (a sink score is the attention
    a token receives from later queries)."""
    chosen = (0,) if positions is None else tuple(positions)
    longest = int(batch.lengths.max())
    if chosen and min(chosen) >= longest - 1:
        raise EffectError(
            f"the intervention's target position(s) {list(chosen)} have no later token in any sequence (the longest has "
            f"{longest} tokens): a sink score is attention from later tokens; give longer texts (or a larger max_tokens) "
            "or target an earlier position")


def _summary_row(row: pd.Series, has_ctrl: bool) -> dict:
    out = {
        "clean": row["clean"], "intervened": row["intervened"], "delta": row["delta"],
        "ci95": [row["ci_low"], row["ci_high"]], "n": int(row["n"]),
    }
    if has_ctrl:
        out.update(control=row["control"], control_delta=row["control_delta"], did=row["did"], did_ci95=[row["did_ci_low"], row["did_ci_high"]])
    return out


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
