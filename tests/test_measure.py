"""Specification tests for circuits.measure (and the tokenization it depends on).

Conventions checked here (see docs/science.md):

* positions are 0-based: the papers' Sink_1 is position 0;
* alpha[l, h, k] = sum_{t=k}^{T-1} A[t, k] / (T - k)   (queries t >= k, self included);
* sink score[l, k] = mean over heads of sum_{t>k} A[t, k] / (T - 1 - k)   (strictly later
  queries; NaN for the last real token, which has none);
* Sink_k^eps = 100 * mean over sequences of (share of (layer, head) with alpha > eps),
  thresholded per sequence *before* averaging;
* pad positions (right padding) never count and hold NaN (or -1 for integer arrays).

Every expected number is written as a literal with the arithmetic in a comment.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from circuits.measure import (
    TOP_DIMS,
    SinkMeasurement,
    attention_received,
    lower_median_abs,
    measure,
    next_token_loss,
    residual_statistics,
)
from circuits.models import tiny_model
from circuits.probes import TokenBatch, TokenizationError, tokenize

BOS_ID, PAD_ID = 256, 258  # the tiny models' byte tokenizer: 256 bytes, then <bos>, <eos>, <pad>


# ============================================================================ attention_received


def _two_sequence_pattern(garbage: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Batch 2, 2 heads, T=4. Sequence 1 has length 3: its row 3 and column 3 are padding."""
    g = garbage
    seq0 = [
        [  # head 0
            [1.0, 0.0, 0.0, 0.0],
            [0.6, 0.4, 0.0, 0.0],
            [0.5, 0.2, 0.3, 0.0],
            [0.4, 0.1, 0.2, 0.3],
        ],
        [  # head 1
            [1.0, 0.0, 0.0, 0.0],
            [0.9, 0.1, 0.0, 0.0],
            [0.8, 0.1, 0.1, 0.0],
            [0.7, 0.1, 0.1, 0.1],
        ],
    ]
    seq1 = [
        [  # head 0; pad row 3 and pad column 3 hold garbage
            [1.0, 0.0, 0.0, g],
            [0.5, 0.5, 0.0, g],
            [0.2, 0.2, 0.6, g],
            [g, g, g, g],
        ],
        [  # head 1
            [1.0, 0.0, 0.0, g],
            [0.7, 0.3, 0.0, g],
            [0.4, 0.4, 0.2, g],
            [g, g, g, g],
        ],
    ]
    return torch.tensor([seq0, seq1], dtype=torch.float32), torch.tensor([4, 3])


@pytest.mark.parametrize("garbage", [7.0, -3.0, float("nan")])
def test_attention_received_alpha_by_hand(garbage):
    pattern, lengths = _two_sequence_pattern(garbage)
    alpha, _ = attention_received(pattern, lengths)
    assert alpha.shape == (2, 2, 4)
    expected_seq0 = [
        # k=0: (1+.6+.5+.4)/4, k=1: (.4+.2+.1)/3, k=2: (.3+.2)/2, k=3: .3/1
        [0.625, 0.7 / 3, 0.25, 0.3],
        # k=0: (1+.9+.8+.7)/4, k=1: (.1+.1+.1)/3, k=2: (.1+.1)/2, k=3: .1/1
        [0.85, 0.1, 0.1, 0.1],
    ]
    expected_seq1 = [
        # T=3. k=0: (1+.5+.2)/3, k=1: (.5+.2)/2, k=2: .6/1
        [1.7 / 3, 0.35, 0.6],
        # k=0: (1+.7+.4)/3, k=1: (.3+.4)/2, k=2: .2/1
        [0.7, 0.35, 0.2],
    ]
    np.testing.assert_allclose(alpha[0].numpy(), expected_seq0, rtol=1e-6)
    np.testing.assert_allclose(alpha[1, :, :3].numpy(), expected_seq1, rtol=1e-6)
    # the pad key of sequence 1 is NaN in every head, whatever the garbage
    assert torch.isnan(alpha[1, :, 3]).all()


