"""Clean run against intervened run: sink-score deltas, side effects, bootstrap CIs, random controls.

Why this module exists. A causal claim ("ablating MLP 3 at position 5 removes the secondary
sink there") is a *difference* between two runs of the same sequences, and it is only worth
something with its uncertainty and next to a control. :func:`measure_effect` does exactly
"measure the clean run, measure the intervened run, compare" (``shared/architecture.md``):
both runs go through the same :class:`~circuits.measure.SinkMeter` hooks, the intervention only
adds its own hooks (:func:`interventions.base.hooks_for`), so the measurement never knows which
intervention ran. :func:`compare` turns the two measurements into an :class:`Effect`; the sweep
(:mod:`interventions.sweep`) reuses it, so a sweep item and a single effect are the same table.

What is reported (all positions 0-based; position 0 is the papers' Sink_1):

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
statistic is the mean of per-sequence deltas), with :func:`scipy.stats.bootstrap` (BCa, fixed
seed; percentile where BCa is undefined). A delta that is identical in every sequence gets a
zero-width CI; fewer than :data:`MIN_SEQUENCES` sequences give NaN, not a fake interval.

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
from typing import Any, Iterable, Literal, Mapping, Sequence

import numpy as np
import pandas as pd
import torch
from jaxtyping import Bool, Float
from torch import Tensor
from tqdm.auto import tqdm

from circuits.errors import SinkscopeError
from circuits.measure import SinkMeasurement, SinkMeter, iter_batches, nanmean, next_token_loss, provenance
from circuits.probes import TokenBatch, tokenize
from interventions import registry
from interventions.base import (
    Compose,
    Intervention,
    InterventionError,
    SiteRole,
    checked_hooks,
    hook_layer,
    hooks_for,
    shortest_length,
    site_value,
    sites_of,
)

SCHEMA = "sinkscope.effect/1"
MIN_SEQUENCES = 3  # fewer sequences than this: no bootstrap CI (NaN)
CONTROL_MODES = ("random", "position", "layer", "direction")
ControlMode = Literal["random", "position", "layer", "direction"]

#: metric names of :attr:`Effect.frame`, in row order
METRICS = ("target_sink_score", "next_token_loss", "kl", "sink_rate", "sink_score")

# Hooks of block l that sit after its attention pattern: an edit there first changes the
# attention (hence the sink score) of block l + 1. Anything else in block l (its input, ln1,
# q/k/v, scores, pattern) can change block l's own pattern.
_AFTER_PATTERN = (
    "attn.hook_z", "attn.hook_result", "attn.o.", "attn.hook_out", "hook_attn_out", "ln2", "hook_resid_mid",
    "hook_mlp_in", "mlp.", "hook_mlp_out", "hook_resid_post", "hook_out",
)


class EffectError(SinkscopeError, ValueError):
    """A bad measurement setting (eps, positions to summarise, a control that cannot be placed)."""


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


def target_sink_score(meas: SinkMeasurement, target: Target) -> Float[np.ndarray, "seq"]:
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


# --------------------------------------------------------------------------- statistics


def paired_bootstrap(
    deltas: Float[np.ndarray, "seq cells"] | Float[np.ndarray, " seq"],
    *,
    confidence: float = 0.95,
    n_resamples: int = 2000,
    seed: int = 0,
) -> tuple[Float[np.ndarray, " cells"], Float[np.ndarray, " cells"]]:
    """Bootstrap CI over sequences of the mean of per-sequence deltas, for every column.

    NaN entries (a sequence that does not reach a position) are left out of that column.
    Columns with fewer than :data:`MIN_SEQUENCES` values get NaN; columns whose values are all
    equal get a zero-width interval at that value (nothing varies to resample). Others use
    ``scipy.stats.bootstrap`` (BCa, ``rng=seed``), vectorised over columns that share the same
    sequences, and the percentile method where BCa is undefined. ``n_resamples=0`` turns the
    intervals off (all NaN): for exploratory sweeps where only the means are read.
    """
    from scipy import stats

    data = np.asarray(deltas, dtype=np.float64)
    if data.ndim == 1:
        data = data[:, None]
    n, c = data.shape
    low, high = np.full(c, np.nan), np.full(c, np.nan)
    if n_resamples == 0:
        return low, high
    valid = ~np.isnan(data)
    patterns, group = np.unique(valid.T, axis=0, return_inverse=True)
    for g, rows in enumerate(patterns):
        cols = np.flatnonzero(group.ravel() == g)
        if rows.sum() < MIN_SEQUENCES:
            continue
        block = data[rows][:, cols]
        flat = np.ptp(block, axis=0) == 0
        low[cols[flat]] = high[cols[flat]] = block[0, flat]
        vary_cols, sample = cols[~flat], block[:, ~flat]
        if not len(vary_cols):
            continue
        batch = max(1, min(n_resamples, int(4e6 // max(1, sample.size))))
        for method in ("BCa", "percentile"):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                res = stats.bootstrap(
                    (sample,), np.mean, axis=0, vectorized=True, n_resamples=n_resamples, batch=batch,
                    confidence_level=confidence, method=method, rng=np.random.default_rng(seed),
                )
            lo, hi = np.atleast_1d(res.confidence_interval.low), np.atleast_1d(res.confidence_interval.high)
            ok = np.isfinite(lo) & np.isfinite(hi)
            pending = np.isnan(low[vary_cols])
            low[vary_cols[ok & pending]], high[vary_cols[ok & pending]] = lo[ok & pending], hi[ok & pending]
            if ok.all():
                break
            vary_cols, sample = vary_cols[~ok], sample[:, ~ok]
    return low, high


@torch.no_grad()
def kl_divergence(
    clean_logits: Float[Tensor, "batch pos vocab"],
    intervened_logits: Float[Tensor, "batch pos vocab"],
    valid: Bool[Tensor, "batch pos"],
) -> Float[Tensor, "batch pos"]:
    """KL(clean || intervened) of the next-token distributions at every position (nats).

    One sequence at a time in float64 (float32 loses the small KLs of mild interventions to
    rounding), so only a few ``[pos, vocab]`` temporaries exist; pad positions are NaN.
    Identical logits give exactly 0.
    """
    b, t = clean_logits.shape[:2]
    out = torch.full((b, t), torch.nan, dtype=torch.float64)
    for i in range(b):
        logp = torch.log_softmax(clean_logits[i].double(), dim=-1)
        logq = torch.log_softmax(intervened_logits[i].to(logp.device).double(), dim=-1)
        kl = (logp.exp() * (logp - logq)).sum(-1).clamp_min(0.0).cpu()
        out[i] = torch.where(valid[i, :t].cpu(), kl, torch.nan)
    return out


# --------------------------------------------------------------------------- the result


@dataclass
class Effect:
    """Clean vs intervened (and optionally control) statistics of the same sequences.

    Attributes:
        frame: the tidy table (see :func:`compare` for its columns).
        summary: the headline rows (target sink score, loss, KL, Sink_1^eps) as a dict.
        clean, intervened, control: the per-sequence measurements (``control`` may be None).
        kl, control_kl: ``[N, T]`` per-position KL(clean || run), NaN at pad positions.
        intervention, control_spec: text specs (``repr`` for unregistered kinds).
        target, control_target: the cells each run's ``target_sink_score`` averages.
        metadata: provenance (model, BOS policy, versions), settings and the control's move.
    """

    frame: pd.DataFrame
    summary: dict
    clean: SinkMeasurement
    intervened: SinkMeasurement
    kl: np.ndarray
    intervention: str
    target: Target
    control: SinkMeasurement | None = None
    control_kl: np.ndarray | None = None
    control_spec: str | None = None
    control_target: Target | None = None
    metadata: dict = field(default_factory=dict)

    def rows(self, metric: str) -> pd.DataFrame:
        """The rows of one metric."""
        return self.frame[self.frame["metric"] == metric].reset_index(drop=True)

    def to_json(self) -> dict:
        """The ``effect.json`` document (schema ``sinkscope.effect/1``), JSON-safe (NaN -> null)."""
        from circuits.output import to_jsonable

        meta = dict(self.metadata)
        frame = self.frame.astype(object).where(self.frame.notna(), None)
        return to_jsonable(
            {
                "schema": SCHEMA,
                "model": self.clean.model,
                "prepend_bos": self.clean.prepend_bos,
                "positions": "0-based: position 0 is the first token (the papers' Sink_1)",
                "intervention": self.intervention,
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


def _spec_text(iv: Intervention) -> str:
    try:
        return registry.spec(iv)
    except InterventionError:
        return repr(iv)


def _select_positions(positions, width: int, targets: Sequence[Target]) -> list[int]:
    if positions is None:
        return list(range(width))
    if isinstance(positions, str):
        if positions != "target":
            raise EffectError(f"positions must be None, 'target' or a list of positions; got {positions!r}")
        chosen = {0, *(p for t in targets for p in t.positions)}
    else:
        chosen = {int(p) for p in positions}
    bad = [p for p in chosen if not 0 <= p < width]
    if bad:
        raise EffectError(f"positions {sorted(bad)} are out of range; the longest sequence has {width} tokens")
    return sorted(chosen)


def _select_layers(layers, n_layers: int) -> list[int]:
    if layers is None:
        return list(range(n_layers))
    chosen = sorted({int(l) for l in layers})
    bad = [l for l in chosen if not 0 <= l < n_layers]
    if bad:
        raise EffectError(f"layers {bad} are out of range; the model has {n_layers} layers (0..{n_layers - 1})")
    return chosen


def _block(metric, layers, positions, clean, intervened, boot, control=None, control_clean=None) -> dict[str, np.ndarray]:
    """Columns for one metric: ``clean``/``intervened`` (and control) are ``[N, C]`` per-sequence values."""
    clean = np.asarray(clean, dtype=np.float64)
    intervened = np.asarray(intervened, dtype=np.float64)
    c = clean.shape[1]
    delta = intervened - clean
    lo, hi = paired_bootstrap(delta, **boot)
    out = {
        "metric": np.array([metric] * c, dtype=object),
        "layer": np.asarray(layers, dtype=object),
        "position": np.asarray(positions, dtype=object),
        "n": (~np.isnan(delta)).sum(0),
        "clean": nanmean(clean, axis=0),
        "intervened": nanmean(intervened, axis=0),
        "delta": nanmean(delta, axis=0),
        "ci_low": lo,
        "ci_high": hi,
    }
    if control is not None:
        control = np.asarray(control, dtype=np.float64)
        control_delta = control - np.asarray(control_clean, dtype=np.float64)
        did = delta - control_delta
        dlo, dhi = paired_bootstrap(did, **boot)
        out.update(
            control=nanmean(control, axis=0), control_delta=nanmean(control_delta, axis=0),
            did=nanmean(did, axis=0), did_ci_low=dlo, did_ci_high=dhi,
        )
    return out


def compare(
    clean: SinkMeasurement,
    intervened: SinkMeasurement,
    *,
    target: Target,
    intervention: str,
    kl: Float[np.ndarray, "seq pos"] | None = None,
    control: SinkMeasurement | None = None,
    control_kl: Float[np.ndarray, "seq pos"] | None = None,
    control_target: Target | None = None,
    control_spec: str | None = None,
    eps: float = 0.3,
    layers: Sequence[int] | None = None,
    positions: Sequence[int] | Literal["target"] | None = None,
    confidence: float = 0.95,
    n_resamples: int = 2000,
    seed: int = 0,
    metadata: dict | None = None,
) -> Effect:
    """Compare two (or three) measurements of the same sequences and build an :class:`Effect`.

    ``frame`` columns: ``metric`` (one of :data:`METRICS`), ``layer`` and ``position``
    (nullable ints; NA for metrics aggregated over them), ``n`` (sequences contributing),
    ``clean``, ``intervened``, ``delta`` (mean of per-sequence ``intervened - clean``),
    ``ci_low``/``ci_high`` (paired bootstrap CI of ``delta``); with a control also ``control``,
    ``control_delta``, ``did`` (difference of differences) and ``did_ci_low``/``did_ci_high``.

    ``layers``/``positions`` restrict the ``sink_score`` rows (and ``positions`` the
    ``sink_rate`` rows): None is all, ``"target"`` is position 0 plus the target positions of
    both runs. ``kl`` None (no logits) leaves the KL row NaN.
    """
    if clean.sink_score.shape != intervened.sink_score.shape or clean.token_ids != intervened.token_ids:
        raise EffectError("the clean and intervened measurements are not of the same sequences")
    if control is not None and (control.sink_score.shape != clean.sink_score.shape or control_target is None):
        raise EffectError("the control measurement must cover the same sequences and come with its target")
    if not 0 < eps < 1:
        raise EffectError(f"eps must be between 0 and 1, got {eps}")
    n, n_layers, width = clean.sink_score.shape
    boot = {"confidence": confidence, "n_resamples": n_resamples, "seed": seed}
    has_ctrl = control is not None
    sel_pos = _select_positions(positions, width, [target] + ([control_target] if has_ctrl else []))
    sel_layers = _select_layers(layers, n_layers)
    if kl is None:
        kl = np.full((n, width), np.nan)
    if has_ctrl and control_kl is None:
        control_kl = np.full((n, width), np.nan)

    blocks = []
    na = [None]
    # target sink score: each run at its own target
    t_clean, t_int = target_sink_score(clean, target), target_sink_score(intervened, target)
    ctrl = {}
    if has_ctrl:
        ctrl = dict(control=target_sink_score(control, control_target)[:, None],
                    control_clean=target_sink_score(clean, control_target)[:, None])
    blocks.append(_block("target_sink_score", na, na, t_clean[:, None], t_int[:, None], boot, **ctrl))
    # side effects
    loss = lambda m: nanmean(m.next_token_loss, axis=1)[:, None]  # noqa: E731
    if has_ctrl:
        ctrl = dict(control=loss(control), control_clean=loss(clean))
    blocks.append(_block("next_token_loss", na, na, loss(clean), loss(intervened), boot, **ctrl))
    zeros = np.zeros((n, 1))
    kl_seq = nanmean(np.asarray(kl, dtype=np.float64), axis=1)[:, None]
    if has_ctrl:
        ctrl = dict(control=nanmean(np.asarray(control_kl, dtype=np.float64), axis=1)[:, None], control_clean=zeros)
    blocks.append(_block("kl", na, na, zeros, kl_seq, boot, **ctrl))
    # Sink_k^eps per position (per sequence: percent of (layer, head) pairs with alpha > eps)
    rate = lambda m: 100.0 * m.sink_indicator(eps)[:, sel_pos]  # noqa: E731
    if has_ctrl:
        ctrl = dict(control=rate(control), control_clean=rate(clean))
    blocks.append(_block("sink_rate", na * len(sel_pos), sel_pos, rate(clean), rate(intervened), boot, **ctrl))
    # sink score per (layer, position)
    grid_l, grid_p = np.meshgrid(sel_layers, sel_pos, indexing="ij")
    cells = lambda m: m.sink_score[:, sel_layers][:, :, sel_pos].reshape(n, -1)  # noqa: E731
    if has_ctrl:
        ctrl = dict(control=cells(control), control_clean=cells(clean))
    blocks.append(_block("sink_score", grid_l.ravel().tolist(), grid_p.ravel().tolist(), cells(clean), cells(intervened), boot, **ctrl))

    frame = pd.concat([pd.DataFrame(b) for b in blocks], ignore_index=True)
    frame["layer"] = frame["layer"].astype("Int64")
    frame["position"] = frame["position"].astype("Int64")
    frame["n"] = frame["n"].astype("int64")

    summary = {}
    for metric in ("target_sink_score", "next_token_loss", "kl"):
        summary[metric] = _summary_row(frame[frame["metric"] == metric].iloc[0], has_ctrl)
    first = frame[(frame["metric"] == "sink_rate") & (frame["position"] == 0)]
    if len(first):
        summary["first_token_sink_rate"] = _summary_row(first.iloc[0], has_ctrl)
    settings = {
        "eps": eps, "confidence": confidence, "n_resamples": n_resamples, "seed": seed,
        "bootstrap": "off (n_resamples=0)" if n_resamples == 0 else
        "scipy.stats.bootstrap over sequences, paired (mean of per-sequence deltas), BCa",
        "layers": sel_layers if layers is not None else "all", "positions": sel_pos if positions is not None else "all",
    }
    meta = {**(metadata or {}), "settings": {**(metadata or {}).get("settings", {}), **settings}}
    return Effect(
        frame=frame, summary=summary, clean=clean, intervened=intervened, kl=np.asarray(kl), intervention=intervention,
        target=target, control=control, control_kl=None if control_kl is None else np.asarray(control_kl),
        control_spec=control_spec, control_target=control_target, metadata=meta,
    )


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


def first_token_resid_hooks(n_layers: int, into: dict[int, Tensor]) -> list[tuple[str, Any]]:
    """Hooks keeping ``h_0^l`` (block output at position 0) of every layer: the primary-sink
    directions an intervention's :class:`~interventions.base.RunContext` may need, taken from
    the clean run instead of a separate reference run."""

    def keep(layer: int):
        def hook(resid: Tensor, hook) -> None:
            into[layer] = resid[:, 0].detach().clone()

        return hook

    return [(f"blocks.{l}.hook_resid_post", keep(l)) for l in range(n_layers)]


def _check_settings(eps: float, confidence: float, n_resamples: int, batch_size: int) -> None:
    if not (isinstance(eps, (int, float)) and 0 < eps < 1):
        raise EffectError(f"eps must be between 0 and 1, got {eps!r}")
    if not (isinstance(confidence, (int, float)) and 0 < confidence < 1):
        raise EffectError(f"confidence must be between 0 and 1, got {confidence!r}")
    if isinstance(n_resamples, bool) or not isinstance(n_resamples, int) or n_resamples < 0:
        raise EffectError(f"n_resamples must be a non-negative integer (0: no CIs), got {n_resamples!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise EffectError(f"batch_size must be a positive integer, got {batch_size!r}")


@torch.no_grad()
def measure_effect(
    model,
    batch: TokenBatch | str | Sequence[str],
    intervention: Intervention | str,
    *,
    control: ControlMode | Intervention | None = None,
    eps: float = 0.3,
    layers: Sequence[int] | None = None,
    positions: Sequence[int] | Literal["target"] | None = None,
    batch_size: int = 8,
    n_resamples: int = 2000,
    confidence: float = 0.95,
    seed: int = 0,
    flag_percent: float = 5.0,
    progress: bool = False,
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

    Per sub-batch of :func:`~circuits.measure.iter_batches`: a clean forward and an intervened
    forward with the same :class:`~circuits.measure.SinkMeter` hooks; KL(clean || intervened)
    is computed while both logits exist. A control adds, per sub-batch, a clean forward (for
    its KL) and a control forward after the clean measurement is complete (the control's
    position must avoid the positions the clean run flags as sinks).
    """
    iv = as_intervention(intervention)
    _check_settings(eps, confidence, n_resamples, batch_size)
    if not isinstance(batch, TokenBatch):
        batch = tokenize(model, batch)
    if len(batch) == 0:
        raise EffectError("empty batch")
    factory = hooks_for(model, iv, batch)  # validates before any forward pass
    explicit_control = None
    if isinstance(control, Intervention):
        explicit_control = control
        hooks_for(model, control, batch)  # validate early
    elif control is not None:
        check_control(iv, control)
    n_layers = int(model.cfg.n_layers)
    width = int(batch.lengths.max())
    _select_layers(layers, n_layers)  # bad restrictions fail before any forward pass too
    if positions is not None and not isinstance(positions, str):
        _select_positions(positions, width, [])
    chunks = list(iter_batches(batch, batch_size))
    inverse = np.argsort(np.concatenate(chunks)).tolist()
    meta = {**provenance(model, batch), **(metadata or {})}

    clean_meter, int_meter = SinkMeter(model), SinkMeter(model)
    kl = np.full((len(batch), width), np.nan)
    names: set[str] = set()
    for chunk in tqdm(chunks, desc="effect", unit="batch", disable=not progress or len(chunks) < 2):
        sub = batch.select(chunk)
        firsts: dict[int, Tensor] = {}
        clean_logits = _measured_forward(model, sub, clean_meter, first_token_resid_hooks(n_layers, firsts))
        hooks = checked_hooks(model, iv, factory.context(sub, sink_directions=firsts))
        names.update(n for n, _ in hooks)
        int_logits = _measured_forward(model, sub, int_meter, hooks)
        kl[chunk, : sub.tokens.shape[1]] = kl_divergence(clean_logits, int_logits, sub.valid).numpy()
        del clean_logits, int_logits
    clean = clean_meter.result(meta).select(inverse)
    intervened = int_meter.result(meta).select(inverse)
    target = target_of(iv, names, n_layers)

    ctrl_meas = ctrl_kl = ctrl_target = ctrl_spec = None
    if control is not None:
        if explicit_control is not None:
            ctrl_iv, info = explicit_control, {"mode": "explicit"}
        else:
            ctrl_iv, info = random_control(
                iv, clean, control, model=model, n_positions=shortest_length(batch), seed=seed, eps=eps, flag_percent=flag_percent
            )
        ctrl_factory = hooks_for(model, ctrl_iv, batch)
        ctrl_factory.shared = factory.shared  # reference statistics (means, sources) are shared
        ctrl_meter, ctrl_names = SinkMeter(model), set()
        ctrl_kl = np.full((len(batch), width), np.nan)
        for chunk in tqdm(chunks, desc="control", unit="batch", disable=not progress or len(chunks) < 2):
            sub = batch.select(chunk)
            t = sub.tokens.shape[1]
            firsts = {l: torch.from_numpy(clean.first_resid[chunk, l]).to(model.cfg.device) for l in range(n_layers)}
            hooks = checked_hooks(model, ctrl_iv, ctrl_factory.context(sub, sink_directions=firsts))
            ctrl_names.update(n for n, _ in hooks)
            clean_logits = model(sub.tokens.to(model.cfg.device))
            ctrl_logits = _measured_forward(model, sub, ctrl_meter, hooks)
            ctrl_kl[chunk, :t] = kl_divergence(clean_logits, ctrl_logits, sub.valid).numpy()
            del clean_logits, ctrl_logits
        ctrl_meas = ctrl_meter.result(meta).select(inverse)
        ctrl_target = target_of(ctrl_iv, ctrl_names, n_layers)
        ctrl_spec = _spec_text(ctrl_iv)
        meta["control"] = info

    return compare(
        clean, intervened, target=target, intervention=_spec_text(iv), kl=kl, control=ctrl_meas, control_kl=ctrl_kl,
        control_target=ctrl_target, control_spec=ctrl_spec, eps=eps, layers=layers, positions=positions,
        confidence=confidence, n_resamples=n_resamples, seed=seed, metadata=meta,
    )


