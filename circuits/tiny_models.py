"""Tiny test models: seeded random weights of twelve real decoder families, with a byte-level tokenizer.

Why this module exists. Tests and examples need a model of each architecture sinkscope
supports (grouped-query attention, sliding windows, learned sink logits, mixtures of experts)
that loads in a second, offline, with weights small enough to check by hand. ``tiny-<family>``
names them in :func:`circuits.models.load_model`.
"""

from __future__ import annotations

from typing import Literal, get_args

import torch

from circuits.bridge import _bridge
from circuits.model_errors import UnknownModelError
from circuits.model_info import ModelInfo, attach_info
from circuits.placement import DtypeName, resolve_placement

TinyArch = Literal[
    "gpt2", "llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3", "gpt-neox", "phi3", "olmo2", "stablelm", "gpt-oss",
]


TINY_MODELS: tuple[str, ...] = tuple(f"tiny-{arch}" for arch in get_args(TinyArch))


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


__all__ = ["byte_tokenizer", "tiny_hf_config", "tiny_model", "TINY_MODELS", "TinyArch"]
