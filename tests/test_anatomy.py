"""Specification tests for circuits.anatomy, on hand-built SinkMeasurements (no model).

Rules checked (docs/science.md, Wong et al. and Sun et al.; positions 0-based):

* a token t > 0 is flagged at layer l when |cos(h_t^l, h_0^l)| > cos threshold (strictly);
* lifetime = number of flagged layers (not necessarily contiguous), start layer = first one;
* classes: primary-like if lifetime >= L - primary_margin, secondary if
  min_lifetime < lifetime < L - primary_margin, otherwise noise (dropped unless asked for);
  ``SecondaryThresholds.for_depth`` scales the authors' (4, 15) by L/48, rounding half up;
* peak_score = the largest sink score over the flagged layers only; score_ratio = that score
  over the median sink score of the sequence's non-first tokens at the peak layer;
* sink window: from the layer after the largest rise of ||h_0||, through the layer after the
  largest later drop, returned half-open [start, stop);
* primary sink layers: share over heads and sequences of alpha_0 > eps;
* massive activations: |value| >= min_value and |value| / median|h| >= min_ratio.

Arrays are float64 so that thresholds like 0.9 are compared exactly.
"""

from __future__ import annotations

import numpy as np
import pytest

from circuits.anatomy import (
    SecondaryThresholds,
    distinct_contexts,
    massive_activations,
    massive_dimensions,
    primary_sink_layers,
    secondary_sinks,
    sink_window,
)
from circuits.measure import TOP_DIMS, SinkMeasurement

D_MODEL = 8


def make_measurement(n_layers: int, lengths: list[int], n_heads: int = 2, **fields) -> SinkMeasurement:
    """A SinkMeasurement with every field of the right shape: NaN at pad positions, neutral values
    (alpha 0.1, sink score 0.1, cos 0.2, norm 1, median 1) elsewhere; ``fields`` override."""
    n, t = len(lengths), max(lengths)
    valid = np.arange(t)[None, :] < np.array(lengths)[:, None]  # [N, T]

    def filled(value, shape_after_pos=(), layered=True):
        shape = (n, n_layers, t, *shape_after_pos) if layered else (n, t, *shape_after_pos)
        a = np.full(shape, value, dtype=np.float64)
        mask = valid[:, None, :] if layered else valid
        mask = mask.reshape(mask.shape + (1,) * len(shape_after_pos))
        return np.where(mask, a, np.nan)

    alpha = np.where(valid[:, None, None, :], 0.1, np.nan) * np.ones((n, n_layers, n_heads, t))
    cos = filled(0.2)
    cos[:, :, 0] = 1.0  # h_0 is aligned with itself
    defaults = dict(
        model="hand",
        prepend_bos=False,
        token_ids=[list(range(k)) for k in lengths],
        tokens=[[f"tok{s}_{i}" for i in range(k)] for s, k in enumerate(lengths)],
        lengths=np.array(lengths),
        alpha=alpha,
        sink_score=filled(0.1),
        resid_norm=filled(1.0),
        cos_to_first=cos,
        first_resid=np.ones((n, n_layers, D_MODEL)),
        top_dims=np.where(valid[:, None, :, None], np.arange(TOP_DIMS), -1) * np.ones((n, n_layers, t, TOP_DIMS), dtype=int),
        top_values=filled(1.0, (TOP_DIMS,)),
        median_abs=np.ones((n, n_layers)),
        next_token_loss=filled(1.0, layered=False),
    )
    defaults.update(fields)
    return SinkMeasurement(**defaults)


# ============================================================================ thresholds


def test_for_depth_scales_the_authors_constants():
    # the authors' constants at the reference depth 48: 4 < lifetime < L - 15
    assert SecondaryThresholds.for_depth(48) == SecondaryThresholds(cos=0.9, min_lifetime=4, primary_margin=15)
    # 30 layers (SmolLM2): 4*30/48 = 2.5 -> 3 (half up), 15*30/48 = 9.375 -> 9
    th30 = SecondaryThresholds.for_depth(30)
    assert (th30.min_lifetime, th30.primary_margin, th30.cos) == (3, 9, 0.9)
    # 18 layers (Gemma 3 270M): 4*18/48 = 1.5 -> 2, 15*18/48 = 5.625 -> 6
    th18 = SecondaryThresholds.for_depth(18)
    assert (th18.min_lifetime, th18.primary_margin) == (2, 6)
    # never below 1, and the cos threshold is a parameter
    assert SecondaryThresholds.for_depth(2).min_lifetime >= 1
    assert SecondaryThresholds.for_depth(30, cos=0.8).cos == 0.8


