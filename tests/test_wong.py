"""Tests of Wong et al.'s detection options, sink levels and norm intervention as in their code.

Hand-checked on tiny models (exact norms, which positions change, the histogram cells); one
real-model test on smollm2 records what it measured.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from circuits import anatomy
from circuits.measure import measure
from circuits.models import tiny_model
from circuits.paper_plots import sink_levels_plot
from circuits.probes import probe_texts, tokenize
from interventions.base import InterventionError, applied
from interventions.mlp import RescaleAlongSink
from interventions.registry import parse_spec

TEXTS = ["The lighthouse keeper counted every ship that passed, one by one, until the fog rolled in.", "Sinks store attention."]


def _mlp_out(model, batch, layer, iv=None):
    name = f"blocks.{layer}.hook_mlp_out"
    with torch.no_grad():
        if iv is None:
            _, cache = model.run_with_cache(batch.tokens, names_filter=lambda n: n == name)
        else:
            with applied(model, iv, batch):
                _, cache = model.run_with_cache(batch.tokens, names_filter=lambda n: n == name)
    return cache[name].float()


def test_norm_intervention_reads_the_first_tokens_mlp_output():
    model = tiny_model("llama")
    batch = tokenize(model, TEXTS, prepend_bos=True)
    iv = RescaleAlongSink(layers=(2,), scope="whole", min_cos=0.0, target_norm=7.0, reference="mlp_out", skip_first=3)
    m0 = _mlp_out(model, batch, 2)
    m = _mlp_out(model, batch, 2, iv)
    cos = torch.nn.functional.cosine_similarity(m0, m0[:, :1], dim=-1)
    edited = cos >= 0.0
    edited[:, :3] = False  # the excluded prefix
    assert edited.any() and (~edited[:, 3:]).any()
    torch.testing.assert_close(m[edited].norm(dim=-1), torch.full((int(edited.sum()),), 7.0), atol=1e-4, rtol=0)
    torch.testing.assert_close(m[edited] / 7.0, m0[edited] / m0[edited].norm(dim=-1, keepdim=True), atol=1e-5, rtol=0)
    torch.testing.assert_close(m[~edited], m0[~edited])


def test_norm_intervention_spec_and_validation():
    iv = parse_spec("rescale-sink:layers=2,scope=whole,min_cos=0.98,target_norm=100,reference=mlp_out,skip_first=3")
    assert iv == RescaleAlongSink(layers=(2,), scope="whole", min_cos=0.98, target_norm=100.0, reference="mlp_out", skip_first=3)
    with pytest.raises(InterventionError, match="RescaleAlongSink.reference"):
        RescaleAlongSink(layers=(2,), target_norm=1.0, reference="h0")
    with pytest.raises(InterventionError, match="RescaleAlongSink.reference"):
        RescaleAlongSink(layers=(2,), target_norm=1.0, reference="mlp_out", direction=(1.0,) * 64)


def test_detection_options_and_sink_levels():
    model = tiny_model("llama")
    meas = measure(model, tokenize(model, TEXTS, prepend_bos=True))
    th = anatomy.SecondaryThresholds(cos=0.0, min_lifetime=0, primary_margin=0)
    every = anatomy.secondary_sinks(meas, th, include_noise=True)
    # |cos| > 0 flags every token at every layer: lifetime = n_layers, created at layer 0
    n = int(meas.lengths.sum()) - meas.n_sequences
    assert len(every) == n and (every["lifetime"] == meas.n_layers).all() and (every["start_layer"] == 0).all()
    signed = anatomy.secondary_sinks(meas, th, include_noise=True, abs_cos=False)
    expect = sum(int((meas.cos_to_first[s, :, 1 : int(meas.lengths[s])] > 0).any(axis=0).sum()) for s in range(meas.n_sequences))
    assert len(signed) == expect
    assert anatomy.secondary_sinks(meas, th, include_noise=True, skip_first=3)["position"].min() == 3
    lo, hi = anatomy.sink_window(meas, 0)
    windowed = anatomy.secondary_sinks(meas, th, include_noise=True, use_window=True)
    assert (windowed.query("sequence == 0")["lifetime"] == hi - lo).all()
    counts = anatomy.sink_levels(every, meas.n_layers)
    assert counts.shape == (meas.n_layers, meas.n_layers + 1) and counts[0, meas.n_layers] == n and counts.sum() == n
    table = pd.DataFrame({"start_layer": [1, 1, 2], "lifetime": [3, 3, 1]})
    hand = anatomy.sink_levels(table, 4)
    assert hand[1, 3] == 2 and hand[2, 1] == 1 and hand.sum() == 3
    fig = sink_levels_plot(hand)
    assert np.allclose(fig.axes[0].images[0].get_array(), np.log1p(hand).T)


@pytest.mark.real
def test_smollm2_norm_intervention_and_window(smollm2):
    """Measured (first run; 4 probes x 64 tokens, for_depth thresholds, noise included): the
    sink-clipper window is layers [11, 29) in all four sequences; 7 tokens are flagged over all
    layers and 0 inside the window. At layer 15 no token after the first has an MLP output with
    cos > 0.98 to the first token's, so Wong et al.'s norm intervention (target 100) edits
    nothing on these short probes and re-detection finds the same 7 tokens. Asserted as measured:
    the window never adds flags, and an edit that touches no position changes no detection."""
    batch = tokenize(smollm2, probe_texts(4), max_tokens=64)
    clean = measure(smollm2, batch)
    th = anatomy.SecondaryThresholds.for_depth(clean.n_layers)
    full = anatomy.secondary_sinks(clean, th, include_noise=True)
    win = anatomy.secondary_sinks(clean, th, include_noise=True, use_window=True)
    assert len(win) <= len(full)
    m0 = _mlp_out(smollm2, batch, 15)
    cos = torch.nn.functional.cosine_similarity(m0, m0[:, :1], dim=-1)
    later = batch.valid.clone()
    later[:, 0] = False
    aligned = int((cos[later] > 0.98).sum())
    iv = RescaleAlongSink(layers=(15,), scope="whole", min_cos=0.98, target_norm=100.0, reference="mlp_out")
    with applied(smollm2, iv, batch):
        hit = measure(smollm2, batch)
    after = anatomy.secondary_sinks(hit, th, include_noise=True)
    if aligned == 0:
        assert after[["sequence", "position", "lifetime"]].equals(full[["sequence", "position", "lifetime"]])


# ------------------------------------------------------------------------------ against their findings


def test_their_findings_reads_tokens_creation_layers_and_lifetimes():
    from sinkscope.reproduce import wong

    att = pd.DataFrame({"token": [" ", " ", " the", " "], "start_layer": [5, 5, 6, 5], "lifetime": [10, 12, 8, 10]})
    tf = wong.their_findings(att)
    assert tf["n"] == 4 and tf["single_space_share"] == 0.75
    assert tf["top_tokens"][0] == {"token": " ", "count": 3, "share": 0.75}
    assert (tf["mode_creation_layer"], tf["mode_creation_share"], tf["n_creation_layers"]) == (5, 0.75, 2)
    assert tf["lifetime_median"] == 10 and tf["lifetime_iqr"] == [9.5, 10.5]
    assert wong.their_findings(att.iloc[:0]) == {"n": 0}


@pytest.mark.real
def test_positions_0_to_2_are_excluded_only_under_a_chat_template(smollm2, llama):
    from types import SimpleNamespace

    from sinkscope.reproduce import SIZES, wong

    def obs(inputs):
        return SimpleNamespace(sinks=SimpleNamespace(metadata={"inputs": inputs}))

    s = SIZES["ci"]
    assert wong.skip_first(smollm2, obs("generated"), s) == 3  # SmolLM2's sessions open with <|im_start|>system\n
    assert wong.skip_first(smollm2, obs("written"), s) == 1
    assert wong.skip_first(llama, obs("generated"), s) == 1  # no chat template
    from dataclasses import replace

    assert wong.skip_first(smollm2, obs("generated"), replace(s, skip_first=2)) == 2


# ------------------------------------------------------------------------------ which sinks a verdict counts


def _six_sessions():
    """Six synthetic sessions of 40 tokens (30 layers) sharing a 10-token template (positions
    0-9, the same token ids in each), then a problem (10-14) and the model's own tokens
    (15-39), different in each. Every session has a secondary sink at template position 5
    (created at layer 2, lifetime 7); session 0 alone has one in its own tokens, at position 30
    (created at layer 10, lifetime 7)."""
    from synthetic import synthetic

    meas = synthetic([40] * 6, n_layers=30, secondary=(5,))
    meas.token_ids = [list(range(100, 110)) + [1000 * s + k for k in range(10, 40)] for s in range(6)]
    meas.tokens = [["<t>"] * 5 + [","] + ["<t>"] * 4 + toks[10:] for toks in meas.tokens]
    meas.cos_to_first[0, 10:17, 30] = 0.95
    meas.sink_score[0, 10:17, 30] = 0.2
    parts = [["template"] * 10 + ["problem"] * 5 + ["generated"] * 25 for _ in range(6)]
    return meas, parts


def test_a_template_sink_in_six_sessions_counts_once_and_decides_no_verdict():
    """Per session the template sink is 6 attended sinks and the model's own is 1: the old rule
    would read 7 sinks in 6 sequences (W1 holds: 7/6 >= 1) created at two layers (W6 partly:
    layers 2 and 10 each hold >= 10 %). Counted, the verdicts read 1 sink, in the model's own
    tokens: W1 partly (1/6 per sequence), W6 does not hold (one creation layer, 10), and W2's
    live layers are where that one sink is flagged (10-16). The template sink is reported
    beside it: once per context, 6 per session, token ',' created at layer 2."""
    from circuits.parts import to_spans
    from sinkscope.reproduce import wong

    meas, parts = _six_sessions()
    n, frames = wong.sink_counts(meas, parts, min_score_ratio=5.0, form="chat")
    assert (n["n_attended"], n["n_attended_distinct"], n["n_attended_counted"]) == (7, 2, 1)
    assert n["counting"] == {"rule": wong.COUNTING, "scope": "generated", "form": "chat"}
    template, problem, own = (n["by_part"][p] for p in ("template", "problem", "generated"))
    assert (template["n_attended"], template["n_attended_per_session"], template["positions"]) == (1, 6, [5])
    assert template["tokens"] == [{"token": ",", "count": 1}] and template["creation_layers"] == {2: 1}
    assert (own["n_attended"], own["positions"], own["creation_layers"]) == (1, [30], {10: 1})
    assert problem["n_attended"] == 0 and problem["n_attended_per_session"] == 0
    counted = frames["counted"]
    assert counted[["sequence", "position", "part", "copies"]].values.tolist() == [[0, 30, "generated", 1]]
    assert frames["attended"]["counted"].tolist() == [False, True, False, False, False, False, False]
    assert n["live_layers"] == list(range(10, 17)) and n["levels"] == [10]
    assert n["parts"][0] == to_spans(parts[0]) == [[0, 10, "template"], [10, 15, "problem"], [15, 40, "generated"]]
    verdicts = {c.id: c.evaluate(n) for c in (wong.W1, wong.W6)}
    assert verdicts["W1"].verdict == "partly holds" and verdicts["W1"].numbers["attended_per_sequence"] == pytest.approx(1 / 6)
    assert "1 attended secondary sinks in the model's own tokens" in verdicts["W1"].evidence
    assert "beside them: template 1, problem 0" in verdicts["W1"].evidence and "per session, every part: 7" in verdicts["W1"].evidence
    assert verdicts["W6"].verdict == "does not hold" and verdicts["W6"].numbers["creation_layers"] == [10]
    # the old rule, for contrast: every attended sink per session
    old = {**n, "n_attended_counted": n["n_attended"], "levels": [2, 10]}
    assert wong.W1.evaluate(old).verdict == "holds" and wong.W6.evaluate(old).verdict == "partly holds"


def test_without_parts_every_position_counts_each_context_once():
    """Hand-written text has no parts: every attended sink counts, the template one once."""
    from sinkscope.reproduce import wong

    meas, _ = _six_sessions()
    n, frames = wong.sink_counts(meas, None, min_score_ratio=5.0)
    assert n["counting"]["scope"] == "every position" and n["by_part"] == {} and n["parts"] is None
    assert (n["n_attended"], n["n_attended_counted"]) == (7, 2)
    assert sorted(frames["counted"]["copies"]) == [1, 6] and n["levels"] == [2, 10]


def test_the_report_states_the_counting_and_splits_the_sinks_by_part():
    from sinkscope.reproduce import wong
    from sinkscope.reproduce.report import counting_paragraph, parts_table

    meas, parts = _six_sessions()
    n, _ = wong.sink_counts(meas, parts, min_score_ratio=5.0, form="plain")
    text = counting_paragraph(n)
    assert "the model's own generated tokens" in text and "no chat template" in text
    assert "Counted: **1** attended secondary sinks" in text and "7 attended" in text
    table = parts_table(n["by_part"]).splitlines()
    assert table[2].startswith("| template | 1 | 6 |") and "`,` 1" in table[2] and "2 (1)" in table[2]
    assert table[4].startswith("| generated (counted) | 1 | 1 |") and "10 (1)" in table[4]
    every, _ = wong.sink_counts(meas, None, min_score_ratio=5.0)
    assert "every position (these inputs have no template, problem or generated part)" in counting_paragraph(every)
    for claim in wong.CLAIMS:  # the rule is in every claim's method text
        assert wong.COUNTING in claim.method.differences


@pytest.mark.real
def test_a_report_on_the_models_own_sessions_counts_by_part(smollm2, tmp_path):
    """Wong et al.'s section on SmolLM2's own sessions (2 x 192 tokens): numbers.json holds the
    rule, each input's parts and the sinks of each part, and the report says which sinks count."""
    import dataclasses
    import json

    from circuits.parts import from_spans
    from sinkscope.reproduce import SIZES, reproduce, wong

    s = dataclasses.replace(SIZES["ci"], papers=("wong",), dose_factors=(0.0, 1.0), norm_targets=(10.0,))
    doc = reproduce(smollm2, tmp_path, settings=s)
    w = json.loads((tmp_path / "numbers.json").read_text())["wong"]
    assert doc["schema"] == "sinkscope.reproduce/3" and w["counting"]["scope"] == "generated" and w["counting"]["form"] == "chat"
    labels = [from_spans(p) for p in w["parts"]]
    assert [len(p) for p in labels] == doc["tokens"] and labels[0][0] == "template" and "generated" in labels[0]
    assert set(w["by_part"]) == {"template", "problem", "generated"}
    assert w["n_attended_counted"] == w["by_part"]["generated"]["n_attended"]
    assert sum(p["n_attended_per_session"] for p in w["by_part"].values()) == w["n_attended"]
    assert all(labels[r["sequence"]][r["position"]] == r["part"] for r in w["attended"])
    # the system-prompt control: both sides counted by the same rule, on the same number of sessions
    c = w["control"]
    assert c["run"] and c["rule"] == wong.CONTROL_RULE and c["system_prompt"].startswith("You are a careful math tutor")
    mine, other = c["with_prompt"], c["empty_prompt"]
    assert mine["n_attended_own"] == w["n_attended_counted"] and mine["n_attended_template"] == w["by_part"]["template"]["n_attended"]
    assert mine["n_generated_tokens"] == sum(p.count("generated") for p in labels)
    assert other["n_sessions"] == mine["n_sessions"] == 2 and other["n_tokens"] == sum(doc["tokens"])
    layers = pd.DataFrame(c["layers"])
    assert layers["primary_with_prompt"].tolist() == [r["primary_sink_score"] for r in w["layers"]]
    assert set(c["prompt_layers"]) <= set(layers.index[layers["live_prompt_sinks"] > 0])
    report = (tmp_path / "report.md").read_text()
    assert "**Which sinks the verdicts count.**" in report and "| generated (counted) |" in report
    assert "**System-prompt control.**" in report and "| empty |" in report
    assert report.count(wong_counting_text()) == len(doc["claims"])  # once in each claim's method


