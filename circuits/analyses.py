"""Observational analyses that need hooks beyond :class:`~circuits.measure.SinkMeter`.

Why a module of its own: the paper reproductions ask questions the basic sink measurement
cannot answer — *which part of the MLP* writes a secondary sink (Wong et al.), whether the
first token's attention outputs have a larger spread than the rest and which FFN channels carry
its massive activations (Li et al.), and whether the sink's key and value behave like a key
bias (Gu et al.). Each question is a *meter* here (:class:`circuits.meter.Meter`: ``begin``,
``hooks``, ``end``, ``result``, like ``SinkMeter``, on the same :class:`~circuits.meter.ArrayMeter`
base), whose hooks reduce every activation to small per-sequence statistics inside the hook (no
cache is kept, so 1,000+-token inputs are cheap in memory); each result dataclass declares the
axes of its arrays, from which the base allocates and concatenates them. :func:`observe` runs
any number of meters, ``SinkMeter`` included, in one forward pass per sub-batch through the
driver (:func:`circuits.driver.drive`). Positions are 0-based; pads hold NaN.

Meters and what they hold (N sequences, L layers, H query heads, KV key/value heads, T
positions, F = d_mlp):

* :class:`MLPSiteMeter` → :class:`MLPSites`: for every MLP sub-output the cosine of each
  token's vector with the *first token's vector at the same site and layer* (the primary
  sink's own direction in that space; the gated sites live in the F-dimensional MLP space,
  where ``h_0`` has no counterpart), plus the norm of what the MLP writes to the residual and
  its cosine with the primary-sink direction ``h_0^l`` (the block output of the first token,
  as in ``circuits.measure``). Sites on a gated MLP (hook names checked on TransformerLens 4.3
  bridges, Llama and Gemma 3):

  ========== ===================================== ==========================================
  site       hook                                  holds
  ========== ===================================== ==========================================
  input      ``blocks.L.mlp.hook_in``              the normalised MLP input (after ``ln2``)
  gate       ``blocks.L.mlp.gate.hook_out``        gate pre-activation (alias ``mlp.hook_pre``)
  up         ``blocks.L.mlp.in.hook_out``          up projection (alias ``mlp.hook_pre_linear``)
  act        computed from ``gate``                ``act_fn(gate)`` (no hook holds it)
  act_x_up   ``blocks.L.mlp.out.hook_in``          ``act_fn(gate) * up`` (alias ``mlp.hook_post``)
  down       ``blocks.L.mlp.out.hook_out``         the down-projection output
  written    ``blocks.L.hook_mlp_out``             what is added to the residual stream
  ========== ===================================== ==========================================

  On Llama ``down`` and ``written`` are the same tensor; on Gemma 3 ``written`` is after the
  post-feed-forward RMSNorm, so its direction differs from ``down``. ``blocks.L.hook_mlp_in``
  is not used: the bridge only fires it after ``set_use_hook_mlp_in(True)``.
* :class:`AttnOutMeter` → :class:`AttnOutStats`: per head, the variance (over ``d_head``) and
  norm of the aggregated value output ``hook_z``; per layer the norm and variance (over
  ``d_model``) of the attention output before any post-attention norm (``attn.hook_out``).
* :class:`SuperNeuronMeter` → :class:`SuperNeuronStats`: the down-projection input
  (``mlp.out.hook_in``) of the first token, the largest |activation| of each channel over the
  other tokens, and the layer's median |activation| over the other tokens.
* :class:`KVMeter` → :class:`KVStats`: key norms (as they enter the scores: after RoPE and,
  on Gemma 3, after ``k_norm``) and value norms per KV head and position; per query head the
  mean attention later queries give position 0 and the share of their output norm that the
  first token's value contributes, ``mean_t ||A[t,0] v_0|| / ||z_t||``.

Summaries turn these into tidy tables: :func:`creation_layer_mlp`, :func:`variance_by_position`,
:func:`super_neurons`, :func:`key_value_norms`. What an intervention does to the next-token
distribution is the acting layer's business: :func:`interventions.effect.output_change`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Literal, Sequence

import numpy as np
import pandas as pd
import torch
from jaxtyping import Float
from torch import Tensor

from circuits.blockwise import PatternBlock
from circuits.driver import BATCH_SIZE, BY_LENGTH, HookSource, Run, drive
from circuits.measure import lower_median_abs
from circuits.meter import ArrayMeter, Axes, Meter, MeterError, array, axes_of, per_sequence
from circuits.pattern_meter import PatternMeter
from circuits.probes import TokenBatch
from circuits.stats import correlations, nanmean, nanmean_t, valid_positions

SITES: tuple[str, ...] = ("input", "gate", "up", "act", "act_x_up", "down", "written")
SITE_HOOKS: dict[str, str] = {
    "input": "mlp.hook_in",
    "gate": "mlp.gate.hook_out",
    "up": "mlp.in.hook_out",
    "act_x_up": "mlp.out.hook_in",
    "down": "mlp.out.hook_out",
    "written": "hook_mlp_out",
}


def _cos_to_first(x: Float[Tensor, "batch pos d"]) -> Float[Tensor, "batch pos"]:
    return torch.nn.functional.cosine_similarity(x, x[:, :1, :], dim=-1)


@torch.no_grad()
def observe(
    model,
    batch: TokenBatch,
    meters: Sequence[Meter],
    *,
    hooks: HookSource = (),
    batch_size: int = BATCH_SIZE,
    logits: bool = False,
    by_length: bool = BY_LENGTH,
    progress: bool = False,
    fused: bool = True,
) -> list:
    """One forward pass per sub-batch feeding every meter (``SinkMeter`` or the meters here);
    returns their results (``meter.result()``), in the order of ``meters``.

    Every meter's result has one row per sequence of ``batch``, in order. ``hooks`` are extra
    forward hooks (an intervention's, e.g. ``iv.hooks_for(model, batch)``), registered before
    the meters' so these see the edited activations. With ``logits=False`` the forward stops
    after the last block (meters then get ``end(None)``: ``SinkMeter`` leaves
    ``next_token_loss`` as NaN). Batching as everywhere (:data:`circuits.driver.BATCH_SIZE`,
    :data:`~circuits.driver.BY_LENGTH`): sub-batches of 8 grouped by length, results in batch
    order; ``by_length=False`` takes consecutive sequences instead.
    ``fused=False`` runs every layer's attention eager (the reference path of
    :mod:`circuits.fused_attention`; the meters then read ``hook_pattern``).
    """
    drive(
        model, batch, Run(list(meters), hooks), batch_size=batch_size, logits=logits, by_length=by_length,
        progress=progress, desc="observing", fused=fused,
    )
    return [meter.result() for meter in meters]


# ------------------------------------------------------------------------------ MLP sites


@dataclass
class MLPSites:
    """Per (sequence, layer, position) MLP statistics; see :class:`MLPSiteMeter`."""

    cos_first: dict[str, np.ndarray]  # site -> [N, L, T]: cos with the first token's vector at that site
    written_norm: np.ndarray  # [N, L, T]: L2 norm of what the MLP adds to the residual
    down_norm: np.ndarray  # [N, L, T]: L2 norm of the down-projection output
    cos_sink: np.ndarray  # [N, L, T]: cos(written_t^l, h_0^l), h_0^l the first token's block output
    lengths: np.ndarray

    @property
    def sites(self) -> tuple[str, ...]:
        return tuple(self.cos_first)


class MLPSiteMeter(ArrayMeter):
    """Cosines of every gated-MLP sub-output with the first token's, and the written norm."""

    def __init__(self, model):
        self.n_layers = int(model.cfg.n_layers)
        missing = [f"blocks.0.{h}" for h in SITE_HOOKS.values() if f"blocks.0.{h}" not in model.hook_dict]
        if missing:
            raise MeterError(f"MLPSiteMeter needs a gated MLP (Llama, Gemma, ...); this model lacks {missing}")
        cell = Axes(("seq", "layer", "pos"))
        schema = {**{f"cos_{s}": cell for s in SITES}, "written_norm": cell, "down_norm": cell, "cos_sink": cell}
        super().__init__(schema, {"layer": self.n_layers})
        self._act = [_activation_fn(model, l) for l in range(self.n_layers)]
        self._written: dict[int, Tensor] = {}

    def hooks(self):
        out = []
        for l in range(self.n_layers):
            for site, hook in SITE_HOOKS.items():
                out.append((f"blocks.{l}.{hook}", self._site_hook(l, site)))
            out.append((f"blocks.{l}.hook_resid_post", self._resid_hook(l)))
        return out

    def _masked(self, x: Tensor) -> Tensor:
        return torch.where(self.valid(x.shape[1], x.device), x, torch.nan)

    def _site_hook(self, layer: int, site: str):
        def hook(x: Tensor, hook):
            x = x.detach().float()
            self.put(f"cos_{site}", layer, self._masked(_cos_to_first(x)))
            if site == "gate":
                self.put("cos_act", layer, self._masked(_cos_to_first(self._act[layer](x))))
            elif site == "down":
                self.put("down_norm", layer, self._masked(x.norm(dim=-1)))
            elif site == "written":
                self.put("written_norm", layer, self._masked(x.norm(dim=-1)))
                self._written[layer] = x

        return hook

    def _resid_hook(self, layer: int):
        def hook(resid: Tensor, hook):
            written = self._written.pop(layer)
            h0 = resid.detach().float()[:, :1, :]
            self.put("cos_sink", layer, self._masked(torch.nn.functional.cosine_similarity(written, h0, dim=-1)))

        return hook

    def result(self) -> MLPSites:
        a = self.arrays()
        return MLPSites({s: a[f"cos_{s}"] for s in SITES}, a["written_norm"], a["down_norm"], a["cos_sink"], self.lengths)