@pytest.mark.parametrize("garbage", [7.0, -3.0, float("nan")])
def test_attention_received_sink_score_by_hand(garbage):
    pattern, lengths = _two_sequence_pattern(garbage)
    _, score = attention_received(pattern, lengths)
    assert score.shape == (2, 4)
    # sequence 0, strictly later queries, then the mean over the 2 heads:
    #   k=0: head0 (.6+.5+.4)/3 = .5,  head1 (.9+.8+.7)/3 = .8  -> (.5+.8)/2 = .65
    #   k=1: head0 (.2+.1)/2 = .15,    head1 (.1+.1)/2 = .1     -> .125
    #   k=2: head0 .2/1 = .2,          head1 .1/1 = .1          -> .15
    #   k=3: last token, no later query                          -> NaN
    np.testing.assert_allclose(score[0, :3].numpy(), [0.65, 0.125, 0.15], rtol=1e-6)
    assert torch.isnan(score[0, 3])
    # sequence 1 (length 3):
    #   k=0: head0 (.5+.2)/2 = .35,    head1 (.7+.4)/2 = .55    -> .45
    #   k=1: head0 .2/1 = .2,          head1 .4/1 = .4          -> .3
    #   k=2: last real token -> NaN;   k=3: pad -> NaN
    np.testing.assert_allclose(score[1, :2].numpy(), [0.45, 0.3], rtol=1e-6)
    assert torch.isnan(score[1, 2:]).all()


def test_attention_received_excludes_self_attention_from_sink_score_only():
    # One head, T=2: query 1 puts everything on itself.
    pattern = torch.tensor([[[[1.0, 0.0], [0.0, 1.0]]]])
    alpha, score = attention_received(pattern, torch.tensor([2]))
    # alpha counts self-attention: k=0: (1+0)/2 = .5, k=1: 1/1 = 1
    np.testing.assert_allclose(alpha[0, 0].numpy(), [0.5, 1.0])
    # the sink score does not: k=0 gets 0 from its only later query; k=1 is last -> NaN
    assert score[0, 0].item() == 0.0
    assert torch.isnan(score[0, 1])


def test_attention_received_single_token_sequence():
    # length 1: alpha_0 = A[0,0]/1 = 1; no later query, so the sink score is NaN.
    pattern = torch.tensor([[[[1.0, 5.0], [5.0, 5.0]]]])  # everything but [0,0] is padding
    alpha, score = attention_received(pattern, torch.tensor([1]))
    assert alpha[0, 0, 0].item() == 1.0
    assert torch.isnan(alpha[0, 0, 1])
    assert torch.isnan(score[0]).all()


# ============================================================================ Sink_k^eps


def _measurement_from_alpha(alpha: np.ndarray, lengths: list[int]) -> SinkMeasurement:
    """A SinkMeasurement whose only meaningful field is alpha (others NaN, right shapes)."""
    n, n_layers, _, t = alpha.shape
    d = 4
    nan = lambda *shape: np.full(shape, np.nan)  # noqa: E731
    return SinkMeasurement(
        model="hand",
        prepend_bos=False,
        token_ids=[list(range(k)) for k in lengths],
        tokens=[[f"t{i}" for i in range(k)] for k in lengths],
        lengths=np.array(lengths),
        alpha=alpha,
        sink_score=nan(n, n_layers, t),
        resid_norm=nan(n, n_layers, t),
        cos_to_first=nan(n, n_layers, t),
        first_resid=nan(n, n_layers, d),
        top_dims=np.full((n, n_layers, t, TOP_DIMS), -1),
        top_values=nan(n, n_layers, t, TOP_DIMS),
        median_abs=nan(n, n_layers),
        next_token_loss=nan(n, t),
    )


