"""The interactive view: one self-contained HTML file of a measurement or of an intervention's effect.

Why: researchers would rather look than read JSON. The view is a single file with its script,
style and data inline, so it opens from ``file://`` with no network (no CDN, no fonts fetched),
can be mailed or archived next to ``sinks.json``, and renders inline in Jupyter from the same
HTML (an ``<iframe srcdoc>``, whose scripts run without the notebook's trust or a network).

What it shows (the script is ``circuits/data/view/view.js``): each sequence's text with its
tokens coloured by sink score at the chosen layer; a layer slider and a sequence selector; the
layer × position heat map, linked to the text; on hover or click, a token's sink score across
layers, its alpha per head, and for a secondary sink its creation layer, lifetime and class; the
first token (the primary sink) marked. An effect's view switches between clean, intervened and
their delta, and marks the intervention's target positions. Given the part of the input each
token belongs to (``parts``: the model's own sessions carry them, :attr:`circuits.probes.TokenBatch.parts`),
the text marks the template and problem tokens (a line above them) apart from the model's own
generated ones, and the detail panel names the token's part.

Size. The data are compact JSON, every float at 4 significant digits. Sink scores are kept for
every (layer, position) of the sequences shown (30 layers × 8,192 tokens: 2.1 MB of JSON, the
whole page 3.5 MB), up to ``max_values`` numbers per run: beyond it only the first sequences
that fit are shown and the page says so. Alpha per head costs ``layers × heads`` numbers per token (270 on SmolLM2), so it
is kept for every token only while that fits in ``alpha_values``; otherwise for the tokens that
matter, in this order: each sequence's first token, the secondary sinks and an effect's target
positions, then the tokens with the highest sink score at any layer. The page says how many.

Nothing here computes a statistic of its own: sink scores and alpha are the measurement's, the
secondary sinks are :func:`circuits.anatomy.secondary_sinks`' rows (those of ``sinks.json``).
"""

from __future__ import annotations

import html
import json
import math
import re
from dataclasses import dataclass
from importlib.resources import files
from pathlib import Path
from typing import Any, Protocol, Sequence

import numpy as np
from jaxtyping import Float

from circuits import anatomy
from circuits.checks import check_eps, check_int
from circuits.errors import SinkscopeError
from circuits.measure import SinkMeasurement
from circuits.parts import PartsError, check_parts, to_spans

#: Sink-score numbers per run embedded at most (about 8 bytes each): 8 sequences of 2,048 tokens on 30 layers.
MAX_VALUES = 600_000
#: Per-head alpha numbers embedded at most (about 7 bytes each).
ALPHA_VALUES = 150_000
#: Significant digits of every embedded float.
DIGITS = 4

_ASSETS = files("circuits") / "data" / "view"


class EffectLike(Protocol):
    """What the view reads from an :class:`interventions.effect.Effect` (circuits never imports it);
    ``target`` (with ``to_dict()``) and ``summary`` are read when present."""

    clean: SinkMeasurement
    intervened: SinkMeasurement

    @property
    def spec(self) -> str: ...


class ViewError(SinkscopeError, ValueError):
    """A view was asked of something it cannot show (neither a measurement nor an effect)."""


# ------------------------------------------------------------------------------ compact JSON


def _round(x: float) -> float | None:
    """``x`` at :data:`DIGITS` significant digits (through text, so JSON writes it in as few
    characters: 0.0001234, not 0.00012340000000000001); NaN and infinities become None."""
    return float(f"{x:.{DIGITS}g}") if math.isfinite(x) else None


def _floats(values) -> list:
    """An array as nested lists of rounded floats (None for NaN)."""
    arr = np.asarray(values, dtype=np.float64)
    if arr.ndim == 1:
        return [_round(x) for x in arr.tolist()]
    return [_floats(row) for row in arr]


def _encode(data: dict) -> str:
    return json.dumps(data, ensure_ascii=False, allow_nan=False, separators=(",", ":"))


# ------------------------------------------------------------------------------ data


def _secondary_rows(meas: SinkMeasurement, thresholds: anatomy.SecondaryThresholds) -> dict[int, list[dict]]:
    table = anatomy.secondary_sinks(meas, thresholds)
    out: dict[int, list[dict]] = {}
    for row in table.to_dict(orient="records"):
        out.setdefault(int(row["sequence"]), []).append({
            "position": int(row["position"]), "start_layer": int(row["start_layer"]), "lifetime": int(row["lifetime"]),
            "kind": row["kind"], "peak_score": _round(row["peak_score"]), "peak_layer": int(row["peak_layer"]),
            "score_ratio": _round(row["score_ratio"]), "max_abs_cos": _round(row["max_abs_cos"]),
        })
    return out


