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

from circuits.blockwise import AttentionSpec, LazyMask, attention_output, causal, column_sums, sdpa_output, sliding_causal
from circuits.driver import Run, drive
from circuits.fused_attention import fallback_reason, fused_attention
from circuits.measure import SinkMeter, alpha_and_score, attention_received, measure
from circuits.models import tiny_model
from circuits.probes import tokenize
from interventions.keybias import DropSinkAttention
from interventions.mlp import AblateMLP

TOL = 1e-5
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
        torch.testing.assert_close(g, w, atol=1e-6, rtol=0, equal_nan=True)


@pytest.mark.parametrize("case", list(CASES))
def test_blockwise_and_fused_outputs_equal_eager(case):
    torch.manual_seed(1)
    spec, window = CASES[case]["spec"], CASES[case]["window"]
    h = 4 if spec.sinks is not None else 6
    q, k, v = torch.randn(1, h, 23, 8), torch.randn(1, h // spec.groups, 23, 8), torch.randn(1, h // spec.groups, 23, 5)
    mask = LazyMask(1, 23, 23, sliding_causal(window)) if window else LazyMask(1, 23, 23)
    want = eager_pattern(q, k, spec, mask) @ v.repeat_interleave(spec.groups, dim=1)
    torch.testing.assert_close(attention_output(q, k, v, spec, mask, block=5), want, atol=1e-6, rtol=0)
    if spec.softcap is None and spec.sinks is None:
        torch.testing.assert_close(sdpa_output(q, k, v, spec, mask, block=5), want, atol=1e-6, rtol=0)


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


def assert_same(eager, fused, fields=("alpha", "sink_score", "next_token_loss", "resid_norm")):
    """alpha and the sink score (in [0, 1]) within 1e-5 absolute; losses and norms (up to ~10
    and ~1e3: float32 rounding grows with them) within 1e-5 relative."""
    for name in fields:
        a, b = getattr(eager, name), getattr(fused, name)
        np.testing.assert_array_equal(np.isnan(a), np.isnan(b), err_msg=name)
        scale = 1.0 if name in ("alpha", "sink_score") else np.maximum(1.0, np.abs(a))
        assert np.nanmax(np.abs(a - b) / scale) <= TOL, (name, np.nanmax(np.abs(a - b)))


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
    assert_same(eager, meter.result())


def test_gpt2_falls_back_to_eager_with_one_line(caplog):
    model = tiny_model("gpt2")
    batch = tokenize(model, TEXTS)
    with caplog.at_level(logging.WARNING, logger="sinkscope"):
        fused = measure(model, batch, progress=False)
        measure(model, batch, progress=False)
    lines = [r.getMessage() for r in caplog.records if "eager" in r.getMessage()]
    assert len(lines) == 1 and "tiny-gpt2: attention runs eager" in lines[0] and "JointQKVAttentionBridge" in lines[0]
    assert_same(measure(model, batch, fused=False, full_logits=True, progress=False), fused)


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
    assert_same(eager, fused)
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
    assert_same(eager, fused)


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


# --------------------------------------------------------------------------- packaged models


@pytest.mark.parametrize("name", ["smollm2", "gemma3", "qwen2"])
def test_fused_measure_equals_eager_on_packaged_models(name, request):
    """48 tokens of two passages on each packaged model (Gemma 3's BOS included)."""
    model = request.getfixturevalue(name)
    batch = tokenize(model, TEXTS, max_tokens=48)
    eager = measure(model, batch, fused=False, full_logits=True, progress=False)
    assert_same(eager, measure(model, batch, progress=False), fields=("alpha", "sink_score", "next_token_loss"))
