"""Where and in what precision a model's weights live: one checked :class:`Placement` that every loader reads.

Why this module exists. A dtype, a device or a split over several GPUs is asked for in many
ways (``"bfloat16"``, ``--device cuda:1``, ``n_devices=2``, a transformers ``device_map``);
:func:`resolve_placement` checks the request against this machine before any weight is read (a
GPU that is not there is one :class:`PlacementError`, not a CUDA error minutes later) and turns
it into the one object that the folder, hub and tiny-model loaders all read.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from circuits.model_errors import ModelError

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


__all__ = ["DtypeName", "DTYPES", "Placement", "PlacementError", "resolve_placement"]
