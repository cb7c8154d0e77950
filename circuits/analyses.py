"""Observational analyses that need hooks beyond :class:`~circuits.measure.SinkMeter`.

Why a module of its own: the paper reproductions ask questions the basic sink measurement
cannot answer — *which part of the MLP* writes a secondary sink (Wong et al.), whether the
first token's attention outputs have a larger spread than the rest and which FFN channels carry
its massive activations (Li et al.), and whether the sink's key and value behave like a key
bias (Gu et al.). Each question is a *meter* here: an object with ``begin(batch)``, ``hooks()``
and ``end(logits)`` like ``SinkMeter``, whose hooks reduce every activation to small
per-sequence statistics inside the hook (no cache is kept, so 1,000+-token inputs are cheap in
memory). :func:`observe` drives any number of meters, ``SinkMeter`` included, in one forward
pass per sub-batch. Positions are 0-based; pads hold NaN.

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
from typing import Callable, Mapping, Sequence

import numpy as np
import pandas as pd
import torch
from jaxtyping import Float
from torch import Tensor
from tqdm.auto import tqdm

from circuits.measure import HookSource, concat_batches, lower_median_abs, nanmean, next_token_loss
from circuits.probes import TokenBatch

SITES: tuple[str, ...] = ("input", "gate", "up", "act", "act_x_up", "down", "written")
SITE_HOOKS: dict[str, str] = {
    "input": "mlp.hook_in",
    "gate": "mlp.gate.hook_out",
    "up": "mlp.in.hook_out",
    "act_x_up": "mlp.out.hook_in",
    "down": "mlp.out.hook_out",
    "written": "hook_mlp_out",
}


def _nan(shape) -> np.ndarray:
    return np.full(shape, np.nan, dtype=np.float32)


def _valid(batch: TokenBatch, t: int, device) -> Tensor:
    return torch.arange(t, device=device)[None, :] < batch.lengths.to(device)[:, None]


def _cos_to_first(x: Float[Tensor, "batch pos d"]) -> Float[Tensor, "batch pos"]:
    return torch.nn.functional.cosine_similarity(x, x[:, :1, :], dim=-1)


class _Meter:
    """Shared plumbing: per-batch arrays in ``self._stats``, concatenated by :meth:`_concat`."""

    def __init__(self, model):
        self.n_layers = int(model.cfg.n_layers)
        self._parts: list[dict[str, np.ndarray]] = []
        self._batches: list[TokenBatch] = []
        self._current: TokenBatch | None = None
        self._stats: dict[str, np.ndarray] = {}

    def begin(self, batch: TokenBatch) -> None:
        self._current = batch
        self._stats = self._allocate(len(batch), int(batch.tokens.shape[1]))

    def end(self, logits=None) -> None:
        assert self._current is not None, "end() without begin()"
        self._parts.append(self._stats)
        self._batches.append(self._current)
        self._current, self._stats = None, {}

    def _allocate(self, b: int, t: int) -> dict[str, np.ndarray]:
        raise NotImplementedError

    def _put(self, key: str, layer: int, value: Tensor) -> None:
        """Store ``value`` (``[batch, ...]``) at ``[:, layer, ...]``; a trailing position axis may be shorter."""
        arr = value.detach().float().cpu().numpy()
        target = self._stats[key]
        index = (slice(None), layer) + tuple(slice(0, s) for s in arr.shape[1:])
        target[index] = arr

    def _concat(self, pos_axes: Mapping[str, int | None]) -> dict[str, np.ndarray]:
        if not self._parts:
            raise ValueError("no batch was observed")
        width = max(b.tokens.shape[1] for b in self._batches)
        return {key: concat_batches([part[key] for part in self._parts], axis, width) for key, axis in pos_axes.items()}

    @property
    def lengths(self) -> np.ndarray:
        return np.concatenate([b.lengths.numpy() for b in self._batches])


# ------------------------------------------------------------------------------ driver


def _final_stop_hook(model):
    """A hook on the last block's output that ends the forward there: no final norm, no unembed.

    The bridge's own ``stop_at_layer`` only stops *before* a block; raising its
    ``StopAtLayerException`` after the last block is caught by ``run_with_hooks`` the same way.
    On Gemma 3 (262k vocabulary) the unembed costs as much as ~30 blocks, so skipping it halves
    the cost of an observation that needs no logits.
    """
    from transformer_lens.model_bridge.exceptions import StopAtLayerException

    def stop(resid: Tensor, hook) -> None:
        raise StopAtLayerException(resid)

    return (f"blocks.{int(model.cfg.n_layers) - 1}.hook_resid_post", stop)


@torch.no_grad()
def observe(
    model,
    batch: TokenBatch,
    meters: Sequence,
    *,
    hooks: HookSource = (),
    batch_size: int = 4,
    logits: bool = False,
    progress: bool = False,
) -> None:
    """One forward pass per sub-batch feeding every meter (``SinkMeter`` or the meters here).

    Sub-batches keep the order of ``batch``, so every meter's result has one row per sequence
    of ``batch`` in order. ``hooks`` are extra forward hooks (an intervention's, e.g.
    ``iv.hooks_for(model, batch)``), registered before the meters' so these see the edited
    activations. With ``logits=False`` the forward stops after the last block (meters then get
    ``end(None)``: ``SinkMeter`` leaves ``next_token_loss`` as NaN).
    """
    if len(batch) == 0:
        raise ValueError("empty batch")
    chunks = [list(range(s, min(s + batch_size, len(batch)))) for s in range(0, len(batch), batch_size)]
    for chunk in tqdm(chunks, desc="observing", unit="batch", disable=not progress or len(chunks) < 2):
        sub = batch.select(chunk)
        for m in meters:
            m.begin(sub)
        extra = list(hooks(sub) if callable(hooks) else hooks)
        fwd = [*extra, *(h for m in meters for h in m.hooks())]
        if not logits:
            fwd.append(_final_stop_hook(model))
        out = model.run_with_hooks(sub.tokens, fwd_hooks=fwd, return_type="logits" if logits else None)
        for m in meters:
            m.end(out if logits else None)


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


class MLPSiteMeter(_Meter):
    """Cosines of every gated-MLP sub-output with the first token's, and the written norm."""

    def __init__(self, model):
        super().__init__(model)
        missing = [f"blocks.0.{h}" for h in SITE_HOOKS.values() if f"blocks.0.{h}" not in model.hook_dict]
        if missing:
            raise ValueError(f"MLPSiteMeter needs a gated MLP (Llama, Gemma, ...); this model lacks {missing}")
        self._act = [_activation_fn(model, l) for l in range(self.n_layers)]
        self._written: dict[int, Tensor] = {}

    def _allocate(self, b, t):
        lay = self.n_layers
        stats = {f"cos_{s}": _nan((b, lay, t)) for s in SITES}
        stats.update(written_norm=_nan((b, lay, t)), down_norm=_nan((b, lay, t)), cos_sink=_nan((b, lay, t)))
        return stats

    def hooks(self):
        out = []
        for l in range(self.n_layers):
            for site, hook in SITE_HOOKS.items():
                out.append((f"blocks.{l}.{hook}", self._site_hook(l, site)))
            out.append((f"blocks.{l}.hook_resid_post", self._resid_hook(l)))
        return out

    def _masked(self, x: Tensor) -> Tensor:
        return torch.where(_valid(self._current, x.shape[1], x.device), x, torch.nan)

    def _site_hook(self, layer: int, site: str):
        def hook(x: Tensor, hook):
            x = x.detach().float()
            self._put(f"cos_{site}", layer, self._masked(_cos_to_first(x)))
            if site == "gate":
                self._put("cos_act", layer, self._masked(_cos_to_first(self._act[layer](x))))
            elif site == "down":
                self._put("down_norm", layer, self._masked(x.norm(dim=-1)))
            elif site == "written":
                self._put("written_norm", layer, self._masked(x.norm(dim=-1)))
                self._written[layer] = x

        return hook

    def _resid_hook(self, layer: int):
        def hook(resid: Tensor, hook):
            written = self._written.pop(layer)
            h0 = resid.detach().float()[:, :1, :]
            self._put("cos_sink", layer, self._masked(torch.nn.functional.cosine_similarity(written, h0, dim=-1)))

        return hook

    def result(self) -> MLPSites:
        a = self._concat({k: 2 for k in self._parts[0]} if self._parts else {})
        return MLPSites({s: a[f"cos_{s}"] for s in SITES}, a["written_norm"], a["down_norm"], a["cos_sink"], self.lengths)