def test_sink_rate_thresholds_per_sequence_before_averaging():
    # 2 sequences, 1 layer, 1 head, 1 position. alpha_0 = 0.5 and 0.2.
    alpha = np.array([0.5, 0.2]).reshape(2, 1, 1, 1)
    meas = _measurement_from_alpha(alpha, [1, 1])
    # per sequence: 1[.5 > .3] = 1, 1[.2 > .3] = 0 -> mean .5 -> 50 %
    # (thresholding the average would give 1[(.5+.2)/2 = .35 > .3] = 100 %: wrong)
    np.testing.assert_allclose(meas.sink_indicator(0.3)[:, 0], [1.0, 0.0])
    np.testing.assert_allclose(meas.sink_rate(0.3), [50.0])
    assert meas.alpha_mean()[0, 0, 0] == pytest.approx(0.35)  # the average itself is above eps


def test_sink_rate_is_in_percent_over_layers_heads_and_sequences():
    # 2 sequences, 2 layers, 2 heads, T=3; sequence 1 has length 2 (position 2 is pad).
    alpha = np.array(
        [
            # seq 0: layer 0 heads, layer 1 heads; positions 0..2
            [[[0.9, 0.05, 0.4], [0.2, 0.5, 0.1]], [[0.8, 0.1, 0.1], [0.7, 0.1, 0.5]]],
            # seq 1
            [[[0.1, 0.6, np.nan], [0.9, 0.1, np.nan]], [[0.2, 0.2, np.nan], [0.35, 0.1, np.nan]]],
        ]
    )
    meas = _measurement_from_alpha(alpha, [3, 2])
    ind = meas.sink_indicator(0.3)
    # seq 0: k=0: .9 .2 .8 .7 -> 3/4;  k=1: .05 .5 .1 .1 -> 1/4;  k=2: .4 .1 .1 .5 -> 2/4
    # seq 1: k=0: .1 .9 .2 .35 -> 2/4; k=1: .6 .1 .2 .1 -> 1/4;   k=2: pad -> NaN
    np.testing.assert_allclose(ind[0], [0.75, 0.25, 0.5])
    np.testing.assert_allclose(ind[1, :2], [0.5, 0.25])
    assert np.isnan(ind[1, 2])
    # Sink rate in percent, averaged over the sequences that have the position:
    # k=0: 100*(.75+.5)/2 = 62.5; k=1: 100*(.25+.25)/2 = 25; k=2: only seq 0 -> 100*.5 = 50
    np.testing.assert_allclose(meas.sink_rate(0.3), [62.5, 25.0, 50.0])
    # eps is a parameter: with eps = .6, k=0: seq0 .9 .8 .7 -> 3/4, seq1 .9 -> 1/4 -> 50 %
    assert meas.sink_rate(0.6)[0] == pytest.approx(50.0)
    # the threshold is strict: alpha == eps is not a sink (seq 1, k=0 has .35)
    assert meas.sink_indicator(0.35)[1, 0] == pytest.approx(0.25)  # only the .9


# ============================================================================ residual_statistics


