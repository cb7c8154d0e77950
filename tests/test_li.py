"""Li et al. as the paper does it (issue 11 §1-2): variance amplification at the attention output,
the variance discrepancy across a batch of random sequences, DomRatio, super neurons from the
weights, and planting (i) at position 10.

Unit tests run on the seeded tiny Llama (4 layers, d_model 64, 4 heads of 16): every number is
recomputed by hand from the clean run's cache. Real-model tests (marked ``real``) run on
smollm2-135m; each threshold comes from a measurement written in the test's docstring.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from circuits.probes import tokenize
from interventions.base import InterventionError, registered_hooks
from interventions.registry import parse_spec, spec
from interventions.residual import AmplifyVariance
from tolerances import path_bound

TEXTS = [
    "The cat sat on the mat and looked at the bird outside.",
    "A short one.",
    "Numbers like 12 and 7 appear in this sentence about counting things slowly.",
]


@pytest.fixture(scope="module")
def batch(llama):
    return tokenize(llama, TEXTS)


def cache(model, batch, iv=None) -> dict[str, torch.Tensor]:
    """The run's activations (intervened when ``iv`` is given); no hook may be left behind."""
    with torch.no_grad():
        if iv is None:
            return model.run_with_cache(batch.tokens)[1]
        with iv.applied(model, batch):
            out = model.run_with_cache(batch.tokens)[1]
    assert registered_hooks(model) == {}
    return out


