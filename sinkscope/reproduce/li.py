"""Li et al., "The Structural Origin of Attention Sink" (arXiv 2605.06611): the measurements and
claims L1-L4 of the reproduction.

Why this module exists. It holds what is specific to this paper: which numbers its claims
need and the claim records that judge them. The observations live in :mod:`circuits`
(:func:`circuits.analyses.variance_by_position`, :func:`circuits.analyses.super_neurons`,
:func:`circuits.anatomy.massive_dimensions`), the planting protocol in
:func:`interventions.recipes.plant_sink`, the report's figures of this paper in :data:`FIGURES`
(read by the report and by :func:`~sinkscope.reproduce.report.redraw`), and its section of
``report.md`` in :func:`section`. Only the abstract of the paper could be checked, so its
metrics are the toolkit's documented choices.

Planting (L3, L4) is :func:`~interventions.recipes.plant_sink` on ``Settings.plant_n`` probe
passages, at position ``Settings.plant_position``, with its random control (the same edit at a
random other position, same layers and strength), both in the recipe's early layers
(:data:`~interventions.recipes.DEFAULT_ISOLATE_LAYERS`): (i) ``isolate`` — the position attends
only to itself; (ii) ``amplify`` — its attention output's deviation from the sequence mean,
``mu + lambda (o - mu)``, multiplied by each ``lambda`` of ``Settings.amplify_factors``. The verdict
reads the recipe's own ``lambda`` (:data:`~interventions.recipes.DEFAULT_AMPLIFY_FACTOR`, run even
when the grid lacks it), the one the random control and Li et al.'s control, plain scaling
``lambda o`` (``mode="norm"``), run at; the other values draw the curve. Each is scored over the
layers after the edit (:func:`~interventions.recipes.summarize_plant`).
"""

from __future__ import annotations

import time
from dataclasses import replace

import numpy as np
import pandas as pd

from circuits import analyses, anatomy, paper_plots
from circuits.long_inputs import LongInputs
from circuits.meter import MeterError
from circuits.probes import probe_texts, tokenize
from interventions import recipes
from sinkscope.reproduce.claims import AllOf, Claim, Measured, Method, Test
from sinkscope.reproduce.figures import PaperFigure, as_saved
from sinkscope.reproduce.markdown import Figure, md_table
from sinkscope.reproduce.settings import Settings

PAPER = "Li"

# ------------------------------------------------------------------------------ claims


