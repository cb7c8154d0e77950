"""Where an intervention acts is declared once (``Intervention.sites``), and every consumer reads it.

Validation, targets, random controls and ``vary`` must follow the declaration, so a kind with its
own field names (``at_layers``, ``tokens``) works everywhere without an edit in
``interventions/effect.py``; and the valid choices of every option come from its ``Literal`` type.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass
from typing import ClassVar

import pytest

from circuits.probes import tokenize
from interventions.base import Intervention, InterventionError, Sites, coerce_ints, site_value, sites_of
from interventions.effect import check_control, intervention_layers, intervention_positions, measure_effect, random_control, relocated, target_of, vary
from interventions.keybias import DropSinkAttention
from interventions.registry import get_kind, known_kinds, register, unregister

TEXTS = ["The cat sat on the mat, and then it slept.", "A quick brown fox jumps over the lazy dog!",
         "Sinks store attention that has nowhere to go.", "Every morning the small fox walked to the river."]


@dataclass(frozen=True)
class ScaleTokens(Intervention):
    """A user kind whose site fields have names of its own."""

    at_layers: tuple[int, ...]
    tokens: tuple[int, ...]
    scale: float = 2.0

    sites: ClassVar[Sites] = Sites(layers="at_layers", positions="tokens")
    strength_field: ClassVar[str] = "scale"

    def __post_init__(self) -> None:
        object.__setattr__(self, "at_layers", coerce_ints(self, "at_layers", self.at_layers, allow_none=False))
        object.__setattr__(self, "tokens", coerce_ints(self, "tokens", self.tokens, allow_none=False))

    def hooks(self, model, ctx):
        tokens, scale = list(self.tokens), self.scale

        def hook(mlp_out, hook):
            out = mlp_out.clone()
            out[:, tokens] *= scale
            return out

        return [(f"blocks.{l}.hook_mlp_out", hook) for l in self.at_layers]


@pytest.fixture(scope="module", autouse=True)
def registered():
    register("scale-tokens")(ScaleTokens)
    yield
    unregister("scale-tokens")


@pytest.fixture(scope="module")
def batch(llama):
    return tokenize(llama, TEXTS)


def test_validation_reads_the_declared_fields(llama):
    with pytest.raises(InterventionError, match=r"ScaleTokens\.at_layers: layer 9 is out of range"):
        ScaleTokens(at_layers=(9,), tokens=(3,)).validate(llama, 8)
    with pytest.raises(InterventionError, match=r"ScaleTokens\.tokens: position 8 is out of range"):
        ScaleTokens(at_layers=(1,), tokens=(8,)).validate(llama, 8)


def test_targets_controls_and_vary_follow_the_declaration(llama, batch):
    iv = ScaleTokens(at_layers=(1,), tokens=(3,))
    assert intervention_positions(iv) == (3,) and intervention_layers(iv) == (1,)
    assert iv.reach(llama, batch).layers == (1,)  # read from its hooks: nothing more declared
    target = target_of(iv, ["blocks.1.hook_mlp_out"], 4)
    assert target.positions == (3,) and target.layers == (2, 3)  # an MLP edit at 1 is first seen by block 2
    assert vary(iv, layer=2, position=5, strength=3.0) == ScaleTokens(at_layers=(2,), tokens=(5,), scale=3.0)
    moved = relocated(iv, positions={3: 6}, layers={1: 0})
    assert moved == ScaleTokens(at_layers=(0,), tokens=(6,))
    assert check_control(iv, "random") == "position"


def test_a_user_kind_runs_through_measure_effect_with_a_random_control(llama, batch):
    effect = measure_effect(llama, batch, "scale-tokens:at_layers=1,tokens=3,scale=4", control="position", n_resamples=0)
    control = effect.metadata["control"]
    assert control["mode"] == "position"
    assert effect.control_target.positions != (3,) and len(effect.control_target.positions) == 1
    assert effect.target.positions == (3,)


def test_attention_keys_are_a_site_that_controls_move(llama, batch):
    """DropSinkAttention acts on keys: its target is the key, and a position control moves it."""
    iv = DropSinkAttention(keys=(2,))
    assert intervention_positions(iv) == (2,)
    assert relocated(iv, positions={2: 5}) == DropSinkAttention(keys=(5,))
    clean = measure_effect(llama, batch, iv, n_resamples=0).clean
    control, info = random_control(iv, clean, "position", model=llama, n_positions=int(batch.lengths.min()), seed=0)
    assert info["mode"] == "position" and control.keys != (2,) and control.keys[0] not in (0, 2)


def test_isolate_moves_a_key_that_is_an_edited_query_with_it():
    iv = get_kind("isolate")(layers=(0,), queries=(7,), keys=(0, 7))
    assert relocated(iv, positions={7: 9}) == get_kind("isolate")(layers=(0,), queries=(9,), keys=(0, 9))


@dataclass(frozen=True)
class OneLayer(Intervention):
    """A user kind whose layer site is a single int (no built-in kind has one any more)."""

    layer: int
    positions: tuple[int, ...]

    def hooks(self, model, ctx):
        return []


def test_an_int_layer_site_takes_exactly_one_layer():
    iv = OneLayer(layer=2, positions=(5,))
    assert site_value(iv, "layers") == (2,)
    assert vary(iv, layer=3).layer == 3
    with pytest.raises(InterventionError, match="takes one value"):
        vary(iv, layers=(1, 2))


def test_every_builtin_kind_declares_its_sites():
    builtins = [get_kind(k) for k in known_kinds() if get_kind(k).__module__.startswith("interventions.")]
    assert len(builtins) >= 11  # the eleven kinds of commit 13568b5 (2026-11-30), and kinds added since
    for cls in builtins:
        declared = cls.__dict__.get("sites")
        assert isinstance(declared, Sites), f"{cls.__name__} does not declare its sites"
        names = {f.name for f in dataclasses.fields(cls)}
        for role, name in dataclasses.asdict(sites_of(cls)).items():
            assert name is None or name in names, f"{cls.__name__}.sites.{role} names a missing field {name!r}"


def literal_fields(cls) -> list[tuple[str, tuple]]:
    hints = typing.get_type_hints(cls)
    return [(f.name, typing.get_args(hints[f.name])) for f in dataclasses.fields(cls)
            if typing.get_origin(hints[f.name]) is typing.Literal]


@pytest.mark.parametrize("kind", [k for k in ["ablate-mlp", "rescale-sink", "amplify-variance", "edit-token-mlp"]])
def test_valid_choices_come_from_the_literal_types(kind):
    cls = get_kind(kind)
    fields = literal_fields(cls)
    assert fields, f"{kind} has no Literal option"
    required = {"ablate-mlp": dict(layers=(0,)), "rescale-sink": dict(layers=(0,), factor=2.0),
                "amplify-variance": dict(layers=0, positions=(1,), factor=2.0),
                "edit-token-mlp": dict(sequences=(0,), layers=(0,), positions=(1,))}[kind]
    for name, choices in fields:
        for good in choices:
            try:
                cls(**required, **{name: good})
            except InterventionError as exc:  # a choice may need another field (mode=rescale needs a factor)
                assert name not in str(exc).split(":")[0], exc
        with pytest.raises(InterventionError) as err:
            cls(**required, **{name: "no-such-choice"})
        message = str(err.value)
        assert message.startswith(f"{cls.__name__}.{name}:") and all(repr(c) in message for c in choices)


def test_sites_of_a_kind_without_a_declaration_are_the_conventional_names():
    @dataclass(frozen=True)
    class Plain(Intervention):
        layer: int
        positions: tuple[int, ...] | None = None

    assert sites_of(Plain) == Sites(layers="layer", positions="positions")
