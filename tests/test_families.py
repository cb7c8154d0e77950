"""The contract every supported decoder family keeps, checked on tiny random models of each.

For twelve families built from their Hugging Face configs (``circuits.models.tiny_model``):

* the bridge's logits equal plain transformers';
* the pattern sinkscope measures is the model's own attention (Hugging Face's eager weights:
  causal mask, sliding windows, soft-capping, grouped-query heads, learned sink logits);
* ``measure`` equals a brute-force computation from the full attention patterns;
* every built-in intervention kind runs and leaves no hook behind, or is refused before any
  forward pass with a message that names the architecture;
* prefix reuse (``interventions.forward.run_from_layer``) is bit-identical to a full forward.
"""

from __future__ import annotations

from typing import get_args

import numpy as np
import pytest
import torch

from circuits.measure import measure
from circuits.models import TinyArch, tiny_model
from circuits.probes import tokenize
from interventions.base import InterventionError, registered_hooks
from interventions.effect import measure_effect
from interventions.forward import capture_resid_pre, run_from_layer
from interventions.registry import get_kind, known_kinds
from tolerances import assert_logits_agree, path_bound

FAMILIES = get_args(TinyArch)
TEXTS = [
    "The lighthouse keeper counted every ship that passed, one by one, until the fog rolled in.",  # > 32: crosses windows
    "Sinks store attention that has nowhere else to go.",
]
#: one spec per built-in kind, sized for a 4-layer model and 50+ token sequences
SPECS = {
    "ablate-mlp": "ablate-mlp:layers=1,positions=5",
    "patch": "patch:hook_name=blocks.1.hook_resid_post,positions=5,source_text=A different sentence about sinks and fog.",
    "patch-mlp": "patch-mlp:layers=1,positions=5,source_text=A different sentence about sinks and fog.",
    "rescale-sink": "rescale-sink:layers=1,factor=4",
    "edit-token-mlp": "edit-token-mlp:sequences=0,layers=1,positions=5,mode=zero",
    "isolate": "isolate:layers=0-1,queries=10",
    "head-rmsnorm": "head-rmsnorm:layers=1",
    "sigmoid-attn": "sigmoid-attn:layers=1",
    "amplify-variance": "amplify-variance:layer=1,positions=10,factor=8",
    "zero-sink-value": "zero-sink-value:layers=1-2",
    "drop-sink-attention": "drop-sink-attention:layers=1-2",
    "mean-sink-value": "mean-sink-value:layers=1-2",
}


@pytest.fixture(scope="module", params=FAMILIES)
def family(request):
    model = tiny_model(request.param)
    return request.param, model, tokenize(model, TEXTS, prepend_bos=True)


def test_the_spec_table_covers_every_builtin_kind():
    builtins = {k for k in known_kinds() if get_kind(k).__module__.startswith("interventions.")}
    assert set(SPECS) == builtins


@pytest.mark.numerical
def test_bridge_logits_equal_plain_transformers(family):
    _, model, batch = family
    with torch.no_grad():
        bridge = model(batch.tokens)
        plain = model.original_model(batch.tokens).logits
    assert_logits_agree(bridge, plain, model.cfg)


def full_patterns(model, tokens) -> list[np.ndarray]:
    _, cache = model.run_with_cache(tokens, names_filter=lambda n: n.endswith("attn.hook_pattern"))
    return [cache[f"blocks.{l}.attn.hook_pattern"].double().numpy() for l in range(model.cfg.n_layers)]


@pytest.mark.numerical
def test_the_measured_pattern_is_the_models_own_attention(family):
    """The bridge's pattern against transformers' eager attention: two float32 paths through
    the same layer, probabilities within the rounding model at that layer's depth."""
    arch, model, batch = family
    hf = model.original_model
    with torch.no_grad():
        hf.config._attn_implementation = "eager"  # the reference: weights as the HF model computes them
        reference = hf(batch.tokens, output_attentions=True).attentions
    patterns = full_patterns(model, batch.tokens)
    n_sum = max(model.cfg.d_model, model.cfg.d_mlp, batch.tokens.shape[1])
    for layer, (ours, theirs) in enumerate(zip(patterns, reference)):
        for i, n in enumerate(batch.lengths.tolist()):
            np.testing.assert_allclose(ours[i, :, :n, :n], theirs[i, :, :n, :n].double().numpy(), rtol=0,
                                       atol=path_bound(layer, n_sum), err_msg=f"{arch} layer {layer} sequence {i}")


@pytest.mark.numerical
def test_measure_equals_brute_force_from_the_full_patterns(family):
    """measure() (fused blocks, sub-batches of 2) against sums written out in float64 over the
    eager pattern: two float32 paths to the pattern, then sums of up to T probabilities."""
    _, model, batch = family
    meas = measure(model, batch, progress=False, batch_size=2)
    patterns = full_patterns(model, batch.tokens)
    for i, n in enumerate(batch.lengths.tolist()):
        for layer, pattern in enumerate(patterns):
            a = pattern[i, :, :n, :n]  # [head, query, key]
            alpha = np.array([[a[h, k:, k].sum() / (n - k) for k in range(n)] for h in range(a.shape[0])])
            score = np.array([a[:, k + 1:, k].sum(axis=1).mean() / (n - k - 1) if k < n - 1 else np.nan for k in range(n)])
            bound = path_bound(layer, max(model.cfg.d_model, model.cfg.d_mlp, n))  # a mean of probabilities: magnitude 1
            np.testing.assert_allclose(meas.alpha[i, layer, :, :n], alpha, atol=bound, rtol=0)
            np.testing.assert_allclose(meas.sink_score[i, layer, :n], score, atol=bound, rtol=0, equal_nan=True)
        assert np.isnan(meas.alpha[i, :, :, n:]).all() and np.isnan(meas.sink_score[i, :, n:]).all()


@pytest.mark.parametrize("kind", sorted(SPECS))
def test_every_builtin_intervention_runs_or_is_refused_naming_the_architecture(family, kind):
    arch, model, batch = family
    try:
        effect = measure_effect(model, batch, SPECS[kind], n_resamples=0)
    except InterventionError as exc:
        assert arch in str(exc) or model.cfg.model_name in str(exc) or "architecture" in str(exc), str(exc)
        assert registered_hooks(model) == {}
        return
    assert registered_hooks(model) == {}
    moved = np.nanmax(np.abs(effect.intervened.sink_score - effect.clean.sink_score))
    kl = effect.summary["kl"]["intervened"]
    assert moved > 0 or kl > 0, f"{kind} changed nothing on {arch}"


def test_prefix_reuse_is_bit_identical_to_a_full_forward(family):
    _, model, batch = family
    n = int(model.cfg.n_layers)
    with torch.no_grad():
        full = model(batch.tokens)
        resid = capture_resid_pre(model, batch.tokens, range(n))
        for start in range(n):
            assert torch.equal(run_from_layer(model, resid[start], start), full), f"start_layer={start}"
