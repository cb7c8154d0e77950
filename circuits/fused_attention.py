"""Fused attention on a TransformerBridge: the T x T pattern is built only when a hook asks for it.

Why this module exists. TransformerLens 4.x's ``PositionEmbeddingsAttentionBridge.forward``
(the attention of every RoPE family: Llama, Qwen, Gemma, gpt-oss, ...) re-implements attention
so that ``hook_attn_scores`` and ``hook_pattern`` can fire: it builds the full
``batch x heads x T x T`` scores and a float32 softmax in every layer, whether or not a hook
is there, and the bridge forces the HF model to eager masks, so HF also builds a ``T x T``
float mask per layer type. At 8k tokens that is gigabytes per layer; at 32k it cannot run.

This is a small adapter, not a fork. Inside :func:`fused_attention` (the driver,
:func:`circuits.driver.drive`, enters it for every measurement):

1. The HF model's attention implementation becomes ``"sinkscope_fused"``, registered with
   transformers' ``AttentionMaskInterface``: HF's own mask code still decides the mask of each
   layer (causal, sliding window, padding), but hands it over as a :class:`~circuits.blockwise.LazyMask`
   (its index function) instead of a ``T x T`` tensor.
2. Each supported attention bridge gets an instance-level ``forward`` that decides per call:

   * **a hook needs the pattern** (anything registered on ``hook_attn_scores`` or
     ``hook_pattern``): the lazy mask is materialised exactly as HF's ``eager_mask`` would
     have built it and upstream's forward runs unchanged: the eager reference path;
   * **otherwise**: upstream's forward runs with three of its own seams swapped for the call.
     ``_update_kv_cache`` receives the rotated keys and values; there the attention output is
     computed by the fused kernel (:func:`circuits.blockwise.sdpa_output`, or the blockwise
     loop :func:`circuits.blockwise.attention_output` for softcapping and sink logits) from
     the queries captured at ``hook_rot_q`` (a hook added last, so it sees every user edit),
     and ``d_v`` dummy keys (zeros) with identity values are handed on, so upstream's scores
     and softmax are ``T x d_v``, not ``T x T``; ``_apply_reconstruct_attention_mask`` passes
     those scores through, and ``_scrub_compatibility_pattern_nans`` replaces upstream's
     (dummy) weights by the fused output, which upstream multiplies by the identity (exact)
     and sends through its own gates, ``hook_z``, ``o_proj`` and ``hook_out``.

3. **Statistics of the pattern without the pattern.** A hook of the running forward (on
   ``hook_rot_q`` / ``hook_rot_k``, which fire before attention is computed) may ask, with
   :func:`reduce_pattern`, for the pattern to be handed to a :data:`~circuits.blockwise.Reducer`
   block by block. That call then computes its output with :func:`circuits.blockwise.attend`,
   which makes each block's softmax rows once and uses them twice: for the reducers and for
   ``@ V``. Computing the statistics in a second pass next to SDPA would score every query
   against every key twice (``bench/long_context.py`` measured that at 2.24 x one SDPA forward
   at 8k tokens). :class:`circuits.measure.SinkMeter` (alpha, sink score) and
   :class:`circuits.analyses.KVMeter` (attention to the first key) measure this way. Under
   stacked copies (:func:`circuits.driver.stacked_hooks`) a reducer sees its own copy's rows
   only (:data:`hook_rows`).

Where it does not apply (another attention bridge class such as GPT-2's or GPT-NeoX's joint
QKV, the lab's sigmoid variant, a query norm after RoPE, compatibility mode) the model stays
eager and :func:`fused_attention` logs one line saying why (:func:`fallback_reason`); a layer in
training mode runs eager. A KV cache works (its keys are extended first, the lazy mask carries
the offsets). A forward with a pattern hook logs one line naming the layers that ran eager.

Exactness: the fused output differs from the eager one by float32 rounding (logits within
about 5e-7 on the tiny models); the statistics equal the eager pattern's within 1e-5
(``tests/test_blockwise.py``).

What upstream TransformerLens would need so this adapter can go: in
``PositionEmbeddingsAttentionBridge.forward``, after ``hook_rot_k``, a branch "no hook on
``hook_attn_scores`` / ``hook_pattern`` → ``F.scaled_dot_product_attention`` (or the blockwise
loop for softcap / sinks)", and a bridge that does not force ``attn_implementation="eager"``
when no pattern is needed (``transformer_lens.utilities.attn_implementation.force_eager_attention``),
so HF builds its masks for SDPA.
"""

from __future__ import annotations

import contextlib
import logging
from contextvars import ContextVar
from typing import Any, Iterator, Sequence