def _activation_fn(model, layer: int) -> Callable[[Tensor], Tensor]:
    """The MLP's own activation module (exact), else the bridge's resolution from the config."""
    act = getattr(getattr(model.blocks[layer].mlp, "original_component", None), "act_fn", None)
    if act is not None:
        return act
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


def correlations(x: np.ndarray, y: np.ndarray) -> dict[str, float]:
    """Pearson r and Spearman rho (with p-values) over the finite pairs; NaN with < 3 pairs."""
    from scipy import stats

    x, y = np.asarray(x, float), np.asarray(y, float)
    ok = np.isfinite(x) & np.isfinite(y)
    n = int(ok.sum())
    if n < 3 or np.ptp(x[ok]) == 0 or np.ptp(y[ok]) == 0:
        return {"n": n, "pearson": float("nan"), "pearson_p": float("nan"), "spearman": float("nan"), "spearman_p": float("nan")}
    pr = stats.pearsonr(x[ok], y[ok])
    sr = stats.spearmanr(x[ok], y[ok])
    return {"n": n, "pearson": float(pr[0]), "pearson_p": float(pr[1]), "spearman": float(sr[0]), "spearman_p": float(sr[1])}


# ------------------------------------------------------------------------------ attention outputs


@dataclass
class AttnOutStats:
    z_var: np.ndarray  # [N, L, H, T]: variance over d_head of each head's aggregated value output
    z_norm: np.ndarray  # [N, L, H, T]
    out_norm: np.ndarray  # [N, L, T]: ||attn.hook_out|| (before any post-attention norm)
    out_var: np.ndarray  # [N, L, T]: its variance over d_model
    lengths: np.ndarray


