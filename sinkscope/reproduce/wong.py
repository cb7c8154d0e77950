"""Wong et al., "On the Existence and Behaviour of Secondary Attention Sinks" (arXiv 2512.22213):
the measurements and claims W1-W6 of the reproduction.

Why this module exists. It holds what is specific to this paper: which numbers its claims
need, computed from the shared long-input pass (:func:`circuits.long_inputs.observe_long_inputs`)
and one intervention, and the claim records that judge them. The observations themselves live in
:mod:`circuits` (:func:`circuits.anatomy.attended_secondary`, :func:`circuits.anatomy.live_per_layer`,
:mod:`circuits.analyses`), the intervention protocol in :mod:`interventions.recipes`
(:func:`~interventions.recipes.secondary_sink_mlps`, :func:`~interventions.recipes.rescale_dose_response`),
the report's figures of this paper in :data:`FIGURES` (read by the report and by
:func:`~sinkscope.reproduce.report.redraw`). Its section of ``report.md`` is written here too
(:func:`section` and its paragraphs), as is the comparison of two runs at different lengths
(:func:`length_comparison`, which reads Wong et al.'s numbers only);
:mod:`~sinkscope.reproduce.report` only assembles the sections.

*Attended* secondary sinks are the tokens the hidden-state rule classes as secondary
(classes scaled to depth) that also receive at least ``Settings.min_score_ratio`` times the
median token's attention at their peak layer: the pairing science.md asks for on models
(Gemma 3) where the rule alone flags ordinary frequent tokens. Every claim below reads them.

Which sinks a verdict counts (:data:`COUNTING`, written before any report was re-run under it):
the *counted* sinks are those in the model's own generated tokens (:mod:`circuits.parts`), each
context once (:func:`circuits.anatomy.once_per_context`). The model's sessions share their chat
template and system prompt, so a sink there recurs in every session with the same activations:
one observation, and a property of the prompt, not of the model's reasoning, which is what Wong
et al. study. Sinks in the template and the problem text are reported beside the counted ones
(``numbers["by_part"]``: counts, tokens, creation layers), and the per-session counts of every
part stay as secondary numbers (``n_candidates``, ``n_attended``). On inputs without parts
(hand-written text: no template, no problem, nothing generated) every position counts, each
context once. :func:`sink_counts` computes all of this from a measurement, without a model.

Dose response (W5): each attended secondary sink of the first ``Settings.dose_traces`` traces
has its writing MLP output (the MLP at or just before its creation layer whose output at the
token aligns best with ``h_0``) rescaled by each factor, at exactly that token
(:func:`~interventions.recipes.rescale_dose_response`, ``scope="whole"``); the sink's score is
its mean sink score over its clean lifetime layers, its lifetime is re-counted in the
intervened run.
"""

from __future__ import annotations

import time
from dataclasses import replace

import numpy as np
import pandas as pd

from circuits import analyses, anatomy, paper_plots, plots
from circuits.long_inputs import LongInputs, sliding_layers
from circuits.measure import measure as measure_sinks
from circuits.model_info import model_info
from circuits.parts import FORMS, OWN, PARTS, part_column, to_spans
from circuits.probes import has_traces, model_traces, trace_batch
from interventions import recipes
from interventions.mlp import RescaleAlongSink
from sinkscope.numbers import number
from sinkscope.reproduce.claims import AllOf, AnyOf, Claim, Measured, Method, Test
from sinkscope.reproduce.figures import PaperFigure, as_saved
from sinkscope.reproduce.markdown import Figure, md_table
from sinkscope.reproduce.settings import Settings

PAPER = "Wong"

# ------------------------------------------------------------------------------ claims


def _w1(n, th):
    counted, parts = n["n_attended_counted"], n.get("by_part") or {}
    return {"attended": counted, "candidates": n["n_candidates_counted"], "sequences": n["n_sequences"],
            "attended_per_sequence": counted / n["n_sequences"], "scope": n["counting"]["scope"],
            "per_session_every_part": n["n_attended"],
            **{f"{part}_attended": parts[part]["n_attended"] for part in PARTS if part in parts and part != OWN}}


def _w1_text(e) -> str:
    where = "in the model's own tokens" if e["scope"] == OWN else "(every position: the inputs have no parts)"
    beside = [f"{part} {e[f'{part}_attended']}" for part in PARTS if f"{part}_attended" in e]
    return (f"{e['attended']} attended secondary sinks {where}, each context once, in {e['sequences']} sequences "
            f"({e['candidates']} hidden-state candidates)" + (f"; beside them: {', '.join(beside)}" if beside else "")
            + f"; per session, every part: {e['per_session_every_part']}")


W1 = Claim(
    "W1", PAPER, "Secondary sinks exist in long inputs", {},
    _w1,
    holds=Test("attended_per_sequence", ">=", 1, "counted attended secondary sinks per sequence"),
    partly=Test("attended", ">=", 1, "number of counted attended secondary sinks"),
    describe=_w1_text,
)


def live_layers(live: np.ndarray, share: float) -> np.ndarray:
    """The *live* layers: where at least ``share`` of the peak number of attended secondary sinks
    are flagged (none when no sink is flagged anywhere)."""
    peak = live.max() if len(live) else 0
    return np.flatnonzero(live >= max(1, share * peak)) if peak else np.array([], int)


def _w2(n, th):
    score = np.array([r["primary_sink_score"] for r in n["layers"]], dtype=float)
    live = np.asarray(n["live_layers"], dtype=int)
    other = np.setdiff1d(np.arange(len(score)), live)
    in_live = float(np.mean(score[live])) if len(live) else float("nan")
    elsewhere = float(np.mean(score[other])) if len(other) else float("nan")
    centre = float(np.mean(live)) if len(live) else float("nan")
    return {"primary_live": in_live, "primary_other": elsewhere, "ratio": n["primary_ratio_live_vs_other"],
            "live_layers": anatomy.layer_ranges(live, "none"), "centre": centre, "n_layers": len(score),
            "centre_depth": centre / len(score)}


_W2_RATIO = "primary-sink score in the live layers (≥ {live_share} × the peak count of live counted sinks) / elsewhere"
W2 = Claim(
    "W2", PAPER, "The primary sink weakens in the middle layers where secondary sinks appear",
    {"live_share": 0.5, "holds_ratio": 0.5, "partly_ratio": 0.8, "middle_from": 1 / 6, "middle_to": 5 / 6},
    _w2,
    holds=AllOf((Test("ratio", "<=", "holds_ratio", _W2_RATIO),
                 Test("centre_depth", ">=", "middle_from", "live layers' centre / depth"),
                 Test("centre_depth", "<=", "middle_to", "live layers' centre / depth"))),
    partly=Test("ratio", "<=", "partly_ratio", _W2_RATIO),
    describe=lambda e: f"primary-sink score {e['primary_live']:.3f} in the live layers {e['live_layers']} vs {e['primary_other']:.3f} "
    f"elsewhere (ratio {e['ratio']:.2f}); centre of live layers {e['centre']:.1f} of {e['n_layers']}",
)


