"""The models' own chain-of-thought sessions: what is committed, how it becomes a batch, and
which long inputs each model gets."""

from __future__ import annotations

import pytest

from circuits.checks import ArgumentError
from circuits.errors import SinkscopeError
from circuits.long_inputs import LONG_INPUT_KINDS, long_input_batch, resolve_inputs
from circuits.models import PACKAGED as PACKAGED_MODELS
from circuits.probes import TracesMissing, has_traces, model_traces, reasoning_texts, tokenize, trace_batch, traces_file

PACKAGED = sorted(PACKAGED_MODELS)

@pytest.mark.parametrize("name", PACKAGED)
def test_every_packaged_model_has_its_own_long_sessions_with_their_settings(name):
    header, sessions = model_traces(name)
    assert header["schema"] == "sinkscope.traces/2" and header["settings"]["model"] == name
    assert {"temperature", "top_p", "seed", "target_tokens"} <= set(header["settings"])
    assert header["versions"]["torch"] and header["date"]
    targets = header["settings"]["target_tokens"]
    assert len(sessions) == len(targets) >= 6  # the reports read the first 6
    for s, target in zip(sessions, targets):
        # a session stops once its conversation reaches the target; re-rendering it through the
        # chat template may drop a token or two at the turn boundaries
        assert s["n_tokens"] == len(s["token_ids"]) >= 0.95 * min(target, header["context"])
        # one turn per problem posed; a model whose first answer runs to the 1,024-token cap
        # (Gemma 3's loop) reaches the target with one problem
        assert len(s["turns"]) == len(s["problems"]) >= 1
        assert all(t["finish"] in ("eos", "length") and 0 < t["new_tokens"] <= header["settings"]["max_new_tokens"] for t in s["turns"])
        assert sum(t["new_tokens"] for t in s["turns"]) > s["n_tokens"] / 2  # most of it is the model's own text
    # the reports' long size reads one session at Wong et al.'s length
    assert max(s["n_tokens"] for s in sessions) >= 8192


#: the chat models: their control sessions leave the system message empty (Gemma 3 270M's
#: plain transcripts have no system message)
CHAT = ["qwen2.5-coder-0.5b", "smollm2-135m"]


@pytest.mark.parametrize("name", CHAT)
def test_the_chat_models_control_sessions_differ_from_the_others_in_the_system_message_alone(name):
    header, sessions = model_traces(name)
    c_header, control = model_traces(name, "empty")
    assert c_header["system_prompt"] == "" and header["system_prompt"].startswith("You are a careful math tutor")
    assert c_header["settings"]["system"] == "empty"
    same = ("model", "target_tokens", "max_new_tokens", "temperature", "top_p", "seed")
    assert {k: c_header["settings"][k] for k in same} == {k: header["settings"][k] for k in same}
    assert len(control) == len(sessions)
    for a, b in zip(sessions, control):
        assert b["problems"][0] == a["problems"][0]  # session s starts at problem s on both sides
        assert b["n_tokens"] == len(b["token_ids"]) >= 0.95 * min(c_header["settings"]["target_tokens"][b["id"]], c_header["context"])
    # the template opens with an empty system turn, not with the template's own default prompt
    assert control[0]["text"].startswith("<|im_start|>system\n<|im_end|>\n<|im_start|>user\n")


def test_gemma3_has_no_control_sessions_and_a_system_prompt_is_named():
    assert not has_traces("gemma3-270m", "empty")
    with pytest.raises(TracesMissing, match="empty-system control traces"):
        model_traces("gemma3-270m", "empty")
    with pytest.raises(ArgumentError, match="system must be one of project, empty"):
        traces_file("smollm2-135m", "none")


@pytest.mark.real
def test_a_trace_batch_is_the_stored_ids_cut_to_max_tokens(smollm2):
    _, sessions = model_traces("smollm2-135m")
    batch = trace_batch(smollm2, 2, max_tokens=40)
    assert batch.token_ids == [s["token_ids"][:40] for s in sessions[:2]]
    assert batch.lengths.tolist() == [40, 40]
    # SmolLM2's tokenizer adds no BOS to plain text, but its BOS token is <|im_start|>, which
    # opens its chat template: the sessions do start with the BOS token
    assert batch.str_tokens[0][0] == "<|im_start|>" == smollm2.tokenizer.bos_token
    assert batch.prepend_bos is True


@pytest.mark.real
def test_a_longer_max_tokens_picks_the_sessions_that_are_that_long(smollm2):
    """The first sessions in file order holding max_tokens, then the longest of the rest."""
    _, sessions = model_traces("smollm2-135m")
    lengths = [len(s["token_ids"]) for s in sessions]
    long_enough = [i for i, n in enumerate(lengths) if n >= 1500]
    assert 2 <= len(long_enough) < len(sessions)
    batch = trace_batch(smollm2, 2, max_tokens=1500)
    assert batch.token_ids == [sessions[i]["token_ids"][:1500] for i in long_enough[:2]]
    everything = trace_batch(smollm2, len(sessions), max_tokens=1500)
    rest = sorted((i for i in range(len(sessions)) if i not in long_enough), key=lambda i: -lengths[i])
    assert everything.token_ids == [sessions[i]["token_ids"][:1500] for i in long_enough + rest]


@pytest.mark.real
def test_gemma3_sessions_start_with_its_bos(gemma3):
    batch = trace_batch(gemma3, 1, max_tokens=8)
    assert batch.prepend_bos is True and batch.tokens[0, 0].item() == gemma3.tokenizer.bos_token_id


@pytest.mark.real
def test_auto_means_generated_where_the_model_has_traces_else_written(smollm2, llama):
    assert resolve_inputs(smollm2, "auto") == "generated"
    assert resolve_inputs(llama, "auto") == "written"
    assert resolve_inputs(smollm2, "written") == "written"
    written = long_input_batch(smollm2, 2, 32, "written")
    assert written.token_ids == tokenize(smollm2, reasoning_texts(2), max_tokens=32).token_ids


def test_a_model_without_traces_asked_for_them_is_one_precise_error(llama):
    with pytest.raises(TracesMissing, match="no generated traces for 'tiny-llama'"):
        long_input_batch(llama, 2, 32, "generated")


@pytest.mark.real
def test_an_unknown_kind_of_input_names_the_choices(smollm2):
    with pytest.raises(SinkscopeError, match=", ".join(LONG_INPUT_KINDS)):
        resolve_inputs(smollm2, "invented")
