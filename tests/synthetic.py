"""A synthetic :class:`~circuits.measure.SinkMeasurement` of any size, for the view's tests.

Why: the view must be checked at 8,192 tokens and 30 layers, far beyond what a test can measure
on a real model in seconds. The numbers are shaped like SmolLM2's: a primary sink at position 0
from layer 3 on, ordinary tokens receiving little, and secondary sinks (|cos(h, h_0)| 0.95, sink
score 0.2) in layers 2-8 at the given positions, so :func:`circuits.anatomy.secondary_sinks`
finds them with creation layer 2 and lifetime 7.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from circuits.measure import TOP_DIMS, SinkMeasurement

WORDS = ["The", " cat", " sat", " on", " the", " mat", ".", " It", " was", " warm", ",", " and", "\n", " a", " dog", " barked"]


def synthetic(
    lengths: Sequence[int] = (64,), *, n_layers: int = 30, n_heads: int = 9, secondary: Sequence[int] = (5,), seed: int = 0,
    model: str = "synthetic",
) -> SinkMeasurement:
    rng = np.random.default_rng(seed)
    n, t = len(lengths), max(lengths)
    valid = np.arange(t)[None, :] < np.array(lengths)[:, None]
    tokens = [[WORDS[(i * 7 + s) % len(WORDS)] for i in range(k)] for s, k in enumerate(lengths)]
    alpha = rng.uniform(0, 1, (n, n_layers, n_heads, t)) ** 4 * 0.05
    alpha[:, 3:, :, 0] = rng.uniform(0.3, 0.95, (n, n_layers - 3, n_heads))
    score = alpha.mean(axis=2) * rng.uniform(0.8, 1.0, (n, n_layers, t))
    cos = rng.uniform(-0.3, 0.5, (n, n_layers, t))
    cos[:, :, 0] = 1.0
    for p in secondary:
        cos[:, 2:9, p] = 0.95
        score[:, 2:9, p] = 0.2
        alpha[:, 2:9, :, p] = 0.25
    layered = valid[:, None, :]
    score = np.where(layered, score, np.nan)
    score[np.arange(n), :, np.array(lengths) - 1] = np.nan  # the last token has no later query
    return SinkMeasurement(
        model=model, prepend_bos=False, token_ids=[list(range(k)) for k in lengths], tokens=tokens, lengths=np.array(lengths),
        alpha=np.where(valid[:, None, None, :], alpha, np.nan), sink_score=score,
        resid_norm=np.where(layered, 1.0, np.nan) * np.ones((n, n_layers, t)), cos_to_first=np.where(layered, cos, np.nan),
        first_resid=np.ones((n, n_layers, 8)), top_dims=np.zeros((n, n_layers, t, TOP_DIMS), dtype=np.int32),
        top_values=np.ones((n, n_layers, t, TOP_DIMS)), median_abs=np.ones((n, n_layers)), next_token_loss=np.ones((n, t)),
        metadata={},
    )
