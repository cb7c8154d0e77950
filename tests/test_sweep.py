"""Sweeps: prefix reuse equals a full intervened forward, variants share forwards, and the store
resumes (nothing re-run when done; an interrupted sweep finishes to the same table)."""

from __future__ import annotations

import dataclasses
import json
from contextlib import contextmanager

import numpy as np
import pandas as pd
import pytest

from circuits.measure import SinkMeasurement
from circuits.models import tiny_model
from circuits.probes import tokenize
from helpers import Interrupt, forward_counter
from interventions.base import InterventionError, registered_hooks
from interventions.effect import EffectError, measure_effect
from interventions.mlp import AblateMLP
from interventions.residual import AmplifyVariance
from interventions.sweep import LAYER_FIELDS, OTHER_FIELDS, grid_items, sweep
from tolerances import assert_frames_agree

TEXTS = [
    "The cat sat on the mat, and then it slept.",
    "A quick brown fox jumps over the lazy dog!",
    "Sinks store attention that has nowhere to go.",
]
VALUES = ["clean", "intervened", "delta", "ci_low", "ci_high", "n"]


@pytest.fixture(scope="module")
def llama():
    return tiny_model("llama")


@pytest.fixture(scope="module")
def batch(llama):
    return tokenize(llama, TEXTS)


@contextmanager
def attention_calls(model):
    """How many times each block's attention actually ran."""
    counts = [0] * len(model.blocks)
    handles = [
        block.attn.register_forward_pre_hook(lambda mod, args, i=i: counts.__setitem__(i, counts[i] + 1))
        for i, block in enumerate(model.blocks)
    ]
    try:
        yield counts
    finally:
        for h in handles:
            h.remove()


def _values(frame: pd.DataFrame, cols=VALUES) -> np.ndarray:
    return frame[cols].to_numpy(float)


# --------------------------------------------------------------------------- prefix reuse


SPECS = [
    "ablate-mlp:layers=2,positions=5",
    "ablate-mlp:layers=1|3,mode=mean",
    "amplify-variance:layers=1,positions=4,factor=5.0",
    "amplify-variance:layers=1|2,positions=4,factor=3.0,site=z",
    "amplify-variance:layers=2,positions=4,factor=3.0,site=resid_pre",
    "isolate:layers=2,queries=6",
    "rescale-sink:layers=1,factor=4.0",
    "sigmoid-attn:layers=3",
    "head-rmsnorm:layers=2,heads=1",
    'patch:hook_name=hook_embed,positions=2,source_text="Zebras run fast."',  # outside the blocks: full forward
]


@pytest.mark.numerical
def test_prefix_reuse_equals_a_full_intervened_forward(llama, batch, tmp_path):
    """Every item of a sweep (blocks >= min_layer only, variants stacked) equals measure_effect
    (full clean and intervened forwards) on every cell and the side effects, within the rounding
    of two float32 computations on other shapes (:func:`tolerances.assert_frames_agree`); the
    CIs are defined on the same rows (NaN in the same places)."""
    result = sweep(llama, batch, "{spec}", {"spec": SPECS}, tmp_path, positions=None, n_resamples=300, progress=False)
    assert registered_hooks(llama) == {}
    for spec in SPECS:
        item = result.frame[result.frame["iv_spec"] == spec].reset_index(drop=True)
        effect = measure_effect(llama, batch, spec, n_resamples=300)
        full = effect.frame
        assert list(item["metric"]) == list(full["metric"]) and item["spec"].iloc[0] == spec
        assert_frames_agree(item, full, effect, llama, batch.tokens, what=f"{spec}: ")
        np.testing.assert_array_equal(np.isnan(_values(item)), np.isnan(_values(full)))


def test_blocks_below_the_intervention_do_not_run(llama, batch, tmp_path):
    with attention_calls(llama) as counts:
        sweep(llama, batch, "ablate-mlp:layers={layer}", {"layer": [2]}, tmp_path, progress=False)
    assert counts == [1, 1, 2, 2]  # the clean pass runs every block once; the item only blocks 2, 3


@pytest.mark.numerical
def test_strengths_share_one_forward(llama, batch, tmp_path):
    """Four strengths stacked in one forward equal four forwards of one copy each, within the
    rounding of two float32 computations on other shapes; strength 1 (deviation mode) is the
    identity up to that rounding."""
    grid = {"strength": [0.5, 1.0, 2.0, 4.0]}
    iv = "amplify-variance:layer=1,positions=4,factor={strength}"
    with forward_counter(llama) as calls:
        stacked = sweep(llama, batch, iv, grid, tmp_path / "stacked", batch_size=4 * len(batch), positions="target", progress=False)
    assert len(calls) == 2  # one clean forward, one forward for the four stacked copies
    with forward_counter(llama) as calls:
        single = sweep(llama, batch, iv, grid, tmp_path / "single", batch_size=len(batch), positions="target", progress=False)
    assert len(calls) == 5
    for strength in grid["strength"]:
        pick = lambda f, s=strength: f[f["iv_strength"] == s].reset_index(drop=True)  # noqa: E731
        effect = measure_effect(llama, batch, iv.format(strength=strength), n_resamples=0)
        assert_frames_agree(pick(stacked.frame), pick(single.frame), effect, llama, batch.tokens, what=f"strength {strength}: ")
        if strength == 1.0:  # the identity: the intervened run is the clean run, up to the same rounding
            identity = pick(stacked.frame).assign(intervened=lambda f: f["clean"], delta=0.0)
            assert_frames_agree(pick(stacked.frame), identity, effect, llama, batch.tokens, what="identity: ")