def _activation_fn(model, layer: int) -> Callable[[Tensor], Tensor]:
    """The MLP's own activation module (exact), else the bridge's resolution from the config."""
    act = getattr(getattr(model.blocks[layer].mlp, "original_component", None), "act_fn", None)
    if act is not None:
        return act
    # deferred: transformer_lens takes seconds to import; only an MLP without its own act_fn needs it
    from transformer_lens.model_bridge.generalized_components.gated_mlp import resolve_activation_fn

    return resolve_activation_fn(getattr(model.cfg, "hf_config", None) or model.cfg)


def creation_layer_mlp(table: pd.DataFrame, sites: MLPSites) -> pd.DataFrame:
    """Join secondary sinks (:func:`circuits.anatomy.secondary_sinks`) with the MLP at their
    creation layer: one ``cos_<site>`` column per site, ``written_norm``, ``down_norm`` and
    ``cos_sink`` (cosine of the MLP's written output with ``h_0`` of that layer)."""
    out = table.copy()
    if table.empty:
        for col in [*(f"cos_{s}" for s in sites.sites), "written_norm", "down_norm", "cos_sink"]:
            out[col] = pd.Series(dtype=float)
        return out
    s, l, p = (table[c].to_numpy(int) for c in ("sequence", "start_layer", "position"))
    for site, arr in sites.cos_first.items():
        out[f"cos_{site}"] = arr[s, l, p]
    out["written_norm"] = sites.written_norm[s, l, p]
    out["down_norm"] = sites.down_norm[s, l, p]
    out["cos_sink"] = sites.cos_sink[s, l, p]
    return out


