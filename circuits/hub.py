"""Models by Hugging Face id: the local Hugging Face cache first, the hub only when it answers at once.

Why this module exists. ``load_model("gpt2")`` or ``load_model("Qwen/Qwen3-4B")`` must work
offline for a model fetched before, and fail in seconds, with the reason, when it was not and
the hub cannot be reached: transformers alone retries for a minute. :func:`_hub_reachable` makes
one quick request instead; the error names which of the local cache and the hub failed, and the
names that work offline.
"""

from __future__ import annotations

import difflib
import os
import re
import urllib.error
import urllib.request
from typing import Sequence

from circuits.bridge import _bridge
from circuits.model_errors import UnknownModelError
from circuits.model_info import ModelInfo, attach_info, tokenizer_adds_bos
from circuits.placement import Placement

_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?")


def _unknown(name: str, names: Sequence[str]) -> str:
    """"unknown model", with the closest of the sinkscope ``names`` when one is close."""
    close = difflib.get_close_matches(name, list(names), n=1)
    return f"unknown model {name!r}" + (f" (did you mean {close[0]!r}?)" if close else "")


def _load_hub_model(hub_id: str, placement: Placement, names: Sequence[str]):
    """A Hugging Face id: from the local HF cache, else from the hub when it answers one quick
    connect; the error says which of the two failed and why, and lists the sinkscope ``names``
    (the registry's, which load offline)."""
    # heavy: transformers/TransformerLens take seconds to import; only building a model needs them
    from transformers import AutoModelForCausalLM, AutoTokenizer

    known = ", ".join(names)
    what = (f"{_unknown(hub_id, names)}: not a sinkscope name" if "/" not in hub_id else f"model {hub_id!r}") + \
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