def test_residual_statistics_by_hand():
    resid = torch.tensor(
        [
            [  # sequence 0, length 3
                [2.0, -3.0, 6.0, 0.0],  # |h| = sqrt(4+9+36+0) = 7
                [4.0, -6.0, 12.0, 0.0],  # 2 * h0: |h| = 14, cos = 1
                [-4.0, 0.0, 0.0, 3.0],  # |h| = 5, cos = (2*-4)/(7*5) = -8/35
            ],
            [  # sequence 1, length 2; position 2 is padding with garbage
                [0.0, 0.0, 0.0, 2.0],  # |h| = 2
                [0.0, 0.0, 3.0, 4.0],  # |h| = 5, cos = (2*4)/(2*5) = .8
                [9.0, 9.0, 9.0, 9.0],
            ],
        ]
    )
    stats = residual_statistics(resid, torch.tensor([3, 2]))
    np.testing.assert_allclose(stats["resid_norm"][0].numpy(), [7.0, 14.0, 5.0], rtol=1e-6)
    np.testing.assert_allclose(stats["resid_norm"][1, :2].numpy(), [2.0, 5.0], rtol=1e-6)
    np.testing.assert_allclose(stats["cos_to_first"][0].numpy(), [1.0, 1.0, -8 / 35], rtol=1e-6)
    np.testing.assert_allclose(stats["cos_to_first"][1, :2].numpy(), [1.0, 0.8], rtol=1e-6)
    # the primary-sink direction is the raw h_0
    np.testing.assert_array_equal(stats["first_resid"].numpy(), resid[:, 0].numpy())
    # top dims by |value|, with the signed values: h0 = [2,-3,6,0] -> dims 2 (6), 1 (-3), 0 (2), 3 (0)
    assert stats["top_dims"][0, 0].tolist() == [2, 1, 0, 3]
    assert stats["top_values"][0, 0].tolist() == [6.0, -3.0, 2.0, 0.0]
    assert stats["top_dims"][0, 1].tolist() == [2, 1, 0, 3]
    assert stats["top_values"][0, 1].tolist() == [12.0, -6.0, 4.0, 0.0]
    # h2 = [-4,0,0,3]: dim 0 (-4) then dim 3 (3); the zeros tie, so only the first two are checked
    assert stats["top_dims"][0, 2, :2].tolist() == [0, 3]
    assert stats["top_values"][0, 2, :2].tolist() == [-4.0, 3.0]
    assert stats["top_dims"][1, 1, :2].tolist() == [3, 2]
    assert stats["top_values"][1, 1, :2].tolist() == [4.0, 3.0]
    # median |value| over the valid positions and all dims:
    # seq 0: 0 0 0 0 2 3 | 3 4 4 6 6 12 -> the two middle values are 3 and 3 -> 3
    # seq 1: 0 0 0 0 0 | 2 3 4 -> 8 values, middle 0 and 0 -> 0
    #        (with the pad row's four 9s it would be 2 or 2.5: padding must not count)
    np.testing.assert_allclose(stats["median_abs"].numpy(), [3.0, 0.0])
    # pad positions: NaN floats, -1 dims
    assert torch.isnan(stats["resid_norm"][1, 2])
    assert torch.isnan(stats["cos_to_first"][1, 2])
    assert torch.isnan(stats["top_values"][1, 2]).all()
    assert stats["top_dims"][1, 2].tolist() == [-1] * TOP_DIMS


def test_residual_statistics_median_convention_for_an_even_count():
    # median_abs is torch.median: for an even count it is the LOWER of the two middle values
    # (numpy would average them). With d_model * T values this is almost always even, but the
    # difference is immaterial at the 1000x ratios massive activations are judged by.
    # One position, d=4: |h| = 1 2 3 10 -> lower middle value 2 (numpy: 2.5).
    resid = torch.tensor([[[1.0, -2.0, 3.0, 10.0]]])
    stats = residual_statistics(resid, torch.tensor([1]))
    assert stats["median_abs"][0].item() == 2.0


def test_residual_statistics_agree_with_torch_reference_reductions():
    # the fast paths (selection for the median, cosine from the norms) against torch's own
    # reductions, on random blocks with odd and even counts and a padded sequence
    gen = torch.Generator().manual_seed(0)
    resid = torch.randn(3, 7, 5, generator=gen) * torch.tensor([1.0, 50.0, 0.01])[:, None, None]
    lengths = torch.tensor([7, 4, 1])
    stats = residual_statistics(resid, lengths)
    expected_median = [resid[i, : int(n)].abs().median().item() for i, n in enumerate(lengths)]
    np.testing.assert_array_equal(stats["median_abs"].numpy(), np.array(expected_median, dtype=np.float32))
    # from position 1 on (the super-neuron meter's "other tokens"); a length-1 sequence has none
    later = lower_median_abs(resid, lengths, start=1).numpy()
    np.testing.assert_array_equal(later[:2], [resid[i, 1 : int(n)].abs().median().item() for i, n in enumerate(lengths[:2])])
    assert np.isnan(later[2])
    cos = torch.nn.functional.cosine_similarity(resid, resid[:, :1], dim=-1)
    for i, n in enumerate(lengths.tolist()):
        np.testing.assert_allclose(stats["cos_to_first"][i, :n].numpy(), cos[i, :n].numpy(), atol=1e-6)


