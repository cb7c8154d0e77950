"""Moving an intervention: set its fields for a sweep, relocate it, draw a random control.

Why this module exists. A sweep varies one intervention over a grid (:func:`vary`), and a
causal claim needs an equal-budget control: the same kind and strength, moved to a random
non-sink position, a random other layer, or a random unit direction (:func:`random_control`,
seeded; :func:`relocated` does the move). All three read *which fields* to set from the
intervention's declared sites (:class:`~interventions.base.Sites`: the fields that hold its layers
and positions), so a new kind with its own field names is moved without an edit here; where it
acts is read from its hooks (:mod:`interventions.hookpoints`). A control that cannot be placed raises
:class:`~interventions.settings.EffectError` before any forward pass (:func:`check_control`).
"""

from __future__ import annotations

import dataclasses
import warnings
from typing import Any, Literal, Mapping, Sequence

import numpy as np

from circuits.measure import SinkMeasurement
from interventions.base import Compose, Intervention, InterventionError, SiteRole, site_value, sites_of
from interventions.settings import EffectError
from interventions.targets import intervention_layers, intervention_positions, parts_of

CONTROL_MODES = ("random", "position", "layer", "direction")
ControlMode = Literal["random", "position", "layer", "direction"]


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
    parts = list(parts_of(intervention))
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
    for part in parts_of(intervention):
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
    if any(site_value(p, "direction") is not None for p in parts_of(iv)):
        return "direction"
    if intervention_positions(iv) is not None:
        return "position"
    return "layer"


def check_control(intervention: Intervention, mode: str) -> str:
    """The control mode ``mode`` resolves to for ``intervention``; raises :class:`~interventions.settings.EffectError`
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


__all__ = ["CONTROL_MODES", "ControlMode", "check_control", "random_control", "relocated", "sink_positions", "vary"]
