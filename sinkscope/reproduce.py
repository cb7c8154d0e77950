"""``sinkscope reproduce``: every paper analysis on one model, one self-contained report.

What it writes into the output folder: ``report.md`` (Markdown, figures inline), one PNG per
figure, and ``numbers.json`` with every number the report shows. Each paper claim gets a
one-line verdict — *holds*, *partly holds* or *does not hold* — computed here from numbers
measured in the same run by the explicit rules below (no verdict is written by hand).

Inputs (``size="full"``; ``"ci"`` shrinks every count and length so the notebooks and tests
run in a minute or two):

* Wong et al. and the observational parts of Li and Gu: the 6 built-in reasoning traces
  (:func:`circuits.probes.reasoning_texts`), truncated to 1,024 tokens (Wong et al. found
  secondary sinks mostly in long traces), one forward pass each with every meter of
  :mod:`circuits.analyses` attached.
* Interventions that need many runs (planting, key bias) use the built-in probe passages
  (:func:`circuits.probes.probe_texts`), shorter; Gu's Sink_1^eps uses his standard setting,
  100 passages × 64 tokens.
* The BOS policy is each model's native one (SmolLM2: none; Gemma 3: BOS prepended), and
  recorded. Positions are 0-based: the papers' Sink_1 is position 0.

Verdict rules (thresholds are the toolkit's, chosen before looking at any model, and stored in
``numbers.json`` under ``rules``):

Wong et al. "attended" secondary sinks are the tokens the hidden-state rule classes as
secondary (:func:`circuits.anatomy.secondary_sinks`, classes scaled to depth) that also
receive at least ``min_score_ratio`` (5) times the median attention of the sequence's other
tokens at their peak layer — the pairing science.md asks for on models (Gemma 3) where the
rule alone flags ordinary frequent tokens.

* W1 secondary sinks exist in long inputs: holds if there are at least as many attended
  secondary sinks as sequences; partly if at least one; else does not hold.
* W2 the primary sink weakens in the middle layers where secondary sinks appear: the *live*
  layers are those where at least half the peak number of attended secondary sinks are
  flagged. r = mean primary-sink score in live layers / mean in the other layers. Holds if
  r <= 0.5 and the live layers' centre lies in the middle two thirds of the depth; partly if
  r <= 0.8; else does not hold (also when there are no secondary sinks).
* W3 an MLP writes the sink: the median |cos| between the MLP output written at the creation
  layer and the primary-sink direction h_0 of that layer. Holds if >= 0.9, partly if >= 0.5.
* W4 the MLP output norm sets the score and the lifetime: Spearman rho of that norm against
  the peak sink score and against the lifetime. Holds if both rho >= 0.5 with p < 0.05;
  partly if one of them; else does not hold.
* W5 norm rescaling (Wong et al.'s intervention: multiply the norm of MLP outputs with
  cos >= 0.98 to h_0, first token excluded, at every layer by a factor f): the attended
  secondary sinks' sink score at their clean peak layer, relative to clean. Holds if the
  score at f = 0 is <= 0.5 of clean and Spearman(f, score) >= 0.9; partly if either; else not.
* W6 sink levels (clusters in creation layer × lifetime): the number of creation layers that
  hold >= 10 % of the attended secondary sinks. Holds if >= 3 (as in the paper's 3-6),
  partly if 2, else does not hold.

Li et al.

* L1 variance discrepancy: the ratio of the first token's head-output (``hook_z``) variance to
  the median other token's, per layer. Holds if its median over layers is >= 2; partly if it
  is >= 2 in at least one of the first third of the layers (where a sink must originate);
  else does not hold.
* L2 super neurons: channels of the down-projection input with |first-token activation| >=
  100 × the layer's median |activation| in >= half the sequences (see
  :func:`circuits.analyses.super_neurons`). Holds if one of them writes a massive residual
  dimension (Sun et al.'s rule, mostly at position 0) as its largest output and super neurons
  are sparse (<= 1 % of channels in every layer); partly if super neurons exist; else not.
* L3/L4 planting (i) isolation: the planted position attends only to itself in every layer;
  (ii) variance amplification by the largest factor, at the layer where the first token's norm
  jumps most. Measured: the planted position's sink score averaged over the layers after the
  edit, against the same position in the clean run. Holds if it is >= 5 × clean and >= half
  the clean primary sink's score over the same layers; partly if >= 2 × clean; else not.

Gu et al.

* G1 a strong first-token sink: Sink_1^0.3 (100 × 64 tokens). Holds if >= 50 %, partly if
  >= 20 % (the paper's 60M model reaches 18 %, 7-8B models 77-99 %), else does not hold.
* G2 small value norm at the sink: the median, over the layers where the primary sink holds
  (on the long inputs), of the first token's value norm / the median other token's. Holds if
  <= 0.5, partly if <= 0.8, else does not hold.
* G3 key bias: KL(clean ‖ intervened) of zeroing the sink's values (all layers) against
  removing its attention with renormalisation (all layers). Holds if KL(drop) >= 10 ×
  KL(zero) and KL(zero) <= 0.1 nats; partly if KL(drop) >= 2 × KL(zero); else not.

Time and memory: wall time per section and the process's peak resident memory
(``resource.getrusage``, model loading included) are written to the report.
"""

from __future__ import annotations

import gc
import json
import os
import resource
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd
import torch

from circuits import analyses, anatomy, paper_plots, plots
from interventions.effect import output_change
from circuits.measure import SinkMeter, nanmean, provenance
from circuits.probes import probe_texts, reasoning_texts, tokenize
from circuits.output import to_jsonable, write_json

Size = Literal["full", "ci"]
HOLDS, PARTLY, FAILS = "holds", "partly holds", "does not hold"


