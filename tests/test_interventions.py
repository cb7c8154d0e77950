"""Interventions on tiny models: hand-checkable effects, specs, composition, and bad input.

Every effect is checked on the activations the model actually computed under the hooks
(``run_with_cache`` inside ``applied``: the cache hooks run after the intervention's), and
compared with a clean run of the same tokens.
"""

from __future__ import annotations

import dataclasses
import math
from typing import ClassVar

import pytest
import torch

from circuits.measure import measure
from circuits.models import tiny_model
from circuits.probes import tokenize
from helpers import forward_counter
from interventions.attention import HeadwiseRMSNorm, IsolateAggregation, SigmoidAttention
from interventions.base import (
    Compose,
    Intervention,
    InterventionError,
    RunContext,
    applied,
    hooks_for,
    prepare_context,
    registered_hooks,
)
from interventions.mlp import AblateMLP, PatchActivation, PatchMLP, RescaleAlongSink
from interventions.registry import KINDS, SpecError, known_kinds, parse_spec, register, spec, unregister
from interventions.residual import AmplifyVariance

TEXTS = [
    "The cat sat on the mat, and then it slept.",
    "A quick brown fox jumps over the lazy dog!",
    "Sinks store attention that has nowhere to go.",
]
ATOL = 1e-5


@pytest.fixture(scope="module")
def models(llama):
    return {"llama": llama, "gpt2": tiny_model("gpt2"), "gemma3": tiny_model("gemma3")}


@pytest.fixture(scope="module")
def batch(llama):
    return tokenize(llama, TEXTS)


def run(model, iv, batch, **kwargs):
    """Cache of the intervened run and of the clean run."""
    with torch.no_grad():
        _, clean = model.run_with_cache(batch.tokens)
        with applied(model, iv, batch, **kwargs):
            _, hooked = model.run_with_cache(batch.tokens)
    assert registered_hooks(model) == {}
    return hooked, clean


def no_hooks_left(model) -> bool:
    """Every HookPoint: no TransformerLens handle and no raw torch hook."""
    for hp in model.hook_dict.values():
        if hp.fwd_hooks or hp.bwd_hooks or hp._forward_hooks or hp._backward_hooks:
            return False
    return True


# --------------------------------------------------------------------------- MLP family


def test_zero_ablation_exactly_at_chosen_layers_and_positions(llama, batch):
    iv = AblateMLP(layers=(1, 3), positions=(2, 5))
    hooked, _ = run(llama, iv, batch)
    for layer in range(4):
        out = hooked[f"blocks.{layer}.hook_mlp_out"]
        touched = torch.zeros(out.shape[1], dtype=torch.bool)
        if layer in (1, 3):
            touched[[2, 5]] = True
            assert torch.all(out[:, touched] == 0)
        assert torch.all(out[:, ~touched].abs().sum(-1) > 0), f"layer {layer}: a position was zeroed that should not be"


def test_mean_ablation_equals_reference_mean(llama, batch):
    hooked, clean = run(llama, AblateMLP(layers=(1, 2), positions=(3, 4), mode="mean"), batch)
    for layer in (1, 2):
        expected = clean[f"blocks.{layer}.hook_mlp_out"][:, [3, 4]].mean(0)  # every sequence reaches 3, 4
        got = hooked[f"blocks.{layer}.hook_mlp_out"][:, [3, 4]]
        torch.testing.assert_close(got, expected.expand_as(got), atol=ATOL, rtol=0)


def test_mean_over_tokens_pools_real_positions_after_the_first(llama, batch):
    hooked, clean = run(llama, AblateMLP(layers=(2,), positions=(6,), mode="mean", mean_over="tokens"), batch)
    act = clean["blocks.2.hook_mlp_out"]
    valid = batch.valid.clone()
    valid[:, 0] = False
    expected = act[valid].mean(0)
    torch.testing.assert_close(hooked["blocks.2.hook_mlp_out"][:, 6], expected.expand(len(batch), -1), atol=ATOL, rtol=0)