@pytest.mark.parametrize(
    "n_layers, lifetime, kind",
    [
        # 30 layers: secondary iff 3 < lifetime < 30 - 9 = 21; primary-like iff lifetime >= 21
        (30, 1, "noise"), (30, 3, "noise"), (30, 4, "secondary"), (30, 20, "secondary"),
        (30, 21, "primary-like"), (30, 30, "primary-like"),
        # 18 layers: secondary iff 2 < lifetime < 18 - 6 = 12; primary-like iff lifetime >= 12
        (18, 2, "noise"), (18, 3, "secondary"), (18, 11, "secondary"), (18, 12, "primary-like"),
    ],
)
def test_classify_boundaries(n_layers, lifetime, kind):
    assert SecondaryThresholds.for_depth(n_layers).classify(lifetime, n_layers) == kind


# ============================================================================ secondary_sinks

# Sequence 0: 10 layers, 6 tokens. Thresholds cos 0.9, min_lifetime 2, primary_margin 3:
#   noise if lifetime <= 2, secondary if 3..6, primary-like if >= 10 - 3 = 7.
TH = SecondaryThresholds(cos=0.9, min_lifetime=2, primary_margin=3)


def _secondary_fixture() -> SinkMeasurement:
    n_layers, lengths = 10, [6, 3]
    meas = make_measurement(n_layers, lengths)
    cos, score = meas.cos_to_first, meas.sink_score
    score[:, :, 0] = 0.6
    # --- sequence 0
    cos[0, :, 1] = 0.9  # exactly at the threshold at every layer: never flagged (strict >)
    cos[0, [2, 3, 4], 2] = [0.95, -0.97, 0.91]  # |cos| counts: lifetime 3, start 2 -> secondary
    score[0, [2, 3, 4], 2] = [0.3, 0.5, 0.4]
    score[0, 8, 2] = 0.9  # higher, but at an unflagged layer: not the peak
    cos[0, 0:7, 3] = 0.99  # layers 0..6: lifetime 7 -> primary-like
    score[0, 6, 3] = 0.3
    cos[0, [5, 6], 4] = 0.95  # lifetime 2 -> noise
    cos[0, [1, 3, 5, 8], 5] = 0.92  # non-contiguous: lifetime 4, start 1 -> secondary
    # (position 5 is the last token: its sink score is NaN, as measure() leaves it)
    score[0, :, 5] = np.nan
    # --- sequence 1 (length 3): pad positions hold garbage cos that must be ignored
    cos[1, :, 1] = 0.98  # all 10 layers -> primary-like
    cos[1, :, 3:] = 0.99
    score[1, :, 2] = np.nan  # last real token
    return meas


def test_secondary_sinks_rows_by_hand():
    table = secondary_sinks(_secondary_fixture(), TH)
    assert list(table.columns) == [
        "sequence", "position", "token", "start_layer", "lifetime", "kind",
        "peak_score", "peak_layer", "score_ratio", "max_abs_cos",
    ]
    rows = {(r.sequence, r.position): r for r in table.itertuples()}
    # position 1 of seq 0 (cos == 0.9), the noise token (seq 0, pos 4) and pad positions are absent
    assert sorted(rows) == [(0, 2), (0, 3), (0, 5), (1, 1)]

    r = rows[(0, 2)]
    assert (r.start_layer, r.lifetime, r.kind) == (2, 3, "secondary")
    assert r.token == "tok0_2"
    # peak over flagged layers 2,3,4 (.3 .5 .4) -> .5 at layer 3; the .9 at layer 8 is ignored
    assert (r.peak_score, r.peak_layer) == (0.5, 3)
    # median score of seq 0's non-first tokens at layer 3: [.1, .5, .1, .1, NaN] -> .1; .5/.1 = 5
    assert r.score_ratio == pytest.approx(5.0)
    assert r.max_abs_cos == pytest.approx(0.97)  # |-0.97|

    r = rows[(0, 3)]
    assert (r.start_layer, r.lifetime, r.kind) == (0, 7, "primary-like")
    # peak .3 at layer 6; median at layer 6: [.1, .1, .3, .1, NaN] -> .1; ratio 3
    assert (r.peak_score, r.peak_layer) == (0.3, 6)
    assert r.score_ratio == pytest.approx(3.0)

    r = rows[(0, 5)]
    assert (r.start_layer, r.lifetime, r.kind) == (1, 4, "secondary")
    # no sink score at all (last token): NaN peak, peak_layer -1, NaN ratio
    assert np.isnan(r.peak_score) and r.peak_layer == -1 and np.isnan(r.score_ratio)

    r = rows[(1, 1)]
    assert (r.start_layer, r.lifetime, r.kind) == (0, 10, "primary-like")


