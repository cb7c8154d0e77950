"""Prefix reuse: run the clean prefix once, then re-run only the blocks an intervention touches.

Why this module exists: an intervention sweep applies an intervention at layer ``l`` many times
(per head, per position, per ablation value...). Everything below ``l`` is identical in every
run, so it should be computed once. TransformerLens 4.3's ``forward(..., start_at_layer=l)``
gives the right numbers but still executes blocks ``0..l-1`` and throws their output away, so
it saves nothing. This is the one small place that does real prefix reuse:

* :func:`capture_resid_pre` runs the clean forward once and keeps the residual stream entering
  the requested blocks (``blocks.L.hook_resid_pre``), stopping after the deepest one;
* :func:`run_from_layer` drives blocks ``start_layer..`` (then final norm + unembed) from such
  a residual, with fwd hooks registered only for the duration of the call. Every bridge hook on
  those blocks (``attn.hook_attn_scores``, ``attn.hook_pattern``, ``attn.hook_z``,
  ``mlp.hook_post``, ``hook_resid_post`` ...) fires exactly once, as in a full forward, so
  measurement hooks and intervention hooks work unchanged.

How (design choice, from reading ``transformer_bridge.py`` / ``block.py``): the bridge's own
``start_at_layer`` path feeds the residual to the HF model as ``inputs_embeds`` and makes block
``l`` swap it in for its input (``BlockBridge._maybe_inject_start_residual``). We use exactly
that path and additionally short-circuit blocks ``0..l-1`` for the call (an instance-level
``forward`` that returns its input; the injected block discards that value anyway). Everything
else is the model's own code: the HF model builds the causal / sliding-window masks per layer
type, computes the rotary cos/sin with its rotary module (Gemma 3: once per layer type, global
and local), passes each architecture's block arguments, applies the final norm and lm_head;
the bridge components re-implement attention with all their hooks. Nothing is re-implemented
here, it is architecture-generic (GPT-2's learned position embedding is already in the
residual, and the one HF adds to ``inputs_embeds`` is discarded at block ``l``), and the
logits are bit-identical to a full forward (tests: tiny gpt2 / llama / gemma3, SmolLM2, Gemma 3).

Consequences worth knowing:

* A hook named on a block below ``start_layer`` or on the embedding stage would silently never
  fire (or fire on a discarded tensor), so :func:`run_from_layer` refuses it (``ValueError``);
  name filters are narrowed to the hooks that do fire, like ``run_with_hooks`` does.
* Cost: blocks ``l..`` plus the unembed. On SmolLM2 the unembed (576 x 49152) costs about as
  much as 8 blocks, so asking for ``return_type="resid"`` (stops before the final norm) or an
  earlier ``stop_at_layer`` is much cheaper than logits when only activations are measured.
* Batches are assumed right-padded: the causal mask alone keeps real queries off pad keys.
  An optional 2-D ``attention_mask`` (e.g. left padding) is passed to the model and gets the
  same mask-derived position ids the bridge gives token input. The bridge skips that
  derivation for residual input; RoPE only sees relative positions, so the difference would be
  rounding-level (1.5e-7 on tiny llama), but with it the result matches bit-for-bit.
* Not re-entrant: do not call the model from inside a hook during :func:`run_from_layer`
  (the bridge keeps its start-layer state on the blocks, not per call).
* Grad mode is left to the caller (wrap in ``torch.no_grad()`` for sweeps); the captured
  residuals are detached copies.
"""

from __future__ import annotations

import contextlib
import operator
from typing import Any, Callable, Iterable, Iterator, Literal, Sequence

import torch
from jaxtyping import Float, Int
from torch import Tensor

from circuits.driver import stop_after_last_block

HookFn = Callable[..., Tensor | None]
FwdHook = tuple[str | Callable[[str], bool], HookFn]

_RESID_PRE_HOOKS = ("hook_in", "hook_resid_pre")
_EMBED_HOOKS = ("hook_embed", "hook_pos_embed", "hook_tokens")
_EMBED_PREFIXES = ("embed.", "pos_embed.")
_FINAL_PREFIXES = ("ln_final.", "unembed.", "hook_unembed")


def n_blocks(model) -> int:
    """Number of transformer blocks of a bridge."""
    return len(model.blocks)


def resid_pre_hook(layer: int) -> str:
    """Canonical name of the residual entering block ``layer`` (alias ``hook_resid_pre``)."""
    return f"blocks.{layer}.hook_in"


def _layer_index(model, layer: int, what: str, *, allow_end: bool = False) -> int:
    n = n_blocks(model)
    if isinstance(layer, bool):
        raise TypeError(f"{what} must be an int, got bool")
    try:
        layer = operator.index(layer)  # ints, numpy ints, 0-d integer tensors
    except TypeError:
        raise TypeError(f"{what} must be an int, got {type(layer).__name__}") from None
    idx = layer + n if layer < 0 else layer
    hi = n if allow_end else n - 1
    if not 0 <= idx <= hi:
        raise ValueError(f"{what}={layer} out of range for a model with {n} blocks")
    return idx


