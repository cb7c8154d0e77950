"""Long inputs: the one observation pass the paper analyses share, and what a long input changes.

Why this module exists. Wong et al. found secondary sinks in long, model-generated reasoning
traces, and every observational analysis of the three papers (secondary sinks, the MLP that
writes them, the variance of attention outputs, super neurons, key and value norms) reads the
same forward pass over such traces. :func:`observe_long_inputs` runs that pass once, with every
meter of :mod:`circuits.analyses` attached, so the reproduction report and the notebooks observe
exactly the same thing. :func:`sliding_layers` names the one property of a model that matters
only on long inputs: layers whose attention window is shorter than the input cannot let far
queries see position 0, which lowers the first token's sink score there by construction.

Nothing here acts on the model; positions are 0-based.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

from circuits import analyses
from circuits.errors import SinkscopeError
from circuits.measure import SinkMeasurement, SinkMeter, provenance
from circuits.model_info import model_info
from circuits.probes import TokenBatch, has_traces, reasoning_texts, tokenize, trace_batch

#: Which long inputs: the model's own generated math sessions (:func:`circuits.probes.trace_batch`),
#: the hand-written reasoning traces (:func:`circuits.probes.reasoning_texts`), or ``auto``: the
#: generated ones where the model has them (the packaged models), else the written ones.
LongInputKind = Literal["auto", "generated", "written"]
LONG_INPUT_KINDS: tuple[str, ...] = get_args(LongInputKind)


@dataclass(frozen=True)
class LongInputs:
    """What one pass over the long inputs measured: the batch and each meter's result."""

    batch: TokenBatch
    sinks: SinkMeasurement
    mlp: analyses.MLPSites
    attn: analyses.AttnOutStats
    super_neurons: analyses.SuperNeuronStats
    kv: analyses.KVStats


def resolve_inputs(model, inputs: LongInputKind) -> str:
    """``"generated"`` or ``"written"``: what ``inputs`` means for this model."""
    if inputs not in LONG_INPUT_KINDS:
        raise SinkscopeError(f"inputs must be one of {', '.join(LONG_INPUT_KINDS)}, got {inputs!r}")
    if inputs != "auto":
        return inputs
    return "generated" if has_traces(model_info(model).name) else "written"


def long_input_batch(model, n_traces: int, max_tokens: int, inputs: LongInputKind = "auto") -> TokenBatch:
    """The first ``n_traces`` long inputs of kind ``inputs``, cut to ``max_tokens`` tokens: the
    model's own generated sessions (their stored token ids), or the written traces tokenized
    with the model's native BOS policy."""
    if resolve_inputs(model, inputs) == "generated":
        return trace_batch(model, n_traces, max_tokens)
    return tokenize(model, reasoning_texts(n_traces), max_tokens=max_tokens)


def observe_long_inputs(
    model, n_traces: int = 6, max_tokens: int = 1024, *, inputs: LongInputKind = "auto", batch_size: int = 1, progress: bool = False
) -> LongInputs:
    """One forward pass per sub-batch of the first ``n_traces`` long inputs
    (:func:`long_input_batch`: by default the model's own generated math sessions where it has
    them, else the written reasoning traces; truncated to ``max_tokens``), with
    :class:`~circuits.measure.SinkMeter` and the MLP-site, attention-output, super-neuron and
    key/value meters attached. The sink measurement records the provenance, ``max_tokens`` and
    the kind of input in its metadata, and for the model's own sessions the form they were
    written in (``parts_form``, :data:`circuits.parts.FORMS`); the part of the session each token
    belongs to travels with the batch (``LongInputs.batch.parts``)."""
    kind = resolve_inputs(model, inputs)
    batch = long_input_batch(model, n_traces, max_tokens, kind)
    sinks = SinkMeter(model)
    mlp, attn = analyses.MLPSiteMeter(model), analyses.AttnOutMeter(model)
    sn, kv = analyses.SuperNeuronMeter(model), analyses.KVMeter(model)
    analyses.observe(model, batch, [sinks, mlp, attn, sn, kv], batch_size=batch_size, progress=progress)
    parts = {} if batch.parts_form is None else {"parts_form": batch.parts_form}
    meas = sinks.result(metadata={**provenance(model, batch), "max_tokens": max_tokens, "inputs": kind, **parts})
    return LongInputs(batch, meas, mlp.result(), attn.result(), sn.result(), kv.result())


def sliding_layers(model) -> tuple[list[int], int | None]:
    """The layers with sliding-window attention and the window in tokens (Gemma 3: 5 of every
    6 layers, 512 tokens); ``([], None)`` for a model with global attention only."""
    config = getattr(getattr(model, "original_model", None), "config", None)
    window = getattr(config, "sliding_window", None)
    types = getattr(config, "layer_types", None) or []
    return [i for i, t in enumerate(types) if t == "sliding_attention"], window


__all__ = ["LONG_INPUT_KINDS", "LongInputKind", "LongInputs", "long_input_batch", "observe_long_inputs", "resolve_inputs", "sliding_layers"]