def _pick_sequences(lengths: Sequence[int], n_layers: int, sequences: Sequence[int] | None, max_values: int) -> list[int]:
    if sequences is not None:
        picked = [int(s) for s in sequences]
        if not picked:
            raise ViewError("sequences: name at least one sequence (or None for all that fit)")
        bad = [s for s in picked if not 0 <= s < len(lengths)]
        if bad:
            raise ViewError(f"sequences: {bad[0]} is out of range 0..{len(lengths) - 1}")
        return picked
    picked, used = [], 0
    for s, n in enumerate(lengths):
        cost = int(n) * n_layers
        if picked and used + cost > max_values:
            break
        picked.append(s)
        used += cost
    return picked


def _alpha_positions(
    scores: dict[int, Float[np.ndarray, "layer pos"]], must: dict[int, set[int]], budget_tokens: int
) -> tuple[dict[int, list[int]], bool]:
    """Which positions keep their per-head alpha, per sequence; and whether that is every position."""
    total = sum(s.shape[1] for s in scores.values())
    if total <= budget_tokens:
        return {s: list(range(sc.shape[1])) for s, sc in scores.items()}, True
    chosen: dict[int, set[int]] = {s: {0} for s in scores}
    left = budget_tokens - len(scores)
    for s in scores:  # secondary sinks and targets, in sequence order, while they fit
        for p in sorted(must.get(s, ())):
            if left <= 0:
                break
            if p not in chosen[s]:
                chosen[s].add(p)
                left -= 1
    if left > 0:  # then the most attended tokens, over all sequences
        candidates = []
        for s, sc in scores.items():
            with np.errstate(all="ignore"):
                peak = np.nanmax(np.where(np.isnan(sc), -np.inf, sc), axis=0)
            for p in np.argsort(-peak, kind="stable")[: left + 1]:
                candidates.append((-float(peak[p]), s, int(p)))
        for _, s, p in sorted(candidates):
            if left <= 0:
                break
            if p not in chosen[s]:
                chosen[s].add(p)
                left -= 1
    return {s: sorted(c) for s, c in chosen.items()}, False


#: the bytes of a token that hold part of a UTF-8 character, as :mod:`circuits.probes` writes them
_BYTE = re.compile(r"\\x([89a-f][0-9a-f])")
_BYTE_RUN = re.compile(r"(?:\\x[89a-f][0-9a-f])+")


def merged_text(tokens: Sequence[str]) -> str:
    """The tokens joined, with the ``\\xHH`` bytes of characters split over tokens decoded back
    into the characters (an emoji over two byte-level tokens reads as the emoji)."""
    return _BYTE_RUN.sub(lambda m: bytes(int(h, 16) for h in _BYTE.findall(m.group())).decode("utf-8", "backslashreplace"),
                         "".join(tokens))


def partial_chars(tokens: Sequence[str]) -> dict[int, str]:
    """Position -> the character(s) a token holds part of, for every token written with ``\\xHH``
    bytes (:func:`circuits.probes.tokenize`): the page shows it beside the bytes. A character's
    bytes are followed across token boundaries, never across other text."""
    out: dict[int, str] = {}
    run: list[tuple[int, int]] = []  # (byte, position) of consecutive escaped bytes

    def flush() -> None:
        i = 0
        while i < len(run):
            lead = run[i][0]
            size = 2 if 0xC0 <= lead < 0xE0 else 3 if 0xE0 <= lead < 0xF0 else 4 if 0xF0 <= lead < 0xF8 else 1
            chunk = run[i : i + size]
            try:
                char = bytes(b for b, _ in chunk).decode("utf-8")
            except UnicodeDecodeError:  # a stray byte: it stays an escape, with no character
                char, chunk = "", chunk[:1]
            for k in dict.fromkeys(k for _, k in chunk):
                if char:
                    out[k] = out.get(k, "") + char
            i += len(chunk)
        run.clear()

    for k, token in enumerate(tokens):
        pos = 0
        for m in _BYTE.finditer(token):
            if m.start() > pos:
                flush()
            run.append((int(m.group(1), 16), k))
            pos = m.end()
        if pos < len(token) or not token:
            flush()
    flush()
    return out


