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

One loop, :func:`attend`, does it all: per block of queries it computes the softmax rows once,
hands them as a :class:`PatternBlock` to every :data:`Reducer` (a statistic that keeps what it
needs of each block), and, given values, multiplies them by ``V``. So a layer whose statistics
are wanted computes its attention output from the same rows (the fused path does this:
:func:`circuits.fused_attention.reduce_pattern`), instead of a second pass next to the kernel.
:class:`ColumnSums` is the reducer of what :func:`circuits.measure.attention_received` sums from
a pattern (attention received over the real queries, and the self-attention term), so both
paths share the one formula that turns them into alpha and the sink score; :func:`column_sums`
runs it without values. :func:`attention_output` is the loop without reducers, for the layers
whose extras (softcapping, sink logits) ``scaled_dot_product_attention`` cannot express; the
rest use :func:`sdpa_output`. Everything here is plain torch and runs on any device.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field, replace
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from jaxtyping import Bool, Float, Int
from torch import Tensor

#: queries per block of a mask check where the caller names none (:meth:`LazyMask.is_causal`)
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


@functools.lru_cache(maxsize=16)
def _above_diagonal(rows: int, cols: int, device: str) -> Bool[Tensor, "q 1 kv"]:
    """``[r, 0, c]`` True where key ``c`` of a causal block's diagonal square lies after query ``r``."""
    return torch.ones(rows, cols, dtype=torch.bool, device=device).triu_(1)[:, None, :]


