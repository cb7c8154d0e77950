"""Gu et al., "When Attention Sink Emerges in Language Models: An Empirical View" (ICLR 2025,
arXiv 2410.10781): the measurements and claims G1-G3 of the reproduction.

Why this module exists. It holds what is specific to this paper: Sink_1^eps in the paper's own
setting (natural text, T = 64) for this model and every other model available offline, the
key and value norms of the first token on the long inputs, the key-bias interventions, and the
claim records that judge them, the report's figures of this paper (:data:`FIGURES`, read by the
report and by :func:`~sinkscope.reproduce.report.redraw`) and its section of ``report.md``
(:func:`section`). Sink_1 is position 0 here (the paper numbers positions from 1).
"""

from __future__ import annotations

import gc
import os
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd

from circuits import analyses, anatomy, paper_plots
from circuits.long_inputs import LongInputs
from circuits.measure import SinkMeter
from circuits.model_info import model_info
from circuits.models import PACKAGED, list_models, load_model
from circuits.probes import default_prepend_bos, probe_texts, tokenize
from interventions.effect import output_change
from interventions.keybias import DropSinkAttention, MeanSinkValue, ZeroSinkValue
from sinkscope.reproduce.claims import AllOf, Claim, Measured, Method, Test
from sinkscope.reproduce.figures import PaperFigure, as_saved
from sinkscope.reproduce.markdown import Figure, md_table
from sinkscope.reproduce.settings import Settings

PAPER = "Gu"

# ------------------------------------------------------------------------------ claims


def _g1(n, th):
    mine = [r for r in n["sink_rates"] if r["model"].startswith(n["model"]) and np.isclose(r["eps"], th["eps"])]
    own = [r for r in mine if r["model"] == n["model"] and r.get("bos_setting", "native") == "native"][0]
    other = [r["sink_rate"] for r in mine if r.get("bos_setting") == "other" and r["model"].startswith(n["model"] + " [BOS")]
    return {"sink_rate": own["sink_rate"], "ci_low": own["ci_low"], "ci_high": own["ci_high"], "n": int(own["n"]),
            "tokens": n["eps_tokens"], "bos": bool(own["bos"]), "eps": th["eps"], "other_bos_rate": other[0] if other else float("nan")}


G1 = Claim(
    "G1", PAPER, "Trained LMs put a strong sink on the first token (Sink_1^0.3)", {"eps": 0.3, "holds": 50.0, "partly": 20.0},
    _g1,
    holds=Test("sink_rate", ">=", "holds", "Sink_1^{eps} (%)"),
    partly=Test("sink_rate", ">=", "partly", "Sink_1^{eps} (%)"),
    describe=lambda e: f"Sink_1^{e['eps']:g} = {e['sink_rate']:.1f} % (95 % CI {e['ci_low']:.1f}-{e['ci_high']:.1f}), "
    f"{e['n']} × {e['tokens']} tokens, BOS {e['bos']}; with BOS {not e['bos']}: "
    + ("not possible (no BOS token)" if np.isnan(e["other_bos_rate"]) else f"{e['other_bos_rate']:.1f} %") + " (not in the rule)",
)


def _g2(n, th):
    layers = n["sink_layers"]
    v = np.array([r["v_ratio"] for r in n["kv_norms"]], dtype=float)[layers]
    k = np.array([r["k_ratio"] for r in n["kv_norms"]], dtype=float)[layers]
    return {"v_ratio": float(np.nanmedian(v)), "k_ratio": float(np.nanmedian(k)), "sink_layers": anatomy.layer_ranges(layers, "none")}


G2 = Claim(
    "G2", PAPER, "The sink's value vector is small (it stores attention, not content)", {"holds": 0.5, "partly": 0.8},
    _g2,
    holds=Test("v_ratio", "<=", "holds", "value norm of the first token / median other token's (median over sink layers)"),
    partly=Test("v_ratio", "<=", "partly", "value norm of the first token / median other token's (median over sink layers)"),
    describe=lambda e: f"value norm of the first token / median other token = {e['v_ratio']:.2f} (median over sink layers "
    f"{e['sink_layers']}); key norm ratio {e['k_ratio']:.2f}",
)