class AttnOutMeter(_Meter):
    """Spread and size of attention outputs by position (Li et al.'s variance discrepancy)."""

    def __init__(self, model):
        super().__init__(model)
        self.n_heads = int(model.cfg.n_heads)

    def _allocate(self, b, t):
        lay, h = self.n_layers, self.n_heads
        return {"z_var": _nan((b, lay, h, t)), "z_norm": _nan((b, lay, h, t)), "out_norm": _nan((b, lay, t)), "out_var": _nan((b, lay, t))}

    def hooks(self):
        out = []
        for l in range(self.n_layers):
            out.append((f"blocks.{l}.attn.hook_z", self._z_hook(l)))
            out.append((f"blocks.{l}.attn.hook_out", self._out_hook(l)))
        return out

    def _z_hook(self, layer):
        def hook(z: Float[Tensor, "batch pos head d_head"], hook):
            z = z.detach().float()
            valid = _valid(self._current, z.shape[1], z.device)[:, None, :]  # [b, 1, t]
            zt = z.permute(0, 2, 1, 3)  # [b, h, t, d]
            self._put("z_var", layer, torch.where(valid, zt.var(-1, unbiased=False), torch.nan))
            self._put("z_norm", layer, torch.where(valid, zt.norm(dim=-1), torch.nan))

        return hook

    def _out_hook(self, layer):
        def hook(x: Float[Tensor, "batch pos d_model"], hook):
            x = x.detach().float()
            valid = _valid(self._current, x.shape[1], x.device)
            self._put("out_norm", layer, torch.where(valid, x.norm(dim=-1), torch.nan))
            self._put("out_var", layer, torch.where(valid, x.var(-1, unbiased=False), torch.nan))

        return hook

    def result(self) -> AttnOutStats:
        a = self._concat({"z_var": 3, "z_norm": 3, "out_norm": 2, "out_var": 2})
        return AttnOutStats(a["z_var"], a["z_norm"], a["out_norm"], a["out_var"], self.lengths)


