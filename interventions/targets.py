"""Where an intervention is expected to act: the target its ``target_sink_score`` averages.

Why this module exists. A planted or removed sink is judged at the cells the intervention can
change, and no others: the positions it edits (position 0, the primary sink, when it edits
every position) over the layers from the first block whose attention it can change to the last.
:func:`target_of` states that rule once, for :func:`interventions.effect.measure_effect`, the
sweep and the random controls (each run is scored at its *own* target). The layers come from the
hook names the intervention actually registered
(:func:`interventions.hookpoints.first_affected_layer`), not from what it declares, so a user kind
gets the right target without saying anything more.

The checks here (:func:`check_target_positions`) run before any forward pass; an empty target
is explained, never a bare NaN (:func:`empty_target_note`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Sequence

import numpy as np
from jaxtyping import Float

from circuits.measure import SinkMeasurement
from circuits.probes import TokenBatch
from circuits.stats import nanmean
from interventions.base import Compose, Intervention, SiteRole, site_value
from interventions.hookpoints import first_affected_layer
from interventions.settings import EffectError


@dataclass(frozen=True)
class Target:
    """Where an intervention is expected to act: the cells its ``target_sink_score`` averages."""

    layers: tuple[int, ...]
    positions: tuple[int, ...]
    rule: str

    def to_dict(self) -> dict:
        return {"layers": list(self.layers), "positions": list(self.positions), "rule": self.rule}


def parts_of(iv: Intervention) -> tuple[Intervention, ...]:
    """The parts of a :class:`~interventions.base.Compose`, or the intervention alone."""
    return iv.parts if isinstance(iv, Compose) else (iv,)


def _site_union(iv: Intervention, role: SiteRole) -> tuple[int, ...] | None:
    found = {int(v) for part in parts_of(iv) for v in (site_value(part, role) or ())}
    return tuple(sorted(found)) or None


def intervention_positions(iv: Intervention) -> tuple[int, ...] | None:
    """The explicit positions (or attention queries, or keys: each kind's declared positions
    site, :class:`~interventions.base.Sites`) an intervention edits, over all its parts; None
    when no part names any (``positions=None`` means "every position")."""
    return _site_union(iv, "positions")


def intervention_layers(iv: Intervention) -> tuple[int, ...] | None:
    """The declared layers site over all parts (None when no part names layers)."""
    return _site_union(iv, "layers")


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


__all__ = [
    "Target",
    "check_target_positions",
    "empty_target_note",
    "first_affected_layer",
    "intervention_layers",
    "intervention_positions",
    "parts_of",
    "target_of",
    "target_sink_score",
]