def _measured_forward(model, sub: TokenBatch, meter: SinkMeter, hooks) -> Tensor:
    """One full forward of ``sub`` with ``hooks`` (intervention first) and the meter's hooks."""
    meter.begin(sub)
    logits = model.run_with_hooks(sub.tokens.to(model.cfg.device), fwd_hooks=[*hooks, *meter.hooks()], return_type="logits")
    meter.end(logits)
    return logits


# ------------------------------------------------------------------------------ output change


@torch.no_grad()
def output_change(
    model,
    batch: TokenBatch,
    interventions: Mapping[str, Intervention],
    *,
    batch_size: int = 4,
) -> pd.DataFrame:
    """What each intervention does to the next-token distribution, against the clean run.

    Per intervention (and the clean run, for reference): ``kl`` = mean over real positions
    of KL(clean ‖ intervened) in nats (:func:`kl_divergence`), ``loss`` =
    mean next-token loss (nats), ``delta_loss`` = intervened − clean, ``top1_agree`` = share of positions where the argmax token is
    unchanged. Sub-batch by sub-batch: only one sub-batch's logits are alive at a time.
    """
    factories = {name: hooks_for(model, iv, batch) for name, iv in interventions.items()}
    sums = {name: np.zeros(4) for name in ["clean", *factories]}  # kl, loss, agree, count
    for start in range(0, len(batch), batch_size):
        sub = batch.select(slice(start, start + batch_size))
        valid = torch.arange(sub.tokens.shape[1])[None, :] < (sub.lengths[:, None] - 1)  # t+1 is real
        clean = model(sub.tokens, return_type="logits")
        clean_top = clean.argmax(-1)
        for name in sums:
            logits = clean if name == "clean" else model.run_with_hooks(sub.tokens, fwd_hooks=factories[name](sub), return_type="logits")
            kl = kl_divergence(clean, logits, valid)
            nll = next_token_loss(logits, sub)
            agree = (logits.argmax(-1) == clean_top).float().cpu()
            sums[name] += [float(kl[valid].sum()), float(nll[valid].sum()), float(agree[valid].sum()), float(valid.sum())]
            del logits
        del clean
    rows = []
    base_loss = sums["clean"][1] / sums["clean"][3]
    for name, (kl, loss, agree, n) in sums.items():
        rows.append(dict(intervention=name, kl=kl / n, loss=loss / n, delta_loss=loss / n - base_loss, top1_agree=agree / n, n_tokens=int(n)))
    return pd.DataFrame(rows)


__all__ = [
    "CONTROL_MODES",
    "Effect",
    "EffectError",
    "METRICS",
    "Target",
    "as_intervention",
    "check_control",
    "compare",
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
