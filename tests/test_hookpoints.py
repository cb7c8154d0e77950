"""Where an intervention acts is read from the hook names it registers, before any forward pass.

The blocks it hooks, the block a prefix-reusing sweep starts at and whether it needs the
attention pattern come from one source (:func:`interventions.base.hook_points`), for built-in
kinds whose hooks need prepared data and for a user kind that writes nothing but ``hooks()``.
"""

from __future__ import annotations

import dataclasses

import pytest

from circuits.probes import tokenize
from helpers import forward_counter
from interventions.attention import HeadwiseRMSNorm, IsolateAggregation, SigmoidAttention
from interventions.base import Intervention, InterventionError, applied, hook_points, registered_hooks
from interventions.hookpoints import Reach, first_affected_layer
from interventions.keybias import DropSinkAttention, MeanSinkValue, ZeroSinkValue
from interventions.mlp import AblateMLP, PatchActivation, PatchMLP, RescaleAlongSink, TokenMLPEdit
from interventions.residual import AmplifyVariance

TEXTS = ["The cat sat on the mat, and then it slept.", "A quick brown fox jumps over the lazy dog!"]


@pytest.fixture(scope="module")
def batch(llama):
    return tokenize(llama, TEXTS)


@dataclasses.dataclass(frozen=True)
class ScalePattern(Intervention):
    """A user kind that hooks the pattern and declares nothing about it."""

    layer: int

    def hooks(self, model, ctx):
        return [(f"blocks.{self.layer}.attn.hook_pattern", lambda pattern, hook: pattern * 1.0)]


@dataclasses.dataclass(frozen=True)
class EagerState(Intervention):
    """A user kind that reads its prepared state while building its hooks."""

    def prepare(self, model, ctx):
        return 2.0

    def hooks(self, model, ctx):
        factor = ctx.state(self)
        return [("blocks.1.hook_mlp_out", lambda act, hook: act * factor)]


CASES = [
    # (intervention, layers, start, pattern)
    (AblateMLP(layers=(2, 1), mode="mean"), (1, 2), 1, False),
    (AblateMLP(layers=(1,), mode="resample"), (1,), 1, False),
    (RescaleAlongSink(layers=(3, 2), factor=2.0), (2, 3), 2, False),  # needs the clean sink directions
    (PatchActivation("blocks.2.hook_resid_post", positions=(1,)), (2,), 2, False),
    (PatchActivation("blocks.1.attn.hook_pattern", positions=(2,)), (1,), 1, True),
    (PatchActivation("hook_embed"), (-1,), None, False),
    (PatchMLP(layers=(0, 2), positions=(4,)), (0, 2), 0, False),
    (TokenMLPEdit(sequences=(0, 1), layers=(3, 1), positions=(2, 2), mode="rescale", factor=2.0), (1, 3), 1, False),
    (IsolateAggregation(layers=(1,), queries=(3,)), (1,), 1, True),
    (SigmoidAttention(layers=(2,)), (2,), 2, True),
    (HeadwiseRMSNorm(layers=(0,)), (0,), 0, False),
    (ZeroSinkValue(), (0, 1, 2, 3), 0, True),
    (ZeroSinkValue(layers=(2,), include_self=True), (2,), 2, False),
    (MeanSinkValue(layers=(1,)), (1,), 1, False),
    (DropSinkAttention(layers=(3,)), (3,), 3, True),
    (AmplifyVariance(layers=(1, 2), positions=(4,), factor=2.0, site="resid_pre"), (1, 2), 1, False),
    (AblateMLP(layers=(2,)) + DropSinkAttention(layers=(1,)), (1, 2), 1, True),
    (ScalePattern(layer=2), (2,), 2, True),
]


@pytest.mark.parametrize("iv,layers,start,pattern", CASES, ids=lambda v: type(v).__name__ if isinstance(v, Intervention) else None)
def test_reach_is_read_from_the_hooks_without_a_forward(llama, batch, iv, layers, start, pattern):
    with forward_counter(llama) as calls:
        reach = iv.reach(llama, batch)
    assert calls == [] and not registered_hooks(llama)
    assert (reach.layers, reach.start, reach.pattern) == (layers, start, pattern)


def test_the_planned_names_are_the_names_a_run_registers(llama, batch):
    for iv, *_ in CASES:
        with applied(llama, iv, batch) as ctx:
            run_names = tuple(dict.fromkeys(n for n, _ in iv.hooks(llama, ctx)))
        assert hook_points(llama, iv, batch) == run_names, iv


def test_a_kind_that_reads_prepared_state_while_building_hooks_is_told_the_fix(llama, batch):
    with forward_counter(llama) as calls:
        with pytest.raises(InterventionError, match=r"EagerState.hooks read its prepared state .* inside the hook function"):
            EagerState().reach(llama, batch)
    assert calls == []
    with applied(llama, EagerState(), batch):  # a run, which prepares it, still works
        llama(batch.tokens)


def test_name_anatomy(llama):
    assert first_affected_layer(["blocks.2.attn.hook_z"]) == 3
    assert first_affected_layer(["blocks.2.attn.hook_q"]) == 2
    assert Reach.of(llama, ["blocks.1.hook_mlp_out", "blocks.1.hook_mlp_out"]).names == ("blocks.1.hook_mlp_out",)
    assert Reach.of(llama, ["ln_final.hook_normalized", "blocks.3.hook_resid_post"]).start is None