@dataclass(frozen=True)
class Settings:
    """Every size knob of a reproduction run (stored in ``numbers.json``)."""

    n_traces: int = 6
    max_tokens: int = 1024
    batch_size: int = 1
    min_score_ratio: float = 5.0
    dose_traces: int = 2
    dose_factors: tuple[float, ...] = (0.0, 0.25, 0.5, 1.0, 2.0, 4.0)
    dose_min_cos: float = 0.98
    plant_n: int = 16
    plant_tokens: int = 64
    plant_position: int = 32
    amplify_factors: tuple[float, ...] = (2.0, 4.0, 8.0, 16.0)
    eps_n: int = 100
    eps_tokens: int = 64
    eps_grid: tuple[float, ...] = (0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
    keybias_n: int = 16
    keybias_tokens: int = 128
    keybias_control: int = 64
    other_models: bool = True  # Gu: also measure every other model available offline


SIZES: dict[str, Settings] = {
    "full": Settings(),
    "ci": Settings(
        n_traces=2, max_tokens=192, batch_size=2, dose_traces=1, dose_factors=(0.0, 1.0, 4.0), plant_n=4, plant_tokens=48,
        plant_position=24, amplify_factors=(4.0, 16.0), eps_n=8, keybias_n=4, keybias_tokens=64, keybias_control=32,
        other_models=False,
    ),
}

RULES = {
    "W2_live_share": 0.5, "W2_holds_r": 0.5, "W2_partly_r": 0.8, "W3_holds": 0.9, "W3_partly": 0.5,
    "W4_rho": 0.5, "W4_p": 0.05, "W5_zero": 0.5, "W5_rho": 0.9, "W6_share": 0.1, "L1_ratio": 2.0, "L2_ratio": 100.0,
    "L2_sparsity": 0.01, "plant_holds": 5.0, "plant_partly": 2.0, "plant_vs_primary": 0.5, "G1_holds": 50.0,
    "G1_partly": 20.0, "G2_holds": 0.5, "G2_partly": 0.8, "G3_factor": 10.0, "G3_partly": 2.0, "G3_zero_kl": 0.1,
}


@dataclass
class Claim:
    paper: str
    claim: str
    verdict: str
    evidence: str
    rule: str


@dataclass
class Report:
    """What a run accumulates: numbers, claims, figures and Markdown sections."""

    folder: Path
    numbers: dict = field(default_factory=dict)
    claims: list[Claim] = field(default_factory=list)
    sections: list[str] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)

    def figure(self, fig, name: str, caption: str) -> str:
        plots.save(fig, self.folder / f"{name}.png")
        return f"![{caption}]({name}.png)\n\n*{caption}*\n"

    def claim(self, paper, claim, verdict, evidence, rule) -> None:
        self.claims.append(Claim(paper, claim, verdict, evidence, rule))


def _verdict(holds: bool, partly: bool) -> str:
    return HOLDS if holds else PARTLY if partly else FAILS


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


def _ranges(layers) -> str:
    from sinkscope.jobs import _ranges as r

    return r([int(x) for x in layers]) or "none"


def cpu_seconds() -> float:
    """User + system CPU time of this process so far (on a shared machine wall time overstates the cost)."""
    use = resource.getrusage(resource.RUSAGE_SELF)
    return use.ru_utime + use.ru_stime


def peak_memory_mb() -> float:
    """Peak resident memory of this process so far (Linux reports KiB, macOS bytes)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 1024 if sys.platform != "darwin" else peak / 2**20


# ------------------------------------------------------------------------------ main pass


def main_pass(model, s: Settings, progress: bool = False):
    """The long-input observation: SinkMeter and every analysis meter in one pass per trace."""
    batch = tokenize(model, reasoning_texts(s.n_traces), max_tokens=s.max_tokens)
    meters = {
        "sinks": SinkMeter(model), "mlp": analyses.MLPSiteMeter(model), "attn": analyses.AttnOutMeter(model),
        "super": analyses.SuperNeuronMeter(model), "kv": analyses.KVMeter(model),
    }
    analyses.observe(model, batch, list(meters.values()), batch_size=s.batch_size, progress=progress)
    meas = meters["sinks"].result(metadata={**provenance(model, batch), "max_tokens": s.max_tokens})
    return batch, meas, {k: m.result() for k, m in meters.items() if k != "sinks"}


def attended_secondary(meas, min_score_ratio: float) -> tuple[pd.DataFrame, pd.DataFrame, anatomy.SecondaryThresholds]:
    """(all hidden-state candidates, the secondary-class ones receiving outsized attention, thresholds)."""
    th = anatomy.SecondaryThresholds.for_depth(meas.n_layers)
    table = anatomy.secondary_sinks(meas, th)
    attended = table[(table["kind"] == "secondary") & (table["score_ratio"] >= min_score_ratio)].reset_index(drop=True)
    attended.attrs.update(min_lifetime=th.min_lifetime, primary_from=meas.n_layers - th.primary_margin)
    return table, attended, th


def sliding_layers(model) -> tuple[list[int], int | None]:
    """Layers with sliding-window attention and the window (Gemma 3: 5 of every 6 layers, 512)."""
    config = getattr(getattr(model, "original_model", None), "config", None)
    window = getattr(config, "sliding_window", None)
    types = getattr(config, "layer_types", None) or []
    return [i for i, t in enumerate(types) if t == "sliding_attention"], window


def live_per_layer(meas, table: pd.DataFrame, cos: float) -> np.ndarray:
    """How many of ``table``'s tokens are flagged (|cos(h_t, h_0)| > cos) at each layer."""
    live = np.zeros(meas.n_layers, dtype=int)
    for s_, p in zip(table["sequence"], table["position"]):
        live += (np.abs(meas.cos_to_first[int(s_), :, int(p)]) > cos).astype(int)
    return live


# ------------------------------------------------------------------------------ Wong et al.