# ============================================================================ next_token_loss


def test_next_token_loss_by_hand():
    ln = math.log
    tokens = torch.tensor([[0, 2, 1], [1, 0, 2]])  # sequence 1 has length 2 (token 2 is pad)
    batch = TokenBatch(tokens, torch.tensor([3, 2]), False, [["a", "c", "b"], ["b", "a"]])
    logits = torch.tensor(
        [
            [
                [0.0, 0.0, ln(2)],  # softmax 1/4 1/4 1/2; next token 2 -> -log(1/2) = ln 2
                [ln(3), 0.0, 0.0],  # softmax 3/5 1/5 1/5; next token 1 -> -log(1/5) = ln 5
                [5.0, -5.0, 0.0],  # last position: no next token -> NaN
            ],
            [
                [0.0, 0.0, 0.0],  # uniform; next token 0 -> ln 3
                [9.0, 9.0, 9.0],  # next "token" is padding -> NaN
                [1.0, 2.0, 3.0],  # pad -> NaN
            ],
        ]
    )
    loss = next_token_loss(logits, batch)
    np.testing.assert_allclose(loss[0, :2].numpy(), [ln(2), ln(5)], rtol=1e-6)
    assert loss[1, 0].item() == pytest.approx(ln(3))
    assert torch.isnan(loss[0, 2])
    assert torch.isnan(loss[1, 1:]).all()


def test_next_token_loss_matches_manual_log_softmax():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 5, 7, generator=g)
    tokens = torch.randint(0, 7, (2, 5), generator=g)
    batch = TokenBatch(tokens, torch.tensor([5, 3]), False, [["?"] * 5, ["?"] * 3])
    loss = next_token_loss(logits, batch)
    for n, length in enumerate([5, 3]):
        for t in range(5):
            if t + 1 < length:
                row = logits[n, t]
                manual = -(row[tokens[n, t + 1]] - torch.logsumexp(row, 0))
                assert loss[n, t].item() == pytest.approx(manual.item(), rel=1e-5)
            else:
                assert math.isnan(loss[n, t].item())


# ============================================================================ tiny models


@pytest.fixture(scope="module")
def llama():
    return tiny_model("llama", n_layers=2)


@pytest.fixture(scope="module")
def tiny_models():
    return {arch: tiny_model(arch, n_layers=2) for arch in ("gpt2", "llama", "gemma3")}


# ---------------------------------------------------------------------------- tokenize


def test_tokenize_bos_policy_controls_the_first_token(llama):
    with_bos = tokenize(llama, "ab", prepend_bos=True)
    without = tokenize(llama, "ab", prepend_bos=False)
    assert with_bos.token_ids[0][0] == BOS_ID
    assert with_bos.str_tokens[0] == ["<bos>", "a", "b"]
    assert with_bos.prepend_bos is True
    assert BOS_ID not in without.token_ids[0]
    assert without.str_tokens[0] == ["a", "b"]
    assert without.prepend_bos is False
    assert with_bos.token_ids[0][1:] == without.token_ids[0]


def test_tokenize_default_policy_is_the_models_native_one(llama):
    # the tiny models declare native_bos=False; None resolves to it and is recorded
    batch = tokenize(llama, "ab")
    assert batch.prepend_bos is False
    assert batch.token_ids[0][0] != BOS_ID


@pytest.mark.parametrize(
    "texts, kwargs",
    [
        ("", {}),
        ("   \n", {}),
        (["fine", ""], {}),
        ([], {}),
        ("abc", {"max_tokens": 0}),
        ("abc", {"max_tokens": -1}),
        ("a" * 128, {"prepend_bos": True}),  # 1 + 128 tokens > n_ctx = 128
        ("a" * 129, {"prepend_bos": False}),
    ],
)
def test_tokenize_rejects_bad_input(llama, texts, kwargs):
    assert int(llama.cfg.n_ctx) == 128
    with pytest.raises(TokenizationError):
        tokenize(llama, texts, **kwargs)


