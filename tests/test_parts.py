"""Where each token of a stored session sits (circuits.parts): template, problem or the model's own tokens.

Hand-checked on small constructed sessions written with a character-level tokenizer (one token
per character, two special tokens), in both forms a session can take (a chat template, a plain
transcript); then on one stored session of each packaged model.
"""

from __future__ import annotations

import pytest
import torch

from circuits.meter import SubBatch
from circuits.parts import (
    FORMS,
    PARTS,
    PLAIN_ANSWER_END,
    PLAIN_TURN,
    PartsError,
    check_parts,
    from_spans,
    part_column,
    session_parts,
    to_spans,
    transcript_form,
)
from circuits.probes import TokenBatch, model_traces, trace_batch

START, END = "<s>", "<e>"  # the chat template's special tokens, ids 1000 and 1001
SPECIAL = {1000: START, 1001: END}


class CharTokenizer:
    """One token per character (id = code point); ``<s>`` and ``<e>`` are special tokens. With
    ``chat=True`` a ChatML-like template: ``<s>role\\ncontent<e>\\n`` per message."""

    def __init__(self, chat: bool):
        self.chat_template = "chatml-like" if chat else None
        self.all_special_ids = list(SPECIAL)
        self.added_tokens_decoder = {}

    def decode(self, ids):
        return "".join(SPECIAL.get(i, chr(i)) for i in ids)

    def encode(self, text: str) -> list[int]:
        ids, k = [], 0
        while k < len(text):
            for i, s in SPECIAL.items():
                if text.startswith(s, k):
                    ids.append(i)
                    k += len(s)
                    break
            else:
                ids.append(ord(text[k]))
                k += 1
        return ids

    def apply_chat_template(self, messages, tokenize=False, add_generation_prompt=False):
        text = "".join(f"{START}{m['role']}\n{m['content']}{END}\n" for m in messages)
        return text + (f"{START}assistant\n" if add_generation_prompt else "")


def chat_session(answer_tokens=None):
    """System 'Sys.', problems 'P1?' and 'P2?', answers 'a1' and 'bb2': 44 tokens, laid out as
    scripts/generate_traces.py writes them (the second problem with 'Next problem: ')."""
    tok = CharTokenizer(chat=True)
    first = f"{START}system\nSys.{END}\n{START}user\nP1?{END}\n{START}assistant\n"  # 37 characters, 33 tokens
    second = f"a1{END}\n{START}user\nNext problem: P2?{END}\n{START}assistant\n"
    text = first + second + f"bb2{END}\n"
    ids = tok.encode(text)
    p0 = len(tok.encode(first))
    p1 = len(tok.encode(first + second))
    new = answer_tokens or (3, 4)  # the sampled answers ended with <e>: 2 + 1 and 3 + 1 tokens
    turns = [{"problem": "P1?", "prompt_tokens": p0, "new_tokens": new[0], "finish": "eos"},
             {"problem": "P2?", "prompt_tokens": p1, "new_tokens": new[1], "finish": "eos"}]
    return tok, {"id": 7, "problems": ["P1?", "P2?"], "turns": turns, "token_ids": ids}


def test_a_chat_session_by_hand():
    tok, session = chat_session()
    ids = session["token_ids"]
    labels = session_parts(tok, session)
    assert transcript_form(tok) == "chat" and len(labels) == len(ids)
    text = lambda part: ["".join(tok.decode([i]) for i, lab in zip(ids, labels) if lab == part)]  # noqa: E731
    assert text("generated") == ["a1bb2"]
    assert text("problem") == ["P1?P2?"]
    # everything else is the template: special tokens, role headers, the system prompt, the lead-in
    assert text("template") == [tok.decode(ids).replace("a1", "").replace("bb2", "").replace("P1?", "").replace("P2?", "")]
    assert "Sys." in text("template")[0] and "Next problem: " in text("template")[0]
    p0, p1 = (t["prompt_tokens"] for t in session["turns"])
    assert labels[p0 : p0 + 2] == ["generated"] * 2 and labels[p0 + 2] == "template"  # <e> closes the turn: the template's
    assert labels[p1 : p1 + 3] == ["generated"] * 3 and labels[p1 + 3 :] == ["template"] * 2


