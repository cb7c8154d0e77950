"""The statistics every report shares: valid-position masks, NaN-aware means, bootstrap CIs, correlations.

Why one module: a sink statistic is only comparable across the toolkit if every part of it masks
pads the same way and draws its uncertainty the same way. Before this module the position mask
was written in five places and the bootstrap in two (with two random streams); now
:mod:`circuits.measure`, :mod:`circuits.analyses`, :mod:`interventions.effect` and the reports
call these functions.

* :func:`valid_positions`: which positions of a right-padded batch are real tokens (or have a
  real token ``offset`` steps later: ``offset=1`` is "has a next token").
* :func:`nanmean`: ``np.nanmean`` without the warning for all-NaN slices (positions that no
  sequence reaches are NaN by design); :func:`nanmean_t`, its torch twin for hooks.
* :func:`bootstrap_ci`: bias-corrected and accelerated (BCa) bootstrap CIs of the mean over sequences,
  vectorised over columns, with :func:`scipy.stats.bootstrap`; :func:`paired_bootstrap` is its
  use on per-sequence differences of two runs (computed in float64).
* :func:`correlations`: Pearson and Spearman over the finite pairs.
"""

from __future__ import annotations

import warnings

import numpy as np
import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

MIN_SEQUENCES = 3  #: fewer sequences than this: no bootstrap CI (NaN)


def valid_positions(lengths: Int[Tensor, " batch"], width: int, *, offset: int = 0) -> Bool[Tensor, "batch pos"]:
    """True at position ``t < width`` where ``t + offset`` is a real token of its sequence.

    Batches are right-padded, so a sequence of length ``n`` is real at ``0..n-1``. ``offset=1``
    marks the positions that have a next token (next-token loss, KL of the next-token
    distribution). The mask is on ``lengths``' device.
    """
    pos = torch.arange(width, device=lengths.device)
    return (pos[None, :] + offset) < lengths[:, None]


def nanmean(a: np.ndarray, axis=None) -> np.ndarray:
    """np.nanmean without the warning for all-NaN slices (positions no sequence reaches)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return np.nanmean(a, axis=axis)


def nanmean_t(x: Tensor) -> Tensor:
    """Mean over the last axis of a tensor ignoring NaN (an all-NaN row gives NaN), inside hooks."""
    ok = ~torch.isnan(x)
    return torch.where(ok, x, 0.0).sum(-1) / ok.sum(-1)


def bootstrap_ci(
    values: Float[np.ndarray, "seq cells"] | Float[np.ndarray, " seq"],
    *,
    confidence: float = 0.95,
    n_resamples: int = 2000,
    seed: int = 0,
    legacy_rng: bool = False,
) -> tuple[Float[np.ndarray, " cells"], Float[np.ndarray, " cells"]]:
    """Bootstrap CI over sequences (rows) of the mean of every column.

    NaN entries (a sequence that does not reach a position) are left out of that column.
    Columns with fewer than :data:`MIN_SEQUENCES` values get NaN; columns whose values are all
    equal get a zero-width interval at that value (nothing varies to resample). Others use
    ``scipy.stats.bootstrap`` (BCa), vectorised over columns that share the same sequences, and
    the percentile method where BCa is undefined. ``n_resamples=0`` turns the intervals off (all
    NaN): for exploratory sweeps where only the means are read.

    The resampling runs in the dtype given (float32 values are resampled as float32); integer
    input is taken as float64. The random stream is ``np.random.default_rng(seed)``, or with
    ``legacy_rng`` numpy's ``RandomState(seed)``: the stream of the published Sink_k^eps CIs of
    ``sinks.json`` and the Gu et al. report, kept so those numbers stay what they were.
    """
    from scipy import stats  # heavy: scipy.stats adds ~0.5 s to an import of circuits.measure

    data = np.asarray(values)
    if data.dtype.kind != "f":
        data = data.astype(np.float64)
    if data.ndim == 1:
        data = data[:, None]
    c = data.shape[1]
    low, high = np.full(c, np.nan), np.full(c, np.nan)
    if n_resamples == 0:
        return low, high
    valid = ~np.isnan(data)
    patterns, group = np.unique(valid.T, axis=0, return_inverse=True)
    for g, rows in enumerate(patterns):
        cols = np.flatnonzero(group.ravel() == g)
        if rows.sum() < MIN_SEQUENCES:
            continue
        block = data[rows][:, cols]
        flat = np.ptp(block, axis=0) == 0
        low[cols[flat]] = high[cols[flat]] = block[0, flat]
        vary_cols, sample = cols[~flat], block[:, ~flat]
        if not len(vary_cols):
            continue
        batch = max(1, min(n_resamples, int(4e6 // max(1, sample.size))))
        for method in ("BCa", "percentile"):
            rng = {"random_state": np.random.RandomState(seed)} if legacy_rng else {"rng": np.random.default_rng(seed)}
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                res = stats.bootstrap(
                    (sample,), np.mean, axis=0, vectorized=True, n_resamples=n_resamples, batch=batch,
                    confidence_level=confidence, method=method, **rng,
                )
            lo, hi = np.atleast_1d(res.confidence_interval.low), np.atleast_1d(res.confidence_interval.high)
            ok = np.isfinite(lo) & np.isfinite(hi)
            pending = np.isnan(low[vary_cols])
            low[vary_cols[ok & pending]], high[vary_cols[ok & pending]] = lo[ok & pending], hi[ok & pending]
            if ok.all():
                break
            vary_cols, sample = vary_cols[~ok], sample[:, ~ok]
    return low, high


def paired_bootstrap(
    deltas: Float[np.ndarray, "seq cells"] | Float[np.ndarray, " seq"],
    *,
    confidence: float = 0.95,
    n_resamples: int = 2000,
    seed: int = 0,
) -> tuple[Float[np.ndarray, " cells"], Float[np.ndarray, " cells"]]:
    """:func:`bootstrap_ci` of per-sequence differences between two runs of the same sequences
    (paired: the statistic is the mean of the per-sequence deltas), in float64."""
    return bootstrap_ci(np.asarray(deltas, dtype=np.float64), confidence=confidence, n_resamples=n_resamples, seed=seed)


def correlations(x: np.ndarray, y: np.ndarray) -> dict[str, float]:
    """Pearson r and Spearman rho (with p-values) over the finite pairs; NaN with < 3 pairs."""
    from scipy import stats  # heavy: scipy.stats adds ~0.5 s to an import of circuits.measure

    x, y = np.asarray(x, float), np.asarray(y, float)
    ok = np.isfinite(x) & np.isfinite(y)
    n = int(ok.sum())
    if n < 3 or np.ptp(x[ok]) == 0 or np.ptp(y[ok]) == 0:
        return {"n": n, "pearson": float("nan"), "pearson_p": float("nan"), "spearman": float("nan"), "spearman_p": float("nan")}
    pr = stats.pearsonr(x[ok], y[ok])
    sr = stats.spearmanr(x[ok], y[ok])
    return {"n": n, "pearson": float(pr[0]), "pearson_p": float(pr[1]), "spearman": float(sr[0]), "spearman_p": float(sr[1])}


__all__ = ["MIN_SEQUENCES", "bootstrap_ci", "correlations", "nanmean", "nanmean_t", "paired_bootstrap", "valid_positions"]
