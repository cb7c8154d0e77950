"""Residual-stream interventions: amplify the variance of chosen tokens' representations.

Why. Li et al. trace the sink to a *variance discrepancy*: the first token's representation
has a far larger spread over the model dimensions than later tokens' (it aggregates a
single value vector and carries massive activations). Their intervention (ii) amplifies the
variance of a chosen token's representation and checks that this alone plants a sink at that
token. :class:`AmplifyVariance` does that at one layer's residual stream.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal, get_args

from jaxtyping import Float
from torch import Tensor

from interventions.base import Hook, Intervention, RunContext, Sites, coerce_choice, coerce_float, coerce_int, coerce_ints
from interventions.registry import register

AmplifyMode = Literal["deviation", "norm"]
ResidualSite = Literal["resid_post", "resid_pre"]


@register("amplify-variance")
@dataclass(frozen=True)
class AmplifyVariance(Intervention):
    """Scale the spread of chosen tokens' residual vectors at one layer.

    Modes, for a token's residual ``h`` (a ``d_model`` vector) with mean ``μ`` over its
    dimensions:

    * ``"deviation"`` (default): ``h -> μ + factor · (h - μ)``. The token's variance over
      dimensions is multiplied by ``factor²`` (its standard deviation by ``factor``) while its
      mean is kept: the quantity Li et al. call the variance.
    * ``"norm"``: ``h -> factor · h``, the whole vector (mean included) is scaled.

    ``site="resid_post"`` (default) edits the block output of ``layer`` (``h^layer``, what
    ``circuits.measure`` reports for that layer), so the change is first seen by block
    ``layer + 1``; ``site="resid_pre"`` edits the input of block ``layer`` instead
    (``resid_pre`` of layer 0 is the embedding).
    """

    layer: int
    positions: tuple[int, ...]
    factor: float
    mode: AmplifyMode = "deviation"
    site: ResidualSite = "resid_post"

    strength_field = "factor"

    sites: ClassVar[Sites] = Sites(layers="layer", positions="positions")

    def __post_init__(self) -> None:
        object.__setattr__(self, "layer", coerce_int(self, "layer", self.layer))
        object.__setattr__(self, "positions", coerce_ints(self, "positions", self.positions, allow_none=False))
        object.__setattr__(self, "factor", coerce_float(self, "factor", self.factor, nonnegative=True))
        coerce_choice(self, "mode", self.mode, get_args(AmplifyMode))
        coerce_choice(self, "site", self.site, get_args(ResidualSite))

    @property
    def hook_name(self) -> str:
        return f"blocks.{self.layer}.hook_{self.site}"

    def hooks(self, model, ctx: RunContext) -> list[Hook]:
        positions, factor, mode = list(self.positions), self.factor, self.mode

        def hook(resid: Float[Tensor, "batch pos d_model"], hook) -> Tensor:
            h = resid[:, positions].float()
            if mode == "deviation":
                mean = h.mean(-1, keepdim=True)
                new = mean + factor * (h - mean)
            else:
                new = factor * h
            out = resid.clone()
            out[:, positions] = new.to(resid.dtype)
            return out

        return [(self.hook_name, hook)]


__all__ = ["AmplifyVariance"]