def test_an_answer_ends_where_the_template_resumes_not_after_new_tokens():
    """A re-tokenized answer can be shorter or longer than the sampled one (new_tokens): the end
    is the template's end-of-turn marker, so a wrong count changes nothing."""
    tok, session = chat_session()
    _, off = chat_session(answer_tokens=(1, 9))
    assert session_parts(tok, off) == session_parts(tok, session)


def test_a_plain_transcript_by_hand():
    """No chat template: 'Problem n: ... Solution: ...' turns, each answer followed by a blank line."""
    tok = CharTokenizer(chat=False)
    first = "^" + PLAIN_TURN.format(number=1, problem="P1?")  # '^' stands for a BOS
    second = "a1" + PLAIN_ANSWER_END + PLAIN_TURN.format(number=2, problem="P2?")
    ids = tok.encode(first + second + "bb2" + PLAIN_ANSWER_END)
    turns = [{"problem": "P1?", "prompt_tokens": len(first), "new_tokens": 2, "finish": "length"},
             {"problem": "P2?", "prompt_tokens": len(first + second), "new_tokens": 3, "finish": "length"}]
    labels = session_parts(tok, {"id": 0, "turns": turns, "token_ids": ids})
    assert transcript_form(tok) == "plain" and "no chat template" in FORMS["plain"]
    pick = lambda part: "".join(chr(i) for i, lab in zip(ids, labels) if lab == part)  # noqa: E731
    assert pick("generated") == "a1bb2" and pick("problem") == "P1?P2?"
    assert pick("template") == "^Problem 1: \n\nSolution: Let's think step by step.\n\n\nProblem 2: \n\nSolution: Let's think step by step.\n\n\n"


def test_a_session_that_does_not_match_its_turns_is_named():
    tok, session = chat_session()
    wrong = {**session, "turns": [{**session["turns"][0], "problem": "P9?"}, session["turns"][1]]}
    with pytest.raises(PartsError, match=r"session 7, turn 0: the problem 'P9\?'"):
        session_parts(tok, wrong)
    shifted = {**session, "turns": [{**session["turns"][0], "prompt_tokens": 30}, session["turns"][1]]}
    with pytest.raises(PartsError, match="session 7, turn 0: the prompt before the answer at token 30"):
        session_parts(tok, shifted)
    with pytest.raises(PartsError, match="session 7 records no turns"):
        session_parts(tok, {**session, "turns": []})


def test_spans_labels_and_columns():
    labels = ["template"] * 3 + ["problem"] * 2 + ["generated"] * 4 + ["template"]
    spans = to_spans(labels)
    assert spans == [[0, 3, "template"], [3, 5, "problem"], [5, 9, "generated"], [9, 10, "template"]]
    assert from_spans(spans) == labels
    with pytest.raises(PartsError, match="a run starts at 4, expected 3"):
        from_spans([[0, 3, "template"], [4, 5, "problem"]])
    import pandas as pd

    table = pd.DataFrame({"sequence": [0, 1, 1], "position": [4, 0, 6]})
    assert part_column(table, [labels, labels]) == ["problem", "template", "generated"]
    assert part_column(table, None) == [None, None, None]
    assert check_parts([labels], [10]) == [labels]
    with pytest.raises(PartsError, match="sequence 0 has 10 labels for 9 tokens"):
        check_parts([labels], [9])
    with pytest.raises(PartsError, match="the label 'prompt'"):
        check_parts([["prompt"]], [1])


