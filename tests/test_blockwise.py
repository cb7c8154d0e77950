"""Long contexts in linear memory (issue 12): the blockwise statistics and the fused attention
path equal the eager T x T pattern path, and the fused path is really the one that runs.

Kernels first (random queries and keys, several blocks, every extra of the model's softmax),
then tiny models of six families through :func:`circuits.measure.measure`, then the three
packaged models at a short length. Inputs are the shortest that cross a sliding window (32
tokens on the tiny models) and span several query blocks.
"""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from circuits import analyses
from circuits.blockwise import (
    AttentionSpec,
    ColumnSums,
    LazyMask,
    PatternBlock,
    attend,
    attention_output,
    causal,
    column_sums,
    sdpa_output,
    sliding_causal,
)
from circuits.driver import Run, drive
from circuits.fused_attention import PatternUnavailable, fallback_reason, fused_attention, reduce_pattern, reducible_layers
from circuits.measure import SinkMeter, alpha_and_score, attention_received, measure
from circuits.models import tiny_model
from circuits.probes import tokenize, trace_batch
from interventions.keybias import DropSinkAttention
from interventions.mlp import AblateMLP
from tolerances import assert_measurements_agree, assert_within, longest_sum, path_bound

pytestmark = pytest.mark.numerical  # fused against eager: CI runs this module on a second kernel path too

#: one attention layer of the unit cases below (keys <= 23, d_head 8), two float32 paths: the
#: rounding model of tests/tolerances.py, relative to the size of what is compared (probabilities: 1)
ONE_LAYER = float(path_bound(0, 23))
TEXTS = [
    "The cat sat on the mat and looked at the dog for a long while, then slept.",
    "Sinks store attention that has nowhere to go.",
]


# --------------------------------------------------------------------------- kernels


def eager_pattern(q, k, spec: AttentionSpec, mask: LazyMask):
    """The bridge's eager softmax, written out: scores, softcap, additive mask, sink column."""
    kr = k.repeat_interleave(spec.groups, dim=1)
    scores = (q @ kr.transpose(-1, -2)) * spec.scaling
    if spec.softcap is not None:
        scores = torch.tanh(scores / spec.softcap) * spec.softcap
    scores = scores + mask.dense(torch.float32)
    if spec.sinks is None:
        return torch.softmax(scores, dim=-1)
    sink = spec.sinks.view(1, -1, 1, 1).expand(q.shape[0], -1, q.shape[2], 1)
    combined = torch.cat([scores, sink], dim=-1)
    return torch.softmax(combined - combined.amax(-1, keepdim=True), dim=-1)[..., :-1]


CASES = {
    "causal": dict(spec=AttentionSpec(0.25), window=None),
    "gqa": dict(spec=AttentionSpec(0.25, groups=3), window=None),
    "sliding": dict(spec=AttentionSpec(0.25, groups=2), window=6),
    "softcap": dict(spec=AttentionSpec(0.5, softcap=2.0, groups=2), window=6),
    "sinks": dict(spec=AttentionSpec(0.25, sinks=torch.tensor([0.0, 3.0, -2.0, 8.0]), groups=2), window=None),
}


