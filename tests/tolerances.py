"""How far two computations of the same statistic may lie apart, derived from floating-point arithmetic.

Two computations that differ only in shape or kernel (a sequence alone or inside a padded batch,
sub-batches of another size, stacked copies of a batch, fused attention blocks against the
eager pattern, another CPU's BLAS kernels) add the same products in another order, so their
results differ by rounding. How much depends on the format, on how long the sums are, on how
deep in the model the value sits and on how large the values are, never on the machine the test
was written on. This module states that dependence once; each test names the statistic and the
layer, and gets a bound.

**The rounding model.** Higham and Mary (SIAM J. Sci. Comput. 41(5), 2019) show that an inner
product of length ``n``, summed in any order in a format with unit roundoff ``u``, has a
relative error (relative to ``sum |a_i b_i|``) of at most ``lam * sqrt(n) * u`` with probability
at least ``1 - 2 exp(-lam**2 / 2)``; ``lam = 6`` (:data:`LAM`) makes that 1 - 3e-8 per sum.
A transformer block is a fixed number of such sums over its input (the longest is ``n`` =
max(d_model, d_mlp, number of keys)), and the residual stream carries each block's error into
the next, so after block ``l`` (0-based) the relative error of an activation, measured against
the size of the vector it belongs to, is at most

    eps_l = (l + 1) * lam * sqrt(n) * u                                  (:func:`depth_error`)

(linear in depth: errors of successive blocks add up in the residual stream). Each of two
computations lies within ``eps_l`` of the exact value, so the two lie within ``2 * eps_l`` of
each other (:func:`path_bound`). What "the size" is, per statistic (:func:`field_bound`):

* residual-stream values (``first_resid``, ``top_values``) and norms (``resid_norm``): the
  norm of that position's residual vector, ``||h_t||`` (massive activations are in the
  thousands, so a fixed absolute tolerance would be meaningless there);
* the per-layer median of ``|h|``: a median moves by at most the largest change of any of its
  elements, so the largest ``||h_t||`` of the sequence;
* cosines: ``|d cos(x, y)| <= 2 (|dx| / |x| + |dy| / |y|)``, both relative errors ``eps``,
  so 4 per computation, magnitude 1;
* attention probabilities (``alpha``, the sink score, attention to the first key): magnitude
  1, their range. This is an assumption, not a derivation: the softmax's sensitivity to its
  logits could in principle multiply the error by the logits' size, but the logits' rounding
  errors do not add up coherently. :mod:`test_tolerances` checks the whole model,
  probabilities included, against float64 arithmetic (``u = 2**-53``, so float64 stands in for
  the exact value) on every packaged model, on every kernel path CI runs;
* the next-token loss: a log-softmax of logits, ``|d loss| <= 2 max |d logit|``; a logit's
  error after the last block is ``eps_L`` times the largest ``|logit|`` of that position
  (:func:`loss_bound`).

**bfloat16 against float32.** bfloat16 rounds every stored weight and activation to 8
significant bits (``u = 2**-8``); the sums themselves accumulate in float32. A block's
product ``w * x`` of two rounded operands, stored rounded, carries three roundings:
``3 u`` per block in the worst case, with no cancellation assumed (:data:`BF16_PER_BLOCK`).
After block ``l``: ``(l + 1) * 3 * u``, which grows to tenths in the last layers of a 30-layer
model: single bfloat16 cells can differ from float32 by that much (a Qwen head's alpha moves by
0.28), and a test must not promise more.

**Discrete results** (a top-k dimension, an indicator ``alpha > eps``, a sink set) agree except
where the continuous value lies within its bound of the threshold or of a tie:
:func:`margin_mask` computes where agreement is owed.

**Exact equality** stays where it is exact by construction (the same shapes on the same
kernels, deterministic resume, pad positions that never count); those tests say so.
"""

from __future__ import annotations

import math

import numpy as np

