"""measure_effect and compare: exact zeros for identities, real changes for real edits, hand-checked
differences of differences, bootstrap CIs, random controls, and provenance.

Tiny seeded models: numbers are checked against hand arithmetic or against the measurement module
itself (``circuits.measure.measure``), never against copies of the formulas.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest
import torch

from circuits.measure import SinkMeasurement, measure
from circuits.models import tiny_model
from circuits.probes import tokenize
from helpers import forward_counter
from interventions.attention import IsolateAggregation
from interventions.base import InterventionError, hooks_for, registered_hooks
from interventions.effect import (
    METRICS,
    EffectError,
    EffectSettings,
    Target,
    compare,
    first_affected_layer,
    kl_divergence,
    measure_effect,
    paired_bootstrap,
    random_control,
    relocated,
    sink_positions,
    target_of,
    vary,
)
from interventions.mlp import AblateMLP, RescaleAlongSink
from interventions.registry import parse_spec
from interventions.residual import AmplifyVariance
from tolerances import assert_frames_agree, assert_measurements_agree, max_abs_logit

TEXTS = [
    "The cat sat on the mat, and then it slept.",
    "A quick brown fox jumps over the lazy dog!",
    "Sinks store attention that has nowhere to go.",
    "Every morning the small fox walked to the river.",
    "Numbers: one, two, three, four and five.",
]


@pytest.fixture(scope="module")
def llama():
    return tiny_model("llama")


@pytest.fixture(scope="module")
def batch(llama):
    return tokenize(llama, TEXTS)


@pytest.fixture(scope="module")
def ablated(llama, batch):
    """Zero-ablation of every MLP: a large, real change."""
    return measure_effect(llama, batch, AblateMLP(layers=(0, 1, 2, 3)), n_resamples=500)


# --------------------------------------------------------------------------- identities


def test_exact_identity_gives_exact_zeros(llama, batch):
    """factor=1 in 'norm' mode multiplies by 1.0: bit-identical activations, so exactly 0 everywhere."""
    effect = measure_effect(llama, batch, AmplifyVariance(layers=1, positions=(3,), factor=1.0, mode="norm"), n_resamples=200)
    frame = effect.frame
    assert set(frame["metric"]) == set(METRICS)
    finite = frame["delta"].notna()
    assert (frame.loc[finite, "delta"] == 0).all()
    enough = finite & (frame["n"] >= 3)  # fewer sequences (the longest ones' last positions): no CI
    assert (frame.loc[enough, "ci_low"] == 0).all() and (frame.loc[enough, "ci_high"] == 0).all()
    assert frame.loc[finite & ~enough, "ci_low"].isna().all()
    assert np.nanmax(effect.kl) == 0.0
    assert effect.summary["kl"]["delta"] == 0.0 and effect.summary["next_token_loss"]["delta"] == 0.0
    np.testing.assert_array_equal(effect.clean.sink_score, effect.intervened.sink_score)
    assert registered_hooks(llama) == {}


def test_rescale_by_one_is_an_identity_up_to_rounding(llama, batch):
    effect = measure_effect(llama, batch, RescaleAlongSink(layers=(1, 2), factor=1.0), n_resamples=200)
    assert np.nanmax(np.abs(effect.frame["delta"].to_numpy(float))) <= 1e-5
    assert np.nanmax(effect.kl) <= 1e-6


# --------------------------------------------------------------------------- real changes


def test_zero_ablating_every_mlp_changes_things(ablated):
    assert ablated.summary["kl"]["delta"] > 1e-4  # a random tiny model: small MLP outputs, but far above rounding
    assert ablated.summary["kl"]["ci95"][0] > 0  # KL is positive in every sequence
    assert ablated.summary["next_token_loss"]["delta"] != 0
    scores = ablated.rows("sink_score")
    assert scores["delta"].abs().max() > 1e-4
    # layer 0's attention comes before any MLP: unchanged, exactly
    assert (scores.loc[scores["layer"] == 0, "delta"].dropna() == 0).all()
    assert ablated.target.layers == (1, 2, 3) and ablated.target.positions == (0,)


def test_ci_contains_the_point_estimate(ablated):
    rows = ablated.frame.dropna(subset=["ci_low", "ci_high"])
    assert len(rows) > 0.8 * ablated.frame["delta"].notna().sum()
    tol = 1e-12
    assert (rows["ci_low"] <= rows["delta"] + tol).all() and (rows["delta"] <= rows["ci_high"] + tol).all()
    assert (rows["ci_high"] - rows["ci_low"] > 0).any()


@pytest.mark.numerical
def test_clean_and_intervened_equal_the_measure_module(llama, batch, ablated):
    """measure_effect adds nothing of its own to the statistics: both runs equal measure(), within
    the rounding of two float32 computations (its forwards may run other sub-batch shapes)."""
    clean = measure(llama, batch, progress=False)
    iv = AblateMLP(layers=(0, 1, 2, 3))
    hooked = measure(llama, batch, hooks=hooks_for(llama, iv, batch), progress=False)
    fields = ("sink_score", "alpha", "next_token_loss", "resid_norm")
    assert_measurements_agree(ablated.clean, clean, llama, batch.tokens, fields=fields, what="clean ")
    with iv.applied(llama, batch):
        max_logit = max_abs_logit(llama, batch.tokens)
    assert_measurements_agree(ablated.intervened, hooked, llama, batch.tokens, fields=fields, what="intervened ", max_logit=max_logit)
    assert ablated.clean.token_ids == batch.token_ids


def test_frame_means_are_means_of_the_measurements(ablated):
    scores = ablated.rows("sink_score")
    row = scores[(scores["layer"] == 2) & (scores["position"] == 0)].iloc[0]
    clean = ablated.clean.sink_score[:, 2, 0]
    hooked = ablated.intervened.sink_score[:, 2, 0]
    assert row["clean"] == pytest.approx(clean.mean()) and row["intervened"] == pytest.approx(hooked.mean())
    assert row["delta"] == pytest.approx((hooked - clean).mean()) and row["n"] == len(TEXTS)
    rate = ablated.rows("sink_rate")
    r0 = rate[rate["position"] == 0].iloc[0]
    assert r0["clean"] == pytest.approx(ablated.clean.sink_rate(0.3)[0])


def test_kl_is_clean_to_intervened_per_position(llama, batch):
    sub = batch.select([0, 1])
    with torch.no_grad():
        clean = llama(sub.tokens)
        with AblateMLP(layers=(1,)).applied(llama, sub):
            hooked = llama(sub.tokens)
    kl = kl_divergence(clean, hooked, sub.valid)
    p = torch.softmax(clean[0, 4].double(), -1)
    q = torch.softmax(hooked[0, 4].double(), -1)
    assert kl[0, 4].item() == pytest.approx((p * (p / q).log()).sum().item(), rel=1e-4)
    assert torch.isnan(kl[1, int(sub.lengths[1]) :]).all()  # pad positions
    assert torch.equal(kl_divergence(clean, clean, sub.valid)[sub.valid], torch.zeros(int(sub.valid.sum())))


@pytest.mark.numerical
def test_sub_batch_size_does_not_change_the_result(llama, batch):
    """Sub-batches of 1 and of 8: the same sums on other shapes (tolerances.assert_frames_agree)."""
    iv = AblateMLP(layers=(2,), positions=(3,))
    one = measure_effect(llama, batch, iv, batch_size=1, n_resamples=200)
    all_ = measure_effect(llama, batch, iv, batch_size=8, n_resamples=200)
    assert_frames_agree(one.frame, all_.frame, all_, llama, batch.tokens)


def test_restricting_layers_and_positions(llama, batch):
    iv = AblateMLP(layers=(1,), positions=(4,))
    effect = measure_effect(llama, batch, iv, layers=[2, 3], positions="target", n_resamples=200)
    scores = effect.rows("sink_score")
    assert sorted(set(scores["layer"])) == [2, 3] and sorted(set(scores["position"])) == [0, 4]
    assert sorted(set(effect.rows("sink_rate")["position"])) == [0, 4]
    assert effect.target == Target((2, 3), (4,), effect.target.rule)
    with pytest.raises(EffectError, match="out of range"):
        measure_effect(llama, batch, iv, positions=[999], n_resamples=10)
    with pytest.raises(EffectError, match="layers"):
        measure_effect(llama, batch, iv, layers=[4], n_resamples=10)


def test_bad_intervention_fails_before_any_forward_pass(llama, batch):
    with forward_counter(llama) as calls:
        with pytest.raises(InterventionError, match="layer 9 is out of range"):
            measure_effect(llama, batch, "ablate-mlp:layer=9")
        with pytest.raises(InterventionError, match="unknown intervention kind"):
            measure_effect(llama, batch, "ablate-everything:layer=1")
        with pytest.raises(EffectError, match="eps"):
            measure_effect(llama, batch, "ablate-mlp:layer=1", eps=1.5)
        with pytest.raises(EffectError, match="unknown control"):
            measure_effect(llama, batch, "ablate-mlp:layer=1", control="somewhere")
        with pytest.raises(EffectError, match="names no positions"):
            measure_effect(llama, batch, "ablate-mlp:layer=1", control="position")
        with pytest.raises(EffectError, match="out of range"):
            measure_effect(llama, batch, "ablate-mlp:layer=1", positions=[999])
        with pytest.raises(EffectError, match="n_resamples must be a non-negative integer"):
            measure_effect(llama, batch, "ablate-mlp:layer=1", n_resamples=-1)
        with pytest.raises(EffectError, match="positions must be None, 'target' or a list"):
            measure_effect(llama, batch, "ablate-mlp:layer=1", positions="targets")
    assert calls == []


# --------------------------------------------------------------------------- compare by hand


def _fake(scores: np.ndarray, loss: float = 1.0) -> SinkMeasurement:
    """A measurement of 4 sequences × 2 layers × 1 head × 4 positions with given sink scores."""
    n, layers, t = scores.shape
    return SinkMeasurement(
        model="fake", prepend_bos=False, token_ids=[[1, 2, 3, 4]] * n, tokens=[list("abcd")] * n,
        lengths=np.full(n, t), alpha=np.zeros((n, layers, 1, t), np.float32), sink_score=scores.astype(np.float32),
        resid_norm=np.ones((n, layers, t)), cos_to_first=np.ones((n, layers, t)), first_resid=np.ones((n, layers, 2)),
        top_dims=np.zeros((n, layers, t, 4), int), top_values=np.zeros((n, layers, t, 4)), median_abs=np.ones((n, layers)),
        next_token_loss=np.full((n, t), loss),
    )


def test_difference_of_differences_by_hand():
    base = np.full((4, 2, 4), 0.1)
    base[:, 1, 2] = [0.1, 0.2, 0.1, 0.2]
    clean = _fake(base)
    hooked = base.copy()
    hooked[:, 1, 2] = [0.5, 0.6, 0.3, 0.4]  # target (layer 1, position 2): deltas 0.4 0.4 0.2 0.2, mean 0.3
    ctrl = base.copy()
    ctrl[:, 1, 1] = [0.2, 0.1, 0.1, 0.2]  # control target (layer 1, position 1): deltas 0.1 0 0 0.1, mean 0.05
    effect = compare(
        clean, _fake(hooked, loss=1.5), target=Target((1,), (2,), "hand"), intervention="ablate-mlp:layers=0",
        control=_fake(ctrl, loss=1.25), control_target=Target((1,), (1,), "hand"), control_intervention="ablate-mlp:layers=1", n_resamples=2000,
    )
    t = effect.rows("target_sink_score").iloc[0]
    assert t["clean"] == pytest.approx(0.15) and t["intervened"] == pytest.approx(0.45)
    assert t["delta"] == pytest.approx(0.3) and t["control_delta"] == pytest.approx(0.05)
    assert t["control"] == pytest.approx(0.15)
    assert t["did"] == pytest.approx(0.25)  # per sequence 0.3 0.4 0.2 0.1
    assert 0.1 <= t["did_ci_low"] <= 0.25 <= t["did_ci_high"] <= 0.4
    # the same cell in the per-cell rows: the control did not touch (1, 2), so did == delta there
    cell = effect.rows("sink_score")
    cell = cell[(cell["layer"] == 1) & (cell["position"] == 2)].iloc[0]
    assert cell["control_delta"] == pytest.approx(0.0) and cell["did"] == pytest.approx(0.3)
    # at the control's cell (1, 1): delta 0, control delta 0.05, did -0.05
    cell = effect.rows("sink_score")
    cell = cell[(cell["layer"] == 1) & (cell["position"] == 1)].iloc[0]
    assert cell["delta"] == pytest.approx(0.0) and cell["did"] == pytest.approx(-0.05)
    loss = effect.rows("next_token_loss").iloc[0]
    assert loss["delta"] == pytest.approx(0.5) and loss["control_delta"] == pytest.approx(0.25) and loss["did"] == pytest.approx(0.25)
    assert loss["ci_low"] == loss["ci_high"] == pytest.approx(0.5)  # the same delta in every sequence
    assert math.isnan(effect.rows("kl").iloc[0]["delta"])  # no logits given: KL unknown, not 0
    doc = json.loads(json.dumps(effect.to_json(), allow_nan=False))
    assert doc["summary"]["target_sink_score"]["did"] == pytest.approx(0.25)
    assert doc["control"]["spec"] == "ablate-mlp:layers=1" and doc["control"]["target"]["positions"] == [1]
    assert doc["intervention"] == "ablate-mlp:layers=0" and effect.intervention == parse_spec("ablate-mlp:layers=0")


def test_settings_object_or_keywords_give_the_same_effect():
    base = np.full((4, 2, 4), 0.1)
    hooked = base.copy()
    hooked[:, 1, 2] = [0.5, 0.6, 0.3, 0.4]
    args = dict(target=Target((1,), (2,), "hand"), intervention="ablate-mlp:layers=0")
    by_keywords = compare(_fake(base), _fake(hooked), eps=0.2, layers=[1], positions=[2, 0], n_resamples=300, seed=3, **args)
    settings = EffectSettings(eps=0.2, layers=(1,), positions=(2, 0), n_resamples=300, seed=3)
    by_object = compare(_fake(base), _fake(hooked), settings=settings, **args)
    pd.testing.assert_frame_equal(by_keywords.frame, by_object.frame)
    assert by_object.metadata["settings"]["layers"] == [1] and by_object.metadata["settings"]["positions"] == [0, 2]
    with pytest.raises(EffectError, match="not both"):
        compare(_fake(base), _fake(hooked), settings=settings, eps=0.2, **args)
    for bad in (dict(eps=1.5), dict(confidence=0.0), dict(n_resamples=-1), dict(positions="all")):
        with pytest.raises(EffectError):
            EffectSettings(**bad)


def test_paired_bootstrap_edge_cases():
    rng = np.random.default_rng(1)
    data = rng.normal(1.0, 0.5, size=(40, 3))
    data[5:, 1] = np.nan  # only 5 sequences reach this column
    data[:, 2] = 0.7  # constant
    lo, hi = paired_bootstrap(data, n_resamples=2000, seed=0)
    m = data[:, 0].mean()
    assert lo[0] < m < hi[0] and hi[0] - lo[0] < 0.5
    assert lo[1] < np.nanmean(data[:, 1]) < hi[1]
    assert lo[2] == hi[2] == 0.7
    lo2, hi2 = paired_bootstrap(data[:, :1], n_resamples=2000, seed=0)
    assert (lo2[0], hi2[0]) == (lo[0], hi[0])  # columns are independent of their neighbours
    lo, hi = paired_bootstrap(np.array([[1.0], [2.0]]))
    assert np.isnan(lo[0]) and np.isnan(hi[0])  # two sequences: no interval
    lo, hi = paired_bootstrap(data, n_resamples=0)
    assert np.isnan(lo).all() and np.isnan(hi).all()  # intervals turned off, even for the constant column


# --------------------------------------------------------------------------- targets and moves


def test_target_rules():
    assert first_affected_layer(["blocks.2.hook_mlp_out"]) == 3
    assert first_affected_layer(["blocks.2.hook_resid_post"]) == 3
    assert first_affected_layer(["blocks.2.attn.hook_attn_scores"]) == 2
    assert first_affected_layer(["blocks.2.hook_resid_pre", "blocks.3.hook_mlp_out"]) == 2
    assert first_affected_layer(["hook_embed"]) == 0
    t = target_of(AblateMLP(layers=(1, 2), positions=(5,)), ["blocks.1.hook_mlp_out", "blocks.2.hook_mlp_out"], 4)
    assert t.layers == (2, 3) and t.positions == (5,)
    t = target_of(IsolateAggregation(layers=(1,), queries=(6,)), ["blocks.1.attn.hook_attn_scores"], 4)
    assert t.layers == (1, 2, 3) and t.positions == (6,)
    assert target_of(AblateMLP(layers=(3,)), ["blocks.3.hook_mlp_out"], 4).layers == ()


def test_vary_and_relocated_keep_kind_and_strength():
    iv = AmplifyVariance(layers=1, positions=(3, 5), factor=4.0)
    assert vary(iv, layer=2, position=7, strength=2.0) == AmplifyVariance(layers=2, positions=(7,), factor=2.0)
    assert relocated(iv, positions={3: 8, 5: 9}, layers={1: 0}) == AmplifyVariance(layers=0, positions=(8, 9), factor=4.0)
    combo = AblateMLP(layers=(1,), positions=(3,)) + IsolateAggregation(layers=(2,), queries=(3,))
    moved = relocated(combo, positions={3: 6})
    assert moved.parts[0].positions == (6,) and moved.parts[1].queries == (6,)
    assert vary(AblateMLP(layers=(1,)), layers=(2, 3)).layers == (2, 3)
    with pytest.raises(InterventionError, match="cannot vary 'nonsense'"):
        vary(iv, nonsense=1)
    with pytest.raises(InterventionError, match="finite"):
        vary(iv, strength=float("nan"))


def test_random_position_control_avoids_sinks_and_targets(llama, batch, ablated):
    iv = AmplifyVariance(layers=1, positions=(3, 5), factor=4.0)
    short = int(batch.lengths.min())
    flagged = sink_positions(ablated.clean)
    assert 0 in flagged
    seen = set()
    for seed in range(8):
        control, info = random_control(iv, ablated.clean, "random", model=llama, n_positions=short, seed=seed)
        assert info["mode"] == "position" and type(control) is AmplifyVariance
        assert control.layers == (1,) and control.factor == 4.0 and len(control.positions) == 2
        for q in control.positions:
            assert 1 <= q < short - 1 and q not in (3, 5) and q not in flagged
        seen.add(control.positions)
        again, _ = random_control(iv, ablated.clean, "random", model=llama, n_positions=short, seed=seed)
        assert again == control  # seeded
    assert len(seen) > 1


def test_random_layer_and_direction_controls(llama, batch, ablated):
    short = int(batch.lengths.min())
    control, info = random_control(AblateMLP(layers=(1,)), ablated.clean, "random", model=llama, n_positions=short, seed=3)
    assert info["mode"] == "layer" and control.layers[0] in (0, 2) and control.mode == "zero"
    d = tuple([1.0] + [0.0] * 63)
    iv = RescaleAlongSink(layers=(2,), factor=3.0, direction=d)
    control, info = random_control(iv, ablated.clean, "random", model=llama, n_positions=short, seed=0)
    assert info["mode"] == "direction" and control.factor == 3.0 and control.layers == (2,)
    v = np.array(control.direction)
    assert v.shape == (64,) and np.linalg.norm(v) == pytest.approx(1.0) and abs(v[0]) < 0.9
    with pytest.raises(EffectError, match="names no positions"):
        random_control(AblateMLP(layers=(1,)), ablated.clean, "position", model=llama, n_positions=short)
    with pytest.raises(EffectError, match="no fixed direction"):
        random_control(AblateMLP(layers=(1,)), ablated.clean, "direction", model=llama, n_positions=short)


def test_measure_effect_with_a_random_control(llama, batch):
    iv = AmplifyVariance(layers=1, positions=(4,), factor=6.0)
    effect = measure_effect(llama, batch, iv, control="random", positions="target", n_resamples=500, seed=2)
    moved = effect.metadata["control"]["moved"]
    q = moved["4"]
    assert effect.control_spec == f"amplify-variance:layers=1,positions={q},factor=6.0"
    assert effect.control_target.positions == (q,) and effect.target.positions == (4,)
    assert sorted(set(effect.rows("sink_score")["position"])) == sorted({0, 4, q})
    t = effect.rows("target_sink_score").iloc[0]
    # the difference of differences is computed from the runs themselves
    own = effect.intervened.sink_score[:, 2:, 4].mean(1) - effect.clean.sink_score[:, 2:, 4].mean(1)
    ctrl = effect.control.sink_score[:, 2:, q].mean(1) - effect.clean.sink_score[:, 2:, q].mean(1)
    assert t["did"] == pytest.approx((own - ctrl).mean(), abs=1e-7)
    assert effect.summary["kl"]["control"] > 0
    doc = json.loads(json.dumps(effect.to_json(), allow_nan=False))
    assert doc["control"]["mode"] == "position" and doc["control"]["seed"] == 2


def test_provenance_in_json(ablated):
    doc = json.loads(json.dumps(ablated.to_json(), allow_nan=False))
    assert doc["schema"] == "sinkscope.effect/1"
    assert doc["model"] == "tiny-llama" and doc["prepend_bos"] is False
    assert doc["intervention"] == "ablate-mlp:layers=0-3"
    assert doc["token_ids"] == [list(map(int, ids)) for ids in ablated.clean.token_ids]
    assert set(doc["versions"]) >= {"torch", "transformer-lens"}
    assert doc["settings"]["seed"] == 0 and doc["settings"]["eps"] == 0.3
    assert doc["positions"].startswith("0-based")
    assert {"target_sink_score", "next_token_loss", "kl", "first_token_sink_rate"} <= set(doc["summary"])
    assert len(doc["rows"]) == len(ablated.frame)


# --------------------------------------------------------------------------- real model


@pytest.mark.real
def test_smollm2_ablate_mlp_layer_3_effect_is_finite(smollm2):
    from circuits.probes import probe_texts

    batch = tokenize(smollm2, probe_texts(4), max_tokens=32)
    assert batch.tokens.shape == (4, 32)
    effect = measure_effect(smollm2, batch, "ablate-mlp:layer=3", positions="target", n_resamples=500)
    frame = effect.frame
    assert len(frame) > 0
    values = frame[["clean", "intervened", "delta", "ci_low", "ci_high"]].to_numpy(float)
    assert np.isfinite(values[frame["metric"] != "sink_score"]).all()
    assert np.isfinite(effect.rows("sink_score")[["clean", "intervened", "delta"]].to_numpy(float)).all()
    assert effect.summary["kl"]["delta"] > 0 and np.isfinite(effect.summary["kl"]["delta"])
    assert effect.target.layers == tuple(range(4, 30))