def wong(model, rep: Report, s: Settings, batch, meas, stats, progress=False) -> None:
    n_layers = meas.n_layers
    table, att, th = attended_secondary(meas, s.min_score_ratio)
    primary = anatomy.primary_sink_layers(meas)
    live = live_per_layer(meas, att, th.cos)
    layers = primary[["layer", "primary_sink_score"]].assign(live_secondary=live)
    lines = [
        "## Wong et al.: secondary attention sinks",
        "",
        f"{meas.n_sequences} reasoning traces, {int(meas.lengths.min())}-{int(meas.lengths.max())} tokens each, BOS prepended: "
        f"**{meas.prepend_bos}**. Hidden-state rule |cos(h_t, h_0)| > {th.cos}; classes scaled to {n_layers} layers "
        f"(secondary when {th.min_lifetime} < lifetime < {n_layers - th.primary_margin}). The rule flags "
        f"**{len(table)}** tokens ({int((table['kind'] == 'secondary').sum())} secondary-class, "
        f"{int((table['kind'] == 'primary-like').sum())} primary-like); **{len(att)}** secondary-class tokens also receive "
        f"≥ {s.min_score_ratio:g} × the median token's attention at their peak layer (*attended secondary sinks*, used below).",
        "",
    ]
    local, window = sliding_layers(model)
    if local and window and int(meas.lengths.max()) > window:
        lines += [
            f"Note: layers {_ranges(local)} use sliding-window attention over {window} tokens, so on these "
            f"{int(meas.lengths.max())}-token inputs queries beyond position {window - 1} cannot see position 0 there; "
            "the first token's sink score in those layers is lowered by construction, not only by the model's choice.",
            "",
        ]
    # W1
    n_att = len(att)
    rep.claim("Wong", "Secondary sinks exist in long inputs", _verdict(n_att >= meas.n_sequences, n_att >= 1),
              f"{n_att} attended secondary sinks in {meas.n_sequences} sequences ({len(table)} hidden-state candidates)",
              "holds: ≥ 1 per sequence; partly: ≥ 1")
    if n_att:
        top = att.groupby("token").agg(count=("token", "size"), creation_layer=("start_layer", "median"), lifetime=("lifetime", "median"),
                                       peak_score=("peak_score", "median"), score_ratio=("score_ratio", "median"))
        top = top.sort_values("count", ascending=False).head(10).reset_index()
        top["token"] = [f"`{plots.token_label(t, 16)}`" for t in top["token"]]
        lines += ["Most frequent attended secondary sinks (medians):", "", md_table(top), ""]
    # heat map of the trace with the most attended secondary sinks
    seq = int(att["sequence"].value_counts().idxmax()) if n_att else 0
    lines.append(rep.figure(paper_plots.long_heatmap(meas, seq), "wong_heatmap",
                            f"Sink score (layer × position) of trace {seq}, {int(meas.lengths[seq])} tokens: whole (log scale) and first positions"))
    # W2
    peak = live.max() if len(live) else 0
    live_layers = np.flatnonzero(live >= max(1, RULES["W2_live_share"] * peak)) if peak else np.array([], int)
    score = primary["primary_sink_score"].to_numpy()
    other = np.setdiff1d(np.arange(n_layers), live_layers)
    r = float(np.mean(score[live_layers]) / np.mean(score[other])) if len(live_layers) and len(other) else float("nan")
    centre = float(np.mean(live_layers)) if len(live_layers) else float("nan")
    middle = n_layers / 6 <= centre <= 5 * n_layers / 6 if len(live_layers) else False
    rep.claim("Wong", "The primary sink weakens in the middle layers where secondary sinks appear",
              _verdict(np.isfinite(r) and r <= RULES["W2_holds_r"] and middle, np.isfinite(r) and r <= RULES["W2_partly_r"]),
              f"primary-sink score {np.mean(score[live_layers]) if len(live_layers) else float('nan'):.3f} in the live layers "
              f"{_ranges(live_layers)} vs {np.mean(score[other]):.3f} elsewhere (ratio {r:.2f}); centre of live layers {centre:.1f} of {n_layers}",
              "holds: ratio ≤ 0.5 and live layers centred in the middle two thirds; partly: ratio ≤ 0.8")
    lines.append(rep.figure(paper_plots.primary_vs_secondary(layers, title=f"{meas.model}: primary sink and live secondary sinks per layer"),
                            "wong_primary_per_layer", "Primary-sink score per layer (line) and attended secondary sinks alive per layer (bars)"))
    lines += [md_table(layers.assign(holds_sink=primary["holds_sink"])), ""]
    # W6 sink levels
    if n_att:
        shares = att["start_layer"].value_counts(normalize=True).sort_index()
        levels = [int(l) for l, v in shares.items() if v >= RULES["W6_share"]]
    else:
        shares, levels = pd.Series(dtype=float), []
    rep.claim("Wong", "Secondary sinks form levels (clusters in creation layer × lifetime)",
              _verdict(len(levels) >= 3, len(levels) == 2),
              f"{len(levels)} creation layers hold ≥ 10 % of attended secondary sinks: {levels}",
              "holds: ≥ 3 levels; partly: 2")
    lines.append(rep.figure(plots.secondary_sinks_plot(att, n_layers, title=f"{meas.model}: attended secondary sinks, creation layer × lifetime (n={n_att})"),
                            "wong_sink_levels", "Sink levels: attended secondary sinks counted over (creation layer, lifetime)"))
    # W3 MLP sub-outputs
    sites: analyses.MLPSites = stats["mlp"]
    joined = analyses.creation_layer_mlp(att, sites)
    base = analyses.site_baseline(sites, att)
    med_abs = {site: float(np.nanmedian(np.abs(joined[f"cos_{site}"]))) if n_att else float("nan") for site in sites.sites}
    sink_cos = float(np.nanmedian(np.abs(joined["cos_sink"]))) if n_att else float("nan")
    rep.claim("Wong", "A middle-layer MLP writes the secondary sink along the primary-sink direction",
              _verdict(sink_cos >= RULES["W3_holds"], sink_cos >= RULES["W3_partly"]),
              f"median |cos(MLP output, h_0)| at the creation layer = {sink_cos:.3f} (n={n_att}); per site: "
              + ", ".join(f"{k} {v:.2f}" for k, v in med_abs.items()),
              "holds: ≥ 0.9; partly: ≥ 0.5")
    lines.append(rep.figure(paper_plots.mlp_site_cosines(joined, sites.sites, base, title=f"{meas.model}: MLP sub-outputs at the creation layer (n={n_att})"),
                            "wong_mlp_sites", "|cos| of each MLP sub-output with the first token's at the creation layer"))
    site_frame = pd.DataFrame({"site": list(sites.sites), "median_abs_cos_secondary": [med_abs[k] for k in sites.sites],
                               "median_cos_ordinary_tokens": [base[k] for k in sites.sites]})
    lines += [md_table(site_frame), "", f"Median |cos(written MLP output, h_0)| at the creation layer: **{sink_cos:.3f}**.", ""]
    # W4 norm vs score and lifetime
    c_score = analyses.correlations(joined["written_norm"], joined["peak_score"]) if n_att else analyses.correlations([], [])
    c_life = analyses.correlations(joined["written_norm"], joined["lifetime"]) if n_att else analyses.correlations([], [])
    ok = [c["spearman"] >= RULES["W4_rho"] and c["spearman_p"] < RULES["W4_p"] for c in (c_score, c_life)]
    rep.claim("Wong", "The L2 norm of the aligning MLP output sets the sink score and the lifetime",
              _verdict(all(ok), any(ok)),
              f"Spearman ρ(norm, score) = {c_score['spearman']:.2f} (p={c_score['spearman_p']:.1g}), "
              f"ρ(norm, lifetime) = {c_life['spearman']:.2f} (p={c_life['spearman_p']:.1g}), n={c_score['n']}",
              "holds: both ρ ≥ 0.5 with p < 0.05; partly: one")
    lines.append(rep.figure(paper_plots.norm_scatter(joined, c_score, c_life, title=f"{meas.model}: MLP output norm against sink score and lifetime"),
                            "wong_norm_scatter", "L2 norm of the MLP output at the creation layer against peak sink score and lifetime"))
    # W5 dose response
    t0 = time.perf_counter()
    dose = dose_response(model, s, batch, meas, att, th.cos, progress)
    rep.timings["wong_dose_response"] = time.perf_counter() - t0
    if dose is not None and len(dose):
        zero = dose.loc[dose["factor"] == 0, "score_ratio"]
        rho = analyses.correlations(dose["factor"], dose["score_ratio"])["spearman"]
        z = float(zero.iloc[0]) if len(zero) else float("nan")
        dosed = joined[joined["sequence"] < s.dose_traces]  # how many creation-layer outputs the cos gate selects at all
        gated = float((dosed["cos_sink"] >= s.dose_min_cos).mean()) if len(dosed) else float("nan")
        rep.claim("Wong", "Rescaling the aligned MLP output's norm moves the sink score (dose response)",
                  _verdict(z <= RULES["W5_zero"] and rho >= RULES["W5_rho"], z <= RULES["W5_zero"] or rho >= RULES["W5_rho"]),
                  f"score at factor 0 = {z:.2f} × clean, Spearman(factor, score) = {rho:.2f} (lifetime: "
                  f"{dose['lifetime_ratio'].iloc[0]:.2f} × clean at factor {dose['factor'].iloc[0]:g}, "
                  f"{dose['lifetime_ratio'].iloc[-1]:.2f} × at {dose['factor'].iloc[-1]:g}); {gated:.0%} of the sinks' creation-layer "
                  f"outputs pass the cos ≥ {s.dose_min_cos} gate ({int(dose.attrs.get('n_sinks', 0))} sinks)",
                  "holds: score(0) ≤ 0.5 × clean and ρ ≥ 0.9; partly: either")
        lines.append(rep.figure(paper_plots.dose_response(dose, title=f"{meas.model}: norm rescaling of sink-aligned MLP outputs"),
                                "wong_dose_response", "Dose response of the norm intervention"))
        lines += [md_table(dose), ""]
    else:
        rep.claim("Wong", "Rescaling the aligned MLP output's norm moves the sink score (dose response)", FAILS,
                  "no attended secondary sink in the dose-response traces", "—")
    rep.numbers["wong"] = {
        "n_candidates": len(table), "n_attended": n_att, "attended": att.to_dict(orient="records"),
        "layers": layers.to_dict(orient="records"), "live_layers": live_layers.tolist(), "primary_ratio_live_vs_other": r,
        "levels": levels, "creation_layer_share": {int(k): float(v) for k, v in shares.items()},
        "mlp_sites_median_abs_cos": med_abs, "mlp_sites_baseline": base, "median_abs_cos_sink": sink_cos,
        "corr_norm_score": c_score, "corr_norm_lifetime": c_life,
        "dose_response": None if dose is None else dose.to_dict(orient="records"),
    }
    rep.sections.append("\n".join(lines))


