"""Text → tokens with an explicit BOS policy, and the built-in probe texts.

Why a module of its own: where the first token comes from decides what the "primary sink" is.
SmolLM2's tokenizer adds no BOS, Gemma's does, and TransformerLens' ``to_tokens`` always
prepends one. sinkscope therefore tokenizes with the tokenizer's special tokens switched off
and prepends BOS only when ``prepend_bos`` says so; the choice travels with the tokens in a
:class:`TokenBatch` and ends up in every result.

Batches are right-padded. With causal attention no real query ever sees a pad key, so the
model needs no attention mask and every position keeps its index (position 0 is the first
token of every sequence); the measurement excludes pad queries and keys using ``lengths``.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Iterable, Literal, Sequence, get_args

import torch
from jaxtyping import Bool, Int
from torch import Tensor

from circuits.checks import ArgumentError, check_int, check_text, load_json, shown
from circuits.errors import SinkscopeError
from circuits.model_info import model_info
from circuits.parts import session_parts, transcript_form


class TokenizationError(SinkscopeError, ValueError):
    """Bad text input: empty text, nothing left after truncation, or longer than the context."""


@dataclass
class TokenBatch:
    """Right-padded token ids with the metadata every result needs.

    ``parts``: for the model's own sessions (:func:`trace_batch`), the part of the session each
    token belongs to, one label of :data:`circuits.parts.PARTS` per real position
    (``template``, ``problem`` or ``generated``), and ``parts_form`` how the session was
    written (:data:`circuits.parts.FORMS`); None for plain text, which has no parts.
    """

    tokens: Int[Tensor, "batch pos"]
    lengths: Int[Tensor, " batch"]
    prepend_bos: bool
    str_tokens: list[list[str]] = field(repr=False)
    parts: list[list[str]] | None = field(default=None, repr=False)
    parts_form: str | None = None

    @property
    def valid(self) -> Bool[Tensor, "batch pos"]:
        """True at real (non-pad) positions."""
        return torch.arange(self.tokens.shape[1])[None, :] < self.lengths[:, None]

    @property
    def token_ids(self) -> list[list[int]]:
        return [row[: int(n)].tolist() for row, n in zip(self.tokens, self.lengths)]

    def __len__(self) -> int:
        return self.tokens.shape[0]

    def select(self, index: slice | Sequence[int]) -> "TokenBatch":
        """A sub-batch (trimmed to its longest sequence)."""
        idx = list(range(len(self)))[index] if isinstance(index, slice) else list(index)
        lengths = self.lengths[idx]
        width = int(lengths.max())
        parts = None if self.parts is None else [self.parts[i] for i in idx]
        return TokenBatch(self.tokens[idx, :width], lengths, self.prepend_bos, [self.str_tokens[i] for i in idx], parts, self.parts_form)


#: The shortest sequence worth measuring: a sink needs at least one later query.
MIN_TOKENS = 2


def check_texts(texts: str | Sequence[str], max_tokens: int | None = None) -> list[str]:
    """The model-independent checks of :func:`tokenize`, cheap enough to run before loading:
    a text or a list of texts, none empty, none holding a lone surrogate (:func:`circuits.checks.check_text`)."""
    if isinstance(texts, str):
        texts = [texts]
    elif isinstance(texts, (bytes, bytearray, dict)) or not isinstance(texts, Iterable) or isinstance(texts, Tensor):
        raise TokenizationError(f"texts must be a text (str) or a list of texts, got {_described(texts)}")
    texts = list(texts)
    if not texts:
        raise TokenizationError("no texts given")
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise TokenizationError(f"text {i} must be a string, got {_described(text)}")
        if not text.strip():
            raise TokenizationError(f"text {i} is empty")
        check_text(text, f"text {i}", error=TokenizationError)
    check_max_tokens(max_tokens)
    return texts


def _described(value) -> str:
    """A bad input as a message names it: its type, and its value where that is short."""
    if isinstance(value, Tensor):
        return f"a torch.Tensor of shape {tuple(value.shape)}"
    text = repr(value)
    return f"{text if len(text) <= 40 else text[:37] + '...'} ({type(value).__name__})"


def check_max_tokens(max_tokens: int | None) -> None:
    """A truncation length must leave at least :data:`MIN_TOKENS` tokens."""
    if max_tokens is None:
        return
    check_int(max_tokens, "max_tokens", minimum=None, error=TokenizationError)
    if max_tokens < MIN_TOKENS:
        raise TokenizationError(
            f"max_tokens must be at least {MIN_TOKENS} (a sink is attention from later queries), got {max_tokens}")


def check_lengths(rows: Sequence[Sequence[int]], what: str = "text") -> None:
    """Every sequence must hold at least :data:`MIN_TOKENS` tokens: the rule of ``max_tokens``,
    for a text that is one token long (``--text "a"`` without BOS) as for a truncation to one."""
    for i, row in enumerate(rows):
        if len(row) < MIN_TOKENS:
            raise TokenizationError(
                f"{what} {i} is {len(row)} token{'s' if len(row) != 1 else ''} long; a sink needs at least {MIN_TOKENS} tokens "
                "(it is attention from later queries): give a longer text, or prepend BOS (prepend_bos=True, --prepend-bos)")


def default_prepend_bos(model) -> bool:
    """The model's native policy: what its own Hugging Face tokenizer does."""
    return model_info(model).native_bos