def test_resample_takes_the_next_sequence_and_reference_texts(llama, batch):
    hooked, clean = run(llama, AblateMLP(layers=(2,), positions=(4,), mode="resample"), batch)
    src = clean["blocks.2.hook_mlp_out"][[1, 2, 0], 4]
    torch.testing.assert_close(hooked["blocks.2.hook_mlp_out"][:, 4], src, atol=ATOL, rtol=0)

    ref = "Completely different words for the source."
    hooked, _ = run(llama, AblateMLP(layers=(2,), positions=(4,), mode="resample", reference=(ref,)), batch)
    ref_tokens = tokenize(llama, [ref], prepend_bos=batch.prepend_bos)
    _, ref_cache = llama.run_with_cache(ref_tokens.tokens)
    expected = ref_cache["blocks.2.hook_mlp_out"][0, 4].expand(len(batch), -1)
    torch.testing.assert_close(hooked["blocks.2.hook_mlp_out"][:, 4], expected, atol=ATOL, rtol=0)


def test_patch_copies_from_another_position_and_another_prompt(llama, batch):
    hooked, clean = run(llama, PatchActivation("blocks.1.hook_resid_post", positions=(5, 6), source_position=2), batch)
    torch.testing.assert_close(
        hooked["blocks.1.hook_resid_post"][:, 5:7], clean["blocks.1.hook_resid_post"][:, [2, 2]], atol=ATOL, rtol=0
    )
    untouched = [p for p in range(int(batch.lengths.min())) if p not in (5, 6)]
    torch.testing.assert_close(
        hooked["blocks.1.hook_resid_post"][:, untouched], clean["blocks.1.hook_resid_post"][:, untouched]
    )

    source = "Another prompt, long enough to be a source."
    iv = PatchActivation("blocks.2.attn.hook_z", positions=(3,), source_text=source)
    hooked, _ = run(llama, iv, batch)
    _, src_cache = llama.run_with_cache(tokenize(llama, [source], prepend_bos=batch.prepend_bos).tokens)
    torch.testing.assert_close(
        hooked["blocks.2.attn.hook_z"][:, 3], src_cache["blocks.2.attn.hook_z"][0, 3].expand(len(batch), -1, -1), atol=ATOL, rtol=0
    )


def test_patch_mlp_is_patch_activation_per_layer(llama, batch):
    source = "Another prompt, long enough to be a source."
    iv = PatchMLP(layers=(0, 2), positions=(4,), source_text=source)
    hooked, _ = run(llama, iv, batch)
    _, src_cache = llama.run_with_cache(tokenize(llama, [source], prepend_bos=batch.prepend_bos).tokens)
    for layer in (0, 2):
        name = f"blocks.{layer}.hook_mlp_out"
        torch.testing.assert_close(hooked[name][:, 4], src_cache[name][0, 4].expand(len(batch), -1), atol=ATOL, rtol=0)
    assert iv.reach(llama, batch).start == 0


def _decompose(hooked, clean, layer):
    m = hooked[f"blocks.{layer}.hook_mlp_out"]
    u = clean[f"blocks.{layer}.hook_resid_post"][:, 0]
    u = u / u.norm(dim=-1, keepdim=True)
    coef = (m * u[:, None]).sum(-1)
    return m, u, coef


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_rescale_sets_component_norm_and_keeps_the_rest(models, arch):
    model = models[arch]
    b = tokenize(model, TEXTS)
    hooked, clean = run(model, RescaleAlongSink(layers=(2,), target_norm=3.0), b)
    m, u, coef = _decompose(hooked, clean, 2)
    m0, _, coef0 = _decompose(clean, clean, 2)
    valid = b.valid.clone()
    valid[:, 0] = False
    torch.testing.assert_close(coef.abs()[valid], torch.full_like(coef[valid], 3.0), atol=1e-4, rtol=0)
    assert torch.equal(torch.sign(coef[valid]), torch.sign(coef0[valid]))
    rest, rest0 = m - coef[..., None] * u[:, None], m0 - coef0[..., None] * u[:, None]
    torch.testing.assert_close(rest[valid], rest0[valid], atol=1e-4, rtol=0)
    torch.testing.assert_close(m[:, 0], m0[:, 0])  # the first token is never touched by default
    hooked, _ = run(model, RescaleAlongSink(layers=(2,), target_norm=3.0, skip_first=4), b)
    torch.testing.assert_close(hooked["blocks.2.hook_mlp_out"][:, :4], m0[:, :4])