def site_baseline(sites: MLPSites, table: pd.DataFrame) -> dict[str, float]:
    """Median cosine of each site over every token t >= 1 at the secondary sinks' creation
    layers, secondary sinks excluded: what an ordinary token shows at the same layers."""
    if table.empty:
        return {s: float("nan") for s in sites.sites}
    layers = sorted(set(table["start_layer"].astype(int)))
    mask = np.zeros(sites.written_norm.shape, dtype=bool)
    mask[:, layers, 1:] = True
    mask[table["sequence"].to_numpy(int), table["start_layer"].to_numpy(int), table["position"].to_numpy(int)] = False
    return {s: float(np.nanmedian(arr[mask])) for s, arr in sites.cos_first.items()}


# ------------------------------------------------------------------------------ attention outputs


@dataclass
class AttnOutStats:
    z_var: np.ndarray = array("seq", "layer", "head", "pos")  # [N, L, H, T]: variance over d_head of each head's value output
    z_norm: np.ndarray = array("seq", "layer", "head", "pos")  # [N, L, H, T]
    out_norm: np.ndarray = array("seq", "layer", "pos")  # [N, L, T]: ||attn.hook_out|| (before any post-attention norm)
    out_var: np.ndarray = array("seq", "layer", "pos")  # [N, L, T]: its variance over d_model
    lengths: np.ndarray = per_sequence(np.int64)


class AttnOutMeter(ArrayMeter):
    """Spread and size of attention outputs by position (Li et al.'s variance discrepancy)."""

    def __init__(self, model):
        self.n_layers = int(model.cfg.n_layers)
        self.n_heads = int(model.cfg.n_heads)
        super().__init__(axes_of(AttnOutStats), {"layer": self.n_layers, "head": self.n_heads})

    def hooks(self):
        out = []
        for l in range(self.n_layers):
            out.append((f"blocks.{l}.attn.hook_z", self._z_hook(l)))
            out.append((f"blocks.{l}.attn.hook_out", self._out_hook(l)))
        return out

    def _z_hook(self, layer):
        def hook(z: Float[Tensor, "batch pos head d_head"], hook):
            z = z.detach().float()
            valid = self.valid(z.shape[1], z.device)[:, None, :]  # [b, 1, t]
            zt = z.permute(0, 2, 1, 3)  # [b, h, t, d]
            self.put("z_var", layer, torch.where(valid, zt.var(-1, unbiased=False), torch.nan))
            self.put("z_norm", layer, torch.where(valid, zt.norm(dim=-1), torch.nan))

        return hook

    def _out_hook(self, layer):
        def hook(x: Float[Tensor, "batch pos d_model"], hook):
            x = x.detach().float()
            valid = self.valid(x.shape[1], x.device)
            self.put("out_norm", layer, torch.where(valid, x.norm(dim=-1), torch.nan))
            self.put("out_var", layer, torch.where(valid, x.var(-1, unbiased=False), torch.nan))

        return hook

    def result(self) -> AttnOutStats:
        return AttnOutStats(**self.arrays(), lengths=self.lengths)