def variance_by_position(stats: AttnOutStats) -> pd.DataFrame:
    """Per layer: the first token's attention-output variance and norm against the other tokens'.

    ``z_var_first``: head-averaged variance of ``hook_z`` at position 0, mean over sequences;
    ``z_var_rest``: the same at positions >= 1, the median over positions of each sequence,
    then the mean over sequences (the median keeps a few secondary sinks from dominating);
    ``z_var_ratio`` = first / rest. ``z_norm_*`` and ``out_*`` (the attention output before
    any post-attention norm, per token over ``d_model``) follow the same rule.
    """
    def first_rest(a: np.ndarray) -> tuple[np.ndarray, np.ndarray]:  # a: [N, L, T]
        with np.errstate(all="ignore"):
            rest = np.nanmedian(a[:, :, 1:], axis=2)
        return nanmean(a[:, :, 0], axis=0), nanmean(rest, axis=0)

    zv = nanmean(stats.z_var, axis=2)
    zn = nanmean(stats.z_norm, axis=2)
    rows = {"layer": np.arange(zv.shape[1])}
    for name, arr in (("z_var", zv), ("z_norm", zn), ("out_var", stats.out_var), ("out_norm", stats.out_norm)):
        first, rest = first_rest(arr)
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
    first_act: np.ndarray  # [N, L, F]: down-projection input of the first token
    other_max_abs: np.ndarray  # [N, L, F]: max |activation| of each channel over tokens t >= 1
    layer_median_abs: np.ndarray  # [N, L]: median |activation| over tokens t >= 1 and channels
    lengths: np.ndarray


class SuperNeuronMeter(_Meter):
    """The down-projection input (``mlp.out.hook_in``) of the first token against the rest."""

    def __init__(self, model):
        super().__init__(model)
        self.d_mlp = int(model.cfg.d_mlp)

    def _allocate(self, b, t):
        lay, f = self.n_layers, self.d_mlp
        return {"first_act": _nan((b, lay, f)), "other_max_abs": _nan((b, lay, f)), "layer_median_abs": _nan((b, lay))}

    def hooks(self):
        return [(f"blocks.{l}.mlp.out.hook_in", self._hook(l)) for l in range(self.n_layers)]

    def _hook(self, layer):
        def hook(a: Float[Tensor, "batch pos d_mlp"], hook):
            a = a.detach().float()
            self._put("first_act", layer, a[:, 0])
            lengths = self._current.lengths
            maxes = []
            for i in range(a.shape[0]):
                rest = a[i, 1 : int(lengths[i])].abs()
                maxes.append(rest.max(0).values.cpu() if rest.shape[0] else torch.full((a.shape[-1],), torch.nan))
            self._put("other_max_abs", layer, torch.stack(maxes))
            self._put("layer_median_abs", layer, lower_median_abs(a, lengths, start=1).cpu())

        return hook

    def result(self) -> SuperNeuronStats:
        a = self._concat({"first_act": None, "other_max_abs": None, "layer_median_abs": None})
        return SuperNeuronStats(a["first_act"], a["other_max_abs"], a["layer_median_abs"], self.lengths)


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


# ------------------------------------------------------------------------------ keys and values


@dataclass
class KVStats:
    k_norm: np.ndarray  # [N, L, KV, T]: key norm as it enters the scores
    v_norm: np.ndarray  # [N, L, KV, T]
    attn_first: np.ndarray  # [N, L, H]: mean attention queries t >= 1 give position 0
    value_share: np.ndarray  # [N, L, H]: mean_{t>=1} A[t,0] ||v_0|| / ||z_t||
    key_hook: str
    lengths: np.ndarray


def key_hook_name(model, layer: int = 0) -> str:
    """The key as the scores see it: after RoPE (``hook_rot_k``; on Gemma 3 that is after
    ``k_norm`` too), else after a key norm, else the projection output."""
    for suffix in ("attn.hook_rot_k", "attn.hook_k_normed", "attn.hook_k"):
        if f"blocks.{layer}.{suffix}" in model.hook_dict:
            return suffix
    raise ValueError("this model has no key hook")


