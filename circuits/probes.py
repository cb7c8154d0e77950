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
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Sequence

import torch
from jaxtyping import Bool, Int
from torch import Tensor

from circuits.errors import SinkscopeError


class TokenizationError(SinkscopeError, ValueError):
    """Bad text input: empty text, nothing left after truncation, or longer than the context."""


@dataclass
class TokenBatch:
    """Right-padded token ids with the metadata every result needs."""

    tokens: Int[Tensor, "batch pos"]
    lengths: Int[Tensor, " batch"]
    prepend_bos: bool
    str_tokens: list[list[str]] = field(repr=False)

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
        return TokenBatch(self.tokens[idx, :width], lengths, self.prepend_bos, [self.str_tokens[i] for i in idx])


def check_texts(texts: str | Sequence[str], max_tokens: int | None = None) -> list[str]:
    """The model-independent checks of :func:`tokenize`, cheap enough to run before loading."""
    if isinstance(texts, str):
        texts = [texts]
    texts = list(texts)
    if not texts:
        raise TokenizationError("no texts given")
    for i, text in enumerate(texts):
        if not isinstance(text, str) or not text.strip():
            raise TokenizationError(f"text {i} is empty")
    if max_tokens is not None and max_tokens <= 0:
        raise TokenizationError(f"max_tokens must be positive, got {max_tokens}")
    return texts


def default_prepend_bos(model) -> bool:
    """The model's native policy: what its own Hugging Face tokenizer does."""
    return bool(getattr(model, "_sinkscope_info", {}).get("native_bos", True))


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
        max_tokens: truncate each sequence (BOS included) to this many tokens.

    Raises:
        TokenizationError: an empty text, ``max_tokens <= 0``, or a sequence longer than the
            model's context (``model.cfg.n_ctx``) after truncation.
    """
    texts = check_texts(texts, max_tokens)
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
                f"text {i} has {len(ids)} tokens, more than the model's context of {n_ctx}; pass max_tokens"
            )
        rows.append(ids)
    lengths = torch.tensor([len(r) for r in rows])
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    tokens = torch.full((len(rows), int(lengths.max())), pad, dtype=torch.long)
    for i, r in enumerate(rows):
        tokens[i, : len(r)] = torch.tensor(r)
    str_tokens = [tokenizer.convert_ids_to_tokens(r) for r in rows]
    str_tokens = [[_readable(t, tokenizer) for t in seq] for seq in str_tokens]
    return TokenBatch(tokens, lengths, bool(prepend_bos), str_tokens)


def _readable(token: str, tokenizer) -> str:
    """Byte-level BPE shows spaces as 'Ġ' and newlines as 'Ċ'; show them as text."""
    try:
        return tokenizer.convert_tokens_to_string([token])
    except Exception:  # some special tokens do not round-trip; keep the raw form
        return token


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


def read_prompts_file(path: str | Path) -> list[str]:
    """Prompts from a file: one per blank-line-separated paragraph, or JSON list of strings."""
    path = Path(path)
    try:
        raw = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise TokenizationError(f"cannot read prompts file {path}: {exc.__class__.__name__}: {exc}") from exc
    if raw.lstrip().startswith("["):
        try:
            items = json.loads(raw)
        except json.JSONDecodeError as exc:
            raise TokenizationError(f"prompts file {path} looks like JSON but is not valid: {exc}") from exc
        if not all(isinstance(x, str) for x in items):
            raise TokenizationError(f"prompts file {path}: a JSON prompts file must be a list of strings")
        return items
    prompts = [p.strip() for p in raw.split("\n\n") if p.strip()]
    if not prompts:
        raise TokenizationError(f"prompts file {path} holds no text")
    return prompts