def first_vs_rest(a: np.ndarray, *, over_sequences: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Position 0 (the last axis) against the median over positions >= 1, the comparison every
    first-token table here makes; with ``over_sequences``, each is then averaged over the
    sequences (axis 0). The median keeps a few secondary sinks from dominating the rest."""
    with np.errstate(all="ignore"):
        rest = np.nanmedian(a[..., 1:], axis=-1) if a.shape[-1] > 1 else np.full(a.shape[:-1], np.nan)
    first = a[..., 0]
    return (nanmean(first, axis=0), nanmean(rest, axis=0)) if over_sequences else (first, rest)


def variance_by_position(stats: AttnOutStats) -> pd.DataFrame:
    """Per layer: the first token's attention-output variance and norm against the other tokens'.

    ``z_var_first``: head-averaged variance of ``hook_z`` at position 0, mean over sequences;
    ``z_var_rest``: the same at positions >= 1, the median over positions of each sequence,
    then the mean over sequences (the median keeps a few secondary sinks from dominating);
    ``z_var_ratio`` = first / rest. ``z_norm_*`` and ``out_*`` (the attention output before
    any post-attention norm, per token over ``d_model``) follow the same rule.
    """
    zv = nanmean(stats.z_var, axis=2)
    zn = nanmean(stats.z_norm, axis=2)
    rows = {"layer": np.arange(zv.shape[1])}
    for name, arr in (("z_var", zv), ("z_norm", zn), ("out_var", stats.out_var), ("out_norm", stats.out_norm)):
        first, rest = first_vs_rest(arr)
        rows[f"{name}_first"], rows[f"{name}_rest"] = first, rest
        with np.errstate(all="ignore"):
            rows[f"{name}_ratio"] = first / rest
    return pd.DataFrame(rows)


def variance_profile(stats: AttnOutStats, layer: int, max_positions: int | None = None) -> pd.DataFrame:
    """Head-averaged ``hook_z`` variance and norm by position at one layer (mean over sequences)."""
    zv = nanmean(nanmean(stats.z_var[:, layer], axis=1), axis=0)
    zn = nanmean(nanmean(stats.z_norm[:, layer], axis=1), axis=0)
    t = len(zv) if max_positions is None else min(len(zv), max_positions)
    return pd.DataFrame({"position": np.arange(t), "z_var": zv[:t], "z_norm": zn[:t]})


# ------------------------------------------------------------------------------ super neurons


@dataclass
class SuperNeuronStats:
    first_act: np.ndarray = array("seq", "layer", "d_mlp")  # [N, L, F]: down-projection input of the first token
    other_max_abs: np.ndarray = array("seq", "layer", "d_mlp")  # [N, L, F]: max |activation| of each channel over tokens t >= 1
    layer_median_abs: np.ndarray = array("seq", "layer")  # [N, L]: median |activation| over tokens t >= 1 and channels
    lengths: np.ndarray = per_sequence(np.int64)


class SuperNeuronMeter(ArrayMeter):
    """The down-projection input (``mlp.out.hook_in``) of the first token against the rest."""

    def __init__(self, model):
        self.n_layers = int(model.cfg.n_layers)
        self.d_mlp = int(model.cfg.d_mlp)
        super().__init__(axes_of(SuperNeuronStats), {"layer": self.n_layers, "d_mlp": self.d_mlp})

    def hooks(self):
        return [(f"blocks.{l}.mlp.out.hook_in", self._hook(l)) for l in range(self.n_layers)]

    def _hook(self, layer):
        def hook(a: Float[Tensor, "batch pos d_mlp"], hook):
            a = a.detach().float()
            self.put("first_act", layer, a[:, 0])
            lengths = self._current.lengths
            maxes = []
            for i in range(a.shape[0]):
                rest = a[i, 1 : int(lengths[i])].abs()
                maxes.append(rest.max(0).values.cpu() if rest.shape[0] else torch.full((a.shape[-1],), torch.nan))
            self.put("other_max_abs", layer, torch.stack(maxes))
            self.put("layer_median_abs", layer, lower_median_abs(a, lengths, start=1).cpu())

        return hook

    def result(self) -> SuperNeuronStats:
        return SuperNeuronStats(**self.arrays(), lengths=self.lengths)


def down_projection(model, layer: int) -> Float[Tensor, "d_model d_mlp"]:
    """``W_down`` of a layer as ``[d_model, d_mlp]`` (the HF ``down_proj.weight``)."""
    return model.blocks[layer].mlp.out.original_component.weight.detach().float()


def super_neurons(
    stats: SuperNeuronStats,
    model,
    *,
    min_ratio: float = 100.0,
    min_share: float = 0.5,
    top_dims: int = 3,
) -> pd.DataFrame:
    """FFN channels whose first-token activation is outsized, and the residual dims they write.

    A channel ``c`` of layer ``l`` is a *super neuron* of a sequence when
    ``|a_0[c]| >= min_ratio × median_{t>=1, c'} |a_t[c']|`` (the layer's typical activation
    size; Li et al. give no threshold, 100 is the toolkit's choice) and it is kept when that
    holds in at least ``min_share`` of the sequences. Columns: ``first_act`` (mean signed
    activation at position 0), ``ratio`` (mean of |a_0| / layer median), ``specificity`` (mean
    of |a_0[c]| / max_{t>=1} |a_t[c]|: above 1, the channel fires hardest on the first token),
    ``share`` (of sequences), and for the residual write ``a_0[c] · W_down[:, c]`` its
    ``top_dims`` largest-|value| dimensions and values (mean activation), plus ``write_norm``.
    """
    a0 = stats.first_act  # [N, L, F]
    with np.errstate(all="ignore"):
        ratio = np.abs(a0) / stats.layer_median_abs[:, :, None]
        spec = np.abs(a0) / stats.other_max_abs
    hit = ratio >= min_ratio
    share = hit.mean(axis=0)  # [L, F]
    rows = []
    for l, c in zip(*np.nonzero(share >= min_share)):
        act = float(np.nanmean(a0[:, l, c]))
        write = act * down_projection(model, int(l))[:, int(c)].cpu().numpy()
        order = np.argsort(-np.abs(write))[:top_dims]
        rows.append(
            dict(
                layer=int(l), channel=int(c), first_act=act, ratio=float(np.nanmean(ratio[:, l, c])),
                specificity=float(np.nanmean(spec[:, l, c])), share=float(share[l, c]),
                top_dims=[int(d) for d in order], top_values=[float(write[d]) for d in order],
                write_norm=float(np.linalg.norm(write)),
            )
        )
    columns = ["layer", "channel", "first_act", "ratio", "specificity", "share", "top_dims", "top_values", "write_norm"]
    return pd.DataFrame(rows, columns=columns).sort_values(["layer", "ratio"], ascending=[True, False], ignore_index=True)


# ------------------------------------------------------------------------------ Li et al. as defined


def random_tokens(model, n: int, length: int, *, seed: int = 0) -> TokenBatch:
    """``n`` sequences of ``length`` token ids drawn uniformly from the vocabulary, no BOS.

    Li et al.'s input for the variance discrepancy: random tokens rule out any effect of a BOS
    or of natural text. The tokenizer's special ids (BOS, EOS, pad, ...) are never drawn, so no
    sequence starts with a token the model learned to treat as a start. Seeded (a CPU
    ``torch.Generator``), so the same call gives the same batch on every machine.
    """
    vocab = int(model.cfg.d_vocab)
    special = set(getattr(getattr(model, "tokenizer", None), "all_special_ids", None) or [])
    allowed = torch.tensor([t for t in range(vocab) if t not in special])
    gen = torch.Generator().manual_seed(int(seed))
    tokens = allowed[torch.randint(len(allowed), (int(n), int(length)), generator=gen)]
    str_tokens = [[str(int(t)) for t in row] for row in tokens]
    return TokenBatch(tokens, torch.full((int(n),), int(length)), False, str_tokens)


@dataclass
class BatchVariance:
    """Li et al.'s variance discrepancy: per layer and position, the variance of an attention
    output *across the sequences of a batch*, per dimension, then averaged over dimensions.

    ``z``: the value aggregation before ``W_O`` (``attn.hook_z``, all heads' ``d_head``
    dimensions together); ``out``: the attention output after ``W_O`` (``hook_attn_out``).
    Sample variance (``ddof=1``) over the ``n`` sequences that reach the position. Not the
    variance over the dimensions of one vector (:class:`AttnOutStats` ``z_var``, "within-vector").
    """

    z: np.ndarray  # [L, T]
    out: np.ndarray  # [L, T]
    n: np.ndarray  # [T]: sequences that reach each position


class BatchVarianceMeter:
    """Accumulates, per layer and position, the sum and sum of squares of every dimension of
    ``hook_z`` and ``hook_attn_out`` over the batch's sequences (float64), so
    :meth:`~BatchVarianceMeter.result` gives the across-batch variance without keeping any activation.

    A statistic across sequences has no per-sequence rows, so this meter implements the
    :class:`~circuits.meter.Meter` protocol directly rather than on :class:`ArrayMeter`.
    """

    SITES = {"z": "attn.hook_z", "out": "hook_attn_out"}

    def __init__(self, model):
        self.n_layers = int(model.cfg.n_layers)
        self._sums: dict[tuple[str, int], list[Tensor]] = {}
        self._count: Tensor | None = None
        self._lengths: Tensor | None = None

    def begin(self, batch: TokenBatch) -> None:
        self._lengths = batch.lengths

    def see_hooks(self, hooks) -> None:
        """Reads ``hook_z`` and ``hook_attn_out``, wherever the pattern is computed: nothing to choose."""

    def hooks(self):
        return [(f"blocks.{l}.{hook}", self._hook(key, l)) for l in range(self.n_layers) for key, hook in self.SITES.items()]

    def _hook(self, key: str, layer: int):
        def hook(x: Float[Tensor, "batch pos *feature"], hook):
            x = x.detach().double().flatten(2)  # [b, t, d]
            valid = valid_positions(self._lengths.to(x.device), x.shape[1]).to(x.dtype)[..., None]
            x = x * valid
            s1, s2 = x.sum(0).cpu(), (x * x).sum(0).cpu()
            if (key, layer) in self._sums:
                old1, old2 = self._sums[(key, layer)]
                s1, s2 = _add_rows(old1, s1), _add_rows(old2, s2)
            self._sums[(key, layer)] = [s1, s2]
            if key == "z" and layer == 0:
                count = valid[..., 0].sum(0).cpu()
                self._count = count if self._count is None else _add_rows(self._count, count)

        return hook

    def end(self, logits=None) -> None:
        self._lengths = None

    def result(self) -> BatchVariance:
        if self._count is None:
            raise MeterError("BatchVarianceMeter: no batch was measured")
        n = self._count
        out = {}
        for key in self.SITES:
            rows = []
            for l in range(self.n_layers):
                s1, s2 = self._sums[(key, l)]
                s1, s2 = _pad_rows(s1, len(n)), _pad_rows(s2, len(n))
                k = n[:, None]
                var = (s2 - s1 * s1 / k.clamp_min(1)) / (k - 1).clamp_min(1)
                var = torch.where(k > 1, var, torch.nan)
                rows.append(var.mean(-1).numpy())
            out[key] = np.stack(rows)
        return BatchVariance(out["z"], out["out"], n.numpy().astype(np.int64))


def _pad_rows(x: Tensor, rows: int) -> Tensor:
    """``x`` with zero rows appended along axis 0 up to ``rows`` (sub-batches of other widths)."""
    return x if x.shape[0] >= rows else torch.cat([x, x.new_zeros(rows - x.shape[0], *x.shape[1:])])


def _add_rows(a: Tensor, b: Tensor) -> Tensor:
    """``a + b`` along axis 0 (positions), the shorter one padded with zeros."""
    rows = max(a.shape[0], b.shape[0])
    return _pad_rows(a, rows) + _pad_rows(b, rows)


def kendall_tau(x: np.ndarray, y: np.ndarray) -> float:
    """Kendall's tau-b between two orderings, over the finite pairs; NaN with < 3 pairs."""
    from scipy import stats  # heavy: scipy.stats adds ~0.5 s to an import of circuits

    x, y = np.asarray(x, float), np.asarray(y, float)
    ok = np.isfinite(x) & np.isfinite(y)
    return float(stats.kendalltau(x[ok], y[ok])[0]) if ok.sum() >= 3 else float("nan")


def batch_variance_table(var: BatchVariance) -> pd.DataFrame:
    """Per layer: the across-batch variance at position 0 (``z_first``, ``out_first``), the median
    over positions >= 1 (``*_rest``), their ratio, Spearman's rho of variance against position
    (negative: it decays), and Kendall's tau between the orderings of positions by ``z`` and
    by ``out`` variance (does ``W_O`` preserve the ordering? Li et al.: about 0.32)."""
    rows = []
    pos = np.arange(var.z.shape[1])
    for l in range(var.z.shape[0]):
        row = {"layer": l}
        for key in ("z", "out"):
            a = getattr(var, key)[l]
            first, rest = map(float, first_vs_rest(a, over_sequences=False))
            row.update({f"{key}_first": first, f"{key}_rest": rest, f"{key}_ratio": first / rest if rest else float("nan"),
                        f"{key}_rho_position": correlations(pos, a)["spearman"]})
        row["kendall_z_out"] = kendall_tau(var.z[l], var.out[l])
        rows.append(row)
    return pd.DataFrame(rows)


def batch_variance(model, n: int = 64, length: int = 64, *, seed: int = 0, batch_size: int = 16) -> BatchVariance:
    """:class:`BatchVariance` of ``n`` random-token sequences of ``length`` tokens (:func:`random_tokens`)."""
    meter = BatchVarianceMeter(model)
    observe(model, random_tokens(model, n, length, seed=seed), [meter], batch_size=batch_size)
    return meter.result()


DomSite = Literal["resid_post", "resid_pre", "ln1"]
DOM_HOOKS: dict[str, str] = {"resid_post": "hook_resid_post", "resid_pre": "hook_resid_pre", "ln1": "ln1.hook_out"}


@dataclass
class DomRatioStats:
    dom_ratio: np.ndarray = array("seq", "layer")  # [N, L]: max_j |h_0j| / mean_k |h_0k| of the first token
    dom_dim: np.ndarray = array("seq", "layer", dtype=np.int64)  # [N, L]: the j of that max
    lengths: np.ndarray = per_sequence(np.int64)


class DomRatioMeter(ArrayMeter):
    """Li et al.'s dimension disparity of the first token, ``DomRatio(h_0) = max_j |h_0j| / mean_k |h_0k|``,
    per layer, at ``where``: ``"resid_post"`` (the block output, default), ``"resid_pre"`` (the
    block input) or ``"ln1"`` (the block input after its RMSNorm, gain included: "after RMSNorm
    at layer L" as the paper reports it, about 263 at layer 2 of Llama-2-7B)."""

    def __init__(self, model, where: DomSite = "resid_post"):
        if where not in DOM_HOOKS:
            raise MeterError(f"DomRatioMeter.where must be one of {', '.join(DOM_HOOKS)}; got {where!r}")
        self.n_layers, self.where = int(model.cfg.n_layers), where
        super().__init__(axes_of(DomRatioStats), {"layer": self.n_layers})

    def hooks(self):
        return [(f"blocks.{l}.{DOM_HOOKS[self.where]}", self._hook(l)) for l in range(self.n_layers)]

    def _hook(self, layer):
        def hook(h: Float[Tensor, "batch pos d_model"], hook):
            a = h.detach().float()[:, 0].abs()
            top = a.max(-1)
            self.put("dom_ratio", layer, top.values / a.mean(-1))
            self.put("dom_dim", layer, top.indices)

        return hook

    def result(self) -> DomRatioStats:
        return DomRatioStats(**self.arrays(), lengths=self.lengths)


def dom_ratio_table(stats: DomRatioStats) -> pd.DataFrame:
    """Per layer: the mean DomRatio of the first token over sequences and its most frequent dimension."""
    dims = [int(np.bincount(col[col >= 0]).argmax()) for col in stats.dom_dim.T]
    return pd.DataFrame({"layer": np.arange(stats.dom_ratio.shape[1]), "dom_ratio": nanmean(stats.dom_ratio, axis=0), "dom_dim": dims})


def mlp_weights(model, layer: int) -> dict[str, Float[Tensor, "rows cols"]]:
    """The gated MLP's weights of a layer as the HF linear layers hold them: ``gate`` and ``up``
    ``[d_mlp, d_model]`` (row c: neuron c's input weights, the paper's *column* of ``W_gate`` /
    ``W_up``), ``down`` ``[d_model, d_mlp]`` (column c: what neuron c writes, the paper's *row*
    of ``W_down``)."""
    mlp = model.blocks[layer].mlp
    get = lambda part: getattr(mlp, part).original_component.weight.detach().float()  # noqa: E731
    if not all(hasattr(mlp, part) for part in ("gate", "in", "out")):
        raise MeterError("weight super neurons need a gated MLP (gate, up and down projections)")
    return {"gate": get("gate"), "up": get("in"), "down": get("out")}


def weight_neurons(model) -> pd.DataFrame:
    """Every MLP neuron's weights, one row per (layer, channel): ``gate_norm`` and ``up_norm``
    (L2 norms of its input weights), ``norm_ratio`` (``gate_norm · up_norm`` over the layer's
    median of it), and its ``W_down`` write: ``down_norm``, ``down_top_dim`` (the residual
    dimension it writes most) and ``down_top_share`` (that dimension's share of the squared
    norm: 1 = writes one dimension only; 1/d_model = spread evenly), ``down_kurtosis``
    (excess kurtosis of its entries: heavy tails)."""
    frames = []
    for l in range(int(model.cfg.n_layers)):
        w = mlp_weights(model, l)
        g, u = w["gate"].norm(dim=1), w["up"].norm(dim=1)
        d = w["down"].T  # [d_mlp, d_model]
        sq = d * d
        gu = g * u
        z = (d - d.mean(1, keepdim=True)) / d.std(1, keepdim=True).clamp_min(1e-12)
        frames.append(pd.DataFrame({
            "layer": l, "channel": np.arange(len(g)), "gate_norm": g.cpu().numpy(), "up_norm": u.cpu().numpy(),
            "norm_ratio": (gu / gu.median()).cpu().numpy(), "down_norm": d.norm(dim=1).cpu().numpy(),
            "down_top_dim": sq.argmax(1).cpu().numpy(), "down_top_share": (sq.max(1).values / sq.sum(1).clamp_min(1e-30)).cpu().numpy(),
            "down_kurtosis": ((z ** 4).mean(1) - 3).cpu().numpy(),
        }))
    return pd.concat(frames, ignore_index=True)


def weight_super_neurons(neurons: pd.DataFrame, *, min_ratio: float = 5.0, top: int | None = None) -> pd.DataFrame:
    """The neurons of :func:`weight_neurons` whose ``norm_ratio`` is at least ``min_ratio`` (Li et
    al.: "a few columns with very large norms"; they give no threshold, ``min_ratio`` is the
    toolkit's choice), largest first; ``top`` keeps only that many."""
    out = neurons[neurons["norm_ratio"] >= min_ratio].sort_values("norm_ratio", ascending=False, ignore_index=True)
    return out if top is None else out.head(top)


def cross_check_super_neurons(by_weights: pd.DataFrame, by_activations: pd.DataFrame) -> dict:
    """How the weight-based super neurons (:func:`weight_super_neurons`) and the activation-based
    ones (:func:`super_neurons`) agree: the (layer, channel) pairs in both, in either only, and
    the share of the activation-based ones the weights find."""
    w = {(int(l), int(c)) for l, c in zip(by_weights["layer"], by_weights["channel"])}
    a = {(int(l), int(c)) for l, c in zip(by_activations["layer"], by_activations["channel"])}
    both = sorted(w & a)
    return {"both": both, "weights_only": sorted(w - a), "activations_only": sorted(a - w), "n_weights": len(w), "n_activations": len(a),
            "recall": len(both) / len(a) if a else float("nan")}


# ------------------------------------------------------------------------------ keys and values


@dataclass
class KVStats:
    k_norm: np.ndarray = array("seq", "layer", "kv_head", "pos")  # [N, L, KV, T]: key norm as it enters the scores
    v_norm: np.ndarray = array("seq", "layer", "kv_head", "pos")  # [N, L, KV, T]
    attn_first: np.ndarray = array("seq", "layer", "head")  # [N, L, H]: mean attention queries t >= 1 give position 0
    value_share: np.ndarray = array("seq", "layer", "head")  # [N, L, H]: mean_{t>=1} A[t,0] ||v_0|| / ||z_t||
    key_hook: str
    lengths: np.ndarray = per_sequence(np.int64)


def key_hook_name(model, layer: int = 0) -> str:
    """The key as the scores see it: after RoPE (``hook_rot_k``; on Gemma 3 that is after
    ``k_norm`` too), else after a key norm, else the projection output."""
    for suffix in ("attn.hook_rot_k", "attn.hook_k_normed", "attn.hook_k"):
        if f"blocks.{layer}.{suffix}" in model.hook_dict:
            return suffix
    raise MeterError("this model has no key hook (attn.hook_rot_k, attn.hook_k_normed or attn.hook_k)")


class FirstKeyColumn:
    """A :data:`~circuits.blockwise.Reducer` that keeps the attention every query gives key 0;
    :meth:`result` is ``[batch, head, query]``."""

    def __init__(self):
        self._first: Tensor | None = None

    def __call__(self, block: PatternBlock) -> None:
        if self._first is None:
            b, hk, _, g, _ = block.probs.shape
            self._first = block.probs.new_zeros(b, hk, g, block.kv_length)
        column = block.key_column(0)
        if column is not None:
            self._first[..., block.q0 : block.q1] = column

    def result(self) -> Float[Tensor, "batch head query"]:
        if self._first is None:
            raise MeterError("FirstKeyColumn saw no block of the pattern")
        b, hk, g, t = self._first.shape
        return self._first.view(b, hk * g, t)


class KVMeter(PatternMeter):
    """Key and value norms by position, and how much of each head's output the sink's value makes.

    The attention every query gives position 0 is one reducer of the pattern (the first key's
    column, :meth:`reducer`), fed by the fused blocks or the eager pattern alike
    (:class:`~circuits.pattern_meter.PatternMeter`) and collected at ``hook_z``, where the value
    share needs it."""

    def __init__(self, model):
        self.n_heads = int(model.cfg.n_heads)
        self.n_kv = int(getattr(model.cfg, "n_key_value_heads", None) or self.n_heads)
        self.key_hook = key_hook_name(model)
        super().__init__(model, axes_of(KVStats), {"layer": int(model.cfg.n_layers), "head": self.n_heads, "kv_head": self.n_kv})
        self._v0: dict[int, Tensor] = {}
        self._num: dict[int, Tensor] = {}

    def layer_hooks(self, l: int):
        return [
            (f"blocks.{l}.{self.key_hook}", self._norm_hook(l, "k_norm")),
            (f"blocks.{l}.attn.hook_v", self._norm_hook(l, "v_norm")),
            (f"blocks.{l}.attn.hook_z", self._z_hook(l)),  # after collect: the first key's column is in
        ]

    def _norm_hook(self, layer, key):
        def hook(x: Float[Tensor, "batch pos kv d_head"], hook):
            x = x.detach().float()
            if x.shape[1] != self._current.tokens.shape[1]:  # [batch, kv, pos, d] layouts
                x = x.transpose(1, 2)
            norm = x.norm(dim=-1).transpose(1, 2)  # [b, kv, t]
            valid = self.valid(norm.shape[-1], norm.device)[:, None, :]
            self.put(key, layer, torch.where(valid, norm, torch.nan))
            if key == "v_norm":
                self._v0[layer] = norm[:, :, 0]  # [b, kv]

        return hook

    def reducer(self, layer: int) -> "FirstKeyColumn":
        return FirstKeyColumn()

    def collect(self, layer: int, column: "FirstKeyColumn") -> None:
        """Attention every query gives position 0: its mean over the real queries ``t >= 1``, and
        the numerator of the value share (``a0 * |v_0|``), kept for :meth:`_z_hook`."""
        a0 = column.result()  # [b, h, t]
        b, h, t = a0.shape
        valid = self.valid(t, a0.device).clone()
        valid[:, 0] = False  # queries t >= 1
        a0 = torch.where(valid[:, None, :], a0, torch.nan)  # [b, h, t]
        n = valid.sum(-1).clamp_min(1)[:, None]
        self.put("attn_first", layer, torch.nan_to_num(a0, nan=0.0).sum(-1) / n)
        v0 = self._v0.pop(layer).to(a0.device)  # [b, kv]
        v0 = v0.repeat_interleave(h // v0.shape[1], dim=1)  # query head -> its kv group
        self._num[layer] = a0 * v0[:, :, None]  # [b, h, t]

    def _z_hook(self, layer):
        def hook(z: Float[Tensor, "batch pos head d_head"], hook):
            zn = z.detach().float().norm(dim=-1).transpose(1, 2)  # [b, h, t]
            share = self._num.pop(layer) / zn.clamp_min(1e-12)
            self.put("value_share", layer, nanmean_t(share))

        return hook

    def result(self) -> KVStats:
        return KVStats(**self.arrays(), key_hook=self.key_hook, lengths=self.lengths)


def key_value_norms(stats: KVStats) -> pd.DataFrame:
    """Per layer: key and value norms of position 0 against the median over positions >= 1
    (averaged over KV heads, then sequences), their ratios, the mean attention later queries
    give position 0 and the share of the heads' output norm that its value contributes."""
    kf, kr = first_vs_rest(nanmean(stats.k_norm, axis=2))  # [N, L, KV, T] -> KV-head mean
    vf, vr = first_vs_rest(nanmean(stats.v_norm, axis=2))
    with np.errstate(all="ignore"):
        return pd.DataFrame(
            {
                "layer": np.arange(len(kf)), "k_norm_first": kf, "k_norm_rest": kr, "k_ratio": kf / kr,
                "v_norm_first": vf, "v_norm_rest": vr, "v_ratio": vf / vr,
                "attn_first": nanmean(nanmean(stats.attn_first, axis=2), axis=0),
                "value_share": nanmean(nanmean(stats.value_share, axis=2), axis=0),
            }
        )


__all__ = [
    "AttnOutMeter", "AttnOutStats", "KVMeter", "KVStats", "MLPSiteMeter", "MLPSites", "SITES", "SuperNeuronMeter",
    "SITE_HOOKS", "SuperNeuronStats", "correlations", "creation_layer_mlp", "down_projection", "key_hook_name",
    "key_value_norms", "nanmean_t", "observe",
    "site_baseline", "super_neurons", "variance_by_position", "variance_profile",
    "BatchVariance", "BatchVarianceMeter", "DOM_HOOKS", "DomRatioMeter", "DomRatioStats", "DomSite", "batch_variance",
    "batch_variance_table", "cross_check_super_neurons", "dom_ratio_table", "kendall_tau", "mlp_weights", "random_tokens",
    "weight_neurons", "weight_super_neurons",
]
