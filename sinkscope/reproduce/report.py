"""The reproduction report: run the three paper modules on one model, and write what they found.

Why this module exists. Computing a paper's numbers (:mod:`~sinkscope.reproduce.wong`,
:mod:`~sinkscope.reproduce.li`, :mod:`~sinkscope.reproduce.gu`) and judging them
(:mod:`~sinkscope.reproduce.claims`) are separate from presenting them; this module only
presents. :func:`reproduce` runs the shared long-input pass, each paper's ``measure``, evaluates
each paper's claims on its numbers, and writes into the output folder ``report.md`` (Markdown,
figures inline), one PNG per figure and ``numbers.json`` (schema ``sinkscope.reproduce/2``: the
settings, every claim's thresholds under ``rules``, every finding with its evidence numbers
under ``claims``, the run's time and memory, and each paper's numbers). :func:`redraw` re-renders
the figures that are pure functions of ``numbers.json``.

Time and memory: wall time per section and the process's peak resident memory
(``resource.getrusage``, model loading included) are written to the report.
"""

from __future__ import annotations

import json
import os
import resource
import sys
import time
from dataclasses import asdict
from functools import partial
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import pandas as pd
import torch

from circuits import anatomy, paper_plots, plots
from circuits.errors import SinkscopeError
from circuits.long_inputs import LongInputs, observe_long_inputs, sliding_layers
from circuits.measure import provenance
from circuits.models import load_model
from circuits.output import to_jsonable, write_json
from sinkscope.reproduce import gu, li, wong
from sinkscope.reproduce.claims import Finding, Measured, evaluate
from sinkscope.reproduce.settings import SIZES, Settings, Size

SCHEMA = "sinkscope.reproduce/2"
#: every claim of the report, in the order of its verdict table
CLAIMS = (*wong.CLAIMS, *li.CLAIMS, *gu.CLAIMS)

Figure = Callable[..., str]


class ReproduceError(SinkscopeError, ValueError):
    """A reproduction was asked for with settings it does not know."""


# ------------------------------------------------------------------------------ Markdown helpers


def md_table(frame: pd.DataFrame, digits: int = 3) -> str:
    """A DataFrame as a Markdown table (no extra dependency)."""
    def fmt(v):
        if isinstance(v, (float, np.floating)):
            if not np.isfinite(v):
                return "–"
            if abs(v) >= 1e4 or 0 < abs(v) < 1e-3:
                return f"{v:.{digits}g}"
            return f"{v:.{digits}f}".rstrip("0").rstrip(".")
        if isinstance(v, (list, tuple)):
            return ", ".join(fmt(x) for x in v)
        return str(v).replace("|", "\\|").replace("\n", "\\n")

    cols = list(frame.columns)
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---:" if frame[c].dtype.kind in "fiu" else ":--" for c in cols) + "|"]
    for row in frame.itertuples(index=False):
        lines.append("| " + " | ".join(fmt(v) for v in row) + " |")
    return "\n".join(lines)


def claims_table(findings: Sequence[Finding | dict]) -> str:
    """The verdict table: one row per finding (a :class:`Finding` or its ``numbers.json`` dict)."""
    lines = ["| id | paper | claim | verdict | measured | rule |", "|:--|:--|:--|:--|:--|:--|"]
    for f in findings:
        c = f if isinstance(f, dict) else asdict(f)
        cells = [c["id"], c["paper"], c["claim"], f"**{c['verdict']}**", c["evidence"], c["rule"]]
        lines.append("| " + " | ".join(str(x).replace("|", "\\|") for x in cells) + " |")
    return "\n".join(lines)


def methods_section(claims: Sequence) -> str:
    """Per claim: the paper's method, the toolkit's, and every difference (``Claim.method``)."""
    out = ["## Methods: the paper's and the toolkit's", ""]
    for c in claims:
        if c.method is not None:
            out += [f"**{c.id}** — {c.claim}", "", c.method.markdown(), ""]
    return "\n".join(out)


def _save_figure(folder: Path, fig, name: str, caption: str) -> str:
    plots.save(fig, folder / f"{name}.png")
    return f"![{caption}]({name}.png)\n\n*{caption}*\n"


