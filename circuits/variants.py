"""Attention variants of the pre-training lab, as plain Hugging Face Llama models.

Why this module exists. Gu et al. and Li et al. make claims about *training*: softmax
normalisation drives the first-token sink, a learnable key bias takes its place, sigmoid
attention without normalisation has none, and head-wise RMSNorm on the value aggregation speeds
up convergence. To test them the lab trains small Llama models that differ in one place of
the attention, and every checkpoint must load back into the same TransformerBridge machinery
(:func:`circuits.models.load_model`) with the *variant's* attention, not softmax.

The variants (``VARIANTS``):

``softmax``
    The baseline: ``softmax(QK^T/sqrt(d) + mask) V``.
``sigmoid-nonorm`` (Gu et al., Sec. 7)
    ``sigmoid(QK^T/sqrt(d) + b) V`` on the causal keys, rows **not** normalised. ``b`` is a
    fixed scalar, by default ``-log(n_ctx)`` (Ramapuram et al. 2024: ``T·sigmoid(s - log T) ≈
    e^s`` keeps a row's total of order one); it is stored in the config as
    ``sinkscope_sigmoid_bias``. Gu et al. do not state their bias; this is the lab's choice.
``key-bias`` (Gu et al., Sec. 7; the gpt-oss "sink logit")
    One learnable logit per head joins every softmax row as an extra key whose value is zero;
    its weight is dropped afterwards, so the real keys' weights sum to ``1 - w_bias``. This is
    the *learnable key-bias logit* form (the logit is the same for every query), not a
    learnable key vector (whose logit ``q·k*`` would depend on the query). The attention mass
    on the bias slot is ``1 - sum_k A[t, k]``: :func:`bias_slot_mass`.
``head-rmsnorm`` (Li et al.)
    RMSNorm with a learnable per-head weight (``[H, d_head]``, initialised to 1) on each head's
    aggregated value output, before ``o_proj``. It lives inside ``o_proj``
    (:class:`HeadRMSNormLinear`), so ``hook_z`` (``attn.o.hook_in``) sees the *un-normalised*
    head outputs and the norm is part of ``W_O``'s module.
``gated-attention`` (Qiu et al. 2025, arXiv 2505.06708, their best "G1" form)
    An elementwise, head-specific output gate ``sigmoid(x W_g)`` on the value aggregation before
    ``o_proj``, where ``x`` is the attention input (after ``input_layernorm``). ``W_g`` sits in
    ``o_proj`` (:class:`GatedLinear`); ``x`` is captured by a forward pre-hook on ``q_proj``,
    which both Hugging Face's and TransformerLens' forward call with the attention input.

How the attention reaches each forward path:

* Hugging Face: each variant registers its own function with transformers'
  ``AttentionInterface`` (``sinkscope_softmax``, ``sinkscope_sigmoid``, ``sinkscope_keybias``;
  the mask functions use ``eager_mask``). They return the attention weights, so
  ``output_attentions=True`` gives the variant's real pattern (the lab logs Sink_1^eps from it).
* TransformerBridge: the bridge does **not** call the HF attention function; it reimplements
  ``softmax(scores) @ V`` itself (``PositionEmbeddingsAttentionBridge.forward``) and forces
  eager attention. It natively honours a ``sinks`` parameter on the attention module (the
  key-bias logit) and calls ``o_proj``'s own module (head-rmsnorm and gated live there). For
  ``sigmoid-nonorm``, :func:`attach_to_bridge` replaces each attention bridge's
  ``_masked_softmax`` by the sigmoid, so ``hook_attn_scores`` stays pre-nonlinearity,
  ``hook_pattern`` is the sigmoid pattern, and the bridge's logits equal the HF model's.
  ``tests/test_lab.py`` checks logits and patterns for every variant.

Checkpoints are ordinary HF folders (``save_pretrained`` of the ``LlamaForCausalLM`` and its
tokenizer) plus ``sinkscope_lab.json``; the config carries ``sinkscope_variant``,
``sinkscope_attn_implementation`` and ``sinkscope_sigmoid_bias``. Plain
``AutoModelForCausalLM.from_pretrained`` would silently build a softmax model and drop the
extra weights, so lab folders load through :func:`load_hf_folder` (``load_model`` does it).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from circuits.errors import SinkscopeError

VARIANTS: tuple[str, ...] = ("softmax", "sigmoid-nonorm", "key-bias", "head-rmsnorm", "gated-attention")
LAB_FILE = "sinkscope_lab.json"

ATTN_IMPLEMENTATION = {
    "softmax": "sinkscope_softmax",
    "sigmoid-nonorm": "sinkscope_sigmoid",
    "key-bias": "sinkscope_keybias",
    "head-rmsnorm": "sinkscope_softmax",
    "gated-attention": "sinkscope_softmax",
}


class VariantError(SinkscopeError, ValueError):
    """An unknown variant or a lab folder that does not describe one."""


def check_variant(variant: str) -> str:
    if variant not in VARIANTS:
        raise VariantError(f"unknown variant {variant!r}; choose one of {', '.join(VARIANTS)}")
    return variant


def default_sigmoid_bias(n_ctx: int) -> float:
    """``-log(n_ctx)``: the fixed sigmoid bias used unless one is given."""
    return -math.log(n_ctx)


# --------------------------------------------------------------------------- attention functions


def _repeat_kv(x: Tensor, groups: int) -> Tensor:
    if groups == 1:
        return x
    b, h, t, d = x.shape
    return x[:, :, None].expand(b, h, groups, t, d).reshape(b, h * groups, t, d)


def _scores(module, query: Tensor, key: Tensor, attention_mask: Tensor | None, scaling: float) -> Tensor:
    key = _repeat_kv(key, module.num_key_value_groups)
    scores = torch.matmul(query, key.transpose(2, 3)) * scaling
    if attention_mask is not None:
        scores = scores + attention_mask[..., : key.shape[-2]]
    return scores


def _finish(weights: Tensor, value: Tensor, module, dropout: float) -> tuple[Tensor, Tensor]:
    weights = nn.functional.dropout(weights, p=dropout, training=module.training)
    value = _repeat_kv(value, module.num_key_value_groups)
    out = torch.matmul(weights, value).transpose(1, 2).contiguous()
    return out, weights


def softmax_attention(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
    """Plain eager softmax attention (returns the weights, unlike sdpa)."""
    scores = _scores(module, query, key, attention_mask, scaling)
    weights = torch.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    return _finish(weights, value, module, dropout)


def masked_entries(scores: Tensor) -> Tensor:
    """Entries the model itself masks (causal, sliding window): -inf or the dtype's minimum."""
    return scores <= torch.finfo(scores.dtype).min / 2