import torch
from torch import Tensor

from circuits.blockwise import AttentionSpec, LazyMask, Reducer, attend, attention_output, sdpa_output
from circuits.errors import SinkscopeError
from circuits.model_info import model_info

log = logging.getLogger("sinkscope")

IMPLEMENTATION = "sinkscope_fused"
_DEPTH_ATTR = "_sinkscope_fused_depth"  # nesting depth of fused_attention on a model
_CALL_ATTR = "_sinkscope_fused_call"  # the running fused call, on its attention bridge
_PATTERN_HOOKS = ("hook_attn_scores", "hook_pattern")
#: queries per block of the fused kernel when the mask is not plain causal, and of the
#: blockwise loop (softcapping, sink logits; None: :func:`circuits.blockwise.stats_block`); read at call time
SDPA_BLOCK = 1024
LOOP_BLOCK: int | None = None


# --------------------------------------------------------------------------- HF registration


def lazy_mask(
    batch_size: int,
    q_length: int,
    kv_length: int,
    q_offset: int = 0,
    kv_offset: int = 0,
    mask_function=None,
    attention_mask: Tensor | None = None,
    use_vmap: bool = False,
    device: torch.device | str = "cpu",
    **kwargs: Any,
) -> LazyMask:
    """The mask interface of ``"sinkscope_fused"``: HF's arguments, kept as a :class:`LazyMask`."""
    # heavy: transformers takes seconds to import; only a model that runs needs it
    from transformers.masking_utils import causal_mask_function, prepare_padding_mask, sdpa_mask

    if use_vmap:  # custom and/or mask functions, not index-based: evaluate them densely, as HF does
        dense = sdpa_mask(batch_size, q_length, kv_length, q_offset, kv_offset, mask_function, attention_mask,
                          allow_is_causal_skip=False, use_vmap=True, device=device)
        mask_function = _dense_lookup(dense, q_offset, kv_offset)
        attention_mask = None
    padding = prepare_padding_mask(attention_mask, kv_length, kv_offset)
    return LazyMask(batch_size, q_length, kv_length, mask_function or causal_mask_function, q_offset, kv_offset,
                    padding, device)


def _dense_lookup(dense: Tensor, q_offset: int, kv_offset: int):
    """An index function that reads a materialised ``[batch, 1, q, kv]`` boolean mask back."""

    def inner(b: Tensor, h: Tensor, q: Tensor, kv: Tensor) -> Tensor:
        return dense[b, 0, q - q_offset, kv - kv_offset]

    return inner


def _register() -> None:
    """Register ``"sinkscope_fused"`` with transformers (idempotent). Its attention function is
    plain SDPA, for any HF module that calls it directly; the bridge never does."""
    # heavy: transformers takes seconds to import; only a model that runs needs it
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(IMPLEMENTATION, sdpa_attention_forward)
    AttentionMaskInterface.register(IMPLEMENTATION, lazy_mask)


# --------------------------------------------------------------------------- applicability


def _upstream_forward():
    # heavy: TransformerLens takes seconds to import; a model that runs has loaded it already
    from transformer_lens.model_bridge.generalized_components.position_embeddings_attention import (
        PositionEmbeddingsAttentionBridge,
    )

    return PositionEmbeddingsAttentionBridge


def layer_fallback_reason(attn) -> str | None:
    """Why this attention bridge cannot run fused (None: it can)."""
    base = _upstream_forward()
    if type(attn).forward is not base.forward:
        return f"{type(attn).__name__} has its own attention forward"
    if not hasattr(attn, "hook_rot_q") or not hasattr(attn, "hook_rot_k"):
        return "no hook_rot_q / hook_rot_k"
    if "_masked_softmax" in vars(attn):
        return "its softmax is replaced (a lab attention variant)"
    cfg = attn.config
    if getattr(cfg, "qk_norm_after_rope", False):
        return "its query norm runs after hook_rot_q"
    if getattr(attn, "compatibility_mode", False):
        return "compatibility mode"
    if not getattr(attn, "is_causal", True) or getattr(attn, "is_cross_attention", False):
        return "not causal self-attention"
    return None


def fallback_reason(model) -> str | None:
    """Why ``model`` cannot run fused attention (None: every layer can)."""
    hf = getattr(model, "original_model", None)
    if hf is None or not hasattr(getattr(hf, "config", None), "_attn_implementation"):
        return "no Hugging Face model under the bridge"
    if not getattr(hf.config, "is_causal", True):
        return "the model is not causal"
    for i, block in enumerate(model.blocks):
        reason = layer_fallback_reason(block.attn)
        if reason is not None:
            return f"layer {i}: {reason}"
    return None


