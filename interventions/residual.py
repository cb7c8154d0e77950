"""Variance amplification (Li et al., intervention (ii)): scale a token's deviation from a mean.

Why. Li et al. trace the sink to a *variance discrepancy*: the first token's attention output
aggregates a single value vector (``o_0 = v_0``), so it is far more spread out than the
averages later tokens aggregate. Their intervention (ii) amplifies the attention output of a
chosen token ``k`` (``k = 10`` in the paper), ``o'_k = mu + lambda (o_k - mu)``, and finds
that this alone makes ``k`` a sink, while plain scaling ``lambda o_k`` (their control) does
not. :class:`AmplifyVariance` does that edit at the paper's site, and at the residual-stream
sites the toolkit used before.

Where (``site``). The paper does not say whether ``o`` is a head's output before ``W_O`` or
the block output after it, nor what ``mu`` averages over; both are parameters here:

* ``"attn_out"`` (default): the attention block's output after ``W_O``, before the residual
  add (``blocks.L.hook_attn_out``; on Gemma 3 that is after the post-attention norm, i.e.
  exactly what is added to the residual);
* ``"z"``: each head's value aggregation before ``W_O`` (``blocks.L.attn.hook_z``,
  ``[batch, pos, head, d_head]``), edited head by head;
* ``"resid_post"`` / ``"resid_pre"``: the residual stream after / before block ``L``. The
  next block reads it through RMSNorm, which divides a change of scale away, so there the
  edit is expected to do little (measured on smollm2-135m: nothing; see the real-model tests).

What ``mu`` is (``mu``): ``"positions"`` (default) — the mean of the same activation over the
same sequence's real (non-pad) positions at that layer, the edited positions included (for
``z``: per head); ``"dims"`` — the mean of the token's own vector over its dimensions (over
``d_head`` for ``z``), the toolkit's earlier choice, which keeps the token's mean and multiplies
its standard deviation over dimensions by ``factor``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal, get_args

import torch
from jaxtyping import Float
from torch import Tensor

from interventions.base import (
    Hook,
    Intervention,
    RunContext,
    Sites,
    check_hook_name,
    coerce_choice,
    coerce_float,
    coerce_ints,
)
from interventions.registry import register

AmplifyMode = Literal["deviation", "norm"]
AmplifySite = Literal["attn_out", "z", "resid_post", "resid_pre"]
AmplifyMean = Literal["positions", "dims"]
#: kept for callers of the first version (residual sites only)
ResidualSite = Literal["resid_post", "resid_pre"]

_HOOKS: dict[str, str] = {
    "attn_out": "blocks.{layer}.hook_attn_out",
    "z": "blocks.{layer}.attn.hook_z",
    "resid_post": "blocks.{layer}.hook_resid_post",
    "resid_pre": "blocks.{layer}.hook_resid_pre",
}


def amplified(
    x: Float[Tensor, "batch pos *feature"],
    positions: list[int],
    factor: float,
    mode: AmplifyMode,
    mu: AmplifyMean,
    valid: torch.Tensor | None,
) -> Float[Tensor, "batch pos *feature"]:
    """``x`` with ``positions`` replaced by ``mu + factor (x - mu)`` (``mode="deviation"``) or
    ``factor x`` (``mode="norm"``); every other position unchanged.

    ``x`` is ``[batch, pos, d]`` or ``[batch, pos, head, d_head]``; the last axis is the one
    ``mu="dims"`` averages over. ``mu="positions"`` averages over the positions where ``valid``
    (``[batch, pos]``) is True, separately per sequence (and head). Computed in float32.
    """
    h = x[:, positions].float()
    if mode == "norm":
        new = factor * h
    else:
        if mu == "dims":
            mean = h.mean(-1, keepdim=True)
        else:
            xf = x.float()
            w = valid[:, : x.shape[1]].to(xf.dtype).reshape(x.shape[0], x.shape[1], *([1] * (x.dim() - 2)))
            mean = (xf * w).sum(1, keepdim=True) / w.sum(1, keepdim=True).clamp_min(1)
        new = mean + factor * (h - mean)
    out = x.clone()
    out[:, positions] = new.to(x.dtype)
    return out


@register("amplify-variance")
@dataclass(frozen=True)
class AmplifyVariance(Intervention):
    """Amplify chosen tokens' deviation from a mean at one site of chosen layers (Li et al. (ii)).

    For a token's vector ``o`` at ``site`` of each layer in ``layers``:

    * ``mode="deviation"`` (default): ``o -> mu + factor · (o - mu)``, Li et al.'s edit;
    * ``mode="norm"``: ``o -> factor · o``, their plain-scaling control (``mu`` unused).

    ``site`` (default ``"attn_out"``, the block's attention output after ``W_O``), ``mu``
    (default ``"positions"``, the mean over the sequence's real positions) and the hook each
    site edits are described in the module docstring. Layers are edited in order, each seeing
    the earlier layers' edits. Spec: ``amplify-variance:site=attn_out,layers=0-2,positions=10,factor=8``
    (``layer=2`` is read as ``layers=2``).
    """

    layers: tuple[int, ...]
    positions: tuple[int, ...]
    factor: float
    mode: AmplifyMode = "deviation"
    site: AmplifySite = "attn_out"
    mu: AmplifyMean = "positions"

    strength_field = "factor"

    sites: ClassVar[Sites] = Sites(layers="layers", positions="positions")

    def __post_init__(self) -> None:
        object.__setattr__(self, "layers", coerce_ints(self, "layers", self.layers, allow_none=False))
        object.__setattr__(self, "positions", coerce_ints(self, "positions", self.positions, allow_none=False))
        object.__setattr__(self, "factor", coerce_float(self, "factor", self.factor, nonnegative=True))
        coerce_choice(self, "mode", self.mode, get_args(AmplifyMode))
        coerce_choice(self, "site", self.site, get_args(AmplifySite))
        coerce_choice(self, "mu", self.mu, get_args(AmplifyMean))

    def hook_name(self, layer: int) -> str:
        """The hook this intervention edits at ``layer``."""
        return _HOOKS[self.site].format(layer=layer)

    def validate(self, model, n_positions: int | None = None) -> None:
        super().validate(model, n_positions)
        for layer in self.layers:
            check_hook_name(self, "site", self.hook_name(layer), model)

    def hooks(self, model, ctx: RunContext) -> list[Hook]:
        positions, factor, mode, mu = list(self.positions), self.factor, self.mode, self.mu
        valid = ctx.batch.valid.to(model.cfg.device)

        def hook(x: Float[Tensor, "batch pos *feature"], hook) -> Tensor:
            return amplified(x, positions, factor, mode, mu, valid)

        return [(self.hook_name(layer), hook) for layer in self.layers]


__all__ = ["AmplifyMean", "AmplifyMode", "AmplifySite", "AmplifyVariance", "ResidualSite", "amplified"]