def test_tokenize_context_limit_and_truncation(llama):
    assert tokenize(llama, "a" * 128, prepend_bos=False).lengths.tolist() == [128]  # exactly n_ctx is fine
    batch = tokenize(llama, "a" * 500, prepend_bos=True, max_tokens=128)
    assert batch.lengths.tolist() == [128]
    # max_tokens counts the BOS
    short = tokenize(llama, "abcdef", prepend_bos=True, max_tokens=3)
    assert short.str_tokens[0] == ["<bos>", "a", "b"]


def test_tokenize_right_pads_with_the_pad_id(llama):
    batch = tokenize(llama, ["abcd", "xy"], prepend_bos=True)
    assert batch.lengths.tolist() == [5, 3]
    assert batch.tokens.shape == (2, 5)
    assert batch.tokens[1, 3:].tolist() == [PAD_ID, PAD_ID]
    assert batch.tokens[:, 0].tolist() == [BOS_ID, BOS_ID]  # position 0 is the first token of every row
    assert batch.valid.tolist() == [[True] * 5, [True, True, True, False, False]]
    assert batch.token_ids[1] == batch.tokens[1, :3].tolist()
    sub = batch.select([1])
    assert sub.tokens.shape == (1, 3)  # trimmed to its longest sequence


def test_tokenize_str_tokens_are_readable(llama):
    text = "Hi there,\nyou"
    batch = tokenize(llama, text, prepend_bos=False)
    # byte-level: one token per byte, spaces and newlines shown as text (not 'Ġ' / 'Ċ')
    assert batch.str_tokens[0][2] == " "
    assert batch.str_tokens[0][9] == "\n"
    assert "".join(batch.str_tokens[0]) == text


# ---------------------------------------------------------------------------- measure, planted pattern


def _planted(t: int) -> torch.Tensor:
    """Query 0 sees only key 0; query t >= 1 puts .7 on key 0 and .3/t on each of keys 1..t."""
    a = torch.zeros(t, t)
    a[0, 0] = 1.0
    for q in range(1, t):
        a[q, 0] = 0.7
        a[q, 1 : q + 1] = 0.3 / q
    return a


def _plant_hook(pattern, hook):
    b, h, t, _ = pattern.shape
    return _planted(t).to(pattern)[None, None].expand(b, h, t, t).clone()


def _plant_hooks(model):
    return [(f"blocks.{layer}.attn.hook_pattern", _plant_hook) for layer in range(model.cfg.n_layers)]


# Hand values for the planted pattern.
# length 4: rows  q0 [1]  q1 [.7 .3]  q2 [.7 .15 .15]  q3 [.7 .1 .1 .1]
#   alpha: k0 (1+.7+.7+.7)/4 = .775, k1 (.3+.15+.1)/3 = .55/3, k2 (.15+.1)/2 = .125, k3 .1/1 = .1
#   score: k0 (.7*3)/3 = .7,         k1 (.15+.1)/2 = .125,     k2 .1/1 = .1,         k3 NaN
ALPHA_4 = [0.775, 0.55 / 3, 0.125, 0.1]
SCORE_4 = [0.7, 0.125, 0.1]
# length 3: alpha: k0 (1+.7+.7)/3 = .8, k1 (.3+.15)/2 = .225, k2 .15/1 = .15
#           score: k0 .7,               k1 .15/1 = .15,       k2 NaN
ALPHA_3 = [0.8, 0.225, 0.15]
SCORE_3 = [0.7, 0.15]