def _g3(n, th):
    kl = {r["intervention"]: r["kl"] for r in n["keybias"]}
    runs = n["keybias_runs"]
    zero, drop, zero_ctrl, drop_ctrl = (kl[name] for name in runs[:4])
    mean, zero_self = (kl[runs[4]], kl[runs[5]]) if len(runs) >= 6 else (float("nan"), float("nan"))  # older numbers.json: four runs
    return {"kl_zero": zero, "kl_drop": drop, "drop_over_zero": drop / max(zero, 1e-12), "control_zero": zero_ctrl,
            "control_drop": drop_ctrl, "control_position": n["keybias_control"], "kl_mean": mean, "kl_zero_self": zero_self}


G3 = Claim(
    "G3", PAPER, "The sink acts as a key bias: zeroing its value barely matters, removing its attention does",
    {"factor": 10.0, "zero_kl": 0.1, "partly": 2.0},
    _g3,
    holds=AllOf((Test("drop_over_zero", ">=", "factor", "KL(drop attention) / KL(zero value)"),
                 Test("kl_zero", "<=", "zero_kl", "KL(zero value) in nats"))),
    partly=Test("drop_over_zero", ">=", "partly", "KL(drop attention) / KL(zero value)"),
    describe=lambda e: f"KL(clean ‖ zero value) = {e['kl_zero']:.3g} nats vs KL(clean ‖ drop attention) = {e['kl_drop']:.3g} nats "
    f"({e['drop_over_zero']:.0f} ×); controls at position {e['control_position']}: {e['control_zero']:.3g} / {e['control_drop']:.3g}; "
    f"mean value (own row included) {e['kl_mean']:.3g} vs zero value (own row included) {e['kl_zero_self']:.3g} (not in the rule)",
)

G1, G2, G3 = (replace(c, method=m) for c, m in zip((G1, G2, G3), (
    Method("Sink_1^eps: per sequence, layer and head, 1[alpha_0 > eps] with alpha the mean attention from the queries that see "
           "the key; averaged over 100 natural-text sequences of T = 64 (eps = 0.3)",
           "the same indicator and averaging (circuits.measure), on Settings.eps_n probe passages of Settings.eps_tokens tokens, "
           "with a bootstrap 95 % CI; BOS per the model's native policy",
           ("fewer, project-written passages instead of their natural-text sample",
            "the verdict reads the model's own BOS policy; the other setting (where the tokenizer has a BOS token) is shown "
            "beside it, not in the rule")),
    Method("the sink's value vector has a small norm: it stores attention mass rather than content",
           "first token's value norm / the median other token's, median over the layers where the primary sink holds, on the "
           "long inputs", ("the ratio and the layer selection are the toolkit's; the paper reports norms qualitatively",)),
    Method("the sink acts like a key bias: its value contributes little; a learnable key bias with zero value takes its place",
           "KL of the next-token distribution to the clean run when later queries read a zero value from position 0 "
           "(zero-sink-value) against removing its attention with renormalisation (drop-sink-attention), all layers, with the "
           "same edits at a later position as controls; the mean-value test (mean-sink-value: the value replaced by the mean "
           "of the other real tokens' values) and its like-for-like zero edit are shown beside them",
           ("the paper tests the key bias by training with one; the toolkit edits a trained model instead",
            "the mean-value runs are evidence only; the rule was fixed before they were added and does not read them")),
)))

CLAIMS: tuple[Claim, ...] = (G1, G2, G3)


# ------------------------------------------------------------------------------ measurement


def offline_models(current: str, checkpoints: str | Path | None = None) -> list[str]:
    """Every other model loadable offline: the installed packaged models, and the pre-training
    lab's checkpoints — every Hugging Face folder (one holding a ``config.json``) under
    ``checkpoints`` (default ``$SINKSCOPE_CHECKPOINTS``), e.g. a ``sinkscope pretrain --out``
    folder with its ``final/`` and ``checkpoints/step-*/``."""
    names = [r.name for r in list_models() if r.name in PACKAGED and r.installed and r.name != current]
    root = checkpoints or os.environ.get("SINKSCOPE_CHECKPOINTS")
    if root and Path(root).is_dir():
        names += sorted(str(p.parent) for p in Path(root).rglob("config.json") if str(p.parent) != current)
    return names