def test_a_batch_keeps_its_parts_through_select_and_sub_batches():
    labels = [["template", "generated", "generated"], ["template", "problem"]]
    batch = TokenBatch(torch.tensor([[1, 2, 3], [4, 5, 0]]), torch.tensor([3, 2]), False, [["a"] * 3, ["b"] * 2], labels, "chat")
    assert batch.select([1]).parts == [labels[1]] and batch.select([1]).parts_form == "chat"
    sub = SubBatch.of(batch, [1, 0])
    assert sub.parts == [labels[1], labels[0]] and sub.rows == [1, 0] and sub.parts_form == "chat"
    assert TokenBatch(batch.tokens, batch.lengths, False, batch.str_tokens).select([0]).parts is None


# ------------------------------------------------------------------------------ the stored sessions


@pytest.mark.real
@pytest.mark.parametrize("fixture,name,form", [("smollm2", "smollm2-135m", "chat"), ("qwen2", "qwen2.5-coder-0.5b", "chat"),
                                               ("gemma3", "gemma3-270m", "plain")])
def test_one_stored_session_per_packaged_model(request, fixture, name, form):
    """The first session's labels, read back as text: the template holds the system prompt
    (chat form) or the transcript's lead-ins (plain form), the problem tokens spell the first
    problem, and each generated run starts where its turn's prompt ends and holds no special
    token. The labels travel with trace_batch's batch, cut to max_tokens."""
    model = request.getfixturevalue(fixture)
    tok = model.tokenizer
    header, sessions = model_traces(name)
    session = sessions[0]
    batch = trace_batch(model, 1, max_tokens=1024)
    labels = batch.parts[0]
    assert batch.parts_form == form == transcript_form(tok) and len(labels) == int(batch.lengths[0]) == 1024
    assert labels == session_parts(tok, session)[:1024]
    ids = session["token_ids"]
    spans = to_spans(labels)
    text = {part: [tok.decode(ids[a:b]) for a, b, p in spans if p == part] for part in PARTS}
    assert text["problem"][0].strip() == session["problems"][0]
    if form == "chat":
        assert header["system_prompt"] in text["template"][0]
        assert text["template"][0].endswith("user\n") and text["template"][1].endswith("assistant\n")
    else:
        assert text["template"][0] == tok.decode(ids[:1]) + "Problem 1:" and "Solution: Let's think step by step." in text["template"][1]
    starts = [t["prompt_tokens"] for t in session["turns"] if t["prompt_tokens"] < 1024]
    generated = [(a, b) for a, b, p in spans if p == "generated"]
    assert [a for a, _ in generated] == starts
    special = set(tok.all_special_ids)
    assert not any(i in special for a, b in generated for i in ids[a:b])
    # the model's own tokens are most of the session, as many as it sampled give or take the end-of-turn tokens
    own = labels.count("generated")
    sampled = sum(min(t["new_tokens"], 1024 - t["prompt_tokens"]) for t in session["turns"] if t["prompt_tokens"] < 1024)
    assert sampled - len(starts) - 4 <= own <= sampled


@pytest.mark.real
@pytest.mark.parametrize("fixture,name", [("smollm2", "smollm2-135m"), ("qwen2", "qwen2.5-coder-0.5b")])
@pytest.mark.parametrize("system", ["project", "empty"])
def test_every_stored_session_of_both_prompts_is_labelled(request, fixture, name, system):
    """Every session of the chat models, with the project's system prompt and the control's
    empty one: the labels cover every token, every turn's answer starts a generated run, and
    the first template run is the system turn with exactly the header's prompt."""
    tok = request.getfixturevalue(fixture).tokenizer
    header, sessions = model_traces(name, system)
    for session in sessions:
        labels = session_parts(tok, session)
        assert len(labels) == len(session["token_ids"])
        starts = [a for a, _, p in to_spans(labels) if p == "generated"]
        assert starts == [t["prompt_tokens"] for t in session["turns"] if t["prompt_tokens"] < len(labels)]
        first_template = tok.decode(session["token_ids"][: to_spans(labels)[0][1]])
        assert first_template == f"<|im_start|>system\n{header['system_prompt']}<|im_end|>\n<|im_start|>user\n"
