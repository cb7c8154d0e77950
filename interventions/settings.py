"""How a paired run is done and how its effect is summarised: the one set of defaults.

Why this module exists. :func:`interventions.effect.measure_effect`,
:func:`interventions.sweep.sweep` and :func:`interventions.effect.output_change` all run the same
thing, a clean run and intervened runs of the same sequences (:mod:`interventions.paired`), and
the first two summarise it the same way (:func:`interventions.effect.compare`). Their defaults
are written once, here, as the defaults of two frozen dataclasses; the public functions take the
fields as keyword arguments whose defaults *are* these class attributes, so they cannot drift
apart again:

* :class:`RunSettings`: how the forwards are batched and shown (``batch_size``, ``progress``);
* :class:`EffectSettings`: how an effect is summarised (``eps``, the cells of the per-cell rows,
  the paired bootstrap).

Both check their values when built, so a bad setting raises :class:`EffectError` before any
forward pass.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Sequence

from circuits.checks import check_eps, check_float, check_int
from circuits.driver import BATCH_SIZE
from circuits.errors import SinkscopeError


class EffectError(SinkscopeError, ValueError):
    """A bad measurement setting (eps, positions to summarise, a control that cannot be placed)."""


def check_batch_size(batch_size: int) -> int:
    """``batch_size`` as an int: sequences per forward pass, a positive integer (else :class:`EffectError`)."""
    return check_int(batch_size, "batch_size", error=EffectError)


@dataclass(frozen=True)
class RunSettings:
    """How the paired forwards are run: ``batch_size`` sequences per forward pass (stacked copies
    included in a sweep), and whether a progress bar is shown (the command line turns it on)."""

    batch_size: int = BATCH_SIZE
    progress: bool = False

    def __post_init__(self) -> None:
        check_batch_size(self.batch_size)
        if not isinstance(self.progress, bool):
            raise EffectError(f"progress must be True or False, got {self.progress!r}")


@dataclass(frozen=True)
class EffectSettings:
    """How an effect is summarised: one object for :func:`~interventions.effect.measure_effect`,
    :func:`~interventions.effect.compare` and :func:`~interventions.sweep.sweep`.

    ``eps``: threshold of Sink_k^eps. ``layers``, ``positions``: the cells of the per-cell rows
    (None: all; ``positions="target"``: position 0 and every run's target positions).
    ``confidence``, ``n_resamples`` (0: no CIs) and ``seed``: the paired bootstrap (``seed`` also
    seeds a random control). The public functions keep these as keyword arguments and build this
    object from them; it checks the values when built, so a bad setting fails before any forward
    pass.
    """

    eps: float = 0.3
    layers: tuple[int, ...] | None = None
    positions: tuple[int, ...] | Literal["target"] | None = None
    confidence: float = 0.95
    n_resamples: int = 2000
    seed: int = 0

    def __post_init__(self) -> None:
        check_eps(self.eps, "eps", error=EffectError)
        check_float(self.confidence, "confidence", low=0, high=1, low_open=True, high_open=True, error=EffectError)
        check_int(self.n_resamples, "n_resamples", minimum=0, error=EffectError, rule="a non-negative integer (0: no CIs)")
        check_int(self.seed, "seed", minimum=0, error=EffectError, rule="a non-negative integer (numpy's seeds are)")
        if self.layers is not None:
            object.__setattr__(self, "layers", tuple(int(l) for l in self.layers))
        if isinstance(self.positions, str):
            if self.positions != "target":
                raise EffectError(f"positions must be None, 'target' or a list of positions; got {self.positions!r}")
        elif self.positions is not None:
            object.__setattr__(self, "positions", tuple(int(p) for p in self.positions))

    @property
    def bootstrap(self) -> dict:
        """The keyword arguments of :func:`circuits.stats.paired_bootstrap`."""
        return {"confidence": self.confidence, "n_resamples": self.n_resamples, "seed": self.seed}

    def select_layers(self, n_layers: int) -> list[int]:
        """The layers of the per-cell rows, sorted; out-of-range layers raise :class:`EffectError`."""
        if self.layers is None:
            return list(range(n_layers))
        chosen = sorted(set(self.layers))
        bad = [l for l in chosen if not 0 <= l < n_layers]
        if bad:
            raise EffectError(f"layers {bad} are out of range; the model has {n_layers} layers (0..{n_layers - 1})")
        return chosen

    def select_positions(self, width: int, target_positions: Sequence[Sequence[int]] = ()) -> list[int]:
        """The positions of the per-cell rows, sorted (``"target"``: 0 and the positions of every
        run's target, :attr:`interventions.targets.Target.positions`)."""
        if self.positions is None:
            return list(range(width))
        chosen = {0, *(p for t in target_positions for p in t)} if self.positions == "target" else set(self.positions)
        bad = [p for p in chosen if not 0 <= p < width]
        if bad:
            raise EffectError(f"positions {sorted(bad)} are out of range; the longest sequence has {width} tokens")
        return sorted(chosen)

    def describe(self, layers: Sequence[int], positions: Sequence[int]) -> dict:
        """The ``settings`` of ``effect.json``, with the selected ``layers`` and ``positions``."""
        return {
            "eps": self.eps, "confidence": self.confidence, "n_resamples": self.n_resamples, "seed": self.seed,
            "bootstrap": "off (n_resamples=0)" if self.n_resamples == 0 else
            "scipy.stats.bootstrap over sequences, paired (mean of per-sequence deltas), BCa",
            "layers": list(layers) if self.layers is not None else "all",
            "positions": list(positions) if self.positions is not None else "all",
        }


__all__ = ["EffectError", "EffectSettings", "RunSettings", "check_batch_size"]
