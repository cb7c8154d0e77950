"""The paired runner: a clean run and intervened runs of the same sub-batches, compared by their logits.

Why this module exists. Every causal number in sinkscope is a difference between two runs of
the same sequences, and three entry points need it: :func:`interventions.effect.measure_effect`
(clean, intervened, control), :func:`interventions.sweep.sweep` (clean once, hundreds of items)
and :func:`interventions.effect.output_change` (clean, several edits). They differ only in what
they measure; the pairing itself is written once, here. Every forward goes through the one
driver (:func:`circuits.driver.drive`); this module only decides what each run hooks and keeps:

* the **clean run** of a sub-batch keeps ``h_0^l`` (the first token's block output, the
  primary-sink directions an intervention's :class:`~interventions.base.RunContext` may need, so
  no separate reference run is done) and its logits, and is measured by the caller's meters;
* each **arm** (one intervention, an :class:`Arm`) registers its hooks for the sub-batch, is
  measured by its own meter, and gets ``KL(clean || arm)`` per position (:func:`kl_divergence`)
  while both logits exist; the hook names it registered are recorded (they say where it acts).

Two schedules, one set of code (:class:`PairedRunner`):

* :meth:`PairedRunner.together`: per sub-batch the clean forward then each arm's, full
  forwards; only one sub-batch's clean logits are alive at a time and full logits are never
  stored (an effect, the output change);
* :meth:`PairedRunner.clean_once` then :meth:`PairedRunner.stacked`: the clean pass runs once,
  keeping per sub-batch the residual entering every block an arm starts at (prefix reuse,
  :mod:`interventions.forward`) and the clean logits; arms that start at the same block then run
  as stacked copies of the sub-batch in one forward, from that block (the sweep, whose items
  finish, and are stored, one stack at a time).

The defaults of both (``batch_size``, ``progress``) are :class:`~interventions.settings.RunSettings`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np
import torch
from jaxtyping import Bool, Float
from torch import Tensor

from circuits.driver import BY_LENGTH, Run, drive, full_forward
from circuits.measure import SinkMeter
from circuits.meter import Hook, Meter, SubBatch
from circuits.probes import TokenBatch
from interventions.base import HookFactory, Intervention, InterventionError, checked_hooks
from interventions.forward import capture_resid_pre, run_from_layer
from interventions.hookpoints import hook_layer
from interventions.settings import RunSettings

#: ``on_pair(sub, arm_index, clean_logits, logits, kl)``: after an arm's forward of a sub-batch
#: (``kl``: ``[batch, pos]`` float64, NaN at pads), while the clean logits of that sub-batch exist
OnPair = Callable[[SubBatch, int, Tensor, Tensor, Tensor], None]
#: ``on_clean(sub, logits)``: after the clean forward of a sub-batch
OnClean = Callable[[SubBatch, Tensor], None]


@torch.no_grad()
def kl_divergence(
    clean_logits: Float[Tensor, "batch pos vocab"],
    intervened_logits: Float[Tensor, "batch pos vocab"],
    valid: Bool[Tensor, "batch pos"],
) -> Float[Tensor, "batch pos"]:
    """KL(clean || intervened) of the next-token distributions at every position (nats).

    One sequence at a time in float64 (float32 loses the small KLs of mild interventions to
    rounding), so only a few ``[pos, vocab]`` temporaries exist; pad positions are NaN.
    Identical logits give exactly 0.
    """
    b, t = clean_logits.shape[:2]
    out = torch.full((b, t), torch.nan, dtype=torch.float64)
    for i in range(b):
        logp = torch.log_softmax(clean_logits[i].double(), dim=-1)
        logq = torch.log_softmax(intervened_logits[i].to(logp.device).double(), dim=-1)
        kl = (logp.exp() * (logp - logq)).sum(-1).clamp_min(0.0).cpu()
        out[i] = torch.where(valid[i, :t].cpu(), kl, torch.nan)
    return out


def first_token_resid_hooks(n_layers: int, into: dict[int, Tensor]) -> list[Hook]:
    """Hooks keeping ``h_0^l`` (block output at position 0) of every layer: the primary-sink
    directions an intervention's :class:`~interventions.base.RunContext` may need, taken from
    the clean run instead of a separate reference run."""

    def keep(layer: int):
        def hook(resid: Tensor, hook) -> None:
            into[layer] = resid[:, 0].detach().clone()

        return hook

    return [(f"blocks.{l}.hook_resid_post", keep(l)) for l in range(n_layers)]


@dataclass
class Arm:
    """One intervened run, paired with the clean run of the same sub-batches.

    Attributes:
        intervention, factory: what runs, and its validated hook factory
            (:func:`interventions.base.hooks_for`).
        meter: measures the intervened run (None: nothing measured, e.g. the output change).
        start: the first block the run executes in :meth:`PairedRunner.stacked` (prefix reuse;
            None: the full forward). Hooks below it are refused.
        pattern: whether its hooks need the attention pattern (from its hook names,
            :meth:`~interventions.base.Intervention.reach`); a sweep stacks such arms only with
            each other.
        kl: ``[N, T]`` KL(clean || this run) per position, NaN at pads and without logits.
        names: the hook names the intervention registered, over all sub-batches.
    """

    intervention: Intervention
    factory: HookFactory
    meter: SinkMeter | None = None
    start: int | None = None
    pattern: bool = False
    kl: Float[np.ndarray, "seq pos"] | None = None
    names: set[str] = field(default_factory=set)

    def meters(self) -> list[Meter]:
        return [] if self.meter is None else [self.meter]


@dataclass
class _Clean:
    """What the clean run keeps of one sub-batch for the arms."""

    firsts: dict[int, Tensor] = field(default_factory=dict)  # h_0^l: seeds the primary-sink directions
    resid: dict[int, Tensor] = field(default_factory=dict)  # residual entering each start block
    logits: Tensor | None = None  # [b, pos, vocab]


def _key(sub: SubBatch) -> tuple[int, ...]:
    return tuple(sub.rows)


class PairedRunner:
    """Clean and intervened runs of ``batch`` on ``model``, per sub-batch (see the module doc).

    ``settings``: the batching (:class:`~interventions.settings.RunSettings`); ``logits``:
    whether forwards compute logits (without them no KL, and forwards stop after the last
    block); ``by_length``: the driver's sub-batch order.
    """

    def __init__(self, model, batch: TokenBatch, settings: RunSettings | None = None, *, logits: bool = True,
                 by_length: bool = BY_LENGTH, desc: str = "paired"):
        self.model, self.batch, self.settings = model, batch, settings or RunSettings()
        self.logits, self.by_length, self.desc = logits, by_length, desc
        self.n_layers = int(model.cfg.n_layers)
        self.clean: dict[tuple[int, ...], _Clean] = {}

    # -- pieces ----------------------------------------------------------------------------
    def _drive(self, runs: Sequence[Run], **kwargs: Any) -> None:
        s = self.settings
        drive(self.model, self.batch, runs, batch_size=s.batch_size, logits=self.logits, by_length=self.by_length, **kwargs)

    def _new_kl(self, arms: Sequence[Arm]) -> None:
        for arm in arms:
            arm.kl = np.full((len(self.batch), int(self.batch.lengths.max())), np.nan)

    def _keep_firsts(self, sub: SubBatch) -> list[Hook]:
        chunk = self.clean[_key(sub)] = _Clean()
        return first_token_resid_hooks(self.n_layers, chunk.firsts)

    def _arm_hooks(self, arm: Arm) -> Callable[[SubBatch], list[Hook]]:
        def hooks(sub: SubBatch) -> list[Hook]:
            ctx = arm.factory.context(sub, sink_directions=self.clean[_key(sub)].firsts)
            hooks = checked_hooks(self.model, arm.intervention, ctx)
            below = [n for n, _ in hooks if arm.start is not None and 0 <= hook_layer(n) < arm.start]
            if below:
                raise InterventionError(
                    f"{type(arm.intervention).__name__}: the run starts at block {arm.start} but it hooks {below}"
                )
            arm.names.update(n for n, _ in hooks)
            return hooks

        return hooks

    def _pair(self, sub: SubBatch, arm: Arm, logits: Tensor) -> Tensor:
        kl = kl_divergence(self.clean[_key(sub)].logits, logits, sub.valid)
        arm.kl[sub.rows, : sub.tokens.shape[1]] = kl.numpy()
        return kl

    # -- schedules -----------------------------------------------------------------------
    def together(self, arms: Sequence[Arm], *, clean_meters: Sequence[Meter] = (), on_clean: OnClean | None = None,
                 on_pair: OnPair | None = None) -> None:
        """Per sub-batch the clean forward (measured by ``clean_meters``), then each arm's; full
        forwards. Only the current sub-batch's clean logits are kept."""
        arms = list(arms)
        self._new_kl(arms)

        def after(sub: SubBatch, run: int, logits: Tensor | None) -> None:
            if logits is not None and run == 0:
                self.clean[_key(sub)].logits = logits
                if on_clean is not None:
                    on_clean(sub, logits)
            elif logits is not None:
                kl = self._pair(sub, arms[run - 1], logits)
                if on_pair is not None:
                    on_pair(sub, run - 1, self.clean[_key(sub)].logits, logits, kl)
            if run == len(arms):
                self.clean.pop(_key(sub))

        runs = [Run(list(clean_meters), self._keep_firsts), *(Run(arm.meters(), self._arm_hooks(arm)) for arm in arms)]
        self._drive(runs, on_logits=after, progress=self.settings.progress, desc=self.desc)

    def clean_once(self, starts: Sequence[int], *, clean_meters: Sequence[Meter] = ()) -> None:
        """The clean forward of every sub-batch, once, measured by ``clean_meters``; keeps per
        sub-batch ``h_0^l``, the residual entering every block in ``starts`` and the logits."""
        starts = sorted(set(starts))

        def capture(model, sub: SubBatch, hooks: list[Hook], logits: bool, copies: int) -> Tensor | None:
            if not starts:
                return full_forward(model, sub, hooks, logits, copies)
            chunk, tokens = self.clean[_key(sub)], sub.tokens.to(model.cfg.device)
            with model.hooks(fwd_hooks=hooks):
                if logits:
                    out, chunk.resid = capture_resid_pre(model, tokens, starts, run="logits")
                    return out
                chunk.resid = capture_resid_pre(model, tokens, starts, run="all_blocks")
            return None

        def keep_logits(sub: SubBatch, run: int, logits: Tensor | None) -> None:
            self.clean[_key(sub)].logits = logits

        self._drive([Run(list(clean_meters), self._keep_firsts)], forward=capture, on_logits=keep_logits)

    def stacked(self, arms: Sequence[Arm]) -> None:
        """``arms``, which share their ``start``, as stacked copies of each sub-batch in one
        forward from that block, against the clean run kept by :meth:`clean_once`."""
        arms = list(arms)
        start = arms[0].start
        if any(arm.start != start for arm in arms):
            raise InterventionError(f"stacked arms must start at the same block, got {sorted({str(a.start) for a in arms})}")
        if self.logits:
            self._new_kl(arms)

        def from_start(model, sub: SubBatch, hooks: list[Hook], logits: bool, copies: int) -> Tensor | None:
            if start is None:
                return full_forward(model, sub, hooks, logits, copies)
            # the meters' hooks on blocks below the start do not fire: those layers come from the clean run
            hooks = [(n, fn) for n, fn in hooks if not 0 <= hook_layer(n) < start]
            resid = self.clean[_key(sub)].resid[start].repeat(copies, 1, 1)
            out = run_from_layer(model, resid, start, fwd_hooks=hooks, return_type="logits" if logits else "resid")
            return out if logits else None

        def after(sub: SubBatch, i: int, logits: Tensor | None) -> None:
            if logits is not None:
                self._pair(sub, arms[i], logits)

        runs = [Run(arm.meters(), self._arm_hooks(arm)) for arm in arms]
        self._drive(runs, stacked=True, forward=from_start, on_logits=after)


__all__ = ["Arm", "OnClean", "OnPair", "PairedRunner", "first_token_resid_hooks", "kl_divergence"]