def sink_rates(model, s: Settings, progress: bool = False, prepend_bos: bool | None = None) -> pd.DataFrame:
    """Sink_1^eps over ``s.eps_grid`` for one model in Gu et al.'s setting (``s.eps_n`` probe
    passages × ``s.eps_tokens`` tokens), each with a bootstrap CI over sequences.
    ``prepend_bos=None``: the model's native policy (``bos_setting`` "native"), else "other"."""
    native = default_prepend_bos(model)
    setting = "native" if prepend_bos is None or prepend_bos == native else "other"
    batch = tokenize(model, probe_texts(s.eps_n), max_tokens=s.eps_tokens, prepend_bos=prepend_bos)
    meter = SinkMeter(model)
    analyses.observe(model, batch, [meter], batch_size=8, progress=progress)
    meas = meter.result()
    name = model_info(model).name
    if setting == "other":  # its own series in the table and figure
        name = f"{name} [BOS {'on' if meas.prepend_bos else 'off'}]"
    rows = []
    for eps in s.eps_grid:
        v, lo, hi = anatomy.sink_rate_ci(meas, eps)
        rows.append(dict(model=name, eps=eps, sink_rate=v, ci_low=lo, ci_high=hi, bos=meas.prepend_bos, bos_setting=setting,
                         n=meas.n_sequences))
    return pd.DataFrame(rows)


def all_sink_rates(model, s: Settings, progress: bool = False, checkpoints: str | Path | None = None) -> tuple[pd.DataFrame, list[str]]:
    """:func:`sink_rates` of ``model`` and, with ``s.other_models``, of every :func:`offline_models`
    one; returns the rows and the models that failed to load (with why)."""
    rates, failed = [sink_rates(model, s, progress)], []
    flip = not default_prepend_bos(model)
    if not flip or model.tokenizer.bos_token_id is not None:  # the other BOS setting, where the tokenizer allows it
        rates.append(sink_rates(model, s, progress, prepend_bos=flip))
    if s.other_models:
        for other in offline_models(rates[0]["model"].iloc[0], checkpoints):
            try:
                m = load_model(other)
            except Exception as exc:  # a broken optional checkpoint must not sink the whole report
                failed.append(f"{other}: {exc}")
                continue
            rates.append(sink_rates(m, s, progress))
            del m
            gc.collect()
    return pd.concat(rates, ignore_index=True), failed


def keybias(model, s: Settings) -> tuple[pd.DataFrame, list[str], int]:
    """Zero the first token's values against drop its attention (renormalised), all layers, with
    the same two edits at a later position as controls: :func:`interventions.effect.output_change`
    on ``s.keybias_n`` probe passages × ``s.keybias_tokens`` tokens. Returns the table, the four
    run names (zero, drop, zero control, drop control, then the mean-value test and its like-for-like
    zero edit, both including the sink's own row) and the control position. The mean-value runs
    answer "zero is out of distribution"; G3's rule (fixed before they existed) does not read them."""
    batch = tokenize(model, probe_texts(s.keybias_n), max_tokens=s.keybias_tokens)
    k = min(s.keybias_control, int(batch.lengths.min()) - 1)
    ivs = {
        "zero-sink-value (position 0, all layers)": ZeroSinkValue(),
        "drop-sink-attention (position 0, all layers)": DropSinkAttention(),
        f"control: zero-sink-value at position {k}": ZeroSinkValue(positions=(k,)),
        f"control: drop-sink-attention at position {k}": DropSinkAttention(keys=(k,)),
        "mean-sink-value (position 0, all layers, own row included)": MeanSinkValue(),
        "zero-sink-value (position 0, all layers, own row included)": ZeroSinkValue(include_self=True),
    }
    return output_change(model, batch, ivs, batch_size=4), list(ivs), k