def _w3(n, th):
    return {"median_abs_cos": n["median_abs_cos_sink"], "n": n["n_attended_counted"], **{f"site_{k}": v for k, v in n["mlp_sites_median_abs_cos"].items()}}


W3 = Claim(
    "W3", PAPER, "A middle-layer MLP writes the secondary sink along the primary-sink direction", {"holds": 0.9, "partly": 0.5},
    _w3,
    holds=Test("median_abs_cos", ">=", "holds", "median |cos(MLP output, h_0)| at the creation layer"),
    partly=Test("median_abs_cos", ">=", "partly", "median |cos(MLP output, h_0)| at the creation layer"),
    describe=lambda e: f"median |cos(MLP output, h_0)| at the creation layer = {e['median_abs_cos']:.3f} (n={e['n']} counted sinks); per site: "
    + ", ".join(f"{k[5:]} {v:.2f}" for k, v in e.items() if k.startswith("site_")),
)


def _w4(n, th):
    s, life = n["corr_norm_score"], n["corr_norm_lifetime"]
    return {"rho_score": s["spearman"], "p_score": s["spearman_p"], "rho_lifetime": life["spearman"], "p_lifetime": life["spearman_p"], "n": s["n"]}


def _significant(which: str, label: str) -> AllOf:
    return AllOf((Test(f"rho_{which}", ">=", "rho", f"ρ(norm, {label})"), Test(f"p_{which}", "<", "p", f"p(norm, {label})")))


W4 = Claim(
    "W4", PAPER, "The L2 norm of the aligning MLP output sets the sink score and the lifetime", {"rho": 0.5, "p": 0.05},
    _w4,
    holds=AllOf((_significant("score", "score"), _significant("lifetime", "lifetime"))),
    partly=AnyOf((_significant("score", "score"), _significant("lifetime", "lifetime"))),
    describe=lambda e: f"Spearman ρ(norm, score) = {e['rho_score']:.2f} (p={e['p_score']:.1g}), "
    f"ρ(norm, lifetime) = {e['rho_lifetime']:.2f} (p={e['p_lifetime']:.1g}), n={e['n']}",
)


def _w5(n, th):
    dose = n["dose_response"]
    if not dose:
        return {"score_at_zero": float("nan"), "rho": float("nan"), "n_sinks": 0}
    zero = [r["score_ratio"] for r in dose if r["factor"] == 0]
    return {"score_at_zero": float(zero[0]) if zero else float("nan"), "rho": n["dose_rho"]["score"]["means"],
            "lifetime_first": dose[0]["lifetime_ratio"], "factor_first": dose[0]["factor"],
            "lifetime_last": dose[-1]["lifetime_ratio"], "factor_last": dose[-1]["factor"], "n_sinks": n["dose_n_sinks"]}


def _w5_text(e) -> str:
    if not e["n_sinks"]:
        return "no counted attended secondary sink in the dose-response traces"
    return (f"score at factor 0 = {e['score_at_zero']:.2f} × clean, Spearman(factor, score) = {e['rho']:.2f} (lifetime: "
            f"{e['lifetime_first']:.2f} × clean at factor {e['factor_first']:g}, {e['lifetime_last']:.2f} × at {e['factor_last']:g}); "
            f"{e['n_sinks']} counted sinks, each rescaled at the MLP output that writes it")


W5 = Claim(
    "W5", PAPER, "Rescaling the aligned MLP output's norm moves the sink score (dose response)", {"zero": 0.5, "rho": 0.9},
    _w5,
    holds=AllOf((Test("score_at_zero", "<=", "zero", "score at factor 0 / clean"), Test("rho", ">=", "rho", "Spearman(factor, score)"))),
    partly=AnyOf((Test("score_at_zero", "<=", "zero", "score at factor 0 / clean"), Test("rho", ">=", "rho", "Spearman(factor, score)"))),
    describe=_w5_text,
)


def _w6(n, th):
    return {"levels": len(n["levels"]), "creation_layers": list(n["levels"]), "share": th["share"]}


W6 = Claim(
    "W6", PAPER, "Secondary sinks form levels (clusters in creation layer × lifetime)",
    {"share": 0.1, "holds_levels": 3, "partly_levels": 2},
    _w6,
    holds=Test("levels", ">=", "holds_levels", "number of creation layers holding ≥ {share} of the counted attended secondary sinks"),
    partly=Test("levels", "==", "partly_levels", "number of creation layers holding ≥ {share} of the counted attended secondary sinks"),
    describe=lambda e: f"{e['levels']} creation layers hold ≥ {100 * e['share']:g} % of the counted attended secondary sinks: {e['creation_layers']}",
)

#: the counting rule, as every claim's method text states it (see the module docstring)
COUNTING = ("counted sinks: the verdict reads only the attended secondary sinks in the model's own generated tokens "
            "(circuits.parts: not the chat template, the system prompt or the problem text, whose sinks are reported beside "
            "them with their own counts, tokens and creation layers), and counts a sink in a prefix that several inputs share "
            "once (circuits.anatomy.once_per_context); per-session counts are secondary numbers; on inputs without parts "
            "(hand-written text) every position counts, each context once. Their code counts every flagged position of each "
            "trace after positions 0-2, the prompt's included (one problem per trace)")
_INPUTS = ("their inputs are the model's own chain-of-thought on AIME24/MATH problems, 9k-10k tokens; the report's are the model's "
           "own multi-turn chain-of-thought sessions on problems written for this project (settings.inputs), cut to "
           "settings.max_tokens tokens: 1,024 in the full reports, 8,192 in the long ones (--size long; the lengths are in the "
           "inputs paragraph)")