def test_a_sink_in_a_shared_prefix_is_one_context():
    """Sequences 0 and 1 share tokens 0-2 (a system prompt) and differ from 3 on; sequence 2
    differs from 1. Position 2 in sequences 0 and 1 is one context; position 4 is two; position
    2 of sequence 2 is its own."""
    import pandas as pd

    meas = make_measurement(2, [6, 6, 6], token_ids=[[1, 2, 3, 4, 5, 6], [1, 2, 3, 9, 9, 9], [7, 2, 3, 4, 5, 6]])
    table = pd.DataFrame({"sequence": [0, 1, 0, 1, 2], "position": [2, 2, 4, 4, 2]})
    assert distinct_contexts(meas, table) == 4
    assert distinct_contexts(meas, table.iloc[:2]) == 1
    assert distinct_contexts(meas, table.iloc[:0]) == 0


def test_secondary_sinks_include_noise():
    table = secondary_sinks(_secondary_fixture(), TH, include_noise=True)
    noise = table[table.kind == "noise"]
    assert noise[["sequence", "position", "start_layer", "lifetime"]].values.tolist() == [[0, 4, 5, 2]]
    # scores are .1 at both flagged layers: peak .1 at the first of them (5), ratio .1/.1 = 1
    assert noise.peak_layer.item() == 5 and noise.score_ratio.item() == pytest.approx(1.0)
    assert len(table) == 5


def test_secondary_sinks_cos_threshold_is_strict_and_a_parameter():
    meas = _secondary_fixture()
    # lower the threshold below 0.9: position 1 of sequence 0 (cos exactly 0.9 everywhere) is now
    # flagged at all 10 layers, and the 0.2 background still is not
    loose = SecondaryThresholds(cos=0.85, min_lifetime=2, primary_margin=3)
    table = secondary_sinks(meas, loose)
    row = table[(table.sequence == 0) & (table.position == 1)]
    assert row.lifetime.item() == 10 and row.kind.item() == "primary-like"


def test_secondary_sinks_with_the_sink_window():
    meas = _secondary_fixture()
    # seq 0: ||h_0|| per layer; largest rise 1->2 (+8.5), largest later drop 4->5 (-8.5):
    # window = layers 2..5, i.e. [2, 6)
    meas.resid_norm[0, :, 0] = [1, 1.5, 10, 11, 11.5, 3, 2.5, 2.4, 2.3, 2.2]
    # seq 1: the norm only rises (by 1 each layer): window from layer 1 to the end, [1, 10)
    meas.resid_norm[1, :, 0] = np.arange(1, 11)
    assert sink_window(meas, 0) == (2, 6)
    assert sink_window(meas, 1) == (1, 10)
    table = secondary_sinks(meas, TH, use_window=True)
    got = {(r.sequence, r.position): (r.start_layer, r.lifetime, r.kind) for r in table.itertuples()}
    assert got == {
        (0, 2): (2, 3, "secondary"),  # layers 2,3,4 all inside
        (0, 3): (2, 4, "secondary"),  # 0..6 clipped to 2..5; still classified against L = 10
        # (0, 4): layers 5,6 -> only 5 -> lifetime 1, noise; (0, 5): 1,3,5,8 -> 3,5 -> noise
        (1, 1): (1, 9, "primary-like"),  # 0..9 clipped to 1..9
    }