def measure(model, obs: LongInputs, s: Settings, progress: bool = False, checkpoints: str | Path | None = None) -> Measured:
    """Every number G1-G3 read: Sink_1^eps of every model available offline, the key and value
    norms on the long-input pass ``obs`` (over the layers where the primary sink holds), and the
    key-bias interventions."""
    meas = obs.sinks
    t0 = time.perf_counter()
    rates, failed = all_sink_rates(model, s, progress, checkpoints)
    timings = {"gu_sink_rates": time.perf_counter() - t0}
    kv = analyses.key_value_norms(obs.kv)
    holds = anatomy.primary_sink_layers(meas)["holds_sink"].to_numpy()
    sink_layers = np.flatnonzero(holds) if holds.any() else np.arange(meas.n_layers)
    t0 = time.perf_counter()
    eff, runs, k = keybias(model, s)
    timings["gu_keybias"] = time.perf_counter() - t0
    numbers = {
        "sink_rates": rates.to_dict(orient="records"), "kv_norms": kv.to_dict(orient="records"), "keybias": eff.to_dict(orient="records"),
        "failed_models": failed, "model": meas.model, "eps_tokens": s.eps_tokens, "sink_layers": sink_layers.tolist(),
        "keybias_runs": runs, "keybias_control": k,
    }
    return Measured(numbers, {"sink_rates": rates, "kv_norms": kv, "keybias": eff}, timings)



# ------------------------------------------------------------------------------ figures

#: the report's figures of this paper, in the order of its section (:mod:`sinkscope.reproduce.figures`); all redrawable
FIGURES = {f.name: f for f in (
    PaperFigure("gu_sink_rate_eps", "Sink_1^eps against eps for every model available offline",
                lambda n, model: paper_plots.sink_rate_vs_eps(pd.DataFrame(n["sink_rates"]))),
    PaperFigure("gu_kv_norms", "Key and value norm ratios per layer, attention received and the value's share of head outputs",
                lambda n, model: paper_plots.kv_norms_plot(pd.DataFrame(n["kv_norms"]), title=f"{model}: key and value norms of the first token")),
    PaperFigure("gu_keybias", "Effect on the output of zeroing the sink's value against removing its attention (renormalised)",
                lambda n, model: paper_plots.keybias_effect_plot(pd.DataFrame(n["keybias"]),
                                                                 title=f"{model}: zero the sink's value vs drop its attention")),
)}


# ------------------------------------------------------------------------------ report section


def section(res: Measured, model, obs: LongInputs, s: Settings, figure: Figure) -> str:
    """Gu et al.'s section: Sink_1^eps across models, key and value norms, key bias."""
    f, name, saved, fig = res.frames, obs.sinks.model, as_saved(res.numbers), FIGURES
    failed = res.numbers["failed_models"]
    wide = f["sink_rates"].pivot(index="eps", columns="model", values="sink_rate").reset_index()
    lines = [
        "## Gu et al.: when the sink emerges, and the sink as a key bias",
        "",
        f"Sink_1^eps on {s.eps_n} probe passages × {s.eps_tokens} tokens, every model available offline"
        + (f" (failed to load: {'; '.join(failed)})" if failed else "") + ". Paper references at eps = 0.3: GPT-2 XL ≈ 77 %, "
        "Llama-2-7B ≈ 92 %, Llama-3-8B ≈ 99 %, Mistral-7B ≈ 97 %, the authors' 60M model ≈ 18 %.",
        "",
        figure(fig["gu_sink_rate_eps"], saved, name),
        md_table(wide), "",
        f"Key (`{obs.kv.key_hook}`) and value (`attn.hook_v`) norms on the long inputs; ratios are the first token over the median other token.",
        "",
        figure(fig["gu_kv_norms"], saved, name),
        md_table(f["kv_norms"]), "",
        f"Interventions on {s.keybias_n} probe passages × {s.keybias_tokens} tokens (`interventions.keybias`): KL of the next-token "
        "distribution from the clean run's, mean over tokens.",
        "",
        figure(fig["gu_keybias"], saved, name),
        md_table(f["keybias"]), "",
    ]
    return "\n".join(lines)


__all__ = ["CLAIMS", "FIGURES", "G1", "G2", "G3", "all_sink_rates", "keybias", "measure", "offline_models", "section", "sink_rates"]
