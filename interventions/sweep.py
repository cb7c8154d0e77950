"""Sweeps: many interventions on one batch, fast and resumable.

Why this module exists. The questions sinkscope asks are maps ("which layer's MLP writes the
secondary sink at position p?", "how does the sink score follow the rescaling norm?"): the same
intervention over layers × positions × strengths, hundreds of forward passes. Three things make
that affordable and safe:

The clean and intervened forwards are the paired runner's (:class:`interventions.paired.PairedRunner`:
:meth:`~interventions.paired.PairedRunner.clean_once`, then
:meth:`~interventions.paired.PairedRunner.stacked` per group of items), the same runner
:func:`interventions.effect.measure_effect` uses, through the one driver (:func:`circuits.driver.drive`).

* **Prefix reuse.** The clean pass runs once per sub-batch, with the measurement hooks, and keeps
  the residual entering every block an item starts at (:func:`interventions.forward.capture_resid_pre`)
  and the clean logits (for the side effects). An item whose hooks start at block
  ``l`` (the ``start`` of its :class:`~interventions.hookpoints.Reach`, read from its hook names
  before the clean pass: :meth:`~interventions.base.Intervention.reach`) then runs only blocks ``l..`` with
  :func:`interventions.forward.run_from_layer`; its statistics below ``l`` are copied from the
  clean measurement (:func:`splice_prefix`, every field with a ``layer`` axis), which they equal
  by construction (a test checks the whole item against a full intervened forward on a tiny
  model, to 1e-5).
* **Variants in one batch.** Items that start at the same block run together as the driver's
  stacked runs: the sub-batch is stacked ``k`` times along the batch axis and every hook point
  gets one hook that hands copy ``i`` (rows ``i*b..(i+1)*b``) to item ``i``'s own hooks,
  intervention first, then item ``i``'s own :class:`~circuits.measure.SinkMeter`
  (:func:`circuits.driver.stacked_hooks`). This is generic, not only for strengths, and exact
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
:func:`interventions.effect.compare`) restricted by ``layers``/``positions`` (the defaults of
:class:`~interventions.settings.EffectSettings`, every cell; ``positions="target"`` keeps position
0 and the item's target positions), with the grid values in ``iv_<key>``
columns, the item's index, key and spec. With ``control=`` every item also gets the seeded random
control :func:`interventions.effect.measure_effect` would give it, and its rows the control's
columns (``control``, ``control_delta``, ``did``, ``did_ci_low``, ``did_ci_high``).
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
from typing import Any, Callable, Iterator, Literal, Mapping, Sequence

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from circuits.checks import check_float
from circuits.measure import SinkMeasurement, SinkMeter, provenance
from circuits.meter import axes_of
from circuits.output import exclusive, write_json
from circuits.probes import TokenBatch, as_batch
from interventions.base import HookFactory, Intervention, hooks_for, shortest_length
from interventions.effect import as_intervention, compare, spec_text
from interventions.moves import ControlMode, check_control, random_control, vary
from interventions.paired import Arm, PairedRunner
from interventions.settings import EffectError, EffectSettings, RunSettings
from interventions.targets import Target, target_of

SCHEMA = "sinkscope.sweep/1"
Format = Literal["parquet", "csv"]

#: SinkMeasurement arrays with a layer axis (from the fields' declared axes): copied from the
#: clean run below the start block
LAYER_FIELDS = tuple(name for name, axes in SinkMeasurement.axes().items() if "layer" in axes.names)
#: SinkMeasurement arrays without one
OTHER_FIELDS = tuple(name for name, axes in SinkMeasurement.axes().items() if "layer" not in axes.names and axes.dtype is not None)

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
    pattern: bool  # its hooks need the attention pattern (stacked only with such items)
    control_spec: str | None = None  # the item's random control, once drawn


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
        return (lambda **item: vary(make, **item)), f"vary({spec_text(make)})"
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


# --------------------------------------------------------------------------- prefix splice


def splice_prefix(measured: SinkMeasurement, clean: SinkMeasurement, start: int) -> SinkMeasurement:
    """``measured`` with layers ``< start`` taken from ``clean`` (they did not run; unchanged by
    construction), in every field whose declared axes have a ``layer`` axis."""
    if start <= 0:
        return measured
    changes = {}
    for name, axes in axes_of(measured).items():
        layer = axes.index("layer")
        if layer is None:
            continue
        below = (slice(None),) * layer + (slice(0, start),)
        arr = getattr(measured, name).copy()
        arr[below] = getattr(clean, name)[below]
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
    batch_size: int = RunSettings.batch_size,
    eps: float = EffectSettings.eps,
    layers: Sequence[int] | None = EffectSettings.layers,
    positions: Sequence[int] | Literal["target"] | None = EffectSettings.positions,
    side_effects: bool = True,
    n_resamples: int = EffectSettings.n_resamples,
    confidence: float = EffectSettings.confidence,
    seed: int = EffectSettings.seed,
    control: ControlMode | None = None,
    flag_percent: float = 5.0,
    progress: bool = RunSettings.progress,
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
        control, flag_percent: a seeded random control of every item, as in
            :func:`interventions.effect.measure_effect` (``"random"``, ``"position"``, ``"layer"``
            or ``"direction"``; :func:`interventions.moves.random_control` with ``seed``): the
            item's rows then also hold ``control``, ``control_delta`` and the difference of
            differences ``did`` with its CI, and ``control_spec`` names the control. Controls are
            drawn after the clean pass (a position control avoids the clean run's sinks) and run
            from their first block when the clean pass kept it, else as full forwards.
        side_effects: compute the next-token loss and KL (needs logits; the clean
            logits of the whole batch are kept in memory, ``N × T × vocab`` floats).
            Without them each forward stops before the unembedding.

    Every item is built and validated before the first forward pass, so a bad grid fails fast.
    """
    if format not in ("parquet", "csv"):
        raise EffectError(f"format must be 'parquet' or 'csv', got {format!r}")
    summary = EffectSettings(eps=eps, layers=layers, positions=positions, confidence=confidence, n_resamples=n_resamples, seed=seed)
    run = RunSettings(batch_size=batch_size, progress=progress)
    check_float(flag_percent, "flag_percent", low=0, high=100, error=EffectError)
    batch = as_batch(model, batch)
    make, made_by = _maker(make_intervention)
    out = Path(out)
    items_dir = out / "items"
    n_layers = int(model.cfg.n_layers)
    meta = {**provenance(model, batch), **(metadata or {})}
    settings = {  # part of every item's key: keep its content stable
        "eps": summary.eps, "layers": None if summary.layers is None else list(summary.layers),
        "positions": summary.positions if summary.positions is None or isinstance(summary.positions, str) else list(summary.positions),
        "side_effects": side_effects, "n_resamples": n_resamples, "confidence": confidence, "seed": seed,
        **({} if control is None else {"control": control, "flag_percent": flag_percent}),
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
        if control is not None:
            check_control(iv, control)
        factory.shared = shared  # reference statistics are computed once for all items
        spec = spec_text(iv)
        plain = {k: _plain(v) for k, v in values.items()}
        key = _digest({"context": context, "spec": spec, "item": plain})[:24]
        reach = iv.reach(model, batch)  # from its hook names, no forward
        items.append(_Item(index, plain, iv, spec, key, reach.start, reach.pattern))
        factories[index] = factory
    path_of = lambda item: items_dir / f"{item.key}.{format}"  # noqa: E731
    pending = [item for item in items if not path_of(item).is_file()]

    # the store is one run's at a time: a second sweep into it at once is refused, not interleaved
    with exclusive(out, "the sweep folder"):
        started = time.perf_counter()
        if pending:
            items_dir.mkdir(parents=True, exist_ok=True)
            runner = PairedRunner(model, batch, run, logits=side_effects)
            clean_meter = SinkMeter(model)
            starts = sorted({i.start for i in pending if i.start is not None})
            runner.clean_once(starts, clean_meters=[clean_meter])
            clean = clean_meter.result(meta)
            arms = {item.index: [Arm(item.intervention, factories[item.index], SinkMeter(model), item.start, pattern=item.pattern)]
                    for item in pending}
            if control is not None:
                for item in pending:
                    ctrl_iv, _ = random_control(item.intervention, clean, control, model=model, n_positions=shortest_length(batch),
                                                seed=seed, eps=eps, flag_percent=flag_percent)
                    ctrl_factory = hooks_for(model, ctrl_iv, batch)
                    ctrl_factory.shared = shared
                    ctrl_reach = ctrl_iv.reach(model, batch)
                    ctrl_start = ctrl_reach.start if ctrl_reach.start in starts else None
                    arms[item.index].append(Arm(ctrl_iv, ctrl_factory, SinkMeter(model), ctrl_start, pattern=ctrl_reach.pattern))
                    item.control_spec = spec_text(ctrl_iv)
            owner = {id(arm): item for item in pending for arm in arms[item.index]}
            left = {item.index: len(arms[item.index]) for item in pending}
            bar = tqdm(total=len(items), initial=len(items) - len(pending), desc="sweep", unit="item", disable=not progress)
            try:
                for group in _groups([arm for item in pending for arm in arms[item.index]], max(1, batch_size // min(batch_size, len(batch)))):
                    runner.stacked(group)
                    for arm in group:
                        item = owner[id(arm)]
                        left[item.index] -= 1
                        if left[item.index]:
                            continue
                        main, *ctrl = [_spliced(a, clean, meta) for a in arms[item.index]]
                        effect = compare(
                            clean, main[0], target=main[1], intervention=item.intervention, kl=main[2],
                            control=ctrl[0][0] if ctrl else None, control_target=ctrl[0][1] if ctrl else None,
                            control_kl=ctrl[0][2] if ctrl else None,
                            control_intervention=arms[item.index][1].intervention if ctrl else None, settings=summary,
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
        metadata_path = out / "sweep.json"
        tmp = out / ".sweep.json.tmp"
        write_json(tmp, doc)
        os.replace(tmp, metadata_path)
        return SweepResult(frame, doc, table_path, metadata_path)


def _spliced(arm: Arm, clean: SinkMeasurement, meta: dict) -> tuple[SinkMeasurement, Target, np.ndarray | None]:
    """An arm's measurement (layers below its start taken from ``clean``), target and KL."""
    meas = arm.meter.result(meta)
    if arm.start is not None:
        meas = splice_prefix(meas, clean, arm.start)
    return meas, target_of(arm.intervention, arm.names, clean.n_layers), arm.kl


def _item_frame(frame: pd.DataFrame, item: _Item) -> pd.DataFrame:
    front = {"item": item.index, "item_key": item.key, "spec": item.spec}
    if item.control_spec is not None:
        front["control_spec"] = item.control_spec
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


def _groups(arms: list[Arm], k: int) -> Iterator[list[Arm]]:
    """Runs (items and their controls) that start at the same block, ``k`` at a time (``k``
    copies fit in ``batch_size``).

    Runs whose hooks need the attention pattern are stacked only with each other: a stacked
    forward runs one attention path per layer (eager wherever any copy hooks the pattern,
    fused elsewhere: :mod:`circuits.fused_attention`), so this keeps every run on the path its
    own forward takes.
    """
    by_start: dict[tuple[int | None, bool], list[Arm]] = {}
    for arm in arms:
        by_start.setdefault((arm.start, arm.pattern), []).append(arm)
    for group in by_start.values():
        for i in range(0, len(group), k):
            yield group[i : i + k]


__all__ = ["LAYER_FIELDS", "OTHER_FIELDS", "SweepResult", "grid_items", "splice_prefix", "sweep"]