def tokenize(
    model,
    texts: str | Sequence[str],
    *,
    prepend_bos: bool | None = None,
    max_tokens: int | None = None,
) -> TokenBatch:
    """Tokenize texts for ``model`` with an explicit BOS policy, right-padded.

    Args:
        prepend_bos: prepend the tokenizer's BOS token. ``None`` means the model's native policy
            (see :func:`default_prepend_bos`); the resolved value is recorded in the batch.
        max_tokens: truncate each sequence (BOS included) to this many tokens (at least 2).

    Raises:
        TokenizationError: an empty text, ``max_tokens < 2``, or a sequence longer than the
            model's context (``model.cfg.n_ctx``) after truncation.
    """
    texts = check_texts(texts, max_tokens)
    if prepend_bos not in (None, True, False):
        raise TokenizationError(f"prepend_bos must be True, False or None (the model's native policy), got {_described(prepend_bos)}")
    if prepend_bos is None:
        prepend_bos = default_prepend_bos(model)
    tokenizer = model.tokenizer
    bos = tokenizer.bos_token_id
    if prepend_bos and bos is None:
        raise TokenizationError("prepend_bos=True but this tokenizer has no BOS token")
    rows: list[list[int]] = []
    for i, text in enumerate(texts):
        ids = tokenizer(text, add_special_tokens=False).input_ids
        if prepend_bos:
            ids = [bos, *ids]
        if max_tokens is not None:
            ids = ids[:max_tokens]
        n_ctx = int(model.cfg.n_ctx)
        if len(ids) > n_ctx:
            raise TokenizationError(
                f"text {i} has {len(ids)} tokens, more than the model's context of {n_ctx}; "
                f"truncate it with max_tokens (--max-tokens) <= {n_ctx}"
            )
        rows.append(ids)
    check_lengths(rows)
    return batch_from_ids(model, rows, bool(prepend_bos))


def as_batch(model, batch, *, name: str = "batch") -> TokenBatch:
    """What a measurement entry point takes as ``batch``: a :class:`TokenBatch` (checked by
    :func:`check_batch`), or a text or list of texts, tokenized with the model's native BOS
    policy (:func:`tokenize`). Anything else (token ids, a tensor, None) is refused by name."""
    if isinstance(batch, TokenBatch):
        return check_batch(model, batch, name=name)
    if isinstance(batch, str) or (isinstance(batch, (list, tuple)) and batch and all(isinstance(t, str) for t in batch)):
        return tokenize(model, batch)
    hint = ""
    if isinstance(batch, Tensor) or (isinstance(batch, (list, tuple)) and batch and not isinstance(batch[0], str)):
        hint = "; for token ids, build one with circuits.probes.batch_from_ids(model, rows, prepend_bos=...)"
    what = "an empty list" if isinstance(batch, (list, tuple)) and not batch else _described(batch)
    raise TokenizationError(f"{name} must be a TokenBatch (circuits.probes.tokenize), a text or a list of texts; got {what}{hint}")