W1, W2, W3, W4, W5, W6 = (replace(c, method=m) for c, m in zip((W1, W2, W3, W4, W5, W6), (
    Method("token t > 0 flagged at layer l when |cos(h_t^l, h_0^l)| > 0.9, only inside the sink-clipper window (from the layer after "
           "the largest increase of ||h_0|| to the layer after the largest later decrease); lifetime = number of flagged layers "
           "(not necessarily contiguous); secondary when 4 < lifetime < L - 15; positions 0-2 excluded under a chat template",
           "the same |cos| rule and non-contiguous lifetime (circuits.anatomy.secondary_sinks) over every layer; class constants "
           "scaled by L/48; a flagged secondary token counts only when it also receives >= min_score_ratio x the median token's "
           "attention at its peak layer, and only when it is one of the counted sinks (below)",
           ("window off by default (secondary_sinks(use_window=True) is theirs)", "class constants scaled to depth",
            "the attention filter is the toolkit's (needed on Gemma 3, where the rule alone flags ordinary tokens)",
            "positions excluded as theirs: 0-2 under a chat template (skip_first=3), else position 0 only (numbers: skip_first)",
            COUNTING, _INPUTS)),
    Method("qualitative: in the middle layers where secondary sinks appear, the primary sink receives less attention",
           "mean primary-sink score in the live layers (where >= live_share x the peak number of counted attended secondary "
           "sinks are flagged) over the mean elsewhere, and the live layers' centre as a share of depth",
           ("the paper gives no number; the ratio, the live-layer definition and both thresholds are the toolkit's", COUNTING, _INPUTS)),
    Method("at the creation layer, cosine with the primary-sink direction of the MLP input, gate, up, activation, activation x up "
           "and down-projection outputs", "median |cos(MLP output, h_0^l)| at the creation layer over the counted attended "
           "secondary sinks, per MLP site",
           ("on Gemma 3 the MLP output is read after its post-feed-forward norm (what reaches the residual)", COUNTING, _INPUTS)),
    Method("the L2 norm of the aligning MLP output sets the sink's score and lifetime (their sink-score notebook is not public)",
           "Spearman rho (and p) between the writing MLP output's norm and each counted attended sink's peak score, and its "
           "lifetime",
           ("the sink score is the toolkit's (mean attention from later queries), theirs is unpublished", COUNTING, _INPUTS)),
    Method("at one middle layer (22 of 48), wherever the MLP output has cos > 0.98 with the first token's MLP output (positions "
           "0-2 excluded), its L2 norm is set to a target (default 100); detection re-run on the intervened prefill",
           "each counted attended secondary sink's own writing MLP output (at that token only) multiplied by each dose factor; "
           "its mean score over its clean lifetime layers and its re-counted lifetime compared with clean",
           ("a multiplicative factor at the sink's own MLP, not a target norm gated by cos > 0.98 at one layer",
            "their form (rescale-sink:layers=L,scope=whole,min_cos=0.98,target_norm=T,reference=mlp_out) is swept over "
            "settings.norm_targets at layer round(22/48 L) in the norm-sweep table; it does not enter the verdict", COUNTING,
            _INPUTS)),
    Method("a level is a cell, or a cluster of cells, of the count histogram over (creation layer, lifetime), plotted as "
           "log(1 + count); no clustering algorithm; 3 levels in QwQ-32B, 6 in Qwen3-14B",
           "the number of creation layers holding >= share of the counted attended secondary sinks",
           ("lifetime is not used by the verdict; the histogram itself (circuits.anatomy.sink_levels, log colour scale as "
            "theirs) is drawn in the report", COUNTING, _INPUTS)),
)))

#: in the order the report lists them
CLAIMS: tuple[Claim, ...] = (W1, W2, W6, W3, W4, W5)


# ------------------------------------------------------------------------------ measurement


def dose_response(model, obs: LongInputs, s: Settings, skip: int | None = None) -> dict | None:
    """W5's intervention on the counted sinks (:func:`counted`) of the first ``s.dose_traces``
    traces (see the module docstring): the :func:`~interventions.recipes.rescale_dose_response`
    result, or None without a counted sink there. ``skip``: positions excluded from detection
    (default :func:`skip_first`)."""
    rows = list(range(min(s.dose_traces, len(obs.batch))))
    sinks = recipes.secondary_sink_mlps(model, obs.batch, obs.sinks, min_score_ratio=s.min_score_ratio, sites=obs.mlp,
                                        skip_first=skip_first(model, obs, s) if skip is None else skip)
    sinks = counted(obs.sinks, sinks[sinks["sequence"].isin(rows)], obs.batch.parts).reset_index(drop=True)
    if sinks.empty:
        return None
    sinks.attrs["meas"] = obs.sinks.select(rows)  # the clean run of exactly these traces: no extra pass
    return recipes.rescale_dose_response(model, obs.batch.select(rows), sinks, factors=s.dose_factors, batch_size=s.batch_size)


def counted(meas, table: pd.DataFrame, parts: list[list[str]] | None) -> pd.DataFrame:
    """The rows of ``table`` (``sequence``, ``position``) that a verdict counts (:data:`COUNTING`):
    those in the model's own generated tokens (every row when ``parts`` is None), one per
    context (:func:`circuits.anatomy.once_per_context`, which adds ``copies``). Adds ``part``."""
    table = table.assign(part=part_column(table, parts))
    if parts is not None:
        table = table[table["part"] == OWN]
    return anatomy.once_per_context(meas, table)


def _part_summary(meas, table: pd.DataFrame, att: pd.DataFrame) -> dict:
    """One part's sinks (``table``: its candidates, ``att``: its attended ones, per session):
    counts once per context and per session, the tokens and creation layers of the distinct ones."""
    once = anatomy.once_per_context(meas, att)
    tokens = once["token"].value_counts()
    return {
        "n_candidates": anatomy.distinct_contexts(meas, table), "n_candidates_per_session": len(table),
        "n_attended": len(once), "n_attended_per_session": len(att),
        "tokens": [{"token": t, "count": int(c)} for t, c in tokens.head(8).items()],
        "creation_layers": {int(k): int(v) for k, v in once["start_layer"].value_counts().sort_index().items()},
        "lifetime_median": float(once["lifetime"].median()) if len(once) else float("nan"),
        "positions": sorted({int(p) for p in once["position"]}),
    }