def test_side_effects_off_skips_logits_only(llama, batch, tmp_path):
    """Without side effects the forwards stop after the last block; everything before it runs the
    same shapes on the same kernels, so the scores are identical, bit for bit."""
    on = sweep(llama, batch, "ablate-mlp:layers={layer}", {"layer": [1]}, tmp_path / "on", progress=False).frame
    off = sweep(llama, batch, "ablate-mlp:layers={layer}", {"layer": [1]}, tmp_path / "off", side_effects=False, progress=False).frame
    scores = lambda f: _values(f[f["metric"].isin(["sink_score", "sink_rate", "target_sink_score"])])  # noqa: E731
    np.testing.assert_array_equal(scores(on), scores(off))
    assert off.loc[off["metric"] == "kl", "delta"].isna().all()
    assert on.loc[on["metric"] == "kl", "delta"].iloc[0] > 0


# --------------------------------------------------------------------------- the resumable store


GRID = {"layer": [1, 2], "position": [3, 5, 7]}
TEMPLATE = "ablate-mlp:layers={layer},positions={position}"


def test_rerun_does_no_forward_pass(llama, batch, tmp_path):
    first = sweep(llama, batch, TEMPLATE, GRID, tmp_path, progress=False)
    assert first.metadata["n_run"] == 6 and first.table_path.name == "sweep.parquet"
    assert len(list((tmp_path / "items").glob("*.parquet"))) == 6
    with forward_counter(llama) as calls:
        again = sweep(llama, batch, TEMPLATE, GRID, tmp_path, progress=False)
    assert calls == []
    assert again.metadata["n_run"] == 0 and again.metadata["n_resumed"] == 6
    pd.testing.assert_frame_equal(first.frame, again.frame)
    # the same items asked for another way (a base intervention varied) are the same items
    with forward_counter(llama) as calls:
        varied = sweep(llama, batch, AblateMLP(layers=(1,), positions=(3,)), GRID, tmp_path, progress=False)
    assert calls == []
    pd.testing.assert_frame_equal(first.frame, varied.frame)


def test_interrupted_sweep_resumes_to_the_same_table(llama, batch, tmp_path):
    whole = sweep(llama, batch, TEMPLATE, GRID, tmp_path / "whole", batch_size=len(batch), progress=False)
    out = tmp_path / "resumed"
    # one sub-batch, one item per forward: call 1 is the clean pass, calls 2-3 items 1-2, call 4 item 3
    with forward_counter(llama, raise_at=4), pytest.raises(Interrupt):
        sweep(llama, batch, TEMPLATE, GRID, out, batch_size=len(batch), progress=False)
    assert registered_hooks(llama) == {}
    assert len(list((out / "items").glob("*.parquet"))) == 2
    assert not (out / "sweep.parquet").exists() and not list((out / "items").glob(".*"))
    with forward_counter(llama) as calls:
        resumed = sweep(llama, batch, TEMPLATE, GRID, out, batch_size=len(batch), progress=False)
    assert len(calls) == 1 + 4  # the clean pass again, and the four items left
    assert resumed.metadata["n_resumed"] == 2 and resumed.metadata["n_run"] == 4
    pd.testing.assert_frame_equal(resumed.frame, whole.frame)


def test_table_layout_and_metadata(llama, batch, tmp_path):
    result = sweep(llama, batch, TEMPLATE, GRID, tmp_path, format="csv", positions="target", progress=False)
    frame = result.frame
    assert (tmp_path / "sweep.csv").is_file() and (tmp_path / "sweep.json").is_file()
    assert list(frame.columns[:5]) == ["item", "item_key", "spec", "iv_layer", "iv_position"]
    items = frame.drop_duplicates("item")
    assert list(items["item"]) == list(range(6))  # grid order: the last key varies fastest
    assert list(zip(items["iv_layer"], items["iv_position"])) == [(1, 3), (1, 5), (1, 7), (2, 3), (2, 5), (2, 7)]
    assert list(items["spec"])[1] == "ablate-mlp:layers=1,positions=5"
    one = frame[frame["item"] == 4]  # layer 2, position 5: target = position 5 over layers 3
    target = one[one["metric"] == "target_sink_score"].iloc[0]
    assert sorted(one.loc[one["metric"] == "sink_score", "position"].unique()) == [0, 5]
    cell = one[(one["metric"] == "sink_score") & (one["layer"] == 3) & (one["position"] == 5)].iloc[0]
    assert target["delta"] == pytest.approx(cell["delta"])
    doc = json.loads((tmp_path / "sweep.json").read_text())
    assert doc["schema"] == "sinkscope.sweep/1" and doc["model"] == "tiny-llama" and doc["n_items"] == 6
    assert doc["grid"] == {"layer": [1, 2], "position": [3, 5, 7]}
    assert doc["made_by"] == f"template {TEMPLATE!r}" and doc["prepend_bos"] is False
    assert [i["key"] for i in doc["items"]] == list(items["item_key"])


