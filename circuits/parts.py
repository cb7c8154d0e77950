"""Where each token of a model's own session sits: the prompt's template, the user's problem, or the model's own tokens.

Why this module exists. Wong et al. study sinks in the model's *own* reasoning. The stored
sessions (:func:`circuits.probes.model_traces`, written by ``scripts/generate_traces.py``) hold
more than that: every session opens with the same chat template and system prompt, and every
turn poses a problem the project wrote. A sink in a system prompt that six sessions share is
a property of that prompt, not of the model's reasoning, so each token is labelled with the
part of the session it belongs to, and the reports read the labels
(:mod:`sinkscope.reproduce.wong`). The labels are derived from what a stored session records,
nothing is re-generated:

* ``generated`` — the model's own tokens: turn ``i``'s answer starts at the turn's
  ``prompt_tokens`` (the length of the conversation the model was prompted with; the stored
  ids re-render the conversation through the same template, so that start is exact) and runs
  until the template resumes. Under a chat template that is the first special token after the
  answer (the template's end-of-turn marker; answers were stored without special tokens, so
  none occurs inside one). The end-of-turn marker itself is ``template``, also where the model
  sampled its own end-of-sequence token: the template writes it in either case. Without a chat
  template the answer ends where the transcript's fixed text after an answer
  (:data:`PLAIN_ANSWER_END`, then the next turn's :data:`PLAIN_TURN`) begins. The turn's
  ``new_tokens`` is *not* used for the end: an answer re-tokenized from its text can differ
  from the sampled tokens by a token or three (seen in 4 of the 88 turns of the packaged sessions).
* ``problem`` — the problem text exactly as the turn records it (``turns[i]["problem"]``: a
  re-posed problem keeps its "Let's look again ..." lead-in, which is part of that text). A
  token that holds both a lead-in character and the problem's first one (``" A"`` after
  ``"Next problem:"``) counts as ``problem``.
* ``template`` — everything else: the chat template's special tokens and role headers, the
  system prompt, and the session's fixed lead-ins (``"Next problem: "``; on a plain transcript
  ``"Problem n: "`` and ``"Solution: Let's think step by step."``).

Two forms of session (:func:`transcript_form`): a model whose tokenizer has a chat template
(SmolLM2, Qwen2.5) gets its chat template with the system prompt; one without (Gemma 3 270M's
GGUF carries no template) gets a plain transcript with no system prompt, whose ``template``
part is the transcript's fixed lead-ins and separators (and the BOS). :data:`FORMS` says which,
in words the reports print.

Every boundary is checked against the text (the prompt before an answer ends with the
generation prompt; the problem is found where it belongs), and a session that does not match
is a :class:`PartsError` naming its id and turn, never a silent mislabel.
"""

from __future__ import annotations

from typing import Iterable, Literal, Mapping, Sequence

from circuits.errors import SinkscopeError

Part = Literal["template", "problem", "generated"]
#: the parts, in the order the reports list them
PARTS: tuple[str, ...] = ("template", "problem", "generated")
#: the part whose sinks decide the Wong et al. verdicts: the model's own tokens
OWN: str = "generated"

#: How ``scripts/generate_traces.py`` writes a session without a chat template: each turn is
#: ``PLAIN_TURN`` (``number`` from 1), each answer is followed by ``PLAIN_ANSWER_END``.
PLAIN_TURN = "Problem {number}: {problem}\n\nSolution: Let's think step by step.\n"
PLAIN_ANSWER_END = "\n\n"  #: what follows each answer in a session without a chat template
#: How the same script poses every problem after the first under a chat template.
NEXT_PROBLEM = "Next problem: {problem}"

Form = Literal["chat", "plain"]
#: the two ways a stored session is written, each with what its template part is
FORMS: dict[str, str] = {
    "chat": "the model's chat template: its special tokens, role headers and the system prompt are the template part, "
            "with the fixed lead-in 'Next problem: '",
    "plain": "no chat template (the model's tokenizer has none): a plain 'Problem n: ... Solution: Let's think step by step.' "
             "transcript with no system prompt, whose fixed lead-ins, separators and BOS are the template part",
}