def wong_counting_text() -> str:
    from sinkscope.reproduce import wong

    return wong.COUNTING


@pytest.mark.real
def test_the_control_is_not_run_where_there_is_no_system_message(gemma3):
    """Gemma 3 270M's sessions are plain transcripts: no system message to leave out; and the
    control can be switched off."""
    import dataclasses
    from types import SimpleNamespace

    from sinkscope.reproduce import SIZES, wong

    obs = SimpleNamespace(sinks=SimpleNamespace(metadata={"inputs": "generated"}), batch=SimpleNamespace(parts=[["template"]]))
    th = anatomy.SecondaryThresholds.for_depth(18)
    c = wong.system_prompt_control(gemma3, obs, SIZES["ci"], {}, {}, th, 1)
    assert c == {"run": False, "reason": "the model has no chat template, so its sessions have no system message to leave out"}
    off = wong.system_prompt_control(gemma3, obs, dataclasses.replace(SIZES["ci"], control=False), {}, {}, th, 1)
    assert off == {"run": False, "reason": "switched off (Settings.control)"}


@pytest.mark.real
def test_a_control_that_does_not_match_the_reports_inputs_is_not_compared(smollm2):
    """The control must hold as many sessions as the report, each at least as long: otherwise it
    would compare other lengths, not other prompts (SmolLM2's control at the CI size is 2 x 192
    tokens; a report said to hold 2 x 300 and one of 3 sessions are not compared with it)."""
    from types import SimpleNamespace

    from sinkscope.reproduce import SIZES, wong

    class Batch(list):
        parts = [["template"]]

    th = anatomy.SecondaryThresholds.for_depth(30)
    for lengths in ([300, 300], [192, 192, 192]):
        obs = SimpleNamespace(sinks=SimpleNamespace(metadata={"inputs": "generated"}, lengths=np.array(lengths)), batch=Batch(lengths))
        c = wong.system_prompt_control(smollm2, obs, SIZES["ci"], {}, {}, th, 3)
        assert c["run"] is False and c["reason"] == (
            f"the control sessions (2, 192-192 tokens) do not match the report's ({len(lengths)}, at least {min(lengths)} tokens each)")
