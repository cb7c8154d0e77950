"""Unit tests of circuits.analyses, interventions.keybias and sinkscope.reproduce.

Tiny models (seeded random Llama / Gemma 3 / GPT-2, d_model 64, 4 heads, 2 KV heads) are
checked against brute force from ``run_with_cache``; synthetic arrays check the summaries by
hand. Real-model tests (``@pytest.mark.real``) assert the claims the reproduce reports make,
with thresholds set from the measurements recorded in their docstrings.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from circuits import analyses
from circuits.measure import SinkMeter, measure
from circuits.models import tiny_model
from circuits.probes import TokenBatch, probe_texts, reasoning_texts, tokenize
from interventions.effect import output_change
from tolerances import assert_measurements_agree

TEXTS = ["The cat sat on the mat and looked at the door.", "A short one.", "Numbers: 1, 2, 3, 4, 5, 6, 7 and more!"]


@pytest.fixture(scope="module")
def llama():
    return tiny_model("llama")


@pytest.fixture(scope="module")
def gemma():
    return tiny_model("gemma3")


def _batch(model, texts=TEXTS):
    return tokenize(model, texts, prepend_bos=True)


def _cache(model, batch: TokenBatch, names):
    _, cache = model.run_with_cache(batch.tokens, names_filter=lambda n: n in set(names))
    return {n: cache[n].detach().float() for n in names}


def _cos_first(x):
    return torch.nn.functional.cosine_similarity(x, x[:, :1], dim=-1)


# ------------------------------------------------------------------------------ driver


@pytest.mark.numerical
def test_observe_without_logits_matches_measure(llama):
    """Stopping after the last block changes no statistic; the loss is left NaN. observe's
    sub-batches (2, in order) differ from measure's (sorted by length): the same sums on other
    shapes, within the rounding model (tests/tolerances.py)."""
    batch = _batch(llama)
    ref = measure(llama, batch, progress=False)
    (got,) = analyses.observe(llama, batch, [SinkMeter(llama)], batch_size=2)
    assert_measurements_agree(got, ref, llama, batch.tokens, fields=("alpha", "sink_score", "cos_to_first", "resid_norm"))
    assert np.isnan(got.next_token_loss).all()
    (with_logits,) = analyses.observe(llama, batch, [SinkMeter(llama)], logits=True)
    assert_measurements_agree(with_logits, ref, llama, batch.tokens, fields=("next_token_loss",))


def test_observe_rejects_empty_batch(llama):
    batch = _batch(llama)
    with pytest.raises(ValueError):
        analyses.observe(llama, TokenBatch(batch.tokens[:0], batch.lengths[:0], True, []), [])


# ------------------------------------------------------------------------------ MLP sites


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_mlp_sites_match_brute_force(arch):
    model = tiny_model(arch)
    batch = _batch(model)
    layer = 1
    names = {s: f"blocks.{layer}.{h}" for s, h in analyses.SITE_HOOKS.items()}
    cache = _cache(model, batch, [*names.values(), f"blocks.{layer}.hook_resid_post"])
    meter = analyses.MLPSiteMeter(model)
    analyses.observe(model, batch, [meter])
    res = meter.result()
    valid = batch.valid.numpy()
    for site, name in names.items():
        expect = _cos_first(cache[name]).numpy()
        np.testing.assert_allclose(res.cos_first[site][:, layer][valid], expect[valid], atol=1e-5)
    act = model.blocks[layer].mlp.original_component.act_fn(cache[names["gate"]])
    # the hook holds act(gate) * up: the act site is computed, not guessed
    torch.testing.assert_close(act * cache[names["up"]], cache[names["act_x_up"]], atol=1e-5, rtol=1e-4)
    np.testing.assert_allclose(res.cos_first["act"][:, layer][valid], _cos_first(act).numpy()[valid], atol=1e-5)
    assert np.allclose(res.cos_first["down"][:, :, 0], 1.0, atol=1e-5)
    written = cache[names["written"]]
    np.testing.assert_allclose(res.written_norm[:, layer][valid], written.norm(dim=-1).numpy()[valid], rtol=1e-5)
    h0 = cache[f"blocks.{layer}.hook_resid_post"][:, :1]
    np.testing.assert_allclose(res.cos_sink[:, layer][valid], torch.nn.functional.cosine_similarity(written, h0, dim=-1).numpy()[valid], atol=1e-5)
    assert np.isnan(res.written_norm[1, :, int(batch.lengths[1]):]).all()  # pads
    same = np.allclose(res.written_norm, res.down_norm, equal_nan=True)
    assert same == (arch == "llama")  # Gemma 3 writes the post-feed-forward-normed output


def test_mlp_site_meter_needs_a_gated_mlp():
    with pytest.raises(ValueError, match="gated MLP"):
        analyses.MLPSiteMeter(tiny_model("gpt2"))


def _synthetic_sites(n=2, layers=3, t=5):
    rng = np.random.default_rng(0)
    cos = {s: rng.uniform(-1, 1, (n, layers, t)).astype(np.float32) for s in analyses.SITES}
    return analyses.MLPSites(cos, rng.uniform(1, 9, (n, layers, t)), rng.uniform(1, 9, (n, layers, t)), rng.uniform(-1, 1, (n, layers, t)), np.array([t, t]))


def test_creation_layer_mlp_picks_the_creation_layer():
    sites = _synthetic_sites()
    table = pd.DataFrame({"sequence": [0, 1], "position": [3, 2], "start_layer": [1, 2], "lifetime": [2, 1], "peak_score": [0.1, 0.2]})
    out = analyses.creation_layer_mlp(table, sites)
    assert out.loc[0, "cos_gate"] == pytest.approx(sites.cos_first["gate"][0, 1, 3])
    assert out.loc[1, "written_norm"] == pytest.approx(sites.written_norm[1, 2, 2])
    assert out.loc[1, "cos_sink"] == pytest.approx(sites.cos_sink[1, 2, 2])
    empty = analyses.creation_layer_mlp(table.iloc[:0], sites)
    assert "cos_written" in empty.columns and empty.empty


def test_site_baseline_excludes_the_sinks_and_position_0():
    sites = _synthetic_sites(n=1, layers=2, t=4)
    for arr in sites.cos_first.values():
        arr[:] = 0.25
        arr[0, 1, 2] = 0.99  # the sink itself
        arr[0, 1, 0] = 1.0  # the first token
    table = pd.DataFrame({"sequence": [0], "position": [2], "start_layer": [1]})
    assert analyses.site_baseline(sites, table)["gate"] == pytest.approx(0.25)


def test_correlations():
    c = analyses.correlations(np.array([1, 2, 3, 4, np.nan]), np.array([1, 4, 9, 16, 3]))
    assert c["n"] == 4 and c["spearman"] == pytest.approx(1.0)
    assert np.isnan(analyses.correlations([1, 2], [2, 1])["spearman"])


# ------------------------------------------------------------------------------ attention outputs


def test_attn_out_meter_first_token_output_is_its_value(llama):
    """Position 0 attends only to itself, so its head output is exactly v_0 of its KV group."""
    batch = _batch(llama)
    cache = _cache(llama, batch, ["blocks.0.attn.hook_z", "blocks.0.attn.hook_v", "blocks.0.attn.hook_out"])
    meter = analyses.AttnOutMeter(llama)
    analyses.observe(llama, batch, [meter])
    st = meter.result()
    v0 = cache["blocks.0.attn.hook_v"][:, 0].repeat_interleave(2, dim=0 + 1)  # [b, head, d]
    np.testing.assert_allclose(st.z_var[:, 0, :, 0], v0.var(-1, unbiased=False).numpy(), rtol=1e-5)
    z = cache["blocks.0.attn.hook_z"]
    valid = batch.valid.numpy()
    np.testing.assert_allclose(st.z_norm[:, 0].transpose(0, 2, 1)[valid], z.norm(dim=-1).numpy()[valid], rtol=1e-5)
    out = cache["blocks.0.attn.hook_out"]
    np.testing.assert_allclose(st.out_norm[:, 0][valid], out.norm(dim=-1).numpy()[valid], rtol=1e-5)


def test_variance_by_position_by_hand():
    z_var = np.full((1, 1, 2, 4), 1.0, dtype=np.float32)
    z_var[0, 0, :, 0] = 6.0  # first token, both heads
    z_var[0, 0, :, 3] = 100.0  # one outlier later token: the median ignores it
    st = analyses.AttnOutStats(z_var, np.ones_like(z_var), np.ones((1, 1, 4)), np.ones((1, 1, 4)), np.array([4]))
    row = analyses.variance_by_position(st).iloc[0]
    assert row["z_var_first"] == 6 and row["z_var_rest"] == 1 and row["z_var_ratio"] == 6
    prof = analyses.variance_profile(st, 0)
    assert list(prof["z_var"]) == [6, 1, 1, 100]


# ------------------------------------------------------------------------------ super neurons


def test_super_neuron_found_with_its_residual_write(llama):
    """A channel forced to 1000 at the first token only is the one super neuron, and the
    residual dims it writes are the largest entries of its W_down column."""
    batch = _batch(llama)
    layer, channel = 2, 17

    def plant(a, hook):
        a = a.clone()
        a[:, 0, channel] = 1000.0
        return a

    meter = analyses.SuperNeuronMeter(llama)
    analyses.observe(llama, batch, [meter], hooks=[(f"blocks.{layer}.mlp.out.hook_in", plant)])
    table = analyses.super_neurons(meter.result(), llama, min_ratio=1000)
    assert list(zip(table["layer"], table["channel"])) == [(layer, channel)]
    row = table.iloc[0]
    col = analyses.down_projection(llama, layer)[:, channel].numpy()
    assert row["top_dims"][0] == int(np.argmax(np.abs(col)))
    assert row["top_values"][0] == pytest.approx(1000 * col[row["top_dims"][0]], rel=1e-4)
    assert row["share"] == 1.0 and row["specificity"] > 10


# ------------------------------------------------------------------------------ keys and values


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_kv_meter_matches_brute_force(arch):
    model = tiny_model(arch)
    batch = _batch(model)
    key = analyses.key_hook_name(model)
    assert key == "attn.hook_rot_k"
    names = [f"blocks.1.{key}", "blocks.1.attn.hook_v", "blocks.1.attn.hook_pattern", "blocks.1.attn.hook_z"]
    c = _cache(model, batch, names)
    meter = analyses.KVMeter(model)
    analyses.observe(model, batch, [meter])
    st = meter.result()
    valid = batch.valid.numpy()
    k_norm = c[names[0]].norm(dim=-1).numpy()  # [b, t, kv]
    np.testing.assert_allclose(st.k_norm[:, 1].transpose(0, 2, 1)[valid], k_norm[valid], rtol=1e-5)
    pattern, v, z = c[names[2]], c[names[1]], c[names[3]]
    for i, n in enumerate(batch.lengths.tolist()):
        a0 = pattern[i, :, 1:n, 0]  # [h, t-1]
        assert st.attn_first[i, 1] == pytest.approx(a0.mean(-1).numpy(), rel=1e-5)
        v0 = v[i, 0].norm(dim=-1).repeat_interleave(2)  # [h]
        share = (a0 * v0[:, None] / z[i, 1:n].norm(dim=-1).T).mean(-1)
        assert st.value_share[i, 1] == pytest.approx(share.numpy(), rel=1e-4)


def test_key_value_norms_by_hand():
    k = np.ones((1, 1, 2, 4), dtype=np.float32)
    k[..., 0] = 0.5
    v = np.full((1, 1, 2, 4), 4.0, dtype=np.float32)
    v[..., 0] = 1.0
    st = analyses.KVStats(k, v, np.full((1, 1, 4), 0.6), np.full((1, 1, 4), 0.1), "attn.hook_k", np.array([4]))
    row = analyses.key_value_norms(st).iloc[0]
    assert (row["k_ratio"], row["v_ratio"], row["attn_first"], row["value_share"]) == pytest.approx((0.5, 0.25, 0.6, 0.1))


# ------------------------------------------------------------------------------ key-bias interventions


@pytest.mark.parametrize("arch", ["llama", "gemma3", "gpt2"])
def test_zero_sink_value_removes_only_the_sinks_contribution(arch):
    from interventions.keybias import ZeroSinkValue

    model = tiny_model(arch)
    batch = _batch(model)
    names = ["blocks.0.attn.hook_pattern", "blocks.0.attn.hook_v", "blocks.0.attn.hook_z"]
    clean = _cache(model, batch, names)
    with ZeroSinkValue(layers=(0,)).applied(model, batch):
        edited = _cache(model, batch, names)
    p, v = clean[names[0]], clean[names[1]]
    v = v.repeat_interleave(p.shape[1] // v.shape[2], dim=2)  # [b, t, h, d]
    expect = torch.einsum("bhqk,bkhd->bqhd", p, v) - p[..., 0].transpose(1, 2)[..., None] * v[:, :1]
    expect[:, 0] = clean[names[2]][:, 0]  # the sink's own output is untouched
    torch.testing.assert_close(edited[names[2]], expect, atol=1e-5, rtol=1e-4)
    assert torch.all(edited[names[0]][:, :, 1:, 0] == 0)
    with ZeroSinkValue(layers=(0,), include_self=True).applied(model, batch):
        edited = _cache(model, batch, names)
    assert torch.all(edited[names[2]][:, 0] == 0)  # position 0 reads only its own (zeroed) value


@pytest.mark.parametrize("arch", ["llama", "gemma3", "gpt2"])
def test_drop_sink_attention_renormalises(arch):
    from interventions.keybias import DropSinkAttention

    model = tiny_model(arch)
    batch = _batch(model)
    name = "blocks.0.attn.hook_pattern"
    clean = _cache(model, batch, [name])[name]
    with DropSinkAttention(layers=(0,)).applied(model, batch):
        edited = _cache(model, batch, [name])[name]
    expect = clean.clone()
    expect[:, :, 1:, 0] = 0
    expect[:, :, 1:] = expect[:, :, 1:] / (1 - clean[:, :, 1:, :1])  # renormalised over the other keys
    torch.testing.assert_close(edited, expect, atol=1e-5, rtol=1e-4)
    assert torch.allclose(edited[:, :, 0, 0], torch.ones(()))


def test_keybias_specs_and_validation(llama):
    from interventions.base import InterventionError
    from interventions.keybias import DropSinkAttention, ZeroSinkValue
    from interventions.registry import parse_spec, spec

    assert parse_spec("zero-sink-value:layers=0-1,positions=3") == ZeroSinkValue(layers=(0, 1), positions=(3,))
    assert parse_spec("drop-sink-attention") == DropSinkAttention()
    assert spec(DropSinkAttention(keys=(2,))) == "drop-sink-attention:keys=2"
    batch = _batch(llama)
    with pytest.raises(InterventionError, match="positions"):
        ZeroSinkValue(positions=(50,)).validate(llama, int(batch.lengths.min()))
    with pytest.raises(InterventionError, match="layers"):
        DropSinkAttention(layers=(9,)).validate(llama)
    assert ZeroSinkValue().reach(llama, batch).start == 0


def test_output_change_identity_and_effect(llama):
    from interventions.keybias import DropSinkAttention
    from interventions.residual import AmplifyVariance

    batch = _batch(llama)
    out = output_change(llama, batch, {"identity": AmplifyVariance(layers=1, positions=(2,), factor=1.0), "drop": DropSinkAttention()}, batch_size=2)
    rows = out.set_index("intervention")
    assert rows.loc["clean", "kl"] == pytest.approx(0, abs=1e-6)
    assert rows.loc["identity", "kl"] == pytest.approx(0, abs=1e-5)
    assert rows.loc["identity", "top1_agree"] == 1.0
    assert rows.loc["drop", "kl"] > 1e-4
    assert rows.loc["clean", "n_tokens"] == int((batch.lengths - 1).sum())


# ------------------------------------------------------------------------------ reproduce


def test_md_table_and_verdicts():
    from sinkscope.reproduce import md_table, verdict

    text = md_table(pd.DataFrame({"a": [1.23456, float("nan")], "b": ["x|y", "z"]}))
    assert text.splitlines()[2] == "| 1.235 | x\\|y |" and "| – |" in text
    assert (verdict(True, True), verdict(False, True), verdict(False, False)) == ("holds", "partly holds", "does not hold")


def test_a_claims_rule_text_and_verdict_come_from_the_same_thresholds():
    """W3 at median |cos| 0.7: partly (0.5 <= 0.7 < 0.9); lowering its holds threshold to 0.6
    flips the verdict and the printed rule together; a missing number fails every test."""
    import dataclasses

    from sinkscope.reproduce import wong

    numbers = {"median_abs_cos_sink": 0.7, "n_attended_counted": 5, "mlp_sites_median_abs_cos": {"down": 0.7}}
    found = wong.W3.evaluate(numbers)
    assert found.verdict == "partly holds" and found.numbers["median_abs_cos"] == 0.7
    assert "≥ 0.9" in found.rule and "≥ 0.5" in found.rule
    lenient = dataclasses.replace(wong.W3, thresholds={"holds": 0.6, "partly": 0.5})
    assert lenient.evaluate(numbers).verdict == "holds" and "≥ 0.6" in lenient.rule and "0.9" not in lenient.rule
    missing = wong.W3.evaluate({**numbers, "median_abs_cos_sink": float("nan")})
    assert missing.verdict == "does not hold"


def test_reproduce_end_to_end_on_a_tiny_model(tmp_path):
    """The whole report machinery on tiny-llama: every claim gets one of the three verdicts,
    every figure the report links exists, numbers.json holds the claims, and redraw re-renders
    the figures numbers.json holds as the report drew them."""
    import dataclasses
    import json
    import re

    from sinkscope.reproduce import SIZES, redraw, reproduce

    s = dataclasses.replace(SIZES["ci"], n_traces=2, max_tokens=96, plant_n=2, plant_tokens=40, plant_position=20, eps_n=2,
                            eps_tokens=32, keybias_n=2, keybias_tokens=40, keybias_control=20, amplify_factors=(4.0,))
    doc = reproduce(tiny_model("llama"), tmp_path, settings=s)
    assert {c["verdict"] for c in doc["claims"]} <= {"holds", "partly holds", "does not hold"}
    assert len(doc["claims"]) == 13
    report = (tmp_path / "report.md").read_text()
    for png in re.findall(r"\]\(([\w.]+\.png)\)", report):
        assert (tmp_path / png).is_file(), png
    assert json.loads((tmp_path / "numbers.json").read_text())["claims"] == doc["claims"]
    assert doc["peak_memory_mb"] > 0 and doc["timings_s"]["total"] > 0
    drawn = {p.name: p.read_bytes() for p in tmp_path.glob("*.png")}
    redrawn = redraw(tmp_path)  # the same figure records: redraw draws what the report drew, title included
    report_only = {"wong_heatmap.png", "wong_sink_levels.png", "wong_mlp_sites.png", "wong_norm_scatter.png"}
    assert {p.name for p in redrawn} == set(drawn) - report_only and all(drawn[p.name] == p.read_bytes() for p in redrawn)


def test_a_wong_only_run_at_another_length_says_what_changes(tmp_path):
    """settings.papers limits the run to Wong et al. (claims, rules, timings); compare= puts
    the two runs' verdicts and numbers side by side, the shorter first, whichever is given."""
    import dataclasses

    from sinkscope.reproduce import SIZES, ReproduceError, redraw, reproduce

    model = tiny_model("llama")
    s = dataclasses.replace(SIZES["ci"], n_traces=2, max_tokens=64, papers=("wong",), dose_factors=(0.0,), norm_targets=(10.0,))
    short = reproduce(model, tmp_path / "short", settings=s)
    assert {c["id"][0] for c in short["claims"]} == {"W"} and set(short["rules"]) == {c["id"] for c in short["claims"]}
    assert "li" not in short and "li" not in short["timings_s"] and short["tokens"] == [64, 64]
    assert {p.name for p in redraw(tmp_path / "short")} == {"wong_primary_per_layer.png", "wong_sink_levels_log.png"}  # no dose: no sink
    long = reproduce(model, tmp_path / "long", settings=dataclasses.replace(s, max_tokens=96), compare=tmp_path / "short" / "numbers.json")
    report = (tmp_path / "long" / "report.md").read_text()
    assert "## What changes between 64 and 96 tokens" in report and "Li et al." not in report
    section = report.split("## What changes")[1]
    assert "| 64 tokens | 96 tokens |" in section and "| sequences × tokens | 2 × 64 | 2 × 96 |" in section
    for claim in long["claims"]:
        assert claim["id"] in section
    with pytest.raises(ReproduceError, match="papers must be some of wong, li, gu"):
        reproduce(model, tmp_path / "x", settings=dataclasses.replace(s, papers=("wong", "smith")))
    with pytest.raises(ReproduceError, match="that run is of 'tiny-gpt2', this one of 'tiny-llama'"):
        reproduce(model, tmp_path / "z", settings=s, compare={**short, "model": "tiny-gpt2"})
    assert not (tmp_path / "z" / "numbers.json").exists()
    with pytest.raises(ReproduceError, match="not the numbers.json of a sinkscope reproduce run"):
        (tmp_path / "other.json").write_text("{}")
        reproduce(model, tmp_path / "y", settings=s, compare=tmp_path / "other.json")


