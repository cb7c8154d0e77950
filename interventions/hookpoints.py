"""Where an intervention acts, read from the hook names it registers.

Why this module exists. Every question about *where* an intervention acts — which blocks it
hooks, the first block a prefix-reusing sweep must run (:mod:`interventions.forward`), whether
its hooks need the attention pattern (so that block runs eager, :mod:`circuits.fused_attention`),
the first block whose attention it can change (the target of
:func:`interventions.targets.target_of`) — is answered here, from one source: the
``(hook_name, fn)`` pairs its :meth:`~interventions.base.Intervention.hooks` returns. No kind
declares its blocks or its pattern use a second time, so a user kind that only writes
``hooks()`` is placed exactly like a built-in one.

How the names are known before any forward. Some kinds need a forward pass to *build* their
hooks (the clean sink directions of :class:`~interventions.mlp.RescaleAlongSink`, the reference
means of :class:`~interventions.mlp.AblateMLP`), and a sweep must plan from the names before its
clean pass. The rule that makes this possible: a hook *name* is a function of the model, the
intervention's fields and the batch (its shape, which sequences it holds), never of prepared
data; prepared data (``ctx.state(self)``, clean activations, sink directions) is read inside
the hook function, when the hook fires. :func:`interventions.base.hook_points` then calls
``hooks()`` on a *planning* :class:`~interventions.base.RunContext` — the batch without any
preparation — and keeps the names; the planning context refuses to hand out prepared data,
so a kind that breaks the rule gets an error that names the fix, never a forward pass.

:class:`Reach` holds the answers for one set of names; the name anatomy they rest on (a hook's
block, which hooks of a block sit after its attention pattern) is written once, below.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Iterable

from circuits.fused_attention import pattern_layers
from interventions.settings import EffectError

_BLOCK_HOOK = re.compile(r"^blocks\.(\d+)\.")

# Hooks of block l that sit after its attention pattern: an edit there first changes the
# attention (hence the sink score) of block l + 1. Anything else in block l (its input, ln1,
# q/k/v, scores, pattern) can change block l's own pattern.
_AFTER_PATTERN = (
    "attn.hook_z", "attn.hook_result", "attn.o.", "attn.hook_out", "hook_attn_out", "ln2", "hook_resid_mid",
    "hook_mlp_in", "mlp.", "hook_mlp_out", "hook_resid_post", "hook_out",
)


def hook_layer(name: str) -> int:
    """Block index of a hook name; -1 for hooks outside the blocks (embedding, final norm)."""
    match = _BLOCK_HOOK.match(name)
    return int(match.group(1)) if match else -1


def first_affected_layer(hook_names: Iterable[str]) -> int:
    """The first block whose attention pattern hooks named ``hook_names`` can change.

    An edit before or at block l's pattern (its input, ``ln1``, q/k/v, scores, the pattern
    itself) changes block l; an edit after it (``hook_z``, attention output, MLP, block output)
    first reaches block l + 1. Hooks outside the blocks (embedding) change block 0.
    """
    first = None
    for name in hook_names:
        layer = hook_layer(name)
        if layer < 0:
            layer_seen = 0
        else:
            rest = name.split(".", 2)[2] if name.count(".") >= 2 else ""
            layer_seen = layer + 1 if rest.startswith(_AFTER_PATTERN) else layer
        first = layer_seen if first is None else min(first, layer_seen)
    if first is None:
        raise EffectError("the intervention registered no hook")
    return first


@dataclass(frozen=True)
class Reach:
    """Where the hooks named ``names`` act on ``model`` (:meth:`Reach.of`).

    Attributes:
        names: the hook names, in registration order, without repeats.
        layers: the blocks they hook, sorted; -1 stands for a hook outside the blocks.
        start: the first block a run from a cached clean residual may start at
            (:func:`interventions.forward.run_from_layer`); None when a hook sits outside the
            blocks (embedding, final norm), so the full forward must run.
        pattern: whether a hook reads or edits ``hook_attn_scores`` / ``hook_pattern`` (aliases
            included): those blocks run eager attention, the full ``T x T`` pattern.
    """

    names: tuple[str, ...]
    layers: tuple[int, ...]
    start: int | None
    pattern: bool

    @classmethod
    def of(cls, model, names: Iterable[str]) -> "Reach":
        names = tuple(dict.fromkeys(names))
        layers = tuple(sorted({hook_layer(n) for n in names}))
        start = None if not layers or layers[0] < 0 else layers[0]
        return cls(names, layers, start, bool(pattern_layers(model, [(n, None) for n in names])))

    def first_affected_layer(self) -> int:
        """The first block whose attention these hooks can change (:func:`first_affected_layer`)."""
        return first_affected_layer(self.names)


__all__ = ["Reach", "first_affected_layer", "hook_layer"]