def needs_pattern(attn) -> bool:
    """Some hook is registered on this layer's ``hook_attn_scores`` or ``hook_pattern``."""
    for name in _PATTERN_HOOKS:
        point = getattr(attn, name, None)
        if point is not None and (point._forward_hooks or point._forward_pre_hooks or point._backward_hooks):
            return True
    return False


def is_active(model) -> bool:
    """Whether ``model`` is inside :func:`fused_attention` with the fused path installed."""
    return getattr(model, _DEPTH_ATTR, 0) > 0


def pattern_layers(model, hooks: Sequence[tuple[Any, Any]]) -> set[int]:
    """The layers whose ``hook_attn_scores`` or ``hook_pattern`` one of ``hooks`` names (aliases
    resolved through the model's hook dictionary; a name filter counts for every layer)."""
    hook_dict = getattr(model, "hook_dict", {})
    points: dict[int, int] = {}
    for layer, block in enumerate(model.blocks):
        for name in _PATTERN_HOOKS:
            point = getattr(block.attn, name, None)
            if point is not None:
                points[id(point)] = layer
    out: set[int] = set()
    for name, _ in hooks:
        if not isinstance(name, str):
            return set(range(len(model.blocks)))
        point = hook_dict.get(name)
        if point is not None and id(point) in points:
            out.add(points[id(point)])
    return out


def reducible_layers(model, hooks: Sequence[tuple[Any, Any]] = ()) -> set[int]:
    """The layers where a meter can ask for :func:`reduce_pattern` in a forward with ``hooks``:
    the model runs fused (inside :func:`fused_attention`), the layer's bridge supports it, and
    none of ``hooks`` needs that layer's pattern (which makes the layer eager). A meter reads
    ``hook_pattern`` in every other layer."""
    if not is_active(model):
        return set()
    eager = pattern_layers(model, hooks)
    return {i for i, block in enumerate(model.blocks) if i not in eager and layer_fallback_reason(block.attn) is None}


class PatternUnavailable(SinkscopeError):
    """:func:`reduce_pattern` was called where no fused forward of that layer is running: outside
    a hook, or in a layer that runs eager because some hook needs its pattern."""


#: The rows of the batch that the running hook function sees: ``None`` (all of them), or the
#: slice of its copy while :func:`circuits.driver.stacked_hooks` runs one copy's hooks.
hook_rows: ContextVar[slice | None] = ContextVar("sinkscope_hook_rows", default=None)


def reduce_pattern(attn, reducer: Reducer, *, block: int | None = None) -> None:
    """Hand ``reducer`` this forward's attention pattern of layer ``attn``, block by block
    (:class:`~circuits.blockwise.PatternBlock`), with no ``T x T`` tensor. Call it from a hook
    of that layer that fires before attention is computed (``hook_rot_q`` / ``hook_rot_k``);
    the reducer has seen every block by the time ``hook_z`` fires. ``block``: queries per
    block (the smallest asked for wins; None: :func:`circuits.blockwise.stats_block`).

    Raises :class:`PatternUnavailable` where the layer is not running fused
    (:func:`reducible_layers` says where it will).
    """
    call = getattr(attn, _CALL_ATTR, None)
    if call is None:
        raise PatternUnavailable(f"{getattr(attn, 'name', 'attention')}: no fused forward is running here, so its "
                                 "pattern cannot be reduced block by block; read hook_pattern (see reducible_layers)")
    call.reducers.append((hook_rows.get(), reducer))
    if block is not None:
        call.block = block if call.block is None else min(call.block, block)


# --------------------------------------------------------------------------- the adapter