def cpu_seconds() -> float:
    """User + system CPU time of this process so far (on a shared machine wall time overstates the cost)."""
    use = resource.getrusage(resource.RUSAGE_SELF)
    return use.ru_utime + use.ru_stime


def peak_memory_mb() -> float:
    """Peak resident memory of this process so far (Linux reports KiB, macOS bytes)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 1024 if sys.platform != "darwin" else peak / 2**20


# ------------------------------------------------------------------------------ sections


def wong_section(res: Measured, model, obs: LongInputs, s: Settings, figure: Figure) -> str:
    """Wong et al.'s section: the candidates, the heat map, and one figure per claim."""
    meas, f = obs.sinks, res.frames
    table, att, n_layers = f["candidates"], f["attended"], meas.n_layers
    th = anatomy.SecondaryThresholds.for_depth(n_layers)
    n_att, name = len(att), meas.model
    lines = [
        "## Wong et al.: secondary attention sinks",
        "",
        f"{meas.n_sequences} reasoning traces, {int(meas.lengths.min())}-{int(meas.lengths.max())} tokens each, BOS prepended: "
        f"**{meas.prepend_bos}**. Hidden-state rule |cos(h_t, h_0)| > {th.cos}; classes scaled to {n_layers} layers "
        f"(secondary when {th.min_lifetime} < lifetime < {n_layers - th.primary_margin}). The rule flags "
        f"**{len(table)}** tokens ({int((table['kind'] == 'secondary').sum())} secondary-class, "
        f"{int((table['kind'] == 'primary-like').sum())} primary-like); **{n_att}** secondary-class tokens also receive "
        f"≥ {s.min_score_ratio:g} × the median token's attention at their peak layer (*attended secondary sinks*, used below).",
        "",
    ]
    local, window = sliding_layers(model)
    if local and window and int(meas.lengths.max()) > window:
        lines += [
            f"Note: layers {anatomy.layer_ranges(local, 'none')} use sliding-window attention over {window} tokens, so on these "
            f"{int(meas.lengths.max())}-token inputs queries beyond position {window - 1} cannot see position 0 there; "
            "the first token's sink score in those layers is lowered by construction, not only by the model's choice.",
            "",
        ]
    if n_att:
        top = att.groupby("token").agg(count=("token", "size"), creation_layer=("start_layer", "median"), lifetime=("lifetime", "median"),
                                       peak_score=("peak_score", "median"), score_ratio=("score_ratio", "median"))
        top = top.sort_values("count", ascending=False).head(10).reset_index()
        top["token"] = [f"`{plots.token_label(t, 16)}`" for t in top["token"]]
        lines += ["Most frequent attended secondary sinks (medians):", "", md_table(top), ""]
    seq = int(att["sequence"].value_counts().idxmax()) if n_att else 0  # the trace with the most attended secondary sinks
    lines.append(figure(paper_plots.long_heatmap(meas, seq), "wong_heatmap",
                        f"Sink score (layer × position) of trace {seq}, {int(meas.lengths[seq])} tokens: whole (log scale) and first positions"))
    lines.append(figure(paper_plots.primary_vs_secondary(f["layers"], title=f"{name}: primary sink and live secondary sinks per layer"),
                        "wong_primary_per_layer", "Primary-sink score per layer (line) and attended secondary sinks alive per layer (bars)"))
    lines += [md_table(f["layers"]), ""]
    lines.append(figure(plots.secondary_sinks_plot(att, n_layers, title=f"{name}: attended secondary sinks, creation layer × lifetime (n={n_att})"),
                        "wong_sink_levels", "Sink levels: attended secondary sinks counted over (creation layer, lifetime)"))
    lines.append(figure(paper_plots.sink_levels_plot(f["sink_level_counts"], title=f"{name}: flagged tokens, creation layer × lifetime"),
                        "wong_sink_levels_log", "Sink levels as the authors plot them: log(1 + count) over (creation layer, lifetime), "
                        "every token the hidden-state rule flags (window off, noise included)"))
    lines += ["Detection with the sink-clipper window off and on (`circuits.anatomy.secondary_sinks(use_window=...)`; |cos|, "
              "lifetime counts flagged layers, not necessarily contiguous):", "", md_table(f["detection_settings"]), ""]
    sweep = f["norm_sweep"]
    lines += [f"Norm intervention as in the authors' code: at layer {int(sweep['layer'].iloc[0])} (22 of 48 scaled to depth), every MLP "
              "output with cos > 0.98 to the first token's MLP output (first token excluded) gets L2 norm `target_norm` "
              "(`rescale-sink:scope=whole,min_cos=0.98,reference=mlp_out`), on the first "
              f"{s.dose_traces} trace(s); detection (window off) re-run on the intervened pass (target – = clean):", "",
              md_table(sweep), ""]
    sites = obs.mlp.sites
    title = f"{name}: MLP sub-outputs at the creation layer (n={n_att})"
    lines.append(figure(paper_plots.mlp_site_cosines(f["joined"], sites, f["site_baseline"], title=title),
                        "wong_mlp_sites", "|cos| of each MLP sub-output with the first token's at the creation layer"))
    lines += [md_table(f["sites"]), "", f"Median |cos(written MLP output, h_0)| at the creation layer: **{res.numbers['median_abs_cos_sink']:.3f}**.", ""]
    lines.append(figure(paper_plots.norm_scatter(f["joined"], res.numbers["corr_norm_score"], res.numbers["corr_norm_lifetime"],
                                                 title=f"{name}: MLP output norm against sink score and lifetime"),
                        "wong_norm_scatter", "L2 norm of the MLP output at the creation layer against peak sink score and lifetime"))
    if f["dose"] is not None:
        lines += [
            f"Dose response: the {res.numbers['dose_n_sinks']} attended secondary sinks of the first {s.dose_traces} traces, each one's "
            "writing MLP output rescaled at exactly its token (`interventions.recipes.rescale_dose_response`, `edit-token-mlp` "
            "with `mode=rescale,scope=whole`); score = mean sink score over the sink's clean lifetime layers.",
            "",
            figure(paper_plots.dose_response(f["dose"], title=f"{name}: norm rescaling of sink-aligned MLP outputs"),
                   "wong_dose_response", "Dose response of the norm intervention"),
            md_table(f["dose"]), "",
        ]
    return "\n".join(lines)