def test_rescale_factor_one_is_identity_and_remove_is_orthogonal(llama, batch):
    hooked, clean = run(llama, RescaleAlongSink(layers=(1, 3), factor=1.0), batch)
    for layer in (1, 3):
        torch.testing.assert_close(hooked[f"blocks.{layer}.hook_mlp_out"], clean[f"blocks.{layer}.hook_mlp_out"], atol=1e-5, rtol=1e-5)
    hooked, clean = run(llama, RescaleAlongSink(layers=(2,), remove=True), batch)
    _, _, coef = _decompose(hooked, clean, 2)
    assert coef[:, 1:].abs().max() < 1e-4


def test_rescale_whole_scope_with_min_cos_and_fixed_direction(llama, batch):
    direction = torch.randn(64, generator=torch.Generator().manual_seed(1))
    iv = RescaleAlongSink(layers=(2,), target_norm=5.0, min_cos=0.0, scope="whole", direction=direction)
    hooked, clean = run(llama, iv, batch)
    m, m0 = hooked["blocks.2.hook_mlp_out"], clean["blocks.2.hook_mlp_out"]
    u = direction / direction.norm()
    aligned = (m0 @ u) / m0.norm(dim=-1) >= 0.0
    aligned[:, 0] = False
    assert aligned.any() and (~aligned).any()
    torch.testing.assert_close(m[aligned].norm(dim=-1), torch.full((int(aligned.sum()),), 5.0), atol=1e-4, rtol=0)
    torch.testing.assert_close(m[~aligned], m0[~aligned])


def test_rescale_uses_seeded_sink_directions_without_a_reference_run(llama, batch):
    iv = RescaleAlongSink(layers=(2,), factor=0.0)
    _, clean = llama.run_with_cache(batch.tokens)
    dirs = {2: clean["blocks.2.hook_resid_post"][:, 0]}
    with forward_counter(llama) as calls:
        ctx = prepare_context(llama, iv, batch, sink_directions=dirs)
    assert calls == [] and isinstance(ctx, RunContext)


# --------------------------------------------------------------------------- attention family


@pytest.mark.parametrize("arch", ["llama", "gpt2", "gemma3"])
def test_isolate_makes_query_row_one_hot_and_reaches_z(models, arch):
    model = models[arch]
    b = tokenize(model, TEXTS)
    q = 5
    hooked, clean = run(model, IsolateAggregation(layers=(1,), queries=(q,)), b)
    pattern = hooked["blocks.1.attn.hook_pattern"]
    expected = torch.zeros_like(pattern[:, :, q])
    expected[:, :, q] = 1
    torch.testing.assert_close(pattern[:, :, q], expected, atol=1e-6, rtol=0)
    # Attending only to itself, each head's output is its own value vector (GQA: shared kv head).
    z, v = hooked["blocks.1.attn.hook_z"], hooked["blocks.1.attn.hook_v"]
    group = z.shape[2] // v.shape[2]
    torch.testing.assert_close(z[:, q], v[:, q].repeat_interleave(group, dim=1), atol=1e-5, rtol=0)
    # Only row q changed, and the change reaches the attention output.
    other = [p for p in range(int(b.lengths.min())) if p != q]
    torch.testing.assert_close(hooked["blocks.1.attn.hook_z"][:, other], clean["blocks.1.attn.hook_z"][:, other], atol=1e-6, rtol=0)
    assert (hooked["blocks.1.hook_attn_out"][:, q] - clean["blocks.1.hook_attn_out"][:, q]).abs().max() > 1e-4