def check_batch(model, batch: TokenBatch, *, name: str = "batch") -> TokenBatch:
    """A batch a forward pass can take: at least one sequence, each of at least
    :data:`MIN_TOKENS` tokens and at most the model's context, every token id in the vocabulary.
    Raises :class:`TokenizationError` naming the sequence, the position and the value."""
    if not isinstance(batch, TokenBatch):
        return as_batch(model, batch, name=name)
    if len(batch) == 0:
        raise TokenizationError(f"{name} is an empty batch: no sequence to measure")
    check_lengths([range(int(n)) for n in batch.lengths], "sequence")
    n_ctx, vocab = int(model.cfg.n_ctx), int(model.cfg.d_vocab)
    longest = int(batch.lengths.max())
    if longest > n_ctx:
        i = int(batch.lengths.argmax())
        raise TokenizationError(f"{name}: sequence {i} has {longest} tokens, more than the model's context of {n_ctx}")
    ids = torch.where(batch.valid, batch.tokens, 0)
    bad = (ids < 0) | (ids >= vocab)
    if bool(bad.any()):
        i, t = (int(x) for x in bad.nonzero()[0])
        raise TokenizationError(f"{name}: sequence {i}, position {t} holds token id {int(ids[i, t])}, outside the model's "
                                f"vocabulary of {vocab} (ids 0..{vocab - 1})")
    return batch


def batch_from_ids(model, rows: Sequence[Sequence[int]], prepend_bos: bool) -> TokenBatch:
    """A right-padded :class:`TokenBatch` of token-id rows as given (no BOS added, nothing cut)."""
    tokenizer = model.tokenizer
    try:
        rows = [[int(t) for t in r] for r in rows]
    except (TypeError, ValueError):
        raise TokenizationError(f"rows must be lists of token ids (integers), got {_described(rows)}") from None
    if not rows:
        raise TokenizationError("rows is empty: no sequence to measure")
    vocab = int(model.cfg.d_vocab)
    for i, r in enumerate(rows):
        bad = [t for t in r if not 0 <= t < vocab]
        if bad:
            raise TokenizationError(f"row {i} holds token id {bad[0]}, outside the model's vocabulary of {vocab} (ids 0..{vocab - 1})")
    check_lengths(rows, "row")
    lengths = torch.tensor([len(r) for r in rows])
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    tokens = torch.full((len(rows), int(lengths.max())), pad, dtype=torch.long)
    for i, r in enumerate(rows):
        tokens[i, : len(r)] = torch.tensor(r)
    str_tokens = [tokenizer.convert_ids_to_tokens(r) for r in rows]
    str_tokens = [[_readable(t, tokenizer) if t is not None else f"<id {i}>" for t, i in zip(seq, r)]
                  for seq, r in zip(str_tokens, rows)]
    return TokenBatch(tokens, lengths, prepend_bos, str_tokens)


def _readable(token: str, tokenizer) -> str:
    """A token as text: byte-level BPE shows spaces as 'Ġ' and newlines as 'Ċ', shown as text.

    A token that holds only part of a UTF-8 character (an emoji or a Hebrew letter split over
    two tokens) would decode to U+FFFD; its bytes that do not decode are written as ``\\xHH``
    escapes instead (``" \\xf0\\x9f\\x98"``, then ``"\\x80"``), so the token stays readable and
    its neighbours can be merged back for display (:func:`circuits.view.merged_text`)."""
    try:
        text = tokenizer.convert_tokens_to_string([token])
    except Exception:  # some special tokens do not round-trip; keep the raw form
        return token
    if "\ufffd" in text:
        raw = _token_bytes(token)
        if raw is not None:
            return raw.decode("utf-8", errors="backslashreplace")
    return text