def li_section(res: Measured, model, obs: LongInputs, s: Settings, figure: Figure) -> str:
    """Li et al.'s section: variance discrepancy, super neurons and planting."""
    f, name = res.frames, obs.sinks.model
    summary = res.numbers["planting_summary"]
    sn, massive = f["super_neurons"], f["massive"]
    lines = [
        "## Li et al.: the structural origin of the sink",
        "",
        f"Variance discrepancy as the paper measures it (L1's evidence): {s.variance_n} random-token sequences of {s.variance_tokens} "
        "tokens (`circuits.analyses.batch_variance`); per layer and position the per-dimension variance *across the batch* of the "
        "head outputs (`z`) and of the attention output (`out`), position 0 against the median of the others, Spearman ρ of "
        "variance against position, Kendall τ between the `z` and `out` orderings.",
        "",
        md_table(f["batch_variance"]), "",
        "DomRatio of the first token after each block's input RMSNorm (`DomRatioMeter(where='ln1')`, probe passages):", "",
        md_table(f["dom_ratio"]), "",
    ]
    if len(f["weight_super_neurons"]):
        cross = res.numbers["super_neuron_cross_check"]
        lines += [f"Weight-based super neurons (`weight_super_neurons`, norm ratio ≥ 5): {len(f['weight_super_neurons'])}; also "
                  f"activation-based: {len(cross['both'])} of {cross['n_activations']} activation-based ones.", "",
                  md_table(f["weight_super_neurons"].head(10)), ""]
    lines += [
        "*Within-vector variance* (a different statistic, kept for comparison; not the paper's): the variance over each head's "
        "`d_head` of its aggregated value output (`hook_z`) on the long inputs, averaged over heads; the other tokens' value is the "
        "median over positions ≥ 1.",
        "",
        figure(paper_plots.variance_by_layer(f["variance"], title=f"{name}: attention outputs, first token vs the rest"),
               "li_variance", "Variance of head outputs and norm of the attention output per layer"),
        md_table(f["variance"][["layer", "z_var_first", "z_var_rest", "z_var_ratio", "out_norm_first", "out_norm_rest", "out_norm_ratio"]]),
        "",
        "Massive residual dimensions (Sun et al.: |value| ≥ 100 and ≥ 1000 × median):", "",
        md_table(massive.head(8)) if len(massive) else "(none)", "",
        figure(paper_plots.super_neuron_plot(sn, f["first_token_dims"], title=f"{name}: super neurons (down-projection inputs)"),
               "li_super_neurons", "Strongest super neurons, labelled by the residual dimension they write most"),
        md_table(sn.sort_values("ratio", ascending=False).head(12)) if len(sn) else "(no super neuron)", "",
        f"Planting on {s.plant_n} probe passages × {s.plant_tokens} tokens, planted position {s.plant_position}, with "
        f"`interventions.recipes.plant_sink` (the same protocol as the recipe), in layers {summary['isolate']['edited_layers']}: "
        "(i) `isolate`, the position attends only to itself; (ii) `amplify-variance`, its attention output's deviation from the "
        f"sequence mean multiplied by λ in {list(summary['amplify_by_factor'])} (the verdict reads λ = "
        f"{summary['amplify']['factor']:g}, the recipe's default), and Li et al.'s control, plain "
        "scaling by that λ. "
        "Scores are means over the layers after the edit. Controls: the same position in the clean run, and a random control "
        f"(the same edit moved to a random other position, scored at position {s.plant_position} and at its own position).",
        "",
        figure(paper_plots.planting_plot(f["planting"], title=f"{name}: sink score of the planted position {s.plant_position}"),
               "li_planting", "Sink score by layer of the planted position under each intervention, with controls"),
        md_table(pd.DataFrame([summary[c] for c in ("isolate", "amplify", "plain_scaling")])), "",
        "Deviation amplification, planted score over clean by λ: "
        + ", ".join(f"×{k}: {v:.2f}" for k, v in summary["amplify_by_factor"].items()) + ".",
        "",
        figure(paper_plots.lambda_curve(pd.DataFrame(summary["lambda_grid"]), title=f"{name}: planted score at position {s.plant_position} vs λ"),
               "li_lambda", "Sink score of the planted position against λ: deviation amplification and plain scaling (Li et al.'s control)"),
        md_table(pd.DataFrame(summary["lambda_grid"])), "",
    ]
    return "\n".join(lines)


