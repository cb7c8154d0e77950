"""Sweeps: many interventions on one batch, fast and resumable.

Why this module exists. The questions sinkscope asks are maps ("which layer's MLP writes the
secondary sink at position p?", "how does the sink score follow the rescaling norm?"): the same
intervention over layers × positions × strengths, hundreds of forward passes. Three things make
that affordable and safe:

* **Prefix reuse.** The clean pass runs once per sub-batch, with the measurement hooks, and keeps
  the residual entering every block an item starts at (:func:`interventions.forward.capture_resid_pre`)
  and the clean logits (for the side effects). An item whose hooks start at block
  ``l`` (:attr:`~interventions.base.Intervention.min_layer`) then runs only blocks ``l..`` with
  :func:`interventions.forward.run_from_layer`; its statistics below ``l`` are copied from the
  clean measurement, which they equal by construction (a test checks the whole item against a
  full intervened forward on a tiny model, to 1e-5).
* **Variants in one batch.** Items that start at the same block run together: the sub-batch is
  stacked ``k`` times along the batch axis and every hook point gets one hook that hands copy
  ``i`` (rows ``i*b..(i+1)*b``) to item ``i``'s own hooks, intervention first, then item ``i``'s
  own :class:`~circuits.measure.SinkMeter`. This is generic, not only for strengths, and exact
  because every hook acts on each sequence independently: all built-in interventions do
  (reference data such as means or resampled sources is computed in ``prepare``, outside the
  forward). A user kind whose hook mixes sequences *of the activation it is given* must be swept
  with ``batch_size`` equal to the sub-batch (``k = 1``). ``batch_size`` bounds the rows of one
  forward, copies included, so memory stays that of one ordinary batch.
* **Resumable store.** Each item's rows are written, atomically, to ``out/items/<key>.<fmt>`` as
  soon as the item finishes. The key is a stable hash of the item's spec and grid values, the
  model, the tokens and the measurement settings; a re-run skips every item whose file exists
  (no forward pass at all when nothing is left) and an interrupted sweep resumes where it
  stopped. At the end the items of this grid are consolidated, in grid order, into
  ``out/sweep.<fmt>`` (Parquet or CSV) plus ``out/sweep.json`` (metadata).

Each item's rows are :attr:`interventions.effect.Effect.frame` (via
:func:`interventions.effect.compare`) restricted by ``layers``/``positions`` (default: every
layer, position 0 plus the item's target positions), with the grid values in ``iv_<key>``
columns, the item's index, key and spec. Random controls are not part of sweeps: sweep the
control positions or layers as items of their own.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Literal, Mapping, Sequence

import numpy as np
import pandas as pd
import torch
from torch import Tensor
from tqdm.auto import tqdm

from circuits.measure import SinkMeasurement, SinkMeter, iter_batches, provenance
from circuits.probes import TokenBatch
from interventions.base import HookFactory, Intervention, InterventionError, checked_hooks, hook_layer, hooks_for
from interventions.effect import (
    EffectError,
    _check_settings,
    _spec_text,
    as_intervention,
    compare,
    first_token_resid_hooks,
    kl_divergence,
    target_of,
    vary,
)
from interventions.forward import capture_resid_pre, run_from_layer

SCHEMA = "sinkscope.sweep/1"
Format = Literal["parquet", "csv"]

#: SinkMeasurement arrays indexed [sequence, layer, ...]: copied from the clean run below the start block
LAYER_FIELDS = ("alpha", "sink_score", "resid_norm", "cos_to_first", "first_resid", "top_dims", "top_values", "median_abs")
#: SinkMeasurement arrays that are not per layer
OTHER_FIELDS = ("lengths", "next_token_loss")

MakeIntervention = Callable[..., Intervention] | str | Intervention


@dataclass
class SweepResult:
    """The consolidated table, its metadata (``sweep.json``) and where they were written."""

    frame: pd.DataFrame
    metadata: dict
    table_path: Path
    metadata_path: Path


@dataclass
class _Item:
    index: int
    values: dict
    intervention: Intervention
    spec: str
    key: str
    start: int | None  # first block to run; None: the full forward (hooks outside the blocks)


@dataclass
class _CleanChunk:
    rows: list[int]
    sub: TokenBatch
    resid: dict[int, Tensor]  # residual entering each start block
    firsts: dict[int, Tensor]  # h_0^l of the clean run: seeds the primary-sink directions
    logits: Tensor | None  # [b, pos, vocab]: the clean logits, for the KL of every item


# --------------------------------------------------------------------------- items


def grid_items(grid: Mapping[str, Sequence[Any]]) -> list[dict]:
    """The cartesian product of ``grid`` in order (the last key varies fastest)."""
    if not isinstance(grid, Mapping) or not grid:
        raise EffectError("grid must be a non-empty mapping of name -> list of values, e.g. {'layer': [1, 2]}")
    keys = list(grid)
    values = []
    for key in keys:
        v = grid[key]
        if isinstance(v, (str, bytes)) or not hasattr(v, "__iter__"):
            raise EffectError(f"grid[{key!r}] must be a list of values, got {v!r}")
        v = list(v)
        if not v:
            raise EffectError(f"grid[{key!r}] is empty")
        values.append(v)
    return [dict(zip(keys, combo)) for combo in itertools.product(*values)]


def _maker(make: MakeIntervention) -> tuple[Callable[..., Intervention], str]:
    """A function ``**item -> Intervention`` and its description for the metadata."""
    if isinstance(make, Intervention):
        return (lambda **item: vary(make, **item)), f"vary({_spec_text(make)})"
    if isinstance(make, str):
        def from_template(**item):
            try:
                text = make.format(**item)
            except (KeyError, IndexError, ValueError) as exc:
                raise EffectError(f"spec template {make!r}: cannot fill it from {item}: {exc!r}") from exc
            return as_intervention(text)

        return from_template, f"template {make!r}"
    if callable(make):
        return (lambda **item: as_intervention(make(**item))), f"callable {getattr(make, '__qualname__', repr(make))}"
    raise EffectError(f"make_intervention must be an Intervention, a spec template or a callable, got {type(make).__name__}")


def _plain(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, (list, tuple, np.ndarray)):
        return [_plain(v) for v in value]
    return value


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


# --------------------------------------------------------------------------- hooks of stacked copies


def stacked_hooks(model, copies: Sequence[Sequence[tuple[str, Callable]]], rows: int) -> list[tuple[str, Callable]]:
    """One hook per hook point for ``len(copies)`` stacked copies of a ``rows``-sequence batch.

    Copy ``i`` occupies rows ``i*rows..(i+1)*rows`` of every activation; its hooks run, in their
    order, on that slice only. Aliases of one hook point are merged (the first name is used).
    """
    hook_dict = model.hook_dict
    order: list[str] = []
    by_point: dict[int, list[list[Callable]]] = {}
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
                for fn in copy_fns:
                    out = fn(piece, hook)
                    if out is not None:
                        piece, changed = out, True
                pieces.append(piece)
            return torch.cat(pieces, dim=0) if changed else None

        return hook

    return [(names[point], composite(fns)) for point, fns in by_point.items()]


def splice_prefix(measured: SinkMeasurement, clean: SinkMeasurement, start: int) -> SinkMeasurement:
    """``measured`` with layers ``< start`` taken from ``clean`` (they did not run; unchanged by construction)."""
    if start <= 0:
        return measured
    changes = {}
    for name in LAYER_FIELDS:
        arr = getattr(measured, name).copy()
        arr[:, :start] = getattr(clean, name)[:, :start]
        changes[name] = arr
    return dataclasses.replace(measured, **changes)


# --------------------------------------------------------------------------- the sweep


@torch.no_grad()
def sweep(
    model,
    batch: TokenBatch,
    make_intervention: MakeIntervention,
    grid: Mapping[str, Sequence[Any]],
    out: str | Path,
    *,
    format: Format = "parquet",
    batch_size: int = 8,
    eps: float = 0.3,
    layers: Sequence[int] | None = None,
    positions: Sequence[int] | Literal["target"] | None = "target",
    side_effects: bool = True,
    n_resamples: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
    progress: bool = True,
    metadata: dict | None = None,
) -> SweepResult:
    """Run ``make_intervention`` over ``grid`` on ``batch``; resumable; returns the consolidated table.

    Args:
        make_intervention: how a grid item becomes an intervention:
            an :class:`Intervention` to vary (``grid={"layer": [...], "strength": [...]}`` goes
            through :func:`interventions.effect.vary`), a spec template filled with
            ``str.format`` (``"ablate-mlp:layer={layer},positions={position}"``), or a callable
            ``make(**item) -> Intervention`` (or spec string).
        grid: name -> values; items are the cartesian product, in order.
        out: folder of the store (``items/``) and of ``sweep.<format>`` and ``sweep.json``.
        format: ``"parquet"`` or ``"csv"``, for the item files and the table.
        batch_size: rows per forward pass, stacked copies included (see the module docstring).
        eps, layers, positions, n_resamples, confidence, seed: as in
            :func:`interventions.effect.compare`, for every item.
        side_effects: compute the next-token loss and KL (needs logits; the clean
            logits of the whole batch are kept in memory, ``N × T × vocab`` floats).
            Without them each forward stops before the unembedding.

    Every item is built and validated before the first forward pass, so a bad grid fails fast.
    """
    if format not in ("parquet", "csv"):
        raise EffectError(f"format must be 'parquet' or 'csv', got {format!r}")
    _check_settings(eps, confidence, n_resamples, batch_size)
    if len(batch) == 0:
        raise EffectError("empty batch")
    make, made_by = _maker(make_intervention)
    out = Path(out)
    items_dir = out / "items"
    n_layers = int(model.cfg.n_layers)
    meta = {**provenance(model, batch), **(metadata or {})}
    settings = {
        "eps": eps, "layers": None if layers is None else [int(l) for l in layers],
        "positions": positions if positions is None or isinstance(positions, str) else [int(p) for p in positions],
        "side_effects": side_effects, "n_resamples": n_resamples, "confidence": confidence, "seed": seed,
    }
    context = _digest({
        "schema": SCHEMA, "model": meta["model"], "model_source": meta.get("model_source"), "n_layers": n_layers,
        "d_model": int(model.cfg.d_model), "dtype": meta["dtype"], "prepend_bos": batch.prepend_bos,
        "token_ids": batch.token_ids, "settings": settings,
    })

    items: list[_Item] = []
    factories: dict[int, HookFactory] = {}
    shared: dict = {}
    for index, values in enumerate(grid_items(grid)):
        iv = make(**values)
        factory = hooks_for(model, iv, batch)  # validates
        factory.shared = shared  # reference statistics are computed once for all items
        spec = _spec_text(iv)
        plain = {k: _plain(v) for k, v in values.items()}
        key = _digest({"context": context, "spec": spec, "item": plain})[:24]
        start = iv.min_layer
        items.append(_Item(index, plain, iv, spec, key, None if start < 0 else start))
        factories[index] = factory
    path_of = lambda item: items_dir / f"{item.key}.{format}"  # noqa: E731
    pending = [item for item in items if not path_of(item).is_file()]

    started = time.perf_counter()
    if pending:
        items_dir.mkdir(parents=True, exist_ok=True)
        runner = _Runner(model, batch, batch_size, side_effects, sorted({i.start for i in pending if i.start is not None}), meta)
        bar = tqdm(total=len(items), initial=len(items) - len(pending), desc="sweep", unit="item", disable=not progress)
        try:
            for group in runner.groups(pending):
                measured = runner.run(group, factories)
                for item, (meas, kl, names) in zip(group, measured):
                    effect = compare(
                        runner.clean, meas, target=target_of(item.intervention, names, n_layers), intervention=item.spec,
                        kl=kl, eps=eps, layers=layers, positions=positions, confidence=confidence,
                        n_resamples=n_resamples, seed=seed,
                    )
                    _write_atomic(_item_frame(effect.frame, item), path_of(item), format)
                    bar.update(1)
        finally:
            bar.close()

    frame = _read_items([path_of(i) for i in items], format)
    table_path = out / f"sweep.{format}"
    _write_atomic(frame, table_path, format)
    doc = {
        "schema": SCHEMA,
        **meta,
        "made_by": made_by,
        "grid": {k: [_plain(v) for v in vs] for k, vs in grid.items()},
        "settings": settings,
        "n_items": len(items),
        "n_run": len(pending),
        "n_resumed": len(items) - len(pending),
        "seconds": time.perf_counter() - started,
        "table": table_path.name,
        "items": [{"item": i.index, "key": i.key, "spec": i.spec, **{f"iv_{k}": v for k, v in i.values.items()}} for i in items],
        "columns": {
            "item, item_key, spec, iv_<name>": "the grid item: its index, store key, intervention spec and grid values",
            "metric, layer, position, n, clean, intervened, delta, ci_low, ci_high": "as in effect.json (interventions.effect.compare)",
        },
        "token_ids": batch.token_ids,
    }
    from circuits.output import write_json

    metadata_path = out / "sweep.json"
    tmp = out / ".sweep.json.tmp"
    write_json(tmp, doc)
    os.replace(tmp, metadata_path)
    return SweepResult(frame, doc, table_path, metadata_path)


def _item_frame(frame: pd.DataFrame, item: _Item) -> pd.DataFrame:
    front = {"item": item.index, "item_key": item.key, "spec": item.spec}
    for k, v in item.values.items():
        front[f"iv_{k}"] = v if isinstance(v, (int, float, str, bool)) or v is None else json.dumps(v)
    head = pd.DataFrame({k: [v] * len(frame) for k, v in front.items()})
    return pd.concat([head, frame.reset_index(drop=True)], axis=1)


def _write_atomic(frame: pd.DataFrame, path: Path, format: Format) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    if format == "parquet":
        frame.to_parquet(tmp, index=False)
    else:
        frame.to_csv(tmp, index=False)
    os.replace(tmp, path)


def _read_items(paths: Sequence[Path], format: Format) -> pd.DataFrame:
    read = pd.read_parquet if format == "parquet" else pd.read_csv
    return pd.concat([read(p) for p in paths], ignore_index=True)


# --------------------------------------------------------------------------- running items


class _Runner:
    """The clean pass (once) and the intervened passes of groups of items."""

    def __init__(self, model, batch: TokenBatch, batch_size: int, side_effects: bool, starts: list[int], meta: dict):
        self.model, self.batch, self.side_effects = model, batch, side_effects
        self.n_layers = int(model.cfg.n_layers)
        self.chunk_rows = list(iter_batches(batch, batch_size))
        self.inverse = np.argsort(np.concatenate(self.chunk_rows)).tolist()
        self.batch_size, self.meta = batch_size, meta
        self.width = int(batch.lengths.max())
        self.chunks, self.clean = self._clean_pass(starts)

    def _clean_pass(self, starts: list[int]) -> tuple[list[_CleanChunk], SinkMeasurement]:
        model, meter, chunks = self.model, SinkMeter(self.model), []
        device = model.cfg.device
        for rows in self.chunk_rows:
            sub = self.batch.select(rows)
            firsts: dict[int, Tensor] = {}
            meter.begin(sub)
            hooks = [*meter.hooks(), *first_token_resid_hooks(self.n_layers, firsts)]
            tokens = sub.tokens.to(device)
            logits = None
            with model.hooks(fwd_hooks=hooks):
                if starts and self.side_effects:
                    logits, resid = capture_resid_pre(model, tokens, starts, run="logits")
                elif starts:
                    resid = capture_resid_pre(model, tokens, starts, run="all_blocks")
                else:
                    logits, resid = model(tokens), {}
            meter.end(logits if self.side_effects else None)
            chunks.append(_CleanChunk(rows, sub, resid, firsts, logits if self.side_effects else None))
        return chunks, meter.result(self.meta).select(self.inverse)

    def groups(self, items: list[_Item]):
        """Items that start at the same block, ``k`` at a time (``k`` copies fit in ``batch_size``)."""
        k = max(1, self.batch_size // max(len(rows) for rows in self.chunk_rows))
        by_start: dict[int | None, list[_Item]] = {}
        for item in items:
            by_start.setdefault(item.start, []).append(item)
        for group in by_start.values():
            for i in range(0, len(group), k):
                yield group[i : i + k]

    def run(self, group: list[_Item], factories: dict[int, HookFactory]) -> list[tuple[SinkMeasurement, np.ndarray, set[str]]]:
        model, k = self.model, len(group)
        start = group[0].start
        meters = [SinkMeter(model) for _ in group]
        kls = [np.full((len(self.batch), self.width), np.nan) for _ in group]
        names: list[set[str]] = [set() for _ in group]
        for chunk in self.chunks:
            sub, b = chunk.sub, len(chunk.sub)
            copies = []
            for i, item in enumerate(group):
                ctx = factories[item.index].context(sub, sink_directions=chunk.firsts)
                hooks = checked_hooks(model, item.intervention, ctx)
                below = [n for n, _ in hooks if start is not None and 0 <= hook_layer(n) < start]
                if below:
                    raise InterventionError(
                        f"{type(item.intervention).__name__}: min_layer is {start} but it hooks {below}; fix layers_touched()"
                    )
                names[i].update(n for n, _ in hooks)
                meters[i].begin(sub)
                measure_hooks = [h for h in meters[i].hooks() if start is None or hook_layer(h[0]) >= start]
                copies.append([*hooks, *measure_hooks])
            fwd = stacked_hooks(model, copies, b)
            want_logits = self.side_effects
            if start is None:
                tokens = sub.tokens.to(model.cfg.device).repeat(k, 1)
                out = model.run_with_hooks(tokens, fwd_hooks=fwd, return_type="logits" if want_logits else None)
            else:
                resid = chunk.resid[start].repeat(k, 1, 1)
                out = run_from_layer(model, resid, start, fwd_hooks=fwd, return_type="logits" if want_logits else "resid")
            for i in range(k):
                logits = out[i * b : (i + 1) * b] if want_logits else None
                meters[i].end(logits)
                if want_logits:
                    kls[i][chunk.rows, : sub.tokens.shape[1]] = kl_divergence(chunk.logits, logits, sub.valid).numpy()
            del out
        results = []
        for i in range(k):
            meas = meters[i].result(self.meta).select(self.inverse)
            if start is not None:
                meas = splice_prefix(meas, self.clean, start)
            results.append((meas, kls[i] if self.side_effects else None, names[i]))
        return results


__all__ = ["LAYER_FIELDS", "OTHER_FIELDS", "SweepResult", "grid_items", "splice_prefix", "stacked_hooks", "sweep"]