def sink_counts(meas, parts: list[list[str]] | None, *, min_score_ratio: float, skip: int = 1,
                thresholds: anatomy.SecondaryThresholds | None = None, form: str | None = None) -> tuple[dict, dict]:
    """The sink counts W1, W2 and W6 read, under the counting rule (:data:`COUNTING`), from a
    measurement and the part of each token (``parts``, None for inputs without parts), with no
    model: ``(numbers, frames)``.

    ``numbers``: ``counting`` (the rule, its scope: ``"generated"`` or ``"every position"``, the
    sessions' ``form``), the counted candidates and attended sinks (``n_candidates_counted``,
    ``n_attended_counted``), the per-session counts of every part (``n_candidates``,
    ``n_attended``; secondary numbers), ``n_attended_distinct`` (every part, once per context),
    ``by_part`` (per part: counts once per context and per session, tokens, creation layers),
    ``parts`` (each sequence's parts as runs, :func:`circuits.parts.to_spans`), ``layers`` (the
    primary-sink score and the counted attended sinks alive per layer, and every part's per
    session), ``live_layers``, ``primary_ratio_live_vs_other``, ``levels`` and
    ``creation_layer_share`` (of the counted sinks). ``frames``: ``candidates`` and ``attended``
    (per session, every part, with ``part`` and ``counted``), ``counted`` (the attended sinks the
    verdicts read), ``layers``.
    """
    table, att, th = anatomy.attended_secondary(meas, min_score_ratio, thresholds, skip_first=skip)
    table = table.assign(part=part_column(table, parts))
    att = att.assign(part=part_column(att, parts))
    mine = counted(meas, att, parts)
    att = att.assign(counted=att.index.isin(mine.index))
    mine = mine.reset_index(drop=True)
    mine.attrs.update(att.attrs)
    cand = counted(meas, table, parts)
    primary = anatomy.primary_sink_layers(meas)
    live = anatomy.live_per_layer(meas, mine, th.cos)
    layers = primary[["layer", "primary_sink_score"]].assign(
        live_secondary=live, live_secondary_per_session_every_part=anatomy.live_per_layer(meas, att, th.cos))
    live_at = live_layers(live, W2.thresholds["live_share"])
    score = primary["primary_sink_score"].to_numpy()
    other = np.setdiff1d(np.arange(meas.n_layers), live_at)
    ratio = float(np.mean(score[live_at]) / np.mean(score[other])) if len(live_at) and len(other) else float("nan")
    if len(mine):
        shares = mine["start_layer"].value_counts(normalize=True).sort_index()
        levels = [int(l) for l, v in shares.items() if v >= W6.thresholds["share"]]
    else:
        shares, levels = pd.Series(dtype=float), []
    by_part = {} if parts is None else {
        part: _part_summary(meas, table[table["part"] == part], att[att["part"] == part]) for part in PARTS}
    numbers = {
        "counting": {"rule": COUNTING, "scope": "every position" if parts is None else OWN, "form": form},
        "n_sequences": meas.n_sequences,
        "n_candidates_counted": len(cand), "n_attended_counted": len(mine),
        "n_candidates": len(table), "n_attended": len(att), "n_attended_distinct": anatomy.distinct_contexts(meas, att),
        "by_part": by_part, "parts": None if parts is None else [to_spans(p) for p in parts],
        "attended": att.to_dict(orient="records"),
        "layers": layers.to_dict(orient="records"), "live_layers": live_at.tolist(), "primary_ratio_live_vs_other": ratio,
        "levels": levels, "creation_layer_share": {int(k): float(v) for k, v in shares.items()},
    }
    frames = {"candidates": table, "attended": att, "counted": mine, "layers": layers.assign(holds_sink=primary["holds_sink"])}
    return numbers, frames


def _control_side(counts: dict, parts: list[list[str]], meas) -> dict:
    """One side of the system-prompt control: the model's own sinks and the prompt's."""
    own = counts["by_part"][OWN]
    generated = sum(sum(1 for part in p[: int(n)] if part == OWN) for p, n in zip(parts, meas.lengths))
    return {
        "n_sessions": meas.n_sequences, "n_tokens": int(np.sum(meas.lengths)), "n_generated_tokens": int(generated),
        "n_attended_own": own["n_attended"], "n_candidates_own": own["n_candidates"],
        "own_per_1k_generated": 1000 * own["n_attended"] / generated if generated else float("nan"),
        "own_creation_layers": own["creation_layers"], "own_tokens": own["tokens"],
        "own_live_layers": counts["live_layers"],
        "n_attended_template": counts["by_part"]["template"]["n_attended"],
        "template_tokens": counts["by_part"]["template"]["tokens"],
        "template_positions": counts["by_part"]["template"]["positions"],
        "n_attended_problem": counts["by_part"]["problem"]["n_attended"],
    }


def system_prompt_control(model, obs: LongInputs, s: Settings, counts: dict, frames: dict, th: anatomy.SecondaryThresholds,
                          skip: int) -> dict:
    """The system-prompt control: the analysis of :func:`sink_counts` on the model's control
    sessions (:func:`circuits.probes.trace_batch` with ``system="empty"``: the same problems,
    decoding and seeds under an empty system message), set beside the report's sessions
    (``counts``, ``frames``: :func:`sink_counts` of ``obs``). Descriptive: no verdict reads it.

    The rule, fixed before the control sessions existed: the model's own sinks (generated part,
    each context once) are counted on both sides, also per 1,000 generated tokens since the
    answers differ in length; *the prompt's layers* are the live layers (:func:`live_layers`,
    W2's share) of the attended sinks in the template part of the report's sessions, and the
    primary-sink score is averaged over those layers on both sides. The answers are sampled
    again under the other prompt, so the two sides differ in their generated text too, not in
    the prompt alone. ``{"run": False, "reason": ...}`` where there is nothing to compare."""
    name = model_info(model).name
    reason = None
    if not s.control:
        reason = "switched off (Settings.control)"
    elif obs.sinks.metadata.get("inputs") != "generated" or obs.batch.parts is None:
        reason = "these inputs are not the model's own sessions"
    elif not has_traces(name, "empty"):
        reason = ("the model has no chat template, so its sessions have no system message to leave out"
                  if not getattr(model.tokenizer, "chat_template", None) else f"no control sessions for {name}")
    if reason:
        return {"run": False, "reason": reason}
    batch = trace_batch(model, s.n_traces, s.max_tokens, system="empty")
    short = int(obs.sinks.lengths.min())
    if len(batch) < len(obs.batch) or int(batch.lengths.min()) < short:
        # a control of fewer or shorter sessions would compare other lengths, not other prompts
        return {"run": False, "reason": f"the control sessions ({len(batch)}, {int(batch.lengths.min())}-{int(batch.lengths.max())} tokens) "
                                        f"do not match the report's ({len(obs.batch)}, at least {short} tokens each)"}
    meas = measure_sinks(model, batch, batch_size=s.batch_size, progress=False)
    ctrl, ctrl_frames = sink_counts(meas, batch.parts, min_score_ratio=s.min_score_ratio, skip=skip, thresholds=th, form=batch.parts_form)
    every = frames["attended"]
    prompt_sinks = anatomy.once_per_context(obs.sinks, every[every["part"] == "template"])
    prompt_live = anatomy.live_per_layer(obs.sinks, prompt_sinks, th.cos)
    prompt_layers = live_layers(prompt_live, W2.thresholds["live_share"])
    with_score = frames["layers"]["primary_sink_score"].to_numpy()
    without_score = ctrl_frames["layers"]["primary_sink_score"].to_numpy()
    layers = pd.DataFrame({
        "layer": np.arange(meas.n_layers), "primary_with_prompt": with_score, "primary_empty_prompt": without_score,
        "live_prompt_sinks": prompt_live,
        "live_own_with_prompt": frames["layers"]["live_secondary"].to_numpy(), "live_own_empty_prompt": ctrl_frames["layers"]["live_secondary"].to_numpy(),
    })
    mean = (lambda x: float(np.mean(x[prompt_layers]))) if len(prompt_layers) else (lambda x: float("nan"))
    return {
        "run": True, "rule": CONTROL_RULE, "system_prompt": model_traces(name)[0].get("system_prompt"),
        "with_prompt": _control_side(counts, obs.batch.parts, obs.sinks),
        "empty_prompt": _control_side(ctrl, batch.parts, meas),
        "prompt_layers": prompt_layers.tolist(),
        "primary_in_prompt_layers": {"with_prompt": mean(with_score), "empty_prompt": mean(without_score)},
        "layers": layers.to_dict(orient="records"),
    }


