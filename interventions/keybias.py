"""The sink as a key bias (Gu et al.): zero its value, replace it by the mean value, or take its attention away.

Why these two. Gu et al. argue that the sink *stores attention mass* while its value vector
contributes little to the heads' outputs, much like a learnable key bias with zero value. Two
edits separate the two roles:

* :class:`ZeroSinkValue` — later queries read a zero value from the sink position(s) at
  chosen layers: the sink keeps the attention mass it receives, but that mass now carries
  nothing (its column of the pattern is zeroed *without* renormalising). If the sink is a key
  bias, the outputs barely change.
* :class:`MeanSinkValue` — the sink's value vector is replaced by the mean value of the
  sequence's *other real* tokens at that layer (per kv head). It answers the objection that a
  zero value is out of distribution: the mass the sink holds now carries an ordinary value.
* :class:`DropSinkAttention` — no later query may attend to the sink position(s): their
  scores are set to the model's mask value before the softmax, so the mass the sink held is
  *renormalised* over the other keys. If the sink is a key bias, this is what hurts: the
  spare mass lands on tokens whose values do carry content.

Both act on every head of the chosen layers (``layers=None``: all layers). Positions are
0-based; the default is the first token, position 0.

The two differ only in the renormalisation: both take the sink's column away from later
queries, one leaving the rows summing to 1 − A[t, k], the other renormalising them to 1.

Hook points: ``blocks.L.attn.hook_pattern`` (post-softmax) and ``blocks.L.attn.hook_attn_scores``
(pre-softmax), both ``[batch, head, query, key]``; with ``include_self=True``,
``blocks.L.attn.hook_v`` (``[batch, pos, kv_head, d_head]``). The bridge recomputes attention
from these hooks, so the edits reach ``hook_z`` and the logits (checked by
tests/test_analyses.py on tiny Llama, Gemma 3 and GPT-2 models).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from jaxtyping import Float
from torch import Tensor

from interventions.base import Hook, Intervention, RunContext, Sites, coerce_bool, coerce_ints
from interventions.registry import register


def _layers(layers: tuple[int, ...] | None, model) -> tuple[int, ...]:
    return tuple(range(int(model.cfg.n_layers))) if layers is None else layers


@register("zero-sink-value")
@dataclass(frozen=True)
class ZeroSinkValue(Intervention):
    """Later queries read nothing from ``positions`` (default the first token) at ``layers``
    (None: all): the sink keeps its attention mass but its value contributes zero.

    Implemented on the attention pattern (``hook_pattern``): the column of each position is
    set to 0 for every strictly later query, *without* renormalising, which is exactly
    ``v_k = 0`` as seen by those queries. The sink token's own row is untouched, so its own
    representation (and its massive activations) stay those of the clean run; zeroing
    ``v_k`` itself would also zero the first token's attention output at every layer and so
    change the sink's own hidden state — set ``include_self=True`` for that stronger edit
    (``hook_v`` is then zeroed at the positions, for every query).
    """

    layers: tuple[int, ...] | None = None
    positions: tuple[int, ...] = (0,)
    include_self: bool = False

    sites: ClassVar[Sites] = Sites(layers="layers", positions="positions")

    def __post_init__(self) -> None:
        object.__setattr__(self, "layers", coerce_ints(self, "layers", self.layers))
        object.__setattr__(self, "positions", coerce_ints(self, "positions", self.positions, allow_none=False))
        coerce_bool(self, "include_self", self.include_self)

    def hooks(self, model, ctx: RunContext) -> list[Hook]:
        positions = list(self.positions)
        layers = _layers(self.layers, model)
        if self.include_self:

            def zero_v(v: Float[Tensor, "batch pos kv_head d_head"], hook) -> Tensor:
                out = v.clone()
                out[:, positions] = 0.0
                return out

            return [(f"blocks.{l}.attn.hook_v", zero_v) for l in layers]

        def zero_column(pattern: Float[Tensor, "batch head query key"], hook) -> Tensor:
            block = later_queries(positions, pattern.shape[-1], pattern.device)
            return pattern.masked_fill(block, 0.0)

        return [(f"blocks.{l}.attn.hook_pattern", zero_column) for l in layers]


@register("mean-sink-value")
@dataclass(frozen=True)
class MeanSinkValue(Intervention):
    """The value vector at ``positions`` (default the first token) becomes the mean of the value
    vectors at the sequence's other real (non-pad) positions, at ``layers`` (None: all).

    Implemented on ``blocks.L.attn.hook_v`` (``[batch, pos, kv_head, d_head]``), so every query
    reads the mean value, the sink's own row included: the like-for-like zero edit is
    ``zero-sink-value:include_self=true``. Pads and the replaced positions are left out of the
    mean; a sequence with no other real token keeps its value.
    """

    layers: tuple[int, ...] | None = None
    positions: tuple[int, ...] = (0,)

    sites: ClassVar[Sites] = Sites(layers="layers", positions="positions")

    def __post_init__(self) -> None:
        object.__setattr__(self, "layers", coerce_ints(self, "layers", self.layers))
        object.__setattr__(self, "positions", coerce_ints(self, "positions", self.positions, allow_none=False))

    def hooks(self, model, ctx: RunContext) -> list[Hook]:
        positions = list(self.positions)
        valid = ctx.batch.valid

        def mean_v(v: Float[Tensor, "batch pos kv_head d_head"], hook) -> Tensor:
            others = valid.to(v.device)[:, : v.shape[1]].clone()
            others[:, [p for p in positions if p < v.shape[1]]] = False
            weight = others.to(v.dtype)[:, :, None, None]
            count = weight.sum(dim=1)  # [batch, 1, 1]
            mean = (v * weight).sum(dim=1) / count.clamp(min=1.0)  # [batch, kv_head, d_head]
            out = v.clone()
            for p in positions:
                if p < v.shape[1]:
                    out[:, p] = torch.where(count > 0, mean, v[:, p])
            return out

        return [(f"blocks.{l}.attn.hook_v", mean_v) for l in _layers(self.layers, model)]


def later_queries(keys: list[int] | tuple[int, ...], width: int, device) -> Tensor:
    """``[query, key]`` mask: True at (q, k) for each k in ``keys`` and every query q > k."""
    block = torch.zeros(width, width, dtype=torch.bool, device=device)
    q = torch.arange(width, device=device)
    for k in keys:
        if k < width:
            block[:, k] = q > k
    return block


@register("drop-sink-attention")
@dataclass(frozen=True)
class DropSinkAttention(Intervention):
    """Later queries may not attend to ``keys`` (default the first token) at ``layers`` (None:
    all); the softmax renormalises their attention over the remaining keys.

    Only queries strictly after a key lose it: the key's own query row keeps its
    self-attention (position 0 can see nothing else), so no row is ever left empty.
    """

    layers: tuple[int, ...] | None = None
    keys: tuple[int, ...] = (0,)

    sites: ClassVar[Sites] = Sites(layers="layers", positions="keys")

    def __post_init__(self) -> None:
        object.__setattr__(self, "layers", coerce_ints(self, "layers", self.layers))
        object.__setattr__(self, "keys", coerce_ints(self, "keys", self.keys, allow_none=False))

    def hooks(self, model, ctx: RunContext) -> list[Hook]:
        keys = self.keys

        def hook(scores: Float[Tensor, "batch head query key"], hook) -> Tensor:
            block = later_queries(keys, scores.shape[-1], scores.device)
            return scores.masked_fill(block, torch.finfo(scores.dtype).min)

        return [(f"blocks.{l}.attn.hook_attn_scores", hook) for l in _layers(self.layers, model)]


__all__ = ["DropSinkAttention", "MeanSinkValue", "ZeroSinkValue", "later_queries"]