def _l1(n, th):
    ratio = np.array([r["z_ratio"] for r in n.get("batch_variance", [])], dtype=float)  # across-batch, as the paper
    if not len(ratio):
        return {"median_ratio": float("nan"), "early_hits": [], "n_early_hits": 0, "all_hits": "none", "ratio": th["ratio"]}
    early = ratio[: max(1, len(ratio) // 3)]
    early_hits = [int(l) for l in np.flatnonzero(early >= th["ratio"])]
    return {"median_ratio": float(np.nanmedian(ratio)), "early_hits": early_hits, "n_early_hits": len(early_hits),
            "all_hits": anatomy.layer_ranges(np.flatnonzero(ratio >= th["ratio"]), "none"), "ratio": th["ratio"]}


L1 = Claim(
    "L1", PAPER, "Variance discrepancy: the first token's attention output has a larger variance than the others'", {"ratio": 2.0},
    _l1,
    holds=Test("median_ratio", ">=", "ratio", "median over layers of across-batch var(position 0) / median var(positions ≥ 1) of head outputs"),
    partly=Test("n_early_hits", ">=", 1, "number of layers in the first third with that ratio ≥ {ratio}"),
    describe=lambda e: f"random-token batch: median over layers of across-batch var(position 0)/var(others) of head outputs = "
    f"{e['median_ratio']:.2f}; ≥ {e['ratio']:g} in early layers {e['early_hits'] or 'none'} (all layers ≥ {e['ratio']:g}: {e['all_hits']})",
    rule_note=("kept from the within-vector rule, now applied to the paper's across-batch statistic, after smollm2's across-batch "
               "numbers had been seen (13.9 x and 4.1 x in layers 0-1 only, tests/test_li.py)"),
)


def first_token_dims(massive: list[dict], share: float) -> set[int]:
    """The massive residual dimensions with at least ``share`` of their occurrences at position 0."""
    return {int(m["dim"]) for m in massive if m["share_at_position_0"] >= share}


def _l2(n, th):
    sn, first = n["super_neurons"], first_token_dims(n["massive_dimensions"], th["first_token_share"])
    writers = [r for r in sn if r["top_dims"][0] in first]
    per_layer = pd.Series([r["layer"] for r in sn], dtype=int).value_counts()
    most = int(per_layer.max()) if len(per_layer) else 0
    ev = {"super_neurons": len(sn), "writers": len(writers), "max_per_layer": most, "d_mlp": n["d_mlp"],
          "max_share_per_layer": most / n["d_mlp"], "first_token_dims": sorted(first)}
    if writers:
        best = max(writers, key=lambda r: r["ratio"])
        ev.update(strongest_layer=best["layer"], strongest_channel=best["channel"], strongest_ratio=best["ratio"])
    return ev


def _l2_text(e) -> str:
    text = (f"{e['super_neurons']} super neurons (≤ {e['max_per_layer']} of {e['d_mlp']} channels per layer); "
            f"{e['writers']} write a first-token massive dimension {e['first_token_dims'] or '(none found)'} as their largest output")
    if e["writers"]:
        text += f", strongest: layer {e['strongest_layer']} channel {e['strongest_channel']} ({e['strongest_ratio']:.0f} × median)"
    return text


L2 = Claim(
    "L2", PAPER, "Super neurons: a few FFN channels with outsized first-token activations write the massive dimensions",
    {"min_ratio": 100.0, "first_token_share": 0.5, "sparsity": 0.01},
    _l2,
    holds=AllOf((Test("writers", ">=", 1, "number of super neurons (|first-token activation| ≥ {min_ratio} × the layer's median) whose largest "
                      "output is a massive dimension with ≥ {first_token_share} of its occurrences at position 0"),
                 Test("max_share_per_layer", "<=", "sparsity", "largest share of a layer's channels that are super neurons"))),
    partly=Test("super_neurons", ">=", 1, "number of super neurons"),
    describe=_l2_text,
)


def _plant(kind: str):
    def evidence(n, th):
        row = n["planting_summary"][kind]
        keys = ("condition", "layers", "score", "clean", "primary", "control", "did", "did_ci_low", "vs_clean", "vs_primary")
        ev = {k: row[k] for k in keys} | {"position": n["plant_position"]}
        if kind == "amplify":
            ev["plain_scaling_vs_clean"] = n["planting_summary"]["plain_scaling"]["vs_clean"]
        return ev

    return evidence


def _plant_text(e) -> str:
    text = (f"{e['condition']}: sink score of position {e['position']} over layers {e['layers']} = {e['score']:.3f} "
            f"vs {e['clean']:.3f} clean ({e['vs_clean']:.1f} ×) and {e['primary']:.3f} for the clean primary sink; "
            f"random control (the same edit at another position) {e['control']:.3f} here, difference of differences "
            f"{e['did']:.3f} (CI low {e['did_ci_low']:.3f})")
    if "plain_scaling_vs_clean" in e:
        text += f"; plain scaling (Li et al.'s control) {e['plain_scaling_vs_clean']:.1f} × clean"
    return text


_PLANT = {"holds": 5.0, "partly": 2.0, "vs_primary": 0.5}
_PLANT_HOLDS = AllOf((Test("vs_clean", ">=", "holds", "planted score / clean"),
                      Test("vs_primary", ">=", "vs_primary", "planted score / clean primary sink's"),
                      Test("did_ci_low", ">", 0, "lower CI bound of the difference of differences with the random control")))
_PLANT_PARTLY = Test("vs_clean", ">=", "partly", "planted score / clean")

L3 = Claim("L3", PAPER, "Planting (i): a token that attends only to itself becomes a sink", _PLANT, _plant("isolate"),
           holds=_PLANT_HOLDS, partly=_PLANT_PARTLY, describe=_plant_text)
def _l4(n, th):
    ev = _plant("amplify")(n, th)
    grid = pd.DataFrame(n["planting_summary"].get("lambda_grid", []), columns=["factor", "mode", "score", "vs_clean"])
    dev, norm = grid[grid["mode"] == "deviation"], grid[grid["mode"] == "norm"]
    rho = float(dev["factor"].rank().corr(dev["score"].rank())) if len(dev) > 1 else float("nan")  # Spearman: Pearson of ranks
    at = th["factor"]
    d, c = dev.loc[dev["factor"] == at, "score"], norm.loc[norm["factor"] == at, "score"]
    ratio = float(d.iloc[0] / c.iloc[0]) if len(d) and len(c) and c.iloc[0] > 0 else float("nan")
    return ev | {"rho": rho, "dev_over_norm": ratio, "factor": at, "grid": ", ".join(f"{f:g}" for f in dev["factor"])}


def _l4_text(e) -> str:
    return (_plant_text(e) + f"; over λ ∈ {{{e['grid']}}}: Spearman ρ(λ, deviation score) = {e['rho']:.2f}, "
            f"deviation / plain-scaling score at λ = {e['factor']:g}: {e['dev_over_norm']:.1f} ×")


L4 = Claim("L4", PAPER, "Planting (ii): amplifying a token's variance makes it a sink",
           {"factor": recipes.DEFAULT_AMPLIFY_FACTOR, "rho": 0.0, "over_norm": 2.0, "partly": 2.0}, _l4,
           holds=AllOf((Test("rho", ">", "rho", "Spearman ρ(λ, planted score) over the λ grid"),
                        Test("dev_over_norm", ">=", "over_norm", "deviation / plain-scaling planted score at λ = {factor}"))),
           partly=Test("vs_clean", ">=", "partly", "deviation planted score at λ = {factor} / clean"),
           describe=_l4_text,
           rule_note="proposed in commit a57c135 (2026-11-30), after smollm2-135m's numbers had been seen (issue 11 §1)")

_ABSTRACT = "only the abstract and two notes on the paper could be read; no code is public"
L1, L2, L3, L4 = (replace(c, method=m) for c, m in zip((L1, L2, L3, L4), (
    Method("a batch of fully random token sequences; per position, the per-dimension variance of the value-aggregation output "
           "across the batch; position 0 largest, decaying with position; W_O roughly keeps the ordering (Kendall tau about 0.32)",
           "circuits.analyses.batch_variance on Settings.variance_n random-token sequences (no BOS, no special ids): per layer "
           "and position the per-dimension variance across the batch of hook_z, averaged; position 0 over the median of the "
           "others; the within-vector statistic (variance over one vector's dimensions) is kept as its own table",
           ("the ratio threshold and the 'first third of layers' partly rule are the toolkit's", _ABSTRACT)),
    Method("a few W_gate / W_up columns with very large norms fire on the first token only; their sparse, heavy-tailed W_down row "
           "writes a few residual dimensions; defined from the weights, confirmed by activations",
           "activation-based: channels whose |first-token activation| is >= min_ratio x the layer's median, and whether their "
           "largest output is a first-token massive dimension",
           ("the verdict is activation-based; the weight-based definition (circuits.analyses.weight_super_neurons, norm ratio "
            ">= 5, the toolkit's threshold) and its cross-check are shown beside it, not in the rule", _ABSTRACT)),
    Method("token k = 10 may attend only to itself, like the first token, and becomes a sink; the layers are not stated",
           "interventions.recipes.plant_sink(method='isolate') at Settings.plant_position in layers 0-2, scored over the "
           "layers after the edit, against the same edit at a random other position",
           ("the layers (0-2) are the toolkit's choice",
            "the layers after the edit are scored (the sink score is the toolkit's: mean attention from later queries)",
            _ABSTRACT)),
    Method("o'_k = mu + lambda (o_k - mu) on the attention (value-aggregation) output of token k = 10; the sink score at k rises "
           "with lambda; control: plain scaling lambda o_k does not plant a sink",
           "amplify-variance:site=attn_out,layers=0-2 (after W_O, before the residual add; mu the mean over the sequence's real "
           "positions) at Settings.plant_position over Settings.amplify_factors; the verdict reads lambda = 8 with the random "
           "and plain-scaling (mode=norm) controls",
           ("per-head output (site=z) and mu over dimensions are options; whether the paper acts before or after W_O, and what "
            "mu averages over, is not stated", "the layers (0-2) are the toolkit's choice",
            "the paper's claim is qualitative; the rule's numbers (rho > 0, 2 x plain scaling at lambda = 8) are the "
            "toolkit's", _ABSTRACT)),
)))

CLAIMS: tuple[Claim, ...] = (L1, L2, L3, L4)


# ------------------------------------------------------------------------------ measurement


def _summary(table: pd.DataFrame, condition: str) -> dict:
    out = recipes.summarize_plant(table)
    keep = ("clean", "primary", "control", "did", "did_ci_low", "control_own", "vs_clean", "vs_primary")
    return {"condition": condition, "layers": anatomy.layer_ranges(out["layers"], "none"), "score": out["intervened"],
            **{k: out.get(k, float("nan")) for k in keep}, "sink_layers": anatomy.layer_ranges(out["sink_layers"] or [], "none")}


def planting(model, s: Settings) -> tuple[pd.DataFrame, dict]:
    """Both planting interventions and the plain-scaling control (see the module docstring): a
    tidy ``(condition, layer, score)`` table of the planted position's sink score, and a summary
    per run."""
    batch = tokenize(model, probe_texts(s.plant_n), max_tokens=s.plant_tokens)
    p, lam = s.plant_position, recipes.DEFAULT_AMPLIFY_FACTOR
    factors = sorted({*s.amplify_factors, lam})
    iso = recipes.plant_sink(model, batch, p, method="isolate", control="random", batch_size=8)
    amps = {f: recipes.plant_sink(model, batch, p, method="amplify", strength=f, control="random" if f == lam else None, batch_size=8)
            for f in factors}
    plains = {f: recipes.plant_sink(model, batch, p, method="amplify", strength=f, amplify={"mode": "norm"}, control=None, batch_size=8)
              for f in factors}
    plain = plains[lam]
    edited = anatomy.layer_ranges(recipes.DEFAULT_ISOLATE_LAYERS)
    curves = {
        "clean: planted position": iso["clean"], "clean: primary sink (position 0)": iso["primary"],
        "isolate: planted position": iso["intervened"], f"isolate, random control: position {p}": iso["control"],
        "isolate, random control: its own position": iso["control_own"],
        **{f"amplify deviation ×{f:g}: planted position": amps[f]["intervened"] for f in factors},
        f"plain scaling ×{lam:g}: planted position": plain["intervened"],
    }
    rows = pd.DataFrame([dict(condition=c, layer=l, score=float(v)) for c, arr in curves.items() for l, v in enumerate(arr)])
    summary = {
        "isolate": {**_summary(iso, f"isolate (layers {edited})"), "edited_layers": edited},
        "amplify": {**_summary(amps[lam], f"amplify deviation ×{lam:g} (layers {edited}, attention output)"), "edited_layers": edited,
                    "factor": lam},
        "plain_scaling": {**_summary(plain, f"plain scaling ×{lam:g} (layers {edited}, attention output)"), "edited_layers": edited},
        "amplify_by_factor": {f"{f:g}": recipes.summarize_plant(amps[f])["vs_clean"] for f in factors},
        "lambda_grid": [dict(factor=f, mode=mode, score=(row := recipes.summarize_plant(run[f]))["intervened"], vs_clean=row["vs_clean"])
                        for mode, run in (("deviation", amps), ("norm", plains)) for f in factors],
    }
    return rows, summary


def measure(model, obs: LongInputs, s: Settings) -> Measured:
    """Every number L1-L4 read: the variance of attention outputs, the super neurons and massive
    dimensions (from the long-input pass ``obs``), and both plantings (their own runs)."""
    meas = obs.sinks
    var = analyses.variance_by_position(obs.attn)
    sn = analyses.super_neurons(obs.super_neurons, model, min_ratio=L2.thresholds["min_ratio"])
    massive = anatomy.massive_dimensions(meas)
    t0 = time.perf_counter()
    bvar = analyses.batch_variance_table(analyses.batch_variance(model, s.variance_n, s.variance_tokens, batch_size=8))
    dom = analyses.DomRatioMeter(model, "ln1")
    analyses.observe(model, tokenize(model, probe_texts(s.plant_n), max_tokens=s.plant_tokens), [dom], batch_size=8)
    dom_table = analyses.dom_ratio_table(dom.result())
    try:
        wsn = analyses.weight_super_neurons(analyses.weight_neurons(model), min_ratio=5.0)
        cross = analyses.cross_check_super_neurons(wsn, sn)
    except MeterError:  # not a gated MLP: no W_gate / W_up to read
        wsn, cross = pd.DataFrame(), None
    timings = {"li_quantities": time.perf_counter() - t0}
    t0 = time.perf_counter()
    plant, summary = planting(model, s)
    timings["li_planting"] = time.perf_counter() - t0
    numbers = {
        "variance": var.to_dict(orient="records"), "super_neurons": sn.to_dict(orient="records"),
        "massive_dimensions": massive.to_dict(orient="records"), "d_mlp": int(model.cfg.d_mlp),
        "planting": plant.to_dict(orient="records"), "planting_summary": summary, "plant_position": s.plant_position,
        "batch_variance": bvar.to_dict(orient="records"), "dom_ratio": dom_table.to_dict(orient="records"),
        "weight_super_neurons": wsn.to_dict(orient="records"), "super_neuron_cross_check": cross,
    }
    first = first_token_dims(numbers["massive_dimensions"], L2.thresholds["first_token_share"])
    return Measured(numbers, {"variance": var, "super_neurons": sn, "massive": massive, "first_token_dims": first, "planting": plant,
                              "batch_variance": bvar, "dom_ratio": dom_table, "weight_super_neurons": wsn}, timings)



# ------------------------------------------------------------------------------ figures


def _lambda(n: dict, model: str):
    grid = n["planting_summary"].get("lambda_grid")
    if not grid:  # not kept by the earliest reports
        return None
    return paper_plots.lambda_curve(pd.DataFrame(grid), title=f"{model}: planted score at position {n['plant_position']} vs λ")


#: the report's figures of this paper, in the order of its section (:mod:`sinkscope.reproduce.figures`); all redrawable
FIGURES = {f.name: f for f in (
    PaperFigure("li_variance", "Variance of head outputs and norm of the attention output per layer",
                lambda n, model: paper_plots.variance_by_layer(pd.DataFrame(n["variance"]),
                                                               title=f"{model}: attention outputs, first token vs the rest")),
    PaperFigure("li_super_neurons", "Strongest super neurons, labelled by the residual dimension they write most",
                lambda n, model: paper_plots.super_neuron_plot(
                    pd.DataFrame(n["super_neurons"]), first_token_dims(n["massive_dimensions"], L2.thresholds["first_token_share"]),
                    title=f"{model}: super neurons (down-projection inputs)")),
    PaperFigure("li_planting", "Sink score by layer of the planted position under each intervention, with controls",
                lambda n, model: paper_plots.planting_plot(pd.DataFrame(n["planting"]),
                                                           title=f"{model}: sink score of the planted position {n['plant_position']}")),
    PaperFigure("li_lambda", "Sink score of the planted position against λ: deviation amplification and plain scaling (Li et al.'s control)",
                _lambda),
)}


# ------------------------------------------------------------------------------ report section


def section(res: Measured, model, obs: LongInputs, s: Settings, figure: Figure) -> str:
    """Li et al.'s section: variance discrepancy, super neurons and planting."""
    f, name, saved, fig = res.frames, obs.sinks.model, as_saved(res.numbers), FIGURES
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
        figure(fig["li_variance"], saved, name),
        md_table(f["variance"][["layer", "z_var_first", "z_var_rest", "z_var_ratio", "out_norm_first", "out_norm_rest", "out_norm_ratio"]]),
        "",
        "Massive residual dimensions (Sun et al.: |value| ≥ 100 and ≥ 1000 × median):", "",
        md_table(massive.head(8)) if len(massive) else "(none)", "",
        figure(fig["li_super_neurons"], saved, name),
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
        figure(fig["li_planting"], saved, name),
        md_table(pd.DataFrame([summary[c] for c in ("isolate", "amplify", "plain_scaling")])), "",
        "Deviation amplification, planted score over clean by λ: "
        + ", ".join(f"×{k}: {v:.2f}" for k, v in summary["amplify_by_factor"].items()) + ".",
        "",
        figure(fig["li_lambda"], saved, name),
        md_table(pd.DataFrame(summary["lambda_grid"])), "",
    ]
    return "\n".join(lines)


__all__ = ["CLAIMS", "FIGURES", "L1", "L2", "L3", "L4", "first_token_dims", "measure", "planting", "section"]