#: How the system-prompt control compares its two sides (:func:`system_prompt_control`); written
#: before the control sessions were generated.
CONTROL_RULE = (
    "the same problems, decoding and seeds with an empty system message; both sides counted as the verdicts count "
    "(the model's own generated tokens, each context once), also per 1,000 generated tokens; the primary-sink score "
    "averaged over the layers where the report's template-part sinks are live (W2's share of their peak); "
    "descriptive, no verdict reads it"
)


def skip_first(model, obs: LongInputs, s: Settings) -> int:
    """Positions excluded from detection, as in Wong et al.'s code: 0-2 when the inputs carry a
    chat template (the model's own sessions, on a model that has one), else position 0 only;
    ``s.skip_first`` overrides."""
    if s.skip_first is not None:
        return s.skip_first
    chat = obs.sinks.metadata.get("inputs") == "generated" and bool(getattr(model.tokenizer, "chat_template", None))
    return 3 if chat else 1


def detection_settings(meas, th: anatomy.SecondaryThresholds, skip: int = 1) -> pd.DataFrame:
    """The hidden-state rule with the sink-clipper window off (every layer) and on (the authors'
    default): flagged tokens per class (noise included), and each sequence's window."""
    rows = []
    for use_window in (False, True):
        t = anatomy.secondary_sinks(meas, th, use_window=use_window, include_noise=True, skip_first=skip)
        counts = t["kind"].value_counts()
        rows.append(dict(window="on (authors' default)" if use_window else "off (every layer)", flagged=len(t),
                         **{k: int(counts.get(k, 0)) for k in ("secondary", "primary-like", "noise")},
                         windows=", ".join(f"[{a}, {b})" for a, b in (anatomy.sink_window(meas, i) for i in range(meas.n_sequences)))
                         if use_window else "–"))
    return pd.DataFrame(rows)


def norm_layer(n_layers: int) -> int:
    """Wong et al.'s middle layer, 22 of 48, scaled to depth (rounded half up)."""
    return int(np.floor(n_layers * 22 / 48 + 0.5))


def norm_sweep(model, obs: LongInputs, s: Settings, th: anatomy.SecondaryThresholds, skip: int = 1) -> pd.DataFrame:
    """Wong et al.'s norm intervention as in their code, on the first ``s.dose_traces`` traces:
    at :func:`norm_layer`, every MLP output with cos > 0.98 to the first token's MLP output (first
    token excluded) gets L2 norm ``target`` for each of ``s.norm_targets``; detection (window off)
    is re-run on the intervened pass. ``target`` NaN is the clean run."""
    rows_idx = list(range(min(s.dose_traces, len(obs.batch))))
    batch = obs.batch.select(rows_idx)
    layer = norm_layer(int(model.cfg.n_layers))
    out = []
    for target in (float("nan"), *s.norm_targets):
        hooks = () if np.isnan(target) else RescaleAlongSink(
            layers=(layer,), scope="whole", min_cos=0.98, target_norm=target, reference="mlp_out", skip_first=skip).hooks_for(model, batch)
        meas = measure_sinks(model, batch, hooks=hooks, batch_size=s.batch_size, progress=False)
        t = anatomy.secondary_sinks(meas, th, include_noise=True, skip_first=skip)
        counts = t["kind"].value_counts()
        out.append(dict(layer=layer, target_norm=target, flagged=len(t), **{k: int(counts.get(k, 0)) for k in ("secondary", "primary-like", "noise")},
                        median_lifetime=float(t["lifetime"].median()) if len(t) else float("nan")))
    return pd.DataFrame(out)


def their_findings(att: pd.DataFrame) -> dict:
    """What Wong et al. report of their Qwen-family models, read off this model's attended
    secondary sinks: which tokens they sit on (theirs: most often the single-space token, id 220),
    whether one creation layer holds them all (theirs: all at layer 22 of 48, or 16 of 36) and
    their lifetimes (theirs: mostly 22-24 layers). Descriptive; no verdict reads it."""
    n = len(att)
    if not n:
        return {"n": 0}
    tokens = att["token"].value_counts()
    layers = att["start_layer"].value_counts()
    return {
        "n": n,
        "top_tokens": [{"token": t, "count": int(c), "share": float(c / n)} for t, c in tokens.head(5).items()],
        "single_space_share": float((att["token"] == " ").mean()),
        "mode_creation_layer": int(layers.index[0]), "mode_creation_share": float(layers.iloc[0] / n),
        "n_creation_layers": int(len(layers)),
        "lifetime_median": float(att["lifetime"].median()),
        "lifetime_iqr": [float(att["lifetime"].quantile(0.25)), float(att["lifetime"].quantile(0.75))],
    }