_BYTE_FALLBACK = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")


def _token_bytes(token: str) -> bytes | None:
    """The bytes a token stands for: SentencePiece's byte-fallback ``<0xF0>``, or a byte-level
    BPE token (GPT-2's byte-to-character map); None for any other token."""
    m = _BYTE_FALLBACK.match(token)
    if m:
        return bytes([int(m.group(1), 16)])
    decoder = _byte_decoder()
    if all(ch in decoder for ch in token):
        return bytes(decoder[ch] for ch in token)
    return None


_BYTE_DECODER: dict[str, int] = {}


def _byte_decoder() -> dict[str, int]:
    """GPT-2's printable character -> byte map, inverted (what byte-level BPE tokens are written in)."""
    if not _BYTE_DECODER:
        bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
        cs = bs[:]
        n = 0
        for b in range(256):
            if b not in bs:
                bs.append(b)
                cs.append(256 + n)
                n += 1
        _BYTE_DECODER.update({chr(c): b for b, c in zip(bs, cs)})
    return _BYTE_DECODER


# --------------------------------------------------------------------------- built-in texts


def _data_file(name: str) -> Path:
    return Path(str(resources.files("circuits").joinpath("data", name)))


def probe_texts(n: int | None = None) -> list[str]:
    """The built-in probe set: natural-English passages written for this project (~100 words)."""
    text = _data_file("probes.txt").read_text(encoding="utf-8")
    passages = [p.strip().replace("\n", " ") for p in text.split("\n\n") if p.strip()]
    return passages if n is None else passages[:n]


def reasoning_texts(n: int | None = None) -> list[str]:
    """Long step-by-step reasoning traces written for this project (~1,000 words each)."""
    text = _data_file("reasoning.txt").read_text(encoding="utf-8")
    traces = [t.strip() for t in text.split("=====") if t.strip()]
    return traces if n is None else traces[:n]


class TracesMissing(SinkscopeError, LookupError):
    """No model-generated traces for this model (only the packaged models have them)."""


#: Which system message a set of stored sessions was generated with: the project's tutor prompt
#: (the sessions every report reads), or an empty one (the control sessions, which tell the
#: prompt's sinks from the model's own; ``scripts/generate_traces.py --system``).
SystemPrompt = Literal["project", "empty"]
SYSTEM_PROMPTS: tuple[str, ...] = get_args(SystemPrompt)


def traces_file(model_name: str, system: SystemPrompt = "project") -> Path:
    """Where the model's own chain-of-thought sessions live (``scripts/generate_traces.py``)."""
    if system not in SYSTEM_PROMPTS:
        raise ArgumentError(f"system must be one of {', '.join(SYSTEM_PROMPTS)}, got {shown(system)}")
    return _data_file(f"traces/{model_name}.jsonl" if system == "project" else f"traces/{model_name}.{system}-system.jsonl")


def has_traces(model_name: str, system: SystemPrompt = "project") -> bool:
    return traces_file(model_name, system).is_file()


def model_traces(model_name: str, system: SystemPrompt = "project") -> tuple[dict, list[dict]]:
    """The header (decoding settings, system prompt, versions, date) and the sessions of
    ``model_name``'s own multi-turn math sessions, generated once by
    ``scripts/generate_traces.py`` and committed. ``system="empty"``: the control sessions, the
    same problems, decoding and seeds under an empty system message (chat models only).

    Each session holds ``token_ids``, the whole conversation exactly as the model saw it
    (its chat template and BOS policy included), and its ``text``, ``problems`` and ``turns``.
    """
    path = traces_file(model_name, system)
    if not path.is_file():
        which = "generated traces" if system == "project" else f"{system}-system control traces"
        raise TracesMissing(
            f"no {which} for {model_name!r} (packaged models have them: circuits/data/traces/); "
            "use the written traces (inputs='written') or generate some with scripts/generate_traces.py"
        )
    header, *sessions = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return header, sessions


