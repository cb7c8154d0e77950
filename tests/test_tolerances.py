"""The rounding model of :mod:`tolerances` holds: a float32 measurement lies within one path's
bound of the same measurement in float64 (whose unit roundoff, 2**-53, is 2**29 times smaller:
it stands in for exact arithmetic), on every packaged model and a tiny one.

Every float32-against-float32 tolerance in the suite rests on this: if a kernel path rounds
worse than the model says, these tests name the field and layer where it does, instead of a
comparison elsewhere failing for no stated reason. CI runs them on two kernel paths.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from circuits.measure import measure
from circuits.models import tiny_model
from circuits.probes import probe_texts, tokenize
from tolerances import (
    assert_top_dims_agree,
    assert_within,
    depth_error,
    field_bound,
    longest_sum,
    loss_bound,
    margin_mask,
)

FIELDS = ("alpha", "sink_score", "cos_to_first", "first_resid", "resid_norm", "top_values", "median_abs")


def _against_float64(model, texts, max_tokens: int = 64) -> None:
    exact = copy.deepcopy(model).to(torch.float64)
    batch = tokenize(model, texts, max_tokens=max_tokens)
    got, ref = measure(model, batch, progress=False), measure(exact, batch, progress=False)
    n = longest_sum(model.cfg, batch.tokens.shape[1])
    for name in FIELDS:
        assert_within(getattr(got, name), getattr(ref, name), field_bound(name, ref, n, paths=1), f"{name} (float32 vs float64)")
    with torch.no_grad():
        max_logit = exact(batch.tokens).abs().amax(-1).numpy()
    assert_within(got.next_token_loss, ref.next_token_loss, loss_bound(max_logit, got.n_layers, n, paths=1), "next_token_loss")
    assert_top_dims_agree(got.top_dims, got.top_values, ref.top_dims, ref.top_values,
                          field_bound("top_values", ref, n, paths=2), "top_dims (float32 vs float64)")


@pytest.mark.numerical
def test_the_rounding_model_holds_on_a_tiny_model():
    _against_float64(tiny_model("llama"), ["a b c d e f g h", "the first the second the third", "x y z"])


@pytest.mark.real
@pytest.mark.numerical
@pytest.mark.parametrize("name", ["smollm2", "gemma3", "qwen2"])
def test_the_rounding_model_holds_on_the_packaged_models(name, request):
    """Four passages of 8-40 tokens (a float64 forward of Qwen's 0.5B parameters is the cost)."""
    texts = [" ".join(t.split()[: 8 + 10 * i]) for i, t in enumerate(probe_texts(4))]
    _against_float64(request.getfixturevalue(name), texts, max_tokens=40)


def test_the_bounds_grow_with_depth_and_width_and_fail_a_real_difference():
    """Hand-checked: float32, n = 1,536 (smollm2's d_mlp): 6 * sqrt(1536) * 2**-24 = 1.4016e-5 per
    block; after block 29 of 30, 30 times that. A difference of one part in 1,000 (an
    off-by-one or a leaked pad does far more) is over the bound at every depth of that model."""
    per_block = 6 * np.sqrt(1536) * 2.0**-24
    assert depth_error(0, 1536) == pytest.approx(per_block) == pytest.approx(1.4016e-5, rel=1e-4)
    assert depth_error(29, 1536) == pytest.approx(30 * per_block)
    assert depth_error(0, 6144) == pytest.approx(2 * per_block)
    assert depth_error(0, 1536, "bfloat16") == pytest.approx(3 * 2.0**-8)
    with pytest.raises(AssertionError, match=r"1 of 2 elements over"):
        assert_within([1.0, 1.0], [1.0, 1.001], 2 * depth_error(29, 1536), "probabilities")
    with pytest.raises(AssertionError, match="NaN positions differ"):
        assert_within([1.0, np.nan], [1.0, 1.0], 1.0, "pads")


def test_a_discrete_result_is_owed_only_away_from_its_threshold_and_from_ties():
    # alpha cells 0.1, 0.29, 0.31, 0.9 against eps 0.3 with bound 0.02: the middle two may flip
    assert margin_mask([0.1, 0.29, 0.31, 0.9, np.nan], 0.3, 0.02).tolist() == [True, False, False, True, False]
    values = np.array([[100.0, 50.0, 49.99, 3.0]])
    # ranks 2 and 3 are a near tie (0.01 apart, bound 0.01): a swap there is allowed ...
    assert_top_dims_agree([[7, 1, 2, 9]], values, [[7, 2, 1, 9]], values, 0.01, "tie")
    # ... a swap of ranks 1 and 2 (50 apart) is not
    with pytest.raises(AssertionError, match="away from a tie"):
        assert_top_dims_agree([[7, 1, 2, 9]], values, [[1, 7, 2, 9]], values, 0.01, "no tie")