def gu_section(res: Measured, model, obs: LongInputs, s: Settings, figure: Figure) -> str:
    """Gu et al.'s section: Sink_1^eps across models, key and value norms, key bias."""
    f, name = res.frames, obs.sinks.model
    failed = res.numbers["failed_models"]
    wide = f["sink_rates"].pivot(index="eps", columns="model", values="sink_rate").reset_index()
    lines = [
        "## Gu et al.: when the sink emerges, and the sink as a key bias",
        "",
        f"Sink_1^eps on {s.eps_n} probe passages × {s.eps_tokens} tokens, every model available offline"
        + (f" (failed to load: {'; '.join(failed)})" if failed else "") + ". Paper references at eps = 0.3: GPT-2 XL ≈ 77 %, "
        "Llama-2-7B ≈ 92 %, Llama-3-8B ≈ 99 %, Mistral-7B ≈ 97 %, the authors' 60M model ≈ 18 %.",
        "",
        figure(paper_plots.sink_rate_vs_eps(f["sink_rates"]), "gu_sink_rate_eps", "Sink_1^eps against eps for every model available offline"),
        md_table(wide), "",
        f"Key (`{obs.kv.key_hook}`) and value (`attn.hook_v`) norms on the long inputs; ratios are the first token over the median other token.",
        "",
        figure(paper_plots.kv_norms_plot(f["kv_norms"], title=f"{name}: key and value norms of the first token"), "gu_kv_norms",
               "Key and value norm ratios per layer, attention received and the value's share of head outputs"),
        md_table(f["kv_norms"]), "",
        f"Interventions on {s.keybias_n} probe passages × {s.keybias_tokens} tokens (`interventions.keybias`): KL of the next-token "
        "distribution from the clean run's, mean over tokens.",
        "",
        figure(paper_plots.keybias_effect_plot(f["keybias"], title=f"{name}: zero the sink's value vs drop its attention"), "gu_keybias",
               "Effect on the output of zeroing the sink's value against removing its attention (renormalised)"),
        md_table(f["keybias"]), "",
    ]
    return "\n".join(lines)


