"""The intervention protocol: small, composable data that turns into TransformerLens hooks.

Why this module exists. Every causal claim in sinkscope ("this MLP writes the secondary sink",
"sigmoid attention has no sink") is a comparison between a clean run and a run where one thing
was changed. The changed thing must be *data* — what, where, how strongly — so that it can be
printed, stored with a result, parsed from the command line, swept over, and combined with
others, while the machinery that runs it stays the same. The two house rules:

* an intervention never measures;
* a measurement never knows which intervention ran (it just sees the hooked activations).

The life of an intervention on one batch
----------------------------------------
1. **Construction** (``AblateMLP(layers=(3,), positions=(5,))``): fields are coerced to
   tuples and checked for things that need no model: empty lists, NaN or infinite strengths,
   unknown modes. Errors are :class:`InterventionError`.
2. **Validation** (:meth:`Intervention.validate`): checks against the model and the batch —
   layers, heads and positions in range, hook names that exist, directions of size
   ``d_model``. Positions are checked against the *shortest* real sequence of the batch, so a
   position always exists in every sequence. This runs before any forward pass.
3. **Preparation** (:meth:`Intervention.prepare`): some interventions need a reference run —
   the clean activation to patch in, the mean MLP output over a reference batch, the
   primary-sink direction of each layer. ``prepare`` computes it through the
   :class:`RunContext`, which caches reference data so that composed interventions share it
   and so that a caller that already has it (e.g. the clean measurement) can seed it.
4. **Hooks** (:meth:`Intervention.hooks`): a list of ``(hook_name, fn)`` pairs, registered by
   :func:`applied` with ``model.hooks(...)`` (removed on exit, exceptions included), or handed
   to :func:`circuits.measure.measure` through :func:`hooks_for`. The names are where the
   intervention acts (:meth:`Intervention.reach`, :mod:`interventions.hookpoints`); they never
   depend on prepared data, which the hook functions read when they fire, so
   :func:`hook_points` knows them before any forward pass.

Example::

    from interventions.mlp import AblateMLP
    iv = AblateMLP(layers=(3,), positions=(5,), mode="zero")
    meas = measure(model, batch, hooks=iv.hooks_for(model, batch))   # intervened statistics
    with iv.applied(model, batch):                                     # or by hand
        logits = model(batch.tokens)

``a + b`` (or :class:`Compose`) combines interventions; their hooks run in order at every hook
point, before any measurement hook.
"""

from __future__ import annotations

import dataclasses
import math
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Iterator, Literal, Sequence

import torch
from jaxtyping import Float, Int
from torch import Tensor

from circuits.errors import SinkscopeError
from circuits.meter import Hook
from circuits.probes import TokenBatch, TokenizationError, tokenize
from interventions.hookpoints import Reach, hook_layer

REFERENCE_CHUNK = 8  #: sequences per reference forward pass (memory stays at one small batch)


class InterventionError(SinkscopeError, ValueError):
    """An intervention is malformed or does not fit the model or the batch.

    Raised at construction or by :meth:`Intervention.validate`, always before any forward
    pass of the intervened model. The message names the field (``AblateMLP.layers``), the bad
    value and the allowed range.
    """


# --------------------------------------------------------------------------- field helpers
# Used by every family's __post_init__ (pure checks, no model) and validate (model checks).


def _name(owner: Any) -> str:
    return owner if isinstance(owner, str) else type(owner).__name__


def fail(owner: Any, field_name: str, message: str) -> InterventionError:
    """An :class:`InterventionError` whose message starts with ``Class.field``."""
    return InterventionError(f"{_name(owner)}.{field_name}: {message}")


def coerce_int(owner: Any, field_name: str, value: Any, *, minimum: int | None = 0) -> int:
    """An int (numpy and 0-d integer tensors accepted; bools and floats refused)."""
    if isinstance(value, bool) or not hasattr(value, "__index__"):
        raise fail(owner, field_name, f"expected an integer, got {value!r}")
    try:
        out = int(value.__index__())
    except (TypeError, RuntimeError) as exc:
        raise fail(owner, field_name, f"expected an integer, got {value!r}") from exc
    if minimum is not None and out < minimum:
        raise fail(owner, field_name, f"must be >= {minimum}, got {out}")
    return out


