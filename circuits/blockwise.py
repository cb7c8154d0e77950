"""Attention received per (head, key) without the T x T pattern: a loop over blocks of queries.

Why this module exists. Gu et al.'s alpha and Wong et al.'s sink score are column sums of the
attention pattern. Materialising the pattern costs ``heads x T x T`` floats per layer (2.4 GB per
layer for SmolLM2 at 8k tokens), so long reasoning traces were out of reach. Each *row* of the
pattern is a complete softmax over the keys a query sees, so a block of queries can be scored,
normalised, summed over its queries and dropped: memory ``O(heads x block x T)``, and the
statistics are the eager pattern's, summed in a different order (equal within float32
rounding; ``tests/test_blockwise.py``).

What must match the model's own attention (``PositionEmbeddingsAttentionBridge.forward``):

* scores ``q . k * scaling`` (the HF module's ``scaling``: ``query_pre_attn_scalar`` on Gemma),
  in float32 here whatever the model's dtype;
* Gemma 2's score softcapping ``tanh(s / cap) * cap``, applied before the mask, as upstream;
* the mask: HF's own mask function (causal, sliding window, padding, chunks), evaluated one
  block at a time (:class:`LazyMask`), masked scores set to ``finfo.min`` like the eager mask;
* grouped-query attention: query head ``h`` reads key head ``h // groups``;
* gpt-oss's learned sink logit per head: an extra softmax column, dropped afterwards.

:func:`column_sums` returns what :func:`circuits.measure.attention_received` sums from a
pattern (attention received over the real queries, and the self-attention term), so both paths
share the one formula that turns them into alpha and the sink score. :func:`attention_output`
is the same loop producing ``softmax(scores) @ V`` for the layers whose extras (softcapping,
sink logits) the fused ``scaled_dot_product_attention`` kernel cannot express; the rest use
:func:`sdpa_output`. Everything here is plain torch and runs on any device.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F
from jaxtyping import Bool, Float, Int
from torch import Tensor

#: queries per block; 256 keeps a block's scores of a 9-head layer at 8k tokens near 75 MB
DEFAULT_BLOCK = 256

MaskFunction = Callable[[Tensor, Tensor, Tensor, Tensor], Tensor]


def causal(batch_idx: Tensor, head_idx: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
    """HF's ``causal_mask_function``: key ``kv`` is visible from query ``q`` when ``kv <= q``."""
    return kv_idx <= q_idx