def position_mean(x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Per sequence, the mean of ``x[i, :n_i]`` over positions (by a Python loop, as by hand)."""
    return torch.stack([x[i, : int(n)].mean(0) for i, n in enumerate(lengths)])


# --------------------------------------------------------------------------- intervention (ii)


@pytest.mark.parametrize("site,hook", [("attn_out", "blocks.{l}.hook_attn_out"), ("z", "blocks.{l}.attn.hook_z")])
def test_deviation_mode_is_mu_plus_lambda_times_the_deviation(llama, batch, site, hook):
    """One edited layer: the hooked activation at the chosen positions is exactly
    mu + lambda (o - mu), mu the mean over the sequence's real positions (per head for z); every
    other position is unchanged, and pads do not enter mu."""
    layer, positions, lam = 1, (2, 5), 3.0
    clean = cache(llama, batch)
    got = cache(llama, batch, AmplifyVariance(layers=layer, positions=positions, factor=lam, site=site))
    o, new = clean[hook.format(l=layer)], got[hook.format(l=layer)]
    mu = position_mean(o, batch.lengths)  # [b, d] or [b, h, d]
    assert int(batch.lengths.min()) < o.shape[1]  # the batch has pads, so excluding them matters
    for p in positions:
        torch.testing.assert_close(new[:, p], mu + lam * (o[:, p] - mu), atol=1e-5, rtol=1e-5)
    others = [p for p in range(o.shape[1]) if p not in positions]
    torch.testing.assert_close(new[:, others], o[:, others])
    # with the pads included, mu would differ (pads hold real activations of pad tokens)
    assert not torch.allclose(o.mean(1), mu, atol=1e-4)


@pytest.mark.parametrize("site,hook", [("attn_out", "blocks.{l}.hook_attn_out"), ("z", "blocks.{l}.attn.hook_z"),
                                       ("resid_post", "blocks.{l}.hook_resid_post"), ("resid_pre", "blocks.{l}.hook_resid_pre")])
def test_norm_mode_is_plain_scaling(llama, batch, site, hook):
    clean = cache(llama, batch)
    got = cache(llama, batch, AmplifyVariance(layers=2, positions=(4,), factor=5.0, mode="norm", site=site))
    o, new = clean[hook.format(l=2)], got[hook.format(l=2)]
    torch.testing.assert_close(new[:, 4], 5.0 * o[:, 4], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(new[:, :4], o[:, :4])


@pytest.mark.parametrize("site,hook", [("attn_out", "blocks.{l}.hook_attn_out"), ("z", "blocks.{l}.attn.hook_z")])
def test_mu_dims_keeps_the_token_mean_over_its_dimensions(llama, batch, site, hook):
    clean = cache(llama, batch)
    got = cache(llama, batch, AmplifyVariance(layers=0, positions=(3,), factor=4.0, site=site, mu="dims"))
    o, new = clean[hook.format(l=0)][:, 3], got[hook.format(l=0)][:, 3]
    mean = o.mean(-1, keepdim=True)
    torch.testing.assert_close(new, mean + 4.0 * (o - mean), atol=1e-5, rtol=1e-5)


def test_a_range_of_layers_is_edited_in_order(llama, batch):
    """layers=0-2: each layer's attention output is amplified around *its own* mean, computed in
    the run that already carries the earlier layers' edits; layer 3 is untouched."""
    iv = parse_spec("amplify-variance:site=attn_out,layers=0-2,positions=4,factor=2")
    assert iv == AmplifyVariance(layers=(0, 1, 2), positions=(4,), factor=2.0)
    reach = iv.reach(llama, batch)
    assert reach.start == 0 and reach.layers == (0, 1, 2)
    got = cache(llama, batch, iv)
    # re-run the same edits one layer at a time to recover the pre-edit activation of each layer
    for layer in (0, 1, 2):
        before = cache(llama, batch, AmplifyVariance(layers=tuple(range(layer)), positions=(4,), factor=2.0)) if layer else cache(llama, batch)
        o = before[f"blocks.{layer}.hook_attn_out"]
        mu = position_mean(o, batch.lengths)
        torch.testing.assert_close(got[f"blocks.{layer}.hook_attn_out"][:, 4], mu + 2.0 * (o[:, 4] - mu), atol=1e-4, rtol=1e-4)


def test_factor_one_is_the_identity_and_the_edit_reaches_the_residual(llama, batch):
    clean = cache(llama, batch)
    same = cache(llama, batch, AmplifyVariance(layers=(0, 1), positions=(3,), factor=1.0))
    torch.testing.assert_close(same["blocks.3.hook_resid_post"], clean["blocks.3.hook_resid_post"], atol=1e-5, rtol=1e-5)
    got = cache(llama, batch, AmplifyVariance(layers=1, positions=(3,), factor=4.0))
    # the residual after block 1 carries the edited attention output: resid_mid = resid_pre + attn_out
    delta = got["blocks.1.hook_attn_out"][:, 3] - clean["blocks.1.hook_attn_out"][:, 3]
    assert delta.abs().max() > 1e-3
    torch.testing.assert_close(got["blocks.1.hook_resid_pre"], clean["blocks.1.hook_resid_pre"])
    torch.testing.assert_close(got["blocks.1.hook_resid_post"][:, :3], clean["blocks.1.hook_resid_post"][:, :3], atol=1e-5, rtol=1e-5)


def test_spec_syntax_and_field_errors(llama, batch):
    iv = parse_spec("amplify-variance:site=attn_out,layers=0-2,positions=10,factor=8")
    assert (iv.site, iv.mode, iv.mu, iv.layers) == ("attn_out", "deviation", "positions", (0, 1, 2))
    assert spec(iv) == "amplify-variance:layers=0-2,positions=10,factor=8.0"
    assert parse_spec(spec(iv)) == iv
    assert parse_spec("amplify-variance:layer=2,positions=3,factor=2,mode=norm,site=z,mu=dims") == AmplifyVariance(
        layers=(2,), positions=(3,), factor=2.0, mode="norm", site="z", mu="dims")
    with pytest.raises(InterventionError, match=r"AmplifyVariance.site: must be one of 'attn_out', 'z', 'resid_post', 'resid_pre'; got 'mlp'"):
        AmplifyVariance(layers=1, positions=(2,), factor=2.0, site="mlp")
    with pytest.raises(InterventionError, match=r"AmplifyVariance.mu: must be one of 'positions', 'dims'; got 'batch'"):
        AmplifyVariance(layers=1, positions=(2,), factor=2.0, mu="batch")
    with pytest.raises(InterventionError, match=r"AmplifyVariance.layers: layer 4 is out of range; this model has 4 layers"):
        with AmplifyVariance(layers=(2, 4), positions=(2,), factor=2.0).applied(llama, batch):
            pytest.fail("no forward pass may run")
    assert registered_hooks(llama) == {}


@pytest.mark.real
def test_deviation_amplification_at_attn_out_plants_a_sink_on_smollm2(smollm2):
    """Li et al. (ii) at the paper's site holds on smollm2-135m (plain scaling does not).

    Measured (8 built-in probe passages × 64 tokens, no BOS, CPU float32; ``amplify-variance:
    site=attn_out,layers=0-2,positions=10,factor=λ``; score = mean sink score of position 10 over
    layers 3-29): clean 0.0080 (primary sink 0.51). Deviation mode, λ = 1, 2, 4, 8, 16: 0.0080,
    0.0081, 0.1133, 0.0536, 0.0764 (≈ 0.2 per layer in layers 3-8 at λ = 4). Norm mode (the
    control): 0.0080, 0.0104, 0.0119, 0.0142, 0.0150. Spearman rho(λ, deviation score) = 0.70;
    deviation / norm at λ = 8: 3.8 ×, at λ = 16: 5.1 ×. The curve is not monotone: it peaks at
    λ = 4. ``site=z`` gives the same numbers to 4 decimals (W_O is linear, and the mean over
    positions commutes with it). For comparison, ``site=resid_post,mu=dims`` (the toolkit's
    earlier edit) at λ = 8: see ``tests/test_recipes_real.py`` (no sink).
    """
    from scipy.stats import spearmanr

    from circuits.measure import measure
    from circuits.probes import probe_texts

    b = tokenize(smollm2, probe_texts(8), prepend_bos=False, max_tokens=64)
    late = list(range(3, int(smollm2.cfg.n_layers)))

    def score(iv=None) -> float:
        hooks = iv.hooks_for(smollm2, b) if iv is not None else ()
        return float(np.nanmean(measure(smollm2, b, hooks=hooks, progress=False).sink_score[:, late, 10]))

    grid = (1.0, 2.0, 4.0, 8.0, 16.0)
    clean = score()
    dev = [score(AmplifyVariance(layers=(0, 1, 2), positions=(10,), factor=f)) for f in grid]
    norm = [score(AmplifyVariance(layers=(0, 1, 2), positions=(10,), factor=f, mode="norm")) for f in grid]
    rho = spearmanr(grid, dev)[0]
    print("clean", clean, "deviation", dev, "norm", norm, "rho", rho)
    assert clean < 0.015
    assert dev[0] == pytest.approx(clean, abs=1e-4) and norm[0] == pytest.approx(clean, abs=1e-4)
    assert rho >= 0.5
    assert min(dev[2:]) >= 0.03  # λ ≥ 4: at least ~4 × clean (measured 6.7-14 ×)
    assert dev[3] >= 2.5 * norm[3] and dev[4] >= 2.5 * norm[4]
    assert max(norm) < 0.03


# --------------------------------------------------------------------------- the quantities as defined


def test_random_tokens_are_seeded_without_bos_or_special_ids(llama):
    from circuits.analyses import random_tokens

    a, b = random_tokens(llama, 6, 12, seed=3), random_tokens(llama, 6, 12, seed=3)
    assert torch.equal(a.tokens, b.tokens) and not torch.equal(a.tokens, random_tokens(llama, 6, 12, seed=4).tokens)
    assert a.tokens.shape == (6, 12) and a.prepend_bos is False and (a.lengths == 12).all()
    assert not set(a.tokens.flatten().tolist()) & set(llama.tokenizer.all_special_ids)


@pytest.mark.numerical
def test_batch_variance_is_the_variance_across_sequences(llama):
    """By hand from a cache: per layer and position, the per-dimension sample variance over the
    batch's sequences, averaged over dimensions; sub-batches accumulate to the same numbers."""
    from circuits.analyses import BatchVarianceMeter, batch_variance, batch_variance_table, observe, random_tokens

    b = random_tokens(llama, 7, 9, seed=0)
    var = batch_variance(llama, 7, 9, seed=0, batch_size=3)  # 3 sub-batches of 3, 3, 1
    clean = cache(llama, b)
    for layer in (0, 3):
        z = clean[f"blocks.{layer}.attn.hook_z"].flatten(2)
        out = clean[f"blocks.{layer}.hook_attn_out"]
        np.testing.assert_allclose(var.z[layer], z.var(0, unbiased=True).mean(-1).numpy(), rtol=1e-4)
        np.testing.assert_allclose(var.out[layer], out.var(0, unbiased=True).mean(-1).numpy(), rtol=1e-4)
    assert list(var.n) == [7] * 9
    one = BatchVarianceMeter(llama)
    observe(llama, b, [one], batch_size=7)
    # one sub-batch of 7 against 3 + 3 + 1: the same sums on other shapes, at depth <= 4 of a
    # 4-layer model whose longest sum is 128 (tests/tolerances.py), relative to each variance
    np.testing.assert_allclose(one.result().z, var.z, rtol=float(path_bound(llama.cfg.n_layers, 128)))
    table = batch_variance_table(var)
    assert list(table["layer"]) == [0, 1, 2, 3]
    assert table.loc[0, "z_first"] == pytest.approx(var.z[0, 0]) and table.loc[0, "z_rest"] == pytest.approx(np.median(var.z[0, 1:]))
    assert -1 <= table.loc[0, "kendall_z_out"] <= 1


def test_batch_variance_leaves_pads_out(llama, batch):
    from circuits.analyses import BatchVarianceMeter, observe

    meter = BatchVarianceMeter(llama)
    observe(llama, batch, [meter], batch_size=2)
    var = meter.result()
    lengths = batch.lengths.tolist()
    assert list(var.n) == [sum(n > t for n in lengths) for t in range(max(lengths))]
    last = max(lengths) - 1  # only one sequence reaches it: no variance
    assert np.isnan(var.z[:, last]).all()
    t = min(lengths) - 1  # every sequence reaches it
    z = cache(llama, batch)["blocks.1.attn.hook_z"].flatten(2)
    assert var.z[1, t] == pytest.approx(float(z[:, t].var(0, unbiased=True).mean()), rel=1e-4)


def test_kendall_tau_by_hand():
    from circuits.analyses import kendall_tau

    assert kendall_tau([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert kendall_tau([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert kendall_tau([1, 2, 3], [1, 3, 2]) == pytest.approx(1 / 3)  # concordant 2, discordant 1
    assert np.isnan(kendall_tau([1, 2], [1, 2]))


@pytest.mark.parametrize("where,hook", [("resid_post", "blocks.{l}.hook_resid_post"), ("ln1", "blocks.{l}.ln1.hook_out")])
def test_dom_ratio_of_the_first_token(llama, batch, where, hook):
    from circuits.analyses import DomRatioMeter, dom_ratio_table, observe

    meter = DomRatioMeter(llama, where=where)
    observe(llama, batch, [meter], batch_size=2)
    st = meter.result()
    clean = cache(llama, batch)
    for layer in range(4):
        h0 = clean[hook.format(l=layer)][:, 0].abs()
        np.testing.assert_allclose(st.dom_ratio[:, layer], (h0.max(-1).values / h0.mean(-1)).numpy(), rtol=1e-5)
        np.testing.assert_array_equal(st.dom_dim[:, layer], h0.argmax(-1).numpy())
    table = dom_ratio_table(st)
    assert table["dom_ratio"].to_numpy() == pytest.approx(st.dom_ratio.mean(0))
    with pytest.raises(Exception, match="where must be one of"):
        DomRatioMeter(llama, where="mlp")


def test_weight_neurons_by_hand(llama):
    """Column norms of W_gate / W_up per neuron (HF rows), the W_down write's top dimension and share;
    a neuron planted with a 20 × larger gate and up row stands out with norm_ratio ≈ 400."""
    import copy

    from circuits.analyses import cross_check_super_neurons, weight_neurons, weight_super_neurons

    model = copy.deepcopy(llama)
    mlp = model.blocks[1].mlp
    with torch.no_grad():
        mlp.gate.original_component.weight[7] *= 20
        getattr(mlp, "in").original_component.weight[7] *= 20
        mlp.out.original_component.weight[:, 7] = 0
        mlp.out.original_component.weight[5, 7] = 3.0
    table = weight_neurons(model)
    assert len(table) == 4 * int(model.cfg.d_mlp)
    row = table[(table["layer"] == 1) & (table["channel"] == 7)].iloc[0]
    g = mlp.gate.original_component.weight[7].norm().item()
    assert row["gate_norm"] == pytest.approx(g, rel=1e-5)
    assert row["down_top_dim"] == 5 and row["down_top_share"] == pytest.approx(1.0) and row["down_norm"] == pytest.approx(3.0)
    assert row["norm_ratio"] > 100
    found = weight_super_neurons(table, min_ratio=50)
    assert [(int(r.layer), int(r.channel)) for r in found.itertuples()] == [(1, 7)]
    import pandas as pd

    check = cross_check_super_neurons(found, pd.DataFrame({"layer": [1, 2], "channel": [7, 3]}))
    assert check["both"] == [(1, 7)] and check["activations_only"] == [(2, 3)] and check["recall"] == 0.5


@pytest.mark.real
def test_batch_variance_on_random_tokens_on_smollm2(smollm2):
    """Measured (64 random-token sequences × 64 tokens, seed 0, no BOS): across-batch variance of
    ``hook_z`` at position 0 over the median later position: 13.9 in layer 0, 4.1 in layer 1,
    1.04 in layer 2, 2.3 in layer 11, and ≤ 0.47 in every other layer (≈ 0.001 from layer 12 on:
    once the first token is the sink its aggregation is the same vector in every sequence).
    Spearman rho(position, variance) -0.98 and -0.97 in layers 0-1; median over layers -0.14.
    Kendall tau between the z and attn_out orderings: median 0.82 (layer 2: 0.14; the paper:
    about 0.32). So the paper's discrepancy shows in the first two layers only on this model."""
    from circuits.analyses import batch_variance, batch_variance_table

    table = batch_variance_table(batch_variance(smollm2, 64, 64, seed=0))
    print(table.round(3).to_string())
    assert table.loc[0, "z_ratio"] >= 8 and table.loc[1, "z_ratio"] >= 2.5
    assert (table.loc[[0, 1], "z_rho_position"] <= -0.9).all()
    assert (table.loc[12:28, "z_ratio"] < 0.05).all()
    assert 0.6 <= table["kendall_z_out"].median() <= 0.95


@pytest.mark.real
def test_dom_ratio_and_weight_super_neurons_on_smollm2(smollm2):
    """Measured (8 probe passages × 64 tokens, no BOS): DomRatio of the first token, always in
    dimension 507 from layer 1 on: block output (resid_post) 66 at layer 1, 144 at layer 2,
    142-149 in layers 2-7, ≈ 230 in layers 11-26; after layer 2's input RMSNorm (``ln1``, the
    paper's site; Llama-2-7B: ≈ 263) 64.3. Weights: neurons with ``norm_ratio`` (gate norm × up
    norm over the layer median) ≥ 5 are (28, 678) 56.3, (27, 903) 42.7, (11, 1229) 13.4, (2, 90)
    11.0, (11, 1487) 6.7; all five are also activation-based super neurons (of 96 found there,
    most of them in layer 29), and four of them write dimension 507 with 93-98 % of their W_down
    norm² (excess kurtosis ≈ 490-540), as the paper describes.
    """
    from circuits.analyses import (
        DomRatioMeter,
        SuperNeuronMeter,
        cross_check_super_neurons,
        dom_ratio_table,
        observe,
        super_neurons,
        weight_neurons,
        weight_super_neurons,
    )
    from circuits.probes import probe_texts

    b = tokenize(smollm2, probe_texts(8), prepend_bos=False, max_tokens=64)
    post, ln1, sn = DomRatioMeter(smollm2), DomRatioMeter(smollm2, where="ln1"), SuperNeuronMeter(smollm2)
    observe(smollm2, b, [post, ln1, sn], batch_size=8)
    post, ln1 = dom_ratio_table(post.result()), dom_ratio_table(ln1.result())
    print(post.round(1).to_string(), ln1.round(1).to_string())
    assert (post.loc[1:28, "dom_dim"] == 507).all()
    assert 100 <= post.loc[2, "dom_ratio"] <= 200 and (post.loc[11:26, "dom_ratio"] >= 200).all()
    assert 40 <= ln1.loc[2, "dom_ratio"] <= 90
    by_weights = weight_super_neurons(weight_neurons(smollm2), min_ratio=5.0)
    print(by_weights.round(3).to_string())
    assert {(int(r.layer), int(r.channel)) for r in by_weights.itertuples()} == {(28, 678), (27, 903), (11, 1229), (2, 90), (11, 1487)}
    check = cross_check_super_neurons(by_weights, super_neurons(sn.result(), smollm2))
    assert check["weights_only"] == [] and len(check["both"]) == 5
    writers = by_weights[by_weights["down_top_dim"] == 507]
    assert len(writers) == 4 and (writers["down_top_share"] >= 0.9).all()


@pytest.mark.real
def test_isolating_position_10_in_layers_0_2_plants_a_sink_on_smollm2(smollm2):
    """Li et al. (i) as the paper states it: position 10 attends only to itself (layers 0-2, the
    toolkit's choice: the paper does not say which). Measured (8 probe passages × 64 tokens, no
    BOS, control seed 0): position 10's sink score over layers 3-29 rises from 0.0080 (clean) to
    0.142 (17.7 ×; the clean primary sink: 0.51); the random control leaves it at 0.0082;
    difference of differences 0.134, CI low 0.074; it holds a sink in layers 2-9, 12-15 and
    17-28. The control's own position reaches 0.186."""
    from circuits.probes import probe_texts
    from interventions.recipes import plant_sink, summarize_plant

    b = tokenize(smollm2, probe_texts(8), prepend_bos=False, max_tokens=64)
    s = summarize_plant(plant_sink(smollm2, b, 10, method="isolate", layers=(0, 1, 2), control="random", seed=0))
    print({k: v for k, v in s.items() if k != "layers"})
    assert s["layers"][0] == 3
    assert s["clean"] < 0.015 and s["intervened"] >= 0.1 and s["vs_clean"] >= 10
    assert s["did"] >= 0.09 and s["did_ci_low"] > 0.03
    assert set(range(3, 10)) <= set(s["sink_layers"])
