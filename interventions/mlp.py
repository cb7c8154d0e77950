"""MLP interventions: ablate, patch, and rescale along the primary-sink direction.

Why these three. Wong et al. find that secondary sinks are *written* by specific middle-layer
MLPs, which map a token onto the primary-sink direction, and that the L2 norm of that MLP
output sets the sink's strength and lifetime. Testing that story takes:

* :class:`AblateMLP` — remove an MLP's contribution at chosen layers and positions (zero,
  mean over a reference batch, or resampled from another prompt): is the sink still created?
* :class:`PatchActivation` / :class:`PatchMLP` — copy an activation from another run, prompt
  or position: is the MLP output *sufficient* to plant the sink elsewhere?
* :class:`RescaleAlongSink` — change only the part of the MLP output that lies along the
  primary-sink direction (or, as in Wong et al.'s code, the whole output where it is aligned):
  does the sink score follow the norm?

Where the MLP output is read. Every class here edits ``blocks.L.hook_mlp_out``: what the MLP
adds to the residual stream. On Llama/GPT-2 that is the down-projection output; on Gemma 3 it
is after the post-feed-forward norm (``ln2_post``), because the raw down-projection output is
renormalised before it reaches the residual, so rescaling it there would be partly undone.

Positions are 0-based and must exist in every sequence of the batch (they are validated
against the shortest one). Pad positions are never written with reference statistics.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import Any, ClassVar, Literal, get_args

import torch
from jaxtyping import Float
from torch import Tensor

from circuits.probes import TokenBatch
from interventions.base import (
    Compose,
    Hook,
    Intervention,
    RunContext,
    Sites,
    capture,
    capture_batches,
    check_hook_name,
    check_positions,
    coerce_bool,
    coerce_choice,
    coerce_float,
    coerce_int,
    coerce_ints,
    coerce_texts,
    fail,
    position_axis,
)
from interventions.registry import register

AblationMode = Literal["zero", "mean", "resample"]
MeanOver = Literal["position", "tokens"]
RescaleScope = Literal["component", "whole"]
EditMode = Literal["zero", "mean", "rescale"]
SinkReference = Literal["resid", "mlp_out"]


def mlp_hook(layer: int) -> str:
    return f"blocks.{layer}.hook_mlp_out"


def _position_index(positions: tuple[int, ...] | None, width: int, device) -> Tensor:
    return torch.arange(width, device=device) if positions is None else torch.tensor(positions, device=device)


# --------------------------------------------------------------------------- ablation


@register("ablate-mlp")
@dataclass(frozen=True)
class AblateMLP(Intervention):
    """Replace the MLP output at ``layers`` × ``positions`` (None: every position, 0 included).

    Modes:
        zero: the output becomes 0.
        mean: the mean output over a reference batch — ``reference`` texts, or by default
            the batch being run (the *whole* batch given to ``measure``, not the sub-batch).
            ``mean_over="position"`` (default) averages each position over the reference
            sequences that reach it, so position effects are kept; ``"tokens"`` pools every
            real token at positions >= 1 into one vector per layer (position 0 is left out of
            the pool because the first token's MLP output is an outlier that would dominate).
        resample: the output of another prompt at the same position. Without ``reference``
            each sequence takes it from the next sequence of the batch (cyclically); with
            ``reference`` texts, sequence ``i`` of the batch takes text ``i mod n``.
    """

    layers: tuple[int, ...]
    positions: tuple[int, ...] | None = None
    mode: AblationMode = "zero"
    reference: tuple[str, ...] | None = None
    mean_over: MeanOver = "position"

    sites: ClassVar[Sites] = Sites(layers="layers", positions="positions")

    def __post_init__(self) -> None:
        object.__setattr__(self, "layers", coerce_ints(self, "layers", self.layers, allow_none=False))
        object.__setattr__(self, "positions", coerce_ints(self, "positions", self.positions))
        coerce_choice(self, "mode", self.mode, get_args(AblationMode))
        coerce_choice(self, "mean_over", self.mean_over, get_args(MeanOver))
        object.__setattr__(self, "reference", coerce_texts(self, "reference", self.reference))
        if self.mode == "zero" and self.reference is not None:
            raise fail(self, "reference", "is only used by mode='mean' or mode='resample'")

    def prepare(self, model, ctx: RunContext) -> Any:
        if self.mode == "zero":
            return None
        if self.mode == "mean":
            return self._means(model, ctx)
        return self._resampled(model, ctx)

    # -- mean ------------------------------------------------------------------------------
    def _reference(self, model, ctx: RunContext) -> TokenBatch:
        if self.reference is not None:
            return ctx.tokenize_reference(model, self, "reference", self.reference)
        return ctx.reference_batch

    def _means(self, model, ctx: RunContext) -> dict[int, Tensor]:
        ref = self._reference(model, ctx)
        key = ("ablate-mlp-mean", self.layers, self.mean_over, self.reference or id(ref))
        if key not in ctx.shared:
            ctx.shared[key] = mean_activations(model, ref, [mlp_hook(l) for l in self.layers], self.mean_over)
        means, counts = ctx.shared[key]
        if self.mean_over == "position":
            needed = list(self.positions) if self.positions is not None else list(range(int(ctx.batch.lengths.max())))
            for pos in needed:
                if pos >= counts.shape[0] or counts[pos] == 0:
                    raise fail(
                        self, "reference",
                        f"no reference sequence reaches position {pos} (the longest has {counts.shape[0]} tokens); "
                        "give longer reference texts or mean_over='tokens'",
                    )
        elif counts == 0:
            raise fail(self, "reference", "the reference texts have no token after position 0 to average")
        return {l: means[mlp_hook(l)].to(model.cfg.device) for l in self.layers}

    # -- resample -------------------------------------------------------------------------
    def _resampled(self, model, ctx: RunContext) -> dict[int, Tensor]:
        source = self._reference(model, ctx)
        index = ctx.sequence_indices(ctx.reference_batch)
        if self.reference is None:
            if len(source) < 2:
                raise fail(self, "mode", "resample needs another prompt: give reference texts or a batch of >= 2 sequences")
            picks = [(j + 1) % len(source) for j in index]
        else:
            picks = [j % len(source) for j in index]
        for i, s in enumerate(picks):
            need = max(self.positions) + 1 if self.positions is not None else int(ctx.batch.lengths[i])
            if int(source.lengths[s]) < need:
                raise fail(
                    self, "reference",
                    f"sequence {i} needs a source of >= {need} tokens but its source has {int(source.lengths[s])}; "
                    "give explicit positions or longer reference texts",
                )
        picked = source.select(picks)
        acts = capture(model, picked.tokens, [mlp_hook(l) for l in self.layers])
        return {l: acts[mlp_hook(l)] for l in self.layers}

    # -- hooks -----------------------------------------------------------------------------
    def hooks(self, model, ctx: RunContext) -> list[Hook]:
        valid = ctx.batch.valid.to(model.cfg.device)
        return [(mlp_hook(l), self._hook(ctx, l, valid)) for l in self.layers]

    def _hook(self, ctx: RunContext, layer: int, valid):
        iv, positions, mode, mean_over = self, self.positions, self.mode, self.mean_over

        def hook(mlp_out: Float[Tensor, "batch pos d_model"], hook) -> Tensor:
            state = ctx.state(iv)  # prepared means or sources, read when the hook fires
            replacement = None if state is None else state[layer]
            t = mlp_out.shape[1]
            idx = _position_index(positions, t, mlp_out.device)
            if mode == "zero":
                new = torch.zeros_like(mlp_out[:, idx])
            elif mode == "mean" and mean_over == "tokens":
                new = replacement.to(mlp_out.dtype).expand(mlp_out.shape[0], len(idx), -1)
            elif mode == "mean":
                new = replacement[idx].to(mlp_out.dtype).expand(mlp_out.shape[0], -1, -1)
            else:
                new = replacement[:, idx].to(mlp_out.dtype)
            out = mlp_out.clone()
            # Only real tokens take reference values: pads keep theirs (no NaN from empty means).
            out[:, idx] = torch.where(valid[:, idx, None], new, mlp_out[:, idx])
            return out

        return hook


@torch.no_grad()
def mean_activations(
    model, reference: TokenBatch, names: list[str], over: MeanOver = "position"
) -> tuple[dict[str, Tensor], Tensor]:
    """Mean activation of ``[batch, pos, d]`` hooks over the real tokens of ``reference``.

    Returns ``(means, counts)``: with ``over="position"`` each mean is ``[pos, d]`` and
    ``counts[pos]`` the number of sequences reaching it (positions nobody reaches hold 0);
    with ``over="tokens"`` each mean is ``[d]`` over positions >= 1 and ``counts`` a scalar.
    """
    width = int(reference.lengths.max())
    sums: dict[str, Tensor] = {}
    counts = torch.zeros(width if over == "position" else (), dtype=torch.float64)
    for sub, acts in capture_batches(model, reference, names):
        valid = sub.valid.clone()
        if over == "tokens":
            valid[:, 0] = False
        w = valid.to(torch.float64)
        for name, act in acts.items():
            a = act.detach().to("cpu", torch.float64) * w[..., None]
            part = a.sum(0) if over == "position" else a.sum((0, 1))
            if over == "position":
                total = sums.setdefault(name, torch.zeros(width, act.shape[-1], dtype=torch.float64))
                total[: part.shape[0]] += part
            else:
                sums[name] = sums.get(name, 0) + part
        if over == "position":
            counts[: w.shape[1]] += w.sum(0)
        else:
            counts += w.sum()
    denom = counts.clamp(min=1)
    means = {n: (s / (denom[:, None] if over == "position" else denom)).float() for n, s in sums.items()}
    return means, counts


# --------------------------------------------------------------------------- patching


@register("patch")
@dataclass(frozen=True)
class PatchActivation(Intervention):
    """Overwrite the activation at any hook point with the same hook's activation from
    another run, prompt or position.

    Args:
        hook_name: any name in ``model.hook_dict`` (e.g. ``blocks.3.hook_resid_post``,
            ``blocks.2.attn.hook_z``). The position axis is dim 1, or the query axis of
            attention patterns and scores.
        positions: target positions (None: every position).
        source_text: the prompt to take the activation from (tokenized with the batch's BOS
            policy, one run shared by every sequence). None: the clean run of the same
            sequence — a "restore" patch, useful composed with other interventions.
        source_position: take every patched value from this source position (None: each
            target position takes the same position of the source).

    A pattern or score hook patched from a source text needs a source as long as the batch
    (their key axis is positional too).
    """

    hook_name: str
    positions: tuple[int, ...] | None = None
    source_text: str | None = None
    source_position: int | None = None

    sites: ClassVar[Sites] = Sites(positions="positions")  # the layer is the hook name's

    def __post_init__(self) -> None:
        if not isinstance(self.hook_name, str) or not self.hook_name:
            raise fail(self, "hook_name", f"expected a hook point name, got {self.hook_name!r}")
        object.__setattr__(self, "positions", coerce_ints(self, "positions", self.positions))
        if self.source_text is not None and (not isinstance(self.source_text, str) or not self.source_text.strip()):
            raise fail(self, "source_text", f"expected a non-empty prompt, got {self.source_text!r}")
        if self.source_position is not None:
            object.__setattr__(self, "source_position", coerce_int(self, "source_position", self.source_position))

    def validate(self, model, n_positions: int | None = None) -> None:
        check_hook_name(self, "hook_name", self.hook_name, model)
        super().validate(model, n_positions)
        if self.source_text is None and self.source_position is not None:
            check_positions(self, "source_position", (self.source_position,), n_positions, model)

    def prepare(self, model, ctx: RunContext) -> Tensor:
        if self.source_text is None:
            return ctx.clean_activations(model, [self.hook_name])[self.hook_name]
        src_batch = ctx.tokenize_reference(model, self, "source_text", (self.source_text,))
        n_src, width = int(src_batch.lengths[0]), int(ctx.batch.tokens.shape[1])
        if self.source_position is not None and self.source_position >= n_src:
            raise fail(self, "source_position", f"position {self.source_position} is beyond the source text ({n_src} tokens)")
        if self.source_position is None:
            need = max(self.positions) + 1 if self.positions is not None else width
            if n_src < need:
                raise fail(self, "source_text", f"has {n_src} tokens but the patch reads its positions up to {need - 1}")
        if self.hook_name.endswith(("hook_pattern", "hook_attn_scores")) and n_src != width:
            what = self.hook_name.rsplit("_", 1)[-1]
            raise fail(self, "source_text", f"an attention {what} needs a source as long as the batch ({width} tokens), got {n_src}")
        key = ("patch-source", self.hook_name, self.source_text, ctx.batch.prepend_bos)
        if key not in ctx.shared:
            ctx.shared[key] = capture(model, src_batch.tokens, [self.hook_name])[self.hook_name]
        return ctx.shared[key]

    def hooks(self, model, ctx: RunContext) -> list[Hook]:
        iv = self
        axis = position_axis(model, self.hook_name)
        positions, source_position = self.positions, self.source_position

        def hook(act: Tensor, hook) -> Tensor:
            a = act.movedim(axis, 1)
            s = ctx.state(iv).to(act.device, act.dtype).movedim(axis, 1)  # the source, read when the hook fires
            idx = _position_index(positions, a.shape[1], act.device)
            sidx = idx if source_position is None else torch.full_like(idx, source_position)
            out = a.clone()
            out[:, idx] = s[:, sidx].expand_as(out[:, idx])
            return out.movedim(1, axis)

        return [(self.hook_name, hook)]


@register("patch-mlp")
@dataclass(frozen=True)
class PatchMLP(Intervention):
    """:class:`PatchActivation` of ``blocks.L.hook_mlp_out`` at each of ``layers``."""

    layers: tuple[int, ...]
    positions: tuple[int, ...] | None = None
    source_text: str | None = None
    source_position: int | None = None

    sites: ClassVar[Sites] = Sites(layers="layers", positions="positions")

    def __post_init__(self) -> None:
        object.__setattr__(self, "layers", coerce_ints(self, "layers", self.layers, allow_none=False))
        object.__setattr__(self, "positions", coerce_ints(self, "positions", self.positions))
        self.as_compose()  # checks the remaining fields, naming PatchActivation's field

    def as_compose(self) -> Compose:
        return Compose(
            tuple(PatchActivation(mlp_hook(l), self.positions, self.source_text, self.source_position) for l in self.layers)
        )

    @cached_property
    def _parts(self) -> Compose:
        """The compose this instance runs: one object, so the parts' prepared sources (kept by
        the context per object) are found again when their hooks fire."""
        return self.as_compose()

    def validate(self, model, n_positions: int | None = None) -> None:
        super().validate(model, n_positions)
        self._parts.validate(model, n_positions)

    def prepare(self, model, ctx: RunContext) -> None:
        ctx.prepare(model, self._parts)

    def hooks(self, model, ctx: RunContext) -> list[Hook]:
        return self._parts.hooks(model, ctx)


# --------------------------------------------------------------------------- sink direction


@register("rescale-sink")
@dataclass(frozen=True)
class RescaleAlongSink(Intervention):
    """Rescale the part of the MLP output that lies along the primary-sink direction.

    With ``u`` the unit primary-sink direction of the layer and ``m`` the MLP output of a
    token, ``m = (m·u) u + r``. Exactly one of:

    * ``target_norm=τ`` — the component's L2 norm becomes τ (its sign is kept);
    * ``factor=f`` — the component is multiplied by f (f=1 is the identity);
    * ``remove=True`` — the component is removed, leaving ``r`` (orthogonal to u).

    ``scope="whole"`` applies the same operation to all of ``m`` instead of its component:
    Wong et al.'s norm intervention is ``scope="whole", min_cos=0.98, target_norm=τ`` (set
    the output's norm where it is aligned with the sink direction). ``min_cos`` restricts the
    edit to tokens whose *signed* cosine cos(m, u) is >= min_cos. Their code compares with the
    first token's *MLP output* at that layer, not with ``h_0``: ``reference="mlp_out"`` (the
    spec ``rescale-sink:layers=15,scope=whole,min_cos=0.98,target_norm=100,reference=mlp_out``,
    with ``skip_first=3`` for a chat-templated prompt, where they exclude positions 0-2).

    ``positions=None`` means every position from ``skip_first`` on (default 1: the primary
    sink itself is never touched unless named; Wong et al. exclude "the first tokens", so
    raise it to skip a few more). Explicit ``positions`` are used as given.

    With ``reference="resid"`` (default) the direction ``u`` is, per sequence and layer, the first token's block output
    ``h_0^l`` (``blocks.L.hook_resid_post`` at position 0) of the clean run, as in Wong et
    al. and ``circuits.measure`` (``cos_to_first``); or a fixed ``direction`` of size
    ``d_model`` given by the user, used at every layer. With ``reference="mlp_out"`` it is the
    first token's MLP output (``hook_mlp_out`` at position 0) of the same forward pass, which
    this edit leaves untouched unless position 0 is named.
    """

    layers: tuple[int, ...]
    positions: tuple[int, ...] | None = None
    target_norm: float | None = None
    factor: float | None = None
    remove: bool = False
    min_cos: float | None = None
    scope: RescaleScope = "component"
    direction: tuple[float, ...] | None = None
    skip_first: int = 1
    reference: SinkReference = "resid"

    sites: ClassVar[Sites] = Sites(layers="layers", positions="positions", direction="direction")

    def __post_init__(self) -> None:
        object.__setattr__(self, "layers", coerce_ints(self, "layers", self.layers, allow_none=False))
        object.__setattr__(self, "positions", coerce_ints(self, "positions", self.positions))
        object.__setattr__(self, "skip_first", coerce_int(self, "skip_first", self.skip_first))
        object.__setattr__(self, "target_norm", coerce_float(self, "target_norm", self.target_norm, allow_none=True, nonnegative=True))
        object.__setattr__(self, "factor", coerce_float(self, "factor", self.factor, allow_none=True))
        coerce_bool(self, "remove", self.remove)
        chosen = [n for n, v in (("target_norm", self.target_norm), ("factor", self.factor), ("remove", self.remove or None)) if v is not None]
        if len(chosen) != 1:
            raise fail(self, "target_norm", f"give exactly one of target_norm, factor or remove=True; got {chosen or 'none'}")
        min_cos = coerce_float(self, "min_cos", self.min_cos, allow_none=True)
        if min_cos is not None and not -1.0 <= min_cos <= 1.0:
            raise fail(self, "min_cos", f"a cosine threshold must lie in [-1, 1], got {min_cos}")
        object.__setattr__(self, "min_cos", min_cos)
        coerce_choice(self, "scope", self.scope, get_args(RescaleScope))
        object.__setattr__(self, "direction", _coerce_direction(self, self.direction))
        coerce_choice(self, "reference", self.reference, get_args(SinkReference))
        if self.reference == "mlp_out" and self.direction is not None:
            raise fail(self, "reference", "reference=mlp_out reads the first token's MLP output; it cannot be combined with a fixed direction")

    def strength_name(self) -> str | None:
        return "target_norm" if self.target_norm is not None else "factor" if self.factor is not None else None

    def validate(self, model, n_positions: int | None = None) -> None:
        super().validate(model, n_positions)
        d_model = int(model.cfg.d_model)
        if self.direction is not None and len(self.direction) != d_model:
            raise fail(self, "direction", f"has size {len(self.direction)} but the model's d_model is {d_model}")

    def prepare(self, model, ctx: RunContext) -> dict[int, Tensor | None]:
        if self.reference == "mlp_out":
            return {l: None for l in self.layers}  # read from the forward itself, in the hook
        if self.direction is not None:
            u = torch.tensor(self.direction, dtype=torch.float32, device=model.cfg.device)[None, :]
            return {l: u / u.norm() for l in self.layers}
        dirs = ctx.primary_sink_directions(model, self.layers)
        return {l: d.float() / d.float().norm(dim=-1, keepdim=True).clamp_min(1e-12) for l, d in dirs.items()}

    def hooks(self, model, ctx: RunContext) -> list[Hook]:
        return [(mlp_hook(l), self._hook(ctx, l)) for l in self.layers]

    def _hook(self, ctx: RunContext, layer: int):
        iv = self

        def hook(mlp_out: Float[Tensor, "batch pos d_model"], hook) -> Tensor:
            u: Float[Tensor, "batch d_model"] | None = ctx.state(iv)[layer]  # the sink direction, read when the hook fires
            m = mlp_out.float()
            if u is None:  # reference=mlp_out: the first token's MLP output of this pass
                first = m[:, 0]
                unit = (first / first.norm(dim=-1, keepdim=True).clamp_min(1e-12))[:, None, :]
            else:
                unit = u.to(m.device)[:, None, :]
            new = rescale_along(m, unit, iv.target_norm, iv.factor, iv.remove, iv.scope)
            t = m.shape[1]
            pos_mask = torch.zeros(t, dtype=torch.bool, device=m.device)
            if iv.positions is None:
                pos_mask[iv.skip_first :] = True
            else:
                pos_mask[list(iv.positions)] = True
            keep = pos_mask[None, :, None]
            if iv.min_cos is not None:
                cos = (m * unit).sum(-1, keepdim=True) / m.norm(dim=-1, keepdim=True).clamp_min(1e-12)
                keep = keep & (cos >= iv.min_cos)
            return torch.where(keep, new, m).to(mlp_out.dtype)

        return hook


def rescale_along(
    m: Float[Tensor, "batch pos d_model"],
    u: Float[Tensor, "batch 1 d_model"],
    target_norm: float | None,
    factor: float | None,
    remove: bool,
    scope: RescaleScope,
) -> Float[Tensor, "batch pos d_model"]:
    """``m`` rescaled along the unit vector ``u`` at every position (the caller picks where it applies)."""
    coef = (m * u).sum(-1, keepdim=True)  # signed length of the component along u
    if scope == "component":
        rest = m - coef * u
        if remove:
            new = rest
        elif factor is not None:
            new = rest + factor * coef * u
        else:
            sign = torch.where(coef >= 0, 1.0, -1.0)
            new = rest + sign * target_norm * u
    else:
        if remove:
            new = torch.zeros_like(m)
        elif factor is not None:
            new = factor * m
        else:
            new = m * (target_norm / m.norm(dim=-1, keepdim=True).clamp_min(1e-12))
    return new


def _coerce_direction(owner: Any, value: Any) -> tuple[float, ...] | None:
    if value is None:
        return None
    try:
        t = torch.as_tensor(value, dtype=torch.float64).detach().cpu()
    except (TypeError, ValueError, RuntimeError) as exc:
        raise fail(owner, "direction", f"expected a vector of numbers, got {type(value).__name__}") from exc
    if t.ndim != 1 or t.numel() == 0:
        raise fail(owner, "direction", f"expected a 1-D vector of size d_model, got shape {tuple(t.shape)}")
    if not torch.isfinite(t).all():
        raise fail(owner, "direction", "contains NaN or infinite values")
    if float(t.norm()) == 0.0:
        raise fail(owner, "direction", "is the zero vector; it has no direction")
    return tuple(float(x) for x in t.tolist())


@register("edit-token-mlp")
@dataclass(frozen=True)
class TokenMLPEdit(Intervention):
    """Edit the MLP output (``blocks.L.hook_mlp_out``) at chosen (sequence, layer, position) cells.

    ``sequences``, ``layers`` and ``positions`` are parallel lists: cell ``i`` is position
    ``positions[i]`` of sequence ``sequences[i]`` at layer ``layers[i]``. Sequence indices
    refer to the batch given to ``measure`` / ``measure_effect`` / ``sweep`` (the reference
    batch), so sub-batching does not matter. Modes:

    * ``"zero"``: the MLP output of the cell becomes 0;
    * ``"mean"``: it becomes the mean MLP output of that layer over every token t >= 1 of the
      reference batch (:func:`interventions.mlp.mean_activations`, ``over="tokens"``);
    * ``"rescale"``: :func:`interventions.mlp.rescale_along` with ``factor`` or ``target_norm``
      along the clean primary-sink direction ``h_0^l`` (``scope="whole"``: the whole output,
      Wong et al.'s norm intervention; ``"component"``: only its part along ``h_0^l``).
    """

    sequences: tuple[int, ...]
    layers: tuple[int, ...]
    positions: tuple[int, ...]
    mode: EditMode = "zero"
    factor: float | None = None
    target_norm: float | None = None
    scope: RescaleScope = "whole"

    sites: ClassVar[Sites] = Sites(layers="layers", positions="positions")

    def __post_init__(self) -> None:
        for name in ("sequences", "layers", "positions"):
            object.__setattr__(self, name, coerce_ints(self, name, getattr(self, name), allow_none=False))
        if not len(self.sequences) == len(self.layers) == len(self.positions):
            raise fail(self, "sequences", f"sequences, layers and positions must have the same length, got "
                       f"{len(self.sequences)}, {len(self.layers)}, {len(self.positions)}")
        coerce_choice(self, "mode", self.mode, get_args(EditMode))
        coerce_choice(self, "scope", self.scope, get_args(RescaleScope))
        object.__setattr__(self, "factor", coerce_float(self, "factor", self.factor, allow_none=True))
        object.__setattr__(self, "target_norm", coerce_float(self, "target_norm", self.target_norm, allow_none=True, nonnegative=True))
        given = [n for n in ("factor", "target_norm") if getattr(self, n) is not None]
        if self.mode == "rescale" and len(given) != 1:
            raise fail(self, "factor", f"mode='rescale' needs exactly one of factor or target_norm, got {given or 'none'}")
        if self.mode != "rescale" and given:
            raise fail(self, given[0], "is only used by mode='rescale'")

    def strength_name(self) -> str | None:
        return "factor" if self.factor is not None else "target_norm" if self.target_norm is not None else None

    def prepare(self, model, ctx: RunContext) -> dict[str, Any]:
        layers = sorted(set(self.layers))
        state: dict[str, Any] = {}
        if self.mode == "mean":
            key = ("edit-token-mlp-mean", tuple(layers), id(ctx.reference_batch))
            if key not in ctx.shared:
                means, _ = mean_activations(model, ctx.reference_batch, [mlp_hook(l) for l in layers], "tokens")
                ctx.shared[key] = {l: means[mlp_hook(l)] for l in layers}
            state["mean"] = ctx.shared[key]
        elif self.mode == "rescale":
            dirs = ctx.primary_sink_directions(model, layers)
            state["unit"] = {l: d.float() / d.float().norm(dim=-1, keepdim=True).clamp_min(1e-12) for l, d in dirs.items()}
        return state

    def cells(self, ctx: RunContext) -> dict[int, tuple[list[int], list[int]]]:
        """The cells of ``ctx.batch``, ``layer -> (rows, positions)``: which layers it hooks
        depends on the sequences the (sub-)batch holds, never on prepared data."""
        index = ctx.sequence_indices(ctx.reference_batch)
        cells: dict[int, tuple[list[int], list[int]]] = {}
        for s, l, p in zip(self.sequences, self.layers, self.positions):
            for row, ref in enumerate(index):
                if ref == s:
                    rows, pos = cells.setdefault(l, ([], []))
                    rows.append(row)
                    pos.append(p)
        return cells

    def hooks(self, model, ctx: RunContext) -> list[Hook]:
        return [(mlp_hook(l), self._hook(ctx, l, rows, pos)) for l, (rows, pos) in self.cells(ctx).items()]

    def _hook(self, ctx: RunContext, layer: int, rows: list[int], pos: list[int]):
        iv = self

        def hook(mlp_out: Float[Tensor, "batch pos d_model"], hook) -> Tensor:
            state = ctx.state(iv)  # means or sink directions, read when the hook fires
            r = torch.tensor(rows, device=mlp_out.device)
            p = torch.tensor(pos, device=mlp_out.device)
            m = mlp_out[r, p].float()  # [cells, d_model]
            if iv.mode == "zero":
                new = torch.zeros_like(m)
            elif iv.mode == "mean":
                new = state["mean"][layer].to(m.device, m.dtype).expand_as(m)
            else:
                u = state["unit"][layer].to(m.device)[r]  # [cells, d_model]
                new = rescale_along(m[:, None], u[:, None], iv.target_norm, iv.factor, False, iv.scope)[:, 0]
            out = mlp_out.clone()
            out[r, p] = new.to(mlp_out.dtype)
            return out

        return hook