def test_reproduce_cli_bad_input_is_one_line(capsys, tmp_path):
    from sinkscope.cli import main

    assert main(["reproduce", "--model", "no-such-model", "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("sinkscope: error:")
    assert main(["reproduce", "--model", "tiny-llama", "--size", "huge", "--out", str(tmp_path / "x")]) == 2
    assert main(["reproduce", "--model", "tiny-llama", "--compare", str(tmp_path / "none.json"), "--out", str(tmp_path / "x")]) == 2
    assert "--compare" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


# ------------------------------------------------------------------------------ real models


@pytest.fixture(scope="module")
def smollm2_long(smollm2):
    """2 reasoning traces × 256 tokens, every meter (about 20 s)."""
    batch = tokenize(smollm2, reasoning_texts(2), max_tokens=256)
    meters = [SinkMeter(smollm2), analyses.MLPSiteMeter(smollm2), analyses.SuperNeuronMeter(smollm2), analyses.KVMeter(smollm2)]
    analyses.observe(smollm2, batch, meters, batch_size=2)
    return batch, [m.result() for m in meters]


@pytest.mark.real
def test_smollm2_secondary_sinks_are_written_by_the_mlp(smollm2_long):
    """Measured 2026-11-23 (2 traces × 256 tokens): 9 attended secondary sinks (8 ' the', all
    created at layer 2); at the creation layer median |cos| input 0.50, gate 0.75, up 0.52,
    act 0.83, act×up 0.97, written 0.997, |cos(written, h_0)| 0.988; Spearman rho(norm, peak
    score) 0.90 (p 0.001). Full run (6 × 1,024 tokens): docs/reproduce-smollm2-135m.md."""
    from circuits.anatomy import attended_secondary

    _, (meas, sites, _, _) = smollm2_long
    _, att, _ = attended_secondary(meas, 5.0)
    assert len(att) >= 4
    j = analyses.creation_layer_mlp(att, sites)
    assert np.median(np.abs(j["cos_sink"])) > 0.95
    assert np.median(np.abs(j["cos_input"])) < 0.7  # the alignment is made inside the MLP
    assert analyses.correlations(j["written_norm"], j["peak_score"])["spearman"] > 0.5


@pytest.mark.real
def test_smollm2_super_neuron_writes_dim_507(smollm2, smollm2_long):
    """Measured (same 2 × 256 tokens): layer 11 channel 1229 fires 3,022 at the first token
    (50,583 × the layer's median |activation|) and writes 17,758 into residual dim 507, the
    massive dimension."""
    _, (_, _, sn, kv) = smollm2_long
    table = analyses.super_neurons(sn, smollm2)
    row = table[(table["layer"] == 11) & (table["channel"] == 1229)]
    assert len(row) == 1
    assert row.iloc[0]["top_dims"][0] == 507 and row.iloc[0]["ratio"] > 10_000


@pytest.mark.real
def test_smollm2_sink_value_is_small_but_not_negligible(smollm2, smollm2_long):
    """Measured: in the sink layers 12-29 the first token's value norm is 0.21 × the median
    token's (2 × 256 tokens; G2 holds), yet zeroing what later queries read from it costs
    1.35 nats of KL on 4 probes × 64 tokens while removing its attention with renormalisation
    costs 0.18 (G3 does not hold on SmolLM2)."""
    from interventions.keybias import DropSinkAttention, ZeroSinkValue

    _, (_, _, _, kv) = smollm2_long
    table = analyses.key_value_norms(kv)
    assert table.loc[12:29, "v_ratio"].median() < 0.5
    batch = tokenize(smollm2, probe_texts(4), max_tokens=64)
    eff = output_change(smollm2, batch, {"zero": ZeroSinkValue(), "drop": DropSinkAttention()}).set_index("intervention")
    assert eff.loc["zero", "kl"] > 0.5
    assert eff.loc["drop", "kl"] < 0.5


@pytest.mark.real
def test_smollm2_isolation_plants_a_sink(smollm2):
    """Measured (4 probes × 48 tokens, position 24): isolating the token in every layer raises
    its sink score, averaged over layers, from 0.010 to 0.242 (25 ×); amplifying its variance
    (×16 at layer 10) leaves it at 0.008."""
    from interventions.attention import IsolateAggregation

    batch = tokenize(smollm2, probe_texts(4), max_tokens=48)
    clean, iso = SinkMeter(smollm2), SinkMeter(smollm2)
    analyses.observe(smollm2, batch, [clean])
    analyses.observe(smollm2, batch, [iso], hooks=IsolateAggregation(layers=tuple(range(30)), queries=(24,)).hooks_for(smollm2, batch))
    before = np.nanmean(clean.result().sink_score[:, :, 24])
    after = np.nanmean(iso.result().sink_score[:, :, 24])
    assert after > 5 * before and after > 0.1