def trace_batch(model, n: int | None = None, max_tokens: int | None = None, system: SystemPrompt = "project") -> TokenBatch:
    """``n`` of the model's own generated sessions, each cut to its first ``max_tokens``
    tokens, as a batch: the first ``n`` in file order that hold at least ``max_tokens`` tokens,
    then, if fewer are that long, the longest of the others (so ``max_tokens=8192`` picks the
    long sessions, and 1,024 the first ones as before). ``n`` None: every session, in file
    order. The tokens are the stored ids (not re-tokenized text), so the first token is
    whatever the model's chat template or tokenizer put there; the batch's ``prepend_bos``
    says whether that is the tokenizer's BOS. The batch carries the part of the session each
    token belongs to (``parts``: template, problem or the model's own generated tokens;
    :func:`circuits.parts.session_parts`) and the session's form (``parts_form``). ``system``:
    which stored sessions (:data:`SystemPrompt`)."""
    name = model_info(model).name
    header, sessions = model_traces(name, system)
    if header.get("settings", {}).get("model") != name:
        raise TracesMissing(f"{traces_file(name, system)} was generated by {header.get('settings', {}).get('model')!r}, not {name!r}")
    check_max_tokens(max_tokens)
    n_ctx = int(model.cfg.n_ctx)
    need = min(max_tokens or n_ctx, n_ctx)
    if n is not None:
        long_enough = [s for s in sessions if len(s["token_ids"]) >= need]
        shorter = sorted((s for s in sessions if len(s["token_ids"]) < need), key=lambda s: -len(s["token_ids"]))
        sessions = (long_enough + shorter)[:n]
    rows = [s["token_ids"][:need] for s in sessions]
    vocab = int(model.cfg.d_vocab)
    if any(max(r) >= vocab for r in rows):
        raise TracesMissing(f"{traces_file(name, system)} holds token ids beyond this model's vocabulary ({vocab})")
    bos = model.tokenizer.bos_token_id
    batch = batch_from_ids(model, rows, prepend_bos=bos is not None and all(r[0] == bos for r in rows))
    form = transcript_form(model.tokenizer)
    batch.parts = [session_parts(model.tokenizer, s, form)[:need] for s in sessions]
    batch.parts_form = form
    return batch


#: Prompt file formats (docs/command.md, "Prompt files"): ``paragraphs`` (blank-line separated),
#: ``lines`` (one prompt per non-empty line), ``json`` (a list of strings, or of objects with a
#: ``text`` field), ``jsonl`` (one JSON object with a ``text`` field, or a JSON string, per line).
PROMPT_FORMATS = ("paragraphs", "lines", "json", "jsonl")
_EXTENSIONS = {".json": "json", ".jsonl": "jsonl", ".ndjson": "jsonl", ".txt": "text", ".md": "text", ".text": "text"}


_BLANK_LINE = re.compile(r"\r?\n[ \t\r]*\n")


class PromptsFileError(TokenizationError):
    """A prompts file that cannot be read, or whose format is wrong or ambiguous."""