def stats_block(n_heads: int, n_tokens: int, budget: int = 2**22) -> int:
    """Queries per block of the attention loop (:func:`attend`), so one block's scores stay near
    ``budget`` floats (16 MB): a multiple of 16 from 16 to 128 (48 for SmolLM2 at 8k tokens, 32
    for Qwen2.5-0.5B's 14 heads, 16 at 32k). Small blocks are faster: a block's scores are
    written, normalised and multiplied by ``V``, three passes that stay in cache only when the
    block is small. Measured on 2 cores, one 8,192-token sequence, time over one causal SDPA call
    (9 heads, 3 KV heads): blocks of 16 / 64 / 128 / 256 / 512 queries 1.61 / 1.68 / 2.06 / 2.06 /
    2.99; 14 heads, 2 KV heads: 16 / 64 / 128 queries 1.21 / 1.41 / 2.40."""
    per_query = max(1, n_heads * n_tokens)
    return int(max(16, min(128, budget // per_query // 16 * 16)))


def _prepare(q: Float[Tensor, "batch head pos d"], k: Float[Tensor, "batch kv_head pos d"], spec: AttentionSpec,
             dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """Queries scaled and laid out ``[batch, kv_head, pos, group, d]`` (so a block of queries is
    one contiguous slice), keys as ``[batch, kv_head, d, pos]``, both in ``dtype``. The scaling
    multiplies the queries: exact when it is a power of two (head sizes 16, 64, 256), one
    rounding from upstream's scaled scores otherwise."""
    b, h, t, d = q.shape
    hk = k.shape[1]
    qg = (q.to(dtype) * spec.scaling).view(b, hk, h // hk, t, d).transpose(2, 3).contiguous()
    return qg, k.to(dtype).transpose(-1, -2)


def _block_probs(
    qg: Tensor, kt: Tensor, spec: AttentionSpec, mask: LazyMask, q0: int, q1: int, lo: int, hi: int, causal_block: bool,
) -> Float[Tensor, "batch kv_head q group n"]:
    """Softmax rows of queries ``q0..q1-1`` over keys ``lo..hi-1`` in float32, as upstream
    computes them (softcap, then the mask as ``finfo.min``, then the sink column).

    A block whose mask is plain causal (``causal_block``) is masked only where its keys overlap
    its queries (the diagonal square), in place; any other block evaluates the mask function.
    """
    b, hk, _, g, d = qg.shape
    n_q, n_k = q1 - q0, hi - lo
    scores = torch.matmul(qg[:, :, q0:q1].reshape(b, hk, n_q * g, d), kt[..., lo:hi]).view(b, hk, n_q, g, n_k)
    if spec.softcap is not None:
        scores = torch.tanh(scores / spec.softcap).mul_(spec.softcap)
    low = torch.finfo(scores.dtype).min
    if causal_block:
        if hi > q0:  # keys lo..q0-1 are all visible; keys q0..hi-1 form the diagonal square
            scores[..., q0 - lo :].masked_fill_(_above_diagonal(n_q, hi - q0, str(scores.device)), low)
    else:
        scores.masked_fill_(~mask.block(q0, q1, lo, hi)[:, :, :, None, :], low)
    if spec.sinks is None:
        return torch.softmax(scores, dim=-1, dtype=torch.float32)
    sink = spec.sinks.to(device=scores.device, dtype=scores.dtype).view(1, hk, 1, g, 1).expand(b, hk, n_q, g, 1)
    combined = torch.cat([scores, sink], dim=-1)
    combined = combined - combined.amax(dim=-1, keepdim=True)
    return torch.softmax(combined, dim=-1, dtype=torch.float32)[..., :-1]


@dataclass(frozen=True)
class PatternBlock:
    """Rows ``q0..q1-1`` of one layer's attention pattern over keys ``lo..hi-1`` (of
    ``kv_length``): the float32 softmax rows the model's attention uses, handed to a
    :data:`Reducer` and dropped. Layout ``[batch, kv_head, query, group, key]``: query head
    ``h`` is ``(h // group_size, h % group_size)``, so a block of a GQA layer is one tensor.
    Query ``q`` sees its own key at ``q`` (self-attention, no cache offset)."""

    probs: Float[Tensor, "batch kv_head query group key"]
    q0: int
    q1: int
    lo: int
    hi: int
    kv_length: int

    def real_queries(self, lengths: Int[Tensor, " batch"]) -> "PatternBlock":
        """The block with the rows of pad queries (``q >= length``) set to 0: a pad row must
        not count, and a NaN there must not leak into a sum."""
        if self.q1 <= int(lengths.min()):
            return self
        pad = torch.arange(self.q0, self.q1, device=self.probs.device)[None, :] >= lengths.to(self.probs.device)[:, None]
        return replace(self, probs=self.probs.masked_fill(pad[:, None, :, None, None], 0.0))

    def received(self) -> Float[Tensor, "batch kv_head group key"]:
        """Attention each key of the block receives, summed over the block's queries."""
        return self.probs.sum(dim=2)

    def self_attention(self) -> tuple[int, int, Float[Tensor, "batch kv_head group query"]]:
        """``(r0, r1, A[q, q])`` for the queries ``r0..r1-1`` whose own key is in the block
        (``r1 <= r0``: none)."""
        r0, r1 = max(self.q0, self.lo), min(self.q1, self.hi)
        if r1 <= r0:
            return r0, r1, self.probs.new_zeros(0)
        return r0, r1, self.probs[:, :, r0 - self.q0 : r1 - self.q0, :, r0 - self.lo : r1 - self.lo].diagonal(dim1=2, dim2=4)

    def key_column(self, key: int) -> Float[Tensor, "batch kv_head group query"] | None:
        """Attention the block's queries give key ``key`` (None: the key is outside the block,
        so they give it none)."""
        if not self.lo <= key < self.hi:
            return None
        return self.probs[..., key - self.lo].transpose(2, 3)


#: A statistic of the attention pattern reduced block by block: called once per
#: :class:`PatternBlock` of a layer's forward, in query order; it keeps what it needs.
Reducer = Callable[[PatternBlock], None]


class ColumnSums:
    """A :data:`Reducer` of the two sums :func:`circuits.measure.attention_received` takes of a
    pattern: attention each key receives from the real queries, and the self-attention
    ``A[k, k]``; :meth:`~ColumnSums.result` returns them ``[batch, head, key]``."""

    def __init__(self, lengths: Int[Tensor, " batch"]):
        self.lengths = lengths
        self._received: Tensor | None = None
        self._self_attn: Tensor | None = None

    def __call__(self, block: PatternBlock) -> None:
        block = block.real_queries(self.lengths)
        if self._received is None:
            b, hk, _, g, _ = block.probs.shape
            self._received = block.probs.new_zeros(b, hk, g, block.kv_length)
            self._self_attn = block.probs.new_zeros(b, hk, g, block.kv_length)
        self._received[..., block.lo : block.hi] += block.received()
        r0, r1, diagonal = block.self_attention()
        if r1 > r0:
            self._self_attn[..., r0:r1] = diagonal

    def result(self) -> tuple[Float[Tensor, "batch head key"], Float[Tensor, "batch head key"]]:
        if self._received is None:
            raise RuntimeError("ColumnSums saw no block of the pattern")
        b, hk, g, t = self._received.shape
        return self._received.view(b, hk * g, t), self._self_attn.view(b, hk * g, t)


def attend(
    q: Float[Tensor, "batch head pos d"],
    k: Float[Tensor, "batch kv_head pos d"],
    v: Float[Tensor, "batch kv_head pos dv"] | None,
    spec: AttentionSpec,
    mask: LazyMask,
    reducers: Sequence[tuple[slice | None, Reducer]] = (),
    *,
    block: int | None = None,
    score_dtype: torch.dtype = torch.float32,
) -> Float[Tensor, "batch head pos dv"] | None:
    """The attention loop over blocks of queries: each block's softmax rows are computed once,
    handed to every reducer (``(rows, reducer)``: the reducer sees those batch rows only, all
    with ``None``), and, with values ``v``, multiplied by them, as the eager path rounds it
    (weights cast to the values' dtype before ``@ V``). Returns the attention output (None
    without ``v``). Memory: one block's scores (``block`` None: :func:`stats_block`).

    A block whose queries see no key gives the reducers nothing and, with ``v``, outputs the
    uniform average of all values, as eager's all-``finfo.min`` row does.
    """
    b, h, t, _ = q.shape
    hk = k.shape[1]
    g = h // hk
    block = block or stats_block(h, mask.kv_length)
    qg, kt = _prepare(q, k, spec, score_dtype)
    out = None if v is None else torch.zeros(b, hk, g, t, v.shape[-1], dtype=v.dtype, device=v.device)
    for q0 in range(0, t, block):
        q1 = min(q0 + block, t)
        lo, hi, causal_block = mask.key_range(q0, q1)
        visible = hi > lo
        if not visible:
            if out is None:
                continue
            lo, hi, causal_block = 0, mask.kv_length, False
        probs = _block_probs(qg, kt, spec, mask, q0, q1, lo, hi, causal_block)  # [b, hk, q, g, n]
        if visible:
            for rows, reducer in reducers:
                reducer(PatternBlock(probs if rows is None else probs[rows], q0, q1, lo, hi, mask.kv_length))
        if out is not None:
            z = torch.matmul(probs.to(v.dtype).reshape(b, hk, (q1 - q0) * g, hi - lo), v[:, :, lo:hi])
            out[:, :, :, q0:q1] = z.view(b, hk, q1 - q0, g, -1).transpose(2, 3)
    return None if out is None else out.view(b, h, t, -1)


def column_sums(
    q: Float[Tensor, "batch head pos d"],
    k: Float[Tensor, "batch kv_head pos d"],
    spec: AttentionSpec,
    mask: LazyMask,
    lengths: Int[Tensor, " batch"],
    *,
    block: int | None = None,
) -> tuple[Float[Tensor, "batch head pos"], Float[Tensor, "batch head pos"]]:
    """Attention each key receives from the real queries, and the self-attention ``A[k, k]``
    (:class:`ColumnSums` over :func:`attend` without values); float32 throughout."""
    sums = ColumnSums(lengths.to(q.device))
    attend(q, k, None, spec, mask, [(None, sums)], block=block)
    return sums.result()


def attention_output(
    q: Float[Tensor, "batch head pos d"],
    k: Float[Tensor, "batch kv_head pos d"],
    v: Float[Tensor, "batch kv_head pos dv"],
    spec: AttentionSpec,
    mask: LazyMask,
    *,
    block: int | None = None,
) -> Float[Tensor, "batch head pos dv"]:
    """``softmax(scores) @ V`` one block of queries at a time, as the eager path rounds it:
    scores in the model's dtype, softmax in float32, weights cast back before ``@ V``."""
    return attend(q, k, v, spec, mask, block=block, score_dtype=q.dtype)


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
    "AttentionSpec", "ColumnSums", "DEFAULT_BLOCK", "LazyMask", "MaskFunction", "PatternBlock", "Reducer", "attend",
    "attention_output", "causal", "column_sums", "sdpa_output", "sliding_causal", "stats_block",
]
