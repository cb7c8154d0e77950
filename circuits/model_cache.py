"""The cache of dequantized packaged models: where it lives, how it is built once, and how every load checks it.

Why this module exists. Dequantizing a GGUF to fp32 takes 20-60 s, so the result is cached as
safetensors under ``$XDG_CACHE_HOME/sinkscope/models`` (:func:`cache_root`), built under a lock
(a second process waits and uses it), with every file's size, full sha256 and stat recorded in
its COMPLETE marker. Each load re-hashes in full every file whose size, mtime, ctime or inode
differ from its record (0.4 s for SmolLM2's weights, about 2 s for Qwen2.5's 2.5 GB), so a cache
changed in any byte, truncated, or left half-built by a killed build is rebuilt or swept, never
used. The cache location is checked before any work (:func:`check_cache_location`: a file where
a folder belongs, or a place nothing can be written to, is one clear error). The leftover
``quantization_config`` is dropped before saving, and Gemma 3 gets its ``architectures`` set
before TransformerLens will wrap it. The tokenizer of a cache folder is read by the Rust
``tokenizers`` library alone (:func:`_cached_tokenizer`), a third of a reload saved.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

import torch
from platformdirs import user_cache_dir

from circuits.gguf import _sweep_gguf_staging
from circuits.model_errors import CorruptModelError, MissingPackageError, ModelError
from circuits.output import file_digest, locked, sweep_stale

log = logging.getLogger(__name__)


def cache_root() -> Path:
    """Where dequantized weights live: ``$XDG_CACHE_HOME/sinkscope/models`` (platformdirs)."""
    return Path(user_cache_dir("sinkscope")) / "models"


def _cache_dir(name: str) -> Path:
    return cache_root() / name


def _cache_is_complete(path: Path) -> bool:
    return (path / "COMPLETE").is_file()


class CacheLocationError(ModelError):
    """The model cache cannot live where ``XDG_CACHE_HOME`` points (a file, an unwritable place)."""


#: An earlier sinkscope's fingerprint of a file over 8 MiB: sampled blocks, not the whole file.
_HASH_WHOLE_BYTES = 8 << 20


_SAMPLE_BLOCKS, _SAMPLE_BYTES = 64, 64 << 10


def _sampled_sha256(path: Path) -> str:
    """The sampled sha256 an earlier sinkscope recorded for the weights (first and last MiB plus
    64 blocks of 64 KiB): still checked once when such a cache is first used, then replaced by a
    full sha256 (:func:`_file_record`); a change between the blocks escaped it."""
    size = path.stat().st_size
    h = hashlib.sha256()
    with path.open("rb") as f:
        if size <= _HASH_WHOLE_BYTES:
            h.update(f.read())
        else:
            offsets = [0, *(i * (size - _SAMPLE_BYTES) // (_SAMPLE_BLOCKS - 1) for i in range(_SAMPLE_BLOCKS)), size - (1 << 20)]
            for offset in offsets:
                f.seek(offset)
                h.update(f.read(1 << 20 if offset in (0, size - (1 << 20)) else _SAMPLE_BYTES))
    return h.hexdigest()


def _stat_key(st: os.stat_result) -> list[int]:
    """What changes whenever a file's bytes change: size, mtime, ctime (which no user program can
    set back) and inode (a file replaced by another)."""
    return [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino]


def _file_record(path: Path) -> dict:
    """A cache file's record: its size, its full sha256 and its :func:`_stat_key`, taken before
    the hash (so a write during the hash leaves a stat that no longer matches: hashed again)."""
    st = path.stat()
    return {"bytes": st.st_size, "sha256": file_digest(path), "stat": _stat_key(st)}


def _fingerprints(folder: Path) -> dict[str, dict]:
    return {p.name: _file_record(p) for p in sorted(folder.iterdir())
            if p.is_file() and p.name != "COMPLETE" and not p.name.startswith(".")}


def _verify_files(folder: Path, files: dict, known: dict | None = None) -> tuple[str | None, dict]:
    """Check every file of a cache folder against its record; returns (problem or None, the
    files' current records).

    A file whose size, mtime, ctime and inode equal its record's is the file that was hashed;
    any other is hashed in full (a second or two for the largest weights) and must match the
    recorded sha256, and then gets its new stat recorded (a copied cache is hashed once).
    ``known``: records hashed earlier in this process, reused where the stat still matches.
    A file the folder was not built with is a problem too: it could change what loads.
    """
    current: dict[str, dict] = {}
    extra = sorted(p.name for p in folder.iterdir() if p.name != "COMPLETE" and not p.name.startswith(".") and p.name not in files)
    if extra:
        return f"it holds {extra[0]!r}, a file it was not built with", current
    for name, want in files.items():
        path = folder / name
        if not isinstance(want, dict) or "sha256" not in want or "bytes" not in want:
            return "its COMPLETE marker is unreadable", current
        if not path.is_file():
            return f"{name} is missing", current
        st = path.stat()
        if st.st_size != want["bytes"]:
            return f"{name} is {st.st_size:,} bytes, {want['bytes']:,} when it was built (truncated or damaged)", current
        seen = (known or {}).get(name)
        if seen is None or seen.get("stat") != _stat_key(st):
            seen = None
        if want.get("sampled"):  # an earlier sinkscope's record: check what it recorded, then hash in full
            if _sampled_sha256(path) != want["sha256"]:
                return f"{name} differs from what was built (checksum mismatch)", current
            current[name] = seen or _file_record(path)
            continue
        if want.get("stat") == _stat_key(st):
            current[name] = want
            continue
        record = seen or _file_record(path)
        if record["sha256"] != want["sha256"]:
            return f"{name} differs from what was built (sha256 mismatch)", current
        current[name] = record
    return None, current


def _inspect(folder: Path, known: dict | None = None) -> tuple[str | None, dict, dict]:
    """(problem or None, the COMPLETE marker, the files' current records) of a cache folder.

    The marker records every file's size, full sha256 and stat when the cache is built; a
    marker written by an earlier sinkscope without records gets them on first use, and the
    load itself then checks that the files parse.
    """
    marker = folder / "COMPLETE"
    if not marker.is_file():
        return ("it is incomplete (no COMPLETE marker)" if folder.exists() else "it is not built yet"), {}, {}
    try:
        info = json.loads(marker.read_text())
        files = info.get("files")
    except (OSError, ValueError, AttributeError, RecursionError):
        return "its COMPLETE marker is unreadable", {}, {}
    if files is None:  # an earlier sinkscope's marker: nothing to check against yet
        return None, info, _fingerprints(folder)
    if not isinstance(files, dict):
        return "its COMPLETE marker is unreadable", {}, {}
    problem, current = _verify_files(folder, files, known)
    return problem, info, current


def _cache_problem(folder: Path) -> str | None:
    """Why a cache folder cannot be used as it is (None: complete and intact)."""
    return _inspect(folder)[0]


def _write_marker(folder: Path, info: dict) -> None:
    tmp = folder / ".COMPLETE.tmp"
    tmp.write_text(json.dumps(info))
    os.replace(tmp, folder / "COMPLETE")


def check_cache_location(folder: Path) -> None:
    """Refuse, before any work, a cache path that cannot hold a model folder: a regular file
    where a folder must be (``XDG_CACHE_HOME``, ``sinkscope/models``, the model's folder or
    ``gguf``), or a place where nothing can be created (``/proc``, a read-only disk) when the
    cache must still be written. A complete cache in a read-only place is used as it is."""
    root = folder.parent
    for path in (folder, root / "gguf"):
        for candidate in (path, *path.parents):
            if candidate.exists() and not candidate.is_dir():
                where = "the model's cache folder" if candidate == folder else "a folder of the model cache"
                raise CacheLocationError(
                    f"the model cache at {folder} cannot be used: {candidate} is a file, not a folder ({where}); "
                    "remove it, or set XDG_CACHE_HOME to another folder")
            if candidate.exists():
                break


def _writable_folder(path: Path, folder: Path) -> None:
    """Make ``path`` (a folder of the cache) and prove it writable, or say why it is not."""
    try:
        path.mkdir(parents=True, exist_ok=True)
        os.rmdir(tempfile.mkdtemp(prefix=".sinkscope-probe-", dir=path))
    except OSError as exc:
        raise CacheLocationError(
            f"the model cache at {folder} cannot be written: {path}: {exc.strerror or exc}; "
            "set XDG_CACHE_HOME to a writable folder") from None


def _can_write(folder: Path) -> bool:
    try:  # root passes every os.access test; trying is the only honest check
        fd, probe = tempfile.mkstemp(prefix=".sinkscope-probe-", dir=folder)
        os.close(fd)
        os.unlink(probe)
    except OSError:
        return False
    return True


def _ensure_cache(spec, folder: Path, *, rebuild: str | None = None) -> None:
    """Make ``folder`` a complete, intact cache of ``spec`` (a :class:`circuits.models.PackagedModel`),
    building it at most once at a time.

    Builds run under an exclusive lock on the cache root: a second process that wants the same
    cache waits, then finds it complete and uses it. Staging folders left by a killed build are
    swept first. ``rebuild`` (a reason) forces a rebuild of a cache that loaded badly. Every
    file is checked against the size and full sha256 recorded when it was built
    (:func:`_verify_files`); a file changed in any byte is found, and the cache rebuilt.
    """
    check_cache_location(folder)
    sweep_stale(folder)  # cheap (one directory listing); a live build's staging is kept
    known: dict = {}
    if rebuild is None:
        problem, info, known = _inspect(folder)
        if problem is None and info.get("files") == known:
            return
        if problem is None and not _can_write(folder):
            return  # verified, but its records cannot be updated here (read-only): hashed again next time
    _writable_folder(folder.parent, folder)
    with locked(folder.parent):
        problem, info, current = (rebuild, {}, {}) if rebuild is not None else _inspect(folder, known)
        if problem is None:
            if _upgrade_cache(folder):  # tokenizer.json rewritten: the marker and its record follow
                info = json.loads((folder / "COMPLETE").read_text())
                current["tokenizer.json"] = _file_record(folder / "tokenizer.json")
            if info.get("files") != current:
                _write_marker(folder, {**info, "files": current})
            return
        if folder.exists():
            log.warning("sinkscope: the cache at %s is unusable (%s); rebuilding it", folder, problem)
        _writable_folder(folder.parent / "gguf", folder)
        _sweep_gguf_staging(folder.parent / "gguf")
        _dequantize_to_cache(spec, folder)


def _dequantize_to_cache(spec, target: Path) -> None:
    """Dequantize the GGUF of ``spec`` (a :class:`circuits.models.PackagedModel`) to fp32 and save it as safetensors, atomically."""
    # heavy: transformers/TransformerLens take seconds to import; only building a model needs them
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if importlib.util.find_spec("gguf") is None:
        raise MissingPackageError("reading GGUF files needs the package 'gguf': pip install gguf")
    gguf_path = spec.locate_gguf(target.parent)
    log.warning("sinkscope: dequantizing %s once (20-60 s); later loads use %s", gguf_path.name, target)
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
        model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32)
    except (OSError, ValueError, KeyError, EOFError, RuntimeError) as exc:
        raise CorruptModelError(f"cannot read {gguf_path}: {exc}") from exc
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    if spec.architectures:
        model.config.architectures = list(spec.architectures)
    _write_cache(model, tokenizer, target, {"source": str(gguf_path), "hub_id": spec.hub_id})


def _write_cache(model, tokenizer, target: Path, info: dict) -> None:
    """Save a model and tokenizer as a cache folder, atomically, its files fingerprinted in COMPLETE."""
    target.parent.mkdir(parents=True, exist_ok=True)
    # the staging name carries this process' id: a build killed outright is swept by the next one
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.staging-{os.getpid()}-", dir=target.parent))
    try:
        model.save_pretrained(staging, safe_serialization=True)
        tokenizer.save_pretrained(staging)
        merges = _compact_merges(staging / "tokenizer.json")
        (staging / "COMPLETE").write_text(json.dumps({**info, "merges": merges, "files": _fingerprints(staging)}))
        if target.exists():
            shutil.rmtree(target)
        os.replace(staging, target)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)


def _compact_merges(tokenizer_json: Path) -> str:
    """Store BPE merges as ``"a b"`` strings instead of ``["a", "b"]`` pairs, when that is lossless.

    Both are formats the ``tokenizers`` library reads; the string form loads 1.5 x faster
    (1.2 s against 1.8 s for Gemma 3's 514,906 merges), which is a third of a cache reload.
    It is ambiguous only if a merge part contains a space, and then the file is left as it is.
    Returns the format the file ends up in: ``"strings"`` or ``"pairs"``. Atomic.
    """
    doc = json.loads(tokenizer_json.read_text(encoding="utf-8"))
    merges = doc.get("model", {}).get("merges")
    if not merges or isinstance(merges[0], str):
        return "strings"
    if any(" " in part for pair in merges for part in pair):
        return "pairs"
    doc["model"]["merges"] = [f"{a} {b}" for a, b in merges]
    tmp = tokenizer_json.with_name(f".{tokenizer_json.name}.tmp")
    tmp.write_text(json.dumps(doc, ensure_ascii=False), encoding="utf-8")
    os.replace(tmp, tokenizer_json)
    return "strings"


def _upgrade_cache(folder: Path) -> bool:
    """Bring a cache folder written by an earlier sinkscope to the current layout (merges as
    strings); True when tokenizer.json was rewritten."""
    marker = folder / "COMPLETE"
    try:
        info = json.loads(marker.read_text())
    except (OSError, ValueError):
        return False  # a broken marker: the load fails and the cache is rebuilt
    if "merges" in info or not (folder / "tokenizer.json").is_file():
        return False
    before = (folder / "tokenizer.json").stat()
    info["merges"] = _compact_merges(folder / "tokenizer.json")
    tmp = folder / ".COMPLETE.tmp"
    tmp.write_text(json.dumps(info))
    os.replace(tmp, marker)
    return _stat_key((folder / "tokenizer.json").stat()) != _stat_key(before)


def _cached_tokenizer(folder: Path):
    """The tokenizer of a packaged model's cache folder, read by the Rust ``tokenizers`` library.

    ``AutoTokenizer`` parses tokenizer.json a second time in Python and rebuilds the backend
    (5-6 s for Gemma 3's 262k-token vocabulary, most of a cache reload); the cache folder is
    sinkscope's own, written by :func:`_dequantize_to_cache`, so its tokenizer.json plus the
    special tokens of tokenizer_config.json define the tokenizer completely. Token ids equal
    ``AutoTokenizer``'s (tests/test_models.py checks the probe passages of both models).
    """
    # heavy: transformers/TransformerLens take seconds to import; only building a model needs them
    from transformers import PreTrainedTokenizerFast

    config = json.loads((folder / "tokenizer_config.json").read_text())
    special = {k: v for k, v in config.items() if k.endswith("_token") and isinstance(v, str)}
    if not (folder / "tokenizer.json").is_file():
        raise OSError(f"{folder / 'tokenizer.json'} is missing")
    try:
        tokenizer = PreTrainedTokenizerFast(
            tokenizer_file=str(folder / "tokenizer.json"), name_or_path=str(folder),
            model_max_length=config.get("model_max_length", int(1e30)), **special,
        )
    except Exception as exc:  # the Rust library raises a bare Exception on a malformed file
        raise ValueError(f"cannot read {folder / 'tokenizer.json'}: {exc}") from exc
    template = folder / "chat_template.jinja"
    if template.is_file():
        tokenizer.chat_template = template.read_text()
    return tokenizer


__all__ = ["cache_root", "CacheLocationError", "check_cache_location"]
