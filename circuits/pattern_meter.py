"""The one base for meters that read the attention pattern: a statistic is a reducer, written once.

Why: the pattern reaches a meter by two paths. Where the model runs fused
(:mod:`circuits.fused_attention`), the layer's attention hands its softmax rows block by block
(:func:`circuits.fused_attention.reduce_pattern`) and no ``T x T`` tensor exists. Where it runs
eager (a hook of the run reads or edits that layer's pattern, or the model has no fused path),
``hook_pattern`` carries the whole pattern. Both now end in the same place: the eager pattern is
handed to the same :data:`~circuits.blockwise.Reducer` as one :class:`~circuits.blockwise.PatternBlock`
(:func:`whole_pattern`), so a statistic of the pattern is one function that works on every layer,
fused or not.

A meter of the pattern subclasses :class:`PatternMeter` and says two things per layer:

* :meth:`PatternMeter.reducer`: a fresh reducer for this layer and sub-batch (it sees every block
  of the layer's pattern, whichever path the layer runs);
* :meth:`PatternMeter.collect`: what to store once the layer's attention has run (at
  :attr:`PatternMeter.collect_at`, ``hook_z`` by default: the reducer has seen every block).

Which layers run fused is decided here once, from the run's other hooks (the ``see_hooks`` step
of the :class:`~circuits.meter.Meter` protocol) with :func:`circuits.fused_attention.reducible_layers`.
Its extra hooks, per layer, come from :meth:`PatternMeter.layer_hooks`.
"""

from __future__ import annotations

from typing import Any, Sequence

from jaxtyping import Float
from torch import Tensor

from circuits.blockwise import PatternBlock, Reducer
from circuits.fused_attention import reduce_pattern, reducible_layers
from circuits.meter import ArrayMeter, Hook, MeterError


def whole_pattern(pattern: Float[Tensor, "batch head query key"]) -> PatternBlock:
    """An eager layer's whole pattern as one block (every head its own group of one), so a
    reducer written for the fused blocks reads it unchanged."""
    t_q, t_k = pattern.shape[-2], pattern.shape[-1]
    return PatternBlock(probs=pattern[:, :, :, None, :], q0=0, q1=t_q, lo=0, hi=t_k, kv_length=t_k)


class PatternMeter(ArrayMeter):
    """An :class:`~circuits.meter.ArrayMeter` whose attention statistics come from reducers of
    the pattern (see the module doc). Subclasses implement :meth:`reducer` and :meth:`collect`,
    and may add hooks of their own per layer in :meth:`layer_hooks`."""

    #: the hook of a layer at which its attention has run and the reduction is complete
    collect_at: str = "attn.hook_z"

    def __init__(self, model, schema, sizes, *, block: int | None = None):
        super().__init__(schema, sizes)
        self.model = model
        self.n_layers = int(model.cfg.n_layers)
        self.block = block  # queries per fused block (None: circuits.blockwise.stats_block)
        self._other_hooks: Sequence[Hook] = ()
        self._pending: dict[int, Reducer] = {}

    # -- what a subclass says ------------------------------------------------------------------
    def reducer(self, layer: int) -> Reducer:
        """A fresh reducer of layer ``layer``'s pattern for the current sub-batch."""
        raise NotImplementedError

    def collect(self, layer: int, reducer: Reducer) -> None:
        """Store what ``reducer`` gathered, once the layer's attention has run."""
        raise NotImplementedError

    def layer_hooks(self, layer: int) -> list[Hook]:
        """Other hooks of this meter in layer ``layer``; one at :attr:`collect_at` runs after
        :meth:`collect`, so it can read what the collection stored."""
        return []

    # -- the protocol ---------------------------------------------------------------------------
    def see_hooks(self, hooks: Sequence[Hook]) -> None:
        self._other_hooks = list(hooks)

    def hooks(self) -> list[Hook]:
        """Per layer: the pattern's request (fused: at ``hook_rot_k``, before attention runs;
        eager: at ``hook_pattern``), the collection, then this meter's own hooks."""
        fused = reducible_layers(self.model, self._other_hooks)
        self._pending = {}  # left over from a forward that raised
        out: list[Hook] = []
        for layer in range(self.n_layers):
            if layer in fused:
                out.append((f"blocks.{layer}.attn.hook_rot_k", self._request(layer)))
            else:
                out.append((f"blocks.{layer}.attn.hook_pattern", self._whole(layer)))
            out.append((f"blocks.{layer}.{self.collect_at}", self._collect(layer)))
            out.extend(self.layer_hooks(layer))
        return out

    def end(self, logits: Any = None) -> None:
        if self._pending:
            layers, self._pending = sorted(self._pending), {}
            raise MeterError(f"{type(self).__name__}: the attention statistics of layers {layers} were asked for but never collected")
        super().end(logits)

    # -- the two paths into one reducer -----------------------------------------------------------
    def _request(self, layer: int):
        attn = self.model.blocks[layer].attn

        def hook(k, hook):
            self._pending[layer] = reducer = self.reducer(layer)
            reduce_pattern(attn, reducer, block=self.block)

        return hook

    def _whole(self, layer: int):
        def hook(pattern: Float[Tensor, "batch head query key"], hook):
            self._pending[layer] = reducer = self.reducer(layer)
            reducer(whole_pattern(pattern.detach().float()))

        return hook

    def _collect(self, layer: int):
        def hook(x, hook):
            reducer = self._pending.pop(layer, None)
            if reducer is not None:
                self.collect(layer, reducer)

        return hook


__all__ = ["PatternMeter", "whole_pattern"]