def read_prompts(path: str | Path, format: str | None = None) -> tuple[list[str], str]:
    """Prompts from a file and the format they were read in (one of :data:`PROMPT_FORMATS`).

    ``format=None`` picks it from the extension (``.json``, ``.jsonl``/``.ndjson``, ``.txt``/``.md``)
    and the content, only where that is unambiguous: a text file whose lines are not separated by
    blank lines could be one prompt or one per line, and is refused with a message naming
    ``--prompts-format``. A text file that starts with ``[`` stays text; a UTF-8 BOM is ignored;
    a JSON object where a list belongs is an error, never one literal prompt.
    """
    path = Path(path)
    if format is not None and format not in PROMPT_FORMATS:
        raise PromptsFileError(f"unknown prompts format {format!r}; choose one of {', '.join(PROMPT_FORMATS)}")
    try:
        raw = path.read_text(encoding="utf-8-sig")  # -sig: a byte-order mark is not part of the text
    except (OSError, UnicodeDecodeError) as exc:
        raise PromptsFileError(f"cannot read prompts file {path}: {exc.__class__.__name__}: {exc}") from exc
    if not raw.strip():
        raise PromptsFileError(f"prompts file {path} holds no text")
    fmt = format or _sniff_format(path, raw)
    prompts = {"paragraphs": _paragraphs, "lines": _lines, "json": _json_list, "jsonl": _json_lines}[fmt](path, raw)
    if not prompts:
        raise PromptsFileError(f"prompts file {path} holds no prompts (read as {fmt})")
    return prompts, fmt


def read_prompts_file(path: str | Path, format: str | None = None) -> list[str]:
    """The prompts of :func:`read_prompts` without the format."""
    return read_prompts(path, format)[0]


def _sniff_format(path: Path, raw: str) -> str:
    kind = _EXTENSIONS.get(path.suffix.lower())
    head = raw.lstrip()
    if kind is None and head[:1] in "[{":  # no telling extension: JSON only if it parses as such
        try:
            json.loads(raw)
            kind = "json"
        except RecursionError:  # JSON nested too deeply to parse: read as JSON, which says so
            kind = "json"
        except json.JSONDecodeError:
            kind = "jsonl" if head[:1] == "{" and _all_json_lines(raw) else "text"
    if kind != "text":
        return kind or "paragraphs"
    if _BLANK_LINE.search(raw.strip()):
        return "paragraphs"
    if len(_lines(path, raw)) > 1:
        raise PromptsFileError(
            f"prompts file {path} has {len(_lines(path, raw))} lines and no blank line between them: pass "
            "--prompts-format lines (one prompt per line) or --prompts-format paragraphs (the whole file is one prompt)"
        )
    return "paragraphs"


def _all_json_lines(raw: str) -> bool:
    try:
        return all(isinstance(json.loads(line), dict) for line in raw.splitlines() if line.strip())
    except (json.JSONDecodeError, RecursionError):
        return False


def _paragraphs(path: Path, raw: str) -> list[str]:
    return [p.strip() for p in _BLANK_LINE.split(raw) if p.strip()]


def _lines(path: Path, raw: str) -> list[str]:
    return [line.strip() for line in raw.splitlines() if line.strip()]


def _prompt_of(item, where: str) -> str:
    if isinstance(item, dict):
        item = item.get("text")
    if not isinstance(item, str):
        raise PromptsFileError(f"{where}: each prompt must be a string or an object with a string 'text' field")
    return check_text(item, where, error=PromptsFileError)


def _json_list(path: Path, raw: str) -> list[str]:
    items = load_json(raw, f"prompts file {path}", error=PromptsFileError)
    if not isinstance(items, list):
        kind = "object" if isinstance(items, dict) else type(items).__name__
        raise PromptsFileError(
            f"prompts file {path} holds a JSON {kind}, not a list: write a list of strings, or JSONL (one object with a 'text' field per line)"
        )
    return [_prompt_of(item, f"prompts file {path}, item {i}") for i, item in enumerate(items)]


def _json_lines(path: Path, raw: str) -> list[str]:
    prompts = []
    for number, line in enumerate(raw.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except json.JSONDecodeError as exc:
            raise PromptsFileError(f"prompts file {path}, line {number}: not valid JSON ({exc.msg})") from None
        except RecursionError:
            raise PromptsFileError(f"prompts file {path}, line {number}: nests JSON arrays or objects too deeply to be read") from None
        prompts.append(_prompt_of(item, f"prompts file {path}, line {number}"))
    return prompts