@pytest.mark.parametrize(
    "n_layers, lifetimes, kinds",
    [
        # default thresholds = for_depth(L): 30 layers -> 3 < lifetime < 21
        (30, [3, 4, 20, 21], [None, "secondary", "secondary", "primary-like"]),
        # 18 layers -> 2 < lifetime < 12
        (18, [2, 3, 11, 12], [None, "secondary", "secondary", "primary-like"]),
    ],
)
def test_secondary_sinks_default_thresholds_follow_depth(n_layers, lifetimes, kinds):
    meas = make_measurement(n_layers, [len(lifetimes) + 2])
    for j, life in enumerate(lifetimes):
        meas.cos_to_first[0, :life, j + 1] = 0.95
    table = secondary_sinks(meas)
    got = dict(zip(table.position, table.kind))
    expected = {j + 1: k for j, k in enumerate(kinds) if k is not None}
    assert got == expected
    assert dict(zip(table.position, table.lifetime)) == {p: lifetimes[p - 1] for p in expected}
    assert (table.start_layer == 0).all()


def test_secondary_sinks_empty_table_keeps_its_columns():
    table = secondary_sinks(make_measurement(4, [5]))
    assert table.empty and "kind" in table.columns and "score_ratio" in table.columns


# ============================================================================ sink_window


def _norms(values) -> SinkMeasurement:
    meas = make_measurement(len(values), [2])
    meas.resid_norm[0, :, 0] = values
    return meas


def test_sink_window_uses_the_largest_later_drop():
    # diffs: -4 (0->1), +9 (1->2), -1 (2->3), -5 (3->4), +2 (4->5)
    # largest rise 1->2 -> start at layer 2; largest drop AFTER it: 3->4 -> through layer 4.
    # The earlier -4 drop (before the rise) does not count.
    assert sink_window(_norms([5, 1, 10, 9, 4, 6]), 0) == (2, 5)


def test_sink_window_without_a_later_drop_runs_to_the_last_layer():
    assert sink_window(_norms([1, 2, 8, 9]), 0) == (2, 4)  # rise 1->2 (+6), no drop after
    assert sink_window(_norms([1, 2, 8, 8]), 0) == (2, 4)  # flat is not a drop
    assert sink_window(_norms([3.0]), 0) == (0, 1)  # one layer: the whole model


def test_sink_window_drop_right_after_the_rise():
    # rise 0->1, drop 1->2: window is [1, 3) = layers 1 and 2
    assert sink_window(_norms([1, 10, 2, 2]), 0) == (1, 3)


# ============================================================================ primary_sink_layers


def test_primary_sink_layers_by_hand():
    meas = make_measurement(2, [3, 2], n_heads=2)
    # alpha_0 per (sequence, layer, head)
    meas.alpha[:, 0, :, 0] = [[0.5, 0.1], [0.4, 0.2]]
    meas.alpha[:, 1, :, 0] = [[0.25, 0.9], [0.1, 0.2]]
    meas.sink_score[:, 0, 0] = [0.6, 0.4]
    meas.sink_score[:, 1, 0] = [0.2, 0.3]
    table = primary_sink_layers(meas, eps=0.3)
    assert table.layer.tolist() == [0, 1]
    # layer 0: .5 .1 .4 .2 -> 2 of 4 heads above .3 -> share .5 -> holds the sink (>= .5)
    # layer 1: .25 .9 .1 .2 -> 1 of 4 -> share .25 -> does not
    np.testing.assert_allclose(table.head_share_alpha0_gt_eps, [0.5, 0.25])
    assert table.holds_sink.tolist() == [True, False]
    # mean alpha_0: (.5+.1+.4+.2)/4 = .3, (.25+.9+.1+.2)/4 = .3625
    np.testing.assert_allclose(table.mean_alpha0, [0.3, 0.3625])
    # the first token's sink score averaged over sequences: (.6+.4)/2 = .5, (.2+.3)/2 = .25
    np.testing.assert_allclose(table.primary_sink_score, [0.5, 0.25])
    # eps and min_share are parameters: eps .15 -> layer 0: .5 .4 .2 -> .75; layer 1: .25 .9 .2 -> .75
    loose = primary_sink_layers(meas, eps=0.15, min_share=0.8)
    np.testing.assert_allclose(loose.head_share_alpha0_gt_eps, [0.75, 0.75])
    assert loose.holds_sink.tolist() == [False, False]