def test_isolate_to_a_key_set_and_chosen_heads(llama, batch):
    hooked, clean = run(llama, IsolateAggregation(layers=(2,), queries=(6,), keys=(0, 3), heads=(1,)), batch)
    row = hooked["blocks.2.attn.hook_pattern"][:, 1, 6]
    assert torch.all(row[:, [1, 2, 4, 5, 6]] == 0)
    torch.testing.assert_close(row[:, [0, 3]].sum(-1), torch.ones(len(batch)))
    torch.testing.assert_close(hooked["blocks.2.attn.hook_pattern"][:, [0, 2, 3]], clean["blocks.2.attn.hook_pattern"][:, [0, 2, 3]])


def test_headwise_rmsnorm_gives_unit_rms_per_head_and_position(llama, batch):
    hooked, clean = run(llama, HeadwiseRMSNorm(layers=(0, 2)), batch)
    for layer in (0, 2):
        z = hooked[f"blocks.{layer}.attn.hook_z"]
        rms = z.pow(2).mean(-1).sqrt()
        torch.testing.assert_close(rms, torch.ones_like(rms), atol=1e-3, rtol=0)
    hooked, clean = run(llama, HeadwiseRMSNorm(layers=(1,), heads=(2,), preserve_scale=True), batch)
    z, z0 = hooked["blocks.1.attn.hook_z"], clean["blocks.1.attn.hook_z"]
    torch.testing.assert_close(z[:, :, [0, 1, 3]], z0[:, :, [0, 1, 3]])
    rms, rms0 = z[:, :, 2].pow(2).mean(-1).sqrt(), z0[:, :, 2].pow(2).mean(-1).sqrt()
    for i, n in enumerate(batch.lengths.tolist()):
        assert rms[i, :n].std() < 1e-3 * rms[i, :n].mean()  # the same RMS at every position...
        torch.testing.assert_close(rms[i, :n].mean(), rms0[i, :n].mean(), atol=1e-4, rtol=1e-4)  # ...the head's mean


@pytest.mark.parametrize("arch", ["llama", "gpt2", "gemma3"])
def test_sigmoid_attention_rows_match_sigmoid_of_scores(models, arch):
    model = models[arch]
    b = tokenize(model, TEXTS)
    hooked, clean = run(model, SigmoidAttention(layers=(1,)), b)
    scores, pattern = hooked["blocks.1.attn.hook_attn_scores"], hooked["blocks.1.attn.hook_pattern"]
    t = pattern.shape[-1]
    causal = torch.ones(t, t, dtype=torch.bool).tril()
    bias = -torch.log(b.lengths.float())[:, None, None, None]
    expected = torch.where(causal, torch.sigmoid(scores + bias), 0.0)
    torch.testing.assert_close(pattern, expected, atol=1e-6, rtol=0)
    n = int(b.lengths.min())
    assert (pattern[:, :, :n].sum(-1) - 1).abs().max() > 0.1  # rows no longer sum to one
    # The new pattern is what multiplies the values: z = pattern @ v.
    v = hooked["blocks.1.attn.hook_v"]
    group = pattern.shape[1] // v.shape[2]
    z = torch.einsum("bhqk,bkhd->bqhd", pattern, v.repeat_interleave(group, dim=2))
    torch.testing.assert_close(hooked["blocks.1.attn.hook_z"], z, atol=1e-5, rtol=0)
    # A fixed bias is the strength.
    assert SigmoidAttention(layers=(1,)).with_strength(-2.0).bias == -2.0