def dose_response(model, s: Settings, batch, meas, att: pd.DataFrame, cos: float, progress=False) -> pd.DataFrame | None:
    """Wong et al.'s norm intervention at every layer, per factor, on the first traces."""
    from interventions.base import checked_hooks, prepare_context
    from interventions.mlp import RescaleAlongSink

    rows_idx = list(range(min(s.dose_traces, len(batch))))
    sub_att = att[att["sequence"].isin(rows_idx)]
    if sub_att.empty:
        return None
    all_layers = tuple(range(meas.n_layers))
    seq, pos, lay = (sub_att[c].to_numpy(int) for c in ("sequence", "position", "peak_layer"))
    clean_score = meas.sink_score[seq, lay, pos]
    clean_life = (np.abs(meas.cos_to_first[seq, :, pos]) > cos).sum(-1)
    out = []
    for f in s.dose_factors:
        if f == 1.0:
            score, life = clean_score, clean_life
        else:
            iv = RescaleAlongSink(layers=all_layers, scope="whole", min_cos=s.dose_min_cos, factor=f)
            meter = SinkMeter(model)
            for i in rows_idx:
                sub = batch.select([i])
                ctx = prepare_context(model, iv, sub, sink_directions={l: torch.as_tensor(meas.first_resid[[i], l]) for l in all_layers})
                analyses.observe(model, sub, [meter], hooks=checked_hooks(model, iv, ctx), batch_size=1)
            m = meter.result()
            local = {i: k for k, i in enumerate(rows_idx)}
            lseq = np.array([local[x] for x in seq])
            score = m.sink_score[lseq, lay, pos]
            life = (np.abs(m.cos_to_first[lseq, :, pos]) > cos).sum(-1)
        out.append(dict(factor=float(f), score=float(np.nanmean(score)), score_ratio=float(np.nanmean(score) / np.nanmean(clean_score)),
                        lifetime=float(np.mean(life)), lifetime_ratio=float(np.mean(life) / np.mean(clean_life))))
    frame = pd.DataFrame(out)
    frame.attrs["n_sinks"] = len(sub_att)
    return frame


