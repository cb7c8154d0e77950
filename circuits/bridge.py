"""A loaded Hugging Face model and tokenizer as a checked, raw-mode TransformerBridge.

Why this module exists. Every way to a model (a packaged model's cache folder, a local folder, a
hub id, a tiny test model) ends in the same two steps, written once here: read the folder
(:func:`_load_hf_folder`; a pre-training lab checkpoint with its own attention goes through
:func:`circuits.variants.load_hf_folder`), then wrap the model (:func:`_bridge`). The bridge is
booted with ``hf_model=`` so it never calls the hub, and stays in raw mode: compatibility mode
centres and folds weights, which changes the residual stream sinkscope measures. One 4-token
forward (:func:`_check_runs`) refuses a config that contradicts the weights, or weights that
give NaN, before the first measurement.
"""

from __future__ import annotations

from pathlib import Path

import torch

from circuits.model_errors import CorruptModelError, ModelConfigError, NonFiniteModelError
from circuits.placement import Placement, PlacementError
from circuits.variants import load_hf_folder


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
