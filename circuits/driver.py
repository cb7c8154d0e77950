"""One driver: meters, and any intervention's hooks, over the sub-batches of a batch.

Why one: the loop "for each sub-batch: begin the meters, register hooks (the intervention's
first, so the meters see the edited activations), forward, end the meters" is the core of every
measurement in sinkscope. :func:`circuits.measure.measure`, :func:`circuits.analyses.observe`,
:func:`interventions.effect.measure_effect` (clean, intervened and control runs) and
:func:`interventions.sweep.sweep` all call :func:`drive`; they differ only in what they hand it:

* ``runs``: per sub-batch, one forward per :class:`Run` (its hooks, then its meters' hooks), in
  order: measure is one run, an effect is "clean, then intervened". With ``stacked=True`` the
  runs are copies of the sub-batch stacked along the batch axis in *one* forward, each copy
  with its own hooks and meters (:func:`stacked_hooks`): the sweep's variants.
* ``forward``: how a forward is done. :func:`full_forward` (the default) is ``run_with_hooks``,
  stopping after the last block when no logits are wanted; the sweep passes its prefix-reuse
  forward (:func:`interventions.forward.run_from_layer` from a cached residual).
* ``on_logits(sub, i, logits)``: called after run ``i`` of each sub-batch with its logits. The
  driver keeps no logits, so a callback that compares runs, e.g. KL(clean || intervened),
  keeps the clean run's until the intervened run's arrive: only one sub-batch's logits are
  ever alive, and full logits are never stored.

Sub-batches come from :func:`iter_batches`, sorted by length so little compute goes to padding
(or in batch order, ``by_length=False``). Each is a :class:`~circuits.meter.SubBatch` that
knows its rows in the full batch, so meters put their results back in batch order and hook
sources or a forward can look up per-sub-batch state. Hooks come in as data: a list of
``(name, fn)`` or a function ``sub_batch -> hooks``, called right before that run's forward (so
it may use what an earlier run of the same sub-batch captured). The driver knows nothing of
interventions: :mod:`circuits` never imports :mod:`interventions`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

import torch
from jaxtyping import Float
from torch import Tensor
from tqdm.auto import tqdm

from circuits.checks import check_int
from circuits.fused_attention import fused_attention, hook_rows
from circuits.meter import Hook, Meter, MeterError, SubBatch
from circuits.probes import TokenBatch, check_batch

HookSource = Sequence[Hook] | Callable[[TokenBatch], Sequence[Hook]]
#: ``forward(model, sub, fwd_hooks, logits, copies)``: the logits of ``copies`` stacked copies of
#: ``sub`` (``[copies * batch, pos, vocab]``), or None when ``logits`` is False
Forward = Callable[[Any, SubBatch, list[Hook], bool, int], Tensor | None]
#: ``on_logits(sub, run_index, logits)``: after each run's forward (logits None without them)
OnLogits = Callable[[SubBatch, int, Tensor | None], None]


@dataclass
class Run:
    """One forward's worth of work per sub-batch: hooks (an intervention's) and the meters that measure it."""

    meters: Sequence[Meter] = ()
    hooks: HookSource = ()

    def hook_list(self, sub: SubBatch) -> list[Hook]:
        """The run's own hooks, then its meters' (called after the meters' ``begin``).

        Every meter is shown the run's own hooks first (``see_hooks``, part of the
        :class:`~circuits.meter.Meter` protocol), so it can choose where to measure (a
        :class:`~circuits.pattern_meter.PatternMeter` reads the edited pattern of a layer whose
        pattern an intervention touches, and the fused blocks elsewhere).
        """
        own = list(self.hooks(sub) if callable(self.hooks) else self.hooks)
        for m in self.meters:
            m.see_hooks(own)
        return [*own, *(h for m in self.meters for h in m.hooks())]


#: The batching of every entry point that runs the model over a batch (:func:`drive`,
#: :func:`circuits.measure.measure`, :func:`circuits.analyses.observe`): sequences per forward
#: pass, and whether sub-batches group sequences of similar length (results always come back in
#: batch order; grouping by length only saves the compute spent on padding, and moves the
#: statistics of a sequence whose sub-batch changes at the float-rounding level).
BATCH_SIZE: int = 8
BY_LENGTH: bool = True


def iter_batches(batch: TokenBatch, batch_size: int, *, by_length: bool = BY_LENGTH) -> Iterator[list[int]]:
    """Rows of sub-batches of at most ``batch_size`` sequences: sorted by length (longest
    first, so little compute goes to padding), or in batch order."""
    if by_length:
        order = torch.argsort(batch.lengths, descending=True, stable=True).tolist()
    else:
        order = list(range(len(batch)))
    for start in range(0, len(order), batch_size):
        yield order[start : start + batch_size]


def stop_after_last_block(model) -> Hook:
    """A hook that ends the forward on the last block's output: no final norm, no unembedding.

    It raises the bridge's own ``StopAtLayerException``, which ``forward`` catches (its own
    ``stop_at_layer`` only stops *before* a block). Register it after the other hooks on that
    point so they run first. On Gemma 3 (262k vocabulary) the unembedding costs as much as ~30
    blocks, so a measurement that needs no logits runs about twice as fast.
    """
    # deferred: transformer_lens takes seconds to import; a model that runs has loaded it already
    from transformer_lens.model_bridge.exceptions import StopAtLayerException

    def stop(resid: Tensor, hook) -> None:
        raise StopAtLayerException(resid)

    return (f"blocks.{len(model.blocks) - 1}.hook_out", stop)


def full_forward(model, sub: SubBatch, fwd_hooks: list[Hook], logits: bool, copies: int = 1) -> Float[Tensor, "batch pos vocab"] | None:
    """The default :data:`Forward`: every block with ``run_with_hooks``; without logits it stops
    after the last block (:func:`stop_after_last_block`)."""
    tokens = sub.tokens.to(model.cfg.device)
    if copies > 1:
        tokens = tokens.repeat(copies, 1)
    # use_cache=False: HF would otherwise fill a key-value cache of every layer (2 x layers x T x
    # d_kv floats) that a measurement never reads
    if logits:
        return model.run_with_hooks(tokens, fwd_hooks=fwd_hooks, return_type="logits", use_cache=False)
    model.run_with_hooks(tokens, fwd_hooks=[*fwd_hooks, stop_after_last_block(model)], return_type=None, use_cache=False)
    return None


def stacked_hooks(model, copies: Sequence[Sequence[Hook]], rows: int) -> list[Hook]:
    """One hook per hook point for ``len(copies)`` stacked copies of a ``rows``-sequence batch.

    Copy ``i`` occupies rows ``i*rows..(i+1)*rows`` of every activation; its hooks run, in their
    order, on that slice only. Aliases of one hook point are merged (the first name is used).
    Exact as long as every hook acts on each sequence independently. While copy ``i``'s hooks
    run, :data:`circuits.fused_attention.hook_rows` is its slice, so a pattern reduction it
    asks for (:func:`circuits.fused_attention.reduce_pattern`) sees its rows only.
    """
    hook_dict = model.hook_dict
    order: list[str] = []
    by_point: dict[Any, list[list[Callable]]] = {}
    for i, hooks in enumerate(copies):
        for name, fn in hooks:
            point = id(hook_dict[name]) if name in hook_dict else name
            if point not in by_point:
                by_point[point] = [[] for _ in copies]
                order.append(name)
            by_point[point][i].append(fn)
    names = {id(hook_dict[n]) if n in hook_dict else n: n for n in reversed(order)}

    def composite(fns: list[list[Callable]]):
        def hook(act: Tensor, hook):
            pieces, changed = [], False
            for i, copy_fns in enumerate(fns):
                piece = act[i * rows : (i + 1) * rows]
                token = hook_rows.set(slice(i * rows, (i + 1) * rows))  # what reduce_pattern hands this copy
                try:
                    for fn in copy_fns:
                        out = fn(piece, hook)
                        if out is not None:
                            piece, changed = out, True
                finally:
                    hook_rows.reset(token)
                pieces.append(piece)
            return torch.cat(pieces, dim=0) if changed else None

        return hook

    return [(names[point], composite(fns)) for point, fns in by_point.items()]


@torch.no_grad()
def drive(
    model,
    batch: TokenBatch,
    runs: Run | Sequence[Run],
    *,
    batch_size: int = BATCH_SIZE,
    logits: bool = True,
    stacked: bool = False,
    forward: Forward = full_forward,
    on_logits: OnLogits | None = None,
    by_length: bool = BY_LENGTH,
    progress: bool = False,
    desc: str = "measuring",
    fused: bool = True,
) -> None:
    """Run ``runs`` over ``batch``, ``batch_size`` sequences at a time (see the module doc).

    Args:
        runs: one :class:`Run` or several, done in order per sub-batch (``stacked``: as copies
            in one forward; ``batch_size`` then bounds the rows of one copy).
        logits: whether the forward computes logits (meters get ``end(None)`` otherwise).
        forward: the forward function (:data:`Forward`), :func:`full_forward` by default.
        on_logits: ``(sub_batch, run_index, logits)``, after every run of every sub-batch.
        by_length: sub-batches sorted by length (results still come back in batch order).
        progress, desc: a tqdm bar over sub-batches (shown from two sub-batches on).
        fused: run attention fused wherever no hook needs the pattern
            (:func:`circuits.fused_attention.fused_attention`); False: eager everywhere.
    """
    if isinstance(batch, TokenBatch) and len(batch) == 0:
        raise MeterError("empty batch: no sequence to measure")
    batch = check_batch(model, batch)  # a batch, not empty, each sequence long enough, every id in the vocabulary
    check_int(batch_size, "batch_size", error=MeterError)
    runs = [runs] if isinstance(runs, Run) else list(runs)
    chunks = list(iter_batches(batch, batch_size, by_length=by_length))
    with fused_attention(model, enabled=fused):
        _drive(model, batch, runs, chunks, logits=logits, stacked=stacked, forward=forward, on_logits=on_logits,
               progress=progress, desc=desc)


def _drive(model, batch: TokenBatch, runs: list[Run], chunks: list[list[int]], *, logits: bool, stacked: bool,
           forward: Forward, on_logits: OnLogits | None, progress: bool, desc: str) -> None:
    for rows in tqdm(chunks, desc=desc, unit="batch", disable=not progress or len(chunks) < 2):
        sub = SubBatch.of(batch, rows)
        if stacked:
            for run in runs:
                for m in run.meters:
                    m.begin(sub)
            fwd = stacked_hooks(model, [run.hook_list(sub) for run in runs], len(sub))
            out = forward(model, sub, fwd, logits, len(runs))
            b = len(sub)
            for i, run in enumerate(runs):
                piece = None if out is None else out[i * b : (i + 1) * b]
                for m in run.meters:
                    m.end(piece)
                if on_logits is not None:
                    on_logits(sub, i, piece)
                del piece
            del out
        else:
            for i, run in enumerate(runs):
                for m in run.meters:
                    m.begin(sub)
                out = forward(model, sub, run.hook_list(sub), logits, 1)
                for m in run.meters:
                    m.end(out)
                if on_logits is not None:
                    on_logits(sub, i, out)
                del out


__all__ = ["Forward", "HookSource", "OnLogits", "Run", "drive", "full_forward", "iter_batches", "stacked_hooks", "stop_after_last_block"]