# --------------------------------------------------------------------------- residual family


def test_amplify_variance_scales_the_deviation_std(llama, batch):
    hooked, clean = run(llama, AmplifyVariance(layers=2, positions=(3, 7), factor=4.0, site="resid_post", mu="dims"), batch)
    h, h0 = hooked["blocks.2.hook_resid_post"], clean["blocks.2.hook_resid_post"]
    torch.testing.assert_close(h[:, [3, 7]].std(-1), 4.0 * h0[:, [3, 7]].std(-1), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(h[:, [3, 7]].mean(-1), h0[:, [3, 7]].mean(-1), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(h[:, [0, 1, 2, 4]], h0[:, [0, 1, 2, 4]])
    hooked, clean = run(llama, AmplifyVariance(layers=1, positions=(2,), factor=3.0, mode="norm", site="resid_pre"), batch)
    torch.testing.assert_close(hooked["blocks.1.hook_resid_pre"][:, 2], 3.0 * clean["blocks.1.hook_resid_pre"][:, 2])


# --------------------------------------------------------------------------- composition & registry


def test_composition_applies_both_in_order(llama, batch):
    iv = AblateMLP(layers=(1,), positions=(4,)) + AmplifyVariance(layers=2, positions=(4,), factor=2.0, site="resid_post", mu="dims")
    assert isinstance(iv, Compose) and iv.reach(llama, batch).start == 1 and iv.strength == 2.0
    hooked, _ = run(llama, iv, batch)
    assert torch.all(hooked["blocks.1.hook_mlp_out"][:, 4] == 0)
    alone, _ = run(llama, AblateMLP(layers=(1,), positions=(4,)), batch)
    h, h_alone = hooked["blocks.2.hook_resid_post"][:, 4], alone["blocks.2.hook_resid_post"][:, 4]
    torch.testing.assert_close(h.std(-1), 2.0 * h_alone.std(-1), atol=1e-5, rtol=1e-5)
    assert Compose((iv, HeadwiseRMSNorm(layers=(3,)))).parts[-1].kind == "head-rmsnorm"  # flattened
    assert iv.with_strength(5.0).parts[1].factor == 5.0


def test_measure_accepts_hooks_for_and_statistics_follow(llama, batch):
    clean = measure(llama, batch, progress=False, batch_size=2)
    iv = IsolateAggregation(layers=tuple(range(4)), queries=(5,))
    hooked = measure(llama, batch, hooks=hooks_for(llama, iv, batch), progress=False, batch_size=2)
    assert no_hooks_left(llama)
    # Query 5 sees only itself, so keys 0..4 lose its attention and key 5's alpha rises.
    assert (hooked.alpha[:, :, :, 5] > clean.alpha[:, :, :, 5]).all()
    resample = AblateMLP(layers=(1,), positions=(3,), mode="resample")
    measure(llama, batch, hooks=resample.hooks_for(llama, batch), progress=False, batch_size=1)
    assert no_hooks_left(llama)


SPECS = [
    "ablate-mlp:layers=3,positions=5",
    "ablate-mlp:layers=1-3,positions=5|6|7,mode=mean,mean_over=tokens",
    'ablate-mlp:layers=2,mode=resample,reference="one, two"|three',
    "patch:hook_name=blocks.1.attn.hook_z,positions=2|9,source_position=1",
    'patch-mlp:layers=0|2,source_text="a \\"quoted\\" text; with + signs"',
    "rescale-sink:layers=2,target_norm=0.0,min_cos=0.98,scope=whole",
    "rescale-sink:layers=1,factor=1e-05,skip_first=3",
    "isolate:layers=0-3,queries=7,keys=0|7,heads=1",
    "head-rmsnorm:layers=1,eps=0.001,preserve_scale=true",
    "sigmoid-attn:layers=2,bias=-3.5",
    "amplify-variance:layers=2,positions=5,factor=4.0,mode=norm",
]


@pytest.mark.parametrize("text", SPECS)
def test_spec_round_trips(text):
    iv = parse_spec(text)
    assert parse_spec(spec(iv)) == iv


def test_spec_grammar_details():
    iv = parse_spec("ablate-mlp:layer=3,positions=5")  # the singular stands for the plural
    assert iv == AblateMLP(layers=(3,), positions=(5,))
    assert parse_spec("rescale-sink:layer=1,factor=1e+2").factor == 100.0  # '+' in an exponent
    both = parse_spec("isolate:layers=1,queries=5 + amplify-variance:layer=2,positions=5,factor=4")
    assert isinstance(both, Compose) and [p.kind for p in both.parts] == ["isolate", "amplify-variance"]
    assert parse_spec("isolate:layers=1,queries=5; head-rmsnorm:layers=2") == Compose(
        (IsolateAggregation(layers=(1,), queries=(5,)), HeadwiseRMSNorm(layers=(2,)))
    )
    assert spec(both) == "isolate:layers=1,queries=5 + amplify-variance:layers=2,positions=5,factor=4.0"
    assert spec(AblateMLP(layers=(0, 1, 2, 3, 7))) == "ablate-mlp:layers=0-3|7"
    assert parse_spec("sigmoid-attn:layers=1,bias=none").bias is None


def test_spec_errors_name_the_problem():
    with pytest.raises(SpecError, match=r"unknown intervention kind 'ablate'; known kinds: .*ablate-mlp"):
        parse_spec("ablate:layers=1")
    with pytest.raises(SpecError, match=r"ablate-mlp: unknown field 'layes'; fields: layers, positions"):
        parse_spec("ablate-mlp:layes=1")
    with pytest.raises(SpecError, match=r"amplify-variance: missing required field\(s\) positions, factor"):
        parse_spec("amplify-variance:layer=1")
    with pytest.raises(SpecError, match=r"ablate-mlp.mode: must be one of zero, mean, resample; got 'half'"):
        parse_spec("ablate-mlp:layers=1,mode=half")
    with pytest.raises(SpecError, match=r"ablate-mlp.layers: range '5-2' runs backwards"):
        parse_spec("ablate-mlp:layers=5-2")
    with pytest.raises(SpecError, match=r"amplify-variance.factor: takes one value"):
        parse_spec("amplify-variance:layer=1,positions=1,factor=2|3")
    with pytest.raises(SpecError, match="empty intervention spec"):
        parse_spec("  ")
    with pytest.raises(InterventionError, match=r"AmplifyVariance.factor: must be a finite number, got nan"):
        parse_spec("amplify-variance:layer=1,positions=2,factor=nan")


@register("scale-resid")
@dataclasses.dataclass(frozen=True)
class ScaleResid(Intervention):
    """A user kind: multiply a layer's residual stream (used by the registry tests)."""

    layers: tuple[int, ...]
    scale: float = 2.0
    explode: bool = False

    strength_field: ClassVar[str] = "scale"

    def hooks(self, model, ctx):
        def hook(resid, hook):
            if self.explode:
                raise RuntimeError("boom inside a hook")
            return resid * self.scale

        return [(f"blocks.{l}.hook_resid_post", hook) for l in self.layers]


def test_registry_accepts_a_user_kind(llama, batch):
    assert "scale-resid" in known_kinds()
    iv = parse_spec("scale-resid:layer=1,scale=3")
    assert iv == ScaleResid(layers=(1,), scale=3.0) and spec(iv) == "scale-resid:layers=1,scale=3.0"
    hooked, clean = run(llama, iv, batch)
    torch.testing.assert_close(hooked["blocks.1.hook_resid_post"], 3 * clean["blocks.1.hook_resid_post"])
    with pytest.raises(ValueError, match="already registered"):
        register("ablate-mlp")(ScaleResid)
    register("temporary-kind")(dataclasses.dataclass(frozen=True)(type("Tmp", (ScaleResid,), {"__annotations__": {}})))
    unregister("temporary-kind")
    assert "temporary-kind" not in KINDS


def test_user_kinds_get_default_range_checks_and_hook_name_checks(llama, batch):
    with forward_counter(llama) as calls:
        with pytest.raises(InterventionError, match=r"ScaleResid.layers: layer 9 is out of range"):
            with applied(llama, parse_spec("scale-resid:layer=9"), batch):
                llama(batch.tokens)

    @dataclasses.dataclass(frozen=True)
    class Misnamed(Intervention):
        def hooks(self, model, ctx):
            return [("blocks.0.hook_mlp_output", lambda act, hook: act)]

    with forward_counter(llama) as calls_2:
        with pytest.raises(InterventionError, match=r"Misnamed.hooks: 'blocks.0.hook_mlp_output' is not a hook point"):
            with applied(llama, Misnamed(), batch):
                llama(batch.tokens)
    assert calls == calls_2 == [] and no_hooks_left(llama)


def test_with_strength_and_start_block(llama, batch):
    iv = RescaleAlongSink(layers=(3, 2), target_norm=1.0)
    assert iv.reach(llama, batch).start == 2 and iv.strength == 1.0 and iv.with_strength(7.5).target_norm == 7.5
    assert RescaleAlongSink(layers=(1,), factor=0.5).with_strength(2).factor == 2.0
    assert PatchActivation("hook_embed").reach(llama, batch).start is None  # outside the blocks: the full forward
    with pytest.raises(InterventionError, match="AblateMLP has no strength to vary"):
        AblateMLP(layers=(1,)).with_strength(1.0)
    with pytest.raises(InterventionError, match="AmplifyVariance.factor: must be a finite number, got inf"):
        AmplifyVariance(layers=1, positions=(1,), factor=2.0).with_strength(math.inf)


# --------------------------------------------------------------------------- bad input


BAD = [
    (lambda: AblateMLP(layers=(7,), positions=(1,)), r"AblateMLP.layers: layer 7 is out of range; this model has 4 layers \(0..3\)"),
    (lambda: AblateMLP(layers=(1,), positions=(99,)), r"AblateMLP.positions: position 99 is out of range; the shortest sequence of the batch has \d+ tokens"),
    (lambda: PatchActivation("blocks.1.hook_nonexistent"), r"PatchActivation.hook_name: unknown hook name 'blocks.1.hook_nonexistent'"),
    (lambda: PatchActivation("blocks.9.hook_resid_post"), r"PatchActivation.hook_name: unknown hook name"),
    (lambda: RescaleAlongSink(layers=(1,), factor=2.0, direction=torch.ones(10)), r"RescaleAlongSink.direction: has size 10 but the model's d_model is 64"),
    (lambda: IsolateAggregation(layers=(1,), queries=(60,)), r"IsolateAggregation.queries: position 60 is out of range"),
    (lambda: IsolateAggregation(layers=(1,), queries=(3,), heads=(4,)), r"IsolateAggregation.heads: head 4 is out of range; this model has 4 heads"),
    (lambda: SigmoidAttention(layers=(-1,)), r"SigmoidAttention.layers: must be >= 0, got -1"),
    (lambda: AmplifyVariance(layers=4, positions=(2,), factor=2.0), r"AmplifyVariance.layers: layer 4 is out of range"),
    (lambda: AmplifyVariance(layers=1, positions=(2,), factor=float("nan")), r"AmplifyVariance.factor: must be a finite number, got nan"),
    (lambda: RescaleAlongSink(layers=(1,), target_norm=float("inf")), r"RescaleAlongSink.target_norm: must be a finite number, got inf"),
    (lambda: SigmoidAttention(layers=(1,), bias=float("nan")), r"SigmoidAttention.bias: must be a finite number"),
    (lambda: AblateMLP(layers=(1,), positions=()), r"AblateMLP.positions: is empty"),
    (lambda: AblateMLP(layers=()), r"AblateMLP.layers: is empty"),
    (lambda: IsolateAggregation(layers=(1,), queries=(2,), keys=(5,)), r"IsolateAggregation.keys: query 2 can see none of the keys \[5\]"),
    (lambda: RescaleAlongSink(layers=(1,)), r"RescaleAlongSink.target_norm: give exactly one of target_norm, factor or remove=True"),
    (lambda: RescaleAlongSink(layers=(1,), factor=1.0, direction=torch.zeros(64)), r"RescaleAlongSink.direction: is the zero vector"),
    (lambda: RescaleAlongSink(layers=(1,), factor=1.0, min_cos=1.5), r"RescaleAlongSink.min_cos: a cosine threshold must lie in \[-1, 1\]"),
    (lambda: AblateMLP(layers=(1,), reference=("x",)), r"AblateMLP.reference: is only used by mode='mean' or mode='resample'"),
    (lambda: HeadwiseRMSNorm(layers=(1,), eps=0.0), r"HeadwiseRMSNorm.eps: must be > 0"),
    (lambda: parse_spec("isolate:layers=1,queries=5 + nope:x=1"), r"unknown intervention kind 'nope'"),
]


@pytest.mark.parametrize("make, message", BAD, ids=[m for _, m in BAD])
@pytest.mark.parametrize("route", ["applied", "measure"])
def test_bad_input_fails_before_any_forward_and_leaves_no_hook(llama, batch, make, message, route):
    with forward_counter(llama) as calls:
        with pytest.raises(InterventionError, match=message):
            iv = make()
            if route == "applied":
                with applied(llama, iv, batch):
                    llama(batch.tokens)
            else:
                measure(llama, batch, hooks=hooks_for(llama, iv, batch), progress=False)
    assert calls == [], "a forward pass ran before the error"
    assert no_hooks_left(llama)


def test_batch_level_error_in_preparation_runs_no_forward(llama):
    single = tokenize(llama, TEXTS[:1])
    with forward_counter(llama) as calls:
        with pytest.raises(InterventionError, match=r"AblateMLP.mode: resample needs another prompt"):
            with applied(llama, AblateMLP(layers=(1,), positions=(2,), mode="resample"), single):
                llama(single.tokens)
        with pytest.raises(InterventionError, match=r"PatchActivation.source_position: position 30 is beyond the source text"):
            with applied(llama, PatchActivation("blocks.1.hook_resid_post", positions=(1,), source_text="short", source_position=30), single):
                llama(single.tokens)
    assert calls == [] and no_hooks_left(llama)


def test_error_raised_inside_a_hook_leaves_no_hook(llama, batch):
    boom = AblateMLP(layers=(0,), positions=(1,)) + ScaleResid(layers=(2,), explode=True)
    with pytest.raises(RuntimeError, match="boom inside a hook"):
        with applied(llama, boom, batch):
            llama(batch.tokens)
    assert no_hooks_left(llama)
    with pytest.raises(RuntimeError, match="boom inside a hook"):
        measure(llama, batch, hooks=hooks_for(llama, boom, batch), progress=False)
    assert no_hooks_left(llama)
    # An error the intervention itself raises mid-forward: a key outside Gemma 3's sliding window.
    gemma = tiny_model("gemma3")
    with pytest.raises(InterventionError, match="no visible key left"):
        with applied(gemma, IsolateAggregation(layers=(0,), queries=(40,), keys=(0,)), batch):
            gemma(batch.tokens)
    assert no_hooks_left(gemma)
    with pytest.raises(KeyError):  # an error raised by the body of the block, too
        with applied(llama, AblateMLP(layers=(0,)), batch):
            raise KeyError("user error")
    assert no_hooks_left(llama)
    assert registered_hooks(llama) == {}
