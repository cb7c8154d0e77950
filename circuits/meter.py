"""What a meter is: the protocol every statistic implements, and the one base that stores its arrays.

Why: sinkscope never keeps an activation cache. Every statistic, the sink measurement
(:class:`circuits.measure.SinkMeter`) as well as the paper meters of :mod:`circuits.analyses` and
any user's, is a *meter* that reduces each activation to small per-sequence arrays inside a
hook. One protocol (:class:`Meter`) lets one driver (:func:`circuits.driver.drive`) run any of
them in any forward: a plain forward, the paired clean / intervened forwards of
:func:`interventions.effect.measure_effect`, the stacked prefix-reuse forwards of a sweep.

The protocol, per sub-batch::

    meter.begin(sub)            # a new sub-batch: allocate its arrays
    meter.see_hooks(own)        # the run's own hooks (an intervention's), before it is asked for its own
    hooks = meter.hooks()       # (hook name, fn) pairs; run after any intervention's hooks
    ...forward...
    meter.end(logits)           # logits, or None when the forward stopped before the unembed
    ...
    meter.result()              # after the last sub-batch: one row per sequence, in batch order

Arrays as data. :class:`Axes` names the axes of an array (``"seq"``, ``"layer"``, ``"head"``,
``"kv_head"``, ``"pos"``, ...), its dtype and so its pad fill (NaN, -1 for integers). A result
dataclass declares it per field (:func:`array`, :func:`per_sequence`), and everything that
handles the arrays reads it: :class:`ArrayMeter` allocates, writes and concatenates them,
:meth:`circuits.measure.SinkMeasurement.select` picks sequences, and the sweep copies the
``"layer"`` arrays below its start block. A new statistic is a field and the line that computes
it, nothing else.

:class:`ArrayMeter` is the base of every built-in meter: per sub-batch it allocates the arrays of
its schema, :meth:`~ArrayMeter.put` writes one layer's values from a hook (a trailing axis may
be shorter, e.g. positions of a narrower sub-batch), and :meth:`~ArrayMeter.arrays`
concatenates the sub-batches (:func:`concat_batches`) and puts the sequences back in the order
of the full batch when the driver ran them sorted by length (:class:`SubBatch` ``rows``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Protocol, Sequence, runtime_checkable

import numpy as np
import torch
from jaxtyping import Bool, Float
from torch import Tensor

from circuits.errors import SinkscopeError
from circuits.probes import TokenBatch
from circuits.stats import valid_positions

Hook = tuple[str, Callable]

_AXES = "sinkscope_axes"  # the dataclass field metadata key of an Axes


class MeterError(SinkscopeError, ValueError):
    """A meter cannot measure this model or batch (a missing hook point, an empty batch)."""


@dataclass
class SubBatch(TokenBatch):
    """A sub-batch that knows where its sequences sit in the full batch (``rows``)."""

    rows: list[int] = field(default_factory=list)

    @classmethod
    def of(cls, batch: TokenBatch, rows: Sequence[int]) -> "SubBatch":
        sub = batch.select(list(rows))
        return cls(sub.tokens, sub.lengths, sub.prepend_bos, sub.str_tokens, sub.parts, sub.parts_form, rows=[int(r) for r in rows])


@runtime_checkable
class Meter(Protocol):
    """Collects statistics during forward passes, one sub-batch at a time (see the module doc)."""

    def begin(self, batch: TokenBatch) -> None:
        """A new sub-batch (a :class:`SubBatch` when the driver runs it)."""

    def see_hooks(self, hooks: Sequence[Hook]) -> None:
        """The run's own hooks (an intervention's), before :meth:`hooks` is asked for: a meter of
        the pattern measures a layer whose pattern they read or edit from that edited pattern
        (:class:`circuits.pattern_meter.PatternMeter`); other meters ignore them."""

    def hooks(self) -> list[Hook]:
        """Forward hooks for the current sub-batch; they see the intervened activations."""

    def end(self, logits: Float[Tensor, "batch pos vocab"] | None) -> None:
        """The forward is done; ``logits`` is None when it stopped before the unembedding."""

    def result(self) -> Any:
        """Everything measured, one row per sequence in the order of the full batch."""


# --------------------------------------------------------------------------- arrays as data


@dataclass(frozen=True)
class Axes:
    """The axes of one per-sequence array: names (the first is ``"seq"``), dtype, and whether
    hooks fill it (``measured``) or it comes from the batch (lengths, token ids)."""

    names: tuple[str, ...]
    dtype: Any = np.float32  # None: a Python list per sequence
    measured: bool = True

    @property
    def fill(self) -> float | int:
        """The value of positions a sequence does not reach: NaN, -1 for integer arrays."""
        return -1 if np.dtype(self.dtype).kind == "i" else np.nan

    def index(self, name: str) -> int | None:
        """Where axis ``name`` is, or None."""
        return self.names.index(name) if name in self.names else None

    def allocate(self, sizes: Mapping[str, int]) -> np.ndarray:
        return np.full(tuple(sizes[n] for n in self.names), self.fill, dtype=self.dtype)


def array(*names: str, dtype: Any = np.float32) -> Any:
    """A dataclass field holding a measured array with these axes, e.g. ``array("seq", "layer", "pos")``."""
    return field(metadata={_AXES: Axes(tuple(names), dtype)})


def per_sequence(dtype: Any = None) -> Any:
    """A dataclass field with one entry per sequence taken from the batch (lengths, token lists)."""
    return field(metadata={_AXES: Axes(("seq",), dtype, measured=False)})


def axes_of(cls: Any) -> dict[str, Axes]:
    """Field name -> :class:`Axes` for every field of a dataclass (or instance) that declares them."""
    return {f.name: f.metadata[_AXES] for f in dataclasses.fields(cls) if _AXES in f.metadata}


#: column names of the index axes in a tidy table
INDEX_COLUMNS = {"seq": "sequence", "layer": "layer", "pos": "position", "head": "head", "kv_head": "kv_head",
                 "d_model": "dim", "d_mlp": "neuron", "k": "rank"}


def tidy(obj: Any, index: Sequence[str] = ("seq", "layer", "pos"), spread: Sequence[str] = ("head", "kv_head", "k")):
    """A pandas table of a result dataclass, built from its fields' axis declarations: one row
    per combination of the ``index`` axes (positions a sequence does not reach are left out),
    a column per array field whose axes are ``index`` axes (broadcast where it lacks some) and
    ``spread`` axes (one column per entry: ``alpha_h3``, ``top_values_k0``). The fields with
    any other axis (a ``d_model`` vector) are left out; ``frame.attrs["left_out"]`` names them,
    and ``index=("seq", "layer", "d_model")`` gives their own table."""
    import pandas as pd  # heavy: pandas is only needed for the table

    axes = {name: a for name, a in axes_of(obj).items() if a.measured}
    arrays = {name: getattr(obj, name) for name in axes}
    sizes: dict[str, int] = {}
    for name, a in axes.items():
        sizes.update({ax: n for ax, n in zip(a.names, np.shape(arrays[name]))})
    missing = [ax for ax in index if ax not in sizes]
    if missing:
        raise MeterError(f"{type(obj).__name__} has no axis {missing[0]!r}; its axes: {', '.join(sorted(sizes))}")
    grid = np.meshgrid(*(np.arange(sizes[ax]) for ax in index), indexing="ij")
    columns: dict[str, np.ndarray] = {INDEX_COLUMNS.get(ax, ax): g.ravel() for ax, g in zip(index, grid)}
    left_out = []
    for name, a in axes.items():
        extra = [ax for ax in a.names if ax not in index]
        if any(ax not in spread for ax in extra):
            left_out.append(name)
            continue
        arr = np.asarray(arrays[name])
        # move to (index axes present..., extra...), then broadcast the absent index axes
        order = [a.names.index(ax) for ax in index if ax in a.names] + [a.names.index(ax) for ax in extra]
        arr = arr.transpose(order)
        shape = [sizes[ax] if ax in a.names else 1 for ax in index] + [sizes[ax] for ax in extra]
        arr = np.broadcast_to(arr.reshape(shape), [sizes[ax] for ax in index] + [sizes[ax] for ax in extra])
        flat = arr.reshape(len(columns[next(iter(columns))]), -1)
        if not extra:
            columns[name] = flat[:, 0]
        else:
            tags = np.meshgrid(*(np.arange(sizes[ax]) for ax in extra), indexing="ij")
            for j, combo in enumerate(zip(*(t.ravel() for t in tags))):
                columns[name + "".join(f"_{INDEX_COLUMNS.get(ax, ax)[0]}{i}" for ax, i in zip(extra, combo))] = flat[:, j]
    frame = pd.DataFrame(columns)
    lengths = getattr(obj, "lengths", None)
    if "pos" in index and "seq" in index and lengths is not None:
        frame = frame[frame["position"].to_numpy() < np.asarray(lengths)[frame["sequence"].to_numpy()]].reset_index(drop=True)
    frame.attrs["left_out"] = left_out
    return frame


def select_sequences(obj: Any, index: Sequence[int]) -> Any:
    """A copy of dataclass ``obj`` restricted to sequences ``index`` (every field with a ``"seq"`` axis)."""
    idx = list(index)
    changes = {}
    for name in axes_of(obj):
        value = getattr(obj, name)
        changes[name] = [value[i] for i in idx] if isinstance(value, list) else value[idx]
    return dataclasses.replace(obj, **changes)


def concat_batches(arrays: Sequence[np.ndarray], pos_axis: int | None, width: int) -> np.ndarray:
    """Stack per-batch arrays along the sequence axis (0), right-padding ``pos_axis`` to ``width``.

    Batches are padded to their own longest sequence, so a shorter batch's position axis is
    filled with NaN (-1 for integer arrays such as dimension indices). ``pos_axis`` None: the
    array has no position axis.
    """
    padded = []
    for a in arrays:
        if pos_axis is not None and a.shape[pos_axis] < width:
            pad = [(0, 0)] * a.ndim
            pad[pos_axis] = (0, width - a.shape[pos_axis])
            a = np.pad(a, pad, constant_values=-1 if a.dtype.kind == "i" else np.nan)
        padded.append(a)
    return np.concatenate(padded, axis=0)


class ArrayMeter:
    """Base of the built-in meters: per-sub-batch arrays from a schema, written in hooks, concatenated.

    ``schema``: array name -> :class:`Axes` (only measured ones are allocated); ``sizes``: the
    length of every axis but ``"seq"`` and ``"pos"``, which come from each sub-batch.
    Subclasses implement :meth:`hooks` and :meth:`result`.
    """

    def __init__(self, schema: Mapping[str, Axes], sizes: Mapping[str, int]):
        self.schema = {name: axes for name, axes in schema.items() if axes.measured}
        self.sizes = dict(sizes)
        self._parts: list[dict[str, np.ndarray]] = []
        self._batches: list[TokenBatch] = []
        self._current: TokenBatch | None = None
        self._stats: dict[str, np.ndarray] = {}

    # -- the protocol ----------------------------------------------------------------------
    def begin(self, batch: TokenBatch) -> None:
        sizes = {**self.sizes, "seq": len(batch), "pos": int(batch.tokens.shape[1])}
        self._current = batch
        self._stats = {name: axes.allocate(sizes) for name, axes in self.schema.items()}

    def see_hooks(self, hooks: Sequence[Hook]) -> None:
        """The run's own hooks; a meter that does not read the pattern needs nothing of them."""

    def hooks(self) -> list[Hook]:
        raise NotImplementedError

    def end(self, logits: Float[Tensor, "batch pos vocab"] | None = None) -> None:
        assert self._current is not None, "end() without begin()"
        self._parts.append(self._stats)
        self._batches.append(self._current)
        self._current, self._stats = None, {}

    def result(self) -> Any:
        raise NotImplementedError

    # -- inside hooks ----------------------------------------------------------------------
    def valid(self, width: int, device) -> Bool[Tensor, "batch pos"]:
        """The current sub-batch's real positions among the first ``width`` (:func:`circuits.stats.valid_positions`)."""
        return valid_positions(self._current.lengths.to(device), width)

    def put(self, name: str, layer: int, value: Tensor) -> None:
        """Store ``value`` (``[batch, ...]``) at ``[:, layer, ...]``; its trailing axes may be shorter."""
        value = value.detach()
        if value.is_floating_point() and value.dtype != torch.float32:
            value = value.float()  # bfloat16 has no numpy dtype; float64 rounds as numpy would
        arr = value.cpu().numpy()
        index = (slice(None), layer) + tuple(slice(0, s) for s in arr.shape[1:])
        self._stats[name][index] = arr

    # -- after the last sub-batch ----------------------------------------------------------
    def arrays(self) -> dict[str, np.ndarray]:
        """Every array of the schema over all sub-batches, in the order of the full batch."""
        if not self._parts:
            raise MeterError(f"{type(self).__name__}: no batch was measured")
        width = max(b.tokens.shape[1] for b in self._batches)
        inverse = self._inverse()
        out = {}
        for name, axes in self.schema.items():
            a = concat_batches([part[name] for part in self._parts], axes.index("pos"), width)
            out[name] = a if inverse is None else a[inverse]
        return out

    @property
    def lengths(self) -> np.ndarray:
        """Sequence lengths, in the order of the full batch."""
        lengths = np.concatenate([b.lengths.numpy() for b in self._batches])
        inverse = self._inverse()
        return lengths if inverse is None else lengths[inverse]

    def sequences(self, get: Callable[[TokenBatch], Sequence]) -> list:
        """``get(sub_batch)`` (one entry per sequence) over all sub-batches, in the order of the full batch."""
        items = [x for b in self._batches for x in get(b)]
        inverse = self._inverse()
        return items if inverse is None else [items[i] for i in inverse]

    def _inverse(self) -> np.ndarray | None:
        """The permutation that puts the measured sequences back in batch order (None: they are)."""
        rows, start = [], 0
        for b in self._batches:
            given = getattr(b, "rows", None)
            rows.append(np.asarray(given) if given else np.arange(start, start + len(b)))
            start += len(b)
        order = np.concatenate(rows)
        return None if np.array_equal(order, np.arange(len(order))) else np.argsort(order)


__all__ = [
    "ArrayMeter", "Axes", "Hook", "Meter", "MeterError", "SubBatch", "array", "axes_of", "concat_batches",
    "per_sequence", "select_sequences",
]