#: Higham and Mary's lambda: the bound holds with probability 1 - 2 exp(-lam^2 / 2) = 1 - 3e-8 per sum
LAM = 6.0
#: unit roundoff (half the machine epsilon) of the formats the suite compares
UNIT_ROUNDOFF = {"float32": 2.0**-24, "bfloat16": 2.0**-8, "float16": 2.0**-11, "float64": 2.0**-53}
#: bfloat16: rounded weight, rounded input, rounded output of each block's products, no cancellation assumed
BF16_PER_BLOCK = 3.0


def longest_sum(cfg, n_keys: int = 0) -> int:
    """The longest inner product of one block of a model with this TransformerLens config."""
    d_mlp = int(getattr(cfg, "d_mlp", 0) or 0)
    return max(int(cfg.d_model), d_mlp, int(n_keys))


def depth_error(layer, n: int, dtype: str = "float32") -> np.ndarray:
    """Relative error of one computation after block ``layer`` (0-based; an array works too)."""
    u = UNIT_ROUNDOFF[dtype]
    per_block = BF16_PER_BLOCK * u if dtype == "bfloat16" else LAM * math.sqrt(n) * u
    return (np.asarray(layer, dtype=float) + 1.0) * per_block


def path_bound(layer, n: int, dtype: str = "float32") -> np.ndarray:
    """Two float32 computations of the same value, each within :func:`depth_error`: twice that."""
    return 2.0 * depth_error(layer, n, dtype)


def _layers(n_layers: int, ndim: int, layer_axis: int) -> np.ndarray:
    shape = [1] * ndim
    shape[layer_axis] = n_layers
    return np.arange(n_layers).reshape(shape)


def field_bound(name: str, reference, n: int, *, dtype: str = "float32", paths: int = 2, layer_axis: int = 1) -> np.ndarray:
    """The bound for field ``name`` of a :class:`~circuits.measure.SinkMeasurement`, broadcast to
    the field's shape (``reference`` supplies the magnitudes: its ``resid_norm``).

    ``paths``: how many computations in ``dtype`` whose errors add up: 2 for two float32 paths,
    1 for one against float64 (exact), 1 for bfloat16 against float32 (whose own error is then
    negligible).
    """
    value = getattr(reference, name)
    n_layers = reference.resid_norm.shape[1]
    err = paths * depth_error(_layers(n_layers, value.ndim, layer_axis), n, dtype)
    norms = reference.resid_norm  # [N, L, T]
    if name in ("alpha", "sink_score"):
        return np.broadcast_to(err, value.shape)
    if name == "cos_to_first":
        return np.broadcast_to(4.0 * err, value.shape)
    if name == "resid_norm":
        return err * norms
    if name == "top_values":
        return err * norms[..., None]
    if name == "first_resid":
        return err * norms[:, :, :1]
    if name == "median_abs":
        return err * np.nanmax(norms, axis=-1)
    raise KeyError(f"no rounding bound is stated for field {name!r}")


def loss_bound(max_abs_logit, n_layers: int, n: int, *, dtype: str = "float32", paths: int = 2) -> np.ndarray:
    """-log p(next token) of ``paths`` computations: each within ``2 * eps_L * max |logit|``
    (``max_abs_logit``: per position; the unembedding is one more block, ``eps_L``)."""
    return paths * 2.0 * depth_error(n_layers, n, dtype) * np.asarray(max_abs_logit)


