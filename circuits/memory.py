"""How much memory one measurement forward needs, estimated before it runs.

Why this module exists. A 32k-token input on a model that falls back to eager attention needs
``heads x T x T`` floats per layer (34 GB for Gemma 3's 4 heads, per tensor); started anyway,
the forward is killed by the kernel halfway, after minutes, with nothing to show. The command
checks :func:`check_fits` before the forward and refuses with the estimate instead.

The estimate (:func:`estimate_measure_bytes`) counts the tensors that are alive at once during
:func:`circuits.measure.measure`, beyond the weights (already loaded when it is asked):

* always: the residual stream and a block's temporaries, the MLP's hidden activations, the
  layer's queries / keys / values, the meter's arrays (the driver turns HF's key-value cache off);
* fused attention (:mod:`circuits.fused_attention`): one block of the blockwise statistics'
  scores (``heads x block x T`` floats, three copies; :func:`circuits.blockwise.stats_block`), keys and values repeated for GQA, one
  block of boolean mask, and one chunk of logits for the next-token loss;
* eager attention: HF's ``T x T`` float masks (one per layer type), about five ``heads x T x T``
  float tensors per layer (scores, masked scores, the float32 softmax, its cast, the meter's
  copy) and, with full logits, ``T x vocab`` floats three times.

It is an estimate of the peak of the process above the loaded model, rounded up on purpose
(each term counts its largest form), and ``bench/long_context.py`` records it next to the
measured peak RSS. Everything is linear in the batch rows of one forward.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from circuits.blockwise import stats_block
from circuits.errors import SinkscopeError

SDPA_BLOCK = 1024  # queries per block of the fused kernel on a non-causal mask
LOSS_CHUNK = 512  # at most this many positions per chunk of the next-token loss
RUNTIME_BYTES = 300 * 2**20  # torch, transformers and Python themselves (measured: about 0.3 GB)


def loss_chunk(vocab: int) -> int:
    """Positions per chunk of the chunked next-token loss: about 2**25 logits (128 MB in float32)
    per chunk, at most ``LOSS_CHUNK`` (512 for SmolLM2's 49k vocabulary, 128 for Gemma 3's 262k)."""
    return max(16, min(LOSS_CHUNK, 2**25 // max(1, int(vocab))))


class MemoryEstimateError(SinkscopeError, MemoryError):
    """A measurement would need more memory than this machine has free."""


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes a measurement forward needs beyond the loaded weights, by term."""

    terms: dict[str, int]

    @property
    def total(self) -> int:
        return sum(self.terms.values())

    def describe(self, top: int = 3) -> str:
        """``"5.2 GB (attention patterns 4.8 GB, HF masks 0.3 GB, ...)"``."""
        largest = sorted(self.terms.items(), key=lambda kv: -kv[1])[:top]
        return f"{gb(self.total)} ({', '.join(f'{name} {gb(n)}' for name, n in largest)})"


def gb(n: float) -> str:
    return f"{n / 1e9:.1f} GB"


def _mask_types(model) -> int:
    config = getattr(getattr(model, "original_model", None), "config", None)
    types = set(getattr(config, "layer_types", None) or ["full_attention"])
    return max(1, len(types))


def estimate_measure_bytes(
    model, n_tokens: int, batch_rows: int = 1, *, fused: bool | None = None, full_logits: bool = False
) -> MemoryEstimate:
    """The memory :func:`circuits.measure.measure` needs for ``batch_rows`` sequences of
    ``n_tokens`` per forward, beyond the weights (see the module doc for the terms).

    ``fused`` None: whether this model runs fused attention
    (:func:`circuits.fused_attention.fallback_reason`).
    """
    # deferred: circuits.fused_attention imports the kernels; a bare estimate needs only the config
    from circuits.fused_attention import fallback_reason

    if fused is None:
        fused = fallback_reason(model) is None
    cfg = model.cfg
    b, t = int(batch_rows), int(n_tokens)
    es = torch.finfo(cfg.dtype).bits // 8 if getattr(cfg, "dtype", None) is not None else 4
    h, dh, d = int(cfg.n_heads), int(cfg.d_head), int(cfg.d_model)
    hkv = int(getattr(cfg, "n_key_value_heads", None) or h)
    layers, vocab = int(cfg.n_layers), int(cfg.d_vocab)
    d_mlp = int(getattr(cfg, "d_mlp", None) or 4 * d)
    terms = {
        "runtime": RUNTIME_BYTES,
        "residual stream": 6 * b * t * d * es,
        "MLP activations": 3 * b * t * d_mlp * es,
        "queries, keys, values": 4 * b * t * h * dh * es,
        "meter arrays": b * layers * (h + 12) * t * 4 + b * layers * d * 4,
    }
    if fused:
        terms["blockwise statistics"] = 3 * b * h * min(t, stats_block(h, t)) * t * 4
        terms["GQA keys and values"] = 2 * b * h * t * dh * es if hkv != h else 0
        terms["mask blocks"] = 2 * b * min(t, SDPA_BLOCK) * t
        terms["loss chunk"] = 3 * b * min(t, loss_chunk(vocab)) * vocab * 4
    else:
        terms["attention patterns"] = 5 * b * h * t * t * 4
        terms["HF masks"] = _mask_types(model) * b * t * t * es
    if full_logits or not fused:
        terms["logits"] = 3 * b * t * vocab * 4
    return MemoryEstimate(terms)


def available_bytes(device: str | torch.device = "cpu") -> int | None:
    """Free memory on ``device``: ``MemAvailable`` of /proc/meminfo (Linux) for the CPU, the
    driver's free memory for CUDA; None where it cannot be read (then nothing is refused)."""
    device = torch.device(device)
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):
        return None


def check_fits(
    model, n_tokens: int, batch_rows: int = 1, *, fused: bool | None = None, full_logits: bool = False,
    available: int | None = None, share: float = 0.9,
) -> MemoryEstimate:
    """The estimate, or :class:`MemoryEstimateError` when it exceeds ``share`` of the free memory
    (``available``; default :func:`available_bytes` of the model's device)."""
    est = estimate_measure_bytes(model, n_tokens, batch_rows, fused=fused, full_logits=full_logits)
    free = available if available is not None else available_bytes(getattr(model.cfg, "device", "cpu") or "cpu")
    if free is not None and est.total > share * free:
        attention = "eager attention" if "attention patterns" in est.terms else "fused attention"
        raise MemoryEstimateError(
            f"{batch_rows} x {n_tokens} tokens would need about {est.describe()} with {attention}, "
            f"but {gb(free)} is free; use fewer tokens (--max-tokens) or a smaller --batch-size"
        )
    return est


__all__ = ["MemoryEstimate", "MemoryEstimateError", "available_bytes", "check_fits", "estimate_measure_bytes", "gb", "loss_chunk"]
