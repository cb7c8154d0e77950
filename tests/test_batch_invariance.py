"""A sequence's statistics alone and inside a right-padded batch agree to float32 rounding.

They are not bit-identical: the batch runs the same matmuls on other shapes, and BLAS sums in
another order (which order depends on the CPU and the kernel path MKL picks for each shape). The
bounds are those of :mod:`tolerances`: two float32 computations, each within ``(l + 1) * 6 *
sqrt(n) * 2**-24`` of the exact value after block ``l``, relative to the size of what is
compared. Padding itself never counts: :mod:`test_measure` checks that exactly.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from circuits.measure import measure
from circuits.probes import probe_texts, tokenize
from tolerances import assert_top_dims_agree, assert_within, field_bound, longest_sum, loss_bound

FIELDS = ("alpha", "sink_score", "cos_to_first", "first_resid", "resid_norm", "top_values", "median_abs")
_POSITION_AXIS = {"alpha": -1, "sink_score": -1, "resid_norm": -1, "cos_to_first": -1, "top_values": 2}


@pytest.mark.real
@pytest.mark.numerical
def test_a_sequence_alone_and_in_a_batch_agree_to_float32_rounding(smollm2):
    texts = [" ".join(t.split()[: 8 + 7 * i]) for i, t in enumerate(probe_texts(8))]
    batch = tokenize(smollm2, texts, max_tokens=64)
    assert len(set(batch.lengths.tolist())) == 8, "every sequence is padded differently"
    both = measure(smollm2, batch, progress=False)
    n = longest_sum(smollm2.cfg, batch.tokens.shape[1])
    with torch.no_grad():
        max_logit = smollm2(batch.tokens).abs().amax(-1).numpy()  # [N, T]: the loss's magnitude
    for i, text in enumerate(texts):
        alone = measure(smollm2, tokenize(smollm2, [text], max_tokens=64), progress=False)
        length = int(batch.lengths[i])
        for name in FIELDS:
            x, bound = getattr(both, name)[i : i + 1], field_bound(name, both.select([i]), n)
            if name in _POSITION_AXIS:
                x = np.take(x, range(length), axis=_POSITION_AXIS[name])
                bound = np.take(bound, range(length), axis=_POSITION_AXIS[name])
            assert_within(x, getattr(alone, name), bound, f"{name}, sequence {i}")
        assert_within(both.next_token_loss[i, :length], alone.next_token_loss[0],
                      loss_bound(max_logit[i, :length], both.n_layers, n), f"next_token_loss, sequence {i}")
        assert_top_dims_agree(both.top_dims[i][:, :length], both.top_values[i][:, :length], alone.top_dims[0],
                              alone.top_values[0], field_bound("top_values", both.select([i]), n)[0][:, :length],
                              f"top_dims, sequence {i}")