# --------------------------------------------------------------------------- capture


def capture_resid_pre(
    model,
    tokens: Int[Tensor, "batch pos"],
    layers: Iterable[int],
    *,
    attention_mask: Int[Tensor, "batch pos"] | None = None,
    run: Literal["to_deepest", "all_blocks", "logits"] = "to_deepest",
) -> dict[int, Float[Tensor, "batch pos d_model"]] | tuple[
    Float[Tensor, "batch pos d_vocab"], dict[int, Float[Tensor, "batch pos d_model"]]
]:
    """Run the clean forward once and keep the residual entering each block in ``layers``.

    Only the requested layers are stored (detached copies). How far the forward goes:

    * ``"to_deepest"``: it stops at the deepest requested block; blocks after it never run.
    * ``"all_blocks"``: every block runs (so other hooks, such as a measurement, fire in all
      of them), the final norm and unembedding do not.
    * ``"logits"``: the full forward; ``(logits, residuals)`` is returned (the clean baseline
      of a sweep that reports side effects).

    Negative layers count from the end; keys of the result are non-negative.
    """
    if run not in ("to_deepest", "all_blocks", "logits"):
        raise ValueError(f"run must be 'to_deepest', 'all_blocks' or 'logits', got {run!r}")
    idx = sorted({_layer_index(model, layer, "layer") for layer in layers})
    if not idx:
        raise ValueError("capture_resid_pre needs at least one layer")
    stored: dict[int, Tensor] = {}

    def make_hook(layer: int) -> HookFn:
        def hook(tensor: Tensor, hook: Any) -> None:
            stored[layer] = tensor.detach().clone()

        return hook

    kwargs: dict[str, Any] = {}
    if attention_mask is not None:
        kwargs["attention_mask"] = attention_mask
    hooks = [(resid_pre_hook(layer), make_hook(layer)) for layer in idx]
    if run == "all_blocks":
        hooks.append(stop_after_last_block(model))
    with model.hooks(fwd_hooks=hooks):
        if run == "logits":
            logits = model.forward(tokens, return_type="logits", **kwargs)
        else:
            model.forward(tokens, return_type=None, stop_at_layer=idx[-1] if run == "to_deepest" else None, **kwargs)
    missing = [layer for layer in idx if layer not in stored]
    if missing:  # a hook that did not fire is a bug, never a silent empty entry
        raise RuntimeError(f"resid_pre hooks did not fire for layers {missing}")
    result = {layer: stored[layer] for layer in idx}
    return (logits, result) if run == "logits" else result


# --------------------------------------------------------------------------- run from layer


def _skip_block(*args: Any, **kwargs: Any) -> Any:
    """Stand-in forward for a block below the start layer: hand the hidden states through."""
    return args[0] if args else kwargs["hidden_states"]


@contextlib.contextmanager
def _skipped_blocks(model, start_layer: int) -> Iterator[None]:
    """Make blocks ``0..start_layer-1`` no-ops for the duration of the context.

    The override is an instance attribute set with ``__dict__`` on purpose: the bridge
    components forward ``setattr`` of unknown names to the wrapped HF module.
    """
    if any("forward" in block.__dict__ for block in model.blocks):
        # Nested use (a hook calling the model during run_from_layer) would silently skip
        # blocks, and the bridge's own start_at_layer state is per model, not per call.
        raise RuntimeError("run_from_layer is not re-entrant: blocks are already short-circuited")
    blocks = [model.blocks[i] for i in range(start_layer)]
    try:
        for block in blocks:
            block.__dict__["forward"] = _skip_block
        yield
    finally:
        for block in blocks:
            block.__dict__.pop("forward", None)


def _unfireable_reason(name: str, start: int, stop: int | None) -> str | None:
    """Why a hook named ``name`` would never fire (or fire on a discarded tensor), or None."""
    if name in _EMBED_HOOKS or name.startswith(_EMBED_PREFIXES):
        return f"the embedding stage is replaced by the residual given for block {start}"
    if name.startswith("blocks."):
        parts = name.split(".")
        try:
            layer = int(parts[1])
        except (IndexError, ValueError):
            return None
        if layer < start:
            return f"block {layer} is below start_layer={start} and does not run"
        at_stop_but_not_resid_pre = layer == stop and parts[2:] and parts[2] not in _RESID_PRE_HOOKS
        if stop is not None and (layer > stop or at_stop_but_not_resid_pre):
            return f"the run stops before block {stop}"
        return None
    if stop is not None and name.startswith(_FINAL_PREFIXES):
        return "the run stops before the final norm / unembed"
    return None


def _checked_hooks(fwd_hooks: Sequence[FwdHook], start: int, stop: int | None) -> list[FwdHook]:
    checked: list[FwdHook] = []
    for name, fn in fwd_hooks:
        if isinstance(name, str):
            reason = _unfireable_reason(name, start, stop)
            if reason is not None:
                raise ValueError(f"hook {name!r} would never fire in run_from_layer: {reason}")
            checked.append((name, fn))
        elif callable(name):
            checked.append((lambda n, f=name: bool(f(n)) and _unfireable_reason(n, start, stop) is None, fn))
        else:
            raise TypeError(f"a hook target must be a name or a filter function, got {type(name).__name__}")
    return checked


