"""The measurement job behind ``sinkscope measure`` and ``sinkscope demo``.

One function turns texts into a :class:`~circuits.measure.SinkMeasurement`, one turns that into
the documented ``sinks.json`` document, one writes figures and the interactive view, and one writes the demo's Markdown
report. The CLI only parses arguments and calls these, so notebooks can call them too.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Sequence

import pandas as pd

from circuits import anatomy, plots
from circuits.driver import BATCH_SIZE
from circuits.measure import SinkMeasurement, measure
from circuits.output import to_jsonable, write_json
from circuits.probes import TokenizationError, probe_texts, tokenize
from circuits.stats import MIN_SEQUENCES
from circuits.view import write_view

SCHEMA = "sinkscope.sinks/1"


def measure_texts(
    model,
    texts: Sequence[str],
    *,
    prepend_bos: bool | None = None,
    max_tokens: int | None = None,
    batch_size: int = BATCH_SIZE,
    progress: bool = True,
) -> SinkMeasurement:
    batch = tokenize(model, texts, prepend_bos=prepend_bos, max_tokens=max_tokens)
    return measure(model, batch, batch_size=batch_size, progress=progress, metadata={"max_tokens": max_tokens})


#: Said, in the output and in sinks.json, instead of a CI over one sequence.
CI_NEEDS_TWO = "a confidence interval needs at least two sequences"


def effect_ci_note(n_sequences: int, n_resamples: int) -> str | None:
    """Why an effect has no CI (said in the output and in effect.json instead of "nan"), or None.

    An effect's CI is a paired bootstrap over sequences, which :mod:`circuits.stats` computes
    from :data:`~circuits.stats.MIN_SEQUENCES` sequences on (two sequences give a degenerate
    interval)."""
    if not n_resamples:
        return "confidence intervals switched off (--n-resamples 0)"
    if n_sequences < MIN_SEQUENCES:
        return f"an effect's confidence interval needs at least {MIN_SEQUENCES} sequences (got {n_sequences})"
    return None


def _first_token(meas: SinkMeasurement, point: float, lo: float, hi: float) -> dict:
    if meas.n_sequences < 2:
        return {"value": point, "ci95": None, "ci95_note": CI_NEEDS_TWO}
    return {"value": point, "ci95": [lo, hi]}


def sinks_document(
    meas: SinkMeasurement,
    *,
    eps: float = 0.3,
    thresholds: anatomy.SecondaryThresholds | None = None,
) -> dict:
    """The ``sinks.json`` document (schema ``sinkscope.sinks/1``, documented in docs/formats.md)."""
    th = thresholds or anatomy.SecondaryThresholds.for_depth(meas.n_layers)
    secondary = anatomy.secondary_sinks(meas, th)
    point, lo, hi = anatomy.sink_rate_ci(meas, eps)
    meta = dict(meas.metadata)
    return to_jsonable(
        {
            "schema": SCHEMA,
            "model": meas.model,
            "prepend_bos": meas.prepend_bos,
            "positions": "0-based: position 0 is the first token (the papers' Sink_1)",
            "n_sequences": meas.n_sequences,
            "n_layers": meas.n_layers,
            "n_heads": meas.n_heads,
            "token_ids": meas.token_ids,
            "tokens": meas.tokens,
            "alpha": meas.alpha_mean(),
            "sink_rate": {
                "eps": eps,
                "per_position": meas.sink_rate(eps),
                "first_token": _first_token(meas, point, lo, hi),
            },
            "sink_score": meas.sink_score_mean(),
            "primary_sink": anatomy.primary_sink_layers(meas, eps).to_dict(orient="records"),
            "massive_dimensions": anatomy.massive_dimensions(meas).to_dict(orient="records"),
            "secondary": secondary.to_dict(orient="records"),
            "secondary_thresholds": anatomy.thresholds_dict(th),
            "versions": meta.pop("versions", {}),
            "metadata": meta,
        }
    )


def write_figures(meas: SinkMeasurement, doc: dict, folder: Path, sequence: int = 0) -> list[Path]:
    """The three standard figures of a measurement."""
    return [
        plots.save(plots.sink_score_heatmap(meas, sequence), folder / "sink_score_heatmap.png"),
        plots.save(plots.primary_sink_mass(meas), folder / "primary_sink_mass.png"),
        plots.save(plots.secondary_sinks_plot(_secondary_table(doc), meas.n_layers), folder / "secondary_sinks.png"),
    ]


def _secondary_table(doc: dict):
    table = pd.DataFrame(doc["secondary"])
    th = doc["secondary_thresholds"]
    table.attrs.update(min_lifetime=th["min_lifetime"], primary_from=doc["n_layers"] - th["primary_margin"])
    return table


def write_measure_outputs(meas: SinkMeasurement, folder: Path, *, eps: float = 0.3) -> dict:
    """``sinks.json``, the figures and the interactive ``view.html`` (same numbers, same secondary-sink rule)."""
    doc = sinks_document(meas, eps=eps)
    write_json(folder / "sinks.json", doc)
    write_figures(meas, doc, folder)
    write_view(meas, folder, eps=eps)
    return doc


def demo_texts(n: int = 100, min_tokens: int = 64, model=None) -> list[str]:
    texts = probe_texts()
    if len(texts) < n:
        raise TokenizationError(f"the built-in probe set has {len(texts)} passages, fewer than {n}")
    return texts[:n]


def demo_report(meas: SinkMeasurement, doc: dict, *, eps: float, seconds: float) -> str:
    """The Markdown report of ``make demo``: every number read from ``doc`` / ``meas``."""
    primary = [row for row in doc["primary_sink"]]
    holding = [r["layer"] for r in primary if r["holds_sink"]]
    weak = [r["layer"] for r in primary if not r["holds_sink"]]
    fr = doc["sink_rate"]["first_token"]
    massive = doc["massive_dimensions"]
    sec = [s for s in doc["secondary"]]
    kinds = {k: sum(1 for s in sec if s["kind"] == k) for k in ("secondary", "primary-like")}
    th = doc["secondary_thresholds"]
    lines = [
        f"# sinkscope demo: attention sinks in {meas.model}",
        "",
        f"Measured on {meas.n_sequences} built-in probe passages, {int(meas.lengths.min())}-{int(meas.lengths.max())} tokens each, "
        f"BOS prepended: **{meas.prepend_bos}** (positions are 0-based; position 0 is the first token). "
        f"Run time {seconds:.0f} s. Versions: " + ", ".join(f"{k} {v}" for k, v in doc["versions"].items()) + ".",
        "",
        "## Primary sink",
        "",
        f"- **Sink_1^{eps}** (first token, Gu et al.): **{fr['value']:.1f} %** "
        + (f"(95 % bootstrap CI over sequences {fr['ci95'][0]:.1f}-{fr['ci95'][1]:.1f} %)." if fr["ci95"] else f"(no CI: {fr['ci95_note']})."),
        f"- Layers where at least half of the (head, sequence) pairs give the first token alpha > {eps}: "
        f"{anatomy.layer_ranges(holding)} ({len(holding)} of {meas.n_layers}).",
        f"- Layers where it does not: {anatomy.layer_ranges(weak, 'none')}.",
        "",
        "| layer | sink score of position 0 | mean alpha_0 | share of heads with alpha_0 > eps |",
        "|---:|---:|---:|---:|",
        *[f"| {r['layer']} | {r['primary_sink_score']:.3f} | {r['mean_alpha0']:.3f} | {r['head_share_alpha0_gt_eps']:.2f} |" for r in primary],
        "",
        "![primary-sink mass](primary_sink_mass.png)",
        "",
        "## Massive activations",
        "",
        "Residual dimensions with |value| ≥ 100 and ≥ 1000 × the layer's median |value| (Sun et al. 2024):",
        "",
        "| dim | layers | max abs value | max ratio to median | share at position 0 | occurrences |",
        "|---:|:--|---:|---:|---:|---:|",
        *[
            f"| {m['dim']} | {m['first_layer']}-{m['last_layer']} | {m['max_abs_value']:.0f} | {m['max_ratio']:.0f} "
            f"| {m['share_at_position_0']:.2f} | {m['n_occurrences']} |"
            for m in massive
        ],
        *([] if massive else ["(none found)"]),
        "",
        "## Secondary sinks (Wong et al.)",
        "",
        f"Rule: |cos(h_t, h_0)| > {th['cos']} at a layer; classes scaled to depth {meas.n_layers}: "
        f"secondary when {th['min_lifetime']} < lifetime < {meas.n_layers - th['primary_margin']}, "
        f"primary-like when lifetime ≥ {meas.n_layers - th['primary_margin']}.",
        "",
        f"Found **{kinds['secondary']} secondary** and **{kinds['primary-like']} primary-like** tokens "
        f"in {len({s['sequence'] for s in sec})} of {meas.n_sequences} sequences.",
        "",
    ]
    if sec:
        table = pd.DataFrame(sec)
        by_token = (
            table.groupby("token")
            .agg(count=("token", "size"), start_layer=("start_layer", "median"), lifetime=("lifetime", "median"),
                 peak_score=("peak_score", "median"), score_ratio=("score_ratio", "median"))
            .sort_values("count", ascending=False)
            .head(12)
        )
        lines += [
            "Most frequent tokens among them (medians):",
            "",
            "| token | count | creation layer | lifetime | peak sink score | score / median other token |",
            "|:--|---:|---:|---:|---:|---:|",
            *[f"| `{plots.token_label(tok, 16)}` | {int(r['count'])} | {r['start_layer']:.0f} | {r['lifetime']:.0f} "
              f"| {r['peak_score']:.3f} | {r['score_ratio']:.1f} |" for tok, r in by_token.iterrows()],
            "",
        ]
    lines += [
        "![secondary sinks](secondary_sinks.png)",
        "",
        "## One sequence in detail",
        "",
        "![sink score heat map](sink_score_heatmap.png)",
        "",
        "All numbers above are read from `sinks.json` in this folder, written by the same run; "
        "[`view.html`](view.html) is its interactive view (open it in a browser, offline).",
        "",
    ]
    return "\n".join(lines)


def run_demo(model, folder: Path, *, n: int = 100, max_tokens: int = 64, eps: float = 0.3, prepend_bos: bool | None = None) -> dict:
    start = time.perf_counter()
    texts = demo_texts(n)
    meas = measure_texts(model, texts, prepend_bos=prepend_bos, max_tokens=max_tokens)
    short = int((meas.lengths < max_tokens).sum())
    if short:
        raise TokenizationError(f"{short} probe passages are shorter than {max_tokens} tokens")
    doc = write_measure_outputs(meas, folder, eps=eps)
    report = demo_report(meas, doc, eps=eps, seconds=time.perf_counter() - start)
    (folder / "report.md").write_text(report, encoding="utf-8")
    return doc
