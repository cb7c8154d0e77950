"""Attention interventions: mask edits, head-wise RMSNorm, and sigmoid attention.

Why these three. They test the *structural* explanations of the sink:

* :class:`IsolateAggregation` (Li et al., intervention (i)): the first token can only attend
  to itself, so its head outputs are single value vectors (high variance) while later tokens
  average many. Making a chosen token attend only to itself (or to a chosen key set) gives
  it the first token's aggregation, to see whether that alone plants a sink.
* :class:`HeadwiseRMSNorm` (Li et al.): normalising each head's aggregated value output
  removes the variance discrepancy between positions; does the sink weaken?
* :class:`SigmoidAttention` (Gu et al.): without softmax's sum-to-one there is no need to
  store spare attention mass anywhere; at inference time, does swapping the normaliser away
  remove the sink the model relies on?

How the edits reach the model. The TransformerBridge recomputes attention from Q and K itself
(``softmax(scores) @ V``) and fires ``hook_attn_scores`` (pre-softmax, causal mask already
applied as ``finfo.min``) and ``hook_pattern`` (post-softmax) inside that computation, so an
edited score flows through the softmax and an edited pattern multiplies the values:
both reach ``hook_z`` and the attention output (checked by the tests on Llama, GPT-2 and
Gemma 3 tiny models). ``hook_z`` is the input of the output projection (``attn.o.hook_in``,
reshaped to ``[batch, pos, head, d_head]``), and edits there reach ``hook_attn_out`` too.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from jaxtyping import Float
from torch import Tensor

from circuits.variants import default_sigmoid_bias, masked_entries, sigmoid_pattern
from interventions.base import Hook, Intervention, InterventionError, RunContext, Sites, check_hook_name, coerce_bool, coerce_float, coerce_ints, fail
from interventions.registry import register


def _head_index(heads: tuple[int, ...] | None, n_heads: int, device) -> Tensor:
    return torch.arange(n_heads, device=device) if heads is None else torch.tensor(heads, device=device)




# --------------------------------------------------------------------------- mask edits


@register("isolate")
@dataclass(frozen=True)
class IsolateAggregation(Intervention):
    """Chosen queries attend only to themselves (``keys=None``) or only to ``keys``.

    Implemented on the pre-softmax scores (``blocks.L.attn.hook_attn_scores``): every other
    key of the chosen query rows is set to the dtype's minimum, the model's own mask value,
    so the softmax renormalises over the allowed keys. Keys after a query stay masked
    (causality is never broken), so each query must be able to see at least one chosen key.
    On sliding-window layers a chosen key outside the window stays masked too; a row left
    with no visible key raises :class:`InterventionError` during the forward pass.
    """

    layers: tuple[int, ...]
    queries: tuple[int, ...]
    keys: tuple[int, ...] | None = None
    heads: tuple[int, ...] | None = None

    sites: ClassVar[Sites] = Sites(layers="layers", positions="queries", keys="keys", heads="heads")

    def __post_init__(self) -> None:
        object.__setattr__(self, "layers", coerce_ints(self, "layers", self.layers, allow_none=False))
        object.__setattr__(self, "queries", coerce_ints(self, "queries", self.queries, allow_none=False))
        object.__setattr__(self, "keys", coerce_ints(self, "keys", self.keys))
        object.__setattr__(self, "heads", coerce_ints(self, "heads", self.heads))
        if self.keys is not None:
            for q in self.queries:
                if not any(k <= q for k in self.keys):
                    raise fail(
                        self, "keys",
                        f"query {q} can see none of the keys {list(self.keys)} (a query only sees keys at or before it)",
                    )

    def blocked(self, n_heads: int, width: int, device) -> Tensor:
        """``[head, query, key]``: True where a score is overwritten with the mask value."""
        block = torch.zeros(n_heads, width, width, dtype=torch.bool, device=device)
        allowed = torch.zeros(len(self.queries), width, dtype=torch.bool, device=device)
        for i, q in enumerate(self.queries):
            allowed[i, list(self.keys) if self.keys is not None else [q]] = True
        heads = _head_index(self.heads, n_heads, device)
        block[heads[:, None], torch.tensor(self.queries, device=device)[None, :]] = ~allowed
        return block

    def hooks(self, model, ctx: RunContext) -> list[Hook]:
        iv = self

        def hook(scores: Float[Tensor, "batch head query key"], hook) -> Tensor:
            block = iv.blocked(scores.shape[1], scores.shape[-1], scores.device)
            out = scores.masked_fill(block, torch.finfo(scores.dtype).min)
            rows = out[:, _head_index(iv.heads, scores.shape[1], scores.device)][:, :, list(iv.queries)]
            if masked_entries(rows).all(-1).any():
                raise InterventionError(
                    f"IsolateAggregation at {hook.name}: a chosen query row has no visible key left "
                    "(keys outside a sliding window?); choose keys the query can see"
                )
            return out

        return [(f"blocks.{l}.attn.hook_attn_scores", hook) for l in self.layers]


# --------------------------------------------------------------------------- head-wise RMSNorm


@register("head-rmsnorm")
@dataclass(frozen=True)
class HeadwiseRMSNorm(Intervention):
    """RMSNorm without learned weight on each head's aggregated value output (``hook_z``,
    before ``W_O``): ``z / sqrt(mean(z²) + eps)`` per token and head.

    This is Li et al.'s head-wise RMSNorm with its weight at its initial value 1, so by
    default every head output has unit RMS at every position. A pretrained model never saw
    that scale; ``preserve_scale=True`` multiplies each head's normalised output by the
    head's mean RMS over the sequence's real positions, which removes the differences
    between positions (the variance discrepancy) while keeping the head's overall scale.
    """

    layers: tuple[int, ...]
    heads: tuple[int, ...] | None = None
    eps: float = 1e-6
    preserve_scale: bool = False

    sites: ClassVar[Sites] = Sites(layers="layers", heads="heads")

    def __post_init__(self) -> None:
        object.__setattr__(self, "layers", coerce_ints(self, "layers", self.layers, allow_none=False))
        object.__setattr__(self, "heads", coerce_ints(self, "heads", self.heads))
        object.__setattr__(self, "eps", coerce_float(self, "eps", self.eps, positive=True))
        coerce_bool(self, "preserve_scale", self.preserve_scale)

    def hooks(self, model, ctx: RunContext) -> list[Hook]:
        valid = ctx.batch.valid.to(model.cfg.device)
        iv = self

        def hook(z: Float[Tensor, "batch pos head d_head"], hook) -> Tensor:
            zf = z.float()
            rms = (zf.pow(2).mean(-1, keepdim=True) + iv.eps).sqrt()
            normed = zf / rms
            if iv.preserve_scale:
                w = valid[:, : z.shape[1], None, None].to(zf.dtype)
                mean_rms = (rms * w).sum(1, keepdim=True) / w.sum(1, keepdim=True).clamp_min(1)
                normed = normed * mean_rms
            heads = _head_index(iv.heads, z.shape[2], z.device)
            out = z.clone()
            out[:, :, heads] = normed[:, :, heads].to(z.dtype)
            return out

        return [(f"blocks.{l}.attn.hook_z", hook) for l in self.layers]


# --------------------------------------------------------------------------- sigmoid attention


@register("sigmoid-attn")
@dataclass(frozen=True)
class SigmoidAttention(Intervention):
    """Replace ``softmax(scores)`` by ``sigmoid(scores + b)``, without normalisation (Gu et al.).

    The pattern of the chosen heads becomes ``sigmoid(s + b)`` where ``s`` are the pre-softmax
    scores (after scaling and the causal mask); masked entries stay exactly 0, so causality
    holds, and rows no longer sum to 1.

    ``bias=None`` uses ``b = -log(T)`` with T the sequence's real length, the choice of
    Ramapuram et al. (2024) for sigmoid attention: ``T · sigmoid(s - log T) ≈ e^s``, so a row's
    total stays of order one instead of growing with T. Gu et al. do not state a bias for
    their inference-free comparison; this default is the toolkit's choice. A float sets one
    bias for every sequence (the strength a sweep varies).

    Implemented with two hooks per layer: ``hook_attn_scores`` remembers the scores (after
    any earlier intervention's edits) and ``hook_pattern`` replaces the pattern.
    """

    layers: tuple[int, ...]
    heads: tuple[int, ...] | None = None
    bias: float | None = None

    strength_field = "bias"

    sites: ClassVar[Sites] = Sites(layers="layers", heads="heads")

    def __post_init__(self) -> None:
        object.__setattr__(self, "layers", coerce_ints(self, "layers", self.layers, allow_none=False))
        object.__setattr__(self, "heads", coerce_ints(self, "heads", self.heads))
        object.__setattr__(self, "bias", coerce_float(self, "bias", self.bias, allow_none=True))

    def validate(self, model, n_positions: int | None = None) -> None:
        super().validate(model, n_positions)
        for l in self.layers:
            check_hook_name(self, "layers", f"blocks.{l}.attn.hook_attn_scores", model)
            check_hook_name(self, "layers", f"blocks.{l}.attn.hook_pattern", model)

    def biases(self, ctx: RunContext) -> Float[Tensor, " batch"]:
        if self.bias is not None:
            return torch.full((len(ctx.batch),), self.bias)
        return -torch.log(ctx.batch.lengths.to(torch.float32))

    def hooks(self, model, ctx: RunContext) -> list[Hook]:
        bias = self.biases(ctx).to(model.cfg.device)[:, None, None, None]
        stash: dict[int, Tensor] = {}
        iv = self
        out: list[Hook] = []
        for layer in self.layers:

            def keep_scores(scores: Tensor, hook, layer=layer) -> None:
                stash[layer] = scores

            def replace_pattern(pattern: Float[Tensor, "batch head query key"], hook, layer=layer) -> Tensor:
                scores = stash.pop(layer, None)
                if scores is None:
                    raise InterventionError(f"SigmoidAttention: {hook.name} fired without hook_attn_scores before it")
                sig = sigmoid_pattern(scores, bias).to(pattern.dtype)
                heads = _head_index(iv.heads, pattern.shape[1], pattern.device)
                new = pattern.clone()
                new[:, heads] = sig[:, heads]
                return new

            out.append((f"blocks.{layer}.attn.hook_attn_scores", keep_scores))
            out.append((f"blocks.{layer}.attn.hook_pattern", replace_pattern))
        return out


__all__ = ["HeadwiseRMSNorm", "IsolateAggregation", "SigmoidAttention", "default_sigmoid_bias"]