def _sequence_label(tokens: list[str], n: int = 48) -> str:
    text = merged_text(tokens).replace("\n", " ").strip()
    return text if len(text) <= n else text[: n - 1] + "…"


def view_data(
    source: SinkMeasurement | EffectLike,
    *,
    eps: float = 0.3,
    thresholds: anatomy.SecondaryThresholds | None = None,
    sequences: Sequence[int] | None = None,
    title: str | None = None,
    max_values: int = MAX_VALUES,
    alpha_values: int = ALPHA_VALUES,
    parts: Sequence[Sequence[str]] | None = None,
) -> dict:
    """The data the page embeds: a JSON-ready dict, every float at :data:`DIGITS` significant digits.

    Args:
        source: a :class:`~circuits.measure.SinkMeasurement`, or an effect (anything with
            ``clean`` and ``intervened`` measurements of the same sequences, such as
            :class:`interventions.effect.Effect`).
        eps: the alpha threshold the page counts heads with (``Sink_k^eps``).
        thresholds: the secondary-sink classes (default: scaled to the model's depth, as ``sinks.json``).
        sequences: which sequences to show (default: all that fit in ``max_values``).
        max_values, alpha_values: the size budgets of the module docstring.
        parts: the part of the input each token belongs to, one label of
            :data:`circuits.parts.PARTS` per token of every sequence of ``source`` (e.g. the
            ``parts`` of the :class:`~circuits.probes.TokenBatch` it measured); stored per
            sequence shown as runs ``[start, stop, part]`` (:func:`circuits.parts.to_spans`).
    """
    check_int(max_values, "max_values", error=ViewError)
    check_int(alpha_values, "alpha_values", minimum=0, error=ViewError)
    if isinstance(source, SinkMeasurement):
        runs = {"measurement": source}
        kind = "measurement"
    elif isinstance(getattr(source, "clean", None), SinkMeasurement) and isinstance(getattr(source, "intervened", None), SinkMeasurement):
        runs = {"clean": source.clean, "intervened": source.intervened}
        kind = "effect"
    else:
        raise ViewError(f"view() shows a SinkMeasurement or an effect with .clean and .intervened measurements, not {type(source).__name__}")
    eps = check_eps(eps, error=ViewError)
    first = next(iter(runs.values()))
    n_layers, n_heads = first.n_layers, first.n_heads
    th = thresholds or anatomy.SecondaryThresholds.for_depth(n_layers)
    lengths = [int(n) for n in first.lengths]
    if parts is not None:
        try:
            parts = check_parts(parts, lengths)
        except PartsError as exc:
            raise ViewError(str(exc)) from None
    shown = _pick_sequences(lengths, n_layers, sequences, max_values)
    secondary = {name: _secondary_rows(m.select(shown), th) for name, m in runs.items()}

    target = None
    if kind == "effect":
        tgt = getattr(source, "target", None)
        target = tgt.to_dict() if hasattr(tgt, "to_dict") else None

    scores: dict[int, np.ndarray] = {}
    must: dict[int, set[int]] = {}
    for i, s in enumerate(shown):
        n = lengths[s]
        stacked = np.stack([m.sink_score[s, :, :n] for m in runs.values()])  # [R, L, n]
        with np.errstate(all="ignore"):
            scores[i] = np.nanmax(np.where(np.isnan(stacked), -np.inf, stacked), axis=0)
        must[i] = {r["position"] for rows in secondary.values() for r in rows.get(i, [])}
        if target:
            must[i] |= {p for p in target.get("positions", []) if p < n}
    per_token = n_layers * n_heads
    alpha_at, complete = _alpha_positions(scores, must, max(len(shown), alpha_values // (per_token * len(runs))))

    seqs = []
    for i, s in enumerate(shown):
        n = lengths[s]
        pos = alpha_at[i]
        seqs.append({
            "index": s,
            "label": _sequence_label(first.tokens[s]),
            "tokens": list(first.tokens[s][:n]),
            # the character(s) of tokens that hold part of one (their bytes show as \xHH)
            "chars": {str(k): c for k, c in partial_chars(first.tokens[s][:n]).items()},
            "score": {name: _floats(m.sink_score[s, :, :n]) for name, m in runs.items()},
            "alpha_positions": pos,
            # [positions, layer * head], layer-major
            "alpha": {name: _floats(m.alpha[s][:, :, pos].transpose(2, 0, 1).reshape(len(pos), per_token)) for name, m in runs.items()},
            "secondary": {name: secondary[name].get(i, []) for name in runs},
            "parts": None if parts is None else to_spans(parts[s][:n]),
        })

    model = first.model
    meta: dict[str, Any] = {}
    if kind == "effect":
        meta["spec"] = getattr(source, "spec", "?")
        summary = getattr(source, "summary", {}) or {}
        t = summary.get("target_sink_score")
        if isinstance(t, dict):
            meta["target_sink_score"] = {k: None if t.get(k) is None else _round(float(t[k])) for k in ("clean", "intervened", "delta")}
    stored = sum(len(p) for p in alpha_at.values())
    return {
        "schema": "sinkscope.view/1",
        "kind": kind,
        "title": title or (f"{model}: {meta['spec']}" if kind == "effect" else f"{model}: attention sinks"),
        "model": model,
        "prepend_bos": bool(first.prepend_bos),
        "n_layers": n_layers,
        "n_heads": n_heads,
        "eps": eps,
        "runs": list(runs),
        "thresholds": {"cos": th.cos, "min_lifetime": th.min_lifetime, "primary_from": n_layers - th.primary_margin},
        "n_sequences": first.n_sequences,
        "sequences": seqs,
        "alpha_complete": complete,
        "alpha_tokens": stored,
        "n_tokens": sum(lengths[s] for s in shown),
        "target": target,
        "effect": meta,
        "default_layer": _default_layer(scores[0]) if scores else 0,
    }


def _default_layer(score: Float[np.ndarray, "layer pos"]) -> int:
    """The layer where the first sequence's most attended non-first token peaks (secondary sinks show there)."""
    if score.shape[1] < 2:
        return 0
    rest = score[:, 1:]
    finite = np.where(np.isfinite(rest), rest, -np.inf)
    return int(np.unravel_index(np.argmax(finite), finite.shape)[0])


# ------------------------------------------------------------------------------ HTML


def _asset(name: str) -> str:
    return (_ASSETS / name).read_text(encoding="utf-8")


_PLACEHOLDER = re.compile(r"__(CSS|JS|TITLE|DATA)__")


def render_html(data: dict) -> str:
    """The whole page: template, style, script and data, one string with nothing to fetch.

    The template's placeholders are filled in one pass (``re.sub``): what goes in is never
    searched again, so a title, a model folder or a spec that contains ``__DATA__`` (or any
    placeholder) stays text. The data sit in a ``<script type="application/json">`` block with
    every ``<`` escaped, so no string in them can end the block.
    """
    payload = _encode(data).replace("<", "\\u003c")  # "<" occurs only inside strings: no "</script>" can end the block
    values = {"CSS": _asset("view.css"), "JS": _asset("view.js"), "TITLE": html.escape(data["title"]), "DATA": payload}
    return _PLACEHOLDER.sub(lambda m: values[m.group(1)], _asset("view.html"))


@dataclass(frozen=True)
class View:
    """A rendered view: ``html`` is the whole page. Displays inline in Jupyter; :meth:`save` writes it."""

    html: str
    data: dict
    height: int = 780

    def _repr_html_(self) -> str:
        # an iframe: the page's script runs in its own document, whatever the notebook front end
        # trusts, and reaches nothing outside (sandbox without same-origin)
        return (f'<iframe srcdoc="{html.escape(self.html, quote=True)}" sandbox="allow-scripts" '
                f'style="width:100%;height:{self.height}px;border:1px solid #ddd" title="{html.escape(self.data["title"])}"></iframe>')

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.write_text(self.html, encoding="utf-8")
        return path

    @property
    def size_bytes(self) -> int:
        return len(self.html.encode("utf-8"))

    def __repr__(self) -> str:
        return f"View({self.data['title']!r}, {len(self.data['sequences'])} sequences, {self.size_bytes / 1e6:.2f} MB)"


def view(source: SinkMeasurement | EffectLike, **kwargs) -> View:
    """The interactive view of a measurement or an effect (keywords: :func:`view_data`'s).

    In Jupyter, a cell ending in ``view(meas)`` shows it; ``view(meas).save("view.html")`` writes the file;
    ``view(obs.sinks, parts=obs.batch.parts)`` marks where each token of the model's own sessions sits.
    """
    data = view_data(source, **kwargs)
    return View(render_html(data), data)


def write_view(source: SinkMeasurement | EffectLike, folder: str | Path, **kwargs) -> Path:
    """``folder/view.html`` (the CLI calls it inside its atomic output folder)."""
    return view(source, **kwargs).save(Path(folder) / "view.html")
