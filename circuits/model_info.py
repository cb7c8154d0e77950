"""Who a model is: one record set when sinkscope loads it, read wherever a result names its model.

Why one place: a result records the model's name and where its weights came from, tokenization
needs its native BOS policy, and the traces are looked up by its name. Each of those read an
attribute of the bridge with its own fallback ("?", "model", "", BOS on); now
:func:`attach_info` sets a :class:`ModelInfo` when a model is loaded and :func:`model_info`
reads it, with the one fallback below for a bridge sinkscope did not load.
"""

from __future__ import annotations

from dataclasses import dataclass

_ATTR = "_sinkscope_info"


@dataclass(frozen=True)
class ModelInfo:
    """A loaded model's identity, recorded with every result."""

    name: str  #: the registry name, the local folder or the hub id: what results record
    source: str  #: where the weights came from (a package's pip name, "local folder", ...)
    native_bos: bool  #: whether the model's own tokenizer prepends BOS (the default BOS policy)
    hub_id: str | None = None  #: the Hugging Face id the weights correspond to, where known


def attach_info(bridge, info: ModelInfo):
    """Record ``info`` on ``bridge`` (what :func:`circuits.models.load_model` does); returns it."""
    setattr(bridge, _ATTR, info)
    return bridge


def tokenizer_adds_bos(tokenizer) -> bool:
    """Whether ``tokenizer`` prepends its BOS token to a plain text."""
    bos = getattr(tokenizer, "bos_token_id", None)
    return bos is not None and tokenizer("a").input_ids[:1] == [bos]


def model_info(model) -> ModelInfo:
    """``model``'s :class:`ModelInfo`. A bridge sinkscope did not load gets one from itself: its
    config's ``model_name`` (else ``"model"``), and the BOS policy of its tokenizer (BOS on when
    it has none)."""
    info = getattr(model, _ATTR, None)
    if isinstance(info, ModelInfo):
        return info
    cfg = getattr(model, "cfg", None)
    tokenizer = getattr(model, "tokenizer", None)
    return ModelInfo(
        name=str(getattr(cfg, "model_name", None) or "model"),
        source="a model sinkscope did not load",
        native_bos=tokenizer_adds_bos(tokenizer) if tokenizer is not None else True,
    )


__all__ = ["ModelInfo", "attach_info", "model_info", "tokenizer_adds_bos"]