def _load(doc: dict) -> str:
    la = doc.get("load_average")
    return "n/a" if not la else " / ".join(f"{x:.1f}" for x in la) + " over 1 / 5 / 15 min"


def render(doc: dict, sections: Sequence[str], prepend_bos: bool) -> str:
    """``report.md``: the header with time and memory, the verdict table, then the paper sections."""
    t = doc["timings_s"]
    head = [
        f"# Reproducing the attention-sink papers on {doc['model']}",
        "",
        f"`sinkscope reproduce --model {doc['model']} --size {doc['size']}`. Every number and verdict below was measured in this run "
        f"and is in `numbers.json`; each verdict follows its rule (last column), which is written from the claim's thresholds in "
        f"`sinkscope/reproduce/` (the same objects decide the verdict). "
        f"Positions are 0-based (the papers' Sink_1 is position 0); BOS prepended: **{prepend_bos}** (the model's native policy).",
        "",
        f"Run time **{t['total'] / 60:.1f} min** wall, {doc['cpu_s'] / 60:.1f} min CPU, on {doc['threads']} torch thread(s) "
        f"(machine load average at the end {_load(doc)}; model load {t['load_model']:.0f} s, long-input pass "
        f"{t['main_pass']:.0f} s, Wong {t['wong']:.0f} s, Li {t['li']:.0f} s, Gu {t['gu']:.0f} s); peak resident memory "
        f"**{doc['peak_memory_mb'] / 1024:.2f} GB**. Versions: "
        + ", ".join(f"{k} {v}" for k, v in doc["provenance"]["versions"].items()) + ".",
        "",
        "## Verdicts",
        "",
        claims_table(doc["claims"]),
        "",
        methods_section([c for c in CLAIMS if c.id in {f["id"] if isinstance(f, dict) else f.id for f in doc["claims"]}]),
    ]
    return "\n".join(head + list(sections))


# ------------------------------------------------------------------------------ entry points


