"""Input a careless or hostile user gives, each refused with what was wrong, before any work.

The promise (docs/command.md, "Errors and exit codes"): the command prints one ``sinkscope: error: ...`` line, exits 2 and
writes nothing; the library raises a :class:`~circuits.errors.SinkscopeError` naming the
argument, the value and what is accepted. Numbers are checked by the same functions in both
(:mod:`circuits.checks`). Results are never NaN without a word: an effect with no valid target
says why in print and in effect.json.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from circuits import anatomy
from circuits.checks import ArgumentError
from circuits.errors import SinkscopeError
from circuits.measure import measure
from circuits.meter import MeterError
from circuits.probes import TokenBatch, TokenizationError, batch_from_ids, check_texts, read_prompts, tokenize
from circuits.view import ViewError, view
from helpers import expect_bad_input, forward_counter
from interventions.base import registered_hooks
from interventions.effect import EffectError, EffectSettings, measure_effect
from interventions.registry import SpecError, parse_spec
from sinkscope.cli import main
from synthetic import synthetic

TEXTS = ["The cat sat on the mat.", "A quick brown fox jumps.", "Sinks store attention."]


def strict_json(path):
    """Parse JSON refusing NaN and the infinities (Python's json would accept them)."""
    def refuse(name):
        raise AssertionError(f"{path.name} holds {name}")
    return json.loads(path.read_text(), parse_constant=refuse)


@pytest.fixture
def no_model_load(monkeypatch):
    """Any model load fails the test: bad input must be found before it."""
    from circuits import models

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the input was checked")

    monkeypatch.setattr(models, "load_model", refuse)


# --------------------------------------------------------------------------- 1. never NaN without a word


def test_an_effect_whose_target_has_no_later_token_is_refused_before_any_forward(tmp_path, capsys, llama):
    msg = expect_bad_input(capsys, tmp_path, ["intervene", "--model", "tiny-llama", "--max-tokens", "2",
                                              "--intervention", "ablate-mlp:layer=1,positions=1", "--text", *TEXTS])
    assert "target position(s) [1] have no later token in any sequence (the longest has 2 tokens)" in msg
    batch = tokenize(llama, TEXTS, max_tokens=2)
    with forward_counter(llama) as calls:
        with pytest.raises(EffectError, match=r"target position\(s\) \[1\] have no later token"):
            measure_effect(llama, batch, "ablate-mlp:layer=1,positions=1")
    assert calls == [] and registered_hooks(llama) == {}


def test_an_effect_after_the_last_attention_is_an_explained_empty_result(tmp_path, capsys):
    out = tmp_path / "o"
    code = main(["intervene", "--model", "tiny-llama", "--intervention", "ablate-mlp:layer=3,positions=1",
                 "--text", *TEXTS, "--n-resamples", "50", "--out", str(out)])
    printed = capsys.readouterr().out
    assert code == 0
    assert "no target sink score: the intervention acts after the last layer's attention" in printed
    assert "nan" not in printed.lower()
    target = strict_json(out / "effect.json")["summary"]["target_sink_score"]
    assert target["n"] == 0 and target["clean"] is None and target["note"].startswith("no target sink score")


def test_a_target_with_too_few_values_for_a_ci_says_so_instead_of_nan(tmp_path, capsys):
    # byte tokens: "ab" has 2 tokens, so position 1 has no later query there; 2 of 3 sequences have a value
    out = tmp_path / "o"
    code = main(["intervene", "--model", "tiny-llama", "--intervention", "ablate-mlp:layer=0,positions=1",
                 "--text", "ab", "abcdef", "ghijkl", "--n-resamples", "50", "--out", str(out)])
    printed = capsys.readouterr().out
    assert code == 0 and "nan" not in printed.lower()
    assert "no CI: a confidence interval needs at least 3 sequences with a value (got 2)" in printed
    target = strict_json(out / "effect.json")["summary"]["target_sink_score"]
    assert target["n"] == 2 and target["ci95"] == [None, None] and "got 2" in target["ci95_note"]


def test_a_one_token_text_is_refused_as_max_tokens_one_is(tmp_path, capsys, llama):
    by_text = expect_bad_input(capsys, tmp_path, ["measure", "--model", "tiny-llama", "--text", "a"])
    by_truncation = expect_bad_input(capsys, tmp_path, ["measure", "--model", "tiny-llama", "--text", "abc", "--max-tokens", "1"])
    assert "text 0 is 1 token long; a sink needs at least 2 tokens" in by_text
    assert "max_tokens must be at least 2" in by_truncation
    assert "(a sink is attention from later queries)" in by_truncation and "(it is attention from later queries)" in by_text
    with pytest.raises(TokenizationError, match="text 1 is 1 token long"):
        tokenize(llama, ["abc", "a"])
    with pytest.raises(TokenizationError, match="row 0 is 1 token long"):
        batch_from_ids(llama, [[5]], prepend_bos=False)
    assert tokenize(llama, "a", prepend_bos=True).lengths.tolist() == [2]  # with BOS it is two tokens: measured
    assert main(["measure", "--model", "tiny-llama", "--text", "a", "--prepend-bos", "--out", str(tmp_path / "ok")]) == 0


@pytest.mark.parametrize("eps", [float("nan"), 2, -1, 0, 1, float("inf"), "0.3", None, True])
def test_sink_rate_eps_is_checked_as_the_command_checks_it(eps, tmp_path, capsys):
    meas = synthetic((6, 5), secondary=())
    with pytest.raises(ArgumentError) as api:
        meas.sink_rate(eps=eps)
    with pytest.raises(ArgumentError):
        meas.sink_indicator(eps)
    with pytest.raises(ArgumentError):
        anatomy.sink_rate_ci(meas, eps)
    with pytest.raises(ArgumentError):
        anatomy.primary_sink_layers(meas, eps)
    with pytest.raises(ViewError, match="eps must be a number strictly between 0 and 1"):
        view(meas, eps=eps)
    with pytest.raises(EffectError, match="eps must be a number strictly between 0 and 1"):
        EffectSettings(eps=eps)
    assert str(api.value).startswith("eps must be a number strictly between 0 and 1, got ")
    if isinstance(eps, (int, float)) and not isinstance(eps, bool):  # the command takes numbers only
        cli = expect_bad_input(capsys, tmp_path, ["measure", "--model", "tiny-llama", "--text", "abc", "--eps", str(eps)])
        assert cli.split(", got ")[0] == "sinkscope: error: --" + str(api.value).split(", got ")[0]  # one rule, one wording


def test_a_numpy_eps_is_a_number():
    meas = synthetic((6, 5), secondary=())
    np.testing.assert_array_equal(meas.sink_rate(np.float64(0.3)), meas.sink_rate(0.3))


# --------------------------------------------------------------------------- 3. one line, not a traceback


@pytest.mark.parametrize("control", [[], ["--control", "random"]])
def test_a_negative_seed_is_refused_before_the_model_loads(tmp_path, capsys, no_model_load, control):
    msg = expect_bad_input(capsys, tmp_path, ["intervene", "--model", "tiny-llama", "--intervention",
                                              "ablate-mlp:layer=1,positions=1", "--text", *TEXTS, "--seed", "-1", *control])
    assert msg == "sinkscope: error: --seed must be a non-negative integer (numpy's seeds are), got -1"


def test_a_negative_seed_in_the_library_names_the_argument(llama):
    with pytest.raises(EffectError, match="seed must be a non-negative integer"):
        measure_effect(llama, TEXTS, "ablate-mlp:layer=1", seed=-1)


@pytest.mark.parametrize("missing", ["model", "wong", "claims", "settings"])
def test_reproduce_compare_without_what_it_reads_is_one_line_before_any_work(tmp_path, capsys, no_model_load, missing):
    from helpers import ROOT

    doc = json.loads((ROOT / "docs/figures/smollm2-135m/numbers.json").read_text())
    del doc[missing]
    other = tmp_path / "numbers.json"
    other.write_text(json.dumps(doc))
    msg = expect_bad_input(capsys, tmp_path, ["reproduce", "--model", "smollm2-135m", "--size", "ci", "--compare", str(other)])
    assert f"compare: {other}" in msg
    assert ("names no model" in msg) if missing == "model" else (f"lacks what a length comparison reads (KeyError: '{missing}')" in msg)


NESTED = ["[" * 100_000, '{"text": ' + "[" * 100_000, '[{"a": ' * 50_000]


@pytest.mark.parametrize("name,body,fmt", [
    *[("prompts.json", body, []) for body in NESTED],
    *[("prompts.jsonl", body, []) for body in NESTED],
    ("prompts.txt", NESTED[0], ["--prompts-format", "json"]),
    ("prompts", NESTED[0], []),  # no telling extension: sniffed as JSON
])
def test_deeply_nested_json_prompts_are_one_line(tmp_path, capsys, no_model_load, name, body, fmt):
    path = tmp_path / name
    path.write_text(body)
    msg = expect_bad_input(capsys, tmp_path, ["measure", "--model", "tiny-llama", "--prompts", str(path), *fmt])
    assert "nests JSON arrays or objects too deeply to be read" in msg


def test_deeply_nested_json_in_a_compare_file_is_one_line(tmp_path, capsys, no_model_load):
    other = tmp_path / "numbers.json"
    other.write_text("[" * 100_000)
    msg = expect_bad_input(capsys, tmp_path, ["reproduce", "--model", "smollm2-135m", "--size", "ci", "--compare", str(other)])
    assert "nests JSON arrays or objects too deeply to be read" in msg


@pytest.mark.parametrize("content,suffix,where", [
    ('["fine text", "bad \\ud800 text"]', ".json", "item 1"),
    ('{"text": "ok"}\n{"text": "\\udfff"}\n', ".jsonl", "line 2"),
    ('[{"text": "x \\ud83d y"}]', ".json", "item 0"),  # half of a surrogate pair
])
def test_a_lone_surrogate_in_a_json_prompt_is_one_line(tmp_path, capsys, no_model_load, content, suffix, where):
    path = tmp_path / f"p{suffix}"
    path.write_text(content)
    msg = expect_bad_input(capsys, tmp_path, ["measure", "--model", "tiny-llama", "--prompts", str(path)])
    assert where in msg and "lone surrogate" in msg and "not a character" in msg


def test_a_lone_surrogate_in_a_text_argument_or_the_api_is_refused(tmp_path, capsys, llama):
    # a byte that is not UTF-8 in a command-line argument reaches Python as a lone surrogate
    msg = expect_bad_input(capsys, tmp_path, ["measure", "--model", "tiny-llama", "--text", "ok text", "caf\udce9"])
    assert "text 1 holds a lone surrogate U+DCE9 at character 3" in msg
    with pytest.raises(TokenizationError, match=r"lone surrogate U\+D800"):
        tokenize(llama, "a\ud800b")
    prompts = tmp_path / "p.json"
    prompts.write_text('["\\ud800"]')
    with pytest.raises(TokenizationError, match="prompts file .*, item 0 holds a lone surrogate"):
        read_prompts(prompts)


# --------------------------------------------------------------------------- 4. every number before any work


@pytest.mark.parametrize("option,value,expected", [
    ("--lr", "inf", "--lr must be a finite number > 0, got inf"),
    ("--lr", "0", "--lr must be a finite number > 0, got 0.0"),
    ("--weight-decay", "nan", "--weight-decay must be a finite number >= 0, got nan"),
    ("--weight-decay", "-5", "--weight-decay must be a finite number >= 0, got -5.0"),
    ("--sigmoid-bias", "nan", "--sigmoid-bias must be a finite number, got nan"),
    ("--sigmoid-bias", "-inf", "--sigmoid-bias must be a finite number, got -inf"),
    ("--eps", "nan", "--eps must be a number strictly between 0 and 1, got nan"),
    ("--warmup-steps", "-1", "--warmup-steps must be a non-negative integer, got -1"),
])
def test_pretrain_checks_every_number_before_any_work(tmp_path, capsys, option, value, expected):
    msg = expect_bad_input(capsys, tmp_path, ["pretrain", "--variant", "sigmoid-nonorm", "--steps", "2",
                                              "--corpus", "builtin", f"{option}={value}"])
    assert msg == f"sinkscope: error: {expected}"
    assert list(tmp_path.iterdir()) == [], "no run folder left behind"


@pytest.mark.parametrize("option,value,expected", [
    ("--bench-steps", "-5", "--bench-steps must be 0 (no throughput measurement) or a positive integer, got -5"),
    ("--jobs", "0", "--jobs must be a positive integer, got 0"),
    ("--weight-decay", "nan", "--weight-decay must be a finite number >= 0, got nan"),
])
def test_lab_compare_checks_every_number_before_any_work(tmp_path, capsys, option, value, expected):
    msg = expect_bad_input(capsys, tmp_path, ["lab-compare", "--corpus", "builtin", "--steps", "2", option, value])
    assert msg == f"sinkscope: error: {expected}"
    assert list(tmp_path.iterdir()) == [], "no runs/ left behind"


def test_the_lab_config_refuses_nan_in_the_library_too():
    from sinkscope.lab.train import LabError, TrainConfig

    with pytest.raises(LabError, match="weight_decay must be a finite number >= 0, got nan"):
        TrainConfig(weight_decay=float("nan")).validate()
    with pytest.raises(LabError, match="beta2 must be a finite number >= 0 and < 1, got 1.5"):
        TrainConfig(beta2=1.5).validate()


# --------------------------------------------------------------------------- 6. the library says what was wrong


def test_measure_takes_texts_as_measure_effect_does(llama):
    by_text = measure(llama, "hello there", progress=False)
    by_batch = measure(llama, tokenize(llama, "hello there"), progress=False)
    np.testing.assert_array_equal(by_text.sink_score, by_batch.sink_score)
    assert by_text.prepend_bos is False and by_text.tokens[0][:5] == ["h", "e", "l", "l", "o"]
    two = measure(llama, ["hello there", "general kenobi"], progress=False)
    assert two.n_sequences == 2


@pytest.mark.parametrize("batch,expected", [
    ([1, 2, 3], "batch must be a TokenBatch (circuits.probes.tokenize), a text or a list of texts; got [1, 2, 3] (list); "
                "for token ids, build one with circuits.probes.batch_from_ids"),
    (torch.tensor([[1, 2, 3]]), "got a torch.Tensor of shape (1, 3); for token ids"),
    (None, "got None (NoneType)"),
    ([], "got an empty list"),
    (b"bytes", "got b'bytes' (bytes)"),
])
def test_measure_refuses_what_is_not_a_batch_by_name(llama, batch, expected):
    with forward_counter(llama) as calls:
        with pytest.raises(TokenizationError) as err:
            measure(llama, batch, progress=False)
    assert expected in str(err.value) and calls == [] and registered_hooks(llama) == {}


def test_an_empty_batch_a_bad_batch_size_and_ids_beyond_the_vocabulary(llama):
    empty = TokenBatch(torch.zeros((0, 0), dtype=torch.long), torch.zeros(0, dtype=torch.long), False, [])
    batch = tokenize(llama, TEXTS)
    with forward_counter(llama) as calls:
        with pytest.raises(TokenizationError, match="batch is an empty batch: no sequence to measure"):
            measure(llama, empty, progress=False)
        for size in (0, -2, 2.5, True):
            with pytest.raises(MeterError, match=f"batch_size must be a positive integer, got {size}"):
                measure(llama, batch, batch_size=size, progress=False)
        with pytest.raises(TokenizationError, match=r"row 1 holds token id 300, outside the model's vocabulary of 259 \(ids 0..258\)"):
            batch_from_ids(llama, [[1, 2], [3, 300]], prepend_bos=False)
        wild = tokenize(llama, TEXTS)
        wild.tokens[2, 4] = 10_000
        with pytest.raises(TokenizationError, match="sequence 2, position 4 holds token id 10000, outside the model's vocabulary of 259"):
            measure(llama, wild, progress=False)
        with pytest.raises(TokenizationError, match="token id -1"):
            wild.tokens[2, 4] = -1
            measure(llama, wild, progress=False)
    assert calls == []


@pytest.mark.parametrize("texts,expected", [
    (123, "texts must be a text (str) or a list of texts, got 123 (int)"),
    (None, "texts must be a text (str) or a list of texts, got None (NoneType)"),
    (b"abc", "texts must be a text (str) or a list of texts, got b'abc' (bytes)"),
    (["ok", 5], "text 1 must be a string, got 5 (int)"),
    ([], "no texts given"),
])
def test_tokenize_names_what_is_not_text(llama, texts, expected):
    with pytest.raises(TokenizationError) as err:
        tokenize(llama, texts)
    assert str(err.value) == expected
    with pytest.raises(TokenizationError):
        check_texts(texts)


@pytest.mark.parametrize("spec", [123, None, ["ablate-mlp:layer=1"], 1.5])
def test_parse_spec_names_what_is_not_a_spec(spec):
    with pytest.raises(SpecError) as err:
        parse_spec(spec)
    assert "an intervention spec must be a text (str)" in str(err.value) and repr(spec) in str(err.value)
    assert isinstance(err.value, SinkscopeError)


def test_measure_effect_takes_the_same_inputs(llama):
    with pytest.raises(TokenizationError, match="for token ids"):
        measure_effect(llama, [1, 2, 3], "ablate-mlp:layer=1")
    with pytest.raises(EffectError, match="batch_size must be a positive integer, got 0"):
        measure_effect(llama, TEXTS, "ablate-mlp:layer=1", batch_size=0)


def test_max_tokens_must_be_an_integer(llama):
    with pytest.raises(TokenizationError, match=r"max_tokens must be an integer, got 2.5"):
        tokenize(llama, TEXTS, max_tokens=2.5)


# --------------------------------------------------------------------------- literal special tokens


def test_special_token_text_is_read_as_the_special_token_and_recorded(tmp_path, capsys):
    out = tmp_path / "o"
    assert main(["measure", "--model", "tiny-llama", "--text", "<bos>hello <eos> you", "plain text", "--out", str(out)]) == 0
    doc = strict_json(out / "sinks.json")
    assert doc["prepend_bos"] is False and doc["tokens"][0][:2] == ["<bos>", "h"]
    special = doc["metadata"]["special_tokens"]
    assert special["rule"].startswith("special-token text in a prompt (such as <|im_start|>) is read as that special token")
    assert special["first_token_is_bos"] == [True, False], "the text's own <bos> is recorded even with prepend_bos false"
    assert special["from_text"] == [[0, 0, "<bos>"], [0, 7, "<eos>"]] and special["n_from_text"] == 2
    # a BOS sinkscope prepends is not "from the text"
    out2 = tmp_path / "o2"
    assert main(["measure", "--model", "tiny-llama", "--text", "hello <eos> you", "--prepend-bos", "--out", str(out2)]) == 0
    special = strict_json(out2 / "sinks.json")["metadata"]["special_tokens"]
    assert special["first_token_is_bos"] == [True] and special["from_text"] == [[0, 7, "<eos>"]]


def test_more_of_the_same_classes_are_named(llama):
    from circuits.models import UnknownModelError, load_model

    with pytest.raises(UnknownModelError, match=r"name must be a model name, a local folder or a Hugging Face id \(a str\), got 123 \(int\)"):
        load_model(123)
    with pytest.raises(TokenizationError, match="prepend_bos must be True, False or None .*, got 'yes' \\(str\\)"):
        tokenize(llama, "abc", prepend_bos="yes")
    with pytest.raises(EffectError, match="flag_percent must be a finite number >= 0 and <= 100, got nan"):
        measure_effect(llama, TEXTS, "ablate-mlp:layer=1", flag_percent=float("nan"))
    with pytest.raises(ViewError, match="max_values must be a positive integer, got 0"):
        view(synthetic((6,)), max_values=0)
    with pytest.raises(EffectError, match="confidence must be a finite number > 0 and < 1, got 1.5"):
        EffectSettings(confidence=1.5)