def sliding_causal(window: int) -> MaskFunction:
    """Causal and at most ``window - 1`` positions back (HF's ``sliding_window_causal_mask_function``)."""

    def inner(batch_idx: Tensor, head_idx: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        return (kv_idx <= q_idx) & (kv_idx > q_idx - window)

    return inner


@dataclass(eq=False)
class LazyMask:
    """An attention mask described by its index function, evaluated one block of queries at a time.

    ``mask_function(b, h, q, kv) -> bool`` broadcasts over index tensors (HF's mask functions
    do); ``padding`` (``[batch, kv_offset + kv_length]``, True at real keys) is and-ed in, as
    HF's ``sdpa_mask`` does. The key range a block of queries can see is computed once per
    block and cached, so every layer that shares this mask (HF builds one per layer type and
    forward) pays for it once. ``is_causal`` is True when the mask is exactly the causal one,
    which lets the fused kernel skip the mask entirely.
    """

    batch_size: int
    q_length: int
    kv_length: int
    mask_function: MaskFunction = causal
    q_offset: int = 0
    kv_offset: int = 0
    padding: Bool[Tensor, "batch kv"] | None = None
    device: torch.device | str = "cpu"
    _ranges: dict[tuple[int, int], tuple[int, int, bool]] = field(default_factory=dict, repr=False)

    def block(self, q0: int, q1: int, k0: int, k1: int) -> Bool[Tensor, "b 1 q kv"]:
        """The mask of queries ``q0..q1-1`` over keys ``k0..k1-1`` (True: attend). Its batch axis
        is 1 (it broadcasts) unless a padding mask or the mask function makes rows differ."""
        b = torch.arange(self.batch_size, device=self.device)[:, None, None, None]
        h = torch.zeros(1, dtype=torch.long, device=self.device)[None, :, None, None]
        q = (torch.arange(q0, q1, device=self.device) + self.q_offset)[None, None, :, None]
        kv = (torch.arange(k0, k1, device=self.device) + self.kv_offset)[None, None, None, :]
        mask = self.mask_function(b, h, q, kv)
        if self.padding is not None:
            mask = mask & self.padding.to(self.device)[:, kv[0, 0, 0]][:, None, None, :]
        return mask.expand(mask.shape[0], 1, q1 - q0, k1 - k0)

    def key_range(self, q0: int, q1: int) -> tuple[int, int, bool]:
        """``(lo, hi, causal)``: the keys any query of the block sees lie in ``lo..hi-1``;
        ``causal``: the block's mask over them is exactly ``kv <= q``."""
        if (q0, q1) not in self._ranges:
            mask = self.block(q0, q1, 0, self.kv_length)
            seen = mask.any(dim=(0, 1, 2)).nonzero()
            lo, hi = (int(seen[0]), int(seen[-1]) + 1) if len(seen) else (0, 0)
            q = torch.arange(q0, q1, device=self.device)[:, None] + self.q_offset
            kv = torch.arange(self.kv_length, device=self.device)[None, :] + self.kv_offset
            aligned = self.q_offset == self.kv_offset and self.kv_length >= q1
            self._ranges[(q0, q1)] = (lo, hi, aligned and bool(torch.equal(mask, (kv <= q).expand_as(mask))))
        return self._ranges[(q0, q1)]

    def is_causal(self, block: int = DEFAULT_BLOCK) -> bool:
        """The whole mask is the plain causal mask (queries and keys aligned, no window, no padding)."""
        if self.q_offset != self.kv_offset or self.q_length != self.kv_length:
            return False
        return all(self.key_range(q0, min(q0 + block, self.q_length))[2] for q0 in range(0, self.q_length, block))

    def dense(self, dtype: torch.dtype) -> Float[Tensor, "batch 1 q kv"]:
        """The full additive mask, as HF's ``eager_mask`` builds it (0 or ``finfo(dtype).min``)."""
        mask = self.block(0, self.q_length, 0, self.kv_length).expand(self.batch_size, -1, -1, -1)
        return torch.where(mask, torch.zeros((), dtype=dtype, device=mask.device), torch.finfo(dtype).min)


@dataclass(frozen=True)
class AttentionSpec:
    """What turns rotated queries and keys into a layer's softmax (read from the HF module)."""

    scaling: float
    softcap: float | None = None
    sinks: Float[Tensor, " head"] | None = None
    groups: int = 1  # query heads per key head

    @classmethod
    def of(cls, hf_attn, head_dim: int) -> "AttentionSpec":
        """As ``PositionEmbeddingsAttentionBridge.forward`` reads them from the HF attention module."""
        sinks = getattr(hf_attn, "sinks", None)
        return cls(
            scaling=float(getattr(hf_attn, "scaling", head_dim**-0.5)),
            softcap=getattr(hf_attn, "attn_logit_softcapping", None),
            sinks=None if sinks is None else sinks.detach(),
            groups=int(getattr(hf_attn, "num_key_value_groups", 1) or 1),
        )


def _block_probs(
    q: Float[Tensor, "batch kv_head g_q d"], k: Float[Tensor, "batch kv_head n d"], spec: AttentionSpec,
    mask: LazyMask, q0: int, q1: int, lo: int, hi: int, causal_block: bool, dtype: torch.dtype,
) -> Float[Tensor, "batch kv_head g q n"]:
    """Softmax rows of queries ``q0..q1-1`` over keys ``lo..hi-1`` (``q`` holds the query heads
    of each key head stacked along its rows), in ``dtype``, as upstream computes them.

    A block whose mask is plain causal (``causal_block``) is masked only where its keys overlap
    its queries (the diagonal square), in place; any other block evaluates the mask function.
    The scaling multiplies the queries (exact when it is a power of two, as for head sizes 16,
    64 and 256; otherwise one rounding apart from upstream's scaled scores).
    """
    b, hk, gq, _ = q.shape
    n_q = q1 - q0
    groups = gq // n_q
    scores = torch.matmul(q.to(dtype) * spec.scaling, k.to(dtype).transpose(-1, -2))
    scores = scores.view(b, hk, groups, n_q, hi - lo)
    if spec.softcap is not None:
        scores = torch.tanh(scores / spec.softcap).mul_(spec.softcap)
    low = torch.finfo(dtype).min
    if causal_block:
        start = q0 - lo  # keys lo..q0-1 are all visible; keys q0..hi-1 form the diagonal square
        if hi > q0:
            upper = torch.ones(n_q, hi - q0, dtype=torch.bool, device=scores.device).triu_(1)
            scores[..., start:].masked_fill_(upper, low)
    else:
        scores = scores.masked_fill(~mask.block(q0, q1, lo, hi)[:, :, None], low)
    if spec.sinks is None:
        return torch.softmax(scores, dim=-1, dtype=torch.float32)
    sink = spec.sinks.to(device=scores.device, dtype=dtype).view(1, hk, groups, 1, 1).expand(b, hk, groups, n_q, 1)
    combined = torch.cat([scores, sink], dim=-1)
    combined = combined - combined.amax(dim=-1, keepdim=True)
    return torch.softmax(combined, dim=-1, dtype=torch.float32)[..., :-1]


def _grouped(q: Float[Tensor, "batch head pos d"], groups: int, q0: int, q1: int) -> Float[Tensor, "batch kv_head gq d"]:
    """Queries ``q0..q1-1`` of the ``groups`` heads sharing each key head, stacked along rows."""
    b, h, _, d = q.shape
    return q[:, :, q0:q1].reshape(b, h // groups, groups * (q1 - q0), d)


def column_sums(
    q: Float[Tensor, "batch head pos d"],
    k: Float[Tensor, "batch kv_head pos d"],
    spec: AttentionSpec,
    mask: LazyMask,
    lengths: Int[Tensor, " batch"],
    *,
    block: int = DEFAULT_BLOCK,
) -> tuple[Float[Tensor, "batch head pos"], Float[Tensor, "batch head pos"]]:
    """Attention each key receives from the real queries, and the self-attention ``A[k, k]``.

    The same two sums :func:`circuits.measure.attention_received` takes of a pattern: pad
    queries (``t >= length``) are left out; float32 throughout. Memory: one block's scores.
    """
    b, h, t, _ = q.shape
    groups = h // k.shape[1]
    received = torch.zeros(b, h, t, dtype=torch.float32, device=q.device)
    self_attn = torch.zeros(b, h, t, dtype=torch.float32, device=q.device)
    lengths = lengths.to(q.device)
    shortest = int(lengths.min())
    for q0 in range(0, t, block):
        q1 = min(q0 + block, t)
        lo, hi, causal_block = mask.key_range(q0, q1)
        if hi <= lo:
            continue
        probs = _block_probs(_grouped(q, groups, q0, q1), k[:, :, lo:hi], spec, mask, q0, q1, lo, hi, causal_block, torch.float32)
        probs = probs.reshape(b, h, q1 - q0, hi - lo)
        if q1 > shortest:  # pad queries in this block: zero their rows (a NaN there must not leak)
            pad = torch.arange(q0, q1, device=q.device)[None, :] >= lengths[:, None]
            probs = probs.masked_fill(pad[:, None, :, None], 0.0)
        received[:, :, lo:hi] += probs.sum(dim=2)
        rows = torch.arange(max(q0, lo), min(q1, hi), device=q.device)
        if len(rows):
            self_attn[:, :, rows] = probs[:, :, rows - q0, rows - lo]
    return received, self_attn


def attention_output(
    q: Float[Tensor, "batch head pos d"],
    k: Float[Tensor, "batch kv_head pos d"],
    v: Float[Tensor, "batch kv_head pos dv"],
    spec: AttentionSpec,
    mask: LazyMask,
    *,
    block: int = DEFAULT_BLOCK,
) -> Float[Tensor, "batch head pos dv"]:
    """``softmax(scores) @ V`` one block of queries at a time, exactly as the eager path rounds
    it: scores in the model's dtype, softmax in float32, weights cast back before ``@ V``."""
    b, h, t, _ = q.shape
    hk, dv = v.shape[1], v.shape[-1]
    groups = h // hk
    out = torch.zeros(b, h, t, dv, dtype=q.dtype, device=q.device)
    for q0 in range(0, t, block):
        q1 = min(q0 + block, t)
        lo, hi, causal_block = mask.key_range(q0, q1)
        if hi <= lo:  # no visible key: eager's all-masked row is a uniform average
            lo, hi, causal_block = 0, mask.kv_length, False
        probs = _block_probs(_grouped(q, groups, q0, q1), k[:, :, lo:hi], spec, mask, q0, q1, lo, hi, causal_block, q.dtype)
        probs = probs.to(q.dtype).reshape(b, hk, groups * (q1 - q0), hi - lo)
        out[:, :, q0:q1] = torch.matmul(probs, v[:, :, lo:hi]).view(b, h, q1 - q0, dv)
    return out


def sdpa_output(
    q: Float[Tensor, "batch head pos d"],
    k: Float[Tensor, "batch kv_head pos d"],
    v: Float[Tensor, "batch kv_head pos dv"],
    spec: AttentionSpec,
    mask: LazyMask,
    *,
    block: int = 1024,
) -> Float[Tensor, "batch head pos dv"]:
    """The fused kernel (``F.scaled_dot_product_attention``) on the same mask.

    A plain causal mask runs as one call with ``is_causal``; any other mask (a sliding window,
    padding) runs per block of queries over the keys that block can see, with a boolean mask of
    ``block x keys``, so no ``T x T`` tensor is built. A query that sees no key attends to all
    of them (as eager's all-``finfo.min`` row does) instead of producing NaN.
    Not for softcapping or sink logits (:func:`attention_output` does those).
    """
    if spec.softcap is not None or spec.sinks is not None:
        raise ValueError("sdpa_output cannot apply softcapping or sink logits; use attention_output")
    gqa = q.shape[1] != k.shape[1]
    if mask.is_causal(block):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=spec.scaling, enable_gqa=gqa)
    t = q.shape[2]
    pieces = []
    for q0 in range(0, t, block):
        q1 = min(q0 + block, t)
        lo, hi, causal_block = mask.key_range(q0, q1)
        if hi <= lo:
            lo, hi = 0, mask.kv_length
            allowed = torch.ones(q1 - q0, hi - lo, dtype=torch.bool, device=q.device)
        else:
            allowed = mask.block(q0, q1, lo, hi)
            allowed = allowed | ~allowed.any(dim=-1, keepdim=True)  # rows with no key: all keys
        pieces.append(F.scaled_dot_product_attention(q[:, :, q0:q1], k[:, :, lo:hi], v[:, :, lo:hi], attn_mask=allowed,
                                                     scale=spec.scaling, enable_gqa=gqa))
    return torch.cat(pieces, dim=2)


__all__ = [
    "AttentionSpec", "DEFAULT_BLOCK", "LazyMask", "MaskFunction", "attention_output", "causal", "column_sums",
    "sdpa_output", "sliding_causal",
]