def reproduce(
    model,
    out_folder: str | Path,
    *,
    size: Size = "full",
    settings: Settings | None = None,
    checkpoints: str | Path | None = None,
    progress: bool = False,
) -> dict:
    """Run every paper analysis on ``model`` (a name or a loaded bridge) and write the report.

    ``checkpoints``: a folder searched for pre-training lab checkpoints to include in Gu et
    al.'s cross-model Sink_1^eps comparison (default ``$SINKSCOPE_CHECKPOINTS``).

    Writes ``report.md``, the figures (PNG) and ``numbers.json`` into ``out_folder`` (which
    must exist; the CLI stages it atomically). Returns the ``numbers.json`` document.
    """
    if size not in SIZES:
        raise ReproduceError(f"size must be one of {', '.join(SIZES)}, got {size!r}")
    s = settings or SIZES[size]
    start, cpu_start = time.perf_counter(), cpu_seconds()
    folder = Path(out_folder)
    folder.mkdir(parents=True, exist_ok=True)
    figure = partial(_save_figure, folder)
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    if isinstance(model, str):
        model = load_model(model)
    timings["load_model"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    obs = observe_long_inputs(model, s.n_traces, s.max_tokens, batch_size=s.batch_size, progress=progress)
    timings["main_pass"] = time.perf_counter() - t0
    papers = (
        ("wong", wong, lambda: wong.measure(model, obs, s), wong_section),
        ("li", li, lambda: li.measure(model, obs, s), li_section),
        ("gu", gu, lambda: gu.measure(model, obs, s, progress, checkpoints), gu_section),
    )
    numbers, findings, sections = {}, [], []
    for key, module, run, section in papers:
        t0 = time.perf_counter()
        res = run()
        findings += evaluate(module.CLAIMS, res.numbers)
        sections.append(section(res, model, obs, s, figure))
        numbers[key] = res.numbers
        timings.update(res.timings)
        timings[key] = time.perf_counter() - t0
    doc = {
        "schema": SCHEMA,
        "model": obs.sinks.model,
        "size": size,
        "settings": asdict(s),
        "rules": {c.id: dict(c.thresholds) for c in CLAIMS},
        "claims": [asdict(f) for f in findings],
        "timings_s": {**timings, "total": time.perf_counter() - start},
        "cpu_s": cpu_seconds() - cpu_start,
        "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None,
        "peak_memory_mb": peak_memory_mb(),
        "threads": torch.get_num_threads(),
        "provenance": provenance(model, obs.batch),
        **numbers,
    }
    write_json(folder / "numbers.json", doc)
    doc = json.loads(json.dumps(to_jsonable(doc)))
    (folder / "report.md").write_text(render(doc, sections, obs.sinks.prepend_bos), encoding="utf-8")
    return doc


def redraw(folder: str | Path) -> list[Path]:
    """Re-render, from a report's ``numbers.json``, every figure that is a pure function of its
    tables (after a change of figure style; no model is run, no number changes). The heat map,
    sink levels, MLP-site and norm-scatter figures need per-token data that ``numbers.json``
    does not keep and are left as they are."""
    folder = Path(folder)
    doc = json.loads((folder / "numbers.json").read_text(encoding="utf-8"))
    name, frame = doc["model"], pd.DataFrame
    first_dims = li.first_token_dims(doc["li"]["massive_dimensions"], li.L2.thresholds["first_token_share"])
    figures = {
        "wong_primary_per_layer": paper_plots.primary_vs_secondary(
            frame(doc["wong"]["layers"]), title=f"{name}: primary sink and live secondary sinks per layer"),
        "li_variance": paper_plots.variance_by_layer(frame(doc["li"]["variance"]), title=f"{name}: attention outputs, first token vs the rest"),
        "li_super_neurons": paper_plots.super_neuron_plot(
            frame(doc["li"]["super_neurons"]), first_dims, title=f"{name}: super neurons (down-projection inputs)"),
        "li_planting": paper_plots.planting_plot(
            frame(doc["li"]["planting"]), title=f"{name}: sink score of the planted position {doc['settings']['plant_position']}"),
        "gu_sink_rate_eps": paper_plots.sink_rate_vs_eps(frame(doc["gu"]["sink_rates"])),
        "gu_kv_norms": paper_plots.kv_norms_plot(frame(doc["gu"]["kv_norms"]), title=f"{name}: key and value norms of the first token"),
        "gu_keybias": paper_plots.keybias_effect_plot(frame(doc["gu"]["keybias"]), title=f"{name}: zero the sink's value vs drop its attention"),
    }
    if doc["wong"].get("sink_level_counts"):
        counts = np.asarray(doc["wong"]["sink_level_counts"])
        figures["wong_sink_levels_log"] = paper_plots.sink_levels_plot(counts, title=f"{name}: flagged tokens, creation layer × lifetime")
    if doc["li"]["planting_summary"].get("lambda_grid"):
        figures["li_lambda"] = paper_plots.lambda_curve(frame(doc["li"]["planting_summary"]["lambda_grid"]), title=f"{name}: planted score vs λ")
    if doc["wong"]["dose_response"]:
        figures["wong_dose_response"] = paper_plots.dose_response(
            frame(doc["wong"]["dose_response"]), title=f"{name}: norm rescaling of sink-aligned MLP outputs")
    return [plots.save(fig, folder / f"{key}.png") for key, fig in figures.items()]


__all__ = [
    "CLAIMS", "ReproduceError", "SCHEMA", "claims_table", "cpu_seconds", "md_table", "peak_memory_mb", "redraw", "render", "reproduce",
]
