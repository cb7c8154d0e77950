"""A sequence's statistics alone and inside a right-padded batch agree to float32 rounding, within
the tolerances README states (measured on smollm2-135m: 8 sequences of 10-64 tokens, CPU fp32).

They are not bit-identical: the batch runs the same matmuls on other shapes, and BLAS sums in
another order. Padding itself never counts (tests/test_measure.py checks that exactly)."""

from __future__ import annotations

import numpy as np
import pytest

from circuits.measure import measure
from circuits.probes import probe_texts, tokenize

#: field -> (atol, rtol): README's "a sequence alone or in a batch" numbers, with ~2x headroom.
TOLERANCE = {
    "alpha": (2e-6, 0), "sink_score": (1e-6, 0), "cos_to_first": (2e-6, 0), "first_resid": (0, 0),
    "resid_norm": (0, 1e-6), "top_values": (0, 4e-6), "median_abs": (0, 1e-5), "next_token_loss": (3e-5, 0),
}
_POSITION_AXIS = {"alpha": -1, "sink_score": -1, "resid_norm": -1, "cos_to_first": -1, "top_values": 1,
                  "next_token_loss": -1}


@pytest.mark.real
def test_a_sequence_alone_and_in_a_batch_agree_to_float32_rounding(smollm2):
    texts = [" ".join(t.split()[: 8 + 7 * i]) for i, t in enumerate(probe_texts(8))]
    batch = tokenize(smollm2, texts, max_tokens=64)
    assert len(set(batch.lengths.tolist())) == 8, "every sequence is padded differently"
    both = measure(smollm2, batch, progress=False)
    for i, text in enumerate(texts):
        alone = measure(smollm2, tokenize(smollm2, [text], max_tokens=64), progress=False)
        n = int(batch.lengths[i])
        for name, (atol, rtol) in TOLERANCE.items():
            x = getattr(both, name)[i]
            if name in _POSITION_AXIS:
                x = np.take(x, range(n), axis=_POSITION_AXIS[name])
            np.testing.assert_allclose(x, getattr(alone, name)[0], atol=atol, rtol=rtol, err_msg=f"{name}, sequence {i}")
        assert (both.top_dims[i][:, :n] == alone.top_dims[0]).all()