def _positions_from_mask(model, attention_mask: Tensor) -> Tensor | None:
    """The position ids the bridge derives for token input with this mask (None: arange).

    Mirrors ``TransformerBridge.forward``: only rows where a masked token precedes a real one
    (left padding, gaps) get mask-derived positions, so unpadded / right-padded rows keep the
    default ``arange`` bit-for-bit.
    """
    accepts = getattr(model, "_accepts_derived_position_ids", None)
    if accepts is not None and not accepts():
        return None
    mask = attention_mask.long()
    derived = (mask.cumsum(-1) - 1).clamp(min=0)
    arange = torch.arange(mask.shape[1], device=mask.device)
    needs = ((derived != arange) & (mask != 0)).any(dim=1, keepdim=True)
    if not bool(needs.any()):
        return None
    return torch.where(needs, derived, arange.expand_as(derived))


def run_from_layer(
    model,
    resid: Float[Tensor, "batch pos d_model"],
    start_layer: int,
    *,
    fwd_hooks: Sequence[FwdHook] = (),
    stop_at_layer: int | None = None,
    return_type: Literal["logits", "resid", None] = "logits",
    attention_mask: Int[Tensor, "batch pos"] | None = None,
) -> Float[Tensor, "batch pos d_vocab"] | Float[Tensor, "batch pos d_model"] | None:
    """Run blocks ``start_layer..`` (then final norm + unembed) from the residual entering it.

    ``resid`` is the residual stream entering block ``start_layer`` (from
    :func:`capture_resid_pre`, possibly edited); blocks below it do not run. ``fwd_hooks``
    (``(name or name filter, fn)`` pairs, as for ``model.hooks``) are registered for this call
    only and removed even if the run raises. Naming a hook that cannot fire here (a block below
    ``start_layer``, the embedding stage, or anything after the stop point) raises ValueError.

    ``return_type``: ``"logits"``; ``"resid"``, the residual entering ``stop_at_layer`` (the
    block's ``hook_resid_pre``, which still fires), or with no ``stop_at_layer`` the residual
    after the last block (input of the final norm; the unembed is skipped); ``None`` runs
    everything up to the stop point for the hooks' sake and returns nothing.
    ``stop_at_layer`` may be ``n_blocks(model)`` (same as ``return_type="resid"`` without a
    stop) and cannot be combined with logits. Negative layer indices count from the end.
    ``attention_mask`` (optional, 2-D, 1 = real token) is only needed for left padding.
    """
    n = n_blocks(model)
    start = _layer_index(model, start_layer, "start_layer")
    if return_type not in ("logits", "resid", None):
        raise ValueError(f"return_type must be 'logits', 'resid' or None, got {return_type!r}")
    stop = None
    if stop_at_layer is not None:
        stop = _layer_index(model, stop_at_layer, "stop_at_layer", allow_end=True)
    if stop is not None and stop < start:
        raise ValueError(f"stop_at_layer={stop_at_layer} is below start_layer={start_layer}")
    if stop is not None and return_type == "logits":
        raise ValueError("stop_at_layer stops before the unembed: use return_type='resid' or None")
    if return_type == "resid" and stop is None:
        stop = n
    if not (isinstance(resid, Tensor) and resid.is_floating_point() and resid.ndim == 3):
        raise ValueError("resid must be a float tensor [batch, pos, d_model]")
    if resid.shape[-1] != model.cfg.d_model:
        raise ValueError(f"resid has d_model {resid.shape[-1]}, the model {model.cfg.d_model}")

    kwargs: dict[str, Any] = {}
    if attention_mask is not None:
        if tuple(attention_mask.shape) != tuple(resid.shape[:2]):
            raise ValueError(
                f"attention_mask {tuple(attention_mask.shape)} does not match resid {tuple(resid.shape[:2])}"
            )
        kwargs["attention_mask"] = attention_mask
        positions = _positions_from_mask(model, attention_mask)
        if positions is not None:
            kwargs["position_ids"] = positions

    hooks = _checked_hooks(fwd_hooks, start, stop)
    bridge_stop: int | None = None
    if stop is not None and stop < n:
        bridge_stop = stop  # the bridge's own stop: raises after blocks.{stop}.hook_in fired
    elif stop == n:
        # No block n to stop at: end the run on the last block's output, after the caller's
        # hooks there (added last, so it runs last).
        hooks.append(stop_after_last_block(model))

    with _skipped_blocks(model, start), model.hooks(fwd_hooks=hooks):
        out = model.forward(
            resid,
            return_type="logits" if return_type == "logits" else None,
            start_at_layer=start,
            stop_at_layer=bridge_stop,
            **kwargs,
        )
    if return_type is None:
        return None
    if not isinstance(out, Tensor):  # pragma: no cover - the bridge contract
        raise RuntimeError(f"the bridge returned {type(out).__name__}, expected a tensor")
    return out