def measure(model, obs: LongInputs, s: Settings) -> Measured:
    """Every number W1-W6 read, from the long-input pass ``obs`` and the dose-response runs.

    ``numbers``: :func:`sink_counts`' (the counted, per-part and per-session sinks, the
    primary-sink score and live counted sinks per layer, the live layers and the primary-sink
    ratio, the sink levels), then the MLP sub-output cosines at the creation layer, the norm
    correlations and the dose response, all over the counted sinks. ``frames``: the same tables
    as DataFrames, plus ``joined`` (each counted sink with its creation-layer MLP statistics)
    for the figures.
    """
    meas = obs.sinks
    skip = skip_first(model, obs, s)
    th = anatomy.SecondaryThresholds.for_depth(meas.n_layers)
    counts, count_frames = sink_counts(meas, obs.batch.parts, min_score_ratio=s.min_score_ratio, skip=skip, thresholds=th,
                                       form=obs.batch.parts_form)
    att = count_frames["counted"]
    n_att = len(att)
    sites: analyses.MLPSites = obs.mlp
    joined = analyses.creation_layer_mlp(att, sites)
    base = analyses.site_baseline(sites, att)
    med_abs = {site: float(np.nanmedian(np.abs(joined[f"cos_{site}"]))) if n_att else float("nan") for site in sites.sites}
    sink_cos = float(np.nanmedian(np.abs(joined["cos_sink"]))) if n_att else float("nan")
    c_score = analyses.correlations(joined["written_norm"], joined["peak_score"]) if n_att else analyses.correlations([], [])
    c_life = analyses.correlations(joined["written_norm"], joined["lifetime"]) if n_att else analyses.correlations([], [])
    t0 = time.perf_counter()
    dose = dose_response(model, obs, s, skip)
    timings = {"wong_dose_response": time.perf_counter() - t0}
    dose_frame = None if dose is None else dose["by_factor"]
    t0 = time.perf_counter()
    sweep = norm_sweep(model, obs, s, th, skip)
    timings["wong_norm_sweep"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    control = system_prompt_control(model, obs, s, counts, count_frames, th, skip)
    timings["wong_control"] = time.perf_counter() - t0
    settings_table = detection_settings(meas, th, skip)
    level_counts = anatomy.sink_levels(anatomy.secondary_sinks(meas, th, include_noise=True, skip_first=skip), meas.n_layers)
    numbers = {
        **counts,
        "mlp_sites_median_abs_cos": med_abs, "mlp_sites_baseline": base, "median_abs_cos_sink": sink_cos,
        "corr_norm_score": c_score, "corr_norm_lifetime": c_life,
        "dose_response": None if dose is None else dose_frame.to_dict(orient="records"),
        "dose_rho": None if dose is None else dose["rho"], "dose_n_sinks": 0 if dose is None else dose["n_sinks"],
        "detection_settings": settings_table.to_dict(orient="records"), "norm_sweep": sweep.to_dict(orient="records"),
        "sink_level_counts": level_counts.tolist(), "skip_first": skip, "their_findings": their_findings(att),
        "control": control,
    }
    site_frame = pd.DataFrame({"site": list(sites.sites), "median_abs_cos_secondary": [med_abs[k] for k in sites.sites],
                               "median_cos_ordinary_tokens": [base[k] for k in sites.sites]})
    frames = {**count_frames, "joined": joined, "sites": site_frame, "site_baseline": base, "dose": dose_frame,
              "detection_settings": settings_table, "norm_sweep": sweep, "sink_level_counts": level_counts,
              "control": pd.DataFrame(control["layers"]) if control["run"] else None}
    return Measured(numbers, frames, timings)



# ------------------------------------------------------------------------------ figures


def _heatmap_sequence(res: Measured) -> int:
    """The trace with the most counted (else attended) secondary sinks: the heat map's."""
    shown = res.frames["counted"] if len(res.frames["counted"]) else res.frames["attended"]
    return int(shown["sequence"].value_counts().idxmax()) if len(shown) else 0


def _heatmap_caption(res: Measured, obs: LongInputs) -> str:
    seq = _heatmap_sequence(res)
    return f"Sink score (layer × position) of trace {seq}, {int(obs.sinks.lengths[seq])} tokens: whole (log scale) and first positions"


def _sink_levels_log(n: dict, model: str):
    if not n.get("sink_level_counts"):  # not kept by the earliest reports
        return None
    return paper_plots.sink_levels_plot(np.asarray(n["sink_level_counts"]), title=f"{model}: flagged tokens, creation layer × lifetime")


def _counted_sink_levels(res: Measured, obs: LongInputs):
    att = res.frames["counted"]
    return plots.secondary_sinks_plot(att, obs.sinks.n_layers,
                                      title=f"{obs.sinks.model}: counted attended secondary sinks, creation layer × lifetime (n={len(att)})")


#: the report's figures of this paper, in the order of its section (:mod:`sinkscope.reproduce.figures`)
FIGURES = {f.name: f for f in (
    PaperFigure("wong_heatmap", _heatmap_caption, lambda res, obs: paper_plots.long_heatmap(obs.sinks, _heatmap_sequence(res)),
                redrawable=False),
    PaperFigure("wong_primary_per_layer", "Primary-sink score per layer (line) and counted attended secondary sinks alive per layer (bars)",
                lambda n, model: paper_plots.primary_vs_secondary(pd.DataFrame(n["layers"]),
                                                                  title=f"{model}: primary sink and live secondary sinks per layer")),
    PaperFigure("wong_sink_levels", "Sink levels: the counted attended secondary sinks over (creation layer, lifetime)", _counted_sink_levels,
                redrawable=False),
    PaperFigure("wong_sink_levels_log", "Sink levels as the authors plot them: log(1 + count) over (creation layer, lifetime), "
                "every token the hidden-state rule flags (window off, noise included)", _sink_levels_log),
    PaperFigure("wong_mlp_sites", "|cos| of each MLP sub-output with the first token's at the creation layer",
                lambda res, obs: paper_plots.mlp_site_cosines(
                    res.frames["joined"], obs.mlp.sites, res.frames["site_baseline"],
                    title=f"{obs.sinks.model}: MLP sub-outputs at the creation layer (n={len(res.frames['counted'])} counted sinks)"),
                redrawable=False),
    PaperFigure("wong_norm_scatter", "L2 norm of the MLP output at the creation layer against peak sink score and lifetime",
                lambda res, obs: paper_plots.norm_scatter(res.frames["joined"], res.numbers["corr_norm_score"], res.numbers["corr_norm_lifetime"],
                                                          title=f"{obs.sinks.model}: MLP output norm against sink score and lifetime"),
                redrawable=False),
    PaperFigure("wong_dose_response", "Dose response of the norm intervention",
                lambda n, model: plots.dose_response(pd.DataFrame(n["dose_response"]), title=f"{model}: norm rescaling of sink-aligned MLP outputs")
                if n["dose_response"] else None),
)}


# ------------------------------------------------------------------------------ report section


def _inputs_phrase(meas) -> str:
    """What the long inputs were, as the section's first paragraph names them."""
    if meas.metadata.get("inputs") == "generated":
        decoding = model_traces(meas.model)[0]["settings"]  # as generated, not as the script's defaults say today
        return ("sessions of the model's own chain of thought on math problems (`circuits/data/traces/`, "
                f"`scripts/generate_traces.py`: multi-turn, sampled at temperature {decoding['temperature']:g}, "
                f"top-p {decoding['top_p']:g}), cut to their first tokens")
    return "hand-written reasoning traces (`circuits/data/reasoning.txt`)"


def their_findings_paragraph(tf: dict, n_layers: int) -> str:
    """Wong et al.'s model-specific findings (on DeepSeek-R1-Distill-Qwen-14B and Qwen3-4B) set
    against this model's attended secondary sinks (:func:`sinkscope.reproduce.wong.their_findings`)."""
    head = ("**Against Wong et al.'s specific findings.** On their Qwen-family models the secondary sinks sit most often on the "
            "single-space token (id 220), are all created at one layer (22 of 48; 16 of 36) and live 22-24 layers (18 on Qwen3-4B). ")
    if not tf.get("n"):
        return head + "This run found no counted attended secondary sink to compare."
    tokens = ", ".join(f"`{plots.token_label(t['token'], 12)}` {100 * t['share']:.0f} %" for t in tf["top_tokens"][:3])
    lo, hi = tf["lifetime_iqr"]
    return head + (
        f"Here, among the counted sinks: the most frequent tokens are {tokens}; the single-space token carries {100 * tf['single_space_share']:.0f} %. "
        f"Layer {tf['mode_creation_layer']} of {n_layers} creates {100 * tf['mode_creation_share']:.0f} % of them "
        f"({tf['n_creation_layers']} creation layer(s) in all), and the median lifetime is {tf['lifetime_median']:g} layers "
        f"(interquartile range {lo:g}-{hi:g}; {100 * tf['lifetime_median'] / n_layers:.0f} % of the depth, against 46-50 % on theirs)."
    )


def counting_paragraph(n: dict) -> str:
    """Which sinks Wong et al.'s verdicts count in this run (``numbers.json``'s ``wong.counting``)."""
    scope = n["counting"]["scope"]
    if scope == "generated":
        where = ("the model's own generated tokens (`circuits.parts`; the inputs were written "
                 f"with {FORMS.get(n['counting'].get('form'), 'an unknown form')})")
    else:
        where = "every position (these inputs have no template, problem or generated part)"
    return (f"**Which sinks the verdicts count.** Every count, share and correlation below that a verdict reads takes the "
            f"attended secondary sinks in {where}, and counts a sink in a prefix that several inputs share once "
            "(`circuits.anatomy.once_per_context`: its activations are the same in each, so it is one observation). "
            f"Counted: **{n['n_attended_counted']}** attended secondary sinks ({n['n_candidates_counted']} hidden-state "
            f"candidates). Per session and in every part (secondary numbers): {n['n_attended']} attended, {n['n_candidates']} "
            "candidates." + (" Sinks in the template and the problem text are reported beside them, not mixed in:" if scope == "generated" else ""))


def parts_table(by_part: dict) -> str:
    """Where the attended secondary sinks sit: one row per part of the inputs."""
    rows = []
    for part, p in by_part.items():
        layers = ", ".join(f"{k} ({v})" for k, v in sorted(p["creation_layers"].items(), key=lambda kv: int(kv[0])))
        rows.append({"part": part + (" (counted)" if part == "generated" else ""), "attended, each context once": p["n_attended"],
                     "attended per session": p["n_attended_per_session"], "candidates, each context once": p["n_candidates"],
                     "tokens (count)": ", ".join(f"`{plots.token_label(t['token'], 12)}` {t['count']}" for t in p["tokens"][:5]) or "–",
                     "creation layers (count)": layers or "–"})
    return md_table(pd.DataFrame(rows))


def control_section(c: dict, frame: pd.DataFrame | None) -> list[str]:
    """The system-prompt control (``numbers.json``'s ``wong.control``): the model's own sinks and
    the primary-sink score with the project's system prompt and with an empty one."""
    head = "**System-prompt control.** "
    if not c.get("run"):
        return [head + f"Not run: {c.get('reason')}.", ""]
    w, e = c["with_prompt"], c["empty_prompt"]

    def tokens(side: dict, key: str) -> str:
        return ", ".join(f"`{plots.token_label(t['token'], 12)}` {t['count']}" for t in side[key][:5]) or "–"

    def layers(side: dict) -> str:
        return ", ".join(f"{k} ({v})" for k, v in sorted(side["own_creation_layers"].items(), key=lambda kv: int(kv[0]))) or "–"

    rows = pd.DataFrame([
        {"system message": label, "sessions": side["n_sessions"], "tokens": side["n_tokens"], "generated tokens": side["n_generated_tokens"],
         "own sinks (each context once)": side["n_attended_own"], "per 1,000 generated": side["own_per_1k_generated"],
         "own sinks' creation layers (count)": layers(side), "own sinks' tokens": tokens(side, "own_tokens"),
         "template sinks": side["n_attended_template"], "template sinks' tokens": tokens(side, "template_tokens")}
        for label, side in (("the project's", w), ("empty", e))
    ])
    at = c["prompt_layers"]
    p = c["primary_in_prompt_layers"]
    where = (f"In the layers where the system prompt's sinks are live ({anatomy.layer_ranges(at, 'none')}), the primary-sink score is "
             f"{number(p['with_prompt'], 3)} with the prompt and {number(p['empty_prompt'], 3)} without it."
             if at else "The report's sessions have no attended sink in the template part, so there are no prompt layers to compare.")
    lines = [
        head + f"The same problems, decoding and seeds, generated again with an empty system message instead of "
        f"\"{c['system_prompt']}\" (`circuits/data/traces/*.empty-system.jsonl`). Rule: {c['rule']}. {where}",
        "", md_table(rows), "",
    ]
    if frame is not None:
        lines += ["Per layer, both sides (primary-sink score; live counts of the prompt's sinks and of the model's own):", "", md_table(frame), ""]
    return lines


def section(res: Measured, model, obs: LongInputs, s: Settings, figure: Figure) -> str:
    """Wong et al.'s section: the candidates, the heat map, and one figure per claim."""
    meas, f, n, saved, fig = obs.sinks, res.frames, res.numbers, as_saved(res.numbers), FIGURES
    table, every, att, n_layers = f["candidates"], f["attended"], f["counted"], meas.n_layers
    th = anatomy.SecondaryThresholds.for_depth(n_layers)
    n_att, name = len(att), meas.model
    lines = [
        "## Wong et al.: secondary attention sinks",
        "",
        f"{meas.n_sequences} {_inputs_phrase(meas)}, {int(meas.lengths.min())}-{int(meas.lengths.max())} tokens each, first token "
        f"the tokenizer's BOS: **{meas.prepend_bos}**. Hidden-state rule |cos(h_t, h_0)| > {th.cos}; classes scaled to {n_layers} layers "
        f"(secondary when {th.min_lifetime} < lifetime < {n_layers - th.primary_margin}). Per session and in every part of the "
        f"inputs, the rule flags **{len(table)}** tokens ({int((table['kind'] == 'secondary').sum())} secondary-class, "
        f"{int((table['kind'] == 'primary-like').sum())} primary-like), and **{len(every)}** secondary-class tokens also receive "
        f"≥ {s.min_score_ratio:g} × the median token's attention at their peak layer (*attended secondary sinks*), "
        f"{n['n_attended_distinct']} of them in distinct contexts. "
        f"Positions 0-{n['skip_first'] - 1} are excluded from detection"
        + (" (a chat template opens the input; Wong et al.'s code excludes 0-2 then)." if n["skip_first"] == 3 else "."),
        "",
        counting_paragraph(n),
        "",
    ]
    if n.get("by_part"):
        lines += [parts_table(n["by_part"]), ""]
    if n.get("control"):
        lines += control_section(n["control"], f.get("control"))
    lines += [their_findings_paragraph(n["their_findings"], n_layers), ""]
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
        lines += ["Most frequent counted attended secondary sinks (medians):", "", md_table(top), ""]
    lines.append(figure(fig["wong_heatmap"], res, obs))
    lines.append(figure(fig["wong_primary_per_layer"], saved, name))
    lines += [md_table(f["layers"]), ""]
    lines.append(figure(fig["wong_sink_levels"], res, obs))
    lines.append(figure(fig["wong_sink_levels_log"], saved, name))
    lines += ["Detection with the sink-clipper window off and on (`circuits.anatomy.secondary_sinks(use_window=...)`; |cos|, "
              "lifetime counts flagged layers, not necessarily contiguous):", "", md_table(f["detection_settings"]), ""]
    sweep = f["norm_sweep"]
    lines += [f"Norm intervention as in the authors' code: at layer {int(sweep['layer'].iloc[0])} (22 of 48 scaled to depth), every MLP "
              "output with cos > 0.98 to the first token's MLP output (first token excluded) gets L2 norm `target_norm` "
              "(`rescale-sink:scope=whole,min_cos=0.98,reference=mlp_out`), on the first "
              f"{s.dose_traces} trace(s); detection (window off) re-run on the intervened pass (target – = clean):", "",
              md_table(sweep), ""]
    lines.append(figure(fig["wong_mlp_sites"], res, obs))
    lines += [md_table(f["sites"]), "", f"Median |cos(written MLP output, h_0)| at the creation layer: **{res.numbers['median_abs_cos_sink']:.3f}**.", ""]
    lines.append(figure(fig["wong_norm_scatter"], res, obs))
    if f["dose"] is not None:
        lines += [
            f"Dose response: the {res.numbers['dose_n_sinks']} counted attended secondary sinks of the first {s.dose_traces} traces, each one's "
            "writing MLP output rescaled at exactly its token (`interventions.recipes.rescale_dose_response`, `edit-token-mlp` "
            "with `mode=rescale,scope=whole`); score = mean sink score over the sink's clean lifetime layers.",
            "",
            figure(fig["wong_dose_response"], saved, name),
            md_table(f["dose"]), "",
        ]
    return "\n".join(lines)


def _token_count(doc: dict) -> str:
    """A run's sequences × tokens, from its ``numbers.json``."""
    lengths = doc.get("tokens")
    if lengths:  # runs since the long size; earlier ones store only the settings
        return f"{len(lengths)} × {min(lengths):,}" + (f"-{max(lengths):,}" if max(lengths) != min(lengths) else "")
    return f"{doc['wong']['n_sequences']} × ≤ {doc['settings']['max_tokens']:,}"


def _fmt(x, digits: int = 2) -> str:
    """A number of a ``numbers.json``: NaN is stored as null; both print as "–"."""
    return number(x, digits)


def length_comparison(short: dict, long: dict) -> str:
    """What changes in Wong et al.'s claims between two runs of one model on inputs of two
    lengths: each shared claim's verdict and evidence side by side, then the numbers behind them."""
    a, b = short["settings"]["max_tokens"], long["settings"]["max_tokens"]
    if a > b:
        short, long, a, b = long, short, b, a
    claims = [{c["id"]: c for c in doc["claims"]} for doc in (short, long)]
    shared = [cid for cid in claims[1] if cid in claims[0]]
    rows = []
    for cid in shared:
        c0, c1 = claims[0][cid], claims[1][cid]
        moved = "" if c0["verdict"] == c1["verdict"] else " (changed)"
        rows.append({"claim": f"{cid} {c1['claim']}", f"{a:,} tokens": f"**{c0['verdict']}**: {c0['evidence']}",
                     f"{b:,} tokens": f"**{c1['verdict']}**{moved}: {c1['evidence']}"})

    def numbers(doc: dict) -> dict:
        w = doc["wong"]
        found = w.get("their_findings", {})
        sinks = w.get("n_attended_counted", w["n_attended"])  # what the verdicts count (before the rule: every sink per session)
        if doc.get("tokens"):
            rate = f"{1000 * sinks / sum(doc['tokens']):.2f}"
        else:  # an earlier run stored no lengths: at most max_tokens each, so the rate is a lower bound
            rate = f"≥ {1000 * sinks / (w['n_sequences'] * doc['settings']['max_tokens']):.2f}"
        counting = w.get("counting", {}).get("scope")
        return {
            "verdicts count": ("every attended sink, per session, every part (an earlier rule)" if counting is None
                               else f"attended sinks in {'the model’s own tokens' if counting == 'generated' else counting}, each context once"),
            "sequences × tokens": _token_count(doc),
            "counted attended secondary sinks (the verdicts')": w.get("n_attended_counted", "not counted (an earlier rule)"),
            "attended secondary sinks per session, every part": w["n_attended"],
            "of them in distinct contexts": w.get("n_attended_distinct", "not stored"),
            "the verdicts' sinks per 1,000 tokens": rate,
            "creation layers holding them (levels)": ", ".join(map(str, w["levels"])) or "none",
            "mode creation layer (share)": (f"{found['mode_creation_layer']} ({found['mode_creation_share']:.0%})" if found.get("n") else "–"),
            "median lifetime (layers)": (f"{found['lifetime_median']:.0f}" if found.get("n") else "–"),
            "share on the single-space token": (f"{found['single_space_share']:.0%}" if found.get("n") else "–"),
            "primary sink score, live layers / others": _fmt(w["primary_ratio_live_vs_other"]),
            "Spearman ρ, written norm vs peak score": _fmt(w["corr_norm_score"].get("spearman")),
            "dose response: sinks rescaled": w["dose_n_sinks"],
        }

    n0, n1 = numbers(short), numbers(long)
    table = pd.DataFrame({"": list(n0), f"{a:,} tokens": list(n0.values()), f"{b:,} tokens": [n1[k] for k in n0]})
    changed = sum(claims[0][cid]["verdict"] != claims[1][cid]["verdict"] for cid in shared)
    return "\n".join([
        f"## What changes between {a:,} and {b:,} tokens",
        "",
        f"The same claims and rules on the same model's long inputs: the {a:,}-token run ({_token_count(short)} tokens, "
        f"{short['size']} size) against this run at {b:,} tokens ({_token_count(long)}). {changed} of {len(shared)} verdicts "
        "change. A session is the same conversation at both lengths only as far as the shorter run reads it; the longer run "
        "may read other sessions (only the longest sessions reach it).",
        "",
        md_table(pd.DataFrame(rows)),
        "",
        md_table(table),
        "",
    ])


__all__ = [
    "CLAIMS", "CONTROL_RULE", "COUNTING", "FIGURES", "W1", "W2", "W3", "W4", "W5", "W6", "control_section", "counted", "counting_paragraph",
    "detection_settings", "dose_response", "length_comparison", "live_layers", "measure", "norm_layer", "norm_sweep", "parts_table", "section",
    "sink_counts", "skip_first", "system_prompt_control", "their_findings", "their_findings_paragraph",
]