@pytest.mark.parametrize("batch_size", [8, 1])
def test_measure_planted_pattern_by_hand(llama, batch_size):
    # input order: the SHORT sequence first; measure sorts by length internally
    batch = tokenize(llama, ["xyz", "abcd"], prepend_bos=False)
    meas = measure(llama, batch, hooks=_plant_hooks(llama), batch_size=batch_size, progress=False)
    n_layers, n_heads = 2, 4
    assert meas.alpha.shape == (2, n_layers, n_heads, 4)
    # order of the result = order of the input
    assert meas.lengths.tolist() == [3, 4]
    assert meas.token_ids == batch.token_ids
    assert meas.tokens == batch.str_tokens
    # alpha: the same for every layer and head
    np.testing.assert_allclose(meas.alpha[0, :, :, :3], np.broadcast_to(ALPHA_3, (n_layers, n_heads, 3)), rtol=1e-5)
    np.testing.assert_allclose(meas.alpha[1], np.broadcast_to(ALPHA_4, (n_layers, n_heads, 4)), rtol=1e-5)
    np.testing.assert_allclose(meas.sink_score[0, :, :2], np.broadcast_to(SCORE_3, (n_layers, 2)), rtol=1e-5)
    np.testing.assert_allclose(meas.sink_score[1, :, :3], np.broadcast_to(SCORE_4, (n_layers, 3)), rtol=1e-5)
    # NaN: the last real token's score, and every pad position of the short sequence
    assert np.isnan(meas.sink_score[0, :, 2:]).all()
    assert np.isnan(meas.sink_score[1, :, 3]).all()
    assert np.isnan(meas.alpha[0, :, :, 3]).all()
    assert np.isnan(meas.resid_norm[0, :, 3]).all()
    assert np.isnan(meas.cos_to_first[0, :, 3]).all()
    assert np.isnan(meas.top_values[0, :, 3]).all()
    assert (meas.top_dims[0, :, 3] == -1).all()
    assert np.isnan(meas.next_token_loss[0, 2:]).all()  # positions 2 (last real) and 3 (pad)
    assert np.isnan(meas.next_token_loss[1, 3])
    assert np.isfinite(meas.next_token_loss[0, :2]).all() and np.isfinite(meas.next_token_loss[1, :3]).all()
    # Sink rates (percent), eps = .3: k0 alpha .8/.775 -> 100; nothing else above .3
    np.testing.assert_allclose(meas.sink_rate(0.3), [100.0, 0.0, 0.0, 0.0])
    # eps = .2: k1 has .225 (length 3, yes) and .183 (length 4, no) -> 50 %;
    # k2 .15/.125 -> 0; k3 (length 4 only) .1 -> 0
    np.testing.assert_allclose(meas.sink_rate(0.2), [100.0, 50.0, 0.0, 0.0])
    # the first token's sink score per sequence and layer
    np.testing.assert_allclose(meas.primary_sink_mass(), 0.7, rtol=1e-5)
    # provenance
    assert meas.model == "tiny-llama"
    assert meas.prepend_bos is False
    assert meas.metadata["prepend_bos"] is False


def test_measure_hooks_may_be_a_function_of_the_sub_batch(llama):
    batch = tokenize(llama, ["xyz", "abcd"], prepend_bos=False)
    seen = []

    def hooks_for(sub):
        seen.append(sub.lengths.tolist())
        return _plant_hooks(llama)

    meas = measure(llama, batch, hooks=hooks_for, batch_size=1, progress=False)
    assert seen == [[4], [3]]  # longest first internally
    np.testing.assert_allclose(meas.alpha[0, 0, 0, :3], ALPHA_3, rtol=1e-5)