@pytest.mark.parametrize("case", list(CASES))
def test_column_sums_equal_the_eager_pattern(case):
    """alpha and sink score from blocks of 4 queries (T = 19, lengths 19 and 11) equal
    attention_received on the full pattern, NaNs included."""
    torch.manual_seed(0)
    spec, window = CASES[case]["spec"], CASES[case]["window"]
    h = 4 if spec.sinks is not None else 6
    q, k = 3 * torch.randn(2, h, 19, 8), torch.randn(2, h // spec.groups, 19, 8)
    lengths = torch.tensor([19, 11])
    mask = LazyMask(2, 19, 19, sliding_causal(window) if window else causal)
    want = attention_received(eager_pattern(q, k, spec, mask), lengths)
    got = alpha_and_score(*column_sums(q, k, spec, mask, lengths, block=4), lengths)
    for w, g in zip(want, got):
        torch.testing.assert_close(g, w, atol=ONE_LAYER, rtol=0, equal_nan=True)


@pytest.mark.parametrize("case", list(CASES))
def test_blockwise_and_fused_outputs_equal_eager(case):
    torch.manual_seed(1)
    spec, window = CASES[case]["spec"], CASES[case]["window"]
    h = 4 if spec.sinks is not None else 6
    q, k, v = torch.randn(1, h, 23, 8), torch.randn(1, h // spec.groups, 23, 8), torch.randn(1, h // spec.groups, 23, 5)
    mask = LazyMask(1, 23, 23, sliding_causal(window)) if window else LazyMask(1, 23, 23)
    want = eager_pattern(q, k, spec, mask) @ v.repeat_interleave(spec.groups, dim=1)
    atol = ONE_LAYER * float(v.abs().max())  # an average of values: relative to the largest
    torch.testing.assert_close(attention_output(q, k, v, spec, mask, block=5), want, atol=atol, rtol=0)
    if spec.softcap is None and spec.sinks is None:
        torch.testing.assert_close(sdpa_output(q, k, v, spec, mask, block=5), want, atol=atol, rtol=0)


@pytest.mark.parametrize("case", list(CASES))
def test_one_pass_hands_the_reducers_the_eager_pattern_and_returns_the_output(case):
    """attend() with reducers: the blocks put back together are the eager pattern (rows
    0..22 of 2 sequences, blocks of 5 queries), a reducer given rows 1:2 sees sequence 1 only,
    ColumnSums equals column_sums, key_column(0) is the pattern's first column, and the output
    is the eager output."""
    torch.manual_seed(2)
    spec, window = CASES[case]["spec"], CASES[case]["window"]
    h = 4 if spec.sinks is not None else 6
    hk = h // spec.groups
    q, k, v = torch.randn(2, h, 23, 8), torch.randn(2, hk, 23, 8), torch.randn(2, hk, 23, 5)
    mask = LazyMask(2, 23, 23, sliding_causal(window)) if window else LazyMask(2, 23, 23)
    pattern = eager_pattern(q, k, spec, mask)
    seen = {"all": torch.zeros(2, hk, 23, spec.groups, 23), "row1": torch.zeros(1, hk, 23, spec.groups, 23)}
    first = torch.full((2, hk, spec.groups, 23), -1.0)

    def keep(into):
        def reducer(block: PatternBlock):
            seen[into][:, :, block.q0 : block.q1, :, block.lo : block.hi] = block.probs
            if into == "all":
                column = block.key_column(0)
                first[..., block.q0 : block.q1] = 0.0 if column is None else column

        return reducer

    lengths = torch.tensor([23, 14])
    sums = ColumnSums(lengths)
    out = attend(q, k, v, spec, mask, [(None, keep("all")), (slice(1, 2), keep("row1")), (None, sums)], block=5)
    as_pattern = lambda x: x.permute(0, 1, 3, 2, 4).reshape(x.shape[0], h, 23, 23)  # noqa: E731
    torch.testing.assert_close(as_pattern(seen["all"]), pattern, atol=ONE_LAYER, rtol=0)
    torch.testing.assert_close(as_pattern(seen["row1"]), pattern[1:], atol=ONE_LAYER, rtol=0)
    torch.testing.assert_close(first.reshape(2, h, 23), pattern[..., 0], atol=ONE_LAYER, rtol=0)
    for got, want in zip(sums.result(), column_sums(q, k, spec, mask, lengths, block=7)):
        torch.testing.assert_close(got, want, atol=23 * ONE_LAYER, rtol=0)  # sums of up to 23 probabilities
    torch.testing.assert_close(out, pattern @ v.repeat_interleave(spec.groups, dim=1), atol=ONE_LAYER * float(v.abs().max()), rtol=0)


def test_lazy_mask_knows_its_key_ranges():
    mask = LazyMask(1, 10, 10, sliding_causal(3))
    assert mask.key_range(4, 8) == (2, 8, False)
    assert LazyMask(1, 10, 10).key_range(4, 8) == (0, 8, True) and LazyMask(1, 10, 10).is_causal(block=3)
    assert not mask.is_causal(block=3)


# --------------------------------------------------------------------------- tiny models


class SquareTensors(TorchDispatchMode):
    """Records every op whose output ends in a ``T x T`` block (scores, the pattern, a mask);
    ``floats_only``: only float ones (a boolean mask of one block of queries is allowed)."""

    def __init__(self, t: int, floats_only: bool = False):
        super().__init__()
        self.t, self.seen, self.floats_only = t, [], floats_only

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for x in out if isinstance(out, (tuple, list)) else (out,):
            if (isinstance(x, torch.Tensor) and x.dim() >= 2 and tuple(x.shape[-2:]) == (self.t, self.t)
                    and (x.is_floating_point() or not self.floats_only)):
                self.seen.append(str(func))
        return out


def assert_same(eager, fused, model, tokens, fields=("alpha", "sink_score", "next_token_loss", "resid_norm")):
    """Fused blocks of softmax rows and the eager pattern are two float32 paths through the same
    sums: within the rounding model of tests/tolerances.py, layer by layer, relative to the size
    of each statistic."""
    assert_measurements_agree(eager, fused, model, tokens, fields=fields, what="eager vs fused: ")


@pytest.fixture
def small_blocks(monkeypatch):
    """Blocks of 16 queries everywhere, so a 40-token input spans several."""
    import circuits.fused_attention as fa

    monkeypatch.setattr(fa, "SDPA_BLOCK", 16)
    monkeypatch.setattr(fa, "LOOP_BLOCK", 16)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma2", "gemma3", "gpt-oss", "mistral"])
def test_fused_measure_equals_eager_on_tiny_models(arch, small_blocks):
    """Causal mask, sliding windows (gemma2/3, gpt-oss, mistral: 32 tokens), softcapping
    (gemma2), GQA, query_pre_attn_scalar (gemma) and sink logits (gpt-oss); two sequences of
    different lengths, the longer one crossing the window; the statistics in blocks of 16
    queries. No op builds a T x T tensor on the fused path."""
    model = tiny_model(arch)
    assert fallback_reason(model) is None
    batch = tokenize(model, TEXTS)
    t = int(batch.tokens.shape[1])
    assert t > 32 and batch.lengths.min() < t
    eager = measure(model, batch, fused=False, full_logits=True, progress=False)
    meter = SinkMeter(model, loss_from_residual=True, block=16)
    with SquareTensors(t) as squares:
        drive(model, batch, Run([meter]), logits=False)
    assert squares.seen == []
    assert_same(eager, meter.result(), model, batch.tokens)


def test_gpt2_falls_back_to_eager_with_one_line(caplog):
    model = tiny_model("gpt2")
    batch = tokenize(model, TEXTS)
    with caplog.at_level(logging.WARNING, logger="sinkscope"):
        fused = measure(model, batch, progress=False)
        measure(model, batch, progress=False)
    lines = [r.getMessage() for r in caplog.records if "eager" in r.getMessage()]
    assert len(lines) == 1 and "tiny-gpt2: attention runs eager" in lines[0] and "JointQKVAttentionBridge" in lines[0]
    assert_same(measure(model, batch, fused=False, full_logits=True, progress=False), fused, model, batch.tokens)


def test_pattern_hook_makes_only_its_layer_eager(caplog):
    """DropSinkAttention at layer 1 edits the scores: layer 1 runs eager and is measured from
    its edited pattern, the others stay fused; one line names the layer."""
    model = tiny_model("llama")
    batch = tokenize(model, TEXTS)
    hooks = DropSinkAttention(layers=(1,)).hooks_for(model, batch)
    eager = measure(model, batch, hooks=hooks, fused=False, full_logits=True, progress=False)
    with caplog.at_level(logging.WARNING, logger="sinkscope"):
        fused = measure(model, batch, hooks=hooks, progress=False)
    lines = [r.getMessage() for r in caplog.records]
    assert lines == ["tiny-llama: attention ran eager (full T x T pattern) in layers 1: a hook reads or edits "
                     "hook_attn_scores / hook_pattern there"]
    assert_same(eager, fused, model, batch.tokens)
    assert np.nanmax(np.abs(fused.alpha[:, 1, :, 0] - measure(model, batch, progress=False).alpha[:, 1, :, 0])) > 0.01


def test_mlp_ablation_stays_fused(caplog):
    """An MLP ablation does not touch attention: no layer falls back, no float T x T tensor
    (default blocks: the fused kernel's boolean mask of its one block is T x T at this T)."""
    model = tiny_model("qwen2")
    batch = tokenize(model, TEXTS)
    hooks = AblateMLP(layers=(2,), positions=(3,)).hooks_for(model, batch)
    eager = measure(model, batch, hooks=hooks, fused=False, full_logits=True, progress=False)
    with caplog.at_level(logging.WARNING, logger="sinkscope"), SquareTensors(int(batch.tokens.shape[1]), floats_only=True) as squares:
        fused = measure(model, batch, hooks=hooks, progress=False)
    assert caplog.records == [] and squares.seen == []
    assert_same(eager, fused, model, batch.tokens)


def test_adapter_leaves_nothing_behind_after_an_error():
    model = tiny_model("llama")
    attn = model.blocks[0].attn

    def boom(x, hook):
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        with fused_attention(model):
            model.run_with_hooks(torch.arange(1, 9)[None], fwd_hooks=[("blocks.0.attn.hook_rot_k", boom)])
    assert not any(k.startswith("_sinkscope") or k in ("forward", "_update_kv_cache") for k in vars(attn))
    assert model.original_model.config._attn_implementation == "eager"
    assert not attn.hook_rot_q._forward_hooks


def test_the_pattern_is_reduced_only_inside_a_fused_forward():
    """Outside a forward, and in a layer made eager by a pattern hook, reduce_pattern refuses
    with PatternUnavailable; reducible_layers says where it works; nothing stays behind."""
    model = tiny_model("llama")
    attn = model.blocks[1].attn
    with pytest.raises(PatternUnavailable, match="no fused forward is running"):
        reduce_pattern(attn, lambda block: None)
    assert reducible_layers(model) == set()
    pattern_hook = [("blocks.1.attn.hook_pattern", lambda x, hook: None)]
    with fused_attention(model):
        assert reducible_layers(model) == set(range(len(model.blocks)))
        assert reducible_layers(model, pattern_hook) == set(range(len(model.blocks))) - {1}
        ask = ("blocks.1.attn.hook_rot_k", lambda x, hook: reduce_pattern(attn, lambda block: None))
        with pytest.raises(PatternUnavailable):
            model.run_with_hooks(torch.arange(1, 9)[None], fwd_hooks=[*pattern_hook, ask])
    assert not any(k.startswith("_sinkscope") for k in vars(attn))


def test_stacked_copies_reduce_their_own_rows(small_blocks):
    """Two stacked copies of a batch, the second with layer 1's keys scaled by 4 (sharper
    attention, still fused), measure what two separate forwards measure: each copy's
    reduction sees its own rows (hook_rows)."""
    model = tiny_model("qwen2")
    batch = tokenize(model, TEXTS)
    hooks = [("blocks.1.attn.hook_rot_k", lambda k, hook: k * 4)]
    separate = [measure(model, batch, hooks=h, progress=False) for h in ((), hooks)]
    meters = [SinkMeter(model, block=16), SinkMeter(model, block=16)]
    drive(model, batch, [Run([meters[0]]), Run([meters[1]], hooks)], stacked=True, logits=False)
    for want, meter in zip(separate, meters):
        assert_same(want, meter.result(), model, batch.tokens, fields=("alpha", "sink_score"))
    moved = np.nanmax(np.abs(separate[0].sink_score - separate[1].sink_score))
    assert moved > 10 * path_bound(model.cfg.n_layers - 1, longest_sum(model.cfg, batch.tokens.shape[1]))  # far beyond rounding


@pytest.mark.parametrize("arch", ["llama", "gemma2", "gpt-oss"])
def test_kv_meter_reads_the_first_key_from_the_fused_attention(arch, small_blocks):
    """KVMeter's attention to position 0 and the value share equal the eager pattern's (causal
    with GQA, sliding window with softcapping, sink logits), and no float T x T tensor is built."""
    model = tiny_model(arch)
    batch = tokenize(model, TEXTS)
    eager, fused = analyses.KVMeter(model), analyses.KVMeter(model)
    analyses.observe(model, batch, [eager], fused=False)
    with SquareTensors(int(batch.tokens.shape[1]), floats_only=True) as squares:
        analyses.observe(model, batch, [fused])
    assert squares.seen == []
    assert_kv_same(eager.result(), fused.result(), model, batch.tokens)


def assert_kv_same(eager, fused, model, tokens):
    """Attention to the first key: a probability (magnitude 1). The value share, A[t, 0] ||v_0|| /
    ||z_t||, carries three such errors relative to its own size. Bounds per layer, as above."""
    n = longest_sum(model.cfg, tokens.shape[-1])
    err = path_bound(np.arange(eager.attn_first.shape[1])[None, :, None], n)
    assert_within(eager.attn_first, fused.attn_first, err, "attn_first")
    assert_within(eager.value_share, fused.value_share, 3 * err * np.maximum(1.0, np.abs(eager.value_share)), "value_share")


# --------------------------------------------------------------------------- packaged models


@pytest.mark.real
@pytest.mark.parametrize("name", ["smollm2", "gemma3", "qwen2"])
def test_fused_measure_equals_eager_on_packaged_models(name, request):
    """48 tokens of two passages on each packaged model (Gemma 3's BOS included)."""
    model = request.getfixturevalue(name)
    batch = tokenize(model, TEXTS, max_tokens=48)
    eager = measure(model, batch, fused=False, full_logits=True, progress=False)
    assert_same(eager, measure(model, batch, progress=False), model, batch.tokens, fields=("alpha", "sink_score", "next_token_loss"))


@pytest.mark.real
@pytest.mark.parametrize("name", ["smollm2", "gemma3", "qwen2"])
def test_fused_equals_eager_at_1024_tokens_of_the_models_own_session(name, request):
    """At the reports' length: one of the model's own sessions cut to 1,024 tokens (Gemma 3
    crosses its 512-token sliding window), alpha, sink score, attention to the first key and
    value share within the rounding model (sums over up to 1,024 keys). Measured on 2026-12-02 (float32, one session),
    largest differences smollm2 / gemma3 / qwen2: alpha 6.0e-8 / 5.1e-7 / 3.0e-8, sink score
    6.0e-8 / 1.4e-7 / 1.5e-8, attention to the first key 0 / 6.0e-8 / 0."""
    model = request.getfixturevalue(name)
    batch = trace_batch(model, 1, 1024)
    assert int(batch.lengths[0]) == 1024
    runs = {}
    for fused in (False, True):
        sinks, kv = SinkMeter(model), analyses.KVMeter(model)
        analyses.observe(model, batch, [sinks, kv], batch_size=1, fused=fused)
        runs[fused] = sinks.result(), kv.result()
    assert_same(runs[False][0], runs[True][0], model, batch.tokens, fields=("alpha", "sink_score"))
    assert_kv_same(runs[False][1], runs[True][1], model, batch.tokens)