# ============================================================================ massive activations


def _massive_fixture() -> SinkMeasurement:
    # 2 sequences, 2 layers, 3 positions; sequence 1 has length 2 (position 2 is pad)
    meas = make_measurement(2, [3, 2], median_abs=np.array([[0.1, 0.5], [1.0, 1.0]]))
    dims, vals = meas.top_dims, meas.top_values
    # seq 0, layer 0 (median .1)
    dims[0, 0, 0], vals[0, 0, 0] = [7, 3, 1, 0], [-150.0, 20.0, 1.0, 0.5]  # |-150| >= 100, 1500x: massive
    dims[0, 0, 1], vals[0, 0, 1] = [7, 3, 1, 0], [99.0, 1.0, 0.5, 0.1]  # 990x but < 100: no
    # seq 0, layer 1 (median .5)
    dims[0, 1, 0], vals[0, 1, 0] = [7, 2, 1, 0], [600.0, 3.0, 2.0, 1.0]  # 1200x: massive
    dims[0, 1, 1], vals[0, 1, 1] = [7, 2, 1, 0], [110.0, 3.0, 2.0, 1.0]  # 220x: no
    dims[0, 1, 2], vals[0, 1, 2] = [5, 2, 1, 0], [-500.0, 3.0, 2.0, 1.0]  # exactly 1000x: massive (>=)
    # seq 1 (median 1): big but only 300x
    dims[1, 0, 0], vals[1, 0, 0] = [7, 2, 1, 0], [300.0, 3.0, 2.0, 1.0]
    return meas


def test_massive_activations_by_hand():
    table = massive_activations(_massive_fixture())
    got = table[["sequence", "layer", "position", "dim", "value", "median_abs", "ratio"]].values.tolist()
    assert sorted(got) == [
        [0, 0, 0, 7, -150.0, 0.1, pytest.approx(1500.0)],  # 150 / .1
        [0, 1, 0, 7, 600.0, 0.5, pytest.approx(1200.0)],  # 600 / .5
        [0, 1, 2, 5, -500.0, 0.5, pytest.approx(1000.0)],  # 500 / .5
    ]
    assert set(table.token) == {"tok0_0", "tok0_2"}


def test_massive_activations_thresholds_are_parameters():
    meas = _massive_fixture()
    # min_ratio 200: adds seq 0 layer 1 pos 1 (110, 220x) and seq 1 (300, 300x); 99 still too small
    table = massive_activations(meas, min_ratio=200)
    assert len(table) == 5
    assert 99.0 not in table.value.tolist()
    # min_value 50 alone is not enough for the 99: its ratio 990 is below the default 1000
    assert len(massive_activations(meas, min_value=50)) == 3
    # min_value 50 and min_ratio 900: adds the 99 (990x)
    assert 99.0 in massive_activations(meas, min_value=50, min_ratio=900).value.tolist()


def test_massive_dimensions_summary():
    table = massive_dimensions(_massive_fixture())
    # sorted by the largest |value|: dim 7 (600) then dim 5 (500)
    assert table.dim.tolist() == [7, 5]
    d7, d5 = table.iloc[0], table.iloc[1]
    assert (d7.first_layer, d7.last_layer, d7.n_occurrences) == (0, 1, 2)
    assert d7.max_abs_value == 600.0 and d7.max_ratio == pytest.approx(1500.0)  # |-150| / .1
    assert d7.share_at_position_0 == 1.0  # both occurrences at position 0
    assert (d5.first_layer, d5.last_layer, d5.n_occurrences) == (1, 1, 1)
    assert d5.max_abs_value == 500.0 and d5.share_at_position_0 == 0.0


def test_massive_dimensions_empty():
    table = massive_dimensions(make_measurement(2, [3]))  # values 1, median 1: nothing massive
    assert table.empty
    assert {"dim", "first_layer", "max_abs_value", "share_at_position_0"} <= set(table.columns)