def sigmoid_pattern(scores: Tensor, bias: float | Tensor) -> Tensor:
    """``sigmoid(scores + bias)`` with masked entries (≤ dtype min / 2) exactly 0; no normalisation.
    The lab's ``sigmoid-nonorm`` attention and the ``sigmoid-attn`` intervention both use it
    (``bias``: a scalar, or a tensor that broadcasts against ``scores``, e.g. one per sequence)."""
    weights = torch.sigmoid(scores.float() + bias)
    return torch.where(masked_entries(scores), 0.0, weights)


def sigmoid_attention(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
    """Gu et al.'s sigmoid attention without normalisation; ``module.sigmoid_bias`` is ``b``."""
    scores = _scores(module, query, key, attention_mask, scaling)
    weights = sigmoid_pattern(scores, float(module.config.sinkscope_sigmoid_bias)).to(query.dtype)
    return _finish(weights, value, module, dropout)


def keybias_attention(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
    """Softmax over the real keys plus one learnable per-head logit (``module.sinks``) whose
    value is zero; the returned weights are the real keys' (rows sum to ``1 - w_bias``)."""
    scores = _scores(module, query, key, attention_mask, scaling)
    b, h, t, _ = scores.shape
    sink = module.sinks.reshape(1, h, 1, 1).expand(b, h, t, 1).to(scores.dtype)
    combined = torch.cat([scores, sink], dim=-1)
    probs = torch.softmax(combined - combined.amax(dim=-1, keepdim=True), dim=-1, dtype=torch.float32)
    weights = probs[..., :-1].to(query.dtype)
    return _finish(weights, value, module, dropout)


_FUNCTIONS = {
    "sinkscope_softmax": softmax_attention,
    "sinkscope_sigmoid": sigmoid_attention,
    "sinkscope_keybias": keybias_attention,
}


def register_attention() -> None:
    """Register the lab's attention functions (and eager masks for them) with transformers.

    Idempotent; runs on import of this module.
    """
    # heavy: transformers takes seconds to import; only building or loading a model needs it
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, eager_mask

    for name, fn in _FUNCTIONS.items():
        AttentionInterface.register(name, fn)
        AttentionMaskInterface.register(name, eager_mask)


register_attention()


# --------------------------------------------------------------------------- modules


class HeadRMSNormLinear(nn.Linear):
    """``o_proj`` with Li et al.'s head-wise RMSNorm in front: each head's ``d_head`` slice of the
    input is RMS-normalised and scaled by a learnable ``head_norm_weight[h]``."""

    def __init__(self, in_features: int, out_features: int, n_heads: int, eps: float = 1e-6, bias: bool = False):
        super().__init__(in_features, out_features, bias=bias)
        self.n_heads = n_heads
        self.eps = eps
        self.head_norm_weight = nn.Parameter(torch.ones(n_heads, in_features // n_heads))

    def forward(self, z: Tensor) -> Tensor:
        shape = z.shape
        zh = z.reshape(*shape[:-1], self.n_heads, -1)
        zf = zh.float()
        normed = (zf * torch.rsqrt(zf.pow(2).mean(-1, keepdim=True) + self.eps)).to(z.dtype)
        return super().forward((normed * self.head_norm_weight).reshape(shape))


class GatedLinear(nn.Linear):
    """``o_proj`` with Qiu et al.'s elementwise output gate in front: ``z * sigmoid(x W_g)``.

    ``x`` (the attention input) is handed over by :meth:`capture`, a forward pre-hook on the
    layer's ``q_proj``; the gate is computed when ``o_proj`` runs and the capture is cleared.
    """

    def __init__(self, in_features: int, out_features: int, d_model: int, bias: bool = False):
        super().__init__(in_features, out_features, bias=bias)
        self.gate_proj = nn.Linear(d_model, in_features, bias=True)
        nn.init.zeros_(self.gate_proj.bias)
        self._gate_input: Tensor | None = None

    def capture(self, module, args) -> None:
        self._gate_input = args[0]

    def forward(self, z: Tensor) -> Tensor:
        x = self._gate_input
        if x is None or x.shape[:-1] != z.shape[:-1]:
            raise RuntimeError("GatedLinear: o_proj ran without its q_proj input (the gate needs the attention input)")
        self._gate_input = None
        return super().forward(z * torch.sigmoid(self.gate_proj(x)))


def apply_variant(model, variant: str) -> None:
    """Turn a freshly built ``LlamaForCausalLM`` into the variant, in place (new parameters are
    initialised; call before training or before loading a state dict)."""
    check_variant(variant)
    cfg = model.config
    n_heads = cfg.num_attention_heads
    for layer in model.model.layers:
        attn = layer.self_attn
        old = attn.o_proj
        if variant == "key-bias":
            attn.sinks = nn.Parameter(torch.zeros(n_heads, dtype=old.weight.dtype, device=old.weight.device))
        elif variant == "head-rmsnorm":
            new = HeadRMSNormLinear(old.in_features, old.out_features, n_heads, eps=cfg.rms_norm_eps, bias=old.bias is not None)
            new.load_state_dict(old.state_dict(), strict=False)
            attn.o_proj = new.to(old.weight.device, old.weight.dtype)
        elif variant == "gated-attention":
            new = GatedLinear(old.in_features, old.out_features, cfg.hidden_size, bias=old.bias is not None)
            new.load_state_dict(old.state_dict(), strict=False)
            attn.o_proj = new.to(old.weight.device, old.weight.dtype)
            attn.q_proj.register_forward_pre_hook(attn.o_proj.capture)
    cfg.sinkscope_variant = variant
    cfg.sinkscope_attn_implementation = ATTN_IMPLEMENTATION[variant]
    if variant == "sigmoid-nonorm" and getattr(cfg, "sinkscope_sigmoid_bias", None) is None:
        cfg.sinkscope_sigmoid_bias = default_sigmoid_bias(cfg.max_position_embeddings)
    model.set_attn_implementation(ATTN_IMPLEMENTATION[variant])


def build_model(config, variant: str, *, seed: int | None = None):
    """A new ``LlamaForCausalLM`` of the variant (seeded init when ``seed`` is given)."""
    # heavy: transformers takes seconds to import; only building or loading a model needs it
    from transformers import AutoModelForCausalLM

    if seed is not None:
        torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, attn_implementation=ATTN_IMPLEMENTATION[check_variant(variant)])
    apply_variant(model, variant)
    return model


# --------------------------------------------------------------------------- folders


def read_lab_file(folder: str | Path) -> dict[str, Any]:
    path = Path(folder) / LAB_FILE
    try:
        spec = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise VariantError(f"cannot read {path}: {exc}") from exc
    check_variant(spec.get("variant", "?"))
    return spec


def is_lab_folder(folder: str | Path) -> bool:
    return (Path(folder) / LAB_FILE).is_file()


def save_hf_folder(model, tokenizer, folder: str | Path, lab_info: dict[str, Any]) -> None:
    """``save_pretrained`` of model and tokenizer plus ``sinkscope_lab.json``."""
    folder = Path(folder)
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    info = {"variant": model.config.sinkscope_variant,
            "attn_implementation": model.config.sinkscope_attn_implementation, **lab_info}
    (folder / LAB_FILE).write_text(json.dumps(info, indent=1), encoding="utf-8")


def load_hf_folder(folder: str | Path, dtype: torch.dtype = torch.float32):
    """Build the variant's model from a lab folder and load its weights strictly.

    Returns ``(hf_model, tokenizer)``, in eval mode.
    """
    # heavy: transformers takes seconds to import; only building or loading a model needs it
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoTokenizer

    folder = Path(folder)
    spec = read_lab_file(folder)
    config = AutoConfig.from_pretrained(folder)
    model = build_model(config, spec["variant"])
    state = {}
    for file in sorted(folder.glob("*.safetensors")):
        state.update(load_file(file))
    if not state:
        raise VariantError(f"{folder} holds no *.safetensors weights")
    if getattr(config, "tie_word_embeddings", False):
        state.setdefault("lm_head.weight", state.get("model.embed_tokens.weight"))
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise VariantError(f"{folder}: weights do not fit the {spec['variant']} model "
                           f"(missing {missing[:4]}, unexpected {unexpected[:4]})")
    tokenizer = AutoTokenizer.from_pretrained(folder)
    return model.to(dtype).eval(), tokenizer


# --------------------------------------------------------------------------- bridge


def attach_to_bridge(bridge, hf_model) -> None:
    """Make a TransformerBridge built on a lab model compute the variant's attention.

    Only ``sigmoid-nonorm`` needs it (the bridge already honours ``sinks`` and calls the
    custom ``o_proj`` modules): each attention bridge's softmax becomes the sigmoid. The bridge
    switched the HF model to eager attention; the HF model gets its own function back.
    """
    cfg = hf_model.config
    variant = getattr(cfg, "sinkscope_variant", None)
    if variant is None:
        return
    if variant == "sigmoid-nonorm":
        bias = float(cfg.sinkscope_sigmoid_bias)
        for block in bridge.blocks:
            attn = block.attn

            def sigmoid_softmax(scores: Tensor, dtype: torch.dtype | None = None, _bias=bias) -> Tensor:
                out = sigmoid_pattern(scores, _bias)
                return out if dtype is None else out.to(dtype)

            object.__setattr__(attn, "_masked_softmax", sigmoid_softmax)
    hf_model.set_attn_implementation(cfg.sinkscope_attn_implementation)
    bridge._sinkscope_variant = variant


# --------------------------------------------------------------------------- measurements


def bias_slot_mass(pattern: Tensor, lengths: Tensor | None = None) -> Tensor:
    """Per sequence and head, the mean attention mass on the key-bias slot: ``1 - sum_k A[t, k]``
    averaged over the real queries (every query sees the slot, so this is Gu et al.'s alpha of
    the slot). ``pattern``: ``[batch, head, query, key]`` → ``[batch, head]``."""
    b, h, t, _ = pattern.shape
    missing = 1.0 - pattern.float().sum(-1)  # [b, h, t]
    if lengths is None:
        return missing.mean(-1)
    valid = (torch.arange(t, device=pattern.device)[None, :] < lengths[:, None].to(pattern.device)).float()
    return (missing * valid[:, None, :]).sum(-1) / valid.sum(-1)[:, None]


__all__ = [
    "VARIANTS", "LAB_FILE", "ATTN_IMPLEMENTATION", "VariantError", "check_variant", "default_sigmoid_bias",
    "softmax_attention", "sigmoid_attention", "keybias_attention", "sigmoid_pattern", "register_attention",
    "HeadRMSNormLinear", "GatedLinear", "apply_variant", "build_model", "read_lab_file", "is_lab_folder",
    "save_hf_folder", "load_hf_folder", "attach_to_bridge", "bias_slot_mass",
]