# ------------------------------------------------------------------------------ Li et al.


def li(model, rep: Report, s: Settings, meas, stats, progress=False) -> None:
    n_layers = meas.n_layers
    lines = ["## Li et al.: the structural origin of the sink", ""]
    # L1 variance discrepancy
    var = analyses.variance_by_position(stats["attn"])
    ratio = var["z_var_ratio"].to_numpy()
    med = float(np.nanmedian(ratio))
    early = ratio[: max(1, n_layers // 3)]
    early_hits = [int(l) for l in np.flatnonzero(early >= RULES["L1_ratio"])]
    rep.claim("Li", "Variance discrepancy: the first token's attention output has a larger variance than the others'",
              _verdict(med >= RULES["L1_ratio"], bool(early_hits)),
              f"median over layers of var(first)/var(others) of head outputs = {med:.2f}; ≥ 2 in early layers {early_hits or 'none'} "
              f"(all layers ≥ 2: {_ranges(np.flatnonzero(ratio >= RULES['L1_ratio']))})",
              "holds: median ratio ≥ 2; partly: ≥ 2 in one of the first third of layers")
    lines += [
        "Same long inputs as above. Variance over each head's `d_head` of its aggregated value output (`hook_z`), averaged over heads; "
        "the other tokens' value is the median over positions ≥ 1.",
        "",
        rep.figure(paper_plots.variance_by_layer(var, title=f"{meas.model}: attention outputs, first token vs the rest"),
                   "li_variance", "Variance of head outputs and norm of the attention output per layer"),
        md_table(var[["layer", "z_var_first", "z_var_rest", "z_var_ratio", "out_norm_first", "out_norm_rest", "out_norm_ratio"]]),
        "",
    ]
    # L2 super neurons
    sn = analyses.super_neurons(stats["super"], model, min_ratio=RULES["L2_ratio"])
    massive = anatomy.massive_dimensions(meas)
    first_dims = set(int(d) for d in massive.loc[massive["share_at_position_0"] >= 0.5, "dim"]) if len(massive) else set()
    writers = sn[[d[0] in first_dims for d in sn["top_dims"]]] if len(sn) else sn
    per_layer = sn.groupby("layer").size() if len(sn) else pd.Series(dtype=int)
    d_mlp = int(model.cfg.d_mlp)
    sparse = bool(len(per_layer) == 0 or per_layer.max() <= RULES["L2_sparsity"] * d_mlp)
    rep.claim("Li", "Super neurons: a few FFN channels with outsized first-token activations write the massive dimensions",
              _verdict(len(writers) > 0 and sparse, len(sn) > 0),
              f"{len(sn)} super neurons (≤ {int(per_layer.max()) if len(per_layer) else 0} of {d_mlp} channels per layer); "
              f"{len(writers)} write a first-token massive dimension {sorted(first_dims) or '(none found)'} as their largest output"
              + (f", strongest: layer {writers.iloc[writers['ratio'].argmax()]['layer']} channel {writers.iloc[writers['ratio'].argmax()]['channel']} "
                 f"({writers['ratio'].max():.0f} × median)" if len(writers) else ""),
              "holds: one writes a massive dim and ≤ 1 % of channels per layer; partly: super neurons exist")
    lines += [
        "Massive residual dimensions (Sun et al.: |value| ≥ 100 and ≥ 1000 × median):", "",
        md_table(massive.head(8)) if len(massive) else "(none)", "",
        rep.figure(paper_plots.super_neuron_plot(sn, first_dims, title=f"{meas.model}: super neurons (down-projection inputs)"),
                   "li_super_neurons", "Strongest super neurons, labelled by the residual dimension they write most"),
        md_table(sn.sort_values("ratio", ascending=False).head(12)) if len(sn) else "(no super neuron)", "",
    ]
    # L3/L4 planting
    t0 = time.perf_counter()
    plant, summary = planting(model, s, progress)
    rep.timings["li_planting"] = time.perf_counter() - t0
    for name, label in (("isolate", "Planting (i): a token that attends only to itself becomes a sink"),
                        ("amplify", "Planting (ii): amplifying a token's variance makes it a sink")):
        row = summary[name]
        rep.claim("Li", label,
                  _verdict(row["vs_clean"] >= RULES["plant_holds"] and row["vs_primary"] >= RULES["plant_vs_primary"],
                           row["vs_clean"] >= RULES["plant_partly"]),
                  f"{row['condition']}: sink score of position {s.plant_position} over layers {row['layers']} = {row['score']:.3f} "
                  f"vs {row['clean']:.3f} clean ({row['vs_clean']:.1f} ×) and {row['primary']:.3f} for the clean primary sink; "
                  f"other positions in the same run {row['others']:.3f}",
                  "holds: ≥ 5 × clean and ≥ 0.5 × primary; partly: ≥ 2 × clean")
    lines += [
        f"Planting on {s.plant_n} probe passages × {s.plant_tokens} tokens, planted position {s.plant_position}. "
        f"(i) `isolate:layers=all,queries={s.plant_position}`; (ii) `amplify-variance` at layer {summary['amplify']['edit_layer']} "
        f"(largest jump of the first token's norm), factors {list(s.amplify_factors)}. Controls: the same position in the clean run, "
        f"and the other positions ≥ 1 of the intervened run.",
        "",
        rep.figure(paper_plots.planting_plot(plant, title=f"{meas.model}: sink score of the planted position {s.plant_position}"),
                   "li_planting", "Sink score by layer of the planted position under each intervention, with controls"),
        md_table(pd.DataFrame([{k: v for k, v in summary[c].items() if k != "layers"} for c in ("isolate", "amplify")])), "",
        "Amplification, planted score over clean by factor: "
        + ", ".join(f"×{f}: {v:.2f}" for f, v in summary["amplify_by_factor"].items()) + ".",
        "",
    ]
    rep.numbers["li"] = {
        "variance": var.to_dict(orient="records"), "super_neurons": sn.to_dict(orient="records"),
        "massive_dimensions": massive.to_dict(orient="records"), "planting": plant.to_dict(orient="records"), "planting_summary": summary,
    }
    rep.sections.append("\n".join(lines))


def planting(model, s: Settings, progress=False) -> tuple[pd.DataFrame, dict]:
    """Both of Li et al.'s planting interventions, with clean and same-run controls."""
    from interventions.attention import IsolateAggregation
    from interventions.residual import AmplifyVariance

    batch = tokenize(model, probe_texts(s.plant_n), max_tokens=s.plant_tokens)
    p = s.plant_position
    n_layers = int(model.cfg.n_layers)

    def run(iv=None):
        meter = SinkMeter(model)
        analyses.observe(model, batch, [meter], hooks=iv.hooks_for(model, batch) if iv else (), batch_size=8, progress=progress)
        return meter.result()

    clean = run()
    jump = int(np.argmax(np.diff(nanmean(clean.resid_norm[:, :, 0], axis=0))))  # block whose output makes ||h_0|| jump most
    prof = lambda m, q: nanmean(m.sink_score[:, :, q], axis=0)  # noqa: E731
    others = lambda m: nanmean(nanmean(np.delete(m.sink_score, [0, p], axis=2)[:, :, 1:], axis=2), axis=0)  # noqa: E731
    rows = []

    def add(cond, arr):
        rows.extend(dict(condition=cond, layer=l, score=float(v)) for l, v in enumerate(arr))

    add("clean: planted position", prof(clean, p))
    add("clean: primary sink (position 0)", prof(clean, 0))
    iso = run(IsolateAggregation(layers=tuple(range(n_layers)), queries=(p,)))
    add("isolate: planted position", prof(iso, p))
    add("isolate: other positions", others(iso))
    amps = {}
    for f in s.amplify_factors:
        amps[f] = run(AmplifyVariance(layer=jump, positions=(p,), factor=f))
        add(f"amplify ×{f:g}: planted position", prof(amps[f], p))
    fmax = max(s.amplify_factors)
    add(f"amplify ×{fmax:g}: other positions", others(amps[fmax]))

    def summarise(cond, m, layers):
        sc, cl, pr, ot = (float(np.nanmean(a[layers])) for a in (prof(m, p), prof(clean, p), prof(clean, 0), others(m)))
        return dict(condition=cond, layers=_ranges(layers), score=sc, clean=cl, primary=pr, others=ot,
                    vs_clean=sc / cl if cl > 0 else float("inf"), vs_primary=sc / pr if pr > 0 else float("nan"))

    summary = {
        "isolate": summarise("isolate (all layers)", iso, np.arange(n_layers)),
        "amplify": {**summarise(f"amplify ×{fmax:g} at layer {jump}", amps[fmax], np.arange(jump + 1, n_layers)), "edit_layer": jump},
    }
    summary["amplify_by_factor"] = {
        f"{f:g}": summarise(f"amplify ×{f:g}", amps[f], np.arange(jump + 1, n_layers))["vs_clean"] for f in s.amplify_factors
    }
    return pd.DataFrame(rows), summary


# ------------------------------------------------------------------------------ Gu et al.


def offline_models(current: str, checkpoints: str | Path | None = None) -> list[str]:
    """Every other model loadable offline: the installed packaged models, and the pre-training
    lab's checkpoints — every Hugging Face folder (one holding a ``config.json``) under
    ``checkpoints`` (default ``$SINKSCOPE_CHECKPOINTS``), e.g. a ``sinkscope pretrain --out``
    folder with its ``final/`` and ``checkpoints/step-*/``."""
    from circuits.models import PACKAGED, list_models

    names = [r.name for r in list_models() if r.name in PACKAGED and r.installed and r.name != current]
    root = checkpoints or os.environ.get("SINKSCOPE_CHECKPOINTS")
    if root and Path(root).is_dir():
        names += sorted(str(p.parent) for p in Path(root).rglob("config.json") if str(p.parent) != current)
    return names


def sink_rates(model, s: Settings, progress=False) -> pd.DataFrame:
    """Sink_1^eps over the eps grid for one model, Gu et al.'s setting (natural text, T=64)."""
    from sinkscope.jobs import sink_rate_ci

    batch = tokenize(model, probe_texts(s.eps_n), max_tokens=s.eps_tokens)
    meter = SinkMeter(model)
    analyses.observe(model, batch, [meter], batch_size=8, progress=progress)
    meas = meter.result()
    name = getattr(model, "_sinkscope_info", {}).get("name", "?")
    rows = []
    for eps in s.eps_grid:
        v, lo, hi = sink_rate_ci(meas, eps)
        rows.append(dict(model=name, eps=eps, sink_rate=v, ci_low=lo, ci_high=hi, bos=meas.prepend_bos, n=meas.n_sequences))
    return pd.DataFrame(rows)


def gu(model, rep: Report, s: Settings, meas, stats, progress=False, checkpoints=None) -> None:
    from circuits.models import load_model
    from interventions.keybias import DropSinkAttention, ZeroSinkValue

    name = meas.model
    lines = ["## Gu et al.: when the sink emerges, and the sink as a key bias", ""]
    t0 = time.perf_counter()
    rates = [sink_rates(model, s, progress)]
    failed = []
    if s.other_models:
        for other in offline_models(name, checkpoints):
            try:
                m = load_model(other)
            except Exception as exc:  # a broken optional checkpoint must not sink the whole report
                failed.append(f"{other}: {exc}")
                continue
            rates.append(sink_rates(m, s, progress))
            del m
            gc.collect()
    rates = pd.concat(rates, ignore_index=True)
    rep.timings["gu_sink_rates"] = time.perf_counter() - t0
    own = rates[(rates["model"] == name) & np.isclose(rates["eps"], 0.3)].iloc[0]
    rep.claim("Gu", "Trained LMs put a strong sink on the first token (Sink_1^0.3)",
              _verdict(own["sink_rate"] >= RULES["G1_holds"], own["sink_rate"] >= RULES["G1_partly"]),
              f"Sink_1^0.3 = {own['sink_rate']:.1f} % (95 % CI {own['ci_low']:.1f}-{own['ci_high']:.1f}), {int(own['n'])} × {s.eps_tokens} tokens, BOS {bool(own['bos'])}",
              "holds: ≥ 50 %; partly: ≥ 20 %")
    wide = rates.pivot(index="eps", columns="model", values="sink_rate").reset_index()
    lines += [
        f"Sink_1^eps on {s.eps_n} probe passages × {s.eps_tokens} tokens, every model available offline"
        + (f" (failed to load: {'; '.join(failed)})" if failed else "") + ". Paper references at eps = 0.3: GPT-2 XL ≈ 77 %, "
        "Llama-2-7B ≈ 92 %, Llama-3-8B ≈ 99 %, Mistral-7B ≈ 97 %, the authors' 60M model ≈ 18 %.",
        "",
        rep.figure(paper_plots.sink_rate_vs_eps(rates), "gu_sink_rate_eps", "Sink_1^eps against eps for every model available offline"),
        md_table(wide), "",
    ]
    # G2 key and value norms on the long inputs
    kv = analyses.key_value_norms(stats["kv"])
    holds = anatomy.primary_sink_layers(meas)["holds_sink"].to_numpy()
    sink_layers = np.flatnonzero(holds) if holds.any() else np.arange(meas.n_layers)
    v_med = float(np.nanmedian(kv["v_ratio"].to_numpy()[sink_layers]))
    k_med = float(np.nanmedian(kv["k_ratio"].to_numpy()[sink_layers]))
    rep.claim("Gu", "The sink's value vector is small (it stores attention, not content)",
              _verdict(v_med <= RULES["G2_holds"], v_med <= RULES["G2_partly"]),
              f"value norm of the first token / median other token = {v_med:.2f} (median over sink layers {_ranges(sink_layers)}); key norm ratio {k_med:.2f}",
              "holds: ≤ 0.5; partly: ≤ 0.8")
    lines += [
        f"Key (`{stats['kv'].key_hook}`) and value (`attn.hook_v`) norms on the long inputs; ratios are the first token over the median other token.",
        "",
        rep.figure(paper_plots.kv_norms_plot(kv, title=f"{name}: key and value norms of the first token"), "gu_kv_norms",
                   "Key and value norm ratios per layer, attention received and the value's share of head outputs"),
        md_table(kv), "",
    ]
    # G3 zero value vs drop attention
    t0 = time.perf_counter()
    batch = tokenize(model, probe_texts(s.keybias_n), max_tokens=s.keybias_tokens)
    k = min(s.keybias_control, int(batch.lengths.min()) - 1)
    ivs = {
        "zero-sink-value (position 0, all layers)": ZeroSinkValue(),
        "drop-sink-attention (position 0, all layers)": DropSinkAttention(),
        f"control: zero-sink-value at position {k}": ZeroSinkValue(positions=(k,)),
        f"control: drop-sink-attention at position {k}": DropSinkAttention(keys=(k,)),
    }
    eff = output_change(model, batch, ivs, batch_size=4)
    rep.timings["gu_keybias"] = time.perf_counter() - t0
    kl = dict(zip(eff["intervention"], eff["kl"]))
    kz, kd = kl[list(ivs)[0]], kl[list(ivs)[1]]
    rep.claim("Gu", "The sink acts as a key bias: zeroing its value barely matters, removing its attention does",
              _verdict(kd >= RULES["G3_factor"] * kz and kz <= RULES["G3_zero_kl"], kd >= RULES["G3_partly"] * kz),
              f"KL(clean ‖ zero value) = {kz:.3g} nats vs KL(clean ‖ drop attention) = {kd:.3g} nats ({kd / max(kz, 1e-12):.0f} ×); "
              f"controls at position {k}: {kl[list(ivs)[2]]:.3g} / {kl[list(ivs)[3]]:.3g}",
              "holds: KL(drop) ≥ 10 × KL(zero) and KL(zero) ≤ 0.1; partly: KL(drop) ≥ 2 × KL(zero)")
    lines += [
        f"Interventions on {s.keybias_n} probe passages × {s.keybias_tokens} tokens (`interventions.keybias`): KL of the next-token "
        "distribution from the clean run's, mean over tokens.",
        "",
        rep.figure(paper_plots.keybias_effect_plot(eff, title=f"{name}: zero the sink's value vs drop its attention"), "gu_keybias",
                   "Effect on the output of zeroing the sink's value against removing its attention (renormalised)"),
        md_table(eff), "",
    ]
    rep.numbers["gu"] = {"sink_rates": rates.to_dict(orient="records"), "kv_norms": kv.to_dict(orient="records"),
                         "keybias": eff.to_dict(orient="records"), "failed_models": failed}
    rep.sections.append("\n".join(lines))


# ------------------------------------------------------------------------------ entry point


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
    from circuits.models import load_model

    if size not in SIZES:
        raise ValueError(f"size must be one of {', '.join(SIZES)}, got {size!r}")
    s = settings or SIZES[size]
    start, cpu_start = time.perf_counter(), cpu_seconds()
    folder = Path(out_folder)
    folder.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    if isinstance(model, str):
        model = load_model(model)
    rep = Report(folder)
    rep.timings["load_model"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    batch, meas, stats = main_pass(model, s, progress)
    rep.timings["main_pass"] = time.perf_counter() - t0
    for name, section in (("wong", wong), ("li", li), ("gu", gu)):
        t0 = time.perf_counter()
        if name == "wong":
            section(model, rep, s, batch, meas, stats, progress)
        elif name == "gu":
            section(model, rep, s, meas, stats, progress, checkpoints)
        else:
            section(model, rep, s, meas, stats, progress)
        rep.timings[name] = time.perf_counter() - t0
    total = time.perf_counter() - start
    cpu = cpu_seconds() - cpu_start
    peak = peak_memory_mb()
    prov = provenance(model, batch)
    doc = {
        "schema": "sinkscope.reproduce/1",
        "model": meas.model,
        "size": size,
        "settings": asdict(s),
        "rules": RULES,
        "claims": [asdict(c) for c in rep.claims],
        "timings_s": {**rep.timings, "total": total},
        "cpu_s": cpu,
        "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None,
        "peak_memory_mb": peak,
        "threads": torch.get_num_threads(),
        "provenance": prov,
        **rep.numbers,
    }
    write_json(folder / "numbers.json", doc)
    (folder / "report.md").write_text(render(doc, rep, meas), encoding="utf-8")
    return json.loads(json.dumps(to_jsonable(doc)))


def redraw(folder: str | Path) -> list[Path]:
    """Re-render, from a report's ``numbers.json``, every figure that is a pure function of its
    tables (after a change of figure style; no model is run, no number changes). The heat map,
    sink levels, MLP-site and norm-scatter figures need per-token data that ``numbers.json``
    does not keep and are left as they are."""
    folder = Path(folder)
    doc = json.loads((folder / "numbers.json").read_text(encoding="utf-8"))
    name, frame = doc["model"], pd.DataFrame
    massive = frame(doc["li"]["massive_dimensions"])
    first_dims = set(massive.loc[massive["share_at_position_0"] >= 0.5, "dim"].astype(int)) if len(massive) else set()
    figures = {
        "wong_primary_per_layer": paper_plots.primary_vs_secondary(frame(doc["wong"]["layers"]), title=f"{name}: primary sink and live secondary sinks per layer"),
        "li_variance": paper_plots.variance_by_layer(frame(doc["li"]["variance"]), title=f"{name}: attention outputs, first token vs the rest"),
        "li_super_neurons": paper_plots.super_neuron_plot(frame(doc["li"]["super_neurons"]), first_dims, title=f"{name}: super neurons (down-projection inputs)"),
        "li_planting": paper_plots.planting_plot(frame(doc["li"]["planting"]), title=f"{name}: sink score of the planted position {doc['settings']['plant_position']}"),
        "gu_sink_rate_eps": paper_plots.sink_rate_vs_eps(frame(doc["gu"]["sink_rates"])),
        "gu_kv_norms": paper_plots.kv_norms_plot(frame(doc["gu"]["kv_norms"]), title=f"{name}: key and value norms of the first token"),
        "gu_keybias": paper_plots.keybias_effect_plot(frame(doc["gu"]["keybias"]), title=f"{name}: zero the sink's value vs drop its attention"),
    }
    if doc["wong"]["dose_response"]:
        figures["wong_dose_response"] = paper_plots.dose_response(frame(doc["wong"]["dose_response"]), title=f"{name}: norm rescaling of sink-aligned MLP outputs")
    return [plots.save(fig, folder / f"{key}.png") for key, fig in figures.items()]


def claims_table(claims: list[dict]) -> str:
    lines = ["| paper | claim | verdict | measured |", "|:--|:--|:--|:--|"]
    for c in claims:
        lines.append(f"| {c['paper']} | {c['claim']} | **{c['verdict']}** | {c['evidence']} |")
    return "\n".join(lines)


def _load(doc: dict) -> str:
    la = doc.get("load_average")
    return "n/a" if not la else " / ".join(f"{x:.1f}" for x in la) + " over 1 / 5 / 15 min"


def render(doc: dict, rep: Report, meas) -> str:
    t = doc["timings_s"]
    head = [
        f"# Reproducing the attention-sink papers on {doc['model']}",
        "",
        f"`sinkscope reproduce --model {doc['model']} --size {doc['size']}`. Every number and verdict below was measured in this run "
        f"and is in `numbers.json`; verdicts follow the rules in `sinkscope/reproduce.py` (summarised in each row). "
        f"Positions are 0-based (the papers' Sink_1 is position 0); BOS prepended: **{meas.prepend_bos}** (the model's native policy).",
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
    ]
    return "\n".join(head + rep.sections)


__all__ = ["SIZES", "Settings", "reproduce", "redraw", "md_table", "claims_table", "offline_models"]
