"""The meter protocol, the one driver and the shared statistics: every built-in meter is a Meter,
the driver puts length-sorted sub-batches back in batch order, stacked runs equal separate runs,
a new per-layer statistic takes a field and a line, and the one bootstrap keeps both published
random streams.

Tiny seeded Llama (conftest ``llama``); numbers are checked against ``run_with_cache`` or scipy.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest
import torch
from scipy import stats as scipy_stats

import circuits.measure as measure_module
from circuits import analyses
from circuits.driver import Run, drive, iter_batches
from circuits.errors import SinkscopeError
from circuits.measure import SinkMeasurement, SinkMeter, measure
from circuits.meter import Meter, MeterError, array
from circuits.probes import TokenBatch, tokenize
from circuits.stats import bootstrap_ci, nanmean, paired_bootstrap, valid_positions
from helpers import forward_counter
from interventions import effect as effect_module
from interventions.base import hooks_for
from interventions.effect import Metric, Target, compare
from interventions.mlp import AblateMLP
from interventions.sweep import LAYER_FIELDS, splice_prefix
from tolerances import assert_measurements_agree, path_bound

#: lengths 47, 13, 30, 3 (byte tokens, with BOS): sorted sub-batches of two are rows (0, 2) and (1, 3)
TEXTS = ["The cat sat on the mat and looked at the door.", "A short one.", "Numbers: 1, 2, 3, 4 and more!", "Hi"]


@pytest.fixture(scope="module")
def batch(llama) -> TokenBatch:
    return tokenize(llama, TEXTS, prepend_bos=True)


def test_every_built_in_meter_follows_the_protocol(llama):
    for meter in (SinkMeter(llama), analyses.MLPSiteMeter(llama), analyses.AttnOutMeter(llama),
                  analyses.SuperNeuronMeter(llama), analyses.KVMeter(llama)):
        assert isinstance(meter, Meter), type(meter).__name__


# --------------------------------------------------------------------------- the driver


@pytest.mark.numerical
def test_sub_batches_are_sorted_by_length_and_results_come_back_in_batch_order(llama, batch):
    seen = []
    meter = SinkMeter(llama)
    drive(llama, batch, Run([meter]), batch_size=2, on_logits=lambda sub, run, logits: seen.append(list(sub.rows)))
    order = list(np.argsort(-batch.lengths.numpy(), kind="stable"))
    assert seen == [order[:2], order[2:]] == [list(r) for r in iter_batches(batch, 2)]
    got = meter.result()
    assert got.token_ids == batch.token_ids and list(got.lengths) == batch.lengths.tolist()
    ref = measure(llama, batch, batch_size=len(batch), progress=False)  # one sub-batch, no reordering
    # other sub-batch shapes: the same sums in another order (tolerances.assert_measurements_agree)
    assert_measurements_agree(got, ref, llama, batch.tokens, fields=("alpha", "sink_score", "resid_norm", "top_dims", "next_token_loss"))


def test_measure_and_observe_batch_alike_by_default(llama):
    """One batching default (circuits.driver.BATCH_SIZE, BY_LENGTH): measure and observe, called
    without batch arguments, hand the model the same sub-batches of ten mixed-length texts."""
    from circuits.driver import BATCH_SIZE

    texts = [TEXTS[i % len(TEXTS)] + " x" * i for i in range(10)]
    many = tokenize(llama, texts, prepend_bos=True)

    def sub_batches(run):
        seen = []
        hook = ("blocks.0.hook_resid_pre", lambda x, hook: None)
        run(lambda sub: seen.append(list(sub.rows)) or [hook])
        return seen

    by_measure = sub_batches(lambda hooks: measure(llama, many, hooks=hooks, progress=False))
    by_observe = sub_batches(lambda hooks: analyses.observe(llama, many, [SinkMeter(llama)], hooks=hooks))
    assert by_measure == by_observe == [list(r) for r in iter_batches(many, BATCH_SIZE, by_length=True)]
    assert [len(r) for r in by_measure] == [8, 2] and by_measure[0] != list(range(8))  # grouped by length, not in order


@pytest.mark.numerical
def test_runs_are_separate_forwards_stacked_runs_one(llama, batch):
    iv = AblateMLP(layers=(1,))
    factory = hooks_for(llama, iv, batch)
    logits = {}

    def keep(sub, run, out):
        logits.setdefault(run, []).append(out.shape)

    separate = [SinkMeter(llama), SinkMeter(llama)]
    with forward_counter(llama) as calls:
        drive(llama, batch, [Run([separate[0]]), Run([separate[1]], factory)], batch_size=4, on_logits=keep)
    assert len(calls) == 2 and logits[0] == logits[1] == [(4, 47, llama.cfg.d_vocab)]
    stacked = [SinkMeter(llama), SinkMeter(llama)]
    with forward_counter(llama) as calls:
        drive(llama, batch, [Run([stacked[0]]), Run([stacked[1]], factory)], batch_size=4, stacked=True)
    assert len(calls) == 1
    for a, b in zip(separate, stacked):  # stacked copies: a batch twice as tall, the same sums in another order
        assert_measurements_agree(a.result(), b.result(), llama, batch.tokens, fields=("sink_score", "next_token_loss"))
    assert not np.allclose(separate[0].result().resid_norm, separate[1].result().resid_norm, equal_nan=True)


def test_without_logits_meters_get_none_and_the_forward_stops_after_the_last_block(llama, batch):
    meter, seen = SinkMeter(llama), []
    drive(llama, batch, Run([meter]), logits=False, on_logits=lambda sub, run, out: seen.append(out))
    assert seen == [None] and np.isnan(meter.result().next_token_loss).all()


def test_an_empty_batch_is_a_user_error(llama, batch):
    empty = TokenBatch(batch.tokens[:0], batch.lengths[:0], True, [])
    with pytest.raises(MeterError, match="empty batch") as err:
        drive(llama, empty, Run([SinkMeter(llama)]))
    assert isinstance(err.value, SinkscopeError)
    with pytest.raises(MeterError, match="no batch was measured"):
        SinkMeter(llama).result()


# --------------------------------------------------------------------------- a new statistic


@dataclass(kw_only=True)
class WithPeak(SinkMeasurement):
    """Edit 1 of 2: the field, with its axes."""

    resid_peak: np.ndarray = array("seq", "layer", "pos")  # max |h| over dims


class PeakMeter(SinkMeter):
    result_type = WithPeak


def test_a_new_per_layer_statistic_takes_a_field_and_a_line(llama, batch, monkeypatch):
    """A field (``WithPeak``) and the line computing it in the residual hook are all it takes:
    allocation, the hook write, concatenation across sub-batches and reordering, ``select``,
    the sweep's layer classification and ``splice_prefix`` follow from the declared axes; one
    more :class:`~interventions.effect.Metric` puts its delta in every effect table."""
    base = measure_module.residual_statistics

    def with_peak(resid, lengths):  # edit 2 of 2: the line that computes it
        out = base(resid, lengths)
        out["resid_peak"] = torch.where(valid_positions(lengths, resid.shape[1]), resid.abs().amax(-1), torch.nan)
        return out

    monkeypatch.setattr(measure_module, "residual_statistics", with_peak)
    meter = PeakMeter(llama)
    drive(llama, batch, Run([meter]), batch_size=2)  # two sub-batches of different widths, sorted
    meas = meter.result()
    assert isinstance(meas, WithPeak) and meas.resid_peak.shape == (4, llama.cfg.n_layers, 47)
    _, cache = llama.run_with_cache(batch.tokens)
    valid = batch.valid.numpy()
    for layer in range(llama.cfg.n_layers):
        expect = cache[f"blocks.{layer}.hook_resid_post"].abs().amax(-1).numpy()
        np.testing.assert_allclose(meas.resid_peak[:, layer][valid], expect[valid], rtol=1e-5)
    assert np.isnan(meas.resid_peak.transpose(0, 2, 1)[~valid]).all()  # pads

    picked = meas.select([2, 0])
    np.testing.assert_array_equal(picked.resid_peak, meas.resid_peak[[2, 0]])
    assert "resid_peak" in {n for n, a in WithPeak.axes().items() if "layer" in a.names}
    assert set(LAYER_FIELDS) < set(WithPeak.axes())  # the sweep's list is derived the same way
    other = meas.select([0, 1, 2, 3])
    other.resid_peak = other.resid_peak + 1.0
    spliced = splice_prefix(other, meas, start=2)
    np.testing.assert_array_equal(spliced.resid_peak[:, :2], meas.resid_peak[:, :2])
    np.testing.assert_array_equal(spliced.resid_peak[:, 2:], other.resid_peak[:, 2:])

    # optional third edit: its delta as rows of every effect table
    peak = Metric("resid_peak_first", lambda run, cells: nanmean(run.meas.resid_peak[:, :, 0], axis=1)[:, None], lambda cells: ([None], [0]))
    monkeypatch.setattr(effect_module, "METRIC_TABLE", (*effect_module.METRIC_TABLE, peak))
    eff = compare(meas, other, target=Target((1,), (0,), "test"), intervention="ablate-mlp:layers=0", n_resamples=0)
    row = eff.rows("resid_peak_first").iloc[0]
    assert row["delta"] == pytest.approx(1.0) and row["position"] == 0


# --------------------------------------------------------------------------- statistics


def test_valid_positions():
    lengths = torch.tensor([3, 1])
    assert valid_positions(lengths, 4).tolist() == [[True, True, True, False], [True, False, False, False]]
    assert valid_positions(lengths, 4, offset=1).tolist() == [[True, True, False, False], [False, False, False, False]]


def test_one_bootstrap_keeps_both_random_streams():
    """``legacy_rng`` is scipy's ``random_state=seed`` (the published Sink_k^eps CIs), the default
    ``rng=default_rng(seed)`` (effect tables); both in the dtype given."""
    rng = np.random.default_rng(1)
    x = (100.0 * rng.integers(0, 270, size=60) / np.float32(270.0)).astype(np.float32)
    ref = scipy_stats.bootstrap((x,), np.mean, n_resamples=2000, random_state=0).confidence_interval
    lo, hi = bootstrap_ci(x, seed=0, legacy_rng=True)
    # the same resamples; their float32 means are summed in batches of another shape than scipy's
    # one call, so equal to float32 rounding of a 60-term sum (numpy 2 happens to match bit for bit,
    # numpy 1.26, the lower bound, does not): the rounding model of tests/tolerances.py
    assert (lo[0], hi[0]) == pytest.approx((ref.low, ref.high), rel=float(path_bound(0, len(x))), abs=0)
    ref = scipy_stats.bootstrap((x.astype(np.float64),), np.mean, n_resamples=2000, rng=np.random.default_rng(0)).confidence_interval
    lo, hi = paired_bootstrap(x)
    assert (lo[0], hi[0]) == pytest.approx((ref.low, ref.high), rel=1e-12)


def test_to_frame_covers_every_field_from_the_axis_declarations(llama, batch):
    """One row per real (sequence, layer, position); alpha per head, top dimensions per rank,
    the loss and layer median repeated over the axes they lack; first_resid has its own table."""
    meas = measure(llama, batch, progress=False)
    frame = meas.to_frame()
    n, layers, heads = meas.n_sequences, meas.n_layers, meas.n_heads
    assert len(frame) == layers * int(meas.lengths.sum())
    row = frame[(frame["sequence"] == 1) & (frame["layer"] == 2) & (frame["position"] == 3)].iloc[0]
    assert row["token"] == meas.tokens[1][3]
    assert [row[f"alpha_h{h}"] for h in range(heads)] == pytest.approx(meas.alpha[1, 2, :, 3].tolist())
    assert row["sink_score"] == pytest.approx(meas.sink_score[1, 2, 3]) and row["median_abs"] == pytest.approx(meas.median_abs[1, 2])
    assert row["next_token_loss"] == pytest.approx(meas.next_token_loss[1, 3]) and row["top_dims_r0"] == meas.top_dims[1, 2, 3, 0]
    assert frame.attrs["left_out"] == ["first_resid"]
    vectors = meas.to_frame(index=("seq", "layer", "d_model"))
    assert len(vectors) == n * layers * llama.cfg.d_model
    assert vectors.set_index(["sequence", "layer", "dim"]).loc[(1, 2, 5), "first_resid"] == pytest.approx(meas.first_resid[1, 2, 5])