def test_keys_depend_on_tokens_and_settings(llama, batch, tmp_path):
    a = sweep(llama, batch, TEMPLATE, {"layer": [1], "position": [3]}, tmp_path, progress=False)
    b = sweep(llama, batch, TEMPLATE, {"layer": [1], "position": [3]}, tmp_path, eps=0.2, progress=False)
    c = sweep(llama, batch.select([0, 1]), TEMPLATE, {"layer": [1], "position": [3]}, tmp_path, progress=False)
    keys = {r.frame["item_key"].iloc[0] for r in (a, b, c)}
    assert len(keys) == 3 and b.metadata["n_run"] == 1 and c.metadata["n_run"] == 1


def test_bad_grid_fails_before_any_forward_pass(llama, batch, tmp_path):
    with forward_counter(llama) as calls:
        with pytest.raises(InterventionError, match="layer 7 is out of range"):
            sweep(llama, batch, TEMPLATE, {"layer": [1, 7], "position": [3]}, tmp_path / "a", progress=False)
        with pytest.raises(InterventionError, match="finite"):
            sweep(llama, batch, AmplifyVariance(layers=1, positions=(3,), factor=2.0), {"strength": [1.0, float("nan")]},
                  tmp_path / "b", progress=False)
        with pytest.raises(InterventionError, match="cannot vary 'strength'"):
            sweep(llama, batch, AblateMLP(layers=(1,)), {"strength": [1.0]}, tmp_path / "b", progress=False)
        with pytest.raises(EffectError, match="cannot fill"):
            sweep(llama, batch, TEMPLATE, {"layer": [1]}, tmp_path / "c", progress=False)
        with pytest.raises(EffectError, match="empty"):
            sweep(llama, batch, TEMPLATE, {"layer": []}, tmp_path / "d", progress=False)
        with pytest.raises(EffectError, match="format"):
            sweep(llama, batch, TEMPLATE, GRID, tmp_path / "e", format="xlsx", progress=False)
    assert calls == []
    assert not any((tmp_path / d).exists() for d in "abcde")


def test_grid_items_order():
    assert grid_items({"a": [1, 2], "b": ["x", "y"]}) == [
        {"a": 1, "b": "x"}, {"a": 1, "b": "y"}, {"a": 2, "b": "x"}, {"a": 2, "b": "y"},
    ]


def test_every_measurement_array_is_spliced_or_known():
    """Every array of SinkMeasurement is classified by its declared axes: with a layer axis it is
    copied from the clean run below the start block (else the sweep would leave it NaN there)."""
    arrays = {
        f.name for f in dataclasses.fields(SinkMeasurement)
        if f.name not in ("model", "prepend_bos", "token_ids", "tokens", "metadata")
    }
    assert arrays == set(LAYER_FIELDS) | set(OTHER_FIELDS)
    assert set(LAYER_FIELDS) == {"alpha", "sink_score", "resid_norm", "cos_to_first", "first_resid", "top_dims", "top_values", "median_abs"}


# --------------------------------------------------------------------------- random controls


@pytest.mark.numerical
@pytest.mark.parametrize("mode", ["position", "layer"])
def test_sweep_controls_equal_measure_effect_controls(llama, batch, tmp_path, mode):
    """A sweep item with ``control=`` gets the control measure_effect draws for the same
    intervention and seed, and the same control and difference-of-differences columns, within
    the rounding of prefix reuse and stacking."""
    specs = ["ablate-mlp:layers=1,positions=3", "amplify-variance:layers=2,positions=4,factor=3.0"]
    result = sweep(llama, batch, "{spec}", {"spec": specs}, tmp_path, control=mode, seed=2, n_resamples=200, positions=None)
    for spec in specs:
        item = result.frame[result.frame["iv_spec"] == spec].reset_index(drop=True)
        effect = measure_effect(llama, batch, spec, control=mode, seed=2, n_resamples=200)
        assert item["control_spec"].iloc[0] == effect.control_spec
        assert_frames_agree(item, effect.frame, effect, llama, batch.tokens, what=f"{spec}: ")
        for col in ("control", "control_delta", "did"):
            np.testing.assert_allclose(item[col].to_numpy(float), effect.frame[col].to_numpy(float), rtol=1e-4, atol=1e-5,
                                       err_msg=f"{spec}: {col}")


def test_sweep_control_that_cannot_be_placed_fails_before_any_forward(llama, batch, tmp_path):
    with forward_counter(llama) as calls, pytest.raises(EffectError, match="names no positions"):
        sweep(llama, batch, "ablate-mlp:layers={layer}", {"layer": [1]}, tmp_path, control="position")
    assert calls == [] and registered_hooks(llama) == {}
