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