def assert_top_dims_agree(dims_a, values_a, dims_b, values_b, bound, what: str) -> None:
    """The top-|value| dimensions of two computations agree, except at a near tie: where rank
    ``j`` names another dimension, ``|value|`` at rank ``j`` lies within ``bound`` of a
    neighbouring rank's (the last rank's neighbour, rank K + 1, is not stored: there the
    values themselves must agree, which :func:`assert_within` checks on ``top_values``)."""
    dims_a, dims_b = np.asarray(dims_a), np.asarray(dims_b)
    mag = np.abs(np.asarray(values_a, dtype=float))
    bound = np.broadcast_to(np.asarray(bound, dtype=float), mag.shape)
    gap_above = np.full(mag.shape, np.inf)
    gap_above[..., 1:] = mag[..., :-1] - mag[..., 1:]
    gap_below = np.zeros(mag.shape)  # rank K's lower neighbour is unknown: owed nothing more
    gap_below[..., :-1] = mag[..., :-1] - mag[..., 1:]
    tie = (gap_above <= 2 * bound) | (gap_below <= 2 * bound)
    wrong = (dims_a != dims_b) & ~tie
    if wrong.any():
        i = np.argwhere(wrong)[0]
        raise AssertionError(f"{what}: top dimensions differ away from a tie at index {tuple(int(j) for j in i)}: "
                             f"{dims_a[tuple(i[:-1])].tolist()} vs {dims_b[tuple(i[:-1])].tolist()}")


def margin_mask(value, threshold, bound) -> np.ndarray:
    """Where an indicator ``value > threshold`` is owed to agree: the value lies farther than its
    bound from the threshold (NaN values, pads, owe nothing)."""
    value = np.asarray(value, dtype=float)
    with np.errstate(invalid="ignore"):
        return np.abs(value - threshold) > bound


def assert_within(a, b, bound, what: str) -> None:
    """``|a - b| <= bound`` elementwise, NaN exactly where the other is NaN; the message names
    the worst element, its difference and its bound."""
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    bound = np.broadcast_to(np.asarray(bound, dtype=float), a.shape)
    np.testing.assert_array_equal(np.isnan(a), np.isnan(b), err_msg=f"{what}: NaN positions differ")
    diff = np.where(np.isnan(a), 0.0, np.abs(a - b))
    over = diff - bound
    if (over > 0).any():
        i = np.unravel_index(int(np.argmax(over)), a.shape)
        raise AssertionError(f"{what}: |a - b| = {diff[i]:.3g} > bound {bound[i]:.3g} at index {tuple(int(j) for j in i)} "
                             f"(a = {a[i]:.6g}, b = {b[i]:.6g}; {int((over > 0).sum())} of {a.size} elements over)")


def max_abs_logit(model, tokens) -> np.ndarray:
    """The largest ``|logit|`` at every position ([N, T]): the size the loss's error is relative to."""
    import torch  # heavy only for the tests that need it

    with torch.no_grad():
        return model(tokens).abs().amax(-1).float().numpy()


def assert_measurements_agree(a, b, model, tokens, *, fields=None, paths: int = 2, dtype: str = "float32", what: str = "",
                              max_logit=None) -> None:
    """Two :class:`~circuits.measure.SinkMeasurement` of the same sequences agree within the
    rounding model: every array field within :func:`field_bound` (magnitudes from ``a``), the
    loss within :func:`loss_bound` (``max_logit``: the run's largest ``|logit|`` per position,
    by default the plain forward's), the top dimensions except at near ties."""
    fields = fields or ("alpha", "sink_score", "cos_to_first", "first_resid", "resid_norm", "top_values", "median_abs",
                        "next_token_loss", "top_dims")
    n = longest_sum(model.cfg, tokens.shape[-1])
    for name in fields:
        if name == "next_token_loss":
            logit = max_abs_logit(model, tokens) if max_logit is None else max_logit
            bound = loss_bound(logit, a.n_layers, n, dtype=dtype, paths=paths)
            assert_within(a.next_token_loss, b.next_token_loss, bound, f"{what}next_token_loss")
        elif name == "top_dims":
            assert_top_dims_agree(a.top_dims, a.top_values, b.top_dims, b.top_values,
                                  field_bound("top_values", a, n, dtype=dtype, paths=paths), f"{what}top_dims")
        else:
            assert_within(getattr(a, name), getattr(b, name), field_bound(name, a, n, dtype=dtype, paths=paths), f"{what}{name}")