class PartsError(SinkscopeError, ValueError):
    """A stored session whose turns do not match its token ids (or labels of the wrong shape)."""


def transcript_form(tokenizer) -> Form:
    """``"chat"`` when the tokenizer has a chat template (the sessions were written with it), else ``"plain"``."""
    return "chat" if getattr(tokenizer, "chat_template", None) else "plain"


def _generation_prompt(tokenizer, form: Form) -> str:
    """The text that ends every prompt the model answered: the chat template's generation
    prompt (``"<|im_start|>assistant\\n"``), or the plain transcript's ``"Solution: ...\\n"``."""
    if form == "plain":
        return PLAIN_TURN.split("{problem}")[1]
    messages = [{"role": "system", "content": "S"}, {"role": "user", "content": "U"}]
    ask = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    done = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=False)
    return ask[len(done):] if ask.startswith(done) else ""


def _special_ids(tokenizer) -> set[int]:
    ids = set(getattr(tokenizer, "all_special_ids", []) or [])
    decoder = getattr(tokenizer, "added_tokens_decoder", {}) or {}
    return ids | {int(i) for i, tok in decoder.items() if getattr(tok, "special", False)}


def _char_offsets(tokenizer, ids: Sequence[int]) -> list[int]:
    """``offsets[k]``: the length of the text of ``ids[:k]`` (so token k holds characters
    ``offsets[k]:offsets[k+1]``). Quadratic in ``len(ids)``: used on prompt segments only."""
    return [len(tokenizer.decode(list(ids[:k]))) for k in range(len(ids) + 1)]


def session_parts(tokenizer, session: Mapping, form: Form | None = None) -> list[str]:
    """The part (:data:`PARTS`) of every token of a stored session's ``token_ids`` (see the
    module docstring). ``tokenizer``: the model's own (it wrote the session); ``form``: the
    session's form, default :func:`transcript_form` of the tokenizer, as the script chose it.

    Raises :class:`PartsError` when the turns do not match the ids (naming the session and turn).
    """
    ids = [int(t) for t in session["token_ids"]]
    turns = list(session.get("turns", []))
    form = form or transcript_form(tokenizer)
    n, sid = len(ids), session.get("id", "?")
    labels = ["template"] * n
    if not turns:
        raise PartsError(f"session {sid} records no turns: where the model's own tokens sit is unknown")
    ask = _generation_prompt(tokenizer, form)
    special = _special_ids(tokenizer)
    starts = [int(t["prompt_tokens"]) for t in turns]
    if any(b <= a for a, b in zip(starts, starts[1:])) or starts[0] <= 0:
        raise PartsError(f"session {sid}: the turns' prompt_tokens {starts} do not increase from a positive start")
    prompt_from = 0  # where the current prompt segment begins (after the previous answer)
    for i, turn in enumerate(turns):
        start = starts[i]
        if start >= n:  # the stored conversation was cut (the context) before this answer
            break
        following = starts[i + 1] if i + 1 < len(turns) else n
        _label_problem(tokenizer, ids, labels, prompt_from, start, turn["problem"], sid, i)
        before = tokenizer.decode(ids[max(0, start - len(ask) - 1) : start])  # a token holds at least one character
        if ask and not before.endswith(ask):
            raise PartsError(f"session {sid}, turn {i}: the prompt before the answer at token {start} ends with {before[-40:]!r}, "
                             f"not with the generation prompt {ask!r}")
        if form == "chat":
            end = next((k for k in range(start, following) if ids[k] in special), following)
            if end == following and following < n:
                raise PartsError(f"session {sid}, turn {i}: no end-of-turn marker between the answer at token {start} and the next "
                                 f"prompt's end at token {following}")
        else:
            tail = PLAIN_ANSWER_END + (PLAIN_TURN.format(number=i + 2, problem=turns[i + 1]["problem"]) if i + 1 < len(turns) else "")
            end = _plain_answer_end(tokenizer, ids, start, following, tail, sid, i, last=i + 1 == len(turns))
        labels[start:end] = ["generated"] * (end - start)
        prompt_from = end
    return labels