def test_measure_padding_never_counts(llama):
    """A sequence gives the same statistics alone and padded next to a longer one."""
    texts = ["The cat sat.", "A much longer sentence that forces padding on the first one."]
    batch = tokenize(llama, texts, prepend_bos=True)
    alone = measure(llama, tokenize(llama, texts[0], prepend_bos=True), progress=False)
    both = measure(llama, batch, progress=False)
    n = int(batch.lengths[0])
    assert both.lengths.tolist()[0] == n and both.n_positions > n
    assert alone.n_positions == n
    kw = dict(rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(both.alpha[0, :, :, :n], alone.alpha[0], **kw)
    np.testing.assert_allclose(both.sink_score[0, :, :n], alone.sink_score[0], **kw)
    np.testing.assert_allclose(both.resid_norm[0, :, :n], alone.resid_norm[0], **kw)
    np.testing.assert_allclose(both.cos_to_first[0, :, :n], alone.cos_to_first[0], **kw)
    np.testing.assert_allclose(both.median_abs[0], alone.median_abs[0], **kw)
    np.testing.assert_allclose(both.first_resid[0], alone.first_resid[0], **kw)
    np.testing.assert_allclose(both.next_token_loss[0, :n], alone.next_token_loss[0], **kw)
    np.testing.assert_allclose(both.top_values[0, :, :n], alone.top_values[0], **kw)
    # everything past the end of sequence 0 is NaN
    assert np.isnan(both.alpha[0, :, :, n:]).all()
    assert np.isnan(both.sink_score[0, :, n - 1 :]).all()
    assert np.isnan(both.resid_norm[0, :, n:]).all()
    assert np.isnan(both.next_token_loss[0, n - 1 :]).all()


def test_measure_next_token_loss_matches_the_models_logits(llama):
    batch = tokenize(llama, ["hello world", "hi"], prepend_bos=True)
    meas = measure(llama, batch, progress=False)
    with torch.no_grad():
        logits = llama(batch.tokens, return_type="logits").float()
    logp = torch.log_softmax(logits, dim=-1)
    for n, length in enumerate(batch.lengths.tolist()):
        for t in range(length - 1):
            manual = -logp[n, t, batch.tokens[n, t + 1]].item()
            assert meas.next_token_loss[n, t] == pytest.approx(manual, rel=1e-4)


def test_measure_residual_statistics_match_the_cache(llama):
    batch = tokenize(llama, ["hello world"], prepend_bos=True)
    meas = measure(llama, batch, progress=False)
    _, cache = llama.run_with_cache(batch.tokens)
    for layer in range(2):
        h = cache[f"blocks.{layer}.hook_resid_post"][0].float()
        np.testing.assert_allclose(meas.resid_norm[0, layer], h.norm(dim=-1).numpy(), rtol=1e-4)
        np.testing.assert_allclose(meas.first_resid[0, layer], h[0].numpy(), rtol=1e-4, atol=1e-6)
        cos = torch.nn.functional.cosine_similarity(h, h[0:1], dim=-1)
        np.testing.assert_allclose(meas.cos_to_first[0, layer], cos.numpy(), rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------------------- invariant, 3 architectures


@pytest.mark.parametrize("arch", ["gpt2", "llama", "gemma3"])
@pytest.mark.parametrize("prepend_bos", [True, False])
def test_alpha_rows_conserve_attention_mass(tiny_models, arch, prepend_bos):
    """Every query row sums to 1, so sum_k alpha[l,h,k] * (T-k) = T, the number of real queries."""
    model = tiny_models[arch]
    texts = ["Attention sinks are everywhere.", "Short one", "xy"[: 1 + (not prepend_bos)]]  # 2 tokens, the fewest measured
    batch = tokenize(model, texts, prepend_bos=prepend_bos)
    meas = measure(model, batch, batch_size=2, progress=False)
    assert meas.alpha.shape == (3, 2, int(model.cfg.n_heads), int(batch.lengths.max()))
    for n, t in enumerate(batch.lengths.tolist()):
        a = meas.alpha[n, :, :, :t]
        assert np.isfinite(a).all() and (a >= 0).all() and (a <= 1 + 1e-6).all()
        weights = t - np.arange(t)  # T - k queries see key k
        mass = (a * weights).sum(axis=-1)  # [L, H]
        np.testing.assert_allclose(mass, float(t), rtol=1e-5)
        assert np.isnan(meas.alpha[n, :, :, t:]).all()
        # the shortest sequence measured has two tokens; its second (last) token has no sink score
        if t == 2:
            assert np.isnan(meas.sink_score[n, :, 1]).all(), "the last token has no later query"