class _FusedCall:
    """The seams of one fused call of one attention bridge (see the module doc)."""

    def __init__(self, attn, mask: LazyMask):
        self.attn, self.mask = attn, mask
        self.query: Tensor | None = None
        self.output: Tensor | None = None
        self.reducers: list[tuple[slice | None, Reducer]] = []
        self.block: int | None = None
        hf = attn.original_component
        self.spec = AttentionSpec.of(hf, int(hf.head_dim))

    def capture_query(self, module, args, output: Tensor) -> None:
        self.query = output

    def update_kv_cache(self, k: Tensor, v: Tensor, **kwargs: Any) -> tuple[Tensor, Tensor]:
        k, v = type(self.attn)._update_kv_cache(self.attn, k, v, **kwargs)  # a cache still gets its keys
        q = self.query
        if q is None:
            raise RuntimeError(f"{self.attn.name}: fused attention ran without its queries (hook_rot_q did not fire)")
        if self.reducers:
            self.output = attend(q, k, v, self.spec, self.mask, self.reducers, block=self.block)
        elif self.spec.softcap is None and self.spec.sinks is None:
            self.output = sdpa_output(q, k, v, self.spec, self.mask, block=SDPA_BLOCK)
        else:
            self.output = attention_output(q, k, v, self.spec, self.mask, block=LOOP_BLOCK)
        b, hk, _, d = k.shape
        dv = v.shape[-1]
        keys = k.new_zeros(1, 1, dv, d).expand(b, hk, dv, d)
        values = torch.eye(dv, dtype=v.dtype, device=v.device).expand(b, hk, dv, dv)
        return keys, values

    @staticmethod
    def pass_scores(attn_scores: Tensor, attention_mask: Any, seq_len: int, q_seq_len: int | None = None) -> Tensor:
        return attn_scores

    def fused_weights(self, pattern: Tensor) -> Tensor:
        assert self.output is not None, "the fused output is computed in _update_kv_cache"
        out, self.output = self.output.to(pattern.dtype), None
        return out


def _fused_forward(attn, upstream, eager_layers: set[int], layer: int):
    """The instance-level ``forward`` installed on one attention bridge."""

    def forward(*args: Any, **kwargs: Any):
        mask = kwargs.get("attention_mask")
        if not isinstance(mask, LazyMask):
            return upstream(*args, **kwargs)
        if needs_pattern(attn) or attn.training:
            eager_layers.add(layer)
            hidden = kwargs.get("hidden_states", args[0] if args else None)
            dtype = hidden.dtype if isinstance(hidden, Tensor) else torch.float32
            return upstream(*args, **{**kwargs, "attention_mask": mask.dense(dtype)})
        call = _FusedCall(attn, mask)
        handle = attn.hook_rot_q.register_forward_hook(call.capture_query)
        seams = {
            "_update_kv_cache": call.update_kv_cache,
            "_apply_reconstruct_attention_mask": call.pass_scores,
            "_scrub_compatibility_pattern_nans": call.fused_weights,
            _CALL_ATTR: call,  # what reduce_pattern finds while the forward runs
        }
        try:
            for name, fn in seams.items():
                object.__setattr__(attn, name, fn)
            return upstream(*args, **kwargs)
        finally:
            handle.remove()
            for name in seams:
                attn.__dict__.pop(name, None)

    return forward


_noted: set[tuple[int, str]] = set()


def _note_once(model, text: str) -> None:
    key = (id(model), text)
    if key not in _noted:
        _noted.add(key)
        log.warning(text)


def _layer_list(layers: set[int]) -> str:
    ordered = sorted(layers)
    return ", ".join(map(str, ordered)) if len(ordered) <= 8 else f"{ordered[0]}..{ordered[-1]} ({len(ordered)} of them)"


@contextlib.contextmanager
def fused_attention(model, *, enabled: bool = True) -> Iterator[bool]:
    """Run ``model``'s attention fused while no hook needs the pattern (see the module doc).

    Yields whether the fused path is installed. Re-entrant; everything is restored on exit,
    also after an error. Not thread-safe (one forward at a time per model).
    """
    if not enabled:
        yield False
        return
    if is_active(model):
        yield True
        return
    reason = fallback_reason(model)
    if reason is not None:
        _note_once(model, f"{model_info(model).name}: attention runs eager (full T x T pattern): {reason}")
        yield False
        return
    _register()
    config = model.original_model.config
    previous = config._attn_implementation
    eager_layers: set[int] = set()
    attns = [block.attn for block in model.blocks]
    try:
        for i, attn in enumerate(attns):
            object.__setattr__(attn, "forward", _fused_forward(attn, type(attn).forward.__get__(attn), eager_layers, i))
        config._attn_implementation = IMPLEMENTATION
        object.__setattr__(model, _DEPTH_ATTR, 1)
        yield True
    finally:
        config._attn_implementation = previous
        for attn in attns:
            for name in ("forward", _CALL_ATTR):
                attn.__dict__.pop(name, None)
        model.__dict__.pop(_DEPTH_ATTR, None)
        if eager_layers:
            log.warning(f"{model_info(model).name}: attention ran eager (full T x T pattern) in layers "
                        f"{_layer_list(eager_layers)}: a hook reads or edits hook_attn_scores / hook_pattern there")


__all__ = [
    "IMPLEMENTATION", "PatternUnavailable", "fallback_reason", "fused_attention", "hook_rows", "is_active",
    "layer_fallback_reason", "lazy_mask", "needs_pattern", "pattern_layers", "reduce_pattern", "reducible_layers",
]