def _label_problem(tokenizer, ids: list[int], labels: list[str], lo: int, hi: int, problem: str, sid, turn: int) -> None:
    """Label as ``problem`` the tokens of ``ids[lo:hi]`` (one prompt segment) that hold the
    characters of ``problem`` (its last occurrence there)."""
    offsets = _char_offsets(tokenizer, ids[lo:hi])
    text = tokenizer.decode(ids[lo:hi])
    at = text.rfind(problem)
    if at < 0:
        raise PartsError(f"session {sid}, turn {turn}: the problem {problem[:40]!r}... is not in the prompt before its answer "
                         f"(tokens {lo}-{hi - 1})")
    stop = at + len(problem)
    for k in range(hi - lo):
        if offsets[k] < stop and offsets[k + 1] > at:
            labels[lo + k] = "problem"


def _plain_answer_end(tokenizer, ids: list[int], start: int, following: int, tail: str, sid, turn: int, last: bool) -> int:
    """Where a plain transcript's answer ends: the first token from which the text up to
    ``following`` is the fixed text after an answer (``tail``). A token that holds the
    answer's last characters and the first of that text stays the answer's."""
    end = following
    while end > start and tail.endswith(tokenizer.decode(ids[end - 1 : following])):
        end -= 1
    if not last and tokenizer.decode(ids[end:following]) != tail and not tokenizer.decode(ids[end - 1 : following]).endswith(tail):
        raise PartsError(f"session {sid}, turn {turn}: the text after the answer is not the transcript's {tail[:30]!r}...")
    return end


# ------------------------------------------------------------------------------ compact form


def to_spans(labels: Sequence[str]) -> list[list]:
    """Labels as runs ``[[start, stop, part], ...]`` (``stop`` exclusive): what ``numbers.json``
    and the view store (a few dozen runs per session instead of a label per token)."""
    out: list[list] = []
    for k, part in enumerate(labels):
        if out and out[-1][2] == part and out[-1][1] == k:
            out[-1][1] = k + 1
        else:
            out.append([k, k + 1, part])
    return out


def from_spans(spans: Iterable[Sequence]) -> list[str]:
    """The labels of :func:`to_spans`' runs."""
    labels: list[str] = []
    for start, stop, part in spans:
        if int(start) != len(labels):
            raise PartsError(f"spans must cover every position in order: a run starts at {start}, expected {len(labels)}")
        labels += [str(part)] * (int(stop) - int(start))
    return labels


def check_parts(parts: Sequence[Sequence[str]], lengths: Sequence[int], name: str = "parts") -> list[list[str]]:
    """``parts`` as lists, one label of :data:`PARTS` per position of each sequence of ``lengths``."""
    parts = [list(p) for p in parts]
    if len(parts) != len(lengths):
        raise PartsError(f"{name}: {len(parts)} sequences of labels for {len(lengths)} sequences")
    for i, (p, n) in enumerate(zip(parts, lengths)):
        if len(p) != int(n):
            raise PartsError(f"{name}: sequence {i} has {len(p)} labels for {int(n)} tokens")
        bad = next((x for x in p if x not in PARTS), None)
        if bad is not None:
            raise PartsError(f"{name}: sequence {i} holds the label {bad!r}, not one of {', '.join(PARTS)}")
    return parts


def part_column(table, parts: Sequence[Sequence[str]] | None) -> list[str | None]:
    """The part of each row (``sequence``, ``position``) of ``table``; ``None`` for every row
    when the inputs carry no parts (hand-written text)."""
    if parts is None:
        return [None] * len(table)
    return [parts[int(s)][int(p)] for s, p in zip(table["sequence"], table["position"])]


__all__ = [
    "FORMS", "Form", "NEXT_PROBLEM", "OWN", "PARTS", "PLAIN_ANSWER_END", "PLAIN_TURN", "Part", "PartsError", "check_parts", "from_spans",
    "part_column", "session_parts", "to_spans", "transcript_form",
]
