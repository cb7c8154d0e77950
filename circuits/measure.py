"""Streaming sink statistics: one forward pass with hooks, reduced inside the hooks.

Why streaming: a full attention cache of a 30-layer model on 100 × 64 tokens is fine, on
8 × 2048 tokens it is 9 GB. Each hook here turns one layer's attention or residual into small
per-sequence statistics and drops the tensor, so memory grows as sequences × layers × heads ×
positions. By default not even one layer's pattern is built: the driver runs attention fused
(:mod:`circuits.fused_attention`) and alpha and the sink score are reduced from each block of
queries' softmax rows as the layer's attention computes them (:func:`circuits.fused_attention.reduce_pattern`
with :class:`circuits.blockwise.ColumnSums`), so memory is linear in the length (a 32k-token
trace fits) and the scores are computed once, not again next to the kernel. A layer whose pattern a hook of the
run reads or edits, and a model without the fused path, hands its ``hook_pattern`` to the same
reducer as one block; both paths agree to float32 rounding.

Definitions (see ``docs/science.md``; positions are 0-based everywhere in sinkscope, so the
papers' "Sink_1" is position 0 here):

* ``alpha[l, h, k]`` (Gu et al.): the mean attention key ``k`` receives from the queries that
  can see it, ``k`` included: ``sum_{t=k}^{T-1} A[t, k] / (T - k)``.
* ``Sink_k^eps``: the indicator ``alpha[l, h, k] > eps``, thresholded per sequence and then
  averaged over sequences, layers and heads, in percent (:meth:`SinkMeasurement.sink_rate`).
* sink score of token ``k`` at layer ``l`` (Wong et al., as documented in science.md): the
  attention ``k`` receives, averaged over heads and over the strictly later queries ``t > k``.
  Self-attention is left out: it is not attention "sunk" into ``k`` and it would make the
  first token's score 1 by construction at ``t = 0``. The last token has no later query: NaN.
* residual norms, cosine to the first token's residual (the primary-sink direction), and the
  top-|value| residual dimensions per position with the per-layer median |value|.

Padding: batches are right-padded (:mod:`circuits.probes`), so a real query never attends to a
pad key; pad queries are excluded from every sum and pad positions hold NaN.

The measurement never knows which intervention ran: extra hooks are passed in and registered
before the measurement's own, so the statistics see the intervened activations.

Structure: :class:`SinkMeter` is a :class:`~circuits.pattern_meter.PatternMeter` run by the one
driver (:func:`circuits.driver.drive`); :func:`measure` is that driver with one run. The fields of
:class:`SinkMeasurement` declare their axes (:func:`circuits.meter.array`), and allocation,
concatenation, :meth:`SinkMeasurement.select` and the sweep's copy of the layers below its start
block all read that declaration. A new per-sequence statistic takes two edits: its field here,
with its axes, and the line that computes it. From the block output, that is a new key of the
dict :func:`residual_statistics` returns. From the attention pattern, it is one
:data:`~circuits.blockwise.Reducer` (as :class:`~circuits.blockwise.ColumnSums` is for alpha and
the sink score), which sees the fused blocks and the eager pattern alike, and its ``put`` in
:meth:`SinkMeter.collect`. To see its clean/intervened delta in
:attr:`interventions.effect.Effect.frame` too, add a row to ``interventions.effect.METRIC_TABLE``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version
from typing import Sequence

import numpy as np
import torch
from jaxtyping import Float
from torch import Tensor

from circuits.blockwise import ColumnSums
from circuits.checks import check_eps
from circuits.driver import BATCH_SIZE, HookSource, Run, drive
from circuits.memory import loss_chunk
from circuits.meter import Axes, array, axes_of, per_sequence, select_sequences, tidy
from circuits.model_info import model_info
from circuits.pattern_meter import PatternMeter, whole_pattern
from circuits.probes import TokenBatch, as_batch
from circuits.stats import nanmean, valid_positions

TOP_DIMS = 4  # residual dimensions kept per (layer, position), by |value|


@dataclass
class SinkMeasurement:
    """Per-sequence sink statistics of one set of runs. Arrays are NaN at pad positions.

    Shapes: N sequences, L layers, H heads, T = longest sequence, D = d_model, K = TOP_DIMS.
    Each array field declares its axes (``seq``, ``layer``, ``head``, ``pos``, ``d_model``,
    ``k``) and dtype, hence its pad fill: :meth:`axes`.
    """

    model: str
    prepend_bos: bool
    token_ids: list[list[int]] = per_sequence()
    tokens: list[list[str]] = per_sequence()
    lengths: np.ndarray = per_sequence(np.int64)  # [N]
    alpha: np.ndarray = array("seq", "layer", "head", "pos")  # [N, L, H, T]
    sink_score: np.ndarray = array("seq", "layer", "pos")  # [N, L, T]
    resid_norm: np.ndarray = array("seq", "layer", "pos")  # [N, L, T]
    cos_to_first: np.ndarray = array("seq", "layer", "pos")  # [N, L, T]
    first_resid: np.ndarray = array("seq", "layer", "d_model")  # [N, L, D]: h_0^l, the primary-sink direction per layer
    top_dims: np.ndarray = array("seq", "layer", "pos", "k", dtype=np.int32)  # [N, L, T, K]; -1 at pads
    top_values: np.ndarray = array("seq", "layer", "pos", "k")  # [N, L, T, K] signed values of those dims
    median_abs: np.ndarray = array("seq", "layer")  # [N, L] median |h| over the sequence's positions and dims
    next_token_loss: np.ndarray = array("seq", "pos")  # [N, T]: -log p(token t+1 | ..t); NaN at the last/pad positions
    metadata: dict = field(default_factory=dict)

    @classmethod
    def axes(cls) -> dict[str, Axes]:
        """Field name -> its :class:`~circuits.meter.Axes` (axis names, dtype, pad fill)."""
        return axes_of(cls)

    @property
    def n_sequences(self) -> int:
        return self.alpha.shape[0]

    @property
    def n_layers(self) -> int:
        return self.alpha.shape[1]

    @property
    def n_heads(self) -> int:
        return self.alpha.shape[2]

    @property
    def n_positions(self) -> int:
        return self.alpha.shape[3]

    def alpha_mean(self) -> np.ndarray:
        """alpha[l, h, k] averaged over the sequences that have position k: [L, H, T]."""
        return nanmean(self.alpha, axis=0)

    def sink_indicator(self, eps: float = 0.3) -> np.ndarray:
        """Per sequence, the share of (layer, head) pairs with alpha > eps at each key: [N, T].

        ``eps``: a number strictly between 0 and 1 (:func:`circuits.checks.check_eps`, the
        command's rule for ``--eps``); anything else raises :class:`~circuits.checks.ArgumentError`."""
        eps = check_eps(eps)
        with np.errstate(invalid="ignore"):
            hit = (self.alpha > eps).astype(np.float32)
        hit[np.isnan(self.alpha)] = np.nan
        return nanmean(hit, axis=(1, 2))

    def sink_rate(self, eps: float = 0.3) -> np.ndarray:
        """Sink_k^eps in percent for every position k (0-based): [T]. ``eps`` as :meth:`sink_indicator`."""
        return 100.0 * nanmean(self.sink_indicator(eps), axis=0)

    def sink_score_mean(self) -> np.ndarray:
        """Sink score averaged over sequences: [L, T]."""
        return nanmean(self.sink_score, axis=0)

    def primary_sink_mass(self) -> np.ndarray:
        """Per sequence and layer, the sink score of position 0: [N, L]."""
        return self.sink_score[:, :, 0]

    def select(self, index: Sequence[int]) -> "SinkMeasurement":
        """The same measurement restricted to some sequences (every field with a ``seq`` axis)."""
        picked = select_sequences(self, index)
        picked.metadata = dict(self.metadata)
        return picked

    def to_frame(self, index: Sequence[str] = ("seq", "layer", "pos"), spread: Sequence[str] = ("head", "k")):
        """Tidy table of every field, from the axis declarations (:func:`circuits.meter.tidy`):
        by default one row per (sequence, layer, position) with its token, a column per
        statistic, alpha per head (``alpha_h0`` ...) and the top dimensions per rank
        (``top_dims_r0`` ...); the loss and the layer median are repeated where they lack an axis.
        ``first_resid`` (a ``d_model`` vector per layer) has its own table:
        ``to_frame(index=("seq", "layer", "d_model"))``."""
        frame = tidy(self, index, spread)
        if "pos" in index and "seq" in index:
            frame.insert(index.index("pos") + 1, "token", [self.tokens[s][p] for s, p in zip(frame["sequence"], frame["position"])])
        return frame


class SinkMeter(PatternMeter):
    """The :class:`~circuits.meter.Meter` of :class:`SinkMeasurement`: pattern and block-output hooks.

    Usage (what :func:`measure` does through :func:`circuits.driver.drive`)::

        meter = SinkMeter(model)
        for sub in batches:
            meter.begin(sub)
            logits = model.run_with_hooks(sub.tokens, fwd_hooks=[*other_hooks, *meter.hooks()])
            meter.end(logits)
        result = meter.result()

    Any forward that fires the standard hook points can feed it (for example the prefix-reuse
    forward of :mod:`interventions.forward`). Its arrays are the measured fields of
    :attr:`result_type` (:class:`SinkMeasurement`), allocated and concatenated from their
    declared axes. alpha and the sink score are one reducer of the pattern
    (:class:`~circuits.blockwise.ColumnSums`), fed by the fused blocks or the eager pattern
    alike (:class:`~circuits.pattern_meter.PatternMeter`), and collected with the block output.
    """

    #: the dataclass measured; a subclass with more array fields gets them allocated and filled
    #: (each key of :func:`residual_statistics` is stored in the field of that name)
    result_type: type[SinkMeasurement] = SinkMeasurement
    collect_at = "hook_resid_post"

    def __init__(self, model, *, model_name: str | None = None, loss_from_residual: bool = False, block: int | None = None):
        self.n_heads = int(model.cfg.n_heads)
        self.d_model = int(model.cfg.d_model)
        self.model_name = model_name or model_info(model).name
        sizes = {"layer": int(model.cfg.n_layers), "head": self.n_heads, "d_model": self.d_model, "k": TOP_DIMS}
        super().__init__(model, self.result_type.axes(), sizes, block=block)
        #: compute the next-token loss from the last block's output in chunks when the forward
        #: returns no logits (:func:`chunked_next_token_loss`), instead of leaving it NaN
        self.loss_from_residual = loss_from_residual
        self._final_resid: Tensor | None = None

    def end(self, logits: Float[Tensor, "batch pos vocab"] | None = None) -> None:
        assert self._current is not None, "end() without begin()"
        if logits is not None:
            self._stats["next_token_loss"] = next_token_loss(logits, self._current).numpy()
        elif self.loss_from_residual and self._final_resid is not None:
            self._stats["next_token_loss"] = chunked_next_token_loss(self.model, self._final_resid, self._current).numpy()
        self._final_resid = None
        super().end(logits)

    # -- the pattern: one reducer on every path ------------------------------------------------
    def _lengths(self, device) -> Tensor:
        return self._current.lengths.to(device)

    def reducer(self, layer: int) -> ColumnSums:
        return ColumnSums(self._current.lengths)

    def collect(self, layer: int, sums: ColumnSums) -> None:
        received, self_attn = sums.result()
        alpha, score = alpha_and_score(received, self_attn, self._lengths(received.device))
        self.put("alpha", layer, alpha)
        self.put("sink_score", layer, score)

    # -- the block output ------------------------------------------------------------------------
    def layer_hooks(self, layer: int):
        return [(f"blocks.{layer}.hook_resid_post", self._resid_hook(layer))]

    def _resid_hook(self, layer: int):
        last = layer == self.n_layers - 1

        def hook(resid: Float[Tensor, "batch pos d_model"], hook):
            for name, value in residual_statistics(resid.detach().float(), self._lengths(resid.device)).items():
                self.put(name, layer, value)
            if last and self.loss_from_residual:
                self._final_resid = resid.detach()

        return hook

    # -- result ----------------------------------------------------------------------------
    def result(self, metadata: dict | None = None) -> SinkMeasurement:
        """Every sub-batch so far, one row per sequence in the order of the full batch."""
        arrays = self.arrays()
        return self.result_type(
            model=self.model_name,
            prepend_bos=self._batches[0].prepend_bos,
            token_ids=self.sequences(lambda b: b.token_ids),
            tokens=self.sequences(lambda b: b.str_tokens),
            lengths=self.lengths,
            **arrays,
            metadata=dict(metadata or {}),
        )


# ------------------------------------------------------------------------- pure reductions


def attention_received(
    pattern: Float[Tensor, "batch head query key"], lengths: Tensor
) -> tuple[Float[Tensor, "batch head key"], Float[Tensor, "batch key"]]:
    """alpha (queries t >= k) and the head-averaged sink score (queries t > k) of every key of a
    whole pattern: the reducer the meter uses (:class:`~circuits.blockwise.ColumnSums`), fed the
    pattern as one block.

    Pad queries (t >= length) are excluded; keys at pad positions, and the sink score of the
    last real token (no later query), are NaN.
    """
    sums = ColumnSums(lengths)
    sums(whole_pattern(pattern))
    return alpha_and_score(*sums.result(), lengths)


def alpha_and_score(
    received: Float[Tensor, "batch head key"], self_attn: Float[Tensor, "batch head key"], lengths: Tensor
) -> tuple[Float[Tensor, "batch head key"], Float[Tensor, "batch key"]]:
    """alpha and the sink score from the attention each key receives from the real queries
    (``received``, self-attention included) and the self-attention term ``A[k, k]``."""
    t = received.shape[-1]
    pos = torch.arange(t, device=received.device)
    n_queries = (lengths.to(received.device)[:, None] - pos[None, :]).to(received.dtype)  # t >= k: [b, k]
    alpha = received / n_queries[:, None, :]
    alpha = torch.where(n_queries[:, None, :] > 0, alpha, torch.nan)
    later = n_queries - 1
    score = (received - self_attn).mean(dim=1) / later
    score = torch.where(later > 0, score, torch.nan)
    return alpha, score


def residual_statistics(resid: Float[Tensor, "batch pos d_model"], lengths: Tensor) -> dict[str, Tensor]:
    """Norms, cosine to position 0, top-|value| dimensions and the median |value| of a block output."""
    b, t, d = resid.shape
    valid = valid_positions(lengths, t)
    norm = resid.norm(dim=-1)
    first = resid[:, 0, :]
    # cosine from the norms already at hand (as torch.cosine_similarity, each norm clamped at 1e-8)
    dots = torch.einsum("btd,bd->bt", resid, first)
    cos = dots / (norm.clamp_min(1e-8) * norm[:, :1].clamp_min(1e-8))
    top = resid.abs().topk(min(TOP_DIMS, d), dim=-1)
    values = resid.gather(-1, top.indices)
    nan = torch.tensor(torch.nan, device=resid.device)
    return {
        "resid_norm": torch.where(valid, norm, nan),
        "cos_to_first": torch.where(valid, cos, nan),
        "first_resid": first,
        "top_dims": torch.where(valid[..., None], top.indices, -1).int(),
        "top_values": torch.where(valid[..., None], values, nan),
        "median_abs": lower_median_abs(resid, lengths),
    }


def lower_median_abs(x: Float[Tensor, "batch pos dim"], lengths: Tensor, *, start: int = 0) -> Float[Tensor, " batch"]:
    """Per sequence, the median |value| over its positions ``start..length-1`` and all dims.

    The convention is torch.median's: for an even count, the LOWER of the two middle values;
    NaN for a sequence with no such position. On the CPU it is a selection (``np.partition``),
    not a sort: five times faster than ``Tensor.median`` on a 128 x 576 block, and it runs in
    every layer's hook.
    """
    spans = [(start, int(n)) for n in lengths.tolist()]
    if x.device.type != "cpu":
        return torch.stack([
            x[i, a:b].abs().median() if b > a else torch.tensor(torch.nan, device=x.device)
            for i, (a, b) in enumerate(spans)
        ])
    values = x.detach().abs().numpy()
    out = np.full(len(spans), np.nan, dtype=values.dtype)
    for i, (a, b) in enumerate(spans):
        if b > a:
            flat = values[i, a:b].reshape(-1)
            k = (flat.size - 1) // 2
            out[i] = np.partition(flat, k)[k]
    return torch.from_numpy(out)


def next_token_loss(logits: Float[Tensor, "batch pos vocab"], batch: TokenBatch) -> Float[Tensor, "batch pos"]:
    """-log p(token[t+1]) at each position t; NaN where t+1 is not a real token."""
    logp = torch.log_softmax(logits.detach().float(), dim=-1)
    target = batch.tokens[:, 1:].to(logp.device)
    nll = -logp[:, :-1].gather(-1, target[..., None])[..., 0]
    t = batch.tokens.shape[1]
    valid = valid_positions(batch.lengths, t - 1, offset=1)
    out = torch.full((len(batch), t), torch.nan)
    out[:, :-1] = torch.where(valid, nll.cpu(), torch.nan)
    return out


def chunked_next_token_loss(
    model, resid: Float[Tensor, "batch pos d_model"], batch: TokenBatch, *, chunk: int | None = None
) -> Float[Tensor, "batch pos"]:
    """:func:`next_token_loss` from the last block's output, ``chunk`` positions at a time.

    The logits of a long input do not fit (Gemma 3's 262k vocabulary x 32k tokens is 34 GB):
    each chunk goes through the bridge's final norm and unembedding, plus HF's final logit
    softcapping (Gemma 2) where the config has it, exactly as the model's forward computes
    its logits, and only ``-log p(next token)`` is kept. ``chunk`` None: about 2**25 logits per
    chunk (:func:`circuits.memory.loss_chunk`).
    """
    chunk = chunk or loss_chunk(int(model.cfg.d_vocab))
    cap = getattr(getattr(getattr(model, "original_model", None), "config", None), "final_logit_softcapping", None)
    b, t, _ = resid.shape
    target = batch.tokens[:, 1:].to(resid.device)
    nll = torch.full((b, t), torch.nan)
    for s0 in range(0, t - 1, chunk):
        s1 = min(s0 + chunk, t - 1)
        logits = model.unembed(model.ln_final(resid[:, s0:s1])).float()
        if cap:
            logits = torch.tanh(logits / cap) * cap
        logp = torch.log_softmax(logits, dim=-1)
        nll[:, s0:s1] = -logp.gather(-1, target[:, s0:s1, None])[..., 0].cpu()
    valid = valid_positions(batch.lengths, t - 1, offset=1)
    nll[:, :-1] = torch.where(valid, nll[:, :-1], torch.nan)
    return nll


# --------------------------------------------------------------------------- entry point


@torch.no_grad()
def measure(
    model,
    batch: TokenBatch,
    *,
    hooks: HookSource = (),
    batch_size: int = BATCH_SIZE,
    progress: bool = True,
    metadata: dict | None = None,
    fused: bool = True,
    full_logits: bool = False,
) -> SinkMeasurement:
    """Run ``model`` over ``batch`` once and return its sink statistics.

    Args:
        batch: a :class:`~circuits.probes.TokenBatch`, or a text or list of texts (tokenized
            with the model's native BOS policy, :func:`circuits.probes.as_batch`). Every
            sequence needs at least two tokens, token ids in the vocabulary; anything else is
            a :class:`~circuits.probes.TokenizationError` naming what was wrong.
        hooks: extra forward hooks (typically an intervention's), or a function of the
            sub-batch that returns them. They run before the measurement hooks at every point.
        batch_size: sequences per forward pass (sub-batches are grouped by length, as in every
            entry point, :data:`circuits.driver.BY_LENGTH`; the result has the sequences in the
            order of ``batch``).
        progress: show a tqdm bar over sub-batches.
        metadata: stored on the result (model, BOS policy and versions are added).
        fused: fused attention and blockwise statistics wherever no hook needs the pattern
            (:mod:`circuits.fused_attention`; memory linear in the length); False: the eager
            ``T x T`` pattern in every layer (the reference).
        full_logits: compute the full logits in the forward. By default the forward stops after
            the last block and the next-token loss is computed a chunk of positions at a time
            (:func:`chunked_next_token_loss`), so hooks on ``ln_final`` / ``unembed`` do not fire.
    """
    batch = as_batch(model, batch)
    meter = SinkMeter(model, loss_from_residual=not full_logits)
    drive(model, batch, Run([meter], hooks), batch_size=batch_size, progress=progress, desc="measuring",
          logits=full_logits, fused=fused)
    return meter.result(metadata={**provenance(model, batch), **(metadata or {})})


def provenance(model, batch: TokenBatch | None = None) -> dict:
    """Model, BOS policy, versions and seed-free settings stored with every result."""

    def ver(pkg: str) -> str:
        try:
            return version(pkg)
        except PackageNotFoundError:
            return "not installed"

    out = {
        "model": model_info(model).name,
        "model_source": model_info(model).source,
        "n_layers": int(model.cfg.n_layers),
        "n_heads": int(model.cfg.n_heads),
        "dtype": str(model.cfg.dtype),
        "versions": {p: ver(p) for p in ("torch", "transformers", "transformer-lens", "sinkscope")},
        "positions": "0-based (the papers' Sink_1 is position 0)",
    }
    if batch is not None:
        out["prepend_bos"] = batch.prepend_bos
        out["special_tokens"] = special_tokens(model, batch)
    return out


#: How sinkscope reads special-token text in a prompt (docs/models.md, "From text to tokens").
SPECIAL_TOKEN_RULE = ("special-token text in a prompt (such as <|im_start|>) is read as that special token, as the "
                      "model's own tokenizer and chat templates read it; prepend_bos says only whether sinkscope added a BOS")


def special_tokens(model, batch: TokenBatch, *, keep: int = 50) -> dict:
    """What a result records about special tokens: the rule, whether each sequence starts with the
    tokenizer's BOS token (added or written in the text), and the special tokens that came from
    the text (sequence, position, token; the first ``keep``, and their count)."""
    tokenizer = getattr(model, "tokenizer", None)
    special = set(getattr(tokenizer, "all_special_ids", None) or ())
    bos = getattr(tokenizer, "bos_token_id", None)
    found = [[i, t, batch.str_tokens[i][t]] for i, ids in enumerate(batch.token_ids) for t, tok in enumerate(ids)
             if tok in special and not (batch.prepend_bos and t == 0)]
    return {
        "rule": SPECIAL_TOKEN_RULE,
        "first_token_is_bos": [bool(bos is not None and ids[:1] == [bos]) for ids in batch.token_ids],
        "from_text": found[:keep],
        "n_from_text": len(found),
    }


def isfinite_or_none(x: float) -> float | None:
    """JSON has no NaN: map it to null."""
    return None if x is None or (isinstance(x, float) and math.isnan(x)) else float(x)
