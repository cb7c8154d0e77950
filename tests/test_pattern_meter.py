"""A statistic of the attention pattern is one reducer: the same function reads the fused blocks
and, where a layer falls back to eager, the whole pattern (:mod:`circuits.pattern_meter`)."""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass

import numpy as np
import pytest
import torch

from circuits.analyses import observe
from circuits.blockwise import PatternBlock
from circuits.meter import array, axes_of, per_sequence
from circuits.models import tiny_model
from circuits.pattern_meter import PatternMeter, whole_pattern
from circuits.probes import tokenize
from interventions.keybias import DropSinkAttention
from tolerances import assert_within, longest_sum, path_bound

TEXTS = ["The cat sat on the mat and looked at the dog for a long while, then slept.", "Sinks store attention."]


class PeakAttention:
    """A user's reducer: the largest attention any real query gives each key, per head."""

    def __init__(self, lengths):
        self.lengths, self.peak = lengths, None

    def __call__(self, block: PatternBlock) -> None:
        probs = block.real_queries(self.lengths).probs  # [batch, kv_head, query, group, key]
        b, hk, _, g, _ = probs.shape
        if self.peak is None:
            self.peak = probs.new_zeros(b, hk, g, block.kv_length)
        self.peak[..., block.lo : block.hi] = torch.maximum(self.peak[..., block.lo : block.hi], probs.amax(dim=2))

    def result(self):
        b, hk, g, t = self.peak.shape
        return self.peak.view(b, hk * g, t)


@dataclass
class Peaks:
    lengths: np.ndarray = per_sequence(np.int64)
    peak: np.ndarray = array("seq", "layer", "head", "pos")


class PeakMeter(PatternMeter):
    """The whole meter a user writes: a reducer per layer and where its result goes."""

    def __init__(self, model):
        super().__init__(model, axes_of(Peaks), {"layer": model.cfg.n_layers, "head": model.cfg.n_heads})

    def reducer(self, layer):
        return PeakAttention(self._current.lengths)

    def collect(self, layer, reducer):
        self.put("peak", layer, reducer.result())

    def result(self):
        return Peaks(lengths=self.lengths, **self.arrays())


def brute_force_peaks(model, batch, iv=None) -> np.ndarray:
    """max over real queries of hook_pattern, with intervention ``iv`` applied: [N, L, H, T]."""
    names = [f"blocks.{l}.attn.hook_pattern" for l in range(model.cfg.n_layers)]
    seen = {}
    keep = [(n, lambda x, hook: seen.__setitem__(hook.name, x.detach().float())) for n in names]
    with torch.no_grad(), (iv.applied(model, batch) if iv is not None else contextlib.nullcontext()):
        model.run_with_hooks(batch.tokens, fwd_hooks=keep)
    out = []
    for n in names:
        p = seen[n].clone()
        t = p.shape[-1]
        pad_q = torch.arange(t)[None, :] >= batch.lengths[:, None]
        p[pad_q[:, None, :, None].expand_as(p)] = 0.0
        peak = p.amax(dim=2)  # [N, H, T]
        peak[(torch.arange(t)[None, :] >= batch.lengths[:, None])[:, None, :].expand_as(peak)] = float("nan")
        out.append(peak)
    return torch.stack(out, 1).numpy()


def test_a_users_reducer_reads_fused_and_eager_layers_alike(caplog):
    """DropSinkAttention edits layer 1's scores: layer 1 falls back to eager (one line says so)
    and hands its whole pattern to the same reducer; layers 0, 2, 3 stay fused. Every layer
    equals the brute-force maximum over hook_pattern within the rounding model."""
    model = tiny_model("llama")
    batch = tokenize(model, TEXTS)
    iv = DropSinkAttention(layers=(1,))
    with caplog.at_level(logging.WARNING, logger="sinkscope"):
        (got,) = observe(model, batch, [PeakMeter(model)], hooks=iv.hooks_for(model, batch))
    assert any("eager" in r.getMessage() and "layers 1" in r.getMessage() for r in caplog.records)
    want = brute_force_peaks(model, batch, iv)
    got_peak = np.where(np.isnan(want), np.nan, got.peak)  # pad keys: the reducer leaves 0, the brute force NaN
    n = longest_sum(model.cfg, batch.tokens.shape[1])
    assert_within(got_peak, want, path_bound(np.arange(model.cfg.n_layers)[None, :, None, None], n), "peak attention")
    assert np.nanmax(np.abs(got.peak[:, 1] - brute_force_peaks(model, batch)[:, 1])) > 0.01, "layer 1 was edited"


def test_the_eager_pattern_is_one_block_with_every_head_its_own_group():
    pattern = torch.rand(2, 3, 5, 5)
    block = whole_pattern(pattern)
    assert block.probs.shape == (2, 3, 5, 1, 5) and (block.q0, block.q1, block.lo, block.hi, block.kv_length) == (0, 5, 0, 5, 5)
    torch.testing.assert_close(block.key_column(2)[:, :, 0], pattern[..., 2], rtol=0, atol=0)  # a view: exact


@pytest.mark.parametrize("meter", ["SinkMeter", "KVMeter"])
def test_built_in_pattern_meters_are_pattern_meters(meter):
    from circuits import analyses, measure

    cls = getattr(measure, meter, None) or getattr(analyses, meter)
    assert issubclass(cls, PatternMeter)
