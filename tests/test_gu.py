"""Tests of Gu et al.'s mean-value key-bias test (interventions.keybias.MeanSinkValue).

Hand-checked on tiny models: the value read at the sink position is exactly the mean of the
other real positions' values (pads excluded); the real-model test records what it measured.
"""

from __future__ import annotations

import pytest
import torch

from circuits.models import tiny_model
from circuits.probes import probe_texts, tokenize
from interventions.effect import output_change
from interventions.keybias import DropSinkAttention, MeanSinkValue, ZeroSinkValue
from interventions.registry import parse_spec, spec

TEXTS = ["The lighthouse keeper counted every ship that passed, one by one.", "Sinks store attention."]


def _cache(model, batch, names):
    _, cache = model.run_with_cache(batch.tokens, names_filter=lambda n: n in set(names))
    return {n: cache[n].detach().float() for n in names}


@pytest.mark.parametrize("arch", ["llama", "gemma3", "gpt2"])
def test_mean_sink_value_is_the_mean_of_the_other_real_values(arch):
    model = tiny_model(arch)
    batch = tokenize(model, TEXTS, prepend_bos=True)
    names = ["blocks.0.attn.hook_pattern", "blocks.0.attn.hook_v", "blocks.0.attn.hook_z"]
    clean = _cache(model, batch, names)
    with MeanSinkValue(layers=(0,)).applied(model, batch):
        edited = _cache(model, batch, names)
    p, v = clean[names[0]], clean[names[1]].clone()
    for b, n in enumerate(batch.lengths.tolist()):
        v[b, 0] = v[b, 1:n].mean(dim=0)  # pads (positions >= n) left out
    torch.testing.assert_close(edited[names[1]], v, atol=1e-5, rtol=1e-4)
    vh = v.repeat_interleave(p.shape[1] // v.shape[2], dim=2)
    expect = torch.einsum("bhqk,bkhd->bqhd", p, vh)
    valid = batch.valid
    torch.testing.assert_close(edited[names[2]][valid], expect[valid], atol=1e-5, rtol=1e-4)


def test_mean_sink_value_spec_and_validation():
    from interventions.base import InterventionError

    model = tiny_model("llama")
    assert parse_spec("mean-sink-value:layers=0-1,positions=3") == MeanSinkValue(layers=(0, 1), positions=(3,))
    assert spec(MeanSinkValue(positions=(2,))) == "mean-sink-value:positions=2"
    with pytest.raises(InterventionError, match="MeanSinkValue.positions"):
        MeanSinkValue(positions=(500,)).validate(model, 10)
    with pytest.raises(InterventionError, match="MeanSinkValue.layers"):
        MeanSinkValue(layers=(9,)).validate(model)


@pytest.mark.real
def test_smollm2_mean_value_vs_zero_value(smollm2):
    """Measured (4 probes x 64 tokens, all layers, first run): KL to the clean run, nats per
    token: mean-value 1.79, zero-value with the sink's own row (include_self) 1.41, zero-value
    for later queries 1.35, drop-attention 0.18. Replacing the sink's value by an ordinary
    (mean) value hurts as much as zeroing it, so "zero is out of distribution" does not explain
    the zero-value cost on SmolLM2. Thresholds: half the measured mean-value KL, and drop below
    the zero-edits."""
    batch = tokenize(smollm2, probe_texts(4), max_tokens=64)
    eff = output_change(
        smollm2,
        batch,
        {"mean": MeanSinkValue(), "zero-self": ZeroSinkValue(include_self=True), "zero": ZeroSinkValue(), "drop": DropSinkAttention()},
    ).set_index("intervention")
    assert eff.loc["mean", "kl"] > 0.9
    assert eff.loc["drop", "kl"] < min(eff.loc["mean", "kl"], eff.loc["zero", "kl"])