def frame_bounds(frame, effect, model, tokens, *, eps: float = 0.3, paths: int = 2) -> np.ndarray:
    """Per row of an effect frame (``interventions.effect.Effect.frame``), the bound its
    ``clean`` and ``intervened`` means owe under the rounding model; ``delta`` owes their sum.
    ``effect`` supplies the magnitudes (its clean and intervened measurements):

    * ``sink_score`` / ``target_sink_score``: probabilities of the row's layer (the deepest for
      the target row, a mean over layers);
    * ``sink_rate`` (percent of (layer, head) cells with alpha > eps, per sequence, then averaged):
      a cell may flip only where its alpha lies within its bound of eps, so the bound is 100 times
      the mean over sequences of the share of such cells at that position, in either run;
    * ``next_token_loss``: :func:`loss_bound` at the largest ``|logit|`` of the batch; ``kl``, a
      difference of two log-softmaxes: twice that.
    """
    n = longest_sum(model.cfg, tokens.shape[-1])
    n_layers = effect.clean.n_layers
    loss = float(loss_bound(np.nanmax(max_abs_logit(model, tokens)), n_layers, n, paths=paths))
    alpha_bound = paths * depth_error(np.arange(n_layers)[None, :, None, None], n)  # [1, L, 1, 1]
    near = [margin_mask(m.alpha, eps, alpha_bound) | np.isnan(m.alpha) for m in (effect.clean, effect.intervened)]
    near_share = np.nanmax([100.0 * (1.0 - owed.mean(axis=(1, 2))).mean(axis=0) for owed in near], axis=0)  # [T]
    out = np.empty(len(frame))
    for i, row in enumerate(frame.itertuples()):
        layer = n_layers - 1 if row.metric == "target_sink_score" or _missing(row.layer) else int(row.layer)
        out[i] = {"sink_score": paths * depth_error(layer, n), "target_sink_score": paths * depth_error(layer, n),
                  "next_token_loss": loss, "kl": 2 * loss}.get(row.metric, np.nan)
        if row.metric == "sink_rate":
            out[i] = near_share[int(row.position)]
    if np.isnan(out).any():
        raise KeyError(f"no rounding bound is stated for metric(s) {sorted(set(frame['metric'][np.isnan(out)]))}")
    return out


def _missing(x) -> bool:
    import pandas as pd  # heavy only for the tests that compare frames

    return bool(pd.isna(x))


def assert_frames_agree(a, b, effect, model, tokens, *, eps: float = 0.3, paths: int = 2, what: str = "") -> None:
    """Two effect frames of the same cells: ``n`` exactly, ``clean`` / ``intervened`` within
    :func:`frame_bounds`, ``delta`` within the sum of both. The bootstrap CI columns are not
    compared: a BCa endpoint is discontinuous in rounding (its bias correction counts the
    resamples whose mean lies below the observed mean, and a resample that permutes the sequences
    has that very mean, up to rounding), so two computations that differ in the last bits can
    move an endpoint by far more than the bits. They are compared where the runs are identical."""
    assert list(a["metric"]) == list(b["metric"]), f"{what}rows differ"
    np.testing.assert_array_equal(a["n"].to_numpy(float), b["n"].to_numpy(float), err_msg=f"{what}n")
    bound = frame_bounds(a, effect, model, tokens, eps=eps, paths=paths)
    for col, scale in (("clean", 1.0), ("intervened", 1.0), ("delta", 2.0)):
        assert_within(a[col].to_numpy(float), b[col].to_numpy(float), scale * bound, f"{what}{col}")


def assert_logits_agree(a, b, cfg, what: str = "logits", paths: int = 2) -> None:
    """Logits of two computations of the same forward (the bridge against plain transformers,
    a resumed forward against a full one): after every block and the unembedding, within
    ``paths`` times :func:`depth_error` at depth ``n_layers``, relative to the largest
    ``|logit|`` of that position."""
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    n = longest_sum(cfg, a.shape[-2] if a.ndim >= 2 else 0)
    bound = paths * depth_error(int(cfg.n_layers), n) * np.abs(a).max(axis=-1, keepdims=True)
    assert_within(a, b, bound, what)