def coerce_ints(owner: Any, field_name: str, value: Any, *, allow_none: bool = True) -> tuple[int, ...] | None:
    """A non-empty tuple of non-negative ints (a single int is accepted), or None if allowed."""
    if value is None:
        if allow_none:
            return None
        raise fail(owner, field_name, "is required")
    if isinstance(value, (str, bytes)):
        raise fail(owner, field_name, f"expected integers, got the string {value!r}")
    if hasattr(value, "__index__") and getattr(value, "ndim", 0) == 0:
        value = (value,)
    try:
        items = list(value)
    except TypeError as exc:
        raise fail(owner, field_name, f"expected an integer or a list of integers, got {value!r}") from exc
    if not items:
        raise fail(owner, field_name, "is empty; give at least one value (or None where allowed)")
    return tuple(coerce_int(owner, field_name, v) for v in items)


def coerce_float(
    owner: Any, field_name: str, value: Any, *, allow_none: bool = False, positive: bool = False, nonnegative: bool = False
) -> float | None:
    """A finite float. NaN and infinities are refused here: they would poison a whole run."""
    if value is None:
        if allow_none:
            return None
        raise fail(owner, field_name, "is required")
    if isinstance(value, bool):
        raise fail(owner, field_name, f"expected a number, got {value!r}")
    try:
        out = float(value)
    except (TypeError, ValueError) as exc:
        raise fail(owner, field_name, f"expected a number, got {value!r}") from exc
    if not math.isfinite(out):
        raise fail(owner, field_name, f"must be a finite number, got {out}")
    if positive and out <= 0:
        raise fail(owner, field_name, f"must be > 0, got {out}")
    if nonnegative and out < 0:
        raise fail(owner, field_name, f"must be >= 0, got {out}")
    return out


def coerce_choice(owner: Any, field_name: str, value: Any, choices: Sequence[str]) -> str:
    if value not in choices:
        raise fail(owner, field_name, f"must be one of {', '.join(map(repr, choices))}; got {value!r}")
    return value