class KVMeter(_Meter):
    """Key and value norms by position, and how much of each head's output the sink's value makes."""

    def __init__(self, model):
        super().__init__(model)
        self.n_heads = int(model.cfg.n_heads)
        self.n_kv = int(getattr(model.cfg, "n_key_value_heads", None) or self.n_heads)
        self.key_hook = key_hook_name(model)
        self._v0: dict[int, Tensor] = {}
        self._num: dict[int, Tensor] = {}

    def _allocate(self, b, t):
        lay = self.n_layers
        return {
            "k_norm": _nan((b, lay, self.n_kv, t)), "v_norm": _nan((b, lay, self.n_kv, t)),
            "attn_first": _nan((b, lay, self.n_heads)), "value_share": _nan((b, lay, self.n_heads)),
        }

    def hooks(self):
        out = []
        for l in range(self.n_layers):
            out.append((f"blocks.{l}.{self.key_hook}", self._norm_hook(l, "k_norm")))
            out.append((f"blocks.{l}.attn.hook_v", self._norm_hook(l, "v_norm")))
            out.append((f"blocks.{l}.attn.hook_pattern", self._pattern_hook(l)))
            out.append((f"blocks.{l}.attn.hook_z", self._z_hook(l)))
        return out

    def _norm_hook(self, layer, key):
        def hook(x: Float[Tensor, "batch pos kv d_head"], hook):
            x = x.detach().float()
            if x.shape[1] != self._current.tokens.shape[1]:  # [batch, kv, pos, d] layouts
                x = x.transpose(1, 2)
            norm = x.norm(dim=-1).transpose(1, 2)  # [b, kv, t]
            valid = _valid(self._current, norm.shape[-1], norm.device)[:, None, :]
            self._put(key, layer, torch.where(valid, norm, torch.nan))
            if key == "v_norm":
                self._v0[layer] = norm[:, :, 0]  # [b, kv]

        return hook

    def _pattern_hook(self, layer):
        def hook(pattern: Float[Tensor, "batch head query key"], hook):
            p = pattern.detach().float()
            b, h, t, _ = p.shape
            valid = _valid(self._current, t, p.device).clone()
            valid[:, 0] = False  # queries t >= 1
            a0 = torch.where(valid[:, None, :], p[..., 0], torch.nan)  # [b, h, t]
            n = valid.sum(-1).clamp_min(1)[:, None]
            self._put("attn_first", layer, torch.nan_to_num(a0, nan=0.0).sum(-1) / n)
            v0 = self._v0.pop(layer).to(p.device)  # [b, kv]
            v0 = v0.repeat_interleave(h // v0.shape[1], dim=1)  # query head -> its kv group
            self._num[layer] = a0 * v0[:, :, None]  # [b, h, t]

        return hook

    def _z_hook(self, layer):
        def hook(z: Float[Tensor, "batch pos head d_head"], hook):
            zn = z.detach().float().norm(dim=-1).transpose(1, 2)  # [b, h, t]
            share = self._num.pop(layer) / zn.clamp_min(1e-12)
            self._put("value_share", layer, nanmean_t(share))

        return hook

    def result(self) -> KVStats:
        a = self._concat({"k_norm": 3, "v_norm": 3, "attn_first": None, "value_share": None})
        return KVStats(a["k_norm"], a["v_norm"], a["attn_first"], a["value_share"], self.key_hook, self.lengths)


def nanmean_t(x: Tensor) -> Tensor:
    """Mean over the last axis ignoring NaN (an all-NaN row gives NaN)."""
    ok = ~torch.isnan(x)
    return torch.where(ok, x, 0.0).sum(-1) / ok.sum(-1)


def key_value_norms(stats: KVStats) -> pd.DataFrame:
    """Per layer: key and value norms of position 0 against the median over positions >= 1
    (averaged over KV heads, then sequences), their ratios, the mean attention later queries
    give position 0 and the share of the heads' output norm that its value contributes."""
    def first_rest(a):  # [N, L, KV, T]
        a = nanmean(a, axis=2)
        with np.errstate(all="ignore"):
            return nanmean(a[:, :, 0], axis=0), nanmean(np.nanmedian(a[:, :, 1:], axis=2), axis=0)

    kf, kr = first_rest(stats.k_norm)
    vf, vr = first_rest(stats.v_norm)
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
]