def coerce_bool(owner: Any, field_name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise fail(owner, field_name, f"expected True or False, got {value!r}")
    return value


def coerce_texts(owner: Any, field_name: str, value: Any) -> tuple[str, ...] | None:
    if value is None:
        return None
    if isinstance(value, str):
        value = (value,)
    items = tuple(value)
    if not items:
        raise fail(owner, field_name, "is empty; give at least one text or None")
    for text in items:
        if not isinstance(text, str) or not text.strip():
            raise fail(owner, field_name, f"every reference text must be a non-empty string, got {text!r}")
    return items


def check_layers(owner: Any, field_name: str, layers: Sequence[int], model) -> None:
    n_layers = int(model.cfg.n_layers)
    for layer in layers:
        if not 0 <= layer < n_layers:
            raise fail(owner, field_name, f"layer {layer} is out of range; this model has {n_layers} layers (0..{n_layers - 1})")


def check_heads(owner: Any, field_name: str, heads: Sequence[int] | None, model) -> None:
    if heads is None:
        return
    n_heads = int(model.cfg.n_heads)
    for head in heads:
        if not 0 <= head < n_heads:
            raise fail(owner, field_name, f"head {head} is out of range; this model has {n_heads} heads per layer (0..{n_heads - 1})")


def check_positions(owner: Any, field_name: str, positions: Sequence[int] | None, n_positions: int | None, model) -> None:
    """Positions must exist in every sequence: below the shortest real length of the batch."""
    if positions is None:
        return
    limit = int(n_positions) if n_positions is not None else int(model.cfg.n_ctx)
    what = "the shortest sequence of the batch has" if n_positions is not None else "the model's context is"
    for pos in positions:
        if not 0 <= pos < limit:
            raise fail(owner, field_name, f"position {pos} is out of range; {what} {limit} tokens (positions 0..{limit - 1})")


def check_hook_name(owner: Any, field_name: str, name: str, model) -> None:
    hook_dict = model.hook_dict
    if name not in hook_dict:
        close = [n for n in hook_dict if n.endswith(name.split(".")[-1])][:5]
        hint = f"; similar names: {', '.join(close)}" if close else ""
        raise fail(owner, field_name, f"unknown hook name {name!r} (not in model.hook_dict){hint}")
    gated = getattr(model, "_gated_hook_reason", None)
    reason = gated(hook_dict[name].name or name) if gated is not None else None
    if reason is not None:
        raise fail(owner, field_name, f"hook {name!r} never fires unless model.cfg.{reason} is set (call model.set_{reason}(True))")


def position_axis(model, name: str) -> int:
    """The position axis of a hook's activation: dim 1, the query axis -2 of patterns/scores,
    or whatever the hook point declares in ``pos_dim``."""
    hp = model.hook_dict.get(name)
    declared = getattr(hp, "pos_dim", None)
    if declared is not None:
        return int(declared)
    return -2 if name.endswith(("hook_pattern", "hook_attn_scores")) else 1


# --------------------------------------------------------------------------- reference runs


@torch.no_grad()
def capture(
    model,
    tokens: Int[Tensor, "batch pos"],
    names: Sequence[str],
    *,
    select: Callable[[str, Tensor], Tensor] | None = None,
) -> dict[str, Tensor]:
    """Run ``model`` on ``tokens`` and keep the activations at ``names`` (detached copies).

    ``select(name, activation)`` may reduce each activation before it is kept (for example to
    position 0), so a reference run costs little memory. The forward stops after the last
    block that holds a requested hook.
    """
    names = list(dict.fromkeys(names))
    kept: dict[str, Tensor] = {}

    def saver(name: str) -> Callable:
        def save(act: Tensor, hook) -> None:
            kept[name] = (select(name, act) if select else act).detach().clone()

        return save

    layers = [hook_layer(n) for n in names]
    stop = None
    if names and min(layers) >= 0 and max(layers) + 1 < int(model.cfg.n_layers):
        stop = max(layers) + 1
    fwd = [(n, saver(n)) for n in names]
    model.run_with_hooks(tokens.to(model.cfg.device), fwd_hooks=fwd, return_type=None, stop_at_layer=stop)
    missing = [n for n in names if n not in kept]
    if missing:
        raise InterventionError(f"reference run: hook(s) {missing} did not fire on this model")
    return kept


def capture_batches(
    model, batch: TokenBatch, names: Sequence[str], *, select: Callable[[str, Tensor], Tensor] | None = None
) -> Iterator[tuple[TokenBatch, dict[str, Tensor]]]:
    """:func:`capture` over a large batch, :data:`REFERENCE_CHUNK` sequences at a time."""
    for start in range(0, len(batch), REFERENCE_CHUNK):
        sub = batch.select(slice(start, start + REFERENCE_CHUNK))
        yield sub, capture(model, sub.tokens, names, select=select)


# --------------------------------------------------------------------------- run context


@dataclass
class RunContext:
    """What an intervention may know about the run it is applied to.

    Attributes:
        batch: the (sub-)batch the hooks will see. Hook functions may rely on its shape:
            ``batch.tokens`` is ``[batch, pos]`` exactly as it enters the model.
        reference: the batch that defines reference statistics (means for mean ablation,
            the pool for resampling). :func:`hooks_for` sets it to the whole batch given to
            ``measure``, so statistics do not depend on how it is cut into sub-batches.
            Defaults to ``batch``.
        clean: clean activations of ``batch`` by hook name, filled lazily by
            :meth:`clean_activations`; a caller that has them already may seed it.
        sink_directions: primary-sink direction per layer, ``{layer: [batch, d_model]}``:
            the first token's block output ``h_0^l`` of the clean run (not normalised).
            A clean measurement of the same sequences already holds it: seed
            ``{l: meas.first_resid[rows, l]}`` (tensors or arrays) to skip the reference run.
        shared: a cache that outlives one sub-batch (reference means, tokenized reference
            texts); :func:`hooks_for` passes the same dict to every sub-batch.
        planning: a context that is never prepared, only used to read the hook *names*
            (:func:`hook_points`); it refuses to hand out prepared or clean data, which a
            kind reads inside its hook functions, so naming the hooks costs no forward.
    """

    batch: TokenBatch
    reference: TokenBatch | None = None
    clean: dict[str, Tensor] = field(default_factory=dict)
    sink_directions: dict[int, Float[Tensor, "batch d_model"]] = field(default_factory=dict)
    shared: dict[Any, Any] = field(default_factory=dict)
    states: dict[int, Any] = field(default_factory=dict, repr=False)
    planning: bool = field(default=False, repr=False)

    @property
    def reference_batch(self) -> TokenBatch:
        return self.reference if self.reference is not None else self.batch

    # -- preparation ---------------------------------------------------------------------
    def prepare(self, model, intervention: "Intervention") -> None:
        """Run ``intervention.prepare`` once and keep its state for :meth:`state`."""
        if id(intervention) not in self.states:
            self.states[id(intervention)] = intervention.prepare(model, self)

    def _refuse_when_planning(self, what: str, owner: Any = None) -> None:
        if self.planning:
            who = "an intervention's hooks()" if owner is None else f"{_name(owner)}.hooks"
            raise InterventionError(
                f"{who} read {what} while building its hook list; read it inside the hook function instead: "
                "the hook names must be known before any forward (they say where it acts, see hook_points)"
            )

    def state(self, intervention: "Intervention") -> Any:
        self._refuse_when_planning("its prepared state (ctx.state)", intervention)
        try:
            return self.states[id(intervention)]
        except KeyError:
            raise RuntimeError(
                f"{type(intervention).__name__} was not prepared in this context; "
                "use prepare_context / applied / hooks_for rather than calling hooks() directly"
            ) from None

    # -- reference data ----------------------------------------------------------------------
    def clean_activations(self, model, names: Sequence[str]) -> dict[str, Tensor]:
        """Clean activations of :attr:`batch` at ``names``: one reference run for the missing ones."""
        self._refuse_when_planning("clean activations")
        missing = [n for n in names if n not in self.clean]
        if missing:
            self.clean.update(capture(model, self.batch.tokens, missing))
        return {n: self.clean[n] for n in names}

    def primary_sink_directions(self, model, layers: Sequence[int]) -> dict[int, Float[Tensor, "batch d_model"]]:
        """``h_0^l`` of the clean run for each layer (block output at position 0)."""
        self._refuse_when_planning("the primary-sink directions")
        missing = [l for l in layers if l not in self.sink_directions]
        if missing:
            names = [f"blocks.{l}.hook_resid_post" for l in missing]
            got = capture(model, self.batch.tokens, names, select=lambda _n, act: act[:, 0, :])
            for layer, name in zip(missing, names):
                self.sink_directions[layer] = got[name]
        return {l: torch.as_tensor(self.sink_directions[l]).to(model.cfg.device) for l in layers}

    def tokenize_reference(self, model, owner: Any, field_name: str, texts: Sequence[str]) -> TokenBatch:
        """Reference texts tokenized with the batch's BOS policy (cached across sub-batches)."""
        key = ("reference-texts", tuple(texts), self.batch.prepend_bos)
        if key not in self.shared:
            try:
                self.shared[key] = tokenize(model, list(texts), prepend_bos=self.batch.prepend_bos)
            except TokenizationError as exc:
                raise fail(owner, field_name, f"cannot tokenize a reference text: {exc}") from exc
        return self.shared[key]

    def sequence_indices(self, reference: TokenBatch) -> list[int]:
        """Index of each sequence of :attr:`batch` inside ``reference`` (its own index if absent)."""
        where = {tuple(ids): i for i, ids in reversed(list(enumerate(reference.token_ids)))}
        return [where.get(tuple(ids), i) for i, ids in enumerate(self.batch.token_ids)]


# --------------------------------------------------------------------------- site fields


@dataclass(frozen=True)
class Sites:
    """Which *fields* of an intervention name its layers, positions, keys, heads or direction,
    declared once per class.

    This is about editing and checking the fields, not about where the hooks land: validation
    (range checks), the target positions ``measure_effect`` scores, random controls (which
    field a control moves) and ``vary`` (which field a sweep sets) read it, so a new kind with
    its own field names needs no edit anywhere else. The blocks an intervention hooks, the
    block a sweep starts at and whether it needs the attention pattern are read from its hook
    names instead (:meth:`Intervention.reach`). Each attribute names a dataclass field, or is
    None when the kind has no such site.

    Attributes:
        layers: block index (an ``int`` field) or indices (a tuple field) that are edited;
            a None *value* means every layer.
        positions: token positions (or attention queries) that are edited; the target of
            the intervention, and what a position control moves.
        keys: attention keys, moved together with ``positions`` by a position control
            (an edited position that is also a key moves with it).
        heads: attention heads that are edited.
        direction: a fixed ``d_model`` direction; a direction control replaces it.
    """

    layers: str | None = None
    positions: str | None = None
    keys: str | None = None
    heads: str | None = None
    direction: str | None = None

    @classmethod
    def by_convention(cls, owner: type) -> "Sites":
        """The sites of a kind that declares none: the conventional field names
        (``layers`` or ``layer``, ``positions``, ``heads``, ``direction``) that it has."""
        names = {f.name for f in dataclasses.fields(owner) if f.init} if dataclasses.is_dataclass(owner) else set()
        pick = lambda *options: next((n for n in options if n in names), None)  # noqa: E731
        return cls(pick("layers", "layer"), pick("positions"), None, pick("heads"), pick("direction"))


SiteRole = Literal["layers", "positions", "keys", "heads", "direction"]


def sites_of(intervention: "Intervention | type") -> Sites:
    """The declared :class:`Sites` of an intervention (or its class), else the conventional ones."""
    cls = intervention if isinstance(intervention, type) else type(intervention)
    declared = getattr(cls, "sites", None)
    return declared if declared is not None else Sites.by_convention(cls)


def site_value(intervention: "Intervention", role: SiteRole) -> tuple | None:
    """The value at a site as a tuple (an ``int`` layer field becomes a 1-tuple), or None when
    the kind has no such site or the field is None ("every ...")."""
    name = getattr(sites_of(intervention), role)
    value = None if name is None else getattr(intervention, name)
    if value is None:
        return None
    return tuple(value) if isinstance(value, (tuple, list)) else (value,)


# --------------------------------------------------------------------------- the protocol


class Intervention:
    """Base class of all interventions: a frozen dataclass that knows how to hook a model.

    Subclasses are ``@dataclass(frozen=True)`` and registered under a short ``kind`` with
    :func:`interventions.registry.register`, which makes them parseable from text specs.
    They implement :meth:`hooks`, and :meth:`validate` / :meth:`prepare` when they need to.

    Class attributes:
        kind: the registry name (``"ablate-mlp"``).
        strength_field: the name of the scalar field a sweep varies (``"factor"``), or None
            when the intervention has no natural strength.
        sites: which fields name its layers, positions, heads... (:class:`Sites`); None: the
            conventional names. Where its hooks land is read from the hooks (:meth:`reach`).
    """

    kind: ClassVar[str] = ""
    strength_field: ClassVar[str | None] = None
    sites: ClassVar[Sites | None] = None

    # -- to implement --------------------------------------------------------------------
    def validate(self, model, n_positions: int | None = None) -> None:
        """Check the fields against ``model`` and a batch whose shortest sequence has
        ``n_positions`` tokens (None: only the model's context bounds positions).

        The default range-checks every declared site (:attr:`Intervention.sites`): layers, heads,
        positions and keys, so a kind gets them for free; override to add kind-specific
        checks (and call ``super().validate``).

        Raises:
            InterventionError: naming the field, the bad value and the allowed range.
        """
        sites = sites_of(self)
        if (layers := site_value(self, "layers")) is not None:
            check_layers(self, sites.layers, layers, model)
        check_heads(self, sites.heads, site_value(self, "heads"), model)
        for role in ("positions", "keys"):
            check_positions(self, getattr(sites, role), site_value(self, role), n_positions, model)

    def prepare(self, model, ctx: RunContext) -> Any:
        """Compute reference data for ``ctx.batch`` (default: nothing). The return value is
        available to :meth:`hooks` as ``ctx.state(self)``. Runs before the intervention's
        hooks are registered, so a forward pass here is a clean run (hooks that an enclosing
        ``applied`` block registered do fire). Batch-dependent problems found here raise
        :class:`InterventionError` before any reference forward pass. Hook functions read it
        when they fire, never while :meth:`hooks` builds the list (see :func:`hook_points`)."""
        return None

    def hooks(self, model, ctx: RunContext) -> list[Hook]:
        """The ``(hook_name, fn)`` pairs that carry out the intervention on ``ctx.batch``.

        The names are where it acts (:meth:`reach`), so they may depend on the fields, the
        model and the batch but not on prepared data: read ``ctx.state(self)`` (and clean
        activations, sink directions) inside the hook functions, when they fire.
        """
        raise NotImplementedError(f"{type(self).__name__} must implement hooks(model, ctx)")

    # -- derived ---------------------------------------------------------------------------
    def reach(self, model, batch: TokenBatch) -> Reach:
        """Where it acts on ``model`` for ``batch`` — the blocks it hooks, the block a
        prefix-reusing run starts at, whether it needs the attention pattern — read from the
        hook names it registers (:func:`hook_points`), without a forward pass."""
        return Reach.of(model, hook_points(model, self, batch))

    @property
    def strength(self) -> float | None:
        name = self.strength_name()
        return None if name is None else getattr(self, name)

    def strength_name(self) -> str | None:
        return self.strength_field

    def with_strength(self, value: float) -> "Intervention":
        """A copy with the strength field set to ``value`` (checked like any field)."""
        name = self.strength_name()
        if name is None:
            raise InterventionError(f"{type(self).__name__} has no strength to vary")
        return dataclasses.replace(self, **{name: value})

    def hooks_for(self, model, batch: TokenBatch) -> "HookFactory":
        return hooks_for(model, self, batch)

    def applied(self, model, batch: TokenBatch, **kwargs):
        return applied(model, self, batch, **kwargs)

    def __add__(self, other: "Intervention") -> "Compose":
        if not isinstance(other, Intervention):
            return NotImplemented
        return Compose((self, other))


@dataclass(frozen=True)
class Compose(Intervention):
    """Several interventions as one: all are validated and prepared, and their hooks run in
    the order of ``parts`` at every hook point. Nested compositions are flattened."""

    parts: tuple[Intervention, ...]

    kind: ClassVar[str] = "compose"

    def __post_init__(self) -> None:
        flat: list[Intervention] = []
        for part in tuple(self.parts):
            if not isinstance(part, Intervention):
                raise fail(self, "parts", f"every part must be an Intervention, got {type(part).__name__}")
            flat.extend(part.parts if isinstance(part, Compose) else (part,))
        if not flat:
            raise fail(self, "parts", "is empty; compose at least one intervention")
        object.__setattr__(self, "parts", tuple(flat))

    def validate(self, model, n_positions: int | None = None) -> None:
        for part in self.parts:
            part.validate(model, n_positions)

    def prepare(self, model, ctx: RunContext) -> None:
        for part in self.parts:
            ctx.prepare(model, part)

    def hooks(self, model, ctx: RunContext) -> list[Hook]:
        return [hook for part in self.parts for hook in part.hooks(model, ctx)]

    def strength_name(self) -> str | None:
        return None

    @property
    def strength(self) -> float | None:
        having = [p for p in self.parts if p.strength is not None]
        return having[0].strength if len(having) == 1 else None

    def with_strength(self, value: float) -> "Compose":
        """Set the strength of the one part that has one (an error if zero or several do)."""
        having = [i for i, p in enumerate(self.parts) if p.strength_name() is not None]
        if len(having) != 1:
            raise InterventionError(
                f"Compose.with_strength needs exactly one part with a strength; {len(having)} parts have one"
            )
        parts = list(self.parts)
        parts[having[0]] = parts[having[0]].with_strength(value)
        return Compose(tuple(parts))

    def __add__(self, other: Intervention) -> "Compose":
        if not isinstance(other, Intervention):
            return NotImplemented
        return Compose((*self.parts, other))


# --------------------------------------------------------------------------- running


def shortest_length(batch: TokenBatch) -> int:
    return int(batch.lengths.min())


def prepare_context(
    model,
    intervention: Intervention,
    batch: TokenBatch,
    *,
    reference: TokenBatch | None = None,
    shared: dict | None = None,
    clean: dict[str, Tensor] | None = None,
    sink_directions: dict[int, Tensor] | None = None,
    validate: bool = True,
) -> RunContext:
    """Validate ``intervention`` for ``batch`` and run its preparation; returns the context
    its :meth:`~Intervention.hooks` need. Reference forward passes (if any) happen here."""
    if not isinstance(intervention, Intervention):
        raise InterventionError(f"expected an Intervention, got {type(intervention).__name__}")
    if validate:
        intervention.validate(model, shortest_length(batch))
    ctx = RunContext(
        batch, reference, dict(clean or {}), dict(sink_directions or {}), shared if shared is not None else {}
    )
    with torch.no_grad():
        ctx.prepare(model, intervention)
    return ctx


@contextmanager
def applied(model, intervention: Intervention, batch: TokenBatch, **kwargs) -> Iterator[RunContext]:
    """Register ``intervention``'s hooks on ``model`` for ``batch``; remove them on exit.

    Validation and preparation run first, so a bad intervention raises before any hook is
    registered; the hooks are removed when the block exits, by an exception too. Forward
    passes inside the block must use ``batch.tokens``. Keyword arguments go to
    :func:`prepare_context`.
    """
    ctx = prepare_context(model, intervention, batch, **kwargs)
    hooks = checked_hooks(model, intervention, ctx)
    with model.hooks(fwd_hooks=hooks):
        yield ctx


def checked_hooks(model, intervention: Intervention, ctx: RunContext) -> list[Hook]:
    """``intervention.hooks(model, ctx)``, refusing names the model does not have (a safety
    net for user kinds whose ``validate`` does not check their hook names)."""
    hooks = list(intervention.hooks(model, ctx))
    hook_dict = model.hook_dict
    for name, fn in hooks:
        if not isinstance(name, str) or name not in hook_dict or not callable(fn):
            raise InterventionError(
                f"{type(intervention).__name__}.hooks: {name!r} is not a hook point of this model "
                "(hooks must be (name in model.hook_dict, callable) pairs)"
            )
    return hooks


class HookFactory:
    """``sub_batch -> hooks``: what :func:`circuits.measure.measure` takes as ``hooks=``.

    The intervention is validated against the whole batch when the factory is made (so the
    error comes before the first forward pass); each call prepares a context for one
    sub-batch, with the whole batch as the reference and one cache shared by all calls.
    """

    def __init__(self, model, intervention: Intervention, batch: TokenBatch):
        if not isinstance(intervention, Intervention):
            raise InterventionError(f"expected an Intervention, got {type(intervention).__name__}")
        intervention.validate(model, shortest_length(batch))
        self.model = model
        self.intervention = intervention
        self.batch = batch
        self.shared: dict[Any, Any] = {}

    def context(self, sub: TokenBatch, **kwargs) -> RunContext:
        return prepare_context(
            self.model, self.intervention, sub, reference=self.batch, shared=self.shared, validate=False, **kwargs
        )

    def __call__(self, sub: TokenBatch) -> list[Hook]:
        return checked_hooks(self.model, self.intervention, self.context(sub))

    def __repr__(self) -> str:
        return f"HookFactory({self.intervention!r}, batch of {len(self.batch)})"


def hook_points(model, intervention: Intervention, batch: TokenBatch) -> tuple[str, ...]:
    """The hook names ``intervention`` registers on ``model`` for ``batch`` (the whole batch, as
    :func:`hooks_for` prepares it), in order, without repeats, and without any forward pass.

    ``hooks()`` is called on a planning :class:`RunContext`: the batch, unprepared, which
    refuses prepared data (see :mod:`interventions.hookpoints`). Names the model does not have
    are refused as by :func:`checked_hooks`.
    """
    if not isinstance(intervention, Intervention):
        raise InterventionError(f"expected an Intervention, got {type(intervention).__name__}")
    ctx = RunContext(batch, reference=batch, planning=True)
    return tuple(dict.fromkeys(name for name, _ in checked_hooks(model, intervention, ctx)))


def hooks_for(model, intervention: Intervention, batch: TokenBatch) -> HookFactory:
    """Hooks of ``intervention`` for ``measure(model, batch, hooks=hooks_for(model, iv, batch))``."""
    return HookFactory(model, intervention, batch)


def registered_hooks(model) -> dict[str, int]:
    """Hook points that hold forward or backward hooks right now, with their count.

    Empty after every :func:`applied` block and every ``measure`` call, errors included.
    """
    out: dict[str, int] = {}
    for name, hp in model.hook_dict.items():
        n = len(hp.fwd_hooks) + len(hp.bwd_hooks) + len(hp._forward_hooks) + len(hp._backward_hooks)
        if n:
            out[name] = n
    return out
